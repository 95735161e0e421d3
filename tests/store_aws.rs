//! The `aws` store against the moto AWS emulator and a real PostgreSQL.

use serde_json::{json, Value};
use support::config::ConfigBuilder;
use support::moto::Moto;
use support::postgres::Postgres;
use support::rotator::{assert_no_secret, random_password, Rotator};

const SECRET: &str = "llmtrace/proxy";

struct Setup {
    pg: Postgres,
    moto: Moto,
    rotator: Rotator,
    old_password: String,
}

fn config(pg: &Postgres, moto: &Moto, command: &str) -> String {
    ConfigBuilder::new()
        .postgres(&pg.address())
        .store("aws")
        .str("secret_id", SECRET)
        .str("property", "postgres_url")
        .str("region", "us-east-1")
        .str("endpoint", &moto.endpoint)
        .command_consumer(&["sh", "-c", command])
        .unset("timeout")
        .build()
}

async fn setup(command: &str) -> Setup {
    let pg = Postgres::start().await;
    let old_password = random_password();
    pg.create_login("llmtrace", &old_password, "llmtrace").await;
    let moto = Moto::start().await;
    let value = json!({ "postgres_url": pg.url("llmtrace", &old_password, "llmtrace"), "redis_url": "redis://:redis-secret@redis:6379/0" });
    moto.secretsmanager(
        "CreateSecret",
        json!({ "Name": SECRET, "SecretString": value.to_string() }),
    )
    .await;
    let mut rotator = Rotator::new(&config(&pg, &moto, command));
    rotator
        .env
        .insert("PG_ADMIN_PASSWORD".into(), pg.admin_password().into());
    rotator
        .env
        .insert("AWS_ACCESS_KEY_ID".into(), "AKIDTESTING".into());
    rotator.env.insert(
        "AWS_SECRET_ACCESS_KEY".into(),
        "aws-secret-key-for-tests".into(),
    );
    Setup {
        pg,
        moto,
        rotator,
        old_password,
    }
}

impl Setup {
    /// (AWSCURRENT's VersionId, its SecretString parsed)
    async fn current(&self) -> (String, Value) {
        let answer = self
            .moto
            .secretsmanager(
                "GetSecretValue",
                json!({ "SecretId": SECRET, "VersionStage": "AWSCURRENT" }),
            )
            .await;
        let value = serde_json::from_str(answer["SecretString"].as_str().unwrap()).unwrap();
        (answer["VersionId"].as_str().unwrap().to_string(), value)
    }

    async fn stages(&self) -> serde_json::Map<String, Value> {
        let answer = self
            .moto
            .secretsmanager("DescribeSecret", json!({ "SecretId": SECRET }))
            .await;
        answer["VersionIdsToStages"].as_object().unwrap().clone()
    }

    async fn holding(&self, label: &str) -> Vec<String> {
        self.stages()
            .await
            .iter()
            .filter(|(_, s)| s.as_array().unwrap().iter().any(|x| x == label))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

fn password_in(url: &str) -> String {
    let url = url::Url::parse(url).unwrap();
    percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn rotates_through_a_pending_version_that_becomes_current() {
    let s = setup("true").await;
    let (old_version, before) = s.current().await;

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let (new_version, after) = s.current().await;
    assert_ne!(new_version, old_version);
    assert_eq!(
        after["redis_url"], before["redis_url"],
        "other properties untouched"
    );
    let new = password_in(after["postgres_url"].as_str().unwrap());
    assert_eq!(
        after["postgres_url"].as_str().unwrap(),
        before["postgres_url"]
            .as_str()
            .unwrap()
            .replace(&s.old_password, &new)
    );
    assert_eq!(s.holding("AWSPREVIOUS").await, [old_version]);
    assert!(
        s.holding("AWSPENDING").await.is_empty(),
        "no pending label left: {:?}",
        s.stages().await
    );
    s.pg.assert_only_login("llmtrace", "llmtrace", &new, &s.old_password)
        .await;
    let secrets = [
        s.old_password.as_str(),
        &new,
        s.pg.admin_password(),
        "aws-secret-key-for-tests",
        "redis-secret",
    ];
    assert_no_secret(&out.all(), &secrets, "rotator output at trace level");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_makes_the_original_version_current_again() {
    let s = setup("exit 1").await;
    let (old_version, before) = s.current().await;

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back");
    let (version, after) = s.current().await;
    assert_eq!(
        version, old_version,
        "the very version that was current is current again"
    );
    assert_eq!(after, before);
    assert!(s.holding("AWSPENDING").await.is_empty());
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("old password logs in");
    assert_no_secret(
        &out.all(),
        &[
            s.old_password.as_str(),
            s.pg.admin_password(),
            "aws-secret-key-for-tests",
        ],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_version_left_by_a_crash_is_cleared() {
    let s = setup("true").await;
    // What a crash between writing the pending version and promoting it leaves behind.
    s.moto
        .secretsmanager("PutSecretValue", json!({ "SecretId": SECRET, "SecretString": "{\"postgres_url\":\"postgres://x:half-done@h/d\"}", "VersionStages": ["AWSPENDING"] }))
        .await;
    assert_eq!(s.holding("AWSPENDING").await.len(), 1);

    let out = s.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        s.holding("AWSPENDING").await.is_empty(),
        "{:?}",
        s.stages().await
    );
    let (_, after) = s.current().await;
    s.pg.try_login(
        "llmtrace",
        &password_in(after["postgres_url"].as_str().unwrap()),
        "llmtrace",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn web_identity_credentials_come_from_sts() {
    let mut s = setup("true").await;
    s.rotator.env.remove("AWS_ACCESS_KEY_ID");
    s.rotator.env.remove("AWS_SECRET_ACCESS_KEY");
    let token = s.rotator.path("web-identity-token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bGxtdHJhY2U6cm90YXRvciJ9.c2ln").unwrap();
    s.rotator.env.insert(
        "AWS_WEB_IDENTITY_TOKEN_FILE".into(),
        token.display().to_string(),
    );
    s.rotator.env.insert(
        "AWS_ROLE_ARN".into(),
        "arn:aws:iam::123456789012:role/llmtrace-rotator".into(),
    );
    s.rotator
        .env
        .insert("AWS_ENDPOINT_URL_STS".into(), s.moto.endpoint.clone());

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let (_, after) = s.current().await;
    s.pg.try_login(
        "llmtrace",
        &password_in(after["postgres_url"].as_str().unwrap()),
        "llmtrace",
    )
    .await
    .unwrap();

    s.rotator.env.remove("AWS_ROLE_ARN");
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("no AWS credentials"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_secret_is_refused_by_name() {
    let s = setup("true").await;
    s.rotator
        .write_config(&config(&s.pg, &s.moto, "true").replace(SECRET, "llmtrace/absent"));
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout
            .contains("the secret llmtrace/absent does not exist"),
        "{}",
        out.stdout
    );
}

/// With Secrets Manager rotation on, a rotation Lambda writes AWSPENDING and moves AWSCURRENT on
/// its own (moto's RotateSecret leaves AWSPENDING on a new version, RotationEnabled true):
/// preflight refuses the secret, saying why, before anything changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_with_aws_rotation_enabled_is_refused() {
    let s = setup("true").await;
    s.moto
        .secretsmanager(
            "RotateSecret",
            json!({ "SecretId": SECRET, "RotationRules": { "AutomaticallyAfterDays": 30 }, "RotateImmediately": false }),
        )
        .await;
    let stages = s.stages().await;
    let described = s
        .moto
        .secretsmanager("DescribeSecret", json!({ "SecretId": SECRET }))
        .await;
    assert_eq!(described["RotationEnabled"], true);

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout
            .contains("rotation is enabled on this secret (RotationEnabled)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("cancel-rotate-secret"),
        "{}",
        out.stdout
    );
    assert_eq!(
        s.stages().await,
        stages,
        "AWSPENDING of the AWS rotation left alone"
    );
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("old password logs in");
}

/// PutSecretValue is idempotent for one ClientRequestToken (the same token and value answer the
/// version already made; moto's put_secret_value follows that). A proxy that loses the answer
/// of the first PutSecretValue (after moto made the version): the rotator repeats it with the
/// same token, and no second version appears.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_put_answer_is_repeated_with_the_same_token() {
    use std::sync::{Arc, Mutex};

    let s = setup("true").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    let tokens = Arc::new(Mutex::new(Vec::<String>::new()));
    let upstream = s.moto.endpoint.clone();
    let seen = tokens.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: String| {
        let (upstream, seen) = (upstream.clone(), seen.clone());
        async move {
            let target = headers["x-amz-target"].to_str().unwrap().to_string();
            let mut request = reqwest::Client::new().post(&upstream).body(body.clone());
            for (name, value) in &headers {
                if name != "host" && name != "content-length" {
                    request = request.header(name.as_str(), value.as_bytes());
                }
            }
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            let text = answer.text().await.unwrap();
            if target == "secretsmanager.PutSecretValue" {
                let sent: Value = serde_json::from_str(&body).unwrap();
                let mut seen = seen.lock().unwrap();
                seen.push(sent["ClientRequestToken"].as_str().unwrap().to_string());
                if seen.len() == 1 {
                    // The version exists now; the caller never hears of it.
                    return (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        r#"{"__type":"InternalServiceError","message":"answer lost"}"#.to_string(),
                    );
                }
            }
            (axum::http::StatusCode::from_u16(status).unwrap(), text)
        }
    });
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    s.rotator
        .write_config(&config(&s.pg, &s.moto, "true").replace(&s.moto.endpoint, &proxy));

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    server.abort();

    assert_eq!(out.code, 0, "{}", out.all());
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert_eq!(tokens[0], tokens[1], "the repeat carries the same token");
    let versions = s
        .moto
        .secretsmanager("ListSecretVersionIds", json!({ "SecretId": SECRET }))
        .await;
    assert_eq!(
        versions["Versions"].as_array().unwrap().len(),
        2,
        "the original and one new version: {versions}"
    );
    let (current, after) = s.current().await;
    assert_eq!(current, tokens[0], "the token is the new version's id");
    s.pg.try_login(
        "llmtrace",
        &password_in(after["postgres_url"].as_str().unwrap()),
        "llmtrace",
    )
    .await
    .expect("new password logs in");
}

//! The `vault` store against a real OpenBao dev server and a real PostgreSQL.

use serde_json::json;
use support::config::ConfigBuilder;
use support::openbao::OpenBao;
use support::postgres::Postgres;
use support::rotator::{assert_no_secret, random_password, Rotator};

struct Setup {
    pg: Postgres,
    bao: OpenBao,
    rotator: Rotator,
    old_password: String,
}

fn config(pg: &Postgres, bao: &OpenBao, command: &str, auth: &str) -> String {
    ConfigBuilder::new()
        .postgres(&pg.address())
        .store("vault")
        .str("address", &bao.address)
        .str("path", "llmtrace/proxy")
        .str("property", "postgres_url")
        .str("format", "url")
        .lines(auth)
        .command_consumer(&["sh", "-c", command])
        .unset("timeout")
        .build()
}

async fn setup(command: &str) -> Setup {
    let pg = Postgres::start().await;
    let old_password = random_password();
    pg.create_login("llmtrace", &old_password, "llmtrace").await;
    let bao = OpenBao::start().await;
    bao.put_kv(
        "llmtrace/proxy",
        json!({
            "postgres_url": pg.url("llmtrace", &old_password, "llmtrace"),
            "redis_url": "redis://:redis-secret@redis:6379/0",
        }),
    )
    .await;
    let mut rotator = Rotator::new(&config(&pg, &bao, command, "token = \"env:VAULT_TOKEN\""));
    rotator
        .env
        .insert("PG_ADMIN_PASSWORD".into(), pg.admin_password().into());
    rotator
        .env
        .insert("VAULT_TOKEN".into(), bao.root_token.clone());
    Setup {
        pg,
        bao,
        rotator,
        old_password,
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
async fn rotates_a_property_and_keeps_the_others() {
    let s = setup("true").await;
    let (before, version) = s.bao.get_kv("llmtrace/proxy").await;

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let (after, new_version) = s.bao.get_kv("llmtrace/proxy").await;
    assert_eq!(new_version, version + 1, "one check-and-set write");
    assert_eq!(after["redis_url"], before["redis_url"]);
    let new = password_in(after["postgres_url"].as_str().unwrap());
    assert_eq!(
        after["postgres_url"].as_str().unwrap(),
        before["postgres_url"]
            .as_str()
            .unwrap()
            .replace(&s.old_password, &new)
    );
    s.pg.assert_only_login("llmtrace", "llmtrace", &new, &s.old_password)
        .await;
    let secrets = [
        s.old_password.as_str(),
        &new,
        s.pg.admin_password(),
        &s.bao.root_token,
        "redis-secret",
    ];
    assert_no_secret(&out.all(), &secrets, "rotator output at trace level");

    let check = s.rotator.run(&["check"]).await;
    assert_eq!(check.code, 0, "{}", check.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_writes_the_previous_value_back() {
    let s = setup("exit 1").await;
    let (before, version) = s.bao.get_kv("llmtrace/proxy").await;

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back");
    let (after, new_version) = s.bao.get_kv("llmtrace/proxy").await;
    assert_eq!(after, before, "every property as it was");
    assert_eq!(new_version, version + 2, "written, then written back");
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("old password logs in");
    assert_no_secret(
        &out.all(),
        &[
            s.old_password.as_str(),
            s.pg.admin_password(),
            &s.bao.root_token,
        ],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_concurrent_writer_is_not_overwritten() {
    // During the restart someone else changes the rotated property: the rollback must not clobber it.
    let s = setup("").await;
    let url = format!("{}/v1/secret/data/llmtrace/proxy", s.bao.address);
    let command = format!(
        "curl -sf -o /dev/null -H 'X-Vault-Token: {}' -d '{{\"data\":{{\"postgres_url\":\"postgres://llmtrace:someone-else@db/x\"}}}}' {url}",
        s.bao.root_token
    );
    s.rotator.write_config(&config(
        &s.pg,
        &s.bao,
        &command,
        "token = \"env:VAULT_TOKEN\"",
    ));

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 3, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rollback_failed");
    assert!(
        report["state"]
            .to_string()
            .contains("holds a value this run did not write"),
        "{report:#}"
    );
    let (after, _) = s.bao.get_kv("llmtrace/proxy").await;
    assert_eq!(
        after["postgres_url"],
        "postgres://llmtrace:someone-else@db/x"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_token_and_missing_secret_are_refused_before_any_change() {
    let mut s = setup("true").await;
    s.rotator
        .env
        .insert("VAULT_TOKEN".into(), "not-a-token".into());
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(out.stdout.contains("403"), "{}", out.stdout);

    s.rotator
        .env
        .insert("VAULT_TOKEN".into(), s.bao.root_token.clone());
    s.rotator.write_config(
        &config(&s.pg, &s.bao, "true", "token = \"env:VAULT_TOKEN\"")
            .replace("llmtrace/proxy", "llmtrace/nothing-here"),
    );
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("llmtrace/nothing-here does not exist"),
        "{}",
        out.stdout
    );
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .unwrap();
}

/// OpenBao insists on a CA even for a plain-HTTP API server; this one is never used.
const UNUSED_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBjzCCATWgAwIBAgIUYiBMIZzgo4d4GZMY5B12Poy+QjowCgYIKoZIzj0EAwIw\nHDEaMBgGA1UEAwwRZmFrZS1hcGlzZXJ2ZXItY2EwIBcNMjYxMTI4MjA0NjA1WhgP\nMjEyNjExMDQyMDQ2MDVaMBwxGjAYBgNVBAMMEWZha2UtYXBpc2VydmVyLWNhMFkw\nEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEcsbc+khGIQheM6a2XotpHE6yOUqih2Cx\nKhXlHzJY1hud7m5gzAeMcozunB40Xg/lVAwJRM5TSGvJcGDAnoX426NTMFEwHQYD\nVR0OBBYEFKs93qWilfktKr3sXjWjuxFsurkhMB8GA1UdIwQYMBaAFKs93qWilfkt\nKr3sXjWjuxFsurkhMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIh\nAONxHYfrvemYRj7KxguS4fBkgq6vyNKNhciiWNs36HE6AiAsePc3B5rH35SW+tfe\nTc4nlDz1P51YCw1/dAWolmT0xA==\n-----END CERTIFICATE-----";

/// OpenBao's Kubernetes auth, reviewing tokens against the Kubernetes API fake, with a policy
/// that allows only the rotated secret.
async fn enable_kubernetes_auth(bao: &OpenBao, kube: &support::kube_fake::KubeFake) {
    let reviewer = kube.issue_service_account_token("kube-system", "openbao-reviewer");
    for (method, path, body) in [
        ("POST", "sys/auth/kubernetes", json!({"type": "kubernetes"})),
        (
            "POST",
            "auth/kubernetes/config",
            json!({"kubernetes_host": kube.url(), "token_reviewer_jwt": reviewer, "disable_local_ca_jwt": true, "kubernetes_ca_cert": UNUSED_CA}),
        ),
        (
            "PUT",
            "sys/policies/acl/rotator",
            json!({"policy": "path \"secret/data/llmtrace/proxy\" { capabilities = [\"read\", \"create\", \"update\"] }"}),
        ),
        (
            "POST",
            "auth/kubernetes/role/rotator",
            json!({
                "bound_service_account_names": ["llmtrace-rotator"],
                "bound_service_account_namespaces": ["llmtrace"],
                "token_policies": ["rotator"],
                "token_ttl": "10m",
            }),
        ),
    ] {
        let (status, answer) = bao.call(method, path, Some(body)).await;
        assert!(status < 300, "{method} {path}: {status} {answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_auth_logs_in_with_the_service_account_token() {
    let s = setup("true").await;
    let kube = support::kube_fake::KubeFake::start().await;
    enable_kubernetes_auth(&s.bao, &kube).await;
    let token = kube.issue_service_account_token("llmtrace", "llmtrace-rotator");
    std::fs::write(s.rotator.path("sa-token"), &token).unwrap();
    let auth = "auth = { kubernetes = { role = \"rotator\", token_file = \"sa-token\" } }";
    s.rotator.write_config(&config(&s.pg, &s.bao, "true", auth));

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let (after, _) = s.bao.get_kv("llmtrace/proxy").await;
    let new = password_in(after["postgres_url"].as_str().unwrap());
    s.pg.try_login("llmtrace", &new, "llmtrace")
        .await
        .expect("new password logs in");
    assert!(
        kube.requests()
            .iter()
            .any(|r| r.resource == "tokenreviews" && r.status == 201),
        "OpenBao reviewed the token"
    );
    assert_no_secret(
        &out.all(),
        &[s.old_password.as_str(), &new, &token, &s.bao.root_token],
        "rotator output",
    );

    // A service account the role is not bound to is refused before anything changes.
    let stranger = kube.issue_service_account_token("default", "someone");
    std::fs::write(s.rotator.path("sa-token"), &stranger).unwrap();
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout
            .contains("Kubernetes login to Vault as role \\\"rotator\\\" failed"),
        "{}",
        out.stdout
    );
    assert_eq!(s.bao.get_kv("llmtrace/proxy").await.0, after);
    assert_no_secret(&out.all(), &[&stranger], "rotator output");
}

/// Live tokens made by logins through the Kubernetes auth mount, as root sees them.
/// OpenBao lists live tokens' accessors at `auth/token/accessors`, root only (openbao/openbao
/// vault/token_store.go, tokenStoreAccessorList); `lookup-accessor` tells each one's login path.
async fn kubernetes_tokens(bao: &OpenBao) -> usize {
    let (status, list) = bao
        .call("GET", "auth/token/accessors?list=true", None)
        .await;
    assert_eq!(status, 200, "{list}");
    let mut count = 0;
    for accessor in list["data"]["keys"].as_array().unwrap() {
        let (status, token) = bao
            .call(
                "POST",
                "auth/token/lookup-accessor",
                Some(json!({ "accessor": accessor })),
            )
            .await;
        assert_eq!(status, 200, "{token}");
        if token["data"]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("auth/kubernetes/"))
        {
            count += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_logins_leave_no_live_token_behind() {
    let s = setup("true").await;
    let kube = support::kube_fake::KubeFake::start().await;
    enable_kubernetes_auth(&s.bao, &kube).await;
    let token = kube.issue_service_account_token("llmtrace", "llmtrace-rotator");
    std::fs::write(s.rotator.path("sa-token"), &token).unwrap();
    let auth = "auth = { kubernetes = { role = \"rotator\", token_file = \"sa-token\" } }";
    s.rotator.write_config(&config(&s.pg, &s.bao, "true", auth));
    assert_eq!(kubernetes_tokens(&s.bao).await, 0);

    let out = s.rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    for _ in 0..3 {
        let out = s.rotator.run(&["check"]).await;
        assert_eq!(out.code, 0, "{}", out.all());
    }

    let logins = kube
        .requests()
        .iter()
        .filter(|r| r.resource == "tokenreviews")
        .count();
    assert!(logins >= 4, "one login per operation at least: {logins}");
    assert_eq!(
        kubernetes_tokens(&s.bao).await,
        0,
        "every login's token was revoked after use"
    );
    assert!(!out.all().contains("could not revoke"), "{}", out.all());
}

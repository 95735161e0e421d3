//! PostgreSQL `strategy = "alternating"`: two logins used in turn, so no client ever holds a
//! credential that stopped working. Real PostgreSQL, dotenv store, command consumer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::config::ConfigBuilder;

use support::postgres::Postgres;
use support::rotator::{assert_no_secret, random_password, Rotator};

struct Pair {
    pg: Arc<Postgres>,
    rotator: Rotator,
    password_a: String,
    password_b: String,
}

fn config(pg: &Postgres, command: &str) -> String {
    ConfigBuilder::new()
        .postgres(&pg.address())
        .unset("user")
        .set("users", r#"["llmtrace_a", "llmtrace_b"]"#)
        .str("strategy", "alternating")
        .store("file")
        .str("path", ".env")
        .str("key", "LLMTRACE_POSTGRES_URL")
        .command_consumer(&["sh", "-c", command])
        .unset("timeout")
        .build()
}

async fn pair(command: &str, grant_b: bool) -> Pair {
    let pg = Postgres::start().await;
    pg.exec("CREATE ROLE llmtrace_owner NOLOGIN").await;
    pg.exec("CREATE DATABASE llmtrace OWNER llmtrace_owner")
        .await;
    let (password_a, password_b) = (random_password(), random_password());
    pg.create_login("llmtrace_a", &password_a, "llmtrace").await;
    pg.create_login("llmtrace_b", &password_b, "llmtrace").await;
    pg.exec("GRANT llmtrace_owner TO llmtrace_a").await;
    if grant_b {
        pg.exec("GRANT llmtrace_owner TO llmtrace_b").await;
    }
    let mut rotator = Rotator::new(&config(&pg, command));
    rotator
        .env
        .insert("PG_ADMIN_PASSWORD".into(), pg.admin_password().into());
    std::fs::write(
        rotator.path(".env"),
        format!(
            "LLMTRACE_POSTGRES_URL={}\n",
            pg.url("llmtrace_a", &password_a, "llmtrace")
        ),
    )
    .unwrap();
    Pair {
        pg: Arc::new(pg),
        rotator,
        password_a,
        password_b,
    }
}

/// (user, password) in the .env now.
fn stored(rotator: &Rotator) -> (String, String) {
    let text = std::fs::read_to_string(rotator.path(".env")).unwrap();
    let url = url::Url::parse(text.trim().trim_start_matches("LLMTRACE_POSTGRES_URL=")).unwrap();
    let password = percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned();
    (url.username().to_string(), password)
}

/// A client that logs in afresh every ~10 ms with whatever the store holds: (tries, failures).
async fn logins_during(
    pair: &Pair,
    rotation: impl std::future::Future<Output = support::rotator::Output>,
) -> (support::rotator::Output, usize, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tries, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let env = pair.rotator.path(".env");
    let client = {
        let (stop, tries, failures, pg) = (
            stop.clone(),
            tries.clone(),
            failures.clone(),
            pair.pg.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&env).unwrap();
                let url = url::Url::parse(text.trim().trim_start_matches("LLMTRACE_POSTGRES_URL="))
                    .unwrap();
                let password = percent_encoding::percent_decode_str(url.password().unwrap())
                    .decode_utf8()
                    .unwrap()
                    .into_owned();
                tries.fetch_add(1, Ordering::Relaxed);
                if pg
                    .try_login(url.username(), &password, "llmtrace")
                    .await
                    .is_err()
                {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let out = rotation.await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    (
        out,
        tries.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn alternating_rotation_drops_no_login_and_keeps_the_previous_one_working() {
    let pair = pair("sleep 2", true).await;

    let started = Instant::now();
    let (out, tries, failures) =
        logins_during(&pair, pair.rotator.run(&["rotate", "--output", "json"])).await;
    println!(
        "alternating: rotation {:.2} s, {tries} logins, {failures} failed",
        started.elapsed().as_secs_f64()
    );

    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        failures, 0,
        "no client login failed during the rotation ({tries} tried)"
    );
    assert!(tries > 50, "{tries}");
    let (user, password) = stored(&pair.rotator);
    assert_eq!(user, "llmtrace_b", "the store moved to the idle login");
    assert_ne!(password, pair.password_b);
    pair.pg
        .try_login("llmtrace_b", &password, "llmtrace")
        .await
        .expect("the new credential logs in");
    pair.pg
        .try_login("llmtrace_a", &pair.password_a, "llmtrace")
        .await
        .expect("the previous login keeps working");

    // The next rotation comes back to the first login; the second keeps working.
    let again = pair.rotator.run(&["rotate"]).await;
    assert_eq!(again.code, 0, "{}", again.all());
    let (user, new_a) = stored(&pair.rotator);
    assert_eq!(user, "llmtrace_a");
    pair.pg
        .try_login("llmtrace_a", &new_a, "llmtrace")
        .await
        .unwrap();
    pair.pg
        .try_login("llmtrace_b", &password, "llmtrace")
        .await
        .expect("b keeps working until the next rotation");
    assert!(pair
        .pg
        .try_login("llmtrace_a", &pair.password_a, "llmtrace")
        .await
        .is_err());
    let secrets = [
        pair.password_a.as_str(),
        &pair.password_b,
        &password,
        &new_a,
        pair.pg.admin_password(),
    ];
    assert_no_secret(
        &format!("{}{}", out.all(), again.all()),
        &secrets,
        "rotator output at trace level",
    );
    assert_no_secret(
        &pair.pg.log_contents(),
        &secrets[..4],
        "the PostgreSQL server log",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_leaves_the_previous_login_in_every_store() {
    let pair = pair("exit 1", true).await;
    let before = std::fs::read_to_string(pair.rotator.path(".env")).unwrap();

    let out = pair.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back");
    assert_eq!(
        std::fs::read_to_string(pair.rotator.path(".env")).unwrap(),
        before
    );
    pair.pg
        .try_login("llmtrace_a", &pair.password_a, "llmtrace")
        .await
        .expect("the previous login works");
    assert!(
        pair.pg
            .try_login("llmtrace_b", &pair.password_b, "llmtrace")
            .await
            .is_err(),
        "the idle login's password was changed and then discarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_says_what_the_setup_is_missing() {
    let pair = pair("true", false).await;

    let out = pair.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(out.stdout.contains("share no NOLOGIN role to own the objects: GRANT <owner role> TO \\\"llmtrace_a\\\", \\\"llmtrace_b\\\""), "{}", out.stdout);
    assert_eq!(
        stored(&pair.rotator),
        ("llmtrace_a".to_string(), pair.password_a.clone())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_session_on_the_idle_login_refuses_the_rotation_and_changes_nothing() {
    use sqlx::Connection;
    let pair = pair("true", true).await;
    let before = std::fs::read_to_string(pair.rotator.path(".env")).unwrap();
    // A pod still on the credential from two rotations ago: the idle login's password.
    let mut straggler = sqlx::PgConnection::connect_with(&pair.pg.connect_options(
        "llmtrace_b",
        &pair.password_b,
        "llmtrace",
    ))
    .await
    .unwrap();
    let (client,): (String,) =
        sqlx::query_as("SELECT host(inet_client_addr()) || ':' || inet_client_port()")
            .fetch_one(&mut straggler)
            .await
            .unwrap();

    let out = pair.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "refused");
    let error = report["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "login \"llmtrace_b\" has 1 open session(s) from {client}"
        )),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(pair.rotator.path(".env")).unwrap(),
        before
    );
    pair.pg
        .try_login("llmtrace_b", &pair.password_b, "llmtrace")
        .await
        .expect("the idle login's password is unchanged");
    assert_no_secret(
        &out.all(),
        &[&pair.password_a, &pair.password_b, pair.pg.admin_password()],
        "rotator output",
    );

    // Once it is gone, the rotation goes ahead.
    straggler.close().await.unwrap();
    let again = pair.rotator.run(&["rotate"]).await;
    assert_eq!(again.code, 0, "{}", again.all());
}

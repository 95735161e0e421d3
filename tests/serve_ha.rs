//! Two `serve` replicas on one PostgreSQL journal: every scheduled fire runs exactly once, no
//! replica counts a `busy` skip for a fire the other runs, both answer the API, and when one
//! is killed the other keeps rotating and recovers what the dead one left.

use std::time::{Duration, Instant};

use support::rotator::{
    assert_no_secret, file_config_with, free_port, postgres_journal, sample, ComposeHost,
};

const TARGET: [(&str, &str); 1] = [("target", "postgres")];

/// A replica's config: a fire every `every_seconds` (a leading seconds field), periodic
/// recovery every `recover_seconds`.
fn replica_config(
    host: &ComposeHost,
    port: u16,
    every_seconds: u32,
    recover_seconds: u32,
) -> String {
    let log = host.restart_log.display().to_string();
    postgres_journal(&file_config_with(
        &host.pg.address(),
        &["sh".into(), "-c".into(), format!("echo restarted >> {log}")],
        &format!(
            "listen = \"127.0.0.1:{port}\"\napi_tokens = \"env:ROTATOR_API_TOKENS\"\n\
             check_interval = \"0s\"\nrecover_interval = \"{recover_seconds}s\""
        ),
        &format!("schedule = \"*/{every_seconds} * * * * *\"\nwindow = \"5m\""),
    ))
}

async fn journal_rows(host: &ComposeHost, sql: &str) -> Vec<(String, i64)> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(&host.pg.connect_options(
        "postgres",
        host.pg.admin_password(),
        "rotator_journal",
    ))
    .await
    .unwrap();
    sqlx::query_as(sql).fetch_all(&mut conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_run_each_fire_once_and_survive_losing_one() {
    let mut host = ComposeHost::start().await;
    host.use_postgres_journal().await;
    let (port_a, port_b) = (free_port(), free_port());
    host.rotator
        .write_config(&replica_config(&host, port_a, 3, 2));
    let config_b = host.rotator.path("replica-b.toml");
    std::fs::write(&config_b, replica_config(&host, port_b, 3, 2)).unwrap();

    let a = host.rotator.serve(port_a).await;
    let mut b = host.rotator.serve_with(&config_b, port_b).await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    // Both answer the API; both schedule.
    for replica in [&a, &b] {
        let (status, targets) = replica.get("/v1/targets").await;
        assert_eq!(status, 200, "{targets}");
        assert_eq!(
            sample(&replica.metrics().await, "rotator_leader", &[]),
            Some(1.0)
        );
    }

    // SIGKILL one replica; the other keeps rotating.
    let a_metrics = a.metrics().await;
    let mut a = a;
    a.child.start_kill().unwrap();
    a.wait(Duration::from_secs(10)).await;
    let killed = chrono::Utc::now().timestamp_millis();
    let after_kill = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let later: Vec<(String, i64)> = journal_rows(
            &host,
            &format!(
                "SELECT id, started_at FROM rotator_runs WHERE trigger_kind = 'schedule' \
                 AND outcome = 'succeeded' AND started_at > {killed}"
            ),
        )
        .await;
        if later.len() >= 2 {
            eprintln!(
                "second scheduled success after the kill: {} ms",
                after_kill.elapsed().as_millis()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor kept rotating: {}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the survivor recover whatever the dead replica left, then stop it cleanly.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let b_metrics = b.metrics().await;
    b.signal("TERM");
    assert_eq!(b.wait(Duration::from_secs(30)).await, 0, "{}", b.log());

    // Every fire ran at most once: one run per claimed fire, no two runs overlapping.
    let fires = journal_rows(
        &host,
        "SELECT target, scheduled_at FROM rotator_fires ORDER BY scheduled_at",
    )
    .await;
    let runs: Vec<(String, i64)> = journal_rows(
        &host,
        "SELECT id, started_at FROM rotator_runs WHERE trigger_kind = 'schedule' ORDER BY started_at",
    )
    .await;
    assert!(fires.len() >= 5, "{fires:?}");
    assert!(
        runs.len() <= fires.len(),
        "{} runs for {} fires",
        runs.len(),
        fires.len()
    );
    let spans: Vec<(i64, i64)> = journal_rows(
        &host,
        "SELECT id, started_at FROM rotator_runs ORDER BY started_at",
    )
    .await
    .iter()
    .map(|(_, s)| *s)
    .zip(
        journal_rows(
            &host,
            "SELECT id, COALESCE(finished_at, 0) FROM rotator_runs ORDER BY started_at",
        )
        .await
        .iter()
        .map(|(_, f)| *f),
    )
    .collect();
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "runs overlapped or one never finished: {spans:?}"
        );
    }
    for metrics in [&a_metrics, &b_metrics] {
        let busy = sample(
            metrics,
            "rotator_skipped_schedules_total",
            &[TARGET[0], ("reason", "busy")],
        );
        assert_eq!(busy.unwrap_or(0.0), 0.0, "no busy skips:\n{metrics}");
    }
    host.assert_stores_log_in().await;
    let (now, _) = host.stored_passwords();
    assert_no_secret(
        &format!("{}{}", a.log(), b.log()),
        &[
            now.as_str(),
            host.old_password.as_str(),
            host.pg.admin_password(),
        ],
        "replica logs",
    );
}

/// A replica that dies between claiming a fire and starting its run (stopped there by a
/// failpoint, then SIGKILLed) does not cost the fire: after `takeover_grace`, another
/// replica's periodic recovery takes the undecided claim over and runs it within its window.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_fire_claimed_by_a_replica_that_died_is_run_by_another() {
    let mut host = ComposeHost::start().await;
    host.use_postgres_journal().await;
    let (port_a, port_b) = (free_port(), free_port());
    // Every 20 seconds: the fire taken over runs long before the next one.
    let config = |port: u16| replica_config(&host, port, 20, 1);
    host.rotator.write_config(&config(port_a));
    let config_b = host.rotator.path("replica-b.toml");
    std::fs::write(&config_b, config(port_b)).unwrap();

    host.rotator.env.insert(
        "LLMTRACE_ROTATOR_PAUSE_AT".into(),
        "claimed:postgres:ok".into(),
    );
    let mut a = host.rotator.serve(port_a).await;
    host.rotator.env.remove("LLMTRACE_ROTATOR_PAUSE_AT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("failpoint reached: claimed:postgres:ok") {
        assert!(
            Instant::now() < deadline,
            "A never claimed a fire: {}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.child.start_kill().unwrap();
    a.wait(Duration::from_secs(10)).await;
    let claims = journal_rows(&host, "SELECT target, scheduled_at FROM rotator_fires").await;
    assert_eq!(claims.len(), 1, "A's claim: {claims:?}");
    let (_, fire) = claims[0];

    let mut b = host.rotator.serve_with(&config_b, port_b).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let run = loop {
        let runs = journal_rows(
            &host,
            "SELECT id, started_at FROM rotator_runs WHERE trigger_kind = 'schedule' \
             AND outcome = 'succeeded'",
        )
        .await;
        if let Some(run) = runs.first() {
            break run.clone();
        }
        assert!(
            Instant::now() < deadline,
            "B took the fire over: {}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        run.1 < fire + 20_000,
        "the run is A's fire taken over, not B's own next fire ({} ms after A's)",
        run.1 - fire
    );
    assert!(b.log().contains("is taken over"), "{}", b.log());
    let settled = journal_rows(
        &host,
        &format!("SELECT replica, settled::bigint FROM rotator_fires WHERE scheduled_at = {fire}"),
    )
    .await;
    assert_eq!(settled[0].1, 1, "decided by B: {settled:?}");
    host.assert_stores_log_in().await;

    b.signal("TERM");
    assert_eq!(b.wait(Duration::from_secs(30)).await, 0, "{}", b.log());
    let secrets = [host.pg.admin_password()];
    assert_no_secret(&format!("{}{}", a.log(), b.log()), &secrets, "replica logs");
}

//! The fault matrix: the journal failing at every step boundary (SQLite and PostgreSQL
//! journals), a rollback that cannot finish, an old run's undo meeting a newer credential, the
//! lock session killed mid-run, a backend statement that hangs, SIGTERM in the middle of it.
//! After each, the credential every store holds logs in.
#![cfg(feature = "failpoints")]

use std::time::{Duration, Instant};

use sqlx::Connection;
use support::config::quoted;
use support::kube_fake::{Fault, Rollout};
use support::rotator::{
    assert_no_secret, file_config_with, free_port, kubernetes_builder, kubernetes_config,
    postgres_journal, ComposeHost, LlmtraceCluster, Output,
};

const JOURNAL_DOWN_AT: &str = "LLMTRACE_ROTATOR_JOURNAL_DOWN_AT";

fn only_report(out: &Output) -> serde_json::Value {
    let reports = out.json();
    let reports = reports.as_array().expect("recover prints a list");
    assert_eq!(reports.len(), 1, "one run recovered: {reports:#?}");
    reports[0].clone()
}

/// One row of the matrix, printed for the record.
struct Row {
    fault: String,
    boundary: String,
    exit: i32,
    outcome: String,
    logs_in: bool,
    elapsed: Duration,
}

fn print_rows(rows: &[Row]) {
    eprintln!("| fault | boundary | exit | after recovery | stored credential logs in | time |");
    for r in rows {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} ms |",
            r.fault,
            r.boundary,
            r.exit,
            r.outcome,
            if r.logs_in { "yes" } else { "NO" },
            r.elapsed.as_millis()
        );
    }
}

/// Whether a fault at `boundary` comes after the run is done in all but bookkeeping: the
/// consumers run on the new credential and verify has begun. From there a stop no longer
/// rolls back (README "Done is done"); before it, it does.
fn done_is_done(all: &[String], boundary: &str) -> bool {
    let index = all.iter().position(|b| b == boundary).unwrap();
    let verify = all
        .iter()
        .position(|b| b.starts_with("verify:") && b.ends_with(":started"))
        .unwrap();
    index >= verify
}

/// The journal goes down at `boundary` and stays down for the rest of the process: the run
/// acts on nothing it has not durably recorded; before verify it stops and undoes what it did,
/// from verify on it ends as it is. Either way the run stays open in the journal until
/// `recover` (journal back) confirms the ending: rolled back, or rolled forward.
async fn journal_down_at(host: &ComposeHost, all: &[String], boundary: &str, fault: &str) -> Row {
    let index = all.iter().position(|b| b == boundary).unwrap();
    let position = |name: &str| all.iter().position(|b| b == name).unwrap();
    let forward = done_is_done(all, boundary);
    let env_before = host.env_text();
    let verifier_before = host.pg.rolpassword("llmtrace").await;
    let restarts_before = host.restarts();

    let clock = Instant::now();
    let out = host
        .rotator
        .run_with(
            &["rotate", "--output", "json"],
            &[(JOURNAL_DOWN_AT, boundary)],
        )
        .await;
    let elapsed = clock.elapsed();
    let expected = if forward { "succeeded" } else { "rolled_back" };
    // A journal already down at preflight refuses the run; recovery then closes it.
    let now_expected = if boundary.starts_with("preflight:") {
        "refused"
    } else {
        expected
    };
    assert_eq!(
        out.json()["outcome"],
        now_expected,
        "{boundary}: {}",
        out.all()
    );
    assert_eq!(out.code, i32::from(!forward), "{boundary}");
    assert_eq!(
        host.env_text() == env_before,
        !forward,
        "{boundary}: stores restored exactly when rolled back"
    );
    host.assert_stores_log_in().await;
    // Write-ahead: an action whose `started` record could not be written never ran.
    if index <= position("apply:postgres:started") {
        assert_eq!(
            host.pg.rolpassword("llmtrace").await,
            verifier_before,
            "{boundary}: no ALTER ROLE without a durable record"
        );
    }
    if index <= position("restart:proxy:started") {
        assert_eq!(
            host.restarts(),
            restarts_before,
            "{boundary}: no restart without a durable record"
        );
    }
    let env_after = host.env_text();

    let recovered = host.rotator.run(&["recover", "--output", "json"]).await;
    assert_eq!(recovered.code, 0, "{boundary}: {}", recovered.all());
    let outcome = only_report(&recovered)["outcome"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(outcome, expected, "{boundary}: {}", recovered.stdout);
    assert_eq!(
        host.env_text(),
        env_after,
        "{boundary}: recovery confirms, changes nothing"
    );
    host.assert_stores_log_in().await;
    let (now, _) = host.stored_passwords();
    let secrets = [now.as_str(), host.pg.admin_password()];
    assert_no_secret(
        &format!("{}{}", out.all(), recovered.all()),
        &secrets,
        boundary,
    );
    Row {
        fault: fault.into(),
        boundary: boundary.into(),
        exit: out.code,
        outcome,
        logs_in: true,
        elapsed,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn journal_down_at_every_boundary_sqlite() {
    let host = ComposeHost::start().await;
    let (_, all) = host.rotator.rotate_listing_boundaries().await;
    let mut rows = Vec::new();
    for boundary in &all {
        rows.push(journal_down_at(&host, &all, boundary, "SQLite journal down").await);
    }
    print_rows(&rows);
    let nothing = host.rotator.run(&["recover"]).await;
    assert!(
        nothing.stdout.contains("nothing to recover"),
        "{}",
        nothing.all()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn journal_down_before_each_side_effect_postgres_journal() {
    let mut host = ComposeHost::start().await;
    host.use_postgres_journal().await;

    let (_, all) = host.rotator.rotate_listing_boundaries().await;
    let mut rows = Vec::new();
    for boundary in all.iter().filter(|b| {
        b.ends_with(":started")
            && ["apply:", "publish:", "restart:", "retire:"]
                .iter()
                .any(|s| b.starts_with(s))
            || b.as_str() == "verify:postgres:ok"
    }) {
        rows.push(journal_down_at(&host, &all, boundary, "PostgreSQL journal down").await);
    }
    assert!(rows.len() >= 5);
    print_rows(&rows);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unfinished_run_blocks_new_runs_until_recovered() {
    let host = ComposeHost::start().await;
    let left = host
        .rotator
        .run_with(
            &["rotate", "--output", "json"],
            &[(JOURNAL_DOWN_AT, "restart:proxy:started")],
        )
        .await;
    assert_eq!(left.code, 1, "{}", left.all());
    let unfinished = left.json()["run_id"].as_str().unwrap().to_string();
    let history = host.rotator.run(&["history", "--output", "json"]).await;
    assert!(
        history.json()[0]["outcome"].is_null(),
        "still open in the journal"
    );

    // `rotate` recovers it first, then rotates.
    let out = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(out.json()["recovered"][0]["run_id"], unfinished.as_str());
    assert_eq!(out.json()["recovered"][0]["outcome"], "rolled_back");
    assert_eq!(out.json()["outcome"], "succeeded");
    host.assert_stores_log_in().await;
    assert_ne!(host.stored_passwords().0, host.old_password);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_refuses_409_then_recovers_periodically() {
    let host = ComposeHost::start().await;
    let port = free_port();
    let log = host.restart_log.display().to_string();
    host.rotator.write_config(&file_config_with(
        &host.pg.address(),
        &["sh".into(), "-c".into(), format!("echo restarted >> {log}")],
        &format!(
            "listen = \"127.0.0.1:{port}\"\napi_tokens = \"env:ROTATOR_API_TOKENS\"\n\
             check_interval = \"0s\"\nrecover_interval = \"5s\""
        ),
        "",
    ));
    let server = host.rotator.serve(port).await;
    let started = Instant::now();
    let left = host
        .rotator
        .run_with(
            &["rotate", "--output", "json"],
            &[(JOURNAL_DOWN_AT, "publish:postgres/store[1]:started")],
        )
        .await;
    assert_eq!(left.code, 1, "{}", left.all());
    let unfinished = left.json()["run_id"].as_str().unwrap().to_string();

    let (status, body) = server.post("/v1/rotations", "{}").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "before the first periodic recovery"
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(&unfinished),
        "names the unfinished run: {body}"
    );

    // The periodic recovery finishes it; then a rotation goes through.
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let (status, body) = server.post("/v1/rotations", "{}").await;
        if status == 202 {
            break body["id"].as_str().unwrap().to_string();
        }
        assert_eq!(status, 409, "{body}");
        assert!(
            Instant::now() < deadline,
            "recovered within 20 s: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(server.wait_for_run(&id).await["outcome"], "succeeded");
    let (_, old) = server.get(&format!("/v1/rotations/{unfinished}")).await;
    assert_eq!(old["outcome"], "rolled_back", "{old:#}");
    host.assert_stores_log_in().await;
    let (now, _) = host.stored_passwords();
    assert_no_secret(
        &format!("{}{}", server.log(), left.all()),
        &[
            now.as_str(),
            host.old_password.as_str(),
            host.pg.admin_password(),
        ],
        "serve log",
    );
}

/// The consumer takes the database down (once) and fails: `undo-apply` cannot reach it, the
/// run ends `rollback_failed` and keeps its sealed state; recovery retries until the database
/// is back, then finishes the rollback.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_rollback_keeps_its_state_and_recovery_finishes_it() {
    let host = ComposeHost::start().await;
    let marker = host.rotator.path("stopped-once");
    let script = format!(
        "if [ ! -e {m} ]; then touch {m}; {stop} >/dev/null 2>&1; fi; exit 1",
        m = marker.display(),
        stop = host.pg.stop_command()
    );
    host.rotator.write_config(&file_config_with(
        &host.pg.address(),
        &["sh".into(), "-c".into(), script],
        "",
        "",
    ));
    let env_before = host.env_text();
    let out = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 3, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rollback_failed");
    let run = out.json()["run_id"].as_str().unwrap().to_string();

    // Still down: recovery tries, fails again, keeps the state; a new run is refused.
    let retry = host.rotator.run(&["recover", "--output", "json"]).await;
    assert_eq!(retry.code, 3, "{}", retry.all());
    assert_eq!(only_report(&retry)["outcome"], "rollback_failed");
    let refused = host.rotator.run(&["rotate"]).await;
    assert_eq!(refused.code, 3, "{}", refused.all());
    assert!(
        refused.stderr.contains(&run),
        "names the run: {}",
        refused.stderr
    );

    host.pg.start_again().await;
    let done = host.rotator.run(&["recover", "--output", "json"]).await;
    assert_eq!(done.code, 0, "{}", done.all());
    let report = only_report(&done);
    assert_eq!(report["run_id"], run.as_str());
    assert_eq!(report["outcome"], "rolled_back", "{report:#}");
    assert_eq!(host.env_text(), env_before);
    host.assert_stores_log_in().await;
    let nothing = host.rotator.run(&["recover"]).await;
    assert!(
        nothing.stdout.contains("nothing to recover"),
        "{}",
        nothing.all()
    );
    assert_no_secret(
        &format!("{}{}{}", out.all(), retry.all(), done.all()),
        &[host.old_password.as_str(), host.pg.admin_password()],
        "reports",
    );
}

/// An interrupted run's recovery finds that someone rotated since (a new password on the
/// backend and in the stores): it must leave that credential alone.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_runs_undo_never_overwrites_a_newer_credential() {
    let host = ComposeHost::start().await;
    host.rotator
        .crash_at("publish:postgres/store[0]:started")
        .await;
    let newer = support::rotator::random_password();
    host.pg.create_login("llmtrace", &newer, "llmtrace").await;
    let text = host.env_text().replace(&host.old_password, &newer);
    std::fs::write(&host.env_file, &text).unwrap();

    let out = host.rotator.run(&["recover", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report = only_report(&out);
    assert_eq!(report["outcome"], "rolled_back", "{report:#}");
    assert_eq!(
        host.env_text(),
        text,
        "the newer credential stays in the stores"
    );
    host.pg
        .try_login("llmtrace", &newer, "llmtrace")
        .await
        .expect("the newer credential still logs in");
    host.assert_stores_log_in().await;
    assert_no_secret(
        &out.all(),
        &[newer.as_str(), host.pg.admin_password()],
        "report",
    );
}

/// An open transaction that altered the same role blocks `ALTER ROLE`: the statement gives up
/// within the lock timeout, SIGTERM is answered, and the run rolls back.
#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_statement_is_bounded_and_sigterm_rolls_back() {
    let host = ComposeHost::start().await;
    let env_before = host.env_text();
    let mut blocker = sqlx::PgConnection::connect_with(&host.pg.connect_options(
        "postgres",
        host.pg.admin_password(),
        "postgres",
    ))
    .await
    .unwrap();
    sqlx::raw_sql("BEGIN; ALTER ROLE llmtrace VALID UNTIL 'infinity';")
        .execute(&mut blocker)
        .await
        .unwrap();

    let child = host
        .rotator
        .spawn_with(&["rotate", "--output", "json"], &[]);
    let pid = child.id().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let signalled = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-s", "TERM", &pid])
        .status()
        .unwrap()
        .success());
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("rotate ends despite the blocked statement")
        .unwrap();
    let after_signal = signalled.elapsed();
    let out = Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!(
        "SIGTERM to exit with a blocked ALTER ROLE: {} ms",
        after_signal.as_millis()
    );
    assert!(after_signal < Duration::from_secs(10), "{after_signal:?}");
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back");
    assert_eq!(host.env_text(), env_before);
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut blocker)
        .await
        .unwrap();
    host.assert_stores_log_in().await;
    assert_no_secret(
        &out.all(),
        &[host.old_password.as_str(), host.pg.admin_password()],
        "report",
    );
}

/// The PostgreSQL session holding the advisory lock is terminated mid-run (a network blip or a
/// journal failover does the same): the run notices, stops acting, and a second `rotate` takes
/// it over. The consumer never runs twice at once, and the final credential logs in.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_lock_session_stops_the_run_and_the_next_one_takes_over() {
    let mut host = ComposeHost::start().await;
    host.use_postgres_journal().await;
    let spans = host.rotator.path("spans.log");
    let script = format!(
        "echo start $(date +%s%N) >> {s}; sleep 3; echo end $(date +%s%N) >> {s}",
        s = spans.display()
    );
    let config = postgres_journal(&file_config_with(
        &host.pg.address(),
        &["sh".into(), "-c".into(), script],
        "",
        "",
    ));
    host.rotator.write_config(&config);

    let first = host
        .rotator
        .spawn_with(&["rotate", "--output", "json"], &[]);
    while !std::fs::read_to_string(&spans).is_ok_and(|t| t.contains("start")) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.pg
        .exec(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND pid <> pg_backend_pid()",
        )
        .await;
    let second = host
        .rotator
        .spawn_with(&["rotate", "--output", "json"], &[]);
    let first = first.wait_with_output().await.unwrap();
    let first_exited = wall_ns();
    let second = second.wait_with_output().await.unwrap();
    let first_out = String::from_utf8_lossy(&first.stdout).into_owned();
    let second_out = String::from_utf8_lossy(&second.stdout).into_owned();
    assert_eq!(
        first.status.code(),
        Some(4),
        "{first_out}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first_report: serde_json::Value = serde_json::from_str(&first_out).unwrap();
    assert_eq!(first_report["outcome"], "interrupted");
    assert_eq!(
        second.status.code(),
        Some(0),
        "{second_out}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let second_report: serde_json::Value = serde_json::from_str(&second_out).unwrap();
    assert_eq!(
        second_report["recovered"][0]["run_id"], first_report["run_id"],
        "the second process took the first run over"
    );

    // Every consumer start after the first one comes after the first process stopped acting.
    let text = std::fs::read_to_string(&spans).unwrap();
    let starts: Vec<u128> = text
        .lines()
        .filter_map(|l| l.strip_prefix("start "))
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(starts.len() >= 2, "{text}");
    for later in &starts[1..] {
        assert!(
            *later > first_exited,
            "a consumer started while the first process could still act: {text}"
        );
    }
    host.assert_stores_log_in().await;
    let (now, _) = host.stored_passwords();
    assert_no_secret(
        &format!("{first_out}{second_out}"),
        &[
            now.as_str(),
            host.old_password.as_str(),
            host.pg.admin_password(),
        ],
        "reports",
    );
}

fn wall_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// SIGTERM (a CronJob deadline, a node drain) at every step boundary: before verify the run
/// rolls back, from verify on it ends succeeded; either way it records it before exiting.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_at_every_boundary_rolls_back_or_finishes() {
    let host = ComposeHost::start().await;
    let (_, all) = host.rotator.rotate_listing_boundaries().await;
    let mut rows = Vec::new();
    for boundary in &all {
        let env_before = host.env_text();
        let clock = Instant::now();
        let out = host
            .rotator
            .run_with(
                &["rotate", "--output", "json"],
                &[("LLMTRACE_ROTATOR_SIGTERM_AT", boundary)],
            )
            .await;
        let elapsed = clock.elapsed();
        let forward = done_is_done(&all, boundary);
        let expected = if forward { "succeeded" } else { "rolled_back" };
        assert_eq!(out.code, i32::from(!forward), "{boundary}: {}", out.all());
        assert_eq!(out.json()["outcome"], expected, "{boundary}");
        assert_eq!(host.env_text() == env_before, !forward, "{boundary}");
        host.assert_stores_log_in().await;
        let history = host
            .rotator
            .run(&["history", "--limit", "1", "--output", "json"])
            .await;
        assert_eq!(
            history.json()[0]["outcome"],
            expected,
            "{boundary}: recorded"
        );
        let (now, _) = host.stored_passwords();
        assert_no_secret(
            &out.all(),
            &[now.as_str(), host.pg.admin_password()],
            boundary,
        );
        rows.push(Row {
            fault: "SIGTERM".into(),
            boundary: boundary.clone(),
            exit: out.code,
            outcome: format!("{expected} (no recovery needed)"),
            logs_in: true,
            elapsed,
        });
    }
    print_rows(&rows);
    let nothing = host.rotator.run(&["recover"]).await;
    assert!(
        nothing.stdout.contains("nothing to recover"),
        "{}",
        nothing.all()
    );
}

fn with_kubernetes_timeout(cluster: &LlmtraceCluster, timeout: &str) {
    let config = kubernetes_builder(&cluster.pg.address(), "20s")
        .rotator("kubernetes_timeout", quoted(timeout))
        .build();
    cluster.rotator.write_config(&config);
}

/// The API server stalls on the Secret write and applies it after the client gave up: the
/// rollback fences the Secret (its resourceVersion moves), so the late write is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_secret_write_applied_late_cannot_undo_the_rollback() {
    let cluster = LlmtraceCluster::start(Rollout::ReadyAfter(Duration::from_millis(100))).await;
    with_kubernetes_timeout(&cluster, "1s");
    let stall = Duration::from_secs(4);
    cluster.kube.stall(
        Fault::new(0)
            .method("PUT")
            .resource("secrets")
            .name("llmtrace"),
        stall,
    );
    let clock = Instant::now();
    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;
    eprintln!(
        "stalled Secret write: rolled back in {} ms",
        clock.elapsed().as_millis()
    );
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back");
    assert!(
        clock.elapsed() < stall,
        "the run did not wait for the API server"
    );
    tokio::time::sleep(stall).await;
    let late = cluster
        .kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.name == "llmtrace")
        .map(|r| r.status)
        .collect::<Vec<_>>();
    assert!(late.contains(&409), "the late write was refused: {late:?}");
    assert_eq!(cluster.url_password(), cluster.old_password);
    cluster
        .pg
        .try_login("llmtrace", &cluster.url_password(), "llmtrace")
        .await
        .expect("the stored credential logs in");
}

/// The API server stalls on the rollout patch: the restart fails within the consumer's
/// timeout and the run rolls back, instead of hanging.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_rollout_patch_fails_within_the_consumer_timeout() {
    let cluster = LlmtraceCluster::start(Rollout::ReadyAfter(Duration::from_millis(100))).await;
    cluster
        .rotator
        .write_config(&kubernetes_config(&cluster.pg.address(), "2s", ""));
    cluster.kube.stall(
        Fault::new(0).method("PATCH").resource("deployments"),
        Duration::from_secs(15),
    );
    let clock = Instant::now();
    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;
    eprintln!(
        "stalled rollout patch: rolled back in {} ms",
        clock.elapsed().as_millis()
    );
    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back");
    assert!(
        clock.elapsed() < Duration::from_secs(12),
        "{:?}",
        clock.elapsed()
    );
    assert_eq!(cluster.url_password(), cluster.old_password);
    cluster
        .pg
        .try_login("llmtrace", &cluster.url_password(), "llmtrace")
        .await
        .expect("the stored credential logs in");
}

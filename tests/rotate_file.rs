//! `rotate` with the credential in a dotenv file and a restart command (the docker compose
//! shape), against a real PostgreSQL.

use std::os::unix::fs::PermissionsExt;

use support::rotator::{
    assert_no_secret, failed_steps, step, steps, ComposeHost, ENV_FILE_HEAD, ENV_FILE_TAIL,
};

fn assert_clean(host: &ComposeHost, output: &str) {
    let (url_password, pgpassword) = host.stored_passwords();
    let secrets = [
        host.old_password.as_str(),
        &url_password,
        &pgpassword,
        host.pg.admin_password(),
    ];
    assert_no_secret(output, &secrets, "rotator output at trace level");
    assert_no_secret(
        &host.pg.log_contents(),
        &secrets[..3],
        "the PostgreSQL server log",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotates_the_env_file_and_runs_the_restart_command_once() {
    let host = ComposeHost::start().await;
    std::fs::set_permissions(&host.env_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = host.env_text();

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("outcome: succeeded"), "{}", out.stdout);
    let (new, pgpassword) = host.stored_passwords();
    assert_eq!(new, pgpassword);
    assert_ne!(new, host.old_password);
    // Every other line, comment and byte is as it was; the mode too.
    assert_eq!(host.env_text(), before.replace(&host.old_password, &new));
    assert!(host.env_text().starts_with(ENV_FILE_HEAD) && host.env_text().ends_with(ENV_FILE_TAIL));
    assert_eq!(
        std::fs::metadata(&host.env_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(host.restarts(), 1);
    host.pg
        .try_login("llmtrace", &new, "llmtrace")
        .await
        .expect("new password logs in");
    assert!(host
        .pg
        .try_login("llmtrace", &host.old_password, "llmtrace")
        .await
        .is_err());
    assert!(host
        .pg
        .rolpassword("llmtrace")
        .await
        .unwrap()
        .starts_with("SCRAM-SHA-256$"));
    assert_clean(&host, &out.all());

    // A second rotation starts from the first one's credential.
    let again = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(again.code, 0, "{}", again.all());
    assert_ne!(host.stored_passwords().0, new);
    host.assert_stores_log_in().await;
    assert_eq!(host.restarts(), 2);
    assert_clean(&host, &again.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_restart_command_rolls_back_the_file_and_password() {
    let host = ComposeHost::start_with_command(Some(vec!["false".into()])).await;
    let before = host.env_text();

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back");
    let steps = steps(&report);
    assert!(steps.contains(&"restart failed".to_string()), "{steps:?}");
    for undo in ["undo-publish ok", "undo-apply ok", "verify-old ok"] {
        assert!(steps.contains(&undo.to_string()), "{undo} in {steps:?}");
    }
    assert_eq!(
        host.env_text(),
        before,
        "the file is byte for byte what it was"
    );
    host.pg
        .try_login("llmtrace", &host.old_password, "llmtrace")
        .await
        .expect("old password logs in");
    assert_clean(&host, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_verification_rolls_back_the_file_and_password() {
    // The first "restart" changes the role's password behind the rotator's back.
    let mut host = ComposeHost::start().await;
    let tamper_once = format!(
        "[ -e tampered ] || {{ touch tampered; psql -h 127.0.0.1 -p {} -U postgres -d postgres -qc \"ALTER ROLE llmtrace PASSWORD 'someone-else'\"; }}",
        host.pg.port()
    );
    host.rotator
        .env
        .insert("PGPASSWORD".into(), host.pg.admin_password().into());
    // psql reads the admin password from PGPASSWORD, passed through by name.
    let config = format!(
        "{}env = [\"PGPASSWORD\"]\n",
        support::rotator::file_config(&host.pg.address(), &["sh".into(), "-c".into(), tamper_once])
    );
    host.rotator.write_config(&config);
    let before = host.env_text();

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back");
    let failed = failed_steps(&report);
    assert_eq!(failed.len(), 1, "{report:#}");
    assert_eq!(failed[0]["step"], "verify");
    assert_eq!(host.env_text(), before);
    host.pg
        .try_login("llmtrace", &host.old_password, "llmtrace")
        .await
        .expect("old password logs in");
    assert_clean(&host, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn store_changed_by_someone_else_fails_the_rollback_and_says_where_things_stand() {
    // The restart command rewrites PGPASSWORD itself: the rotator must not overwrite that.
    let host = ComposeHost::start().await;
    let tamper = format!(
        "sed -i 's/^PGPASSWORD=.*/PGPASSWORD=tampered/' {}",
        host.env_file.display()
    );
    host.rotator.write_config(&support::rotator::file_config(
        &host.pg.address(),
        &["sh".into(), "-c".into(), tamper],
    ));

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 3, "{}", out.all());
    assert!(
        out.stdout
            .contains("outcome: rollback_failed: MANUAL ACTION NEEDED"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("the old credential logs in, the new one does not log in"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("#PGPASSWORD holds a value this run did not write"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("#LLMTRACE_POSTGRES_URL holds the old value"),
        "{}",
        out.stdout
    );
    assert!(host.env_text().contains("PGPASSWORD=tampered\n"));
    let (url_password, _) = host.stored_passwords();
    assert_eq!(url_password, host.old_password);
    let secrets = [host.old_password.as_str(), host.pg.admin_password()];
    assert_no_secret(&out.all(), &secrets, "rotator output");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_drift_per_store() {
    let host = ComposeHost::start().await;
    let out = host.rotator.run(&["check"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.starts_with("postgres: ok"), "{}", out.stdout);

    let drifted = host.env_text().replace(
        &format!("PGPASSWORD='{}'", host.old_password),
        "PGPASSWORD='stale'",
    );
    std::fs::write(&host.env_file, drifted).unwrap();
    let out = host.rotator.run(&["check", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["targets"][0]["valid"], false);
    assert_eq!(report["targets"][0]["stores"][0]["valid"], true);
    assert_eq!(report["targets"][0]["stores"][1]["valid"], false);
    assert!(report["targets"][0]["stores"][1]["error"]
        .as_str()
        .unwrap()
        .contains("password authentication failed"));
    assert_no_secret(
        &out.all(),
        &[
            host.old_password.as_str(),
            "stale",
            host.pg.admin_password(),
        ],
        "check output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_credential_in_the_file_is_refused_and_nothing_changes() {
    let host = ComposeHost::start().await;
    let broken = host
        .env_text()
        .replace(&format!(":{}@", host.old_password), ":wrong@");
    std::fs::write(&host.env_file, &broken).unwrap();
    let verifier = host.pg.rolpassword("llmtrace").await;

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert_eq!(host.env_text(), broken);
    assert_eq!(host.pg.rolpassword("llmtrace").await, verifier);
    assert_eq!(host.restarts(), 0);
    assert_no_secret(
        &out.all(),
        &[host.old_password.as_str(), host.pg.admin_password()],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_on_the_file_store_changes_nothing() {
    let host = ComposeHost::start().await;
    let before = host.env_text();
    let verifier = host.pg.rolpassword("llmtrace").await;

    let out = host
        .rotator
        .run(&["rotate", "--dry-run", "--output", "json"])
        .await;

    assert_eq!(out.code, 0, "{}", out.all());
    let report = out.json();
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["preflight"][0]["ok"], true);
    assert_eq!(report["preflight"][0]["subject"], "postgres");
    assert_eq!(host.env_text(), before);
    assert_eq!(host.pg.rolpassword("llmtrace").await, verifier);
    assert_eq!(host.restarts(), 0);
    assert!(!host.rotator.path("journal.db").exists());
    assert_clean(&host, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_the_restart_rolls_back_before_exiting() {
    // The first restart hangs (as a stuck rollout would); the one during rollback is quick.
    let mut host = ComposeHost::start().await;
    let slow_once = format!(
        "echo restarted >> {}; [ -e slow-done ] || {{ touch slow-done; sleep 30; }}",
        host.restart_log.display()
    );
    host.rotator.write_config(&support::rotator::file_config(
        &host.pg.address(),
        &["sh".into(), "-c".into(), slow_once],
    ));
    host.rotator.env.insert("RUST_LOG".into(), "info".into());
    let before = host.env_text();

    let child = host.rotator.spawn(&["rotate", "--output", "json"]);
    while host.restarts() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-s", "TERM", &pid])
        .status()
        .unwrap()
        .success());
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("rotate stopped well before the 30 s restart would have ended")
        .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["outcome"], "rolled_back");
    assert!(
        report.to_string().contains("stopped by a shutdown signal"),
        "{report:#}"
    );
    assert_eq!(host.env_text(), before);
    assert_eq!(
        host.restarts(),
        2,
        "rolled out again with the old credential"
    );
    host.pg
        .try_login("llmtrace", &host.old_password, "llmtrace")
        .await
        .expect("old password logs in");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_command_sees_only_allowed_environment_variables() {
    let mut host = ComposeHost::start().await;
    let dump = host.rotator.path("command-env.txt");
    let command = vec![
        "sh".to_string(),
        "-c".to_string(),
        format!("env > {}", dump.display()),
    ];
    // The consumer is the config's last table: `env` lands in it.
    host.rotator.write_config(&format!(
        "{}env = [\"COMPOSE_PROJECT_NAME\"]\n",
        support::rotator::file_config(&host.pg.address(), &command)
    ));
    for (name, value) in [
        ("COMPOSE_PROJECT_NAME", "llmtrace-proxy"),
        ("UNRELATED_TOKEN", "not-for-the-command"),
        ("HOME", "/home/operator"),
    ] {
        host.rotator.env.insert(name.into(), value.into());
    }

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let seen = std::fs::read_to_string(&dump).unwrap();
    let names: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.split_once('=').map(|(name, _)| name))
        .collect();
    assert!(
        seen.contains("COMPOSE_PROJECT_NAME=llmtrace-proxy\n"),
        "{names:?}"
    );
    assert!(seen.contains("HOME=/home/operator\n"), "{names:?}");
    assert!(names.contains(&"PATH"), "{names:?}");
    for hidden in [
        "ROTATOR_JOURNAL_KEY",
        "PG_ADMIN_PASSWORD",
        "UNRELATED_TOKEN",
        "RUST_LOG",
    ] {
        assert!(
            !names.contains(&hidden),
            "{hidden} reached the command: {names:?}"
        );
    }
    assert_no_secret(
        &seen,
        &[
            host.pg.admin_password(),
            &host.rotator.env["ROTATOR_JOURNAL_KEY"],
        ],
        "the command's environment",
    );
    host.assert_stores_log_in().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sqlite_journal_and_its_lock_directory_are_private() {
    use std::os::unix::fs::MetadataExt;
    let host = ComposeHost::start().await;
    let out = host.rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let mode = |name: &str| {
        std::fs::metadata(host.rotator.path(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .mode()
            & 0o777
    };
    assert_eq!(mode("journal.db"), 0o600, "journal file");
    assert_eq!(mode("journal.db.locks"), 0o700, "lock directory");
    assert_eq!(mode("journal.db.locks/postgres.lock"), 0o600, "lock file");
    for companion in ["journal.db-wal", "journal.db-shm"] {
        if host.rotator.path(companion).exists() {
            assert_eq!(mode(companion), 0o600, "{companion}");
        }
    }
}

/// Moves the host's `.env` into another directory and leaves a symlink to it in its place.
fn link_env_file_elsewhere(host: &ComposeHost) -> (tempfile::TempDir, std::path::PathBuf) {
    let elsewhere = tempfile::tempdir().unwrap();
    let real = elsewhere.path().join("proxy.env");
    std::fs::copy(&host.env_file, &real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::remove_file(&host.env_file).unwrap();
    std::os::unix::fs::symlink(&real, &host.env_file).unwrap();
    (elsewhere, real)
}

fn assert_still_a_link(host: &ComposeHost, real: &std::path::Path) {
    let meta = std::fs::symlink_metadata(&host.env_file).unwrap();
    assert!(meta.file_type().is_symlink(), ".env is still a symlink");
    assert_eq!(std::fs::read_link(&host.env_file).unwrap(), real);
    let real_meta = std::fs::symlink_metadata(real).unwrap();
    assert!(real_meta.file_type().is_file());
    assert_eq!(real_meta.permissions().mode() & 0o777, 0o640);
    let dir = real.parent().unwrap();
    assert_eq!(
        std::fs::read_dir(dir).unwrap().count(),
        1,
        "no temp file left beside it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlinked_env_file_is_replaced_where_it_points_and_stays_a_link() {
    let host = ComposeHost::start().await;
    let (_elsewhere, real) = link_env_file_elsewhere(&host);
    let before = host.env_text();

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert_still_a_link(&host, &real);
    let (new, _) = host.stored_passwords();
    assert_ne!(new, host.old_password);
    assert_eq!(
        std::fs::read_to_string(&real).unwrap(),
        before.replace(&host.old_password, &new)
    );
    host.assert_stores_log_in().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlinked_env_file_is_rolled_back_where_it_points() {
    let host = ComposeHost::start_with_command(Some(vec!["false".into()])).await;
    let (_elsewhere, real) = link_env_file_elsewhere(&host);
    let before = host.env_text();

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back");
    assert_still_a_link(&host, &real);
    assert_eq!(std::fs::read_to_string(&real).unwrap(), before);
    host.assert_stores_log_in().await;
}

/// PostgreSQL SASLpreps a password before PBKDF2 (`pg_be_scram_build_secret` in
/// src/common/scram-common.c, `pg_saslprep` in src/common/saslprep.c), and libpq and sqlx
/// SASLprep what they send. A rollback re-hashes the original password on the client: with
/// raw bytes, an original that SASLprep changes (a no-break space, a soft hyphen) would get a
/// verifier nobody can log in with. The rotator's own logins (sqlx, which hashes raw bytes)
/// must send the SASLprepped form too, or preflight refuses such a password.
#[tokio::test(flavor = "multi_thread")]
async fn an_original_password_that_saslprep_changes_logs_in_after_a_rollback() {
    const ORIGINAL: &str = "p\u{e9}\u{a0}ncil\u{ad}";
    let host = ComposeHost::start_with_command(Some(vec!["false".into()])).await;
    // The server hashes it (SASLprep included), as `ALTER ROLE ... PASSWORD` does.
    host.pg.create_login("llmtrace", ORIGINAL, "llmtrace").await;
    let encoded =
        percent_encoding::utf8_percent_encode(ORIGINAL, percent_encoding::NON_ALPHANUMERIC);
    std::fs::write(
        &host.env_file,
        format!(
            "LLMTRACE_POSTGRES_URL=postgres://llmtrace:{encoded}@{}/llmtrace?sslmode=disable\nPGPASSWORD='{ORIGINAL}'\n",
            host.pg.address()
        ),
    )
    .unwrap();
    let verifier = host.pg.rolpassword("llmtrace").await.unwrap();

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back", "{}", out.stdout);
    assert_ne!(
        host.pg.rolpassword("llmtrace").await.unwrap(),
        verifier,
        "the rollback wrote a verifier of its own"
    );
    // libpq SASLpreps the password (src/interfaces/libpq/fe-auth-scram.c); sqlx does not, so
    // it is psql that proves what every other client sees.
    let psql = std::process::Command::new("psql")
        .args(["-X", "-At", "-c", "SELECT 1"])
        .arg(format!(
            "host=127.0.0.1 port={} user=llmtrace dbname=llmtrace sslmode=disable",
            host.pg.port()
        ))
        .env("PGPASSWORD", ORIGINAL)
        .output()
        .expect("psql runs");
    assert!(
        psql.status.success(),
        "psql logs in with the original: {}",
        String::from_utf8_lossy(&psql.stderr)
    );
    assert_no_secret(&out.all(), &[ORIGINAL], "rotator output");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_parse_and_carry_the_structured_fields_without_a_credential() {
    let host = ComposeHost::start().await;

    // RUST_LOG=trace is the harness default: every library's events are in the stream too.
    let out = host
        .rotator
        .run_with(&["rotate"], &[("ROTATOR_LOG_FORMAT", "json")])
        .await;

    assert_eq!(out.code, 0, "{}", out.all());
    let mut step_lines = 0;
    for line in out.stderr.lines() {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(object.get(field).is_some(), "no {field} in {line}");
        }
        if object["message"] == "step ended" {
            step_lines += 1;
            for field in ["run", "step", "subject", "status", "duration_ms"] {
                assert!(object.get(field).is_some(), "no {field} in {line}");
            }
        }
    }
    assert!(step_lines >= 5, "{}", out.stderr);
    let finished = out
        .stderr
        .lines()
        .find(|l| l.contains("rotation finished"))
        .expect("a finish line");
    let finished: serde_json::Value = serde_json::from_str(finished).unwrap();
    assert_eq!(finished["outcome"], "succeeded");
    assert_clean(&host, &out.all());

    // The flag is global: it may follow the subcommand.
    let text = host.rotator.run(&["rotate", "--log-format", "text"]).await;
    assert_eq!(text.code, 0, "{}", text.all());
    assert!(text
        .stderr
        .lines()
        .any(|l| serde_json::from_str::<serde_json::Value>(l).is_err()));
}

/// A workload's connection, opened with `password` and held until dropped; and its
/// `ip:port` as `pg_stat_activity` shows it.
async fn hold_session(host: &ComposeHost, password: &str) -> (sqlx::PgConnection, String) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(
        &host.pg.connect_options("llmtrace", password, "llmtrace"),
    )
    .await
    .unwrap();
    let (client,): (String,) =
        sqlx::query_as("SELECT host(inet_client_addr()) || ':' || inet_client_port()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    (conn, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_left_on_the_old_password_ends_succeeded_with_its_address_reported() {
    let host = ComposeHost::start().await;
    host.rotator
        .write_config(&support::rotator::file_config_with(
            &host.pg.address(),
            &[
                "sh".into(),
                "-c".into(),
                format!("echo restarted >> {}", host.restart_log.display()),
            ],
            "",
            "confirm_timeout = \"2s\"",
        ));
    // PostgreSQL keeps a session open across a password change: only the session list tells.
    let (held, client) = hold_session(&host, &host.old_password).await;

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "succeeded");
    let confirm = &report["confirm"][0];
    assert_eq!(confirm["target"], "postgres");
    assert_eq!(confirm["drained"], false);
    assert_eq!(confirm["old_sessions"], 1);
    assert_eq!(confirm["old_clients"], serde_json::json!([client]));
    assert!(confirm["waited_ms"].as_u64().unwrap() >= 2000, "{confirm}");
    let step = step(&report, "confirm");
    assert_eq!(step["status"], "warning");
    assert!(step["error"].as_str().unwrap().contains(&client), "{step}");
    assert_clean(&host, &out.all());

    // Once the old session ends, the next run drains at once and the text report says so.
    sqlx::Connection::close(held).await.unwrap();
    let again = host.rotator.run(&["rotate"]).await;
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(
        again
            .stdout
            .contains("confirm: target postgres: drained after"),
        "{}",
        again.stdout
    );
    assert!(
        again.stdout.contains("0 session(s) on the old credential"),
        "{}",
        again.stdout
    );
    assert_clean(&host, &again.all());
}

/// One rotation logs in as the admin once (the session serves check, apply and the session
/// lists), and keeps each login proof: the current credential, the new one, the stored one.
#[tokio::test(flavor = "multi_thread")]
async fn one_rotation_opens_one_admin_session_and_keeps_every_login_proof() {
    let host = ComposeHost::start().await;
    host.pg.log_connections().await;
    let before = host.pg.log_contents().len();

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let log = host.pg.log_contents()[before..].to_string();
    let logins = |user: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("connection authorized: user={user} ")))
            .count()
    };
    assert_eq!(logins("postgres"), 1, "{log}");
    assert_eq!(logins("llmtrace"), 3, "{log}");
}

/// Logins as the rotated user the server has authorized so far, from its own log.
fn llmtrace_logins(host: &ComposeHost) -> usize {
    host.pg
        .log_contents()
        .matches("connection authorized: user=llmtrace ")
        .count()
}

/// Waits until the server log stops growing: each backend writes its own lines.
async fn settled_logins(host: &ComposeHost) -> usize {
    let mut seen = llmtrace_logins(host);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = llmtrace_logins(host);
        if now == seen {
            return now;
        }
        seen = now;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_logs_in_again_unless_configured_to_take_the_backend_login_as_proof() {
    let host = ComposeHost::start().await;
    host.pg.log_connections().await;

    // Default: the current credential (preflight), the new one (verify-backend) and the one
    // both stores hold (verify) each log in.
    let before = settled_logins(&host).await;
    let out = host.rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(settled_logins(&host).await - before, 3, "{}", out.all());
    host.assert_stores_log_in().await;
    let mut outputs = out.all();
    let first_rotation = host.stored_passwords().0;

    // Opted in: verify reads both stores back, finds exactly the credential verify-backend
    // logged in with a moment ago, and takes that login as its proof.
    let command = [
        "sh".to_string(),
        "-c".to_string(),
        format!("echo restarted >> {}", host.restart_log.display()),
    ];
    host.rotator
        .write_config(&support::rotator::file_config_with(
            &host.pg.address(),
            &command,
            "verify_relogin_after = \"5s\"",
            "",
        ));
    let before = settled_logins(&host).await;
    let out = host.rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(settled_logins(&host).await - before, 2, "{}", out.all());
    host.assert_stores_log_in().await;
    assert_eq!(host.restarts(), 2);
    outputs.push_str(&out.all());
    assert_clean(&host, &outputs);
    assert_no_secret(
        &outputs,
        &[&first_rotation],
        "the first rotation's password",
    );
}

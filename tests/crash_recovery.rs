//! The process killed at every step boundary, then `recover`: every store's credential logs
//! in afterwards, and the journal says how the run ended.
#![cfg(feature = "failpoints")]

use std::time::Duration;

use support::kube_fake::Rollout;
use support::rotator::{assert_no_secret, ComposeHost, LlmtraceCluster, Output};

/// Runs before every store is written roll back; from the checkpoint that records the last
/// write on, they roll forward. Stores are written in chunks whose ends are journaled together,
/// so that checkpoint is the first `publish ... ok` after the last `publish ... started`.
fn expected_outcome(all: &[String], boundary: &str) -> &'static str {
    let last_started = all
        .iter()
        .rposition(|b| b.starts_with("publish:") && b.ends_with(":started"))
        .unwrap();
    let last_publish = last_started
        + all[last_started..]
            .iter()
            .position(|b| b.starts_with("publish:") && b.ends_with(":ok"))
            .unwrap();
    let index = all.iter().position(|b| b == boundary).unwrap();
    if index >= last_publish {
        "succeeded"
    } else {
        "rolled_back"
    }
}

fn recovered_outcome(out: &Output) -> String {
    let reports = out.json();
    assert_eq!(
        reports.as_array().unwrap().len(),
        1,
        "one interrupted run recovered: {reports:#}"
    );
    reports[0]["outcome"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_at_every_boundary_then_recovered_file_store() {
    let host = ComposeHost::start().await;
    let (_, all) = host.rotator.rotate_listing_boundaries().await;
    assert!(all.len() >= 20, "{all:?}");

    for boundary in &all {
        let before = host.stored_passwords().0;
        let crashed = host.rotator.crash_at(boundary).await;
        let out = host.rotator.run(&["recover", "--output", "json"]).await;
        assert_eq!(out.code, 0, "{boundary}: {}", out.all());
        let outcome = recovered_outcome(&out);
        assert_eq!(
            outcome,
            expected_outcome(&all, boundary),
            "{boundary}: {}",
            out.stdout
        );
        host.assert_stores_log_in().await;
        let now = host.stored_passwords().0;
        assert_eq!(
            now == before,
            outcome == "rolled_back",
            "{boundary}: stores hold the old credential exactly when rolled back"
        );
        let history = host
            .rotator
            .run(&["history", "--limit", "1", "--output", "json"])
            .await;
        assert_eq!(
            history.json()[0]["outcome"],
            outcome,
            "{boundary}: the journal records the ending"
        );
        let secrets = [before.as_str(), now.as_str(), host.pg.admin_password()];
        assert_no_secret(
            &format!("{crashed}{}{}", out.all(), history.all()),
            &secrets,
            boundary,
        );
    }
    let nothing = host.rotator.run(&["recover"]).await;
    assert_eq!(nothing.code, 0);
    assert!(nothing.stdout.contains("nothing to recover"));
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_at_every_boundary_then_recovered_kubernetes() {
    let cluster = LlmtraceCluster::start(Rollout::ReadyAfter(Duration::from_millis(200))).await;
    let (_, all) = cluster.rotator.rotate_listing_boundaries().await;

    for boundary in &all {
        let before = cluster.url_password();
        let restarts_before = cluster.restarts();
        let crashed = cluster.rotator.crash_at(boundary).await;
        let out = cluster.rotator.run(&["recover", "--output", "json"]).await;
        assert_eq!(out.code, 0, "{boundary}: {}", out.all());
        let outcome = recovered_outcome(&out);
        assert_eq!(
            outcome,
            expected_outcome(&all, boundary),
            "{boundary}: {}",
            out.stdout
        );
        let now = cluster.url_password();
        assert_eq!(
            cluster.chart_password(),
            now,
            "{boundary}: both Secrets agree"
        );
        cluster
            .pg
            .try_login("llmtrace", &now, "llmtrace")
            .await
            .unwrap_or_else(|e| panic!("{boundary}: {e}"));
        assert_eq!(now == before, outcome == "rolled_back", "{boundary}");
        // Pods that may have started with the new password are replaced once more.
        let restarted_during_run = boundary.starts_with("restart:") && boundary.ends_with(":ok")
            || ["verify:", "retire:"]
                .iter()
                .any(|p| boundary.starts_with(p));
        if restarted_during_run {
            assert_eq!(
                cluster.restarts(),
                restarts_before + 1,
                "{boundary}: restarted once, not again"
            );
        }
        let secrets = [before.as_str(), now.as_str(), cluster.pg.admin_password()];
        assert_no_secret(&format!("{crashed}{}", out.all()), &secrets, boundary);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_recovers_an_interrupted_run_before_starting() {
    let host = ComposeHost::start().await;
    host.rotator.crash_at("apply:postgres:ok").await;
    let out = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let report = out.json();
    assert_eq!(report["recovered"][0]["outcome"], "rolled_back");
    assert_eq!(report["outcome"], "succeeded");
    host.assert_stores_log_in().await;
    assert_ne!(host.stored_passwords().0, host.old_password);
}

/// Recovery lists every run that needs it before recovering the first; a run that was live at
/// the listing (its target locked) can go on, publish, and die while recovery is busy with an
/// earlier run. Recovering it from the state listed back then would see nothing published and
/// roll the password back under the stores that hold the new one: recovery reads each run's
/// state only once it holds the run's lock and owns it.
#[tokio::test(flavor = "multi_thread")]
async fn recovery_acts_on_the_state_a_run_left_not_the_one_listed_before() {
    let mut host = ComposeHost::start().await;
    host.use_postgres_journal().await;
    let other_password = support::rotator::random_password();
    host.pg
        .create_login("other", &other_password, "llmtrace")
        .await;
    let other_env = host.rotator.path("other.env");
    std::fs::write(
        &other_env,
        format!(
            "OTHER_URL={}\n",
            host.pg.url("other", &other_password, "llmtrace")
        ),
    )
    .unwrap();
    // `other`'s consumer takes as long as the file `hold` exists: a rollout in progress.
    let hold = host.rotator.path("hold");
    // Longer than B's pause below: B publishes while recovery waits out A's takeover grace.
    let config = std::fs::read_to_string(&host.rotator.config).unwrap();
    assert!(config.contains("takeover_grace = \"3s\""), "{config}");
    let config = config.replace("takeover_grace = \"3s\"", "takeover_grace = \"5s\"");
    host.rotator.write_config(&format!(
        "{config}\n[[target]]\nname = \"other\"\nkind = \"postgres\"\naddress = \"{}\"\n\
         database = \"llmtrace\"\nuser = \"other\"\nsslmode = \"disable\"\n\
         admin = {{ user = \"postgres\", password = \"env:PG_ADMIN_PASSWORD\" }}\n\
         consumers = [\"slow\"]\n  [[target.store]]\n  kind = \"file\"\n  path = \"other.env\"\n  \
         key = \"OTHER_URL\"\n[[consumer]]\nname = \"slow\"\nkind = \"command\"\n\
         command = [\"sh\", \"-c\", \"while [ -e {} ]; do sleep 0.05; done\"]\ntimeout = \"60s\"\n",
        host.pg.address(),
        hold.display()
    ));

    // Run A (target postgres) changed the password and dies below: recovery rolls it back.
    // It is alive while B starts, so B's own start does not recover it first.
    let (mut a, a_output) = host
        .rotator
        .pause_at(
            &["rotate", "--target", "postgres"],
            "apply:postgres:ok",
            None,
        )
        .await;
    // Run B (target other) is live, paused before it publishes, when recovery lists the runs.
    std::fs::write(&hold, "").unwrap();
    let (mut b, b_output) = host
        .rotator
        .pause_at(
            &["rotate", "--target", "other"],
            "apply:other:ok",
            Some(2500),
        )
        .await;
    a.start_kill().unwrap();
    a.wait().await.unwrap();
    let recover = host.rotator.spawn(&["recover", "--output", "json"]);
    // B goes on, publishes, and dies while its consumer rolls out; recovery is still in A's
    // takeover grace.
    let published = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if !std::fs::read_to_string(&other_env)
                .unwrap()
                .contains(&other_password)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(published.is_ok(), "B never published");
    b.start_kill().unwrap();
    b.wait().await.unwrap();
    std::fs::remove_file(&hold).unwrap();

    let out = tokio::time::timeout(Duration::from_secs(90), recover.wait_with_output())
        .await
        .expect("recover finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let reports: serde_json::Value = serde_json::from_str(&stdout).expect("JSON reports");
    let outcome_of = |target: &str| {
        reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["targets"][0] == target)
            .map(|r| r["outcome"].as_str().unwrap().to_string())
    };
    assert_eq!(
        outcome_of("postgres").as_deref(),
        Some("rolled_back"),
        "{reports:#}\n{}",
        stderr
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains(" INFO "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        outcome_of("other").as_deref(),
        Some("succeeded"),
        "B published before it died: rolled forward, {reports:#}"
    );

    host.assert_stores_log_in().await;
    let stored = std::fs::read_to_string(&other_env).unwrap();
    let url = url::Url::parse(stored.trim().trim_start_matches("OTHER_URL=")).unwrap();
    let password = percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned();
    assert!(
        password != other_password,
        "other.env holds B's new credential"
    );
    host.pg
        .try_login("other", &password, "llmtrace")
        .await
        .expect("the credential other.env holds logs in");
    let printed = format!(
        "{stdout}{stderr}{}{}",
        a_output.lock().unwrap(),
        b_output.lock().unwrap()
    );
    assert_no_secret(
        &printed,
        &[
            &password,
            &other_password,
            &host.old_password,
            host.pg.admin_password(),
        ],
        "recover and the two runs",
    );
}

/// A run that died after verifying the new credential everywhere (here in confirm's wait for
/// the old sessions to end) is finished by recovery, not judged again: a login refused for a
/// moment when recovery looks (a connection limit, a failover) must not roll a finished
/// rotation back.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_had_verified_is_finished_not_rolled_back() {
    let host = ComposeHost::start().await;
    let (_, all) = host.rotator.rotate_listing_boundaries().await;
    let confirm = all
        .iter()
        .find(|b| b.starts_with("confirm:") && b.ends_with(":started"))
        .expect("a confirm boundary")
        .clone();
    let before = host.stored_passwords().0;
    host.rotator.crash_at(&confirm).await;
    let new = host.stored_passwords().0;
    assert!(new != before, "the stores hold the new credential");

    host.pg.exec("ALTER ROLE llmtrace CONNECTION LIMIT 0").await;
    let out = host.rotator.run(&["recover", "--output", "json"]).await;
    host.pg
        .exec("ALTER ROLE llmtrace CONNECTION LIMIT -1")
        .await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(recovered_outcome(&out), "succeeded", "{}", out.stdout);
    assert!(
        out.stdout.contains("finish: the run had verified"),
        "{}",
        out.stdout
    );
    assert!(
        host.stored_passwords().0 == new,
        "left on the new credential"
    );
    host.assert_stores_log_in().await;
    assert_no_secret(
        &out.all(),
        &[&before, &new, host.pg.admin_password()],
        "recover",
    );
}

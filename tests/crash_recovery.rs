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

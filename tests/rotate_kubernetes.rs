//! `rotate` against a real PostgreSQL, with the credential in Kubernetes Secrets (the
//! LLMTrace Helm chart's shape) and the proxy Deployment as consumer.

use std::collections::BTreeMap;
use std::time::Duration;

use support::config::quoted;
use support::kube_fake::{Fault, Rollout, WorkloadKind};
use support::rotator::{
    assert_no_secret, failed_steps, kubernetes_builder, kubernetes_config, LlmtraceCluster, NS,
};

fn quick() -> Rollout {
    Rollout::ReadyAfter(Duration::from_millis(300))
}

fn writes(cluster: &LlmtraceCluster) -> Vec<String> {
    cluster
        .kube
        .requests()
        .into_iter()
        .filter(|r| !matches!(r.verb.as_str(), "get" | "list" | "watch"))
        .map(|r| format!("{} {} {}", r.verb, r.resource, r.name))
        .collect()
}

fn secrets(cluster: &LlmtraceCluster) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    (
        cluster.kube.secret(NS, "llmtrace").unwrap(),
        cluster.kube.secret(NS, "llmtrace-postgresql").unwrap(),
    )
}

fn assert_clean(cluster: &LlmtraceCluster, output: &str) {
    assert!(output.contains(" TRACE "), "the rotator ran at trace level");
    let secrets = cluster.secrets_in_play();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(output, &secrets, "rotator output at trace level");
    // The API token authenticates the rotator: it must not be logged either.
    assert_no_secret(
        output,
        &[support::kube_fake::TOKEN],
        "rotator output at trace level",
    );
    // The server log (log_statement = all) must never see a plaintext password.
    let plaintexts = [cluster.old_password.as_str(), &cluster.url_password()];
    assert_no_secret(
        &cluster.pg.log_contents(),
        &plaintexts,
        "the PostgreSQL server log",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotates_the_llmtrace_secrets_and_restarts_the_proxy_once() {
    let cluster = LlmtraceCluster::start(quick()).await;
    let (proxy_before, chart_before) = secrets(&cluster);

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(out.json()["outcome"], "succeeded");
    let new = cluster.url_password();
    assert_ne!(new, cluster.old_password);
    assert_eq!(new.len(), 32);
    let (proxy_after, chart_after) = secrets(&cluster);
    // Only the password inside the URL changed; every other byte and key is as it was.
    let mut expected = proxy_before.clone();
    let url = expected.get_mut("LLMTRACE_POSTGRES_URL").unwrap();
    *url = url.replace(&format!(":{}@", cluster.old_password), &format!(":{new}@"));
    assert_eq!(proxy_after, expected);
    assert_eq!(chart_after["password"], new);
    assert_eq!(
        chart_after["postgres-password"],
        chart_before["postgres-password"]
    );
    assert_eq!(chart_after.len(), chart_before.len());
    assert_eq!(cluster.restarts(), 1);

    cluster
        .pg
        .try_login("llmtrace", &new, "llmtrace")
        .await
        .expect("new password logs in");
    assert!(cluster
        .pg
        .try_login("llmtrace", &cluster.old_password, "llmtrace")
        .await
        .is_err());
    let verifier = cluster.pg.rolpassword("llmtrace").await.unwrap();
    assert!(
        verifier.starts_with("SCRAM-SHA-256$4096:"),
        "stored as a SCRAM verifier"
    );
    assert_clean(&cluster, &out.all());
    assert!(
        !out.all().contains(&verifier[20..]),
        "the verifier is not printed"
    );

    let history = cluster.rotator.run(&["history", "--output", "json"]).await;
    assert_eq!(history.code, 0);
    assert_eq!(history.json()[0]["outcome"], "succeeded");
    assert_clean(&cluster, &history.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn stuck_rollout_rolls_back_secrets_and_password() {
    let cluster = LlmtraceCluster::start(Rollout::Stuck {
        deadline: Duration::from_millis(800),
    })
    .await;
    let before = secrets(&cluster);
    let verifier_before = cluster.pg.rolpassword("llmtrace").await;

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back");
    let failed = failed_steps(&report);
    assert_eq!(failed[0]["step"], "restart");
    assert!(failed[0]["error"]
        .as_str()
        .unwrap()
        .contains("ProgressDeadlineExceeded"));
    assert_eq!(
        secrets(&cluster),
        before,
        "both Secrets hold exactly their old values"
    );
    assert_eq!(
        cluster.restarts(),
        2,
        "rolled out again after the stores were restored"
    );
    cluster
        .pg
        .try_login("llmtrace", &cluster.old_password, "llmtrace")
        .await
        .expect("old password logs in");
    assert_ne!(
        cluster.pg.rolpassword("llmtrace").await,
        verifier_before,
        "restored with a fresh verifier"
    );
    assert_clean(&cluster, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_verification_rolls_back() {
    let cluster = LlmtraceCluster::start(Rollout::ReadyAfter(Duration::from_secs(2))).await;
    let before = secrets(&cluster);
    let rotation = cluster.rotator.run(&["rotate", "--output", "json"]);
    let interfere = async {
        // While the proxy rolls out, someone else changes the role's password.
        while cluster.restarts() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster
            .pg
            .exec("ALTER ROLE llmtrace PASSWORD 'changed-by-someone-else'")
            .await;
    };
    let (out, ()) = tokio::join!(rotation, interfere);

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back");
    let failed = failed_steps(&report);
    assert_eq!(failed.len(), 1, "{report:#}");
    assert_eq!(failed[0]["step"], "verify");
    assert_eq!(secrets(&cluster), before);
    assert_eq!(cluster.restarts(), 2);
    cluster
        .pg
        .try_login("llmtrace", &cluster.old_password, "llmtrace")
        .await
        .expect("old password logs in");
    assert_clean(&cluster, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn conflict_on_a_secret_is_retried() {
    let cluster = LlmtraceCluster::start(quick()).await;
    cluster.kube.inject_fault(
        Fault::new(409)
            .method("PUT")
            .resource("secrets")
            .name("llmtrace")
            .times(2),
    );

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let puts = writes(&cluster)
        .iter()
        .filter(|w| *w == "update secrets llmtrace")
        .count();
    assert_eq!(
        puts,
        3,
        "two conflicts, then success: {:?}",
        writes(&cluster)
    );
    let new = cluster.url_password();
    assert_eq!(cluster.chart_password(), new);
    cluster
        .pg
        .try_login("llmtrace", &new, "llmtrace")
        .await
        .unwrap();
    assert_clean(&cluster, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_stored_credential_is_refused_and_nothing_changes() {
    let cluster = LlmtraceCluster::start(quick()).await;
    let url = cluster
        .url()
        .replace(&cluster.old_password, "not-the-password");
    let mut proxy = cluster.kube.secret(NS, "llmtrace").unwrap();
    proxy.insert("LLMTRACE_POSTGRES_URL".into(), url);
    let pairs: Vec<(&str, &str)> = proxy
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    cluster.kube.put_secret(NS, "llmtrace", &pairs);
    let before = secrets(&cluster);
    let verifier = cluster.pg.rolpassword("llmtrace").await;
    cluster.kube.clear_requests();

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "refused");
    let error = report["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("does not log in"), "{error}");
    assert_eq!(secrets(&cluster), before);
    assert_eq!(cluster.pg.rolpassword("llmtrace").await, verifier);
    assert_eq!(writes(&cluster), Vec::<String>::new());
    assert_eq!(cluster.restarts(), 0);
    assert_clean(&cluster, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_changes_nothing_anywhere() {
    let cluster = LlmtraceCluster::start(quick()).await;
    let before = secrets(&cluster);
    let verifier = cluster.pg.rolpassword("llmtrace").await;

    let out = cluster.rotator.run(&["rotate", "--dry-run"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("dry run: nothing will be changed"));
    assert!(out
        .stdout
        .contains("kubernetes secret llmtrace/llmtrace#LLMTRACE_POSTGRES_URL"));
    assert!(
        out.stdout.contains("preflight postgres: ok"),
        "{}",
        out.stdout
    );
    assert_eq!(secrets(&cluster), before);
    assert_eq!(cluster.pg.rolpassword("llmtrace").await, verifier);
    assert_eq!(writes(&cluster), Vec::<String>::new());
    assert!(
        !cluster.rotator.path("journal.db").exists(),
        "not even the journal is written"
    );
    assert_clean(&cluster, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_deployment_is_refused_before_anything_changes() {
    let cluster = LlmtraceCluster::start(quick()).await;
    cluster.kube.set_paused(NS, "llmtrace", true);
    let before = secrets(&cluster);

    let out = cluster.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stdout.contains("paused"), "{}", out.stdout);
    assert_eq!(secrets(&cluster), before);
    assert_eq!(cluster.restarts(), 0);
    cluster
        .pg
        .try_login("llmtrace", &cluster.old_password, "llmtrace")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn unhealthy_consumer_rolls_back() {
    let cluster = LlmtraceCluster::start(quick()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health = format!("http://{}/health", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        }
    });
    cluster.rotator.write_config(&kubernetes_config(
        &cluster.pg.address(),
        "2s",
        &format!("health = \"{health}\""),
    ));
    let before = secrets(&cluster);

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back");
    assert!(
        report["steps"].to_string().contains("HTTP 503"),
        "{report:#}"
    );
    assert_eq!(secrets(&cluster), before);
    cluster
        .pg
        .try_login("llmtrace", &cluster.old_password, "llmtrace")
        .await
        .unwrap();
    assert_clean(&cluster, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_on_the_same_target_exits_4() {
    let cluster = LlmtraceCluster::start(Rollout::ReadyAfter(Duration::from_secs(3))).await;
    let first = cluster.rotator.run(&["rotate"]);
    let second = async {
        while cluster.restarts() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.rotator.run(&["rotate"]).await
    };
    let (first, second) = tokio::join!(first, second);

    assert_eq!(first.code, 0, "{}", first.all());
    assert_eq!(second.code, 4, "{}", second.all());
    assert!(
        second
            .stderr
            .contains("target postgres is being rotated by another run"),
        "{}",
        second.stderr
    );
    cluster
        .pg
        .try_login("llmtrace", &cluster.url_password(), "llmtrace")
        .await
        .unwrap();
}

/// A StatefulSet with `partition > 0` restarts only the pods at or above the partition, and
/// `kubectl rollout status` still reports the rollout complete (kubernetes
/// pkg/controller/statefulset/stateful_set_control.go updates ordinals >= partition only;
/// staging/src/k8s.io/kubectl/pkg/polymorphichelpers/rollout_status.go StatefulSetStatusViewer
/// reports "partitioned roll out complete"): the pods below would keep the old credential.
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_statefulset_is_refused_naming_the_partition() {
    let cluster = LlmtraceCluster::start(quick()).await;
    cluster
        .kube
        .add_statefulset(NS, "llmtrace-worker", 3, quick());
    cluster.kube.set_partition(NS, "llmtrace-worker", 2);
    let config = kubernetes_builder(&cluster.pg.address(), "20s")
        .target_set("consumers", r#"["proxy", "worker"]"#)
        .table("[[consumer]]")
        .str("name", "worker")
        .str("kind", "statefulset")
        .str("namespace", "llmtrace")
        .str("object", "llmtrace-worker")
        .build();
    cluster.rotator.write_config(&config);
    let before = secrets(&cluster);

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout
            .contains("spec.updateStrategy.rollingUpdate.partition is 2"),
        "{}",
        out.stdout
    );
    assert_eq!(secrets(&cluster), before);
    assert_eq!(cluster.restarts(), 0);
    assert!(cluster
        .kube
        .restarts(WorkloadKind::StatefulSet, NS, "llmtrace-worker")
        .is_empty());
    cluster
        .pg
        .try_login("llmtrace", &cluster.old_password, "llmtrace")
        .await
        .unwrap();

    // With the partition back at 0 the same config rotates and restarts both.
    cluster.kube.set_partition(NS, "llmtrace-worker", 0);
    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        cluster
            .kube
            .restarts(WorkloadKind::StatefulSet, NS, "llmtrace-worker")
            .len(),
        1
    );
}

/// `reason type kind/name` of every Event in the namespace, after checking each names the
/// object by its uid (what `kubectl describe` looks it up by) and the run in its note.
fn events(cluster: &LlmtraceCluster, run: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for event in cluster.kube.events(NS) {
        let regarding = &event["regarding"];
        let (kind, name) = (
            regarding["kind"].as_str().unwrap(),
            regarding["name"].as_str().unwrap(),
        );
        let object = match kind {
            "Deployment" => cluster
                .kube
                .workload(WorkloadKind::Deployment, NS, name)
                .unwrap(),
            _ => cluster.kube.secret_json(NS, name).unwrap(),
        };
        let uid = &object["metadata"]["uid"];
        assert!(uid.is_string(), "{object}");
        assert_eq!(&regarding["uid"], uid, "{event}");
        assert_eq!(event["reportingController"], "llmtrace.dev/rotator");
        let note = event["note"].as_str().unwrap();
        assert!(
            note.contains(run) && note.contains("target postgres"),
            "{note}"
        );
        seen.push(format!(
            "{} {} {kind}/{name}",
            event["reason"].as_str().unwrap(),
            event["type"].as_str().unwrap()
        ));
    }
    seen.sort();
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn each_run_leaves_an_event_on_the_deployment_and_every_secret_it_wrote() {
    let cluster = LlmtraceCluster::start(quick()).await;

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let run = out.json()["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        events(&cluster, &run),
        [
            "RotationSucceeded Normal Deployment/llmtrace",
            "RotationSucceeded Normal Secret/llmtrace",
            "RotationSucceeded Normal Secret/llmtrace-postgresql",
        ]
    );
    let created = cluster
        .kube
        .requests()
        .into_iter()
        .filter(|r| r.resource == "events")
        .map(|r| (r.verb, r.path, r.status))
        .collect::<Vec<_>>();
    assert_eq!(created.len(), 3, "{created:?}");
    for (verb, path, status) in created {
        assert_eq!(
            (verb.as_str(), path.as_str(), status),
            (
                "create",
                "/apis/events.k8s.io/v1/namespaces/llmtrace/events",
                201
            )
        );
    }
    let all_events = serde_json::to_string(&cluster.kube.events(NS)).unwrap();
    let secrets = cluster.secrets_in_play();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(&all_events, &secrets, "the Events");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_run_leaves_warning_events_and_a_refused_event_write_fails_nothing() {
    let cluster = LlmtraceCluster::start(Rollout::Stuck {
        deadline: Duration::from_millis(800),
    })
    .await;
    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    let run = out.json()["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        events(&cluster, &run),
        [
            "RotationRolledBack Warning Deployment/llmtrace",
            "RotationRolledBack Warning Secret/llmtrace",
            "RotationRolledBack Warning Secret/llmtrace-postgresql",
        ]
    );

    // RBAC without events: the run still succeeds, and the log says why no Event was written.
    let cluster = LlmtraceCluster::start(quick()).await;
    cluster
        .kube
        .inject_fault(Fault::new(403).method("POST").resource("events").times(10));
    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(cluster.kube.events(NS).is_empty());
    assert!(
        out.stderr.contains("cannot write a Kubernetes Event"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statefulset_consumer_rolls_out_gets_its_event_and_needs_only_what_rbac_prints() {
    let cluster = LlmtraceCluster::start(quick()).await;
    cluster
        .kube
        .add_statefulset(NS, "llmtrace-worker", 2, quick());
    let config = kubernetes_builder(&cluster.pg.address(), "20s")
        .str("kind", "statefulset")
        .str("object", "llmtrace-worker")
        .build();
    cluster.rotator.write_config(&config);

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        cluster
            .kube
            .restarts(WorkloadKind::StatefulSet, NS, "llmtrace-worker")
            .len(),
        1
    );
    let reasons: Vec<String> = cluster
        .kube
        .events(NS)
        .iter()
        .map(|e| {
            format!(
                "{} {}/{}",
                e["reason"].as_str().unwrap(),
                e["regarding"]["kind"].as_str().unwrap(),
                e["regarding"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        reasons.contains(&"RotationSucceeded StatefulSet/llmtrace-worker".to_string()),
        "{reasons:?}"
    );
    assert!(support::rotator::assert_rbac_allows(&cluster.rotator, &cluster.kube) > 0);
}

/// The proxy's pods as PostgreSQL sees them: one session on the old password until the
/// rollout starts, then (when `reconnect`) one opened with the password the Secret holds.
async fn proxy_pods(cluster: &LlmtraceCluster, reconnect: bool) -> Option<sqlx::PgConnection> {
    use sqlx::Connection;
    let old = sqlx::PgConnection::connect_with(&cluster.pg.connect_options(
        "llmtrace",
        &cluster.old_password,
        "llmtrace",
    ))
    .await
    .unwrap();
    while cluster.restarts() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    old.close().await.unwrap();
    if !reconnect {
        return None;
    }
    let new = cluster.url_password();
    Some(
        sqlx::PgConnection::connect_with(&cluster.pg.connect_options("llmtrace", &new, "llmtrace"))
            .await
            .unwrap(),
    )
}

fn with_confirm_timeout(cluster: &LlmtraceCluster, timeout: &str) {
    let config = kubernetes_builder(&cluster.pg.address(), "20s")
        .target_set("confirm_timeout", quoted(timeout))
        .build();
    cluster.rotator.write_config(&config);
}

#[tokio::test(flavor = "multi_thread")]
async fn confirm_sees_the_restarted_pods_on_the_new_credential() {
    let cluster = LlmtraceCluster::start(quick()).await;
    with_confirm_timeout(&cluster, "20s");

    let (out, _pod) = tokio::join!(
        cluster.rotator.run(&["rotate", "--output", "json"]),
        proxy_pods(&cluster, true)
    );

    assert_eq!(out.code, 0, "{}", out.all());
    let confirm = &out.json()["confirm"][0];
    assert_eq!(confirm["drained"], true, "{confirm}");
    assert_eq!(confirm["new_expected"], true, "{confirm}");
    assert_eq!(confirm["old_sessions"], 0, "{confirm}");
    assert_eq!(confirm["new_sessions"], 1, "{confirm}");
    assert_eq!(confirm["new_clients"].as_array().unwrap().len(), 1);
    assert!(confirm["waited_ms"].as_u64().unwrap() < 20_000);
    assert_clean(&cluster, &out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn confirm_warns_when_the_restarted_pods_never_log_in_with_the_new_credential() {
    let cluster = LlmtraceCluster::start(quick()).await;
    with_confirm_timeout(&cluster, "2s");

    let (out, _) = tokio::join!(
        cluster.rotator.run(&["rotate"]),
        proxy_pods(&cluster, false)
    );

    // The old session is gone, but nothing shows the workload on the new credential.
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout
            .contains("confirm: target postgres: NOT DRAINED after ")
            && out.stdout.contains(
                "0 session(s) on the old credential, 0 on the new one; \
                 the restarted consumers opened no session with the new credential"
            ),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("outcome: succeeded"), "{}", out.stdout);
    assert_clean(&cluster, &out.all());
}

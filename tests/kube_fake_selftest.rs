//! Proves the fake Kubernetes API server behaves like the real one, through a
//! real `kube::Client`.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use support::kube_fake::{Fault, KubeFake, Rollout, WorkloadKind, RESTARTED_AT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "default";

/// Status code and reason of a kube API error.
fn api_error(err: kube::Error) -> (u16, String, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A raw HTTP/1.1 request, for checking exact wire shapes kube does not expose.
async fn raw(
    fake: &KubeFake,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let addr = fake.url().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code: u16 = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn data_string(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8(b.0.clone()).unwrap())
}

fn condition(dep: &Deployment, kind: &str) -> (String, String) {
    let conds = dep
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let c = conds
        .into_iter()
        .find(|c| c.type_ == kind)
        .unwrap_or_else(|| panic!("no {kind} condition"));
    (c.status, c.reason.unwrap_or_default())
}

/// Polls `check` every 20ms until it returns Some, or panics after `timeout`.
async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn restart_patch(at: &str) -> Value {
    json!({ "spec": { "template": { "metadata": { "annotations": { RESTARTED_AT: at } } } } })
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn secret_get_replace_roundtrip() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("password", "old"), ("user", "app")]);
    let api: Api<Secret> = Api::namespaced(fake.client().await, NS);

    let mut secret = api.get("db").await.unwrap();
    assert_eq!(data_string(&secret, "password").as_deref(), Some("old"));
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    let meta = &secret.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    let rv = meta.resource_version.clone().unwrap();
    assert_eq!(
        fake.secret_resource_version(NS, "db").as_deref(),
        Some(rv.as_str())
    );

    secret
        .data
        .as_mut()
        .unwrap()
        .insert("password".into(), ByteString(b"new".to_vec()));
    let replaced = api
        .replace("db", &PostParams::default(), &secret)
        .await
        .unwrap();
    let new_rv = replaced.metadata.resource_version.clone().unwrap();
    assert!(new_rv.parse::<u64>().unwrap() > rv.parse::<u64>().unwrap());
    assert_eq!(
        replaced.metadata.uid, secret.metadata.uid,
        "uid survives updates"
    );

    let stored = fake.secret(NS, "db").unwrap();
    assert_eq!(stored["password"], "new");
    assert_eq!(stored["user"], "app");
    assert_eq!(fake.secret_resource_version(NS, "db"), Some(new_rv.clone()));

    // Writing the same object again is a no-op: no new resourceVersion.
    let again = api
        .replace("db", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, Some(new_rv));
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("password", "one")]);
    let api: Api<Secret> = Api::namespaced(fake.client().await, NS);

    let mut secret = api.get("db").await.unwrap();
    fake.put_secret(NS, "db", &[("password", "concurrent")]); // someone else writes
    secret
        .data
        .as_mut()
        .unwrap()
        .insert("password".into(), ByteString(b"mine".to_vec()));

    let (code, reason, message) = api_error(
        api.replace("db", &PostParams::default(), &secret)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        message,
        "Operation cannot be fulfilled on secrets \"db\": the object has been modified; please apply your changes \
         to the latest version and try again"
    );
    assert_eq!(fake.secret(NS, "db").unwrap()["password"], "concurrent");

    // A stale resourceVersion inside a patch is a precondition too.
    let stale =
        json!({ "metadata": { "resourceVersion": "1" }, "stringData": { "password": "x" } });
    let err = api
        .patch("db", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 409);

    // Without a resourceVersion, PUT is unconditional.
    secret.metadata.resource_version = None;
    api.replace("db", &PostParams::default(), &secret)
        .await
        .unwrap();
    assert_eq!(fake.secret(NS, "db").unwrap()["password"], "mine");
}

#[tokio::test]
async fn not_found_has_the_real_status_shape() {
    let fake = KubeFake::start().await;
    let (code, body) = raw(
        &fake,
        "GET",
        "/api/v1/namespaces/default/secrets/nope",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(
        body,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets \"nope\" not found", "reason": "NotFound",
            "details": { "name": "nope", "kind": "secrets" }, "code": 404,
        })
    );
    let (_, body) = raw(
        &fake,
        "GET",
        "/apis/apps/v1/namespaces/default/deployments/web",
        "application/json",
        "",
    )
    .await;
    assert_eq!(body["message"], "deployments.apps \"web\" not found");
    assert_eq!(
        body["details"],
        json!({ "name": "web", "group": "apps", "kind": "deployments" })
    );

    let api: Api<Secret> = Api::namespaced(fake.client().await, NS);
    assert_eq!(api_error(api.get("nope").await.unwrap_err()).0, 404);
    assert!(api.get_opt("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn merge_patch_touches_only_the_named_keys() {
    let fake = KubeFake::start().await;
    fake.put_secret(
        NS,
        "db",
        &[("password", "old"), ("user", "app"), ("host", "pg")],
    );
    let api: Api<Secret> = Api::namespaced(fake.client().await, NS);

    let patch = json!({ "data": { "password": "bmV3" } }); // base64("new")
    api.patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let stored = fake.secret(NS, "db").unwrap();
    assert_eq!(
        (stored["password"].as_str(), stored["user"].as_str()),
        ("new", "app")
    );

    // null deletes a key (RFC 7386).
    let patch = json!({ "data": { "host": null } });
    api.patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert!(!fake.secret(NS, "db").unwrap().contains_key("host"));

    // stringData is folded into data and never stored.
    let patch = json!({ "stringData": { "password": "plain" } });
    let patched = api
        .patch("db", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    assert_eq!(data_string(&patched, "password").as_deref(), Some("plain"));
    assert!(patched.string_data.is_none());
    assert!(fake
        .secret_json(NS, "db")
        .unwrap()
        .get("stringData")
        .is_none());
    assert_eq!(fake.secret(NS, "db").unwrap()["user"], "app");
}

#[tokio::test]
async fn secret_decoding_and_validation_errors() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("password", "x")]);
    let api: Api<Secret> = Api::namespaced(fake.client().await, NS);

    // Bad base64 fails decoding (400), like the real server.
    let patch = json!({ "data": { "password": "not base64!" } });
    let (code, reason, _) = api_error(
        api.patch("db", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));

    // An invalid key is a validation error (422) with causes.
    let patch = json!({ "stringData": { "bad key": "v" } });
    let (code, body) = raw(
        &fake,
        "PATCH",
        "/api/v1/namespaces/default/secrets/db",
        "application/merge-patch+json",
        &patch.to_string(),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(body["reason"], "Invalid");
    assert_eq!(body["details"]["kind"], "Secret");
    assert_eq!(body["details"]["causes"][0]["field"], "data[bad key]");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .starts_with("Secret \"db\" is invalid: data[bad key]: Invalid value"));

    // Immutable secrets refuse data changes.
    let patch = json!({ "immutable": true });
    api.patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let patch = json!({ "stringData": { "password": "y" } });
    let err = api
        .patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 422);
    assert_eq!(fake.secret(NS, "db").unwrap()["password"], "x");
}

#[tokio::test]
async fn unknown_fields_are_pruned() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("a", "b")]);
    let api: Api<Secret> = Api::namespaced(fake.client().await, NS);
    let patch = json!({ "metadata": { "labelz": { "x": "y" } } });
    api.patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert!(fake.secret_json(NS, "db").unwrap()["metadata"]
        .get("labelz")
        .is_none());
}

#[tokio::test]
async fn json_patch_is_not_served_and_an_unknown_media_type_is_refused() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("a", "b")]);
    let path = "/api/v1/namespaces/default/secrets/db";
    let (code, body) = raw(&fake, "PATCH", path, "application/json-patch+json", "[]").await;
    assert_eq!(code, 405, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("not supported by the fake apiserver"));

    let (code, body) = raw(&fake, "PATCH", path, "application/x-yaml", "{}").await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    // apiserver's words (negotiation/errors.go), with strategic merge for a built-in kind.
    assert_eq!(
        body["message"],
        "the body of the request was in an unknown format - accepted media types include: \
         application/json-patch+json, application/merge-patch+json, \
         application/strategic-merge-patch+json, application/apply-patch+yaml"
    );
    // A custom resource takes no strategic merge patch (apiextensions-apiserver customresource_handler.go).
    fake.add_scoped_sealed_secret(NS, "db", &[], &[]);
    let custom = "/apis/bitnami.com/v1alpha1/namespaces/default/sealedsecrets/db";
    let (code, body) = raw(
        &fake,
        "PATCH",
        custom,
        "application/strategic-merge-patch+json",
        "{}",
    )
    .await;
    assert_eq!(code, 415, "{body}");
    assert_eq!(
        body["message"],
        "the body of the request was in an unknown format - accepted media types include: \
         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
    );
}

// ---------------------------------------------------------------------------
// Deployments
// ---------------------------------------------------------------------------

#[tokio::test]
async fn deployment_restart_rolls_out_then_converges() {
    let fake = KubeFake::start().await;
    let delay = Duration::from_millis(1000);
    fake.add_deployment(NS, "web", 3, Rollout::ReadyAfter(delay));
    let api: Api<Deployment> = Api::namespaced(fake.client().await, NS);

    let dep = api.get("web").await.unwrap();
    assert_eq!(dep.metadata.generation, Some(1));
    let status = dep.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        (
            status.replicas,
            status.updated_replicas,
            status.available_replicas
        ),
        (Some(3), Some(3), Some(3))
    );
    assert_eq!(
        condition(&dep, "Progressing"),
        ("True".into(), "NewReplicaSetAvailable".into())
    );
    assert_eq!(condition(&dep, "Available").0, "True");
    // Defaults are filled in like the real server.
    let spec = dep.spec.clone().unwrap();
    assert_eq!(spec.progress_deadline_seconds, Some(600));
    assert_eq!(
        spec.strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );

    let started = Instant::now();
    let patched = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(restart_patch("2024-01-01T00:00:00Z")),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(
        fake.restarts(WorkloadKind::Deployment, NS, "web"),
        vec!["2024-01-01T00:00:00Z".to_string()]
    );

    // The controller has picked the change up: a rollout is in progress.
    let dep = api.get("web").await.unwrap();
    let status = dep.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(2));
    assert!(
        status.replicas.unwrap() > 3,
        "a surge pod exists during the rollout"
    );
    assert!(status.updated_replicas.unwrap_or(0) < 3);
    assert_eq!(
        condition(&dep, "Progressing"),
        ("True".into(), "ReplicaSetUpdated".into())
    );

    eventually(Duration::from_secs(5), "rollout to complete", || {
        let api = api.clone();
        async move {
            let dep = api.get("web").await.unwrap();
            let s = dep.status.clone().unwrap();
            let done = s.observed_generation == Some(2)
                && s.updated_replicas == Some(3)
                && s.replicas == Some(3)
                && s.available_replicas == Some(3)
                && condition(&dep, "Progressing").1 == "NewReplicaSetAvailable";
            done.then_some(())
        }
    })
    .await;
    assert!(started.elapsed() >= delay);

    // Re-sending the same annotation is a no-op: no generation bump, no new restart.
    let again = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(restart_patch("2024-01-01T00:00:00Z")),
        )
        .await
        .unwrap();
    assert_eq!(again.metadata.generation, Some(2));
    assert_eq!(fake.restarts(WorkloadKind::Deployment, NS, "web").len(), 1);

    // Strategic merge keeps the containers list (merged by name), merge patch would replace it.
    let patch = json!({ "spec": { "template": { "spec": { "containers": [{ "name": "app", "env": [{ "name": "X", "value": "1" }] }] } } } });
    let dep = api
        .patch("web", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    let container = &dep.spec.unwrap().template.spec.unwrap().containers[0];
    assert!(
        container.image.is_some(),
        "image survives a strategic merge of the containers list"
    );
    assert_eq!(container.env.as_ref().unwrap()[0].name, "X");
}

#[tokio::test]
async fn stuck_rollout_exceeds_its_progress_deadline() {
    let fake = KubeFake::start().await;
    fake.add_deployment(
        NS,
        "stuck",
        2,
        Rollout::Stuck {
            deadline: Duration::from_millis(1000),
        },
    );
    let api: Api<Deployment> = Api::namespaced(fake.client().await, NS);
    api.patch(
        "stuck",
        &PatchParams::default(),
        &Patch::Strategic(restart_patch("t1")),
    )
    .await
    .unwrap();

    let dep = api.get("stuck").await.unwrap();
    assert_eq!(
        condition(&dep, "Progressing"),
        ("True".into(), "ReplicaSetUpdated".into())
    );

    let dep = eventually(Duration::from_secs(5), "ProgressDeadlineExceeded", || {
        let api = api.clone();
        async move {
            let dep = api.get("stuck").await.unwrap();
            (condition(&dep, "Progressing") == ("False".into(), "ProgressDeadlineExceeded".into()))
                .then_some(dep)
        }
    })
    .await;
    let status = dep.status.unwrap();
    assert!(
        status.updated_replicas.unwrap_or(0) < 2 || status.replicas.unwrap() > 2,
        "never completes"
    );
    assert_eq!(status.observed_generation, Some(2));

    // Unsticking it (say, the bad pod got fixed) lets it finish.
    fake.set_rollout(
        WorkloadKind::Deployment,
        NS,
        "stuck",
        Rollout::ReadyAfter(Duration::ZERO),
    );
    let dep = api.get("stuck").await.unwrap();
    assert_eq!(condition(&dep, "Progressing").1, "NewReplicaSetAvailable");
}

#[tokio::test]
async fn paused_deployment_does_not_roll_out() {
    let fake = KubeFake::start().await;
    fake.add_deployment(
        NS,
        "web",
        2,
        Rollout::ReadyAfter(Duration::from_millis(1000)),
    );
    fake.set_paused(NS, "web", true);
    let api: Api<Deployment> = Api::namespaced(fake.client().await, NS);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Strategic(restart_patch("t1")),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let dep = api.get("web").await.unwrap();
    let generation = dep.metadata.generation.unwrap();
    let status = dep.status.clone().unwrap();
    assert_eq!(
        status.observed_generation,
        Some(generation),
        "observedGeneration catches up"
    );
    assert_eq!(status.updated_replicas, Some(2));
    assert_eq!(status.replicas, Some(2), "no new pods while paused");
    assert_eq!(
        condition(&dep, "Progressing"),
        ("Unknown".into(), "DeploymentPaused".into())
    );

    fake.set_paused(NS, "web", false);
    let dep = api.get("web").await.unwrap();
    assert_eq!(
        condition(&dep, "Progressing").1,
        "ReplicaSetUpdated",
        "resuming starts the pending rollout"
    );
}

#[tokio::test]
async fn controller_status_writes_bump_resource_version() {
    let fake = KubeFake::start().await;
    fake.add_deployment(
        NS,
        "web",
        1,
        Rollout::ReadyAfter(Duration::from_millis(100)),
    );
    let api: Api<Deployment> = Api::namespaced(fake.client().await, NS);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Strategic(restart_patch("t1")),
    )
    .await
    .unwrap();
    let mut mid = api.get("web").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;

    // The rollout finished in between (a controller write), so this GET-modify-PUT is stale.
    mid.spec.as_mut().unwrap().replicas = Some(2);
    let err = api
        .replace("web", &PostParams::default(), &mid)
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 409);

    // Status sent by a client is ignored (it is a subresource).
    let mut dep = api.get("web").await.unwrap();
    dep.status.as_mut().unwrap().ready_replicas = Some(99);
    let replaced = api
        .replace("web", &PostParams::default(), &dep)
        .await
        .unwrap();
    assert_eq!(replaced.status.unwrap().ready_replicas, Some(1));
}

#[tokio::test]
async fn controller_lag_shows_the_previous_generation_status() {
    let fake = KubeFake::start().await;
    fake.set_controller_lag(Duration::from_millis(1000));
    fake.add_deployment(NS, "web", 2, Rollout::ReadyAfter(Duration::ZERO));
    let api: Api<Deployment> = Api::namespaced(fake.client().await, NS);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Strategic(restart_patch("t1")),
    )
    .await
    .unwrap();

    let dep = api.get("web").await.unwrap();
    assert_eq!(dep.metadata.generation, Some(2));
    assert_eq!(
        dep.status.unwrap().observed_generation,
        Some(1),
        "looks complete, but for the old generation"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dep = api.get("web").await.unwrap();
    assert_eq!(dep.status.unwrap().observed_generation, Some(2));
}

// ---------------------------------------------------------------------------
// StatefulSets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn statefulset_revision_converges() {
    let fake = KubeFake::start().await;
    fake.add_statefulset(
        NS,
        "db",
        3,
        Rollout::ReadyAfter(Duration::from_millis(1000)),
    );
    let api: Api<StatefulSet> = Api::namespaced(fake.client().await, NS);

    let sts = api.get("db").await.unwrap();
    let status = sts.status.unwrap();
    let initial = status.current_revision.clone().unwrap();
    assert!(initial.starts_with("db-"));
    assert_eq!(status.update_revision.as_deref(), Some(initial.as_str()));
    assert_eq!(status.ready_replicas, Some(3));

    let patched = api
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(restart_patch("t1")),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(
        fake.restarts(WorkloadKind::StatefulSet, NS, "db"),
        vec!["t1".to_string()]
    );

    let status = api.get("db").await.unwrap().status.unwrap();
    let update = status.update_revision.clone().unwrap();
    assert_ne!(update, initial);
    assert_eq!(status.current_revision.as_deref(), Some(initial.as_str()));
    assert_eq!(status.ready_replicas, Some(2));

    eventually(Duration::from_secs(5), "statefulset to converge", || {
        let api = api.clone();
        let update = update.clone();
        async move {
            let s = api.get("db").await.unwrap().status.unwrap();
            (s.current_revision.as_deref() == Some(update.as_str())
                && s.ready_replicas == Some(3)
                && s.updated_replicas == Some(3)
                && s.observed_generation == Some(2))
            .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn stuck_statefulset_never_becomes_ready() {
    let fake = KubeFake::start().await;
    fake.add_statefulset(
        NS,
        "db",
        2,
        Rollout::Stuck {
            deadline: Duration::from_millis(10),
        },
    );
    let api: Api<StatefulSet> = Api::namespaced(fake.client().await, NS);
    api.patch(
        "db",
        &PatchParams::default(),
        &Patch::Strategic(restart_patch("t1")),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = api.get("db").await.unwrap().status.unwrap();
    assert_eq!(s.ready_replicas, Some(1));
    assert_ne!(s.current_revision, s.update_revision);
}

// ---------------------------------------------------------------------------
// Faults, request log, kubeconfig
// ---------------------------------------------------------------------------

#[tokio::test]
async fn fault_injection_fails_once_then_succeeds() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("password", "old")]);
    let api: Api<Secret> = Api::namespaced(fake.client().await, NS);
    fake.inject_fault(Fault {
        method: Some("PUT".into()),
        resource: Some("secrets".into()),
        name: Some("db".into()),
        status: 500,
        times: 1,
    });

    let mut secret = api.get("db").await.unwrap(); // GET does not match the fault
    secret
        .data
        .as_mut()
        .unwrap()
        .insert("password".into(), ByteString(b"new".to_vec()));
    let (code, reason, _) = api_error(
        api.replace("db", &PostParams::default(), &secret)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (500, "InternalError"));
    assert_eq!(
        fake.secret(NS, "db").unwrap()["password"],
        "old",
        "faulted request is not applied"
    );
    api.replace("db", &PostParams::default(), &secret)
        .await
        .unwrap();
    assert_eq!(fake.secret(NS, "db").unwrap()["password"], "new");

    // 403 carries the real Forbidden message shape.
    fake.inject_fault(Fault::new(403).method("PATCH"));
    let err = api
        .patch("db", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap_err();
    let (code, reason, message) = api_error(err);
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert!(
        message.contains("cannot patch resource \"secrets\" in API group \"\""),
        "{message}"
    );

    // A fault after the write: the client sees an error although the change landed.
    fake.inject_fault_after(Fault::new(504).method("PATCH"));
    let patch = json!({ "stringData": { "password": "landed" } });
    let err = api
        .patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 504);
    assert_eq!(fake.secret(NS, "db").unwrap()["password"], "landed");
}

#[tokio::test]
async fn request_log_records_verbs_and_names() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("a", "b")]);
    fake.add_deployment(NS, "web", 1, Rollout::ReadyAfter(Duration::ZERO));
    let client = fake.client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client, NS);

    fake.inject_fault(Fault::new(500).method("GET").resource("secrets"));
    secrets.get("db").await.unwrap_err();
    let secret = secrets.get("db").await.unwrap();
    secrets
        .replace("db", &PostParams::default(), &secret)
        .await
        .unwrap();
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(restart_patch("t")),
        )
        .await
        .unwrap();

    let log: Vec<(String, String, String, String, u16)> = fake
        .requests()
        .into_iter()
        .map(|r| (r.method, r.verb, r.resource, r.name, r.status))
        .collect();
    let expected = [
        ("GET", "get", "secrets", "db", 500),
        ("GET", "get", "secrets", "db", 200),
        ("PUT", "update", "secrets", "db", 200),
        ("PATCH", "patch", "deployments", "web", 200),
    ];
    let expected: Vec<(String, String, String, String, u16)> = expected
        .iter()
        .map(|(m, v, r, n, s)| {
            (
                m.to_string(),
                v.to_string(),
                r.to_string(),
                n.to_string(),
                *s,
            )
        })
        .collect();
    assert_eq!(log, expected);
    let patch = &fake.requests()[3];
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    assert_eq!(patch.namespace, NS);
    assert_eq!(
        patch.path,
        "/apis/apps/v1/namespaces/default/deployments/web"
    );
    assert!(patch
        .body
        .as_ref()
        .unwrap()
        .pointer("/spec/template/metadata/annotations")
        .is_some());
}

#[tokio::test]
async fn kubeconfig_points_at_the_fake() {
    let fake = KubeFake::start().await;
    fake.put_secret(NS, "db", &[("a", "b")]);
    let dir = tempfile::tempdir().unwrap();
    let path = fake.write_kubeconfig(dir.path());
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).unwrap();
    let api: Api<Secret> = Api::default_namespaced(client);
    assert!(api.get("db").await.is_ok());
}

/// events.k8s.io/v1 as kubernetes/kubernetes pkg/apis/core/validation/events.go validates it
/// (`ValidateEventCreate`): required fields on create, a name used once.
#[tokio::test]
async fn events_are_validated_on_create() {
    use k8s_openapi::api::events::v1::Event;
    let fake = KubeFake::start().await;
    let api: Api<Event> = Api::namespaced(fake.client().await, "llmtrace");

    let (code, body) = raw(
        &fake,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/llmtrace/events",
        "application/json",
        r#"{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{"name":"x.1"},"type":"Info","regarding":{"kind":"Secret","name":"db"}}"#,
    )
    .await;
    assert_eq!(code, 422, "{body}");
    let fields: Vec<&str> = body["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "eventTime",
            "involvedObject.namespace",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "type"
        ]
    );

    let event: Event = serde_json::from_value(json!({
        "metadata": { "name": "db.17f0" },
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "llmtrace.dev/rotator",
        "reportingInstance": "rotator-0",
        "action": "Rotate",
        "reason": "RotationSucceeded",
        "type": "Normal",
        "note": "run r1",
        "regarding": { "apiVersion": "v1", "kind": "Secret", "namespace": "llmtrace", "name": "db" },
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &event).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let err = api
        .create(&PostParams::default(), &event)
        .await
        .unwrap_err();
    assert_eq!(api_error(err).1, "AlreadyExists");

    assert_eq!(fake.events("llmtrace").len(), 1);
}

/// A fake whose sealed-secrets controller runs without delay, and its public key.
async fn unsealing_fake() -> (KubeFake, rsa::RsaPublicKey) {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = support::sealed::keypair(dir.path());
    let public = key.to_public_key();
    let fake = KubeFake::start().await;
    fake.set_unsealer(support::kube_fake::Unsealer::Running {
        private_key: Box::new(key),
        delay: Duration::ZERO,
    });
    (fake, public)
}

/// The unsealer writes only a Secret the SealedSecret controls, or one annotated to be managed
/// or patched, as sealed-secrets' `unseal` does (pkg/controller/controller.go: `IsControlledBy`,
/// `isAnnotatedToBeManaged`, `isAnnotatedToBePatched`, then the update that replaces data and
/// owner references, or with `patch` merges the data); otherwise `Synced` is False with its
/// message. An absent Secret is made, controlled by the SealedSecret
/// (pkg/apis/sealedsecrets/v1alpha1/sealedsecret_expansion.go: the owner reference `Unseal` sets).
#[tokio::test]
async fn the_unsealer_writes_only_a_secret_it_manages() {
    let (fake, public) = unsealing_fake().await;
    let sealed = |value: &str| support::sealed::seal(&public, NS, "db", value.as_bytes());
    let synced = |fake: &KubeFake| {
        let status = &fake.sealed_secret(NS, "db").unwrap()["status"]["conditions"][0];
        (status["status"].clone(), status["message"].clone())
    };

    // Absent: made, and controlled by the SealedSecret.
    fake.add_scoped_sealed_secret(NS, "db", &[], &[("password", &sealed("one"))]);
    assert_eq!(synced(&fake).0, "True");
    let secret = fake.secret_json(NS, "db").unwrap();
    let owner = &secret["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "SealedSecret");
    assert_eq!(owner["controller"], true);
    assert_eq!(
        owner["uid"],
        fake.sealed_secret(NS, "db").unwrap()["metadata"]["uid"]
    );

    // Made by hand: left alone, and the SealedSecret says why.
    fake.delete_secret(NS, "db");
    fake.put_secret(NS, "db", &[("password", "by hand"), ("other", "kept")]);
    fake.apply_sealed_secret(NS, "db", &[("password", &sealed("two"))]);
    assert_eq!(
        synced(&fake),
        (
            json!("False"),
            json!(
                "failed update: Resource \"db\" already exists and is not managed by SealedSecret"
            )
        )
    );
    assert_eq!(fake.secret(NS, "db").unwrap()["password"], "by hand");

    // Annotated `patch`: the unsealed keys merge into its data; no owner is set.
    fake.annotate_secret(NS, "db", "sealedsecrets.bitnami.com/patch", "true");
    fake.apply_sealed_secret(NS, "db", &[("password", &sealed("three"))]);
    assert_eq!(synced(&fake).0, "True");
    let data = fake.secret(NS, "db").unwrap();
    assert_eq!(
        (data["password"].as_str(), data["other"].as_str()),
        ("three", "kept")
    );
    assert!(fake.secret_json(NS, "db").unwrap()["metadata"]["ownerReferences"].is_null());

    // Annotated `managed`: the data is replaced, and the SealedSecret takes it over.
    fake.annotate_secret(NS, "db", "sealedsecrets.bitnami.com/patch", "false");
    fake.annotate_secret(NS, "db", "sealedsecrets.bitnami.com/managed", "true");
    fake.apply_sealed_secret(NS, "db", &[("password", &sealed("four"))]);
    assert_eq!(synced(&fake).0, "True");
    let data = fake.secret(NS, "db").unwrap();
    assert_eq!(data.get("password").map(String::as_str), Some("four"));
    assert_eq!(data.get("other"), None, "replaced, not merged");
    let secret = fake.secret_json(NS, "db").unwrap();
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "SealedSecret"
    );
}

/// A resource a real API server serves but the fake does not model is refused loudly (405), so
/// `get_opt` cannot read it as absent; a kind that no API server serves here (a CRD that is not
/// installed) is the 404 a real server gives, which `get_opt` reads as absent.
#[tokio::test]
async fn a_resource_the_fake_does_not_model_is_refused_not_absent() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::ConfigMap;
    let fake = KubeFake::start().await;
    let client = fake.client().await;
    let lease = Api::<Lease>::namespaced(client.clone(), NS)
        .get_opt("leader")
        .await;
    let (code, _, message) = api_error(lease.unwrap_err());
    assert_eq!(code, 405, "{message}");
    assert!(message.contains("leases"), "{message}");
    let config_map = Api::<ConfigMap>::namespaced(client, NS).get_opt("x").await;
    assert_eq!(api_error(config_map.unwrap_err()).0, 405);

    let (status, body) = raw(
        &fake,
        "GET",
        "/apis/example.com/v1/namespaces/default/widgets/w",
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["reason"], "NotFound");
    // A version no real server serves any more is the 404 it gives.
    let (status, _) = raw(
        &fake,
        "GET",
        "/apis/apps/v1beta1/namespaces/default/deployments/d",
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, 404);
    // A core resource the fake does not model (a Namespace) is refused, not absent.
    let (status, _) = raw(
        &fake,
        "GET",
        "/api/v1/namespaces/default",
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, 405);
}

/// `spec.template.data` is rendered over `encryptedData`, and a Secret `Unseal` makes takes
/// `immutable` from the template (sealedsecret_expansion.go: `{{ .key }}` reads an unsealed
/// value). The controller's later update of it is refused by the API server, whose error
/// `Synced` reports (controller.go `unseal` returns it); a mutable Secret is not made immutable
/// by a template changed later (the update copies data, labels, annotations, owners and type).
#[tokio::test]
async fn the_unsealer_renders_the_template_and_leaves_an_immutable_secret() {
    let (fake, public) = unsealing_fake().await;
    let sealed = |value: &str| support::sealed::seal(&public, NS, "db", value.as_bytes());
    fake.add_scoped_sealed_secret(NS, "db", &[], &[("password", &sealed("one"))]);
    fake.edit_sealed_secret(NS, "db", |obj| {
        obj["spec"]["template"]["data"] = json!({ "url": "postgres://app:{{ .password }}@db/app" });
        obj["spec"]["template"]["immutable"] = json!(true);
    });
    let data = fake.secret(NS, "db").unwrap();
    assert_eq!(data["url"], "postgres://app:one@db/app");
    assert_eq!(fake.secret_json(NS, "db").unwrap()["immutable"], true);

    fake.apply_sealed_secret(NS, "db", &[("password", &sealed("two"))]);
    let condition = &fake.sealed_secret(NS, "db").unwrap()["status"]["conditions"][0];
    assert_eq!(condition["status"], "False");
    assert_eq!(
        condition["message"],
        "Secret \"db\" is invalid: data: Forbidden: field is immutable when `immutable` is set"
    );
    assert_eq!(fake.secret(NS, "db").unwrap()["password"], "one");

    // Made mutable first, then given an immutable template: the update leaves it mutable.
    fake.add_scoped_sealed_secret(NS, "other", &[], &[]);
    let other = |value: &str| support::sealed::seal(&public, NS, "other", value.as_bytes());
    fake.apply_sealed_secret(NS, "other", &[("password", &other("one"))]);
    assert_eq!(fake.secret(NS, "other").unwrap()["password"], "one");
    fake.edit_sealed_secret(NS, "other", |obj| {
        obj["spec"]["template"]["immutable"] = json!(true);
        obj["spec"]["encryptedData"]["password"] = json!(other("two"));
    });
    assert_eq!(fake.secret(NS, "other").unwrap()["password"], "two");
    assert!(fake.secret_json(NS, "other").unwrap()["immutable"].is_null());
}

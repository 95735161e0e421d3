//! `sync`: the credential lives in a real OpenBao, an ExternalSecret copies it into the Secret the
//! proxy reads. The test plays the ESO controller against the API fake; PostgreSQL is real.

use std::collections::BTreeMap;
use std::time::Duration;
use support::config::ConfigBuilder;

use serde_json::{json, Value};
use support::eso::EsoController;
use support::kube_fake::{EsoRelease, KubeFake, Rollout, WorkloadKind};
use support::openbao::OpenBao;
use support::postgres::Postgres;
use support::rotator::{assert_no_secret, random_password, steps, Rotator, NS};
use tokio_util::sync::CancellationToken;

const REDIS_URL: &str = "redis://:redis-secret-value@llmtrace-redis-master:6379/0";

struct Setup {
    pg: Postgres,
    bao: OpenBao,
    kube: KubeFake,
    rotator: Rotator,
    old_password: String,
}

fn config(pg: &Postgres, bao: &OpenBao, sync_timeout: &str) -> String {
    ConfigBuilder::new()
        .postgres(&pg.address())
        .set(
            "sync",
            r#"[{ namespace = "llmtrace", external_secret = "llmtrace", secret = "llmtrace", key = "LLMTRACE_POSTGRES_URL", format = "url" }]"#,
        )
        .str("sync_timeout", sync_timeout)
        .store("vault")
        .str("address", &bao.address)
        .str("path", "llmtrace/proxy")
        .str("property", "LLMTRACE_POSTGRES_URL")
        .str("format", "url")
        .str("token", "env:VAULT_TOKEN")
        .deployment_consumer("20s")
        .build()
}

async fn setup(sync_timeout: &str) -> Setup {
    setup_with(sync_timeout, EsoRelease::Current, json!({})).await
}

/// `spec` is merged over the ExternalSecret's spec.
async fn setup_with(sync_timeout: &str, release: EsoRelease, spec: Value) -> Setup {
    let pg = Postgres::start().await;
    let old_password = random_password();
    pg.create_login("llmtrace", &old_password, "llmtrace").await;
    let url = pg.url("llmtrace", &old_password, "llmtrace");
    let bao = OpenBao::start().await;
    bao.put_kv(
        "llmtrace/proxy",
        json!({ "LLMTRACE_POSTGRES_URL": url, "LLMTRACE_REDIS_URL": REDIS_URL }),
    )
    .await;
    let kube = KubeFake::start().await;
    kube.serve_eso(release);
    let mut es = json!({
        "refreshInterval": "1h",
        "secretStoreRef": { "kind": "ClusterSecretStore", "name": "openbao" },
        "target": { "name": "llmtrace", "creationPolicy": "Owner" },
        "dataFrom": [{ "extract": { "key": "llmtrace/proxy" } }],
    });
    for (k, v) in spec.as_object().unwrap() {
        es[k] = v.clone();
    }
    kube.add_external_secret(NS, "llmtrace", es);
    // What ESO wrote at its first reconcile.
    EsoController::new(&kube, &bao, NS, "llmtrace").mark_synced(&BTreeMap::from([
        ("LLMTRACE_POSTGRES_URL".to_string(), url.clone()),
        ("LLMTRACE_REDIS_URL".to_string(), REDIS_URL.to_string()),
    ]));
    kube.add_deployment(
        NS,
        "llmtrace",
        2,
        Rollout::ReadyAfter(Duration::from_millis(300)),
    );
    let mut rotator = Rotator::new(&config(&pg, &bao, sync_timeout));
    let kubeconfig = kube.write_kubeconfig(rotator.dir.path());
    for (name, value) in [
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("PG_ADMIN_PASSWORD", pg.admin_password().to_string()),
        ("VAULT_TOKEN", bao.root_token.clone()),
    ] {
        rotator.env.insert(name.into(), value);
    }
    Setup {
        pg,
        bao,
        kube,
        rotator,
        old_password,
    }
}

/// Runs `rotate` with the ESO stand-in beside it; returns the output and the force-sync values.
async fn rotate(s: &Setup, syncing: bool) -> (support::rotator::Output, Vec<String>) {
    run_with_eso(s, &["rotate", "--output", "json"], syncing).await
}

async fn run_with_eso(
    s: &Setup,
    args: &[&str],
    syncing: bool,
) -> (support::rotator::Output, Vec<String>) {
    let eso = EsoController {
        syncing,
        delay: Duration::from_millis(300),
        ..EsoController::new(&s.kube, &s.bao, NS, "llmtrace")
    };
    run_beside(s, args, eso).await
}

/// Runs the rotator with `args` while `eso` reconciles; the output and the force-sync values.
async fn run_beside(
    s: &Setup,
    args: &[&str],
    eso: EsoController<'_>,
) -> (support::rotator::Output, Vec<String>) {
    let stop = CancellationToken::new();
    let rotation = async {
        let out = s.rotator.run(args).await;
        stop.cancel();
        out
    };
    tokio::join!(rotation, eso.run(stop.clone()))
}

fn password_in(url: &str) -> String {
    let url = url::Url::parse(url).unwrap();
    percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn forces_a_sync_and_restarts_once_the_secret_holds_the_new_password() {
    let s = setup("20s").await;

    let (out, stamps) = rotate(&s, true).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let report = out.json();
    let steps = steps(&report);
    let at = |name: &str| steps.iter().position(|s| s == name).unwrap();
    assert!(
        at("publish ok") < at("sync ok") && at("sync ok") < at("restart ok"),
        "{steps:?}"
    );
    assert_eq!(stamps.len(), 1, "one force-sync");
    let (upstream, _) = s.bao.get_kv("llmtrace/proxy").await;
    let secret = s.kube.secret(NS, "llmtrace").unwrap();
    assert_eq!(
        secret["LLMTRACE_POSTGRES_URL"],
        upstream["LLMTRACE_POSTGRES_URL"]
    );
    assert_eq!(secret["LLMTRACE_REDIS_URL"], REDIS_URL);
    let new = password_in(&secret["LLMTRACE_POSTGRES_URL"]);
    assert_ne!(new, s.old_password);
    let es = s.kube.external_secret(NS, "llmtrace").unwrap();
    assert_eq!(es["metadata"]["annotations"]["force-sync"], stamps[0]);
    assert!(es["status"]["refreshTime"].is_string());
    assert_eq!(
        s.kube
            .restarts(WorkloadKind::Deployment, NS, "llmtrace")
            .len(),
        1
    );
    s.pg.assert_only_login("llmtrace", "llmtrace", &new, &s.old_password)
        .await;
    assert!(out.all().contains(" TRACE "), "ran at trace level");
    assert_no_secret(
        &out.all(),
        &[
            s.old_password.as_str(),
            &new,
            s.pg.admin_password(),
            &s.bao.root_token,
            "redis-secret-value",
        ],
        "rotator output at trace level",
    );
    // RBAC proof for a sync: every request is allowed by what `rbac` prints for this config.
    assert!(support::rotator::assert_rbac_allows(&s.rotator, &s.kube) > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn external_secret_that_never_syncs_times_out_and_rolls_back() {
    let s = setup("2s").await;
    let (before, version) = s.bao.get_kv("llmtrace/proxy").await;
    let secret_before = s.kube.secret(NS, "llmtrace").unwrap();

    let (out, stamps) = rotate(&s, false).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back");
    let steps = steps(&report);
    assert!(steps.contains(&"sync failed".to_string()), "{steps:?}");
    assert!(steps.contains(&"undo-sync ok".to_string()), "{steps:?}");
    let (after, new_version) = s.bao.get_kv("llmtrace/proxy").await;
    assert_eq!(after, before, "OpenBao written back");
    assert_eq!(new_version, version + 2);
    assert_eq!(stamps.len(), 2, "forced again after the write-back");
    assert_eq!(s.kube.secret(NS, "llmtrace").unwrap(), secret_before);
    assert!(s
        .kube
        .restarts(WorkloadKind::Deployment, NS, "llmtrace")
        .is_empty());
    assert_old_password_in_force(&s, &out).await;
}

/// ESO that cannot read the provider marks the ExternalSecret failed (`markAsFailed`:
/// Ready=False, SecretSyncedError, "could not get secret data from provider") and leaves the
/// Secret as it was: the rotation times out, rolls back, and says what ESO said.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_eso_fails_is_rolled_back_with_esos_reason() {
    let s = setup("2s").await;
    let eso = EsoController {
        failing: true,
        delay: Duration::from_millis(100),
        ..EsoController::new(&s.kube, &s.bao, NS, "llmtrace")
    };
    let (out, _) = run_beside(&s, &["rotate", "--output", "json"], eso).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back", "{report:#}");
    let sync = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "sync")
        .expect("a sync step");
    let error = sync["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(
            "ESO reports Ready=False, SecretSyncedError: could not get secret data from provider"
        ),
        "{sync:#}"
    );
    assert_old_password_in_force(&s, &out).await;
}

/// After a rollback: the old password logs in, and the output names no secret.
async fn assert_old_password_in_force(s: &Setup, out: &support::rotator::Output) {
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
        "rotator output at trace level",
    );
}

/// Killed while the upstream is written or the sync runs: recovery rolls forward once OpenBao
/// holds the new credential (syncing again), and back before (syncing the old one again).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn killed_around_the_sync_then_recovered() {
    for (boundary, outcome) in [
        ("publish:postgres/store[0]:started", "rolled_back"),
        ("publish:postgres/store[0]:ok", "succeeded"),
        ("sync:postgres/sync[0]:started", "succeeded"),
    ] {
        let s = setup("20s").await;
        let crashed = s.rotator.crash_at(boundary).await;

        let (out, stamps) = run_with_eso(&s, &["recover", "--output", "json"], true).await;

        assert_eq!(out.code, 0, "{boundary}: {}", out.all());
        assert_eq!(
            out.json()[0]["outcome"],
            outcome,
            "{boundary}: {}",
            out.stdout
        );
        assert!(!stamps.is_empty(), "{boundary}: recovery forced a sync");
        let (upstream, _) = s.bao.get_kv("llmtrace/proxy").await;
        let secret = s.kube.secret(NS, "llmtrace").unwrap();
        assert_eq!(
            secret["LLMTRACE_POSTGRES_URL"], upstream["LLMTRACE_POSTGRES_URL"],
            "{boundary}: the Secret holds what OpenBao holds"
        );
        let password = password_in(&secret["LLMTRACE_POSTGRES_URL"]);
        assert_eq!(
            password == s.old_password,
            outcome == "rolled_back",
            "{boundary}"
        );
        s.pg.try_login("llmtrace", &password, "llmtrace")
            .await
            .unwrap_or_else(|e| panic!("{boundary}: the synced credential logs in: {e}"));
        let restarts = s
            .kube
            .restarts(WorkloadKind::Deployment, NS, "llmtrace")
            .len();
        assert_eq!(restarts, usize::from(outcome == "succeeded"), "{boundary}");
        assert_no_secret(
            &format!("{crashed}\n{}", out.all()),
            &[
                s.old_password.as_str(),
                &password,
                s.pg.admin_password(),
                &s.bao.root_token,
            ],
            "rotator output",
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_start_when_the_secret_is_not_in_sync() {
    let s = setup("20s").await;
    let stale = s.pg.url("llmtrace", "stale-password", "llmtrace");
    s.kube.put_secret(
        NS,
        "llmtrace",
        &[
            ("LLMTRACE_POSTGRES_URL", &stale),
            ("LLMTRACE_REDIS_URL", REDIS_URL),
        ],
    );
    let (_, version) = s.bao.get_kv("llmtrace/proxy").await;

    let (out, stamps) = rotate(&s, true).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout.contains("ESO is not syncing it"),
        "{}",
        out.stdout
    );
    assert!(stamps.is_empty(), "no force-sync");
    assert_eq!(
        s.bao.get_kv("llmtrace/proxy").await.1,
        version,
        "OpenBao untouched"
    );
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("old password logs in");
}

/// The ExternalSecret requests of a run: (method, version) for each, and that each names the
/// object (the Role grants `get` and `patch` by name; discovery needs no grant).
fn external_secret_requests(kube: &KubeFake) -> Vec<(String, String)> {
    kube.requests()
        .iter()
        .filter(|r| r.resource == "externalsecrets")
        .map(|r| {
            assert_eq!((r.namespace.as_str(), r.name.as_str()), (NS, "llmtrace"));
            let version = r.path.split('/').nth(3).unwrap().to_string();
            (r.verb.clone(), version)
        })
        .collect()
}

/// ESO 0.17 and later serve only external-secrets.io/v1 (v1beta1 `served: false`, upstream
/// "chore: unserve v1beta1 and mark it as deprecated" #4758); 0.16 serves both; 0.15 and older
/// serve v1beta1 but no v1 (config/crds/bases/external-secrets.io_externalsecrets.yaml at
/// v0.15.0, v0.16.2, v0.17.0). The fake serves exactly those; the rotator picks v1 when served.
#[tokio::test(flavor = "multi_thread")]
async fn talks_v1_when_served_and_v1beta1_only_to_an_eso_without_v1() {
    for (release, version) in [
        (EsoRelease::Current, "v1"),
        (EsoRelease::V0_16, "v1"),
        (EsoRelease::V0_15, "v1beta1"),
    ] {
        let s = setup_with("20s", release, json!({})).await;

        let (out, stamps) = rotate(&s, true).await;

        assert_eq!(out.code, 0, "{release:?}: {}", out.all());
        assert_eq!(stamps.len(), 1, "{release:?}: one force-sync");
        let secret = s.kube.secret(NS, "llmtrace").unwrap();
        let new = password_in(&secret["LLMTRACE_POSTGRES_URL"]);
        assert_ne!(new, s.old_password, "{release:?}");
        s.pg.try_login("llmtrace", &new, "llmtrace")
            .await
            .expect("new password logs in");
        let requests = external_secret_requests(&s.kube);
        assert_eq!(
            requests,
            [("get", version), ("patch", version)].map(|(v, g)| (v.to_string(), g.to_string())),
            "{release:?}: preflight reads it, sync patches it"
        );
    }
}

/// The rollback's force-sync (undo-sync) talks v1 to a current ESO as well.
#[tokio::test(flavor = "multi_thread")]
async fn rollback_force_syncs_a_current_eso_through_v1() {
    let s = setup_with("2s", EsoRelease::Current, json!({})).await;

    let (out, stamps) = rotate(&s, false).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let steps = steps(&out.json());
    assert!(steps.contains(&"undo-sync ok".to_string()), "{steps:?}");
    assert_eq!(stamps.len(), 2);
    let requests = external_secret_requests(&s.kube);
    // Preflight reads it, the sync patches it and on its timeout reads what ESO reports, the
    // undo-sync patches it again.
    assert_eq!(
        requests,
        [
            ("get", "v1"),
            ("patch", "v1"),
            ("get", "v1"),
            ("patch", "v1")
        ]
        .map(|(v, g)| (v.to_string(), g.to_string()))
    );
}

/// ESO's `shouldRefresh` returns false without looking at annotations once synced, for
/// `refreshPolicy: CreatedOnce` and for Periodic (the default) with `refreshInterval: 0`
/// (pkg/controllers/externalsecret/externalsecret_controller.go): preflight refuses these,
/// naming the field and the fix, before anything changes.
#[tokio::test(flavor = "multi_thread")]
async fn refuses_an_external_secret_that_ignores_force_sync() {
    for (spec, field) in [
        (
            json!({ "refreshPolicy": "CreatedOnce" }),
            "spec.refreshPolicy is CreatedOnce",
        ),
        (
            json!({ "refreshPolicy": "Periodic", "refreshInterval": "0s" }),
            "spec.refreshInterval is 0s with spec.refreshPolicy Periodic",
        ),
        (
            json!({ "refreshInterval": "0" }),
            "spec.refreshInterval is 0:",
        ),
    ] {
        let s = setup_with("3s", EsoRelease::Current, spec.clone()).await;
        let (_, version) = s.bao.get_kv("llmtrace/proxy").await;

        let (out, stamps) = rotate(&s, true).await;

        assert_eq!(out.code, 1, "{spec}: {}", out.all());
        assert_eq!(out.json()["outcome"], "refused", "{spec}");
        assert!(out.stdout.contains(field), "{spec}: {}", out.stdout);
        assert!(
            out.stdout.contains("set spec.refreshPolicy to OnChange"),
            "{spec}: {}",
            out.stdout
        );
        assert!(stamps.is_empty(), "{spec}: no force-sync");
        assert_eq!(s.bao.get_kv("llmtrace/proxy").await.1, version, "{spec}");
        s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
            .await
            .expect("old password logs in");
    }
}

/// The stand-in really ignores a force-sync for such an object (so the refusal is needed), and
/// honours one with `refreshPolicy: OnChange` even at `refreshInterval: 0`, which rotates.
#[tokio::test(flavor = "multi_thread")]
async fn on_change_policy_rotates_and_created_once_would_never_sync() {
    let s = setup_with(
        "20s",
        EsoRelease::Current,
        json!({ "refreshPolicy": "CreatedOnce" }),
    )
    .await;
    let before = s.kube.secret(NS, "llmtrace").unwrap();
    s.bao
        .put_kv(
            "llmtrace/proxy",
            json!({ "LLMTRACE_POSTGRES_URL": "postgres://other", "LLMTRACE_REDIS_URL": REDIS_URL }),
        )
        .await;
    let eso = EsoController::new(&s.kube, &s.bao, NS, "llmtrace");
    let stop = CancellationToken::new();
    let forcing = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.kube
            .patch_external_secret_annotation(NS, "llmtrace", "force-sync", "now");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
    };
    let (_, seen) = tokio::join!(forcing, eso.run(stop.clone()));
    assert_eq!(seen, ["now"]);
    assert_eq!(s.kube.secret(NS, "llmtrace").unwrap(), before, "ignored");

    let s = setup_with(
        "20s",
        EsoRelease::Current,
        json!({ "refreshPolicy": "OnChange", "refreshInterval": "0s" }),
    )
    .await;
    let (out, stamps) = rotate(&s, true).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(stamps.len(), 1);
}

//! `sync`: the credential lives in a real OpenBao, an ExternalSecret copies it into the Secret the
//! proxy reads. The test plays the ESO controller against the API fake; PostgreSQL is real.

mod support;

use std::time::Duration;

use serde_json::json;
use support::eso::EsoController;
use support::kube_fake::{KubeFake, Rollout, WorkloadKind};
use support::openbao::OpenBao;
use support::postgres::Postgres;
use support::rotator::{assert_no_secret, random_password, Rotator, NS};
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
    format!(
        r#"
[rotator]
journal = "sqlite://journal.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"

[[target]]
name = "postgres"
kind = "postgres"
address = "{pg}"
database = "llmtrace"
user = "llmtrace"
admin = {{ user = "postgres", password = "env:PG_ADMIN_PASSWORD" }}
sslmode = "disable"
consumers = ["proxy"]
sync = [{{ namespace = "llmtrace", external_secret = "llmtrace", secret = "llmtrace", key = "LLMTRACE_POSTGRES_URL", format = "url" }}]
sync_timeout = "{sync_timeout}"

  [[target.store]]
  kind = "vault"
  address = "{bao}"
  path = "llmtrace/proxy"
  property = "LLMTRACE_POSTGRES_URL"
  format = "url"
  token = "env:VAULT_TOKEN"

[[consumer]]
name = "proxy"
kind = "deployment"
namespace = "llmtrace"
object = "llmtrace"
timeout = "20s"
"#,
        pg = pg.address(),
        bao = bao.address,
    )
}

async fn setup(sync_timeout: &str) -> Setup {
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
    kube.add_external_secret(
        NS,
        "llmtrace",
        json!({
            "refreshInterval": "1h",
            "secretStoreRef": { "kind": "ClusterSecretStore", "name": "openbao" },
            "target": { "name": "llmtrace", "creationPolicy": "Owner" },
            "dataFrom": [{ "extract": { "key": "llmtrace/proxy" } }],
        }),
    );
    // What ESO wrote at its last refresh.
    kube.put_secret(
        NS,
        "llmtrace",
        &[
            ("LLMTRACE_POSTGRES_URL", &url),
            ("LLMTRACE_REDIS_URL", REDIS_URL),
        ],
    );
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
        kube: &s.kube,
        bao: &s.bao,
        namespace: NS,
        name: "llmtrace",
        syncing,
        delay: Duration::from_millis(300),
    };
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

fn step_order(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s["step"].as_str().unwrap(),
                s["status"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn forces_a_sync_and_restarts_once_the_secret_holds_the_new_password() {
    let s = setup("20s").await;

    let (out, stamps) = rotate(&s, true).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let report = out.json();
    let steps = step_order(&report);
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
    s.pg.try_login("llmtrace", &new, "llmtrace")
        .await
        .expect("new password logs in");
    assert!(s
        .pg
        .try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .is_err());
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
    let steps = step_order(&report);
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

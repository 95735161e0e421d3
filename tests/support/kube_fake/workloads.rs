//! Deployments and StatefulSets: defaulting and validation, and the simulated controller
//! (the rollout simulator) that reports rollout status.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::http::{ApiError, FieldError};
use super::objects::Resource;
use super::objects::{meta_str, obj_field, obj_field_of};
use super::{Clock, Rollout, State, WorkloadKind, RESTARTED_AT};

impl State {
    pub(super) fn add_workload(
        &mut self,
        kind: WorkloadKind,
        ns: &str,
        name: &str,
        replicas: i32,
        rollout: Rollout,
    ) {
        let res = kind.resource();
        let mut obj = workload_manifest(kind, ns, name, replicas);
        if let (WorkloadKind::Deployment, Rollout::Stuck { deadline }) = (kind, &rollout) {
            // Keep the spec roughly consistent with the simulated deadline.
            let secs = deadline.as_secs_f64().ceil().max(1.0) as i64;
            obj["spec"]["progressDeadlineSeconds"] = json!(secs);
        }
        let (mut obj, _) = self
            .prepare(res, ns, name, obj, None)
            .expect("built-in manifest is valid");
        let rv = self.next_rv();
        let meta = obj_field(&mut obj, "metadata");
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(self.now_string()));
        meta.insert("generation".into(), json!(1));
        meta.insert("resourceVersion".into(), json!(rv));
        obj.as_object_mut()
            .unwrap()
            .insert("status".into(), json!({}));
        // Helper-created workloads start fully rolled out.
        let workload = Workload::new(obj, rollout, Instant::now());
        self.workloads
            .insert((kind, ns.to_string(), name.to_string()), workload);
        self.reconcile(kind, ns, name);
    }

    /// Applies a client-like spec change made through a test helper.
    pub(super) fn mutate_workload(
        &mut self,
        kind: WorkloadKind,
        ns: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) {
        let res = kind.resource();
        let existing = self
            .current(res, ns, name)
            .unwrap_or_else(|| panic!("no {kind:?} {ns}/{name}"));
        let mut new = existing.clone();
        change(&mut new);
        self.update_existing(res, ns, name, &existing, new)
            .expect("helper change is valid");
    }

    /// Runs the simulated controller for one workload up to now. Status changes are
    /// writes: they get a new resourceVersion.
    pub(super) fn reconcile(&mut self, kind: WorkloadKind, ns: &str, name: &str) {
        let (lag, clock, now) = (self.controller_lag, self.clock, Instant::now());
        let k = (kind, ns.to_string(), name.to_string());
        let changed = match self.workloads.get_mut(&k) {
            Some(w) => w.reconcile(kind, lag, now, &clock),
            None => return,
        };
        if changed {
            let rv = self.next_rv();
            let w = self.workloads.get_mut(&k).unwrap();
            obj_field(&mut w.obj, "metadata").insert("resourceVersion".into(), json!(rv));
        }
    }
}

/// A minimal valid Deployment/StatefulSet like a test fixture would apply.
pub(super) fn workload_manifest(kind: WorkloadKind, ns: &str, name: &str, replicas: i32) -> Value {
    let res = kind.resource();
    let mut spec = json!({
        "replicas": replicas,
        "selector": { "matchLabels": { "app": name } },
        "template": {
            "metadata": { "labels": { "app": name } },
            "spec": { "containers": [{ "name": "app", "image": format!("example.invalid/{name}:1.0") }] },
        },
    });
    if kind == WorkloadKind::StatefulSet {
        spec["serviceName"] = json!(name);
    }
    json!({
        "apiVersion": res.api_version,
        "kind": res.kind,
        "metadata": { "name": name, "namespace": ns, "labels": { "app": name } },
        "spec": spec,
    })
}

/// Sets `map[key] = value` unless present (the apiserver's defaulting functions).
pub(super) fn default_field(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.entry(key.to_string()).or_insert(value);
}

pub(super) fn apply_defaults(res: &Resource, obj: &mut Value) {
    let Some(kind) = res.workload else {
        default_field(obj.as_object_mut().unwrap(), "type", json!("Opaque"));
        return;
    };
    let spec = obj_field(obj, "spec");
    default_field(spec, "replicas", json!(1));
    default_field(spec, "revisionHistoryLimit", json!(10));
    match kind {
        WorkloadKind::Deployment => {
            default_field(spec, "progressDeadlineSeconds", json!(600));
            let strategy = obj_field_of(spec, "strategy");
            default_field(strategy, "type", json!("RollingUpdate"));
            if strategy.get("type") == Some(&json!("RollingUpdate")) {
                let rolling = obj_field_of(strategy, "rollingUpdate");
                default_field(rolling, "maxSurge", json!("25%"));
                default_field(rolling, "maxUnavailable", json!("25%"));
            }
        }
        WorkloadKind::StatefulSet => {
            default_field(spec, "podManagementPolicy", json!("OrderedReady"));
            let strategy = obj_field_of(spec, "updateStrategy");
            default_field(strategy, "type", json!("RollingUpdate"));
            if strategy.get("type") == Some(&json!("RollingUpdate")) {
                default_field(
                    obj_field_of(strategy, "rollingUpdate"),
                    "partition",
                    json!(0),
                );
            }
            let retention = obj_field_of(spec, "persistentVolumeClaimRetentionPolicy");
            default_field(retention, "whenDeleted", json!("Retain"));
            default_field(retention, "whenScaled", json!("Retain"));
        }
    }
    let pod = obj_field_of(obj_field_of(spec, "template"), "spec");
    default_field(pod, "restartPolicy", json!("Always"));
    default_field(pod, "terminationGracePeriodSeconds", json!(30));
    default_field(pod, "dnsPolicy", json!("ClusterFirst"));
    default_field(pod, "securityContext", json!({}));
    default_field(pod, "schedulerName", json!("default-scheduler"));
    for list in ["initContainers", "containers"] {
        let Some(containers) = pod.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            let last = image.rsplit('/').next().unwrap_or("");
            let latest = !last.contains(':') && !image.contains('@') || last.ends_with(":latest");
            default_field(
                c,
                "imagePullPolicy",
                json!(if latest { "Always" } else { "IfNotPresent" }),
            );
            default_field(c, "terminationMessagePath", json!("/dev/termination-log"));
            default_field(c, "terminationMessagePolicy", json!("File"));
            default_field(c, "resources", json!({}));
            if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    default_field(p, "protocol", json!("TCP"));
                }
            }
        }
    }
}

/// Fields whose absence the real server reports as 422 (not a decode error).
pub(super) fn check_required_workload_fields(
    res: &Resource,
    name: &str,
    obj: &Value,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    for (pointer, field) in [
        ("/spec", "spec"),
        ("/spec/selector", "spec.selector"),
        ("/spec/template", "spec.template"),
        (
            "/spec/template/spec/containers",
            "spec.template.spec.containers",
        ),
    ] {
        if obj.pointer(pointer).is_none_or(Value::is_null) {
            errors.push(FieldError::required(field));
            break;
        }
    }
    let containers = obj
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array);
    for (i, c) in containers.into_iter().flatten().enumerate() {
        if c.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errors.push(FieldError::required(&format!(
                "spec.template.spec.containers[{i}].name"
            )));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(res, name, errors))
    }
}

pub(super) fn validate_workload(
    kind: WorkloadKind,
    obj: &Value,
    existing: Option<&Value>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let spec = &obj["spec"];
    let replicas = spec["replicas"].as_i64().unwrap_or(1);
    if replicas < 0 {
        errors.push(FieldError::invalid(
            "spec.replicas",
            &spec["replicas"],
            "must be greater than or equal to 0",
        ));
    }
    if spec["template"]["spec"]["containers"]
        .as_array()
        .is_some_and(Vec::is_empty)
    {
        errors.push(FieldError::required("spec.template.spec.containers"));
    }
    let selector = &spec["selector"];
    let empty_selector = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(Map::is_empty)
        && selector
            .get("matchExpressions")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
    let labels = spec
        .pointer("/template/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if empty_selector {
        errors.push(FieldError::invalid(
            "spec.selector",
            selector,
            "empty selector is invalid for deployment",
        ));
    } else if !label_selector_object_matches(selector, &labels) {
        errors.push(FieldError::invalid(
            "spec.template.metadata.labels",
            &Value::Object(labels),
            "`selector` does not match template `labels`",
        ));
    }
    let restart_policy = spec
        .pointer("/template/spec/restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always");
    if restart_policy != "Always" {
        errors.push(FieldError {
            field: "spec.template.spec.restartPolicy".into(),
            reason: "FieldValueNotSupported",
            detail: format!(
                "Unsupported value: \"{restart_policy}\": supported values: \"Always\""
            ),
        });
    }
    if kind == WorkloadKind::Deployment
        && spec.pointer("/strategy/type") == Some(&json!("RollingUpdate"))
    {
        let surge = int_or_percent(spec.pointer("/strategy/rollingUpdate/maxSurge"), 100, true);
        let unavailable = int_or_percent(
            spec.pointer("/strategy/rollingUpdate/maxUnavailable"),
            100,
            false,
        );
        if surge == 0 && unavailable == 0 {
            errors.push(FieldError::invalid(
                "spec.strategy.rollingUpdate.maxUnavailable",
                &json!(0),
                "may not be 0 when `maxSurge` is 0",
            ));
        }
    }
    let Some(old) = existing else { return errors };
    if old["spec"]["selector"] != *selector {
        errors.push(FieldError::invalid(
            "spec.selector",
            selector,
            "field is immutable",
        ));
    }
    if kind == WorkloadKind::StatefulSet {
        // apps/v1 StatefulSet: only these spec fields may change after creation.
        let mutable = [
            "replicas",
            "ordinals",
            "template",
            "updateStrategy",
            "persistentVolumeClaimRetentionPolicy",
            "minReadySeconds",
        ];
        let strip = |s: &Value| {
            let mut m = s.as_object().cloned().unwrap_or_default();
            m.retain(|k, _| !mutable.contains(&k.as_str()));
            m
        };
        if strip(spec) != strip(&old["spec"]) {
            errors.push(FieldError::forbidden(
                "spec",
                "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', \
                 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
            ));
        }
    }
    errors
}

/// Resolves an IntOrString like "25%" or 1 against `total` (percentages round up or down).
pub(super) fn int_or_percent(v: Option<&Value>, total: i64, round_up: bool) -> i64 {
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => {
            let Some(pct) = s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) else {
                return s.parse().unwrap_or(0);
            };
            let scaled = pct * total;
            if round_up {
                (scaled + 99) / 100
            } else {
                scaled / 100
            }
        }
        _ => 0,
    }
}

/// A Deployment or StatefulSet plus the controller's private bookkeeping.
///
/// Rollout model: `stable_hash` is the pod template every "old" pod runs (the
/// Deployment's old ReplicaSet / the StatefulSet's currentRevision) and
/// `target_hash` the template the controller is moving to (new ReplicaSet /
/// updateRevision). They differ exactly while a rollout is in progress.
pub(super) struct Workload {
    pub(super) obj: Value,
    pub(super) rollout: Rollout,
    pub(super) created_at: Instant,
    /// Generation the controller has processed (0: not yet seen).
    pub(super) observed_generation: i64,
    /// When `metadata.generation` last changed.
    pub(super) generation_changed_at: Instant,
    pub(super) stable_hash: String,
    pub(super) stable_since: Instant,
    pub(super) target_hash: String,
    pub(super) target_started: Instant,
    /// Set while a Deployment is paused (as seen by the controller); the rollout clock stops.
    pub(super) paused_at: Option<Instant>,
    /// StatefulSet partition as last observed.
    pub(super) partition: i64,
    /// deployment.kubernetes.io/revision.
    pub(super) revision: u64,
    pub(super) restarts: Vec<String>,
}

impl Workload {
    /// A workload a helper adds: fully rolled out, generation 1 observed.
    pub(super) fn new(obj: Value, rollout: Rollout, now: Instant) -> Workload {
        let hash = pod_template_hash(&obj["spec"]["template"]);
        Workload {
            observed_generation: 1,
            partition: partition_of(&obj),
            obj,
            rollout,
            created_at: now,
            generation_changed_at: now,
            stable_hash: hash.clone(),
            stable_since: now,
            target_hash: hash,
            target_started: now,
            paused_at: None,
            revision: 1,
            restarts: Vec::new(),
        }
    }

    pub(super) fn generation(&self) -> i64 {
        self.obj
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1)
    }

    pub(super) fn replicas(&self) -> i64 {
        self.obj["spec"]["replicas"].as_i64().unwrap_or(1)
    }

    pub(super) fn name(&self) -> String {
        meta_str(&self.obj, "name").to_string()
    }

    /// Records a client write.
    pub(super) fn accept_write(&mut self, obj: Value, now: Instant) {
        let old_restart = restart_annotation(&self.obj);
        let new_restart = restart_annotation(&obj);
        if let Some(value) = new_restart.filter(|v| Some(v) != old_restart.as_ref()) {
            self.restarts.push(value);
        }
        let old_generation = self.generation();
        self.obj = obj;
        if self.generation() != old_generation {
            self.generation_changed_at = now;
        }
    }

    /// Advances the controller to `now`; returns whether the object changed.
    pub(super) fn reconcile(
        &mut self,
        kind: WorkloadKind,
        lag: Duration,
        now: Instant,
        clock: &Clock,
    ) -> bool {
        if self.observed_generation < self.generation() {
            let seen_at = self.generation_changed_at + lag;
            if now < seen_at {
                // The controller has not caught up: the previous status stays.
                return false;
            }
            self.observe(kind, seen_at);
        }
        self.promote_if_done(kind, now);
        let before = self.obj.clone();
        let status = match kind {
            WorkloadKind::Deployment => self.deployment_status(now, clock),
            WorkloadKind::StatefulSet => self.statefulset_status(now),
        };
        self.obj
            .as_object_mut()
            .unwrap()
            .insert("status".into(), status);
        if kind == WorkloadKind::Deployment {
            let annotations = obj_field_of(obj_field(&mut self.obj, "metadata"), "annotations");
            annotations.insert(
                "deployment.kubernetes.io/revision".into(),
                json!(self.revision.to_string()),
            );
        }
        self.obj != before
    }

    /// The controller notices the latest spec at instant `at`.
    pub(super) fn observe(&mut self, kind: WorkloadKind, at: Instant) {
        self.observed_generation = self.generation();
        let template = pod_template_hash(&self.obj["spec"]["template"]);
        if kind == WorkloadKind::Deployment {
            if self.obj["spec"]["paused"] == json!(true) {
                // A paused Deployment neither starts nor continues rollouts.
                self.paused_at.get_or_insert(at);
                return;
            }
            if let Some(paused_at) = self.paused_at.take() {
                self.target_started += at.saturating_duration_since(paused_at);
            }
        }
        let partition = partition_of(&self.obj);
        let partition_changed = partition != self.partition;
        self.partition = partition;
        if template == self.target_hash {
            // Not a template change (scale, strategy, ...). A lower partition lets a
            // parked StatefulSet rollout continue.
            if partition_changed && self.target_hash != self.stable_hash {
                self.target_started = at;
            }
            return;
        }
        self.revision += 1;
        if template == self.stable_hash {
            // Rolled back to the running template: the old pods are all still there.
            self.target_hash = template;
            return;
        }
        self.target_hash = template;
        self.target_started = at;
    }

    /// Pods still to move to the target revision (StatefulSet partitions keep some back).
    pub(super) fn pods_to_update(&self, kind: WorkloadKind) -> i64 {
        let n = self.replicas();
        match kind {
            WorkloadKind::Deployment => n,
            WorkloadKind::StatefulSet => n - self.partition.clamp(0, n),
        }
    }

    pub(super) fn on_delete(&self, kind: WorkloadKind) -> bool {
        kind == WorkloadKind::StatefulSet
            && self.obj.pointer("/spec/updateStrategy/type") == Some(&json!("OnDelete"))
    }

    /// When the in-progress rollout finishes (None: not while paused / never).
    pub(super) fn done_at(&self, kind: WorkloadKind) -> Option<Instant> {
        if self.paused_at.is_some() || self.on_delete(kind) {
            return None;
        }
        if self.pods_to_update(kind) <= 0 {
            return Some(self.target_started);
        }
        match self.rollout {
            Rollout::ReadyAfter(d) => Some(self.target_started + d),
            Rollout::Stuck { .. } => None,
        }
    }

    pub(super) fn is_done(&self, kind: WorkloadKind, now: Instant) -> bool {
        self.done_at(kind).is_some_and(|t| now >= t)
    }

    pub(super) fn promote_if_done(&mut self, kind: WorkloadKind, now: Instant) {
        if self.target_hash == self.stable_hash || !self.is_done(kind, now) {
            return;
        }
        // A partitioned StatefulSet keeps old pods, so currentRevision does not move.
        if kind == WorkloadKind::StatefulSet && self.pods_to_update(kind) < self.replicas() {
            return;
        }
        self.stable_since = self.done_at(kind).unwrap_or(now);
        self.stable_hash = self.target_hash.clone();
    }

    /// Deployment status as the deployment controller would have written it by `now`.
    pub(super) fn deployment_status(&self, now: Instant, clock: &Clock) -> Value {
        let n = self.replicas();
        let rs = format!("{}-{}", self.name(), self.target_hash);
        let strategy = &self.obj["spec"]["strategy"];
        let rolling = strategy["type"] == json!("RollingUpdate");
        let (surge, max_unavailable) = if rolling && n > 0 {
            let surge = int_or_percent(strategy.pointer("/rollingUpdate/maxSurge"), n, true);
            let unavailable =
                int_or_percent(strategy.pointer("/rollingUpdate/maxUnavailable"), n, false);
            // The controller's fencepost rule: never both zero.
            (
                surge,
                if surge == 0 && unavailable == 0 {
                    1
                } else {
                    unavailable.min(n)
                },
            )
        } else {
            (0, 0)
        };

        let (total, updated, available, mut progressing) = if self.target_hash == self.stable_hash {
            let cond = condition(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                &format!("ReplicaSet \"{rs}\" has successfully progressed."),
                clock.format(self.stable_since),
            );
            (n, n, n, cond)
        } else {
            // Mid-rollout steady state: old pods scaled down as far as maxUnavailable
            // allows, new pods (not ready yet) up to maxSurge above the desired count.
            let (old, new) = if rolling {
                (n - max_unavailable, (surge + max_unavailable).min(n))
            } else {
                (0, n)
            };
            let stuck_since = match self.rollout {
                Rollout::Stuck { deadline } if now >= self.target_started + deadline => {
                    Some(self.target_started + deadline)
                }
                _ => None,
            };
            let cond = match stuck_since {
                Some(at) => condition(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{rs}\" has timed out progressing."),
                    clock.format(at),
                ),
                None => condition(
                    "Progressing",
                    "True",
                    "ReplicaSetUpdated",
                    &format!("ReplicaSet \"{rs}\" is progressing."),
                    clock.format(self.target_started),
                ),
            };
            (old + new, new, old, cond)
        };
        if let Some(at) = self.paused_at {
            progressing = condition(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused",
                clock.format(at),
            );
        }
        let available_cond = if available >= n - max_unavailable {
            condition(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                clock.format(self.created_at),
            )
        } else {
            condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                clock.format(self.target_started),
            )
        };

        // DeploymentStatus counters are all `omitempty`.
        let mut status = Map::new();
        for (field, value) in [
            ("observedGeneration", self.observed_generation),
            ("replicas", total),
            ("updatedReplicas", updated),
            ("readyReplicas", available),
            ("availableReplicas", available),
            ("unavailableReplicas", (n - available).max(0)),
        ] {
            if value != 0 {
                status.insert(field.into(), json!(value));
            }
        }
        status.insert("conditions".into(), json!([available_cond, progressing]));
        Value::Object(status)
    }

    /// StatefulSet status as the statefulset controller would have written it by `now`.
    pub(super) fn statefulset_status(&self, now: Instant) -> Value {
        let kind = WorkloadKind::StatefulSet;
        let n = self.replicas();
        let current_revision = format!("{}-{}", self.name(), self.stable_hash);
        let update_revision = format!("{}-{}", self.name(), self.target_hash);
        let (ready, current, updated) = if self.target_hash == self.stable_hash {
            (n, n, n)
        } else if self.on_delete(kind) {
            // OnDelete: nothing happens until someone deletes pods.
            (n, n, 0)
        } else if self.is_done(kind, now) {
            let to_update = self.pods_to_update(kind);
            (n, n - to_update, to_update)
        } else {
            // OrderedReady rolling update: the highest ordinal is replaced first and
            // is not ready yet.
            (n - 1, n - 1, 1)
        };
        let mut status = Map::new();
        status.insert("observedGeneration".into(), json!(self.observed_generation));
        status.insert("replicas".into(), json!(n));
        for (field, value) in [
            ("readyReplicas", ready),
            ("currentReplicas", current),
            ("updatedReplicas", updated),
        ] {
            if value != 0 {
                status.insert(field.into(), json!(value));
            }
        }
        status.insert("currentRevision".into(), json!(current_revision));
        status.insert("updateRevision".into(), json!(update_revision));
        status.insert("collisionCount".into(), json!(0));
        status.insert("availableReplicas".into(), json!(ready));
        Value::Object(status)
    }
}

pub(super) fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    at: String,
) -> Value {
    json!({
        "type": kind, "status": status, "reason": reason, "message": message,
        "lastUpdateTime": at, "lastTransitionTime": at,
    })
}

pub(super) fn partition_of(obj: &Value) -> i64 {
    obj.pointer("/spec/updateStrategy/rollingUpdate/partition")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

pub(super) fn restart_annotation(obj: &Value) -> Option<String> {
    obj.pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(RESTARTED_AT))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Like the controller's pod-template-hash: FNV-32a of the template, rendered with
/// the apimachinery "safe" alphabet (no vowels, so no accidental words).
pub(super) fn pod_template_hash(template: &Value) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u32 = 0x811c_9dc5;
    for b in canonical_json(template).bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.to_string()
        .bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// JSON with object keys sorted, so hashing does not depend on map ordering.
pub(super) fn canonical_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", json!(k), canonical_json(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical_json).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// Evaluates a metav1.LabelSelector object (matchLabels + matchExpressions).
pub(super) fn label_selector_object_matches(selector: &Value, labels: &Map<String, Value>) -> bool {
    let match_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if match_labels.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        return false;
    }
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    expressions.iter().all(|e| {
        let label = e["key"].as_str().and_then(|k| labels.get(k));
        let values = e["values"].as_array().cloned().unwrap_or_default();
        match e["operator"].as_str().unwrap_or("") {
            "In" => label.is_some_and(|l| values.contains(l)),
            "NotIn" => label.is_none_or(|l| !values.contains(l)),
            "Exists" => label.is_some(),
            "DoesNotExist" => label.is_none(),
            _ => false,
        }
    })
}

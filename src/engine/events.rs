//! Kubernetes Events (`events.k8s.io/v1`) on the objects a run restarted or wrote, so
//! `kubectl describe deploy/llmtrace` shows each rotation next to the rollout it caused.
//! Best effort: an Event that cannot be written is logged and never fails the run.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::report::Outcome;

/// `reportingController`: the API server requires a qualified name (`domain/name`).
pub const CONTROLLER: &str = "llmtrace.dev/rotator";
/// The API server's limits on `note` and `reportingInstance` (validation/events.go).
const NOTE_LIMIT: usize = 1024;
const INSTANCE_LIMIT: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    StatefulSet,
    Secret,
}

/// An object an Event is about, and the targets of the run it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regarding {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub targets: Vec<String>,
}

/// The Event's `reason` and `type` for a run's outcome; none for a run that changed nothing
/// or that another process finishes (its recovery reports then).
pub fn reason(outcome: Outcome) -> Option<(&'static str, &'static str)> {
    match outcome {
        Outcome::Succeeded => Some(("RotationSucceeded", "Normal")),
        Outcome::RolledBack => Some(("RotationRolledBack", "Warning")),
        Outcome::RollbackFailed => Some(("RotationFailed", "Warning")),
        Outcome::Refused | Outcome::Interrupted => None,
    }
}

/// Writes one Event per object; logs what could not be written.
pub async fn emit(client: &kube::Client, run: &str, outcome: Outcome, objects: &[Regarding]) {
    let Some((reason, kind)) = reason(outcome) else {
        return;
    };
    for object in objects {
        if let Err(error) = emit_one(client, run, outcome, reason, kind, object).await {
            tracing::warn!(run, object = %object.name, namespace = %object.namespace, reason, cause = %error, "cannot write a Kubernetes Event");
        }
    }
}

async fn emit_one(
    client: &kube::Client,
    run: &str,
    outcome: Outcome,
    reason: &str,
    event_type: &str,
    object: &Regarding,
) -> Result<(), kube::Error> {
    let ns = object.namespace.as_str();
    // kubectl describe finds Events with a field selector on the object's uid (client-go
    // kubernetes/typed/core/v1/event_expansion.go, Search): read it.
    let (api_version, kind, meta) = match object.kind {
        Kind::Deployment => (
            "apps/v1",
            "Deployment",
            Api::<Deployment>::namespaced(client.clone(), ns)
                .get(&object.name)
                .await?
                .metadata,
        ),
        Kind::StatefulSet => (
            "apps/v1",
            "StatefulSet",
            Api::<StatefulSet>::namespaced(client.clone(), ns)
                .get(&object.name)
                .await?
                .metadata,
        ),
        Kind::Secret => (
            "v1",
            "Secret",
            Api::<Secret>::namespaced(client.clone(), ns)
                .get(&object.name)
                .await?
                .metadata,
        ),
    };
    let now = chrono::Utc::now();
    let mut note = format!(
        "llmtrace-rotator run {run}, target {}: {}",
        object.targets.join(", "),
        outcome.as_str()
    );
    truncate(&mut note, NOTE_LIMIT);
    let mut instance = std::env::var("HOSTNAME").unwrap_or_else(|_| "llmtrace-rotator".into());
    truncate(&mut instance, INSTANCE_LIMIT);
    // Named like client-go's recorder names them: `<object>.<unix nanoseconds, hex>`.
    let mut prefix = object.name.clone();
    truncate(&mut prefix, 200);
    let name = format!(
        "{prefix}.{:x}",
        now.timestamp_nanos_opt().unwrap_or_default()
    );
    let event: Event = serde_json::from_value(json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": { "name": name, "namespace": ns },
        "eventTime": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "reportingController": CONTROLLER,
        "reportingInstance": instance,
        "action": "Rotate",
        "reason": reason,
        "type": event_type,
        "note": note,
        "regarding": {
            "apiVersion": api_version,
            "kind": kind,
            "namespace": ns,
            "name": object.name,
            "uid": meta.uid,
            "resourceVersion": meta.resource_version,
        },
    }))
    .map_err(kube::Error::SerdeError)?;
    Api::<Event>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &event)
        .await?;
    Ok(())
}

/// Cuts `text` to at most `limit` bytes, on a character boundary.
fn truncate(text: &mut String, limit: usize) {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

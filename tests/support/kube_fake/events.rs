//! `events.k8s.io/v1` Events in the fake: created in a namespace (all the rotator does with
//! them), validated as the real API server validates them; tests read them with
//! [`KubeFake::events`].
//!
//! Upstream behaviour followed (kubernetes/kubernetes):
//! - pkg/apis/core/validation/events.go: `ValidateEventCreate` for events.k8s.io/v1 requires
//!   eventTime, a `Normal`/`Warning` type, reportingController (a qualified name),
//!   reportingInstance, action and reason (each at most 128 characters), a note of at most
//!   1024, no deprecated* fields, and a regarding namespace unless the Event lives in
//!   `default`/`kube-system`.
//! - Events are stored as core/v1 Events, so field paths in errors use the core names
//!   (`message`, `involvedObject.namespace`).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use axum::http::Method;

use super::http::{ApiError, ApiResult, FieldError, Incoming, Reply};
use super::objects::{check_body_namespace, meta_str, obj_field, parse_json, Resource};
use super::{KubeFake, State};

pub(super) static EVENTS: Resource = Resource {
    plural: "events",
    kind: "Event",
    group: "events.k8s.io",
    api_version: "events.k8s.io/v1",
    workload: None,
};

#[derive(Default)]
pub(super) struct Events {
    objects: BTreeMap<(String, String), Value>,
}

impl KubeFake {
    /// The Events in `ns`, oldest first.
    pub fn events(&self, ns: &str) -> Vec<Value> {
        let st = self.lock();
        let mut events: Vec<Value> = st
            .events
            .objects
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|(_, v)| v.clone())
            .collect();
        events.sort_by_key(|e| {
            e.pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|rv| rv.parse::<u64>().ok())
        });
        events
    }
}

/// `metav1 IsQualifiedName`: `[prefix/]name`, name at most 63 alphanumerics, `-`, `_`, `.`,
/// starting and ending alphanumeric; prefix a DNS subdomain.
fn is_qualified_name(value: &str) -> bool {
    let (prefix, name) = match value.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, value),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                !label.is_empty()
                    && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    name_ok && prefix_ok
}

fn text<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get(field).and_then(Value::as_str).unwrap_or("")
}

/// `ValidateEventCreate` for a request at events.k8s.io/v1.
fn validate_create(obj: &Value, ns: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let blank = json!("");
    if text(obj, "eventTime").is_empty() {
        errors.push(FieldError::required("eventTime"));
    }
    let regarding_ns = obj
        .pointer("/regarding/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    if regarding_ns.is_empty() && ns != "default" && ns != "kube-system" {
        errors.push(FieldError::invalid(
            "involvedObject.namespace",
            &blank,
            "does not match event.namespace",
        ));
    }
    let controller = text(obj, "reportingController");
    if controller.is_empty() {
        errors.push(FieldError::required("reportingController"));
    } else if !is_qualified_name(controller) {
        errors.push(FieldError::invalid(
            "reportingController",
            &json!(controller),
            "must be a qualified name",
        ));
    }
    for (field, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
        let value = text(obj, field);
        if value.is_empty() {
            errors.push(FieldError::required(field));
        } else if value.len() > limit {
            errors.push(FieldError::invalid(
                field,
                &blank,
                &format!("can have at most {limit} characters"),
            ));
        }
    }
    if text(obj, "note").len() > 1024 {
        errors.push(FieldError::invalid(
            "message",
            &blank,
            "can have at most 1024 characters",
        ));
    }
    let event_type = text(obj, "type");
    if event_type != "Normal" && event_type != "Warning" {
        errors.push(FieldError::invalid(
            "type",
            &blank,
            &format!("has invalid value: {event_type}"),
        ));
    }
    for (field, core) in [
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
    ] {
        if !text(obj, field).is_empty() {
            errors.push(FieldError::invalid(core, &blank, "needs to be unset"));
        }
    }
    if obj
        .get("deprecatedCount")
        .and_then(Value::as_i64)
        .is_some_and(|c| c != 0)
    {
        errors.push(FieldError::invalid("count", &blank, "needs to be unset"));
    }
    if obj
        .get("deprecatedSource")
        .and_then(Value::as_object)
        .is_some_and(|s| {
            s.values()
                .any(|v| v.as_str().is_some_and(|v| !v.is_empty()))
        })
    {
        errors.push(FieldError::invalid("source", &blank, "needs to be unset"));
    }
    errors.extend(validate_series(obj));
    errors
}

fn validate_series(obj: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(series) = obj.get("series").filter(|s| !s.is_null()) {
        if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
            errors.push(FieldError::invalid(
                "series.count",
                &json!(""),
                "should be at least 2",
            ));
        }
        if text(series, "lastObservedTime").is_empty() {
            errors.push(FieldError::required("series.lastObservedTime"));
        }
    }
    errors
}

impl State {
    pub(super) fn events_request(
        &mut self,
        ns: Option<&str>,
        name: Option<&str>,
        req: &Incoming,
    ) -> ApiResult {
        match (&req.method, ns, name) {
            (&Method::POST, Some(ns), None) => self.create_event(ns, req),
            _ => Err(ApiError::unsupported("anything but creating an Event")),
        }
    }

    fn create_event(&mut self, ns: &str, req: &Incoming) -> ApiResult {
        let mut obj = parse_json(&req.body)?;
        check_body_namespace(&mut obj, ns)?;
        // The rotator names its Events (client-go's recorder does too): no generateName.
        let name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            return Err(ApiError::invalid(
                &EVENTS,
                "",
                vec![FieldError {
                    field: "metadata.name".into(),
                    reason: "FieldValueRequired",
                    detail: "Required value: name or generateName is required".into(),
                }],
            ));
        }
        let errors = validate_create(&obj, ns);
        if !errors.is_empty() {
            return Err(ApiError::invalid(&EVENTS, &name, errors));
        }
        let id = (ns.to_string(), name.clone());
        if self.events.objects.contains_key(&id) {
            return Err(ApiError::already_exists(&EVENTS, &name));
        }
        let created = self.now_string();
        let meta = obj_field(&mut obj, "metadata");
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(created));
        obj["apiVersion"] = json!(EVENTS.api_version);
        obj["kind"] = json!(EVENTS.kind);
        let rv = self.next_rv();
        obj_field(&mut obj, "metadata").insert("resourceVersion".into(), json!(rv));
        self.events.objects.insert(id, obj.clone());
        Ok(Reply::created(obj))
    }
}

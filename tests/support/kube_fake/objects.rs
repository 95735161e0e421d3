//! Secrets, Deployments and StatefulSets as the real server stores them: decoding (unknown
//! fields pruned), server-owned metadata, optimistic concurrency, no-op writes, validation.

use std::time::Instant;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::http::{ApiError, ApiResult, FieldError, Incoming, Reply};
use super::patch::{merge_patch, strategic_merge};
use super::workloads::{apply_defaults, check_required_workload_fields, validate_workload};
use super::{key, State, WorkloadKind};

impl State {
    /// The object as a GET would return it now (workload status reconciled first).
    pub(super) fn current(&mut self, res: &Resource, ns: &str, name: &str) -> Option<Value> {
        match res.workload {
            None => self.secrets.get(&key(ns, name)).cloned(),
            Some(kind) => {
                self.reconcile(kind, ns, name);
                self.workloads
                    .get(&(kind, ns.to_string(), name.to_string()))
                    .map(|w| w.obj.clone())
            }
        }
    }

    pub(super) fn replace(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        req: &Incoming,
    ) -> ApiResult {
        let mut obj = parse_object(res, &req.body)?;
        let body_name = meta_str(&obj, "name");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        check_body_namespace(&mut obj, ns)?;
        let existing = self
            .current(res, ns, name)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        check_preconditions(res, name, &obj, &existing)?;
        self.update_existing(res, ns, name, &existing, obj)
    }

    pub(super) fn patch(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        req: &Incoming,
    ) -> ApiResult {
        let content_type = req.content_type.as_deref().unwrap_or("");
        let media = content_type.split(';').next().unwrap_or("").trim();
        let apply: fn(&mut Value, &Value) = match media {
            "application/merge-patch+json" => merge_patch,
            "application/strategic-merge-patch+json" => strategic_merge,
            "application/json-patch+json" => return Err(ApiError::unsupported("JSON patch")),
            "application/apply-patch+yaml" => {
                return Err(ApiError::unsupported("server-side apply"))
            }
            _ => return Err(ApiError::unsupported_media_type(false)),
        };
        let patch = parse_json(&req.body)?;
        let existing = self
            .current(res, ns, name)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let mut patched = existing.clone();
        apply(&mut patched, &patch);
        check_name_unchanged(&patched, name)?;
        check_preconditions(res, name, &patched, &existing)?;
        self.update_existing(res, ns, name, &existing, patched)
    }

    /// The shared tail of PUT and PATCH: normalise, validate, detect no-ops, bump
    /// generation and resourceVersion, persist.
    pub(super) fn update_existing(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        existing: &Value,
        new: Value,
    ) -> ApiResult {
        let (mut obj, warnings) = self.prepare(res, ns, name, new, Some(existing))?;
        // Compare with the stored object as if the write kept its resourceVersion.
        let existing_rv = meta_str(existing, "resourceVersion").to_string();
        obj_field(&mut obj, "metadata").insert("resourceVersion".into(), json!(existing_rv));
        if res.workload.is_some() && obj.get("spec") != existing.get("spec") {
            let generation = existing
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            obj_field(&mut obj, "metadata").insert("generation".into(), json!(generation + 1));
        }
        if &obj == existing {
            // The real server skips no-op writes: same object, same resourceVersion.
            return Ok(Reply {
                code: 200,
                body: obj,
                warnings,
            });
        }
        let rv = self.next_rv();
        obj_field(&mut obj, "metadata").insert("resourceVersion".into(), json!(rv));
        self.store_update(res, ns, name, obj.clone());
        Ok(Reply {
            code: 200,
            body: obj,
            warnings,
        })
    }

    /// Turns a client-supplied object into what the server would store, short of
    /// `resourceVersion` and `generation`: decode (prune unknown fields), restore
    /// server-owned metadata, default, validate. Returns unknown-field warnings.
    pub(super) fn prepare(
        &self,
        res: &Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
        existing: Option<&Value>,
    ) -> Result<(Value, Vec<String>), ApiError> {
        let o = obj
            .as_object_mut()
            .ok_or_else(|| ApiError::undecodable(res, "expected a JSON object"))?;
        for (field, expected) in [("apiVersion", res.api_version), ("kind", res.kind)] {
            match o.get(field).and_then(Value::as_str) {
                None | Some("") => {
                    o.insert(field.into(), json!(expected));
                }
                Some(x) if x == expected => {}
                Some(x) => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} of the provided object ({x}) does not match the expected {field} ({expected})"
                    )))
                }
            }
        }
        if res.workload.is_none() {
            fold_secret_data(res, &mut obj)?;
        } else {
            check_required_workload_fields(res, name, &obj)?;
        }

        let pruned = roundtrip(res, &obj)?;
        let mut unknown = Vec::new();
        unknown_fields(&obj, &pruned, "", &mut unknown);
        let warnings: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        let mut obj = pruned;

        // Server-owned metadata cannot be changed by clients; it is silently restored.
        let meta = obj_field(&mut obj, "metadata");
        meta.insert("namespace".into(), json!(ns));
        meta.insert("name".into(), json!(name));
        meta.remove("resourceVersion");
        meta.remove("generation");
        meta.remove("creationTimestamp");
        meta.remove("uid");
        if let Some(existing) = existing {
            for field in ["uid", "creationTimestamp", "generation"] {
                if let Some(v) = existing.pointer(&format!("/metadata/{field}")) {
                    meta.insert(field.into(), v.clone());
                }
            }
        }
        // Writes to the main resource never change status (it is a subresource).
        if res.workload.is_some() {
            let o = obj.as_object_mut().unwrap();
            o.remove("status");
            if let Some(status) = existing.and_then(|e| e.get("status")) {
                o.insert("status".into(), status.clone());
            }
        }

        apply_defaults(res, &mut obj);
        let errors = match res.workload {
            None => validate_secret(&obj, existing),
            Some(kind) => validate_workload(kind, &obj, existing),
        };
        if !errors.is_empty() {
            return Err(ApiError::invalid(res, name, errors));
        }
        Ok((obj, warnings))
    }

    pub(super) fn store_update(&mut self, res: &Resource, ns: &str, name: &str, obj: Value) {
        match res.workload {
            None => {
                self.secrets.insert(key(ns, name), obj);
            }
            Some(kind) => {
                if let Some(w) = self
                    .workloads
                    .get_mut(&(kind, ns.to_string(), name.to_string()))
                {
                    w.accept_write(obj, Instant::now());
                }
            }
        }
    }

    pub(super) fn put_secret(&mut self, ns: &str, name: &str, data: Map<String, Value>) {
        let rv = self.next_rv();
        let now = self.now_string();
        let entry = self.secrets.entry(key(ns, name)).or_insert_with(|| {
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now },
                "type": "Opaque",
            })
        });
        let o = entry.as_object_mut().unwrap();
        if data.is_empty() {
            o.remove("data"); // omitempty
        } else {
            o.insert("data".into(), Value::Object(data));
        }
        obj_field(entry, "metadata").insert("resourceVersion".into(), json!(rv));
    }
}

pub(super) struct Resource {
    pub(super) plural: &'static str,
    pub(super) kind: &'static str,
    pub(super) group: &'static str,
    pub(super) api_version: &'static str,
    pub(super) workload: Option<WorkloadKind>,
}

pub(super) static SECRETS: Resource = Resource {
    plural: "secrets",
    kind: "Secret",
    group: "",
    api_version: "v1",
    workload: None,
};

pub(super) static DEPLOYMENTS: Resource = Resource {
    plural: "deployments",
    kind: "Deployment",
    group: "apps",
    api_version: "apps/v1",
    workload: Some(WorkloadKind::Deployment),
};

pub(super) static STATEFULSETS: Resource = Resource {
    plural: "statefulsets",
    kind: "StatefulSet",
    group: "apps",
    api_version: "apps/v1",
    workload: Some(WorkloadKind::StatefulSet),
};

impl Resource {
    pub(super) fn lookup(group: &str, plural: &str) -> Option<&'static Resource> {
        [&SECRETS, &DEPLOYMENTS, &STATEFULSETS]
            .into_iter()
            .find(|r| r.group == group && r.plural == plural)
    }

    /// "secrets" / "deployments.apps", as used in NotFound and Conflict messages.
    pub(super) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// "Secret" / "Deployment.apps", as used in Invalid messages.
    pub(super) fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `details` of NotFound / Conflict / Forbidden statuses: the plural resource as "kind".
    pub(super) fn details(&self, name: &str) -> Value {
        let mut d = json!({ "name": name, "kind": self.plural });
        if !self.group.is_empty() {
            d["group"] = json!(self.group);
        }
        d
    }
}

impl WorkloadKind {
    pub(super) fn resource(self) -> &'static Resource {
        match self {
            WorkloadKind::Deployment => &DEPLOYMENTS,
            WorkloadKind::StatefulSet => &STATEFULSETS,
        }
    }
}

pub(super) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch or body: {e}")))
}

pub(super) fn parse_object(res: &Resource, body: &[u8]) -> Result<Value, ApiError> {
    let v = serde_json::from_slice::<Value>(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    if !v.is_object() {
        return Err(ApiError::undecodable(res, "expected a JSON object"));
    }
    Ok(v)
}

pub(super) fn check_body_namespace(obj: &mut Value, ns: &str) -> Result<(), ApiError> {
    match meta_str(obj, "namespace") {
        "" => {
            obj_field(obj, "metadata").insert("namespace".into(), json!(ns));
            Ok(())
        }
        x if x == ns => Ok(()),
        _ => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
    }
}

pub(super) fn check_name_unchanged(obj: &Value, name: &str) -> Result<(), ApiError> {
    match meta_str(obj, "name") {
        "" => Ok(()),
        x if x == name => Ok(()),
        x => Err(ApiError::bad_request(format!(
            "the name of the object ({x}) does not match the name on the URL ({name})"
        ))),
    }
}

/// resourceVersion and uid in the written object act as preconditions.
pub(super) fn check_preconditions(
    res: &Resource,
    name: &str,
    new: &Value,
    existing: &Value,
) -> Result<(), ApiError> {
    let rv = meta_str(new, "resourceVersion");
    if !rv.is_empty() && rv != meta_str(existing, "resourceVersion") {
        return Err(ApiError::conflict(res, name));
    }
    let uid = meta_str(new, "uid");
    let existing_uid = meta_str(existing, "uid");
    if !uid.is_empty() && uid != existing_uid {
        let why = format!(
            "Precondition failed: UID in precondition: {uid}, UID in object meta: {existing_uid}"
        );
        return Err(ApiError::conflict_with(res, name, &why));
    }
    Ok(())
}

/// Decodes through the k8s-openapi type and re-encodes, which is what the real
/// server's decoder does: unknown fields vanish, type errors are 400s.
pub(super) fn roundtrip(res: &Resource, obj: &Value) -> Result<Value, ApiError> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core};
    fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(
        res: &Resource,
        obj: &Value,
    ) -> Result<Value, ApiError> {
        let typed: T =
            serde_json::from_value(obj.clone()).map_err(|e| ApiError::undecodable(res, e))?;
        Ok(serde_json::to_value(typed).expect("k8s-openapi types serialise"))
    }
    match res.workload {
        None => rt::<core::Secret>(res, obj),
        Some(WorkloadKind::Deployment) => rt::<apps::Deployment>(res, obj),
        Some(WorkloadKind::StatefulSet) => rt::<apps::StatefulSet>(res, obj),
    }
}

/// Dotted paths present (non-null) in `input` but not in the decoded `output`.
pub(super) fn unknown_fields(input: &Value, output: &Value, prefix: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match o.get(k) {
                    None if !v.is_null() => out.push(path),
                    Some(ov) => unknown_fields(v, ov, &path, out),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (idx, (iv, ov)) in i.iter().zip(o).enumerate() {
                unknown_fields(iv, ov, &format!("{prefix}[{idx}]"), out);
            }
        }
        _ => {}
    }
}

/// base64 as Go's `encoding/json` decodes `[]byte`: standard alphabet, padding
/// required, non-zero trailing bits tolerated, CR/LF ignored.
pub(super) const GO_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireCanonical),
);

pub(super) fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(super) fn b64_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let cleaned: String = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    GO_BASE64.decode(cleaned)
}

/// Canonicalises `data` (decode + re-encode, as the server stores bytes) and folds
/// `stringData` into it; `stringData` itself is never stored.
pub(super) fn fold_secret_data(res: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    let o = obj.as_object_mut().unwrap();
    let mut data = match o.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::undecodable(
                res,
                "json: cannot unmarshal data into Go struct field Secret.data",
            ))
        }
    };
    for (k, v) in data.iter_mut() {
        let bytes = match v {
            Value::Null => Vec::new(),
            Value::String(s) => b64_decode(s).map_err(|e| {
                ApiError::undecodable(res, format!("illegal base64 data in data[{k}]: {e}"))
            })?,
            _ => {
                return Err(ApiError::undecodable(
                    res,
                    format!("json: cannot unmarshal data[{k}] into a []byte"),
                ))
            }
        };
        *v = json!(b64_encode(&bytes));
    }
    match o.remove("stringData") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let s = v.as_str().ok_or_else(|| {
                    ApiError::undecodable(res, format!("stringData[{k}] must be a string"))
                })?;
                data.insert(k, json!(b64_encode(s.as_bytes())));
            }
        }
        Some(_) => return Err(ApiError::undecodable(res, "stringData must be an object")),
    }
    // `data` is omitempty: an empty map is not stored.
    if !data.is_empty() {
        o.insert("data".into(), Value::Object(data));
    }
    Ok(())
}

pub(super) fn validate_secret(obj: &Value, existing: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let data = obj
        .get("data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut total = 0usize;
    for (k, v) in &data {
        let valid = !k.is_empty()
            && k.len() <= 253
            && k != "."
            && k != ".."
            && !k.starts_with("..")
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !valid {
            errors.push(FieldError::invalid(
                &format!("data[{k}]"),
                &json!(k),
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or \
                 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
            ));
        }
        total += v
            .as_str()
            .and_then(|s| b64_decode(s).ok())
            .map_or(0, |b| b.len());
    }
    if total > 1024 * 1024 {
        errors.push(FieldError {
            field: "data".into(),
            reason: "FieldValueTooLong",
            detail: "Too long: must have at most 1048576 bytes".into(),
        });
    }
    let Some(old) = existing else { return errors };
    if obj.get("type") != old.get("type") {
        errors.push(FieldError::invalid(
            "type",
            obj.get("type").unwrap_or(&Value::Null),
            "field is immutable",
        ));
    }
    if old.get("immutable") == Some(&Value::Bool(true)) {
        if obj.get("data") != old.get("data") {
            errors.push(FieldError::forbidden(
                "data",
                "field is immutable when `immutable` is set",
            ));
        }
        if obj.get("immutable") != Some(&Value::Bool(true)) {
            errors.push(FieldError::forbidden(
                "immutable",
                "field is immutable when `immutable` is set",
            ));
        }
    }
    errors
}

pub(super) fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `obj[field]` as a mutable map, created (or replacing a non-object) if needed.
pub(super) fn obj_field<'a>(obj: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    obj_field_of(obj.as_object_mut().unwrap(), field)
}

pub(super) fn obj_field_of<'a>(
    map: &'a mut Map<String, Value>,
    field: &str,
) -> &'a mut Map<String, Value> {
    let slot = map.entry(field.to_string()).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().unwrap()
}

/// Renders a value roughly as Go's `%#v` would in validation messages.
pub(super) fn go_value(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{:?}:{}", k, go_value(v)))
                .collect();
            format!("map[string]string{{{}}}", parts.join(", "))
        }
        other => other.to_string(),
    }
}

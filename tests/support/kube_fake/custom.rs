//! Custom resources in the fake: ESO `ExternalSecret`s (external-secrets.io, at the versions the
//! chosen ESO release serves, see [`EsoRelease`]) and Bitnami `SealedSecret`s
//! (bitnami.com/v1alpha1), namespaced, with get and merge patch.
//!
//! Like the real server for a CRD with a status subresource: strategic merge patch is refused
//! (415), writes never change `status`, a spec change bumps `generation`, every change bumps the
//! global `resourceVersion`, and a stale `resourceVersion` is a 409.
//!
//! The sealed-secrets controller is simulated here (lazily, like the workload controller):
//! a change of `spec.encryptedData` is unsealed with the test's private key into the Secret of
//! the same name after a delay. The ESO controller is not: the test drives it through
//! [`KubeFake::external_secret`] and [`KubeFake::complete_external_sync`], because its upstream
//! is a real OpenBao that the fake (synchronous, behind a mutex) should not call.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rsa::{Oaep, RsaPrivateKey};
use serde_json::{json, Map, Value};

use axum::http::Method;

use super::http::{ApiError, ApiResult, Incoming, Reply};
use super::objects::{
    b64_encode, meta_str, obj_field, obj_field_of, parse_json, validate_secret, SECRETS,
};
use super::patch::merge_patch;
use super::{key, KubeFake, State};

pub(super) struct CustomKind {
    pub group: &'static str,
    /// Every version a CRD of some release defines; which are served is decided per request.
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub kind: &'static str,
}

pub(super) static EXTERNAL_SECRETS: CustomKind = CustomKind {
    group: "external-secrets.io",
    versions: &["v1", "v1beta1", "v1alpha1"],
    plural: "externalsecrets",
    kind: "ExternalSecret",
};
pub(super) static SEALED_SECRETS: CustomKind = CustomKind {
    group: "bitnami.com",
    versions: &["v1alpha1"],
    plural: "sealedsecrets",
    kind: "SealedSecret",
};

/// Which ExternalSecret versions the API server serves, as installed by an ESO release's CRD
/// (external-secrets/external-secrets config/crds/bases/external-secrets.io_externalsecrets.yaml
/// at each tag; v1beta1 was unserved by "chore: unserve v1beta1 and mark it as deprecated",
/// #4758, first released in v0.17.0).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum EsoRelease {
    /// v0.15 and older: v1alpha1 and v1beta1 (storage); no v1.
    V0_15,
    /// v0.16: v1 (storage) and v1beta1, both served.
    V0_16,
    /// v0.17 and later: v1 only (`served: false` on v1beta1).
    #[default]
    Current,
}

impl EsoRelease {
    /// Served versions, newest first (the order discovery lists them in).
    pub fn served(self) -> &'static [&'static str] {
        match self {
            EsoRelease::V0_15 => &["v1beta1", "v1alpha1"],
            EsoRelease::V0_16 => &["v1", "v1beta1"],
            EsoRelease::Current => &["v1"],
        }
    }
}

impl CustomKind {
    pub(super) fn lookup(group: &str, version: &str) -> Option<&'static CustomKind> {
        [&EXTERNAL_SECRETS, &SEALED_SECRETS]
            .into_iter()
            .find(|k| k.group == group && k.versions.contains(&version))
    }

    fn api_version(&self, version: &str) -> String {
        format!("{}/{version}", self.group)
    }

    fn qualified(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", self.qualified()),
            Some(json!({ "name": name, "group": self.group, "kind": self.plural })),
        )
    }

    fn conflict(&self, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                self.qualified()
            ),
            Some(json!({ "name": name, "group": self.group, "kind": self.plural })),
        )
    }
}

/// How the simulated sealed-secrets controller behaves.
pub enum Unsealer {
    /// Unseals with the test's private key, `delay` after a change.
    Running {
        private_key: Box<RsaPrivateKey>,
        delay: Duration,
    },
    /// Scaled to zero: nothing is ever unsealed.
    Stopped,
}

#[derive(Default)]
pub(super) struct Custom {
    objects: BTreeMap<(&'static str, String, String), Value>,
    unsealer: Option<Unsealer>,
    /// SealedSecrets whose spec changed and are waiting for the controller: (due, ns, name).
    pending: Vec<(Instant, String, String)>,
    eso: EsoRelease,
}

impl KubeFake {
    /// Serves ExternalSecrets at the versions `release` serves (default: the current one).
    pub fn serve_eso(&self, release: EsoRelease) {
        self.lock().custom.eso = release;
    }

    /// Creates an ExternalSecret (as a GitOps tool would) whose target Secret is `secret`.
    pub fn add_external_secret(&self, ns: &str, name: &str, spec: Value) {
        self.lock()
            .insert_custom(&EXTERNAL_SECRETS, ns, name, json!({ "spec": spec }));
    }

    pub fn external_secret(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .custom
            .objects
            .get(&(EXTERNAL_SECRETS.plural, ns.into(), name.into()))
            .cloned()
    }

    /// Sets an annotation, as `kubectl annotate` would (a metadata change: no new generation).
    pub fn patch_external_secret_annotation(&self, ns: &str, name: &str, key: &str, value: &str) {
        let mut st = self.lock();
        let rv = st.next_rv();
        let es = st
            .custom
            .objects
            .get_mut(&(EXTERNAL_SECRETS.plural, ns.into(), name.into()))
            .unwrap_or_else(|| panic!("no ExternalSecret {ns}/{name}"));
        let meta = obj_field(es, "metadata");
        meta.insert("resourceVersion".into(), json!(rv));
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        annotations[key] = json!(value);
    }

    /// What ESO does after fetching: writes the target Secret's data (owner policy: the whole
    /// data), then records `status.refreshTime` and `status.syncedResourceVersion`, which is
    /// `synced` (ESO's `GetResourceVersion` of the ExternalSecret it reconciled).
    pub fn complete_external_sync(
        &self,
        ns: &str,
        name: &str,
        data: &BTreeMap<String, String>,
        synced: &str,
    ) {
        let mut st = self.lock();
        let es = st.external_secret_object(ns, name);
        let target = es
            .pointer("/spec/target/name")
            .and_then(Value::as_str)
            .unwrap_or(name)
            .to_string();
        let encoded: Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.clone(), json!(b64_encode(v.as_bytes()))))
            .collect();
        let unchanged = st
            .secrets
            .get(&key(ns, &target))
            .and_then(|s| s.get("data"))
            == Some(&Value::Object(encoded.clone()));
        if !unchanged {
            st.put_secret(ns, &target, encoded);
        }
        let now = st.now_string();
        st.set_custom_status(
            &EXTERNAL_SECRETS,
            ns,
            name,
            json!({
                "refreshTime": now,
                "syncedResourceVersion": synced,
                "conditions": [{ "type": "Ready", "status": "True", "reason": "SecretSynced",
                                 "message": "Secret was synced", "lastTransitionTime": now }],
            }),
        );
    }

    /// What ESO's `markAsFailed` leaves when a reconcile fails (external-secrets
    /// pkg/controllers/externalsecret/externalsecret_controller.go; `SetExternalSecretCondition`
    /// in util.go): the Ready condition False with `reason` and `message`, its transition time
    /// kept when it was False already; `refreshTime` and `syncedResourceVersion` untouched, and
    /// the target Secret not written.
    pub fn fail_external_sync(&self, ns: &str, name: &str, reason: &str, message: &str) {
        let mut st = self.lock();
        let mut status = st.external_secret_object(ns, name)["status"].clone();
        if !status.is_object() {
            status = json!({});
        }
        let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
        let previous = conditions.iter().find(|c| c["type"] == "Ready");
        // The same condition again: nothing to update (no new resourceVersion either).
        let same = previous.is_some_and(|c| {
            c["status"] == "False" && c["reason"] == reason && c["message"] == message
        });
        if same {
            return;
        }
        let transition = match previous {
            Some(c) if c["status"] == "False" => c["lastTransitionTime"].clone(),
            _ => json!(st.now_string()),
        };
        let mut kept: Vec<Value> = conditions
            .iter()
            .filter(|c| c["type"] != "Ready")
            .cloned()
            .collect();
        kept.push(
            json!({ "type": "Ready", "status": "False", "reason": reason,
                          "message": message, "lastTransitionTime": transition }),
        );
        status["conditions"] = Value::Array(kept);
        st.set_custom_status(&EXTERNAL_SECRETS, ns, name, status);
    }

    /// Creates a SealedSecret with the given (already sealed) `spec.encryptedData` and
    /// annotations on it (and its template, as kubeseal writes them), e.g. `sealedsecrets.bitnami.com/namespace-wide: "true"`.
    pub fn add_scoped_sealed_secret(
        &self,
        ns: &str,
        name: &str,
        annotations: &[(&str, &str)],
        encrypted: &[(&str, &str)],
    ) {
        let data: Map<String, Value> = encrypted
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let annotations: Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut st = self.lock();
        st.insert_custom(
            &SEALED_SECRETS,
            ns,
            name,
            json!({ "spec": { "encryptedData": data, "template": { "metadata": { "name": name, "namespace": ns, "annotations": annotations } } } }),
        );
        if !annotations.is_empty() {
            let obj = st
                .custom
                .objects
                .get_mut(&(SEALED_SECRETS.plural, ns.into(), name.into()))
                .unwrap();
            obj["metadata"]["annotations"] = Value::Object(annotations);
        }
        // The controller sees the new object like any change.
        st.custom
            .pending
            .push((Instant::now(), ns.into(), name.into()));
    }

    /// Replaces `spec.encryptedData` as `kubectl apply` of another manifest would (a GitOps
    /// sync): the spec changes, so the generation moves and the controller unseals it.
    pub fn apply_sealed_secret(&self, ns: &str, name: &str, encrypted: &[(&str, &str)]) {
        self.edit_sealed_secret(ns, name, |obj| {
            for (k, v) in encrypted {
                obj["spec"]["encryptedData"][*k] = json!(v);
            }
        });
    }

    /// Changes SealedSecret `ns/name` with `edit` as a `kubectl apply` would: the generation
    /// moves and the controller unseals it.
    pub fn edit_sealed_secret(&self, ns: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut st = self.lock();
        let rv = st.next_rv();
        let obj = st
            .custom
            .objects
            .get_mut(&(SEALED_SECRETS.plural, ns.into(), name.into()))
            .unwrap_or_else(|| panic!("no SealedSecret {ns}/{name}"));
        edit(obj);
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(generation);
        obj["metadata"]["resourceVersion"] = json!(rv);
        let delay = match &st.custom.unsealer {
            Some(Unsealer::Running { delay, .. }) => *delay,
            _ => Duration::ZERO,
        };
        st.custom
            .pending
            .push((Instant::now() + delay, ns.into(), name.into()));
    }

    pub fn sealed_secret(&self, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.lock();
        st.run_unsealer();
        st.custom
            .objects
            .get(&(SEALED_SECRETS.plural, ns.into(), name.into()))
            .cloned()
    }

    pub fn set_unsealer(&self, unsealer: Unsealer) {
        self.lock().custom.unsealer = Some(unsealer);
    }

    /// The Secret the controller unsealed from SealedSecret `ns/name` (which must exist):
    /// `data`, and the controller reference `Unseal` gives it
    /// (pkg/apis/sealedsecrets/v1alpha1/sealedsecret_expansion.go).
    pub fn put_unsealed_secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        self.put_secret(ns, name, data);
        let mut st = self.lock();
        let sealed = st
            .custom
            .objects
            .get(&(SEALED_SECRETS.plural, ns.into(), name.into()))
            .cloned()
            .expect("the SealedSecret exists");
        let secret = st.secrets.get_mut(&key(ns, name)).expect("just put");
        obj_field(secret, "metadata").insert("ownerReferences".into(), controller_ref(&sealed));
    }

    /// Sets annotation `name` to `value` on Secret `ns/secret` (as `kubectl annotate` would).
    pub fn annotate_secret(&self, ns: &str, secret: &str, name: &str, value: &str) {
        self.edit_secret(ns, secret, |object| {
            let annotations = obj_field_of(obj_field(object, "metadata"), "annotations");
            annotations.insert(name.into(), json!(value));
        });
    }

    /// Changes Secret `ns/name` with `edit`, as a write from elsewhere would (a new
    /// resourceVersion, no validation: set up what a test needs).
    pub fn edit_secret(&self, ns: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut st = self.lock();
        let rv = st.next_rv();
        let object = st
            .secrets
            .get_mut(&key(ns, name))
            .expect("the Secret exists");
        edit(object);
        obj_field(object, "metadata").insert("resourceVersion".into(), json!(rv));
    }
}

/// A `spec.template.data` value as `Unseal` renders it with the unsealed values, for the one
/// form of Go template a test writes here: `{{ .key }}` (anything else is kept literally).
fn render_template(template: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = template.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{{ .{k} }}}}"), v);
    }
    out
}

/// The owner reference `Unseal` gives the Secret it makes
/// (pkg/apis/sealedsecrets/v1alpha1/sealedsecret_expansion.go).
fn controller_ref(sealed_secret: &Value) -> Value {
    json!([{
        "apiVersion": "bitnami.com/v1alpha1",
        "kind": "SealedSecret",
        "name": sealed_secret["metadata"]["name"],
        "uid": sealed_secret["metadata"]["uid"],
        "controller": true,
    }])
}

/// Whether the controller may write Secret `secret` for SealedSecret `sealed_secret`: it
/// controls it, or the Secret is annotated to be managed or patched (pkg/controller/controller.go
/// `unseal`: `IsControlledBy`, `isAnnotatedToBeManaged`, `isAnnotatedToBePatched`).
fn may_unseal_into(secret: &Value, sealed_secret: &Value) -> bool {
    let uid = &sealed_secret["metadata"]["uid"];
    let controlled = secret["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["controller"] == json!(true) && &r["uid"] == uid);
    controlled || annotated(secret, "managed") || annotated(secret, "patch")
}

fn annotated(secret: &Value, name: &str) -> bool {
    secret["metadata"]["annotations"][format!("sealedsecrets.bitnami.com/{name}")] == json!("true")
}

impl State {
    /// ExternalSecret `ns/name` as stored; a test that names one that does not exist is wrong.
    fn external_secret_object(&self, ns: &str, name: &str) -> Value {
        self.custom
            .objects
            .get(&(EXTERNAL_SECRETS.plural, ns.into(), name.into()))
            .cloned()
            .unwrap_or_else(|| panic!("no ExternalSecret {ns}/{name}"))
    }

    fn insert_custom(&mut self, kind: &CustomKind, ns: &str, name: &str, mut obj: Value) {
        let rv = self.next_rv();
        let now = self.now_string();
        let o = obj.as_object_mut().expect("an object");
        o.insert(
            "apiVersion".into(),
            json!(kind.api_version(kind.versions[0])),
        );
        o.insert("kind".into(), json!(kind.kind));
        o.insert(
            "metadata".into(),
            json!({ "name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(),
                    "creationTimestamp": now, "generation": 1, "resourceVersion": rv }),
        );
        self.custom
            .objects
            .insert((kind.plural, ns.into(), name.into()), obj);
    }

    fn set_custom_status(&mut self, kind: &CustomKind, ns: &str, name: &str, status: Value) {
        let rv = self.next_rv();
        if let Some(obj) = self
            .custom
            .objects
            .get_mut(&(kind.plural, ns.into(), name.into()))
        {
            obj["status"] = status;
            obj_field(obj, "metadata").insert("resourceVersion".into(), json!(rv));
        }
    }

    /// The served versions of a kind.
    fn served(&self, kind: &CustomKind) -> &'static [&'static str] {
        match kind.plural == EXTERNAL_SECRETS.plural {
            true => self.custom.eso.served(),
            false => kind.versions,
        }
    }

    /// Discovery's APIGroup entries: only served versions are listed, the newest preferred
    /// (kubernetes apiextensions-apiserver pkg/apiserver/customresource_discovery_controller.go).
    pub(super) fn custom_groups(&self) -> Vec<Value> {
        [&EXTERNAL_SECRETS, &SEALED_SECRETS]
            .into_iter()
            .map(|kind| {
                let versions: Vec<Value> = self
                    .served(kind)
                    .iter()
                    .map(|v| json!({ "groupVersion": kind.api_version(v), "version": v }))
                    .collect();
                json!({ "name": kind.group, "versions": versions, "preferredVersion": versions[0] })
            })
            .collect()
    }

    /// Serves a request for a custom resource (status writes are the controllers' job).
    pub(super) fn custom_request(
        &mut self,
        kind: &'static CustomKind,
        version: &str,
        ns: Option<&str>,
        name: Option<&str>,
        subresource: Option<&str>,
        req: &Incoming,
    ) -> ApiResult {
        // The CRD handler passes a request for a version that is not served to the next
        // handler, which answers 404 (apiextensions-apiserver customresource_handler.go).
        if !self.served(kind).contains(&version) {
            return Err(ApiError::no_route());
        }
        let (Some(ns), Some(name), None) = (ns, name, subresource) else {
            return Err(ApiError::method_not_allowed());
        };
        let id = (kind.plural, ns.to_string(), name.to_string());
        let mut existing = self
            .custom
            .objects
            .get(&id)
            .cloned()
            .ok_or_else(|| kind.not_found(name))?;
        // Versions of these kinds share one schema: conversion only changes apiVersion.
        existing["apiVersion"] = json!(kind.api_version(version));
        let mut new = match req.method {
            Method::GET => return Ok(Reply::ok(existing)),
            Method::PUT => return Err(ApiError::unsupported("update")),
            Method::PATCH => {
                let media = req.content_type.as_deref().unwrap_or("");
                let patch = parse_json(&req.body)?;
                let mut doc = existing.clone();
                match media.split(';').next().unwrap_or("").trim() {
                    "application/merge-patch+json" => merge_patch(&mut doc, &patch),
                    "application/json-patch+json" => {
                        return Err(ApiError::unsupported("JSON patch"))
                    }
                    // Custom resources have no strategic merge schema.
                    _ => return Err(ApiError::unsupported_media_type(true)),
                }
                doc
            }
            _ => return Err(ApiError::method_not_allowed()),
        };
        let rv = meta_str(&new, "resourceVersion");
        if !rv.is_empty() && rv != meta_str(&existing, "resourceVersion") {
            return Err(kind.conflict(name));
        }
        if meta_str(&new, "name") != name {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        // Server-owned fields are restored; status is a subresource.
        let o = new
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("expected a JSON object"))?;
        o.insert("apiVersion".into(), json!(kind.api_version(version)));
        o.insert("kind".into(), json!(kind.kind));
        o.remove("status");
        if let Some(status) = existing.get("status") {
            o.insert("status".into(), status.clone());
        }
        let meta = obj_field(&mut new, "metadata");
        for field in [
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "namespace",
        ] {
            match existing.pointer(&format!("/metadata/{field}")) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        if new == existing {
            return Ok(Reply::ok(existing));
        }
        let spec_changed = new.get("spec") != existing.get("spec");
        if spec_changed {
            let generation = existing
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            obj_field(&mut new, "metadata").insert("generation".into(), json!(generation + 1));
        }
        let rv = self.next_rv();
        obj_field(&mut new, "metadata").insert("resourceVersion".into(), json!(rv));
        self.custom.objects.insert(id, new.clone());
        if spec_changed && kind.plural == SEALED_SECRETS.plural {
            let delay = match &self.custom.unsealer {
                Some(Unsealer::Running { delay, .. }) => *delay,
                _ => Duration::ZERO,
            };
            self.custom
                .pending
                .push((Instant::now() + delay, ns.into(), name.into()));
        }
        Ok(Reply::ok(new))
    }

    /// The controller's write of an unsealed Secret (pkg/controller/controller.go `unseal`): a
    /// new Secret as `Unseal` makes it (`immutable` from the template), or the existing one
    /// updated: with `patch` the unsealed keys merged into its data, otherwise its data
    /// replaced; the controller reference set unless only patching (the update copies neither
    /// `immutable` nor anything else). The API server validates it as any write: an error is
    /// what `Synced` reports. Nothing is written when nothing would change.
    fn write_unsealed(
        &mut self,
        ns: &str,
        name: &str,
        unsealed: Map<String, Value>,
        existing: Option<&Value>,
        sealed_secret: &Value,
    ) -> Result<(), String> {
        let patch = existing.is_some_and(|s| annotated(s, "patch"));
        let mut data = match existing.and_then(|s| s["data"].as_object()) {
            Some(current) if patch => current.clone(),
            _ => Map::new(),
        };
        data.extend(unsealed);
        let owners = match existing {
            Some(s) if patch && !annotated(s, "managed") => {
                s["metadata"]["ownerReferences"].clone()
            }
            _ => controller_ref(sealed_secret),
        };
        let unchanged = existing.is_some_and(|s| {
            s.get("data") == Some(&Value::Object(data.clone()))
                && s["metadata"]["ownerReferences"] == owners
        });
        if unchanged {
            return Ok(());
        }
        let mut candidate = existing.cloned().unwrap_or_else(|| {
            let immutable = &sealed_secret["spec"]["template"]["immutable"];
            json!({ "type": "Opaque", "immutable": immutable })
        });
        candidate["data"] = Value::Object(data.clone());
        let errors = validate_secret(&candidate, existing);
        if !errors.is_empty() {
            return Err(ApiError::invalid(&SECRETS, name, errors).message);
        }
        self.put_secret(ns, name, data);
        let secret = self.secrets.get_mut(&key(ns, name)).expect("just put");
        if existing.is_none() && candidate["immutable"] == json!(true) {
            secret["immutable"] = json!(true);
        }
        let metadata = obj_field(secret, "metadata");
        if owners.is_null() {
            metadata.remove("ownerReferences");
        } else {
            metadata.insert("ownerReferences".into(), owners);
        }
        Ok(())
    }

    /// The sealed-secrets controller: unseals every SealedSecret whose change is due into the
    /// Secret of the same name, and reports it in `status`.
    pub(super) fn run_unsealer(&mut self) {
        let Some(Unsealer::Running { private_key, .. }) = &self.custom.unsealer else {
            return;
        };
        let private_key = private_key.clone();
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.custom.pending)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.custom.pending = waiting;
        for (_, ns, name) in due {
            let Some(obj) = self
                .custom
                .objects
                .get(&(SEALED_SECRETS.plural, ns.clone(), name.clone()))
                .cloned()
            else {
                continue;
            };
            let encrypted = obj
                .pointer("/spec/encryptedData")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let mut data = Map::new();
            let mut plain_values = BTreeMap::new();
            let mut failure = None;
            let label = label_for(&obj);
            for (k, v) in &encrypted {
                match unseal_with_label(&private_key, &label, v.as_str().unwrap_or("")) {
                    Ok(plain) => {
                        data.insert(k.clone(), json!(b64_encode(&plain)));
                        plain_values
                            .insert(k.clone(), String::from_utf8_lossy(&plain).into_owned());
                    }
                    Err(e) => failure = Some(format!("no key could decrypt secret ({k}): {e}")),
                }
            }
            // `Unseal` renders `spec.template.data` after `encryptedData`: its keys win.
            for (k, template) in obj["spec"]["template"]["data"]
                .as_object()
                .into_iter()
                .flatten()
            {
                let rendered = render_template(template.as_str().unwrap_or(""), &plain_values);
                data.insert(k.clone(), json!(b64_encode(rendered.as_bytes())));
            }
            let existing = self.secrets.get(&key(&ns, &name)).cloned();
            if failure.is_none() && existing.as_ref().is_some_and(|s| !may_unseal_into(s, &obj)) {
                failure = Some(format!(
                    "failed update: Resource \"{name}\" already exists and is not managed by SealedSecret"
                ));
            }
            let generation = obj.pointer("/metadata/generation").cloned();
            let now = self.now_string();
            if failure.is_none() {
                failure = self
                    .write_unsealed(&ns, &name, data, existing.as_ref(), &obj)
                    .err();
            }
            let condition = match &failure {
                None => json!({ "type": "Synced", "status": "True", "lastUpdateTime": now }),
                Some(message) => {
                    json!({ "type": "Synced", "status": "False", "reason": "ErrUnsealFailed", "message": message, "lastUpdateTime": now })
                }
            };
            self.set_custom_status(
                &SEALED_SECRETS,
                &ns,
                &name,
                json!({ "observedGeneration": generation, "conditions": [condition] }),
            );
        }
    }
}

/// The controller's `labelFor` (pkg/apis/sealedsecrets/v1alpha1/sealedsecret_expansion.go:
/// `SecretScope` of the SealedSecret's own metadata, then `EncryptionLabel`): cluster-wide
/// wins over namespace-wide, and only the value "true" counts.
pub fn label_for(sealed_secret: &Value) -> String {
    let meta = &sealed_secret["metadata"];
    let on = |key: &str| meta["annotations"][key] == json!("true");
    let ns = meta["namespace"].as_str().unwrap_or("");
    if on("sealedsecrets.bitnami.com/cluster-wide") {
        String::new()
    } else if on("sealedsecrets.bitnami.com/namespace-wide") {
        ns.to_string()
    } else {
        format!("{ns}/{}", meta["name"].as_str().unwrap_or(""))
    }
}

/// [`unseal_with_label`] for the strict scope.
pub fn unseal(key: &RsaPrivateKey, ns: &str, name: &str, b64: &str) -> Result<Vec<u8>, String> {
    unseal_with_label(key, &format!("{ns}/{name}"), b64)
}

/// The controller's HybridDecrypt (pkg/crypto/crypto.go), written independently of the rotator's
/// sealing of one `spec.encryptedData` value.
pub fn unseal_with_label(key: &RsaPrivateKey, label: &str, b64: &str) -> Result<Vec<u8>, String> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("not base64: {e}"))?;
    if data.len() < 2 {
        return Err("too short".into());
    }
    let rsa_len = u16::from_be_bytes([data[0], data[1]]) as usize;
    let rsa = data.get(2..2 + rsa_len).ok_or("too short")?;
    let session = key
        .decrypt(Oaep::new_with_label::<sha2::Sha256, _>(label), rsa)
        .map_err(|e| format!("RSA-OAEP: {e}"))?;
    Aes256Gcm::new_from_slice(&session)
        .map_err(|_| "session key is not 32 bytes".to_string())?
        .decrypt(Nonce::from_slice(&[0; 12]), &data[2 + rsa_len..])
        .map_err(|_| "AES-GCM: authentication failed".to_string())
}

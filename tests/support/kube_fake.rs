//! In-process fake of the Kubernetes API server, for tests that drive a real
//! `kube::Client`.
//!
//! The fake serves plain HTTP on 127.0.0.1 (OS-chosen port) and implements the
//! small slice of the API the rotator touches: core/v1 Secrets and apps/v1
//! Deployments and StatefulSets. It tries hard to behave like the real
//! kube-apiserver (v1.31) on that slice, because production code is tested
//! against it:
//!
//! * one global, monotonically increasing `resourceVersion`, bumped on every
//!   write that changes an object (no-op writes do not bump it, like the real
//!   server);
//! * optimistic concurrency: PUT / PATCH / DELETE carrying a stale
//!   `resourceVersion` (or a foreign `uid`) get 409 Conflict;
//! * JSON merge patch, strategic merge patch (maps merge recursively, known
//!   lists merge by key), JSON patch, and an approximation of server-side
//!   apply;
//! * decoding like the real server: unknown fields are pruned (with a
//!   `Warning` header, or 400 under `fieldValidation=Strict`), type errors are
//!   400, defaults are filled in, validation errors are 422 with a `Status`
//!   body shaped like the real one;
//! * Secret `stringData` folded into `data`, base64 checked and canonicalised;
//! * a simulated workload controller: `generation` / `observedGeneration`,
//!   rolling-update status during a rollout, `ProgressDeadlineExceeded`,
//!   paused Deployments, StatefulSet revisions / partitions / `OnDelete`;
//!   status changes made by that controller are writes too (they bump
//!   `resourceVersion`), so a GET-modify-PUT racing a rollout conflicts just as
//!   it would against a real cluster;
//! * fault injection and a request log for assertions.
//!
//! The controller is simulated lazily: the status is recomputed from recorded
//! `Instant`s whenever an object is read or written, so there are no background
//! tasks and results depend only on elapsed time.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

#[path = "kube_fake/custom.rs"]
mod custom;
#[path = "kube_fake/events.rs"]
mod events;
#[allow(unused_imports)]
pub use custom::{label_for, unseal, unseal_with_label, EsoRelease, Unsealer};

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// Where the TokenReview API lives (what Vault's Kubernetes auth calls).
pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The bearer token the written kubeconfig carries, so tests can check it is never logged.
pub const TOKEN: &str = "fake-token-5f1c9a";

/// The annotation `kubectl rollout restart` writes into the pod template.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// A running fake API server. Dropping it stops the server.
pub struct KubeFake {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
}

#[derive(Clone, Debug)]
pub enum Rollout {
    /// After a pod-template change, the new replicas become ready/available after this delay.
    ReadyAfter(Duration),
    /// The rollout never completes; after `deadline` the Deployment gets condition
    /// Progressing=False reason ProgressDeadlineExceeded (StatefulSets just never become ready).
    Stuck { deadline: Duration },
}

/// One request as the fake saw it (faulted ones included).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// URL path without the query string.
    pub path: String,
    /// get, list, watch, update, patch, create, delete, deletecollection.
    pub verb: String,
    /// secrets, deployments, statefulsets ("" for discovery, the raw segment for unknown resources).
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub content_type: Option<String>,
    /// Raw query string ("" when absent), e.g. `fieldManager=rotator&dryRun=All`.
    pub query: String,
    /// The request body parsed as JSON, when it was JSON.
    pub body: Option<Value>,
    /// HTTP status code the fake answered with.
    pub status: u16,
}

/// An error to return instead of handling matching requests. `None` matches anything.
#[derive(Clone, Debug)]
pub struct Fault {
    /// "PUT", "PATCH", "GET", ... (case-insensitive).
    pub method: Option<String>,
    /// "secrets", "deployments", "statefulsets".
    pub resource: Option<String>,
    pub name: Option<String>,
    /// 409, 500, 403, 429, 503, 504, ...
    pub status: u16,
    /// How many matching requests get the error.
    pub times: usize,
}

impl Fault {
    /// A fault with the given status that matches any request, once.
    pub fn new(status: u16) -> Fault {
        Fault {
            method: None,
            resource: None,
            name: None,
            status,
            times: 1,
        }
    }
    pub fn method(mut self, method: &str) -> Fault {
        self.method = Some(method.to_string());
        self
    }
    pub fn resource(mut self, resource: &str) -> Fault {
        self.resource = Some(resource.to_string());
        self
    }
    pub fn name(mut self, name: &str) -> Fault {
        self.name = Some(name.to_string());
        self
    }
    pub fn times(mut self, times: usize) -> Fault {
        self.times = times;
        self
    }

    fn matches(&self, r: &RequestRecord) -> bool {
        self.times > 0
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&r.method))
            && self.resource.as_deref().is_none_or(|x| x == r.resource)
            && self.name.as_deref().is_none_or(|x| x == r.name)
    }
}

impl KubeFake {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start() -> KubeFake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake apiserver");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::new(addr)));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        KubeFake {
            state,
            addr,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig` (cluster = this fake, dummy bearer token, namespace "default").
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\n",
            url = self.url()
        );
        std::fs::write(&path, yaml).expect("write kubeconfig");
        path
    }

    pub async fn client(&self) -> kube::Client {
        let uri = self.url().parse().expect("fake url is a valid uri");
        kube::Client::try_from(kube::Config::new(uri)).expect("kube client for fake")
    }

    // ----- Secrets -------------------------------------------------------

    /// Creates or replaces a Secret's `data` (values given as UTF-8 strings).
    pub fn put_secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        let data: Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(b64_encode(v.as_bytes()))))
            .collect();
        self.lock().put_secret(ns, name, data);
    }

    /// The Secret's `data`, decoded (lossily) as UTF-8.
    pub fn secret(&self, ns: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let mut st = self.lock();
        st.run_unsealer();
        let obj = st.secrets.get(&key(ns, name))?;
        let mut out = BTreeMap::new();
        if let Some(data) = obj.get("data").and_then(Value::as_object) {
            for (k, v) in data {
                let bytes = v
                    .as_str()
                    .and_then(|s| b64_decode(s).ok())
                    .unwrap_or_default();
                out.insert(k.clone(), String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        Some(out)
    }

    /// The Secret exactly as stored (what a GET would return).
    pub fn secret_json(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock().secrets.get(&key(ns, name)).cloned()
    }

    pub fn secret_resource_version(&self, ns: &str, name: &str) -> Option<String> {
        self.lock()
            .secrets
            .get(&key(ns, name))
            .map(|o| meta_str(o, "resourceVersion").to_string())
    }

    pub fn delete_secret(&self, ns: &str, name: &str) -> bool {
        let mut st = self.lock();
        let removed = st.secrets.remove(&key(ns, name)).is_some();
        if removed {
            st.next_rv();
        }
        removed
    }

    // ----- Workloads -----------------------------------------------------

    pub fn add_deployment(&self, ns: &str, name: &str, replicas: i32, rollout: Rollout) {
        self.lock()
            .add_workload(WorkloadKind::Deployment, ns, name, replicas, rollout);
    }

    pub fn add_statefulset(&self, ns: &str, name: &str, replicas: i32, rollout: Rollout) {
        self.lock()
            .add_workload(WorkloadKind::StatefulSet, ns, name, replicas, rollout);
    }

    /// Changes how future (and the current, if any) rollouts of this workload behave.
    pub fn set_rollout(&self, kind: WorkloadKind, ns: &str, name: &str, rollout: Rollout) {
        let mut st = self.lock();
        let w = st
            .workloads
            .get_mut(&(kind, ns.to_string(), name.to_string()));
        w.unwrap_or_else(|| panic!("no {kind:?} {ns}/{name}"))
            .rollout = rollout;
    }

    /// Sets Deployment `spec.paused` as a client would (a spec write: generation bumps).
    pub fn set_paused(&self, ns: &str, name: &str, paused: bool) {
        self.lock()
            .mutate_workload(WorkloadKind::Deployment, ns, name, |obj| {
                let spec = obj_field(obj, "spec");
                if paused {
                    spec.insert("paused".into(), Value::Bool(true));
                } else {
                    // `paused` is `omitempty`: false is simply absent on the real server.
                    spec.remove("paused");
                }
            });
    }

    /// Sets a StatefulSet's `spec.updateStrategy.rollingUpdate.partition` as a client would.
    pub fn set_partition(&self, ns: &str, name: &str, partition: i32) {
        self.lock()
            .mutate_workload(WorkloadKind::StatefulSet, ns, name, |obj| {
                obj["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = json!(partition);
            });
    }

    /// Sets `spec.replicas` as a client would.
    pub fn set_replicas(&self, kind: WorkloadKind, ns: &str, name: &str, replicas: i32) {
        self.lock().mutate_workload(kind, ns, name, |obj| {
            obj_field(obj, "spec").insert("replicas".into(), json!(replicas));
        });
    }

    /// Every distinct value the pod template annotation kubectl.kubernetes.io/restartedAt
    /// took, in order (one per restart).
    pub fn restarts(&self, kind: WorkloadKind, ns: &str, name: &str) -> Vec<String> {
        let st = self.lock();
        st.workloads
            .get(&(kind, ns.to_string(), name.to_string()))
            .map(|w| w.restarts.clone())
            .unwrap_or_default()
    }

    /// The workload as a GET would return it now (status reconciled).
    pub fn workload(&self, kind: WorkloadKind, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.lock();
        st.reconcile(kind, ns, name);
        st.workloads
            .get(&(kind, ns.to_string(), name.to_string()))
            .map(|w| w.obj.clone())
    }

    /// Delay between a spec write and the simulated controller noticing it. Default 0:
    /// the next read already shows the new `observedGeneration`. With a lag, reads in
    /// between still show the previous generation's status, as on a real cluster.
    pub fn set_controller_lag(&self, lag: Duration) {
        self.lock().controller_lag = lag;
    }

    // ----- Observation and faults ---------------------------------------

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().last_rv
    }

    /// The next `fault.times` matching requests fail with `fault.status` before being handled.
    pub fn inject_fault(&self, fault: Fault) {
        self.lock().faults_before.push(fault);
    }

    /// The next `fault.times` matching requests are handled (a write is persisted) and
    /// then answered with the error anyway, like a timeout after commit. Only applied to
    /// requests that would otherwise have succeeded.
    /// Holds matching requests for `delay` before handling them (the status of `fault` is
    /// unused): the client may give up, the request is still applied afterwards.
    pub fn stall(&self, fault: Fault, delay: Duration) {
        self.lock().stalls.push((fault, delay));
    }

    pub fn inject_fault_after(&self, fault: Fault) {
        self.lock().faults_after.push(fault);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Issues a service account token shaped like a bound projected token (a JWT whose
    /// signature only this fake's TokenReview accepts).
    pub fn issue_service_account_token(&self, ns: &str, service_account: &str) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = Utc::now().timestamp();
        let uid = uuid::Uuid::new_v4().to_string();
        let header = json!({"alg": "RS256", "kid": "fake-apiserver", "typ": "JWT"});
        let claims = json!({
            "aud": ["https://kubernetes.default.svc"],
            "exp": now + 3600, "iat": now, "nbf": now,
            "iss": "https://kubernetes.default.svc",
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": service_account, "uid": uid}},
            "sub": format!("system:serviceaccount:{ns}:{service_account}"),
        });
        let signature: Vec<u8> = (0..4)
            .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
            .collect();
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(signature)
        );
        self.lock().service_account_tokens.insert(
            token.clone(),
            (ns.to_string(), service_account.to_string(), uid),
        );
        token
    }
}

impl Drop for KubeFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------
// Resource metadata
// ---------------------------------------------------------------------------

struct Resource {
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    group: &'static str,
    api_version: &'static str,
    workload: Option<WorkloadKind>,
}

static SECRETS: Resource = Resource {
    plural: "secrets",
    singular: "secret",
    kind: "Secret",
    group: "",
    api_version: "v1",
    workload: None,
};
static DEPLOYMENTS: Resource = Resource {
    plural: "deployments",
    singular: "deployment",
    kind: "Deployment",
    group: "apps",
    api_version: "apps/v1",
    workload: Some(WorkloadKind::Deployment),
};
static STATEFULSETS: Resource = Resource {
    plural: "statefulsets",
    singular: "statefulset",
    kind: "StatefulSet",
    group: "apps",
    api_version: "apps/v1",
    workload: Some(WorkloadKind::StatefulSet),
};

impl Resource {
    fn lookup(group: &str, plural: &str) -> Option<&'static Resource> {
        [&SECRETS, &DEPLOYMENTS, &STATEFULSETS]
            .into_iter()
            .find(|r| r.group == group && r.plural == plural)
    }

    /// "secrets" / "deployments.apps", as used in NotFound and Conflict messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// "Secret" / "Deployment.apps", as used in Invalid messages.
    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `details` of NotFound / Conflict / Forbidden statuses: the plural resource as "kind".
    fn details(&self, name: &str) -> Value {
        let mut d = json!({ "name": name, "kind": self.plural });
        if !self.group.is_empty() {
            d["group"] = json!(self.group);
        }
        d
    }
}

impl WorkloadKind {
    fn resource(self) -> &'static Resource {
        match self {
            WorkloadKind::Deployment => &DEPLOYMENTS,
            WorkloadKind::StatefulSet => &STATEFULSETS,
        }
    }
}

// ---------------------------------------------------------------------------
// Errors, rendered as metav1.Status exactly like the real server
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

/// One field-level validation failure (a `causes` entry of an Invalid status).
struct FieldError {
    field: String,
    /// FieldValueInvalid, FieldValueRequired, FieldValueForbidden, FieldValueTooLong, ...
    reason: &'static str,
    /// e.g. `Invalid value: "x": field is immutable`.
    detail: String,
}

impl FieldError {
    fn invalid(field: &str, value: &Value, why: &str) -> FieldError {
        FieldError {
            field: field.into(),
            reason: "FieldValueInvalid",
            detail: format!("Invalid value: {}: {why}", go_value(value)),
        }
    }
    fn required(field: &str) -> FieldError {
        FieldError {
            field: field.into(),
            reason: "FieldValueRequired",
            detail: "Required value".into(),
        }
    }
    fn forbidden(field: &str, why: &str) -> FieldError {
        FieldError {
            field: field.into(),
            reason: "FieldValueForbidden",
            detail: format!("Forbidden: {why}"),
        }
    }
}

impl ApiError {
    fn new(
        code: u16,
        reason: &'static str,
        message: impl Into<String>,
        details: Option<Value>,
    ) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details,
        }
    }

    fn not_found(res: &Resource, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" not found", res.qualified());
        ApiError::new(404, "NotFound", msg, Some(res.details(name)))
    }

    /// 404 for a path the server has no handler for.
    fn no_route() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        )
    }

    fn conflict_with(res: &Resource, name: &str, why: &str) -> ApiError {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            res.qualified()
        );
        ApiError::new(409, "Conflict", msg, Some(res.details(name)))
    }

    fn conflict(res: &Resource, name: &str) -> ApiError {
        ApiError::conflict_with(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn already_exists(res: &Resource, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" already exists", res.qualified());
        ApiError::new(409, "AlreadyExists", msg, Some(res.details(name)))
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message, None)
    }

    /// The 400 the real server gives when a body cannot be decoded into the type.
    fn undecodable(res: &Resource, why: impl std::fmt::Display) -> ApiError {
        let version = res.api_version.rsplit('/').next().unwrap_or("v1");
        ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: {why}",
            kind = res.kind
        ))
    }

    fn invalid(res: &Resource, name: &str, errors: Vec<FieldError>) -> ApiError {
        let rendered: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.detail))
            .collect();
        let list = if rendered.len() == 1 {
            rendered[0].clone()
        } else {
            format!("[{}]", rendered.join(", "))
        };
        let msg = format!("{} \"{name}\" is invalid: {list}", res.qualified_kind());
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({ "reason": e.reason, "message": e.detail, "field": e.field }))
            .collect();
        let mut details = json!({ "name": name, "kind": res.kind, "causes": causes });
        if !res.group.is_empty() {
            details["group"] = json!(res.group);
        }
        ApiError::new(422, "Invalid", msg, Some(details))
    }

    fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        )
    }

    fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, \
                 application/strategic-merge-patch+json"
            ),
            None,
        )
    }

    /// The Status a real server would send for `code`, as if produced for this request.
    fn injected(code: u16, r: &RequestRecord) -> ApiError {
        let res =
            Resource::lookup("apps", &r.resource).or_else(|| Resource::lookup("", &r.resource));
        let details = res
            .map(|res| res.details(&r.name))
            .unwrap_or_else(|| json!({ "name": r.name }));
        let qualified = res
            .map(|res| res.qualified())
            .unwrap_or_else(|| r.resource.clone());
        match code {
            409 => match res {
                Some(res) => ApiError::conflict(res, &r.name),
                None => ApiError::new(409, "Conflict", "injected conflict", Some(details)),
            },
            404 => ApiError::new(404, "NotFound", format!("{qualified} \"{}\" not found", r.name), Some(details)),
            403 => {
                let group = res.map(|res| res.group).unwrap_or("");
                let msg = format!(
                    "{qualified} \"{name}\" is forbidden: User \"system:serviceaccount:{ns}:rotator\" cannot {verb} \
                     resource \"{resource}\" in API group \"{group}\" in the namespace \"{ns}\"",
                    name = r.name,
                    ns = r.namespace,
                    verb = r.verb,
                    resource = r.resource,
                );
                ApiError::new(403, "Forbidden", msg, Some(details))
            }
            401 => ApiError::new(401, "Unauthorized", "Unauthorized", None),
            400 => ApiError::bad_request("injected bad request"),
            410 => ApiError::new(410, "Expired", "too old resource version", None),
            422 => ApiError::new(
                422,
                "Invalid",
                format!("{qualified} \"{}\" is invalid: injected: Invalid value", r.name),
                Some(details),
            ),
            429 => ApiError::new(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                Some(json!({ "retryAfterSeconds": 1 })),
            ),
            500 => ApiError::new(
                500,
                "InternalError",
                "Internal error occurred: injected fault",
                Some(json!({ "causes": [{ "message": "injected fault" }] })),
            ),
            503 => ApiError::new(503, "ServiceUnavailable", "the server is currently unable to handle the request", None),
            504 => ApiError::new(
                504,
                "Timeout",
                "Timeout: request did not complete within requested timeout - context deadline exceeded",
                Some(json!({})),
            ),
            other => ApiError::new(other, "", format!("injected fault with status {other}"), None),
        }
    }

    fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        // An unknown reason is the empty string, which Go's omitempty drops.
        if !self.reason.is_empty() {
            v["reason"] = json!(self.reason);
        }
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

/// A successful answer: status code, JSON body, and `Warning` headers.
struct Reply {
    code: u16,
    body: Value,
    warnings: Vec<String>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            code: 200,
            body,
            warnings: Vec::new(),
        }
    }
    fn created(body: Value) -> Reply {
        Reply {
            code: 201,
            body,
            warnings: Vec::new(),
        }
    }
}

type ApiResult = Result<Reply, ApiError>;

// ---------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------

fn lock(state: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    // A panicking test must not poison the fake for everyone else.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The parsed request handed to the handlers.
struct Incoming {
    method: Method,
    route: Route,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Bytes,
}

impl Incoming {
    fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|v| v == "All")
    }
}

async fn handle(
    AxumState(state): AxumState<Arc<Mutex<State>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let raw_query = uri.query().unwrap_or("").to_string();
    let query: BTreeMap<String, String> = url::form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let route = Route::parse(uri.path());
    let record = RequestRecord {
        method: method.as_str().to_string(),
        path: uri.path().to_string(),
        verb: verb_of(&method, &route, &query).to_string(),
        resource: route.resource_name(),
        namespace: route.namespace().unwrap_or_default(),
        name: route.name().unwrap_or_default(),
        content_type: content_type.clone(),
        query: raw_query,
        body: serde_json::from_slice(&body).ok(),
        status: 0,
    };
    let incoming = Incoming {
        method,
        route,
        query,
        content_type,
        body,
    };
    // A stalled API server: the request is applied late, as a real one under load may apply a
    // write whose client has given up waiting.
    // It runs in a task of its own: the client hanging up does not stop it.
    let stall = take_stall(&mut lock(&state).stalls, &record);
    if let Some(delay) = stall {
        let late = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            lock(&state).serve(record, incoming)
        });
        return late.await.expect("the stalled request is served");
    }
    let mut st = lock(&state);
    if incoming.method == Method::POST && uri.path() == TOKEN_REVIEWS {
        return st.token_review(record, &incoming.body);
    }
    st.serve(record, incoming)
}

fn verb_of(method: &Method, route: &Route, query: &BTreeMap<String, String>) -> &'static str {
    let named = route.name().is_some();
    match *method {
        Method::GET if named => "get",
        Method::GET if query.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        Method::GET => "list",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::POST => "create",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    for w in warnings {
        // RFC 7234 warning format, as the apiserver sends it.
        let value = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    if code == 429 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

enum Route {
    /// A static discovery document (/version, /api, /apis, ...).
    Discovery(&'static str),
    Resource {
        res: &'static Resource,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<String>,
    },
    /// An ExternalSecret or SealedSecret, at one of the versions its kind is known under.
    Custom {
        kind: &'static custom::CustomKind,
        version: String,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<String>,
    },
    /// An events.k8s.io/v1 Event.
    Events {
        namespace: Option<String>,
        name: Option<String>,
    },
    /// Anything else. Kept for the request log.
    Unknown {
        resource: String,
        namespace: Option<String>,
        name: Option<String>,
    },
}

impl Route {
    fn parse(path: &str) -> Route {
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        match segs.as_slice() {
            ["version"] => Route::Discovery("version"),
            ["api"] => Route::Discovery("api"),
            ["api", "v1"] => Route::Discovery("api/v1"),
            ["apis"] => Route::Discovery("apis"),
            ["apis", "apps"] => Route::Discovery("apis/apps"),
            ["apis", "apps", "v1"] => Route::Discovery("apis/apps/v1"),
            ["api", "v1", rest @ ..] => Route::resource("", rest),
            ["apis", "apps", "v1", rest @ ..] => Route::resource("apps", rest),
            ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", tail @ ..]
                if tail.len() <= 1 =>
            {
                Route::Events {
                    namespace: Some(ns.to_string()),
                    name: tail.first().map(|s| s.to_string()),
                }
            }
            ["apis", "events.k8s.io", "v1", "events"] => Route::Events {
                namespace: None,
                name: None,
            },
            ["apis", group, version, rest @ ..]
                if custom::CustomKind::lookup(group, version).is_some() =>
            {
                Route::custom(
                    custom::CustomKind::lookup(group, version).unwrap(),
                    version,
                    rest,
                )
            }
            ["apis", _, _, rest @ ..] => Route::resource("(unknown group)", rest),
            _ => Route::Unknown {
                resource: String::new(),
                namespace: None,
                name: None,
            },
        }
    }

    /// Parses `namespaces/{ns}/{plural}[/{name}[/{sub}]]` or `{plural}` (all namespaces).
    fn resource(group: &str, rest: &[&str]) -> Route {
        let (namespace, plural, tail) = match rest {
            ["namespaces", ns, plural, tail @ ..] => (Some(ns.to_string()), *plural, tail),
            [plural] => (None, *plural, &[][..]),
            _ => {
                return Route::Unknown {
                    resource: rest.first().unwrap_or(&"").to_string(),
                    namespace: None,
                    name: None,
                }
            }
        };
        let (name, subresource) = match tail {
            [] => (None, None),
            [name] => (Some(name.to_string()), None),
            [name, sub] => (Some(name.to_string()), Some(sub.to_string())),
            _ => (None, None),
        };
        match Resource::lookup(group, plural) {
            Some(res) if tail.len() <= 2 => Route::Resource {
                res,
                namespace,
                name,
                subresource,
            },
            _ => Route::Unknown {
                resource: plural.to_string(),
                namespace,
                name,
            },
        }
    }

    /// `namespaces/{ns}/{plural}/{name}[/{sub}]` of a custom resource.
    fn custom(kind: &'static custom::CustomKind, version: &str, rest: &[&str]) -> Route {
        match rest {
            ["namespaces", ns, plural, tail @ ..] if *plural == kind.plural && tail.len() <= 2 => {
                Route::Custom {
                    kind,
                    version: version.to_string(),
                    namespace: Some(ns.to_string()),
                    name: tail.first().map(|s| s.to_string()),
                    subresource: tail.get(1).map(|s| s.to_string()),
                }
            }
            _ => Route::Unknown {
                resource: kind.plural.to_string(),
                namespace: None,
                name: None,
            },
        }
    }

    fn resource_name(&self) -> String {
        match self {
            Route::Discovery(_) => String::new(),
            Route::Custom { kind, .. } => kind.plural.to_string(),
            Route::Resource { res, .. } => res.plural.to_string(),
            Route::Events { .. } => "events".to_string(),
            Route::Unknown { resource, .. } => resource.clone(),
        }
    }
    fn namespace(&self) -> Option<String> {
        match self {
            Route::Resource { namespace, .. }
            | Route::Unknown { namespace, .. }
            | Route::Events { namespace, .. }
            | Route::Custom { namespace, .. } => namespace.clone(),
            Route::Discovery(_) => None,
        }
    }
    fn name(&self) -> Option<String> {
        match self {
            Route::Resource { name, .. }
            | Route::Unknown { name, .. }
            | Route::Events { name, .. }
            | Route::Custom { name, .. } => name.clone(),
            Route::Discovery(_) => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Server state
// ---------------------------------------------------------------------------

type Key = (String, String);

fn key(ns: &str, name: &str) -> Key {
    (ns.to_string(), name.to_string())
}

/// Maps `Instant`s to wall-clock timestamps, so lazily computed conditions carry
/// stable times.
#[derive(Clone, Copy)]
struct Clock {
    instant: Instant,
    wall: DateTime<Utc>,
}

impl Clock {
    fn format(&self, at: Instant) -> String {
        let since = at.saturating_duration_since(self.instant);
        let wall = self.wall + chrono::Duration::from_std(since).unwrap_or_default();
        wall.to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

struct State {
    addr: SocketAddr,
    last_rv: u64,
    clock: Clock,
    secrets: BTreeMap<Key, Value>,
    workloads: BTreeMap<(WorkloadKind, String, String), Workload>,
    requests: Vec<RequestRecord>,
    faults_before: Vec<Fault>,
    faults_after: Vec<Fault>,
    stalls: Vec<(Fault, Duration)>,
    controller_lag: Duration,
    /// Service account tokens this fake issued: token -> (namespace, service account, uid).
    service_account_tokens: BTreeMap<String, (String, String, String)>,
    /// ExternalSecrets and SealedSecrets (see `custom`).
    custom: custom::Custom,
    /// events.k8s.io/v1 Events (see `events`).
    events: events::Events,
}

impl State {
    fn new(addr: SocketAddr) -> State {
        State {
            addr,
            // Start somewhere non-trivial so nobody accidentally relies on small numbers.
            last_rv: 1000,
            clock: Clock {
                instant: Instant::now(),
                wall: Utc::now(),
            },
            secrets: BTreeMap::new(),
            workloads: BTreeMap::new(),
            requests: Vec::new(),
            faults_before: Vec::new(),
            stalls: Vec::new(),
            service_account_tokens: BTreeMap::new(),
            faults_after: Vec::new(),
            controller_lag: Duration::ZERO,
            custom: Default::default(),
            events: Default::default(),
        }
    }

    fn next_rv(&mut self) -> String {
        self.last_rv += 1;
        self.last_rv.to_string()
    }

    fn now_string(&self) -> String {
        self.clock.format(Instant::now())
    }

    fn serve(&mut self, mut record: RequestRecord, req: Incoming) -> Response {
        // The simulated sealed-secrets controller acts lazily, like the workload controller.
        self.run_unsealer();
        let index = self.requests.len();
        self.requests.push(record.clone());
        let result = match take_fault(&mut self.faults_before, &record) {
            Some(code) => Err(ApiError::injected(code, &record)),
            None => match self.dispatch(&req) {
                Ok(reply) => match take_fault(&mut self.faults_after, &record) {
                    Some(code) => Err(ApiError::injected(code, &record)),
                    None => Ok(reply),
                },
                Err(e) => Err(e),
            },
        };
        let (code, body, warnings) = match result {
            Ok(r) => (r.code, r.body, r.warnings),
            Err(e) => (e.code, e.to_status(), Vec::new()),
        };
        record.status = code;
        self.requests[index] = record;
        json_response(code, &body, &warnings)
    }

    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`: authenticated only for tokens this
    /// fake issued, answered in the real server's shape.
    fn token_review(&mut self, mut record: RequestRecord, body: &Bytes) -> Response {
        record.verb = "create".into();
        record.resource = "tokenreviews".into();
        let token = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["spec"]["token"].as_str().map(str::to_string));
        let Some(token) = token else {
            record.status = 400;
            self.requests.push(record);
            return json_response(
                400,
                &ApiError::new(400, "BadRequest", "spec.token is required", None).to_status(),
                &[],
            );
        };
        let status = match self.service_account_tokens.get(&token) {
            Some((ns, sa, uid)) => json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{ns}:{sa}"),
                    "uid": uid,
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                },
                "audiences": ["https://kubernetes.default.svc"],
            }),
            None => json!({"user": {}, "error": "invalid bearer token, token lookup failed"}),
        };
        record.status = 201;
        // The token is a credential: keep it out of the request log.
        record.body = None;
        self.requests.push(record);
        let answer = json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": {"token": token},
            "status": status,
        });
        json_response(201, &answer, &[])
    }

    fn dispatch(&mut self, req: &Incoming) -> ApiResult {
        let (res, namespace, name, subresource) = match &req.route {
            Route::Discovery(doc) if req.method == Method::GET => {
                return Ok(Reply::ok(self.discovery(doc)))
            }
            Route::Discovery(_) => return Err(ApiError::method_not_allowed()),
            Route::Unknown { .. } => return Err(ApiError::no_route()),
            Route::Events { namespace, name } => {
                return self.events_request(namespace.as_deref(), name.as_deref(), req)
            }
            Route::Custom {
                kind,
                version,
                namespace,
                name,
                subresource,
            } => {
                return self.custom_request(
                    kind,
                    version,
                    namespace.as_deref(),
                    name.as_deref(),
                    subresource.as_deref(),
                    req,
                )
            }
            Route::Resource {
                res,
                namespace,
                name,
                subresource,
            } => (*res, namespace, name, subresource),
        };
        match subresource.as_deref() {
            None => {}
            // The status subresource is readable; writing it is the controller's job.
            Some("status") if req.method == Method::GET => {}
            Some("status") => return Err(ApiError::method_not_allowed()),
            Some(_) => return Err(ApiError::no_route()),
        }
        let ns = namespace.as_deref();
        match (&req.method, ns, name.as_deref()) {
            (&Method::GET, _, None) if verb_of(&req.method, &req.route, &req.query) == "watch" => {
                Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "watch is not supported by the fake apiserver",
                    None,
                ))
            }
            (&Method::GET, _, None) => self.list(res, ns, req),
            (&Method::GET, Some(ns), Some(name)) => self
                .current(res, ns, name)
                .map(Reply::ok)
                .ok_or_else(|| ApiError::not_found(res, name)),
            (&Method::POST, Some(ns), None) => self.create(res, ns, req),
            (&Method::PUT, Some(ns), Some(name)) => self.replace(res, ns, name, req),
            (&Method::PATCH, Some(ns), Some(name)) => self.patch(res, ns, name, req),
            (&Method::DELETE, Some(ns), Some(name)) => self.delete(res, ns, name, req),
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    // ----- Reads ----------------------------------------------------------

    /// The object as a GET would return it now (workload status reconciled first).
    fn current(&mut self, res: &Resource, ns: &str, name: &str) -> Option<Value> {
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

    fn list(&mut self, res: &Resource, ns: Option<&str>, req: &Incoming) -> ApiResult {
        let keys: Vec<Key> = match res.workload {
            None => self.secrets.keys().cloned().collect(),
            Some(kind) => self
                .workloads
                .keys()
                .filter(|k| k.0 == kind)
                .map(|k| (k.1.clone(), k.2.clone()))
                .collect(),
        };
        let label_selector = req
            .query
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or("");
        let field_selector = req
            .query
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or("");
        let mut items = Vec::new();
        for (item_ns, item_name) in keys {
            if ns.is_some_and(|ns| ns != item_ns) {
                continue;
            }
            let Some(mut obj) = self.current(res, &item_ns, &item_name) else {
                continue;
            };
            let labels = obj
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if !label_selector_matches(label_selector, &labels).map_err(ApiError::bad_request)?
                || !field_selector_matches(res, field_selector, &obj)?
            {
                continue;
            }
            // List items carry no apiVersion/kind on the wire.
            if let Some(m) = obj.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            items.push(obj);
        }
        Ok(Reply::ok(json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version,
            "metadata": { "resourceVersion": self.last_rv.to_string() },
            "items": items,
        })))
    }

    fn discovery(&self, doc: &str) -> Value {
        let verbs = json!([
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch"
        ]);
        let resource = |r: &Resource| json!({ "name": r.plural, "singularName": r.singular, "namespaced": true, "kind": r.kind, "verbs": verbs });
        let apps = json!({
            "name": "apps",
            "versions": [{ "groupVersion": "apps/v1", "version": "v1" }],
            "preferredVersion": { "groupVersion": "apps/v1", "version": "v1" },
        });
        match doc {
            "version" => json!({
                "major": "1", "minor": "31", "gitVersion": "v1.31.0", "gitCommit": "kube-fake",
                "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5",
                "compiler": "gc", "platform": "linux/amd64",
            }),
            "api" => json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": self.addr.to_string() }],
            }),
            "api/v1" => json!({
                "kind": "APIResourceList", "groupVersion": "v1", "resources": [resource(&SECRETS)],
            }),
            "apis" => {
                let mut groups = vec![apps];
                groups.extend(self.custom_groups());
                json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
            }
            "apis/apps" => {
                let mut g = apps;
                g["kind"] = json!("APIGroup");
                g["apiVersion"] = json!("v1");
                g
            }
            _ => json!({
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1",
                "resources": [resource(&DEPLOYMENTS), resource(&STATEFULSETS)],
            }),
        }
    }

    // ----- Writes ---------------------------------------------------------

    fn create(&mut self, res: &Resource, ns: &str, req: &Incoming) -> ApiResult {
        let mut obj = parse_object(res, &req.body)?;
        check_body_namespace(&mut obj, ns)?;
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            ("", "") => {
                return Err(ApiError::invalid(
                    res,
                    "",
                    vec![FieldError {
                        field: "metadata.name".into(),
                        reason: "FieldValueRequired",
                        detail: "Required value: name or generateName is required".into(),
                    }],
                ))
            }
            ("", prefix) => format!("{prefix}{}", random_suffix()),
            (name, _) => name.to_string(),
        };
        obj_field(&mut obj, "metadata").insert("name".into(), json!(name));
        if !meta_str(&obj, "resourceVersion").is_empty() {
            // The storage layer refuses this with a plain error, which surfaces as a 500.
            return Err(ApiError::new(
                500,
                "",
                "resourceVersion should not be set on objects to be created",
                None,
            ));
        }
        if self.exists(res, ns, &name) {
            return Err(ApiError::already_exists(res, &name));
        }
        let (mut obj, warnings) = self.prepare(res, ns, &name, obj, None, req)?;
        let meta = obj_field(&mut obj, "metadata");
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(self.now_string()));
        if res.workload.is_some() {
            obj_field(&mut obj, "metadata").insert("generation".into(), json!(1));
            // A new workload has an empty status until the controller sees it.
            obj.as_object_mut()
                .unwrap()
                .insert("status".into(), json!({}));
        }
        if !req.dry_run() {
            let rv = self.next_rv();
            obj_field(&mut obj, "metadata").insert("resourceVersion".into(), json!(rv));
            self.insert_new(
                res,
                ns,
                &name,
                obj.clone(),
                Rollout::ReadyAfter(Duration::ZERO),
                false,
            );
        }
        Ok(Reply {
            code: 201,
            body: obj,
            warnings,
        })
    }

    fn replace(&mut self, res: &Resource, ns: &str, name: &str, req: &Incoming) -> ApiResult {
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
        self.update_existing(res, ns, name, &existing, obj, req)
    }

    fn patch(&mut self, res: &Resource, ns: &str, name: &str, req: &Incoming) -> ApiResult {
        let content_type = req.content_type.as_deref().unwrap_or("");
        let media = content_type.split(';').next().unwrap_or("").trim();
        let existing = self.current(res, ns, name);
        let patched = match media {
            "application/merge-patch+json" => {
                let patch = parse_json(&req.body)?;
                let mut doc = existing
                    .clone()
                    .ok_or_else(|| ApiError::not_found(res, name))?;
                merge_patch(&mut doc, &patch);
                doc
            }
            "application/strategic-merge-patch+json" => {
                let patch = parse_json(&req.body)?;
                let mut doc = existing
                    .clone()
                    .ok_or_else(|| ApiError::not_found(res, name))?;
                strategic_merge(&mut doc, &patch);
                doc
            }
            "application/json-patch+json" => {
                let patch = parse_json(&req.body)?;
                let mut doc = existing
                    .clone()
                    .ok_or_else(|| ApiError::not_found(res, name))?;
                json_patch(&mut doc, &patch).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                        None,
                    )
                })?;
                doc
            }
            "application/apply-patch+yaml" => return self.apply(res, ns, name, existing, req),
            other => return Err(ApiError::unsupported_media_type(other)),
        };
        let existing = existing.expect("checked above");
        check_name_unchanged(&patched, name)?;
        check_preconditions(res, name, &patched, &existing)?;
        self.update_existing(res, ns, name, &existing, patched, req)
    }

    /// Server-side apply, approximated: upsert plus a strategic merge of the applied
    /// configuration. Field ownership is not tracked (see the module docs' caveats).
    fn apply(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        existing: Option<Value>,
        req: &Incoming,
    ) -> ApiResult {
        if req.query.get("fieldManager").is_none_or(|m| m.is_empty()) {
            return Err(ApiError::bad_request(
                "PATCH request for apply must have a fieldManager",
            ));
        }
        let applied = serde_json::from_slice::<Value>(&req.body).map_err(|e| {
            ApiError::bad_request(format!("error decoding YAML: the fake apiserver only accepts JSON-shaped apply bodies: {e}"))
        })?;
        for (field, expected) in [("apiVersion", res.api_version), ("kind", res.kind)] {
            if applied.get(field).and_then(Value::as_str) != Some(expected) {
                return Err(ApiError::bad_request(format!(
                    "invalid object type: {field} must be {expected}"
                )));
            }
        }
        check_name_unchanged(&applied, name)?;
        let Some(existing) = existing else {
            // Apply creates missing objects. Re-route through create with the body.
            let create = Incoming {
                method: Method::POST,
                route: Route::Resource {
                    res: Resource::lookup(res.group, res.plural).unwrap(),
                    namespace: Some(ns.into()),
                    name: None,
                    subresource: None,
                },
                query: req.query.clone(),
                content_type: Some("application/json".into()),
                body: Bytes::from(applied.to_string()),
            };
            return self.create(res, ns, &create);
        };
        let mut doc = existing.clone();
        strategic_merge(&mut doc, &applied);
        check_preconditions(res, name, &doc, &existing)?;
        self.update_existing(res, ns, name, &existing, doc, req)
    }

    /// The shared tail of PUT and PATCH: normalise, validate, detect no-ops, bump
    /// generation and resourceVersion, persist.
    fn update_existing(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        existing: &Value,
        new: Value,
        req: &Incoming,
    ) -> ApiResult {
        let (mut obj, warnings) = self.prepare(res, ns, name, new, Some(existing), req)?;
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
        if !req.dry_run() {
            let rv = self.next_rv();
            obj_field(&mut obj, "metadata").insert("resourceVersion".into(), json!(rv));
            self.store_update(res, ns, name, obj.clone());
        }
        Ok(Reply {
            code: 200,
            body: obj,
            warnings,
        })
    }

    fn delete(&mut self, res: &Resource, ns: &str, name: &str, req: &Incoming) -> ApiResult {
        let existing = self
            .current(res, ns, name)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let options: Value = if req.body.is_empty() {
            json!({})
        } else {
            parse_json(&req.body)?
        };
        let preconditions = options.get("preconditions").cloned().unwrap_or(json!({}));
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            let Some(wanted) = preconditions.get(field).and_then(Value::as_str) else {
                continue;
            };
            let actual = meta_str(&existing, field);
            if wanted != actual {
                let why = format!("Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}");
                return Err(ApiError::conflict_with(res, name, &why));
            }
        }
        let dry_run = req.dry_run()
            || options
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v == "All"));
        if !dry_run {
            match res.workload {
                None => {
                    self.secrets.remove(&key(ns, name));
                }
                Some(kind) => {
                    self.workloads
                        .remove(&(kind, ns.to_string(), name.to_string()));
                }
            }
            self.next_rv();
        }
        let mut details = res.details(name);
        details["uid"] = json!(meta_str(&existing, "uid"));
        Ok(Reply::ok(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details,
        })))
    }

    // ----- Normalisation, defaulting, validation -------------------------

    /// Turns a client-supplied object into what the server would store, short of
    /// `resourceVersion` and `generation`: decode (prune unknown fields), restore
    /// server-owned metadata, default, validate. Returns unknown-field warnings.
    fn prepare(
        &self,
        res: &Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
        existing: Option<&Value>,
        req: &Incoming,
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
        if !unknown.is_empty()
            && req
                .query
                .get("fieldValidation")
                .is_some_and(|v| v == "Strict")
        {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
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

    // ----- Storage --------------------------------------------------------

    fn exists(&self, res: &Resource, ns: &str, name: &str) -> bool {
        match res.workload {
            None => self.secrets.contains_key(&key(ns, name)),
            Some(kind) => self
                .workloads
                .contains_key(&(kind, ns.to_string(), name.to_string())),
        }
    }

    fn insert_new(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        obj: Value,
        rollout: Rollout,
        observed: bool,
    ) {
        match res.workload {
            None => {
                self.secrets.insert(key(ns, name), obj);
            }
            Some(kind) => {
                let w = Workload::new(obj, rollout, observed, Instant::now());
                self.workloads
                    .insert((kind, ns.to_string(), name.to_string()), w);
            }
        }
    }

    fn store_update(&mut self, res: &Resource, ns: &str, name: &str, obj: Value) {
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

    fn put_secret(&mut self, ns: &str, name: &str, data: Map<String, Value>) {
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

    fn add_workload(
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
        let req = Incoming {
            method: Method::POST,
            route: Route::Discovery(""),
            query: BTreeMap::new(),
            content_type: None,
            body: Bytes::new(),
        };
        let (mut obj, _) = self
            .prepare(res, ns, name, obj, None, &req)
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
        self.insert_new(res, ns, name, obj, rollout, true);
        self.reconcile(kind, ns, name);
    }

    /// Applies a client-like spec change made through a test helper.
    fn mutate_workload(
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
        let req = Incoming {
            method: Method::PUT,
            route: Route::Discovery(""),
            query: BTreeMap::new(),
            content_type: None,
            body: Bytes::new(),
        };
        self.update_existing(res, ns, name, &existing, new, &req)
            .expect("helper change is valid");
    }

    /// Runs the simulated controller for one workload up to now. Status changes are
    /// writes: they get a new resourceVersion.
    fn reconcile(&mut self, kind: WorkloadKind, ns: &str, name: &str) {
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

/// Consumes one use of the first matching fault; returns its status code.
fn take_stall(stalls: &mut Vec<(Fault, Duration)>, record: &RequestRecord) -> Option<Duration> {
    let (fault, delay) = stalls.iter_mut().find(|(f, _)| f.matches(record))?;
    fault.times -= 1;
    let delay = *delay;
    stalls.retain(|(f, _)| f.times > 0);
    Some(delay)
}

fn take_fault(faults: &mut Vec<Fault>, record: &RequestRecord) -> Option<u16> {
    let fault = faults.iter_mut().find(|f| f.matches(record))?;
    fault.times -= 1;
    let code = fault.status;
    faults.retain(|f| f.times > 0);
    Some(code)
}

// ---------------------------------------------------------------------------
// Request body helpers
// ---------------------------------------------------------------------------

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch or body: {e}")))
}

fn parse_object(res: &Resource, body: &[u8]) -> Result<Value, ApiError> {
    let v = serde_json::from_slice::<Value>(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    if !v.is_object() {
        return Err(ApiError::undecodable(res, "expected a JSON object"));
    }
    Ok(v)
}

fn check_body_namespace(obj: &mut Value, ns: &str) -> Result<(), ApiError> {
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

fn check_name_unchanged(obj: &Value, name: &str) -> Result<(), ApiError> {
    match meta_str(obj, "name") {
        "" => Ok(()),
        x if x == name => Ok(()),
        x => Err(ApiError::bad_request(format!(
            "the name of the object ({x}) does not match the name on the URL ({name})"
        ))),
    }
}

/// resourceVersion and uid in the written object act as preconditions.
fn check_preconditions(
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
fn roundtrip(res: &Resource, obj: &Value) -> Result<Value, ApiError> {
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
fn unknown_fields(input: &Value, output: &Value, prefix: &str, out: &mut Vec<String>) {
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

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

/// base64 as Go's `encoding/json` decodes `[]byte`: standard alphabet, padding
/// required, non-zero trailing bits tolerated, CR/LF ignored.
const GO_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireCanonical),
);

fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn b64_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let cleaned: String = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    GO_BASE64.decode(cleaned)
}

/// Canonicalises `data` (decode + re-encode, as the server stores bytes) and folds
/// `stringData` into it; `stringData` itself is never stored.
fn fold_secret_data(res: &Resource, obj: &mut Value) -> Result<(), ApiError> {
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

fn validate_secret(obj: &Value, existing: Option<&Value>) -> Vec<FieldError> {
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

// ---------------------------------------------------------------------------
// Workload manifests, defaults and validation
// ---------------------------------------------------------------------------

/// A minimal valid Deployment/StatefulSet like a test fixture would apply.
fn workload_manifest(kind: WorkloadKind, ns: &str, name: &str, replicas: i32) -> Value {
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
fn default_field(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.entry(key.to_string()).or_insert(value);
}

fn apply_defaults(res: &Resource, obj: &mut Value) {
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
fn check_required_workload_fields(res: &Resource, name: &str, obj: &Value) -> Result<(), ApiError> {
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

fn validate_workload(kind: WorkloadKind, obj: &Value, existing: Option<&Value>) -> Vec<FieldError> {
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
fn int_or_percent(v: Option<&Value>, total: i64, round_up: bool) -> i64 {
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

// ---------------------------------------------------------------------------
// The simulated workload controller
// ---------------------------------------------------------------------------

/// A Deployment or StatefulSet plus the controller's private bookkeeping.
///
/// Rollout model: `stable_hash` is the pod template every "old" pod runs (the
/// Deployment's old ReplicaSet / the StatefulSet's currentRevision) and
/// `target_hash` the template the controller is moving to (new ReplicaSet /
/// updateRevision). They differ exactly while a rollout is in progress.
struct Workload {
    obj: Value,
    rollout: Rollout,
    created_at: Instant,
    /// Generation the controller has processed (0: not yet seen).
    observed_generation: i64,
    /// When `metadata.generation` last changed.
    generation_changed_at: Instant,
    stable_hash: String,
    stable_since: Instant,
    target_hash: String,
    target_started: Instant,
    /// Set while a Deployment is paused (as seen by the controller); the rollout clock stops.
    paused_at: Option<Instant>,
    /// StatefulSet partition as last observed.
    partition: i64,
    /// deployment.kubernetes.io/revision.
    revision: u64,
    restarts: Vec<String>,
}

impl Workload {
    fn new(obj: Value, rollout: Rollout, observed: bool, now: Instant) -> Workload {
        let hash = pod_template_hash(&obj["spec"]["template"]);
        Workload {
            observed_generation: if observed { 1 } else { 0 },
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

    fn generation(&self) -> i64 {
        self.obj
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1)
    }

    fn replicas(&self) -> i64 {
        self.obj["spec"]["replicas"].as_i64().unwrap_or(1)
    }

    fn name(&self) -> String {
        meta_str(&self.obj, "name").to_string()
    }

    /// Records a client write.
    fn accept_write(&mut self, obj: Value, now: Instant) {
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
    fn reconcile(
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
    fn observe(&mut self, kind: WorkloadKind, at: Instant) {
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
    fn pods_to_update(&self, kind: WorkloadKind) -> i64 {
        let n = self.replicas();
        match kind {
            WorkloadKind::Deployment => n,
            WorkloadKind::StatefulSet => n - self.partition.clamp(0, n),
        }
    }

    fn on_delete(&self, kind: WorkloadKind) -> bool {
        kind == WorkloadKind::StatefulSet
            && self.obj.pointer("/spec/updateStrategy/type") == Some(&json!("OnDelete"))
    }

    /// When the in-progress rollout finishes (None: not while paused / never).
    fn done_at(&self, kind: WorkloadKind) -> Option<Instant> {
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

    fn is_done(&self, kind: WorkloadKind, now: Instant) -> bool {
        self.done_at(kind).is_some_and(|t| now >= t)
    }

    fn promote_if_done(&mut self, kind: WorkloadKind, now: Instant) {
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
    fn deployment_status(&self, now: Instant, clock: &Clock) -> Value {
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
    fn statefulset_status(&self, now: Instant) -> Value {
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

fn condition(kind: &str, status: &str, reason: &str, message: &str, at: String) -> Value {
    json!({
        "type": kind, "status": status, "reason": reason, "message": message,
        "lastUpdateTime": at, "lastTransitionTime": at,
    })
}

fn partition_of(obj: &Value) -> i64 {
    obj.pointer("/spec/updateStrategy/rollingUpdate/partition")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn restart_annotation(obj: &Value) -> Option<String> {
    obj.pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(RESTARTED_AT))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Like the controller's pod-template-hash: FNV-32a of the template, rendered with
/// the apimachinery "safe" alphabet (no vowels, so no accidental words).
fn pod_template_hash(template: &Value) -> String {
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
fn canonical_json(v: &Value) -> String {
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

// ---------------------------------------------------------------------------
// Patches
// ---------------------------------------------------------------------------

/// RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything
/// else (arrays included) replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Merge keys of the lists the apiserver merges element-wise in a strategic merge
/// patch (from the `patchMergeKey` tags of the core/apps types). Matched by field
/// name only, which is unambiguous within Secrets and workloads.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "hostAliases" => "ip",
        "conditions" => "type",
        "topologySpreadConstraints" => "topologyKey",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Strategic merge patch: like a merge patch, except lists with a merge key merge
/// element-wise, `finalizers` merges as a set, and the `$patch`,
/// `$deleteFromPrimitiveList/…`, `$setElementOrder/…`, `$retainKeys` directives are
/// honoured (the last two by being ignored, which only affects ordering/pruning).
fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = p.clone();
        replacement.remove("$patch");
        *target = json!({});
        strategic_merge(target, &Value::Object(replacement));
        return;
    }
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        if v.is_null() || v.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(k);
            continue;
        }
        match v {
            Value::Array(items) => {
                let slot = t.entry(k.clone()).or_insert(json!([]));
                if !slot.is_array() {
                    *slot = json!([]);
                }
                merge_list(k, slot.as_array_mut().unwrap(), items);
            }
            Value::Object(_) => strategic_merge(t.entry(k.clone()).or_insert(Value::Null), v),
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn merge_list(field: &str, existing: &mut Vec<Value>, items: &[Value]) {
    let is_replace = |x: &Value| x.get("$patch").and_then(Value::as_str) == Some("replace");
    if items.iter().any(is_replace) {
        existing.clear();
        for item in items.iter().filter(|x| !is_replace(x)) {
            let mut fresh = Value::Null;
            strategic_merge(&mut fresh, item);
            existing.push(fresh);
        }
        return;
    }
    match merge_key(field) {
        Some(merge_key) if items.iter().all(Value::is_object) => {
            for item in items {
                let id = item.get(merge_key);
                let position = existing
                    .iter()
                    .position(|e| id.is_some() && e.get(merge_key) == id);
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    existing.retain(|e| id.is_none() || e.get(merge_key) != id);
                    continue;
                }
                match position {
                    Some(i) => strategic_merge(&mut existing[i], item),
                    None => {
                        let mut fresh = Value::Null;
                        strategic_merge(&mut fresh, item);
                        existing.push(fresh);
                    }
                }
            }
        }
        None if field == "finalizers" => {
            for item in items {
                if !existing.contains(item) {
                    existing.push(item.clone());
                }
            }
        }
        _ => *existing = items.to_vec(),
    }
}

/// RFC 6902 JSON patch (add, remove, replace, move, copy, test).
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("operation without \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("operation without \"path\"")?;
        let from = op.get("from").and_then(Value::as_str);
        let value = op.get("value");
        match kind {
            "add" => pointer_add(doc, path, value.ok_or("add without value")?.clone())?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "replace" => {
                let slot = doc.pointer_mut(path).ok_or_else(|| {
                    format!("replace operation does not apply: doc is missing path: {path}")
                })?;
                *slot = value.ok_or("replace without value")?.clone();
            }
            "move" => {
                let v = pointer_remove(doc, from.ok_or("move without from")?)?;
                pointer_add(doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from.ok_or("copy without from")?)
                    .cloned()
                    .ok_or("copy from a missing path")?;
                pointer_add(doc, path, v)?;
            }
            "test" => {
                if doc.pointer(path) != value {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unexpected kind: {other}")),
        }
    }
    Ok(())
}

/// Splits "/a/b~1c" into ("/a", "b/c").
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let idx = path
        .rfind('/')
        .ok_or_else(|| format!("invalid JSON pointer: {path}"))?;
    let last = path[idx + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&path[..idx], last))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) if last == "-" => {
            a.push(value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index: {last}"))?;
            if i > a.len() {
                return Err(format!(
                    "add operation does not apply: index {i} out of bounds"
                ));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!(
            "add operation does not apply: doc is missing path: \"{path}\""
        )),
    }
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let missing = || format!("remove operation does not apply: doc is missing path: \"{path}\"");
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last).ok_or_else(missing),
        Some(Value::Array(a)) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

/// Evaluates a label selector string (`a=b,c!=d,e,!f,g in (x,y),h notin (z)`).
fn label_selector_matches(selector: &str, labels: &Map<String, Value>) -> Result<bool, String> {
    for requirement in split_top_level(selector) {
        let r = requirement.trim();
        if r.is_empty() {
            continue;
        }
        let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
        let ok = if let Some((k, v)) = r.split_once("!=") {
            label(k) != Some(v.trim())
        } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
            label(k) == Some(v.trim())
        } else if let Some((k, set)) = r.split_once(" notin ") {
            label(k).is_none_or(|l| !parse_set(set).contains(&l))
        } else if let Some((k, set)) = r.split_once(" in ") {
            label(k).is_some_and(|l| parse_set(set).contains(&l))
        } else if let Some(k) = r.strip_prefix('!') {
            label(k).is_none()
        } else if r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._/".contains(c))
        {
            label(r).is_some()
        } else {
            return Err(format!("unable to parse requirement: {r}"));
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_set(set: &str) -> Vec<&str> {
    set.trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .collect()
}

/// Evaluates a metav1.LabelSelector object (matchLabels + matchExpressions).
fn label_selector_object_matches(selector: &Value, labels: &Map<String, Value>) -> bool {
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

fn field_selector_matches(res: &Resource, selector: &str, obj: &Value) -> Result<bool, ApiError> {
    for requirement in selector.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let (field, negate, value) = match requirement.split_once("!=") {
            Some((f, v)) => (f, true, v),
            None => match requirement
                .split_once("==")
                .or_else(|| requirement.split_once('='))
            {
                Some((f, v)) => (f, false, v),
                None => {
                    return Err(ApiError::bad_request(format!(
                        "invalid selector: '{requirement}'"
                    )))
                }
            },
        };
        let actual = match (field.trim(), res.workload) {
            ("metadata.name", _) => meta_str(obj, "name"),
            ("metadata.namespace", _) => meta_str(obj, "namespace"),
            ("type", None) => obj.get("type").and_then(Value::as_str).unwrap_or(""),
            (f, _) => {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {f}"
                )))
            }
        };
        if (actual == value.trim()) == negate {
            return Ok(false);
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------
// Small JSON helpers
// ---------------------------------------------------------------------------

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `obj[field]` as a mutable map, created (or replacing a non-object) if needed.
fn obj_field<'a>(obj: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    obj_field_of(obj.as_object_mut().unwrap(), field)
}

fn obj_field_of<'a>(map: &'a mut Map<String, Value>, field: &str) -> &'a mut Map<String, Value> {
    let slot = map.entry(field.to_string()).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().unwrap()
}

/// Renders a value roughly as Go's `%#v` would in validation messages.
fn go_value(v: &Value) -> String {
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

/// Five characters from the apimachinery "safe" alphabet, for generateName.
fn random_suffix() -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5]
        .iter()
        .map(|b| ALPHANUMS[usize::from(*b) % ALPHANUMS.len()] as char)
        .collect()
}

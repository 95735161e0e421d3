//! In-process fake of the Kubernetes API server, for tests that drive a real
//! `kube::Client`.
//!
//! The fake serves plain HTTP on 127.0.0.1 (OS-chosen port) and implements the
//! slice of the API the rotator uses: get and update of core/v1 Secrets, get and
//! strategic merge patch of apps/v1 Deployments and StatefulSets, get and merge
//! patch of ExternalSecrets and SealedSecrets (`custom`), Event creation
//! (`events`), API group discovery (`/apis`) and TokenReviews. It tries hard to
//! behave like the real kube-apiserver (v1.31) on that slice, because production
//! code is tested against it:
//!
//! * one global, monotonically increasing `resourceVersion`, bumped on every
//!   write that changes an object (no-op writes do not bump it, like the real
//!   server);
//! * optimistic concurrency: PUT / PATCH carrying a stale `resourceVersion` (or
//!   a foreign `uid`) get 409 Conflict;
//! * JSON merge patch and strategic merge patch (maps merge recursively, known
//!   lists merge by key) (`patch`);
//! * decoding like the real server: unknown fields are pruned (with a
//!   `Warning` header), type errors are 400, defaults are filled in, validation
//!   errors are 422 with a `Status` body shaped like the real one (`objects`);
//! * Secret `stringData` folded into `data`, base64 checked and canonicalised;
//! * a simulated workload controller: `generation` / `observedGeneration`,
//!   rolling-update status during a rollout, `ProgressDeadlineExceeded`,
//!   paused Deployments, StatefulSet revisions / partitions / `OnDelete`;
//!   status changes made by that controller are writes too (they bump
//!   `resourceVersion`), so a GET-modify-PUT racing a rollout conflicts just as
//!   it would against a real cluster (`workloads`);
//! * fault injection (`faults`) and a request log for assertions (`http`).
//!
//! Requests the rotator never sends (create, list, watch, delete, JSON patch,
//! server-side apply, dry runs, subresources) get 405 naming what the fake does not
//! serve, so a new kind of request shows up as a clear failure rather than a
//! made-up answer.
//!
//! The controller is simulated lazily: the status is recomputed from recorded
//! `Instant`s whenever an object is read or written, so there are no background
//! tasks and results depend only on elapsed time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

mod custom;
mod events;
mod faults;
mod http;
mod objects;
mod patch;
mod workloads;

pub use custom::{label_for, unseal, unseal_with_label, EsoRelease, Unsealer};
pub use faults::Fault;
use http::handle;
use objects::{b64_decode, b64_encode, meta_str, obj_field};
use workloads::Workload;

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

impl KubeFake {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start() -> KubeFake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake apiserver");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::new()));
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

    /// Deletes Secret `ns/name` (as `kubectl delete secret` would; nothing if absent).
    pub fn delete_secret(&self, ns: &str, name: &str) {
        self.lock().secrets.remove(&key(ns, name));
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
// Server state
// ---------------------------------------------------------------------------

/// A panicking test must not poison the fake for everyone else.
fn lock(state: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

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
    fn new() -> State {
        State {
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
}

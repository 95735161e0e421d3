//! The HTTP side: routing paths to resources, the request log, and errors rendered as
//! `metav1.Status` exactly like the real server.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::faults::{take_fault, take_stall};
use super::objects::{go_value, Resource};
use super::{custom, lock, RequestRecord, State, TOKEN_REVIEWS};

impl State {
    pub(super) fn serve(&mut self, mut record: RequestRecord, req: Incoming) -> Response {
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
    pub(super) fn token_review(&mut self, mut record: RequestRecord, body: &Bytes) -> Response {
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

    pub(super) fn dispatch(&mut self, req: &Incoming) -> ApiResult {
        if req.query.contains_key("dryRun") {
            return Err(ApiError::unsupported("dryRun"));
        }
        let (res, namespace, name, subresource) = match &req.route {
            Route::Groups if req.method == Method::GET => return Ok(Reply::ok(self.api_groups())),
            Route::Groups => return Err(ApiError::method_not_allowed()),
            Route::Unknown {
                built_in: true,
                resource,
                ..
            } => return Err(ApiError::unsupported(&format!("{resource} (not modelled)"))),
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
        if let Some(subresource) = subresource {
            return Err(ApiError::unsupported(&format!(
                "the {subresource} subresource"
            )));
        }
        let (Some(ns), Some(name)) = (namespace.as_deref(), name.as_deref()) else {
            let verb = verb_of(&req.method, &req.route, &req.query);
            return Err(ApiError::unsupported(verb));
        };
        match req.method {
            Method::GET => self
                .current(res, ns, name)
                .map(Reply::ok)
                .ok_or_else(|| ApiError::not_found(res, name)),
            Method::PUT => self.replace(res, ns, name, req),
            Method::PATCH => self.patch(res, ns, name, req),
            Method::DELETE => Err(ApiError::unsupported("delete")),
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    /// `GET /apis` (what `Client::list_api_groups` reads): the apps group and the custom
    /// resources' groups at the versions they are served.
    pub(super) fn api_groups(&self) -> Value {
        let apps = json!({
            "name": "apps",
            "versions": [{ "groupVersion": "apps/v1", "version": "v1" }],
            "preferredVersion": { "groupVersion": "apps/v1", "version": "v1" },
        });
        let mut groups = vec![apps];
        groups.extend(self.custom_groups());
        json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
    }
}

/// The parsed request handed to the handlers.
pub(super) struct Incoming {
    pub(super) method: Method,
    pub(super) route: Route,
    pub(super) query: BTreeMap<String, String>,
    pub(super) content_type: Option<String>,
    pub(super) body: Bytes,
}

pub(super) async fn handle(
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

pub(super) fn verb_of(
    method: &Method,
    route: &Route,
    query: &BTreeMap<String, String>,
) -> &'static str {
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

pub(super) fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
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

pub(super) enum Route {
    /// API group discovery (`/apis`).
    Groups,
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
        /// In a group every real API server serves (the core group, `apps`, `coordination.k8s.io`
        /// ...): a real server would answer for it, the fake does not model it.
        built_in: bool,
    },
}

/// The API group versions every real API server serves, beside the core group. A resource in
/// them that the fake does not model gets 405, not the 404 of a CRD that is not installed or
/// of a version no longer served: kube's `get_opt` reads a 404 as "absent", which would make a
/// request the fake cannot answer look like one that found nothing.
const BUILT_IN_GROUP_VERSIONS: &[(&str, &str)] = &[
    ("apps", "v1"),
    ("batch", "v1"),
    ("autoscaling", "v1"),
    ("autoscaling", "v2"),
    ("coordination.k8s.io", "v1"),
    ("discovery.k8s.io", "v1"),
    ("events.k8s.io", "v1"),
    ("networking.k8s.io", "v1"),
    ("node.k8s.io", "v1"),
    ("policy", "v1"),
    ("rbac.authorization.k8s.io", "v1"),
    ("scheduling.k8s.io", "v1"),
    ("storage.k8s.io", "v1"),
    ("certificates.k8s.io", "v1"),
    ("admissionregistration.k8s.io", "v1"),
    ("apiextensions.k8s.io", "v1"),
    ("authentication.k8s.io", "v1"),
    ("authorization.k8s.io", "v1"),
    ("flowcontrol.apiserver.k8s.io", "v1"),
];

impl Route {
    pub(super) fn parse(path: &str) -> Route {
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        match segs.as_slice() {
            ["apis"] => Route::Groups,
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
            ["apis", group, version, rest @ ..]
                if BUILT_IN_GROUP_VERSIONS.contains(&(*group, *version)) =>
            {
                Route::resource(group, rest)
            }
            _ => Route::Unknown {
                resource: String::new(),
                namespace: None,
                name: None,
                built_in: false,
            },
        }
    }

    /// Parses `namespaces/{ns}/{plural}[/{name}[/{sub}]]` or `{plural}` (all namespaces) of a
    /// group version every API server serves: what the fake does not model is `built_in`.
    pub(super) fn resource(group: &str, rest: &[&str]) -> Route {
        let (namespace, plural, tail) = match rest {
            ["namespaces", ns, plural, tail @ ..] => (Some(ns.to_string()), *plural, tail),
            [plural] => (None, *plural, &[][..]),
            _ => {
                return Route::Unknown {
                    resource: rest.first().unwrap_or(&"").to_string(),
                    namespace: None,
                    name: None,
                    built_in: true,
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
                built_in: true,
            },
        }
    }

    /// `namespaces/{ns}/{plural}/{name}[/{sub}]` of a custom resource.
    pub(super) fn custom(kind: &'static custom::CustomKind, version: &str, rest: &[&str]) -> Route {
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
                built_in: false,
            },
        }
    }

    pub(super) fn resource_name(&self) -> String {
        match self {
            Route::Groups => String::new(),
            Route::Custom { kind, .. } => kind.plural.to_string(),
            Route::Resource { res, .. } => res.plural.to_string(),
            Route::Events { .. } => "events".to_string(),
            Route::Unknown { resource, .. } => resource.clone(),
        }
    }
    pub(super) fn namespace(&self) -> Option<String> {
        match self {
            Route::Resource { namespace, .. }
            | Route::Unknown { namespace, .. }
            | Route::Events { namespace, .. }
            | Route::Custom { namespace, .. } => namespace.clone(),
            Route::Groups => None,
        }
    }
    pub(super) fn name(&self) -> Option<String> {
        match self {
            Route::Resource { name, .. }
            | Route::Unknown { name, .. }
            | Route::Events { name, .. }
            | Route::Custom { name, .. } => name.clone(),
            Route::Groups => None,
        }
    }
}

#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) code: u16,
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) details: Option<Value>,
}

/// One field-level validation failure (a `causes` entry of an Invalid status).
pub(super) struct FieldError {
    pub(super) field: String,
    /// FieldValueInvalid, FieldValueRequired, FieldValueForbidden, FieldValueTooLong, ...
    pub(super) reason: &'static str,
    /// e.g. `Invalid value: "x": field is immutable`.
    pub(super) detail: String,
}

impl FieldError {
    pub(super) fn invalid(field: &str, value: &Value, why: &str) -> FieldError {
        FieldError {
            field: field.into(),
            reason: "FieldValueInvalid",
            detail: format!("Invalid value: {}: {why}", go_value(value)),
        }
    }
    pub(super) fn required(field: &str) -> FieldError {
        FieldError {
            field: field.into(),
            reason: "FieldValueRequired",
            detail: "Required value".into(),
        }
    }
    pub(super) fn forbidden(field: &str, why: &str) -> FieldError {
        FieldError {
            field: field.into(),
            reason: "FieldValueForbidden",
            detail: format!("Forbidden: {why}"),
        }
    }
}

impl ApiError {
    pub(super) fn new(
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

    pub(super) fn not_found(res: &Resource, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" not found", res.qualified());
        ApiError::new(404, "NotFound", msg, Some(res.details(name)))
    }

    /// 404 for a path the server has no handler for.
    pub(super) fn no_route() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        )
    }

    pub(super) fn conflict_with(res: &Resource, name: &str, why: &str) -> ApiError {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            res.qualified()
        );
        ApiError::new(409, "Conflict", msg, Some(res.details(name)))
    }

    pub(super) fn conflict(res: &Resource, name: &str) -> ApiError {
        ApiError::conflict_with(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub(super) fn already_exists(res: &Resource, name: &str) -> ApiError {
        let msg = format!("{} \"{name}\" already exists", res.qualified());
        ApiError::new(409, "AlreadyExists", msg, Some(res.details(name)))
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message, None)
    }

    /// The 400 the real server gives when a body cannot be decoded into the type.
    pub(super) fn undecodable(res: &Resource, why: impl std::fmt::Display) -> ApiError {
        let version = res.api_version.rsplit('/').next().unwrap_or("v1");
        ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: {why}",
            kind = res.kind
        ))
    }

    pub(super) fn invalid(res: &Resource, name: &str, errors: Vec<FieldError>) -> ApiError {
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

    pub(super) fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        )
    }

    /// A request the rotator never sends, so the fake does not serve it.
    pub(super) fn unsupported(what: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{what} is not supported by the fake apiserver"),
            None,
        )
    }

    /// A PATCH whose media type the resource does not take, in apiserver's words
    /// (k8s.io/apiserver pkg/endpoints/handlers/negotiation/errors.go,
    /// `errUnsupportedMediaType`); custom resources take no strategic merge patch
    /// (apiextensions-apiserver's pkg/apiserver/customresource_handler.go leaves it out for them).
    pub(super) fn unsupported_media_type(custom_resource: bool) -> ApiError {
        let accepted = if custom_resource {
            "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
        } else {
            "application/json-patch+json, application/merge-patch+json, \
             application/strategic-merge-patch+json, application/apply-patch+yaml"
        };
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {accepted}"
            ),
            None,
        )
    }

    pub(super) fn to_status(&self) -> Value {
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
pub(super) struct Reply {
    pub(super) code: u16,
    pub(super) body: Value,
    pub(super) warnings: Vec<String>,
}

impl Reply {
    pub(super) fn ok(body: Value) -> Reply {
        Reply {
            code: 200,
            body,
            warnings: Vec::new(),
        }
    }
    pub(super) fn created(body: Value) -> Reply {
        Reply {
            code: 201,
            body,
            warnings: Vec::new(),
        }
    }
}

pub(super) type ApiResult = Result<Reply, ApiError>;

//! Fault injection: errors answered instead of (or after) handling matching requests, and
//! stalls, each shaped like the `Status` the real server sends for that code.

use std::time::Duration;

use serde_json::json;

use super::http::ApiError;
use super::objects::Resource;
use super::RequestRecord;

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

    pub(super) fn matches(&self, r: &RequestRecord) -> bool {
        self.times > 0
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&r.method))
            && self.resource.as_deref().is_none_or(|x| x == r.resource)
            && self.name.as_deref().is_none_or(|x| x == r.name)
    }
}

/// Consumes one use of the first matching fault; returns its status code.
pub(super) fn take_stall(
    stalls: &mut Vec<(Fault, Duration)>,
    record: &RequestRecord,
) -> Option<Duration> {
    let (fault, delay) = stalls.iter_mut().find(|(f, _)| f.matches(record))?;
    fault.times -= 1;
    let delay = *delay;
    stalls.retain(|(f, _)| f.times > 0);
    Some(delay)
}

pub(super) fn take_fault(faults: &mut Vec<Fault>, record: &RequestRecord) -> Option<u16> {
    let fault = faults.iter_mut().find(|f| f.matches(record))?;
    fault.times -= 1;
    let code = fault.status;
    faults.retain(|f| f.times > 0);
    Some(code)
}

impl ApiError {
    /// The Status a real server would send for `code`, as if produced for this request.
    pub(super) fn injected(code: u16, r: &RequestRecord) -> ApiError {
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
}

//! External Secrets Operator: after the upstream store is written, force the ExternalSecret to
//! sync and wait until the Secret it writes holds the expected credential.
//!
//! ESO serves `external-secrets.io/v1` since 0.16 and only v1 since 0.17 (v1beta1 is
//! `served: false`); 0.15 and older serve v1beta1 but no v1. Discovery picks v1 whenever it
//! is served.

use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use super::kubernetes::SecretStore;
use super::{format, Store, StoreError};
use crate::config::SyncConfig;
use crate::kube_api::describe_kube_error;
use crate::secret::Credential;

/// ESO reconciles an ExternalSecret when this annotation changes (its documented force-sync).
pub const FORCE_SYNC: &str = "force-sync";
const POLL: Duration = Duration::from_millis(250);
const GROUP: &str = "external-secrets.io";
/// The versions that carry ExternalSecret with the fields used here, preferred first.
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

pub struct ExternalSecretSync {
    config: SyncConfig,
    client: kube::Client,
    /// Built on first use, for the version the API server serves.
    api: OnceCell<Api<DynamicObject>>,
    secret: SecretStore,
}

impl ExternalSecretSync {
    pub fn new(client: kube::Client, config: &SyncConfig) -> Self {
        ExternalSecretSync {
            secret: SecretStore::new(
                client.clone(),
                &config.namespace,
                &config.secret,
                &config.key,
            ),
            client,
            api: OnceCell::new(),
            config: config.clone(),
        }
    }

    /// The ExternalSecret API at the version discovery lists (only served versions are
    /// listed), v1 when served, else v1beta1.
    async fn api(&self) -> Result<&Api<DynamicObject>, StoreError> {
        self.api
            .get_or_try_init(|| async {
                let groups = self
                    .client
                    .list_api_groups()
                    .await
                    .map_err(|e| self.error(describe_kube_error(&e)))?;
                let served: Vec<String> = groups
                    .groups
                    .iter()
                    .filter(|g| g.name == GROUP)
                    .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
                    .collect();
                let version = VERSIONS
                    .into_iter()
                    .find(|v| served.iter().any(|s| s == v))
                    .ok_or_else(|| match served.is_empty() {
                        true => StoreError::Missing {
                            store: self.describe(),
                            what: format!(
                                "the API group {GROUP} (is the External Secrets Operator installed?)"
                            ),
                        },
                        false => self.error(format!(
                            "the API server serves {GROUP} {}, neither v1 nor v1beta1; upgrade the External Secrets Operator to 0.16 or later",
                            served.join(", ")
                        )),
                    })?;
                let resource =
                    ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, version, "ExternalSecret"));
                Ok(Api::namespaced_with(
                    self.client.clone(),
                    &self.config.namespace,
                    &resource,
                ))
            })
            .await
    }

    fn missing(&self) -> StoreError {
        StoreError::Missing {
            store: self.describe(),
            what: format!(
                "the ExternalSecret {}/{}",
                self.config.namespace, self.config.external_secret
            ),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "externalsecret {}/{} -> secret {}#{}",
            self.config.namespace, self.config.external_secret, self.config.secret, self.config.key
        )
    }

    fn error(&self, cause: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            cause: cause.into(),
        }
    }

    /// Forces a sync, then waits up to `timeout` until the Secret holds `expected`.
    pub async fn sync(&self, expected: &Credential, timeout: Duration) -> Result<(), StoreError> {
        // A new value each time: ESO reacts to a change of the annotation, not its presence.
        let stamp = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let patch = json!({ "metadata": { "annotations": { FORCE_SYNC: stamp } } });
        self.api()
            .await?
            .patch(
                &self.config.external_secret,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 404 => self.missing(),
                _ => self.error(describe_kube_error(&e)),
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.holds(expected).await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "the Secret did not get the expected credential within {}s of forcing a sync{}; check the ExternalSecret (kubectl describe externalsecret -n {} {}: its events carry the provider's error)",
                    timeout.as_secs(),
                    self.failure().await.map(|f| format!(" ({f})")).unwrap_or_default(),
                    self.config.namespace,
                    self.config.external_secret
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// What ESO reports when its last reconcile failed: `markAsFailed` sets the Ready condition
    /// False with a reason and one of its fixed messages (externalsecret_controller.go), the
    /// provider's own error going to an event. `None` when it does not say so, or cannot be read.
    async fn failure(&self) -> Option<String> {
        let es = self
            .api()
            .await
            .ok()?
            .get(&self.config.external_secret)
            .await
            .ok()?;
        let ready = es.data["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?;
        (ready["status"] == "False").then(|| {
            format!(
                "ESO reports Ready=False, {}: {}",
                ready["reason"].as_str().unwrap_or("no reason"),
                ready["message"].as_str().unwrap_or("no message")
            )
        })
    }

    /// Preflight: ESO must honour a force-sync, and the Secret must already hold the current
    /// credential, or the sync is broken before the run starts (and a rollback could not wait
    /// for it to come back).
    pub async fn check_holds(&self, current: &Credential) -> Result<(), StoreError> {
        let es = self
            .api()
            .await?
            .get(&self.config.external_secret)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 404 => self.missing(),
                _ => self.error(describe_kube_error(&e)),
            })?;
        if let Some(message) = never_refreshes(&es.data["spec"]) {
            return Err(StoreError::Format {
                store: self.describe(),
                message,
            });
        }
        if self.holds(current).await? {
            return Ok(());
        }
        Err(self.error(format!(
            "the Secret does not hold the credential the first store holds, so ESO is not syncing it; fix the ExternalSecret first (kubectl describe externalsecret -n {} {})",
            self.config.namespace, self.config.external_secret
        )))
    }

    /// Whether the Secret's key carries `expected`; an absent Secret or key is "not yet".
    async fn holds(&self, expected: &Credential) -> Result<bool, StoreError> {
        let value = match self.secret.read().await {
            Ok(Some(value)) => value,
            Ok(None) | Err(StoreError::Missing { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        match format::credential_from(&value, &self.config.format, &expected.user) {
            Ok(found) => Ok(&found == expected),
            Err(error) => Err(StoreError::Format {
                store: self.describe(),
                message: error.to_string(),
            }),
        }
    }
}

/// Why ESO would ignore a force-sync of an ExternalSecret with this spec, if it would. ESO's
/// `shouldRefresh` returns before looking at annotations once the object has synced when
/// `refreshPolicy` is `CreatedOnce`, or `Periodic` (the default) with `refreshInterval` <= 0.
fn never_refreshes(spec: &Value) -> Option<String> {
    let policy = spec["refreshPolicy"].as_str().unwrap_or("");
    let interval = spec["refreshInterval"].as_str();
    let fix = "set spec.refreshPolicy to OnChange (or Periodic with a non-zero spec.refreshInterval) so that ESO honours the force-sync";
    match policy {
        "CreatedOnce" => Some(format!(
            "spec.refreshPolicy is CreatedOnce: ESO never copies a new value into the Secret, so a rotation could never reach the workload; {fix}"
        )),
        "OnChange" => None,
        _ => match interval.map(go_duration_sign) {
            Some(Some(sign)) if sign <= 0 => Some(format!(
                "spec.refreshInterval is {}{}: ESO then syncs only once and ignores force-sync, so a rotation could never reach the workload; {fix}",
                interval.unwrap_or_default(),
                if policy.is_empty() { "" } else { " with spec.refreshPolicy Periodic" },
            )),
            _ => None,
        },
    }
}

/// The sign of a Go duration string (`time.ParseDuration`: "0", "1h30m", "-5s", "0.5ms"),
/// or `None` when it is not one.
fn go_duration_sign(text: &str) -> Option<i8> {
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut nonzero = false;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|&n| n > 0)?;
        let number = &rest[..digits];
        if number == "." || number.matches('.').count() > 1 {
            return None;
        }
        nonzero |= number.chars().any(|c| ('1'..='9').contains(&c));
        rest = &rest[digits..];
        let unit = ["ns", "us", "\u{b5}s", "\u{3bc}s", "ms", "s", "m", "h"]
            .into_iter()
            .filter(|u| rest.starts_with(u))
            .max_by_key(|u| u.len())?;
        rest = &rest[unit.len()..];
    }
    Some(match (nonzero, negative) {
        (false, _) => 0,
        (true, false) => 1,
        (true, true) => -1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        for (text, sign) in [
            ("0", Some(0)),
            ("0s", Some(0)),
            ("0h0m0s", Some(0)),
            ("0.0ms", Some(0)),
            ("1h", Some(1)),
            ("1h0m0s", Some(1)),
            ("0.5s", Some(1)),
            ("10\u{b5}s", Some(1)),
            ("-5m", Some(-1)),
            ("", None),
            ("5", None),
            ("1d", None),
            ("h", None),
        ] {
            assert_eq!(go_duration_sign(text), sign, "{text:?}");
        }
    }

    #[test]
    fn refuses_what_eso_never_refreshes() {
        let refused = |spec: Value| never_refreshes(&spec);
        let message =
            refused(json!({ "refreshPolicy": "CreatedOnce", "refreshInterval": "1h" })).unwrap();
        assert!(
            message.contains("spec.refreshPolicy is CreatedOnce"),
            "{message}"
        );
        assert!(
            message.contains("set spec.refreshPolicy to OnChange"),
            "{message}"
        );
        let message =
            refused(json!({ "refreshPolicy": "Periodic", "refreshInterval": "0s" })).unwrap();
        assert!(
            message.contains("spec.refreshInterval is 0s with"),
            "{message}"
        );
        assert!(refused(json!({ "refreshInterval": "0" })).is_some());
        assert!(refused(json!({ "refreshInterval": "1h0m0s" })).is_none());
        assert!(
            refused(json!({ "refreshPolicy": "Periodic", "refreshInterval": "15m" })).is_none()
        );
        assert!(refused(json!({ "refreshPolicy": "OnChange", "refreshInterval": "0s" })).is_none());
        // The CRD defaults refreshInterval to 1h0m0s.
        assert!(refused(json!({})).is_none());
    }
}

//! External Secrets Operator: after the upstream store is written, force the ExternalSecret to
//! sync and wait until the Secret it writes holds the expected credential.

use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::json;

use super::kubernetes::{describe_kube_error, SecretStore};
use super::{format, Store, StoreError};
use crate::config::SyncConfig;
use crate::secret::Credential;

/// ESO reconciles an ExternalSecret when this annotation changes (its documented force-sync).
pub const FORCE_SYNC: &str = "force-sync";
const POLL: Duration = Duration::from_millis(250);

pub struct ExternalSecretSync {
    config: SyncConfig,
    api: Api<DynamicObject>,
    secret: SecretStore,
}

impl ExternalSecretSync {
    pub fn new(client: kube::Client, config: &SyncConfig) -> Self {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "external-secrets.io",
            "v1beta1",
            "ExternalSecret",
        ));
        ExternalSecretSync {
            api: Api::namespaced_with(client.clone(), &config.namespace, &resource),
            secret: SecretStore::new(client, &config.namespace, &config.secret, &config.key),
            config: config.clone(),
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
        self.api
            .patch(
                &self.config.external_secret,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 404 => StoreError::Missing {
                    store: self.describe(),
                    what: format!(
                        "the ExternalSecret {}/{}",
                        self.config.namespace, self.config.external_secret
                    ),
                },
                _ => self.error(describe_kube_error(&e)),
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.holds(expected).await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "the Secret did not get the expected credential within {}s of forcing a sync; check the ExternalSecret's status (kubectl describe externalsecret -n {} {})",
                    timeout.as_secs(),
                    self.config.namespace,
                    self.config.external_secret
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Preflight: the Secret must already hold the current credential, or the sync is broken
    /// before the run starts (and a rollback could not wait for it to come back).
    pub async fn check_holds(&self, current: &Credential) -> Result<(), StoreError> {
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
            Err(message) => Err(StoreError::Format {
                store: self.describe(),
                message,
            }),
        }
    }
}

//! A key in a Kubernetes Secret: read-modify-write under the resourceVersion precondition.

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

use super::{Store, StoreError, StoreSettings};
use crate::config::{At, Errors, Validate};
use crate::kube_api::{describe_kube_error, is_conflict, retry_on_conflict, Attempt};
use crate::secret::Secret;

/// `kind = "kubernetes"`: a key of a Secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SecretConfig {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub secret: String,
    #[serde(default)]
    pub key: String,
}

impl Validate for SecretConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        errors.require(&self.namespace, at, "namespace");
        errors.require(&self.secret, at, "secret");
        errors.require(&self.key, at, "key");
    }
}

impl StoreSettings for SecretConfig {
    fn key(&self) -> &str {
        &self.key
    }

    fn describe(&self) -> String {
        describe(&self.namespace, &self.secret, &self.key)
    }

    fn uses_kubernetes(&self) -> bool {
        true
    }

    fn open(&self, kube: Option<&kube::Client>) -> Result<Box<dyn Store>, StoreError> {
        let client = super::client(kube, self)?;
        Ok(Box::new(SecretStore::new(
            client.clone(),
            &self.namespace,
            &self.secret,
            &self.key,
        )))
    }
}

fn describe(namespace: &str, name: &str, key: &str) -> String {
    format!("kubernetes secret {namespace}/{name}#{key}")
}

pub struct SecretStore {
    api: Api<KubeSecret>,
    namespace: String,
    name: String,
    key: String,
}

impl SecretStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str, key: &str) -> Self {
        SecretStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            key: key.to_string(),
        }
    }

    fn api_error(&self, error: kube::Error) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            cause: describe_kube_error(&error),
        }
    }

    async fn get(&self) -> Result<KubeSecret, StoreError> {
        match self.api.get_opt(&self.name).await {
            Ok(Some(secret)) => Ok(secret),
            Ok(None) => Err(StoreError::Missing {
                store: self.describe(),
                what: format!("the Secret {}/{}", self.namespace, self.name),
            }),
            Err(e) => Err(self.api_error(e)),
        }
    }

    fn value_of(&self, secret: &KubeSecret) -> Result<Option<Secret>, StoreError> {
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&self.key)) else {
            return Ok(None);
        };
        let text = String::from_utf8(bytes.0.clone()).map_err(|_| StoreError::Format {
            store: self.describe(),
            message: "the value is not UTF-8 text".into(),
        })?;
        Ok(Some(Secret::new(text)))
    }
}

#[async_trait]
impl Store for SecretStore {
    fn describe(&self) -> String {
        describe(&self.namespace, &self.name, &self.key)
    }

    async fn read(&self) -> Result<Option<Secret>, StoreError> {
        let secret = self.get().await?;
        self.value_of(&secret)
    }

    async fn compare_and_swap(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        retry_on_conflict(&self.describe(), "Secret", || async move {
            let mut secret = self.get().await.map_err(Attempt::Failed)?;
            if self.value_of(&secret).map_err(Attempt::Failed)?.as_ref() != expected {
                return Err(Attempt::Failed(StoreError::Conflict {
                    store: self.describe(),
                }));
            }
            let data = secret.data.get_or_insert_with(Default::default);
            match new {
                Some(value) => data.insert(
                    self.key.clone(),
                    ByteString(value.expose().as_bytes().to_vec()),
                ),
                None => data.remove(&self.key),
            };
            // `replace` sends the resourceVersion we read: the server refuses it if anyone wrote since.
            match self
                .api
                .replace(&self.name, &PostParams::default(), &secret)
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_conflict(&e) => Err(Attempt::Conflict(self.api_error(e))),
                Err(e) => Err(Attempt::Failed(self.api_error(e))),
            }
        })
        .await
    }

    /// A write whose answer never came (the call timed out) may still be applied by the API
    /// server later, after the rollback. Changing the Secret once more moves its
    /// resourceVersion, so such a late write carries a stale one and is refused (409).
    async fn settle(&self, value: Option<&Secret>) -> Result<(), StoreError> {
        let mut secret = self.get().await?;
        if self.value_of(&secret)?.as_ref() != value {
            return Err(StoreError::Conflict {
                store: self.describe(),
            });
        }
        secret
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                SETTLED_ANNOTATION.to_string(),
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            );
        self.api
            .replace(&self.name, &PostParams::default(), &secret)
            .await
            .map_err(|e| self.api_error(e))?;
        Ok(())
    }
}

/// Set on a Secret a rollback restored, to fence off late writes (see `settle`).
pub const SETTLED_ANNOTATION: &str = "llmtrace-rotator/settled-at";

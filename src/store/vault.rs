//! A property of a Vault / OpenBao KV v2 secret: written with check-and-set on the version
//! read, every other property kept.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio::sync::OnceCell;

use std::path::PathBuf;

use super::{Store, StoreError, StoreSettings};
use crate::config::{At, Errors, Reference, Validate};
use crate::kube_api::{retry_on_conflict, Attempt};
use crate::resolve::resolve;
use crate::secret::Secret;

/// Where Kubernetes mounts the pod's service account token.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `kind = "vault"`: a property of a Vault/OpenBao KV v2 secret; the property plays the part of the key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct VaultConfig {
    /// `https://vault.example:8200`
    #[serde(default)]
    pub address: String,
    /// The KV v2 mount.
    #[serde(default = "default_mount")]
    pub mount: String,
    #[serde(default)]
    pub path: String,
    /// Sent as `X-Vault-Namespace` (Vault Enterprise, OpenBao namespaces).
    pub namespace: Option<String>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub property: String,
    /// A Vault token, or else `auth.kubernetes`: exactly one of them.
    #[serde(default, deserialize_with = "crate::config::parsed")]
    pub token: Option<Reference>,
    /// Boxed: most stores have none, and configs hold thousands of stores.
    pub auth: Option<Box<VaultAuthConfig>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct VaultAuthConfig {
    pub kubernetes: Option<KubernetesAuth>,
}

/// Kubernetes auth: the pod's service account token is exchanged for a Vault token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct KubernetesAuth {
    #[serde(default)]
    pub role: String,
    #[serde(default = "default_auth_mount")]
    pub mount: String,
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
}

fn default_mount() -> String {
    "secret".into()
}

fn default_auth_mount() -> String {
    "kubernetes".into()
}

fn default_token_file() -> PathBuf {
    SERVICE_ACCOUNT_TOKEN.into()
}

impl Validate for VaultConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        if self.address.is_empty() {
            errors.missing(at.of("address"), "is required");
        } else {
            errors.http_url(&self.address, at, "address", "https://vault:8200");
        }
        self.address = self.address.trim_end_matches('/').to_string();
        errors.require(&self.path, at, "path");
        self.path = self.path.trim_matches('/').to_string();
        if let Some(ca_file) = &mut self.ca_file {
            at.resolve(ca_file);
        }
        errors.require(&self.property, at, "property");
        if let Some(token) = &mut self.token {
            token.resolve(at);
        }
        let kubernetes = match self.auth.as_deref_mut() {
            Some(VaultAuthConfig {
                kubernetes: Some(k),
            }) => {
                errors.require(
                    &k.role,
                    &At {
                        path: &at.of("auth.kubernetes"),
                        base: at.base,
                    },
                    "role",
                );
                at.resolve(&mut k.token_file);
                true
            }
            Some(VaultAuthConfig { kubernetes: None }) => {
                errors.missing(
                    at.of("auth.kubernetes"),
                    "is required: auth = { kubernetes = { role = \"...\" } }",
                );
                false
            }
            None => false,
        };
        if self.token.is_some() && kubernetes {
            errors.push(
                at.of("auth"),
                "give either token or auth.kubernetes, not both",
            );
        } else if self.token.is_none() && self.auth.is_none() {
            errors.missing(
                at.of("token"),
                "is required (or auth = { kubernetes = { role = \"...\" } })",
            );
        }
    }
}

impl StoreSettings for VaultConfig {
    fn key(&self) -> &str {
        &self.property
    }

    fn describe(&self) -> String {
        format!(
            "vault {} {}/{}#{}",
            self.address, self.mount, self.path, self.property
        )
    }

    fn uses_kubernetes(&self) -> bool {
        self.token.as_ref().is_some_and(Reference::uses_kubernetes)
    }

    fn open(&self, kube: Option<&kube::Client>) -> Result<Box<dyn Store>, StoreError> {
        Ok(Box::new(VaultKv::new(self, &self.property, kube.cloned())))
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub struct VaultKv {
    config: VaultConfig,
    property: String,
    kube: Option<kube::Client>,
    http: Result<reqwest::Client, HttpClientError>,
    /// The configured token, resolved once. Kubernetes logins are never cached: see [`Session`].
    token: OnceCell<Secret>,
}

/// The token one operation uses. A Kubernetes login's token is revoked when the operation
/// ends: otherwise every drift check would leave a live token behind until its TTL.
struct Session {
    token: Secret,
    revoke: bool,
}

/// The secret's properties and the version they were read at.
struct Versioned {
    data: Map<String, Value>,
    version: u64,
}

impl VaultKv {
    pub fn new(config: &VaultConfig, property: &str, kube: Option<kube::Client>) -> Self {
        VaultKv {
            http: http_client(config),
            config: config.clone(),
            property: property.to_string(),
            kube,
            token: OnceCell::new(),
        }
    }

    fn error(&self, cause: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            cause: cause.into(),
        }
    }

    fn http(&self) -> Result<&reqwest::Client, StoreError> {
        self.http.as_ref().map_err(|e| self.error(e.to_string()))
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, StoreError> {
        let mut request = self
            .http()?
            .request(method, format!("{}/v1/{path}", self.config.address));
        if let Some(namespace) = &self.config.namespace {
            request = request.header("X-Vault-Namespace", namespace);
        }
        Ok(request)
    }

    /// A token for one operation: the configured one, or a fresh Kubernetes login.
    async fn session(&self) -> Result<Session, StoreError> {
        match (&self.config.token, self.config.auth.as_deref()) {
            (Some(reference), _) => {
                let token = self
                    .token
                    .get_or_try_init(|| async {
                        resolve(reference, "vault token", self.kube.as_ref())
                            .await
                            .map_err(|e| self.error(e.to_string()))
                    })
                    .await?;
                Ok(Session {
                    token: token.clone(),
                    revoke: false,
                })
            }
            (
                None,
                Some(VaultAuthConfig {
                    kubernetes:
                        Some(KubernetesAuth {
                            role,
                            mount,
                            token_file,
                        }),
                }),
            ) => Ok(Session {
                token: self.kubernetes_login(role, mount, token_file).await?,
                revoke: true,
            }),
            _ => Err(self.error("no token and no auth.kubernetes")),
        }
    }

    async fn kubernetes_login(
        &self,
        role: &str,
        mount: &str,
        token_file: &std::path::Path,
    ) -> Result<Secret, StoreError> {
        let jwt = std::fs::read_to_string(token_file).map_err(|e| {
            self.error(format!(
                "cannot read the service account token {}: {e}",
                token_file.display()
            ))
        })?;
        let body = json!({ "role": role, "jwt": jwt.trim() });
        let request = self.request(reqwest::Method::POST, &format!("auth/{mount}/login"))?;
        let (status, value) = self.send(request.json(&body)).await?;
        if !status.is_success() {
            return Err(self.error(format!(
                "Kubernetes login to Vault as role {role:?} failed: {}",
                vault_errors(status, &value)
            )));
        }
        value["auth"]["client_token"]
            .as_str()
            .map(Secret::new)
            .ok_or_else(|| self.error("the Kubernetes login answered no client_token"))
    }

    /// Revokes a login's token (the `default` policy allows `auth/token/revoke-self`: openbao
    /// vault/policy_store.go). A failure is only logged: the operation is done, and the token
    /// still expires with its TTL.
    async fn end(&self, session: Session) {
        if !session.revoke {
            return;
        }
        let answer = match self.request(reqwest::Method::POST, "auth/token/revoke-self") {
            Ok(request) => {
                self.send(request.header("X-Vault-Token", session.token.expose()))
                    .await
            }
            Err(e) => Err(e),
        };
        let cause = match answer {
            Ok((status, _)) if status.is_success() => return,
            Ok((status, value)) => vault_errors(status, &value),
            Err(e) => e.to_string(),
        };
        tracing::warn!(store = %self.describe(), %cause, "could not revoke the token of the Kubernetes login; it expires with its TTL");
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Value), StoreError> {
        let response = request.send().await.map_err(|e| {
            let why = crate::secret::http_error_text(e);
            self.error(format!("Vault could not be reached: {why}"))
        })?;
        let status = response.status();
        let value = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, value))
    }

    async fn read_versioned(&self, token: &Secret) -> Result<Versioned, StoreError> {
        let request = self
            .request(
                reqwest::Method::GET,
                &format!("{}/data/{}", self.config.mount, self.config.path),
            )?
            .header("X-Vault-Token", token.expose());
        let (status, value) = self.send(request).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(StoreError::Missing {
                store: self.describe(),
                what: format!("the secret {}/{}", self.config.mount, self.config.path),
            });
        }
        if !status.is_success() {
            return Err(self.error(vault_errors(status, &value)));
        }
        let data = match &value["data"]["data"] {
            Value::Object(map) => map.clone(),
            // A deleted latest version reads as null data: treat it as empty.
            Value::Null => Map::new(),
            _ => return Err(self.format_error("the secret's data is not an object")),
        };
        let version = value["data"]["metadata"]["version"]
            .as_u64()
            .ok_or_else(|| {
                self.format_error("the answer has no metadata.version (is the mount KV version 2?)")
            })?;
        Ok(Versioned { data, version })
    }

    fn format_error(&self, message: &str) -> StoreError {
        StoreError::Format {
            store: self.describe(),
            message: message.into(),
        }
    }

    /// Check-and-set on the version read, retried while someone else writes in between.
    async fn swap_with(
        &self,
        token: &Secret,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        retry_on_conflict(&self.describe(), "the secret", || async move {
            let mut secret = self.read_versioned(token).await.map_err(Attempt::Failed)?;
            if self.value_of(&secret).map_err(Attempt::Failed)?.as_ref() != expected {
                return Err(Attempt::Failed(StoreError::Conflict {
                    store: self.describe(),
                }));
            }
            match new {
                Some(value) => secret.data.insert(
                    self.property.clone(),
                    Value::String(value.expose().to_string()),
                ),
                None => secret.data.remove(&self.property),
            };
            let body = json!({ "options": { "cas": secret.version }, "data": secret.data });
            let request = self
                .request(
                    reqwest::Method::POST,
                    &format!("{}/data/{}", self.config.mount, self.config.path),
                )
                .map_err(Attempt::Failed)?
                .header("X-Vault-Token", token.expose())
                .json(&body);
            let (status, answer) = self.send(request).await.map_err(Attempt::Failed)?;
            if status.is_success() {
                return Ok(());
            }
            let error = self.error(vault_errors(status, &answer));
            if is_cas_mismatch(status, &answer) {
                return Err(Attempt::Conflict(error));
            }
            Err(Attempt::Failed(error))
        })
        .await
    }

    fn value_of(&self, secret: &Versioned) -> Result<Option<Secret>, StoreError> {
        match secret.data.get(&self.property) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(Secret::new(text.as_str()))),
            Some(_) => Err(self.format_error("the property is not a string")),
        }
    }
}

/// Why the HTTP client cannot be built (a `ca_file` problem, usually).
#[derive(Debug, thiserror::Error)]
enum HttpClientError {
    #[error("cannot read ca_file {}: {source}", .path.display())]
    ReadCa {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ca_file {} is not a PEM certificate: {source}", .path.display())]
    BadCa {
        path: std::path::PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build an HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

fn http_client(config: &VaultConfig) -> Result<reqwest::Client, HttpClientError> {
    let mut builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca).map_err(|source| HttpClientError::ReadCa {
            path: ca.clone(),
            source,
        })?;
        let certificate =
            reqwest::Certificate::from_pem(&pem).map_err(|source| HttpClientError::BadCa {
                path: ca.clone(),
                source,
            })?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build().map_err(HttpClientError::Build)
}

/// Vault's own error list; it names paths and policies, never secret data.
fn vault_errors(status: reqwest::StatusCode, value: &Value) -> String {
    let errors: Vec<&str> = value["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if errors.is_empty() {
        format!("Vault answered {status}")
    } else {
        format!("Vault answered {status}: {}", errors.join("; "))
    }
}

fn is_cas_mismatch(status: reqwest::StatusCode, value: &Value) -> bool {
    status == reqwest::StatusCode::BAD_REQUEST
        && value["errors"].to_string().contains("check-and-set")
}

#[async_trait]
impl Store for VaultKv {
    fn describe(&self) -> String {
        self.config.describe()
    }

    async fn read(&self) -> Result<Option<Secret>, StoreError> {
        let session = self.session().await?;
        let result = self
            .read_versioned(&session.token)
            .await
            .and_then(|secret| self.value_of(&secret));
        self.end(session).await;
        result
    }

    async fn compare_and_swap(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        let session = self.session().await?;
        let result = self.swap_with(&session.token, expected, new).await;
        self.end(session).await;
        result
    }
}

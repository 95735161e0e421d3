//! A key of a Bitnami SealedSecret: sealed the way `kubeseal` seals it for the scope the object's
//! annotations select, written to the cluster object, then awaited in the Secret the controller
//! unseals it into (what pods read).
//!
//! The controller decrypts every key with the label `labelFor` derives from the SealedSecret's
//! own annotations (bitnami-labs/sealed-secrets
//! pkg/apis/sealedsecrets/v1alpha1/sealedsecret_expansion.go), and one key that fails fails the
//! whole object, so each write seals with that label.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use rsa::pkcs8::DecodePublicKey;
use rsa::{Oaep, RsaPublicKey};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::kubernetes::SecretStore;
use super::{Store, StoreError, StoreSettings};
use crate::config::{At, Errors, Validate};
use crate::kube_api::{describe_kube_error, is_conflict, retry_on_conflict, Attempt};
use crate::secret::Secret;

/// The sealed-secrets controller unseals within seconds; one minute covers a busy one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `kind = "sealedsecret"`: a key of a SealedSecret, read back from the Secret the controller
/// unseals it into.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SealedSecretConfig {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub key: String,
    /// The controller's public certificate (PEM), as `kubeseal --cert` takes it: a file, or
    /// `certificate_url` (`http://sealed-secrets-controller.kube-system:8080/v1/cert.pem`).
    pub certificate: Option<PathBuf>,
    pub certificate_url: Option<String>,
    /// SHA-256 of the certificate (DER, as `openssl x509 -noout -fingerprint -sha256` prints
    /// it), lower-case hex once validated: a fetched certificate must match it.
    pub certificate_sha256: Option<String>,
    /// How long to wait for the controller to unseal a write into the Secret.
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::config::duration"
    )]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

impl Validate for SealedSecretConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        errors.require(&self.namespace, at, "namespace");
        errors.require(&self.name, at, "name");
        errors.require(&self.key, at, "key");
        match (&mut self.certificate, &self.certificate_url) {
            (Some(file), None) => at.resolve(file),
            (None, Some(url)) => errors.http_url(
                url,
                at,
                "certificate_url",
                "http://sealed-secrets-controller.kube-system:8080/v1/cert.pem",
            ),
            (Some(_), Some(_)) => errors.push(
                at.of("certificate"),
                "give either certificate or certificate_url, not both",
            ),
            (None, None) if !errors.reported(&at.of("certificate_url")) => errors.missing(
                at.of("certificate"),
                "is required: the controller's certificate PEM file (kubeseal --fetch-cert), or certificate_url",
            ),
            (None, None) => {}
        }
        if let Some(pin) = &mut self.certificate_sha256 {
            // openssl prints `AB:CD:...`; `sha256sum` prints plain hex.
            let hex: String = pin.chars().filter(|c| *c != ':').collect();
            if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                *pin = hex.to_ascii_lowercase();
            } else {
                errors.push(
                    at.of("certificate_sha256"),
                    "is not a SHA-256 fingerprint (64 hex digits, colons allowed: openssl x509 -noout -fingerprint -sha256 -in cert.pem)",
                );
            }
        }
    }
}

impl StoreSettings for SealedSecretConfig {
    fn key(&self) -> &str {
        &self.key
    }

    fn describe(&self) -> String {
        format!("sealedsecret {}/{}#{}", self.namespace, self.name, self.key)
    }

    fn uses_kubernetes(&self) -> bool {
        true
    }

    fn open(&self, kube: Option<&kube::Client>) -> Result<Box<dyn Store>, StoreError> {
        let client = super::client(kube, self)?;
        Ok(Box::new(SealedStore::new(client.clone(), self, &self.key)))
    }
}

const POLL: Duration = Duration::from_millis(250);
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
const CLUSTER_WIDE: &str = "sealedsecrets.bitnami.com/cluster-wide";
const NAMESPACE_WIDE: &str = "sealedsecrets.bitnami.com/namespace-wide";

pub struct SealedStore {
    config: SealedSecretConfig,
    key: String,
    api: Api<DynamicObject>,
    /// The Secret the controller unseals into, whole (its owners and annotations).
    secrets: Api<k8s_openapi::api::core::v1::Secret>,
    secret: SecretStore,
    public_key: OnceCell<RsaPublicKey>,
}

impl SealedStore {
    pub fn new(client: kube::Client, config: &SealedSecretConfig, key: &str) -> Self {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "bitnami.com",
            "v1alpha1",
            "SealedSecret",
        ));
        SealedStore {
            api: Api::namespaced_with(client.clone(), &config.namespace, &resource),
            secrets: Api::namespaced(client.clone(), &config.namespace),
            secret: SecretStore::new(client, &config.namespace, &config.name, key),
            config: config.clone(),
            key: key.to_string(),
            public_key: OnceCell::new(),
        }
    }

    fn error(&self, cause: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            cause: cause.into(),
        }
    }

    async fn public_key(&self) -> Result<&RsaPublicKey, StoreError> {
        self.public_key
            .get_or_try_init(|| async {
                let pem = match (&self.config.certificate, &self.config.certificate_url) {
                    (Some(path), _) => std::fs::read(path).map_err(|e| {
                        self.error(format!("cannot read certificate {}: {e}", path.display()))
                    })?,
                    (None, Some(url)) => self.fetch_certificate(url).await?,
                    (None, None) => return Err(self.error("no certificate configured")),
                };
                public_key_from_pem(
                    &pem,
                    self.config.certificate_sha256.as_deref(),
                    chrono::Utc::now(),
                )
                .map_err(|m| self.error(format!("certificate: {m}")))
            })
            .await
    }

    async fn fetch_certificate(&self, url: &str) -> Result<Vec<u8>, StoreError> {
        let fetch = async {
            let response = reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .build()?
                .get(url)
                .send()
                .await?
                .error_for_status()?;
            Ok::<_, reqwest::Error>(response.bytes().await?.to_vec())
        };
        fetch
            .await
            .map_err(|e| self.error(format!("cannot fetch the certificate from {url}: {e}")))
    }

    async fn seal(&self, value: &Secret, label: &str) -> Result<String, StoreError> {
        let key = self.public_key().await?;
        let sealed = hybrid_encrypt(key, value.expose().as_bytes(), label.as_bytes())
            .map_err(|e| self.error(e.to_string()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(sealed))
    }

    /// Seals `value` for the object's scope as read, and writes `spec.encryptedData[key]` under
    /// the resourceVersion it was read at (so a scope change in between is a conflict).
    async fn write(&self, value: Option<&Secret>) -> Result<(), StoreError> {
        retry_on_conflict(&self.describe(), "SealedSecret", || async move {
            let object = self
                .api
                .get_opt(&self.config.name)
                .await
                .map_err(|e| Attempt::Failed(self.error(describe_kube_error(&e))))?
                .ok_or_else(|| {
                    Attempt::Failed(StoreError::Missing {
                        store: self.describe(),
                        what: format!(
                            "the SealedSecret {}/{}",
                            self.config.namespace, self.config.name
                        ),
                    })
                })?;
            let sealed = match value {
                Some(value) => {
                    let label = label_for(&object, &self.config.namespace, &self.config.name);
                    Some(self.seal(value, &label).await.map_err(Attempt::Failed)?)
                }
                None => None,
            };
            let patch = json!({
                "metadata": { "resourceVersion": object.metadata.resource_version },
                "spec": { "encryptedData": { &self.key: sealed } },
            });
            let error = |e: kube::Error| self.error(describe_kube_error(&e));
            match self
                .api
                .patch(
                    &self.config.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_conflict(&e) => Err(Attempt::Conflict(error(e))),
                Err(e) => Err(Attempt::Failed(error(e))),
            }
        })
        .await
    }

    /// Polls the unsealed Secret until it holds `value`, or the timeout passes.
    async fn wait_for(&self, value: Option<&Secret>) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.config.timeout;
        loop {
            if self.secret.read().await?.as_ref() == value {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "the controller did not unseal the new value into the Secret within {}s; is the sealed-secrets controller running, and is the certificate its current one?",
                    self.config.timeout.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn seal_and_write(&self, value: Option<&Secret>) -> Result<(), StoreError> {
        self.write(value).await
    }
}

#[async_trait]
impl Store for SealedStore {
    fn describe(&self) -> String {
        self.config.describe()
    }

    /// What pods see: the unsealed Secret. Loads the certificate first, so that preflight (which
    /// reads every store) refuses one that cannot seal before anything changes.
    async fn read(&self) -> Result<Option<Secret>, StoreError> {
        self.public_key().await?;
        self.secret.read().await
    }

    /// The controller unseals only into a Secret it controls, or one annotated for it to manage
    /// or patch (pkg/controller/controller.go, `unseal`); any other Secret of that name keeps
    /// its value, so a rotation would wait out `timeout` and roll back. Refused here instead.
    async fn preflight(&self) -> Result<(), StoreError> {
        let error = |e: kube::Error| self.error(describe_kube_error(&e));
        let Some(sealed) = self.api.get_opt(&self.config.name).await.map_err(error)? else {
            // Reported as missing where the run reads it.
            return Ok(());
        };
        let secret = self
            .secrets
            .get_opt(&self.config.name)
            .await
            .map_err(error)?;
        if let Some(why) = unwritable_by_controller(&sealed, secret.as_ref(), &self.key) {
            return Err(StoreError::Format {
                store: self.describe(),
                message: why,
            });
        }
        // An absent Secret is made by the controller, controlled by the SealedSecret.
        if secret.is_none_or(|secret| managed_by(&secret, &sealed)) {
            return Ok(());
        }
        let (ns, name) = (&self.config.namespace, &self.config.name);
        Err(StoreError::Format {
            store: self.describe(),
            message: format!(
                "the Secret {ns}/{name} is not managed by the SealedSecret (no controller \
                 reference to it, no sealedsecrets.bitnami.com/managed or patch annotation \
                 \"true\"), so the controller will not unseal a new value into it; annotate it \
                 (kubectl -n {ns} annotate secret {name} sealedsecrets.bitnami.com/managed=true) \
                 or delete it for the controller to make it again"
            ),
        })
    }

    async fn compare_and_swap(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        if self.secret.read().await?.as_ref() != expected {
            return Err(StoreError::Conflict {
                store: self.describe(),
            });
        }
        self.seal_and_write(new).await?;
        // On a timeout the Secret still shows `expected`; the rollback's `settle` seals it back.
        self.wait_for(new).await
    }

    /// The Secret must hold what the SealedSecret holds. Without the controller's private key
    /// that is judged from the controller's own report (`status`, written by
    /// `updateSealedSecretStatus` in pkg/controller/controller.go): a failed unseal, or a spec
    /// the controller has not unsealed (a GitOps revert while it is down), is drift.
    async fn check_source(&self) -> Result<(), StoreError> {
        let object = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.error(describe_kube_error(&e)))?
            .ok_or_else(|| StoreError::Missing {
                store: self.describe(),
                what: format!(
                    "the SealedSecret {}/{}",
                    self.config.namespace, self.config.name
                ),
            })?;
        let drift = |message: String| Err(self.error(message));
        if object.data["spec"]["encryptedData"][&self.key].is_null() {
            if self.secret.read().await?.is_some() {
                return drift(format!(
                    "the SealedSecret has no encryptedData.{} but the Secret has the key; the next unseal removes it",
                    self.key
                ));
            }
            return Ok(());
        }
        let status = &object.data["status"];
        // A controller started with --update-status=false reports nothing to compare.
        if status.is_null() {
            return Ok(());
        }
        let synced = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Synced");
        if let Some(condition) = synced.filter(|c| c["status"] == "False") {
            return drift(format!(
                "the controller cannot unseal the SealedSecret ({}), so the Secret does not hold what it holds; reseal it with the controller's current certificate",
                condition["message"].as_str().unwrap_or("no message")
            ));
        }
        let generation = object.metadata.generation.unwrap_or(0);
        let observed = status["observedGeneration"].as_i64().unwrap_or(0);
        if observed < generation {
            return drift(format!(
                "the controller has not unsealed the SealedSecret's current spec (generation {generation}, last unsealed {observed}), so the Secret holds an older value; is the sealed-secrets controller running?"
            ));
        }
        Ok(())
    }

    /// The SealedSecret may hold this run's value even though the Secret does not show it yet
    /// (a crash while waiting for the controller): seal `value` again so nothing unseals later.
    async fn settle(&self, value: Option<&Secret>) -> Result<(), StoreError> {
        self.seal_and_write(value).await?;
        self.wait_for(value).await
    }
}

/// Why the controller could never put a new `key` into `secret` from `sealed`, if it could
/// not: `Unseal` renders `spec.template.data` after `encryptedData`, so a template entry of the
/// same key wins (pkg/apis/sealedsecrets/v1alpha1/sealedsecret_expansion.go), and the API
/// server refuses any change to an immutable Secret's data (the controller's update then fails:
/// pkg/controller/controller.go, `isImmutableError`).
fn unwritable_by_controller(
    sealed: &DynamicObject,
    secret: Option<&k8s_openapi::api::core::v1::Secret>,
    key: &str,
) -> Option<String> {
    if !sealed.data["spec"]["template"]["data"][key].is_null() {
        return Some(format!(
            "the SealedSecret's spec.template.data sets {key}, which the controller renders over \
             encryptedData.{key}: a new sealed value would never reach the Secret; remove it from \
             the template"
        ));
    }
    if secret.is_some_and(|s| s.immutable == Some(true)) {
        return Some(
            "the Secret is immutable: its data can never change, so the controller cannot put a \
             new value in it; delete it for the controller to make it again (without `immutable` \
             in the SealedSecret's template)"
                .to_string(),
        );
    }
    None
}

/// Whether the controller writes `secret` for `sealed`: it controls it, or the Secret is
/// annotated for it to manage or patch (pkg/controller/controller.go, `unseal`).
fn managed_by(secret: &k8s_openapi::api::core::v1::Secret, sealed: &DynamicObject) -> bool {
    let controlled = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && Some(&r.uid) == sealed.metadata.uid.as_ref());
    let annotated = |name: &str| {
        let annotations = secret.metadata.annotations.as_ref();
        annotations
            .and_then(|a| a.get(name))
            .is_some_and(|v| v == "true")
    };
    controlled
        || annotated("sealedsecrets.bitnami.com/managed")
        || annotated("sealedsecrets.bitnami.com/patch")
}

/// The controller's `labelFor`: cluster-wide → empty, namespace-wide → the namespace,
/// otherwise (strict) `namespace/name`, from the SealedSecret's own annotations ("true" only).
fn label_for(object: &DynamicObject, namespace: &str, name: &str) -> String {
    let annotation = |key: &str| {
        object
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .is_some_and(|v| v == "true")
    };
    if annotation(CLUSTER_WIDE) {
        String::new()
    } else if annotation(NAMESPACE_WIDE) {
        namespace.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// Why the sealing certificate is refused. Names what is wrong with it; it holds nothing secret.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("not PEM text")]
    NotText,
    #[error("not PEM: no BEGIN line")]
    NoBegin,
    #[error("not PEM: no END line")]
    NoEnd,
    #[error("not PEM: unterminated END line")]
    UnterminatedEnd,
    /// (The PEM error type implements no `std::error::Error` here, so it is not a source.)
    #[error("not PEM: {0}")]
    Pem(rsa::pkcs8::der::pem::Error),
    #[error("its SHA-256 fingerprint is {found}, but certificate_sha256 pins {pin}; the certificate was replaced (or the controller's key renewed: pin the new one after checking it)")]
    Pinned { found: String, pin: String },
    #[error("expired on {}; fetch the controller's current one (kubeseal --fetch-cert)", .0.format("%Y-%m-%d %H:%M:%S UTC"))]
    Expired(chrono::DateTime<chrono::Utc>),
    #[error("expected a CERTIFICATE or PUBLIC KEY, found {0}")]
    Label(String),
    #[error("not an RSA public key: {0}")]
    NotRsa(#[source] rsa::pkcs8::spki::Error),
    #[error("malformed DER")]
    MalformedDer,
    #[error("not an X.509 certificate")]
    NotX509,
    #[error("bad certificate time")]
    TimeNotText,
    #[error("bad UTCTime")]
    UtcTime,
    #[error("bad certificate validity")]
    Validity,
    #[error("bad certificate time {0:?}")]
    Time(String),
}

/// Why sealing a value failed; never holds the value.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no randomness for the session key: {0}")]
    Randomness(#[source] rand::rand_core::OsError),
    #[error("RSA-OAEP failed: {0}")]
    Rsa(#[source] rsa::Error),
    #[error("RSA key too large")]
    KeyTooLarge,
    #[error("AES-GCM failed")]
    Aes,
}

/// The first PEM block of `text` (a chain lists the controller's certificate first).
fn first_pem_block(text: &str) -> Result<&str, CertificateError> {
    let start = text.find("-----BEGIN ").ok_or(CertificateError::NoBegin)?;
    let end_line = text[start..]
        .find("-----END ")
        .map(|i| start + i)
        .ok_or(CertificateError::NoEnd)?;
    let end = text[end_line + 9..]
        .find("-----")
        .map(|i| end_line + 9 + i + 5)
        .ok_or(CertificateError::UnterminatedEnd)?;
    Ok(&text[start..end])
}

/// An RSA public key from a PEM `CERTIFICATE` (what `kubeseal --fetch-cert` prints; in a chain,
/// the first one, as kubeseal's `ParseKey` takes it) or a bare `PUBLIC KEY`. Like `ParseKey`,
/// refuses an expired certificate; with `pin`, the block's SHA-256 must match.
fn public_key_from_pem(
    pem: &[u8],
    pin: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<RsaPublicKey, CertificateError> {
    let text = std::str::from_utf8(pem).map_err(|_| CertificateError::NotText)?;
    let (label, der) = rsa::pkcs8::der::pem::decode_vec(first_pem_block(text)?.as_bytes())
        .map_err(CertificateError::Pem)?;
    if let Some(pin) = pin {
        let found = hex(&Sha256::digest(&der));
        if found != pin {
            return Err(CertificateError::Pinned {
                found,
                pin: pin.to_string(),
            });
        }
    }
    let spki = match label {
        "CERTIFICATE" => {
            let (not_after, spki) = certificate_fields(&der)?;
            if now > not_after {
                return Err(CertificateError::Expired(not_after));
            }
            spki
        }
        "PUBLIC KEY" => &der[..],
        other => return Err(CertificateError::Label(other.to_string())),
    };
    RsaPublicKey::from_public_key_der(spki).map_err(CertificateError::NotRsa)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const SEQUENCE: u8 = 0x30;

/// One DER element at the start of some input.
struct Der<'a> {
    tag: u8,
    /// Header and contents.
    whole: &'a [u8],
    contents: &'a [u8],
    /// The input after this element.
    rest: &'a [u8],
}

fn der_element(input: &[u8]) -> Result<Der<'_>, CertificateError> {
    let bad = || CertificateError::MalformedDer;
    let tag = *input.first().ok_or_else(bad)?;
    let first = *input.get(1).ok_or_else(bad)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return Err(bad());
        }
        let bytes = input.get(2..2 + n).ok_or_else(bad)?;
        (
            bytes.iter().fold(0usize, |a, b| (a << 8) | *b as usize),
            2 + n,
        )
    };
    let end = header.checked_add(len).ok_or_else(bad)?;
    let whole = input.get(..end).ok_or_else(bad)?;
    Ok(Der {
        tag,
        whole,
        contents: &whole[header..],
        rest: &input[end..],
    })
}

/// The notAfter time and the SubjectPublicKeyInfo of an X.509 certificate (RFC 5280 §4.1):
/// the fifth and seventh fields of tbsCertificate, counting the optional `[0] version`.
fn certificate_fields(
    der: &[u8],
) -> Result<(chrono::DateTime<chrono::Utc>, &[u8]), CertificateError> {
    let sequence = |input| {
        der_element(input).and_then(|e| {
            (e.tag == SEQUENCE)
                .then_some(e)
                .ok_or(CertificateError::NotX509)
        })
    };
    let certificate = sequence(der)?.contents;
    let mut tbs = sequence(certificate)?.contents;
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs)?.rest;
    }
    // serialNumber, signature, issuer
    for _ in 0..3 {
        tbs = der_element(tbs)?.rest;
    }
    let validity = sequence(tbs)?;
    let not_before = der_element(validity.contents)?;
    let not_after = x509_time(&der_element(not_before.rest)?)?;
    // validity, subject
    tbs = der_element(validity.rest)?.rest;
    Ok((not_after, sequence(tbs)?.whole))
}

/// RFC 5280 §4.1.2.5: UTCTime `YYMMDDHHMMSSZ` (years 1950-2049) or GeneralizedTime
/// `YYYYMMDDHHMMSSZ`.
fn x509_time(element: &Der<'_>) -> Result<chrono::DateTime<chrono::Utc>, CertificateError> {
    let text = std::str::from_utf8(element.contents).map_err(|_| CertificateError::TimeNotText)?;
    let full = match element.tag {
        0x17 => {
            let year: u32 = text
                .get(..2)
                .and_then(|y| y.parse().ok())
                .ok_or(CertificateError::UtcTime)?;
            format!("{}{text}", if year >= 50 { "19" } else { "20" })
        }
        0x18 => text.to_string(),
        _ => return Err(CertificateError::Validity),
    };
    chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%SZ")
        .map(|t| t.and_utc())
        .map_err(|_| CertificateError::Time(text.to_string()))
}

/// kubeseal's HybridEncrypt: a random AES-256-GCM session key (zero nonce: the key is used
/// once) sealed with RSA-OAEP SHA-256 under `label`; output is
/// `u16 BE length of the RSA ciphertext || RSA ciphertext || AES-GCM ciphertext`.
fn hybrid_encrypt(
    key: &RsaPublicKey,
    plaintext: &[u8],
    label: &[u8],
) -> Result<Vec<u8>, SealError> {
    use aes_gcm::aead::{Aead, KeyInit};
    use aes_gcm::{Aes256Gcm, Nonce};
    use rand::TryRngCore as _;

    let mut session = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng
        .try_fill_bytes(&mut session[..])
        .map_err(SealError::Randomness)?;
    let label = String::from_utf8_lossy(label).into_owned();
    let sealed_key = key
        .encrypt(
            &mut rsa::rand_core::OsRng,
            Oaep::new_with_label::<sha2::Sha256, _>(label),
            &session[..],
        )
        .map_err(SealError::Rsa)?;
    let length = u16::try_from(sealed_key.len()).map_err(|_| SealError::KeyTooLarge)?;
    let cipher = Aes256Gcm::new_from_slice(&session[..]).expect("32-byte key");
    let body = cipher
        .encrypt(Nonce::from_slice(&[0u8; 12]), plaintext)
        .map_err(|_| SealError::Aes)?;
    let mut out = Vec::with_capacity(2 + sealed_key.len() + body.len());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&sealed_key);
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_in_long_form() {
        let mut input = vec![0x30, 0x81, 0x80];
        input.extend(std::iter::repeat_n(0u8, 0x80));
        input.push(0x05);
        let element = der_element(&input).unwrap();
        assert_eq!(element.tag, SEQUENCE);
        assert_eq!(element.whole.len(), 131);
        assert_eq!(element.contents.len(), 128);
        assert_eq!(element.rest, &[5u8][..]);
        assert!(der_element(&[0x30, 0x05, 0x00]).is_err(), "truncated");
    }

    #[test]
    fn reads_both_x509_time_forms() {
        let time = |tag: u8, text: &str| {
            let mut der = vec![tag, text.len() as u8];
            der.extend(text.as_bytes());
            x509_time(&der_element(&der).unwrap()).map(|t| t.to_rfc3339())
        };
        assert_eq!(
            time(0x17, "491231235959Z").unwrap(),
            "2049-12-31T23:59:59+00:00"
        );
        assert_eq!(
            time(0x17, "500101000000Z").unwrap(),
            "1950-01-01T00:00:00+00:00"
        );
        assert_eq!(
            time(0x18, "21060201000000Z").unwrap(),
            "2106-02-01T00:00:00+00:00"
        );
        assert!(time(0x04, "491231235959Z").is_err());
        assert!(time(0x17, "4912Z").is_err());
    }

    #[test]
    fn finds_the_first_pem_block() {
        let chain = "junk\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            first_pem_block(chain).unwrap(),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
        );
        assert!(first_pem_block("-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
    }

    #[test]
    fn rejects_pem_that_is_not_a_key() {
        let pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let now = chrono::Utc::now();
        assert!(public_key_from_pem(pem.as_bytes(), None, now).is_err());
        assert!(public_key_from_pem(b"not pem", None, now).is_err());
    }
}

//! AWS Secrets Manager: the new value goes in as an AWSPENDING version, then AWSCURRENT moves
//! to it (what External Secrets and SDK clients read); undo moves AWSCURRENT back to the
//! version that held it, so no history is rewritten.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::sigv4::{self, Credentials};
use super::{Store, StoreError, StoreSettings};
use crate::config::{At, Errors, Validate};
use crate::secret::Secret;

/// `kind = "aws"`: AWS Secrets Manager; `property` names the JSON property, none the whole string.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AwsConfig {
    #[serde(default)]
    pub secret_id: String,
    #[serde(default)]
    pub region: String,
    /// Another Secrets Manager endpoint (a VPC endpoint, an emulator).
    pub endpoint: Option<String>,
    #[serde(default)]
    pub property: String,
}

impl Validate for AwsConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        errors.require(&self.secret_id, at, "secret_id");
        errors.require(&self.region, at, "region");
        if let Some(endpoint) = &mut self.endpoint {
            errors.http_url(endpoint, at, "endpoint", "");
            *endpoint = endpoint.trim_end_matches('/').to_string();
        }
    }
}

impl StoreSettings for AwsConfig {
    fn key(&self) -> &str {
        &self.property
    }

    fn describe(&self) -> String {
        match self.property.as_str() {
            "" => format!("aws secret {}", self.secret_id),
            property => format!("aws secret {}#{property}", self.secret_id),
        }
    }

    fn open(&self, _kube: Option<&kube::Client>) -> Result<Box<dyn Store>, StoreError> {
        Ok(Box::new(AwsSecret::new(self, &self.property)))
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts of a PutSecretValue whose answer was lost or a server error: safe to repeat, since
/// the same ClientRequestToken makes it idempotent.
const PUT_ATTEMPTS: u32 = 3;
const CURRENT: &str = "AWSCURRENT";
const PENDING: &str = "AWSPENDING";
const PREVIOUS: &str = "AWSPREVIOUS";

pub struct AwsSecret {
    config: AwsConfig,
    /// The JSON key inside SecretString; `None` means the whole string.
    property: Option<String>,
    http: reqwest::Client,
    credentials: OnceCell<Credentials>,
}

/// Which version holds which staging labels.
struct Versions(Map<String, Value>);

impl Versions {
    fn holding(&self, label: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, stages)| {
                stages
                    .as_array()
                    .is_some_and(|s| s.iter().any(|x| x == label))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl AwsSecret {
    pub fn new(config: &AwsConfig, property: &str) -> Self {
        AwsSecret {
            config: config.clone(),
            property: Some(property.to_string()).filter(|p| !p.is_empty()),
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("HTTP client"),
            credentials: OnceCell::new(),
        }
    }

    fn error(&self, cause: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            cause: cause.into(),
        }
    }

    fn endpoint(&self) -> String {
        self.config.endpoint.clone().unwrap_or_else(|| {
            format!(
                "https://secretsmanager.{}.amazonaws.com",
                self.config.region
            )
        })
    }

    /// One Secrets Manager call (JSON 1.1 protocol, SigV4 signed).
    async fn call(&self, operation: &str, body: Value) -> Result<Value, StoreError> {
        self.call_once(operation, &body).await.map_err(|(e, _)| e)
    }

    /// [`Self::call`], with whether repeating it could succeed: no answer, or a 5xx.
    async fn call_once(&self, operation: &str, body: &Value) -> Result<Value, (StoreError, bool)> {
        let final_error = |e: StoreError| (e, false);
        let credentials = self
            .credentials
            .get_or_try_init(|| sigv4::credentials(&self.http, &self.config.region))
            .await
            .map_err(|e| final_error(self.error(e.to_string())))?;
        let endpoint = self.endpoint();
        let url = url::Url::parse(&endpoint)
            .map_err(|_| final_error(self.error(format!("endpoint {endpoint:?} is not a URL"))))?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            _ => {
                return Err(final_error(
                    self.error(format!("endpoint {endpoint:?} has no host")),
                ))
            }
        };
        let target = format!("secretsmanager.{operation}");
        let payload = zeroize::Zeroizing::new(serde_json::to_vec(body).expect("JSON"));
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target.as_str()),
        ];
        let signed = sigv4::sign(
            credentials,
            &self.config.region,
            "secretsmanager",
            &host,
            &headers,
            &payload,
            chrono::Utc::now(),
        );
        let mut request = self.http.post(url).body(payload.to_vec());
        for (name, value) in headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(signed)
        {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| {
            let why = crate::secret::http_error_text(e);
            let error = self.error(format!("Secrets Manager could not be reached: {why}"));
            (error, true)
        })?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(answer);
        }
        // Error types and messages name the secret and the problem, never its value.
        let kind = answer["__type"]
            .as_str()
            .unwrap_or("error")
            .rsplit('#')
            .next()
            .unwrap_or("error")
            .to_string();
        let message = answer["message"]
            .as_str()
            .or(answer["Message"].as_str())
            .unwrap_or("")
            .to_string();
        if kind == "ResourceNotFoundException" {
            return Err(final_error(StoreError::Missing {
                store: self.describe(),
                what: format!("the secret {}", self.config.secret_id),
            }));
        }
        let error = self.error(format!("{operation} answered {status} {kind}: {message}"));
        Err((error, status.is_server_error()))
    }

    async fn describe_secret(&self) -> Result<Value, StoreError> {
        self.call(
            "DescribeSecret",
            json!({ "SecretId": self.config.secret_id }),
        )
        .await
    }

    async fn versions(&self) -> Result<Versions, StoreError> {
        Ok(versions_of(&self.describe_secret().await?))
    }

    /// PutSecretValue, repeated while its answer is lost or a server error. The token is the
    /// same for every attempt, so a version the first attempt created is answered again,
    /// not duplicated (Secrets Manager's documented idempotency; a token reused with another
    /// value is refused).
    async fn put_pending(
        &self,
        current: &str,
        whole: &Secret,
        target: &Secret,
    ) -> Result<String, StoreError> {
        let put = json!({
            "SecretId": self.config.secret_id,
            "ClientRequestToken": request_token(&self.describe(), current, whole, target),
            "SecretString": target.expose(),
            "VersionStages": [PENDING],
        });
        let mut attempt = 1;
        let answer = loop {
            match self.call_once("PutSecretValue", &put).await {
                Ok(answer) => break answer,
                Err((error, true)) if attempt < PUT_ATTEMPTS => {
                    tracing::info!(store = %self.describe(), attempt, cause = %error, "PutSecretValue got no usable answer; repeating it with the same token");
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                    attempt += 1;
                }
                Err((error, _)) => return Err(error),
            }
        };
        answer["VersionId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.error("PutSecretValue answered no VersionId"))
    }

    async fn secret_string(&self, version: &str) -> Result<Secret, StoreError> {
        let answer = self
            .call(
                "GetSecretValue",
                json!({ "SecretId": self.config.secret_id, "VersionId": version }),
            )
            .await?;
        answer["SecretString"]
            .as_str()
            .map(Secret::new)
            .ok_or_else(|| {
                self.format_error(
                    "the secret has no SecretString (binary secrets are not supported)",
                )
            })
    }

    fn format_error(&self, message: &str) -> StoreError {
        StoreError::Format {
            store: self.describe(),
            message: message.into(),
        }
    }

    /// The store's value inside a whole SecretString.
    fn value_in(&self, whole: &Secret) -> Result<Option<Secret>, StoreError> {
        let Some(property) = &self.property else {
            return Ok(Some(whole.clone()));
        };
        let parsed: Value = serde_json::from_str(whole.expose())
            .map_err(|_| self.format_error("SecretString is not a JSON object"))?;
        match parsed.get(property) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(Secret::new(text.as_str()))),
            Some(_) => Err(self.format_error("the property is not a string")),
        }
    }

    /// `whole` with the property set to `new` (or removed); every other property kept.
    fn with_value(&self, whole: &Secret, new: Option<&Secret>) -> Result<Secret, StoreError> {
        let Some(property) = &self.property else {
            return new
                .cloned()
                .ok_or_else(|| self.format_error("a whole-string secret cannot be emptied"));
        };
        let mut parsed: Map<String, Value> = serde_json::from_str(whole.expose())
            .map_err(|_| self.format_error("SecretString is not a JSON object"))?;
        match new {
            Some(value) => {
                parsed.insert(property.clone(), Value::String(value.expose().to_string()))
            }
            None => parsed.remove(property),
        };
        Ok(Secret::new(serde_json::to_string(&parsed).expect("JSON")))
    }

    async fn move_label(
        &self,
        label: &str,
        to: Option<&str>,
        from: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut body = json!({ "SecretId": self.config.secret_id, "VersionStage": label });
        if let Some(to) = to {
            body["MoveToVersionId"] = json!(to);
        }
        if let Some(from) = from {
            body["RemoveFromVersionId"] = json!(from);
        }
        self.call("UpdateSecretVersionStage", body)
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Store for AwsSecret {
    fn describe(&self) -> String {
        self.config.describe()
    }

    async fn read(&self) -> Result<Option<Secret>, StoreError> {
        // AWSCURRENT is the default; naming it also holds on emulators that cache a default version.
        let answer = self
            .call(
                "GetSecretValue",
                json!({ "SecretId": self.config.secret_id, "VersionStage": CURRENT }),
            )
            .await?;
        let whole = answer["SecretString"]
            .as_str()
            .map(Secret::new)
            .ok_or_else(|| {
                self.format_error(
                    "the secret has no SecretString (binary secrets are not supported)",
                )
            })?;
        self.value_in(&whole)
    }

    async fn compare_and_swap(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        let versions = self.versions().await?;
        let current = versions
            .holding(CURRENT)
            .pop()
            .ok_or_else(|| self.format_error("no version is AWSCURRENT"))?;
        let whole = self.secret_string(&current).await?;
        if self.value_in(&whole)?.as_ref() != expected {
            return Err(StoreError::Conflict {
                store: self.describe(),
            });
        }
        self.tidy().await?;
        let target = self.with_value(&whole, new)?;
        // Undo: when the previous version already holds what is wanted, make it current again.
        for previous in versions.holding(PREVIOUS) {
            if self.secret_string(&previous).await? == target {
                return self
                    .move_label(CURRENT, Some(&previous), Some(&current))
                    .await;
            }
        }
        let created = self.put_pending(&current, &whole, &target).await?;
        self.move_label(CURRENT, Some(&created), Some(&current))
            .await?;
        self.move_label(PENDING, None, Some(&created)).await
    }

    /// Refuses a secret whose Secrets Manager rotation is on: its rotation Lambda writes
    /// AWSPENDING versions and moves AWSCURRENT on its own schedule, so the two would overwrite
    /// each other's passwords, and `tidy` could strip a pending version the Lambda is using.
    async fn preflight(&self) -> Result<(), StoreError> {
        if self.describe_secret().await?["RotationEnabled"] == json!(true) {
            return Err(self.format_error(&format!(
                "Secrets Manager rotation is enabled on this secret (RotationEnabled): its rotation function changes the password on its own schedule and uses AWSPENDING, which this rotation would overwrite or remove. Let one of the two rotate it: turn AWS rotation off (aws secretsmanager cancel-rotate-secret --secret-id {}) or remove this store",
                self.config.secret_id
            )));
        }
        Ok(())
    }

    /// Removes an AWSPENDING label a crash left behind (on any version but the current one),
    /// unless AWS rotation is on (then the label may be its rotation function's).
    async fn tidy(&self) -> Result<(), StoreError> {
        let answer = self.describe_secret().await?;
        if answer["RotationEnabled"] == json!(true) {
            tracing::warn!(store = %self.describe(), "AWS rotation is enabled on this secret: AWSPENDING left alone");
            return Ok(());
        }
        let versions = versions_of(&answer);
        let current = versions.holding(CURRENT);
        for stale in versions.holding(PENDING) {
            if !current.contains(&stale) {
                tracing::info!(store = %self.describe(), "removing a stale AWSPENDING label");
                self.move_label(PENDING, None, Some(&stale)).await?;
            }
        }
        Ok(())
    }
}

fn versions_of(describe: &Value) -> Versions {
    match &describe["VersionIdsToStages"] {
        Value::Object(map) => Versions(map.clone()),
        _ => Versions(Map::new()),
    }
}

/// The ClientRequestToken of one write: the same for every attempt of the same write, so a
/// repeat after a lost answer is idempotent. Stores do not see the run id, so it is derived
/// from the store, the version being replaced, and both values. Both values are hashed in:
/// every write the rotator makes replaces or restores a generated password, so the token
/// (which CloudTrail records) cannot be used to guess a weak one.
fn request_token(store: &str, current: &str, whole: &Secret, target: &Secret) -> String {
    let mut hasher = Sha256::new();
    for part in [
        "llmtrace-rotator PutSecretValue",
        store,
        current,
        whole.expose(),
        target.expose(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    uuid::Builder::from_random_bytes(digest[..16].try_into().expect("16 bytes"))
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_tokens_repeat_for_the_same_write_only() {
        let (a, b) = (Secret::new("{\"k\":\"a\"}"), Secret::new("{\"k\":\"b\"}"));
        let token = request_token("aws secret s#k", "v1", &a, &b);
        assert_eq!(token, request_token("aws secret s#k", "v1", &a, &b));
        assert_eq!(token.len(), 36, "Secrets Manager takes 32 to 64 characters");
        for other in [
            request_token("aws secret s#k", "v2", &a, &b),
            request_token("aws secret t#k", "v1", &a, &b),
            request_token("aws secret s#k", "v1", &b, &a),
            request_token("aws secret s#k", "v1", &a, &a),
        ] {
            assert_ne!(token, other);
        }
        assert!(uuid::Uuid::parse_str(&token).is_ok());
    }
}

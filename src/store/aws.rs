//! AWS Secrets Manager: the new value goes in as an AWSPENDING version, then AWSCURRENT moves
//! to it (what External Secrets and SDK clients read); undo moves AWSCURRENT back to the
//! version that held it, so no history is rewritten.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio::sync::OnceCell;

use super::sigv4::{self, Credentials};
use super::{Store, StoreError};
use crate::config::AwsStore;
use crate::secret::Secret;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CURRENT: &str = "AWSCURRENT";
const PENDING: &str = "AWSPENDING";
const PREVIOUS: &str = "AWSPREVIOUS";

pub struct AwsSecret {
    config: AwsStore,
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
    pub fn new(config: &AwsStore, property: &str) -> Self {
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
        let credentials = self
            .credentials
            .get_or_try_init(|| sigv4::credentials(&self.http, &self.config.region))
            .await
            .map_err(|e| self.error(e))?;
        let endpoint = self.endpoint();
        let url = url::Url::parse(&endpoint)
            .map_err(|_| self.error(format!("endpoint {endpoint:?} is not a URL")))?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            _ => return Err(self.error(format!("endpoint {endpoint:?} has no host"))),
        };
        let target = format!("secretsmanager.{operation}");
        let payload = zeroize::Zeroizing::new(serde_json::to_vec(&body).expect("JSON"));
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
            self.error(format!(
                "Secrets Manager could not be reached: {}",
                e.without_url()
            ))
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
            return Err(StoreError::Missing {
                store: self.describe(),
                what: format!("the secret {}", self.config.secret_id),
            });
        }
        Err(self.error(format!("{operation} answered {status} {kind}: {message}")))
    }

    async fn versions(&self) -> Result<Versions, StoreError> {
        let answer = self
            .call(
                "DescribeSecret",
                json!({ "SecretId": self.config.secret_id }),
            )
            .await?;
        match &answer["VersionIdsToStages"] {
            Value::Object(map) => Ok(Versions(map.clone())),
            _ => Ok(Versions(Map::new())),
        }
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
        match &self.property {
            Some(property) => format!("aws secret {}#{property}", self.config.secret_id),
            None => format!("aws secret {}", self.config.secret_id),
        }
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
        let put = json!({
            "SecretId": self.config.secret_id,
            "ClientRequestToken": uuid::Uuid::new_v4().to_string(),
            "SecretString": target.expose(),
            "VersionStages": [PENDING],
        });
        let answer = self.call("PutSecretValue", put).await?;
        let created = answer["VersionId"]
            .as_str()
            .ok_or_else(|| self.error("PutSecretValue answered no VersionId"))?
            .to_string();
        self.move_label(CURRENT, Some(&created), Some(&current))
            .await?;
        self.move_label(PENDING, None, Some(&created)).await
    }

    /// Removes an AWSPENDING label a crash left behind (on any version but the current one).
    async fn tidy(&self) -> Result<(), StoreError> {
        let versions = self.versions().await?;
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

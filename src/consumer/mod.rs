//! Consumers: the workloads that read the credential and must restart to pick it up.

pub mod command;
pub mod kubernetes;

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::config::{ConsumerConfig, Validate};

/// How often rollout status and health URLs are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("{consumer}: {message}")]
    Refused { consumer: String, message: String },
    #[error("{consumer}: {cause}")]
    Api { consumer: String, cause: String },
    #[error("{consumer}: rollout failed: {message}")]
    RolloutFailed { consumer: String, message: String },
    #[error("{consumer}: not done within {}s: {waiting_for}", .timeout.as_secs_f64())]
    Timeout {
        consumer: String,
        timeout: Duration,
        waiting_for: String,
    },
    #[error("{consumer}: {message}")]
    Command { consumer: String, message: String },
    #[error("{consumer}: health check {url} did not answer 2xx within {}s (last: {last})", .timeout.as_secs_f64())]
    Unhealthy {
        consumer: String,
        url: String,
        timeout: Duration,
        last: String,
    },
}

impl ConsumerError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ConsumerError::Refused { .. } => "consumer_refused",
            ConsumerError::Api { .. } => "consumer_api",
            ConsumerError::RolloutFailed { .. } => "rollout_failed",
            ConsumerError::Timeout { .. } => "rollout_timeout",
            ConsumerError::Command { .. } => "command_failed",
            ConsumerError::Unhealthy { .. } => "unhealthy",
        }
    }
}

/// A workload that can be restarted and waited for.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Names it in reports: `deployment llmtrace/llmtrace`.
    fn describe(&self) -> String;

    /// Checks, changing nothing, that a restart could roll out (not paused, right update strategy).
    async fn preflight(&self) -> Result<(), ConsumerError> {
        Ok(())
    }

    /// Restarts the workload and waits until it has fully rolled out, for at most `timeout`.
    async fn restart(&self, timeout: Duration) -> Result<(), ConsumerError>;
}

/// A consumer kind's settings (the rest of its `[[consumer]]` table), defined in the kind's own
/// file and listed in [`crate::config::ConsumerKind`].
pub trait ConsumerSettings: Validate {
    /// Whether it talks to the Kubernetes API.
    fn uses_kubernetes(&self) -> bool;

    /// Builds the consumer; `None` when it needs a Kubernetes client and there is none.
    fn open(&self, kube: Option<&kube::Client>) -> Option<Box<dyn Consumer>>;
}

/// A configured consumer: the restart, then the optional health URL, all within `timeout`.
pub struct ConsumerHandle {
    pub name: String,
    consumer: Box<dyn Consumer>,
    timeout: Duration,
    health: Option<String>,
}

impl ConsumerHandle {
    pub fn new(
        config: &ConsumerConfig,
        kube: Option<&kube::Client>,
    ) -> Result<Self, ConsumerError> {
        let consumer = config
            .kind
            .settings()
            .open(kube)
            .ok_or_else(|| ConsumerError::Api {
                consumer: config.name.clone(),
                cause: "no Kubernetes client could be configured".into(),
            })?;
        Ok(ConsumerHandle {
            name: config.name.clone(),
            consumer,
            timeout: config.timeout,
            health: config.health.clone(),
        })
    }

    /// A handle on a consumer built elsewhere: the engine's unit tests pass in-memory ones.
    #[cfg(test)]
    pub(crate) fn from_consumer(
        name: &str,
        consumer: Box<dyn Consumer>,
        timeout: Duration,
    ) -> Self {
        ConsumerHandle {
            name: name.to_string(),
            consumer,
            timeout,
            health: None,
        }
    }

    pub fn describe(&self) -> String {
        self.consumer.describe()
    }

    pub async fn preflight(&self) -> Result<(), ConsumerError> {
        self.consumer.preflight().await
    }

    /// Everything, API calls included, ends within `timeout`: a stalled API server fails the
    /// step instead of holding the run.
    pub async fn restart_and_wait(&self) -> Result<(), ConsumerError> {
        let deadline = Instant::now() + self.timeout;
        let work = async {
            self.consumer.restart(self.timeout).await?;
            if let Some(url) = &self.health {
                wait_healthy(&self.consumer.describe(), url, deadline, self.timeout).await?;
            }
            Ok(())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ConsumerError::Timeout {
                    consumer: self.consumer.describe(),
                    timeout: self.timeout,
                    waiting_for: "an answer (the API server or the command stalled)".into(),
                })
            })
    }
}

async fn wait_healthy(
    consumer: &str,
    url: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), ConsumerError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| ConsumerError::Command {
            consumer: consumer.to_string(),
            message: format!("cannot build an HTTP client: {e}"),
        })?;
    loop {
        let last = match client.get(url).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => format!("HTTP {}", response.status().as_u16()),
            Err(e) => crate::secret::http_error_text(e),
        };
        if Instant::now() + POLL_INTERVAL > deadline {
            return Err(ConsumerError::Unhealthy {
                consumer: consumer.to_string(),
                url: url.to_string(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

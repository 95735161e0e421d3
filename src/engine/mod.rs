//! The rotation transaction: plan, steps, rollback, recovery and the report.
//!
//! # Layout
//! - [`plan`]: which targets and consumers a run covers.
//! - [`state`]: the recoverable run state kept (encrypted) in the journal.
//! - [`recorder`]: journals each step boundary and times it.
//! - [`preflight`]: the read-only checks before a run changes anything (and a dry run).
//! - [`run`]: the forward steps and the rollback.
//! - [`recover`]: finishing or undoing interrupted runs.
//! - [`check`]: the drift check (does every stored credential log in?).
//! - [`events`]: Kubernetes Events on the objects a run restarted or wrote.
//! - [`report`]: the text and JSON reports.

pub mod check;
pub mod events;
pub mod plan;
pub mod preflight;
pub mod recorder;
pub mod recover;
pub mod report;
pub mod run;
pub mod state;

use std::sync::Arc;

use crate::backend::{self, Backend};
use crate::config::{Config, JournalLocation, Target};
use crate::consumer::ConsumerHandle;
use crate::journal::{Journal, JournalError};
use crate::resolve::{resolve, ResolveError};
use crate::store::external_secret::ExternalSecretSync;
use crate::store::{self, Store};

pub use report::{Outcome, RunReport};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown target {0:?}: it is not in the config")]
    UnknownTarget(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot set up the Kubernetes client: {0}")]
    KubeConfig(#[source] kube::config::InferConfigError),
    #[error("cannot set up the Kubernetes client: {0}")]
    Kubernetes(#[source] kube::Error),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            EngineError::UnknownTarget(_) => "unknown_target",
            EngineError::Journal(e) => e.metric_label(),
            EngineError::KubeConfig(_) | EngineError::Kubernetes(_) => "kubernetes",
            EngineError::Resolve(_) => "reference",
            EngineError::Internal(_) => "internal",
        }
    }
}

/// Why a target's or consumer's live parts could not be built from the config; each cause is
/// kept, with its own failure label.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A credential reference (the admin password) could not be read.
    #[error(transparent)]
    Reference(#[from] ResolveError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("target {target:?} sync: no Kubernetes client could be configured")]
    SyncWithoutKubernetes { target: String },
    #[error("consumer {0:?} is no longer in the config")]
    UnknownConsumer(String),
    #[error(transparent)]
    Consumer(#[from] crate::consumer::ConsumerError),
}

impl RuntimeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            RuntimeError::Reference(_) => "reference",
            RuntimeError::Store(e) => e.metric_label(),
            RuntimeError::SyncWithoutKubernetes { .. } | RuntimeError::UnknownConsumer(_) => {
                "config"
            }
            RuntimeError::Consumer(e) => e.metric_label(),
        }
    }
}

/// Why a step failed: a message for people and a stable label for the failure counters.
#[derive(Debug, Clone)]
pub struct StepError {
    pub label: &'static str,
    pub message: String,
}

impl StepError {
    pub fn new(label: &'static str, message: impl Into<String>) -> Self {
        StepError {
            label,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

macro_rules! step_error_from {
    ($($error:ty),*) => {$(
        impl From<$error> for StepError {
            fn from(error: $error) -> Self {
                StepError::new(error.metric_label(), error.to_string())
            }
        }
    )*};
}
step_error_from!(
    crate::backend::BackendError,
    crate::store::StoreError,
    crate::consumer::ConsumerError,
    EngineError,
    RuntimeError
);

/// What every step needs that does not depend on the journal: the config and the clients.
pub struct Deps {
    pub config: Config,
    pub kube: Option<kube::Client>,
    /// PostgreSQL admin sessions kept between steps and runs, so each is not a new login.
    pub admin_sessions: Arc<backend::postgres::AdminPool>,
}

impl Deps {
    /// Connects a Kubernetes client (KUBECONFIG or in-cluster) only when the config needs one.
    pub async fn new(config: Config) -> Result<Arc<Deps>, EngineError> {
        let kube = if config.uses_kubernetes() {
            let mut settings = kube::Config::infer()
                .await
                .map_err(EngineError::KubeConfig)?;
            // A stalled API server fails the step instead of holding the run (and SIGTERM).
            let timeout = Some(config.rotator.kubernetes_timeout);
            settings.connect_timeout = timeout;
            settings.read_timeout = timeout;
            settings.write_timeout = timeout;
            Some(kube::Client::try_from(settings).map_err(EngineError::Kubernetes)?)
        } else {
            None
        };
        // One per target acting at once: a run over many targets never holds one per target.
        let admin_sessions = Arc::new(backend::postgres::AdminPool::new(
            config.rotator.max_parallel,
        ));
        Ok(Arc::new(Deps {
            config,
            kube,
            admin_sessions,
        }))
    }

    /// The backend and stores of one target, with its admin password resolved.
    pub async fn target_runtime<'a>(
        &self,
        target: &'a Target,
    ) -> Result<TargetRuntime<'a>, RuntimeError> {
        let field = format!("target {:?} admin.password", target.name);
        let admin_password = match &target.admin_password {
            Some(reference) => resolve(reference, &field, self.kube.as_ref()).await?,
            None => crate::secret::Secret::new(""),
        };
        let stores = target
            .stores
            .iter()
            .map(|s| store::for_config(s, self.kube.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let syncs = match (&self.kube, target.sync.is_empty()) {
            (_, true) => Vec::new(),
            (Some(client), false) => target
                .sync
                .iter()
                .map(|s| ExternalSecretSync::new(client.clone(), s))
                .collect(),
            (None, false) => {
                return Err(RuntimeError::SyncWithoutKubernetes {
                    target: target.name.clone(),
                })
            }
        };
        Ok(TargetRuntime {
            config: target,
            backend: backend::for_target(target, admin_password, &self.admin_sessions),
            stores,
            syncs,
        })
    }

    pub fn consumer(&self, name: &str) -> Result<ConsumerHandle, RuntimeError> {
        let config = self
            .config
            .consumer(name)
            .ok_or_else(|| RuntimeError::UnknownConsumer(name.to_string()))?;
        Ok(ConsumerHandle::new(config, self.kube.as_ref())?)
    }
}

/// One target's live parts for the length of a run.
pub struct TargetRuntime<'a> {
    pub config: &'a Target,
    pub backend: Box<dyn Backend>,
    pub stores: Vec<Box<dyn Store>>,
    /// ExternalSecrets that copy the stores into the Secrets the consumers read.
    pub syncs: Vec<ExternalSecretSync>,
}

/// The dependencies plus the journal: what `rotate`, `recover` and `serve` run on.
pub struct Engine {
    pub deps: Arc<Deps>,
    pub journal: Journal,
}

impl Engine {
    pub async fn new(deps: Arc<Deps>) -> Result<Engine, EngineError> {
        let url = match &deps.config.rotator.journal {
            JournalLocation::Url(url) => url.clone(),
            JournalLocation::Reference(reference) => {
                let url = resolve(reference, "rotator.journal", deps.kube.as_ref()).await?;
                crate::secret::Secret::new(crate::config::resolve_sqlite_path(
                    url.expose(),
                    std::path::Path::new(""),
                ))
            }
        };
        let key = resolve(
            &deps.config.rotator.journal_key,
            "rotator.journal_key",
            deps.kube.as_ref(),
        )
        .await?;
        let journal = Journal::open(&url, &key).await?;
        Ok(Engine { deps, journal })
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    /// Deps without a Kubernetes client, whatever the config asks for; `target` ends target t.
    fn deps(admin_password: &str, target: &str) -> Deps {
        let text = format!(
            r#"
[rotator]
journal = "sqlite://unused.db"
journal_key = "literal:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

[[target]]
name = "t"
kind = "redis"
address = "127.0.0.1:1"
user = "app"
admin = {{ user = "admin", password = "{admin_password}" }}
{target}
"#
        );
        Deps {
            config: Config::parse(&text, std::path::Path::new(".")).expect("config parses"),
            kube: None,
            admin_sessions: Arc::new(backend::postgres::AdminPool::new(1)),
        }
    }

    const FILE_STORE: &str = r#"
  [[target.store]]
  kind = "file"
  path = "unused.env"
  key = "URL"
  format = "url""#;

    #[tokio::test]
    async fn an_unreadable_admin_password_is_a_reference_error_with_its_cause() {
        let deps = deps("file:/nonexistent/admin-password", FILE_STORE);
        let error = match deps.target_runtime(&deps.config.targets[0]).await {
            Err(error) => error,
            Ok(_) => panic!("the admin password cannot be read"),
        };
        assert!(matches!(error, RuntimeError::Reference(_)), "{error:?}");
        assert_eq!(error.metric_label(), "reference");
        assert!(error.to_string().contains("admin.password"), "{error}");
    }

    #[tokio::test]
    async fn a_store_that_cannot_be_built_keeps_the_store_error_and_its_label() {
        let deps = deps(
            "literal:admin",
            r#"
  [[target.store]]
  kind = "kubernetes"
  namespace = "llmtrace"
  secret = "llmtrace"
  key = "URL"
  format = "url""#,
        );
        let error = match deps.target_runtime(&deps.config.targets[0]).await {
            Err(error) => error,
            Ok(_) => panic!("no Kubernetes client"),
        };
        // Labelled by its cause, no longer relabelled "reference".
        assert!(matches!(error, RuntimeError::Store(_)), "{error:?}");
        assert_eq!(error.metric_label(), "store_unavailable");
        assert_eq!(
            StepError::from(error).to_string(),
            "kubernetes secret llmtrace/llmtrace#URL: no Kubernetes client could be configured"
        );
    }

    #[tokio::test]
    async fn a_sync_without_kubernetes_is_a_config_error() {
        let deps = deps(
            "literal:admin",
            &format!(
                r#"sync = [{{ namespace = "llmtrace", external_secret = "llmtrace", secret = "llmtrace", key = "URL", format = "url" }}]
{FILE_STORE}"#
            ),
        );
        let error = match deps.target_runtime(&deps.config.targets[0]).await {
            Err(error) => error,
            Ok(_) => panic!("no Kubernetes client"),
        };
        assert_eq!(error.metric_label(), "config");
        assert_eq!(
            error.to_string(),
            "target \"t\" sync: no Kubernetes client could be configured"
        );
        assert!(error.source().is_none());
    }

    #[test]
    fn an_unknown_consumer_names_it() {
        let deps = deps("literal:admin", FILE_STORE);
        let error = match deps.consumer("gone") {
            Err(error) => error,
            Ok(_) => panic!("not in the config"),
        };
        assert_eq!(error.metric_label(), "config");
        assert_eq!(
            error.to_string(),
            "consumer \"gone\" is no longer in the config"
        );
    }
}

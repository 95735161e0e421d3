//! `serve`: the scheduler, the HTTP API and `/metrics` in one process, on the same engine and
//! journal as `rotate`.
//!
//! # Layout
//! - [`scheduler`]: cron fires, windows, jitter, the periodic drift check.
//! - [`api`]: the HTTP API (axum) and its errors.
//! - [`auth`]: bearer tokens.
//! - [`metrics`]: the Prometheus metrics.
//! - [`openapi`]: the API's OpenAPI document.

pub mod api;
pub mod auth;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod scheduler;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Reference};
use crate::engine::plan::Plan;
use crate::engine::{check, recover, run, Deps, Engine, EngineError, RunReport};
use crate::resolve::resolve;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the scheduler and the API share.
pub struct Daemon {
    pub engine: Arc<Engine>,
    pub metrics: metrics::Metrics,
    pub tokens: Arc<auth::LiveTokens>,
    /// Runs in flight; shutdown waits for them.
    pub tracker: TaskTracker,
    /// Cancelled at shutdown: runs in flight stop and roll back.
    pub cancel_runs: CancellationToken,
    /// This replica's name in fire claims: replicas share one PostgreSQL journal.
    pub replica: String,
    /// Each scheduled target's next fire.
    pub next_fires: Mutex<HashMap<String, DateTime<Utc>>>,
    /// Each target's last drift check result.
    pub valid: Mutex<HashMap<String, bool>>,
    /// Counts the runs this replica finished: wakes API requests waiting for an outcome.
    pub runs_ended: tokio::sync::watch::Sender<u64>,
}

impl Daemon {
    fn config(&self) -> &Config {
        &self.engine.deps.config
    }

    /// The targets that restart `consumer`.
    pub fn targets_of(&self, consumer: &str) -> Vec<String> {
        self.config()
            .targets
            .iter()
            .filter(|t| t.consumers.iter().any(|c| c == consumer))
            .map(|t| t.name.clone())
            .collect()
    }

    /// Locks the plan's targets and journals a run, then runs it in the background. Answers
    /// with the run id, or `Busy` when a target is rotating already.
    pub async fn launch(
        self: &Arc<Self>,
        plan: Plan,
        trigger: &'static str,
    ) -> Result<String, EngineError> {
        let (started, answer) = tokio::sync::oneshot::channel();
        let daemon = self.clone();
        self.tracker.spawn(async move {
            let engine = daemon.engine.clone();
            let context = match run::start(&engine, &plan, trigger).await {
                Ok(context) => context,
                Err(error) => {
                    let _ = started.send(Err(error));
                    return;
                }
            };
            let _ = started.send(Ok(context.id().to_string()));
            let targets = plan.target_names();
            daemon.metrics.set_in_progress(&targets, true);
            let report = context
                .with_cancel(daemon.cancel_runs.child_token())
                .execute()
                .await;
            daemon.metrics.set_in_progress(&targets, false);
            daemon.observe(&report);
            daemon.runs_ended.send_modify(|n| *n += 1);
            if report.outcome == crate::engine::report::Outcome::Succeeded {
                // Its verify step just proved every store's credential.
                daemon.record_valid(&targets);
            } else {
                daemon.check(&targets).await;
            }
        });
        answer.await.unwrap_or_else(|_| {
            Err(EngineError::Internal(
                "the run task ended before starting".into(),
            ))
        })
    }

    fn observe(&self, report: &RunReport) {
        self.metrics
            .observe_run(report, |consumer| self.targets_of(consumer));
    }

    /// Retries every run that needs recovery and is not in flight; counts what it finished.
    pub async fn recover(&self) {
        match recover::recover_all(&self.engine, &self.cancel_runs).await {
            Ok(reports) => {
                for report in reports {
                    tracing::warn!(run = %report.run_id, outcome = report.outcome.as_str(), "recovered a run");
                    self.observe(&report);
                    self.runs_ended.send_modify(|n| *n += 1);
                    self.check(&report.targets).await;
                }
            }
            Err(error) => tracing::error!(cause = %error, "recovery could not run"),
        }
    }

    /// Runs the drift check on `targets` and records the result.
    /// Records that the credential every store of `targets` holds logs in.
    fn record_valid(&self, targets: &[String]) {
        let mut valid = self.valid.lock().expect("valid lock");
        for target in targets {
            self.metrics.set_valid(target, true);
            valid.insert(target.clone(), true);
        }
    }

    pub async fn check(&self, targets: &[String]) {
        let report = check::check(&self.engine.deps, targets).await;
        {
            let mut valid = self.valid.lock().expect("valid lock");
            for target in &report.targets {
                if !target.valid {
                    tracing::warn!(target = %target.target, "drift: a stored credential does not log in");
                }
                self.metrics.set_valid(&target.target, target.valid);
                valid.insert(target.target.clone(), target.valid);
            }
        }
        for target in &report.targets {
            let Some(config) = self.config().target(&target.target) else {
                continue;
            };
            let rotated_at = self.metrics.rotated_at(&target.target);
            if let Some(old) = check::sessions_on_old(&self.engine.deps, config, rotated_at).await {
                self.metrics.set_sessions_on_old(&target.target, old);
            }
        }
    }
}

/// The pod name (HOSTNAME in Kubernetes) plus a random suffix: unique even across restarts.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "serve".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// The daemon's state, after recovering what a crash left and loading each target's history
/// into the metrics; also the API token text when it comes from a file (to watch it).
async fn start_daemon(
    config: Config,
) -> Result<(Arc<Daemon>, Option<crate::secret::Secret>), ServeError> {
    let deps = Deps::new(config).await?;
    let (tokens, token_text) = match &deps.config.rotator.api_tokens {
        Some(reference) => {
            let text = resolve(reference, "rotator.api_tokens", deps.kube.as_ref())
                .await
                .map_err(EngineError::from)?;
            (auth::Tokens::parse(&text), Some(text))
        }
        None => {
            tracing::warn!("no api_tokens configured: every /v1 request is refused");
            (auth::Tokens::none(), None)
        }
    };
    let engine = Arc::new(Engine::new(deps).await?);
    let ages: Vec<(String, std::time::Duration)> = engine
        .deps
        .config
        .targets
        .iter()
        .map(|t| (t.name.clone(), t.max_age))
        .collect();
    let daemon = Arc::new(Daemon {
        metrics: metrics::Metrics::new(&ages),
        engine: engine.clone(),
        tokens: Arc::new(auth::LiveTokens::new(tokens)),
        tracker: TaskTracker::new(),
        cancel_runs: CancellationToken::new(),
        replica: replica_name(),
        next_fires: Mutex::new(HashMap::new()),
        valid: Mutex::new(HashMap::new()),
        runs_ended: tokio::sync::watch::Sender::new(0),
    });
    for report in recover::recover_all(&engine, &daemon.cancel_runs).await? {
        tracing::warn!(run = %report.run_id, outcome = report.outcome.as_str(), "recovered an interrupted run");
        daemon.observe(&report);
    }
    for (name, _) in &ages {
        let history = engine
            .journal
            .target_history(name)
            .await
            .map_err(EngineError::from)?;
        daemon.metrics.set_history(name, &history);
    }
    Ok((daemon, token_text))
}

/// Runs the daemon until `shutdown` resolves, then stops taking requests, cancels the runs in
/// flight and gives them `shutdown_grace` to roll back; what is left then is for recovery.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listen = config.rotator.listen;
    let grace = config.rotator.shutdown_grace;
    let (daemon, token_text) = start_daemon(config).await?;
    let engine = daemon.engine.clone();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen {
            address: listen,
            source,
        })?;
    tracing::info!(address = %listen, "serving");

    let stop = CancellationToken::new();
    if let (Some(Reference::File(path)), Some(text)) =
        (&engine.deps.config.rotator.api_tokens, token_text)
    {
        tokio::spawn(daemon.tokens.clone().watch(
            path.clone(),
            text,
            auth::RELOAD_EVERY,
            stop.clone(),
        ));
    }
    let background = tokio::spawn(scheduler::run(daemon.clone(), stop.clone()));
    let server = tokio::spawn(http::serve(
        listener,
        api::router(daemon.clone()),
        stop.clone(),
    ));
    shutdown.await;
    tracing::info!("shutting down: no new requests or scheduled runs; runs in flight roll back");
    stop.cancel();
    daemon.cancel_runs.cancel();
    // Runs in flight, and a recovery or drift check the scheduler is in, share the grace.
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout_at(deadline, background).await.is_err() {
        tracing::warn!("the scheduler's recovery or drift check did not end within the grace");
    }
    daemon.tracker.close();
    if tokio::time::timeout_at(deadline, daemon.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = grace.as_secs(),
            "runs still in flight are left to recovery at the next start"
        );
    }
    // Bounded by http::CLOSE_WITHIN, whatever clients do.
    let _ = server.await;
    Ok(())
}

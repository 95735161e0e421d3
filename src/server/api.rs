//! The HTTP API: on-demand rotations, run history, target status, health and metrics.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::Daemon;
use crate::engine::plan::{dry_run, Plan};
use crate::engine::EngineError;
use crate::journal::JournalError;

/// Requests are a few target names: anything bigger is a mistake or an attack.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const DEFAULT_LIMIT: u32 = 20;
/// The longest `GET /v1/rotations/{id}?wait=` holds a request: longer than most runs, shorter
/// than the idle timeouts of common proxies and load balancers.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
/// How often a waiting request rereads a run this replica does not drive (another replica, a
/// CronJob): runs it drives wake it at once.
const FOREIGN_RUN_POLL: std::time::Duration = std::time::Duration::from_millis(250);
const MAX_LIMIT: u32 = 1000;

/// An error answer: `{"error": "..."}` with a status code.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let status = match &error {
            EngineError::UnknownTarget(_) => StatusCode::NOT_FOUND,
            EngineError::Journal(JournalError::Busy(_) | JournalError::Unfinished { .. }) => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, error.to_string())
    }
}

impl From<JournalError> for ApiError {
    fn from(error: JournalError) -> Self {
        EngineError::from(error).into()
    }
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    let v1 = Router::new()
        .route("/rotations", get(list_rotations).post(start_rotation))
        .route("/rotations/{id}", get(get_rotation))
        .route("/targets", get(targets))
        .route(
            "/openapi.json",
            get(|| async { Json(super::openapi::document()) }),
        )
        .route_layer(middleware::from_fn_with_state(
            daemon.clone(),
            require_token,
        ));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .with_state(daemon)
}

async fn require_token(
    State(daemon): State<Arc<Daemon>>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if daemon.tokens.allows(header) {
        next.run(request).await
    } else {
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
                .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("static header"),
        );
        response
    }
}

/// Unauthenticated: the driver's error (host names, roles, paths) goes to the log, not the answer.
async fn readyz(State(daemon): State<Arc<Daemon>>) -> Result<Json<serde_json::Value>, ApiError> {
    daemon.engine.journal.ping().await.map_err(|e| {
        tracing::warn!(cause = %e, "readiness check: the journal is not reachable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the journal is not reachable (the log says why)",
        )
    })?;
    Ok(Json(json!({"status": "ready"})))
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        daemon.metrics.encode(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn start_rotation(
    State(daemon): State<Arc<Daemon>>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {MAX_BODY_BYTES} bytes"),
            )
        })?;
    let request: RotateRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not a rotation request: {e}"),
        )
    })?;
    let plan = Plan::new(&daemon.engine.deps.config, &request.targets)?;
    if request.dry_run {
        let report = dry_run(&daemon.engine.deps, &plan).await;
        return Ok(Json(serde_json::to_value(&report).expect("reports serialize")).into_response());
    }
    let id = daemon.launch(plan, "api").await?;
    let body = json!({ "id": id, "status_url": format!("/v1/rotations/{id}") });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The query string as `T`, or a 400 in the API's JSON shape naming what is wrong with it (an
/// unknown or repeated parameter): a misspelt `?limt=5` must not silently mean the default.
fn query_of<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunQuery {
    wait: Option<String>,
}

/// One run; with `?wait=30s`, answered once the run has an outcome or the wait is over
/// (whichever comes first), so a client need not poll.
async fn get_rotation(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    query: Result<Query<RunQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    let wait = match query.wait.as_deref() {
        None => std::time::Duration::ZERO,
        Some(text) => crate::duration::parse(text)
            .ok()
            .filter(|wait| *wait <= MAX_WAIT)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "wait must be a duration like 30s, at most {}s",
                        MAX_WAIT.as_secs()
                    ),
                )
            })?,
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut ended = daemon.runs_ended.subscribe();
    loop {
        // Subscribed before reading: a run ending between the read and the wait still wakes it.
        ended.mark_unchanged();
        let Some(run) = daemon.engine.journal.run(&id).await? else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no run {id:?}"),
            ));
        };
        let now = tokio::time::Instant::now();
        if run.outcome.is_some() || now >= deadline {
            return Ok(Json(run).into_response());
        }
        let nap = (deadline - now).min(FOREIGN_RUN_POLL);
        let _ = tokio::time::timeout(nap, ended.changed()).await;
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<String>,
}

async fn list_rotations(
    State(daemon): State<Arc<Daemon>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_of(query)?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be a number from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let runs = daemon.engine.journal.history(i64::from(limit)).await?;
    Ok(Json(runs).into_response())
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

async fn targets(State(daemon): State<Arc<Daemon>>) -> Result<Response, ApiError> {
    let now = chrono::Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for target in &daemon.engine.deps.config.targets {
        let history = daemon.engine.journal.target_history(&target.name).await?;
        let next = daemon
            .next_fires
            .lock()
            .expect("next fires lock")
            .get(&target.name)
            .copied();
        let valid = daemon
            .valid
            .lock()
            .expect("valid lock")
            .get(&target.name)
            .copied();
        out.push(json!({
            "name": target.name,
            "last_outcome": history.last_outcome,
            "last_attempt": history.last_attempt.and_then(rfc3339),
            "last_success": history.last_success.and_then(rfc3339),
            "credential_age_seconds": history.last_success.map(|ms| (now - ms) as f64 / 1000.0),
            "next_scheduled_run": next.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            "credential_valid": valid,
            "rotating": daemon.metrics.is_in_progress(&target.name),
        }));
    }
    Ok(Json(out).into_response())
}

//! Preflight: what a run checks before it changes anything, and what it learns doing so.
//! `rotate --dry-run` runs it alone.

use super::{Deps, StepError, TargetRuntime};
use crate::backend::{BackendError, Session};
use crate::config::{Strategy, Target};
use crate::secret::{Credential, Secret};
use crate::store::format;

/// What preflight learned about a target: its parts, the credential in use, every store's value.
pub struct Preflight<'a> {
    pub runtime: TargetRuntime<'a>,
    pub current: Credential,
    pub originals: Vec<Option<Secret>>,
    /// Sessions of the rotated login now (`None`: the server keeps no list, or it is unreadable).
    pub sessions: Option<usize>,
}

/// Distinct client addresses of `sessions`, sorted: what a report may show of them.
pub(super) fn clients(sessions: &[&Session]) -> Vec<String> {
    let mut clients: Vec<String> = sessions.iter().map(|s| s.client.clone()).collect();
    clients.sort();
    clients.dedup();
    clients
}

/// [`preflight`] of the target the config names `name`.
pub async fn preflight_named<'a>(deps: &'a Deps, name: &str) -> Result<Preflight<'a>, StepError> {
    match deps.config.target(name) {
        Some(target) => preflight(deps, target).await,
        None => Err(StepError::new(
            "config",
            format!("target {name:?} is not in the config"),
        )),
    }
}

/// Reads every store, checks each can take the new credential, and proves the current one logs
/// in. Changes nothing; `rotate --dry-run` runs it too.
pub async fn preflight<'a>(deps: &Deps, target: &'a Target) -> Result<Preflight<'a>, StepError> {
    let runtime = deps.target_runtime(target).await?;
    let mut originals = Vec::new();
    for store in &runtime.stores {
        store.preflight().await.map_err(StepError::from)?;
        originals.push(store.read().await.map_err(StepError::from)?);
    }
    let current = current_credential(target, &runtime, &originals)?;
    for sync in &runtime.syncs {
        sync.check_holds(&current).await.map_err(StepError::from)?;
    }
    // Read-only and independent: the admin session's work (the rights check, then the session
    // list) and the proof that the stored credential logs in run side by side, so a run waits
    // for the longer of the two rather than their sum.
    let admin_work = async {
        runtime.backend.check_admin(&current).await?;
        Ok::<_, BackendError>(runtime.backend.sessions(&current.user).await)
    };
    let (admin, login) = tokio::join!(admin_work, runtime.backend.login(&current));
    let sessions = admin.map_err(StepError::from)?;
    login.map_err(|e| {
        StepError::new(
            "stored_credential_invalid",
            format!(
                "the stored credential does not log in, so it is not rotated (fix it first): {e}"
            ),
        )
    })?;
    if target.strategy == Strategy::Alternating {
        idle_login_unused(&runtime, &current).await?;
    }
    let sessions = match sessions {
        Ok(sessions) => sessions.map(|s| s.len()),
        Err(error) => {
            tracing::warn!(target = %target.name, cause = %error, "cannot read the session list");
            None
        }
    };
    Ok(Preflight {
        runtime,
        current,
        originals,
        sessions,
    })
}

/// The credential the first store holds, checked to be for one of the target's logins and to
/// fit every store's format.
fn current_credential(
    target: &Target,
    runtime: &TargetRuntime<'_>,
    originals: &[Option<Secret>],
) -> Result<Credential, StepError> {
    let source = &runtime.stores[0];
    let first = originals[0].as_ref().ok_or_else(|| {
        StepError::new(
            "store_format",
            format!(
                "{}: the key is absent; the first store is where the current credential is read",
                source.describe()
            ),
        )
    })?;
    let current = format::credential_from(first, &target.stores[0].format, &target.user)
        .map_err(|m| StepError::new("store_format", format!("{}: {m}", source.describe())))?;
    if !target.logins().contains(&current.user.as_str()) {
        return Err(StepError::new(
            "store_format",
            format!(
                "{}: the stored credential is for user {:?}, but the target rotates {:?}",
                source.describe(),
                current.user,
                target.logins().join(" / ")
            ),
        ));
    }
    for ((store, config), original) in runtime.stores.iter().zip(&target.stores).zip(originals) {
        format::render(&config.format, original.as_ref(), &current)
            .map_err(|m| StepError::new("store_format", format!("{}: {m}", store.describe())))?;
    }
    Ok(current)
}

/// Alternating: the idle login's password is about to change, so whoever still uses it (a pod
/// on the credential from two rotations ago) would be cut off: refuse while it has sessions.
async fn idle_login_unused(
    runtime: &TargetRuntime<'_>,
    current: &Credential,
) -> Result<(), StepError> {
    let idle = runtime.backend.next_user(current);
    let Some(open) = runtime
        .backend
        .sessions(&idle)
        .await
        .map_err(StepError::from)?
    else {
        return Ok(());
    };
    if open.is_empty() {
        return Ok(());
    }
    let open: Vec<&Session> = open.iter().collect();
    Err(StepError::new(
        "sessions_open",
        format!(
            "login {idle:?} has {} open session(s) from {}: something still uses the \
             credential from two rotations ago, and a new password on {idle:?} would \
             cut it off; restart or reconfigure those clients, then rotate",
            open.len(),
            clients(&open).join(", ")
        ),
    ))
}

//! Resumes runs a crash left unfinished: roll forward when every store already holds the new
//! credential and it logs in, otherwise roll back.

use super::recorder::{Part, Recorder};
use super::report::{Outcome, RunReport};
use super::run::RunContext;
use super::state::{Progress, RunState};
use super::{Engine, EngineError};
use tokio_util::sync::CancellationToken;

use crate::journal::{JournalError, TargetLock};
use crate::secret::Credential;

/// Recovers every run that needs it (unfinished, or whose rollback failed) and whose targets
/// are not locked by a live run elsewhere. A run that cannot be recovered now is reported in
/// the log and left for the next attempt; the others go on. `cancel` stops a recovered run's
/// waits (a shutdown), as for a new run.
pub async fn recover_all(
    engine: &Engine,
    cancel: &CancellationToken,
) -> Result<Vec<RunReport>, EngineError> {
    let mut reports = Vec::new();
    for (id, targets) in engine.journal.needing_recovery_runs().await? {
        match recover_one(engine, &id, &targets, cancel).await {
            Ok(Some(report)) => reports.push(report),
            Ok(None) => {}
            Err(error) => {
                tracing::error!(run = %id, cause = %error, "cannot recover the run now; it is retried later")
            }
        }
    }
    Ok(reports)
}

async fn recover_one(
    engine: &Engine,
    id: &str,
    targets: &[String],
    cancel: &CancellationToken,
) -> Result<Option<RunReport>, EngineError> {
    let lock = match engine.journal.lock(targets).await {
        Ok(lock) => lock,
        Err(JournalError::Busy(target)) => {
            tracing::info!(run = %id, target, "run is still in progress elsewhere; not recovering it");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    // Re-read under the lock: the run may have finished between the listing and the lock.
    if !engine.journal.needs_recovery(id).await? {
        return Ok(None);
    }
    // Claimed first: from here on the run's previous owner can write nothing more.
    let owner = super::run::new_owner();
    engine.journal.claim(id, &owner).await?;
    if engine.journal.is_postgres() {
        // A PostgreSQL advisory lock can be lost while its holder still runs (its session
        // ended); that holder stops at its next check, but a password change it has in flight
        // cannot be cut short. Wait until such a step has certainly ended.
        tokio::time::sleep(engine.deps.config.rotator.takeover_grace).await;
    }
    // The state as its last owner left it: the listing may predate that owner's last steps
    // (it was live when the listing was read, and recovering earlier runs took a while).
    let Some(run) = engine.journal.unfinished_run(id).await? else {
        return Ok(None);
    };
    let Some(summary) = engine.journal.run(id).await? else {
        return Ok(None);
    };
    if run.state.as_slice() == b"{}" {
        // No state to act on: nothing can be redone, so it must not block its targets.
        tracing::warn!(run = %id, "run needs recovery but holds no state; see its report");
        engine.journal.settle_stateless(id).await?;
        return Ok(None);
    }
    let state =
        RunState::assemble(&run.state, &run.parts).map_err(|source| JournalError::State {
            run: run.id.clone(),
            source,
        })?;
    tracing::warn!(run = %id, previous = summary.outcome.as_deref().unwrap_or("unfinished"), "recovering a run");
    Ok(Some(
        recover_run(engine, run.id, owner, state, summary.steps, lock, cancel).await,
    ))
}

async fn recover_run(
    engine: &Engine,
    id: String,
    owner: String,
    state: RunState,
    steps: Vec<crate::journal::StepRecord>,
    lock: TargetLock,
    cancel: &CancellationToken,
) -> RunReport {
    let deps = &engine.deps;
    let mut notes = Vec::new();
    let mut targets = Vec::new();
    for target in &state.targets {
        let runtime = match deps.config.target(&target.name) {
            Some(config) => deps.target_runtime(config).await.map_err(|e| e.to_string()),
            None => Err(format!(
                "target {:?} is not in the config any more",
                target.name
            )),
        };
        match runtime {
            Ok(runtime) => targets.push(Some(runtime)),
            Err(e) => {
                notes.push(format!("target {}: {e}", target.name));
                targets.push(None);
            }
        }
    }
    let consumers = state
        .consumers
        .iter()
        .map(|c| {
            deps.consumer(&c.name)
                .map_err(|e| notes.push(e.to_string()))
                .ok()
        })
        .collect();
    let rec = Recorder::new(&engine.journal, id, owner, state, steps);
    let mut run = RunContext::resume(engine, rec, targets, consumers, notes, lock)
        .with_cancel(cancel.child_token());

    let step = run.rec.begin(Part::Run, "recover", "decide").await;
    let verified = run.rec.state.verified && !run.rec.state.rolling_back;
    let roll_forward =
        verified || !run.rec.state.rolling_back && new_credential_is_everywhere(&run).await;
    let decision = if verified {
        "finish: the run had verified the new credential everywhere before it stopped"
    } else if roll_forward {
        "roll forward: every store holds the new credential and it logs in"
    } else {
        "roll back"
    };
    run.rec.end(step, "ok", Some(decision.to_string())).await;

    let finished = match (verified, roll_forward) {
        (true, _) => Some(run.after_verify().await),
        (false, true) => Some(run.complete().await),
        (false, false) => None,
    };
    let outcome = match finished {
        Some(Ok(())) => Outcome::Succeeded,
        Some(Err(stop)) => run.after_stop(stop).await,
        None => run.rollback().await,
    };
    if outcome != Outcome::Interrupted {
        // Another process may drive the run now: tidying is its job.
        run.tidy_stores().await;
    }
    run.finish(outcome).await
}

/// Whether every store of every target holds the value this run wrote, and it logs in.
async fn new_credential_is_everywhere(run: &RunContext<'_>) -> bool {
    for (i, target) in run.rec.state.targets.iter().enumerate() {
        let Some(next) = target.next.as_ref() else {
            return false;
        };
        if target.stores.is_empty() || target.apply == Progress::NotStarted {
            return false;
        }
        let Some(runtime) = run.runtime_at(i) else {
            return false;
        };
        for (store, state) in runtime.stores.iter().zip(&target.stores) {
            match store.read().await {
                Ok(Some(value)) if Some(&value) == state.written.as_ref() => {}
                _ => return false,
            }
        }
        let next: Credential = next.into();
        if runtime.backend.login(&next).await.is_err() {
            return false;
        }
    }
    true
}

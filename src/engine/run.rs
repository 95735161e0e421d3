//! The rotation transaction: forward steps, and the rollback that undoes whatever they did.

use std::time::Instant;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::instrument;

use super::events;
use super::plan::Plan;
use super::preflight::{clients, preflight_named, Preflight};
use super::recorder::{Part, Recorder, StepId};
use super::report::{Confirmation, Outcome, RunReport};
use super::state::{Progress, RunState, SavedCredential, StoreState, TargetState};
use super::{Deps, Engine, EngineError, StepError, TargetRuntime};
use crate::backend::Session;
use crate::config::{ConsumerKind, StoreKind, Strategy, Target};
use crate::consumer::ConsumerHandle;
use crate::journal::{JournalError, TargetLock};
use crate::password;
use crate::secret::{Credential, Secret};
use crate::store::format;

/// How often `confirm` reads the session list while it waits.
const CONFIRM_POLL: std::time::Duration = std::time::Duration::from_secs(1);

fn store_subject(target: &str, index: usize) -> String {
    format!("{target}/store[{index}]")
}

fn sync_subject(target: &str, index: usize) -> String {
    format!("{target}/sync[{index}]")
}

/// Why the forward path stopped short of success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A step failed: roll back.
    Failed,
    /// A shutdown signal: roll back while there is time.
    Cancelled,
    /// The journal cannot record the next step: no further side effect; roll back what is
    /// recorded (undoing is safe to repeat, recovery repeats it).
    JournalDown,
    /// Another process may drive the run now: act no more, not even to undo; recovery finishes.
    LockLost,
}

impl Stop {
    fn reason(self) -> &'static str {
        match self {
            Stop::Failed => "an earlier step failed",
            Stop::Cancelled => "a shutdown signal arrived",
            Stop::JournalDown => "the journal cannot record it",
            Stop::LockLost => "the target lock was lost",
        }
    }
}

/// A run in progress: the recorder (journal + state) and the live parts it acts on.
pub struct RunContext<'a> {
    deps: &'a Deps,
    pub rec: Recorder<'a>,
    trigger: String,
    /// Aligned with `rec.state.targets`; `None` where the parts could not be built (recovery).
    targets: Vec<Option<TargetRuntime<'a>>>,
    consumers: Vec<Option<ConsumerHandle>>,
    notes: Vec<String>,
    /// (target, kind) of each backend warning, for the warning counter.
    warnings: Vec<(String, &'static str)>,
    /// What `confirm` found, aligned with `rec.state.targets` (`None`: not confirmed).
    confirmations: Vec<Option<Confirmation>>,
    /// When verify-backend's login with each target's new credential succeeded, by index.
    next_proven_at: std::sync::Mutex<std::collections::HashMap<usize, Instant>>,
    clock: Instant,
    /// Held until the run ends (recovery holds its own).
    lock: Option<TargetLock>,
    /// Cancelled when the target lock is known to be lost.
    lock_lost: CancellationToken,
    cancel: CancellationToken,
}

/// One target as a step that acts on it sees it: its journaled state, its live parts and the
/// credentials it rotates from and to.
struct TargetRun<'r, 'a> {
    state: &'r TargetState,
    runtime: &'r TargetRuntime<'a>,
    current: Credential,
    next: Credential,
}

/// Rotates the planned targets: the whole transaction, from lock to report.
pub async fn rotate(engine: &Engine, plan: &Plan, trigger: &str) -> Result<RunReport, EngineError> {
    Ok(start(engine, plan, trigger).await?.execute().await)
}

/// A new owner token: one per process execution driving a run.
pub fn new_owner() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Takes the targets' locks and journals the new run; [`RunContext::execute`] does the rest.
/// Fails with `Busy` when another run holds a target, and with `Unfinished` when a run on one
/// of them still needs recovery (a new run must never race an old run's undo).
pub async fn start<'e>(
    engine: &'e Engine,
    plan: &Plan,
    trigger: &str,
) -> Result<RunContext<'e>, EngineError> {
    let names = plan.target_names();
    let lock = engine.journal.lock(&names).await?;
    if let Some((run, target)) = engine.journal.needing_recovery(&names).await? {
        lock.release().await;
        return Err(JournalError::Unfinished { run, target }.into());
    }
    // Admin sessions are run-scoped: this run proves its admin login afresh.
    engine.deps.admin_sessions.clear();
    let id = uuid::Uuid::new_v4().to_string();
    let owner = new_owner();
    let state = RunState::new(&names, &plan.consumers);
    engine
        .journal
        .begin_run(
            &id,
            &owner,
            trigger,
            &names,
            &state.header_bytes(),
            &state.all_target_parts(),
        )
        .await?;
    tracing::info!(run = %id, trigger, targets = ?names, "rotation started");
    Ok(RunContext {
        deps: &engine.deps,
        rec: Recorder::new(&engine.journal, id, owner, state, Vec::new()),
        trigger: trigger.to_string(),
        targets: Vec::new(),
        consumers: Vec::new(),
        notes: Vec::new(),
        warnings: Vec::new(),
        confirmations: Vec::new(),
        next_proven_at: Default::default(),
        clock: Instant::now(),
        lock_lost: lock.lost(),
        lock: Some(lock),
        cancel: CancellationToken::new(),
    })
}

impl<'a> RunContext<'a> {
    /// A context for resuming a run found in the journal, under the recovery's lock.
    pub fn resume(
        engine: &'a Engine,
        rec: Recorder<'a>,
        targets: Vec<Option<TargetRuntime<'a>>>,
        consumers: Vec<Option<ConsumerHandle>>,
        notes: Vec<String>,
        lock: TargetLock,
    ) -> Self {
        RunContext {
            deps: &engine.deps,
            rec,
            trigger: "recovery".into(),
            targets,
            consumers,
            notes,
            warnings: Vec::new(),
            confirmations: Vec::new(),
            next_proven_at: Default::default(),
            clock: Instant::now(),
            lock_lost: lock.lost(),
            lock: Some(lock),
            cancel: CancellationToken::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.rec.id
    }

    /// Runs the transaction to its end and reports.
    pub async fn execute(mut self) -> RunReport {
        let outcome = self.forward().await;
        if self.cancel.is_cancelled() && outcome != Outcome::Succeeded {
            self.notes
                .push("stopped by a shutdown signal before it could finish".into());
        }
        self.finish(outcome).await
    }

    async fn forward(&mut self) -> Outcome {
        if !self.preflight().await {
            return if self.rec.fenced {
                Outcome::Interrupted
            } else {
                Outcome::Refused
            };
        }
        self.after_preflight().await
    }

    /// The forward path once preflight has filled in the state and the live parts: generate,
    /// apply, verify the backend, publish, complete; a stop rolls back.
    async fn after_preflight(&mut self) -> Outcome {
        let forward = async {
            self.generate().await?;
            self.apply().await?;
            self.verify_backend().await?;
            self.publish().await?;
            self.complete().await
        };
        match forward.await {
            Ok(()) => Outcome::Succeeded,
            Err(stop) => self.after_stop(stop).await,
        }
    }

    /// What follows a stopped forward path: a rollback, unless the run is no longer ours.
    pub async fn after_stop(&mut self, stop: Stop) -> Outcome {
        match stop {
            Stop::LockLost => {
                self.notes.push(
                    "the target lock was lost mid-run: this process stopped acting; recovery \
                     (the next run, `recover`, or the daemon) finishes or undoes the run"
                        .into(),
                );
                Outcome::Interrupted
            }
            Stop::JournalDown => {
                self.notes.push(
                    "the journal stopped recording, so nothing more was changed and the recorded \
                     steps were undone; the journal still shows the run unfinished until recovery \
                     confirms it"
                        .into(),
                );
                self.rollback().await
            }
            Stop::Failed | Stop::Cancelled => self.rollback().await,
        }
    }

    /// Journals the outcome and builds the report.
    pub async fn finish(mut self, mut outcome: Outcome) -> RunReport {
        if outcome != Outcome::Interrupted && self.lost_ownership() {
            self.notes
                .push("the target lock was lost before the run ended: left to recovery".into());
            outcome = Outcome::Interrupted;
        }
        self.take_backend_notes();
        if outcome == Outcome::RollbackFailed {
            self.describe_state().await;
        }
        if outcome != Outcome::Interrupted {
            self.journal_outcome(outcome).await;
        }
        if let Some(lock) = self.lock.take() {
            lock.release().await;
        }
        self.deps.admin_sessions.clear();
        if let Some(client) = &self.deps.kube {
            events::emit(client, &self.rec.id, outcome, &self.event_objects()).await;
        }
        tracing::info!(run = %self.rec.id, outcome = outcome.as_str(), "rotation finished");
        self.report(outcome)
    }

    /// Moves each backend's warnings into the report's notes and the warning counter.
    fn take_backend_notes(&mut self) {
        for (state, runtime) in self.rec.state.targets.iter().zip(&self.targets) {
            if let Some(runtime) = runtime {
                for note in runtime.backend.take_notes() {
                    self.notes
                        .push(format!("target {}: {}", state.name, note.message));
                    self.warnings.push((state.name.clone(), note.kind));
                }
            }
        }
    }

    /// Journals the outcome; a failure to is noted in the report, and leaves the run due for
    /// recovery.
    async fn journal_outcome(&mut self, outcome: Outcome) {
        // The history shows every step, the ones whose records were deferred too.
        self.rec.flush().await;
        if let Err(error) = self.rec_journal_finish(outcome).await {
            tracing::error!(run = %self.rec.id, cause = %error, "cannot record the outcome in the journal");
            self.notes.push(format!(
                "the outcome could not be written to the journal ({error}): the run stays due \
                 for recovery, which confirms it before any new run on its targets"
            ));
        }
    }

    fn report(&mut self, outcome: Outcome) -> RunReport {
        RunReport {
            run_id: self.rec.id.clone(),
            trigger: self.trigger.clone(),
            targets: self
                .rec
                .state
                .targets
                .iter()
                .map(|t| t.name.clone())
                .collect(),
            outcome,
            duration_ms: self.clock.elapsed().as_millis() as u64,
            steps: self.rec.steps.clone(),
            state: self.notes.clone(),
            confirm: self.confirmations.iter().flatten().cloned().collect(),
            failures: self.rec.failures.clone(),
            warnings: std::mem::take(&mut self.warnings),
        }
    }

    /// The Kubernetes objects this run wrote (Secrets of `kubernetes` stores) or rolled out
    /// (Deployments, StatefulSets), each with the targets it concerns.
    fn event_objects(&self) -> Vec<events::Regarding> {
        let mut objects: Vec<events::Regarding> = Vec::new();
        let mut add = |kind, namespace: &str, name: &str, target: &str| match objects
            .iter_mut()
            .find(|o| o.kind == kind && o.namespace == namespace && o.name == name)
        {
            Some(o) if !o.targets.iter().any(|t| t == target) => o.targets.push(target.into()),
            Some(_) => {}
            None => objects.push(events::Regarding {
                kind,
                namespace: namespace.into(),
                name: name.into(),
                targets: vec![target.into()],
            }),
        };
        for (state, runtime) in self.rec.state.targets.iter().zip(&self.targets) {
            let Some(runtime) = runtime else { continue };
            for (store, config) in state.stores.iter().zip(&runtime.config.stores) {
                match &config.kind {
                    StoreKind::Kubernetes(secret) if store.publish != Progress::NotStarted => add(
                        events::Kind::Secret,
                        &secret.namespace,
                        &secret.secret,
                        &state.name,
                    ),
                    _ => {}
                }
            }
        }
        for consumer in &self.rec.state.consumers {
            if consumer.restart == Progress::NotStarted {
                continue;
            }
            let Some(config) = self.deps.config.consumer(&consumer.name) else {
                continue;
            };
            let (kind, namespace, object) = match &config.kind {
                ConsumerKind::Deployment(w) => (events::Kind::Deployment, &w.namespace, &w.object),
                ConsumerKind::StatefulSet(w) => {
                    (events::Kind::StatefulSet, &w.namespace, &w.object)
                }
                _ => continue,
            };
            for state in &self.rec.state.targets {
                let serves = self
                    .deps
                    .config
                    .target(&state.name)
                    .is_some_and(|t| t.consumers.contains(&consumer.name));
                if serves {
                    add(kind, namespace, object, &state.name);
                }
            }
        }
        objects
    }

    async fn rec_journal_finish(&self, outcome: Outcome) -> Result<(), JournalError> {
        if crate::failpoint::journal_down("finish", &self.rec.id, outcome.as_str()) {
            return Err(JournalError::Open(
                "journal made unavailable by a failpoint".into(),
            ));
        }
        // A failed rollback keeps its sealed state: the new password may be the only working copy.
        let settled = outcome != Outcome::RollbackFailed;
        self.rec
            .journal()
            .finish_run(&self.rec.id, &self.rec.owner, outcome.as_str(), settled)
            .await
    }

    fn lost_ownership(&self) -> bool {
        self.rec.fenced || self.lock_lost.is_cancelled()
    }

    /// Whether the run may take its next forward step: not once the lock is lost (another
    /// process may drive it), not if the journal stopped recording (write-ahead), not after a
    /// shutdown request (roll back while there is time).
    fn may_continue(&self) -> Result<(), Stop> {
        if self.lost_ownership() {
            Err(Stop::LockLost)
        } else if self.rec.journal_failed {
            Err(Stop::JournalDown)
        } else if self.cancel.is_cancelled() {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Journals that `step` may now change `subject` and says whether it may go ahead: only
    /// when that record is durable and the run is still ours (write-ahead). A step that may not
    /// is closed as `skipped` and the caller acts on nothing.
    async fn begin_effect(
        &mut self,
        part: Part,
        step: &str,
        subject: &str,
    ) -> Result<StepId, Stop> {
        let ids = self
            .begin_effects(&[(part, subject.to_string())], step)
            .await?;
        Ok(ids[0])
    }

    /// Asks the lock's session whether it still holds the lock (not only what its watcher
    /// last saw): a side effect must not follow a lost lock.
    async fn check_lock(&self) {
        if let Some(lock) = &self.lock {
            if !lock.check().await {
                self.lock_lost.cancel();
            }
        }
    }

    /// [`RunContext::begin_effect`] for several subjects at once: one durable journal write
    /// for all of them.
    async fn begin_effects(
        &mut self,
        subjects: &[(Part, String)],
        step: &str,
    ) -> Result<Vec<StepId>, Stop> {
        self.check_lock().await;
        self.may_continue()?;
        let ids = self.rec.begin_all(subjects, step, true).await;
        if let Err(stop) = self.may_continue() {
            let why = format!("not started: {}", stop.reason());
            self.rec.end_all(&ids, "skipped", Some(why)).await;
            return Err(stop);
        }
        Ok(ids)
    }

    /// Runs a wait that a lost lock must cut short (consumer rollouts, syncs, confirm), and a
    /// shutdown too unless the run is rolling back: a shutdown does not cut a rollback short.
    async fn interruptible<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        let shutdown = async {
            if self.rec.state.rolling_back {
                std::future::pending().await
            } else {
                self.cancel.cancelled().await
            }
        };
        tokio::select! {
            result = work => result,
            _ = shutdown => Err(StepError::new("cancelled", "stopped by a shutdown signal; rolling back")),
            _ = self.lock_lost.cancelled() => Err(StepError::new("lock_lost", "the target lock was lost; stopped")),
        }
    }

    /// Stops the forward path at the next step boundary (or a consumer wait) and rolls back.
    pub fn with_cancel(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    #[instrument(skip_all, fields(run = %self.rec.id))]
    async fn preflight(&mut self) -> bool {
        let targets = self.preflight_targets().await;
        let consumers = self.preflight_consumers().await;
        targets && consumers && self.rec.durable() && !self.lost_ownership()
    }

    /// Read-only: the targets of a chunk are checked concurrently.
    async fn preflight_targets(&mut self) -> bool {
        let mut ok = true;
        let deps = self.deps;
        for group in self.chunks() {
            let subjects = self.subjects(&group);
            let steps = self.rec.begin_all(&subjects, "preflight", false).await;
            let found =
                join_all(subjects.iter().map(|(_, name)| preflight_named(deps, name))).await;
            let ended: Vec<_> = group
                .iter()
                .zip(found)
                .map(|(&i, found)| self.learn(i, found))
                .collect();
            ok &= ended.iter().all(Result::is_ok);
            let ended: Vec<_> = steps.into_iter().zip(&ended).collect();
            self.rec.finish_all(&ended).await;
        }
        ok
    }

    /// Keeps what preflight found on target `i` (the next one): its state and its live parts.
    fn learn(
        &mut self,
        i: usize,
        found: Result<Preflight<'a>, StepError>,
    ) -> Result<(), StepError> {
        let found = match found {
            Ok(found) => found,
            Err(error) => {
                self.targets.push(None);
                return Err(error);
            }
        };
        let state = self.state_mut(i);
        state.current = Some(SavedCredential::from(&found.current));
        state.sessions_before = found.sessions;
        state.stores = found
            .originals
            .into_iter()
            .map(|original| StoreState {
                original,
                ..Default::default()
            })
            .collect();
        self.targets.push(Some(found.runtime));
        Ok(())
    }

    async fn preflight_consumers(&mut self) -> bool {
        let mut ok = true;
        for k in 0..self.rec.state.consumers.len() {
            let name = self.rec.state.consumers[k].name.clone();
            let subject = format!("consumer/{name}");
            let step = self.rec.begin(Part::Run, "preflight", &subject).await;
            let handle = self.deps.consumer(&name).map_err(StepError::from);
            let result = match &handle {
                Ok(handle) => handle.preflight().await.map_err(StepError::from),
                Err(error) => Err(error.clone()),
            };
            self.consumers.push(handle.ok());
            ok &= result.is_ok();
            self.rec.finish(step, &result).await;
        }
        ok
    }

    /// Lets every store clean up what the interrupted write may have left (best effort).
    pub async fn tidy_stores(&mut self) {
        let mut notes = Vec::new();
        for runtime in self.targets.iter().flatten() {
            for store in &runtime.stores {
                if let Err(error) = store.tidy().await {
                    notes.push(format!("{} could not be tidied: {error}", store.describe()));
                }
            }
        }
        self.notes.extend(notes);
    }

    /// The journaled state of target `i`.
    fn state(&self, i: usize) -> &TargetState {
        &self.rec.state.targets[i]
    }

    fn state_mut(&mut self, i: usize) -> &mut TargetState {
        &mut self.rec.state.targets[i]
    }

    fn target_indexes(&self) -> std::ops::Range<usize> {
        0..self.rec.state.targets.len()
    }

    /// Every target's index, `max_parallel` at a time.
    fn chunks(&self) -> Vec<Vec<usize>> {
        let all: Vec<usize> = self.target_indexes().collect();
        let chunk = self.deps.config.rotator.max_parallel;
        all.chunks(chunk).map(<[usize]>::to_vec).collect()
    }

    /// What a step on the targets at `indexes` journals: each one's name, on its own part.
    fn subjects(&self, indexes: &[usize]) -> Vec<(Part, String)> {
        indexes
            .iter()
            .map(|&i| (Part::Target(i), self.state(i).name.clone()))
            .collect()
    }

    pub fn runtime_at(&self, i: usize) -> Option<&TargetRuntime<'a>> {
        self.targets.get(i).and_then(Option::as_ref)
    }

    fn runtime(&self, i: usize) -> Result<&TargetRuntime<'a>, StepError> {
        self.runtime_at(i).ok_or_else(|| {
            StepError::new(
                "config",
                format!(
                    "target {:?} cannot be acted on: it is not in the config any more",
                    self.state(i).name
                ),
            )
        })
    }

    /// Target `i` as a step that acts on it sees it: its state, its live parts and both of
    /// its credentials; an error when the config or the run state lacks one of them.
    fn target_run(&self, i: usize) -> Result<TargetRun<'_, 'a>, StepError> {
        let runtime = self.runtime(i)?;
        let state = self.state(i);
        match (&state.current, &state.next) {
            (Some(current), Some(next)) => Ok(TargetRun {
                state,
                runtime,
                current: current.into(),
                next: next.into(),
            }),
            _ => Err(StepError::new(
                "journal_state",
                "the run state has no credentials for this target",
            )),
        }
    }

    async fn generate(&mut self) -> Result<(), Stop> {
        for group in self.chunks() {
            let subjects = self.subjects(&group);
            let steps = self.rec.begin_all(&subjects, "generate", false).await;
            let ended: Vec<_> = group.iter().map(|&i| self.next_credential(i)).collect();
            let ended: Vec<_> = steps.into_iter().zip(&ended).collect();
            self.rec.finish_all(&ended).await;
            if ended.iter().any(|(_, result)| result.is_err()) {
                return Err(Stop::Failed);
            }
        }
        self.may_continue()
    }

    /// Draws a new credential for target `i` under its password policy, into its state.
    fn next_credential(&mut self, i: usize) -> Result<(), StepError> {
        let runtime = self.runtime(i)?;
        let current: Credential = self
            .state(i)
            .current
            .as_ref()
            .ok_or_else(|| StepError::new("journal_state", "the run state has no credential"))?
            .into();
        let next = Credential {
            user: runtime.backend.next_user(&current),
            password: password::generate(&runtime.config.password),
        };
        self.state_mut(i).next = Some(SavedCredential::from(&next));
        Ok(())
    }

    /// Not interruptible: a password change abandoned mid-statement could still commit after
    /// the rollback; it ends within the backend's statement timeout instead.
    async fn apply(&mut self) -> Result<(), Stop> {
        let results = self
            .each_target("apply", Mark::Apply, true, |this, i| {
                Box::pin(async move {
                    let run = this.target_run(i)?;
                    let backend = &run.runtime.backend;
                    backend
                        .apply(&run.current, &run.next)
                        .await
                        .map_err(StepError::from)
                })
            })
            .await?;
        all_ok(&results)?;
        self.may_continue()
    }

    async fn verify_backend(&mut self) -> Result<(), Stop> {
        let results = self
            .each_target("verify-backend", Mark::None, true, |this, i| {
                Box::pin(async move {
                    let run = this.target_run(i)?;
                    let backend = &run.runtime.backend;
                    backend.login(&run.next).await.map_err(StepError::from)?;
                    this.next_proven_at
                        .lock()
                        .expect("proof times")
                        .insert(i, Instant::now());
                    Ok(())
                })
            })
            .await?;
        all_ok(&results)?;
        self.may_continue()
    }

    /// One step over every target, `max_parallel` targets at a time. Every target of a chunk
    /// has its start journaled (durably, for a side effect: write-ahead) before any of them
    /// acts; the actions run concurrently; each end is journaled after. With `stop_on_failure`
    /// no further chunk starts once one target failed.
    async fn each_target(
        &mut self,
        step: &str,
        mark: Mark,
        stop_on_failure: bool,
        act: for<'s> fn(&'s Self, usize) -> StepFuture<'s>,
    ) -> Result<Vec<(usize, Result<(), StepError>)>, Stop> {
        let all: Vec<usize> = self.target_indexes().collect();
        self.each_target_of(&all, step, mark, stop_on_failure, act)
            .await
    }

    /// [`RunContext::each_target`] over the targets at `indexes` only.
    async fn each_target_of(
        &mut self,
        indexes: &[usize],
        step: &str,
        mark: Mark,
        stop_on_failure: bool,
        act: for<'s> fn(&'s Self, usize) -> StepFuture<'s>,
    ) -> Result<Vec<(usize, Result<(), StepError>)>, Stop> {
        let chunk = self.deps.config.rotator.max_parallel;
        let mut results = Vec::with_capacity(indexes.len());
        for group in indexes.chunks(chunk) {
            let ids = self.begin_marked(group, step, mark).await?;
            let outcomes = {
                let this = &*self;
                join_all(group.iter().map(|&i| act(this, i))).await
            };
            for (&i, outcome) in group.iter().zip(&outcomes) {
                if outcome.is_ok() {
                    mark.set(self.state_mut(i), Progress::Done);
                }
            }
            let ended: Vec<_> = ids.iter().copied().zip(&outcomes).collect();
            self.rec.finish_all(&ended).await;
            let failed = outcomes.iter().any(Result::is_err);
            results.extend(group.iter().copied().zip(outcomes));
            if failed && stop_on_failure {
                break;
            }
        }
        Ok(results)
    }

    /// Journals the start of `step` on the targets of `group`: durably, with `mark` moved to
    /// `Started`, for a step with a side effect (write-ahead); `mark` goes back when it may not.
    async fn begin_marked(
        &mut self,
        group: &[usize],
        step: &str,
        mark: Mark,
    ) -> Result<Vec<StepId>, Stop> {
        let subjects = self.subjects(group);
        if mark == Mark::None {
            return Ok(self.rec.begin_all(&subjects, step, false).await);
        }
        for &i in group {
            mark.set(self.state_mut(i), Progress::Started);
        }
        let begun = self.begin_effects(&subjects, step).await;
        if begun.is_err() {
            for &i in group {
                mark.set(self.state_mut(i), Progress::NotStarted);
            }
        }
        begun
    }

    /// Writes every store, one at a time (several targets may share one file), in chunks of
    /// `max_parallel` whose start records are journaled durably together (write-ahead).
    async fn publish(&mut self) -> Result<(), Stop> {
        let writes: Vec<(usize, usize)> = self
            .target_indexes()
            .flat_map(|i| (0..self.state(i).stores.len()).map(move |j| (i, j)))
            .collect();
        for chunk in writes.chunks(self.deps.config.rotator.max_parallel) {
            self.publish_chunk(chunk).await?;
            self.may_continue()?;
        }
        Ok(())
    }

    /// Writes the stores at `chunk` (target, store), each only once every start is durable.
    /// A stop mid-chunk closes the writes it did not reach as `skipped`.
    async fn publish_chunk(&mut self, chunk: &[(usize, usize)]) -> Result<(), Stop> {
        let values = self.prepare_writes(chunk);
        let subjects: Vec<(Part, String)> = chunk
            .iter()
            .map(|&(i, j)| (Part::Target(i), store_subject(&self.state(i).name, j)))
            .collect();
        let ids = match self.begin_effects(&subjects, "publish").await {
            Ok(ids) => ids,
            Err(stop) => {
                self.unpublished(chunk);
                return Err(stop);
            }
        };
        let (results, stopped) = self.write_stores(chunk, &values).await;
        let ended: Vec<_> = ids.iter().copied().zip(&results).collect();
        self.rec.finish_all(&ended).await;
        if let Err(stop) = stopped {
            // Journaled but not acted on: nothing happened to these stores.
            self.unpublished(&chunk[results.len()..]);
            let why = format!("not started: {}", stop.reason());
            self.rec
                .end_all(&ids[results.len()..], "skipped", Some(why))
                .await;
            return Err(stop);
        }
        Ok(())
    }

    /// What each store of `chunk` holds and is to hold; each is marked started, its new value
    /// kept in the state.
    fn prepare_writes(&mut self, chunk: &[(usize, usize)]) -> Vec<StoreWrite> {
        let mut values = Vec::with_capacity(chunk.len());
        for &(i, j) in chunk {
            let written = self.render(i, j);
            let store = &mut self.state_mut(i).stores[j];
            store.written = written.as_ref().ok().cloned();
            store.publish = Progress::Started;
            values.push((store.original.clone(), written));
        }
        values
    }

    /// Writes the stores of `chunk` in turn until one fails or the run may not go on; the
    /// results of the writes made, and why it stopped short.
    async fn write_stores(
        &mut self,
        chunk: &[(usize, usize)],
        values: &[StoreWrite],
    ) -> (Vec<Result<(), StepError>>, Result<(), Stop>) {
        let mut results = Vec::with_capacity(chunk.len());
        for (n, (&(i, j), (original, written))) in chunk.iter().zip(values).enumerate() {
            // The chunk's start checked the lock; each later write checks it again.
            if n > 0 {
                self.check_lock().await;
            }
            if let Err(stop) = self.may_continue() {
                return (results, Err(stop));
            }
            let result = self.write_store(i, j, original.as_ref(), written).await;
            let failed = result.is_err();
            if !failed {
                self.state_mut(i).stores[j].publish = Progress::Done;
            }
            results.push(result);
            if failed {
                return (results, Err(Stop::Failed));
            }
        }
        (results, Ok(()))
    }

    /// Marks the stores at `writes` as never written.
    fn unpublished(&mut self, writes: &[(usize, usize)]) {
        for &(i, j) in writes {
            self.state_mut(i).stores[j].publish = Progress::NotStarted;
        }
    }

    /// The whole value store `j` of target `i` is to hold: its original with the new credential.
    fn render(&self, i: usize, j: usize) -> Result<Secret, StepError> {
        let run = self.target_run(i)?;
        let store = &run.runtime.stores[j];
        let original = run.state.stores[j].original.as_ref();
        format::render(&run.runtime.config.stores[j].format, original, &run.next)
            .map_err(|m| StepError::new("store_format", format!("{}: {m}", store.describe())))
    }

    /// Writes store `j` of target `i`: `written` where it holds `original`.
    async fn write_store(
        &self,
        i: usize,
        j: usize,
        original: Option<&Secret>,
        written: &Result<Secret, StepError>,
    ) -> Result<(), StepError> {
        let value = written.as_ref().map_err(Clone::clone)?;
        self.runtime(i)?.stores[j]
            .compare_and_swap(original, Some(value))
            .await
            .map_err(StepError::from)
    }

    /// Restart, verify, retire: everything after the stores hold the new credential. Recovery
    /// rolls forward through here too.
    pub async fn complete(&mut self) -> Result<(), Stop> {
        self.sync().await?;
        self.restart().await?;
        self.verify().await?;
        // Done is done: every store holds the new credential, the consumers run on it and it
        // logs in. Recorded with confirm's start (durably: a crash during confirm's wait is
        // then finished by recovery, not judged again by a login that may fail for a moment).
        self.rec.state.verified = true;
        self.rec.touch(Part::Run);
        self.after_verify().await
    }

    /// Confirm and retire, once verified. A stop from here on (SIGTERM, a journal outage) does
    /// not roll the run back; a confirm or retire that could not run leaves the old password
    /// valid beside the new one.
    pub async fn after_verify(&mut self) -> Result<(), Stop> {
        let after = async {
            self.confirm().await?;
            self.retire().await
        };
        match after.await {
            Err(Stop::LockLost) => Err(Stop::LockLost),
            Err(stop) => {
                self.notes.push(format!(
                    "stopped after verify ({}): the new credential is in force; the old one may \
                     still log in beside it until a later run retires it",
                    stop.reason()
                ));
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Forces each ExternalSecret to copy the new credential into its Secret, and waits for it,
    /// so the restart that follows reads the new credential.
    async fn sync(&mut self) -> Result<(), Stop> {
        for i in self.target_indexes() {
            let entries = self.runtime(i).map_err(|_| Stop::Failed)?.syncs.len();
            if entries == 0 || self.state(i).sync == Progress::Done {
                continue;
            }
            self.state_mut(i).sync = Progress::Started;
            for k in 0..entries {
                let subject = sync_subject(&self.state(i).name, k);
                let step = self.begin_effect(Part::Target(i), "sync", &subject).await?;
                let result = self.interruptible(self.sync_entry(i, k, Held::New)).await;
                self.rec.finish(step, &result).await;
                result.map_err(|_| Stop::Failed)?;
                self.may_continue()?;
            }
            self.state_mut(i).sync = Progress::Done;
        }
        Ok(())
    }

    /// Has sync entry `k` of target `i` copy the credential `held` names, and waits for it.
    async fn sync_entry(&self, i: usize, k: usize, held: Held) -> Result<(), StepError> {
        let runtime = self.runtime(i)?;
        let credential = match held {
            Held::New => self.target_run(i)?.next,
            Held::Old => match &self.state(i).current {
                Some(current) => current.into(),
                None => return Err(no_sync_entry()),
            },
        };
        let sync = runtime.syncs.get(k).ok_or_else(no_sync_entry)?;
        sync.sync(&credential, runtime.config.sync_timeout)
            .await
            .map_err(StepError::from)
    }

    async fn restart(&mut self) -> Result<(), Stop> {
        for k in 0..self.rec.state.consumers.len() {
            let previous = self.rec.state.consumers[k].restart;
            if previous == Progress::Done {
                continue;
            }
            let name = self.rec.state.consumers[k].name.clone();
            self.rec.state.consumers[k].restart = Progress::Started;
            let step = match self.begin_effect(Part::Run, "restart", &name).await {
                Ok(step) => step,
                Err(stop) => {
                    self.rec.state.consumers[k].restart = previous;
                    return Err(stop);
                }
            };
            let result = self.interruptible(self.restart_consumer(k)).await;
            if result.is_ok() {
                self.rec.state.consumers[k].restart = Progress::Done;
            }
            self.rec.finish(step, &result).await;
            result.map_err(|_| Stop::Failed)?;
            self.may_continue()?;
        }
        Ok(())
    }

    /// Rolls consumer `k` out and waits until it is ready.
    async fn restart_consumer(&self, k: usize) -> Result<(), StepError> {
        match self.consumers.get(k).and_then(Option::as_ref) {
            Some(handle) => handle.restart_and_wait().await.map_err(StepError::from),
            None => Err(StepError::new(
                "config",
                format!(
                    "consumer {:?} is not in the config any more",
                    self.rec.state.consumers[k].name
                ),
            )),
        }
    }

    /// Logs in with the credential each store holds (what a restarted pod sees), once per
    /// distinct credential not in `proven`, after checking it is the one `expect` allows.
    async fn verify_stores(
        &self,
        i: usize,
        expect: Expect<'_>,
        mut proven: Vec<Credential>,
    ) -> Result<(), StepError> {
        let runtime = self.runtime(i)?;
        for (j, store) in runtime.stores.iter().enumerate() {
            let Some(credential) = self.held(i, j, expect).await? else {
                continue;
            };
            if proven.contains(&credential) {
                continue;
            }
            runtime.backend.login(&credential).await.map_err(|e| {
                StepError::new(
                    e.metric_label(),
                    format!(
                        "{}: the credential it holds does not log in: {e}",
                        store.describe()
                    ),
                )
            })?;
            proven.push(credential);
        }
        Ok(())
    }

    /// `next` when verify-backend logged in with it less than `verify_relogin_after` ago: verify
    /// then checks that every store holds exactly it and does not log in again, since that login
    /// would repeat the same proof on the same server moments later.
    fn freshly_proven(&self, i: usize, next: &Credential) -> Vec<Credential> {
        let within = self.deps.config.rotator.verify_relogin_after;
        let proven_at = self
            .next_proven_at
            .lock()
            .expect("proof times")
            .get(&i)
            .copied();
        match proven_at {
            Some(at) if at.elapsed() < within => vec![next.clone()],
            _ => Vec::new(),
        }
    }

    /// The credential store `j` of target `i` holds, if `expect` allows it; `None` when the
    /// key is absent again after a rollback, as it was before the run.
    async fn held(
        &self,
        i: usize,
        j: usize,
        expect: Expect<'_>,
    ) -> Result<Option<Credential>, StepError> {
        let runtime = self.runtime(i)?;
        let store = &runtime.stores[j];
        let Some(value) = store.read().await.map_err(StepError::from)? else {
            let was_absent = self
                .state(i)
                .stores
                .get(j)
                .is_some_and(|s| s.original.is_none());
            if was_absent && matches!(expect, Expect::Not(_)) {
                return Ok(None);
            }
            return Err(StepError::new(
                "store_missing",
                format!("{}: the key is absent", store.describe()),
            ));
        };
        let credential = format::credential_from(
            &value,
            &runtime.config.stores[j].format,
            &runtime.config.user,
        )
        .map_err(|m| StepError::new("store_format", format!("{}: {m}", store.describe())))?;
        let unexpected = match expect {
            Expect::Exactly(wanted) if wanted != &credential => {
                Some("holds a different credential than this run wrote")
            }
            Expect::Not(unwanted) if unwanted == Some(&credential) => {
                Some("still holds the credential this run wrote")
            }
            _ => None,
        };
        match unexpected {
            Some(what) => Err(StepError::new(
                "store_changed",
                format!("{}: {what}", store.describe()),
            )),
            None => Ok(Some(credential)),
        }
    }

    async fn verify(&mut self) -> Result<(), Stop> {
        let results = self
            .each_target("verify", Mark::None, true, |this, i| {
                Box::pin(async move {
                    let run = this.target_run(i)?;
                    let proven = this.freshly_proven(i, &run.next);
                    this.verify_stores(i, Expect::Exactly(&run.next), proven)
                        .await
                })
            })
            .await?;
        all_ok(&results)
    }

    /// Reads each target's session list until nothing uses the old credential any more and,
    /// where a restarted Deployment/StatefulSet was seen using the old one, something uses the
    /// new one; at most `confirm_timeout`. Not draining is a warning, not a failure: the new
    /// credential works, and a rollback would cut off whoever moved to it.
    async fn confirm(&mut self) -> Result<(), Stop> {
        self.confirmations = vec![None; self.rec.state.targets.len()];
        for group in self.chunks() {
            let confirming: Vec<usize> = group
                .into_iter()
                .filter(|&i| {
                    self.runtime_at(i)
                        .is_some_and(|r| !r.config.confirm_timeout.is_zero())
                })
                .collect();
            if confirming.is_empty() {
                continue;
            }
            let subjects = self.subjects(&confirming);
            // Durable: it carries the verified mark (see `complete`).
            let ids = self.rec.begin_all(&subjects, "confirm", true).await;
            let found = {
                let this = &*self;
                join_all(
                    confirming
                        .iter()
                        .map(|&i| this.interruptible(this.await_drain(i))),
                )
                .await
            };
            let ended = confirming
                .into_iter()
                .zip(ids)
                .zip(found)
                .map(|((i, id), result)| {
                    let (status, detail) = self.confirmed(i, result);
                    (id, status, detail)
                })
                .collect();
            self.rec.end_each(ended).await;
        }
        self.may_continue()
    }

    /// Keeps what `confirm` found on target `i`; the status and detail of its step.
    fn confirmed(
        &mut self,
        i: usize,
        result: Result<Option<Confirmation>, StepError>,
    ) -> (&'static str, Option<String>) {
        let found = match result {
            Ok(Some(found)) => found,
            Ok(None) => return ("skipped", Some("the server keeps no session list".into())),
            Err(error) => {
                let why = format!("session list not read: {}", error.message);
                return ("skipped", Some(why));
            }
        };
        let ended = if found.drained {
            ("ok", None)
        } else {
            let name = self.state(i).name.clone();
            tracing::warn!(run = %self.rec.id, target = %name, old_sessions = found.old_sessions, new_sessions = found.new_sessions, "sessions not drained");
            self.warnings.push((name, "sessions_not_drained"));
            // Addresses, not only counts: they name what still needs a restart.
            let from = |clients: &[String]| match clients {
                [] => String::new(),
                list => format!(" from {}", list.join(", ")),
            };
            let detail = format!(
                "not drained: {} session(s) on the old credential{}, {} on the new one",
                found.old_sessions,
                from(&found.old_clients),
                found.new_sessions
            );
            ("warning", Some(detail))
        };
        self.confirmations[i] = Some(found);
        ended
    }

    /// When the target's consumers that are Deployments/StatefulSets last began a rollout in
    /// this run (ms since the epoch); `None` when it restarts none.
    fn restarted_at(&self, target: &Target) -> Option<i64> {
        let restarted: Vec<&str> = target
            .consumers
            .iter()
            .filter(|name| {
                self.deps.config.consumer(name).is_some_and(|c| {
                    matches!(
                        c.kind,
                        ConsumerKind::Deployment(_) | ConsumerKind::StatefulSet(_)
                    )
                })
            })
            .map(String::as_str)
            .collect();
        self.rec
            .steps
            .iter()
            .filter(|s| s.step == "restart" && restarted.contains(&s.subject.as_str()))
            .map(|s| s.started_at)
            .max()
    }

    /// Polls target `i`'s session list until it drains or `confirm_timeout` passes. `None`
    /// when the server keeps no session list.
    async fn await_drain(&self, i: usize) -> Result<Option<Confirmation>, StepError> {
        let TargetRun {
            state,
            runtime,
            current,
            next,
        } = self.target_run(i)?;
        let timeout = runtime.config.confirm_timeout;
        let applied_at = state.applied_at.unwrap_or(0);
        let restarted_at = self.restarted_at(runtime.config);
        let new_expected = restarted_at.is_some() && state.sessions_before.unwrap_or(0) > 0;
        // Alternating: every session of the old login is on the old credential, whenever it began.
        let alternating = current.user != next.user;
        let new_since = restarted_at.unwrap_or(applied_at);
        let clock = Instant::now();
        loop {
            let new_login = alternating.then_some(next.user.as_str());
            let Some((on_old_login, on_new_login)) =
                login_sessions(runtime.backend.as_ref(), &current.user, new_login).await?
            else {
                return Ok(None);
            };
            let now = chrono::Utc::now().timestamp_millis();
            // The earliest each may have begun: when in doubt a session counts as old, not new.
            let began = |s: &Session| s.earliest_start(now);
            let old: Vec<&Session> = on_old_login
                .iter()
                .filter(|s| alternating || began(s) < applied_at)
                .collect();
            let new: Vec<&Session> = on_new_login
                .iter()
                .filter(|s| began(s) >= new_since)
                .collect();
            let drained = old.is_empty() && (!new_expected || !new.is_empty());
            let waited = clock.elapsed();
            if drained || waited >= timeout {
                return Ok(Some(Confirmation {
                    target: state.name.clone(),
                    drained,
                    old_sessions: old.len(),
                    old_clients: clients(&old),
                    new_sessions: new.len(),
                    new_clients: clients(&new),
                    new_expected,
                    waited_ms: waited.as_millis() as u64,
                    retire_skipped: false,
                }));
            }
            tokio::time::sleep(CONFIRM_POLL.min(timeout - waited)).await;
        }
    }

    /// Whether `confirm` saw target `i` drain (`None`: it did not look).
    fn drained(&self, i: usize) -> Option<bool> {
        self.confirmations
            .get(i)
            .and_then(Option::as_ref)
            .map(|c| c.drained)
    }

    /// Whether target `i`'s strategy keeps the old password beside the new one until retire.
    fn keeps_old(&self, i: usize) -> bool {
        self.runtime_at(i)
            .is_some_and(|r| r.backend.strategy().keeps_old_until_retire())
    }

    /// A failed retire leaves the old credential usable beside the new one: reported, not undone.
    /// A dual target whose sessions did not drain keeps the old password: removing it would cut
    /// off whoever still uses it; a later run's retire removes it.
    async fn retire(&mut self) -> Result<(), Stop> {
        let mut retiring = Vec::new();
        for i in self.target_indexes() {
            if self.keeps_old(i) && self.drained(i) == Some(false) {
                self.keep_old(i).await;
            } else {
                retiring.push(i);
            }
        }
        // With one password there is nothing to retire: no write-ahead record to wait for.
        let mark = match retiring.iter().any(|&i| self.keeps_old(i)) {
            true => Mark::Retire,
            false => Mark::None,
        };
        let results = self
            .each_target_of(&retiring, "retire", mark, false, |this, i| {
                Box::pin(async move {
                    let run = this.target_run(i)?;
                    let backend = &run.runtime.backend;
                    let retired = backend.retire(&run.current, &run.next).await;
                    retired.map_err(StepError::from)?;
                    // Drained: nothing uses an older password either (one a run before kept).
                    if this.drained(i) == Some(true) {
                        let retired = backend.retire_all_but(&run.next).await;
                        retired.map_err(StepError::from)?;
                    }
                    Ok(())
                })
            })
            .await?;
        for (i, result) in results {
            if let Err(e) = result {
                let name = &self.state(i).name;
                self.notes.push(format!(
                    "target {name}: the old credential still logs in, retire failed: {e}"
                ));
            }
        }
        Ok(())
    }

    /// Journals target `i`'s retire as skipped: sessions on the old password remain.
    async fn keep_old(&mut self, i: usize) {
        let name = self.state(i).name.clone();
        let step = self.rec.begin(Part::Target(i), "retire", &name).await;
        let why = "sessions on the old credential remain: the old password is kept";
        self.rec.end(step, "skipped", Some(why.into())).await;
        if let Some(found) = self.confirmations[i].as_mut() {
            found.retire_skipped = true;
        }
        self.notes.push(format!(
            "target {name}: the old and the new password both log in until a later run retires the old one (sessions on it had not drained)"
        ));
    }

    /// Undoes every step that may have run, in the order DESIGN.md gives: stores, then (single
    /// password) the backend, then the consumers, then proof that the old credential works.
    #[instrument(skip_all, fields(run = %self.rec.id))]
    pub async fn rollback(&mut self) -> Outcome {
        tracing::warn!(run = %self.rec.id, "rolling back");
        self.rec.state.rolling_back = true;
        self.rec.touch(Part::Run);
        let mut ok = self.undo_publish().await;
        ok &= self.undo_sync().await;
        ok &= self.undo_apply(false).await;
        self.undo_restart().await;
        ok &= self.undo_apply(true).await;
        if self.lost_ownership() {
            // Another process may be undoing the same run: stop touching anything.
            return Outcome::Interrupted;
        }
        ok &= self.verify_old().await;
        if ok {
            Outcome::RolledBack
        } else {
            Outcome::RollbackFailed
        }
    }

    /// Undo steps stop once the run is no longer ours; they go on when the journal is down
    /// (undoing is safe to repeat, and recovery repeats it).
    fn may_undo(&self) -> bool {
        !self.lost_ownership()
    }

    /// Journals an undo step and says whether it may act: not once the run turned out to be
    /// another process's (the checkpoint itself may be what finds out).
    async fn begin_undo(&mut self, part: Part, step: &str, subject: &str) -> Option<StepId> {
        let id = self.rec.begin(part, step, subject).await;
        if self.may_undo() {
            return Some(id);
        }
        let why = "not started: the target lock was lost".to_string();
        self.rec.end(id, "skipped", Some(why)).await;
        None
    }

    async fn undo_publish(&mut self) -> bool {
        let mut ok = true;
        for i in self.target_indexes() {
            for j in 0..self.state(i).stores.len() {
                if !self.state(i).stores[j].publish.touched() || !self.may_undo() {
                    continue;
                }
                let subject = store_subject(&self.state(i).name, j);
                let Some(step) = self
                    .begin_undo(Part::Target(i), "undo-publish", &subject)
                    .await
                else {
                    return false;
                };
                let result = self.restore_store(i, j).await;
                if let Ok(restored) = &result {
                    if *restored == Restored::Foreign {
                        // verify-old decides whether what it holds now is usable.
                        let name = &self.state(i).name;
                        self.notes.push(format!(
                            "target {name}: store[{j}] holds a value this run did not write; left as it is"
                        ));
                    }
                    self.state_mut(i).stores[j].publish = Progress::Undone;
                }
                ok &= result.is_ok();
                let status = result.map(Restored::detail);
                self.rec.finish_noted(step, &status).await;
            }
        }
        ok
    }

    /// Puts store `j` of target `i` back as it was before the run, unless someone else has
    /// written it since.
    async fn restore_store(&self, i: usize, j: usize) -> Result<Restored, StepError> {
        let Some(store) = self.runtime(i)?.stores.get(j) else {
            let name = &self.state(i).name;
            return Err(StepError::new(
                "config",
                format!("store[{j}] of target {name:?} is not in the config any more"),
            ));
        };
        restore_store(store.as_ref(), &self.state(i).stores[j]).await
    }

    /// Syncs the restored upstream value back into each ExternalSecret's Secret. Runs whenever
    /// an upstream store was written, not only after our force-sync: ESO also refreshes on its
    /// own interval.
    async fn undo_sync(&mut self) -> bool {
        let mut ok = true;
        for i in self.target_indexes() {
            let state = self.state(i);
            // `Undone` counts: undo_publish has just written the upstream back.
            let upstream_written = state
                .stores
                .iter()
                .any(|s| s.publish != Progress::NotStarted);
            let sync_touched = state.sync.touched();
            if !(sync_touched || upstream_written) || !self.may_undo() {
                continue;
            }
            let entries = self.runtime_at(i).map_or(0, |r| r.syncs.len());
            if entries == 0 && !sync_touched {
                continue;
            }
            let mut synced = entries > 0;
            for k in 0..entries.max(1) {
                let subject = sync_subject(&self.state(i).name, k);
                let Some(step) = self
                    .begin_undo(Part::Target(i), "undo-sync", &subject)
                    .await
                else {
                    return false;
                };
                let result = self.sync_entry(i, k, Held::Old).await;
                synced &= result.is_ok();
                self.rec.finish(step, &result).await;
            }
            if synced {
                self.state_mut(i).sync = Progress::Undone;
            }
            ok &= synced;
        }
        ok
    }

    /// Undoes `apply` on the targets whose strategy does (`dual_password`) or does not keep the
    /// old password beside the new one: single-password targets before the consumers roll out
    /// again, dual ones after, so pods never lose their login.
    async fn undo_apply(&mut self, dual_password: bool) -> bool {
        let mut ok = true;
        for i in self.target_indexes() {
            let applied = self.state(i).apply.touched();
            if !applied || self.keeps_old(i) != dual_password || !self.may_undo() {
                continue;
            }
            let name = self.state(i).name.clone();
            if dual_password && self.still_holds_new(i) {
                self.keep_new(i).await;
                ok = false;
                continue;
            }
            let Some(step) = self.begin_undo(Part::Target(i), "undo-apply", &name).await else {
                return false;
            };
            let result = self.undo_apply_on(i).await;
            if let Ok(UndoNeeded::Superseded) = result {
                self.notes.push(format!(
                    "target {name}: the backend accepts a credential this run did not write (a store holds it); left as it is"
                ));
            }
            if result.is_ok() {
                self.state_mut(i).apply = Progress::Undone;
            }
            ok &= result.is_ok();
            self.rec
                .finish_noted(step, &result.map(UndoNeeded::detail))
                .await;
        }
        ok
    }

    /// Whether a store or synced Secret of target `i` may still hold the new credential: its
    /// write happened, or may have, and its undo failed.
    fn still_holds_new(&self, i: usize) -> bool {
        let state = self.state(i);
        state.sync.touched() || state.stores.iter().any(|s| s.publish.touched())
    }

    /// Journals target `i`'s undo-apply as skipped: with two passwords the new one can stay
    /// beside the old, so a store whose undo failed keeps logging in. Recovery takes it back
    /// once every store is restored (the run ends `rollback_failed`, due for recovery).
    async fn keep_new(&mut self, i: usize) {
        let name = self.state(i).name.clone();
        let step = self.rec.begin(Part::Target(i), "undo-apply", &name).await;
        let why =
            "a store still holds the new credential (its undo failed): the new password is kept";
        self.rec.end(step, "skipped", Some(why.into())).await;
        self.notes.push(format!(
            "target {name}: the old and the new password both log in until recovery has restored every store"
        ));
    }

    /// Takes target `i`'s new password back, unless [`undo_needed`] finds nothing to take back.
    async fn undo_apply_on(&self, i: usize) -> Result<UndoNeeded, StepError> {
        let run = self.target_run(i)?;
        let needed = undo_needed(run.runtime, &run.current, &run.next).await;
        if needed == UndoNeeded::Yes {
            let backend = &run.runtime.backend;
            let undone = backend.undo_apply(&run.current, &run.next).await;
            undone.map_err(StepError::from)?;
        }
        Ok(needed)
    }

    /// Rolls out again every consumer that may have picked up the new credential. A rollout that
    /// fails again does not undo the rollback: the credentials are consistent, the workload's own
    /// trouble is reported.
    async fn undo_restart(&mut self) {
        for k in 0..self.rec.state.consumers.len() {
            if !self.rec.state.consumers[k].restart.touched() || !self.may_undo() {
                continue;
            }
            let name = self.rec.state.consumers[k].name.clone();
            let Some(step) = self.begin_undo(Part::Run, "undo-restart", &name).await else {
                return;
            };
            // A shutdown does not cut a rollback short (`rolling_back` is set); a lost lock does.
            let result = self.interruptible(self.restart_consumer(k)).await;
            match &result {
                Ok(()) => self.rec.state.consumers[k].restart = Progress::Undone,
                Err(e) => self.notes.push(format!(
                    "consumer {name}: rolled out again with the old credential but not ready: {e}"
                )),
            }
            self.rec.finish(step, &result).await;
        }
    }

    /// Proves the invariant after a rollback: every store's credential logs in. A store that
    /// holds the old credential, or one this run never wrote (a newer writer's), passes when it
    /// logs in; one still holding this run's new credential does not.
    async fn verify_old(&mut self) -> bool {
        let mut ok = true;
        for i in self.target_indexes() {
            let name = self.state(i).name.clone();
            let step = self.rec.begin(Part::Target(i), "verify-old", &name).await;
            let next: Option<Credential> = self.state(i).next.as_ref().map(Into::into);
            let result = self
                .verify_stores(i, Expect::Not(next.as_ref()), Vec::new())
                .await;
            ok &= result.is_ok();
            self.rec.finish(step, &result).await;
        }
        ok
    }

    /// For a failed rollback: which credential each backend accepts and what each store holds.
    async fn describe_state(&mut self) {
        let mut notes = Vec::new();
        for i in self.target_indexes() {
            notes.extend(self.describe_target(i).await);
        }
        self.notes.extend(notes);
    }

    /// [`RunContext::describe_state`] of target `i`.
    async fn describe_target(&self, i: usize) -> Vec<String> {
        let state = self.state(i);
        let Some(runtime) = self.runtime_at(i) else {
            return vec![format!(
                "target {}: not in the config any more; its state is unknown",
                state.name
            )];
        };
        let logs_in = |credential: Option<&SavedCredential>| {
            let backend = &runtime.backend;
            let credential: Option<Credential> = credential.map(Into::into);
            async move {
                match credential {
                    Some(c) if backend.login(&c).await.is_ok() => "logs in",
                    Some(_) => "does not log in",
                    None => "was never generated",
                }
            }
        };
        let old = logs_in(state.current.as_ref()).await;
        let new = logs_in(state.next.as_ref()).await;
        let mut notes = vec![format!(
            "target {}: on {} the old credential {old}, the new one {new}",
            state.name,
            runtime.backend.describe()
        )];
        for (j, store) in runtime.stores.iter().enumerate() {
            let holds = match (store.read().await, state.stores.get(j)) {
                (Err(e), _) => format!("cannot be read: {e}"),
                (Ok(value), Some(s)) if value == s.original => "holds the old value".to_string(),
                (Ok(value), Some(s)) if value.is_some() && value == s.written => {
                    "holds the NEW value".to_string()
                }
                (Ok(None), _) => "has no value".to_string(),
                (Ok(Some(_)), _) => "holds a value this run did not write".to_string(),
            };
            notes.push(format!(
                "target {}: {} {holds}",
                state.name,
                store.describe()
            ));
        }
        notes
    }
}

/// A store's value before the run, and the value it is to hold (or why there is none).
type StoreWrite = (Option<Secret>, Result<Secret, StepError>);

type StepFuture<'s> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StepError>> + Send + 's>>;

/// The progress field a backend step moves, so a rollback knows what may need undoing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    None,
    Apply,
    Retire,
}

impl Mark {
    fn set(self, target: &mut super::state::TargetState, progress: Progress) {
        match self {
            Mark::None => {}
            Mark::Apply => {
                if progress == Progress::Started {
                    target.applied_at = Some(chrono::Utc::now().timestamp_millis());
                }
                target.apply = progress;
            }
            Mark::Retire => target.retire = progress,
        }
    }
}

fn all_ok(results: &[(usize, Result<(), StepError>)]) -> Result<(), Stop> {
    if results.iter().all(|(_, r)| r.is_ok()) {
        Ok(())
    } else {
        Err(Stop::Failed)
    }
}

/// The sessions of the old login and of the new one (the same list when the login does not
/// change); `None` when the server keeps no session list.
async fn login_sessions(
    backend: &dyn crate::backend::Backend,
    old_login: &str,
    new_login: Option<&str>,
) -> Result<Option<(Vec<Session>, Vec<Session>)>, StepError> {
    let Some(on_old) = backend.sessions(old_login).await.map_err(StepError::from)? else {
        return Ok(None);
    };
    let on_new = match new_login {
        Some(login) => backend
            .sessions(login)
            .await
            .map_err(StepError::from)?
            .unwrap_or_default(),
        None => on_old.clone(),
    };
    Ok(Some((on_old, on_new)))
}

/// What [`RunContext::verify_stores`] accepts in a store.
#[derive(Clone, Copy)]
enum Expect<'c> {
    /// After the forward path: exactly this run's new credential.
    Exactly(&'c Credential),
    /// After a rollback: anything that logs in but this run's new credential (a key the run
    /// found absent may be absent again).
    Not(Option<&'c Credential>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restored {
    /// The store holds its value from before the run again.
    Original,
    /// It holds a value this run did not write: left alone.
    Foreign,
}

impl Restored {
    /// What the `undo-publish` record says beside `ok`.
    fn detail(self) -> &'static str {
        match self {
            Restored::Original => "",
            Restored::Foreign => "left: holds a value this run did not write",
        }
    }
}

/// Which of a target's credentials a sync copies: the new one forward, the old one back.
#[derive(Debug, Clone, Copy)]
enum Held {
    New,
    Old,
}

fn no_sync_entry() -> StepError {
    StepError::new(
        "journal_state",
        "the run state or config has no sync entry to restore",
    )
}

/// Puts a store's original value back, unless someone else has written it since.
async fn restore_store(
    store: &dyn crate::store::Store,
    state: &StoreState,
) -> Result<Restored, StepError> {
    let now = store.read().await.map_err(StepError::from)?;
    if now == state.original {
        store
            .settle(state.original.as_ref())
            .await
            .map_err(StepError::from)?;
        return Ok(Restored::Original);
    }
    if now.is_some() && now == state.written {
        store
            .compare_and_swap(state.written.as_ref(), state.original.as_ref())
            .await
            .map_err(StepError::from)?;
        return Ok(Restored::Original);
    }
    Ok(Restored::Foreign)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UndoNeeded {
    /// The backend accepts this run's new credential: take it back.
    Yes,
    /// It does not, and the old one logs in: apply never took effect, or was undone already.
    NotApplied,
    /// Neither logs in, but a credential a store holds does: someone rotated since. Undoing
    /// would overwrite a password this run did not write.
    Superseded,
}

impl UndoNeeded {
    /// What the `undo-apply` record says beside `ok`.
    fn detail(self) -> &'static str {
        match self {
            UndoNeeded::Yes => "",
            UndoNeeded::NotApplied => {
                "nothing to undo: the new credential does not log in, the old one does"
            }
            UndoNeeded::Superseded => "left: the backend holds a credential this run did not write",
        }
    }
}

/// Decides whether `undo-apply` may touch the backend. When nothing logs in at all (the backend
/// is unreachable, say) it answers `Yes`: the undo then fails or restores the old credential.
async fn undo_needed(
    runtime: &TargetRuntime<'_>,
    current: &Credential,
    next: &Credential,
) -> UndoNeeded {
    // A dual undo takes the run's new password away whether or not a login with it just worked
    // (one that failed for a passing reason must not leave a valid password nobody knows). It
    // can take more: ClickHouse has no statement removing one password, so its undo sets the old
    // one alone. A store holding someone else's working credential is therefore left alone too.
    if runtime.backend.strategy() == Strategy::Dual {
        return match store_holds_another_that_logs_in(runtime, current, next).await {
            true => UndoNeeded::Superseded,
            false => UndoNeeded::Yes,
        };
    }
    if runtime.backend.login(next).await.is_ok() {
        return UndoNeeded::Yes;
    }
    if runtime.backend.login(current).await.is_ok() {
        return UndoNeeded::NotApplied;
    }
    if store_holds_another_that_logs_in(runtime, current, next).await {
        return UndoNeeded::Superseded;
    }
    UndoNeeded::Yes
}

/// Whether a store holds a credential other than the run's two that logs in: someone rotated
/// since (by hand after a failed rollback, say).
async fn store_holds_another_that_logs_in(
    runtime: &TargetRuntime<'_>,
    current: &Credential,
    next: &Credential,
) -> bool {
    for (store, config) in runtime.stores.iter().zip(&runtime.config.stores) {
        let Ok(Some(value)) = store.read().await else {
            continue;
        };
        let Ok(held) = format::credential_from(&value, &config.format, &runtime.config.user) else {
            continue;
        };
        if &held != current && &held != next && runtime.backend.login(&held).await.is_ok() {
            return true;
        }
    }
    false
}

#[cfg(test)]
#[path = "run_tests.rs"]
mod tests;

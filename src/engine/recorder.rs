//! Journals every step boundary (state and step row in one transaction) and times each step;
//! the boundaries of steps that act on nothing outside the journal go with the next write.

use std::collections::BTreeSet;
use std::time::Instant;

use super::state::RunState;
use super::StepError;
use crate::failpoint;
use crate::journal::{Journal, JournalError, StepRecord};

pub struct Recorder<'j> {
    journal: &'j Journal,
    pub id: String,
    /// This process execution's claim on the run: every checkpoint must match it (fencing).
    pub owner: String,
    pub state: RunState,
    pub steps: Vec<StepRecord>,
    clocks: Vec<Instant>,
    /// Set when a checkpoint could not be written: the run must stop going forward.
    pub journal_failed: bool,
    /// Set when the journal says another process drives the run now: this one must stop acting.
    pub fenced: bool,
    /// Every failed step with its error label, for the failure counters.
    pub failures: Vec<Failure>,
    /// The part each step changes, aligned with `steps`.
    step_parts: Vec<Part>,
    /// Parts changed since the last durable checkpoint.
    run_dirty: bool,
    dirty_targets: BTreeSet<usize>,
    /// Records of [`DEFERRED_STEPS`] not written yet: the next checkpoint writes them with its own.
    deferred: Vec<StepId>,
}

/// Steps that change nothing outside the journal and whose records recovery does not read
/// (it decides from the write-ahead records of the steps that act, and from what the backend
/// and the stores hold). Their starts and ends ride with the next checkpoint instead of being
/// a journal transaction each; the write-ahead record of the next step that acts carries them
/// (generate's sealed password with it). A journal that fails meanwhile fails that record, so
/// nothing acts on it.
const DEFERRED_STEPS: [&str; 3] = ["generate", "verify-backend", "verify"];

#[derive(Debug, Clone)]
pub struct Failure {
    pub step: String,
    pub subject: String,
    pub label: &'static str,
}

pub type StepId = usize;

/// Which part of the run state a step changes: the run's own (consumers, rollback flag) or one
/// target's. A checkpoint writes only the parts that changed since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Run,
    Target(usize),
}

impl<'j> Recorder<'j> {
    pub fn new(
        journal: &'j Journal,
        id: String,
        owner: String,
        state: RunState,
        steps: Vec<StepRecord>,
    ) -> Self {
        let clocks = steps.iter().map(|_| Instant::now()).collect();
        let step_parts = steps.iter().map(|_| Part::Run).collect();
        Recorder {
            journal,
            id,
            owner,
            state,
            steps,
            clocks,
            journal_failed: false,
            fenced: false,
            step_parts,
            run_dirty: false,
            dirty_targets: BTreeSet::new(),
            deferred: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub fn journal(&self) -> &'j Journal {
        self.journal
    }

    /// Whether every checkpoint so far is durable and the run is still ours.
    pub fn durable(&self) -> bool {
        !self.journal_failed && !self.fenced
    }

    /// Marks a part as changed: the next checkpoint writes it.
    pub fn touch(&mut self, part: Part) {
        match part {
            Part::Run => self.run_dirty = true,
            Part::Target(i) => {
                self.dirty_targets.insert(i);
            }
        }
    }

    /// Writes the given steps' records and the parts changed since the last checkpoint in one
    /// journal transaction.
    async fn checkpoint(&mut self, indexes: &[StepId], durable: bool) {
        for &index in indexes {
            self.touch(self.step_parts[index]);
        }
        let down = indexes.iter().any(|&index| {
            let step = &self.steps[index];
            failpoint::journal_down(&step.step, &step.subject, &step.status)
        });
        let deferrable = !durable
            && !indexes.is_empty()
            && indexes
                .iter()
                .all(|&index| DEFERRED_STEPS.contains(&self.steps[index].step.as_str()));
        if deferrable {
            self.deferred.extend_from_slice(indexes);
            self.boundaries(indexes).await;
            return;
        }
        let own = indexes;
        let mut with_deferred = std::mem::take(&mut self.deferred);
        with_deferred.extend_from_slice(own);
        // A deferred step's start and end are one record by now.
        with_deferred.sort_unstable();
        with_deferred.dedup();
        let indexes = with_deferred.as_slice();
        let result = if down {
            Err(JournalError::Open(
                "journal made unavailable by a failpoint".into(),
            ))
        } else {
            let header = self.run_dirty.then(|| self.state.header_bytes());
            let parts: Vec<_> = self
                .dirty_targets
                .iter()
                .map(|&i| {
                    (
                        self.state.targets[i].name.clone(),
                        self.state.target_bytes(i),
                    )
                })
                .collect();
            let steps: Vec<&StepRecord> = indexes.iter().map(|&i| &self.steps[i]).collect();
            self.journal
                .checkpoint(
                    &self.id,
                    &self.owner,
                    header.as_ref().map(|h| h.as_slice()),
                    &parts,
                    &steps,
                    durable,
                )
                .await
        };
        match result {
            Ok(()) => {
                self.run_dirty = false;
                self.dirty_targets.clear();
            }
            Err(JournalError::Fenced(_)) => {
                tracing::error!(run = %self.id, "another process has taken over this run; stopping");
                self.fenced = true;
            }
            Err(error) => {
                tracing::error!(run = %self.id, cause = %error, "journal checkpoint failed");
                self.journal_failed = true;
            }
        }
        self.boundaries(own).await;
    }

    /// Writes the deferred records, if any: before the run's outcome is recorded.
    pub async fn flush(&mut self) {
        if !self.deferred.is_empty() {
            self.checkpoint(&[], false).await;
        }
    }

    /// Test hooks at each crossed step boundary (failpoints builds only).
    async fn boundaries(&self, indexes: &[StepId]) {
        for &index in indexes {
            let step = &self.steps[index];
            failpoint::boundary(&step.step, &step.subject, &step.status).await;
        }
    }

    /// Records that `step` on `subject` starts, with the state of `part` as it is now.
    pub async fn begin(&mut self, part: Part, step: &str, subject: &str) -> StepId {
        self.begin_as(part, step, subject, false).await
    }

    /// [`Recorder::begin`] for a step that changes something outside the journal: its record
    /// is durable when this returns (write-ahead), or `journal_failed` is set.
    pub async fn begin_effect(&mut self, part: Part, step: &str, subject: &str) -> StepId {
        self.begin_as(part, step, subject, true).await
    }

    async fn begin_as(&mut self, part: Part, step: &str, subject: &str, effect: bool) -> StepId {
        self.begin_all(&[(part, subject.to_string())], step, effect)
            .await[0]
    }

    /// Records that `step` starts on several subjects, in one journal write; with `effect`,
    /// durably (write-ahead for all of them).
    pub async fn begin_all(
        &mut self,
        subjects: &[(Part, String)],
        step: &str,
        effect: bool,
    ) -> Vec<StepId> {
        let mut indexes = Vec::with_capacity(subjects.len());
        for (part, subject) in subjects {
            tracing::info!(run = %self.id, step, subject, "step started");
            self.steps.push(StepRecord {
                seq: self.steps.len() as i64 + 1,
                step: step.to_string(),
                subject: subject.to_string(),
                status: "started".into(),
                started_at: chrono::Utc::now().timestamp_millis(),
                duration_ms: None,
                error: None,
            });
            self.clocks.push(Instant::now());
            self.step_parts.push(*part);
            indexes.push(self.steps.len() - 1);
        }
        self.checkpoint(&indexes, effect).await;
        indexes
    }

    /// Records how the step ended; `status` is `ok`, `failed` or `skipped`.
    pub async fn end(&mut self, index: StepId, status: &str, error: Option<String>) {
        self.close(index, status, error);
        self.checkpoint(&[index], false).await;
    }

    /// Closes several steps, each with its own status and detail, in one journal write.
    pub async fn end_each(&mut self, ended: Vec<(StepId, &str, Option<String>)>) {
        let indexes: Vec<StepId> = ended.iter().map(|(index, _, _)| *index).collect();
        for (index, status, detail) in ended {
            self.close(index, status, detail);
        }
        self.checkpoint(&indexes, false).await;
    }

    /// Closes several steps with the same status, in one journal write.
    pub async fn end_all(&mut self, indexes: &[StepId], status: &str, error: Option<String>) {
        for &index in indexes {
            self.close(index, status, error.clone());
        }
        self.checkpoint(indexes, false).await;
    }

    /// Records how several steps ended, in one journal write.
    pub async fn finish_all<T>(&mut self, ended: &[(StepId, &Result<T, StepError>)]) {
        for (index, result) in ended {
            match result {
                Ok(_) => self.close(*index, "ok", None),
                Err(error) => {
                    self.note_failure(*index, error);
                    self.close(*index, "failed", Some(error.message.clone()));
                }
            }
        }
        let indexes: Vec<StepId> = ended.iter().map(|(index, _)| *index).collect();
        self.checkpoint(&indexes, false).await;
    }

    /// Sets a step's end in memory and logs it; the caller checkpoints.
    fn close(&mut self, index: StepId, status: &str, error: Option<String>) {
        let elapsed = self.clocks[index].elapsed().as_millis() as i64;
        let step = &mut self.steps[index];
        step.status = status.to_string();
        step.duration_ms = Some(elapsed);
        step.error = error;
        match &step.error {
            Some(cause) => {
                tracing::warn!(run = %self.id, step = %step.step, subject = %step.subject, status, cause = %cause, duration_ms = elapsed, "step ended")
            }
            None => {
                tracing::info!(run = %self.id, step = %step.step, subject = %step.subject, status, duration_ms = elapsed, "step ended")
            }
        }
    }

    /// Ends a step from a result: `ok`, or `failed` with the error's text.
    pub async fn finish<T>(&mut self, index: StepId, result: &Result<T, StepError>) {
        match result {
            Ok(_) => self.end(index, "ok", None).await,
            Err(error) => self.fail(index, error).await,
        }
    }

    /// Like [`Recorder::finish`], keeping a non-empty success detail in the step's record.
    pub async fn finish_noted(&mut self, index: StepId, result: &Result<&str, StepError>) {
        match result {
            Ok("") => self.end(index, "ok", None).await,
            Ok(detail) => self.end(index, "ok", Some(detail.to_string())).await,
            Err(error) => self.fail(index, error).await,
        }
    }

    pub async fn fail(&mut self, index: StepId, error: &StepError) {
        self.note_failure(index, error);
        self.end(index, "failed", Some(error.message.clone())).await;
    }

    fn note_failure(&mut self, index: StepId, error: &StepError) {
        self.failures.push(Failure {
            step: self.steps[index].step.clone(),
            subject: self.steps[index].subject.clone(),
            label: error.label,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    /// Each journaled step of run `r` as `step status`.
    async fn journaled(journal: &Journal) -> Vec<String> {
        let run = journal
            .run("r")
            .await
            .expect("journal answers")
            .expect("run r");
        run.steps
            .iter()
            .map(|s| format!("{} {}", s.step, s.status))
            .collect()
    }

    #[tokio::test]
    async fn records_of_steps_that_act_on_nothing_ride_with_the_next_write() {
        let key = Secret::new("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let journal = Journal::open(&Secret::new("sqlite::memory:"), &key)
            .await
            .expect("in-memory journal");
        let names = vec!["t".to_string()];
        let state = RunState::new(&names, &[]);
        journal
            .begin_run(
                "r",
                "o",
                "test",
                &names,
                &state.header_bytes(),
                &state.all_target_parts(),
            )
            .await
            .expect("run begins");
        let mut rec = Recorder::new(&journal, "r".into(), "o".into(), state, Vec::new());

        let generate = rec.begin(Part::Target(0), "generate", "t").await;
        rec.end(generate, "ok", None).await;
        assert!(journaled(&journal).await.is_empty(), "deferred");
        // The write-ahead record of a step that acts carries them, in the same transaction.
        let apply = rec.begin_effect(Part::Target(0), "apply", "t").await;
        assert!(rec.durable());
        assert_eq!(journaled(&journal).await, ["generate ok", "apply started"]);
        rec.end(apply, "ok", None).await;
        let verify = rec.begin(Part::Target(0), "verify-backend", "t").await;
        rec.end(verify, "ok", None).await;
        assert_eq!(journaled(&journal).await, ["generate ok", "apply ok"]);
        // Before the outcome is written, whatever is still deferred is written.
        rec.flush().await;
        assert_eq!(
            journaled(&journal).await,
            ["generate ok", "apply ok", "verify-backend ok"]
        );
    }
}

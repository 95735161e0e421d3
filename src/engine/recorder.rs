//! Journals every step boundary (state and step row in one transaction) and times each step.

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
}

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

//! The run report, as text (one line per step) or one JSON document. Never holds a secret:
//! it is built only from step names, subjects, statuses and error texts.

use std::fmt::Write;

use serde::Serialize;

use crate::exit::{EXIT_CANNOT_START, EXIT_FAILED, EXIT_OK, EXIT_ROLLBACK_FAILED};
use crate::journal::{RunSummary, StepRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every store holds the new credential and it logs in.
    Succeeded,
    /// Preflight found a problem; nothing was changed.
    Refused,
    /// A step failed; every change was undone and the old credential logs in.
    RolledBack,
    /// Undoing failed: a human must act. `state` in the report says where things stand.
    RollbackFailed,
    /// The run lost its target lock and stopped acting; recovery finishes or undoes it.
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Refused => "refused",
            Outcome::RolledBack => "rolled_back",
            Outcome::RollbackFailed => "rollback_failed",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// The process exit code the command line contract gives this outcome.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Succeeded => EXIT_OK,
            Outcome::Refused | Outcome::RolledBack => EXIT_FAILED,
            Outcome::RollbackFailed => EXIT_ROLLBACK_FAILED,
            Outcome::Interrupted => EXIT_CANNOT_START,
        }
    }

    fn meaning(self) -> &'static str {
        match self {
            Outcome::Succeeded => "every store holds the new credential and it logs in",
            Outcome::Refused => "nothing was changed",
            Outcome::RolledBack => {
                "every change was undone; the old credential is in place and logs in"
            }
            Outcome::RollbackFailed => {
                "MANUAL ACTION NEEDED: see the state below; recovery retries the rollback"
            }
            Outcome::Interrupted => {
                "the target lock was lost: this process stopped; recovery finishes the run"
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub trigger: String,
    pub targets: Vec<String>,
    pub outcome: Outcome,
    pub duration_ms: u64,
    pub steps: Vec<StepRecord>,
    /// Where each backend and store stands when that is not obvious from the outcome.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<String>,
    /// What `confirm` saw in each backend's session list (counts and client addresses).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub confirm: Vec<Confirmation>,
    /// Failed steps with their error labels, for metrics.
    #[serde(skip)]
    pub failures: Vec<super::recorder::Failure>,
    /// (target, kind) of each backend warning (a change that could not be persisted), for metrics.
    #[serde(skip)]
    pub warnings: Vec<(String, &'static str)>,
}

/// Whether the workload moved to the new credential, from the backend's own session list.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Confirmation {
    pub target: String,
    /// No session on the old credential remains, and (where expected) one on the new exists.
    pub drained: bool,
    /// Sessions still on the old credential, and the distinct client addresses they come from.
    pub old_sessions: usize,
    pub old_clients: Vec<String>,
    /// Sessions opened with the new credential since the consumers restarted.
    pub new_sessions: usize,
    pub new_clients: Vec<String>,
    /// A restarted Deployment/StatefulSet whose login had sessions before must show new ones.
    pub new_expected: bool,
    pub waited_ms: u64,
    /// `dual`: the old password was kept (both log in) because sessions had not drained.
    pub retire_skipped: bool,
}

impl Confirmation {
    fn to_text(&self) -> String {
        let clients = |list: &[String]| {
            if list.is_empty() {
                String::new()
            } else {
                format!(" from {}", list.join(", "))
            }
        };
        let mut line = format!(
            "target {}: {} after {:.1}s: {} session(s) on the old credential{}, {} on the new one{}",
            self.target,
            if self.drained { "drained" } else { "NOT DRAINED" },
            self.waited_ms as f64 / 1000.0,
            self.old_sessions,
            clients(&self.old_clients),
            self.new_sessions,
            clients(&self.new_clients),
        );
        if !self.drained && self.old_sessions == 0 && self.new_expected {
            line.push_str("; the restarted consumers opened no session with the new credential");
        }
        if self.retire_skipped {
            line.push_str(
                "; retire skipped: the old and the new password both log in until a later run retires the old one",
            );
        }
        line
    }
}

impl RunReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "run {} ({}) targets {}: {} in {:.1}s",
            self.run_id,
            self.trigger,
            self.targets.join(", "),
            self.outcome.as_str(),
            self.duration_ms as f64 / 1000.0
        );
        write_steps(&mut out, &self.steps);
        for confirmation in &self.confirm {
            let _ = writeln!(out, "  confirm: {}", confirmation.to_text());
        }
        for line in &self.state {
            let _ = writeln!(out, "  state: {line}");
        }
        let _ = writeln!(
            out,
            "outcome: {}: {}",
            self.outcome.as_str(),
            self.outcome.meaning()
        );
        out
    }
}

fn write_steps(out: &mut String, steps: &[StepRecord]) {
    for step in steps {
        let duration = step
            .duration_ms
            .map_or("-".to_string(), |ms| format!("{ms} ms"));
        let _ = write!(
            out,
            "  {:<15} {:<28} {:<8} {:>9}",
            step.step, step.subject, step.status, duration
        );
        if let Some(error) = &step.error {
            let _ = write!(out, "  {error}");
        }
        out.push('\n');
    }
}

/// `history` as text: one header line per run, then its steps.
pub fn history_text(runs: &[RunSummary]) -> String {
    let mut out = String::new();
    if runs.is_empty() {
        out.push_str("no runs yet\n");
    }
    for run in runs {
        let started = chrono::DateTime::from_timestamp_millis(run.started_at)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{started} run {} ({}) targets {}: {}",
            run.id,
            run.trigger,
            run.targets.join(", "),
            run.outcome.as_deref().unwrap_or("unfinished")
        );
        write_steps(&mut out, &run.steps);
    }
    out
}

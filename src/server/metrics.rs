//! Prometheus metrics. The names are a contract for the dashboards and alert rules.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::engine::{Outcome, RunReport};
use crate::journal::TargetHistory;

const OUTCOMES: [Outcome; 5] = [
    Outcome::Succeeded,
    Outcome::Refused,
    Outcome::RolledBack,
    Outcome::RollbackFailed,
    Outcome::Interrupted,
];

pub struct Metrics {
    registry: Registry,
    rotations: IntCounterVec,
    duration: HistogramVec,
    step_failures: IntCounterVec,
    rollbacks: IntCounterVec,
    last_success: GaugeVec,
    last_attempt: GaugeVec,
    next_rotation: GaugeVec,
    credential_valid: IntGaugeVec,
    credential_age: GaugeVec,
    credential_max_age: GaugeVec,
    in_progress: IntGaugeVec,
    skipped: IntCounterVec,
    warnings: IntCounterVec,
    sessions_on_old: IntGaugeVec,
    leader: prometheus::IntGauge,
    /// Unix seconds of each target's last success, to compute the credential's age at scrape time.
    successes: Mutex<HashMap<String, f64>>,
    /// When each target's credential last changed (ms since the epoch; a successful run's
    /// start): sessions older than that are on the old credential.
    rotated_at: Mutex<HashMap<String, i64>>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn unix_seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn now_seconds() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

impl Metrics {
    /// Registers every metric in a fresh registry; counters start at 0 for each target so
    /// that `increase()` sees the first failure.
    pub fn new(targets: &[(String, std::time::Duration)]) -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Metrics {
            rotations: counter(
                r,
                "rotator_rotations_total",
                "Rotation runs by target and outcome.",
                &["target", "outcome"],
            ),
            duration: {
                let opts = HistogramOpts::new(
                    "rotator_rotation_duration_seconds",
                    "Wall time of rotation runs.",
                )
                .buckets(vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]);
                let metric = HistogramVec::new(opts, &["target"]).expect("valid metric");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("unique metric");
                metric
            },
            step_failures: counter(
                r,
                "rotator_step_failures_total",
                "Failed steps by target, step and error kind.",
                &["target", "step", "error"],
            ),
            rollbacks: counter(
                r,
                "rotator_rollbacks_total",
                "Rollbacks by target and how they ended (rolled_back, rollback_failed).",
                &["target", "outcome"],
            ),
            last_success: gauge(
                r,
                "rotator_last_success_timestamp_seconds",
                "When the target last rotated successfully.",
                &["target"],
            ),
            last_attempt: gauge(
                r,
                "rotator_last_attempt_timestamp_seconds",
                "When a rotation of the target last started.",
                &["target"],
            ),
            next_rotation: gauge(
                r,
                "rotator_next_rotation_timestamp_seconds",
                "When the target is next scheduled to rotate.",
                &["target"],
            ),
            credential_valid: int_gauge(
                r,
                "rotator_credential_valid",
                "1 when every store's credential logs in (drift check).",
                &["target"],
            ),
            credential_age: gauge(
                r,
                "rotator_credential_age_seconds",
                "Seconds since the target's credential was last rotated.",
                &["target"],
            ),
            credential_max_age: gauge(
                r,
                "rotator_credential_max_age_seconds",
                "Age at which the target's credential is overdue (max_age).",
                &["target"],
            ),
            in_progress: int_gauge(
                r,
                "rotator_rotation_in_progress",
                "1 while a rotation of the target runs.",
                &["target"],
            ),
            skipped: counter(
                r,
                "rotator_skipped_schedules_total",
                "Scheduled rotations not run, by reason (missed_window, busy).",
                &["target", "reason"],
            ),
            warnings: counter(r, "rotator_warnings_total", "Changes that worked but need attention, by kind (not_persisted, dual_unsupported, sessions_not_drained).", &["target", "kind"]),
            sessions_on_old: int_gauge(
                r,
                "rotator_sessions_on_old_credential",
                "Sessions the backend lists on the credential before the last rotation, at the end of a run or drift check.",
                &["target"],
            ),
            leader: {
                let metric = prometheus::IntGauge::new(
                    "rotator_leader",
                    "1 while this replica schedules: its scheduler runs and can claim fires in the journal.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("unique metric");
                metric
            },
            successes: Mutex::new(HashMap::new()),
            rotated_at: Mutex::new(HashMap::new()),
            registry,
        };
        let build = int_gauge(
            &metrics.registry,
            "rotator_build_info",
            "The running version.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for (target, max_age) in targets {
            metrics
                .credential_max_age
                .with_label_values(&[target])
                .set(max_age.as_secs_f64());
            for outcome in OUTCOMES {
                metrics
                    .rotations
                    .with_label_values(&[target, outcome.as_str()]);
            }
            for outcome in [Outcome::RolledBack, Outcome::RollbackFailed] {
                metrics
                    .rollbacks
                    .with_label_values(&[target, outcome.as_str()]);
            }
            for reason in ["missed_window", "busy"] {
                metrics.skipped.with_label_values(&[target, reason]);
            }
            metrics.in_progress.with_label_values(&[target]).set(0);
        }
        metrics
    }

    /// Sets what the journal knows, so the values are right right after a restart.
    pub fn set_history(&self, target: &str, history: &TargetHistory) {
        if let Some(ms) = history.last_attempt {
            self.last_attempt
                .with_label_values(&[target])
                .set(unix_seconds(ms));
        }
        if let Some(ms) = history.last_success {
            self.last_success
                .with_label_values(&[target])
                .set(unix_seconds(ms));
            self.successes
                .lock()
                .expect("metrics lock")
                .insert(target.to_string(), unix_seconds(ms));
            self.rotated_at
                .lock()
                .expect("metrics lock")
                .entry(target.to_string())
                .or_insert(ms);
        }
    }

    pub fn set_in_progress(&self, targets: &[String], running: bool) {
        for target in targets {
            self.in_progress
                .with_label_values(&[target])
                .set(i64::from(running));
            if running {
                self.last_attempt
                    .with_label_values(&[target])
                    .set(now_seconds());
            }
        }
    }

    pub fn is_in_progress(&self, target: &str) -> bool {
        self.in_progress.with_label_values(&[target]).get() > 0
    }

    pub fn set_next(&self, target: &str, at: chrono::DateTime<chrono::Utc>) {
        self.next_rotation
            .with_label_values(&[target])
            .set(at.timestamp_millis() as f64 / 1000.0);
    }

    pub fn set_valid(&self, target: &str, valid: bool) {
        self.credential_valid
            .with_label_values(&[target])
            .set(i64::from(valid));
    }

    pub fn set_sessions_on_old(&self, target: &str, sessions: usize) {
        self.sessions_on_old
            .with_label_values(&[target])
            .set(sessions as i64);
    }

    /// When the target's credential last changed (ms since the epoch), as far as this process knows.
    pub fn rotated_at(&self, target: &str) -> Option<i64> {
        self.rotated_at
            .lock()
            .expect("metrics lock")
            .get(target)
            .copied()
    }

    pub fn set_leader(&self, scheduling: bool) {
        self.leader.set(i64::from(scheduling));
    }

    pub fn skipped(&self, target: &str, reason: &str) {
        self.skipped.with_label_values(&[target, reason]).inc();
    }

    /// Counts a finished run; `consumers_of` names the targets a consumer serves, to attribute
    /// a consumer's failure to them.
    pub fn observe_run(&self, report: &RunReport, consumers_of: impl Fn(&str) -> Vec<String>) {
        let outcome = report.outcome.as_str();
        for target in &report.targets {
            self.rotations.with_label_values(&[target, outcome]).inc();
            self.duration
                .with_label_values(&[target])
                .observe(report.duration_ms as f64 / 1000.0);
            if matches!(
                report.outcome,
                Outcome::RolledBack | Outcome::RollbackFailed
            ) {
                self.rollbacks.with_label_values(&[target, outcome]).inc();
            }
            if report.outcome == Outcome::Succeeded {
                let now = now_seconds();
                self.last_success.with_label_values(&[target]).set(now);
                self.successes
                    .lock()
                    .expect("metrics lock")
                    .insert(target.clone(), now);
                let started = chrono::Utc::now().timestamp_millis() - report.duration_ms as i64;
                self.rotated_at
                    .lock()
                    .expect("metrics lock")
                    .insert(target.clone(), started);
            }
        }
        for found in &report.confirm {
            self.set_sessions_on_old(&found.target, found.old_sessions);
        }
        for (target, kind) in &report.warnings {
            self.warnings
                .with_label_values(&[target.as_str(), kind])
                .inc();
        }
        for failure in &report.failures {
            let owner = failure.subject.split('/').next().unwrap_or_default();
            let targets = if report.targets.iter().any(|t| t == owner) {
                vec![owner.to_string()]
            } else {
                consumers_of(failure.subject.trim_start_matches("consumer/"))
            };
            for target in targets {
                self.step_failures
                    .with_label_values(&[&target, &failure.step, failure.label])
                    .inc();
            }
        }
    }

    /// The text exposition, with credential ages computed now.
    pub fn encode(&self) -> String {
        let now = now_seconds();
        for (target, at) in self.successes.lock().expect("metrics lock").iter() {
            self.credential_age
                .with_label_values(&[target])
                .set((now - at).max(0.0));
        }
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding");
        String::from_utf8(buffer).expect("the exposition is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::recorder::Failure;

    fn report(outcome: Outcome) -> RunReport {
        RunReport {
            run_id: "r".into(),
            trigger: "api".into(),
            targets: vec!["cache".into()],
            outcome,
            duration_ms: 1500,
            steps: Vec::new(),
            state: Vec::new(),
            failures: vec![Failure {
                step: "restart".into(),
                subject: "proxy".into(),
                label: "rollout_timeout",
            }],
            confirm: Vec::new(),
            warnings: vec![("cache".into(), "not_persisted")],
        }
    }

    #[test]
    fn a_run_is_counted_under_its_target_outcome_failures_and_warnings() {
        let metrics = Metrics::new(&[("cache".into(), std::time::Duration::from_secs(86400))]);
        assert!(metrics
            .encode()
            .contains("rotator_rotations_total{outcome=\"rolled_back\",target=\"cache\"} 0"));
        metrics.observe_run(&report(Outcome::RolledBack), |consumer| {
            assert_eq!(consumer, "proxy");
            vec!["cache".into()]
        });
        let text = metrics.encode();
        for line in [
            "rotator_rotations_total{outcome=\"rolled_back\",target=\"cache\"} 1",
            "rotator_rollbacks_total{outcome=\"rolled_back\",target=\"cache\"} 1",
            "rotator_step_failures_total{error=\"rollout_timeout\",step=\"restart\",target=\"cache\"} 1",
            "rotator_warnings_total{kind=\"not_persisted\",target=\"cache\"} 1",
            "rotator_rotation_duration_seconds_sum{target=\"cache\"} 1.5",
            "rotator_credential_max_age_seconds{target=\"cache\"} 86400",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(
            !text.contains("rotator_last_success_timestamp_seconds{"),
            "no success yet"
        );
    }
}

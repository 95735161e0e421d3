//! Prometheus metrics. The names are a contract for the dashboards and alert rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
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

const ROLLBACKS: [Outcome; 2] = [Outcome::RolledBack, Outcome::RollbackFailed];

/// The skip reasons every target starts with at 0, so that `increase()` sees the first skip.
const SKIP_REASONS: [&str; 2] = ["missed_window", "busy"];

/// One family of per-target series: name, help, type and the label besides `target`.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    label: Option<&'static str>,
}

const fn family(
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    label: Option<&'static str>,
) -> Family {
    Family {
        name,
        help,
        kind,
        label,
    }
}

// Indexes into FAMILIES.
const ROTATIONS: usize = 0;
const ROLLBACK_COUNT: usize = 1;
const SKIPPED: usize = 2;
const IN_PROGRESS: usize = 3;
const MAX_AGE: usize = 4;
const NEXT: usize = 5;
const LAST_SUCCESS: usize = 6;
const LAST_ATTEMPT: usize = 7;
const VALID: usize = 8;
const AGE: usize = 9;
const SESSIONS: usize = 10;

const FAMILIES: [Family; 11] = [
    family(
        "rotator_rotations_total",
        "Rotation runs by target and outcome.",
        MetricType::COUNTER,
        Some("outcome"),
    ),
    family(
        "rotator_rollbacks_total",
        "Rollbacks by target and how they ended (rolled_back, rollback_failed).",
        MetricType::COUNTER,
        Some("outcome"),
    ),
    family(
        "rotator_skipped_schedules_total",
        "Scheduled rotations not run, by reason (missed_window, busy).",
        MetricType::COUNTER,
        Some("reason"),
    ),
    family(
        "rotator_rotation_in_progress",
        "1 while a rotation of the target runs.",
        MetricType::GAUGE,
        None,
    ),
    family(
        "rotator_credential_max_age_seconds",
        "Age at which the target's credential is overdue (max_age).",
        MetricType::GAUGE,
        None,
    ),
    family(
        "rotator_next_rotation_timestamp_seconds",
        "When the target is next scheduled to rotate.",
        MetricType::GAUGE,
        None,
    ),
    family(
        "rotator_last_success_timestamp_seconds",
        "When the target last rotated successfully.",
        MetricType::GAUGE,
        None,
    ),
    family(
        "rotator_last_attempt_timestamp_seconds",
        "When a rotation of the target last started.",
        MetricType::GAUGE,
        None,
    ),
    family(
        "rotator_credential_valid",
        "1 when every store's credential logs in (drift check).",
        MetricType::GAUGE,
        None,
    ),
    family(
        "rotator_credential_age_seconds",
        "Seconds since the target's credential was last rotated.",
        MetricType::GAUGE,
        None,
    ),
    family(
        "rotator_sessions_on_old_credential",
        "Sessions the backend lists on the credential before the last rotation, at the end of a run or drift check.",
        MetricType::GAUGE,
        None,
    ),
];

/// One target's series as plain numbers; `None` is a series that does not exist (yet).
/// A prometheus child per series costs about 400 bytes of labels and descriptor copies, so
/// with a dozen series per target a fleet of 10,000 targets took ~50 MiB before any rotation;
/// these are rendered at scrape time instead.
#[derive(Default)]
struct TargetSeries {
    rotations: [Option<u64>; OUTCOMES.len()],
    rollbacks: [Option<u64>; ROLLBACKS.len()],
    skipped: Vec<(&'static str, u64)>,
    in_progress: Option<i64>,
    max_age: Option<f64>,
    next: Option<f64>,
    /// Unix seconds; the credential's age is computed from it at scrape time.
    last_success: Option<f64>,
    last_attempt: Option<f64>,
    valid: Option<i64>,
    sessions_on_old: Option<i64>,
    /// When the credential last changed (ms since the epoch; a successful run's start):
    /// sessions older than that are on the old credential.
    rotated_at: Option<i64>,
}

type Series = Arc<Mutex<HashMap<String, TargetSeries>>>;

/// Renders [`TargetSeries`] as the per-target families at scrape time.
struct PerTarget {
    descs: Vec<Desc>,
    series: Series,
}

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut pair = proto::LabelPair::default();
    pair.set_name(name.to_string());
    pair.set_value(value.to_string());
    pair
}

impl PerTarget {
    fn new(series: Series) -> PerTarget {
        let descs = FAMILIES
            .iter()
            .map(|f| {
                let mut labels = vec!["target".to_string()];
                labels.extend(f.label.map(String::from));
                Desc::new(f.name.into(), f.help.into(), labels, HashMap::new())
                    .expect("valid metric")
            })
            .collect();
        PerTarget { descs, series }
    }
}

impl Collector for PerTarget {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = now_seconds();
        let mut families: Vec<Vec<proto::Metric>> = FAMILIES.iter().map(|_| Vec::new()).collect();
        let mut push = |index: usize, target: &str, extra: Option<&str>, value: f64| {
            // Label pairs sorted by name, as prometheus' own vectors write them.
            let mut labels = Vec::with_capacity(2);
            if let (Some(name), Some(extra)) = (FAMILIES[index].label, extra) {
                labels.push(label(name, extra));
            }
            labels.push(label("target", target));
            let mut metric = proto::Metric::default();
            metric.set_label(labels);
            if FAMILIES[index].kind == MetricType::COUNTER {
                let mut counter = proto::Counter::default();
                counter.set_value(value);
                metric.set_counter(counter);
            } else {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(value);
                metric.set_gauge(gauge);
            }
            families[index].push(metric);
        };
        for (target, s) in self.series.lock().expect("metrics lock").iter() {
            for (outcome, count) in OUTCOMES.iter().zip(s.rotations) {
                if let Some(count) = count {
                    push(ROTATIONS, target, Some(outcome.as_str()), count as f64);
                }
            }
            for (outcome, count) in ROLLBACKS.iter().zip(s.rollbacks) {
                if let Some(count) = count {
                    push(ROLLBACK_COUNT, target, Some(outcome.as_str()), count as f64);
                }
            }
            for (reason, count) in &s.skipped {
                push(SKIPPED, target, Some(reason), *count as f64);
            }
            let gauges = [
                (IN_PROGRESS, s.in_progress.map(|v| v as f64)),
                (MAX_AGE, s.max_age),
                (NEXT, s.next),
                (LAST_SUCCESS, s.last_success),
                (LAST_ATTEMPT, s.last_attempt),
                (VALID, s.valid.map(|v| v as f64)),
                (AGE, s.last_success.map(|at| (now - at).max(0.0))),
                (SESSIONS, s.sessions_on_old.map(|v| v as f64)),
            ];
            for (index, value) in gauges {
                if let Some(value) = value {
                    push(index, target, None, value);
                }
            }
        }
        FAMILIES
            .iter()
            .zip(families)
            .map(|(f, metrics)| {
                let mut family = MetricFamily::default();
                family.set_name(f.name.into());
                family.set_help(f.help.into());
                family.set_field_type(f.kind);
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}

pub struct Metrics {
    registry: Registry,
    duration: HistogramVec,
    step_failures: IntCounterVec,
    warnings: IntCounterVec,
    leader: prometheus::IntGauge,
    /// The per-target series that exist for every target from the start.
    series: Series,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
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
        let mut series = HashMap::with_capacity(targets.len());
        for (target, max_age) in targets {
            series.insert(
                target.clone(),
                TargetSeries {
                    rotations: [Some(0); OUTCOMES.len()],
                    rollbacks: [Some(0); ROLLBACKS.len()],
                    skipped: SKIP_REASONS.iter().map(|r| (*r, 0)).collect(),
                    in_progress: Some(0),
                    max_age: Some(max_age.as_secs_f64()),
                    ..TargetSeries::default()
                },
            );
        }
        let series = Arc::new(Mutex::new(series));
        registry
            .register(Box::new(PerTarget::new(series.clone())))
            .expect("unique metric");
        let metrics = Metrics {
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
            warnings: counter(r, "rotator_warnings_total", "Changes that worked but need attention, by kind (not_persisted, dual_unsupported, sessions_not_drained).", &["target", "kind"]),
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
            series,
            registry,
        };
        let build = prometheus::IntGaugeVec::new(
            Opts::new("rotator_build_info", "The running version."),
            &["version"],
        )
        .expect("valid metric");
        metrics
            .registry
            .register(Box::new(build.clone()))
            .expect("unique metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics
    }

    /// Runs `change` on the target's series, created empty if the target is new.
    fn with<T>(&self, target: &str, change: impl FnOnce(&mut TargetSeries) -> T) -> T {
        let mut series = self.series.lock().expect("metrics lock");
        match series.get_mut(target) {
            Some(s) => change(s),
            None => change(series.entry(target.to_string()).or_default()),
        }
    }

    /// Sets what the journal knows, so the values are right right after a restart.
    pub fn set_history(&self, target: &str, history: &TargetHistory) {
        if history.last_attempt.is_none() && history.last_success.is_none() {
            return;
        }
        self.with(target, |s| {
            if let Some(ms) = history.last_attempt {
                s.last_attempt = Some(unix_seconds(ms));
            }
            if let Some(ms) = history.last_success {
                s.last_success = Some(unix_seconds(ms));
                s.rotated_at.get_or_insert(ms);
            }
        });
    }

    pub fn set_in_progress(&self, targets: &[String], running: bool) {
        for target in targets {
            self.with(target, |s| {
                s.in_progress = Some(i64::from(running));
                if running {
                    s.last_attempt = Some(now_seconds());
                }
            });
        }
    }

    pub fn is_in_progress(&self, target: &str) -> bool {
        self.with(target, |s| *s.in_progress.get_or_insert(0) > 0)
    }

    pub fn set_next(&self, target: &str, at: chrono::DateTime<chrono::Utc>) {
        self.with(target, |s| {
            s.next = Some(at.timestamp_millis() as f64 / 1000.0)
        });
    }

    pub fn set_valid(&self, target: &str, valid: bool) {
        self.with(target, |s| s.valid = Some(i64::from(valid)));
    }

    pub fn set_sessions_on_old(&self, target: &str, sessions: usize) {
        self.with(target, |s| s.sessions_on_old = Some(sessions as i64));
    }

    /// When the target's credential last changed (ms since the epoch), as far as this process knows.
    pub fn rotated_at(&self, target: &str) -> Option<i64> {
        self.series
            .lock()
            .expect("metrics lock")
            .get(target)
            .and_then(|s| s.rotated_at)
    }

    pub fn set_leader(&self, scheduling: bool) {
        self.leader.set(i64::from(scheduling));
    }

    pub fn skipped(&self, target: &str, reason: &'static str) {
        self.with(target, |s| {
            match s.skipped.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, count)) => *count += 1,
                None => s.skipped.push((reason, 1)),
            }
        });
    }

    /// Counts a finished run; `consumers_of` names the targets a consumer serves, to attribute
    /// a consumer's failure to them.
    pub fn observe_run(&self, report: &RunReport, consumers_of: impl Fn(&str) -> Vec<String>) {
        for target in &report.targets {
            self.duration
                .with_label_values(&[target])
                .observe(report.duration_ms as f64 / 1000.0);
            self.with(target, |s| {
                if let Some(i) = OUTCOMES.iter().position(|o| *o == report.outcome) {
                    *s.rotations[i].get_or_insert(0) += 1;
                }
                if let Some(i) = ROLLBACKS.iter().position(|o| *o == report.outcome) {
                    *s.rollbacks[i].get_or_insert(0) += 1;
                }
                if report.outcome == Outcome::Succeeded {
                    s.last_success = Some(now_seconds());
                    s.rotated_at =
                        Some(chrono::Utc::now().timestamp_millis() - report.duration_ms as i64);
                }
            });
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
    fn configured_targets_start_at_zero_and_other_series_appear_when_set() {
        let metrics = Metrics::new(&[("cache".into(), std::time::Duration::from_secs(60))]);
        metrics.skipped("cache", "unfinished_run");
        metrics.skipped("cache", "busy");
        metrics.set_valid("gone", false);
        let text = metrics.encode();
        for line in [
            "rotator_rotations_total{outcome=\"interrupted\",target=\"cache\"} 0",
            "rotator_rollbacks_total{outcome=\"rollback_failed\",target=\"cache\"} 0",
            "rotator_skipped_schedules_total{reason=\"missed_window\",target=\"cache\"} 0",
            "rotator_skipped_schedules_total{reason=\"busy\",target=\"cache\"} 1",
            "rotator_skipped_schedules_total{reason=\"unfinished_run\",target=\"cache\"} 1",
            "rotator_rotation_in_progress{target=\"cache\"} 0",
            "rotator_credential_max_age_seconds{target=\"cache\"} 60",
            "rotator_credential_valid{target=\"gone\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // A target outside the config has only the series it was given.
        assert_eq!(text.matches("target=\"gone\"").count(), 1, "{text}");
        assert!(!metrics.is_in_progress("cache"));
        metrics.set_in_progress(&["cache".into()], true);
        assert!(metrics.is_in_progress("cache"));
        assert!(metrics
            .encode()
            .contains("rotator_last_attempt_timestamp_seconds{target=\"cache\"}"));
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

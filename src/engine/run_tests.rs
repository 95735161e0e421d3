//! The transaction against in-memory parts: a backend, two stores and a consumer that keep
//! their state in memory and write every call, in order, to one shared log, over an in-memory
//! SQLite journal. Each test injects one failure and checks what the rollback did and in which
//! order (DESIGN.md: stores first; `single` restores the password before rolling the consumers
//! out again, `dual`/`alternating` only after), and what `undo_needed` decides. No server is
//! started: each test takes milliseconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::consumer::{Consumer, ConsumerError};
use crate::journal::{Journal, StepRecord};
use crate::store::{Store, StoreError};

const OLD: &str = "oldpassword";
/// A password neither the run nor the test's "before" state holds: someone else's rotation.
const OTHER: &str = "otherpassword";

/// Every call the fakes receive, in order, as `part.call(argument)`; a failed call ends in
/// ` failed`.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, entry: String) {
        self.0.lock().unwrap().push(entry);
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The calls that change something (no reads, no logins): the order the tests check.
    fn changes(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|e| !e.contains(".read") && !e.contains(".login"))
            .collect()
    }
}

/// Which call fails, and on which of its calls (1-based): `("backend.login(new)", 2)`.
#[derive(Clone, Default)]
struct Faults {
    fail: Arc<Mutex<Vec<(String, usize)>>>,
    seen: Arc<Mutex<HashMap<String, usize>>>,
}

impl Faults {
    fn fail(&self, call: &str, nth: usize) {
        self.fail.lock().unwrap().push((call.to_string(), nth));
    }

    /// Counts `call` and says whether this one fails.
    fn hit(&self, call: &str) -> bool {
        let mut seen = self.seen.lock().unwrap();
        let count = seen.entry(call.to_string()).or_default();
        *count += 1;
        let n = *count;
        self.fail
            .lock()
            .unwrap()
            .iter()
            .any(|(c, nth)| c == call && *nth == n)
    }
}

/// Names a password (or a URL holding one) in the log without printing it.
fn label(value: &str) -> &'static str {
    if value.contains(OLD) {
        "old"
    } else if value.contains(OTHER) {
        "other"
    } else {
        "new"
    }
}

/// Both ends of every fake: the log and the faults; a shutdown signal that `cancel_at` sends
/// once that call has happened; and the store write (`foreign_at`) where someone else's value
/// lands instead of the run's.
#[derive(Clone, Default)]
struct Shared {
    log: Log,
    faults: Faults,
    cancel: CancellationToken,
    cancel_at: Option<String>,
    foreign_at: Option<String>,
    /// How long the consumer's restart takes.
    restart_takes: Duration,
    /// Extra lines of the config's `[rotator]` section.
    rotator: &'static str,
}

impl Shared {
    /// Logs `call` and fails it when a fault says so.
    fn call(&self, call: String) -> Result<(), ()> {
        let failed = self.faults.hit(&call);
        if self.cancel_at.as_ref() == Some(&call) {
            self.cancel.cancel();
        }
        self.log
            .push(format!("{call}{}", if failed { " failed" } else { "" }));
        if failed {
            Err(())
        } else {
            Ok(())
        }
    }
}

/// A server that keeps the credentials that log in.
struct FakeBackend {
    shared: Shared,
    strategy: Strategy,
    /// The alternating pair; empty otherwise.
    pair: Vec<String>,
    valid: Mutex<Vec<Credential>>,
}

impl FakeBackend {
    fn error(&self, user: &str, what: &str) -> BackendError {
        BackendError::Change {
            backend: "fake".into(),
            user: user.into(),
            cause: what.into(),
        }
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn describe(&self) -> String {
        "fake backend".into()
    }

    fn strategy(&self) -> Strategy {
        self.strategy
    }

    async fn login(&self, credential: &Credential) -> Result<(), BackendError> {
        let call = format!("backend.login({})", label(credential.password.expose()));
        let valid = self.valid.lock().unwrap().contains(credential);
        if self.shared.call(call).is_err() || !valid {
            return Err(BackendError::Login {
                backend: "fake".into(),
                user: credential.user.clone(),
                cause: "refused".into(),
            });
        }
        Ok(())
    }

    async fn check_admin(&self, _current: &Credential) -> Result<(), BackendError> {
        Ok(())
    }

    fn next_user(&self, current: &Credential) -> String {
        self.pair
            .iter()
            .find(|u| **u != current.user)
            .cloned()
            .unwrap_or_else(|| current.user.clone())
    }

    async fn apply(&self, current: &Credential, next: &Credential) -> Result<(), BackendError> {
        let call = format!("backend.apply({})", label(next.password.expose()));
        self.shared
            .call(call)
            .map_err(|()| self.error(&next.user, "apply"))?;
        let mut valid = self.valid.lock().unwrap();
        if self.strategy != Strategy::Dual {
            // One password per login: the new one replaces whatever that login had.
            valid.retain(|c| c.user != next.user);
        }
        valid.push(next.clone());
        let _ = current;
        Ok(())
    }

    async fn undo_apply(
        &self,
        current: &Credential,
        next: &Credential,
    ) -> Result<(), BackendError> {
        let call = format!("backend.undo_apply({})", label(next.password.expose()));
        self.shared
            .call(call)
            .map_err(|()| self.error(&next.user, "undo"))?;
        let mut valid = self.valid.lock().unwrap();
        valid.retain(|c| c != next);
        if !valid.contains(current) {
            valid.push(current.clone());
        }
        Ok(())
    }

    async fn retire(&self, current: &Credential, _next: &Credential) -> Result<(), BackendError> {
        let call = format!("backend.retire({})", label(current.password.expose()));
        self.shared
            .call(call)
            .map_err(|()| self.error(&current.user, "retire"))
    }
}

/// A key holding a whole value, written by compare-and-swap.
struct FakeStore {
    shared: Shared,
    name: &'static str,
    value: Mutex<Option<Secret>>,
}

impl FakeStore {
    fn error(&self) -> StoreError {
        StoreError::Unavailable {
            store: self.name.into(),
            cause: "unavailable".into(),
        }
    }
}

#[async_trait]
impl Store for FakeStore {
    fn describe(&self) -> String {
        self.name.into()
    }

    async fn read(&self) -> Result<Option<Secret>, StoreError> {
        self.shared
            .call(format!("{}.read", self.name))
            .map_err(|()| self.error())?;
        Ok(self.value.lock().unwrap().clone())
    }

    async fn compare_and_swap(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        let written = new.map_or("none", |v| label(v.expose()));
        let call = format!("{}.cas({written})", self.name);
        self.shared.call(call.clone()).map_err(|()| self.error())?;
        let mut value = self.value.lock().unwrap();
        if value.as_ref() != expected {
            return Err(StoreError::Conflict {
                store: self.name.into(),
            });
        }
        *value = new.cloned();
        if self.shared.foreign_at.as_ref() == Some(&call) {
            // Another writer's value lands right after the run's.
            *value = Some(url_of(&credential("app", OTHER)));
        }
        Ok(())
    }

    async fn settle(&self, _value: Option<&Secret>) -> Result<(), StoreError> {
        self.shared
            .call(format!("{}.settle", self.name))
            .map_err(|()| self.error())
    }
}

struct FakeConsumer {
    shared: Shared,
}

#[async_trait]
impl Consumer for FakeConsumer {
    fn describe(&self) -> String {
        "fake consumer".into()
    }

    async fn restart(&self, _timeout: Duration) -> Result<(), ConsumerError> {
        let called = self.shared.call("consumer.restart".into());
        // A rollout takes time: whatever should cut it short gets the chance to.
        tokio::task::yield_now().await;
        tokio::time::sleep(self.shared.restart_takes).await;
        called.map_err(|()| ConsumerError::RolloutFailed {
            consumer: "fake consumer".into(),
            message: "stuck".into(),
        })
    }
}

/// The config of one target with two stores and one consumer. Its backend, stores and consumer
/// are never built from it: the fakes stand in for them. It gives the strategy, formats and
/// password policy.
fn config(strategy: Strategy) -> Config {
    config_with(strategy, "")
}

/// [`config`] with `rotator` added to its `[rotator]` section.
fn config_with(strategy: Strategy, rotator: &str) -> Config {
    let backend = match strategy {
        Strategy::Single => {
            r#"kind = "redis"
address = "127.0.0.1:1"
user = "app"
strategy = "single""#
        }
        Strategy::Dual => {
            r#"kind = "redis"
address = "127.0.0.1:1"
user = "app"
strategy = "dual""#
        }
        Strategy::Alternating => {
            r#"kind = "postgres"
address = "127.0.0.1:1"
database = "app"
users = ["app_a", "app_b"]
strategy = "alternating""#
        }
    };
    let text = format!(
        r#"
[rotator]
journal = "sqlite://unused.db"
journal_key = "literal:{KEY}"
{rotator}

[[target]]
name = "t"
{backend}
admin = {{ user = "admin", password = "literal:admin" }}
consumers = ["proxy"]

  [[target.store]]
  kind = "file"
  path = "unused.env"
  key = "URL"
  format = "url"

  [[target.store]]
  kind = "file"
  path = "unused.env"
  key = "URL_COPY"
  format = "url"

[[consumer]]
name = "proxy"
kind = "command"
command = ["true"]
"#
    );
    Config::parse(&text, std::path::Path::new(".")).expect("test config parses")
}

/// Base64 of 32 zero bytes: a valid journal key.
const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

async fn engine(strategy: Strategy, rotator: &str) -> Engine {
    let deps = Deps::new(config_with(strategy, rotator))
        .await
        .expect("no client needed");
    let journal = Journal::open(&Secret::new("sqlite::memory:"), &Secret::new(KEY))
        .await
        .expect("in-memory journal");
    Engine { deps, journal }
}

/// The credential the stores hold before the run.
fn old_credential(strategy: Strategy) -> Credential {
    let user = if strategy == Strategy::Alternating {
        "app_a"
    } else {
        "app"
    };
    Credential {
        user: user.into(),
        password: Secret::new(OLD),
    }
}

fn url_of(credential: &Credential) -> Secret {
    Secret::new(format!(
        "redis://{}:{}@127.0.0.1:1/0",
        credential.user,
        credential.password.expose()
    ))
}

fn backend(shared: &Shared, strategy: Strategy, valid: Vec<Credential>) -> FakeBackend {
    FakeBackend {
        shared: shared.clone(),
        strategy,
        pair: if strategy == Strategy::Alternating {
            vec!["app_a".into(), "app_b".into()]
        } else {
            Vec::new()
        },
        valid: Mutex::new(valid),
    }
}

fn stores(shared: &Shared, credential: &Credential) -> Vec<Box<dyn Store>> {
    vec![
        Box::new(FakeStore {
            shared: shared.clone(),
            name: "store0",
            value: Mutex::new(Some(url_of(credential))),
        }),
        Box::new(FakeStore {
            shared: shared.clone(),
            name: "store1",
            value: Mutex::new(Some(url_of(credential))),
        }),
    ]
}

/// Runs one rotation from generate on, with `faults` set, and returns the outcome and the log.
async fn rotate_with(strategy: Strategy, faults: &[(&str, usize)]) -> (Outcome, Log) {
    let (report, log) = rotate(strategy, faults, None).await;
    (report.outcome, log)
}

/// [`rotate_with`], with a shutdown signal once the call `cancel_at` has happened; returns the
/// report. Whatever happened, every step the report lists has ended.
async fn rotate(
    strategy: Strategy,
    faults: &[(&str, usize)],
    cancel_at: Option<&str>,
) -> (RunReport, Log) {
    let shared = Shared {
        cancel_at: cancel_at.map(str::to_string),
        ..Shared::default()
    };
    for (call, nth) in faults {
        shared.faults.fail(call, *nth);
    }
    rotate_shared(strategy, shared).await
}

/// [`rotate`] with the fakes sharing `shared`.
async fn rotate_shared(strategy: Strategy, shared: Shared) -> (RunReport, Log) {
    let engine = engine(strategy, shared.rotator).await;
    let old = old_credential(strategy);
    let plan = Plan::new(&engine.deps.config, &[]).expect("plan");
    let mut run = start(&engine, &plan, "test")
        .await
        .expect("run starts")
        .with_cancel(shared.cancel.clone());
    // What preflight leaves behind: the current credential, each store's value, the parts.
    let target = engine.deps.config.target("t").expect("target t");
    let state = &mut run.rec.state.targets[0];
    state.current = Some(SavedCredential::from(&old));
    state.stores = [Some(url_of(&old)), Some(url_of(&old))]
        .into_iter()
        .map(|original| StoreState {
            original,
            ..Default::default()
        })
        .collect();
    run.targets.push(Some(TargetRuntime {
        config: target,
        backend: Box::new(backend(&shared, strategy, vec![old.clone()])),
        stores: stores(&shared, &old),
        syncs: Vec::new(),
    }));
    run.consumers.push(Some(ConsumerHandle::from_consumer(
        "proxy",
        Box::new(FakeConsumer {
            shared: shared.clone(),
        }),
        Duration::from_secs(5),
    )));
    let outcome = run.after_preflight().await;
    let report = run.finish(outcome).await;
    assert_eq!(report.outcome, outcome);
    let open: Vec<String> = report
        .steps
        .iter()
        .filter(|s| s.status == "started")
        .map(|s| format!("{} {}", s.step, s.subject))
        .collect();
    assert!(open.is_empty(), "{strategy:?}: steps left open: {open:?}");
    // Every record reached the journal, the deferred ones (generate, the verifications) too.
    let journaled = engine
        .journal
        .run(&report.run_id)
        .await
        .expect("journal answers")
        .expect("the run is journaled");
    assert_eq!(journaled.outcome.as_deref(), Some(report.outcome.as_str()));
    assert_eq!(
        step_list_of(&journaled.steps),
        step_list(&report),
        "{strategy:?}: the journal's steps"
    );
    (report, shared.log)
}

/// Each step record of `report` as `step subject status`.
fn step_list(report: &RunReport) -> Vec<String> {
    step_list_of(&report.steps)
}

fn step_list_of(steps: &[StepRecord]) -> Vec<String> {
    steps
        .iter()
        .map(|s| format!("{} {} {}", s.step, s.subject, s.status))
        .collect()
}

const ALL: [Strategy; 3] = [Strategy::Single, Strategy::Dual, Strategy::Alternating];

fn strings(calls: &[&str]) -> Vec<String> {
    calls.iter().map(|c| c.to_string()).collect()
}

#[tokio::test]
async fn a_run_without_failure_applies_publishes_restarts_then_retires() {
    for strategy in ALL {
        let (outcome, log) = rotate_with(strategy, &[]).await;
        assert_eq!(outcome, Outcome::Succeeded, "{strategy:?}");
        assert_eq!(
            log.changes(),
            strings(&[
                "backend.apply(new)",
                "store0.cas(new)",
                "store1.cas(new)",
                "consumer.restart",
                "backend.retire(old)",
            ]),
            "{strategy:?}"
        );
    }
}

#[tokio::test]
async fn a_run_journals_each_step_in_order_and_closes_it() {
    let (report, _) = rotate(Strategy::Single, &[], None).await;
    assert_eq!(
        step_list(&report),
        strings(&[
            "generate t ok",
            "apply t ok",
            "verify-backend t ok",
            "publish t/store[0] ok",
            "publish t/store[1] ok",
            "restart proxy ok",
            "verify t ok",
            "confirm t skipped",
            "retire t ok",
        ])
    );
}

#[tokio::test]
async fn a_shutdown_mid_publish_skips_the_next_write_and_rolls_back() {
    for strategy in ALL {
        let (report, log) = rotate(strategy, &[], Some("store0.cas(new)")).await;
        assert_eq!(report.outcome, Outcome::RolledBack, "{strategy:?}");
        // Both writes were journaled together; the second never happened.
        assert_eq!(
            step_list(&report)[3..6],
            strings(&[
                "publish t/store[0] ok",
                "publish t/store[1] skipped",
                "undo-publish t/store[0] ok",
            ]),
            "{strategy:?}"
        );
        assert_eq!(
            log.changes(),
            strings(&[
                "backend.apply(new)",
                "store0.cas(new)",
                "store0.cas(old)",
                "backend.undo_apply(new)",
            ]),
            "{strategy:?}"
        );
    }
}

#[tokio::test]
async fn a_shutdown_during_the_restart_rolls_back_but_does_not_cut_the_undo_short() {
    for strategy in ALL {
        let (report, log) = rotate(strategy, &[], Some("consumer.restart")).await;
        assert_eq!(report.outcome, Outcome::RolledBack, "{strategy:?}");
        // The shutdown cuts the rollout's wait short and the run rolls back; the shutdown,
        // still signalled, does not cut the undo rollout short.
        assert_eq!(
            log.changes(),
            expected_after_restart(strategy, "consumer.restart"),
            "{strategy:?}"
        );
        assert!(
            step_list(&report).contains(&"undo-restart proxy ok".to_string()),
            "{strategy:?}: {:?}",
            step_list(&report)
        );
    }
}

#[tokio::test]
async fn a_store_someone_else_wrote_is_left_alone_by_the_rollback_and_reported() {
    let shared = Shared {
        foreign_at: Some("store1.cas(new)".into()),
        ..Shared::default()
    };
    let (report, log) = rotate_shared(Strategy::Single, shared).await;
    // verify fails on store1; its value nobody here can log in with fails verify-old too.
    assert_eq!(report.outcome, Outcome::RollbackFailed);
    assert_eq!(
        log.changes(),
        strings(&[
            "backend.apply(new)",
            "store0.cas(new)",
            "store1.cas(new)",
            "consumer.restart",
            "store0.cas(old)",
            "backend.undo_apply(new)",
            "consumer.restart",
        ])
    );
    let undo = report
        .steps
        .iter()
        .find(|s| s.step == "undo-publish" && s.subject == "t/store[1]")
        .expect("undo-publish of store[1]");
    assert_eq!(undo.status, "ok");
    assert_eq!(
        undo.error.as_deref(),
        Some("left: holds a value this run did not write")
    );
    for note in [
        "target t: store[1] holds a value this run did not write; left as it is",
        "target t: store1 holds a value this run did not write",
        "target t: store0 holds the old value",
    ] {
        assert!(
            report.state.iter().any(|n| n == note),
            "{note:?} not in {:?}",
            report.state
        );
    }
}

#[tokio::test]
async fn failed_apply_undoes_only_what_may_have_changed() {
    for strategy in ALL {
        let (outcome, log) = rotate_with(strategy, &[("backend.apply(new)", 1)]).await;
        assert_eq!(outcome, Outcome::RolledBack, "{strategy:?}");
        let expected = match strategy {
            // A dual undo only removes the run's own password: always done.
            Strategy::Dual => strings(&["backend.apply(new) failed", "backend.undo_apply(new)"]),
            // The new credential does not log in and the old one does: nothing to undo.
            _ => strings(&["backend.apply(new) failed"]),
        };
        assert_eq!(log.changes(), expected, "{strategy:?}");
        // The decision was made by logging in, new credential first.
        if strategy != Strategy::Dual {
            let logins: Vec<String> = log
                .all()
                .into_iter()
                .filter(|e| e.starts_with("backend.login"))
                .collect();
            assert_eq!(
                logins[..2],
                strings(&["backend.login(new)", "backend.login(old)"]),
                "{strategy:?}"
            );
        }
    }
}

#[tokio::test]
async fn failed_backend_verification_undoes_the_apply_before_any_store_is_written() {
    for strategy in ALL {
        let (outcome, log) = rotate_with(strategy, &[("backend.login(new)", 1)]).await;
        assert_eq!(outcome, Outcome::RolledBack, "{strategy:?}");
        assert_eq!(
            log.changes(),
            strings(&["backend.apply(new)", "backend.undo_apply(new)"]),
            "{strategy:?}"
        );
    }
}

#[tokio::test]
async fn failed_publish_restores_the_written_store_settles_the_other_then_undoes_apply() {
    for strategy in ALL {
        let (outcome, log) = rotate_with(strategy, &[("store1.cas(new)", 1)]).await;
        assert_eq!(outcome, Outcome::RolledBack, "{strategy:?}");
        assert_eq!(
            log.changes(),
            strings(&[
                "backend.apply(new)",
                "store0.cas(new)",
                "store1.cas(new) failed",
                // store0 holds what the run wrote: written back; store1 kept its value.
                "store0.cas(old)",
                "store1.settle",
                "backend.undo_apply(new)",
            ]),
            "{strategy:?}"
        );
    }
}

/// The order that matters: one password (`single`) is put back before the consumers roll out
/// again; with two (`dual`, `alternating`) the consumers roll out first, while both still log
/// in, and only then is the new one removed.
fn expected_after_restart(strategy: Strategy, restart: &str) -> Vec<String> {
    let mut calls = strings(&[
        "backend.apply(new)",
        "store0.cas(new)",
        "store1.cas(new)",
        restart,
        "store0.cas(old)",
        "store1.cas(old)",
    ]);
    calls.extend(match strategy {
        Strategy::Single => strings(&["backend.undo_apply(new)", "consumer.restart"]),
        _ => strings(&["consumer.restart", "backend.undo_apply(new)"]),
    });
    calls
}

#[tokio::test]
async fn failed_restart_restores_stores_then_orders_backend_and_consumers_by_strategy() {
    for strategy in ALL {
        let (outcome, log) = rotate_with(strategy, &[("consumer.restart", 1)]).await;
        assert_eq!(outcome, Outcome::RolledBack, "{strategy:?}");
        assert_eq!(
            log.changes(),
            expected_after_restart(strategy, "consumer.restart failed"),
            "{strategy:?}"
        );
    }
}

#[tokio::test]
async fn failed_verify_after_restart_rolls_back_in_the_same_order() {
    for strategy in ALL {
        // The first login with the new credential is verify-backend's; the second, verify's.
        let (outcome, log) = rotate_with(strategy, &[("backend.login(new)", 2)]).await;
        assert_eq!(outcome, Outcome::RolledBack, "{strategy:?}");
        assert_eq!(
            log.changes(),
            expected_after_restart(strategy, "consumer.restart"),
            "{strategy:?}"
        );
    }
}

/// The logins with the new credential a run made (verify-backend's, then verify's if any).
fn logins_with_new(log: &Log) -> usize {
    log.all()
        .iter()
        .filter(|e| e.starts_with("backend.login(new)"))
        .count()
}

#[tokio::test]
async fn verify_logs_in_again_unless_allowed_to_take_a_fresh_backend_login_as_proof() {
    // (extra [rotator] lines, how long the restart takes, logins with the new credential)
    let cases = [
        ("", Duration::ZERO, 2),
        (r#"verify_relogin_after = "0s""#, Duration::ZERO, 2),
        (r#"verify_relogin_after = "1s""#, Duration::ZERO, 1),
        (
            r#"verify_relogin_after = "20ms""#,
            Duration::from_millis(60),
            2,
        ),
    ];
    for strategy in ALL {
        for (rotator, restart_takes, logins) in cases {
            let shared = Shared {
                rotator,
                restart_takes,
                ..Shared::default()
            };
            let (report, log) = rotate_shared(strategy, shared).await;
            assert_eq!(report.outcome, Outcome::Succeeded, "{strategy:?} {rotator}");
            assert_eq!(logins_with_new(&log), logins, "{strategy:?} {rotator}");
            // Without a login, verify still reads every store back.
            let reads = log.all();
            let after_restart = reads
                .iter()
                .position(|e| e == "consumer.restart")
                .expect("a restart");
            for store in ["store0.read", "store1.read"] {
                assert!(
                    reads[after_restart..].iter().any(|e| e == store),
                    "{strategy:?} {rotator}: {store} not read after the restart: {reads:?}"
                );
            }
        }
        // A store holding anything but what verify-backend proved still fails verify.
        let shared = Shared {
            rotator: r#"verify_relogin_after = "1s""#,
            foreign_at: Some("store1.cas(new)".into()),
            ..Shared::default()
        };
        let (report, _) = rotate_shared(strategy, shared).await;
        assert_ne!(report.outcome, Outcome::Succeeded, "{strategy:?}");
        assert!(
            step_list(&report).contains(&"verify t failed".to_string()),
            "{strategy:?}: {:?}",
            step_list(&report)
        );
    }
}

#[tokio::test]
async fn a_failed_undo_is_reported_as_rollback_failed() {
    for strategy in ALL {
        let (outcome, log) = rotate_with(
            strategy,
            &[("consumer.restart", 1), ("backend.undo_apply(new)", 1)],
        )
        .await;
        assert_eq!(outcome, Outcome::RollbackFailed, "{strategy:?}");
        // The other undo steps still ran.
        assert!(log.changes().contains(&"store0.cas(old)".to_string()));
        assert!(log.changes().contains(&"store1.cas(old)".to_string()));
    }
}

/// With two passwords a store that cannot be put back keeps a credential that logs in: the new
/// password stays until recovery has restored every store. With one, the old password comes
/// back (the consumers roll out on the restored stores) and the store left over is reported.
#[tokio::test]
async fn a_store_that_cannot_be_restored_keeps_the_new_password_where_two_can_coexist() {
    for strategy in ALL {
        let shared = Shared::default();
        shared.faults.fail("consumer.restart", 1);
        shared.faults.fail("store1.cas(old)", 1);
        let (report, log) = rotate_shared(strategy, shared).await;
        assert_eq!(report.outcome, Outcome::RollbackFailed, "{strategy:?}");
        let undone = log
            .changes()
            .contains(&"backend.undo_apply(new)".to_string());
        let undo_apply = report
            .steps
            .iter()
            .find(|s| s.step == "undo-apply")
            .expect("an undo-apply record");
        if strategy == Strategy::Single {
            assert!(undone, "single: the old password is back");
            assert_eq!(undo_apply.status, "ok");
        } else {
            assert!(
                !undone,
                "{strategy:?}: the new password stays: {:?}",
                log.changes()
            );
            assert_eq!(undo_apply.status, "skipped", "{strategy:?}");
        }
        // What the failed rollback leaves, as the report describes it.
        let new_logs_in = if strategy == Strategy::Single {
            "the new one does not log in"
        } else {
            "the new one logs in"
        };
        assert!(
            report.state.iter().any(|n| n.contains(new_logs_in)),
            "{strategy:?}: {:?}",
            report.state
        );
    }
}

/// `undo_needed` on a target whose backend accepts `valid` and whose first store holds `held`.
async fn decide(strategy: Strategy, valid: &[&Credential], held: &Credential) -> UndoNeeded {
    let config = config(strategy);
    let shared = Shared::default();
    let runtime = TargetRuntime {
        config: config.target("t").expect("target t"),
        backend: Box::new(backend(
            &shared,
            strategy,
            valid.iter().map(|c| (*c).clone()).collect(),
        )),
        stores: stores(&shared, held),
        syncs: Vec::new(),
    };
    let old = old_credential(strategy);
    let new = Credential {
        user: runtime.backend.next_user(&old),
        password: Secret::new("newpassword"),
    };
    undo_needed(&runtime, &old, &new).await
}

fn credential(user: &str, password: &str) -> Credential {
    Credential {
        user: user.into(),
        password: Secret::new(password),
    }
}

#[tokio::test]
async fn undo_is_needed_when_the_new_credential_logs_in() {
    for strategy in [Strategy::Single, Strategy::Alternating] {
        let old = old_credential(strategy);
        let user = if strategy == Strategy::Alternating {
            "app_b"
        } else {
            "app"
        };
        let new = credential(user, "newpassword");
        assert!(
            matches!(decide(strategy, &[&new], &old).await, UndoNeeded::Yes),
            "{strategy:?}"
        );
    }
}

#[tokio::test]
async fn nothing_to_undo_when_only_the_old_credential_logs_in() {
    for strategy in [Strategy::Single, Strategy::Alternating] {
        let old = old_credential(strategy);
        assert!(
            matches!(
                decide(strategy, &[&old], &old).await,
                UndoNeeded::NotApplied
            ),
            "{strategy:?}"
        );
    }
}

#[tokio::test]
async fn a_credential_a_store_holds_that_logs_in_is_left_alone() {
    for strategy in [Strategy::Single, Strategy::Alternating] {
        // Someone rotated since: neither of the run's credentials logs in, the stored one does.
        let theirs = credential(&old_credential(strategy).user, OTHER);
        assert!(
            matches!(
                decide(strategy, &[&theirs], &theirs).await,
                UndoNeeded::Superseded
            ),
            "{strategy:?}"
        );
    }
}

#[tokio::test]
async fn when_nothing_logs_in_the_undo_is_attempted() {
    // An unreachable backend, say: the undo then fails or restores the old credential.
    let old = old_credential(Strategy::Single);
    assert!(matches!(
        decide(Strategy::Single, &[], &old).await,
        UndoNeeded::Yes
    ));
}

#[tokio::test]
async fn a_dual_undo_removes_the_new_password_whatever_logs_in() {
    let old = old_credential(Strategy::Dual);
    for valid in [vec![], vec![&old]] {
        assert!(matches!(
            decide(Strategy::Dual, &valid, &old).await,
            UndoNeeded::Yes
        ));
    }
}

/// ClickHouse's dual undo sets the old password alone (no statement removes just one), which
/// would cut off a credential someone put in the stores since: that one is left alone.
#[tokio::test]
async fn a_dual_undo_leaves_a_credential_someone_stored_since_that_logs_in() {
    let theirs = credential(&old_credential(Strategy::Dual).user, OTHER);
    assert!(matches!(
        decide(Strategy::Dual, &[&theirs], &theirs).await,
        UndoNeeded::Superseded
    ));
}

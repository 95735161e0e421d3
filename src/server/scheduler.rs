//! Fires scheduled rotations and the periodic drift check.
//!
//! A fire missed by more than the target's `window` (daemon down, target busy) is skipped
//! and counted, never run late. Targets due together that share a consumer rotate in one run,
//! so the consumer restarts once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::Daemon;
use crate::config::Target;
use crate::engine::plan::Plan;
use crate::engine::EngineError;
use crate::journal::JournalError;

/// Upper bound on one sleep, so a clock jump is noticed within a minute.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// One pending fire: when it was scheduled, and when it runs (with jitter).
#[derive(Debug, Clone, Copy)]
struct Fire {
    scheduled: DateTime<Utc>,
    at: DateTime<Utc>,
}

fn jittered(target: &Target, scheduled: DateTime<Utc>) -> Fire {
    let jitter_ms = target.jitter.as_millis() as i64;
    let delay = if jitter_ms > 0 {
        rand::rng().random_range(0..=jitter_ms)
    } else {
        0
    };
    Fire {
        scheduled,
        at: scheduled + chrono::Duration::milliseconds(delay),
    }
}

/// How long fire claims are kept: longer than any window, so a late replica still finds them.
const KEEP_CLAIMS: Duration = Duration::from_secs(7 * 24 * 3600);

/// Takes one fire for this replica. Every replica schedules every target; the journal's
/// unique (target, fire time) key lets exactly one of them run each fire, so the others stay
/// silent instead of counting a `busy` skip, and a replica that dies costs no fire after it.
async fn claim(daemon: &Daemon, target: &str, fire: Fire) -> bool {
    let claimed = daemon
        .engine
        .journal
        .claim_fire(
            target,
            fire.scheduled.timestamp_millis(),
            &daemon.replica,
            KEEP_CLAIMS.as_millis() as i64,
        )
        .await;
    match claimed {
        Ok(mine) => {
            daemon.metrics.set_leader(true);
            if !mine {
                tracing::debug!(target, "another replica runs this fire");
            }
            mine
        }
        Err(error) => {
            tracing::error!(target, cause = %error, "cannot claim a scheduled fire: the journal failed; skipped");
            daemon.metrics.set_leader(false);
            daemon.metrics.skipped(target, "journal_unavailable");
            false
        }
    }
}

pub async fn run(daemon: Arc<Daemon>, stop: CancellationToken) {
    daemon.metrics.set_leader(true);
    let checker = tokio::spawn(drift_checks(daemon.clone(), stop.clone()));
    let recoverer = tokio::spawn(recoveries(daemon.clone(), stop.clone()));
    let mut fires = first_fires(&daemon).await;
    loop {
        publish_next(&daemon, &fires);
        let now = Utc::now();
        let Some(earliest) = fires.values().map(|f| f.at).min() else {
            stop.cancelled().await;
            break;
        };
        let wait = (earliest - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let now = Utc::now();
        let due: Vec<(String, Fire)> = fires
            .iter()
            .filter(|(_, f)| f.at <= now)
            .map(|(t, f)| (t.clone(), *f))
            .collect();
        let mut runnable = Vec::new();
        let mut claimed = Vec::new();
        for (name, fire) in due {
            let Some(target) = daemon.engine.deps.config.target(&name) else {
                continue;
            };
            let schedule = target
                .schedule
                .as_ref()
                .expect("only scheduled targets have fires");
            if let Some(next) = schedule.next_after(fire.scheduled.max(now)) {
                fires.insert(name.clone(), jittered(target, next));
            }
            if !claim(&daemon, &name, fire).await {
                continue;
            }
            claimed.push((name.clone(), fire.scheduled.timestamp_millis()));
            crate::failpoint::boundary("claimed", &name, "ok").await;
            let late = (now - fire.at).to_std().unwrap_or_default();
            if late > target.window {
                tracing::warn!(target = %name, late_seconds = late.as_secs(), "scheduled rotation missed its window; skipped");
                daemon.metrics.skipped(&name, "missed_window");
            } else {
                runnable.push(name);
            }
        }
        for group in group_by_consumer(&daemon.engine.deps.config, &runnable) {
            launch(&daemon, group).await;
        }
        settle(&daemon, &claimed).await;
    }
    daemon.metrics.set_leader(false);
    let _ = checker.await;
    let _ = recoverer.await;
}

/// Retries runs that need recovery: an unfinished run (the journal failed under it) or a failed
/// rollback blocks its targets until it ends, so it must not wait for the next restart.
async fn recoveries(daemon: Arc<Daemon>, stop: CancellationToken) {
    let interval = daemon.engine.deps.config.rotator.recover_interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        daemon.recover().await;
        take_over_orphaned_fires(&daemon).await;
    }
}

/// Records that this replica decided its claimed fires: no other replica takes them over.
async fn settle(daemon: &Daemon, claimed: &[(String, i64)]) {
    for (target, scheduled_at) in claimed {
        let settled = daemon
            .engine
            .journal
            .settle_fire(target, *scheduled_at, &daemon.replica)
            .await;
        if let Err(error) = settled {
            tracing::warn!(target, cause = %error, "cannot mark a scheduled fire as decided");
        }
    }
}

/// Runs, if still within their window, the fires a replica claimed and then died before
/// starting: claims left undecided past `takeover_grace` with no run on their target since.
async fn take_over_orphaned_fires(daemon: &Arc<Daemon>) {
    let config = &daemon.engine.deps.config;
    let journal = &daemon.engine.journal;
    let now = Utc::now();
    let grace = chrono::Duration::from_std(config.rotator.takeover_grace).unwrap_or_default();
    let longest_window = config.targets.iter().map(|t| t.window).max();
    let oldest =
        now - chrono::Duration::from_std(longest_window.unwrap_or_default()).unwrap_or_default();
    let orphans = match journal
        .orphaned_fires((now - grace).timestamp_millis(), oldest.timestamp_millis())
        .await
    {
        Ok(orphans) => orphans,
        Err(error) => {
            tracing::error!(cause = %error, "cannot look for scheduled fires left by a stopped replica");
            return;
        }
    };
    let mut runnable = Vec::new();
    let mut taken = Vec::new();
    for (name, scheduled_at, claimed_at) in orphans {
        let Some(target) = config.target(&name) else {
            continue;
        };
        match journal
            .take_over_fire(&name, scheduled_at, claimed_at, &daemon.replica)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => {
                tracing::error!(target = %name, cause = %error, "cannot take over a scheduled fire");
                continue;
            }
        }
        tracing::warn!(target = %name, "a scheduled fire claimed by a replica that stopped before starting it is taken over");
        taken.push((name.clone(), scheduled_at));
        let scheduled = DateTime::from_timestamp_millis(scheduled_at).unwrap_or(now);
        if (now - scheduled).to_std().unwrap_or_default() > target.window {
            tracing::warn!(target = %name, "scheduled rotation missed its window; skipped");
            daemon.metrics.skipped(&name, "missed_window");
        } else if !runnable.contains(&name) {
            runnable.push(name);
        }
    }
    for group in group_by_consumer(config, &runnable) {
        launch(daemon, group).await;
    }
    settle(daemon, &taken).await;
}

/// The next fire of every scheduled target. A fire missed while the daemon was down runs now
/// if it is still within the window, and is counted as skipped otherwise.
async fn first_fires(daemon: &Daemon) -> BTreeMap<String, Fire> {
    let now = Utc::now();
    let mut fires = BTreeMap::new();
    for target in &daemon.engine.deps.config.targets {
        let Some(schedule) = &target.schedule else {
            continue;
        };
        let last_attempt = match daemon.engine.journal.target_history(&target.name).await {
            Ok(history) => history
                .last_attempt
                .and_then(DateTime::from_timestamp_millis),
            Err(error) => {
                tracing::error!(target = %target.name, cause = %error, "cannot read the target's history");
                None
            }
        };
        let missed = last_attempt.and_then(|last| schedule.latest_between(last, now));
        match missed {
            Some(missed) if (now - missed).to_std().unwrap_or_default() <= target.window => {
                fires.insert(
                    target.name.clone(),
                    Fire {
                        scheduled: missed,
                        at: now,
                    },
                );
                continue;
            }
            Some(_) => {
                tracing::warn!(target = %target.name, "a scheduled rotation was missed while the daemon was down; skipped");
                daemon.metrics.skipped(&target.name, "missed_window");
            }
            None => {}
        }
        if let Some(next) = schedule.next_after(now) {
            fires.insert(target.name.clone(), jittered(target, next));
        }
    }
    fires
}

fn publish_next(daemon: &Daemon, fires: &BTreeMap<String, Fire>) {
    let mut next = daemon.next_fires.lock().expect("next fires lock");
    for (target, fire) in fires {
        daemon.metrics.set_next(target, fire.at);
        next.insert(target.clone(), fire.at);
    }
}

/// Splits due targets into groups that share no consumer (each group is one run).
fn group_by_consumer(config: &crate::config::Config, due: &[String]) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for name in due {
        let consumers = &config.target(name).expect("due targets exist").consumers;
        let shares = |group: &Vec<String>| {
            group.iter().any(|other| {
                let theirs = &config.target(other).expect("due targets exist").consumers;
                consumers.iter().any(|c| theirs.contains(c))
            })
        };
        let mut merged: Vec<String> = vec![name.clone()];
        groups.retain(|group| {
            if shares(group) {
                merged.extend(group.iter().cloned());
                false
            } else {
                true
            }
        });
        groups.push(merged);
    }
    groups
}

async fn launch(daemon: &Arc<Daemon>, targets: Vec<String>) {
    let plan = match Plan::new(&daemon.engine.deps.config, &targets) {
        Ok(plan) => plan,
        Err(error) => {
            tracing::error!(cause = %error, "cannot plan a scheduled rotation");
            return;
        }
    };
    match daemon.launch(plan, "schedule").await {
        Ok(id) => tracing::info!(run = %id, targets = ?targets, "scheduled rotation started"),
        Err(EngineError::Journal(JournalError::Busy(busy))) => {
            tracing::warn!(target = %busy, "scheduled rotation skipped: the target is rotating already");
            for target in &targets {
                daemon.metrics.skipped(target, "busy");
            }
        }
        Err(EngineError::Journal(JournalError::Unfinished { run, target })) => {
            tracing::warn!(target = %target, run = %run, "scheduled rotation skipped: an earlier run on the target still needs recovery");
            for target in &targets {
                daemon.metrics.skipped(target, "unfinished_run");
            }
        }
        Err(error) => tracing::error!(cause = %error, "scheduled rotation could not start"),
    }
}

async fn drift_checks(daemon: Arc<Daemon>, stop: CancellationToken) {
    let Some(interval) = daemon.engine.deps.config.rotator.check_interval else {
        return;
    };
    let all: Vec<String> = daemon
        .engine
        .deps
        .config
        .targets
        .iter()
        .map(|t| t.name.clone())
        .collect();
    loop {
        daemon.check(&all).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_sharing_a_consumer_run_together() {
        let mut text =
            String::from("[rotator]\njournal = \"sqlite::memory:\"\njournal_key = \"literal:k\"\n");
        for c in ["proxy", "worker", "batch"] {
            text.push_str(&format!(
                "[[consumer]]\nname = \"{c}\"\nkind = \"command\"\ncommand = [\"true\"]\n"
            ));
        }
        for (name, consumers) in [
            ("a", "\"proxy\""),
            ("b", "\"worker\""),
            ("c", "\"proxy\", \"worker\""),
            ("d", "\"batch\""),
        ] {
            text.push_str(&format!(
                "[[target]]\nname = \"{name}\"\nkind = \"postgres\"\naddress = \"h:5432\"\ndatabase = \"d\"\nuser = \"u{name}\"\n\
                 admin = {{ user = \"p\", password = \"literal:x\" }}\nconsumers = [{consumers}]\n\
                 [[target.store]]\nkind = \"file\"\npath = \".env\"\nkey = \"K{name}\"\n"
            ));
        }
        let config = crate::config::Config::parse(&text, std::path::Path::new("/")).unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut groups = group_by_consumer(&config, &names(&["a", "b", "d"]));
        groups.sort();
        assert_eq!(groups, [names(&["a"]), names(&["b"]), names(&["d"])]);
        let mut groups = group_by_consumer(&config, &names(&["a", "b", "c", "d"]));
        for g in &mut groups {
            g.sort();
        }
        groups.sort();
        assert_eq!(groups, [names(&["a", "b", "c"]), names(&["d"])]);
    }
}

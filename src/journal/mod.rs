//! The journal: runs, their steps, the encrypted recoverable state, and per-target locks.
//!
//! `sqlite://` is the embedded default; `postgres://` lets several replicas share one.

pub mod cipher;
pub mod lock;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};
use zeroize::Zeroizing;

use crate::secret::Secret;
use cipher::Cipher;
use lock::Locker;
pub use lock::TargetLock;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the journal cannot be opened: {0}")]
    Open(String),
    #[error("the journal failed: {0}")]
    Query(#[source] sqlx::Error),
    #[error("journal migrations failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("the journal cannot be opened: {0}")]
    Key(#[source] cipher::CipherError),
    #[error("run {run}: {source}")]
    State {
        run: String,
        #[source]
        source: StateError,
    },
    #[error(
        "target {0} is being rotated by another run right now; try again when it has finished"
    )]
    Busy(String),
    #[error("cannot take the target lock: {0}")]
    Lock(String),
    #[error(
        "run {0} is now driven by another process (this one lost its target lock); it stops here"
    )]
    Fenced(String),
    #[error("the target lock was lost (its journal session ended); the run stops here and is left to recovery")]
    LockLost,
    #[error("target {target} has an unfinished run {run} that recovery has not finished yet (`llmtrace-rotator recover` retries it); no new run starts on it until then")]
    Unfinished { run: String, target: String },
}

/// Why a run's stored state cannot be read back. Never quotes the state: it holds secrets.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Sealed(#[from] cipher::CipherError),
    /// The serde category only: its message could quote the input.
    #[error("the stored run state is not readable: {0}")]
    Unreadable(&'static str),
    #[error("the stored run state has no part for target {0:?}")]
    MissingPart(String),
}

impl JournalError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            JournalError::Open(_)
            | JournalError::Key(_)
            | JournalError::Query(_)
            | JournalError::Migrate(_) => "journal",
            JournalError::State { .. } => "journal_state",
            JournalError::Busy(_) => "busy",
            JournalError::Lock(_) => "lock",
            JournalError::Fenced(_) | JournalError::LockLost => "lock_lost",
            JournalError::Unfinished { .. } => "unfinished_run",
        }
    }
}

/// One step as history shows it: no secrets, ever.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StepRecord {
    pub seq: i64,
    pub step: String,
    pub subject: String,
    pub status: String,
    pub started_at: i64,
    pub duration_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub trigger: String,
    pub targets: Vec<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// `None` while the run has not finished (running, or interrupted and awaiting recovery).
    pub outcome: Option<String>,
    pub steps: Vec<StepRecord>,
}

/// What the journal knows of one target, for metrics and `GET /v1/targets` (also after a restart).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetHistory {
    /// Unix milliseconds when the newest run on the target started.
    pub last_attempt: Option<i64>,
    /// That run's outcome; `None` while it is running or interrupted.
    pub last_outcome: Option<String>,
    /// Unix milliseconds when the newest successful run finished.
    pub last_success: Option<i64>,
}

/// An interrupted run: its decrypted state (the run's own part, and one per target), for
/// recovery.
pub struct Unfinished {
    pub id: String,
    pub targets: Vec<String>,
    pub state: Zeroizing<Vec<u8>>,
    pub parts: Vec<(String, Zeroizing<Vec<u8>>)>,
}

/// A part's sealing binds it to its run and slot: a part copied to another row does not open.
fn part_aad(run: &str, part: &str) -> String {
    format!("{run}/{part}")
}

pub struct Journal {
    pool: AnyPool,
    /// File SQLite only: connections whose commits do not wait for the disk
    /// (`synchronous = NORMAL`), for records no side effect depends on. WAL keeps commits in
    /// order, so the next durable commit (a `pool` connection, `synchronous = FULL`) flushes
    /// them too, and a crash of the process loses none of them.
    relaxed: Option<AnyPool>,
    cipher: Cipher,
    locker: Locker,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Journal {
    /// Opens (creating a SQLite file if needed) and migrates the journal.
    pub async fn open(url: &Secret, key: &Secret) -> Result<Journal, JournalError> {
        let cipher = Cipher::from_base64(key).map_err(JournalError::Key)?;
        sqlx::any::install_default_drivers();
        let url_text = url.expose();
        let is_sqlite = url_text.starts_with("sqlite:");
        let (connect_url, locker) = if is_sqlite {
            sqlite_setup(url_text)?
        } else if url_text.starts_with("postgres:") || url_text.starts_with("postgresql:") {
            (url.clone(), Locker::Postgres(url.clone()))
        } else {
            return Err(JournalError::Open(
                "the journal URL must start with sqlite: or postgres:".into(),
            ));
        };
        // An in-memory SQLite database exists once per connection: keep it to one.
        let in_memory = matches!(locker, Locker::Memory(_));
        let connections = if is_sqlite && in_memory { 1 } else { 4 };
        let pool = connect_pool(&connect_url, connections, is_sqlite, false, Connect::Now).await?;
        if is_sqlite {
            // WAL (kept in the file): one fsync per commit instead of a rollback journal's
            // several, and readers (the API, history) do not wait for a run's checkpoints.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(JournalError::Query)?;
        }
        let relaxed = if is_sqlite && !in_memory {
            Some(connect_pool(&connect_url, 1, true, true, Connect::Lazily).await?)
        } else {
            None
        };
        let migrator = if is_sqlite {
            sqlx::migrate!("migrations/sqlite")
        } else {
            sqlx::migrate!("migrations/postgres")
        };
        migrator.run(&pool).await.map_err(JournalError::Migrate)?;
        Ok(Journal {
            pool,
            relaxed,
            cipher,
            locker,
        })
    }

    /// Where a write goes: a durable one to `pool`, any other to `relaxed` if there is one.
    fn pool_for(&self, durable: bool) -> &AnyPool {
        match (&self.relaxed, durable) {
            (Some(relaxed), false) => relaxed,
            _ => &self.pool,
        }
    }

    /// Answers whether the journal is reachable.
    pub async fn ping(&self) -> Result<(), JournalError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(JournalError::Query)?;
        Ok(())
    }

    pub async fn lock(&self, targets: &[String]) -> Result<TargetLock, JournalError> {
        self.locker.lock(targets).await
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.locker, Locker::Postgres(_))
    }

    pub async fn begin_run(
        &self,
        id: &str,
        owner: &str,
        trigger: &str,
        targets: &[String],
        state: &[u8],
        parts: &[(String, Zeroizing<Vec<u8>>)],
    ) -> Result<(), JournalError> {
        let sealed = self.cipher.seal(state, id);
        // Not durable: only preflight (no side effect) follows before the first write-ahead
        // record, whose durable commit flushes this one too.
        let mut tx = self
            .pool_for(false)
            .begin()
            .await
            .map_err(JournalError::Query)?;
        sqlx::query("INSERT INTO rotator_runs (id, trigger_kind, started_at, state, owner, needs_recovery) VALUES ($1, $2, $3, $4, $5, 1)")
            .bind(id)
            .bind(trigger)
            .bind(now_ms())
            .bind(sealed)
            .bind(owner)
            .execute(&mut *tx)
            .await
            .map_err(JournalError::Query)?;
        for target in targets {
            sqlx::query("INSERT INTO rotator_run_targets (run_id, target) VALUES ($1, $2)")
                .bind(id)
                .bind(target)
                .execute(&mut *tx)
                .await
                .map_err(JournalError::Query)?;
        }
        self.write_parts(&mut tx, id, parts).await?;
        tx.commit().await.map_err(JournalError::Query)
    }

    /// Seals and writes target parts (each bound to its run and slot), replacing older ones.
    async fn write_parts(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
        parts: &[(String, Zeroizing<Vec<u8>>)],
    ) -> Result<(), JournalError> {
        for (part, bytes) in parts {
            sqlx::query(
                "INSERT INTO rotator_run_parts (run_id, part, state) VALUES ($1, $2, $3) \
                 ON CONFLICT (run_id, part) DO UPDATE SET state = excluded.state",
            )
            .bind(id)
            .bind(part)
            .bind(self.cipher.seal(bytes, &part_aad(id, part)))
            .execute(&mut **tx)
            .await
            .map_err(JournalError::Query)?;
        }
        Ok(())
    }

    /// Saves what changed of the run state (the run's own part if given, and the given target
    /// parts) and one step record together, so recovery sees all or none of it.
    /// Fails with `Fenced` when `owner` no longer drives the run.
    pub async fn checkpoint(
        &self,
        id: &str,
        owner: &str,
        header: Option<&[u8]>,
        parts: &[(String, Zeroizing<Vec<u8>>)],
        steps: &[&StepRecord],
        durable: bool,
    ) -> Result<(), JournalError> {
        // Only a write-ahead record (a side effect may follow) must reach the disk before the
        // call returns; see `relaxed`.
        let mut conn = self
            .pool_for(durable)
            .acquire()
            .await
            .map_err(JournalError::Query)?;
        self.checkpoint_on(&mut conn, id, owner, header, parts, steps, durable)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn checkpoint_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        id: &str,
        owner: &str,
        header: Option<&[u8]>,
        parts: &[(String, Zeroizing<Vec<u8>>)],
        steps: &[&StepRecord],
        durable: bool,
    ) -> Result<(), JournalError> {
        use sqlx::Connection as _;
        let mut tx = conn.begin().await.map_err(JournalError::Query)?;
        if !durable && self.is_postgres() {
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await
                .map_err(JournalError::Query)?;
        }
        // The owner check comes first in every checkpoint, whatever else it writes.
        let updated = match header {
            Some(state) => {
                sqlx::query("UPDATE rotator_runs SET state = $1 WHERE id = $2 AND owner = $3")
                    .bind(self.cipher.seal(state, id))
                    .bind(id)
                    .bind(owner)
                    .execute(&mut *tx)
                    .await
            }
            None => {
                sqlx::query("UPDATE rotator_runs SET owner = owner WHERE id = $1 AND owner = $2")
                    .bind(id)
                    .bind(owner)
                    .execute(&mut *tx)
                    .await
            }
        }
        .map_err(JournalError::Query)?;
        if updated.rows_affected() == 0 {
            return Err(JournalError::Fenced(id.to_string()));
        }
        self.write_parts(&mut tx, id, parts).await?;
        for step in steps {
            sqlx::query(
                "INSERT INTO rotator_steps (run_id, seq, step, subject, status, started_at, duration_ms, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status, \
                 duration_ms = excluded.duration_ms, error = excluded.error",
            )
            .bind(id)
            .bind(step.seq)
            .bind(&step.step)
            .bind(&step.subject)
            .bind(&step.status)
            .bind(step.started_at)
            .bind(step.duration_ms)
            .bind(&step.error)
            .execute(&mut *tx)
            .await
            .map_err(JournalError::Query)?;
        }
        tx.commit().await.map_err(JournalError::Query)
    }

    /// Records the outcome. A run that ended for good has its state replaced by an empty one,
    /// since nothing needs the passwords any more; a failed rollback keeps it (the new password
    /// may be the only working copy) and stays due for recovery.
    pub async fn finish_run(
        &self,
        id: &str,
        owner: &str,
        outcome: &str,
        settled: bool,
    ) -> Result<(), JournalError> {
        let updated = if settled {
            let mut tx = self.pool.begin().await.map_err(JournalError::Query)?;
            let updated = sqlx::query(
                "UPDATE rotator_runs SET outcome = $1, finished_at = $2, state = $3, needs_recovery = 0 \
                 WHERE id = $4 AND owner = $5",
            )
            .bind(outcome)
            .bind(now_ms())
            .bind(self.cipher.seal(b"{}", id))
            .bind(id)
            .bind(owner)
            .execute(&mut *tx)
            .await
            .map_err(JournalError::Query)?;
            if updated.rows_affected() == 0 {
                // Not ours any more: leave the new owner's state alone (the tx rolls back).
                return Err(JournalError::Fenced(id.to_string()));
            }
            sqlx::query("DELETE FROM rotator_run_parts WHERE run_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(JournalError::Query)?;
            tx.commit().await.map_err(JournalError::Query)?;
            Ok(updated)
        } else {
            sqlx::query(
                "UPDATE rotator_runs SET outcome = $1, finished_at = $2, needs_recovery = 1 \
                 WHERE id = $3 AND owner = $4",
            )
            .bind(outcome)
            .bind(now_ms())
            .bind(id)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(JournalError::Query)
        }?;
        if updated.rows_affected() == 0 {
            return Err(JournalError::Fenced(id.to_string()));
        }
        Ok(())
    }

    /// Claims one scheduled fire of `target` for `replica`; `false` when another replica has.
    /// Claims older than `keep_ms` are pruned on the way.
    pub async fn claim_fire(
        &self,
        target: &str,
        scheduled_at_ms: i64,
        replica: &str,
        keep_ms: i64,
    ) -> Result<bool, JournalError> {
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO rotator_fires (target, scheduled_at, replica, claimed_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (target, scheduled_at) DO NOTHING",
        )
        .bind(target)
        .bind(scheduled_at_ms)
        .bind(replica)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(JournalError::Query)?;
        sqlx::query("DELETE FROM rotator_fires WHERE target = $1 AND claimed_at < $2")
            .bind(target)
            .bind(now - keep_ms)
            .execute(&self.pool)
            .await
            .map_err(JournalError::Query)?;
        Ok(inserted.rows_affected() == 1)
    }

    /// Records that `replica` decided its claimed fire (started a run, or skipped it).
    pub async fn settle_fire(
        &self,
        target: &str,
        scheduled_at_ms: i64,
        replica: &str,
    ) -> Result<(), JournalError> {
        sqlx::query(
            "UPDATE rotator_fires SET settled = 1 \
             WHERE target = $1 AND scheduled_at = $2 AND replica = $3",
        )
        .bind(target)
        .bind(scheduled_at_ms)
        .bind(replica)
        .execute(&self.pool)
        .await
        .map_err(JournalError::Query)?;
        Ok(())
    }

    /// Fires claimed before `claimed_before_ms`, never settled, scheduled after
    /// `scheduled_after_ms`, and with no run started on their target since: their replica died
    /// between claiming and starting. `(target, scheduled_at, claimed_at)`, oldest first.
    pub async fn orphaned_fires(
        &self,
        claimed_before_ms: i64,
        scheduled_after_ms: i64,
    ) -> Result<Vec<(String, i64, i64)>, JournalError> {
        let rows = sqlx::query(
            "SELECT f.target, f.scheduled_at, f.claimed_at FROM rotator_fires f \
             WHERE f.settled = 0 AND f.claimed_at < $1 AND f.scheduled_at > $2 \
               AND NOT EXISTS (SELECT 1 FROM rotator_run_targets t \
                               JOIN rotator_runs r ON r.id = t.run_id \
                               WHERE t.target = f.target AND r.started_at >= f.scheduled_at) \
             ORDER BY f.scheduled_at",
        )
        .bind(claimed_before_ms)
        .bind(scheduled_after_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(JournalError::Query)?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(JournalError::Query)
    }

    /// Takes over an orphaned fire for `replica`; `false` when another replica was first (the
    /// claim changed since it was read).
    pub async fn take_over_fire(
        &self,
        target: &str,
        scheduled_at_ms: i64,
        claimed_at_ms: i64,
        replica: &str,
    ) -> Result<bool, JournalError> {
        let taken = sqlx::query(
            "UPDATE rotator_fires SET replica = $1, claimed_at = $2 \
             WHERE target = $3 AND scheduled_at = $4 AND claimed_at = $5 AND settled = 0",
        )
        .bind(replica)
        .bind(now_ms())
        .bind(target)
        .bind(scheduled_at_ms)
        .bind(claimed_at_ms)
        .execute(&self.pool)
        .await
        .map_err(JournalError::Query)?;
        Ok(taken.rows_affected() == 1)
    }

    /// Marks a run as needing no recovery: for one that holds no state to act on.
    pub async fn settle_stateless(&self, id: &str) -> Result<(), JournalError> {
        sqlx::query("UPDATE rotator_runs SET needs_recovery = 0 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(JournalError::Query)?;
        Ok(())
    }

    /// Makes `owner` the run's driver: from now on the previous owner's checkpoints fail.
    /// Called by recovery while it holds the run's target locks.
    pub async fn claim(&self, id: &str, owner: &str) -> Result<(), JournalError> {
        sqlx::query("UPDATE rotator_runs SET owner = $1 WHERE id = $2")
            .bind(owner)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(JournalError::Query)?;
        Ok(())
    }

    /// A run on one of `targets` that still needs recovery, if any: no new run may start then.
    pub async fn needing_recovery(
        &self,
        targets: &[String],
    ) -> Result<Option<(String, String)>, JournalError> {
        for target in targets {
            let row = sqlx::query(
                "SELECT r.id FROM rotator_runs r JOIN rotator_run_targets t ON t.run_id = r.id \
                 WHERE t.target = $1 AND r.needs_recovery = 1 ORDER BY r.started_at LIMIT 1",
            )
            .bind(target)
            .fetch_optional(&self.pool)
            .await
            .map_err(JournalError::Query)?;
            if let Some(row) = row {
                let run: String = row.try_get("id").map_err(JournalError::Query)?;
                return Ok(Some((run, target.clone())));
            }
        }
        Ok(None)
    }

    pub async fn needs_recovery(&self, id: &str) -> Result<bool, JournalError> {
        let row = sqlx::query("SELECT needs_recovery FROM rotator_runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(JournalError::Query)?;
        match row {
            Some(row) => Ok(row
                .try_get::<i32, _>("needs_recovery")
                .map_err(JournalError::Query)?
                == 1),
            None => Ok(false),
        }
    }

    /// Runs whose sealed state is still needed (unfinished, or whose rollback failed), each as
    /// its id and targets, oldest first. Their states are read with [`Journal::unfinished_run`]
    /// once a recovery holds the lock: a run live elsewhere keeps writing until then.
    pub async fn needing_recovery_runs(&self) -> Result<Vec<(String, Vec<String>)>, JournalError> {
        let rows =
            sqlx::query("SELECT id FROM rotator_runs WHERE needs_recovery = 1 ORDER BY started_at")
                .fetch_all(&self.pool)
                .await
                .map_err(JournalError::Query)?;
        let mut runs = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id").map_err(JournalError::Query)?;
            let targets = self.run_targets(&id).await?;
            runs.push((id, targets));
        }
        Ok(runs)
    }

    /// Run `id`'s sealed state as it is now, if the run still needs recovery.
    pub async fn unfinished_run(&self, id: &str) -> Result<Option<Unfinished>, JournalError> {
        let row =
            sqlx::query("SELECT state FROM rotator_runs WHERE id = $1 AND needs_recovery = 1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(JournalError::Query)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let sealed: Vec<u8> = row.try_get("state").map_err(JournalError::Query)?;
        let state = self
            .cipher
            .open(&sealed, id)
            .map_err(|e| JournalError::State {
                run: id.to_string(),
                source: e.into(),
            })?;
        Ok(Some(Unfinished {
            id: id.to_string(),
            targets: self.run_targets(id).await?,
            state,
            parts: self.run_parts(id).await?,
        }))
    }

    async fn run_parts(&self, id: &str) -> Result<Vec<(String, Zeroizing<Vec<u8>>)>, JournalError> {
        let rows = sqlx::query("SELECT part, state FROM rotator_run_parts WHERE run_id = $1")
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(JournalError::Query)?;
        let mut parts = Vec::with_capacity(rows.len());
        for row in rows {
            let part: String = row.try_get("part").map_err(JournalError::Query)?;
            let sealed: Vec<u8> = row.try_get("state").map_err(JournalError::Query)?;
            let state = self
                .cipher
                .open(&sealed, &part_aad(id, &part))
                .map_err(|e| JournalError::State {
                    run: id.to_string(),
                    source: e.into(),
                })?;
            parts.push((part, state));
        }
        Ok(parts)
    }

    async fn run_targets(&self, id: &str) -> Result<Vec<String>, JournalError> {
        let rows =
            sqlx::query("SELECT target FROM rotator_run_targets WHERE run_id = $1 ORDER BY target")
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(JournalError::Query)?;
        rows.iter()
            .map(|r| r.try_get("target").map_err(JournalError::Query))
            .collect()
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunSummary>, JournalError> {
        let row = sqlx::query("SELECT id, trigger_kind, started_at, finished_at, outcome FROM rotator_runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(JournalError::Query)?;
        match row {
            Some(row) => Ok(Some(self.summary(row).await?)),
            None => Ok(None),
        }
    }

    pub async fn target_history(&self, target: &str) -> Result<TargetHistory, JournalError> {
        let last = sqlx::query(
            "SELECT r.started_at, r.outcome FROM rotator_runs r JOIN rotator_run_targets t ON t.run_id = r.id \
             WHERE t.target = $1 ORDER BY r.started_at DESC LIMIT 1",
        )
        .bind(target)
        .fetch_optional(&self.pool)
        .await
        .map_err(JournalError::Query)?;
        let success = sqlx::query(
            "SELECT r.finished_at FROM rotator_runs r JOIN rotator_run_targets t ON t.run_id = r.id \
             WHERE t.target = $1 AND r.outcome = 'succeeded' ORDER BY r.finished_at DESC LIMIT 1",
        )
        .bind(target)
        .fetch_optional(&self.pool)
        .await
        .map_err(JournalError::Query)?;
        let mut history = TargetHistory::default();
        if let Some(row) = last {
            history.last_attempt = Some(row.try_get("started_at").map_err(JournalError::Query)?);
            history.last_outcome = row.try_get("outcome").map_err(JournalError::Query)?;
        }
        if let Some(row) = success {
            history.last_success = row.try_get("finished_at").map_err(JournalError::Query)?;
        }
        Ok(history)
    }

    /// The newest runs first.
    pub async fn history(&self, limit: i64) -> Result<Vec<RunSummary>, JournalError> {
        let rows = sqlx::query(
            "SELECT id, trigger_kind, started_at, finished_at, outcome FROM rotator_runs ORDER BY started_at DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(JournalError::Query)?;
        let mut runs = Vec::new();
        for row in rows {
            runs.push(self.summary(row).await?);
        }
        Ok(runs)
    }

    async fn summary(&self, row: sqlx::any::AnyRow) -> Result<RunSummary, JournalError> {
        let id: String = row.try_get("id").map_err(JournalError::Query)?;
        let steps = sqlx::query(
            "SELECT seq, step, subject, status, started_at, duration_ms, error FROM rotator_steps WHERE run_id = $1 ORDER BY seq",
        )
        .bind(&id)
        .fetch_all(&self.pool)
        .await
        .map_err(JournalError::Query)?
        .iter()
        .map(|s| {
            Ok(StepRecord {
                seq: s.try_get("seq")?,
                step: s.try_get("step")?,
                subject: s.try_get("subject")?,
                status: s.try_get("status")?,
                started_at: s.try_get("started_at")?,
                duration_ms: s.try_get("duration_ms")?,
                error: s.try_get("error")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(JournalError::Query)?;
        Ok(RunSummary {
            targets: self.run_targets(&id).await?,
            trigger: row.try_get("trigger_kind").map_err(JournalError::Query)?,
            started_at: row.try_get("started_at").map_err(JournalError::Query)?,
            finished_at: row.try_get("finished_at").map_err(JournalError::Query)?,
            outcome: row.try_get("outcome").map_err(JournalError::Query)?,
            steps,
            id,
        })
    }
}

/// The journal holds sealed credentials and run history: only its owner may read it. SQLite
/// gives its -wal and -shm files the database file's mode. An existing file is left as it is.
fn create_private_file(path: &std::path::Path) -> Result<(), JournalError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(JournalError::Open(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

enum Connect {
    Now,
    /// At first use: commands that never write a checkpoint do not pay for it.
    Lazily,
}

/// A pool of `connections`. SQLite ones get foreign keys on and keep SQLite's default
/// `synchronous = FULL` (a commit is durable when it returns), except `relaxed` ones (NORMAL).
/// A local file needs no test before each use.
async fn connect_pool(
    url: &Secret,
    connections: u32,
    is_sqlite: bool,
    relaxed: bool,
    connect: Connect,
) -> Result<AnyPool, JournalError> {
    let options = AnyPoolOptions::new()
        .max_connections(connections)
        .test_before_acquire(!is_sqlite)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if is_sqlite {
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                }
                if relaxed {
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        });
    match connect {
        Connect::Now => options.connect(url.expose()).await,
        Connect::Lazily => options.connect_lazy(url.expose()),
    }
    .map_err(|e| JournalError::Open(e.to_string()))
}

/// The pool URL (created if missing) and a lock directory beside the database file.
fn sqlite_setup(url: &str) -> Result<(Secret, Locker), JournalError> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path.starts_with(":memory:") {
        return Ok((
            Secret::new("sqlite::memory:"),
            Locker::Memory(Arc::new(Mutex::new(HashSet::new()))),
        ));
    }
    let query = if query.is_empty() {
        "mode=rwc".to_string()
    } else {
        query.to_string()
    };
    create_private_file(std::path::Path::new(path))?;
    let lock_dir = PathBuf::from(format!("{path}.locks"));
    Ok((
        Secret::new(format!("sqlite://{path}?{query}")),
        Locker::Files(lock_dir),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    async fn memory_journal() -> Journal {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        Journal::open(&Secret::new("sqlite::memory:"), &Secret::new(key))
            .await
            .expect("in-memory journal")
    }

    fn step(seq: i64) -> StepRecord {
        StepRecord {
            seq,
            step: "apply".into(),
            subject: "t".into(),
            status: "started".into(),
            started_at: 0,
            duration_ms: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_fenced_owner_can_neither_write_nor_finish_the_run_nor_drop_its_state() {
        let journal = memory_journal().await;
        let part = |bytes: &[u8]| vec![("t".to_string(), Zeroizing::new(bytes.to_vec()))];
        journal
            .begin_run("r1", "first", "cli", &["t".into()], b"{}", &part(b"sealed"))
            .await
            .unwrap();
        journal.claim("r1", "second").await.unwrap();

        let write = journal
            .checkpoint("r1", "first", None, &part(b"late"), &[&step(1)], true)
            .await;
        assert!(matches!(write, Err(JournalError::Fenced(_))), "{write:?}");
        let finish = journal.finish_run("r1", "first", "rolled_back", true).await;
        assert!(matches!(finish, Err(JournalError::Fenced(_))), "{finish:?}");
        let open = journal.unfinished_run("r1").await.unwrap();
        let open = open.expect("still due for recovery");
        assert_eq!(
            open.parts[0].1.as_slice(),
            b"sealed",
            "state kept, not overwritten"
        );

        journal
            .finish_run("r1", "second", "rolled_back", true)
            .await
            .unwrap();
        assert!(journal.needing_recovery_runs().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_rollback_stays_due_for_recovery_with_its_state() {
        let journal = memory_journal().await;
        let part = vec![("t".to_string(), Zeroizing::new(b"sealed".to_vec()))];
        journal
            .begin_run("r1", "me", "cli", &["t".into()], b"{}", &part)
            .await
            .unwrap();
        journal
            .finish_run("r1", "me", "rollback_failed", false)
            .await
            .unwrap();
        assert_eq!(
            journal.needing_recovery_runs().await.unwrap(),
            [("r1".to_string(), vec!["t".to_string()])]
        );
        let open = journal.unfinished_run("r1").await.unwrap().expect("due");
        assert_eq!(open.parts[0].1.as_slice(), b"sealed");
        assert_eq!(
            journal.needing_recovery(&["t".into()]).await.unwrap(),
            Some(("r1".to_string(), "t".to_string())),
            "no new run may start on the target"
        );
    }

    /// Write-ahead records wait for the disk; every other checkpoint goes to a connection that
    /// does not (WAL keeps them in order, so the next durable commit flushes them).
    #[tokio::test]
    async fn only_write_ahead_records_wait_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("journal.db").display());
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let journal = Journal::open(&Secret::new(url), &Secret::new(key))
            .await
            .unwrap();
        for (durable, level) in [(true, 2), (false, 1)] {
            let row = sqlx::query("PRAGMA synchronous")
                .fetch_one(journal.pool_for(durable))
                .await
                .unwrap();
            // 2 is FULL (a commit waits for the disk), 1 NORMAL.
            assert_eq!(
                row.try_get::<i64, _>(0).unwrap(),
                level,
                "durable {durable}"
            );
        }

        // Several steps in one checkpoint: all of them, or (fenced) none.
        journal
            .begin_run("r1", "me", "cli", &["t".into()], b"{}", &[])
            .await
            .unwrap();
        let (one, two) = (step(1), step(2));
        journal
            .checkpoint("r1", "me", None, &[], &[&one, &two], true)
            .await
            .unwrap();
        let fenced = journal
            .checkpoint("r1", "other", None, &[], &[&step(3)], false)
            .await;
        assert!(matches!(fenced, Err(JournalError::Fenced(_))));
        let seqs: Vec<i64> = journal
            .run("r1")
            .await
            .unwrap()
            .unwrap()
            .steps
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
    }
}

//! One run per target across processes: lock files beside a SQLite journal (released by the
//! kernel when the process dies), or PostgreSQL advisory locks held by a dedicated session.

use std::collections::HashSet;
use std::fs::{File, TryLockError};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use super::JournalError;
use crate::secret::Secret;

pub enum Locker {
    Files(PathBuf),
    Memory(Arc<Mutex<HashSet<String>>>),
    Postgres(Secret),
}

/// How often a PostgreSQL lock session is checked: the holder learns of its loss within this.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Held locks; dropping it releases them.
pub enum TargetLock {
    Files(#[allow(dead_code)] Vec<File>),
    Memory(Arc<Mutex<HashSet<String>>>, Vec<String>),
    Postgres(PgLock),
}

/// Advisory locks live as long as their session, which a network blip, a failover,
/// `idle_session_timeout` or `pg_terminate_backend` can end without telling us: a watcher pings
/// the session and cancels `lost` when it is gone.
pub struct PgLock {
    lost: CancellationToken,
    release: CancellationToken,
    /// Asks the watcher to check the session now; it answers whether the locks are still held.
    check: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<bool>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for PgLock {
    fn drop(&mut self) {
        self.release.cancel();
    }
}

impl TargetLock {
    /// Cancelled when the lock is known to be lost (only PostgreSQL locks can be).
    pub fn lost(&self) -> CancellationToken {
        match self {
            TargetLock::Postgres(lock) => lock.lost.clone(),
            _ => CancellationToken::new(),
        }
    }

    /// Whether the locks are still held, checked now (a round trip for PostgreSQL): called
    /// before each side effect.
    pub async fn check(&self) -> bool {
        let TargetLock::Postgres(lock) = self else {
            return true;
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        if lock.check.send(answer).await.is_err() {
            return false;
        }
        answered.await.unwrap_or(false)
    }

    /// Releases the locks and waits until they are free for the next taker.
    pub async fn release(mut self) {
        if let TargetLock::Postgres(lock) = &mut self {
            lock.release.cancel();
            if let Some(watcher) = lock.watcher.take() {
                let _ = watcher.await;
            }
        }
    }
}

type CheckRequests = tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<bool>>;

async fn watch_session(
    mut conn: PgConnection,
    release: CancellationToken,
    lost: CancellationToken,
    mut checks: CheckRequests,
) {
    const ANSWER_WITHIN: Duration = Duration::from_secs(2);
    loop {
        let asked = tokio::select! {
            biased;
            _ = release.cancelled() => {
                let unlock = sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut conn);
                let _ = tokio::time::timeout(ANSWER_WITHIN, unlock).await;
                let _ = tokio::time::timeout(ANSWER_WITHIN, conn.close()).await;
                return;
            }
            _ = tokio::time::sleep(LOCK_CHECK_INTERVAL) => None,
            asked = checks.recv() => asked,
        };
        // Session-level advisory locks are held exactly as long as the session lives.
        let ping = sqlx::query("SELECT 1").execute(&mut conn);
        let alive = matches!(tokio::time::timeout(ANSWER_WITHIN, ping).await, Ok(Ok(_)));
        if let Some(answer) = asked {
            let _ = answer.send(alive);
        }
        if !alive {
            tracing::error!(
                "the journal session holding the target locks is gone: the locks are lost"
            );
            lost.cancel();
            return;
        }
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        if let TargetLock::Memory(held, names) = self {
            let mut held = held.lock().expect("lock set poisoned");
            for name in names.iter() {
                held.remove(name);
            }
        }
    }
}

/// A stable 64-bit advisory lock key per target.
fn advisory_key(target: &str) -> i64 {
    let digest = Sha256::digest(format!("llmtrace-rotator:{target}"));
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl Locker {
    /// Takes every target's lock or none; a lock held elsewhere is [`JournalError::Busy`].
    pub async fn lock(&self, targets: &[String]) -> Result<TargetLock, JournalError> {
        match self {
            Locker::Files(dir) => {
                // Private like the journal beside it: target names are all they hold.
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| {
                        JournalError::Lock(format!("cannot create {}: {e}", dir.display()))
                    })?;
                let mut files = Vec::new();
                for target in targets {
                    let path = dir.join(format!("{target}.lock"));
                    let file = File::options()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|e| {
                            JournalError::Lock(format!("cannot open {}: {e}", path.display()))
                        })?;
                    match file.try_lock() {
                        Ok(()) => files.push(file),
                        Err(TryLockError::WouldBlock) => {
                            return Err(JournalError::Busy(target.clone()))
                        }
                        Err(TryLockError::Error(e)) => {
                            return Err(JournalError::Lock(format!(
                                "cannot lock {}: {e}",
                                path.display()
                            )))
                        }
                    }
                }
                Ok(TargetLock::Files(files))
            }
            Locker::Memory(held) => {
                let mut set = held.lock().expect("lock set poisoned");
                if let Some(busy) = targets.iter().find(|t| set.contains(*t)) {
                    return Err(JournalError::Busy(busy.clone()));
                }
                set.extend(targets.iter().cloned());
                Ok(TargetLock::Memory(held.clone(), targets.to_vec()))
            }
            Locker::Postgres(url) => {
                let mut conn = PgConnection::connect(url.expose()).await.map_err(|e| {
                    JournalError::Lock(format!("cannot open a lock session on the journal: {e}"))
                })?;
                for target in targets {
                    let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                        .bind(advisory_key(target))
                        .fetch_one(&mut conn)
                        .await
                        .map_err(|e| JournalError::Lock(format!("advisory lock failed: {e}")))?;
                    if !got {
                        // Closing the session releases the locks already taken.
                        return Err(JournalError::Busy(target.clone()));
                    }
                }
                let (release, lost) = (CancellationToken::new(), CancellationToken::new());
                let (check, checks) = tokio::sync::mpsc::channel(1);
                let watcher =
                    tokio::spawn(watch_session(conn, release.clone(), lost.clone(), checks));
                Ok(TargetLock::Postgres(PgLock {
                    lost,
                    release,
                    check,
                    watcher: Some(watcher),
                }))
            }
        }
    }
}

//! One run per target across processes: lock files beside a SQLite journal (released by the
//! kernel when the process dies), or PostgreSQL advisory locks held by a dedicated session.

use std::collections::HashSet;
use std::fs::{File, TryLockError};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnection;
use sqlx::Connection;

use super::JournalError;
use crate::secret::Secret;

pub enum Locker {
    Files(PathBuf),
    Memory(Arc<Mutex<HashSet<String>>>),
    Postgres(Secret),
}

/// Held locks; dropping it releases them.
pub enum TargetLock {
    Files(#[allow(dead_code)] Vec<File>),
    Memory(Arc<Mutex<HashSet<String>>>, Vec<String>),
    Postgres(#[allow(dead_code)] PgConnection),
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
                Ok(TargetLock::Postgres(conn))
            }
        }
    }
}

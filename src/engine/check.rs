//! The drift check: does the credential each store holds log in to its backend, and does each
//! store agree with the source behind it?

use std::fmt::Write;

use serde::Serialize;

use super::Deps;
use crate::store::format;

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub targets: Vec<TargetCheck>,
}

#[derive(Debug, Serialize)]
pub struct TargetCheck {
    pub target: String,
    /// Every store's credential logs in.
    pub valid: bool,
    pub stores: Vec<StoreCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StoreCheck {
    pub store: String,
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CheckReport {
    pub fn all_valid(&self) -> bool {
        self.targets.iter().all(|t| t.valid)
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for target in &self.targets {
            let _ = writeln!(
                out,
                "{}: {}",
                target.target,
                if target.valid { "ok" } else { "DRIFT" }
            );
            if let Some(error) = &target.error {
                let _ = writeln!(out, "  {error}");
            }
            for store in &target.stores {
                let _ = write!(
                    out,
                    "  {:<6} {}",
                    if store.valid { "ok" } else { "FAILED" },
                    store.store
                );
                if let Some(error) = &store.error {
                    let _ = write!(out, ": {error}");
                }
                out.push('\n');
            }
        }
        out
    }
}

/// Checks the named targets (all when `names` is empty). Reads and logs in; writes nothing.
pub async fn check(deps: &Deps, names: &[String]) -> CheckReport {
    let mut targets = Vec::new();
    for target in deps
        .config
        .targets
        .iter()
        .filter(|t| names.is_empty() || names.contains(&t.name))
    {
        let runtime = match deps.target_runtime(target).await {
            Ok(runtime) => runtime,
            Err(error) => {
                targets.push(TargetCheck {
                    target: target.name.clone(),
                    valid: false,
                    stores: Vec::new(),
                    error: Some(error.to_string()),
                });
                continue;
            }
        };
        let mut stores = Vec::new();
        for (store, config) in runtime.stores.iter().zip(&target.stores) {
            let result = async {
                store.check_source().await.map_err(|e| e.to_string())?;
                let value = store
                    .read()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the key is absent")?;
                let credential = format::credential_from(&value, &config.format, &target.user)
                    .map_err(|e| e.to_string())?;
                runtime
                    .backend
                    .login(&credential)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            stores.push(StoreCheck {
                store: store.describe(),
                valid: result.is_ok(),
                error: result.err(),
            });
        }
        targets.push(TargetCheck {
            target: target.name.clone(),
            valid: stores.iter().all(|s| s.valid),
            stores,
            error: None,
        });
    }
    CheckReport { targets }
}

/// Sessions still on the credential from before the last rotation: every session of the idle
/// login (`alternating`), and those of the login in use that began before `rotated_at` (ms
/// since the epoch). `None` when the server keeps no session list or it cannot be read.
pub async fn sessions_on_old(
    deps: &Deps,
    target: &crate::config::Target,
    rotated_at: Option<i64>,
) -> Option<usize> {
    let runtime = deps.target_runtime(target).await.ok()?;
    let value = runtime.stores.first()?.read().await.ok()??;
    let current = format::credential_from(&value, &target.stores[0].format, &target.user).ok()?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut old = 0;
    for login in target.logins() {
        let sessions = match runtime.backend.sessions(login).await {
            Ok(sessions) => sessions?,
            Err(error) => {
                tracing::warn!(target = %target.name, cause = %error, "cannot read the session list");
                return None;
            }
        };
        old += if login != current.user {
            sessions.len()
        } else {
            let before = rotated_at.unwrap_or(i64::MIN);
            sessions
                .iter()
                .filter(|s| s.earliest_start(now) < before)
                .count()
        };
    }
    Some(old)
}

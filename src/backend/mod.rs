//! Backends: the servers whose passwords rotate. One file per kind behind [`Backend`].

pub mod clickhouse;
pub mod postgres;
pub mod redis;
pub mod scram;

use async_trait::async_trait;

use crate::config::{At, Errors, Strategy, Target, Validate};
use crate::secret::{Credential, Redacted, Secret};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot log in to {backend} as {user}: {cause}")]
    Login {
        backend: String,
        user: String,
        cause: Redacted,
    },
    #[error("cannot connect to {backend} as admin user {user}: {cause}")]
    Admin {
        backend: String,
        user: String,
        cause: Redacted,
    },
    #[error("{backend}: {message}")]
    Setup { backend: String, message: String },
    #[error("{backend}: changing the password of {user} failed: {cause}")]
    Change {
        backend: String,
        user: String,
        cause: Redacted,
    },
}

impl BackendError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            BackendError::Login { .. } => "login",
            BackendError::Admin { .. } => "admin",
            BackendError::Setup { .. } => "setup",
            BackendError::Change { .. } => "change",
        }
    }
}

/// A server whose login passwords rotate.
///
/// `current` is the credential the stores hold now, `next` the one being rolled out; for
/// `single` both name the same user.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Names the server in reports: `postgres 10.0.0.5:5432/llmtrace`.
    fn describe(&self) -> String;

    fn strategy(&self) -> Strategy;

    /// Logs in with `credential` on a fresh connection, proving it works.
    async fn login(&self, credential: &Credential) -> Result<(), BackendError>;

    /// Proves the admin login works and may change the password of `current`'s user (an admin
    /// that is that user itself may log in with `current`).
    async fn check_admin(&self, current: &Credential) -> Result<(), BackendError>;

    /// The user the next credential is for (alternating strategies switch users).
    fn next_user(&self, current: &Credential) -> String {
        current.user.clone()
    }

    /// Makes `next` log in.
    async fn apply(&self, current: &Credential, next: &Credential) -> Result<(), BackendError>;

    /// Undoes [`Backend::apply`]: `current` logs in again and `next` no longer does.
    async fn undo_apply(&self, current: &Credential, next: &Credential)
        -> Result<(), BackendError>;

    /// After every consumer moved to `next`: drop what only `current` needed.
    async fn retire(&self, _current: &Credential, _next: &Credential) -> Result<(), BackendError> {
        Ok(())
    }

    /// The sessions `user` has open now, from the server's own list (read as admin), the
    /// rotator's own excluded; `None` when the server keeps no such list.
    async fn sessions(&self, _user: &str) -> Result<Option<Vec<Session>>, BackendError> {
        Ok(None)
    }

    /// Dual strategies, once nothing uses an old password: drops every password of `next.user`
    /// but `next`'s, including one a run before left because its sessions had not drained.
    async fn retire_all_but(&self, _next: &Credential) -> Result<(), BackendError> {
        Ok(())
    }

    /// Warnings gathered while changing the server that do not fail the step (a change that
    /// cannot be persisted); the engine moves them into the report and the warning counter.
    fn take_notes(&self) -> Vec<Note> {
        Vec::new()
    }
}

/// One session a server lists for a login: where it comes from and how long it has been open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `ip:port` as the server sees it, or `local` (a Unix socket).
    pub client: String,
    /// How long it has been open, rounded down to `age_resolution`.
    pub age: std::time::Duration,
    /// Redis counts whole seconds: the session may be up to this much older than `age`.
    pub age_resolution: std::time::Duration,
}

impl Session {
    /// The earliest it may have begun (ms since the epoch), given the time `now`.
    pub fn earliest_start(&self, now: i64) -> i64 {
        now - (self.age + self.age_resolution).as_millis() as i64
    }
}

/// A warning from a backend: a stable `kind` for `rotator_warnings_total`, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub kind: &'static str,
    pub message: String,
}

/// A backend kind's settings (its keys of a `[[target]]` table), defined in the kind's own
/// file and listed in [`crate::config::BackendConfig`].
pub trait BackendSettings: Validate {
    /// The strategies the kind can carry out.
    fn strategies(&self) -> &'static [Strategy];

    /// Checks the chosen strategy against the rest of the settings (`at` is the target's table).
    fn check_strategy(&self, _strategy: Strategy, _at: &At, _errors: &mut Errors) {}

    /// The login when the target names none; `None`: `user` is required.
    fn default_user(&self) -> Option<&'static str> {
        None
    }

    /// Where to connect when the target gives no `address`; `None`: `address` is required.
    fn default_address(&self) -> Option<&str> {
        None
    }

    /// Whether the target needs an `admin` login to change the password.
    fn needs_admin(&self) -> bool {
        true
    }

    /// Builds the backend, given the target's resolved admin password and where PostgreSQL
    /// admin sessions are kept between uses.
    fn open(
        &self,
        target: &Target,
        admin_password: Secret,
        admin_sessions: &std::sync::Arc<postgres::AdminPool>,
    ) -> Box<dyn Backend>;
}

/// Builds the backend for a target, given its resolved admin password and where PostgreSQL
/// admin sessions are kept between uses.
pub fn for_target(
    target: &Target,
    admin_password: Secret,
    admin_sessions: &std::sync::Arc<postgres::AdminPool>,
) -> Box<dyn Backend> {
    target
        .backend
        .settings()
        .open(target, admin_password, admin_sessions)
}

//! PostgreSQL: `ALTER ROLE ... PASSWORD '<SCRAM verifier>'`, so the plaintext never reaches the server.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{ConnectOptions, Connection};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::{scram, Backend, BackendError, BackendSettings};
use crate::config::{At, Errors, Strategy, Target, Validate};
use crate::secret::{Credential, Redacted, Secret};

/// `kind = "postgres"`: a PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct PostgresConfig {
    /// The database the logins connect to.
    #[serde(default)]
    pub database: String,
    #[serde(default, deserialize_with = "crate::config::text")]
    pub sslmode: SslMode,
    pub ca_file: Option<std::path::PathBuf>,
    /// Read only to be refused: PostgreSQL speaks TLS through `sslmode`.
    #[serde(default, deserialize_with = "crate::config::present")]
    tls: bool,
}

impl Validate for PostgresConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        if self.database.is_empty() {
            errors.missing(at.of("database"), "is required for a postgres target");
        }
        if let Some(ca_file) = &mut self.ca_file {
            at.resolve(ca_file);
        }
        if std::mem::take(&mut self.tls) {
            errors.push(at.of("tls"), "is not used by postgres targets: use sslmode");
        }
    }
}

impl BackendSettings for PostgresConfig {
    fn strategies(&self) -> &'static [Strategy] {
        &[Strategy::Single, Strategy::Alternating]
    }

    fn open(
        &self,
        target: &Target,
        admin_password: Secret,
        admin_sessions: &Arc<AdminPool>,
    ) -> Box<dyn Backend> {
        Box::new(Postgres::new(
            target,
            self,
            admin_password,
            admin_sessions.clone(),
        ))
    }
}

/// PostgreSQL `sslmode`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;

    fn from_str(text: &str) -> Result<SslMode, String> {
        match text {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "{other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            )),
        }
    }
}

/// A login that has not answered by then is treated as failed rather than hanging the run.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a kept admin session has to answer before a new login replaces it.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Every statement on our sessions ends within this (`statement_timeout`), and waits at most
/// `LOCK_TIMEOUT` for a lock another session holds (an open transaction that altered the same
/// role, say), so a step ends, and SIGTERM is answered, within a known time.
pub const STATEMENT_TIMEOUT: &str = "10s";
pub const LOCK_TIMEOUT: &str = "5s";

pub struct Postgres {
    host: String,
    port: u16,
    database: String,
    admin_user: String,
    admin_password: Secret,
    sslmode: PgSslMode,
    ca_file: Option<std::path::PathBuf>,
    strategy: Strategy,
    /// The two logins of `alternating`; empty otherwise.
    users: Vec<String>,
    /// Where admin sessions wait between uses. Only admin work uses them; every login proof
    /// opens its own connection.
    pool: Arc<AdminPool>,
    /// Names the sessions this backend may reuse: same server, database, admin login and
    /// password, TLS settings.
    pool_key: PoolKey,
}

type PoolKey = [u8; 32];

/// Admin sessions kept between uses, shared by the PostgreSQL backends of a process: a new one
/// is a full SCRAM exchange (4096 PBKDF2 iterations on each side). At most `keep` idle ones,
/// the oldest closed first; a session found closed is dropped and replaced by a new login. A
/// run empties it when it starts and ends, so no run proves its admin login on a session an
/// earlier run opened.
pub struct AdminPool {
    keep: usize,
    idle: Mutex<VecDeque<(PoolKey, PgConnection)>>,
}

impl AdminPool {
    pub fn new(keep: usize) -> Self {
        AdminPool {
            keep,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    fn take(&self, key: &PoolKey) -> Option<PgConnection> {
        let mut idle = self.idle.lock().expect("admin pool");
        let index = idle.iter().rposition(|(k, _)| k == key)?;
        idle.remove(index).map(|(_, conn)| conn)
    }

    fn put(&self, key: &PoolKey, conn: PgConnection) {
        let surplus = {
            let mut idle = self.idle.lock().expect("admin pool");
            idle.push_back((*key, conn));
            (idle.len() > self.keep).then(|| idle.pop_front())
        };
        // Closed outside the lock: dropping ends the session.
        drop(surplus);
    }

    /// Ends every idle session.
    pub fn clear(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().expect("admin pool"));
        drop(idle);
    }
}

impl Postgres {
    pub fn new(
        target: &Target,
        config: &PostgresConfig,
        admin_password: Secret,
        pool: Arc<AdminPool>,
    ) -> Self {
        let mut key = Sha256::new();
        for part in [
            target.address.as_str(),
            config.database.as_str(),
            target.admin_user.as_str(),
            &format!("{:?}", config.sslmode),
            &format!("{:?}", config.ca_file),
            admin_password.expose(),
        ] {
            key.update((part.len() as u64).to_be_bytes());
            key.update(part.as_bytes());
        }
        let pool_key: PoolKey = key.finalize().into();
        let (host, port) = target
            .address
            .rsplit_once(':')
            .expect("config validated HOST:PORT");
        Postgres {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: port.parse().expect("config validated the port"),
            database: config.database.clone(),
            admin_user: target.admin_user.clone(),
            admin_password,
            sslmode: match config.sslmode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require => PgSslMode::Require,
                SslMode::VerifyCa => PgSslMode::VerifyCa,
                SslMode::VerifyFull => PgSslMode::VerifyFull,
            },
            ca_file: config.ca_file.clone(),
            strategy: target.strategy,
            users: target.users.clone(),
            pool,
            pool_key,
        }
    }

    fn options(&self, user: &str, password: &Secret) -> PgConnectOptions {
        let mut options = PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .database(&self.database)
            .username(user)
            // sqlx hashes the bytes it is given, where libpq SASLpreps them first (as the
            // server did when it stored the verifier): hand it the SASLprepped form. Only
            // non-ASCII passwords differ; an md5-stored one of those would not log in.
            .password(&scram::saslprep(password.expose()))
            .ssl_mode(self.sslmode)
            .application_name("llmtrace-rotator")
            .options([
                ("statement_timeout", STATEMENT_TIMEOUT),
                ("lock_timeout", LOCK_TIMEOUT),
            ]);
        if let Some(ca) = &self.ca_file {
            options = options.ssl_root_cert(ca);
        }
        // Statements may carry a verifier: keep them out of our logs whatever the log level.
        options.disable_statement_logging()
    }

    async fn connect(&self, user: &str, password: &Secret) -> Result<PgConnection, Redacted> {
        let options = self.options(user, password);
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(Redacted::new(e, &[password])),
            Err(_) => Err(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()).into()),
        }
    }

    async fn admin(&self) -> Result<AdminSession<'_>, BackendError> {
        self.admin_also(&[]).await
    }

    /// An admin session: one kept from earlier admin work if it still answers, else a new one.
    /// It goes back to the pool when the guard drops; [`AdminSession::discard`] after a failed
    /// statement.
    async fn admin_also(&self, also: &[&Credential]) -> Result<AdminSession<'_>, BackendError> {
        while let Some(mut conn) = self.pool.take(&self.pool_key) {
            // The server may have restarted or ended it since (or the network dropped it without
            // a word: hence the bound): then try the next, or log in.
            if let Ok(Ok(())) = tokio::time::timeout(PING_TIMEOUT, conn.ping()).await {
                return Ok(self.session(conn));
            }
        }
        let conn = self.admin_connect(also).await?;
        Ok(self.session(conn))
    }

    fn session(&self, conn: PgConnection) -> AdminSession<'_> {
        AdminSession {
            pool: &self.pool,
            key: &self.pool_key,
            conn: Some(conn),
        }
    }

    /// A new admin session. When the admin is the rotated user itself, the password it was
    /// given (resolved when the run started, maybe from the store being rotated) stops working
    /// once apply changed it: this run's credentials for that user are tried after it, so the
    /// password in force is used, whichever side of the change the run is on.
    async fn admin_connect(&self, also: &[&Credential]) -> Result<PgConnection, BackendError> {
        let mut cause = match self.connect(&self.admin_user, &self.admin_password).await {
            Ok(conn) => return Ok(conn),
            Err(cause) => cause,
        };
        let mut tried = vec![self.admin_password.expose()];
        for credential in also.iter().filter(|c| c.user == self.admin_user) {
            if tried.contains(&credential.password.expose()) {
                continue;
            }
            tried.push(credential.password.expose());
            match self.connect(&credential.user, &credential.password).await {
                Ok(conn) => return Ok(conn),
                Err(e) => cause = e,
            }
        }
        Err(BackendError::Admin {
            backend: self.describe(),
            user: self.admin_user.clone(),
            cause,
        })
    }

    /// Stores a fresh verifier of `credential`'s password for its user; `also` are this run's
    /// credentials, for an admin that is the rotated user.
    async fn set_password(
        &self,
        credential: &Credential,
        also: &[&Credential],
    ) -> Result<(), BackendError> {
        let mut admin = self.admin_also(also).await?;
        let verifier = scram::verifier(&credential.password);
        // A verifier is base64 plus `$` and `:`: nothing in it needs escaping inside '...'.
        let statement = format!(
            "ALTER ROLE {} PASSWORD '{}'",
            quote_identifier(&credential.user),
            verifier.expose()
        );
        let result = sqlx::query(&statement)
            .persistent(false)
            .execute(&mut *admin)
            .await;
        if result.is_err() {
            admin.discard();
        }
        result.map(|_| ()).map_err(|e| BackendError::Change {
            backend: self.describe(),
            user: credential.user.clone(),
            cause: Redacted::new(e, &[&verifier]),
        })
    }
}

impl Postgres {
    /// Both logins exist with LOGIN and share a NOLOGIN role (the one that owns the objects),
    /// so either can serve the workload. Says what to run when something is missing.
    async fn check_alternating(&self) -> Result<(), BackendError> {
        let mut admin = self.admin().await?;
        let admin_error = |e: sqlx::Error| BackendError::Admin {
            backend: self.describe(),
            user: self.admin_user.clone(),
            cause: Redacted::new(e, &[]),
        };
        let setup = |message: String| BackendError::Setup {
            backend: self.describe(),
            message,
        };
        let (a, b) = (&self.users[0], &self.users[1]);
        for login in [a, b] {
            let row: Option<(bool,)> =
                sqlx::query_as("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
                    .bind(login)
                    .fetch_optional(&mut *admin)
                    .await
                    .map_err(admin_error)?;
            match row {
                None => {
                    return Err(setup(format!(
                        "login {login:?} does not exist: CREATE ROLE {} LOGIN IN ROLE <owner role>",
                        quote_identifier(login)
                    )))
                }
                Some((false,)) => {
                    return Err(setup(format!(
                        "role {login:?} has no LOGIN: ALTER ROLE {} LOGIN",
                        quote_identifier(login)
                    )))
                }
                Some((true,)) => {}
            }
        }
        let shared: Option<(String,)> = sqlx::query_as(
            "SELECT g.rolname FROM pg_auth_members m1 \
             JOIN pg_auth_members m2 ON m1.roleid = m2.roleid \
             JOIN pg_roles g ON g.oid = m1.roleid \
             WHERE m1.member = (SELECT oid FROM pg_roles WHERE rolname = $1) \
               AND m2.member = (SELECT oid FROM pg_roles WHERE rolname = $2) \
               AND NOT g.rolcanlogin LIMIT 1",
        )
        .bind(a)
        .bind(b)
        .fetch_optional(&mut *admin)
        .await
        .map_err(admin_error)?;
        drop(admin);
        if shared.is_none() {
            return Err(setup(format!(
                "logins {a:?} and {b:?} share no NOLOGIN role to own the objects: GRANT <owner role> TO {}, {}",
                quote_identifier(a),
                quote_identifier(b)
            )));
        }
        Ok(())
    }
}

/// The kept admin session, locked for one piece of admin work.
struct AdminSession<'a> {
    pool: &'a AdminPool,
    key: &'a PoolKey,
    conn: Option<PgConnection>,
}

impl AdminSession<'_> {
    /// Ends the session after a failed statement, so later admin work does not reuse a session
    /// in an unknown state.
    fn discard(mut self) {
        self.conn = None;
    }
}

impl Drop for AdminSession<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put(self.key, conn);
        }
    }
}

impl std::ops::Deref for AdminSession<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("an admin session is open")
    }
}

impl std::ops::DerefMut for AdminSession<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("an admin session is open")
    }
}

/// `"name"` with embedded quotes doubled, as PostgreSQL quotes identifiers.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[async_trait]
impl Backend for Postgres {
    fn describe(&self) -> String {
        format!("postgres {}:{}/{}", self.host, self.port, self.database)
    }

    fn strategy(&self) -> Strategy {
        self.strategy
    }

    async fn login(&self, credential: &Credential) -> Result<(), BackendError> {
        let conn = self
            .connect(&credential.user, &credential.password)
            .await
            .map_err(|cause| BackendError::Login {
                backend: self.describe(),
                user: credential.user.clone(),
                cause,
            })?;
        let _ = conn.close().await;
        Ok(())
    }

    fn next_user(&self, current: &Credential) -> String {
        match self.strategy {
            // The idle login of the pair: the one the stores do not name now.
            Strategy::Alternating => self
                .users
                .iter()
                .find(|u| **u != current.user)
                .cloned()
                .unwrap_or_else(|| current.user.clone()),
            _ => current.user.clone(),
        }
    }

    async fn check_admin(&self, current: &Credential) -> Result<(), BackendError> {
        if self.strategy == Strategy::Alternating {
            return self.check_alternating().await;
        }
        let user = current.user.as_str();
        let mut admin = self.admin_also(&[current]).await?;
        let row: Option<(bool, bool)> = sqlx::query_as(
            "SELECT r.rolcanlogin, (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) \
             FROM pg_roles r WHERE r.rolname = $1",
        )
        .bind(user)
        .fetch_optional(&mut *admin)
        .await
        .map_err(|e| BackendError::Admin {
            backend: self.describe(),
            user: self.admin_user.clone(),
            cause: Redacted::new(e, &[]),
        })?;
        drop(admin);
        let setup = |message: String| BackendError::Setup {
            backend: self.describe(),
            message,
        };
        match row {
            None => Err(setup(format!("role {user:?} does not exist"))),
            Some((false, _)) => Err(setup(format!("role {user:?} has no LOGIN"))),
            Some((true, false)) => Err(setup(format!(
                "admin user {:?} may not change passwords: it needs SUPERUSER or CREATEROLE",
                self.admin_user
            ))),
            Some((true, true)) => Ok(()),
        }
    }

    async fn apply(&self, current: &Credential, next: &Credential) -> Result<(), BackendError> {
        self.set_password(next, &[current, next]).await
    }

    async fn undo_apply(
        &self,
        current: &Credential,
        next: &Credential,
    ) -> Result<(), BackendError> {
        match self.strategy {
            // `current` was never touched; make the unused new credential worthless.
            Strategy::Alternating => {
                let discarded = Credential {
                    user: next.user.clone(),
                    password: crate::password::generate(&Default::default()),
                };
                self.set_password(&discarded, &[current, next]).await
            }
            _ => self.set_password(current, &[current, next]).await,
        }
    }

    /// `pg_stat_activity`: client backends of `user`, with their age on the server's clock.
    async fn sessions(&self, user: &str) -> Result<Option<Vec<super::Session>>, BackendError> {
        let mut admin = self.admin().await?;
        // pg_stat_activity is this function joined to pg_database and pg_authid (PostgreSQL's
        // src/backend/catalog/system_views.sql); filtering on the role's oid instead skips those
        // joins, about half the cost on the admin session preflight has just opened.
        let rows: Result<Vec<(Option<String>, f64)>, _> = sqlx::query_as(
            "SELECT host(s.client_addr) || ':' || s.client_port, \
                    EXTRACT(EPOCH FROM clock_timestamp() - s.backend_start)::float8 \
             FROM pg_stat_get_activity(NULL) AS s \
             WHERE s.usesysid = to_regrole(quote_ident($1)) \
               AND s.backend_type = 'client backend' \
               AND s.pid <> pg_backend_pid() \
               AND s.application_name IS DISTINCT FROM 'llmtrace-rotator'",
        )
        .bind(user)
        .persistent(false)
        .fetch_all(&mut *admin)
        .await;
        if rows.is_err() {
            admin.discard();
        } else {
            drop(admin);
        }
        let rows = rows.map_err(|e| BackendError::Setup {
            backend: self.describe(),
            message: format!("cannot read pg_stat_activity: {e}"),
        })?;
        Ok(Some(
            rows.into_iter()
                .map(|(client, age)| super::Session {
                    client: client.unwrap_or_else(|| "local".into()),
                    age: std::time::Duration::from_secs_f64(age.max(0.0)),
                    age_resolution: std::time::Duration::ZERO,
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("llmtrace"), "\"llmtrace\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}

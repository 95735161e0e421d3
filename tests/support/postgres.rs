//! A throwaway PostgreSQL server for tests.
//!
//! `Postgres::start()` runs `initdb` into a fresh temp dir under /tmp and
//! starts the server on a free loopback port with SCRAM-SHA-256 for TCP
//! connections (`trust` on its private unix socket), `log_statement = 'all'`
//! and the server log in a file of the temp dir. Dropping the value stops the
//! server (`pg_ctl stop -m immediate`) and removes the temp dir.
//!
//! PostgreSQL refuses to run as root, so as root every server command runs as
//! the `postgres` user through `runuser`, and the temp dir is chowned to it.
//!
//! The server binaries are taken from `$PG_BIN_DIR` if set, else from the
//! newest `/usr/lib/postgresql/*/bin`, else from `PATH`.

use std::ffi::OsString;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection};

/// How long the server may take to accept a SCRAM login after `pg_ctl start`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting on a fresh port (another process may take the port
/// between our probe bind and the server's bind).
const START_ATTEMPTS: usize = 5;
const APPLICATION_NAME: &str = "rotator-test-harness";

pub struct Postgres {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    admin_password: String,
    started: bool,
    /// With a certificate: `ssl = on`, and pg_hba.conf takes TCP logins over TLS only.
    tls: Option<super::pki::Pki>,
}

impl Postgres {
    /// initdb and start a new server; panics (with the server log) on failure.
    pub async fn start() -> Postgres {
        Postgres::start_with(None).await
    }

    /// Like [`Postgres::start`], serving `pki`'s certificate and refusing TCP logins without
    /// TLS (`hostssl` lines only), so every connection that works proves it used TLS.
    pub async fn start_tls(pki: super::pki::Pki) -> Postgres {
        Postgres::start_with(Some(pki)).await
    }

    async fn start_with(tls: Option<super::pki::Pki>) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("rotator-pg-")
            .tempdir_in("/tmp")
            .expect("create temp dir for PostgreSQL");
        let root = dir.path().to_path_buf();
        let mut pg = Postgres {
            data_dir: root.join("data"),
            socket_dir: root.join("sock"),
            log_file: root.join("postgres.log"),
            dir,
            port: 0,
            admin_password: uuid::Uuid::new_v4().simple().to_string(),
            started: false,
            tls,
        };
        pg.init().await;

        let mut last_failure = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            match pg.try_start(port).await {
                Ok(()) => {
                    pg.started = true;
                    pg.port = port;
                    pg.wait_ready().await;
                    return pg;
                }
                Err(e) => {
                    last_failure = format!("attempt {attempt} on port {port}: {e}");
                    // Whatever half-started, stop it before trying another port.
                    pg.stop();
                }
            }
        }
        panic!(
            "PostgreSQL did not start after {START_ATTEMPTS} attempts; last: {last_failure}\n\
             --- server log ({}) ---\n{}",
            pg.log_file.display(),
            pg.log_contents()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Password of the superuser `postgres`.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `postgres://user:password@127.0.0.1:PORT/db`, user and password percent-encoded.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(db)
        )
    }

    /// Connect options for a TCP (SCRAM) login, with no TLS and no env/pgpass defaults.
    pub fn connect_options(&self, user: &str, password: &str, db: &str) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(self.port)
            .username(user)
            .password(password)
            .database(db)
            .ssl_mode(if self.tls.is_some() {
                PgSslMode::Require
            } else {
                PgSslMode::Disable
            })
            .application_name(APPLICATION_NAME)
            .disable_statement_logging()
    }

    /// A superuser pool on database `postgres`, over TCP with the admin password.
    pub async fn admin(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.admin_options())
            .await
            .unwrap_or_else(|e| panic!("connect as superuser to {}: {e}", self.address()))
    }

    /// Run `sql` (may hold several statements) as superuser; panics on error.
    pub async fn exec(&self, sql: &str) {
        let mut conn = self.admin_conn().await;
        if let Err(e) = sqlx::raw_sql(sql).execute(&mut conn).await {
            panic!("SQL failed on {}: {e}\n  sql: {sql}", self.address());
        }
        let _ = conn.close().await;
    }

    /// Create (or re-password) LOGIN role `user` and create database `db`
    /// owned by it if there is none. Its statements are kept out of the server
    /// log, so that tests can assert that passwords never reach the log.
    pub async fn create_login(&self, user: &str, password: &str, db: &str) {
        let mut conn = self.admin_conn().await;
        let statements = [
            "SET log_statement = 'none'".to_string(),
            format!(
                "DO $rotator$ BEGIN \
                   IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {name}) THEN \
                     ALTER ROLE {ident} LOGIN PASSWORD {pw}; \
                   ELSE \
                     CREATE ROLE {ident} LOGIN PASSWORD {pw}; \
                   END IF; \
                 END $rotator$",
                name = quote_literal(user),
                ident = quote_ident(user),
                pw = quote_literal(password),
            ),
        ];
        for sql in statements {
            if let Err(e) = sqlx::raw_sql(&sql).execute(&mut conn).await {
                panic!("create_login({user:?}, {db:?}): {e}");
            }
        }
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(db)
                .fetch_optional(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("create_login: look up database {db:?}: {e}"));
        if exists.is_none() {
            // CREATE DATABASE can't run inside the implicit transaction of a
            // multi-statement query, so it goes alone.
            let sql = format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(db),
                quote_ident(user)
            );
            if let Err(e) = sqlx::raw_sql(&sql).execute(&mut conn).await {
                panic!("create_login: {sql}: {e}");
            }
        }
        let _ = conn.close().await;
    }

    /// `user` logs in to `db` with `new` and no longer with `old`.
    pub async fn assert_only_login(&self, user: &str, db: &str, new: &str, old: &str) {
        if let Err(e) = self.try_login(user, new, db).await {
            panic!("the new password of {user} does not log in: {e}");
        }
        let old_refused = self.try_login(user, old, db).await.is_err();
        assert!(old_refused, "the old password of {user} still logs in");
    }

    /// A fresh SCRAM login over TCP: `Ok(())`, or the error's text.
    pub async fn try_login(&self, user: &str, password: &str, db: &str) -> Result<(), String> {
        let attempt = async {
            let mut conn = PgConnection::connect_with(&self.connect_options(user, password, db))
                .await
                .map_err(|e| e.to_string())?;
            sqlx::query("SELECT 1")
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let _ = conn.close().await;
            Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("login as {user:?} to {} timed out", self.address())),
        }
    }

    /// `pg_authid.rolpassword` of `user`; None if the role doesn't exist or has no password.
    pub async fn rolpassword(&self, user: &str) -> Option<String> {
        let mut conn = self.admin_conn().await;
        let row: Option<Option<String>> =
            sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
                .bind(user)
                .fetch_optional(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("read rolpassword of {user:?}: {e}"));
        let _ = conn.close().await;
        row.flatten()
    }

    /// Turns `log_connections` on and returns once the server logs logins (a reload takes
    /// effect a moment later).
    pub async fn log_connections(&self) {
        self.exec("ALTER SYSTEM SET log_connections = on").await;
        self.exec("SELECT pg_reload_conf()").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .log_contents()
            .contains("connection authorized: user=postgres ")
        {
            assert!(
                Instant::now() < deadline,
                "log_connections never took effect"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = self.admin_conn().await.close().await;
        }
    }

    /// The server log so far.
    pub fn log_contents(&self) -> String {
        match std::fs::read(&self.log_file) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    // ----------------------------------------------------------------------

    fn admin_options(&self) -> PgConnectOptions {
        self.connect_options("postgres", &self.admin_password, "postgres")
    }

    async fn admin_conn(&self) -> PgConnection {
        PgConnection::connect_with(&self.admin_options())
            .await
            .unwrap_or_else(|e| panic!("connect as superuser to {}: {e}", self.address()))
    }

    async fn init(&self) {
        let root = self.dir.path();
        std::fs::create_dir(&self.socket_dir).expect("create socket dir");
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.admin_password)).expect("write pwfile");
        if as_root() {
            let status = StdCommand::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(root)
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown -R postgres {} failed",
                root.display()
            );
        }

        let mut cmd = server_command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync"])
            .args([
                "-A",
                "scram-sha-256",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        let out = run_async(cmd).await;
        let _ = std::fs::remove_file(&pwfile);
        if !out.status.success() {
            panic!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // Settings go into postgresql.conf rather than `pg_ctl -o`, which passes
        // through a shell. The port is given per start (`-o -p`), for retries.
        let conf = format!(
            "\n# rotator test harness\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{sock}'\n\
             password_encryption = 'scram-sha-256'\n\
             logging_collector = off\n\
             log_statement = 'all'\n\
             log_line_prefix = '%m [%p] %q%u@%d/%a '\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 100\n\
             shared_buffers = 32MB\n",
            sock = self.socket_dir.display()
        );
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        if let Some(pki) = &self.tls {
            self.enable_tls(pki);
        }
    }

    /// The certificate and key in the data dir (the key 0600 and the server's, or it refuses
    /// to start), `ssl = on`, and `host` lines turned into `hostssl` (src/backend/libpq/hba.c).
    fn enable_tls(&self, pki: &super::pki::Pki) {
        use std::os::unix::fs::PermissionsExt;
        for (from, name) in [(pki.cert(), "server.crt"), (pki.key(), "server.key")] {
            let to = self.data_dir.join(name);
            std::fs::copy(from, &to).expect("copy certificate");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
            if as_root() {
                let owner = std::fs::metadata(&self.data_dir).unwrap();
                std::os::unix::fs::chown(
                    &to,
                    Some(std::os::unix::fs::MetadataExt::uid(&owner)),
                    Some(std::os::unix::fs::MetadataExt::gid(&owner)),
                )
                .unwrap();
            }
        }
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf_path, text).unwrap();
        let hba_path = self.data_dir.join("pg_hba.conf");
        let hba = std::fs::read_to_string(&hba_path).unwrap();
        let hba: String = hba
            .lines()
            .map(|l| match l.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{l}\n"),
            })
            .collect();
        std::fs::write(&hba_path, hba).unwrap();
    }

    async fn try_start(&self, port: u16) -> Result<(), String> {
        let mut cmd = server_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t"])
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("-o")
            .arg(format!("-p {port}"))
            .arg("start");
        let out = run_async(cmd).await;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start: {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Wait until a SCRAM login over TCP works (pg_isready and then some).
    async fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_err;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                PgConnection::connect_with(&self.admin_options()),
            )
            .await;
            match attempt {
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    return;
                }
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "connect timed out".to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "PostgreSQL on {} not ready after {:?}: {last_err}\n--- server log ({}) ---\n{}",
                    self.address(),
                    START_TIMEOUT,
                    self.log_file.display(),
                    self.log_contents()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A shell command line that stops this server at once: a consumer that takes the
    /// database down with it.
    pub fn stop_command(&self) -> String {
        let mut words = Vec::new();
        if as_root() {
            words.extend(["runuser", "-u", "postgres", "--"].map(String::from));
        }
        words.push(server_program("pg_ctl").display().to_string());
        words.extend(["-D".to_string(), self.data_dir.display().to_string()]);
        words.extend(["-m", "immediate", "-w", "stop"].map(String::from));
        words.join(" ")
    }

    /// Starts the server again on its port after [`Postgres::stop_command`] stopped it.
    pub async fn start_again(&self) {
        self.try_start(self.port)
            .await
            .expect("PostgreSQL starts again on its port");
        self.wait_ready().await;
    }

    /// `pg_ctl stop -m immediate`, synchronously; harmless if not running.
    fn stop(&self) {
        if !self.data_dir.join("postmaster.pid").exists() {
            return;
        }
        let mut cmd = server_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        // The TempDir field removes the directory after this.
    }
}

// --------------------------------------------------------------------------

fn as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        StdCommand::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// Directory of initdb/pg_ctl/postgres, if one can be found outside PATH.
fn pg_bin_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
            return Some(PathBuf::from(dir));
        }
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").is_file().then_some((version, bin))
            })
            .collect();
        found.sort();
        found.pop().map(|(_, bin)| bin)
    })
    .as_deref()
}

/// Absolute path of a server program (runuser resets PATH, so never rely on it there).
fn server_program(name: &str) -> PathBuf {
    if let Some(dir) = pg_bin_dir() {
        return dir.join(name);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: install PostgreSQL (apt-get install postgresql) \
                 or set PG_BIN_DIR"
            )
        })
}

/// A command for a PostgreSQL server program, run as `postgres` when we are root.
fn server_command(name: &str) -> StdCommand {
    let program = server_program(name);
    let mut cmd = if as_root() {
        let mut cmd = StdCommand::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        StdCommand::new(program)
    };
    // Run from a directory the postgres user can enter, with no PG* settings
    // from the caller's environment leaking in.
    cmd.current_dir("/tmp");
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with("PG") && k != "PG_BIN_DIR")
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("LC_ALL", OsString::from("C"));
    cmd
}

/// Run to completion without blocking the async runtime.
async fn run_async(cmd: StdCommand) -> std::process::Output {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.kill_on_drop(true);
    cmd.output()
        .await
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.as_std().get_program()))
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    // standard_conforming_strings is on, so only quotes need doubling.
    format!("'{}'", s.replace('\'', "''"))
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

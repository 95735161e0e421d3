//! Redis (6.0+ ACL): password changes reach the server as SHA-256 hashes (`ACL SETUSER`
//! `#<hex>` adds, `!<hex>` removes), so the change itself never shows a plaintext on the wire,
//! in `MONITOR` or in the slow log. Logging in does: `AUTH` (the rotator's admin login and its
//! checks of the old and new credential) sends the password in plaintext, as every client
//! does, and so does `CONFIG SET masterauth` for replicas; only TLS (`tls = true`) protects
//! those on the network.
//!
//! Every change is persisted (`ACL SAVE` with an aclfile, else `CONFIG REWRITE`), because a
//! Redis restart would otherwise bring the old password back. ACLs are not replicated: every
//! listed replica gets the same change (Bitnami starts replicas with the master's users), and
//! those that authenticate to the master as the rotated user follow it through `masterauth`.

use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
    TlsCertificates, Value,
};
use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, BackendSettings};
use crate::config::{is_host_port, not_host_port, At, Errors, Strategy, Target, Validate};
use crate::secret::{Credential, Redacted, Secret};

/// Redis clients that name no user authenticate as this one.
const DEFAULT_USER: &str = "default";

/// `kind = "redis"`: a Redis master, its replicas, or a Sentinel that names them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RedisConfig {
    /// Replicas that get the same ACL change, and whose `masterauth` follows it.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Names the master and its replicas instead of `address` and `replicas`, asked again at
    /// each step so a failover is followed.
    pub sentinel: Option<SentinelConfig>,
    /// Connect with TLS (`rediss://`).
    #[serde(default)]
    pub tls: bool,
    pub ca_file: Option<std::path::PathBuf>,
}

/// `sentinel = { address = "HOST:PORT", master_name = "mymaster" }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SentinelConfig {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub master_name: String,
}

impl Validate for RedisConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        if let Some(sentinel) = &self.sentinel {
            let path = at.of("sentinel");
            let sentinel_at = At {
                path: &path,
                base: at.base,
            };
            errors.require(&sentinel.address, &sentinel_at, "address");
            errors.require(&sentinel.master_name, &sentinel_at, "master_name");
            if !sentinel.address.is_empty() && !is_host_port(&sentinel.address) {
                errors.push(sentinel_at.of("address"), not_host_port(&sentinel.address));
            }
            if !self.replicas.is_empty() {
                errors.push(
                    at.of("replicas"),
                    "is found through the sentinel: list replicas or give a sentinel, not both",
                );
            }
        }
        for (j, replica) in self.replicas.iter().enumerate() {
            if !is_host_port(replica) {
                errors.push(
                    format!("{}[{j}]", at.of("replicas")),
                    not_host_port(replica),
                );
            }
        }
        if let Some(ca_file) = &mut self.ca_file {
            at.resolve(ca_file);
        }
    }
}

impl BackendSettings for RedisConfig {
    fn strategies(&self) -> &'static [Strategy] {
        &[Strategy::Single, Strategy::Dual]
    }

    fn default_user(&self) -> Option<&'static str> {
        Some(DEFAULT_USER)
    }

    fn default_address(&self) -> Option<&str> {
        self.sentinel.as_ref().map(|s| s.address.as_str())
    }

    fn open(
        &self,
        target: &Target,
        admin_password: Secret,
        _admin_sessions: &std::sync::Arc<super::postgres::AdminPool>,
    ) -> Box<dyn Backend> {
        Box::new(Redis::new(target, self, admin_password))
    }
}

/// A login or command that has not answered by then is treated as failed rather than hanging the run.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A replica reconnects and resyncs within seconds; longer means its link is really broken.
const REPLICA_LINK_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Redis {
    host: String,
    port: u16,
    replicas: Vec<(String, u16)>,
    /// Where the master and replicas are found instead: (sentinel host, port, master name).
    sentinel: Option<(String, u16, String)>,
    tls: bool,
    ca_file: Option<std::path::PathBuf>,
    admin_user: String,
    admin_password: Secret,
    strategy: Strategy,
    /// Warnings for the report (a change that cannot be persisted); drained by the engine.
    notes: Mutex<Vec<super::Note>>,
}

/// The nodes a change goes to.
struct Topology {
    master: (String, u16),
    replicas: Vec<(String, u16)>,
}

/// What `ACL GETUSER` says about a user, as far as rotation cares.
#[derive(Debug, Default, PartialEq, Eq)]
struct AclUser {
    flags: Vec<String>,
    /// SHA-256 hex of each password the user accepts.
    passwords: Vec<String>,
}

/// Which change an `ACL SETUSER` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Apply,
    Undo,
    Retire,
}

/// SHA-256 of the password, lower-case hex: how `ACL GETUSER` lists it and `#`/`!` take it.
fn password_hash(password: &Secret) -> Secret {
    let digest = Sha256::digest(password.expose().as_bytes());
    Secret::new(
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
}

/// The `ACL SETUSER user ...` rules for a change, given the hashes the user holds now. Rules
/// are computed from the current state so that a repeated undo (recovery) is harmless.
fn setuser_rules(
    strategy: Strategy,
    change: Change,
    held: &[String],
    old: &Secret,
    new: &Secret,
) -> Result<Vec<Secret>, &'static str> {
    let holds = |hash: &Secret| held.iter().any(|h| h == hash.expose());
    let add = |hash: &Secret| Secret::new(format!("#{}", hash.expose()));
    let remove = |hash: &Secret| Secret::new(format!("!{}", hash.expose()));
    let mut rules = Vec::new();
    match (strategy, change) {
        // Config allows alternating only for PostgreSQL; here it would mean one password.
        (Strategy::Single | Strategy::Alternating, Change::Apply) => {
            rules.extend([Secret::new("resetpass"), add(new)])
        }
        (Strategy::Single | Strategy::Alternating, Change::Undo) => {
            rules.extend([Secret::new("resetpass"), add(old)])
        }
        (Strategy::Single | Strategy::Alternating, Change::Retire) => {}
        (Strategy::Dual, Change::Apply) => {
            if !holds(new) {
                rules.push(add(new));
            }
        }
        (Strategy::Dual, Change::Undo) => {
            if !holds(old) {
                rules.push(add(old));
            }
            if holds(new) {
                rules.push(remove(new));
            }
        }
        (Strategy::Dual, Change::Retire) => {
            if !holds(new) {
                return Err("the new password is not among the user's passwords any more; the old one is kept");
            }
            if holds(old) {
                rules.push(remove(old));
            }
        }
    }
    Ok(rules)
}

/// The connections of `user` in a `CLIENT LIST` reply (`id=.. addr=.. age=.. user=..` per
/// line), but connection `own` and replication links.
fn client_list_sessions(list: &str, user: &str, own: i64) -> Vec<super::Session> {
    list.lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            };
            if field("user")? != user || field("id")?.parse::<i64>().ok()? == own {
                return None;
            }
            // A replica's link (flag S) follows the password through masterauth, which the
            // rotation sets itself: it is not a workload's session.
            if field("flags")?.contains(['S', 'M']) {
                return None;
            }
            Some(super::Session {
                client: field("addr")?.to_string(),
                age: Duration::from_secs(field("age")?.parse().ok()?),
                age_resolution: Duration::from_secs(1),
            })
        })
        .collect()
}

/// Reads a field map that RESP2 sends as a flat array and RESP3 as a map.
fn fields(value: Value) -> Vec<(String, Value)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    match value {
        Value::Map(pairs) => pairs.into_iter().map(|(k, v)| (text(&k), v)).collect(),
        Value::Array(items) => {
            let mut out = Vec::new();
            let mut items = items.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                out.push((text(&k), v));
            }
            out
        }
        _ => Vec::new(),
    }
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) | Value::Set(items) => items
            .iter()
            .filter_map(|v| match v {
                Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn acl_user(value: Value) -> Option<AclUser> {
    if value == Value::Nil {
        return None;
    }
    let mut user = AclUser::default();
    for (key, value) in fields(value) {
        match key.as_str() {
            "flags" => user.flags = strings(&value),
            "passwords" => user.passwords = strings(&value),
            _ => {}
        }
    }
    Some(user)
}

/// One `field:value` line of an `INFO` section.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

fn split_host_port(address: &str) -> (String, u16) {
    let (host, port) = address
        .rsplit_once(':')
        .expect("config validated HOST:PORT");
    (
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port.parse().expect("config validated the port"),
    )
}

impl Redis {
    pub fn new(target: &Target, config: &RedisConfig, admin_password: Secret) -> Self {
        let (host, port) = split_host_port(&target.address);
        Redis {
            host,
            port,
            replicas: config.replicas.iter().map(|r| split_host_port(r)).collect(),
            sentinel: config.sentinel.as_ref().map(|s| {
                let (host, port) = split_host_port(&s.address);
                (host, port, s.master_name.clone())
            }),
            tls: config.tls,
            ca_file: config.ca_file.clone(),
            admin_user: target.admin_user.clone(),
            admin_password,
            strategy: target.strategy,
            notes: Mutex::new(Vec::new()),
        }
    }

    fn note(&self, kind: &'static str, message: String) {
        let note = super::Note { kind, message };
        let mut notes = self.notes.lock().expect("notes lock");
        if !notes.contains(&note) {
            notes.push(note);
        }
    }

    async fn connect(
        &self,
        (host, port): (&str, u16),
        user: &str,
        password: &Secret,
    ) -> Result<MultiplexedConnection, Redacted> {
        let scrub = |e: ::redis::RedisError| Redacted::new(e, &[password]);
        let addr = if self.tls {
            ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_string(), port)
        };
        let settings = if user.is_empty() {
            RedisConnectionInfo::default().set_skip_set_lib_name()
        } else {
            RedisConnectionInfo::default()
                .set_username(user)
                .set_password(password.expose())
                .set_skip_set_lib_name()
        };
        let info = addr
            .into_connection_info()
            .map_err(scrub)?
            .set_redis_settings(settings);
        let client = if self.tls {
            let root_cert = match &self.ca_file {
                Some(path) => Some(tokio::fs::read(path).await.map_err(|e| {
                    Redacted::new(format!("cannot read ca_file {}: {e}", path.display()), &[])
                })?),
                None => None,
            };
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert,
                },
            )
        } else {
            Client::open(info)
        }
        .map_err(scrub)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(scrub)
    }

    /// The master and the replicas to change: as configured, or as the Sentinel reports them
    /// now (asked at each step, so a failover during the run is followed). Replicas the
    /// Sentinel flags as down or disconnected are left out, and the report says so.
    async fn topology(&self) -> Result<Topology, BackendError> {
        let Some((host, port, name)) = &self.sentinel else {
            return Ok(Topology {
                master: (self.host.clone(), self.port),
                replicas: self.replicas.clone(),
            });
        };
        let fail = |cause: Redacted| BackendError::Setup {
            backend: self.describe(),
            message: format!("cannot ask the sentinel for master {name:?}: {cause}"),
        };
        let ours = |message: String| fail(Redacted::new(message, &[]));
        let mut conn = self
            .sentinel_connection((host, *port))
            .await
            .map_err(fail)?;
        let master: Value = ::redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(name)
            .query_async(&mut conn)
            .await
            .map_err(|e| fail(Redacted::new(e, &[])))?;
        let master = match strings(&master).as_slice() {
            [ip, port] => (
                ip.clone(),
                port.parse()
                    .map_err(|_| ours(format!("bad master port {port:?}")))?,
            ),
            _ => return Err(ours("the sentinel does not monitor that master".into())),
        };
        let listed: Value = ::redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(name)
            .query_async(&mut conn)
            .await
            .map_err(|e| fail(Redacted::new(e, &[])))?;
        let mut replicas = Vec::new();
        let entries = match listed {
            Value::Array(items) | Value::Set(items) => items,
            _ => Vec::new(),
        };
        for entry in entries {
            let fields: Vec<(String, String)> = fields(entry)
                .into_iter()
                .map(|(k, v)| (k, strings(&Value::Array(vec![v])).pop().unwrap_or_default()))
                .collect();
            let get = |key: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let (ip, port, flags) = (get("ip"), get("port"), get("flags"));
            let address = (ip.clone(), port.parse().unwrap_or(0));
            if flags
                .split(',')
                .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
            {
                self.note(
                    "replica_down",
                    format!(
                        "{}: replica {ip}:{port} is {flags} according to the sentinel: its password was not changed",
                        self.describe()
                    ),
                );
                continue;
            }
            replicas.push(address);
        }
        Ok(Topology { master, replicas })
    }

    /// A connection to the Sentinel: with the admin credential when it knows that user, else
    /// without authentication (a Sentinel without `requirepass`).
    async fn sentinel_connection(
        &self,
        node: (&str, u16),
    ) -> Result<MultiplexedConnection, Redacted> {
        match self
            .connect(node, &self.admin_user, &self.admin_password)
            .await
        {
            Ok(conn) => Ok(conn),
            Err(with_admin) => self
                .connect(node, "", &Secret::new(""))
                .await
                .map_err(|_| with_admin),
        }
    }

    /// The admin connection to `node`. When the admin is the rotated user itself, its stored
    /// admin password may be either credential of this run, so those are tried too.
    async fn admin(
        &self,
        node: (&str, u16),
        also: &[&Credential],
    ) -> Result<MultiplexedConnection, BackendError> {
        let mut cause = match self
            .connect(node, &self.admin_user, &self.admin_password)
            .await
        {
            Ok(conn) => return Ok(conn),
            Err(cause) => cause,
        };
        for credential in also.iter().filter(|c| c.user == self.admin_user) {
            match self
                .connect(node, &credential.user, &credential.password)
                .await
            {
                Ok(conn) => return Ok(conn),
                Err(e) => cause = e,
            }
        }
        Err(BackendError::Admin {
            backend: format!("redis {}:{}", node.0, node.1),
            user: self.admin_user.clone(),
            cause,
        })
    }

    async fn get_user(
        &self,
        conn: &mut MultiplexedConnection,
        user: &str,
    ) -> Result<Option<AclUser>, Redacted> {
        let value: Value = ::redis::cmd("ACL")
            .arg("GETUSER")
            .arg(user)
            .query_async(conn)
            .await
            .map_err(|e| Redacted::new(e, &[]))?;
        Ok(acl_user(value))
    }

    /// Runs one `ACL SETUSER` for `change` on the master, then on every listed replica (ACLs
    /// are not replicated, and a replica started with the master's users keeps their old
    /// passwords otherwise), persisting it on each.
    async fn set_user(
        &self,
        change: Change,
        current: &Credential,
        next: &Credential,
    ) -> Result<(), BackendError> {
        let topology = self.topology().await?;
        let (host, port) = &topology.master;
        let node = format!("redis {host}:{port}");
        self.set_user_on((host, *port), &node, true, change, current, next)
            .await?;
        for (host, port) in &topology.replicas {
            let node = format!("redis replica {host}:{port}");
            self.set_user_on((host, *port), &node, false, change, current, next)
                .await?;
        }
        Ok(())
    }

    /// [`Redis::set_user`] on one node; rules follow what that node holds, so a repeated
    /// undo is harmless. A replica that does not have the user has nothing to change.
    async fn set_user_on(
        &self,
        address: (&str, u16),
        node: &str,
        required: bool,
        change: Change,
        current: &Credential,
        next: &Credential,
    ) -> Result<(), BackendError> {
        let user = &next.user;
        let fail = |cause: Redacted| BackendError::Change {
            backend: node.to_string(),
            user: user.clone(),
            cause,
        };
        let mut conn = self.admin(address, &[current, next]).await?;
        let held = match self.get_user(&mut conn, user).await.map_err(fail)? {
            Some(found) => found.passwords,
            None if required => return Err(fail(Redacted::new("the user does not exist", &[]))),
            None => return Ok(()),
        };
        let old = password_hash(&current.password);
        let new = password_hash(&next.password);
        let rules = setuser_rules(self.strategy, change, &held, &old, &new)
            .map_err(|cause| fail(Redacted::new(cause, &[])))?;
        if rules.is_empty() {
            return Ok(());
        }
        let mut command = ::redis::cmd("ACL");
        command.arg("SETUSER").arg(user);
        for rule in &rules {
            command.arg(rule.expose());
        }
        command
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| fail(Redacted::new(e, &[&old, &new])))?;
        self.persist_acl(&mut conn, user, node).await.map_err(fail)
    }

    /// `ACL SAVE` with an aclfile, else `CONFIG REWRITE`, else a warning for the report.
    async fn persist_acl(
        &self,
        conn: &mut MultiplexedConnection,
        user: &str,
        node: &str,
    ) -> Result<(), Redacted> {
        let aclfile = self.config_get(conn, "aclfile").await?;
        if !aclfile.is_empty() {
            let aclfile = aclfile.expose();
            return ::redis::cmd("ACL")
                .arg("SAVE")
                .query_async::<()>(conn)
                .await
                .map_err(|e| Redacted::new(format!("ACL SAVE to {aclfile} failed (the change is live but would be lost at restart): {e}"), &[]));
        }
        // `requirepass` is a config value that ACL SETUSER leaves stale: a rewrite would write the
        // old password back, and only `CONFIG SET requirepass` (plaintext) changes it.
        if user == "default" && !self.config_get(conn, "requirepass").await?.is_empty() {
            self.note("not_persisted", format!(
                "{node}: NOT PERSISTED: the default user's password comes from requirepass; a restart brings back whatever the server is started with. \
                 Start it with the password from a rotated store (Bitnami: --requirepass from <release>-redis#redis-password), \
                 or replace requirepass by `user default on #<sha256> ~* &* +@all` in the config file"
            ));
            return Ok(());
        }
        self.persist_config(conn, node).await
    }

    /// `CONFIG REWRITE` when the server was started from a config file, else a warning.
    async fn persist_config(
        &self,
        conn: &mut MultiplexedConnection,
        node: &str,
    ) -> Result<(), Redacted> {
        let info: String = ::redis::cmd("INFO")
            .arg("server")
            .query_async(conn)
            .await
            .map_err(|e| Redacted::new(e, &[]))?;
        if info_field(&info, "config_file").is_some_and(|f| !f.is_empty()) {
            return ::redis::cmd("CONFIG")
                .arg("REWRITE")
                .query_async::<()>(conn)
                .await
                .map_err(|e| Redacted::new(format!("CONFIG REWRITE failed (the change is live but would be lost at restart): {e}"), &[]));
        }
        tracing::warn!(backend = %node, "no aclfile and no config file: the change is not persisted");
        self.note("not_persisted", format!(
            "{node}: NOT PERSISTED: the server has neither an aclfile nor a config file, so a restart brings the old password back"
        ));
        Ok(())
    }

    /// One config value. The result may be a password (`requirepass`): callers only test it.
    async fn config_get(
        &self,
        conn: &mut MultiplexedConnection,
        name: &str,
    ) -> Result<Secret, Redacted> {
        let value: Value = ::redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(conn)
            .await
            .map_err(|e| Redacted::new(e, &[]))?;
        Ok(fields(value)
            .into_iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, v)| match v {
                Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                Value::SimpleString(s) => Some(s),
                _ => None,
            })
            .map(Secret::new)
            .unwrap_or_else(|| Secret::new("")))
    }

    /// Points every listed replica that authenticates as `to.user` at `to`'s password, persists
    /// it, and waits until its link to the master is up.
    async fn follow(&self, from: &Credential, to: &Credential) -> Result<(), BackendError> {
        for (host, port) in &self.topology().await?.replicas {
            let node = format!("redis replica {host}:{port}");
            let fail = |cause: Redacted| BackendError::Change {
                backend: node.clone(),
                user: to.user.clone(),
                cause,
            };
            let mut conn = self.admin((host, *port), &[from, to]).await?;
            let masteruser = self
                .config_get(&mut conn, "masteruser")
                .await
                .map_err(fail)?;
            let authenticates_as = if masteruser.is_empty() {
                "default"
            } else {
                masteruser.expose()
            };
            if authenticates_as != to.user {
                continue;
            }
            ::redis::cmd("CONFIG")
                .arg("SET")
                .arg("masterauth")
                .arg(to.password.expose())
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| fail(Redacted::new(e, &[&from.password, &to.password])))?;
            self.persist_config(&mut conn, &node).await.map_err(fail)?;
            self.wait_link_up(&mut conn).await.map_err(fail)?;
        }
        Ok(())
    }

    async fn wait_link_up(&self, conn: &mut MultiplexedConnection) -> Result<(), Redacted> {
        let deadline = tokio::time::Instant::now() + REPLICA_LINK_TIMEOUT;
        loop {
            let info: String = ::redis::cmd("INFO")
                .arg("replication")
                .query_async(conn)
                .await
                .map_err(|e| Redacted::new(e, &[]))?;
            if info_field(&info, "master_link_status") == Some("up") {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Redacted::new(
                    format!(
                        "master_link_status is not up after {}s (role {})",
                        REPLICA_LINK_TIMEOUT.as_secs(),
                        info_field(&info, "role").unwrap_or("?")
                    ),
                    &[],
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[async_trait]
impl Backend for Redis {
    fn describe(&self) -> String {
        match &self.sentinel {
            Some((host, port, name)) => format!("redis {name} via sentinel {host}:{port}"),
            None => format!("redis {}:{}", self.host, self.port),
        }
    }

    fn strategy(&self) -> Strategy {
        self.strategy
    }

    async fn login(&self, credential: &Credential) -> Result<(), BackendError> {
        let topology = self.topology().await?;
        let (host, port) = &topology.master;
        let login = async {
            let mut conn = self
                .connect((host, *port), &credential.user, &credential.password)
                .await?;
            ::redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| Redacted::new(e, &[&credential.password]))
        };
        login.await.map_err(|cause| BackendError::Login {
            backend: self.describe(),
            user: credential.user.clone(),
            cause,
        })
    }

    async fn check_admin(&self, current: &Credential) -> Result<(), BackendError> {
        let user = current.user.as_str();
        let topology = self.topology().await?;
        let (host, port) = &topology.master;
        let mut conn = self.admin((host, *port), &[current]).await?;
        let setup = |message: String| BackendError::Setup {
            backend: self.describe(),
            message,
        };
        let found = self.get_user(&mut conn, user).await.map_err(|cause| {
            setup(format!(
                "admin user {:?} cannot read the ACL of {user:?} (it needs +acl): {cause}",
                self.admin_user
            ))
        })?;
        let Some(found) = found else {
            return Err(setup(format!("ACL user {user:?} does not exist")));
        };
        if found.flags.iter().any(|f| f == "nopass") {
            return Err(setup(format!(
                "ACL user {user:?} has nopass: any password logs in, so there is nothing to rotate; give it a password first"
            )));
        }
        if found.flags.iter().any(|f| f == "off") {
            return Err(setup(format!("ACL user {user:?} is disabled (off)")));
        }
        for (host, port) in &topology.replicas {
            self.admin((host, *port), &[current]).await?;
        }
        Ok(())
    }

    async fn apply(&self, current: &Credential, next: &Credential) -> Result<(), BackendError> {
        self.set_user(Change::Apply, current, next).await?;
        self.follow(current, next).await
    }

    async fn undo_apply(
        &self,
        current: &Credential,
        next: &Credential,
    ) -> Result<(), BackendError> {
        self.set_user(Change::Undo, current, next).await?;
        self.follow(next, current).await
    }

    async fn retire(&self, current: &Credential, next: &Credential) -> Result<(), BackendError> {
        if self.strategy == Strategy::Dual {
            self.set_user(Change::Retire, current, next).await?;
        }
        Ok(())
    }

    fn take_notes(&self) -> Vec<super::Note> {
        std::mem::take(&mut *self.notes.lock().expect("notes lock"))
    }

    /// `CLIENT LIST` on the master: connections authenticated as `user`, this one excluded.
    async fn sessions(&self, user: &str) -> Result<Option<Vec<super::Session>>, BackendError> {
        let topology = self.topology().await?;
        let (host, port) = &topology.master;
        let mut conn = self.admin((host, *port), &[]).await?;
        let fail = |e: ::redis::RedisError| BackendError::Setup {
            backend: self.describe(),
            message: format!("cannot list clients: {e}"),
        };
        let own: i64 = ::redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(fail)?;
        let list: String = ::redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .map_err(fail)?;
        Ok(Some(client_list_sessions(&list, user, own)))
    }

    /// Removes every password of the user but `next`'s, on the master and on each replica
    /// that has the user (a retire an earlier run had to skip).
    async fn retire_all_but(&self, next: &Credential) -> Result<(), BackendError> {
        if self.strategy != Strategy::Dual {
            return Ok(());
        }
        let topology = self.topology().await?;
        let (host, port) = &topology.master;
        let master = format!("redis {host}:{port}");
        self.retire_all_but_on((host, *port), &master, true, next)
            .await?;
        for (host, port) in &topology.replicas {
            let node = format!("redis replica {host}:{port}");
            self.retire_all_but_on((host, *port), &node, false, next)
                .await?;
        }
        Ok(())
    }
}

impl Redis {
    async fn retire_all_but_on(
        &self,
        address: (&str, u16),
        node: &str,
        required: bool,
        next: &Credential,
    ) -> Result<(), BackendError> {
        let user = &next.user;
        let fail = |cause: Redacted| BackendError::Change {
            backend: node.to_string(),
            user: user.clone(),
            cause,
        };
        let mut conn = self.admin(address, &[next]).await?;
        let held = match self.get_user(&mut conn, user).await.map_err(fail)? {
            Some(found) => found.passwords,
            None if required => return Err(fail("the user does not exist".into())),
            None => return Ok(()),
        };
        let keep = password_hash(&next.password);
        if !held.iter().any(|h| h == keep.expose()) {
            return Err(fail(
                "the new password is not among the user's passwords; the others are kept".into(),
            ));
        }
        let stale: Vec<&String> = held.iter().filter(|h| *h != keep.expose()).collect();
        if stale.is_empty() {
            return Ok(());
        }
        let mut command = ::redis::cmd("ACL");
        command.arg("SETUSER").arg(user);
        for hash in stale {
            command.arg(format!("!{hash}"));
        }
        command
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| fail(Redacted::new(e, &[&keep])))?;
        self.persist_acl(&mut conn, user, node).await.map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_list_keeps_the_users_connections_but_our_own_and_replica_links() {
        // `CLIENT LIST` lines as redis/redis src/networking.c (catClientInfoString) writes them:
        // age in whole seconds, flags S for a replica link, M for the master.
        let list = "id=3 addr=127.0.0.1:50100 laddr=127.0.0.1:6379 fd=8 name= age=42 idle=0 flags=N db=0 user=app lib-name= cmd=get\n\
                    id=4 addr=127.0.0.1:50102 laddr=127.0.0.1:6379 fd=9 name= age=1 idle=0 flags=N db=0 user=admin cmd=client|list\n\
                    id=5 addr=10.0.0.7:41000 laddr=127.0.0.1:6379 fd=10 name= age=0 idle=0 flags=N db=0 user=app cmd=client|list\n\
                    id=6 addr=10.0.0.8:41000 laddr=127.0.0.1:6379 fd=11 name= age=7 idle=0 flags=N db=0 user=application cmd=ping\n\
                    id=7 addr=10.0.0.9:41000 laddr=127.0.0.1:6379 fd=12 name= age=90 idle=0 flags=S db=0 user=app cmd=replconf\n";
        assert_eq!(
            client_list_sessions(list, "app", 5),
            [crate::backend::Session {
                client: "127.0.0.1:50100".into(),
                age: Duration::from_secs(42),
                age_resolution: Duration::from_secs(1),
            }]
        );
    }

    fn rules(strategy: Strategy, change: Change, held: &[&Secret]) -> Vec<String> {
        let held: Vec<String> = held.iter().map(|h| h.expose().to_string()).collect();
        setuser_rules(strategy, change, &held, &hash("old"), &hash("new"))
            .unwrap()
            .iter()
            .map(|r| r.expose().to_string())
            .collect()
    }

    fn hash(password: &str) -> Secret {
        password_hash(&Secret::new(password))
    }

    #[test]
    fn hashes_like_acl_getuser_lists_them() {
        // sha256("foobar"), as `ACL SETUSER u >foobar` then `ACL GETUSER u` shows it.
        assert_eq!(
            hash("foobar").expose(),
            "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2"
        );
    }

    #[test]
    fn single_replaces_every_password() {
        let (old, new) = (hash("old"), hash("new"));
        assert_eq!(
            rules(Strategy::Single, Change::Apply, &[&old]),
            ["resetpass".to_string(), format!("#{}", new.expose())]
        );
        assert_eq!(
            rules(Strategy::Single, Change::Undo, &[&new]),
            ["resetpass".to_string(), format!("#{}", old.expose())]
        );
        assert!(rules(Strategy::Single, Change::Retire, &[&new]).is_empty());
    }

    #[test]
    fn dual_adds_then_removes_and_undo_is_idempotent() {
        let (old, new) = (hash("old"), hash("new"));
        assert_eq!(
            rules(Strategy::Dual, Change::Apply, &[&old]),
            [format!("#{}", new.expose())]
        );
        assert_eq!(
            rules(Strategy::Dual, Change::Retire, &[&old, &new]),
            [format!("!{}", old.expose())]
        );
        assert_eq!(
            rules(Strategy::Dual, Change::Undo, &[&old, &new]),
            [format!("!{}", new.expose())]
        );
        assert!(rules(Strategy::Dual, Change::Undo, &[&old]).is_empty());
        let held = vec![old.expose().to_string()];
        assert!(setuser_rules(Strategy::Dual, Change::Retire, &held, &old, &new).is_err());
    }

    #[test]
    fn redacts_hashes_and_secrets_from_server_messages() {
        let message = format!(
            "ERR Error in ACL SETUSER modifier '#{}': hunter2 nope",
            hash("x").expose()
        );
        assert_eq!(
            Redacted::new(&message, &[&Secret::new("hunter2")]).to_string(),
            "ERR Error in ACL SETUSER modifier '#<hash>': *** nope"
        );
    }

    #[test]
    fn reads_acl_getuser_in_resp2() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let value = Value::Array(vec![
            bulk("flags"),
            Value::Array(vec![bulk("on")]),
            bulk("passwords"),
            Value::Array(vec![bulk("abc")]),
            bulk("commands"),
            bulk("+@all"),
        ]);
        assert_eq!(
            acl_user(value),
            Some(AclUser {
                flags: vec!["on".into()],
                passwords: vec!["abc".into()]
            })
        );
        assert_eq!(acl_user(Value::Nil), None);
    }

    #[test]
    fn reads_info_fields() {
        let info = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n";
        assert_eq!(info_field(info, "master_link_status"), Some("up"));
        assert_eq!(info_field(info, "config_file"), None);
    }
}

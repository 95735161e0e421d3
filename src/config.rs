//! The TOML configuration: schema, validation and credential references.
//!
//! Parsing walks the TOML tree by hand so that every bad field is reported at once, by its
//! path (`target[1].store[0].key`), before anything is touched.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::password::{Alphabet, PasswordPolicy};
use crate::secret::Secret;

/// A consumer that does not say how long to wait gets the time `kubectl rollout status` users expect.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML itself is malformed; only the position is shown, never the line (it may hold a literal secret).
    #[error("config file {path} is not valid TOML at line {line}, column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("config file {path} has {} error(s):\n{}", .errors.len(), .errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
    },
}

/// One bad field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub rotator: RotatorSection,
    pub password: PasswordPolicy,
    pub targets: Vec<Target>,
    pub consumers: Vec<ConsumerConfig>,
}

#[derive(Debug, Clone)]
pub struct RotatorSection {
    pub journal: JournalLocation,
    pub journal_key: Reference,
    pub listen: std::net::SocketAddr,
    pub api_tokens: Option<Reference>,
    /// How often `serve` runs the drift check; `None` when set to 0.
    pub check_interval: Option<Duration>,
    /// How long `serve` lets a run in flight finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// How often `serve` retries runs that need recovery (unfinished, or a failed rollback).
    pub recover_interval: Duration,
    /// Every Kubernetes API call (connect, send, answer) ends within this.
    pub kubernetes_timeout: Duration,
    /// How many targets of one run take a backend step at once.
    pub max_parallel: usize,
    /// How long a process that takes over a run from a PostgreSQL journal waits before acting.
    pub takeover_grace: Duration,
}

/// `serve` listens on every interface, port 8080, as the Service and probes expect.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Often enough that a broken credential pages within minutes, cheap enough to be harmless.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// Long enough for a typical rollout and rollback; shorter than Kubernetes' default 30 s would cut runs.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
/// A run left unfinished (journal outage, failed rollback) blocks its targets until recovered:
/// retry soon, but not so often that a down backend is hammered.
pub const DEFAULT_RECOVER_INTERVAL: Duration = Duration::from_secs(60);
/// Backend steps are mostly waiting on the network: a few at once cut a fleet's run time
/// without crowding one database server with logins.
pub const DEFAULT_MAX_PARALLEL: usize = 8;
/// The previous owner of a taken-over run may be in a password change it cannot abandon:
/// 15 s to connect plus the 10 s statement timeout, with margin.
pub const DEFAULT_TAKEOVER_GRACE: Duration = Duration::from_secs(30);
/// Long enough for a loaded API server, short enough that a stalled one fails the step.
pub const DEFAULT_KUBERNETES_TIMEOUT: Duration = Duration::from_secs(30);
/// Without a schedule to go by, a credential is overdue after 90 days (a common audit period).
pub const DEFAULT_MAX_AGE_UNSCHEDULED: Duration = Duration::from_secs(90 * 86400);

/// Two schedule periods plus a day: one failed or skipped rotation is tolerated, two are not.
fn default_max_age(schedule: Option<&crate::schedule::Schedule>) -> Duration {
    schedule
        .and_then(|s| s.period())
        .map_or(DEFAULT_MAX_AGE_UNSCHEDULED, |period| {
            period * 2 + Duration::from_secs(86400)
        })
}

/// A scheduled rotation more than an hour late is skipped: it would surprise whoever planned the time.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

/// Where the journal lives: a URL given in the config, or a reference to one (it may carry a password).
#[derive(Debug, Clone)]
pub enum JournalLocation {
    Url(Secret),
    Reference(Reference),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Postgres,
    Redis,
    ClickHouse,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Postgres => "postgres",
            BackendKind::Redis => "redis",
            BackendKind::ClickHouse => "clickhouse",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One password: replaced in place.
    Single,
    /// Two passwords while consumers move: the new one is added beside the old, which retire drops.
    Dual,
    /// Two logins used in turn (PostgreSQL): the idle one gets the new password and the stores
    /// move to it; the other keeps working until the next rotation.
    Alternating,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Single => "single",
            Strategy::Dual => "dual",
            Strategy::Alternating => "alternating",
        }
    }

    /// Whether the backend accepts the old credential beside the new one until retire. Such
    /// targets are rolled back after their consumers, so no pod loses its login.
    pub fn keeps_old_until_retire(self) -> bool {
        match self {
            Strategy::Single => false,
            Strategy::Dual | Strategy::Alternating => true,
        }
    }
}

/// PostgreSQL `sslmode`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub kind: BackendKind,
    pub address: String,
    pub database: Option<String>,
    pub user: String,
    /// The two logins of `strategy = "alternating"`; empty otherwise.
    pub users: Vec<String>,
    pub admin_user: String,
    /// `None` only where no admin is needed (ClickHouse users_xml mode).
    pub admin_password: Option<Reference>,
    pub strategy: Strategy,
    pub schedule: Option<crate::schedule::Schedule>,
    /// A fire missed by more than this is skipped and counted, not run late.
    pub window: Duration,
    /// Each fire is delayed by a random amount up to this, to spread load.
    pub jitter: Duration,
    /// A credential older than this is overdue (the alert threshold).
    pub max_age: Duration,
    pub consumers: Vec<String>,
    pub stores: Vec<StoreConfig>,
    pub password: PasswordPolicy,
    pub sslmode: SslMode,
    pub ca_file: Option<PathBuf>,
    /// Redis: replicas that get the same ACL change, and whose `masterauth` follows it.
    pub replicas: Vec<String>,
    /// Redis: a Sentinel that names the master and its replicas (instead of `address` and
    /// `replicas`), asked again at each step so a failover is followed.
    pub sentinel: Option<Sentinel>,
    /// Redis: connect with TLS (`rediss://`); ClickHouse: HTTPS.
    pub tls: bool,
    /// ClickHouse: how the user's password is changed.
    pub clickhouse: ClickHouseMode,
    /// ExternalSecrets to force-sync after the upstream stores are written.
    pub sync: Vec<SyncConfig>,
    pub sync_timeout: Duration,
    /// How long `confirm` waits for the sessions on the old credential to end; zero: no wait.
    pub confirm_timeout: Duration,
}

/// `sentinel = { address = "HOST:PORT", master_name = "mymaster" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinel {
    pub address: String,
    pub master_name: String,
}

/// How a ClickHouse user's password is changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClickHouseMode {
    /// `ALTER USER` (SQL-managed users, 20.5+), optionally `ON CLUSTER`.
    Sql { on_cluster: Option<String> },
    /// A users.d file the rotator owns, for users defined in XML and servers before 20.5.
    UsersXml { path: PathBuf },
}

impl Target {
    /// The logins a store may name: both of an alternating pair, else `user`.
    pub fn logins(&self) -> Vec<&str> {
        if self.users.is_empty() {
            vec![self.user.as_str()]
        } else {
            self.users.iter().map(String::as_str).collect()
        }
    }
}

/// An ExternalSecret that copies an upstream store into a Secret the workload reads.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub namespace: String,
    pub external_secret: String,
    /// The Secret the ExternalSecret writes, and where in it the credential is.
    pub secret: String,
    pub key: String,
    pub format: Format,
}

/// ESO reconciles within seconds of a force-sync; two minutes covers a slow provider.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Old pods' connections end with their termination (30 s grace by default) and new pods open
/// theirs on start: two minutes after a finished rollout, a session still on the old credential
/// belongs to something the rotation did not restart.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub format: Format,
}

impl StoreConfig {
    /// The key (or property) the credential is stored under.
    pub fn key(&self) -> &str {
        self.kind.settings().key()
    }

    /// Names the place, as the store itself does in reports.
    pub fn describe(&self) -> String {
        self.kind.settings().describe()
    }
}

/// Declares a kind enum from its table: each line names a kind as config spells it, its
/// variant, and its settings type (defined in the kind's own file).
macro_rules! kinds {
    ($(#[$doc:meta])* $Enum:ident: $Settings:path { $($name:literal => $Variant:ident($Config:ty),)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $Enum {
            $($Variant($Config),)+
        }

        impl $Enum {
            /// Every kind, as config spells it.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// Reads the table of the kind named `kind` (the `kind` key itself taken out).
            fn read(kind: &str, table: toml::Table, at: &At, errors: &mut Errors) -> Option<Self> {
                match kind {
                    "" => {
                        errors.missing(at.of("kind"), "is required");
                        None
                    }
                    $($name => parse::<$Config>(table, at, errors).map(Self::$Variant),)+
                    other => {
                        errors.push(
                            at.of("kind"),
                            format!("{other:?} is not one of {}", Self::NAMES.join(", ")),
                        );
                        None
                    }
                }
            }

            /// The kind's settings, behind the trait the rest of the rotator uses.
            pub fn settings(&self) -> &dyn $Settings {
                match self {
                    $(Self::$Variant(settings) => settings,)+
                }
            }
        }
    };
}

kinds! {
    /// Where a target's credential is stored: one line per store kind.
    StoreKind: crate::store::StoreSettings {
        "kubernetes" => Kubernetes(crate::store::kubernetes::SecretConfig),
        "file" => File(crate::store::file::FileConfig),
        "vault" => Vault(crate::store::vault::VaultConfig),
        "aws" => Aws(crate::store::aws::AwsConfig),
        "sealedsecret" => SealedSecret(crate::store::sealedsecret::SealedSecretConfig),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// A URL already in the store; only its password changes.
    Url,
    /// The bare password.
    Password,
    /// A text with `{user}` and `{password}` placeholders.
    Template(String),
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub name: String,
    pub kind: ConsumerKind,
    pub timeout: Duration,
    pub health: Option<String>,
}

kinds! {
    /// How a consumer is restarted: one line per consumer kind.
    ConsumerKind: crate::consumer::ConsumerSettings {
        "deployment" => Deployment(crate::consumer::kubernetes::DeploymentConfig),
        "statefulset" => StatefulSet(crate::consumer::kubernetes::StatefulSetConfig),
        "command" => Command(crate::consumer::command::CommandConfig),
    }
}

/// Where a credential is read from. `Debug` never shows a literal value.
#[derive(Clone, PartialEq, Eq)]
pub enum Reference {
    Env(String),
    File(PathBuf),
    Kubernetes {
        namespace: String,
        secret: String,
        key: String,
    },
    Literal(Secret),
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Env(name) => write!(f, "env:{name}"),
            Reference::File(path) => write!(f, "file:{}", path.display()),
            Reference::Kubernetes {
                namespace,
                secret,
                key,
            } => write!(f, "k8s:{namespace}/{secret}#{key}"),
            Reference::Literal(_) => f.write_str("literal:***"),
        }
    }
}

impl std::str::FromStr for Reference {
    type Err = String;

    /// A relative `file:` path stays relative until [`Reference::resolve`].
    fn from_str(text: &str) -> Result<Reference, String> {
        Reference::parse(text, Path::new(""))
    }
}

impl Reference {
    /// Takes a relative `file:` path from the config file's directory.
    pub fn resolve(&mut self, at: &At) {
        if let Reference::File(path) = self {
            at.resolve(path);
        }
    }

    /// Parses `env:NAME`, `file:PATH`, `k8s:NS/SECRET#KEY` or `literal:VALUE`; relative paths are
    /// taken from `base` (the config file's directory).
    pub fn parse(text: &str, base: &Path) -> Result<Reference, String> {
        let (scheme, rest) = text.split_once(':').ok_or_else(|| {
            "expected a reference: env:NAME, file:PATH, k8s:NAMESPACE/SECRET#KEY or literal:VALUE"
                .to_string()
        })?;
        match scheme {
            "env" if !rest.is_empty() => Ok(Reference::Env(rest.to_string())),
            "file" if !rest.is_empty() => Ok(Reference::File(base.join(rest))),
            "k8s" => {
                let parsed = rest.split_once('/').and_then(|(namespace, rest)| {
                    let (secret, key) = rest.split_once('#')?;
                    Some((namespace, secret, key))
                });
                match parsed {
                    Some((namespace, secret, key))
                        if !namespace.is_empty() && !secret.is_empty() && !key.is_empty() =>
                    {
                        Ok(Reference::Kubernetes {
                            namespace: namespace.into(),
                            secret: secret.into(),
                            key: key.into(),
                        })
                    }
                    _ => Err(format!(
                        "k8s reference {:?} must look like k8s:NAMESPACE/SECRET#KEY",
                        text
                    )),
                }
            }
            "literal" => Ok(Reference::Literal(Secret::new(rest))),
            "vault" => Err("vault: references are not supported by this build yet; use env:, file:, k8s: or literal:".into()),
            _ => Err(format!(
                "unknown reference scheme {scheme:?}: use env:NAME, file:PATH, k8s:NAMESPACE/SECRET#KEY or literal:VALUE"
            )),
        }
    }

    pub fn uses_kubernetes(&self) -> bool {
        matches!(self, Reference::Kubernetes { .. })
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|e| e.at(path))
    }

    /// Parses config text; relative paths resolve against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut root: toml::Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        let mut errors = Errors::default();
        drop_empty_strings(&mut root, "", &mut errors);
        let root = Fields::new(String::new(), &root);
        let config = parse_root(&root, base, &mut errors);
        root.finish(&mut errors);
        match config {
            Some(config) if errors.0.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                path: PathBuf::new(),
                errors: errors.0,
            }),
        }
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    pub fn consumer(&self, name: &str) -> Option<&ConsumerConfig> {
        self.consumers.iter().find(|c| c.name == name)
    }

    /// Whether anything in the config talks to a Kubernetes API server.
    pub fn uses_kubernetes(&self) -> bool {
        let store = self.targets.iter().any(|t| {
            t.admin_password
                .as_ref()
                .is_some_and(Reference::uses_kubernetes)
                || t.stores.iter().any(|s| s.kind.settings().uses_kubernetes())
                || !t.sync.is_empty()
        });
        let consumer = self
            .consumers
            .iter()
            .any(|c| c.kind.settings().uses_kubernetes());
        store || consumer || self.rotator.journal_key.uses_kubernetes()
    }
}

impl ConfigError {
    fn at(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Invalid { errors, .. } => ConfigError::Invalid {
                path: file.to_path_buf(),
                errors,
            },
            ConfigError::Syntax {
                line,
                column,
                message,
                ..
            } => ConfigError::Syntax {
                path: file.to_path_buf(),
                line,
                column,
                message,
            },
            other => other,
        }
    }
}

fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    // The parser recovers and may report a later error first (an unclosed string shows as a
    // missing `=` on the next line): report the one nearest the start of the file.
    let (_, errors) = toml::de::DeTable::parse_recoverable(text);
    let error = errors
        .iter()
        .min_by_key(|e| e.span().map_or(usize::MAX, |s| s.start))
        .unwrap_or(error);
    let offset = error.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    ConfigError::Syntax {
        path: PathBuf::new(),
        line,
        column,
        message: error.message().to_string(),
    }
}

/// Where a table sits in the file (`target[1].store[0]`) and the directory its relative paths
/// are taken from: what a kind's `validate` needs to name a field and resolve a path.
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub path: &'a str,
    pub base: &'a Path,
}

impl At<'_> {
    /// The path of `key` in this table, as errors name it.
    pub fn of(&self, key: &str) -> String {
        join(self.path, key)
    }

    /// A path from the config, taken relative to the config file's directory.
    pub fn resolve(&self, path: &mut PathBuf) {
        if !path.as_os_str().is_empty() {
            *path = self.base.join(&*path);
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Every problem found in a config, collected so that all are reported at once.
#[derive(Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Reports a missing field, unless that field was already reported (a value of the wrong
    /// type, or an empty one, is dropped before validation and must not also read as missing).
    pub fn missing(&mut self, path: String, message: impl Into<String>) {
        if !self.reported(&path) {
            self.push(path, message);
        }
    }

    /// Whether something at `path` (or inside it) was reported.
    pub fn reported(&self, path: &str) -> bool {
        self.0.iter().any(|e| {
            e.path
                .strip_prefix(path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }

    /// A required text field: empty means absent (empty strings were reported on reading).
    pub fn require(&mut self, value: &str, at: &At, key: &str) {
        if value.is_empty() {
            self.missing(at.of(key), "is required");
        }
    }
}

/// A kind's own settings: deserialized from its table, then checked as a whole.
pub trait Validate {
    /// Reports every bad field under `at` and resolves relative paths against `at.base`.
    fn validate(&mut self, at: &At, errors: &mut Errors);
}

/// Reads a table into `T` and validates it: every value of the wrong type, every unknown key and
/// every bad field is reported. `None` when a value had the wrong type.
pub fn parse<T: DeserializeOwned + Validate>(
    table: toml::Table,
    at: &At,
    errors: &mut Errors,
) -> Option<T> {
    let (value, rest) = read_part::<T>(table, at, errors);
    unknown_keys(rest, at, errors);
    let (mut value, typed) = value?;
    value.validate(at, errors);
    typed.then_some(value)
}

/// Reports each key of `rest` as unknown (a typo, or a key of another kind).
fn unknown_keys(rest: toml::Table, at: &At, errors: &mut Errors) {
    for key in rest.keys() {
        errors.push(at.of(key), "unknown key");
    }
}

/// Deserializes the part of `table` that `T` describes. A value of the wrong type is reported
/// by its path and dropped, and the rest read again, so one bad value hides no other. Returns
/// `T` (with whether every value had its type) and the top-level keys `T` does not know, left for
/// another reader; unknown keys nested deeper are reported here.
fn read_part<T: DeserializeOwned>(
    mut table: toml::Table,
    at: &At,
    errors: &mut Errors,
) -> (Option<(T, bool)>, toml::Table) {
    let mut typed = true;
    loop {
        let mut ignored: Vec<(String, Option<String>)> = Vec::new();
        let value = toml::Value::Table(table.clone());
        let mut record = |path: serde_ignored::Path| {
            let top = match &path {
                serde_ignored::Path::Map { parent, key }
                    if matches!(parent, serde_ignored::Path::Root) =>
                {
                    Some(key.clone())
                }
                _ => None,
            };
            ignored.push((ignored_path(&path), top));
        };
        let de = serde_ignored::Deserializer::new(value, &mut record);
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(parsed) => {
                let mut rest = toml::Table::new();
                for (path, top) in ignored {
                    match top.and_then(|key| table.remove_entry(&key)) {
                        Some((key, value)) => {
                            rest.insert(key, value);
                        }
                        None => errors.push(join(at.path, &path), "unknown key"),
                    }
                }
                return (Some((parsed, typed)), rest);
            }
            Err(error) => {
                typed = false;
                let segments: Vec<&Segment> = error.path().iter().collect();
                let in_array = matches!(segments.last(), Some(Segment::Seq { .. }));
                errors.push(
                    join(at.path, &segment_path(&segments)),
                    type_error(error.inner(), in_array),
                );
                let mut root = toml::Value::Table(std::mem::take(&mut table));
                let removed = remove(&mut root, &segments);
                if let toml::Value::Table(t) = root {
                    table = t;
                }
                if !removed {
                    return (None, toml::Table::new());
                }
            }
        }
    }
}

use serde_path_to_error::Segment;

fn segment_path(segments: &[&Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => out = join(&out, key),
            Segment::Enum { variant } => out = join(&out, variant),
            Segment::Unknown => out = join(&out, "?"),
        }
    }
    out
}

fn ignored_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => join(&ignored_path(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// Drops the value at `segments` so the table can be read again without it.
fn remove(value: &mut toml::Value, segments: &[&Segment]) -> bool {
    match (value, segments) {
        (toml::Value::Table(table), [Segment::Map { key }]) => table.remove(key).is_some(),
        (toml::Value::Array(array), [Segment::Seq { index }]) if *index < array.len() => {
            array.remove(*index);
            true
        }
        (toml::Value::Table(table), [Segment::Map { key }, rest @ ..]) => {
            table.get_mut(key).is_some_and(|v| remove(v, rest))
        }
        (toml::Value::Array(array), [Segment::Seq { index }, rest @ ..]) => {
            array.get_mut(*index).is_some_and(|v| remove(v, rest))
        }
        _ => false,
    }
}

/// Says what type a value should have, in the words the TOML spec uses, and never repeats the
/// value (it may be a secret). Messages of the config's own readers (a bad duration) pass as they are.
fn type_error(error: &toml::de::Error, in_array: bool) -> String {
    let message = error.message();
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return message.to_string();
    };
    let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
    let found = match found.split(' ').next().unwrap_or("") {
        "integer" => "integer",
        "boolean" => "boolean",
        "floating" => "float",
        "string" => "string",
        "sequence" => "array",
        "map" => "table",
        _ => "another type",
    };
    match expected {
        "a string" if in_array => "must be a non-empty string".into(),
        "a string" => format!("must be a string, not {found}"),
        "a boolean" => format!("must be true or false, not {found}"),
        "a sequence" => "must be an array of strings".into(),
        e if e.starts_with(['i', 'u']) => format!("must be an integer, not {found}"),
        _ => format!("must be a table, not {found}"),
    }
}

/// Reports every empty string in the document by its path and drops it: an empty value is a
/// mistake wherever it appears, and dropped it reads as absent, so a required field is not
/// reported twice. Empty items of arrays are reported and dropped likewise.
fn drop_empty_strings(table: &mut toml::Table, path: &str, errors: &mut Errors) {
    table.retain(|key, value| {
        let path = join(path, key);
        match value {
            toml::Value::String(s) if s.trim().is_empty() => {
                errors.push(path, "must not be empty");
                false
            }
            toml::Value::Table(t) => {
                drop_empty_strings(t, &path, errors);
                true
            }
            toml::Value::Array(items) => {
                let mut i = 0;
                items.retain_mut(|item| {
                    let item_path = format!("{path}[{i}]");
                    i += 1;
                    match item {
                        toml::Value::String(s) if s.is_empty() => {
                            errors.push(item_path, "must be a non-empty string");
                            false
                        }
                        toml::Value::Table(t) => {
                            drop_empty_strings(t, &item_path, errors);
                            true
                        }
                        _ => true,
                    }
                });
                true
            }
            _ => true,
        }
    });
}

/// `#[serde(deserialize_with)]` for an optional value written as text (a duration, a
/// reference, one of a list of words): the text's own error message is kept.
pub fn parsed<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// `#[serde(deserialize_with)]` for a duration like `30s` (see [`crate::duration`]).
pub fn duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::duration::parse(&text).map_err(serde::de::Error::custom)
}

/// A TOML table being read: remembers which keys were used so unknown ones can be reported.
struct Fields<'a> {
    path: String,
    table: &'a toml::Table,
    used: std::cell::RefCell<BTreeSet<&'a str>>,
}

impl<'a> Fields<'a> {
    fn new(path: String, table: &'a toml::Table) -> Self {
        Fields {
            path,
            table,
            used: Default::default(),
        }
    }

    fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'a toml::Value> {
        let (k, v) = self.table.get_key_value(key)?;
        self.used.borrow_mut().insert(k.as_str());
        Some(v)
    }

    fn string(&self, key: &str, errors: &mut Errors) -> Option<String> {
        match self.get(key)? {
            toml::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            toml::Value::String(_) => {
                errors.push(self.path_of(key), "must not be empty");
                None
            }
            other => {
                errors.push(
                    self.path_of(key),
                    format!("must be a string, not {}", other.type_str()),
                );
                None
            }
        }
    }

    fn required_string(&self, key: &str, errors: &mut Errors) -> Option<String> {
        if self.table.contains_key(key) {
            self.string(key, errors)
        } else {
            errors.missing(self.path_of(key), "is required");
            None
        }
    }

    fn integer(&self, key: &str, errors: &mut Errors) -> Option<i64> {
        match self.get(key)? {
            toml::Value::Integer(i) => Some(*i),
            other => {
                errors.push(
                    self.path_of(key),
                    format!("must be an integer, not {}", other.type_str()),
                );
                None
            }
        }
    }

    /// A duration like `30s`; `default` when absent (and on error, which is reported).
    fn duration(&self, key: &str, default: Duration, errors: &mut Errors) -> Duration {
        match self.string(key, errors) {
            Some(text) => crate::duration::parse(&text)
                .map_err(|message| errors.push(self.path_of(key), message))
                .unwrap_or(default),
            None => default,
        }
    }

    fn boolean(&self, key: &str, errors: &mut Errors) -> Option<bool> {
        match self.get(key)? {
            toml::Value::Boolean(b) => Some(*b),
            other => {
                errors.push(
                    self.path_of(key),
                    format!("must be true or false, not {}", other.type_str()),
                );
                None
            }
        }
    }

    fn strings(&self, key: &str, errors: &mut Errors) -> Option<Vec<String>> {
        let value = self.get(key)?;
        let Some(array) = value.as_array() else {
            errors.push(self.path_of(key), "must be an array of strings");
            return None;
        };
        let mut out = Vec::with_capacity(array.len());
        for (i, item) in array.iter().enumerate() {
            match item.as_str() {
                Some(s) if !s.is_empty() => out.push(s.to_string()),
                _ => errors.push(
                    format!("{}[{i}]", self.path_of(key)),
                    "must be a non-empty string",
                ),
            }
        }
        Some(out)
    }

    fn table(&self, key: &str, errors: &mut Errors) -> Option<Fields<'a>> {
        match self.get(key)? {
            toml::Value::Table(t) => Some(Fields::new(self.path_of(key), t)),
            other => {
                errors.push(
                    self.path_of(key),
                    format!("must be a table, not {}", other.type_str()),
                );
                None
            }
        }
    }

    /// `[[name]]` entries; `path_name` is how each is named in errors (`target[0]`).
    fn tables(&self, key: &str, path_name: &str, errors: &mut Errors) -> Vec<Fields<'a>> {
        let Some(value) = self.get(key) else {
            return Vec::new();
        };
        let Some(array) = value.as_array() else {
            errors.push(self.path_of(key), format!("must be [[{key}]] tables"));
            return Vec::new();
        };
        let prefix = if self.path.is_empty() {
            path_name.to_string()
        } else {
            format!("{}.{path_name}", self.path)
        };
        array
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item.as_table() {
                Some(t) => Some(Fields::new(format!("{prefix}[{i}]"), t)),
                None => {
                    errors.push(format!("{prefix}[{i}]"), "must be a table");
                    None
                }
            })
            .collect()
    }

    /// Reports every key that no parser asked for (typos, keys of another kind).
    fn finish(&self, errors: &mut Errors) {
        let used = self.used.borrow();
        for key in self.table.keys() {
            if !used.contains(key.as_str()) {
                errors.push(self.path_of(key), "unknown key");
            }
        }
    }
}

fn parse_root(root: &Fields, base: &Path, errors: &mut Errors) -> Option<Config> {
    let rotator = match root.table("rotator", errors) {
        Some(section) => {
            let parsed = parse_rotator(&section, base, errors);
            section.finish(errors);
            parsed
        }
        None => {
            if root.table.get("rotator").is_none() {
                errors.push("rotator", "is required (journal and journal_key)");
            }
            None
        }
    };

    let defaults = match root.table("password", errors) {
        Some(section) => {
            let policy = parse_policy(&section, &PasswordPolicy::default(), errors);
            section.finish(errors);
            policy
        }
        None => PasswordPolicy::default(),
    };

    let consumer_fields = root.tables("consumer", "consumer", errors);
    // Names count even for consumers with other errors, so references to them are not reported twice.
    let consumer_names: Vec<&str> = consumer_fields
        .iter()
        .filter_map(|c| c.table.get("name").and_then(toml::Value::as_str))
        .collect();
    let consumers: Vec<ConsumerConfig> = consumer_fields
        .iter()
        .filter_map(|fields| {
            let at = At {
                path: &fields.path,
                base,
            };
            parse_consumer(fields.table.clone(), &at, errors)
        })
        .collect();

    let target_fields = root.tables("target", "target", errors);
    if target_fields.is_empty() && !root.table.contains_key("target") {
        errors.push("target", "at least one [[target]] is required");
    }
    let parsed: Vec<(Target, &Fields)> = target_fields
        .iter()
        .filter_map(|fields| {
            let target = parse_target(fields, base, &defaults, &consumer_names, errors);
            fields.finish(errors);
            Some((target?, fields))
        })
        .collect();
    check_names(&parsed, &consumers, errors);
    // Exact capacity: collecting in place would keep the larger buffer of `parsed`.
    let mut targets = Vec::with_capacity(parsed.len());
    targets.extend(parsed.into_iter().map(|(target, _)| target));
    Some(Config {
        rotator: rotator?,
        password: defaults,
        targets,
        consumers,
    })
}

fn check_names(targets: &[(Target, &Fields)], consumers: &[ConsumerConfig], errors: &mut Errors) {
    // Consumer references are checked per target, where a target with other errors still gets them.
    let mut seen = HashSet::new();
    for (target, fields) in targets {
        if !seen.insert(&target.name) {
            errors.push(
                fields.path_of("name"),
                format!("duplicate target name {:?}", target.name),
            );
        }
    }
    let mut seen = HashSet::new();
    for (i, consumer) in consumers.iter().enumerate() {
        if !seen.insert(&consumer.name) {
            errors.push(
                format!("consumer[{i}].name"),
                format!("duplicate consumer name {:?}", consumer.name),
            );
        }
    }
}

fn parse_reference(
    fields: &Fields,
    key: &str,
    base: &Path,
    errors: &mut Errors,
) -> Option<Reference> {
    let text = fields.required_string(key, errors)?;
    Reference::parse(&text, base)
        .map_err(|message| errors.push(fields.path_of(key), message))
        .ok()
}

fn parse_rotator(section: &Fields, base: &Path, errors: &mut Errors) -> Option<RotatorSection> {
    let journal = section.required_string("journal", errors).and_then(|text| {
        if text.starts_with("sqlite:") || text.starts_with("postgres:") || text.starts_with("postgresql:") {
            Some(JournalLocation::Url(Secret::new(resolve_sqlite_path(&text, base))))
        } else {
            Reference::parse(&text, base)
                .map(JournalLocation::Reference)
                .map_err(|_| {
                    errors.push(
                        section.path_of("journal"),
                        "must be sqlite://PATH, postgres://... or a reference like env:ROTATOR_JOURNAL_URL",
                    )
                })
                .ok()
        }
    });
    let journal_key = parse_reference(section, "journal_key", base, errors);
    let listen = section
        .string("listen", errors)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string())
        .parse::<std::net::SocketAddr>()
        .map_err(|_| {
            errors.push(
                section.path_of("listen"),
                "is not an address like 0.0.0.0:8080",
            )
        })
        .ok();
    let check_interval = section.duration("check_interval", DEFAULT_CHECK_INTERVAL, errors);
    let shutdown_grace = section.duration("shutdown_grace", DEFAULT_SHUTDOWN_GRACE, errors);
    let recover_interval = section.duration("recover_interval", DEFAULT_RECOVER_INTERVAL, errors);
    let kubernetes_timeout =
        section.duration("kubernetes_timeout", DEFAULT_KUBERNETES_TIMEOUT, errors);
    let takeover_grace = section.duration("takeover_grace", DEFAULT_TAKEOVER_GRACE, errors);
    let max_parallel = match section.integer("max_parallel", errors) {
        None => DEFAULT_MAX_PARALLEL,
        Some(n @ 1..=256) => n as usize,
        Some(_) => {
            errors.push(section.path_of("max_parallel"), "must be from 1 to 256");
            DEFAULT_MAX_PARALLEL
        }
    };
    if kubernetes_timeout.is_zero() {
        errors.push(
            section.path_of("kubernetes_timeout"),
            "must be more than 0s",
        );
    }
    if recover_interval.is_zero() {
        errors.push(
            section.path_of("recover_interval"),
            "must be more than 0s: runs that need recovery block their targets",
        );
    }
    let api_tokens = if section.table.contains_key("api_tokens") {
        parse_reference(section, "api_tokens", base, errors)
    } else {
        None
    };
    Some(RotatorSection {
        journal: journal?,
        journal_key: journal_key?,
        listen: listen?,
        api_tokens,
        check_interval: Some(check_interval).filter(|d| !d.is_zero()),
        shutdown_grace,
        recover_interval,
        kubernetes_timeout,
        max_parallel,
        takeover_grace,
    })
}

/// `sqlite://rotator.db` is relative to the config file, like every other path in it.
pub fn resolve_sqlite_path(url: &str, base: &Path) -> String {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return url.to_string();
    };
    if rest.starts_with('/') || rest.starts_with(":memory:") || base.as_os_str().is_empty() {
        return format!("sqlite://{rest}");
    }
    format!("sqlite://{}", base.join(rest).display())
}

fn parse_policy(fields: &Fields, defaults: &PasswordPolicy, errors: &mut Errors) -> PasswordPolicy {
    let mut policy = defaults.clone();
    if let Some(length) = fields.integer("length", errors) {
        match usize::try_from(length) {
            Ok(length) if PasswordPolicy::LENGTHS.contains(&length) => policy.length = length,
            _ => errors.push(
                fields.path_of("length"),
                format!(
                    "{length} is out of range {}..={}",
                    PasswordPolicy::LENGTHS.start(),
                    PasswordPolicy::LENGTHS.end()
                ),
            ),
        }
    }
    if let Some(alphabet) = fields.string("alphabet", errors) {
        match Alphabet::parse(&alphabet) {
            Some(a) => policy.alphabet = a,
            None => errors.push(
                fields.path_of("alphabet"),
                format!("{alphabet:?} is not one of alphanumeric, urlsafe, printable"),
            ),
        }
    }
    policy
}

const TARGET_KINDS: &str = "postgres, redis, clickhouse";

/// Redis clients that name no user authenticate as this one.
const REDIS_DEFAULT_USER: &str = "default";

fn parse_target(
    fields: &Fields,
    base: &Path,
    defaults: &PasswordPolicy,
    known_consumers: &[&str],
    errors: &mut Errors,
) -> Option<Target> {
    let name = fields.required_string("name", errors);
    if let Some(name) = &name {
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            errors.push(
                fields.path_of("name"),
                format!("{name:?} may hold only letters, digits, '-' and '_'"),
            );
        }
    }
    let kind = fields
        .required_string("kind", errors)
        .and_then(|kind| match kind.as_str() {
            "postgres" => Some(BackendKind::Postgres),
            "redis" => Some(BackendKind::Redis),
            "clickhouse" => Some(BackendKind::ClickHouse),
            _ => {
                errors.push(
                    fields.path_of("kind"),
                    format!("{kind:?} is not one of {TARGET_KINDS}"),
                );
                None
            }
        });
    let sentinel = fields.table("sentinel", errors).and_then(|section| {
        let address = section.required_string("address", errors);
        let master_name = section.required_string("master_name", errors);
        if let Some(address) = address.as_ref().filter(|a| !is_host_port(a)) {
            errors.push(
                section.path_of("address"),
                format!("{address:?} is not HOST:PORT"),
            );
        }
        section.finish(errors);
        Some(Sentinel {
            address: address?,
            master_name: master_name?,
        })
    });
    // With a Sentinel the master is found through it; `address` then names the Sentinel.
    let address = match &sentinel {
        Some(sentinel) if !fields.table.contains_key("address") => Some(sentinel.address.clone()),
        _ => fields.required_string("address", errors),
    };
    if let Some(address) = &address {
        if !is_host_port(address) {
            errors.push(
                fields.path_of("address"),
                format!("{address:?} is not HOST:PORT"),
            );
        }
    }
    let database = fields.string("database", errors);
    if kind == Some(BackendKind::Postgres)
        && database.is_none()
        && !fields.table.contains_key("database")
    {
        errors.push(
            fields.path_of("database"),
            "is required for a postgres target",
        );
    }
    let users = fields.strings("users", errors).unwrap_or_default();
    let alternating =
        fields.table.get("strategy").and_then(toml::Value::as_str) == Some("alternating");
    if alternating && (users.len() != 2 || users[0] == users[1]) {
        errors.push(
            fields.path_of("users"),
            "strategy \"alternating\" needs two different logins: users = [\"app_a\", \"app_b\"]",
        );
    } else if !alternating && !users.is_empty() {
        errors.push(
            fields.path_of("users"),
            "is only used with strategy = \"alternating\"",
        );
    }
    let user = if alternating && !fields.table.contains_key("user") {
        users.first().cloned()
    } else if kind == Some(BackendKind::Redis) {
        Some(
            fields
                .string("user", errors)
                .unwrap_or_else(|| REDIS_DEFAULT_USER.to_string()),
        )
    } else {
        fields.required_string("user", errors)
    };
    let admin = match fields.table("admin", errors) {
        Some(admin) => {
            let user = admin.required_string("user", errors);
            let password = parse_reference(&admin, "password", base, errors);
            admin.finish(errors);
            user.zip(password.map(Some))
        }
        // users_xml mode writes a file and logs in as the user itself: no admin to speak of.
        None if kind == Some(BackendKind::ClickHouse)
            && fields.table.get("mode").and_then(toml::Value::as_str) == Some("users_xml") =>
        {
            Some((String::new(), None))
        }
        None => {
            if !fields.table.contains_key("admin") {
                errors.push(
                    fields.path_of("admin"),
                    "is required: { user = \"...\", password = \"env:...\" }",
                );
            }
            None
        }
    };
    let strategy = match fields.string("strategy", errors).as_deref() {
        None | Some("single") => Some(Strategy::Single),
        Some("dual") if kind != Some(BackendKind::Postgres) => Some(Strategy::Dual),
        Some("alternating")
            if matches!(kind, Some(BackendKind::Postgres | BackendKind::ClickHouse)) =>
        {
            Some(Strategy::Alternating)
        }
        Some(other @ ("dual" | "alternating")) => {
            errors.push(
                fields.path_of("strategy"),
                format!(
                    "{other:?} is not available for this kind (postgres: single, alternating; redis: single, dual; clickhouse: single, dual, alternating)"
                ),
            );
            None
        }
        Some(other) => {
            errors.push(
                fields.path_of("strategy"),
                format!("{other:?} is not one of single, dual, alternating"),
            );
            None
        }
    };
    let schedule = fields.string("schedule", errors).and_then(|text| {
        crate::schedule::Schedule::parse(&text)
            .map_err(|message| errors.push(fields.path_of("schedule"), message))
            .ok()
    });
    let window = fields.duration("window", DEFAULT_WINDOW, errors);
    let jitter = fields.duration("jitter", Duration::ZERO, errors);
    let max_age = fields.duration("max_age", default_max_age(schedule.as_ref()), errors);
    let consumers = fields.strings("consumers", errors).unwrap_or_default();
    for (j, name) in consumers.iter().enumerate() {
        if !known_consumers.contains(&name.as_str()) {
            errors.push(
                format!("{}[{j}]", fields.path_of("consumers")),
                format!("no [[consumer]] is named {name:?}"),
            );
        }
    }
    let password = match fields.table("password", errors) {
        Some(section) => {
            let policy = parse_policy(&section, defaults, errors);
            section.finish(errors);
            policy
        }
        None => defaults.clone(),
    };
    let sslmode = match fields.string("sslmode", errors).as_deref() {
        None | Some("prefer") => Some(SslMode::Prefer),
        Some("disable") => Some(SslMode::Disable),
        Some("require") => Some(SslMode::Require),
        Some("verify-ca") => Some(SslMode::VerifyCa),
        Some("verify-full") => Some(SslMode::VerifyFull),
        Some(other) => {
            errors.push(
                fields.path_of("sslmode"),
                format!("{other:?} is not one of disable, prefer, require, verify-ca, verify-full"),
            );
            None
        }
    };
    let ca_file = fields.string("ca_file", errors).map(|p| base.join(p));
    let redis_only = |key: &str, errors: &mut Errors| {
        if kind.is_some_and(|k| k != BackendKind::Redis) && fields.table.contains_key(key) {
            errors.push(
                fields.path_of(key),
                format!(
                    "is only used by redis targets, not {}",
                    kind.map_or("", |k| k.as_str())
                ),
            );
        }
    };
    redis_only("replicas", errors);
    redis_only("sentinel", errors);
    if fields.table.contains_key("sentinel") && fields.table.contains_key("replicas") {
        errors.push(
            fields.path_of("replicas"),
            "is found through the sentinel: list replicas or give a sentinel, not both",
        );
    }
    if kind == Some(BackendKind::Postgres) && fields.table.contains_key("tls") {
        errors.push(
            fields.path_of("tls"),
            "is not used by postgres targets: use sslmode",
        );
    }
    let clickhouse = parse_clickhouse_mode(fields, kind, base, errors);
    if let (Some(Strategy::Dual), Some(ClickHouseMode::UsersXml { .. })) = (strategy, &clickhouse) {
        errors.push(
            fields.path_of("strategy"),
            "\"dual\" needs mode = \"sql\": users.xml holds one password per user",
        );
    }
    let replicas = fields.strings("replicas", errors).unwrap_or_default();
    for (j, replica) in replicas.iter().enumerate() {
        if !is_host_port(replica) {
            errors.push(
                format!("{}[{j}]", fields.path_of("replicas")),
                format!("{replica:?} is not HOST:PORT"),
            );
        }
    }
    let tls = fields.boolean("tls", errors).unwrap_or(false);
    let sync: Vec<SyncConfig> = fields
        .tables("sync", "sync", errors)
        .iter()
        .filter_map(|entry| {
            let parsed = parse_sync(entry, errors);
            entry.finish(errors);
            parsed
        })
        .collect();
    let sync_timeout = fields.duration("sync_timeout", DEFAULT_SYNC_TIMEOUT, errors);
    let confirm_timeout = fields.duration("confirm_timeout", DEFAULT_CONFIRM_TIMEOUT, errors);
    let store_fields = fields.tables("store", "store", errors);
    if store_fields.is_empty() && !fields.table.contains_key("store") {
        errors.push(
            fields.path_of("store"),
            "at least one [[target.store]] is required",
        );
    }
    // Exact capacity (a filtered collect grows to 4): configs hold thousands of targets.
    let mut stores: Vec<StoreConfig> = Vec::with_capacity(store_fields.len());
    stores.extend(store_fields.iter().filter_map(|store| {
        let at = At {
            path: &store.path,
            base,
        };
        parse_store(store.table.clone(), &at, errors)
    }));
    if stores.len() != store_fields.len() {
        return None;
    }
    if alternating {
        // The consumer must learn which login to use: the stored value has to name the user.
        for (store, fields) in stores.iter().zip(&store_fields) {
            let names_user = match &store.format {
                Format::Url => true,
                Format::Template(template) => template.contains("{user}"),
                Format::Password => false,
            };
            if !names_user {
                errors.push(
                    fields.path_of("format"),
                    "with strategy = \"alternating\" every store must name the user: format url, or a template with {user}",
                );
            }
        }
    }
    if let Some(user) = &user {
        let logins: Vec<&str> = std::iter::once(user.as_str())
            .chain(users.iter().map(String::as_str))
            .collect();
        let target_sets_alphabet = fields
            .table
            .get("password")
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.contains_key("alphabet"));
        let alphabet_path = if target_sets_alphabet {
            fields.path_of("password.alphabet")
        } else {
            "password.alphabet".to_string()
        };
        for (store, fields) in stores.iter().zip(&store_fields) {
            let writes = crate::store::Writes {
                policy: &password,
                logins: &logins,
                format: &store.format,
                alphabet_path: &alphabet_path,
            };
            let at = At {
                path: &fields.path,
                base,
            };
            store.kind.settings().check_writes(&writes, &at, errors);
        }
    }
    let (admin_user, admin_password) = admin?;
    Some(Target {
        name: name?,
        kind: kind?,
        address: address?,
        database,
        user: user?,
        users,
        admin_user,
        admin_password,
        strategy: strategy?,
        schedule,
        window,
        jitter,
        max_age,
        consumers,
        stores,
        password,
        sslmode: sslmode?,
        ca_file,
        replicas,
        sentinel,
        tls,
        clickhouse: clickhouse?,
        sync,
        sync_timeout,
        confirm_timeout,
    })
}

fn parse_clickhouse_mode(
    fields: &Fields,
    kind: Option<BackendKind>,
    base: &Path,
    errors: &mut Errors,
) -> Option<ClickHouseMode> {
    let keys = ["mode", "users_xml", "on_cluster"];
    if kind != Some(BackendKind::ClickHouse) {
        for key in keys.into_iter().filter(|k| fields.table.contains_key(*k)) {
            fields.get(key);
            errors.push(fields.path_of(key), "is only used by clickhouse targets");
        }
        return Some(ClickHouseMode::Sql { on_cluster: None });
    }
    let on_cluster = fields.string("on_cluster", errors);
    let users_xml = fields.table("users_xml", errors).and_then(|section| {
        let path = section.required_string("path", errors);
        section.finish(errors);
        path.map(|p| base.join(p))
    });
    match fields.string("mode", errors).as_deref() {
        None | Some("sql") => {
            if users_xml.is_some() {
                errors.push(
                    fields.path_of("users_xml"),
                    "is only used with mode = \"users_xml\"",
                );
            }
            Some(ClickHouseMode::Sql { on_cluster })
        }
        Some("users_xml") => {
            if on_cluster.is_some() {
                errors.push(
                    fields.path_of("on_cluster"),
                    "is only used with mode = \"sql\"",
                );
            }
            match users_xml {
                Some(path) => Some(ClickHouseMode::UsersXml { path }),
                None => {
                    if !fields.table.contains_key("users_xml") {
                        errors.push(
                            fields.path_of("users_xml"),
                            "is required with mode = \"users_xml\": { path = \"/etc/clickhouse-server/users.d/llmtrace.xml\" }",
                        );
                    }
                    None
                }
            }
        }
        Some(other) => {
            errors.push(
                fields.path_of("mode"),
                format!("{other:?} is not one of sql, users_xml"),
            );
            None
        }
    }
}

fn is_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

/// The keys every store has; the rest belong to its kind.
#[derive(Deserialize)]
struct StoreKeys {
    #[serde(default)]
    kind: String,
    format: Option<String>,
    template: Option<String>,
}

fn parse_store(table: toml::Table, at: &At, errors: &mut Errors) -> Option<StoreConfig> {
    let (keys, rest) = read_part::<StoreKeys>(table, at, errors);
    let (keys, _) = keys?;
    let format = format_of(keys.format.as_deref(), keys.template, at, errors);
    let kind = StoreKind::read(&keys.kind, rest, at, errors);
    Some(StoreConfig {
        kind: kind?,
        format: format?,
    })
}

/// `format` (and `template`) of a store or a sync entry; `url` when absent.
fn format_of(
    format: Option<&str>,
    template: Option<String>,
    at: &At,
    errors: &mut Errors,
) -> Option<Format> {
    let is_template = format == Some("template");
    if !is_template && template.is_some() {
        errors.push(at.of("template"), "is only used with format = \"template\"");
    }
    match format {
        None | Some("url") => Some(Format::Url),
        Some("password") => Some(Format::Password),
        Some("template") => match template {
            Some(template) if template.contains("{password}") => Some(Format::Template(template)),
            Some(_) => {
                errors.push(at.of("template"), "must contain {password}");
                None
            }
            None => {
                errors.missing(at.of("template"), "is required");
                None
            }
        },
        Some(other) => {
            errors.push(
                at.of("format"),
                format!("{other:?} is not one of url, password, template"),
            );
            None
        }
    }
}

/// `format` (and `template`) of a sync entry; `url` when absent.
fn parse_format(fields: &Fields, errors: &mut Errors) -> Option<Format> {
    let format = fields.string("format", errors);
    let template = fields.string("template", errors);
    let at = At {
        path: &fields.path,
        base: Path::new(""),
    };
    format_of(format.as_deref(), template, &at, errors)
}

fn parse_sync(fields: &Fields, errors: &mut Errors) -> Option<SyncConfig> {
    let namespace = fields.required_string("namespace", errors);
    let external_secret = fields.required_string("external_secret", errors);
    let secret = fields.required_string("secret", errors);
    // Without the key the wait could not tell a synced Secret from a stale one.
    let key = fields.required_string("key", errors);
    let format = parse_format(fields, errors);
    Some(SyncConfig {
        namespace: namespace?,
        external_secret: external_secret?,
        secret: secret?,
        key: key?,
        format: format?,
    })
}

/// The keys every consumer has; the rest belong to its kind.
#[derive(Deserialize)]
struct ConsumerKeys {
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: String,
    #[serde(default = "default_consumer_timeout", deserialize_with = "duration")]
    timeout: Duration,
    health: Option<String>,
}

fn default_consumer_timeout() -> Duration {
    DEFAULT_CONSUMER_TIMEOUT
}

fn parse_consumer(table: toml::Table, at: &At, errors: &mut Errors) -> Option<ConsumerConfig> {
    let (keys, rest) = read_part::<ConsumerKeys>(table, at, errors);
    let (keys, typed) = keys?;
    errors.require(&keys.name, at, "name");
    let kind = ConsumerKind::read(&keys.kind, rest, at, errors);
    if keys.timeout.is_zero() {
        errors.push(at.of("timeout"), "must be more than zero");
    }
    if let Some(health) = &keys.health {
        let ok = url::Url::parse(health).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if !ok {
            errors.push(at.of("health"), format!("{health:?} is not an http(s) URL"));
        }
    }
    if !typed || keys.name.is_empty() || keys.timeout.is_zero() {
        return None;
    }
    Some(ConsumerConfig {
        name: keys.name,
        kind: kind?,
        timeout: keys.timeout,
        health: keys.health,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
[rotator]
journal = "sqlite://rotator.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"

[password]
length = 40

[[target]]
name = "postgres"
kind = "postgres"
address = "127.0.0.1:5432"
database = "llmtrace"
user = "llmtrace"
admin = { user = "postgres", password = "k8s:llmtrace/llmtrace-postgresql#postgres-password" }
consumers = ["proxy"]

  [[target.store]]
  kind = "kubernetes"
  namespace = "llmtrace"
  secret = "llmtrace"
  key = "LLMTRACE_POSTGRES_URL"

  [[target.store]]
  kind = "file"
  path = ".env"
  key = "PGPASSWORD"
  format = "password"

[[consumer]]
name = "proxy"
kind = "deployment"
namespace = "llmtrace"
object = "llmtrace"
timeout = "2m"
"#;

    fn errors_of(text: &str) -> Vec<String> {
        match Config::parse(text, Path::new("/etc/rotator")) {
            Err(ConfigError::Invalid { errors, .. }) => {
                errors.iter().map(|e| e.to_string()).collect()
            }
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_design_example() {
        let config = Config::parse(VALID, Path::new("/etc/rotator")).unwrap();
        let target = &config.targets[0];
        assert_eq!(target.password.length, 40);
        assert_eq!(target.stores.len(), 2);
        assert_eq!(
            target.stores[1].kind,
            StoreKind::File(crate::store::file::FileConfig {
                path: "/etc/rotator/.env".into(),
                key: "PGPASSWORD".into(),
            })
        );
        assert_eq!(target.stores[0].format, Format::Url);
        assert_eq!(config.consumers[0].timeout, Duration::from_secs(120));
        assert_eq!(target.max_age, DEFAULT_MAX_AGE_UNSCHEDULED);
        let weekly = Config::parse(
            &VALID.replace(
                "consumers = [\"proxy\"]",
                "consumers = [\"proxy\"]\nschedule = \"0 3 * * SUN\"",
            ),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(weekly.targets[0].max_age, Duration::from_secs(15 * 86400));
        assert!(config.uses_kubernetes());
        match &config.rotator.journal {
            JournalLocation::Url(url) => {
                assert_eq!(url.expose(), "sqlite:///etc/rotator/rotator.db")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reports_every_bad_field_by_path() {
        let text = VALID
            .replace("format = \"password\"", "format = \"pasword\"")
            .replace("address = \"127.0.0.1:5432\"", "address = \"localhost\"")
            .replace("timeout = \"2m\"", "timeout = \"2 minutes\"")
            .replace(
                "consumers = [\"proxy\"]",
                "consumers = [\"proxy\", \"worker\"]\nstratgy = \"single\"",
            );
        let errors = errors_of(&text);
        let paths: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "consumer[0].timeout",
                "target[0].address",
                "target[0].consumers[1]",
                "target[0].store[1].format",
                "target[0].stratgy",
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn rejects_unknown_reference_schemes_naming_the_field() {
        let text = VALID.replace(
            "k8s:llmtrace/llmtrace-postgresql#postgres-password",
            "s3://bucket/key",
        );
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("target[0].admin.password: unknown reference scheme"),
            "{errors:?}"
        );
    }

    #[test]
    fn syntax_errors_show_position_but_not_the_line() {
        let text = "[rotator]\njournal_key = \"literal:TopSecret1\ntrailing";
        let err = Config::parse(text, Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("TopSecret1"), "{err}");
    }

    #[test]
    fn literal_references_do_not_print_their_value() {
        let reference = Reference::parse("literal:hunter2", Path::new(".")).unwrap();
        assert_eq!(
            format!("{reference:?} {reference}"),
            "literal:*** literal:***"
        );
    }

    #[test]
    fn parses_kubernetes_references() {
        let reference =
            Reference::parse("k8s:llmtrace/pg#postgres-password", Path::new(".")).unwrap();
        assert_eq!(
            reference,
            Reference::Kubernetes {
                namespace: "llmtrace".into(),
                secret: "pg".into(),
                key: "postgres-password".into()
            }
        );
        assert!(Reference::parse("k8s:llmtrace/pg", Path::new(".")).is_err());
    }

    const REDIS: &str = r#"
[rotator]
journal = "sqlite://rotator.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"

[[target]]
name = "redis"
kind = "redis"
address = "llmtrace-redis-master:6379"
admin = { user = "admin", password = "env:REDIS_ADMIN_PASSWORD" }
strategy = "dual"
replicas = ["llmtrace-redis-replicas-0:6379"]
tls = true

  [[target.store]]
  kind = "file"
  path = ".env"
  key = "LLMTRACE_REDIS_URL"
"#;

    #[test]
    fn parses_a_redis_target_with_the_default_user() {
        let config = Config::parse(REDIS, Path::new("/etc/rotator")).unwrap();
        let target = &config.targets[0];
        assert_eq!(target.kind, BackendKind::Redis);
        assert_eq!(target.user, "default");
        assert_eq!(target.strategy, Strategy::Dual);
        assert!(target.strategy.keeps_old_until_retire());
        assert_eq!(target.replicas, ["llmtrace-redis-replicas-0:6379"]);
        assert!(target.tls);
    }

    #[test]
    fn a_redis_sentinel_replaces_address_and_replicas() {
        let text = REDIS
            .replace("address = \"llmtrace-redis-master:6379\"\n", "")
            .replace(
                "replicas = [\"llmtrace-redis-replicas-0:6379\"]",
                "sentinel = { address = \"llmtrace-redis:26379\", master_name = \"mymaster\" }",
            );
        let config = Config::parse(&text, Path::new("/")).unwrap();
        let target = &config.targets[0];
        assert_eq!(
            target.sentinel,
            Some(Sentinel {
                address: "llmtrace-redis:26379".into(),
                master_name: "mymaster".into()
            })
        );
        assert_eq!(target.address, "llmtrace-redis:26379");
        assert!(target.replicas.is_empty());
        let both = REDIS.replace(
            "tls = true",
            "tls = true\nsentinel = { address = \"s\", master_name = \"m\" }",
        );
        let mut errors = errors_of(&both);
        errors.sort();
        assert_eq!(
            errors,
            [
                "target[0].replicas: is found through the sentinel: list replicas or give a sentinel, not both",
                "target[0].sentinel.address: \"s\" is not HOST:PORT",
            ]
        );
    }

    #[test]
    fn dual_and_redis_keys_are_refused_for_postgres() {
        let text = VALID.replace(
            "consumers = [\"proxy\"]",
            "consumers = [\"proxy\"]\nstrategy = \"dual\"\nreplicas = [\"a:1\"]",
        );
        let mut errors = errors_of(&text);
        errors.sort();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("target[0].replicas: is only used by redis"));
        assert!(
            errors[1].starts_with("target[0].strategy: \"dual\" is not available for this kind")
        );
    }

    #[test]
    fn bad_replica_addresses_are_reported_by_index() {
        let errors = errors_of(&REDIS.replace("replicas-0:6379", "replicas-0"));
        assert_eq!(
            errors,
            ["target[0].replicas[0]: \"llmtrace-redis-replicas-0\" is not HOST:PORT"]
        );
    }

    const CLICKHOUSE: &str = r#"
[rotator]
journal = "sqlite://rotator.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"

[[target]]
name = "clickhouse"
kind = "clickhouse"
address = "127.0.0.1:8123"
user = "llmtrace"
mode = "users_xml"
users_xml = { path = "users.d/llmtrace.xml" }

  [[target.store]]
  kind = "file"
  path = ".env"
  key = "LLMTRACE_CLICKHOUSE_URL"
"#;

    #[test]
    fn parses_a_clickhouse_users_xml_target_without_admin() {
        let config = Config::parse(CLICKHOUSE, Path::new("/etc/rotator")).unwrap();
        let target = &config.targets[0];
        assert_eq!(target.kind, BackendKind::ClickHouse);
        assert!(target.admin_password.is_none());
        assert_eq!(
            target.clickhouse,
            ClickHouseMode::UsersXml {
                path: "/etc/rotator/users.d/llmtrace.xml".into()
            }
        );
    }

    #[test]
    fn clickhouse_sql_mode_needs_an_admin_and_takes_on_cluster() {
        let sql = CLICKHOUSE
            .replace(
                "mode = \"users_xml\"\n",
                "on_cluster = \"main\"\nstrategy = \"dual\"\n",
            )
            .replace("users_xml = { path = \"users.d/llmtrace.xml\" }\n", "");
        let mut errors = errors_of(&sql);
        assert_eq!(
            errors,
            ["target[0].admin: is required: { user = \"...\", password = \"env:...\" }"]
        );
        let sql = sql.replace(
            "on_cluster",
            "admin = { user = \"admin\", password = \"env:CH\" }\non_cluster",
        );
        let config = Config::parse(&sql, Path::new(".")).unwrap();
        assert_eq!(
            config.targets[0].clickhouse,
            ClickHouseMode::Sql {
                on_cluster: Some("main".into())
            }
        );
        errors = errors_of(&CLICKHOUSE.replace(
            "user = \"llmtrace\"",
            "user = \"llmtrace\"\nstrategy = \"dual\"",
        ));
        assert_eq!(
            errors,
            ["target[0].strategy: \"dual\" needs mode = \"sql\": users.xml holds one password per user"]
        );
    }

    #[test]
    fn alternating_needs_two_logins_and_stores_that_name_the_user() {
        let text = VALID.replace(
            "user = \"llmtrace\"\n",
            "strategy = \"alternating\"\nusers = [\"app_a\"]\n",
        );
        let errors = errors_of(&text);
        assert!(
            errors.iter().any(|e| e.starts_with(
                "target[0].users: strategy \"alternating\" needs two different logins"
            )),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.starts_with("target[0].store[1].format: with strategy = \"alternating\" every store must name the user")), "{errors:?}");
        let ok = VALID
            .replace(
                "user = \"llmtrace\"\n",
                "strategy = \"alternating\"\nusers = [\"app_a\", \"app_b\"]\n",
            )
            .replace(
                "format = \"password\"",
                "format = \"template\"\n  template = \"{user}:{password}\"",
            );
        let config = Config::parse(&ok, Path::new("/")).unwrap();
        assert_eq!(config.targets[0].logins(), ["app_a", "app_b"]);
        let redis = VALID
            .replace("kind = \"postgres\"", "kind = \"redis\"")
            .replace(
                "consumers = [\"proxy\"]",
                "consumers = [\"proxy\"]\nstrategy = \"alternating\"",
            );
        assert!(errors_of(&redis)
            .iter()
            .any(|e| e.contains("\"alternating\" is not available for this kind")));
        let clickhouse_sql = CLICKHOUSE
            .replace(
                "user = \"llmtrace\"\n",
                "strategy = \"alternating\"\nusers = [\"a\", \"b\"]\n",
            )
            .replace(
                "mode = \"users_xml\"\n",
                "admin = { user = \"default\", password = \"env:CH\" }\n",
            )
            .replace("users_xml = { path = \"users.d/llmtrace.xml\" }\n", "");
        let config = Config::parse(&clickhouse_sql, Path::new("/")).unwrap();
        assert_eq!(config.targets[0].strategy, Strategy::Alternating);
        let clickhouse_xml = CLICKHOUSE.replace(
            "user = \"llmtrace\"\n",
            "strategy = \"alternating\"\nusers = [\"a\", \"b\"]\n",
        );
        let config = Config::parse(&clickhouse_xml, Path::new("/")).unwrap();
        assert_eq!(config.targets[0].strategy, Strategy::Alternating);
    }

    #[test]
    fn password_length_is_bounded() {
        let errors = errors_of(&VALID.replace("length = 40", "length = 8"));
        assert_eq!(errors, ["password.length: 8 is out of range 16..=128"]);
    }

    const UPSTREAM: &str = r#"
[rotator]
journal = "sqlite://rotator.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"

[[target]]
name = "postgres"
kind = "postgres"
address = "127.0.0.1:5432"
database = "llmtrace"
user = "llmtrace"
admin = { user = "postgres", password = "env:PG_ADMIN" }
sync = [{ namespace = "llmtrace", external_secret = "llmtrace", secret = "llmtrace", key = "LLMTRACE_POSTGRES_URL" }]
sync_timeout = "30s"

  [[target.store]]
  kind = "sealedsecret"
  namespace = "llmtrace"
  name = "llmtrace-postgresql"
  key = "password"
  format = "password"
  certificate = "cert.pem"
  timeout = "20s"
"#;

    #[test]
    fn parses_sync_entries_and_sealed_secret_stores() {
        let config = Config::parse(UPSTREAM, Path::new("/etc/rotator")).unwrap();
        let target = &config.targets[0];
        assert_eq!(target.sync.len(), 1);
        assert_eq!(target.sync[0].external_secret, "llmtrace");
        assert_eq!(target.sync[0].key, "LLMTRACE_POSTGRES_URL");
        assert_eq!(target.sync[0].format, Format::Url);
        assert_eq!(target.sync_timeout, Duration::from_secs(30));
        assert_eq!(
            target.stores[0].kind,
            StoreKind::SealedSecret(crate::store::sealedsecret::SealedSecretConfig {
                namespace: "llmtrace".into(),
                name: "llmtrace-postgresql".into(),
                key: "password".into(),
                certificate: Some("/etc/rotator/cert.pem".into()),
                certificate_url: None,
                certificate_sha256: None,
                timeout: Duration::from_secs(20),
            })
        );
        assert!(config.uses_kubernetes());
        let defaults = Config::parse(
            &UPSTREAM
                .replace("sync_timeout = \"30s\"\n", "")
                .replace("  timeout = \"20s\"\n", ""),
            Path::new("/etc/rotator"),
        )
        .unwrap();
        assert_eq!(defaults.targets[0].sync_timeout, DEFAULT_SYNC_TIMEOUT);
        assert!(matches!(
            &defaults.targets[0].stores[0].kind,
            StoreKind::SealedSecret(s) if s.timeout == crate::store::sealedsecret::DEFAULT_TIMEOUT
        ));
    }

    #[test]
    fn sync_and_sealed_secret_errors_name_the_field() {
        let text = UPSTREAM
            .replace(", key = \"LLMTRACE_POSTGRES_URL\"", ", formt = \"url\"")
            .replace("sync_timeout = \"30s\"", "sync_timeout = \"soon\"")
            .replace("  certificate = \"cert.pem\"\n", "")
            .replace("name = \"llmtrace-postgresql\"", "name = \"\"");
        let errors = errors_of(&text);
        let paths: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "target[0].store[0].name",
                "target[0].sync[0].key",
                "target[0].sync[0].formt",
                "target[0].sync_timeout",
                "target[0].store[0].certificate",
            ],
            "{errors:#?}"
        );
        let pinned = UPSTREAM.replace(
            "certificate = \"cert.pem\"",
            &format!(
                "certificate = \"cert.pem\"\n  certificate_sha256 = \"{}\"",
                ["AB"; 32].join(":")
            ),
        );
        assert!(matches!(
            &Config::parse(&pinned, Path::new("/etc/rotator")).unwrap().targets[0].stores[0].kind,
            StoreKind::SealedSecret(s) if s.certificate_sha256.as_deref() == Some("ab".repeat(32).as_str())
        ));
        let bad_pin = UPSTREAM.replace(
            "certificate = \"cert.pem\"",
            "certificate = \"cert.pem\"\n  certificate_sha256 = \"abc\"",
        );
        assert_eq!(
            errors_of(&bad_pin),
            ["target[0].store[0].certificate_sha256: is not a SHA-256 fingerprint (64 hex digits, colons allowed: openssl x509 -noout -fingerprint -sha256 -in cert.pem)"]
        );
        let both = UPSTREAM.replace(
            "certificate = \"cert.pem\"",
            "certificate = \"cert.pem\"\n  certificate_url = \"ftp://x\"",
        );
        assert_eq!(
            errors_of(&both),
            ["target[0].store[0].certificate: give either certificate or certificate_url, not both"]
        );
        let url = UPSTREAM.replace(
            "certificate = \"cert.pem\"",
            "certificate_url = \"ftp://x\"",
        );
        assert!(errors_of(&url)[0].starts_with("target[0].store[0].certificate_url: "));
    }

    #[test]
    fn command_env_names_are_checked_and_only_for_commands() {
        let command = VALID.replace(
            "kind = \"deployment\"\nnamespace = \"llmtrace\"\nobject = \"llmtrace\"",
            "kind = \"command\"\ncommand = [\"true\"]\nenv = [\"DOCKER_HOST\", \"BAD-NAME\", \"1X\"]",
        );
        let errors = errors_of(&command);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].starts_with("consumer[0].env[1]: \"BAD-NAME\""),
            "{errors:#?}"
        );
        assert!(
            errors[1].starts_with("consumer[0].env[2]: \"1X\""),
            "{errors:#?}"
        );
        let config = Config::parse(
            &command.replace(", \"BAD-NAME\", \"1X\"", ""),
            Path::new("/etc/rotator"),
        )
        .unwrap();
        assert_eq!(
            config.consumers[0].kind,
            ConsumerKind::Command(crate::consumer::command::CommandConfig {
                command: Some(vec!["true".into()]),
                env: vec!["DOCKER_HOST".into()],
            })
        );
        let deployment = VALID.replace("timeout = \"2m\"", "timeout = \"2m\"\nenv = [\"X\"]");
        assert_eq!(errors_of(&deployment), ["consumer[0].env: unknown key"]);
    }
}

//! The TOML configuration: schema, validation and credential references.
//!
//! Every bad field is reported at once, by its path (`target[1].store[0].key`), before anything
//! is touched. Each backend, store and consumer kind owns its settings (a serde struct in its own
//! file that validates itself); this module keeps the root, the keys every target, store and
//! consumer shares, credential references, and one table of kinds per trait ([`BackendConfig`],
//! [`StoreKind`], [`ConsumerKind`]). How tables are read is in `read.rs`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[macro_use]
mod read;

use crate::password::{Alphabet, PasswordPolicy};
use crate::secret::Secret;
use read::{
    drop_empty_strings, join, keys_of, optional_duration, parse_with, read_part, take_table,
    take_tables, unknown_keys,
};
pub use read::{duration, parsed, present, text, At, Errors, Validate};

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
    /// verify logs in with the stored credential again when verify-backend's login with that
    /// same credential is at least this old (0: always).
    pub verify_relogin_after: Duration,
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
/// verify always logs in again: a password changed behind the run's back while the consumer
/// restarted is caught and rolled back. Fleets may trade that for one login fewer per target.
pub const DEFAULT_VERIFY_RELOGIN_AFTER: Duration = Duration::ZERO;
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

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(text: &str) -> Result<Strategy, String> {
        match text {
            "single" => Ok(Strategy::Single),
            "dual" => Ok(Strategy::Dual),
            "alternating" => Ok(Strategy::Alternating),
            other => Err(format!("{other:?} is not one of single, dual, alternating")),
        }
    }
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

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// `HOST:PORT` (for a Redis Sentinel target, the Sentinel's).
    pub address: String,
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
    /// ExternalSecrets to force-sync after the upstream stores are written.
    pub sync: Vec<SyncConfig>,
    pub sync_timeout: Duration,
    /// How long `confirm` waits for the sessions on the old credential to end; zero: no wait.
    pub confirm_timeout: Duration,
    /// The backend kind's own settings.
    pub backend: BackendConfig,
}

impl Target {
    /// The backend kind, as config spells it.
    pub fn kind(&self) -> &'static str {
        self.backend.name()
    }

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

kinds! {
    /// The server whose password a target rotates: one line per backend kind.
    BackendConfig: crate::backend::BackendSettings, only_used_by "targets" {
        "postgres" => Postgres(crate::backend::postgres::PostgresConfig),
        "redis" => Redis(crate::backend::redis::RedisConfig),
        "clickhouse" => ClickHouse(crate::backend::clickhouse::ClickHouseConfig),
    }
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

/// Why a credential reference is refused. Never quotes a `literal:` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "expected a reference: env:NAME, file:PATH, k8s:NAMESPACE/SECRET#KEY or literal:VALUE"
    )]
    NotAReference,
    #[error("k8s reference {0:?} must look like k8s:NAMESPACE/SECRET#KEY")]
    Kubernetes(String),
    #[error(
        "vault: references are not supported by this build yet; use env:, file:, k8s: or literal:"
    )]
    Vault,
    /// The text before `:` is not repeated: it is often a password written without `literal:`.
    #[error("unknown reference scheme (the text before the first ':'): use env:NAME, file:PATH, k8s:NAMESPACE/SECRET#KEY or literal:VALUE")]
    UnknownScheme,
}

/// Config collects every field's problem as text, reported together.
impl From<ReferenceError> for String {
    fn from(error: ReferenceError) -> String {
        error.to_string()
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;

    /// A relative `file:` path stays relative until [`Reference::resolve`].
    fn from_str(text: &str) -> Result<Reference, ReferenceError> {
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
    pub fn parse(text: &str, base: &Path) -> Result<Reference, ReferenceError> {
        let (scheme, rest) = text.split_once(':').ok_or(ReferenceError::NotAReference)?;
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
                    _ => Err(ReferenceError::Kubernetes(text.to_string())),
                }
            }
            "literal" => Ok(Reference::Literal(Secret::new(rest))),
            "vault" => Err(ReferenceError::Vault),
            _ => Err(ReferenceError::UnknownScheme),
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
        let config = parse_root(root, base, &mut errors);
        match config {
            Some(config) if errors.0.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                path: PathBuf::new(),
                errors: errors.sorted(),
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

impl Format {
    /// Whether a stored value says which login it is for.
    fn names_user(&self) -> bool {
        match self {
            Format::Url => true,
            Format::Template(template) => template.contains("{user}"),
            Format::Password => false,
        }
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

fn parse_root(mut root: toml::Table, base: &Path, errors: &mut Errors) -> Option<Config> {
    let at = At { path: "", base };
    let rotator = match take_table(&mut root, "rotator", &at, errors) {
        Some(section) => parse_rotator(
            section,
            &At {
                path: "rotator",
                base,
            },
            errors,
        ),
        None => {
            errors.missing("rotator".into(), "is required (journal and journal_key)");
            None
        }
    };
    let defaults = match take_table(&mut root, "password", &at, errors) {
        Some(section) => parse_policy(section, &PasswordPolicy::default(), "password", errors),
        None => PasswordPolicy::default(),
    };

    let consumer_tables = take_tables(&mut root, "consumer", &at, errors);
    // Names count even for consumers with other errors, so references to them are not reported twice.
    let consumer_names: Vec<String> = consumer_tables
        .iter()
        .filter_map(|(_, t)| t.get("name")?.as_str().map(String::from))
        .collect();
    let mut consumers = Vec::with_capacity(consumer_tables.len());
    let mut consumer_paths = Vec::with_capacity(consumer_tables.len());
    for (path, table) in consumer_tables {
        if let Some(consumer) = parse_consumer(table, &At { path: &path, base }, errors) {
            consumers.push(consumer);
            consumer_paths.push(path);
        }
    }

    let has_targets = root.contains_key("target");
    let target_tables = take_tables(&mut root, "target", &at, errors);
    if target_tables.is_empty() && !has_targets {
        errors.push("target", "at least one [[target]] is required");
    }
    // Exact capacity: configs hold thousands of targets, and a filtered collect over-allocates.
    let mut targets = Vec::with_capacity(target_tables.len());
    let mut target_paths = Vec::with_capacity(target_tables.len());
    for (path, table) in target_tables {
        let at = At { path: &path, base };
        if let Some(target) = parse_target(table, &at, &defaults, &consumer_names, errors) {
            targets.push(target);
            target_paths.push(path);
        }
    }
    check_names(&targets, &target_paths, &consumers, &consumer_paths, errors);
    unknown_keys(root, &at, errors);
    targets.shrink_to_fit();
    Some(Config {
        rotator: rotator?,
        password: defaults,
        targets,
        consumers,
    })
}

fn check_names(
    targets: &[Target],
    paths: &[String],
    consumers: &[ConsumerConfig],
    consumer_paths: &[String],
    errors: &mut Errors,
) {
    // Consumer references are checked per target, where a target with other errors still gets them.
    let mut seen = HashSet::new();
    for (target, path) in targets.iter().zip(paths) {
        if !seen.insert(&target.name) {
            errors.push(
                join(path, "name"),
                format!("duplicate target name {:?}", target.name),
            );
        }
    }
    // Each target takes its own lock: two targets rotating one login could change its password
    // at once, and each rollback would put back a password the other had replaced.
    let mut rotated = std::collections::HashMap::new();
    for (target, path) in targets.iter().zip(paths) {
        for login in target.logins() {
            let key = (target.kind(), target.address.as_str(), login);
            let earlier = rotated.insert(key, &target.name);
            if let Some(first) = earlier.filter(|first| *first != &target.name) {
                errors.push(
                    join(path, "user"),
                    format!(
                        "login {login:?} on {} {} is rotated by target {first:?} too; rotate each login in one target",
                        target.kind(),
                        target.address
                    ),
                );
            }
        }
    }
    let mut seen = HashSet::new();
    for (consumer, path) in consumers.iter().zip(consumer_paths) {
        if !seen.insert(&consumer.name) {
            errors.push(
                join(path, "name"),
                format!("duplicate consumer name {:?}", consumer.name),
            );
        }
    }
}

/// The `[rotator]` section as written; defaults and checks follow in [`parse_rotator`].
#[derive(Deserialize)]
struct RotatorKeys {
    #[serde(default)]
    journal: String,
    #[serde(default, deserialize_with = "parsed")]
    journal_key: Option<Reference>,
    listen: Option<String>,
    #[serde(default, deserialize_with = "optional_duration")]
    check_interval: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    shutdown_grace: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    recover_interval: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    kubernetes_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    takeover_grace: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    verify_relogin_after: Option<Duration>,
    max_parallel: Option<i64>,
    #[serde(default, deserialize_with = "parsed")]
    api_tokens: Option<Reference>,
}

fn parse_rotator(section: toml::Table, at: &At, errors: &mut Errors) -> Option<RotatorSection> {
    let (keys, rest) = read_part::<RotatorKeys>(section, at, errors);
    let (mut keys, _) = keys?;
    let journal = if keys.journal.is_empty() {
        errors.missing(at.of("journal"), "is required");
        None
    } else if ["sqlite:", "postgres:", "postgresql:"]
        .iter()
        .any(|scheme| keys.journal.starts_with(scheme))
    {
        Some(JournalLocation::Url(Secret::new(resolve_sqlite_path(
            &keys.journal,
            at.base,
        ))))
    } else {
        match keys.journal.parse::<Reference>() {
            Ok(mut reference) => {
                reference.resolve(at);
                Some(JournalLocation::Reference(reference))
            }
            Err(_) => {
                errors.push(
                    at.of("journal"),
                    "must be sqlite://PATH, postgres://... or a reference like env:ROTATOR_JOURNAL_URL",
                );
                None
            }
        }
    };
    zeroize::Zeroize::zeroize(&mut keys.journal);
    if keys.journal_key.is_none() {
        errors.missing(at.of("journal_key"), "is required");
    }
    let listen = keys
        .listen
        .as_deref()
        .unwrap_or(DEFAULT_LISTEN)
        .parse::<std::net::SocketAddr>()
        .map_err(|_| errors.push(at.of("listen"), "is not an address like 0.0.0.0:8080"))
        .ok();
    let kubernetes_timeout = keys
        .kubernetes_timeout
        .unwrap_or(DEFAULT_KUBERNETES_TIMEOUT);
    if kubernetes_timeout.is_zero() {
        errors.push(at.of("kubernetes_timeout"), "must be more than 0s");
    }
    let recover_interval = keys.recover_interval.unwrap_or(DEFAULT_RECOVER_INTERVAL);
    if recover_interval.is_zero() {
        errors.push(
            at.of("recover_interval"),
            "must be more than 0s: runs that need recovery block their targets",
        );
    }
    let max_parallel = match keys.max_parallel {
        None => DEFAULT_MAX_PARALLEL,
        Some(n @ 1..=256) => n as usize,
        Some(_) => {
            errors.push(at.of("max_parallel"), "must be from 1 to 256");
            DEFAULT_MAX_PARALLEL
        }
    };
    let mut references = [keys.journal_key.as_mut(), keys.api_tokens.as_mut()];
    for reference in references.iter_mut().flatten() {
        reference.resolve(at);
    }
    unknown_keys(rest, at, errors);
    Some(RotatorSection {
        journal: journal?,
        journal_key: keys.journal_key?,
        listen: listen?,
        api_tokens: keys.api_tokens,
        check_interval: Some(keys.check_interval.unwrap_or(DEFAULT_CHECK_INTERVAL))
            .filter(|d| !d.is_zero()),
        shutdown_grace: keys.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        recover_interval,
        kubernetes_timeout,
        max_parallel,
        takeover_grace: keys.takeover_grace.unwrap_or(DEFAULT_TAKEOVER_GRACE),
        verify_relogin_after: keys
            .verify_relogin_after
            .unwrap_or(DEFAULT_VERIFY_RELOGIN_AFTER),
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

/// `[password]`, or a target's `password = { ... }`.
#[derive(Deserialize)]
struct PolicyKeys {
    length: Option<i64>,
    alphabet: Option<String>,
}

/// Applies a `[password]` table (at `path`) to `defaults`.
fn parse_policy(
    table: toml::Table,
    defaults: &PasswordPolicy,
    path: &str,
    errors: &mut Errors,
) -> PasswordPolicy {
    let at = At {
        path,
        base: Path::new(""),
    };
    let (keys, rest) = read_part::<PolicyKeys>(table, &at, errors);
    let mut policy = defaults.clone();
    let Some((keys, _)) = keys else {
        return policy;
    };
    if let Some(length) = keys.length {
        match usize::try_from(length) {
            Ok(length) if PasswordPolicy::LENGTHS.contains(&length) => policy.length = length,
            _ => errors.push(
                at.of("length"),
                format!(
                    "{length} is out of range {}..={}",
                    PasswordPolicy::LENGTHS.start(),
                    PasswordPolicy::LENGTHS.end()
                ),
            ),
        }
    }
    if let Some(alphabet) = keys.alphabet {
        match Alphabet::parse(&alphabet) {
            Some(a) => policy.alphabet = a,
            None => errors.push(
                at.of("alphabet"),
                format!("{alphabet:?} is not one of alphanumeric, urlsafe, printable"),
            ),
        }
    }
    unknown_keys(rest, &at, errors);
    policy
}

/// The keys every target has; the rest belong to its backend kind.
#[derive(Deserialize)]
struct TargetKeys {
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: String,
    address: Option<String>,
    user: Option<String>,
    #[serde(default)]
    users: Vec<String>,
    admin: Option<AdminKeys>,
    #[serde(default, deserialize_with = "parsed")]
    strategy: Option<Strategy>,
    #[serde(default, deserialize_with = "parsed")]
    schedule: Option<crate::schedule::Schedule>,
    #[serde(default, deserialize_with = "optional_duration")]
    window: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    jitter: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    max_age: Option<Duration>,
    #[serde(default)]
    consumers: Vec<String>,
    password: Option<toml::Table>,
    #[serde(default, deserialize_with = "optional_duration")]
    sync_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    confirm_timeout: Option<Duration>,
}

/// `admin = { user = "...", password = "env:..." }`.
#[derive(Deserialize)]
struct AdminKeys {
    #[serde(default)]
    user: String,
    #[serde(default, deserialize_with = "parsed")]
    password: Option<Reference>,
}

/// Before each kind had its own keys every target read these PostgreSQL keys; other kinds
/// still accept them, checked as PostgreSQL checks them, and ignore them.
const SHARED_POSTGRES_KEYS: [&str; 2] = ["database", "sslmode"];

fn parse_target(
    mut table: toml::Table,
    at: &At,
    defaults: &PasswordPolicy,
    known_consumers: &[String],
    errors: &mut Errors,
) -> Option<Target> {
    let has_stores = table.contains_key("store");
    let store_tables = take_tables(&mut table, "store", at, errors);
    let sync_tables = take_tables(&mut table, "sync", at, errors);
    let (keys, rest) = read_part::<TargetKeys>(table, at, errors);
    let (mut keys, typed) = keys?;
    check_name(&keys.name, at, errors);
    let backend = read_backend(&keys.kind, rest, at, errors);
    let login = check_login(&mut keys, backend.as_ref(), at, errors);
    for (j, name) in keys.consumers.iter().enumerate() {
        if !known_consumers.contains(name) {
            errors.push(
                format!("{}[{j}]", at.of("consumers")),
                format!("no [[consumer]] is named {name:?}"),
            );
        }
    }
    let alphabet_path = match &keys.password {
        Some(table) if table.contains_key("alphabet") => at.of("password.alphabet"),
        _ => "password.alphabet".to_string(),
    };
    let password = match keys.password.take() {
        Some(table) => parse_policy(table, defaults, &at.of("password"), errors),
        None => defaults.clone(),
    };
    let sync: Vec<SyncConfig> = sync_tables
        .into_iter()
        .filter_map(|(path, table)| {
            let sync_at = At {
                path: &path,
                base: at.base,
            };
            let sync = parse_sync(table, &sync_at, errors)?;
            check_template(&sync.format, &login, &password, &sync_at, errors);
            Some(sync)
        })
        .collect();
    if store_tables.is_empty() && !has_stores {
        errors.push(at.of("store"), "at least one [[target.store]] is required");
    }
    let (stores, store_paths) = parse_stores(store_tables, at.base, errors)?;
    check_stores(
        &stores,
        &store_paths,
        &login,
        &password,
        &alphabet_path,
        at.base,
        errors,
    );
    if !typed {
        return None;
    }
    let (admin_user, admin_password) = login.admin?;
    Some(Target {
        name: Some(keys.name).filter(|n| !n.is_empty())?,
        address: login.address?,
        user: login.user?,
        users: login.users,
        admin_user,
        admin_password,
        strategy: login.strategy,
        max_age: keys
            .max_age
            .unwrap_or_else(|| default_max_age(keys.schedule.as_ref())),
        schedule: keys.schedule,
        window: keys.window.unwrap_or(DEFAULT_WINDOW),
        jitter: keys.jitter.unwrap_or_default(),
        consumers: keys.consumers,
        stores,
        password,
        sync,
        sync_timeout: keys.sync_timeout.unwrap_or(DEFAULT_SYNC_TIMEOUT),
        confirm_timeout: keys.confirm_timeout.unwrap_or(DEFAULT_CONFIRM_TIMEOUT),
        backend: backend?,
    })
}

fn check_name(name: &str, at: &At, errors: &mut Errors) {
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errors.push(
            at.of("name"),
            format!("{name:?} may hold only letters, digits, '-' and '_'"),
        );
    }
    errors.require(name, at, "name");
}

/// The backend kind's own keys: whatever the target's common keys left.
fn read_backend(
    kind: &str,
    mut rest: toml::Table,
    at: &At,
    errors: &mut Errors,
) -> Option<BackendConfig> {
    if !matches!(kind, "" | "postgres") {
        let shared: toml::Table = SHARED_POSTGRES_KEYS
            .iter()
            .filter_map(|key| rest.remove_entry(*key))
            .collect();
        if !shared.is_empty() {
            read_part::<crate::backend::postgres::PostgresConfig>(shared, at, errors);
        }
    }
    BackendConfig::read(kind, rest, at, errors)
}

/// Who logs in where: the target's keys whose rules depend on its backend kind.
struct Login {
    address: Option<String>,
    user: Option<String>,
    users: Vec<String>,
    admin: Option<(String, Option<Reference>)>,
    strategy: Strategy,
}

impl Login {
    /// Every login the target rotates, as read so far: `user`, and an alternating pair.
    fn names(&self) -> Vec<&str> {
        self.user
            .iter()
            .chain(&self.users)
            .map(String::as_str)
            .collect()
    }
}

fn check_login(
    keys: &mut TargetKeys,
    backend: Option<&BackendConfig>,
    at: &At,
    errors: &mut Errors,
) -> Login {
    let settings = backend.map(BackendConfig::settings);
    let address = match (
        keys.address.take(),
        settings.and_then(|s| s.default_address()),
    ) {
        (Some(address), _) => {
            if !is_host_port(&address) {
                errors.push(at.of("address"), not_host_port(&address));
            }
            Some(address)
        }
        (None, Some(address)) => Some(address.to_string()),
        (None, None) => {
            errors.missing(at.of("address"), "is required");
            None
        }
    };

    let alternating = keys.strategy == Some(Strategy::Alternating);
    let users = std::mem::take(&mut keys.users);
    if alternating && (users.len() != 2 || users[0] == users[1]) {
        errors.push(
            at.of("users"),
            "strategy \"alternating\" needs two different logins: users = [\"app_a\", \"app_b\"]",
        );
    } else if !alternating && !users.is_empty() {
        errors.push(
            at.of("users"),
            "is only used with strategy = \"alternating\"",
        );
    }
    let user = match (keys.user.take(), settings.and_then(|s| s.default_user())) {
        (Some(user), _) => Some(user),
        (None, _) if alternating => users.first().cloned(),
        (None, Some(default)) => Some(default.to_string()),
        (None, None) => {
            errors.missing(at.of("user"), "is required");
            None
        }
    };

    let admin = match keys.admin.take() {
        Some(mut admin) => {
            let path = at.of("admin");
            let admin_at = At {
                path: &path,
                base: at.base,
            };
            errors.require(&admin.user, &admin_at, "user");
            match &mut admin.password {
                Some(password) => password.resolve(&admin_at),
                None => errors.missing(admin_at.of("password"), "is required"),
            }
            (!admin.user.is_empty() && admin.password.is_some())
                .then_some((admin.user, admin.password))
        }
        None if settings.is_some_and(|s| !s.needs_admin()) => Some((String::new(), None)),
        None => {
            errors.missing(
                at.of("admin"),
                "is required: { user = \"...\", password = \"env:...\" }",
            );
            None
        }
    };

    let strategy = keys.strategy.unwrap_or(Strategy::Single);
    if let (Some(backend), Some(settings)) = (backend, settings) {
        let available = settings.strategies();
        if !available.contains(&strategy) {
            let names: Vec<&str> = available.iter().map(|s| s.as_str()).collect();
            errors.push(
                at.of("strategy"),
                format!(
                    "{:?} is not available for this kind ({}: {})",
                    strategy.as_str(),
                    backend.name(),
                    names.join(", ")
                ),
            );
        }
        settings.check_strategy(strategy, at, errors);
    }
    Login {
        address,
        user,
        users,
        admin,
        strategy,
    }
}

/// Every `[[target.store]]`, and the path of each; `None` when one of them is unusable.
fn parse_stores(
    tables: Vec<(String, toml::Table)>,
    base: &Path,
    errors: &mut Errors,
) -> Option<(Vec<StoreConfig>, Vec<String>)> {
    // Exact capacity (a filtered or mapped collect may keep a larger buffer): configs hold
    // thousands of targets.
    let mut stores = Vec::with_capacity(tables.len());
    let mut paths = Vec::with_capacity(tables.len());
    for (path, table) in tables {
        if let Some(store) = parse_store(table, &At { path: &path, base }, errors) {
            stores.push(store);
        }
        paths.push(path);
    }
    (stores.len() == paths.len()).then_some((stores, paths))
}

/// Checks each store against what the target will write to it.
fn check_stores(
    stores: &[StoreConfig],
    paths: &[String],
    login: &Login,
    policy: &PasswordPolicy,
    alphabet_path: &str,
    base: &Path,
    errors: &mut Errors,
) {
    let logins = login.names();
    for (store, path) in stores.iter().zip(paths) {
        let at = At { path, base };
        check_template(&store.format, login, policy, &at, errors);
        // The consumer must learn which login to use: the stored value has to name the user.
        if login.strategy == Strategy::Alternating && !store.format.names_user() {
            errors.push(
                at.of("format"),
                "with strategy = \"alternating\" every store must name the user: format url, or a template with {user}",
            );
        }
        if login.user.is_some() {
            let writes = crate::store::Writes {
                policy,
                logins: &logins,
                format: &store.format,
                alphabet_path,
            };
            store.kind.settings().check_writes(&writes, &at, errors);
        }
    }
}

/// Reports a template whose stored values could not be split back into user and password.
fn check_template(
    format: &Format,
    login: &Login,
    policy: &PasswordPolicy,
    at: &At,
    errors: &mut Errors,
) {
    if let Format::Template(template) = format {
        let chars = policy.alphabet.characters();
        let ambiguity = crate::store::format::template_ambiguity(template, &login.names(), &chars);
        if let Some(why) = ambiguity {
            errors.push(at.of("template"), why);
        }
    }
}

/// A `sync` entry as written.
#[derive(Deserialize)]
struct SyncKeys {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    external_secret: String,
    #[serde(default)]
    secret: String,
    /// Without the key the wait could not tell a synced Secret from a stale one.
    #[serde(default)]
    key: String,
    format: Option<String>,
    template: Option<String>,
}

fn parse_sync(table: toml::Table, at: &At, errors: &mut Errors) -> Option<SyncConfig> {
    let (keys, rest) = read_part::<SyncKeys>(table, at, errors);
    let (keys, typed) = keys?;
    errors.require(&keys.namespace, at, "namespace");
    errors.require(&keys.external_secret, at, "external_secret");
    errors.require(&keys.secret, at, "secret");
    errors.require(&keys.key, at, "key");
    let format = format_of(keys.format.as_deref(), keys.template, at, errors);
    unknown_keys(rest, at, errors);
    let complete = [
        &keys.namespace,
        &keys.external_secret,
        &keys.secret,
        &keys.key,
    ]
    .iter()
    .all(|v| !v.is_empty());
    if !typed || !complete {
        return None;
    }
    Some(SyncConfig {
        namespace: keys.namespace,
        external_secret: keys.external_secret,
        secret: keys.secret,
        key: keys.key,
        format: format?,
    })
}

pub fn is_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => {
            let host_ok = !host.is_empty()
                && !host.contains(['/', '@', '?', '#'])
                && !host.contains(char::is_whitespace);
            host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

/// Why `address` is refused, quoted without a URL's `user:password@` part.
pub fn not_host_port(address: &str) -> String {
    let shown = read::without_userinfo(address);
    if address.contains("://") {
        format!("{shown:?} is a URL; give HOST:PORT (the rest has settings of its own)")
    } else {
        format!("{shown:?} is not HOST:PORT")
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
        errors.http_url(health, at, "health", "");
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
    use crate::backend::clickhouse::ClickHouseMode;

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

    /// A URL that fails the http(s) check may still carry a credential: the error names the
    /// field and the host, never the password.
    #[test]
    fn a_non_http_url_is_reported_without_its_userinfo() {
        let text = VALID.replace(
            "timeout = \"2m\"",
            "timeout = \"2m\"\nhealth = \"redis://proxy:hunter2@llmtrace:6379\"",
        );
        let errors = errors_of(&text).join("\n");
        assert!(errors.contains("consumer[0].health"), "{errors}");
        assert!(errors.contains("redis://…@llmtrace:6379"), "{errors}");
        assert!(!errors.contains("hunter2"), "{errors}");
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
    fn a_url_given_as_an_address_is_refused_without_repeating_its_password() {
        for url in [
            "postgres://app:s3cretpw@db:5432/llmtrace",
            "postgres://app:s3cretpw@db:5432",
        ] {
            let errors = errors_of(&VALID.replace("127.0.0.1:5432", url));
            assert_eq!(
                errors,
                ["target[0].address: \"postgres://…@db:5432\" is a URL; give HOST:PORT (the rest has settings of its own)"
                    .replace("db:5432", url.rsplit_once('@').unwrap().1)],
                "{url}"
            );
        }
    }

    #[test]
    fn an_http_url_with_a_user_or_password_is_refused_without_repeating_them() {
        let consumer = "kind = \"deployment\"\nnamespace = \"llmtrace\"\nobject = \"llmtrace\"";
        for (health, shown) in [
            (
                "http://ops:s3cretpw@proxy:8080/health",
                "http://…@proxy:8080/health",
            ),
            ("htps://ops:s3c@retpw@proxy:8080/", "htps://…@proxy:8080/"),
        ] {
            let text = VALID.replace(
                consumer,
                &format!("kind = \"command\"\ncommand = [\"true\"]\nhealth = \"{health}\""),
            );
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].starts_with(&format!("consumer[0].health: \"{shown}\"")),
                "{errors:?}"
            );
            assert!(!errors[0].contains("s3c"), "{errors:?}");
        }
    }

    #[test]
    fn a_password_written_without_literal_is_not_repeated() {
        let text = VALID.replace(
            "k8s:llmtrace/llmtrace-postgresql#postgres-password",
            "Xk9:f2Qa8",
        );
        let errors = errors_of(&text);
        assert!(errors[0].starts_with("target[0].admin.password: unknown reference scheme"));
        assert!(
            !errors[0].contains("Xk9") && !errors[0].contains("f2Qa8"),
            "{errors:?}"
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
        assert_eq!(target.kind(), "redis");
        let BackendConfig::Redis(redis) = &target.backend else {
            panic!("{target:?}")
        };
        assert_eq!(target.user, "default");
        assert_eq!(target.strategy, Strategy::Dual);
        assert!(target.strategy.keeps_old_until_retire());
        assert_eq!(redis.replicas, ["llmtrace-redis-replicas-0:6379"]);
        assert!(redis.tls);
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
        let BackendConfig::Redis(redis) = &target.backend else {
            panic!("{target:?}")
        };
        assert_eq!(
            redis.sentinel,
            Some(crate::backend::redis::SentinelConfig {
                address: "llmtrace-redis:26379".into(),
                master_name: "mymaster".into()
            })
        );
        assert_eq!(target.address, "llmtrace-redis:26379");
        assert!(redis.replicas.is_empty());
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

    fn clickhouse_mode(target: &Target) -> ClickHouseMode {
        match &target.backend {
            BackendConfig::ClickHouse(clickhouse) => clickhouse.mode(),
            other => panic!("{other:?}"),
        }
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
        assert_eq!(target.kind(), "clickhouse");
        assert!(target.admin_password.is_none());
        assert_eq!(
            clickhouse_mode(target),
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
            clickhouse_mode(&config.targets[0]),
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
                "target[0].store[0].certificate",
                "target[0].store[0].name",
                "target[0].sync[0].formt",
                "target[0].sync[0].key",
                "target[0].sync_timeout",
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

    #[test]
    fn every_value_of_the_wrong_type_in_one_table_is_reported_without_its_value() {
        let text = VALID
            .replace(
                "namespace = \"llmtrace\"\n  secret",
                "namespace = 5\n  secret",
            )
            .replace(
                "secret = \"llmtrace\"\n  key",
                "secret = [\"hunter2\"]\n  kee",
            )
            .replace("length = 40", "length = \"hunter2\"");
        let errors = errors_of(&text);
        assert_eq!(
            errors,
            [
                "password.length: must be an integer, not string",
                "target[0].store[0].kee: unknown key",
                "target[0].store[0].key: is required",
                "target[0].store[0].namespace: must be a string, not integer",
                "target[0].store[0].secret: must be a string, not array",
            ]
        );
    }

    #[test]
    fn unknown_keys_nested_in_a_kinds_tables_are_reported_by_path() {
        let text = VALID.replace(
            "password = \"k8s:llmtrace/llmtrace-postgresql#postgres-password\" }",
            "password = \"env:PG\", pasword = \"env:PG\" }",
        );
        assert_eq!(errors_of(&text), ["target[0].admin.pasword: unknown key"]);
        let vault = VALID.replace(
            "kind = \"file\"\n  path = \".env\"\n  key = \"PGPASSWORD\"",
            "kind = \"vault\"\n  address = \"http://vault:8200\"\n  path = \"app\"\n  property = \"pw\"\n  auth = { kubernetes = { role = \"r\", rol = \"r\" } }",
        );
        assert_eq!(
            errors_of(&vault),
            ["target[0].store[1].auth.kubernetes.rol: unknown key"]
        );
    }

    #[test]
    fn a_key_of_another_backend_kind_names_the_kinds_that_read_it() {
        let text = REDIS.replace(
            "tls = true",
            "tls = true\nmode = \"sql\"\non_cluster = \"c\"",
        );
        assert_eq!(
            errors_of(&text),
            [
                "target[0].mode: is only used by clickhouse targets, not redis",
                "target[0].on_cluster: is only used by clickhouse targets, not redis",
            ]
        );
        let postgres = VALID.replace("user = \"llmtrace\"", "user = \"llmtrace\"\ntls = true");
        assert_eq!(
            errors_of(&postgres),
            ["target[0].tls: is not used by postgres targets: use sslmode"]
        );
    }

    #[test]
    fn postgres_keys_every_target_read_before_stay_accepted_and_checked() {
        let text = REDIS.replace(
            "tls = true",
            "tls = true\ndatabase = \"0\"\nsslmode = \"require\"",
        );
        Config::parse(&text, Path::new("/")).unwrap();
        let bad = REDIS.replace("tls = true", "tls = true\nsslmode = \"always\"");
        assert_eq!(
            errors_of(&bad),
            ["target[0].sslmode: \"always\" is not one of disable, prefer, require, verify-ca, verify-full"]
        );
    }

    #[test]
    fn a_login_two_targets_rotate_is_refused() {
        let second = |address: &str, user: &str| {
            format!(
                "{VALID}\n[[target]]\nname = \"copy\"\nkind = \"postgres\"\naddress = \"{address}\"\n\
                 database = \"other\"\nuser = \"{user}\"\n\
                 admin = {{ user = \"postgres\", password = \"env:PG_ADMIN_PASSWORD\" }}\n\
                 [[target.store]]\nkind = \"file\"\npath = \"other.env\"\nkey = \"URL\"\n"
            )
        };
        assert_eq!(
            errors_of(&second("127.0.0.1:5432", "llmtrace")),
            ["target[1].user: login \"llmtrace\" on postgres 127.0.0.1:5432 is rotated by target \"postgres\" too; rotate each login in one target"]
        );
        // Another server, or another login on the same one, is another credential.
        for (address, user) in [("127.0.0.2:5432", "llmtrace"), ("127.0.0.1:5432", "other")] {
            let text = second(address, user);
            assert!(
                Config::parse(&text, Path::new("/etc/rotator")).is_ok(),
                "{address} {user}"
            );
        }
    }

    #[test]
    fn a_template_without_its_password_is_reported_once() {
        let text = VALID.replace(
            "format = \"password\"",
            "format = \"template\"\n  template = \"{user}\"",
        );
        assert_eq!(
            errors_of(&text),
            ["target[0].store[1].template: must contain {password}"]
        );
    }
}

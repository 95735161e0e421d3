//! ClickHouse over plain HTTP (reqwest, no client crate): the password never travels in a URL,
//! only in `X-ClickHouse-Key` on logins, and the server only ever gets SHA-256 hashes.
//!
//! `mode = "sql"`: `ALTER USER ... IDENTIFIED WITH sha256_hash BY '<hex>' SALT '<salt>'`, with
//! `ADD IDENTIFIED` / `RESET AUTHENTICATION METHODS TO NEW` for `dual` (24.9+).
//! `mode = "users_xml"`: a users.d file the rotator owns holds `<password_sha256_hex>`; the
//! server reloads it by itself, so the step waits until the new password logs in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, BackendSettings};
use crate::config::{At, Errors, Strategy, Target, Validate};
use crate::secret::{Credential, Redacted, Secret};

/// `kind = "clickhouse"`: a ClickHouse server over HTTP(S).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ClickHouseConfig {
    /// `sql` (the default) or `users_xml`: see [`ClickHouseMode`].
    pub mode: Option<String>,
    /// `users_xml = { path = "..." }`: the users.d file of `mode = "users_xml"`.
    pub users_xml: Option<UsersXml>,
    /// `ALTER USER ... ON CLUSTER` this cluster (`mode = "sql"`).
    pub on_cluster: Option<String>,
    /// HTTPS instead of HTTP.
    #[serde(default)]
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct UsersXml {
    #[serde(default)]
    pub path: PathBuf,
}

/// How a ClickHouse user's password is changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClickHouseMode {
    /// `ALTER USER` (SQL-managed users, 20.5+), optionally `ON CLUSTER`.
    Sql { on_cluster: Option<String> },
    /// A users.d file the rotator owns, for users defined in XML and servers before 20.5.
    UsersXml { path: PathBuf },
}

impl ClickHouseConfig {
    fn users_xml_mode(&self) -> bool {
        self.mode.as_deref() == Some("users_xml")
    }

    pub fn mode(&self) -> ClickHouseMode {
        match &self.users_xml {
            Some(users_xml) if self.users_xml_mode() => ClickHouseMode::UsersXml {
                path: users_xml.path.clone(),
            },
            _ => ClickHouseMode::Sql {
                on_cluster: self.on_cluster.clone(),
            },
        }
    }
}

impl Validate for ClickHouseConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        match self.mode.as_deref() {
            None | Some("sql") => {
                if self.users_xml.is_some() {
                    errors.push(at.of("users_xml"), "is only used with mode = \"users_xml\"");
                }
            }
            Some("users_xml") => {
                if self.on_cluster.is_some() {
                    errors.push(at.of("on_cluster"), "is only used with mode = \"sql\"");
                }
                match &mut self.users_xml {
                    Some(users_xml) if users_xml.path.as_os_str().is_empty() => {
                        errors.missing(at.of("users_xml.path"), "is required");
                    }
                    Some(users_xml) => at.resolve(&mut users_xml.path),
                    None => errors.missing(
                        at.of("users_xml"),
                        "is required with mode = \"users_xml\": { path = \"/etc/clickhouse-server/users.d/llmtrace.xml\" }",
                    ),
                }
            }
            Some(other) => errors.push(
                at.of("mode"),
                format!("{other:?} is not one of sql, users_xml"),
            ),
        }
        if let Some(ca_file) = &mut self.ca_file {
            at.resolve(ca_file);
        }
    }
}

impl BackendSettings for ClickHouseConfig {
    fn strategies(&self) -> &'static [Strategy] {
        &[Strategy::Single, Strategy::Dual, Strategy::Alternating]
    }

    fn check_strategy(&self, strategy: Strategy, at: &At, errors: &mut Errors) {
        if strategy == Strategy::Dual && self.users_xml_mode() {
            errors.push(
                at.of("strategy"),
                "\"dual\" needs mode = \"sql\": users.xml holds one password per user",
            );
        }
    }

    /// users_xml mode writes a file and logs in as the user itself: no admin to speak of.
    fn needs_admin(&self) -> bool {
        !self.users_xml_mode()
    }

    fn open(
        &self,
        target: &Target,
        admin_password: Secret,
        _admin_sessions: &std::sync::Arc<super::postgres::AdminPool>,
    ) -> Box<dyn Backend> {
        Box::new(ClickHouse::new(target, self, admin_password))
    }
}

/// A query that has not answered by then is treated as failed rather than hanging the run.
const TIMEOUT: Duration = Duration::from_secs(15);
/// ClickHouse checks its users config every few seconds; a minute means it is not reloading.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// `ADD IDENTIFIED WITH` and `RESET AUTHENTICATION METHODS` exist since this version.
const MULTI_AUTH_VERSION: (u32, u32) = (24, 9);
/// "storage is readonly": the user is defined in users.xml.
const READONLY_STORAGE: u32 = 495;

pub struct ClickHouse {
    base_url: String,
    http: Result<reqwest::Client, HttpClientError>,
    admin_user: String,
    admin_password: Secret,
    strategy: Strategy,
    /// The strategy the server can do (`dual` falls back to `single` before 24.9), once known.
    effective: OnceLock<Strategy>,
    mode: ClickHouseMode,
    /// The two users of `alternating`; empty otherwise.
    users: Vec<String>,
    notes: Mutex<Vec<super::Note>>,
}

/// A failed HTTP query: ClickHouse's error code when it gave one, and its message.
struct QueryError {
    code: Option<u32>,
    message: Redacted,
}

/// Which change an `ALTER USER` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Apply,
    Undo,
    Retire,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256_hash` as ClickHouse checks it: SHA-256 of the password followed by the salt.
fn salted_hash(password: &Secret, salt: &str) -> Secret {
    let mut hasher = Sha256::new();
    hasher.update(password.expose().as_bytes());
    hasher.update(salt.as_bytes());
    Secret::new(hex(&hasher.finalize()))
}

fn new_salt() -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    hex(&salt)
}

/// A backquoted identifier, escaped as ClickHouse's lexer reads it.
fn quote_identifier(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The `ALTER USER` for a change, or `None` when there is nothing to do. `single` replaces the
/// user's methods; `dual` adds one and resets to it at retire. Undo sets the old password as
/// the only method: it runs after the consumers are back on it.
fn alter_statement(
    strategy: Strategy,
    change: Change,
    user: &str,
    on_cluster: Option<&str>,
    password: &Secret,
    salt: &str,
) -> Option<Secret> {
    let target = match on_cluster {
        Some(cluster) => format!(
            "{} ON CLUSTER {}",
            quote_identifier(user),
            quote_identifier(cluster)
        ),
        None => quote_identifier(user),
    };
    let method = || {
        format!(
            "IDENTIFIED WITH sha256_hash BY {} SALT {}",
            quote_literal(salted_hash(password, salt).expose()),
            quote_literal(salt)
        )
    };
    let statement = match (strategy, change) {
        (Strategy::Dual, Change::Apply) => format!("ALTER USER {target} ADD {}", method()),
        (Strategy::Dual, Change::Retire) => {
            format!("ALTER USER {target} RESET AUTHENTICATION METHODS TO NEW")
        }
        // Config allows alternating only for PostgreSQL; here it would mean one password.
        (Strategy::Single | Strategy::Alternating, Change::Retire) => return None,
        (_, Change::Apply | Change::Undo) => format!("ALTER USER {target} {}", method()),
    };
    Some(Secret::new(statement))
}

/// Where the user is defined: `local_directory`, `replicated`, or `users_xml` (read-only to SQL).
fn storage_query(user: &str) -> Secret {
    Secret::new(format!(
        "SELECT storage FROM system.users WHERE name = {} FORMAT TabSeparated",
        quote_literal(user)
    ))
}

/// What must be alike for both users of an alternating pair, by aspect, with the user's name
/// and authentication left out. Rows are compared sorted (`ORDER BY ALL` is 23.x+).
fn pair_queries(user: &str) -> [(&'static str, Secret); 5] {
    let name = quote_literal(user);
    [
        (
            "grants",
            format!("SELECT * EXCEPT (user_name) FROM system.grants WHERE user_name = {name} FORMAT TabSeparated"),
        ),
        (
            "roles",
            format!("SELECT * EXCEPT (user_name) FROM system.role_grants WHERE user_name = {name} FORMAT TabSeparated"),
        ),
        (
            "hosts and defaults",
            format!("SELECT * EXCEPT (name, id, storage, auth_type, auth_params) FROM system.users WHERE name = {name} FORMAT TabSeparated"),
        ),
        (
            "settings profile",
            format!("SELECT * EXCEPT (user_name) FROM system.settings_profile_elements WHERE user_name = {name} FORMAT TabSeparated"),
        ),
        (
            "quota",
            format!("SELECT name FROM system.quotas WHERE has(apply_to_list, {name}) OR (apply_to_all AND NOT has(apply_to_except, {name})) FORMAT TabSeparated"),
        ),
    ]
    .map(|(aspect, sql)| (aspect, Secret::new(sql)))
}

/// The aspects whose answers differ, each answer's rows taken as a sorted list.
fn differing_aspects(
    a: &[(&'static str, String)],
    b: &[(&'static str, String)],
) -> Vec<&'static str> {
    let rows = |text: &str| {
        let mut rows: Vec<String> = text.lines().map(str::to_string).collect();
        rows.sort();
        rows
    };
    a.iter()
        .zip(b)
        .filter(|((_, x), (_, y))| rows(x) != rows(y))
        .map(|((aspect, _), _)| *aspect)
        .collect()
}

/// `24.9.1.1` → (24, 9).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// `Code: 495, e.displayText() = ...` (old) or `Code: 495. DB::Exception: ...` (new).
fn error_code(body: &str) -> Option<u32> {
    let rest = body.split("Code: ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The users.d file: merged over the main definition, dropping any other password field.
fn users_xml(user: &str, password: &Secret) -> Secret {
    users_xml_file(&[(user.to_string(), sha256_hex(password))])
}

fn sha256_hex(password: &Secret) -> Secret {
    Secret::new(hex(&Sha256::digest(password.expose().as_bytes())))
}

/// The users.d file for several users, each with its `password_sha256_hex`. The user names
/// stay out of the comment: a name may contain `--`, which ends an XML comment.
fn users_xml_file(entries: &[(String, Secret)]) -> Secret {
    let users: String = entries
        .iter()
        .map(|(user, hash)| {
            format!(
                "        <{user}>
            <password remove=\"1\"/>
            <password_double_sha1_hex remove=\"1\"/>
            <password_sha256_hex>{}</password_sha256_hex>
        </{user}>
",
                hash.expose()
            )
        })
        .collect();
    Secret::new(format!(
        r#"<?xml version="1.0"?>
<!-- Written by llmtrace-rotator: the passwords of the users below. Replaced at each rotation; do not edit. -->
<yandex>
    <users>
{users}    </users>
</yandex>
"#
    ))
}

/// The `password_sha256_hex` a users.d file written by [`users_xml_file`] holds for `user`.
fn entry_hash(text: &str, user: &str) -> Option<Secret> {
    let start = text.find(&format!("<{user}>"))?;
    let end = start + text[start..].find(&format!("</{user}>"))?;
    let entry = &text[start..end];
    let open = "<password_sha256_hex>";
    let from = entry.find(open)? + open.len();
    let to = from + entry[from..].find('<')?;
    let hash = entry[from..to].trim();
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| Secret::new(hash.to_string()))
}

/// What a users config file defines for `user` (`<users><user>...</user></users>`): each child
/// element by name with its whitespace-collapsed contents, password fields left out. `None` when
/// the file does not mention the user. A small reader for the plain XML users files are made of.
fn user_definition(text: &str, user: &str) -> Option<BTreeMap<String, String>> {
    let text = strip_comments(text);
    let users_start = text.find("<users>")? + "<users>".len();
    let users = &text[users_start..users_start + text[users_start..].find("</users>")?];
    let open = format!("<{user}");
    let mut at = 0;
    let start = loop {
        let i = at + users[at..].find(&open)?;
        let after = users[i + open.len()..].chars().next()?;
        if matches!(after, '>' | '/' | ' ' | '\t' | '\n' | '\r') {
            break i;
        }
        at = i + open.len();
    };
    let tag_end = start + users[start..].find('>')?;
    let mut children = BTreeMap::new();
    if users[..tag_end].ends_with('/') {
        return Some(children);
    }
    let body_start = tag_end + 1;
    let body = &users[body_start..body_start + users[body_start..].find(&format!("</{user}>"))?];
    let mut rest = body.trim_start();
    while let Some(stripped) = rest.strip_prefix('<') {
        let name: String = stripped
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '>' && *c != '/')
            .collect();
        let tag_len = stripped.find('>')? + 1;
        let (value, consumed) = if stripped[..tag_len].ends_with("/>") {
            (stripped[..tag_len - 2].to_string(), tag_len)
        } else {
            let close = format!("</{name}>");
            let end = stripped.find(&close)?;
            (stripped[tag_len..end].to_string(), end + close.len())
        };
        if !name.starts_with("password") {
            children.insert(name, value.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        rest = stripped[consumed..].trim_start();
    }
    Some(children)
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("<!--") {
        out.push_str(&rest[..i]);
        match rest[i..].find("-->") {
            Some(j) => rest = &rest[i + j + 3..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Why the users config files do not allow the users_xml mode. Paths and user names only: a
/// file's contents (password hashes) are never quoted.
#[derive(Debug, thiserror::Error)]
enum UsersFileError {
    #[error("strategy \"alternating\" compares the two users' definitions in {}, which is not \
             readable: the users.d directory must sit beside the server's users.xml", .0.display())]
    NoUsersXml(PathBuf),
    #[error("cannot list {}: {source}", .path.display())]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("user {0:?} is not defined in {1}: define both users of the pair")]
    Undefined(String, String),
    #[error("users {a:?} and {b:?} differ in {differing} ({files}): give both the same definition but the password")]
    Differ {
        a: String,
        b: String,
        differing: String,
        files: String,
    },
    #[error("users_xml.path: directory {} is not usable: {source}", .path.display())]
    DirectoryUnusable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("users_xml.path: {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("users_xml.path: {} exists and was not written by the rotator; point it at a file of its own in users.d", .0.display())]
    NotOurs(PathBuf),
    #[error("users_xml.path: cannot write in {}: {source}", .path.display())]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("users_xml.path: cannot read {}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why the HTTP client cannot be built (a `ca_file` problem, usually).
#[derive(Debug, thiserror::Error)]
enum HttpClientError {
    #[error("cannot read ca_file {}: {source}", .path.display())]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ca_file {}: {source}", .path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Build(#[source] reqwest::Error),
}

/// The users config files that define users, in the order the server merges them: the main
/// `users.xml` beside the users.d directory, then the other files in users.d and conf.d. The
/// rotator's own file holds only passwords, which are not compared.
fn users_config_files(own: &Path) -> Result<Vec<PathBuf>, UsersFileError> {
    let users_d = own.parent().unwrap_or(Path::new("."));
    let main = users_d.parent().unwrap_or(Path::new(".")).join("users.xml");
    if !main.is_file() {
        return Err(UsersFileError::NoUsersXml(main));
    }
    // The server merges users.d and conf.d beside users.xml (ConfigProcessor.cpp
    // `getConfigMergeFiles`); a directory that is absent adds nothing.
    let mut others = Vec::new();
    for dir in [users_d.to_path_buf(), users_d.with_file_name("conf.d")] {
        match std::fs::read_dir(&dir) {
            Ok(entries) => others.extend(
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "xml") && p != own),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != users_d => {}
            Err(source) => return Err(UsersFileError::List { path: dir, source }),
        }
    }
    others.sort();
    Ok(std::iter::once(main).chain(others).collect())
}

/// Both users of an alternating pair exist and are defined alike (profile, quota, networks,
/// databases, grants...) but for the password, so either can serve the workload.
fn check_pair_alike(own: &Path, a: &str, b: &str) -> Result<(), UsersFileError> {
    let files = users_config_files(own)?;
    let mut definitions = [(a, None), (b, None)];
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| UsersFileError::Read {
            path: file.clone(),
            source,
        })?;
        for (user, merged) in definitions.iter_mut() {
            if let Some(children) = user_definition(&text, user) {
                merged.get_or_insert_with(BTreeMap::new).extend(children);
            }
        }
    }
    let names = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let [(_, Some(first)), (_, Some(second))] = &definitions else {
        let missing: Vec<&str> = definitions
            .iter()
            .filter(|(_, d)| d.is_none())
            .map(|(u, _)| *u)
            .collect();
        return Err(UsersFileError::Undefined(missing.join("\", \""), names));
    };
    let differing: Vec<&str> = first
        .keys()
        .chain(second.keys())
        .filter(|k| first.get(*k) != second.get(*k))
        .map(String::as_str)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if differing.is_empty() {
        Ok(())
    } else {
        Err(UsersFileError::Differ {
            a: a.to_string(),
            b: b.to_string(),
            differing: differing.join(", "),
            files: names,
        })
    }
}

/// A user name that can be an XML element name as users.xml spells users.
fn is_xml_name(user: &str) -> bool {
    let mut chars = user.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A users.d file the rotator creates: the server reads it through its group; it holds a
/// password hash, which no one else needs to see.
const NEW_USERS_XML_MODE: u32 = 0o640;

/// Replaces `path` atomically: a temp file beside it (not `*.xml`, which the server would
/// read), created exclusively, synced, renamed over it.
async fn write_atomically(path: &Path, contents: &Secret) -> std::io::Result<()> {
    let path = path.to_path_buf();
    let contents = contents.clone();
    tokio::task::spawn_blocking(move || write_atomically_blocking(&path, contents.expose()))
        .await
        .map_err(std::io::Error::other)?
}

/// Keeps the mode and owner of the file it replaces; a new file gets [`NEW_USERS_XML_MODE`]
/// and the directory's group (the server's, on a packaged install).
fn write_atomically_blocking(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("users");
    let temp = dir.join(format!(".{name}.rotator-{}", uuid::Uuid::new_v4().simple()));
    let (mode, owner, group) = match std::fs::metadata(path) {
        Ok(meta) => (meta.mode() & 0o7777, Some(meta.uid()), meta.gid()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (NEW_USERS_XML_MODE, None, std::fs::metadata(dir)?.gid())
        }
        Err(e) => return Err(e),
    };
    let result = (|| {
        // Exclusive, and private until the owner and mode are in place: nothing planted at the
        // temp name is followed, and the file is never readable more widely than intended.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        // Ownership can only be kept when allowed (root, or a member of the group).
        let _ = std::os::unix::fs::fchown(&file, owner, Some(group));
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

impl ClickHouse {
    pub fn new(target: &Target, config: &ClickHouseConfig, admin_password: Secret) -> Self {
        let scheme = if config.tls { "https" } else { "http" };
        ClickHouse {
            base_url: format!("{scheme}://{}/", target.address),
            http: http_client(config.ca_file.as_deref()),
            admin_user: target.admin_user.clone(),
            admin_password,
            strategy: target.strategy,
            effective: OnceLock::new(),
            mode: config.mode(),
            users: target.users.clone(),
            notes: Mutex::new(Vec::new()),
        }
    }

    fn http(&self) -> Result<&reqwest::Client, QueryError> {
        self.http.as_ref().map_err(|error| QueryError {
            code: None,
            message: error.to_string().into(),
        })
    }

    /// Runs `sql` as `user`; the password goes in a header, never in the URL.
    async fn query(
        &self,
        user: &str,
        password: &Secret,
        sql: &Secret,
    ) -> Result<String, QueryError> {
        let request = self
            .http()?
            .post(&self.base_url)
            .header("X-ClickHouse-User", user)
            .header("X-ClickHouse-Key", password.expose())
            .body(sql.expose().to_string());
        let response = request.send().await.map_err(|e| QueryError {
            code: None,
            message: Redacted::new(crate::secret::http_error_text(e), &[password]),
        })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok(body);
        }
        // The server may echo the statement (hash and all) or the user's input: keep neither.
        let message = Redacted::new(body.lines().next().unwrap_or(""), &[password]);
        let message: String = message.as_str().chars().take(300).collect();
        Err(QueryError {
            code: error_code(&body),
            message: format!("HTTP {status}: {message}").into(),
        })
    }

    fn admin_error(&self, e: QueryError) -> BackendError {
        BackendError::Admin {
            backend: self.describe(),
            user: self.admin_user.clone(),
            cause: e.message,
        }
    }

    fn change_error(&self, user: &str, e: QueryError) -> BackendError {
        let cause = if e.code == Some(READONLY_STORAGE) {
            format!(
                "{} (error {READONLY_STORAGE}: the user is defined in users.xml, which SQL cannot change; \
                 rotate a SQL-managed user, or use mode = \"users_xml\")",
                e.message
            )
            .into()
        } else {
            e.message
        };
        BackendError::Change {
            backend: self.describe(),
            user: user.to_string(),
            cause,
        }
    }

    fn note(&self, kind: &'static str, message: String) {
        let note = super::Note { kind, message };
        let mut notes = self.notes.lock().expect("notes lock");
        if !notes.contains(&note) {
            notes.push(note);
        }
    }

    async fn server_version(&self) -> Result<(u32, u32), BackendError> {
        let text = self
            .query(
                &self.admin_user,
                &self.admin_password,
                &Secret::new("SELECT version()"),
            )
            .await
            .map_err(|e| self.admin_error(e))?;
        parse_version(&text).ok_or_else(|| BackendError::Setup {
            backend: self.describe(),
            message: format!("cannot read the server version from {:?}", text.trim()),
        })
    }

    /// `dual` needs several auth methods per user (24.9+); older servers get `single`, said so.
    /// Remembered, because the engine orders a rollback by [`Backend::strategy`].
    async fn effective_strategy(&self) -> Result<Strategy, BackendError> {
        if let Some(strategy) = self.effective.get() {
            return Ok(*strategy);
        }
        if self.strategy != Strategy::Dual {
            return Ok(*self.effective.get_or_init(|| self.strategy));
        }
        let version = self.server_version().await?;
        if version >= MULTI_AUTH_VERSION {
            return Ok(*self.effective.get_or_init(|| Strategy::Dual));
        }
        self.effective.get_or_init(|| Strategy::Single);
        self.note(
            "dual_unsupported",
            format!(
                "{}: server {}.{} predates several passwords per user ({}.{}); rotated as single",
                self.describe(),
                version.0,
                version.1,
                MULTI_AUTH_VERSION.0,
                MULTI_AUTH_VERSION.1
            ),
        );
        Ok(Strategy::Single)
    }

    async fn alter(
        &self,
        change: Change,
        user: &str,
        on_cluster: Option<&str>,
        password: &Secret,
    ) -> Result<(), BackendError> {
        let strategy = self.effective_strategy().await?;
        let Some(statement) =
            alter_statement(strategy, change, user, on_cluster, password, &new_salt())
        else {
            return Ok(());
        };
        self.query(&self.admin_user, &self.admin_password, &statement)
            .await
            .map(|_| ())
            .map_err(|e| self.change_error(user, e))
    }

    /// Writes the users.d file for `credential`, then waits until the server accepts it.
    async fn write_users_xml(
        &self,
        path: &Path,
        credential: &Credential,
    ) -> Result<(), BackendError> {
        let change = |cause: String| BackendError::Change {
            backend: self.describe(),
            user: credential.user.clone(),
            cause: cause.into(),
        };
        let contents = if self.strategy == Strategy::Alternating {
            self.pair_file(path, credential)
                .await
                .map_err(|e| change(e.to_string()))?
        } else {
            users_xml(&credential.user, &credential.password)
        };
        write_atomically(path, &contents)
            .await
            .map_err(|e| change(format!("cannot write {}: {e}", path.display())))?;
        let deadline = tokio::time::Instant::now() + RELOAD_TIMEOUT;
        loop {
            match self.login(credential).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(change(format!(
                        "{} was written but the server did not accept the password within {}s \
                         (is the file in the users.d directory of its users_config?): {e}",
                        path.display(),
                        RELOAD_TIMEOUT.as_secs()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

impl ClickHouse {
    /// The user exists and is SQL-managed (users.xml users are read-only to SQL).
    async fn check_sql_user(&self, user: &str) -> Result<(), BackendError> {
        let setup = |message: String| BackendError::Setup {
            backend: self.describe(),
            message,
        };
        let storage = self
            .query(&self.admin_user, &self.admin_password, &storage_query(user))
            .await
            .map_err(|e| {
                setup(format!(
                    "admin user {:?} cannot read system.users (it needs access_management; \
                     servers before 20.5 have no SQL users: use mode = \"users_xml\"): {}",
                    self.admin_user, e.message
                ))
            })?;
        match storage.trim() {
            "" => Err(setup(format!("user {user:?} does not exist"))),
            s if s.contains("xml") => Err(setup(format!(
                "user {user:?} is defined in users.xml ({s}), which SQL cannot change: \
                 rotate a SQL-managed user, or use mode = \"users_xml\""
            ))),
            _ => Ok(()),
        }
    }

    /// What the server reports for both users of a pair matches but for name and password.
    async fn check_sql_pair_alike(&self, a: &str, b: &str) -> Result<(), BackendError> {
        let mut answers = Vec::new();
        for user in [a, b] {
            let mut per_user = Vec::new();
            for (aspect, sql) in pair_queries(user) {
                let text = self
                    .query(&self.admin_user, &self.admin_password, &sql)
                    .await
                    .map_err(|e| BackendError::Setup {
                        backend: self.describe(),
                        message: format!(
                            "cannot compare the {aspect} of users {a:?} and {b:?} (needs 21.1+ and access_management): {}",
                            e.message
                        ),
                    })?;
                per_user.push((aspect, text));
            }
            answers.push(per_user);
        }
        let differing = differing_aspects(&answers[0], &answers[1]);
        if differing.is_empty() {
            return Ok(());
        }
        Err(BackendError::Setup {
            backend: self.describe(),
            message: format!(
                "users {a:?} and {b:?} differ in {}: give both the same grants, roles, hosts, settings profile and quota",
                differing.join(", ")
            ),
        })
    }

    /// The pair's file with `credential` for its user: the other user's entry is kept as the
    /// file has it (absent before the first rotation: users.xml defines its password then).
    async fn pair_file(
        &self,
        path: &Path,
        credential: &Credential,
    ) -> Result<Secret, UsersFileError> {
        let existing = match tokio::fs::read_to_string(path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(UsersFileError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut entries = Vec::new();
        for user in &self.users {
            if *user == credential.user {
                entries.push((user.clone(), sha256_hex(&credential.password)));
            } else if let Some(hash) = entry_hash(&existing, user) {
                entries.push((user.clone(), hash));
            }
        }
        Ok(users_xml_file(&entries))
    }
}

fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, HttpClientError> {
    let mut builder = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        // A fresh connection per login, so a login proves what a new pod would see.
        .pool_max_idle_per_host(0);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| HttpClientError::ReadCa {
            path: path.to_path_buf(),
            source,
        })?;
        let cert =
            reqwest::Certificate::from_pem(&pem).map_err(|source| HttpClientError::BadCa {
                path: path.to_path_buf(),
                source,
            })?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(HttpClientError::Build)
}

#[async_trait]
impl Backend for ClickHouse {
    fn describe(&self) -> String {
        format!("clickhouse {}", self.base_url.trim_end_matches('/'))
    }

    fn strategy(&self) -> Strategy {
        self.effective.get().copied().unwrap_or(self.strategy)
    }

    async fn login(&self, credential: &Credential) -> Result<(), BackendError> {
        let fail = |cause: Redacted| BackendError::Login {
            backend: self.describe(),
            user: credential.user.clone(),
            cause,
        };
        let request = self
            .http()
            .map_err(|e| fail(e.message))?
            .get(format!("{}?query=SELECT%201", self.base_url))
            .header("X-ClickHouse-User", &credential.user)
            .header("X-ClickHouse-Key", credential.password.expose());
        let response = request.send().await.map_err(|e| {
            let text = crate::secret::http_error_text(e);
            fail(Redacted::new(text, &[&credential.password]))
        })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if status.is_success() && body.trim() == "1" {
            return Ok(());
        }
        let first = Redacted::new(body.lines().next().unwrap_or(""), &[&credential.password]);
        Err(fail(
            format!(
                "HTTP {status}: {}",
                first.as_str().chars().take(300).collect::<String>()
            )
            .into(),
        ))
    }

    fn next_user(&self, current: &Credential) -> String {
        match self.strategy {
            // The idle user of the pair: the one the stores do not name now.
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
        let user = current.user.as_str();
        let setup = |message: String| BackendError::Setup {
            backend: self.describe(),
            message,
        };
        match &self.mode {
            ClickHouseMode::UsersXml { path } => {
                let users = if self.users.is_empty() {
                    vec![user.to_string()]
                } else {
                    self.users.clone()
                };
                if let Some(bad) = users.iter().find(|u| !is_xml_name(u)) {
                    return Err(setup(format!(
                        "user {bad:?} cannot be written as a users.xml element; use mode = \"sql\""
                    )));
                }
                check_owned_file(path)
                    .await
                    .map_err(|e| setup(e.to_string()))?;
                if let [a, b] = users.as_slice() {
                    let (path, a, b) = (path.clone(), a.clone(), b.clone());
                    tokio::task::spawn_blocking(move || check_pair_alike(&path, &a, &b))
                        .await
                        .map_err(|e| setup(e.to_string()))?
                        .map_err(|e| setup(e.to_string()))?;
                }
                Ok(())
            }
            ClickHouseMode::Sql { .. } => {
                self.effective_strategy().await?;
                let users = if self.users.is_empty() {
                    vec![user.to_string()]
                } else {
                    self.users.clone()
                };
                for user in &users {
                    self.check_sql_user(user).await?;
                }
                if let [a, b] = users.as_slice() {
                    self.check_sql_pair_alike(a, b).await?;
                }
                Ok(())
            }
        }
    }

    async fn apply(&self, _current: &Credential, next: &Credential) -> Result<(), BackendError> {
        match &self.mode {
            ClickHouseMode::UsersXml { path } => self.write_users_xml(path, next).await,
            ClickHouseMode::Sql { on_cluster } => {
                self.alter(
                    Change::Apply,
                    &next.user,
                    on_cluster.as_deref(),
                    &next.password,
                )
                .await
            }
        }
    }

    async fn undo_apply(
        &self,
        current: &Credential,
        next: &Credential,
    ) -> Result<(), BackendError> {
        match &self.mode {
            // The active user was never touched; the idle one gets a password nobody knows.
            ClickHouseMode::UsersXml { path } if self.strategy == Strategy::Alternating => {
                let discarded = Credential {
                    user: next.user.clone(),
                    password: crate::password::generate(&Default::default()),
                };
                self.write_users_xml(path, &discarded).await
            }
            ClickHouseMode::UsersXml { path } => self.write_users_xml(path, current).await,
            ClickHouseMode::Sql { on_cluster } if self.strategy == Strategy::Alternating => {
                let discarded = crate::password::generate(&Default::default());
                self.alter(Change::Undo, &next.user, on_cluster.as_deref(), &discarded)
                    .await
            }
            ClickHouseMode::Sql { on_cluster } => {
                self.alter(
                    Change::Undo,
                    &current.user,
                    on_cluster.as_deref(),
                    &current.password,
                )
                .await
            }
        }
    }

    async fn retire(&self, _current: &Credential, next: &Credential) -> Result<(), BackendError> {
        match &self.mode {
            ClickHouseMode::UsersXml { .. } => Ok(()),
            ClickHouseMode::Sql { on_cluster } => {
                self.alter(
                    Change::Retire,
                    &next.user,
                    on_cluster.as_deref(),
                    &next.password,
                )
                .await
            }
        }
    }

    fn take_notes(&self) -> Vec<super::Note> {
        std::mem::take(&mut *self.notes.lock().expect("notes lock"))
    }
}

/// The users.d file must be ours to replace: its directory writable, and any file already
/// there written by the rotator.
async fn check_owned_file(path: &Path) -> Result<(), UsersFileError> {
    let dir: PathBuf = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let meta = match tokio::fs::metadata(&dir).await {
        Ok(meta) => meta,
        Err(source) => return Err(UsersFileError::DirectoryUnusable { path: dir, source }),
    };
    if !meta.is_dir() {
        return Err(UsersFileError::NotADirectory(dir));
    }
    match tokio::fs::read_to_string(path).await {
        Ok(text) if !text.contains("Written by llmtrace-rotator") => {
            Err(UsersFileError::NotOurs(path.to_path_buf()))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let probe = dir.join(".llmtrace-rotator-probe");
            if let Err(source) = tokio::fs::write(&probe, b"").await {
                return Err(UsersFileError::NotWritable { path: dir, source });
            }
            let _ = tokio::fs::remove_file(&probe).await;
            Ok(())
        }
        Err(source) => Err(UsersFileError::Unreadable {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(strategy: Strategy, change: Change, cluster: Option<&str>) -> Option<String> {
        alter_statement(
            strategy,
            change,
            "llm`trace",
            cluster,
            &Secret::new("pw"),
            "00112233445566778899aabbccddeeff",
        )
        .map(|s| s.expose().to_string())
    }

    #[test]
    fn salted_hash_is_sha256_of_password_then_salt() {
        // echo -n 'pwsalt' | sha256sum
        assert_eq!(
            salted_hash(&Secret::new("pw"), "salt").expose(),
            hex(&Sha256::digest(b"pwsalt"))
        );
        assert_ne!(new_salt(), new_salt());
        assert_eq!(new_salt().len(), 32);
    }

    #[test]
    fn users_d_comment_stays_well_formed_for_any_user_name() {
        let xml = users_xml("svc--ro-", &Secret::new("pw"));
        let text = xml.expose();
        let start = text.find("<!--").unwrap() + 4;
        let end = text.find("-->").unwrap();
        assert!(!text[start..end].contains("--"), "{text}");
        assert!(text.contains("<svc--ro->"), "{text}");
    }

    #[test]
    fn single_replaces_the_authentication() {
        let hash = salted_hash(&Secret::new("pw"), "00112233445566778899aabbccddeeff");
        assert_eq!(
            statement(Strategy::Single, Change::Apply, None).unwrap(),
            format!(
                "ALTER USER `llm\\`trace` IDENTIFIED WITH sha256_hash BY '{}' SALT '00112233445566778899aabbccddeeff'",
                hash.expose()
            )
        );
        assert_eq!(statement(Strategy::Single, Change::Retire, None), None);
    }

    #[test]
    fn dual_adds_then_resets_to_the_new_method() {
        let apply = statement(Strategy::Dual, Change::Apply, Some("main")).unwrap();
        assert!(
            apply.starts_with(
                "ALTER USER `llm\\`trace` ON CLUSTER `main` ADD IDENTIFIED WITH sha256_hash BY '"
            ),
            "{apply}"
        );
        assert_eq!(
            statement(Strategy::Dual, Change::Retire, None).unwrap(),
            "ALTER USER `llm\\`trace` RESET AUTHENTICATION METHODS TO NEW"
        );
        let undo = statement(Strategy::Dual, Change::Undo, None).unwrap();
        assert!(
            undo.starts_with("ALTER USER `llm\\`trace` IDENTIFIED WITH"),
            "{undo}"
        );
    }

    #[test]
    fn asks_where_the_user_is_stored() {
        assert_eq!(
            storage_query("o'neil").expose(),
            "SELECT storage FROM system.users WHERE name = 'o\\'neil' FORMAT TabSeparated"
        );
    }

    #[test]
    fn quotes_literals_and_identifiers() {
        assert_eq!(quote_literal("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(quote_identifier("a`b"), "`a\\`b`");
    }

    #[test]
    fn reads_versions_and_error_codes() {
        assert_eq!(parse_version("24.9.1.3278\n"), Some((24, 9)));
        assert_eq!(parse_version("18.16.1"), Some((18, 16)));
        assert!(parse_version("18.16.1").unwrap() < MULTI_AUTH_VERSION);
        assert!(parse_version("25.1").unwrap() >= MULTI_AUTH_VERSION);
        assert_eq!(
            error_code("Code: 495, e.displayText() = DB::Exception: storage is readonly"),
            Some(495)
        );
        assert_eq!(
            error_code("Code: 516. DB::Exception: default: Authentication failed"),
            Some(516)
        );
        assert_eq!(error_code("nothing"), None);
    }

    #[test]
    fn users_xml_holds_only_the_hash() {
        let xml = users_xml("llmtrace", &Secret::new("hunter2"));
        assert!(!xml.expose().contains("hunter2"));
        assert!(xml.expose().contains(&format!(
            "<password_sha256_hex>{}</password_sha256_hex>",
            hex(&Sha256::digest(b"hunter2"))
        )));
        assert!(is_xml_name("llmtrace") && is_xml_name("_a-b.c"));
        assert!(!is_xml_name("1a") && !is_xml_name("a b") && !is_xml_name("a<b"));
    }

    #[test]
    fn reads_a_users_definition_without_its_password() {
        let text = r#"<yandex><!-- <users><x/></users> --><profiles/><users>
            <app_ab><profile>x</profile></app_ab>
            <app_a><password>p</password><networks><ip>::1</ip>
              <ip>127.0.0.1</ip></networks><profile>default</profile><quota/></app_a>
        </users></yandex>"#;
        let a = user_definition(text, "app_a").unwrap();
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            ["networks", "profile", "quota"]
        );
        assert_eq!(a["networks"], "<ip>::1</ip> <ip>127.0.0.1</ip>");
        assert_eq!(a["profile"], "default");
        assert_eq!(user_definition(text, "app_ab").unwrap()["profile"], "x");
        assert_eq!(user_definition(text, "x"), None);
        assert_eq!(user_definition(text, "app"), None);
    }

    #[test]
    fn the_pair_file_holds_each_users_hash() {
        let file = users_xml_file(&[
            ("a".into(), sha256_hex(&Secret::new("pa"))),
            ("b".into(), sha256_hex(&Secret::new("pb"))),
        ]);
        let text = file.expose();
        assert_eq!(
            entry_hash(text, "a").unwrap().expose(),
            hex(&Sha256::digest(b"pa"))
        );
        assert_eq!(
            entry_hash(text, "b").unwrap().expose(),
            hex(&Sha256::digest(b"pb"))
        );
        assert!(entry_hash(text, "c").is_none());
    }
}

/// Every statement shape the backend generates, run through chdb-core 26.9 (ClickHouse 26.9
/// embedded): it parses them all, and runs them on users defined in users.xml up to the
/// storage write, which fails with 495 (ACCESS_STORAGE_READONLY; ClickHouse
/// src/Access/IAccessStorage.cpp `throwReadonlyCannotUpdate`); a malformed hash fails
/// earlier with 36 (src/Access/AuthenticationData.cpp `setPasswordHashHex`), an unknown user
/// with 192 (`throwNotFound`), bad syntax with 62. Also loads the users.d file the rotator
/// writes and reads the hash back with SHOW CREATE USER. Skips where chdb is not installed.
#[cfg(test)]
mod chdb_tests {
    use super::*;
    use std::process::{Command, Stdio};

    const XML_USERS: [&str; 2] = ["llmtrace", "svc-ro.v2"];

    /// Besides [`XML_USERS`]: one defined as `llmtrace` is, one with another settings
    /// profile, one with other grants.
    const OTHER_USERS: &str = "<app_b><password>pw2</password><profile>default</profile>\
        <quota>default</quota><networks><ip>::/0</ip></networks></app_b>\
        <app_c><password>pw</password><profile>readonly</profile>\
        <quota>default</quota><networks><ip>::/0</ip></networks></app_c>\
        <app_d><password>pw</password><profile>default</profile><quota>default</quota>\
        <networks><ip>::/0</ip></networks>\
        <allow_databases><database>system</database></allow_databases></app_d>";

    fn chdb_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("users.d")).unwrap();
        std::fs::write(
            root.join("config.xml"),
            format!(
                "<clickhouse><users_config>{}</users_config>\
                 <display_secrets_in_show_and_select>1</display_secrets_in_show_and_select></clickhouse>",
                root.join("users.xml").display()
            ),
        )
        .unwrap();
        let users: String = XML_USERS
            .iter()
            .map(|u| {
                format!(
                    "<{u}><password>pw</password><profile>default</profile><quota>default</quota>\
                     <networks><ip>::/0</ip></networks></{u}>"
                )
            })
            .collect();
        std::fs::write(
            root.join("users.xml"),
            format!(
                "<clickhouse><profiles><default/><readonly><readonly>1</readonly></readonly></profiles>\
                 <quotas><default/></quotas><users>{OTHER_USERS}\
                 <default><password></password><access_management>1</access_management>\
                 <show_named_collections_secrets>1</show_named_collections_secrets>\
                 <profile>default</profile><quota>default</quota><networks><ip>::/0</ip></networks>\
                 </default>{users}</users></clickhouse>"
            ),
        )
        .unwrap();
        dir
    }

    /// (code, result) per statement; `None` where chdb is not installed.
    fn run(dir: &Path, statements: &[(String, &str)]) -> Option<Vec<(Option<u32>, String)>> {
        let input = serde_json::to_vec(
            &statements
                .iter()
                .map(|(sql, mode)| serde_json::json!({"sql": sql, "mode": mode}))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/chdb_check.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &input).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.code() == Some(3) {
            eprintln!(
                "SKIPPED: chdb-core is not installed (pip install --no-deps chdb-core): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        assert!(
            out.status.success(),
            "chdb_check.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        Some(
            results
                .iter()
                .map(|r| {
                    (
                        r["code"].as_u64().map(|c| c as u32),
                        r["result"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
        )
    }

    /// Every statement the backend can generate for `user`.
    fn shapes(user: &str, cluster: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        for strategy in [Strategy::Single, Strategy::Dual] {
            for change in [Change::Apply, Change::Undo, Change::Retire] {
                if let Some(statement) = alter_statement(
                    strategy,
                    change,
                    user,
                    cluster,
                    &Secret::new("pw"),
                    &new_salt(),
                ) {
                    out.push(statement.expose().to_string());
                }
            }
        }
        out
    }

    #[test]
    fn chdb_parses_runs_and_refuses_what_the_backend_generates() {
        let dir = chdb_dir();
        let mut statements: Vec<(String, &str)> = Vec::new();
        // Parsing: names that need quoting, with and without ON CLUSTER.
        for user in [
            "llmtrace",
            "llm`trace",
            "o'neil",
            "back\\slash",
            "svc-ro.v2",
        ] {
            for cluster in [None, Some("main"), Some("my `cluster`")] {
                statements.extend(shapes(user, cluster).into_iter().map(|s| (s, "parse")));
            }
            statements.push((storage_query(user).expose().to_string(), "parse"));
        }
        let parsed = statements.len();
        // Running them on users.xml users: every check passes up to the read-only storage.
        for user in XML_USERS {
            statements.extend(shapes(user, None).into_iter().map(|s| (s, "exec")));
        }
        let valid = statements.len();
        let apply = shapes("llmtrace", None).remove(0);
        let hash_at = apply.find("BY '").unwrap() + 4;
        let broken = [
            (
                format!("{}zz{}", &apply[..hash_at], &apply[hash_at + 64..]),
                36,
            ),
            (shapes("nobody", None).remove(0), 192),
            (apply[..apply.find(" SALT").unwrap() + 5].to_string(), 62),
        ];
        statements.extend(broken.iter().map(|(s, _)| (s.clone(), "exec")));
        statements.push((storage_query("svc-ro.v2").expose().to_string(), "exec"));

        let Some(results) = run(dir.path(), &statements) else {
            return;
        };

        for ((sql, _), (code, result)) in statements[..parsed].iter().zip(&results) {
            assert_eq!(*code, None, "parse {sql}: {result}");
            assert!(
                result.starts_with("ALTER USER") || result.starts_with("SELECT"),
                "{result}"
            );
        }
        for ((sql, _), (code, result)) in statements[parsed..valid].iter().zip(&results[parsed..]) {
            assert_eq!(*code, Some(READONLY_STORAGE), "{sql}: {result}");
        }
        for ((sql, expected), (code, result)) in broken.iter().zip(&results[valid..]) {
            assert_eq!(*code, Some(*expected), "{sql}: {result}");
        }
        assert_eq!(results.last().unwrap(), &(None, "users_xml".to_string()));
    }

    #[test]
    fn chdb_loads_the_users_d_file_and_reports_the_hashes_written() {
        let dir = chdb_dir();
        let passwords = [Secret::new("first-pw"), Secret::new("second-pw")];
        let entries: Vec<(String, Secret)> = XML_USERS
            .iter()
            .zip(&passwords)
            .map(|(u, p)| (u.to_string(), sha256_hex(p)))
            .collect();
        std::fs::write(
            dir.path().join("users.d/llmtrace-rotator.xml"),
            users_xml_file(&entries).expose(),
        )
        .unwrap();
        let statements: Vec<(String, &str)> = XML_USERS
            .iter()
            .map(|u| {
                (
                    format!(
                        "SHOW CREATE USER {} SETTINGS format_display_secrets_in_show_and_select = 1",
                        quote_identifier(u)
                    ),
                    "exec",
                )
            })
            .collect();

        let Some(results) = run(dir.path(), &statements) else {
            return;
        };

        for ((_, hash), (code, result)) in entries.iter().zip(&results) {
            assert_eq!(*code, None, "{result}");
            assert!(
                result.contains(&format!(
                    "IDENTIFIED WITH sha256_hash BY '{}'",
                    hash.expose().to_uppercase()
                )),
                "{result}"
            );
        }
    }

    #[test]
    fn chdb_answers_the_pair_queries_and_differences_are_named() {
        let dir = chdb_dir();
        // Not "svc-ro.v2": the server reads users.xml through Poco's configuration, where a dot
        // separates keys, so that user's <quota> is not found (its quota list differs).
        let users = ["llmtrace", "app_b", "app_c", "app_d"];
        let statements: Vec<(String, &str)> = users
            .iter()
            .flat_map(|u| pair_queries(u))
            .map(|(_, sql)| (sql.expose().to_string(), "exec"))
            .collect();

        let Some(results) = run(dir.path(), &statements) else {
            return;
        };

        let answers: Vec<Vec<(&'static str, String)>> = results
            .chunks(5)
            .zip(&users)
            .map(|(chunk, user)| {
                pair_queries(user)
                    .iter()
                    .zip(chunk)
                    .map(|((aspect, _), (code, text))| {
                        assert_eq!(*code, None, "{user} {aspect}: {text}");
                        (*aspect, text.clone())
                    })
                    .collect()
            })
            .collect();
        assert!(!answers[0][0].1.is_empty(), "users.xml users have grants");
        assert_eq!(
            differing_aspects(&answers[0], &answers[1]),
            Vec::<&str>::new()
        );
        assert_eq!(
            differing_aspects(&answers[0], &answers[2]),
            ["settings profile"]
        );
        assert_eq!(differing_aspects(&answers[0], &answers[3]), ["grants"]);
    }
}

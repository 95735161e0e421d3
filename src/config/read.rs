//! Reading tables through serde so that every problem is reported, not just the first: each
//! value of the wrong type is reported by its path and dropped, the rest read again, unknown
//! keys collected (`serde_ignored`), then one validation pass. Deferred errors, as in
//! linkerd2-proxy's `app/src/env.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_path_to_error::Segment;

use super::FieldError;

/// Declares a kind enum from its table: each line names a kind as config spells it, its
/// variant, and its settings type (defined in the kind's own file).
macro_rules! kinds {
    ($(#[$doc:meta])* $Enum:ident: $Settings:path $(, only_used_by $noun:literal)? {
        $($name:literal => $Variant:ident($Config:ty),)+
    }) => {
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
                let unknown = |key: &str| Self::unknown(kind, key);
                match kind {
                    "" => {
                        errors.missing(at.of("kind"), "is required");
                        None
                    }
                    $($name => parse_with::<$Config>(table, at, errors, unknown).map(Self::$Variant),)+
                    other => {
                        errors.push(
                            at.of("kind"),
                            format!("{other:?} is not one of {}", Self::NAMES.join(", ")),
                        );
                        None
                    }
                }
            }

            /// What to say of a key this kind does not read.
            fn unknown(kind: &str, key: &str) -> String {
                let owners: Vec<&str> = [$(($name, keys_of::<$Config>()),)+]
                    .into_iter()
                    .filter(|(_, keys)| keys.contains(&key))
                    .map(|(name, _)| name)
                    .collect();
                $(
                    if !owners.is_empty() {
                        return format!("is only used by {} {}, not {kind}", owners.join(", "), $noun);
                    }
                )?
                let _ = (kind, owners);
                "unknown key".into()
            }

            /// The kind, as config spells it.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$Variant(_) => $name,)+
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

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Every problem found in a config, collected so that all are reported at once.
#[derive(Default)]
pub struct Errors(pub(super) Vec<FieldError>);

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

    /// In the order of their paths (`target[2]` before `target[10]`), each table's together.
    pub(super) fn sorted(mut self) -> Vec<FieldError> {
        #[derive(PartialEq, Eq, PartialOrd, Ord)]
        enum Part<'a> {
            Index(usize),
            Key(&'a str),
        }
        fn parts(path: &str) -> Vec<Part<'_>> {
            let mut parts = Vec::new();
            for segment in path.split('.') {
                let mut pieces = segment.split('[');
                parts.push(Part::Key(pieces.next().unwrap_or("")));
                for index in pieces {
                    parts.push(Part::Index(
                        index.trim_end_matches(']').parse().unwrap_or(0),
                    ));
                }
            }
            parts
        }
        self.0.sort_by(|a, b| parts(&a.path).cmp(&parts(&b.path)));
        self.0
    }

    /// A required text field: empty means absent (empty strings were reported on reading).
    pub fn require(&mut self, value: &str, at: &At, key: &str) {
        if value.is_empty() {
            self.missing(at.of(key), "is required");
        }
    }

    /// Reports `value` at `at.key` unless it is an http(s) URL without a `user:password@` part
    /// (credentials have settings of their own); `like` is an example for the message (may be
    /// empty). The value is quoted without anything up to its last `@`: a mistyped URL may
    /// still carry a credential.
    pub fn http_url(&mut self, value: &str, at: &At, key: &str, like: &str) {
        let shown = without_userinfo(value);
        match url::Url::parse(value) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {
                if !url.username().is_empty() || url.password().is_some() {
                    self.push(
                        at.of(key),
                        format!("{shown:?} carries a user or password: give it without them"),
                    );
                }
            }
            _ => {
                let like = if like.is_empty() {
                    String::new()
                } else {
                    format!(" like {like}")
                };
                self.push(at.of(key), format!("{shown:?} is not an http(s) URL{like}"));
            }
        }
    }
}

/// `value` with everything before its last `@` (a URL's `user:password`) shown as `…`, the
/// scheme kept when it comes before.
pub fn without_userinfo(value: &str) -> String {
    let Some(at) = value.rfind('@') else {
        return value.to_string();
    };
    let kept = match value.find("://") {
        Some(scheme_end) if scheme_end < at => &value[..scheme_end + 3],
        _ => "",
    };
    format!("{kept}…{}", &value[at..])
}

/// A kind's own settings: deserialized from its table, then checked as a whole.
pub trait Validate {
    /// Reports every bad field under `at` and resolves relative paths against `at.base`.
    fn validate(&mut self, at: &At, errors: &mut Errors);
}

/// Reads a table into `T` and validates it: every value of the wrong type, every unknown key and
/// every bad field is reported. `None` when a value had the wrong type.
pub(super) fn parse_with<T: DeserializeOwned + Validate>(
    table: toml::Table,
    at: &At,
    errors: &mut Errors,
    unknown: impl Fn(&str) -> String,
) -> Option<T> {
    let (value, rest) = read_part::<T>(table, at, errors);
    let (mut value, typed) = value?;
    value.validate(at, errors);
    for key in rest.keys() {
        errors.push(at.of(key), unknown(key));
    }
    typed.then_some(value)
}

/// The keys a kind's settings read, as its `Deserialize` impl names them.
pub(super) fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Keys(&'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for &mut Keys {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("only structs name their keys"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(serde::de::Error::custom("keys taken"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut keys = Keys(&[]);
    let _ = T::deserialize(&mut keys);
    keys.0
}

/// Reports each key of `rest` as unknown (a typo, or a key of another kind).
pub(super) fn unknown_keys(rest: toml::Table, at: &At, errors: &mut Errors) {
    for key in rest.keys() {
        errors.push(at.of(key), "unknown key");
    }
}

/// Deserializes the part of `table` that `T` describes. A value of the wrong type is reported
/// by its path and dropped, and the rest read again, so one bad value hides no other. Returns
/// `T` (with whether every value had its type) and the top-level keys `T` does not know, left for
/// another reader; unknown keys nested deeper are reported here.
pub(super) fn read_part<T: DeserializeOwned>(
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
                serde_ignored::Path::Map {
                    parent: serde_ignored::Path::Root,
                    key,
                } => Some(key.clone()),
                _ => None,
            };
            ignored.push((ignored_path(&path), top));
        };
        // Paths are tracked only to name a bad value: reading without them is the common case.
        let de = serde_ignored::Deserializer::new(value, &mut record);
        match T::deserialize(de) {
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
            Err(_) => {
                let value = toml::Value::Table(table.clone());
                let Err(error) = serde_path_to_error::deserialize::<_, T>(value) else {
                    return (None, toml::Table::new());
                };
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
pub(super) fn drop_empty_strings(table: &mut toml::Table, path: &str, errors: &mut Errors) {
    // Paths are only spelled out where needed: this visits every value of the file.
    table.retain(|key, value| match value {
        toml::Value::String(s) if s.trim().is_empty() => {
            errors.push(join(path, key), "must not be empty");
            false
        }
        toml::Value::Table(t) => {
            drop_empty_strings(t, &join(path, key), errors);
            true
        }
        toml::Value::Array(items) => {
            let mut i = 0;
            items.retain_mut(|item| {
                i += 1;
                let item_path = || format!("{}[{}]", join(path, key), i - 1);
                match item {
                    toml::Value::String(s) if s.is_empty() => {
                        errors.push(item_path(), "must be a non-empty string");
                        false
                    }
                    toml::Value::Table(t) => {
                        drop_empty_strings(t, &item_path(), errors);
                        true
                    }
                    _ => true,
                }
            });
            true
        }
        _ => true,
    });
}

/// `#[serde(deserialize_with)]` for an optional value written as text (a duration, a
/// reference, one of a list of words): the text's own error message is kept.
pub fn parsed<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// `#[serde(deserialize_with)]` for a value written as text, with a default when absent.
pub fn text<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// `#[serde(deserialize_with)]` for a key read only to be refused: true when present, whatever its value.
pub fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    // Through `deserialize_any`: an ignored value would be reported as an unknown key.
    deserializer
        .deserialize_any(serde::de::IgnoredAny)
        .map(|_| true)
}

/// `#[serde(deserialize_with)]` for an optional duration like `30s`.
pub(super) fn optional_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

/// `#[serde(deserialize_with)]` for a duration like `30s` (see [`crate::duration`]).
pub fn duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::duration::parse(&text).map_err(serde::de::Error::custom)
}

/// Takes `key` out of `table` when it is a table; anything else there is reported.
pub(super) fn take_table(
    table: &mut toml::Table,
    key: &str,
    at: &At,
    errors: &mut Errors,
) -> Option<toml::Table> {
    match table.remove(key)? {
        toml::Value::Table(t) => Some(t),
        other => {
            errors.push(
                at.of(key),
                format!("must be a table, not {}", other.type_str()),
            );
            None
        }
    }
}

/// Takes the `[[key]]` tables out of `table`, each with its path (`target[0].store[1]`).
pub(super) fn take_tables(
    table: &mut toml::Table,
    key: &str,
    at: &At,
    errors: &mut Errors,
) -> Vec<(String, toml::Table)> {
    let Some(value) = table.remove(key) else {
        return Vec::new();
    };
    let toml::Value::Array(items) = value else {
        errors.push(at.of(key), format!("must be [[{key}]] tables"));
        return Vec::new();
    };
    let prefix = at.of(key);
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| match item {
            toml::Value::Table(t) => Some((format!("{prefix}[{i}]"), t)),
            _ => {
                errors.push(format!("{prefix}[{i}]"), "must be a table");
                None
            }
        })
        .collect()
}

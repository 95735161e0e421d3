//! A dotenv file on disk: only the key's value changes; lines, comments, mode and owner stay.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{dotenv, Store, StoreError, StoreSettings, Writes};
use crate::config::{At, Errors, Format, Validate};
use crate::secret::Secret;

/// `kind = "file"`: a key of a dotenv file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct FileConfig {
    #[serde(default)]
    pub path: PathBuf,
    #[serde(default)]
    pub key: String,
}

impl Validate for FileConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        if self.path.as_os_str().is_empty() {
            errors.missing(at.of("path"), "is required");
        }
        at.resolve(&mut self.path);
        errors.require(&self.key, at, "key");
    }
}

impl StoreSettings for FileConfig {
    fn key(&self) -> &str {
        &self.key
    }

    fn describe(&self) -> String {
        describe(&self.path, &self.key)
    }

    fn open(&self, _kube: Option<&kube::Client>) -> Result<Box<dyn Store>, StoreError> {
        Ok(Box::new(FileStore::new(self.path.clone(), &self.key)))
    }

    /// Every value the target can produce must be writable so that bash and python-dotenv read
    /// it back unchanged (see [`dotenv`]); refused here otherwise.
    fn check_writes(&self, writes: &Writes, at: &At, errors: &mut Errors) {
        let alphabet: BTreeSet<char> = writes
            .policy
            .alphabet
            .characters()
            .into_iter()
            .map(char::from)
            .collect();
        // Percent-encoding leaves only unreserved characters and `%`.
        let encoded: BTreeSet<char> = ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .chain("-._~%".chars())
            .collect();
        let literal = |template: &str| -> BTreeSet<char> {
            template
                .replace("{user}", "")
                .replace("{password}", "")
                .chars()
                .collect()
        };
        let (literal, generated) = match writes.format {
            Format::Url => return,
            Format::Password => (BTreeSet::new(), alphabet),
            Format::Template(template) if template.contains("://") => (literal(template), encoded),
            Format::Template(template) => {
                let mut generated = alphabet;
                if template.contains("{user}") {
                    generated.extend(writes.logins.iter().flat_map(|l| l.chars()));
                }
                (literal(template), generated)
            }
        };
        if let Some(why) = dotenv::unwritable(&literal) {
            errors.push(
                at.of("template"),
                format!("cannot be written to a dotenv file so that bash and python-dotenv read it back unchanged: it holds {why}"),
            );
        } else if let Some(why) = dotenv::unwritable(&(&literal | &generated)) {
            errors.push(
                writes.alphabet_path,
                format!(
                    "{:?} can generate values the file store {} cannot write so that bash and python-dotenv read them back unchanged (they may hold {why}): use alphanumeric or urlsafe, or format = \"url\"",
                    format!("{:?}", writes.policy.alphabet).to_lowercase(),
                    at.path,
                ),
            );
        }
    }
}

fn describe(path: &Path, key: &str) -> String {
    format!("file {}#{key}", path.display())
}

pub struct FileStore {
    path: PathBuf,
    key: String,
}

impl FileStore {
    pub fn new(path: PathBuf, key: &str) -> Self {
        FileStore {
            path,
            key: key.to_string(),
        }
    }

    fn error(&self, cause: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            cause: cause.to_string(),
        }
    }

    fn read_text(&self) -> Result<String, StoreError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::Missing {
                store: self.describe(),
                what: format!("the file {}", self.path.display()),
            }),
            Err(e) => Err(self.error(e)),
        }
    }

    /// The file's text, refused when a line assigns the key a value whose quote is not closed:
    /// the key would read as absent, and a write would add a second assignment.
    fn read_entries(&self) -> Result<zeroize::Zeroizing<String>, StoreError> {
        let text = zeroize::Zeroizing::new(self.read_text()?);
        match dotenv::unclosed_quote(&text, &self.key) {
            None => Ok(text),
            Some(line) => Err(StoreError::Format {
                store: self.describe(),
                message: format!(
                    "line {line} gives {} a quoted value that does not end on that line; \
                     this store holds one line per key: put the value on one line",
                    self.key
                ),
            }),
        }
    }

    fn swap_blocking(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        let text = self.read_entries()?;
        let current = dotenv::find(&text, &self.key).map(|e| Secret::new(e.value));
        if current.as_ref() != expected {
            return Err(StoreError::Conflict {
                store: self.describe(),
            });
        }
        let updated = dotenv::replace(&text, &self.key, new.map(Secret::expose))
            .map(zeroize::Zeroizing::new)
            .ok_or_else(|| StoreError::Format {
                store: self.describe(),
                message: "the value holds characters that bash and python-dotenv would read \
                          differently under any quoting (' with $ or `, a trailing \\, or ${)"
                    .into(),
            })?;
        write_atomically(&self.path, updated.as_bytes()).map_err(|e| self.error(e))
    }
}

/// Writes a sibling temp file with the original's mode and owner, syncs it, then renames it over.
/// A symlink is followed: the file it points to is replaced in its own directory, and the link
/// stays a link (replacing the link would leave the real file with the old credential).
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let path = &std::fs::canonicalize(path)?;
    let metadata = std::fs::metadata(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.rotator-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        // Restrict before writing so the new value is never readable more widely than the old one.
        file.set_permissions(std::fs::Permissions::from_mode(metadata.mode() & 0o7777))?;
        // Ownership can only be kept when allowed (root, or the same owner); not fatal otherwise.
        let _ = std::os::unix::fs::fchown(&file, Some(metadata.uid()), Some(metadata.gid()));
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[async_trait]
impl Store for FileStore {
    fn describe(&self) -> String {
        describe(&self.path, &self.key)
    }

    async fn read(&self) -> Result<Option<Secret>, StoreError> {
        let text = self.read_entries()?;
        Ok(dotenv::find(&text, &self.key).map(|e| Secret::new(e.value)))
    }

    async fn compare_and_swap(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError> {
        tokio::task::block_in_place(|| self.swap_blocking(expected, new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_value_whose_quote_does_not_close_is_refused_not_read_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        let text = "A=1\nPGPASSWORD=\"s3cret-start\nrest\"\n";
        std::fs::write(&path, text).unwrap();
        let store = FileStore::new(path.clone(), "PGPASSWORD");
        for error in [
            store.read().await.unwrap_err(),
            store
                .compare_and_swap(None, Some(&Secret::new("new")))
                .await
                .unwrap_err(),
        ] {
            let message = error.to_string();
            assert!(
                message.contains("line 2 gives PGPASSWORD a quoted value"),
                "{message}"
            );
            assert!(!message.contains("s3cret"), "{message}");
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "unchanged");
        // Another key of the same file reads as before.
        let other = FileStore::new(path, "A");
        assert_eq!(other.read().await.unwrap().unwrap().expose(), "1");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn swaps_only_when_expected_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "# comment\nA=1\nURL=postgres://u:old@h/d\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let store = FileStore::new(path.clone(), "URL");

        let old = store.read().await.unwrap().unwrap();
        let new = Secret::new("postgres://u:new@h/d");
        store
            .compare_and_swap(Some(&old), Some(&new))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# comment\nA=1\nURL=postgres://u:new@h/d\n"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);

        let err = store
            .compare_and_swap(Some(&old), Some(&old))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(store.read().await.unwrap(), Some(new));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn missing_file_is_reported_by_name() {
        let store = FileStore::new("/nonexistent/.env".into(), "K");
        let err = store.read().await.unwrap_err().to_string();
        assert!(err.contains("/nonexistent/.env does not exist"), "{err}");
    }
}

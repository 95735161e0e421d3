//! Stores: where the workload reads its credential. One file per kind behind [`Store`].

pub mod aws;
pub mod dotenv;
pub mod external_secret;
pub mod file;
pub mod format;
pub mod kubernetes;
pub mod sealedsecret;
pub mod sigv4;
pub mod vault;

use async_trait::async_trait;

use crate::config::{At, Errors, Format, StoreConfig, Validate};
use crate::password::PasswordPolicy;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store}: {cause}")]
    Unavailable { store: String, cause: String },
    #[error("{store}: {what} does not exist")]
    Missing { store: String, what: String },
    #[error("{store}: the value was changed by someone else during the rotation; it was left as they wrote it")]
    Conflict { store: String },
    #[error("{store}: {message}")]
    Format { store: String, message: String },
}

impl StoreError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Unavailable { .. } => "store_unavailable",
            StoreError::Missing { .. } => "store_missing",
            StoreError::Conflict { .. } => "store_conflict",
            StoreError::Format { .. } => "store_format",
        }
    }
}

/// A key in some place a workload reads its configuration from.
///
/// Values are whole stored values (a URL, a password): [`format`](mod@format) finds the credential inside.
#[async_trait]
pub trait Store: Send + Sync {
    /// Names the place in reports: `kubernetes secret llmtrace/llmtrace#LLMTRACE_POSTGRES_URL`.
    fn describe(&self) -> String;

    /// The value under the key; `None` when the key is absent.
    async fn read(&self) -> Result<Option<Secret>, StoreError>;

    /// Sets the key to `new` (`None` removes it) only if it still holds `expected`; otherwise
    /// fails with [`StoreError::Conflict`] and changes nothing.
    async fn compare_and_swap(
        &self,
        expected: Option<&Secret>,
        new: Option<&Secret>,
    ) -> Result<(), StoreError>;

    /// Checks, before a run changes anything, that the store can take part (preflight calls it
    /// before reading). Nothing to check for most stores.
    async fn preflight(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// `check`: whether the copy pods read agrees with the source behind it (a SealedSecret and
    /// the Secret its controller unseals). Nothing to compare for most stores.
    async fn check_source(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Cleans up what an interrupted write may have left (a stale staging label); recovery
    /// calls it. Nothing to do for most stores.
    async fn tidy(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes sure a store that reads through a copy keeps serving `value`, which [`Store::read`]
    /// just returned: a rollback calls it when the copy still shows the original but the source
    /// behind it may hold this run's write (a SealedSecret the controller has not unsealed yet).
    async fn settle(&self, _value: Option<&Secret>) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store kind's settings (its `[[target.store]]` table), defined in the kind's own file and
/// listed in [`crate::config::StoreKind`].
pub trait StoreSettings: Validate {
    /// The key (or property) the credential is stored under.
    fn key(&self) -> &str;

    /// Names the place in reports and plans, as [`Store::describe`] does.
    fn describe(&self) -> String;

    /// Whether the store talks to the Kubernetes API.
    fn uses_kubernetes(&self) -> bool {
        false
    }

    /// Builds the store; Kubernetes stores need a client.
    fn open(&self, kube: Option<&kube::Client>) -> Result<Box<dyn Store>, StoreError>;

    /// Checks, at config time, that the store can hold every value the target will write
    /// (`at` is the store's table). Nothing to check for most stores.
    fn check_writes(&self, _writes: &Writes, _at: &At, _errors: &mut Errors) {}
}

/// What a target writes to its stores, for [`StoreSettings::check_writes`].
pub struct Writes<'a> {
    pub policy: &'a PasswordPolicy,
    /// The logins a value may name.
    pub logins: &'a [&'a str],
    pub format: &'a Format,
    /// Where the alphabet is set: the target's `password.alphabet`, or the defaults'.
    pub alphabet_path: &'a str,
}

/// The Kubernetes client a store needs, or the error saying there is none.
fn client<'a>(
    kube: Option<&'a kube::Client>,
    settings: &dyn StoreSettings,
) -> Result<&'a kube::Client, StoreError> {
    kube.ok_or_else(|| StoreError::Unavailable {
        store: settings.describe(),
        cause: "no Kubernetes client could be configured".into(),
    })
}

/// Builds the store for a config entry; Kubernetes stores need a client.
pub fn for_config(
    config: &StoreConfig,
    kube: Option<&kube::Client>,
) -> Result<Box<dyn Store>, StoreError> {
    config.kind.settings().open(kube)
}

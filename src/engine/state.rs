//! What a run has done so far, in enough detail to finish or undo it after a crash.
//!
//! Serialized into the journal only after AES-256-GCM sealing: it holds passwords.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::journal::StateError;
use crate::secret::{sealed_serde, Credential, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    #[default]
    NotStarted,
    /// Begun but not known to have finished: the change may or may not have happened.
    Started,
    Done,
    Undone,
}

impl Progress {
    /// Whether the step may have changed something that a rollback must put back.
    pub fn touched(self) -> bool {
        matches!(self, Progress::Started | Progress::Done)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedCredential {
    pub user: String,
    #[serde(with = "sealed_serde")]
    pub password: Secret,
}

impl From<&Credential> for SavedCredential {
    fn from(c: &Credential) -> Self {
        SavedCredential {
            user: c.user.clone(),
            password: c.password.clone(),
        }
    }
}

impl From<&SavedCredential> for Credential {
    fn from(c: &SavedCredential) -> Self {
        Credential {
            user: c.user.clone(),
            password: c.password.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StoreState {
    /// The whole value before the run (`None`: the key was absent).
    #[serde(with = "sealed_serde::option")]
    pub original: Option<Secret>,
    /// The whole value the run writes.
    #[serde(with = "sealed_serde::option")]
    pub written: Option<Secret>,
    pub publish: Progress,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetState {
    pub name: String,
    pub current: Option<SavedCredential>,
    pub next: Option<SavedCredential>,
    pub apply: Progress,
    pub stores: Vec<StoreState>,
    /// The ExternalSecret force-sync; absent in journals written before it existed.
    #[serde(default)]
    pub sync: Progress,
    pub retire: Progress,
    /// When `apply` began (ms since the epoch): a session older than that was opened with the
    /// old credential. Absent in journals written before `confirm` existed.
    #[serde(default)]
    pub applied_at: Option<i64>,
    /// How many sessions the rotated login had at preflight (`None`: no session list): a
    /// workload seen using the old credential must be seen using the new one.
    #[serde(default)]
    pub sessions_before: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerState {
    pub name: String,
    pub restart: Progress,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub targets: Vec<TargetState>,
    pub consumers: Vec<ConsumerState>,
    pub rolling_back: bool,
    /// Every store held the new credential, the consumers ran on it and it logged in: from here
    /// on the run is finished, never rolled back (recovery too).
    #[serde(default)]
    pub verified: bool,
}

impl RunState {
    pub fn new(targets: &[String], consumers: &[String]) -> Self {
        RunState {
            targets: targets
                .iter()
                .map(|name| TargetState {
                    name: name.clone(),
                    current: None,
                    next: None,
                    apply: Progress::NotStarted,
                    stores: Vec::new(),
                    sync: Progress::NotStarted,
                    retire: Progress::NotStarted,
                    applied_at: None,
                    sessions_before: None,
                })
                .collect(),
            consumers: consumers
                .iter()
                .map(|name| ConsumerState {
                    name: name.clone(),
                    restart: Progress::NotStarted,
                })
                .collect(),
            rolling_back: false,
            verified: false,
        }
    }

    /// The run's own part: consumers, the rollback flag and the order of the targets.
    pub fn header_bytes(&self) -> Zeroizing<Vec<u8>> {
        let header = Header {
            consumers: self.consumers.clone(),
            rolling_back: self.rolling_back,
            verified: self.verified,
            order: self.targets.iter().map(|t| t.name.clone()).collect(),
        };
        Zeroizing::new(serde_json::to_vec(&header).expect("run header serializes"))
    }

    /// One target's part, stored in a row of its own.
    pub fn target_bytes(&self, index: usize) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(&self.targets[index]).expect("target state serializes"))
    }

    /// Every target's part, keyed by target name.
    pub fn all_target_parts(&self) -> Vec<(String, Zeroizing<Vec<u8>>)> {
        (0..self.targets.len())
            .map(|i| (self.targets[i].name.clone(), self.target_bytes(i)))
            .collect()
    }

    /// Puts a run state back together from its header and target parts. A header written
    /// before targets had rows of their own holds the whole state.
    pub fn assemble(
        header: &[u8],
        parts: &[(String, Zeroizing<Vec<u8>>)],
    ) -> Result<RunState, StateError> {
        let unreadable = |e: serde_json::Error| StateError::Unreadable(e.classify_name());
        if parts.is_empty() {
            return serde_json::from_slice(header).map_err(unreadable);
        }
        let header: Header = serde_json::from_slice(header).map_err(unreadable)?;
        let mut targets = Vec::with_capacity(header.order.len());
        for name in &header.order {
            let (_, bytes) = parts
                .iter()
                .find(|(part, _)| part == name)
                .ok_or_else(|| StateError::MissingPart(name.clone()))?;
            targets.push(serde_json::from_slice(bytes).map_err(unreadable)?);
        }
        Ok(RunState {
            targets,
            consumers: header.consumers,
            rolling_back: header.rolling_back,
            verified: header.verified,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    consumers: Vec<ConsumerState>,
    rolling_back: bool,
    /// Absent in headers written before it existed: not verified, as before.
    #[serde(default)]
    verified: bool,
    order: Vec<String>,
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// The category only: serde messages can quote the offending input, which here holds secrets.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected data",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

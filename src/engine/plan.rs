//! Which targets a run rotates and which consumers it restarts (each once).

use serde::Serialize;

use super::EngineError;
use crate::config::{Config, Target};

#[derive(Debug, Serialize)]
pub struct Plan {
    pub targets: Vec<PlannedTarget>,
    /// Every consumer of every target, each named once: it restarts once per run.
    pub consumers: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PlannedTarget {
    pub name: String,
    pub kind: String,
    pub address: String,
    pub user: String,
    pub strategy: String,
    pub stores: Vec<String>,
    pub consumers: Vec<String>,
}

impl Plan {
    /// `names` empty means every target in the config.
    pub fn new(config: &Config, names: &[String]) -> Result<Plan, EngineError> {
        let selected: Vec<&Target> = if names.is_empty() {
            config.targets.iter().collect()
        } else {
            let mut selected = Vec::new();
            for name in names {
                let target = config
                    .target(name)
                    .ok_or_else(|| EngineError::UnknownTarget(name.clone()))?;
                if !selected.iter().any(|t: &&Target| t.name == target.name) {
                    selected.push(target);
                }
            }
            selected
        };
        let mut consumers: Vec<String> = Vec::new();
        for target in &selected {
            for consumer in &target.consumers {
                if !consumers.contains(consumer) {
                    consumers.push(consumer.clone());
                }
            }
        }
        let targets = selected
            .iter()
            .map(|t| PlannedTarget {
                name: t.name.clone(),
                kind: "postgres".into(),
                address: t.address.clone(),
                user: t.user.clone(),
                strategy: t.strategy.as_str().into(),
                stores: t.stores.iter().map(describe_store).collect(),
                consumers: t.consumers.clone(),
            })
            .collect();
        Ok(Plan { targets, consumers })
    }

    pub fn target_names(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.name.clone()).collect()
    }
}

fn describe_store(store: &crate::config::StoreConfig) -> String {
    use crate::config::{Format, StoreKind};
    let place = match &store.kind {
        StoreKind::Kubernetes { namespace, secret } => {
            format!("kubernetes secret {namespace}/{secret}#{}", store.key)
        }
        StoreKind::File { path } => format!("file {}#{}", path.display(), store.key),
    };
    let format = match store.format {
        Format::Url => "url",
        Format::Password => "password",
        Format::Template(_) => "template",
    };
    format!("{place} ({format})")
}

//! Which targets a run rotates and which consumers it restarts (each once).

use serde::Serialize;

use super::{Deps, EngineError};
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
                kind: t.kind().into(),
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
    use crate::config::Format;
    let place = store.describe();
    let format = match store.format {
        Format::Url => "url",
        Format::Password => "password",
        Format::Template(_) => "template",
    };
    format!("{place} ({format})")
}

/// A dry run: the plan and the read-only preflight of every target and consumer.
#[derive(Debug, Serialize)]
pub struct DryRun<'a> {
    pub dry_run: bool,
    pub plan: &'a Plan,
    pub preflight: Vec<PreflightResult>,
}

#[derive(Debug, Serialize)]
pub struct PreflightResult {
    /// A target name, or `consumer/NAME`.
    pub subject: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Runs preflight on every planned target and consumer; writes nothing anywhere.
pub async fn dry_run<'a>(deps: &Deps, plan: &'a Plan) -> DryRun<'a> {
    let mut results = Vec::new();
    for planned in &plan.targets {
        let result = super::preflight::preflight_named(deps, &planned.name)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        results.push(PreflightResult {
            subject: planned.name.clone(),
            ok: result.is_ok(),
            error: result.err(),
        });
    }
    for name in &plan.consumers {
        let result = match deps.consumer(name) {
            Ok(handle) => handle.preflight().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        results.push(PreflightResult {
            subject: format!("consumer/{name}"),
            ok: result.is_ok(),
            error: result.err(),
        });
    }
    DryRun {
        dry_run: true,
        plan,
        preflight: results,
    }
}

impl DryRun<'_> {
    pub fn all_ok(&self) -> bool {
        self.preflight.iter().all(|r| r.ok)
    }

    pub fn to_text(&self) -> String {
        let mut out = String::from("dry run: nothing will be changed\n");
        for t in &self.plan.targets {
            out.push_str(&format!(
                "target {} ({} {}, user {}, strategy {})\n",
                t.name, t.kind, t.address, t.user, t.strategy
            ));
            for s in &t.stores {
                out.push_str(&format!("  store   {s}\n"));
            }
        }
        for c in &self.plan.consumers {
            out.push_str(&format!("consumer {c}: restarted once\n"));
        }
        out.push_str(
            "steps: preflight, generate, apply, verify-backend, publish, restart, verify, retire\n",
        );
        for r in &self.preflight {
            match &r.error {
                None => out.push_str(&format!("preflight {}: ok\n", r.subject)),
                Some(e) => out.push_str(&format!("preflight {}: FAILED: {e}\n", r.subject)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_is_labelled_with_its_own_kind() {
        let mut text = String::from(
            "[rotator]\njournal = \"sqlite://j.db\"\njournal_key = \"literal:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n",
        );
        for (name, extra) in [
            ("postgres", "database = \"llmtrace\"\nadmin = { user = \"postgres\", password = \"literal:x\" }"),
            ("redis", "admin = { user = \"admin\", password = \"literal:x\" }"),
            ("clickhouse", "admin = { user = \"default\", password = \"literal:x\" }"),
        ] {
            text.push_str(&format!(
                "[[target]]\nname = \"{name}\"\nkind = \"{name}\"\naddress = \"127.0.0.1:1\"\nuser = \"llmtrace\"\n{extra}\n[[target.store]]\nkind = \"file\"\npath = \".env\"\nkey = \"{name}\"\nformat = \"password\"\n"
            ));
        }
        let config =
            Config::parse(&text, std::path::Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let plan = Plan::new(&config, &[]).unwrap();
        let kinds: Vec<&str> = plan.targets.iter().map(|t| t.kind.as_str()).collect();
        assert_eq!(kinds, ["postgres", "redis", "clickhouse"]);
    }
}

//! `rbac`: the least-privilege Role (and RoleBinding) a config needs: every Kubernetes request
//! the rotator makes for it, by object name where the API allows one, grouped per namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use crate::config::{Config, ConsumerKind, JournalLocation, Reference, StoreKind};

/// (API group, resource, object name; empty where RBAC cannot name one: `create`)
type Object = (&'static str, &'static str, String);

/// The order rules are printed in: what is read and written first, then what is restarted.
const RESOURCE_ORDER: [&str; 6] = [
    "secrets",
    "sealedsecrets",
    "externalsecrets",
    "deployments",
    "statefulsets",
    "events",
];
const VERB_ORDER: [&str; 4] = ["get", "update", "patch", "create"];

/// What the rotator asks of the API for `config`: per namespace, each object and its verbs.
pub fn needed(config: &Config) -> BTreeMap<String, BTreeMap<Object, BTreeSet<&'static str>>> {
    let mut needed: BTreeMap<String, BTreeMap<Object, BTreeSet<&'static str>>> = BTreeMap::new();
    let mut grant = |ns: &str, group, resource, name: &str, verbs: &[&'static str]| {
        needed
            .entry(ns.to_string())
            .or_default()
            .entry((group, resource, name.to_string()))
            .or_default()
            .extend(verbs);
    };
    // `k8s:` references are read (get) when the config is resolved.
    let mut references: Vec<&Reference> = vec![&config.rotator.journal_key];
    if let JournalLocation::Reference(r) = &config.rotator.journal {
        references.push(r);
    }
    references.extend(&config.rotator.api_tokens);
    references.extend(
        config
            .targets
            .iter()
            .filter_map(|t| t.admin_password.as_ref()),
    );
    for reference in references {
        if let Reference::Kubernetes {
            namespace, secret, ..
        } = reference
        {
            grant(namespace, "", "secrets", secret, &["get"]);
        }
    }
    for target in &config.targets {
        for store in &target.stores {
            match &store.kind {
                // Read, then PUT with the resourceVersion read; an Event on it after the run.
                StoreKind::Kubernetes(secret) => {
                    let namespace = &secret.namespace;
                    grant(namespace, "", "secrets", &secret.secret, &["get", "update"]);
                    grant(namespace, "events.k8s.io", "events", "", &["create"]);
                }
                // Read (resourceVersion, scopes) and merge-patch the SealedSecret; poll the
                // Secret the controller unseals into.
                StoreKind::SealedSecret(sealed) => {
                    let (ns, name) = (&sealed.namespace, &sealed.name);
                    grant(ns, "bitnami.com", "sealedsecrets", name, &["get", "patch"]);
                    grant(ns, "", "secrets", name, &["get"]);
                }
                _ => {}
            }
        }
        // Read the ExternalSecret (refresh policy), merge-patch it to force a sync, poll the
        // Secret it writes.
        for sync in &target.sync {
            let (ns, name) = (&sync.namespace, &sync.external_secret);
            grant(
                ns,
                "external-secrets.io",
                "externalsecrets",
                name,
                &["get", "patch"],
            );
            grant(ns, "", "secrets", &sync.secret, &["get"]);
        }
    }
    for consumer in &config.consumers {
        let (resource, namespace, object) = match &consumer.kind {
            ConsumerKind::Deployment(w) => ("deployments", &w.namespace, &w.object),
            ConsumerKind::StatefulSet(w) => ("statefulsets", &w.namespace, &w.object),
            ConsumerKind::Command(_) => continue,
        };
        // Read (preflight, rollout status), strategic-merge-patch the restart annotation.
        grant(namespace, "apps", resource, object, &["get", "patch"]);
        grant(namespace, "events.k8s.io", "events", "", &["create"]);
    }
    needed
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items
        .into_iter()
        .map(|s| serde_json::to_string(s).expect("strings serialize"))
        .collect();
    format!("[{}]", quoted.join(", "))
}

fn position(order: &[&str], item: &str) -> usize {
    order.iter().position(|o| *o == item).unwrap_or(order.len())
}

/// The Role for one namespace: a rule per resource and set of verbs, naming its objects.
fn role(out: &mut String, name: &str, ns: &str, objects: &BTreeMap<Object, BTreeSet<&str>>) {
    // (resource order, group, resource, verbs in order) -> object names
    let mut rules: BTreeMap<(usize, &str, &str, Vec<&str>), Vec<&str>> = BTreeMap::new();
    for ((group, resource, object), verbs) in objects {
        let mut verbs: Vec<&str> = verbs.iter().copied().collect();
        verbs.sort_by_key(|v| position(&VERB_ORDER, v));
        rules
            .entry((position(&RESOURCE_ORDER, resource), group, resource, verbs))
            .or_default()
            .push(object);
    }
    let _ = writeln!(
        out,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}\n  namespace: {ns}\nrules:"
    );
    for ((_, group, resource, verbs), names) in rules {
        let _ = writeln!(out, "  - apiGroups: {}", list([group]));
        let _ = writeln!(out, "    resources: {}", list([resource]));
        let names: Vec<&str> = names.into_iter().filter(|n| !n.is_empty()).collect();
        if !names.is_empty() {
            let _ = writeln!(out, "    resourceNames: {}", list(names));
        }
        let _ = writeln!(out, "    verbs: {}", list(verbs));
    }
}

/// Why no Role can be rendered without more input.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("--namespace is required: the config touches namespaces {} and the ServiceAccount lives in one of them (or another)", .0.join(", "))]
    NamespaceRequired(Vec<String>),
}

/// The Role and RoleBinding for every namespace the config touches, as YAML documents.
/// `account_namespace` is where the rotator's ServiceAccount lives; without it, the one
/// namespace the config touches. `Err` names what is missing.
pub fn render(
    config: &Config,
    service_account: &str,
    account_namespace: Option<&str>,
) -> Result<String, RbacError> {
    let needed = needed(config);
    let account_namespace = match (account_namespace, needed.len()) {
        (Some(ns), _) => ns.to_string(),
        (None, 1) => needed.keys().next().expect("one namespace").clone(),
        (None, 0) => String::new(),
        (None, _) => {
            return Err(RbacError::NamespaceRequired(
                needed.keys().cloned().collect(),
            ))
        }
    };
    let mut out = String::new();
    for (ns, objects) in &needed {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        role(&mut out, service_account, ns, objects);
        let _ = writeln!(
            out,
            "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {service_account}\n  namespace: {ns}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {service_account}\nsubjects:\n  - kind: ServiceAccount\n    name: {service_account}\n    namespace: {account_namespace}"
        );
    }
    Ok(out)
}

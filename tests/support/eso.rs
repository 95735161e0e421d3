//! A stand-in for the External Secrets Operator controller, run by the test beside the rotator:
//! when ESO's `shouldRefresh` says so (a changed `force-sync` annotation, unless the
//! refreshPolicy rules it out) it reads the real OpenBao the spec points at and writes the
//! target Secret through the fake, as ESO's reconcile would.
//!
//! Follows external-secrets/external-secrets pkg/controllers/externalsecret/
//! externalsecret_controller.go (`shouldRefresh`, `shouldRefreshPeriodic`; sync windows are not
//! modelled) and pkg/controllers/util/util.go (`GetResourceVersion`: generation plus a hash of
//! labels and annotations).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::kube_fake::KubeFake;
use super::openbao::OpenBao;

pub struct EsoController<'a> {
    pub kube: &'a KubeFake,
    pub bao: &'a OpenBao,
    pub namespace: &'a str,
    pub name: &'a str,
    /// `false`: the controller is down (crashed, scaled to zero): nothing syncs.
    pub syncing: bool,
    /// `true`: each reconcile fails to read the provider (a revoked token, say), and ESO marks
    /// the ExternalSecret failed instead of writing the Secret.
    pub failing: bool,
    /// Provider round trip plus reconcile queueing.
    pub delay: Duration,
}

impl<'a> EsoController<'a> {
    /// A controller that syncs ExternalSecret `namespace/name` at once, and never fails.
    pub fn new(kube: &'a KubeFake, bao: &'a OpenBao, namespace: &'a str, name: &'a str) -> Self {
        EsoController {
            kube,
            bao,
            namespace,
            name,
            syncing: true,
            failing: false,
            delay: Duration::ZERO,
        }
    }

    /// Reconciles until `stop`; returns every force-sync value it saw change to.
    pub async fn run(&self, stop: CancellationToken) -> Vec<String> {
        let mut last = self.stamp();
        let mut seen = Vec::new();
        loop {
            let stopped = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(Duration::from_millis(50)) => false,
            };
            let stamp = self.stamp();
            if stamp != last {
                // A force-sync just before the stop is still seen (ESO would still reconcile).
                seen.extend(stamp.clone());
                last = stamp;
            }
            if stopped {
                return seen;
            }
            let es = self
                .kube
                .external_secret(self.namespace, self.name)
                .unwrap();
            let target = es
                .pointer("/spec/target/name")
                .and_then(Value::as_str)
                .unwrap_or(self.name);
            let secret_exists = self.kube.secret(self.namespace, target).is_some();
            // Reconcile skips when `!shouldRefresh(es) && isSecretValid(secret)`.
            if !(self.syncing && (should_refresh(&es) || !secret_exists)) {
                continue;
            }
            tokio::time::sleep(self.delay).await;
            if self.failing {
                // externalsecret_controller.go: `markAsFailed(msgErrorGetSecretData, ...)`.
                self.kube.fail_external_sync(
                    self.namespace,
                    self.name,
                    "SecretSyncedError",
                    "could not get secret data from provider",
                );
            } else {
                let version = synced_version(&es);
                let data = self.fetch().await;
                self.kube
                    .complete_external_sync(self.namespace, self.name, &data, &version);
            }
        }
    }

    /// Records the ExternalSecret as synced with `data`, as ESO leaves it after its first
    /// reconcile (the state a rotation finds).
    pub fn mark_synced(&self, data: &BTreeMap<String, String>) {
        let es = self
            .kube
            .external_secret(self.namespace, self.name)
            .unwrap();
        self.kube
            .complete_external_sync(self.namespace, self.name, data, &synced_version(&es));
    }

    fn stamp(&self) -> Option<String> {
        self.kube
            .external_secret(self.namespace, self.name)?
            .pointer("/metadata/annotations/force-sync")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// `spec.dataFrom[].extract` (every property) and `spec.data[]` (one property each).
    async fn fetch(&self) -> BTreeMap<String, String> {
        let es = self
            .kube
            .external_secret(self.namespace, self.name)
            .unwrap();
        let mut out = BTreeMap::new();
        for from in es["spec"]["dataFrom"].as_array().into_iter().flatten() {
            let path = from["extract"]["key"].as_str().unwrap();
            let (data, _) = self.bao.get_kv(path).await;
            for (k, v) in data.as_object().unwrap() {
                out.insert(k.clone(), v.as_str().unwrap().to_string());
            }
        }
        for item in es["spec"]["data"].as_array().into_iter().flatten() {
            let (data, _) = self
                .bao
                .get_kv(item["remoteRef"]["key"].as_str().unwrap())
                .await;
            let property = item["remoteRef"]["property"].as_str().unwrap();
            out.insert(
                item["secretKey"].as_str().unwrap().to_string(),
                data[property].as_str().unwrap().to_string(),
            );
        }
        out
    }
}

/// ESO's `GetResourceVersion`: the generation and a hash of labels and annotations, so a new
/// force-sync value makes it differ from `status.syncedResourceVersion`.
fn synced_version(es: &Value) -> String {
    let meta = &es["metadata"];
    let hashed = json!({ "annotations": meta["annotations"], "labels": meta["labels"] });
    let hash = Sha256::digest(hashed.to_string().as_bytes());
    let generation = meta["generation"].as_i64().unwrap_or(0);
    format!("{generation}-{:x}", hash)
}

/// ESO's `shouldRefresh`.
fn should_refresh(es: &Value) -> bool {
    let synced = es
        .pointer("/status/syncedResourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let refresh_time = es
        .pointer("/status/refreshTime")
        .and_then(Value::as_str)
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc());
    let never_synced = synced.is_empty() || refresh_time.is_none();
    match es["spec"]["refreshPolicy"].as_str().unwrap_or("") {
        "CreatedOnce" => never_synced,
        "OnChange" => never_synced || synced != synced_version(es),
        // Periodic, and the default.
        _ => {
            // The CRD defaults refreshInterval to 1h0m0s.
            let interval = go_duration(es["spec"]["refreshInterval"].as_str().unwrap_or("1h"));
            if interval.is_zero() && !synced.is_empty() {
                return false;
            }
            if synced != synced_version(es) {
                return true;
            }
            let Some(refreshed) = refresh_time else {
                return true;
            };
            let now = chrono::Utc::now();
            refreshed > now || refreshed + chrono::Duration::from_std(interval).unwrap() < now
        }
    }
}

/// A Go duration made of whole-number components ("1h", "0s", "1h30m", "0"), enough for tests.
fn go_duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().unwrap();
        number.clear();
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                Duration::from_millis(1)
            }
            ('h', _) => Duration::from_secs(3600),
            ('m', _) => Duration::from_secs(60),
            ('s', _) => Duration::from_secs(1),
            _ => panic!("unsupported duration {text:?}"),
        };
        total += unit * n as u32;
    }
    assert!(
        number.is_empty() || number.chars().all(|c| c == '0'),
        "{text:?}"
    );
    total
}

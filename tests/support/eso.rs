//! A stand-in for the External Secrets Operator controller, run by the test beside the rotator:
//! when an ExternalSecret's `force-sync` annotation changes it reads the real OpenBao the spec
//! points at and writes the target Secret through the fake, as ESO's reconcile would.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::kube_fake::KubeFake;
use super::openbao::OpenBao;

pub struct EsoController<'a> {
    pub kube: &'a KubeFake,
    pub bao: &'a OpenBao,
    pub namespace: &'a str,
    pub name: &'a str,
    /// `false`: the controller is down (bad provider credentials, crashed): nothing syncs.
    pub syncing: bool,
    /// Provider round trip plus reconcile queueing.
    pub delay: Duration,
}

impl EsoController<'_> {
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
            }
            if stopped {
                return seen;
            }
            if stamp == last {
                continue;
            }
            last = stamp;
            if self.syncing {
                tokio::time::sleep(self.delay).await;
                let data = self.fetch().await;
                self.kube
                    .complete_external_sync(self.namespace, self.name, &data);
            }
        }
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

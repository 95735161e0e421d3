//! Deployments and StatefulSets: `kubectl rollout restart`, then wait as `kubectl rollout status` does.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::api::{Api, Patch, PatchParams};
use tokio::time::Instant;

use super::{Consumer, ConsumerError, ConsumerSettings, POLL_INTERVAL};
use crate::config::{At, Errors, Validate};
use crate::kube_api::describe_kube_error;

/// `kind = "deployment"` (`STATEFUL` false) or `"statefulset"`: a workload restarted the way
/// `kubectl rollout restart` does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct WorkloadConfig<const STATEFUL: bool> {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub object: String,
}

pub type DeploymentConfig = WorkloadConfig<false>;
pub type StatefulSetConfig = WorkloadConfig<true>;

impl<const STATEFUL: bool> Validate for WorkloadConfig<STATEFUL> {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        errors.require(&self.namespace, at, "namespace");
        errors.require(&self.object, at, "object");
    }
}

impl<const STATEFUL: bool> ConsumerSettings for WorkloadConfig<STATEFUL> {
    fn uses_kubernetes(&self) -> bool {
        true
    }

    fn open(&self, kube: Option<&kube::Client>) -> Option<Box<dyn Consumer>> {
        let client = kube?.clone();
        let kind = if STATEFUL {
            Kind::StatefulSet(Api::namespaced(client, &self.namespace))
        } else {
            Kind::Deployment(Api::namespaced(client, &self.namespace))
        };
        Some(Box::new(Workload {
            kind,
            namespace: self.namespace.clone(),
            name: self.object.clone(),
        }))
    }
}

pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

enum Kind {
    Deployment(Api<Deployment>),
    StatefulSet(Api<StatefulSet>),
}

pub struct Workload {
    kind: Kind,
    namespace: String,
    name: String,
}

/// What a rollout is doing now, as `kubectl rollout status` would judge it.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Done,
    Waiting(String),
    Failed(String),
}

impl Workload {
    fn api_error(&self, error: kube::Error) -> ConsumerError {
        ConsumerError::Api {
            consumer: self.describe(),
            cause: describe_kube_error(&error),
        }
    }

    fn refused(&self, message: impl Into<String>) -> ConsumerError {
        ConsumerError::Refused {
            consumer: self.describe(),
            message: message.into(),
        }
    }

    /// Refuses what `kubectl rollout restart` refuses, or what a restart could not roll out.
    async fn check_restartable(&self) -> Result<(), ConsumerError> {
        match &self.kind {
            Kind::Deployment(api) => {
                let deployment = api.get(&self.name).await.map_err(|e| self.api_error(e))?;
                if deployment.spec.as_ref().and_then(|s| s.paused) == Some(true) {
                    return Err(self.refused(
                        "the Deployment is paused (kubectl rollout resume it first); a restart would never roll out",
                    ));
                }
            }
            Kind::StatefulSet(api) => {
                let set = api.get(&self.name).await.map_err(|e| self.api_error(e))?;
                let strategy = set
                    .spec
                    .as_ref()
                    .and_then(|s| s.update_strategy.as_ref())
                    .and_then(|u| u.type_.clone());
                if strategy.as_deref() == Some("OnDelete") {
                    return Err(self.refused(
                        "the StatefulSet's updateStrategy is OnDelete: its pods do not restart on a template change",
                    ));
                }
                // Pods with an ordinal below the partition keep the old template, and the
                // rollout still counts as complete, so they would keep the old credential.
                let partition = set
                    .spec
                    .as_ref()
                    .and_then(|s| s.update_strategy.as_ref())
                    .and_then(|u| u.rolling_update.as_ref())
                    .and_then(|r| r.partition)
                    .unwrap_or(0);
                if partition > 0 {
                    return Err(self.refused(format!(
                        "the StatefulSet's spec.updateStrategy.rollingUpdate.partition is {partition}: pods 0..{} would not restart and would keep the old credential; set the partition to 0 (or finish the staged rollout) first",
                        partition - 1
                    )));
                }
            }
        }
        Ok(())
    }

    async fn patch_restarted_at(&self) -> Result<(), ConsumerError> {
        // Sub-second precision: a rollback's second restart may come within the same second,
        // and an unchanged annotation would be a no-op that replaces no pod.
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let patch = serde_json::json!({
            "spec": { "template": { "metadata": { "annotations": { RESTARTED_AT: now } } } }
        });
        let params = PatchParams::default();
        let result = match &self.kind {
            Kind::Deployment(api) => api
                .patch(&self.name, &params, &Patch::Strategic(&patch))
                .await
                .map(|_| ()),
            Kind::StatefulSet(api) => api
                .patch(&self.name, &params, &Patch::Strategic(&patch))
                .await
                .map(|_| ()),
        };
        result.map_err(|e| self.api_error(e))
    }

    async fn progress(&self) -> Result<Progress, ConsumerError> {
        Ok(match &self.kind {
            Kind::Deployment(api) => {
                deployment_progress(&api.get(&self.name).await.map_err(|e| self.api_error(e))?)
            }
            Kind::StatefulSet(api) => {
                statefulset_progress(&api.get(&self.name).await.map_err(|e| self.api_error(e))?)
            }
        })
    }
}

/// `kubectl rollout status` for a Deployment (kubectl's DeploymentStatusViewer).
pub fn deployment_progress(deployment: &Deployment) -> Progress {
    let generation = deployment.metadata.generation.unwrap_or(0);
    let Some(status) = deployment.status.as_ref() else {
        return Progress::Waiting("the controller has not reported status yet".into());
    };
    if generation > status.observed_generation.unwrap_or(0) {
        return Progress::Waiting("the controller has not observed the restart yet".into());
    }
    let deadline_exceeded = status.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if deadline_exceeded {
        return Progress::Failed(
            "ProgressDeadlineExceeded: the new pods did not become ready".into(),
        );
    }
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < wanted {
        Progress::Waiting(format!(
            "{updated} of {wanted} new replicas have been updated"
        ))
    } else if total > updated {
        Progress::Waiting(format!(
            "{} old replicas are pending termination",
            total - updated
        ))
    } else if available < updated {
        Progress::Waiting(format!(
            "{available} of {updated} updated replicas are available"
        ))
    } else {
        Progress::Done
    }
}

/// `kubectl rollout status` for a RollingUpdate StatefulSet (kubectl's StatefulSetStatusViewer).
pub fn statefulset_progress(set: &StatefulSet) -> Progress {
    let Some(status) = set.status.as_ref() else {
        return Progress::Waiting("the controller has not reported status yet".into());
    };
    let observed = status.observed_generation.unwrap_or(0);
    if observed == 0 || set.metadata.generation.unwrap_or(0) > observed {
        return Progress::Waiting("the controller has not observed the restart yet".into());
    }
    let spec = set.spec.as_ref();
    let wanted = spec.and_then(|s| s.replicas).unwrap_or(1);
    let ready = status.ready_replicas.unwrap_or(0);
    if ready < wanted {
        return Progress::Waiting(format!("{ready} of {wanted} pods are ready"));
    }
    let partition = spec
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    if partition > 0 {
        let updated = status.updated_replicas.unwrap_or(0);
        return if updated < wanted - partition {
            Progress::Waiting(format!(
                "{updated} of {} pods above the partition are updated",
                wanted - partition
            ))
        } else {
            Progress::Done
        };
    }
    if status.update_revision != status.current_revision {
        return Progress::Waiting(format!(
            "{} of {wanted} pods run the new revision",
            status.updated_replicas.unwrap_or(0)
        ));
    }
    Progress::Done
}

#[async_trait]
impl Consumer for Workload {
    fn describe(&self) -> String {
        let kind = match self.kind {
            Kind::Deployment(_) => "deployment",
            Kind::StatefulSet(_) => "statefulset",
        };
        format!("{kind} {}/{}", self.namespace, self.name)
    }

    async fn preflight(&self) -> Result<(), ConsumerError> {
        self.check_restartable().await
    }

    async fn restart(&self, timeout: Duration) -> Result<(), ConsumerError> {
        let deadline = Instant::now() + timeout;
        self.check_restartable().await?;
        self.patch_restarted_at().await?;
        loop {
            match self.progress().await? {
                Progress::Done => return Ok(()),
                Progress::Failed(message) => {
                    return Err(ConsumerError::RolloutFailed {
                        consumer: self.describe(),
                        message,
                    })
                }
                Progress::Waiting(waiting_for) if Instant::now() + POLL_INTERVAL > deadline => {
                    return Err(ConsumerError::Timeout {
                        consumer: self.describe(),
                        timeout,
                        waiting_for,
                    })
                }
                Progress::Waiting(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(value: serde_json::Value) -> Deployment {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn deployment_waits_like_kubectl() {
        let base = |status: serde_json::Value| {
            deployment(serde_json::json!({
                "metadata": {"name": "d", "generation": 3},
                "spec": {"replicas": 2, "selector": {}, "template": {}},
                "status": status,
            }))
        };
        let waiting = |d: &Deployment| matches!(deployment_progress(d), Progress::Waiting(_));
        assert!(waiting(&base(serde_json::json!({"observedGeneration": 2}))));
        assert!(waiting(&base(
            serde_json::json!({"observedGeneration": 3, "updatedReplicas": 1, "replicas": 2})
        )));
        assert!(waiting(&base(
            serde_json::json!({"observedGeneration": 3, "updatedReplicas": 2, "replicas": 3, "availableReplicas": 2})
        )));
        assert!(waiting(&base(
            serde_json::json!({"observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 1})
        )));
        assert_eq!(
            deployment_progress(&base(
                serde_json::json!({"observedGeneration": 3, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2})
            )),
            Progress::Done
        );
        let stuck = base(serde_json::json!({
            "observedGeneration": 3, "updatedReplicas": 1, "replicas": 3,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
        }));
        assert!(matches!(deployment_progress(&stuck), Progress::Failed(_)));
    }

    #[test]
    fn statefulset_waits_for_ready_and_revision() {
        let set = |status: serde_json::Value, partition: Option<i32>| -> StatefulSet {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "s", "generation": 2},
                "spec": {"replicas": 3, "selector": {}, "serviceName": "s", "template": {},
                         "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}}},
                "status": status,
            }))
            .unwrap()
        };
        let s = |ready: i32, updated: i32, cur: &str, upd: &str, p| {
            set(
                serde_json::json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": ready,
                "updatedReplicas": updated, "currentRevision": cur, "updateRevision": upd}),
                p,
            )
        };
        assert!(matches!(
            statefulset_progress(&s(2, 3, "a", "b", None)),
            Progress::Waiting(_)
        ));
        assert!(matches!(
            statefulset_progress(&s(3, 2, "a", "b", None)),
            Progress::Waiting(_)
        ));
        assert_eq!(
            statefulset_progress(&s(3, 3, "b", "b", None)),
            Progress::Done
        );
        assert_eq!(
            statefulset_progress(&s(3, 1, "a", "b", Some(2))),
            Progress::Done
        );
        assert!(matches!(
            statefulset_progress(&s(3, 0, "a", "b", Some(2))),
            Progress::Waiting(_)
        ));
    }
}

//! Reads the secret a credential reference points at.

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::Api;

use crate::config::Reference;
use crate::kube_api::describe_kube_error;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
#[error("{field} = {reference}: {message}")]
pub struct ResolveError {
    pub field: String,
    pub reference: String,
    pub message: String,
}

/// Resolves `reference`; `field` names the config key it came from, for the error.
pub async fn resolve(
    reference: &Reference,
    field: &str,
    kube: Option<&kube::Client>,
) -> Result<Secret, ResolveError> {
    let error = |message: String| ResolveError {
        field: field.to_string(),
        reference: reference.to_string(),
        message,
    };
    let value = match reference {
        Reference::Literal(value) => value.clone(),
        Reference::Env(name) => Secret::new(
            std::env::var(name)
                .map_err(|_| error(format!("environment variable {name} is not set")))?,
        ),
        Reference::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
            // Files written by editors or `echo` end with a newline that is not part of the secret.
            Secret::new(text.trim_end_matches(['\n', '\r']))
        }
        Reference::Kubernetes {
            namespace,
            secret,
            key,
        } => {
            let client =
                kube.ok_or_else(|| error("no Kubernetes client could be configured".into()))?;
            let api: Api<KubeSecret> = Api::namespaced(client.clone(), namespace);
            let object = api
                .get_opt(secret)
                .await
                .map_err(|e| error(describe_kube_error(&e)))?
                .ok_or_else(|| error(format!("the Secret {namespace}/{secret} does not exist")))?;
            let bytes = object.data.and_then(|mut d| d.remove(key)).ok_or_else(|| {
                error(format!("the Secret {namespace}/{secret} has no key {key}"))
            })?;
            Secret::new(
                String::from_utf8(bytes.0).map_err(|_| error("the value is not UTF-8".into()))?,
            )
        }
    };
    if value.is_empty() {
        return Err(error("the value is empty".into()));
    }
    Ok(value)
}

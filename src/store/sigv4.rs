//! AWS Signature Version 4 for the few JSON calls the `aws` store makes, and the credential
//! chain it needs (environment, then web identity for IRSA).
//!
//! A hand-written signer instead of the AWS SDK: the SDK would add about 60 crates, among
//! them a second TLS stack and aws-lc-sys (a CMake build of a C library), for four calls.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The headers to add to a POST of `body` to `host` at path `/`: `x-amz-date`,
/// `authorization` and, with temporary credentials, `x-amz-security-token`.
pub fn sign(
    credentials: &Credentials,
    region: &str,
    service: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<(String, String)> {
    let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let date = &amz_date[..8];
    let mut signed: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .chain([
            ("host".to_string(), host.to_string()),
            ("x-amz-date".to_string(), amz_date.clone()),
        ])
        .collect();
    if let Some(token) = &credentials.session_token {
        signed.push(("x-amz-security-token".into(), token.expose().to_string()));
    }
    signed.sort();
    let canonical_headers: String = signed.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = signed
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "POST\n/\n\n{canonical_headers}\n{signed_headers}\n{}",
        hex(&Sha256::digest(body))
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let key = [date, region, service, "aws4_request"].iter().fold(
        format!("AWS4{}", credentials.secret_access_key.expose()).into_bytes(),
        |key, part| hmac(&key, part.as_bytes()).to_vec(),
    );
    let signature = hex(&hmac(&key, string_to_sign.as_bytes()));
    let mut out = vec![
        ("x-amz-date".to_string(), amz_date),
        (
            "authorization".to_string(),
            format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}", credentials.access_key_id),
        ),
    ];
    if let Some(token) = &credentials.session_token {
        out.push(("x-amz-security-token".into(), token.expose().to_string()));
    }
    out
}

/// Why no AWS credentials could be had. Never holds a key or the web identity token.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN (IRSA)")]
    Missing,
    #[error("cannot read AWS_WEB_IDENTITY_TOKEN_FILE {path}: {source}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The error without its URL (the form body is not in it either).
    #[error("STS could not be reached: {0}")]
    Unreachable(String),
    #[error("STS AssumeRoleWithWebIdentity for {role} failed: {status} {code}")]
    Refused {
        role: String,
        status: reqwest::StatusCode,
        code: String,
    },
    #[error("STS answered without credentials")]
    NoCredentials,
}

/// Credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else
/// from `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` through STS (IRSA on EKS).
pub async fn credentials(
    http: &reqwest::Client,
    region: &str,
) -> Result<Credentials, CredentialsError> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Credentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: env("AWS_SESSION_TOKEN").map(Secret::new),
        });
    }
    let (Some(token_file), Some(role)) = (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN"))
    else {
        return Err(CredentialsError::Missing);
    };
    let token =
        std::fs::read_to_string(&token_file).map_err(|source| CredentialsError::TokenFile {
            path: token_file.clone(),
            source,
        })?;
    let endpoint = env("AWS_ENDPOINT_URL_STS")
        .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
    let session = env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "llmtrace-rotator".into());
    let form = [
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", role.as_str()),
        ("RoleSessionName", session.as_str()),
        ("WebIdentityToken", token.trim()),
    ];
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let response = http
        .post(endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| CredentialsError::Unreachable(crate::secret::http_error_text(e)))?;
    let status = response.status();
    let xml = response.text().await.unwrap_or_default();
    if !status.is_success() {
        let code = xml_field(&xml, "Code").unwrap_or_default();
        return Err(CredentialsError::Refused { role, status, code });
    }
    match (
        xml_field(&xml, "AccessKeyId"),
        xml_field(&xml, "SecretAccessKey"),
        xml_field(&xml, "SessionToken"),
    ) {
        (Some(id), Some(secret), Some(token)) => Ok(Credentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: Some(Secret::new(token)),
        }),
        _ => Err(CredentialsError::NoCredentials),
    }
}

/// The text of the first `<name>...</name>` element: enough for STS's fixed response shape.
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..end].trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The signature botocore (the AWS SDK for Python) computed for the same request.
    #[test]
    fn matches_a_signature_computed_by_botocore() {
        let credentials = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: None,
        };
        let now = chrono::Utc
            .with_ymd_and_hms(2026, 11, 28, 20, 50, 12)
            .unwrap();
        let body = br#"{"SecretId":"llmtrace"}"#;
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "secretsmanager.GetSecretValue"),
        ];
        let out = sign(
            &credentials,
            "us-east-1",
            "secretsmanager",
            "secretsmanager.us-east-1.amazonaws.com",
            &headers,
            body,
            now,
        );
        let authorization = &out.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert_eq!(authorization, BOTOCORE_AUTHORIZATION);
    }

    const BOTOCORE_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261128/us-east-1/secretsmanager/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=43347ea75c5e3fc52a41c5bd6c38fbda3d69c929effc0e9a8c7def12f02b4f98";

    #[test]
    fn reads_sts_fields() {
        let xml = "<AssumeRoleWithWebIdentityResponse><Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>s</SecretAccessKey></Credentials></AssumeRoleWithWebIdentityResponse>";
        assert_eq!(xml_field(xml, "AccessKeyId").as_deref(), Some("ASIA1"));
        assert_eq!(xml_field(xml, "SessionToken"), None);
    }
}

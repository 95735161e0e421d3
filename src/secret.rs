//! A string that holds a credential: never printed, zeroized on drop.

use std::fmt;
use zeroize::Zeroizing;

/// A password or a value carrying one (a URL, a dotenv value).
///
/// `Debug` and `Display` print `***`; the only way to the text is [`Secret::expose`],
/// so every place that handles the plaintext is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

/// A message from a server or library that may echo a credential (Redis repeats ACL rules,
/// ClickHouse the statement): every given secret and every run of 64 or more hex digits (a
/// password hash) is replaced before the text is kept. The only constructor scrubs, so a
/// `Redacted` in an error type shows the message was scrubbed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redacted(String);

impl Redacted {
    /// Scrubs `message` of `secrets` and of anything that looks like a password hash.
    pub fn new(message: impl fmt::Display, secrets: &[&Secret]) -> Self {
        let mut out = message.to_string();
        for secret in secrets {
            if !secret.is_empty() {
                out = out.replace(secret.expose(), "***");
            }
        }
        let mut result = String::with_capacity(out.len());
        let mut run = String::new();
        for c in out.chars() {
            if c.is_ascii_hexdigit() {
                run.push(c);
                continue;
            }
            result.push_str(if run.len() >= 64 { "<hash>" } else { &run });
            run.clear();
            result.push(c);
        }
        result.push_str(if run.len() >= 64 { "<hash>" } else { &run });
        Redacted(result)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Redacted {}

/// Our own messages, which name no credential; still scrubbed of hash-like runs.
impl From<&str> for Redacted {
    fn from(message: &str) -> Self {
        Redacted::new(message, &[])
    }
}

impl From<String> for Redacted {
    fn from(message: String) -> Self {
        Redacted::new(message, &[])
    }
}

/// A failed HTTP request as text: reqwest's own words without the URL (it may carry a token or
/// `user:password`), then each underlying cause (connection refused, a TLS failure), which
/// names no URL: without them every failure reads "error sending request".
pub fn http_error_text(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(next) = cause {
        let said = next.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = next.source();
    }
    text
}

/// A login: the user name is not secret, the password is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    pub password: Secret,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_http_error_says_why_without_its_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Nothing listens there any more.
        let url = format!("http://ops:s3cretpw@127.0.0.1:{port}/v1/secret?token=t0ken");
        let error = reqwest::Client::new().get(&url).send().await.unwrap_err();
        let text = http_error_text(error);
        assert!(text.to_lowercase().contains("connect"), "{text}");
        assert!(text.contains("refused"), "{text}");
        for secret in ["s3cretpw", "t0ken", "/v1/secret"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "*** ***");
        let cred = Credential {
            user: "app".into(),
            password: secret,
        };
        assert!(!format!("{cred:?}").contains("hunter2"));
    }

    #[test]
    fn redacted_scrubs_given_secrets_and_hashes() {
        let hash = "a".repeat(64);
        let message = format!("ERR Error in ACL SETUSER modifier '>hunter2' #{hash} short cafe");
        let redacted = Redacted::new(&message, &[&Secret::new("hunter2")]);
        assert_eq!(
            redacted.to_string(),
            "ERR Error in ACL SETUSER modifier '>***' #<hash> short cafe"
        );
        assert!(!format!("{redacted:?}").contains("hunter2"));
    }
}

/// Serde for the encrypted run state only: the one place a secret is serialized, and only
/// ever into bytes that are sealed with the journal key before they leave memory.
pub mod sealed_serde {
    use super::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(secret: &Secret, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(secret.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }

    pub mod option {
        use super::Secret;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            secret: &Option<Secret>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match secret {
                Some(secret) => serializer.serialize_some(secret.expose()),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Secret>, D::Error> {
            Option::<String>::deserialize(deserializer).map(|s| s.map(Secret::new))
        }
    }
}

//! Bearer tokens for the API: stored as SHA-256 digests, compared in constant time; a token
//! file is re-read when it changes (a Kubernetes Secret volume update), without a restart.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::secret::Secret;

/// How often the token file is looked at: the kubelet refreshes a Secret volume within about a
/// minute, so a change takes effect within a minute and some seconds.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

pub struct Tokens(Vec<[u8; 32]>);

impl Tokens {
    /// One token per line (or comma-separated); blank lines and `#` comments are ignored.
    pub fn parse(text: &Secret) -> Tokens {
        Tokens(
            text.expose()
                .split(['\n', ','])
                .map(str::trim)
                .filter(|t| !t.is_empty() && !t.starts_with('#'))
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
        )
    }

    pub fn none() -> Tokens {
        Tokens(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks an `Authorization` header value. Every token is compared, each in constant time,
    /// so timing says nothing about which one matched or how much of it.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        // RFC 7235 §2.1: the auth-scheme is case-insensitive and 1*SP separates it from the
        // credentials (RFC 6750 §2.1 for Bearer).
        let Some(token) = authorization
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start_matches(' '))
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        self.0.iter().fold(false, |found, known| {
            found | constant_time_eq(known, &presented)
        })
    }
}

/// The token set in force, swapped whole when the token file changes.
pub struct LiveTokens(RwLock<Arc<Tokens>>);

impl LiveTokens {
    pub fn new(tokens: Tokens) -> LiveTokens {
        LiveTokens(RwLock::new(Arc::new(tokens)))
    }

    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let tokens = self.0.read().expect("tokens lock").clone();
        tokens.allows(authorization)
    }

    fn replace(&self, tokens: Tokens) {
        *self.0.write().expect("tokens lock") = Arc::new(tokens);
    }

    /// Re-reads `path` every `every` until `stop`, and swaps in its tokens when its content
    /// changed. An unreadable or empty file keeps the tokens in force (an error is logged): a
    /// half-written update must not lock every client out, nor let everyone in.
    pub async fn watch(
        self: Arc<Self>,
        path: PathBuf,
        loaded: Secret,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut seen: [u8; 32] = Sha256::digest(loaded.expose().as_bytes()).into();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let text = match tokio::fs::read_to_string(&path).await {
                // Trimmed as at start-up (`resolve`), so an unchanged file reads as unchanged.
                Ok(text) => Secret::new(text.trim_end_matches(['\n', '\r'])),
                Err(error) => {
                    tracing::error!(path = %path.display(), cause = %error, "cannot read the API token file; the tokens in force stay");
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(text.expose().as_bytes()).into();
            if digest == seen {
                continue;
            }
            let tokens = Tokens::parse(&text);
            if tokens.is_empty() {
                tracing::error!(path = %path.display(), "the API token file holds no token; the tokens in force stay");
                continue;
            }
            seen = digest;
            tracing::info!(path = %path.display(), tokens = tokens.0.len(), "API tokens reloaded");
            self.replace(tokens);
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_any_listed_token_and_nothing_else() {
        let tokens = Tokens::parse(&Secret::new(
            "# ops\nalpha-token\n\nbeta-token, gamma-token\n",
        ));
        for good in ["alpha-token", "beta-token", "gamma-token"] {
            assert!(tokens.allows(Some(&format!("Bearer {good}"))), "{good}");
        }
        for bad in [
            None,
            Some("alpha-token"),
            Some("Bearer alpha"),
            Some("Bearer "),
            Some("Basic alpha-token"),
            Some("Bearer # ops"),
        ] {
            assert!(!tokens.allows(bad), "{bad:?}");
        }
        assert!(!Tokens::none().allows(Some("Bearer anything")));
    }

    #[tokio::test]
    async fn a_changed_token_file_replaces_the_tokens_and_a_broken_one_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "alpha-token\n").unwrap();
        let live = Arc::new(LiveTokens::new(Tokens::parse(&Secret::new(
            "alpha-token\n",
        ))));
        let stop = CancellationToken::new();
        let watcher = tokio::spawn(live.clone().watch(
            path.clone(),
            Secret::new("alpha-token\n"),
            Duration::from_millis(20),
            stop.clone(),
        ));
        let allows = |token: &str| live.allows(Some(&format!("Bearer {token}")));
        let settle = || tokio::time::sleep(Duration::from_millis(150));

        std::fs::write(&path, "beta-token\n").unwrap();
        settle().await;
        assert!(allows("beta-token") && !allows("alpha-token"));

        // Empty, then gone: the previous set stays in force.
        std::fs::write(&path, "\n# none\n").unwrap();
        settle().await;
        assert!(allows("beta-token"));
        std::fs::remove_file(&path).unwrap();
        settle().await;
        assert!(allows("beta-token"));

        std::fs::write(&path, "beta-token\ngamma-token\n").unwrap();
        settle().await;
        assert!(allows("beta-token") && allows("gamma-token"));
        stop.cancel();
        watcher.await.unwrap();
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        let tokens = Tokens::parse(&Secret::new("alpha-token"));
        for header in [
            "bearer alpha-token",
            "BEARER alpha-token",
            "bEaReR alpha-token",
            "Bearer  alpha-token",
        ] {
            assert!(tokens.allows(Some(header)), "{header:?}");
        }
        for header in [
            "Bearers alpha-token",
            "Bearer",
            "bearer",
            "Beare alpha-token",
        ] {
            assert!(!tokens.allows(Some(header)), "{header:?}");
        }
    }
}

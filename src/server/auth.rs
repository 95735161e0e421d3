//! Bearer tokens for the API: stored as SHA-256 digests, compared in constant time.

use sha2::{Digest, Sha256};

use crate::secret::Secret;

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

//! Password generation from the OS CSPRNG under a policy.

use rand::rngs::OsRng;
use rand::{Rng, TryRngCore};
use std::ops::RangeInclusive;

use crate::secret::Secret;

/// Which characters a generated password may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Alphabet {
    /// Letters and digits: safe in URLs, dotenv files and shells without quoting.
    Alphanumeric,
    /// Letters, digits, `-` and `_` (RFC 4648 URL-safe).
    Urlsafe,
    /// Every printable ASCII character except space.
    Printable,
}

impl Alphabet {
    pub fn parse(text: &str) -> Option<Alphabet> {
        match text {
            "alphanumeric" => Some(Alphabet::Alphanumeric),
            "urlsafe" => Some(Alphabet::Urlsafe),
            "printable" => Some(Alphabet::Printable),
            _ => None,
        }
    }

    pub fn characters(self) -> Vec<u8> {
        let alphanumeric = (b'a'..=b'z').chain(b'A'..=b'Z').chain(b'0'..=b'9');
        match self {
            Alphabet::Alphanumeric => alphanumeric.collect(),
            Alphabet::Urlsafe => alphanumeric.chain([b'-', b'_']).collect(),
            Alphabet::Printable => (b'!'..=b'~').collect(),
        }
    }
}

/// The character classes a password must each draw from at least once.
fn classes_present(password: &[u8]) -> [bool; 4] {
    let mut seen = [false; 4];
    for &c in password {
        let class = match c {
            b'a'..=b'z' => 0,
            b'A'..=b'Z' => 1,
            b'0'..=b'9' => 2,
            _ => 3,
        };
        seen[class] = true;
    }
    seen
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PasswordPolicy {
    pub length: usize,
    pub alphabet: Alphabet,
}

impl PasswordPolicy {
    pub const LENGTHS: RangeInclusive<usize> = 16..=128;
}

impl Default for PasswordPolicy {
    /// 32 alphanumeric characters: about 190 bits, and no quoting trouble anywhere.
    fn default() -> Self {
        PasswordPolicy {
            length: 32,
            alphabet: Alphabet::Alphanumeric,
        }
    }
}

/// Draws a password uniformly from the alphabet with the OS CSPRNG, redrawing until it holds
/// every character class the alphabet has (at length 16 that takes about 1.1 draws).
pub fn generate(policy: &PasswordPolicy) -> Secret {
    let characters = policy.alphabet.characters();
    let required = classes_present(&characters);
    let mut rng = OsRng.unwrap_err();
    loop {
        let mut candidate = zeroize::Zeroizing::new(Vec::with_capacity(policy.length));
        for _ in 0..policy.length {
            candidate.push(characters[rng.random_range(0..characters.len())]);
        }
        if classes_present(&candidate) == required {
            let text = String::from_utf8(candidate.to_vec()).expect("ASCII alphabet");
            return Secret::new(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(length: usize, alphabet: Alphabet) -> PasswordPolicy {
        PasswordPolicy { length, alphabet }
    }

    #[test]
    fn honours_length_and_alphabet() {
        for alphabet in [
            Alphabet::Alphanumeric,
            Alphabet::Urlsafe,
            Alphabet::Printable,
        ] {
            let allowed = alphabet.characters();
            for length in [16, 32, 128] {
                let password = generate(&policy(length, alphabet));
                assert_eq!(password.expose().len(), length);
                assert!(password.expose().bytes().all(|c| allowed.contains(&c)));
            }
        }
    }

    #[test]
    fn every_password_holds_every_class_of_its_alphabet() {
        for _ in 0..500 {
            let p = generate(&policy(16, Alphabet::Printable));
            assert_eq!(classes_present(p.expose().as_bytes()), [true; 4]);
            let p = generate(&policy(16, Alphabet::Alphanumeric));
            assert_eq!(
                classes_present(p.expose().as_bytes()),
                [true, true, true, false]
            );
        }
    }

    #[test]
    fn passwords_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(generate(&PasswordPolicy::default()).expose().to_string()));
        }
    }

    #[test]
    fn characters_are_spread_over_the_alphabet() {
        // 62 symbols over 62,000 draws: each expected 1,000 times; a fair generator stays far inside 700..1300.
        let mut counts = std::collections::HashMap::new();
        for _ in 0..(62_000 / 32) {
            for c in generate(&PasswordPolicy::default()).expose().bytes() {
                *counts.entry(c).or_insert(0u32) += 1;
            }
        }
        assert_eq!(counts.len(), 62);
        assert!(
            counts.values().all(|&n| (700..1300).contains(&n)),
            "{counts:?}"
        );
    }
}

//! SCRAM-SHA-256 verifiers computed on the client, so `ALTER ROLE` never carries a plaintext.
//!
//! The password is SASLprepped first, exactly as PostgreSQL's `pg_be_scram_build_secret`
//! does (src/common/scram-common.c, src/common/saslprep.c), because clients (libpq, sqlx)
//! SASLprep what they send: a verifier of the raw bytes would not match a non-ASCII password.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::TryRngCore;
use sha2::{Digest, Sha256};
use stringprep::tables;
use unicode_normalization::UnicodeNormalization;

use crate::secret::Secret;

/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;

/// A fresh verifier for `password` with a random 16-byte salt.
pub fn verifier(password: &Secret) -> Secret {
    let mut salt = [0u8; SALT_LEN];
    OsRng
        .try_fill_bytes(&mut salt)
        .expect("the OS random number generator failed");
    verifier_with(password, &salt, DEFAULT_ITERATIONS)
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as `pg_authid.rolpassword` holds it.
pub fn verifier_with(password: &Secret, salt: &[u8], iterations: u32) -> Secret {
    let mut salted = zeroize::Zeroizing::new([0u8; 32]);
    let prepared = zeroize::Zeroizing::new(saslprep(password.expose()).into_owned());
    pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), salt, iterations, &mut *salted);
    let client_key = hmac(&*salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&*salted, b"Server Key");
    Secret::new(format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    ))
}

/// PostgreSQL's `pg_saslprep` (RFC 4013), with its fallback: where SASLprep fails (prohibited
/// output, bidi rules, nothing left after mapping) the raw password is hashed, as the server
/// and libpq both do. Like PostgreSQL, an ASCII string is taken as it is, and the prohibited
/// and bidi checks look at the mapped string before normalization.
pub fn saslprep(password: &str) -> Cow<'_, str> {
    if password.is_ascii() {
        return Cow::Borrowed(password);
    }
    let mapped: Vec<char> = password
        .chars()
        .filter(|&c| !tables::commonly_mapped_to_nothing(c))
        .map(|c| match tables::non_ascii_space_character(c) {
            true => ' ',
            false => c,
        })
        .collect();
    let prohibited = |c: char| {
        tables::non_ascii_space_character(c)
            || tables::ascii_control_character(c)
            || tables::non_ascii_control_character(c)
            || tables::private_use(c)
            || tables::non_character_code_point(c)
            || tables::surrogate_code(c)
            || tables::inappropriate_for_plain_text(c)
            || tables::inappropriate_for_canonical_representation(c)
            || tables::change_display_properties_or_deprecated(c)
            || tables::tagging_character(c)
            || tables::unassigned_code_point(c)
    };
    let bidi_ok = !mapped.iter().any(|&c| tables::bidi_r_or_al(c))
        || (!mapped.iter().any(|&c| tables::bidi_l(c))
            && mapped.first().is_some_and(|&c| tables::bidi_r_or_al(c))
            && mapped.last().is_some_and(|&c| tables::bidi_r_or_al(c)));
    if mapped.is_empty() || mapped.iter().any(|&c| prohibited(c)) || !bidi_ok {
        return Cow::Borrowed(password);
    }
    Cow::Owned(mapped.into_iter().nfkc().collect())
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_verifier_made_by_postgresql() {
        // PostgreSQL 15 stored this for `ALTER ROLE r PASSWORD 'pencil'` (password_encryption = scram-sha-256).
        let known = "SCRAM-SHA-256$4096:5/9qCZ4DmsvJF68cYpYWDA==$wSG5ArNNOwaEcYPusRe3TMjxecU1N8nqQurnU/vvszM=:0wDBVkkRXnVcDTE7JC/v0CIn4yMUebp7IauQLKGWMxk=";
        let (head, keys) = known.rsplit_once('$').unwrap();
        let salt_b64 = head.split(':').nth(1).unwrap();
        let salt = STANDARD.decode(salt_b64).unwrap();
        let ours = verifier_with(&Secret::new("pencil"), &salt, 4096);
        assert_eq!(ours.expose().rsplit_once('$').unwrap().1, keys);
    }

    #[test]
    fn saslprep_as_postgresql_does() {
        for (input, prepared) in [
            // RFC 4013 §3 examples.
            ("I\u{ad}X", "IX"),
            ("user", "user"),
            ("USER", "USER"),
            ("\u{aa}", "a"),
            ("\u{2168}", "IX"),
            // Non-ASCII space to space, soft hyphen to nothing, é kept composed.
            ("p\u{e9}\u{a0}ncil\u{ad}", "p\u{e9} ncil"),
            ("e\u{301}", "\u{e9}"),
            // Failures fall back to the raw password.
            ("\u{7}", "\u{7}"),
            ("a\u{7}\u{e9}", "a\u{7}\u{e9}"),
            ("\u{627}1", "\u{627}1"),
            ("\u{627}a\u{627}", "\u{627}a\u{627}"),
            ("\u{ad}", "\u{ad}"),
            ("\u{e000}x\u{e9}", "\u{e000}x\u{e9}"),
        ] {
            assert_eq!(saslprep(input), prepared, "{input:?}");
        }
        assert_eq!(saslprep("\u{627}\u{628}"), "\u{627}\u{628}");
    }

    #[test]
    fn non_ascii_passwords_hash_their_saslprep_form() {
        let salt = [7u8; 16];
        assert_eq!(
            verifier_with(&Secret::new("p\u{e9}\u{a0}ncil\u{ad}"), &salt, 4096),
            verifier_with(&Secret::new("p\u{e9} ncil"), &salt, 4096)
        );
    }

    #[test]
    fn fresh_verifiers_use_fresh_salts() {
        let password = Secret::new("pencil");
        assert_ne!(verifier(&password), verifier(&password));
        assert!(verifier(&password)
            .expose()
            .starts_with("SCRAM-SHA-256$4096:"));
    }
}

//! SCRAM-SHA-256 verifiers computed on the client, so `ALTER ROLE` never carries a plaintext.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::TryRngCore;
use sha2::{Digest, Sha256};

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
    pbkdf2::pbkdf2_hmac::<Sha256>(password.expose().as_bytes(), salt, iterations, &mut *salted);
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
    fn fresh_verifiers_use_fresh_salts() {
        let password = Secret::new("pencil");
        assert_ne!(verifier(&password), verifier(&password));
        assert!(verifier(&password)
            .expose()
            .starts_with("SCRAM-SHA-256$4096:"));
    }
}

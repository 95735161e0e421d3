//! AES-256-GCM for the run state, so the journal never holds a password in the clear.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::TryRngCore;
use zeroize::Zeroizing;

use crate::secret::Secret;

const NONCE_LEN: usize = 12;

pub struct Cipher(Aes256Gcm);

/// Why the key is refused or a sealed blob cannot be opened; never holds key or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    #[error("journal_key is not valid base64")]
    KeyNotBase64,
    #[error("journal_key must be 32 bytes (base64 of `head -c 32 /dev/urandom`), not {0}")]
    KeyLength(usize),
    #[error("the stored run state is truncated")]
    Truncated,
    #[error("the stored run state cannot be decrypted: journal_key differs from the one it was written with, or the row was altered")]
    Undecryptable,
}

impl Cipher {
    /// Takes the base64 text of a 32-byte key.
    pub fn from_base64(key: &Secret) -> Result<Cipher, CipherError> {
        // The decode error is dropped: it may quote the key.
        let bytes = Zeroizing::new(
            STANDARD
                .decode(key.expose().trim())
                .map_err(|_| CipherError::KeyNotBase64)?,
        );
        if bytes.len() != 32 {
            return Err(CipherError::KeyLength(bytes.len()));
        }
        Ok(Cipher(
            Aes256Gcm::new_from_slice(&bytes).expect("32-byte key"),
        ))
    }

    /// `nonce || ciphertext`; `context` (the run id) is authenticated so blobs cannot be swapped between runs.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .expect("the OS random number generator failed");
        let sealed = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        [nonce.as_slice(), &sealed].concat()
    }

    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Zeroizing<Vec<u8>>, CipherError> {
        if sealed.len() < NONCE_LEN {
            return Err(CipherError::Truncated);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CipherError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Secret {
        Secret::new(STANDARD.encode([byte; 32]))
    }

    #[test]
    fn round_trips_and_binds_the_context() {
        let cipher = Cipher::from_base64(&key(7)).unwrap();
        let sealed = cipher.seal(b"hunter2", "run-1");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(&*cipher.open(&sealed, "run-1").unwrap(), b"hunter2");
        assert!(cipher.open(&sealed, "run-2").is_err());
        assert!(Cipher::from_base64(&key(8))
            .unwrap()
            .open(&sealed, "run-1")
            .is_err());
    }

    #[test]
    fn rejects_keys_of_the_wrong_size() {
        assert!(Cipher::from_base64(&Secret::new(STANDARD.encode([1u8; 16]))).is_err());
        assert!(Cipher::from_base64(&Secret::new("not base64!")).is_err());
    }
}

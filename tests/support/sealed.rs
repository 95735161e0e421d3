//! The sealed-secrets controller's side of kubeseal's format, written from
//! bitnami-labs/sealed-secrets `pkg/crypto/crypto.go` independently of the rotator's code, so
//! tests prove the format rather than agree with themselves.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rsa::pkcs8::DecodePrivateKey;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};

/// A controller key pair made by `openssl req -x509` (what the controller itself generates):
/// the certificate PEM written to `dir/cert.pem` for the rotator, the private key for the fake.
pub fn keypair(dir: &Path) -> (PathBuf, RsaPrivateKey) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/O=sealed-secret/CN="])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl req -x509 failed");
    let pem = std::fs::read_to_string(&key).unwrap();
    (
        cert,
        RsaPrivateKey::from_pkcs8_pem(&pem).expect("openssl wrote a PKCS#8 RSA key"),
    )
}

/// `kubeseal --scope strict`: the label binds the value to `namespace/name`.
pub fn seal(key: &RsaPublicKey, ns: &str, name: &str, plaintext: &[u8]) -> String {
    seal_with_label(key, &format!("{ns}/{name}"), plaintext)
}

/// kubeseal's HybridEncrypt under `label` (pkg/crypto/crypto.go; `EncryptionLabel` gives the
/// label of each scope: `namespace/name`, `namespace`, or empty).
pub fn seal_with_label(key: &RsaPublicKey, label: &str, plaintext: &[u8]) -> String {
    let session: [u8; 32] = rand::random();
    let mut rng = rsa::rand_core::OsRng;
    let label = label.to_string();
    let rsa = key
        .encrypt(
            &mut rng,
            Oaep::new_with_label::<sha2::Sha256, _>(label),
            &session,
        )
        .unwrap();
    let mut out = (rsa.len() as u16).to_be_bytes().to_vec();
    out.extend(rsa);
    out.extend(
        Aes256Gcm::new_from_slice(&session)
            .unwrap()
            .encrypt(Nonce::from_slice(&[0; 12]), plaintext)
            .unwrap(),
    );
    base64::engine::general_purpose::STANDARD.encode(out)
}

pub use super::kube_fake::{label_for, unseal, unseal_with_label};

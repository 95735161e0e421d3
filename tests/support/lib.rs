//! The rotator's test harness: real services started per test, the Kubernetes API fake, and a
//! driver for the rotator binary.

pub mod clickhouse;
pub mod config;
pub mod eso;
pub mod kube_fake;
pub mod moto;
pub mod openbao;
pub mod pki;
pub mod postgres;
pub mod redis;
pub mod rotator;
pub mod sealed;

/// Reports a test skipping because `what` is missing. Under CI (where scripts/test.sh
/// installs everything) a skip would hide a missing install step, so the test fails instead.
pub fn skip(what: &str) {
    skip_under(std::env::var_os("CI").is_some(), what);
}

pub fn skip_under(ci: bool, what: &str) {
    assert!(
        !ci,
        "{what}, and CI is set: scripts/test.sh should have installed it"
    );
    eprintln!("SKIPPED: {what}");
}

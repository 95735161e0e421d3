//! Test support: real services started per test, the Kubernetes API fake, and a driver for
//! the rotator binary.
#![allow(dead_code)]

pub mod clickhouse;
pub mod eso;
pub mod kube_fake;
pub mod moto;
pub mod openbao;
pub mod pki;
pub mod postgres;
pub mod redis;
pub mod rotator;
pub mod sealed;

//! llmtrace-rotator rotates the passwords of the PostgreSQL logins a workload uses, publishes
//! them to wherever the workload reads them, restarts it, proves the new credential works, and
//! puts everything back when any step fails.
//!
//! # Layout
//! - [`cli`]: the command line (`rotate`, `check`, `history`, `recover`, `migrate`).
//! - [`config`]: the TOML schema, validation and credential references.
//! - [`password`]: password generation under a policy.
//! - [`secret`]: the unprintable string type every credential lives in.
//! - [`engine`]: the rotation transaction: plan, steps, rollback, recovery, report.
//! - [`journal`]: runs, steps, encrypted pending state and per-target locks (SQLite or PostgreSQL).
//! - [`backend`]: the [`backend::Backend`] trait and one file per server kind.
//! - [`store`]: the [`store::Store`] trait and one file per place credentials are published.
//! - [`consumer`]: the [`consumer::Consumer`] trait: Deployments, StatefulSets, commands.
//! - [`duration`]: `30s`/`5m` durations in config.
//! - [`resolve`]: reading what `env:`, `file:`, `k8s:` and `literal:` references point at.
//! - [`failpoint`]: test-only pauses at step boundaries, for crash-recovery tests.
//! - [`rbac`]: the least-privilege Role and RoleBinding a config needs.
#![forbid(unsafe_code)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod duration;
pub mod engine;
pub mod failpoint;
pub mod journal;
pub mod password;
pub mod rbac;
pub mod resolve;
pub mod schedule;
pub mod secret;
pub mod server;
pub mod store;

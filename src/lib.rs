//! llmtrace-rotator rotates the passwords of the PostgreSQL, Redis and ClickHouse logins a
//! workload uses, publishes them to wherever the workload reads them, restarts it, proves the
//! new credential works (and that the workload moved to it), and puts everything back when any
//! step fails.
//!
//! # Layout
//! - [`cli`]: the command line (`rotate`, `check`, `serve`, `history`, `recover`, `migrate`,
//!   `rbac`).
//! - [`exit`]: the process exit codes, shared by the command line and the run report.
//! - [`config`]: the TOML schema, validation and credential references.
//! - [`password`]: password generation under a policy.
//! - [`secret`]: the unprintable string type every credential lives in.
//! - [`engine`]: the rotation transaction: plan, steps, rollback, recovery, report, Events.
//! - [`journal`]: runs, steps, per-target sealed state, fire claims and per-target locks
//!   (SQLite or PostgreSQL).
//! - [`backend`]: the [`backend::Backend`] trait and one file per server kind (PostgreSQL,
//!   Redis, ClickHouse).
//! - [`store`]: the [`store::Store`] trait and one file per place credentials are published.
//! - [`consumer`]: the [`consumer::Consumer`] trait: Deployments, StatefulSets, commands.
//! - [`kube_api`]: Kubernetes API error text, conflict detection, the compare-and-swap retry.
//! - [`server`]: `serve`: scheduler, HTTP API, auth, metrics.
//! - [`schedule`]: 5-field cron schedules in UTC.
//! - [`duration`]: `30s`/`5m` durations in config.
//! - [`resolve`]: reading what `env:`, `file:`, `k8s:` and `literal:` references
//!   point at.
//! - [`failpoint`]: test-only faults at step boundaries (pause, journal down, SIGTERM).
//! - [`rbac`]: the least-privilege Role and RoleBinding a config needs.
#![forbid(unsafe_code)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod duration;
pub mod engine;
pub mod exit;
pub mod failpoint;
pub mod journal;
pub mod kube_api;
pub mod password;
pub mod rbac;
pub mod resolve;
pub mod schedule;
pub mod secret;
pub mod server;
pub mod store;

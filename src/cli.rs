//! The command line: `rotate`, `check`, `serve`, `history`, `recover`, `migrate`, `rbac`, and
//! their exit codes.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::engine::plan::{dry_run, Plan};
use crate::engine::report::history_text;
use crate::engine::run;
use crate::engine::{check, recover, Deps, Engine, EngineError, Outcome, RunReport};
use crate::journal::JournalError;

pub use crate::exit::{EXIT_CANNOT_START, EXIT_FAILED, EXIT_OK, EXIT_ROLLBACK_FAILED, EXIT_USAGE};

#[derive(Debug, Parser)]
#[command(
    name = "llmtrace-rotator",
    version,
    about = "Rotates database credentials without breaking the workload that uses them"
)]
pub struct Cli {
    /// How log lines on stderr look: `text` for people, `json` (one object per line) for a
    /// log pipeline.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "ROTATOR_LOG_FORMAT",
        default_value_t
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Rotate the credentials of every target, or of those named with --target.
    Rotate {
        #[arg(long)]
        config: PathBuf,
        /// Rotate only this target (repeatable).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Print the plan and run the read-only preflight checks; change nothing anywhere.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Check that the credential in every store logs in (drift check). Exit 1 on drift.
    Check {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Run the daemon: scheduled rotations, the HTTP API, /metrics, periodic drift checks.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show past runs, newest first.
    History {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Finish or roll back runs that a crash left unfinished.
    Recover {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Create or upgrade the journal's tables.
    Migrate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the least-privilege Role and RoleBinding (YAML) this config needs.
    Rbac {
        #[arg(long)]
        config: PathBuf,
        /// The ServiceAccount the rotator runs as; also the Role's name.
        #[arg(long, default_value = "llmtrace-rotator")]
        service_account: String,
        /// The ServiceAccount's namespace (default: the one namespace the config touches).
        #[arg(long)]
        namespace: Option<String>,
    },
}

/// Runs a command and returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match execute(cli.command).await {
        Ok(code) => code,
        Err(Failure { code, message }) => {
            eprintln!("error: {message}");
            code
        }
    }
}

struct Failure {
    code: i32,
    message: String,
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: e.to_string(),
        }
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::UnknownTarget(_) => EXIT_USAGE,
            EngineError::Journal(JournalError::Busy(_)) => EXIT_CANNOT_START,
            _ => EXIT_CANNOT_START,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

async fn load(path: &Path) -> Result<std::sync::Arc<Deps>, Failure> {
    let config = Config::load(path)?;
    Ok(Deps::new(config).await?)
}

fn print<T: Serialize>(output: OutputFormat, value: &T, text: impl FnOnce() -> String) {
    match output {
        OutputFormat::Text => print!("{}", text()),
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("reports serialize")
        ),
    }
}

/// Exit code for recovered runs: only a failed rollback needs attention.
fn recovery_code(reports: &[RunReport]) -> i32 {
    if reports.iter().any(|r| r.outcome == Outcome::RollbackFailed) {
        EXIT_ROLLBACK_FAILED
    } else {
        EXIT_OK
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[derive(Serialize)]
struct RotateOutput<'a> {
    #[serde(flatten)]
    run: &'a RunReport,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    recovered: &'a [RunReport],
}

async fn execute(command: Command) -> Result<i32, Failure> {
    match command {
        Command::Rotate {
            config,
            targets,
            dry_run,
            output,
        } => run_rotate(&config, &targets, dry_run, output).await,
        Command::Check { config, output } => {
            let deps = load(&config).await?;
            let report = check::check(&deps, &[]).await;
            print(output, &report, || report.to_text());
            Ok(if report.all_valid() {
                EXIT_OK
            } else {
                EXIT_FAILED
            })
        }
        Command::History {
            config,
            limit,
            output,
        } => {
            let engine = Engine::new(load(&config).await?).await?;
            let runs = engine
                .journal
                .history(i64::from(limit))
                .await
                .map_err(EngineError::from)?;
            print(output, &runs, || history_text(&runs));
            Ok(EXIT_OK)
        }
        Command::Recover { config, output } => run_recover(&config, output).await,
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            match crate::server::serve(config, shutdown_signal()).await {
                Ok(()) => Ok(EXIT_OK),
                Err(crate::server::ServeError::Engine(e)) => Err(e.into()),
                Err(e) => Err(Failure {
                    code: EXIT_CANNOT_START,
                    message: e.to_string(),
                }),
            }
        }
        Command::Rbac {
            config,
            service_account,
            namespace,
        } => print_rbac(&config, &service_account, namespace.as_deref()),
        Command::Migrate { config } => {
            Engine::new(load(&config).await?).await?;
            println!("journal is up to date");
            Ok(EXIT_OK)
        }
    }
}

/// `rotate`: recovers what a crash left first, then runs the plan; SIGTERM rolls it back.
async fn run_rotate(
    config: &Path,
    targets: &[String],
    dry_run: bool,
    output: OutputFormat,
) -> Result<i32, Failure> {
    let deps = load(config).await?;
    let plan = Plan::new(&deps.config, targets)?;
    if dry_run {
        return Ok(dry_run_report(&deps, &plan, output).await);
    }
    let engine = Engine::new(deps).await?;
    // SIGTERM (a CronJob's deadline, a node drain) stops the run at the next step and
    // rolls it back, rather than leaving pods on a half-rotated credential until next week.
    let cancel = tokio_util::sync::CancellationToken::new();
    let on_signal = cancel.clone();
    let listener = tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    let recovered = recover::recover_all(&engine, &cancel).await?;
    let context = match run::start(&engine, &plan, "cli").await {
        Ok(context) => context,
        Err(error) => {
            // Say what recovery did before refusing: it is why the run cannot start.
            print(output, &recovered, || {
                recovered.iter().map(RunReport::to_text).collect()
            });
            return Err(Failure {
                // A failed rollback needs a person more than a refused start does.
                code: match recovery_code(&recovered) {
                    EXIT_OK => EXIT_CANNOT_START,
                    code => code,
                },
                message: error.to_string(),
            });
        }
    };
    let report = context.with_cancel(cancel).execute().await;
    listener.abort();
    let text = || {
        recovered
            .iter()
            .chain([&report])
            .map(RunReport::to_text)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let both = RotateOutput {
        run: &report,
        recovered: &recovered,
    };
    print(output, &both, text);
    Ok(report.outcome.exit_code().max(recovery_code(&recovered)))
}

/// `recover`: finishes or rolls back every run a crash left unfinished.
async fn run_recover(config: &Path, output: OutputFormat) -> Result<i32, Failure> {
    let engine = Engine::new(load(config).await?).await?;
    let reports =
        recover::recover_all(&engine, &tokio_util::sync::CancellationToken::new()).await?;
    print(output, &reports, || {
        if reports.is_empty() {
            "nothing to recover\n".to_string()
        } else {
            reports
                .iter()
                .map(RunReport::to_text)
                .collect::<Vec<_>>()
                .join("\n")
        }
    });
    Ok(recovery_code(&reports))
}

/// `rbac`: the least-privilege Role and RoleBinding this config needs, as YAML.
fn print_rbac(
    config: &Path,
    service_account: &str,
    namespace: Option<&str>,
) -> Result<i32, Failure> {
    let config = Config::load(config)?;
    let yaml = crate::rbac::render(&config, service_account, namespace).map_err(|e| Failure {
        code: EXIT_USAGE,
        message: e.to_string(),
    })?;
    if yaml.is_empty() {
        eprintln!("this config makes no Kubernetes request: no Role is needed");
    }
    print!("{yaml}");
    Ok(EXIT_OK)
}

/// The plan and the read-only preflight, without the journal: nothing is written anywhere.
async fn dry_run_report(deps: &Deps, plan: &Plan, output: OutputFormat) -> i32 {
    let report = dry_run(deps, plan).await;
    print(output, &report, || report.to_text());
    if report.all_ok() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

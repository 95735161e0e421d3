use std::io::IsTerminal;

use clap::Parser;
use llmtrace_rotator::cli::LogFormat;
use tracing_subscriber::EnvFilter;

/// mimalloc hands freed pages back to the system: parsing a 10,000-target config allocates
/// about 100 MiB briefly, which glibc's allocator would keep for the daemon's lifetime.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = match llmtrace_rotator::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                llmtrace_rotator::cli::EXIT_USAGE
            } else {
                0
            });
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        // One object per line, the event's fields at the top level beside timestamp, level,
        // target and message, with the enclosing span's fields (run) under `span`.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    std::process::exit(llmtrace_rotator::cli::run(cli).await);
}

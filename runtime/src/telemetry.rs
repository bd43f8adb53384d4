//! Structured logs to stderr. Nothing here knows about card data: keeping it out of
//! log fields is the job of the types that hold it (they print `[REDACTED]`) and of
//! `#[instrument(skip_all)]` on every handler.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Targets held at INFO or above (see `init`).
const QUIET_LIBRARIES: [&str; 3] = [
    "tokio_postgres=info",
    "postgres_protocol=info",
    "deadpool=info",
];

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax, e.g. `info` or
/// `vault_server=debug,info`. Does nothing if a subscriber is already installed
/// (tests start several servers in one process).
pub fn init(format: LogFormat, filter: &str) {
    let mut filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Libraries that log what passes through them at DEBUG: the PostgreSQL client logs
    // every statement's parameters (sealed records, tokens, keyed hashes). Never below
    // INFO, whatever the filter asks.
    for quiet in QUIET_LIBRARIES {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

//! Structured logs to stderr. Nothing here knows about card data: keeping it out of
//! log fields is the job of the types that hold it (they print `[REDACTED]`) and of
//! `#[instrument(skip_all)]` on every handler.

use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::fmt;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Libraries that log what passes through them below INFO: the PostgreSQL client logs
/// every statement's parameters at DEBUG (sealed records, tokens, keyed hashes).
/// Their events below INFO are never written, whatever the filter asks.
const QUIET_LIBRARIES: [&str; 3] = ["tokio_postgres", "postgres_protocol", "deadpool"];

/// Whether an event may be written at all: a second filter beside the configured one,
/// so that no directive (a more specific target such as `tokio_postgres::query=debug`,
/// or a span directive such as `[rpc]=trace`) lets the quiet libraries through.
fn allowed(metadata: &tracing::Metadata<'_>) -> bool {
    *metadata.level() <= tracing::Level::INFO
        || !QUIET_LIBRARIES
            .iter()
            .any(|library| metadata.target().starts_with(library))
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax, e.g. `info` or
/// `vault_server=debug,info`. Does nothing if a subscriber is already installed
/// (tests start several servers in one process).
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter)
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .and(filter_fn(allowed));
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let _ = match format {
        LogFormat::Plain => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().flatten_event(true).with_filter(filter))
            .try_init(),
    };
}

//! `keyservice`: parses flags, loads the config, and calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use runtime::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(version, about = "Tokenization vault key service")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "KEYSERVICE_CONFIG",
        default_value = "keyservice.toml"
    )]
    config: PathBuf,
    #[arg(long, env = "KEYSERVICE_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `keyservice=debug,info`.
    #[arg(long, env = "KEYSERVICE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve keys (the default).
    Run,
    /// Create the keyring: version 1 of every key purpose, sealed under the root key.
    Init,
    /// Write a new random root key to FILE with mode 0600 (refuses to overwrite).
    GenRootKey { file: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::telemetry::init(cli.log_format, &cli.log);
    runtime::harden::harden_process();
    let load = || keyservice::Settings::load(&cli.config).context("load configuration");
    match cli.command.unwrap_or(Command::Run) {
        Command::GenRootKey { file } => {
            runtime::harden::lock_memory(&Default::default()).context("lock memory")?;
            keyservice::keyring::RootKey::generate_file(&file)
                .with_context(|| format!("create root key file {}", file.display()))?;
            tracing::info!(file = %file.display(), "root key written (mode 0600)");
        }
        Command::Init => {
            let settings = load()?;
            runtime::harden::lock_memory(&settings.memory).context("lock memory")?;
            keyservice::init(&settings).context("initialize keyring")?;
            tracing::info!(keyring = %settings.keyring_file.display(), "keyring created");
        }
        Command::Run => {
            let settings = load()?;
            // Before the keyring is opened: no key material is in memory yet.
            runtime::harden::lock_memory(&settings.memory).context("lock memory")?;
            // Signal handlers first, so that a SIGTERM right after the start-up line is
            // a clean stop, not the default kill.
            let shutdown = runtime::shutdown::Shutdown::on_signals();
            let bound = keyservice::bind(&settings)
                .await
                .context("start keyservice")?;
            #[allow(clippy::print_stdout)] // the one machine-readable start-up line
            {
                println!("keyservice listening on {}", bound.local_addr());
            }
            bound.serve(shutdown).await.context("serve")?;
        }
    }
    Ok(())
}

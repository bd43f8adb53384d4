//! `vault-server`: parses flags, loads the config, and calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use runtime::shutdown::Shutdown;
use runtime::telemetry::LogFormat;

/// mimalloc rather than glibc malloc: the hot path allocates small, short-lived buffers
/// on two threads' worth of tasks, which glibc's arenas handled with visible locking
/// and consolidation cost in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "Card tokenization vault server")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, env = "VAULT_CONFIG", default_value = "vault-server.toml")]
    config: PathBuf,
    #[arg(long, env = "VAULT_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `vault_server=debug,info`.
    #[arg(long, env = "VAULT_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Copy backup NAME from backup_dir into the empty data directory (vault stopped).
    RestoreBackup { name: String },
    /// Apply the PostgreSQL schema migrations the database lacks (storage.type =
    /// "postgres"), then exit. The vault also applies them at start-up unless
    /// storage.postgres.migrate = false.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::telemetry::init(cli.log_format, &cli.log);
    runtime::harden::harden_process();
    let settings = vault_server::Settings::load(&cli.config).context("load configuration")?;
    // Before any key or card reaches memory.
    runtime::harden::lock_memory(&settings.memory).context("lock memory")?;
    if let Some(Command::RestoreBackup { name }) = &cli.command {
        let files = vault_server::restore_backup(&settings, name).context("restore backup")?;
        tracing::info!(backup = %name, files, data_dir = %settings.data_dir.display(), "backup restored");
        tracing::warn!(
            "the restored audit log ends before this vault's checkpoint at the keyservice: \
             `vaultctl audit verify` reports the gap until two admins acknowledge it \
             (docs/operations.md, \"A restore leaves a gap in the audit log\")"
        );
        return Ok(());
    }
    if let Some(Command::Migrate) = &cli.command {
        let applied = vault_server::migrate(&settings)
            .await
            .context("migrate the database")?;
        #[allow(clippy::print_stdout)] // the command's answer
        {
            match applied.as_slice() {
                [] => println!("the database schema is up to date"),
                versions => println!("applied migrations {versions:?}"),
            }
        }
        return Ok(());
    }
    let shutdown = Shutdown::on_signals();
    let bound = vault_server::start(&settings, shutdown.clone())
        .await
        .context("start vault-server")?;
    #[allow(clippy::print_stdout)] // the one machine-readable start-up line
    {
        println!("vault-server listening on {}", bound.local_addr());
    }
    bound.serve(shutdown).await.context("serve")?;
    Ok(())
}

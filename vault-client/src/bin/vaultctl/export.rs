//! `vaultctl export ...`: moving a tenant's cards out to a new processor, under dual
//! control (docs/operations.md, "Moving cards out"). The vault writes the file,
//! encrypted to the processor's pinned OpenPGP key, into its export directory; no
//! card reaches vaultctl.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use vault_client::VaultClient;

use crate::ConfigFn;

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Propose exporting our tenant's tokens (all, or those in --tokens) to a
    /// processor that declares an export key; prints the job id.
    Propose {
        #[arg(long)]
        processor: String,
        /// A file with one token per line; default: every token of the tenant.
        #[arg(long)]
        tokens: Option<PathBuf>,
    },
    /// Approve another identity's export job.
    Approve { job: String },
    /// Write an approved job's file (once), with the --tokens it was proposed with.
    Run {
        job: String,
        #[arg(long)]
        tokens: Option<PathBuf>,
    },
}

fn tokens(path: Option<&PathBuf>) -> anyhow::Result<Vec<String>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token list {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

pub async fn run(command: ExportCommand, vault: ConfigFn<'_>) -> anyhow::Result<ExitCode> {
    let mut client = VaultClient::connect(&vault()?).await?;
    match command {
        ExportCommand::Propose {
            processor,
            tokens: list,
        } => {
            let job = client
                .propose_export(&processor, tokens(list.as_ref())?)
                .await
                .context("proposing the export job")?;
            println!("{}", job.id);
            eprintln!(
                "proposed export job {} of tenant {} to processor {} ({} tokens); a second \
                 identity with the `export` permission approves it: vaultctl export approve {}",
                job.id, job.tenant, job.processor, job.selection, job.id
            );
        }
        ExportCommand::Approve { job } => {
            let job = client
                .approve_export(&job)
                .await
                .context("approving the export job")?;
            println!(
                "approved export job {} of tenant {} to processor {} (proposed by {}); state: \
                 {}; run it once, before {}",
                job.id,
                job.tenant,
                job.processor,
                job.proposed_by,
                job.state,
                crate::output::utc(job.claim_by_unix_ms)
            );
        }
        ExportCommand::Run { job, tokens: list } => {
            let done = client
                .run_export(&job, tokens(list.as_ref())?)
                .await
                .context("running the export job")?;
            println!(
                "exported {} cards to processor {} (key {}): {}",
                done.cards, done.processor, done.fingerprint, done.destination
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! `vaultctl blocks ...`: the identities and addresses the vault blocks after repeated
//! failures, the identities its guessing detector flagged (until lifted), and lifting
//! a block or flag.
//!
//! The table has a header line, columns at least two spaces apart, times in UTC to the
//! second. When changing a line's wording, check `tests/` for parsers of it.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use vault_client::{Block, VaultClient};

use crate::ConfigFn;
use crate::output::{Align, print_json, table, utc};

#[derive(Debug, Subcommand)]
pub enum BlocksCommand {
    /// List the blocks in force: kind, subject, until when ("until lifted" for
    /// guessing flags), and the failures (or different cards) that led to each.
    List {
        /// Print the blocks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lift a block before it ends.
    Lift {
        /// What is blocked.
        #[arg(value_enum)]
        kind: BlockKind,
        /// The client identity, the address, or for a guessing flag "<identity> bucket
        /// <id>", as `blocks list` shows it.
        subject: String,
    },
}

/// A block's kind; the names are those of `vault_client::BLOCK_KINDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BlockKind {
    /// A client identity (certificate URI SAN or CN).
    Identity,
    /// A peer address.
    Address,
    /// An identity flagged for card guessing in one bucket (first six, last four).
    Guessing,
}

impl BlockKind {
    fn name(self) -> &'static str {
        match self {
            BlockKind::Identity => "identity",
            BlockKind::Address => "address",
            BlockKind::Guessing => "guessing",
        }
    }
}

pub async fn run(command: BlocksCommand, vault: ConfigFn<'_>) -> anyhow::Result<ExitCode> {
    let mut client = VaultClient::connect(&vault()?).await?;
    match command {
        BlocksCommand::List { json } => {
            let blocks = client.list_blocks().await.context("list blocks")?;
            if json {
                print_json(&blocks)?;
            } else if blocks.is_empty() {
                println!("no blocks");
            } else {
                print!("{}", blocks_table(&blocks));
            }
        }
        BlocksCommand::Lift { kind, subject } => {
            client
                .lift_block(kind.name(), &subject)
                .await
                .context("lift block")?;
            println!("lifted the {} block on {subject}", kind.name());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn blocks_table(blocks: &[Block]) -> String {
    let rows: Vec<Vec<String>> = blocks
        .iter()
        .map(|b| {
            vec![
                b.kind.clone(),
                b.subject.clone(),
                match b.until_unix_ms {
                    0 => "until lifted".to_owned(),
                    until => utc(until),
                },
                b.failures.to_string(),
            ]
        })
        .collect();
    table(
        &[
            ("kind", Align::Left),
            ("subject", Align::Left),
            ("until (UTC)", Align::Left),
            ("failures", Align::Right),
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_the_client_library_names() {
        let names: Vec<String> = BlockKind::value_variants()
            .iter()
            .map(|k| {
                let cli = k.to_possible_value().unwrap().get_name().to_owned();
                assert_eq!(cli, k.name());
                cli
            })
            .collect();
        assert_eq!(names, vault_client::BLOCK_KINDS);
    }

    #[test]
    fn table_of_blocks() {
        let blocks = [
            Block {
                kind: "identity".into(),
                subject: "spiffe://tokenvault.dev/checkout".into(),
                until_unix_ms: 1_700_000_000_000,
                failures: 5,
            },
            Block {
                kind: "address".into(),
                subject: "10.0.0.7".into(),
                until_unix_ms: 1_700_000_900_000,
                failures: 120,
            },
        ];
        let text = blocks_table(&blocks);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "kind      subject                           until (UTC)           failures",
                "identity  spiffe://tokenvault.dev/checkout  2023-11-14T22:13:20Z         5",
                "address   10.0.0.7                          2023-11-14T22:28:20Z       120",
            ]
        );
    }
}

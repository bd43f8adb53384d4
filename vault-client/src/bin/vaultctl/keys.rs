//! `vaultctl keys ...`: key lifecycle management. Everything talks to the keyservice
//! except `rewrap`, which drives the vault's re-encryption job.
//!
//! Output is meant for people and for tests that parse it: tables have a header line,
//! columns at least two spaces apart and "-" for an empty cell; times are UTC, RFC 3339,
//! to the second. When changing a line's wording, check `tests/e2e` for parsers of it.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use vault_client::{KeyEvent, KeyListing, KeyServiceClient, Proposal, RewrapStatus, VaultClient};

use crate::ConfigFn;
use crate::output::{Align, now_unix_ms, or_dash, print_json, table, utc};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List key versions: state, encryptions leased against the version's limit, and
    /// records using it as the vaults last reported (never material).
    List {
        /// Print versions and reporters as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a new active version of a purpose; the previous active version becomes
    /// decrypt-only. Follow with `keys rewrap` to move stored records onto it.
    Rotate {
        /// The key's purpose.
        #[arg(long, value_enum)]
        purpose: Purpose,
    },
    /// Propose retiring a decrypt-only version: once a second admin approves (`keys
    /// approve ID`), the keyservice stops serving it to vaults. Refused while records
    /// use it (rewrap first) unless --force; never for an audit key. Un-retiring needs
    /// two admins too (`keys propose unretire`).
    Retire {
        /// The key version, e.g. 2 (see `keys list`).
        version: u32,
        /// The key's purpose.
        #[arg(long, value_enum, default_value = "card-data")]
        purpose: Purpose,
        /// Retire although records use the version: their tokens stop working until
        /// it is un-retired. The proposal shows how many.
        #[arg(long)]
        force: bool,
    },
    /// Propose accepting a keyservice restored from an older keyring copy (it refuses
    /// keys and leases once a vault shows it has seen a later generation). On a second
    /// admin's approval every purpose is rotated above any version a vault uses, and
    /// versions the key history shows destroyed are destroyed again.
    AcceptRestore,
    /// Propose an operation that needs dual control; a different admin must approve it
    /// (`keys approve ID`) before it expires.
    #[command(subcommand)]
    Propose(ProposeCommand),
    /// Approve another admin's proposal; the keyservice carries it out at once.
    Approve {
        /// The proposal id, e.g. p-3f9c1a2b.
        id: String,
    },
    /// List open and recent proposals.
    Proposals {
        /// Print the proposals as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The keyservice's audit trail of key operations, oldest first.
    History {
        /// Only the last N events; 0 for all.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print the events as JSON.
        #[arg(long)]
        json: bool,
        /// Check the whole history's chain instead of printing events: exits 1 if a
        /// line was edited, removed, inserted or reordered.
        #[arg(long)]
        verify: bool,
    },
    /// Re-encrypt the vault's records onto the active card-data and fingerprint
    /// versions (talks to the vault). Starts the job (or joins the running one) and
    /// shows its progress until it ends; exits 1 if any record failed. The job runs in
    /// the vault: interrupting vaultctl does not stop it.
    Rewrap {
        /// Only print the job's status; do not start it.
        #[arg(long, conflicts_with = "no_wait")]
        status: bool,
        /// Start the job, print its status once and return.
        #[arg(long)]
        no_wait: bool,
        /// Print the (final) status as JSON; progress still goes to stderr.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProposeCommand {
    /// Destroy a version's material for good. The keyservice refuses while any vault
    /// reports records under it: rewrap first.
    Destroy {
        /// The key version, e.g. 2 (see `keys list`).
        version: u32,
        /// The key's purpose.
        #[arg(long, value_enum, default_value = "card-data")]
        purpose: Purpose,
    },
    /// Make a retired version decrypt-only again.
    Unretire {
        /// The key version, e.g. 2 (see `keys list`).
        version: u32,
        /// The key's purpose.
        #[arg(long, value_enum, default_value = "card-data")]
        purpose: Purpose,
    },
    /// Re-seal the keyring under a new root key.
    RootKey {
        /// Path of the new root key file on the keyservice host (made there with
        /// `keyservice gen-root-key`); it is not read from this machine.
        file: String,
    },
    /// Acknowledge a gap in a vault's audit log, as `vaultctl audit verify` reports it
    /// (a restored backup, a lost disk): the vault serves card data again, and verify
    /// lists the gap instead of failing on it.
    AuditGap {
        /// The first missing entry.
        first: u64,
        /// The last missing entry.
        last: u64,
        /// The vault's certificate identity (e.g. spiffe://tokenvault.dev/vault).
        #[arg(long)]
        vault_identity: String,
        /// The vault's node name, as `vaultctl audit verify` prints it.
        #[arg(long)]
        node: String,
    },
}

/// A key purpose; the names are those of `vault_client::KEY_PURPOSES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Purpose {
    CardData,
    Fingerprint,
    Cvc,
    Audit,
    Intake,
    Import,
    ImportRsa,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Purpose::CardData => "card-data",
            Purpose::Fingerprint => "fingerprint",
            Purpose::Cvc => "cvc",
            Purpose::Audit => "audit",
            Purpose::Intake => "intake",
            Purpose::Import => "import",
            Purpose::ImportRsa => "import-rsa",
        }
    }
}

pub async fn run(
    command: KeysCommand,
    vault: ConfigFn<'_>,
    keyservice: ConfigFn<'_>,
) -> anyhow::Result<ExitCode> {
    let keys = || async { anyhow::Ok(KeyServiceClient::connect(&keyservice()?).await?) };
    match command {
        KeysCommand::List { json } => {
            let listing = keys()
                .await?
                .list_versions()
                .await
                .context("list key versions")?;
            if json {
                print_json(&listing)?;
            } else {
                print!("{}", listing_text(&listing, now_unix_ms()));
            }
        }
        KeysCommand::Rotate { purpose } => {
            let mut client = keys().await?;
            // Only for the message: which version this rotation demotes.
            let previous = client
                .list_versions()
                .await
                .context("list key versions")?
                .versions
                .into_iter()
                .find(|v| v.purpose == purpose.name() && v.state == "active")
                .map(|v| v.version);
            let created = client.rotate(purpose.name()).await.context("rotate key")?;
            println!(
                "{}",
                rotated_line(purpose.name(), created.version, &created.state, previous)
            );
        }
        KeysCommand::Retire {
            version,
            purpose,
            force,
        } => {
            let proposal = keys()
                .await?
                .propose_retire(purpose.name(), version, force)
                .await
                .context("propose retiring the key version")?;
            print!("{}", proposed_text(&proposal));
        }
        KeysCommand::AcceptRestore => {
            let proposal = keys()
                .await?
                .propose_accept_restore()
                .await
                .context("propose accepting the restored keyring")?;
            print!("{}", proposed_text(&proposal));
        }
        KeysCommand::Propose(what) => {
            let mut client = keys().await?;
            let proposal = match what {
                ProposeCommand::Destroy { version, purpose } => {
                    client.propose_destroy(purpose.name(), version).await
                }
                ProposeCommand::Unretire { version, purpose } => {
                    client.propose_unretire(purpose.name(), version).await
                }
                ProposeCommand::RootKey { file } => client.propose_root_key_change(&file).await,
                ProposeCommand::AuditGap {
                    first,
                    last,
                    vault_identity,
                    node,
                } => {
                    client
                        .propose_audit_gap(&vault_identity, &node, first, last)
                        .await
                }
            }
            .context("propose operation")?;
            print!("{}", proposed_text(&proposal));
        }
        KeysCommand::Approve { id } => {
            let proposal = keys()
                .await?
                .approve(&id)
                .await
                .context("approve proposal")?;
            if proposal.state != "approved" {
                bail!(
                    "the keyservice answered with proposal {} {}, not approved",
                    proposal.id,
                    proposal.state
                );
            }
            println!("{}", approved_line(&proposal));
        }
        KeysCommand::Proposals { json } => {
            let proposals = keys().await?.proposals().await.context("list proposals")?;
            if json {
                print_json(&proposals)?;
            } else if proposals.is_empty() {
                println!("no proposals");
            } else {
                print!("{}", proposals_table(&proposals));
            }
        }
        KeysCommand::History {
            verify: true, json, ..
        } => {
            let chain = keys()
                .await?
                .verify_history()
                .await
                .context("verify the key history")?;
            if json {
                print_json(&chain)?;
            } else {
                let before = match chain.unchained {
                    0 => String::new(),
                    n => format!(" ({n} from before the chain, not covered)"),
                };
                match chain.broken_at {
                    None => println!("key history intact: {} events{before}", chain.events),
                    Some(sequence) => println!(
                        "key history BROKEN at event {sequence}: a line was edited, removed, \
                         inserted or reordered there ({} events read)",
                        chain.events
                    ),
                }
            }
            if chain.broken_at.is_some() {
                return Ok(ExitCode::FAILURE);
            }
        }
        KeysCommand::History { limit, json, .. } => {
            let events = keys()
                .await?
                .history(limit)
                .await
                .context("get key history")?;
            if json {
                print_json(&events)?;
            } else if events.is_empty() {
                println!("no key events");
            } else {
                print!("{}", history_table(&events));
            }
        }
        KeysCommand::Rewrap {
            status,
            no_wait,
            json,
        } => {
            let mut client = VaultClient::connect(&vault()?).await?;
            if status || no_wait {
                let current = if status {
                    client.rewrap_status().await.context("get rewrap status")?
                } else {
                    client.start_rewrap().await.context("start rewrap")?
                };
                if json {
                    print_json(&current)?;
                } else {
                    print!("{}", status_text(&current));
                }
            } else {
                return rewrap_and_wait(&mut client, json).await;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// "card-data v2", or "-" without a key version.
fn key_cell(purpose: Option<&str>, version: Option<u32>) -> String {
    match (purpose, version) {
        (Some(p), Some(v)) => format!("{p} v{v}"),
        (Some(p), None) => p.to_owned(),
        (None, Some(v)) => format!("v{v}"),
        (None, None) => "-".into(),
    }
}

/// The `keys list` text: the table, a blank line, then one line per reporting vault.
fn listing_text(listing: &KeyListing, now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = listing
        .versions
        .iter()
        .map(|v| {
            let leased = if v.encryption_limit > 0 {
                format!("{} / {}", v.encryptions_leased, v.encryption_limit)
            } else {
                v.encryptions_leased.to_string()
            };
            vec![
                v.purpose.clone(),
                v.version.to_string(),
                v.state.clone(),
                utc(v.created_at_unix_ms),
                leased,
                v.records.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            ("purpose", Align::Left),
            ("version", Align::Right),
            ("state", Align::Left),
            ("created (UTC)", Align::Left),
            ("encryptions leased", Align::Right),
            ("records", Align::Right),
        ],
        &rows,
    );
    out.push('\n');
    if listing.reporters.is_empty() {
        out.push_str("records: no vault has reported usage yet\n");
    }
    for r in &listing.reporters {
        // Clamped: a keyservice clock ahead of ours is not "-3 s ago".
        let secs = now_ms.saturating_sub(r.reported_at_unix_ms).max(0) / 1000;
        out.push_str(&format!(
            "records as reported by {} (instance {}) {secs} s ago\n",
            r.identity,
            if r.instance.is_empty() {
                "-"
            } else {
                &r.instance
            }
        ));
    }
    out
}

fn rotated_line(purpose: &str, version: u32, state: &str, previous: Option<u32>) -> String {
    match previous {
        Some(previous) if previous != version => format!(
            "rotated {purpose}: version {version} is {state}; version {previous} is now decrypt-only"
        ),
        _ => format!("rotated {purpose}: version {version} is {state}"),
    }
}

/// What a proposal would do: "destroy card-data version 2",
/// "root-key-change to /etc/keyservice/root-2.key".
fn describe(p: &Proposal) -> String {
    if let Some((identity, node, first, last)) = &p.audit_gap {
        return format!("{} {first}..={last} of {identity} at {node}", p.kind);
    }
    let forced = match (p.force, p.records) {
        (false, _) => String::new(),
        (true, 0) => ", forced (no record uses it)".into(),
        (true, n) => format!(", forced: {n} records use it and stop working"),
    };
    match (&p.new_root_key_file, &p.purpose, p.version) {
        (Some(file), _, _) => format!("{} to {file}", p.kind),
        (None, Some(purpose), Some(version)) => {
            format!("{} {purpose} version {version}{forced}", p.kind)
        }
        _ => p.kind.clone(),
    }
}

fn proposed_text(p: &Proposal) -> String {
    format!(
        "proposal id: {id}\n\
         operation: {what} (proposed by {by})\n\
         another admin must run: vaultctl keys approve {id} (before {expiry})\n",
        id = p.id,
        what = describe(p),
        by = p.proposed_by,
        expiry = utc(p.expires_at_unix_ms),
    )
}

/// What the keyservice carried out for an approved proposal.
fn approved_line(p: &Proposal) -> String {
    let target = key_cell(p.purpose.as_deref(), p.version).replace(" v", " version ");
    let done = match (p.kind.as_str(), &p.new_root_key_file) {
        ("destroy", _) => format!("destroyed {target}; its material is gone for good"),
        ("unretire", _) => format!("{target} is decrypt-only again"),
        ("retire", _) => format!(
            "retired {target}: no longer served to vaults (to undo: vaultctl keys propose \
             unretire, approved by another admin)"
        ),
        ("root-key-change", Some(file)) => {
            format!("keyring re-sealed under the root key in {file}")
        }
        ("audit-gap", _) => format!("acknowledged {}", describe(p)),
        ("accept-restore", _) => {
            "accepted the restored keyring: every purpose rotated, vaults served again".into()
        }
        _ => format!("carried out {}", describe(p)),
    };
    format!(
        "approved {}: {done} (proposed by {}, approved by {})",
        p.id,
        p.proposed_by,
        p.approved_by.as_deref().unwrap_or("-")
    )
}

fn proposals_table(proposals: &[Proposal]) -> String {
    let rows: Vec<Vec<String>> = proposals
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.kind.clone(),
                match &p.new_root_key_file {
                    Some(file) => file.clone(),
                    None => key_cell(p.purpose.as_deref(), p.version),
                },
                p.state.clone(),
                p.proposed_by.clone(),
                utc(p.proposed_at_unix_ms),
                utc(p.expires_at_unix_ms),
                p.approved_by.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            ("id", Align::Left),
            ("kind", Align::Left),
            ("target", Align::Left),
            ("state", Align::Left),
            ("proposed by", Align::Left),
            ("proposed (UTC)", Align::Left),
            ("expires (UTC)", Align::Left),
            ("approved by", Align::Left),
        ],
        &rows,
    )
}

fn history_table(events: &[KeyEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.sequence.to_string(),
                utc(e.at_unix_ms),
                or_dash(&e.actor),
                or_dash(&e.action),
                key_cell(e.purpose.as_deref(), e.version),
                or_dash(&e.outcome),
                or_dash(&e.detail),
            ]
        })
        .collect();
    table(
        &[
            ("seq", Align::Right),
            ("time (UTC)", Align::Left),
            ("actor", Align::Left),
            ("action", Align::Left),
            ("key", Align::Left),
            ("outcome", Align::Left),
            ("detail", Align::Left),
        ],
        &rows,
    )
}

// --- rewrap ---

const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often a progress line is printed when stderr is not a terminal (a log file).
const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How long to keep polling through an unreachable vault (a restart: the job resumes).
const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);

async fn rewrap_and_wait(client: &mut VaultClient, json: bool) -> anyhow::Result<ExitCode> {
    let began = Instant::now();
    let mut status = client.start_rewrap().await.context("start rewrap")?;
    let mut progress = ProgressOutput::new(std::io::stderr().is_terminal());
    // One listener for the whole wait: a Ctrl-C during a call must not be lost.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut can_interrupt = true;
    let mut unreachable_since: Option<Instant> = None;
    while status.running {
        if unreachable_since.is_none() {
            progress.show(&status);
        }
        let poll = async {
            tokio::time::sleep(POLL_INTERVAL).await;
            client.rewrap_status().await
        };
        tokio::select! {
            signal = &mut interrupted, if can_interrupt => {
                if signal.is_err() {
                    // No Ctrl-C handler: the default one stays.
                    can_interrupt = false;
                    continue;
                }
                progress.finish();
                eprintln!(
                    "interrupted: the rewrap goes on in the vault; follow it with `vaultctl keys rewrap --status`"
                );
                return Ok(ExitCode::from(130));
            }
            result = poll => match result {
                Ok(next) => {
                    status = next;
                    unreachable_since = None;
                }
                Err(e) if e.code() == Some(tonic::Code::Unavailable) => {
                    let since = match unreachable_since {
                        Some(since) => since,
                        None => {
                            progress.finish();
                            eprintln!(
                                "the vault is unreachable ({e}); retrying for up to {} s (a restarted vault resumes the job)",
                                UNREACHABLE_GRACE.as_secs()
                            );
                            *unreachable_since.insert(Instant::now())
                        }
                    };
                    if since.elapsed() > UNREACHABLE_GRACE {
                        return Err(e).context(format!(
                            "get rewrap status (vault unreachable for {} s)",
                            UNREACHABLE_GRACE.as_secs()
                        ));
                    }
                }
                Err(e) => {
                    progress.finish();
                    return Err(e).context("get rewrap status");
                }
            },
        }
    }
    if progress.drawn() {
        progress.show(&status);
    }
    progress.finish();
    if json {
        print_json(&status)?;
    } else {
        println!("{}", summary_line(&status, began.elapsed()));
    }
    if status.failed > 0 {
        eprintln!(
            "error: {} records could not be re-encrypted and stay on their old key versions; the vault's log names them",
            status.failed
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Draws progress on stderr: an in-place bar on a terminal, a line every few seconds
/// otherwise.
#[derive(Debug)]
struct ProgressOutput {
    terminal: bool,
    /// Characters of the bar on screen, to overwrite a longer previous one.
    width: usize,
    last_line: Option<Instant>,
}

impl ProgressOutput {
    fn new(terminal: bool) -> Self {
        Self {
            terminal,
            width: 0,
            last_line: None,
        }
    }

    fn drawn(&self) -> bool {
        self.width > 0
    }

    fn show(&mut self, status: &RewrapStatus) {
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let line = bar_line(&Progress::of(status));
            let width = self.width.max(line.len());
            // Progress is best effort: a closed stderr must not end the rewrap wait.
            let _ = write!(stderr, "\r{line:<width$}");
            let _ = stderr.flush();
            self.width = line.len();
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_INTERVAL)
        {
            let _ = writeln!(stderr, "{}", plain_line(&Progress::of(status)));
            self.last_line = Some(Instant::now());
        }
    }

    /// Ends the bar's line, so what follows starts on a fresh one.
    fn finish(&mut self) {
        if self.terminal && self.width > 0 {
            eprintln!();
            self.width = 0;
        }
    }
}

/// A rewrap status as progress figures.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Progress {
    /// Records visited: re-encrypted or failed.
    processed: u64,
    total: u64,
    percent: f64,
    rate_per_sec: f64,
    /// Seconds left at the current rate; `None` while the rate is unknown.
    eta_secs: Option<u64>,
}

impl Progress {
    fn of(status: &RewrapStatus) -> Self {
        // `remaining` counts records not yet visited; failed ones are counted apart.
        let processed = status.done.saturating_add(status.failed);
        let total = processed.saturating_add(status.remaining);
        let percent = if total == 0 {
            100.0
        } else {
            processed as f64 * 100.0 / total as f64
        };
        let eta_secs = if status.remaining == 0 {
            Some(0)
        } else if status.rate_per_sec > 0.0 && status.rate_per_sec.is_finite() {
            Some((status.remaining as f64 / status.rate_per_sec).ceil() as u64)
        } else {
            None
        };
        Self {
            processed,
            total,
            percent,
            rate_per_sec: status.rate_per_sec,
            eta_secs,
        }
    }
}

const BAR_WIDTH: usize = 30;

/// `[#########---------------------]  1234/5000  24.7%  812/s  ETA 5s`
fn bar_line(p: &Progress) -> String {
    let filled = ((p.percent / 100.0) * BAR_WIDTH as f64).floor() as usize;
    let filled = filled.min(BAR_WIDTH);
    format!(
        "[{}{}]  {}/{}  {:.1}%  {}/s  ETA {}",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        p.processed,
        p.total,
        p.percent,
        rate(p.rate_per_sec),
        p.eta_secs.map_or_else(|| "?".into(), duration),
    )
}

/// `rewrap: 1234/5000 records (24.7%), 812 records/s, ETA 5s`
fn plain_line(p: &Progress) -> String {
    format!(
        "rewrap: {}/{} records ({:.1}%), {} records/s, ETA {}",
        p.processed,
        p.total,
        p.percent,
        rate(p.rate_per_sec),
        p.eta_secs.map_or_else(|| "?".into(), duration),
    )
}

fn rate(per_sec: f64) -> String {
    if per_sec >= 100.0 {
        format!("{per_sec:.0}")
    } else {
        format!("{per_sec:.1}")
    }
}

/// `45s`, `2m05s`, `1h02m`.
fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// `rewrap finished: 5000 records re-encrypted onto card-data v2 / fingerprint v1, 0 failed, in 6.2 s`
fn summary_line(status: &RewrapStatus, waited: Duration) -> String {
    // The job's own duration when the vault reports it (we may have joined late).
    let secs = match (status.started_at_unix_ms, status.finished_at_unix_ms) {
        (Some(start), Some(end)) if end >= start => (end - start) as f64 / 1000.0,
        _ => waited.as_secs_f64(),
    };
    format!(
        "rewrap finished: {} records re-encrypted onto card-data v{} / fingerprint v{}, {} failed, in {secs:.1} s",
        status.done, status.card_data_version, status.fingerprint_version, status.failed
    )
}

/// The `--status` / `--no-wait` text.
fn status_text(s: &RewrapStatus) -> String {
    let state = match (s.running, s.started_at_unix_ms) {
        (true, _) => "running",
        (false, Some(_)) => "finished",
        (false, None) => "not started",
    };
    let progress = Progress::of(s);
    format!(
        "state:           {state}\n\
         done:            {}\n\
         remaining:       {}\n\
         failed:          {}\n\
         rate:            {} records/s\n\
         eta:             {}\n\
         target versions: card-data v{} / fingerprint v{}\n\
         started (UTC):   {}\n\
         finished (UTC):  {}\n",
        s.done,
        s.remaining,
        s.failed,
        rate(s.rate_per_sec),
        match (s.running, progress.eta_secs) {
            (false, _) => "-".into(),
            (true, None) => "?".into(),
            (true, Some(secs)) => duration(secs),
        },
        s.card_data_version,
        s.fingerprint_version,
        s.started_at_unix_ms.map_or_else(|| "-".into(), utc),
        s.finished_at_unix_ms.map_or_else(|| "-".into(), utc),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vault_client::{KeyVersion, UsageReporter};

    fn status(done: u64, remaining: u64, failed: u64, rate: f64) -> RewrapStatus {
        RewrapStatus {
            running: remaining > 0,
            done,
            remaining,
            failed,
            rate_per_sec: rate,
            card_data_version: 2,
            fingerprint_version: 1,
            started_at_unix_ms: Some(1_700_000_000_000),
            finished_at_unix_ms: None,
        }
    }

    #[test]
    fn purpose_names_are_the_client_library_names() {
        let names: Vec<String> = Purpose::value_variants()
            .iter()
            .map(|p| {
                let cli = p.to_possible_value().unwrap().get_name().to_owned();
                assert_eq!(cli, p.name());
                cli
            })
            .collect();
        assert_eq!(names, vault_client::KEY_PURPOSES);
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(125), "2m05s");
        assert_eq!(duration(3600 + 120 + 59), "1h02m");
    }

    #[test]
    fn progress_counts_failed_records_as_visited() {
        let p = Progress::of(&status(1000, 3000, 0, 500.0));
        assert_eq!((p.processed, p.total), (1000, 4000));
        assert!((p.percent - 25.0).abs() < 1e-9);
        assert_eq!(p.eta_secs, Some(6));
        let p = Progress::of(&status(900, 0, 100, 0.0));
        assert_eq!((p.processed, p.total, p.eta_secs), (1000, 1000, Some(0)));
        assert!((p.percent - 100.0).abs() < 1e-9);
    }

    #[test]
    fn progress_without_records_or_rate() {
        let p = Progress::of(&status(0, 0, 0, 0.0));
        assert!((p.percent - 100.0).abs() < 1e-9);
        assert_eq!(p.eta_secs, Some(0));
        // Just started: no rate yet, no ETA.
        assert_eq!(Progress::of(&status(0, 10, 0, 0.0)).eta_secs, None);
        assert_eq!(Progress::of(&status(0, 10, 0, f64::NAN)).eta_secs, None);
    }

    #[test]
    fn bar_and_plain_lines() {
        let p = Progress::of(&status(1234, 3766, 0, 812.4));
        assert_eq!(
            bar_line(&p),
            "[#######-----------------------]  1234/5000  24.7%  812/s  ETA 5s"
        );
        assert_eq!(
            plain_line(&p),
            "rewrap: 1234/5000 records (24.7%), 812 records/s, ETA 5s"
        );
        let p = Progress::of(&status(0, 10, 0, 0.0));
        assert!(bar_line(&p).starts_with(&format!("[{}]", "-".repeat(BAR_WIDTH))));
        assert!(bar_line(&p).ends_with("0.0/s  ETA ?"), "{}", bar_line(&p));
        let p = Progress::of(&status(10, 0, 0, 3.25));
        assert!(bar_line(&p).starts_with(&format!("[{}]", "#".repeat(BAR_WIDTH))));
        assert!(
            bar_line(&p).contains("100.0%  3.2/s  ETA 0s"),
            "{}",
            bar_line(&p)
        );
    }

    #[test]
    fn summary_uses_the_job_duration() {
        let mut s = status(5000, 0, 2, 0.0);
        s.running = false;
        s.finished_at_unix_ms = Some(1_700_000_006_250);
        assert_eq!(
            summary_line(&s, Duration::from_secs(1)),
            "rewrap finished: 5000 records re-encrypted onto card-data v2 / fingerprint v1, 2 failed, in 6.2 s"
        );
        s.finished_at_unix_ms = None;
        assert!(summary_line(&s, Duration::from_millis(1500)).ends_with("in 1.5 s"));
    }

    #[test]
    fn status_text_states() {
        let text = status_text(&status(1, 9, 0, 0.0));
        assert!(text.starts_with("state:           running\n"), "{text}");
        assert!(text.contains("eta:             ?\n"), "{text}");
        let mut never = status(0, 0, 0, 0.0);
        never.started_at_unix_ms = None;
        let text = status_text(&never);
        assert!(text.starts_with("state:           not started\n"), "{text}");
        assert!(text.contains("started (UTC):   -\n"), "{text}");
    }

    #[test]
    fn listing_shows_limits_and_reporters() {
        let version = |purpose: &str, version, state: &str, limit| KeyVersion {
            purpose: purpose.into(),
            version,
            state: state.into(),
            created_at_unix_ms: 1_700_000_000_000,
            encryptions_leased: 2048,
            encryption_limit: limit,
            records: 17,
        };
        let mut listing = KeyListing {
            versions: vec![
                version("card-data", 1, "decrypt-only", 1 << 32),
                version("card-data", 12, "active", 1 << 32),
                version("fingerprint", 1, "active", 0),
            ],
            reporters: vec![],
        };
        let text = listing_text(&listing, 1_700_000_100_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "purpose      version  state         created (UTC)         encryptions leased  records",
                "card-data          1  decrypt-only  2023-11-14T22:13:20Z   2048 / 4294967296       17",
                "card-data         12  active        2023-11-14T22:13:20Z   2048 / 4294967296       17",
                "fingerprint        1  active        2023-11-14T22:13:20Z                2048       17",
                "",
                "records: no vault has reported usage yet",
            ]
        );
        listing.reporters = vec![
            UsageReporter {
                identity: "vault-a".into(),
                instance: "1f2e3d4c5b6a7988".into(),
                reported_at_unix_ms: 1_700_000_058_500,
            },
            UsageReporter {
                identity: "vault-b".into(),
                instance: String::new(),
                reported_at_unix_ms: 1_700_000_200_000,
            },
        ];
        let text = listing_text(&listing, 1_700_000_100_000);
        assert!(
            text.ends_with(
                "\nrecords as reported by vault-a (instance 1f2e3d4c5b6a7988) 41 s ago\nrecords as reported by vault-b (instance -) 0 s ago\n"
            ),
            "{text}"
        );
    }

    fn proposal(kind: &str) -> Proposal {
        Proposal {
            id: "p-3f9c1a2b".into(),
            kind: kind.into(),
            purpose: Some("card-data".into()),
            version: Some(2),
            new_root_key_file: None,
            proposed_by: "admin-a".into(),
            proposed_at_unix_ms: 1_700_000_000_000,
            expires_at_unix_ms: 1_700_003_600_000,
            state: "pending".into(),
            approved_by: None,
            approved_at_unix_ms: None,
            audit_gap: None,
            force: false,
            records: 0,
        }
    }

    #[test]
    fn a_forced_retirement_says_what_stops_working() {
        let forced = Proposal {
            force: true,
            records: 12,
            ..proposal("retire")
        };
        assert!(
            proposed_text(&forced).contains(
                "operation: retire card-data version 2, forced: 12 records use it and stop working"
            ),
            "{}",
            proposed_text(&forced)
        );
    }

    #[test]
    fn proposal_texts() {
        assert_eq!(
            proposed_text(&proposal("destroy")),
            "proposal id: p-3f9c1a2b\n\
             operation: destroy card-data version 2 (proposed by admin-a)\n\
             another admin must run: vaultctl keys approve p-3f9c1a2b (before 2023-11-14T23:13:20Z)\n"
        );
        let mut p = proposal("unretire");
        p.state = "approved".into();
        p.approved_by = Some("admin-b".into());
        assert_eq!(
            approved_line(&p),
            "approved p-3f9c1a2b: card-data version 2 is decrypt-only again (proposed by admin-a, approved by admin-b)"
        );
        p.kind = "destroy".into();
        assert!(approved_line(&p).contains(": destroyed card-data version 2;"));
        let mut root = proposal("root-key-change");
        root.purpose = None;
        root.version = None;
        root.new_root_key_file = Some("/etc/keyservice/root-2.key".into());
        assert_eq!(
            describe(&root),
            "root-key-change to /etc/keyservice/root-2.key"
        );
        assert!(
            approved_line(&root)
                .contains(": keyring re-sealed under the root key in /etc/keyservice/root-2.key (")
        );
        let table = proposals_table(&[proposal("destroy"), root]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("id          kind             target"),
            "{table}"
        );
        assert!(
            lines[2].contains("  /etc/keyservice/root-2.key  pending  admin-a  "),
            "{table}"
        );
        assert!(lines[2].ends_with("  -"), "{table}");
    }

    #[test]
    fn rotated_lines() {
        assert_eq!(
            rotated_line("cvc", 3, "active", Some(2)),
            "rotated cvc: version 3 is active; version 2 is now decrypt-only"
        );
        assert_eq!(
            rotated_line("cvc", 1, "active", None),
            "rotated cvc: version 1 is active"
        );
    }

    #[test]
    fn history_cells_are_never_empty() {
        let events = [
            KeyEvent {
                sequence: 9,
                at_unix_ms: 1_700_000_000_000,
                actor: "keyservice".into(),
                action: "rotate".into(),
                purpose: Some("card-data".into()),
                version: Some(3),
                outcome: "ok".into(),
                detail: "budget spent".into(),
            },
            KeyEvent {
                sequence: 10,
                at_unix_ms: 1_700_000_000_000,
                actor: "admin-a".into(),
                action: "root-key-change".into(),
                purpose: None,
                version: None,
                outcome: "refused: not approved".into(),
                detail: String::new(),
            },
        ];
        let table = history_table(&events);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "seq  time (UTC)            actor       action           key           outcome                detail",
                "  9  2023-11-14T22:13:20Z  keyservice  rotate           card-data v3  ok                     budget spent",
                " 10  2023-11-14T22:13:20Z  admin-a     root-key-change  -             refused: not approved  -",
            ]
        );
    }
}

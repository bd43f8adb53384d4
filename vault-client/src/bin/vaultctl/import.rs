//! `vaultctl import ...`: moving cards in from another vault's or processor's
//! OpenPGP-encrypted export (docs/operations.md, "Moving cards in").
//!
//! - `import key export`: the vault's import public key (armored, on stdout) and its
//!   fingerprint (on stderr), for the sending party;
//! - `import propose FILE --rows N [--sender-key KEY]` and `import approve JOB`: the
//!   job under dual control, bound to the file (its SHA-256) and the sender's key;
//! - `import FILE --job JOB ...`: sends the file as it is (still encrypted) and writes
//!   the mapping file, one line per row: the source id and the token, last four and
//!   fingerprint, or the row's error (field and rule, never the value).
//!
//! The mapping file is the job's cursor: it is synced after every batch, and a run
//! started again with the same file and mapping goes on after its last complete line.
//! Rows the vault did again (the run stopped between the vault's write and the
//! mapping's) get the token they got the first time.

use std::io::{IsTerminal as _, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use vault_client::{IMPORT_PIECE_BYTES, ImportFormat, ImportedRow, VaultClient};

use crate::ConfigFn;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ImportArgs {
    #[command(subcommand)]
    command: Option<ImportCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// The import key for the sending party.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Propose importing FILE into our tenant: a second identity with the `import`
    /// permission approves it. The job takes this file only (its SHA-256) and, with
    /// --sender-key, only signed by that key. Prints the job id.
    Propose {
        /// The encrypted file exactly as it will be uploaded.
        file: PathBuf,
        /// Rows the file holds (the vault refuses a file with another count).
        #[arg(long)]
        rows: u64,
        /// The sender's OpenPGP public key (armored): the file must be signed by it.
        #[arg(long)]
        sender_key: Option<PathBuf>,
    },
    /// Approve another identity's import job.
    Approve { job: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print the active import key (ASCII-armored OpenPGP public key) on stdout and
    /// its fingerprint on stderr.
    Export {
        /// curve25519 (preferred: GnuPG 2.2 and later encrypt to it) or rsa4096, for
        /// senders whose tools cannot use Curve25519. The vault derives an RSA key the
        /// first time it is asked for: that call takes seconds.
        #[arg(long, value_enum, default_value_t = KeyAlgorithmArg::Curve25519)]
        algorithm: KeyAlgorithmArg,
    },
}

/// An import key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyAlgorithmArg {
    Curve25519,
    Rsa4096,
}

/// The file's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileFormatArg {
    /// A header row, then a card per row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// Column mappings of known exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Stripe's card export: id, card.number, card.exp_month, card.exp_year, name.
    Stripe,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The encrypted file (binary or ASCII-armored OpenPGP), as received.
    file: Option<PathBuf>,
    /// The approved job (`import propose` printed its id).
    #[arg(long)]
    job: Option<String>,
    #[arg(long, value_enum, default_value = "csv")]
    format: FileFormatArg,
    /// Take the column names of a known export.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// A small TOML file with the column names (`id`, `number`, `exp_month`,
    /// `exp_year`, `name`), e.g. `number = "PAN"`; flags given too override it.
    #[arg(long)]
    fields: Option<PathBuf>,
    /// Column (CSV header name) or field (JSON path, e.g. card.number) of the source's id.
    #[arg(long)]
    id_field: Option<String>,
    #[arg(long)]
    number_field: Option<String>,
    #[arg(long)]
    exp_month_field: Option<String>,
    #[arg(long)]
    exp_year_field: Option<String>,
    /// Cardholder name column; none by default (without a preset).
    #[arg(long)]
    name_field: Option<String>,
    /// The sender's OpenPGP public key (armored): the file must be signed by it.
    #[arg(long)]
    sender_key: Option<PathBuf>,
    /// The mapping file to write (and go on from). Default: FILE.mapping.csv.
    #[arg(long)]
    mapping: Option<PathBuf>,
    /// Rows per call (the vault bounds it by its max_batch_size).
    #[arg(long, default_value_t = 1000)]
    batch: u32,
    /// No progress bar on stderr.
    #[arg(long)]
    quiet: bool,
}

/// The deadline of the calls that may make a vault derive its RSA import key (a search
/// for primes: seconds, longer on a busy machine): the key's first export, and a file's
/// last piece, whose check tries that key when no other key opens the file.
const RSA_KEY_DEADLINE: Duration = Duration::from_secs(120);

pub async fn run(args: ImportArgs, vault: ConfigFn<'_>) -> anyhow::Result<ExitCode> {
    let mut config = vault()?;
    if matches!(
        &args.command,
        None | Some(ImportCommand::Key(KeyCommand::Export {
            algorithm: KeyAlgorithmArg::Rsa4096,
        }))
    ) {
        config.timeout = config.timeout.max(RSA_KEY_DEADLINE);
    }
    let mut client = VaultClient::connect(&config).await?;
    match args.command {
        Some(ImportCommand::Key(KeyCommand::Export { algorithm })) => {
            let key = client
                .import_key(match algorithm {
                    KeyAlgorithmArg::Curve25519 => vault_client::ImportKeyAlgorithm::Curve25519,
                    KeyAlgorithmArg::Rsa4096 => vault_client::ImportKeyAlgorithm::Rsa4096,
                })
                .await
                .context("reading the import key")?;
            print!("{}", key.armored_public_key);
            if !key.armored_public_key.ends_with('\n') {
                println!();
            }
            eprintln!(
                "import key version {}, {}, fingerprint {}",
                key.version,
                match algorithm {
                    KeyAlgorithmArg::Curve25519 => "curve25519",
                    KeyAlgorithmArg::Rsa4096 => "rsa4096",
                },
                key.fingerprint
            );
        }
        Some(ImportCommand::Propose {
            file,
            rows,
            sender_key,
        }) => {
            let digest = vault_client::file_sha256(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let sender = match &sender_key {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading the sender key {}", path.display()))?,
                ),
                None => None,
            };
            let job = client
                .propose_import(rows, &digest, sender)
                .await
                .context("proposing the import job")?;
            println!("{}", job.id);
            eprintln!(
                "proposed import job {} into tenant {} ({} rows)\n  file sha256: {}\n  sender \
                 key: {}\na second identity with the `import` permission checks these with the \
                 sender (out of band) and approves: vaultctl import approve {}",
                job.id,
                job.tenant,
                job.expected_rows,
                job.file_sha256,
                job.sender_key_fingerprint
                    .as_deref()
                    .unwrap_or("none (the file is not to be signed)"),
                job.id
            );
        }
        Some(ImportCommand::Approve { job }) => {
            let job = client
                .approve_import(&job)
                .await
                .context("approving the import job")?;
            println!(
                "approved import job {} ({} rows into tenant {}, proposed by {})\n  file \
                 sha256: {}\n  sender key: {}\n  state: {}; to be started by {}",
                job.id,
                job.expected_rows,
                job.tenant,
                job.proposed_by,
                job.file_sha256,
                job.sender_key_fingerprint.as_deref().unwrap_or("none"),
                job.state,
                crate::output::utc(job.claim_by_unix_ms)
            );
        }
        None => return run_file(&mut client, args.run).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn format(args: &RunArgs) -> anyhow::Result<ImportFormat> {
    let json_lines = args.format == FileFormatArg::Jsonl;
    let mut format = match args.preset {
        Some(Preset::Stripe) => ImportFormat::stripe(json_lines),
        None => ImportFormat {
            json_lines,
            id_field: "id".into(),
            number_field: "number".into(),
            exp_month_field: "exp_month".into(),
            exp_year_field: "exp_year".into(),
            name_field: String::new(),
            sender_public_key: None,
        },
    };
    if let Some(path) = &args.fields {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the fields file {}", path.display()))?;
        let file: FieldsFile = toml::from_str(&text)
            .with_context(|| format!("reading the fields file {}", path.display()))?;
        for (value, field) in [
            (file.id, &mut format.id_field),
            (file.number, &mut format.number_field),
            (file.exp_month, &mut format.exp_month_field),
            (file.exp_year, &mut format.exp_year_field),
            (file.name, &mut format.name_field),
        ] {
            if let Some(value) = value {
                *field = value;
            }
        }
    }
    for (value, field) in [
        (&args.id_field, &mut format.id_field),
        (&args.number_field, &mut format.number_field),
        (&args.exp_month_field, &mut format.exp_month_field),
        (&args.exp_year_field, &mut format.exp_year_field),
        (&args.name_field, &mut format.name_field),
    ] {
        if let Some(value) = value {
            value.clone_into(field);
        }
    }
    if let Some(path) = &args.sender_key {
        let key = std::fs::read_to_string(path)
            .with_context(|| format!("reading the sender key {}", path.display()))?;
        format.sender_public_key = Some(key);
    }
    Ok(format)
}

/// `--fields FILE`: which column or field holds what.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldsFile {
    id: Option<String>,
    number: Option<String>,
    exp_month: Option<String>,
    exp_year: Option<String>,
    name: Option<String>,
}

async fn run_file(client: &mut VaultClient, args: RunArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.file.clone() else {
        bail!(
            "name the encrypted file: vaultctl import FILE --job JOB (or see vaultctl import --help)"
        );
    };
    let Some(job) = args.job.clone() else {
        bail!("--job is required: the id `vaultctl import propose` printed, once approved");
    };
    let format = format(&args)?;
    let mapping_path = args.mapping.clone().unwrap_or_else(|| {
        let mut name = path.clone().into_os_string();
        name.push(".mapping.csv");
        PathBuf::from(name)
    });
    // Before anything is sent: the mapping must be this job's (or new).
    let (mut mapping, mut done) = Mapping::open(&mapping_path, &job)?;
    let mut progress = Progress::new(args.quiet);

    // 1. The file, still encrypted, from where the vault's copy ends.
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().context("reading the file's size")?.len();
    let mut status = client
        .import_upload(&job, 0, Vec::new(), None)
        .await
        .context("asking the vault where the upload stands")?;
    if !status.verified {
        let mut offset = status.received_bytes.min(size);
        file.seek(std::io::SeekFrom::Start(offset))
            .context("seeking in the file")?;
        loop {
            let mut piece = vec![0u8; IMPORT_PIECE_BYTES];
            let mut filled = 0;
            while filled < piece.len() {
                let n = file
                    .read(&mut piece[filled..])
                    .context("reading the file")?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            piece.truncate(filled);
            let last = offset + filled as u64 >= size;
            progress.upload(offset + filled as u64, size, last);
            status = client
                .import_upload(&job, offset, piece, last.then_some(&format))
                .await
                .context(match last {
                    true => "sending the file's last piece (the vault checks the whole file)",
                    false => "sending the file",
                })?;
            offset = status.received_bytes;
            if last {
                break;
            }
        }
    }
    if !status.verified {
        bail!("the vault did not confirm the file's check; run the same command again");
    }

    // 2. The rows, a batch per call, each batch synced to the mapping before the next.
    let started_at = done;
    let total = status.total_rows;
    let mut refused = 0u64;
    while done < total {
        let batch = client
            .import_rows(&job, done, args.batch)
            .await
            .with_context(|| format!("importing the rows after row {done}"))?;
        if batch.rows.is_empty() && !batch.done {
            bail!("the vault returned no rows after row {done}; run the same command again");
        }
        for row in &batch.rows {
            if row.row() != done + 1 {
                bail!(
                    "the vault returned row {} where row {} was expected; the mapping file \
                     was not changed past row {done}",
                    row.row(),
                    done + 1
                );
            }
            refused += u64::from(matches!(row, ImportedRow::Invalid { .. }));
            done = row.row();
        }
        mapping.append(&batch.rows)?;
        progress.rows(done - started_at, done, total);
        if batch.done {
            break;
        }
    }
    progress.finish();
    eprintln!(
        "import job {job}: {done} of {total} rows in {} ({refused} refused: see the mapping)",
        mapping_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The mapping file: a header line, then one line per row, in row order, each ending
/// with the job's id (so that a mapping is never taken for another job's cursor).
struct Mapping {
    file: std::fs::File,
    job: String,
}

const MAPPING_HEADER: &str =
    "row,source_id,token,last_four,fingerprint,error_field,error_rule,job\n";

impl Mapping {
    /// Opens (or creates) the mapping of `job`, cutting a last line a crash left
    /// incomplete; returns it and the rows it holds. A mapping of another job is
    /// refused: its rows would be taken for this job's and skipped.
    fn open(path: &Path, job: &str) -> anyhow::Result<(Self, u64)> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening the mapping file {}", path.display()))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .context("reading the mapping file")?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64)
                .context("cutting the mapping file's incomplete last line")?;
        }
        let lines = text[..complete].iter().filter(|&&b| b == b'\n').count() as u64;
        if lines == 0 {
            file.write_all(MAPPING_HEADER.as_bytes())
                .context("writing the mapping file")?;
            file.sync_data().context("syncing the mapping file")?;
            let job = job.to_owned();
            return Ok((Self { file, job }, 0));
        }
        if !text.starts_with(MAPPING_HEADER.as_bytes()) {
            bail!(
                "{} is not a mapping file of vaultctl import; name another with --mapping",
                path.display()
            );
        }
        let last = text[..complete.saturating_sub(1)]
            .rsplit(|&b| b == b'\n')
            .next()
            .unwrap_or_default();
        if lines > 1 && !last.ends_with(format!(",{job}").as_bytes()) {
            bail!(
                "{} is the mapping of another import job, not of {job}; name another file \
                 with --mapping",
                path.display()
            );
        }
        let job = job.to_owned();
        Ok((Self { file, job }, lines - 1))
    }

    fn append(&mut self, rows: &[ImportedRow]) -> anyhow::Result<()> {
        let mut out = String::with_capacity(rows.len() * 80);
        for row in rows {
            match row {
                ImportedRow::Card {
                    row,
                    source_id,
                    token,
                    last_four,
                    fingerprint,
                } => out.push_str(&format!(
                    "{row},{},{token},{last_four},{fingerprint},,,{}\n",
                    csv(source_id),
                    self.job
                )),
                ImportedRow::Invalid {
                    row,
                    source_id,
                    field,
                    rule,
                } => out.push_str(&format!(
                    "{row},{},,,,{},{},{}\n",
                    csv(source_id),
                    csv(field),
                    csv(rule),
                    self.job
                )),
            }
        }
        self.file
            .write_all(out.as_bytes())
            .context("writing the mapping file")?;
        self.file.sync_data().context("syncing the mapping file")
    }
}

fn csv(value: &str) -> String {
    // A cell a spreadsheet would take for a formula (a sender's id such as
    // "=HYPERLINK(...)") is written as text: a leading apostrophe.
    let value = match value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        true => format!("'{value}"),
        false => value.to_owned(),
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// A progress line on stderr: redrawn in place on a terminal, a line every few
/// seconds otherwise. Counts, sizes, rates and times only.
struct Progress {
    quiet: bool,
    tty: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: None,
        }
    }

    fn due(&mut self, force: bool) -> bool {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        if self.quiet || !(force || self.last.is_none_or(|t| t.elapsed() >= every)) {
            return false;
        }
        self.last = Some(Instant::now());
        true
    }

    fn show(&self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    fn upload(&mut self, sent: u64, size: u64, last: bool) {
        if !self.due(last) {
            return;
        }
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let line = format!(
            "upload {:.1}/{:.1} MiB{}",
            mib(sent),
            mib(size),
            if last { ", checking the file" } else { "" }
        );
        self.show(&line);
        self.started = Instant::now();
    }

    fn rows(&mut self, this_run: u64, done: u64, total: u64) {
        if !self.due(done >= total) {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = this_run as f64 / secs;
        let eta = match rate > 0.0 {
            true => format!("{:.0}s", total.saturating_sub(done) as f64 / rate),
            false => "-".into(),
        };
        let line = format!(
            "rows {done}/{total} ({:.0}%), {rate:.0} rows/s, ETA {eta}",
            100.0 * done as f64 / total.max(1) as f64
        );
        self.show(&line);
    }

    fn finish(&self) {
        if self.tty && !self.quiet {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::csv;

    #[test]
    fn mapping_cells_are_quoted_and_never_read_as_formulas() {
        assert_eq!(csv("cus_42"), "cus_42");
        assert_eq!(csv("a,b"), "\"a,b\"");
        assert_eq!(csv("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv("+1"), "'+1");
        assert_eq!(csv("@sum"), "'@sum");
    }
}

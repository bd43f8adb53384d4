//! `vaultctl`: the operator CLI for the vault and the keyservice.
//!
//! Card numbers are read from stdin only, never from arguments (argv is visible to
//! every user of the host). Connection settings come from flags, `VAULTCTL_*`
//! environment variables, or a config file; run from a checkout with the dev stack up,
//! it finds `.dev/vaultctl.toml` by itself.
//!
//! One module per command group under `vaultctl/`: `keys`, `policy`, `audit`,
//! `blocks`, `import` and `export`; `output` holds what they print with.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a CLI prints its results

// Under vaultctl/: a file beside this one would be built as a binary of its own.
#[path = "vaultctl/audit.rs"]
mod audit;
#[path = "vaultctl/blocks.rs"]
mod blocks;
#[path = "vaultctl/export.rs"]
mod export;
#[path = "vaultctl/import.rs"]
mod import;
#[path = "vaultctl/keys.rs"]
mod keys;
#[path = "vaultctl/output.rs"]
mod output;
#[path = "vaultctl/policy.rs"]
mod policy;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use vault_client::{
    Card, ClientConfig, ForwardRequest, KeyServiceClient, TokenFormat, TokenInfo, TokenizeOptions,
    VaultClient,
};
use zeroize::{Zeroize, Zeroizing};

#[derive(Debug, Parser)]
#[command(version, about = "Operate the card tokenization vault")]
struct Cli {
    /// Config file (TOML). Default: `.dev/vaultctl.toml` in this directory (in a debug
    /// build also at the root of the enclosing git work tree), then
    /// `~/.config/vaultctl/config.toml`. A file another user could have written is
    /// refused.
    #[arg(long, env = "VAULTCTL_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

/// Connection settings; each overrides the config file.
#[derive(Debug, Args, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Connection {
    /// Vault endpoint, e.g. https://localhost:8443
    #[arg(long, env = "VAULTCTL_VAULT_ENDPOINT", global = true)]
    vault_endpoint: Option<String>,
    /// Keyservice endpoint, e.g. https://localhost:7443
    #[arg(long, env = "VAULTCTL_KEYSERVICE_ENDPOINT", global = true)]
    keyservice_endpoint: Option<String>,
    /// CA certificate that signs the servers (PEM).
    #[arg(long, env = "VAULTCTL_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Our client certificate (PEM).
    #[arg(long, env = "VAULTCTL_CERT_FILE", global = true)]
    cert_file: Option<PathBuf>,
    /// Our private key (PEM).
    #[arg(long, env = "VAULTCTL_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    /// Deadline of each call, in seconds.
    #[arg(long, env = "VAULTCTL_TIMEOUT_SECS", global = true)]
    timeout_secs: Option<u64>,
}

/// `--format` of `vaultctl tokenize`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Opaque,
    Card,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tokenize one card read from stdin: a card number line (with --exp), or a JSON
    /// object {"number", "exp_month", "exp_year", "name", "cvc"}. Prints the token.
    Tokenize {
        /// Expiry as MM/YYYY (or MM/YY), for a card number line.
        #[arg(long)]
        exp: Option<String>,
        /// Return the tenant's existing token for the same card and expiry, if any.
        #[arg(long)]
        reuse_existing: bool,
        /// Retention: the token answers NOT_FOUND after this long and is then erased,
        /// e.g. 90d, 12h, 30m, 45s. Default: the tenant's retention, else forever.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// The token's shape: `opaque` (tok_...) or `card` (the card's length and last
        /// four, failing the Luhn check). Default: the tenant's ([tokens] in the vault
        /// config), else opaque.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Print the token and its metadata as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a token's metadata (never card data).
    Info {
        token: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a token and its record.
    Delete { token: String },
    /// Have the vault send a request to an allowlisted processor with the token's card
    /// filled into placeholders ({{card.number}}, {{card.exp_month}}, {{card.exp_year}},
    /// {{card.name}}, {{card.cvc}}). Prints the processor's status and body.
    Forward(Box<ForwardArgs>),
    /// Key lifecycle: versions, rotation, retirement, dual-control proposals and the key
    /// history (keyservice); rewrap of stored records onto the active keys (vault).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Backups of the vault's store (ciphertext only), on the vault host.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Data-subject requests: every token of one card in our tenant. The card number
    /// is read from stdin (never an argument).
    #[command(subcommand)]
    Subject(SubjectCommand),
    /// The vault's access policy: reload it, or check a policy file offline.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The vault's tamper-evident audit log: tail or follow it, export a time window
    /// as JSON lines, verify its chain.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Identities and addresses the vault blocks after repeated failures.
    #[command(subcommand)]
    Blocks(blocks::BlocksCommand),
    /// Move cards in: the import key, import jobs under dual control, and
    /// `import FILE --job JOB` to send an encrypted export and write its mapping.
    Import(Box<import::ImportArgs>),
    /// Move cards out: export jobs under dual control, to a processor's pinned
    /// OpenPGP key.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Health of the vault and the keyservice.
    Health,
}

#[derive(Debug, Args)]
struct ForwardArgs {
    /// Processor name from the vault's allowlist.
    #[arg(long)]
    processor: String,
    /// A route the processor's config declares (e.g. "authorize"): the config owns
    /// method, path, body and credentials; give its fields with --field.
    #[arg(long, conflicts_with_all = ["path", "body", "body_file"])]
    route: Option<String>,
    /// A route's field as NAME=VALUE; repeatable.
    #[arg(long = "field", value_name = "NAME=VALUE", requires = "route")]
    fields: Vec<String>,
    /// Free-form forwards only (processors with dangerous_free_form).
    #[arg(long)]
    method: Option<String>,
    /// Free-form forwards only: the path below the processor's base URL.
    #[arg(long, required_unless_present = "route")]
    path: Option<String>,
    /// A header as "Name: value"; repeatable. Put credentials in --header-file instead:
    /// arguments are visible to every user of the host.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// A file of "Name: value" lines (e.g. the processor's Authorization header).
    #[arg(long)]
    header_file: Option<PathBuf>,
    /// Body template.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Read the body template from a file.
    #[arg(long)]
    body_file: Option<PathBuf>,
    #[arg(long)]
    token: String,
    /// A retry with the same key returns the stored outcome instead of charging again.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Why the card is sent ("recurring charge 2026-12"), kept in the audit log.
    #[arg(long)]
    reason: Option<String>,
    /// Print status, headers and body as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SubjectCommand {
    /// List every token of the card in the caller's tenant (permission `subject`;
    /// rate-limited).
    Find,
    /// Erase every token of the card in the caller's tenant (permission `subject`);
    /// the data is physically
    /// gone once the vault's purge job has compacted its store.
    Erase,
}

/// A duration such as `90d`, `12h`, `30m` or `45s`.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| "expected a number and a unit, e.g. 90d, 12h, 30m or 45s".to_owned())?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h or d")),
    };
    match number.checked_mul(seconds) {
        Some(0) | None => Err("must be at least one second".into()),
        Some(secs) => Ok(Duration::from_secs(secs)),
    }
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Take a consistent online backup named NAME into the vault's backup_dir.
    Create { name: String },
    /// Authenticate every record of backup NAME; exits 1 if any fails.
    Verify { name: String },
}

/// Builds the connection settings of one service on demand: commands that talk to
/// one service do not need the other configured.
type ConfigFn<'a> = &'a dyn Fn() -> anyhow::Result<ClientConfig>;

impl Connection {
    /// Flags and environment first, then the config file.
    fn merge(self, file: Connection) -> Connection {
        Connection {
            vault_endpoint: self.vault_endpoint.or(file.vault_endpoint),
            keyservice_endpoint: self.keyservice_endpoint.or(file.keyservice_endpoint),
            ca_file: self.ca_file.or(file.ca_file),
            cert_file: self.cert_file.or(file.cert_file),
            key_file: self.key_file.or(file.key_file),
            timeout_secs: self.timeout_secs.or(file.timeout_secs),
        }
    }

    fn client_config(
        &self,
        endpoint: Option<&String>,
        which: &str,
    ) -> anyhow::Result<ClientConfig> {
        let missing = |what: &str| {
            anyhow::anyhow!(
                "no {what} configured: pass --{what}, set VAULTCTL_{}, or start the dev stack (`make run`) \
                 so that .dev/vaultctl.toml exists",
                what.replace('-', "_").to_uppercase()
            )
        };
        let endpoint = endpoint.ok_or_else(|| missing(&format!("{which}-endpoint")))?;
        let mut config = ClientConfig::new(
            endpoint.clone(),
            self.ca_file.clone().ok_or_else(|| missing("ca-file"))?,
            self.cert_file.clone().ok_or_else(|| missing("cert-file"))?,
            self.key_file.clone().ok_or_else(|| missing("key-file"))?,
        );
        if let Some(secs) = self.timeout_secs {
            config.timeout = Duration::from_secs(secs);
        }
        Ok(config)
    }
}

/// What `vaultctl health` reports for one service.
enum Health {
    Serving,
    /// Serving, but degraded: why.
    Degraded(&'static str),
    NotServing,
}

/// The config vaultctl reads when none is named. Never from just any parent directory:
/// a `.dev/vaultctl.toml` planted in `/tmp/.dev/` would receive the card numbers an
/// operator types in `/tmp/anything`, and could point `audit verify` at a fake vault.
fn find_default_config() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    let mut places = vec![cwd.clone()];
    // A development build, run from inside the checkout that `make run` serves.
    if cfg!(debug_assertions)
        && let Some(root) = cwd.ancestors().find(|dir| dir.join(".git").exists())
    {
        places.push(root.to_owned());
    }
    for dir in places {
        let candidate = dir.join(".dev/vaultctl.toml");
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    let home = std::env::var_os("HOME")?;
    let candidate = Path::new(&home).join(".config/vaultctl/config.toml");
    candidate.is_file().then_some(candidate)
}

/// Refuses `path` unless it is this user's (or root's) and neither group nor others
/// may write it: a config names where card numbers go and which CA to trust.
fn check_owned(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).with_context(|| format!("read {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if metadata.uid() != me && metadata.uid() != 0 {
        anyhow::bail!(
            "{} belongs to another user (uid {}): vaultctl reads only your own config",
            path.display(),
            metadata.uid()
        );
    }
    if metadata.mode() & 0o022 != 0 {
        anyhow::bail!(
            "{} may be written by group or others (mode {:o}): chmod go-w it",
            path.display(),
            metadata.mode() & 0o777
        );
    }
    Ok(())
}

fn load_config_file(path: &Path) -> anyhow::Result<Connection> {
    check_owned(path)?;
    // The dev stack's directory too: whoever may write it may replace the file.
    if let Some(dev) = path
        .parent()
        .filter(|dir| dir.file_name().is_some_and(|name| name == ".dev"))
    {
        check_owned(dev)?;
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    let mut file: Connection =
        toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut file.ca_file, &mut file.cert_file, &mut file.key_file]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(file)
}

/// The card on stdin, as a number line (plus `--exp`) or a JSON object.
fn read_card(exp: Option<&str>) -> anyhow::Result<Card> {
    let mut input = Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut input)
        .context("read the card from stdin")?;
    let text = input.trim();
    if text.starts_with('{') {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct JsonCard {
            number: String,
            exp_month: u32,
            exp_year: u32,
            #[serde(default)]
            name: Option<String>,
            #[serde(default)]
            cvc: Option<String>,
        }
        // serde_json's error messages quote no input values for these types, but say
        // only where the problem is, to be sure.
        let mut parsed: JsonCard = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "stdin is not a card JSON object {{\"number\", \"exp_month\", \"exp_year\", \"name\"}} \
                 (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let mut card = Card::new(&parsed.number, parsed.exp_month, parsed.exp_year);
        if let Some(name) = &parsed.name {
            card = card.with_cardholder_name(name);
        }
        if let Some(cvc) = &parsed.cvc {
            card = card.with_cvc(cvc);
        }
        parsed.number.zeroize();
        if let Some(cvc) = &mut parsed.cvc {
            cvc.zeroize();
        }
        if let Some(name) = &mut parsed.name {
            name.zeroize();
        }
        return Ok(card);
    }
    if text.is_empty() {
        bail!("no card on stdin: pipe a card number line (with --exp MM/YYYY) or a JSON object");
    }
    if text.lines().count() > 1 {
        bail!("stdin holds more than one line; tokenize one card per call");
    }
    let exp = exp.context("a card number line needs --exp MM/YYYY (or pipe a JSON object with exp_month and exp_year)")?;
    let (month, year) = exp
        .split_once('/')
        .context("--exp must look like MM/YYYY")?;
    let month: u32 = month
        .trim()
        .parse()
        .context("--exp month must be a number")?;
    let mut year: u32 = year.trim().parse().context("--exp year must be a number")?;
    if year < 100 {
        year += 2000;
    }
    Ok(Card::new(text, month, year))
}

fn print_info(info: &TokenInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
    } else {
        println!("token:        {}", info.token);
        println!("brand:        {}", info.brand);
        println!("last four:    {}", info.last_four);
        println!("expiry:       {:02}/{}", info.exp_month, info.exp_year);
        // Empty unless the identity has the `fingerprint` permission.
        if !info.fingerprint.is_empty() {
            println!("fingerprint:  {}", info.fingerprint);
        }
        println!("created (ms): {}", info.created_at_unix_ms);
        println!("key version:  {}", info.key_version);
    }
    Ok(())
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(code) => code,
        Err(e) => {
            // One line with the cause chain; the errors carry field names and rules,
            // never card data.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Offline: needs no connection settings, so a broken config file does not stop it.
    if let Command::Policy(policy::PolicyCommand::Check { file }) = &cli.command {
        println!("{}", policy::check_file(file)?);
        return Ok(ExitCode::SUCCESS);
    }
    let file = match cli.config.or_else(find_default_config) {
        Some(path) => load_config_file(&path)?,
        None => Connection::default(),
    };
    let connection = cli.connection.merge(file);
    let vault = || connection.client_config(connection.vault_endpoint.as_ref(), "vault");
    let keyservice =
        || connection.client_config(connection.keyservice_endpoint.as_ref(), "keyservice");

    match cli.command {
        Command::Tokenize {
            exp,
            reuse_existing,
            ttl,
            format,
            json,
        } => {
            let card = read_card(exp.as_deref())?;
            let mut client = VaultClient::connect(&vault()?).await?;
            let options = TokenizeOptions {
                reuse_existing,
                ttl,
                format: match format {
                    None => TokenFormat::TenantDefault,
                    Some(FormatArg::Opaque) => TokenFormat::Opaque,
                    Some(FormatArg::Card) => TokenFormat::Card,
                },
            };
            let info = client
                .tokenize_with(card, options)
                .await
                .context("tokenize")?;
            if json {
                print_info(&info, true)?;
            } else {
                println!("{}", info.token);
            }
        }
        Command::Info { token, json } => {
            let mut client = VaultClient::connect(&vault()?).await?;
            let info = client.token_info(&token).await.context("get token info")?;
            print_info(&info, json)?;
        }
        Command::Delete { token } => {
            let mut client = VaultClient::connect(&vault()?).await?;
            client.delete(&token).await.context("delete token")?;
            println!("deleted {token}");
        }
        Command::Forward(args) => {
            let body = match (&args.body, &args.body_file) {
                (Some(body), _) => body.clone(),
                (None, Some(file)) => std::fs::read_to_string(file)
                    .with_context(|| format!("read body file {}", file.display()))?,
                (None, None) => String::new(),
            };
            let file_headers = match &args.header_file {
                Some(file) => std::fs::read_to_string(file)
                    .with_context(|| format!("read header file {}", file.display()))?,
                None => String::new(),
            };
            let headers = args
                .headers
                .iter()
                .map(String::as_str)
                .chain(file_headers.lines().filter(|l| !l.trim().is_empty()))
                .map(|h| {
                    h.split_once(':')
                        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                        .context("each --header must look like \"Name: value\"")
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let fields = args
                .fields
                .iter()
                .map(|f| {
                    f.split_once('=')
                        .map(|(n, v)| (n.trim().to_owned(), v.to_owned()))
                        .context("each --field must look like NAME=VALUE")
                })
                .collect::<anyhow::Result<_>>()?;
            let method = match (&args.route, args.method) {
                (None, method) => method.unwrap_or_else(|| "POST".into()),
                (Some(_), None) => String::new(),
                (Some(_), Some(_)) => {
                    anyhow::bail!("--method goes with free-form forwards, not --route")
                }
            };
            let mut client = VaultClient::connect(&vault()?).await?;
            let answer = client
                .forward(ForwardRequest {
                    processor: args.processor,
                    method,
                    path: args.path.unwrap_or_default(),
                    headers,
                    body,
                    token: args.token,
                    idempotency_key: args.idempotency_key,
                    reason: args.reason,
                    route: args.route,
                    fields,
                })
                .await
                .context("forward")?;
            if args.json {
                let value = serde_json::json!({
                    "status": answer.status,
                    "headers": answer.headers,
                    "body": String::from_utf8_lossy(&answer.body),
                    "replayed": answer.replayed,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "HTTP {}{}",
                    answer.status,
                    if answer.replayed { " (replayed)" } else { "" }
                );
                println!("{}", String::from_utf8_lossy(&answer.body));
            }
        }
        Command::Subject(command) => {
            let mut number = Zeroizing::new(String::new());
            std::io::stdin()
                .read_to_string(&mut number)
                .context("read the card number from stdin")?;
            let number = Zeroizing::new(number.trim().to_owned());
            let mut client = VaultClient::connect(&vault()?).await?;
            let (tokens, verb) = match command {
                SubjectCommand::Find => (
                    client.find_subject(&number).await.context("find subject")?,
                    "found",
                ),
                SubjectCommand::Erase => (
                    client
                        .erase_subject(&number)
                        .await
                        .context("erase subject")?,
                    "erased",
                ),
            };
            for token in &tokens {
                println!("{token}");
            }
            eprintln!("{verb} {} tokens of this card", tokens.len());
        }
        Command::Backup(BackupCommand::Create { name }) => {
            let mut client = VaultClient::connect(&vault()?).await?;
            let (path, size) = client.create_backup(&name).await.context("create backup")?;
            println!("backup {name} written to {path} on the vault host ({size} bytes)");
        }
        Command::Backup(BackupCommand::Verify { name }) => {
            let mut client = VaultClient::connect(&vault()?).await?;
            let report = client.verify_backup(&name).await.context("verify backup")?;
            println!(
                "backup {name}: {} records, {} verified, {} failed; {} erased since it was \
                 taken (a restore erases them again before serving)",
                report.records, report.verified, report.failed, report.erased
            );
            if report.failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Keys(command) => return keys::run(command, &vault, &keyservice).await,
        Command::Policy(command) => return policy::run(command, &vault).await,
        Command::Audit(command) => return audit::run(command, &vault).await,
        Command::Blocks(command) => return blocks::run(command, &vault).await,
        Command::Import(args) => return import::run(*args, &vault).await,
        Command::Export(command) => return export::run(command, &vault).await,
        Command::Health => {
            let mut healthy = true;
            for (name, result) in [
                (
                    "vault",
                    async {
                        let mut client = VaultClient::connect(&vault()?).await?;
                        let serving = client.health().await?;
                        let linked = !serving || client.keyservice_link().await?;
                        let room = !serving || client.storage_room().await?;
                        Ok::<_, anyhow::Error>(match (serving, linked, room) {
                            (false, _, _) => Health::NotServing,
                            (true, false, _) => Health::Degraded(
                                "its keyservice link is down; it serves with the keys it \
                                 holds until its leased encryption budget runs out",
                            ),
                            (true, true, false) => Health::Degraded(
                                "its data or audit log disk is nearly full; it serves, and \
                                 refuses writes once the disk is full (its admin port's \
                                 /healthz says which disk)",
                            ),
                            (true, true, true) => Health::Serving,
                        })
                    }
                    .await,
                ),
                (
                    "keyservice",
                    async {
                        let serving = KeyServiceClient::connect(&keyservice()?)
                            .await?
                            .health()
                            .await?;
                        Ok(if serving {
                            Health::Serving
                        } else {
                            Health::NotServing
                        })
                    }
                    .await,
                ),
            ] {
                match result {
                    Ok(Health::Serving) => println!("{name}: serving"),
                    Ok(Health::Degraded(why)) => {
                        healthy = false;
                        println!("{name}: degraded ({why})");
                    }
                    Ok(Health::NotServing) => {
                        healthy = false;
                        println!("{name}: not serving");
                    }
                    Err(e) => {
                        healthy = false;
                        println!("{name}: unreachable ({e:#})");
                    }
                }
            }
            if !healthy {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttls_take_a_unit_and_refuse_nonsense() {
        use std::time::Duration;
        assert_eq!(
            super::parse_ttl("90d"),
            Ok(Duration::from_secs(90 * 86_400))
        );
        assert_eq!(super::parse_ttl("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(super::parse_ttl("45"), Ok(Duration::from_secs(45)));
        assert!(super::parse_ttl("0s").is_err());
        assert!(super::parse_ttl("3w").unwrap_err().contains("unit"));
        assert!(super::parse_ttl("d").is_err());
        assert!(super::parse_ttl("99999999999999999999d").is_err());
    }

    use super::*;
    use clap::CommandFactory;
    use keys::{KeysCommand, ProposeCommand, Purpose};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vaultctl").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn keys_commands_parse() {
        let cli = parse(&["keys", "retire", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys(KeysCommand::Retire {
                version: 2,
                purpose: Purpose::CardData,
                force: false,
            })
        ));
        let cli = parse(&["keys", "propose", "unretire", "3", "--purpose", "cvc"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys(KeysCommand::Propose(ProposeCommand::Unretire {
                version: 3,
                purpose: Purpose::Cvc
            }))
        ));
        let cli = parse(&["keys", "history"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys(KeysCommand::History {
                limit: 50,
                json: false,
                verify: false,
            })
        ));
        assert!(parse(&["keys", "propose", "root-key", "/etc/ks/root-2.key"]).is_ok());
    }

    #[test]
    fn policy_audit_and_blocks_commands_parse() {
        use audit::AuditCommand;
        use blocks::{BlockKind, BlocksCommand};
        use policy::PolicyCommand;

        let cli = parse(&["policy", "reload"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Policy(PolicyCommand::Reload)
        ));
        let cli = parse(&["policy", "check", "deploy/policy.toml"]).unwrap();
        assert!(
            matches!(cli.command, Command::Policy(PolicyCommand::Check { ref file }) if file == Path::new("deploy/policy.toml"))
        );
        let cli = parse(&["audit", "tail"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Audit(AuditCommand::Tail {
                lines: 20,
                follow: false,
                json: false
            })
        ));
        let cli = parse(&["audit", "tail", "-n", "5", "--follow", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Audit(AuditCommand::Tail {
                lines: 5,
                follow: true,
                json: true
            })
        ));
        let cli = parse(&[
            "audit",
            "export",
            "--since",
            "2023-11-14T22:13:20Z",
            "--until",
            "1700000000999",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Audit(AuditCommand::Export {
                since: Some(1_700_000_000_000),
                until: Some(1_700_000_000_999)
            })
        ));
        let cli = parse(&["audit", "export"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Audit(AuditCommand::Export {
                since: None,
                until: None
            })
        ));
        assert!(matches!(
            parse(&["audit", "verify"]).unwrap().command,
            Command::Audit(AuditCommand::Verify)
        ));
        let cli = parse(&["blocks", "lift", "address", "10.0.0.7"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Blocks(BlocksCommand::Lift { kind: BlockKind::Address, ref subject }) if subject == "10.0.0.7"
        ));
        assert!(matches!(
            parse(&["blocks", "list", "--json"]).unwrap().command,
            Command::Blocks(BlocksCommand::List { json: true })
        ));
    }

    #[test]
    fn policy_audit_and_blocks_commands_refuse_bad_arguments() {
        assert!(parse(&["policy", "check"]).is_err());
        let err = parse(&["audit", "export", "--since", "yesterday"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RFC 3339"), "{err}");
        assert!(parse(&["audit", "export", "--until", "1700000000"]).is_err());
        assert!(parse(&["audit", "tail", "-n", "-1"]).is_err());
        let err = parse(&["blocks", "lift", "tenant", "acme"])
            .unwrap_err()
            .to_string();
        assert!(
            vault_client::BLOCK_KINDS.iter().all(|k| err.contains(k)),
            "{err}"
        );
        assert!(parse(&["blocks", "lift", "identity"]).is_err());
    }

    #[test]
    fn keys_commands_refuse_bad_arguments() {
        // Rotation names its purpose explicitly.
        assert!(parse(&["keys", "rotate"]).is_err());
        let err = parse(&["keys", "rotate", "--purpose", "pan"])
            .unwrap_err()
            .to_string();
        assert!(
            vault_client::KEY_PURPOSES.iter().all(|p| err.contains(p)),
            "{err}"
        );
        assert!(parse(&["keys", "rewrap", "--status", "--no-wait"]).is_err());
        assert!(parse(&["keys", "retire", "two"]).is_err());
    }
}

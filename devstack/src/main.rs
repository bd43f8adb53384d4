//! `devstack`: one command for a development stack on localhost. Creates a development
//! CA, certificates, root key, keyring and configs in a directory (once), then runs
//! the sandbox processor, keyservice and vault-server in the foreground with prefixed
//! logs. Ctrl-C stops them all.
//!
//! The vault keeps its records in RocksDB under the directory, or, with
//! `--postgres-conninfo`, `--postgres-password-file` and `--postgres-ca-file`, in a
//! PostgreSQL database (`make bench` uses a throwaway one from the `pgcluster` binary).

#![allow(clippy::print_stdout)] // the instructions for the newcomer

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
#[command(about = "Run keyservice and vault-server on localhost with a development CA")]
struct Cli {
    /// Directory for certificates, keys, configs and data (created once, then reused).
    #[arg(long, default_value = ".dev")]
    dir: PathBuf,
    /// Only create the directory's contents; do not start the services.
    #[arg(long)]
    init_only: bool,
    /// Put the vault on PostgreSQL: libpq connection string without a password, e.g.
    /// `host=127.0.0.1 port=5432 user=vault dbname=tokenvault` (written into the
    /// generated vault-server.toml, so only for a new --dir, or the same database again).
    #[arg(
        long,
        value_name = "CONNINFO",
        requires_all = ["postgres_password_file", "postgres_ca_file"]
    )]
    postgres_conninfo: Option<String>,
    /// With --postgres-conninfo: the file holding the role's password.
    #[arg(long, value_name = "FILE", requires = "postgres_conninfo")]
    postgres_password_file: Option<PathBuf>,
    /// With --postgres-conninfo: PEM CA of the database server's certificate.
    #[arg(long, value_name = "FILE", requires = "postgres_conninfo")]
    postgres_ca_file: Option<PathBuf>,
    /// Pick free loopback ports instead of the fixed ones (7443, 8443, 9443, admin
    /// 9464 and 9465), to run beside another stack; only for a new --dir (the ports
    /// are written into its configs).
    #[arg(long)]
    free_ports: bool,
}

impl Cli {
    /// The vault's storage; the files as absolute paths (the vault resolves relative
    /// ones against its config's directory, not ours).
    fn storage(&self) -> anyhow::Result<devstack::Storage> {
        let (Some(conninfo), Some(password_file), Some(ca_file)) = (
            &self.postgres_conninfo,
            &self.postgres_password_file,
            &self.postgres_ca_file,
        ) else {
            return Ok(devstack::Storage::Rocksdb);
        };
        let absolute = |path: &Path| {
            std::path::absolute(path).with_context(|| format!("resolve {}", path.display()))
        };
        Ok(devstack::Storage::Postgres(devstack::PostgresStorage {
            conninfo: conninfo.clone(),
            password_file: absolute(password_file)?,
            ca_file: absolute(ca_file)?,
        }))
    }
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate devstack binary")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (`cargo build --bins`)",
            path.display()
        );
    }
    Ok(path)
}

async fn status_ok(mut command: Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .await
        .with_context(|| format!("run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Starts a service, copying its output to ours with a prefix. Resolves the returned
/// receiver when the service prints its "listening on" line.
fn spawn_service(
    binary: &Path,
    args: &[std::ffi::OsString],
    prefix: &'static str,
) -> anyhow::Result<(Child, tokio::sync::oneshot::Receiver<String>)> {
    let mut child = Command::new(binary)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.split(" listening on ").nth(1)
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(addr.to_owned());
                }
                println!("{prefix} {line}");
            }
        });
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("{prefix} {line}");
            }
        });
    }
    Ok((child, ready_rx))
}

fn terminate(child: &Child) {
    // SIGTERM lets the service finish in-flight calls and close its database.
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = &cli.dir;
    let ports = if cli.free_ports {
        if dir.exists() {
            bail!(
                "--free-ports needs a new --dir: {} exists, and its configs name other ports",
                dir.display()
            );
        }
        devstack::Ports::free().context("find free loopback ports")?
    } else {
        devstack::Ports::default()
    };
    let storage = cli.storage()?;
    if devstack::init_dir(dir, &ports, &storage).context("create development CA and configs")? {
        println!(
            "devstack: created development CA, certificates and configs in {}",
            dir.display()
        );
    }
    let keyservice = sibling_binary("keyservice")?;
    let vault = sibling_binary("vault-server")?;
    if !dir.join("root.key").exists() {
        let mut command = Command::new(&keyservice);
        command.arg("gen-root-key").arg(dir.join("root.key"));
        status_ok(command, "keyservice gen-root-key").await?;
    }
    if !dir.join("keyring.sealed").exists() {
        let mut command = Command::new(&keyservice);
        command
            .arg("--config")
            .arg(dir.join("keyservice.toml"))
            .arg("init");
        status_ok(command, "keyservice init").await?;
    }
    if cli.init_only {
        return Ok(());
    }

    let config = |name: &str| {
        [
            OsStr::new("--config").to_owned(),
            dir.join(name).into_os_string(),
        ]
    };
    let keyservice_args = config("keyservice.toml");
    let vault_args = config("vault-server.toml");
    let sandbox_args = [
        OsStr::new("--listen-addr").to_owned(),
        ports.sandbox.to_string().into(),
        OsStr::new("--cert-file").to_owned(),
        dir.join("sandbox.pem").into_os_string(),
        OsStr::new("--key-file").to_owned(),
        dir.join("sandbox.key").into_os_string(),
    ];
    let (mut sandbox_child, sandbox_ready) = spawn_service(
        &sibling_binary("sandbox-processor")?,
        &sandbox_args,
        "[sandbox]     ",
    )?;
    let (mut keyservice_child, keyservice_ready) =
        spawn_service(&keyservice, &keyservice_args, "[keyservice]  ")?;
    let (mut vault_child, vault_ready) = spawn_service(&vault, &vault_args, "[vault-server]")?;

    let vaultctl = sibling_binary("vaultctl").map(|p| p.display().to_string());
    let vaultctl = vaultctl.as_deref().unwrap_or("vaultctl");
    tokio::spawn({
        let vaultctl = vaultctl.to_owned();
        // What the config says, which is what the vault does (the flags choose the
        // storage only when the directory is made).
        let on_postgres = std::fs::read_to_string(dir.join("vault-server.toml"))
            .is_ok_and(|config| config.contains("\ntype = \"postgres\"\n"));
        let data = if on_postgres {
            "the PostgreSQL database".to_owned()
        } else {
            dir.join("vault-data").display().to_string()
        };
        let auditor = dir.join("vaultctl-auditor.toml");
        let auditor = if auditor.exists() {
            format!("{vaultctl} --config {} audit verify", auditor.display())
        } else {
            // Made before the auditor identity existed; the CA's key is long gone.
            format!(
                "(no auditor identity in {}: delete it for a fresh stack that has one)",
                dir.display()
            )
        };
        let (vault_admin, ks_admin) = (ports.vault_admin, ports.keyservice_admin);
        async move {
            let (Ok(ks), Ok(vault), Ok(sandbox)) = (
                keyservice_ready.await,
                vault_ready.await,
                sandbox_ready.await,
            ) else {
                return;
            };
            println!(
                "\n  Dev stack is up: keyservice on {ks}, vault-server on {vault}, sandbox processor on {sandbox}.\n  \
                 Metrics and health: http://{vault_admin}/metrics and http://{ks_admin}/metrics (/healthz).\n  \
                 In another terminal, from this checkout:\n\n    \
                 TOKEN=$(echo '{{\"number\":\"4242424242424242\",\"exp_month\":12,\"exp_year\":2030,\"cvc\":\"123\"}}' | {vaultctl} tokenize)\n    \
                 {vaultctl} info $TOKEN\n    \
                 {vaultctl} forward --processor sandbox --path /v1/charges --token $TOKEN \\\n        \
                 --header 'content-type: application/json' \\\n        \
                 --body '{{\"amount\":1000,\"number\":\"{{{{card.number}}}}\",\"exp_month\":\"{{{{card.exp_month}}}}\",\"exp_year\":\"{{{{card.exp_year}}}}\",\"cvc\":\"{{{{card.cvc}}}}\"}}'\n    \
                 {vaultctl} keys list\n    {vaultctl} health\n    {auditor}\n\n  \
                 Ctrl-C stops everything; the tokens in {data} survive.\n"
            );
        }
    });

    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted".to_owned(),
        status = keyservice_child.wait() => format!("keyservice exited ({})", status.map(|s| s.to_string()).unwrap_or_default()),
        status = vault_child.wait() => format!("vault-server exited ({})", status.map(|s| s.to_string()).unwrap_or_default()),
        status = sandbox_child.wait() => format!("sandbox-processor exited ({})", status.map(|s| s.to_string()).unwrap_or_default()),
    };
    println!("devstack: {outcome}; stopping");
    for child in [&mut vault_child, &mut keyservice_child, &mut sandbox_child] {
        terminate(child);
        let _ = child.wait().await;
    }
    // Only Ctrl-C is a clean stop: a service that exited by itself (a port in use, a
    // bad config) makes `make run` fail, not end as if all went well.
    if outcome != "interrupted" {
        bail!("{outcome}");
    }
    Ok(())
}

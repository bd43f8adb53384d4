//! `devstack`: one command for a development stack on localhost. Creates a development
//! CA, certificates, root key, keyring and configs in a directory (once), then runs
//! the sandbox processor, keyservice and vault-server in the foreground with prefixed
//! logs. Ctrl-C stops them all.

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
    let ports = devstack::Ports::default();
    if devstack::init_dir(dir, &ports).context("create development CA and configs")? {
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
        let data = dir.join("vault-data").display().to_string();
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
                 {vaultctl} keys list\n    {vaultctl} health\n\n  \
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
    Ok(())
}

//! `checkout-demo`: a demo merchant backend for sealed intake. See the library's header
//! and clients/checkout-demo/README.md; `make demo-checkout` runs it beside the dev
//! stack.

#![allow(clippy::print_stdout)] // the address and the request log

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(about = "Demo checkout page and merchant backend for sealed intake")]
struct Cli {
    /// Where the page and its API listen (port 0 for any free port).
    #[arg(
        long,
        env = "CHECKOUT_DEMO_LISTEN_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    listen_addr: SocketAddr,
    /// The vault, https only.
    #[arg(
        long,
        env = "CHECKOUT_DEMO_VAULT",
        default_value = "https://localhost:8443"
    )]
    vault_endpoint: String,
    /// The CA of the vault's certificate.
    #[arg(long, default_value = ".dev/ca.pem")]
    ca_file: PathBuf,
    /// Our certificate: an identity with the `tokenize` permission.
    #[arg(long, default_value = ".dev/checkout.pem")]
    cert_file: PathBuf,
    /// Its private key (a file; never on the command line).
    #[arg(long, default_value = ".dev/checkout.key")]
    key_file: PathBuf,
    /// clients/web: sealer.js and its node_modules (`npm ci` there).
    #[arg(long, default_value = "clients/web")]
    web_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !cli.web_dir.join("node_modules/@hpke/core").is_dir() {
        anyhow::bail!(
            "{} has no node_modules/@hpke/core: run `npm ci` there (`make deps` does)",
            cli.web_dir.display()
        );
    }
    if !cli.vault_endpoint.starts_with("https://") {
        anyhow::bail!("--vault-endpoint must start with https://");
    }
    let vault = checkout_demo::Vault::new(vault_client::ClientConfig::new(
        cli.vault_endpoint.clone(),
        cli.ca_file,
        cli.cert_file,
        cli.key_file,
    ));
    let listener = TcpListener::bind(cli.listen_addr)
        .await
        .with_context(|| format!("bind {}", cli.listen_addr))?;
    let addr = listener.local_addr().context("read the bound address")?;
    // The harness and devstack read this line for the address: keep it last on it.
    println!("checkout-demo listening on {addr}");
    println!(
        "checkout-demo: open http://{addr}/ (vault {}); every request is logged below, bodies included",
        cli.vault_endpoint
    );
    let app = Arc::new(checkout_demo::App::new(vault, cli.web_dir));
    checkout_demo::serve(listener, app, shutdown_signal()).await;
    println!("checkout-demo: stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

//! `sandbox-processor`: the sandbox card processor on its own (the dev stack starts it).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use runtime::shutdown::Shutdown;
use runtime::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(about = "Sandbox card processor over HTTPS (development and tests only)")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen_addr: SocketAddr,
    #[arg(long)]
    cert_file: PathBuf,
    #[arg(long)]
    key_file: PathBuf,
    #[arg(long, env = "SANDBOX_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::telemetry::init(LogFormat::Plain, &cli.log);
    let bound = sandbox_processor::bind(cli.listen_addr, &cli.cert_file, &cli.key_file)
        .await
        .context("start sandbox processor")?;
    #[allow(clippy::print_stdout)] // the one machine-readable start-up line
    {
        println!("sandbox-processor listening on {}", bound.local_addr());
    }
    bound.serve(Shutdown::on_signals()).await;
    Ok(())
}

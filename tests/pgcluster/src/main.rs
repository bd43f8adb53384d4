//! `pgcluster`: one throwaway PostgreSQL primary ([`pgcluster::Cluster::start`]) for
//! `make bench` (scripts/bench.sh runs the vault on it) and for manual trials.
//!
//! Prints one line of JSON on stdout once the cluster accepts connections: `conninfo`
//! (the app role `vault` over TLS on 127.0.0.1, no password in it), `password_file`,
//! `ca_file`, `port`, `data_dir`, `log_file`, `server_version`, and `settings` (fsync,
//! synchronous_commit, full_page_writes, shared_buffers as the server reports them).
//! Then it keeps the cluster until its stdin closes or it gets SIGINT, SIGTERM or
//! SIGHUP, and stops it and removes its directory. If it is killed outright, the
//! cluster's watchdog does that.
//!
//! ```sh
//! pgcluster > pg.json          # Ctrl-D or Ctrl-C stops it
//! devstack --dir /tmp/pgdev --postgres-conninfo "$(jq -r .conninfo pg.json)" \
//!     --postgres-password-file "$(jq -r .password_file pg.json)" \
//!     --postgres-ca-file "$(jq -r .ca_file pg.json)"
//! ```

// A command-line tool: its JSON line is its output.
#![allow(clippy::print_stdout)]

use std::sync::mpsc;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Start a throwaway PostgreSQL primary (TLS, fsync on) on a free loopback port, \
             print its connection details as one JSON line, and keep it until stdin closes \
             or SIGINT/SIGTERM/SIGHUP; then stop it and remove its directory",
    long_about = None
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    let (stop_tx, stop_rx) = mpsc::channel::<&'static str>();
    // Before the cluster exists: a signal during the start must not kill us with the
    // cluster half made (the watchdog would clean up, but later and silently).
    watch_signals(stop_tx.clone())?;

    let cluster = pgcluster::Cluster::start().context("start a PostgreSQL cluster")?;
    if let Ok(why) = stop_rx.try_recv() {
        eprintln!("pgcluster: {why} while starting; stopping the cluster");
        return Ok(());
    }
    let show = |name: &str| {
        cluster
            .psql("postgres", &format!("SHOW {name}"))
            .with_context(|| format!("read the server's {name}"))
    };
    let line = serde_json::json!({
        "conninfo": cluster.conninfo(),
        "password_file": cluster.password_file().display().to_string(),
        "ca_file": cluster.ca_file().display().to_string(),
        "port": cluster.port(),
        "data_dir": cluster.data_dir().display().to_string(),
        "log_file": cluster.log_file().display().to_string(),
        "server_version": show("server_version")?,
        "settings": {
            "fsync": show("fsync")?,
            "synchronous_commit": show("synchronous_commit")?,
            "full_page_writes": show("full_page_writes")?,
            "shared_buffers": show("shared_buffers")?,
        },
    });
    // One line, flushed (stdout is line-buffered): readers wait for the newline.
    println!("{line}");

    // Reads stdin to its end (or an error: a closed terminal), whatever it holds.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = stop_tx.send("stdin closed");
    });

    // Both senders live in threads that only end by sending.
    let why = stop_rx.recv().unwrap_or("stop channel closed");
    eprintln!(
        "pgcluster: {why}; stopping the cluster on port {} and removing its directory",
        cluster.port()
    );
    drop(cluster);
    Ok(())
}

/// Sends the name of the first SIGINT, SIGTERM or SIGHUP to `stop`. The handlers are in
/// place when this returns; the wait runs on its own thread, on a small runtime that is
/// never shut down (the process ends without it).
fn watch_signals(stop: mpsc::Sender<&'static str>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the signal watcher's runtime")?;
    let (mut interrupt, mut terminate, mut hangup) = {
        let _context = runtime.enter();
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("install a {name} handler"))
        };
        (
            install(SignalKind::interrupt(), "SIGINT")?,
            install(SignalKind::terminate(), "SIGTERM")?,
            install(SignalKind::hangup(), "SIGHUP")?,
        )
    };
    std::thread::spawn(move || {
        let why = runtime.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
                _ = hangup.recv() => "SIGHUP",
            }
        });
        let _ = stop.send(why);
    });
    Ok(())
}

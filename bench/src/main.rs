//! `vault-bench`: drives a running vault over real mutual TLS with N connections × M
//! calls in flight, for a duration, and reports throughput, latency percentiles (HDR
//! histogram) and errors by gRPC code, as text and optionally JSON.
//!
//! ```sh
//! vault-bench --config .dev/vaultctl.toml --scenario tokenize --connections 4 \
//!     --in-flight 16 --duration 10s --json report.json
//! ```
//!
//! Card numbers are synthetic (Luhn-valid, generated here); none is ever printed.

// A command-line tool: what it prints is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use vault_client::{Card, ClientConfig, ForwardRequest, VaultClient};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// One card per call.
    Tokenize,
    /// `--batch-size` cards per call.
    TokenizeBatch,
    /// GetTokenInfo on tokens made during the warm-up.
    Info,
    /// Forward to the `--processor` (the dev stack's sandbox by default).
    Forward,
    /// 50% info, 40% tokenize, 10% forward.
    Mix,
}

#[derive(Debug, Parser)]
#[command(version, about = "Load generator for a running vault")]
struct Cli {
    /// vaultctl-style config file (vault_endpoint, ca_file, cert_file, key_file).
    #[arg(long, default_value = ".dev/vaultctl.toml")]
    config: PathBuf,
    #[arg(long, value_enum, default_value = "tokenize")]
    scenario: Scenario,
    /// TLS connections to the vault.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Calls in flight on each connection.
    #[arg(long, default_value_t = 16)]
    in_flight: u32,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up before measuring, in seconds (also makes the tokens `info` reads).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, default_value_t = 100)]
    batch_size: u32,
    #[arg(long, default_value = "sandbox")]
    processor: String,
    /// The vault's process id, to report server CPU time per call (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    vault_endpoint: String,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: Scenario,
    connections: u32,
    in_flight_per_connection: u32,
    duration_secs: f64,
    calls: u64,
    /// Cards per second (batch calls count each card).
    cards_per_sec: f64,
    calls_per_sec: f64,
    latency_ms: Percentiles,
    errors: BTreeMap<String, u64>,
    /// Server CPU time (user + system) per call, when `--server-pid` was given.
    server_cpu_us_per_call: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// A synthetic Luhn-valid 16-digit number starting with 4000 (never a real card).
fn synthetic_pan(n: u64) -> String {
    let body = format!("4000{:011}", n % 100_000_000_000);
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

/// CPU time of a process in clock ticks (utime + stime), from /proc.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

struct Shared {
    next_card: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
    tokens: std::sync::Mutex<Vec<String>>,
}

/// One call of the scenario; returns the cards it carried.
async fn call(
    client: &mut VaultClient,
    scenario: Scenario,
    shared: &Shared,
    cli: &Cli,
    n: u64,
) -> Result<u64, vault_client::Error> {
    let card = |k: u64| Card::new(&synthetic_pan(k), 12, 2031);
    let token = || {
        let tokens = shared
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tokens.get((n as usize) % tokens.len().max(1)).cloned()
    };
    let scenario = match scenario {
        Scenario::Mix => match n % 10 {
            0 => Scenario::Forward,
            1..=4 => Scenario::Tokenize,
            _ => Scenario::Info,
        },
        other => other,
    };
    match scenario {
        Scenario::Tokenize | Scenario::Mix => {
            let info = client
                .tokenize(
                    card(shared.next_card.fetch_add(1, Ordering::Relaxed)),
                    false,
                )
                .await?;
            if !shared.measuring.load(Ordering::Relaxed) {
                shared
                    .tokens
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(info.token);
            }
            Ok(1)
        }
        Scenario::TokenizeBatch => {
            let first = shared
                .next_card
                .fetch_add(u64::from(cli.batch_size), Ordering::Relaxed);
            let cards: Vec<Card> = (first..first + u64::from(cli.batch_size))
                .map(card)
                .collect();
            client.tokenize_batch(&cards, false).await?;
            Ok(u64::from(cli.batch_size))
        }
        Scenario::Info => match token() {
            Some(token) => client.token_info(&token).await.map(|_| 1),
            None => client.tokenize(card(n), false).await.map(|_| 1),
        },
        Scenario::Forward => {
            let Some(token) = token() else {
                return client.tokenize(card(n), false).await.map(|_| 1);
            };
            client
                .forward(ForwardRequest {
                    processor: cli.processor.clone(),
                    method: "POST".into(),
                    path: "/v1/charges".into(),
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: r#"{"number":"{{card.number}}","exp_month":"{{card.exp_month}}","exp_year":"{{card.exp_year}}"}"#.into(),
                    token,
                    idempotency_key: None,
                })
                .await
                .map(|_| 1)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    let text = std::fs::read_to_string(&cli.config)
        .with_context(|| format!("read {}", cli.config.display()))?;
    let file: ConfigFile = toml::from_str(&text).context("parse the config file")?;
    let base = cli.config.parent().unwrap_or(std::path::Path::new("."));
    let config = ClientConfig::new(
        file.vault_endpoint,
        base.join(file.ca_file),
        base.join(file.cert_file),
        base.join(file.key_file),
    );
    let shared = Arc::new(Shared {
        next_card: AtomicU64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64 % 10_000_000_000),
        ),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        tokens: std::sync::Mutex::new(Vec::new()),
    });
    let calls = Arc::new(AtomicU64::new(0));
    let cards = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..cli.connections {
        let client = VaultClient::connect(&config)
            .await
            .context("connect to the vault")?;
        for worker in 0..cli.in_flight {
            let (mut client, cli, shared) = (client.clone(), Arc::clone(&cli), Arc::clone(&shared));
            let (calls, cards) = (Arc::clone(&calls), Arc::clone(&cards));
            workers.push(tokio::spawn(async move {
                // 1 µs to 60 s at 3 significant digits: valid bounds, so this succeeds.
                let Ok(mut histogram) = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3) else {
                    return (None, BTreeMap::new());
                };
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                let mut n = u64::from(worker);
                while !shared.stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = call(&mut client, cli.scenario, &shared, &cli, n).await;
                    n += u64::from(cli.in_flight);
                    if !shared.measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    match result {
                        Ok(carried) => {
                            let _ = histogram.record(started.elapsed().as_micros() as u64);
                            calls.fetch_add(1, Ordering::Relaxed);
                            cards.fetch_add(carried, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let code = e.code().map_or("transport".into(), |c| format!("{c:?}"));
                            *errors.entry(code).or_insert(0) += 1;
                        }
                    }
                }
                (Some(histogram), errors)
            }));
        }
    }

    tokio::time::sleep(Duration::from_secs(cli.warmup)).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let cpu_before = cli.server_pid.and_then(cpu_ticks);
    let started = Instant::now();
    let measure = Duration::from_secs(cli.duration);
    while started.elapsed() < measure {
        tokio::time::sleep(Duration::from_secs(1).min(measure.saturating_sub(started.elapsed())))
            .await;
        let done = calls.load(Ordering::Relaxed);
        eprint!(
            "\r{:>4.0} s  {done} calls  {:.0}/s   ",
            started.elapsed().as_secs_f64(),
            done as f64 / started.elapsed().as_secs_f64().max(0.001)
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    shared.measuring.store(false, Ordering::Relaxed);
    let cpu_after = cli.server_pid.and_then(cpu_ticks);
    shared.stop.store(true, Ordering::Relaxed);
    eprintln!();
    let mut histogram = Histogram::<u64>::new(3).context("histogram")?;
    let mut errors = BTreeMap::new();
    for worker in workers {
        let (h, e) = worker.await.context("a worker failed")?;
        if let Some(h) = h {
            histogram.add(h).context("merge histograms")?;
        }
        for (code, count) in e {
            *errors.entry(code).or_insert(0) += count;
        }
    }
    let calls = calls.load(Ordering::Relaxed);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    // Linux reports CPU time in clock ticks of 10 ms (USER_HZ 100).
    let server_cpu_us_per_call = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if calls > 0 => {
            Some((after - before) as f64 * 10_000.0 / calls as f64)
        }
        _ => None,
    };
    let report = Report {
        scenario: cli.scenario,
        connections: cli.connections,
        in_flight_per_connection: cli.in_flight,
        duration_secs: elapsed,
        calls,
        cards_per_sec: cards.load(Ordering::Relaxed) as f64 / elapsed,
        calls_per_sec: calls as f64 / elapsed,
        latency_ms: Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        },
        errors,
        server_cpu_us_per_call,
    };
    println!(
        "{:?}: {} in flight ({} connections x {}), {:.1} s: {:.0} calls/s ({:.0} cards/s); \
         latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}; errors {:?}{}",
        report.scenario,
        cli.connections * cli.in_flight,
        cli.connections,
        cli.in_flight,
        elapsed,
        report.calls_per_sec,
        report.cards_per_sec,
        report.latency_ms.p50,
        report.latency_ms.p90,
        report.latency_ms.p99,
        report.latency_ms.p999,
        report.latency_ms.max,
        report.errors,
        report
            .server_cpu_us_per_call
            .map(|us| format!("; server CPU {us:.0} µs/call"))
            .unwrap_or_default()
    );
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn synthetic_numbers_pass_luhn_and_never_repeat_in_a_run() {
        let numbers: Vec<String> = (0..1000).map(super::synthetic_pan).collect();
        for number in &numbers {
            assert_eq!(number.len(), 16);
            let sum: u32 = number
                .bytes()
                .rev()
                .enumerate()
                .map(|(i, b)| {
                    let d = u32::from(b - b'0');
                    if i % 2 == 1 {
                        let doubled = d * 2;
                        if doubled > 9 { doubled - 9 } else { doubled }
                    } else {
                        d
                    }
                })
                .sum();
            assert_eq!(sum % 10, 0, "{number}");
        }
        let unique: std::collections::HashSet<_> = numbers.iter().collect();
        assert_eq!(unique.len(), numbers.len());
    }
}

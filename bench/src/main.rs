//! `vault-bench`: drives a running vault over real mutual TLS and reports throughput,
//! latency percentiles (HDR histogram) and errors by gRPC code, as text and optionally
//! JSON. Two ways to offer load:
//!
//! - closed loop (default): N connections × M calls in flight; each worker sends its
//!   next call when the last one is answered;
//! - open loop (`--rate N`): N calls per second on a fixed schedule whatever the
//!   answers, latency measured from each call's scheduled start, so a stalled server
//!   shows up in the latency instead of slowing the load (no coordinated omission).
//!
//! ```sh
//! vault-bench --config .dev/vaultctl.toml --scenario tokenize --connections 4 \
//!     --in-flight 16 --duration 10 --json report.json
//! vault-bench --config .dev/vaultctl.toml --scenario echo --rate 5000 --duration 10
//! ```
//!
//! Card numbers are synthetic (Luhn-valid, from `testcards`, spread over issuers as real
//! cards are); none is ever printed. The one fixed number, in `--write-h2load-body`, is
//! the published Visa test card.

// A command-line tool: what it prints is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use vault_client::{BatchItem, Card, ClientConfig, ForwardRequest, VaultClient};
use vault_proto::vault::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// One card per call.
    Tokenize,
    /// One sealed card per call (sealed intake, docs/sealed-intake.md): the vault
    /// opens it (HPKE), checks its window and claims its nonce, then tokenizes it.
    /// `--sealed-cards` cards are sealed before the warm-up, outside the timed window.
    TokenizeSealed,
    /// `--batch-size` cards per call.
    TokenizeBatch,
    /// GetTokenInfo on `--tokens` tokens made before the warm-up.
    Info,
    /// Forward to the `--processor` (the dev stack's sandbox by default), each call
    /// naming one of `--tokens` tokens made before the warm-up.
    Forward,
    /// The baseline of `forward`: the same charge (a synthetic card, the route's JSON
    /// body and the sandbox's API key) sent by this client straight to the sandbox
    /// (`--sandbox-url`) over HTTPS/1.1, as the vault sends it; what forward adds is
    /// the difference at the same concurrency.
    ForwardDirect,
    /// 50% info, 40% tokenize, 10% forward.
    Mix,
    /// The transport baseline: the standard gRPC health check
    /// (grpc.health.v1.Health/Check) on the vault's own port, over the same mutual-TLS
    /// channel and client as the other scenarios. No storage, no crypto, no audit.
    Echo,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load generator for a running vault",
    long_about = "Load generator for a running vault, over real mutual TLS.\n\n\
        Closed loop (default): --connections x --in-flight workers, each sending its next \
        call when the last one is answered. Throughput is what the server sustains at that \
        concurrency; latency is per answered call.\n\n\
        Open loop (--rate N): N calls per second in total, spread round-robin over the \
        connections, sent on a fixed schedule whatever the answers. Latency is measured \
        from each call's scheduled start, so time a call waited because the client or \
        the server was behind counts (no coordinated omission). At most --max-outstanding \
        calls are outstanding; a call whose scheduled time comes while that many are \
        outstanding is not sent and is reported as `not issued on time`, separately from \
        errors. Only calls scheduled inside the measured window count; the run waits for \
        them to be answered."
)]
struct Cli {
    /// vaultctl-style config file (vault_endpoint, ca_file, cert_file, key_file).
    #[arg(long, default_value = ".dev/vaultctl.toml")]
    config: PathBuf,
    #[arg(long, value_enum, default_value = "tokenize")]
    scenario: Scenario,
    /// TLS connections to the vault.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Closed loop: calls in flight on each connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Open loop: N calls per second in total across the connections, on a fixed
    /// schedule; latency from each call's scheduled start. Replaces --in-flight.
    /// (tokio's timer ticks in milliseconds: calls due in the same millisecond leave
    /// together, up to about 1 ms late, and that lag counts in their latency.)
    #[arg(long, value_name = "N", conflicts_with = "in_flight",
          value_parser = clap::value_parser!(u32).range(1..))]
    rate: Option<u32>,
    /// Open loop: most calls outstanding at once, across the connections. A call due
    /// while this many are outstanding is not sent; it is counted as not issued on time.
    #[arg(long, default_value_t = 1024, requires = "rate",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_outstanding: u32,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up before measuring, in seconds.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// info, forward and mix: tokens made before the warm-up (in batches of 1,000,
    /// outside the timed window) for those calls to name.
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    tokens: u32,
    #[arg(long, default_value_t = 100)]
    batch_size: u32,
    /// tokenize-sealed: cards sealed before the run (each is tokenized once; calls
    /// past them fail as `SealedCardsUsedUp`). Sealing takes about 0.1 ms a card.
    #[arg(long, default_value_t = 300_000)]
    sealed_cards: usize,
    #[arg(long, default_value = "sandbox")]
    processor: String,
    /// forward-direct: the sandbox's charge URL. Its CA is the config's `ca_file` and
    /// its API key the file `sandbox-api-key` beside the config (the dev stack's).
    #[arg(long, default_value = "https://localhost:9443/v1/charges")]
    sandbox_url: String,
    /// The vault's process id, to report server CPU time per call (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one gRPC-framed request body of --scenario (tokenize: the published Visa
    /// test card 4242424242424242, 12/2031; echo: an empty HealthCheckRequest) to FILE
    /// for h2load (scripts/h2load-check.sh), and exit without connecting.
    #[arg(long, value_name = "FILE")]
    write_h2load_body: Option<PathBuf>,
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
    /// Closed loop: calls in flight on each connection; null in open loop (`--rate`).
    in_flight_per_connection: Option<u32>,
    duration_secs: f64,
    /// Calls answered OK (open loop: of those scheduled in the measured window).
    calls: u64,
    /// Cards per second (batch calls count each card).
    cards_per_sec: f64,
    calls_per_sec: f64,
    latency_ms: Percentiles,
    errors: BTreeMap<String, u64>,
    /// Server CPU time (user + system) per call, when `--server-pid` was given.
    server_cpu_us_per_call: Option<f64>,
    /// Open loop only (`--rate`): the schedule and how well it was kept.
    open_loop: Option<OpenLoop>,
}

#[derive(Debug, Serialize)]
struct OpenLoop {
    /// Calls per second asked for (`--rate`).
    target_rate: u32,
    max_outstanding: u32,
    /// Calls scheduled in the measured window: calls + errors + not_issued + unfinished.
    scheduled: u64,
    /// Scheduled calls not sent because `max_outstanding` calls were outstanding at
    /// their scheduled time (the server, or the client, could not keep up).
    not_issued: u64,
    /// Sent calls still unanswered when the run stopped waiting for them.
    unfinished: u64,
    /// The latest a call left after its scheduled time (client-side lag: timer ticks,
    /// a busy client). Included in the latency figures.
    max_issue_lag_ms: f64,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// The card of `--write-h2load-body`: Visa's published test number, never a real card.
const H2LOAD_TEST_PAN: &str = "4242424242424242";

/// One request of `scenario` as h2load sends it: a gRPC length-prefixed message
/// (1 byte compressed flag = 0, 4 bytes big-endian message length, then the protobuf
/// message), encoded with the same generated types the client library uses.
fn h2load_body(scenario: Scenario) -> anyhow::Result<Vec<u8>> {
    let message = match scenario {
        Scenario::Tokenize => pb::TokenizeRequest {
            card: Some(pb::Card {
                number: H2LOAD_TEST_PAN.to_owned(),
                exp_month: 12,
                exp_year: 2031,
                cardholder_name: String::new(),
                cvc: String::new(),
            }),
            reuse_existing: false,
            ttl_secs: 0,
            format: 0,
        }
        .encode_to_vec(),
        // An empty service name asks for the server as a whole; the message encodes to
        // zero bytes, so the body is the 5-byte prefix alone.
        Scenario::Echo => tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }
        .encode_to_vec(),
        other => anyhow::bail!(
            "--write-h2load-body supports the tokenize and echo scenarios, not {other:?}"
        ),
    };
    let length = u32::try_from(message.len()).context("message length")?;
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&length.to_be_bytes());
    body.extend_from_slice(&message);
    Ok(body)
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
    /// info, forward and mix: the tokens their calls name, made before the run.
    tokens: Vec<String>,
    /// tokenize-sealed: the cards sealed before the run, each sent once.
    sealed: Vec<Vec<u8>>,
    next_sealed: AtomicUsize,
    /// forward-direct: the HTTPS client to the sandbox and its API key.
    direct: Option<Direct>,
    /// Calls answered OK and cards they carried, in the measured window (progress).
    calls: AtomicU64,
    cards: AtomicU64,
}

/// Why a call failed, as the report counts it.
#[derive(Debug)]
enum CallError {
    Vault(vault_client::Error),
    /// The health check answered, but not SERVING.
    NotServing,
    /// tokenize-sealed: every card sealed before the run was sent.
    SealedCardsUsedUp,
    /// forward-direct: the sandbox did not answer, or not with 200 (its status).
    Sandbox(Option<u16>),
}

impl From<vault_client::Error> for CallError {
    fn from(e: vault_client::Error) -> Self {
        CallError::Vault(e)
    }
}

impl CallError {
    /// The gRPC code, or what went wrong when there is none.
    fn label(&self) -> String {
        match self {
            CallError::Vault(e) => e.code().map_or("transport".into(), |c| format!("{c:?}")),
            CallError::NotServing => "NotServing".into(),
            CallError::SealedCardsUsedUp => "SealedCardsUsedUp".into(),
            CallError::Sandbox(None) => "sandbox transport".into(),
            CallError::Sandbox(Some(status)) => format!("sandbox HTTP {status}"),
        }
    }
}

/// Latencies and errors of the measured calls; one per closed-loop worker, one shared
/// by the open loop.
struct Tally {
    histogram: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // 1 µs to 60 s at 3 significant digits; slower calls are clamped to 60 s.
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
            errors: BTreeMap::new(),
        })
    }

    fn record(&mut self, shared: &Shared, result: Result<u64, CallError>, latency: Duration) {
        match result {
            Ok(carried) => {
                self.histogram
                    .saturating_record(latency.as_micros().try_into().unwrap_or(u64::MAX));
                shared.calls.fetch_add(1, Ordering::Relaxed);
                shared.cards.fetch_add(carried, Ordering::Relaxed);
            }
            Err(e) => *self.errors.entry(e.label()).or_insert(0) += 1,
        }
    }

    fn merge(&mut self, other: &Tally) -> anyhow::Result<()> {
        self.histogram
            .add(&other.histogram)
            .context("merge histograms")?;
        for (code, count) in &other.errors {
            *self.errors.entry(code.clone()).or_insert(0) += count;
        }
        Ok(())
    }
}

/// One call of the scenario; returns the cards it carried.
async fn call(
    client: &mut VaultClient,
    scenario: Scenario,
    shared: &Shared,
    cli: &Cli,
    n: u64,
) -> Result<u64, CallError> {
    // Synthetic numbers spread over issuers as real cards are (the guessing detector
    // counts cards per first six and last four).
    let card = |k: u64| Card::new(&testcards::card_number(k), 12, 2031);
    // Made before the run (`make_tokens`), never empty for the scenarios that read it.
    let token = || shared.tokens[(n as usize) % shared.tokens.len()].as_str();
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
            client
                .tokenize(
                    card(shared.next_card.fetch_add(1, Ordering::Relaxed)),
                    false,
                )
                .await?;
            Ok(1)
        }
        Scenario::TokenizeSealed => {
            let index = shared.next_sealed.fetch_add(1, Ordering::Relaxed);
            let blob = shared
                .sealed
                .get(index)
                .ok_or(CallError::SealedCardsUsedUp)?;
            client.tokenize_sealed(blob, false).await?;
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
        Scenario::Info => Ok(client.token_info(token()).await.map(|_| 1)?),
        Scenario::Forward => {
            let token = token();
            Ok(client
                .forward(ForwardRequest {
                    reason: Some("benchmark".into()),
                    ..ForwardRequest::route(&cli.processor, "charge", token, &[("amount", "1000")])
                })
                .await
                .map(|_| 1)?)
        }
        Scenario::ForwardDirect => {
            let direct = shared.direct.as_ref().ok_or(CallError::Sandbox(None))?;
            let number = testcards::card_number(shared.next_card.fetch_add(1, Ordering::Relaxed));
            // The route's body (devstack's `charge`), as the vault fills it in.
            let body = format!(
                r#"{{"amount":"1000","number":"{number}","exp_month":"12","exp_year":"2031","name":""}}"#
            );
            let answer = direct
                .client
                .post(&direct.url)
                .header("authorization", &direct.authorization)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|_| CallError::Sandbox(None))?;
            let status = answer.status().as_u16();
            answer.bytes().await.map_err(|_| CallError::Sandbox(None))?;
            match status {
                200 => Ok(1),
                other => Err(CallError::Sandbox(Some(other))),
            }
        }
        // vault-client's health check, as `vaultctl health` makes it: the vault's
        // channel, one Health/Check per call. (It retries UNAVAILABLE twice, after 100
        // and 200 ms, like every idempotent call of the library; a retried call would
        // show in the latency tail, and the transport errors it hides would show in
        // the tokenize scenarios.)
        Scenario::Echo => match client.health().await? {
            true => Ok(1),
            false => Err(CallError::NotServing),
        },
    }
}

/// Closed loop: `connections × in_flight` workers, each sending its next call when the
/// last one is answered, until `stop`.
fn closed_loop(
    clients: &[VaultClient],
    cli: &Arc<Cli>,
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<Tally>>> {
    let mut workers = Vec::new();
    for client in clients {
        for worker in 0..cli.in_flight {
            let (mut client, cli, shared) = (client.clone(), Arc::clone(cli), Arc::clone(shared));
            workers.push(tokio::spawn(async move {
                let mut tally = Tally::new()?;
                let mut n = u64::from(worker);
                while !shared.stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = call(&mut client, cli.scenario, &shared, &cli, n).await;
                    n += u64::from(cli.in_flight);
                    if shared.measuring.load(Ordering::Relaxed) {
                        tally.record(&shared, result, started.elapsed());
                    }
                }
                Ok(tally)
            }));
        }
    }
    workers
}

/// The open loop's schedule: call `i` is due at `start + i / rate`, and counts when it
/// is due inside `[measure_from, end)`.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    rate: u32,
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

/// What the open loop's scheduler counted, besides the tally.
#[derive(Debug, Default)]
struct OpenLoopCounts {
    scheduled: AtomicU64,
    not_issued: AtomicU64,
    max_issue_lag_us: AtomicU64,
}

/// Open loop: sends call `i` at `schedule.start + i / rate` on connection
/// `i % connections`, whatever the earlier calls are doing, unless `permits` (the
/// outstanding bound) are all taken at that moment. Each call's latency runs from its
/// scheduled time. Returns once every call due before `schedule.end` was sent (or
/// counted as not issued); the caller then waits for the permits to come back.
async fn open_loop(
    clients: Vec<VaultClient>,
    cli: Arc<Cli>,
    shared: Arc<Shared>,
    schedule: Schedule,
    permits: Arc<Semaphore>,
    counts: Arc<OpenLoopCounts>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut i: u64 = 0;
    loop {
        // From the start each time rather than by adding intervals: no drift.
        let due = schedule.start + Duration::from_secs_f64(i as f64 / f64::from(schedule.rate));
        if due >= schedule.end || clients.is_empty() {
            break;
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        } else if i.is_multiple_of(64) {
            // Catching up on calls already due: let the answers be processed too.
            tokio::task::yield_now().await;
        }
        let measured = due >= schedule.measure_from;
        if measured {
            counts.scheduled.fetch_add(1, Ordering::Relaxed);
            let lag = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
            counts.max_issue_lag_us.fetch_max(lag, Ordering::Relaxed);
        }
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if measured {
                counts.not_issued.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
            continue;
        };
        let index = usize::try_from(i % clients.len() as u64).unwrap_or(0);
        let mut client = clients[index].clone();
        let (cli, shared, tally) = (Arc::clone(&cli), Arc::clone(&shared), Arc::clone(&tally));
        tokio::spawn(async move {
            let result = call(&mut client, cli.scenario, &shared, &cli, i).await;
            let latency = due.elapsed();
            if measured {
                tally
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(&shared, result, latency);
            }
            drop(permit);
        });
        i += 1;
    }
}

/// Seals `count` synthetic cards to the vault's intake key, on every core, before the
/// run: the scenario measures the vault, not the sealer.
/// Tokenizes `count` cards numbered from `first` in batches of 1,000 and returns their
/// tokens, for the scenarios that read or forward existing tokens.
async fn make_tokens(config: &ClientConfig, first: u64, count: u32) -> anyhow::Result<Vec<String>> {
    let mut client = VaultClient::connect(config)
        .await
        .context("connect to the vault")?;
    let started = Instant::now();
    let mut tokens = Vec::with_capacity(count as usize);
    let end = first + u64::from(count);
    let mut next = first;
    while next < end {
        let batch_end = (next + 1_000).min(end);
        let cards: Vec<Card> = (next..batch_end)
            .map(|k| Card::new(&testcards::card_number(k), 12, 2031))
            .collect();
        for item in client
            .tokenize_batch(&cards, false)
            .await
            .context("TokenizeBatch (making the tokens the run reads)")?
        {
            match item {
                BatchItem::Stored(info) => tokens.push(info.token),
                BatchItem::Invalid { field, rule, .. } => {
                    anyhow::bail!("a card made for the run was refused: {field} ({rule})")
                }
            }
        }
        next = batch_end;
    }
    eprintln!(
        "made {} tokens in {:.1} s (outside the timed window)",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(tokens)
}

async fn seal_cards(
    config: &ClientConfig,
    first: u64,
    count: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut client = VaultClient::connect(config)
        .await
        .context("connect to the vault")?;
    let key = client.sealing_key().await.context("GetSealingKey")?;
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = count.div_ceil(threads);
    let sealed = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let key = &key;
                scope.spawn(move || {
                    let from = t * per_thread;
                    let to = ((t + 1) * per_thread).min(count);
                    (from..to)
                        .map(|k| {
                            let number = testcards::card_number(first + k as u64);
                            key.seal(&Card::new(&number, 12, 2031))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Ok(Vec::new())))
            .collect::<Result<Vec<_>, _>>()
    })
    .context("seal the cards")?;
    let sealed: Vec<Vec<u8>> = sealed.into_iter().flatten().collect();
    eprintln!(
        "sealed {} cards in {:.1} s",
        sealed.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(sealed)
}

/// forward-direct's HTTPS client: the config's CA, no client certificate, no ALPN
/// (HTTP/1.1 with keep-alive, as the vault's processor client), and the sandbox's API
/// key from the dev stack's directory.
struct Direct {
    client: reqwest::Client,
    url: String,
    authorization: String,
}

fn direct_client(config_path: &Path, url: &str) -> anyhow::Result<Direct> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("read {}", config_path.display()))?;
    let file: ConfigFile = toml::from_str(&text).context("parse the config file")?;
    let base = config_path.parent().unwrap_or(Path::new("."));
    let roots = runtime::tls::root_store(&base.join(file.ca_file)).map_err(anyhow::Error::msg)?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let key_file = base.join("sandbox-api-key");
    let key = std::fs::read_to_string(&key_file)
        .with_context(|| format!("read the sandbox's API key from {}", key_file.display()))?;
    Ok(Direct {
        client: reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .build()
            .context("build the HTTPS client")?,
        url: url.to_owned(),
        authorization: format!("Bearer {}", key.trim()),
    })
}

fn load_config(path: &Path) -> anyhow::Result<ClientConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let file: ConfigFile = toml::from_str(&text).context("parse the config file")?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(ClientConfig::new(
        file.vault_endpoint,
        base.join(file.ca_file),
        base.join(file.cert_file),
        base.join(file.key_file),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    if let Some(path) = &cli.write_h2load_body {
        std::fs::write(path, h2load_body(cli.scenario)?)
            .with_context(|| format!("write {}", path.display()))?;
        return Ok(());
    }
    let config = load_config(&cli.config)?;
    let first_card = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64 % 10_000_000_000);
    let sealed = match cli.scenario {
        Scenario::TokenizeSealed => seal_cards(&config, first_card, cli.sealed_cards).await?,
        _ => Vec::new(),
    };
    // The cards of the tokens made first, then the sealed cards, then the run's own.
    let tokens = match cli.scenario {
        Scenario::Info | Scenario::Forward | Scenario::Mix => {
            make_tokens(&config, first_card, cli.tokens).await?
        }
        _ => Vec::new(),
    };
    let shared = Arc::new(Shared {
        next_card: AtomicU64::new(first_card + tokens.len() as u64 + sealed.len() as u64),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        tokens,
        sealed,
        next_sealed: AtomicUsize::new(0),
        direct: match cli.scenario {
            Scenario::ForwardDirect => Some(direct_client(&cli.config, &cli.sandbox_url)?),
            _ => None,
        },
        calls: AtomicU64::new(0),
        cards: AtomicU64::new(0),
    });
    let mut clients = Vec::new();
    for _ in 0..cli.connections {
        clients.push(
            VaultClient::connect(&config)
                .await
                .context("connect to the vault")?,
        );
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(cli.warmup);
    let measure = Duration::from_secs(cli.duration);
    let end = measure_from + measure;
    let open = cli.rate.map(|rate| {
        let permits = Arc::new(Semaphore::new(cli.max_outstanding as usize));
        let counts = Arc::new(OpenLoopCounts::default());
        (rate, permits, counts)
    });
    let open_tally = Arc::new(Mutex::new(Tally::new()?));
    let (workers, scheduler) = match &open {
        None => (closed_loop(&clients, &cli, &shared), None),
        Some((rate, permits, counts)) => {
            let schedule = Schedule {
                rate: *rate,
                start,
                measure_from,
                end,
            };
            let task = tokio::spawn(open_loop(
                clients,
                Arc::clone(&cli),
                Arc::clone(&shared),
                schedule,
                Arc::clone(permits),
                Arc::clone(counts),
                Arc::clone(&open_tally),
            ));
            (Vec::new(), Some(task))
        }
    };

    tokio::time::sleep_until(measure_from.into()).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let cpu_before = cli.server_pid.and_then(cpu_ticks);
    let started = Instant::now();
    while Instant::now() < end {
        let tick = (Instant::now() + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(tick.into()).await;
        let done = shared.calls.load(Ordering::Relaxed);
        let open_status = open
            .as_ref()
            .map(|(_, permits, counts)| {
                format!(
                    "  {} outstanding  {} not issued",
                    cli.max_outstanding as usize - permits.available_permits(),
                    counts.not_issued.load(Ordering::Relaxed)
                )
            })
            .unwrap_or_default();
        eprint!(
            "\r{:>4.0} s  {done} calls  {:.0}/s{open_status}   ",
            started.elapsed().as_secs_f64(),
            done as f64 / started.elapsed().as_secs_f64().max(0.001)
        );
    }
    let mut elapsed = started.elapsed().as_secs_f64();
    shared.measuring.store(false, Ordering::Relaxed);
    let cpu_after = cli.server_pid.and_then(cpu_ticks);
    shared.stop.store(true, Ordering::Relaxed);
    eprintln!();

    let mut tally = Tally::new()?;
    for worker in workers {
        tally.merge(&worker.await.context("a worker failed")??)?;
    }
    let mut open_loop_report = None;
    if let (Some(scheduler), Some((rate, permits, counts))) = (scheduler, &open) {
        scheduler.await.context("the scheduler failed")?;
        // Every call due in the window was sent; wait for their answers. Each call has
        // the client's deadline (10 s), so this rarely times out.
        let all = cli.max_outstanding;
        let drained = tokio::time::timeout(
            config.timeout + Duration::from_secs(5),
            permits.acquire_many(all),
        )
        .await;
        let unfinished = match drained {
            Ok(Ok(_)) => 0,
            _ => (all as usize).saturating_sub(permits.available_permits()) as u64,
        };
        tally.merge(&open_tally.lock().unwrap_or_else(PoisonError::into_inner))?;
        // Open loop: the window is the schedule's, not the wall time we waited.
        elapsed = measure.as_secs_f64();
        open_loop_report = Some(OpenLoop {
            target_rate: *rate,
            max_outstanding: cli.max_outstanding,
            scheduled: counts.scheduled.load(Ordering::Relaxed),
            not_issued: counts.not_issued.load(Ordering::Relaxed),
            unfinished,
            max_issue_lag_ms: counts.max_issue_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        });
    }
    let calls = shared.calls.load(Ordering::Relaxed);
    let histogram = &tally.histogram;
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
        in_flight_per_connection: cli.rate.is_none().then_some(cli.in_flight),
        duration_secs: elapsed,
        calls,
        cards_per_sec: shared.cards.load(Ordering::Relaxed) as f64 / elapsed,
        calls_per_sec: calls as f64 / elapsed,
        latency_ms: Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        },
        errors: tally.errors,
        server_cpu_us_per_call,
        open_loop: open_loop_report,
    };
    let load = match &report.open_loop {
        None => format!(
            "{} in flight ({} connections x {})",
            cli.connections * cli.in_flight,
            cli.connections,
            cli.in_flight
        ),
        Some(open) => format!(
            "open loop at {}/s over {} connections (at most {} outstanding)",
            open.target_rate, cli.connections, open.max_outstanding
        ),
    };
    let schedule = report
        .open_loop
        .as_ref()
        .map(|open| {
            format!(
                "; scheduled {}, not issued on time {}, unfinished {}, max issue lag {:.2} ms",
                open.scheduled, open.not_issued, open.unfinished, open.max_issue_lag_ms
            )
        })
        .unwrap_or_default();
    println!(
        "{:?}: {load}, {:.1} s: {:.0} calls/s ({:.0} cards/s); \
         latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}; errors {:?}{}{schedule}",
        report.scenario,
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
    fn h2load_bodies_are_grpc_framed_protobuf() {
        use prost::Message;

        let body = super::h2load_body(super::Scenario::Tokenize).unwrap();
        assert_eq!(body[0], 0, "not compressed");
        let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(length, body.len() - 5);
        let request = super::pb::TokenizeRequest::decode(&body[5..]).unwrap();
        let card = request.card.unwrap();
        assert_eq!(card.number, "4242424242424242");
        assert_eq!((card.exp_month, card.exp_year), (12, 2031));
        assert!(!request.reuse_existing);

        // An empty HealthCheckRequest is zero bytes: the prefix alone.
        let body = super::h2load_body(super::Scenario::Echo).unwrap();
        assert_eq!(body, [0, 0, 0, 0, 0]);

        assert!(super::h2load_body(super::Scenario::Mix).is_err());
    }

    #[test]
    fn rate_replaces_in_flight_and_max_outstanding_needs_rate() {
        use clap::Parser;

        let parse = |args: &[&str]| super::Cli::try_parse_from([&["vault-bench"], args].concat());
        let cli = parse(&["--rate", "500"]).unwrap();
        assert_eq!((cli.rate, cli.max_outstanding), (Some(500), 1024));
        assert!(parse(&["--rate", "500", "--max-outstanding", "64"]).is_ok());
        assert!(parse(&["--rate", "500", "--in-flight", "4"]).is_err());
        assert!(parse(&["--max-outstanding", "64"]).is_err());
        assert!(parse(&["--rate", "0"]).is_err());
    }
}

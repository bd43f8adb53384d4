//! The KeyService gRPC API. Deny by default: material only to vault identities,
//! metadata and lifecycle operations only to admin identities.
//!
//! Every change to the keyring is saved (sealed, atomically, synced) before it is
//! answered or announced to watching vaults, and recorded in the history.
//!
//! One concern per file: `routes` (each RPC's role and handler), `call` (request id,
//! span, authorization, metrics and the error mapping of every call), `state` (durable
//! changes of the keyring and the history), `serving` (keys and budgets for vaults),
//! `admin` (listing, rotation, retirement, history), `proposals` (dual control),
//! `health` (gauges and health) and `wire` (domain types to protobuf and back).

mod admin;
mod call;
mod health;
mod proposals;
mod routes;
mod serving;
mod state;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use runtime::now_unix_ms;
use runtime::shutdown::Shutdown;
use tokio::sync::watch;

use crate::config::Lifecycle;
use crate::history::History;
use crate::keyring::{Keyring, Purpose, RootKey};
use crate::metrics::Metrics;

/// Ended proposals stay listed (and refuse replays by name) this long.
const KEEP_PROPOSALS_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// State shared by the handlers and the scheduled-rotation task.
#[derive(Debug)]
pub(crate) struct Shared {
    keyring: Mutex<Keyring>,
    root: Mutex<RootKey>,
    keyring_file: PathBuf,
    root_key_file: PathBuf,
    history: History,
    lifecycle: Lifecycle,
    /// Bumped after every change of the served key set; WatchKeys streams follow it.
    changes: watch::Sender<u64>,
    /// The latest usage report of each vault (identity, instance).
    usage: Mutex<HashMap<(String, String), UsageReport>>,
    /// Every configured vault identity must have reported before a destroy.
    vault_identities: Vec<String>,
    pub(crate) metrics: Metrics,
    /// The vaults' audit checkpoints.
    checkpoints: crate::checkpoints::Checkpoints,
    /// The vaults' erasures.
    erasures: crate::erasures::Erasures,
    /// The last keyring save failed (health says degraded until one succeeds).
    save_failing: AtomicBool,
    /// The highest keyring generation a vault says it has accepted: above the keyring's
    /// own, the keyring was restored from an older copy (see `serving`).
    generation_seen: std::sync::atomic::AtomicU64,
    /// When a postponed scheduled rotation was last logged at WARN (once an hour).
    postponed_warned_at: Mutex<Option<std::time::Instant>>,
}

#[derive(Debug)]
struct UsageReport {
    at_unix_ms: i64,
    records: BTreeMap<(Purpose, u32), u64>,
    /// The versions the vault was using for new data when it reported.
    active: BTreeMap<Purpose, u32>,
}

#[derive(Debug)]
pub struct KeyServiceImpl {
    shared: Arc<Shared>,
    vault_identities: HashSet<String>,
    admin_identities: HashSet<String>,
    shutdown: Shutdown,
}

impl KeyServiceImpl {
    pub(crate) fn new(
        shared: Arc<Shared>,
        access: &crate::config::Access,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            shared,
            vault_identities: access.vault_identities.iter().cloned().collect(),
            admin_identities: access.admin_identities.iter().cloned().collect(),
            shutdown,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

//! Rewrap: re-encrypts, in the background, every record that is not on the active
//! card-data and fingerprint key versions, so that old versions can be destroyed.
//!
//! - Throttled to `[rewrap] rate_per_sec`, in batches of `batch_size` records.
//! - Resumable: the job's state and cursor (a position in the store's key-version
//!   index) are saved after every batch, and a requested job resumes at start-up.
//!   Records before the cursor are already on the target versions (or failed and were
//!   logged), so nothing is done twice and nothing is skipped.
//! - Consistent with live traffic: each record is replaced only if it still holds the
//!   bytes that were read (`Store::rewrite`), so a concurrent delete is never undone.
//! - Card data exists only inside this process, in zeroizing buffers, as in any read.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runtime::now_unix_ms;
use runtime::shutdown::Shutdown;
use serde::{Deserialize, Serialize};

use crate::config::RewrapSettings;
use crate::error::VaultError;
use crate::keys::{Aead, Keys};
use crate::record::{self, Fingerprint};
use crate::store::{JobLock, KeyUse, KeyVersions, Rewrite, RewriteOutcome, Store, StoreError};
use crate::token::Token;

const STATE_KEY: &str = "rewrap";
/// How often a vault waiting for the job (held by another vault) looks again.
const JOB_POLL: Duration = Duration::from_secs(2);
/// How often, and how many times, a start looks again at a job another vault holds
/// but has not saved as running (it is finishing, or starting).
const JOB_SETTLE: Duration = Duration::from_millis(250);
const JOB_SETTLE_LOOKS: u32 = 20;

/// The job's durable state (JSON in the store's `meta`; no card data).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    requested: bool,
    started_at_unix_ms: i64,
    finished_at_unix_ms: i64,
    done: u64,
    failed: u64,
    /// Target versions of the pass the cursor belongs to.
    target: Option<(u32, u32)>,
    /// Hex of the last index position handled in that pass.
    cursor: Option<String>,
}

/// Where the job stands, as `vaultctl keys rewrap` shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub running: bool,
    pub done: u64,
    /// Records still under an older version, less those that failed.
    pub remaining: u64,
    pub failed: u64,
    pub rate_per_sec: f64,
    pub card_data_version: u32,
    pub fingerprint_version: u32,
    pub started_at_unix_ms: i64,
    pub finished_at_unix_ms: i64,
}

#[derive(Debug, Default)]
struct Live {
    saved: Saved,
    running: bool,
    /// Since this process started working on the job: for the rate.
    run_started: Option<Instant>,
    run_done: u64,
    /// Records rewritten in the current pass. A pass that rewrote some is followed by
    /// another from the start: a record sealed under an old version just before the
    /// vault learnt of a rotation can land behind the cursor.
    pass_rewritten: u64,
    /// Records that could not be rewrapped in this run (counted once).
    failed_tokens: std::collections::HashSet<String>,
}

#[derive(Debug)]
pub struct Rewrapper<S> {
    store: Arc<S>,
    keys: Arc<Keys>,
    settings: RewrapSettings,
    live: Mutex<Live>,
    shutdown: Mutex<Option<Shutdown>>,
    /// Records this process rewrote (for metrics: which vault runs the job).
    rewritten_here: std::sync::atomic::AtomicU64,
}

fn target_of(keys: &Keys) -> KeyVersions {
    let set = keys.snapshot();
    KeyVersions {
        card_data: set.card_data.active().0,
        fingerprint: set.fingerprint.active().0,
    }
}

impl<S: Store> Rewrapper<S> {
    pub fn new(store: Arc<S>, keys: Arc<Keys>, settings: RewrapSettings) -> Self {
        Self {
            store,
            keys,
            settings,
            live: Mutex::new(Live::default()),
            shutdown: Mutex::new(None),
            rewritten_here: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads the saved state and resumes a job that a stop or crash interrupted.
    /// Background work stops when `shutdown` fires.
    pub async fn resume(self: &Arc<Self>, shutdown: Shutdown) -> Result<(), VaultError> {
        *self
            .shutdown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(shutdown);
        let saved: Saved = match self.store.get_meta(STATE_KEY).await? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            None => Saved::default(),
        };
        let requested = saved.requested;
        self.live().saved = saved;
        if requested {
            tracing::info!("resuming the interrupted rewrap job");
            self.spawn(None, false);
        }
        Ok(())
    }

    /// Reads the job's state as the store has it (another vault may have moved it).
    async fn reload(&self) -> Result<(), VaultError> {
        if let Some(bytes) = self.store.get_meta(STATE_KEY).await? {
            self.live().saved = serde_json::from_slice(&bytes).unwrap_or_default();
        }
        Ok(())
    }

    /// Waits until this vault holds the job (vaults sharing a database run it one at a
    /// time, and a vault that dies lets another take it on). `None` once the job is no
    /// longer requested, unless this vault was `asked` to start it while another ran
    /// it: then the job it followed has ended, and it starts the pass it was asked for.
    async fn take_job(&self, asked: bool) -> Option<JobLock> {
        let mut waiting = false;
        loop {
            match self.store.lock_job(STATE_KEY).await {
                Ok(Some(lock)) => {
                    // The state as the last holder left it: running it on, or done.
                    let taken = match self.reload().await {
                        Ok(()) if self.live().saved.requested => Ok(true),
                        Ok(()) if asked => self.begin_pass().await.map(|()| true),
                        Ok(()) => Ok(false),
                        Err(e) => Err(e),
                    };
                    match taken {
                        Ok(true) => return Some(lock),
                        Ok(false) => return None,
                        Err(e) => {
                            tracing::warn!(error = %e, "rewrap state not read or saved; trying again")
                        }
                    }
                }
                Ok(None) if !waiting => {
                    tracing::info!(
                        "the rewrap job runs on another vault; this one takes over if it stops"
                    );
                    waiting = true;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot take the rewrap job; trying again"),
            }
            tokio::time::sleep(JOB_POLL).await;
            match self.reload().await {
                Ok(()) if !asked && !self.live().saved.requested => return None,
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "rewrap state not read"),
            }
        }
    }

    /// Starts the job (or joins the running one) and returns its status.
    pub async fn start(self: &Arc<Self>) -> Result<Status, VaultError> {
        if self.live().running {
            return Ok(self.status());
        }
        let mut looks = 0;
        let lock = loop {
            if let Some(lock) = self.store.lock_job(STATE_KEY).await? {
                break lock;
            }
            // Another vault on this database holds the job. Running: follow it (and
            // take over if it stops), without restarting its pass. Just finished (or
            // just taken, not yet saved as requested): its lock is let go or its state
            // saved within moments, so look again rather than follow a job that is
            // over and lose this request.
            self.reload().await?;
            if self.live().saved.requested {
                self.spawn(None, true);
                return Ok(self.status());
            }
            looks += 1;
            if looks == JOB_SETTLE_LOOKS {
                return Err(StoreError::Unavailable(
                    "another vault holds the rewrap job but has not saved it as running; \
                     try again"
                        .into(),
                )
                .into());
            }
            tokio::time::sleep(JOB_SETTLE).await;
        };
        self.begin_pass().await?;
        self.spawn(Some(lock), false);
        Ok(self.status())
    }

    /// Saves a new pass from the first record as requested; this vault holds the job.
    async fn begin_pass(&self) -> Result<(), VaultError> {
        let saved = {
            let mut live = self.live();
            live.saved = Saved {
                requested: true,
                started_at_unix_ms: now_unix_ms(),
                ..Saved::default()
            };
            live.saved.clone()
        };
        self.save(&saved).await?;
        tracing::info!("rewrap started");
        Ok(())
    }

    /// Runs the job in the background, with `lock` if this vault already holds it;
    /// `asked`: this vault was asked to start it (see `take_job`).
    fn spawn(self: &Arc<Self>, lock: Option<JobLock>, asked: bool) {
        let shutdown = self
            .shutdown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(shutdown) = shutdown else {
            return;
        };
        {
            let mut live = self.live();
            if live.running {
                return;
            }
            live.running = true;
            live.run_started = Some(Instant::now());
            live.run_done = 0;
            // A pass resumed mid-way (saved by an earlier run or process) may have
            // rewritten records before the cursor, and a record sealed under an old
            // version may have landed behind it meanwhile: it is followed by another
            // pass from the start, as a pass that rewrote some is.
            live.pass_rewritten = u64::from(live.saved.cursor.is_some());
            live.failed_tokens.clear();
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let work = async {
                let (mut lock, mut asked) = (lock, asked);
                loop {
                    let mut held = match lock.take() {
                        Some(held) => held,
                        None => match this.take_job(std::mem::take(&mut asked)).await {
                            Some(held) => held,
                            None => return,
                        },
                    };
                    tokio::select! {
                        () = this.run() => return,
                        // Its connection broke: another vault may take the job now, so
                        // this one stops and queues for it again.
                        () = held.lost() => tracing::warn!("the rewrap job's lock was lost with its database connection; waiting to take the job again"),
                    }
                }
            };
            tokio::select! {
                () = work => {}
                () = shutdown.wait() => {}
            }
            this.live().running = false;
        });
    }

    async fn save(&self, saved: &Saved) -> Result<(), VaultError> {
        let bytes = serde_json::to_vec(saved)
            .map_err(|e| VaultError::Store(StoreError::Engine(e.to_string())))?;
        Ok(self.store.put_meta(STATE_KEY, bytes).await?)
    }

    /// Records this process has rewritten since it started.
    pub fn rewritten_here(&self) -> u64 {
        self.rewritten_here
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn status(&self) -> Status {
        let target = target_of(&self.keys);
        let counts = self.store.version_counts();
        let remaining = KeyUse::ALL
            .into_iter()
            .map(|key_use| {
                counts
                    .iter()
                    .filter(|((u, v), _)| *u == key_use && *v != target.get(key_use))
                    .map(|(_, n)| n)
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        let live = self.live();
        let rate_per_sec = match live.run_started {
            Some(started) if live.running || live.run_done > 0 => {
                live.run_done as f64 / started.elapsed().as_secs_f64().max(0.001)
            }
            _ => 0.0,
        };
        Status {
            running: live.running,
            done: live.saved.done,
            // Failed records stay on their old version but are not left to do.
            remaining: remaining.saturating_sub(live.saved.failed),
            failed: live.saved.failed,
            rate_per_sec,
            card_data_version: target.card_data,
            fingerprint_version: target.fingerprint,
            started_at_unix_ms: live.saved.started_at_unix_ms,
            finished_at_unix_ms: live.saved.finished_at_unix_ms,
        }
    }

    async fn run(&self) {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.step(started).await {
                Ok(true) => backoff = Duration::from_millis(200),
                Ok(false) => return,
                Err(e) => {
                    // Storage or keyservice trouble: nothing is lost, try again later.
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "rewrap paused");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One batch. Returns false when no record is left to rewrap.
    async fn step(&self, started: Instant) -> Result<bool, VaultError> {
        let target = target_of(&self.keys);
        let cursor = {
            let live = self.live();
            match (&live.saved.target, &live.saved.cursor) {
                (Some(t), Some(c)) if *t == (target.card_data, target.fingerprint) => {
                    hex::decode(c).ok()
                }
                // A new pass (first, or the active versions changed meanwhile).
                _ => None,
            }
        };
        let batch = self
            .store
            .records_off_versions(target, cursor.as_deref(), self.settings.batch_size as usize)
            .await?;
        if batch.is_empty() {
            let another_pass = {
                let mut live = self.live();
                let another = cursor.is_some() && live.pass_rewritten > 0;
                if another {
                    live.pass_rewritten = 0;
                    live.saved.cursor = None;
                    live.saved.target = None;
                }
                another.then(|| live.saved.clone())
            };
            if let Some(saved) = another_pass {
                self.save(&saved).await?;
                return Ok(true);
            }
            let saved = {
                let mut live = self.live();
                live.saved.requested = false;
                live.saved.finished_at_unix_ms = now_unix_ms();
                live.saved.cursor = None;
                live.saved.target = None;
                live.saved.clone()
            };
            self.save(&saved).await?;
            self.keys.report_now();
            tracing::info!(
                done = saved.done,
                failed = saved.failed,
                card_data_version = target.card_data,
                fingerprint_version = target.fingerprint,
                "rewrap finished"
            );
            return Ok(false);
        }
        // The whole batch at once: the store's writer commits the rewrites together,
        // one synced write for many records instead of one each.
        let results = futures::future::join_all(
            batch
                .iter()
                .map(|(_, token)| self.rewrap_one(token, target)),
        )
        .await;
        let mut done = 0;
        let mut failed = Vec::new();
        let mut transient = None;
        for ((_, token), result) in batch.iter().zip(results) {
            match result {
                Ok(RewriteOutcome::Rewritten) => {
                    done += 1;
                    self.rewritten_here
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(RewriteOutcome::Changed) => {}
                // Not the record's fault: the batch is retried later (records already
                // moved are then skipped as unchanged).
                Err(e @ (VaultError::Keys(_) | VaultError::Store(_))) => {
                    transient.get_or_insert(e);
                }
                Err(e) => {
                    if self.live().failed_tokens.insert(token.as_str().to_owned()) {
                        failed.push((token, e));
                    }
                }
            }
        }
        if let Some(e) = transient {
            self.advance(target, None, done, 0).await?;
            return Err(e);
        }
        for (token, e) in &failed {
            tracing::error!(token = %token, error = %e, "record could not be rewrapped; left as it is");
        }
        let failed = failed.len() as u64;
        let last = batch.last().map(|(position, _)| position.clone());
        self.advance(target, last, done, failed).await?;
        // Throttle: the run's average stays at or below rate_per_sec.
        let run_done = self.live().run_done;
        let due = Duration::from_secs_f64(run_done as f64 / f64::from(self.settings.rate_per_sec));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        Ok(true)
    }

    /// Saves progress: counts and the cursor after the last handled record.
    async fn advance(
        &self,
        target: KeyVersions,
        last: Option<Vec<u8>>,
        done: u64,
        failed: u64,
    ) -> Result<(), VaultError> {
        let saved = {
            let mut live = self.live();
            live.run_done += done + failed;
            live.pass_rewritten += done;
            live.saved.done += done;
            live.saved.failed += failed;
            if let Some(last) = last {
                live.saved.target = Some((target.card_data, target.fingerprint));
                live.saved.cursor = Some(hex::encode(last));
            }
            live.saved.clone()
        };
        self.save(&saved).await
    }

    async fn rewrap_one(
        &self,
        token: &Token,
        target: KeyVersions,
    ) -> Result<RewriteOutcome, VaultError> {
        let Some(bytes) = self.store.get(token).await? else {
            return Ok(RewriteOutcome::Changed);
        };
        let stored = record::decode(&bytes)?;
        let old = stored.metadata.versions();
        if old == target {
            return Ok(RewriteOutcome::Changed);
        }
        if self.keys.snapshot().card_data.get(old.card_data).is_none() {
            return Err(VaultError::KeyUnavailable(old.card_data));
        }
        // The new key first: drawing it can wait for a keyservice round trip, and the
        // card is opened only when nothing stands between opening and sealing again.
        let (version, new_key) = self.keys.encryption_key(Aead::CardData).await?;
        let set = self.keys.snapshot();
        let old_key = set
            .card_data
            .get(old.card_data)
            .ok_or(VaultError::KeyUnavailable(old.card_data))?;
        let (fingerprint_version, fingerprint_key) = set.fingerprint.active();
        let mut metadata = stored.metadata.clone();
        metadata.key_version = version;
        let value = {
            let card = stored.open(token, old_key)?;
            metadata.fingerprint = Fingerprint {
                version: fingerprint_version,
                value: record::fingerprint(fingerprint_key, &metadata.tenant, &card.pan),
            };
            record::seal(token, &metadata, &card, &new_key)?
        };
        Ok(self
            .store
            .rewrite(Rewrite {
                token: token.clone(),
                expected: bytes,
                value,
                old_versions: old,
                new_versions: metadata.versions(),
                old_index_key: stored.metadata.index_key(),
                new_index_key: metadata.index_key(),
                old_indexes: stored.metadata.indexes(),
                new_indexes: metadata.indexes(),
            })
            .await?)
    }
}

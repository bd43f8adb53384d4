//! The vault's data keys: fetched from the keyservice, held in memory only (zeroized
//! on drop), never written anywhere. There is no local fallback key.
//!
//! After start-up a watch stream keeps the key set current (rotations, retirements and
//! destructions arrive within moments, and after a reconnect), and every AES-GCM
//! encryption draws on a budget leased from the keyservice, which records each lease
//! durably before handing it out: no key version is used for more encryptions than
//! its limit, across restarts and vaults (NIST SP 800-38D, 8.3).
//!
//! Every key set and lease carries the keyring's generation, which only grows. The vault
//! keeps the highest it accepted (`floor`, kept in its store across restarts) and sends
//! it with every request: a keyservice restored from an older keyring copy (whose GCM
//! budgets may be spent and whose destroyed keys may be back) refuses until two admins
//! accept the restore, and a key set or lease of an older generation is never used.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use envelope::SecretKey;
use runtime::shutdown::Shutdown;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use vault_proto::keys::v1 as pb;

use crate::config::KeyserviceSettings;
use crate::import::{Algorithm, ImportKey};

pub type Client = pb::key_service_client::KeyServiceClient<Channel>;

/// The versions of one key purpose that the vault may use, and which one is active.
#[derive(Debug, Clone)]
pub struct Versions {
    active: u32,
    keys: BTreeMap<u32, Arc<SecretKey>>,
}

impl Versions {
    /// The active version: the one new records use.
    pub fn active(&self) -> (u32, &Arc<SecretKey>) {
        // `from_wire` and `learn` guarantee the active version is present.
        let key = &self.keys[&self.active];
        (self.active, key)
    }

    pub fn get(&self, version: u32) -> Option<&Arc<SecretKey>> {
        self.keys.get(&version)
    }

    /// Every held version except the active one.
    pub fn older(&self) -> impl Iterator<Item = (u32, &Arc<SecretKey>)> {
        self.keys
            .iter()
            .filter(|(v, _)| **v != self.active)
            .map(|(v, k)| (*v, k))
    }

    /// Adopts a newer active version learnt from a lease before the watch stream
    /// announced it.
    fn learn(&mut self, version: u32, key: Arc<SecretKey>) {
        self.keys.entry(version).or_insert(key);
        self.active = self.active.max(version);
    }
}

/// Every key the vault holds at one moment.
#[derive(Debug, Clone)]
pub struct KeySet {
    /// The keyring generation this set is from.
    pub generation: u64,
    pub card_data: Versions,
    pub fingerprint: Versions,
    /// Seals CVCs held in memory (`cvc.rs`).
    pub cvc: Versions,
    /// Chains the audit log (`audit.rs`).
    pub audit: Versions,
    /// Opens sealed cards (`ops/sealed.rs`); empty from a keyservice that has none.
    pub intake: IntakeKeys,
    /// Opens import files (`import`); empty from a keyservice that has none.
    pub import: ImportKeys,
}

/// The import key versions the keyservice serves (active and decrypt-only, of both
/// algorithms), each as the OpenPGP key derived from its seed.
#[derive(Debug, Clone, Default)]
pub struct ImportKeys {
    active: Vec<Arc<ImportKey>>,
    all: Vec<Arc<ImportKey>>,
}

impl ImportKeys {
    /// The version of `algorithm` senders are given.
    pub fn active(&self, algorithm: Algorithm) -> Option<&Arc<ImportKey>> {
        self.active.iter().find(|k| k.algorithm() == algorithm)
    }

    /// Every version a file may be encrypted to.
    pub fn all(&self) -> &[Arc<ImportKey>] {
        &self.all
    }
}

/// The intake key versions the keyservice serves (active and decrypt-only), each as
/// the HPKE key pair derived from its material.
#[derive(Debug, Clone, Default)]
pub struct IntakeKeys {
    versions: Vec<IntakeVersion>,
}

#[derive(Debug, Clone)]
pub struct IntakeVersion {
    pub version: u32,
    /// When it stopped being active; `None` for the active version.
    pub deactivated_at_unix_ms: Option<i64>,
    pub key: Arc<envelope::sealed::IntakeKey>,
}

impl IntakeKeys {
    /// The version sealers are given.
    pub fn active(&self) -> Option<&IntakeVersion> {
        self.versions
            .iter()
            .find(|v| v.deactivated_at_unix_ms.is_none())
    }

    /// The version with key id `id` if sealed cards under it are accepted at `now`:
    /// the active one, or a previous one less than `overlap_ms` after it stopped being
    /// active.
    pub fn accepting(
        &self,
        id: &envelope::sealed::KeyId,
        now_unix_ms: i64,
        overlap_ms: i64,
    ) -> Option<&IntakeVersion> {
        self.versions.iter().find(|v| {
            v.key.id() == *id
                && v.deactivated_at_unix_ms
                    .is_none_or(|at| now_unix_ms < at.saturating_add(overlap_ms))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(
        "the keyservice refused this vault's identity ({0}); check its access.vault_identities"
    )]
    Refused(String),
    #[error("the keyservice answered with an unusable keyring: {0}")]
    Unusable(&'static str),
    #[error("shutdown requested before the keys were fetched")]
    ShutDown,
    #[error("invalid keyservice endpoint: {0}")]
    Endpoint(String),
    /// No encryption budget is left and the keyservice cannot lease more now.
    #[error("no encryption budget left and the keyservice cannot lease more: {0}")]
    NoBudget(String),
}

impl KeySet {
    pub fn from_wire(response: pb::GetKeysResponse) -> Result<Self, KeysError> {
        let generation = response.generation;
        let mut card_data = BTreeMap::new();
        let mut fingerprint = BTreeMap::new();
        let mut cvc = BTreeMap::new();
        let mut card_active = None;
        let mut fingerprint_active = None;
        let mut cvc_active = None;
        let mut audit = BTreeMap::new();
        let mut audit_active = None;
        let mut intake = IntakeKeys::default();
        let mut import = ImportKeys::default();
        for mut key in response.keys {
            // Into a zeroizing buffer first, so that no path below drops it in the clear.
            let material = zeroize::Zeroizing::new(std::mem::take(&mut key.material));
            let purpose = pb::KeyPurpose::try_from(key.purpose).ok();
            if purpose == Some(pb::KeyPurpose::Intake) {
                intake.versions.push(intake_version(&key, &material)?);
                continue;
            }
            let algorithm = match purpose {
                Some(pb::KeyPurpose::Import) => Some(Algorithm::Curve25519),
                Some(pb::KeyPurpose::ImportRsa) => Some(Algorithm::Rsa4096),
                _ => None,
            };
            if let Some(algorithm) = algorithm {
                let secret = SecretKey::from_slice(&material)
                    .map_err(|_| KeysError::Unusable("a key is not 32 bytes"))?;
                let derived = ImportKey::shared(key.version, algorithm, secret)
                    .map_err(|_| KeysError::Unusable("an import key could not be derived"))?;
                if key.state == pb::KeyState::Active as i32 {
                    import.active.push(Arc::clone(&derived));
                }
                import.all.push(derived);
                continue;
            }
            let (map, active) = match purpose {
                Some(pb::KeyPurpose::CardData) => (&mut card_data, &mut card_active),
                Some(pb::KeyPurpose::Fingerprint) => (&mut fingerprint, &mut fingerprint_active),
                Some(pb::KeyPurpose::Cvc) => (&mut cvc, &mut cvc_active),
                Some(pb::KeyPurpose::Audit) => (&mut audit, &mut audit_active),
                // Purposes this build does not know are not used.
                _ => continue,
            };
            let secret = SecretKey::from_slice(&material)
                .map_err(|_| KeysError::Unusable("a key is not 32 bytes"))?;
            if key.state == pb::KeyState::Active as i32 {
                if active.replace(key.version).is_some() {
                    return Err(KeysError::Unusable("two active versions of one purpose"));
                }
            } else if key.state != pb::KeyState::DecryptOnly as i32 {
                continue;
            }
            map.insert(key.version, Arc::new(secret));
        }
        Ok(Self {
            generation,
            card_data: Versions {
                active: card_active.ok_or(KeysError::Unusable("no active card-data key"))?,
                keys: card_data,
            },
            fingerprint: Versions {
                active: fingerprint_active
                    .ok_or(KeysError::Unusable("no active fingerprint key"))?,
                keys: fingerprint,
            },
            cvc: Versions {
                active: cvc_active.ok_or(KeysError::Unusable("no active cvc key"))?,
                keys: cvc,
            },
            audit: Versions {
                active: audit_active.ok_or(KeysError::Unusable("no active audit key"))?,
                keys: audit,
            },
            intake,
            import,
        })
    }
}

/// An intake version from the wire; retired and destroyed versions are never sent.
fn intake_version(key: &pb::KeyMaterial, material: &[u8]) -> Result<IntakeVersion, KeysError> {
    let secret = SecretKey::from_slice(material)
        .map_err(|_| KeysError::Unusable("a key is not 32 bytes"))?;
    let active = key.state == pb::KeyState::Active as i32;
    Ok(IntakeVersion {
        version: key.version,
        deactivated_at_unix_ms: (!active).then_some(key.deactivated_at_unix_ms),
        key: Arc::new(envelope::sealed::IntakeKey::derive(&secret)),
    })
}

/// Fetches the keys, retrying with exponential backoff while the keyservice is
/// unreachable or unavailable. A refusal of our identity is final.
async fn fetch_with_retry(
    settings: &KeyserviceSettings,
    endpoint: &Endpoint,
    floor: u64,
    shutdown: Shutdown,
) -> Result<KeySet, KeysError> {
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 1u32;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        match fetch_once(endpoint, floor).await {
            Ok(response) => {
                let keys = KeySet::from_wire(response)?;
                tracing::info!(
                    card_data_version = keys.card_data.active().0,
                    fingerprint_version = keys.fingerprint.active().0,
                    "fetched keys from the keyservice"
                );
                return Ok(keys);
            }
            Err(Retry::No(refused)) => return Err(refused),
            Err(Retry::Yes(reason)) => {
                tracing::warn!(
                    endpoint = %settings.endpoint,
                    attempt,
                    retry_in_ms = backoff.as_millis() as u64,
                    %reason,
                    "keyservice unreachable; not serving until keys are fetched"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return Err(KeysError::ShutDown),
        }
        backoff = (backoff * 2).min(settings.max_retry_backoff());
        attempt += 1;
    }
}

enum Retry {
    Yes(String),
    No(KeysError),
}

async fn fetch_once(
    endpoint: &tonic::transport::Endpoint,
    floor: u64,
) -> Result<pb::GetKeysResponse, Retry> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Retry::Yes(format!("cannot connect: {}", runtime::error_chain(&e))))?;
    let response = pb::key_service_client::KeyServiceClient::new(channel)
        .get_keys(pb::GetKeysRequest {
            generation_seen: floor,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => {
                Retry::No(KeysError::Refused(status.message().to_owned()))
            }
            // A restored keyring waiting for two admins says so: worth retrying.
            Code::FailedPrecondition => Retry::Yes(status.message().to_owned()),
            code => Retry::Yes(format!("keyservice answered {code:?}")),
        })?;
    if response.generation < floor {
        return Err(Retry::Yes(format!(
            "the keyservice's keyring generation {} is older than {floor}, which this vault \
             has used: it was restored from an older copy",
            response.generation
        )));
    }
    Ok(response)
}

/// AES-GCM purposes, whose encryptions draw on a leased budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aead {
    CardData,
    Cvc,
}

/// Encryptions leased under one version.
#[derive(Debug)]
struct Lease {
    version: u32,
    key: Arc<SecretKey>,
    remaining: u64,
    size: u64,
    /// The version's budget ends with this lease: the next one rotates, so it is not
    /// asked for in advance.
    last: bool,
}

#[derive(Debug, Default)]
struct Budget {
    leases: Mutex<VecDeque<Lease>>,
    /// One lease request at a time per purpose.
    refill: tokio::sync::Mutex<()>,
}

impl Budget {
    /// Takes one encryption from the oldest lease. The flag says it is time to lease
    /// the next block (a quarter of a lease left), so that callers rarely wait.
    fn try_take(&self) -> Option<((u32, Arc<SecretKey>), bool)> {
        let mut leases = lock(&self.leases);
        while leases.front().is_some_and(|l| l.remaining == 0) {
            leases.pop_front();
        }
        let lease = leases.front_mut()?;
        lease.remaining -= 1;
        let taken = (lease.version, Arc::clone(&lease.key));
        Some((taken, running_low(&leases)))
    }

    /// Whether it is still time to lease the next block (a refill asked for by an
    /// earlier take may have landed meanwhile).
    fn running_low(&self) -> bool {
        running_low(&lock(&self.leases))
    }

    /// Drops leases of versions that are no longer active.
    fn keep_version(&self, active: u32) {
        lock(&self.leases).retain(|l| l.version >= active);
    }

    fn newest_version(&self) -> Option<(u32, Arc<SecretKey>)> {
        lock(&self.leases)
            .iter()
            .max_by_key(|l| l.version)
            .map(|l| (l.version, Arc::clone(&l.key)))
    }
}

/// A quarter of a lease left, no next lease held yet, and the version's budget not
/// ending with this lease.
fn running_low(leases: &VecDeque<Lease>) -> bool {
    let Some(lease) = leases.front() else {
        return false;
    };
    let low_water = (lease.size / 4).max(1);
    let left: u64 = leases.iter().map(|l| l.remaining).sum();
    !lease.last && leases.len() < 2 && left < low_water
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The vault's link to its keys: the current key set, the encryption budgets, and
/// the keyservice connection that keeps both fresh.
#[derive(Debug)]
pub struct Keys {
    current: RwLock<Arc<KeySet>>,
    card_data: Budget,
    cvc: Budget,
    client: Client,
    watch_endpoint: Endpoint,
    connected: watch::Sender<bool>,
    settings: KeyserviceSettings,
    /// This vault's instance id in usage reports (set by `spawn_watch`).
    instance: std::sync::OnceLock<String>,
    /// What usage reports hold (set by `spawn_watch`).
    usage: std::sync::OnceLock<UsageSource>,
    /// Taken while a usage report is counted and sent (see `report_usage`).
    reporting: tokio::sync::Mutex<()>,
    /// Bumped whenever the key set changes (for the audit log).
    changes: watch::Sender<u64>,
    /// The highest keyring generation accepted (see the module's header).
    floor: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
struct UsageSource(Arc<dyn Fn() -> Vec<pb::VersionUsage> + Send + Sync>);

impl std::fmt::Debug for UsageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageSource")
    }
}

impl Keys {
    /// Fetches the keys, retrying with backoff until the keyservice answers or
    /// `shutdown` fires; a vault never starts cold without its keys.
    /// `floor`: the highest keyring generation this vault accepted before (from its
    /// store).
    pub async fn connect(
        settings: &KeyserviceSettings,
        tls: tonic::transport::ClientTlsConfig,
        floor: u64,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, KeysError> {
        let endpoint = Endpoint::from_shared(settings.endpoint.clone())
            .map_err(|e| KeysError::Endpoint(e.to_string()))?
            .connect_timeout(settings.connect_timeout())
            .tls_config(tls)
            .map_err(|e| KeysError::Endpoint(e.to_string()))?;
        // Unary calls get a deadline; the watch stream must not.
        let unary = endpoint.clone().timeout(settings.connect_timeout());
        let set = fetch_with_retry(settings, &unary, floor, shutdown).await?;
        let floor = floor.max(set.generation);
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(set)),
            card_data: Budget::default(),
            cvc: Budget::default(),
            client: Client::new(unary.connect_lazy()),
            watch_endpoint: endpoint,
            connected: watch::channel(true).0,
            settings: settings.clone(),
            instance: std::sync::OnceLock::new(),
            usage: std::sync::OnceLock::new(),
            reporting: tokio::sync::Mutex::new(()),
            changes: watch::channel(0).0,
            floor: std::sync::atomic::AtomicU64::new(floor),
        }))
    }

    /// The highest keyring generation accepted so far: the store keeps it (see
    /// `tasks::keep_keyring_generation`).
    pub fn generation_floor(&self) -> u64 {
        self.floor.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Accepts an answer of `generation` to a request that sent the floor `sent` (and
    /// raises the floor). Answers on different connections (leases, the watch) may
    /// arrive out of order: one is refused only if it is older than what its own
    /// request said this vault had used, which the keyservice itself refuses to serve.
    fn accept_generation(&self, generation: u64, sent: u64) -> bool {
        self.floor
            .fetch_max(generation, std::sync::atomic::Ordering::AcqRel);
        if generation < sent {
            tracing::error!(
                generation,
                floor = sent,
                "refused keys of an older keyring generation: the keyservice was restored from an older copy (two admins must accept the restore)"
            );
            return false;
        }
        true
    }

    /// The key set now. Cheap: callers take one per request.
    pub fn snapshot(&self) -> Arc<KeySet> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Fires after every change of the key set.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the watch stream to the keyservice is up.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    fn budget(&self, aead: Aead) -> &Budget {
        match aead {
            Aead::CardData => &self.card_data,
            Aead::Cvc => &self.cvc,
        }
    }

    /// The key and version for one new encryption, counted against the leased budget.
    pub async fn encryption_key(
        self: &Arc<Self>,
        aead: Aead,
    ) -> Result<(u32, Arc<SecretKey>), KeysError> {
        let budget = self.budget(aead);
        for _ in 0..3 {
            if let Some(taken) = self.take(aead) {
                return Ok(taken);
            }
            let _refill = budget.refill.lock().await;
            if let Some(taken) = self.take(aead) {
                return Ok(taken);
            }
            self.lease(aead).await?;
        }
        Err(KeysError::NoBudget(
            "the keyservice keeps leasing a version older than the active one".into(),
        ))
    }

    fn take(self: &Arc<Self>, aead: Aead) -> Option<(u32, Arc<SecretKey>)> {
        let (taken, low) = self.budget(aead).try_take()?;
        if low {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let budget = this.budget(aead);
                // Two takes in a row can each ask; the second finds the lease here.
                if let Ok(_refill) = budget.refill.try_lock()
                    && budget.running_low()
                    && let Err(e) = this.lease(aead).await
                {
                    tracing::warn!(error = %e, "could not lease the next encryption budget in advance");
                }
            });
        }
        Some(taken)
    }

    /// A client of the keyservice for calls besides keys, budgets and usage (the audit
    /// checkpoints, tenant jobs under dual control).
    pub fn keyservice(&self) -> Client {
        self.client.clone()
    }

    /// Leases a block of encryptions and adds it to the budget.
    async fn lease(&self, aead: Aead) -> Result<(), KeysError> {
        let purpose = match aead {
            Aead::CardData => pb::KeyPurpose::CardData,
            Aead::Cvc => pb::KeyPurpose::Cvc,
        };
        let sent = self.generation_floor();
        let response = self
            .client
            .clone()
            .lease_budget(pb::LeaseBudgetRequest {
                purpose: purpose as i32,
                generation_seen: sent,
            })
            .await
            .map_err(|status| {
                KeysError::NoBudget(format!("{:?}: {}", status.code(), status.message()))
            })?
            .into_inner();
        if !self.accept_generation(response.generation, sent) {
            return Err(KeysError::NoBudget(
                "the lease is from an older keyring generation".into(),
            ));
        }
        let mut key = response
            .key
            .ok_or(KeysError::Unusable("a lease without a key"))?;
        let material = zeroize::Zeroizing::new(std::mem::take(&mut key.material));
        let secret = Arc::new(
            SecretKey::from_slice(&material)
                .map_err(|_| KeysError::Unusable("a key is not 32 bytes"))?,
        );
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let versions = |set: &KeySet| match aead {
            Aead::CardData => set.card_data.active,
            Aead::Cvc => set.cvc.active,
        };
        if key.version < versions(&current) {
            // Leased before a rotation we already know of: not usable for new data.
            return Ok(());
        }
        if key.version > versions(&current) {
            // A rotation the watch has not announced yet: new data moves on at once.
            self.budget(aead).keep_version(key.version);
            let mut set = KeySet::clone(&current);
            match aead {
                Aead::CardData => set.card_data.learn(key.version, Arc::clone(&secret)),
                Aead::Cvc => set.cvc.learn(key.version, Arc::clone(&secret)),
            }
            *current = Arc::new(set);
        }
        let budget = self.budget(aead);
        lock(&budget.leases).push_back(Lease {
            version: key.version,
            key: secret,
            remaining: response.encryptions,
            size: response.encryptions,
            last: response.version_remaining == 0,
        });
        tracing::info!(
            purpose = purpose.as_str_name(),
            version = key.version,
            encryptions = response.encryptions,
            "leased an encryption budget"
        );
        Ok(())
    }

    /// Replaces the key set with one from the keyservice. Leases of versions that are
    /// no longer active are dropped; a version learnt from a lease that the set does
    /// not show yet is kept.
    fn apply(&self, mut set: KeySet, sent: u64) {
        if !self.accept_generation(set.generation, sent) {
            return;
        }
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (aead, versions) in [
            (Aead::CardData, &mut set.card_data),
            (Aead::Cvc, &mut set.cvc),
        ] {
            let budget = self.budget(aead);
            budget.keep_version(versions.active);
            if let Some((version, key)) = budget.newest_version()
                && version > versions.active
            {
                versions.learn(version, key);
            }
        }
        let changed = current.card_data.active != set.card_data.active
            || current.fingerprint.active != set.fingerprint.active
            || current.cvc.active != set.cvc.active
            || current.card_data.keys.len() != set.card_data.keys.len()
            || current.fingerprint.keys.len() != set.fingerprint.keys.len()
            || current.audit.active != set.audit.active;
        if changed {
            tracing::info!(
                card_data_version = set.card_data.active,
                fingerprint_version = set.fingerprint.active,
                cvc_version = set.cvc.active,
                card_data_versions_held = set.card_data.keys.len(),
                "key set updated from the keyservice"
            );
        }
        *current = Arc::new(set);
        drop(current);
        if changed {
            self.changes.send_modify(|generation| *generation += 1);
        }
    }

    /// Reports usage now, in the background (after a rewrap, so that `keys list` and
    /// destroy checks see the result without waiting for the next periodic report).
    pub fn report_now(self: &Arc<Self>) {
        let Some(usage) = self.usage.get().cloned() else {
            return;
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(status) = this.report_usage(usage.0.as_ref()).await {
                tracing::debug!(code = ?status.code(), "usage report not delivered");
            }
        });
    }

    /// Sends the keyservice how many records use each key version, counted now. One
    /// report at a time, counted in its turn: the keyservice keeps each vault's last
    /// report, so an older count (taken before a rewrap, say) must never arrive after a
    /// newer one, or a destroy would be refused until the next report.
    async fn report_usage(
        &self,
        usage: &(dyn Fn() -> Vec<pb::VersionUsage> + Send + Sync),
    ) -> Result<(), tonic::Status> {
        let _turn = self.reporting.lock().await;
        let usage = usage();
        let set = self.snapshot();
        let active = [
            (pb::KeyPurpose::CardData, set.card_data.active),
            (pb::KeyPurpose::Fingerprint, set.fingerprint.active),
            (pb::KeyPurpose::Cvc, set.cvc.active),
            // So that new audit keys are numbered above it after a keyring restore.
            (pb::KeyPurpose::Audit, set.audit.active),
        ]
        .map(|(purpose, version)| pb::VersionUsage {
            purpose: purpose as i32,
            version,
            records: 0,
        })
        .to_vec();
        self.client
            .clone()
            .report_usage(pb::ReportUsageRequest {
                usage,
                active,
                instance: self.instance.get().cloned().unwrap_or_default(),
            })
            .await
            .map(drop)
    }

    /// Follows the keyservice's key set until `shutdown`, reconnecting with backoff,
    /// and reports record usage on every (re)connection and then periodically.
    pub fn spawn_watch(
        self: &Arc<Self>,
        instance: String,
        usage: impl Fn() -> Vec<pb::VersionUsage> + Send + Sync + 'static,
        shutdown: Shutdown,
    ) {
        let _ = self.instance.set(instance);
        let usage = UsageSource(Arc::new(usage));
        let _ = self.usage.set(usage.clone());
        let this = Arc::clone(self);
        let reporter_usage = usage.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.settings.usage_report_interval());
            let stop = stop.wait();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(status) = this.report_usage(reporter_usage.0.as_ref()).await {
                            tracing::debug!(code = ?status.code(), "usage report not delivered");
                        }
                    }
                    _ = &mut stop => return,
                }
            }
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let stop = shutdown.wait();
            tokio::pin!(stop);
            let mut backoff = Duration::from_millis(200);
            loop {
                let started = std::time::Instant::now();
                let reason = tokio::select! {
                    reason = this.follow(usage.0.as_ref()) => reason,
                    _ = &mut stop => return,
                };
                let _ = this.connected.send_replace(false);
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(200);
                }
                tracing::warn!(
                    %reason,
                    retry_in_ms = backoff.as_millis() as u64,
                    "lost the keyservice watch; serving with the keys held"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return,
                }
                backoff = (backoff * 2).min(this.settings.max_retry_backoff());
            }
        });
    }

    /// One watch session: returns why it ended.
    async fn follow(&self, usage: &(dyn Fn() -> Vec<pb::VersionUsage> + Send + Sync)) -> String {
        let channel = match self.watch_endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => return format!("cannot connect: {}", runtime::error_chain(&e)),
        };
        let sent = self.generation_floor();
        let mut stream = match Client::new(channel)
            .watch_keys(pb::WatchKeysRequest {
                generation_seen: sent,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return format!("keyservice answered {:?}", status.code()),
        };
        loop {
            match stream.message().await {
                Ok(Some(response)) => match KeySet::from_wire(response) {
                    Ok(set) => {
                        self.apply(set, sent);
                        if !self.connected.send_replace(true) {
                            tracing::info!("keyservice watch (re)established");
                            if let Err(status) = self.report_usage(usage).await {
                                tracing::debug!(code = ?status.code(), "usage report not delivered");
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "ignored an unusable key set"),
                },
                Ok(None) => return "the keyservice ended the stream".into(),
                Err(status) => return format!("stream failed: {:?}", status.code()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(version: u32, size: u64, last: bool) -> Lease {
        Lease {
            version,
            key: Arc::new(SecretKey::from_slice(&[7; 32]).unwrap()),
            remaining: size,
            size,
            last,
        }
    }

    /// The next block is asked for once a quarter of a lease is left, and no longer
    /// once it has arrived: a second refill asked for before the first landed leases
    /// nothing more (the keyservice's budget is finite; a block leased twice is lost).
    #[test]
    fn a_refill_is_asked_for_at_low_water_and_not_once_it_has_landed() {
        let budget = Budget::default();
        lock(&budget.leases).push_back(lease(1, 8, false));
        let low: Vec<bool> = (0..8).map(|_| budget.try_take().unwrap().1).collect();
        assert_eq!(low, [false, false, false, false, false, false, true, true]);
        assert!(budget.running_low());
        lock(&budget.leases).push_back(lease(1, 8, false));
        assert!(!budget.running_low(), "the refill has landed");
        let (taken, low) = budget.try_take().unwrap();
        assert_eq!((taken.0, low), (1, false));
    }

    /// The last lease of a version is not refilled in advance: the next lease rotates.
    ///
    /// Control: NIST-800-38D-8.3 (docs/compliance.md).
    /// Attack: the vault asks for more budget than the version has left, so as to encrypt
    /// past its limit; the last lease is not refilled in advance.
    #[test]
    fn the_last_lease_of_a_version_is_not_refilled_in_advance() {
        let budget = Budget::default();
        lock(&budget.leases).push_back(lease(1, 4, true));
        assert!((0..4).all(|_| !budget.try_take().unwrap().1));
        assert!(budget.try_take().is_none());
        assert!(!budget.running_low());
    }
}

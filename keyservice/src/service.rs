//! The KeyService gRPC API. Deny by default: material only to vault identities,
//! metadata and lifecycle operations only to admin identities.
//!
//! Every change to the keyring is saved (sealed, atomically, synced) before it is
//! answered or announced to watching vaults, and recorded in the history.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use runtime::shutdown::Shutdown;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use vault_proto::keys::v1 as pb;

use crate::config::Lifecycle;
use crate::history::{History, NewEvent};
use crate::keyring::{Keyring, OperationKind, Proposal, ProposalState, Purpose, RootKey, State};
use crate::lifecycle::{self, Refusal};
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
    /// The last keyring save failed (health says degraded until one succeeds).
    save_failing: AtomicBool,
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

enum Role {
    Vault,
    Admin,
}

fn now_unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn refused(refusal: &Refusal) -> Status {
    match refusal {
        Refusal::NoSuchVersion { .. } | Refusal::NoSuchProposal(_) => {
            Status::not_found(refusal.to_string())
        }
        Refusal::SelfApproval => Status::permission_denied(refusal.to_string()),
        Refusal::NotAead(_) => Status::invalid_argument(refusal.to_string()),
        _ => Status::failed_precondition(refusal.to_string()),
    }
}

fn purpose_to_wire(purpose: Purpose) -> pb::KeyPurpose {
    match purpose {
        Purpose::CardData => pb::KeyPurpose::CardData,
        Purpose::Fingerprint => pb::KeyPurpose::Fingerprint,
        Purpose::Cvc => pb::KeyPurpose::Cvc,
        Purpose::Audit => pb::KeyPurpose::Audit,
    }
}

fn purpose_from_wire(purpose: i32) -> Result<Purpose, Status> {
    match pb::KeyPurpose::try_from(purpose) {
        Ok(pb::KeyPurpose::CardData) => Ok(Purpose::CardData),
        Ok(pb::KeyPurpose::Fingerprint) => Ok(Purpose::Fingerprint),
        Ok(pb::KeyPurpose::Cvc) => Ok(Purpose::Cvc),
        Ok(pb::KeyPurpose::Audit) => Ok(Purpose::Audit),
        _ => Err(Status::invalid_argument(
            "invalid purpose: must be card-data, fingerprint, cvc or audit",
        )),
    }
}

fn state_to_wire(state: State) -> pb::KeyState {
    match state {
        State::Active => pb::KeyState::Active,
        State::DecryptOnly => pb::KeyState::DecryptOnly,
        State::Retired => pb::KeyState::Retired,
        State::Destroyed => pb::KeyState::Destroyed,
    }
}

fn kind_to_wire(kind: OperationKind) -> pb::OperationKind {
    match kind {
        OperationKind::Destroy => pb::OperationKind::Destroy,
        OperationKind::Unretire => pb::OperationKind::Unretire,
        OperationKind::RootKeyChange => pb::OperationKind::RootKeyChange,
    }
}

fn proposal_to_wire(p: &Proposal, now: i64) -> pb::Proposal {
    let state = match p.state {
        ProposalState::Approved => pb::ProposalState::Approved,
        ProposalState::Pending if p.expired(now) => pb::ProposalState::Expired,
        ProposalState::Pending => pb::ProposalState::Pending,
    };
    pb::Proposal {
        id: p.id.clone(),
        kind: kind_to_wire(p.kind) as i32,
        purpose: p
            .purpose()
            .map_or(pb::KeyPurpose::Unspecified, purpose_to_wire) as i32,
        version: p.version,
        new_root_key_file: p.new_root_key_file.clone().unwrap_or_default(),
        proposed_by: p.proposed_by.clone(),
        proposed_at_unix_ms: p.proposed_at_unix_ms,
        expires_at_unix_ms: p.expires_at_unix_ms,
        state: state as i32,
        approved_by: p.approved_by.clone().unwrap_or_default(),
        approved_at_unix_ms: p.approved_at_unix_ms,
    }
}

impl Shared {
    pub(crate) fn new(
        keyring: Keyring,
        root: RootKey,
        settings: &crate::Settings,
        history: History,
    ) -> Self {
        Self {
            keyring: Mutex::new(keyring),
            root: Mutex::new(root),
            keyring_file: settings.keyring_file.clone(),
            root_key_file: settings.root_key_file.clone(),
            history,
            lifecycle: settings.lifecycle.clone(),
            changes: watch::channel(0).0,
            usage: Mutex::new(HashMap::new()),
            vault_identities: settings.access.vault_identities.clone(),
            metrics: Metrics::default(),
            save_failing: AtomicBool::new(false),
        }
    }

    /// Saves the keyring under `root`, keeping the save-failure metric and health.
    fn save(&self, keyring: &Keyring, root: &RootKey) -> Result<(), crate::keyring::KeyringError> {
        let saved = keyring.save(&self.keyring_file, root);
        if saved.is_err() {
            self.metrics.keyring_save_failures.inc();
        }
        self.save_failing.store(saved.is_err(), Ordering::Relaxed);
        saved
    }

    /// Sets the gauges from the keyring, the proposals and the usage reports.
    fn refresh_gauges(&self, metrics: &Metrics) {
        let now = now_unix_ms();
        {
            let keyring = lock(&self.keyring);
            metrics.encryptions_leased.clear();
            for purpose in Purpose::ALL {
                let name = purpose.name();
                for state in [
                    State::Active,
                    State::DecryptOnly,
                    State::Retired,
                    State::Destroyed,
                ] {
                    let count = keyring
                        .versions()
                        .iter()
                        .filter(|v| v.purpose == purpose && v.state == state)
                        .count();
                    metrics
                        .key_versions
                        .get_or_create(&crate::metrics::StateLabels {
                            purpose: name,
                            state: lifecycle::state_name(state),
                        })
                        .set(count as i64);
                }
                metrics
                    .active_versions
                    .get_or_create(&crate::metrics::PurposeLabels { purpose: name })
                    .set(keyring.active(purpose).map_or(0, |v| i64::from(v.version)));
            }
            for v in keyring.versions() {
                if v.purpose.is_aead() && v.state != State::Destroyed {
                    metrics
                        .encryptions_leased
                        .get_or_create(&crate::metrics::LeasedLabels {
                            purpose: v.purpose.name(),
                            version: v.version,
                            state: lifecycle::state_name(v.state),
                        })
                        .set(i64::try_from(v.encryptions_leased).unwrap_or(i64::MAX));
                }
            }
            let pending = keyring
                .proposals
                .iter()
                .filter(|p| p.state == ProposalState::Pending && !p.expired(now))
                .count();
            metrics.proposals_pending.set(pending as i64);
        }
        metrics
            .encryption_limit
            .set(i64::try_from(self.lifecycle.max_encryptions_per_version).unwrap_or(i64::MAX));
        let max_age_ms = (self.lifecycle.usage_report_max_age_secs * 1000) as i64;
        let (mut fresh, mut stale) = (0, 0);
        for report in lock(&self.usage).values() {
            if now.saturating_sub(report.at_unix_ms) <= max_age_ms {
                fresh += 1;
            } else {
                stale += 1;
            }
        }
        for (freshness, count) in [("fresh", fresh), ("stale", stale)] {
            metrics
                .usage_reporters
                .get_or_create(&crate::metrics::FreshnessLabels { freshness })
                .set(count);
        }
    }

    /// Applies `change` to the keyring and saves it. If the save fails, the keyring
    /// is reloaded from disk, so memory never runs ahead of what is durable.
    fn mutate<T>(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let mut keyring = lock(&self.keyring);
        let root = lock(&self.root);
        // The state before the change, to restore if it cannot be made durable.
        let before = keyring
            .seal(&root)
            .map_err(|_| Status::internal("the keyring could not be sealed"))?;
        drop(root);
        let result = change(&mut keyring)?;
        keyring.prune_proposals(now_unix_ms(), KEEP_PROPOSALS_MS);
        let root = lock(&self.root);
        if let Err(error) = self.save(&keyring, &root) {
            tracing::error!(error = %error, "cannot save the keyring; change undone");
            if let Ok(unchanged) = Keyring::open(&before, &root) {
                *keyring = unchanged;
            }
            return Err(Status::unavailable(
                "the keyring could not be saved; nothing was changed",
            ));
        }
        Ok(result)
    }

    fn announce(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Records an event; a failure to record is logged and reported to the caller.
    fn record(&self, event: NewEvent<'_>) -> Result<(), Status> {
        self.history
            .append(event, now_unix_ms())
            .map(drop)
            .map_err(|error| {
                tracing::error!(error = %error, "cannot write the key history");
                Status::internal("the operation was done but the key history could not be written")
            })
    }

    /// Records a refusal and turns it into the caller's status.
    fn refuse(&self, mut event: NewEvent<'_>, refusal: &Refusal) -> Status {
        event.outcome = format!("refused: {refusal}");
        let _ = self.record(event);
        refused(refusal)
    }

    fn snapshot(&self) -> pb::GetKeysResponse {
        let keyring = lock(&self.keyring);
        let keys = keyring
            .versions()
            .iter()
            .filter(|v| matches!(v.state, State::Active | State::DecryptOnly))
            .filter_map(|v| {
                Some(pb::KeyMaterial {
                    purpose: purpose_to_wire(v.purpose) as i32,
                    version: v.version,
                    state: state_to_wire(v.state) as i32,
                    material: v.material.as_ref()?.expose_secret().to_vec(),
                })
            })
            .collect();
        pb::GetKeysResponse { keys }
    }

    /// Rotates `purpose` (saved, recorded, announced). `reason` labels the metric:
    /// `manual` or `scheduled`.
    fn rotate(
        &self,
        purpose: Purpose,
        actor: &str,
        reason: &'static str,
        detail: String,
    ) -> Result<u32, Status> {
        let version = self.mutate(|keyring| {
            keyring
                .rotate(purpose, now_unix_ms())
                .map_err(|_| Status::internal("the system random number generator failed"))
        })?;
        tracing::info!(purpose = purpose.name(), version, %detail, "rotated");
        self.metrics.rotated(purpose.name(), reason);
        self.announce();
        self.record(NewEvent {
            actor,
            action: "rotate",
            purpose: Some(purpose.name()),
            version,
            outcome: "ok".into(),
            detail,
        })?;
        Ok(version)
    }

    /// Rotates every purpose whose active version is older than `rotate_after_days`.
    pub(crate) fn rotate_due(&self) {
        let Some(days) = self.lifecycle.rotate_after_days else {
            return;
        };
        let max_age_ms = i64::from(days) * 24 * 60 * 60 * 1000;
        let due = lock(&self.keyring).due_for_rotation(now_unix_ms(), max_age_ms);
        for purpose in due {
            let detail = format!("scheduled: rotate_after_days = {days}");
            if let Err(status) = self.rotate(purpose, "keyservice", "scheduled", detail) {
                tracing::error!(purpose = purpose.name(), error = %status.message(), "scheduled rotation failed");
            }
        }
    }

    /// A destroy is allowed only when every vault that reports usage has reported
    /// recently and none holds a record on the version.
    fn check_unused(
        &self,
        keyring: &Keyring,
        purpose: Purpose,
        version: u32,
        now: i64,
    ) -> Result<(), Refusal> {
        keyring.check_destroy(purpose, version)?;
        let deactivated = keyring.version(purpose, version)?.deactivated_at_unix_ms;
        let grace_ms = (self.lifecycle.destroy_grace_secs * 1000) as i64;
        let reports = lock(&self.usage);
        if let Some(silent) = self
            .vault_identities
            .iter()
            .find(|id| !reports.keys().any(|(reporter, _)| reporter == *id))
        {
            return Err(Refusal::UsageUnknown(format!(
                "vault identity {silent} has not reported key usage since the keyservice \
                 started; a destroy needs a fresh report from every vault (running vaults \
                 report every few seconds)"
            )));
        }
        let max_age_ms = (self.lifecycle.usage_report_max_age_secs * 1000) as i64;
        let mut records = 0;
        for ((identity, _), report) in reports.iter() {
            let age_ms = now.saturating_sub(report.at_unix_ms);
            if age_ms > max_age_ms {
                return Err(Refusal::UsageUnknown(format!(
                    "vault {identity} last reported key usage {} s ago (limit {} s); a destroy \
                     needs fresh reports from every vault. Is it running?",
                    age_ms / 1000,
                    self.lifecycle.usage_report_max_age_secs
                )));
            }
            records += report
                .records
                .get(&(purpose, version))
                .copied()
                .unwrap_or(0);
        }
        if records > 0 {
            return Err(Refusal::InUse {
                purpose: purpose.name(),
                version,
                records,
            });
        }
        // A report counts committed records only: one sealed under the version just
        // before it stopped being active may still be on its way to the disk.
        for ((identity, _), report) in reports.iter() {
            if report.active.get(&purpose) == Some(&version)
                || report.at_unix_ms < deactivated.saturating_add(grace_ms)
            {
                let wait_s = (deactivated + grace_ms - now).max(1000) / 1000;
                return Err(Refusal::UsageUnknown(format!(
                    "{} version {version} stopped being active too recently: records sealed \
                     under it may still be in flight at vault {identity}; try again in about \
                     {wait_s} s (lifecycle.destroy_grace_secs = {})",
                    purpose.name(),
                    self.lifecycle.destroy_grace_secs
                )));
            }
        }
        Ok(())
    }

    fn records_using(&self, purpose: Purpose, version: u32) -> u64 {
        lock(&self.usage)
            .values()
            .map(|r| r.records.get(&(purpose, version)).copied().unwrap_or(0))
            .sum()
    }

    /// Carries out an approved root key change: stage the new key beside the old one,
    /// save the keyring under it, then move it into place. `bind` finishes a change
    /// that a crash interrupted.
    fn change_root_key(&self, keyring: &Keyring, new_root_file: &str) -> Result<(), Status> {
        let new_root = RootKey::from_file(std::path::Path::new(new_root_file)).map_err(|e| {
            Status::failed_precondition(format!("cannot read the new root key: {e}"))
        })?;
        let staged = crate::pending_root_key_file(&self.root_key_file);
        let failed = |e: crate::keyring::KeyringError| {
            tracing::error!(error = %e, "root key change failed");
            Status::unavailable(format!("root key change failed, nothing changed: {e}"))
        };
        new_root.write_file(&staged).map_err(failed)?;
        if let Err(e) = self.save(keyring, &new_root) {
            let _ = std::fs::remove_file(&staged);
            return Err(failed(e));
        }
        // The keyring is durably sealed under the new key: from here on it is the root
        // key, whether or not the staged file reaches its place now (the next start
        // finishes the move from the staged copy).
        *lock(&self.root) = new_root;
        if let Err(e) = std::fs::rename(&staged, &self.root_key_file)
            .and_then(|()| crate::keyring::sync_parent(&self.root_key_file))
        {
            tracing::error!(
                error = %e,
                staged = %staged.display(),
                "the change is durable but the new root key file is still staged; the next \
                 start moves it into place"
            );
        }
        Ok(())
    }
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

    fn authorize<T>(&self, request: &Request<T>, role: Role) -> Result<String, Status> {
        let Some(identity) = runtime::tls::peer_identity(request) else {
            tracing::warn!("refused a call without a client certificate identity");
            return Err(Status::unauthenticated("a client certificate is required"));
        };
        let allowed = match role {
            Role::Vault => &self.vault_identities,
            Role::Admin => &self.admin_identities,
        };
        if allowed.contains(&identity) {
            tracing::Span::current().record("caller", identity.as_str());
            Ok(identity)
        } else {
            tracing::warn!(caller = %identity, "permission denied");
            Err(Status::permission_denied(
                "this identity may not call this method",
            ))
        }
    }

    fn version_info(
        &self,
        keyring: &Keyring,
        purpose: Purpose,
        version: u32,
    ) -> pb::KeyVersionInfo {
        let limit = if purpose.is_aead() {
            self.shared.lifecycle.max_encryptions_per_version
        } else {
            0
        };
        let v = keyring.version(purpose, version).ok();
        pb::KeyVersionInfo {
            purpose: purpose_to_wire(purpose) as i32,
            version,
            state: v.map_or(pb::KeyState::Unspecified, |v| state_to_wire(v.state)) as i32,
            created_at_unix_ms: v.map_or(0, |v| v.created_at_unix_ms),
            encryptions_leased: v.map_or(0, |v| v.encryptions_leased),
            encryption_limit: limit,
            records: self.shared.records_using(purpose, version),
        }
    }

    /// Runs one call in its span and counts it (method, status code, latency).
    async fn observe<T>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = std::time::Instant::now();
        let result = call.instrument(span(method)).await;
        self.shared
            .metrics
            .call(method, code_of(&result), started.elapsed());
        result
    }
}

fn code_of<T>(result: &Result<T, Status>) -> tonic::Code {
    result
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok)
}

fn span(method: &'static str) -> tracing::Span {
    tracing::info_span!("rpc", method, caller = tracing::field::Empty)
}

type KeyStream = Pin<Box<dyn Stream<Item = Result<pb::GetKeysResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyServiceImpl {
    async fn get_keys(
        &self,
        request: Request<pb::GetKeysRequest>,
    ) -> Result<Response<pb::GetKeysResponse>, Status> {
        self.observe("GetKeys", async {
            self.authorize(&request, Role::Vault)?;
            let keys = self.shared.snapshot();
            tracing::info!(versions = keys.keys.len(), "served key versions");
            Ok(Response::new(keys))
        })
        .await
    }

    type WatchKeysStream = KeyStream;

    async fn watch_keys(
        &self,
        request: Request<pb::WatchKeysRequest>,
    ) -> Result<Response<KeyStream>, Status> {
        let span = span("WatchKeys");
        let _entered = span.enter();
        // Counted when the stream opens (or is refused); it then lasts for hours.
        let started = std::time::Instant::now();
        let authorized = self.authorize(&request, Role::Vault);
        self.shared
            .metrics
            .call("WatchKeys", code_of(&authorized), started.elapsed());
        authorized?;
        tracing::info!("a vault is watching the key set");
        let shared = Arc::clone(&self.shared);
        // The current set at once, then one after every change. Ends at shutdown so
        // that graceful shutdown is not held up by open streams.
        let stream = tokio_stream::wrappers::WatchStream::new(self.shared.changes.subscribe())
            .map(move |_| Ok(shared.snapshot()))
            .take_until(self.shutdown.clone().wait());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lease_budget(
        &self,
        request: Request<pb::LeaseBudgetRequest>,
    ) -> Result<Response<pb::LeaseBudgetResponse>, Status> {
        self.observe("LeaseBudget", async {
            let caller = self.authorize(&request, Role::Vault)?;
            let purpose = purpose_from_wire(request.get_ref().purpose)?;
            let lifecycle = &self.shared.lifecycle;
            let lease = self.shared.mutate(|keyring| {
                keyring
                    .lease(
                        purpose,
                        lifecycle.max_encryptions_per_version,
                        lifecycle.lease_size,
                        now_unix_ms(),
                    )
                    .map_err(|e| match e {
                        lifecycle::LeaseError::Refused(r) => refused(&r),
                        lifecycle::LeaseError::Random => {
                            Status::internal("the system random number generator failed")
                        }
                    })
            })?;
            let version = lease.version;
            if lease.rotated {
                tracing::info!(
                    purpose = purpose.name(),
                    version,
                    "encryption budget spent: rotated"
                );
                self.shared.metrics.rotated(purpose.name(), "budget");
                self.shared.announce();
                self.shared.record(NewEvent {
                    actor: "keyservice",
                    action: "rotate",
                    purpose: Some(purpose.name()),
                    version,
                    outcome: "ok".into(),
                    detail: "the previous version's encryption budget is spent".into(),
                })?;
            }
            self.shared.record(NewEvent {
                actor: &caller,
                action: "lease",
                purpose: Some(purpose.name()),
                version,
                outcome: "ok".into(),
                detail: format!("{} encryptions", lease.granted),
            })?;
            let keyring = lock(&self.shared.keyring);
            let v = keyring.version(purpose, version).map_err(|r| refused(&r))?;
            let material = v
                .material
                .as_ref()
                .ok_or_else(|| Status::internal("the active version has no material"))?;
            Ok(Response::new(pb::LeaseBudgetResponse {
                key: Some(pb::KeyMaterial {
                    purpose: purpose_to_wire(purpose) as i32,
                    version,
                    state: state_to_wire(v.state) as i32,
                    material: material.expose_secret().to_vec(),
                }),
                encryptions: lease.granted,
                version_remaining: lease.remaining,
            }))
        })
        .await
    }

    async fn report_usage(
        &self,
        request: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        self.observe("ReportUsage", async {
            let caller = self.authorize(&request, Role::Vault)?;
            let request = request.into_inner();
            let mut records = BTreeMap::new();
            for usage in request.usage {
                let purpose = purpose_from_wire(usage.purpose)?;
                *records.entry((purpose, usage.version)).or_insert(0) += usage.records;
            }
            let mut active = BTreeMap::new();
            for version in request.active {
                active.insert(purpose_from_wire(version.purpose)?, version.version);
            }
            tracing::debug!(versions = records.len(), "usage reported");
            lock(&self.shared.usage).insert(
                (caller, request.instance),
                UsageReport {
                    at_unix_ms: now_unix_ms(),
                    records,
                    active,
                },
            );
            Ok(Response::new(pb::ReportUsageResponse {}))
        })
        .await
    }

    async fn list_key_versions(
        &self,
        request: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        self.observe("ListKeyVersions", async {
            self.authorize(&request, Role::Admin)?;
            let keyring = lock(&self.shared.keyring);
            let versions = keyring
                .versions()
                .iter()
                .map(|v| self.version_info(&keyring, v.purpose, v.version))
                .collect();
            let reporters = lock(&self.shared.usage)
                .iter()
                .map(|((identity, instance), report)| pb::UsageReporter {
                    identity: identity.clone(),
                    reported_at_unix_ms: report.at_unix_ms,
                    instance: instance.clone(),
                })
                .collect();
            Ok(Response::new(pb::ListKeyVersionsResponse {
                versions,
                reporters,
            }))
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.observe("RotateKey", async {
            let caller = self.authorize(&request, Role::Admin)?;
            let purpose = purpose_from_wire(request.get_ref().purpose)?;
            let version = self
                .shared
                .rotate(purpose, &caller, "manual", "manual".into())?;
            let keyring = lock(&self.shared.keyring);
            Ok(Response::new(pb::RotateKeyResponse {
                created: Some(self.version_info(&keyring, purpose, version)),
            }))
        })
        .await
    }

    async fn retire_key(
        &self,
        request: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        self.observe("RetireKey", async {
            let caller = self.authorize(&request, Role::Admin)?;
            let purpose = purpose_from_wire(request.get_ref().purpose)?;
            let version = request.get_ref().version;
            let event = NewEvent {
                actor: &caller,
                action: "retire",
                purpose: Some(purpose.name()),
                version,
                ..Default::default()
            };
            let mut refusal = None;
            self.shared
                .mutate(|keyring| {
                    keyring.retire(purpose, version).map_err(|r| {
                        let status = refused(&r);
                        refusal = Some(r);
                        status
                    })
                })
                .map_err(|status| match &refusal {
                    Some(r) => self.shared.refuse(event.clone(), r),
                    None => status,
                })?;
            self.shared.announce();
            self.shared.record(NewEvent {
                outcome: "ok".into(),
                ..event
            })?;
            tracing::info!(purpose = purpose.name(), version, "retired");
            Ok(Response::new(pb::RetireKeyResponse {}))
        })
        .await
    }

    async fn propose_operation(
        &self,
        request: Request<pb::ProposeOperationRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.observe("ProposeOperation", async {
            let caller = self.authorize(&request, Role::Admin)?;
            let request = request.into_inner();
            let now = now_unix_ms();
            let kind = match pb::OperationKind::try_from(request.kind) {
                Ok(pb::OperationKind::Destroy) => OperationKind::Destroy,
                Ok(pb::OperationKind::Unretire) => OperationKind::Unretire,
                Ok(pb::OperationKind::RootKeyChange) => OperationKind::RootKeyChange,
                _ => {
                    return Err(Status::invalid_argument(
                        "invalid kind: must be destroy, unretire or root-key-change",
                    ));
                }
            };
            let (purpose, new_root_key_file) = match kind {
                OperationKind::RootKeyChange => {
                    if request.new_root_key_file.is_empty() {
                        return Err(Status::invalid_argument(
                            "invalid new_root_key_file: required for a root key change",
                        ));
                    }
                    // Checked now so that a typo fails before a second admin is asked.
                    RootKey::from_file(std::path::Path::new(&request.new_root_key_file)).map_err(
                        |e| {
                            Status::failed_precondition(format!("cannot use the new root key: {e}"))
                        },
                    )?;
                    (None, Some(request.new_root_key_file))
                }
                _ => (Some(purpose_from_wire(request.purpose)?), None),
            };
            let mut id_bytes = [0u8; 6];
            envelope::fill_random(&mut id_bytes)
                .map_err(|_| Status::internal("the system random number generator failed"))?;
            let proposal = Proposal {
                id: format!("p-{}", hex::encode(id_bytes)),
                kind,
                purpose: purpose.map(|p| p.name().to_owned()),
                version: if purpose.is_some() {
                    request.version
                } else {
                    0
                },
                new_root_key_file,
                proposed_by: caller.clone(),
                proposed_at_unix_ms: now,
                expires_at_unix_ms: now
                    + (self.shared.lifecycle.approval_window_secs * 1000) as i64,
                state: ProposalState::Pending,
                approved_by: None,
                approved_at_unix_ms: 0,
            };
            let event = NewEvent {
                actor: &caller,
                action: "propose",
                purpose: purpose.map(Purpose::name),
                version: proposal.version,
                detail: format!("{} {}", lifecycle::kind_name(kind), proposal.id),
                ..Default::default()
            };
            if let (OperationKind::Destroy, Some(purpose)) = (kind, purpose) {
                // Fail fast; checked again, authoritatively, at approval.
                let checked = {
                    let keyring = lock(&self.shared.keyring);
                    self.shared
                        .check_unused(&keyring, purpose, proposal.version, now)
                };
                if let Err(r) = checked {
                    return Err(self.shared.refuse(event, &r));
                }
            }
            let mut refusal = None;
            let stored = self
                .shared
                .mutate(|keyring| match keyring.propose(proposal) {
                    Ok(p) => Ok(proposal_to_wire(&p, now)),
                    Err(r) => {
                        let status = refused(&r);
                        refusal = Some(r);
                        Err(status)
                    }
                })
                .map_err(|status| match &refusal {
                    Some(r) => self.shared.refuse(event.clone(), r),
                    None => status,
                })?;
            self.shared.record(NewEvent {
                outcome: "ok".into(),
                ..event
            })?;
            tracing::info!(id = %stored.id, kind = lifecycle::kind_name(kind), "proposed");
            Ok(Response::new(stored))
        })
        .await
    }

    async fn approve_operation(
        &self,
        request: Request<pb::ApproveOperationRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.observe("ApproveOperation", async {
            let caller = self.authorize(&request, Role::Admin)?;
            let id = request.into_inner().id;
            let now = now_unix_ms();
            let shared = &self.shared;
            let mut event = NewEvent {
                actor: &caller,
                action: "approve",
                detail: id.clone(),
                ..Default::default()
            };
            // Checked and carried out under the keyring lock: two approvals of the
            // same proposal cannot both pass.
            let mut keyring = lock(&shared.keyring);
            let proposal = keyring
                .check_approval(&id, &caller, now)
                .map_err(|r| shared.refuse(event.clone(), &r))?;
            // The state before, to restore if the change cannot be made durable.
            let before = keyring
                .seal(&lock(&shared.root))
                .map_err(|_| Status::internal("the keyring could not be sealed"))?;
            event.purpose = proposal.purpose().map(Purpose::name);
            event.version = proposal.version;
            event.detail = format!("{} {id}", lifecycle::kind_name(proposal.kind));
            // Irreversible operations are recorded before they are carried out; if the
            // history cannot be written, nothing is done.
            shared.record(NewEvent {
                outcome: "started".into(),
                ..event.clone()
            })?;
            match (proposal.kind, proposal.purpose()) {
                (OperationKind::Destroy, Some(purpose)) => {
                    shared
                        .check_unused(&keyring, purpose, proposal.version, now)
                        .and_then(|()| keyring.destroy(purpose, proposal.version))
                        .map_err(|r| shared.refuse(event.clone(), &r))?;
                }
                (OperationKind::Unretire, Some(purpose)) => {
                    keyring
                        .unretire(purpose, proposal.version)
                        .map_err(|r| shared.refuse(event.clone(), &r))?;
                }
                (OperationKind::RootKeyChange, _) => {}
                _ => return Err(Status::internal("stored proposal names no key purpose")),
            }
            keyring.mark_approved(&id, &caller, now);
            let saved = match (proposal.kind, &proposal.new_root_key_file) {
                (OperationKind::RootKeyChange, Some(file)) => shared.change_root_key(&keyring, file),
                _ => shared
                    .save(&keyring, &lock(&shared.root))
                    .map_err(|e| {
                        tracing::error!(error = %e, "cannot save the keyring");
                        Status::unavailable("the keyring could not be saved; nothing was changed")
                    }),
            };
            if let Err(status) = saved {
                if let Ok(unchanged) = Keyring::open(&before, &lock(&shared.root)) {
                    *keyring = unchanged;
                }
                return Err(status);
            }
            let approved = keyring
                .proposals
                .iter()
                .find(|p| p.id == id)
                .map(|p| proposal_to_wire(p, now))
                .ok_or_else(|| Status::internal("approved proposal vanished"))?;
            drop(keyring);
            shared.announce();
            shared.record(NewEvent {
                outcome: "ok".into(),
                ..event
            })?;
            tracing::info!(%id, kind = lifecycle::kind_name(proposal.kind), "approved and carried out");
            Ok(Response::new(approved))
        })
        .await
    }

    async fn list_proposals(
        &self,
        request: Request<pb::ListProposalsRequest>,
    ) -> Result<Response<pb::ListProposalsResponse>, Status> {
        self.observe("ListProposals", async {
            self.authorize(&request, Role::Admin)?;
            let now = now_unix_ms();
            let proposals = lock(&self.shared.keyring)
                .proposals
                .iter()
                .map(|p| proposal_to_wire(p, now))
                .collect();
            Ok(Response::new(pb::ListProposalsResponse { proposals }))
        })
        .await
    }

    async fn key_history(
        &self,
        request: Request<pb::KeyHistoryRequest>,
    ) -> Result<Response<pb::KeyHistoryResponse>, Status> {
        self.observe("KeyHistory", async {
            self.authorize(&request, Role::Admin)?;
            let events = self
                .shared
                .history
                .read(request.get_ref().limit as usize)
                .map_err(|e| Status::internal(format!("cannot read the key history: {e}")))?
                .into_iter()
                .map(|e| pb::KeyEvent {
                    sequence: e.sequence,
                    at_unix_ms: e.at_unix_ms,
                    purpose: Purpose::ALL
                        .into_iter()
                        .find(|p| Some(p.name()) == e.purpose.as_deref())
                        .map_or(pb::KeyPurpose::Unspecified, purpose_to_wire)
                        as i32,
                    actor: e.actor,
                    action: e.action,
                    version: e.version,
                    outcome: e.outcome,
                    detail: e.detail,
                })
                .collect();
            Ok(Response::new(pb::KeyHistoryResponse { events }))
        })
        .await
    }
}

impl runtime::admin::Observed for Shared {
    fn metrics(&self) -> String {
        self.metrics.scrape(|metrics| self.refresh_gauges(metrics))
    }

    fn health(&self) -> (bool, String) {
        if self.save_failing.load(Ordering::Relaxed) {
            (
                true,
                "degraded: the last keyring save failed; rotations, leases and approvals \
                 are refused until the keyring can be saved"
                    .into(),
            )
        } else {
            (true, "serving".into())
        }
    }
}

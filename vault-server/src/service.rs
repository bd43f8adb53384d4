//! The Vault gRPC API. Each handler authorizes the caller, converts the wire request
//! into validated domain types, and nothing below it sees a prost type.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use runtime::admin::code_name;
use runtime::now_unix_ms;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use vault_proto::vault::v1 as pb;

use crate::audit::{AuditEvent, Audited, Auditor};
use crate::card::{CardData, Today, Violation};
use crate::cvc::CvcStore;
use crate::error::VaultError;
use crate::forward::template::{Encoding, Field, Template};
use crate::forward::{Outbound, Processors, idempotency};
use crate::keys::{Aead, KeySet, Keys};
use crate::lockout::Lockout;
use crate::policy::{Caller, Denied, Permission, Policy};
use crate::record::{self, Fingerprint, Metadata, StoredRecord};
use crate::rewrap::Rewrapper;
use crate::store::{Delete, DeleteOutcome, InsertOutcome, NewRecord, Store};
use crate::token::Token;

/// Response (and error) metadata key carrying the request id that the server logs.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The longest retention a token can be given: 100 years.
const MAX_TTL_SECS: u64 = 3_155_760_000;
/// Fresh tokens drawn before giving up; with 128 random bits a second draw is already
/// astronomically unlikely.
const TOKEN_ATTEMPTS: usize = 3;

/// What the service needs besides its store, keys and policy.
#[derive(Debug)]
pub struct ServiceSettings {
    pub max_batch_size: usize,
    pub processors: Processors,
    pub cvc_ttl: Duration,
    pub idempotency_ttl: Duration,
    /// Where backups go; `None` refuses backups.
    pub backup_dir: Option<std::path::PathBuf>,
    /// Re-read by `ReloadPolicy` and SIGHUP.
    pub policy_file: std::path::PathBuf,
    /// Token lifetime per tenant when `Tokenize` names none.
    pub tenant_ttl_secs: std::collections::HashMap<String, u64>,
    pub lockout: crate::lockout::LockoutSettings,
    pub velocity: crate::velocity::VelocitySettings,
    /// Free space under which the vault reports itself degraded.
    pub low_disk_bytes: u64,
}

#[derive(Debug)]
pub struct VaultService<S> {
    low_disk_bytes: u64,
    store: Arc<S>,
    keys: Arc<Keys>,
    rewrap: Arc<Rewrapper<S>>,
    policy: RwLock<Arc<Policy>>,
    policy_file: std::path::PathBuf,
    /// `None` only when `[audit] enabled = false` (for measuring its cost).
    auditor: Option<Auditor>,
    lockout: Lockout,
    velocity: crate::velocity::Velocity,
    reload_lock: tokio::sync::Mutex<()>,
    metrics: crate::metrics::Metrics,
    tenant_ttl_secs: std::collections::HashMap<String, u64>,
    /// Deletes since the store was last compacted (the purge job compacts).
    deleted_since_compaction: std::sync::atomic::AtomicU64,
    max_batch_size: usize,
    processors: Processors,
    cvcs: Arc<CvcStore>,
    idempotency_ttl: Duration,
    backup_dir: Option<std::path::PathBuf>,
    /// Idempotency store keys of forwards in progress: a concurrent retry is refused
    /// instead of charging twice.
    in_flight: Mutex<HashSet<Vec<u8>>>,
}

/// Records a call whose future was dropped (the caller cancelled or its deadline
/// passed) before its audit event was written.
struct CancelGuard {
    auditor: Option<Auditor>,
    event: Option<AuditEvent>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let (Some(auditor), Some(event)) = (self.auditor.take(), self.event.take()) {
            tokio::spawn(async move {
                if let Err(e) = auditor.record(event).await {
                    tracing::error!(error = %e, "a cancelled call could not be audited");
                }
            });
        }
    }
}

/// Removes an idempotency key from the in-flight set when the forward ends.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<Vec<u8>>>,
    key: Vec<u8>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut set = self
            .set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.remove(&self.key);
    }
}

impl<S: Store> VaultService<S> {
    pub fn new(
        store: Arc<S>,
        keys: Arc<Keys>,
        rewrap: Arc<Rewrapper<S>>,
        policy: Policy,
        auditor: Option<Auditor>,
        settings: ServiceSettings,
    ) -> Self {
        Self {
            store,
            keys,
            rewrap,
            policy: RwLock::new(Arc::new(policy)),
            policy_file: settings.policy_file,
            auditor,
            lockout: Lockout::new(settings.lockout),
            velocity: crate::velocity::Velocity::new(settings.velocity),
            reload_lock: tokio::sync::Mutex::new(()),
            metrics: crate::metrics::Metrics::default(),
            tenant_ttl_secs: settings.tenant_ttl_secs,
            deleted_since_compaction: std::sync::atomic::AtomicU64::new(0),
            max_batch_size: settings.max_batch_size,
            processors: settings.processors,
            cvcs: Arc::new(CvcStore::new(settings.cvc_ttl)),
            idempotency_ttl: settings.idempotency_ttl,
            backup_dir: settings.backup_dir,
            in_flight: Mutex::new(HashSet::new()),
            low_disk_bytes: settings.low_disk_bytes,
        }
    }

    /// Why the vault is degraded, if it is: the keyservice link is down, a data or
    /// audit filesystem is nearly full, or the database cannot be reached or does not
    /// confirm writes. It serves (or tries to) either way.
    pub fn degraded(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !*self.keys.connected().borrow() {
            reasons.push("the keyservice is unreachable; serving with the keys held".into());
        }
        if let Some(reason) = self.storage_trouble() {
            reasons.push(reason);
        }
        reasons
    }

    /// What is wrong with the storage, if anything: the database cannot be reached or
    /// does not confirm writes,
    /// or "the data disk is nearly full (… MiB free)" (or the audit disk).
    pub fn storage_trouble(&self) -> Option<String> {
        let stats = self.store.stats();
        if stats.unreachable {
            return Some(
                "the database cannot be reached, or does not confirm writes in time".into(),
            );
        }
        [
            ("data", stats.data_free_bytes),
            ("audit log", stats.audit_free_bytes),
        ]
        .into_iter()
        .find_map(|(which, free)| {
            Some((which, free?)).filter(|(_, free)| *free < self.low_disk_bytes)
        })
        .map(|(which, free)| {
            format!(
                "the {which} disk is nearly full ({} MiB free)",
                free / (1024 * 1024)
            )
        })
    }

    /// The in-memory CVC store (for usage reports).
    pub fn cvc_store(&self) -> Arc<CvcStore> {
        Arc::clone(&self.cvcs)
    }

    /// Runs one RPC: a span with method, request id and caller; authorization; the
    /// handler; the request id in the response or error metadata.
    async fn call<Req, Resp, Fut>(
        &self,
        method: &'static str,
        permission: impl FnOnce(&Req) -> Permission,
        request: Request<Req>,
        handler: impl FnOnce(Caller, Req) -> Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Audited,
        Resp: Audited,
        Fut: Future<Output = Result<Resp, VaultError>>,
    {
        let request_id = new_request_id();
        let identity = runtime::tls::peer_identity(&request);
        let peer = request
            .remote_addr()
            .map_or_else(|| "-".to_owned(), |addr| addr.ip().to_string());
        let span = tracing::info_span!(
            "rpc",
            method,
            request_id = %request_id,
            caller = identity.as_deref().unwrap_or("-"),
        );
        async move {
            let started = Instant::now();
            let mut event = AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: identity.clone().unwrap_or_else(|| "-".into()),
                peer: peer.clone(),
                action: method.into(),
                request_id: request_id.clone(),
                ..AuditEvent::default()
            };
            // What the request names goes into the event only if the call succeeds.
            let mut described = AuditEvent::default();
            request.get_ref().describe(&mut described);
            let permission = permission(request.get_ref());
            let policy = self.current_policy();
            // If the caller goes away mid-call (the future is dropped), the guard
            // still records the call.
            let mut guard = CancelGuard {
                auditor: self.auditor.clone(),
                event: None,
            };
            let result = if self.lockout.is_blocked(
                identity.as_deref(),
                &peer,
                || {
                    policy
                        .authorize(identity.as_deref(), &Permission::Admin)
                        .is_ok()
                },
                started,
            ) {
                tracing::warn!("refused: caller blocked after repeated failures");
                event.detail = "blocked".into();
                Err(VaultError::PermissionDenied)
            } else {
                match policy.authorize(identity.as_deref(), &permission) {
                    Ok(mut caller) => {
                        event.tenant = caller.tenant.as_str().to_owned();
                        caller.request_id = request_id.clone();
                        guard.event = Some(AuditEvent {
                            outcome: "CANCELLED".into(),
                            ..event.clone()
                        });
                        handler(caller, request.into_inner()).await
                    }
                    Err(Denied::Unauthenticated) => Err(VaultError::Unauthenticated),
                    Err(Denied::PermissionDenied) => Err(VaultError::PermissionDenied),
                }
            };
            let elapsed = started.elapsed();
            let counts_as_failure = matches!(
                result,
                Err(VaultError::PermissionDenied
                    | VaultError::Unauthenticated
                    | VaultError::NotFound)
            );
            let result = result.map_err(|error| error.into_status(&request_id));
            match &result {
                Ok(body) => {
                    event.outcome = "ok".into();
                    described.merge_into(&mut event);
                    body.describe(&mut event);
                }
                Err(status) => {
                    event.outcome = code_name(status.code()).into();
                    if event.detail.is_empty() && counts_as_failure {
                        self.count_failure(identity.as_deref(), &peer, &request_id, started)
                            .await;
                    }
                }
            }
            let code = result
                .as_ref()
                .map_or_else(|status| status.code(), |_| tonic::Code::Ok);
            self.metrics.rpc.call(method, code, elapsed);
            let audited = self.audit(event).await;
            guard.event = None;
            let result = match (audited, result) {
                (Ok(()), result) => result,
                // No unaudited access: the answer is withheld.
                (Err(refused), _) => Err(refused.into_status(&request_id)),
            };
            let request_id_value = MetadataValue::try_from(request_id.as_str()).ok();
            match result {
                Ok(body) => {
                    tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "ok");
                    let mut response = Response::new(body);
                    if let Some(value) = request_id_value {
                        response.metadata_mut().insert(REQUEST_ID_HEADER, value);
                    }
                    Ok(response)
                }
                Err(mut status) => {
                    if let Some(value) = request_id_value {
                        status.metadata_mut().insert(REQUEST_ID_HEADER, value);
                    }
                    Err(status)
                }
            }
        }
        .instrument(span)
        .await
    }

    fn current_policy(&self) -> Arc<Policy> {
        Arc::clone(
            &self
                .policy
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Records, durably and before the fact, that `caller` is about to do something
    /// that cannot be undone (send a card, delete a record): if the record cannot be
    /// written, nothing is done.
    async fn audit_intent(
        &self,
        caller: &Caller,
        action: &str,
        token: &Token,
        processor: &str,
    ) -> Result<(), VaultError> {
        self.audit(AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: caller.identity.clone(),
            peer: "-".into(),
            action: action.into(),
            tenant: caller.tenant.as_str().to_owned(),
            token: token.as_str().to_owned(),
            processor: processor.to_owned(),
            outcome: "started".into(),
            request_id: caller.request_id.clone(),
            ..AuditEvent::default()
        })
        .await
    }

    /// Writes an audit event durably (a no-op only when auditing is disabled).
    pub async fn audit(&self, event: AuditEvent) -> Result<(), VaultError> {
        match &self.auditor {
            Some(auditor) => {
                auditor.record(event).await.map_err(VaultError::Audit)?;
                self.metrics.event("audit");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a forward for the velocity rules; a forward above a limit is flagged in
    /// the audit log and, if so configured, refused.
    async fn check_velocity(
        &self,
        caller: &Caller,
        token: &Token,
        processor: &str,
        stored: &StoredRecord,
    ) -> Result<(), VaultError> {
        let broken = self.velocity.forward(
            &caller.identity,
            &stored.metadata.card_key(),
            Instant::now(),
        );
        if broken.is_empty() {
            return Ok(());
        }
        let refuse = self.velocity.refuses();
        self.metrics.event("velocity_flag");
        tracing::warn!(token = %token, rules = %broken.join("; "), refused = refuse, "forward flagged by velocity rules");
        self.audit(AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: caller.identity.clone(),
            peer: "-".into(),
            action: "VelocityFlag".into(),
            tenant: caller.tenant.as_str().to_owned(),
            token: token.as_str().to_owned(),
            processor: processor.to_owned(),
            outcome: if refuse { "refused" } else { "flagged" }.into(),
            detail: broken.join("; "),
            ..AuditEvent::default()
        })
        .await?;
        if refuse {
            return Err(VaultError::VelocityExceeded);
        }
        Ok(())
    }

    /// Counts a failed call against the caller; audits the blocks it causes.
    async fn count_failure(
        &self,
        identity: Option<&str>,
        peer: &str,
        request_id: &str,
        now: Instant,
    ) {
        for (kind, subject) in self.lockout.failure(identity, peer, now) {
            self.metrics.event("lockout");
            tracing::warn!(kind = kind.name(), %subject, "blocked after repeated failures");
            let event = AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: identity.unwrap_or("-").to_owned(),
                peer: peer.to_owned(),
                action: "Lockout".into(),
                outcome: "ok".into(),
                request_id: request_id.to_owned(),
                detail: format!("{} {subject} blocked", kind.name()),
                ..AuditEvent::default()
            };
            if let Err(e) = self.audit(event).await {
                tracing::error!(error = %e, "lockout not audited");
            }
        }
    }

    /// Re-reads the policy file; an invalid file leaves the policy in force. Audited.
    pub async fn reload_policy(&self, actor: &str) -> Result<usize, VaultError> {
        // One reload at a time, so that the file read last is the policy in force.
        let _one_at_a_time = self.reload_lock.lock().await;
        let loaded = Policy::load(&self.policy_file);
        let mut event = AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: actor.to_owned(),
            peer: "-".into(),
            action: "PolicyReload".into(),
            ..AuditEvent::default()
        };
        match loaded {
            Ok(policy) => {
                let identities = policy.len();
                event.outcome = "ok".into();
                event.detail = format!("{identities} identities");
                // Audited before it takes effect: no unrecorded policy is ever in force.
                self.audit(event).await?;
                *self
                    .policy
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
                tracing::info!(identities, "policy reloaded");
                Ok(identities)
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
                event.outcome = "FAILED_PRECONDITION".into();
                event.detail = e.to_string();
                self.audit(event).await?;
                Err(VaultError::PolicyInvalid(e.to_string()))
            }
        }
    }

    /// The fingerprint and clear metadata of a new record of `card` (the card-data
    /// version is set when it is sealed), and, for `reuse_existing`, the card's index
    /// keys under the older fingerprint versions still held.
    fn metadata(
        &self,
        caller: &Caller,
        card: &CardData,
        now_unix_ms: i64,
        reuse_existing: bool,
    ) -> (Metadata, Vec<Vec<u8>>) {
        let keys = self.keys.snapshot();
        let (fingerprint_version, fingerprint_key) = keys.fingerprint.active();
        let mut metadata = Metadata {
            key_version: keys.card_data.active().0,
            brand: card.pan.brand(),
            last_four: card.pan.last_four(),
            expiry: card.expiry,
            created_at_unix_ms: now_unix_ms,
            fingerprint: Fingerprint {
                version: fingerprint_version,
                value: record::fingerprint(fingerprint_key, &caller.tenant, &card.pan),
            },
            tenant: caller.tenant.clone(),
            expires_at_unix_ms: 0,
        };
        let mut older = Vec::new();
        if reuse_existing {
            let current = metadata.fingerprint;
            for (version, key) in keys.fingerprint.older() {
                metadata.fingerprint = Fingerprint {
                    version,
                    value: record::fingerprint(key, &caller.tenant, &card.pan),
                };
                older.push(metadata.index_key());
            }
            metadata.fingerprint = current;
        }
        (metadata, older)
    }

    /// Seals `card` under a new token with an encryption drawn from the card-data
    /// budget, and sets `metadata.key_version` to the version used.
    async fn seal(
        &self,
        metadata: &mut Metadata,
        card: &CardData,
        reuse_existing: bool,
        older_index_keys: &[Vec<u8>],
    ) -> Result<NewRecord, VaultError> {
        let token = Token::generate()?;
        let (version, key) = self.keys.encryption_key(Aead::CardData).await?;
        metadata.key_version = version;
        let value = record::seal(&token, metadata, card, &key)?;
        Ok(NewRecord {
            token,
            value,
            index_key: metadata.index_key(),
            reuse_existing,
            older_index_keys: older_index_keys.to_vec(),
            versions: metadata.versions(),
            indexes: metadata.indexes(),
        })
    }

    /// When a token made now with `ttl_secs` (0: the tenant's default) expires.
    fn expires_at(&self, caller: &Caller, ttl_secs: u64, now: i64) -> Result<i64, VaultError> {
        let ttl = match ttl_secs {
            0 => self
                .tenant_ttl_secs
                .get(caller.tenant.as_str())
                .copied()
                .unwrap_or(0),
            n => n,
        };
        if ttl == 0 {
            return Ok(0);
        }
        if ttl > MAX_TTL_SECS {
            return Err(VaultError::Invalid(Violation {
                field: "ttl_secs",
                rule: "range",
                description: "must be at most 100 years (3155760000 seconds)",
            }));
        }
        Ok(now + ttl as i64 * 1000)
    }

    /// Reads a record of the caller's tenant. Another tenant's token is NOT_FOUND,
    /// exactly like an unknown one.
    async fn load(&self, caller: &Caller, token: &Token) -> Result<StoredRecord, VaultError> {
        Ok(self.load_bytes(caller, token).await?.1)
    }

    /// [`Self::load`], with the record bytes as stored.
    async fn load_bytes(
        &self,
        caller: &Caller,
        token: &Token,
    ) -> Result<(Vec<u8>, StoredRecord), VaultError> {
        let bytes = self.store.get(token).await?.ok_or(VaultError::NotFound)?;
        let stored = record::decode(&bytes)?;
        if stored.metadata.tenant != caller.tenant {
            return Err(VaultError::NotFound);
        }
        // An expired token answers like an unknown one at once, before the purge.
        if stored.metadata.expired(now_unix_ms()) {
            return Err(VaultError::Expired);
        }
        Ok((bytes, stored))
    }

    /// Deletes a record of the caller's tenant. The store deletes only the bytes read
    /// here, so a rewrap in between (new versions, new index key) means reading again.
    async fn delete_record(&self, caller: &Caller, token: &Token) -> Result<(), VaultError> {
        for attempt in 0..TOKEN_ATTEMPTS {
            let (bytes, stored) = self.load_bytes(caller, token).await?;
            if attempt == 0 {
                self.audit_intent(caller, "DeleteStarted", token, "")
                    .await?;
            }
            match self.delete_stored(token, bytes, &stored).await? {
                DeleteOutcome::Deleted => return Ok(()),
                DeleteOutcome::NotFound => return Err(VaultError::NotFound),
                DeleteOutcome::Changed => continue,
            }
        }
        Err(VaultError::Store(crate::store::StoreError::Engine(
            "the record kept changing during a delete".into(),
        )))
    }

    /// Deletes the record `bytes` of `token` (if unchanged) and its CVC.
    async fn delete_stored(
        &self,
        token: &Token,
        bytes: Vec<u8>,
        stored: &StoredRecord,
    ) -> Result<DeleteOutcome, VaultError> {
        let outcome = self
            .store
            .delete(Delete {
                token: token.clone(),
                expected: bytes,
                index_key: stored.metadata.index_key(),
                versions: stored.metadata.versions(),
                indexes: stored.metadata.indexes(),
            })
            .await?;
        if outcome == DeleteOutcome::Deleted {
            self.cvcs.erase(token);
            self.deleted_since_compaction
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// Deletes every expired record (audited as one event per pass), then, if anything
    /// was deleted since the last time, compacts the store so that deleted records are
    /// physically gone. Returns the number purged.
    pub async fn purge(&self) -> Result<usize, VaultError> {
        let purged = self.purge_expired().await;
        // Forward outcomes are kept for the idempotency window only: they hold what a
        // processor answered about a card (masked, but still about the card).
        let ttl_ms = self.idempotency_ttl.as_millis() as i64;
        let now = now_unix_ms();
        let stale = move |value: &[u8]| {
            idempotency::decode(value)
                .is_none_or(|outcome| now.saturating_sub(outcome.created_at_unix_ms) >= ttl_ms)
        };
        match self.store.prune_outcomes(&stale).await {
            Ok(0) => {}
            Ok(pruned) => {
                self.deleted_since_compaction
                    .fetch_add(pruned as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    pruned,
                    "forward outcomes past the idempotency window removed"
                );
            }
            Err(e) => tracing::error!(error = %e, "forward outcomes not pruned"),
        }
        // Deletions are compacted away whatever happened above.
        let deleted = self
            .deleted_since_compaction
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        if deleted > 0 {
            if let Err(e) = self.store.compact().await {
                self.deleted_since_compaction
                    .fetch_add(deleted, std::sync::atomic::Ordering::Relaxed);
                return Err(e.into());
            }
            tracing::info!(
                deleted,
                "store compacted: deleted records are physically gone"
            );
        }
        purged
    }

    async fn purge_expired(&self) -> Result<usize, VaultError> {
        let mut purged = 0;
        loop {
            let expired = self.store.expired(now_unix_ms(), 1000).await?;
            let mut progress = false;
            for token in &expired {
                match self.purge_token(token).await {
                    Ok(true) => {
                        purged += 1;
                        progress = true;
                    }
                    Ok(false) => {}
                    // One bad record does not stop the purge of the others.
                    Err(e) => {
                        tracing::error!(token = %token, error = %e, "expired token not purged")
                    }
                }
            }
            // Entries the purge cannot remove are left for the next run.
            if expired.is_empty() || !progress {
                break;
            }
        }
        Ok(purged)
    }

    /// Deletes an expired token's record, audited before the fact. Returns whether it
    /// was deleted.
    async fn purge_token(&self, token: &Token) -> Result<bool, VaultError> {
        let Some(bytes) = self.store.get(token).await? else {
            return Ok(false);
        };
        let stored = record::decode(&bytes)?;
        if !stored.metadata.expired(now_unix_ms()) {
            return Ok(false);
        }
        self.audit(AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: "vault".into(),
            peer: "-".into(),
            action: "Purge".into(),
            tenant: stored.metadata.tenant.as_str().to_owned(),
            token: token.as_str().to_owned(),
            outcome: "ok".into(),
            detail: "retention ended".into(),
            ..AuditEvent::default()
        })
        .await?;
        Ok(self.delete_stored(token, bytes, &stored).await? == DeleteOutcome::Deleted)
    }

    /// The card keys of `card` in the caller's tenant, under every fingerprint
    /// version held (a card tokenized before a rotation is found too).
    fn card_keys(&self, caller: &Caller, card: &pb::Card) -> Result<Vec<Vec<u8>>, VaultError> {
        let pan = crate::card::Pan::parse(&card.number).map_err(VaultError::Invalid)?;
        let keys = self.keys.snapshot();
        let (active, active_key) = keys.fingerprint.active();
        let all = std::iter::once((active, active_key)).chain(keys.fingerprint.older());
        Ok(all
            .map(|(version, key)| {
                let fingerprint = Fingerprint {
                    version,
                    value: record::fingerprint(key, &caller.tenant, &pan),
                };
                record::card_key(&caller.tenant, &fingerprint)
            })
            .collect())
    }

    /// Every live token of `card` in the caller's tenant.
    async fn subject_tokens(
        &self,
        caller: &Caller,
        card: Option<pb::Card>,
    ) -> Result<Vec<Token>, VaultError> {
        let card = card.ok_or(VaultError::Invalid(Violation {
            field: "card",
            rule: "required",
            description: "a card number is required",
        }))?;
        let mut tokens = Vec::new();
        for card_key in self.card_keys(caller, &card)? {
            for token in self.store.tokens_of_card(&card_key).await? {
                if !tokens.contains(&token) {
                    tokens.push(token);
                }
            }
        }
        Ok(tokens)
    }

    /// Reads a record and decrypts its card.
    async fn load_card(
        &self,
        caller: &Caller,
        token: &Token,
    ) -> Result<(StoredRecord, CardData), VaultError> {
        let stored = self.load(caller, token).await?;
        let version = stored.metadata.key_version;
        let keys = self.keys.snapshot();
        let key = keys
            .card_data
            .get(version)
            .ok_or(VaultError::KeyUnavailable(version))?;
        let card = stored.open(token, key)?;
        Ok((stored, card))
    }

    /// Reads a record and authenticates it (decrypting, then dropping the card), so
    /// that edited or moved records are reported, never served.
    async fn load_verified(
        &self,
        caller: &Caller,
        token: &Token,
    ) -> Result<StoredRecord, VaultError> {
        Ok(self.load_card(caller, token).await?.0)
    }

    /// Keeps the card's CVC (memory only) for the token it was stored under.
    async fn keep_cvc(&self, token: &Token, card: &CardData) -> Result<(), VaultError> {
        if let Some(cvc) = &card.cvc {
            let (version, key) = self.keys.encryption_key(Aead::Cvc).await?;
            self.cvcs.put(version, &key, token, cvc)?;
        }
        Ok(())
    }

    async fn tokenize_one(
        &self,
        caller: Caller,
        request: pb::TokenizeRequest,
    ) -> Result<pb::TokenizeResponse, VaultError> {
        let card = CardData::from_wire(request.card, Today::now()).map_err(VaultError::Invalid)?;
        let now = now_unix_ms();
        let expires_at = self.expires_at(&caller, request.ttl_secs, now)?;
        let (mut metadata, older) = self.metadata(&caller, &card, now, request.reuse_existing);
        metadata.expires_at_unix_ms = expires_at;
        for _ in 0..TOKEN_ATTEMPTS {
            let record = self
                .seal(&mut metadata, &card, request.reuse_existing, &older)
                .await?;
            let token = record.token.clone();
            let outcome = self.store.insert(vec![record]).await?.pop();
            match outcome {
                Some(InsertOutcome::Stored) => {
                    self.keep_cvc(&token, &card).await?;
                    // Successful calls log at debug: the audit log already holds one
                    // durable event per call, and a line per call at info costs the
                    // hot path a write to stderr.
                    tracing::debug!(token = %token, "tokenized");
                    return Ok(tokenize_response(&token, &metadata, false));
                }
                Some(InsertOutcome::Existing(existing)) => {
                    let stored = match self.load_verified(&caller, &existing).await {
                        // Deleted since the index named it: the next insert stores anew.
                        Err(VaultError::NotFound) => continue,
                        // Expired but not yet purged: purged now, then stored anew.
                        Err(VaultError::Expired) => {
                            self.purge_token(&existing).await?;
                            continue;
                        }
                        other => other?,
                    };
                    self.keep_cvc(&existing, &card).await?;
                    tracing::debug!(token = %existing, "returned existing token");
                    return Ok(tokenize_response(&existing, &stored.metadata, true));
                }
                Some(InsertOutcome::TokenTaken) | None => continue,
            }
        }
        Err(VaultError::TokenSpace)
    }

    async fn tokenize_many(
        &self,
        caller: Caller,
        request: pb::TokenizeBatchRequest,
    ) -> Result<pb::TokenizeBatchResponse, VaultError> {
        if request.cards.is_empty() {
            return Err(VaultError::Invalid(Violation {
                field: "cards",
                rule: "required",
                description: "at least one card is required",
            }));
        }
        if request.cards.len() > self.max_batch_size {
            return Err(VaultError::BatchTooLarge {
                max: self.max_batch_size,
            });
        }
        let today = Today::now();
        let now = now_unix_ms();
        let expires_at = self.expires_at(&caller, request.ttl_secs, now)?;
        let mut results: Vec<Option<pb::BatchItemResult>> = Vec::new();
        results.resize_with(request.cards.len(), || None);
        // Valid cards, still waiting for a stored token: (index, card, metadata, the
        // card's index keys under older fingerprint versions).
        let mut waiting = Vec::new();
        for (index, card) in request.cards.into_iter().enumerate() {
            match CardData::from_wire(Some(card), today) {
                Ok(card) => {
                    let (mut metadata, older) =
                        self.metadata(&caller, &card, now, request.reuse_existing);
                    metadata.expires_at_unix_ms = expires_at;
                    waiting.push((index, card, metadata, older));
                }
                Err(violation) => results[index] = Some(invalid_item(index, violation)),
            }
        }
        for _ in 0..TOKEN_ATTEMPTS {
            if waiting.is_empty() {
                break;
            }
            let mut records = Vec::with_capacity(waiting.len());
            for (_, card, metadata, older) in &mut waiting {
                records.push(
                    self.seal(metadata, card, request.reuse_existing, older)
                        .await?,
                );
            }
            let tokens: Vec<Token> = records.iter().map(|r| r.token.clone()).collect();
            // One durable write for every valid card of the batch.
            let outcomes = self.store.insert(records).await?;
            let mut retry = Vec::new();
            for (((index, card, metadata, older), token), outcome) in
                waiting.into_iter().zip(tokens).zip(outcomes)
            {
                let stored = match outcome {
                    InsertOutcome::Stored => {
                        self.keep_cvc(&token, &card).await?;
                        tokenize_response(&token, &metadata, false)
                    }
                    InsertOutcome::Existing(existing) => {
                        match self.load_verified(&caller, &existing).await {
                            Ok(stored) => {
                                self.keep_cvc(&existing, &card).await?;
                                tokenize_response(&existing, &stored.metadata, true)
                            }
                            // Deleted since the index named it: the next round stores
                            // this card anew instead of failing the whole batch.
                            Err(VaultError::NotFound) => {
                                retry.push((index, card, metadata, older));
                                continue;
                            }
                            Err(VaultError::Expired) => {
                                self.purge_token(&existing).await?;
                                retry.push((index, card, metadata, older));
                                continue;
                            }
                            Err(other) => return Err(other),
                        }
                    }
                    InsertOutcome::TokenTaken => {
                        retry.push((index, card, metadata, older));
                        continue;
                    }
                };
                results[index] = Some(pb::BatchItemResult {
                    index: index as u32,
                    outcome: Some(pb::batch_item_result::Outcome::Stored(stored)),
                });
            }
            waiting = retry;
        }
        if !waiting.is_empty() {
            return Err(VaultError::TokenSpace);
        }
        let results: Vec<_> = results.into_iter().flatten().collect();
        let stored = results
            .iter()
            .filter(|r| matches!(r.outcome, Some(pb::batch_item_result::Outcome::Stored(_))))
            .count();
        tracing::debug!(items = results.len(), stored, "batch tokenized");
        Ok(pb::TokenizeBatchResponse { results })
    }
}

impl<S: Store> VaultService<S> {
    /// `<backup_dir>/<name>`, the name checked so it cannot leave the directory.
    fn backup_path(&self, name: &str) -> Result<std::path::PathBuf, VaultError> {
        let dir = self
            .backup_dir
            .as_ref()
            .ok_or(VaultError::BackupsDisabled)?;
        let valid = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(VaultError::Invalid(Violation {
                field: "name",
                rule: "format",
                description: "must be 1 to 128 of [A-Za-z0-9._-], not starting with '.'",
            }));
        }
        Ok(dir.join(name))
    }

    async fn forward_one(
        &self,
        caller: Caller,
        request: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, VaultError> {
        let invalid = |field, rule, description| {
            VaultError::Invalid(Violation {
                field,
                rule,
                description,
            })
        };
        // An unknown processor is refused exactly like one the caller may not use.
        let processor = self
            .processors
            .get(&request.processor)
            .ok_or(VaultError::Forward(crate::forward::ForwardError::Denied(
                "unknown processor",
            )))?;
        let body = Template::parse(&request.body).map_err(|e| match e {
            crate::forward::template::TemplateError::Unknown => {
                invalid("body", "placeholder", "holds an unknown placeholder")
            }
            crate::forward::template::TemplateError::Unclosed => {
                invalid("body", "placeholder", "holds an unclosed placeholder")
            }
        })?;
        let mut headers = Vec::with_capacity(request.headers.len());
        for header in &request.headers {
            if !crate::forward::valid_header_name(&header.name) {
                return Err(invalid(
                    "headers.name",
                    "header_name",
                    "must be a valid header name that the vault does not reserve",
                ));
            }
            // Placeholders are ASCII, so a template that is a valid header value stays
            // one except for what the card data brings (checked after rendering).
            if tonic::codegen::http::HeaderValue::from_str(&header.value).is_err() {
                return Err(invalid(
                    "headers.value",
                    "characters",
                    "must be a valid header value",
                ));
            }
            let value = Template::parse(&header.value).map_err(|_| {
                invalid(
                    "headers.value",
                    "placeholder",
                    "holds an unknown or unclosed placeholder",
                )
            })?;
            headers.push((header.name.clone(), value));
        }
        if request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-type"))
            .count()
            > 1
        {
            return Err(invalid(
                "headers",
                "duplicate",
                "content-type may appear once",
            ));
        }
        let outbound = Outbound {
            method: request.method.clone(),
            path: request.path.clone(),
            headers,
            body,
        };
        processor
            .check(&caller.identity, &outbound)
            .map_err(VaultError::Forward)?;
        // Free text goes only where it can be escaped.
        let content_type = request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-type"))
            .map(|h| h.value.as_str());
        if outbound.body.fields().any(|f| f == Field::Name)
            && Encoding::for_content_type(content_type) == Encoding::Raw
        {
            return Err(invalid(
                "body",
                "content_type",
                "{{card.name}} in a body needs a JSON or form-encoded content-type header",
            ));
        }
        let token = parse_token(&request.token)?;

        // Idempotency: the stored outcome of the same request, or a refusal when the
        // key was used for another request or is in use right now.
        let idempotency = if request.idempotency_key.is_empty() {
            None
        } else {
            let key = &request.idempotency_key;
            if key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "idempotency_key",
                    "format",
                    "must be 1 to 255 visible ASCII characters",
                ));
            }
            let store_key = idempotency::store_key(&caller.tenant, key);
            let mut parts: Vec<&[u8]> = vec![
                request.processor.as_bytes(),
                request.method.as_bytes(),
                request.path.as_bytes(),
                request.body.as_bytes(),
                request.token.as_bytes(),
            ];
            for header in &request.headers {
                parts.push(header.name.as_bytes());
                parts.push(header.value.as_bytes());
            }
            let digest = idempotency::request_digest(&parts);
            let guard = {
                let mut set = self
                    .in_flight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !set.insert(store_key.clone()) {
                    return Err(VaultError::IdempotencyInFlight);
                }
                InFlight {
                    set: &self.in_flight,
                    key: store_key.clone(),
                }
            };
            if let Some(bytes) = self.store.get_outcome(&store_key).await? {
                let outcome = idempotency::decode(&bytes)
                    .ok_or(VaultError::Record(crate::record::RecordError::Malformed))?;
                let age_ms = now_unix_ms().saturating_sub(outcome.created_at_unix_ms);
                let live = age_ms < self.idempotency_ttl.as_millis() as i64;
                if live && outcome.state != idempotency::State::NotSent {
                    if outcome.request_digest != digest {
                        return Err(VaultError::IdempotencyConflict);
                    }
                    if outcome.state == idempotency::State::Pending {
                        return Err(VaultError::IdempotencyUnknown);
                    }
                    // A token deleted or expired since is gone for replays too.
                    self.load(&caller, &token).await?;
                    tracing::info!(
                        processor = processor.name(),
                        status = outcome.answer.status,
                        "replayed stored forward outcome"
                    );
                    return Ok(forward_response(outcome.answer, true));
                }
            }
            Some((store_key, digest, guard))
        };

        let (stored, card) = self.load_card(&caller, &token).await?;
        self.check_velocity(&caller, &token, processor.name(), &stored)
            .await?;
        // A CVC is good for one use: taken out atomically, so two concurrent forwards
        // cannot both send it; put back only if nothing reached the processor.
        let cvc = if outbound.uses(Field::Cvc) {
            Some(
                self.cvcs
                    .take(&self.keys.snapshot(), &token)
                    .ok_or(VaultError::CvcUnavailable)?,
            )
        } else {
            None
        };
        if let Some((store_key, digest, _)) = &idempotency {
            // Written before sending: a crash or cancellation from here on leaves a
            // pending outcome, and a retry gets ABORTED instead of a second charge.
            let pending = idempotency::encode(
                idempotency::State::Pending,
                digest,
                now_unix_ms(),
                &Default::default(),
            );
            self.store.put_outcome(store_key.clone(), pending).await?;
        }
        // The card leaves the vault only once that is on record.
        self.audit_intent(&caller, "ForwardStarted", &token, processor.name())
            .await?;
        let sent = processor
            .send(
                &outbound,
                &card,
                cvc.as_ref().map(|taken| taken.cvc.as_str()),
            )
            .await;
        drop(card);
        let forwarded = |outcome: &str| {
            self.metrics
                .forwards
                .get_or_create(&crate::metrics::ForwardLabels {
                    processor: processor.name().into(),
                    outcome: outcome.into(),
                })
                .inc();
        };
        let answer = match sent {
            Ok(answer) => {
                forwarded("answered");
                answer
            }
            Err(error) => {
                forwarded(if error.nothing_sent() {
                    "not_sent"
                } else {
                    "failed"
                });
                if error.nothing_sent() {
                    if let Some(taken) = cvc {
                        self.cvcs.restore(&token, taken);
                    }
                    if let Some((store_key, digest, _)) = &idempotency {
                        let value = idempotency::encode(
                            idempotency::State::NotSent,
                            digest,
                            now_unix_ms(),
                            &Default::default(),
                        );
                        self.store.put_outcome(store_key.clone(), value).await?;
                    }
                }
                return Err(VaultError::Forward(error));
            }
        };
        tracing::debug!(processor = processor.name(), token = %token, status = answer.status, "forwarded");
        if let Some((store_key, digest, _guard)) = idempotency {
            let value =
                idempotency::encode(idempotency::State::Done, &digest, now_unix_ms(), &answer);
            self.store.put_outcome(store_key, value).await?;
        }
        Ok(forward_response(answer, false))
    }
}

/// Decodes and authenticates one stored record (then drops the card).
fn verify_record(keys: &KeySet, token: &[u8], value: &[u8]) -> bool {
    let Some(token) = Token::from_stored(token) else {
        return false;
    };
    let Ok(record) = record::decode(value) else {
        return false;
    };
    keys.card_data
        .get(record.metadata.key_version)
        .is_some_and(|key| record.open(&token, key).is_ok())
}

fn forward_response(answer: crate::forward::Answer, replayed: bool) -> pb::ForwardResponse {
    pb::ForwardResponse {
        status: u32::from(answer.status),
        headers: answer
            .headers
            .into_iter()
            .map(|(name, value)| pb::Header { name, value })
            .collect(),
        body: answer.body,
        replayed,
    }
}

fn invalid_item(index: usize, violation: Violation) -> pb::BatchItemResult {
    pb::BatchItemResult {
        index: index as u32,
        outcome: Some(pb::batch_item_result::Outcome::Invalid(
            pb::FieldViolation {
                field: violation.field.to_owned(),
                rule: violation.rule.to_owned(),
                description: violation.description.to_owned(),
            },
        )),
    }
}

fn token_info(token: &Token, metadata: &Metadata) -> pb::TokenInfo {
    pb::TokenInfo {
        token: token.as_str().to_owned(),
        brand: metadata.brand.to_wire() as i32,
        last_four: String::from_utf8_lossy(&metadata.last_four).into_owned(),
        exp_month: u32::from(metadata.expiry.month),
        exp_year: u32::from(metadata.expiry.year),
        fingerprint: hex::encode(metadata.fingerprint.value),
        created_at_unix_ms: metadata.created_at_unix_ms,
        key_version: metadata.key_version,
        expires_at_unix_ms: metadata.expires_at_unix_ms,
    }
}

fn tokenize_response(token: &Token, metadata: &Metadata, reused: bool) -> pb::TokenizeResponse {
    pb::TokenizeResponse {
        info: Some(token_info(token, metadata)),
        reused,
    }
}

fn new_request_id() -> String {
    let mut bytes = [0u8; 8];
    // A request id is for correlation only; an all-zero id on RNG failure is harmless.
    let _ = envelope::fill_random(&mut bytes);
    hex::encode(bytes)
}

/// The gRPC code's name as the audit log writes it.
fn parse_token(token: &str) -> Result<Token, VaultError> {
    Token::parse(token).map_err(VaultError::Invalid)
}

#[tonic::async_trait]
impl<S: Store> pb::vault_server::Vault for VaultService<S> {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.call(
            "Tokenize",
            |_| Permission::Tokenize,
            request,
            |caller, request| self.tokenize_one(caller, request),
        )
        .await
    }

    async fn tokenize_batch(
        &self,
        request: Request<pb::TokenizeBatchRequest>,
    ) -> Result<Response<pb::TokenizeBatchResponse>, Status> {
        self.call(
            "TokenizeBatch",
            |_| Permission::Tokenize,
            request,
            |caller, request| self.tokenize_many(caller, request),
        )
        .await
    }

    async fn get_token_info(
        &self,
        request: Request<pb::GetTokenInfoRequest>,
    ) -> Result<Response<pb::GetTokenInfoResponse>, Status> {
        self.call(
            "GetTokenInfo",
            |_| Permission::Read,
            request,
            |caller, request| async move {
                let token = parse_token(&request.token)?;
                let stored = self.load_verified(&caller, &token).await?;
                Ok(pb::GetTokenInfoResponse {
                    info: Some(token_info(&token, &stored.metadata)),
                })
            },
        )
        .await
    }

    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        self.call(
            "DeleteToken",
            |_| Permission::Delete,
            request,
            |caller, request| async move {
                let token = parse_token(&request.token)?;
                self.delete_record(&caller, &token).await?;
                self.cvcs.erase(&token);
                tracing::debug!(token = %token, "deleted");
                Ok(pb::DeleteTokenResponse {})
            },
        )
        .await
    }

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::CreateBackupResponse>, Status> {
        self.call(
            "CreateBackup",
            |_| Permission::Admin,
            request,
            |_, request| async move {
                let path = self.backup_path(&request.name)?;
                if path.exists() {
                    return Err(VaultError::Invalid(Violation {
                        field: "name",
                        rule: "exists",
                        description: "a backup with this name exists already",
                    }));
                }
                let size_bytes = self.store.create_backup(&path).await?;
                tracing::info!(path = %path.display(), size_bytes, "backup created");
                Ok(pb::CreateBackupResponse {
                    path: path.display().to_string(),
                    size_bytes,
                })
            },
        )
        .await
    }

    async fn verify_backup(
        &self,
        request: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        self.call(
            "VerifyBackup",
            |_| Permission::Admin,
            request,
            |_, request| async move {
                let path = self.backup_path(&request.name)?;
                if !path.is_dir() {
                    return Err(VaultError::BackupNotFound);
                }
                let keys = self.keys.snapshot();
                let counts = tokio::task::spawn_blocking(move || {
                    let mut counts = pb::VerifyBackupResponse::default();
                    S::scan_backup(&path, &mut |token, value| {
                        counts.records += 1;
                        if verify_record(&keys, token, value) {
                            counts.verified += 1;
                        } else {
                            counts.failed += 1;
                        }
                    })
                    .map(|()| counts)
                })
                .await
                .map_err(|e| {
                    VaultError::Store(crate::store::StoreError::Engine(e.to_string()))
                })??;
                tracing::info!(
                    records = counts.records,
                    failed = counts.failed,
                    "backup verified"
                );
                Ok(counts)
            },
        )
        .await
    }

    async fn start_rewrap(
        &self,
        request: Request<pb::StartRewrapRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        self.call(
            "StartRewrap",
            |_| Permission::Admin,
            request,
            |_, _| self.rewrap.start(),
        )
        .await
    }

    async fn get_rewrap_status(
        &self,
        request: Request<pb::GetRewrapStatusRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        self.call(
            "GetRewrapStatus",
            |_| Permission::Admin,
            request,
            |_, _| async { Ok(self.rewrap.status()) },
        )
        .await
    }

    async fn find_subject(
        &self,
        request: Request<pb::SubjectRequest>,
    ) -> Result<Response<pb::SubjectResponse>, Status> {
        self.call(
            "FindSubject",
            |_| Permission::Read,
            request,
            |caller, request| async move {
                let mut tokens = Vec::new();
                for token in self.subject_tokens(&caller, request.card).await? {
                    // Another tenant's or an expired token is not the caller's.
                    if self.load(&caller, &token).await.is_ok() {
                        tokens.push(token.as_str().to_owned());
                    }
                }
                Ok(pb::SubjectResponse { tokens })
            },
        )
        .await
    }

    async fn erase_subject(
        &self,
        request: Request<pb::SubjectRequest>,
    ) -> Result<Response<pb::SubjectResponse>, Status> {
        self.call(
            "EraseSubject",
            |_| Permission::Delete,
            request,
            |caller, request| async move {
                let mut tokens = Vec::new();
                for token in self.subject_tokens(&caller, request.card).await? {
                    match self.delete_record(&caller, &token).await {
                        Ok(()) => tokens.push(token.as_str().to_owned()),
                        Err(VaultError::NotFound) => {}
                        // Expired tokens of the card go too.
                        Err(VaultError::Expired) => {
                            if self.purge_token(&token).await? {
                                tokens.push(token.as_str().to_owned());
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                tracing::info!(erased = tokens.len(), "data subject erased");
                Ok(pb::SubjectResponse { tokens })
            },
        )
        .await
    }

    async fn reload_policy(
        &self,
        request: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        self.call(
            "ReloadPolicy",
            |_| Permission::Admin,
            request,
            |caller, _| async move {
                let identities = self.reload_policy(&caller.identity).await?;
                Ok(pb::ReloadPolicyResponse {
                    identities: identities as u32,
                })
            },
        )
        .await
    }

    async fn read_audit(
        &self,
        request: Request<pb::ReadAuditRequest>,
    ) -> Result<Response<pb::ReadAuditResponse>, Status> {
        self.call(
            "ReadAudit",
            |_| Permission::Audit,
            request,
            |_, request| async move {
                let limit = match request.limit {
                    0 => 1000,
                    n => n.min(1000) as usize,
                };
                let in_window = |at: i64| {
                    (request.since_unix_ms == 0 || at >= request.since_unix_ms)
                        && (request.until_unix_ms == 0 || at <= request.until_unix_ms)
                };
                let mut events = Vec::new();
                let mut after = request.after_sequence;
                // Pages until `limit` events in the window are found or the log ends.
                'pages: loop {
                    let page = self.store.read_audit(after, 1000).await?;
                    let Some(last) = page.last().map(|(sequence, _)| *sequence) else {
                        break;
                    };
                    for (_, entry) in &page {
                        let Some((version, event)) = crate::audit::decode(entry) else {
                            continue;
                        };
                        if in_window(event.at_unix_ms) {
                            events.push(event.to_wire(version));
                            if events.len() >= limit {
                                break 'pages;
                            }
                        }
                    }
                    after = last;
                }
                let last_sequence = self
                    .store
                    .last_audit()
                    .await?
                    .map_or(0, |(sequence, _)| sequence);
                Ok(pb::ReadAuditResponse {
                    events,
                    last_sequence,
                })
            },
        )
        .await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        self.call(
            "VerifyAudit",
            |_| Permission::Audit,
            request,
            |_, _| async move {
                let verification = crate::audit::verify(self.store.as_ref(), &self.keys).await?;
                let (first_bad_sequence, problem) = verification
                    .fault
                    .map_or((0, String::new()), |(sequence, problem)| {
                        (sequence, problem.to_owned())
                    });
                Ok(pb::VerifyAuditResponse {
                    entries: verification.entries,
                    intact: verification.fault.is_none(),
                    first_bad_sequence,
                    problem,
                })
            },
        )
        .await
    }

    async fn list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksResponse>, Status> {
        self.call(
            "ListBlocks",
            |_| Permission::Admin,
            request,
            |_, _| async move {
                let now = now_unix_ms();
                let blocks = self
                    .lockout
                    .list(Instant::now())
                    .into_iter()
                    .map(|b| pb::Block {
                        kind: b.kind.name().into(),
                        subject: b.subject,
                        until_unix_ms: now + b.remaining.as_millis() as i64,
                        failures: b.failures,
                    })
                    .collect();
                Ok(pb::ListBlocksResponse { blocks })
            },
        )
        .await
    }

    async fn lift_block(
        &self,
        request: Request<pb::LiftBlockRequest>,
    ) -> Result<Response<pb::LiftBlockResponse>, Status> {
        self.call(
            "LiftBlock",
            |_| Permission::Admin,
            request,
            |_, request| async move {
                let kind = crate::lockout::Kind::parse(&request.kind).ok_or(
                    VaultError::Invalid(Violation {
                        field: "kind",
                        rule: "enum",
                        description: "must be identity or address",
                    }),
                )?;
                if !self.lockout.lift(kind, &request.subject, Instant::now()) {
                    return Err(VaultError::NoSuchBlock);
                }
                tracing::info!(kind = kind.name(), subject = %request.subject, "block lifted");
                Ok(pb::LiftBlockResponse {})
            },
        )
        .await
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        self.call(
            "Forward",
            |request: &pb::ForwardRequest| Permission::Forward(request.processor.clone()),
            request,
            |caller, request| self.forward_one(caller, request),
        )
        .await
    }
}

impl<S: Store> crate::metrics::Observed for VaultService<S> {
    fn metrics(&self) -> String {
        let metrics = &self.metrics;
        metrics.records.clear();
        for ((key_use, version), records) in self.store.version_counts() {
            let purpose = match key_use {
                crate::store::KeyUse::CardData => "card-data",
                crate::store::KeyUse::Fingerprint => "fingerprint",
            };
            metrics
                .records
                .get_or_create(&crate::metrics::VersionLabels {
                    purpose: purpose.into(),
                    version,
                })
                .set(records as i64);
        }
        let keys = self.keys.snapshot();
        for (purpose, version) in [
            ("card-data", keys.card_data.active().0),
            ("fingerprint", keys.fingerprint.active().0),
            ("cvc", keys.cvc.active().0),
            ("audit", keys.audit.active().0),
        ] {
            metrics
                .active_versions
                .get_or_create(&crate::metrics::PurposeLabels {
                    purpose: purpose.into(),
                })
                .set(i64::from(version));
        }
        metrics
            .keyservice_connected
            .set(i64::from(*self.keys.connected().borrow()));
        metrics
            .rewrap_remaining
            .set(self.rewrap.status().remaining as i64);
        let rewritten = self.rewrap.rewritten_here();
        metrics
            .rewrap_rewritten
            .inc_by(rewritten.saturating_sub(metrics.rewrap_rewritten.get()));
        metrics.storage.set(&self.store.stats());
        metrics.encode()
    }

    fn health(&self) -> (bool, String) {
        let reasons = self.degraded();
        if reasons.is_empty() {
            (true, "serving".into())
        } else {
            (true, format!("degraded: {}", reasons.join("; ")))
        }
    }
}

//! The vault's background tasks, started by `Bound::serve` and stopped by shutdown:
//! health reports, key-change audit events, the purge, SIGHUP policy reloads, and the
//! usage reports the keyservice wants before a destroy.

use std::sync::Arc;
use std::time::Duration;

use runtime::shutdown::Shutdown;

use crate::store::Engine;
use crate::{
    KEYSERVICE_LINK_HEALTH, STORAGE_HEALTH, audit, cvc, error, keys, ops, refusals, store,
};

/// Looks at free space every few seconds and reports it as `STORAGE_HEALTH`.
pub(crate) async fn report_storage(
    vault: Arc<ops::Vault<Engine>>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: Shutdown,
) {
    let mut low = None;
    loop {
        let now = vault.storage_trouble();
        if now.is_some() != low.is_some() {
            match &now {
                Some(reason) => tracing::warn!(reason = %reason, "degraded"),
                None if low.is_some() => tracing::info!("disk space is back above the low mark"),
                None => {}
            }
        }
        let status = if now.is_some() {
            tonic_health::ServingStatus::NotServing
        } else {
            tonic_health::ServingStatus::Serving
        };
        reporter.set_service_status(STORAGE_HEALTH, status).await;
        low = now;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = shutdown.clone().wait() => return,
        }
    }
}

pub(crate) async fn report_keyservice_link(
    mut connected: tokio::sync::watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
) {
    loop {
        let status = if *connected.borrow_and_update() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter
            .set_service_status(KEYSERVICE_LINK_HEALTH, status)
            .await;
        if connected.changed().await.is_err() {
            return;
        }
    }
}

/// Audits every change of the key set the vault sees (rotations, retirements).
pub(crate) async fn audit_key_changes(
    keys: Arc<keys::Keys>,
    vault: Arc<ops::Vault<Engine>>,
    shutdown: Shutdown,
) {
    let mut changes = keys.changes();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = &mut stop => return,
        }
        let set = keys.snapshot();
        let event = audit::AuditEvent {
            at_unix_ms: runtime::now_unix_ms(),
            actor: "keyservice".into(),
            peer: "-".into(),
            action: "KeySetChanged".into(),
            key_version: set.card_data.active().0,
            outcome: "ok".into(),
            detail: format!(
                "active: card-data v{}, fingerprint v{}, cvc v{}, audit v{}",
                set.card_data.active().0,
                set.fingerprint.active().0,
                set.cvc.active().0,
                set.audit.active().0
            ),
            ..audit::AuditEvent::default()
        };
        if let Err(e) = vault.records.journal().audit(event).await {
            tracing::error!(error = %e, "key set change not audited");
        }
    }
}

/// Purges expired tokens and compacts deletions away, every `interval`.
pub(crate) async fn purge_periodically(
    vault: Arc<ops::Vault<Engine>>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = vault.records.purge().await {
                    tracing::error!(error = %e, "purge failed; retried at the next interval");
                }
                match vault.importer.sweep().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "files of import jobs ended 7 days ago removed"),
                    Err(e) => tracing::error!(error = %e, "import spool not swept; retried at the next interval"),
                }
            }
            _ = &mut stop => return,
        }
    }
}

/// Every `period`, one audit event per caller and reason sums up the calls refused
/// for being unlisted or blocked (which are not audited one by one). Runs until
/// aborted; the server flushes once more after it stops serving.
pub(crate) async fn summarise_refusals(
    refusals: Arc<refusals::Refusals>,
    journal: Arc<ops::Journal>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush_refusals(&refusals, &journal).await;
    }
}

/// Writes the refusals counted so far as `CallsRefused` audit events; a summary that
/// cannot be written is put back for the next flush.
pub(crate) async fn flush_refusals(refusals: &refusals::Refusals, journal: &ops::Journal) {
    for summary in refusals.take() {
        let event = audit::AuditEvent {
            at_unix_ms: runtime::now_unix_ms(),
            actor: summary.actor.clone(),
            peer: summary.peer.clone(),
            action: "CallsRefused".into(),
            outcome: "PERMISSION_DENIED".into(),
            detail: format!(
                "{} calls refused ({}) since {} ms",
                summary.calls,
                summary.reason.name(),
                summary.first_at_unix_ms
            ),
            ..audit::AuditEvent::default()
        };
        if let Err(e) = journal.audit(event).await {
            tracing::error!(error = %e, "refused calls not summed up in the audit log; kept for the next try");
            refusals.restore(summary);
        }
    }
}

/// The `meta` key holding the highest keyring generation this vault (or, on a shared
/// database, any vault) accepted: a keyservice restored from an older keyring copy is
/// caught across restarts.
const KEYRING_GENERATION: &str = "keyring-generation";

/// The highest keyring generation accepted before (0: none).
pub(crate) async fn keyring_generation(store: &Engine) -> Result<u64, store::StoreError> {
    use crate::store::Store;
    Ok(store
        .get_meta(KEYRING_GENERATION)
        .await?
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u64::from_be_bytes))
}

/// The key that names the guessing detector's buckets: random, made once per store
/// (so shared by the vaults of one database) and kept in it. It only keeps first six
/// and last four digits out of flag names; it protects no card data.
pub(crate) async fn guessing_bucket_key(
    store: &Engine,
) -> Result<envelope::SecretKey, store::StoreError> {
    let bytes = random_meta(store, crate::guessing::BUCKET_KEY, 32).await?;
    envelope::SecretKey::from_slice(&bytes).map_err(|e| store::StoreError::Engine(e.to_string()))
}

/// The random value of `len` bytes kept under `key`, made by the first vault that
/// asks and the same for every vault of the store.
pub(crate) async fn random_meta(
    store: &Engine,
    key: &str,
    len: usize,
) -> Result<Vec<u8>, store::StoreError> {
    use crate::store::Store;
    if let Some(stored) = store.get_meta(key).await? {
        return Ok(stored);
    }
    let mut bytes = vec![0; len];
    envelope::fill_random(&mut bytes).map_err(|e| store::StoreError::Engine(e.to_string()))?;
    store.init_meta(key, bytes).await
}

/// Stores `generation` unless a higher one is stored already.
pub(crate) async fn store_keyring_generation(
    store: &Engine,
    generation: u64,
) -> Result<(), store::StoreError> {
    use crate::store::Store;
    if keyring_generation(store).await? < generation {
        store
            .put_meta(KEYRING_GENERATION, generation.to_be_bytes().to_vec())
            .await?;
    }
    Ok(())
}

/// Keeps the stored keyring generation up with the one accepted (checked every
/// second: a vault that crashes within that second and then meets a keyservice
/// restored to exactly that span of generations would not notice).
pub(crate) async fn keep_keyring_generation(
    keys: Arc<keys::Keys>,
    store: Arc<Engine>,
    shutdown: Shutdown,
) {
    let mut stored = keys.generation_floor();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = &mut stop => return,
        }
        let floor = keys.generation_floor();
        if floor > stored {
            match store_keyring_generation(&store, floor).await {
                Ok(()) => stored = floor,
                Err(e) => {
                    tracing::warn!(error = %e, "the keyring generation was not stored; retried")
                }
            }
        }
    }
}

/// SIGHUP re-reads the policy file, like `vaultctl policy reload`.
#[cfg(unix)]
pub(crate) async fn reload_policy_on_sighup(vault: Arc<ops::Vault<Engine>>, shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; use `vaultctl policy reload`");
        return;
    };
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = hangups.recv() => {
                // The outcome is logged and audited by the reload itself.
                let _ = vault.admin.reload_policy("SIGHUP").await;
            }
            _ = &mut stop => return,
        }
    }
}

/// This vault's instance id: random, kept in its store (under its node name where
/// vaults share a database), so that vaults sharing a certificate identity report
/// usage separately, and a restarted vault reports as the same instance.
pub(crate) async fn instance_id<S: store::Store>(
    store: &S,
    node: Option<&str>,
) -> Result<String, error::VaultError> {
    let key = match node {
        Some(node) => format!("instance-id/{node}"),
        None => "instance-id".to_owned(),
    };
    if let Some(id) = store.get_meta(&key).await? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let mut bytes = [0u8; 8];
    envelope::fill_random(&mut bytes)?;
    let id = hex::encode(bytes);
    store.put_meta(&key, id.clone().into_bytes()).await?;
    Ok(id)
}

/// Records (and in-memory CVCs) per key version, as the keyservice wants them for
/// destroy checks.
pub(crate) fn usage_report<S: store::Store>(
    store: &S,
    cvcs: &cvc::CvcStore,
) -> Vec<vault_proto::keys::v1::VersionUsage> {
    use vault_proto::keys::v1::{KeyPurpose, VersionUsage};
    let records = store
        .version_counts()
        .into_iter()
        .map(|((key_use, version), records)| {
            let purpose = match key_use {
                store::KeyUse::CardData => KeyPurpose::CardData,
                store::KeyUse::Fingerprint => KeyPurpose::Fingerprint,
            };
            (purpose, version, records)
        });
    let cvcs = cvcs
        .version_counts()
        .into_iter()
        .map(|(version, held)| (KeyPurpose::Cvc, version, held));
    records
        .chain(cvcs)
        .map(|(purpose, version, records)| VersionUsage {
            purpose: purpose as i32,
            version,
            records,
        })
        .collect()
}

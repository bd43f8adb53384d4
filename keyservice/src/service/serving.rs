//! Serving vaults: the key set (once, and as a stream of changes), encryption budget
//! leases, and the usage reports that a destroy depends on.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use runtime::shutdown::Shutdown;
use vault_proto::keys::v1 as pb;

use super::wire::{purpose_from_wire, purpose_to_wire, state_to_wire};
use super::{Shared, UsageReport, lock, now_unix_ms};
use crate::checkpoints::{Checkpoint, FoundGap, Reported};
use crate::erasures::{Erasure, MAX_PER_CALL, StoreId};
use crate::error::ServiceError;
use crate::history::NewEvent;
use crate::keyring::{Purpose, State};

pub(super) type KeyStream =
    Pin<Box<dyn Stream<Item = Result<pb::GetKeysResponse, tonic::Status>> + Send>>;

impl Shared {
    /// Refuses to serve keys or leases when a vault has accepted a later generation
    /// of the keyring than this one: it was restored from an older copy, whose GCM
    /// budgets may be spent already and whose destroyed versions may be back.
    pub(super) fn check_not_restored(&self, generation_seen: u64) -> Result<(), ServiceError> {
        let ours = lock(&self.keyring).generation();
        // A generation no keyring reaches (2^40 saves) is a mistake, not a restore: it
        // is refused alone instead of stopping the keyservice for every vault.
        if generation_seen > ours.saturating_add(1 << 40) {
            return Err(ServiceError::InvalidArgument {
                field: "generation_seen",
                rule: "must be a generation this keyring could have reached",
            });
        }
        let seen = self
            .generation_seen
            .fetch_max(generation_seen, std::sync::atomic::Ordering::AcqRel)
            .max(generation_seen);
        if seen > ours {
            tracing::error!(
                ours,
                seen,
                "the keyring is older than one a vault has used: restored from a copy; refusing keys and leases until two admins accept the restore"
            );
            return Err(ServiceError::Refused(crate::lifecycle::Refusal::Restored {
                ours,
                seen,
            }));
        }
        Ok(())
    }

    /// Why no change may be made now: the keyring was restored from an older copy and
    /// two admins have not accepted it (each save would move its generation towards the
    /// one the vaults have seen, and serving would resume unnoticed).
    pub(super) fn restored(
        &self,
        keyring: &crate::keyring::Keyring,
    ) -> Option<crate::lifecycle::Refusal> {
        let seen = self.generation_seen();
        let ours = keyring.generation();
        (seen > ours).then_some(crate::lifecycle::Refusal::Restored { ours, seen })
    }

    /// A configured vault identity that has not reported its usage since start.
    pub(super) fn silent_vault(&self) -> Option<String> {
        let reports = lock(&self.usage);
        self.vault_identities
            .iter()
            .find(|id| !reports.keys().any(|(reporter, _)| reporter == *id))
            .cloned()
    }

    /// The highest version of `purpose` any vault's latest report names (records or
    /// in use): new versions are numbered above it, so that a number is never given
    /// to two keys even when the keyring lacks versions (restored from a copy).
    pub(super) fn highest_reported(&self, purpose: Purpose) -> u32 {
        lock(&self.usage)
            .values()
            .flat_map(|report| {
                report
                    .records
                    .keys()
                    .filter(|(p, _)| *p == purpose)
                    .map(|(_, v)| *v)
                    .chain(report.active.get(&purpose).copied())
            })
            .max()
            .unwrap_or(0)
    }

    /// The highest generation a vault has reported accepting.
    pub(super) fn generation_seen(&self) -> u64 {
        self.generation_seen
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The versions vaults may use: active and decrypt-only, with their material.
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
                    deactivated_at_unix_ms: v.deactivated_at_unix_ms,
                })
            })
            .collect();
        pb::GetKeysResponse {
            keys,
            generation: keyring.generation(),
        }
    }

    /// Records on `version` of `purpose`, summed over the vaults' latest reports.
    pub(super) fn records_using(&self, purpose: Purpose, version: u32) -> u64 {
        lock(&self.usage)
            .values()
            .map(|r| r.records.get(&(purpose, version)).copied().unwrap_or(0))
            .sum()
    }
}

pub(super) fn get_keys(
    shared: &Shared,
    request: &pb::GetKeysRequest,
) -> Result<pb::GetKeysResponse, ServiceError> {
    shared.check_not_restored(request.generation_seen)?;
    let keys = shared.snapshot();
    tracing::info!(versions = keys.keys.len(), "served key versions");
    Ok(keys)
}

/// The current set at once, then one after every change. Ends at shutdown so that
/// graceful shutdown is not held up by open streams.
pub(super) fn watch_keys(
    shared: &Arc<Shared>,
    generation_seen: u64,
    shutdown: Shutdown,
) -> Result<KeyStream, ServiceError> {
    shared.check_not_restored(generation_seen)?;
    tracing::info!("a vault is watching the key set");
    let changes = shared.changes.subscribe();
    let shared = Arc::clone(shared);
    Ok(Box::pin(
        tokio_stream::wrappers::WatchStream::new(changes)
            .map(move |_| Ok(shared.snapshot()))
            .take_until(shutdown.wait()),
    ))
}

pub(super) fn lease_budget(
    shared: &Shared,
    caller: &str,
    request: &pb::LeaseBudgetRequest,
) -> Result<pb::LeaseBudgetResponse, ServiceError> {
    let purpose = purpose_from_wire(request.purpose)?;
    shared.check_not_restored(request.generation_seen)?;
    let lifecycle = &shared.lifecycle;
    let lease = shared.mutate(|keyring| {
        Ok(keyring.lease(
            purpose,
            lifecycle.max_encryptions_per_version,
            lifecycle.lease_size,
            now_unix_ms(),
        )?)
    })?;
    let version = lease.version;
    if lease.rotated {
        tracing::info!(
            purpose = purpose.name(),
            version,
            "encryption budget spent: rotated"
        );
        shared.metrics.rotated(purpose.name(), "budget");
        shared.announce();
        shared.record(NewEvent {
            actor: "keyservice",
            action: "rotate",
            purpose: Some(purpose.name()),
            version,
            outcome: "ok".into(),
            detail: "the previous version's encryption budget is spent".into(),
        })?;
    }
    shared.record(NewEvent {
        actor: caller,
        action: "lease",
        purpose: Some(purpose.name()),
        version,
        outcome: "ok".into(),
        detail: format!("{} encryptions", lease.granted),
    })?;
    let keyring = lock(&shared.keyring);
    let v = keyring.version(purpose, version)?;
    let material = v.material.as_ref().ok_or(ServiceError::Inconsistent(
        "the active version has no material",
    ))?;
    Ok(pb::LeaseBudgetResponse {
        key: Some(pb::KeyMaterial {
            purpose: purpose_to_wire(purpose) as i32,
            version,
            state: state_to_wire(v.state) as i32,
            material: material.expose_secret().to_vec(),
            deactivated_at_unix_ms: v.deactivated_at_unix_ms,
        }),
        encryptions: lease.granted,
        version_remaining: lease.remaining,
        generation: keyring.generation(),
    })
}

pub(super) fn report_usage(
    shared: &Shared,
    caller: String,
    request: pb::ReportUsageRequest,
) -> Result<pb::ReportUsageResponse, ServiceError> {
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
    lock(&shared.usage).insert(
        (caller, request.instance),
        UsageReport {
            at_unix_ms: now_unix_ms(),
            records,
            active,
        },
    );
    Ok(pb::ReportUsageResponse {})
}

/// Keeps a vault's audit head as its checkpoint, if it is above the one kept.
pub(super) fn report_audit_head(
    shared: &Shared,
    caller: String,
    request: pb::AuditCheckpoint,
) -> Result<pb::ReportAuditHeadResponse, ServiceError> {
    if request.node.is_empty() || request.node.len() > 255 {
        return Err(ServiceError::InvalidArgument {
            field: "node",
            rule: "1 to 255 bytes",
        });
    }
    if request.found_gaps.len() > crate::checkpoints::MAX_GAPS_PER_NODE {
        return Err(ServiceError::InvalidArgument {
            field: "found_gaps",
            rule: "at most 64 gaps",
        });
    }
    // Sequence numbers are stored as PostgreSQL int8 by the vaults.
    if request.sequence == 0 || request.sequence > i64::MAX as u64 || request.chain.len() != 32 {
        return Err(ServiceError::InvalidArgument {
            field: "chain",
            rule: "a sequence number above 0 and a 32-byte chain value",
        });
    }
    let found: Vec<FoundGap> = request
        .found_gaps
        .iter()
        .filter(|gap| {
            gap.first_sequence >= 1
                && gap.first_sequence <= gap.last_sequence
                && gap.last_sequence <= request.sequence
        })
        .map(|gap| FoundGap {
            identity: caller.clone(),
            node: request.node.clone(),
            first: gap.first_sequence,
            last: gap.last_sequence,
        })
        .collect();
    if !found.is_empty() {
        shared
            .checkpoints
            .report_gaps(found)
            .map_err(ServiceError::Checkpoint)?;
    }
    let checkpoint = Checkpoint {
        identity: caller,
        node: request.node,
        sequence: request.sequence,
        chain: hex::encode(&request.chain),
        at_unix_ms: now_unix_ms(),
    };
    let (identity, node, sequence) = (
        checkpoint.identity.clone(),
        checkpoint.node.clone(),
        checkpoint.sequence,
    );
    match shared
        .checkpoints
        .report(checkpoint)
        .map_err(ServiceError::Checkpoint)?
    {
        Reported::Moved | Reported::Same => {}
        Reported::TooMany => tracing::warn!(
            %identity,
            %node,
            "a vault identity reported more node names than are kept; this one is not"
        ),
        Reported::Behind => tracing::warn!(
            %identity,
            %node,
            sequence,
            "a vault reported an audit head behind its checkpoint; its `audit verify` reports the gap"
        ),
    }
    Ok(pb::ReportAuditHeadResponse {})
}

/// Keeps a vault's erasures durably (see `crate::erasures`).
pub(super) fn report_erasures(
    shared: &Shared,
    caller: &str,
    request: pb::ReportErasuresRequest,
) -> Result<pb::ReportErasuresResponse, ServiceError> {
    if request.erasures.len() > MAX_PER_CALL {
        return Err(ServiceError::InvalidArgument {
            field: "erasures",
            rule: "at most 4096 per call",
        });
    }
    let store = store_id(&request.store_id)?;
    let erasures = request
        .erasures
        .iter()
        .map(|erasure| {
            Some(Erasure {
                id: erasure.id.as_slice().try_into().ok()?,
                deleted_at_unix_ms: erasure.deleted_at_unix_ms,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or(ServiceError::InvalidArgument {
            field: "erasures.id",
            rule: "36 bytes: a 4-byte key version and a 32-byte HMAC",
        })?;
    let kept = shared
        .erasures
        .append(&store, &erasures)
        .map_err(ServiceError::Erasures)?;
    if !erasures.is_empty() {
        tracing::debug!(caller, reported = erasures.len(), kept, "erasures kept");
    }
    Ok(pb::ReportErasuresResponse { kept })
}

fn store_id(bytes: &[u8]) -> Result<StoreId, ServiceError> {
    bytes.try_into().map_err(|_| ServiceError::InvalidArgument {
        field: "store_id",
        rule: "16 bytes",
    })
}

/// A page of a store's erasures.
pub(super) fn list_erasures(
    shared: &Shared,
    request: &pb::ListErasuresRequest,
) -> Result<pb::ListErasuresResponse, ServiceError> {
    let limit = match request.limit as usize {
        0 => MAX_PER_CALL,
        limit => limit.min(MAX_PER_CALL),
    };
    let store = store_id(&request.store_id)?;
    let (erasures, next, total) = shared.erasures.page(&store, request.after, limit);
    Ok(pb::ListErasuresResponse {
        erasures: erasures
            .into_iter()
            .map(|erasure| pb::Erasure {
                id: erasure.id.to_vec(),
                deleted_at_unix_ms: erasure.deleted_at_unix_ms,
            })
            .collect(),
        next,
        total,
    })
}

/// The checkpoint kept for the caller and `node` (sequence 0 when none).
pub(super) fn audit_checkpoint(
    shared: &Shared,
    caller: &str,
    node: &str,
    other_nodes: bool,
) -> pb::AuditCheckpoint {
    let acknowledged_gaps = shared
        .checkpoints
        .acknowledged(caller, node)
        .into_iter()
        .map(|gap| pb::AcknowledgedGap {
            first_sequence: gap.first,
            last_sequence: gap.last,
            proposed_by: gap.proposed_by,
            approved_by: gap.approved_by,
            approved_at_unix_ms: gap.approved_at_unix_ms,
        })
        .collect();
    let wire = |kept: Checkpoint| pb::AuditCheckpoint {
        node: kept.node,
        sequence: kept.sequence,
        chain: hex::decode(&kept.chain).unwrap_or_default(),
        at_unix_ms: kept.at_unix_ms,
        ..pb::AuditCheckpoint::default()
    };
    let others = if other_nodes {
        shared
            .checkpoints
            .others(caller, node)
            .into_iter()
            .map(wire)
            .collect()
    } else {
        Vec::new()
    };
    let checkpoint = match shared.checkpoints.get(caller, node) {
        Some(kept) => wire(kept),
        None => pb::AuditCheckpoint {
            node: node.to_owned(),
            ..pb::AuditCheckpoint::default()
        },
    };
    let found_gaps = shared
        .checkpoints
        .found(caller, node)
        .into_iter()
        .map(|gap| pb::GapRange {
            first_sequence: gap.first,
            last_sequence: gap.last,
        })
        .collect();
    pb::AuditCheckpoint {
        acknowledged_gaps,
        found_gaps,
        other_nodes: others,
        ..checkpoint
    }
}

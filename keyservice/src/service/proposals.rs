//! Dual control: one admin proposes a destroy, a retirement, an un-retire, a root key
//! change or an audit gap's acknowledgement, a second approves it within the window,
//! and only then is it carried out.

use std::path::Path;

use vault_proto::keys::v1 as pb;

use super::wire::{kind_from_wire, proposal_to_wire, purpose_from_wire};
use super::{Shared, lock, now_unix_ms};
use crate::checkpoints::Acknowledgement;
use crate::error::ServiceError;
use crate::history::NewEvent;
use crate::keyring::{
    AuditGapTarget, Keyring, OperationKind, Proposal, ProposalState, Purpose, RootKey, TenantJob,
};
use crate::lifecycle::{self, Refusal};

impl Shared {
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
        match self.records_reported(keyring, purpose, version, now)? {
            0 => Ok(()),
            records => Err(Refusal::InUse {
                purpose: purpose.name(),
                version,
                records,
            }),
        }
    }

    /// A retirement is allowed when no record uses the version, or, `force`d, whatever
    /// they are; returns how many do.
    fn check_retirable(
        &self,
        keyring: &Keyring,
        purpose: Purpose,
        version: u32,
        force: bool,
        now: i64,
    ) -> Result<u64, Refusal> {
        keyring.check_retire(purpose, version)?;
        let records = self.records_reported(keyring, purpose, version, now)?;
        if records > 0 && !force {
            return Err(Refusal::InUse {
                purpose: purpose.name(),
                version,
                records,
            });
        }
        Ok(records)
    }

    /// The records that use a version, from the vaults' usage reports: every vault
    /// must have reported recently, and after the version stopped being active.
    fn records_reported(
        &self,
        keyring: &Keyring,
        purpose: Purpose,
        version: u32,
        now: i64,
    ) -> Result<u64, Refusal> {
        let deactivated = keyring.version(purpose, version)?.deactivated_at_unix_ms;
        let grace_ms = (self.lifecycle.destroy_grace_secs * 1000) as i64;
        if let Some(silent) = self.silent_vault() {
            return Err(Refusal::UsageUnknown(format!(
                "vault identity {silent} has not reported key usage since the keyservice \
                 started; a destroy needs a fresh report from every vault (running vaults \
                 report every few seconds)"
            )));
        }
        let reports = lock(&self.usage);
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
        Ok(records)
    }

    /// Carries out an accepted restore: every purpose rotated to a version above any
    /// the keyring or a vault's usage report knows (the restored copy may lack versions
    /// made after it, whose numbers must not be reused), the versions the key history
    /// shows destroyed destroyed again, and the generation moved to `seen` (the save
    /// then puts it above). Returns the versions destroyed again.
    fn accept_restore(
        &self,
        keyring: &mut Keyring,
        seen: u64,
        now: i64,
    ) -> Result<Vec<(Purpose, u32)>, ServiceError> {
        if let Some(silent) = self.silent_vault() {
            return Err(ServiceError::Refused(Refusal::UsageUnknown(format!(
                "vault identity {silent} has not reported its key usage since the keyservice \
                 started: the new versions must be numbered above every version a vault \
                 uses (running vaults report every few seconds)"
            ))));
        }
        if seen >= u64::MAX / 2 {
            return Err(ServiceError::Inconsistent(
                "a vault reported an implausible keyring generation",
            ));
        }
        for purpose in Purpose::ALL {
            keyring
                .rotate_above(purpose, self.highest_reported(purpose), now)
                .map_err(|_| ServiceError::Random)?;
        }
        let mut destroyed_again = Vec::new();
        for event in self.history.read(0).map_err(ServiceError::HistoryBefore)? {
            let destroyed = event.action == "approve"
                && event.outcome == "ok"
                && event.detail.starts_with("destroy ");
            let purpose = Purpose::ALL
                .into_iter()
                .find(|p| Some(p.name()) == event.purpose.as_deref());
            if let (true, Some(purpose)) = (destroyed, purpose)
                && keyring
                    .version(purpose, event.version)
                    .is_ok_and(|v| v.material.is_some())
            {
                keyring.destroy(purpose, event.version)?;
                destroyed_again.push((purpose, event.version));
            }
        }
        keyring.generation = keyring.generation.max(seen);
        Ok(destroyed_again)
    }

    /// Carries out an approved root key change: stage the new key beside the old one,
    /// save the keyring under it, then move it into place. `bind` finishes a change
    /// that a crash interrupted.
    fn change_root_key(
        &self,
        keyring: &mut Keyring,
        new_root_file: &str,
    ) -> Result<(), ServiceError> {
        let new_root =
            RootKey::from_file(Path::new(new_root_file)).map_err(ServiceError::NewRootKey)?;
        let staged = crate::pending_root_key_file(&self.root_key_file);
        new_root
            .write_file(&staged)
            .map_err(ServiceError::RootKeyChange)?;
        if let Err(e) = self.save(keyring, &new_root) {
            let _ = std::fs::remove_file(&staged);
            return Err(ServiceError::RootKeyChange(e));
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

pub(super) fn propose(
    shared: &Shared,
    caller: &str,
    request: pb::ProposeOperationRequest,
) -> Result<pb::Proposal, ServiceError> {
    let now = now_unix_ms();
    let kind = kind_from_wire(request.kind)?;
    if kind.is_tenant_job() {
        return Err(ServiceError::InvalidArgument {
            field: "kind",
            rule: "an import or export is proposed through a vault by an identity with the \
                   tenant's `import` or `export` permission (vaultctl import propose, \
                   vaultctl export propose), not by a key admin",
        });
    }
    let audit_gap = match kind {
        OperationKind::AuditGap => Some(audit_gap_target(request.audit_gap.as_ref())?),
        _ => None,
    };
    let (purpose, new_root_key_file) = match kind {
        OperationKind::AuditGap => (None, None),
        OperationKind::AcceptRestore => {
            let ours = lock(&shared.keyring).generation();
            if shared.generation_seen() <= ours {
                return Err(ServiceError::Refused(Refusal::NotRestored));
            }
            (None, None)
        }
        OperationKind::RootKeyChange => {
            if request.new_root_key_file.is_empty() {
                return Err(ServiceError::InvalidArgument {
                    field: "new_root_key_file",
                    rule: "required for a root key change",
                });
            }
            // Checked now so that a typo fails before a second admin is asked.
            RootKey::from_file(Path::new(&request.new_root_key_file))
                .map_err(ServiceError::NewRootKey)?;
            (None, Some(request.new_root_key_file))
        }
        _ => (Some(purpose_from_wire(request.purpose)?), None),
    };
    if request.force && kind != OperationKind::Retire {
        return Err(ServiceError::InvalidArgument {
            field: "force",
            rule: "only a retirement can be forced",
        });
    }
    let mut id_bytes = [0u8; 6];
    envelope::fill_random(&mut id_bytes).map_err(|_| ServiceError::Random)?;
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
        proposed_by: caller.to_owned(),
        proposed_at_unix_ms: now,
        expires_at_unix_ms: now + (shared.lifecycle.approval_window_secs * 1000) as i64,
        state: ProposalState::Pending,
        approved_by: None,
        approved_at_unix_ms: 0,
        audit_gap,
        force: request.force,
        records: 0,
        job: None,
    };
    let mut proposal = proposal;
    let event = NewEvent {
        actor: caller,
        action: "propose",
        purpose: purpose.map(Purpose::name),
        version: proposal.version,
        detail: match &proposal.audit_gap {
            Some(gap) => format!(
                "{} {} ({}..={} of {} at {})",
                lifecycle::kind_name(kind),
                proposal.id,
                gap.first,
                gap.last,
                gap.identity,
                gap.node
            ),
            None => format!("{} {}", lifecycle::kind_name(kind), proposal.id),
        },
        ..Default::default()
    };
    // Fail fast; checked again, authoritatively, at approval.
    match (kind, purpose) {
        (OperationKind::Destroy, Some(purpose)) => {
            let keyring = lock(&shared.keyring);
            shared
                .check_unused(&keyring, purpose, proposal.version, now)
                .map_err(|r| shared.refused(event.clone(), r))?;
        }
        (OperationKind::Retire, Some(purpose)) => {
            let keyring = lock(&shared.keyring);
            proposal.records = shared
                .check_retirable(&keyring, purpose, proposal.version, proposal.force, now)
                .map_err(|r| shared.refused(event.clone(), r))?;
        }
        _ => {}
    }
    let event = NewEvent {
        detail: match proposal.records {
            0 => event.detail.clone(),
            records => format!(
                "{} (forced: {records} records use the version)",
                event.detail
            ),
        },
        ..event
    };
    let stored = shared
        .mutate_if(kind == OperationKind::AcceptRestore, |keyring| {
            Ok(proposal_to_wire(&keyring.propose(proposal)?, now))
        })
        .map_err(|e| shared.refuse(event.clone(), e))?;
    shared.record(NewEvent {
        outcome: "ok".into(),
        ..event
    })?;
    tracing::info!(id = %stored.id, kind = lifecycle::kind_name(kind), "proposed");
    Ok(stored)
}

pub(super) fn approve(
    shared: &Shared,
    caller: &str,
    id: &str,
) -> Result<pb::Proposal, ServiceError> {
    let now = now_unix_ms();
    let mut event = NewEvent {
        actor: caller,
        action: "approve",
        detail: id.to_owned(),
        ..Default::default()
    };
    // Checked and carried out under the keyring lock: two approvals of the same
    // proposal cannot both pass.
    let mut keyring = lock(&shared.keyring);
    let proposal = keyring
        .check_approval(id, caller, now)
        .map_err(|r| shared.refused(event.clone(), r))?;
    if proposal.kind.is_tenant_job() {
        return Err(shared.refused(event.clone(), Refusal::TenantJob(id.to_owned())));
    }
    // A restored keyring accepts nothing but its acceptance.
    if let Some(refusal) = shared
        .restored(&keyring)
        .filter(|_| proposal.kind != OperationKind::AcceptRestore)
    {
        return Err(shared.refused(event.clone(), refusal));
    }
    // The state before, to restore if the change cannot be made durable.
    let before = shared.seal(&keyring)?;
    event.purpose = proposal.purpose().map(Purpose::name);
    event.version = proposal.version;
    event.detail = format!("{} {id}", lifecycle::kind_name(proposal.kind));
    // Irreversible operations are recorded before they are carried out; if the
    // history cannot be written, nothing is done.
    shared.record_intent(NewEvent {
        outcome: "started".into(),
        ..event.clone()
    })?;
    match (proposal.kind, proposal.purpose()) {
        (OperationKind::Destroy, Some(purpose)) => {
            shared
                .check_unused(&keyring, purpose, proposal.version, now)
                .and_then(|()| keyring.destroy(purpose, proposal.version))
                .map_err(|r| shared.refused(event.clone(), r))?;
        }
        (OperationKind::Retire, Some(purpose)) => {
            let records = shared
                .check_retirable(&keyring, purpose, proposal.version, proposal.force, now)
                .and_then(|records| {
                    keyring.retire(purpose, proposal.version)?;
                    Ok(records)
                })
                .map_err(|r| shared.refused(event.clone(), r))?;
            if records > 0 {
                event.detail = format!(
                    "{} (forced: {records} records use the version)",
                    event.detail
                );
                tracing::warn!(
                    purpose = purpose.name(),
                    version = proposal.version,
                    records,
                    "retired by force: these records are unreadable until the version is un-retired"
                );
            }
        }
        (OperationKind::Unretire, Some(purpose)) => {
            keyring
                .unretire(purpose, proposal.version)
                .map_err(|r| shared.refused(event.clone(), r))?;
        }
        (OperationKind::RootKeyChange, _) => {}
        (OperationKind::AcceptRestore, _) => {
            let seen = shared.generation_seen();
            let ours = keyring.generation();
            if seen <= ours {
                return Err(shared.refused(event.clone(), Refusal::NotRestored));
            }
            let destroyed_again = match shared.accept_restore(&mut keyring, seen, now) {
                Ok(destroyed) => destroyed,
                Err(error) => {
                    // Rotations already made in memory must not reach the next save.
                    shared.restore(&mut keyring, &before);
                    return Err(error);
                }
            };
            event.detail = format!(
                "{} (keyring generation {ours}, a vault had seen {seen}; every purpose \
                 rotated; destroyed again: {destroyed_again:?})",
                event.detail
            );
            tracing::warn!(
                ours,
                seen,
                ?destroyed_again,
                "restored keyring accepted: every purpose rotated"
            );
        }
        (OperationKind::AuditGap, _) => {
            let gap = proposal
                .audit_gap
                .as_ref()
                .ok_or(ServiceError::Inconsistent(
                    "audit-gap proposal names no gap",
                ))?;
            // Recorded before the proposal is marked approved: should the keyring save
            // fail after it, the gap stays acknowledged and the proposal open, which a
            // second approval only repeats.
            let reported = shared
                .checkpoints
                .acknowledge(Acknowledgement {
                    identity: gap.identity.clone(),
                    node: gap.node.clone(),
                    first: gap.first,
                    last: gap.last,
                    proposed_by: proposal.proposed_by.clone(),
                    approved_by: caller.to_owned(),
                    approved_at_unix_ms: now,
                })
                .map_err(ServiceError::Checkpoint)?;
            if !reported {
                return Err(shared.refused(
                    event.clone(),
                    Refusal::NoSuchGap(format!(
                        "{} at {} reported no gap {}..={}: `vaultctl audit verify` on that \
                         vault lists its gaps, and the range must match one exactly",
                        gap.identity, gap.node, gap.first, gap.last
                    )),
                ));
            }
        }
        _ => {
            return Err(ServiceError::Inconsistent(
                "stored proposal names no key purpose",
            ));
        }
    }
    keyring.mark_approved(id, caller, now);
    let saved = match (proposal.kind, &proposal.new_root_key_file) {
        (OperationKind::RootKeyChange, Some(file)) => shared.change_root_key(&mut keyring, file),
        _ => shared
            .save(&mut keyring, &lock(&shared.root))
            .map_err(ServiceError::Save),
    };
    if let Err(error) = saved {
        shared.restore(&mut keyring, &before);
        return Err(error);
    }
    let approved = keyring
        .proposals
        .iter()
        .find(|p| p.id == id)
        .map(|p| proposal_to_wire(p, now))
        .ok_or(ServiceError::Inconsistent("approved proposal vanished"))?;
    drop(keyring);
    shared.announce();
    shared.record(NewEvent {
        outcome: "ok".into(),
        ..event
    })?;
    tracing::info!(%id, kind = lifecycle::kind_name(proposal.kind), "approved and carried out");
    Ok(approved)
}

pub(super) fn list(shared: &Shared) -> pb::ListProposalsResponse {
    let now = now_unix_ms();
    let proposals = lock(&shared.keyring)
        .proposals
        .iter()
        .map(|p| proposal_to_wire(p, now))
        .collect();
    pb::ListProposalsResponse { proposals }
}

/// The gap an audit-gap proposal names, checked.
fn audit_gap_target(gap: Option<&pb::AuditGap>) -> Result<AuditGapTarget, ServiceError> {
    let gap = gap.ok_or(ServiceError::InvalidArgument {
        field: "audit_gap",
        rule: "required for an audit-gap proposal",
    })?;
    if gap.vault_identity.is_empty() || gap.node.is_empty() {
        return Err(ServiceError::InvalidArgument {
            field: "audit_gap.vault_identity",
            rule: "the vault's identity and node name are required",
        });
    }
    if gap.first_sequence == 0 || gap.last_sequence < gap.first_sequence {
        return Err(ServiceError::InvalidArgument {
            field: "audit_gap.first_sequence",
            rule: "first and last sequence numbers, 1 <= first <= last",
        });
    }
    Ok(AuditGapTarget {
        identity: gap.vault_identity.clone(),
        node: gap.node.clone(),
        first: gap.first_sequence,
        last: gap.last_sequence,
    })
}

/// A tenant job (import) proposed through vault `vault`, which checked that
/// `request.on_behalf_of` holds the tenant's permission for it. Kept with the other
/// proposals (sealed, in the key history); the keyservice carries nothing out.
pub(super) fn propose_job(
    shared: &Shared,
    vault: &str,
    request: pb::ProposeJobRequest,
) -> Result<pb::Proposal, ServiceError> {
    let now = now_unix_ms();
    let kind = kind_from_wire(request.kind)?;
    if !kind.is_tenant_job() {
        return Err(ServiceError::InvalidArgument {
            field: "kind",
            rule: "a vault proposes tenant jobs only (import, export)",
        });
    }
    let job = request.job.ok_or(ServiceError::InvalidArgument {
        field: "job",
        rule: "required",
    })?;
    if job.tenant.is_empty() || job.on_behalf_of.is_empty() {
        return Err(ServiceError::InvalidArgument {
            field: "job.tenant",
            rule: "the tenant and the identity the vault proposes for are required",
        });
    }
    if kind == OperationKind::Import && job.expected_rows == 0 {
        return Err(ServiceError::InvalidArgument {
            field: "job.expected_rows",
            rule: "must be at least 1",
        });
    }
    // The approval binds the file: an import names the digest of the file it takes.
    let hex_of =
        |text: &str, len: usize| text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit());
    if kind == OperationKind::Import && !hex_of(&job.file_sha256, 64) {
        return Err(ServiceError::InvalidArgument {
            field: "job.file_sha256",
            rule: "required for an import: the hex SHA-256 of the encrypted file (64 digits)",
        });
    }
    if !job.sender_key_fingerprint.is_empty() && !hex_of(&job.sender_key_fingerprint, 40) {
        return Err(ServiceError::InvalidArgument {
            field: "job.sender_key_fingerprint",
            rule: "an OpenPGP v4 fingerprint: 40 hex digits",
        });
    }
    if kind == OperationKind::Export
        && !(job.file_sha256.is_empty() && job.sender_key_fingerprint.is_empty())
    {
        return Err(ServiceError::InvalidArgument {
            field: "job.file_sha256",
            rule: "an export names no file",
        });
    }
    if kind == OperationKind::Export && (job.processor.is_empty() || job.selection.is_empty()) {
        return Err(ServiceError::InvalidArgument {
            field: "job.processor",
            rule: "an export names its processor and its selection",
        });
    }
    let mut id_bytes = [0u8; 6];
    envelope::fill_random(&mut id_bytes).map_err(|_| ServiceError::Random)?;
    let proposal = Proposal {
        id: format!("p-{}", hex::encode(id_bytes)),
        kind,
        purpose: None,
        version: 0,
        new_root_key_file: None,
        proposed_by: job.on_behalf_of.clone(),
        proposed_at_unix_ms: now,
        expires_at_unix_ms: now + (shared.lifecycle.approval_window_secs * 1000) as i64,
        state: ProposalState::Pending,
        approved_by: None,
        approved_at_unix_ms: 0,
        audit_gap: None,
        force: false,
        records: 0,
        job: Some(TenantJob {
            vault_identity: vault.to_owned(),
            tenant: job.tenant.clone(),
            expected_rows: job.expected_rows,
            processor: job.processor.clone(),
            selection: job.selection.clone(),
            file_sha256: job.file_sha256.to_ascii_lowercase(),
            sender_key_fingerprint: job.sender_key_fingerprint.to_ascii_uppercase(),
            claimed_by: None,
            claimed_at_unix_ms: 0,
            claim_by_unix_ms: 0,
            finished_at_unix_ms: 0,
        }),
    };
    let event = NewEvent {
        actor: &job.on_behalf_of,
        action: "propose",
        detail: match kind {
            OperationKind::Export => format!(
                "{} {} (tenant {}, to processor {}, tokens {}, through {vault})",
                lifecycle::kind_name(kind),
                proposal.id,
                job.tenant,
                job.processor,
                job.selection
            ),
            _ => format!(
                "{} {} (tenant {}, {} rows, file sha256 {}, sender key {}, through {vault})",
                lifecycle::kind_name(kind),
                proposal.id,
                job.tenant,
                job.expected_rows,
                job.file_sha256.to_ascii_lowercase(),
                match job.sender_key_fingerprint.as_str() {
                    "" => "none".to_owned(),
                    fpr => fpr.to_ascii_uppercase(),
                }
            ),
        },
        ..Default::default()
    };
    let stored = shared
        .mutate_if(false, |keyring| {
            Ok(proposal_to_wire(&keyring.propose(proposal)?, now))
        })
        .map_err(|e| shared.refuse(event.clone(), e))?;
    shared.record(NewEvent {
        outcome: "ok".into(),
        ..event
    })?;
    tracing::info!(id = %stored.id, kind = lifecycle::kind_name(kind), "job proposed");
    Ok(stored)
}

/// Approves a tenant job for `request.approved_by`, whom vault `vault` checked holds
/// the tenant's permission: refused for the proposer (dual control), once approved,
/// once expired, and for another tenant's job.
pub(super) fn approve_job(
    shared: &Shared,
    vault: &str,
    request: &pb::ApproveJobRequest,
) -> Result<pb::Proposal, ServiceError> {
    let now = now_unix_ms();
    if request.approved_by.is_empty() || request.tenant.is_empty() {
        return Err(ServiceError::InvalidArgument {
            field: "approved_by",
            rule: "the approver and tenant are required",
        });
    }
    let kind = kind_from_wire(request.kind)?;
    let id = request.id.as_str();
    let mut event = NewEvent {
        actor: &request.approved_by,
        action: "approve",
        detail: format!("{id} (through {vault})"),
        ..Default::default()
    };
    let mut keyring = lock(&shared.keyring);
    let proposal = match keyring.proposals.iter().find(|p| p.id == id) {
        Some(p)
            if p.kind.is_tenant_job()
                && p.kind == kind
                && p.job.as_ref().is_some_and(|j| j.tenant == request.tenant) =>
        {
            keyring
                .check_approval(id, &request.approved_by, now)
                .map_err(|r| shared.refused(event.clone(), r))?
        }
        _ => return Err(shared.refused(event.clone(), Refusal::NotThisJob(id.to_owned()))),
    };
    event.detail = format!(
        "{} {id} (through {vault})",
        lifecycle::kind_name(proposal.kind)
    );
    let before = shared.seal(&keyring)?;
    keyring.mark_job_approved(id, &request.approved_by, now, shared.approval_window_ms());
    if let Err(error) = shared.save(&mut keyring, &lock(&shared.root)) {
        shared.restore(&mut keyring, &before);
        return Err(ServiceError::Save(error));
    }
    let approved = keyring
        .proposals
        .iter()
        .find(|p| p.id == id)
        .map(|p| proposal_to_wire(p, now))
        .ok_or(ServiceError::Inconsistent("approved proposal vanished"))?;
    drop(keyring);
    shared.record(NewEvent {
        outcome: "ok".into(),
        ..event
    })?;
    tracing::info!(%id, kind = lifecycle::kind_name(proposal.kind), "job approved");
    Ok(approved)
}

/// A tenant job as the keyservice keeps it, for the vault that runs it.
pub(super) fn get_job(shared: &Shared, id: &str) -> Result<pb::Proposal, ServiceError> {
    let now = now_unix_ms();
    lock(&shared.keyring)
        .proposals
        .iter()
        .find(|p| p.id == id && p.kind.is_tenant_job())
        .map(|p| proposal_to_wire(p, now))
        .ok_or_else(|| ServiceError::Refused(Refusal::NoSuchProposal(id.to_owned())))
}

/// Which job a claim or finish names, checked.
fn job_target(id: &str, tenant: &str, kind: i32) -> Result<OperationKind, ServiceError> {
    if id.is_empty() || tenant.is_empty() {
        return Err(ServiceError::InvalidArgument {
            field: "id",
            rule: "the job id and tenant are required",
        });
    }
    let kind = kind_from_wire(kind)?;
    if !kind.is_tenant_job() {
        return Err(ServiceError::InvalidArgument {
            field: "kind",
            rule: "only tenant jobs (import, export) are claimed",
        });
    }
    Ok(kind)
}

/// A job's state change (claim, finish) for vault `vault`, durable like an approval:
/// checked and made under the keyring lock (two claims cannot both pass), saved before
/// it is answered (restored if the save fails), then written to the key history.
fn job_transition(
    shared: &Shared,
    vault: &str,
    action: &'static str,
    (id, tenant, kind): (&str, &str, OperationKind),
    change: impl FnOnce(&mut Keyring, i64) -> Result<bool, Refusal>,
) -> Result<pb::Proposal, ServiceError> {
    let now = now_unix_ms();
    let event = NewEvent {
        actor: vault,
        action,
        detail: format!(
            "{} {id} (tenant {tenant}, by vault {vault})",
            lifecycle::kind_name(kind)
        ),
        ..Default::default()
    };
    let mut keyring = lock(&shared.keyring);
    let before = shared.seal(&keyring)?;
    let changed = change(&mut keyring, now).map_err(|r| shared.refused(event.clone(), r))?;
    if changed && let Err(error) = shared.save(&mut keyring, &lock(&shared.root)) {
        shared.restore(&mut keyring, &before);
        return Err(ServiceError::Save(error));
    }
    let mut answer = keyring
        .proposals
        .iter()
        .find(|p| p.id == id)
        .map(|p| proposal_to_wire(p, now))
        .ok_or(ServiceError::Inconsistent("claimed job vanished"))?;
    // A claim that changed nothing is a job RUNNING under this vault already.
    answer.resumed = action == "claim" && !changed;
    drop(keyring);
    shared.record(NewEvent {
        outcome: match changed {
            true => "ok".into(),
            false => "ok (again, unchanged)".into(),
        },
        ..event
    })?;
    tracing::info!(%id, kind = lifecycle::kind_name(kind), action, changed, "tenant job");
    Ok(answer)
}

/// Claims an approved tenant job for vault `vault` (see [`Keyring::claim_job`]).
pub(super) fn claim_job(
    shared: &Shared,
    vault: &str,
    request: &pb::ClaimJobRequest,
) -> Result<pb::Proposal, ServiceError> {
    let kind = job_target(&request.id, &request.tenant, request.kind)?;
    let window_ms = shared.approval_window_ms();
    job_transition(
        shared,
        vault,
        "claim",
        (&request.id, &request.tenant, kind),
        |keyring, now| keyring.claim_job(&request.id, &request.tenant, kind, vault, now, window_ms),
    )
}

/// Finishes a tenant job vault `vault` claimed (see [`Keyring::finish_job`]).
pub(super) fn finish_job(
    shared: &Shared,
    vault: &str,
    request: &pb::FinishJobRequest,
) -> Result<pb::Proposal, ServiceError> {
    let kind = job_target(&request.id, &request.tenant, request.kind)?;
    job_transition(
        shared,
        vault,
        "finish",
        (&request.id, &request.tenant, kind),
        |keyring, now| keyring.finish_job(&request.id, &request.tenant, kind, vault, now),
    )
}

//! Domain types to protobuf and back. Wire values are checked here, at the edge;
//! nothing below a handler sees a raw enum number.

use vault_proto::keys::v1 as pb;

use crate::error::ServiceError;
use crate::keyring::{OperationKind, Proposal, ProposalState, Purpose, State};

pub(super) fn purpose_to_wire(purpose: Purpose) -> pb::KeyPurpose {
    match purpose {
        Purpose::CardData => pb::KeyPurpose::CardData,
        Purpose::Fingerprint => pb::KeyPurpose::Fingerprint,
        Purpose::Cvc => pb::KeyPurpose::Cvc,
        Purpose::Audit => pb::KeyPurpose::Audit,
        Purpose::Intake => pb::KeyPurpose::Intake,
        Purpose::Import => pb::KeyPurpose::Import,
        Purpose::ImportRsa => pb::KeyPurpose::ImportRsa,
    }
}

pub(super) fn purpose_from_wire(purpose: i32) -> Result<Purpose, ServiceError> {
    match pb::KeyPurpose::try_from(purpose) {
        Ok(pb::KeyPurpose::CardData) => Ok(Purpose::CardData),
        Ok(pb::KeyPurpose::Fingerprint) => Ok(Purpose::Fingerprint),
        Ok(pb::KeyPurpose::Cvc) => Ok(Purpose::Cvc),
        Ok(pb::KeyPurpose::Audit) => Ok(Purpose::Audit),
        Ok(pb::KeyPurpose::Intake) => Ok(Purpose::Intake),
        Ok(pb::KeyPurpose::Import) => Ok(Purpose::Import),
        Ok(pb::KeyPurpose::ImportRsa) => Ok(Purpose::ImportRsa),
        _ => Err(ServiceError::InvalidArgument {
            field: "purpose",
            rule: "must be card-data, fingerprint, cvc, audit, intake, import or import-rsa",
        }),
    }
}

pub(super) fn kind_from_wire(kind: i32) -> Result<OperationKind, ServiceError> {
    match pb::OperationKind::try_from(kind) {
        Ok(pb::OperationKind::Destroy) => Ok(OperationKind::Destroy),
        Ok(pb::OperationKind::Unretire) => Ok(OperationKind::Unretire),
        Ok(pb::OperationKind::RootKeyChange) => Ok(OperationKind::RootKeyChange),
        Ok(pb::OperationKind::AuditGap) => Ok(OperationKind::AuditGap),
        Ok(pb::OperationKind::Retire) => Ok(OperationKind::Retire),
        Ok(pb::OperationKind::AcceptRestore) => Ok(OperationKind::AcceptRestore),
        Ok(pb::OperationKind::Import) => Ok(OperationKind::Import),
        Ok(pb::OperationKind::Export) => Ok(OperationKind::Export),
        _ => Err(ServiceError::InvalidArgument {
            field: "kind",
            rule: "must be destroy, retire, unretire, root-key-change, audit-gap or accept-restore",
        }),
    }
}

pub(super) fn state_to_wire(state: State) -> pb::KeyState {
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
        OperationKind::AuditGap => pb::OperationKind::AuditGap,
        OperationKind::Retire => pb::OperationKind::Retire,
        OperationKind::AcceptRestore => pb::OperationKind::AcceptRestore,
        OperationKind::Import => pb::OperationKind::Import,
        OperationKind::Export => pb::OperationKind::Export,
    }
}

pub(super) fn proposal_to_wire(p: &Proposal, now: i64) -> pb::Proposal {
    let claim_by = p.job.as_ref().map_or(0, |j| j.claim_by_unix_ms);
    let state = match p.state {
        ProposalState::Approved if claim_by != 0 && now >= claim_by => pb::ProposalState::Expired,
        ProposalState::Approved => pb::ProposalState::Approved,
        ProposalState::Running => pb::ProposalState::Running,
        ProposalState::Done => pb::ProposalState::Done,
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
        audit_gap: p.audit_gap.as_ref().map(|gap| pb::AuditGap {
            vault_identity: gap.identity.clone(),
            node: gap.node.clone(),
            first_sequence: gap.first,
            last_sequence: gap.last,
        }),
        force: p.force,
        records: p.records,
        job: p.job.as_ref().map(|job| pb::TenantJob {
            vault_identity: job.vault_identity.clone(),
            tenant: job.tenant.clone(),
            expected_rows: job.expected_rows,
            on_behalf_of: String::new(),
            processor: job.processor.clone(),
            selection: job.selection.clone(),
            file_sha256: job.file_sha256.clone(),
            sender_key_fingerprint: job.sender_key_fingerprint.clone(),
        }),
        claimed_by: p
            .job
            .as_ref()
            .and_then(|j| j.claimed_by.clone())
            .unwrap_or_default(),
        claimed_at_unix_ms: p.job.as_ref().map_or(0, |j| j.claimed_at_unix_ms),
        claim_by_unix_ms: claim_by,
        finished_at_unix_ms: p.job.as_ref().map_or(0, |j| j.finished_at_unix_ms),
        resumed: false,
    }
}

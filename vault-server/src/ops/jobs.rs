//! Tenant jobs' approvals are used once (security finding HIGH #2): before a vault
//! uses an approved import or export it claims the job at the keyservice, which moves
//! it from APPROVED to RUNNING under this vault's certificate identity (a
//! compare-and-set: a second claim, by another vault or for a second export run, is
//! refused), and marks it DONE when the job is finished. Both steps are written to the
//! vault's audit log (`ClaimImport`, `FinishImport`, `ClaimExport`, `FinishExport`)
//! as well as to the keyservice's key history.

use runtime::now_unix_ms;
use vault_proto::keys::v1 as keys_pb;

use super::records::Records;
use crate::audit::AuditEvent;
use crate::error::VaultError;
use crate::policy::Caller;
use crate::store::Store;

/// A job's state as vaultctl shows it.
pub fn state_name(p: &keys_pb::Proposal) -> &'static str {
    match keys_pb::ProposalState::try_from(p.state) {
        Ok(keys_pb::ProposalState::Pending) => "pending",
        Ok(keys_pb::ProposalState::Approved) => "approved",
        Ok(keys_pb::ProposalState::Running) => "running",
        Ok(keys_pb::ProposalState::Done) => "done",
        Ok(keys_pb::ProposalState::Expired) => "expired",
        _ => "unknown",
    }
}

/// Why a claim or finish failed: the keyservice's answer (passed on with its code), or
/// the audit log, without which nothing goes on.
#[derive(Debug)]
pub enum StepError {
    Keyservice(tonic::Status),
    Audit(VaultError),
}

fn kind_name(kind: keys_pb::OperationKind) -> &'static str {
    match kind {
        keys_pb::OperationKind::Export => "Export",
        _ => "Import",
    }
}

/// Claims approved job `id` of the caller's tenant for this vault (APPROVED ->
/// RUNNING), then audits the claim. Returns the job as the keyservice now holds it.
pub async fn claim<S: Store>(
    records: &Records<S>,
    caller: &Caller,
    id: &str,
    kind: keys_pb::OperationKind,
) -> Result<keys_pb::Proposal, StepError> {
    let proposal = records
        .keys()
        .keyservice()
        .claim_job(keys_pb::ClaimJobRequest {
            id: id.to_owned(),
            tenant: caller.tenant.as_str().to_owned(),
            kind: kind as i32,
        })
        .await
        .map_err(StepError::Keyservice)?
        .into_inner();
    audit(records, caller, id, kind, "Claim", &proposal).await?;
    tracing::info!(job = %id, kind = kind_name(kind), "tenant job claimed");
    Ok(proposal)
}

/// Marks job `id`, claimed by this vault, done (RUNNING -> DONE), then audits it.
pub async fn finish<S: Store>(
    records: &Records<S>,
    caller: &Caller,
    id: &str,
    kind: keys_pb::OperationKind,
) -> Result<(), StepError> {
    let proposal = records
        .keys()
        .keyservice()
        .finish_job(keys_pb::FinishJobRequest {
            id: id.to_owned(),
            tenant: caller.tenant.as_str().to_owned(),
            kind: kind as i32,
        })
        .await
        .map_err(StepError::Keyservice)?
        .into_inner();
    audit(records, caller, id, kind, "Finish", &proposal).await?;
    tracing::info!(job = %id, kind = kind_name(kind), "tenant job finished");
    Ok(())
}

async fn audit<S: Store>(
    records: &Records<S>,
    caller: &Caller,
    id: &str,
    kind: keys_pb::OperationKind,
    step: &str,
    proposal: &keys_pb::Proposal,
) -> Result<(), StepError> {
    records
        .journal()
        .audit(AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: caller.identity.clone(),
            peer: "-".into(),
            action: format!("{step}{}", kind_name(kind)),
            tenant: caller.tenant.as_str().to_owned(),
            outcome: "ok".into(),
            request_id: caller.request_id.clone(),
            detail: format!(
                "{} job {id}: {} (claimed by vault {})",
                kind_name(kind).to_ascii_lowercase(),
                state_name(proposal),
                proposal.claimed_by
            ),
            ..AuditEvent::default()
        })
        .await
        .map_err(StepError::Audit)
}

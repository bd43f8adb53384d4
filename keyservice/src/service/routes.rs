//! The RPCs: which role may call each, and which handler answers it.

use tonic::{Request, Response, Status};
use vault_proto::keys::v1 as pb;

use super::call::Role;
use super::serving::KeyStream;
use super::{KeyServiceImpl, admin, proposals, serving};

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyServiceImpl {
    async fn get_keys(
        &self,
        request: Request<pb::GetKeysRequest>,
    ) -> Result<Response<pb::GetKeysResponse>, Status> {
        self.call("GetKeys", Role::Vault, request, |_, request| {
            serving::get_keys(&self.shared, &request)
        })
    }

    type WatchKeysStream = KeyStream;

    async fn watch_keys(
        &self,
        request: Request<pb::WatchKeysRequest>,
    ) -> Result<Response<KeyStream>, Status> {
        self.open_stream("WatchKeys", Role::Vault, &request, || {
            serving::watch_keys(
                &self.shared,
                request.get_ref().generation_seen,
                self.shutdown.clone(),
            )
        })
    }

    async fn lease_budget(
        &self,
        request: Request<pb::LeaseBudgetRequest>,
    ) -> Result<Response<pb::LeaseBudgetResponse>, Status> {
        self.call("LeaseBudget", Role::Vault, request, |caller, request| {
            serving::lease_budget(&self.shared, &caller, &request)
        })
    }

    async fn report_usage(
        &self,
        request: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        self.call("ReportUsage", Role::Vault, request, |caller, request| {
            serving::report_usage(&self.shared, caller, request)
        })
    }

    async fn report_audit_head(
        &self,
        request: Request<pb::AuditCheckpoint>,
    ) -> Result<Response<pb::ReportAuditHeadResponse>, Status> {
        self.call(
            "ReportAuditHead",
            Role::Vault,
            request,
            |caller, request| serving::report_audit_head(&self.shared, caller, request),
        )
    }

    async fn get_audit_checkpoint(
        &self,
        request: Request<pb::GetAuditCheckpointRequest>,
    ) -> Result<Response<pb::AuditCheckpoint>, Status> {
        self.call(
            "GetAuditCheckpoint",
            Role::Vault,
            request,
            |caller, request| {
                Ok(serving::audit_checkpoint(
                    &self.shared,
                    &caller,
                    &request.node,
                    request.other_nodes,
                ))
            },
        )
    }

    async fn report_erasures(
        &self,
        request: Request<pb::ReportErasuresRequest>,
    ) -> Result<Response<pb::ReportErasuresResponse>, Status> {
        self.call("ReportErasures", Role::Vault, request, |caller, request| {
            serving::report_erasures(&self.shared, &caller, request)
        })
    }

    async fn list_erasures(
        &self,
        request: Request<pb::ListErasuresRequest>,
    ) -> Result<Response<pb::ListErasuresResponse>, Status> {
        self.call("ListErasures", Role::Vault, request, |_, request| {
            serving::list_erasures(&self.shared, &request)
        })
    }

    async fn list_key_versions(
        &self,
        request: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        self.call("ListKeyVersions", Role::Admin, request, |_, _| {
            Ok(admin::list_key_versions(&self.shared))
        })
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.call("RotateKey", Role::Admin, request, |caller, request| {
            admin::rotate_key(&self.shared, &caller, &request)
        })
    }

    async fn retire_key(
        &self,
        request: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        self.call("RetireKey", Role::Admin, request, |caller, request| {
            admin::retire_key(&self.shared, &caller, &request)
        })
    }

    async fn key_history(
        &self,
        request: Request<pb::KeyHistoryRequest>,
    ) -> Result<Response<pb::KeyHistoryResponse>, Status> {
        self.call("KeyHistory", Role::Admin, request, |_, request| {
            admin::key_history(&self.shared, &request)
        })
    }

    async fn propose_operation(
        &self,
        request: Request<pb::ProposeOperationRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.call(
            "ProposeOperation",
            Role::Admin,
            request,
            |caller, request| proposals::propose(&self.shared, &caller, request),
        )
    }

    async fn approve_operation(
        &self,
        request: Request<pb::ApproveOperationRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.call(
            "ApproveOperation",
            Role::Admin,
            request,
            |caller, request| proposals::approve(&self.shared, &caller, &request.id),
        )
    }

    async fn propose_job(
        &self,
        request: Request<pb::ProposeJobRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.call("ProposeJob", Role::Vault, request, |caller, request| {
            proposals::propose_job(&self.shared, &caller, request)
        })
    }

    async fn approve_job(
        &self,
        request: Request<pb::ApproveJobRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.call("ApproveJob", Role::Vault, request, |caller, request| {
            proposals::approve_job(&self.shared, &caller, &request)
        })
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.call("GetJob", Role::Vault, request, |_, request| {
            proposals::get_job(&self.shared, &request.id)
        })
    }

    async fn claim_job(
        &self,
        request: Request<pb::ClaimJobRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.call("ClaimJob", Role::Vault, request, |caller, request| {
            proposals::claim_job(&self.shared, &caller, &request)
        })
    }

    async fn finish_job(
        &self,
        request: Request<pb::FinishJobRequest>,
    ) -> Result<Response<pb::Proposal>, Status> {
        self.call("FinishJob", Role::Vault, request, |caller, request| {
            proposals::finish_job(&self.shared, &caller, &request)
        })
    }

    async fn list_proposals(
        &self,
        request: Request<pb::ListProposalsRequest>,
    ) -> Result<Response<pb::ListProposalsResponse>, Status> {
        self.call("ListProposals", Role::Admin, request, |_, _| {
            Ok(proposals::list(&self.shared))
        })
    }
}

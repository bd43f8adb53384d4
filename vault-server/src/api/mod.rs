//! The Vault gRPC API: the only module that names the types generated from
//! `vault.proto` (`make lint` checks it). Each RPC is one delegation: the envelope
//! (`call`) authorizes and audits, `wire` converts the request into a validated
//! domain command, a use case in `ops` runs it, and `wire` converts the result back.

mod audited;
mod call;
mod import;
mod wire;

use std::sync::Arc;

use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_server::VaultServer;

pub use call::Guards;

use crate::ops::{ImportError, Vault};
use crate::policy::{Caller, Permission};
use crate::store::Store;

/// The gRPC service name, for health reports.
pub const SERVICE_NAME: &str = <VaultServer<VaultApi<crate::store::Engine>> as NamedService>::NAME;

/// The schema of the Vault service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = vault_proto::vault::v1::FILE_DESCRIPTOR_SET;

#[derive(Debug)]
pub struct VaultApi<S> {
    guards: Guards,
    vault: Arc<Vault<S>>,
}

/// The Vault service over `vault`'s use cases, ready for a tonic router.
pub fn service<S: Store>(
    vault: Arc<Vault<S>>,
    guards: Guards,
    max_request_bytes: usize,
) -> VaultServer<VaultApi<S>> {
    VaultServer::new(VaultApi { guards, vault }).max_decoding_message_size(max_request_bytes)
}

#[tonic::async_trait]
impl<S: Store> pb::vault_server::Vault for VaultApi<S> {
    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller: Caller, request| async move {
            let done = records.tokenize(&caller, wire::tokenize(request)?).await?;
            Ok(wire::tokenized(&done, caller.sees_fingerprints))
        };
        self.guards
            .call("Tokenize", |_| Permission::Tokenize, request, call)
            .await
    }

    async fn tokenize_batch(
        &self,
        request: Request<pb::TokenizeBatchRequest>,
    ) -> Result<Response<pb::TokenizeBatchResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller: Caller, request| async move {
            let batch = wire::tokenize_batch(request)?;
            Ok(wire::batch_results(
                records.tokenize_batch(&caller, batch).await?,
                caller.sees_fingerprints,
            ))
        };
        self.guards
            .call("TokenizeBatch", |_| Permission::Tokenize, request, call)
            .await
    }

    async fn get_sealing_key(
        &self,
        request: Request<pb::GetSealingKeyRequest>,
    ) -> Result<Response<pb::SealingKey>, Status> {
        let records = &self.vault.records;
        let call =
            |caller: Caller, _| async move { Ok(wire::sealing_key(records.sealing_key(&caller)?)) };
        self.guards
            .call("GetSealingKey", |_| Permission::Tokenize, request, call)
            .await
    }

    async fn tokenize_sealed(
        &self,
        request: Request<pb::TokenizeSealedRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller: Caller, request| async move {
            let fingerprints = caller.sees_fingerprints;
            let done = records
                .tokenize_sealed(caller, wire::tokenize_sealed(request)?)
                .await?;
            Ok(wire::tokenized(&done, fingerprints))
        };
        self.guards
            .call("TokenizeSealed", |_| Permission::Tokenize, request, call)
            .await
    }

    async fn tokenize_sealed_batch(
        &self,
        request: Request<pb::TokenizeSealedBatchRequest>,
    ) -> Result<Response<pb::TokenizeBatchResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller: Caller, request| async move {
            let fingerprints = caller.sees_fingerprints;
            let batch = wire::tokenize_sealed_batch(request)?;
            Ok(wire::batch_results(
                records.tokenize_sealed_batch(caller, batch).await?,
                fingerprints,
            ))
        };
        self.guards
            .call(
                "TokenizeSealedBatch",
                |_| Permission::Tokenize,
                request,
                call,
            )
            .await
    }

    async fn get_token_info(
        &self,
        request: Request<pb::GetTokenInfoRequest>,
    ) -> Result<Response<pb::GetTokenInfoResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller: Caller, request: pb::GetTokenInfoRequest| async move {
            let token = wire::token(&request.token)?;
            let stored = records.load_verified(&caller, &token).await?;
            Ok(pb::GetTokenInfoResponse {
                info: Some(wire::token_info(
                    &token,
                    &stored.metadata,
                    caller.sees_fingerprints,
                )),
            })
        };
        self.guards
            .call("GetTokenInfo", |_| Permission::Read, request, call)
            .await
    }

    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller, request: pb::DeleteTokenRequest| async move {
            let token = wire::token(&request.token)?;
            records.delete(&caller, &token).await?;
            tracing::debug!(token = %token, "deleted");
            Ok(pb::DeleteTokenResponse {})
        };
        self.guards
            .call("DeleteToken", |_| Permission::Delete, request, call)
            .await
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let forwarder = &self.vault.forwarder;
        let permission = |r: &pb::ForwardRequest| Permission::Forward(r.processor.clone());
        let call = |caller, request| async move {
            let done = forwarder.forward(&caller, wire::forward(request)).await?;
            Ok(wire::forwarded(done))
        };
        self.guards.call("Forward", permission, request, call).await
    }

    async fn find_subject(
        &self,
        request: Request<pb::SubjectRequest>,
    ) -> Result<Response<pb::SubjectResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller, request: pb::SubjectRequest| async move {
            let pan = wire::subject(request.card)?;
            Ok(wire::tokens(records.find_subject(&caller, &pan).await?))
        };
        self.guards
            .call("FindSubject", |_| Permission::Subject, request, call)
            .await
    }

    async fn erase_subject(
        &self,
        request: Request<pb::SubjectRequest>,
    ) -> Result<Response<pb::SubjectResponse>, Status> {
        let records = &self.vault.records;
        let call = |caller, request: pb::SubjectRequest| async move {
            let pan = wire::subject(request.card)?;
            Ok(wire::tokens(records.erase_subject(&caller, &pan).await?))
        };
        self.guards
            .call("EraseSubject", |_| Permission::Subject, request, call)
            .await
    }

    async fn get_import_key(
        &self,
        request: Request<pb::GetImportKeyRequest>,
    ) -> Result<Response<pb::ImportKey>, Status> {
        let importer = &self.vault.importer;
        let call = |_: Caller, request: pb::GetImportKeyRequest| async move {
            let algorithm = import::import_key_algorithm(&request)?;
            import::import_key(importer.import_key(algorithm).await?.as_ref())
        };
        self.guards
            .call("GetImportKey", |_| Permission::Import, request, call)
            .await
    }

    async fn propose_import(
        &self,
        request: Request<pb::ProposeImportRequest>,
    ) -> Result<Response<pb::ImportJob>, Status> {
        let importer = &self.vault.importer;
        let call = |caller: Caller, request: pb::ProposeImportRequest| async move {
            if request.sender_public_key.len() > 64 * 1024 {
                return Err(ImportError::Invalid {
                    field: "sender_public_key",
                    rule: "at most 64 KiB",
                }
                .into());
            }
            let sender = Some(request.sender_public_key.as_str()).filter(|k| !k.is_empty());
            Ok(import::job(
                importer
                    .propose(&caller, request.expected_rows, &request.file_sha256, sender)
                    .await?,
            ))
        };
        self.guards
            .call("ProposeImport", |_| Permission::Import, request, call)
            .await
    }

    async fn approve_import(
        &self,
        request: Request<pb::ApproveImportRequest>,
    ) -> Result<Response<pb::ImportJob>, Status> {
        let importer = &self.vault.importer;
        let call = |caller: Caller, request: pb::ApproveImportRequest| async move {
            Ok(import::job(
                importer.approve(&caller, &request.job_id).await?,
            ))
        };
        self.guards
            .call("ApproveImport", |_| Permission::Import, request, call)
            .await
    }

    async fn import_upload(
        &self,
        request: Request<pb::ImportUploadRequest>,
    ) -> Result<Response<pb::ImportStatus>, Status> {
        let importer = &self.vault.importer;
        let call = |caller: Caller, request: pb::ImportUploadRequest| async move {
            let spec = import::file_spec(&request)?;
            let state = importer
                .upload(
                    &caller,
                    &request.job_id,
                    request.offset,
                    &request.data,
                    spec,
                )
                .await?;
            Ok(import::status(&state))
        };
        self.guards
            .call("ImportUpload", |_| Permission::Import, request, call)
            .await
    }

    async fn import_rows(
        &self,
        request: Request<pb::ImportRowsRequest>,
    ) -> Result<Response<pb::ImportRowsResponse>, Status> {
        let importer = &self.vault.importer;
        let call = |caller: Caller, request: pb::ImportRowsRequest| async move {
            let done = importer
                .rows(
                    &caller,
                    &request.job_id,
                    request.from_row,
                    request.max_rows as usize,
                )
                .await?;
            // The last row done: the job's approval is used up (FinishJob). Here, not
            // in `rows`, so that an answer that could not mark it is retried.
            if done.done {
                importer.finish(&caller, &request.job_id).await?;
            }
            Ok(import::rows(done))
        };
        self.guards
            .call("ImportRows", |_| Permission::Import, request, call)
            .await
    }

    async fn propose_export(
        &self,
        request: Request<pb::ProposeExportRequest>,
    ) -> Result<Response<pb::ExportJob>, Status> {
        let exporter = &self.vault.exporter;
        let call = |caller: Caller, request: pb::ProposeExportRequest| async move {
            let tokens = import::export_tokens(&request.tokens)?;
            let job = exporter
                .propose(&caller, &request.processor, tokens.as_deref())
                .await?;
            Ok(import::export_job(job))
        };
        self.guards
            .call("ProposeExport", |_| Permission::Export, request, call)
            .await
    }

    async fn approve_export(
        &self,
        request: Request<pb::ApproveExportRequest>,
    ) -> Result<Response<pb::ExportJob>, Status> {
        let exporter = &self.vault.exporter;
        let call = |caller: Caller, request: pb::ApproveExportRequest| async move {
            Ok(import::export_job(
                exporter.approve(&caller, &request.job_id).await?,
            ))
        };
        self.guards
            .call("ApproveExport", |_| Permission::Export, request, call)
            .await
    }

    async fn run_export(
        &self,
        request: Request<pb::RunExportRequest>,
    ) -> Result<Response<pb::ExportResult>, Status> {
        let exporter = &self.vault.exporter;
        let call = |caller: Caller, request: pb::RunExportRequest| async move {
            let tokens = import::export_tokens(&request.tokens)?;
            let done = exporter
                .run(&caller, &request.job_id, tokens.as_deref())
                .await?;
            Ok(import::exported(done))
        };
        self.guards
            .call("RunExport", |_| Permission::Export, request, call)
            .await
    }

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::CreateBackupResponse>, Status> {
        let admin = &self.vault.admin;
        let call = |_, request: pb::CreateBackupRequest| async move {
            Ok(wire::backup(admin.create_backup(&request.name).await?))
        };
        self.guards
            .call("CreateBackup", |_| Permission::Admin, request, call)
            .await
    }

    async fn verify_backup(
        &self,
        request: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        let admin = &self.vault.admin;
        let call = |_, request: pb::VerifyBackupRequest| async move {
            Ok(wire::backup_check(
                admin.verify_backup(&request.name).await?,
            ))
        };
        self.guards
            .call("VerifyBackup", |_| Permission::Admin, request, call)
            .await
    }

    async fn start_rewrap(
        &self,
        request: Request<pb::StartRewrapRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        let admin = &self.vault.admin;
        let call = |_, _| async move { Ok(wire::rewrap_status(admin.start_rewrap().await?)) };
        self.guards
            .call("StartRewrap", |_| Permission::Admin, request, call)
            .await
    }

    async fn get_rewrap_status(
        &self,
        request: Request<pb::GetRewrapStatusRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        let admin = &self.vault.admin;
        let call = |_, _| async move { Ok(wire::rewrap_status(admin.rewrap().status())) };
        self.guards
            .call("GetRewrapStatus", |_| Permission::Admin, request, call)
            .await
    }

    async fn reload_policy(
        &self,
        request: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        let admin = &self.vault.admin;
        let call = |caller: crate::policy::Caller, _| async move {
            let identities = admin.reload_policy(&caller.identity).await?;
            Ok(pb::ReloadPolicyResponse {
                identities: identities as u32,
            })
        };
        self.guards
            .call("ReloadPolicy", |_| Permission::Admin, request, call)
            .await
    }

    async fn list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksResponse>, Status> {
        let admin = &self.vault.admin;
        let call = |_, _| async move { Ok(wire::blocks(admin.blocks())) };
        self.guards
            .call("ListBlocks", |_| Permission::Admin, request, call)
            .await
    }

    async fn lift_block(
        &self,
        request: Request<pb::LiftBlockRequest>,
    ) -> Result<Response<pb::LiftBlockResponse>, Status> {
        let admin = &self.vault.admin;
        let call = |_, request: pb::LiftBlockRequest| async move {
            admin
                .lift_block(wire::block_kind(&request.kind)?, &request.subject)
                .await?;
            Ok(pb::LiftBlockResponse {})
        };
        self.guards
            .call("LiftBlock", |_| Permission::Admin, request, call)
            .await
    }

    async fn read_audit(
        &self,
        request: Request<pb::ReadAuditRequest>,
    ) -> Result<Response<pb::ReadAuditResponse>, Status> {
        let audit_log = &self.vault.audit_log;
        let call = |_, request: pb::ReadAuditRequest| async move {
            let page = audit_log.read(wire::audit_query(&request)).await?;
            Ok(wire::audit_page(page))
        };
        self.guards
            .call("ReadAudit", |_| Permission::Audit, request, call)
            .await
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let audit_log = &self.vault.audit_log;
        let call = |_, _| async move { Ok(wire::audit_verification(audit_log.verify().await?)) };
        self.guards
            .call("VerifyAudit", |_| Permission::Audit, request, call)
            .await
    }
}

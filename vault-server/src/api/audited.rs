//! What each request and response adds to its call's audit event. Called only for
//! calls that succeeded, so that nothing a caller typed into a failed call (which could
//! be anything, even a card number) reaches the log.

use vault_proto::vault::v1 as pb;

use crate::audit::AuditEvent;

pub trait Audited {
    fn describe(&self, _event: &mut AuditEvent) {}

    /// Erases the card data a request carries; for a request refused before its
    /// handler, which would otherwise erase it (`wire::card`).
    fn erase_card_data(self)
    where
        Self: Sized,
    {
    }
}

impl Audited for pb::TokenizeRequest {
    fn erase_card_data(self) {
        if let Some(card) = self.card {
            super::wire::erase(card);
        }
    }
}
impl Audited for pb::TokenizeResponse {
    fn describe(&self, event: &mut AuditEvent) {
        if let Some(info) = &self.info {
            event.token = info.token.clone();
            event.key_version = info.key_version;
        }
        if self.reused {
            event.detail = "existing token returned".into();
        }
    }
}
impl Audited for pb::TokenizeBatchRequest {
    fn describe(&self, event: &mut AuditEvent) {
        event.count = self.cards.len() as u32;
    }

    fn erase_card_data(self) {
        self.cards.into_iter().for_each(super::wire::erase);
    }
}
impl Audited for pb::TokenizeBatchResponse {
    fn describe(&self, event: &mut AuditEvent) {
        let stored = self
            .results
            .iter()
            .filter(|r| matches!(r.outcome, Some(pb::batch_item_result::Outcome::Stored(_))))
            .count();
        event.detail = crate::audit::stored_detail(stored);
    }
}
// Sealed cards are ciphertext only the vault can open: nothing to erase or describe.
impl Audited for pb::GetSealingKeyRequest {}
impl Audited for pb::SealingKey {}
impl Audited for pb::TokenizeSealedRequest {}
impl Audited for pb::TokenizeSealedBatchRequest {
    fn describe(&self, event: &mut AuditEvent) {
        event.count = self.sealed_cards.len() as u32;
    }
}
impl Audited for pb::GetTokenInfoRequest {
    fn describe(&self, event: &mut AuditEvent) {
        event.token = self.token.clone();
    }
}
impl Audited for pb::GetTokenInfoResponse {
    fn describe(&self, event: &mut AuditEvent) {
        if let Some(info) = &self.info {
            event.key_version = info.key_version;
        }
    }
}
impl Audited for pb::DeleteTokenRequest {
    fn describe(&self, event: &mut AuditEvent) {
        event.token = self.token.clone();
    }
}
impl Audited for pb::DeleteTokenResponse {}
impl Audited for pb::ForwardRequest {
    fn describe(&self, event: &mut AuditEvent) {
        event.token = self.token.clone();
        event.processor = self.processor.clone();
        // Merged into the call's event only if the call succeeds, so only once checked.
        event.reason = self.reason.clone();
    }
}
impl Audited for pb::ForwardResponse {
    fn describe(&self, event: &mut AuditEvent) {
        event.detail = format!(
            "processor answered {}{}",
            self.status,
            if self.replayed { " (replayed)" } else { "" }
        );
    }
}
// Backup names are left out: a caller chooses them freely.
impl Audited for pb::CreateBackupRequest {}
impl Audited for pb::CreateBackupResponse {}
impl Audited for pb::VerifyBackupRequest {}
impl Audited for pb::VerifyBackupResponse {}
impl Audited for pb::StartRewrapRequest {}
impl Audited for pb::GetRewrapStatusRequest {}
impl Audited for pb::RewrapStatus {}
impl Audited for pb::ReloadPolicyRequest {}
impl Audited for pb::ReloadPolicyResponse {}
impl Audited for pb::ReadAuditRequest {}
impl Audited for pb::ReadAuditResponse {}
impl Audited for pb::VerifyAuditRequest {}
impl Audited for pb::VerifyAuditResponse {}
impl Audited for pb::ListBlocksRequest {}
impl Audited for pb::ListBlocksResponse {}
impl Audited for pb::LiftBlockRequest {
    fn describe(&self, event: &mut AuditEvent) {
        event.detail = format!("lift {} {}", self.kind, self.subject);
    }
}
impl Audited for pb::LiftBlockResponse {}
// The card number is never described; the response's tokens are counted.
impl Audited for pb::SubjectRequest {
    fn erase_card_data(self) {
        if let Some(card) = self.card {
            super::wire::erase(card);
        }
    }
}
impl Audited for pb::SubjectResponse {
    fn describe(&self, event: &mut AuditEvent) {
        event.count = self.tokens.len() as u32;
    }
}

// Import jobs: the file is ciphertext and the answers are tokens; the event names the
// job, its counts and what was stored, never a row's values.
impl Audited for pb::GetImportKeyRequest {}
impl Audited for pb::ImportKey {
    fn describe(&self, event: &mut AuditEvent) {
        event.key_version = self.version;
        event.detail = format!("import key {}", self.fingerprint);
    }
}
impl Audited for pb::ProposeImportRequest {}
impl Audited for pb::ApproveImportRequest {}
impl Audited for pb::ImportJob {
    fn describe(&self, event: &mut AuditEvent) {
        event.detail = format!(
            "import job {} ({} rows, file sha256 {}{}; {}; proposed by {}{})",
            self.job_id,
            self.expected_rows,
            self.file_sha256,
            match self.sender_key_fingerprint.as_str() {
                "" => String::new(),
                fpr => format!(", signed by {fpr}"),
            },
            self.state,
            self.proposed_by,
            match self.approved {
                true => format!(", approved by {}", self.approved_by),
                false => String::new(),
            }
        );
    }
}
impl Audited for pb::ImportUploadRequest {}
impl Audited for pb::ImportStatus {
    fn describe(&self, event: &mut AuditEvent) {
        event.detail = format!(
            "import job {}: {} bytes received{}",
            self.job_id,
            self.received_bytes,
            match self.verified {
                true => format!(", file checked: {} rows", self.total_rows),
                false => String::new(),
            }
        );
    }
}
impl Audited for pb::ImportRowsRequest {}
impl Audited for pb::ImportRowsResponse {
    fn describe(&self, event: &mut AuditEvent) {
        use pb::imported_row::Outcome;
        let stored = self
            .rows
            .iter()
            .filter(|r| matches!(r.outcome, Some(Outcome::Card(_))))
            .count();
        event.count = self.rows.len() as u32;
        event.detail = format!(
            "import rows up to {} of {}: {stored} tokenized, {} refused",
            self.next_row,
            self.total_rows,
            self.rows.len() - stored,
        );
    }
}

// Export jobs: the event names the job, the processor, the key's fingerprint and the
// count; never a card.
impl Audited for pb::ProposeExportRequest {
    fn describe(&self, event: &mut AuditEvent) {
        event.count = self.tokens.len() as u32;
    }
}
impl Audited for pb::ApproveExportRequest {}
impl Audited for pb::ExportJob {
    fn describe(&self, event: &mut AuditEvent) {
        event.detail = format!(
            "export job {} to processor {} ({} tokens; {}; proposed by {}{})",
            self.job_id,
            self.processor,
            self.selection,
            self.state,
            self.proposed_by,
            match self.approved {
                true => format!(", approved by {}", self.approved_by),
                false => String::new(),
            }
        );
    }
}
impl Audited for pb::RunExportRequest {}
impl Audited for pb::ExportResult {
    fn describe(&self, event: &mut AuditEvent) {
        event.count = u32::try_from(self.cards).unwrap_or(u32::MAX);
        event.detail = format!(
            "export job {}: {} cards to processor {}, encrypted to key {}",
            self.job_id, self.cards, self.processor, self.fingerprint
        );
    }
}

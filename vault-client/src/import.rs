//! Import jobs (issue 21): the import key for the sending party, the job under dual
//! control, the encrypted file in pieces, and its rows' mapping back. The client never
//! sees a card's number: the file is sent as it was encrypted, and rows come back as
//! tokens and last fours.

use vault_proto::vault::v1 as pb;

use crate::{Error, VaultClient, idempotent};

/// The two kinds of import key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKeyAlgorithm {
    /// EdDSA + ECDH Curve25519 (keyservice purpose `import`); preferred.
    Curve25519,
    /// RSA 4096 (keyservice purpose `import-rsa`).
    Rsa4096,
}

/// The vault's active import key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportKeyInfo {
    /// ASCII-armored OpenPGP public key.
    pub armored_public_key: String,
    /// 40 hex digits, as `gpg --fingerprint` shows it.
    pub fingerprint: String,
    pub version: u32,
}

/// An import job as the keyservice keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportJob {
    pub id: String,
    pub tenant: String,
    pub expected_rows: u64,
    pub proposed_by: String,
    pub approved_by: Option<String>,
    pub approved: bool,
    pub expires_at_unix_ms: i64,
    /// The file the job takes: the hex SHA-256 of the encrypted file.
    pub file_sha256: String,
    /// The sender key the file must be signed by (40 hex digits), if any.
    pub sender_key_fingerprint: Option<String>,
    /// "pending", "approved", "running", "done" or "expired".
    pub state: String,
    /// The vault identity that started the job.
    pub claimed_by: Option<String>,
    /// An approved job not started by then lapses (0: not approved yet).
    pub claim_by_unix_ms: i64,
}

impl ImportJob {
    fn from_wire(job: pb::ImportJob) -> Result<Self, Error> {
        if job.job_id.is_empty() {
            return Err(Error::Incomplete);
        }
        Ok(Self {
            id: job.job_id,
            tenant: job.tenant,
            expected_rows: job.expected_rows,
            proposed_by: job.proposed_by,
            approved_by: Some(job.approved_by).filter(|a| !a.is_empty()),
            approved: job.approved,
            expires_at_unix_ms: job.expires_at_unix_ms,
            file_sha256: job.file_sha256,
            sender_key_fingerprint: Some(job.sender_key_fingerprint).filter(|f| !f.is_empty()),
            state: job.state,
            claimed_by: Some(job.claimed_by).filter(|c| !c.is_empty()),
            claim_by_unix_ms: job.claim_by_unix_ms,
        })
    }
}

/// The hex SHA-256 of a file, as an import job binds it (`propose_import`): the
/// encrypted file exactly as it will be uploaded.
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(hex::encode(context.finish().as_ref()))
}

/// How the file's plaintext is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportFormat {
    /// JSON lines; else CSV with a header row.
    pub json_lines: bool,
    pub id_field: String,
    pub number_field: String,
    pub exp_month_field: String,
    pub exp_year_field: String,
    /// Empty: no names.
    pub name_field: String,
    /// The sender's armored public key: the file must be signed by it.
    pub sender_public_key: Option<String>,
}

impl ImportFormat {
    /// Stripe's card export (`id`, `card.number`, `card.exp_month`, `card.exp_year`,
    /// `name`).
    pub fn stripe(json_lines: bool) -> Self {
        Self {
            json_lines,
            id_field: "id".into(),
            number_field: "card.number".into(),
            exp_month_field: "card.exp_month".into(),
            exp_year_field: "card.exp_year".into(),
            name_field: "name".into(),
            sender_public_key: None,
        }
    }

    fn to_wire(&self) -> pb::ImportFormat {
        pb::ImportFormat {
            format: match self.json_lines {
                true => pb::ImportFileFormat::JsonLines,
                false => pb::ImportFileFormat::Csv,
            } as i32,
            id_field: self.id_field.clone(),
            number_field: self.number_field.clone(),
            exp_month_field: self.exp_month_field.clone(),
            exp_year_field: self.exp_year_field.clone(),
            name_field: self.name_field.clone(),
            sender_public_key: self.sender_public_key.clone().unwrap_or_default(),
        }
    }
}

/// Where a job's upload and rows stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportStatus {
    pub received_bytes: u64,
    pub verified: bool,
    pub total_rows: u64,
    pub rows_done: u64,
}

/// One row of the mapping: the card's token, or why the row was refused (the field
/// and the rule, never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportedRow {
    Card {
        row: u64,
        source_id: String,
        token: String,
        last_four: String,
        /// Empty without the `fingerprint` permission.
        fingerprint: String,
    },
    Invalid {
        row: u64,
        source_id: String,
        field: String,
        rule: String,
    },
}

impl ImportedRow {
    pub fn row(&self) -> u64 {
        match self {
            ImportedRow::Card { row, .. } | ImportedRow::Invalid { row, .. } => *row,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedRows {
    pub rows: Vec<ImportedRow>,
    /// What to pass as `from_row` next.
    pub next_row: u64,
    pub total_rows: u64,
    pub done: bool,
}

/// Most bytes of the file per upload call.
pub const IMPORT_PIECE_BYTES: usize = 1024 * 1024;

impl VaultClient {
    /// The vault's active import key of `algorithm` (permission `import`). Safe to
    /// retry.
    pub async fn import_key(
        &mut self,
        algorithm: ImportKeyAlgorithm,
    ) -> Result<ImportKeyInfo, Error> {
        let algorithm = match algorithm {
            ImportKeyAlgorithm::Curve25519 => pb::ImportKeyAlgorithm::Curve25519,
            ImportKeyAlgorithm::Rsa4096 => pb::ImportKeyAlgorithm::Rsa4096,
        } as i32;
        let key = idempotent(|| {
            let mut vault = self.vault.clone();
            async move {
                vault
                    .get_import_key(pb::GetImportKeyRequest { algorithm })
                    .await
            }
        })
        .await?
        .into_inner();
        if key.fingerprint.is_empty() || key.armored_public_key.is_empty() {
            return Err(Error::Incomplete);
        }
        Ok(ImportKeyInfo {
            armored_public_key: key.armored_public_key,
            fingerprint: key.fingerprint,
            version: key.version,
        })
    }

    /// Proposes importing the file whose SHA-256 is `file_sha256` ([`file_sha256`]),
    /// of `expected_rows` rows, into our tenant, signed by `sender_public_key`
    /// (armored) if given; a second identity with `import` approves it, and the job
    /// takes that file only. Not retried (a retry would propose twice).
    pub async fn propose_import(
        &mut self,
        expected_rows: u64,
        file_sha256: &str,
        sender_public_key: Option<String>,
    ) -> Result<ImportJob, Error> {
        let job = self
            .vault
            .propose_import(pb::ProposeImportRequest {
                expected_rows,
                file_sha256: file_sha256.to_owned(),
                sender_public_key: sender_public_key.unwrap_or_default(),
            })
            .await?
            .into_inner();
        ImportJob::from_wire(job)
    }

    /// Approves another identity's import job.
    pub async fn approve_import(&mut self, job_id: &str) -> Result<ImportJob, Error> {
        let job = self
            .vault
            .approve_import(pb::ApproveImportRequest {
                job_id: job_id.to_owned(),
            })
            .await?
            .into_inner();
        ImportJob::from_wire(job)
    }

    /// Sends `data` at `offset` of the encrypted file (at most
    /// [`IMPORT_PIECE_BYTES`]); with `last`, the vault checks the whole file. An empty
    /// piece that is not the last asks where the upload stands. Safe to retry: a piece
    /// sent again is written once.
    pub async fn import_upload(
        &mut self,
        job_id: &str,
        offset: u64,
        data: Vec<u8>,
        last: Option<&ImportFormat>,
    ) -> Result<ImportStatus, Error> {
        if data.len() > IMPORT_PIECE_BYTES {
            return Err(Error::InvalidArgument {
                field: "data",
                rule: "at most 1 MiB per call",
            });
        }
        let request = pb::ImportUploadRequest {
            job_id: job_id.to_owned(),
            offset,
            data,
            last: last.is_some(),
            format: last.map(ImportFormat::to_wire),
        };
        let status = idempotent(|| {
            let mut vault = self.vault.clone();
            let request = request.clone();
            async move { vault.import_upload(request).await }
        })
        .await?
        .into_inner();
        Ok(ImportStatus {
            received_bytes: status.received_bytes,
            verified: status.verified,
            total_rows: status.total_rows,
            rows_done: status.rows_done,
        })
    }

    /// Tokenizes the rows after the first `from_row`. Safe to retry: a row done again
    /// gets the token it got the first time.
    pub async fn import_rows(
        &mut self,
        job_id: &str,
        from_row: u64,
        max_rows: u32,
    ) -> Result<ImportedRows, Error> {
        use pb::imported_row::Outcome;
        let request = pb::ImportRowsRequest {
            job_id: job_id.to_owned(),
            from_row,
            max_rows,
        };
        let response = idempotent(|| {
            let mut vault = self.vault.clone();
            let request = request.clone();
            async move { vault.import_rows(request).await }
        })
        .await?
        .into_inner();
        let rows = response
            .rows
            .into_iter()
            .map(|r| match r.outcome {
                Some(Outcome::Card(card)) => Ok(ImportedRow::Card {
                    row: r.row,
                    source_id: r.source_id,
                    token: card.token,
                    last_four: card.last_four,
                    fingerprint: card.fingerprint,
                }),
                Some(Outcome::Invalid(v)) => Ok(ImportedRow::Invalid {
                    row: r.row,
                    source_id: r.source_id,
                    field: v.field,
                    rule: v.rule,
                }),
                None => Err(Error::Incomplete),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ImportedRows {
            rows,
            next_row: response.next_row,
            total_rows: response.total_rows,
            done: response.done,
        })
    }
}

/// An export job as the keyservice keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportJob {
    pub id: String,
    pub tenant: String,
    pub processor: String,
    /// "all", or "sha256:" and the digest of the token list.
    pub selection: String,
    pub proposed_by: String,
    pub approved_by: Option<String>,
    pub approved: bool,
    pub expires_at_unix_ms: i64,
    /// "pending", "approved", "running", "done" or "expired".
    pub state: String,
    /// The vault identity that ran the job.
    pub claimed_by: Option<String>,
    /// An approved job not run by then lapses (0: not approved yet).
    pub claim_by_unix_ms: i64,
}

impl ExportJob {
    fn from_wire(job: pb::ExportJob) -> Result<Self, Error> {
        if job.job_id.is_empty() {
            return Err(Error::Incomplete);
        }
        Ok(Self {
            id: job.job_id,
            tenant: job.tenant,
            processor: job.processor,
            selection: job.selection,
            proposed_by: job.proposed_by,
            approved_by: Some(job.approved_by).filter(|a| !a.is_empty()),
            approved: job.approved,
            expires_at_unix_ms: job.expires_at_unix_ms,
            state: job.state,
            claimed_by: Some(job.claimed_by).filter(|c| !c.is_empty()),
            claim_by_unix_ms: job.claim_by_unix_ms,
        })
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportResult {
    pub job_id: String,
    pub processor: String,
    /// The processor key's fingerprint the file is encrypted to.
    pub fingerprint: String,
    pub cards: u64,
    /// Where it went: the file on the vault's host, or the processor's upload route.
    pub destination: String,
}

impl VaultClient {
    /// Proposes exporting our tenant's tokens (all, or `tokens`) to `processor`; a
    /// second identity with `export` approves it. Not retried.
    pub async fn propose_export(
        &mut self,
        processor: &str,
        tokens: Vec<String>,
    ) -> Result<ExportJob, Error> {
        let job = self
            .vault
            .propose_export(pb::ProposeExportRequest {
                processor: processor.to_owned(),
                tokens,
            })
            .await?
            .into_inner();
        ExportJob::from_wire(job)
    }

    /// Approves another identity's export job.
    pub async fn approve_export(&mut self, job_id: &str) -> Result<ExportJob, Error> {
        let job = self
            .vault
            .approve_export(pb::ApproveExportRequest {
                job_id: job_id.to_owned(),
            })
            .await?
            .into_inner();
        ExportJob::from_wire(job)
    }

    /// Writes the approved job's file (once). `tokens`: the list it was proposed with.
    pub async fn run_export(
        &mut self,
        job_id: &str,
        tokens: Vec<String>,
    ) -> Result<ExportResult, Error> {
        let done = self
            .vault
            .run_export(pb::RunExportRequest {
                job_id: job_id.to_owned(),
                tokens,
            })
            .await?
            .into_inner();
        Ok(ExportResult {
            job_id: done.job_id,
            processor: done.processor,
            fingerprint: done.fingerprint,
            cards: done.cards,
            destination: done.destination,
        })
    }
}

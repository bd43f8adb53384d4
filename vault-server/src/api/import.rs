//! Import jobs on the wire: requests into the importer's domain types, its answers
//! back (the mapping rows). Nothing here holds a card's plaintext: the file arrives
//! encrypted and rows leave as tokens.

use vault_proto::vault::v1 as pb;

use crate::error::VaultError;
use crate::import::{Algorithm, Fields, FileFormat, ImportKey, JobState};
use crate::ops::{FileSpec, ImportError, ImportedRow, Job, RowOutcome, RowsDone};

/// Most bytes of the file in one ImportUpload call.
pub const MAX_PIECE_BYTES: usize = 1024 * 1024;

/// The key as the sending party gets it (derived already: see `Importer::import_key`).
pub fn import_key(key: &ImportKey) -> Result<pb::ImportKey, VaultError> {
    Ok(pb::ImportKey {
        armored_public_key: key.public_armored().map_err(|_| ImportError::NoKey)?,
        fingerprint: key
            .fingerprint()
            .map_err(|_| ImportError::NoKey)?
            .to_owned(),
        version: key.version(),
        algorithm: match key.algorithm() {
            Algorithm::Curve25519 => pb::ImportKeyAlgorithm::Curve25519,
            Algorithm::Rsa4096 => pb::ImportKeyAlgorithm::Rsa4096,
        } as i32,
    })
}

/// Which import key a request asks for (Curve25519 when it does not say).
pub fn import_key_algorithm(request: &pb::GetImportKeyRequest) -> Result<Algorithm, VaultError> {
    match pb::ImportKeyAlgorithm::try_from(request.algorithm) {
        Ok(pb::ImportKeyAlgorithm::Unspecified | pb::ImportKeyAlgorithm::Curve25519) => {
            Ok(Algorithm::Curve25519)
        }
        Ok(pb::ImportKeyAlgorithm::Rsa4096) => Ok(Algorithm::Rsa4096),
        Err(_) => Err(invalid("algorithm", "must be CURVE25519 or RSA_4096")),
    }
}

pub fn job(job: Job) -> pb::ImportJob {
    pb::ImportJob {
        job_id: job.id,
        tenant: job.tenant,
        expected_rows: job.expected_rows,
        proposed_by: job.proposed_by,
        approved_by: job.approved_by,
        approved: job.approved,
        expires_at_unix_ms: job.expires_at_unix_ms,
        file_sha256: job.file_sha256,
        sender_key_fingerprint: job.sender_key_fingerprint,
        state: job.state.to_owned(),
        claimed_by: job.claimed_by,
        claim_by_unix_ms: job.claim_by_unix_ms,
    }
}

fn invalid(field: &'static str, rule: &'static str) -> VaultError {
    ImportError::Invalid { field, rule }.into()
}

/// The last piece's format, checked; `None` for other pieces.
pub fn file_spec(request: &pb::ImportUploadRequest) -> Result<Option<FileSpec>, VaultError> {
    if request.data.len() > MAX_PIECE_BYTES {
        return Err(invalid("data", "at most 1 MiB per call"));
    }
    if !request.last {
        return Ok(None);
    }
    let format = request
        .format
        .as_ref()
        .ok_or_else(|| invalid("format", "required with the last piece"))?;
    let file_format = match pb::ImportFileFormat::try_from(format.format) {
        Ok(pb::ImportFileFormat::Csv) => FileFormat::Csv,
        Ok(pb::ImportFileFormat::JsonLines) => FileFormat::JsonLines,
        _ => return Err(invalid("format.format", "must be CSV or JSON_LINES")),
    };
    let field = |value: &str, name: &'static str| -> Result<String, VaultError> {
        if value.is_empty() || value.len() > 256 {
            return Err(invalid(name, "required, at most 256 characters"));
        }
        Ok(value.to_owned())
    };
    if format.name_field.len() > 256 {
        return Err(invalid("format.name_field", "at most 256 characters"));
    }
    if format.sender_public_key.len() > 64 * 1024 {
        return Err(invalid("format.sender_public_key", "at most 64 KiB"));
    }
    Ok(Some(FileSpec {
        format: file_format,
        fields: Fields {
            id: field(&format.id_field, "format.id_field")?,
            number: field(&format.number_field, "format.number_field")?,
            exp_month: field(&format.exp_month_field, "format.exp_month_field")?,
            exp_year: field(&format.exp_year_field, "format.exp_year_field")?,
            name: format.name_field.clone(),
        },
        sender_key: Some(format.sender_public_key.clone()).filter(|k| !k.is_empty()),
    }))
}

pub fn status(state: &JobState) -> pb::ImportStatus {
    pb::ImportStatus {
        job_id: state.job_id.clone(),
        received_bytes: state.received_bytes,
        verified: state.verified,
        total_rows: state.total_rows,
        rows_done: state.rows_done,
    }
}

pub fn rows(done: RowsDone) -> pb::ImportRowsResponse {
    use pb::imported_row::Outcome;
    pb::ImportRowsResponse {
        rows: done
            .rows
            .into_iter()
            .map(
                |ImportedRow {
                     row,
                     source_id,
                     outcome,
                 }| pb::ImportedRow {
                    row,
                    source_id,
                    outcome: Some(match outcome {
                        RowOutcome::Stored {
                            token,
                            last_four,
                            fingerprint,
                        } => Outcome::Card(pb::ImportedCard {
                            token,
                            last_four,
                            fingerprint,
                        }),
                        RowOutcome::Invalid(v) => Outcome::Invalid(pb::FieldViolation {
                            field: v.field.to_owned(),
                            rule: v.rule.to_owned(),
                            description: v.description.to_owned(),
                        }),
                    }),
                },
            )
            .collect(),
        next_row: done.next_row,
        total_rows: done.total_rows,
        done: done.done,
        // Never set: see the field's comment in vault.proto.
        flagged: false,
    }
}

/// Export jobs on the wire. The tokens a request lists are checked one by one (a
/// malformed one is INVALID_ARGUMENT naming `tokens`, never echoed).
pub fn export_tokens(tokens: &[String]) -> Result<Option<Vec<crate::token::Token>>, VaultError> {
    if tokens.is_empty() {
        return Ok(None);
    }
    tokens
        .iter()
        .map(|t| {
            crate::token::Token::parse(t).map_err(|_| {
                VaultError::Invalid(crate::card::violation(
                    "tokens",
                    "format",
                    "each must be a token of this vault",
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

pub fn export_job(job: crate::ops::ExportJob) -> pb::ExportJob {
    pb::ExportJob {
        job_id: job.id,
        tenant: job.tenant,
        processor: job.processor,
        selection: job.selection,
        proposed_by: job.proposed_by,
        approved_by: job.approved_by,
        approved: job.approved,
        expires_at_unix_ms: job.expires_at_unix_ms,
        state: job.state.to_owned(),
        claimed_by: job.claimed_by,
        claim_by_unix_ms: job.claim_by_unix_ms,
    }
}

pub fn exported(done: crate::ops::Exported) -> pb::ExportResult {
    pb::ExportResult {
        job_id: done.job_id,
        processor: done.processor,
        fingerprint: done.fingerprint,
        cards: done.cards,
        destination: done.destination,
    }
}

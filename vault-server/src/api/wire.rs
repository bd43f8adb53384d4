//! Conversions between the wire messages and the use cases' domain types: wire in →
//! validated command (a wire card's number, name and CVC erased on every path), domain
//! result → wire out.

use vault_proto::vault::v1 as pb;
use zeroize::Zeroize;

use crate::audit::AuditEvent;
use crate::card::{Brand, CardData, CardholderName, Cvc, Expiry, Pan, Today, Violation, violation};
use crate::error::VaultError;
use crate::lockout::{Block, Kind};
use crate::ops::{
    AuditPage, AuditQuery, AuditReport, Backup, BackupCheck, BatchItem, ForwardRequest, Forwarded,
    SealingKey, Tokenize, TokenizeBatch, TokenizeSealed, Tokenized,
};
use crate::record::Metadata;
use crate::rewrap;
use crate::token::{Format, Token};

/// Validates a wire card, erasing the wire copy of the number, name and CVC whatever
/// the outcome.
pub fn card(card: Option<pb::Card>, today: Today) -> Result<CardData, Violation> {
    let Some(card) = card else {
        return Err(violation("card", "required", "is required"));
    };
    let result = (|| {
        Ok(CardData {
            pan: Pan::parse(&card.number)?,
            expiry: Expiry::parse(card.exp_month, card.exp_year, today)?,
            name: CardholderName::parse(&card.cardholder_name)?,
            cvc: Cvc::parse(&card.cvc)?,
        })
    })();
    erase(card);
    result
}

/// The card number of a data subject request (only the number is needed), the wire
/// card erased whatever the outcome.
pub fn subject(card: Option<pb::Card>) -> Result<Pan, VaultError> {
    let card = card.ok_or(VaultError::Invalid(Violation {
        field: "card",
        rule: "required",
        description: "a card number is required",
    }))?;
    let pan = Pan::parse(&card.number).map_err(VaultError::Invalid);
    erase(card);
    pan
}

/// Zeroizes a wire card's number, name and CVC, then drops it.
pub fn erase(mut card: pb::Card) {
    card.number.zeroize();
    card.cardholder_name.zeroize();
    card.cvc.zeroize();
}

pub fn token(token: &str) -> Result<Token, VaultError> {
    Token::parse(token).map_err(VaultError::Invalid)
}

pub fn tokenize(request: pb::TokenizeRequest) -> Result<Tokenize, VaultError> {
    // The card first: the wire copy is erased whatever else is wrong.
    let card = card(request.card, Today::now()).map_err(VaultError::Invalid)?;
    Ok(Tokenize {
        card,
        ttl_secs: request.ttl_secs,
        reuse_existing: request.reuse_existing,
        format: format(request.format)?,
        answer: None,
    })
}

pub fn tokenize_batch(request: pb::TokenizeBatchRequest) -> Result<TokenizeBatch, VaultError> {
    let today = Today::now();
    // The cards first: every wire copy is erased whatever else is wrong.
    let cards = request
        .cards
        .into_iter()
        .map(|c| card(Some(c), today))
        .collect();
    Ok(TokenizeBatch {
        cards,
        ttl_secs: request.ttl_secs,
        reuse_existing: request.reuse_existing,
        format: format(request.format)?,
        answers: Vec::new(),
        guessing_exempt: false,
    })
}

/// A requested token format; `None`: the tenant's default.
fn format(value: i32) -> Result<Option<Format>, VaultError> {
    match pb::TokenFormat::try_from(value) {
        Ok(pb::TokenFormat::Unspecified) => Ok(None),
        Ok(pb::TokenFormat::Opaque) => Ok(Some(Format::Opaque)),
        Ok(pb::TokenFormat::Card) => Ok(Some(Format::Card)),
        Err(_) => Err(VaultError::Invalid(violation(
            "format",
            "enum",
            "must be TOKEN_FORMAT_UNSPECIFIED, TOKEN_FORMAT_OPAQUE or TOKEN_FORMAT_CARD",
        ))),
    }
}

pub fn tokenize_sealed(request: pb::TokenizeSealedRequest) -> Result<TokenizeSealed, VaultError> {
    Ok(TokenizeSealed {
        format: format(request.format)?,
        sealed_cards: vec![request.sealed_card],
        ttl_secs: request.ttl_secs,
        reuse_existing: request.reuse_existing,
    })
}

pub fn tokenize_sealed_batch(
    request: pb::TokenizeSealedBatchRequest,
) -> Result<TokenizeSealed, VaultError> {
    Ok(TokenizeSealed {
        format: format(request.format)?,
        sealed_cards: request.sealed_cards,
        ttl_secs: request.ttl_secs,
        reuse_existing: request.reuse_existing,
    })
}

pub fn sealing_key(key: SealingKey) -> pb::SealingKey {
    let (kem_id, kdf_id, aead_id) = envelope::sealed::SUITE;
    pb::SealingKey {
        public_key: key.public_key.to_vec(),
        key_id: key.key_id.to_vec(),
        kem_id: kem_id.into(),
        kdf_id: kdf_id.into(),
        aead_id: aead_id.into(),
        tenant: key.tenant,
        server_time_unix_ms: key.server_time_unix_ms,
        accepted_until_unix_ms: key.accepted_until_unix_ms,
        max_age_secs: key.max_age_secs,
    }
}

/// `fingerprints`: whether the caller may see keyed fingerprints (empty otherwise).
pub fn tokenized(done: &Tokenized, fingerprints: bool) -> pb::TokenizeResponse {
    pb::TokenizeResponse {
        info: Some(token_info(&done.token, &done.metadata, fingerprints)),
        reused: done.reused,
        cvc_not_kept: done.cvc_not_kept,
    }
}

pub fn batch_results(items: Vec<BatchItem>, fingerprints: bool) -> pb::TokenizeBatchResponse {
    use pb::batch_item_result::Outcome;
    let results = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| pb::BatchItemResult {
            index: index as u32,
            outcome: Some(match item {
                BatchItem::Stored(done) => Outcome::Stored(tokenized(&done, fingerprints)),
                BatchItem::Invalid(violation) => Outcome::Invalid(pb::FieldViolation {
                    field: violation.field.to_owned(),
                    rule: violation.rule.to_owned(),
                    description: violation.description.to_owned(),
                }),
            }),
        })
        .collect();
    pb::TokenizeBatchResponse { results }
}

pub fn token_info(token: &Token, metadata: &Metadata, fingerprints: bool) -> pb::TokenInfo {
    pb::TokenInfo {
        token: token.as_str().to_owned(),
        brand: brand(metadata.brand) as i32,
        last_four: String::from_utf8_lossy(&metadata.last_four).into_owned(),
        exp_month: u32::from(metadata.expiry.month),
        exp_year: u32::from(metadata.expiry.year),
        fingerprint: match fingerprints {
            true => hex::encode(metadata.fingerprint.value),
            false => String::new(),
        },
        created_at_unix_ms: metadata.created_at_unix_ms,
        key_version: metadata.key_version,
        expires_at_unix_ms: metadata.expires_at_unix_ms,
    }
}

fn brand(brand: Brand) -> pb::Brand {
    match brand {
        Brand::Unknown => pb::Brand::Unknown,
        Brand::Visa => pb::Brand::Visa,
        Brand::Mastercard => pb::Brand::Mastercard,
        Brand::Amex => pb::Brand::Amex,
        Brand::Discover => pb::Brand::Discover,
        Brand::Jcb => pb::Brand::Jcb,
        Brand::Diners => pb::Brand::Diners,
        Brand::UnionPay => pb::Brand::Unionpay,
        Brand::Maestro => pb::Brand::Maestro,
    }
}

pub fn forward(request: pb::ForwardRequest) -> ForwardRequest {
    ForwardRequest {
        processor: request.processor,
        method: request.method,
        path: request.path,
        headers: request
            .headers
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect(),
        body: request.body,
        token: request.token,
        idempotency_key: request.idempotency_key,
        reason: request.reason,
        route: request.route,
        fields: request.fields.into_iter().collect(),
    }
}

pub fn forwarded(done: Forwarded) -> pb::ForwardResponse {
    pb::ForwardResponse {
        status: u32::from(done.answer.status),
        headers: done
            .answer
            .headers
            .into_iter()
            .map(|(name, value)| pb::Header { name, value })
            .collect(),
        body: done.answer.body,
        replayed: done.replayed,
    }
}

pub fn tokens(tokens: Vec<Token>) -> pb::SubjectResponse {
    pb::SubjectResponse {
        tokens: tokens.iter().map(|t| t.as_str().to_owned()).collect(),
    }
}

pub fn backup(backup: Backup) -> pb::CreateBackupResponse {
    pb::CreateBackupResponse {
        path: backup.path.display().to_string(),
        size_bytes: backup.size_bytes,
    }
}

pub fn backup_check(check: BackupCheck) -> pb::VerifyBackupResponse {
    pb::VerifyBackupResponse {
        records: check.records,
        verified: check.verified,
        failed: check.failed,
        erased: check.erased,
    }
}

pub fn rewrap_status(status: rewrap::Status) -> pb::RewrapStatus {
    pb::RewrapStatus {
        running: status.running,
        done: status.done,
        remaining: status.remaining,
        failed: status.failed,
        rate_per_sec: status.rate_per_sec,
        card_data_version: status.card_data_version,
        fingerprint_version: status.fingerprint_version,
        started_at_unix_ms: status.started_at_unix_ms,
        finished_at_unix_ms: status.finished_at_unix_ms,
    }
}

pub fn audit_query(request: &pb::ReadAuditRequest) -> AuditQuery {
    AuditQuery {
        after_sequence: request.after_sequence,
        limit: request.limit,
        since_unix_ms: request.since_unix_ms,
        until_unix_ms: request.until_unix_ms,
    }
}

pub fn audit_page(page: AuditPage) -> pb::ReadAuditResponse {
    pb::ReadAuditResponse {
        events: page
            .events
            .into_iter()
            .map(|(version, chain, event)| audit_event(event, version, chain))
            .collect(),
        last_sequence: page.last_sequence,
    }
}

fn audit_event(event: AuditEvent, audit_key_version: u32, chain: [u8; 32]) -> pb::AuditEvent {
    pb::AuditEvent {
        reason: event.reason,
        sequence: event.sequence,
        at_unix_ms: event.at_unix_ms,
        actor: event.actor,
        peer: event.peer,
        action: event.action,
        tenant: event.tenant,
        token: event.token,
        count: event.count,
        processor: event.processor,
        key_version: event.key_version,
        outcome: event.outcome,
        request_id: event.request_id,
        detail: event.detail,
        audit_key_version,
        chain: chain.to_vec(),
        chained_on: hex::decode(&event.chained_on).unwrap_or_default(),
    }
}

pub fn audit_verification(report: AuditReport) -> pb::VerifyAuditResponse {
    let (first_bad_sequence, problem) = report
        .fault
        .map_or((0, String::new()), |(sequence, problem)| {
            (sequence, problem.to_owned())
        });
    pb::VerifyAuditResponse {
        entries: report.entries,
        intact: report.fault.is_none(),
        first_bad_sequence,
        problem,
        gaps: report
            .gaps
            .into_iter()
            .map(|gap| pb::AuditLogGap {
                first_sequence: gap.first,
                last_sequence: gap.last,
                acknowledged: gap.acknowledged_by.is_some(),
                acknowledged_by: gap.acknowledged_by.unwrap_or_default(),
            })
            .collect(),
        node: report.node,
        vault_identity: report.identity,
    }
}

pub fn blocks(blocks: Vec<(Block, i64)>) -> pb::ListBlocksResponse {
    pb::ListBlocksResponse {
        blocks: blocks
            .into_iter()
            .map(|(block, until_unix_ms)| pb::Block {
                kind: block.kind.name().into(),
                subject: block.subject,
                until_unix_ms,
                failures: block.failures,
            })
            .collect(),
    }
}

pub fn block_kind(kind: &str) -> Result<Kind, VaultError> {
    Kind::parse(kind).ok_or(VaultError::Invalid(Violation {
        field: "kind",
        rule: "enum",
        description: "must be identity, address or guessing",
    }))
}

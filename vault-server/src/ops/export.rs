//! Export jobs (issue 21): a tenant's cards, all or a list of tokens, sent to a new
//! processor as a file only that processor can read. In the order its invariants
//! demand:
//!
//! 1. The processor declares the OpenPGP key it takes exports under, pinned by
//!    fingerprint in the vault's config (`[processor.export]`); a file that holds
//!    another key stops the vault at start.
//! 2. `propose` and `approve`: two identities with the tenant's `export` permission
//!    agree on the processor and the selection (all tokens, or the SHA-256 of a token
//!    list given again at run time); the keyservice keeps the proposal.
//! 3. `run`, once per job: the job is claimed at the keyservice first (`jobs::claim`:
//!    a second run is refused there, even if the first one's file is gone), then the
//!    records are read and opened inside the vault, written
//!    as CSV or JSON lines, encrypted to the processor's key (SEIPD with MDC),
//!    readable only with the processor's secret key. The audit event has the count,
//!    the processor and the key's fingerprint.
//!
//! 4. Delivered to the processor's declared upload route (`upload_path`, over the
//!    processor's own TLS settings), or, without one, written to the export directory;
//!    then the job is marked done at the keyservice (`jobs::finish`).

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use pgp::composed::{Deserializable as _, MessageBuilder, SignedPublicKey, SignedPublicSubKey};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::packet::SignatureType;
use pgp::types::{CompressionAlgorithm, KeyDetails as _};
use rand_chacha::rand_core::{CryptoRng, RngCore};
use runtime::now_unix_ms;
use vault_proto::keys::v1 as keys_pb;
use zeroize::Zeroizing;

use super::jobs::{self, StepError};
use super::records::Records;
use crate::error::VaultError;
use crate::forward::settings::{ExportFormat, ProcessorSettings};
use crate::import::valid_job_id;
use crate::policy::Caller;
use crate::record;
use crate::store::Store;
use crate::token::Token;

/// Why an export call was refused. Texts name the rule, a job or a processor.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{field}: {rule}")]
    Invalid {
        field: &'static str,
        rule: &'static str,
    },
    /// The name is not echoed: it comes from the caller.
    #[error("processor: not on the allowlist, or its config declares no [processor.export] key")]
    NoTarget(String),
    #[error("job {0} is not an export job of this tenant")]
    NoJob(String),
    #[error(
        "job {0} is not approved: a second identity with this tenant's `export` permission \
         must approve it (vaultctl export approve)"
    )]
    NotApproved(String),
    #[error("the tokens given are not the list the job was approved for")]
    Selection,
    #[error("job {0} was exported already; propose another for another export")]
    Done(String),
    #[error("export is not set up on this vault: set export.dir")]
    NotConfigured,
    #[error("the keyservice refused: {0}")]
    Keyservice(tonic::Status),
    #[error("the export file could not be written: {0}")]
    Write(String),
    #[error("the processor did not take the export (HTTP status {0}); nothing else was sent")]
    Refused(u16),
    #[error("the processor could not be reached for the export: {0}")]
    Unreachable(String),
}

impl From<ExportError> for VaultError {
    fn from(e: ExportError) -> Self {
        VaultError::Export(e)
    }
}

/// A processor's export key, as its config declares and pins it.
#[derive(Debug)]
pub struct ExportTarget {
    key: SignedPublicKey,
    fingerprint: String,
    format: ExportFormat,
    upload_path: Option<String>,
}

/// The export targets of the processor allowlist, their keys read and checked against
/// their pinned fingerprints (before any port is bound).
pub fn export_targets(list: &[ProcessorSettings]) -> Result<HashMap<String, ExportTarget>, String> {
    let mut targets = HashMap::new();
    for processor in list {
        let Some(export) = &processor.export else {
            continue;
        };
        let text = std::fs::read_to_string(&export.public_key_file).map_err(|e| {
            format!(
                "processor {}: cannot read export.public_key_file {}: {e}",
                processor.name,
                export.public_key_file.display()
            )
        })?;
        let (key, _) = SignedPublicKey::from_string(&text).map_err(|_| {
            format!(
                "processor {}: export.public_key_file is not an armored OpenPGP public key",
                processor.name
            )
        })?;
        let fingerprint = hex::encode_upper(key.fingerprint().as_bytes());
        let pinned: String = export
            .fingerprint
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_uppercase();
        if fingerprint != pinned {
            return Err(format!(
                "processor {}: the key in export.public_key_file has fingerprint {fingerprint}, \
                 not the pinned export.fingerprint",
                processor.name
            ));
        }
        let mut key = key;
        key.public_subkeys = bound_encryption_subkeys(&key);
        if key.public_subkeys.is_empty() {
            return Err(format!(
                "processor {}: the export key has no encryption subkey that its primary \
                 key binds (a valid binding signature with encryption flags, not revoked)",
                processor.name
            ));
        }
        targets.insert(
            processor.name.clone(),
            ExportTarget {
                key,
                fingerprint,
                format: export.format,
                upload_path: export.upload_path.clone(),
            },
        );
    }
    Ok(targets)
}

/// A job as approved.
#[derive(Debug, Clone)]
pub struct ExportJob {
    pub id: String,
    pub tenant: String,
    pub processor: String,
    pub selection: String,
    pub proposed_by: String,
    pub approved_by: String,
    pub approved: bool,
    pub expires_at_unix_ms: i64,
    /// pending, approved, running, done or expired.
    pub state: &'static str,
    pub claimed_by: String,
    pub claim_by_unix_ms: i64,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub job_id: String,
    pub processor: String,
    pub fingerprint: String,
    pub cards: u64,
    /// Where it went: the file on the vault's host, or the processor's upload route.
    pub destination: String,
}

#[derive(Debug)]
pub struct Exporter<S> {
    records: Arc<Records<S>>,
    targets: HashMap<String, ExportTarget>,
    /// For upload routes: the processors' own TLS settings.
    processors: crate::forward::Processors,
    dir: Option<PathBuf>,
    busy: tokio::sync::Mutex<()>,
}

/// The selection a token list stands for: "sha256:" and the digest of the sorted,
/// distinct tokens, one per line.
pub fn selection(tokens: Option<&[Token]>) -> String {
    let Some(tokens) = tokens else {
        return "all".into();
    };
    let sorted: BTreeSet<&str> = tokens.iter().map(Token::as_str).collect();
    let mut text = String::new();
    for token in sorted {
        text.push_str(token);
        text.push('\n');
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!("sha256:{}", hex::encode(digest.as_ref()))
}

impl<S: Store> Exporter<S> {
    pub fn new(
        records: Arc<Records<S>>,
        targets: HashMap<String, ExportTarget>,
        processors: crate::forward::Processors,
        dir: Option<PathBuf>,
    ) -> Self {
        Self {
            records,
            targets,
            processors,
            dir,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// Dual control, step one.
    pub async fn propose(
        &self,
        caller: &Caller,
        processor: &str,
        tokens: Option<&[Token]>,
    ) -> Result<ExportJob, ExportError> {
        if processor.is_empty() {
            return Err(ExportError::Invalid {
                field: "processor",
                rule: "required",
            });
        }
        if !self.targets.contains_key(processor) {
            return Err(ExportError::NoTarget(processor.to_owned()));
        }
        let proposal = self
            .records
            .keys()
            .keyservice()
            .propose_job(keys_pb::ProposeJobRequest {
                kind: keys_pb::OperationKind::Export as i32,
                job: Some(keys_pb::TenantJob {
                    tenant: caller.tenant.as_str().to_owned(),
                    on_behalf_of: caller.identity.clone(),
                    processor: processor.to_owned(),
                    selection: selection(tokens),
                    ..Default::default()
                }),
            })
            .await
            .map_err(ExportError::Keyservice)?
            .into_inner();
        Ok(job(proposal))
    }

    /// Dual control, step two: by another identity of the same tenant.
    pub async fn approve(&self, caller: &Caller, id: &str) -> Result<ExportJob, ExportError> {
        check_id(id)?;
        let proposal = self
            .records
            .keys()
            .keyservice()
            .approve_job(keys_pb::ApproveJobRequest {
                id: id.to_owned(),
                tenant: caller.tenant.as_str().to_owned(),
                approved_by: caller.identity.clone(),
                kind: keys_pb::OperationKind::Export as i32,
            })
            .await
            .map_err(ExportError::Keyservice)?
            .into_inner();
        Ok(job(proposal))
    }

    /// Writes the approved job's file. Once per job.
    pub async fn run(
        &self,
        caller: &Caller,
        id: &str,
        tokens: Option<&[Token]>,
    ) -> Result<Exported, VaultError> {
        check_id(id)?;
        let _busy = self.busy.lock().await;
        let dir = self.dir.clone().ok_or(ExportError::NotConfigured)?;
        let proposal = match self
            .records
            .keys()
            .keyservice()
            .get_job(keys_pb::GetJobRequest { id: id.to_owned() })
            .await
        {
            Ok(p) => p.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(ExportError::NoJob(id.to_owned()).into());
            }
            Err(s) => return Err(ExportError::Keyservice(s).into()),
        };
        if proposal.kind != keys_pb::OperationKind::Export as i32 {
            return Err(ExportError::NoJob(id.to_owned()).into());
        }
        let job = job(proposal);
        if job.tenant != caller.tenant.as_str() {
            return Err(ExportError::NoJob(id.to_owned()).into());
        }
        if !job.approved {
            return Err(ExportError::NotApproved(id.to_owned()).into());
        }
        if job.selection != selection(tokens) {
            return Err(ExportError::Selection.into());
        }
        let target = self
            .targets
            .get(&job.processor)
            .ok_or_else(|| ExportError::NoTarget(job.processor.clone()))?;
        let extension = match target.format {
            ExportFormat::Csv => "csv",
            ExportFormat::JsonLines => "jsonl",
        };
        let path = dir.join(format!("{id}-{}.{extension}.gpg", job.processor));
        let write = |e: std::io::Error| ExportError::Write(e.kind().to_string());
        std::fs::create_dir_all(&dir).map_err(write)?;
        // Once per job: the file's name is claimed first, and only a complete file
        // takes it (see below).
        let staged = dir.join(format!("{id}.partial"));
        if path.exists() {
            return Err(ExportError::Done(id.to_owned()).into());
        }
        // The approval is used here, once, before any card is read: a second run is
        // refused by the keyservice whatever became of the first one's output.
        jobs::claim(&self.records, caller, id, keys_pb::OperationKind::Export)
            .await
            .map_err(step_error)?;

        // The cards, opened here and nowhere else, in a zeroizing buffer.
        let mut plain = Zeroizing::new(Vec::new());
        let header = match target.format {
            ExportFormat::Csv => "token,number,exp_month,exp_year,name\n",
            ExportFormat::JsonLines => "",
        };
        push_zeroizing(&mut plain, header.as_bytes());
        let mut cards = 0u64;
        let mut add = |token: &Token, stored: &record::StoredRecord| -> Result<(), VaultError> {
            let card = self.records.open(token, stored)?;
            let name = card.name.as_ref().map_or("", |n| n.expose());
            let line = card_line(target.format, token, &card, name);
            push_zeroizing(&mut plain, &line);
            cards += 1;
            Ok(())
        };
        match tokens {
            Some(tokens) => {
                let distinct: BTreeSet<&Token> = tokens.iter().collect();
                for token in distinct {
                    let stored = self.records.load(caller, token).await?;
                    add(token, &stored)?;
                }
            }
            None => {
                let now = now_unix_ms();
                let mut cursor = None;
                loop {
                    let page = self
                        .records
                        .store()
                        .records_after(cursor.take(), 1000)
                        .await?;
                    let Some((last, _)) = page.last() else {
                        break;
                    };
                    cursor = Some(last.clone());
                    for (token, bytes) in page {
                        let (Some(token), Ok(stored)) =
                            (Token::from_stored(&token), record::decode(&bytes))
                        else {
                            continue;
                        };
                        if stored.metadata.tenant != caller.tenant || stored.metadata.expired(now) {
                            continue;
                        }
                        add(&token, &stored)?;
                    }
                }
            }
        }

        // To an upload route: encrypted in memory, sent, and the job marked done.
        if let Some(upload_path) = &target.upload_path {
            let key = target.key.clone();
            let sealed = tokio::task::spawn_blocking(move || encrypt(&key, &plain))
                .await
                .map_err(|_| ExportError::Write("the export's worker failed".into()))??;
            let processor = self
                .processors
                .get(&job.processor)
                .ok_or_else(|| ExportError::NoTarget(job.processor.clone()))?;
            let marker = dir.join(format!("{id}-{}.uploaded", job.processor));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => ExportError::Done(id.to_owned()),
                    kind => ExportError::Write(kind.to_string()),
                })?;
            let status = match processor.upload(upload_path, sealed).await {
                Ok(status) if (200..300).contains(&status) => status,
                failed => {
                    let _ = std::fs::remove_file(&marker);
                    return Err(match failed {
                        Ok(status) => ExportError::Refused(status),
                        Err(e) => ExportError::Unreachable(e.to_string()),
                    }
                    .into());
                }
            };
            tracing::info!(
                job = %id,
                processor = %job.processor,
                fingerprint = %target.fingerprint,
                cards,
                status,
                "export uploaded"
            );
            self.finish(caller, id).await;
            return Ok(Exported {
                job_id: id.to_owned(),
                processor: job.processor.clone(),
                fingerprint: target.fingerprint.clone(),
                cards,
                destination: format!("POST {upload_path} at processor {}", job.processor),
            });
        }

        // Encrypted to the processor's key, written, synced, then named.
        let key = target.key.clone();
        let (staged_path, final_path) = (staged.clone(), path.clone());
        tokio::task::spawn_blocking(move || -> Result<(), ExportError> {
            let sealed = encrypt(&key, &plain)?;
            // A new file, never one already there: a link left at this name (by
            // someone who can write the export directory) is removed, not followed.
            let _ = std::fs::remove_file(&staged_path);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_owner_only()
                .open(&staged_path)
                .map_err(|e| ExportError::Write(e.kind().to_string()))?;
            file.write_all(&sealed)
                .map_err(|e| ExportError::Write(e.kind().to_string()))?;
            file.flush()
                .and_then(|()| file.sync_all())
                .map_err(|e| ExportError::Write(e.kind().to_string()))?;
            std::fs::hard_link(&staged_path, &final_path).map_err(|e| {
                let _ = std::fs::remove_file(&staged_path);
                match e.kind() {
                    std::io::ErrorKind::AlreadyExists => ExportError::Done(String::new()),
                    kind => ExportError::Write(kind.to_string()),
                }
            })?;
            let _ = std::fs::remove_file(&staged_path);
            Ok(())
        })
        .await
        .map_err(|_| ExportError::Write("the export's worker failed".into()))?
        .map_err(|e| match e {
            ExportError::Done(_) => ExportError::Done(id.to_owned()),
            e => e,
        })?;
        tracing::info!(
            job = %id,
            processor = %job.processor,
            fingerprint = %target.fingerprint,
            cards,
            "export written"
        );
        self.finish(caller, id).await;
        Ok(Exported {
            job_id: id.to_owned(),
            processor: job.processor,
            fingerprint: target.fingerprint.clone(),
            cards,
            destination: path.display().to_string(),
        })
    }
}

impl<S: Store> Exporter<S> {
    /// Marks a delivered job done. The cards were delivered: a failure here is logged
    /// and leaves the job RUNNING, which refuses another run all the same.
    async fn finish(&self, caller: &Caller, id: &str) {
        if let Err(e) =
            jobs::finish(&self.records, caller, id, keys_pb::OperationKind::Export).await
        {
            let error = match e {
                StepError::Keyservice(status) => status.message().to_owned(),
                StepError::Audit(e) => e.to_string(),
            };
            tracing::warn!(job = %id, %error, "export delivered, but the job could not be marked done");
        }
    }
}

fn step_error(e: StepError) -> VaultError {
    match e {
        StepError::Keyservice(status) => ExportError::Keyservice(status).into(),
        StepError::Audit(e) => e,
    }
}

/// The subkeys of `key` an export may be encrypted to: those its primary key (the one
/// the fingerprint pins) binds with a valid signature flagged for encryption, and has
/// not revoked. The pin covers the primary key only; a subkey anyone appended to the
/// key file has no valid binding and is left out.
fn bound_encryption_subkeys(key: &SignedPublicKey) -> Vec<SignedPublicSubKey> {
    key.public_subkeys
        .iter()
        .filter(|sub| {
            let valid = |sig: &&pgp::packet::Signature, typ| {
                sig.typ() == Some(typ)
                    && sig
                        .verify_subkey_binding(&key.primary_key, &sub.key)
                        .is_ok()
            };
            let bound = sub.signatures.iter().any(|sig| {
                valid(&sig, SignatureType::SubkeyBinding)
                    && (sig.key_flags().encrypt_comms() || sig.key_flags().encrypt_storage())
            });
            let revoked = sub
                .signatures
                .iter()
                .any(|sig| valid(&sig, SignatureType::SubkeyRevocation));
            bound && !revoked
        })
        .cloned()
        .collect()
}

/// `plain` encrypted to every subkey of `key` (SEIPD v1 with MDC, AES-256, ZLIB).
fn encrypt(key: &SignedPublicKey, plain: &[u8]) -> Result<Vec<u8>, ExportError> {
    let mut builder =
        MessageBuilder::from_reader("", plain).seipd_v1(RingRng, SymmetricKeyAlgorithm::AES256);
    builder.compression(CompressionAlgorithm::ZLIB);
    for sub in &key.public_subkeys {
        builder
            .encrypt_to_key(RingRng, &sub.key)
            .map_err(|_| ExportError::Write("the export key cannot encrypt".into()))?;
    }
    let mut out = Vec::new();
    builder
        .to_writer(RingRng, &mut out)
        .map_err(|_| ExportError::Write("encryption failed".into()))?;
    Ok(out)
}

/// `OpenOptions` for files only the vault's user may read.
trait OwnerOnly {
    fn mode_owner_only(&mut self) -> &mut Self;
}

impl OwnerOnly for std::fs::OpenOptions {
    fn mode_owner_only(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// Appends card data to `buf` without leaving a copy behind: a buffer that must grow
/// is copied into one twice its size, and the old one zeroized (a `Vec` growing on its
/// own would free it as it was).
fn push_zeroizing(buf: &mut Zeroizing<Vec<u8>>, bytes: &[u8]) {
    if buf.capacity() - buf.len() < bytes.len() {
        let size = (buf.len() + bytes.len()).max(buf.capacity() * 2);
        let mut grown = Zeroizing::new(Vec::with_capacity(size));
        grown.extend_from_slice(buf);
        *buf = grown;
    }
    buf.extend_from_slice(bytes);
}

/// One card of the export file, written into a buffer sized for its worst case up
/// front (so it never reallocates), zeroized when dropped.
fn card_line(
    format: ExportFormat,
    token: &Token,
    card: &crate::card::CardData,
    name: &str,
) -> Zeroizing<Vec<u8>> {
    use std::io::Write as _;
    // A name escaped for JSON takes at most 6 bytes per byte (\u00XX); the rest is
    // under 128 bytes.
    let mut line = Zeroizing::new(Vec::with_capacity(128 + 6 * name.len()));
    let (number, month, year) = (
        card.pan.expose_digits(),
        card.expiry.month,
        card.expiry.year,
    );
    // Writes into a Vec cannot fail.
    let _ = match format {
        ExportFormat::Csv => {
            let _ = write!(line, "{},{number},{month},{year},", token.as_str());
            push_csv_cell(&mut line, name);
            line.write_all(b"\n")
        }
        ExportFormat::JsonLines => {
            let _ = write!(
                line,
                "{{\"token\":\"{}\",\"number\":\"{number}\",\"exp_month\":{month},\
                 \"exp_year\":{year},\"name\":",
                token.as_str()
            );
            let _ = serde_json::to_writer(&mut *line, name);
            line.write_all(b"}\n")
        }
    };
    line
}

/// `value` as a CSV cell, quoted when it must be, written straight into `out`.
fn push_csv_cell(out: &mut Vec<u8>, value: &str) {
    if !value.contains([',', '"', '\n', '\r']) {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    out.push(b'"');
    for b in value.bytes() {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn check_id(id: &str) -> Result<(), ExportError> {
    if valid_job_id(id) {
        Ok(())
    } else {
        Err(ExportError::Invalid {
            field: "job_id",
            rule: "must be a job id as `vaultctl export propose` printed it (p- and 12 hex digits)",
        })
    }
}

fn job(p: keys_pb::Proposal) -> ExportJob {
    let state = jobs::state_name(&p);
    // Approved once (it may be running, done or lapsed since: see `state`); whether
    // it may run is the claim's to say.
    let approved = !p.approved_by.is_empty();
    let job = p.job.unwrap_or_default();
    ExportJob {
        id: p.id,
        tenant: job.tenant,
        processor: job.processor,
        selection: job.selection,
        proposed_by: p.proposed_by,
        approved_by: p.approved_by,
        approved,
        expires_at_unix_ms: p.expires_at_unix_ms,
        state,
        claimed_by: p.claimed_by,
        claim_by_unix_ms: p.claim_by_unix_ms,
    }
}

/// The operating system's generator (through ring, the one source of randomness here),
/// for rPGP's session keys and IVs.
struct RingRng;

impl RngCore for RingRng {
    fn next_u32(&mut self) -> u32 {
        let mut bytes = [0u8; 4];
        self.fill_bytes(&mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn next_u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        self.fill_bytes(&mut bytes);
        u64::from_le_bytes(bytes)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // The system generator failing is not recoverable: refusing to encrypt with a
        // predictable key is the only safe answer.
        #[allow(clippy::expect_used)]
        envelope::fill_random(dest).expect("the system random number generator failed");
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_chacha::rand_core::Error> {
        envelope::fill_random(dest)
            .map_err(|_| rand_chacha::rand_core::Error::new("the system generator failed"))
    }
}

impl CryptoRng for RingRng {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::import::{ImportKey, open, rows};

    #[test]
    fn card_lines_read_back_and_a_growing_buffer_keeps_every_line() {
        use crate::card::{CardData, CardholderName, Expiry, Pan, Today};
        let token = Token::generate().unwrap();
        let card = CardData {
            pan: Pan::parse("4242424242424242").unwrap(),
            expiry: Expiry::parse(7, 2040, Today::now()).unwrap(),
            name: None,
            cvc: None,
        };
        let name = "Zoë \"Z\" O'Neil, Jr.";
        assert!(CardholderName::parse(name).is_ok());
        let json = card_line(ExportFormat::JsonLines, &token, &card, name);
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["number"], "4242424242424242");
        assert_eq!(value["name"], name);
        assert_eq!(value["exp_month"], 7);
        assert_eq!(value["token"], token.as_str());
        let csv = card_line(ExportFormat::Csv, &token, &card, name);
        assert_eq!(
            std::str::from_utf8(&csv).unwrap(),
            format!(
                "{},4242424242424242,7,2040,\"Zoë \"\"Z\"\" O'Neil, Jr.\"\n",
                token.as_str()
            )
        );
        let mut plain = Zeroizing::new(Vec::new());
        for _ in 0..100 {
            push_zeroizing(&mut plain, &csv);
        }
        assert_eq!(plain.len(), 100 * csv.len());
        assert!(plain.chunks(csv.len()).all(|line| line == &csv[..]));
    }

    fn seed(byte: u8) -> envelope::SecretKey {
        envelope::SecretKey::from_slice(&[byte; 32]).unwrap()
    }

    /// A key file holding the processor's primary key (so the pin matches) and a
    /// subkey someone else appended: the export is encrypted to the processor's own
    /// subkey only, and the other key cannot open it.
    #[test]
    fn a_subkey_the_pinned_key_does_not_bind_gets_nothing() {
        let processor = ImportKey::derive(1, &seed(1)).unwrap();
        let intruder = ImportKey::derive(1, &seed(2)).unwrap();
        let (mut file_key, _) =
            SignedPublicKey::from_string(&processor.public_armored().unwrap()).unwrap();
        let (theirs, _) =
            SignedPublicKey::from_string(&intruder.public_armored().unwrap()).unwrap();
        let own = file_key.public_subkeys.clone();
        file_key
            .public_subkeys
            .push(theirs.public_subkeys[0].clone());
        assert_eq!(
            hex::encode_upper(file_key.fingerprint().as_bytes()),
            processor.fingerprint().unwrap(),
            "the pin still matches the file"
        );
        assert_eq!(bound_encryption_subkeys(&file_key), own);
        file_key.public_subkeys = bound_encryption_subkeys(&file_key);
        let sealed = encrypt(&file_key, b"token,number\ntok_1,4242424242424242\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.gpg");
        std::fs::write(&path, sealed).unwrap();
        let read_all = |r: &mut dyn std::io::BufRead| {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| out)
        };
        assert!(
            open::with_plaintext(&path, &[Arc::new(intruder)], None, u64::MAX, read_all).is_err()
        );
        let plain =
            open::with_plaintext(&path, &[Arc::new(processor)], None, u64::MAX, read_all).unwrap();
        assert!(plain.starts_with(b"token,number"));
    }

    /// A compressed file that inflates past what its rows may fill (a decompression
    /// bomb) stops its pass at the limit; the same file under a larger limit opens.
    #[test]
    fn a_file_that_inflates_past_its_limit_stops_there() {
        let key = ImportKey::derive(1, &seed(4)).unwrap();
        let (public, _) = SignedPublicKey::from_string(&key.public_armored().unwrap()).unwrap();
        let plain = vec![b'\n'; 8 << 20];
        let mut builder = MessageBuilder::from_reader("", &plain[..])
            .seipd_v1(RingRng, SymmetricKeyAlgorithm::AES256);
        builder.compression(CompressionAlgorithm::ZLIB);
        builder
            .encrypt_to_key(RingRng, &public.public_subkeys[0].key)
            .unwrap();
        let mut sealed = Vec::new();
        builder.to_writer(RingRng, &mut sealed).unwrap();
        assert!(
            sealed.len() < 64 * 1024,
            "compressed: {} bytes",
            sealed.len()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.pgp");
        std::fs::write(&path, &sealed).unwrap();
        let key = Arc::new(key);
        let read_all = |reader: &mut dyn std::io::BufRead| {
            std::io::copy(reader, &mut std::io::sink()).map_err(|_| ())
        };
        let result = open::with_plaintext(&path, &[Arc::clone(&key)], None, 1 << 20, read_all);
        assert!(
            matches!(result, Err(Err(open::OpenError::TooLarge(_)))),
            "{result:?}"
        );
        let result = open::with_plaintext(&path, &[key], None, 8 << 20, read_all);
        assert_eq!(
            result.unwrap(),
            8 << 20,
            "exactly at the limit is not past it"
        );
    }

    /// A file changed in transit answers "integrity check failed", never what the rows'
    /// reader made of the changed plaintext (a row number and what is wrong with it).
    #[test]
    fn a_tampered_file_gets_no_row_error() {
        let key = ImportKey::derive(1, &seed(3)).unwrap();
        let (public, _) = SignedPublicKey::from_string(&key.public_armored().unwrap()).unwrap();
        let mut plain = String::new();
        for i in 0..20_000 {
            plain.push_str(&format!(
                "{{\"id\":\"c{i}\",\"card\":{{\"number\":\"4242424242424242\",\"exp_month\":1,\"exp_year\":2040}}}}\n"
            ));
        }
        let mut builder = MessageBuilder::from_reader("", plain.as_bytes())
            .seipd_v1(RingRng, SymmetricKeyAlgorithm::AES256);
        builder
            .encrypt_to_key(RingRng, &public.public_subkeys[0].key)
            .unwrap();
        let mut sealed = Vec::new();
        builder.to_writer(RingRng, &mut sealed).unwrap();
        let middle = sealed.len() / 2;
        sealed[middle] ^= 0x01;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.pgp");
        std::fs::write(&path, &sealed).unwrap();
        let result = open::with_plaintext(&path, &[Arc::new(key)], None, u64::MAX, |reader| {
            let mut rows = rows::open(reader, rows::FileFormat::JsonLines, rows::Fields::stripe())?;
            while rows.next_row()?.is_some() {}
            Ok::<u64, rows::FileError>(rows.rows_read())
        });
        assert!(
            matches!(result, Err(Err(open::OpenError::Integrity))),
            "{result:?}"
        );
    }
}

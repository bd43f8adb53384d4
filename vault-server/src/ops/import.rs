//! Import jobs (issue 21): a tenant's cards from another vault's or processor's
//! OpenPGP-encrypted export, under dual control. The pipeline, in the order its
//! invariants demand:
//!
//! 1. `propose` and `approve`: two identities with the tenant's `import` permission
//!    agree on the job (tenant, expected rows, the SHA-256 of the encrypted file and,
//!    optionally, the sender's signing key fingerprint); the keyservice keeps the
//!    proposal (sealed, in its key history) and refuses self-approval.
//! 2. `upload`: the job's first call claims it at the keyservice for this vault
//!    (`jobs::claim`: an approval starts one job on one vault), then the file arrives
//!    still encrypted, in pieces at given offsets (a piece sent again is written
//!    once), into the job's spool directory. With the last piece, before anything is
//!    decrypted, the spooled file's SHA-256 must be the approved one and the sender
//!    key given the approved one (none if none was approved); then the whole file is
//!    decrypted once and thrown away: integrity tag, sender signature (if the job
//!    names a sender key), header, no CVC column, the row count the job was approved
//!    for. A file that fails is deleted: nothing was stored.
//! 3. `rows`: the file is decrypted again, on a thread of its own, and its rows are
//!    tokenized a batch per call through `Records::tokenize_batch`, exempt from the
//!    guessing detector, each under a new token (never one the tenant held: see
//!    docs/security-model.md). The caller names the row to go on from (its mapping
//!    file is the durable cursor): each stored row writes, with its record, an entry
//!    naming its token (`row_key`), so rows done twice after a crash get the token they
//!    got the first time, and a restarted import ends with every row tokenized exactly
//!    once, without gaps. The thread holds one batch ahead
//!    and drops it if no call asks for it within two minutes; the last batch is handed
//!    over only once this pass, too, has checked the file's tag and signature.
//! 4. `finish`: after the last row, the job is marked done at the keyservice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use vault_proto::keys::v1 as keys_pb;

use runtime::now_unix_ms;

use super::jobs::{self, StepError};
use super::records::Records;
use super::tokenize::{Answer, BatchItem, TokenizeBatch};
use crate::audit::AuditEvent;
use crate::card::{CardData, Violation};
use crate::error::VaultError;
use crate::import::buckets::BucketCounts;
use crate::import::open::{self, OpenError};
use crate::import::rows::{self, FileError, SourceRow};
use crate::import::{
    Algorithm, Fields, FileFormat, ImportKey, JobState, Spool, SpoolError, valid_job_id,
};
use crate::intake;
use crate::policy::Caller;
use crate::record::Metadata;
use crate::store::Store;
use crate::token::Token;

/// Why an import call was refused. Texts name the rule, a job id, a row number or a
/// count, never a value from the file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("import is not set up on this vault: set import.spool_dir (required with PostgreSQL)")]
    NotConfigured,
    #[error("the keyservice serves no import key yet (an older keyservice?)")]
    NoKey,
    #[error("{field}: {rule}")]
    Invalid {
        field: &'static str,
        rule: &'static str,
    },
    #[error("job {0} is not an import job of this tenant")]
    NoJob(String),
    #[error(
        "job {0} is not approved: a second identity with this tenant's `import` permission \
         must approve it (vaultctl import approve)"
    )]
    NotApproved(String),
    #[error(
        "from_row {from_row} is past the {done} rows done: a job goes on from a row it \
         reached (is the mapping file this job's?)"
    )]
    Skips { from_row: u64, done: u64 },
    #[error("offset {offset} is past the {received} bytes received; send from {received}")]
    Gap { offset: u64, received: u64 },
    #[error("the file is larger than import.max_file_mb ({max_mb} MiB)")]
    TooLarge { max_mb: u64 },
    #[error("the file was refused and nothing of it was stored: {0}")]
    Open(#[from] OpenError),
    #[error("the file was refused and nothing of it was stored: {0}")]
    File(#[from] FileError),
    #[error(
        "the file was refused and nothing of it was stored: it holds {found} rows, the job \
         was approved for {expected}"
    )]
    RowCount { found: u64, expected: u64 },
    #[error(
        "the file was refused and nothing of it was stored: more than {limit} of its cards \
         share one first six and last four (import.max_cards_per_bucket), the shape of a \
         file made to guess a card number"
    )]
    Crowded { limit: u16 },
    #[error(
        "job {0} is finished, and its file was removed 7 days after its end (with its rows' \
         entries): there is nothing more to read"
    )]
    Swept(String),
    #[error("the file has not passed its check: send it, with its last piece marked last")]
    NotVerified,
    #[error(
        "the file was refused and nothing of it was stored: its SHA-256 is not the one the \
         job was approved for (a job takes exactly the file `vaultctl import propose` was \
         given)"
    )]
    FileDigest,
    #[error("the file was refused and nothing of it was stored: {0}")]
    SenderKey(&'static str),
    #[error(
        "job {0} names no file digest (it was started by an older vault): propose it again \
         with the file"
    )]
    NoFileDigest(String),
    #[error("the keyservice refused: {0}")]
    Keyservice(tonic::Status),
    #[error("the job's claim could not be audited")]
    Audit(Box<VaultError>),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl From<StepError> for ImportError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Keyservice(status) => ImportError::Keyservice(status),
            StepError::Audit(e) => ImportError::Audit(Box::new(e)),
        }
    }
}

impl From<ImportError> for VaultError {
    fn from(e: ImportError) -> Self {
        VaultError::Import(e)
    }
}

/// Most rows one job may name: far above any export, low enough that no count
/// overflows.
const MAX_ROWS: u64 = 1_000_000_000;

/// How long a row's entry (the token it got, see `row_key`) is kept: a job resumed
/// later than this after it stored a row would store that row again.
const ROW_ENTRY_KEEP_MS: i64 = 7 * 24 * 3600 * 1000;

/// The store key of the entry that says which token row `row` of job `id` got. It is
/// written in the same atomic write as the row's record, in the format of a sealed
/// card's replay entry (`intake`), so that the purge removes it when its time is up.
fn row_key(caller: &Caller, id: &str, row: u64) -> Vec<u8> {
    intake::tenant_key(&caller.tenant, format!("\0import/{id}/{row}").as_bytes())
}

/// Jobs up to this many rows look every card up among the tenant's; larger ones a
/// random sixteenth of them (the look-up is a seek in the card index, most of an
/// import's CPU when done for every row; a sixteenth of a large job measures the share
/// of known cards as well, and the rows looked up cannot be predicted by the sender).
const CHECK_EVERY_ROW_UP_TO: u64 = 16_000;

/// The cards of a batch to look up among the tenant's (see `CHECK_EVERY_ROW_UP_TO`).
fn sample<'a>(
    cards: impl Iterator<Item = &'a CardData>,
    total_rows: u64,
) -> Result<Vec<&'a CardData>, VaultError> {
    let cards: Vec<&CardData> = cards.collect();
    if total_rows <= CHECK_EVERY_ROW_UP_TO {
        return Ok(cards);
    }
    let mut draws = vec![0u8; cards.len()];
    envelope::fill_unique(&mut draws)?;
    Ok(cards
        .into_iter()
        .zip(draws)
        .filter(|(_, draw)| draw % 16 == 0)
        .map(|(card, _)| card)
        .collect())
}

/// What a job did with a row before.
enum Before {
    Stored(RowOutcome),
    /// Stored, and its token deleted or expired since: never stored again.
    Erased,
    Never,
}

/// A row this job stored whose token was deleted since (erased, expired).
const ERASED: Violation = Violation {
    field: "token",
    rule: "deleted",
    description: "the row was stored, and its token deleted since: it is not stored again",
};

/// A row a finished job never stored (its entry's time is up): not stored now.
const ENDED: Violation = Violation {
    field: "job_id",
    rule: "finished",
    description: "the job is finished: no row of it is stored any more",
};

/// A stored row, for the mapping.
fn stored(caller: &Caller, token: &Token, metadata: &Metadata) -> RowOutcome {
    RowOutcome::Stored {
        token: token.as_str().to_owned(),
        last_four: String::from_utf8_lossy(&metadata.last_four).into_owned(),
        fingerprint: match caller.sees_fingerprints {
            true => hex::encode(metadata.fingerprint.value),
            false => String::new(),
        },
    }
}

/// `[import]` as the importer uses it.
#[derive(Debug, Clone)]
pub struct ImportSettings {
    pub spool_dir: Option<PathBuf>,
    pub max_file_bytes: u64,
    pub flag_existing_share: f64,
    pub max_cards_per_bucket: u16,
}

/// A job as approved.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub tenant: String,
    pub expected_rows: u64,
    pub proposed_by: String,
    pub approved_by: String,
    pub approved: bool,
    pub expires_at_unix_ms: i64,
    pub file_sha256: String,
    pub sender_key_fingerprint: String,
    /// pending, approved, running, done or expired.
    pub state: &'static str,
    pub claimed_by: String,
    pub claim_by_unix_ms: i64,
}

/// How the last piece of a file says it is to be read.
#[derive(Debug, Clone)]
pub struct FileSpec {
    pub format: FileFormat,
    pub fields: Fields,
    /// The sender's armored public key: the file must be signed by it.
    pub sender_key: Option<String>,
}

/// A row's outcome, for the mapping file.
#[derive(Debug)]
pub enum RowOutcome {
    Stored {
        token: String,
        last_four: String,
        /// Empty unless the caller may see fingerprints.
        fingerprint: String,
    },
    Invalid(Violation),
}

#[derive(Debug)]
pub struct ImportedRow {
    pub row: u64,
    pub source_id: String,
    pub outcome: RowOutcome,
}

#[derive(Debug)]
pub struct RowsDone {
    pub rows: Vec<ImportedRow>,
    /// The rows done so far, counting these: where the next call goes on from.
    pub next_row: u64,
    pub total_rows: u64,
    pub done: bool,
}

type Batch = Result<Vec<SourceRow>, ImportError>;

/// How long a job's decryption waits for its next call before it stops and drops the
/// batch it prepared: no card is held for a caller that went away.
const SESSION_IDLE: Duration = Duration::from_secs(120);

/// The second decryption of one job's file, on a thread of its own, a batch ahead: it
/// prepares a batch, then hands it over when asked (`demand`). Dropping the session
/// stops the thread at its next step.
#[derive(Debug)]
struct Session {
    next_row: u64,
    demand: std::sync::mpsc::SyncSender<()>,
    batches: mpsc::Receiver<Batch>,
}

impl Session {
    /// The next batch; `None` when the thread has stopped (idle too long).
    async fn next(&mut self) -> Option<Batch> {
        match self.demand.try_send(()) {
            Ok(()) | Err(std::sync::mpsc::TrySendError::Full(())) => self.batches.recv().await,
            Err(std::sync::mpsc::TrySendError::Disconnected(())) => None,
        }
    }
}

/// Cheap to clone: a job's call runs as a task of its own (see `rows`).
#[derive(Debug)]
pub struct Importer<S> {
    records: Arc<Records<S>>,
    spool: Option<Spool>,
    settings: ImportSettings,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    /// Per job: serializes its calls (an upload's check, a batch of rows). Jobs do not
    /// wait for one another.
    busy: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl<S> Clone for Importer<S> {
    fn clone(&self) -> Self {
        Self {
            records: Arc::clone(&self.records),
            spool: self.spool.clone(),
            settings: self.settings.clone(),
            sessions: Arc::clone(&self.sessions),
            busy: Arc::clone(&self.busy),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S: Store> Importer<S> {
    pub fn new(records: Arc<Records<S>>, settings: ImportSettings) -> Self {
        Self {
            records,
            spool: settings.spool_dir.clone().map(Spool::new),
            settings,
            sessions: Arc::default(),
            busy: Arc::default(),
        }
    }

    /// Job `id`'s turn: held while one of its calls runs.
    async fn turn(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let job = {
            let mut busy = lock(&self.busy);
            // Locks nobody holds or waits for are dropped, so the map holds only jobs
            // with a call under way.
            busy.retain(|_, job| Arc::strong_count(job) > 1);
            Arc::clone(busy.entry(id.to_owned()).or_default())
        };
        job.lock_owned().await
    }

    fn spool(&self) -> Result<&Spool, ImportError> {
        self.spool.as_ref().ok_or(ImportError::NotConfigured)
    }

    /// Removes the spooled files of jobs that ended longer ago than their rows'
    /// entries are kept (see `Spool::sweep`). Run by the purge.
    pub async fn sweep(&self) -> Result<usize, ImportError> {
        let Some(spool) = self.spool.clone() else {
            return Ok(0);
        };
        let before =
            std::time::SystemTime::now() - Duration::from_millis(ROW_ENTRY_KEEP_MS.unsigned_abs());
        Ok(blocking(move || spool.sweep(before)).await??)
    }

    /// The active import key of `algorithm`, for the sending party: derived, on a
    /// blocking thread if it was not yet (an RSA key's first use costs seconds).
    pub async fn import_key(&self, algorithm: Algorithm) -> Result<Arc<ImportKey>, ImportError> {
        let key = self
            .records
            .keys()
            .snapshot()
            .import
            .active(algorithm)
            .cloned()
            .ok_or(ImportError::NoKey)?;
        if !key.is_derived() {
            let derived = Arc::clone(&key);
            blocking(move || derived.fingerprint().map(drop))
                .await?
                .map_err(|_| ImportError::NoKey)?;
        }
        Ok(key)
    }

    /// Dual control, step one: the job binds the file (`file_sha256`, the hex SHA-256 of
    /// the encrypted file as it will be uploaded) and, when given, the sender's key.
    pub async fn propose(
        &self,
        caller: &Caller,
        expected_rows: u64,
        file_sha256: &str,
        sender_public_key: Option<&str>,
    ) -> Result<Job, ImportError> {
        if !(1..=MAX_ROWS).contains(&expected_rows) {
            return Err(ImportError::Invalid {
                field: "expected_rows",
                rule: "must be 1 to 1,000,000,000",
            });
        }
        if file_sha256.len() != 64 || !file_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImportError::Invalid {
                field: "file_sha256",
                rule: "required: the hex SHA-256 of the encrypted file (64 digits)",
            });
        }
        let sender_key_fingerprint = match sender_public_key {
            Some(armored) => sender_fingerprint(armored).map_err(|_| ImportError::Invalid {
                field: "sender_public_key",
                rule: "must be an armored OpenPGP public key",
            })?,
            None => String::new(),
        };
        let proposal = self
            .records
            .keys()
            .keyservice()
            .propose_job(keys_pb::ProposeJobRequest {
                kind: keys_pb::OperationKind::Import as i32,
                job: Some(keys_pb::TenantJob {
                    vault_identity: String::new(),
                    tenant: caller.tenant.as_str().to_owned(),
                    expected_rows,
                    on_behalf_of: caller.identity.clone(),
                    file_sha256: file_sha256.to_ascii_lowercase(),
                    sender_key_fingerprint,
                    ..Default::default()
                }),
            })
            .await
            .map_err(ImportError::Keyservice)?
            .into_inner();
        Ok(job(proposal))
    }

    /// Dual control, step two: by another identity of the same tenant.
    pub async fn approve(&self, caller: &Caller, id: &str) -> Result<Job, ImportError> {
        check_id(id)?;
        let proposal = self
            .records
            .keys()
            .keyservice()
            .approve_job(keys_pb::ApproveJobRequest {
                id: id.to_owned(),
                tenant: caller.tenant.as_str().to_owned(),
                approved_by: caller.identity.clone(),
                kind: keys_pb::OperationKind::Import as i32,
            })
            .await
            .map_err(ImportError::Keyservice)?
            .into_inner();
        Ok(job(proposal))
    }

    /// The job's state: from the spool once it started; else from the keyservice, which
    /// must hold it approved, for the caller's tenant.
    async fn state(&self, caller: &Caller, id: &str) -> Result<JobState, ImportError> {
        check_id(id)?;
        let spool = self.spool()?;
        if let Some(state) = spool.load(id)? {
            if state.tenant != caller.tenant.as_str() {
                return Err(ImportError::NoJob(id.to_owned()));
            }
            return Ok(state);
        }
        let proposal = match self
            .records
            .keys()
            .keyservice()
            .get_job(keys_pb::GetJobRequest { id: id.to_owned() })
            .await
        {
            Ok(p) => p.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(ImportError::NoJob(id.to_owned()));
            }
            Err(s) => return Err(ImportError::Keyservice(s)),
        };
        if proposal.kind != keys_pb::OperationKind::Import as i32 {
            return Err(ImportError::NoJob(id.to_owned()));
        }
        let job = job(proposal);
        if job.tenant != caller.tenant.as_str() {
            return Err(ImportError::NoJob(id.to_owned()));
        }
        if job.approved_by.is_empty() {
            return Err(ImportError::NotApproved(id.to_owned()));
        }
        // The approval is used here, once: claimed for this vault before the job's
        // state exists. A claim whose state was lost (a crash before the save below)
        // is claimed again by this vault, which can only take the approved file.
        let claimed =
            jobs::claim(&self.records, caller, id, keys_pb::OperationKind::Import).await?;
        // Claimed before by this vault, whose state was lost: any row may be stored
        // already, so every row is looked up before it is tokenized.
        let rows_started = match claimed.resumed {
            true => u64::MAX,
            false => 0,
        };
        let job = self::job(claimed);
        let state = JobState {
            job_id: job.id,
            tenant: job.tenant,
            expected_rows: job.expected_rows,
            proposed_by: job.proposed_by,
            approved_by: job.approved_by,
            received_bytes: 0,
            format: None,
            fields: None,
            sender_key: None,
            verified: false,
            total_rows: 0,
            rows_done: 0,
            rows_existing: 0,
            rows_checked: 0,
            rows_started,
            end_recorded: false,
            file_sha256: job.file_sha256,
            sender_key_fingerprint: job.sender_key_fingerprint,
            finished: false,
        };
        spool.save(&state)?;
        tracing::info!(job = %state.job_id, rows = state.expected_rows, "import job started");
        Ok(state)
    }

    /// A piece of the encrypted file; with `last`, the file's check (see the module
    /// doc). Returns the job's state after it.
    ///
    /// Like `rows`, it runs to its end under the job's turn even if the caller goes
    /// away: a retry waits for the check under way instead of starting another.
    pub async fn upload(
        &self,
        caller: &Caller,
        id: &str,
        offset: u64,
        data: &[u8],
        last: Option<FileSpec>,
    ) -> Result<JobState, ImportError> {
        check_id(id)?;
        let turn = self.turn(id).await;
        let (this, caller, id, data) = (self.clone(), caller.clone(), id.to_owned(), data.to_vec());
        tokio::spawn(async move {
            let done = this.upload_in_turn(&caller, &id, offset, &data, last).await;
            drop(turn);
            done
        })
        .await
        .map_err(|_| worker_failed())?
    }

    async fn upload_in_turn(
        &self,
        caller: &Caller,
        id: &str,
        offset: u64,
        data: &[u8],
        last: Option<FileSpec>,
    ) -> Result<JobState, ImportError> {
        let mut state = self.state(caller, id).await?;
        if state.verified {
            return Ok(state);
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > self.settings.max_file_bytes {
            return Err(ImportError::TooLarge {
                max_mb: self.settings.max_file_bytes / (1024 * 1024),
            });
        }
        let spool = self.spool()?.clone();
        let received = {
            let (spool, id, data) = (spool.clone(), id.to_owned(), data.to_vec());
            blocking(move || spool.append(&id, offset, &data)).await??
        };
        if offset > received {
            return Err(ImportError::Gap { offset, received });
        }
        state.received_bytes = received;
        let Some(spec) = last else {
            return Ok(state);
        };
        if received == 0 {
            return Err(ImportError::Invalid {
                field: "data",
                rule: "the file is empty",
            });
        }
        // The file and sender the job was approved for, or nothing is decrypted.
        let sender = match self
            .check_bound(&state, &spool, id, spec.sender_key.as_deref())
            .await
        {
            Ok(sender) => sender,
            Err(refused) => {
                self.discard(&spool, &mut state, id).await?;
                tracing::warn!(job = %id, error = %refused, "import file refused");
                return Err(refused);
            }
        };
        let keys = self.records.keys().snapshot().import.all().to_vec();
        if keys.is_empty() {
            return Err(ImportError::NoKey);
        }
        let (path, format, fields) = (spool.file(id), spec.format, spec.fields.clone());
        let (limit, expected) = (self.settings.max_cards_per_bucket, state.expected_rows);
        let limit_bytes = open::plaintext_limit(expected);
        let counted = blocking(move || {
            open::with_plaintext(&path, &keys, sender.as_ref(), limit_bytes, |reader| {
                let mut rows = rows::open(reader, format, fields)?;
                let mut buckets = BucketCounts::new(limit);
                let mut crowded = None;
                // Every row is parsed (a card's plaintext lives for one row), and
                // dropped: this pass keeps nothing but counts.
                while let Some(row) = rows.next_row()? {
                    if row.row > expected {
                        // No need to read on: the count is wrong already.
                        return Err(FileError::MoreRows(expected));
                    }
                    if let (Ok(card), None) = (&row.card, crowded) {
                        crowded = buckets.add(&card.pan).err();
                    }
                }
                Ok::<_, FileError>((rows.rows_read(), crowded))
            })
        })
        .await?;
        // Said only now that the whole file checked out (tag, signature).
        let counted = match counted {
            Ok((_, Some(crowded))) => Err(Ok(Err(crowded))),
            Ok((found, None)) => Ok(found),
            Err(Ok(e)) => Err(Ok(Ok(e))),
            Err(Err(e)) => Err(Err(e)),
        };
        let found = match counted {
            Ok(found) if found == state.expected_rows => found,
            refused => {
                self.discard(&spool, &mut state, id).await?;
                let error = match refused {
                    Ok(found) => ImportError::RowCount {
                        found,
                        expected: state.expected_rows,
                    },
                    Err(Ok(Ok(e))) => ImportError::File(e),
                    Err(Ok(Err(crowded))) => ImportError::Crowded {
                        limit: crowded.limit,
                    },
                    Err(Err(e)) => ImportError::Open(e),
                };
                tracing::warn!(job = %id, error = %error, "import file refused");
                return Err(error);
            }
        };
        state.format = Some(spec.format);
        state.fields = Some(spec.fields);
        state.sender_key = spec.sender_key;
        state.verified = true;
        state.total_rows = found;
        spool.save(&state)?;
        tracing::info!(job = %id, rows = found, bytes = received, "import file checked");
        Ok(state)
    }

    /// Checks, before anything is decrypted, that the spooled file is the one the job
    /// was approved for (its SHA-256) and that the sender key given is the approved one
    /// (strict: a job approved without a sender key takes none). Returns the sender
    /// key to check the signature with.
    async fn check_bound(
        &self,
        state: &JobState,
        spool: &Spool,
        id: &str,
        sender_key: Option<&str>,
    ) -> Result<Option<pgp::composed::SignedPublicKey>, ImportError> {
        if state.file_sha256.is_empty() {
            return Err(ImportError::NoFileDigest(id.to_owned()));
        }
        let path = spool.file(id);
        let digest = blocking(move || file_sha256(&path)).await?.map_err(|e| {
            ImportError::Spool(SpoolError::Io {
                path: "the spooled file".into(),
                source: e,
            })
        })?;
        if !digest.eq_ignore_ascii_case(&state.file_sha256) {
            return Err(ImportError::FileDigest);
        }
        match (sender_key, state.sender_key_fingerprint.as_str()) {
            (None, "") => Ok(None),
            (None, _) => Err(ImportError::SenderKey(
                "the job was approved for a signed file: give the sender key it names \
                 (--sender-key)",
            )),
            (Some(_), "") => Err(ImportError::SenderKey(
                "the job was approved without a sender key: the upload may not name one \
                 (propose the job with --sender-key to check a signature)",
            )),
            (Some(armored), approved) => {
                let key = open::sender_key(armored)?;
                if fingerprint_of(&key) != approved {
                    return Err(ImportError::SenderKey(
                        "the sender key given is not the one the job was approved for",
                    ));
                }
                Ok(Some(key))
            }
        }
    }

    /// Deletes a refused file from the spool; the job waits for its file again.
    async fn discard(
        &self,
        spool: &Spool,
        state: &mut JobState,
        id: &str,
    ) -> Result<(), ImportError> {
        blocking({
            let (spool, id) = (spool.clone(), id.to_owned());
            move || spool.discard_file(&id)
        })
        .await??;
        state.received_bytes = 0;
        spool.save(state)?;
        Ok(())
    }

    /// Marks the job done at the keyservice once its last row is done (see
    /// [`jobs::finish`]); once per job, and again if an earlier try failed.
    pub async fn finish(&self, caller: &Caller, id: &str) -> Result<(), ImportError> {
        check_id(id)?;
        let _turn = self.turn(id).await;
        let spool = self.spool()?;
        let Some(mut state) = spool.load(id)? else {
            return Ok(());
        };
        if state.tenant != caller.tenant.as_str() {
            return Err(ImportError::NoJob(id.to_owned()));
        }
        if state.finished || !state.verified || state.rows_done < state.total_rows {
            return Ok(());
        }
        match jobs::finish(&self.records, caller, id, keys_pb::OperationKind::Import).await {
            Ok(()) => {}
            // The keyservice no longer knows the job (it prunes a RUNNING job 7 days
            // after its claim): every row is done, so the job is finished here, or its
            // last call would fail on every try.
            Err(StepError::Keyservice(status)) if status.code() == tonic::Code::NotFound => {
                tracing::warn!(
                    job = %id,
                    "the keyservice no longer knows this import job; finished here without it"
                );
            }
            Err(e) => return Err(e.into()),
        }
        state.finished = true;
        spool.save(&state)?;
        Ok(())
    }

    /// Tokenizes the rows after the first `from_row` (at most a batch), in order.
    ///
    /// The work runs as a task of its own, to its end even if the caller goes away:
    /// the job's next call waits for it and so sees every row it stored (their entries
    /// are what makes a row done twice get its first token; a call dropped while its
    /// write was queued would otherwise let the next one store the same rows again).
    pub async fn rows(
        &self,
        caller: &Caller,
        id: &str,
        from_row: u64,
        max_rows: usize,
    ) -> Result<RowsDone, VaultError> {
        check_id(id)?;
        let turn = self.turn(id).await;
        let (this, caller, id) = (self.clone(), caller.clone(), id.to_owned());
        tokio::spawn(async move {
            let done = this.rows_in_turn(&caller, &id, from_row, max_rows).await;
            drop(turn);
            done
        })
        .await
        .map_err(|_| VaultError::from(worker_failed()))?
    }

    async fn rows_in_turn(
        &self,
        caller: &Caller,
        id: &str,
        from_row: u64,
        max_rows: usize,
    ) -> Result<RowsDone, VaultError> {
        let mut state = self.state(caller, id).await?;
        if !state.verified {
            return Err(ImportError::NotVerified.into());
        }
        if from_row >= state.total_rows {
            return Ok(self.done(&state, Vec::new(), state.total_rows));
        }
        // No row is skipped: a job goes on from a row it reached (a job whose state
        // was lost and rebuilt trusts the caller's mapping, and looks every row up).
        if from_row > state.rows_done && state.rows_started != u64::MAX {
            return Err(ImportError::Skips {
                from_row,
                done: state.rows_done,
            }
            .into());
        }
        // A job at its end stores nothing more: what a later call asks for again is
        // answered from the rows' entries only (an approval is used once; a row whose
        // token was erased since is not stored again).
        let ended = state.end_recorded || state.finished;
        if ended && !self.spool()?.file(id).exists() {
            return Err(ImportError::Swept(id.to_owned()).into());
        }
        let batch_size = max_rows.clamp(1, self.records.settings().max_batch_size);
        let mut session = match lock(&self.sessions).remove(id) {
            Some(s) if s.next_row == from_row => s,
            _ => self.open_session(&state, from_row, batch_size)?,
        };
        let batch = match session.next().await {
            Some(batch) => batch,
            // Stopped while idle: once more from the same row.
            None => {
                session = self.open_session(&state, from_row, batch_size)?;
                session
                    .next()
                    .await
                    .unwrap_or(Err(ImportError::Open(OpenError::Integrity)))
            }
        };
        let rows = batch?;
        if rows.is_empty() {
            return Ok(self.done(&state, Vec::new(), state.total_rows));
        }
        let next_row = rows.last().map_or(from_row, |r| r.row);
        // Rows this job may have stored before (a resumed job): the token each got, from
        // the entry written with its record. Never another job's or another call's
        // token for the same card: that would tell the importers which of their rows'
        // cards the tenant held (a guessing oracle).
        let mut order = Vec::with_capacity(rows.len());
        let mut outcomes: Vec<Option<RowOutcome>> = Vec::with_capacity(rows.len());
        let mut fresh = Vec::new();
        for row in rows {
            let before = match (&row.card, row.row <= state.rows_started || ended) {
                (Ok(_), true) => self.stored_before(caller, id, row.row).await?,
                _ => Before::Never,
            };
            order.push((row.row, row.source_id));
            outcomes.push(match (before, ended) {
                (Before::Stored(outcome), _) => Some(outcome),
                (Before::Erased, _) => Some(RowOutcome::Invalid(ERASED)),
                (Before::Never, true) if row.card.is_ok() => Some(RowOutcome::Invalid(ENDED)),
                (Before::Never, _) => {
                    fresh.push((row.row, row.card));
                    None
                }
            });
        }
        let checked = sample(
            fresh.iter().filter_map(|(_, c)| c.as_ref().ok()),
            state.total_rows,
        )?;
        let known = match checked.is_empty() {
            true => 0,
            false => self.records.known_cards(caller, &checked).await?,
        };
        let checked = checked.len() as u64;
        if next_row > state.rows_started {
            state.rows_started = next_row;
            self.save(&state).await?;
        }
        if !fresh.is_empty() {
            let keep_until_ms = now_unix_ms().saturating_add(ROW_ENTRY_KEEP_MS);
            let (rows, cards): (Vec<u64>, Vec<_>) = fresh.into_iter().unzip();
            let answers = rows
                .iter()
                .map(|&row| {
                    Some(Answer {
                        key: row_key(caller, id, row),
                        entry: intake::Entry {
                            keep_until_ms,
                            claimed_at_ms: now_unix_ms(),
                            blob_sha256: [0; 32],
                            state: intake::EntryState::Done,
                            reused: false,
                            cvc_not_kept: false,
                            token: String::new(),
                        },
                        claim: None,
                    })
                })
                .collect();
            let items = self
                .records
                .tokenize_batch(
                    caller,
                    TokenizeBatch {
                        cards,
                        ttl_secs: 0,
                        reuse_existing: false,
                        format: None,
                        answers,
                        guessing_exempt: true,
                    },
                )
                .await?;
            let mut items = items.into_iter();
            for slot in outcomes.iter_mut().filter(|o| o.is_none()) {
                *slot = items.next().map(|item| match item {
                    BatchItem::Stored(done) => stored(caller, &done.token, &done.metadata),
                    BatchItem::Invalid(violation) => RowOutcome::Invalid(violation),
                });
            }
        }
        let imported: Vec<ImportedRow> = order
            .into_iter()
            .zip(outcomes)
            .filter_map(|((row, source_id), outcome)| {
                Some(ImportedRow {
                    row,
                    source_id,
                    outcome: outcome?,
                })
            })
            .collect();
        if next_row > state.rows_done {
            state.rows_existing += known;
            state.rows_checked += checked;
            state.rows_done = next_row;
            self.save(&state).await?;
        }
        if next_row >= state.total_rows && !state.end_recorded {
            self.record_end(caller, &mut state).await?;
        }
        session.next_row = next_row;
        lock(&self.sessions).insert(id.to_owned(), session);
        Ok(self.done(&state, imported, next_row))
    }

    /// Whether this job stored the row before, and its outcome if its token is still
    /// there.
    async fn stored_before(
        &self,
        caller: &Caller,
        id: &str,
        row: u64,
    ) -> Result<Before, VaultError> {
        let entry = self
            .records
            .store()
            .get_outcome(&row_key(caller, id, row))
            .await?
            .and_then(|value| intake::Entry::decode(&value))
            .filter(|entry| entry.state == intake::EntryState::Done);
        let Some(token) = entry.and_then(|e| Token::parse(&e.token).ok()) else {
            return Ok(Before::Never);
        };
        match self.records.load_verified(caller, &token).await {
            Ok(record) => Ok(Before::Stored(stored(caller, &token, &record.metadata))),
            Err(VaultError::NotFound | VaultError::Deleted | VaultError::Expired) => {
                Ok(Before::Erased)
            }
            Err(e) => Err(e),
        }
    }

    /// The job's last row is done: its end, with the share of rows whose card the tenant
    /// held already, goes to the audit log (and the server log when above
    /// `flag_existing_share`), never to the importers.
    async fn record_end(&self, caller: &Caller, state: &mut JobState) -> Result<(), VaultError> {
        let flagged = self.flagged(state);
        if flagged {
            tracing::warn!(
                job = %state.job_id,
                rows = state.rows_done,
                checked = state.rows_checked,
                existing = state.rows_existing,
                share = self.settings.flag_existing_share,
                "import job flagged: more of its rows matched cards the tenant held than \
                 import.flag_existing_share allows"
            );
        }
        self.records
            .journal()
            .audit(AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: caller.identity.clone(),
                peer: "-".into(),
                action: "ImportFinished".into(),
                tenant: caller.tenant.as_str().to_owned(),
                count: u32::try_from(state.rows_done).unwrap_or(u32::MAX),
                outcome: "ok".into(),
                request_id: caller.request_id.clone(),
                detail: format!(
                    "job {}: {} rows; {} of the {} looked up were cards the tenant held \
                     already{}",
                    state.job_id,
                    state.rows_done,
                    state.rows_existing,
                    state.rows_checked,
                    if flagged {
                        "; flagged: above import.flag_existing_share"
                    } else {
                        ""
                    }
                ),
                ..Default::default()
            })
            .await?;
        state.end_recorded = true;
        self.save(state).await?;
        Ok(())
    }

    async fn save(&self, state: &JobState) -> Result<(), ImportError> {
        let (spool, state) = (self.spool()?.clone(), state.clone());
        blocking(move || spool.save(&state)).await??;
        Ok(())
    }

    fn flagged(&self, state: &JobState) -> bool {
        state.rows_checked > 0
            && state.rows_existing as f64
                > self.settings.flag_existing_share * state.rows_checked as f64
    }

    fn done(&self, state: &JobState, rows: Vec<ImportedRow>, next_row: u64) -> RowsDone {
        RowsDone {
            rows,
            next_row,
            total_rows: state.total_rows,
            done: next_row >= state.total_rows,
        }
    }

    /// Starts the second decryption, skipping the first `from_row` rows.
    fn open_session(
        &self,
        state: &JobState,
        from_row: u64,
        batch_size: usize,
    ) -> Result<Session, ImportError> {
        let (Some(format), Some(fields)) = (state.format, state.fields.clone()) else {
            return Err(ImportError::NotVerified);
        };
        let sender = match &state.sender_key {
            Some(armored) => Some(open::sender_key(armored)?),
            None => None,
        };
        let keys = self.records.keys().snapshot().import.all().to_vec();
        let path = self.spool()?.file(&state.job_id);
        let limit = open::plaintext_limit(state.expected_rows);
        let (tx, rx) = mpsc::channel::<Batch>(1);
        // Whether the session was dropped: checked while skipping rows, which hands
        // nothing over for a long time.
        let gone = tx.clone();
        let (demand, demanded) = std::sync::mpsc::sync_channel::<()>(1);
        // Hands a batch over when the next call asks for it; false: stop (the call never
        // came, or the session was dropped), dropping the batch.
        let hand_over = move |batch: Batch| {
            demanded.recv_timeout(SESSION_IDLE).is_ok() && tx.blocking_send(batch).is_ok()
        };
        std::thread::Builder::new()
            .name("import-rows".into())
            .spawn(move || {
                let result = open::with_plaintext(&path, &keys, sender.as_ref(), limit, |reader| {
                    let mut rows = rows::open(reader, format, fields).map_err(Some)?;
                    while rows.rows_read() < from_row {
                        if rows.rows_read() % 1024 == 0 && gone.is_closed() {
                            return Err(None);
                        }
                        if rows.next_row().map_err(Some)?.is_none() {
                            break;
                        }
                    }
                    loop {
                        let mut batch = Vec::with_capacity(batch_size);
                        while batch.len() < batch_size {
                            match rows.next_row().map_err(Some)? {
                                Some(row) => batch.push(row),
                                None => break,
                            }
                        }
                        // The last batch is handed over only after the file's tag (and
                        // signature) checked out again, at the end of this pass.
                        if batch.len() < batch_size {
                            return Ok(batch);
                        }
                        if !hand_over(Ok(batch)) {
                            // Nobody reads on: stop without reading to the end.
                            return Err(None);
                        }
                    }
                });
                let last = match result {
                    Ok(batch) => Ok(batch),
                    Err(Ok(None)) => return,
                    Err(Ok(Some(e))) => Err(ImportError::File(e)),
                    Err(Err(e)) => Err(ImportError::Open(e)),
                };
                hand_over(last);
            })
            .map_err(|e| {
                ImportError::Spool(SpoolError::Io {
                    path: "a thread for the import".into(),
                    source: e,
                })
            })?;
        Ok(Session {
            next_row: from_row,
            demand,
            batches: rx,
        })
    }
}

fn check_id(id: &str) -> Result<(), ImportError> {
    if valid_job_id(id) {
        Ok(())
    } else {
        Err(ImportError::Invalid {
            field: "job_id",
            rule: "must be a job id as `vaultctl import propose` printed it (p- and 12 hex digits)",
        })
    }
}

/// The hex SHA-256 of the file at `path`, read in pieces.
fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
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

/// A key's primary fingerprint, 40 upper-case hex digits (as `gpg --fingerprint`).
fn fingerprint_of(key: &pgp::composed::SignedPublicKey) -> String {
    use pgp::types::KeyDetails as _;
    hex::encode_upper(key.fingerprint().as_bytes())
}

/// The fingerprint of an armored sender key.
fn sender_fingerprint(armored: &str) -> Result<String, OpenError> {
    open::sender_key(armored).map(|key| fingerprint_of(&key))
}

fn job(p: keys_pb::Proposal) -> Job {
    let state = jobs::state_name(&p);
    // Approved once (it may be running, done or lapsed since: see `state`).
    let approved = !p.approved_by.is_empty();
    let job = p.job.unwrap_or_default();
    Job {
        id: p.id,
        tenant: job.tenant,
        expected_rows: job.expected_rows,
        proposed_by: p.proposed_by,
        approved_by: p.approved_by,
        approved,
        expires_at_unix_ms: p.expires_at_unix_ms,
        file_sha256: job.file_sha256,
        sender_key_fingerprint: job.sender_key_fingerprint,
        state,
        claimed_by: p.claimed_by,
        claim_by_unix_ms: p.claim_by_unix_ms,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ImportError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| worker_failed())
}

/// A job's task or blocking step panicked.
fn worker_failed() -> ImportError {
    ImportError::Spool(SpoolError::Io {
        path: "the import's worker".into(),
        source: std::io::Error::other("the task panicked"),
    })
}

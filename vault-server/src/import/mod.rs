//! Bulk import of another vault's or processor's OpenPGP-encrypted card export
//! (issue 21; docs/operations.md, "Moving cards in"). This module holds what does not
//! depend on the store: the import key (`key`), opening a spooled file (`open`), the
//! rows of its plaintext (`rows`) and the job's directory (`Spool`). The use case that
//! ties them to tokenization is `ops::import`.
//!
//! A job's directory, `<spool_dir>/<job id>/`, holds the file as uploaded (still
//! encrypted: `file.pgp`) and `state.json` (the job as approved, the format, how much
//! was received, whether the file passed its check). No plaintext is ever written.

pub mod buckets;
pub mod key;
pub mod open;
pub mod rows;
pub mod zip;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use key::{Algorithm, ImportKey};
pub use rows::{Fields, FileFormat};

/// What a vault keeps of a job between calls and restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub job_id: String,
    pub tenant: String,
    pub expected_rows: u64,
    pub proposed_by: String,
    pub approved_by: String,
    /// Bytes of the encrypted file received (the size of `file.pgp`).
    pub received_bytes: u64,
    /// Set with the last piece of the file.
    pub format: Option<FileFormat>,
    pub fields: Option<Fields>,
    /// The sender's armored OpenPGP public key, when the file must be signed by it.
    pub sender_key: Option<String>,
    /// The file passed its check (integrity, signature, header, row count).
    pub verified: bool,
    pub total_rows: u64,
    /// The highest row tokenized so far (the client's mapping file is the cursor that
    /// counts; a row tokenized twice returns its first token, see `ops::import`).
    pub rows_done: u64,
    /// Of the rows looked at (`rows_checked`), those whose card the tenant held already.
    pub rows_existing: u64,
    /// Rows whose card was looked up among the tenant's: every row of a small job, a
    /// random sixteenth of a large one's (see `ops::import`).
    #[serde(default)]
    pub rows_checked: u64,
    /// The highest row handed to tokenization, saved before it is: rows up to here
    /// may have tokens already (a crash between the commit and `rows_done`), and are
    /// looked up before being tokenized again (see `ops::import`).
    #[serde(default)]
    pub rows_started: u64,
    /// The job's end was recorded in the audit log (`ImportFinished`).
    #[serde(default)]
    pub end_recorded: bool,
    /// The hex SHA-256 of the encrypted file the job was approved for (empty in a job
    /// started by an older vault: its file is refused).
    #[serde(default)]
    pub file_sha256: String,
    /// The sender key fingerprint the job was approved for; empty: none may be given.
    #[serde(default)]
    pub sender_key_fingerprint: String,
    /// The keyservice has the job done (FinishJob).
    #[serde(default)]
    pub finished: bool,
}

/// Job directories under the spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the import spool ({path}) cannot be used: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the job's state file is unreadable")]
    Corrupt,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A job id as the keyservice makes them (`p-` and 12 hex digits): checked before it
/// names a directory.
pub fn valid_job_id(id: &str) -> bool {
    id.strip_prefix("p-")
        .is_some_and(|hex| hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Spool {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn file(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("file.pgp")
    }

    /// The job's state, `None` before its first upload.
    pub fn load(&self, id: &str) -> Result<Option<JobState>, SpoolError> {
        let path = self.job_dir(id).join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| SpoolError::Corrupt),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The job's directory, made if missing: the vault's alone (0700), whatever the
    /// umask, like everything in it (0600).
    fn make_job_dir(&self, id: &str) -> Result<PathBuf, SpoolError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = self.job_dir(id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(dir)
    }

    /// Writes the state durably (a new file renamed over the old one).
    pub fn save(&self, state: &JobState) -> Result<(), SpoolError> {
        let dir = self.make_job_dir(&state.job_id)?;
        let path = dir.join("state.json");
        let staged = dir.join("state.json.new");
        let bytes = serde_json::to_vec_pretty(state).map_err(|_| SpoolError::Corrupt)?;
        let mut file = private()
            .write(true)
            .truncate(true)
            .open(&staged)
            .map_err(io(&staged))?;
        file.write_all(&bytes).map_err(io(&staged))?;
        file.sync_all().map_err(io(&staged))?;
        std::fs::rename(&staged, &path).map_err(io(&path))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
    }

    /// Appends `data` at `offset` of the job's file, synced. An offset below the size
    /// (a piece sent again after a lost answer) writes nothing; the size is returned
    /// either way, and the caller refuses an offset above it.
    pub fn append(&self, id: &str, offset: u64, data: &[u8]) -> Result<u64, SpoolError> {
        self.make_job_dir(id)?;
        let path = self.file(id);
        let mut file = private().append(true).open(&path).map_err(io(&path))?;
        let size = file.metadata().map_err(io(&path))?.len();
        if offset != size || data.is_empty() {
            return Ok(size);
        }
        file.write_all(data).map_err(io(&path))?;
        file.sync_data().map_err(io(&path))?;
        Ok(size + data.len() as u64)
    }

    /// Removes the files of jobs whose end was recorded before `ended_before` (their
    /// state's last save): a finished job answers from its rows' entries only, which
    /// are kept no longer, and its file holds cards the import key still opens.
    /// Returns how many were removed.
    pub fn sweep(&self, ended_before: std::time::SystemTime) -> Result<usize, SpoolError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut removed = 0;
        for entry in entries {
            let name = entry.map_err(io(&self.dir))?.file_name();
            let Some(id) = name.to_str().filter(|id| valid_job_id(id)) else {
                continue;
            };
            let saved_at = std::fs::metadata(self.job_dir(id).join("state.json"))
                .and_then(|m| m.modified())
                .ok();
            let ended = matches!(self.load(id), Ok(Some(state)) if state.end_recorded);
            if ended && saved_at.is_some_and(|at| at < ended_before) && self.file(id).exists() {
                self.discard_file(id)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes the job's file (a file that failed its check: nothing of it is kept).
    pub fn discard_file(&self, id: &str) -> Result<(), SpoolError> {
        let path = self.file(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

/// Options that create a file only the vault may read (0600).
fn private() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).mode(0o600);
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_cannot_name_other_paths() {
        assert!(valid_job_id("p-0123456789ab"));
        for bad in [
            "p-../../etc",
            "p-0123456789abc",
            "x-0123456789ab",
            "p-0123456789a/",
        ] {
            assert!(!valid_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn appends_are_idempotent_and_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().to_path_buf());
        let id = "p-000000000001";
        assert_eq!(spool.append(id, 0, b"abc").unwrap(), 3);
        assert_eq!(spool.append(id, 0, b"abc").unwrap(), 3);
        assert_eq!(spool.append(id, 5, b"x").unwrap(), 3);
        assert_eq!(spool.append(id, 3, b"de").unwrap(), 5);
        assert_eq!(std::fs::read(spool.file(id)).unwrap(), b"abcde");
        let state = JobState {
            job_id: id.into(),
            tenant: "t".into(),
            expected_rows: 2,
            proposed_by: "a".into(),
            approved_by: "b".into(),
            received_bytes: 5,
            format: Some(FileFormat::Csv),
            fields: Some(Fields::stripe()),
            sender_key: None,
            verified: false,
            total_rows: 0,
            rows_done: 0,
            rows_existing: 0,
            rows_checked: 0,
            rows_started: 0,
            end_recorded: false,
            file_sha256: "ab".repeat(32),
            sender_key_fingerprint: String::new(),
            finished: false,
        };
        spool.save(&state).unwrap();
        assert_eq!(spool.load(id).unwrap(), Some(state));
        // The vault's alone, whatever the umask.
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spool.job_dir(id)), 0o700);
        assert_eq!(mode(&spool.file(id)), 0o600);
        assert_eq!(mode(&spool.job_dir(id).join("state.json")), 0o600);

        // The sweep removes the file of a job that ended before the time given only.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        assert_eq!(spool.sweep(later).unwrap(), 0, "not ended");
        let ended = JobState {
            end_recorded: true,
            ..spool.load(id).unwrap().unwrap()
        };
        spool.save(&ended).unwrap();
        let earlier = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        assert_eq!(spool.sweep(earlier).unwrap(), 0, "ended after");
        assert!(spool.file(id).exists());
        assert_eq!(spool.sweep(later).unwrap(), 1);
        assert!(!spool.file(id).exists());
        assert_eq!(spool.load(id).unwrap(), Some(ended), "the state stays");
        assert_eq!(spool.load("p-000000000002").unwrap(), None);
    }
}

//! The keyring: every version of every key purpose, sealed at rest under the root key.
//!
//! File format (when changing it, add a new format value and keep reading the old ones):
//!
//! ```text
//! "TVKR" | format: u8 | nonce: 12 bytes | AES-256-GCM(root key, aad = "TVKR" | format)
//! format 1 plaintext: count: u32 | count × (purpose: u8 | version: u32 | state: u8 |
//!            created_at_unix_ms: i64 | has_material: u8 | material: 32 bytes if has_material)
//! format 2 plaintext: count: u32 | count × (purpose: u8 | version: u32 | state: u8 |
//!            created_at_unix_ms: i64 | encryptions_leased: u64 |
//!            deactivated_at_unix_ms: i64 | has_material: u8 |
//!            material: 32 bytes if has_material) | proposals_len: u32 | proposals (JSON)
//! format 3 plaintext: generation: u64 | count: u32 | count × (purpose: u8 |
//!            version: u32 | state: u8 | created_at_unix_ms: i64 |
//!            encryptions_leased: u64 | deactivated_at_unix_ms: i64 |
//!            material_len: u16 (0: destroyed) | material) | proposals_len: u32 |
//!            proposals (JSON) | history_key_len: u16 | history_key
//! ```
//! The history key chains the key history's lines (see `history`); it lives here so
//! that it survives root key changes, and never leaves the keyservice.
//! The generation grows by one with every save and never moves back: vaults remember
//! the highest they accepted, so a keyring restored from an older copy is caught
//! (see `service::serving`). Material has a length so that later purposes may hold
//! keys of other sizes.
//! All integers big-endian. The plaintext only ever exists in zeroizing buffers. The
//! proposals (dual control) hold no secrets; they are sealed with the rest so that
//! nobody can forge an approval by editing a file.

use std::path::Path;

use envelope::{KEY_LEN, NONCE_LEN, SecretKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

const MAGIC: &[u8; 4] = b"TVKR";
const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const FORMAT_V3: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Purpose {
    CardData,
    Fingerprint,
    Cvc,
    /// HMAC key chaining the vault's audit log.
    Audit,
    /// The `ikm` of an HPKE X25519 key pair that customers' devices seal cards to
    /// (sealed intake, envelope::sealed).
    Intake,
    /// The seed of an OpenPGP key pair other vaults and processors encrypt card
    /// exports to, for bulk import (vault-server `import::key` derives the key).
    Import,
    /// The same for an OpenPGP RSA 4096 key pair, for senders whose tools cannot
    /// encrypt to Curve25519 (vault-server `import::key`).
    ImportRsa,
}

impl Purpose {
    pub const ALL: [Purpose; 7] = [
        Purpose::CardData,
        Purpose::Fingerprint,
        Purpose::Cvc,
        Purpose::Audit,
        Purpose::Intake,
        Purpose::Import,
        Purpose::ImportRsa,
    ];

    fn code(self) -> u8 {
        match self {
            Purpose::CardData => 1,
            Purpose::Fingerprint => 2,
            Purpose::Cvc => 3,
            Purpose::Audit => 4,
            Purpose::Intake => 5,
            Purpose::Import => 6,
            Purpose::ImportRsa => 7,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.code() == code)
    }

    /// AES-GCM purposes have an encryption budget per version (NIST SP 800-38D, 8.3);
    /// HMAC has none.
    pub fn is_aead(self) -> bool {
        matches!(self, Purpose::CardData | Purpose::Cvc)
    }

    pub fn name(self) -> &'static str {
        match self {
            Purpose::CardData => "card-data",
            Purpose::Fingerprint => "fingerprint",
            Purpose::Cvc => "cvc",
            Purpose::Audit => "audit",
            Purpose::Intake => "intake",
            Purpose::Import => "import",
            Purpose::ImportRsa => "import-rsa",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    DecryptOnly,
    Retired,
    Destroyed,
}

impl State {
    fn code(self) -> u8 {
        match self {
            State::Active => 1,
            State::DecryptOnly => 2,
            State::Retired => 3,
            State::Destroyed => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        [
            State::Active,
            State::DecryptOnly,
            State::Retired,
            State::Destroyed,
        ]
        .into_iter()
        .find(|s| s.code() == code)
    }
}

/// One version of one purpose. `material` is `None` once destroyed.
#[derive(Debug)]
pub struct KeyVersion {
    pub purpose: Purpose,
    pub version: u32,
    pub state: State,
    pub created_at_unix_ms: i64,
    /// Encryptions leased to vaults under this version, recorded before each lease is
    /// handed out: an upper bound of the encryptions made.
    pub encryptions_leased: u64,
    /// When the version stopped being active (0 while active): records encrypted under
    /// it may still be arriving for a while after.
    pub deactivated_at_unix_ms: i64,
    pub material: Option<SecretKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperationKind {
    Destroy,
    Unretire,
    RootKeyChange,
    AuditGap,
    Retire,
    AcceptRestore,
    /// A tenant's bulk import (issue 21): proposed and approved through a vault by two
    /// identities holding its `import` permission; the vault runs it once approved.
    Import,
    /// A tenant's cards exported to a processor's OpenPGP key (issue 21), under the
    /// `export` permission, like an import.
    Export,
}

impl OperationKind {
    /// Jobs a vault runs for a tenant: proposed and approved through a vault (the
    /// vault's policy says who may), never carried out by the keyservice itself.
    pub fn is_tenant_job(self) -> bool {
        matches!(self, OperationKind::Import | OperationKind::Export)
    }
}

/// What a tenant job (import, and later export) names: the vault identity that relayed
/// the proposal, the tenant, and the rows the proposer expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantJob {
    pub vault_identity: String,
    pub tenant: String,
    pub expected_rows: u64,
    /// Export: the processor the cards go to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub processor: String,
    /// Export: which tokens: "all", or "sha256:<hex>" of the sorted token list.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selection: String,
    /// Import: the hex SHA-256 of the encrypted file the job takes (required since
    /// finding HIGH #2; empty only in a job proposed before, which cannot be claimed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file_sha256: String,
    /// Import: the sender's signing key fingerprint (upper-case hex), if the file
    /// must be signed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sender_key_fingerprint: String,
    /// The vault identity that claimed the job (APPROVED -> RUNNING), and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub claimed_at_unix_ms: i64,
    /// An approved job not claimed by then cannot be claimed; 0 in a job approved
    /// before claims existed (the approval window after approval then applies).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub claim_by_unix_ms: i64,
    /// When the claiming vault finished the job (RUNNING -> DONE).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub finished_at_unix_ms: i64,
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// The gap an audit-gap proposal acknowledges: entries `first..=last` missing from the
/// audit log of the vault `identity` at `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditGapTarget {
    pub identity: String,
    pub node: String,
    pub first: u64,
    pub last: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProposalState {
    Pending,
    Approved,
    /// Tenant jobs: claimed by a vault (`TenantJob::claimed_by`), in progress.
    Running,
    /// Tenant jobs: finished; the approval is used up.
    Done,
}

/// A dual-control proposal. Sealed inside the keyring with everything else, so its
/// type lives here with the file format; the rules that create and approve proposals
/// are in `lifecycle`, which depends on this module and never the reverse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: String,
    pub kind: OperationKind,
    /// Destroy, retire and un-retire: the version (purpose name and number).
    pub purpose: Option<String>,
    pub version: u32,
    /// Root key change: the new root key file on this host.
    pub new_root_key_file: Option<String>,
    pub proposed_by: String,
    pub proposed_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
    pub state: ProposalState,
    pub approved_by: Option<String>,
    pub approved_at_unix_ms: i64,
    /// Audit gap: the vault and the gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_gap: Option<AuditGapTarget>,
    /// Retire: proposed to go ahead although records use the version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Retire: the records using the version when it was proposed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub records: u64,
    /// Tenant jobs (import): the tenant and expected rows. `proposed_by` and
    /// `approved_by` are then the identities the vault vouched for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<TenantJob>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Proposal {
    pub fn purpose(&self) -> Option<Purpose> {
        Purpose::ALL
            .into_iter()
            .find(|p| Some(p.name()) == self.purpose.as_deref())
    }

    pub fn expired(&self, now_unix_ms: i64) -> bool {
        self.state == ProposalState::Pending && now_unix_ms >= self.expires_at_unix_ms
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring file {path} already exists; refusing to overwrite it")]
    Exists { path: String },
    #[error("cannot read or write keyring file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("keyring cannot be opened: wrong root key, or the file was altered")]
    Integrity,
    #[error("keyring file is not a keyring or is truncated")]
    Malformed,
    #[error("keyring file has format version {0}, which this build does not know")]
    UnknownFormat(u8),
    #[error("the system random number generator failed")]
    Random,
    #[error("the root key file must hold exactly 64 hex characters (a 256-bit key)")]
    RootKeyFormat,
    #[error(transparent)]
    RootKeyFile(#[from] runtime::secret_file::SecretFileError),
}

/// The root key (key-encrypting key) that seals the keyring.
#[derive(Debug)]
pub struct RootKey(SecretKey);

impl RootKey {
    /// Reads a root key file: 64 hex characters, mode 0600 (else refused, saying why).
    pub fn from_file(path: &Path) -> Result<Self, KeyringError> {
        let text = runtime::secret_file::read_owner_only(path)?;
        let trimmed = text.trim_ascii();
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(trimmed, bytes.as_mut_slice())
            .map_err(|_| KeyringError::RootKeyFormat)?;
        Ok(Self(
            SecretKey::from_slice(bytes.as_slice()).map_err(|_| KeyringError::RootKeyFormat)?,
        ))
    }

    /// Creates a new random root key file, mode 0600, refusing to overwrite.
    pub fn generate_file(path: &Path) -> Result<(), KeyringError> {
        let key = SecretKey::generate().map_err(|_| KeyringError::Random)?;
        let mut text = Zeroizing::new(hex::encode(key.expose_secret()).into_bytes());
        text.push(b'\n');
        runtime::secret_file::create_owner_only(path, &text).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyringError::Exists {
                    path: path.display().to_string(),
                }
            } else {
                KeyringError::Io {
                    path: path.display().to_string(),
                    source,
                }
            }
        })
    }
}

#[derive(Debug, Default)]
pub struct Keyring {
    /// Grows with every save (see the file format above).
    pub(crate) generation: u64,
    /// Chains the key history; `None` only in a keyring from before it (added at the
    /// next start, see `add_missing`).
    history_key: Option<SecretKey>,
    pub(crate) versions: Vec<KeyVersion>,
    /// Dual-control proposals, open and recent.
    pub(crate) proposals: Vec<Proposal>,
}

impl Keyring {
    /// A new keyring with version 1 of every purpose, active.
    pub fn generate(now_unix_ms: i64) -> Result<Self, KeyringError> {
        let versions = Purpose::ALL
            .into_iter()
            .map(|purpose| {
                Ok(KeyVersion {
                    purpose,
                    version: 1,
                    state: State::Active,
                    created_at_unix_ms: now_unix_ms,
                    encryptions_leased: 0,
                    deactivated_at_unix_ms: 0,
                    material: Some(SecretKey::generate().map_err(|_| KeyringError::Random)?),
                })
            })
            .collect::<Result<_, KeyringError>>()?;
        Ok(Self {
            generation: 0,
            history_key: Some(SecretKey::generate().map_err(|_| KeyringError::Random)?),
            versions,
            proposals: Vec::new(),
        })
    }

    pub fn versions(&self) -> &[KeyVersion] {
        &self.versions
    }

    /// The key that chains the key history.
    pub fn history_key(&self) -> Option<SecretKey> {
        let key = self.history_key.as_ref()?;
        SecretKey::from_slice(key.expose_secret()).ok()
    }

    /// Adds what a keyring made by an older keyservice lacks: version 1 of a purpose
    /// that did not exist then, the history key. Returns whether it added anything; the
    /// caller saves the keyring.
    pub fn add_missing(&mut self, now_unix_ms: i64) -> Result<bool, KeyringError> {
        let mut added = false;
        if self.history_key.is_none() {
            self.history_key = Some(SecretKey::generate().map_err(|_| KeyringError::Random)?);
            added = true;
        }
        for purpose in Purpose::ALL {
            if self.versions.iter().any(|v| v.purpose == purpose) {
                continue;
            }
            self.versions.push(KeyVersion {
                purpose,
                version: 1,
                state: State::Active,
                created_at_unix_ms: now_unix_ms,
                encryptions_leased: 0,
                deactivated_at_unix_ms: 0,
                material: Some(SecretKey::generate().map_err(|_| KeyringError::Random)?),
            });
            added = true;
        }
        Ok(added)
    }

    fn aad(format: u8) -> [u8; 5] {
        [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], format]
    }

    /// Encrypts the keyring under the root key.
    pub fn seal(&self, root: &RootKey) -> Result<Vec<u8>, KeyringError> {
        let mut plain = Zeroizing::new(Vec::with_capacity(16 + self.versions.len() * 64));
        plain.extend_from_slice(&self.generation.to_be_bytes());
        plain.extend_from_slice(&(self.versions.len() as u32).to_be_bytes());
        for v in &self.versions {
            plain.push(v.purpose.code());
            plain.extend_from_slice(&v.version.to_be_bytes());
            plain.push(v.state.code());
            plain.extend_from_slice(&v.created_at_unix_ms.to_be_bytes());
            plain.extend_from_slice(&v.encryptions_leased.to_be_bytes());
            plain.extend_from_slice(&v.deactivated_at_unix_ms.to_be_bytes());
            match &v.material {
                Some(key) => {
                    let material = key.expose_secret();
                    plain.extend_from_slice(&(material.len() as u16).to_be_bytes());
                    plain.extend_from_slice(material);
                }
                None => plain.extend_from_slice(&0u16.to_be_bytes()),
            }
        }
        let proposals = serde_json::to_vec(&self.proposals).map_err(|_| KeyringError::Malformed)?;
        plain.extend_from_slice(&(proposals.len() as u32).to_be_bytes());
        plain.extend_from_slice(&proposals);
        let history_key = self
            .history_key
            .as_ref()
            .map_or(&[][..], |key| key.expose_secret());
        plain.extend_from_slice(&(history_key.len() as u16).to_be_bytes());
        plain.extend_from_slice(history_key);
        let aad = Self::aad(FORMAT_V3);
        let sealed = envelope::seal(&root.0, &aad, &plain).map_err(|_| KeyringError::Random)?;
        let mut out = Vec::with_capacity(5 + NONCE_LEN + sealed.ciphertext.len());
        out.extend_from_slice(&aad);
        out.extend_from_slice(&sealed.nonce);
        out.extend_from_slice(&sealed.ciphertext);
        Ok(out)
    }

    /// Decrypts and parses a sealed keyring.
    pub fn open(bytes: &[u8], root: &RootKey) -> Result<Self, KeyringError> {
        if bytes.len() < 5 + NONCE_LEN || &bytes[..4] != MAGIC {
            return Err(KeyringError::Malformed);
        }
        let format = bytes[4];
        if !matches!(format, FORMAT_V1 | FORMAT_V2 | FORMAT_V3) {
            return Err(KeyringError::UnknownFormat(format));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[5..5 + NONCE_LEN]);
        let plain = envelope::open(&root.0, &nonce, &Self::aad(format), &bytes[5 + NONCE_LEN..])
            .map_err(|_| KeyringError::Integrity)?;
        Self::decode(&plain, format).ok_or(KeyringError::Malformed)
    }

    fn decode(mut input: &[u8], format: u8) -> Option<Self> {
        fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, tail) = input.split_at_checked(n)?;
            *input = tail;
            Some(head)
        }
        let generation = if format >= FORMAT_V3 {
            u64::from_be_bytes(take(&mut input, 8)?.try_into().ok()?)
        } else {
            0
        };
        let count = u32::from_be_bytes(take(&mut input, 4)?.try_into().ok()?);
        let mut versions = Vec::new();
        for _ in 0..count {
            let purpose = Purpose::from_code(take(&mut input, 1)?[0])?;
            let version = u32::from_be_bytes(take(&mut input, 4)?.try_into().ok()?);
            let state = State::from_code(take(&mut input, 1)?[0])?;
            let created_at_unix_ms = i64::from_be_bytes(take(&mut input, 8)?.try_into().ok()?);
            let (encryptions_leased, deactivated_at_unix_ms) = if format >= FORMAT_V2 {
                (
                    u64::from_be_bytes(take(&mut input, 8)?.try_into().ok()?),
                    i64::from_be_bytes(take(&mut input, 8)?.try_into().ok()?),
                )
            } else {
                (0, 0)
            };
            let material = if format >= FORMAT_V3 {
                match u16::from_be_bytes(take(&mut input, 2)?.try_into().ok()?) as usize {
                    0 => None,
                    len => Some(SecretKey::from_slice(take(&mut input, len)?).ok()?),
                }
            } else {
                match take(&mut input, 1)?[0] {
                    0 => None,
                    1 => Some(SecretKey::from_slice(take(&mut input, KEY_LEN)?).ok()?),
                    _ => return None,
                }
            };
            versions.push(KeyVersion {
                purpose,
                version,
                state,
                created_at_unix_ms,
                encryptions_leased,
                deactivated_at_unix_ms,
                material,
            });
        }
        let proposals = if format >= FORMAT_V2 {
            let len = u32::from_be_bytes(take(&mut input, 4)?.try_into().ok()?) as usize;
            serde_json::from_slice(take(&mut input, len)?).ok()?
        } else {
            Vec::new()
        };
        let history_key = if format >= FORMAT_V3 {
            match u16::from_be_bytes(take(&mut input, 2)?.try_into().ok()?) as usize {
                0 => None,
                len => Some(SecretKey::from_slice(take(&mut input, len)?).ok()?),
            }
        } else {
            None
        };
        input.is_empty().then_some(Self {
            generation,
            history_key,
            versions,
            proposals,
        })
    }

    /// Reads and opens the keyring file.
    pub fn load(path: &Path, root: &RootKey) -> Result<Self, KeyringError> {
        let bytes = std::fs::read(path).map_err(|source| KeyringError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::open(&bytes, root)
    }

    /// Writes a new keyring file durably. Refuses to replace an existing keyring.
    pub fn create_file(&mut self, path: &Path, root: &RootKey) -> Result<(), KeyringError> {
        if path.exists() {
            return Err(KeyringError::Exists {
                path: path.display().to_string(),
            });
        }
        self.save(path, root)
    }

    /// Replaces the keyring file atomically and durably: temporary file, fsync, rename,
    /// fsync of the directory. A crash at any moment leaves the old or the new keyring.
    /// Every save is the next generation; `generation` moves on only once the save is
    /// durable, so that what is served never runs ahead of the file (a number a failed
    /// save used was never served, and may be used again).
    pub fn save(&mut self, path: &Path, root: &RootKey) -> Result<(), KeyringError> {
        let generation = self.generation;
        self.generation = generation.checked_add(1).ok_or(KeyringError::Malformed)?;
        let saved = self
            .seal(root)
            .and_then(|sealed| replace_owner_only(path, &sealed));
        if saved.is_err() {
            self.generation = generation;
        }
        saved
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Replaces `path` with `contents` (mode 0600) atomically and durably.
pub(crate) fn replace_owner_only(path: &Path, contents: &[u8]) -> Result<(), KeyringError> {
    let io = |source| KeyringError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    runtime::secret_file::create_owner_only(&tmp, contents).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_parent(path).map_err(io)
}

pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

impl RootKey {
    /// Writes this key to a new file (mode 0600); used to stage a root key change.
    pub(crate) fn write_file(&self, path: &Path) -> Result<(), KeyringError> {
        let mut text = Zeroizing::new(hex::encode(self.0.expose_secret()).into_bytes());
        text.push(b'\n');
        replace_owner_only(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(dir: &Path) -> RootKey {
        let path = dir.join("root.key");
        RootKey::generate_file(&path).unwrap();
        RootKey::from_file(&path).unwrap()
    }

    /// Proposals as a keyservice before claims wrote them (no file digest, no claim
    /// fields) still load: an approved job is approved, its deadline unset.
    #[test]
    fn proposals_saved_before_claims_existed_still_load() {
        let old = r#"[{"id":"p-0123456789ab","kind":"import","purpose":null,"version":0,
            "new_root_key_file":null,"proposed_by":"uri:a","proposed_at_unix_ms":1,
            "expires_at_unix_ms":2,"state":"approved","approved_by":"uri:b",
            "approved_at_unix_ms":2,"job":{"vault_identity":"uri:v","tenant":"acme",
            "expected_rows":3}}]"#;
        let proposals: Vec<Proposal> = serde_json::from_str(old).unwrap();
        assert_eq!(proposals[0].state, ProposalState::Approved);
        let job = proposals[0].job.as_ref().unwrap();
        assert_eq!(
            (job.file_sha256.as_str(), job.claimed_by.as_deref()),
            ("", None)
        );
        assert_eq!(job.claim_by_unix_ms, 0);
    }

    /// Control: PCI-3.6.1, PCI-3.7.3 (docs/compliance.md).
    /// Attack: read key material from the keyring file on disk; no key's bytes are in it.
    #[test]
    fn sealed_keyring_round_trips_and_hides_material() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        let mut keyring = Keyring::generate(1_700_000_000_000).unwrap();
        let path = dir.path().join("keyring.sealed");
        keyring.create_file(&path, &root).unwrap();

        let on_disk = std::fs::read(&path).unwrap();
        for v in keyring.versions() {
            let material = v.material.as_ref().unwrap().expose_secret();
            assert!(!on_disk.windows(KEY_LEN).any(|w| w == material));
        }
        let mut loaded = Keyring::load(&path, &root).unwrap();
        assert_eq!(loaded.versions().len(), Purpose::ALL.len());
        // Every save is the next generation, and it is sealed with the rest.
        assert_eq!((keyring.generation(), loaded.generation()), (1, 1));
        loaded.save(&path, &root).unwrap();
        assert_eq!(Keyring::load(&path, &root).unwrap().generation(), 2);
        for (a, b) in keyring.versions().iter().zip(loaded.versions()) {
            assert_eq!(
                (a.purpose, a.version, a.state),
                (b.purpose, b.version, b.state)
            );
            assert_eq!(
                a.material.as_ref().unwrap().expose_secret(),
                b.material.as_ref().unwrap().expose_secret()
            );
        }
        assert!(matches!(
            keyring.create_file(&path, &root),
            Err(KeyringError::Exists { .. })
        ));
    }

    /// Control: PCI-3.6.1.2, PCI-3.7.7 (docs/compliance.md).
    /// Attack: open the keyring with another root key, or edit or substitute the file; both
    /// fail integrity.
    #[test]
    fn wrong_root_key_or_edit_is_an_integrity_error() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = Keyring::generate(0)
            .unwrap()
            .seal(&root(dir.path()))
            .unwrap();
        let other = tempfile::tempdir().unwrap();
        assert!(matches!(
            Keyring::open(&sealed, &root(other.path())),
            Err(KeyringError::Integrity)
        ));
        let root = RootKey::from_file(&dir.path().join("root.key")).unwrap();
        let mut edited = sealed.clone();
        let last = edited.len() - 1;
        edited[last] ^= 1;
        assert!(matches!(
            Keyring::open(&edited, &root),
            Err(KeyringError::Integrity)
        ));
        assert!(matches!(
            Keyring::open(&sealed[..10], &root),
            Err(KeyringError::Malformed)
        ));
    }

    /// Control: PCI-3.6.1.2 (docs/compliance.md).
    /// Attack: start the keyservice with a malformed, short or long root key (not hex;
    /// 62 or 66 hex digits, a key one byte short or long); refused. Exactly 64 hex
    /// digits (256 bits) are accepted.
    #[test]
    fn root_key_file_must_be_hex() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("not-hex", "not hex".to_owned()),
            ("62", "ab".repeat(31)),
            ("66", "ab".repeat(33)),
            ("63", format!("{}a", "ab".repeat(31))),
        ] {
            let path = dir.path().join(name);
            runtime::secret_file::create_owner_only(&path, content.as_bytes()).unwrap();
            assert!(
                matches!(RootKey::from_file(&path), Err(KeyringError::RootKeyFormat)),
                "{name}"
            );
        }
        let path = dir.path().join("64");
        runtime::secret_file::create_owner_only(&path, "ab".repeat(32).as_bytes()).unwrap();
        RootKey::from_file(&path).unwrap();
    }
}

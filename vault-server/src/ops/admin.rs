//! Operating the vault: backups, the policy in force, the rewrap job, and lockout
//! blocks. None of it sees card data in clear except a backup's verification, which
//! opens each record and drops the card at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use runtime::now_unix_ms;

use super::erasures;
use super::records::Records;
use crate::audit::AuditEvent;
use crate::card::Violation;
use crate::error::VaultError;
use crate::keys::KeySet;
use crate::lockout::{Block, Kind, Lockout};
use crate::policy::{Policy, SharedPolicy};
use crate::record;
use crate::rewrap::{self, Rewrapper};
use crate::store::{Store, StoreError};
use crate::token::Token;

#[derive(Debug)]
pub struct AdminSettings {
    /// Where backups go; `None` refuses backups.
    pub backup_dir: Option<PathBuf>,
    /// Re-read by `ReloadPolicy` and SIGHUP.
    pub policy_file: PathBuf,
}

#[derive(Debug)]
pub struct Admin<S> {
    records: Arc<Records<S>>,
    rewrap: Arc<Rewrapper<S>>,
    /// Shared with the calls' authorization, which reads it.
    policy: Arc<SharedPolicy>,
    /// Shared with the calls' envelope, which counts failures into it.
    lockout: Arc<Lockout>,
    reload_lock: tokio::sync::Mutex<()>,
    settings: AdminSettings,
}

/// A backup written.
#[derive(Debug)]
pub struct Backup {
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// What a backup's verification found: records read, and how many opened.
#[derive(Debug, Default)]
pub struct BackupCheck {
    pub records: u64,
    pub verified: u64,
    pub failed: u64,
    /// Records erased since: a restore erases them again.
    pub erased: u64,
}

impl<S: Store> Admin<S> {
    pub fn new(
        records: Arc<Records<S>>,
        rewrap: Arc<Rewrapper<S>>,
        policy: Arc<SharedPolicy>,
        lockout: Arc<Lockout>,
        settings: AdminSettings,
    ) -> Self {
        Self {
            records,
            rewrap,
            policy,
            lockout,
            reload_lock: tokio::sync::Mutex::new(()),
            settings,
        }
    }

    pub fn rewrap(&self) -> &Arc<Rewrapper<S>> {
        &self.rewrap
    }

    /// `<backup_dir>/<name>`, the name checked so it cannot leave the directory.
    fn backup_path(&self, name: &str) -> Result<PathBuf, VaultError> {
        let dir = self
            .settings
            .backup_dir
            .as_ref()
            .ok_or(VaultError::BackupsDisabled)?;
        let valid = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(VaultError::Invalid(Violation {
                field: "name",
                rule: "format",
                description: "must be 1 to 128 of [A-Za-z0-9._-], not starting with '.'",
            }));
        }
        Ok(dir.join(name))
    }

    pub async fn create_backup(&self, name: &str) -> Result<Backup, VaultError> {
        let path = self.backup_path(name)?;
        if path.exists() {
            return Err(VaultError::Invalid(Violation {
                field: "name",
                rule: "exists",
                description: "a backup with this name exists already",
            }));
        }
        let size_bytes = self.records.store().create_backup(&path).await?;
        tracing::info!(path = %path.display(), size_bytes, "backup created");
        Ok(Backup { path, size_bytes })
    }

    /// Opens every record of a backup with the keys held now.
    pub async fn verify_backup(&self, name: &str) -> Result<BackupCheck, VaultError> {
        let path = self.backup_path(name)?;
        if !path.is_dir() {
            return Err(VaultError::BackupNotFound);
        }
        let store_id = erasures::store_id(self.records.store().as_ref()).await?;
        let erasures = erasures::all(self.records.keys(), &store_id).await?;
        let keys = self.records.keys().snapshot();
        let counts = tokio::task::spawn_blocking(move || {
            let mut counts = BackupCheck::default();
            S::scan_backup(&path, &mut |token, value| {
                counts.records += 1;
                if verify_record(&keys, token, value) {
                    counts.verified += 1;
                } else {
                    counts.failed += 1;
                }
                if erasures.holds(&keys, token, value) {
                    counts.erased += 1;
                }
            })
            .map(|()| counts)
        })
        .await
        .map_err(|e| VaultError::Store(StoreError::Engine(e.to_string())))??;
        tracing::info!(
            records = counts.records,
            failed = counts.failed,
            erased = counts.erased,
            "backup verified"
        );
        Ok(counts)
    }

    pub async fn start_rewrap(&self) -> Result<rewrap::Status, VaultError> {
        self.rewrap.start().await
    }

    /// Re-reads the policy file; an invalid file leaves the policy in force. Audited.
    pub async fn reload_policy(&self, actor: &str) -> Result<usize, VaultError> {
        // One reload at a time, so that the file read last is the policy in force.
        let _one_at_a_time = self.reload_lock.lock().await;
        let loaded = Policy::load(&self.settings.policy_file);
        let mut event = AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: actor.to_owned(),
            peer: "-".into(),
            action: "PolicyReload".into(),
            ..AuditEvent::default()
        };
        let journal = self.records.journal();
        match loaded {
            Ok(policy) => {
                let identities = policy.len();
                event.outcome = "ok".into();
                event.detail = format!("{identities} identities");
                // Audited before it takes effect: no unrecorded policy is ever in force.
                journal.audit(event).await?;
                self.policy.replace(policy);
                tracing::info!(identities, "policy reloaded");
                Ok(identities)
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
                event.outcome = "FAILED_PRECONDITION".into();
                event.detail = e.to_string();
                journal.audit(event).await?;
                Err(VaultError::PolicyInvalid(e.to_string()))
            }
        }
    }

    /// The blocks in force, with when each ends, then the guessing flags (which end
    /// only when lifted: 0).
    pub fn blocks(&self) -> Vec<(Block, i64)> {
        let now = now_unix_ms();
        let flagged_after = self.records.guessing().settings().max_cards_per_bucket + 1;
        self.lockout
            .list(Instant::now())
            .into_iter()
            .map(|block| {
                let until = now + block.remaining.as_millis() as i64;
                (block, until)
            })
            .chain(self.records.guessing_flags().into_iter().map(|subject| {
                let flag = Block {
                    kind: Kind::Guessing,
                    subject,
                    remaining: std::time::Duration::ZERO,
                    failures: flagged_after,
                };
                (flag, 0)
            }))
            .collect()
    }

    pub async fn lift_block(&self, kind: Kind, subject: &str) -> Result<(), VaultError> {
        let lifted = match kind {
            Kind::Guessing => self.records.lift_guessing_flag(subject).await?,
            Kind::Identity | Kind::Address => self.lockout.lift(kind, subject, Instant::now()),
        };
        if !lifted {
            return Err(VaultError::NoSuchBlock);
        }
        tracing::info!(kind = kind.name(), subject = %subject, "block lifted");
        Ok(())
    }
}

/// Decodes and authenticates one stored record (then drops the card).
fn verify_record(keys: &KeySet, token: &[u8], value: &[u8]) -> bool {
    let Some(token) = Token::from_stored(token) else {
        return false;
    };
    let Ok(record) = record::decode(value) else {
        return false;
    };
    keys.card_data
        .get(record.metadata.key_version)
        .is_some_and(|key| record.open(&token, key).is_ok())
}

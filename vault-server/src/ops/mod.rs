//! The vault's use cases, one file per RPC family, in domain types only: nothing here
//! names a gRPC message (the `api` module converts). Each part owns its state and is
//! built from its own settings by the composition root (`lib.rs`).
//!
//! - `records`: reading, opening, deleting and purging a tenant's records;
//! - `tokenize`: Tokenize and TokenizeBatch (on `Records`);
//! - `sealed`: GetSealingKey, TokenizeSealed and its batch (on `Records`);
//! - `forward`: Forward, the one path on which a card leaves the vault;
//! - `admin`: backups, policy reload, rewrap, lockout blocks;
//! - `audit_log`: reading and verifying the audit log;
//! - `health`: degraded reasons and `/metrics`;
//! - `import`: import jobs (an encrypted card file, under dual control);
//! - `export`: export jobs (a tenant's cards to a processor's key, under dual control);
//! - `journal`: where all of them record what they did.

mod admin;
mod audit_log;
pub mod erasures;
mod export;
mod forward;
pub mod guessing;
mod health;
mod import;
mod jobs;
mod journal;
mod records;
mod sealed;
mod tokenize;

use std::sync::Arc;

pub use admin::{Admin, AdminSettings, Backup, BackupCheck};
pub use audit_log::{AuditLog, AuditPage, AuditQuery, AuditReport};
pub use export::{ExportError, ExportJob, Exported, Exporter, export_targets};
pub use forward::{ForwardRequest, ForwardSettings, Forwarded, Forwarder};
pub use import::{
    FileSpec, ImportError, ImportSettings, ImportedRow, Importer, Job, RowOutcome, RowsDone,
};
pub use journal::Journal;
pub use records::{RecordSettings, Records};
pub use sealed::{SealingKey, TokenizeSealed};
#[cfg(test)]
pub(crate) use tokenize::CARD_ATTEMPTS;
pub use tokenize::{BatchItem, Tokenize, TokenizeBatch, Tokenized};

/// Every use case of one vault.
#[derive(Debug)]
pub struct Vault<S> {
    pub records: Arc<Records<S>>,
    pub forwarder: Forwarder<S>,
    pub admin: Admin<S>,
    pub audit_log: AuditLog<S>,
    /// Import jobs (`import`).
    pub importer: Importer<S>,
    /// Export jobs (`export`).
    pub exporter: Exporter<S>,
    /// Free space under which the vault reports itself degraded.
    pub low_disk_bytes: u64,
}

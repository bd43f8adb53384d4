//! Backups: an online checkpoint of the data database, and reading the records of one.

use std::path::Path;

use rocksdb::{DB, Options};

use super::{RECORDS, RocksStore, engine};
use crate::store::StoreError;

impl RocksStore {
    /// See `Store::create_backup`.
    pub(super) async fn checkpoint(&self, dir: &Path) -> Result<u64, StoreError> {
        let db = self.db()?;
        let dir = dir.to_owned();
        // A checkpoint hard-links the immutable SST files and copies the rest after a
        // flush: consistent, online, and cheap on the same filesystem.
        tokio::task::spawn_blocking(move || {
            if let Some(parent) = dir.parent() {
                let mut builder = std::fs::DirBuilder::new();
                builder.recursive(true);
                #[cfg(unix)]
                std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
                builder.create(parent).map_err(|e| {
                    StoreError::Engine(format!("cannot create backup directory: {e}"))
                })?;
            }
            rocksdb::checkpoint::Checkpoint::new(&db)
                .and_then(|checkpoint| checkpoint.create_checkpoint(&dir))
                .map_err(engine)?;
            let mut size = 0;
            for entry in std::fs::read_dir(&dir).map_err(|e| StoreError::Engine(e.to_string()))? {
                let metadata = entry
                    .and_then(|e| e.metadata())
                    .map_err(|e| StoreError::Engine(e.to_string()))?;
                size += metadata.len();
            }
            Ok(size)
        })
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
    }
}

/// Calls `visit(token, record bytes)` for every record of a backup (or any stopped
/// data directory), opened read-only. Blocking.
pub fn scan_records(dir: &Path, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), StoreError> {
    let families = DB::list_cf(&Options::default(), dir).map_err(engine)?;
    let db =
        DB::open_cf_for_read_only(&Options::default(), dir, families, false).map_err(engine)?;
    let cf = db
        .cf_handle(RECORDS)
        .ok_or_else(|| StoreError::Engine("no records column family".into()))?;
    for entry in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
        let (token, value) = entry.map_err(engine)?;
        visit(&token, &value);
    }
    Ok(())
}

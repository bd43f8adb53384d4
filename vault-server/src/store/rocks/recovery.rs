//! Recovery from a full or read-only disk: the writer reopens the database once the
//! filesystem is writable again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, DB};

use super::counts::load_counts;
use super::options::{family_options, open_data};
use super::writer::Writer;
use super::{FAMILIES, free_bytes};

/// Free space a filesystem must have before a store refused by a full disk reopens.
const RECOVERY_FREE_BYTES: u64 = 32 * 1024 * 1024;
/// How often a refused store looks at the filesystem again (at a write).
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

impl Writer {
    /// Reopens the database once its filesystem is writable with room to spare (looked
    /// at most once per `RECOVERY_INTERVAL`). Readers wait out the reopen: the database
    /// is closed only once no reader holds it, and a reader that comes meanwhile is told
    /// to retry (UNAVAILABLE).
    pub(super) fn recover(mut self) -> Self {
        if self
            .last_recovery
            .is_some_and(|at| at.elapsed() < RECOVERY_INTERVAL)
        {
            return self;
        }
        self.last_recovery = Some(Instant::now());
        let read_only = nix::sys::statvfs::statvfs(&self.dir).map_or(true, |fs| {
            fs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
        });
        if read_only || free_bytes(&self.dir) < RECOVERY_FREE_BYTES {
            return self;
        }
        let taken = self
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(taken);
        // Readers finish with their copies within a read; a long scan (a backup, a
        // compaction) is waited for a while, then the reopen is tried later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.db) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if Arc::strong_count(&self.db) > 1 {
            self.put_back();
            return self;
        }
        let Writer {
            db,
            counts,
            slot,
            dir,
            cache,
            refused_since,
            last_recovery,
            log_end: _,
        } = self;
        // The old handle closes here, releasing the directory's lock. The filesystem
        // was writable a moment ago, so opening again fails only if it broke anew: the
        // writer keeps trying (writes wait, reads are told to retry) and says why.
        drop(db);
        // If it cannot be opened for writing (opening may need room to flush what the
        // log holds), it is opened read-only so that reads go on; writes keep being
        // refused and the next write tries again.
        let (db, refused_since) = loop {
            match open_data(&dir, &cache).and_then(|db| Ok((load_counts(&db)?, db))) {
                Ok((stored, db)) => {
                    *counts
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = stored;
                    tracing::warn!(
                        refused_for_secs = refused_since.map_or(0, |at| at.elapsed().as_secs()),
                        "storage writable again: the database was reopened and writes go on"
                    );
                    break (db, None);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the database for writing; reads go on read-only");
                    let families = FAMILIES.map(|name| {
                        ColumnFamilyDescriptor::new(name, family_options(Some(name), &cache))
                    });
                    match DB::open_cf_descriptors_read_only(
                        &family_options(None, &cache),
                        &dir,
                        families,
                        false,
                    ) {
                        Ok(db) => break (db, refused_since),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot reopen the database at all; trying again");
                            std::thread::sleep(RECOVERY_INTERVAL);
                        }
                    }
                }
            }
        };
        let writer = Writer {
            db: Arc::new(db),
            counts,
            slot,
            dir,
            cache,
            refused_since,
            last_recovery,
            log_end: Default::default(),
        };
        writer.put_back();
        writer
    }

    fn put_back(&self) {
        *self
            .slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&self.db));
    }
}

//! How the databases are opened: column families and their table, cache and memtable
//! options.

use std::path::Path;

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options};

use super::{FAMILIES, IDEMPOTENCY, META, RECORDS, TOMBSTONES, engine};
use crate::store::StoreError;

/// Opens the data database with every family it has (RocksDB refuses to open one
/// without them all): ours, created if missing, and those of an earlier layout until
/// `index_records` drops them.
pub(super) fn open_data(dir: &Path, cache: &Cache) -> Result<DB, StoreError> {
    let existing = DB::list_cf(&Options::default(), dir).unwrap_or_default();
    let older = existing
        .into_iter()
        .filter(|name| name != "default" && !FAMILIES.contains(&name.as_str()));
    let families = FAMILIES
        .map(str::to_owned)
        .into_iter()
        .chain(older)
        .map(|name| {
            let options = family_options(Some(&name), cache);
            ColumnFamilyDescriptor::new(name, options)
        });
    DB::open_cf_descriptors(&family_options(None, cache), dir, families).map_err(engine)
}

/// Options of one column family (or of the audit database, `None`). Families read by
/// key get bloom filters, in their files and in the memtable, so that the lookups every
/// tokenization makes for a key that does not exist yet (a fresh token, a new card's
/// fingerprint) mostly touch no skiplist and no data block; families only ever scanned
/// in order get none, which saves the filters' memory.
pub(super) fn family_options(family: Option<&str>, cache: &Cache) -> Options {
    let mut options = db_options();
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Index and filter blocks are charged to the cache, so that memory stays bounded as
    // the number of records grows; those of level 0 (the newest files) stay pinned.
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    // Partitioned: a file's index and filter are cut into 4 KiB blocks under a small
    // top-level index kept pinned, so a lookup loads (and checksums) only the parts it
    // needs. Whole per-file index blocks were hundreds of KiB at 9 million records;
    // once they no longer fitted in the cache, every lookup re-read and re-verified
    // them, and reads slowed several times over.
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_metadata_block_size(4096);
    table.set_pin_top_level_index_and_filter(true);
    if matches!(family, Some(RECORDS | IDEMPOTENCY | META | TOMBSTONES)) {
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.05);
        options.set_memtable_whole_key_filtering(true);
    }
    options.set_block_based_table_factory(&table);
    // Small memtables: inserting a random key into a skiplist costs a cache miss per
    // step, and every tokenization inserts several such keys. At 8 MiB (instead of 64)
    // a memtable mostly stays in the CPU caches; flushes stay cheap and infrequent.
    options.set_write_buffer_size(8 * 1024 * 1024);
    options
}

fn db_options() -> Options {
    // The MANIFEST names the first and last key of every table file and would keep old
    // entries (erased tokens among them) until it rolls over, by default at 1 GiB. With
    // these two settings every change after the first starts a new MANIFEST holding
    // only the live files (a few KiB), and the old one is deleted.
    let mut options = Options::default()
        .get_options_from_string("max_manifest_file_size=1;max_manifest_space_amp_pct=0")
        .unwrap_or_default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Records are ciphertext and so incompressible; no compression also keeps the
    // leak scan honest (a compressed block could hide plaintext from it).
    options.set_compression_type(DBCompressionType::None);
    options.set_keep_log_file_num(5);
    options
}

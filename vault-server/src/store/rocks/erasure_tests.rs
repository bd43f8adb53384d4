use super::*;
use crate::store::{Delete, DeleteOutcome, Tombstone};

/// Control: NIST-800-88-LIVE (docs/compliance.md).
/// Attack: read a deleted record from RocksDB's files after the delete; after compaction no
/// file has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_leaves_no_file_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = RocksStore::open(
        &data,
        &dir.path().join("audit"),
        |_| None,
        &Tuning::default(),
    )
    .unwrap();
    let token = Token::generate().unwrap();
    let keep = Token::generate().unwrap();
    let versions = KeyVersions {
        card_data: 1,
        fingerprint: 1,
    };
    let record = |token: &Token, value: &[u8]| NewRecord {
        token: token.clone(),
        value: value.to_vec(),
        index_key: [b"card", token.as_str().as_bytes()].concat(),
        reuse_existing: false,
        older_index_keys: Vec::new(),
        versions,
        indexes: RecordIndexes {
            expires_at_unix_ms: 0,
            created_at_unix_ms: 0,
            card_key: b"card".to_vec(),
        },
        outcome: None,
        claim: None,
    };
    store
        .insert(vec![
            record(&token, b"sealed-bytes-to-erase"),
            record(&keep, b"sealed-bytes-to-keep"),
        ])
        .await
        .unwrap();
    // On disk in table files first, as a long-lived record would be.
    store.compact().await.unwrap();
    let outcome = store
        .delete(Delete {
            token: token.clone(),
            expected: b"sealed-bytes-to-erase".to_vec(),
            index_key: [b"card", token.as_str().as_bytes()].concat(),
            versions,
            indexes: RecordIndexes {
                expires_at_unix_ms: 0,
                created_at_unix_ms: 0,
                card_key: b"card".to_vec(),
            },
            tombstone: Tombstone {
                key: vec![7; 36],
                deleted_at_unix_ms: 1,
            },
        })
        .await
        .unwrap();
    assert_eq!(outcome, DeleteOutcome::Deleted);
    store.compact().await.unwrap();
    let mut kept = false;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for needle in [&b"sealed-bytes-to-erase"[..], token.as_str().as_bytes()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} still holds erased data",
                path.display()
            );
        }
        kept |= bytes.windows(20).any(|w| w == b"sealed-bytes-to-keep");
    }
    assert!(kept, "the other record is still stored");
}

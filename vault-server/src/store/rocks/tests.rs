use super::counts::decode_counts;
use super::*;
use crate::store::{Delete, DeleteOutcome, Tombstone};

fn no_versions(_: &[u8]) -> Option<(KeyVersions, RecordIndexes, Vec<u8>)> {
    None
}

#[test]
fn conformance() {
    super::super::conformance::on_large_stack(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        super::super::conformance::run_all(|| {
            n += 1;
            let store = RocksStore::open(
                &dir.path().join(n.to_string()),
                &dir.path().join(format!("{n}-audit")),
                no_versions,
                &Tuning::default(),
            )
            .unwrap();
            async { store }
        })
        .await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let token = Token::generate().unwrap();
    {
        let store = RocksStore::open(
            &dir.path().join("data"),
            &dir.path().join("audit"),
            no_versions,
            &Tuning::default(),
        )
        .unwrap();
        let outcome = store
            .insert(vec![NewRecord {
                token: token.clone(),
                value: b"sealed".to_vec(),
                index_key: b"index".to_vec(),
                reuse_existing: false,
                older_index_keys: Vec::new(),
                versions: KeyVersions {
                    card_data: 1,
                    fingerprint: 1,
                },
                indexes: Default::default(),
                outcome: None,
                claim: None,
            }])
            .await
            .unwrap();
        assert_eq!(outcome, vec![InsertOutcome::Stored]);
    }
    let store = RocksStore::open(
        &dir.path().join("data"),
        &dir.path().join("audit"),
        no_versions,
        &Tuning::default(),
    )
    .unwrap();
    assert_eq!(
        store.get(&token).await.unwrap().as_deref(),
        Some(&b"sealed"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_counts_are_stored_with_the_records_and_read_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (data, audit) = (dir.path().join("data"), dir.path().join("audit"));
    let open = || RocksStore::open(&data, &audit, no_versions, &Tuning::default()).unwrap();
    let record = |card_data| NewRecord {
        token: Token::generate().unwrap(),
        value: b"sealed".to_vec(),
        index_key: Token::generate().unwrap().as_str().as_bytes().to_vec(),
        reuse_existing: false,
        older_index_keys: Vec::new(),
        versions: KeyVersions {
            card_data,
            fingerprint: 1,
        },
        indexes: Default::default(),
        outcome: None,
        claim: None,
    };
    let expected = BTreeMap::from([
        ((KeyUse::CardData, 1), 2),
        ((KeyUse::CardData, 2), 1),
        ((KeyUse::Fingerprint, 1), 3),
    ]);
    {
        let store = open();
        let records = vec![record(1), record(1), record(2), record(2)];
        let gone = &records[3];
        let delete = Delete {
            token: gone.token.clone(),
            expected: gone.value.clone(),
            index_key: gone.index_key.clone(),
            versions: gone.versions,
            indexes: gone.indexes.clone(),
            tombstone: Tombstone::default(),
        };
        store.insert(records).await.unwrap();
        let outcome = store.delete(delete).await.unwrap();
        assert_eq!(outcome, DeleteOutcome::Deleted);
        assert_eq!(store.version_counts(), expected);
    }
    // Read back from the stored counts (the scan would give the same; the stored
    // value is checked directly too).
    {
        let store = open();
        assert_eq!(store.version_counts(), expected);
        let db = store.db().unwrap();
        let meta = db.cf_handle(META).unwrap();
        let stored = db.get_cf(meta, COUNTS).unwrap().unwrap();
        assert_eq!(decode_counts(&stored), Some(expected.clone()));
    }
    {
        // A data directory from before the counts were stored is counted once.
        let store = open();
        let db = store.db().unwrap();
        db.delete_cf(db.cf_handle(META).unwrap(), COUNTS).unwrap();
    }
    let store = open();
    assert_eq!(store.version_counts(), expected);
}

/// Appends `count` entries after the log's end (bytes: "entry-<sequence>").
fn entries(count: u64) -> AuditSeal {
    Box::new(move |end: crate::store::LogEnd| {
        let first = end.last.map_or(1, |(sequence, _)| sequence + 1);
        crate::store::Sealed {
            entries: (first..first + count)
                .map(|s| (s, format!("entry-{s}").into_bytes()))
                .collect(),
            anchor: format!("head-{}", first + count - 1).into_bytes(),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_audit_database_is_moved_in_once_and_never_again() {
    let dir = tempfile::tempdir().unwrap();
    let (data, old) = (dir.path().join("data"), dir.path().join("data-audit"));
    // The log as a vault before the `audit` column family kept it.
    let write_old = |count: u64| {
        let db = DB::open_default(&old).unwrap();
        for s in 1..=count {
            db.put(s.to_be_bytes(), format!("old-{s}")).unwrap();
        }
    };
    write_old(3);
    {
        let store = RocksStore::open(&data, &old, no_versions, &Tuning::default()).unwrap();
        let moved = store.read_audit(0, 100).await.unwrap();
        assert_eq!(
            moved,
            (1..=3u64)
                .map(|s| (s, format!("old-{s}").into_bytes()))
                .collect::<Vec<_>>()
        );
        assert!(!old.exists(), "the old database is put aside");
        assert!(dir.path().join("data-audit.moved").join("CURRENT").exists());
        assert_eq!(store.append_audit(entries(2)).await.unwrap(), vec![4, 5]);
    }
    // An older copy put back where the old database was is not copied over the log.
    write_old(1);
    let store = RocksStore::open(&data, &old, no_versions, &Tuning::default()).unwrap();
    let log = store.read_audit(0, 100).await.unwrap();
    assert_eq!(log.len(), 5);
    assert_eq!(log[0].1, b"old-1");
    assert_eq!(log[4].1, b"entry-5");
    assert!(old.join("CURRENT").exists(), "left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_and_their_anchor_are_in_the_data_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = dir.path().join("none");
    {
        let store = RocksStore::open(&data, &old, no_versions, &Tuning::default()).unwrap();
        // Concurrent appends in one group chain one after the other.
        let appends = (0..8).map(|_| store.append_audit(entries(3)));
        let mut sequences: Vec<u64> = futures::future::try_join_all(appends)
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        sequences.sort_unstable();
        assert_eq!(sequences, (1..=24).collect::<Vec<_>>());
    }
    assert!(!old.exists(), "no second database is made");
    let store = RocksStore::open(&data, &old, no_versions, &Tuning::default()).unwrap();
    assert_eq!(store.last_audit().await.unwrap().unwrap().0, 24);
    assert_eq!(
        store.get_meta(crate::store::AUDIT_HEAD_KEY).await.unwrap(),
        Some(b"head-24".to_vec())
    );
}

/// Record values of the layout test: `card_data_version|fingerprint_version|card_key|
/// index_key_suffix|expires_at`.
fn test_indexes(value: &[u8]) -> Option<(KeyVersions, RecordIndexes, Vec<u8>)> {
    let text = std::str::from_utf8(value).ok()?;
    let parts: Vec<&str> = text.split('|').collect();
    let [card_data, fingerprint, card_key, suffix, expires] = parts[..] else {
        return None;
    };
    Some((
        KeyVersions {
            card_data: card_data.parse().ok()?,
            fingerprint: fingerprint.parse().ok()?,
        },
        RecordIndexes {
            expires_at_unix_ms: expires.parse().ok()?,
            created_at_unix_ms: 0,
            card_key: card_key.as_bytes().to_vec(),
        },
        format!("{card_key}{suffix}").into_bytes(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_earlier_layout_is_indexed_once_and_its_old_families_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tokens: Vec<Token> = (0..3).map(|_| Token::generate().unwrap()).collect();
    {
        // The earlier layout: a fingerprint index, `versions` and `cards`, and its marker.
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let families = [
            "records",
            "fingerprints",
            "versions",
            "cards",
            "meta",
            "expiry",
        ];
        let db = DB::open_cf(&options, &data, families).unwrap();
        let records = db.cf_handle("records").unwrap();
        for (token, value) in tokens.iter().zip([
            "1|1|cardA|-2031|0",
            "2|1|cardA|-2032|5000",
            "1|1|cardB|-2031|0",
        ]) {
            db.put_cf(records, token.as_str(), value).unwrap();
        }
        let fingerprints = db.cf_handle("fingerprints").unwrap();
        db.put_cf(fingerprints, "cardA-2031", tokens[0].as_str())
            .unwrap();
        db.put_cf(db.cf_handle("meta").unwrap(), "indexed-v2", [])
            .unwrap();
    }
    let store = RocksStore::open(
        &data,
        &dir.path().join("none"),
        test_indexes,
        &Tuning::default(),
    )
    .unwrap();
    let families = DB::list_cf(&rocksdb::Options::default(), &data).unwrap();
    for old in ["fingerprints", "versions", "cards"] {
        assert!(
            !families.iter().any(|f| f == old),
            "{old} dropped: {families:?}"
        );
    }
    // Reuse finds the card's live token by its index key.
    let again = || NewRecord {
        token: Token::generate().unwrap(),
        value: b"1|1|cardA|-2031|0".to_vec(),
        index_key: b"cardA-2031".to_vec(),
        reuse_existing: true,
        older_index_keys: Vec::new(),
        versions: KeyVersions {
            card_data: 1,
            fingerprint: 1,
        },
        indexes: RecordIndexes {
            expires_at_unix_ms: 0,
            created_at_unix_ms: 0,
            card_key: b"cardA".to_vec(),
        },
        outcome: None,
        claim: None,
    };
    assert_eq!(
        store.insert(vec![again()]).await.unwrap(),
        vec![InsertOutcome::Existing(tokens[0].clone())]
    );
    // Every token of a card, whatever its expiry; none of another card.
    let mut card_a = store.tokens_of_card(b"cardA").await.unwrap();
    card_a.sort();
    let mut expected = tokens[..2].to_vec();
    expected.sort();
    assert_eq!(card_a, expected);
    assert_eq!(store.tokens_of_card(b"card").await.unwrap(), vec![]);
    // The expiry index, the counts and the versions for rewrap come from the records.
    assert_eq!(
        store.expired(6000, 10).await.unwrap(),
        vec![tokens[1].clone()]
    );
    assert_eq!(
        store.version_counts(),
        BTreeMap::from([
            ((KeyUse::CardData, 1), 2),
            ((KeyUse::CardData, 2), 1),
            ((KeyUse::Fingerprint, 1), 3),
        ])
    );
    let active = KeyVersions {
        card_data: 2,
        fingerprint: 1,
    };
    let mut off: Vec<Token> = store
        .records_off_versions(active, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, token)| token)
        .collect();
    off.sort();
    let mut expected = vec![tokens[0].clone(), tokens[2].clone()];
    expected.sort();
    assert_eq!(off, expected);
    // A delete removes the record's one index entry.
    let record = store.get(&tokens[0]).await.unwrap().unwrap();
    let outcome = store
        .delete(Delete {
            token: tokens[0].clone(),
            expected: record,
            index_key: b"cardA-2031".to_vec(),
            versions: KeyVersions {
                card_data: 1,
                fingerprint: 1,
            },
            indexes: RecordIndexes {
                expires_at_unix_ms: 0,
                created_at_unix_ms: 0,
                card_key: b"cardA".to_vec(),
            },
            tombstone: Tombstone::default(),
        })
        .await
        .unwrap();
    assert_eq!(outcome, DeleteOutcome::Deleted);
    let new = again();
    let token = new.token.clone();
    assert_eq!(
        store.insert(vec![new]).await.unwrap(),
        vec![InsertOutcome::Stored],
        "the card's only live token for that expiry is gone"
    );
    assert_eq!(store.tokens_of_card(b"cardA").await.unwrap().len(), 2);
    drop(store);
    // A crash after the index's marker but before the drop left an old family: the
    // next start drops it.
    {
        let mut db =
            crate::store::rocks::options::open_data(&data, &Cache::new_lru_cache(1 << 20)).unwrap();
        db.create_cf("fingerprints", &rocksdb::Options::default())
            .unwrap();
        let old = db.cf_handle("fingerprints").unwrap();
        db.put_cf(old, "cardA-2031", token.as_str()).unwrap();
    }
    // Opened again: nothing is indexed twice, and the old family is gone.
    let store = RocksStore::open(
        &data,
        &dir.path().join("none"),
        test_indexes,
        &Tuning::default(),
    )
    .unwrap();
    assert!(store.get(&token).await.unwrap().is_some());
    assert_eq!(store.version_counts().values().sum::<u64>(), 6);
    let families = DB::list_cf(&rocksdb::Options::default(), &data).unwrap();
    assert!(
        !families.iter().any(|f| f == "fingerprints"),
        "{families:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_vaults_log_that_is_not_where_it_was_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (data, old) = (dir.path().join("data"), dir.path().join("data-audit"));
    {
        // What an older vault left: data with an anchor, the log kept elsewhere.
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db = DB::open_cf(&options, &data, ["meta"]).unwrap();
        db.put_cf(
            db.cf_handle("meta").unwrap(),
            "audit-head",
            7u64.to_be_bytes(),
        )
        .unwrap();
    }
    let err = RocksStore::open(&data, &old, no_versions, &Tuning::default()).unwrap_err();
    assert!(err.to_string().contains("audit log is not at"), "{err}");
    std::fs::write(data.join("AUDIT-LOG-LOST"), b"").unwrap();
    let store = RocksStore::open(&data, &old, no_versions, &Tuning::default()).unwrap();
    assert_eq!(store.last_audit().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_skips_expired_tokens_waiting_for_the_purge() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(
        &dir.path().join("data"),
        &dir.path().join("none"),
        no_versions,
        &Tuning::default(),
    )
    .unwrap();
    let record = |created: i64, expires: i64, reuse: bool| NewRecord {
        token: Token::generate().unwrap(),
        value: b"sealed".to_vec(),
        index_key: b"card-12/31".to_vec(),
        reuse_existing: reuse,
        older_index_keys: Vec::new(),
        versions: KeyVersions {
            card_data: 1,
            fingerprint: 1,
        },
        indexes: RecordIndexes {
            expires_at_unix_ms: expires,
            created_at_unix_ms: created,
            card_key: b"card".to_vec(),
        },
        outcome: None,
        claim: None,
    };
    // Three older tokens of the card, expired but not purged yet, and a live one.
    let expired: Vec<NewRecord> = (1..=3).map(|n| record(n, n, false)).collect();
    let live = record(4, 0, false);
    let live_token = live.token.clone();
    store.insert(expired).await.unwrap();
    store.insert(vec![live]).await.unwrap();
    assert_eq!(
        store.insert(vec![record(5, 0, true)]).await.unwrap(),
        vec![InsertOutcome::Existing(live_token)]
    );
}

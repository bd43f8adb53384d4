use std::collections::BTreeSet;
use std::sync::Arc;

use pgcluster::Cluster;

use super::connect::{Connector, host_name, one_per_host};
use super::counts::COUNTS_REFRESH;
use super::settings::{default_commit_timeout_ms, default_pool_size, default_writers};
use super::*;
use crate::store::conformance::numbered;
use crate::store::{KeyVersions, LogEnd, RecordIndexes, Sealed};

fn settings(cluster: &Cluster, dbname: &str) -> PostgresSettings {
    PostgresSettings {
        url: cluster.conninfo_for(dbname),
        password_file: cluster.password_file().to_owned(),
        ca_file: cluster.ca_file().to_owned(),
        pool_size: default_pool_size(),
        writers: default_writers(),
        connect_timeout_ms: 2_000,
        commit_timeout_ms: default_commit_timeout_ms(),
        migrate: true,
        node_name: None,
    }
}

async fn start() -> Cluster {
    tokio::task::spawn_blocking(Cluster::start)
        .await
        .unwrap()
        .unwrap()
}

/// A store on a fresh database of `cluster`.
async fn fresh(cluster: &Cluster, dbname: &str, node: &str) -> PgStore {
    cluster.create_database(dbname).unwrap();
    PgStore::open(&settings(cluster, dbname), node)
        .await
        .unwrap()
}

/// Stores one new record under `index_key`, checking it was stored; its token.
async fn store_one(store: &PgStore, index_key: &[u8]) -> Token {
    let token = Token::generate().unwrap();
    assert_eq!(
        store.insert(vec![record(&token, index_key)]).await.unwrap(),
        vec![InsertOutcome::Stored]
    );
    token
}

fn record(token: &Token, index_key: &[u8]) -> NewRecord {
    NewRecord {
        token: token.clone(),
        value: b"sealed".to_vec(),
        index_key: index_key.to_vec(),
        reuse_existing: true,
        older_index_keys: Vec::new(),
        versions: KeyVersions {
            card_data: 1,
            fingerprint: 1,
        },
        indexes: RecordIndexes::default(),
        outcome: None,
        claim: None,
    }
}

#[test]
fn conformance() {
    crate::store::conformance::on_large_stack(|| async {
        let cluster = start().await;
        let cluster = &cluster;
        let mut n = 0;
        crate::store::conformance::run_all(|| {
            n += 1;
            let name = format!("conformance{n}");
            async move { fresh(cluster, &name, "node").await }
        })
        .await;
    });
}

/// Two vaults on one database tokenizing the same card at once (duplicate
/// detection on): every call gets the one token the card has, and both chain their
/// audit entries onto one log without a fork.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vaults_share_the_index_counts_audit_log_and_jobs() {
    let cluster = start().await;
    let a = Arc::new(fresh(&cluster, "shared", "a").await);
    let b = Arc::new(
        PgStore::open(&settings(&cluster, "shared"), "b")
            .await
            .unwrap(),
    );

    let mut calls = Vec::new();
    for i in 0..40 {
        let store = if i % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        calls.push(tokio::spawn(async move {
            let token = Token::generate().unwrap();
            let outcome = store
                .insert(vec![record(&token, b"one card")])
                .await
                .unwrap();
            match outcome.as_slice() {
                [InsertOutcome::Stored] => token,
                [InsertOutcome::Existing(existing)] => existing.clone(),
                other => panic!("unexpected outcome {other:?}"),
            }
        }));
    }
    let mut tokens = BTreeSet::new();
    for call in calls {
        tokens.insert(call.await.unwrap().as_str().to_owned());
    }
    assert_eq!(tokens.len(), 1, "one card got several tokens: {tokens:?}");

    // Batches past MAX_KEY_LOCKS keys lock the whole index instead of each key: the
    // same 200 cards from both vaults at once still get one token each.
    let batch = |store: Arc<PgStore>| {
        tokio::spawn(async move {
            let records: Vec<NewRecord> = (0..200)
                .map(|i| record(&Token::generate().unwrap(), format!("card {i}").as_bytes()))
                .collect();
            let tokens: Vec<Token> = records.iter().map(|r| r.token.clone()).collect();
            let outcomes = store.insert(records).await.unwrap();
            tokens
                .into_iter()
                .zip(outcomes)
                .map(|(token, outcome)| match outcome {
                    InsertOutcome::Stored => token,
                    InsertOutcome::Existing(existing) => existing,
                    InsertOutcome::TokenTaken => panic!("a fresh token was taken"),
                    InsertOutcome::OutcomeTaken(_) => panic!("no outcome was claimed"),
                })
                .collect::<Vec<_>>()
        })
    };
    let (from_a, from_b) = tokio::join!(batch(Arc::clone(&a)), batch(Arc::clone(&b)));
    assert_eq!(from_a.unwrap(), from_b.unwrap(), "a card got two tokens");

    // Each vault counts its own writes at once and the other's within a refresh.
    let one = Some(&201u64);
    let own = |store: &PgStore| store.version_counts().get(&(KeyUse::CardData, 1)).copied();
    assert!(
        own(&a).is_some() || own(&b).is_some(),
        "a vault does not count its own writes at once"
    );
    let deadline = std::time::Instant::now() + COUNTS_REFRESH * 10;
    while (a.version_counts().get(&(KeyUse::CardData, 1)) != one
        || b.version_counts().get(&(KeyUse::CardData, 1)) != one)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.version_counts().get(&(KeyUse::CardData, 1)), one);
    assert_eq!(b.version_counts().get(&(KeyUse::CardData, 1)), one);

    // Audit appends from both, at once: one chain, each seal sees the true end.
    let mut appends = Vec::new();
    for i in 0..20u64 {
        let store = if i % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        appends.push(tokio::spawn(async move {
            store
                .append_audit(Box::new(|end: LogEnd| {
                    let (last, previous) = end.last.unwrap_or((0, b"0".to_vec()));
                    // Each entry names its predecessor's sequence: a fork would
                    // show as two entries naming one.
                    let previous = String::from_utf8(previous).unwrap();
                    let previous: u64 = previous.split(':').next().unwrap().parse().unwrap();
                    assert_eq!(previous, last);
                    Sealed {
                        entries: vec![(last + 1, format!("{}:{last}", last + 1).into_bytes())],
                        anchor: (last + 1).to_be_bytes().to_vec(),
                    }
                }))
                .await
                .unwrap()
        }));
    }
    let mut sequences: Vec<u64> = Vec::new();
    for append in appends {
        sequences.extend(append.await.unwrap());
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=20).collect::<Vec<_>>());
    let log = a.read_audit(0, 100).await.unwrap();
    for (sequence, entry) in &log {
        assert_eq!(entry, format!("{sequence}:{}", sequence - 1).as_bytes());
    }

    // A job runs on one vault at a time; the other gets it once the first lets go.
    let held = a.lock_job("rewrap").await.unwrap();
    assert!(held.is_some());
    assert!(b.lock_job("rewrap").await.unwrap().is_none());
    drop(held);
    let mut taken = None;
    for _ in 0..50 {
        taken = b.lock_job("rewrap").await.unwrap();
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taken.is_some(), "the job lock was not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_versioned_idempotent_and_checked() {
    let cluster = start().await;
    cluster.create_database("empty").unwrap();
    let mut unmigrated = settings(&cluster, "empty");
    unmigrated.migrate = false;
    let refused = PgStore::open(&unmigrated, "n")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("vault-server migrate"), "{refused}");

    assert_eq!(migrate_only(&unmigrated).await.unwrap(), vec![1, 2, 3]);
    assert_eq!(migrate_only(&unmigrated).await.unwrap(), Vec::<i32>::new());
    let store = PgStore::open(&unmigrated, "n").await.unwrap();
    // The password is in the store's connection settings, never in its Debug.
    let password = std::fs::read_to_string(cluster.password_file()).unwrap();
    let debug = format!("{store:?} {:?}", settings(&cluster, "empty"));
    assert!(debug.contains("Pool"), "{debug}");
    assert!(
        !debug.contains(password.trim()),
        "the password shows in Debug"
    );
    assert_eq!(
        cluster
            .psql("empty", "SELECT count(*) FROM schema_migrations")
            .unwrap(),
        "3"
    );
    // A schema from a newer vault-server is refused, not used.
    cluster
        .psql(
            "empty",
            "INSERT INTO schema_migrations (version, description) VALUES (999, 'future')",
        )
        .unwrap();
    let refused = PgStore::open(&settings(&cluster, "empty"), "m")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("upgrade the vault-server"), "{refused}");

    // Two vaults under one node name would share count slots and a usage-report
    // instance: the second is refused while the first runs, and welcome after.
    let twin = PgStore::open(&unmigrated, "n")
        .await
        .unwrap_err()
        .to_string();
    assert!(twin.contains("another vault-server runs as node"), "{twin}");
    drop(store);
    cluster
        .psql("empty", "DELETE FROM schema_migrations WHERE version = 999")
        .unwrap();
    PgStore::open(&unmigrated, "n").await.unwrap();
}

/// With a synchronous standby, a commit counts only once the standby has it: while
/// the standby is down nothing is acknowledged (the calls fail as unavailable after
/// the commit timeout, audit appends too), and once it is back writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_while_the_synchronous_standby_is_down() {
    let primary = start().await;
    let primary = tokio::task::spawn_blocking(move || {
        let standby = primary.start_standby(true).unwrap();
        (primary, standby)
    })
    .await
    .unwrap();
    let (primary, mut standby) = primary;
    primary.create_database("sync").unwrap();
    // A role statement timeout shorter than the wait: were it to cancel the commit
    // waiting for the standby, PostgreSQL would report that commit as done.
    primary
        .psql(
            "postgres",
            &format!(
                "ALTER ROLE {} SET statement_timeout = '300ms'",
                pgcluster::APP_USER
            ),
        )
        .unwrap();
    let mut settings = settings(&primary, "sync");
    settings.commit_timeout_ms = 1_500;
    let store = PgStore::open(&settings, "n").await.unwrap();
    let before = store_one(&store, b"before").await;

    standby.stop_immediate().unwrap();
    // More timed-out calls than the store has commit lanes (two writers and the
    // audit log): each fails after the timeout, but no more server processes than
    // lanes are left waiting for the standby.
    let mut unconfirmed = Vec::new();
    for n in 0..4 {
        let started = std::time::Instant::now();
        let token = Token::generate().unwrap();
        let error = store
            .insert(vec![record(&token, format!("unconfirmed {n}").as_bytes())])
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(1_400),
            "{:?}",
            started.elapsed()
        );
        unconfirmed.push(token);
    }
    assert!(
        store.stats().unreachable,
        "health must say writes are not confirmed"
    );
    for _ in 0..2 {
        let error = store.append_audit(numbered(1, 1)).await.unwrap_err();
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    }
    let waiting = |primary: &Cluster| -> u64 {
        primary
            .psql(
                "sync",
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' \
                 AND application_name = 'vault-server'",
            )
            .unwrap()
            .parse()
            .unwrap()
    };
    let stuck = waiting(&primary);
    assert!(
        (2..=3).contains(&stuck),
        "{stuck} server processes wait for the standby (a writer's and the audit \
         log's at least, one per lane at most)"
    );

    let mut standby = tokio::task::spawn_blocking(move || {
        standby.restart().unwrap();
        standby
    })
    .await
    .unwrap();
    let after = Token::generate().unwrap();
    let mut stored = None;
    for _ in 0..40 {
        match store.insert(vec![record(&after, b"after")]).await {
            Ok(outcome) => {
                stored = Some(outcome);
                break;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        stored,
        Some(vec![InsertOutcome::Stored]),
        "writes did not resume"
    );
    assert!(!store.stats().unreachable);
    // The unconfirmed inserts that reached the database landed once the standby
    // had them: this vault's own counts (they feed key destroy checks) catch up
    // with the rows, not stay short.
    let rows = || -> u64 {
        primary
            .psql("sync", "SELECT count(*) FROM records")
            .unwrap()
            .parse()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let counted = store
            .version_counts()
            .get(&(KeyUse::CardData, 1))
            .copied()
            .unwrap_or(0);
        if counted == rows() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counted {counted} records, the table has {}",
            rows()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let landed = |token: &Token| {
        primary
            .psql(
                "sync",
                &format!("SELECT count(*) FROM records WHERE token = '{token}'"),
            )
            .unwrap()
            == "1"
    };
    assert!(landed(&before) && landed(&after));
    assert!(
        landed(&unconfirmed[0]),
        "the first unconfirmed record is there now"
    );
    // The connections kept for the unanswered commits are closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while waiting(&primary) > 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The audit log goes on from what is stored: the end the failed append may
    // have left behind (it may land any moment now), or nothing.
    let appended = store
        .append_audit(Box::new(|end: LogEnd| {
            let next = end.last.map_or(1, |(sequence, _)| sequence + 1);
            Sealed {
                entries: vec![(next, b"after".to_vec())],
                anchor: next.to_be_bytes().to_vec(),
            }
        }))
        .await
        .unwrap();
    assert_eq!(appended.len(), 1);
    standby.stop_immediate().unwrap();
}

/// Each host's configuration is the whole configuration but for the other hosts:
/// nothing set in `url` is lost on the way (the client library's `Config` compares
/// every field, those added in later versions too).
#[test]
fn one_config_per_host_keeps_every_other_setting() {
    let rest = "user=vault password=synthetic dbname=tokenvault options='-c a=b' \
                application_name=v sslmode=require sslnegotiation=direct \
                connect_timeout=3 tcp_user_timeout=4 keepalives=1 keepalives_idle=5 \
                keepalives_interval=6 keepalives_retries=7 \
                target_session_attrs=read-write channel_binding=require \
                load_balance_hosts=disable";
    let both: tokio_postgres::Config =
        format!("host=db1,db2 hostaddr=192.0.2.1,192.0.2.2 port=5432,5433 {rest}")
            .parse()
            .unwrap();
    let each = one_per_host(&both).unwrap();
    let expected: Vec<tokio_postgres::Config> = [
        "host=db1 hostaddr=192.0.2.1 port=5432",
        "host=db2 hostaddr=192.0.2.2 port=5433",
    ]
    .iter()
    .map(|host| format!("{host} {rest}").parse().unwrap())
    .collect();
    assert_eq!(each, expected);
    assert_eq!(host_name(&each[1]), "db2:5433 (192.0.2.2)");
    let mismatched: tokio_postgres::Config = "host=a,b hostaddr=192.0.2.1".parse().unwrap();
    assert!(one_per_host(&mismatched).is_err());

    // One port for every host; no port at all (the library's default).
    let one_port: tokio_postgres::Config = "host=a,b port=6000".parse().unwrap();
    let ports: Vec<Vec<u16>> = one_per_host(&one_port)
        .unwrap()
        .iter()
        .map(|c| c.get_ports().to_vec())
        .collect();
    assert_eq!(ports, [vec![6000], vec![6000]]);
    let no_port: tokio_postgres::Config = "host=a,b".parse().unwrap();
    assert!(
        one_per_host(&no_port)
            .unwrap()
            .iter()
            .all(|c| c.get_ports().is_empty())
    );
    let no_host: tokio_postgres::Config = "user=vault".parse().unwrap();
    assert_eq!(one_per_host(&no_host).unwrap(), [no_host]);
}

/// A host name is resolved and tried at its addresses (each an attempt of its
/// own), and TLS verifies the name, not the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_is_resolved_and_tls_verifies_the_name() {
    let cluster = start().await;
    cluster.create_database("named").unwrap();
    let mut settings = settings(&cluster, "named");
    settings.url = format!(
        "host=localhost port={} user=vault dbname=named",
        cluster.port()
    );
    let store = PgStore::open(&settings, "n").await.unwrap();
    let token = store_one(&store, b"k").await;
    assert!(store.get(&token).await.unwrap().is_some());
    // The certificate names localhost and 127.0.0.1 only: a name it does not hold
    // is refused, even at the right address.
    let connector = Connector::from_settings(&PostgresSettings {
        url: format!(
            "host=not-the-server hostaddr=127.0.0.1 port={} user=vault dbname=named",
            cluster.port()
        ),
        ..settings
    })
    .unwrap();
    let Err(refused) = connector.connect().await else {
        panic!("connected under a name the certificate does not hold");
    };
    assert!(refused.to_string().contains("not-the-server"), "{refused}");
}

/// A first host that takes TCP connections but never answers (a hung server, a
/// stuck proxy) is passed over within the connect timeout, and afterwards the host
/// that answered is tried first: only the first connection pays for the hung one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_first_host_is_passed_over() {
    let cluster = start().await;
    cluster.create_database("hung").unwrap();
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    // Accepts every connection and holds it without a byte in answer.
    let hung_server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let mut settings = settings(&cluster, "hung");
    settings.url = format!(
        "host=127.0.0.1,127.0.0.1 port={hung_port},{} user=vault dbname=hung",
        cluster.port()
    );
    settings.connect_timeout_ms = 1_000;
    settings.pool_size = 4;
    settings.writers = 2;
    let store = PgStore::open(&settings, "n").await.unwrap();
    for n in 0..8 {
        let token = store_one(&store, format!("hung {n}").as_bytes()).await;
        assert!(store.get(&token).await.unwrap().is_some());
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "only the first connection tried the hung host"
    );
    hung_server.abort();
}

/// A first host that cannot be reached (TEST-NET-1, never routed) is skipped: a
/// new connection goes on to the next host, within one connect timeout per host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_first_host_is_skipped() {
    let cluster = start().await;
    cluster.create_database("hosts").unwrap();
    let mut settings = settings(&cluster, "hosts");
    settings.url = format!(
        "host=192.0.2.1,127.0.0.1 port=5432,{} user=vault dbname=hosts",
        cluster.port()
    );
    settings.connect_timeout_ms = 500;
    settings.pool_size = 2;
    settings.writers = 1;
    let store = PgStore::open(&settings, "n").await.unwrap();
    let token = store_one(&store, b"k").await;
    assert!(store.get(&token).await.unwrap().is_some());
}

/// The database goes away under the store and comes back: calls meanwhile fail as
/// unavailable, and the store reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_unavailable_then_reconnected() {
    let mut cluster = start().await;
    let store = fresh(&cluster, "tokenvault2", "n").await;
    let kept = Token::generate().unwrap();
    store.insert(vec![record(&kept, b"kept")]).await.unwrap();

    cluster.stop_immediate().unwrap();
    let token = Token::generate().unwrap();
    let error = store
        .insert(vec![record(&token, b"lost")])
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    let error = store.get(&kept).await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    assert!(
        store.stats().unreachable,
        "health must say the database is gone"
    );

    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();
    assert_eq!(
        store.get(&kept).await.unwrap().as_deref(),
        Some(&b"sealed"[..])
    );
    assert_eq!(
        store.insert(vec![record(&token, b"after")]).await.unwrap(),
        vec![InsertOutcome::Stored]
    );
    // Health clears by itself: the counts refresh reaches the database again and
    // the node name's lock, lost with its connection, is taken back.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.stats().unreachable && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!store.stats().unreachable, "health stayed degraded");
    assert!(!store.health.node_lost.load(Ordering::Relaxed));
    cluster.stop_immediate().unwrap();
}

/// Two vaults on one database claiming one idempotency key at once, over and over
/// (each round a new key, so the claims race on the insert and, once released, on the
/// replacement): one claim wins each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vaults_claiming_one_idempotency_key_have_one_winner() {
    let cluster = start().await;
    let a = Arc::new(fresh(&cluster, "claims", "a").await);
    let b = Arc::new(
        PgStore::open(&settings(&cluster, "claims"), "b")
            .await
            .unwrap(),
    );
    let released: crate::store::Replaceable = Arc::new(|stored| stored == b"released");
    for round in 0..30u32 {
        let key = format!("acme/order-{}", round / 2).into_bytes();
        let claims = [&a, &b, &a, &b].map(|store| {
            let (store, key, released) = (Arc::clone(store), key.clone(), Arc::clone(&released));
            tokio::spawn(async move {
                store
                    .claim_outcome(key, b"pending".to_vec(), released)
                    .await
            })
        });
        let mut won = 0;
        for claim in claims {
            if claim.await.unwrap().unwrap() == crate::store::Claim::Claimed {
                won += 1;
            }
        }
        assert_eq!(won, 1, "round {round}");
        // Odd rounds race on taking over a released key.
        a.put_outcome(key, b"released".to_vec()).await.unwrap();
    }
}

/// Two vaults on one database storing batches whose records claim the same outcome
/// keys in opposite orders (sealed cards replayed through a second vault, in reverse):
/// one record per key, and PostgreSQL never has to break a deadlock between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_in_opposite_orders_on_two_vaults_do_not_deadlock() {
    let cluster = start().await;
    let a = Arc::new(fresh(&cluster, "opposite", "a").await);
    let b = Arc::new(
        PgStore::open(&settings(&cluster, "opposite"), "b")
            .await
            .unwrap(),
    );
    let never: crate::store::Replaceable = Arc::new(|_| false);
    for round in 0..20u32 {
        let keys: Vec<Vec<u8>> = (0..6)
            .map(|k| format!("acme/nonce-{round}-{k}").into_bytes())
            .collect();
        let batch = |vault: &str, reversed: bool| -> Vec<NewRecord> {
            let mut order: Vec<&Vec<u8>> = keys.iter().collect();
            if reversed {
                order.reverse();
            }
            order
                .into_iter()
                .map(|key| NewRecord {
                    outcome: Some((key.clone(), format!("answer from {vault}").into_bytes())),
                    claim: Some(crate::store::ClaimRule(Arc::clone(&never))),
                    reuse_existing: false,
                    ..record(
                        &Token::generate().unwrap(),
                        format!("card/{vault}/{}", String::from_utf8_lossy(key)).as_bytes(),
                    )
                })
                .collect()
        };
        let (first, second) = (batch("a", false), batch("b", true));
        let (a, b) = (Arc::clone(&a), Arc::clone(&b));
        let (first, second) = tokio::join!(
            tokio::spawn(async move { a.insert(first).await }),
            tokio::spawn(async move { b.insert(second).await }),
        );
        let (first, mut second) = (first.unwrap().unwrap(), second.unwrap().unwrap());
        second.reverse();
        for (k, outcomes) in first.iter().zip(&second).enumerate() {
            let stored = [outcomes.0, outcomes.1]
                .iter()
                .filter(|o| ***o == InsertOutcome::Stored)
                .count();
            assert_eq!(stored, 1, "round {round}, key {k}: {outcomes:?}");
        }
    }
    let log = std::fs::read_to_string(cluster.log_file()).unwrap();
    assert_eq!(
        log.matches("deadlock detected").count(),
        0,
        "PostgreSQL broke deadlocks between the two vaults' claims"
    );
}

/// The lock values must not change (vaults of two versions share a database during a
/// rolling upgrade), and outcome keys have a budget of their own: 128 sealed cards lock
/// 128 index keys and 128 outcome keys one by one; one more locks both kinds whole. The
/// prune's removals lock no key.
#[test]
fn lock_keys_are_stable_and_outcomes_have_their_own_budget() {
    use super::locks::{KeyLocks, index_lock, outcome_lock};
    assert_eq!(index_lock(b"node/x"), 5_507_810_635_679_592_563);
    assert_eq!(index_lock(b"acme/fp1/0123"), 1_755_040_125_708_557_309);
    assert_eq!(outcome_lock(b"acme/nonce"), 2_100_543_602_660_501_552);
    let never: crate::store::Replaceable = Arc::new(|_| false);
    let sealed = |n: usize| {
        let records = (0..n)
            .map(|i| NewRecord {
                outcome: Some((format!("acme/nonce-{i}").into_bytes(), b"answer".to_vec())),
                claim: Some(crate::store::ClaimRule(Arc::clone(&never))),
                ..record(
                    &Token::generate().unwrap(),
                    format!("acme/card-{i}").as_bytes(),
                )
            })
            .collect();
        let (reply, _) = tokio::sync::oneshot::channel();
        vec![writer::Op::Insert {
            records,
            riding: None,
            reply,
        }]
    };
    let (locks, _) = writer::locks_of(&sealed(128));
    assert!(matches!(&locks.index, KeyLocks::Keys(keys) if keys.len() == 128));
    assert!(matches!(&locks.outcomes, KeyLocks::Keys(keys) if keys.len() == 128));
    assert_eq!(locks.keys().len(), 256);
    let (locks, _) = writer::locks_of(&sealed(129));
    assert_eq!(
        (locks.index, locks.outcomes),
        (KeyLocks::Whole, KeyLocks::Whole)
    );
    let (reply, _) = tokio::sync::oneshot::channel();
    let prune = [writer::Op::RemoveOutcomes {
        keys: vec![b"acme/nonce-1".to_vec()],
        values: vec![b"released".to_vec()],
        reply,
    }];
    let (locks, _) = writer::locks_of(&prune);
    assert!(locks.keys().is_empty());
}

//! Real PostgreSQL clusters: the app role's TLS-only access, a synchronous standby that
//! takes over after a crash of the primary, and crash recovery on restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pgcluster::{Cluster, Error};

/// psql as ourselves, as the app role, over TCP with `sslmode`, the password from the
/// cluster's password file (or `password`).
fn app_psql(
    cluster: &Cluster,
    dbname: &str,
    sslmode: &str,
    password: Option<&str>,
    sql: &str,
) -> Output {
    let from_file = std::fs::read_to_string(cluster.password_file()).unwrap();
    let conninfo = format!(
        "{} sslmode={sslmode} sslrootcert={} connect_timeout=10",
        cluster.conninfo_for(dbname),
        cluster.ca_file().display()
    );
    let mut command = Command::new("psql");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(key);
        }
    }
    command
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(conninfo)
        .args(["-c", sql])
        .env("PGPASSWORD", password.unwrap_or(from_file.trim()))
        .env("LC_MESSAGES", "C")
        .env_remove("LC_ALL")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn stderr(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "psql succeeded, expected a failure"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Polls a query until it returns `want` (replay on a standby is asynchronous even
/// when the commit waited for the standby's flush).
fn wait_for(cluster: &Cluster, dbname: &str, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = cluster.psql(dbname, sql).unwrap();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {got:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn primary_admits_the_app_role_over_tls_only() {
    let started = Instant::now();
    let cluster = Cluster::start().unwrap();
    eprintln!("primary started in {:?}", started.elapsed());

    assert_eq!(cluster.psql("postgres", "SELECT 1 + 1").unwrap(), "2");
    assert_eq!(
        cluster
            .psql(
                "postgres",
                "SHOW fsync; SHOW ssl; SHOW wal_level; SHOW data_checksums"
            )
            .unwrap(),
        "on\non\nreplica\non"
    );
    let sql_error = cluster.psql("postgres", "SELECT nonsense").unwrap_err();
    assert!(sql_error.to_string().contains("nonsense"), "{sql_error}");

    let mode = std::fs::metadata(cluster.password_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "password file mode {mode:o}");
    assert!(
        std::fs::read_to_string(cluster.password_file())
            .unwrap()
            .trim()
            .len()
            >= 24
    );
    assert_eq!(
        cluster.conninfo(),
        format!(
            "host=127.0.0.1 port={} user=vault dbname=tokenvault",
            cluster.port()
        )
    );

    // TLS, with the server certificate checked against the CA and 127.0.0.1.
    let out = app_psql(
        &cluster,
        "tokenvault",
        "verify-full",
        None,
        "SELECT current_user || ' ' || ssl || ' ' || version \
         FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    let line = stdout(&out);
    assert!(line.starts_with("vault true TLSv1."), "{line}");

    // No TLS: no pg_hba.conf line lets the app role in.
    let refused = stderr(&app_psql(
        &cluster,
        "tokenvault",
        "disable",
        None,
        "SELECT 1",
    ));
    assert!(
        refused.contains("no pg_hba.conf entry") && refused.contains("no encryption"),
        "{refused}"
    );
    // TLS with the wrong password.
    let refused = stderr(&app_psql(
        &cluster,
        "tokenvault",
        "verify-full",
        Some("not-the-password"),
        "SELECT 1",
    ));
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );

    // A database per test, owned by the app role.
    cluster.create_database("one_test").unwrap();
    let out = app_psql(
        &cluster,
        "one_test",
        "verify-full",
        None,
        "CREATE TABLE t (id int); INSERT INTO t VALUES (7); SELECT id FROM t",
    );
    assert_eq!(stdout(&out), "7");
    assert!(matches!(
        cluster.create_database("Bad-Name"),
        Err(Error::InvalidName(_))
    ));
    let taken = cluster.create_database("one_test").unwrap_err().to_string();
    assert!(taken.contains("already exists"), "{taken}");
    eprintln!("test done in {:?}", started.elapsed());
}

#[test]
fn synchronous_standby_takes_over_after_the_primary_crashes() {
    let started = Instant::now();
    let mut primary = Cluster::start().unwrap();
    let standby = primary.start_standby(true).unwrap();
    eprintln!(
        "primary and sync standby started in {:?}",
        started.elapsed()
    );
    assert_ne!(primary.port(), standby.port());

    let state = primary
        .psql(
            "postgres",
            "SELECT state || ' ' || sync_state FROM pg_stat_replication",
        )
        .unwrap();
    assert_eq!(state, "streaming sync");

    // The app role's table (the superuser's would be out of its reach).
    stdout(&app_psql(
        &primary,
        "tokenvault",
        "verify-full",
        None,
        "CREATE TABLE cards (id int PRIMARY KEY, token text NOT NULL);
         INSERT INTO cards SELECT g, 'tok_' || g FROM generate_series(1, 100) g;",
    ));
    wait_for(&standby, "tokenvault", "SELECT count(*) FROM cards", "100");
    assert_eq!(
        standby
            .psql("postgres", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
    // The app role reads from the standby too, over TLS.
    let out = app_psql(
        &standby,
        "tokenvault",
        "verify-full",
        None,
        "SELECT token FROM cards WHERE id = 42",
    );
    assert_eq!(stdout(&out), "tok_42");

    // Commits that returned on the primary survive its crash: they were flushed on the
    // standby.
    primary
        .psql(
            "tokenvault",
            "INSERT INTO cards SELECT g, 'tok_' || g FROM generate_series(101, 150) g",
        )
        .unwrap();
    primary.stop_immediate().unwrap();
    let promoting = Instant::now();
    standby.promote().unwrap();
    eprintln!("promoted in {:?}", promoting.elapsed());
    assert_eq!(
        standby
            .psql("tokenvault", "SELECT count(*) FROM cards")
            .unwrap(),
        "150"
    );
    let out = app_psql(
        &standby,
        "tokenvault",
        "verify-full",
        None,
        "INSERT INTO cards VALUES (151, 'tok_151'); SELECT count(*) FROM cards",
    );
    assert_eq!(stdout(&out), "151");
    eprintln!("test done in {:?}", started.elapsed());
}

#[test]
fn restart_after_a_crash_keeps_committed_data() {
    let started = Instant::now();
    let mut cluster = Cluster::start().unwrap();
    let port = cluster.port();
    stdout(&app_psql(
        &cluster,
        "tokenvault",
        "verify-full",
        None,
        "CREATE TABLE cards (id int PRIMARY KEY);
         INSERT INTO cards SELECT generate_series(1, 1000);",
    ));
    cluster.stop_immediate().unwrap();
    // Down: nothing answers.
    assert!(cluster.psql("postgres", "SELECT 1").is_err());

    let restarting = Instant::now();
    cluster.restart().unwrap();
    eprintln!("restarted (crash recovery) in {:?}", restarting.elapsed());
    assert_eq!(cluster.port(), port);
    assert_eq!(
        cluster
            .psql("tokenvault", "SELECT count(*) FROM cards")
            .unwrap(),
        "1000"
    );
    let out = app_psql(
        &cluster,
        "tokenvault",
        "verify-full",
        None,
        "INSERT INTO cards VALUES (1001); SELECT max(id) FROM cards",
    );
    assert_eq!(stdout(&out), "1001");
    eprintln!("test done in {:?}", started.elapsed());
}

#[test]
fn synchronous_commit_waits_for_the_standby() {
    let started = Instant::now();
    let primary = Cluster::start().unwrap();
    let sync = primary.start_standby(true).unwrap();
    // Made after `sync`: its copy of the primary's configuration names `sync` as the
    // synchronous standby, which must not follow it.
    let other = primary.start_standby(false).unwrap();
    eprintln!(
        "primary and two standbys started in {:?}",
        started.elapsed()
    );
    assert_eq!(
        primary
            .psql(
                "postgres",
                "SELECT string_agg(sync_state, ' ' ORDER BY sync_state) FROM pg_stat_replication"
            )
            .unwrap(),
        "async sync"
    );
    primary
        .psql("tokenvault", "CREATE TABLE t (id int)")
        .unwrap();
    // The app role owns the database, and can write a table there.
    stdout(&app_psql(
        &primary,
        "tokenvault",
        "verify-full",
        None,
        "CREATE TABLE mine (id int); INSERT INTO mine VALUES (1)",
    ));

    // Without the synchronous standby, a commit does not return (statement_timeout does
    // not apply to the wait: it ends before the commit), until it is cancelled; then it
    // stays committed here only, with a warning.
    drop(sync);
    let commit = {
        let conninfo = format!(
            "{} sslmode=verify-full sslrootcert={}",
            primary.conninfo(),
            primary.ca_file().display()
        );
        let password = std::fs::read_to_string(primary.password_file()).unwrap();
        Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-d", &conninfo])
            .args(["-c", "INSERT INTO mine VALUES (2)"])
            .env("PGPASSWORD", password.trim())
            .env("LC_MESSAGES", "C")
            .env_remove("LC_ALL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";
    wait_for(&primary, "postgres", waiting, "1");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(primary.psql("postgres", waiting).unwrap(), "1");
    primary
        .psql(
            "postgres",
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        )
        .unwrap();
    let out = commit.wait_with_output().unwrap();
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("canceling wait for synchronous replication"),
        "{warning}"
    );

    // The asynchronous standby, promoted, does not wait for anyone.
    assert_eq!(
        other
            .psql("postgres", "SHOW synchronous_standby_names")
            .unwrap(),
        ""
    );
    other.promote().unwrap();
    stdout(&app_psql(
        &other,
        "tokenvault",
        "verify-full",
        None,
        "SET statement_timeout = '10s'; INSERT INTO mine VALUES (3)",
    ));
    eprintln!("test done in {:?}", started.elapsed());
}

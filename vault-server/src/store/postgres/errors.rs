//! PostgreSQL errors as the store reports them.

use tokio_postgres::error::SqlState;

use crate::store::StoreError;

/// Why no host gave a connection: what each one did.
#[derive(Debug)]
pub(super) struct ConnectError(pub(super) String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

impl From<ConnectError> for StoreError {
    fn from(e: ConnectError) -> Self {
        StoreError::Unavailable(e.0)
    }
}

/// A PostgreSQL error as the store reports it: the SQLSTATE and message only (a
/// message's DETAIL can quote the values of a row).
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("database error {}: {}", db.code().code(), db.message()),
        None => format!("database connection: {e}"),
    }
}

pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    let message = describe(&e);
    let Some(db) = e.as_db_error() else {
        // No server answer: the connection broke or could not be opened.
        return StoreError::Unavailable(message);
    };
    let code = db.code();
    if *code == SqlState::DISK_FULL {
        StoreError::NoSpace(message)
    } else if code.code().starts_with("08")
        || code.code().starts_with("57P")
        || code.code().starts_with("28")
        || code.code().starts_with("53")
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        || *code == SqlState::QUERY_CANCELED
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::INVALID_CATALOG_NAME
        || *code == SqlState::INSUFFICIENT_PRIVILEGE
    {
        // Connection trouble, shutdown, failover in progress, a host that is now a
        // standby, the server out of resources (connections, memory, lock table), a
        // lock wait or commit that timed out, or the role refused: nothing was done;
        // another try may succeed once the operator or the database has acted.
        StoreError::Unavailable(message)
    } else {
        StoreError::Engine(message)
    }
}

pub(super) fn pool_error(e: deadpool::managed::PoolError<ConnectError>) -> StoreError {
    match e {
        deadpool::managed::PoolError::Closed => StoreError::Closed,
        deadpool::managed::PoolError::Backend(e) => e.into(),
        other => StoreError::Unavailable(format!("database connection: {other}")),
    }
}

//! Commit lanes: at most one commit per lane that the database has not answered for.

use std::sync::Arc;
use std::time::Duration;

use super::connect::Object;
use super::errors::describe;
use crate::store::StoreError;

/// A commit path (one per writer, one for the audit log) with at most one commit the
/// database has not answered for.
///
/// A commit not confirmed in time may still be waiting for the synchronous standby,
/// its server process with it, and cancelling or ending that process would make the
/// commit visible before the standby has it. So its connection is kept until the
/// database answers for it, and meanwhile the lane starts no other commit: a long
/// standby outage holds one server process per lane, not one more for every call that
/// timed out (which would end in `max_connections` refusing everyone).
#[derive(Debug, Clone)]
pub(super) struct CommitLane {
    free: Arc<tokio::sync::Mutex<()>>,
    /// See `PostgresSettings::commit_timeout_ms`.
    pub(super) timeout: Duration,
}

/// The lane taken, for one commit: freed when dropped.
pub(super) struct InFlight {
    _taken: tokio::sync::OwnedMutexGuard<()>,
}

impl CommitLane {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            free: Arc::default(),
            timeout,
        }
    }

    /// Waits, within the commit timeout, for the lane's unanswered commit (if any).
    pub(super) async fn enter(&self) -> Result<InFlight, StoreError> {
        match tokio::time::timeout(self.timeout, Arc::clone(&self.free).lock_owned()).await {
            Ok(taken) => Ok(InFlight { _taken: taken }),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the database has not answered for an earlier commit in {} s (is the \
                 synchronous standby answering?)",
                self.timeout.as_secs_f64()
            ))),
        }
    }

    /// The error for a commit not confirmed in time, `what` naming it.
    pub(super) fn timed_out(&self, what: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "the database did not confirm {what} within {} s (is the synchronous standby \
             answering?)",
            self.timeout.as_secs_f64()
        ))
    }
}

impl InFlight {
    /// Keeps `client`, whose commit timed out, until the database answers for it, then
    /// closes it and frees the lane. The rollback queues behind whatever the
    /// connection was doing: it answers once that has, and ends a transaction whose
    /// COMMIT was never sent.
    pub(super) fn keep_until_answered(self, client: Object) {
        let client = Object::take(client);
        tokio::spawn(async move {
            match client.batch_execute("ROLLBACK").await {
                Ok(()) => tracing::info!("the database answered for a commit that had timed out"),
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "the connection of a commit that had timed out ended")
                }
            }
            drop(client);
            drop(self);
        });
    }
}

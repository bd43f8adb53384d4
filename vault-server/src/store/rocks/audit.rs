//! The audit log: a database of its own, with its own writer thread (so that its
//! syncs overlap the data's); appends take turns, each chaining onto the last entry.

use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::writer::MAX_GROUP;
use super::{RocksStore, classify, engine};
use crate::store::{AuditSeal, StoreError};

/// Audit entries to append (key, entry), and where to answer once they are durable.
pub(super) type AuditAppend = (
    Vec<(Vec<u8>, Vec<u8>)>,
    oneshot::Sender<Result<(), StoreError>>,
);

impl RocksStore {
    /// See `Store::append_audit`.
    pub(super) async fn append_to_audit_log(
        &self,
        seal: AuditSeal,
    ) -> Result<Vec<u64>, StoreError> {
        // One process owns this log (RocksDB's lock), and appends here one at a time:
        // the last entry read is still the last when the batch lands.
        let _one_at_a_time = self.audit_append.lock().await;
        let entries = seal(self.last_in_audit_log()?).entries;
        let sequences = entries.iter().map(|(sequence, _)| *sequence).collect();
        let entries = entries
            .into_iter()
            .map(|(sequence, entry)| (sequence.to_be_bytes().to_vec(), entry))
            .collect();
        let queue = self.audit_queue.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .send((entries, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)??;
        Ok(sequences)
    }

    /// See `Store::read_audit`.
    pub(super) fn read_audit_log(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut iter = self.audit_db.raw_iterator();
        iter.seek(after.saturating_add(1).to_be_bytes());
        let mut entries = Vec::new();
        while entries.len() < limit {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let sequence =
                u64::from_be_bytes(key.try_into().map_err(|_| {
                    StoreError::Engine("an audit key is not a sequence number".into())
                })?);
            if sequence > after {
                entries.push((sequence, value.to_vec()));
            }
            iter.next();
        }
        iter.status().map_err(engine)?;
        Ok(entries)
    }

    /// See `Store::last_audit`.
    pub(super) fn last_in_audit_log(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut iter = self.audit_db.raw_iterator();
        iter.seek_to_last();
        iter.status().map_err(engine)?;
        match (iter.key(), iter.value()) {
            (Some(key), Some(value)) => {
                let sequence = u64::from_be_bytes(key.try_into().map_err(|_| {
                    StoreError::Engine("an audit key is not a sequence number".into())
                })?);
                Ok(Some((sequence, value.to_vec())))
            }
            _ => Ok(None),
        }
    }
}

/// The audit database's writer: everything queued is one synced batch.
pub(super) fn write_audit(db: &DB, mut receiver: mpsc::Receiver<AuditAppend>) {
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    while let Some(first) = receiver.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(append) => group.push(append),
                Err(_) => break,
            }
        }
        let mut batch = WriteBatch::default();
        let mut replies = Vec::with_capacity(group.len());
        for (entries, reply) in group {
            for (key, value) in entries {
                batch.put(key, value);
            }
            replies.push(reply);
        }
        let written = db.write_opt(batch, &sync).map_err(|e| e.into_string());
        for reply in replies {
            let _ = reply.send(written.clone().map_err(classify));
        }
    }
}

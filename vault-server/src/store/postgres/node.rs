//! The node name: a session lock that keeps two vaults from running under one name.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Health;
use super::connect::{Connector, HeldLock};
use super::locks::index_lock;
use crate::store::StoreError;

/// Takes the node name for this process, so that two vaults configured with one name
/// (which would share count slots and a usage-report instance, and could let a key
/// version be destroyed under the other's records) cannot both run. A vault restarted
/// in place may find its predecessor's session still closing: it waits a little.
pub(super) async fn hold_node_name(
    connect: &Connector,
    node: &str,
    wait: Duration,
    health: Arc<Health>,
) -> Result<oneshot::Sender<()>, StoreError> {
    let key = index_lock(format!("node/{node}").as_bytes());
    let deadline = tokio::time::Instant::now() + wait;
    let (held, lost) = loop {
        if let Some(held) = connect.session_lock(key).await? {
            break held;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Engine(format!(
                "another vault-server runs as node {node:?} on this database: give each vault \
                 its own storage.postgres.node_name"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (closed, on_close) = oneshot::channel();
    tokio::spawn(keep_node_name(
        connect.clone(),
        node.to_owned(),
        key,
        (held, lost),
        on_close,
        health,
    ));
    Ok(closed)
}

/// Holds the node name until the store is dropped (`on_close`), taking it back when
/// its connection breaks (a database restart, a failover). While it is not held the
/// store's health says so: another vault could start under the name.
async fn keep_node_name(
    connect: Connector,
    node: String,
    key: i64,
    held: (HeldLock, oneshot::Receiver<()>),
    mut on_close: oneshot::Receiver<()>,
    health: Arc<Health>,
) {
    let (mut _lock, mut lost) = held;
    loop {
        tokio::select! {
            _ = &mut on_close => return,
            _ = &mut lost => {}
        }
        health.node_lost.store(true, Ordering::Relaxed);
        tracing::warn!(node = %node, "this vault's hold on its node name was lost with its connection; taking it back");
        loop {
            tokio::select! {
                _ = &mut on_close => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match connect.session_lock(key).await {
                Ok(Some((again, now_lost))) => {
                    (_lock, lost) = (again, now_lost);
                    health.node_lost.store(false, Ordering::Relaxed);
                    tracing::info!(node = %node, "this vault holds its node name again");
                    break;
                }
                Ok(None) => {
                    tracing::error!(node = %node, "another vault-server took this vault's node name: give each vault its own storage.postgres.node_name")
                }
                Err(e) => tracing::debug!(error = %e, "node name not taken back yet"),
            }
        }
    }
}

//! Shutdown: Ctrl-C or SIGTERM from the process, or a test dropping a sender.

use tokio::sync::watch;

/// A shutdown signal that servers select on. Cloneable; fires once for everyone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers the paired [`Shutdown`]. Dropping it triggers shutdown too.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl Shutdown {
    /// Resolves when shutdown is triggered or the trigger is dropped.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// A shutdown that fires on Ctrl-C or SIGTERM.
    pub fn on_signals() -> Self {
        let (trigger, shutdown) = channel();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received, stopping");
            trigger.trigger();
        });
        shutdown
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

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

    /// A shutdown that fires on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed
    /// before this returns, so a signal that arrives right after start-up is a clean
    /// stop rather than the default kill. Must be called within a tokio runtime.
    pub fn on_signals() -> Self {
        let (trigger, shutdown) = channel();
        let signalled = signal_received();
        tokio::spawn(async move {
            signalled.await;
            tracing::info!("shutdown signal received, stopping");
            trigger.trigger();
        });
        shutdown
    }
}

/// Installs the signal handlers now and returns a future that resolves on the first
/// signal.
fn signal_received() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut interrupt)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            return Box::pin(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            });
        }
    }
    Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

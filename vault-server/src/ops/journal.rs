//! Where the use cases record what they did: the audit log (durable before the caller
//! is answered) and the counters on `/metrics`.

use std::sync::Arc;

use runtime::now_unix_ms;

use crate::audit::{AuditEvent, Auditor, Ride};
use crate::error::VaultError;
use crate::metrics::Metrics;
use crate::policy::Caller;
use crate::store::Riding;
use crate::token::Token;

#[derive(Debug)]
pub struct Journal {
    /// `None` only when `[audit] enabled = false` (for measuring its cost).
    auditor: Option<Auditor>,
    metrics: Arc<Metrics>,
}

impl Journal {
    pub fn new(auditor: Option<Auditor>, metrics: Arc<Metrics>) -> Self {
        Self { auditor, metrics }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The audit log's writer, for events recorded after the caller has gone.
    pub fn auditor(&self) -> Option<Auditor> {
        self.auditor.clone()
    }

    /// Writes an audit event durably (a no-op only when auditing is disabled).
    pub async fn audit(&self, event: AuditEvent) -> Result<(), VaultError> {
        match &self.auditor {
            Some(auditor) => {
                auditor.record(event).await.map_err(VaultError::Audit)?;
                self.metrics.event("audit");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The caller's event to ride the write that finishes its call (see
    /// `Auditor::riding`); none when auditing is off or the call has no event.
    pub fn riding<O: ?Sized>(
        &self,
        caller: &Caller,
        finish: impl Fn(&O, &mut AuditEvent) -> bool + Send + Sync + 'static,
    ) -> Option<(Riding<O>, Ride)> {
        let auditor = self.auditor.as_ref()?;
        Some(auditor.riding(caller.event.as_ref()?, finish))
    }

    /// Settles a ride once its write is durable (see `Auditor::settle`).
    pub fn settle(&self, ride: Option<Ride>) {
        if let (Some(auditor), Some(ride)) = (&self.auditor, ride)
            && auditor.settle(ride)
        {
            self.metrics.event("audit");
        }
    }

    /// Records, durably and before the fact, that `caller` is about to do something
    /// that cannot be undone (send a card, delete a record): if the record cannot be
    /// written, nothing is done.
    pub async fn intent(
        &self,
        caller: &Caller,
        action: &str,
        token: &Token,
        processor: &str,
        reason: &str,
    ) -> Result<(), VaultError> {
        self.audit(AuditEvent {
            at_unix_ms: now_unix_ms(),
            actor: caller.identity.clone(),
            peer: "-".into(),
            action: action.into(),
            tenant: caller.tenant.as_str().to_owned(),
            token: token.as_str().to_owned(),
            processor: processor.to_owned(),
            reason: reason.to_owned(),
            outcome: "started".into(),
            request_id: caller.request_id.clone(),
            ..AuditEvent::default()
        })
        .await
    }
}

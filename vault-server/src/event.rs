//! What the audit log records of a call: the event (`AuditEvent`), and the call's
//! event as its envelope makes it before the handler runs (`CallEvent`), which the
//! write that finishes the call may carry. Apart from `audit` so that `policy` (whose
//! `Caller` holds a `CallEvent`) does not depend on the log's machinery.

use serde::{Deserialize, Serialize};

/// One audited event, as stored (JSON). Fields that do not apply stay empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub sequence: u64,
    pub at_unix_ms: i64,
    pub actor: String,
    pub peer: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub count: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub processor: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_version: u32,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// A forward's access reason (checked: no card-number-like digits).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Set on the first entry after a gap (entries missing below it): the hex chain
    /// value of the head it follows, which its MAC is computed over in place of the
    /// missing entry's. `verify` checks it, reports the gap, and goes on after it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chained_on: String,
}

/// A batch call's detail: how many of its cards have a token.
pub fn stored_detail(stored: usize) -> String {
    format!("{stored} stored")
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl AuditEvent {
    /// Copies the fields `self` has into `event`.
    pub fn merge_into(self, event: &mut AuditEvent) {
        if !self.token.is_empty() {
            event.token = self.token;
        }
        if !self.processor.is_empty() {
            event.processor = self.processor;
        }
        if self.count != 0 {
            event.count = self.count;
        }
        if !self.detail.is_empty() {
            event.detail = self.detail;
        }
        if !self.reason.is_empty() {
            event.reason = self.reason;
        }
    }
}

/// A call's audit event, made by the call's envelope before its handler runs, as it
/// reads if the call succeeds: the handler's durable write may carry it (see
/// [`Auditor::riding`]), and the envelope then writes no other.
#[derive(Debug)]
pub struct CallEvent {
    pub succeeded: AuditEvent,
    written: std::sync::atomic::AtomicBool,
}

impl PartialEq for CallEvent {
    fn eq(&self, other: &Self) -> bool {
        self.succeeded == other.succeeded && self.written() == other.written()
    }
}

impl Eq for CallEvent {}

impl CallEvent {
    pub fn new(succeeded: AuditEvent) -> Self {
        Self {
            succeeded,
            written: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a write of the call carried the event (it is durable).
    pub fn written(&self) -> bool {
        self.written.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The event of the call cancelled by its caller (it went away mid-call): what
    /// the request named goes into an event only if the call succeeds.
    pub fn cancelled(&self) -> AuditEvent {
        AuditEvent {
            outcome: "CANCELLED".into(),
            token: String::new(),
            count: 0,
            processor: String::new(),
            key_version: 0,
            detail: String::new(),
            reason: String::new(),
            ..self.succeeded.clone()
        }
    }

    /// Marks the event written, by the durable write that carried it.
    pub(crate) fn carried(&self) {
        self.written
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

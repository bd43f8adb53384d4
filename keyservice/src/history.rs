//! The keyservice's audit trail of key operations: an append-only file of JSON lines,
//! each synced before the operation is answered. It holds who, what, when and the
//! outcome; never key material.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub sequence: u64,
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default)]
    pub version: u32,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// What a caller fills in; the history adds the sequence number and time.
#[derive(Debug, Clone, Default)]
pub struct NewEvent<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub purpose: Option<&'a str>,
    pub version: u32,
    pub outcome: String,
    pub detail: String,
}

#[derive(Debug)]
pub struct History {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: std::fs::File,
    next_sequence: u64,
}

impl History {
    /// Opens (or creates) the history file, mode 0600, and continues its numbering.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true).read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path)?;
        // A crash in the middle of an append leaves a partial last line: end it, so that
        // the next event starts on a line of its own (the partial one is skipped).
        let contents = std::fs::read(path)?;
        if contents.last().is_some_and(|b| *b != b'\n') {
            file.write_all(b"\n")?;
            file.sync_data()?;
        }
        let last = std::io::BufReader::new(std::fs::File::open(path)?)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str::<Event>(&line).ok())
            .map(|e| e.sequence)
            .max()
            .unwrap_or(0);
        Ok(Self {
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                file,
                next_sequence: last + 1,
            }),
        })
    }

    /// Appends one event and syncs it.
    pub fn append(&self, event: NewEvent<'_>, now_unix_ms: i64) -> std::io::Result<Event> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let event = Event {
            sequence: inner.next_sequence,
            at_unix_ms: now_unix_ms,
            actor: event.actor.to_owned(),
            action: event.action.to_owned(),
            purpose: event.purpose.map(str::to_owned),
            version: event.version,
            outcome: event.outcome,
            detail: event.detail,
        };
        let mut line = serde_json::to_vec(&event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        inner.file.write_all(&line)?;
        inner.file.sync_data()?;
        inner.next_sequence += 1;
        Ok(event)
    }

    /// The last `limit` events (all when 0), oldest first.
    pub fn read(&self, limit: usize) -> std::io::Result<Vec<Event>> {
        let _guard = self.inner.lock();
        let mut events: Vec<Event> = std::io::BufReader::new(std::fs::File::open(&self.path)?)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str(&line).ok())
            .collect();
        if limit > 0 && events.len() > limit {
            events.drain(..events.len() - limit);
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_across_reopen_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key-history.jsonl");
        let history = History::open(&path).unwrap();
        for action in ["rotate", "retire"] {
            history
                .append(
                    NewEvent {
                        actor: "spiffe://x/admin",
                        action,
                        purpose: Some("card-data"),
                        version: 2,
                        outcome: "ok".into(),
                        ..Default::default()
                    },
                    7,
                )
                .unwrap();
        }
        drop(history);
        let history = History::open(&path).unwrap();
        let third = history
            .append(
                NewEvent {
                    actor: "keyservice",
                    action: "rotate",
                    outcome: "ok".into(),
                    ..Default::default()
                },
                8,
            )
            .unwrap();
        assert_eq!(third.sequence, 3);
        let all = history.read(0).unwrap();
        assert_eq!(
            all.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(all[1].action, "retire");
        assert_eq!(history.read(1).unwrap(), vec![third]);
    }
}

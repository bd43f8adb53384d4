//! The keyservice's audit trail of key operations: an append-only file of JSON lines,
//! each synced before the operation is answered. It holds who, what, when and the
//! outcome; never key material.
//!
//! The lines are chained: each carries `mac` = HMAC-SHA256 (under the keyring's history
//! key, sealed with the keyring) of the previous line's `mac` and the event without its
//! own, so an edited, removed, inserted or reordered line is found by [`History::verify`]
//! (`vaultctl keys history --verify`). Lines written before the chain existed carry no
//! `mac` and are reported as such. Cutting lines off the end is not detected by the
//! chain alone.

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
    /// The chain value (hex); empty on lines from before the chain.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
}

impl Event {
    /// This event's chain value after `previous` (the line before's, raw).
    fn chain(&self, key: &envelope::SecretKey, previous: &[u8]) -> [u8; 32] {
        let unchained = Event {
            mac: String::new(),
            ..self.clone()
        };
        // Serializing plain strings and numbers cannot fail.
        let json = serde_json::to_vec(&unchained).unwrap_or_default();
        envelope::hmac_sha256(key, &[b"tokenvault.key-history.v1", previous, &json])
    }
}

/// What [`History::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Events read.
    pub events: u64,
    /// Events before the chain began (no `mac`: written by an older keyservice).
    pub unchained: u64,
    /// The sequence number of the first event that does not follow the one before.
    pub broken_at: Option<u64>,
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
    key: envelope::SecretKey,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: std::fs::File,
    next_sequence: u64,
    /// The last line's chain value (empty: none yet).
    last_mac: Vec<u8>,
}

impl History {
    /// Opens (or creates) the history file, mode 0600, and continues its numbering and
    /// its chain under `key`.
    pub fn open(path: &Path, key: envelope::SecretKey) -> std::io::Result<Self> {
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
            .max_by_key(|e| e.sequence);
        Ok(Self {
            path: path.to_owned(),
            key,
            inner: Mutex::new(Inner {
                file,
                next_sequence: last.as_ref().map_or(0, |e| e.sequence) + 1,
                last_mac: last
                    .and_then(|e| hex::decode(e.mac).ok())
                    .unwrap_or_default(),
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
            mac: String::new(),
        };
        let mac = event.chain(&self.key, &inner.last_mac);
        let event = Event {
            mac: hex::encode(mac),
            ..event
        };
        let mut line = serde_json::to_vec(&event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        inner.file.write_all(&line)?;
        inner.file.sync_data()?;
        inner.next_sequence += 1;
        inner.last_mac = mac.to_vec();
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

    /// Checks the chain from the first line. A line that does not parse (a crash in
    /// the middle of an append leaves one) is skipped; the next line then still has to
    /// follow the last good one.
    pub fn verify(&self) -> std::io::Result<Verification> {
        let _guard = self.inner.lock();
        let mut found = Verification {
            events: 0,
            unchained: 0,
            broken_at: None,
        };
        let mut previous: Option<Vec<u8>> = None;
        let lines = std::io::BufReader::new(std::fs::File::open(&self.path)?).lines();
        for line in lines.map_while(Result::ok) {
            let Ok(event) = serde_json::from_str::<Event>(&line) else {
                continue;
            };
            found.events += 1;
            if event.mac.is_empty() && previous.is_none() {
                found.unchained += 1;
                continue;
            }
            let expected = event.chain(&self.key, previous.as_deref().unwrap_or_default());
            if hex::decode(&event.mac).ok().as_deref() != Some(&expected[..]) {
                found.broken_at = Some(event.sequence);
                break;
            }
            previous = Some(expected.to_vec());
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same key every time (the keyring keeps one).
    fn key() -> envelope::SecretKey {
        envelope::SecretKey::from_slice(&[7; 32]).unwrap()
    }

    fn event(action: &str) -> NewEvent<'_> {
        NewEvent {
            actor: "spiffe://x/admin",
            action,
            outcome: "ok".into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_edit_removal_insertion_or_reordering_breaks_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key-history.jsonl");
        // Two lines from before the chain, as an older keyservice wrote them.
        std::fs::write(
            &path,
            "{\"sequence\":1,\"at_unix_ms\":1,\"actor\":\"a\",\"action\":\"rotate\",\"version\":0,\"outcome\":\"ok\"}\n\
             {\"sequence\":2,\"at_unix_ms\":2,\"actor\":\"a\",\"action\":\"rotate\",\"version\":0,\"outcome\":\"ok\"}\n",
        )
        .unwrap();
        let history = History::open(&path, key()).unwrap();
        for action in ["rotate", "propose", "approve", "destroy"] {
            history.append(event(action), 9).unwrap();
        }
        drop(history);
        let check = |lines: &[String]| {
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            History::open(&path, key()).unwrap().verify().unwrap()
        };
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            check(&lines),
            Verification {
                events: 6,
                unchained: 2,
                broken_at: None
            }
        );
        let mut edited = lines.clone();
        edited[4] = edited[4].replace("\"ok\"", "\"refused\"");
        assert_eq!(check(&edited).broken_at, Some(5));
        let mut removed = lines.clone();
        removed.remove(3);
        assert_eq!(check(&removed).broken_at, Some(5));
        let mut reordered = lines.clone();
        reordered.swap(3, 4);
        assert_eq!(check(&reordered).broken_at, Some(5));
        let mut inserted = lines.clone();
        inserted.insert(
            3,
            "{\"sequence\":9,\"at_unix_ms\":1,\"actor\":\"a\",\"action\":\"x\",\"version\":0,\"outcome\":\"ok\"}".into(),
        );
        assert_eq!(check(&inserted).broken_at, Some(9));
        // Another key (another keyring) does not verify it either.
        check(&lines);
        let other = envelope::SecretKey::from_slice(&[8; 32]).unwrap();
        assert_eq!(
            History::open(&path, other)
                .unwrap()
                .verify()
                .unwrap()
                .broken_at,
            Some(3)
        );
        // The chain goes on across a reopen.
        let history = History::open(&path, key()).unwrap();
        history.append(event("rotate"), 10).unwrap();
        assert_eq!(history.verify().unwrap().broken_at, None);
    }

    #[test]
    fn events_are_numbered_across_reopen_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key-history.jsonl");
        let history = History::open(&path, key()).unwrap();
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
        let history = History::open(&path, key()).unwrap();
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

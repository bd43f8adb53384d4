//! The vaults' audit checkpoints, kept off the vaults' hosts: for each vault (its
//! certificate identity and configured node name), the highest audit-log head it has
//! reported, as a sequence number and the chain value of that entry. A vault's `audit
//! verify` checks its log against its checkpoint, so a log deleted, cut short or
//! restored from an older copy on the vault's host is reported even though the host
//! holds nothing that says so.
//!
//! It also keeps the gaps in a vault's log that two admins acknowledged (an approved
//! `audit-gap` proposal): `audit verify` lists them instead of failing on them.
//!
//! One JSON file, replaced whole (written, synced, renamed) at each change: vaults
//! report at most once a second, which would flood the key history. A checkpoint never
//! moves back.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub identity: String,
    pub node: String,
    pub sequence: u64,
    /// Hex of the chain value (the entry's MAC).
    pub chain: String,
    pub at_unix_ms: i64,
}

/// A gap in a vault's audit log, acknowledged under dual control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledgement {
    pub identity: String,
    pub node: String,
    pub first: u64,
    pub last: u64,
    pub proposed_by: String,
    pub approved_by: String,
    pub approved_at_unix_ms: i64,
}

#[derive(Debug)]
pub struct Checkpoints {
    path: PathBuf,
    kept: Mutex<Kept>,
}

/// A gap a vault found in its own log: entries `first..=last` missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundGap {
    pub identity: String,
    pub node: String,
    pub first: u64,
    pub last: u64,
}

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    checkpoints: Vec<Checkpoint>,
    acknowledged_gaps: Vec<Acknowledgement>,
    #[serde(default)]
    found_gaps: Vec<FoundGap>,
}

#[derive(Debug, Default)]
struct Kept {
    checkpoints: BTreeMap<(String, String), Checkpoint>,
    acknowledged: Vec<Acknowledgement>,
    found: Vec<FoundGap>,
}

/// Most node names kept per vault identity, and most gaps kept per node: a vault's
/// certificate must not be able to grow this file (and every save) without bound.
pub const MAX_NODES_PER_IDENTITY: usize = 64;
pub const MAX_GAPS_PER_NODE: usize = 64;

/// What a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// The checkpoint moved forward (or was the first).
    Moved,
    /// Equal to the one kept.
    Same,
    /// Lower than the one kept, or a different chain value at the same sequence: kept
    /// as it was.
    Behind,
    /// A new node name for an identity that has the most already: not kept.
    TooMany,
}

impl Checkpoints {
    /// Reads the file if it exists (mode 0600 when written).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file: File = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(e),
        };
        let checkpoints = file
            .checkpoints
            .into_iter()
            .map(|c| ((c.identity.clone(), c.node.clone()), c))
            .collect();
        Ok(Self {
            path: path.to_owned(),
            kept: Mutex::new(Kept {
                checkpoints,
                acknowledged: file.acknowledged_gaps,
                found: file.found_gaps,
            }),
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The checkpoints of `identity`'s nodes other than `node`.
    pub fn others(&self, identity: &str, node: &str) -> Vec<Checkpoint> {
        self.kept()
            .checkpoints
            .values()
            .filter(|c| c.identity == identity && c.node != node)
            .cloned()
            .collect()
    }

    pub fn get(&self, identity: &str, node: &str) -> Option<Checkpoint> {
        self.kept()
            .checkpoints
            .get(&(identity.to_owned(), node.to_owned()))
            .cloned()
    }

    /// The gaps acknowledged in the log of `identity` at `node`.
    pub fn acknowledged(&self, identity: &str, node: &str) -> Vec<Acknowledgement> {
        self.kept()
            .acknowledged
            .iter()
            .filter(|a| a.identity == identity && a.node == node)
            .cloned()
            .collect()
    }

    /// The gaps `identity` at `node` reported finding in its log.
    pub fn found(&self, identity: &str, node: &str) -> Vec<FoundGap> {
        self.kept()
            .found
            .iter()
            .filter(|g| g.identity == identity && g.node == node)
            .cloned()
            .collect()
    }

    /// Keeps the gaps a vault reports finding (those not kept yet); durable before it
    /// returns. A found gap is never forgotten: an acknowledgement covers it.
    pub fn report_gaps(&self, gaps: Vec<FoundGap>) -> std::io::Result<()> {
        let mut kept = self.kept();
        let before = kept.found.len();
        for gap in gaps {
            let of_node = kept
                .found
                .iter()
                .filter(|g| g.identity == gap.identity && g.node == gap.node)
                .count();
            if of_node < MAX_GAPS_PER_NODE && !kept.found.contains(&gap) {
                kept.found.push(gap);
            }
        }
        if kept.found.len() == before {
            return Ok(());
        }
        if let Err(e) = self.save(&kept) {
            kept.found.truncate(before);
            return Err(e);
        }
        Ok(())
    }

    /// Keeps `checkpoint` if it is above the one kept; durable before it returns.
    pub fn report(&self, checkpoint: Checkpoint) -> std::io::Result<Reported> {
        let mut kept = self.kept();
        let key = (checkpoint.identity.clone(), checkpoint.node.clone());
        match kept.checkpoints.get(&key) {
            Some(old) if old.sequence > checkpoint.sequence => return Ok(Reported::Behind),
            Some(old) if old.sequence == checkpoint.sequence => {
                return Ok(if old.chain == checkpoint.chain {
                    Reported::Same
                } else {
                    Reported::Behind
                });
            }
            _ => {}
        }
        if !kept.checkpoints.contains_key(&key)
            && kept
                .checkpoints
                .keys()
                .filter(|(identity, _)| *identity == key.0)
                .count()
                >= MAX_NODES_PER_IDENTITY
        {
            return Ok(Reported::TooMany);
        }
        let previous = kept.checkpoints.insert(key.clone(), checkpoint);
        if let Err(e) = self.save(&kept) {
            // Not kept: the next report tries again.
            match previous {
                Some(previous) => kept.checkpoints.insert(key, previous),
                None => kept.checkpoints.remove(&key),
            };
            return Err(e);
        }
        Ok(Reported::Moved)
    }

    /// Records an acknowledged gap; durable before it returns. Only a gap the vault
    /// reported finding, exactly, can be acknowledged (`Ok(false)` otherwise): an
    /// acknowledgement wider than the gap would cover later cuts too.
    pub fn acknowledge(&self, acknowledgement: Acknowledgement) -> std::io::Result<bool> {
        let mut kept = self.kept();
        let reported = kept.found.iter().any(|gap| {
            (&gap.identity, &gap.node, gap.first, gap.last)
                == (
                    &acknowledgement.identity,
                    &acknowledgement.node,
                    acknowledgement.first,
                    acknowledgement.last,
                )
        });
        if !reported {
            return Ok(false);
        }
        kept.acknowledged.push(acknowledgement);
        if let Err(e) = self.save(&kept) {
            kept.acknowledged.pop();
            return Err(e);
        }
        Ok(true)
    }

    fn save(&self, kept: &Kept) -> std::io::Result<()> {
        let file = File {
            checkpoints: kept.checkpoints.values().cloned().collect(),
            acknowledged_gaps: kept.acknowledged.clone(),
            found_gaps: kept.found.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        let temporary = self.path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.create(true).write(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut written = options.open(&temporary)?;
        written.write_all(&bytes)?;
        written.sync_all()?;
        std::fs::rename(&temporary, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(node: &str, sequence: u64, chain: &str) -> Checkpoint {
        Checkpoint {
            identity: "vault".into(),
            node: node.into(),
            sequence,
            chain: chain.into(),
            at_unix_ms: 1,
        }
    }

    #[test]
    fn a_checkpoint_moves_forward_only_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit-checkpoints.json");
        let kept = Checkpoints::open(&path).unwrap();
        assert_eq!(
            kept.report(checkpoint("a:1", 5, "aa")).unwrap(),
            Reported::Moved
        );
        assert_eq!(
            kept.report(checkpoint("a:1", 5, "aa")).unwrap(),
            Reported::Same
        );
        assert_eq!(
            kept.report(checkpoint("a:1", 4, "bb")).unwrap(),
            Reported::Behind
        );
        assert_eq!(
            kept.report(checkpoint("a:1", 5, "cc")).unwrap(),
            Reported::Behind
        );
        assert_eq!(
            kept.report(checkpoint("b:1", 2, "dd")).unwrap(),
            Reported::Moved
        );
        let reopened = Checkpoints::open(&path).unwrap();
        assert_eq!(
            reopened.get("vault", "a:1"),
            Some(checkpoint("a:1", 5, "aa"))
        );
        assert_eq!(reopened.get("vault", "b:1").map(|c| c.sequence), Some(2));
        assert_eq!(reopened.get("other", "a:1"), None);

        let gap = Acknowledgement {
            identity: "vault".into(),
            node: "a:1".into(),
            first: 3,
            last: 4,
            proposed_by: "admin-a".into(),
            approved_by: "admin-b".into(),
            approved_at_unix_ms: 2,
        };
        // Only a gap the vault reported, exactly.
        assert!(!reopened.acknowledge(gap.clone()).unwrap());
        let found = FoundGap {
            identity: "vault".into(),
            node: "a:1".into(),
            first: 3,
            last: 4,
        };
        reopened
            .report_gaps(vec![found.clone(), found.clone()])
            .unwrap();
        reopened.report_gaps(vec![found.clone()]).unwrap();
        let wider = Acknowledgement {
            first: 1,
            last: 100,
            ..gap.clone()
        };
        assert!(!reopened.acknowledge(wider).unwrap());
        assert!(reopened.acknowledge(gap.clone()).unwrap());
        let again = Checkpoints::open(&path).unwrap();
        assert_eq!(again.found("vault", "a:1"), vec![found]);
        assert_eq!(again.acknowledged("vault", "a:1"), vec![gap]);
        assert!(again.acknowledged("vault", "b:1").is_empty());
        assert_eq!(again.get("vault", "a:1").map(|c| c.sequence), Some(5));
    }
}

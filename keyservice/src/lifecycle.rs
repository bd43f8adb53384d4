//! Key lifecycle rules, as plain functions over the keyring: rotation, retirement,
//! encryption budget leases, and dual-control proposals. No I/O here; the service
//! persists the keyring after every change and before it answers.

use crate::keyring::{
    KeyVersion, Keyring, OperationKind, Proposal, ProposalState, Purpose, State, TenantJob,
};

/// NIST SP 800-38D (8.3): at most 2^32 invocations of AES-GCM with random nonces per
/// key.
pub const GCM_LIMIT: u64 = 1 << 32;

/// Why an operation was refused. Messages name the rule and never hold key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{purpose} has no version {version}")]
    NoSuchVersion { purpose: &'static str, version: u32 },
    #[error("{purpose} version {version} is {state}; {rule}")]
    WrongState {
        purpose: &'static str,
        version: u32,
        state: &'static str,
        rule: &'static str,
    },
    #[error("{0} keys have no encryption budget (HMAC)")]
    NotAead(&'static str),
    #[error("no proposal {0}")]
    NoSuchProposal(String),
    #[error("{0}")]
    NoSuchGap(String),
    #[error("proposal {0} was already approved; an approval cannot be replayed")]
    AlreadyApproved(String),
    #[error("proposal {0} expired before it was approved; propose it again")]
    Expired(String),
    #[error("dual control: the proposer cannot approve their own proposal")]
    SelfApproval,
    #[error(
        "{purpose} version {version} is still used by {records} records; rewrap first \
         (a retirement can be forced by two admins: propose it with --force)"
    )]
    InUse {
        purpose: &'static str,
        version: u32,
        records: u64,
    },
    #[error("{0}")]
    UsageUnknown(String),
    #[error("a {kind} proposal for this version is already pending as {id}")]
    Duplicate { kind: &'static str, id: String },
    #[error(
        "retiring needs two admins: `vaultctl keys retire` proposes it and a second admin \
         approves it with `vaultctl keys approve`"
    )]
    DualControl,
    #[error(
        "this keyring (generation {ours}) is older than one a vault has used (generation \
         {seen}): the keyservice was restored from an older copy. Until two admins accept \
         the restore (`vaultctl keys accept-restore`, then `vaultctl keys approve`), which \
         rotates every purpose, no key is served and no budget leased"
    )]
    Restored { ours: u64, seen: u64 },
    #[error("nothing to accept: no vault has used a keyring generation above this one")]
    NotRestored,
    #[error(
        "proposal {0} is a tenant's job (import or export): it is approved through a vault \
         by a second identity with the tenant's `import` or `export` permission \
         (`vaultctl import approve`, `vaultctl export approve`)"
    )]
    TenantJob(String),
    #[error("proposal {0} is not an approved job of this tenant")]
    NotThisJob(String),
    #[error(
        "job {0} is not approved: a second identity with the tenant's permission must \
         approve it first"
    )]
    JobNotApproved(String),
    #[error(
        "job {0} was approved but not started within the approval window; an unused \
         approval lapses: propose the job again"
    )]
    ClaimExpired(String),
    #[error(
        "job {id} is already running on vault identity {by}: an approval is used by one \
         vault only"
    )]
    ClaimedElsewhere { id: String, by: String },
    #[error(
        "job {0} was started already: an approval is used once (an export runs once, even \
         if its file is gone); propose another job"
    )]
    AlreadyUsed(String),
    #[error(
        "import job {0} was proposed without the file's SHA-256 (by an older vault); \
         propose it again with the file"
    )]
    NoFileDigest(String),
    #[error(
        "job {0} is not running on this vault identity; only the vault that claimed it finishes it"
    )]
    NotClaimed(String),
}

pub fn state_name(state: State) -> &'static str {
    match state {
        State::Active => "active",
        State::DecryptOnly => "decrypt-only",
        State::Retired => "retired",
        State::Destroyed => "destroyed",
    }
}

pub fn kind_name(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::Destroy => "destroy",
        OperationKind::Unretire => "unretire",
        OperationKind::RootKeyChange => "root-key-change",
        OperationKind::AuditGap => "audit-gap",
        OperationKind::Retire => "retire",
        OperationKind::AcceptRestore => "accept-restore",
        OperationKind::Import => "import",
        OperationKind::Export => "export",
    }
}

impl Keyring {
    pub fn version(&self, purpose: Purpose, version: u32) -> Result<&KeyVersion, Refusal> {
        self.versions
            .iter()
            .find(|v| v.purpose == purpose && v.version == version)
            .ok_or(Refusal::NoSuchVersion {
                purpose: purpose.name(),
                version,
            })
    }

    fn version_mut(&mut self, purpose: Purpose, version: u32) -> Result<&mut KeyVersion, Refusal> {
        self.versions
            .iter_mut()
            .find(|v| v.purpose == purpose && v.version == version)
            .ok_or(Refusal::NoSuchVersion {
                purpose: purpose.name(),
                version,
            })
    }

    pub fn active(&self, purpose: Purpose) -> Option<&KeyVersion> {
        self.versions
            .iter()
            .find(|v| v.purpose == purpose && v.state == State::Active)
    }

    /// Creates a new active version of `purpose`; the previous active one becomes
    /// decrypt-only. Returns the new version number.
    pub fn rotate(&mut self, purpose: Purpose, now_unix_ms: i64) -> Result<u32, envelope::Error> {
        self.rotate_above(purpose, 0, now_unix_ms)
    }

    /// [`Keyring::rotate`] to a version number above `floor` too (after a restore, the
    /// numbers of versions the restored copy lacks must never be given to new keys).
    pub fn rotate_above(
        &mut self,
        purpose: Purpose,
        floor: u32,
        now_unix_ms: i64,
    ) -> Result<u32, envelope::Error> {
        let material = envelope::SecretKey::generate()?;
        let next = self
            .versions
            .iter()
            .filter(|v| v.purpose == purpose)
            .map(|v| v.version)
            .max()
            .unwrap_or(0)
            .max(floor)
            + 1;
        for v in &mut self.versions {
            if v.purpose == purpose && v.state == State::Active {
                v.state = State::DecryptOnly;
                v.deactivated_at_unix_ms = now_unix_ms;
            }
        }
        self.versions.push(KeyVersion {
            purpose,
            version: next,
            state: State::Active,
            created_at_unix_ms: now_unix_ms,
            encryptions_leased: 0,
            deactivated_at_unix_ms: 0,
            material: Some(material),
        });
        Ok(next)
    }

    /// Checks the version side of a retirement: a decrypt-only version (the active one
    /// must be rotated away first; a destroyed one has nothing left to retire), never an
    /// audit key. Record usage is checked by the caller, which holds the reports.
    pub fn check_retire(&self, purpose: Purpose, version: u32) -> Result<(), Refusal> {
        let v = self.version(purpose, version)?;
        if purpose == Purpose::Audit {
            return Err(wrong_state(
                v,
                "audit keys are never retired: the audit log is verified with them from its \
                 first entry (rotate instead)",
            ));
        }
        if v.state != State::DecryptOnly {
            return Err(wrong_state(v, "only a decrypt-only version can be retired"));
        }
        Ok(())
    }

    /// Makes a decrypt-only version unusable (approved under dual control).
    pub fn retire(&mut self, purpose: Purpose, version: u32) -> Result<(), Refusal> {
        self.check_retire(purpose, version)?;
        self.version_mut(purpose, version)?.state = State::Retired;
        Ok(())
    }

    /// Checks that an un-retire could be carried out now.
    pub fn check_unretire(&self, purpose: Purpose, version: u32) -> Result<(), Refusal> {
        let v = self.version(purpose, version)?;
        if v.state != State::Retired {
            return Err(wrong_state(v, "only a retired version can be un-retired"));
        }
        Ok(())
    }

    pub fn unretire(&mut self, purpose: Purpose, version: u32) -> Result<(), Refusal> {
        self.check_unretire(purpose, version)?;
        self.version_mut(purpose, version)?.state = State::DecryptOnly;
        Ok(())
    }

    /// Checks the version side of a destroy: it exists, is not active, and still has
    /// material. Record usage is checked by the caller, which holds the reports.
    pub fn check_destroy(&self, purpose: Purpose, version: u32) -> Result<(), Refusal> {
        let v = self.version(purpose, version)?;
        if purpose == Purpose::Audit {
            return Err(wrong_state(
                v,
                "audit keys are never destroyed: the audit log entries chained under them \
                 must stay verifiable",
            ));
        }
        match v.state {
            State::DecryptOnly | State::Retired => Ok(()),
            State::Active => Err(wrong_state(
                v,
                "rotate first: the active version cannot be destroyed",
            )),
            State::Destroyed => Err(wrong_state(v, "it is already destroyed")),
        }
    }

    /// Removes a version's material for good (zeroized on drop).
    pub fn destroy(&mut self, purpose: Purpose, version: u32) -> Result<(), Refusal> {
        self.check_destroy(purpose, version)?;
        let v = self.version_mut(purpose, version)?;
        v.state = State::Destroyed;
        v.material = None;
        Ok(())
    }

    /// Leases up to `lease_size` encryptions under the active version of an AES-GCM
    /// purpose. Rotates first when the active version's budget (`limit`) is spent.
    /// Returns the version, the encryptions granted and left, and whether a rotation
    /// happened.
    pub fn lease(
        &mut self,
        purpose: Purpose,
        limit: u64,
        lease_size: u64,
        now_unix_ms: i64,
    ) -> Result<Lease, LeaseError> {
        if !purpose.is_aead() {
            return Err(LeaseError::Refused(Refusal::NotAead(purpose.name())));
        }
        let mut rotated = false;
        let active = match self.active(purpose) {
            Some(v) if v.encryptions_leased < limit => v.version,
            _ => {
                rotated = true;
                self.rotate(purpose, now_unix_ms)
                    .map_err(|_| LeaseError::Random)?
            }
        };
        let v = self
            .version_mut(purpose, active)
            .map_err(LeaseError::Refused)?;
        let granted = lease_size.min(limit - v.encryptions_leased);
        v.encryptions_leased += granted;
        Ok(Lease {
            version: active,
            granted,
            remaining: limit - v.encryptions_leased,
            rotated,
        })
    }

    /// Purposes whose active version is older than `max_age_ms`.
    pub fn due_for_rotation(&self, now_unix_ms: i64, max_age_ms: i64) -> Vec<Purpose> {
        Purpose::ALL
            .into_iter()
            .filter(|p| {
                self.active(*p)
                    .is_some_and(|v| now_unix_ms.saturating_sub(v.created_at_unix_ms) >= max_age_ms)
            })
            .collect()
    }

    /// Records a new proposal after checking the operation makes sense now.
    pub fn propose(&mut self, proposal: Proposal) -> Result<Proposal, Refusal> {
        if let Some(purpose) = proposal.purpose() {
            match proposal.kind {
                OperationKind::Destroy => self.check_destroy(purpose, proposal.version)?,
                OperationKind::Retire => self.check_retire(purpose, proposal.version)?,
                OperationKind::AcceptRestore => {}
                OperationKind::Unretire => self.check_unretire(purpose, proposal.version)?,
                OperationKind::RootKeyChange
                | OperationKind::AuditGap
                | OperationKind::Import
                | OperationKind::Export => {}
            }
        }
        if let Some(open) = self.proposals.iter().find(|p| {
            p.state == ProposalState::Pending
                && !p.expired(proposal.proposed_at_unix_ms)
                && p.kind == proposal.kind
                && p.purpose == proposal.purpose
                && p.version == proposal.version
                && p.new_root_key_file == proposal.new_root_key_file
                && p.audit_gap == proposal.audit_gap
                && p.force == proposal.force
                && p.job == proposal.job
        }) {
            return Err(Refusal::Duplicate {
                kind: kind_name(proposal.kind),
                id: open.id.clone(),
            });
        }
        self.proposals.push(proposal.clone());
        Ok(proposal)
    }

    /// Checks that `approver` may approve proposal `id` now, and returns it. The caller
    /// carries out the operation and then calls [`Keyring::mark_approved`].
    pub fn check_approval(
        &self,
        id: &str,
        approver: &str,
        now_unix_ms: i64,
    ) -> Result<Proposal, Refusal> {
        let proposal = self
            .proposals
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(|| Refusal::NoSuchProposal(id.to_owned()))?;
        if proposal.state != ProposalState::Pending {
            return Err(Refusal::AlreadyApproved(id.to_owned()));
        }
        if proposal.expired(now_unix_ms) {
            return Err(Refusal::Expired(id.to_owned()));
        }
        if proposal.proposed_by == approver {
            return Err(Refusal::SelfApproval);
        }
        Ok(proposal.clone())
    }

    pub fn mark_approved(&mut self, id: &str, approver: &str, now_unix_ms: i64) {
        if let Some(p) = self.proposals.iter_mut().find(|p| p.id == id) {
            p.state = ProposalState::Approved;
            p.approved_by = Some(approver.to_owned());
            p.approved_at_unix_ms = now_unix_ms;
        }
    }

    /// [`Keyring::mark_approved`] for a tenant job, which must then be claimed within
    /// `window_ms`.
    pub fn mark_job_approved(
        &mut self,
        id: &str,
        approver: &str,
        now_unix_ms: i64,
        window_ms: i64,
    ) {
        self.mark_approved(id, approver, now_unix_ms);
        if let Some(job) = self.job_mut(id) {
            job.claim_by_unix_ms = now_unix_ms.saturating_add(window_ms);
        }
    }

    fn job_mut(&mut self, id: &str) -> Option<&mut TenantJob> {
        self.proposals
            .iter_mut()
            .find(|p| p.id == id)
            .and_then(|p| p.job.as_mut())
    }

    /// The tenant job `id` if it is of `tenant` and `kind`: anything else is
    /// [`Refusal::NotThisJob`] (NOT_FOUND), whether it exists or not.
    fn tenant_job(
        &self,
        id: &str,
        tenant: &str,
        kind: OperationKind,
    ) -> Result<&Proposal, Refusal> {
        self.proposals
            .iter()
            .find(|p| p.id == id)
            .filter(|p| {
                p.kind.is_tenant_job()
                    && p.kind == kind
                    && p.job.as_ref().is_some_and(|j| j.tenant == tenant)
            })
            .ok_or_else(|| Refusal::NotThisJob(id.to_owned()))
    }

    /// Claims tenant job `id` for vault identity `vault` (APPROVED -> RUNNING): the
    /// compare-and-set that makes an approval usable once. Refused unless the job is
    /// approved and its claim deadline has not passed (`window_ms` after approval for a
    /// job approved before deadlines were stored). An import RUNNING under `vault`
    /// itself may be claimed again (the vault lost its spool state; it can only take
    /// the approved file again); an export never. Returns whether the keyring changed
    /// (the caller saves it).
    pub fn claim_job(
        &mut self,
        id: &str,
        tenant: &str,
        kind: OperationKind,
        vault: &str,
        now_unix_ms: i64,
        window_ms: i64,
    ) -> Result<bool, Refusal> {
        let proposal = self.tenant_job(id, tenant, kind)?;
        let job = proposal
            .job
            .as_ref()
            .ok_or_else(|| Refusal::NotThisJob(id.to_owned()))?;
        match proposal.state {
            ProposalState::Pending => return Err(Refusal::JobNotApproved(id.to_owned())),
            ProposalState::Done => return Err(Refusal::AlreadyUsed(id.to_owned())),
            ProposalState::Running => {
                let by = job.claimed_by.clone().unwrap_or_default();
                if by != vault {
                    return Err(Refusal::ClaimedElsewhere {
                        id: id.to_owned(),
                        by,
                    });
                }
                return match kind {
                    OperationKind::Import => Ok(false),
                    _ => Err(Refusal::AlreadyUsed(id.to_owned())),
                };
            }
            ProposalState::Approved => {}
        }
        let deadline = match job.claim_by_unix_ms {
            0 => proposal.approved_at_unix_ms.saturating_add(window_ms),
            deadline => deadline,
        };
        if now_unix_ms >= deadline {
            return Err(Refusal::ClaimExpired(id.to_owned()));
        }
        if kind == OperationKind::Import && job.file_sha256.is_empty() {
            return Err(Refusal::NoFileDigest(id.to_owned()));
        }
        if let Some(p) = self.proposals.iter_mut().find(|p| p.id == id) {
            p.state = ProposalState::Running;
            if let Some(job) = p.job.as_mut() {
                job.claimed_by = Some(vault.to_owned());
                job.claimed_at_unix_ms = now_unix_ms;
            }
        }
        Ok(true)
    }

    /// Finishes tenant job `id` (RUNNING -> DONE), for the vault identity that claimed
    /// it only. Again for a job it finished already: nothing to do (`Ok(false)`).
    pub fn finish_job(
        &mut self,
        id: &str,
        tenant: &str,
        kind: OperationKind,
        vault: &str,
        now_unix_ms: i64,
    ) -> Result<bool, Refusal> {
        let proposal = self.tenant_job(id, tenant, kind)?;
        let ours = proposal
            .job
            .as_ref()
            .is_some_and(|j| j.claimed_by.as_deref() == Some(vault));
        match proposal.state {
            ProposalState::Running if ours => {}
            ProposalState::Done if ours => return Ok(false),
            _ => return Err(Refusal::NotClaimed(id.to_owned())),
        }
        if let Some(p) = self.proposals.iter_mut().find(|p| p.id == id) {
            p.state = ProposalState::Done;
            if let Some(job) = p.job.as_mut() {
                job.finished_at_unix_ms = now_unix_ms;
            }
        }
        Ok(true)
    }

    /// Forgets proposals that ended (approved, claimed, finished or expired) more than
    /// `keep_ms` ago.
    pub fn prune_proposals(&mut self, now_unix_ms: i64, keep_ms: i64) {
        self.proposals.retain(|p| {
            let job = p.job.as_ref();
            let ended = match p.state {
                ProposalState::Approved => p.approved_at_unix_ms,
                ProposalState::Running => {
                    job.map_or(p.approved_at_unix_ms, |j| j.claimed_at_unix_ms)
                }
                ProposalState::Done => job.map_or(p.approved_at_unix_ms, |j| j.finished_at_unix_ms),
                ProposalState::Pending => p.expires_at_unix_ms,
            };
            now_unix_ms.saturating_sub(ended) < keep_ms
        });
    }
}

/// A lease of encryptions under one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub version: u32,
    pub granted: u64,
    /// Still unleased under `version` afterwards.
    pub remaining: u64,
    /// The version's predecessor had spent its budget.
    pub rotated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Refused(Refusal),
    #[error("the system random number generator failed")]
    Random,
}

fn wrong_state(v: &KeyVersion, rule: &'static str) -> Refusal {
    Refusal::WrongState {
        purpose: v.purpose.name(),
        version: v.version,
        state: state_name(v.state),
        rule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(kind: OperationKind, version: u32, by: &str, now: i64) -> Proposal {
        Proposal {
            id: format!("p-{by}-{version}"),
            kind,
            purpose: Some("card-data".into()),
            version,
            new_root_key_file: None,
            proposed_by: by.into(),
            proposed_at_unix_ms: now,
            expires_at_unix_ms: now + 1000,
            state: ProposalState::Pending,
            approved_by: None,
            approved_at_unix_ms: 0,
            audit_gap: None,
            force: false,
            records: 0,
            job: None,
        }
    }

    /// PCI DSS 3.7.1: every key version is a fresh 256-bit key from the CSPRNG.
    /// Attack: a rotation that reuses, derives or zeroes material (a "new" version an
    /// attacker holding the old one can already use). Every version of every purpose,
    /// after rotations, is 32 bytes, non-zero and distinct from all others.
    ///
    /// Control: PCI-3.7.1 (docs/compliance.md).
    #[test]
    fn every_key_version_is_fresh_256_bit_material() {
        let mut ring = Keyring::generate(0).unwrap();
        for purpose in Purpose::ALL {
            for n in 0..3 {
                ring.rotate(purpose, n).unwrap();
            }
        }
        let mut seen = std::collections::HashSet::new();
        for v in &ring.versions {
            let material = v.material.as_ref().unwrap().expose_secret();
            assert_eq!(material.len(), 32, "{:?} v{}", v.purpose, v.version);
            assert!(
                material.iter().any(|&b| b != 0),
                "{:?} v{}",
                v.purpose,
                v.version
            );
            assert!(
                seen.insert(material.to_vec()),
                "{:?} v{} repeats",
                v.purpose,
                v.version
            );
        }
        assert_eq!(seen.len(), Purpose::ALL.len() * 4);
    }

    #[test]
    fn rotation_keeps_exactly_one_active_version() {
        let mut ring = Keyring::generate(0).unwrap();
        assert_eq!(ring.rotate(Purpose::CardData, 5).unwrap(), 2);
        assert_eq!(ring.rotate(Purpose::CardData, 6).unwrap(), 3);
        let card: Vec<_> = ring
            .versions
            .iter()
            .filter(|v| v.purpose == Purpose::CardData)
            .map(|v| (v.version, v.state))
            .collect();
        assert_eq!(
            card,
            vec![
                (1, State::DecryptOnly),
                (2, State::DecryptOnly),
                (3, State::Active)
            ]
        );
        assert_eq!(ring.active(Purpose::Fingerprint).unwrap().version, 1);
    }

    /// Control: NIST-800-38D-8.3 (docs/compliance.md).
    /// Attack: lease the same encryption budget to two vaults, or past the key's limit;
    /// never, and the key rotates when spent.
    #[test]
    fn budget_is_never_leased_twice_and_rotates_when_spent() {
        let mut ring = Keyring::generate(0).unwrap();
        let mut total_v1 = 0;
        loop {
            let lease = ring.lease(Purpose::CardData, 100, 30, 1).unwrap();
            if lease.version != 1 {
                assert!(lease.rotated);
                assert_eq!((lease.version, lease.granted, lease.remaining), (2, 30, 70));
                break;
            }
            assert!(!lease.rotated);
            total_v1 += lease.granted;
            assert_eq!(lease.remaining, 100 - total_v1);
        }
        assert_eq!(total_v1, 100, "30 + 30 + 30 + the 10 left");
        assert_eq!(
            ring.version(Purpose::CardData, 1)
                .unwrap()
                .encryptions_leased,
            100
        );
        assert_eq!(
            ring.version(Purpose::CardData, 1).unwrap().state,
            State::DecryptOnly
        );
        assert!(matches!(
            ring.lease(Purpose::Fingerprint, 100, 30, 1),
            Err(LeaseError::Refused(Refusal::NotAead(_)))
        ));
    }

    /// Control: PCI-3.7.5 (docs/compliance.md).
    /// Attack: skip a state (destroy an active key, bring a destroyed one back); the state
    /// rules refuse it.
    #[test]
    fn retire_destroy_and_unretire_follow_the_state_rules() {
        let mut ring = Keyring::generate(0).unwrap();
        assert!(matches!(
            ring.retire(Purpose::CardData, 1),
            Err(Refusal::WrongState { .. })
        ));
        assert!(ring.check_destroy(Purpose::CardData, 1).is_err(), "active");
        ring.rotate(Purpose::CardData, 1).unwrap();
        ring.retire(Purpose::CardData, 1).unwrap();
        ring.unretire(Purpose::CardData, 1).unwrap();
        assert_eq!(
            ring.version(Purpose::CardData, 1).unwrap().state,
            State::DecryptOnly
        );
        ring.destroy(Purpose::CardData, 1).unwrap();
        let v1 = ring.version(Purpose::CardData, 1).unwrap();
        assert_eq!(v1.state, State::Destroyed);
        assert!(v1.material.is_none());
        assert!(ring.unretire(Purpose::CardData, 1).is_err());
        assert!(matches!(
            ring.check_destroy(Purpose::CardData, 9),
            Err(Refusal::NoSuchVersion { .. })
        ));
        // An audit key, even decrypt-only, is never retired.
        ring.rotate(Purpose::Audit, 1).unwrap();
        assert!(matches!(
            ring.retire(Purpose::Audit, 1),
            Err(Refusal::WrongState { .. })
        ));
    }

    /// Control: PCI-3.7.6 (docs/compliance.md).
    /// Attack: an admin approves their own proposal, approves too late, or reuses an
    /// approval; each refused.
    #[test]
    fn approvals_need_another_admin_in_time_and_only_once() {
        let mut ring = Keyring::generate(0).unwrap();
        ring.rotate(Purpose::CardData, 1).unwrap();
        let id = ring
            .propose(proposal(OperationKind::Destroy, 1, "alice", 10))
            .unwrap()
            .id
            .clone();
        assert!(matches!(
            ring.propose(proposal(OperationKind::Destroy, 1, "carol", 11)),
            Err(Refusal::Duplicate { .. })
        ));
        assert_eq!(
            ring.check_approval(&id, "alice", 20),
            Err(Refusal::SelfApproval)
        );
        assert_eq!(
            ring.check_approval(&id, "bob", 1010),
            Err(Refusal::Expired(id.clone()))
        );
        assert!(ring.check_approval(&id, "bob", 20).is_ok());
        ring.mark_approved(&id, "bob", 20);
        assert_eq!(
            ring.check_approval(&id, "bob", 21),
            Err(Refusal::AlreadyApproved(id.clone()))
        );
        assert_eq!(
            ring.check_approval("p-nope", "bob", 21),
            Err(Refusal::NoSuchProposal("p-nope".into()))
        );
        ring.prune_proposals(20 + 5, 10);
        assert_eq!(ring.proposals.len(), 1, "recent proposals are kept");
        ring.prune_proposals(20 + 50, 10);
        assert!(ring.proposals.is_empty());
    }

    fn job(kind: OperationKind, tenant: &str, now: i64) -> Proposal {
        Proposal {
            id: format!("p-job-{tenant}-{now}"),
            purpose: None,
            job: Some(TenantJob {
                vault_identity: "uri:vault-a".into(),
                tenant: tenant.into(),
                expected_rows: 10,
                processor: String::new(),
                selection: String::new(),
                file_sha256: "ab".repeat(32),
                sender_key_fingerprint: String::new(),
                claimed_by: None,
                claimed_at_unix_ms: 0,
                claim_by_unix_ms: 0,
                finished_at_unix_ms: 0,
            }),
            ..proposal(kind, 0, "alice", now)
        }
    }

    const WINDOW: i64 = 1000;

    fn approved_job(ring: &mut Keyring, kind: OperationKind, at: i64) -> String {
        let id = ring.propose(job(kind, "acme", at)).unwrap().id;
        ring.check_approval(&id, "bob", at).unwrap();
        ring.mark_job_approved(&id, "bob", at, WINDOW);
        id
    }

    #[test]
    fn a_job_is_claimed_once_by_one_vault_within_the_window_and_finished_by_it() {
        let mut ring = Keyring::generate(0).unwrap();
        let import = OperationKind::Import;
        let pending = ring.propose(job(import, "acme", 10)).unwrap().id;
        assert_eq!(
            ring.claim_job(&pending, "acme", import, "uri:vault-a", 11, WINDOW),
            Err(Refusal::JobNotApproved(pending.clone()))
        );
        ring.mark_job_approved(&pending, "bob", 20, WINDOW);
        let id = pending;
        // Another tenant's or kind's job is not found, whatever its state.
        for (tenant, kind) in [("globex", import), ("acme", OperationKind::Export)] {
            assert_eq!(
                ring.claim_job(&id, tenant, kind, "uri:vault-a", 21, WINDOW),
                Err(Refusal::NotThisJob(id.clone()))
            );
        }
        assert_eq!(
            ring.finish_job(&id, "acme", import, "uri:vault-a", 21),
            Err(Refusal::NotClaimed(id.clone())),
            "not claimed yet"
        );
        assert_eq!(
            ring.claim_job(&id, "acme", import, "uri:vault-a", 22, WINDOW),
            Ok(true)
        );
        // A second vault identity cannot take it over; the first may claim its import
        // again (it lost its spool state), without a change.
        assert_eq!(
            ring.claim_job(&id, "acme", import, "uri:vault-b", 23, WINDOW),
            Err(Refusal::ClaimedElsewhere {
                id: id.clone(),
                by: "uri:vault-a".into()
            })
        );
        assert_eq!(
            ring.claim_job(&id, "acme", import, "uri:vault-a", 24, WINDOW),
            Ok(false)
        );
        assert_eq!(
            ring.finish_job(&id, "acme", import, "uri:vault-b", 25),
            Err(Refusal::NotClaimed(id.clone()))
        );
        assert_eq!(
            ring.finish_job(&id, "acme", import, "uri:vault-a", 25),
            Ok(true)
        );
        assert_eq!(
            ring.finish_job(&id, "acme", import, "uri:vault-a", 26),
            Ok(false)
        );
        let done = ring.proposals.iter().find(|p| p.id == id).unwrap();
        assert_eq!(done.state, ProposalState::Done);
        let j = done.job.as_ref().unwrap();
        assert_eq!(
            (
                j.claimed_by.as_deref(),
                j.claimed_at_unix_ms,
                j.finished_at_unix_ms
            ),
            (Some("uri:vault-a"), 22, 25)
        );
        for vault in ["uri:vault-a", "uri:vault-b"] {
            assert_eq!(
                ring.claim_job(&id, "acme", import, vault, 27, WINDOW),
                Err(Refusal::AlreadyUsed(id.clone()))
            );
        }
        // A finished or running job is never approved again.
        assert_eq!(
            ring.check_approval(&id, "carol", 28),
            Err(Refusal::AlreadyApproved(id.clone()))
        );
    }

    #[test]
    fn an_export_is_claimed_once_even_by_its_own_vault() {
        let mut ring = Keyring::generate(0).unwrap();
        let export = OperationKind::Export;
        let id = approved_job(&mut ring, export, 10);
        assert_eq!(
            ring.claim_job(&id, "acme", export, "uri:vault-a", 11, WINDOW),
            Ok(true)
        );
        assert_eq!(
            ring.claim_job(&id, "acme", export, "uri:vault-a", 12, WINDOW),
            Err(Refusal::AlreadyUsed(id.clone()))
        );
    }

    #[test]
    fn an_approved_job_not_claimed_within_the_window_lapses() {
        let mut ring = Keyring::generate(0).unwrap();
        let import = OperationKind::Import;
        let id = approved_job(&mut ring, import, 100);
        assert_eq!(
            ring.claim_job(&id, "acme", import, "uri:vault-a", 100 + WINDOW, WINDOW),
            Err(Refusal::ClaimExpired(id.clone()))
        );
        assert!(
            ring.claim_job(&id, "acme", import, "uri:vault-a", 99 + WINDOW, WINDOW)
                .unwrap()
        );
        // A job approved before deadlines were stored: the window after its approval.
        let old = approved_job(&mut ring, OperationKind::Export, 200);
        ring.job_mut(&old).unwrap().claim_by_unix_ms = 0;
        assert_eq!(
            ring.claim_job(
                &old,
                "acme",
                OperationKind::Export,
                "v",
                200 + WINDOW,
                WINDOW
            ),
            Err(Refusal::ClaimExpired(old.clone()))
        );
    }

    #[test]
    fn an_import_approved_without_a_file_digest_cannot_be_claimed() {
        let mut ring = Keyring::generate(0).unwrap();
        let import = OperationKind::Import;
        let id = approved_job(&mut ring, import, 10);
        ring.job_mut(&id).unwrap().file_sha256.clear();
        assert_eq!(
            ring.claim_job(&id, "acme", import, "uri:vault-a", 11, WINDOW),
            Err(Refusal::NoFileDigest(id.clone()))
        );
    }

    /// Control: PCI-3.7.4, NIST-800-57 (docs/compliance.md).
    /// Attack: keep a key active past its cryptoperiod; it is due for rotation at its age.
    #[test]
    fn scheduled_rotation_is_due_by_age_of_the_active_version() {
        let mut ring = Keyring::generate(0).unwrap();
        ring.rotate(Purpose::Cvc, 500).unwrap();
        assert_eq!(
            ring.due_for_rotation(1000, 1000),
            vec![
                Purpose::CardData,
                Purpose::Fingerprint,
                Purpose::Audit,
                Purpose::Intake,
                Purpose::Import,
                Purpose::ImportRsa
            ]
        );
        assert!(ring.due_for_rotation(999, 1000).is_empty());
    }
}

//! How the vault is doing: the reasons it is degraded, and the figures `/metrics`
//! shows (set from the store and the key set at each scrape).

use super::Vault;
use crate::metrics::{Observed, PurposeLabels, VersionLabels};
use crate::store::{KeyUse, Store};

impl<S: Store> Vault<S> {
    /// Why the vault is degraded, if it is: the keyservice link is down, a data or
    /// audit filesystem is nearly full, or the database cannot be reached or does not
    /// confirm writes. It serves (or tries to) either way.
    pub fn degraded(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !*self.records.keys().connected().borrow() {
            reasons.push("the keyservice is unreachable; serving with the keys held".into());
        }
        if let Some(reason) = self.storage_trouble() {
            reasons.push(reason);
        }
        reasons
    }

    /// What is wrong with the storage, if anything: the database cannot be reached or
    /// does not confirm writes, or "the data disk is nearly full (… MiB free)" (or the
    /// audit disk).
    pub fn storage_trouble(&self) -> Option<String> {
        let stats = self.records.store().stats();
        if stats.unreachable {
            return Some(
                "the database cannot be reached, or does not confirm writes in time".into(),
            );
        }
        [
            ("data", stats.data_free_bytes),
            ("audit log", stats.audit_free_bytes),
        ]
        .into_iter()
        .find_map(|(which, free)| {
            Some((which, free?)).filter(|(_, free)| *free < self.low_disk_bytes)
        })
        .map(|(which, free)| {
            format!(
                "the {which} disk is nearly full ({} MiB free)",
                free / (1024 * 1024)
            )
        })
    }
}

impl<S: Store> Observed for Vault<S> {
    fn metrics(&self) -> String {
        let metrics = self.records.journal().metrics();
        let store = self.records.store();
        metrics.records.clear();
        for ((key_use, version), records) in store.version_counts() {
            let purpose = match key_use {
                KeyUse::CardData => "card-data",
                KeyUse::Fingerprint => "fingerprint",
            };
            metrics
                .records
                .get_or_create(&VersionLabels {
                    purpose: purpose.into(),
                    version,
                })
                .set(records as i64);
        }
        let keys = self.records.keys();
        let set = keys.snapshot();
        for (purpose, version) in [
            ("card-data", set.card_data.active().0),
            ("fingerprint", set.fingerprint.active().0),
            ("cvc", set.cvc.active().0),
            ("audit", set.audit.active().0),
        ] {
            metrics
                .active_versions
                .get_or_create(&PurposeLabels {
                    purpose: purpose.into(),
                })
                .set(i64::from(version));
        }
        metrics
            .keyservice_connected
            .set(i64::from(*keys.connected().borrow()));
        let rewrap = self.admin.rewrap();
        metrics
            .rewrap_remaining
            .set(rewrap.status().remaining as i64);
        let rewritten = rewrap.rewritten_here();
        metrics
            .rewrap_rewritten
            .inc_by(rewritten.saturating_sub(metrics.rewrap_rewritten.get()));
        metrics
            .cvcs_held
            .set(i64::try_from(self.records.cvcs().len()).unwrap_or(i64::MAX));
        metrics.storage.set(&store.stats());
        metrics.encode()
    }

    fn health(&self) -> (bool, String) {
        let reasons = self.degraded();
        if reasons.is_empty() {
            (true, "serving".into())
        } else {
            (true, format!("degraded: {}", reasons.join("; ")))
        }
    }
}

//! Sealed intake (docs/sealed-intake.md): the settings, the refusals a caller tells
//! apart, the card JSON inside a sealed card, and what the store keeps per sealed card
//! to refuse a replay and answer a retry.

use std::collections::HashMap;

use serde::Deserialize;

use crate::card::{CardData, CardholderName, Cvc, Expiry, Pan, Today, Violation};
use crate::policy::Tenant;

/// `[sealed_intake]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeSettings {
    /// How old (by its stamp) a sealed card may be when it arrives.
    #[serde(default = "default_max_age_secs")]
    pub max_age_secs: u32,
    /// How far ahead of the vault's clock a stamp may be.
    #[serde(default = "default_future_skew_secs")]
    pub future_skew_secs: u32,
    /// How long a previous intake key is still accepted after a rotation.
    #[serde(default = "default_key_overlap_secs")]
    pub key_overlap_secs: u64,
    /// Per-tenant `max_age_secs`.
    #[serde(default)]
    pub tenant_max_age_secs: HashMap<String, u32>,
}

impl Default for IntakeSettings {
    fn default() -> Self {
        Self {
            max_age_secs: default_max_age_secs(),
            future_skew_secs: default_future_skew_secs(),
            key_overlap_secs: default_key_overlap_secs(),
            tenant_max_age_secs: HashMap::new(),
        }
    }
}

fn default_max_age_secs() -> u32 {
    600
}
fn default_future_skew_secs() -> u32 {
    60
}
fn default_key_overlap_secs() -> u64 {
    86_400
}

/// The longest window a tenant may have: a day.
const MAX_WINDOW_SECS: u32 = 86_400;
/// How long a replay entry outlives its sealed card's window (see
/// [`IntakeSettings::keep_entry_until_ms`]).
const ENTRY_MARGIN_MS: i64 = 3_600_000;

impl IntakeSettings {
    pub fn validate(&self) -> Result<(), String> {
        let windows = std::iter::once(("max_age_secs".to_owned(), self.max_age_secs)).chain(
            self.tenant_max_age_secs
                .iter()
                .map(|(tenant, secs)| (format!("tenant_max_age_secs.{tenant}"), *secs)),
        );
        for (name, secs) in windows {
            if secs == 0 || secs > MAX_WINDOW_SECS {
                return Err(format!(
                    "sealed_intake.{name}: must be 1 to {MAX_WINDOW_SECS} seconds"
                ));
            }
        }
        if self.future_skew_secs > 3_600 {
            return Err("sealed_intake.future_skew_secs: at most 3600 seconds".into());
        }
        Ok(())
    }

    /// The tenant's window, in seconds.
    pub fn max_age_secs(&self, tenant: &Tenant) -> u32 {
        self.tenant_max_age_secs
            .get(tenant.as_str())
            .copied()
            .unwrap_or(self.max_age_secs)
    }

    /// Until when the replay entry of a sealed card stamped `issued_at` is kept: past
    /// the last moment the card can arrive in its tenant's window, by a margin that
    /// covers vaults whose clocks or windows differ (a rolling change of
    /// `max_age_secs`, a vault clock running ahead of the one that prunes).
    pub fn keep_entry_until_ms(&self, tenant: &Tenant, issued_at_unix_ms: i64) -> i64 {
        issued_at_unix_ms
            .saturating_add(i64::from(self.max_age_secs(tenant)) * 1000)
            .saturating_add(ENTRY_MARGIN_MS)
    }

    /// Whether a stamp is within the tenant's window at `now`.
    pub fn in_window(&self, tenant: &Tenant, issued_at_unix_ms: i64, now_unix_ms: i64) -> bool {
        let oldest = now_unix_ms.saturating_sub(i64::from(self.max_age_secs(tenant)) * 1000);
        let newest = now_unix_ms.saturating_add(i64::from(self.future_skew_secs) * 1000);
        (oldest..=newest).contains(&issued_at_unix_ms)
    }

    pub fn key_overlap_ms(&self) -> i64 {
        i64::try_from(self.key_overlap_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

/// Why a sealed card is refused, each with its own `ErrorInfo` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key id is not an intake key this vault accepts now.
    UnknownKey,
    /// Made for another tenant or key, or changed on the way (one reason, by design).
    Unopenable,
    /// Stamped outside the tenant's window.
    Expired,
    /// Another sealed card with this nonce was seen within the window.
    Replayed,
    /// This very sealed card's entry was left pending by a vault that claimed before
    /// storing (an older version; this one claims in the record's own write).
    InFlight,
    /// This very sealed card was answered before, and the token it got has been
    /// deleted (or has expired) since.
    TokenDeleted,
}

impl Refusal {
    /// The `ErrorInfo` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::UnknownKey => "SEALING_KEY_UNKNOWN",
            Refusal::Unopenable => "SEALED_CARD_UNOPENABLE",
            Refusal::Expired => "SEALED_CARD_EXPIRED",
            Refusal::Replayed => "SEALED_CARD_REPLAYED",
            Refusal::InFlight => "SEALED_CARD_IN_FLIGHT",
            Refusal::TokenDeleted => "SEALED_CARD_TOKEN_DELETED",
        }
    }

    /// The rule a batch item is refused with.
    pub fn rule(self) -> &'static str {
        match self {
            Refusal::UnknownKey => "unknown_key",
            Refusal::Unopenable => "unopenable",
            Refusal::Expired => "expired",
            Refusal::Replayed => "replayed",
            Refusal::InFlight => "in_flight",
            Refusal::TokenDeleted => "token_deleted",
        }
    }

    /// A batch item refused for this reason.
    pub fn violation(self) -> Violation {
        Violation {
            field: "sealed_cards",
            rule: self.rule(),
            description: self.message(),
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::UnknownKey => {
                "the sealed card's key id is not an intake key this vault accepts: fetch the \
                 sealing key again (GetSealingKey) and seal the card anew"
            }
            Refusal::Unopenable => {
                "the sealed card cannot be opened: it was made for another tenant or key, or \
                 changed on the way"
            }
            Refusal::Expired => {
                "the sealed card's stamp is outside the tenant's window: seal the card anew"
            }
            Refusal::Replayed => "the sealed card's nonce was already used by another sealed card",
            Refusal::InFlight => "this sealed card's claim is still pending; retry in a minute",
            Refusal::TokenDeleted => {
                "this sealed card was answered before, and its token has been deleted since: \
                 seal the card anew to store it again"
            }
        }
    }
}

/// The card JSON inside a sealed card. Its strings are borrowed from the opened
/// plaintext (a zeroizing buffer), so parsing copies nothing of the card, whatever
/// fails half-way; a string with an escape sequence cannot be borrowed and is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CardJson<'a> {
    number: &'a str,
    exp_month: u32,
    exp_year: u32,
    #[serde(default)]
    cvc: &'a str,
    #[serde(default)]
    name: &'a str,
}

/// Validates the card inside an opened sealed card. A JSON error says nothing of the
/// content (serde's messages can quote it).
pub fn card(json: &[u8], today: Today) -> Result<CardData, Violation> {
    let card: CardJson = serde_json::from_slice(json).map_err(|_| Violation {
        field: "sealed_card",
        rule: "card_json",
        description: "the opened card is not the JSON object docs/sealed-intake.md describes \
                      (number, exp_month, exp_year, optional cvc and name, nothing else, \
                      no escape sequences in strings)",
    })?;
    Ok(CardData {
        pan: Pan::parse(card.number)?,
        expiry: Expiry::parse(card.exp_month, card.exp_year, today)?,
        name: CardholderName::parse(card.name)?,
        cvc: Cvc::parse(card.cvc)?,
    })
}

/// The store key of a sealed card's replay entry: scoped to the tenant like a forward's
/// idempotency key, and starting with a zero byte, which no forward key can (they are
/// visible ASCII), so the two never meet.
pub fn entry_key(tenant: &Tenant, nonce_id: &[u8; 32]) -> Vec<u8> {
    let mut name = Vec::with_capacity(8 + 64);
    name.extend_from_slice(b"\0sealed/");
    name.extend_from_slice(hex::encode(nonce_id).as_bytes());
    tenant_key(tenant, &name)
}

/// `name` (which starts with a zero byte) scoped to the tenant, as a stored outcome's
/// key: an entry of this format under another name (an import row's, `ops::import`).
pub fn tenant_key(tenant: &Tenant, name: &[u8]) -> Vec<u8> {
    debug_assert_eq!(name.first(), Some(&0));
    let tenant = tenant.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + tenant.len() + name.len());
    out.push(tenant.len() as u8);
    out.extend_from_slice(tenant);
    out.extend_from_slice(name);
    out
}

/// A replay entry's value: `b'S' | keep_until_ms: i64 | claimed_at_ms: i64 |
/// blob_sha256: 32 | state: u8 |
/// flags: u8 (1: reused, 2: CVC not kept) | token (UTF-8, Done only)`. Holds no card
/// data.
const FORMAT: u8 = b'S';
const FIXED: usize = 1 + 8 + 8 + 32 + 2;

/// How long a claim may stay pending before the same sealed card may claim it again:
/// the call that claimed it died with its vault (a retry must not wait for the window
/// to end and make the customer type the card again). Far above any call's deadline.
pub const PENDING_TIMEOUT_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Claimed by a call that has not finished.
    Pending,
    /// Tokenized; the entry holds the token.
    Done,
    /// The call failed: the same sealed card may be tried again.
    Released,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub keep_until_ms: i64,
    pub claimed_at_ms: i64,
    pub blob_sha256: [u8; 32],
    pub state: EntryState,
    pub reused: bool,
    pub cvc_not_kept: bool,
    pub token: String,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED + self.token.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.keep_until_ms.to_be_bytes());
        out.extend_from_slice(&self.claimed_at_ms.to_be_bytes());
        out.extend_from_slice(&self.blob_sha256);
        out.push(match self.state {
            EntryState::Pending => 1,
            EntryState::Done => 2,
            EntryState::Released => 3,
        });
        out.push(u8::from(self.reused) | (u8::from(self.cvc_not_kept) << 1));
        out.extend_from_slice(self.token.as_bytes());
        out
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        if value.len() < FIXED || value[0] != FORMAT {
            return None;
        }
        let keep_until_ms = i64::from_be_bytes(value[1..9].try_into().ok()?);
        let claimed_at_ms = i64::from_be_bytes(value[9..17].try_into().ok()?);
        let blob_sha256 = value[17..49].try_into().ok()?;
        let state = match value[49] {
            1 => EntryState::Pending,
            2 => EntryState::Done,
            3 => EntryState::Released,
            _ => return None,
        };
        Some(Self {
            keep_until_ms,
            claimed_at_ms,
            blob_sha256,
            state,
            reused: value[50] & 1 != 0,
            cvc_not_kept: value[50] & 2 != 0,
            token: String::from_utf8(value[FIXED..].to_vec()).ok()?,
        })
    }

    /// Whether a new claim of the sealed card whose SHA-256 is `blob_sha256` may take
    /// the entry's place: the entry was released or has outlived the window, or it is
    /// this very sealed card's claim left pending by a call that died.
    pub fn replaceable(&self, blob_sha256: &[u8; 32], now_unix_ms: i64) -> bool {
        self.state == EntryState::Released
            || now_unix_ms > self.keep_until_ms
            || (self.state == EntryState::Pending
                && self.blob_sha256 == *blob_sha256
                && now_unix_ms.saturating_sub(self.claimed_at_ms) > PENDING_TIMEOUT_MS)
    }
}

/// Whether a stored outcome is a sealed card's replay entry (else a forward's).
pub fn is_entry(value: &[u8]) -> bool {
    value.first() == Some(&FORMAT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_never_look_like_forward_outcomes() {
        let entry = Entry {
            keep_until_ms: 1_800_000_000_000,
            claimed_at_ms: 1_799_999_000_000,
            blob_sha256: [7; 32],
            state: EntryState::Done,
            reused: true,
            cvc_not_kept: true,
            token: "tok_0123456789ABCDEFGHIJKL".into(),
        };
        let bytes = entry.encode();
        assert_eq!(Entry::decode(&bytes), Some(entry.clone()));
        assert!(is_entry(&bytes));
        assert!(crate::forward::idempotency::decode(&bytes).is_none());
        assert!(!entry.replaceable(&[7; 32], 1_800_000_000_000));
        assert!(entry.replaceable(&[7; 32], 1_800_000_000_001));
        let released = Entry {
            state: EntryState::Released,
            ..entry.clone()
        };
        assert!(released.replaceable(&[8; 32], 0));
        // A claim left pending by a dead call: the same sealed card may take it over
        // after the timeout, another one never (before the window ends).
        let pending = Entry {
            state: EntryState::Pending,
            ..entry
        };
        let later = pending.claimed_at_ms + PENDING_TIMEOUT_MS + 1;
        assert!(!pending.replaceable(&[7; 32], pending.claimed_at_ms + 1_000));
        assert!(pending.replaceable(&[7; 32], later));
        assert!(!pending.replaceable(&[8; 32], later));
    }

    #[test]
    fn the_window_and_the_skew_bound_the_stamp() {
        let settings = IntakeSettings {
            tenant_max_age_secs: [("short".to_owned(), 60)].into(),
            ..Default::default()
        };
        let shop = Tenant::parse("shop").unwrap();
        let short = Tenant::parse("short").unwrap();
        let now = 1_800_000_000_000;
        assert!(settings.in_window(&shop, now - 600_000, now));
        assert!(!settings.in_window(&shop, now - 600_001, now));
        assert!(settings.in_window(&shop, now + 60_000, now));
        assert!(!settings.in_window(&shop, now + 60_001, now));
        assert!(!settings.in_window(&short, now - 61_000, now));
        assert!(settings.validate().is_ok());
        let zero = IntakeSettings {
            max_age_secs: 0,
            ..Default::default()
        };
        assert!(zero.validate().unwrap_err().contains("max_age_secs"));
    }

    #[test]
    fn card_json_errors_never_quote_the_content() {
        let today = Today::now();
        let bad = card(br#"{"number":"4242424242424242","exp_month":"12"}"#, today).unwrap_err();
        assert_eq!(bad.rule, "card_json");
        assert!(!bad.description.contains("4242"));
        let unknown = card(
            br#"{"number":"4242424242424242","exp_month":12,"exp_year":2030,"pin":"1"}"#,
            today,
        )
        .unwrap_err();
        assert_eq!(unknown.rule, "card_json");
        // An escape sequence would make serde copy the string: refused.
        let escaped = card(
            br#"{"number":"\u0034242424242424242","exp_month":12,"exp_year":2040}"#,
            today,
        )
        .unwrap_err();
        assert_eq!(escaped.rule, "card_json");
        let luhn = card(
            br#"{"number":"4242424242424241","exp_month":12,"exp_year":2040}"#,
            today,
        )
        .unwrap_err();
        assert_eq!(luhn.field, "card.number");
        let ok = card(
            br#"{"number":"4242 4242 4242 4242","exp_month":12,"exp_year":2040,"cvc":"123","name":"Ada Lovelace"}"#,
            today,
        )
        .unwrap();
        assert_eq!(ok.pan.last_four(), *b"4242");
        assert!(ok.cvc.is_some());
    }
}

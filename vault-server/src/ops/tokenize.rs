//! Tokenize and TokenizeBatch: a validated card in, a token out. The card's plaintext
//! lives for the length of the call: fingerprinted, sealed under a new token, its CVC
//! (if any) sealed into memory, then dropped.

use runtime::now_unix_ms;

use super::records::{ATTEMPTS, Records};
use crate::card::{CardData, Violation};
use crate::cvc::{self, Slot};
use crate::error::VaultError;
use crate::keys::Aead;
use crate::policy::{Caller, Tenant};
use crate::record::{self, Fingerprint, Metadata};
use crate::store::{ClaimRule, InsertOutcome, NewRecord, Store};
use crate::token::{Format, Shape, Token};

/// A batch item refused by the guessing detector (the whole call is, for Tokenize).
const GUESSING_REFUSED: Violation = Violation {
    field: "cards",
    rule: "guessing",
    description: "refused: this identity brought too many different cards with the same \
                  first six and last four digits; an admin must lift the flag \
                  (vaultctl blocks list)",
};

/// A batch item refused because the CVC store is full (Tokenize: the whole call).
const CVC_STORE_FULL: Violation = Violation {
    field: "cards.cvc",
    rule: "capacity",
    description: "refused: the vault holds as many CVCs as it may (for this tenant or in \
                  all); send the card without its CVC, or retry later",
};

/// A batch item refused because no free card-shaped token was found for it.
const CARD_TOKEN_SPACE: Violation = Violation {
    field: "cards",
    rule: "token_space",
    description: "refused: no free card-shaped token for this card after a bounded number \
                  of draws (the tokens that keep its digits are nearly all taken or \
                  recently deleted); \
                  tokenize it with format TOKEN_FORMAT_OPAQUE; nothing was stored",
};

/// The longest retention a token can be given: 100 years.
const MAX_TTL_SECS: u64 = 3_155_760_000;

/// Draws of a card-shaped token before giving up with RESOURCE_EXHAUSTED (each one a
/// put-if-absent). Its space can be small (9 x 10^5 per first six and last four for 16
/// digits with the first six kept, 90 for 12 digits), so a nearly full one is a real,
/// client-visible condition rather than a broken random number generator: with a
/// fraction f of the space taken, a call gives up with probability f^16 (10^-5 at
/// f = 0.5, 0.19 at f = 0.9). Tokens the tenant deleted within its tombstone window
/// count as taken (`fresh_token`).
pub const CARD_ATTEMPTS: usize = 16;

/// How many fresh tokens of `shape` are drawn before giving up, and the error then.
fn attempts(shape: Shape) -> (usize, VaultError) {
    match shape {
        Shape::Opaque => (ATTEMPTS, VaultError::TokenSpace),
        Shape::Card { .. } => (
            CARD_ATTEMPTS,
            VaultError::CardTokenSpace {
                attempts: CARD_ATTEMPTS,
            },
        ),
    }
}

/// One card to tokenize.
#[derive(Debug)]
pub struct Tokenize {
    pub card: CardData,
    /// 0: the tenant's default.
    pub ttl_secs: u64,
    /// Return the card's existing token in this tenant rather than a new one.
    pub reuse_existing: bool,
    /// The shape of a new token; `None`: the tenant's default.
    pub format: Option<Format>,
    /// A sealed card's answer, stored with the record when a new one is stored.
    pub answer: Option<Answer>,
}

/// A sealed card's replay entry (`intake`), to be stored, with the new token, in the
/// same atomic write as the record; with `claim`, only if its key is free (else the
/// first call's answer is returned, or the card refused as a replay).
#[derive(Debug, Clone)]
pub struct Answer {
    pub key: Vec<u8>,
    pub entry: crate::intake::Entry,
    pub claim: Option<ClaimRule>,
}

impl Answer {
    /// The entry answering with `done` (key, value, as stored).
    pub fn done(&self, done: &Tokenized) -> (Vec<u8>, Vec<u8>) {
        self.answering(&done.token, done.reused, done.cvc_not_kept)
    }

    /// The entry answering with `token`, a new record's (so neither reused nor with a
    /// CVC left out).
    fn stored(&self, token: &Token) -> (Vec<u8>, Vec<u8>) {
        self.answering(token, false, false)
    }

    fn answering(&self, token: &Token, reused: bool, cvc_not_kept: bool) -> (Vec<u8>, Vec<u8>) {
        let mut entry = self.entry.clone();
        entry.state = crate::intake::EntryState::Done;
        entry.reused = reused;
        entry.cvc_not_kept = cvc_not_kept;
        entry.token = token.as_str().to_owned();
        (self.key.clone(), entry.encode())
    }
}

/// Cards to tokenize in one durable write; each was validated on its own.
#[derive(Debug)]
pub struct TokenizeBatch {
    pub cards: Vec<Result<CardData, Violation>>,
    pub ttl_secs: u64,
    pub reuse_existing: bool,
    pub format: Option<Format>,
    /// Sealed cards' answers, by the index of their card (empty: none).
    pub answers: Vec<Option<Answer>>,
    /// Not counted by the guessing detector: an approved import job's rows (two
    /// identities agreed to bring these cards; a file of one issuer's cards would
    /// otherwise look like guessing).
    pub guessing_exempt: bool,
}

/// A token and its record's clear metadata.
#[derive(Debug)]
pub struct Tokenized {
    pub token: Token,
    pub metadata: Metadata,
    /// The card's existing token was returned.
    pub reused: bool,
    /// The card came with a CVC that was not kept: the existing token holds one another
    /// identity sent (only that identity replaces it).
    pub cvc_not_kept: bool,
}

/// One card of a batch, in the batch's order.
#[derive(Debug)]
pub enum BatchItem {
    Stored(Tokenized),
    Invalid(Violation),
}

/// A valid card of a batch still waiting for a stored token: its index, the card, its
/// metadata, its index keys under older fingerprint versions, and the room reserved for
/// its CVC.
type Waiting<'a> = (usize, CardData, Metadata, Vec<Vec<u8>>, Option<Slot<'a>>);

impl<S: Store> Records<S> {
    pub async fn tokenize(
        &self,
        caller: &Caller,
        request: Tokenize,
    ) -> Result<Tokenized, VaultError> {
        let Tokenize {
            card,
            ttl_secs,
            reuse_existing,
            format,
            answer,
        } = request;
        let now = now_unix_ms();
        let expires_at = self.expires_at(caller, ttl_secs, now)?;
        let shape = self.shape(caller, format);
        let (attempts, exhausted) = attempts(shape);
        let (mut metadata, older) = self.metadata(caller, &card, now, reuse_existing);
        metadata.expires_at_unix_ms = expires_at;
        self.watch_fingerprint(caller, &card.pan, &metadata.fingerprint.value)
            .await?;
        // Room for the CVC before anything is stored: a full CVC store refuses the call,
        // never leaves a record whose token the caller did not get.
        let mut slot = self.cvc_slot(caller, &card)?;
        for _ in 0..attempts {
            let mut record = self
                .seal(shape, &mut metadata, &card, reuse_existing, &older)
                .await
                .map_err(|e| self.exhausted(e))?;
            record.outcome = answer.as_ref().map(|a| a.stored(&record.token));
            record.claim = answer.as_ref().and_then(|a| a.claim.clone());
            let token = record.token.clone();
            let sealed = self.seal_cvc(&token, &card).await?;
            // A new record finishes the call: its event commits with it.
            let (riding, ride) = self
                .journal()
                .riding(caller, {
                    let token = token.as_str().to_owned();
                    let key_version = metadata.key_version;
                    move |outcomes: &[InsertOutcome], event| {
                        let finished = matches!(outcomes, [InsertOutcome::Stored]);
                        if finished {
                            event.token.clone_from(&token);
                            event.key_version = key_version;
                        }
                        finished
                    }
                })
                .unzip();
            match self
                .store()
                .insert_audited(vec![record], riding)
                .await?
                .pop()
            {
                Some(InsertOutcome::Stored) => {
                    self.journal().settle(ride);
                    self.hold_cvc(caller, slot.take(), &token, sealed, false);
                    // Successful calls log at debug: the audit log already holds one
                    // durable event per call, and a line per call at info costs the
                    // hot path a write to stderr.
                    tracing::debug!(token = %token, "tokenized");
                    return Ok(Tokenized {
                        token,
                        metadata,
                        reused: false,
                        cvc_not_kept: false,
                    });
                }
                Some(InsertOutcome::Existing(existing)) => {
                    match self.existing(caller, existing, &card, &mut slot).await? {
                        Some(tokenized) => return Ok(tokenized),
                        None => continue,
                    }
                }
                Some(InsertOutcome::OutcomeTaken(stored)) => {
                    return self.first_answer(caller, answer.as_ref(), &stored).await;
                }
                Some(InsertOutcome::TokenTaken) | None => continue,
            }
        }
        Err(self.exhausted(exhausted))
    }

    pub async fn tokenize_batch(
        &self,
        caller: &Caller,
        request: TokenizeBatch,
    ) -> Result<Vec<BatchItem>, VaultError> {
        if request.cards.is_empty() {
            return Err(VaultError::Invalid(Violation {
                field: "cards",
                rule: "required",
                description: "at least one card is required",
            }));
        }
        let max = self.settings().max_batch_size;
        if request.cards.len() > max {
            return Err(VaultError::BatchTooLarge { max });
        }
        let now = now_unix_ms();
        let expires_at = self.expires_at(caller, request.ttl_secs, now)?;
        let shape = self.shape(caller, request.format);
        let (attempts, exhausted) = attempts(shape);
        let mut results: Vec<Option<BatchItem>> = Vec::new();
        results.resize_with(request.cards.len(), || None);
        let mut waiting: Vec<Waiting> = Vec::new();
        for (index, card) in request.cards.into_iter().enumerate() {
            match card {
                Ok(card) => {
                    let (mut metadata, older) =
                        self.metadata(caller, &card, now, request.reuse_existing);
                    metadata.expires_at_unix_ms = expires_at;
                    let watched = match request.guessing_exempt {
                        true => Ok(()),
                        false => {
                            self.watch_fingerprint(caller, &card.pan, &metadata.fingerprint.value)
                                .await
                        }
                    };
                    match watched.and_then(|()| self.cvc_slot(caller, &card)) {
                        Ok(slot) => waiting.push((index, card, metadata, older, slot)),
                        Err(VaultError::Guessing) => {
                            results[index] = Some(BatchItem::Invalid(GUESSING_REFUSED));
                        }
                        Err(VaultError::CvcStoreFull) => {
                            results[index] = Some(BatchItem::Invalid(CVC_STORE_FULL));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(violation) => results[index] = Some(BatchItem::Invalid(violation)),
            }
        }
        for _ in 0..attempts {
            if waiting.is_empty() {
                break;
            }
            let mut records = Vec::with_capacity(waiting.len());
            let mut sealed_cvcs = Vec::with_capacity(waiting.len());
            let mut sealed_waiting = Vec::with_capacity(waiting.len());
            for mut entry in std::mem::take(&mut waiting) {
                let (index, card, metadata, older, _) = &mut entry;
                let mut record = match self
                    .seal(shape, metadata, card, request.reuse_existing, older)
                    .await
                {
                    Ok(record) => record,
                    Err(VaultError::CardTokenSpace { .. }) => {
                        self.exhausted(VaultError::CardTokenSpace {
                            attempts: CARD_ATTEMPTS,
                        });
                        results[*index] = Some(BatchItem::Invalid(CARD_TOKEN_SPACE));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let answer = request.answers.get(*index).and_then(Option::as_ref);
                record.outcome = answer.map(|a| a.stored(&record.token));
                record.claim = answer.and_then(|a| a.claim.clone());
                sealed_cvcs.push(self.seal_cvc(&record.token, card).await?);
                records.push(record);
                sealed_waiting.push(entry);
            }
            waiting = sealed_waiting;
            if waiting.is_empty() {
                break;
            }
            let tokens: Vec<Token> = records.iter().map(|r| r.token.clone()).collect();
            // Every card stored finishes the call: its event commits with them.
            let stored_before = results
                .iter()
                .filter(|r| matches!(r, Some(BatchItem::Stored(_))))
                .count();
            let expected = records.len();
            let (riding, ride) = self
                .journal()
                .riding(caller, move |outcomes: &[InsertOutcome], event| {
                    let finished = outcomes.len() == expected
                        && outcomes.iter().all(|o| *o == InsertOutcome::Stored);
                    if finished {
                        event.detail = crate::audit::stored_detail(stored_before + expected);
                    }
                    finished
                })
                .unzip();
            // One durable write for every valid card of the batch.
            let outcomes = self.store().insert_audited(records, riding).await?;
            self.journal().settle(ride);
            let mut retry = Vec::new();
            for (((mut waiting, token), sealed), outcome) in waiting
                .into_iter()
                .zip(tokens)
                .zip(sealed_cvcs)
                .zip(outcomes)
            {
                let (index, card, metadata, _, slot) = &mut waiting;
                let tokenized = match outcome {
                    InsertOutcome::Stored => {
                        self.hold_cvc(caller, slot.take(), &token, sealed, false);
                        Tokenized {
                            token,
                            metadata: metadata.clone(),
                            reused: false,
                            cvc_not_kept: false,
                        }
                    }
                    // Deleted or expired since the index named it: the next round
                    // stores this card anew instead of failing the whole batch.
                    InsertOutcome::Existing(existing) => {
                        match self.existing(caller, existing, card, slot).await? {
                            Some(tokenized) => tokenized,
                            None => {
                                retry.push(waiting);
                                continue;
                            }
                        }
                    }
                    InsertOutcome::TokenTaken => {
                        retry.push(waiting);
                        continue;
                    }
                    InsertOutcome::OutcomeTaken(stored) => {
                        let answer = request.answers.get(*index).and_then(Option::as_ref);
                        match self.first_answer(caller, answer, &stored).await {
                            Ok(first) => first,
                            Err(VaultError::Sealed(refusal)) => {
                                results[*index] = Some(BatchItem::Invalid(refusal.violation()));
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                };
                results[*index] = Some(BatchItem::Stored(tokenized));
            }
            waiting = retry;
        }
        if !waiting.is_empty() {
            let exhausted = self.exhausted(exhausted);
            if !matches!(exhausted, VaultError::CardTokenSpace { .. }) {
                return Err(exhausted);
            }
            // A card whose card-shaped tokens are used up is refused alone: the others
            // of the batch are stored, and their tokens must reach the caller.
            for (index, ..) in waiting {
                results[index] = Some(BatchItem::Invalid(CARD_TOKEN_SPACE));
            }
        }
        let results: Vec<BatchItem> = results.into_iter().flatten().collect();
        tracing::debug!(items = results.len(), "batch tokenized");
        Ok(results)
    }

    /// The card's existing token, verified, with the CVC kept for it; `None` when it
    /// was deleted or has expired since the index named it (it is purged now), so the
    /// card is stored anew.
    async fn existing(
        &self,
        caller: &Caller,
        existing: Token,
        card: &CardData,
        slot: &mut Option<Slot<'_>>,
    ) -> Result<Option<Tokenized>, VaultError> {
        let stored = match self.load_verified(caller, &existing).await {
            Err(VaultError::NotFound | VaultError::Deleted) => return Ok(None),
            Err(VaultError::Expired) => {
                self.purge_token(&existing).await?;
                return Ok(None);
            }
            other => other?,
        };
        let sealed = self.seal_cvc(&existing, card).await?;
        let cvc_not_kept = !self.hold_cvc(caller, slot.take(), &existing, sealed, true);
        tracing::debug!(token = %existing, "returned existing token");
        Ok(Some(Tokenized {
            token: existing,
            metadata: stored.metadata,
            reused: true,
            cvc_not_kept,
        }))
    }

    /// The shape of the caller's new tokens: `format`, else the tenant's default.
    fn shape(&self, caller: &Caller, format: Option<Format>) -> Shape {
        let tokens = &self.settings().tokens;
        let tenant = caller.tenant.as_str();
        match format.unwrap_or_else(|| tokens.default_format(tenant)) {
            Format::Opaque => Shape::Opaque,
            Format::Card => Shape::Card {
                keep_first_six: tokens.keeps_first_six(tenant),
            },
        }
    }

    /// `exhausted`, counted: a card-shaped token space running out is for operators
    /// to see (it says a tenant keeps too many tokens of one first six and last four).
    fn exhausted(&self, exhausted: VaultError) -> VaultError {
        if matches!(exhausted, VaultError::CardTokenSpace { .. }) {
            self.journal().metrics().event("card_token_space_exhausted");
            tracing::warn!("no free card-shaped token after {CARD_ATTEMPTS} draws");
        }
        exhausted
    }

    /// When a token made now with `ttl_secs` (0: the tenant's default) expires.
    fn expires_at(&self, caller: &Caller, ttl_secs: u64, now: i64) -> Result<i64, VaultError> {
        let ttl = match ttl_secs {
            0 => self
                .settings()
                .tenant_ttl_secs
                .get(caller.tenant.as_str())
                .copied()
                .unwrap_or(0),
            n => n,
        };
        if ttl == 0 {
            return Ok(0);
        }
        if ttl > MAX_TTL_SECS {
            return Err(VaultError::Invalid(Violation {
                field: "ttl_secs",
                rule: "range",
                description: "must be at most 100 years (3155760000 seconds)",
            }));
        }
        Ok(now + ttl as i64 * 1000)
    }

    /// How many of `cards` the caller's tenant holds a token of already (under the
    /// active fingerprint version): an import job's share of known cards, counted
    /// without handing their tokens out.
    pub async fn known_cards(
        &self,
        caller: &Caller,
        cards: &[&CardData],
    ) -> Result<u64, VaultError> {
        let keys = self.keys().snapshot();
        let (version, key) = keys.fingerprint.active();
        let card_keys = cards
            .iter()
            .map(|card| {
                record::card_key(
                    &caller.tenant,
                    &Fingerprint {
                        version,
                        value: record::fingerprint(key, &caller.tenant, &card.pan),
                    },
                )
            })
            .collect();
        Ok(self.store().count_known_cards(card_keys).await?)
    }

    /// The fingerprint and clear metadata of a new record of `card` (the card-data
    /// version is set when it is sealed), and, for `reuse_existing`, the card's index
    /// keys under the older fingerprint versions still held.
    fn metadata(
        &self,
        caller: &Caller,
        card: &CardData,
        now_unix_ms: i64,
        reuse_existing: bool,
    ) -> (Metadata, Vec<Vec<u8>>) {
        let keys = self.keys().snapshot();
        let (fingerprint_version, fingerprint_key) = keys.fingerprint.active();
        let mut metadata = Metadata {
            key_version: keys.card_data.active().0,
            brand: card.pan.brand(),
            last_four: card.pan.last_four(),
            expiry: card.expiry,
            created_at_unix_ms: now_unix_ms,
            fingerprint: Fingerprint {
                version: fingerprint_version,
                value: record::fingerprint(fingerprint_key, &caller.tenant, &card.pan),
            },
            tenant: caller.tenant.clone(),
            expires_at_unix_ms: 0,
        };
        let mut older = Vec::new();
        if reuse_existing {
            let current = metadata.fingerprint;
            for (version, key) in keys.fingerprint.older() {
                metadata.fingerprint = Fingerprint {
                    version,
                    value: record::fingerprint(key, &caller.tenant, &card.pan),
                };
                older.push(metadata.index_key());
            }
            metadata.fingerprint = current;
        }
        (metadata, older)
    }

    /// Seals `card` under a new token of `shape` with an encryption drawn from the
    /// card-data budget, and sets `metadata.key_version` to the version used.
    async fn seal(
        &self,
        shape: Shape,
        metadata: &mut Metadata,
        card: &CardData,
        reuse_existing: bool,
        older_index_keys: &[Vec<u8>],
    ) -> Result<NewRecord, VaultError> {
        let token = self.fresh_token(shape, &metadata.tenant, card).await?;
        let (version, key) = self.keys().encryption_key(Aead::CardData).await?;
        metadata.key_version = version;
        let value = record::seal(&token, metadata, card, &key)?;
        Ok(NewRecord {
            token,
            value,
            index_key: metadata.index_key(),
            reuse_existing,
            older_index_keys: older_index_keys.to_vec(),
            versions: metadata.versions(),
            indexes: metadata.indexes(),
            outcome: None,
            claim: None,
        })
    }

    /// A token of `shape` for `card`. A card-shaped token the tenant deleted (within the
    /// tombstone window) is drawn again: its space can be small, and whoever still
    /// holds the deleted token must never reach another card with it. Opaque tokens
    /// are too many to meet one again.
    async fn fresh_token(
        &self,
        shape: Shape,
        tenant: &Tenant,
        card: &CardData,
    ) -> Result<Token, VaultError> {
        if matches!(shape, Shape::Opaque) {
            return Ok(shape.draw(&card.pan)?);
        }
        for _ in 0..CARD_ATTEMPTS {
            let token = shape.draw(&card.pan)?;
            if !self.was_deleted(tenant, &token).await? {
                return Ok(token);
            }
        }
        Err(VaultError::CardTokenSpace {
            attempts: CARD_ATTEMPTS,
        })
    }

    /// Room in the CVC store for the card's CVC, if it has one.
    fn cvc_slot(&self, caller: &Caller, card: &CardData) -> Result<Option<Slot<'_>>, VaultError> {
        if card.cvc.is_none() {
            return Ok(None);
        }
        match self.cvcs().reserve(caller.tenant.as_str()) {
            Ok(slot) => Ok(Some(slot)),
            Err(cvc::Full) => {
                self.journal().metrics().event("cvc_store_full");
                Err(VaultError::CvcStoreFull)
            }
        }
    }

    /// The card's CVC sealed for `token`, if it has one: before the record is stored,
    /// so that a CVC key that cannot be had refuses the call rather than leave a record
    /// without its CVC.
    async fn seal_cvc(
        &self,
        token: &Token,
        card: &CardData,
    ) -> Result<Option<cvc::Sealed>, VaultError> {
        let Some(code) = &card.cvc else {
            return Ok(None);
        };
        let (version, key) = self.keys().encryption_key(Aead::Cvc).await?;
        Ok(Some(cvc::seal(version, &key, token, code)?))
    }

    /// Keeps the sealed CVC (memory only) for `token` in its slot; for an `existing`
    /// token only if no other identity's CVC is held for it. Returns whether it is
    /// kept (true when there is none).
    fn hold_cvc(
        &self,
        caller: &Caller,
        slot: Option<Slot<'_>>,
        token: &Token,
        sealed: Option<cvc::Sealed>,
        existing: bool,
    ) -> bool {
        let (Some(slot), Some(sealed)) = (slot, sealed) else {
            return true;
        };
        match existing {
            false => {
                self.cvcs().put(slot, token, sealed, &caller.identity);
                true
            }
            true => self.cvcs().offer(slot, token, sealed, &caller.identity),
        }
    }
}

//! GetSealingKey, TokenizeSealed and TokenizeSealedBatch (docs/sealed-intake.md): a
//! card sealed on the customer's device is opened here, checked (key, tenant, window,
//! replay), and tokenized by the same path as `Tokenize`, guessing detector included.
//! The opened card lives for the length of the call, like any other.

use std::sync::Arc;

use futures::future::try_join_all;
use runtime::now_unix_ms;

use super::records::Records;
use super::tokenize::{Answer, BatchItem, Tokenize, TokenizeBatch, Tokenized};
use crate::card::{CardData, Today, Violation};
use crate::error::VaultError;
use crate::intake::{self, Entry, EntryState, Refusal};
use crate::policy::Caller;
use crate::store::{Claim, ClaimRule, Replaceable, Store};
use crate::token::{Format, Token};

/// What a sealer needs, for the caller's tenant.
#[derive(Debug)]
pub struct SealingKey {
    pub public_key: [u8; envelope::sealed::PUBLIC_KEY_LEN],
    pub key_id: envelope::sealed::KeyId,
    pub tenant: String,
    pub server_time_unix_ms: i64,
    pub accepted_until_unix_ms: i64,
    pub max_age_secs: u32,
}

/// Sealed cards to tokenize, with Tokenize's options.
#[derive(Debug)]
pub struct TokenizeSealed {
    pub sealed_cards: Vec<Vec<u8>>,
    pub ttl_secs: u64,
    pub reuse_existing: bool,
    /// The shape of new tokens; `None`: the tenant's default.
    pub format: Option<Format>,
}

/// A sealed card that opened and passed every check.
struct Opened {
    card: CardData,
    entry_key: Vec<u8>,
    entry: Entry,
}

impl Opened {
    /// The card, and its replay entry claimed in the write that stores its record:
    /// the entry's key must be free, or hold an entry that may be replaced (released,
    /// past its window) as judged at `now`, the time the card's window was checked at
    /// (judged later, an entry could outlive the window the card was accepted in).
    fn into_claim(self, now: i64) -> (CardData, Answer) {
        let digest = self.entry.blob_sha256;
        let rule: Replaceable = Arc::new(move |stored| {
            Entry::decode(stored).is_some_and(|entry| entry.replaceable(&digest, now))
        });
        let answer = Answer {
            key: self.entry_key,
            entry: self.entry,
            claim: Some(ClaimRule(rule)),
        };
        (self.card, answer)
    }
}

impl<S: Store> Records<S> {
    pub fn sealing_key(&self, caller: &Caller) -> Result<SealingKey, VaultError> {
        let keys = self.keys().snapshot();
        let active = keys.intake.active().ok_or(VaultError::NoIntakeKey)?;
        let settings = &self.settings().sealed_intake;
        let now = now_unix_ms();
        Ok(SealingKey {
            public_key: active.key.public_key(),
            key_id: active.key.id(),
            tenant: caller.tenant.as_str().to_owned(),
            server_time_unix_ms: now,
            accepted_until_unix_ms: now.saturating_add(settings.key_overlap_ms()),
            max_age_secs: settings.max_age_secs(&caller.tenant),
        })
    }

    /// TokenizeSealed: `request.sealed_cards` holds the one sealed card. Its nonce is
    /// claimed in the same durable write as its record (one commit, as a plain
    /// Tokenize); of every call bringing a sealed card with this nonce within its
    /// window exactly one stores it, across restarts and vaults. The same sealed card
    /// again gets the first answer; another with the same nonce is a replay.
    pub async fn tokenize_sealed(
        &self,
        caller: Caller,
        request: TokenizeSealed,
    ) -> Result<Tokenized, VaultError> {
        let TokenizeSealed {
            sealed_cards,
            ttl_secs,
            reuse_existing,
            format,
        } = request;
        let sealed_card = sealed_cards.first().map(Vec::as_slice).unwrap_or_default();
        let now = now_unix_ms();
        let (card, answer) = self.open_sealed(&caller, sealed_card, now)?.into_claim(now);
        if let Some(first) = self.answered_before(&caller, &answer).await? {
            return Ok(first);
        }
        let done = self
            .tokenize(
                &caller,
                Tokenize {
                    card,
                    ttl_secs,
                    reuse_existing,
                    format,
                    answer: Some(answer.clone()),
                },
            )
            .await?;
        self.claim_reused(&caller, answer, done).await
    }

    /// TokenizeSealedBatch: each sealed card opened and checked on its own (a refused
    /// one is a refused item), then every card in one durable write with its claim, as
    /// [`Self::tokenize_sealed`].
    pub async fn tokenize_sealed_batch(
        &self,
        caller: Caller,
        request: TokenizeSealed,
    ) -> Result<Vec<BatchItem>, VaultError> {
        let max = self.settings().max_batch_size;
        if request.sealed_cards.is_empty() {
            return Err(VaultError::Invalid(Violation {
                field: "sealed_cards",
                rule: "required",
                description: "at least one sealed card is required",
            }));
        }
        if request.sealed_cards.len() > max {
            return Err(VaultError::BatchTooLarge { max });
        }
        // Every card judged at the same `now` as the windows.
        let now = now_unix_ms();
        let count = request.sealed_cards.len();
        let mut results: Vec<Option<BatchItem>> = Vec::new();
        results.resize_with(count, || None);
        // The cards still to store: their places in the batch, the cards, their claims.
        let (mut places, mut cards, mut answers) = (Vec::new(), Vec::new(), Vec::new());
        for (place, blob) in request.sealed_cards.iter().enumerate() {
            let opened = self
                .open_sealed(&caller, blob, now)
                .map(|o| o.into_claim(now));
            let refused = match opened {
                Ok((card, answer)) => match self.answered_before(&caller, &answer).await {
                    Ok(Some(first)) => {
                        results[place] = Some(BatchItem::Stored(first));
                        continue;
                    }
                    Ok(None) => {
                        places.push(place);
                        cards.push(Ok(card));
                        answers.push(Some(answer));
                        continue;
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            results[place] = Some(match refused {
                VaultError::Sealed(refusal) => BatchItem::Invalid(refusal.violation()),
                VaultError::Invalid(violation) => BatchItem::Invalid(violation),
                e => return Err(e),
            });
        }
        if !cards.is_empty() {
            let batch = TokenizeBatch {
                cards,
                ttl_secs: request.ttl_secs,
                reuse_existing: request.reuse_existing,
                format: request.format,
                answers: answers.clone(),
                guessing_exempt: false,
            };
            // The call's answer also holds cards this write does not store (answered
            // before, refused), so its event is written on its own, once it is known.
            let without_event = Caller {
                event: None,
                ..caller.clone()
            };
            let items = self.tokenize_batch(&without_event, batch).await?;
            // Existing tokens' answers, claimed now, all at once (the store commits
            // them together).
            let caller = &caller;
            let items = try_join_all(items.into_iter().zip(answers).map(
                |(item, answer)| async move {
                    match (item, answer) {
                        (BatchItem::Stored(done), Some(answer)) => {
                            match self.claim_reused(caller, answer, done).await {
                                Ok(done) => Ok(BatchItem::Stored(done)),
                                Err(VaultError::Sealed(refusal)) => {
                                    Ok(BatchItem::Invalid(refusal.violation()))
                                }
                                Err(e) => Err(e),
                            }
                        }
                        (item, _) => Ok(item),
                    }
                },
            ))
            .await?;
            for (place, item) in places.into_iter().zip(items) {
                results[place] = Some(item);
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Opens a sealed card for the caller's tenant and checks it, in the order the
    /// document gives: layout, key, open, window (the clear header is trusted only
    /// after the open), then the card itself.
    fn open_sealed(&self, caller: &Caller, blob: &[u8], now: i64) -> Result<Opened, VaultError> {
        use envelope::sealed::SealedCard;
        let sealed = SealedCard::parse(blob).map_err(|_| {
            VaultError::Invalid(Violation {
                field: "sealed_card",
                rule: "format",
                description: "is not a sealed card (docs/sealed-intake.md): wrong length or \
                              format byte",
            })
        })?;
        let settings = &self.settings().sealed_intake;
        let keys = self.keys().snapshot();
        let version = keys
            .intake
            .accepting(&sealed.header.key_id, now, settings.key_overlap_ms())
            .ok_or(VaultError::Sealed(Refusal::UnknownKey))?;
        let json = version
            .key
            .open(caller.tenant.as_str(), &sealed)
            .map_err(|_| VaultError::Sealed(Refusal::Unopenable))?;
        let issued_at = i64::try_from(sealed.header.issued_at_unix_ms)
            .map_err(|_| VaultError::Sealed(Refusal::Expired))?;
        if !settings.in_window(&caller.tenant, issued_at, now) {
            return Err(VaultError::Sealed(Refusal::Expired));
        }
        let card = intake::card(&json, Today::now()).map_err(VaultError::Invalid)?;
        let nonce_id = version.key.nonce_id(&sealed.header.nonce);
        let digest = ring::digest::digest(&ring::digest::SHA256, blob);
        Ok(Opened {
            card,
            entry_key: intake::entry_key(&caller.tenant, &nonce_id),
            entry: Entry {
                keep_until_ms: settings.keep_entry_until_ms(&caller.tenant, issued_at),
                claimed_at_ms: now,
                blob_sha256: digest.as_ref().try_into().unwrap_or([0; 32]),
                // Written only as `Done`, with the token (`Answer::done`).
                state: EntryState::Pending,
                reused: false,
                cvc_not_kept: false,
                token: String::new(),
            },
        })
    }

    /// The first answer, when the sealed card's replay entry is already stored and
    /// may not be replaced (a retry, a replay): read before anything is done with the
    /// card, so that neither the guessing detector, nor the CVC store, nor an existing
    /// token sees it again. Calls that pass this at once are decided by the claim in
    /// the write.
    async fn answered_before(
        &self,
        caller: &Caller,
        answer: &Answer,
    ) -> Result<Option<Tokenized>, VaultError> {
        let Some(rule) = &answer.claim else {
            return Ok(None);
        };
        match self.store().get_outcome(&answer.key).await? {
            Some(stored) if !(rule.0)(&stored) => self
                .first_answer(caller, Some(answer), &stored)
                .await
                .map(Some),
            _ => Ok(None),
        }
    }

    /// A sealed card's answer when `done` returned the card's existing token: a new
    /// record's answer was claimed in its own write, an existing token's is claimed
    /// now, naming it.
    async fn claim_reused(
        &self,
        caller: &Caller,
        answer: Answer,
        done: Tokenized,
    ) -> Result<Tokenized, VaultError> {
        if !done.reused {
            return Ok(done);
        }
        let rule = answer.claim.as_ref().map(|claim| Arc::clone(&claim.0));
        let (key, value) = answer.done(&done);
        let rule = rule.unwrap_or_else(|| Arc::new(|_: &[u8]| false));
        match self.store().claim_outcome(key, value, rule).await? {
            Claim::Claimed => Ok(done),
            Claim::Taken(stored) => self.first_answer(caller, Some(&answer), &stored).await,
        }
    }

    /// The answer to a sealed card whose replay entry another call holds: the first
    /// call's token when it is this very sealed card's entry, else a replay.
    pub(super) async fn first_answer(
        &self,
        caller: &Caller,
        answer: Option<&Answer>,
        stored: &[u8],
    ) -> Result<Tokenized, VaultError> {
        let first = Entry::decode(stored)
            .ok_or(VaultError::Record(crate::record::RecordError::Malformed))?;
        if answer.is_none_or(|answer| first.blob_sha256 != answer.entry.blob_sha256) {
            tracing::warn!("sealed card refused: its nonce was used by another sealed card");
            return Err(VaultError::Sealed(Refusal::Replayed));
        }
        // Left pending by a version that claimed before storing.
        if first.state != EntryState::Done {
            return Err(VaultError::Sealed(Refusal::InFlight));
        }
        let token = Token::parse(&first.token)
            .map_err(|_| VaultError::Record(crate::record::RecordError::Malformed))?;
        let stored = match self.load_verified(caller, &token).await {
            // Its own refusal, so that a batch refuses this card alone.
            Err(VaultError::Deleted | VaultError::Expired | VaultError::NotFound) => {
                Err(VaultError::Sealed(Refusal::TokenDeleted))
            }
            other => other,
        }?;
        Ok(Tokenized {
            token,
            metadata: stored.metadata,
            reused: first.reused,
            cvc_not_kept: first.cvc_not_kept,
        })
    }
}

//! GetSealingKey, TokenizeSealed and TokenizeSealedBatch (docs/sealed-intake.md): a
//! card sealed on the customer's device is opened here, checked (key, tenant, window,
//! replay), and tokenized by the same path as `Tokenize`, guessing detector included.
//! The opened card lives for the length of the call, like any other.

use std::future::Future;
use std::sync::Arc;

use futures::future::join_all;
use runtime::now_unix_ms;

use super::records::Records;
use super::tokenize::{Answer, BatchItem, Tokenize, TokenizeBatch, Tokenized};
use crate::card::{CardData, Today, Violation};
use crate::error::VaultError;
use crate::intake::{self, Entry, EntryState, Refusal};
use crate::policy::Caller;
use crate::store::{Claim, Replaceable, Store, StoreError};
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

/// A sealed card that opened and passed every check, its replay entry not yet claimed.
struct Opened {
    card: CardData,
    entry_key: Vec<u8>,
    entry: Entry,
}

/// Where a sealed card stands once its replay entry was claimed (or found).
enum Claimed {
    /// Ours: tokenize it, then record the outcome under `entry_key`.
    New(Opened),
    /// The same sealed card was tokenized before: the first answer.
    Answered(Tokenized),
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

    /// TokenizeSealed and TokenizeSealedBatch on a task of their own: a caller going
    /// away (its deadline, a dropped connection) must not stop a call between claiming
    /// a sealed card and recording how it ended, or the card would stay "in flight"
    /// and its retry be refused until the window ends.
    pub async fn tokenize_sealed_settled(
        self: &Arc<Self>,
        caller: Caller,
        request: TokenizeSealed,
    ) -> Result<Tokenized, VaultError> {
        let records = Arc::clone(self);
        settled(async move { records.tokenize_sealed(&caller, request).await }).await
    }

    /// TokenizeSealedBatch, on a task of its own like [`Self::tokenize_sealed_settled`].
    pub async fn tokenize_sealed_batch_settled(
        self: &Arc<Self>,
        caller: Caller,
        request: TokenizeSealed,
    ) -> Result<Vec<BatchItem>, VaultError> {
        let records = Arc::clone(self);
        settled(async move { records.tokenize_sealed_batch(&caller, request).await }).await
    }

    /// TokenizeSealed: `request.sealed_cards` holds the one sealed card.
    async fn tokenize_sealed(
        &self,
        caller: &Caller,
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
        let opened = self.open_sealed(caller, sealed_card, now)?;
        let opened = match self.claim(caller, opened, now).await? {
            Claimed::Answered(first) => return Ok(first),
            Claimed::New(opened) => opened,
        };
        let Opened {
            card,
            entry_key,
            entry,
        } = opened;
        let answer = Answer {
            key: entry_key,
            entry,
        };
        let result = self
            .tokenize(
                caller,
                Tokenize {
                    card,
                    ttl_secs,
                    reuse_existing,
                    format,
                    answer: Some(answer.clone()),
                },
            )
            .await;
        self.settle(answer, result.as_ref().ok()).await;
        result
    }

    async fn tokenize_sealed_batch(
        &self,
        caller: &Caller,
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
        let now = now_unix_ms();
        let mut results: Vec<Option<BatchItem>> = Vec::new();
        results.resize_with(request.sealed_cards.len(), || None);
        // The claimed cards' answers, by index, in the order they go into the batch.
        let mut claimed: Vec<(usize, Answer)> = Vec::new();
        let mut cards = Vec::new();
        // Every claim at once: the store commits them together (one sync, not one per
        // card), all judged at the same `now` as the windows.
        let claims = join_all(request.sealed_cards.iter().map(|blob| async move {
            match self.open_sealed(caller, blob, now) {
                Ok(opened) => self.claim(caller, opened, now).await,
                Err(e) => Err(e),
            }
        }))
        .await;
        for (index, opened) in claims.into_iter().enumerate() {
            match opened {
                Ok(Claimed::New(opened)) => {
                    let answer = Answer {
                        key: opened.entry_key,
                        entry: opened.entry,
                    };
                    claimed.push((index, answer));
                    cards.push(Ok(opened.card));
                }
                Ok(Claimed::Answered(first)) => results[index] = Some(BatchItem::Stored(first)),
                Err(VaultError::Sealed(refusal)) => {
                    results[index] = Some(BatchItem::Invalid(Violation {
                        field: "sealed_cards",
                        rule: refusal.rule(),
                        description: refusal.message(),
                    }));
                }
                Err(VaultError::Invalid(violation)) => {
                    results[index] = Some(BatchItem::Invalid(violation));
                }
                Err(e) => {
                    self.release_all(claimed).await;
                    return Err(e);
                }
            }
        }
        if !cards.is_empty() {
            let batch = TokenizeBatch {
                cards,
                ttl_secs: request.ttl_secs,
                reuse_existing: request.reuse_existing,
                format: request.format,
                answers: claimed.iter().map(|(_, a)| Some(a.clone())).collect(),
                guessing_exempt: false,
            };
            // The call's answer also holds replayed cards this write does not store, so
            // its event is written on its own, after the answer is known.
            let without_event = Caller {
                event: None,
                ..caller.clone()
            };
            let items = match self.tokenize_batch(&without_event, batch).await {
                Ok(items) => items,
                Err(e) => {
                    self.release_all(claimed).await;
                    return Err(e);
                }
            };
            // Every outcome at once, like the claims.
            let claimed_items: Vec<_> = claimed.into_iter().zip(items).collect();
            join_all(claimed_items.iter().map(|((_, answer), item)| {
                let done = match item {
                    BatchItem::Stored(done) => Some(done),
                    BatchItem::Invalid(_) => None,
                };
                self.settle(answer.clone(), done)
            }))
            .await;
            for ((index, _), item) in claimed_items {
                results[index] = Some(item);
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
                state: EntryState::Pending,
                reused: false,
                cvc_not_kept: false,
                token: String::new(),
            },
        })
    }

    /// Claims the sealed card's nonce in the shared store: of every call bringing a
    /// sealed card with this nonce within its window, exactly one wins, across restarts
    /// and vaults. The same sealed card again gets the first answer; another with the
    /// same nonce is a replay.
    ///
    /// `now` is the time the card's window was checked at: judged at a later time, an
    /// entry could have outlived the window the card was just accepted in.
    async fn claim(
        &self,
        caller: &Caller,
        opened: Opened,
        now: i64,
    ) -> Result<Claimed, VaultError> {
        let digest = opened.entry.blob_sha256;
        let replaceable: Replaceable = Arc::new(move |stored| {
            Entry::decode(stored).is_some_and(|entry| entry.replaceable(&digest, now))
        });
        let claim = self
            .store()
            .claim_outcome(opened.entry_key.clone(), opened.entry.encode(), replaceable)
            .await?;
        let Claim::Taken(stored) = claim else {
            return Ok(Claimed::New(opened));
        };
        let first = Entry::decode(&stored)
            .ok_or(VaultError::Record(crate::record::RecordError::Malformed))?;
        if first.blob_sha256 != opened.entry.blob_sha256 {
            tracing::warn!("sealed card refused: its nonce was used by another sealed card");
            return Err(VaultError::Sealed(Refusal::Replayed));
        }
        if first.state != EntryState::Done {
            return Err(VaultError::Sealed(Refusal::InFlight));
        }
        let token = Token::parse(&first.token)
            .map_err(|_| VaultError::Record(crate::record::RecordError::Malformed))?;
        let stored = self.load_verified(caller, &token).await?;
        Ok(Claimed::Answered(Tokenized {
            token,
            metadata: stored.metadata,
            reused: first.reused,
            cvc_not_kept: first.cvc_not_kept,
        }))
    }

    /// Records how a claimed sealed card ended: its token, or released for another try
    /// when it failed. A failure to record is logged: the caller has its answer, and a
    /// retry of the same sealed card is refused as in flight until the window ends.
    async fn record_outcome(&self, key: Vec<u8>, mut entry: Entry, done: Option<&Tokenized>) {
        match done {
            Some(done) => {
                entry.state = EntryState::Done;
                entry.reused = done.reused;
                entry.cvc_not_kept = done.cvc_not_kept;
                entry.token = done.token.as_str().to_owned();
            }
            None => entry.state = EntryState::Released,
        }
        if let Err(e) = self.store().put_outcome(key, entry.encode()).await {
            tracing::error!(error = %e, "a sealed card's outcome could not be recorded");
        }
    }

    /// Settles a claimed sealed card: a new record's answer was stored with it (in
    /// the same write); an existing token's answer, or a failure's release, is
    /// recorded now.
    async fn settle(&self, answer: Answer, done: Option<&Tokenized>) {
        if done.is_some_and(|done| !done.reused) {
            return;
        }
        self.record_outcome(answer.key, answer.entry, done).await;
    }

    async fn release_all(&self, claimed: Vec<(usize, Answer)>) {
        join_all(
            claimed
                .into_iter()
                .map(|(_, answer)| self.record_outcome(answer.key, answer.entry, None)),
        )
        .await;
    }
}

/// Runs `work` on a task of its own and waits for it: dropping the wait (the caller
/// went away) leaves the work running to its end.
async fn settled<T: Send + 'static>(
    work: impl Future<Output = Result<T, VaultError>> + Send + 'static,
) -> Result<T, VaultError> {
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Err(VaultError::Store(StoreError::Closed)),
    }
}

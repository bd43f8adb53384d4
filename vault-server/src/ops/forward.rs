//! Forward: a token in, the card sent to an allowlisted processor, the processor's
//! (masked) answer out. A linear pipeline whose plaintext scope is one block:
//!
//! 1. check the request (processor, templates, headers, token, idempotency key);
//! 2. replay a stored outcome of the same idempotency key, if there is one;
//! 3. read the record's metadata only (and check that its key is held), and count the
//!    forward for the velocity rules;
//! 4. claim the idempotency key in the store (`Pending`, put-if-absent: of concurrent
//!    forwards under one key, on any of the vaults sharing a database, one goes on),
//!    and claim the CVC, still sealed;
//! 5. audit the intent durably ("ForwardStarted");
//! 6. only then open the card and the CVC, send, and drop them;
//! 7. store the outcome for replays.
//!
//! Until the request could have reached the processor, every exit (an error, a
//! cancelled call) puts the CVC back and releases the idempotency key (`Unsent`).
//! After that the CVC is spent and the key stays claimed ("sent, outcome unknown"), or
//! a retry could charge twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runtime::now_unix_ms;
use zeroize::Zeroizing;

use super::records::Records;
use crate::audit::AuditEvent;
use crate::card::{CardData, Violation};
use crate::cvc::Claimed;
use crate::error::VaultError;
use crate::forward::template::{Encoding, Field, Template, TemplateError};
use crate::forward::{Answer, ForwardError, Outbound, Processor, Processors, idempotency};
use crate::policy::Caller;
use crate::record::StoredRecord;
use crate::store::{Claim, Replaceable, Store};
use crate::token::Token;
use crate::velocity::{Velocity, VelocitySettings};

/// A Forward as the caller wrote it; checked by [`Forwarder::forward`].
#[derive(Debug, Default)]
pub struct ForwardRequest {
    pub processor: String,
    pub method: String,
    pub path: String,
    /// Name and value template of each header.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub token: String,
    /// Empty: none.
    pub idempotency_key: String,
    /// Why the card is sent (empty: none given); see [`check_reason`].
    pub reason: String,
    /// A route the processor declares (empty: a free-form forward, with method,
    /// path and body).
    pub route: String,
    /// The route's fields.
    pub fields: std::collections::BTreeMap<String, String>,
}

/// What the processor answered (masked), or the stored answer replayed.
#[derive(Debug)]
pub struct Forwarded {
    pub answer: Answer,
    pub replayed: bool,
}

#[derive(Debug)]
pub struct ForwardSettings {
    pub processors: Processors,
    pub velocity: VelocitySettings,
    pub idempotency_ttl: Duration,
}

#[derive(Debug)]
pub struct Forwarder<S> {
    records: Arc<Records<S>>,
    processors: Processors,
    velocity: Velocity,
    idempotency_ttl: Duration,
    /// Idempotency store keys of forwards in progress: a concurrent retry is refused
    /// instead of charging twice.
    in_flight: Arc<Mutex<HashSet<Vec<u8>>>>,
}

/// A request that passed every check that needs no stored data.
struct Checked<'a> {
    processor: &'a Processor,
    outbound: Outbound,
    token: Token,
    idempotency: Option<IdempotencyKey>,
}

#[derive(Clone)]
struct IdempotencyKey {
    store_key: Vec<u8>,
    digest: [u8; 32],
}

fn invalid(field: &'static str, rule: &'static str, description: &'static str) -> VaultError {
    VaultError::Invalid(Violation {
        field,
        rule,
        description,
    })
}

/// A free-form forward's request, as the caller wrote it (for processors with
/// `dangerous_free_form`): its templates parsed and checked.
fn free_form(request: &ForwardRequest) -> Result<Outbound, VaultError> {
    let body = Template::parse(&request.body).map_err(|e| match e {
        TemplateError::Unknown => invalid("body", "placeholder", "holds an unknown placeholder"),
        TemplateError::Unclosed => invalid("body", "placeholder", "holds an unclosed placeholder"),
    })?;
    const GLUED: &str = "a card number, CVC or name placeholder must not touch a letter, a \
                         digit or another placeholder";
    if body.glued() {
        return Err(invalid("body", "glued", GLUED));
    }
    let mut headers = Vec::with_capacity(request.headers.len());
    for (name, value) in &request.headers {
        if !crate::forward::valid_header_name(name) {
            return Err(invalid(
                "headers.name",
                "header_name",
                "must be a valid header name that the vault does not reserve",
            ));
        }
        // Placeholders are ASCII, so a template that is a valid header value stays
        // one except for what the card data brings (checked after rendering).
        if tonic::codegen::http::HeaderValue::from_str(value).is_err() {
            return Err(invalid(
                "headers.value",
                "characters",
                "must be a valid header value",
            ));
        }
        let template = Template::parse(value).map_err(|_| {
            invalid(
                "headers.value",
                "placeholder",
                "holds an unknown or unclosed placeholder",
            )
        })?;
        if template.glued() {
            return Err(invalid("headers.value", "glued", GLUED));
        }
        headers.push((name.clone(), template));
    }
    let content_types = || {
        request
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    };
    if content_types().count() > 1 {
        return Err(invalid(
            "headers",
            "duplicate",
            "content-type may appear once",
        ));
    }
    let outbound = Outbound {
        method: request.method.clone(),
        path: request.path.clone(),
        headers,
        body,
        secrets: Vec::new(),
    };
    Ok(outbound)
}

/// The longest reason, in characters.
const MAX_REASON_CHARS: usize = 200;
/// The shortest run of digits (with spaces, dashes or dots between) a reason may not
/// hold: the shortest card number.
const CARD_LIKE_DIGITS: usize = 12;

/// A forward's reason: bounded, printable, and with nothing that could be a card
/// number (a reason is free text, kept in the audit log and shown by `audit tail`).
pub fn check_reason(reason: &str) -> Result<(), VaultError> {
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(invalid(
            "reason",
            "too_long",
            "must be at most 200 characters",
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err(invalid(
            "reason",
            "characters",
            "must not hold control characters",
        ));
    }
    let mut run = 0;
    let mut separated = false;
    for c in reason.chars() {
        if c.is_ascii_digit() {
            run += 1;
            separated = false;
        } else if matches!(c, ' ' | '-' | '.') && run > 0 && !separated {
            // One separator between digits keeps the run going ("4242 4242 ...").
            separated = true;
        } else {
            run = 0;
            separated = false;
        }
        if run >= CARD_LIKE_DIGITS {
            return Err(invalid(
                "reason",
                "card_number",
                "must not hold 12 or more digits in a row: nothing that could be a card number",
            ));
        }
    }
    Ok(())
}

impl<S: Store> Forwarder<S> {
    pub fn new(records: Arc<Records<S>>, settings: ForwardSettings) -> Self {
        Self {
            records,
            processors: settings.processors,
            velocity: Velocity::new(settings.velocity),
            idempotency_ttl: settings.idempotency_ttl,
            in_flight: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    pub async fn forward(
        &self,
        caller: &Caller,
        request: ForwardRequest,
    ) -> Result<Forwarded, VaultError> {
        let Checked {
            processor,
            outbound,
            token,
            idempotency,
        } = self.check(caller, &request)?;
        let in_flight = match &idempotency {
            Some(key) => Some(self.claim_in_flight(&key.store_key)?),
            None => None,
        };
        if let Some(key) = &idempotency
            && let Some(answer) = self.replay(caller, &token, key).await?
        {
            tracing::info!(
                processor = processor.name(),
                status = answer.status,
                "replayed stored forward outcome"
            );
            return Ok(Forwarded {
                answer,
                replayed: true,
            });
        }

        let stored = self.records.load(caller, &token).await?;
        self.records.openable(&stored)?;
        self.check_velocity(caller, &token, processor.name(), &stored)
            .await?;
        let mut unsent = Unsent {
            records: &self.records,
            token: &token,
            cvc: None,
            pending: None,
            in_flight,
            armed: true,
        };
        if let Some(key) = &idempotency {
            match self.claim_key(caller, &token, key, &mut unsent).await {
                Ok(None) => {}
                Ok(Some(answer)) => {
                    return Ok(Forwarded {
                        answer,
                        replayed: true,
                    });
                }
                Err(e) => {
                    unsent.release().await;
                    return Err(e);
                }
            }
        }
        let opened = match self
            .prepare(
                caller,
                processor,
                &outbound,
                &request.reason,
                &stored,
                &mut unsent,
            )
            .await
        {
            Ok(opened) => opened,
            Err(e) => {
                unsent.release().await;
                return Err(e);
            }
        };
        // The card's plaintext scope: opened by `prepare` just now, dropped as soon as
        // the request is sent. From here on the request may reach the processor.
        unsent.armed = false;
        let sent = {
            let (card, cvc) = opened;
            processor
                .send(&outbound, &card, cvc.as_ref().map(|cvc| cvc.as_str()))
                .await
        };
        let forwarded = |outcome: &str| {
            self.records
                .journal()
                .metrics()
                .forwards
                .get_or_create(&crate::metrics::ForwardLabels {
                    processor: processor.name().into(),
                    outcome: outcome.into(),
                })
                .inc();
        };
        let answer = match sent {
            Ok(answer) => {
                forwarded("answered");
                answer
            }
            Err(error) if error.nothing_sent() => {
                forwarded("not_sent");
                unsent.release().await;
                return Err(VaultError::Forward(error));
            }
            Err(error) => {
                forwarded("failed");
                // Answered, but withheld: a retry under the key gets the same, never a
                // second charge.
                if let (Some(key), Some(status)) = (&idempotency, error.withheld_status()) {
                    let value = idempotency::encode(
                        idempotency::State::Withheld,
                        &key.digest,
                        now_unix_ms(),
                        &Answer {
                            status,
                            ..Answer::default()
                        },
                    );
                    self.records
                        .store()
                        .put_outcome(key.store_key.clone(), value)
                        .await?;
                }
                return Err(VaultError::Forward(error));
            }
        };
        tracing::debug!(processor = processor.name(), token = %token, status = answer.status, "forwarded");
        if let Some(key) = idempotency {
            let value = idempotency::encode(
                idempotency::State::Done,
                &key.digest,
                now_unix_ms(),
                &answer,
            );
            self.records
                .store()
                .put_outcome(key.store_key, value)
                .await?;
        }
        Ok(Forwarded {
            answer,
            replayed: false,
        })
    }

    /// Step 4, the key: claims it in the store, `Pending`, before anything is opened
    /// or sent. A crash from here on leaves it pending, and a retry gets ABORTED
    /// instead of a second charge. When a concurrent forward claimed it since step 2
    /// (on this vault or another), its stored answer to the same request is replayed,
    /// or the call is refused.
    async fn claim_key(
        &self,
        caller: &Caller,
        token: &Token,
        key: &IdempotencyKey,
        unsent: &mut Unsent<'_, S>,
    ) -> Result<Option<Answer>, VaultError> {
        let pending = idempotency::encode(
            idempotency::State::Pending,
            &key.digest,
            now_unix_ms(),
            &Default::default(),
        );
        // Marked for release before the write, whose outcome may be unknown when it
        // fails.
        unsent.pending = Some(Held {
            key: key.clone(),
            pending: pending.clone(),
        });
        let window = self.idempotency_ttl;
        let replaceable: Replaceable =
            Arc::new(move |stored| idempotency::replaceable(stored, window, now_unix_ms()));
        let claimed = self
            .records
            .store()
            .claim_outcome(key.store_key.clone(), pending, replaceable)
            .await?;
        let Claim::Taken(stored) = claimed else {
            return Ok(None);
        };
        unsent.pending = None;
        let outcome = idempotency::decode(&stored)
            .ok_or(VaultError::Record(crate::record::RecordError::Malformed))?;
        if outcome.state == idempotency::State::Pending && outcome.request_digest == key.digest {
            return Err(VaultError::IdempotencyInFlight);
        }
        self.replay_outcome(caller, token, key, outcome)
            .await?
            .map(Some)
            .ok_or(VaultError::IdempotencyInFlight)
    }

    /// Steps 4 (the CVC) to 6: claims the CVC, audits the intent, and only then opens
    /// the card and the CVC.
    async fn prepare(
        &self,
        caller: &Caller,
        processor: &Processor,
        outbound: &Outbound,
        reason: &str,
        stored: &StoredRecord,
        unsent: &mut Unsent<'_, S>,
    ) -> Result<(CardData, Option<Zeroizing<String>>), VaultError> {
        let token = unsent.token;
        // A CVC is good for one use: claimed atomically, so two concurrent forwards
        // cannot both send it.
        if outbound.uses(Field::Cvc) {
            unsent.cvc = Some(
                self.records
                    .cvcs()
                    .claim(token)
                    .ok_or(VaultError::CvcUnavailable)?,
            );
        }
        // The card leaves the vault only once that is on record.
        self.records
            .journal()
            .intent(caller, "ForwardStarted", token, processor.name(), reason)
            .await?;
        let card = self.records.open(token, stored)?;
        let cvc = match &unsent.cvc {
            Some(claimed) => Some(
                claimed
                    .open(&self.records.keys().snapshot(), token)
                    .ok_or(VaultError::CvcUnavailable)?,
            ),
            None => None,
        };
        Ok((card, cvc))
    }

    /// Step 1: every check that needs no stored data, in the order callers see them.
    fn check<'a>(
        &'a self,
        caller: &Caller,
        request: &ForwardRequest,
    ) -> Result<Checked<'a>, VaultError> {
        // An unknown processor is refused exactly like one the caller may not use.
        let processor = self
            .processors
            .get(&request.processor)
            .ok_or(VaultError::Forward(ForwardError::Denied(
                "unknown processor",
            )))?;
        let declared = !request.route.is_empty();
        let outbound = match declared {
            true => {
                if !request.method.is_empty()
                    || !request.path.is_empty()
                    || !request.body.is_empty()
                {
                    return Err(invalid(
                        "route",
                        "exclusive",
                        "a forward names a route, or (free-form) a method, path and body; not both",
                    ));
                }
                processor
                    .route(&request.route)
                    .ok_or(VaultError::Forward(ForwardError::Denied(
                        "route not declared",
                    )))?
                    .outbound(&request.fields, &request.headers)
                    .map_err(VaultError::Invalid)?
            }
            false => free_form(request)?,
        };
        processor
            .check(&caller.identity, &outbound, declared)
            .map_err(VaultError::Forward)?;
        // Free text goes only where it can be escaped.
        let content_type = outbound.content_type().and_then(Template::plain);
        if outbound.body.fields().any(|f| f == Field::Name)
            && Encoding::for_content_type(content_type.as_deref()) == Encoding::Raw
        {
            return Err(invalid(
                "body",
                "content_type",
                "{{card.name}} in a body needs a JSON or form-encoded content-type header",
            ));
        }
        check_reason(&request.reason)?;
        if request.reason.is_empty() && processor.requires_reason() {
            return Err(invalid(
                "reason",
                "required",
                "this processor requires a reason for every forward",
            ));
        }
        let token = Token::parse(&request.token).map_err(VaultError::Invalid)?;
        let idempotency = match request.idempotency_key.as_str() {
            "" => None,
            key if key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(invalid(
                    "idempotency_key",
                    "format",
                    "must be 1 to 255 visible ASCII characters",
                ));
            }
            key => {
                // Each part length-prefixed by the digest; the counts keep headers and
                // fields apart.
                let counts = format!("{} {}", request.headers.len(), request.fields.len());
                let mut parts: Vec<&[u8]> = vec![
                    request.processor.as_bytes(),
                    request.method.as_bytes(),
                    request.path.as_bytes(),
                    request.body.as_bytes(),
                    request.token.as_bytes(),
                    request.route.as_bytes(),
                    request.reason.as_bytes(),
                    counts.as_bytes(),
                ];
                for (name, value) in &request.headers {
                    parts.push(name.as_bytes());
                    parts.push(value.as_bytes());
                }
                // A BTreeMap: in name order.
                for (name, value) in &request.fields {
                    parts.push(name.as_bytes());
                    parts.push(value.as_bytes());
                }
                Some(IdempotencyKey {
                    store_key: idempotency::store_key(&caller.tenant, key),
                    digest: idempotency::request_digest(&parts),
                })
            }
        };
        Ok(Checked {
            processor,
            outbound,
            token,
            idempotency,
        })
    }

    /// Marks the key as in progress here; a concurrent retry is refused.
    fn claim_in_flight(&self, store_key: &[u8]) -> Result<InFlight, VaultError> {
        let mut set = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !set.insert(store_key.to_vec()) {
            return Err(VaultError::IdempotencyInFlight);
        }
        Ok(InFlight {
            set: Arc::clone(&self.in_flight),
            key: store_key.to_vec(),
        })
    }

    /// Step 2: the stored answer to the same request under this key, or a refusal
    /// when the key was used for another request or its outcome is unknown.
    async fn replay(
        &self,
        caller: &Caller,
        token: &Token,
        key: &IdempotencyKey,
    ) -> Result<Option<Answer>, VaultError> {
        let Some(bytes) = self.records.store().get_outcome(&key.store_key).await? else {
            return Ok(None);
        };
        let outcome = idempotency::decode(&bytes)
            .ok_or(VaultError::Record(crate::record::RecordError::Malformed))?;
        self.replay_outcome(caller, token, key, outcome).await
    }

    /// What a stored outcome means for a forward under its key: its answer to replay,
    /// a refusal, or nothing (released or expired: the key is free).
    async fn replay_outcome(
        &self,
        caller: &Caller,
        token: &Token,
        key: &IdempotencyKey,
        outcome: idempotency::Outcome,
    ) -> Result<Option<Answer>, VaultError> {
        let age_ms = now_unix_ms().saturating_sub(outcome.created_at_unix_ms);
        let live = age_ms < self.idempotency_ttl.as_millis() as i64;
        if !live || outcome.state == idempotency::State::NotSent {
            return Ok(None);
        }
        if outcome.request_digest != key.digest {
            return Err(VaultError::IdempotencyConflict);
        }
        if outcome.state == idempotency::State::Pending {
            return Err(VaultError::IdempotencyUnknown);
        }
        if outcome.state == idempotency::State::Withheld {
            return Err(VaultError::Forward(ForwardError::Unreadable {
                status: outcome.answer.status,
                what: "in a form the vault could not mask",
            }));
        }
        // A token deleted or expired since is gone for replays too.
        self.records.load(caller, token).await?;
        Ok(Some(outcome.answer))
    }

    /// Step 3: counts a forward for the velocity rules; a forward above a limit is
    /// flagged in the audit log and, if so configured, refused.
    async fn check_velocity(
        &self,
        caller: &Caller,
        token: &Token,
        processor: &str,
        stored: &StoredRecord,
    ) -> Result<(), VaultError> {
        let broken = self.velocity.forward(
            &caller.identity,
            &stored.metadata.card_key(),
            Instant::now(),
        );
        if broken.is_empty() {
            return Ok(());
        }
        let refuse = self.velocity.refuses();
        let journal = self.records.journal();
        journal.metrics().event("velocity_flag");
        tracing::warn!(token = %token, rules = %broken.join("; "), refused = refuse, "forward flagged by velocity rules");
        journal
            .audit(AuditEvent {
                at_unix_ms: now_unix_ms(),
                actor: caller.identity.clone(),
                peer: "-".into(),
                action: "VelocityFlag".into(),
                tenant: caller.tenant.as_str().to_owned(),
                token: token.as_str().to_owned(),
                processor: processor.to_owned(),
                outcome: if refuse { "refused" } else { "flagged" }.into(),
                detail: broken.join("; "),
                ..AuditEvent::default()
            })
            .await?;
        if refuse {
            return Err(VaultError::VelocityExceeded);
        }
        Ok(())
    }
}

/// Removes an idempotency key from the in-flight set when the forward ends (for a
/// cancelled one, once its key is released).
struct InFlight {
    set: Arc<Mutex<HashSet<Vec<u8>>>>,
    key: Vec<u8>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// An idempotency key this forward claimed, and the exact `Pending` value it wrote: a
/// release replaces only that value, never another forward's claim.
struct Held {
    key: IdempotencyKey,
    pending: Vec<u8>,
}

/// What a forward holds until its request could have reached the processor: the
/// claimed CVC and the idempotency key written `Pending`. [`Unsent::release`] gives
/// them back (the key as `NotSent`, reusable); while `armed`, dropping does the same
/// for a cancelled call, the key's write in the background. The key stays in flight
/// here until it is released, so that no retry can write it in between. Disarmed, a
/// drop settles the CVC as spent.
struct Unsent<'a, S: Store> {
    records: &'a Records<S>,
    token: &'a Token,
    cvc: Option<Claimed>,
    pending: Option<Held>,
    in_flight: Option<InFlight>,
    armed: bool,
}

impl<S: Store> Unsent<'_, S> {
    async fn release(mut self) {
        self.armed = false;
        if let Some(claimed) = self.cvc.take() {
            self.records.cvcs().restore(self.token, claimed);
        }
        if let Some(key) = self.pending.take() {
            let store = Arc::clone(self.records.store());
            if let Err(e) = write_not_sent(store, key).await {
                // The key stays `Pending`: a retry is refused as "outcome unknown"
                // until the window ends, which never charges twice.
                tracing::error!(error = %e, "idempotency key not released");
            }
        }
    }
}

impl<S: Store> Drop for Unsent<'_, S> {
    fn drop(&mut self) {
        if let Some(claimed) = self.cvc.take() {
            if self.armed {
                self.records.cvcs().restore(self.token, claimed);
            } else {
                self.records.cvcs().settle(self.token, claimed);
            }
        }
        let Some(key) = self.pending.take().filter(|_| self.armed) else {
            return;
        };
        let in_flight = self.in_flight.take();
        let store = Arc::clone(self.records.store());
        let release = async move {
            if let Err(e) = write_not_sent(store, key).await {
                tracing::error!(error = %e, "idempotency key of a cancelled forward not released");
            }
            drop(in_flight);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(release)),
            // Shutting down: the key stays `Pending`, which never charges twice.
            Err(_) => tracing::warn!("idempotency key of a cancelled forward left pending"),
        }
    }
}

/// Releases a claimed key: `NotSent` replaces the claim's own `Pending` value (or an
/// absent one, when the claim's write failed), and nothing else.
async fn write_not_sent<S: Store>(store: Arc<S>, held: Held) -> Result<(), VaultError> {
    let value = idempotency::encode(
        idempotency::State::NotSent,
        &held.key.digest,
        now_unix_ms(),
        &Default::default(),
    );
    let pending = held.pending;
    let own: Replaceable = Arc::new(move |stored| stored == pending.as_slice());
    if let Claim::Taken(_) = store.claim_outcome(held.key.store_key, value, own).await? {
        tracing::debug!("idempotency key claimed by another forward: not released");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(reason: &str) -> Option<&'static str> {
        match check_reason(reason) {
            Ok(()) => None,
            Err(VaultError::Invalid(violation)) => Some(violation.rule),
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn a_reason_holds_nothing_like_a_card_number() {
        for fine in [
            "",
            "recurring charge 2026-12",
            "order 12345678901",
            "ref 1234 5678 901",
            "invoice 2026-12-07 / 10:30",
        ] {
            assert_eq!(rule(fine), None, "{fine}");
        }
        for card_like in [
            "424242424242",
            "pan 4242 4242 4242 4242",
            "5555-5555-5555-4444",
            "3782.822463.10005",
        ] {
            assert_eq!(rule(card_like), Some("card_number"), "{card_like}");
        }
        assert_eq!(rule("a\tb"), Some("characters"));
        assert_eq!(rule(&"é".repeat(200)), None);
        assert_eq!(rule(&"é".repeat(201)), Some("too_long"));
    }
}

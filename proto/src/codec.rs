//! The gRPC codec of every service: prost, except that
//! - a message that does not decode (malformed protobuf, a string field that is not
//!   UTF-8) is INVALID_ARGUMENT naming the field (from the schema, never the value).
//!   tonic's stock codec answers INTERNAL with prost's error text;
//! - the repeated fields of requests hold a bounded number of entries, counted on the
//!   wire before anything is decoded (see [`repeated_limits`]).

use std::any::TypeId;
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

#[derive(Debug)]
pub struct Codec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct CheckedDecoder<U>(PhantomData<U>);

/// Most cards in one `TokenizeBatch` message, whatever the vault's `max_batch_size`
/// (which cannot be set higher).
pub const MAX_BATCH_CARDS: usize = 100_000;
/// Most headers in one `Forward` request.
pub const MAX_FORWARD_HEADERS: usize = 1_000;
/// Most entries in each list of a keyservice usage report.
pub const MAX_USAGE_ENTRIES: usize = 100_000;
/// Most fields of a `Forward` request's route.
pub const MAX_FORWARD_FIELDS: usize = 1_000;
/// Most erasures a vault reports in one call (the keyservice refuses more than 4096).
pub const MAX_ERASURES_PER_REPORT: usize = 4_096;
/// Most tokens an export job names (more: export all, or several jobs).
pub const MAX_EXPORT_TOKENS: usize = 100_000;

/// The top-level repeated fields of request messages: (field number, field name, most
/// entries). prost turns a 2-byte empty entry into a whole struct (an empty `Card` is
/// 80 bytes), so without this a request within `max_request_bytes` could decode into
/// 40 times its size (4 MiB of empty cards: 2 million `Card`s, over 300 MiB).
///
/// When changing this: a new repeated field in a request message (or a new request
/// message with one) gets an entry here. Responses are not limited: the client
/// library decodes them with the same codec.
fn repeated_limits<U: 'static>() -> &'static [(u32, &'static str, usize)] {
    use crate::{keys::v1 as keys, vault::v1 as vault};
    let message = TypeId::of::<U>();
    if message == TypeId::of::<vault::TokenizeBatchRequest>() {
        &[(1, "cards", MAX_BATCH_CARDS)]
    } else if message == TypeId::of::<vault::TokenizeSealedBatchRequest>() {
        &[(1, "sealed_cards", MAX_BATCH_CARDS)]
    } else if message == TypeId::of::<vault::ForwardRequest>() {
        &[
            (4, "headers", MAX_FORWARD_HEADERS),
            (10, "fields", MAX_FORWARD_FIELDS),
        ]
    } else if message == TypeId::of::<vault::ProposeExportRequest>()
        || message == TypeId::of::<vault::RunExportRequest>()
    {
        &[(2, "tokens", MAX_EXPORT_TOKENS)]
    } else if message == TypeId::of::<keys::ReportErasuresRequest>() {
        &[(1, "erasures", MAX_ERASURES_PER_REPORT)]
    } else if message == TypeId::of::<keys::ReportUsageRequest>() {
        &[
            (1, "usage", MAX_USAGE_ENTRIES),
            (2, "active", MAX_USAGE_ENTRIES),
        ]
    } else {
        &[]
    }
}

/// Counts the top-level occurrences of `field` in an encoded message without decoding
/// anything. `None` when the bytes are not well-formed protobuf (prost then says why).
fn count_field(mut bytes: &[u8], field: u32) -> Option<usize> {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    fn skip(bytes: &mut &[u8], n: u64) -> Option<()> {
        let n = usize::try_from(n).ok()?;
        *bytes = bytes.get(n..)?;
        Some(())
    }
    let mut count = 0;
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        if key >> 3 == u64::from(field) {
            count += 1;
        }
        match key & 7 {
            0 => drop(varint(&mut bytes)?),
            1 => skip(&mut bytes, 8)?,
            2 => {
                let len = varint(&mut bytes)?;
                skip(&mut bytes, len)?;
            }
            5 => skip(&mut bytes, 4)?,
            // Groups are not used by any message here: prost refuses them.
            _ => return None,
        }
    }
    Some(count)
}

/// The field path of a decode error, from prost's stack of (message, field) names,
/// outermost first: "card.number". Only names from the schema, never the bytes sent.
fn field_path(error: &prost::DecodeError) -> Option<String> {
    let text = error.to_string();
    let mut rest = text.strip_prefix("failed to decode Protobuf message: ")?;
    let mut fields = Vec::new();
    while let Some((segment, tail)) = rest.split_once(": ") {
        let Some((message, field)) = segment.split_once('.') else {
            break;
        };
        let name =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name(message) || !name(field) {
            break;
        }
        fields.push(field.to_owned());
        rest = tail;
    }
    fields.reverse();
    (!fields.is_empty()).then(|| fields.join("."))
}

impl<U: Message + Default + 'static> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Zero-copy: the decode buffer is one contiguous allocation.
        let bytes = buf.copy_to_bytes(buf.remaining());
        for &(field, name, max) in repeated_limits::<U>() {
            if count_field(&bytes, field).is_some_and(|n| n > max) {
                return Err(Status::invalid_argument(format!(
                    "{name}: at most {max} entries in one message (rule: max_items)"
                )));
            }
        }
        U::decode(bytes).map(Some).map_err(|e| {
            let message = "the message could not be decoded: malformed protobuf or a string \
                           field that is not UTF-8";
            Status::invalid_argument(match field_path(&e) {
                Some(path) => format!("{message} (field {path})"),
                None => message.to_owned(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::v1 as pb;

    #[test]
    fn counts_top_level_fields_only() {
        let request = pb::TokenizeBatchRequest {
            cards: vec![pb::Card::default(); 3],
            reuse_existing: true,
            ttl_secs: 5,
            format: 0,
        };
        let bytes = request.encode_to_vec();
        assert_eq!(count_field(&bytes, 1), Some(3));
        assert_eq!(count_field(&bytes, 3), Some(1));
        assert_eq!(count_field(&bytes[..bytes.len() - 1], 1), None);
        assert_eq!(count_field(&[0x0a, 0x05, 0x01], 1), None);
    }

    #[test]
    fn decode_errors_name_the_field_not_the_value() {
        // TokenizeRequest.card (1) { number (1): "4242\xff" }
        let bytes = [0x0a, 0x07, 0x0a, 0x05, b'4', b'2', b'4', b'2', 0xff];
        let error = pb::TokenizeRequest::decode(&bytes[..]).unwrap_err();
        assert_eq!(field_path(&error).as_deref(), Some("card.number"));
        // A bare truncated varint: no field to name.
        let error = pb::TokenizeRequest::decode(&[0x80u8][..]).unwrap_err();
        assert_eq!(field_path(&error), None);
    }
}

#[cfg(test)]
mod every_repeated_request_field_is_limited {
    /// Every request message of our .proto files with a repeated (or map) field has an
    /// entry in `repeated_limits`: a new one without would decode a request into many
    /// times its size before anyone is authorized.
    #[test]
    fn check() {
        let source = include_str!("codec.rs");
        let limits = &source[source.find("fn repeated_limits").unwrap()..];
        let limits = &limits[..limits.find("\n}\n").unwrap()];
        for (package, proto) in [
            (
                "vault",
                include_str!("../proto/tokenvault/vault/v1/vault.proto"),
            ),
            (
                "keys",
                include_str!("../proto/tokenvault/keys/v1/keys.proto"),
            ),
        ] {
            let mut message = "";
            for line in proto.lines() {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("message ") {
                    message = rest.split_whitespace().next().unwrap();
                    continue;
                }
                let repeated = line.starts_with("repeated ") || line.starts_with("map<");
                if repeated && message.ends_with("Request") {
                    let field = line
                        .split('=')
                        .next()
                        .unwrap()
                        .split_whitespace()
                        .last()
                        .unwrap();
                    assert!(
                        limits.contains(&format!("TypeId::of::<{package}::{message}>()"))
                            && limits.contains(&format!("\"{field}\"")),
                        "{package}.{message}.{field} has no entry in repeated_limits"
                    );
                }
            }
        }
    }
}

//! Hostile and malformed input: the right status each time, and the server stays up.

use std::time::{Duration, Instant};

use integration_tests::{ADMIN, Stack, raw_channel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use vault_client::Card;
use vault_proto::vault::v1 as pb;

/// Wire-compatible with `Card`, but with bytes and 64-bit integers, so a test can send
/// what a well-behaved client never would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCard {
    #[prost(bytes = "vec", tag = "1")]
    number: Vec<u8>,
    #[prost(uint64, tag = "2")]
    exp_month: u64,
    #[prost(uint64, tag = "3")]
    exp_year: u64,
    #[prost(bytes = "vec", tag = "4")]
    cardholder_name: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawTokenizeRequest {
    #[prost(message, optional, tag = "1")]
    card: Option<RawCard>,
}

fn raw_card(number: &[u8]) -> RawCard {
    RawCard {
        number: number.to_vec(),
        exp_month: 12,
        exp_year: 2030,
        cardholder_name: Vec::new(),
    }
}

async fn raw_tokenize(
    stack: &Stack,
    request: RawTokenizeRequest,
) -> Result<pb::TokenizeResponse, tonic::Status> {
    let channel = raw_channel(&stack.dir, ADMIN, stack.vault_addr)
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/tokenvault.vault.v1.Vault/Tokenize");
    let codec = tonic_prost::ProstCodec::<RawTokenizeRequest, pb::TokenizeResponse>::default();
    grpc.unary(tonic::Request::new(request), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

/// Control: PCI-6.2.4 (docs/compliance.md).
/// Attack: messages sent past the client library with missing fields, non-UTF-8 strings,
/// overflowing integers, 10 MiB bodies, huge and malformed tokens; each gets a precise
/// status and the vault keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_precise_statuses() {
    let stack = Stack::start().await;
    let code = |r: Result<pb::TokenizeResponse, tonic::Status>| {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    };

    // Missing card, empty number.
    assert_eq!(
        code(raw_tokenize(&stack, RawTokenizeRequest { card: None }).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            raw_tokenize(
                &stack,
                RawTokenizeRequest {
                    card: Some(raw_card(b""))
                }
            )
            .await
        ),
        Code::InvalidArgument
    );
    // Non-UTF-8 in a string field: the codec refuses it as the caller's mistake.
    let status = raw_tokenize(
        &stack,
        RawTokenizeRequest {
            card: Some(raw_card(b"4242\xff\xfe4242424242")),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(!status.message().contains("4242"));
    // Overflowing integers: exp_year beyond u32 wraps by the protobuf rules, and the
    // result is still validated.
    let mut overflow = raw_card(b"4242424242424242");
    overflow.exp_year = u64::MAX;
    assert_eq!(
        code(
            raw_tokenize(
                &stack,
                RawTokenizeRequest {
                    card: Some(overflow)
                }
            )
            .await
        ),
        Code::InvalidArgument
    );
    // 10 MiB: refused before decoding, by the message size limit.
    let mut huge = raw_card(b"4242424242424242");
    huge.cardholder_name = vec![b'A'; 10 * 1024 * 1024];
    let status = raw_tokenize(&stack, RawTokenizeRequest { card: Some(huge) })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );

    // Huge and malformed tokens.
    let mut client = stack.client(ADMIN).await;
    for token in [
        "",
        "tok_",
        &"x".repeat(100_000),
        "tok_\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}",
    ] {
        assert_eq!(
            client.token_info(token).await.unwrap_err().code(),
            Some(Code::InvalidArgument)
        );
    }
    // Still serving.
    client
        .tokenize(Card::new("4242424242424242", 12, 2030), false)
        .await
        .unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silent_connections_do_not_hurt_other_callers() {
    let stack = Stack::start().await;
    // Raw garbage on the gRPC port is dropped.
    let mut garbage = tokio::net::TcpStream::connect(stack.vault_addr)
        .await
        .unwrap();
    let noise: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = garbage.write_all(&noise).await;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match garbage.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closed the garbage connection");

    // Silent connections (slowloris) are cut after the handshake timeout (1 s in the
    // harness), and others are served meanwhile.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(
            tokio::net::TcpStream::connect(stack.vault_addr)
                .await
                .unwrap(),
        );
    }
    let mut client = stack.client(ADMIN).await;
    let started = Instant::now();
    for _ in 0..20 {
        client
            .tokenize(Card::new("4242424242424242", 12, 2030), false)
            .await
            .unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served others in {:?}",
        started.elapsed()
    );
    for mut connection in silent {
        let read = tokio::time::timeout(Duration::from_secs(5), connection.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection was not cut: {read:?}"
        );
    }
    stack.stop().await;
}

// Helpers shared by the bad-input modules (`bad_input_matrix`, `bad_input_memory`): raw
// protobuf bytes, a codec that sends them as they are, and raw HTTP/2 request bodies.

/// A protobuf message written field by field, so a test can send what prost never
/// would: repeated scalars, wrong wire types, 64-bit values in 32-bit fields, bytes
/// that are not UTF-8 in string fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wire(pub(crate) Vec<u8>);

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

impl Wire {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn key(mut self, field: u32, wire_type: u8) -> Self {
        put_varint(&mut self.0, u64::from(field << 3 | u32::from(wire_type)));
        self
    }

    /// Wire type 0. A negative int32 goes as its 10-byte sign-extended form.
    pub(crate) fn varint(self, field: u32, value: u64) -> Self {
        let mut wire = self.key(field, 0);
        put_varint(&mut wire.0, value);
        wire
    }

    /// Wire type 2: a string, bytes or an embedded message.
    pub(crate) fn bytes(self, field: u32, value: impl AsRef<[u8]>) -> Self {
        let value = value.as_ref();
        let mut wire = self.key(field, 2);
        put_varint(&mut wire.0, value.len() as u64);
        wire.0.extend_from_slice(value);
        wire
    }

    pub(crate) fn message(self, field: u32, message: Wire) -> Self {
        self.bytes(field, message.0)
    }

    /// Wire type 5.
    pub(crate) fn fixed32(self, field: u32, value: u32) -> Self {
        let mut wire = self.key(field, 5);
        wire.0.extend_from_slice(&value.to_le_bytes());
        wire
    }

    pub(crate) fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub(crate) fn build(self) -> Vec<u8> {
        self.0
    }
}

/// `unit` repeated to `len` bytes.
pub(crate) fn fill(unit: &str, len: usize) -> Vec<u8> {
    unit.bytes().cycle().take(len).collect()
}

/// The message `build(n)` (a message with an `n`-byte filler) for the `n` that makes
/// it exactly `total` bytes long.
pub(crate) fn sized(total: usize, build: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let guess = total.saturating_sub(build(0).len());
    (guess.saturating_sub(12)..=guess)
        .rev()
        .map(&build)
        .find(|m| m.len() == total)
        .expect("no filler length gives the wanted size")
}

/// Sends the bytes as they are and returns the response bytes as they came.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `/tokenvault.vault.v1.Vault/<method>` with `body` as the request message.
pub(crate) async fn raw_call(
    channel: &tonic::transport::Channel,
    method: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/tokenvault.vault.v1.Vault/{method}")
            .parse()
            .unwrap();
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// An HTTP/2 request body fed piece by piece: the sender decides when each piece goes,
/// and holding the sender without sending is a client that stalls mid-request.
#[derive(Debug)]
pub(crate) struct FedBody(pub(crate) tokio::sync::mpsc::Receiver<tonic::codegen::Bytes>);

impl http_body::Body for FedBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}

/// The 5-byte gRPC message header: not compressed (unless `flag` says so), `len` bytes.
pub(crate) fn frame_header(flag: u8, len: u32) -> tonic::codegen::Bytes {
    let mut header = vec![flag];
    header.extend_from_slice(&len.to_be_bytes());
    header.into()
}

/// A gRPC call made of raw HTTP/2: `headers` added to the usual ones, the body fed from
/// `body`. Returns the call's status (from a trailers-only answer or the trailers).
pub(crate) async fn raw_http_call(
    channel: &tonic::transport::Channel,
    method: &str,
    headers: &[(&'static str, &'static str)],
    body: tokio::sync::mpsc::Receiver<tonic::codegen::Bytes>,
) -> tonic::Status {
    use tonic::codegen::Service;
    use tonic::codegen::http;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "https://localhost/tokenvault.vault.v1.Vault/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(tonic::body::Body::new(FedBody(body))).unwrap();
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let response = match channel.call(request).await {
        Ok(response) => response,
        Err(e) => return tonic::Status::unavailable(e.to_string()),
    };
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    loop {
        let frame = std::future::poll_fn(|cx| {
            http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
        })
        .await;
        match frame {
            Some(Ok(frame)) => {
                if let Ok(trailers) = frame.into_trailers()
                    && let Some(status) = tonic::Status::from_header_map(&trailers)
                {
                    return status;
                }
            }
            Some(Err(status)) => return status,
            None => return tonic::Status::unknown("the answer ended without a status"),
        }
    }
}

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

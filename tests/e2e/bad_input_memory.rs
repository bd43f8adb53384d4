//! Memory stays bounded under hostile load, on the real vault-server binary: oversize
//! requests are refused from their 5-byte header, requests at the size limit cost about
//! twice their size while in flight, batches of millions of empty entries are refused
//! before decoding, and clients that stall mid-request are cut by the request timeout
//! while others are served. Peak and settled memory come from /proc/<pid>/status.

use std::time::{Duration, Instant};

use integration_tests::{ADMIN, Process, StackDir, raw_channel};
use tonic::Code;
use tonic::codegen::Bytes;
use vault_client::{Card, VaultClient};

use super::bad_input::{Wire, fill, frame_header, raw_call, raw_http_call, sized};

const MIB: u64 = 1024 * 1024;
/// `[limits]` of this test's vault.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Long enough that ten durable round trips fit in it on a loaded 2-core machine (the
/// served client must finish before any stalled call is cut).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(5000);
const MAX_CONCURRENT_STREAMS: usize = 32;
/// Requests at the size limit in flight at once.
const AT_LIMIT_IN_FLIGHT: u64 = 32;

/// A field of /proc/<pid>/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_memory_stays_bounded_and_stalled_clients_are_cut() {
    let dir = StackDir::new();
    let keyservice = Process::start("keyservice", &dir.path().join("keyservice.toml"), &[]).await;
    let config = dir.write_vault_config(keyservice.addr.port());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[limits]\n",
        &format!(
            "[limits]\nmax_request_bytes = {MAX_REQUEST_BYTES}\nrequest_timeout_ms = {}\n\
             max_concurrent_streams = {MAX_CONCURRENT_STREAMS}\n",
            REQUEST_TIMEOUT.as_millis()
        ),
    );
    std::fs::write(&config, text + "[lockout]\nmax_failures = 100000\n").unwrap();
    let vault = Process::start("vault-server", &config, &[]).await;
    let pid = vault.child.id().unwrap();

    let mut client = VaultClient::connect(&dir.client_config(ADMIN, vault.addr))
        .await
        .unwrap();
    let round_trip = |mut client: VaultClient| async move {
        let info = client
            .tokenize(Card::new("4242424242424242", 12, 2030), false)
            .await
            .unwrap();
        client.token_info(&info.token).await.unwrap();
        client
    };
    client = round_trip(client).await;
    let baseline = status_bytes(pid, "VmRSS");

    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(raw_channel(&dir, ADMIN, vault.addr).await.unwrap());
    }

    // 1. 64 concurrent 10 MiB requests, three times: refused from the message header
    //    (OUT_OF_RANGE), whatever follows it. The 10 MiB are one shared buffer here.
    let slab = Bytes::from(vec![b'A'; 1024 * 1024]);
    for _ in 0..3 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..64 {
            let channel = channels[i % channels.len()].clone();
            let slab = slab.clone();
            calls.spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(12);
                let sender = tokio::spawn(async move {
                    let _ = tx.send(frame_header(0, 10 * MIB as u32)).await;
                    for _ in 0..10 {
                        if tx.send(slab.clone()).await.is_err() {
                            break;
                        }
                    }
                });
                let status = raw_http_call(&channel, "Tokenize", &[], rx).await;
                sender.abort();
                status.code()
            });
        }
        while let Some(code) = calls.join_next().await {
            assert_eq!(code.unwrap(), Code::OutOfRange);
        }
    }
    let after_huge = status_bytes(pid, "VmHWM");

    // 2. Requests exactly at the size limit are decoded and refused by validation: each
    //    holds its buffer and its decoded copy while in flight.
    let at_limit = sized(MAX_REQUEST_BYTES, |n| {
        Wire::new()
            .message(
                1,
                Wire::new()
                    .bytes(1, "4242424242424242")
                    .varint(2, 12)
                    .varint(3, 2030)
                    .bytes(4, fill("Zq9 ", n)),
            )
            .build()
    });
    for _ in 0..2 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..AT_LIMIT_IN_FLIGHT as usize {
            let channel = channels[i % channels.len()].clone();
            let body = at_limit.clone();
            calls.spawn(async move { raw_call(&channel, "Tokenize", body).await });
        }
        while let Some(result) = calls.join_next().await {
            assert_eq!(result.unwrap().unwrap_err().code(), Code::InvalidArgument);
        }
    }
    let after_at_limit = status_bytes(pid, "VmHWM");

    // 3. Batches of 2 million empty cards (4 MiB on the wire, over 300 MiB each once
    //    decoded): the codec counts the entries and refuses them first.
    let empties = [0x0a, 0x00].repeat(MAX_REQUEST_BYTES / 2 - 8);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..8 {
        let channel = channels[i % channels.len()].clone();
        let body = empties.clone();
        calls.spawn(async move { raw_call(&channel, "TokenizeBatch", body).await });
    }
    while let Some(result) = calls.join_next().await {
        let status = result.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("cards"), "{status:?}");
    }
    let after_batches = status_bytes(pid, "VmHWM");

    // 4. Slow clients: 4 connections, each with max_concurrent_streams calls that send
    //    a message header and 64 KiB of a 1 MiB message, then stall. The request
    //    timeout cuts every one; meanwhile another client is served.
    let mut stalled = tokio::task::JoinSet::new();
    let started = Instant::now();
    for channel in &channels[..4] {
        for _ in 0..MAX_CONCURRENT_STREAMS {
            let channel = channel.clone();
            stalled.spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                tx.send(frame_header(0, MIB as u32)).await.unwrap();
                tx.send(Bytes::from(vec![0x0a; 64 * 1024])).await.unwrap();
                // `tx` stays open: the stream neither ends nor sends more.
                let status = raw_http_call(&channel, "Tokenize", &[], rx).await;
                drop(tx);
                (status, started.elapsed())
            });
        }
    }
    let served = Instant::now();
    for _ in 0..10 {
        client = round_trip(client).await;
    }
    let served = served.elapsed();
    assert!(
        served < REQUEST_TIMEOUT,
        "10 round trips beside the stalled clients took {served:?}"
    );
    let during_stall = status_bytes(pid, "VmRSS");
    let mut cut = 0;
    while let Some(result) = stalled.join_next().await {
        let (status, elapsed) = result.unwrap();
        // tonic's server-side timeout answers CANCELLED "Timeout expired".
        assert_eq!(status.code(), Code::Cancelled, "{status:?}");
        assert!(
            elapsed >= REQUEST_TIMEOUT - Duration::from_millis(100)
                && elapsed < REQUEST_TIMEOUT + Duration::from_secs(5),
            "cut after {elapsed:?}"
        );
        cut += 1;
    }
    assert_eq!(cut, 4 * MAX_CONCURRENT_STREAMS);
    client = round_trip(client).await;

    // Peak: what was resident before, plus every at-limit request in flight holding its
    // buffer and its decoded copy, plus 128 MiB for TLS and HTTP/2 buffers of the 8
    // connections, the runtime and the allocator's slack.
    let peak = status_bytes(pid, "VmHWM");
    let bound = baseline + AT_LIMIT_IN_FLIGHT * 2 * MAX_REQUEST_BYTES as u64 + 128 * MIB;
    // Settled: what the barrages freed stays with the allocator (mimalloc keeps its
    // segments) and is used again: another round at the limit does not raise the peak.
    drop(channels);
    let settled = status_bytes(pid, "VmRSS");
    let channel = raw_channel(&dir, ADMIN, vault.addr).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..AT_LIMIT_IN_FLIGHT {
        let channel = channel.clone();
        let body = at_limit.clone();
        calls.spawn(async move { raw_call(&channel, "Tokenize", body).await });
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(result.unwrap().unwrap_err().code(), Code::InvalidArgument);
    }
    let peak_again = status_bytes(pid, "VmHWM");
    println!(
        "vault-server memory (MiB): baseline RSS {}, peak after 10 MiB barrage {}, after \
         at-limit requests {}, after empty-card batches {}, RSS during stalled clients {}, \
         peak {} (bound {}), settled RSS {}, peak after another round {}",
        baseline / MIB,
        after_huge / MIB,
        after_at_limit / MIB,
        after_batches / MIB,
        during_stall / MIB,
        peak / MIB,
        bound / MIB,
        settled / MIB,
        peak_again / MIB
    );
    assert!(
        after_huge < baseline + 64 * MIB,
        "10 MiB requests cost memory: {after_huge} from {baseline}"
    );
    assert!(
        after_batches <= after_at_limit + 32 * MIB,
        "empty-card batches cost memory"
    );
    assert!(peak < bound, "peak {peak} over the bound {bound}");
    assert!(settled <= peak, "RSS grew after the barrages: {settled}");
    // Memory not reused would add the round's 256 MiB of buffers; a few segments more
    // (16 MiB and a page, once on PostgreSQL) is the allocator's noise.
    assert!(
        peak_again <= peak + 64 * MIB,
        "another round raised the peak from {peak} to {peak_again}: memory not reused"
    );
    drop(client);
    vault.terminate().await;
    keyservice.terminate().await;
}

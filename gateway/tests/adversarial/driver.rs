//! The connection driver's edge cases, over real sockets with frames built by hand:
//! frames split across reads, messages larger than the per-worker scratch buffer,
//! fragments with control frames between them, frames pipelined behind the upgrade
//! request, ping/pong and both close handshakes, queued writes followed by a close,
//! and a slow (but reading) agent under back-pressure.

use std::time::Duration;

use serde_json::json;
use tether_protocol::GatewayMessage;
use tether_test_support::until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;
use crate::harness::*;

/// One server frame: (FIN, opcode, payload). Server frames are never masked.
async fn read_frame(stream: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let read = async {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.expect("a frame");
        assert_eq!(head[1] & 0x80, 0, "server frames are unmasked");
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                stream.read_exact(&mut b).await.unwrap();
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                stream.read_exact(&mut b).await.unwrap();
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x80 != 0, head[0] & 0x0f, payload)
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a frame in time")
}

/// The next text frame's envelope (skipping nothing: the driver's order is asserted).
async fn read_envelope(stream: &mut TcpStream) -> GatewayMessage {
    let (fin, opcode, payload) = read_frame(stream).await;
    assert!(fin);
    assert_eq!(opcode, 0x1, "a text frame, got opcode {opcode}");
    GatewayMessage::decode(std::str::from_utf8(&payload).unwrap()).unwrap()
}

/// A raw agent past its `welcome`.
async fn welcomed(arena: &Arena, sub: &str, recv_buffer: Option<u32>) -> TcpStream {
    let mut agent = raw_agent(arena.public(), sub, recv_buffer).await;
    assert!(matches!(
        read_envelope(&mut agent).await,
        GatewayMessage::Welcome(_)
    ));
    agent
}

/// Writes `bytes` in pieces of `piece` bytes with a pause between them, so that the
/// gateway sees them in separate reads.
async fn trickle(stream: &mut TcpStream, bytes: &[u8], piece: usize) {
    stream.set_nodelay(true).unwrap();
    for chunk in bytes.chunks(piece) {
        stream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An envelope the gateway refuses with an `error` naming its id: an observable
/// answer to an inbound message of any size.
fn bogus_envelope(id: &str, pad: usize) -> String {
    json!({"type": "bogus", "id": id, "pad": "p".repeat(pad)}).to_string()
}

fn error_id(message: GatewayMessage) -> Option<String> {
    match message {
        GatewayMessage::Error { id, .. } => id,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_frame_split_across_reads_is_decoded_once_whole() {
    let mut arena = Arena::start().await;
    let mut agent = welcomed(&arena, "splitter", None).await;
    // Two frames, cut at every possible place: header, mask, payload, and the boundary.
    let mut bytes = client_frame(0x1, true, bogus_envelope("first", 10).as_bytes());
    bytes.extend(client_frame(
        0x1,
        true,
        bogus_envelope("second", 300).as_bytes(),
    ));
    trickle(&mut agent, &bytes, 1).await;
    assert_eq!(
        error_id(read_envelope(&mut agent).await).as_deref(),
        Some("first")
    );
    assert_eq!(
        error_id(read_envelope(&mut agent).await).as_deref(),
        Some("second")
    );
    arena.check().await;
}

#[tokio::test]
async fn a_message_larger_than_the_scratch_buffer_arrives_whole() {
    let mut arena = Arena::start_with(|c| {
        c.limits.read_buffer_bytes = 64;
        c.limits.max_message_bytes = 256 * 1024;
    })
    .await;
    let mut agent = welcomed(&arena, "big", None).await;
    // 200 KiB through a 64-byte scratch buffer: thousands of reads for one frame.
    let big = bogus_envelope("big", 200 * 1024);
    agent
        .write_all(&client_frame(0x1, true, big.as_bytes()))
        .await
        .unwrap();
    assert_eq!(
        error_id(read_envelope(&mut agent).await).as_deref(),
        Some("big")
    );
    // ... and the connection is still in sync for the next one.
    agent
        .write_all(&client_frame(
            0x1,
            true,
            bogus_envelope("next", 1).as_bytes(),
        ))
        .await
        .unwrap();
    assert_eq!(
        error_id(read_envelope(&mut agent).await).as_deref(),
        Some("next")
    );
    arena.check().await;
}

#[tokio::test]
async fn fragments_reassemble_around_a_ping_and_pongs_echo_their_payload() {
    let mut arena = Arena::start().await;
    let mut agent = welcomed(&arena, "fragments", None).await;
    let text = bogus_envelope("frag", 50);
    let (a, rest) = text.as_bytes().split_at(10);
    let (b, c) = rest.split_at(20);
    let mut bytes = client_frame(0x1, false, a);
    bytes.extend(client_frame(0x9, true, b"between"));
    bytes.extend(client_frame(0x0, false, b));
    bytes.extend(client_frame(0x0, true, c));
    trickle(&mut agent, &bytes, 7).await;
    assert_eq!(
        read_frame(&mut agent).await,
        (true, 0xA, b"between".to_vec())
    );
    assert_eq!(
        error_id(read_envelope(&mut agent).await).as_deref(),
        Some("frag")
    );
    arena.check().await;
}

#[tokio::test]
async fn frames_pipelined_behind_the_upgrade_request_are_served_after_the_welcome() {
    let mut arena = Arena::start().await;
    let mut agent = tcp(arena.public(), None).await;
    let mut bytes = upgrade_request(Some(&token("eager", &[], 3600)), "").into_bytes();
    bytes.extend(client_frame(0x9, true, b"early"));
    bytes.extend(client_frame(
        0x1,
        true,
        bogus_envelope("early", 5).as_bytes(),
    ));
    agent.write_all(&bytes).await.unwrap();
    let head = read_head(&mut agent).await.expect("an answer");
    assert_eq!(status_of(&head), 101);
    assert!(matches!(
        read_envelope(&mut agent).await,
        GatewayMessage::Welcome(_)
    ));
    assert_eq!(read_frame(&mut agent).await, (true, 0xA, b"early".to_vec()));
    assert_eq!(
        error_id(read_envelope(&mut agent).await).as_deref(),
        Some("early")
    );
    arena.check().await;
}

#[tokio::test]
async fn an_agent_close_is_echoed_and_frees_the_connection() {
    let mut arena = Arena::start().await;
    let mut agent = welcomed(&arena, "leaver", None).await;
    arena.gw.wait_for_connections(2).await;
    let mut payload = 4321u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    agent
        .write_all(&client_frame(0x8, true, &payload))
        .await
        .unwrap();
    // RFC 6455 §5.5.1: the answer echoes the code.
    assert_eq!(raw_close_code(&mut agent).await, Some(4321));
    closed_by_server(&mut agent).await;
    let state = arena.gw.gateway.state().clone();
    until("the agent that closed leaves the hub", PATIENCE, || {
        state.hub.get("leaver").is_none()
    })
    .await;
    arena.check().await;
}

#[tokio::test]
async fn queued_messages_are_written_before_the_close_that_follows_them() {
    let mut arena = Arena::start().await;
    let mut agent = welcomed(&arena, "queued", None).await;
    for i in 0..20 {
        let status = arena
            .gw
            .post("/v1/agents/queued/messages", json!({"n": i}))
            .await
            .status();
        assert_eq!(status, 202);
    }
    let status = arena
        .gw
        .http
        .delete(arena.gw.api("/v1/agents/queued"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    for i in 0..20 {
        match read_envelope(&mut agent).await {
            GatewayMessage::Push { data, .. } => {
                assert_eq!(data.get(), json!({"n": i}).to_string(), "push {i} in order");
            }
            other => panic!("expected push {i}, got {other:?}"),
        }
    }
    let close = raw_close_code(&mut agent).await;
    assert!(close.is_some(), "a close frame after the pushes");
    // Our close, answered: the gateway then ends the connection.
    agent
        .write_all(&client_frame(0x8, true, &close.unwrap().to_be_bytes()))
        .await
        .unwrap();
    closed_by_server(&mut agent).await;
    arena.check().await;
}

#[tokio::test]
async fn an_agent_vanishing_mid_write_is_cleaned_up() {
    let mut arena = Arena::start_with(|c| c.limits.outbound_queue = 64).await;
    let agent = welcomed(&arena, "vanisher", Some(2048)).await;
    arena.gw.wait_for_connections(2).await;
    // Fill its socket so the gateway holds unwritten frames, then drop it.
    let payload = json!("v".repeat(16 * 1024));
    for _ in 0..16 {
        let status = arena
            .gw
            .post("/v1/agents/vanisher/messages", payload.clone())
            .await
            .status();
        assert_eq!(status, 202);
    }
    drop(agent);
    let state = arena.gw.gateway.state().clone();
    until("the vanished agent leaves the hub", PATIENCE, || {
        state.hub.get("vanisher").is_none()
    })
    .await;
    until("its connection slot is released", PATIENCE, || {
        state.admitted.load(std::sync::atomic::Ordering::Acquire) == 1
    })
    .await;
    arena.check().await;
}

#[tokio::test]
async fn a_slow_reader_gets_every_message_in_order() {
    // Back-pressure: a small receive window and 50 × 8 KiB queued at once. The driver
    // keeps what the kernel does not take and resumes on writability; the agent reads
    // slowly but within the write deadline, so nothing is dropped.
    let mut arena = Arena::start_with(|c| c.limits.outbound_queue = 64).await;
    let mut agent = welcomed(&arena, "slowpoke", Some(4096)).await;
    let pad = "s".repeat(8 * 1024);
    for i in 0..50 {
        let status = arena
            .gw
            .post("/v1/agents/slowpoke/messages", json!({"n": i, "pad": pad}))
            .await
            .status();
        assert_eq!(status, 202);
    }
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        match read_envelope(&mut agent).await {
            GatewayMessage::Push { data, .. } => {
                let value: serde_json::Value = serde_json::from_str(data.get()).unwrap();
                assert_eq!(value["n"], i, "message {i} in order");
            }
            other => panic!("expected push {i}, got {other:?}"),
        }
    }
    arena.check().await;
}

#[tokio::test]
async fn protocol_violations_fail_with_their_rfc_close_codes() {
    let mut arena = Arena::start().await;
    let mut unmasked = vec![0x81, 0x02];
    unmasked.extend_from_slice(b"hi");
    let mut bad_utf8_fragments = client_frame(0x1, false, &[0xe2, 0x82]);
    bad_utf8_fragments.extend(client_frame(0x0, true, &[0x28]));
    let cases: [(&str, Vec<u8>, u16); 7] = [
        (
            "rsv",
            {
                let mut f = client_frame(0x1, true, b"x");
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("opcode", client_frame(0x3, true, b"x"), 1002),
        ("unmasked", unmasked, 1002),
        ("fragmented-ping", client_frame(0x9, false, b"x"), 1002),
        ("orphan-continuation", client_frame(0x0, true, b"x"), 1002),
        (
            "close-1005",
            client_frame(0x8, true, &1005u16.to_be_bytes()),
            1002,
        ),
        ("utf8-across-fragments", bad_utf8_fragments, 1007),
    ];
    for (name, bytes, expected) in cases {
        let mut agent = welcomed(&arena, name, None).await;
        agent.write_all(&bytes).await.unwrap();
        assert_eq!(raw_close_code(&mut agent).await, Some(expected), "{name}");
    }
    arena.check().await;
}

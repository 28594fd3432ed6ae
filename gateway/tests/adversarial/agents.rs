//! Hostile or broken agents: slow readers, oversized and fragmented frames, floods,
//! malformed handshakes and tokens, forged refreshes.

use std::sync::atomic::Ordering;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::harness::*;

/// An agent that upgrades and then never reads, with a tiny receive window: pushes
/// fill the socket, the write times out, and the gateway drops the socket without
/// waiting on a close frame that can never be sent. Its slot and hub entry are freed.
#[tokio::test]
async fn slow_reader_with_zero_window_is_evicted() {
    let mut arena = Arena::start_with(|c| {
        c.limits.write_timeout_ms = 500;
        c.limits.outbound_queue = 16;
    })
    .await;
    let mut slow = tcp(arena.public(), Some(2048)).await;
    slow.write_all(upgrade_request(Some(&token("slow", &[], 3600)), "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut slow).await.expect("an answer");
    assert_eq!(status_of(&head), 101);
    arena.gw.wait_for_connections(2).await;

    let payload = json!("x".repeat(32 * 1024));
    for _ in 0..400 {
        let status = arena
            .gw
            .post("/v1/agents/slow/messages", payload.clone())
            .await
            .status();
        match status.as_u16() {
            202 => continue,
            // The queue is full (429) or the agent is already gone (404).
            429 | 404 => break,
            other => panic!("unexpected {other}"),
        }
    }
    let state = arena.gw.gateway.state().clone();
    eventually(|| state.hub.get("slow").is_none()).await;
    eventually(|| state.admitted.load(Ordering::Acquire) == 1).await;
    assert_eq!(
        arena.gw.get("/v1/agents/slow").await.status(),
        404,
        "presence no longer answers for the evicted agent"
    );
    arena.check().await;
    drop(slow);
}

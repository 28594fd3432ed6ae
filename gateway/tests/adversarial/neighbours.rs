//! Cluster neighbours and half-open clients on either port: slowloris, header floods,
//! connection floods, and a shutdown that such clients cannot hold up.

use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::harness::*;

/// A request head that never finishes on the internal port is cut at the header
/// deadline.
#[tokio::test]
async fn internal_port_slowloris_is_cut_at_the_header_deadline() {
    let mut arena = Arena::start_with(|c| c.listen.header_timeout_ms = 500).await;
    let mut loris = tcp(arena.internal(), None).await;
    loris
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        .await
        .unwrap();
    closed_by_server(&mut loris).await;
    arena.check().await;
}

/// The same on the public port.
#[tokio::test]
async fn public_port_slowloris_is_cut_at_the_header_deadline() {
    let mut arena = Arena::start_with(|c| c.listen.header_timeout_ms = 500).await;
    let mut loris = tcp(arena.public(), None).await;
    loris
        .write_all(b"GET /v1/connect HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        .await
        .unwrap();
    closed_by_server(&mut loris).await;
    arena.check().await;
}

/// Half-sent requests on the internal port do not hold the shutdown past the drain
/// deadline (axum's graceful shutdown would wait for them forever).
#[tokio::test]
async fn half_open_internal_requests_do_not_hold_shutdown() {
    let arena = Arena::start_with(|c| {
        c.listen.header_timeout_ms = 600_000;
        c.drain.deadline_seconds = 1;
    })
    .await;
    let mut lorises = Vec::new();
    for _ in 0..4 {
        let mut loris = tcp(arena.internal(), None).await;
        loris
            .write_all(b"POST /v1/broadcast HTTP/1.1\r\nHost: gateway\r\n")
            .await
            .unwrap();
        lorises.push(loris);
    }
    let Arena { gw, canary, .. } = arena;
    gw.gateway.drain();
    let stopped = tokio::time::timeout(PATIENCE, gw.gateway.wait()).await;
    assert!(
        stopped.is_ok(),
        "the gateway stops despite half-open requests"
    );
    drop((lorises, canary));
}

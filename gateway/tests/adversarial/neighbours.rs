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

/// A request head over `listen.maxHeaderBytes` (one huge header, or very many) gets
/// 431 on either port, without buffering it whole.
#[tokio::test]
async fn header_floods_get_431_on_both_ports() {
    let mut arena = Arena::start().await;
    let huge = format!("X-Flood: {}\r\n", "a".repeat(64 * 1024));
    let many: String = (0..4000).map(|i| format!("X-F{i}: v\r\n")).collect();
    for extra in [&huge, &many] {
        let public = upgrade_request(Some(&token("flood", &[], 3600)), extra);
        let status = raw_status(arena.public(), public.as_bytes()).await;
        assert_eq!(status, Some(431), "public");
        let internal = format!("GET /healthz HTTP/1.1\r\nHost: gateway\r\n{extra}\r\n");
        let status = raw_status(arena.internal(), internal.as_bytes()).await;
        assert_eq!(status, Some(431), "internal");
    }
    // One giant token in Authorization: the same answer.
    let giant = "e".repeat(32 * 1024);
    let status = raw_status(arena.public(), upgrade_request(Some(&giant), "").as_bytes()).await;
    assert_eq!(status, Some(431));
    arena.check().await;
}

/// Connections that never finish their handshake are capped on the public port:
/// beyond `listen.maxPendingUpgrades` new ones are closed at once, and agents connect
/// again as soon as the idle ones are gone.
#[tokio::test]
async fn pending_upgrades_are_capped() {
    let mut arena = Arena::start_with(|c| {
        c.listen.max_pending_upgrades = 4;
        c.listen.header_timeout_ms = 600_000;
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut stream = tcp(arena.public(), None).await;
        stream
            .write_all(b"GET /v1/connect HTTP/1.1\r\n")
            .await
            .unwrap();
        idle.push(stream);
    }
    arena.gw.wait_for_connections(1).await;
    for _ in 0..3 {
        let mut extra = tcp(arena.public(), None).await;
        closed_by_server(&mut extra).await;
    }
    arena.check().await;
    drop(idle);
    let state = arena.gw.gateway.state().clone();
    eventually(|| state.admitted.load(std::sync::atomic::Ordering::Acquire) == 1).await;
    let mut late = None;
    for _ in 0..100 {
        // The slots free as the server notices the closed sockets.
        if let Ok((ws, _)) = connect(&arena.gw.ws_url(), Some(&token("late", &[], 3600))).await {
            late = Some(ws);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        late.is_some(),
        "agents connect once the idle handshakes are gone"
    );
}

/// The internal port holds at most `listen.maxInternalConnections` connections;
/// beyond it new ones are closed at accept.
#[tokio::test]
async fn internal_connections_are_capped() {
    let mut arena = Arena::start_with(|c| {
        c.listen.max_internal_connections = 4;
        c.listen.header_timeout_ms = 600_000;
    })
    .await;
    // The canary's HTTP client keeps one pooled connection; fill the rest.
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let mut stream = tcp(arena.internal(), None).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        match tokio::time::timeout(
            std::time::Duration::from_millis(300),
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) => refused += 1,
            _ => idle.push(stream),
        }
    }
    assert!(
        idle.len() <= 4,
        "at most the cap is held ({} held)",
        idle.len()
    );
    assert!(
        refused >= 4,
        "connections beyond the cap are closed ({refused})"
    );
    drop(idle);
    // Slots come back once the idle connections are gone.
    let mut ok = false;
    for _ in 0..100 {
        let client = reqwest::Client::new();
        if let Ok(r) = client.get(arena.gw.api("/healthz")).send().await {
            ok = r.status() == 200;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok);
    arena.check().await;
}

/// A body dripped slowly on the internal port is cut at the header deadline with 408;
/// an oversized one is refused with 413 before it is all read.
#[tokio::test]
async fn slow_and_oversized_bodies_on_the_internal_port() {
    let mut arena = Arena::start_with(|c| {
        c.listen.header_timeout_ms = 500;
        c.limits.max_message_bytes = 4096;
    })
    .await;
    let head = |len: usize| {
        format!(
            "POST /v1/agents/canary/messages HTTP/1.1\r\nHost: gateway\r\n\
             Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\n\r\n"
        )
    };
    let mut slow = tcp(arena.internal(), None).await;
    slow.write_all(head(1000).as_bytes()).await.unwrap();
    slow.write_all(b"\"abc").await.unwrap();
    let answer = read_head(&mut slow).await.expect("an answer");
    assert_eq!(status_of(&answer), 408);

    let mut big = tcp(arena.internal(), None).await;
    big.write_all(head(1 << 20).as_bytes()).await.unwrap();
    let _ = big.write_all(&vec![b' '; 64 * 1024]).await;
    let answer = read_head(&mut big).await.expect("an answer");
    assert_eq!(status_of(&answer), 413);
    arena.check().await;
}

/// Issue 21: a neighbour holding every internal-port connection (the cap) cannot fail
/// the kubelet's probes: they are served on their own listener with its own cap.
#[tokio::test]
async fn probes_answer_while_the_internal_port_is_held_full() {
    let mut arena = Arena::start_with(|c| {
        c.listen.max_internal_connections = 2;
        c.listen.header_timeout_ms = 600_000;
        c.listen.probes = Some("127.0.0.1:0".into());
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tcp(arena.internal(), None).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    let probe =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n");
    // The internal port is full (once its accept loop took both): a probe there is
    // closed unanswered.
    let mut refused = false;
    for _ in 0..50 {
        if raw_status(arena.internal(), probe("/healthz").as_bytes())
            .await
            .is_none()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused, "the internal port is held full");
    let probes = arena.gw.gateway.probes_addr().expect("a probe listener");
    assert_eq!(
        raw_status(probes, probe("/healthz").as_bytes()).await,
        Some(200)
    );
    assert_eq!(
        raw_status(probes, probe("/readyz").as_bytes()).await,
        Some(200)
    );
    // Only probes there: the push API is not reachable through it.
    assert_eq!(
        raw_status(probes, probe("/v1/agents").as_bytes()).await,
        Some(404)
    );
    drop(held);
    arena.check().await;
}

//! Drain: hints, 1012 closes, readiness, and no loss of accepted pushes.

use serde_json::{Value, json};
use tether_protocol::{CloseCode, GatewayMessage};

use crate::common::*;

#[tokio::test]
async fn drain_hints_closes_and_keeps_accepted_pushes() {
    let gw = TestGateway::start_with(|c| {
        c.drain.connections_per_second = 1000;
        c.drain.reconnect_jitter_ms = 500;
        c.drain.deadline_seconds = 20;
    })
    .await;
    let mut agents = Vec::new();
    for i in 0..5 {
        agents.push(gw.agent(&format!("agent-{i}"), &[]).await);
    }
    // Accepted before the drain: every one of these must arrive before the close.
    for i in 0..5 {
        for n in 0..3 {
            let response = gw
                .post(&format!("/v1/agents/agent-{i}/messages"), json!(n))
                .await;
            assert_eq!(response.status(), 202);
        }
    }
    let drain = gw.post("/admin/drain", json!({})).await;
    assert_eq!(drain.status(), 202);
    for ws in agents.iter_mut() {
        let mut pushes = Vec::new();
        let hint = loop {
            match next_message(ws).await {
                GatewayMessage::Push { data, .. } => pushes.push(data.get().to_owned()),
                GatewayMessage::Reconnect { after_ms, reason } => break (after_ms, reason),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            pushes,
            ["0", "1", "2"],
            "accepted pushes arrive in order before the close"
        );
        assert!(hint.0 <= 500, "hint delay within the configured jitter");
        assert_eq!(hint.1, "drain");
        expect_close(ws, CloseCode::ServiceRestart).await;
    }
    let ready = gw.http.get(gw.api("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let stats: Value = gw.get("/v1/stats").await.json().await.unwrap();
    assert_eq!(stats["draining"], true);
    assert_eq!(
        refused_status(&gw.ws_url(), Some(&token("late", &[], 60))).await,
        503
    );
    let wait = tokio::time::timeout(PATIENCE, gw.gateway.wait()).await;
    assert!(wait.is_ok(), "the gateway stops once drained");
}

#[tokio::test]
async fn drain_of_an_empty_gateway_finishes_at_once() {
    let gw = TestGateway::start().await;
    gw.gateway.drain();
    let wait = tokio::time::timeout(PATIENCE, gw.gateway.wait()).await;
    assert!(wait.is_ok());
}

/// A session that registers after the drain took its first snapshot (its upgrade was
/// past admission) is found by the drain's re-scans and closed too.
#[tokio::test]
async fn drain_closes_sessions_that_register_after_it_started() {
    let gw = TestGateway::start_with(|c| {
        c.drain.connections_per_second = 1000;
        c.drain.deadline_seconds = 30;
    })
    .await;
    let state = gw.gateway.state().clone();
    // Stands for work the drain waits for, so it is still running when `late` comes.
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    state.tasks.spawn(async move {
        let _ = held.await;
    });
    let mut early = gw.agent("early", &[]).await;
    gw.gateway.drain();
    expect_close(&mut early, CloseCode::ServiceRestart).await;
    // Registered after the first pass closed everything, as a late upgrade would be.
    let late = tether_gateway::hub::Connection::new(
        state.hub.next_connection_id(),
        "late",
        vec![],
        u64::MAX,
    );
    state.hub.register(&late);
    eventually(|| late.is_closing()).await;
    state.hub.unregister(&late);
    let _ = release.send(());
    let wait = tokio::time::timeout(PATIENCE, gw.gateway.wait()).await;
    assert!(wait.is_ok());
}

//! Limits and liveness: sizes, rates, malformed input, capacity, pings, idle, expiry.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tether_protocol::{AgentMessage, CloseCode, ErrorCode, GatewayMessage};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::common::*;

#[tokio::test]
async fn oversized_message_closes_with_1009_and_spares_others() {
    let gw = TestGateway::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let mut bystander = gw.agent("bystander", &[]).await;
    let mut agent = gw.agent("big", &[]).await;
    send_text(&mut agent, &"x".repeat(4096)).await;
    expect_close(&mut agent, CloseCode::MessageTooBig).await;
    assert_eq!(
        gw.post("/v1/agents/bystander/messages", json!(1))
            .await
            .status(),
        202
    );
    assert!(matches!(
        next_message(&mut bystander).await,
        GatewayMessage::Push { .. }
    ));
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let gw = TestGateway::start().await;
    let mut agent = gw.agent("agent", &[]).await;
    let frame = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    agent.send(Message::Frame(frame)).await.unwrap();
    expect_close(&mut agent, CloseCode::InvalidPayload).await;
}

#[tokio::test]
async fn malformed_envelopes_get_error_frames_then_1008() {
    let gw = TestGateway::start_with(|c| c.limits.max_invalid_envelopes = 2).await;
    let mut agent = gw.agent("agent", &[]).await;
    send_text(&mut agent, r#"{"type":"launch","id":"x1"}"#).await;
    match next_message(&mut agent).await {
        GatewayMessage::Error { id, error } => {
            assert_eq!(
                id.as_deref(),
                Some("x1"),
                "the error names the refused envelope"
            );
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert!(error.message.contains("launch"));
        }
        other => panic!("expected error, got {other:?}"),
    }
    send_text(&mut agent, "not json").await;
    assert!(matches!(
        next_message(&mut agent).await,
        GatewayMessage::Error { id: None, .. }
    ));
    // A valid envelope resets the streak.
    send_text(
        &mut agent,
        &AgentMessage::Ack {
            id: "nothing-pending".into(),
        }
        .encode(),
    )
    .await;
    for _ in 0..2 {
        send_text(&mut agent, "[]").await;
        assert!(matches!(
            next_message(&mut agent).await,
            GatewayMessage::Error { .. }
        ));
    }
    send_text(&mut agent, "[]").await;
    expect_close(&mut agent, CloseCode::PolicyViolation).await;
}

#[tokio::test]
async fn message_rate_is_limited_then_enforced() {
    let gw = TestGateway::start_with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.message_burst = 1;
        c.limits.max_rate_violations = 2;
    })
    .await;
    let mut agent = gw.agent("chatty", &[]).await;
    let ack = AgentMessage::Ack { id: "n".into() }.encode();
    send_text(&mut agent, &ack).await;
    for _ in 0..2 {
        send_text(&mut agent, &ack).await;
        assert!(matches!(
            next_message(&mut agent).await,
            GatewayMessage::Error { error, .. } if error.code == ErrorCode::RateLimited
        ));
    }
    send_text(&mut agent, &ack).await;
    expect_close(&mut agent, CloseCode::PolicyViolation).await;
}

#[tokio::test]
async fn connection_limit_answers_503_before_upgrade() {
    let gw = TestGateway::start_with(|c| c.limits.max_connections = 1).await;
    let first = gw.agent("one", &[]).await;
    assert_eq!(
        refused_status(&gw.ws_url(), Some(&token("two", &[], 60))).await,
        503
    );
    drop(first);
    gw.wait_for_connections(0).await;
    eventually(|| {
        gw.gateway
            .state()
            .admitted
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
    })
    .await;
    let _second = gw.agent("two", &[]).await;
}

#[tokio::test]
async fn dead_peer_is_closed_after_missed_pong() {
    let gw = TestGateway::start_with(|c| {
        c.limits.ping_interval_seconds = 1;
        c.limits.pong_timeout_seconds = 1;
    })
    .await;
    // Connected but never reads: it cannot answer pings.
    let mut silent = gw.agent("silent", &[]).await;
    gw.wait_for_connections(1).await;
    gw.wait_for_connections(0).await;
    expect_close(&mut silent, CloseCode::PingTimeout).await;
}

#[tokio::test]
async fn reading_peers_answer_pings_and_stay() {
    let gw = TestGateway::start_with(|c| {
        c.limits.ping_interval_seconds = 1;
        c.limits.pong_timeout_seconds = 1;
    })
    .await;
    let mut agent = gw.agent("alive", &[]).await;
    // Reading lets tungstenite answer the pings; after several intervals it is still here.
    let reader = tokio::time::timeout(Duration::from_millis(3500), next_message(&mut agent)).await;
    assert!(reader.is_err(), "no envelope was expected while idle");
    assert_eq!(
        gw.post("/v1/agents/alive/messages", json!("still here"))
            .await
            .status(),
        202
    );
}

#[tokio::test]
async fn idle_connections_are_closed_when_configured() {
    let gw = TestGateway::start_with(|c| c.limits.idle_timeout_seconds = 1).await;
    let mut agent = gw.agent("idle", &[]).await;
    expect_close(&mut agent, CloseCode::IdleTimeout).await;
}

#[tokio::test]
async fn expired_token_closes_with_4001() {
    let gw = TestGateway::start().await;
    let (mut ws, _) = connect(&gw.ws_url(), Some(&token("short", &[], 2)))
        .await
        .unwrap();
    assert!(matches!(
        next_message(&mut ws).await,
        GatewayMessage::Welcome(_)
    ));
    expect_close(&mut ws, CloseCode::TokenExpired).await;
}

#[tokio::test]
async fn refresh_extends_the_session() {
    let gw = TestGateway::start().await;
    let (mut ws, _) = connect(&gw.ws_url(), Some(&token("renewed", &[], 2)))
        .await
        .unwrap();
    assert!(matches!(
        next_message(&mut ws).await,
        GatewayMessage::Welcome(_)
    ));
    let refresh = AgentMessage::Refresh {
        token: token("renewed", &[], 3600),
    };
    send_text(&mut ws, &refresh.encode()).await;
    match next_message(&mut ws).await {
        GatewayMessage::Refreshed { expires_at } => assert!(expires_at.unwrap() > now() + 3000),
        other => panic!("expected refreshed, got {other:?}"),
    }
    // Past the first token's expiry the session is still open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        gw.post("/v1/agents/renewed/messages", json!(1))
            .await
            .status(),
        202
    );
    assert!(matches!(
        next_message(&mut ws).await,
        GatewayMessage::Push { .. }
    ));
}

/// A `refresh` whose token expires sooner than the one it replaces ends the session at
/// the new expiry. With pings an hour apart nothing else brings the sweep round to the
/// connection within the test's patience: the refresh itself has to.
#[tokio::test]
async fn refresh_with_an_earlier_expiry_closes_at_the_new_one() {
    let gw = TestGateway::start_with(|c| c.limits.ping_interval_seconds = 3600).await;
    let mut ws = gw.agent("shortened", &[]).await;
    let refresh = AgentMessage::Refresh {
        token: token("shortened", &[], 2),
    };
    send_text(&mut ws, &refresh.encode()).await;
    match next_message(&mut ws).await {
        GatewayMessage::Refreshed { expires_at } => assert!(expires_at.unwrap() <= now() + 2),
        other => panic!("expected refreshed, got {other:?}"),
    }
    expect_close(&mut ws, CloseCode::TokenExpired).await;
}

/// Many connections opened together, half reading (their client answers pings) and
/// half never reading: after several ping intervals every reader is still connected
/// and gets a broadcast, and every silent one was closed for the missed pong.
#[tokio::test]
async fn pings_keep_every_reader_and_close_every_silent_peer() {
    const EACH: usize = 40;
    let gw = TestGateway::start_with(|c| {
        c.limits.ping_interval_seconds = 1;
        c.limits.pong_timeout_seconds = 1;
    })
    .await;
    let mut readers = Vec::new();
    let mut silent = Vec::new();
    for i in 0..EACH {
        readers.push(gw.agent(&format!("reader-{i}"), &[]).await);
        silent.push(gw.agent(&format!("silent-{i}"), &[]).await);
    }
    // The readers read (tungstenite answers pings while reading) until the silent
    // ones are gone.
    let hub = gw.gateway.state().hub.clone();
    let reading = readers.iter_mut().map(|ws| async move {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return other,
            }
        }
    });
    let first_frames = futures_util::future::select_all(reading.map(Box::pin));
    tokio::select! {
        frame = first_frames => panic!("a reader got {:?} while idle", frame.0),
        () = tether_test_support::until("the silent peers closed", PATIENCE, || hub.len() == EACH) => {}
    }
    for ws in &mut silent {
        expect_close(ws, CloseCode::PingTimeout).await;
    }
    let delivered = gw.post("/v1/broadcast", json!("to the readers")).await;
    assert_eq!(delivered.status(), 202);
    assert_eq!(
        delivered.json::<serde_json::Value>().await.unwrap()["delivered"],
        EACH as u64
    );
    for ws in &mut readers {
        assert!(matches!(
            next_message(ws).await,
            GatewayMessage::Push { .. }
        ));
    }
}

#[tokio::test]
async fn refresh_for_another_agent_closes_with_4002() {
    let gw = TestGateway::start().await;
    let mut ws = gw.agent("me", &[]).await;
    let refresh = AgentMessage::Refresh {
        token: token("someone-else", &[], 3600),
    };
    send_text(&mut ws, &refresh.encode()).await;
    expect_close(&mut ws, CloseCode::TokenInvalid).await;
}

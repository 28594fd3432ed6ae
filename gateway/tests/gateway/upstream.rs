//! Agent → backend through a real HTTP upstream started in the test.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tether_config::{UpstreamConfig, UpstreamEvent};
use tether_protocol::{AgentMessage, ErrorCode, GatewayMessage, RawValue};

use crate::common::*;

const HMAC_KEY: &str = "upstream-hmac-key-0123456789abcdef";

#[derive(Default)]
struct Upstream {
    received: Mutex<Vec<(HeaderMap, Value)>>,
    /// Status to answer with; 200 when unset.
    fail_with: Mutex<Option<StatusCode>>,
}

async fn receive(
    State(up): State<Arc<Upstream>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    // Verify the signature as a tenant backend would: HMAC over "{timestamp}.{body}".
    let signature = headers["x-tether-signature"].to_str().unwrap().to_owned();
    let ts: u64 = headers["x-tether-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body_str = std::str::from_utf8(&body).unwrap();
    assert_eq!(
        signature,
        tether_gateway::upstream::sign(HMAC_KEY.as_bytes(), ts, body.as_ref())
    );
    let event: Value = serde_json::from_str(body_str).unwrap();
    up.received.lock().push((headers, event.clone()));
    let mut out = HeaderMap::new();
    if let Some(status) = *up.fail_with.lock() {
        out.insert("retry-after", "2".parse().unwrap());
        return (status, out, String::new());
    }
    let answer = match event["type"].as_str() {
        Some("request") => json!({"answer": event["data"]}).to_string(),
        _ => String::new(),
    };
    (StatusCode::OK, out, answer)
}

async fn start_upstream() -> (Arc<Upstream>, String) {
    let up = Arc::new(Upstream::default());
    let app = axum::Router::new()
        .route("/events", post(receive))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (up, url)
}

async fn gateway_with_upstream(url: String, events: Vec<UpstreamEvent>) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hmac");
    std::fs::write(&secret_file, HMAC_KEY).unwrap();
    let gw = TestGateway::start_with(move |c| {
        c.upstream = Some(UpstreamConfig {
            url,
            secret_file: Some(secret_file),
            timeout_ms: 2_000,
            events,
            max_concurrency: 16,
            queue_timeout_ms: 1_000,
        });
    })
    .await;
    // The key file is read at start; the directory can go.
    drop(dir);
    gw
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap()
}

#[tokio::test]
async fn send_is_signed_posted_and_acked() {
    let (up, url) = start_upstream().await;
    let gw = gateway_with_upstream(url, vec![UpstreamEvent::Message]).await;
    let mut agent = gw.agent("agent-1", &[]).await;
    send_text(
        &mut agent,
        &AgentMessage::Send {
            id: "m-1".into(),
            data: raw(r#"{"temp":21}"#),
        }
        .encode(),
    )
    .await;
    assert!(matches!(next_message(&mut agent).await, GatewayMessage::Ack { id } if id == "m-1"));
    let received = up.received.lock();
    let (headers, event) = &received[0];
    assert_eq!(event["type"], "message");
    assert_eq!(event["agent_id"], "agent-1");
    assert_eq!(event["id"], "m-1");
    assert_eq!(event["data"], json!({"temp": 21}));
    assert_eq!(headers["idempotency-key"], "m-1");
}

#[tokio::test]
async fn upstream_failure_is_a_nack_the_agent_can_retry() {
    let (up, url) = start_upstream().await;
    let gw = gateway_with_upstream(url, vec![UpstreamEvent::Message]).await;
    let mut agent = gw.agent("agent-1", &[]).await;
    *up.fail_with.lock() = Some(StatusCode::SERVICE_UNAVAILABLE);
    let send = AgentMessage::Send {
        id: "m-2".into(),
        data: raw("1"),
    }
    .encode();
    send_text(&mut agent, &send).await;
    match next_message(&mut agent).await {
        GatewayMessage::Nack {
            id,
            error,
            retry_after_ms,
        } => {
            assert_eq!(id, "m-2");
            assert_eq!(error.code, ErrorCode::UpstreamError);
            assert_eq!(retry_after_ms, Some(2000));
        }
        other => panic!("expected nack, got {other:?}"),
    }
    // The retry, with the same idempotency id, goes through once the backend is back.
    *up.fail_with.lock() = None;
    send_text(&mut agent, &send).await;
    assert!(matches!(next_message(&mut agent).await, GatewayMessage::Ack { id } if id == "m-2"));
    let ids: Vec<Value> = up
        .received
        .lock()
        .iter()
        .map(|(_, e)| e["id"].clone())
        .collect();
    assert_eq!(ids, [json!("m-2"), json!("m-2")]);
}

#[tokio::test]
async fn agent_request_gets_the_upstream_answer() {
    let (_up, url) = start_upstream().await;
    let gw = gateway_with_upstream(url, vec![UpstreamEvent::Message]).await;
    let mut agent = gw.agent("agent-1", &[]).await;
    let ask = AgentMessage::Request {
        id: "q-1".into(),
        data: raw(r#""config?""#),
        timeout_ms: Some(1000),
    };
    send_text(&mut agent, &ask.encode()).await;
    match next_message(&mut agent).await {
        GatewayMessage::Response { id, result } => {
            assert_eq!(id, "q-1");
            assert_eq!(result.unwrap().get(), r#"{"answer":"config?"}"#);
        }
        other => panic!("expected response, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_and_disconnect_events_are_forwarded_when_asked() {
    let (up, url) = start_upstream().await;
    let gw =
        gateway_with_upstream(url, vec![UpstreamEvent::Connect, UpstreamEvent::Disconnect]).await;
    let agent = gw.agent("agent-9", &[]).await;
    drop(agent);
    eventually(|| up.received.lock().len() == 2).await;
    let kinds: Vec<Value> = up
        .received
        .lock()
        .iter()
        .map(|(_, e)| e["type"].clone())
        .collect();
    assert_eq!(kinds, [json!("connect"), json!("disconnect")]);
}

#[tokio::test]
async fn send_without_upstream_is_nacked_as_unavailable() {
    let gw = TestGateway::start().await;
    let mut agent = gw.agent("agent-1", &[]).await;
    send_text(
        &mut agent,
        &AgentMessage::Send {
            id: "m".into(),
            data: raw("1"),
        }
        .encode(),
    )
    .await;
    assert!(matches!(
        next_message(&mut agent).await,
        GatewayMessage::Nack { error, .. } if error.code == ErrorCode::Unavailable
    ));
}

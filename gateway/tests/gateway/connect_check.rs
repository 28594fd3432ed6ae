//! The connect check (`auth.connectCheck`) against a real HTTP backend in the test: it
//! verifies the gateway's signature, admits with extra groups or refuses with a reason,
//! or fails (500, too slow) to show the `onUnreachable` policy; answers are cached per
//! agent for `cacheSeconds`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tether_config::{ConnectCheckConfig, Unreachable};
use tether_gateway::upstream::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use tokio_tungstenite::tungstenite;

use crate::common::*;

const CHECK_SECRET: &str = "connect-check-secret-0123456789abcdef";

#[derive(Clone, Copy)]
enum Mode {
    Decide,
    Status500,
    Slow,
}

#[derive(Clone)]
struct Backend {
    mode: Arc<Mutex<Mode>>,
    asked: Arc<AtomicUsize>,
    bad_signatures: Arc<AtomicUsize>,
}

async fn answer(
    State(backend): State<Backend>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    backend.asked.fetch_add(1, Ordering::SeqCst);
    let timestamp: u64 = headers[TIMESTAMP_HEADER].to_str().unwrap().parse().unwrap();
    if headers[SIGNATURE_HEADER].to_str().unwrap()
        != sign(CHECK_SECRET.as_bytes(), timestamp, &body)
    {
        backend.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    let mode = *backend.mode.lock();
    match mode {
        Mode::Status500 => (StatusCode::INTERNAL_SERVER_ERROR, "down".into()),
        Mode::Slow => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (StatusCode::OK, json!({"allow": true}).to_string())
        }
        Mode::Decide => {
            let query: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(query["tenant"], "acme");
            let agent = query["agent_id"].as_str().unwrap();
            let answer = if agent.starts_with("blocked") {
                json!({"allow": false, "reason": "account suspended"})
            } else {
                json!({"allow": true, "groups": ["checked"]})
            };
            (StatusCode::OK, answer.to_string())
        }
    }
}

async fn backend() -> (Backend, String) {
    let backend = Backend {
        mode: Arc::new(Mutex::new(Mode::Decide)),
        asked: Arc::default(),
        bad_signatures: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/admit", axum::routing::post(answer))
        .with_state(backend.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/admit", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (backend, url)
}

async fn gateway(
    url: &str,
    tweak: impl FnOnce(&mut ConnectCheckConfig),
) -> (TestGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("check-secret");
    std::fs::write(&secret, CHECK_SECRET).unwrap();
    let mut check = ConnectCheckConfig::new(url, secret);
    tweak(&mut check);
    let gw = TestGateway::start_with(move |c| c.auth.connect_check = Some(check)).await;
    (gw, dir)
}

async fn refusal(gw: &TestGateway, sub: &str) -> (u16, String) {
    match connect(&gw.ws_url(), Some(&token(sub, &[], 3600))).await {
        Err(tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Ok(_) => panic!("{sub} was admitted"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn the_backend_admits_with_groups_or_refuses_and_answers_are_cached() {
    let (backend, url) = backend().await;
    let (gw, _dir) = gateway(&url, |_| {}).await;
    // Admitted, and in the group the backend added (the token names none).
    let mut agent = gw.agent("a-1", &[]).await;
    let response = gw.post("/v1/groups/checked/messages", json!("hello")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.json::<Value>().await.unwrap()["delivered"], 1);
    assert!(matches!(
        next_message(&mut agent).await,
        tether_protocol::GatewayMessage::Push { .. }
    ));
    // Refused with the backend's reason.
    let (status, body) = refusal(&gw, "blocked-1").await;
    assert_eq!(status, 403);
    assert!(body.contains("account suspended"), "{body}");
    assert_eq!(backend.asked.load(Ordering::SeqCst), 2);
    // Both answers are cached: reconnecting asks nothing, even with the backend down.
    *backend.mode.lock() = Mode::Status500;
    drop(agent);
    let _again = gw.agent("a-1", &[]).await;
    assert_eq!(refusal(&gw, "blocked-1").await.0, 403);
    assert_eq!(backend.asked.load(Ordering::SeqCst), 2);
    assert_eq!(backend.bad_signatures.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn without_a_cache_every_handshake_asks() {
    let (backend, url) = backend().await;
    let (gw, _dir) = gateway(&url, |c| c.cache_seconds = 0).await;
    let _first = gw.agent("a-1", &[]).await;
    let _second = gw.agent("a-1", &[]).await;
    assert_eq!(backend.asked.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unreachable_backend_refuses_by_default_and_admits_when_allowed() {
    let (backend, url) = backend().await;
    *backend.mode.lock() = Mode::Status500;
    let (deny, _d1) = gateway(&url, |c| c.timeout_ms = 300).await;
    let (status, body) = refusal(&deny, "a-1").await;
    assert_eq!(status, 503);
    assert!(body.contains("connect check"), "{body}");
    // Failures are not cached: once the backend is back, the agent gets in.
    *backend.mode.lock() = Mode::Decide;
    let _agent = deny.agent("a-1", &[]).await;
    // Too slow counts as unreachable.
    *backend.mode.lock() = Mode::Slow;
    assert_eq!(refusal(&deny, "a-2").await.0, 503);

    let (allow, _d2) = gateway(&url, |c| {
        c.timeout_ms = 300;
        c.on_unreachable = Unreachable::Allow;
    })
    .await;
    let _admitted = allow.agent("a-3", &[]).await;
    // Admitted without the backend's groups: nothing in `checked`.
    let response = allow.post("/v1/groups/checked/messages", json!(1)).await;
    assert_eq!(response.json::<Value>().await.unwrap()["delivered"], 0);
}

//! Tenant backends (they hold API keys) and hostile upstreams.

use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use serde_json::json;
use tether_config::{UpstreamConfig, UpstreamEvent};
use tether_protocol::{AgentMessage, ErrorCode, GatewayMessage, RawValue};

use crate::common::*;
use crate::harness::*;

const HMAC_KEY: &str = "adversarial-hmac-key-0123456789abcdef";

/// Bad names, ids and timeouts are a clear 400 (never a 404 or a panic).
#[tokio::test]
async fn push_api_refuses_malformed_names_keys_and_timeouts() {
    let mut arena = Arena::start().await;
    let gw = &arena.gw;
    let long = "a".repeat(300);
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            gw.post(&format!("/v1/agents/{long}/messages"), json!(1))
                .await
        ),
        400
    );
    assert_eq!(status(gw.get(&format!("/v1/agents/{long}")).await), 400);
    assert_eq!(
        status(
            gw.post(
                &format!("/v1/groups/{}/messages", "g".repeat(200)),
                json!(1)
            )
            .await
        ),
        400
    );
    // %0A: a newline in an agent id.
    assert_eq!(
        status(gw.post("/v1/agents/a%0Ab/messages", json!(1)).await),
        400
    );
    let with_key = |key: &str| {
        gw.http
            .post(gw.api("/v1/agents/canary/messages"))
            .bearer_auth(API_KEY)
            .header("idempotency-key", key)
            .json(&json!(1))
            .send()
    };
    assert_eq!(status(with_key(&"k".repeat(200)).await.unwrap()), 400);
    assert_eq!(status(with_key("tab\there").await.unwrap()), 400);
    for query in [
        "timeout_ms=0",
        "timeout_ms=soon",
        "timeout_ms=-5",
        "ack=maybe",
    ] {
        let url = format!("/v1/agents/canary/requests?{query}");
        assert_eq!(status(gw.post(&url, json!(1)).await), 400, "{query}");
    }
    // A binary body cannot be acknowledged: it carries no id.
    let binary = gw
        .http
        .post(gw.api("/v1/agents/canary/messages?ack=true"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/octet-stream")
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(status(binary), 400);
    arena.check().await;
}

/// A huge `timeout_ms` is capped at `limits.maxRequestTimeoutMs` (the agent sees the
/// cap in its `request`).
#[tokio::test]
async fn huge_timeouts_are_capped() {
    let mut arena = Arena::start_with(|c| c.limits.max_request_timeout_ms = 20_000).await;
    let mut agent = arena.gw.agent("responder", &[]).await;
    let http = arena.gw.http.clone();
    let url = arena.gw.api(&format!(
        "/v1/agents/responder/requests?timeout_ms={}",
        u64::MAX
    ));
    let call = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(API_KEY)
            .json(&json!("q"))
            .send()
            .await
            .unwrap()
    });
    let GatewayMessage::Request { id, timeout_ms, .. } = next_message(&mut agent).await else {
        panic!("expected a request");
    };
    assert_eq!(timeout_ms, 20_000);
    let answer = AgentMessage::Response {
        id,
        result: Ok(RawValue::from_string("\"a\"".into()).unwrap()),
    };
    send_text(&mut agent, &answer.encode()).await;
    assert_eq!(call.await.unwrap().status(), 200);
    arena.check().await;
}

/// One Idempotency-Key waiting for an agent's answer cannot be used again until it is
/// answered (409), and an `ack` cannot complete a `request`.
#[tokio::test]
async fn in_flight_idempotency_keys_are_exclusive() {
    let mut arena = Arena::start().await;
    let mut agent = arena.gw.agent("acker", &[]).await;
    let send = |path: &'static str, key: &'static str| {
        let http = arena.gw.http.clone();
        let url = arena.gw.api(path);
        async move {
            http.post(url)
                .bearer_auth(API_KEY)
                .header("idempotency-key", key)
                .json(&json!("x"))
                .send()
                .await
                .unwrap()
        }
    };
    let first = tokio::spawn(send(
        "/v1/agents/acker/messages?ack=true&timeout_ms=10000",
        "k1",
    ));
    let GatewayMessage::Push { id, .. } = next_message(&mut agent).await else {
        panic!("expected the push");
    };
    assert_eq!(id, "k1");
    assert_eq!(
        send("/v1/agents/acker/messages?ack=true", "k1")
            .await
            .status(),
        409
    );
    assert_eq!(send("/v1/agents/acker/requests", "k1").await.status(), 409);
    send_text(&mut agent, &AgentMessage::Ack { id: "k1".into() }.encode()).await;
    assert_eq!(first.await.unwrap().status(), 200);

    // An ack naming a request does not answer it; the response does.
    let request = tokio::spawn(send("/v1/agents/acker/requests?timeout_ms=10000", "r1"));
    let GatewayMessage::Request { id, .. } = next_message(&mut agent).await else {
        panic!("expected the request");
    };
    send_text(&mut agent, &AgentMessage::Ack { id: id.clone() }.encode()).await;
    let response = AgentMessage::Response {
        id,
        result: Ok(RawValue::from_string("42".into()).unwrap()),
    };
    send_text(&mut agent, &response.encode()).await;
    let answered = request.await.unwrap();
    assert_eq!(answered.status(), 200);
    assert_eq!(answered.text().await.unwrap(), "42");
    arena.check().await;
}

/// A push-scoped key pushes and asks; it cannot broadcast, disconnect, drain or look
/// agents up (403). An admin key can.
#[tokio::test]
async fn api_key_scopes_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("scoped-keys");
    std::fs::write(
        &keys,
        "pusher-0123456789 push,request\nops-0123456789abc admin,presence\n",
    )
    .unwrap();
    let mut arena = Arena::start_with_key("pusher-0123456789", |c| {
        c.auth.api_keys_file = Some(keys);
    })
    .await;
    let gw = &arena.gw;
    let call = |method: reqwest::Method, path: &str, key: &str| {
        gw.http
            .request(method, gw.api(path))
            .bearer_auth(key)
            .json(&json!("x"))
            .send()
    };
    use reqwest::Method;
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            call(
                Method::POST,
                "/v1/agents/canary/messages",
                "pusher-0123456789"
            )
            .await
            .unwrap()
        ),
        202
    );
    assert_eq!(
        status(
            call(
                Method::POST,
                "/v1/groups/canaries/messages",
                "pusher-0123456789"
            )
            .await
            .unwrap()
        ),
        202
    );
    for (method, path) in [
        (Method::POST, "/v1/broadcast"),
        (Method::DELETE, "/v1/agents/canary"),
        (Method::POST, "/admin/drain"),
        (Method::GET, "/v1/agents/canary"),
        (Method::GET, "/v1/agents"),
    ] {
        assert_eq!(
            status(
                call(method.clone(), path, "pusher-0123456789")
                    .await
                    .unwrap()
            ),
            403,
            "{method} {path}"
        );
    }
    assert_eq!(
        status(
            call(
                Method::POST,
                "/v1/agents/canary/messages",
                "ops-0123456789abc"
            )
            .await
            .unwrap()
        ),
        403
    );
    assert_eq!(
        status(
            call(Method::GET, "/v1/agents/canary", "ops-0123456789abc")
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            call(Method::POST, "/v1/broadcast", "ops-0123456789abc")
                .await
                .unwrap()
        ),
        202
    );
    assert_eq!(
        status(call(Method::GET, "/v1/stats", "nobody").await.unwrap()),
        401
    );
    // Drain the broadcast from the canary's queue before the next check.
    assert!(matches!(
        next_message(&mut arena.canary).await,
        GatewayMessage::Push { .. }
    ));
    assert!(matches!(
        next_message(&mut arena.canary).await,
        GatewayMessage::Push { .. }
    ));
    arena.check().await;
}

/// An upstream that the test controls: hangs, redirects, or answers with a huge body.
async fn upstream(behaviour: &'static str) -> String {
    async fn handle(behaviour: &'static str) -> axum::response::Response {
        use axum::response::IntoResponse;
        match behaviour {
            "hang" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                StatusCode::OK.into_response()
            }
            "redirect" => (
                StatusCode::TEMPORARY_REDIRECT,
                [("location", "http://127.0.0.1:9/internal-secret")],
            )
                .into_response(),
            "huge" => {
                let body = format!("\"{}\"", "x".repeat(16 * 1024 * 1024));
                (StatusCode::OK, body).into_response()
            }
            _ => StatusCode::OK.into_response(),
        }
    }
    let app = axum::Router::new().route("/events", post(move || handle(behaviour)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/events")
}

fn with_upstream(
    url: String,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut tether_config::GatewayConfig),
) -> impl FnOnce(&mut tether_config::GatewayConfig) {
    let secret = dir.join("hmac");
    std::fs::write(&secret, HMAC_KEY).unwrap();
    move |c| {
        c.upstream = Some(UpstreamConfig {
            url,
            secret_file: Some(secret),
            timeout_ms: 60_000,
            events: vec![UpstreamEvent::Message],
            max_concurrency: 2,
            queue_timeout_ms: 200,
        });
        tweak(c);
    }
}

async fn nack_of(ws: &mut Ws) -> (String, tether_protocol::ErrorBody, Option<u64>) {
    match next_message(ws).await {
        GatewayMessage::Nack {
            id,
            error,
            retry_after_ms,
        } => (id, error, retry_after_ms),
        other => panic!("expected a nack, got {other:?}"),
    }
}

fn send(id: &str) -> String {
    AgentMessage::Send {
        id: id.into(),
        data: RawValue::from_string("1".into()).unwrap(),
    }
    .encode()
}

/// A hanging upstream: one agent's sends beyond `limits.maxUpstreamInFlight` are
/// nacked `overloaded` at once; other agents wait at most `queueTimeoutMs` for the
/// pod's slots, then get `overloaded` too; and the drain does not wait for the
/// hung calls past its deadline.
#[tokio::test]
async fn hanging_upstream_cannot_pile_up_work_or_hold_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let url = upstream("hang").await;
    let mut arena = Arena::start_with(with_upstream(url, dir.path(), |c| {
        c.limits.max_upstream_in_flight = 2;
        c.drain.deadline_seconds = 1;
    }))
    .await;
    let mut greedy = arena.gw.agent("greedy", &[]).await;
    for i in 0..6 {
        send_text(&mut greedy, &send(&format!("m{i}"))).await;
    }
    // m0 and m1 hold the pod's two slots; m2..m5 are over the connection's cap.
    for i in 2..6 {
        let (id, error, retry) = nack_of(&mut greedy).await;
        assert_eq!(id, format!("m{i}"));
        assert_eq!(error.code, ErrorCode::Overloaded);
        assert!(retry.is_some());
    }
    let mut other = arena.gw.agent("other", &[]).await;
    send_text(&mut other, &send("o1")).await;
    let (id, error, _) = nack_of(&mut other).await;
    assert_eq!((id.as_str(), error.code), ("o1", ErrorCode::Overloaded));
    arena.check().await;

    let Arena { gw, canary, .. } = arena;
    gw.gateway.drain();
    let stopped = tokio::time::timeout(PATIENCE, gw.gateway.wait()).await;
    assert!(stopped.is_ok(), "a hung upstream does not hold the drain");
    drop((canary, greedy, other));
}

/// A redirecting upstream is not followed (signed events must not be bounced
/// elsewhere), and the agent's nack names no URL.
#[tokio::test]
async fn redirecting_upstream_is_not_followed_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = upstream("redirect").await;
    let mut arena = Arena::start_with(with_upstream(url, dir.path(), |_| {})).await;
    let mut agent = arena.gw.agent("sender", &[]).await;
    send_text(&mut agent, &send("r1")).await;
    let (_, error, _) = nack_of(&mut agent).await;
    assert_eq!(error.code, ErrorCode::UpstreamError);
    assert_eq!(error.message, "upstream answered 307");
    arena.check().await;
}

/// An unreachable upstream: a fixed message, not the HTTP client's error text.
#[tokio::test]
async fn unreachable_upstream_leaks_no_internals() {
    let dir = tempfile::tempdir().unwrap();
    let mut arena = Arena::start_with(with_upstream(
        "http://127.0.0.1:9/secret-path".into(),
        dir.path(),
        |_| {},
    ))
    .await;
    let mut agent = arena.gw.agent("sender", &[]).await;
    send_text(&mut agent, &send("u1")).await;
    let (_, error, _) = nack_of(&mut agent).await;
    assert_eq!(error.code, ErrorCode::UpstreamError);
    assert_eq!(error.message, "upstream unreachable");
    arena.check().await;
}

/// A huge upstream answer to an agent's `request` is cut at `maxMessageBytes`: the
/// agent gets an error, memory stays bounded.
#[tokio::test]
async fn huge_upstream_answer_is_refused_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let url = upstream("huge").await;
    let mut arena = Arena::start_with(with_upstream(url, dir.path(), |_| {})).await;
    let mut agent = arena.gw.agent("asker", &[]).await;
    for i in 0..4 {
        let request = AgentMessage::Request {
            id: format!("q{i}"),
            data: RawValue::from_string("1".into()).unwrap(),
            timeout_ms: Some(10_000),
        };
        send_text(&mut agent, &request.encode()).await;
        match next_message(&mut agent).await {
            GatewayMessage::Response {
                result: Err(error), ..
            } => {
                assert_eq!(error.code, ErrorCode::UpstreamError);
                assert_eq!(error.message, "upstream answer too large");
            }
            other => panic!("expected an error response, got {other:?}"),
        }
    }
    arena.check().await;
}

//! The push API: one agent, request/response, groups, broadcast, presence, disconnect,
//! newest-connection-wins.

use futures_util::StreamExt;
use serde_json::{Value, json};
use tether_protocol::{AgentMessage, CloseCode, ErrorBody, ErrorCode, GatewayMessage, RawValue};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap()
}

#[tokio::test]
async fn push_is_accepted_and_delivered_as_one_envelope() {
    let gw = TestGateway::start().await;
    let mut agent = gw.agent("agent-1", &[]).await;
    let response = gw
        .http
        .post(gw.api("/v1/agents/agent-1/messages"))
        .bearer_auth(API_KEY)
        .header("idempotency-key", "order-42")
        .json(&json!({"cmd": "scan", "depth": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], "order-42");
    match next_message(&mut agent).await {
        GatewayMessage::Push { id, data, ack } => {
            assert_eq!(id, "order-42");
            assert!(!ack);
            let data: Value = serde_json::from_str(data.get()).unwrap();
            assert_eq!(data, json!({"cmd": "scan", "depth": 2}));
        }
        other => panic!("expected push, got {other:?}"),
    }
}

#[tokio::test]
async fn binary_bodies_become_binary_frames() {
    let gw = TestGateway::start().await;
    let mut agent = gw.agent("agent-1", &[]).await;
    let response = gw
        .http
        .post(gw.api("/v1/agents/agent-1/messages"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 159, 146, 150])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let frame = tokio::time::timeout(PATIENCE, agent.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame, Message::Binary(vec![0u8, 159, 146, 150].into()));
}

#[tokio::test]
async fn push_errors_have_precise_statuses() {
    let gw = TestGateway::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let _agent = gw.agent("agent-1", &[]).await;
    let unknown = gw.post("/v1/agents/nobody/messages", json!(1)).await;
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let big = gw
        .post("/v1/agents/agent-1/messages", json!("x".repeat(2000)))
        .await;
    assert_eq!(big.status(), 413);

    let invalid = gw
        .http
        .post(gw.api("/v1/agents/agent-1/messages"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);

    let no_key = gw
        .http
        .post(gw.api("/v1/agents/agent-1/messages"))
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let wrong_key = gw
        .http
        .post(gw.api("/v1/agents/agent-1/messages"))
        .bearer_auth("guess")
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_key.status(), 401);
}

#[tokio::test]
async fn full_queue_answers_429_and_memory_stays_bounded() {
    let gw = TestGateway::start_with(|c| {
        c.limits.outbound_queue = 4;
        c.limits.max_message_bytes = 60_000;
    })
    .await;
    // An agent that never reads: first the kernel's socket buffers fill, then its queue.
    let _silent = gw.agent("silent", &[]).await;
    let payload = json!("y".repeat(50_000));
    let mut statuses = Vec::new();
    for _ in 0..2_000 {
        let status = gw
            .post("/v1/agents/silent/messages", payload.clone())
            .await
            .status();
        statuses.push(status.as_u16());
        if status == 429 {
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&429),
        "queue never filled: {statuses:?}"
    );
    let conn = gw.gateway.state().hub.get("silent").unwrap();
    assert!(conn.queue_len() <= 4, "queue grew past its bound");
}

#[tokio::test]
async fn ack_mode_returns_after_the_agent_acknowledged() {
    let gw = TestGateway::start().await;
    let mut agent = gw.agent("agent-1", &[]).await;
    let http = gw.http.clone();
    let url = gw.api("/v1/agents/agent-1/messages?ack=true&timeout_ms=5000");
    let call = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(API_KEY)
            .json(&json!({"v": 1}))
            .send()
            .await
            .unwrap()
    });
    let id = match next_message(&mut agent).await {
        GatewayMessage::Push { id, ack: true, .. } => id,
        other => panic!("expected push with ack, got {other:?}"),
    };
    send_text(&mut agent, &AgentMessage::Ack { id: id.clone() }.encode()).await;
    let response = call.await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], id);

    // Without an ack the caller learns it was not confirmed.
    let timed_out = gw
        .post(
            "/v1/agents/agent-1/messages?ack=true&timeout_ms=200",
            json!(2),
        )
        .await;
    assert_eq!(timed_out.status(), 504);
}

#[tokio::test]
async fn request_returns_the_agents_answer_or_a_clear_failure() {
    let gw = TestGateway::start().await;
    let mut agent = gw.agent("agent-1", &[]).await;
    let http = gw.http.clone();
    let url = gw.api("/v1/agents/agent-1/requests?timeout_ms=5000");
    let ask = |body: Value| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await
                .unwrap()
        })
    };

    let call = ask(json!({"q": "uptime"}));
    let id = match next_message(&mut agent).await {
        GatewayMessage::Request {
            id,
            data,
            timeout_ms,
        } => {
            assert_eq!(data.get(), r#"{"q":"uptime"}"#);
            assert_eq!(timeout_ms, 5000);
            id
        }
        other => panic!("expected request, got {other:?}"),
    };
    let answer = AgentMessage::Response {
        id,
        result: Ok(raw(r#"{"uptime":42}"#)),
    };
    send_text(&mut agent, &answer.encode()).await;
    let response = call.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"uptime": 42})
    );

    let call = ask(json!({"q": "fail"}));
    let GatewayMessage::Request { id, .. } = next_message(&mut agent).await else {
        panic!("expected request")
    };
    let failure = AgentMessage::Response {
        id,
        result: Err(ErrorBody::new(ErrorCode::HandlerError, "disk on fire")),
    };
    send_text(&mut agent, &failure.encode()).await;
    let response = call.await.unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disk on fire")
    );

    let slow = gw
        .post("/v1/agents/agent-1/requests?timeout_ms=100", json!({}))
        .await;
    assert_eq!(slow.status(), 504);
    let absent = gw.post("/v1/agents/nobody/requests", json!({})).await;
    assert_eq!(absent.status(), 404);
}

#[tokio::test]
async fn group_send_and_broadcast_reach_exactly_their_audience() {
    let gw = TestGateway::start().await;
    let mut red = gw.agent("red", &["warm"]).await;
    let mut orange = gw.agent("orange", &["warm", "citrus"]).await;
    let mut blue = gw.agent("blue", &["cold"]).await;

    let response = gw.post("/v1/groups/warm/messages", json!({"t": 1})).await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.json::<Value>().await.unwrap()["delivered"], 2);
    for ws in [&mut red, &mut orange] {
        assert!(
            matches!(next_message(ws).await, GatewayMessage::Push { data, .. } if data.get() == r#"{"t":1}"#)
        );
    }

    let response = gw.post("/v1/broadcast", json!("all")).await;
    assert_eq!(response.json::<Value>().await.unwrap()["delivered"], 3);
    for ws in [&mut red, &mut orange, &mut blue] {
        assert!(
            matches!(next_message(ws).await, GatewayMessage::Push { data, .. } if data.get() == r#""all""#)
        );
    }
    // Blue got the broadcast first: it was not in "warm".
    let empty = gw.post("/v1/groups/nobody-here/messages", json!(1)).await;
    assert_eq!(empty.json::<Value>().await.unwrap()["delivered"], 0);
}

#[tokio::test]
async fn presence_listing_and_disconnect() {
    let gw = TestGateway::start().await;
    let mut agents = Vec::new();
    for name in ["c", "a", "b"] {
        agents.push(gw.agent(name, &["g"]).await);
    }
    let presence: Value = gw.get("/v1/agents/a").await.json().await.unwrap();
    assert_eq!(presence["agent_id"], "a");
    assert_eq!(presence["pod"], "gateway-test-0");
    assert_eq!(presence["groups"], json!(["g"]));
    assert_eq!(gw.get("/v1/agents/zzz").await.status(), 404);

    let page: Value = gw.get("/v1/agents?limit=2").await.json().await.unwrap();
    let ids: Vec<&str> = page["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let page: Value = gw
        .get(&format!("/v1/agents?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["agents"][0]["agent_id"], "c");
    assert!(page["next_cursor"].is_null());
    assert_eq!(gw.get("/v1/agents?limit=0").await.status(), 400);

    let deleted = gw
        .http
        .delete(gw.api("/v1/agents/c"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    expect_close(&mut agents[0], CloseCode::Disconnected).await;
    gw.wait_for_connections(2).await;
    let again = gw
        .http
        .delete(gw.api("/v1/agents/c"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
}

#[tokio::test]
async fn newest_connection_wins() {
    let gw = TestGateway::start().await;
    let mut first = gw.agent("twin", &[]).await;
    let mut second = gw.agent("twin", &[]).await;
    expect_close(&mut first, CloseCode::Replaced).await;
    gw.wait_for_connections(1).await;
    assert_eq!(
        gw.post("/v1/agents/twin/messages", json!("to the newest"))
            .await
            .status(),
        202
    );
    assert!(matches!(
        next_message(&mut second).await,
        GatewayMessage::Push { .. }
    ));
}

#[tokio::test]
async fn health_readiness_and_stats() {
    let gw = TestGateway::start().await;
    let _agent = gw.agent("a", &[]).await;
    assert_eq!(
        gw.http
            .get(gw.api("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        gw.http
            .get(gw.api("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let stats: Value = gw.get("/v1/stats").await.json().await.unwrap();
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["draining"], false);
    assert_eq!(
        gw.http
            .get(gw.api("/v1/stats"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

//! Durable delivery on a real `nats-server` with JetStream (file store): a backlog
//! stored while the agent is away arrives in order on connect, on whatever pod; what
//! the agent did not acknowledge comes again after a reconnect; a gateway SIGKILL or a
//! NATS restart mid-delivery loses nothing; limits refuse what they must; an idle
//! agent costs no drain task.

use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Value, json};
use tether_config::{DeliveryMode, DurableConfig, GatewayConfig};
use tether_gateway::nats::subjects::Subjects;
use tether_protocol::{AgentMessage, GatewayMessage};

use crate::common::{self, API_KEY, Ws, eventually, send_text};
use crate::harness::*;

/// Pool namespace of the harness's gateways (the tenant).
const NS: &str = "acme";

fn with_durable(in_flight: usize) -> impl FnOnce(&mut GatewayConfig) {
    move |c: &mut GatewayConfig| {
        c.delivery.durable = Some(DurableConfig {
            in_flight,
            ..DurableConfig::default()
        });
    }
}

/// POSTs a durable push; asserts 202 and returns its body.
async fn push_durable(http: &reqwest::Client, api: String, agent: &str, data: Value) -> Value {
    let response = http
        .post(format!("{api}/v1/agents/{agent}/messages?delivery=durable"))
        .bearer_auth(API_KEY)
        .json(&data)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "durable push is stored");
    response.json().await.unwrap()
}

fn api_base(pod: &Pod) -> String {
    pod.api("")
}

/// The next push; it must ask for an ack (durable pushes do).
async fn next_durable(ws: &mut Ws) -> (String, Value) {
    match common::next_message(ws).await {
        GatewayMessage::Push { id, data, ack } => {
            assert!(ack, "a durable push asks for an ack");
            (id, serde_json::from_str(data.get()).unwrap())
        }
        other => panic!("expected a push, got {other:?}"),
    }
}

/// Receives the next durable pushes, asserting they carry `expected` in that order
/// (nothing lost, nothing reordered), and acknowledges each.
async fn receive_and_ack(ws: &mut Ws, expected: impl IntoIterator<Item = Value>) {
    for want in expected {
        let (id, data) = next_durable(ws).await;
        assert_eq!(data, want, "the next message, in order");
        ack(ws, &id).await;
    }
}

async fn ack(ws: &mut Ws, id: &str) {
    send_text(ws, &AgentMessage::Ack { id: id.into() }.encode()).await;
}

/// Messages in the pool's durable stream (pending across all agents).
async fn stored(nats: &Nats) -> u64 {
    let js = async_nats::jetstream::new(nats_client(nats).await);
    let mut stream = js
        .get_stream(Subjects::new(NS).durable_stream())
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

async fn eventually_stored(nats: &Nats, n: u64) {
    tether_test_support::eventually(
        &format!("the durable stream to hold {n} messages"),
        common::PATIENCE,
        || async { (stored(nats).await == n).then_some(()) },
    )
    .await;
}

/// `GET /v1/messages/{id}`'s `status`.
async fn status(pod: &Pod, id: &str) -> String {
    let response = pod.get(&format!("/v1/messages/{}", seg(id))).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["status"].as_str().unwrap().to_owned()
}

fn draining(pod: &Pod) -> usize {
    pod.gateway.state().router.durable_drains()
}

#[tokio::test]
async fn an_offline_agent_gets_its_backlog_in_order_on_connect_to_any_pod() {
    let nats = Nats::start().await;
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", with_durable(4)),
        Pod::start_with(&nats, "gw-1", with_durable(4))
    );
    // An idle connected agent costs no drain task.
    let _idle = p0.agent("idle", &[]).await;

    // Never 404 for an offline agent in durable mode: 202 once stored.
    let mut ids = Vec::new();
    for n in 0..10 {
        let body = push_durable(&p0.http, api_base(&p0), "off-1", json!({"n": n})).await;
        assert_eq!(body["delivery"], "durable");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    // The default mode stays direct: the same push without the flag is a 404.
    assert_eq!(
        p0.post("/v1/agents/off-1/messages", json!(1))
            .await
            .status(),
        404
    );
    assert_eq!(stored(&nats).await, 10);
    // What every pod reports as `pendingMessages` in the pool's status.
    assert_eq!(p1.gateway.state().router.durable_backlog().await, Some(10));
    assert_eq!(
        draining(&p0),
        0,
        "no drain task for agents with nothing pending"
    );

    // The agent lands on the other pod: everything, in order, once each acked.
    let mut agent = p1.agent("off-1", &[]).await;
    for (n, expected) in ids.iter().enumerate() {
        let (id, data) = next_durable(&mut agent).await;
        assert_eq!(&id, expected);
        assert_eq!(data, json!({"n": n}));
        ack(&mut agent, &id).await;
    }
    eventually_stored(&nats, 0).await;
    eventually(|| draining(&p1) == 0).await;
    assert_silent(&mut agent).await;

    // While it is connected, a durable push through another pod arrives at once.
    let body = push_durable(&p0.http, api_base(&p0), "off-1", json!("live")).await;
    let (id, data) = next_durable(&mut agent).await;
    assert_eq!(
        (json!(id.clone()), data),
        (body["id"].clone(), json!("live"))
    );
    ack(&mut agent, &id).await;
    eventually_stored(&nats, 0).await;
    eventually(|| draining(&p1) == 0).await;
}

#[tokio::test]
async fn unacknowledged_messages_follow_the_agent_to_another_pod_in_order() {
    let nats = Nats::start().await;
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", with_durable(3)),
        Pod::start_with(&nats, "gw-1", with_durable(3))
    );
    for n in 0..8 {
        push_durable(&p0.http, api_base(&p0), "mover", json!(n)).await;
    }
    // On gw-0: three in flight (the window); the agent acknowledges two, then the pod
    // drains it (the agent reconnects elsewhere).
    let mut agent = p0.agent("mover", &[]).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_durable(&mut agent).await);
    }
    assert_eq!(
        got.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
        [json!(0), json!(1), json!(2)]
    );
    ack(&mut agent, &got[0].0).await;
    ack(&mut agent, &got[1].0).await;
    // Two more arrive as the window moves; they stay unacknowledged too.
    let third = next_durable(&mut agent).await;
    let fourth = next_durable(&mut agent).await;
    assert_eq!((third.1, fourth.1), (json!(3), json!(4)));
    eventually_stored(&nats, 6).await;
    drop(agent);

    // On gw-1: from the first unacknowledged message, in order, nothing lost.
    let mut agent = p1.agent("mover", &[]).await;
    receive_and_ack(&mut agent, (2..8).map(|n| json!(n))).await;
    eventually_stored(&nats, 0).await;
    eventually(|| draining(&p0) == 0 && draining(&p1) == 0).await;
}

#[tokio::test]
async fn a_gateway_killed_mid_delivery_loses_nothing() {
    let nats = Nats::start().await;
    let durable = |c: &mut GatewayConfig| {
        c.delivery.durable = Some(DurableConfig {
            in_flight: 2,
            ..DurableConfig::default()
        });
        // The pool's default: pushes without `?delivery=` are durable too.
        c.delivery.mode = DeliveryMode::Durable;
    };
    let mut a = Process::start_with_config(&nats, "gw-a", durable);
    let http = reqwest::Client::new();
    for n in 0..5 {
        let response = post(&http, a.api("/v1/agents/crash/messages"), json!(n)).await;
        assert_eq!(response.status(), 202);
    }
    let mut agent = agent_at(&a.ws_url(), "crash", &[]).await;
    let (first, data) = next_durable(&mut agent).await;
    assert_eq!(data, json!(0));
    ack(&mut agent, &first).await;
    let (_second, data) = next_durable(&mut agent).await;
    assert_eq!(data, json!(1));
    eventually_stored(&nats, 4).await;
    // SIGKILL with message 1 written and unacknowledged.
    a.kill();

    let b = Process::start_with_config(&nats, "gw-b", durable);
    let mut agent = agent_at(&b.ws_url(), "crash", &[]).await;
    receive_and_ack(&mut agent, (1..5).map(|n| json!(n))).await;
    eventually_stored(&nats, 0).await;
}

#[tokio::test]
async fn a_nats_restart_mid_delivery_loses_nothing() {
    let mut nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", with_durable(2)).await;
    for n in 0..4 {
        push_durable(&pod.http, api_base(&pod), "steady", json!(n)).await;
    }
    let mut agent = pod.agent("steady", &[]).await;
    let (id0, _) = next_durable(&mut agent).await;
    ack(&mut agent, &id0).await;
    let (id1, data) = next_durable(&mut agent).await;
    assert_eq!(data, json!(1));
    eventually_stored(&nats, 3).await;

    // NATS dies with message 1 in flight; the agent's ack of it arrives meanwhile.
    nats.kill();
    ack(&mut agent, &id1).await;
    nats.restart(false).await;
    eventually(|| pod.bus_connected()).await;

    // A push after the restart (retried while the client reconnects) queues behind
    // the backlog; everything arrives in order, nothing twice.
    // The same Idempotency-Key on every attempt: an attempt that timed out after
    // being stored is not stored twice.
    let url = pod.api("/v1/agents/steady/messages?delivery=durable");
    tether_test_support::eventually("a push once NATS is back", common::PATIENCE, || async {
        let response = pod
            .http
            .post(url.clone())
            .bearer_auth(API_KEY)
            .header("idempotency-key", "after-restart")
            .json(&json!(4))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            202 => Some(()),
            503 => None,
            other => panic!("only 'unavailable' while NATS comes back, got {other}"),
        }
    })
    .await;
    receive_and_ack(&mut agent, (2..5).map(|n| json!(n))).await;
    eventually_stored(&nats, 0).await;
    eventually(|| draining(&pod) == 0).await;
}

#[tokio::test]
async fn a_full_agent_queue_refuses_with_429_and_a_retry_is_stored_once() {
    let nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", |c| {
        c.delivery.durable = Some(DurableConfig {
            max_messages_per_agent: 3,
            ..DurableConfig::default()
        });
    })
    .await;
    let url = pod.api("/v1/agents/full/messages?delivery=durable");
    let send = |key: &'static str| {
        pod.http
            .post(url.clone())
            .bearer_auth(API_KEY)
            .header("idempotency-key", key)
            .json(&json!(key))
            .send()
    };
    for key in ["k1", "k2", "k3"] {
        assert_eq!(send(key).await.unwrap().status(), 202);
    }
    // A retry with the same Idempotency-Key is stored once (JetStream de-duplicates).
    let retry: Value = send("k2").await.unwrap().json().await.unwrap();
    assert_eq!(retry["duplicate"], true);
    let full = send("k4").await.unwrap();
    assert_eq!(full.status(), 429);
    assert_eq!(stored(&nats).await, 3);
    // Other agents are not affected by one agent's limit.
    push_durable(&pod.http, api_base(&pod), "other", json!(1)).await;

    // Draining the queue makes room again.
    let mut agent = pod.agent("full", &[]).await;
    for key in ["k1", "k2", "k3"] {
        let (id, _) = next_durable(&mut agent).await;
        assert_eq!(id, key);
        ack(&mut agent, &id).await;
    }
    eventually_stored(&nats, 1).await;
    assert_eq!(send("k4").await.unwrap().status(), 202);
}

#[tokio::test]
async fn durable_pushes_are_refused_clearly_where_they_cannot_work() {
    let nats = Nats::start().await;
    let plain = Pod::start(&nats, "gw-0").await;
    let response = plain
        .post("/v1/agents/a/messages?delivery=durable", json!(1))
        .await;
    assert_eq!(response.status(), 400, "no durable queue configured");

    let pod = Pod::start_with(&nats, "gw-1", with_durable(4)).await;
    let response = pod
        .post("/v1/agents/a/messages?delivery=durable&ack=true", json!(1))
        .await;
    assert_eq!(
        response.status(),
        400,
        "ack=true and durable do not combine"
    );
    let binary = pod
        .http
        .post(pod.api("/v1/agents/a/messages?delivery=durable"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/octet-stream")
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(
        binary.status(),
        400,
        "binary frames carry no id to acknowledge"
    );
    assert_eq!(stored(&nats).await, 0);
}

/// An upstream that records the events it receives.
async fn recording_upstream() -> (Arc<Mutex<Vec<Value>>>, String) {
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = events.clone();
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |body: axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().push(body.0);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (events, url)
}

#[tokio::test]
async fn a_message_older_than_max_age_expires_with_an_upstream_event() {
    let nats = Nats::start().await;
    let (events, url) = recording_upstream().await;
    let pod = Pod::start_with(&nats, "gw-0", |c| {
        c.delivery.durable = Some(DurableConfig {
            max_age_seconds: 1,
            ..DurableConfig::default()
        });
        c.upstream = Some(tether_config::UpstreamConfig {
            url,
            secret_file: None,
            timeout_ms: 2_000,
            events: vec![],
            max_concurrency: 4,
            queue_timeout_ms: 1_000,
        });
    })
    .await;
    let id = push_durable(&pod.http, api_base(&pod), "late", json!("stale")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(stored(&nats).await, 1);
    assert_eq!(status(&pod, &id).await, "pending");
    // The sweep removes it (NATS's own age limit is an hour later) and tells the
    // upstream first.
    eventually_stored(&nats, 0).await;
    assert_eq!(status(&pod, &id).await, "expired");
    let got = events.lock().clone();
    assert_eq!(
        got,
        vec![json!({"type": "expired", "agent_id": "late", "id": id})]
    );
    // The agent connects afterwards: nothing arrives.
    let mut agent = pod.agent("late", &[]).await;
    assert_silent(&mut agent).await;
    assert_eq!(draining(&pod), 0);
}

#[tokio::test]
async fn a_durable_message_reports_pending_delivered_and_acknowledged() {
    let nats = Nats::start().await;
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", with_durable(4)),
        Pod::start_with(&nats, "gw-1", with_durable(4))
    );
    for key in ["s1", "s2"] {
        let response = p0
            .http
            .post(p0.api("/v1/agents/watched/messages?delivery=durable"))
            .bearer_auth(API_KEY)
            .header("idempotency-key", key)
            .json(&json!(key))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    // Any pod answers, for any message of the pool.
    assert_eq!(status(&p1, "s1").await, "pending");
    let body: Value = p1.get("/v1/messages/s2").await.json().await.unwrap();
    assert_eq!(body["agent_id"], "watched");
    assert_eq!(p0.get("/v1/messages/nope").await.status(), 404);

    let mut agent = p1.agent("watched", &[]).await;
    let (first, _) = next_durable(&mut agent).await;
    let (second, _) = next_durable(&mut agent).await;
    ack(&mut agent, &first).await;
    eventually_stored(&nats, 1).await;
    assert_eq!(status(&p0, &first).await, "acknowledged");
    // The delivery record is sent without waiting: poll for it.
    tether_test_support::eventually("the delivery record", common::PATIENCE, || async {
        (status(&p0, &second).await == "delivered").then_some(())
    })
    .await;
    ack(&mut agent, &second).await;
    eventually_stored(&nats, 0).await;
    assert_eq!(status(&p0, &second).await, "acknowledged");
}

#[tokio::test]
async fn an_agent_that_connects_while_nats_is_away_gets_its_backlog_when_it_is_back() {
    let mut nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", with_durable(4)).await;
    for n in 0..3 {
        push_durable(&pod.http, api_base(&pod), "blip", json!(n)).await;
    }
    nats.kill();
    eventually(|| !pod.bus_connected()).await;
    // The gateway still accepts the agent (local routing keeps working), but cannot
    // look at its backlog yet.
    let mut agent = pod.agent("blip", &[]).await;
    nats.restart(false).await;
    // Re-registration after the reconnect looks at the backlog of connections made
    // during the outage.
    receive_and_ack(&mut agent, (0..3).map(|n| json!(n))).await;
    eventually_stored(&nats, 0).await;
    eventually(|| draining(&pod) == 0).await;
}

/// Acks the gateway waits for are not charged to `limits.messagesPerSecond`: a backlog
/// drains as fast as the agent acknowledges it (bounded by the in-flight window), while
/// anything else the agent sends is still limited.
#[tokio::test]
async fn a_backlog_drains_faster_than_the_message_rate_limit() {
    let nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", |c: &mut GatewayConfig| {
        with_durable(4)(c);
        c.limits.messages_per_second = 2;
        c.limits.message_burst = 2;
        c.limits.max_rate_violations = 1;
    })
    .await;
    for n in 0..30 {
        push_durable(&pod.http, api_base(&pod), "fast", json!({"n": n})).await;
    }
    let mut agent = pod.agent("fast", &[]).await;
    receive_and_ack(&mut agent, (0..30).map(|n| json!({"n": n}))).await;
    eventually_stored(&nats, 0).await;
    assert_silent(&mut agent).await;
    // Other messages still pay: a burst of sends past the limit is refused.
    for n in 0..3 {
        send_text(
            &mut agent,
            &AgentMessage::Ack {
                id: format!("unknown-{n}"),
            }
            .encode(),
        )
        .await;
    }
    match common::next_message(&mut agent).await {
        GatewayMessage::Error { error, .. } => {
            assert_eq!(error.code, tether_protocol::ErrorCode::RateLimited)
        }
        other => panic!("expected a rate-limit error, got {other:?}"),
    }
}

/// POSTs a durable push with an Idempotency-Key; returns the response.
async fn push_keyed(pod: &Pod, agent: &str, key: &str, data: Value) -> reqwest::Response {
    pod.http
        .post(pod.api(&format!("/v1/agents/{agent}/messages?delivery=durable")))
        .bearer_auth(API_KEY)
        .header("idempotency-key", key)
        .json(&data)
        .send()
        .await
        .unwrap()
}

/// Issue 21: idempotency is per (agent, key). One key used for two agents stores and
/// delivers two messages (JetStream de-duplicated per stream before); their status
/// records stay apart; the direct path's pending answers are per connection too.
#[tokio::test]
async fn one_idempotency_key_for_two_agents_delivers_to_both() {
    let nats = Nats::start().await;
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", with_durable(4)),
        Pod::start_with(&nats, "gw-1", with_durable(4))
    );
    let mut a = p1.agent("agent-a", &[]).await;
    let mut b = p1.agent("agent-b", &[]).await;
    for (agent, data) in [("agent-a", json!("for a")), ("agent-b", json!("for b"))] {
        let response = push_keyed(&p0, agent, "same-key-1", data).await;
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["duplicate"], false, "{agent}: stored, not a duplicate");
    }
    assert_eq!(
        next_durable(&mut a).await,
        ("same-key-1".into(), json!("for a"))
    );
    assert_eq!(
        next_durable(&mut b).await,
        ("same-key-1".into(), json!("for b"))
    );
    assert_eq!(stored(&nats).await, 2);
    // Each agent's record is its own.
    for agent in ["agent-a", "agent-b"] {
        let body: Value = p0
            .get(&format!("/v1/agents/{agent}/messages/same-key-1"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["agent_id"], agent);
    }
    // The id alone names two messages: a clear 409, not one of them at random.
    let response = p0.get("/v1/messages/same-key-1").await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/agents/{agent}/messages/{id}"),
        "{body}"
    );
    ack(&mut a, "same-key-1").await;
    ack(&mut b, "same-key-1").await;
    eventually_stored(&nats, 0).await;

    // Direct pushes waiting for acks with one key, to two agents at once: both wait,
    // both are answered.
    let send = |agent: &'static str| {
        let http = p0.http.clone();
        let url = p0.api(&format!(
            "/v1/agents/{agent}/messages?ack=true&timeout_ms=10000"
        ));
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(API_KEY)
                .header("idempotency-key", "same-key-2")
                .json(&json!(agent))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let (to_a, to_b) = (send("agent-a"), send("agent-b"));
    for ws in [&mut a, &mut b] {
        match common::next_message(ws).await {
            GatewayMessage::Push { id, ack: true, .. } => {
                assert_eq!(id, "same-key-2");
                ack(ws, &id).await;
            }
            other => panic!("expected an acked push, got {other:?}"),
        }
    }
    assert_eq!(to_a.await.unwrap(), 200);
    assert_eq!(to_b.await.unwrap(), 200);
}

/// Issue 21: a key reused for the same agent with another body is a conflict (409),
/// whether the first message is still stored or already acknowledged; the same body
/// again is a duplicate (stored once).
#[tokio::test]
async fn a_key_reused_with_another_body_is_a_conflict() {
    let nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", with_durable(4)).await;
    assert_eq!(
        push_keyed(&pod, "k-agent", "order-7", json!({"qty": 1}))
            .await
            .status(),
        202
    );
    let retry: Value = push_keyed(&pod, "k-agent", "order-7", json!({"qty": 1}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(retry["duplicate"], true);
    let conflict = push_keyed(&pod, "k-agent", "order-7", json!({"qty": 2})).await;
    assert_eq!(conflict.status(), 409);
    let body: Value = conflict.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("different body"),
        "{body}"
    );
    assert_eq!(stored(&nats).await, 1, "nothing stored for the conflict");

    // Delivered and acknowledged (purged from the stream): the record still knows.
    let mut agent = pod.agent("k-agent", &[]).await;
    receive_and_ack(&mut agent, [json!({"qty": 1})]).await;
    eventually_stored(&nats, 0).await;
    assert_eq!(
        push_keyed(&pod, "k-agent", "order-7", json!({"qty": 3}))
            .await
            .status(),
        409
    );
    let same: Value = push_keyed(&pod, "k-agent", "order-7", json!({"qty": 1}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(same["duplicate"], true);
    assert_silent(&mut agent).await;
}

/// Issue 21: a kick is answered; "not here" makes the sender re-resolve. Backend pinned
/// to gw-0, agent moves from gw-1 to gw-2 and stays connected: a durable push through
/// gw-0 (whose cache still names gw-1) reaches it.
#[tokio::test]
async fn a_durable_push_reaches_an_agent_that_moved_to_another_pod() {
    let nats = Nats::start().await;
    let (p0, p1, p2) = tokio::join!(
        Pod::start_with(&nats, "gw-0", with_durable(4)),
        Pod::start_with(&nats, "gw-1", with_durable(4)),
        Pod::start_with(&nats, "gw-2", with_durable(4))
    );
    let mut first = p1.agent("mover-2", &[]).await;
    push_durable(&p0.http, api_base(&p0), "mover-2", json!(1)).await;
    receive_and_ack(&mut first, [json!(1)]).await;
    eventually_stored(&nats, 0).await;
    // A direct push through gw-0 fills its cache with gw-1 for sure.
    assert_eq!(
        p0.post("/v1/agents/mover-2/messages", json!("direct"))
            .await
            .status(),
        202
    );
    assert_eq!(next_push(&mut first).await.1, json!("direct"));

    // The agent moves: its new connection on gw-2 replaces the one on gw-1.
    // The push comes while gw-1 may still hold the replaced connection, closing: a
    // closing connection is "not here" too.
    let mut moved = p2.agent("mover-2", &[]).await;
    assert_eq!(common::close_code(&mut first).await, 4003, "replaced");
    push_durable(&p0.http, api_base(&p0), "mover-2", json!(2)).await;
    receive_and_ack(&mut moved, [json!(2)]).await;
    eventually_stored(&nats, 0).await;
}

/// Issue 21: only acks of durable messages written to the connection and not yet
/// acknowledged are free; acks of ids never sent pay the message rate even while a
/// drain runs.
#[tokio::test]
async fn acks_of_ids_never_sent_pay_the_message_rate_during_a_drain() {
    let nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", |c: &mut GatewayConfig| {
        with_durable(4)(c);
        c.limits.messages_per_second = 1;
        c.limits.message_burst = 2;
        c.limits.max_rate_violations = 100;
    })
    .await;
    for n in 0..5 {
        push_durable(&pod.http, api_base(&pod), "acker", json!(n)).await;
    }
    let mut agent = pod.agent("acker", &[]).await;
    let mut ids = Vec::new();
    for n in 0..4 {
        let (id, data) = next_durable(&mut agent).await;
        assert_eq!(data, json!(n));
        ids.push(id);
    }
    assert_eq!(draining(&pod), 1, "a drain runs: four messages in flight");
    // The real acks are free: more than the burst, no complaint, and the window moves.
    for id in &ids[..3] {
        ack(&mut agent, id).await;
    }
    assert_eq!(next_durable(&mut agent).await.1, json!(4));
    // Acks for ids never sent: the first two take the burst, the third is refused.
    for n in 0..3 {
        send_text(
            &mut agent,
            &AgentMessage::Ack {
                id: format!("never-sent-{n}"),
            }
            .encode(),
        )
        .await;
    }
    match common::next_message(&mut agent).await {
        GatewayMessage::Error { error, .. } => {
            assert_eq!(error.code, tether_protocol::ErrorCode::RateLimited)
        }
        other => panic!("expected a rate-limit error, got {other:?}"),
    }
}

/// Issue 21: a drain task waiting for room in a full outbound queue ends when the
/// socket dies (it used to retry forever, keeping the connection and its frames).
#[tokio::test]
async fn a_drain_task_waiting_on_a_full_queue_ends_when_the_socket_dies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", |c: &mut GatewayConfig| {
        with_durable(4)(c);
        c.limits.outbound_queue = 8;
    })
    .await;
    // An agent that never reads, with a tiny receive window.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut stream = socket.connect(pod.gateway.public_addr()).await.unwrap();
    let token = common::token("zero-window", &[], 3600);
    stream
        .write_all(
            format!(
                "GET /v1/connect HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.v1\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    let state = pod.gateway.state().clone();
    eventually(|| state.hub.get("zero-window").is_some()).await;

    // Direct pushes until its queue is full.
    let payload = json!("x".repeat(32 * 1024));
    let mut full = false;
    for _ in 0..2000 {
        match pod
            .post("/v1/agents/zero-window/messages", payload.clone())
            .await
            .status()
            .as_u16()
        {
            202 => continue,
            429 => {
                full = true;
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(full, "the queue filled");
    // A durable push: its drain task finds the queue full and waits for room.
    push_durable(&pod.http, api_base(&pod), "zero-window", json!("backlog")).await;
    eventually(|| draining(&pod) == 1).await;

    // The socket dies (reset: unread data in its receive buffer).
    drop(stream);
    eventually(|| state.hub.get("zero-window").is_none()).await;
    eventually(|| draining(&pod) == 0).await;
    // The message was never written: it waits for the next connection.
    assert_eq!(stored(&nats).await, 1);
}

/// An upstream that refuses (503) until `accepting` is set, recording what it took.
async fn gated_upstream(
    accepting: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<Vec<Value>>>, String) {
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = events.clone();
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |body: axum::Json<Value>| {
            let sink = sink.clone();
            let accepting = accepting.clone();
            async move {
                if !accepting.load(std::sync::atomic::Ordering::Acquire) {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                sink.lock().push(body.0);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (events, url)
}

/// Issue 21: an expired message the drain task skips is removed only by the sweep,
/// with exactly one `expired` event — the acknowledgement of a later message no longer
/// purges it silently.
#[tokio::test]
async fn an_expired_message_skipped_by_a_drain_gets_exactly_one_event() {
    let nats = Nats::start().await;
    let accepting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (events, url) = gated_upstream(accepting.clone()).await;
    let pod = Pod::start_with(&nats, "gw-0", |c| {
        c.delivery.durable = Some(DurableConfig {
            max_age_seconds: 2,
            ..DurableConfig::default()
        });
        c.upstream = Some(tether_config::UpstreamConfig {
            url,
            secret_file: None,
            timeout_ms: 2_000,
            events: vec![],
            max_concurrency: 4,
            queue_timeout_ms: 1_000,
        });
    })
    .await;
    let old = push_durable(&pod.http, api_base(&pod), "skipper", json!("old")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Let it expire; the upstream refuses the event meanwhile, so the sweep keeps it.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    push_durable(&pod.http, api_base(&pod), "skipper", json!("fresh")).await;
    let mut agent = pod.agent("skipper", &[]).await;
    // The drain skips the expired one and delivers the fresh one; its ack does not
    // take the expired one with it.
    receive_and_ack(&mut agent, [json!("fresh")]).await;
    eventually_stored(&nats, 1).await;
    assert!(events.lock().is_empty());

    accepting.store(true, std::sync::atomic::Ordering::Release);
    eventually_stored(&nats, 0).await;
    assert_eq!(
        events.lock().clone(),
        vec![json!({"type": "expired", "agent_id": "skipper", "id": old})]
    );
    assert_eq!(status(&pod, &old).await, "expired");
    assert_silent(&mut agent).await;
    eventually(|| draining(&pod) == 0).await;
}

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
    let js = async_nats::jetstream::new(nats.client().await);
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
    eventually(|| pod.ready()).await;

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
    eventually(|| !pod.ready()).await;
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

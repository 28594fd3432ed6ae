//! Cross-pod routing on a real `nats-server` (JetStream on): push, request, groups,
//! broadcast, presence and disconnect across three gateway pods; newest-wins across
//! pods and its races; NATS killed and restarted mid-run; subject-injection attempts;
//! dead pods; the binary wired from its config file.

mod boot;
#[path = "../gateway/common.rs"]
mod common;
mod durable;
mod durable_refusals;
mod harness;
mod measure;
mod pool_cap;
mod revocation;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tether_protocol::{AgentMessage, CloseCode, GatewayMessage, RawValue};

use common::{API_KEY, eventually, expect_close, send_text};
use harness::*;

async fn three_pods(nats: &Nats) -> [Pod; 3] {
    let (a, b, c) = tokio::join!(
        Pod::start(nats, "gw-0"),
        Pod::start(nats, "gw-1"),
        Pod::start(nats, "gw-2")
    );
    [a, b, c]
}

#[tokio::test]
async fn push_request_presence_and_disconnect_reach_an_agent_on_another_pod() {
    let nats = Nats::start().await;
    let [p0, p1, p2] = three_pods(&nats).await;
    let mut agent = p1.agent("agent-1", &[]).await;

    // Push through another pod: 202 only once queued on gw-1.
    let response = p0
        .post("/v1/agents/agent-1/messages", json!({"cmd": "scan"}))
        .await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"].clone();
    let (got, data) = next_push(&mut agent).await;
    assert_eq!(json!(got), id);
    assert_eq!(data, json!({"cmd": "scan"}));

    // The second push hits the cache: same result.
    let response = p2.post("/v1/agents/agent-1/messages", json!(2)).await;
    assert_eq!(response.status(), 202);
    assert_eq!(next_push(&mut agent).await.1, json!(2));

    // Request through another pod: the agent's answer comes back.
    let http = p2.http.clone();
    let url = p2.api("/v1/agents/agent-1/requests?timeout_ms=5000");
    let call = tokio::spawn(async move { post(&http, url, json!({"q": "uptime"})).await });
    let GatewayMessage::Request { id, data, .. } = common::next_message(&mut agent).await else {
        panic!("expected a request");
    };
    assert_eq!(data.get(), r#"{"q":"uptime"}"#);
    let answer = AgentMessage::Response {
        id,
        result: Ok(RawValue::from_string(r#"{"up":42}"#.into()).unwrap()),
    };
    send_text(&mut agent, &answer.encode()).await;
    let response = call.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"up": 42}));

    // No answer: 504 from the remote pod's wait.
    let response = p0
        .post("/v1/agents/agent-1/requests?timeout_ms=300", json!({}))
        .await;
    assert_eq!(response.status(), 504);
    let _ = common::next_message(&mut agent).await; // the unanswered request

    // Acked push through another pod.
    let http = p0.http.clone();
    let url = p0.api("/v1/agents/agent-1/messages?ack=true&timeout_ms=5000");
    let call = tokio::spawn(async move { post(&http, url, json!("ack me")).await });
    let GatewayMessage::Push { id, ack: true, .. } = common::next_message(&mut agent).await else {
        panic!("expected an acked push");
    };
    send_text(&mut agent, &AgentMessage::Ack { id }.encode()).await;
    assert_eq!(call.await.unwrap().status(), 200);

    // Presence and listing from any pod.
    let presence: Value = p0.get("/v1/agents/agent-1").await.json().await.unwrap();
    assert_eq!(presence["pod"], "gw-1");
    let _other = p2.agent("agent-0", &[]).await;
    let page: Value = p0.get("/v1/agents?limit=1").await.json().await.unwrap();
    assert_eq!(page["agents"][0]["agent_id"], "agent-0");
    assert_eq!(page["next_cursor"], "agent-0");
    let page: Value = p0
        .get("/v1/agents?limit=1&cursor=agent-0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["agents"][0]["agent_id"], "agent-1");
    assert_eq!(page["agents"][0]["pod"], "gw-1");

    // Unknown agents: 404 from every pod, for every operation.
    for pod in [&p0, &p1, &p2] {
        assert_eq!(
            pod.post("/v1/agents/nobody/messages", json!(1))
                .await
                .status(),
            404
        );
        assert_eq!(pod.get("/v1/agents/nobody").await.status(), 404);
    }

    // Disconnect through another pod closes the agent with its code, and the
    // directory forgets it.
    let response = p0
        .http
        .delete(p0.api("/v1/agents/agent-1"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    expect_close(&mut agent, CloseCode::Disconnected).await;
    let probe = nats_client(&nats).await;
    for _ in 0..500 {
        if directory_entry(&probe, "acme", "agent-1").await.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(directory_entry(&probe, "acme", "agent-1").await.is_none());
    assert_eq!(
        p2.post("/v1/agents/agent-1/messages", json!(1))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn groups_and_broadcasts_are_fanned_out_by_every_pod() {
    let nats = Nats::start().await;
    let pods = three_pods(&nats).await;
    let mut members = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        members.push(pod.agent(&format!("red-{i}"), &["red"]).await);
    }
    let mut blue = pods[2].agent("blue-0", &["blue"]).await;

    let response = pods[0]
        .post("/v1/groups/red/messages", json!("to red"))
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["delivered"], 3);
    for ws in &mut members {
        assert_eq!(next_push(ws).await.1, json!("to red"));
    }

    let response = pods[1].post("/v1/broadcast", json!("to all")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.json::<Value>().await.unwrap()["delivered"], 4);
    for ws in &mut members {
        assert_eq!(next_push(ws).await.1, json!("to all"));
    }
    assert_eq!(next_push(&mut blue).await.1, json!("to all"));
    // Blue never saw the red message.
    assert_silent(&mut blue).await;

    let response = pods[1].post("/v1/groups/nobody/messages", json!(1)).await;
    assert_eq!(response.json::<Value>().await.unwrap()["delivered"], 0);
}

#[tokio::test]
async fn newest_connection_wins_across_pods() {
    let nats = Nats::start().await;
    let [p0, p1, p2] = three_pods(&nats).await;
    let mut old = p0.agent("agent-1", &[]).await;
    let mut new = p1.agent("agent-1", &[]).await;
    expect_close(&mut old, CloseCode::Replaced).await;
    eventually(|| p0.connections() == 0).await;
    assert_eq!(
        p2.post("/v1/agents/agent-1/messages", json!("hi"))
            .await
            .status(),
        202
    );
    assert_eq!(next_push(&mut new).await.1, json!("hi"));
    // The replaced connection's disconnect must not remove its successor's entry.
    let probe = nats_client(&nats).await;
    let entry = directory_entry(&probe, "acme", "agent-1").await.unwrap();
    assert_eq!(entry["pod"], "gw-1");
}

#[tokio::test]
async fn simultaneous_connects_on_three_pods_end_with_exactly_one() {
    let nats = Nats::start().await;
    let pods = three_pods(&nats).await;
    for round in 0..5 {
        let agent = format!("racer-{round}");
        let (a, b, c) = tokio::join!(
            pods[0].agent(&agent, &[]),
            pods[1].agent(&agent, &[]),
            pods[2].agent(&agent, &[])
        );
        let mut sockets = [a, b, c];
        eventually(|| {
            pods.iter()
                .filter(|p| p.gateway.state().hub.get(&agent).is_some())
                .count()
                == 1
        })
        .await;
        let survivor = pods
            .iter()
            .position(|p| p.gateway.state().hub.get(&agent).is_some())
            .unwrap();
        // The losers were closed as replaced; the survivor gets pushes from any pod.
        for (i, ws) in sockets.iter_mut().enumerate() {
            if i != survivor {
                expect_close(ws, CloseCode::Replaced).await;
            }
        }
        let path = format!("/v1/agents/{agent}/messages");
        for pod in &pods {
            assert_eq!(pod.post(&path, json!(round)).await.status(), 202);
            assert_eq!(next_push(&mut sockets[survivor]).await.1, json!(round));
        }
        let probe = nats_client(&nats).await;
        let entry = directory_entry(&probe, "acme", &agent).await.unwrap();
        assert_eq!(entry["pod"], pods[survivor].name);
    }
}

#[tokio::test]
async fn hostile_agent_ids_and_group_names_cannot_widen_a_subject() {
    let nats = Nats::start().await;
    let [p0, p1, _p2] = three_pods(&nats).await;
    let hostile = ["*", ">", "a.>", "a.*.c", "x y", "gw-1.push", "_2A"];
    let mut victims = Vec::new();
    for name in ["a", "a.b.c", "victim", "a.x.c"] {
        victims.push(p1.agent(name, &["victims"]).await);
    }
    let mut attackers = Vec::new();
    for name in hostile {
        attackers.push(p1.agent(name, &[name]).await);
    }
    for (name, ws) in hostile.iter().zip(&mut attackers) {
        let response = p0
            .post(&format!("/v1/agents/{}/messages", seg(name)), json!(name))
            .await;
        assert_eq!(response.status(), 202, "{name:?}");
        assert_eq!(next_push(ws).await.1, json!(name));
        let response = p0
            .post(
                &format!("/v1/groups/{}/messages", seg(name)),
                json!(["group", name]),
            )
            .await;
        assert_eq!(
            response.json::<Value>().await.unwrap()["delivered"],
            1,
            "{name:?}"
        );
        assert_eq!(next_push(ws).await.1, json!(["group", name]));
    }
    // Wildcard-looking ids that are not connected are just unknown agents.
    for name in ["**", ">.>", "a.>.x"] {
        let response = p0
            .post(&format!("/v1/agents/{}/messages", seg(name)), json!(1))
            .await;
        assert_eq!(response.status(), 404, "{name:?}");
    }
    for ws in &mut victims {
        assert_silent(ws).await;
    }
    for ws in &mut attackers {
        assert_silent(ws).await;
    }
    // On the wire, every subject the pods used is a literal one.
    let spy = nats_client(&nats).await;
    let mut all = spy.subscribe("tether.>").await.unwrap();
    // `flush` only writes the SUB out; a probe through the server proves the
    // subscription is active before the pods publish (without it, a loaded machine
    // sometimes let the first push go by unseen).
    spy.publish("tether.probe", "probe".into()).await.unwrap();
    let probe = tokio::time::timeout(common::PATIENCE, all.next())
        .await
        .expect("the spy's own probe comes back")
        .unwrap();
    assert_eq!(probe.subject.as_str(), "tether.probe");
    let pushed = p0
        .post(&format!("/v1/agents/{}/messages", seg("a.>")), json!(1))
        .await;
    assert_eq!(pushed.status(), 202);
    let sent = p0
        .post(&format!("/v1/groups/{}/messages", seg("*")), json!(1))
        .await;
    assert_eq!(sent.status(), 202);
    let mut seen = HashSet::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), all.next()).await
    {
        seen.insert(message.subject.to_string());
    }
    assert!(seen.contains("tether.acme.pod.gw-1.push"), "{seen:?}");
    assert!(seen.contains("tether.acme.group._2A"), "{seen:?}");
    for subject in &seen {
        assert!(
            subject
                .split('.')
                .all(|l| l != "*" && l != ">" && !l.contains(' ')),
            "{subject}"
        );
    }
}

#[tokio::test]
async fn trace_context_travels_in_nats_headers() {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tether_gateway::router::Push;
    let nats = Nats::start().await;
    let [p0, p1, _p2] = three_pods(&nats).await;
    let mut agent = p1.agent("traced", &[]).await;
    let spy = nats_client(&nats).await;
    let mut pushes = spy.subscribe("tether.acme.pod.gw-1.push").await.unwrap();
    spy.flush().await.unwrap();

    let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let cx = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let router = p0.gateway.state().router.clone();
    let frame = tether_gateway::hub::Outbound::Text(
        tether_protocol::encode_push("t1", &RawValue::from_string("1".into()).unwrap(), false)
            .into(),
    );
    {
        let _guard = cx.attach();
        router
            .push(
                "traced",
                Push {
                    id: "t1".into(),
                    frame,
                    ack_timeout: None,
                },
            )
            .await
            .unwrap();
    }
    assert_eq!(next_push(&mut agent).await.0, "t1");
    let message = tokio::time::timeout(common::PATIENCE, pushes.next())
        .await
        .unwrap()
        .unwrap();
    let traceparent = message
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .expect("traceparent header")
        .to_string();
    assert_eq!(
        traceparent,
        format!("00-{trace_id}-00f067aa0ba902b7-01"),
        "the push keeps its trace across pods"
    );
}

/// Sends numbered pushes from one pod to an agent on another until stopped; returns
/// the ids that got 202 and the statuses seen.
async fn push_loop(
    http: reqwest::Client,
    url: String,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<u64>, HashSet<u16>) {
    let mut accepted = Vec::new();
    let mut statuses = HashSet::new();
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let response = http
            .post(&url)
            .bearer_auth(API_KEY)
            .json(&json!(n))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(response) = response {
            let status = response.status().as_u16();
            statuses.insert(status);
            if status == 202 {
                accepted.push(n);
            } else {
                assert!(
                    status == 503,
                    "only 202 or 503 while NATS flaps, got {status}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (accepted, statuses)
}

#[tokio::test]
async fn nats_restart_keeps_connections_loses_nothing_accepted_and_recovers() {
    let mut nats = Nats::start().await;
    let (p0, p1) = tokio::join!(Pod::start(&nats, "gw-0"), Pod::start(&nats, "gw-1"));
    let mut agent = p1.agent("agent-1", &["g"]).await;
    let mut local = p0.agent("local-1", &[]).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = tokio::spawn(push_loop(
        p0.http.clone(),
        p0.api("/v1/agents/agent-1/messages"),
        stop.clone(),
    ));
    let mut received = Vec::new();
    read_some(&mut agent, &mut received, 5).await;

    for wipe in [false, true] {
        nats.kill();
        eventually(|| !p0.bus_connected() && !p1.bus_connected()).await;
        // Readiness does not follow the bus: each pod keeps serving its own agents, and
        // the Service keeps every pod.
        assert_eq!(
            p0.get("/readyz").await.status(),
            200,
            "readiness does not depend on the bus"
        );
        let stats: Value = p0.get("/v1/stats").await.json().await.unwrap();
        assert_eq!(stats["bus_connected"], false, "{stats}");
        // Local connections stay and local delivery works; cross-pod answers 503.
        assert_eq!(p0.connections(), 1);
        assert_eq!(p1.connections(), 1);
        assert_eq!(
            p0.post("/v1/agents/local-1/messages", json!("local"))
                .await
                .status(),
            202
        );
        assert_eq!(next_push(&mut local).await.1, json!("local"));
        let refused = p0.post("/v1/agents/agent-1/messages", json!(0)).await;
        assert_eq!(refused.status(), 503);
        // A fixed message: no pod name, no raw NATS error (those are logged).
        let body: Value = refused.json().await.unwrap();
        assert_eq!(
            body["error"]["message"],
            tether_gateway::api::UNAVAILABLE,
            "{body}"
        );
        assert_eq!(p0.post("/v1/broadcast", json!(0)).await.status(), 503);

        nats.restart(wipe).await;
        eventually(|| p0.bus_connected() && p1.bus_connected()).await;
        // The directory comes back (re-registered if NATS lost it) and routing resumes.
        let probe = nats_client(&nats).await;
        for _ in 0..500 {
            if directory_entry(&probe, "acme", "agent-1").await.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            directory_entry(&probe, "acme", "agent-1").await.unwrap()["pod"],
            "gw-1",
            "wipe={wipe}"
        );
        let before = received.len();
        read_some(&mut agent, &mut received, 5).await;
        assert!(received.len() > before);
        let response = p0.post("/v1/groups/g/messages", json!("group")).await;
        assert_eq!(response.status(), 202);
        assert_eq!(response.json::<Value>().await.unwrap()["delivered"], 1);
        // The group message is in the stream of numbered pushes; take it out.
        loop {
            let (_, data) = next_push(&mut agent).await;
            match data.as_u64() {
                Some(n) => received.push(n),
                None => break,
            }
        }
    }

    stop.cancel();
    let (accepted, statuses) = sender.await.unwrap();
    assert!(
        statuses.contains(&503),
        "the sender saw the outage: {statuses:?}"
    );
    // Every push that got 202 arrives, once and in order. (A push that got 503 because
    // the bus died while its answer was in flight may have arrived too: the caller was
    // told of the failure and retries with its Idempotency-Key.)
    while !accepted.iter().all(|n| received.contains(n)) {
        let (_, data) = next_push(&mut agent).await;
        received.push(data.as_u64().unwrap());
    }
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates: {received:?}"
    );
}

async fn read_some(agent: &mut common::Ws, received: &mut Vec<u64>, n: usize) {
    for _ in 0..n {
        let (_, data) = next_push(agent).await;
        received.push(data.as_u64().unwrap());
    }
}

#[tokio::test]
async fn binary_routes_from_config_and_dead_pods_leave_no_wrong_routes() {
    let nats = Nats::start().await;
    let mut a = Process::start(&nats, "gw-a");
    let b = Process::start(&nats, "gw-b");
    let http = reqwest::Client::new();
    let mut agent = agent_at(&a.ws_url(), "agent-1", &[]).await;
    let response = post(&http, b.api("/v1/agents/agent-1/messages"), json!("via b")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(next_push(&mut agent).await.1, json!("via b"));
    let _other = agent_at(&a.ws_url(), "agent-2", &[]).await;

    // gw-a dies without cleaning up: its entries are found stale on use and removed.
    a.kill();
    let response = post(&http, b.api("/v1/agents/agent-1/messages"), json!("lost")).await;
    assert_eq!(response.status(), 404);
    let probe = nats_client(&nats).await;
    assert!(directory_entry(&probe, "acme", "agent-1").await.is_none());
    // agent-2's entry is still there until gw-a's next incarnation sweeps it.
    assert_eq!(
        directory_entry(&probe, "acme", "agent-2").await.unwrap()["pod"],
        "gw-a"
    );
    let _a2 = Process::start(&nats, "gw-a");
    for _ in 0..500 {
        if directory_entry(&probe, "acme", "agent-2").await.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        directory_entry(&probe, "acme", "agent-2").await.is_none(),
        "a restarted pod removes what its previous incarnation left"
    );
    let response = post(&http, b.api("/v1/broadcast"), json!("all")).await;
    assert_eq!(response.status(), 202);
}

/// A bus with authentication: pods with the pool's credentials route; a client without
/// them — a forged caller that reached NATS — is refused before it can publish a call,
/// and a pod with a wrong password does not start.
#[tokio::test]
async fn a_bus_with_credentials_refuses_clients_without_them() {
    let nats = Nats::start_with_args(&["--user", "tether", "--pass", "pool-s3cret"]).await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("nats-password");
    std::fs::write(&password, "pool-s3cret\n").unwrap();
    let with_credentials = |c: &mut tether_config::GatewayConfig| {
        let nats = c.routing.nats.as_mut().unwrap();
        nats.auth.user = Some("tether".into());
        nats.auth.password_file = Some(password.clone());
    };
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", with_credentials),
        Pod::start_with(&nats, "gw-1", with_credentials)
    );
    let mut agent = p1.agent("agent-1", &[]).await;
    push_reaches(&p0, "agent-1", &mut agent, json!("via the bus")).await;

    // No credentials: the server refuses the connection (authorization violation).
    let anonymous = async_nats::ConnectOptions::new()
        .max_reconnects(Some(1))
        .connect(nats.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous client is refused");
    let wrong = async_nats::ConnectOptions::with_user_and_password("tether".into(), "guess".into())
        .max_reconnects(Some(1))
        .connect(nats.url())
        .await;
    assert!(wrong.is_err(), "a wrong password is refused");

    // A pod with the wrong password does not start (it would route nothing).
    let bad = dir.path().join("bad-password");
    std::fs::write(&bad, "guess").unwrap();
    let config = harness::config(dir.path(), &nats, |c| {
        let nats = c.routing.nats.as_mut().unwrap();
        nats.auth.user = Some("tether".into());
        nats.auth.password_file = Some(bad.clone());
    });
    let started = tether_gateway::Gateway::start(config, "gw-bad".into()).await;
    assert!(
        started.is_err(),
        "a pod with wrong credentials does not start"
    );

    // The agent is untouched by all of this.
    let response = p0.post("/v1/agents/agent-1/messages", json!("still")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(next_push(&mut agent).await.1, json!("still"));
}

/// A token-protected bus: pods with the token route, anonymous clients are refused.
#[tokio::test]
async fn a_bus_with_a_token_refuses_clients_without_it() {
    let nats = Nats::start_with_args(&["--auth", "pool-token-0123"]).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("nats-token");
    std::fs::write(&token_file, "pool-token-0123\n").unwrap();
    let with_token = |c: &mut tether_config::GatewayConfig| {
        c.routing.nats.as_mut().unwrap().auth.token_file = Some(token_file.clone());
    };
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", with_token),
        Pod::start_with(&nats, "gw-1", with_token)
    );
    let mut agent = p1.agent("agent-t", &[]).await;
    let response = p0.post("/v1/agents/agent-t/messages", json!("t")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(next_push(&mut agent).await.1, json!("t"));
    let anonymous = async_nats::ConnectOptions::new()
        .max_reconnects(Some(1))
        .connect(nats.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous client is refused");
}

/// An Idempotency-Key waiting for an agent's answer on another pod is exclusive there
/// too: the second call gets 409 through the bus.
#[tokio::test]
async fn an_in_flight_idempotency_key_is_exclusive_across_pods() {
    let nats = Nats::start().await;
    let [p0, p1, p2] = three_pods(&nats).await;
    let mut agent = p1.agent("agent-k", &[]).await;
    let send = |pod: &Pod| {
        let http = pod.http.clone();
        let url = pod.api("/v1/agents/agent-k/messages?ack=true&timeout_ms=10000");
        async move {
            http.post(url)
                .bearer_auth(API_KEY)
                .header("idempotency-key", "k-1")
                .json(&json!("x"))
                .send()
                .await
                .unwrap()
        }
    };
    let first = tokio::spawn(send(&p0));
    let (id, _) = next_push(&mut agent).await;
    assert_eq!(id, "k-1");
    assert_eq!(send(&p2).await.status(), 409);
    send_text(&mut agent, &AgentMessage::Ack { id }.encode()).await;
    assert_eq!(first.await.unwrap().status(), 200);
}

/// The NATS permissions of one pool's user (docs/security.md prints the same list):
/// its own subjects, its own two KV buckets and their JetStream API calls, and replies
/// on its own inbox prefix.
fn pool_permissions(ns: &str) -> String {
    let buckets = [
        format!("KV_tether-{ns}-agents"),
        format!("KV_tether-{ns}-pods"),
        format!("KV_tether-{ns}-revoked"),
    ];
    let mut publish = vec![
        format!("\"tether.{ns}.>\""),
        format!("\"_INBOX.tether.{ns}.>\""),
        "\"$JS.API.INFO\"".to_string(),
    ];
    for stream in &buckets {
        let bucket = stream.trim_start_matches("KV_");
        for api in [
            format!("$JS.API.STREAM.INFO.{stream}"),
            format!("$JS.API.STREAM.CREATE.{stream}"),
            format!("$JS.API.STREAM.MSG.GET.{stream}"),
            format!("$JS.API.DIRECT.GET.{stream}"),
            format!("$JS.API.DIRECT.GET.{stream}.>"),
            format!("$JS.API.CONSUMER.CREATE.{stream}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
            format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
            format!("$JS.ACK.{stream}.>"),
            format!("$KV.{bucket}.>"),
        ] {
            publish.push(format!("\"{api}\""));
        }
    }
    format!(
        "permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"tether.{ns}.>\", \"_INBOX.tether.{ns}.>\"] }} }}",
        publish.join(", ")
    )
}

/// One user per pool, limited to its pool's subjects: a pool routes normally with its
/// user; another pool's user cannot reach it (no presence answer, no forged call).
#[tokio::test]
async fn a_pools_nats_user_reaches_only_its_own_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    let log = dir.path().join("nats.log");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [\n  {{ user: acme, password: acme-pass, {} }}\n  {{ user: globex, password: globex-pass, {} }}\n] }}\n",
            pool_permissions("acme"),
            pool_permissions("globex"),
        ),
    )
    .unwrap();
    let nats =
        Nats::start_with_args(&["-c", conf.to_str().unwrap(), "-l", log.to_str().unwrap()]).await;
    let password = dir.path().join("acme-password");
    std::fs::write(&password, "acme-pass").unwrap();
    let as_acme = |c: &mut tether_config::GatewayConfig| {
        let nats = c.routing.nats.as_mut().unwrap();
        nats.auth.user = Some("acme".into());
        nats.auth.password_file = Some(password.clone());
    };
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", as_acme),
        Pod::start_with(&nats, "gw-1", as_acme)
    );
    let mut agent = p1.agent("agent-p", &["ops"]).await;
    // Routing, groups, presence and listings work within the pool's permissions.
    let response = p0.post("/v1/agents/agent-p/messages", json!("mine")).await;
    assert_eq!(
        response.status(),
        202,
        "log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(next_push(&mut agent).await.1, json!("mine"));
    assert_eq!(p0.get("/v1/agents/agent-p").await.status(), 200);
    assert_eq!(p0.get("/v1/agents").await.status(), 200);
    let body: Value = p0
        .post("/v1/groups/ops/messages", json!("g"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["delivered"], 1);
    assert_eq!(next_push(&mut agent).await.1, json!("g"));
    let violations = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !violations.contains("Violation"),
        "the pool's own traffic stays within its permissions:\n{violations}"
    );

    // Another pool's user asks gw-1 where agent-p is: refused by the server.
    let globex =
        async_nats::ConnectOptions::with_user_and_password("globex".into(), "globex-pass".into())
            .custom_inbox_prefix("_INBOX.tether.globex")
            .connect(nats.url())
            .await
            .unwrap();
    let call = tether_gateway::nats::wire::Call::Presence {
        agent: "agent-p".into(),
    };
    let payload = tether_gateway::nats::wire::encode_call(&call, &[]).unwrap();
    let subject = tether_gateway::nats::subjects::Subjects::new("acme")
        .pod("gw-1", tether_gateway::nats::subjects::PodOp::Presence);
    let forged = tokio::time::timeout(
        Duration::from_secs(2),
        globex.request(subject.clone(), payload.clone()),
    )
    .await;
    assert!(
        !matches!(forged, Ok(Ok(_))),
        "another pool's user got an answer"
    );
    // The same call with the pool's own user is answered.
    let acme =
        async_nats::ConnectOptions::with_user_and_password("acme".into(), "acme-pass".into())
            .custom_inbox_prefix("_INBOX.tether.acme")
            .connect(nats.url())
            .await
            .unwrap();
    let answered =
        tokio::time::timeout(Duration::from_secs(5), acme.request(subject, payload)).await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "the pool's own user is answered"
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("Violation - User \"globex\""),
        "the server logged the refusal:\n{log_text}"
    );
}

/// Issue 21: two pools with the same tenant on one bus, namespaced by their identity
/// (`<namespace>/<pool>`, as the operator renders it), share nothing: no directory
/// entry, no pod registry, no subject, no durable stream.
#[tokio::test]
async fn neighbouring_pools_with_one_tenant_do_not_see_each_other() {
    let nats = Nats::start().await;
    let in_pool = |ns: &'static str| {
        move |c: &mut tether_config::GatewayConfig| {
            c.tenant = Some("acme".into());
            c.routing.nats.as_mut().unwrap().namespace = Some(ns.into());
            c.delivery.durable = Some(Default::default());
        }
    };
    let (a0, a1, b0) = tokio::join!(
        Pod::start_with(&nats, "web-a-0", in_pool("tenants/web-a")),
        Pod::start_with(&nats, "web-a-1", in_pool("tenants/web-a")),
        Pod::start_with(&nats, "web-b-0", in_pool("tenants/web-b"))
    );
    let mut agent = a1.agent("shared-id", &["ops"]).await;
    // Pool a routes to it across its pods.
    assert_eq!(
        a0.post("/v1/agents/shared-id/messages", json!("from a"))
            .await
            .status(),
        202
    );
    assert_eq!(next_push(&mut agent).await.1, json!("from a"));
    // Pool b does not know it: no presence, no push, no group member, no broadcast.
    assert_eq!(b0.get("/v1/agents/shared-id").await.status(), 404);
    assert_eq!(
        b0.post("/v1/agents/shared-id/messages", json!("from b"))
            .await
            .status(),
        404
    );
    let body: Value = b0
        .post("/v1/groups/ops/messages", json!("from b"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["delivered"], 0);
    let body: Value = b0
        .post("/v1/broadcast", json!("from b"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["delivered"], 0);
    let listing: Value = b0.get("/v1/agents").await.json().await.unwrap();
    assert_eq!(listing["agents"], json!([]));
    // A durable push in pool b waits in pool b's stream, not for pool a's agent.
    assert_eq!(
        b0.http
            .post(b0.api("/v1/agents/shared-id/messages?delivery=durable"))
            .bearer_auth(API_KEY)
            .json(&json!("durable from b"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_silent(&mut agent).await;
    // The buckets are the pools' own: pool b's directory has no entry for the agent.
    let client = nats_client(&nats).await;
    assert!(
        directory_entry(&client, "tenants/web-a", "shared-id")
            .await
            .is_some()
    );
    assert!(
        directory_entry(&client, "tenants/web-b", "shared-id")
            .await
            .is_none()
    );
    let js = async_nats::jetstream::new(client);
    let pods_of = |ns: &'static str| {
        let js = js.clone();
        async move {
            use futures_util::TryStreamExt;
            let kv = js
                .get_key_value(tether_gateway::nats::subjects::Subjects::new(ns).pods_bucket())
                .await
                .unwrap();
            let mut keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
            keys.sort();
            keys
        }
    };
    assert_eq!(pods_of("tenants/web-a").await, ["web-a-0", "web-a-1"]);
    assert_eq!(pods_of("tenants/web-b").await, ["web-b-0"]);
}

/// Issue 21: a bus that carries less than `limits.maxMessageBytes` (an external NATS
/// with a small `max_payload`): the push API refuses larger bodies on every pod with a
/// 413 naming the limit, instead of a push that works locally and fails across pods.
#[tokio::test]
async fn pushes_larger_than_the_bus_carries_are_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 65536\n").unwrap();
    let nats = Nats::start_with_args(&["-c", conf.to_str().unwrap()]).await;
    let big = |c: &mut tether_config::GatewayConfig| {
        c.limits.max_message_bytes = 256 * 1024;
        c.limits.max_write_buffer_bytes = c.limits.max_write_buffer_bytes.max(256 * 1024);
    };
    let (p0, p1) = tokio::join!(
        Pod::start_with(&nats, "gw-0", big),
        Pod::start_with(&nats, "gw-1", big)
    );
    let mut agent = p1.agent("big", &[]).await;
    let limit = 65536 - tether_gateway::nats::router::ENVELOPE_OVERHEAD;
    for pod in [&p0, &p1] {
        let response = pod
            .post("/v1/agents/big/messages", json!("x".repeat(100 * 1024)))
            .await;
        assert_eq!(response.status(), 413, "{}: local or not", pod.name);
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&limit.to_string()), "{message}");
        assert!(message.contains("max_payload"), "{message}");
    }
    // Just under the bus's limit: delivered across pods.
    let fits = json!("y".repeat(limit - 2));
    assert_eq!(
        p0.post("/v1/agents/big/messages", fits.clone())
            .await
            .status(),
        202
    );
    assert_eq!(next_push(&mut agent).await.1, fits);
}

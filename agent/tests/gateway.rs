//! The SDK against the real gateway (library, on 127.0.0.1): restart, drain hints, token
//! refresh, at-least-once send across upstream failures, push and request round trips.

mod common;

use common::{API_KEY, SECRET, gateway_config};

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::HeaderMap, http::StatusCode, routing::post};
use tether_agent::{Agent, Backoff, Hs256Minter, Options, ReconnectPolicy, State, TokenProvider};
use tether_config::{GatewayConfig, UpstreamConfig, UpstreamEvent};
use tether_gateway::Gateway;
use tether_test_support::push_api;
use tokio::net::{TcpListener, TcpStream};

struct Files {
    dir: tempfile::TempDir,
}

fn files() -> Files {
    Files {
        dir: tempfile::tempdir().unwrap(),
    }
}

fn config(files: &Files, public: &str) -> GatewayConfig {
    let mut config = gateway_config(files.dir.path());
    config.listen.public = public.into();
    config.auth.jwt.leeway_seconds = 0;
    config
}

fn fast() -> Options {
    Options {
        reconnect: ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(400),
            },
            overload_floor: Duration::from_millis(100),
        },
        ..Options::default()
    }
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .expect("step timed out")
}

async fn wait_session(
    agent: &Agent,
    pred: impl Fn(&tether_agent::Session) -> bool,
) -> tether_agent::Session {
    let mut state = agent.state();
    let state = within(state.wait_for(|s| matches!(s, State::Connected(session) if pred(session))))
        .await
        .unwrap()
        .clone();
    match state {
        State::Connected(session) => session,
        _ => unreachable!(),
    }
}

async fn push(gateway: &Gateway, agent: &str, body: serde_json::Value) -> StatusCode {
    let http = reqwest::Client::new();
    let resp = push_api::push(&http, gateway.internal_addr(), API_KEY, agent, &body).await;
    StatusCode::from_u16(resp.status().as_u16()).unwrap()
}

#[tokio::test]
async fn reconnects_after_a_gateway_restart_and_receives_pushes() {
    let files = files();
    let first = Gateway::start(config(&files, "127.0.0.1:0"), "g1".into())
        .await
        .unwrap();
    let addr = first.public_addr();
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let agent = Agent::builder(
        format!("ws://{addr}/v1/connect"),
        Hs256Minter::new(SECRET.as_bytes(), "a1"),
    )
    .options(fast())
    .on_push(move |push| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(push.json::<serde_json::Value>().unwrap());
        }
    })
    .start()
    .unwrap();
    let one = within(agent.connected()).await.unwrap();
    assert_eq!(one.agent_id, "a1");
    assert_eq!(
        push(&first, "a1", serde_json::json!({"n": 1})).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(within(pushes.recv()).await.unwrap()["n"], 1);

    // Restart: the first process drains and exits, a new one binds the same port.
    first.drain();
    within(first.wait()).await;
    let second = Gateway::start(config(&files, &addr.to_string()), "g2".into())
        .await
        .unwrap();
    let two = wait_session(&agent, |s| s.number > one.number).await;
    assert_eq!(two.agent_id, "a1");
    assert_eq!(
        push(&second, "a1", serde_json::json!({"n": 2})).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(within(pushes.recv()).await.unwrap()["n"], 2);
    agent.close().await;
    second.drain();
    within(second.wait()).await;
}

/// A TCP forwarder standing in for the Service in front of the pods: new connections go
/// to whichever gateway is current.
async fn forwarder(target: Arc<Mutex<SocketAddr>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = *target.lock().unwrap();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn drain_hint_is_honoured_over_the_backoff() {
    let files = files();
    let old = Gateway::start(config(&files, "127.0.0.1:0"), "old".into())
        .await
        .unwrap();
    let new = Gateway::start(config(&files, "127.0.0.1:0"), "new".into())
        .await
        .unwrap();
    let target = Arc::new(Mutex::new(old.public_addr()));
    let front = forwarder(target.clone()).await;
    // A back-off window of ten minutes: only the gateway's hint (0 ms here, jitter 0)
    // can bring the agent back within the test's deadline.
    let options = Options {
        reconnect: ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_secs(600),
                cap: Duration::from_secs(600),
            },
            overload_floor: Duration::from_secs(600),
        },
        ..Options::default()
    };
    let agent = Agent::builder(
        format!("ws://{front}/v1/connect"),
        Hs256Minter::new(SECRET.as_bytes(), "a2"),
    )
    .options(options)
    .start()
    .unwrap();
    let first = within(agent.connected()).await.unwrap();
    *target.lock().unwrap() = new.public_addr();
    old.drain();
    let second = wait_session(&agent, |s| s.number > first.number).await;
    assert_eq!(second.agent_id, "a2");
    assert_eq!(
        push(&new, "a2", serde_json::json!("after drain")).await,
        StatusCode::ACCEPTED
    );
    within(old.wait()).await;
    agent.close().await;
    new.drain();
    within(new.wait()).await;
}

/// Counts how many tokens were fetched.
struct Counting {
    minter: Hs256Minter,
    calls: Arc<AtomicUsize>,
}

impl TokenProvider for Counting {
    fn token(
        &self,
    ) -> tether_agent::token::BoxFuture<'_, Result<String, tether_agent::TokenError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.minter.token()
    }
}

#[tokio::test]
async fn token_is_refreshed_in_band_before_expiry() {
    let files = files();
    let gateway = Gateway::start(config(&files, "127.0.0.1:0"), "g".into())
        .await
        .unwrap();
    let mut minter = Hs256Minter::new(SECRET.as_bytes(), "a3");
    minter.ttl = Duration::from_secs(3);
    let calls = Arc::new(AtomicUsize::new(0));
    let agent = Agent::builder(
        format!("ws://{}/v1/connect", gateway.public_addr()),
        Counting {
            minter,
            calls: calls.clone(),
        },
    )
    .options(fast())
    .start()
    .unwrap();
    let first = within(agent.connected()).await.unwrap();
    let expiry = first.expires_at.expect("the gateway tells the expiry");
    // Outlive the first token by a margin: the same session must still be open, with a
    // later expiry, and more than one token fetched.
    let later = wait_session(&agent, |s| s.expires_at.is_some_and(|e| e > expiry + 1)).await;
    assert_eq!(
        later.number, first.number,
        "refreshed in band, not reconnected"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    match &*agent.state().borrow() {
        State::Connected(session) => assert_eq!(session.number, first.number),
        other => panic!("session lost: {other:?}"),
    }
    assert!(
        calls.load(Ordering::SeqCst) >= 3,
        "tokens fetched: {}",
        calls.load(Ordering::SeqCst)
    );
    agent.close().await;
    gateway.drain();
    within(gateway.wait()).await;
}

#[tokio::test]
async fn send_is_at_least_once_across_upstream_failures() {
    // The upstream fails the first two deliveries with 503, then accepts.
    let seen: Arc<Mutex<Vec<(String, StatusCode)>>> = Arc::default();
    let upstream = {
        let seen = seen.clone();
        Router::new().route(
            "/events",
            post(move |headers: HeaderMap, body: String| {
                let seen = seen.clone();
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let mut seen = seen.lock().unwrap();
                    let status = if seen.len() < 2 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    assert!(body.contains("\"payload\""), "{body}");
                    seen.push((key, status));
                    status
                }
            }),
        )
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, upstream).await.unwrap() });

    let files = files();
    let mut config = config(&files, "127.0.0.1:0");
    config.upstream = Some(UpstreamConfig {
        url: format!("http://{upstream_addr}/events"),
        secret_file: None,
        timeout_ms: 2000,
        events: vec![UpstreamEvent::Message],
        max_concurrency: 4,
        queue_timeout_ms: 1_000,
    });
    let gateway = Gateway::start(config, "g".into()).await.unwrap();
    let agent = Agent::builder(
        format!("ws://{}/v1/connect", gateway.public_addr()),
        Hs256Minter::new(SECRET.as_bytes(), "a4"),
    )
    .options(fast())
    .start()
    .unwrap();
    within(agent.connected()).await.unwrap();
    within(agent.send(&serde_json::json!({"payload": 1})))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(key, _)| !key.is_empty() && *key == seen[0].0),
        "one idempotency key: {seen:?}"
    );
    assert_eq!(seen[2].1, StatusCode::OK);
    agent.close().await;
    gateway.drain();
    within(gateway.wait()).await;
}

#[tokio::test]
async fn backend_request_is_answered_by_the_handler() {
    let files = files();
    let gateway = Gateway::start(config(&files, "127.0.0.1:0"), "g".into())
        .await
        .unwrap();
    let agent = Agent::builder(
        format!("ws://{}/v1/connect", gateway.public_addr()),
        Hs256Minter::new(SECRET.as_bytes(), "a5"),
    )
    .options(fast())
    .on_request(|request| async move {
        let question: serde_json::Value = request.json().unwrap();
        Ok(serde_json::value::to_raw_value(&serde_json::json!({"echo": question})).unwrap())
    })
    .start()
    .unwrap();
    within(agent.connected()).await.unwrap();
    let url = format!(
        "http://{}/v1/agents/a5/requests?timeout_ms=3000",
        gateway.internal_addr()
    );
    let body = serde_json::json!({"q": "status"});
    let resp = push_api::post_json(&reqwest::Client::new(), url, API_KEY, &body).await;
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"echo": {"q": "status"}}));
    agent.close().await;
    gateway.drain();
    within(gateway.wait()).await;
}

#[tokio::test]
async fn invalid_token_stops_the_agent() {
    let files = files();
    let gateway = Gateway::start(config(&files, "127.0.0.1:0"), "g".into())
        .await
        .unwrap();
    let agent = Agent::builder(
        format!("ws://{}/v1/connect", gateway.public_addr()),
        Hs256Minter::new(b"a-wrong-secret-that-is-also-32-bytes-long", "a6"),
    )
    .options(fast())
    .start()
    .unwrap();
    let err = within(agent.connected()).await.unwrap_err();
    assert!(
        matches!(
            err,
            tether_agent::Error::Stopped(tether_agent::StopReason::AuthRejected {
                status: 401,
                ..
            })
        ),
        "{err}"
    );
    gateway.drain();
    within(gateway.wait()).await;
}

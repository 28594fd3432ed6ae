//! The gateway's refusals reach the SDK's caller in words (real gateway on 127.0.0.1):
//! a permanent refusal stops the agent with the gateway's own reason, a URL no attempt
//! could use is refused before connecting, and a one-shot send fails at once when
//! nothing upstream receives agent messages.

mod common;

use std::time::Duration;

use tether_agent::{Agent, Backoff, Error, Hs256Minter, Options, ReconnectPolicy, StopReason};
use tether_gateway::Gateway;

use common::{SECRET, gateway_config as config};

fn fast() -> Options {
    Options {
        reconnect: ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_millis(20),
                cap: Duration::from_millis(100),
            },
            overload_floor: Duration::from_millis(20),
        },
        ..Options::default()
    }
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .expect("step timed out")
}

async fn stop_reason(url: String, minter: Hs256Minter) -> StopReason {
    let agent = Agent::builder(url, minter).options(fast()).start().unwrap();
    match within(agent.connected()).await {
        Err(Error::Stopped(reason)) => reason,
        other => panic!("expected the agent to stop, got {other:?}"),
    }
}

#[tokio::test]
async fn a_token_without_the_pools_tenant_stops_with_the_gateways_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.tenant = Some("acme".into());
    let gateway = Gateway::start(config, "g".into()).await.unwrap();
    let url = format!("ws://{}/v1/connect", gateway.public_addr());
    let reason = stop_reason(url, Hs256Minter::new(SECRET.as_bytes(), "a1")).await;
    assert_eq!(
        reason,
        StopReason::AuthRejected {
            status: 403,
            message: "forbidden: token has no tenant claim; this pool requires one".into(),
        }
    );
    assert_eq!(
        reason.to_string(),
        "authentication rejected with HTTP 403: forbidden: token has no tenant claim; this pool requires one"
    );
    gateway.drain();
    within(gateway.wait()).await;
}

#[tokio::test]
async fn a_bad_signature_stops_with_the_gateways_reason() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(dir.path()), "g".into())
        .await
        .unwrap();
    let url = format!("ws://{}/v1/connect", gateway.public_addr());
    let wrong = Hs256Minter::new(b"a-wrong-secret-that-is-also-32-bytes-long", "a1");
    match stop_reason(url, wrong).await {
        StopReason::AuthRejected {
            status: 401,
            message,
        } => assert!(message.starts_with("invalid token"), "{message}"),
        other => panic!("{other:?}"),
    }
    gateway.drain();
    within(gateway.wait()).await;
}

#[tokio::test]
async fn a_wrong_path_is_permanent_and_says_where_agents_connect() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(dir.path()), "g".into())
        .await
        .unwrap();
    let url = format!("ws://{}/connect", gateway.public_addr());
    let reason = stop_reason(url, Hs256Minter::new(SECRET.as_bytes(), "a1")).await;
    assert_eq!(
        reason,
        StopReason::HttpRejected {
            status: 404,
            message: "agents connect at GET /v1/connect".into(),
        }
    );
    gateway.drain();
    within(gateway.wait()).await;
}

#[tokio::test]
async fn urls_no_attempt_could_use_are_refused_before_connecting() {
    let cases = [
        (
            "http://127.0.0.1:8080/v1/connect",
            "invalid gateway url `http://127.0.0.1:8080/v1/connect`: the scheme must be ws:// or wss:// (got http://); agents connect at ws://HOST:PORT/v1/connect",
        ),
        (
            "127.0.0.1:8080/v1/connect",
            "invalid gateway url `127.0.0.1:8080/v1/connect`: invalid format; agents connect at ws://HOST:PORT/v1/connect",
        ),
        (
            "ws:///v1/connect",
            "invalid gateway url `ws:///v1/connect`: invalid format; agents connect at ws://HOST:PORT/v1/connect",
        ),
        (
            "not a url",
            "invalid gateway url `not a url`: invalid uri character; agents connect at ws://HOST:PORT/v1/connect",
        ),
    ];
    for (url, expected) in cases {
        let err = Agent::builder(url, Hs256Minter::new(SECRET.as_bytes(), "a1"))
            .start()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err:?}");
        assert_eq!(err.to_string(), expected, "{url}");
    }
}

#[tokio::test]
async fn a_send_without_upstream_fails_at_once_when_told_not_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(config(dir.path()), "g".into())
        .await
        .unwrap();
    let url = format!("ws://{}/v1/connect", gateway.public_addr());
    let options = Options {
        retry_unavailable: false,
        ..fast()
    };
    let agent = Agent::builder(url, Hs256Minter::new(SECRET.as_bytes(), "a1"))
        .options(options)
        .start()
        .unwrap();
    within(agent.connected()).await.unwrap();
    let err = within(agent.send(&serde_json::json!({"event": "hello"})))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "refused by the gateway (Unavailable): no upstream receives agent messages"
    );
    agent.close().await;
    gateway.drain();
    within(gateway.wait()).await;
}

//! The SDK and durable delivery end to end: a real `nats-server -js`, real gateways,
//! the SDK. A durable push whose ack was lost with the connection (the gateway drained
//! while the handler ran) is delivered again by the next gateway — and the handler
//! still sees it once.

mod common;

use common::{API_KEY, SECRET, gateway_config};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_agent::{Agent, Backoff, Hs256Minter, Options, ReconnectPolicy, State};
use tether_config::{DurableConfig, GatewayConfig, NatsConfig};
use tether_gateway::Gateway;
use tether_test_support::{NatsServer, PATIENCE, push_api};

fn config(dir: &std::path::Path, nats: &NatsServer, public: &str) -> GatewayConfig {
    let mut config = gateway_config(dir);
    config.listen.public = public.into();
    config.routing.nats = Some(NatsConfig {
        url: nats.url(),
        namespace: None,
        auth: Default::default(),
        tls: None,
        replicas: None,
    });
    config.delivery.durable = Some(DurableConfig::default());
    config
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .expect("step timed out")
}

async fn push_durable(gateway: &Gateway, id: &str, n: u64) {
    let response = reqwest::Client::new()
        .post(format!(
            "{}?delivery=durable",
            push_api::messages_url(gateway.internal_addr(), "a1")
        ))
        .bearer_auth(API_KEY)
        .header("idempotency-key", id)
        .json(&n)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

async fn status(gateway: &Gateway, id: &str) -> String {
    let url = format!("http://{}/v1/messages/{id}", gateway.internal_addr());
    let body: serde_json::Value = push_api::get(&reqwest::Client::new(), url, API_KEY)
        .await
        .json()
        .await
        .unwrap();
    body["status"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_durable_push_redelivered_after_a_lost_ack_reaches_the_handler_once() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = Gateway::start(config(dir.path(), &nats, "127.0.0.1:0"), "g1".into())
        .await
        .unwrap();
    let addr = first.public_addr();

    // The handler holds the first push until released: its ack cannot go out before
    // the gateway it came from is gone.
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let agent = Agent::builder(
        format!("ws://{addr}/v1/connect"),
        Hs256Minter::new(SECRET.as_bytes(), "a1"),
    )
    .options(Options {
        reconnect: ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(200),
            },
            overload_floor: Duration::from_millis(50),
        },
        ..Options::default()
    })
    .on_push({
        let handled = handled.clone();
        let release = release.clone();
        move |push| {
            let handled = handled.clone();
            let release = release.clone();
            let started_tx = started_tx.clone();
            async move {
                let id = push.id.clone().unwrap();
                let _ = started_tx.send(id.clone());
                if id == "d1" {
                    release.notified().await;
                }
                handled.lock().unwrap().push(id);
            }
        }
    })
    .start()
    .unwrap();
    let one = within(agent.connected()).await.unwrap();

    push_durable(&first, "d1", 1).await;
    push_durable(&first, "d2", 2).await;
    assert_eq!(within(started.recv()).await.unwrap(), "d1");

    // The gateway drains and exits while d1's handler runs: neither d1 nor d2 is
    // acknowledged on that connection. A new gateway takes the address.
    first.drain();
    within(first.wait()).await;
    let second = Gateway::start(config(dir.path(), &nats, &addr.to_string()), "g2".into())
        .await
        .unwrap();
    let mut state = agent.state();
    within(state.wait_for(|s| matches!(s, State::Connected(s) if s.number > one.number)))
        .await
        .unwrap();
    release.notify_one();

    // The new gateway delivers d1 and d2 again; the SDK acks both without handling
    // them twice, and the queue is empty.
    for id in ["d1", "d2"] {
        tether_test_support::eventually(&format!("{id} acknowledged"), PATIENCE, || async {
            (status(&second, id).await == "acknowledged").then_some(())
        })
        .await;
    }
    assert_eq!(*handled.lock().unwrap(), ["d1", "d2"]);
    agent.close().await;
    second.drain();
    within(second.wait()).await;
}

//! A durable push's refusals say what they mean for that push (real `nats-server -js`):
//! a full queue is `queue_full` with a `Retry-After` that follows the agent's pace
//! (connected: it drains as it acknowledges; away: only once it connects), and a 503
//! says the message was not stored and how to retry.

use serde_json::{Value, json};
use tether_config::DurableConfig;

use crate::common::{API_KEY, PATIENCE};
use crate::harness::*;

fn two_per_agent(c: &mut tether_config::GatewayConfig) {
    c.delivery.durable = Some(DurableConfig {
        max_messages_per_agent: 2,
        ..DurableConfig::default()
    });
}

async fn send(pod: &Pod, agent: &str, key: &str) -> reqwest::Response {
    pod.http
        .post(pod.api(&format!("/v1/agents/{agent}/messages?delivery=durable")))
        .bearer_auth(API_KEY)
        .header("idempotency-key", key)
        .json(&json!(key))
        .send()
        .await
        .unwrap()
}

/// Status, Retry-After, code and message.
async fn parts(response: reqwest::Response) -> (u16, Option<String>, String, String) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{status} {body}");
    (
        status,
        retry_after,
        body["error"]["code"].as_str().unwrap().to_owned(),
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_full_durable_queue_says_how_it_drains_and_when_to_retry() {
    let nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", two_per_agent).await;

    // The agent is away: nothing drains until it connects.
    for key in ["k1", "k2"] {
        assert_eq!(send(&pod, "away", key).await.status(), 202);
    }
    let (status, retry_after, code, message) = parts(send(&pod, "away", "k3").await).await;
    assert_eq!((status, code.as_str()), (429, "queue_full"));
    assert_eq!(retry_after.as_deref(), Some("60"));
    assert_eq!(
        message,
        "the agent's durable queue is full; nothing was stored. agent `away` is not connected: \
         the queue drains only once it connects and acknowledges or as messages expire \
         (delivery.durable.maxAgeSeconds: 604800). Retry after Retry-After with the same \
         Idempotency-Key, or raise delivery.durable.maxMessagesPerAgent"
    );

    // The agent is connected and holds its messages unacknowledged: the queue drains at
    // the agent's pace.
    let _agent = pod.agent("here", &[]).await;
    for key in ["h1", "h2"] {
        assert_eq!(send(&pod, "here", key).await.status(), 202);
    }
    let (status, retry_after, code, message) = parts(send(&pod, "here", "h3").await).await;
    assert_eq!((status, code.as_str()), (429, "queue_full"));
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert!(
        message.contains("agent `here` is connected: the queue drains as it acknowledges"),
        "{message}"
    );
}

#[tokio::test]
async fn a_durable_push_that_could_not_be_stored_says_so_and_how_to_retry() {
    let mut nats = Nats::start().await;
    let pod = Pod::start_with(&nats, "gw-0", two_per_agent).await;
    nats.kill();
    let (status, retry_after, code, message) =
        tether_test_support::eventually("a 503 with NATS gone", PATIENCE, || async {
            let response = send(&pod, "a1", "k1").await;
            (response.status() == 503).then_some(response)
        })
        .await
        .pipe(parts)
        .await;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(message.starts_with("not stored ("), "{message}");
    assert!(
        message.ends_with("); retry with the same Idempotency-Key: a retry is stored once"),
        "{message}"
    );
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

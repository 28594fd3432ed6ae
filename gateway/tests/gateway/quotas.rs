//! Push-API rate quotas (`quotas.perApiKey`, `quotas.perTenant`): a key, or the tenant,
//! over its rate gets 429 `quota_exceeded` with `Retry-After`; a canary key (or the
//! reads of the same key) goes on.

use serde_json::{Value, json};
use tether_config::RateQuota;

use crate::common::*;

const CANARY_KEY: &str = "canary-api-key-0123456789";

/// A gateway with the test key and the canary key, and the given quotas.
async fn gateway(
    per_key: Option<RateQuota>,
    per_tenant: Option<RateQuota>,
) -> (TestGateway, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let file = keys.path().join("api-keys");
    std::fs::write(&file, format!("{API_KEY}\n{CANARY_KEY}\n")).unwrap();
    let gw = TestGateway::start_with(move |c| {
        c.auth.api_keys_file = Some(file);
        c.quotas.per_api_key = per_key;
        c.quotas.per_tenant = per_tenant;
    })
    .await;
    (gw, keys)
}

async fn push(gw: &TestGateway, key: &str) -> reqwest::Response {
    gw.http
        .post(gw.api("/v1/agents/a/messages"))
        .bearer_auth(key)
        .json(&json!("hi"))
        .send()
        .await
        .unwrap()
}

async fn assert_quota_refusal(response: reqwest::Response, quota: &str) {
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(quota), "{message}");
}

#[tokio::test]
async fn one_key_over_its_quota_gets_429_and_the_canary_key_goes_on() {
    let (gw, _keys) = gateway(
        Some(RateQuota {
            per_second: 1,
            burst: 3,
        }),
        None,
    )
    .await;
    let _agent = gw.agent("a", &[]).await;
    // The burst passes (a tight loop: far faster than 1/s refills) ...
    for _ in 0..3 {
        assert_eq!(push(&gw, API_KEY).await.status(), 202);
    }
    // ... the next is refused, hard, however often it is retried at once.
    for _ in 0..5 {
        assert_quota_refusal(push(&gw, API_KEY).await, "quotas.perApiKey").await;
    }
    // Another key has its own bucket.
    for _ in 0..3 {
        assert_eq!(push(&gw, CANARY_KEY).await.status(), 202);
    }
    // Reads are not metered: the refused key still sees its agent.
    assert_eq!(gw.get("/v1/agents/a").await.status(), 200);
    // A second later a token is back.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while push(&gw, API_KEY).await.status() != 202 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the quota never refilled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_tenant_quota_spans_every_key() {
    let (gw, _keys) = gateway(
        None,
        Some(RateQuota {
            per_second: 1,
            burst: 2,
        }),
    )
    .await;
    let _agent = gw.agent("a", &[]).await;
    assert_eq!(push(&gw, API_KEY).await.status(), 202);
    assert_eq!(push(&gw, CANARY_KEY).await.status(), 202);
    assert_quota_refusal(push(&gw, API_KEY).await, "quotas.perTenant").await;
    assert_quota_refusal(push(&gw, CANARY_KEY).await, "quotas.perTenant").await;
    // Requests, group sends and broadcasts count too.
    let response = gw
        .http
        .post(gw.api("/v1/broadcast"))
        .bearer_auth(API_KEY)
        .json(&json!(1))
        .send()
        .await
        .unwrap();
    assert_quota_refusal(response, "quotas.perTenant").await;
}

#[tokio::test]
async fn without_quotas_a_burst_passes() {
    let (gw, _keys) = gateway(None, None).await;
    let _agent = gw.agent("a", &[]).await;
    for _ in 0..50 {
        assert_eq!(push(&gw, API_KEY).await.status(), 202);
    }
}

#[tokio::test]
async fn the_pool_connection_cap_refuses_with_503_and_is_not_demand() {
    let gw = TestGateway::start_with(|c| c.quotas.max_connections = Some(2)).await;
    let mut first = gw.agent("a-1", &[]).await;
    let _second = gw.agent("a-2", &[]).await;
    let refused = connect(&gw.ws_url(), Some(&token("a-3", &[], 3600))).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = refused else {
        panic!("a third agent was admitted");
    };
    assert_eq!(response.status(), 503);
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    assert!(body.contains("quotas.maxConnections"), "{body}");
    let state = gw.gateway.state();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(state.refused_capped.load(Relaxed), 1);
    assert_eq!(
        state.refused_full.load(Relaxed),
        0,
        "a capped agent is not demand"
    );
    let stats: Value = gw.get("/v1/stats").await.json().await.unwrap();
    assert_eq!(stats["refused_tenant_cap"], 1);
    // The connected agents are not disturbed ...
    assert_eq!(
        gw.post("/v1/agents/a-1/messages", json!(1)).await.status(),
        202
    );
    assert!(matches!(
        next_message(&mut first).await,
        tether_protocol::GatewayMessage::Push { .. }
    ));
    // ... and a place freed is a place taken.
    drop(first);
    gw.wait_for_connections(1).await;
    let _third = gw.agent("a-3", &[]).await;
}

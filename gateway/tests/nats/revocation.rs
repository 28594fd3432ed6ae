//! Revocation across a pool on a real nats-server: revoked on one pod, the agent's
//! connection on another closes with 4008 and it cannot connect anywhere, including on
//! a pod restarted or started afterwards (the revocation is stored on the bus).

use serde_json::json;
use tether_protocol::CloseCode;

use super::harness::*;
use crate::common::{self, expect_close, refused_status};

#[tokio::test]
async fn a_revocation_on_one_pod_closes_and_refuses_the_agent_on_every_pod_and_survives_restarts() {
    let nats = Nats::start().await;
    let p0 = Pod::start(&nats, "gw-0").await;
    let p1 = Pod::start(&nats, "gw-1").await;
    let mut victim = p1.agent("victim", &[]).await;
    let mut canary = p1.agent("canary", &[]).await;

    let response = p0.post("/v1/agents/victim/revoke", json!({})).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["agent"], "victim");
    let until = body["until"].as_u64().unwrap();
    assert!(
        until > common::now() + 23 * 3600,
        "default: a day ({until})"
    );

    // The connection on the other pod closes with the documented code ...
    expect_close(&mut victim, CloseCode::Revoked).await;
    // ... and no pod lets the agent back in (403), while others connect and stay.
    let token = common::token("victim", &[], 3600);
    assert_eq!(refused_status(&p1.ws_url(), Some(&token)).await, 403);
    assert_eq!(refused_status(&p0.ws_url(), Some(&token)).await, 403);
    let _other = p0.agent("other", &[]).await;
    let response = p0
        .post("/v1/agents/canary/messages", json!("still here"))
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(next_push(&mut canary).await.1, json!("still here"));

    // A restarted pod, and one that was not running at the time, read it from the bus.
    let Pod { gateway, .. } = p1;
    gateway.drain();
    gateway.wait().await;
    let p1 = Pod::start(&nats, "gw-1").await;
    let p2 = Pod::start(&nats, "gw-2").await;
    assert_eq!(refused_status(&p1.ws_url(), Some(&token)).await, 403);
    assert_eq!(refused_status(&p2.ws_url(), Some(&token)).await, 403);
    let _ = p2.agent("someone-else", &[]).await;
}

#[tokio::test]
async fn a_token_revoked_by_jti_is_refused_on_every_pod_until_it_lapses() {
    let nats = Nats::start().await;
    let p0 = Pod::start(&nats, "gw-0").await;
    let p1 = Pod::start(&nats, "gw-1").await;
    let mut claims = common::claims("agent-j", &[], 3600);
    claims["jti"] = json!("token-1");
    let stolen = common::sign(&claims);
    let (mut ws, _) = common::connect(&p1.ws_url(), Some(&stolen)).await.unwrap();
    let _welcome = common::next_message(&mut ws).await;

    let until = common::now() + 3;
    let response = p0
        .post("/v1/tokens/token-1/revoke", json!({ "until": until }))
        .await;
    assert_eq!(response.status(), 200);
    expect_close(&mut ws, CloseCode::Revoked).await;
    assert_eq!(refused_status(&p0.ws_url(), Some(&stolen)).await, 403);
    // The same agent with another token is not affected.
    claims["jti"] = json!("token-2");
    let fresh = common::sign(&claims);
    let (mut ws, _) = common::connect(&p0.ws_url(), Some(&fresh)).await.unwrap();
    let _welcome = common::next_message(&mut ws).await;
    // At `until` the revocation lapses.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while common::connect(&p1.ws_url(), Some(&stolen)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never lapsed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The window a pod off the bus leaves open (docs/routing.md, "The start does not need
/// NATS"): a pod that starts while NATS is away does not know a revocation stored on the
/// bus and admits the agent; once it attaches it reads the stored revocations, closes that
/// agent with 4008 and refuses it from then on, while its other agents stay.
#[tokio::test]
async fn an_agent_revoked_while_a_pod_was_off_the_bus_is_closed_when_the_pod_attaches() {
    let mut nats = Nats::start().await;
    let p0 = Pod::start(&nats, "gw-0").await;
    let response = p0.post("/v1/agents/victim/revoke", json!({})).await;
    assert_eq!(response.status(), 200);

    nats.kill();
    let p1 = Pod::start_unattached(&nats, "gw-1", |_| {}).await;
    assert!(!p1.bus_connected());
    let mut victim = p1.agent("victim", &[]).await;
    let mut canary = p1.agent("canary", &[]).await;

    nats.restart(false).await;
    expect_close(&mut victim, CloseCode::Revoked).await;
    let token = common::token("victim", &[], 3600);
    assert_eq!(refused_status(&p1.ws_url(), Some(&token)).await, 403);
    let response = p1
        .post("/v1/agents/canary/messages", json!("still here"))
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(next_push(&mut canary).await.1, json!("still here"));
}

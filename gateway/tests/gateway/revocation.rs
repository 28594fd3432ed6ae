//! Revocation on a single pod (no bus): `POST /v1/agents/{id}/revoke` and
//! `POST /v1/tokens/{jti}/revoke` close the connection with 4008, refuse handshakes and
//! refreshes until `until`, and refuse malformed requests. The pool-wide, restart-proof
//! behaviour is in tests/nats/revocation.rs.

use serde_json::{Value, json};
use tether_protocol::{AgentMessage, CloseCode};

use crate::common::*;

#[tokio::test]
async fn a_revoked_agent_is_closed_with_4008_and_refused_until_it_lapses() {
    let gw = TestGateway::start().await;
    let mut victim = gw.agent("victim", &[]).await;
    let mut canary = gw.agent("canary", &[]).await;
    let until = now() + 3;
    let response = gw
        .post("/v1/agents/victim/revoke", json!({ "until": until }))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"agent": "victim", "until": until})
    );
    expect_close(&mut victim, CloseCode::Revoked).await;
    let token = token("victim", &[], 3600);
    assert_eq!(refused_status(&gw.ws_url(), Some(&token)).await, 403);
    // The canary is untouched.
    assert_eq!(
        gw.post("/v1/agents/canary/messages", json!(1))
            .await
            .status(),
        202
    );
    assert!(matches!(
        next_message(&mut canary).await,
        tether_protocol::GatewayMessage::Push { .. }
    ));
    // After `until`, the agent may connect again.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while connect(&gw.ws_url(), Some(&token)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never lapsed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_refresh_with_a_revoked_token_closes_with_4008() {
    let gw = TestGateway::start().await;
    let mut claims = claims("agent-r", &[], 3600);
    claims["jti"] = json!("first");
    let (mut ws, _) = connect(&gw.ws_url(), Some(&sign(&claims))).await.unwrap();
    let _welcome = next_message(&mut ws).await;
    // Revoke a token the agent does not hold yet: its connection stays ...
    let response = gw.post("/v1/tokens/second/revoke", json!(null)).await;
    assert_eq!(response.status(), 400, "null is not a body");
    let response = gw
        .http
        .post(gw.api("/v1/tokens/second/revoke"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "an empty body takes the default");
    // ... until it refreshes to that token.
    claims["jti"] = json!("second");
    let refresh = AgentMessage::Refresh {
        token: sign(&claims),
    };
    send_text(&mut ws, &refresh.encode()).await;
    expect_close(&mut ws, CloseCode::Revoked).await;
}

#[tokio::test]
async fn malformed_revocations_are_refused() {
    let gw = TestGateway::start().await;
    for (path, body, why) in [
        (
            "/v1/agents/a/revoke",
            json!({"until": 5}),
            "not in the future",
        ),
        (
            "/v1/agents/a/revoke",
            json!({"untill": now() + 60}),
            "unknown field",
        ),
        ("/v1/agents/a/revoke", json!({"until": "soon"}), "until"),
        ("/v1/tokens/%0A/revoke", json!({}), "jti"),
    ] {
        let response = gw.post(path, body).await;
        assert_eq!(response.status(), 400, "{path}");
        let text = response.text().await.unwrap();
        assert!(text.contains(why), "{path}: {text}");
    }
    // Nothing was revoked by the refusals.
    let _ = gw.agent("a", &[]).await;
    // Without a key: 401.
    let response = gw
        .http
        .post(gw.api("/v1/agents/a/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

//! Hostile or broken agents: slow readers, oversized and fragmented frames, floods,
//! malformed handshakes and tokens, forged refreshes.

use std::sync::atomic::Ordering;

use serde_json::json;
use tether_protocol::GatewayMessage;
use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::harness::*;

/// An agent that upgrades and then never reads, with a tiny receive window: pushes
/// fill the socket, the write times out, and the gateway drops the socket without
/// waiting on a close frame that can never be sent. Its slot and hub entry are freed.
#[tokio::test]
async fn slow_reader_with_zero_window_is_evicted() {
    let mut arena = Arena::start_with(|c| {
        c.limits.write_timeout_ms = 500;
        c.limits.outbound_queue = 16;
    })
    .await;
    let mut slow = tcp(arena.public(), Some(2048)).await;
    slow.write_all(upgrade_request(Some(&token("slow", &[], 3600)), "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut slow).await.expect("an answer");
    assert_eq!(status_of(&head), 101);
    arena.gw.wait_for_connections(2).await;

    let payload = json!("x".repeat(32 * 1024));
    for _ in 0..400 {
        let status = arena
            .gw
            .post("/v1/agents/slow/messages", payload.clone())
            .await
            .status();
        match status.as_u16() {
            202 => continue,
            // The queue is full (429) or the agent is already gone (404).
            429 | 404 => break,
            other => panic!("unexpected {other}"),
        }
    }
    let state = arena.gw.gateway.state().clone();
    eventually(|| state.hub.get("slow").is_none()).await;
    eventually(|| state.admitted.load(Ordering::Acquire) == 1).await;
    assert_eq!(
        arena.gw.get("/v1/agents/slow").await.status(),
        404,
        "presence no longer answers for the evicted agent"
    );
    arena.check().await;
    drop(slow);
}

/// Fragments that add up to more than `maxMessageBytes` are refused with 1009 before
/// the whole message is buffered.
#[tokio::test]
async fn fragmented_message_growing_past_the_limit_closes_1009() {
    let mut arena = Arena::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let mut agent = raw_agent(arena.public(), "fragments", None).await;
    let chunk = vec![b'x'; 600];
    agent
        .write_all(&client_frame(0x1, false, &chunk))
        .await
        .unwrap();
    for _ in 0..8 {
        // The gateway may close before every fragment is written.
        if agent
            .write_all(&client_frame(0x0, false, &chunk))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(raw_close_code(&mut agent).await, Some(1009));
    arena.check().await;
}

/// A control frame over 125 bytes breaks RFC 6455: 1002.
#[tokio::test]
async fn control_frame_over_125_bytes_closes_1002() {
    let mut arena = Arena::start().await;
    let mut agent = raw_agent(arena.public(), "big-ping", None).await;
    agent
        .write_all(&client_frame(0x9, true, &[7u8; 200]))
        .await
        .unwrap();
    assert_eq!(raw_close_code(&mut agent).await, Some(1002));
    arena.check().await;
}

/// A ping flood from an agent that never reads: tungstenite keeps one pending pong,
/// not one per ping, so memory stays flat; if its socket backs up it is evicted as a
/// slow consumer like any other non-reader.
#[tokio::test]
async fn ping_flood_keeps_memory_bounded() {
    let mut arena = Arena::start_with(|c| c.limits.write_timeout_ms = 500).await;
    let mut agent = raw_agent(arena.public(), "pinger", Some(4096)).await;
    let ping = client_frame(0x9, true, &[1u8; 125]);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    for _ in 0..20 {
        if agent.write_all(&burst).await.is_err() {
            break;
        }
    }
    arena.check().await;
    drop(agent);
}

/// HEAD and HTTP/1.0 cannot upgrade; duplicated handshake headers are ambiguous;
/// a non-Bearer `Authorization` is no token.
#[tokio::test]
async fn malformed_handshakes_get_their_documented_status() {
    let mut arena = Arena::start().await;
    let addr = arena.public();
    let token = token("h", &[], 3600);
    let good = upgrade_request(Some(&token), "");
    let head = good.replacen("GET ", "HEAD ", 1);
    assert_eq!(raw_status(addr, head.as_bytes()).await, Some(405));
    let http10 = good.replacen("HTTP/1.1", "HTTP/1.0", 1);
    assert_eq!(raw_status(addr, http10.as_bytes()).await, Some(400));
    let dup_key = upgrade_request(
        Some(&token),
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
    );
    assert_eq!(raw_status(addr, dup_key.as_bytes()).await, Some(400));
    let dup_auth = upgrade_request(Some(&token), &format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(raw_status(addr, dup_auth.as_bytes()).await, Some(400));
    let basic = upgrade_request(None, "Authorization: Basic dXNlcjpwYXNz\r\n");
    assert_eq!(raw_status(addr, basic.as_bytes()).await, Some(401));
    let wrong_case = good.replace("tether.v1", "Tether.V1");
    assert_eq!(raw_status(addr, wrong_case.as_bytes()).await, Some(400));
    // The well-formed request still upgrades.
    assert_eq!(raw_status(addr, good.as_bytes()).await, Some(101));
    arena.check().await;
}

/// Hostile tokens: too many groups, no `exp`, no `tenant`, another key family.
#[tokio::test]
async fn hostile_tokens_are_refused_before_the_upgrade() {
    let mut arena = Arena::start().await;
    let url = arena.gw.ws_url();
    let groups: Vec<String> = (0..1000).map(|i| format!("g{i}")).collect();
    let mut many = claims("many", &[], 3600);
    many["groups"] = serde_json::json!(groups);
    assert_eq!(refused_status(&url, Some(&sign(&many))).await, 401);
    let mut no_exp = claims("no-exp", &[], 3600);
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(refused_status(&url, Some(&sign(&no_exp))).await, 401);
    let mut no_tenant = claims("no-tenant", &[], 3600);
    no_tenant.as_object_mut().unwrap().remove("tenant");
    assert_eq!(refused_status(&url, Some(&sign(&no_tenant))).await, 403);
    let mut other = claims("other", &[], 3600);
    other["tenant"] = serde_json::json!("globex");
    assert_eq!(refused_status(&url, Some(&sign(&other))).await, 403);
    // RS256, while the pool verifies HS256: another key family.
    let rsa = std::fs::read(fixture("rsa-private.pem")).unwrap();
    let rs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims("rsa", &[], 3600),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&rsa).unwrap(),
    )
    .unwrap();
    assert_eq!(refused_status(&url, Some(&rs256)).await, 401);
    arena.check().await;
}

/// The refused handshake's status and the message of its JSON error body.
async fn refusal(url: &str, token: &str) -> (u16, String) {
    match connect(url, Some(token)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .expect("a JSON error body");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            (response.status().as_u16(), message.to_owned())
        }
        Ok(_) => panic!("handshake unexpectedly succeeded"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// A configured `audience` and `issuer` are required claims: a token signed with the
/// pool's key but minted for another service (no `aud`, no `iss`, or an `aud` of the
/// wrong type, which jsonwebtoken would otherwise skip) is refused before the upgrade.
#[tokio::test]
async fn tokens_without_the_configured_audience_or_issuer_are_refused() {
    const ISSUER: &str = "https://issuer.example";
    // No canary arena: its agent's token has no `iss`, which this pool now refuses;
    // the well-formed token at the end plays the canary.
    let gw = TestGateway::start_with(|c| c.auth.jwt.issuer = Some(ISSUER.into())).await;
    let url = gw.ws_url();
    let good = || {
        let mut c = claims("svc", &[], 3600);
        c["iss"] = json!(ISSUER);
        c
    };
    let mut no_aud = good();
    no_aud.as_object_mut().unwrap().remove("aud");
    let (status, message) = refusal(&url, &sign(&no_aud)).await;
    assert_eq!(status, 401);
    assert!(message.contains("`aud`"), "{message}");

    let mut no_iss = good();
    no_iss.as_object_mut().unwrap().remove("iss");
    let (status, message) = refusal(&url, &sign(&no_iss)).await;
    assert_eq!(status, 401);
    assert!(message.contains("`iss`"), "{message}");

    let mut numeric_aud = good();
    numeric_aud["aud"] = json!(5);
    let (status, message) = refusal(&url, &sign(&numeric_aud)).await;
    assert_eq!(status, 401);
    assert!(message.contains("`aud`"), "{message}");

    let mut other_iss = good();
    other_iss["iss"] = json!("https://elsewhere.example");
    assert_eq!(refusal(&url, &sign(&other_iss)).await.0, 401);
    let mut other_aud = good();
    other_aud["aud"] = json!("another-service");
    assert_eq!(refusal(&url, &sign(&other_aud)).await.0, 403);

    // The same claims with the configured audience and issuer connect.
    let (mut ws, _) = connect(&url, Some(&sign(&good()))).await.expect("upgraded");
    assert!(matches!(
        next_message(&mut ws).await,
        GatewayMessage::Welcome(_)
    ));
    assert_eq!(
        gw.post("/v1/agents/svc/messages", json!(1)).await.status(),
        202
    );
    assert!(matches!(
        next_message(&mut ws).await,
        GatewayMessage::Push { .. }
    ));
}

/// A pool whose keys are a JWKS: a token naming an unknown `kid` is refused (401), a
/// known one connects.
#[tokio::test]
async fn unknown_kid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::copy(fixture("jwks.json"), &jwks).unwrap();
    let gw = TestGateway::start_with(|c| {
        c.auth.jwt.hs256_secret_file = None;
        c.auth.jwt.public_keys_file = Some(jwks);
    })
    .await;
    let rsa = std::fs::read(fixture("rsa-private.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&rsa).unwrap();
    let signed = |kid: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims("kid-agent", &[], 3600), &key).unwrap()
    };
    // This pool's canary holds a token with a known kid.
    let (mut canary, _) = connect(&gw.ws_url(), Some(&signed("rsa-1"))).await.unwrap();
    assert!(matches!(
        next_message(&mut canary).await,
        GatewayMessage::Welcome(_)
    ));
    assert_eq!(
        refused_status(&gw.ws_url(), Some(&signed("rsa-9"))).await,
        401
    );
    assert_eq!(
        gw.post("/v1/agents/kid-agent/messages", json!("still here"))
            .await
            .status(),
        202
    );
    assert!(matches!(
        next_message(&mut canary).await,
        GatewayMessage::Push { .. }
    ));
    assert!(rss_mib() < RSS_BOUND_MIB);
}

/// In-band refreshes: a forged, an expired and another tenant's token end the
/// session with 4002; a valid one with other groups moves the agent's memberships.
#[tokio::test]
async fn refreshes_are_verified_and_apply_their_groups() {
    let mut arena = Arena::start().await;
    let refresh = |token: String| tether_protocol::AgentMessage::Refresh { token }.encode();

    let mut forged = arena.gw.agent("forged", &[]).await;
    let mut bad = token("forged", &[], 3600);
    bad.push_str("tampered");
    send_text(&mut forged, &refresh(bad)).await;
    expect_close(&mut forged, tether_protocol::CloseCode::TokenInvalid).await;

    let mut expired = arena.gw.agent("expired", &[]).await;
    send_text(&mut expired, &refresh(token("expired", &[], -3600))).await;
    expect_close(&mut expired, tether_protocol::CloseCode::TokenInvalid).await;

    let mut tenant = arena.gw.agent("tenant", &[]).await;
    let mut other = claims("tenant", &[], 3600);
    other["tenant"] = serde_json::json!("globex");
    send_text(&mut tenant, &refresh(sign(&other))).await;
    expect_close(&mut tenant, tether_protocol::CloseCode::TokenInvalid).await;

    let mut mover = arena.gw.agent("mover", &["old"]).await;
    send_text(&mut mover, &refresh(token("mover", &["new"], 3600))).await;
    assert!(matches!(
        next_message(&mut mover).await,
        tether_protocol::GatewayMessage::Refreshed { .. }
    ));
    let sent = |group: &'static str| {
        let gw = &arena.gw;
        async move {
            let body: serde_json::Value = gw
                .post(&format!("/v1/groups/{group}/messages"), json!(group))
                .await
                .json()
                .await
                .unwrap();
            body["delivered"].as_u64().unwrap()
        }
    };
    assert_eq!(
        sent("old").await,
        0,
        "the dropped group no longer reaches it"
    );
    assert_eq!(sent("new").await, 1);
    match next_message(&mut mover).await {
        tether_protocol::GatewayMessage::Push { data, .. } => assert_eq!(data.get(), "\"new\""),
        other => panic!("expected the group push, got {other:?}"),
    }
    arena.check().await;
}

/// Issue 21: on a full pod, tokenless and forged upgrades are refused for what they
/// are (401) and are not scaling demand; only an authenticated agent's refusal (503)
/// counts in `refused_full`, which the status reporter sends to the operator.
#[tokio::test]
async fn anonymous_upgrades_on_a_full_pod_are_not_demand() {
    let mut arena = Arena::start_with(|c| c.limits.max_connections = 1).await;
    let url = arena.gw.ws_url();
    let state = arena.gw.gateway.state().clone();
    for _ in 0..20 {
        assert_eq!(refused_status(&url, None).await, 401);
    }
    let forged =
        tether_test_support::hs256(b"not-the-pool-secret-not-the-pool-x", &claims("x", &[], 60));
    assert_eq!(refused_status(&url, Some(&forged)).await, 401);
    assert_eq!(state.refused_full.load(Ordering::Relaxed), 0);
    // A real agent that finds no room is demand.
    assert_eq!(
        refused_status(&url, Some(&token("real", &[], 3600))).await,
        503
    );
    assert_eq!(state.refused_full.load(Ordering::Relaxed), 1);
    arena.check().await;
}

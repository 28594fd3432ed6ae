//! The opening handshake: RFC 6455 details, subprotocol, auth before the upgrade.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Sends a raw HTTP request and returns the response head as text.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut read = 0;
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf[read..]))
            .await
            .unwrap()
            .unwrap();
        read += n;
        if n == 0 || buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf[..read]).into_owned()
}

#[tokio::test]
async fn upgrade_answers_101_with_rfc_accept_key_and_subprotocol() {
    let gw = TestGateway::start().await;
    let token = token("agent-1", &[], 60);
    // The key/accept pair is the worked example of RFC 6455 section 1.3.
    let head = raw_request(
        gw.gateway.public_addr(),
        &format!(
            "GET /v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: chat, tether.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
        ),
    )
    .await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(
        lower.contains("sec-websocket-protocol: tether.v1"),
        "{head}"
    );
}

#[tokio::test]
async fn first_frame_is_welcome_with_session_facts() {
    let gw = TestGateway::start().await;
    let (mut ws, response) = connect(&gw.ws_url(), Some(&token("agent-1", &["g"], 60)))
        .await
        .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "tether.v1");
    match next_message(&mut ws).await {
        tether_protocol::GatewayMessage::Welcome(w) => {
            assert_eq!(w.agent_id, "agent-1");
            assert!(w.expires_at.unwrap() > now());
            assert_eq!(w.max_message_bytes, 64 * 1024);
        }
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn non_upgrade_and_missing_subprotocol_get_clear_4xx() {
    let gw = TestGateway::start().await;
    let plain = reqwest::get(format!("http://{}/v1/connect", gw.gateway.public_addr()))
        .await
        .unwrap();
    assert_eq!(plain.status(), 426);
    assert_eq!(plain.headers()["upgrade"], "websocket");
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upgrade_required");

    let head = raw_request(
        gw.gateway.public_addr(),
        "GET /v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.contains("tether.v1"),
        "the error names the subprotocol: {head}"
    );

    let head = raw_request(
        gw.gateway.public_addr(),
        "GET /v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\
         Sec-WebSocket-Protocol: tether.v1\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );
}

#[tokio::test]
async fn bad_credentials_are_refused_before_upgrade() {
    let gw = TestGateway::start().await;
    let url = gw.ws_url();
    assert_eq!(refused_status(&url, None).await, 401);
    assert_eq!(refused_status(&url, Some("not-a-jwt")).await, 401);
    assert_eq!(
        refused_status(&url, Some(&token("a", &[], -3600))).await,
        401,
        "expired"
    );
    let mut wrong_aud = claims("a", &[], 60);
    wrong_aud["aud"] = json!("another-service");
    assert_eq!(refused_status(&url, Some(&sign(&wrong_aud))).await, 403);
    let mut wrong_tenant = claims("a", &[], 60);
    wrong_tenant["tenant"] = json!("globex");
    assert_eq!(refused_status(&url, Some(&sign(&wrong_tenant))).await, 403);
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("a", &[], 60),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-xx"),
    )
    .unwrap();
    assert_eq!(refused_status(&url, Some(&forged)).await, 401);
    assert!(
        gw.gateway.state().hub.is_empty(),
        "no refused handshake became a session"
    );
}

#[tokio::test]
async fn access_token_query_parameter_authenticates() {
    let gw = TestGateway::start().await;
    let url = format!("{}?access_token={}", gw.ws_url(), token("browser", &[], 60));
    let (mut ws, _) = connect(&url, None).await.unwrap();
    assert!(matches!(
        next_message(&mut ws).await,
        tether_protocol::GatewayMessage::Welcome(_)
    ));
}

mod public_keys {
    use super::*;

    async fn gateway() -> TestGateway {
        TestGateway::start_with(|c| {
            c.auth.jwt.hs256_secret_file = None;
            c.auth.jwt.public_keys_file = Some(fixture("public-keys.pem"));
        })
        .await
    }

    fn signed(alg: Algorithm, key: EncodingKey) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims("pk-agent", &[], 60), &key).unwrap()
    }

    #[tokio::test]
    async fn rs256_and_es256_tokens_verify_against_pem_keys() {
        let gw = gateway().await;
        let rsa = std::fs::read(fixture("rsa-private.pem")).unwrap();
        let ec = std::fs::read(fixture("ec-private.pem")).unwrap();
        let rs = signed(Algorithm::RS256, EncodingKey::from_rsa_pem(&rsa).unwrap());
        let es = signed(Algorithm::ES256, EncodingKey::from_ec_pem(&ec).unwrap());
        for token in [rs, es] {
            let (mut ws, _) = connect(&gw.ws_url(), Some(&token)).await.unwrap();
            assert!(matches!(
                next_message(&mut ws).await,
                tether_protocol::GatewayMessage::Welcome(_)
            ));
        }
    }

    #[tokio::test]
    async fn algorithm_confusion_and_alg_none_are_refused() {
        use base64::Engine;
        let gw = gateway().await;
        // The classic attack: HS256 "signed" with the server's public key as the secret.
        let public_pem = std::fs::read(fixture("rsa-public.pem")).unwrap();
        let confused = signed(Algorithm::HS256, EncodingKey::from_secret(&public_pem));
        assert_eq!(refused_status(&gw.ws_url(), Some(&confused)).await, 401);

        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims("pk-agent", &[], 60).to_string())
        );
        assert_eq!(refused_status(&gw.ws_url(), Some(&none)).await, 401);
    }
}

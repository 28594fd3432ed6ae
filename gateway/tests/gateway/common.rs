//! Test harness: a real gateway on 127.0.0.1 with real keys on disk, real WebSocket
//! clients (tokio-tungstenite) and a real HTTP client for the push API.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_config::GatewayConfig;
use tether_gateway::Gateway;
use tether_protocol::{CloseCode, GatewayMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
pub const API_KEY: &str = "test-api-key-0123456789";
pub const AUDIENCE: &str = "tether-test";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub use tether_test_support::PATIENCE;
/// Seconds since the Unix epoch.
pub use tether_test_support::unix_now as now;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A running gateway plus what a test needs to talk to it.
pub struct TestGateway {
    pub gateway: Gateway,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A config with HS256 auth, an API key, loopback ports and the given tweaks.
pub fn config(dir: &Path, tweak: impl FnOnce(&mut GatewayConfig)) -> GatewayConfig {
    let secret_file = dir.join("jwt-secret");
    let keys_file = dir.join("api-keys");
    std::fs::write(&secret_file, SECRET).unwrap();
    std::fs::write(&keys_file, format!("# test key\n{API_KEY}\n")).unwrap();
    let mut config = GatewayConfig::default();
    config.listen.public = "127.0.0.1:0".into();
    config.listen.internal = "127.0.0.1:0".into();
    config.auth.jwt.hs256_secret_file = Some(secret_file);
    config.auth.jwt.audience = Some(AUDIENCE.into());
    config.auth.api_keys_file = Some(keys_file);
    config.tenant = Some("acme".into());
    tweak(&mut config);
    config
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), tweak);
        let gateway = Gateway::start(config, "gateway-test-0".into())
            .await
            .expect("gateway starts");
        Self {
            gateway,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/connect", self.gateway.public_addr())
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.internal_addr())
    }

    /// Connects an agent with a valid token and reads its `welcome`.
    pub async fn agent(&self, sub: &str, groups: &[&str]) -> Ws {
        let token = token(sub, groups, 3600);
        let (mut ws, _) = connect(&self.ws_url(), Some(&token))
            .await
            .expect("agent connects");
        match next_message(&mut ws).await {
            GatewayMessage::Welcome(w) => assert_eq!(w.agent_id, sub),
            other => panic!("expected welcome, got {other:?}"),
        }
        ws
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        api_post(&self.http, self.api(path), body).await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        api_get(&self.http, self.api(path)).await
    }

    /// Waits until the hub holds `n` connections (sessions register right after 101).
    pub async fn wait_for_connections(&self, n: usize) {
        let hub = self.gateway.state().hub.clone();
        eventually(|| hub.len() == n).await;
    }
}

/// POSTs JSON to the push API with the test key.
pub async fn api_post(http: &reqwest::Client, url: String, body: Value) -> reqwest::Response {
    tether_test_support::push_api::post_json(http, url, API_KEY, &body).await
}

/// GETs from the push API with the test key.
pub async fn api_get(http: &reqwest::Client, url: String) -> reqwest::Response {
    tether_test_support::push_api::get(http, url, API_KEY).await
}

/// Polls an in-process condition until it holds or [`PATIENCE`] runs out.
pub async fn eventually(condition: impl FnMut() -> bool) {
    tether_test_support::until("the condition", PATIENCE, condition).await;
}

pub fn claims(sub: &str, groups: &[&str], ttl: i64) -> Value {
    json!({
        "sub": sub,
        "groups": groups,
        "aud": AUDIENCE,
        "tenant": "acme",
        "exp": (now() as i64 + ttl) as u64,
    })
}

pub fn sign(claims: &Value) -> String {
    tether_test_support::hs256(SECRET.as_bytes(), claims)
}

pub fn token(sub: &str, groups: &[&str], ttl: i64) -> String {
    sign(&claims(sub, groups, ttl))
}

/// Opens a WebSocket offering `tether.v1`, with an optional bearer token.
pub async fn connect(
    url: &str,
    token: Option<&str>,
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "tether.v1".parse().unwrap());
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await
}

/// The HTTP status a refused handshake got.
pub async fn refused_status(url: &str, token: Option<&str>) -> u16 {
    match connect(url, token).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Ok(_) => panic!("handshake unexpectedly succeeded"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// The next text envelope, skipping control frames.
pub async fn next_message(ws: &mut Ws) -> GatewayMessage {
    loop {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("valid frame");
        match frame {
            Message::Text(text) => return GatewayMessage::decode(&text).expect("valid envelope"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text envelope, got {other:?}"),
        }
    }
}

/// Reads until the close frame and returns its code.
pub async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let frame = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

pub async fn expect_close(ws: &mut Ws, code: CloseCode) {
    assert_eq!(close_code(ws).await, code.code(), "expected close {code:?}");
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_owned())).await.unwrap();
}

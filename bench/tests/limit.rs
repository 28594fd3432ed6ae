//! The `limit` peer (`peer-limit`) speaks the same contract as the other peers: a real
//! tokio-tungstenite client completes the handshake (with and without `tether.v1`), gets
//! its welcome, a pong, a broadcast frame, a push and a request, and a clean close; raw
//! bytes check the refusals a server owes (bad upgrade, unmasked frame).

use std::{process::Stdio, time::Duration};

use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use tether_protocol::{AgentMessage, GatewayMessage, SUBPROTOCOL};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const LIMIT: Duration = Duration::from_secs(10);

async fn start() -> (Child, std::net::SocketAddr) {
    start_with(&[]).await
}

async fn start_with(env: &[(&str, &str)]) -> (Child, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peer-limit"))
        .env("PORT", "0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("peer-limit starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(LIMIT, lines.next_line())
        .await
        .expect("listening in time")
        .unwrap()
        .expect("a listening line");
    let (ws, control) = tether_bench::target::parse_listening(&line).expect("listening line");
    assert_eq!(ws, control, "one port serves both");
    (child, ws)
}

async fn connect(addr: std::net::SocketAddr, id: &str, offer: bool) -> (Ws, Option<String>) {
    let mut request = format!("ws://{addr}/ws?id={id}")
        .into_client_request()
        .unwrap();
    if offer {
        request.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    // tungstenite checks Sec-WebSocket-Accept (and that an offered protocol is answered).
    let (ws, response) = tokio::time::timeout(LIMIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(response.status(), 101);
    let protocol = response
        .headers()
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, protocol)
}

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(LIMIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => text.as_str().to_owned(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

fn push_data(text: &str) -> String {
    match GatewayMessage::decode(text) {
        Ok(GatewayMessage::Push { data, .. }) => data.get().to_owned(),
        other => panic!("expected a push, got {other:?} from {text}"),
    }
}

#[tokio::test]
async fn handshake_ping_broadcast_push_request_close() {
    let (_child, addr) = start().await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");

    let (mut a, protocol) = connect(addr, "agent-1", true).await;
    assert_eq!(
        protocol.as_deref(),
        Some(SUBPROTOCOL),
        "offered protocol echoed"
    );
    let welcome = next_text(&mut a).await;
    assert!(
        welcome.contains(r#""type":"welcome""#) && welcome.contains(r#""agent_id":"agent-1""#),
        "{welcome}"
    );
    let (mut b, protocol) = connect(addr, "agent-2", false).await;
    assert_eq!(protocol, None, "no protocol answered when none was offered");
    next_text(&mut b).await;

    // Ping → pong with the same payload.
    a.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    match tokio::time::timeout(LIMIT, a.next()).await {
        Ok(Some(Ok(Message::Pong(payload)))) => assert_eq!(&payload[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }

    // Broadcast: one frame to every socket.
    let reply = http
        .post(url("/broadcast"))
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    assert_eq!(reply.text().await.unwrap(), r#"{"delivered":2}"#);
    assert_eq!(push_data(&next_text(&mut a).await), r#"{"n":1}"#);
    assert_eq!(push_data(&next_text(&mut b).await), r#"{"n":1}"#);

    // A broadcast larger than one 126-byte length form, to the same sockets.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(70_000));
    let reply = http
        .post(url("/broadcast"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    assert_eq!(push_data(&next_text(&mut a).await), big);
    assert_eq!(push_data(&next_text(&mut b).await), big);

    // Push to one agent; unknown agents are 404.
    let reply = http
        .post(url("/push/agent-2"))
        .body(r#""hello""#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    assert_eq!(push_data(&next_text(&mut b).await), r#""hello""#);
    let reply = http
        .post(url("/push/agent-9"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 404);

    // Request: the agent's response answers the HTTP call.
    let call = tokio::spawn(
        http.post(url("/request/agent-1?timeout_ms=5000"))
            .body(r#"{"q":42}"#)
            .send(),
    );
    let text = next_text(&mut a).await;
    let Ok(GatewayMessage::Request { id, data, .. }) = GatewayMessage::decode(&text) else {
        panic!("expected a request, got {text}");
    };
    assert_eq!(data.get(), r#"{"q":42}"#);
    let answer = serde_json::value::RawValue::from_string(r#"{"a":42}"#.into()).unwrap();
    a.send(Message::text(
        AgentMessage::Response {
            id,
            result: Ok(answer),
        }
        .encode(),
    ))
    .await
    .unwrap();
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.text().await.unwrap(), r#"{"a":42}"#);

    // A request nobody answers times out.
    let reply = http
        .post(url("/request/agent-2?timeout_ms=100"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 504);
    next_text(&mut b).await;

    // Close: the code is echoed and the stream ends.
    a.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .unwrap();
    match tokio::time::timeout(LIMIT, a.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close echo, got {other:?}"),
    }
    let stats = http
        .get(url("/stats"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(stats, r#"{"connections":1}"#);
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(LIMIT, tcp.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    buf.truncate(n);
    (tcp, buf)
}

#[tokio::test]
async fn refuses_bad_upgrades_and_unmasked_frames() {
    let (_child, addr) = start().await;

    // No Sec-WebSocket-Key: 400, no upgrade.
    let (_, reply) = raw(
        addr,
        b"GET /ws?id=x HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await;
    assert!(
        reply.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // A request split across writes still completes; then an unmasked frame fails the
    // connection with 1002.
    let head = b"GET /ws?id=raw HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: keep-alive, Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&head[..40]).await.unwrap();
    tcp.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(&head[40..]).await.unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(LIMIT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the 101");
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // RFC 6455's own example key and accept value.
    assert!(
        text.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{text}"
    );
    tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, tcp.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap();
    reply.extend_from_slice(&rest);
    let close = [0x88, 0x02, 0x03, 0xea];
    assert!(
        reply.windows(4).any(|w| w == close),
        "expected close 1002 in {reply:?}"
    );
}

/// With `PING_INTERVAL_SECONDS` the floor pings every connection once per interval and
/// reads the pongs (tungstenite answers them), so each connection keeps being pinged.
#[tokio::test]
async fn the_floor_pings_each_connection_every_interval_when_asked() {
    let (_child, addr) = start_with(&[("PING_INTERVAL_SECONDS", "1")]).await;
    let (mut ws, _) = connect(addr, "pinged", false).await;
    assert!(next_text(&mut ws).await.contains("welcome"));
    let mut pings = 0;
    while pings < 3 {
        match tokio::time::timeout(LIMIT, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    ws.close(None).await.unwrap();
}

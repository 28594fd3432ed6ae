//! What every adversarial case shares: a canary agent, the RSS bound and raw sockets.

use std::net::SocketAddr;

use serde_json::json;
use tether_protocol::GatewayMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;

/// Resident memory of this test process may not exceed this (MiB). Generous: a case
/// that leaks per frame or per connection blows far past it; a healthy one stays at a
/// few tens of MiB.
pub const RSS_BOUND_MIB: u64 = 256;

/// Resident set size of this process, in MiB.
pub fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line");
    kib / 1024
}

/// A gateway with a canary agent connected to it.
pub struct Arena {
    pub gw: TestGateway,
    pub canary: Ws,
    pushes: u32,
    /// The API key the canary's pushes use.
    key: String,
}

impl Arena {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut tether_config::GatewayConfig)) -> Self {
        Self::start_with_key(API_KEY, tweak).await
    }

    /// A gateway whose key file (set by `tweak`) holds `key` with the `push` scope.
    pub async fn start_with_key(
        key: &str,
        tweak: impl FnOnce(&mut tether_config::GatewayConfig),
    ) -> Self {
        let gw = TestGateway::start_with(tweak).await;
        let canary = gw.agent("canary", &["canaries"]).await;
        let mut arena = Self {
            gw,
            canary,
            pushes: 0,
            key: key.to_owned(),
        };
        arena.check().await;
        arena
    }

    /// The canary still gets a push, and memory is within the bound.
    pub async fn check(&mut self) {
        self.pushes += 1;
        let n = self.pushes;
        let response = self
            .gw
            .http
            .post(self.gw.api("/v1/agents/canary/messages"))
            .bearer_auth(&self.key)
            .json(&json!({"canary": n}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "the canary's push is accepted");
        loop {
            match next_message(&mut self.canary).await {
                GatewayMessage::Push { data, .. }
                    if data.get() == format!(r#"{{"canary":{n}}}"#) =>
                {
                    break;
                }
                GatewayMessage::Push { .. } => continue,
                other => panic!("canary got {other:?}"),
            }
        }
        let rss = rss_mib();
        // Printed for the record (shown with `--no-capture`); only ever compared with
        // the generous bound.
        eprintln!("adversarial: RSS {rss} MiB after canary push {n}");
        assert!(
            rss < RSS_BOUND_MIB,
            "RSS {rss} MiB over the {RSS_BOUND_MIB} MiB bound"
        );
    }

    pub fn public(&self) -> SocketAddr {
        self.gw.gateway.public_addr()
    }

    pub fn internal(&self) -> SocketAddr {
        self.gw.gateway.internal_addr()
    }
}

/// A TCP connection with an optional small receive buffer (set before connect, so the
/// advertised window stays small).
pub async fn tcp(addr: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket.connect(addr).await.unwrap()
}

/// An upgrade request with the given extra header lines (each ending in `\r\n`).
pub fn upgrade_request(token: Option<&str>, extra: &str) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /v1/connect HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tether.v1\r\n{auth}{extra}\r\n"
    )
}

/// Reads an HTTP response head byte by byte (nothing after it is consumed); `None` if
/// the server closed first.
pub async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    };
    let complete = tokio::time::timeout(PATIENCE, read)
        .await
        .expect("an answer or a close in time");
    complete.then(|| String::from_utf8_lossy(&head).into_owned())
}

/// The status code of a response head.
pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"))
}

/// Sends `request` on a fresh connection and returns the status answered (`None`: the
/// server closed without answering).
pub async fn raw_status(addr: SocketAddr, request: &[u8]) -> Option<u16> {
    let mut stream = tcp(addr, None).await;
    stream.write_all(request).await.unwrap();
    read_head(&mut stream).await.map(|h| status_of(&h))
}

/// Waits until the server closes `stream` (EOF or reset), discarding what it sends.
pub async fn closed_by_server(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("the server closes the connection");
}

/// A masked client frame (RFC 6455 §5.2) built by hand, so a test can send what no
/// well-behaved client library would.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len < 65_536 {
        frame.push(0x80 | 126);
        frame.extend((len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend((len as u64).to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Upgrades a raw TCP connection with a valid token for `sub`; returns it after the 101.
pub async fn raw_agent(addr: SocketAddr, sub: &str, recv_buffer: Option<u32>) -> TcpStream {
    let mut stream = tcp(addr, recv_buffer).await;
    stream
        .write_all(upgrade_request(Some(&token(sub, &[], 3600)), "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("an answer");
    assert_eq!(status_of(&head), 101, "{head}");
    stream
}

/// Reads server frames (unmasked) until a close frame; returns its code (`None`: the
/// connection ended without one).
pub async fn raw_close_code(stream: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.ok()?;
            let opcode = head[0] & 0x0f;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    stream.read_exact(&mut b).await.ok()?;
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    stream.read_exact(&mut b).await.ok()?;
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; len as usize];
            stream.read_exact(&mut payload).await.ok()?;
            if opcode == 8 {
                return Some(
                    payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
                );
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a close in time")
}

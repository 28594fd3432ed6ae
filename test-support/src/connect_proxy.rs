//! An HTTP CONNECT proxy on 127.0.0.1 for the SDKs' proxy support: requires Basic
//! credentials when given (407 otherwise), resolves `gateway.test` to 127.0.0.1 itself
//! (so reaching that name proves the tunnel was used), and records every CONNECT
//! target, tunnel and refusal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The name the proxy resolves to 127.0.0.1 (no resolver knows it).
pub const PROXIED_HOST: &str = "gateway.test";

/// A running CONNECT proxy (it lives as long as the test's runtime).
pub struct ConnectProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Seen>,
}

#[derive(Default)]
struct Seen {
    tunnels: AtomicUsize,
    refused: AtomicUsize,
    targets: Mutex<Vec<String>>,
}

impl ConnectProxy {
    /// Starts a proxy; with `credentials` (`user:password`) it requires them.
    pub async fn start(credentials: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy binds");
        let addr = listener.local_addr().expect("the proxy's address");
        let expected = credentials.map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(tunnel(client, expected.clone(), shared.clone()));
            }
        });
        Self { addr, seen }
    }

    /// Every CONNECT target asked for, in order.
    pub fn targets(&self) -> Vec<String> {
        self.seen.targets.lock().clone()
    }

    /// Tunnels opened.
    pub fn tunnels(&self) -> usize {
        self.seen.tunnels.load(Ordering::SeqCst)
    }

    /// Requests refused for missing or wrong credentials.
    pub fn refused(&self) -> usize {
        self.seen.refused.load(Ordering::SeqCst)
    }
}

/// Serves one client: reads the request head, checks it, then copies both ways.
async fn tunnel(mut client: TcpStream, expected: Option<String>, seen: Arc<Seen>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request = lines.next().unwrap_or_default().to_owned();
    let target = request.split(' ').nth(1).unwrap_or_default().to_owned();
    seen.targets.lock().push(target.clone());
    let auth = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, v)| v.trim().to_owned());
    if !request.starts_with("CONNECT ") {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await;
        return;
    }
    if expected.is_some() && auth != expected {
        seen.refused.fetch_add(1, Ordering::SeqCst);
        let _ = client
            .write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
            )
            .await;
        return;
    }
    let (host, port) = target.rsplit_once(':').unwrap_or((&target, "443"));
    let host = if host == PROXIED_HOST {
        "127.0.0.1"
    } else {
        host
    };
    let Ok(mut upstream) = TcpStream::connect(format!("{host}:{port}")).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    seen.tunnels.fetch_add(1, Ordering::SeqCst);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

//! A load worker: a child process of the bench (`tether-bench worker`) that holds its
//! share of the agent connections (at most ~19,000: the per-process fd limit). It reads
//! one [`Job`] line and then [`Cmd`] lines on stdin, and writes [`Event`] lines on
//! stdout. Connections bind their source address inside 127.0.0.0/8, so that ephemeral
//! ports of one address never run out.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use serde::{Deserialize, Serialize};
use tether_protocol::{AgentMessage, GatewayMessage, SUBPROTOCOL};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{TcpSocket, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, protocol::WebSocketConfig},
};

use crate::stats::{Hist, unix_nanos};

/// What one worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Worker number (selects its block of source addresses).
    pub index: u32,
    /// Global agent numbers `[first, first + count)`.
    pub first: u64,
    /// How many connections.
    pub count: u64,
    /// Agent-id prefix (`{prefix}{n}`).
    pub prefix: String,
    /// WebSocket addresses of the shards; agent `n` goes to `shards[n % len]`.
    pub shards: Vec<SocketAddr>,
    /// Tether: the HS256 secret to mint tokens with; peers: `None` (no auth).
    pub secret: Option<String>,
    /// Connections opened per second by this worker.
    pub rate: f64,
    /// Handshakes in flight at most.
    pub concurrency: usize,
    /// Tether: the WebSocket path (`/v1/connect` when absent).
    #[serde(default)]
    pub path: Option<String>,
    /// Tether: the `tenant` claim of minted tokens.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Reconnect when the server closes a connection (after its `reconnect` hint's
    /// delay, else a short jittered back-off), as agents do: an external pool drains
    /// and rebalances under the load. Started targets never close, so it stays off.
    #[serde(default)]
    pub reconnect: bool,
}

/// A command from the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Report and reset the delivery counters.
    Report,
    /// Close this fraction of connections at once and reconnect them.
    Churn {
        /// 0..=1.
        fraction: f64,
    },
    /// Exit.
    Stop,
}

/// An event for the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every connection attempt finished.
    Connected {
        /// Sessions open (welcome received).
        ok: u64,
        /// Failed attempts, by cause.
        failed: BTreeMap<String, u64>,
        /// Seconds from the first attempt to the last result.
        elapsed_s: f64,
        /// Handshake (TCP + upgrade + auth + welcome) latency, encoded [`Hist`].
        handshake: String,
    },
    /// Deliveries since the last report.
    Report {
        /// Pushes received.
        pushes: u64,
        /// Requests answered.
        requests: u64,
        /// Push latency (send time in the payload to receipt), encoded [`Hist`].
        latency: String,
        /// Unix ns of the last push received (0 if none).
        last_ns: u64,
        /// Connections open now.
        open: u64,
        /// Connections the server closed since the start.
        dropped: u64,
        /// Pings answered since the last report (0 where the client cannot see them).
        #[serde(default)]
        pings: u64,
    },
    /// A churn finished.
    Churned {
        /// Connections closed.
        closed: u64,
        /// Of those, back with a new session.
        back: u64,
        /// Seconds from the close to the last one back.
        elapsed_s: f64,
        /// Close-to-welcome time of each reconnect, encoded [`Hist`].
        reconnect: String,
    },
}

/// Counters shared by the connection tasks of one worker.
#[derive(Default)]
struct Shared {
    latency: Mutex<Hist>,
    pushes: AtomicU64,
    requests: AtomicU64,
    last_ns: AtomicU64,
    open: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
}

type Ws = WebSocketStream<TcpStream>;

/// Everything a connection needs to (re)connect.
#[derive(Clone)]
struct Target {
    shards: Arc<Vec<SocketAddr>>,
    prefix: Arc<str>,
    minter: Option<Arc<tether_agent::Hs256Minter>>,
    index: u32,
    path: Arc<str>,
    reconnect: bool,
}

impl Target {
    fn source(&self, n: u64) -> Ipv4Addr {
        // 127.<10+worker>.<a>.<b>: ~62,000 source addresses per worker, each used by a
        // handful of sockets, so ephemeral ports never run short.
        let a = ((n / 250) % 250) as u8;
        let b = (n % 250) as u8 + 1;
        Ipv4Addr::new(127, 10 + (self.index % 200) as u8, a, b)
    }

    async fn connect(&self, n: u64) -> Result<Ws, String> {
        let dst = self.shards[(n % self.shards.len() as u64) as usize];
        let agent = format!("{}{n}", self.prefix);
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {}", e.kind()))?;
        socket
            .bind(SocketAddr::new(self.source(n).into(), 0))
            .map_err(|e| format!("bind: {}", e.kind()))?;
        let tcp = socket
            .connect(dst)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = tcp.set_nodelay(true);
        let url = match &self.minter {
            Some(_) => format!("ws://{dst}{}", self.path),
            None => format!("ws://{dst}/ws?id={agent}"),
        };
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        if let Some(minter) = &self.minter {
            let token = minter.mint_for(&agent).map_err(|e| e.to_string())?;
            let headers = request.headers_mut();
            headers.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?,
            );
            headers.insert(
                http::header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        // Small client buffers: the bench holds tens of thousands of sockets itself.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    format!("http {}", r.status().as_u16())
                }
                other => format!("handshake: {other}"),
            })?;
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"welcome\"") => Ok(ws),
            Ok(Some(Ok(Message::Close(frame)))) => Err(format!(
                "closed {}",
                frame.map(|f| u16::from(f.code)).unwrap_or(1005)
            )),
            Ok(_) => Err("no welcome".into()),
            Err(_) => Err("welcome timeout".into()),
        }
    }
}

/// Runs a worker: reads the job from stdin, serves commands until `stop`.
pub async fn run() -> anyhow::Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let job: Job = serde_json::from_str(&stdin.next_line().await?.context("no job on stdin")?)?;
    let minter = job.secret.as_ref().map(|s| {
        let mut minter = tether_agent::Hs256Minter::new(s.as_bytes(), "bench");
        minter.tenant = job.tenant.clone();
        Arc::new(minter)
    });
    let target = Target {
        shards: Arc::new(job.shards.clone()),
        prefix: job.prefix.clone().into(),
        minter,
        index: job.index,
        path: job.path.as_deref().unwrap_or("/v1/connect").into(),
        reconnect: job.reconnect,
    };
    let shared = Arc::new(Shared::default());
    // (generation, fraction, sender of per-connection churn results)
    let (churn_tx, churn_rx) = watch::channel(ChurnOrder::default());
    let (result_tx, mut result_rx) = tokio::sync::mpsc::unbounded_channel::<ConnectResult>();

    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(job.concurrency.max(1)));
    let period = Duration::from_secs_f64(1.0 / job.rate.max(0.001));
    let opener = {
        let target = target.clone();
        let shared = shared.clone();
        let job = job.clone();
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now();
            for n in job.first..job.first + job.count {
                tokio::time::sleep_until(next).await;
                next += period;
                let permit = gate.clone().acquire_owned().await.expect("semaphore open");
                let conn = Conn {
                    n,
                    target: target.clone(),
                    shared: shared.clone(),
                    churn: churn_rx.clone(),
                    results: result_tx.clone(),
                };
                tokio::spawn(conn.run(permit));
            }
        })
    };
    let mut handshake = Hist::default();
    let mut failed = BTreeMap::new();
    let mut ok = 0;
    for _ in 0..job.count {
        match result_rx.recv().await.context("connections vanished")? {
            ConnectResult::Opened(us) => {
                ok += 1;
                handshake.record_us(us);
            }
            ConnectResult::Failed(cause) => *failed.entry(cause).or_insert(0) += 1,
            ConnectResult::Back(_) | ConnectResult::GaveUp => {}
        }
    }
    opener.await?;
    emit(&Event::Connected {
        ok,
        failed,
        elapsed_s: started.elapsed().as_secs_f64(),
        handshake: handshake.encode(),
    });

    while let Some(line) = stdin.next_line().await? {
        match serde_json::from_str::<Cmd>(&line)? {
            Cmd::Stop => break,
            Cmd::Report => {
                let latency = std::mem::take(&mut *shared.latency.lock().expect("lock"));
                emit(&Event::Report {
                    pushes: shared.pushes.swap(0, Ordering::Relaxed),
                    requests: shared.requests.swap(0, Ordering::Relaxed),
                    latency: latency.encode(),
                    last_ns: shared.last_ns.swap(0, Ordering::Relaxed),
                    open: shared.open.load(Ordering::Relaxed),
                    dropped: shared.dropped.load(Ordering::Relaxed),
                    pings: shared.pings.swap(0, Ordering::Relaxed),
                });
            }
            Cmd::Churn { fraction } => {
                let closed = job_share(&job, fraction);
                let start = Instant::now();
                churn_tx.send_modify(|order| {
                    order.generation += 1;
                    order.fraction = fraction;
                });
                let mut reconnect = Hist::default();
                let mut back = 0;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let mut done = 0;
                while done < closed {
                    match tokio::time::timeout_at(deadline, result_rx.recv()).await {
                        Ok(Some(ConnectResult::Back(us))) => {
                            back += 1;
                            done += 1;
                            reconnect.record_us(us);
                        }
                        Ok(Some(ConnectResult::GaveUp)) => done += 1,
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                emit(&Event::Churned {
                    closed,
                    back,
                    elapsed_s: start.elapsed().as_secs_f64(),
                    reconnect: reconnect.encode(),
                });
            }
        }
    }
    Ok(())
}

fn emit(event: &Event) {
    println!(
        "{}",
        serde_json::to_string(event).expect("events serialize")
    );
}

/// Whether connection `n` is in the churned fraction (a fixed, well-spread subset).
pub(crate) fn churned(n: u64, fraction: f64) -> bool {
    let bucket = n.wrapping_mul(2_654_435_761) % 10_000;
    (bucket as f64) < fraction * 10_000.0
}

fn job_share(job: &Job, fraction: f64) -> u64 {
    (job.first..job.first + job.count)
        .filter(|n| churned(*n, fraction))
        .count() as u64
}

#[derive(Debug, Clone, Copy, Default)]
struct ChurnOrder {
    generation: u64,
    fraction: f64,
}

enum ConnectResult {
    Opened(u64),
    Failed(String),
    Back(u64),
    GaveUp,
}

struct Conn {
    n: u64,
    target: Target,
    shared: Arc<Shared>,
    churn: watch::Receiver<ChurnOrder>,
    results: tokio::sync::mpsc::UnboundedSender<ConnectResult>,
}

impl Conn {
    async fn run(mut self, permit: tokio::sync::OwnedSemaphorePermit) {
        let started = Instant::now();
        let mut ws =
            tokio::time::timeout(Duration::from_secs(60), self.target.connect(self.n)).await;
        // An external pool refuses some upgrades while it scales (503 from a pod that is
        // shedding, no Ready pod for a moment): retry as an agent would, for a minute.
        while self.target.reconnect
            && !matches!(ws, Ok(Ok(_)))
            && started.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(250) + rand_upto(Duration::from_secs(1)))
                .await;
            ws = tokio::time::timeout(Duration::from_secs(30), self.target.connect(self.n)).await;
        }
        drop(permit);
        let mut ws = match ws {
            Ok(Ok(ws)) => {
                let _ = self
                    .results
                    .send(ConnectResult::Opened(started.elapsed().as_micros() as u64));
                ws
            }
            Ok(Err(cause)) => {
                let _ = self.results.send(ConnectResult::Failed(cause));
                return;
            }
            Err(_) => {
                let _ = self.results.send(ConnectResult::Failed("timeout".into()));
                return;
            }
        };
        self.churn.borrow_and_update();
        loop {
            self.shared.open.fetch_add(1, Ordering::Relaxed);
            let ended = self.serve(&mut ws).await;
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            let Ended::Churned = ended else {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                if !self.target.reconnect {
                    return;
                }
                // The server closed it (drain, rebalancing): come back as an agent does,
                // after the hint's delay (already jittered by the server) or a short
                // jittered pause, through the same address.
                let mut pause = match ended {
                    Ended::Server { hint: Some(hint) } => hint,
                    _ => rand_upto(Duration::from_millis(500)),
                };
                ws = loop {
                    tokio::time::sleep(pause).await;
                    match tokio::time::timeout(Duration::from_secs(30), self.target.connect(self.n))
                        .await
                    {
                        Ok(Ok(ws)) => break ws,
                        _ => pause = Duration::from_millis(250) + rand_upto(Duration::from_secs(2)),
                    }
                };
                continue;
            };
            // Churn: reconnect at once (the storm's worst case), retrying briefly on failure.
            let closed_at = Instant::now();
            let mut retry = Duration::from_millis(50);
            ws = loop {
                match tokio::time::timeout(Duration::from_secs(30), self.target.connect(self.n))
                    .await
                {
                    Ok(Ok(ws)) => break ws,
                    _ if closed_at.elapsed() > Duration::from_secs(90) => {
                        let _ = self.results.send(ConnectResult::GaveUp);
                        return;
                    }
                    _ => {
                        tokio::time::sleep(rand_upto(retry)).await;
                        retry = (retry * 2).min(Duration::from_secs(2));
                    }
                }
            };
            let _ = self
                .results
                .send(ConnectResult::Back(closed_at.elapsed().as_micros() as u64));
        }
    }

    /// Serves one session until the churn order or the server ends it.
    async fn serve(&mut self, ws: &mut Ws) -> Ended {
        let mut hint = None;
        loop {
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        hint = self.on_text(ws, text.as_str()).await.or(hint);
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        return Ended::Server { hint };
                    }
                    Some(Ok(Message::Ping(_))) => {
                        // tungstenite queues the pong itself.
                        self.shared.pings.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                },
                changed = self.churn.changed() => {
                    if changed.is_err() {
                        return Ended::Server { hint };
                    }
                    let order = *self.churn.borrow_and_update();
                    if churned(self.n, order.fraction) {
                        let _ = ws.close(None).await;
                        return Ended::Churned;
                    }
                }
            }
        }
    }

    /// Handles one text frame; returns the delay of a `reconnect` hint.
    async fn on_text(&self, ws: &mut Ws, text: &str) -> Option<Duration> {
        match GatewayMessage::decode(text) {
            Ok(GatewayMessage::Reconnect { after_ms, .. }) => {
                return Some(Duration::from_millis(after_ms));
            }
            Ok(GatewayMessage::Push { data, .. }) => {
                let now = unix_nanos();
                if let Some(sent) = probe_time(data.get()) {
                    self.shared
                        .latency
                        .lock()
                        .expect("lock")
                        .record_us(now.saturating_sub(sent) / 1000);
                }
                self.shared.pushes.fetch_add(1, Ordering::Relaxed);
                self.shared.last_ns.fetch_max(now, Ordering::Relaxed);
            }
            Ok(GatewayMessage::Request { id, data, .. }) => {
                let response = AgentMessage::Response {
                    id,
                    result: Ok(data),
                };
                let _ = ws.send(Message::text(response.encode())).await;
                self.shared.requests.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        None
    }
}

/// How a session ended.
enum Ended {
    /// The churn order closed it.
    Churned,
    /// The server closed it (or the socket failed), after a `reconnect` hint or not.
    Server { hint: Option<Duration> },
}

/// Reads the send time `t` (Unix ns) from a bench payload `{"t":...}`.
pub fn probe_time(data: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Probe {
        t: u64,
    }
    serde_json::from_str::<Probe>(data).ok().map(|p| p.t)
}

fn rand_upto(max: Duration) -> Duration {
    use rand::Rng;
    Duration::from_millis(rand::rng().random_range(0..=max.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_selects_about_the_fraction() {
        let picked = (0..100_000u64).filter(|n| churned(*n, 0.25)).count();
        assert!((24_000..26_000).contains(&picked), "{picked}");
        assert_eq!((0..1000u64).filter(|n| churned(*n, 0.0)).count(), 0);
        assert_eq!((0..1000u64).filter(|n| churned(*n, 1.0)).count(), 1000);
    }

    #[test]
    fn probe_time_reads_the_payload() {
        assert_eq!(probe_time(r#"{"t":123,"pad":"xx"}"#), Some(123));
        assert_eq!(probe_time(r#"{"x":1}"#), None);
    }

    #[test]
    fn worker_protocol_round_trips() {
        let cmd: Cmd = serde_json::from_str(r#"{"cmd":"churn","fraction":0.5}"#).unwrap();
        assert!(matches!(cmd, Cmd::Churn { fraction } if fraction == 0.5));
        let text = serde_json::to_string(&Cmd::Report).unwrap();
        assert_eq!(text, r#"{"cmd":"report"}"#);
    }
}

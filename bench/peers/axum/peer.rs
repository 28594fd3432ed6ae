//! The Rust peer: a minimal push/echo server on axum + tokio-tungstenite, speaking the
//! bench's peer contract (see `docs/benchmarks.md`). `main.rs` runs it with every
//! default (the naive baseline); `tuned.rs` with a 1 KiB read buffer, no write buffer and
//! mimalloc (the carefully tuned baseline).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{
        Path, Query, State, WebSocketUpgrade,
        ws::{Message, WebSocket},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

/// Buffer knobs of the upgrade; `None` keeps axum's default.
#[derive(Clone, Copy, Default)]
pub struct Tuning {
    /// Read buffer per connection.
    pub read_buffer: Option<usize>,
    /// Write buffer per connection.
    pub write_buffer: Option<usize>,
}

#[derive(Default)]
struct Peer {
    tuning: Tuning,
    conns: Mutex<HashMap<String, mpsc::UnboundedSender<Message>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<String>>>,
    next_id: AtomicU64,
}

type Shared = Arc<Peer>;

/// Binds `127.0.0.1:$PORT` (0 by default), prints the contract's `listening` line and serves.
pub async fn run(tuning: Tuning) {
    let port = std::env::var("PORT").unwrap_or_else(|_| "0".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let state = Arc::new(Peer {
        tuning,
        ..Peer::default()
    });
    let app = Router::new()
        .route("/ws", get(upgrade))
        .route("/push/{id}", post(push))
        .route("/request/{id}", post(request))
        .route("/broadcast", post(broadcast))
        .route("/stats", get(stats))
        .with_state(state);
    println!("listening ws={addr} control={addr}");
    axum::serve(listener, app).await.expect("serve");
}

async fn upgrade(
    ws: WebSocketUpgrade,
    Query(q): Query<HashMap<String, String>>,
    State(peer): State<Shared>,
) -> Response {
    let id = q.get("id").cloned().unwrap_or_default();
    let mut ws = ws;
    if let Some(n) = peer.tuning.read_buffer {
        ws = ws.read_buffer_size(n);
    }
    if let Some(n) = peer.tuning.write_buffer {
        ws = ws.write_buffer_size(n);
    }
    ws.on_upgrade(move |socket| connection(socket, id, peer))
}

async fn connection(socket: WebSocket, id: String, peer: Shared) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let welcome = format!(r#"{{"type":"welcome","agent_id":"{id}"}}"#);
    if sink.send(Message::text(welcome)).await.is_err() {
        return;
    }
    peer.conns.lock().unwrap().insert(id.clone(), tx.clone());
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(message) => if sink.send(message).await.is_err() { break },
                None => break,
            },
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => on_text(&peer, text.as_str()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let mut conns = peer.conns.lock().unwrap();
    if conns
        .get(&id)
        .is_some_and(|current| current.same_channel(&tx))
    {
        conns.remove(&id);
    }
}

fn on_text(peer: &Peer, text: &str) {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: Option<String>,
        data: Option<&'a serde_json::value::RawValue>,
    }
    if let Ok(env) = serde_json::from_str::<Envelope>(text)
        && env.kind == "response"
        && let Some(id) = env.id
        && let Some(waiter) = peer.pending.lock().unwrap().remove(&id)
    {
        let _ = waiter.send(
            env.data
                .map(|d| d.get().to_owned())
                .unwrap_or_else(|| "null".into()),
        );
    }
}

fn envelope(kind: &str, id: u64, data: &[u8]) -> Option<String> {
    let data = std::str::from_utf8(data).ok()?;
    Some(format!(r#"{{"type":"{kind}","id":"{id}","data":{data}}}"#))
}

async fn push(State(peer): State<Shared>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    let n = peer.next_id.fetch_add(1, Ordering::Relaxed);
    let Some(text) = envelope("push", n, &body) else {
        return StatusCode::BAD_REQUEST;
    };
    let tx = peer.conns.lock().unwrap().get(&id).cloned();
    match tx.map(|tx| tx.send(Message::text(text))) {
        Some(Ok(())) => StatusCode::ACCEPTED,
        _ => StatusCode::NOT_FOUND,
    }
}

async fn broadcast(State(peer): State<Shared>, body: Bytes) -> Response {
    let n = peer.next_id.fetch_add(1, Ordering::Relaxed);
    let Some(text) = envelope("push", n, &body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    // Encoded once; each socket gets a cheap clone of the same bytes.
    let message = Message::text(text);
    let conns: Vec<_> = peer.conns.lock().unwrap().values().cloned().collect();
    let delivered = conns
        .iter()
        .filter(|tx| tx.send(message.clone()).is_ok())
        .count();
    (
        StatusCode::ACCEPTED,
        format!(r#"{{"delivered":{delivered}}}"#),
    )
        .into_response()
}

async fn request(
    State(peer): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let timeout_ms: u64 = q
        .get("timeout_ms")
        .and_then(|t| t.parse().ok())
        .unwrap_or(5000);
    let n = peer.next_id.fetch_add(1, Ordering::Relaxed);
    let Some(text) = envelope("request", n, &body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(tx) = peer.conns.lock().unwrap().get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (waiter, answer) = oneshot::channel();
    peer.pending.lock().unwrap().insert(n.to_string(), waiter);
    if tx.send(Message::text(text)).is_err() {
        peer.pending.lock().unwrap().remove(&n.to_string());
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::time::timeout(Duration::from_millis(timeout_ms), answer).await {
        Ok(Ok(data)) => (StatusCode::OK, data).into_response(),
        _ => {
            peer.pending.lock().unwrap().remove(&n.to_string());
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

async fn stats(State(peer): State<Shared>) -> String {
    format!(r#"{{"connections":{}}}"#, peer.conns.lock().unwrap().len())
}

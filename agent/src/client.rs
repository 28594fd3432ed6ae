//! The public [`Agent`] handle and the task that owns the socket.
//!
//! ```text
//!  Agent (Clone) --Command (bounded mpsc, oneshot reply)--> Core task --WebSocket--> gateway
//!                                                           |   ^
//!               push handler task <--PushJob (bounded)------+   | Internal (acks, responses,
//!               request handler tasks (one per request) ---------+  refreshed tokens)
//! ```
//!
//! The core task is the only owner of the socket and of the pending maps, so there are
//! no locks: a `send` is a map entry until the gateway acks it, and every map entry is
//! re-sent on the next session after a reconnect. Pushes run on one handler task in
//! arrival order; requests each run on their own task so a slow answer does not hold up
//! pushes.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use http::{HeaderValue, header};
use serde::{Serialize, de::DeserializeOwned};
use tether_protocol::{
    AgentMessage, ErrorBody, ErrorCode, GatewayMessage, RawValue, SUBPROTOCOL, Welcome,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Instant, sleep_until, timeout},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        client::IntoClientRequest,
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode as WsCloseCode},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    policy::{self, Decision, Ended, ReconnectPolicy, StopReason},
    token::{BoxFuture, TokenError, TokenProvider, unix_now},
    transport::{Proxy, Stream, TlsOptions, Transport},
};

type Ws = WebSocketStream<Stream>;
type Sink = SplitSink<Ws, Message>;

/// Errors returned by the [`Agent`] handle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not a valid `ws://` or `wss://` URL.
    #[error("invalid gateway url `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The payload could not be serialized as JSON.
    #[error("payload is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// No `response` arrived before the timeout.
    #[error("request timed out")]
    Timeout,
    /// The gateway or upstream refused the message for good (bad shape, too large).
    #[error("refused by the gateway ({:?}): {}", .0.code, .0.message)]
    Rejected(ErrorBody),
    /// The upstream answered the request with an error.
    #[error("the upstream answered with an error ({:?}): {}", .0.code, .0.message)]
    Upstream(ErrorBody),
    /// The TLS or proxy settings cannot be used (a certificate file that is missing or
    /// holds no certificate, a key that does not match, a proxy URL that is not
    /// `http://`, no trusted CA at all).
    #[error("cannot set up the connection: {0}")]
    Transport(String),
    /// The agent stopped (closed, or a terminal auth failure) before the call completed.
    #[error("agent stopped: {0}")]
    Stopped(StopReason),
}

/// Tuning of the connection loop. The defaults suit a production agent.
#[derive(Debug, Clone)]
pub struct Options {
    /// Reconnect back-off and overload floor.
    pub reconnect: ReconnectPolicy,
    /// Deadline for TCP connect + upgrade + `welcome`.
    pub connect_timeout: Duration,
    /// How often the agent pings the gateway.
    pub ping_interval: Duration,
    /// How long after a ping, with no frame at all from the gateway, it counts as dead.
    pub pong_timeout: Duration,
    /// A `send` with neither `ack` nor `nack` after this long is sent again.
    pub ack_timeout: Duration,
    /// Refresh the token this long before it expires (at most half its remaining life).
    pub refresh_margin: Duration,
    /// Timeout of [`Agent::request`].
    pub request_timeout: Duration,
    /// A session shorter than this does not reset the back-off: a gateway that accepts
    /// and then closes at once must not cause a tight reconnect loop.
    pub stable_after: Duration,
    /// Capacity of the command queue between handles and the core task.
    pub command_queue: usize,
    /// Capacity of the queue of pushes waiting for the push handler.
    pub push_queue: usize,
    /// Ids of recently handled pushes remembered for de-duplication: a push whose id
    /// is among them is acknowledged (if asked) without calling the handler again.
    /// Durable pushes are redelivered after a reconnect when their `ack` was lost.
    pub dedup_window: usize,
    /// Read buffer of the socket (tungstenite's default is 128 KiB).
    pub read_buffer_bytes: usize,
    /// Whether a `send` refused with `unavailable` (nothing upstream receives agent
    /// messages) is retried like other transient refusals. A long-running agent keeps
    /// retrying (the pool may get an upstream later); a one-shot tool sets `false` to
    /// fail the send at once with the gateway's reason ([`Error::Rejected`]).
    pub retry_unavailable: bool,
    /// TLS of `wss://` URLs: extra CA file and client certificate (the system roots,
    /// with `SSL_CERT_FILE`/`SSL_CERT_DIR`, are always trusted).
    pub tls: TlsOptions,
    /// The HTTP proxy to tunnel through (default: from `HTTPS_PROXY`/`HTTP_PROXY`/
    /// `NO_PROXY`).
    pub proxy: Proxy,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            reconnect: ReconnectPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            refresh_margin: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            stable_after: Duration::from_secs(5),
            command_queue: 256,
            push_queue: 64,
            dedup_window: 4096,
            read_buffer_bytes: 16 * 1024,
            retry_unavailable: true,
            tls: TlsOptions::default(),
            proxy: Proxy::FromEnv,
        }
    }
}

/// The payload of a push: JSON from a text frame, or opaque bytes from a binary frame.
#[derive(Debug, Clone)]
pub enum Payload {
    /// The `data` of a `push` envelope, exactly as the backend sent it.
    Json(Box<RawValue>),
    /// A binary frame.
    Binary(Bytes),
}

/// A message pushed by a backend.
#[derive(Debug, Clone)]
pub struct Push {
    /// The message id (`None` for binary frames, which have no envelope).
    pub id: Option<String>,
    /// The payload.
    pub payload: Payload,
}

impl Push {
    /// Deserializes a JSON payload.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.payload {
            Payload::Json(raw) => serde_json::from_str(raw.get()),
            Payload::Binary(bytes) => serde_json::from_slice(bytes),
        }
    }
}

/// A request from a backend; the handler's return value becomes the `response`.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request id.
    pub id: String,
    /// The request data.
    pub data: Box<RawValue>,
    /// How long the backend waits for the answer.
    pub timeout: Duration,
}

impl Request {
    /// Deserializes the request data.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }
}

/// The facts of the current session, from the gateway's `welcome` (and `refreshed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The agent id the gateway read from the token.
    pub agent_id: String,
    /// The gateway's id of this connection.
    pub connection_id: String,
    /// When the current token expires (Unix seconds).
    pub expires_at: Option<u64>,
    /// How many sessions this agent has had (1 for the first).
    pub number: u64,
}

/// Where the connection loop is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Connecting; `attempt` counts failures since the last stable session.
    Connecting {
        /// Consecutive failed attempts.
        attempt: u32,
    },
    /// A session is open.
    Connected(Session),
    /// Waiting before the next attempt.
    Waiting {
        /// The delay chosen by the reconnect policy.
        delay: Duration,
    },
    /// Stopped for good.
    Stopped(StopReason),
}

type PushFn = Arc<dyn Fn(Push) -> BoxFuture<'static, ()> + Send + Sync>;
type RequestFn =
    Arc<dyn Fn(Request) -> BoxFuture<'static, Result<Box<RawValue>, ErrorBody>> + Send + Sync>;

/// Configures and starts an [`Agent`].
pub struct AgentBuilder {
    url: String,
    tokens: Arc<dyn TokenProvider>,
    options: Options,
    on_push: PushFn,
    on_request: RequestFn,
}

impl AgentBuilder {
    /// Replaces the options.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// Sets the push handler. Pushes are handled one at a time, in order; a push that
    /// asked for an `ack` is acknowledged when the handler returns.
    pub fn on_push<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Push) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_push = Arc::new(move |push| Box::pin(f(push)));
        self
    }

    /// Sets the request handler; `Ok(data)` or `Err(error)` becomes the `response`.
    /// Requests run concurrently, each on its own task.
    pub fn on_request<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Box<RawValue>, ErrorBody>> + Send + 'static,
    {
        self.on_request = Arc::new(move |request| Box::pin(f(request)));
        self
    }

    /// Validates the URL and starts the connection task (on the current Tokio runtime).
    pub fn start(self) -> Result<Agent, Error> {
        let AgentBuilder {
            url,
            tokens,
            options,
            on_push,
            on_request,
        } = self;
        let uri = check_url(&url)?;
        let transport = Transport::new(&uri, &options.tls, &options.proxy, |name| {
            std::env::var(name).ok()
        })
        .map_err(Error::Transport)?;
        let request_timeout = options.request_timeout;
        let (command_tx, commands) = mpsc::channel(options.command_queue.max(1));
        let (state_tx, state) = watch::channel(State::Connecting { attempt: 0 });
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (push_tx, push_rx) = mpsc::channel(options.push_queue.max(1));
        let shutdown = CancellationToken::new();
        tokio::spawn(dispatch_pushes(
            push_rx,
            on_push,
            internal_tx.clone(),
            policy::DedupWindow::new(options.dedup_window),
        ));
        let core = Core {
            url,
            transport,
            tokens,
            options,
            on_request,
            state_tx,
            commands,
            shutdown: shutdown.clone(),
            internal_tx,
            internal_rx,
            push_tx,
            outbox: Outbox::default(),
            requests: HashMap::new(),
            epoch: 0,
        };
        let task = tokio::spawn(core.run());
        Ok(Agent {
            commands: command_tx,
            state,
            shutdown,
            task: Arc::new(tokio::sync::Mutex::new(Some(task))),
            request_timeout,
        })
    }
}

/// A handle to a running agent. Cheap to clone; every clone talks to the same task.
/// Dropping the last handle closes the agent.
#[derive(Clone)]
pub struct Agent {
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<State>,
    shutdown: CancellationToken,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("state", &*self.state.borrow())
            .finish()
    }
}

enum Command {
    Send {
        id: String,
        data: Box<RawValue>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Request {
        id: String,
        data: Box<RawValue>,
        timeout: Duration,
        reply: oneshot::Sender<Result<Box<RawValue>, Error>>,
    },
}

// === impl Agent ===

impl Agent {
    /// Starts configuring an agent for the gateway at `url`
    /// (`ws://host:port/v1/connect`).
    pub fn builder(url: impl Into<String>, tokens: impl TokenProvider) -> AgentBuilder {
        Self::builder_shared(url, Arc::new(tokens))
    }

    /// Like [`Agent::builder`] with an already shared token provider.
    pub fn builder_shared(url: impl Into<String>, tokens: Arc<dyn TokenProvider>) -> AgentBuilder {
        AgentBuilder {
            url: url.into(),
            tokens,
            options: Options::default(),
            on_push: Arc::new(|_| Box::pin(async {})),
            on_request: Arc::new(|_| {
                Box::pin(async {
                    Err(ErrorBody::new(
                        ErrorCode::HandlerError,
                        "this agent has no request handler",
                    ))
                })
            }),
        }
    }

    /// Sends `data` to the tenant's upstream and waits for its `ack`. Delivery is
    /// at-least-once: the message is re-sent (same id) across reconnects and after
    /// transient `nack`s until it is acknowledged; only a permanent refusal or the agent
    /// stopping ends it with an error.
    pub async fn send<T: Serialize + ?Sized>(&self, data: &T) -> Result<(), Error> {
        let data = serde_json::value::to_raw_value(data)?;
        self.send_raw(new_id(), data).await
    }

    /// [`Agent::send`] with a caller-chosen id (the upstream's idempotency key).
    pub async fn send_raw(&self, id: String, data: Box<RawValue>) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Send { id, data, reply }).await?;
        rx.await.unwrap_or_else(|_| Err(self.stopped_error()))
    }

    /// Asks the upstream and waits for its answer, up to the default request timeout.
    pub async fn request<T: Serialize + ?Sized>(&self, data: &T) -> Result<Box<RawValue>, Error> {
        let timeout = self.request_timeout();
        self.request_with_timeout(data, timeout).await
    }

    /// Asks the upstream and waits for its answer, up to `limit`.
    pub async fn request_with_timeout<T: Serialize + ?Sized>(
        &self,
        data: &T,
        limit: Duration,
    ) -> Result<Box<RawValue>, Error> {
        let data = serde_json::value::to_raw_value(data)?;
        let (reply, rx) = oneshot::channel();
        let fut = async {
            self.command(Command::Request {
                id: new_id(),
                data,
                timeout: limit,
                reply,
            })
            .await?;
            rx.await.unwrap_or_else(|_| Err(self.stopped_error()))
        };
        timeout(limit, fut).await.unwrap_or(Err(Error::Timeout))
    }

    /// A receiver of the connection state (for status pages, tests, readiness).
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Waits until a session is open (returns it) or the agent stopped.
    pub async fn connected(&self) -> Result<Session, Error> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| matches!(s, State::Connected(_) | State::Stopped(_)))
            .await
            .map(|s| s.clone());
        match state {
            Ok(State::Connected(session)) => Ok(session),
            Ok(State::Stopped(reason)) => Err(Error::Stopped(reason)),
            _ => Err(Error::Stopped(StopReason::Closed)),
        }
    }

    /// Closes the session (close code 1000) and waits for the task to end. Pending sends
    /// and requests fail with [`Error::Stopped`].
    pub async fn close(&self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }

    async fn command(&self, command: Command) -> Result<(), Error> {
        self.commands
            .send(command)
            .await
            .map_err(|_| self.stopped_error())
    }

    fn stopped_error(&self) -> Error {
        match &*self.state.borrow() {
            State::Stopped(reason) => Error::Stopped(reason.clone()),
            _ => Error::Stopped(StopReason::Closed),
        }
    }

    fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
}

/// Refuses, before any connection attempt, a URL no attempt could use: one that does
/// not parse, has no host, or names a scheme other than `ws`/`wss` (an `http://` URL
/// would otherwise fail the same way on every retry).
fn check_url(url: &str) -> Result<http::Uri, Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    const SHAPE: &str = "agents connect at ws://HOST:PORT/v1/connect";
    let uri: http::Uri = url.parse().map_err(|e| invalid(format!("{e}; {SHAPE}")))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        Some(other) => {
            return Err(invalid(format!(
                "the scheme must be ws:// or wss:// (got {other}://); {SHAPE}"
            )));
        }
        None => {
            return Err(invalid(format!("no scheme; {SHAPE}")));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(format!("no host; {SHAPE}")));
    }
    url.into_client_request()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(uri)
}

/// The gateway's reason from the body of a refused upgrade: the `message` of its
/// `{"error":{"code","message"}}` body, else the body's text, cut to a readable length.
fn refusal_message(body: Option<&[u8]>) -> String {
    const MAX_CHARS: usize = 300;
    let Some(body) = body.filter(|b| !b.is_empty()) else {
        return String::new();
    };
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let message = json
            .pointer("/error/message")
            .or_else(|| json.get("message"))
            .and_then(|m| m.as_str());
        if let Some(message) = message {
            return message.to_owned();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

// === the core task ===

struct PushJob {
    epoch: u64,
    push: Push,
    ack: bool,
}

enum Internal {
    /// An `ack` or `response` produced by a handler for the session `epoch`.
    Reply { epoch: u64, message: AgentMessage },
    /// A token fetched for an in-band refresh on session `epoch`.
    Token {
        epoch: u64,
        result: Result<String, TokenError>,
    },
}

/// Runs the push handler on each push in order, then acks it if asked. A push whose id
/// was handled recently (a redelivery) is acked without running the handler again; it
/// is acked only here, after every push before it, so a redelivered copy is never
/// acknowledged while its first copy's handler still runs.
async fn dispatch_pushes(
    mut rx: mpsc::Receiver<PushJob>,
    handler: PushFn,
    internal: mpsc::UnboundedSender<Internal>,
    mut handled: policy::DedupWindow,
) {
    while let Some(job) = rx.recv().await {
        let id = job.push.id.clone();
        match id.as_deref() {
            Some(seen) if handled.contains(seen) => {
                debug!(
                    id = seen,
                    "redelivered push: acknowledged, not handled again"
                );
            }
            _ => {
                handler(job.push).await;
                if let Some(id) = &id {
                    handled.insert(id);
                }
            }
        }
        if let (true, Some(id)) = (job.ack, id) {
            let _ = internal.send(Internal::Reply {
                epoch: job.epoch,
                message: AgentMessage::Ack { id },
            });
        }
    }
}

#[derive(Debug)]
enum SendState {
    /// To be written at this instant (now, or after a nack's delay).
    Due(Instant),
    /// Written; re-sent if neither ack nor nack arrives by this instant.
    InFlight(Instant),
}

struct PendingSend {
    id: String,
    data: Box<RawValue>,
    /// Everyone waiting for this id's ack (a retried `send_raw` with the same id joins).
    replies: Vec<oneshot::Sender<Result<(), Error>>>,
    state: SendState,
    nacks: u32,
}

impl PendingSend {
    fn finish(self, result: impl Fn() -> Result<(), Error>) {
        for reply in self.replies {
            let _ = reply.send(result());
        }
    }
}

/// Unacknowledged sends, in the order they were submitted.
#[derive(Default)]
struct Outbox {
    by_seq: BTreeMap<u64, PendingSend>,
    seq_of: HashMap<String, u64>,
    next_seq: u64,
}

impl Outbox {
    fn insert(
        &mut self,
        id: String,
        data: Box<RawValue>,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        if let Some(seq) = self.seq_of.get(&id) {
            // The same id submitted twice: the newer caller waits for the same ack.
            if let Some(entry) = self.by_seq.get_mut(seq) {
                entry.replies.push(reply);
            }
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.seq_of.insert(id.clone(), seq);
        self.by_seq.insert(
            seq,
            PendingSend {
                id,
                data,
                replies: vec![reply],
                state: SendState::Due(Instant::now()),
                nacks: 0,
            },
        );
    }

    fn remove(&mut self, id: &str) -> Option<PendingSend> {
        let seq = self.seq_of.remove(id)?;
        self.by_seq.remove(&seq)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut PendingSend> {
        let seq = self.seq_of.get(id)?;
        self.by_seq.get_mut(seq)
    }

    /// After a session ended, everything in flight is written again on the next one.
    fn requeue_in_flight(&mut self) {
        let now = Instant::now();
        for entry in self.by_seq.values_mut() {
            if let SendState::InFlight(_) = entry.state {
                entry.state = SendState::Due(now);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.by_seq
            .values()
            .map(|e| match e.state {
                SendState::Due(t) | SendState::InFlight(t) => t,
            })
            .min()
    }

    fn fail_all(&mut self, reason: &StopReason) {
        self.seq_of.clear();
        for (_, entry) in std::mem::take(&mut self.by_seq) {
            entry.finish(|| Err(Error::Stopped(reason.clone())));
        }
    }
}

struct PendingRequest {
    data: Box<RawValue>,
    timeout: Duration,
    deadline: Instant,
    written: bool,
    reply: oneshot::Sender<Result<Box<RawValue>, Error>>,
}

/// What ended a session or an attempt.
enum Outcome {
    Ended(Ended),
    Shutdown,
}

struct Core {
    url: String,
    transport: Transport,
    tokens: Arc<dyn TokenProvider>,
    options: Options,
    on_request: RequestFn,
    state_tx: watch::Sender<State>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    push_tx: mpsc::Sender<PushJob>,
    outbox: Outbox,
    requests: HashMap<String, PendingRequest>,
    /// Session counter; replies produced for an older session are dropped.
    epoch: u64,
}

/// Per-session timers and hints.
struct SessionClock {
    last_seen: Instant,
    last_ping: Instant,
    refresh_at: Option<Instant>,
    refresh_in_flight: bool,
    hint: Option<Duration>,
}

impl Core {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            self.state_tx.send_replace(State::Connecting { attempt });
            let outcome = match self.connect().await {
                Ok((ws, welcome)) => {
                    let started = Instant::now();
                    let outcome = self.session(ws, welcome).await;
                    if started.elapsed() >= self.options.stable_after {
                        attempt = 0;
                    }
                    outcome
                }
                Err(outcome) => outcome,
            };
            let ended = match outcome {
                Outcome::Shutdown => return self.stop(StopReason::Closed),
                Outcome::Ended(ended) => ended,
            };
            let decision =
                policy::decide(&ended, attempt, &self.options.reconnect, &mut rand::rng());
            attempt = attempt.saturating_add(1);
            match decision {
                Decision::Stop(reason) => {
                    warn!(url = %self.url, "agent stops: {reason}");
                    return self.stop(reason);
                }
                Decision::Reconnect(delay) => {
                    // At info, in words: a newcomer with the default log level must see
                    // why the agent is not connected (a refused port, a 503's reason).
                    info!(url = %self.url, ?delay, "reconnecting: {ended}");
                    self.state_tx.send_replace(State::Waiting { delay });
                    if !self.wait(delay).await {
                        return self.stop(StopReason::Closed);
                    }
                }
            }
        }
    }

    fn stop(&mut self, reason: StopReason) {
        self.outbox.fail_all(&reason);
        for (_, request) in self.requests.drain() {
            let _ = request.reply.send(Err(Error::Stopped(reason.clone())));
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Send { reply, .. } => {
                    drop(reply.send(Err(Error::Stopped(reason.clone()))))
                }
                Command::Request { reply, .. } => {
                    drop(reply.send(Err(Error::Stopped(reason.clone()))))
                }
            }
        }
        self.state_tx.send_replace(State::Stopped(reason));
    }

    /// Sleeps `delay` while still accepting commands. False on shutdown.
    async fn wait(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = sleep_until(until) => return true,
                command = self.commands.recv() => match command {
                    Some(command) => self.register(command),
                    None => return false,
                },
            }
        }
    }

    fn register(&mut self, command: Command) {
        match command {
            Command::Send { id, data, reply } => self.outbox.insert(id, data, reply),
            Command::Request {
                id,
                data,
                timeout,
                reply,
            } => {
                self.requests.insert(
                    id,
                    PendingRequest {
                        data,
                        timeout,
                        deadline: Instant::now() + timeout,
                        written: false,
                        reply,
                    },
                );
            }
        }
    }

    /// Token, TCP, upgrade and `welcome`, all under the connect deadline.
    async fn connect(&mut self) -> Result<(Ws, Welcome), Outcome> {
        let shutdown = self.shutdown.clone();
        let limit = self.options.connect_timeout;
        let attempt = async {
            let token = match self.tokens.token().await {
                Ok(token) => token,
                Err(err) => {
                    warn!(%err, "token provider failed");
                    return Err(Ended::TokenUnavailable);
                }
            };
            let mut request = self.url.as_str().into_client_request().map_err(|err| {
                // `start` validated the URL; this only fails if that check is wrong.
                Ended::Unreachable {
                    cause: err.to_string(),
                }
            })?;
            let headers = request.headers_mut();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| Ended::TokenUnavailable)?,
            );
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
            let config =
                WebSocketConfig::default().read_buffer_size(self.options.read_buffer_bytes);
            let stream = self.transport.open().await?;
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                    .await
                    .map_err(|err| match err {
                        tungstenite::Error::Http(response) => Ended::Rejected {
                            status: response.status().as_u16(),
                            message: refusal_message(response.body().as_deref()),
                        },
                        tungstenite::Error::Io(err) => crate::transport::certificate_failure(&err)
                            .unwrap_or_else(|| Ended::Unreachable {
                                cause: tungstenite::Error::Io(err).to_string(),
                            }),
                        other => Ended::Unreachable {
                            cause: other.to_string(),
                        },
                    })?;
            match ws.next().await {
                Some(Ok(Message::Text(text))) => match GatewayMessage::decode(&text) {
                    Ok(GatewayMessage::Welcome(welcome)) => Ok((ws, welcome)),
                    other => {
                        warn!(?other, "first frame was not a welcome");
                        Err(Ended::Lost { hint: None })
                    }
                },
                Some(Ok(Message::Close(frame))) => Err(Ended::Closed {
                    code: frame.map(|f| u16::from(f.code)).unwrap_or(1005),
                    hint: None,
                }),
                _ => Err(Ended::Lost { hint: None }),
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => Err(Outcome::Shutdown),
            result = timeout(limit, attempt) => match result {
                Ok(Ok(ok)) => Ok(ok),
                Ok(Err(ended)) => Err(Outcome::Ended(ended)),
                Err(_) => Err(Outcome::Ended(Ended::Unreachable {
                    cause: format!("no welcome within the connect timeout ({limit:?})"),
                })),
            },
        }
    }

    async fn session(&mut self, ws: Ws, welcome: Welcome) -> Outcome {
        self.epoch += 1;
        let epoch = self.epoch;
        let now = Instant::now();
        let mut clock = SessionClock {
            last_seen: now,
            last_ping: now,
            refresh_at: welcome.expires_at.map(|exp| self.refresh_instant(exp)),
            refresh_in_flight: false,
            hint: None,
        };
        info!(agent_id = %welcome.agent_id, connection_id = %welcome.connection_id, "connected");
        self.state_tx.send_replace(State::Connected(Session {
            agent_id: welcome.agent_id,
            connection_id: welcome.connection_id,
            expires_at: welcome.expires_at,
            number: epoch,
        }));
        let (mut sink, mut stream) = ws.split();
        // Everything still unacknowledged from earlier sessions goes out first, in order.
        for request in self.requests.values_mut() {
            request.written = false;
        }
        let outcome = async {
            self.flush_due(&mut sink, &clock).await?;
            loop {
                let deadline = self.next_deadline(&clock);
                tokio::select! {
                    _ = self.shutdown.cancelled() => {
                        let close = Message::Close(Some(CloseFrame { code: WsCloseCode::Normal, reason: "agent closing".into() }));
                        let _ = timeout(Duration::from_secs(1), sink.send(close)).await;
                        return Err(Outcome::Shutdown);
                    }
                    frame = stream.next() => {
                        clock.last_seen = Instant::now();
                        match frame {
                            Some(Ok(message)) => self.on_frame(message, epoch, &mut clock).await?,
                            Some(Err(err)) => {
                                debug!(%err, "socket error");
                                return Err(Outcome::Ended(Ended::Lost { hint: clock.hint }));
                            }
                            None => return Err(Outcome::Ended(Ended::Lost { hint: clock.hint })),
                        }
                    }
                    command = self.commands.recv() => match command {
                        Some(command) => self.register(command),
                        None => return Err(Outcome::Shutdown),
                    },
                    Some(internal) = self.internal_rx.recv() => match internal {
                        Internal::Reply { epoch: e, message } if e == epoch => {
                            write(&mut sink, &message, &clock, &self.options).await?;
                        }
                        Internal::Token { epoch: e, result } if e == epoch => match result {
                            Ok(token) => {
                                write(&mut sink, &AgentMessage::Refresh { token }, &clock, &self.options).await?;
                            }
                            Err(err) => {
                                warn!(%err, "token refresh failed; retrying");
                                clock.refresh_in_flight = false;
                                clock.refresh_at = Some(Instant::now() + self.options.reconnect.backoff.base.max(Duration::from_secs(1)));
                            }
                        },
                        // Produced for an earlier session: that connection is gone.
                        _ => {}
                    },
                    _ = sleep_until(deadline) => {}
                }
                self.on_timers(&mut sink, epoch, &mut clock).await?;
                self.flush_due(&mut sink, &clock).await?;
            }
        }
        .await;
        // The session is over: whatever was written and not answered goes again.
        self.outbox.requeue_in_flight();
        match outcome {
            Err(outcome) => outcome,
            Ok(()) => Outcome::Ended(Ended::Lost { hint: clock.hint }),
        }
    }

    fn refresh_instant(&self, expires_at: u64) -> Instant {
        Instant::now() + policy::refresh_delay(unix_now(), expires_at, self.options.refresh_margin)
    }

    fn next_deadline(&self, clock: &SessionClock) -> Instant {
        let o = &self.options;
        [
            Some(clock.last_ping + o.ping_interval),
            Some(clock.last_seen + o.ping_interval + o.pong_timeout),
            clock.refresh_at.filter(|_| !clock.refresh_in_flight),
            self.outbox.next_deadline(),
            self.requests.values().map(|r| r.deadline).min(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + o.ping_interval)
    }

    /// Handles one inbound frame. `Err` ends the session.
    async fn on_frame(
        &mut self,
        message: Message,
        epoch: u64,
        clock: &mut SessionClock,
    ) -> Result<(), Outcome> {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(bytes) => {
                return self
                    .dispatch_push(PushJob {
                        epoch,
                        push: Push {
                            id: None,
                            payload: Payload::Binary(bytes),
                        },
                        ack: false,
                    })
                    .await;
            }
            Message::Close(frame) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                return Err(Outcome::Ended(Ended::Closed {
                    code,
                    hint: clock.hint,
                }));
            }
            // Pongs are answered by tungstenite; any frame already counted as liveness.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        let message = match GatewayMessage::decode(&text) {
            Ok(message) => message,
            Err(err) => {
                warn!(%err, "ignoring undecodable envelope");
                return Ok(());
            }
        };
        match message {
            GatewayMessage::Welcome(_) => {}
            GatewayMessage::Push { id, data, ack } => {
                let push = Push {
                    id: Some(id),
                    payload: Payload::Json(data),
                };
                return self.dispatch_push(PushJob { epoch, push, ack }).await;
            }
            GatewayMessage::Request {
                id,
                data,
                timeout_ms,
            } => {
                let handler = self.on_request.clone();
                let internal = self.internal_tx.clone();
                tokio::spawn(async move {
                    let request = Request {
                        id: id.clone(),
                        data,
                        timeout: Duration::from_millis(timeout_ms),
                    };
                    let result = handler(request).await;
                    let _ = internal.send(Internal::Reply {
                        epoch,
                        message: AgentMessage::Response { id, result },
                    });
                });
            }
            GatewayMessage::Response { id, result } => {
                if let Some(request) = self.requests.remove(&id) {
                    let _ = request.reply.send(result.map_err(Error::Upstream));
                }
            }
            GatewayMessage::Ack { id } => {
                if let Some(entry) = self.outbox.remove(&id) {
                    entry.finish(|| Ok(()));
                }
            }
            GatewayMessage::Nack {
                id,
                error,
                retry_after_ms,
            } => self.on_refused(&id, error, retry_after_ms),
            GatewayMessage::Refreshed { expires_at } => {
                clock.refresh_in_flight = false;
                clock.refresh_at = expires_at.map(|exp| self.refresh_instant(exp));
                self.state_tx.send_modify(|state| {
                    if let State::Connected(session) = state {
                        session.expires_at = expires_at;
                    }
                });
                debug!(?expires_at, "token refreshed");
            }
            GatewayMessage::Reconnect { after_ms, reason } => {
                info!(after_ms, %reason, "gateway asked to reconnect");
                clock.hint = Some(Duration::from_millis(after_ms));
            }
            GatewayMessage::Error { id, error } => match id {
                Some(id) if self.requests.contains_key(&id) => {
                    if let Some(request) = self.requests.remove(&id) {
                        let _ = request.reply.send(Err(Error::Rejected(error)));
                    }
                }
                Some(id) => self.on_refused(&id, error, None),
                None => warn!(?error, "gateway refused an envelope"),
            },
        }
        Ok(())
    }

    async fn dispatch_push(&mut self, job: PushJob) -> Result<(), Outcome> {
        // Back-pressure: a slow push handler slows reading, and the gateway's bounded
        // queue decides what happens to a consumer that stays slow.
        self.push_tx.send(job).await.map_err(|_| Outcome::Shutdown)
    }

    fn on_refused(&mut self, id: &str, error: ErrorBody, retry_after_ms: Option<u64>) {
        let Some(entry) = self.outbox.get_mut(id) else {
            return;
        };
        let retryable = policy::nack_is_retryable(error.code)
            && (self.options.retry_unavailable || error.code != ErrorCode::Unavailable);
        if retryable {
            let delay = policy::resend_delay(
                retry_after_ms,
                entry.nacks,
                &self.options.reconnect.backoff,
                &mut rand::rng(),
            );
            entry.nacks += 1;
            entry.state = SendState::Due(Instant::now() + delay);
            // Info, not debug: a send that never completes must say why by default.
            info!(
                id,
                code = ?error.code,
                ?delay,
                "send refused by the gateway, retrying: {}",
                error.message
            );
        } else if let Some(entry) = self.outbox.remove(id) {
            entry.finish(|| Err(Error::Rejected(error.clone())));
        }
    }

    /// Pings, dead-peer detection, request expiry and token refresh.
    async fn on_timers(
        &mut self,
        sink: &mut Sink,
        epoch: u64,
        clock: &mut SessionClock,
    ) -> Result<(), Outcome> {
        let now = Instant::now();
        let o = &self.options;
        if now >= clock.last_seen + o.ping_interval + o.pong_timeout {
            warn!("no frame from the gateway in time; it counts as dead");
            return Err(Outcome::Ended(Ended::Lost { hint: clock.hint }));
        }
        if now >= clock.last_ping + o.ping_interval {
            clock.last_ping = now;
            send_frame(sink, Message::Ping(Bytes::new()), clock, o).await?;
        }
        let expired: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(request) = self.requests.remove(&id) {
                let _ = request.reply.send(Err(Error::Timeout));
            }
        }
        if let Some(at) = clock.refresh_at
            && at <= now
            && !clock.refresh_in_flight
        {
            clock.refresh_in_flight = true;
            let tokens = self.tokens.clone();
            let internal = self.internal_tx.clone();
            tokio::spawn(async move {
                let result = tokens.token().await;
                let _ = internal.send(Internal::Token { epoch, result });
            });
        }
        Ok(())
    }

    /// Writes every send that is due and every request not yet written on this session.
    async fn flush_due(&mut self, sink: &mut Sink, clock: &SessionClock) -> Result<(), Outcome> {
        let now = Instant::now();
        let ack_deadline = now + self.options.ack_timeout;
        for entry in self.outbox.by_seq.values_mut() {
            let due = match entry.state {
                SendState::Due(t) | SendState::InFlight(t) => t <= now,
            };
            if due {
                let message = AgentMessage::Send {
                    id: entry.id.clone(),
                    data: entry.data.clone(),
                };
                write(sink, &message, clock, &self.options).await?;
                entry.state = SendState::InFlight(ack_deadline);
            }
        }
        for (id, request) in self.requests.iter_mut().filter(|(_, r)| !r.written) {
            let remaining = request
                .deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            let message = AgentMessage::Request {
                id: id.clone(),
                data: request.data.clone(),
                timeout_ms: Some(remaining.min(request.timeout).as_millis() as u64),
            };
            write(sink, &message, clock, &self.options).await?;
            request.written = true;
        }
        Ok(())
    }
}

async fn write(
    sink: &mut Sink,
    message: &AgentMessage,
    clock: &SessionClock,
    options: &Options,
) -> Result<(), Outcome> {
    send_frame(sink, Message::text(message.encode()), clock, options).await
}

/// Writes one frame. A write that cannot complete within the pong timeout means the
/// gateway stopped reading: the session is treated as lost.
async fn send_frame(
    sink: &mut Sink,
    frame: Message,
    clock: &SessionClock,
    options: &Options,
) -> Result<(), Outcome> {
    match timeout(options.pong_timeout, sink.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Outcome::Ended(Ended::Lost { hint: clock.hint })),
    }
}

#[cfg(test)]
mod tests {
    //! Narrow tests against a scripted in-test WebSocket server. Behaviour against the
    //! real gateway is covered by `tests/gateway.rs`.

    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::handshake::server::{
        ErrorResponse, Request as HsRequest, Response as HsResponse,
    };

    use super::*;
    use crate::token::StaticToken;

    type ServerWs = WebSocketStream<TcpStream>;

    /// Accepts connections; each accepted socket is handed to the test. With `status`
    /// set, the upgrade is refused with that HTTP status instead.
    async fn scripted_server(
        status: Option<u16>,
    ) -> (String, mpsc::Receiver<ServerWs>, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/connect", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel(16);
        let (auth_tx, auth_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                let auth_tx = auth_tx.clone();
                tokio::spawn(async move {
                    // The callback's error type is fixed by tungstenite.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &HsRequest,
                                    mut resp: HsResponse|
                     -> Result<HsResponse, ErrorResponse> {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let _ = auth_tx.try_send(auth.unwrap_or_default());
                        if let Some(status) = status {
                            let mut err = ErrorResponse::new(None);
                            *err.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            return Err(err);
                        }
                        resp.headers_mut().insert(
                            header::SEC_WEBSOCKET_PROTOCOL,
                            HeaderValue::from_static(SUBPROTOCOL),
                        );
                        Ok(resp)
                    };
                    if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await {
                        let _ = tx.send(ws).await;
                    }
                });
            }
        });
        (url, rx, auth_rx)
    }

    async fn welcome(ws: &mut ServerWs, connection_id: &str) {
        let welcome = GatewayMessage::Welcome(Welcome {
            agent_id: "a1".into(),
            connection_id: connection_id.into(),
            expires_at: None,
            max_message_bytes: 65536,
            messages_per_second: 100,
        });
        ws.send(Message::text(welcome.encode())).await.unwrap();
    }

    async fn next_envelope(ws: &mut ServerWs) -> AgentMessage {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(text) => return AgentMessage::decode(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    fn fast_options() -> Options {
        Options {
            reconnect: ReconnectPolicy {
                backoff: policy::Backoff {
                    base: Duration::from_millis(20),
                    cap: Duration::from_millis(100),
                },
                overload_floor: Duration::from_millis(50),
            },
            connect_timeout: Duration::from_secs(2),
            ..Options::default()
        }
    }

    async fn within<T>(fut: impl Future<Output = T>) -> T {
        timeout(Duration::from_secs(10), fut)
            .await
            .expect("test step timed out")
    }

    #[tokio::test]
    async fn send_retries_after_nack_with_the_same_id_until_acked() {
        let (url, mut conns, mut auths) = scripted_server(None).await;
        let agent = Agent::builder(url, StaticToken("tok".into()))
            .options(fast_options())
            .start()
            .unwrap();
        let mut ws = within(conns.recv()).await.unwrap();
        assert_eq!(auths.recv().await.unwrap(), "Bearer tok");
        welcome(&mut ws, "c1").await;
        let sender = agent.clone();
        let send = tokio::spawn(async move { sender.send(&serde_json::json!({"n": 1})).await });
        let AgentMessage::Send { id, data } = within(next_envelope(&mut ws)).await else {
            panic!("expected send")
        };
        assert_eq!(data.get(), r#"{"n":1}"#);
        let nack = GatewayMessage::Nack {
            id: id.clone(),
            error: ErrorBody::new(ErrorCode::UpstreamError, "503"),
            retry_after_ms: Some(10),
        };
        ws.send(Message::text(nack.encode())).await.unwrap();
        let AgentMessage::Send { id: retried, .. } = within(next_envelope(&mut ws)).await else {
            panic!("expected the retry")
        };
        assert_eq!(retried, id, "a retry reuses the idempotency id");
        assert!(!send.is_finished());
        ws.send(Message::text(GatewayMessage::Ack { id }.encode()))
            .await
            .unwrap();
        within(send).await.unwrap().unwrap();
        agent.close().await;
    }

    #[tokio::test]
    async fn unacked_send_is_resent_on_the_next_session() {
        let (url, mut conns, _auths) = scripted_server(None).await;
        let agent = Agent::builder(url, StaticToken("tok".into()))
            .options(fast_options())
            .start()
            .unwrap();
        let mut first = within(conns.recv()).await.unwrap();
        welcome(&mut first, "c1").await;
        let sender = agent.clone();
        let send = tokio::spawn(async move { sender.send("hello").await });
        let AgentMessage::Send { id, .. } = within(next_envelope(&mut first)).await else {
            panic!("expected send")
        };
        // The connection dies before the ack.
        drop(first);
        let mut second = within(conns.recv()).await.unwrap();
        welcome(&mut second, "c2").await;
        let AgentMessage::Send { id: again, .. } = within(next_envelope(&mut second)).await else {
            panic!("expected the resend")
        };
        assert_eq!(again, id);
        second
            .send(Message::text(GatewayMessage::Ack { id }.encode()))
            .await
            .unwrap();
        within(send).await.unwrap().unwrap();
        agent.close().await;
    }

    #[tokio::test]
    async fn permanent_nack_fails_the_send() {
        let (url, mut conns, _auths) = scripted_server(None).await;
        let agent = Agent::builder(url, StaticToken("tok".into()))
            .options(fast_options())
            .start()
            .unwrap();
        let mut ws = within(conns.recv()).await.unwrap();
        welcome(&mut ws, "c1").await;
        let sender = agent.clone();
        let send = tokio::spawn(async move { sender.send("x").await });
        let AgentMessage::Send { id, .. } = within(next_envelope(&mut ws)).await else {
            panic!()
        };
        let nack = GatewayMessage::Nack {
            id,
            error: ErrorBody::new(ErrorCode::TooLarge, "too big"),
            retry_after_ms: None,
        };
        ws.send(Message::text(nack.encode())).await.unwrap();
        assert!(matches!(
            within(send).await.unwrap(),
            Err(Error::Rejected(_))
        ));
        agent.close().await;
    }

    #[tokio::test]
    async fn push_is_handled_and_acked_and_requests_are_answered() {
        let (url, mut conns, _auths) = scripted_server(None).await;
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let agent = Agent::builder(url, StaticToken("tok".into()))
            .options(fast_options())
            .on_push(move |push| {
                let seen_tx = seen_tx.clone();
                async move {
                    let _ = seen_tx.send(push.json::<serde_json::Value>().unwrap());
                }
            })
            .on_request(|request| async move {
                let n: u64 = request.json().unwrap();
                Ok(serde_json::value::to_raw_value(&(n * 2)).unwrap())
            })
            .start()
            .unwrap();
        let mut ws = within(conns.recv()).await.unwrap();
        welcome(&mut ws, "c1").await;
        let push = GatewayMessage::Push {
            id: "p1".into(),
            data: RawValue::from_string(r#"{"cmd":"scan"}"#.into()).unwrap(),
            ack: true,
        };
        ws.send(Message::text(push.encode())).await.unwrap();
        assert_eq!(
            within(seen.recv()).await.unwrap(),
            serde_json::json!({"cmd": "scan"})
        );
        assert!(
            matches!(within(next_envelope(&mut ws)).await, AgentMessage::Ack { id } if id == "p1")
        );
        let request = GatewayMessage::Request {
            id: "r1".into(),
            data: RawValue::from_string("21".into()).unwrap(),
            timeout_ms: 1000,
        };
        ws.send(Message::text(request.encode())).await.unwrap();
        match within(next_envelope(&mut ws)).await {
            AgentMessage::Response { id, result } => {
                assert_eq!(id, "r1");
                assert_eq!(result.unwrap().get(), "42");
            }
            other => panic!("{other:?}"),
        }
        agent.close().await;
    }

    #[tokio::test]
    async fn a_redelivered_push_is_acked_without_reaching_the_handler_twice() {
        let (url, mut conns, _auths) = scripted_server(None).await;
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let agent = Agent::builder(url, StaticToken("tok".into()))
            .options(fast_options())
            .on_push(move |push| {
                let seen_tx = seen_tx.clone();
                async move {
                    let _ = seen_tx.send(push.json::<u64>().unwrap());
                }
            })
            .start()
            .unwrap();
        let push = |id: &str, n: u64| GatewayMessage::Push {
            id: id.into(),
            data: RawValue::from_string(n.to_string()).unwrap(),
            ack: true,
        };
        let mut first = within(conns.recv()).await.unwrap();
        welcome(&mut first, "c1").await;
        first
            .send(Message::text(push("d1", 1).encode()))
            .await
            .unwrap();
        assert_eq!(within(seen.recv()).await.unwrap(), 1);
        // The connection dies before the gateway read the ack: the durable queue
        // delivers d1 again on the next session, then d2.
        drop(first);
        let mut second = within(conns.recv()).await.unwrap();
        welcome(&mut second, "c2").await;
        for (id, n) in [("d1", 1), ("d2", 2)] {
            second
                .send(Message::text(push(id, n).encode()))
                .await
                .unwrap();
        }
        for expected in ["d1", "d2"] {
            assert!(
                matches!(within(next_envelope(&mut second)).await, AgentMessage::Ack { id } if id == expected),
                "every copy is acknowledged, in order"
            );
        }
        assert_eq!(
            within(seen.recv()).await.unwrap(),
            2,
            "d1 was not handled again"
        );
        assert!(seen.try_recv().is_err());
        agent.close().await;
    }

    #[tokio::test]
    async fn auth_rejection_stops_without_retrying() {
        let (url, _conns, mut auths) = scripted_server(Some(401)).await;
        let agent = Agent::builder(url, StaticToken("bad".into()))
            .options(fast_options())
            .start()
            .unwrap();
        let err = within(agent.connected()).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Stopped(StopReason::AuthRejected { status: 401, .. })
            ),
            "{err}"
        );
        assert!(auths.recv().await.is_some());
        // No second attempt follows.
        assert!(
            timeout(Duration::from_millis(300), auths.recv())
                .await
                .is_err()
        );
        assert!(matches!(agent.send("x").await, Err(Error::Stopped(_))));
    }

    #[tokio::test]
    async fn overloaded_upgrade_is_retried() {
        let (url, _conns, mut auths) = scripted_server(Some(503)).await;
        let agent = Agent::builder(url, StaticToken("t".into()))
            .options(fast_options())
            .start()
            .unwrap();
        for _ in 0..3 {
            within(auths.recv()).await.unwrap();
        }
        assert!(!matches!(*agent.state().borrow(), State::Stopped(_)));
        agent.close().await;
    }

    #[tokio::test]
    async fn silent_server_is_detected_by_ping_and_replaced() {
        let (url, mut conns, _auths) = scripted_server(None).await;
        let options = Options {
            ping_interval: Duration::from_millis(100),
            pong_timeout: Duration::from_millis(200),
            ..fast_options()
        };
        let agent = Agent::builder(url, StaticToken("t".into()))
            .options(options)
            .start()
            .unwrap();
        let mut first = within(conns.recv()).await.unwrap();
        welcome(&mut first, "c1").await;
        assert_eq!(within(agent.connected()).await.unwrap().connection_id, "c1");
        // Keep the socket open but never read it again: pings go unanswered.
        let mut second = within(conns.recv()).await.unwrap();
        welcome(&mut second, "c2").await;
        let mut state = agent.state();
        within(
            state.wait_for(
                |s| matches!(s, State::Connected(session) if session.connection_id == "c2"),
            ),
        )
        .await
        .unwrap();
        drop(first);
        agent.close().await;
    }

    #[tokio::test]
    async fn refusing_close_codes_stop_the_agent() {
        let (url, mut conns, _auths) = scripted_server(None).await;
        let agent = Agent::builder(url, StaticToken("t".into()))
            .options(fast_options())
            .start()
            .unwrap();
        let mut ws = within(conns.recv()).await.unwrap();
        welcome(&mut ws, "c1").await;
        within(agent.connected()).await.unwrap();
        ws.close(Some(CloseFrame {
            code: WsCloseCode::from(4003),
            reason: "replaced".into(),
        }))
        .await
        .unwrap();
        let mut state = agent.state();
        let stopped = within(state.wait_for(|s| matches!(s, State::Stopped(_))))
            .await
            .unwrap()
            .clone();
        assert_eq!(stopped, State::Stopped(StopReason::Refused { code: 4003 }));
    }
}

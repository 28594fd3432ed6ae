//! One agent connection: what happens to its decoded messages, and its life from
//! registration to cleanup. The socket itself is driven by [`crate::driver`] (a
//! hand-written future: reads, writes, close handshake); this module decides what an
//! inbound message means. It owns no timer: [`crate::liveness`] decides pings and
//! deadlines for every connection from one task per process.
//!
//! ```text
//!            ┌──────────── connection task (one per connection) ──────────────┐
//!  socket ──>│ driver: frames ──> Session::on_message: rate limit → decode →   │
//!            │                      upstream / complete / refresh → Reaction   │
//!  outbox ──>│ driver: write queued frames in order (vectored), maybe close    │──> socket
//!            └────────────────────────────────────────────────────────────────┘
//!  liveness sweeper (one per process) ──> outbox: ping, or close on pong/idle/expiry
//! ```
//!
//! Dispatch is synchronous: work that waits on the network (upstream POSTs) runs in its
//! own short-lived task and answers through the outbox, so a slow backend never stalls
//! the socket; at most `limits.maxUpstreamInFlight` of them per connection (more are
//! refused `overloaded`). The session's own answers (errors, `refreshed`) are handed
//! back to the driver as a [`Reaction`] and written ahead of the outbox.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_config::UpstreamEvent;
use tether_protocol::{
    AgentMessage, CloseCode, ErrorBody, ErrorCode, GatewayMessage, RawValue, Welcome, salvage_id,
};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use crate::auth::AgentIdentity;
use crate::driver::{Driver, Ended};
use crate::hub::unix_now;
use crate::hub::{Connection, Expect, Outbound, UpstreamSlot};
use crate::liveness;
use crate::metrics::label;
use crate::rate::TokenBucket;
use crate::state::{Admission, AppState};
use crate::upstream::{Event, UpstreamError};

/// Opens one authenticated agent's session: registers its connection (hub, router,
/// metrics, upstream `connect` event) and returns the future that serves it until it
/// ends, to be spawned as the connection's task. `early` holds bytes the HTTP layer
/// read past the upgrade request (a client may pipeline its first frames).
/// `admission` is its slot under `limits.maxConnections`, released when the session
/// is over.
///
/// The registration runs here, in the upgrade's task, and not in the connection's own
/// task: what awaits there would stay in that task's cell for the connection's whole
/// life (an `async` block keeps its captures and the largest awaited future side by
/// side), and that cell is what every idle connection costs.
pub async fn open(
    state: Arc<AppState>,
    socket: AgentSocket,
    early: Bytes,
    identity: AgentIdentity,
    admission: Admission,
) -> ConnectionTask {
    let grace = state.config.auth.jwt.refresh_grace_seconds;
    let conn = Connection::new(
        state.hub.next_connection_id(),
        &identity.agent_id,
        identity.groups,
        identity.expires_at.saturating_add(grace),
    );
    if identity.jti.is_some() {
        conn.set_jti(identity.jti.as_deref());
    }
    // Its own second of the ping interval, so that connections opened together (a
    // reconnect storm) are not pinged together, every interval, ever after.
    conn.clock.set_phase(liveness::phase(
        conn.id,
        state.config.limits.ping_interval_seconds,
    ));
    // No span per connection: `Instrumented` costs 32 bytes in every task even while
    // disabled. The few debug lines name their agent and connection.
    let session = Session::new(admission, conn.clone());
    let welcome = session.welcome();
    // Bytes that came with the upgrade are decoded on the driver's first poll, after
    // the registration below.
    let stage = match socket {
        AgentSocket::Plain(socket) => Stage::Serving(Driver::new(socket, session, welcome, &early)),
        AgentSocket::Tls(socket) => {
            Stage::ServingTls(Box::new(Driver::new(*socket, session, welcome, &early)))
        }
    };
    if let Some(old) = state.hub.register(&conn).replaced {
        debug!(agent = %conn.agent_id, connection = conn.id, old = old.id, "replaced older connection");
    }
    state.router.connected(&conn).await;
    state.metrics.connections_active.add(1, &[]);
    notify_upstream(&state, &conn, UpstreamEvent::Connect);
    ConnectionTask(stage)
}

/// The task of one connection: its driver until the connection ends, then the
/// cleanup (hub, router, metrics, upstream `disconnect` event).
///
/// A hand-written future rather than an `async` block, so that it is the driver and
/// nothing beside it: the cleanup's state exists only once the driver is gone (boxed,
/// for the moment it runs). `tests::a_connection_task_fits_a_256_byte_task_cell` keeps
/// it within the size that gives a 256-byte tokio task cell.
pub struct ConnectionTask(Stage);

/// An agent's socket as the public port hands it over.
pub enum AgentSocket {
    /// Plain TCP (TLS, if any, ended at a load balancer).
    Plain(TcpStream),
    /// TLS terminated by the gateway (`listen.tls`). Boxed: rustls' connection state is
    /// large, and plain connections must not pay for it in their task cell.
    Tls(Box<TlsStream<TcpStream>>),
}

enum Stage {
    Serving(Driver),
    /// Boxed so that the plain stage, what most connections are, stays small.
    ServingTls(Box<Driver<TlsStream<TcpStream>>>),
    Leaving(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

impl Future for ConnectionTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let stage = &mut self.get_mut().0;
        loop {
            match stage {
                Stage::Serving(driver) => {
                    let ended = ready!(Pin::new(driver).poll(cx));
                    let Stage::Serving(driver) = std::mem::replace(stage, Stage::Done) else {
                        unreachable!("matched above");
                    };
                    *stage = leave(driver.session(), ended);
                    // Dropped here: the socket, its slot and the session go before the
                    // cleanup runs.
                }
                Stage::ServingTls(driver) => {
                    let ended = ready!(Pin::new(&mut **driver).poll(cx));
                    let Stage::ServingTls(driver) = std::mem::replace(stage, Stage::Done) else {
                        unreachable!("matched above");
                    };
                    *stage = leave(driver.session(), ended);
                }
                Stage::Leaving(cleanup) => {
                    ready!(cleanup.as_mut().poll(cx));
                    *stage = Stage::Done;
                }
                Stage::Done => return Poll::Ready(()),
            }
        }
    }
}

/// The cleanup stage for a session whose driver ended.
fn leave(session: &Session, ended: Ended) -> Stage {
    let (state, conn) = (session.state.clone(), session.conn.clone());
    debug!(agent = %conn.agent_id, connection = conn.id, ?ended, "session ended");
    Stage::Leaving(Box::pin(close(state, conn, ended)))
}

/// A connection's cleanup once its driver ended.
async fn close(state: Arc<AppState>, conn: Arc<Connection>, ended: Ended) {
    state.hub.unregister(&conn);
    state.router.disconnected(&conn).await;
    state.metrics.connections_active.add(-1, &[]);
    state
        .metrics
        .connections_closed
        .add(1, &label("code", ended.code_label()));
    let lost = conn.queue_len();
    if lost > 0 {
        state.metrics.messages_dropped.add(lost as u64, &[]);
    }
    notify_upstream(&state, &conn, UpstreamEvent::Disconnect);
}

/// Tells the upstream about connect/disconnect when it asked for those events.
fn notify_upstream(state: &Arc<AppState>, conn: &Arc<Connection>, event: UpstreamEvent) {
    let Some(upstream) = state.upstream.clone() else {
        return;
    };
    if !upstream.wants(event) {
        return;
    }
    let agent = conn.agent_id.clone();
    let kind = match event {
        UpstreamEvent::Connect => "connect",
        UpstreamEvent::Disconnect => "disconnect",
        UpstreamEvent::Message => "message",
    };
    state.tasks.spawn(async move {
        let event = Event {
            kind,
            agent_id: &agent,
            id: None,
            data: None,
            binary: None,
        };
        if let Err(e) = upstream.post(&event).await {
            debug!(%e, kind, "upstream event not delivered");
        }
    });
}

/// A connection's message handling state: what the driver calls for every complete
/// text or binary message.
pub struct Session {
    pub(crate) state: Arc<AppState>,
    pub(crate) conn: Arc<Connection>,
    bucket: TokenBucket,
    rate_violations: u32,
    invalid_envelopes: u32,
}

impl Drop for Session {
    fn drop(&mut self) {
        // The connection's slot under `limits.maxConnections` (see `Session::new`).
        self.state.release_admission();
    }
}

/// A complete data message from the agent.
#[derive(Debug)]
pub enum DataMessage {
    /// A text frame (UTF-8 checked): a JSON envelope.
    Text(String),
    /// A binary frame: an opaque payload.
    Binary(Bytes),
}

/// What the driver does after a message.
#[derive(Debug)]
pub enum Reaction {
    /// Nothing more: keep serving.
    Continue,
    /// Write this answer (ahead of the outbox), then keep serving.
    Reply(GatewayMessage),
    /// Close the connection with this code.
    Close(CloseCode),
}

impl Session {
    /// A session holding `admission`'s slot until it is dropped.
    fn new(admission: Admission, conn: Arc<Connection>) -> Self {
        let state = admission.into_session();
        let limits = &state.config.limits;
        let bucket = TokenBucket::new(
            limits.messages_per_second,
            limits.message_burst,
            Instant::now(),
        );
        Self {
            state,
            conn,
            bucket,
            rate_violations: 0,
            invalid_envelopes: 0,
        }
    }

    /// The connection this session serves.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.conn
    }

    /// The process's shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The first frame of every connection.
    fn welcome(&self) -> GatewayMessage {
        GatewayMessage::Welcome(Welcome {
            agent_id: self.conn.agent_id.to_string(),
            connection_id: self.conn.id.to_string(),
            expires_at: Some(
                self.conn
                    .clock
                    .expires_at()
                    .saturating_sub(self.state.config.auth.jwt.refresh_grace_seconds),
            ),
            max_message_bytes: self.state.config.limits.max_message_bytes,
            messages_per_second: self.state.config.limits.messages_per_second,
        })
    }

    /// Handles one complete data message from the agent.
    pub fn on_message(&mut self, message: DataMessage) -> Reaction {
        let now = Instant::now();
        let kind = match message {
            DataMessage::Text(_) => "text",
            DataMessage::Binary(_) => "binary",
        };
        self.state
            .metrics
            .messages_received
            .add(1, &label("kind", kind));
        if let Some(refused) = self.check_rate(now) {
            return refused;
        }
        match message {
            DataMessage::Text(text) => self.on_text(&text),
            DataMessage::Binary(data) => {
                self.forward_binary(data);
                Reaction::Continue
            }
        }
    }

    /// Applies the rate limit. Over the limit the message is refused with an error
    /// frame; a sender that keeps going is closed with 1008. `None`: go ahead.
    fn check_rate(&mut self, now: Instant) -> Option<Reaction> {
        if self.bucket.try_take(now) {
            self.rate_violations = 0;
            return None;
        }
        self.rate_violations += 1;
        if self.rate_violations > self.state.config.limits.max_rate_violations {
            return Some(Reaction::Close(CloseCode::PolicyViolation));
        }
        Some(Reaction::Reply(GatewayMessage::Error {
            id: None,
            error: ErrorBody::new(
                ErrorCode::RateLimited,
                "message rate exceeded; message dropped",
            ),
        }))
    }

    fn on_text(&mut self, text: &str) -> Reaction {
        let message = match AgentMessage::decode(text) {
            Ok(message) => {
                self.invalid_envelopes = 0;
                message
            }
            Err(e) => {
                self.invalid_envelopes += 1;
                if self.invalid_envelopes > self.state.config.limits.max_invalid_envelopes {
                    return Reaction::Close(CloseCode::PolicyViolation);
                }
                return Reaction::Reply(GatewayMessage::Error {
                    id: salvage_id(text),
                    error: ErrorBody::new(ErrorCode::BadRequest, e.to_string()),
                });
            }
        };
        match message {
            AgentMessage::Send { id, data } => match self.upstream_slot() {
                Some(slot) => self.forward_upstream("message", id, data, slot),
                None => answer(&self.state, &self.conn, nack(id, UpstreamError::Overloaded)),
            },
            AgentMessage::Request {
                id,
                data,
                timeout_ms,
            } => match self.upstream_slot() {
                Some(slot) => self.forward_upstream_request(id, data, timeout_ms, slot),
                None => {
                    let result = Err(error_body(&UpstreamError::Overloaded));
                    answer(
                        &self.state,
                        &self.conn,
                        GatewayMessage::Response { id, result },
                    );
                }
            },
            AgentMessage::Response { id, result } => {
                if !self
                    .state
                    .hub
                    .complete(self.conn.id, &id, Expect::Response, result)
                {
                    debug!(agent = %self.conn.agent_id, %id, "response for no pending request (late or unknown)");
                }
            }
            AgentMessage::Ack { id } => {
                let null = RawValue::from_string("null".into()).expect("valid JSON");
                // An ack no push-API call waits for may acknowledge a durable push. One
                // the gateway was waiting for costs no message rate: a backlog drains
                // as fast as the agent acknowledges it (the in-flight window bounds it),
                // not at `messagesPerSecond`.
                let expected = self
                    .state
                    .hub
                    .complete(self.conn.id, &id, Expect::Ack, Ok(null))
                    || self.state.router.acked(&self.conn, &id);
                if expected {
                    self.bucket.refund();
                }
            }
            AgentMessage::Refresh { token } => return self.refresh(&token),
        }
        Reaction::Continue
    }

    fn refresh(&mut self, token: &str) -> Reaction {
        match self.state.verifier.verify(token) {
            Ok(identity)
                if self
                    .state
                    .hub
                    .revocations
                    .revoked_until(&identity.agent_id, identity.jti.as_deref(), unix_now())
                    .is_some() =>
            {
                Reaction::Close(CloseCode::Revoked)
            }
            Ok(identity) if identity.agent_id == *self.conn.agent_id => {
                self.conn.set_jti(identity.jti.as_deref());
                let grace = self.state.config.auth.jwt.refresh_grace_seconds;
                self.conn
                    .clock
                    .set_expiry(identity.expires_at.saturating_add(grace));
                // The new expiry may come before the second the sweep has the
                // connection filed for.
                self.state.hub.expiry_moved(&self.conn);
                // The new token's groups are the agent's groups from now on: a token
                // that drops a group must also stop that group's messages.
                if identity.groups != self.conn.groups() {
                    self.state.hub.set_groups(&self.conn, identity.groups);
                }
                Reaction::Reply(GatewayMessage::Refreshed {
                    expires_at: Some(identity.expires_at),
                })
            }
            Ok(_) => Reaction::Close(CloseCode::TokenInvalid),
            // Signed by a key this pod has not fetched yet (a rotation): the check runs
            // inside the connection's driver, which cannot wait for a fetch. Fetch in
            // the background and let the agent reconnect (1013): its handshake then
            // finds the new key, where 4002 would have stopped it for good.
            Err(e) if self.state.verifier.awaits_fetch(token) => {
                debug!(agent = %self.conn.agent_id, %e, "refresh names an unknown kid; fetching the JWKS");
                let state = self.state.clone();
                tokio::spawn(async move {
                    let _ = state.verifier.refresh_remote().await;
                });
                Reaction::Close(CloseCode::TryAgainLater)
            }
            Err(e) => {
                debug!(agent = %self.conn.agent_id, %e, "refresh refused");
                self.state
                    .metrics
                    .auth_failures
                    .add(1, &label("reason", "refresh"));
                Reaction::Close(CloseCode::TokenInvalid)
            }
        }
    }

    /// One of this connection's `limits.maxUpstreamInFlight` upstream slots.
    fn upstream_slot(&self) -> Option<UpstreamSlot> {
        let slot = self
            .conn
            .try_upstream_slot(self.state.config.limits.max_upstream_in_flight);
        if slot.is_none() {
            self.state
                .metrics
                .messages_dropped
                .add(1, &label("reason", "upstream_in_flight"));
        }
        slot
    }

    /// `send` → upstream, answered with `ack`/`nack` through the outbox.
    fn forward_upstream(
        &self,
        kind: &'static str,
        id: String,
        data: Box<RawValue>,
        slot: UpstreamSlot,
    ) {
        let (state, conn) = (self.state.clone(), self.conn.clone());
        self.state.tasks.spawn(async move {
            let _slot = slot;
            let reply = match deliver_upstream(&state, &conn, kind, &id, &data).await {
                Ok(_) => GatewayMessage::Ack { id },
                Err(e) => nack(id, e),
            };
            answer(&state, &conn, reply);
        });
    }

    /// Agent `request` → upstream, answered with `response`.
    fn forward_upstream_request(
        &self,
        id: String,
        data: Box<RawValue>,
        timeout_ms: Option<u64>,
        slot: UpstreamSlot,
    ) {
        let (state, conn) = (self.state.clone(), self.conn.clone());
        let limits = &self.state.config.limits;
        let timeout = Duration::from_millis(
            timeout_ms
                .unwrap_or(limits.request_timeout_ms)
                .min(limits.max_request_timeout_ms),
        );
        self.state.tasks.spawn(async move {
            let _slot = slot;
            let outcome = tokio::time::timeout(
                timeout,
                deliver_upstream(&state, &conn, "request", &id, &data),
            )
            .await;
            let result = match outcome {
                Err(_) => Err(ErrorBody::new(
                    ErrorCode::Timeout,
                    "upstream did not answer in time",
                )),
                Ok(Err(e)) => Err(error_body(&e)),
                Ok(Ok(body)) => json_body(body),
            };
            answer(&state, &conn, GatewayMessage::Response { id, result });
        });
    }

    fn forward_binary(&self, data: bytes::Bytes) {
        use base64::Engine;
        // Binary frames carry no id to nack: over the cap they are dropped (counted).
        let Some(slot) = self.upstream_slot() else {
            return;
        };
        let (state, conn) = (self.state.clone(), self.conn.clone());
        self.state.tasks.spawn(async move {
            let _slot = slot;
            let Some(upstream) = state
                .upstream
                .as_ref()
                .filter(|u| u.wants(UpstreamEvent::Message))
            else {
                return;
            };
            let event = Event {
                kind: "message",
                agent_id: &conn.agent_id,
                id: None,
                data: None,
                binary: Some(base64::engine::general_purpose::STANDARD.encode(&data)),
            };
            if let Err(e) = upstream.post(&event).await {
                debug!(%e, "binary message not delivered upstream");
            }
        });
    }
}

async fn deliver_upstream(
    state: &AppState,
    conn: &Connection,
    kind: &'static str,
    id: &str,
    data: &RawValue,
) -> Result<bytes::Bytes, UpstreamError> {
    let upstream = state
        .upstream
        .as_ref()
        .filter(|u| u.wants(UpstreamEvent::Message))
        .ok_or(UpstreamError::NotConfigured)?;
    let started = Instant::now();
    let result = upstream
        .post(&Event {
            kind,
            agent_id: &conn.agent_id,
            id: Some(id),
            data: Some(data),
            binary: None,
        })
        .await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    state
        .metrics
        .upstream_duration
        .record(started.elapsed().as_secs_f64(), &label("outcome", outcome));
    result
}

/// What the agent is told: a fixed message per kind of failure. The detail (URL, the
/// HTTP client's error text) goes to the log only.
fn error_body(e: &UpstreamError) -> ErrorBody {
    let code = match e {
        UpstreamError::NotConfigured => ErrorCode::Unavailable,
        UpstreamError::Overloaded => ErrorCode::Overloaded,
        _ => ErrorCode::UpstreamError,
    };
    if !matches!(e, UpstreamError::NotConfigured | UpstreamError::Overloaded) {
        debug!(error = %e, "upstream call failed");
    }
    ErrorBody::new(code, e.agent_message())
}

/// The retry hint of an overloaded answer, in milliseconds.
const OVERLOADED_RETRY_MS: u64 = 1_000;

fn nack(id: String, e: UpstreamError) -> GatewayMessage {
    let retry_after_ms = match &e {
        UpstreamError::Rejected { retry_after_ms, .. } => *retry_after_ms,
        UpstreamError::Overloaded => Some(OVERLOADED_RETRY_MS),
        _ => None,
    };
    GatewayMessage::Nack {
        id,
        error: error_body(&e),
        retry_after_ms,
    }
}

/// The upstream's answer as the `data` of a `response`: JSON as is, empty as `null`.
fn json_body(body: bytes::Bytes) -> Result<Box<RawValue>, ErrorBody> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RawValue::from_string("null".into()).expect("valid JSON"));
    }
    String::from_utf8(body.to_vec())
        .ok()
        .and_then(|text| RawValue::from_string(text).ok())
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::UpstreamError,
                "upstream answered with non-JSON body",
            )
        })
}

/// Queues an answer for the agent; if its queue is full it is not reading, so it is
/// closed as a slow consumer rather than silently missing the answer.
fn answer(state: &AppState, conn: &Connection, message: GatewayMessage) {
    let frame = Outbound::Text(message.encode().into());
    if conn
        .enqueue(frame, state.config.limits.outbound_queue)
        .is_err()
    {
        conn.close(CloseCode::SlowConsumer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every idle connection keeps is this future in a tokio task cell: a
    /// 128-byte-aligned block of tokio's header and trailer (96 bytes on x86-64:
    /// state, queue link, vtable, owner id, scheduler, task id, list links, join
    /// waker, hooks) plus the future, wrapped by the `TaskTracker` (8 bytes) and
    /// tokio's stage tag (8 bytes). Up to 144 bytes here that is a 256-byte cell; one
    /// byte more and it is 384 (as it was before this test).
    #[test]
    fn a_connection_task_fits_a_256_byte_task_cell() {
        let size = std::mem::size_of::<ConnectionTask>();
        eprintln!("size_of::<ConnectionTask>() = {size}");
        assert!(size <= 144, "ConnectionTask is {size} bytes");
    }

    #[test]
    fn upstream_bodies_become_response_data() {
        assert_eq!(
            json_body(bytes::Bytes::from_static(b"")).unwrap().get(),
            "null"
        );
        assert_eq!(
            json_body(bytes::Bytes::from_static(br#"{"ok":true}"#))
                .unwrap()
                .get(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            json_body(bytes::Bytes::from_static(b"<html>"))
                .unwrap_err()
                .code,
            ErrorCode::UpstreamError
        );
    }
}

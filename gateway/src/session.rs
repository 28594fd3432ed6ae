//! One agent connection: a single task that owns the socket and `select!`s over inbound
//! frames and its outbox. It owns no timer: [`crate::liveness`] decides pings and
//! deadlines for every connection from one task per process.
//!
//! ```text
//!            ┌──────────── session task (one per connection) ─────────────┐
//!  socket ──>│ inbound: rate limit → decode → upstream / complete / refresh│
//!  outbox ──>│ outbound: write queued frames in order, flush, maybe close  │──> socket
//!            └─────────────────────────────────────────────────────────────┘
//!  liveness sweeper (one per process) ──> outbox: ping, or close on pong/idle/expiry
//! ```
//!
//! The handlers run as boxed futures: an idle session's task then holds only the socket
//! and the wait on its outbox, not the largest state any handler can reach. Work that
//! waits on the network (upstream POSTs) runs in its own short-lived task and answers
//! through the outbox, so a slow backend never stalls the socket; at most
//! `limits.maxUpstreamInFlight` of them per connection (more are refused `overloaded`).
//!
//! Every write is bounded by `limits.writeTimeoutMs`, the close frame included: a peer
//! that stops reading is a slow consumer, and its socket is dropped without waiting
//! for a close it could never receive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tether_config::UpstreamEvent;
use tether_protocol::{
    AgentMessage, CloseCode, ErrorBody, ErrorCode, GatewayMessage, RawValue, Welcome, salvage_id,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};
use tracing::{Instrument, debug, debug_span};

use crate::auth::AgentIdentity;
use crate::hub::{Connection, Expect, Outbound, UpstreamSlot};
use crate::metrics::label;
use crate::rate::TokenBucket;
use crate::state::{Admission, AppState};
use crate::upstream::{Event, UpstreamError};

/// How long to wait for the peer's close frame after sending ours.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The task that serves one authenticated agent until its connection ends. `admission`
/// is its slot under `limits.maxConnections`, released when the session is over.
///
/// The session is built here, synchronously, and moved into the future as its only
/// state: an async fn's arguments are stored beside its locals for its whole life, so
/// passing the socket in and building the session inside would keep two copies of it.
pub fn task<T>(
    state: Arc<AppState>,
    ws: WebSocketStream<T>,
    identity: AgentIdentity,
    admission: Admission,
) -> impl Future<Output = ()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let grace = state.config.auth.jwt.refresh_grace_seconds;
    let conn = Connection::new(
        state.hub.next_connection_id(),
        &identity.agent_id,
        identity.groups,
        identity.expires_at.saturating_add(grace),
    );
    // A span lives as long as its connection and costs memory in the subscriber while
    // enabled: per-connection spans are debug-level, per-message work is traced above it.
    let span = debug_span!("session", agent = %conn.agent_id, connection = conn.id);
    let session = Session::new(state, conn, ws, admission);
    session.run().instrument(span)
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

struct Session<T> {
    state: Arc<AppState>,
    conn: Arc<Connection>,
    ws: WebSocketStream<T>,
    bucket: TokenBucket,
    rate_violations: u32,
    invalid_envelopes: u32,
    _admission: Admission,
}

/// Why the loop stopped: close with this code (`None`: the socket is already gone).
type Ended = Option<CloseCode>;

impl<T> Session<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    fn new(
        state: Arc<AppState>,
        conn: Arc<Connection>,
        ws: WebSocketStream<T>,
        admission: Admission,
    ) -> Self {
        let limits = &state.config.limits;
        let bucket = TokenBucket::new(
            limits.messages_per_second,
            limits.message_burst,
            Instant::now(),
        );
        Self {
            state,
            conn,
            ws,
            bucket,
            rate_violations: 0,
            invalid_envelopes: 0,
            _admission: admission,
        }
    }

    /// Registers the connection, serves it, and cleans up after it.
    ///
    /// Not an `async fn`: its argument would be stored in the future twice (once as the
    /// argument, once as the local it is moved into) — 400 bytes per idle connection.
    /// An async block captures the session once.
    fn run(self) -> impl Future<Output = ()> {
        let mut session = self;
        async move {
            let (state, conn) = (session.state.clone(), session.conn.clone());
            if let Some(old) = state.hub.register(&conn).replaced {
                debug!(old = old.id, "replaced older connection");
            }
            state.router.connected(&conn).await;
            state.metrics.connections_active.add(1, &[]);
            notify_upstream(&state, &conn, UpstreamEvent::Connect);

            let code = session.serve().await;
            debug!(code = code.map(CloseCode::code), "session ended");

            state.hub.unregister(&conn);
            state.router.disconnected(&conn).await;
            state.metrics.connections_active.add(-1, &[]);
            let code_label = code.map(|c| i64::from(c.code())).unwrap_or(1006);
            state
                .metrics
                .connections_closed
                .add(1, &label("code", code_label));
            let lost = conn.queue_len();
            if lost > 0 {
                state.metrics.messages_dropped.add(lost as u64, &[]);
            }
            notify_upstream(&state, &conn, UpstreamEvent::Disconnect);
        }
    }

    /// Runs until the connection ends; returns the close code used.
    async fn serve(&mut self) -> Ended {
        let welcome = GatewayMessage::Welcome(Welcome {
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
        });
        if Box::pin(self.write_now(welcome)).await.is_err() {
            return None;
        }
        let mut batch = Vec::new();
        let ended = loop {
            tokio::select! {
                frame = self.ws.next() => {
                    if let Some(ended) = Box::pin(self.on_inbound(frame)).await {
                        break ended;
                    }
                }
                () = self.conn.queued() => {
                    self.conn.take_queued(&mut batch);
                    if let Some(ended) = Box::pin(self.write_batch(&mut batch)).await {
                        break ended;
                    }
                }
            }
        };
        if let Some(code) = ended {
            Box::pin(self.close(code)).await;
        }
        ended
    }

    async fn on_inbound(&mut self, frame: Option<Result<Message, WsError>>) -> Option<Ended> {
        let now = Instant::now();
        let message = match frame {
            None => return Some(None),
            Some(Ok(message)) => message,
            Some(Err(e)) => return Some(close_code_for(&e)),
        };
        self.conn
            .clock
            .touch(matches!(message, Message::Text(_) | Message::Binary(_)));
        match message {
            Message::Text(text) => {
                self.state
                    .metrics
                    .messages_received
                    .add(1, &label("kind", "text"));
                if let Some(ended) = self.check_rate(now).await {
                    return ended;
                }
                self.on_text(text.as_str()).await
            }
            Message::Binary(data) => {
                self.state
                    .metrics
                    .messages_received
                    .add(1, &label("kind", "binary"));
                if let Some(ended) = self.check_rate(now).await {
                    return ended;
                }
                self.forward_binary(data);
                None
            }
            // tungstenite answers pings and completes the close handshake itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
            Message::Close(_) => None,
        }
    }

    /// Applies the rate limit. Over the limit the message is refused with an error
    /// frame; a sender that keeps going is closed with 1008.
    async fn check_rate(&mut self, now: Instant) -> Option<Option<Ended>> {
        if self.bucket.try_take(now) {
            self.rate_violations = 0;
            return None;
        }
        self.rate_violations += 1;
        if self.rate_violations > self.state.config.limits.max_rate_violations {
            return Some(Some(Some(CloseCode::PolicyViolation)));
        }
        let error = GatewayMessage::Error {
            id: None,
            error: ErrorBody::new(
                ErrorCode::RateLimited,
                "message rate exceeded; message dropped",
            ),
        };
        if self.write_now(error).await.is_err() {
            return Some(Some(None));
        }
        Some(None)
    }

    async fn on_text(&mut self, text: &str) -> Option<Ended> {
        let message = match AgentMessage::decode(text) {
            Ok(message) => {
                self.invalid_envelopes = 0;
                message
            }
            Err(e) => {
                self.invalid_envelopes += 1;
                if self.invalid_envelopes > self.state.config.limits.max_invalid_envelopes {
                    return Some(Some(CloseCode::PolicyViolation));
                }
                let error = GatewayMessage::Error {
                    id: salvage_id(text),
                    error: ErrorBody::new(ErrorCode::BadRequest, e.to_string()),
                };
                return self.write_now(error).await.err().map(|()| None);
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
                    debug!(%id, "response for no pending request (late or unknown)");
                }
            }
            AgentMessage::Ack { id } => {
                let null = RawValue::from_string("null".into()).expect("valid JSON");
                self.state
                    .hub
                    .complete(self.conn.id, &id, Expect::Ack, Ok(null));
            }
            AgentMessage::Refresh { token } => return self.refresh(&token).await,
        }
        None
    }

    async fn refresh(&mut self, token: &str) -> Option<Ended> {
        match self.state.verifier.verify(token) {
            Ok(identity) if identity.agent_id == *self.conn.agent_id => {
                let grace = self.state.config.auth.jwt.refresh_grace_seconds;
                self.conn
                    .clock
                    .set_expiry(identity.expires_at.saturating_add(grace));
                // The new token's groups are the agent's groups from now on: a token
                // that drops a group must also stop that group's messages.
                if identity.groups != self.conn.groups() {
                    self.state.hub.set_groups(&self.conn, identity.groups);
                }
                let reply = GatewayMessage::Refreshed {
                    expires_at: Some(identity.expires_at),
                };
                self.write_now(reply).await.err().map(|()| None)
            }
            Ok(_) => Some(Some(CloseCode::TokenInvalid)),
            Err(e) => {
                debug!(%e, "refresh refused");
                self.state
                    .metrics
                    .auth_failures
                    .add(1, &label("reason", "refresh"));
                Some(Some(CloseCode::TokenInvalid))
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

    /// Writes one frame the session itself produced (welcome, error, refreshed).
    async fn write_now(&mut self, message: GatewayMessage) -> Result<(), ()> {
        let text = message.encode();
        let timeout = self.write_timeout();
        match tokio::time::timeout(timeout, self.ws.send(Message::text(text))).await {
            Ok(Ok(())) => {
                self.state
                    .metrics
                    .messages_sent
                    .add(1, &label("kind", "control"));
                Ok(())
            }
            _ => Err(()),
        }
    }

    /// Writes queued frames in order; a `Close` ends the session after what precedes it.
    async fn write_batch(&mut self, batch: &mut Vec<Outbound>) -> Option<Ended> {
        let mut close = None;
        let mut written = 0u64;
        let timeout = self.write_timeout();
        let writes = async {
            for frame in batch.drain(..) {
                let message = match frame {
                    Outbound::Text(text) => Message::Text(text),
                    Outbound::Binary(data) => Message::Binary(data),
                    Outbound::Ping => Message::Ping(Default::default()),
                    Outbound::Close(code) => {
                        close = Some(code);
                        break;
                    }
                };
                self.ws.feed(message).await?;
                written += 1;
            }
            self.ws.flush().await
        };
        let result = tokio::time::timeout(timeout, writes).await;
        batch.clear();
        if written > 0 {
            self.state
                .metrics
                .messages_sent
                .add(written, &label("kind", "queued"));
        }
        match result {
            Ok(Ok(())) => close.map(Some),
            Ok(Err(_)) => Some(None),
            Err(_) => Some(Some(CloseCode::SlowConsumer)),
        }
    }

    /// `limits.writeTimeoutMs`.
    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.state.config.limits.write_timeout_ms)
    }

    /// Sends a close frame and waits (bounded) for the peer's answer, so that everything
    /// written before it is known to have been read.
    ///
    /// Every step is bounded: a peer that stops reading (zero receive window) would
    /// otherwise hold this task, its slot, its hub entry and its write buffer forever,
    /// since sending waits for the window to open.
    async fn close(&mut self, code: CloseCode) {
        let frame = Message::Close(Some(CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: code.reason().into(),
        }));
        if code == CloseCode::SlowConsumer {
            // It does not read: write the close only if the socket takes it at once,
            // then drop the socket without waiting for anything.
            let _ = self.ws.send(frame).now_or_never();
            return;
        }
        let timeout = self.write_timeout();
        if !matches!(
            tokio::time::timeout(timeout, self.ws.send(frame)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        if code == CloseCode::PingTimeout {
            // A dead peer will not answer; do not hold its memory for the timeout.
            return;
        }
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// The RFC 6455 close code for a read error, `None` when the socket is simply gone.
fn close_code_for(error: &WsError) -> Ended {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => Some(CloseCode::MessageTooBig),
        WsError::Capacity(_) => Some(CloseCode::MessageTooBig),
        WsError::Utf8(_) => Some(CloseCode::InvalidPayload),
        WsError::Protocol(_) => Some(CloseCode::ProtocolError),
        _ => None,
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

    #[test]
    fn read_errors_map_to_rfc_close_codes() {
        let too_long = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        assert_eq!(close_code_for(&too_long), Some(CloseCode::MessageTooBig));
        assert_eq!(close_code_for(&WsError::ConnectionClosed), None);
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

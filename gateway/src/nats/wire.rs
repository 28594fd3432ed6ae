//! What travels between pods: a small JSON header ([`Call`] or [`Answer`]) and, for
//! messages, the frame exactly as the agent will receive it, so the receiving pod
//! queues it without re-encoding.
//!
//! ```text
//!  payload = u16 BE length of meta | meta (JSON) | frame bytes (text or binary)
//! ```
//!
//! Trace context rides in NATS headers (`traceparent`, `tracestate`, W3C format) so
//! a push is one trace across the pods that handle it.

use bytes::{BufMut, Bytes, BytesMut};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde::{Deserialize, Serialize};
use tether_protocol::ErrorBody;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::Outbound;
use crate::router::{Page, Presence, RouteError};

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Shorter than its own length prefix says.
    #[error("truncated payload")]
    Truncated,
    /// The meta JSON does not parse.
    #[error("bad meta: {0}")]
    Meta(#[from] serde_json::Error),
    /// A text frame is not UTF-8.
    #[error("text frame is not UTF-8")]
    NotUtf8,
    /// The meta is larger than a length prefix can say.
    #[error("meta too large")]
    MetaTooLarge,
}

/// What one pod asks another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// Queue the frame (the body) for `agent`; wait `ack_ms` for its ack if set.
    Push {
        /// Agent id.
        agent: String,
        /// Message id.
        id: String,
        /// Whether the body is a binary frame.
        binary: bool,
        /// Wait for the agent's ack this long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ack_ms: Option<u64>,
    },
    /// Send the request (the body) to `agent` and answer with its reply.
    Request {
        /// Agent id.
        agent: String,
        /// Request id.
        id: String,
        /// How long to wait for the agent.
        timeout_ms: u64,
    },
    /// Presence of a local agent.
    Presence {
        /// Agent id.
        agent: String,
    },
    /// Close a local agent's connection.
    Disconnect {
        /// Agent id.
        agent: String,
    },
    /// Close `agent`'s connection `conn` here: a newer one registered elsewhere.
    Replace {
        /// Agent id.
        agent: String,
        /// The connection the directory named before it was overwritten.
        conn: u64,
        /// The boot id of the process that holds `conn` (absent from older pods).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot: Option<String>,
    },
    /// A page of local agents after `cursor`.
    List {
        /// Exclusive lower bound.
        cursor: Option<String>,
        /// Page size.
        limit: usize,
    },
    /// Are you there?
    Ping,
    /// A durable message was stored for `agent`: if it is connected here, deliver its
    /// backlog. Published without a reply (the message is safe in the stream).
    Kick {
        /// Agent id.
        agent: String,
    },
    /// Fan the frame (the body) out to local members of `group`, or to everyone.
    Fanout {
        /// The group; `None` for a broadcast.
        group: Option<String>,
        /// Whether the body is a binary frame.
        binary: bool,
    },
}

/// A presence record as it travels (the API type is serialize-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePresence {
    /// Agent id.
    pub agent_id: String,
    /// Connection id on its pod.
    pub connection_id: String,
    /// Pod.
    pub pod: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Unix seconds.
    pub connected_at: u64,
}

impl From<Presence> for WirePresence {
    fn from(p: Presence) -> Self {
        Self {
            agent_id: p.agent_id,
            connection_id: p.connection_id,
            pod: p.pod,
            groups: p.groups,
            connected_at: p.connected_at,
        }
    }
}

impl From<WirePresence> for Presence {
    fn from(p: WirePresence) -> Self {
        Self {
            agent_id: p.agent_id,
            connection_id: p.connection_id,
            pod: p.pod,
            groups: p.groups,
            connected_at: p.connected_at,
        }
    }
}

/// What a pod answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Answer {
    /// Done (queued, acked, closed, pong).
    Ok,
    /// The agent is not connected to this pod: the caller's directory entry is stale.
    NotHere,
    /// The agent's queue is full (429).
    QueueFull,
    /// Too many requests wait for this agent (429).
    TooManyPending,
    /// A message with this id already waits for this agent's answer (409).
    Duplicate,
    /// The agent did not answer in time (504).
    Timeout {
        /// The wait, in milliseconds.
        ms: u64,
    },
    /// The agent went away before answering, or refused an acked push (502).
    Gone,
    /// The agent's answer to a request.
    Reply {
        /// Its `data`, as JSON text (a `RawValue` cannot sit in an internally tagged
        /// enum: serde buffers the content first).
        data: String,
    },
    /// The agent answered a request with an error.
    AgentError {
        /// Its error.
        error: ErrorBody,
    },
    /// A presence record.
    Presence {
        /// The record.
        presence: WirePresence,
    },
    /// A page of local agents.
    Page {
        /// Agents.
        agents: Vec<WirePresence>,
        /// Whether the pod has more after this page.
        more: bool,
    },
    /// How many local connections a fan-out reached.
    Delivered {
        /// The answering pod.
        pod: String,
        /// Count.
        n: usize,
    },
    /// The pod cannot serve the call (it is shutting down, or the call is malformed).
    Failed {
        /// Why.
        message: String,
    },
}

impl Answer {
    /// The answer for a routing failure.
    pub fn from_error(e: &RouteError) -> Self {
        match e {
            RouteError::NotConnected => Answer::NotHere,
            RouteError::QueueFull | RouteError::DurableFull(_) => Answer::QueueFull,
            RouteError::TooManyPending => Answer::TooManyPending,
            RouteError::Duplicate => Answer::Duplicate,
            RouteError::Timeout(d) => Answer::Timeout {
                ms: d.as_millis() as u64,
            },
            RouteError::AgentGone => Answer::Gone,
            RouteError::Unavailable(m) => Answer::Failed { message: m.clone() },
            // Durable-store outcomes, never the answer of a pod call.
            RouteError::KeyReused(_) | RouteError::AmbiguousId(_) => Answer::Failed {
                message: e.to_string(),
            },
        }
    }

    /// The routing failure an answer stands for, if it is one. `NotHere` maps to
    /// `NotConnected`; the router decides whether that means "stale entry".
    pub fn to_error(&self) -> Option<RouteError> {
        Some(match self {
            Answer::NotHere => RouteError::NotConnected,
            Answer::QueueFull => RouteError::QueueFull,
            Answer::TooManyPending => RouteError::TooManyPending,
            Answer::Duplicate => RouteError::Duplicate,
            Answer::Timeout { ms } => RouteError::Timeout(std::time::Duration::from_millis(*ms)),
            Answer::Gone => RouteError::AgentGone,
            Answer::Failed { message } => RouteError::Unavailable(message.clone()),
            _ => return None,
        })
    }

    /// Encodes the answer (answers carry no body).
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("answers serialize"))
    }

    /// Decodes an answer.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        Ok(serde_json::from_slice(payload)?)
    }
}

/// Encodes a call with an optional frame body. The body is the shared frame; it is
/// copied once into the NATS payload, never re-encoded.
pub fn encode_call(call: &Call, body: &[u8]) -> Result<Bytes, WireError> {
    let meta = serde_json::to_vec(call)?;
    let len = u16::try_from(meta.len()).map_err(|_| WireError::MetaTooLarge)?;
    let mut out = BytesMut::with_capacity(2 + meta.len() + body.len());
    out.put_u16(len);
    out.put_slice(&meta);
    out.put_slice(body);
    Ok(out.freeze())
}

/// Decodes a call; the body shares the payload's memory.
pub fn decode_call(payload: &Bytes) -> Result<(Call, Bytes), WireError> {
    if payload.len() < 2 {
        return Err(WireError::Truncated);
    }
    let len = usize::from(u16::from_be_bytes([payload[0], payload[1]]));
    let meta = payload.get(2..2 + len).ok_or(WireError::Truncated)?;
    let call = serde_json::from_slice(meta)?;
    Ok((call, payload.slice(2 + len..)))
}

/// The bytes of a frame and whether it is binary. `Close` and `Ping` never travel: they
/// are local to the pod that holds the socket.
pub fn frame_body(frame: &Outbound) -> (Bytes, bool) {
    match frame {
        Outbound::Text(text) => (Bytes::from(text.clone()), false),
        Outbound::Binary(bytes) => (bytes.clone(), true),
        Outbound::Close(_) | Outbound::Ping | Outbound::Raw(_) => (Bytes::new(), true),
    }
}

/// Rebuilds a frame from a call's body.
pub fn frame_of(body: Bytes, binary: bool) -> Result<Outbound, WireError> {
    if binary {
        Ok(Outbound::Binary(body))
    } else {
        Utf8Bytes::try_from(body)
            .map(Outbound::Text)
            .map_err(|_| WireError::NotUtf8)
    }
}

/// A page of local agents as the caller merges it.
pub fn page_of(answer: Answer) -> Option<(Vec<Presence>, bool)> {
    match answer {
        Answer::Page { agents, more } => Some((agents.into_iter().map(Into::into).collect(), more)),
        _ => None,
    }
}

/// Merges per-pod pages (each ordered by agent id, each the pod's first `limit` agents
/// after the cursor) into the pool's page: the first `limit` ids overall. There is a
/// next page if anything was left out or any pod had more.
pub fn merge_pages(pages: Vec<(Vec<Presence>, bool)>, limit: usize) -> Page {
    let mut more = false;
    let mut all = Vec::new();
    for (agents, pod_more) in pages {
        more |= pod_more;
        all.extend(agents);
    }
    all.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    // The same agent may briefly be on two pods (newest-wins in flight): list it once.
    all.dedup_by(|a, b| a.agent_id == b.agent_id);
    if all.len() > limit {
        all.truncate(limit);
        more = true;
    }
    let next_cursor = if more {
        all.last().map(|p| p.agent_id.clone())
    } else {
        None
    };
    Page {
        agents: all,
        next_cursor,
    }
}

/// The W3C `traceparent` value of a span context, if it is valid.
pub fn traceparent(cx: &SpanContext) -> Option<String> {
    cx.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            cx.trace_id(),
            cx.span_id(),
            cx.trace_flags().to_u8()
        )
    })
}

/// Parses a W3C `traceparent` (version 00) into a remote span context.
pub fn parse_traceparent(value: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let cx = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    cx.is_valid().then_some(cx)
}

/// The trace context to send along: the current `tracing` span's OpenTelemetry context
/// when the OTel layer is installed, else the ambient OpenTelemetry context.
pub fn current_span_context() -> SpanContext {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let from_span = tracing::Span::current().context();
    let cx = from_span.span().span_context().clone();
    if cx.is_valid() {
        cx
    } else {
        opentelemetry::Context::current()
            .span()
            .span_context()
            .clone()
    }
}

/// NATS headers carrying the current trace context (empty when there is none).
pub fn trace_headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    let cx = current_span_context();
    if let Some(value) = traceparent(&cx) {
        headers.insert("traceparent", value.as_str());
        let state = cx.trace_state().header();
        if !state.is_empty() {
            headers.insert("tracestate", state.as_str());
        }
    }
    headers
}

/// The remote parent carried by a message's headers.
pub fn remote_parent(headers: Option<&async_nats::HeaderMap>) -> Option<opentelemetry::Context> {
    let headers = headers?;
    let parent = headers.get("traceparent")?.as_str();
    let state = headers.get("tracestate").map(|v| v.as_str());
    let cx = parse_traceparent(parent, state)?;
    Some(opentelemetry::Context::new().with_remote_span_context(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(id: &str, pod: &str) -> Presence {
        Presence {
            agent_id: id.into(),
            connection_id: "1".into(),
            pod: pod.into(),
            groups: vec![],
            connected_at: 0,
        }
    }

    #[test]
    fn calls_round_trip_with_their_body() {
        let call = Call::Push {
            agent: "a.b*>".into(),
            id: "m1".into(),
            binary: false,
            ack_ms: Some(5),
        };
        let payload = encode_call(&call, br#"{"type":"push"}"#).unwrap();
        let (decoded, body) = decode_call(&payload).unwrap();
        assert_eq!(decoded, call);
        assert_eq!(&body[..], br#"{"type":"push"}"#);
        assert!(
            matches!(frame_of(body, false).unwrap(), Outbound::Text(t) if t.as_str() == r#"{"type":"push"}"#)
        );
        assert!(matches!(
            frame_of(Bytes::from_static(&[0xff]), false),
            Err(WireError::NotUtf8)
        ));
        assert!(matches!(
            decode_call(&Bytes::from_static(&[0, 9, b'{'])),
            Err(WireError::Truncated)
        ));
        assert!(decode_call(&Bytes::from_static(&[0])).is_err());
    }

    #[test]
    fn answers_map_to_route_errors_and_back() {
        let errors = [
            RouteError::NotConnected,
            RouteError::QueueFull,
            RouteError::TooManyPending,
            RouteError::Timeout(std::time::Duration::from_millis(1500)),
            RouteError::AgentGone,
            RouteError::Unavailable("x".into()),
        ];
        for e in errors {
            let answer = Answer::decode(&Answer::from_error(&e).encode()).unwrap();
            assert_eq!(answer.to_error(), Some(e));
        }
        assert_eq!(Answer::Ok.to_error(), None);
    }

    #[test]
    fn pages_merge_in_id_order_with_a_cursor_when_cut() {
        let pages = vec![
            (vec![presence("a", "p0"), presence("d", "p0")], false),
            (vec![presence("b", "p1"), presence("c", "p1")], true),
            (vec![presence("b", "p2")], false),
        ];
        let page = merge_pages(pages, 3);
        let ids: Vec<&str> = page.agents.iter().map(|p| p.agent_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(page.next_cursor.as_deref(), Some("c"));
        let last = merge_pages(vec![(vec![presence("z", "p0")], false)], 3);
        assert_eq!(last.next_cursor, None);
        // A pod that says it has more keeps the listing going even if the page is short.
        let short = merge_pages(vec![(vec![presence("z", "p0")], true)], 3);
        assert_eq!(short.next_cursor.as_deref(), Some("z"));
    }

    #[test]
    fn traceparent_round_trips() {
        let cx = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let header = traceparent(&cx).unwrap();
        assert_eq!(
            header,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let parsed = parse_traceparent(&header, Some("k=v")).unwrap();
        assert_eq!(parsed.trace_id(), cx.trace_id());
        assert_eq!(parsed.span_id(), cx.span_id());
        assert!(parsed.is_remote());
        assert_eq!(parsed.trace_state().get("k"), Some("v"));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
        assert!(traceparent(&SpanContext::empty_context()).is_none());
    }
}

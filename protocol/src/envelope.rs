//! Envelopes: the JSON objects carried in text frames, one per frame.
//!
//! Decoding goes through one flat [`Wire`] struct (every field optional) and is then
//! checked into a typed enum, so that an error names exactly what is wrong ("`send`
//! needs an `id`") instead of a serde message about enum variants. serde's internally
//! tagged enums cannot hold a borrowed [`RawValue`], which is the other reason.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::MAX_ID_LEN;

/// A machine-readable error code, carried in `error` objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The envelope could not be parsed or lacked a required field.
    BadRequest,
    /// The message exceeded a size limit.
    TooLarge,
    /// The sender exceeded its message rate.
    RateLimited,
    /// No answer arrived before the deadline.
    Timeout,
    /// The upstream (tenant backend) failed or answered with an error.
    UpstreamError,
    /// Nothing is configured to receive the message (no upstream URL).
    Unavailable,
    /// The agent's handler failed (used in `response` from an agent).
    HandlerError,
    /// The gateway failed internally.
    Internal,
    /// Too much of the sender's work is in flight (its upstream calls, or the pod's);
    /// retry after `retryAfterMs`.
    Overloaded,
    /// A code this version does not know; newer peers may send more codes.
    #[serde(other)]
    Unknown,
}

/// The `error` object of `nack`, `response` and `error` envelopes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail; never needed to decide what to do.
    #[serde(default)]
    pub message: String,
}

impl ErrorBody {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Why an envelope was refused. The gateway answers these with an `error` envelope (and
/// the `id`, when one could be read), never by dropping the connection at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame was not a JSON object of the expected shape.
    #[error("invalid envelope: {0}")]
    InvalidJson(String),
    /// `type` names no envelope this side accepts.
    #[error("unknown envelope type `{0}`")]
    UnknownType(String),
    /// A required field is missing.
    #[error("`{kind}` needs `{field}`")]
    MissingField {
        /// The envelope type.
        kind: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// An id is empty or longer than [`MAX_ID_LEN`].
    #[error("id must be 1..={MAX_ID_LEN} bytes without control characters")]
    BadId,
}

/// The session facts the gateway sends first on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The agent id (the token's `sub`).
    pub agent_id: String,
    /// A unique id of this connection, for logs and support.
    pub connection_id: String,
    /// When the token expires (Unix seconds); refresh before then.
    pub expires_at: Option<u64>,
    /// The largest message the gateway accepts, in bytes.
    pub max_message_bytes: usize,
    /// How many messages per second the agent may send.
    pub messages_per_second: u32,
}

/// What an agent sends to the gateway.
#[derive(Debug, Clone)]
pub enum AgentMessage {
    /// Deliver `data` to the tenant's upstream; answered with `ack` or `nack`. The id is an
    /// idempotency key: a retry after a lost `ack` reuses it.
    Send { id: String, data: Box<RawValue> },
    /// Ask the upstream and wait for its answer; answered with `response`.
    Request {
        id: String,
        data: Box<RawValue>,
        timeout_ms: Option<u64>,
    },
    /// The agent's answer to a gateway `request`.
    Response {
        id: String,
        result: Result<Box<RawValue>, ErrorBody>,
    },
    /// The agent received a `push` that asked for an acknowledgement.
    Ack { id: String },
    /// A fresh token for the same agent, extending the session.
    Refresh { token: String },
}

/// What the gateway sends to an agent.
#[derive(Debug, Clone)]
pub enum GatewayMessage {
    /// First message on every connection.
    Welcome(Welcome),
    /// A message from a backend. With `ack: true` the agent must answer `ack`.
    Push {
        id: String,
        data: Box<RawValue>,
        ack: bool,
    },
    /// A backend asks the agent; the agent answers `response` with the same id.
    Request {
        id: String,
        data: Box<RawValue>,
        timeout_ms: u64,
    },
    /// The upstream's answer to an agent `request`.
    Response {
        id: String,
        result: Result<Box<RawValue>, ErrorBody>,
    },
    /// The upstream accepted the agent's `send`.
    Ack { id: String },
    /// The upstream did not accept the `send`; retry after `retry_after_ms` if given.
    Nack {
        id: String,
        error: ErrorBody,
        retry_after_ms: Option<u64>,
    },
    /// The `refresh` was accepted; the session now ends at `expires_at`.
    Refreshed { expires_at: Option<u64> },
    /// The gateway will close this connection soon (drain, rebalance): reconnect after
    /// `after_ms`, to any gateway.
    Reconnect { after_ms: u64, reason: String },
    /// The previous envelope was refused. `id` is set when it could be read.
    Error {
        id: Option<String>,
        error: ErrorBody,
    },
}

/// The flat shape of every envelope on the wire.
#[derive(Default, Serialize, Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    ack: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    connection_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_message_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    messages_per_second: Option<u32>,
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is valid JSON")
}

fn owned_data(data: Option<&RawValue>) -> Box<RawValue> {
    data.map(ToOwned::to_owned).unwrap_or_else(null)
}

fn parse(text: &str) -> Result<Wire<'_>, ProtocolError> {
    serde_json::from_str(text).map_err(|e| ProtocolError::InvalidJson(e.to_string()))
}

fn checked_id(kind: &'static str, id: Option<String>) -> Result<String, ProtocolError> {
    let id = id.ok_or(ProtocolError::MissingField { kind, field: "id" })?;
    if !valid_id(&id) {
        return Err(ProtocolError::BadId);
    }
    Ok(id)
}

fn result_of(wire: &Wire<'_>) -> Result<Box<RawValue>, ErrorBody> {
    match &wire.error {
        Some(error) => Err(error.clone()),
        None => Ok(owned_data(wire.data)),
    }
}

/// Reads the `id` of an envelope that failed to decode, so the `error` answer can name
/// it. Returns `None` when even that is impossible.
pub fn salvage_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    serde_json::from_str::<IdOnly>(text)
        .ok()?
        .id
        .filter(|id| valid_id(id))
}

/// Whether an id is acceptable: 1..=[`MAX_ID_LEN`] bytes, no control characters (ids
/// end up in log lines, HTTP headers and bus subjects).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

// === impl AgentMessage ===

impl AgentMessage {
    /// Parses one text frame sent by an agent.
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let wire = parse(text)?;
        match &*wire.kind {
            "send" => Ok(AgentMessage::Send {
                data: owned_data(wire.data),
                id: checked_id("send", wire.id)?,
            }),
            "request" => Ok(AgentMessage::Request {
                data: owned_data(wire.data),
                timeout_ms: wire.timeout_ms,
                id: checked_id("request", wire.id)?,
            }),
            "response" => Ok(AgentMessage::Response {
                result: result_of(&wire),
                id: checked_id("response", wire.id)?,
            }),
            "ack" => Ok(AgentMessage::Ack {
                id: checked_id("ack", wire.id)?,
            }),
            "refresh" => Ok(AgentMessage::Refresh {
                token: wire.token.ok_or(ProtocolError::MissingField {
                    kind: "refresh",
                    field: "token",
                })?,
            }),
            other => Err(ProtocolError::UnknownType(other.to_owned())),
        }
    }

    /// Encodes the message as one text frame.
    pub fn encode(&self) -> String {
        let wire = match self {
            AgentMessage::Send { id, data } => Wire {
                kind: "send".into(),
                id: Some(id.clone()),
                data: Some(data),
                ..Wire::default()
            },
            AgentMessage::Request {
                id,
                data,
                timeout_ms,
            } => Wire {
                kind: "request".into(),
                id: Some(id.clone()),
                data: Some(data),
                timeout_ms: *timeout_ms,
                ..Wire::default()
            },
            AgentMessage::Response { id, result } => response_wire(id, result),
            AgentMessage::Ack { id } => Wire {
                kind: "ack".into(),
                id: Some(id.clone()),
                ..Wire::default()
            },
            AgentMessage::Refresh { token } => Wire {
                kind: "refresh".into(),
                token: Some(token.clone()),
                ..Wire::default()
            },
        };
        to_text(&wire)
    }
}

fn response_wire<'a>(id: &str, result: &'a Result<Box<RawValue>, ErrorBody>) -> Wire<'a> {
    let (data, error) = match result {
        Ok(data) => (Some(&**data), None),
        Err(error) => (None, Some(error.clone())),
    };
    Wire {
        kind: "response".into(),
        id: Some(id.to_owned()),
        data,
        error,
        ..Wire::default()
    }
}

fn to_text(wire: &Wire<'_>) -> String {
    serde_json::to_string(wire).expect("envelopes always serialize")
}

// === impl GatewayMessage ===

impl GatewayMessage {
    /// Parses one text frame sent by the gateway (used by the SDK and the bench).
    pub fn decode(text: &str) -> Result<Self, ProtocolError> {
        let wire = parse(text)?;
        match &*wire.kind {
            "welcome" => Ok(GatewayMessage::Welcome(Welcome {
                agent_id: wire.agent_id.ok_or(ProtocolError::MissingField {
                    kind: "welcome",
                    field: "agent_id",
                })?,
                connection_id: wire.connection_id.unwrap_or_default(),
                expires_at: wire.expires_at,
                max_message_bytes: wire.max_message_bytes.unwrap_or_default(),
                messages_per_second: wire.messages_per_second.unwrap_or_default(),
            })),
            "push" => Ok(GatewayMessage::Push {
                data: owned_data(wire.data),
                ack: wire.ack,
                id: checked_id("push", wire.id)?,
            }),
            "request" => Ok(GatewayMessage::Request {
                data: owned_data(wire.data),
                timeout_ms: wire.timeout_ms.unwrap_or_default(),
                id: checked_id("request", wire.id)?,
            }),
            "response" => Ok(GatewayMessage::Response {
                result: result_of(&wire),
                id: checked_id("response", wire.id)?,
            }),
            "ack" => Ok(GatewayMessage::Ack {
                id: checked_id("ack", wire.id)?,
            }),
            "nack" => Ok(GatewayMessage::Nack {
                error: wire.error.clone().unwrap_or_else(|| {
                    ErrorBody::new(ErrorCode::Unknown, "nack without error object")
                }),
                retry_after_ms: wire.retry_after_ms,
                id: checked_id("nack", wire.id)?,
            }),
            "refreshed" => Ok(GatewayMessage::Refreshed {
                expires_at: wire.expires_at,
            }),
            "reconnect" => Ok(GatewayMessage::Reconnect {
                after_ms: wire.after_ms.unwrap_or_default(),
                reason: wire.reason.unwrap_or_default(),
            }),
            "error" => Ok(GatewayMessage::Error {
                id: wire.id,
                error: wire.error.unwrap_or_else(|| {
                    ErrorBody::new(ErrorCode::Unknown, "error without error object")
                }),
            }),
            other => Err(ProtocolError::UnknownType(other.to_owned())),
        }
    }

    /// Encodes the message as one text frame.
    pub fn encode(&self) -> String {
        let wire = match self {
            GatewayMessage::Welcome(welcome) => Wire {
                kind: "welcome".into(),
                agent_id: Some(welcome.agent_id.clone()),
                connection_id: Some(welcome.connection_id.clone()),
                expires_at: welcome.expires_at,
                max_message_bytes: Some(welcome.max_message_bytes),
                messages_per_second: Some(welcome.messages_per_second),
                ..Wire::default()
            },
            GatewayMessage::Push { id, data, ack } => return encode_push(id, data, *ack),
            GatewayMessage::Request {
                id,
                data,
                timeout_ms,
            } => Wire {
                kind: "request".into(),
                id: Some(id.clone()),
                data: Some(data),
                timeout_ms: Some(*timeout_ms),
                ..Wire::default()
            },
            GatewayMessage::Response { id, result } => response_wire(id, result),
            GatewayMessage::Ack { id } => Wire {
                kind: "ack".into(),
                id: Some(id.clone()),
                ..Wire::default()
            },
            GatewayMessage::Nack {
                id,
                error,
                retry_after_ms,
            } => Wire {
                kind: "nack".into(),
                id: Some(id.clone()),
                error: Some(error.clone()),
                retry_after_ms: *retry_after_ms,
                ..Wire::default()
            },
            GatewayMessage::Refreshed { expires_at } => Wire {
                kind: "refreshed".into(),
                expires_at: *expires_at,
                ..Wire::default()
            },
            GatewayMessage::Reconnect { after_ms, reason } => Wire {
                kind: "reconnect".into(),
                after_ms: Some(*after_ms),
                reason: Some(reason.clone()),
                ..Wire::default()
            },
            GatewayMessage::Error { id, error } => Wire {
                kind: "error".into(),
                id: id.clone(),
                error: Some(error.clone()),
                ..Wire::default()
            },
        };
        to_text(&wire)
    }
}

/// Encodes a `push` envelope from a borrowed payload. This is the hot path of push,
/// group send and broadcast: the result is encoded once and shared by every recipient.
pub fn encode_push(id: &str, data: &RawValue, ack: bool) -> String {
    to_text(&Wire {
        kind: "push".into(),
        id: Some(id.to_owned()),
        data: Some(data),
        ack,
        ..Wire::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn decodes_agent_send_keeping_payload_bytes() {
        let msg = AgentMessage::decode(r#"{"type":"send","id":"m1","data":{"b": [1, 2],"a":1}}"#)
            .unwrap();
        match msg {
            AgentMessage::Send { id, data } => {
                assert_eq!(id, "m1");
                // Raw: whitespace and key order are kept exactly as sent.
                assert_eq!(data.get(), r#"{"b": [1, 2],"a":1}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn missing_data_is_null() {
        let msg = AgentMessage::decode(r#"{"type":"send","id":"m1"}"#).unwrap();
        assert!(matches!(msg, AgentMessage::Send { data, .. } if data.get() == "null"));
    }

    #[test]
    fn refuses_bad_envelopes_with_precise_errors() {
        assert!(matches!(
            AgentMessage::decode("not json"),
            Err(ProtocolError::InvalidJson(_))
        ));
        assert!(matches!(
            AgentMessage::decode(r#"{"id":"x"}"#),
            Err(ProtocolError::InvalidJson(_))
        ));
        assert_eq!(
            AgentMessage::decode(r#"{"type":"launch"}"#).unwrap_err(),
            ProtocolError::UnknownType("launch".into())
        );
        assert_eq!(
            AgentMessage::decode(r#"{"type":"send","data":1}"#).unwrap_err(),
            ProtocolError::MissingField {
                kind: "send",
                field: "id"
            }
        );
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            AgentMessage::decode(&format!(r#"{{"type":"ack","id":"{long}"}}"#)).unwrap_err(),
            ProtocolError::BadId
        );
        assert_eq!(
            AgentMessage::decode(r#"{"type":"ack","id":""}"#).unwrap_err(),
            ProtocolError::BadId
        );
        assert_eq!(
            AgentMessage::decode(r#"{"type":"refresh"}"#).unwrap_err(),
            ProtocolError::MissingField {
                kind: "refresh",
                field: "token"
            }
        );
    }

    #[test]
    fn gateway_messages_round_trip() {
        let messages = vec![
            GatewayMessage::Welcome(Welcome {
                agent_id: "agent-1".into(),
                connection_id: "c1".into(),
                expires_at: Some(1_900_000_000),
                max_message_bytes: 65536,
                messages_per_second: 100,
            }),
            GatewayMessage::Push {
                id: "p1".into(),
                data: raw(r#"{"x":1}"#),
                ack: true,
            },
            GatewayMessage::Request {
                id: "r1".into(),
                data: raw("[1]"),
                timeout_ms: 5000,
            },
            GatewayMessage::Response {
                id: "r2".into(),
                result: Err(ErrorBody::new(ErrorCode::Timeout, "upstream took too long")),
            },
            GatewayMessage::Ack { id: "s1".into() },
            GatewayMessage::Nack {
                id: "s2".into(),
                error: ErrorBody::new(ErrorCode::UpstreamError, "503"),
                retry_after_ms: Some(1000),
            },
            GatewayMessage::Refreshed {
                expires_at: Some(5),
            },
            GatewayMessage::Reconnect {
                after_ms: 250,
                reason: "drain".into(),
            },
            GatewayMessage::Error {
                id: None,
                error: ErrorBody::new(ErrorCode::BadRequest, "invalid envelope"),
            },
        ];
        for msg in messages {
            let text = msg.encode();
            let back = GatewayMessage::decode(&text).unwrap();
            assert_eq!(back.encode(), text, "round trip of {text}");
        }
    }

    #[test]
    fn agent_messages_round_trip() {
        let messages = vec![
            AgentMessage::Send {
                id: "s".into(),
                data: raw("\"hi\""),
            },
            AgentMessage::Request {
                id: "r".into(),
                data: raw("{}"),
                timeout_ms: Some(100),
            },
            AgentMessage::Response {
                id: "q".into(),
                result: Ok(raw("42")),
            },
            AgentMessage::Response {
                id: "q".into(),
                result: Err(ErrorBody::new(ErrorCode::HandlerError, "boom")),
            },
            AgentMessage::Ack { id: "p".into() },
            AgentMessage::Refresh {
                token: "t.o.k".into(),
            },
        ];
        for msg in messages {
            let text = msg.encode();
            let back = AgentMessage::decode(&text).unwrap();
            assert_eq!(back.encode(), text, "round trip of {text}");
        }
    }

    #[test]
    fn push_encoding_matches_documented_example() {
        assert_eq!(
            encode_push("01J", &raw(r#"{"cmd":"scan"}"#), false),
            r#"{"type":"push","id":"01J","data":{"cmd":"scan"}}"#
        );
        assert_eq!(
            encode_push("01J", &raw("1"), true),
            r#"{"type":"push","id":"01J","data":1,"ack":true}"#
        );
    }

    #[test]
    fn unknown_error_codes_are_tolerated() {
        let msg = GatewayMessage::decode(
            r#"{"type":"error","error":{"code":"brand_new","message":"x"}}"#,
        )
        .unwrap();
        assert!(matches!(
            msg,
            GatewayMessage::Error {
                error: ErrorBody {
                    code: ErrorCode::Unknown,
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn salvages_id_from_refused_envelope() {
        assert_eq!(
            salvage_id(r#"{"type":"nope","id":"abc"}"#),
            Some("abc".to_owned())
        );
        assert_eq!(salvage_id("garbage"), None);
    }
}

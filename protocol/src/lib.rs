//! Wire types of the `tether.v1` WebSocket protocol, shared by the gateway, the agent SDK
//! and the benchmark. Pure: no I/O, no async.
//!
//! ```text
//!   agent (SDK)                                 gateway
//!      |  ---- send / request / response / ack / refresh ---->  AgentMessage::decode
//!      |  <--- welcome / push / request / response / ack /      GatewayMessage::encode
//!      |       nack / refreshed / reconnect / error ---------
//! ```
//!
//! Every text frame is one JSON object with a `type` field. Payloads (`data`) are kept as
//! raw JSON ([`RawValue`]) so that the gateway never re-parses or re-encodes what a backend
//! or an agent sent: a broadcast is encoded once and the same bytes go to every socket.
//! Binary frames carry opaque payloads and have no envelope. `docs/protocol.md` is the
//! human-readable contract; the tests in this crate pin the examples it shows.

mod close;
mod envelope;

pub use close::CloseCode;
pub use envelope::{
    AgentMessage, ErrorBody, ErrorCode, GatewayMessage, ProtocolError, Welcome, encode_push,
    salvage_id, valid_id,
};
pub use serde_json::value::RawValue;

/// The WebSocket subprotocol a client must offer in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL: &str = "tether.v1";

/// Longest message id accepted, in bytes. Ids are chosen by the sender; they correlate a
/// `response`/`ack` with its `request`/`send` and let the receiver deduplicate retries.
pub const MAX_ID_LEN: usize = 128;

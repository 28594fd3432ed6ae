//! Cross-pod routing on NATS: a pool of gateway pods behaves like one gateway.
//!
//! ```text
//!            ┌──────── pod A ────────┐                 ┌──────── pod B ────────┐
//!  backend ─>│ push API ─> NatsRouter│── request ─────>│ serve loop ─> hub ─> agent
//!            │      │ cache          │  tether.<ns>.pod.B.push                 │
//!            └──────┼────────────────┘                 └───────────────────────┘
//!                   └── KV tether-<ns>-agents: agent → (pod, boot, connection)
//! ```
//!
//! - [`subjects`]: pure encoding of pools, agents, groups and pods into subjects, keys
//!   and bucket names; nothing a tenant controls can widen or inject into a subject.
//! - [`wire`]: what travels between pods (a small JSON call/answer and the frame as
//!   encoded once), and the W3C trace context in NATS headers.
//! - [`directory`]: the agent → pod directory (JetStream KV, compare-and-set) and its
//!   pure decisions (newest wins, re-registration after an outage).
//! - [`durable`]: the durable per-agent queue (one JetStream stream per pool, drained
//!   only while an agent has a backlog).
//! - [`router`]: [`NatsRouter`], the [`crate::router::Router`] on top of them.
//! - [`health`]: the connection's state and counters from the client's events, exported
//!   as `tether.nats.*` metrics.
//!
//! docs/routing.md explains the design and its failure behaviour.

pub mod census;
pub mod credentials;
pub mod directory;
pub mod durable;
pub mod health;
pub mod retry;
pub mod revocations;
pub mod router;
pub mod subjects;
pub mod wire;

pub use router::{NatsError, NatsRouter, Tuning};

/// The namespace a pool's subjects and buckets live in: the configured one, else the
/// tenant, else `dev`.
pub fn namespace(config: &tether_config::GatewayConfig) -> String {
    config
        .routing
        .nats
        .as_ref()
        .and_then(|n| n.namespace.clone())
        .or_else(|| config.tenant.clone())
        .unwrap_or_else(|| "dev".into())
}

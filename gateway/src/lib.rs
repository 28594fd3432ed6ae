//! Tether's WebSocket gateway: one process per pod, holding agents' persistent
//! connections and delivering backends' messages to them.
//!
//! ```text
//!                    public port                                internal port
//!  agent ──WS──> upgrade (auth, admission) ──> session ◄── hub ◄── router ◄── push API ◄── backend
//!                                                │                   │
//!                                                └── upstream POST ──┘ (agent → backend: send/request)
//! ```
//!
//! - [`upgrade`]: the RFC 6455 handshake; JWT auth and admission happen before the 101.
//! - [`driver`]: one hand-written future per connection: socket reads into a per-worker
//!   scratch buffer, vectored writes of the outbox, the close handshake.
//! - [`frame`]: the strict RFC 6455 codec the driver uses (pure, no I/O).
//! - [`session`]: what an agent's decoded messages mean (rate limit, envelopes,
//!   upstream, refresh), and a connection's registration and cleanup.
//! - [`hub`]: this process's connections, groups and pending requests.
//! - [`liveness`]: one sweeper per process for pings, idle and token expiry.
//! - [`router`]: the seam between the push API and the hub; [`router::LocalRouter`]
//!   for one pod, a bus-backed router for a pool of pods.
//! - [`api`]: the push API, admin and health endpoints.
//! - [`server`]: listeners, accept loop and drain.
//! - [`shed`]: closing connections with `reconnect` hints at a bounded rate.
//! - [`status`]: reporting this pod's count into its pool; following the operator's
//!   drain and shed instructions.
//!
//! Memory per idle connection is the headline: an idle connection is its driver (one
//! task, no buffer, no timer — reads go into a per-worker scratch buffer and liveness
//! is one sweeper per process), its hub entry and the kernel's socket; broadcast frames
//! are encoded once and shared.

pub mod api;
pub mod auth;
pub mod connect_check;
pub mod direct;
pub mod driver;
pub mod frame;
pub mod hub;
pub mod jwks;
pub mod liveness;
pub mod metrics;
pub mod nats;
pub mod quota;
pub mod rate;
pub mod revocation;
pub mod router;
pub mod server;
pub mod session;
pub mod shed;
pub mod state;
pub mod status;
pub mod tls;
pub mod upgrade;
pub mod upstream;

pub use server::{Gateway, RouterFactory, StartError};

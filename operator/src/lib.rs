//! The Tether operator: turns each `ConnectionPool` into a running gateway fleet.
//!
//! ```text
//!             ┌──────────── lease (coordination.k8s.io/v1) ───────────┐
//!             │ only the holder runs the controller                    │
//!   watch ConnectionPool ─┐                                           │
//!   watch owned children ─┴─► Controller ─► reconcile(pool)           │
//!                                 │   validate (pure)  ─► SpecError ─► Event + Degraded
//!                                 │   resources::desired (pure)        │
//!                                 │   server-side apply, one field manager
//!                                 │   status::pool_status (pure) ─► SSA on /status
//!                                 └─► error_policy: per-object exponential backoff
//! ```
//!
//! Pure decisions live in [`validate`], [`resources`] and [`status`] and are unit-tested
//! without I/O; [`controller`] does the API calls, [`lease`] the leader election,
//! [`metrics`] and [`admin`] the observability; [`pin`] pins pools to the gateway image
//! they run when asked to (`--pin-gateway-images`).

pub mod admin;
pub mod app;
pub mod autoscale;
pub mod controller;
pub mod creation;
pub mod lease;
pub mod metrics;
pub mod nats;
pub mod ownership;
pub mod pin;
pub mod resources;
pub mod scaling;
pub mod status;
pub mod validate;

#[cfg(test)]
mod fixtures;

pub use controller::{Context, Error, FIELD_MANAGER, FINALIZER};
pub use resources::Settings;

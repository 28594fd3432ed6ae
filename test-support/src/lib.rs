//! What the workspace's tests share, so each helper is written once.
//!
//! ```text
//!  poll      eventually / try_eventually / until: poll a condition with a deadline
//!  token     hs256(secret, claims): a signed test token; unix_now()
//!  json      merge(into, from): a fixture with a test's changes laid over it
//!  push_api  the gateway's push API with an API key: post_json, get, push
//!  process   free_port(), nats_server_binary()
//!  nats      NatsServer: a real `nats-server -js` on loopback, killed on drop
//!  connect_proxy  ConnectProxy: an HTTP CONNECT proxy recording its tunnels
//!  otlp      OtlpReceiver: a real OTLP/HTTP endpoint recording what binaries export
//! ```
//!
//! Every crate takes it as a dev-dependency; only `tether-e2e`, itself a test harness
//! (and the `tether-local` platform built on it), depends on it directly. It depends on
//! no workspace crate, so any crate's unit tests can use it without a cycle.

pub mod connect_proxy;
pub mod json;
pub mod nats;
pub mod otlp;
pub mod poll;
pub mod process;
pub mod push_api;
pub mod token;

pub use connect_proxy::ConnectProxy;
pub use nats::NatsServer;
pub use otlp::OtlpReceiver;
pub use poll::{PATIENCE, TimedOut, eventually, try_eventually, until};
pub use process::{free_port, nats_server_binary};
pub use token::{hs256, unix_now};

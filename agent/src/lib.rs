//! Tether agent SDK: what a customer's agent embeds to stay reachable through a Tether
//! gateway (`tether.v1`, see `docs/protocol.md` and `docs/agent-sdk.md`).
//!
//! ```text
//!   let agent = Agent::builder(url, token_provider)
//!       .on_push(|push| async move { ... })            // backend -> agent messages
//!       .on_request(|req| async move { Ok(answer) })   // backend asks, agent answers
//!       .start()?;
//!   agent.send(&event).await?;                         // at-least-once to the upstream
//!   let reply = agent.request(&question).await?;       // synchronous ask of the upstream
//! ```
//!
//! - [`client`]: the [`Agent`] handle (cheap `Clone`, commands over a bounded channel, a
//!   oneshot per reply) and the single task that owns the socket.
//! - [`policy`]: the pure rules: back-off with full jitter, what each close code and HTTP
//!   status means for reconnecting, when to refresh the token, which `nack`s to retry.
//! - [`token`]: where tokens come from (static, file, closure, local HS256 minting for
//!   development).
//! - [`transport`]: the socket under the WebSocket: direct or through an HTTP proxy's
//!   `CONNECT` tunnel, TLS with rustls for `wss://` (system roots, extra CA, mTLS).
//!
//! Guarantees: a `send` is re-sent with the same id (the upstream's idempotency key)
//! across reconnects and transient `nack`s until it is acknowledged; a `reconnect` hint
//! from a draining gateway sets the next delay; auth failures (HTTP 401/403, close 4002),
//! other permanent HTTP refusals (404 and the rest of 4xx but 408/429) and explicit
//! disconnects (4003, 4005) stop the agent with the gateway's own reason instead of
//! looping; a URL that is not `ws://`/`wss://` is refused by `start`; every retry is
//! logged at info with why; a gateway that stops answering pings is treated as dead
//! and replaced.

pub mod client;
pub mod policy;
pub mod token;
pub mod transport;

pub use client::{Agent, AgentBuilder, Error, Options, Payload, Push, Request, Session, State};
pub use policy::{Backoff, ReconnectPolicy, StopReason};
pub use tether_protocol::{ErrorBody, ErrorCode, RawValue};
pub use token::{Hs256Minter, StaticToken, TokenError, TokenFile, TokenProvider, token_fn};
pub use transport::{ClientCert, Proxy, TlsOptions, no_proxy_matches, proxy_for};

//! Routing: how a message that reached this pod's push API gets to the pod that holds
//! the agent's socket.
//!
//! [`Router`] is the seam. [`LocalRouter`] serves a single pod (dev mode, one-replica
//! pools, tests) straight from the [`Hub`]; a cross-pod router (NATS) looks the agent up
//! in a directory and forwards to the right pod, where that pod's `LocalRouter` does the
//! final step. Durable pushes ([`Router::push_durable`]) are stored first and delivered
//! whenever the agent is connected; only a router with a durable queue (NATS JetStream)
//! offers them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::hub::{AgentReply, Connection, DeliveryError, Expect, Hub, Outbound};
use crate::revocation::Revocation;

/// Why a message could not be routed. Each maps to one push-API status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The agent is not connected anywhere in the pool (404).
    #[error("agent is not connected")]
    NotConnected,
    /// The agent's outbound queue is full (429).
    #[error("agent's outbound queue is full")]
    QueueFull,
    /// Too many requests to the agent are waiting for answers (429).
    #[error("too many pending requests for this agent")]
    TooManyPending,
    /// A request or acked push with this id already waits for the agent (409).
    #[error("a message with this Idempotency-Key is already waiting for the agent")]
    Duplicate,
    /// The agent did not answer in time (504).
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent disconnected before it answered (502).
    #[error("agent disconnected before answering")]
    AgentGone,
    /// The agent's (or the pool's) durable queue is at its limit (429): nothing was
    /// stored.
    #[error("{0}")]
    DurableFull(String),
    /// A durable push reused an Idempotency-Key this agent already used, within the
    /// duplicate window, with another body (409): nothing was stored.
    #[error(
        "Idempotency-Key `{0}` was already used for this agent with a different body; \
         a retry must repeat the same body, a new message needs a new key"
    )]
    KeyReused(String),
    /// `GET /v1/messages/{id}` names an id several agents' messages share (409).
    #[error(
        "several agents have a durable message with id `{0}`; ask \
         GET /v1/agents/{{agent}}/messages/{{id}}"
    )]
    AmbiguousId(String),
    /// The bus or the agent's pod cannot be reached right now (503). Nothing was
    /// delivered; the caller may retry.
    #[error("routing unavailable: {0}")]
    Unavailable(String),
}

impl From<DeliveryError> for RouteError {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::NotConnected => RouteError::NotConnected,
            DeliveryError::QueueFull => RouteError::QueueFull,
            DeliveryError::TooManyPending => RouteError::TooManyPending,
            DeliveryError::Duplicate => RouteError::Duplicate,
        }
    }
}

/// A message for one agent.
#[derive(Debug, Clone)]
pub struct Push {
    /// Message id (also inside the encoded frame).
    pub id: String,
    /// The encoded frame.
    pub frame: Outbound,
    /// Wait this long for the agent's `ack`; `None` returns once queued.
    pub ack_timeout: Option<Duration>,
}

/// Where a durable push was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableReceipt {
    /// Stream sequence (orders one agent's messages).
    pub sequence: u64,
    /// The message id had been stored already (a retry): stored once.
    pub duplicate: bool,
}

/// Where a durable message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurableState {
    /// Stored, not yet written to the agent.
    Pending,
    /// Written to a connection of the agent, not yet acknowledged.
    Delivered,
    /// The agent acknowledged it (it is no longer stored).
    Acknowledged,
    /// Removed unacknowledged: older than `delivery.durable.maxAgeSeconds`.
    Expired,
}

/// A durable message that outlived `delivery.durable.maxAgeSeconds` unacknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredMessage {
    /// The agent it was for.
    pub agent: String,
    /// Message id.
    pub id: String,
    /// Stream sequence.
    pub sequence: u64,
}

/// The answer of `GET /v1/messages/{id}` and `GET /v1/agents/{agent}/messages/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageStatus {
    /// Message id.
    pub id: String,
    /// The agent it is for.
    pub agent_id: String,
    /// Stream sequence.
    pub sequence: u64,
    /// Its state.
    pub status: DurableState,
}

/// A request to one agent.
#[derive(Debug, Clone)]
pub struct Request {
    /// Request id (also inside the encoded frame).
    pub id: String,
    /// The encoded `request` envelope.
    pub frame: Outbound,
    /// How long to wait for the agent's `response`.
    pub timeout: Duration,
}

/// Where an agent is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Presence {
    /// Agent id.
    pub agent_id: String,
    /// Connection id, unique per pod.
    pub connection_id: String,
    /// Pod holding the socket.
    pub pod: String,
    /// Groups of the agent.
    pub groups: Vec<String>,
    /// Unix seconds when it connected.
    pub connected_at: u64,
}

/// One page of connected agents.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Agents on this page.
    pub agents: Vec<Presence>,
    /// Cursor for the next page, if any.
    pub next_cursor: Option<String>,
}

/// Delivers messages to agents wherever they are connected in the pool.
#[async_trait]
pub trait Router: Send + Sync + 'static {
    /// A connection was registered in this pod's hub. A cross-pod router records it and
    /// closes the agent's older connection on another pod (newest wins).
    async fn connected(&self, conn: &Arc<Connection>);
    /// A connection left this pod's hub.
    async fn disconnected(&self, conn: &Arc<Connection>);
    /// Queues a message for one agent, or waits for its ack when asked to.
    async fn push(&self, agent: &str, push: Push) -> Result<(), RouteError>;
    /// Sends a request to one agent and waits for its answer.
    async fn request(&self, agent: &str, request: Request) -> Result<AgentReply, RouteError>;
    /// Queues a frame for every member of a group in the pool; returns how many
    /// connections on this pod (and, if known, others) got it.
    async fn send_to_group(&self, group: &str, frame: Outbound) -> Result<usize, RouteError>;
    /// Queues a frame for every agent in the pool.
    async fn broadcast(&self, frame: Outbound) -> Result<usize, RouteError>;
    /// Where an agent is connected, if anywhere.
    async fn presence(&self, agent: &str) -> Result<Option<Presence>, RouteError>;
    /// A page of connected agents.
    async fn list(&self, cursor: Option<&str>, limit: usize) -> Result<Page, RouteError>;
    /// Closes an agent's connection with [`tether_protocol::CloseCode::Disconnected`].
    async fn disconnect(&self, agent: &str) -> Result<(), RouteError>;
    /// Revokes an agent or a token on every pod of the pool, including pods that start
    /// later, until `revocation.until`: its connections close with
    /// [`tether_protocol::CloseCode::Revoked`] and new ones are refused. Returns once the
    /// revocation is stored where a restart finds it (the bus), or, without a bus,
    /// applied in this process.
    async fn revoke(&self, revocation: &Revocation) -> Result<(), RouteError>;
    /// Connections on the pool's other pods, as they last announced them (0 without a
    /// bus): what `quotas.maxConnections` counts besides this pod's.
    fn connections_elsewhere(&self) -> u64 {
        0
    }
    /// Whether durable pushes are available (a durable queue is configured).
    fn durable(&self) -> bool {
        false
    }
    /// Stores `frame` (a `push` envelope with `"ack": true`, id `id`) in `agent`'s
    /// durable queue; returns once it is stored. The agent gets it in order whenever it
    /// is connected, until it acknowledges it — the agent need not be connected now.
    async fn push_durable(
        &self,
        agent: &str,
        id: &str,
        frame: Bytes,
    ) -> Result<DurableReceipt, RouteError> {
        let _ = (agent, id, frame);
        Err(RouteError::Unavailable(
            "durable delivery needs routing.nats and delivery.durable".into(),
        ))
    }
    /// Where durable message `id` (of `agent`, or of the one agent that has a message
    /// with this id) is; `None` when no such message is known (never stored, or its
    /// record outlived `delivery.durable.statusRetentionSeconds`).
    async fn durable_status(
        &self,
        agent: Option<&str>,
        id: &str,
    ) -> Result<Option<MessageStatus>, RouteError> {
        let _ = (agent, id);
        Err(RouteError::Unavailable(
            "durable delivery needs routing.nats and delivery.durable".into(),
        ))
    }
    /// Durable messages pending across the pool's agents; `None` without a durable
    /// queue or when it cannot be read now.
    async fn durable_backlog(&self) -> Option<u64> {
        None
    }
    /// How often this pod looks for expired durable messages (`None`: never).
    fn durable_sweep_interval(&self) -> Option<Duration> {
        None
    }
    /// The pool's oldest durable message if it has expired and this pod is the pool's
    /// sweeper (one pod at a time looks), else `None`.
    async fn durable_expired(&self) -> Result<Option<ExpiredMessage>, RouteError> {
        Ok(None)
    }
    /// Removes an expired message (after the upstream was told) and records it so.
    async fn durable_expire(&self, expired: &ExpiredMessage) -> Result<(), RouteError> {
        let _ = expired;
        Ok(())
    }
    /// Connections of this pod that have a durable drain task right now (only those
    /// with a backlog or unacknowledged messages; zero when every agent is idle).
    fn durable_drains(&self) -> usize {
        0
    }
    /// The agent acknowledged a push that no push-API call waits for: maybe a durable
    /// one on this connection. `true` when a durable delivery took the ack (it is
    /// then not charged to the connection's message rate).
    fn acked(&self, conn: &Arc<Connection>, id: &str) -> bool {
        let _ = (conn, id);
        false
    }
    /// The largest body the router can carry (`None`: no limit below
    /// `limits.maxMessageBytes`). A bus with a smaller message limit would carry a push
    /// to an agent on this pod but not one on another pod; the push API refuses larger
    /// bodies everywhere (413) instead.
    fn max_body_bytes(&self) -> Option<usize> {
        None
    }
    /// Whether the message bus between pods is up right now: `None` for a router
    /// without one (this pod's agents only). It feeds the status report
    /// (`pods[].busConnected`) and metrics, never `/readyz`: a pod serves its own agents
    /// without the bus, and a bus outage that failed every pod's readiness would empty
    /// the Service of the whole pool at once (docs/routing.md).
    fn bus_connected(&self) -> Option<bool> {
        None
    }
}

/// Routes within this pod only.
#[derive(Debug, Clone)]
pub struct LocalRouter {
    hub: Arc<Hub>,
    pod: Arc<str>,
}

impl LocalRouter {
    /// A router over this pod's hub.
    pub fn new(hub: Arc<Hub>, pod: &str) -> Self {
        Self {
            hub,
            pod: pod.into(),
        }
    }

    /// The hub it routes into.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Presence of a local connection.
    pub fn presence_of(&self, conn: &Connection) -> Presence {
        Presence {
            agent_id: conn.agent_id.to_string(),
            connection_id: conn.id.to_string(),
            pod: self.pod.to_string(),
            groups: conn.groups(),
            connected_at: conn.connected_at_ms / 1000,
        }
    }

    async fn await_reply(
        &self,
        agent: &str,
        id: &str,
        expect: Expect,
        frame: Outbound,
        timeout: Duration,
    ) -> Result<AgentReply, RouteError> {
        let mut pending = self.hub.deliver_expecting_reply(agent, id, expect, frame)?;
        match tokio::time::timeout(timeout, pending.wait()).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(RouteError::AgentGone),
            Err(_) => Err(RouteError::Timeout(timeout)),
        }
    }
}

#[async_trait]
impl Router for LocalRouter {
    async fn connected(&self, _conn: &Arc<Connection>) {}

    async fn disconnected(&self, _conn: &Arc<Connection>) {}

    async fn push(&self, agent: &str, push: Push) -> Result<(), RouteError> {
        match push.ack_timeout {
            None => Ok(self.hub.deliver(agent, push.frame)?),
            Some(timeout) => match self
                .await_reply(agent, &push.id, Expect::Ack, push.frame, timeout)
                .await?
            {
                Ok(_) => Ok(()),
                // An agent that answers a push with an error did not take it.
                Err(_) => Err(RouteError::AgentGone),
            },
        }
    }

    async fn request(&self, agent: &str, request: Request) -> Result<AgentReply, RouteError> {
        self.await_reply(
            agent,
            &request.id,
            Expect::Response,
            request.frame,
            request.timeout,
        )
        .await
    }

    async fn send_to_group(&self, group: &str, frame: Outbound) -> Result<usize, RouteError> {
        Ok(self.hub.deliver_to_group(group, &frame).await)
    }

    async fn broadcast(&self, frame: Outbound) -> Result<usize, RouteError> {
        Ok(self.hub.broadcast(&frame).await)
    }

    async fn presence(&self, agent: &str) -> Result<Option<Presence>, RouteError> {
        Ok(self.hub.get(agent).map(|c| self.presence_of(&c)))
    }

    async fn list(&self, cursor: Option<&str>, limit: usize) -> Result<Page, RouteError> {
        let (conns, next_cursor) = self.hub.list(cursor, limit);
        Ok(Page {
            agents: conns.iter().map(|c| self.presence_of(c)).collect(),
            next_cursor,
        })
    }

    async fn disconnect(&self, agent: &str) -> Result<(), RouteError> {
        let conn = self.hub.get(agent).ok_or(RouteError::NotConnected)?;
        conn.close(tether_protocol::CloseCode::Disconnected);
        Ok(())
    }

    /// One pod and no bus: the revocation lives in this process (docs/push-api.md says
    /// a restart forgets it).
    async fn revoke(&self, revocation: &Revocation) -> Result<(), RouteError> {
        self.hub.revoke(revocation);
        Ok(())
    }
}

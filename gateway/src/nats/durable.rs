//! The durable per-agent queue: one JetStream stream per pool, one subject per agent.
//!
//! ```text
//!  push API ──store──> stream tether-<ns>-durable, subject tether.<ns>.durable.<agent>
//!      │                  (file storage, replicas, per-agent count limit, max age)
//!      └──kick──> pod holding the agent ──> drain task (only while a backlog exists)
//!                    │  get next message on the agent's subject after the last sent
//!                    │  queue it as `push` with `"ack": true`  (at most `inFlight`)
//!                    │  agent `ack` ──> purge the agent's subject up to the acked prefix
//!                    └─ nothing left and nothing unacked: the task ends
//! ```
//!
//! Nothing exists per idle agent: no consumer, no subscription, no task, no map entry.
//! An agent's backlog *is* its subject in the stream, and its ack floor is the stream
//! itself: acknowledged messages are purged, so whatever remains on the subject is
//! pending, and the next connection (on any pod) starts from the first of them. A
//! connect costs one `STREAM.MSG.GET` (next message on the subject); only when it finds
//! one does a drain task start, and that task ends as soon as the backlog is drained.
//! docs/routing.md ("Durable delivery") has the design and its costs.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tether_config::DurableConfig;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::subjects::Subjects;
use super::wire;
use crate::hub::unix_now_ms;
use crate::hub::{Connection, DeliveryError, Hub};
use crate::router::{DurableState, ExpiredMessage, MessageStatus, RouteError};

/// The header that carries a durable message's id (JetStream de-duplicates on it
/// within the stream's duplicate window, so a retried push is stored once).
const MSG_ID: &str = "Nats-Msg-Id";

/// How long a drain task waits on a silent agent before it checks its connection again.
const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// After a failed JetStream call, the drain task retries after this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The stream keeps a message this long past `maxAgeSeconds`: the gateway's sweep
/// removes it first (and tells the upstream); NATS's own age limit is the safety net
/// for a pool whose sweep cannot run (upstream down for longer than this).
const AGE_SAFETY_MARGIN: Duration = Duration::from_secs(3600);

/// Why the durable queue could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("opening the durable stream {stream}: {message}")]
pub struct DurableError {
    stream: String,
    message: String,
}

/// Where a durable push was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Stream sequence.
    pub sequence: u64,
    /// JetStream had stored this id already (a retry within the duplicate window).
    pub duplicate: bool,
}

/// The stream's configuration for a pool: pure, so the limits' mapping is unit-tested.
pub fn stream_config(subjects: &Subjects, config: &DurableConfig) -> stream::Config {
    stream::Config {
        name: subjects.durable_stream(),
        subjects: vec![subjects.durable_wildcard()],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        retention: stream::RetentionPolicy::Limits,
        // A full agent queue refuses the new message (429) rather than silently
        // dropping the oldest one the backend was told is stored.
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        max_messages_per_subject: i64::try_from(config.max_messages_per_agent).unwrap_or(i64::MAX),
        max_bytes: match config.max_bytes {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        },
        max_age: match config.max_age_seconds {
            0 => Duration::ZERO,
            age => Duration::from_secs(age) + AGE_SAFETY_MARGIN,
        },
        description: Some("tether: durable per-agent delivery queue".into()),
        ..Default::default()
    }
}

/// A durable message's status record (KV `tether-<ns>-messages`, key `m.<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The agent.
    pub agent: String,
    /// Stream sequence.
    pub seq: u64,
    /// Last recorded state (`expired` is never recorded: it is what a record that is
    /// not acknowledged means once its message is gone).
    pub state: DurableState,
    /// Unix milliseconds of the change.
    pub at_ms: u64,
}

/// The state a record stands for, given whether its message is still stored. Pure.
pub fn state_of(record: DurableState, still_stored: bool) -> DurableState {
    match record {
        DurableState::Acknowledged | DurableState::Expired => record,
        _ if !still_stored => DurableState::Expired,
        other => other,
    }
}

/// The status bucket's stream: a KV bucket (history 1) whose entries outlive the
/// messages they describe by `statusRetentionSeconds`. Pure.
pub fn status_bucket_config(subjects: &Subjects, config: &DurableConfig) -> stream::Config {
    let bucket = subjects.messages_bucket();
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("tether: durable message status".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        allow_rollup: true,
        allow_direct: true,
        max_age: match config.max_age_seconds {
            0 => Duration::ZERO,
            age => {
                Duration::from_secs(age.saturating_add(config.status_retention_seconds))
                    + AGE_SAFETY_MARGIN
            }
        },
        ..Default::default()
    }
}

/// The pool's durable queue.
#[derive(Clone)]
pub struct Durable {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("stream", &self.shared.stream_name)
            .field("draining", &self.shared.drains.lock().len())
            .finish_non_exhaustive()
    }
}

struct Shared {
    js: jetstream::Context,
    /// A handle (no server state behind it) for message gets and purges.
    stream: stream::Stream<()>,
    /// Message id → status record.
    status: kv::Store,
    /// `$KV.<bucket>.` (records of deliveries are published without waiting).
    status_prefix: String,
    client: async_nats::Client,
    stream_name: String,
    subjects: Subjects,
    in_flight: usize,
    outbound_queue: usize,
    /// `maxAgeSeconds` (0: messages never expire).
    max_age_seconds: u64,
    /// This pod's connections: a drain task ends once its connection left the hub
    /// (a socket that died queues no close, so `is_closing` alone would not say).
    hub: Arc<Hub>,
    /// Drain tasks by connection id: only connections with a backlog have one.
    drains: Mutex<HashMap<u64, Arc<Drain>>>,
}

/// What one drain task is told by the session (acks) and the router (kicks, stop).
#[derive(Default)]
struct Drain {
    state: Mutex<DrainState>,
    notify: Notify,
}

#[derive(Default)]
struct DrainState {
    acks: Vec<String>,
    /// Something was stored since the task last looked.
    kicked: bool,
    /// The connection ended.
    stopped: bool,
}

impl Durable {
    /// Creates the pool's stream, or updates it to `config`'s limits.
    pub async fn open(
        client: async_nats::Client,
        js: jetstream::Context,
        subjects: &Subjects,
        config: &DurableConfig,
        hub: Arc<Hub>,
        outbound_queue: usize,
    ) -> Result<Self, DurableError> {
        let stream_config = stream_config(subjects, config);
        let stream_name = stream_config.name.clone();
        js.create_or_update_stream(stream_config)
            .await
            .map_err(|e| DurableError {
                stream: stream_name.clone(),
                message: e.to_string(),
            })?;
        let stream = js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| DurableError {
                stream: stream_name.clone(),
                message: e.to_string(),
            })?;
        let bucket = subjects.messages_bucket();
        let status_config = status_bucket_config(subjects, config);
        let status_error = |e: &dyn std::fmt::Display| DurableError {
            stream: format!("KV_{bucket}"),
            message: e.to_string(),
        };
        js.create_or_update_stream(status_config)
            .await
            .map_err(|e| status_error(&e))?;
        let status = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| status_error(&e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                js,
                stream,
                status,
                status_prefix: format!("$KV.{bucket}."),
                client,
                stream_name,
                subjects: subjects.clone(),
                in_flight: config.in_flight.min(outbound_queue).max(1),
                max_age_seconds: config.max_age_seconds,
                hub,
                outbound_queue,
                drains: Mutex::default(),
            }),
        })
    }

    /// Stores a push for `agent`. Returns once JetStream acknowledged it (file storage,
    /// every replica): from then on a gateway or NATS crash does not lose it.
    pub async fn store(&self, agent: &str, id: &str, frame: Bytes) -> Result<Stored, RouteError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID, id);
        let subject = self.shared.subjects.durable(agent);
        let publish = self
            .shared
            .js
            .publish_with_headers(subject, headers, frame)
            .await
            .map_err(store_error)?;
        let ack = publish.await.map_err(store_error)?;
        if !ack.duplicate {
            self.shared.record_stored(agent, id, ack.sequence).await;
        }
        Ok(Stored {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Messages pending across every agent of the pool (the stream's message count).
    pub async fn backlog(&self) -> Result<u64, RouteError> {
        // `get_stream` is one STREAM.INFO call; its answer holds the count.
        let stream = self
            .shared
            .js
            .get_stream(&self.shared.stream_name)
            .await
            .map_err(|e| RouteError::Unavailable(e.to_string()))?;
        Ok(stream.cached_info().state.messages)
    }

    /// A connection was registered: one look at its subject; a drain task starts only
    /// if something is pending (or the look failed: the task retries).
    pub async fn connected(&self, conn: &Arc<Connection>) {
        match self.shared.next_message(&conn.agent_id, 1).await {
            Ok(None) => {}
            Ok(Some(_)) => self.kick(conn),
            Err(e) => {
                debug!(%e, agent = %conn.agent_id, "backlog check failed; draining to retry");
                self.kick(conn);
            }
        }
    }

    /// Something was stored for a local connection: deliver it (starts the drain task,
    /// or tells the running one to look again).
    pub fn kick(&self, conn: &Arc<Connection>) {
        let mut drains = self.shared.drains.lock();
        if let Some(drain) = drains.get(&conn.id) {
            drain.state.lock().kicked = true;
            drain.notify.notify_one();
            return;
        }
        let drain = Arc::new(Drain::default());
        drains.insert(conn.id, drain.clone());
        drop(drains);
        tokio::spawn(drain_task(self.shared.clone(), conn.clone(), drain));
    }

    /// The agent acknowledged message `id` on connection `conn`; `false` when no
    /// durable delivery waits on that connection.
    pub fn acked(&self, conn: u64, id: &str) -> bool {
        let Some(drain) = self.shared.drains.lock().get(&conn).cloned() else {
            return false;
        };
        // At most a window's worth waits for the task: an agent cannot owe more acks
        // than the messages it was sent, and anything beyond is not taken (and so is
        // charged to its message rate like any other message).
        let mut state = drain.state.lock();
        if state.acks.len() >= self.shared.in_flight {
            return false;
        }
        state.acks.push(id.to_owned());
        drop(state);
        drain.notify.notify_one();
        true
    }

    /// The connection ended: its drain task stops; what it left unacknowledged stays
    /// in the stream for the agent's next connection.
    pub fn disconnected(&self, conn: u64) {
        if let Some(drain) = self.shared.drains.lock().get(&conn) {
            drain.state.lock().stopped = true;
            drain.notify.notify_one();
        }
    }

    /// Where message `id` is (`None`: unknown).
    pub async fn status(&self, id: &str) -> Result<Option<MessageStatus>, RouteError> {
        let unavailable = |e: &dyn std::fmt::Display| RouteError::Unavailable(e.to_string());
        let Some(value) = self
            .shared
            .status
            .get(Subjects::message_key(id))
            .await
            .map_err(|e| unavailable(&e))?
        else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(&value).map_err(|e| unavailable(&e))?;
        let still_stored = match record.state {
            DurableState::Acknowledged | DurableState::Expired => false,
            _ => match self.shared.stream.get_raw_message(record.seq).await {
                Ok(_) => true,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => false,
                Err(e) => return Err(unavailable(&e)),
            },
        };
        Ok(Some(MessageStatus {
            id: id.to_owned(),
            agent_id: record.agent,
            sequence: record.seq,
            status: state_of(record.state, still_stored),
        }))
    }

    /// How often to look for expired messages: a tenth of the age limit, within 1–60 s.
    pub fn sweep_interval(&self) -> Option<Duration> {
        match self.shared.max_age_seconds {
            0 => None,
            age => Some(Duration::from_secs((age / 10).clamp(1, 60))),
        }
    }

    /// The stream's oldest message, if it is older than `maxAgeSeconds`. Messages are
    /// stored in time order, so when the oldest has not expired none has: a sweep costs
    /// one stream-info and one get per expired message, never a scan.
    pub async fn oldest_expired(&self) -> Result<Option<ExpiredMessage>, RouteError> {
        let unavailable = |e: &dyn std::fmt::Display| RouteError::Unavailable(e.to_string());
        if self.shared.max_age_seconds == 0 {
            return Ok(None);
        }
        let stream = self
            .shared
            .js
            .get_stream(&self.shared.stream_name)
            .await
            .map_err(|e| unavailable(&e))?;
        let state = stream.cached_info().state.clone();
        if state.messages == 0 {
            return Ok(None);
        }
        let message = match self
            .shared
            .stream
            .get_raw_message(state.first_sequence)
            .await
        {
            Ok(message) => message,
            // Acknowledged (purged) meanwhile: the next sweep looks again.
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(unavailable(&e)),
        };
        if !self.shared.expired(message.time.unix_timestamp()) {
            return Ok(None);
        }
        let agent = self
            .shared
            .subjects
            .agent_of_durable(&message.subject)
            .unwrap_or_default();
        Ok(Some(ExpiredMessage {
            agent,
            id: message_id(&message),
            sequence: message.sequence,
        }))
    }

    /// Records `expired` and removes the message.
    pub async fn expire(&self, expired: &ExpiredMessage) -> Result<(), RouteError> {
        let value = Shared::record(&expired.agent, expired.sequence, DurableState::Expired);
        if let Err(e) = self
            .shared
            .status
            .put(Subjects::message_key(&expired.id), value)
            .await
        {
            debug!(%e, id = %expired.id, "expiry record not written");
        }
        self.shared
            .stream
            .delete_message(expired.sequence)
            .await
            .map(|_| ())
            .or_else(|e| {
                // Removed meanwhile (acknowledged, or NATS's own age limit): done.
                if e.to_string().contains("no message found") {
                    Ok(())
                } else {
                    Err(RouteError::Unavailable(e.to_string()))
                }
            })
    }

    /// Connections with a drain task (tests and metrics: zero when every agent is idle).
    pub fn draining(&self) -> usize {
        self.shared.drains.lock().len()
    }
}

fn store_error(e: impl std::fmt::Display) -> RouteError {
    let text = e.to_string();
    // JetStream refuses with these when a limit is reached (discard policy `new`).
    if text.contains("maximum messages per subject") {
        RouteError::DurableFull("the agent's durable queue is full".into())
    } else if text.contains("maximum bytes") || text.contains("maximum messages") {
        RouteError::DurableFull("the pool's durable queue is full".into())
    } else {
        RouteError::Unavailable(format!("storing the message: {text}"))
    }
}

// === impl Shared ===

/// One fetched message.
struct Fetched {
    sequence: u64,
    id: String,
    /// Older than `maxAgeSeconds`: left to the sweep (which tells the upstream).
    expired: bool,
    payload: Bytes,
}

fn message_id(message: &jetstream::message::StreamMessage) -> String {
    message
        .headers
        .get(MSG_ID)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| message.sequence.to_string())
}

impl Shared {
    /// Whether a message stored at `stored_at` (Unix seconds) outlived the age limit.
    fn expired(&self, stored_at: i64) -> bool {
        let now = i64::try_from(crate::hub::unix_now()).unwrap_or(i64::MAX);
        self.max_age_seconds > 0
            && now.saturating_sub(stored_at)
                >= i64::try_from(self.max_age_seconds).unwrap_or(i64::MAX)
    }

    fn record(agent: &str, seq: u64, state: DurableState) -> Bytes {
        let record = Record {
            agent: agent.to_owned(),
            seq,
            state,
            at_ms: unix_now_ms(),
        };
        Bytes::from(serde_json::to_vec(&record).expect("records serialize"))
    }

    /// Records a newly stored message as pending. `create`, not `put`: a drain task may
    /// already have recorded its delivery (or its ack). An id reused for a newer message
    /// (after the duplicate window) replaces the older message's record.
    async fn record_stored(&self, agent: &str, id: &str, seq: u64) {
        let key = Subjects::message_key(id);
        let value = Self::record(agent, seq, DurableState::Pending);
        if self.status.create(&key, value.clone()).await.is_ok() {
            return;
        }
        let older = match self.status.get(&key).await {
            Ok(Some(old)) => serde_json::from_slice::<Record>(&old).is_ok_and(|r| r.seq < seq),
            Ok(None) => true,
            Err(e) => {
                debug!(%e, id, "status record not written");
                false
            }
        };
        if older && let Err(e) = self.status.put(&key, value).await {
            debug!(%e, id, "status record not written");
        }
    }

    /// Records a delivery without waiting (the message itself is what matters).
    async fn record_delivered(&self, agent: &str, id: &str, seq: u64) {
        let subject = format!("{}{}", self.status_prefix, Subjects::message_key(id));
        let value = Self::record(agent, seq, DurableState::Delivered);
        if let Err(e) = self.client.publish(subject, value).await {
            debug!(%e, id, "delivery record not sent");
        }
    }

    /// Records acknowledgements; done before the purge, so a message that is gone and
    /// not recorded as acknowledged is one that expired.
    async fn record_acknowledged(&self, agent: &str, acked: &[(u64, String)]) {
        let puts = acked.iter().map(|(seq, id)| {
            let value = Self::record(agent, *seq, DurableState::Acknowledged);
            async move {
                if let Err(e) = self.status.put(Subjects::message_key(id), value).await {
                    debug!(%e, id, "acknowledgement record not written");
                }
            }
        });
        futures_util::future::join_all(puts).await;
    }

    /// The first message on `agent`'s subject at or after `from` (through the stream
    /// leader, so a message acknowledged as stored is always found).
    async fn next_message(&self, agent: &str, from: u64) -> Result<Option<Fetched>, String> {
        match self
            .stream
            .get_first_raw_message_by_subject(self.subjects.durable(agent), from.max(1))
            .await
        {
            Ok(message) => Ok(Some(Fetched {
                sequence: message.sequence,
                id: message_id(&message),
                expired: self.expired(message.time.unix_timestamp()),
                payload: message.payload,
            })),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Removes `agent`'s messages up to and including `floor` (all acknowledged).
    async fn purge_through(&self, agent: &str, floor: u64) -> Result<(), String> {
        self.stream
            .purge()
            .filter(self.subjects.durable(agent))
            .sequence(floor + 1)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Delivers one connection's backlog, in order, at most `in_flight` unacknowledged,
/// and ends once nothing is pending and nothing unacknowledged.
async fn drain_task(shared: Arc<Shared>, conn: Arc<Connection>, drain: Arc<Drain>) {
    let agent = conn.agent_id.clone();
    let mut window = Window::default();
    let mut next = 1;
    // The highest acknowledged sequence not yet purged (purge failed: retried).
    let mut unpurged: Option<u64> = None;
    loop {
        let acks = {
            let mut state = drain.state.lock();
            if state.stopped {
                break;
            }
            state.kicked = false;
            std::mem::take(&mut state.acks)
        };
        let current = shared
            .hub
            .get(&agent)
            .is_some_and(|c| Arc::ptr_eq(&c, &conn));
        if !current || conn.is_closing() {
            break;
        }
        let acked: Vec<(u64, String)> = acks
            .into_iter()
            .filter_map(|id| window.ack(&id).map(|seq| (seq, id)))
            .collect();
        if !acked.is_empty() {
            shared.record_acknowledged(&agent, &acked).await;
        }
        if let Some(floor) = window.take_floor() {
            unpurged = Some(floor);
        }
        let mut failed = false;
        if let Some(floor) = unpurged {
            match shared.purge_through(&agent, floor).await {
                Ok(()) => unpurged = None,
                Err(e) => {
                    debug!(%e, %agent, "purge of acknowledged messages failed; retrying");
                    failed = true;
                }
            }
        }
        while window.len() < shared.in_flight {
            match shared.next_message(&agent, next).await {
                Ok(Some(message)) => {
                    next = message.sequence + 1;
                    if message.expired {
                        continue;
                    }
                    let Ok(frame) = wire::frame_of(message.payload, false) else {
                        warn!(%agent, sequence = message.sequence, "stored frame is not UTF-8; skipped");
                        continue;
                    };
                    match enqueue(&conn, frame, shared.outbound_queue).await {
                        Ok(()) => {
                            shared
                                .record_delivered(&agent, &message.id, message.sequence)
                                .await;
                            window.sent(message.sequence, message.id);
                        }
                        Err(_) => break,
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(%e, %agent, "fetching the backlog failed; retrying");
                    failed = true;
                    break;
                }
            }
        }
        if window.is_empty() && !failed && unpurged.is_none() {
            // Under the map's lock: a kick either sees this task (and sets `kicked`,
            // checked here) or finds no task and starts a new one.
            let mut drains = shared.drains.lock();
            let kicked = std::mem::take(&mut drain.state.lock().kicked);
            if !kicked {
                drains.remove(&conn.id);
                return;
            }
            continue;
        }
        let wait = if failed { RETRY_AFTER } else { IDLE_RECHECK };
        let _ = tokio::time::timeout(wait, drain.notify.notified()).await;
    }
    shared.drains.lock().remove(&conn.id);
}

/// Queues a frame, waiting while the connection's queue is full (live pushes share it).
async fn enqueue(
    conn: &Connection,
    frame: crate::hub::Outbound,
    capacity: usize,
) -> Result<(), DeliveryError> {
    loop {
        match conn.enqueue(frame.clone(), capacity) {
            Err(DeliveryError::QueueFull) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => return other,
        }
    }
}

/// Messages written to a connection and not yet acknowledged, in stream order. Pure:
/// the ack floor is the last message of the acknowledged prefix.
#[derive(Debug, Default)]
pub struct Window {
    sent: VecDeque<(u64, String, bool)>,
    floor: Option<u64>,
}

impl Window {
    /// A message was written.
    pub fn sent(&mut self, sequence: u64, id: String) {
        self.sent.push_back((sequence, id, false));
    }

    /// The agent acknowledged `id`: its sequence, or `None` when no unacknowledged
    /// message has it.
    pub fn ack(&mut self, id: &str) -> Option<u64> {
        let entry = self
            .sent
            .iter_mut()
            .find(|(_, i, acked)| !acked && i == id)?;
        entry.2 = true;
        let sequence = entry.0;
        while let Some((sequence, _, true)) = self.sent.front() {
            self.floor = Some(*sequence);
            self.sent.pop_front();
        }
        Some(sequence)
    }

    /// The new ack floor since the last call: every message up to it is acknowledged.
    pub fn take_floor(&mut self) -> Option<u64> {
        self.floor.take()
    }

    /// Messages written and not yet acknowledged (or acknowledged out of order).
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    /// Whether every written message is acknowledged.
    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_moves_over_the_acknowledged_prefix_only() {
        let mut w = Window::default();
        w.sent(3, "a".into());
        w.sent(7, "b".into());
        w.sent(9, "c".into());
        assert_eq!(w.ack("b"), Some(7));
        assert_eq!(w.take_floor(), None, "a is not acknowledged yet");
        assert_eq!(w.len(), 3);
        assert_eq!(w.ack("a"), Some(3));
        assert_eq!(w.take_floor(), Some(7));
        assert_eq!(w.take_floor(), None);
        assert_eq!(w.ack("a"), None, "already acknowledged");
        assert_eq!(w.ack("zzz"), None);
        assert_eq!(w.ack("c"), Some(9));
        assert_eq!(w.take_floor(), Some(9));
        assert!(w.is_empty());
    }

    #[test]
    fn a_reused_id_acknowledges_the_oldest_copy_first() {
        let mut w = Window::default();
        w.sent(1, "x".into());
        w.sent(2, "x".into());
        assert_eq!(w.ack("x"), Some(1));
        assert_eq!(w.take_floor(), Some(1));
        assert_eq!(w.ack("x"), Some(2));
        assert_eq!(w.take_floor(), Some(2));
    }

    #[test]
    fn the_stream_maps_the_pools_limits() {
        let subjects = Subjects::new("acme");
        let config = DurableConfig {
            max_age_seconds: 60,
            max_messages_per_agent: 5,
            max_bytes: 0,
            replicas: 3,
            in_flight: 8,
            status_retention_seconds: 100,
        };
        let s = stream_config(&subjects, &config);
        assert_eq!(s.name, "tether-acme-durable");
        assert_eq!(s.subjects, vec!["tether.acme.durable.*".to_string()]);
        assert_eq!(s.storage, stream::StorageType::File);
        assert_eq!(s.num_replicas, 3);
        assert_eq!(s.max_messages_per_subject, 5);
        assert_eq!(s.max_bytes, -1);
        assert_eq!(s.max_age, Duration::from_secs(60) + AGE_SAFETY_MARGIN);
        assert_eq!(s.discard, stream::DiscardPolicy::New);
        assert!(s.discard_new_per_subject);
        let status = status_bucket_config(&subjects, &config);
        assert_eq!(status.name, "KV_tether-acme-messages");
        assert_eq!(status.max_age, Duration::from_secs(160) + AGE_SAFETY_MARGIN);
        assert_eq!(status.num_replicas, 3);
    }

    #[test]
    fn a_record_that_is_not_acknowledged_means_expired_once_its_message_is_gone() {
        use DurableState::*;
        assert_eq!(state_of(Pending, true), Pending);
        assert_eq!(state_of(Delivered, true), Delivered);
        assert_eq!(state_of(Pending, false), Expired);
        assert_eq!(state_of(Delivered, false), Expired);
        assert_eq!(state_of(Acknowledged, false), Acknowledged);
    }
}

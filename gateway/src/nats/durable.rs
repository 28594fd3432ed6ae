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

/// The header JetStream de-duplicates on within the stream's duplicate window (a
/// retried push is stored once): agent and message id together
/// ([`Subjects::durable_msg_id`]), so one Idempotency-Key used for two agents stores
/// two messages.
const MSG_ID: &str = "Nats-Msg-Id";

/// The header that carries the message id as the caller and the agent know it.
const TETHER_ID: &str = "Tether-Id";

/// The header that carries a digest of the stored frame: a retry with the same key
/// and another body is a conflict (409), not a duplicate.
const DIGEST: &str = "Tether-Digest";

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

/// Hex SHA-256 of a stored frame (it holds the id and the body).
pub fn digest(frame: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(frame))
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
    /// Digest of the stored frame ([`digest`]): tells a retry from a reused key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
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
    /// (agent, message id) → status record.
    status: kv::Store,
    /// The status bucket's stream (looking a message up by id alone).
    status_stream: stream::Stream<()>,
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
    /// Ids written to the connection and not yet acknowledged, with their count (an
    /// id reused after the duplicate window may be in flight twice).
    outstanding: HashMap<String, u32>,
    /// Something was stored since the task last looked.
    kicked: bool,
    /// The connection ended.
    stopped: bool,
}

impl DrainState {
    /// Counts one ack of `id` against what was written; `false` if none is owed.
    fn take_outstanding(&mut self, id: &str) -> bool {
        match self.outstanding.get_mut(id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.outstanding.remove(id);
                true
            }
            None => false,
        }
    }
}

/// How often to look for expired messages under an age limit of `max_age_seconds`: a
/// tenth of it, within 1–60 s; never without a limit. Known from the configuration
/// alone, before the stream is open.
pub fn sweep_interval(max_age_seconds: u64) -> Option<Duration> {
    match max_age_seconds {
        0 => None,
        age => Some(Duration::from_secs((age / 10).clamp(1, 60))),
    }
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
        let status_stream = js
            .get_stream_no_info(format!("KV_{bucket}"))
            .await
            .map_err(|e| status_error(&e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                js,
                stream,
                status,
                status_stream,
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
    ///
    /// A push with an id this agent already used within the duplicate window is stored
    /// once (`duplicate`) when its frame is the same, and refused
    /// ([`RouteError::KeyReused`]) when it differs.
    pub async fn store(&self, agent: &str, id: &str, frame: Bytes) -> Result<Stored, RouteError> {
        let digest = digest(&frame);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID, Subjects::durable_msg_id(agent, id).as_str());
        headers.insert(TETHER_ID, id);
        headers.insert(DIGEST, digest.as_str());
        let subject = self.shared.subjects.durable(agent);
        let publish = self
            .shared
            .js
            .publish_with_headers(subject, headers, frame)
            .await
            .map_err(store_error)?;
        let ack = publish.await.map_err(store_error)?;
        if ack.duplicate {
            // Only a duplicate costs a look: the stored message (or, once it is
            // gone, its record) says which body the key was first used with.
            match self.shared.stored_digest(agent, id, ack.sequence).await? {
                Some(stored) if stored != digest => {
                    return Err(RouteError::KeyReused(id.to_owned()));
                }
                _ => {}
            }
        } else {
            self.shared
                .record_stored(agent, id, ack.sequence, &digest)
                .await;
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

    /// The agent acknowledged message `id` on connection `conn`; `false` unless a
    /// durable message with that id was written to that connection and not yet
    /// acknowledged. Only those acks are free of the message rate: an agent cannot
    /// owe more acks than the messages it was sent, and any other ack is charged
    /// like any other message.
    pub fn acked(&self, conn: u64, id: &str) -> bool {
        let Some(drain) = self.shared.drains.lock().get(&conn).cloned() else {
            return false;
        };
        let mut state = drain.state.lock();
        if !state.take_outstanding(id) {
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

    /// Where agent `agent`'s message `id` is (`None`: unknown). Without an agent, the
    /// id must name one agent's message ([`RouteError::AmbiguousId`] otherwise): one
    /// stream-info call lists the agents' records with that id.
    pub async fn status(
        &self,
        agent: Option<&str>,
        id: &str,
    ) -> Result<Option<MessageStatus>, RouteError> {
        let unavailable = |e: &dyn std::fmt::Display| RouteError::Unavailable(e.to_string());
        let key = match agent {
            Some(agent) => Subjects::message_key(agent, id),
            None => {
                use futures_util::TryStreamExt;
                let subjects = &self.shared.subjects;
                let mut found = self
                    .shared
                    .status_stream
                    .info_with_subjects(subjects.message_subjects_of_id(id))
                    .await
                    .map_err(|e| unavailable(&e))?;
                let mut keys = Vec::new();
                while let Some((subject, _)) =
                    found.try_next().await.map_err(|e| unavailable(&e))?
                {
                    keys.extend(subjects.message_key_of_subject(&subject));
                }
                match keys.len() {
                    0 => return Ok(None),
                    1 => keys.remove(0),
                    _ => return Err(RouteError::AmbiguousId(id.to_owned())),
                }
            }
        };
        let Some(value) = self
            .shared
            .status
            .get(key)
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

    /// How often to look for expired messages (see [`sweep_interval`]).
    pub fn sweep_interval(&self) -> Option<Duration> {
        sweep_interval(self.shared.max_age_seconds)
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
        let value = Shared::record(
            &expired.agent,
            expired.sequence,
            DurableState::Expired,
            None,
        );
        if let Err(e) = self
            .shared
            .status
            .put(Subjects::message_key(&expired.agent, &expired.id), value)
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
    digest: Option<String>,
    /// Older than `maxAgeSeconds`: left to the sweep (which tells the upstream).
    expired: bool,
    payload: Bytes,
}

/// The id the caller and the agent know: `Tether-Id`, or (a message stored before it
/// existed) `Nats-Msg-Id`, or the sequence.
fn message_id(message: &jetstream::message::StreamMessage) -> String {
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    header(TETHER_ID)
        .or_else(|| header(MSG_ID))
        .unwrap_or_else(|| message.sequence.to_string())
}

fn message_digest(message: &jetstream::message::StreamMessage) -> Option<String> {
    message.headers.get(DIGEST).map(|v| v.as_str().to_owned())
}

impl Shared {
    /// Whether a message stored at `stored_at` (Unix seconds) outlived the age limit.
    fn expired(&self, stored_at: i64) -> bool {
        let now = i64::try_from(crate::hub::unix_now()).unwrap_or(i64::MAX);
        self.max_age_seconds > 0
            && now.saturating_sub(stored_at)
                >= i64::try_from(self.max_age_seconds).unwrap_or(i64::MAX)
    }

    fn record(agent: &str, seq: u64, state: DurableState, digest: Option<&str>) -> Bytes {
        let record = Record {
            agent: agent.to_owned(),
            seq,
            state,
            at_ms: unix_now_ms(),
            digest: digest.map(str::to_owned),
        };
        Bytes::from(serde_json::to_vec(&record).expect("records serialize"))
    }

    /// The digest agent `agent`'s message `id` (stored at `seq`) was stored with: from
    /// the message while it is stored, else from its status record; `None` when
    /// neither says (a message stored before digests existed).
    async fn stored_digest(
        &self,
        agent: &str,
        id: &str,
        seq: u64,
    ) -> Result<Option<String>, RouteError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            RouteError::Unavailable(format!("checking a duplicate: {e}"))
        };
        match self.stream.get_raw_message(seq).await {
            Ok(message) => return Ok(message_digest(&message)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(unavailable(&e)),
        }
        let record = self
            .status
            .get(Subjects::message_key(agent, id))
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(record
            .and_then(|value| serde_json::from_slice::<Record>(&value).ok())
            .and_then(|record| record.digest))
    }

    /// Records a newly stored message as pending. `create`, not `put`: a drain task may
    /// already have recorded its delivery (or its ack). An id reused for a newer message
    /// (after the duplicate window) replaces the older message's record.
    async fn record_stored(&self, agent: &str, id: &str, seq: u64, digest: &str) {
        let key = Subjects::message_key(agent, id);
        let value = Self::record(agent, seq, DurableState::Pending, Some(digest));
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
    async fn record_delivered(&self, agent: &str, id: &str, seq: u64, digest: Option<&str>) {
        let subject = format!("{}{}", self.status_prefix, Subjects::message_key(agent, id));
        let value = Self::record(agent, seq, DurableState::Delivered, digest);
        if let Err(e) = self.client.publish(subject, value).await {
            debug!(%e, id, "delivery record not sent");
        }
    }

    /// Records acknowledgements; done before the purge, so a message that is gone and
    /// not recorded as acknowledged is one that expired.
    async fn record_acknowledged(&self, agent: &str, acked: &[(u64, String, Option<String>)]) {
        let puts = acked.iter().map(|(seq, id, digest)| {
            let value = Self::record(agent, *seq, DurableState::Acknowledged, digest.as_deref());
            async move {
                if let Err(e) = self
                    .status
                    .put(Subjects::message_key(agent, id), value)
                    .await
                {
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
                digest: message_digest(&message),
                expired: self.expired(message.time.unix_timestamp()),
                payload: message.payload,
            })),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whether `conn` is still this pod's live connection of its agent.
    fn still_current(&self, conn: &Arc<Connection>) -> bool {
        !conn.is_closing()
            && self
                .hub
                .get(&conn.agent_id)
                .is_some_and(|c| Arc::ptr_eq(&c, conn))
    }

    /// Deletes one acknowledged message (already gone: done).
    async fn delete(&self, seq: u64) -> Result<(), String> {
        match self.stream.delete_message(seq).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("no message found") => Ok(()),
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
///
/// Expired messages are skipped, not removed: the pool's sweep removes them and tells
/// the upstream (`expired`, once per message). Until the sweep has removed every
/// expired message this task skipped, acknowledged messages are deleted one by one
/// instead of purged as a prefix, so a purge never removes an expired message
/// without its event.
async fn drain_task(shared: Arc<Shared>, conn: Arc<Connection>, drain: Arc<Drain>) {
    let agent = conn.agent_id.clone();
    let mut window = Window::default();
    let mut digests: HashMap<u64, Option<String>> = HashMap::new();
    let mut next = 1;
    // The highest acknowledged sequence not yet purged (purge failed: retried).
    let mut unpurged: Option<u64> = None;
    // Acknowledged messages to delete one by one (an expired one lies below them).
    let mut to_delete: Vec<u64> = Vec::new();
    // Expired messages skipped and not yet seen removed by the sweep, in order.
    let mut skipped: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    loop {
        let acks = {
            let mut state = drain.state.lock();
            if state.stopped {
                break;
            }
            state.kicked = false;
            std::mem::take(&mut state.acks)
        };
        if !shared.still_current(&conn) {
            break;
        }
        let acked: Vec<(u64, String, Option<String>)> = acks
            .into_iter()
            .filter_map(|id| window.ack(&id).map(|seq| (seq, id)))
            .map(|(seq, id)| (seq, id, digests.remove(&seq).flatten()))
            .collect();
        if !acked.is_empty() {
            shared.record_acknowledged(&agent, &acked).await;
        }
        let mut failed = false;
        // The sweep removes expired messages oldest first: drop those it removed.
        while let Some(&oldest) = skipped.first() {
            match shared.stream.get_raw_message(oldest).await {
                Ok(_) => break,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                    skipped.pop_first();
                }
                Err(e) => {
                    debug!(%e, %agent, "looking at a skipped expired message failed; retrying");
                    failed = true;
                    break;
                }
            }
        }
        let floor = window.take_floor();
        match skipped.first() {
            None => {
                if let Some(floor) = floor {
                    unpurged = Some(floor);
                }
            }
            Some(&barrier) => {
                // A prefix purge would take the expired message too: below it, purge;
                // above it, delete what was acknowledged, one by one.
                to_delete.extend(acked.iter().map(|(seq, ..)| *seq).filter(|s| *s > barrier));
                // Everything written up to the floor is acknowledged; below the
                // barrier nothing else is left.
                if let Some(below) = floor
                    .map(|f| f.min(barrier - 1))
                    .filter(|b| *b > 0 && unpurged.is_none_or(|u| u < *b))
                {
                    unpurged = Some(below);
                }
            }
        }
        if let Some(floor) = unpurged {
            match shared.purge_through(&agent, floor).await {
                Ok(()) => unpurged = None,
                Err(e) => {
                    debug!(%e, %agent, "purge of acknowledged messages failed; retrying");
                    failed = true;
                }
            }
        }
        while let Some(&seq) = to_delete.last() {
            match shared.delete(seq).await {
                Ok(()) => {
                    to_delete.pop();
                }
                Err(e) => {
                    debug!(%e, %agent, "delete of an acknowledged message failed; retrying");
                    failed = true;
                    break;
                }
            }
        }
        while window.len() < shared.in_flight {
            match shared.next_message(&agent, next).await {
                Ok(Some(message)) => {
                    next = message.sequence + 1;
                    if message.expired {
                        skipped.insert(message.sequence);
                        continue;
                    }
                    let Ok(frame) = wire::frame_of(message.payload, false) else {
                        warn!(%agent, sequence = message.sequence, "stored frame is not UTF-8; skipped");
                        continue;
                    };
                    // Owed before it is queued: the agent's ack may come before this
                    // task runs again.
                    drain
                        .state
                        .lock()
                        .outstanding
                        .entry(message.id.clone())
                        .and_modify(|n| *n += 1)
                        .or_insert(1);
                    match enqueue(&shared, &conn, &drain, frame).await {
                        Ok(()) => {
                            shared
                                .record_delivered(
                                    &agent,
                                    &message.id,
                                    message.sequence,
                                    message.digest.as_deref(),
                                )
                                .await;
                            digests.insert(message.sequence, message.digest);
                            window.sent(message.sequence, message.id);
                        }
                        Err(_) => {
                            drain.state.lock().take_outstanding(&message.id);
                            // Not queued: the next look starts from it again.
                            next = message.sequence;
                            break;
                        }
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
        let settled = unpurged.is_none() && to_delete.is_empty();
        if window.is_empty() && !failed && settled {
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
        let wait = if failed || !skipped.is_empty() {
            RETRY_AFTER
        } else {
            IDLE_RECHECK
        };
        let _ = tokio::time::timeout(wait, drain.notify.notified()).await;
    }
    shared.drains.lock().remove(&conn.id);
}

/// How long the drain task waits for room in a full outbound queue before it looks
/// again (live pushes share the queue; the writer frees room as it writes).
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

/// Queues a frame, waiting while the connection's queue is full. Gives up as soon as
/// the connection ended (stopped, closing, or no longer the agent's connection in the
/// hub): a dead socket's queue never drains, and waiting on it would keep this task,
/// the connection and its queued frames alive forever.
async fn enqueue(
    shared: &Shared,
    conn: &Arc<Connection>,
    drain: &Drain,
    frame: crate::hub::Outbound,
) -> Result<(), DeliveryError> {
    loop {
        match conn.enqueue(frame.clone(), shared.outbound_queue) {
            Err(DeliveryError::QueueFull) => {
                if drain.state.lock().stopped || !shared.still_current(conn) {
                    return Err(DeliveryError::NotConnected);
                }
                tokio::time::sleep(QUEUE_FULL_RETRY).await;
            }
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

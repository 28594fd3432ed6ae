//! The local hub: every agent connection held by this process, indexed by agent id and
//! by group, with a small bounded outbox per connection.
//!
//! ```text
//!   push API / router / sweep ──> Connection::enqueue ──┬─ socket lent, nothing queued ──> sendmsg(2), done
//!                                                       └─ else ──> outbox ──wake──> connection driver ──> socket
//!   session (driver) ──> Hub::complete(reply) ──> pending request/ack waiter (oneshot)
//! ```
//!
//! The direct write is what makes a fan-out cost about what the kernel charges: a
//! queued frame costs a task wake, a poll and two allocations per recipient on top of
//! the write. An idle driver lends its socket's descriptor to the connection
//! ([`Connection::lend_socket`]); a delivery holding the connection's lock writes the
//! whole frame without blocking, and only a full socket buffer (or a partial write,
//! whose rest is queued first) sends it through the queue. The driver takes the
//! socket back under the same lock before it writes anything itself or closes it, so
//! bytes never interleave and the descriptor is never written after its close.
//!
//! Memory per idle connection is the product's headline, so a [`Connection`] holds no
//! buffer while idle: its outbox is a `VecDeque` that allocates only when a message is
//! queued and gives its memory back once drained, and pending requests live in one map
//! for the whole hub instead of a map per connection.
//!
//! The agent and group maps sit under one lock ([`Index`]), so a reconnect racing the
//! old connection's `unregister` (or a `refresh` changing groups) never loses or leaks
//! a group membership. A pending answer is owned by the waiter that created it (a
//! gateway-made token): a waiter removes only its own entry, an in-flight id cannot be
//! reused (409), and an `ack` completes only an acked push, a `response` only a request.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::task::Waker;
use tether_protocol::{CloseCode, ErrorBody, RawValue};

use crate::revocation::{Revocation, Revocations, Revoked};

use futures_util::task::AtomicWaker;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::frame::{Opcode, OutFrame};
use crate::liveness::Clock;

/// One frame waiting to be written to an agent.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A pre-encoded text envelope; shared (not copied) between recipients of a broadcast.
    Text(Utf8Bytes),
    /// An opaque binary payload.
    Binary(Bytes),
    /// A WebSocket ping (queued by the liveness sweeper).
    Ping,
    /// Close the connection with this code once everything queued before it is written.
    Close(CloseCode),
    /// The unwritten rest of a frame that a delivery began writing straight to the
    /// socket ([`Connection::enqueue`]); written as is, before anything else.
    Raw(Bytes),
}

/// Why a message could not be queued for an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// No connection for this agent on this pod.
    #[error("agent is not connected")]
    NotConnected,
    /// The agent's outbound queue is full.
    #[error("agent's outbound queue is full")]
    QueueFull,
    /// Too many requests to this agent are waiting for answers.
    #[error("too many pending requests for this agent")]
    TooManyPending,
    /// A request or acked push with this id is already waiting for this agent's answer.
    #[error("a message with this id is already waiting for the agent's answer")]
    Duplicate,
}

/// Which answer a pending entry waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A `response` to a `request`.
    Response,
    /// An `ack` of a push sent with `ack=true`.
    Ack,
}

/// The agent's answer to a request (or acknowledgement of a push).
pub type AgentReply = Result<Box<RawValue>, ErrorBody>;

/// The bounded per-connection queue. An `AtomicWaker` wakes the connection's driver
/// (its future registers its own task's waker: no `Notified` future, no waiter list);
/// the queue is a plain `VecDeque` because it must cost nothing while empty (a tokio
/// mpsc channel allocates its first block of slots up front).
#[derive(Debug, Default)]
struct Outbox {
    state: Mutex<Mutable>,
    waker: AtomicWaker,
}

/// What changes in a connection after it is created, under one byte-sized lock: the
/// queue, the closing flag (read and set with the queue, so a push racing a close is
/// never queued behind it) and the groups (replaced by a `refresh`, under the hub's
/// index lock too). One lock instead of three keeps an idle connection's size.
///
/// The queue and the groups are one pointer each, `None` when empty: with the clock's
/// expiry in 32 bits this keeps an `Arc<Connection>` at 128 bytes (an allocator size
/// class; one word more and it would take the next one, 160).
#[derive(Debug, Default)]
struct Mutable {
    /// Frames waiting for the driver; allocated only while there are some.
    #[expect(
        clippy::box_collection,
        reason = "one word while empty instead of a VecDeque's four: every idle connection holds an empty queue"
    )]
    queue: Option<Box<VecDeque<Outbound>>>,
    /// Set once a `Close` is queued: nothing more is accepted.
    closing: bool,
    /// The socket's descriptor while its driver lends it ([`Connection::lend_socket`]),
    /// -1 otherwise: deliveries then write straight to it instead of queueing and
    /// waking the driver. Lent only while the driver holds nothing unwritten and the
    /// queue is empty, and taken back (under this lock) before the driver writes or
    /// drops the socket — so bytes never interleave and the descriptor is open.
    socket: i32,
    /// The token's groups and id; `None` for an agent in no group whose token has no
    /// `jti`.
    groups: Option<Box<Groups>>,
}

/// A connection's groups (the token's `groups` claim) and its token's `jti` (what a
/// revocation by token names), behind one thin pointer: the `jti` lives here rather
/// than in [`Connection`] so that an idle connection stays in its allocator size class.
#[derive(Debug)]
struct Groups {
    names: Box<[Box<str>]>,
    jti: Option<Box<str>>,
}

impl Mutable {
    fn groups(&self) -> &[Box<str>] {
        self.groups.as_deref().map_or(&[], |g| &g.names)
    }

    fn jti(&self) -> Option<&str> {
        self.groups.as_deref().and_then(|g| g.jti.as_deref())
    }

    fn queue_len(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.len())
    }
}

fn groups_of(groups: Vec<String>, jti: Option<Box<str>>) -> Option<Box<Groups>> {
    (!groups.is_empty() || jti.is_some()).then(|| {
        Box::new(Groups {
            names: groups.into_iter().map(String::into_boxed_str).collect(),
            jti,
        })
    })
}

/// One agent's connection, shared by the hub (for delivery) and its connection driver.
#[derive(Debug)]
pub struct Connection {
    /// Process-unique id of this connection; distinguishes it from a newer connection
    /// of the same agent.
    pub id: u64,
    /// The agent id (the token's `sub`).
    pub agent_id: Box<str>,
    /// Unix milliseconds when the connection was accepted (orders an agent's
    /// connections across pods: newest wins).
    pub connected_at_ms: u64,
    /// Liveness stamps: last frames, outstanding ping, token expiry.
    pub clock: Clock,
    /// Queue, closing flag and groups (the token's `groups` claim).
    outbox: Outbox,
    /// Requests and acked pushes to this agent that wait for an answer.
    pending: AtomicU32,
    /// The agent's `send`/`request` messages waiting on the upstream.
    upstream_in_flight: AtomicU32,
}

impl Connection {
    /// A connection not yet registered in a hub, whose token expires at `expires_at`
    /// (Unix seconds, grace included).
    pub fn new(id: u64, agent_id: &str, groups: Vec<String>, expires_at: u64) -> Arc<Self> {
        Arc::new(Self {
            id,
            agent_id: agent_id.into(),
            connected_at_ms: unix_now_ms(),
            clock: Clock::new(expires_at),
            outbox: Outbox {
                state: Mutex::new(Mutable {
                    queue: None,
                    closing: false,
                    socket: -1,
                    groups: groups_of(groups, None),
                }),
                waker: AtomicWaker::new(),
            },
            pending: AtomicU32::new(0),
            upstream_in_flight: AtomicU32::new(0),
        })
    }

    /// Records the id (`jti`) of the token the connection now holds (at the handshake
    /// and on every `refresh`).
    pub fn set_jti(&self, jti: Option<&str>) {
        let mut state = self.outbox.state.lock();
        let names: Vec<String> = state.groups().iter().map(ToString::to_string).collect();
        state.groups = groups_of(names, jti.map(Into::into));
    }

    /// Whether the connection's current token has the id `jti`.
    pub fn has_jti(&self, jti: &str) -> bool {
        self.outbox.state.lock().jti() == Some(jti)
    }

    /// The connection's groups.
    pub fn groups(&self) -> Vec<String> {
        let state = self.outbox.state.lock();
        state.groups().iter().map(ToString::to_string).collect()
    }

    /// Takes one of `max` upstream slots of this connection; `None` when all are busy.
    pub fn try_upstream_slot(self: &Arc<Self>, max: u32) -> Option<UpstreamSlot> {
        self.upstream_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| UpstreamSlot(self.clone()))
    }

    /// Delivers a frame: written straight to the socket when its driver lends it and
    /// nothing waits before it (no queue, no task wake, no poll: a broadcast or a ping
    /// costs about the `send(2)` alone), else queued for the driver unless the queue
    /// holds `capacity` frames already or the connection is closing.
    ///
    /// `closing` is checked under the queue's lock, and [`Connection::close`] sets it
    /// under the same lock: a push racing a close is either delivered before the
    /// `Close` (and written) or refused (and the caller told) — never queued after it
    /// and lost. A frame the kernel takes only in part leaves its rest queued first
    /// ([`Outbound::Raw`]) and the socket taken back from deliveries, so the next bytes
    /// on the wire are that rest.
    pub fn enqueue(&self, frame: Outbound, capacity: usize) -> Result<(), DeliveryError> {
        let delivered = self.enqueue_encoded(Cow::Owned(frame), None, capacity)?;
        if delivered == Delivered::Written {
            DIRECT_WRITES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// [`Connection::enqueue`] with the frame already encoded whole (`wire`: header and
    /// payload in one buffer, shared by every recipient of a fan-out), so that a direct
    /// write is one buffer handed to the kernel. A borrowed frame is cloned only if it
    /// is queued; the caller counts the direct writes ([`DIRECT_WRITES`]).
    fn enqueue_encoded(
        &self,
        frame: Cow<'_, Outbound>,
        wire: Option<&Bytes>,
        capacity: usize,
    ) -> Result<Delivered, DeliveryError> {
        {
            let mut state = self.outbox.state.lock();
            if state.closing {
                return Err(DeliveryError::NotConnected);
            }
            if state.socket >= 0 && state.queue.is_none() {
                let written = match wire {
                    Some(wire) => write_encoded(state.socket, wire),
                    None => write_now(state.socket, &frame),
                };
                match written {
                    Written::All => return Ok(Delivered::Written),
                    Written::Part(rest) => {
                        state.socket = -1;
                        state
                            .queue
                            .get_or_insert_default()
                            .push_back(Outbound::Raw(rest));
                        drop(state);
                        self.outbox.waker.wake();
                        return Ok(Delivered::Written);
                    }
                    // Full socket buffer, or an error the driver will meet itself:
                    // queued as if the socket had not been lent.
                    Written::Nothing => {}
                }
            }
            if state.queue_len() >= capacity {
                return Err(DeliveryError::QueueFull);
            }
            state
                .queue
                .get_or_insert_default()
                .push_back(frame.into_owned());
        }
        self.outbox.waker.wake();
        Ok(Delivered::Queued)
    }

    /// Lends the socket `fd` to deliveries ([`Connection::enqueue`]) if nothing is
    /// queued and the connection is not closing; returns whether it did. The driver
    /// calls it when it has nothing unwritten, and must [`reclaim`](Self::reclaim_socket)
    /// it before writing itself or closing the descriptor.
    pub fn lend_socket(&self, fd: std::os::fd::RawFd) -> bool {
        let mut state = self.outbox.state.lock();
        if state.queue.is_some() || state.closing || fd < 0 {
            return false;
        }
        state.socket = fd;
        true
    }

    /// Takes the socket back from deliveries; once this returns no delivery writes to
    /// it (one in progress holds the lock this waits for).
    pub fn reclaim_socket(&self) {
        self.outbox.state.lock().socket = -1;
    }

    /// Queues a close after whatever is already queued. The first close wins; later
    /// ones are ignored so the agent sees the reason that actually ended the session.
    pub fn close(&self, code: CloseCode) {
        {
            let mut state = self.outbox.state.lock();
            if std::mem::replace(&mut state.closing, true) {
                return;
            }
            state
                .queue
                .get_or_insert_default()
                .push_back(Outbound::Close(code));
        }
        self.outbox.waker.wake();
    }

    /// Stops accepting frames without queueing a close: the connection's driver is
    /// closing on its own (protocol violation, the agent's close), so a push from now
    /// on is told the agent is gone instead of being queued behind a close and lost.
    pub fn stop_accepting(&self) {
        self.outbox.state.lock().closing = true;
    }

    /// Whether a close has been queued.
    pub fn is_closing(&self) -> bool {
        self.outbox.state.lock().closing
    }

    /// Takes everything queued, and the queue's allocation with it, so a burst does
    /// not leave memory behind on an idle connection.
    pub fn take_queued(&self, into: &mut Vec<Outbound>) {
        if let Some(queue) = self.outbox.state.lock().queue.take() {
            into.extend(*queue);
        }
    }

    /// Hands queued frames to `f` in order, under the queue's lock, until `f` returns
    /// `false` (that frame is taken too) or the queue is empty; returns the queue's
    /// allocation once it is empty. `f` must be quick: pushes wait on the lock.
    pub fn drain_queued(&self, mut f: impl FnMut(Outbound) -> bool) {
        let mut state = self.outbox.state.lock();
        let Some(queue) = state.queue.as_mut() else {
            return;
        };
        while let Some(frame) = queue.pop_front() {
            if !f(frame) {
                break;
            }
        }
        if queue.is_empty() {
            state.queue = None;
        }
    }

    /// Wakes `waker` when a frame is queued from now on. Register before looking at
    /// the queue, so a push between the look and the wait is not missed.
    pub fn register_waker(&self, waker: &Waker) {
        self.outbox.waker.register(waker);
    }

    /// Number of frames waiting to be written.
    pub fn queue_len(&self) -> usize {
        self.outbox.state.lock().queue_len()
    }
}

/// Frames written straight to sockets by deliveries since the last
/// [`take_direct_writes`] (the drivers count the frames they write themselves).
static DIRECT_WRITES: AtomicU64 = AtomicU64::new(0);

/// Frames written straight to sockets since the last call (for `tether.messages.sent`).
pub fn take_direct_writes() -> u64 {
    DIRECT_WRITES.swap(0, Ordering::Relaxed)
}

/// How [`Connection::enqueue_encoded`] delivered a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivered {
    /// Written to the lent socket (whole, or begun with its rest queued first).
    Written,
    /// Queued for the connection's driver.
    Queued,
}

/// What a write straight to a lent socket did.
enum Written {
    /// The whole frame.
    All,
    /// Part of it; the rest.
    Part(Bytes),
    /// Nothing (the kernel's buffer is full, or the socket failed).
    Nothing,
}

/// Writes `frame` (a data frame or a ping) to `fd` without blocking, header and payload
/// in one `sendmsg(2)`. Closes and raw rests are never written here.
fn write_now(fd: std::os::fd::RawFd, frame: &Outbound) -> Written {
    let frame = match frame {
        Outbound::Text(text) => OutFrame::new(Opcode::Text, AsRef::<Bytes>::as_ref(text).clone()),
        Outbound::Binary(data) => OutFrame::new(Opcode::Binary, data.clone()),
        Outbound::Ping => OutFrame::new(Opcode::Ping, Bytes::new()),
        Outbound::Close(_) | Outbound::Raw(_) => return Written::Nothing,
    };
    let (head, payload) = frame.parts();
    match crate::direct::send_nonblocking(fd, head, payload) {
        Ok(n) if n >= head.len() + payload.len() => Written::All,
        Ok(0) | Err(_) => Written::Nothing,
        Ok(n) if n < head.len() => {
            let mut rest = Vec::with_capacity(head.len() - n + payload.len());
            rest.extend_from_slice(&head[n..]);
            rest.extend_from_slice(payload);
            Written::Part(rest.into())
        }
        Ok(n) => Written::Part(payload.slice(n - head.len()..)),
    }
}

/// Writes an encoded frame to `fd` without blocking (see [`write_now`]).
fn write_encoded(fd: std::os::fd::RawFd, wire: &Bytes) -> Written {
    match crate::direct::send_nonblocking(fd, wire, &[]) {
        Ok(n) if n >= wire.len() => Written::All,
        Ok(0) | Err(_) => Written::Nothing,
        Ok(n) => Written::Part(wire.slice(n..)),
    }
}

/// A data frame encoded whole (header then payload, one buffer); `None` for frames
/// that never go straight to a socket.
fn encode_whole(frame: &Outbound) -> Option<Bytes> {
    let frame = match frame {
        Outbound::Text(text) => OutFrame::new(Opcode::Text, AsRef::<Bytes>::as_ref(text).clone()),
        Outbound::Binary(data) => OutFrame::new(Opcode::Binary, data.clone()),
        Outbound::Ping | Outbound::Close(_) | Outbound::Raw(_) => return None,
    };
    let (head, payload) = frame.parts();
    let mut wire = Vec::with_capacity(head.len() + payload.len());
    wire.extend_from_slice(head);
    wire.extend_from_slice(payload);
    Some(wire.into())
}

/// One in-flight upstream call of a connection, released on drop.
#[derive(Debug)]
pub struct UpstreamSlot(Arc<Connection>);

impl Drop for UpstreamSlot {
    fn drop(&mut self) {
        self.0.upstream_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Unix time in milliseconds.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// What [`Hub::register`] found.
#[derive(Debug)]
pub struct Registered {
    /// The older connection of the same agent, now told to close with
    /// [`CloseCode::Replaced`].
    pub replaced: Option<Arc<Connection>>,
}

type PendingKey = (u64, Box<str>);

/// Connections a fan-out delivers to before it yields its worker thread: about a
/// millisecond of `send(2)` calls on loopback.
pub const FAN_OUT_BATCH: usize = 256;

/// A waiter's entry: its token (gateway-made, unique), what it waits for, where to.
#[derive(Debug)]
struct Pending {
    token: u64,
    expect: Expect,
    tx: oneshot::Sender<AgentReply>,
}

/// A connection in the agent map, keyed by its own agent id: the id is stored once
/// (in the `Connection`), not again as the map's key, and the map's slot is one
/// pointer — at a hundred thousand connections per process that is ~50 B each. Its
/// hash and equality are the agent id's, which never changes: the connection's
/// interior mutability (queue, clock) does not reach the key.
#[derive(Debug, Clone)]
struct ByAgent(Arc<Connection>);

impl std::borrow::Borrow<str> for ByAgent {
    fn borrow(&self) -> &str {
        &self.0.agent_id
    }
}

impl std::hash::Hash for ByAgent {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it (`Borrow`'s contract).
        self.0.agent_id.hash(state);
    }
}

impl PartialEq for ByAgent {
    fn eq(&self, other: &Self) -> bool {
        self.0.agent_id == other.0.agent_id
    }
}

impl Eq for ByAgent {}

/// Agents and group memberships, changed together under one lock.
#[derive(Debug, Default)]
struct Index {
    agents: HashSet<ByAgent>,
    groups: HashMap<Box<str>, HashSet<Box<str>>>,
}

impl Index {
    fn join_groups(&mut self, conn: &Connection) {
        for group in conn.outbox.state.lock().groups() {
            self.groups
                .entry(group.clone())
                .or_default()
                .insert(conn.agent_id.clone());
        }
    }

    fn leave_groups(&mut self, conn: &Connection) {
        for group in conn.outbox.state.lock().groups() {
            if let Some(members) = self.groups.get_mut(group) {
                members.remove(&conn.agent_id);
                if members.is_empty() {
                    self.groups.remove(group);
                }
            }
        }
    }

    fn is_current(&self, conn: &Connection) -> bool {
        self.agents
            .get(&*conn.agent_id)
            .is_some_and(|c| c.0.id == conn.id)
    }
}

/// All connections of this process.
#[derive(Debug)]
pub struct Hub {
    index: RwLock<Index>,
    pending: Mutex<HashMap<PendingKey, Pending>>,
    next_pending_token: AtomicU64,
    next_connection_id: AtomicU64,
    /// Connections the liveness sweep has yet to file ([`Hub::take_to_schedule`]).
    to_schedule: Mutex<Vec<Arc<Connection>>>,
    /// Connections whose expiry a `refresh` moved ([`Hub::expiry_moved`]).
    expiry_moved: Mutex<Vec<Arc<Connection>>>,
    outbound_queue: usize,
    max_pending: u32,
    /// Agents and tokens revoked across the pool (checked at the handshake and on
    /// `refresh`).
    pub revocations: Revocations,
}

impl Hub {
    /// An empty hub whose connections queue at most `outbound_queue` frames and wait for
    /// at most `max_pending` answers each.
    pub fn new(outbound_queue: usize, max_pending: usize) -> Self {
        Self {
            index: RwLock::default(),
            pending: Mutex::default(),
            next_pending_token: AtomicU64::new(1),
            next_connection_id: AtomicU64::new(1),
            to_schedule: Mutex::default(),
            expiry_moved: Mutex::default(),
            outbound_queue,
            max_pending: u32::try_from(max_pending).unwrap_or(u32::MAX),
            revocations: Revocations::default(),
        }
    }

    /// Records a revocation and closes this pod's connections it names with
    /// [`CloseCode::Revoked`]. Returns how many it closed.
    pub fn revoke(&self, revocation: &Revocation) -> usize {
        let now = unix_now();
        self.revocations.insert(revocation, now);
        if revocation.until <= now {
            return 0;
        }
        let doomed: Vec<Arc<Connection>> = match &revocation.revoked {
            Revoked::Agent(agent) => self.get(agent).into_iter().collect(),
            Revoked::Token(jti) => self
                .snapshot()
                .into_iter()
                .filter(|conn| conn.has_jti(jti))
                .collect(),
        };
        for conn in &doomed {
            conn.close(CloseCode::Revoked);
        }
        doomed.len()
    }

    /// A fresh process-unique connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a connection. The newest connection of an agent wins: an older one is told
    /// to close with [`CloseCode::Replaced`] after what it has queued.
    pub fn register(&self, conn: &Arc<Connection>) -> Registered {
        let replaced = {
            let mut index = self.index.write();
            let replaced = index.agents.replace(ByAgent(conn.clone())).map(|old| old.0);
            if let Some(old) = &replaced {
                index.leave_groups(old);
            }
            index.join_groups(conn);
            replaced
        };
        if let Some(old) = &replaced {
            old.close(CloseCode::Replaced);
        }
        self.to_schedule.lock().push(conn.clone());
        Registered { replaced }
    }

    /// The connections registered since the liveness sweep last took them: it looks
    /// at each on its next tick and files it by its stamps.
    pub fn take_to_schedule(&self) -> Vec<Arc<Connection>> {
        std::mem::take(&mut *self.to_schedule.lock())
    }

    /// Tells the liveness sweep that a `refresh` moved `conn`'s expiry, which may now
    /// come before the second the sweep has the connection filed for.
    pub fn expiry_moved(&self, conn: &Arc<Connection>) {
        self.expiry_moved.lock().push(conn.clone());
    }

    /// The connections whose expiry moved since the liveness sweep last took them.
    pub fn take_expiry_moved(&self) -> Vec<Arc<Connection>> {
        std::mem::take(&mut *self.expiry_moved.lock())
    }

    /// Replaces a connection's groups (a `refresh` with a token naming other groups).
    pub fn set_groups(&self, conn: &Connection, groups: Vec<String>) {
        let jti = conn.outbox.state.lock().jti().map(Into::into);
        let groups = groups_of(groups, jti);
        let mut index = self.index.write();
        let current = index.is_current(conn);
        if current {
            index.leave_groups(conn);
        }
        conn.outbox.state.lock().groups = groups;
        if current {
            index.join_groups(conn);
        }
    }

    /// Removes a connection if it is still the agent's current one (a replaced
    /// connection must not remove its successor), and fails its pending requests.
    /// Returns whether it was current.
    pub fn unregister(&self, conn: &Arc<Connection>) -> bool {
        let removed = {
            let mut index = self.index.write();
            let current = index.is_current(conn);
            if current {
                index.agents.remove(&*conn.agent_id);
                index.leave_groups(conn);
            }
            current
        };
        if conn.pending.load(Ordering::Acquire) > 0 {
            // Dropping the senders tells every waiter the agent went away.
            self.pending.lock().retain(|(id, _), _| *id != conn.id);
        }
        removed
    }

    /// The agent's current connection on this pod.
    pub fn get(&self, agent: &str) -> Option<Arc<Connection>> {
        self.index.read().agents.get(agent).map(|c| c.0.clone())
    }

    /// Number of registered connections.
    pub fn len(&self) -> usize {
        self.index.read().agents.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.index.read().agents.is_empty()
    }

    /// Members of a group on this pod (agent ids, sorted).
    pub fn group_members(&self, group: &str) -> Vec<String> {
        let index = self.index.read();
        let mut members: Vec<String> = index
            .groups
            .get(group)
            .map(|m| m.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        members.sort_unstable();
        members
    }

    /// Queues a frame for one agent.
    pub fn deliver(&self, agent: &str, frame: Outbound) -> Result<(), DeliveryError> {
        let conn = self.get(agent).ok_or(DeliveryError::NotConnected)?;
        conn.enqueue(frame, self.outbound_queue)
    }

    /// Queues a frame that expects an answer (`request`, or `push` with `ack`) and
    /// returns the receiver of that answer. The receiver errors if the agent
    /// disconnects first. An id already waiting for this agent's answer is refused
    /// ([`DeliveryError::Duplicate`]): its answer could not tell the two apart.
    pub fn deliver_expecting_reply(
        &self,
        agent: &str,
        message_id: &str,
        expect: Expect,
        frame: Outbound,
    ) -> Result<PendingReply<'_>, DeliveryError> {
        let conn = self.get(agent).ok_or(DeliveryError::NotConnected)?;
        if conn.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            conn.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(DeliveryError::TooManyPending);
        }
        let key: PendingKey = (conn.id, message_id.into());
        let token = self.next_pending_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock();
            if pending.contains_key(&key) {
                drop(pending);
                conn.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(DeliveryError::Duplicate);
            }
            pending.insert(key.clone(), Pending { token, expect, tx });
        }
        let guard = PendingReply {
            hub: self,
            conn,
            key,
            token,
            rx,
        };
        guard.conn.enqueue(frame, self.outbound_queue)?;
        Ok(guard)
    }

    /// Hands an agent's answer to whoever waits for it. Returns false when nobody waits
    /// for this kind of answer (late answer after a timeout, an id the gateway never
    /// sent, or an `ack` naming a request).
    pub fn complete(
        &self,
        connection_id: u64,
        message_id: &str,
        answer: Expect,
        reply: AgentReply,
    ) -> bool {
        let key: PendingKey = (connection_id, message_id.into());
        let mut pending = self.pending.lock();
        if pending.get(&key).is_none_or(|p| p.expect != answer) {
            return false;
        }
        let entry = pending.remove(&key).expect("checked above");
        drop(pending);
        entry.tx.send(reply).is_ok()
    }

    /// Delivers the same frame to every member of a group; returns how many got it.
    /// Members whose queue is full are closed as slow consumers: a broadcast cannot
    /// answer 429 per recipient, and silently skipping one would lose the message.
    pub async fn deliver_to_group(&self, group: &str, frame: &Outbound) -> usize {
        let members: Vec<Arc<Connection>> = {
            let index = self.index.read();
            let Some(names) = index.groups.get(group) else {
                return 0;
            };
            names
                .iter()
                .filter_map(|n| index.agents.get(&**n).map(|c| c.0.clone()))
                .collect()
        };
        self.fan_out(&members, frame).await
    }

    /// Delivers the same frame to every connection; returns how many got it.
    pub async fn broadcast(&self, frame: &Outbound) -> usize {
        let all: Vec<Arc<Connection>> = self
            .index
            .read()
            .agents
            .iter()
            .map(|c| c.0.clone())
            .collect();
        self.fan_out(&all, frame).await
    }

    /// One frame (its payload shared, never copied) to each of `conns`, in batches of
    /// [`FAN_OUT_BATCH`]: most are written straight to their idle sockets
    /// ([`Connection::enqueue`]), so a batch is mostly `send(2)` calls, and between
    /// batches the worker thread is handed back so that a fan-out to a hundred
    /// thousand connections does not hold it for the whole loop. A connection that
    /// closed meanwhile is skipped (not counted); each connection's frames stay in
    /// the order they were delivered in, since every delivery to it goes through its
    /// lock.
    async fn fan_out(&self, conns: &[Arc<Connection>], frame: &Outbound) -> usize {
        // Encoded once: each direct write hands the kernel one shared buffer.
        let wire = encode_whole(frame);
        let mut delivered = 0;
        for (i, batch) in conns.chunks(FAN_OUT_BATCH).enumerate() {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            // Counted once per batch: one shared counter touched per recipient is a
            // cache line bounced between the workers on every delivery.
            let mut written = 0;
            for conn in batch {
                match conn.enqueue_encoded(Cow::Borrowed(frame), wire.as_ref(), self.outbound_queue)
                {
                    Ok(how) => {
                        delivered += 1;
                        written += u64::from(how == Delivered::Written);
                    }
                    Err(DeliveryError::QueueFull) => conn.close(CloseCode::SlowConsumer),
                    Err(_) => {}
                }
            }
            DIRECT_WRITES.fetch_add(written, Ordering::Relaxed);
        }
        delivered
    }

    /// A page of connected agents ordered by id, starting after `cursor`.
    ///
    /// No global sort: one pass over the index keeps the `limit + 1` smallest ids after
    /// the cursor in a bounded max-heap (O(n log limit) under the read lock, and memory
    /// for one page, not for every connection); the page is sorted after the lock is
    /// released.
    pub fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<Connection>>, Option<String>) {
        use std::collections::BinaryHeap;
        /// Orders connections by agent id for the heap.
        struct ById(Arc<Connection>);
        impl PartialEq for ById {
            fn eq(&self, other: &Self) -> bool {
                self.0.agent_id == other.0.agent_id
            }
        }
        impl Eq for ById {}
        impl PartialOrd for ById {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for ById {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.0.agent_id.cmp(&other.0.agent_id)
            }
        }
        let keep = limit.saturating_add(1);
        let mut heap: BinaryHeap<ById> = BinaryHeap::with_capacity(keep.min(1024));
        {
            let index = self.index.read();
            for conn in index.agents.iter().map(|c| &c.0) {
                if cursor.is_some_and(|cursor| &*conn.agent_id <= cursor) {
                    continue;
                }
                if heap.len() < keep {
                    heap.push(ById(conn.clone()));
                } else if heap
                    .peek()
                    .is_some_and(|largest| conn.agent_id < largest.0.agent_id)
                {
                    heap.pop();
                    heap.push(ById(conn.clone()));
                }
            }
        }
        let mut conns: Vec<Arc<Connection>> =
            heap.into_sorted_vec().into_iter().map(|c| c.0).collect();
        let more = conns.len() > limit;
        conns.truncate(limit);
        let page = conns;
        let next = more
            .then(|| page.last().map(|c| c.agent_id.to_string()))
            .flatten();
        (page, next)
    }

    /// Every connection, for drain.
    pub fn snapshot(&self) -> Vec<Arc<Connection>> {
        self.index
            .read()
            .agents
            .iter()
            .map(|c| c.0.clone())
            .collect()
    }
}

/// A request or acked push waiting for the agent's answer. Dropping it (timeout, caller
/// gone) removes the pending entry so a late answer is ignored.
#[derive(Debug)]
pub struct PendingReply<'a> {
    hub: &'a Hub,
    conn: Arc<Connection>,
    key: PendingKey,
    token: u64,
    rx: oneshot::Receiver<AgentReply>,
}

impl PendingReply<'_> {
    /// Waits for the answer; `None` when the agent disconnected before answering.
    pub async fn wait(&mut self) -> Option<AgentReply> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for PendingReply<'_> {
    fn drop(&mut self) {
        // Only its own entry: once this one was answered or failed, the id may wait
        // again for a newer call.
        let mut pending = self.hub.pending.lock();
        if pending
            .get(&self.key)
            .is_some_and(|p| p.token == self.token)
        {
            pending.remove(&self.key);
        }
        drop(pending);
        self.conn.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Outbound {
        Outbound::Text(s.into())
    }

    fn queued(conn: &Connection) -> Vec<Outbound> {
        let mut out = Vec::new();
        conn.take_queued(&mut out);
        out
    }

    /// Every connection is one `Arc<Connection>`: 16 bytes of counts plus this struct,
    /// allocated from the 128-byte size class (jemalloc and mimalloc both have one; the
    /// next is 160). The agent map's slot is one pointer.
    #[test]
    fn a_connection_fits_a_128_byte_allocation() {
        let size = std::mem::size_of::<Connection>();
        eprintln!("size_of::<Connection>() = {size}");
        assert!(size + 16 <= 128, "Connection is {size} bytes");
        assert_eq!(std::mem::size_of::<ByAgent>(), 8);
    }

    #[tokio::test]
    async fn newest_connection_wins_and_old_one_is_closed() {
        let hub = Hub::new(8, 8);
        let old = Connection::new(hub.next_connection_id(), "a", vec!["g".into()], u64::MAX);
        let new = Connection::new(hub.next_connection_id(), "a", vec!["g".into()], u64::MAX);
        assert!(hub.register(&old).replaced.is_none());
        let replaced = hub.register(&new).replaced.unwrap();
        assert_eq!(replaced.id, old.id);
        assert!(matches!(
            queued(&old).as_slice(),
            [Outbound::Close(CloseCode::Replaced)]
        ));
        // The replaced connection's own unregister must not remove its successor.
        assert!(!hub.unregister(&old));
        assert_eq!(hub.get("a").unwrap().id, new.id);
        assert_eq!(hub.deliver_to_group("g", &text("x")).await, 1);
        assert!(hub.unregister(&new));
        assert!(hub.is_empty());
        assert_eq!(hub.deliver_to_group("g", &text("x")).await, 0);
    }

    /// A lent socket takes whole frames straight away; once the kernel's buffer is
    /// full a frame is written in part, its rest queued first and the socket taken
    /// back, so every later frame queues behind it: the bytes on the wire stay whole
    /// frames, in delivery order.
    #[test]
    fn deliveries_write_to_a_lent_socket_and_queue_the_rest_in_order() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server_side = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut agent, _) = listener.accept().unwrap();
        let conn = Connection::new(1, "a", vec![], u64::MAX);
        assert!(conn.lend_socket(server_side.as_raw_fd()));
        conn.enqueue(text("hi"), 8).unwrap();
        conn.enqueue(Outbound::Ping, 8).unwrap();
        assert_eq!(conn.queue_len(), 0, "written, not queued");
        let mut got = [0u8; 6];
        agent.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x02hi\x89\x00");

        // Nobody reads: frames of 60 KiB until one does not fit whole.
        let big = Outbound::Binary(Bytes::from(vec![7u8; 60 * 1024]));
        let mut written = 0;
        while conn.queue_len() == 0 {
            conn.enqueue(big.clone(), 1_000).unwrap();
            written += 1;
            assert!(written < 10_000, "the socket never filled");
        }
        conn.enqueue(text("after"), 1_000).unwrap();
        let queued = queued(&conn);
        assert!(
            matches!(queued.as_slice(), [Outbound::Raw(_), Outbound::Text(t)] if t.as_str() == "after"),
            "{queued:?}"
        );
        // Taken back: from now on everything queues, even with room in the kernel.
        conn.enqueue(text("later"), 1_000).unwrap();
        assert_eq!(conn.queue_len(), 1);
    }

    /// A closing connection refuses deliveries even with its socket lent, and a
    /// reclaimed socket is never written by a delivery.
    #[test]
    fn closing_and_reclaiming_stop_direct_writes() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server_side = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut agent, _) = listener.accept().unwrap();
        agent.set_nonblocking(true).unwrap();
        let conn = Connection::new(1, "a", vec![], u64::MAX);
        assert!(conn.lend_socket(server_side.as_raw_fd()));
        conn.reclaim_socket();
        conn.enqueue(text("queued"), 8).unwrap();
        assert_eq!(conn.queue_len(), 1);
        // Something is queued: the socket is not lent until the driver took it.
        assert!(!conn.lend_socket(server_side.as_raw_fd()));
        assert_eq!(queued(&conn).len(), 1);
        assert!(conn.lend_socket(server_side.as_raw_fd()));
        conn.close(CloseCode::Disconnected);
        assert_eq!(
            conn.enqueue(text("late"), 8),
            Err(DeliveryError::NotConnected)
        );
        assert!(!conn.lend_socket(server_side.as_raw_fd()));
        let mut buf = [0u8; 16];
        assert_eq!(
            agent.read(&mut buf).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock),
            "nothing was written to the socket"
        );
    }

    #[test]
    fn queue_is_bounded_and_close_stops_accepting() {
        let hub = Hub::new(2, 8);
        let conn = Connection::new(1, "a", vec![], u64::MAX);
        hub.register(&conn);
        hub.deliver("a", text("1")).unwrap();
        hub.deliver("a", text("2")).unwrap();
        assert_eq!(hub.deliver("a", text("3")), Err(DeliveryError::QueueFull));
        assert_eq!(
            hub.deliver("b", text("1")),
            Err(DeliveryError::NotConnected)
        );
        assert_eq!(queued(&conn).len(), 2);
        conn.close(CloseCode::Disconnected);
        conn.close(CloseCode::Normal);
        assert_eq!(
            hub.deliver("a", text("4")),
            Err(DeliveryError::NotConnected)
        );
        assert!(matches!(
            queued(&conn).as_slice(),
            [Outbound::Close(CloseCode::Disconnected)]
        ));
    }

    #[tokio::test]
    async fn broadcast_closes_slow_consumers_instead_of_skipping_them() {
        let hub = Hub::new(1, 8);
        let slow = Connection::new(1, "slow", vec![], u64::MAX);
        let fast = Connection::new(2, "fast", vec![], u64::MAX);
        hub.register(&slow);
        hub.register(&fast);
        hub.deliver("slow", text("backlog")).unwrap();
        assert_eq!(hub.broadcast(&text("all")).await, 1);
        assert!(slow.is_closing());
        assert!(!fast.is_closing());
    }

    #[tokio::test]
    async fn replies_reach_their_waiter_and_late_replies_are_ignored() {
        let hub = Hub::new(8, 1);
        let conn = Connection::new(7, "a", vec![], u64::MAX);
        hub.register(&conn);
        let ok = RawValue::from_string("1".into()).unwrap();
        {
            let mut pending = hub
                .deliver_expecting_reply("a", "r1", Expect::Response, text("req"))
                .unwrap();
            assert_eq!(
                hub.deliver_expecting_reply("a", "r2", Expect::Response, text("req"))
                    .unwrap_err(),
                DeliveryError::TooManyPending
            );
            assert!(
                !hub.complete(7, "r1", Expect::Ack, Ok(ok.clone())),
                "an ack does not complete a request"
            );
            assert!(hub.complete(7, "r1", Expect::Response, Ok(ok.clone())));
            assert_eq!(pending.wait().await.unwrap().unwrap().get(), "1");
        }
        // The waiter is gone: a second answer finds nobody.
        assert!(!hub.complete(7, "r1", Expect::Response, Ok(ok)));
        // Disconnect fails whoever still waits.
        let mut pending = hub
            .deliver_expecting_reply("a", "r3", Expect::Response, text("req"))
            .unwrap();
        hub.unregister(&conn);
        assert!(pending.wait().await.is_none());
    }

    #[tokio::test]
    async fn an_id_in_flight_is_refused_and_waiters_remove_only_their_own_entry() {
        let hub = Hub::new(8, 8);
        let conn = Connection::new(3, "a", vec![], u64::MAX);
        hub.register(&conn);
        let first = hub
            .deliver_expecting_reply("a", "k", Expect::Ack, text("push"))
            .unwrap();
        assert_eq!(
            hub.deliver_expecting_reply("a", "k", Expect::Response, text("req"))
                .unwrap_err(),
            DeliveryError::Duplicate
        );
        let ok = RawValue::from_string("null".into()).unwrap();
        assert!(hub.complete(3, "k", Expect::Ack, Ok(ok.clone())));
        // The id is free again; the first waiter's late drop must not remove the
        // second waiter's entry.
        let mut second = hub
            .deliver_expecting_reply("a", "k", Expect::Response, text("req"))
            .unwrap();
        drop(first);
        assert!(hub.complete(3, "k", Expect::Response, Ok(ok)));
        assert!(second.wait().await.is_some());
    }

    #[test]
    fn group_membership_follows_replacement_and_refresh() {
        let hub = Hub::new(8, 8);
        let old = Connection::new(1, "a", vec!["g1".into(), "g2".into()], u64::MAX);
        let new = Connection::new(2, "a", vec!["g2".into(), "g3".into()], u64::MAX);
        hub.register(&old);
        hub.register(&new);
        // The replaced connection unregisters after its successor registered.
        assert!(!hub.unregister(&old));
        assert!(hub.group_members("g1").is_empty());
        assert_eq!(hub.group_members("g2"), ["a"]);
        assert_eq!(hub.group_members("g3"), ["a"]);
        hub.set_groups(&new, vec!["g4".into()]);
        assert!(hub.group_members("g2").is_empty() && hub.group_members("g3").is_empty());
        assert_eq!(hub.group_members("g4"), ["a"]);
        // A stale connection's refresh changes nothing in the index.
        hub.set_groups(&old, vec!["g9".into()]);
        assert!(hub.group_members("g9").is_empty());
        assert!(hub.unregister(&new));
        assert!(hub.group_members("g4").is_empty());
    }

    #[test]
    fn racing_reconnects_never_leak_group_members() {
        let hub = Arc::new(Hub::new(8, 8));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let conn = Connection::new(
                            t * 1_000_000 + i,
                            "racer",
                            vec![format!("g{}", i % 3)],
                            u64::MAX,
                        );
                        hub.register(&conn);
                        hub.unregister(&conn);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Whatever interleaving happened, groups name only the current connection.
        let current = hub.get("racer");
        for g in ["g0", "g1", "g2"] {
            let expected: Vec<String> = match &current {
                Some(c) if c.groups().iter().any(|x| x == g) => vec!["racer".into()],
                _ => vec![],
            };
            assert_eq!(hub.group_members(g), expected, "{g}");
        }
    }

    #[test]
    fn a_push_racing_a_close_is_queued_before_it_or_refused() {
        for round in 0..200 {
            let conn = Connection::new(round, "a", vec![], u64::MAX);
            let pusher = {
                let conn = conn.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|i| conn.enqueue(text(&i.to_string()), 1_000).is_ok())
                        .count()
                })
            };
            conn.close(CloseCode::Disconnected);
            let accepted = pusher.join().unwrap();
            let frames = queued(&conn);
            // Everything accepted sits before the close; nothing after it.
            assert!(matches!(frames.last(), Some(Outbound::Close(_))));
            assert_eq!(frames.len(), accepted + 1, "round {round}");
        }
    }

    #[test]
    fn listing_pages_in_id_order() {
        let hub = Hub::new(8, 8);
        for (i, name) in ["c", "a", "b", "d"].iter().enumerate() {
            hub.register(&Connection::new(i as u64, name, vec![], u64::MAX));
        }
        let (page, next) = hub.list(None, 3);
        let ids: Vec<&str> = page.iter().map(|c| &*c.agent_id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(next.as_deref(), Some("c"));
        let (page, next) = hub.list(next.as_deref(), 3);
        assert_eq!(page.len(), 1);
        assert_eq!(next, None);
    }

    #[test]
    fn listing_pages_through_many_agents_in_order_without_gaps() {
        let hub = Hub::new(8, 8);
        let mut names: Vec<String> = (0..257)
            .map(|i| format!("agent-{:05}", (i * 7919) % 1000))
            .collect();
        for (i, name) in names.iter().enumerate() {
            hub.register(&Connection::new(i as u64, name, vec![], u64::MAX));
        }
        names.sort();
        names.dedup();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = hub.list(cursor.as_deref(), 10);
            assert!(page.len() <= 10);
            seen.extend(page.iter().map(|c| c.agent_id.to_string()));
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, names);
        assert_eq!(hub.list(None, 1000).0.len(), names.len());
        assert!(hub.list(None, 0).0.is_empty());
    }
}

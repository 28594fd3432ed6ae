//! The lean agent client of `tether-bench million`: one thread, one `mio` loop, a few
//! dozen bytes per connection, so that one small machine holds a million agents *and*
//! the gateways they talk to.
//!
//! A tungstenite client costs ~8 KB per connection (buffers, a task, a waker); this one
//! keeps a slot per connection — the socket, its agent number, its phase, and two
//! `Vec`s that own bytes only while a frame or a write is unfinished — and reads every
//! socket into one shared scratch buffer:
//!
//! ```text
//!   opener (paced, ≤ concurrency handshakes in flight)
//!     └─ socket: bind 127.<10+w>.a.b with IP_BIND_ADDRESS_NO_PORT, connect (non-blocking)
//!   writable ──► GET /v1/connect (Bearer <token minted for agent-n>, tether.v1)
//!   readable ──► scratch ──► 101 + Sec-WebSocket-Accept checked ──► `welcome` ──► open
//!                        └─► frames: ping → masked pong; push → count + latency;
//!                                    close → answered, counted as a drop
//!   stdin thread ──► Cmd (report / churn / stop) ──► Waker ──► the loop
//! ```
//!
//! It speaks the same [`Job`] / [`Cmd`] / [`Event`] lines as the tungstenite
//! [`worker`](crate::worker), so the coordinator drives either. The bind option matters:
//! without `IP_BIND_ADDRESS_NO_PORT` the kernel picks the port at `bind` and searches
//! every port in use on that address, which grows with every socket (measured: 300k
//! connections took 188 s and dropped 14 % without it, 31 s and none with it).

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    io::{self, BufRead, Read, Write},
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::Context;
use base64::Engine;
use mio::{Events, Interest, Poll, Token, Waker, net::TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::{
    stats::{Hist, unix_nanos},
    worker::{Cmd, Event, Job, churned},
};

const WAKER: Token = Token(usize::MAX);
/// The one read buffer of the process.
const SCRATCH: usize = 64 * 1024;
/// Largest response head to an upgrade.
const MAX_HEAD: usize = 8 * 1024;
/// Largest frame accepted from the server.
const MAX_FRAME: usize = 1 << 20;
/// How long a handshake (TCP, upgrade, welcome) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a churned agent keeps retrying before it counts as lost.
const CHURN_GIVE_UP: Duration = Duration::from_secs(90);
/// How long the coordinator waits for a churn to finish.
const CHURN_DEADLINE: Duration = Duration::from_secs(120);

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for the 101.
    Upgrading,
    /// Upgraded, waiting for the `welcome` message.
    Welcoming,
    /// A session: answering pings, counting pushes.
    Open,
}

/// Why an attempt was made, which decides what its outcome reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// The initial connect phase: a failure is final and counted by cause.
    First,
    /// A churned agent coming back: failures are retried until [`CHURN_GIVE_UP`].
    Churn,
}

/// One connection's slot: ~64 bytes while idle.
struct Conn {
    sock: TcpStream,
    /// Global agent number.
    n: u32,
    /// Milliseconds since the client started, when this attempt began.
    since_ms: u32,
    phase: Phase,
    attempt: Attempt,
    /// Bytes of an unfinished response head or frame (empty, no allocation, when idle).
    inbound: Vec<u8>,
    /// Bytes the kernel has not taken yet.
    out: Vec<u8>,
}

/// How a connection's turn ended.
enum Outcome {
    /// Still open (or still opening).
    Alive,
    /// It failed or was closed; the cause.
    Gone(String),
}

/// A connection's frame, as the client sees it (server frames are unmasked).
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// Whether this is the message's last frame.
    pub fin: bool,
    /// RFC 6455 opcode.
    pub opcode: u8,
    /// Where the payload starts in the buffer.
    pub start: usize,
    /// Payload length.
    pub len: usize,
}

/// Reads one server frame's header from `buf`: `Ok(None)` while incomplete, `Err` on
/// a frame a server must not send (masked, reserved bits, oversized).
pub fn parse_frame(buf: &[u8]) -> Result<Option<Frame>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err("reserved bits set");
    }
    if b1 & 0x80 != 0 {
        return Err("masked server frame");
    }
    let (len, start) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
            10,
        ),
        126 | 127 => return Ok(None),
        short => (u64::from(short), 2),
    };
    if len > MAX_FRAME as u64 {
        return Err("frame too large");
    }
    let len = len as usize;
    if buf.len() < start + len {
        return Ok(None);
    }
    Ok(Some(Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        start,
        len,
    }))
}

/// Appends a masked client frame (FIN set) to `out`.
pub fn put_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// The upgrade request of agent `agent` (`token`: a Tether bearer token; without one,
/// the peers' `/ws?id=` form).
pub fn upgrade_request(
    host: SocketAddr,
    path: &str,
    agent: &str,
    key: &str,
    token: Option<&str>,
) -> Vec<u8> {
    let mut req = match token {
        Some(token) => format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Sec-WebSocket-Protocol: {}\r\n",
            tether_protocol::SUBPROTOCOL
        ),
        None => format!("GET /ws?id={agent} HTTP/1.1\r\nHost: {host}\r\n"),
    };
    req.push_str(&format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    ));
    req.into_bytes()
}

/// Parses an HTTP response head at the start of `buf` into `response`: `Ok(Some(head
/// length))` when complete, `Ok(None)` while incomplete and within `max_head` bytes.
pub fn parse_head<'b>(
    response: &mut httparse::Response<'_, 'b>,
    buf: &'b [u8],
    max_head: usize,
) -> Result<Option<usize>, String> {
    match response.parse(buf) {
        Ok(httparse::Status::Complete(head)) => Ok(Some(head)),
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            Err("response head too large".into())
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(err) => Err(format!("bad response: {err}")),
    }
}

/// Reads the answer to an upgrade: `Ok(None)` while the head is incomplete,
/// `Ok(Some(head length))` for a 101 with the accept key of `key`, `Err(cause)` else.
pub fn parse_upgrade_response(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let Some(head) = parse_head(&mut response, buf, MAX_HEAD)? else {
        return Ok(None);
    };
    match response.code {
        Some(101) => {}
        Some(code) => return Err(format!("http {code}")),
        None => return Err("bad response: no status".into()),
    }
    let accept = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return Err("handshake: wrong Sec-WebSocket-Accept".into());
    }
    Ok(Some(head))
}

/// The bench's send time (Unix ns) in a push envelope whose data is `{"t":…}`,
/// read without parsing the JSON (the client shares two cores with the gateways).
pub fn push_probe(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#"{"t":"#;
    let at = text.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

/// Whether a text frame is a `push` envelope.
fn is_push(text: &[u8]) -> bool {
    text.starts_with(br#"{"type":"push""#)
}

/// The `Sec-WebSocket-Key` of agent `n`: 16 bytes derived from the process seed, so
/// no connection stores its key while it waits for the 101.
fn key_for(seed: u64, n: u32) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(seed ^ u64::from(n)).to_le_bytes());
    bytes[8..]
        .copy_from_slice(&(seed.rotate_left(17).wrapping_mul(u64::from(n) | 1)).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Opens a non-blocking socket from `src` (any port) to `dst`.
fn open_socket(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    bind_address_no_port(&socket)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&SocketAddr::new(src.into(), 0).into())?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(err) => return Err(err),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: `bind` then fixes only the address and the port is
/// chosen at `connect`, per destination, instead of by a search over every port in use
/// on the address (which grows with every socket and starved the client). Neither
/// socket2 nor rustix wraps this option.
#[allow(unsafe_code)]
fn bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid, open descriptor; the option value is a live c_int and its size
    // is passed with it, as setsockopt(2) requires.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Counters reported to the coordinator (reset by each report).
#[derive(Default)]
struct Counters {
    pushes: u64,
    pings: u64,
    latency: Hist,
    last_ns: u64,
    open: u64,
    dropped: u64,
}

/// A churn in progress.
struct Churn {
    started: Instant,
    closed: u64,
    back: u64,
    done: u64,
    reconnect: Hist,
}

/// The client: every connection of one worker process, and its loop.
pub struct Client {
    job: Job,
    poll: Poll,
    /// Slot `i` holds agent `job.first + i`.
    conns: Vec<Option<Conn>>,
    minter: Option<tether_agent::Hs256Minter>,
    path: String,
    seed: u64,
    epoch: Instant,
    counters: Counters,
    /// Initial attempts finished (opened or failed).
    finished: u64,
    ok: u64,
    failed: BTreeMap<String, u64>,
    handshake: Hist,
    in_flight: usize,
    churn: Option<Churn>,
    /// Churned agents waiting to retry: (when, slot), earliest first.
    retries: BinaryHeap<Reverse<(Instant, usize)>>,
    mask: u32,
}

impl Client {
    /// A client for `job`, and the waker that interrupts its loop for a command.
    pub fn new(job: Job) -> anyhow::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let minter = job.secret.as_ref().map(|s| {
            let mut minter = tether_agent::Hs256Minter::new(s.as_bytes(), "bench");
            minter.tenant = job.tenant.clone();
            // Tokens outlive the run: the hold, the phases and the storm.
            minter.ttl = Duration::from_secs(24 * 3600);
            minter
        });
        let count = usize::try_from(job.count)?;
        if job.first + job.count > u64::from(u32::MAX) {
            anyhow::bail!("agent numbers must fit in 32 bits");
        }
        let client = Self {
            path: job.path.clone().unwrap_or_else(|| "/v1/connect".into()),
            conns: (0..count).map(|_| None).collect(),
            job,
            poll,
            minter,
            seed: rand::random(),
            epoch: Instant::now(),
            counters: Counters::default(),
            finished: 0,
            ok: 0,
            failed: BTreeMap::new(),
            handshake: Hist::default(),
            in_flight: 0,
            churn: None,
            retries: BinaryHeap::new(),
            mask: rand::random::<u32>() | 1,
        };
        Ok((client, waker))
    }

    fn source(&self, n: u64) -> Ipv4Addr {
        // 127.<10+worker>.<a>.<b>: with IP_BIND_ADDRESS_NO_PORT one address could serve
        // all; spreading still keeps each (source, destination) pair's ports few.
        let a = ((n / 250) % 250) as u8;
        let b = (n % 250) as u8 + 1;
        Ipv4Addr::new(127, 10 + (self.job.index % 200) as u8, a, b)
    }

    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: masks only need to vary, not to be secret, against a local server.
        let mut x = self.mask;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask = x;
        x.to_le_bytes()
    }

    /// Starts attempt `attempt` for slot `slot`.
    fn start(&mut self, slot: usize, attempt: Attempt) {
        let n = self.job.first + slot as u64;
        let dst = self.job.shards[(n % self.job.shards.len() as u64) as usize];
        let opened = open_socket(self.source(n), dst).and_then(|mut sock| {
            self.poll.registry().register(
                &mut sock,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(sock)
        });
        match opened {
            Ok(sock) => {
                self.in_flight += 1;
                self.conns[slot] = Some(Conn {
                    sock,
                    n: n as u32,
                    since_ms: self.now_ms(),
                    phase: Phase::Connecting,
                    attempt,
                    inbound: Vec::new(),
                    out: Vec::new(),
                });
            }
            Err(err) => self.attempt_failed(slot, attempt, format!("socket: {}", err.kind())),
        }
    }

    fn attempt_failed(&mut self, slot: usize, attempt: Attempt, cause: String) {
        match attempt {
            Attempt::First => {
                self.finished += 1;
                *self.failed.entry(cause).or_insert(0) += 1;
            }
            Attempt::Churn => {
                let Some(churn) = &mut self.churn else { return };
                if churn.started.elapsed() > CHURN_GIVE_UP {
                    churn.done += 1;
                } else {
                    let pause = Duration::from_millis(50 + rand::random_range(0..1000));
                    self.retries.push(Reverse((Instant::now() + pause, slot)));
                }
            }
        }
    }

    fn opened(&mut self, attempt: Attempt, since_ms: u32) {
        self.in_flight -= 1;
        self.counters.open += 1;
        let us = u64::from(self.now_ms().saturating_sub(since_ms)) * 1000;
        match attempt {
            Attempt::First => {
                self.finished += 1;
                self.ok += 1;
                self.handshake.record_us(us);
            }
            Attempt::Churn => {
                if let Some(churn) = &mut self.churn {
                    churn.back += 1;
                    churn.done += 1;
                    churn
                        .reconnect
                        .record_us(churn.started.elapsed().as_micros() as u64);
                }
            }
        }
    }

    /// Drops slot `slot`'s connection after `cause`.
    fn drop_conn(&mut self, slot: usize, cause: String) {
        let Some(mut conn) = self.conns[slot].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        if conn.phase == Phase::Open {
            self.counters.open -= 1;
            self.counters.dropped += 1;
        } else {
            self.in_flight -= 1;
            self.attempt_failed(slot, conn.attempt, cause);
        }
    }

    /// Handles readiness of slot `slot`.
    fn ready(&mut self, slot: usize, scratch: &mut [u8]) {
        let outcome = self.serve(slot, scratch);
        if let Outcome::Gone(cause) = outcome {
            self.drop_conn(slot, cause);
        }
    }

    fn serve(&mut self, slot: usize, scratch: &mut [u8]) -> Outcome {
        let mask = self.next_mask();
        let seed = self.seed;
        let Self {
            conns,
            minter,
            job,
            path,
            ..
        } = self;
        let Some(conn) = conns[slot].as_mut() else {
            return Outcome::Alive;
        };
        if conn.phase == Phase::Connecting {
            match conn.sock.take_error() {
                Ok(Some(err)) | Err(err) => {
                    return Outcome::Gone(format!("connect: {}", err.kind()));
                }
                Ok(None) => {}
            }
            match conn.sock.peer_addr() {
                Ok(host) => {
                    let agent = format!("{}{}", job.prefix, conn.n);
                    let token = match minter.as_ref().map(|m| m.mint_for(&agent)) {
                        Some(Ok(token)) => Some(token),
                        Some(Err(err)) => return Outcome::Gone(format!("token: {err}")),
                        None => None,
                    };
                    let key = key_for(seed, conn.n);
                    conn.out = upgrade_request(host, path, &agent, &key, token.as_deref());
                    conn.phase = Phase::Upgrading;
                }
                // Readiness before the connect finished: wait for the next event.
                Err(err) if err.kind() == io::ErrorKind::NotConnected => return Outcome::Alive,
                Err(err) => return Outcome::Gone(format!("connect: {}", err.kind())),
            }
        }
        let mut happened = Happened::default();
        let outcome = read_all(conn, scratch, seed, mask, &mut happened);
        let (attempt, since_ms) = (conn.attempt, conn.since_ms);
        let outcome = match (outcome, flush(conn)) {
            (Outcome::Alive, Err(err)) => Outcome::Gone(format!("write: {}", err.kind())),
            (outcome, _) => outcome,
        };
        self.counters.pings += happened.pings;
        self.counters.pushes += happened.pushes;
        if happened.pushes > 0 {
            let now = unix_nanos();
            self.counters.last_ns = self.counters.last_ns.max(now);
            for sent in &happened.probes[..happened.probed] {
                self.counters
                    .latency
                    .record_us(now.saturating_sub(*sent) / 1000);
            }
        }
        if happened.welcomed {
            self.opened(attempt, since_ms);
        }
        outcome
    }

    /// Closes slot `slot` from this side (a churn) and starts its reconnect.
    fn churn_one(&mut self, slot: usize) {
        let mask = self.next_mask();
        let Some(mut conn) = self.conns[slot].take() else {
            return;
        };
        // Best effort: a close frame (1000), then the socket goes.
        let mut frame = Vec::with_capacity(8);
        put_masked(&mut frame, 0x8, &1000u16.to_be_bytes(), mask);
        let _ = conn.sock.write(&frame);
        let _ = self.poll.registry().deregister(&mut conn.sock);
        drop(conn);
        self.counters.open -= 1;
        self.start(slot, Attempt::Churn);
    }

    fn report(&mut self) -> Event {
        let counters = std::mem::take(&mut self.counters);
        self.counters.open = counters.open;
        self.counters.dropped = counters.dropped;
        Event::Report {
            pushes: counters.pushes,
            requests: 0,
            latency: counters.latency.encode(),
            last_ns: counters.last_ns,
            open: counters.open,
            dropped: counters.dropped,
            pings: counters.pings,
        }
    }

    /// Runs the client: opens the job's connections, then serves commands from `cmds`
    /// (woken by the waker of [`Client::new`]) until `stop` or the sender is gone,
    /// giving events to `emit`.
    pub fn run(
        mut self,
        cmds: mpsc::Receiver<Cmd>,
        mut emit: impl FnMut(Event),
    ) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; SCRATCH];
        let period = Duration::from_secs_f64(1.0 / self.job.rate.max(0.001));
        let started = Instant::now();
        let mut next_open = started;
        let mut next_slot = 0usize;
        let mut connected_sent = false;
        let mut last_sweep = Instant::now();
        loop {
            let now = Instant::now();
            while next_slot < self.conns.len()
                && self.in_flight < self.job.concurrency.max(1)
                && next_open <= now
            {
                self.start(next_slot, Attempt::First);
                next_slot += 1;
                next_open += period;
            }
            while self
                .retries
                .peek()
                .is_some_and(|Reverse((at, _))| *at <= now)
            {
                let Reverse((_, slot)) = self.retries.pop().expect("peeked");
                self.start(slot, Attempt::Churn);
            }
            if now.duration_since(last_sweep) >= Duration::from_secs(1) {
                last_sweep = now;
                self.time_out_handshakes();
            }
            if !connected_sent && self.finished == self.job.count {
                connected_sent = true;
                emit(Event::Connected {
                    ok: self.ok,
                    failed: std::mem::take(&mut self.failed),
                    elapsed_s: started.elapsed().as_secs_f64(),
                    handshake: self.handshake.encode(),
                });
            }
            if let Some(churn) = &self.churn
                && (churn.done >= churn.closed || churn.started.elapsed() > CHURN_DEADLINE)
            {
                let churn = self.churn.take().expect("churn exists");
                self.retries.clear();
                emit(Event::Churned {
                    closed: churn.closed,
                    back: churn.back,
                    elapsed_s: churn.started.elapsed().as_secs_f64(),
                    reconnect: churn.reconnect.encode(),
                });
            }
            // Wake for the next opening (unless the handshakes in flight are at the cap:
            // their events wake the loop), the next retry, or a second's checks.
            let mut wake = now + Duration::from_millis(200);
            if next_slot < self.conns.len() && self.in_flight < self.job.concurrency.max(1) {
                wake = wake.min(next_open);
            }
            if let Some(Reverse((at, _))) = self.retries.peek() {
                wake = wake.min(*at);
            }
            let timeout = wake.saturating_duration_since(now);
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("poll"),
            }
            for event in events.iter() {
                match event.token() {
                    // Commands are read every turn; the waker only cuts the wait short.
                    WAKER => {}
                    Token(slot) => self.ready(slot, &mut scratch),
                }
            }
            loop {
                match cmds.try_recv() {
                    Ok(Cmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                    Ok(Cmd::Report) => emit(self.report()),
                    Ok(Cmd::Churn { fraction }) => self.start_churn(fraction),
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
        }
    }

    fn start_churn(&mut self, fraction: f64) {
        self.churn = Some(Churn {
            started: Instant::now(),
            closed: 0,
            back: 0,
            done: 0,
            reconnect: Hist::default(),
        });
        let mut closed = 0;
        for slot in 0..self.conns.len() {
            let picked = self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.phase == Phase::Open && churned(u64::from(c.n), fraction));
            if picked {
                closed += 1;
                self.churn_one(slot);
            }
        }
        if let Some(churn) = &mut self.churn {
            churn.closed = closed;
        }
    }

    fn time_out_handshakes(&mut self) {
        let now = self.now_ms();
        let limit = HANDSHAKE_TIMEOUT.as_millis() as u32;
        for slot in 0..self.conns.len() {
            let late = self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.phase != Phase::Open && now.saturating_sub(c.since_ms) > limit);
            if late {
                self.drop_conn(slot, "timeout".into());
            }
        }
    }
}

/// What one batch of bytes did, applied to the counters after the connection's borrow.
#[derive(Default)]
struct Happened {
    pings: u64,
    pushes: u64,
    /// Probe times of the first pushes (a read rarely carries more than a few).
    probes: [u64; 8],
    probed: usize,
    welcomed: bool,
    closed: Option<String>,
}

/// Consumes complete response heads and frames from `bytes`; returns how many bytes
/// it used (the rest is an unfinished head or frame).
fn take_bytes(
    conn: &mut Conn,
    bytes: &[u8],
    seed: u64,
    mask: [u8; 4],
    happened: &mut Happened,
) -> Result<usize, String> {
    let mut at = 0;
    if conn.phase == Phase::Upgrading {
        match parse_upgrade_response(bytes, &key_for(seed, conn.n))? {
            None => return Ok(0),
            Some(head) => {
                at = head;
                conn.phase = Phase::Welcoming;
            }
        }
    }
    while at < bytes.len() {
        let Some(frame) = parse_frame(&bytes[at..])? else {
            break;
        };
        let payload = &bytes[at + frame.start..at + frame.start + frame.len];
        at += frame.start + frame.len;
        match frame.opcode {
            0x1 if conn.phase == Phase::Welcoming => {
                if !payload.starts_with(br#"{"type":"welcome""#) {
                    return Err("no welcome".into());
                }
                conn.phase = Phase::Open;
                happened.welcomed = true;
            }
            0x1 if is_push(payload) => {
                happened.pushes += 1;
                if happened.probed < happened.probes.len()
                    && let Some(sent) = push_probe(payload)
                {
                    happened.probes[happened.probed] = sent;
                    happened.probed += 1;
                }
            }
            0x9 => {
                put_masked(&mut conn.out, 0xA, payload, mask);
                happened.pings += 1;
            }
            0x8 => {
                // Answer with the server's code, as RFC 6455 asks; the socket then goes.
                let code = payload.get(..2).unwrap_or(&[]);
                put_masked(&mut conn.out, 0x8, code, mask);
                let _ = flush(conn);
                let code = payload
                    .get(..2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .unwrap_or(1005);
                happened.closed = Some(format!("closed {code}"));
                return Ok(bytes.len());
            }
            _ => {}
        }
    }
    Ok(at)
}

/// Reads until the socket would block (readiness is edge-triggered), handling every
/// complete head and frame; an unfinished one is kept in `conn.inbound`.
fn read_all(
    conn: &mut Conn,
    scratch: &mut [u8],
    seed: u64,
    mask: [u8; 4],
    happened: &mut Happened,
) -> Outcome {
    loop {
        let read = match conn.sock.read(scratch) {
            Ok(0) => return Outcome::Gone("closed".into()),
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Outcome::Alive,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Outcome::Gone(format!("read: {}", err.kind())),
        };
        let mut pending = std::mem::take(&mut conn.inbound);
        let taken = if pending.is_empty() {
            take_bytes(conn, &scratch[..read], seed, mask, happened)
                .map(|used| conn.inbound = scratch[used..read].to_vec())
        } else {
            pending.extend_from_slice(&scratch[..read]);
            take_bytes(conn, &pending, seed, mask, happened).map(|used| {
                if used < pending.len() {
                    pending.drain(..used);
                    conn.inbound = pending;
                }
            })
        };
        if let Err(cause) = taken {
            return Outcome::Gone(cause);
        }
        if let Some(cause) = happened.closed.take() {
            return Outcome::Gone(cause);
        }
        // Answers (pongs) go out as they come, not after the whole backlog is read.
        if !conn.out.is_empty()
            && let Err(err) = flush(conn)
        {
            return Outcome::Gone(format!("write: {}", err.kind()));
        }
    }
}

/// Writes what `conn` has queued; keeps what the kernel does not take.
fn flush(conn: &mut Conn) -> io::Result<()> {
    let mut written = 0;
    while written < conn.out.len() {
        match conn.sock.write(&conn.out[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    if written == conn.out.len() {
        // Release the allocation: an idle connection owns no bytes.
        conn.out = Vec::new();
    } else {
        conn.out.drain(..written);
    }
    Ok(())
}

/// Runs a lean worker process (`tether-bench lean-worker`): the [`Job`] line, then
/// [`Cmd`] lines on stdin; [`Event`] lines on stdout.
pub fn run_process() -> anyhow::Result<()> {
    // stdin's buffer is process-wide: the thread below reads on where this line ended.
    let mut first = String::new();
    io::stdin().read_line(&mut first)?;
    let job: Job = serde_json::from_str(&first).context("no job on stdin")?;
    let (client, waker) = Client::new(job)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Cmd>(&line) {
                Ok(cmd) => {
                    if tx.send(cmd).is_err() {
                        break;
                    }
                    let _ = waker.wake();
                }
                Err(err) => eprintln!("lean worker: bad command {line:?}: {err}"),
            }
        }
        // stdin closed: the coordinator is gone; dropping `tx` stops the loop.
        drop(tx);
        let _ = waker.wake();
    });
    let stdout = io::stdout();
    client.run(rx, |event| {
        let mut out = stdout.lock();
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(&event).expect("events serialize")
        );
        let _ = out.flush();
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..=125 => out.push(len as u8),
            len @ 126..=0xffff => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn server_frames_parse_whole_or_wait_for_more() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'x'; len];
            let frame = server_frame(0x1, &payload);
            let parsed = parse_frame(&frame).unwrap().unwrap();
            assert_eq!((parsed.opcode, parsed.len), (0x1, len));
            assert_eq!(
                &frame[parsed.start..parsed.start + parsed.len],
                &payload[..]
            );
            for cut in [1, frame.len() / 2, frame.len() - 1] {
                if cut > 0 && cut < frame.len() {
                    assert_eq!(parse_frame(&frame[..cut]), Ok(None), "len {len} cut {cut}");
                }
            }
        }
        let mut masked = server_frame(0x1, b"hi");
        masked[1] |= 0x80;
        assert!(parse_frame(&masked).is_err());
        let mut reserved = server_frame(0x1, b"hi");
        reserved[0] |= 0x40;
        assert!(parse_frame(&reserved).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        for len in [0usize, 2, 125, 126, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            put_masked(&mut out, 0xA, &payload, [9, 8, 7, 6]);
            assert_eq!(out[0], 0x8A);
            assert_ne!(out[1] & 0x80, 0, "mask bit");
            let (len_field, at) = match out[1] & 0x7f {
                126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                short => (short as usize, 2),
            };
            assert_eq!(len_field, len);
            let mask = &out[at..at + 4];
            let unmasked: Vec<u8> = out[at + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn the_upgrade_needs_a_101_with_the_right_accept_key() {
        let key = key_for(42, 7);
        let accept = derive_accept_key(key.as_bytes());
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let ok = [head.as_bytes(), b"\x81\x02hi"].concat();
        let at = parse_upgrade_response(&ok, &key).unwrap().unwrap();
        assert_eq!(&ok[at..], b"\x81\x02hi");
        assert_eq!(parse_upgrade_response(&ok[..20], &key), Ok(None));
        let wrong = head.replace(&accept, "bm9wZQ==");
        assert!(parse_upgrade_response(wrong.as_bytes(), &key).is_err());
        let refused = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_upgrade_response(refused.as_bytes(), &key),
            Err("http 401".into())
        );
        // Keys differ per agent and are valid base64 of 16 bytes.
        assert_ne!(key_for(42, 7), key_for(42, 8));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key_for(42, 7))
            .unwrap();
        assert_eq!(raw.len(), 16);
    }

    #[test]
    fn the_request_carries_the_token_and_subprotocol() {
        let host: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let text = String::from_utf8(upgrade_request(
            host,
            "/v1/connect",
            "agent-1",
            "a2V5",
            Some("tok"),
        ))
        .unwrap();
        assert!(text.starts_with("GET /v1/connect HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("Authorization: Bearer tok\r\n"));
        assert!(text.contains(&format!(
            "Sec-WebSocket-Protocol: {}\r\n",
            tether_protocol::SUBPROTOCOL
        )));
        assert!(text.ends_with("\r\n\r\n"));
        let peer = String::from_utf8(upgrade_request(
            host,
            "/v1/connect",
            "agent-1",
            "a2V5",
            None,
        ))
        .unwrap();
        assert!(
            peer.starts_with("GET /ws?id=agent-1 HTTP/1.1\r\n"),
            "{peer}"
        );
    }

    #[test]
    fn push_probes_are_read_without_parsing_json() {
        let push = br#"{"type":"push","id":"01J","data":{"t":1234567,"pad":"xx"}}"#;
        assert!(is_push(push));
        assert_eq!(push_probe(push), Some(1234567));
        assert_eq!(
            push_probe(br#"{"type":"push","id":"1","data":{"x":1}}"#),
            None
        );
        assert!(!is_push(br#"{"type":"welcome","agent_id":"a"}"#));
    }
}

//! `peer-limit`: the least a WebSocket server can do on this kernel — the floor that
//! Tether's figures are divided by.
//!
//! One thread, one `mio` (epoll, edge-triggered) loop, no framework, no runtime, no
//! auth. It speaks the bench's peer contract (`docs/benchmarks.md`) on one port:
//!
//! ```text
//!   accept ──► slot in `conns` (a small struct: socket, inline agent id, two empty Vecs)
//!   readable ──► read into ONE shared 64 KiB scratch buffer
//!                 ├─ HTTP  GET /ws?id=ID        → 101 (RFC 6455 accept, `tether.v1` if
//!                 │                               offered) + `welcome` in one write
//!                 │        POST /push/ID        → one text frame, 202 / 404
//!                 │        POST /request/ID     → `request` frame; 200 with the answer / 504
//!                 │        POST /broadcast      → frame encoded once, written to every
//!                 │                               socket in a tight loop; 202 {"delivered":n}
//!                 │        GET /stats
//!                 └─ WS    ping → pong, close → close, `response` → its waiting request
//!   writable ──► flush what the kernel did not take (only then does a socket own bytes)
//! ```
//!
//! An idle connection owns no heap beyond its slot and its map entry: the bytes of an
//! unfinished request or frame, and the bytes a full socket did not take, are kept in a
//! per-connection `Vec` only while they exist (a `Vec` with no capacity allocates nothing).
//! Frames from clients are checked as RFC 6455 requires of a server (mask set, reserved
//! bits clear, known opcodes, control frames final and ≤ 125 bytes), failing with 1002
//! or 1009; continuation and binary frames are read and dropped (the bench never sends
//! them). Agent ids are kept inline (≤ 31 bytes) and are not percent-decoded.
//!
//! With `PING_INTERVAL_SECONDS=S` it also pings every WebSocket once every `S` seconds,
//! spread over the interval in tenth-of-a-second slices by slot, and reads the pongs:
//! the floor of what holding idle connections with pings costs (no liveness check,
//! no pong deadline, no bookkeeping — a ping written, a pong read).
//!
//! What it leaves out on purpose, being a measuring stick and not a server to expose:
//! deadlines (slow headers, dead peers, idle), auth, connection caps, newest-wins closing
//! (a newer socket with the same id takes over the id; the older one stays open).

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::SocketAddr,
    time::{Duration, Instant},
};

use mio::{
    Events, Interest, Poll, Token,
    net::{TcpListener, TcpStream},
};
use tether_protocol::{AgentMessage, SUBPROTOCOL};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const LISTENER: Token = Token(usize::MAX);
/// The one read buffer of the process.
const SCRATCH: usize = 64 * 1024;
/// Largest request head (431 above).
const MAX_HEAD: usize = 8 * 1024;
/// Largest control request body (413 above).
const MAX_BODY: usize = 1 << 20;
/// Largest frame accepted from a client (1009 above).
const MAX_FRAME: usize = 64 * 1024;
/// Most bytes queued for one socket the kernel does not take: a slow consumer is closed.
const MAX_OUT: usize = 4 << 20;
/// Listen backlog sized for reconnect storms (the kernel here allows 4096).
const BACKLOG: i32 = 4096;

fn main() -> io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "0".into());
    let addr: SocketAddr = format!("127.0.0.1:{port}")
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut server = Server::bind(addr)?;
    server.ping_slices = ping_slices(std::env::var("PING_INTERVAL_SECONDS").ok().as_deref())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let local = server.listener.local_addr()?;
    println!("listening ws={local} control={local}");
    server.run()
}

/// An agent id kept inline, so that a connection's id costs no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
struct Id {
    len: u8,
    bytes: [u8; 31],
}

impl Id {
    fn new(s: &[u8]) -> Option<Self> {
        if s.is_empty() || s.len() > 31 {
            return None;
        }
        let mut id = Id {
            len: s.len() as u8,
            ..Id::default()
        };
        id.bytes[..s.len()].copy_from_slice(s);
        Some(id)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// HTTP: an upgrade not yet made, or a control (push API) connection.
    Http,
    /// An open WebSocket.
    Ws,
}

/// One connection: all it owns while idle is this struct (88 bytes) and its map entry.
struct Conn {
    sock: TcpStream,
    role: Role,
    /// Close once `outbuf` is flushed.
    closing: bool,
    id: Id,
    /// Bytes of an unfinished request or frame; empty (unallocated) otherwise.
    inbuf: Vec<u8>,
    /// Bytes the kernel did not take yet; empty (unallocated) otherwise.
    outbuf: Vec<u8>,
}

// === impl Conn ===

impl Conn {
    /// Writes `bytes` now if nothing is queued; keeps what the kernel does not take.
    /// False when the socket failed or the queue would pass [`MAX_OUT`].
    fn send(&mut self, bytes: &[u8]) -> bool {
        if !self.outbuf.is_empty() {
            if self.outbuf.len() + bytes.len() > MAX_OUT {
                return false;
            }
            self.outbuf.extend_from_slice(bytes);
            return true;
        }
        let mut written = 0;
        while written < bytes.len() {
            match self.sock.write(&bytes[written..]) {
                Ok(0) => return false,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if written < bytes.len() {
            self.outbuf.extend_from_slice(&bytes[written..]);
        }
        true
    }

    /// Writes the queue on writability. False when the socket failed.
    fn flush(&mut self) -> bool {
        let mut written = 0;
        while written < self.outbuf.len() {
            match self.sock.write(&self.outbuf[written..]) {
                Ok(0) => return false,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if written == self.outbuf.len() {
            // Give the memory back: an idle socket owns no buffer.
            self.outbuf = Vec::new();
        } else {
            self.outbuf.drain(..written);
        }
        true
    }
}

/// A `POST /request` waiting for the agent's `response`.
struct Pending {
    control: usize,
    deadline: Instant,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    agents: HashMap<Id, usize>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    /// Reused for every response and frame built (no allocation per message).
    wbuf: Vec<u8>,
    /// Pings: slices per interval (interval × 10), when `PING_INTERVAL_SECONDS` is set.
    ping_slices: Option<usize>,
}

/// How often the ping schedule advances by one slice.
const PING_TICK: Duration = Duration::from_millis(100);

/// Slices of the ping schedule for `PING_INTERVAL_SECONDS` (none when unset or 0).
fn ping_slices(interval: Option<&str>) -> Result<Option<usize>, String> {
    let Some(text) = interval else {
        return Ok(None);
    };
    let seconds: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("PING_INTERVAL_SECONDS must be whole seconds, got {text:?}"))?;
    Ok((seconds > 0).then_some(seconds * 10))
}

/// What processing the bytes of one connection decided.
enum Outcome {
    /// This many bytes were used; keep the rest for the next read.
    Consumed(usize),
    /// Close the connection now.
    Close,
}

// === impl Server ===

impl Server {
    fn bind(addr: SocketAddr) -> io::Result<Self> {
        // socket2 for the backlog (mio's `bind` listens with 1024).
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        let mut listener = TcpListener::from_std(socket.into());
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Self {
            poll,
            listener,
            conns: Vec::new(),
            free: Vec::new(),
            agents: HashMap::new(),
            pending: HashMap::new(),
            next_id: 0,
            wbuf: Vec::with_capacity(4096),
            ping_slices: None,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; SCRATCH];
        let mut next_ping = Instant::now() + PING_TICK;
        let mut slice = 0usize;
        loop {
            let pinging = self.ping_slices.map(|_| next_ping);
            let timeout = self
                .pending
                .values()
                .map(|p| p.deadline)
                .chain(pinging)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()) + Duration::from_millis(1));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(slot) => {
                        if event.is_writable() {
                            self.on_writable(slot);
                        }
                        let hangup = event.is_read_closed() || event.is_error();
                        if event.is_readable() || hangup {
                            self.on_readable(slot, &mut scratch, hangup);
                        }
                    }
                }
            }
            if !self.pending.is_empty() {
                self.expire(Instant::now());
            }
            if let Some(slices) = self.ping_slices
                && Instant::now() >= next_ping
            {
                next_ping += PING_TICK;
                self.ping_slice(slice, slices);
                slice = (slice + 1) % slices;
            }
        }
    }

    /// Pings the WebSockets in slots `slice, slice + slices, …`: each slot once per
    /// interval, and a tick visits only its own slots.
    fn ping_slice(&mut self, slice: usize, slices: usize) {
        let mut failed = Vec::new();
        for slot in (slice..self.conns.len()).step_by(slices) {
            if let Some(conn) = self.conns[slot].as_mut()
                && conn.role == Role::Ws
                && !conn.closing
                && !conn.send(&[0x89, 0x00])
            {
                failed.push(slot);
            }
        }
        for slot in failed {
            self.close(slot);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let slot = self.free.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                    // Both interests once: no re-registration when a socket fills up.
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut sock,
                            Token(slot),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        self.free.push(slot);
                        continue;
                    }
                    self.conns[slot] = Some(Conn {
                        sock,
                        role: Role::Http,
                        closing: false,
                        id: Id::default(),
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the next connection's edge retries.
                    eprintln!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn close(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        // Dropping the socket closes it, which also removes it from the epoll set.
        if conn.role == Role::Ws {
            if self.agents.get(&conn.id) == Some(&slot) {
                self.agents.remove(&conn.id);
            }
        } else {
            self.pending.retain(|_, p| p.control != slot);
        }
        self.free.push(slot);
    }

    fn on_writable(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.outbuf.is_empty() {
            return;
        }
        let ok = conn.flush();
        if !ok || (conn.closing && conn.outbuf.is_empty()) {
            self.close(slot);
        }
    }

    /// Reads until the socket is empty. `hangup`: the peer shut its side, so read on to
    /// the end of the stream (a short read would leave the FIN unseen, with no new edge).
    fn on_readable(&mut self, slot: usize, scratch: &mut [u8], hangup: bool) {
        loop {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if conn.closing {
                // Waiting for the flush before the close: input is no longer read.
                return;
            }
            let n = match conn.sock.read(scratch) {
                Ok(0) => return self.close(slot),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.close(slot),
            };
            let outcome = if conn.inbuf.is_empty() {
                let outcome = self.process(slot, &mut scratch[..n]);
                if let Outcome::Consumed(used) = outcome
                    && used < n
                    && let Some(conn) = self.conns[slot].as_mut()
                {
                    conn.inbuf.extend_from_slice(&scratch[used..n]);
                }
                outcome
            } else {
                let mut buf = std::mem::take(&mut conn.inbuf);
                buf.extend_from_slice(&scratch[..n]);
                let outcome = self.process(slot, &mut buf);
                if let Outcome::Consumed(used) = outcome
                    && used < buf.len()
                    && let Some(conn) = self.conns[slot].as_mut()
                {
                    buf.drain(..used);
                    conn.inbuf = buf;
                }
                outcome
            };
            if let Outcome::Close = outcome {
                return self.close(slot);
            }
            // A short read emptied the socket's queue (edge-triggered epoll: the next
            // arrival raises a new edge), so skip the read that would say WouldBlock.
            if n < scratch.len() && !hangup {
                return;
            }
        }
    }

    /// Handles every complete request or frame at the start of `data`.
    fn process(&mut self, slot: usize, data: &mut [u8]) -> Outcome {
        let mut used = 0;
        while used < data.len() {
            let Some(conn) = self.conns[slot].as_ref() else {
                return Outcome::Close;
            };
            if conn.closing {
                return Outcome::Consumed(data.len());
            }
            let step = match conn.role {
                Role::Http => self.http(slot, &data[used..]),
                Role::Ws => self.frame(slot, &mut data[used..]),
            };
            match step {
                Step::Used(n) => used += n,
                Step::Incomplete => break,
                Step::Close => return Outcome::Close,
            }
        }
        Outcome::Consumed(used)
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<(u64, usize)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, p)| (*id, p.control))
            .collect();
        for (id, control) in expired {
            self.pending.remove(&id);
            self.respond(control, "504 Gateway Timeout", b"");
        }
    }

    /// Writes an HTTP response to a control connection (closing it if that fails).
    fn respond(&mut self, slot: usize, status: &str, body: &[u8]) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        self.wbuf.clear();
        let _ = write!(
            self.wbuf,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        self.wbuf.extend_from_slice(body);
        if !conn.send(&self.wbuf) {
            self.close(slot);
        }
    }
}

/// What one request or frame did.
enum Step {
    Used(usize),
    Incomplete,
    Close,
}

// === HTTP ===

impl Server {
    fn http(&mut self, slot: usize, data: &[u8]) -> Step {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head = match req.parse(data) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if data.len() <= MAX_HEAD => return Step::Incomplete,
            Ok(httparse::Status::Partial) => {
                return self.refuse(slot, "431 Request Header Fields Too Large");
            }
            Err(_) => return self.refuse(slot, "400 Bad Request"),
        };
        let method = req.method.unwrap_or("");
        let path = req.path.unwrap_or("");
        let header = |name: &'static str| {
            req.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        if method == "GET" && route == "/ws" {
            return self.upgrade(slot, head, query, &req);
        }
        let length = match header("content-length").next().map(parse_usize) {
            Some(Some(n)) => n,
            Some(None) => return self.refuse(slot, "400 Bad Request"),
            None if header("transfer-encoding").next().is_some() => {
                return self.refuse(slot, "411 Length Required");
            }
            None => 0,
        };
        if length > MAX_BODY {
            return self.refuse(slot, "413 Payload Too Large");
        }
        if data.len() < head + length {
            return Step::Incomplete;
        }
        let body = &data[head..head + length];
        let close = header("connection").any(|v| v.eq_ignore_ascii_case(b"close"));
        match (
            method,
            route.strip_prefix('/').unwrap_or(route).split_once('/'),
        ) {
            ("POST", Some(("push", id))) => self.push(slot, id.as_bytes(), body),
            ("POST", Some(("request", id))) => {
                let timeout_ms = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("timeout_ms="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(5000);
                self.request(slot, id.as_bytes(), body, timeout_ms)
            }
            ("POST", None) if route == "/broadcast" => self.broadcast(slot, body),
            ("GET", None) if route == "/stats" => {
                let open = self.conns.iter().flatten().filter(|c| c.role == Role::Ws);
                let body = format!(r#"{{"connections":{}}}"#, open.count());
                self.respond(slot, "200 OK", body.as_bytes());
            }
            _ => self.respond(slot, "404 Not Found", b""),
        }
        if close {
            return self.refuse_after(slot, head + length);
        }
        Step::Used(head + length)
    }

    /// Answers `status` and closes once it is written.
    fn refuse(&mut self, slot: usize, status: &str) -> Step {
        self.respond(slot, status, b"");
        self.refuse_after(slot, 0)
    }

    fn refuse_after(&mut self, slot: usize, used: usize) -> Step {
        match self.conns[slot].as_mut() {
            Some(conn) if !conn.outbuf.is_empty() => {
                conn.closing = true;
                Step::Used(used)
            }
            _ => Step::Close,
        }
    }

    fn upgrade(&mut self, slot: usize, head: usize, query: &str, req: &httparse::Request) -> Step {
        let header = |name: &'static str| {
            req.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .flat_map(|h| h.value.split(|b| *b == b','))
                .map(|v| v.trim_ascii())
        };
        let upgrade = header("upgrade").any(|v| v.eq_ignore_ascii_case(b"websocket"));
        let connection = header("connection").any(|v| v.eq_ignore_ascii_case(b"upgrade"));
        let version = header("sec-websocket-version").any(|v| v == b"13");
        let key = header("sec-websocket-key").next();
        let (true, true, Some(key)) = (upgrade, connection, key) else {
            return self.refuse(slot, "400 Bad Request");
        };
        if !version {
            // The extra header rides in the status line's slot of `respond`.
            return self.refuse(slot, "426 Upgrade Required\r\nsec-websocket-version: 13");
        }
        let Some(id) = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("id="))
            .and_then(|id| Id::new(id.as_bytes()))
        else {
            return self.refuse(slot, "400 Bad Request");
        };
        let protocol = header("sec-websocket-protocol").any(|v| v == SUBPROTOCOL.as_bytes());
        let accept = derive_accept_key(key);
        let w = &mut self.wbuf;
        w.clear();
        w.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
        );
        w.extend_from_slice(accept.as_bytes());
        if protocol {
            w.extend_from_slice(b"\r\nsec-websocket-protocol: ");
            w.extend_from_slice(SUBPROTOCOL.as_bytes());
        }
        w.extend_from_slice(b"\r\n\r\n");
        // The welcome goes out with the 101: one write, one segment.
        let at = w.len();
        w.extend_from_slice(b"{\"type\":\"welcome\",\"agent_id\":\"");
        w.extend_from_slice(id.as_bytes());
        w.extend_from_slice(b"\"}");
        let payload = w.split_off(at);
        encode_frame(w, 0x1, &payload);
        let Some(conn) = self.conns[slot].as_mut() else {
            return Step::Close;
        };
        conn.role = Role::Ws;
        conn.id = id;
        if !conn.send(&self.wbuf) {
            return Step::Close;
        }
        // Newest wins the id (the older socket stays open but is no longer addressed).
        self.agents.insert(id, slot);
        Step::Used(head)
    }

    fn push(&mut self, slot: usize, id: &[u8], body: &[u8]) {
        let Ok(data) = std::str::from_utf8(body) else {
            return self.respond(slot, "400 Bad Request", b"");
        };
        let target = Id::new(id).and_then(|id| self.agents.get(&id).copied());
        let Some(target) = target else {
            return self.respond(slot, "404 Not Found", b"");
        };
        let n = self.next_id;
        self.next_id += 1;
        let text = format!(r#"{{"type":"push","id":"{n}","data":{data}}}"#);
        self.wbuf.clear();
        encode_frame(&mut self.wbuf, 0x1, text.as_bytes());
        if self.conns[target]
            .as_mut()
            .is_some_and(|c| c.send(&self.wbuf))
        {
            self.respond(slot, "202 Accepted", b"");
        } else {
            self.close(target);
            self.respond(slot, "404 Not Found", b"");
        }
    }

    fn request(&mut self, slot: usize, id: &[u8], body: &[u8], timeout_ms: u64) {
        let Ok(data) = std::str::from_utf8(body) else {
            return self.respond(slot, "400 Bad Request", b"");
        };
        let target = Id::new(id).and_then(|id| self.agents.get(&id).copied());
        let Some(target) = target else {
            return self.respond(slot, "404 Not Found", b"");
        };
        let n = self.next_id;
        self.next_id += 1;
        let text =
            format!(r#"{{"type":"request","id":"{n}","data":{data},"timeout_ms":{timeout_ms}}}"#);
        self.wbuf.clear();
        encode_frame(&mut self.wbuf, 0x1, text.as_bytes());
        if !self.conns[target]
            .as_mut()
            .is_some_and(|c| c.send(&self.wbuf))
        {
            self.close(target);
            return self.respond(slot, "404 Not Found", b"");
        }
        self.pending.insert(
            n,
            Pending {
                control: slot,
                deadline: Instant::now() + Duration::from_millis(timeout_ms),
            },
        );
    }

    fn broadcast(&mut self, slot: usize, body: &[u8]) {
        let Ok(data) = std::str::from_utf8(body) else {
            return self.respond(slot, "400 Bad Request", b"");
        };
        let n = self.next_id;
        self.next_id += 1;
        let text = format!(r#"{{"type":"push","id":"{n}","data":{data}}}"#);
        // Encoded once; the tight loop below is one write(2) per socket.
        let mut frame = std::mem::take(&mut self.wbuf);
        frame.clear();
        encode_frame(&mut frame, 0x1, text.as_bytes());
        let mut delivered = 0u64;
        let mut failed = Vec::new();
        for (i, conn) in self.conns.iter_mut().enumerate() {
            if let Some(conn) = conn
                && conn.role == Role::Ws
                && !conn.closing
            {
                if conn.send(&frame) {
                    delivered += 1;
                } else {
                    failed.push(i);
                }
            }
        }
        self.wbuf = frame;
        for i in failed {
            self.close(i);
        }
        let body = format!(r#"{{"delivered":{delivered}}}"#);
        self.respond(slot, "202 Accepted", body.as_bytes());
    }
}

fn parse_usize(v: &[u8]) -> Option<usize> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

// === WebSocket frames ===

/// A frame header read from the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length (payload starts here).
    start: usize,
    len: usize,
}

/// Reads a client frame's header: `Ok(None)` if incomplete, `Err(code)` if the frame
/// breaks RFC 6455 for a client (1002) or is larger than [`MAX_FRAME`] (1009).
fn parse_header(data: &[u8]) -> Result<Option<Header>, u16> {
    if data.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (data[0], data[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    if b0 & 0x70 != 0 || !matches!(opcode, 0x0..=0x2 | 0x8..=0xa) || b1 & 0x80 == 0 {
        return Err(1002);
    }
    let (len, mut start) = match b1 & 0x7f {
        126 if data.len() >= 4 => (u16::from_be_bytes([data[2], data[3]]) as u64, 4),
        127 if data.len() >= 10 => (
            u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    if opcode >= 0x8 && (!fin || len > 125) {
        return Err(1002);
    }
    if len > MAX_FRAME as u64 {
        return Err(1009);
    }
    if data.len() < start + 4 {
        return Ok(None);
    }
    let mask = data[start..start + 4].try_into().expect("4 bytes");
    start += 4;
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        start,
        len: len as usize,
    }))
}

/// Appends an unmasked server frame.
fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

impl Server {
    fn frame(&mut self, slot: usize, data: &mut [u8]) -> Step {
        let header = match parse_header(data) {
            Ok(Some(h)) => h,
            Ok(None) => return Step::Incomplete,
            Err(code) => return self.fail(slot, code),
        };
        let end = header.start + header.len;
        if data.len() < end {
            return Step::Incomplete;
        }
        let payload = &mut data[header.start..end];
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= header.mask[i % 4];
        }
        let Some(conn) = self.conns[slot].as_mut() else {
            return Step::Close;
        };
        match header.opcode {
            0x9 => {
                // ≤ 125 bytes (checked): the pong is built on the stack.
                let mut pong = [0u8; 127];
                pong[0] = 0x8a;
                pong[1] = payload.len() as u8;
                pong[2..2 + payload.len()].copy_from_slice(payload);
                if !conn.send(&pong[..2 + payload.len()]) {
                    return Step::Close;
                }
            }
            0x8 => {
                // Echo the status code, then close once the reply is written.
                let code = if payload.len() >= 2 {
                    &payload[..2]
                } else {
                    &[]
                };
                let mut out = [0u8; 4];
                out[0] = 0x88;
                out[1] = code.len() as u8;
                out[2..2 + code.len()].copy_from_slice(code);
                if !conn.send(&out[..2 + code.len()]) || conn.outbuf.is_empty() {
                    return Step::Close;
                }
                conn.closing = true;
            }
            0x1 if header.fin => self.on_text(payload),
            _ => {}
        }
        Step::Used(end)
    }

    /// Fails the connection with a close code (RFC 6455 §7.1.7).
    fn fail(&mut self, slot: usize, code: u16) -> Step {
        let Some(conn) = self.conns[slot].as_mut() else {
            return Step::Close;
        };
        let [hi, lo] = code.to_be_bytes();
        if conn.send(&[0x88, 2, hi, lo]) && !conn.outbuf.is_empty() {
            conn.closing = true;
            return Step::Used(0);
        }
        Step::Close
    }

    /// An agent's `response` completes its waiting `POST /request`.
    fn on_text(&mut self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        if let Ok(AgentMessage::Response { id, result }) = AgentMessage::decode(text)
            && let Ok(n) = id.parse::<u64>()
            && let Some(waiter) = self.pending.remove(&n)
        {
            let data = match &result {
                Ok(data) => data.get(),
                Err(_) => "null",
            };
            self.respond(waiter.control, "200 OK", data.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ping_schedule_is_read_from_whole_seconds() {
        assert_eq!(ping_slices(None), Ok(None));
        assert_eq!(ping_slices(Some("0")), Ok(None));
        assert_eq!(ping_slices(Some("30")), Ok(Some(300)));
        assert!(
            ping_slices(Some("1.5"))
                .unwrap_err()
                .contains("whole seconds")
        );
    }

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn reads_client_frame_headers() {
        let frame = masked(0x9, true, b"hi");
        let h = parse_header(&frame).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.start, h.len), (true, 0x9, 6, 2));
        // Every prefix is incomplete, never an error.
        for cut in 0..6 {
            assert_eq!(parse_header(&frame[..cut]), Ok(None), "cut {cut}");
        }
        let big = masked(0x1, true, &[b'x'; 300]);
        let h = parse_header(&big).unwrap().unwrap();
        assert_eq!((h.start, h.len), (8, 300));
    }

    #[test]
    fn refuses_what_a_server_must_refuse() {
        // Unmasked.
        assert_eq!(parse_header(&[0x81, 0x02, b'h', b'i']), Err(1002));
        // Reserved bit.
        assert_eq!(parse_header(&[0xc1, 0x80, 0, 0, 0, 0]), Err(1002));
        // Unknown opcode.
        assert_eq!(parse_header(&[0x83, 0x80, 0, 0, 0, 0]), Err(1002));
        // Fragmented control frame.
        assert_eq!(parse_header(&masked(0x9, false, b"x")), Err(1002));
        // Control frame over 125 bytes.
        assert_eq!(parse_header(&masked(0x9, true, &[0; 126])), Err(1002));
        // Too big.
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        assert_eq!(parse_header(&huge), Err(1009));
    }

    #[test]
    fn encodes_every_length_form() {
        for (len, header) in [(5, 2), (126, 4), (70_000, 10)] {
            let mut out = Vec::new();
            encode_frame(&mut out, 0x1, &vec![b'a'; len]);
            assert_eq!(out.len(), header + len);
            assert_eq!(out[0], 0x81);
        }
    }

    #[test]
    fn ids_are_inline_and_bounded() {
        assert_eq!(Id::new(b"agent-7").unwrap().as_bytes(), b"agent-7");
        assert!(Id::new(b"").is_none());
        assert!(Id::new(&[b'a'; 32]).is_none());
        // 88 bytes in release builds (debug builds add mio's 8-byte selector id).
        let size = std::mem::size_of::<Option<Conn>>();
        assert!(size <= 104, "{size}");
    }
}

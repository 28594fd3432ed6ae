//! The connection driver: one hand-written future per agent socket, a state machine
//! over the socket, the connection's outbox and the close handshake. It replaces
//! `WebSocketStream` + an `async fn` because an idle connection is then just this
//! struct — a couple of hundred bytes in its task cell — and owns no buffer:
//!
//! - reads go into one scratch buffer per worker thread (`limits.readBufferBytes`),
//!   and the [`Decoder`] keeps bytes only while a frame or a fragmented message is
//!   unfinished;
//! - writes go out of [`Frames`], which holds only what the kernel has not taken yet;
//!   everything queued is written with one vectored write, payloads shared (`Bytes`,
//!   encoded once for a broadcast) and headers inline;
//! - the task's waker is handed directly to the socket and to the outbox's
//!   `AtomicWaker` (no waker proxies, no `Notified` future);
//! - while it has nothing unwritten, the driver lends the socket to deliveries
//!   ([`Socket::lendable_fd`], plain TCP only): a broadcast, a push or a ping is then
//!   written by whoever delivers it, without waking this task; the driver takes the
//!   socket back before its own writes and before the socket closes;
//! - timers exist only while needed: a write that the kernel does not take arms the
//!   write deadline (`limits.writeTimeoutMs`), a close we sent arms the close-handshake
//!   deadline; both are boxed and dropped once they are no longer needed.
//!
//! ```text
//!            poll ──> outbox ──encode──> Frames ──writev──> socket
//!                 └─> socket ──read──> scratch ──> Decoder ──> Session::on_message
//!                                                          └─> pong / close answers ──> Frames
//! ```
//!
//! What the messages mean is not decided here: [`Session::on_message`] does that, and
//! answers with a [`Reaction`].

use std::cell::RefCell;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tether_protocol::{CloseCode, GatewayMessage};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::frame::{Decoder, Frames, Inbound, Opcode, OutFrame};
use crate::hub::Outbound;
use crate::metrics::label;
use crate::session::{DataMessage, Reaction, Session};

/// How long to wait for the peer's close frame after sending ours.
pub const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Slices handed to one vectored write (two per frame: header and payload).
const WRITE_SLICES: usize = 64;

thread_local! {
    /// The read buffer every connection on this worker thread shares: a connection
    /// only borrows it during its own poll, and copies out what stays unfinished.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The gateway closed it with this code (the close frame was sent or attempted).
    Closed(CloseCode),
    /// The agent closed it (with this code, if it sent one); its close was answered.
    ByPeer(Option<u16>),
    /// The socket failed or reached EOF without a close handshake.
    Gone,
}

impl Ended {
    /// The close code for metrics: ours, the peer's (1005 when it sent none), or 1006.
    /// A peer picks its code freely: codes outside RFC 6455's registered range and the
    /// protocol's own are bucketed ([`peer_code_bucket`]) so the label stays bounded.
    pub fn code_label(self) -> i64 {
        match self {
            Self::Closed(code) => i64::from(code.code()),
            Self::ByPeer(code) => i64::from(peer_code_bucket(code.unwrap_or(1005))),
            Self::Gone => 1006,
        }
    }
}

/// A peer's close code as a metric label: RFC 6455's codes (1000–1015) and the
/// protocol's own stay; any other code of the library range becomes 3000, of the
/// private range 4000, and anything else 0. At most ~40 distinct values.
pub fn peer_code_bucket(code: u16) -> u16 {
    match code {
        1000..=1015 => code,
        _ if CloseCode::from_code(code).is_some() => code,
        3000..=3999 => 3000,
        4000..=4999 => 4000,
        _ => 0,
    }
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Serving: reading messages, writing the outbox.
    Open,
    /// Our close frame is in `out`, behind what was queued before it.
    Closing { code: CloseCode, then: AfterClose },
    /// Our close is written: reading until the peer's close, EOF or the deadline.
    AwaitingPeerClose(CloseCode),
    /// The peer closed; our answering close is in `out`.
    Answering(Option<u16>),
}

/// What follows our close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterClose {
    /// Wait (bounded) for the peer's close, so that what we wrote is known to be read.
    AwaitReply,
    /// End once it is written: the peer is dead or already closed.
    End,
    /// Write it only if the socket takes it at once (a slow consumer does not read).
    BestEffort,
}

/// What the driver needs of its socket.
pub trait Socket: AsyncRead + AsyncWrite + Unpin {
    /// Sends what the kernel holds back (`TCP_CORK`, set at accept so that the 101 and
    /// the `welcome` leave together); called once, after the first write.
    fn uncork(&self) {}

    /// Pushes out what the socket itself still holds (TLS records that rustls keeps
    /// while the kernel's buffer is full); `Ready(Ok)` once nothing is held. A plain
    /// socket holds nothing.
    fn poll_held(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The descriptor deliveries may write whole frames to while the driver has
    /// nothing unwritten ([`Connection::lend_socket`](crate::hub::Connection::lend_socket));
    /// `None` when bytes must go through the socket's own state (TLS).
    fn lendable_fd(&self) -> Option<RawFd> {
        None
    }

    /// Reads into `buf` like `poll_read`. A plain socket also tells the reactor it is
    /// drained when a read does not fill `buf`, so the next poll waits for new data
    /// instead of calling `read` once more only to hear `EAGAIN`: one system call less
    /// per ping answered, on every idle connection.
    fn poll_read_drained(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }
}

impl Socket for TcpStream {
    fn uncork(&self) {
        let _ = socket2::SockRef::from(self).set_tcp_cork(false);
    }

    fn lendable_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    fn poll_read_drained(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use std::io::ErrorKind::{Interrupted, WouldBlock};
        let fd = self.as_raw_fd();
        loop {
            std::task::ready!(self.poll_read_ready(cx))?;
            let room = buf.initialize_unfilled();
            let capacity = room.len();
            let mut got = 0;
            // A short read is reported to `try_io` as "would block", which clears the
            // readiness it was made under. Safe against races: readiness set by an
            // event after that one is not cleared (tokio compares the event's tick),
            // every new arrival on an edge-triggered socket raises a new event, and a
            // peer's FIN is never cleared (closed states are final).
            let outcome = self.try_io(tokio::io::Interest::READABLE, || {
                got = crate::direct::recv_nonblocking(fd, room)?;
                if got > 0 && got < capacity {
                    Err(WouldBlock.into())
                } else {
                    Ok(got)
                }
            });
            match outcome {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == WouldBlock && got > 0 => {
                    buf.advance(got);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if matches!(err.kind(), WouldBlock | Interrupted) => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn uncork(&self) {
        self.get_ref().0.uncork();
    }

    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.get_ref().1.wants_write() {
            Pin::new(self).poll_flush(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// The future that serves one agent socket until it closes.
pub struct Driver<S = TcpStream> {
    io: S,
    session: Session,
    decoder: Decoder,
    out: Frames,
    phase: Phase,
    /// The write deadline while the kernel does not take our frames, or the close
    /// handshake's deadline; `None` otherwise.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes read before the driver started (pipelined behind the upgrade request)
    /// wait in the decoder until the first poll.
    early: bool,
    /// The socket is corked until the first write (see [`Socket::uncork`]).
    corked: bool,
    /// The socket is lent to deliveries ([`Socket::lendable_fd`]): they write whole
    /// frames to it while nothing is queued; taken back before the driver writes.
    lent: bool,
}

impl<S: Socket> Driver<S> {
    /// A driver for `io` whose first frame is `welcome`; `early` holds bytes already
    /// read from the socket (decoded on the first poll, after registration).
    pub fn new(io: S, session: Session, welcome: GatewayMessage, early: &[u8]) -> Self {
        let limits = &session.state().config.limits;
        let mut decoder = Decoder::new(limits.max_message_bytes);
        // Frames that arrived with the upgrade are decoded only once the session is
        // registered (the first poll); until then they are just unread bytes.
        decoder.hold(early);
        let mut out = Frames::default();
        push_reply(&mut out, &session, &welcome);
        Self {
            io,
            session,
            decoder,
            out,
            phase: Phase::Open,
            deadline: None,
            early: !early.is_empty(),
            corked: true,
            lent: false,
        }
    }

    /// The session this driver serves.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Bytes held for this connection beyond the struct itself: unfinished input and
    /// unwritten output (0 for an idle connection).
    pub fn buffered(&self) -> usize {
        self.decoder.buffered() + self.out.pending_bytes()
    }

    fn max_write_buffer(&self) -> usize {
        self.session.state().config.limits.max_write_buffer_bytes
    }

    /// Moves queued frames into `out`, up to `limits.maxWriteBufferBytes`; a queued
    /// `Close` starts the close after what precedes it.
    fn take_outbox(&mut self, cx: &Context<'_>) {
        let max = self.max_write_buffer();
        let Self { session, out, .. } = self;
        let conn = session.connection();
        conn.register_waker(cx.waker());
        if out.pending_bytes() >= max {
            return;
        }
        let mut taken = 0u64;
        let mut close = None;
        conn.drain_queued(|frame| {
            let frame = match frame {
                Outbound::Text(text) => {
                    OutFrame::new(Opcode::Text, AsRef::<Bytes>::as_ref(&text).clone())
                }
                Outbound::Binary(data) => OutFrame::new(Opcode::Binary, data),
                Outbound::Ping => OutFrame::new(Opcode::Ping, Bytes::new()),
                Outbound::Raw(rest) => OutFrame::raw(rest),
                Outbound::Close(code) => {
                    close = Some(code);
                    return false;
                }
            };
            out.push(frame);
            taken += 1;
            out.pending_bytes() < max
        });
        if taken > 0 {
            self.session
                .state()
                .metrics
                .messages_sent
                .add(taken, &label("kind", "queued"));
        }
        if let Some(code) = close {
            let then = match code {
                // It does not read: do not wait on it.
                CloseCode::SlowConsumer => AfterClose::BestEffort,
                // A dead peer will not answer; do not hold its memory for the timeout.
                CloseCode::PingTimeout => AfterClose::End,
                _ => AfterClose::AwaitReply,
            };
            self.start_close(code, then);
        }
    }

    fn start_close(&mut self, code: CloseCode, then: AfterClose) {
        self.session.connection().stop_accepting();
        self.out.push(OutFrame::close(code.code(), code.reason()));
        self.phase = Phase::Closing { code, then };
    }

    /// Decodes `input` and acts on every message; `Err` when the connection is over.
    fn feed(&mut self, input: &[u8]) -> Result<(), Ended> {
        let Self {
            decoder,
            session,
            out,
            phase,
            ..
        } = self;
        let mut ended = None;
        let mut close = None;
        let result = decoder.feed(input, |message| {
            session
                .connection()
                .clock
                .touch(matches!(message, Inbound::Text(_) | Inbound::Binary(_)));
            let reaction = match message {
                // After our close only the peer's close matters.
                Inbound::Text(_) | Inbound::Binary(_) if *phase != Phase::Open => {
                    Reaction::Continue
                }
                Inbound::Text(text) => session.on_message(DataMessage::Text(text)),
                Inbound::Binary(data) => session.on_message(DataMessage::Binary(data)),
                Inbound::Ping(payload) => {
                    if *phase == Phase::Open {
                        out.push_pong(OutFrame::new(Opcode::Pong, payload));
                    }
                    Reaction::Continue
                }
                Inbound::Pong => Reaction::Continue,
                Inbound::Close(peer) => {
                    let peer_code = peer.as_ref().map(|(code, _)| *code);
                    match *phase {
                        Phase::Open => {
                            // Echo the peer's code (RFC 6455 §5.5.1); an empty close is
                            // answered with an empty close.
                            out.push(match peer_code {
                                Some(code) => OutFrame::close(code, ""),
                                None => OutFrame::new(Opcode::Close, Bytes::new()),
                            });
                            *phase = Phase::Answering(peer_code);
                            session.connection().stop_accepting();
                        }
                        Phase::Closing { code, .. } => {
                            *phase = Phase::Closing {
                                code,
                                then: AfterClose::End,
                            };
                        }
                        Phase::AwaitingPeerClose(code) => ended = Some(Ended::Closed(code)),
                        Phase::Answering(_) => {}
                    }
                    return false;
                }
            };
            match reaction {
                Reaction::Continue => true,
                Reaction::Reply(message) => {
                    push_reply(out, session, &message);
                    true
                }
                Reaction::Close(code) => {
                    close = Some(code);
                    false
                }
            }
        });
        if let Some(ended) = ended {
            return Err(ended);
        }
        let failed = result.err().map(|e| e.close_code());
        if let Some(code) = close.or(failed) {
            match self.phase {
                Phase::Open => self.start_close(code, AfterClose::AwaitReply),
                // Already closing: a violation after our close changes nothing.
                Phase::Closing { .. } => {}
                Phase::AwaitingPeerClose(code) => return Err(Ended::Closed(code)),
                Phase::Answering(peer) => return Err(Ended::ByPeer(peer)),
            }
        }
        Ok(())
    }

    /// One pass over every source; `Ok(true)` when something moved.
    fn step(&mut self, cx: &mut Context<'_>) -> Result<bool, Ended> {
        let mut progress = false;
        if std::mem::take(&mut self.early) {
            self.feed(&[])?;
            progress = true;
        }
        if self.phase == Phase::Open {
            self.take_outbox(cx);
        }
        if !self.out.is_empty() {
            progress |= self.write(cx)?;
        }
        // A TLS socket may have taken our frames into its own buffer without the kernel
        // taking them yet: they are not written until it is empty.
        let held = match self.io.poll_held(cx) {
            Poll::Ready(Ok(())) => false,
            Poll::Ready(Err(_)) => return Err(self.gone()),
            Poll::Pending => {
                if self.deadline.is_none() {
                    let timeout = self.session.state().config.limits.write_timeout_ms;
                    self.deadline =
                        Some(Box::pin(tokio::time::sleep(Duration::from_millis(timeout))));
                }
                true
            }
        };
        if self.out.is_empty() && !held {
            match self.phase {
                Phase::Open => {
                    self.deadline = None;
                    // Idle again: deliveries may write to the socket themselves until
                    // something is queued (then they queue, and this task is woken).
                    if !self.lent
                        && let Some(fd) = self.io.lendable_fd()
                    {
                        self.lent = self.session.connection().lend_socket(fd);
                    }
                }
                Phase::Closing {
                    code,
                    then: AfterClose::AwaitReply,
                } => {
                    self.phase = Phase::AwaitingPeerClose(code);
                    self.deadline = Some(Box::pin(tokio::time::sleep(CLOSE_HANDSHAKE_TIMEOUT)));
                    progress = true;
                }
                Phase::Closing { code, .. } => return Err(Ended::Closed(code)),
                Phase::AwaitingPeerClose(_) => {}
                Phase::Answering(peer) => return Err(Ended::ByPeer(peer)),
            }
        }
        // Back-pressure: while our own answers (pongs, errors) pile up unwritten, stop
        // reading what would make more of them.
        if !matches!(self.phase, Phase::Answering(_))
            && self.out.pending_bytes() < self.max_write_buffer()
        {
            progress |= self.read(cx)?;
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Err(match self.phase {
                Phase::AwaitingPeerClose(code) => Ended::Closed(code),
                // The kernel took nothing for `limits.writeTimeoutMs`: a slow consumer.
                _ => Ended::Closed(CloseCode::SlowConsumer),
            });
        }
        Ok(progress)
    }

    /// Writes as much of `out` as the socket takes in one vectored write.
    fn write(&mut self, cx: &mut Context<'_>) -> Result<bool, Ended> {
        // No delivery may write while our bytes are on their way: a frame of theirs
        // between two parts of ours would corrupt the stream.
        self.reclaim();
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        let n = self.out.slices(&mut slices);
        match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Err(self.gone()),
            Poll::Ready(Ok(written)) => {
                self.out.advance(written);
                if std::mem::take(&mut self.corked) {
                    self.io.uncork();
                }
                Ok(true)
            }
            Poll::Pending => {
                if let Phase::Closing {
                    code,
                    then: AfterClose::BestEffort,
                } = self.phase
                {
                    return Err(Ended::Closed(code));
                }
                if self.deadline.is_none() {
                    let timeout = self.session.state().config.limits.write_timeout_ms;
                    self.deadline =
                        Some(Box::pin(tokio::time::sleep(Duration::from_millis(timeout))));
                }
                Ok(false)
            }
        }
    }

    /// Reads once into this worker's scratch buffer and decodes what came.
    fn read(&mut self, cx: &mut Context<'_>) -> Result<bool, Ended> {
        let size = self.session.state().config.limits.read_buffer_bytes.max(1);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < size {
                scratch.resize(size, 0);
            }
            let mut buf = ReadBuf::new(&mut scratch[..size]);
            match self.io.poll_read_drained(cx, &mut buf) {
                Poll::Pending => Ok(false),
                Poll::Ready(Err(_)) => Err(self.gone()),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => Err(self.gone()),
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    self.feed(&scratch[..n])?;
                    Ok(true)
                }
            }
        })
    }

    /// Takes the socket back from deliveries, if it was lent.
    fn reclaim(&mut self) {
        if std::mem::take(&mut self.lent) {
            self.session.connection().reclaim_socket();
        }
    }

    /// How the connection ended when its socket did.
    fn gone(&self) -> Ended {
        match self.phase {
            Phase::Open => Ended::Gone,
            Phase::Closing { code, .. } | Phase::AwaitingPeerClose(code) => Ended::Closed(code),
            Phase::Answering(peer) => Ended::ByPeer(peer),
        }
    }
}

/// Queues an answer of the session itself (welcome, error, refreshed) ahead of whatever
/// the outbox holds.
fn push_reply(out: &mut Frames, session: &Session, message: &GatewayMessage) {
    out.push(OutFrame::new(
        Opcode::Text,
        message.encode().into_bytes().into(),
    ));
    session
        .state()
        .metrics
        .messages_sent
        .add(1, &label("kind", "control"));
}

impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        // Before the socket closes: its descriptor number may be reused at once.
        if self.lent {
            self.session.connection().reclaim_socket();
        }
    }
}

impl<S: Socket> Future for Driver<S> {
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = self.get_mut();
        loop {
            match this.step(cx) {
                Err(ended) => return Poll::Ready(ended),
                Ok(true) => continue,
                // Every source is registered with `cx`: the socket (read, and write
                // while `out` is not empty), the outbox's waker, the deadline.
                Ok(false) => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_close_codes_are_bucketed_into_a_bounded_label() {
        use super::peer_code_bucket;
        assert_eq!(peer_code_bucket(1000), 1000);
        assert_eq!(peer_code_bucket(1011), 1011);
        assert_eq!(peer_code_bucket(4003), 4003, "the protocol's own code");
        assert_eq!(peer_code_bucket(3999), 3000);
        assert_eq!(peer_code_bucket(4777), 4000);
        assert_eq!(peer_code_bucket(2999), 0);
        let labels: std::collections::BTreeSet<u16> =
            (0..=u16::MAX).map(peer_code_bucket).collect();
        assert!(labels.len() <= 40, "{} labels", labels.len());
    }

    use super::*;

    /// The driver is what every idle connection keeps in its task cell: a regression
    /// that puts a buffer, a timer or a channel inline shows up here first (the whole
    /// task's budget is in `session::tests::a_connection_task_fits_a_256_byte_task_cell`).
    #[test]
    fn an_idle_driver_is_its_socket_session_and_a_few_words() {
        let size = std::mem::size_of::<Driver<TcpStream>>();
        eprintln!("size_of::<Driver<TcpStream>>() = {size}");
        assert!(size <= 136, "Driver is {size} bytes");
        // Idle, the write queue and the decoder's unfinished state are one word each.
        assert_eq!(std::mem::size_of::<Frames>(), 8);
        assert_eq!(std::mem::size_of::<Decoder>(), 16);
    }

    #[test]
    fn close_labels_say_who_closed() {
        assert_eq!(Ended::Closed(CloseCode::SlowConsumer).code_label(), 4004);
        assert_eq!(Ended::ByPeer(Some(1000)).code_label(), 1000);
        assert_eq!(Ended::ByPeer(None).code_label(), 1005);
        assert_eq!(Ended::Gone.code_label(), 1006);
    }
}

//! A strict RFC 6455 codec for the server side of agent sockets: pure functions over
//! byte slices, no I/O, so every rule is unit- and property-tested without a socket.
//!
//! ```text
//!  bytes read ──> Decoder::feed ──> parse_head (RSV, opcode, mask, lengths)
//!                                └─> unmask, reassemble fragments, check UTF-8 / close
//!                                └─> Inbound::{Text, Binary, Ping, Pong, Close}
//!  Outbound ──> OutFrame (header inline + shared payload) ──> Frames (vectored writes)
//! ```
//!
//! Why our own and not tungstenite's `FrameCodec`: tungstenite keeps a read buffer and
//! a write buffer inside every connection, and the connection driver (crate::driver)
//! reads into one scratch buffer per worker thread instead. [`Decoder`] therefore keeps
//! bytes only while a frame or a fragmented message is unfinished, and [`Frames`] holds
//! only frames the kernel has not taken yet, their payloads shared (`Bytes`) between
//! every recipient of a broadcast.
//!
//! The rules enforced on what agents send (each answered with its close code):
//! - 1002: a reserved bit set, an unknown opcode, an unmasked frame (clients MUST mask),
//!   a control frame longer than 125 bytes or fragmented, a continuation with nothing
//!   to continue, a new data frame inside a fragmented message, a 64-bit length with
//!   its top bit set, a close frame with a 1-byte payload or a code that may not be
//!   sent on the wire.
//! - 1007: a text message or a close reason that is not UTF-8.
//! - 1009: a frame or a reassembled message longer than `limits.maxMessageBytes`
//!   (refused from the header, before its payload is buffered).

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::Bytes;
use tether_protocol::CloseCode;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEAD: usize = 14;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// `0x0`: the next fragment of a message.
    Continuation,
    /// `0x1`: a UTF-8 text message (or its first fragment).
    Text,
    /// `0x2`: a binary message (or its first fragment).
    Binary,
    /// `0x8`: close.
    Close,
    /// `0x9`: ping.
    Ping,
    /// `0xA`: pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Why the peer's bytes are refused; each maps to the close code the connection fails
/// with ([`WireError::close_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// One of RSV1–3 is set and no extension was negotiated.
    #[error("reserved bits set")]
    ReservedBits,
    /// Opcodes 0x3–0x7 and 0xB–0xF are reserved.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// Frames from a client must be masked.
    #[error("unmasked client frame")]
    Unmasked,
    /// Control frames carry at most 125 bytes and are never fragmented.
    #[error("invalid control frame")]
    BadControlFrame,
    /// A continuation without a message to continue, or a new message inside one.
    #[error("fragmentation out of order")]
    BadFragmentation,
    /// A 64-bit payload length with the most significant bit set.
    #[error("invalid payload length")]
    BadLength,
    /// A close payload of one byte, or a code that is not allowed on the wire.
    #[error("invalid close frame")]
    BadClose,
    /// A text message or close reason that is not UTF-8.
    #[error("invalid UTF-8")]
    Utf8,
    /// A frame or message longer than the limit.
    #[error("message longer than {0} bytes")]
    TooBig(usize),
}

impl WireError {
    /// The close code the connection fails with (RFC 6455 §7.4.1).
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::Utf8 => CloseCode::InvalidPayload,
            Self::TooBig(_) => CloseCode::MessageTooBig,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Last fragment of its message.
    pub fin: bool,
    /// What the frame is.
    pub opcode: Opcode,
    /// The masking key (client frames are always masked).
    pub mask: [u8; 4],
    /// Header length in bytes.
    pub head_len: usize,
    /// Payload length in bytes.
    pub payload_len: usize,
}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes are needed.
/// A payload longer than `max_payload` is refused from the header alone.
pub fn parse_head(buf: &[u8], max_payload: usize) -> Result<Option<Head>, WireError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WireError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(WireError::UnknownOpcode(b0 & 0x0F))?;
    if b1 & 0x80 == 0 {
        return Err(WireError::Unmasked);
    }
    let short = usize::from(b1 & 0x7F);
    if opcode.is_control() && (!fin || short > MAX_CONTROL_PAYLOAD) {
        return Err(WireError::BadControlFrame);
    }
    let (len, len_bytes) = match short {
        126 => {
            let Some(ext) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 2)
        }
        127 => {
            let Some(ext) = buf.get(2..10) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(ext.try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(WireError::BadLength);
            }
            (len, 8)
        }
        n => (n as u64, 0),
    };
    if len > max_payload as u64 {
        return Err(WireError::TooBig(max_payload));
    }
    let head_len = 2 + len_bytes + 4;
    let Some(mask) = buf.get(2 + len_bytes..head_len) else {
        return Ok(None);
    };
    Ok(Some(Head {
        fin,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        head_len,
        payload_len: len as usize,
    }))
}

/// XORs `data` with the masking key (RFC 6455 §5.3), starting at key offset 0.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes((&*chunk).try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Whether a close code may be received on the wire (RFC 6455 §7.4, IANA registry):
/// 1004–1006 and 1015 are reserved for local use, below 1000 and 1016–2999 unassigned.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A message (or control frame) decoded from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A complete text message, UTF-8 checked.
    Text(String),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping with its payload (≤ 125 bytes), to be answered by a pong.
    Ping(Bytes),
    /// A pong (its payload is not kept).
    Pong,
    /// The peer's close: its code and reason, if it sent one.
    Close(Option<(u16, String)>),
}

/// A data message whose fragments are still arriving.
#[derive(Debug)]
struct Fragmented {
    text: bool,
    data: Vec<u8>,
}

/// Turns the bytes a socket yields into [`Inbound`] messages, keeping only what is
/// unfinished: the bytes of an incomplete frame and the fragments of an incomplete
/// message. Both are empty (no allocation) between messages.
#[derive(Debug)]
pub struct Decoder {
    /// What is unfinished; `None` (one word, no allocation) between messages, since
    /// the decoder lives in every idle connection.
    unfinished: Option<Box<Unfinished>>,
    max_message: usize,
}

/// A decoder's state between two reads, while something is unfinished.
#[derive(Debug, Default)]
struct Unfinished {
    /// Bytes of a frame that has not arrived whole.
    partial: Vec<u8>,
    /// A fragmented message being reassembled.
    fragmented: Option<Fragmented>,
}

impl Decoder {
    /// A decoder that refuses frames and messages longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            unfinished: None,
            max_message,
        }
    }

    /// Bytes held for unfinished frames and messages (0 between messages).
    pub fn buffered(&self) -> usize {
        self.unfinished.as_ref().map_or(0, |u| {
            u.partial.capacity() + u.fragmented.as_ref().map_or(0, |f| f.data.capacity())
        })
    }

    /// Keeps `bytes` to be decoded ahead of the next input (bytes read before the
    /// decoder's owner was ready for messages).
    pub fn hold(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.unfinished
                .get_or_insert_default()
                .partial
                .extend_from_slice(bytes);
        }
    }

    fn fragmented(&mut self) -> Option<&mut Fragmented> {
        self.unfinished.as_mut()?.fragmented.as_mut()
    }

    /// Frees the unfinished state once nothing is left in it.
    fn tidy(&mut self) {
        if self
            .unfinished
            .as_ref()
            .is_some_and(|u| u.partial.is_empty() && u.fragmented.is_none())
        {
            self.unfinished = None;
        }
    }

    /// Decodes every complete frame in what was buffered plus `input`, handing each
    /// message to `on_message` in order; keeps the bytes of an incomplete frame. Stops
    /// early (dropping the rest) when `on_message` returns `false`, e.g. after a close.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_message: impl FnMut(Inbound) -> bool,
    ) -> Result<(), WireError> {
        let mut partial = self
            .unfinished
            .as_mut()
            .map(|u| std::mem::take(&mut u.partial))
            .unwrap_or_default();
        if partial.is_empty() {
            let used = self.decode_from(input, &mut on_message)?;
            if let Some(used) = used
                && used < input.len()
            {
                partial.extend_from_slice(&input[used..]);
            }
        } else {
            partial.extend_from_slice(input);
            let used = self.decode_from(&partial, &mut on_message)?;
            match used {
                Some(used) if used < partial.len() => {
                    partial.drain(..used);
                }
                // Everything consumed (or dropped): give the allocation back.
                _ => partial = Vec::new(),
            }
        }
        if !partial.is_empty() {
            self.unfinished.get_or_insert_default().partial = partial;
        }
        self.tidy();
        Ok(())
    }

    /// Decodes frames from `buf`; `Some(consumed)`, or `None` when stopped early.
    fn decode_from(
        &mut self,
        buf: &[u8],
        on_message: &mut impl FnMut(Inbound) -> bool,
    ) -> Result<Option<usize>, WireError> {
        let mut at = 0;
        loop {
            let Some(head) = parse_head(&buf[at..], self.max_message)? else {
                return Ok(Some(at));
            };
            let end = at + head.head_len + head.payload_len;
            if buf.len() < end {
                return Ok(Some(at));
            }
            let payload = &buf[at + head.head_len..end];
            at = end;
            if let Some(message) = self.frame(head, payload)?
                && !on_message(message)
            {
                return Ok(None);
            }
        }
    }

    /// Applies one complete frame; a message when it completes one.
    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<Option<Inbound>, WireError> {
        let unmasked = || {
            let mut data = payload.to_vec();
            unmask(&mut data, head.mask);
            data
        };
        match head.opcode {
            Opcode::Ping => Ok(Some(Inbound::Ping(unmasked().into()))),
            Opcode::Pong => Ok(Some(Inbound::Pong)),
            Opcode::Close => parse_close(&unmasked()).map(|c| Some(Inbound::Close(c))),
            Opcode::Text | Opcode::Binary if self.fragmented().is_some() => {
                Err(WireError::BadFragmentation)
            }
            Opcode::Text | Opcode::Binary => {
                let text = head.opcode == Opcode::Text;
                if head.fin {
                    return complete(text, unmasked()).map(Some);
                }
                self.unfinished.get_or_insert_default().fragmented = Some(Fragmented {
                    text,
                    data: unmasked(),
                });
                Ok(None)
            }
            Opcode::Continuation => {
                let max_message = self.max_message;
                let Some(fragmented) = self.fragmented() else {
                    return Err(WireError::BadFragmentation);
                };
                if fragmented.data.len() + payload.len() > max_message {
                    return Err(WireError::TooBig(max_message));
                }
                // The key restarts at offset 0 in every frame.
                let start = fragmented.data.len();
                fragmented.data.extend_from_slice(payload);
                unmask(&mut fragmented.data[start..], head.mask);
                if !head.fin {
                    return Ok(None);
                }
                let Fragmented { text, data } = self
                    .unfinished
                    .as_mut()
                    .and_then(|u| u.fragmented.take())
                    .expect("checked");
                complete(text, data).map(Some)
            }
        }
    }
}

fn complete(text: bool, data: Vec<u8>) -> Result<Inbound, WireError> {
    if text {
        String::from_utf8(data)
            .map(Inbound::Text)
            .map_err(|_| WireError::Utf8)
    } else {
        Ok(Inbound::Binary(data.into()))
    }
}

/// A close payload: empty, or a valid code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, WireError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WireError::BadClose),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(WireError::BadClose);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WireError::Utf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// One frame to write: the header inline, the payload shared.
#[derive(Debug, Clone)]
pub struct OutFrame {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
}

impl OutFrame {
    /// An unmasked, final frame (server frames are never masked nor fragmented here).
    pub fn new(opcode: Opcode, payload: Bytes) -> Self {
        let mut head = [0u8; 10];
        head[0] = 0x80 | opcode.bits();
        let len = payload.len();
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self {
            head,
            head_len,
            payload,
        }
    }

    /// A close frame with this code and its reason (truncated to fit 125 bytes).
    pub fn close(code: u16, reason: &str) -> Self {
        let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &reason[..end];
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        Self::new(Opcode::Close, payload.into())
    }

    /// Bytes written as they are, with no header: the rest of a frame whose start
    /// is already on the wire ([`crate::hub::Outbound::Raw`]).
    pub fn raw(bytes: Bytes) -> Self {
        Self {
            head: [0; 10],
            head_len: 0,
            payload: bytes,
        }
    }

    /// The header and the payload, in wire order.
    pub fn parts(&self) -> (&[u8], &Bytes) {
        (self.head(), &self.payload)
    }

    /// Header plus payload length.
    pub fn len(&self) -> usize {
        usize::from(self.head_len) + self.payload.len()
    }

    /// Whether the frame has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }
}

/// Frames waiting for the kernel, in order, and how much of the first one is written.
/// Empty (no allocation) once everything is written.
///
/// One word while empty (the driver of every idle connection holds one): the queue
/// and its counters are boxed and exist only while something waits for the kernel.
#[derive(Debug, Default)]
pub struct Frames(Option<Box<Queue>>);

#[derive(Debug, Default)]
struct Queue {
    queue: VecDeque<OutFrame>,
    /// Bytes of the first frame already written.
    written: usize,
    /// Bytes not yet written, over every frame.
    pending: usize,
}

impl Frames {
    /// Appends a frame.
    pub fn push(&mut self, frame: OutFrame) {
        self.0.get_or_insert_default().push(frame);
    }

    /// Appends a pong, replacing a pong still waiting untouched at the end (see
    /// [`Queue::push_pong`]).
    pub fn push_pong(&mut self, pong: OutFrame) {
        self.0.get_or_insert_default().push_pong(pong);
    }

    /// Whether everything has been written.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Bytes not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.pending)
    }

    /// Up to `slices.len()` slices of what is left to write, in order; returns how many
    /// were filled.
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        self.0.as_ref().map_or(0, |q| q.slices(slices))
    }

    /// Marks `n` bytes as written; frees the queue once it is empty.
    pub fn advance(&mut self, n: usize) {
        if let Some(queue) = self.0.as_mut() {
            queue.advance(n);
            if queue.queue.is_empty() {
                debug_assert_eq!(queue.written, 0);
                self.0 = None;
            }
        }
    }
}

impl Queue {
    fn push(&mut self, frame: OutFrame) {
        self.pending += frame.len();
        self.queue.push_back(frame);
    }

    /// Appends a pong, replacing a pong still waiting untouched at the end: a ping
    /// flood from a peer that does not read costs one pending pong, not one per ping
    /// (RFC 6455 §5.5.3 allows answering only the most recent ping).
    fn push_pong(&mut self, pong: OutFrame) {
        let untouched = self.queue.len() > 1 || self.written == 0;
        if untouched
            && let Some(last) = self.queue.back_mut()
            && last.head[0] == 0x80 | Opcode::Pong.bits()
        {
            self.pending = self.pending - last.len() + pong.len();
            *last = pong;
            return;
        }
        self.push(pong);
    }

    fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut skip = self.written;
        'frames: for frame in &self.queue {
            for part in [frame.head(), &frame.payload[..]] {
                if n == slices.len() {
                    break 'frames;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[n] = IoSlice::new(&part[skip..]);
                skip = 0;
                n += 1;
            }
        }
        n
    }

    fn advance(&mut self, mut n: usize) {
        self.pending -= n;
        n += self.written;
        while let Some(front) = self.queue.front() {
            if n < front.len() {
                break;
            }
            n -= front.len();
            self.queue.pop_front();
        }
        self.written = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame, as an agent sends it.
    pub(crate) fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let start = out.len();
        out.extend_from_slice(payload);
        unmask(&mut out[start..], mask);
        out
    }

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn decode_all(decoder: &mut Decoder, chunks: &[&[u8]]) -> Result<Vec<Inbound>, WireError> {
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, |m| {
                out.push(m);
                true
            })?;
        }
        Ok(out)
    }

    fn decode_one(bytes: &[u8]) -> Result<Vec<Inbound>, WireError> {
        decode_all(&mut Decoder::new(1024), &[bytes])
    }

    #[test]
    fn rfc_example_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(decode_one(&frame), Ok(vec![Inbound::Text("Hello".into())]));
    }

    #[test]
    fn protocol_violations_map_to_their_close_codes() {
        let cases: [(Vec<u8>, WireError); 9] = [
            (client_frame(0xC1, b"x", KEY), WireError::ReservedBits),
            (client_frame(0x83, b"x", KEY), WireError::UnknownOpcode(3)),
            (vec![0x81, 0x01, b'x'], WireError::Unmasked),
            (
                client_frame(0x89, &[0; 126], KEY),
                WireError::BadControlFrame,
            ),
            (client_frame(0x09, b"p", KEY), WireError::BadControlFrame),
            (client_frame(0x80, b"x", KEY), WireError::BadFragmentation),
            (client_frame(0x88, &[3], KEY), WireError::BadClose),
            (
                client_frame(0x88, &1005u16.to_be_bytes(), KEY),
                WireError::BadClose,
            ),
            (client_frame(0x81, &[0xff, 0xfe], KEY), WireError::Utf8),
        ];
        for (bytes, expected) in cases {
            assert_eq!(decode_one(&bytes), Err(expected), "{bytes:x?}");
        }
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&KEY);
        assert_eq!(decode_one(&huge), Err(WireError::BadLength));
        assert_eq!(
            decode_one(&client_frame(0x82, &[0; 1025], KEY)),
            Err(WireError::TooBig(1024))
        );
        assert_eq!(WireError::Utf8.close_code(), CloseCode::InvalidPayload);
        assert_eq!(WireError::TooBig(1).close_code(), CloseCode::MessageTooBig);
        assert_eq!(WireError::Unmasked.close_code(), CloseCode::ProtocolError);
    }

    #[test]
    fn too_big_is_refused_from_the_header_before_the_payload_arrives() {
        let frame = client_frame(0x82, &[0; 2000], KEY);
        let mut decoder = Decoder::new(1024);
        assert_eq!(
            decode_all(&mut decoder, &[&frame[..8]]),
            Err(WireError::TooBig(1024))
        );
    }

    #[test]
    fn fragments_reassemble_with_control_frames_between_them() {
        let mut bytes = client_frame(0x01, "héll".as_bytes(), KEY);
        bytes.extend(client_frame(0x89, b"ping", [1, 2, 3, 4]));
        bytes.extend(client_frame(0x00, "o wö".as_bytes(), [9, 8, 7, 6]));
        bytes.extend(client_frame(0x80, "rld".as_bytes(), KEY));
        assert_eq!(
            decode_one(&bytes),
            Ok(vec![
                Inbound::Ping(Bytes::from_static(b"ping")),
                Inbound::Text("héllo wörld".into())
            ])
        );
        // A UTF-8 sequence split across fragments is fine; the whole message is checked.
        let euro = "€".as_bytes();
        let mut split = client_frame(0x01, &euro[..1], KEY);
        split.extend(client_frame(0x80, &euro[1..], KEY));
        assert_eq!(decode_one(&split), Ok(vec![Inbound::Text("€".into())]));
        // A new message inside a fragmented one is refused.
        let mut nested = client_frame(0x01, b"a", KEY);
        nested.extend(client_frame(0x81, b"b", KEY));
        assert_eq!(decode_one(&nested), Err(WireError::BadFragmentation));
        // Fragments adding up past the limit are refused.
        let mut growing = client_frame(0x02, &[0; 600], KEY);
        growing.extend(client_frame(0x00, &[0; 600], KEY));
        assert_eq!(decode_one(&growing), Err(WireError::TooBig(1024)));
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        assert_eq!(
            decode_one(&client_frame(0x88, &payload, KEY)),
            Ok(vec![Inbound::Close(Some((1000, "bye".into())))])
        );
        assert_eq!(
            decode_one(&client_frame(0x88, b"", KEY)),
            Ok(vec![Inbound::Close(None)])
        );
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.push(0xff);
        assert_eq!(
            decode_one(&client_frame(0x88, &bad_reason, KEY)),
            Err(WireError::Utf8)
        );
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_valid_close_code(code), "{code}");
        }
        for code in [1000, 1001, 1002, 1003, 1007, 1011, 1012, 3000, 4999] {
            assert!(is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn stopping_early_drops_what_follows() {
        let mut bytes = client_frame(0x88, b"", KEY);
        bytes.extend(client_frame(0x81, b"after", KEY));
        let mut decoder = Decoder::new(1024);
        let mut seen = Vec::new();
        decoder
            .feed(&bytes, |m| {
                seen.push(m);
                false
            })
            .unwrap();
        assert_eq!(seen, vec![Inbound::Close(None)]);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn an_idle_decoder_holds_no_memory() {
        let bytes = client_frame(0x81, b"hello", KEY);
        let mut decoder = Decoder::new(1024);
        decode_all(&mut decoder, &[&bytes[..3]]).unwrap();
        assert!(decoder.buffered() > 0);
        let out = decode_all(&mut decoder, &[&bytes[3..]]).unwrap();
        assert_eq!(out, vec![Inbound::Text("hello".into())]);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn out_frames_encode_each_length_form() {
        for (len, head) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let frame = OutFrame::new(Opcode::Binary, vec![7u8; len].into());
            assert_eq!(frame.len(), len + head);
            assert_eq!(frame.head()[0], 0x82);
        }
        let close = OutFrame::close(1000, &"é".repeat(100));
        assert!(close.payload.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&close.payload[2..]).is_ok());
    }

    #[test]
    fn frames_write_in_order_across_partial_writes() {
        let mut frames = Frames::default();
        frames.push(OutFrame::new(Opcode::Text, Bytes::from_static(b"abc")));
        frames.push(OutFrame::new(Opcode::Binary, Bytes::from_static(b"defg")));
        let mut wire = Vec::new();
        // Write 3 bytes at a time, the way a full socket takes what fits.
        while !frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); 4];
            let n = frames.slices(&mut slices);
            let flat: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            let take = flat.len().min(3);
            wire.extend_from_slice(&flat[..take]);
            frames.advance(take);
        }
        assert_eq!(wire, b"\x81\x03abc\x82\x04defg");
        assert_eq!(frames.pending_bytes(), 0);
        assert!(frames.0.is_none(), "the queue is freed once written");
    }

    proptest! {
        /// Any message, masked with any key and cut into any chunks, decodes to itself;
        /// nothing stays buffered afterwards.
        #[test]
        fn any_message_survives_any_chunking(
            messages in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..3000), 1usize..4),
                1..6),
            key in any::<[u8; 4]>(),
            cuts in proptest::collection::vec(1usize..700, 1..40),
        ) {
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for (text, data, fragments) in &messages {
                let data = if *text {
                    String::from_utf8_lossy(data).into_owned().into_bytes()
                } else {
                    data.clone()
                };
                let piece = data.len().div_ceil(*fragments).max(1);
                let parts: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(piece).collect() };
                for (i, part) in parts.iter().enumerate() {
                    let fin = if i + 1 == parts.len() { 0x80 } else { 0 };
                    let op = if i > 0 { 0 } else if *text { 1 } else { 2 };
                    wire.extend(client_frame(fin | op, part, key));
                }
                expected.push(if *text {
                    Inbound::Text(String::from_utf8(data).unwrap())
                } else {
                    Inbound::Binary(data.into())
                });
            }
            let mut chunks = Vec::new();
            let mut rest = &wire[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let (a, b) = rest.split_at((*cut).min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            let mut decoder = Decoder::new(16 * 1024);
            prop_assert_eq!(decode_all(&mut decoder, &chunks), Ok(expected));
            prop_assert_eq!(decoder.buffered(), 0);
        }

        /// Arbitrary bytes never panic the decoder, and it never holds more than one
        /// frame's worth (the limit plus a header) of them.
        #[test]
        fn arbitrary_bytes_are_refused_or_decoded_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let mut decoder = Decoder::new(512);
            let _ = decoder.feed(&bytes, |_| true);
            let partial = decoder.unfinished.as_ref().map_or(0, |u| u.partial.len());
            prop_assert!(partial <= 512 + MAX_HEAD);
        }
    }
}

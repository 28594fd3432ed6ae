//! The system calls the gateway makes itself: a non-blocking `sendmsg(2)` of a frame to
//! a socket its driver lent to deliveries ([`crate::hub::Connection::lend_socket`]), and
//! the driver's `recv(2)` that can tell the reactor a socket is drained
//! ([`crate::driver::Socket::poll_read_drained`]).
//!
//! Why not through tokio: the socket belongs to its connection's task, and asking that
//! task to write — queue, wake, poll — costs more than the write on a broadcast to every
//! connection or a ping to each one in turn (docs/benchmarks.md, "Broadcast"). The
//! descriptor is only used while the connection's lock is held and the driver has lent
//! it; the driver takes it back under that lock before it writes or closes the socket.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;

/// Writes `head` then `payload` to `fd` in one call, without blocking and without
/// SIGPIPE; returns how many bytes the kernel took (`WouldBlock` when none).
///
/// One buffer (an empty `payload`: a fan-out's frame encoded whole, a ping) goes by
/// `send(2)`, which skips what `sendmsg(2)` costs on top of it (copying in the
/// message header and the vector of buffers): that call is most of a broadcast's
/// work per recipient.
///
/// `fd` must be an open socket for the whole call: the caller holds the lock under
/// which its owner lends it and takes it back.
#[allow(unsafe_code)]
pub fn send_nonblocking(fd: RawFd, head: &[u8], payload: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let sent = if payload.is_empty() {
        // SAFETY: `head` is readable memory of `head.len()` bytes for the whole call,
        // and send only reads it; `fd` is open for the call (see above).
        unsafe { libc::send(fd, head.as_ptr().cast(), head.len(), flags) }
    } else {
        let slices = [IoSlice::new(head), IoSlice::new(payload)];
        // SAFETY: an all-zero msghdr is valid (no address, no control data); `msg_iov`
        // points at two live `IoSlice`s, which are ABI-compatible with `iovec`, and
        // they outlive the call. `fd` is open for the call (see above); sendmsg writes
        // no memory of ours.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = slices.as_ptr().cast_mut().cast::<libc::iovec>();
            msg.msg_iovlen = slices.len() as _;
            libc::sendmsg(fd, &msg, flags)
        }
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// Reads from `fd` into `buf` without blocking; `Ok(0)` is the end of the stream.
///
/// `fd` must be an open socket for the whole call: the caller owns it.
#[allow(unsafe_code)]
pub fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable memory of `buf.len()` bytes for the whole call, and
    // recv writes at most that many; `fd` is open (see above).
    let got = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if got < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(got as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn header_and_payload_arrive_as_one_stream_and_a_full_socket_says_would_block() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(
            send_nonblocking(client.as_raw_fd(), b"\x81\x02", b"hi").unwrap(),
            4
        );
        assert_eq!(
            send_nonblocking(client.as_raw_fd(), b"\x89\x00", b"").unwrap(),
            2
        );
        let mut got = [0u8; 6];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x02hi\x89\x00");
        // Nobody reads: the kernel's buffers fill and the call does not block.
        let chunk = vec![0u8; 64 * 1024];
        let full = (0..10_000).find_map(|_| {
            match send_nonblocking(client.as_raw_fd(), &chunk[..2], &chunk) {
                Ok(_) => None,
                Err(err) => Some(err.kind()),
            }
        });
        assert_eq!(full, Some(io::ErrorKind::WouldBlock));
    }
}

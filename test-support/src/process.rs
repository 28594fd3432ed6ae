//! Processes a test starts: loopback ports and the `nats-server` binary.

use std::path::PathBuf;

/// A free loopback port (bound and released: another process could take it before the
/// test binds it, which is good enough on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `nats-server` binary: `$NATS_SERVER` if set, else the usual install paths.
pub fn nats_server_binary() -> std::io::Result<PathBuf> {
    std::env::var_os("NATS_SERVER")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/sbin/nats-server",
                "/usr/bin/nats-server",
                "/usr/local/bin/nats-server",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.exists())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "nats-server not found: these tests need a real NATS server with JetStream \
                 (apt-get install nats-server, or set NATS_SERVER=/path/to/nats-server)",
            )
        })
}

//! The NATS connection's health as the client's events tell it: how often it was lost,
//! how often it came back, and the errors the server and client reported. The gateway
//! exports these (with the connection's current state) as `tether.nats.*` metrics
//! ([`crate::metrics::nats_instruments`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_nats::Event;

/// What one client event counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// The connection was lost.
    Disconnect,
    /// A connection was made (the first one, or one after a loss).
    Connect,
    /// An error the server or the client reported, by kind.
    Error(ErrorKind),
    /// Nothing to count (draining, closing, lame duck: logged only).
    Nothing,
}

/// The kinds of reported errors, the `kind` attribute of `tether.nats.errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A subscription fell behind and the client dropped messages.
    SlowConsumer,
    /// The server refused something (`-ERR`, e.g. a permissions violation).
    Server,
    /// The client failed (e.g. a bad reply from the server).
    Client,
}

impl ErrorKind {
    /// Every kind, in attribute order.
    pub const ALL: [ErrorKind; 3] = [
        ErrorKind::SlowConsumer,
        ErrorKind::Server,
        ErrorKind::Client,
    ];

    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::SlowConsumer => "slow_consumer",
            ErrorKind::Server => "server",
            ErrorKind::Client => "client",
        }
    }
}

/// What `event` counts as.
pub fn classify(event: &Event) -> Counted {
    match event {
        Event::Connected => Counted::Connect,
        Event::Disconnected => Counted::Disconnect,
        Event::SlowConsumer(_) => Counted::Error(ErrorKind::SlowConsumer),
        Event::ServerError(async_nats::ServerError::SlowConsumer(_)) => {
            Counted::Error(ErrorKind::SlowConsumer)
        }
        Event::ServerError(_) => Counted::Error(ErrorKind::Server),
        Event::ClientError(_) => Counted::Error(ErrorKind::Client),
        Event::LameDuckMode | Event::Draining | Event::Closed => Counted::Nothing,
    }
}

/// The connection's state and counters over the client's events since the gateway
/// started.
#[derive(Debug, Default)]
pub struct NatsHealth {
    connected: AtomicBool,
    /// Lost since the last connection: the next one is a reconnect.
    lost: AtomicBool,
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    errors: [AtomicU64; 3],
    bus_retries: AtomicU64,
}

/// The state and counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthCounts {
    /// Connected now.
    pub connected: bool,
    /// Connections lost.
    pub disconnects: u64,
    /// Connections made again after a loss (the first connection is not one).
    pub reconnects: u64,
    /// Reported errors by kind, in [`ErrorKind::ALL`] order.
    pub errors: [u64; 3],
    /// Retries of a step of attaching to the bus (opening a bucket or the durable
    /// stream, subscribing) that failed: NATS unreachable or JetStream not ready.
    pub bus_retries: u64,
}

// === impl NatsHealth ===

impl NatsHealth {
    /// The first connection is up (the client reports it as an event too, but the
    /// gateway knows it as soon as `connect` returns).
    pub fn mark_connected(&self) {
        self.connected.store(true, Ordering::Release);
    }

    /// Counts one retry of a step of attaching to the bus.
    pub fn record_bus_retry(&self) {
        self.bus_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one client event.
    pub fn record(&self, event: &Event) {
        match classify(event) {
            Counted::Connect => {
                self.connected.store(true, Ordering::Release);
                if self.lost.swap(false, Ordering::AcqRel) {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
            Counted::Disconnect => {
                self.connected.store(false, Ordering::Release);
                self.lost.store(true, Ordering::Release);
                self.disconnects.fetch_add(1, Ordering::Relaxed);
            }
            Counted::Error(kind) => {
                self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
            }
            Counted::Nothing => {}
        }
    }

    /// The counters now.
    pub fn counts(&self) -> HealthCounts {
        HealthCounts {
            connected: self.connected.load(Ordering::Acquire),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            errors: ErrorKind::ALL.map(|k| self.errors[k as usize].load(Ordering::Relaxed)),
            bus_retries: self.bus_retries.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connection_is_not_a_reconnect() {
        let health = NatsHealth::default();
        health.mark_connected();
        health.record(&Event::Connected);
        assert_eq!(
            health.counts(),
            HealthCounts {
                connected: true,
                ..HealthCounts::default()
            }
        );
        health.record(&Event::Disconnected);
        assert!(!health.counts().connected);
        // Reconnect attempts that fail report nothing; the next success is one reconnect.
        health.record(&Event::Connected);
        health.record(&Event::Disconnected);
        health.record(&Event::Connected);
        let counts = health.counts();
        assert!(counts.connected);
        assert_eq!((counts.disconnects, counts.reconnects), (2, 2));
    }

    #[test]
    fn errors_are_counted_by_kind_and_lifecycle_events_are_not() {
        let health = NatsHealth::default();
        for event in [
            Event::SlowConsumer(7),
            Event::ServerError(async_nats::ServerError::SlowConsumer(7)),
            Event::ServerError(async_nats::ServerError::AuthorizationViolation),
            Event::ServerError(async_nats::ServerError::Other(
                "Permissions Violation".into(),
            )),
            Event::ClientError(async_nats::ClientError::Other("bad".into())),
            Event::LameDuckMode,
            Event::Draining,
            Event::Closed,
        ] {
            health.record(&event);
        }
        let counts = health.counts();
        assert_eq!(counts.errors, [2, 2, 1]);
        assert_eq!((counts.disconnects, counts.reconnects), (0, 0));
    }
}

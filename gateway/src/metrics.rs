//! OpenTelemetry instruments of the gateway. Created once from the global meter
//! provider (installed by `tether_telemetry::init`, exporting over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and shared through the app state.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};

/// The gateway's instruments.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `tether.connections.active`: open agent connections.
    pub connections_active: UpDownCounter<i64>,
    /// `tether.connections.closed`: closed connections by close code.
    pub connections_closed: Counter<u64>,
    /// `tether.handshakes`: upgrade attempts by result.
    pub handshakes: Counter<u64>,
    /// `tether.auth.failures`: refused agent tokens and API keys, by reason.
    pub auth_failures: Counter<u64>,
    /// `tether.messages.sent`: frames written to agents.
    pub messages_sent: Counter<u64>,
    /// `tether.messages.received`: data frames read from agents.
    pub messages_received: Counter<u64>,
    /// `tether.messages.dropped`: queued frames lost with a dead socket.
    pub messages_dropped: Counter<u64>,
    /// `tether.push.duration`: push-API handling time in seconds, by operation/outcome.
    pub push_duration: Histogram<f64>,
    /// `tether.upstream.duration`: upstream POST time in seconds, by outcome.
    pub upstream_duration: Histogram<f64>,
    /// `tether.drain.remaining`: connections left to close while draining.
    pub drain_remaining: UpDownCounter<i64>,
}

impl Metrics {
    /// Instruments on the given meter.
    pub fn new(meter: &Meter) -> Self {
        Self {
            connections_active: meter
                .i64_up_down_counter("tether.connections.active")
                .with_description("Open agent WebSocket connections")
                .build(),
            connections_closed: meter
                .u64_counter("tether.connections.closed")
                .with_description("Closed agent connections by close code")
                .build(),
            handshakes: meter
                .u64_counter("tether.handshakes")
                .with_description("WebSocket upgrade attempts by result")
                .build(),
            auth_failures: meter
                .u64_counter("tether.auth.failures")
                .with_description("Refused agent tokens and API keys")
                .build(),
            messages_sent: meter
                .u64_counter("tether.messages.sent")
                .with_description("Frames written to agents")
                .build(),
            messages_received: meter
                .u64_counter("tether.messages.received")
                .with_description("Data frames read from agents")
                .build(),
            messages_dropped: meter
                .u64_counter("tether.messages.dropped")
                .with_description("Queued frames lost because the socket died first")
                .build(),
            push_duration: meter
                .f64_histogram("tether.push.duration")
                .with_unit("s")
                .with_description("Push API handling time")
                .build(),
            upstream_duration: meter
                .f64_histogram("tether.upstream.duration")
                .with_unit("s")
                .with_description("Upstream POST time")
                .build(),
            drain_remaining: meter
                .i64_up_down_counter("tether.drain.remaining")
                .with_description("Connections left to close while draining")
                .build(),
        }
    }

    /// Instruments on the global meter provider.
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter("tether-gateway"))
    }
}

/// A one-attribute label set.
pub fn label(key: &'static str, value: impl Into<opentelemetry::Value>) -> [KeyValue; 1] {
    [KeyValue::new(key, value)]
}

//! OpenTelemetry instruments of the gateway. Created once from the global meter
//! provider (installed by `tether_telemetry::init`, exporting over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and shared through the app state.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram, Meter, ObservableCounter, ObservableGauge, UpDownCounter,
};

use crate::nats::health::{ErrorKind, NatsHealth};

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
    /// `tether.quota.refusals`: push-API calls refused with 429 by a rate quota, by
    /// quota (`perApiKey`, `perTenant`).
    pub quota_refusals: Counter<u64>,
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
            quota_refusals: meter
                .u64_counter("tether.quota.refusals")
                .with_description("Push-API calls refused by a rate quota, by quota")
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

/// The NATS connection's instruments (`tether.nats.*`). They observe a router's
/// [`NatsHealth`] at export time and report nothing once that router is gone; kept by
/// the router so they live as long as it does.
#[derive(Debug)]
pub struct NatsInstruments {
    _connected: ObservableGauge<i64>,
    _disconnects: ObservableCounter<u64>,
    _reconnects: ObservableCounter<u64>,
    _errors: ObservableCounter<u64>,
    _bus_retries: ObservableCounter<u64>,
}

/// Instruments observing `health` on `meter`.
pub fn nats_instruments(meter: &Meter, health: &Arc<NatsHealth>) -> NatsInstruments {
    // Weak: the meter provider keeps callbacks for its whole life, a router may not.
    let counts = {
        let health = Arc::downgrade(health);
        move || health.upgrade().map(|h| h.counts())
    };
    let (c1, c2, c3, c4, c5) = (
        counts.clone(),
        counts.clone(),
        counts.clone(),
        counts.clone(),
        counts,
    );
    NatsInstruments {
        _connected: meter
            .i64_observable_gauge("tether.nats.connected")
            .with_description("1 while the connection to NATS is up, 0 while it is lost")
            .with_callback(move |o| {
                if let Some(c) = c1() {
                    o.observe(i64::from(c.connected), &[]);
                }
            })
            .build(),
        _disconnects: meter
            .u64_observable_counter("tether.nats.disconnects")
            .with_description("Times the connection to NATS was lost")
            .with_callback(move |o| {
                if let Some(c) = c2() {
                    o.observe(c.disconnects, &[]);
                }
            })
            .build(),
        _reconnects: meter
            .u64_observable_counter("tether.nats.reconnects")
            .with_description("Times the connection to NATS came back after a loss")
            .with_callback(move |o| {
                if let Some(c) = c3() {
                    o.observe(c.reconnects, &[]);
                }
            })
            .build(),
        _errors: meter
            .u64_observable_counter("tether.nats.errors")
            .with_description("Errors the NATS server or client reported, by kind")
            .with_callback(move |o| {
                if let Some(c) = c4() {
                    for (kind, n) in ErrorKind::ALL.iter().zip(c.errors) {
                        o.observe(n, &label("kind", kind.as_str()));
                    }
                }
            })
            .build(),
        _bus_retries: meter
            .u64_observable_counter("tether.nats.bus_retries")
            .with_description(
                "Retries of attaching to the bus (buckets, durable stream, subscriptions) \
                 while NATS was unreachable or JetStream not ready",
            )
            .with_callback(move |o| {
                if let Some(c) = c5() {
                    o.observe(c.bus_retries, &[]);
                }
            })
            .build(),
    }
}

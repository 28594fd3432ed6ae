//! Logging, tracing and metrics for Tether's binaries, set up in one place so the
//! gateway and the operator have one shape.
//!
//! ```text
//!  tracing spans/events ─┬─► EnvFilter (RUST_LOG, else the binary's default)
//!                        ├─► fmt layer on stderr (text or JSON lines)
//!                        └─► tracing-opentelemetry ─► batch span processor ─► OTLP/HTTP
//!  OTel instruments ─► SdkMeterProvider (global) ─┬─► periodic reader ─► OTLP/HTTP
//!                                                 └─► Prometheus reader ─► text for /metrics
//! ```
//!
//! - OTLP export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or a per-signal
//!   `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`) is set; the exporters read the other
//!   standard `OTEL_*` variables themselves (`OTEL_METRIC_EXPORT_INTERVAL`,
//!   `OTEL_BSP_SCHEDULE_DELAY`, headers, timeouts), and the resource takes extra
//!   attributes from `OTEL_RESOURCE_ATTRIBUTES` (`service.name` is the binary's own and
//!   the attributes the binary sets win). The SDK exports from its own
//!   threads, hence the blocking HTTP client (an async client there has no tokio
//!   reactor; the gateway's `tests/otlp` caught exactly that).
//! - The Prometheus reader ([`Options::prometheus`]) reads the same instruments as the
//!   OTLP reader: one source of truth, two ways out. Its names follow the OTel →
//!   Prometheus mapping ([`names`]), the same one an OTel Collector or Prometheus' OTLP
//!   receiver applies, so one PromQL query works for scraped and pushed metrics.
//! - Histograms in seconds get latency buckets (0.5 ms .. 30 s) by a view, since the
//!   SDK's default buckets (0 .. 10,000) suit milliseconds and would put every push in
//!   the first bucket.
//! - The Prometheus view of the global meter provider is also kept process-wide
//!   ([`global_prometheus`]), so a server built as a library (the gateway) serves
//!   `/metrics` from whatever `main` installed, without threading it through.
//! - Log lines carry ANSI colours only when stderr is a terminal and `NO_COLOR` is
//!   unset ([`use_colour`]): redirected to a file or collected by a log shipper, they
//!   are plain text.
//! - The W3C trace-context propagator is installed either way, so a push keeps one
//!   trace across pods (the NATS router carries `traceparent` in message headers).

use std::borrow::Cow;
use std::ffi::OsStr;
use std::io::IsTerminal;
use std::sync::RwLock;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{
    Aggregation, Instrument, InstrumentKind, PeriodicReader, SdkMeterProvider, Stream,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub mod names;

/// The trace id (32 hex digits) of the current span, when it is being exported: what an
/// Event or a log line names so a reader can find the trace behind it. `None` without
/// OTLP export (no trace to find) or outside any span.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    (span_context.is_valid() && span_context.is_sampled())
        .then(|| span_context.trace_id().to_string())
}

/// Bucket bounds (seconds) of every histogram whose unit is `s`.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OTLP exporter could not be built from the `OTEL_*` settings.
    #[error("OTLP exporter")]
    Otlp(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The Prometheus reader could not be built.
    #[error("Prometheus exporter")]
    Prometheus(#[source] opentelemetry_sdk::error::OTelSdkError),
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct Options {
    service: &'static str,
    json: bool,
    default_filter: Cow<'static, str>,
    attributes: Vec<KeyValue>,
    prometheus: bool,
}

// === impl Options ===

impl Options {
    /// Options for the process `service` (`service.name`): text logs at `info`, no
    /// Prometheus reader.
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            json: false,
            default_filter: Cow::Borrowed("info"),
            attributes: Vec::new(),
            prometheus: false,
        }
    }

    /// Logs as JSON lines instead of text.
    pub fn json(mut self, json: bool) -> Self {
        self.json = json;
        self
    }

    /// The log filter used when `RUST_LOG` is unset (e.g. `info,kube=warn`).
    pub fn default_filter(mut self, filter: impl Into<Cow<'static, str>>) -> Self {
        self.default_filter = filter.into();
        self
    }

    /// A resource attribute on every span and metric (`k8s.pod.name`, `tether.pool`).
    pub fn attribute(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.attributes.push(KeyValue::new(key, value.into()));
        self
    }

    /// `service.instance.id`: this process among its replicas (the pod's name). It
    /// becomes Prometheus' `instance` label when metrics arrive over OTLP.
    pub fn instance(self, id: impl Into<String>) -> Self {
        self.attribute("service.instance.id", id)
    }

    /// Also keeps a Prometheus text view of the metrics ([`Telemetry::prometheus`]).
    pub fn prometheus(mut self, on: bool) -> Self {
        self.prometheus = on;
        self
    }

    fn resource(&self) -> Resource {
        Resource::builder()
            .with_service_name(self.service)
            .with_attribute(KeyValue::new("service.namespace", "tether"))
            .with_attributes(self.attributes.iter().cloned())
            .build()
    }
}

/// The installed exporters; flushes and stops them when dropped (at the end of `main`).
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    prometheus: Option<PrometheusText>,
}

// === impl Telemetry ===

impl Telemetry {
    /// The Prometheus text view, when [`Options::prometheus`] asked for one.
    pub fn prometheus(&self) -> Option<PrometheusText> {
        self.prometheus.clone()
    }

    /// Whether spans and metrics are exported over OTLP.
    pub fn otlp(&self) -> bool {
        self.tracer.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            let _ = tracer.shutdown();
        }
        if let Some(meter) = self.meter.take() {
            let _ = meter.shutdown();
        }
    }
}

/// The Prometheus text exposition of a meter provider's instruments.
#[derive(Debug, Clone)]
pub struct PrometheusText {
    registry: prometheus::Registry,
}

// === impl PrometheusText ===

impl PrometheusText {
    /// The current values in the text format (version 0.0.4).
    pub fn encode(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            // Encoding into a String fails only on invalid UTF-8, which names never are.
            .unwrap_or_default()
    }

    /// The Content-Type of [`PrometheusText::encode`]'s output.
    pub const CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";
}

/// The Prometheus view of the global meter provider, set by [`init`] when
/// [`Options::prometheus`] asked for one (the latest `init` wins, as for the meter
/// provider itself).
static GLOBAL_PROMETHEUS: RwLock<Option<PrometheusText>> = RwLock::new(None);

/// The Prometheus text view of the global meter provider's instruments, when [`init`]
/// installed one: what a server's `/metrics` serves.
pub fn global_prometheus() -> Option<PrometheusText> {
    GLOBAL_PROMETHEUS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Whether log lines get ANSI colour codes: only on a terminal, and never when
/// `NO_COLOR` is set to anything non-empty (<https://no-color.org>). A log redirected
/// to a file, or read by a collector, stays plain text.
pub fn use_colour(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// [`use_colour`] for this process's stderr, where the logs go.
pub fn stderr_colour() -> bool {
    use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Whether the standard variables ask for OTLP export.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Histograms in seconds get [`LATENCY_BUCKETS`].
fn latency_view(instrument: &Instrument) -> Option<Stream> {
    if instrument.kind() != InstrumentKind::Histogram || instrument.unit() != "s" {
        return None;
    }
    Stream::builder()
        .with_aggregation(Aggregation::ExplicitBucketHistogram {
            boundaries: LATENCY_BUCKETS.to_vec(),
            record_min_max: true,
        })
        .build()
        .ok()
}

fn prometheus_reader()
-> Result<(opentelemetry_prometheus::PrometheusExporter, PrometheusText), Error> {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        // Scope labels would differ from what the OTLP path yields; `target_info`
        // carries the resource.
        .scope_info_enabled(false)
        .build()
        .map_err(Error::Prometheus)?;
    Ok((exporter, PrometheusText { registry }))
}

/// A meter provider with only a Prometheus reader (not installed globally): for a
/// library's own instruments in tests, or anywhere without [`init`].
pub fn prometheus_meter_provider(
    service: &'static str,
) -> Result<(SdkMeterProvider, PrometheusText), Error> {
    let (reader, text) = prometheus_reader()?;
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_view(latency_view)
        .with_resource(Options::new(service).resource())
        .build();
    Ok((provider, text))
}

/// Installs the global subscriber, propagator, meter provider and (when the `OTEL_*`
/// variables ask for it) the OTLP exporters. A second call in one process (tests that
/// start several servers) keeps the first subscriber.
pub fn init(options: Options) -> Result<Telemetry, Error> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut telemetry = Telemetry::default();
    let resource = options.resource();
    let otlp = otlp_configured();

    let mut meter = SdkMeterProvider::builder()
        .with_view(latency_view)
        .with_resource(resource.clone());
    let mut readers = 0;
    if otlp {
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .build()
            .map_err(Error::Otlp)?;
        meter = meter.with_reader(PeriodicReader::builder(metrics).build());
        readers += 1;
    }
    if options.prometheus {
        let (reader, text) = prometheus_reader()?;
        meter = meter.with_reader(reader);
        *GLOBAL_PROMETHEUS
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(text.clone());
        telemetry.prometheus = Some(text);
        readers += 1;
    }
    if readers > 0 {
        let meter = meter.build();
        opentelemetry::global::set_meter_provider(meter.clone());
        telemetry.meter = Some(meter);
    }

    let otel_layer = if otlp {
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(Error::Otlp)?;
        let tracer = SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_tracer_provider(tracer.clone());
        let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer(options.service));
        telemetry.tracer = Some(tracer);
        Some(layer)
    } else {
        None
    };

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(options.default_filter.as_ref()));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let _ = if options.json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(stderr_colour())
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    Ok(telemetry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(
            use_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None), "redirected to a file: plain text");
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn seconds_histograms_get_latency_buckets() {
        let (provider, text) = prometheus_meter_provider("test").unwrap();
        let meter = provider.meter("test");
        let h = meter.f64_histogram("t.latency").with_unit("s").build();
        h.record(0.003, &[]);
        let out = text.encode();
        assert!(
            out.contains("t_latency_seconds_bucket{le=\"0.0025\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("t_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{out}"
        );
        assert!(out.contains("service_name=\"test\""), "target_info: {out}");
    }
}

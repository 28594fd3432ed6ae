//! Logging, tracing and metrics export, set up once by the binary.
//!
//! - Logs: an env-filtered (`RUST_LOG`) fmt layer on stderr, JSON when asked.
//! - When `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard variable; the per-signal
//!   `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT` and `OTEL_METRIC_EXPORT_INTERVAL`
//!   are honoured too), spans go out through `tracing-opentelemetry` and the
//!   `tether.*` instruments through a periodic OTLP/HTTP (protobuf) exporter. The SDK
//!   exports from its own threads, hence the blocking HTTP client (an async client there
//!   has no tokio reactor; `tests/otlp` caught exactly that).
//! - The W3C trace-context propagator is installed either way, so a push keeps one
//!   trace across pods (the NATS router carries `traceparent` in message headers).

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and stops the exporters when dropped (at the end of `main`).
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
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

/// Why OTLP export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TelemetryError(String);

fn otlp_enabled() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Installs the global subscriber, propagator and (when configured) OTLP exporters.
/// `service` names the process in traces and metrics (`service.name`).
pub fn init(service: &'static str, json: bool) -> Result<Telemetry, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut telemetry = Telemetry::default();
    let otel_layer = if otlp_enabled() {
        let resource = Resource::builder()
            .with_service_name(service)
            .with_attribute(KeyValue::new("service.namespace", "tether"))
            .build();
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let tracer = SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource.clone())
            .build();
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let meter = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(metrics).build())
            .with_resource(resource)
            .build();
        opentelemetry::global::set_meter_provider(meter.clone());
        opentelemetry::global::set_tracer_provider(tracer.clone());
        let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer(service));
        telemetry.tracer = Some(tracer);
        telemetry.meter = Some(meter);
        Some(layer)
    } else {
        None
    };

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    // A second init (tests that start several gateways) keeps the first subscriber.
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    Ok(telemetry)
}

//! A real OTLP/HTTP receiver on loopback: binaries under test export to it through the
//! standard `OTEL_*` variables, and a test waits until named metrics and spans arrived.
//!
//! It does not decode protobuf: instrument and span names appear verbatim in the
//! encoded bodies, which is all the tests assert.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::post;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

/// Every request body the receiver got, with its signal (`metrics`, `traces`, `logs`).
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An OTLP/HTTP endpoint that records every export.
pub struct OtlpReceiver {
    endpoint: String,
    received: Received,
    server: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Listens on `127.0.0.1:0`.
    pub async fn start() -> Self {
        let received: Received = Arc::default();
        let app = axum::Router::new()
            .route("/v1/{signal}", post(receive))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let endpoint = format!("http://{}", listener.local_addr().expect("bound address"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("OTLP receiver serves");
        });
        Self {
            endpoint,
            received,
            server,
        }
    }

    /// `http://127.0.0.1:<port>`: the value of `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The variables that point a process's exporters here, with export intervals of
    /// 200 ms so a test sees data within a second (pass to `Command::envs`).
    pub fn env(&self) -> [(&'static str, String); 3] {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.clone()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
        ]
    }

    /// Whether some export of `signal` mentioned `name`.
    pub fn has(&self, signal: &str, name: &str) -> bool {
        self.received
            .lock()
            .iter()
            .any(|(s, body)| s == signal && contains(body, name))
    }

    /// Whether some export of `signal` holds `bytes` (a trace id, say, which OTLP's
    /// protobuf carries as 16 raw bytes).
    pub fn has_bytes(&self, signal: &str, bytes: &[u8]) -> bool {
        self.received
            .lock()
            .iter()
            .any(|(s, body)| s == signal && body.windows(bytes.len()).any(|w| w == bytes))
    }

    /// The `(signal, name)` pairs not received yet.
    pub fn missing<'a>(&self, expected: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        expected
            .iter()
            .copied()
            .filter(|(signal, name)| !self.has(signal, name))
            .collect()
    }

    /// Waits until every `(signal, name)` arrived; panics with the missing ones after
    /// `within`.
    pub async fn expect(&self, expected: &[(&str, &str)], within: Duration) {
        let outcome = crate::poll::try_eventually("OTLP exports", within, || async {
            self.missing(expected).is_empty().then_some(())
        })
        .await;
        if outcome.is_err() {
            panic!(
                "the OTLP receiver did not get {:?} within {within:?}",
                self.missing(expected)
            );
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(State(received): State<Received>, Path(signal): Path<String>, body: Bytes) {
    received.lock().push((signal, body));
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_exports_by_signal() {
        let receiver = OtlpReceiver::start().await;
        let http = reqwest::Client::new();
        let response = http
            .post(format!("{}/v1/metrics", receiver.endpoint()))
            .body("...tether.connections.active...")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(receiver.has("metrics", "tether.connections.active"));
        assert!(!receiver.has("traces", "tether.connections.active"));
        assert_eq!(
            receiver.missing(&[("metrics", "tether.connections.active"), ("traces", "push")]),
            [("traces", "push")]
        );
    }
}

//! OTLP export, checked against a real OTLP/HTTP receiver started here: the real gateway
//! binary exports its `tether.*` metrics and its spans to it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[path = "../gateway/common.rs"]
mod common;

/// Every request body the receiver got, by signal (`metrics`, `traces`).
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

async fn receive(State(received): State<Received>, Path(signal): Path<String>, body: Bytes) {
    received.lock().push((signal, body));
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn gateway_exports_metrics_and_spans_over_otlp_http() {
    let received: Received = Arc::default();
    let app = axum::Router::new()
        .route("/v1/{signal}", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path(), |_| {});
    let config_file = dir.path().join("gateway.yaml");
    std::fs::write(&config_file, config.to_yaml()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .arg("--config")
        .arg(&config_file)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("POD_NAME", "otlp-test-0")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("gateway binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(common::PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("the gateway prints its addresses");
    let addr = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap()
            .to_owned()
    };
    let (public, internal) = (addr("public="), addr("internal="));

    let token = common::token("otel-agent", &[], 60);
    let (mut ws, _) = common::connect(&format!("ws://{public}/v1/connect"), Some(&token))
        .await
        .unwrap();
    let _welcome = common::next_message(&mut ws).await;
    let push = reqwest::Client::new()
        .post(format!("http://{internal}/v1/agents/otel-agent/messages"))
        .bearer_auth(common::API_KEY)
        .json(&serde_json::json!({"traced": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(push.status(), 202);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (metrics, spans) = {
            let got = received.lock();
            let has = |signal: &str, name: &str| {
                got.iter()
                    .any(|(s, body)| s == signal && contains(body, name))
            };
            (
                has("metrics", "tether.connections.active")
                    && has("metrics", "tether.handshakes")
                    && has("metrics", "tether.push.duration"),
                has("traces", "push") && has("traces", "tether-gateway"),
            )
        };
        if metrics && spans {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "OTLP receiver did not get the expected data (metrics: {metrics}, spans: {spans})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().await.unwrap();
}

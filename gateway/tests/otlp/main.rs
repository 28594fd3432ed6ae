//! OTLP export, checked against a real OTLP/HTTP receiver started here: the real gateway
//! binary exports its `tether.*` metrics and its spans to it.

use std::time::Duration;

use tether_test_support::OtlpReceiver;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[path = "../gateway/common.rs"]
mod common;

#[tokio::test]
async fn gateway_exports_metrics_and_spans_over_otlp_http() {
    let receiver = OtlpReceiver::start().await;

    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path(), |_| {});
    let config_file = dir.path().join("gateway.yaml");
    std::fs::write(&config_file, config.to_yaml()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .arg("--config")
        .arg(&config_file)
        .envs(receiver.env())
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
    let push = tether_test_support::push_api::push(
        &reqwest::Client::new(),
        &internal,
        common::API_KEY,
        "otel-agent",
        &serde_json::json!({"traced": true}),
    )
    .await;
    assert_eq!(push.status(), 202);

    // The binary also serves the same instruments as Prometheus text on the internal port.
    let metrics = reqwest::get(format!("http://{internal}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tether_handshakes_total{"),
        "/metrics of the binary: {metrics}"
    );

    receiver
        .expect(
            &[
                ("metrics", "tether.connections.active"),
                ("metrics", "tether.handshakes"),
                ("metrics", "tether.push.duration"),
                ("traces", "push"),
                ("traces", "tether-gateway"),
            ],
            Duration::from_secs(20),
        )
        .await;
    child.kill().await.unwrap();
}

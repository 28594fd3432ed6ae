//! The gateway's NATS health metrics against a real `nats-server` that stops and comes
//! back: `tether.nats.connected` follows the connection, `tether.nats.disconnects` and
//! `tether.nats.reconnects` count each loss and return, read through the same
//! Prometheus exposition a scraper would get.
//!
//! Its own test binary: it installs the process-wide meter provider, which every
//! gateway in the process would report to.

#[path = "../gateway/common.rs"]
mod common;
#[allow(dead_code, unused_imports)]
#[path = "../nats/harness.rs"]
mod harness;

use std::time::Duration;

use serde_json::json;
use tether_telemetry::PrometheusText;
use tether_test_support::eventually;

use harness::{Nats, Pod, push_reaches};

/// The value of the unlabelled series `name` in the exposition, if present.
fn value(text: &PrometheusText, name: &str) -> Option<f64> {
    text.encode().lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            return None;
        }
        rest.split_whitespace().last()?.parse().ok()
    })
}

/// Waits until the connection gauge, disconnects and reconnects read `want`.
async fn expect_health(text: &PrometheusText, want: (f64, f64, f64)) {
    let read = || {
        (
            value(text, "tether_nats_connected"),
            value(text, "tether_nats_disconnects_total"),
            value(text, "tether_nats_reconnects_total"),
        )
    };
    let what = format!("connected, disconnects, reconnects = {want:?}");
    let patience = Duration::from_secs(15);
    eventually(&what, patience, || async {
        (read() == (Some(want.0), Some(want.1), Some(want.2))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn connection_state_disconnects_and_reconnects_follow_a_nats_restart() {
    let (provider, text) =
        tether_telemetry::prometheus_meter_provider("tether-gateway").expect("meter provider");
    opentelemetry::global::set_meter_provider(provider.clone());

    let mut nats = Nats::start().await;
    let pod = Pod::start(&nats, "gw-health").await;
    expect_health(&text, (1.0, 0.0, 0.0)).await;

    // NATS dies: the gauge drops and the loss is counted once.
    nats.kill();
    expect_health(&text, (0.0, 1.0, 0.0)).await;

    // It comes back on the same port with its store: one reconnect, routing works again.
    nats.restart(false).await;
    expect_health(&text, (1.0, 1.0, 1.0)).await;
    let mut agent = pod.agent("agent-h", &[]).await;
    push_reaches(&pod, "agent-h", &mut agent, json!("after the restart")).await;

    // A second outage counts again.
    nats.restart(false).await;
    expect_health(&text, (1.0, 2.0, 2.0)).await;
}

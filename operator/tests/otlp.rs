//! OTLP export, checked against a real OTLP/HTTP receiver started here: the real
//! operator binary, pointed at the Kubernetes API stand-in, exports its reconcile spans
//! and `tether.operator.*` metrics to it, and serves the same counters as Prometheus
//! text on `/metrics`.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_test_support::OtlpReceiver;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// `GET path` over plain HTTP/1.0; the response body.
async fn http_get(addr: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn operator_exports_reconcile_spans_and_metrics_over_otlp_http() {
    let receiver = OtlpReceiver::start().await;

    let (sim, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-operator"))
        .args([
            "--admin-addr=127.0.0.1:0",
            "--no-leader-election",
            "--identity=otlp-operator",
            "--log-format=json",
            "--gateway-image=registry.test/tether-gateway:test",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .envs(receiver.env())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("operator binary starts");
    // The admin address is in the JSON log line that announces it.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let admin = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["fields"]["message"] == "admin server listening" {
                return entry["fields"]["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("the operator exited before announcing its admin address");
    })
    .await
    .expect("the operator announces its admin address");
    // Keep draining its logs so the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    pools
        .create(
            &PostParams::default(),
            &pool(
                "traced",
                json!({"replicas": {"max": 4}, "scaling": {"targetConnectionsPerPod": 100},
                       "routing": {"nats": {"url": "nats://bus:4222"}}}),
            ),
        )
        .await
        .unwrap();

    receiver
        .expect(
            &[
                ("metrics", "tether.operator.reconciles"),
                ("metrics", "tether.operator.reconcile.duration"),
                ("metrics", "tether.operator.leader"),
                ("traces", "reconcile"),
                ("traces", "tether-operator"),
            ],
            Duration::from_secs(30),
        )
        .await;

    // A scaling decision: its Event names the trace of its `scaling` span, and that
    // trace reached the receiver.
    let report = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": "traced"},
        "status": {"pods": [{"name": "traced-0", "connections": 350, "ready": true, "draining": false,
                             "observedAt": k8s_openapi::jiff::Timestamp::now().to_string()}]},
    });
    pools
        .patch_status(
            "traced",
            &PatchParams::apply("tether-gateway/traced-0"),
            &Patch::Apply(report),
        )
        .await
        .unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let note = eventually("a ScaledUp event", Duration::from_secs(30), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ScaledUp"))
            .and_then(|e| e.note)
    })
    .await;
    let trace = note
        .rsplit_once("(trace ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("the note names no trace: {note}"));
    let trace_bytes = hex::decode(trace).expect("a hex trace id");
    assert_eq!(trace_bytes.len(), 16, "{trace}");
    receiver
        .expect(&[("traces", "scaling")], Duration::from_secs(30))
        .await;
    eventually(
        "the Event's trace exported",
        Duration::from_secs(30),
        || async { receiver.has_bytes("traces", &trace_bytes).then_some(()) },
    )
    .await;

    // Scrapers read the same instruments.
    let text = http_get(&admin, "/metrics").await;
    let reconciles = text
        .lines()
        .find_map(|l| l.strip_prefix("tether_operator_reconciles_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        reconciles.is_some_and(|n| n >= 1),
        "reconciles in /metrics: {text}"
    );
    assert!(text.contains("tether_operator_leader 1"), "{text}");
    assert!(
        text.contains("tether_operator_reconcile_duration_seconds_bucket{le=\"0.0005\"}"),
        "seconds histograms have latency buckets: {text}"
    );
    child.kill().await.unwrap();
}

//! `tether-bench connect --url`: the bench loads a Tether server it did not start — here
//! two real gateway processes behind the local platform's Service proxy
//! (`tether_e2e::service_proxy`), as a user points it at `scripts/local-platform` — with
//! tokens minted from `--hs256-secret`, one agent id per connection.
//!
//! Needs the gateway binary: `cargo build -p tether-gateway` first.

use std::{path::PathBuf, sync::Arc};

use tether_bench::target::{Deployment, Kind, Paths};
use tether_e2e::service_proxy::{Backend, EndpointSource, ServiceProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_a_service_url_with_minted_tokens() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_tether-bench"));
    let bin_dir = bench.parent().expect("target dir").to_path_buf();
    assert!(
        bin_dir.join("tether-gateway").exists(),
        "build the gateway first: cargo build -p tether-gateway"
    );
    let paths = Paths {
        bin_dir,
        peers_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/peers")),
        gateway: None,
    };
    let pods = Deployment::start(Kind::Tether, 2, &paths, &Default::default())
        .await
        .expect("two gateway shards");
    let backends: Vec<Backend> = pods
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| Backend {
            pod: format!("gw-{i}"),
            addr: s.ws,
            ready: true,
        })
        .collect();
    let endpoints: EndpointSource = Arc::new(move || backends.clone());
    let service =
        ServiceProxy::start("127.0.0.1:0".parse().unwrap(), endpoints).expect("service proxy");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let status = tokio::process::Command::new(&bench)
        .args(["connect", "-n", "40", "--rate", "400", "--hold", "0.5"])
        .args(["--url", &service.ws_url()])
        .args([
            "--hs256-secret",
            pods.secret.as_deref().expect("tether secret"),
        ])
        .args(["--tenant", "acme", "--json"])
        .arg(&json)
        .kill_on_drop(true)
        .status()
        .await
        .expect("tether-bench runs");
    let totals = service.totals();
    pods.stop().await;
    assert!(status.success(), "tether-bench exited with {status}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let result = &doc["results"][0];
    assert_eq!(result["connections_ok"], 40, "{doc:#}");
    assert_eq!(result["authenticated"], true);
    assert_eq!(result["target"], service.ws_url());
    // Every connection went through the Service, spread over both pods.
    assert_eq!(totals.values().sum::<u64>(), 40, "{totals:?}");
    assert_eq!(totals.len(), 2, "{totals:?}");
}

/// Modes that need the push API's address refuse `--url` with a clear error.
#[tokio::test]
async fn push_modes_refuse_an_external_url() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-bench"))
        .args(["push", "--url", "ws://127.0.0.1:9/v1/connect"])
        .output()
        .await
        .expect("tether-bench runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--url supports connect and churn"),
        "{stderr}"
    );
}

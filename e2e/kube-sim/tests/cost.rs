//! Figures, not a test: the stand-in's cost per server-side apply and per get with N
//! unrelated objects present (ConfigMaps in the same namespace, plus one idle watcher per
//! 100 objects on other namespaces). Run with
//! `cargo test -p tether-kube-sim --release --test cost -- --ignored --nocapture`.
//! docs/benchmarks.md ("Kubernetes API stand-in") records its output.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tether_kube_sim::Server;
use tether_kube_sim::store::{Target, WriteOpts};

/// Creates `n` ConfigMaps in `default` straight through the store (no HTTP).
fn fill(sim: &Server, n: usize) {
    let rt = sim
        .store()
        .registry()
        .find("", "v1", "configmaps")
        .expect("builtin");
    let t = Target {
        rt,
        version: "v1".into(),
        namespace: Some("default".into()),
        name: None,
        subresource: None,
    };
    for i in 0..n {
        let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("filler-{i}"), "labels": {"app": "filler", "i": (i % 10).to_string()}},
            "data": {"k": "v".repeat(64)}});
        sim.store()
            .create(&t, obj, &WriteOpts::default())
            .expect("create");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn apply_and_get_cost_with_unrelated_objects() {
    for n in [0usize, 100, 1_000, 10_000] {
        let sim = Server::start().await.unwrap();
        fill(&sim, n);
        let client = sim.client().unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let apply = |i: usize| {
            let cms = cms.clone();
            async move {
                let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("applied-{}", i % 10)}, "data": {"i": i.to_string()}});
                cms.patch(
                    &format!("applied-{}", i % 10),
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(cm),
                )
                .await
                .unwrap();
            }
        };
        // Warm up (and let the background collector settle after the fill).
        for i in 0..20 {
            apply(i).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rounds = 200;
        let started = Instant::now();
        for i in 0..rounds {
            apply(i).await;
        }
        let per_apply = started.elapsed() / rounds as u32;
        let started = Instant::now();
        for i in 0..rounds {
            cms.get(&format!("applied-{}", i % 10)).await.unwrap();
        }
        let per_get = started.elapsed() / rounds as u32;
        println!(
            "stand-in with {n:>6} unrelated objects: SSA apply {per_apply:>10.2?}, get {per_get:>10.2?} per request"
        );
    }
}

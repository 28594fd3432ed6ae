//! Figures, not a test: the stand-in's cost per server-side apply and per get with N
//! unrelated objects present: ConfigMaps in the same namespace, either plain or — like an
//! operator's children — each owned (ownerReferences) by one of N/10 owner ConfigMaps.
//! Run with
//! `cargo test -p tether-kube-sim --release --test cost -- --ignored --nocapture`.
//! docs/benchmarks.md ("Kubernetes API stand-in") records its output.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tether_kube_sim::Server;
use tether_kube_sim::store::{Target, WriteOpts};

/// Creates `n` ConfigMaps in `default` straight through the store (no HTTP); when
/// `owned`, n/10 of them own the others.
fn fill(sim: &Server, n: usize, owned: bool) {
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
    let mut owners = Vec::new();
    for i in 0..n {
        let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("filler-{i}"), "labels": {"app": "filler", "i": (i % 10).to_string()}},
            "data": {"k": "v".repeat(64)}});
        if owned && i % 10 != 0 {
            let (name, uid): &(String, String) = &owners[i / 10];
            obj["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap",
                "name": name, "uid": uid, "controller": true}]);
        }
        let w = sim
            .store()
            .create(&t, obj, &WriteOpts::default())
            .expect("create");
        if i % 10 == 0 {
            owners.push((
                format!("filler-{i}"),
                w.object["metadata"]["uid"].as_str().unwrap().to_string(),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn apply_and_get_cost_with_unrelated_objects() {
    for (n, owned) in [
        (0usize, false),
        (100, false),
        (1_000, false),
        (10_000, false),
        (1_100, true),
        (10_000, true),
    ] {
        let sim = Server::start().await.unwrap();
        fill(&sim, n, owned);
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
        let kind = if owned { "owned" } else { "plain" };
        println!(
            "stand-in with {n:>6} unrelated objects ({kind}): SSA apply {per_apply:>10.2?}, get {per_get:>10.2?} per request"
        );
    }
}

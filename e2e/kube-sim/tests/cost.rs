//! Figures, not a test: the stand-in's cost per server-side apply and per get with N
//! unrelated objects present: ConfigMaps in the same namespace, either plain or — like an
//! operator's children — each owned (ownerReferences) by one of N/10 owner ConfigMaps.
//! Run with
//! `cargo test -p tether-kube-sim --release --test cost -- --ignored --nocapture`.
//! docs/benchmarks.md ("Kubernetes API stand-in") records its output.

#![recursion_limit = "256"]

mod common;

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

/// A pool whose `status.pods[]` holds `n` entries, each server-side-applied by its own
/// field manager (`pod-<i>`), as `n` gateway pods leave it. Built in two writes (a status
/// update with every entry, then managedFields set to one Apply entry per pod) instead of
/// `n` applies, so that even a slow stand-in builds it in a moment.
pub async fn big_pool(sim: &Server, client: &kube::Client, n: usize) {
    let pools = common::pools(client, "default");
    pools
        .create(
            &kube::api::PostParams::default(),
            &common::pool("big", json!({"tenant": "t"})),
        )
        .await
        .unwrap();
    let rt = sim
        .store()
        .registry()
        .find("tether.dev", "v1alpha1", "connectionpools")
        .expect("crd");
    let target = |sub: Option<&str>| Target {
        rt: rt.clone(),
        version: "v1alpha1".into(),
        namespace: Some("default".into()),
        name: Some("big".into()),
        subresource: sub.map(str::to_string),
    };
    let entries: Vec<_> = (0..n)
        .map(|i| json!({"name": format!("big-{i}"), "connections": i, "ready": true}))
        .collect();
    let mut obj = sim.store().get(&target(None)).unwrap();
    obj["status"] = json!({"pods": entries});
    let obj = sim
        .store()
        .replace(&target(Some("status")), obj, &WriteOpts::default())
        .unwrap()
        .object;
    let mut managed = vec![
        json!({"manager": "creator", "operation": "Update", "apiVersion": "tether.dev/v1alpha1",
        "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:tenant": {}}}}),
    ];
    for i in 0..n {
        let key = format!("k:{{\"name\":\"big-{i}\"}}");
        managed.push(json!({"manager": format!("pod-{i}"), "operation": "Apply", "apiVersion": "tether.dev/v1alpha1",
            "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": {"f:status": {"f:pods": {key: {".": {}, "f:name": {}, "f:connections": {}, "f:ready": {}}}}}}));
    }
    let mut obj = (*obj).clone();
    obj["metadata"]["managedFields"] = json!(managed);
    sim.store()
        .replace(&target(None), obj, &WriteOpts::default())
        .unwrap();
}

/// One pod's status report: server-side apply of its own entry, forced, as the gateway does.
pub fn report(i: usize, connections: usize) -> serde_json::Value {
    json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool", "metadata": {"name": "big"},
        "status": {"pods": [{"name": format!("big-{i}"), "connections": connections, "ready": true}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn status_apply_cost_on_a_big_pool() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200);
    for n in [10usize, 100, 1_000] {
        let (sim, client) = common::sim_with_crd().await;
        big_pool(&sim, &client, n).await;
        let pools = common::pools(&client, "default");
        // One watcher of the pool type, reading every event (the operator's watch).
        let watch = {
            let http = reqwest::Client::new();
            let url = format!(
                "{}/apis/tether.dev/v1alpha1/connectionpools?watch=true&resourceVersion={}",
                sim.url(),
                sim.store().resource_version()
            );
            let mut resp = http.get(url).send().await.unwrap();
            tokio::spawn(async move {
                let mut bytes = 0usize;
                while let Ok(Some(chunk)) = resp.chunk().await {
                    bytes += chunk.len();
                }
                bytes
            })
        };
        let apply = |i: usize| {
            let pools = pools.clone();
            async move {
                let params = PatchParams::apply(&format!("pod-{}", i % n)).force();
                pools
                    // A count the entry never had: every report changes the pool (a
                    // no-op apply would skip the store's write, its event and the watch).
                    .patch_status("big", &params, &Patch::Apply(report(i % n, n + i)))
                    .await
                    .unwrap();
            }
        };
        let size = serde_json::to_vec(&pools.get("big").await.unwrap())
            .unwrap()
            .len();
        let started = Instant::now();
        for i in 0..rounds {
            apply(i).await;
        }
        let per_apply = started.elapsed() / rounds as u32;
        watch.abort();
        println!(
            "pool with {n:>5} entries ({size:>7} bytes): status apply {per_apply:>10.2?} per report"
        );
    }
}

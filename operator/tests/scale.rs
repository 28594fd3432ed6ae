//! Figures, not a test: 100 pools against the stand-in, reconcile latency quantiles and
//! the operator process's memory. Run with
//! `cargo test -p tether-operator --release --test scale -- --ignored --nocapture`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_operator::metrics::quantile;

const POOLS: usize = 100;

async fn create_pools(client: &kube::Client) {
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    for i in 0..POOLS {
        pools
            .create(
                &PostParams::default(),
                &pool(&format!("pool-{i:03}"), json!({})),
            )
            .await
            .unwrap();
    }
}

/// Waits until every pool has a status for its current generation.
async fn await_all_reconciled(client: &kube::Client) -> Duration {
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    eventually("all pools reconciled", Duration::from_secs(120), || async {
        let list = pools.list(&ListParams::default()).await.unwrap();
        let done = list
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
            })
            .count();
        (done == POOLS).then_some(())
    })
    .await;
    started.elapsed()
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn hundred_pools_latency_and_memory() {
    // Latency: the operator in this process, so its raw durations can be read.
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("bench"));
    let started = Instant::now();
    create_pools(&client).await;
    let converged = await_all_reconciled(&client).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let durations = op.metrics.recent_durations();
    let q = |x| quantile(&durations, x).unwrap();
    println!(
        "in-process: {POOLS} pools, {} reconciles, {} errors; created+converged in {:?} (last status {:?} after the last create); reconcile p50 {:?} p90 {:?} p99 {:?} max {:?}",
        op.metrics.reconciles(),
        op.metrics.errors(),
        started.elapsed(),
        converged,
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0),
    );
    op.stop().await;

    // Memory: the real binary as its own process.
    let (sim, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-operator"))
        .args(["--admin-addr", "127.0.0.1:0", "--no-leader-election"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(child.id());
    create_pools(&client).await;
    await_all_reconciled(&client).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = rss_kib(child.id());
    println!(
        "operator process: RSS {} KiB idle, {} KiB with {POOLS} pools (peak {} KiB)",
        idle.0, loaded.0, loaded.1
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The stand-in's own cost per request, to read the figures above against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn stand_in_request_cost() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let (_sim, client) = cluster().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    for objects in [0usize, 1000] {
        for i in 0..objects {
            let cm: ConfigMap = serde_json::from_value(
                json!({"metadata": {"name": format!("filler-{objects}-{i}")}, "data": {"k": "v"}}),
            )
            .unwrap();
            cms.create(&PostParams::default(), &cm).await.unwrap();
        }
        let started = Instant::now();
        for i in 0..200 {
            let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("ssa-{objects}-{}", i % 20)}, "data": {"i": i.to_string()}});
            cms.patch(
                &format!("ssa-{objects}-{}", i % 20),
                &PatchParams::apply("bench").force(),
                &Patch::Apply(cm),
            )
            .await
            .unwrap();
        }
        let apply = started.elapsed() / 200;
        let started = Instant::now();
        for i in 0..200 {
            cms.get(&format!("ssa-{objects}-{}", i % 20)).await.unwrap();
        }
        println!(
            "stand-in with {objects} extra objects: SSA apply {apply:?}, get {:?} per request",
            started.elapsed() / 200
        );
    }
}

/// Cost of each kind of call one reconcile makes, with 100 reconciled pools around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn stand_in_cost_per_call_with_100_pools() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams};
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("bench"));
    create_pools(&client).await;
    await_all_reconciled(&client).await;
    let settled = op.metrics.reconciles();
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "reconciles in 3 s after convergence: {}",
        op.metrics.reconciles() - settled
    );
    drop(op);
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    let sts = stss.get("pool-000").await.unwrap();
    let mut body = serde_json::to_value(&sts).unwrap();
    body["metadata"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| ["name", "namespace", "labels", "ownerReferences"].contains(&k.as_str()));
    body.as_object_mut().unwrap().remove("status");
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        secrets.get("acme-jwt").await.unwrap();
    }
    println!("get secret: {:?}", t.elapsed() / n);
    let t = Instant::now();
    for _ in 0..n {
        stss.patch(
            "pool-000",
            &PatchParams::apply("tether-operator").force(),
            &Patch::Apply(&body),
        )
        .await
        .unwrap();
    }
    println!("SSA statefulset (no-op): {:?}", t.elapsed() / n);
    let status = json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool", "metadata": {"name": "pool-000"}, "status": {"replicas": 0}});
    let t = Instant::now();
    for _ in 0..n {
        pools
            .patch_status(
                "pool-000",
                &PatchParams::apply("bench-status").force(),
                &Patch::Apply(&status),
            )
            .await
            .unwrap();
    }
    println!("SSA pool status: {:?}", t.elapsed() / n);
    let rv = |p: ConnectionPool| p.metadata.resource_version.unwrap();
    let before = rv(pools.get("pool-000").await.unwrap());
    pools
        .patch_status(
            "pool-000",
            &PatchParams::apply("bench-status").force(),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();
    println!(
        "no-op status apply changes resourceVersion: {}",
        before != rv(pools.get("pool-000").await.unwrap())
    );
}

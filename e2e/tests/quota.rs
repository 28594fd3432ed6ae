//! A namespace's ResourceQuota against the gateway pods, with the stand-in's quota
//! admission and the kubelet's StatefulSet controller: the pods carry default requests
//! (so a compute quota admits them at all), a pod the quota refuses shows on the pool
//! as `PodsCreatable` False / `FailedCreate` with the API server's message and a Warning
//! Event, and once the quota is raised the pod is created and the condition turns True.
//!
//! Needs the binaries: `cargo build -p tether-gateway -p tether-operator` first.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod, ResourceQuota};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::{CONDITION_PODS_CREATABLE, ConnectionPool};
use tether_e2e::*;

const PATIENCE: Duration = Duration::from_secs(60);

fn pods_creatable(pool: &ConnectionPool) -> Option<(String, String, String)> {
    let c = pool
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_PODS_CREATABLE)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_refused_by_a_resource_quota_shows_on_the_pool_until_the_quota_allows_it()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    // Room for one gateway pod's default requests (500m CPU, 108Mi), not for two.
    let quotas: Api<ResourceQuota> = Api::namespaced(cluster.client.clone(), NS);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "compute", "namespace": NS},
        "spec": {"hard": {"requests.cpu": "700m", "requests.memory": "1Gi", "pods": "10"}},
    }))?;
    quotas.create(&PostParams::default(), &quota).await?;
    cluster
        .create_pool(
            "q",
            json!({"replicas": {"min": 2, "max": 2}, "reportIntervalSeconds": 1}),
        )
        .await?;
    let mut operator = cluster.start_operator().await?;
    let kubelet = Kubelet::start(&cluster, "q")?;
    let result = async {
        let pools = cluster.pools();
        let (_, _, message) = eventually("PodsCreatable False", PATIENCE, || async {
            let c = pods_creatable(&pools.get("q").await.ok()?)?;
            (c.0 == "False").then_some(c)
        })
        .await?;
        let pool = pools.get("q").await?;
        let (status, reason, _) = pods_creatable(&pool).expect("condition");
        anyhow::ensure!(status == "False" && reason == "FailedCreate", "{status} {reason}");
        anyhow::ensure!(
            message.starts_with("create Pod q-1 in StatefulSet q failed error: pods \"q-1\" is forbidden: exceeded quota: compute, requested: requests.cpu=500m, used: requests.cpu=500m, limited: requests.cpu=700m"),
            "the API server's refusal, as the StatefulSet controller reports it: {message}"
        );
        // The first pod was admitted (its default requests fit) and runs.
        let pod_api: Api<Pod> = Api::namespaced(cluster.client.clone(), NS);
        anyhow::ensure!(pod_api.get_opt("q-0").await?.is_some(), "q-0 exists");
        anyhow::ensure!(pod_api.get_opt("q-1").await?.is_none(), "q-1 was refused");
        // And `kubectl describe connectionpool q` shows it as a Warning Event.
        let events: Api<Event> = Api::namespaced(cluster.client.clone(), NS);
        eventually("a FailedCreate Event on the pool", PATIENCE, || async {
            let list = events
                .list(&ListParams::default().fields("involvedObject.kind=ConnectionPool,involvedObject.name=q"))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("FailedCreate") && e.type_.as_deref() == Some("Warning"))
                .then_some(())
        })
        .await?;

        // More room: the StatefulSet controller's retry creates the pod, and the
        // condition turns True.
        quotas
            .patch(
                "compute",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"hard": {"requests.cpu": "2"}}})),
            )
            .await?;
        eventually("PodsCreatable True", PATIENCE, || async {
            let c = pods_creatable(&pools.get("q").await.ok()?)?;
            (c.0 == "True" && c.1 == "Created").then_some(())
        })
        .await?;
        anyhow::ensure!(pod_api.get_opt("q-1").await?.is_some(), "q-1 exists");
        Ok(())
    }
    .await;
    kubelet.shutdown().await;
    operator.kill().await.ok();
    if result.is_err() {
        eprintln!(
            "operator log:\n{}",
            std::fs::read_to_string(cluster.operator_log()).unwrap_or_default()
        );
    }
    result
}

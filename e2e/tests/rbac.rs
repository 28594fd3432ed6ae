//! Least privilege, against the stand-in's RBAC: the operator runs as the chart's
//! service account with the chart's rules (`tether.poolRules`), and reconciles two pools
//! without a single 403; a gateway's token (the pool's service account, bound by the
//! operator-made Role) may report its own pool's status and read its own Pod, and
//! nothing else; the operator may not do what the chart does not grant.
//!
//! Needs the binaries: `cargo build -p tether-gateway -p tether-operator` first.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_e2e::*;

const PATIENCE: Duration = Duration::from_secs(60);

/// The code and message of an API error (panics on success or another error).
fn refused<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_gateway_tokens_hold_exactly_what_they_need() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    for pool in ["a", "b"] {
        cluster
            .create_pool(pool, json!({"replicas": {"min": 1, "max": 2}}))
            .await?;
    }
    let mut operator = cluster.start_operator()?;
    let result = async {
        // The operator converges both pools as the chart's service account: every child,
        // the gateways' Role included (which it may grant only because it holds it).
        let roles: Api<Role> = Api::namespaced(cluster.client.clone(), NS);
        eventually("both pools reconciled", PATIENCE, || async {
            let a = cluster.pools().get("a").await.ok()?;
            let b = cluster.pools().get("b").await.ok()?;
            let done = |p: &ConnectionPool| {
                p.status
                    .as_ref()
                    .and_then(|s| s.observed_generation)
                    .is_some()
            };
            (done(&a) && done(&b) && roles.get_opt("b-gateway").await.ok()??.rules.is_some())
                .then_some(())
        })
        .await?;
        let stats = cluster.sim.stats().snapshot();
        let forbidden = stats.count(|k| k.code == 403);
        anyhow::ensure!(
            forbidden == 0,
            "the chart's rules refused the operator {forbidden} time(s): {:?}",
            stats
                .requests
                .iter()
                .filter(|r| r.key.code == 403)
                .collect::<Vec<_>>()
        );

        // Pool a's gateway: its token is the pool's service account's.
        let token = request_token(&cluster.client, NS, "a-gateway").await?;
        let gw = cluster.sim.client_with_token(&token)?;
        let pools: Api<ConnectionPool> = Api::namespaced(gw.clone(), NS);
        let report = |pool: &str| {
            json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
                   "metadata": {"name": pool, "namespace": NS},
                   "status": {"pods": [{"name": format!("{pool}-0"), "connections": 1, "ready": true,
                       "draining": false, "observedAt": "2026-01-01T00:00:00Z", "bootId": "x"}]}})
        };
        let ssa = PatchParams::apply("a-0");
        pools
            .patch_status("a", &ssa, &Patch::Apply(report("a")))
            .await?;
        let (code, message) = refused(
            pools
                .patch_status("b", &ssa, &Patch::Apply(report("b")))
                .await,
        );
        anyhow::ensure!(code == 403, "another pool's status: {code} {message}");
        anyhow::ensure!(
            message
                == format!(
                    "connectionpools.tether.dev \"b\" is forbidden: User \"system:serviceaccount:{NS}:a-gateway\" cannot patch resource \"connectionpools/status\" in API group \"tether.dev\" in the namespace \"{NS}\""
                ),
            "{message}"
        );
        let (code, _) = refused(
            pools
                .patch("a", &PatchParams::default(), &Patch::Merge(json!({"spec": {"tenant": "x"}})))
                .await,
        );
        anyhow::ensure!(code == 403, "its own pool's spec: {code}");
        let (code, _) = refused(Api::<Secret>::namespaced(gw.clone(), NS).get("jwt").await);
        anyhow::ensure!(code == 403, "a Secret: {code}");
        let own_pods: Api<Pod> = Api::namespaced(gw.clone(), NS);
        let (code, _) = refused(own_pods.list(&ListParams::default()).await);
        anyhow::ensure!(code == 403, "every Pod: {code}");
        let (code, _) = refused(own_pods.get("b-0").await);
        anyhow::ensure!(code == 403, "another pool's Pod: {code}");
        // Its own Pod, by name (404 as there is none: allowed to look).
        let (code, _) = refused(own_pods.get("a-0").await);
        anyhow::ensure!(code == 404, "its own Pod: {code}");

        // The operator may not do what the chart does not grant.
        let op_token = request_token(&cluster.client, OPERATOR_SA.0, OPERATOR_SA.1).await?;
        let op = cluster.sim.client_with_token(&op_token)?;
        let (code, _) = refused(Api::<Secret>::namespaced(op.clone(), NS).list(&ListParams::default()).await);
        anyhow::ensure!(code == 403, "listing Secrets: {code}");
        let (code, _) = refused(Api::<ConnectionPool>::namespaced(op.clone(), NS).delete("a", &DeleteParams::default()).await);
        anyhow::ensure!(code == 403, "deleting a pool: {code}");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}))?;
        let (code, _) = refused(Api::<Pod>::namespaced(op.clone(), NS).create(&PostParams::default(), &pod).await);
        anyhow::ensure!(code == 403, "creating a Pod: {code}");
        let (code, _) = refused(Api::<ConfigMap>::namespaced(op.clone(), "default").list(&ListParams::default()).await);
        anyhow::ensure!(code == 403, "outside its namespace: {code}");
        Ok(())
    }
    .await;
    operator.kill().await.ok();
    if result.is_err() {
        eprintln!(
            "operator log:\n{}",
            std::fs::read_to_string(cluster.operator_log()).unwrap_or_default()
        );
    }
    result
}

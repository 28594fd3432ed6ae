//! A rollout against the API stand-in, the test playing the StatefulSet controller and
//! the gateways: the operator deletes a drained pod only if it is still the pod it
//! drained (a UID precondition), never the successor that took its name.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_kube_sim::{FaultMatch, FaultRule};
use tether_operator::autoscale::is_rollout;
use tether_operator::controller::REVISION_LABEL;

const POOL: &str = "acme";
/// Long enough for the test to replace the pod while the operator's delete waits; the
/// test never waits for it to pass, only for what follows the delete.
const DELETE_HELD: Duration = Duration::from_secs(5);
const PATIENCE: Duration = Duration::from_secs(20);

fn api<K>(client: &Client) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(client.clone(), NS)
}

/// Creates gateway pod `ordinal` at `revision`, Ready, as the StatefulSet controller and
/// the kubelet would; returns its UID.
async fn create_pod(client: &Client, ordinal: i32, revision: &str) -> String {
    let name = format!("{POOL}-{ordinal}");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "app.kubernetes.io/name": "tether-gateway", "tether.dev/pool": POOL,
            REVISION_LABEL: revision,
        }},
        "spec": {"containers": [{"name": "gateway", "image": "registry.test/tether-gateway:test"}]},
    }))
    .unwrap();
    let created = api::<Pod>(client)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    api::<Pod>(client)
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .unwrap();
    created.uid().unwrap()
}

/// Pod `ordinal`'s report, under its own field manager as the gateway writes it.
async fn report(client: &Client, ordinal: i32, draining: bool, instruction: Option<&str>) {
    let name = format!("{POOL}-{ordinal}");
    let entry = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": POOL},
        "status": {"pods": [{"name": name, "connections": 0, "ready": !draining,
                             "draining": draining, "bootId": format!("boot-{ordinal}"),
                             "instruction": instruction,
                             "observedAt": k8s_openapi::jiff::Timestamp::now().to_string()}]},
    });
    api::<ConnectionPool>(client)
        .patch_status(
            POOL,
            &PatchParams::apply(&format!("tether-gateway/{name}")),
            &Patch::Apply(entry),
        )
        .await
        .unwrap();
}

/// The id of the rollout drain the pool's status holds for `pod`, if any.
fn rollout_drain(pool: &ConnectionPool, pod: &str) -> Option<String> {
    pool.status
        .as_ref()?
        .instructions
        .iter()
        .find(|i| i.pod == pod && is_rollout(i))
        .map(|i| i.id.clone())
}

/// The rollout drains `acme-1` and deletes it once drained, by the UID of the pod it
/// drained. Its delete is held by the stand-in (a latency fault on that one request)
/// while the test replaces the pod, as a delete by an earlier step or a list older than
/// the API's state would leave it: the delete is refused (409) and the successor stays.
/// Without the precondition the operator deletes the successor.
#[tokio::test]
async fn a_rollout_never_deletes_the_successor_of_a_drained_pod() {
    let (sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-rollout"));
    let spec = json!({
        "replicas": {"min": 2, "max": 2},
        "routing": {"nats": {"url": "nats://bus:4222"}},
        "rollout": {"maxUnavailable": 1},
        "reportIntervalSeconds": 1,
    });
    api::<ConnectionPool>(&client)
        .create(&PostParams::default(), &pool(POOL, spec))
        .await
        .unwrap();
    let sts = eventually("the StatefulSet", PATIENCE, || async {
        api::<StatefulSet>(&client).get_opt(POOL).await.unwrap()
    })
    .await;

    // Two pods at revision r1 while the StatefulSet's update revision is r2: a rollout.
    create_pod(&client, 0, "r1").await;
    let drained_uid = create_pod(&client, 1, "r1").await;
    api::<StatefulSet>(&client)
        .patch_status(
            POOL,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "replicas": 2, "readyReplicas": 2, "updatedReplicas": 0, "availableReplicas": 2,
                "observedGeneration": sts.metadata.generation,
                "currentRevision": "r1", "updateRevision": "r2",
            }})),
        )
        .await
        .unwrap();
    report(&client, 0, false, None).await;
    report(&client, 1, false, None).await;

    // The first batch: the highest ordinal.
    let id = eventually("a rollout drain on acme-1", PATIENCE, || async {
        let pool = api::<ConnectionPool>(&client).get(POOL).await.unwrap();
        rollout_drain(&pool, "acme-1")
    })
    .await;

    // Hold the operator's delete of acme-1, then report it drained.
    sim.faults().add(FaultRule {
        matches: FaultMatch::verb("delete").on("pods").named("acme-1"),
        count: Some(1),
        delay_ms: Some(DELETE_HELD.as_millis() as u64),
        ..FaultRule::default()
    });
    report(&client, 1, true, Some(&id)).await;
    eventually("the operator's delete of acme-1 held", PATIENCE, || async {
        sim.faults().rules().is_empty().then_some(())
    })
    .await;

    // Meanwhile acme-1 is replaced by its successor at the new revision.
    api::<Pod>(&client)
        .delete("acme-1", &DeleteParams::default())
        .await
        .unwrap();
    let successor_uid = create_pod(&client, 1, "r2").await;
    assert_ne!(successor_uid, drained_uid);

    // The delete has been answered once the drain it ends leaves the record.
    eventually("the drain of acme-1 withdrawn", PATIENCE, || async {
        let pool = api::<ConnectionPool>(&client).get(POOL).await.unwrap();
        rollout_drain(&pool, "acme-1").is_none().then_some(())
    })
    .await;
    let pod = api::<Pod>(&client).get_opt("acme-1").await.unwrap();
    assert_eq!(
        pod.as_ref().and_then(|p| p.uid()),
        Some(successor_uid),
        "the successor of the drained pod was deleted"
    );
    assert!(pod.unwrap().metadata.deletion_timestamp.is_none());
    op.stop().await;
}

//! The managed NATS as a child that may fail on its own, against the stand-in (which
//! refuses changes to a StatefulSet's immutable fields with 422, as a real API server):
//! a `delivery.storage` change re-creates the NATS StatefulSet (pods and volumes kept)
//! and grows existing volumes in place; a NATS apply that keeps failing is a condition
//! and an Event while the gateways are applied and scaled as usual.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_kube_sim::FaultMatch;
use tether_kube_sim::faults::FaultRule;

const PATIENCE: Duration = Duration::from_secs(20);

fn api<K>(client: &Client) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(client.clone(), NS)
}

fn managed(extra: serde_json::Value) -> ConnectionPool {
    let mut spec = json!({
        "replicas": {"min": 1, "max": 4},
        "routing": {"nats": {"managed": true}},
    });
    tether_test_support::json::merge(&mut spec, extra);
    pool("acme", spec)
}

/// The condition `type_` of the pool, once it is (status, reason) = `want`.
async fn await_condition(client: &Client, type_: &str, want: (&str, &str)) -> ConnectionPool {
    let what = format!("{type_} = {want:?}");
    eventually(&what, PATIENCE, || async {
        let p = api::<ConnectionPool>(client).get("acme").await.unwrap();
        let (status, reason) = condition(&p, type_)?;
        (status == want.0 && reason == want.1).then_some(p)
    })
    .await
}

/// The NATS StatefulSet once it asks `storage` of its `data` claims (`None`: none).
async fn await_nats_storage(client: &Client, storage: Option<&str>) -> StatefulSet {
    let what = format!("acme-nats with storage {storage:?}");
    eventually(&what, PATIENCE, || async {
        let sts = api::<StatefulSet>(client)
            .get_opt("acme-nats")
            .await
            .unwrap()?;
        let asked = sts
            .spec
            .as_ref()?
            .volume_claim_templates
            .as_ref()
            .and_then(|t| t.first())
            .and_then(|c| c.spec.as_ref()?.resources.as_ref()?.requests.as_ref())
            .map(|r| r["storage"].0.clone());
        (asked.as_deref() == storage).then_some(sts)
    })
    .await
}

async fn set_storage(client: &Client, storage: &str) {
    api::<ConnectionPool>(client)
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"delivery": {"storage": storage}}})),
        )
        .await
        .unwrap();
}

async fn claim_size(client: &Client, name: &str) -> String {
    let claim = api::<PersistentVolumeClaim>(client)
        .get(name)
        .await
        .unwrap();
    claim.spec.unwrap().resources.unwrap().requests.unwrap()["storage"]
        .0
        .clone()
}

async fn events(client: &Client, reason: &str) -> Vec<Event> {
    api::<Event>(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

#[tokio::test]
async fn a_storage_change_re_creates_the_nats_statefulset_and_grows_its_volumes() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    api::<ConnectionPool>(&client)
        .create(&PostParams::default(), &managed(json!({"delivery": {}})))
        .await
        .unwrap();
    let first = await_nats_storage(&client, None).await;
    await_condition(&client, "NatsApplied", ("True", "Applied")).await;

    // Adding storage changes the claim templates, which the API server refuses to
    // update (the stand-in too): the operator re-creates the StatefulSet instead.
    set_storage(&client, "1Gi").await;
    let second = await_nats_storage(&client, Some("1Gi")).await;
    assert_ne!(first.uid(), second.uid(), "a new StatefulSet");
    let p = await_condition(&client, "NatsApplied", ("True", "Applied")).await;
    assert_eq!(condition(&p, "Degraded").unwrap().0, "False");
    assert!(
        !events(&client, "NatsRecreating").await.is_empty(),
        "the re-create is an Event"
    );

    // The claim the StatefulSet controller made for pod 0 (the stand-in runs no
    // controllers) survives the next re-create and grows in place.
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data-acme-nats-0", "labels": {"app.kubernetes.io/name": "tether-nats"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap();
    api::<PersistentVolumeClaim>(&client)
        .create(&PostParams::default(), &claim)
        .await
        .unwrap();
    set_storage(&client, "2Gi").await;
    let third = await_nats_storage(&client, Some("2Gi")).await;
    assert_ne!(second.uid(), third.uid());
    eventually("the claim grew", PATIENCE, || async {
        (claim_size(&client, "data-acme-nats-0").await == "2Gi").then_some(())
    })
    .await;
    await_condition(&client, "NatsApplied", ("True", "Applied")).await;

    // A claim never shrinks: the API server's refusal is the condition, with the claim.
    set_storage(&client, "1Gi").await;
    let p = await_condition(&client, "NatsApplied", ("False", "NatsVolumeResizeFailed")).await;
    let message = p
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "NatsApplied")
        .unwrap()
        .message;
    assert!(message.contains("data-acme-nats-0"), "{message}");
    assert_eq!(claim_size(&client, "data-acme-nats-0").await, "2Gi");
    // The gateways are untouched by all of it.
    let p = api::<ConnectionPool>(&client).get("acme").await.unwrap();
    assert_eq!(condition(&p, "Degraded").unwrap().0, "False");
    op.stop().await;
}

#[tokio::test]
async fn a_failing_nats_apply_never_stops_the_gateways_or_scaling() {
    let (sim, client) = cluster().await;
    // Every write of the NATS StatefulSet fails, for as long as the test runs.
    sim.faults().add(FaultRule {
        matches: FaultMatch::verb("patch")
            .on("statefulsets")
            .named("acme-nats"),
        status: Some(500),
        ..Default::default()
    });
    let op = Operator::start(&client, args("op-a"));
    api::<ConnectionPool>(&client)
        .create(&PostParams::default(), &managed(json!({})))
        .await
        .unwrap();

    // The gateways' StatefulSet is applied all the same, and the pool says what is wrong.
    let sts = eventually("the gateway StatefulSet", PATIENCE, || async {
        api::<StatefulSet>(&client).get_opt("acme").await.unwrap()
    })
    .await;
    await_condition(&client, "NatsApplied", ("False", "NatsApplyFailed")).await;
    assert!(
        api::<StatefulSet>(&client)
            .get_opt("acme-nats")
            .await
            .unwrap()
            .is_none()
    );
    eventually("a Warning Event", PATIENCE, || async {
        let found = events(&client, "NatsApplyFailed").await;
        found
            .iter()
            .any(|e| e.type_.as_deref() == Some("Warning"))
            .then_some(())
    })
    .await;
    let p = api::<ConnectionPool>(&client).get("acme").await.unwrap();
    assert_eq!(
        condition(&p, "Degraded").unwrap().0,
        "False",
        "a NATS failure does not degrade the gateways"
    );

    // The autoscaler reads the pod's report all the same (a scale-up under a failing
    // NATS is not asserted here: see the report), and the pod's lost bus is a condition.
    api::<StatefulSet>(&client)
        .patch_status(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1,
                "observedGeneration": sts.metadata.generation, "currentRevision": "r1", "updateRevision": "r1",
            }})),
        )
        .await
        .unwrap();
    let report = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": "acme"},
        "status": {"pods": [{"name": "acme-0", "connections": 2500, "ready": true,
                             "draining": false, "bootId": "b1", "busConnected": false,
                             "observedAt": k8s_openapi::jiff::Timestamp::now().to_string()}]},
    });
    api::<ConnectionPool>(&client)
        .patch_status(
            "acme",
            &PatchParams::apply("tether-gateway-acme-0"),
            &Patch::Apply(report),
        )
        .await
        .unwrap();
    // The pod's report of a lost bus is the pool's BusAvailable condition.
    let p = await_condition(&client, "BusAvailable", ("False", "PodsDisconnected")).await;
    let bus = p
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "BusAvailable")
        .unwrap();
    assert!(bus.message.starts_with("1 of 1 "), "{}", bus.message);

    // Once NATS can be written again, it is applied without a spec change.
    sim.faults().clear();
    await_condition(&client, "NatsApplied", ("True", "Applied")).await;
    assert!(
        api::<StatefulSet>(&client)
            .get_opt("acme-nats")
            .await
            .unwrap()
            .is_some()
    );
    op.stop().await;
}

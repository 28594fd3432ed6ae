//! Scaling Events tell the truth: every decision is its own Event with its own note, so
//! `kubectl describe cpool` shows `1 → 2` and then `2 → 4`, never the first note with a
//! growing count (what kube's `Recorder` series would show). Against the stand-in.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;

/// Pod `acme-0` reports `connections`, dated now, under its own field manager.
async fn report(client: &Client, connections: i64) {
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    let entry = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": "acme"},
        "status": {"pods": [{"name": "acme-0", "connections": connections, "ready": true,
                             "draining": false, "bootId": "b1",
                             "observedAt": k8s_openapi::jiff::Timestamp::now().to_string()}]},
    });
    pools
        .patch_status(
            "acme",
            &PatchParams::apply("tether-gateway/acme-0"),
            &Patch::Apply(entry),
        )
        .await
        .unwrap();
}

/// The notes of the pool's `ScaledUp` Events, oldest first, with each Event's series
/// count (`None`: a single occurrence).
async fn scaled_up(client: &Client) -> Vec<(String, Option<i32>)> {
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let mut list: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ScaledUp"))
        .collect();
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list.into_iter()
        .map(|e| (e.note.unwrap_or_default(), e.series.map(|s| s.count)))
        .collect()
}

#[tokio::test]
async fn two_scale_ups_show_two_events_each_with_its_own_note() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("events"));
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    let spec = json!({
        "replicas": {"min": 1, "max": 8},
        "routing": {"nats": {"url": "nats://bus:4222"}},
        "scaling": {"targetConnectionsPerPod": 100, "scaleUp": {"maxPodsPerStep": 4, "periodSeconds": 1}},
    });
    pools
        .create(&PostParams::default(), &pool("acme", spec))
        .await
        .unwrap();
    eventually("the pool reconciled", Duration::from_secs(30), || async {
        let p = pools.get("acme").await.ok()?;
        (p.status?.observed_generation == p.metadata.generation).then_some(())
    })
    .await;

    report(&client, 150).await;
    let first = eventually("the first ScaledUp", Duration::from_secs(30), || async {
        let notes = scaled_up(&client).await;
        (notes.len() == 1).then_some(notes)
    })
    .await;
    assert!(
        first[0].0.starts_with("1 → 2 pods: 150 connections"),
        "{first:?}"
    );

    report(&client, 350).await;
    let both = eventually("the second ScaledUp", Duration::from_secs(30), || async {
        let notes = scaled_up(&client).await;
        (notes.len() >= 2).then_some(notes)
    })
    .await;
    assert_eq!(both.len(), 2, "one Event per decision: {both:?}");
    assert_eq!(both[0], first[0], "the first Event is left as it was");
    assert!(
        both[1].0.starts_with("2 → 4 pods: 350 connections"),
        "the second decision's own note: {both:?}"
    );
    assert!(
        both.iter().all(|(_, series)| series.is_none()),
        "no series folds one decision into another: {both:?}"
    );
    op.stop().await;
}

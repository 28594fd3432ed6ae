//! Pinning a pool's gateway image (docs/upgrading.md): a pool that sets
//! `spec.template.image` keeps its gateways when the operator is upgraded to a new
//! default image; a pool without it follows the new default. Pinning to the image a
//! pool already runs changes nothing in its StatefulSet, so it restarts no pod. With
//! `--pin-gateway-images` the upgraded operator writes those pins itself.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;

const OLD: &str = "registry.test/tether-gateway:1.0.0";
const NEW: &str = "registry.test/tether-gateway:1.1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn operator_with_default_image(identity: &str, image: &str) -> tether_operator::app::Args {
    let mut args = args(identity);
    args.gateway_image = Some(image.into());
    args
}

/// The StatefulSet `name` once its gateway container runs `image`.
async fn sts_with_image(client: &Client, name: &str, image: &str) -> StatefulSet {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    eventually(
        &format!("StatefulSet {name} with {image}"),
        Duration::from_secs(15),
        || async {
            let sts = api.get_opt(name).await.ok()??;
            (gateway_image(&sts) == image).then_some(sts)
        },
    )
    .await
}

fn gateway_image(sts: &StatefulSet) -> String {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_pinned_pool_keeps_its_image_across_an_operator_upgrade() {
    let (_sim, client) = cluster().await;
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    let op = Operator::start(&client, operator_with_default_image("op-old", OLD));
    for name in ["pinned", "follows"] {
        pools
            .create(&PostParams::default(), &pool(name, json!({})))
            .await
            .unwrap();
    }
    let before = sts_with_image(&client, "pinned", OLD).await;
    let follows_before = sts_with_image(&client, "follows", OLD).await;

    // Pin to the image it runs: the operator sees the change and renders the same
    // StatefulSet, so nothing rolls.
    pools
        .patch(
            "pinned",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"image": OLD}}})),
        )
        .await
        .unwrap();
    eventually("the pin observed", Duration::from_secs(15), || async {
        let p = pools.get("pinned").await.ok()?;
        (p.status?.observed_generation? == p.metadata.generation?).then_some(())
    })
    .await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let pinned = sts.get("pinned").await.unwrap();
    assert_eq!(
        pinned.metadata.generation, before.metadata.generation,
        "pinning to the running image does not change the pod template"
    );
    op.stop().await;

    // The upgraded operator has a new default image.
    let op = Operator::start(&client, operator_with_default_image("op-new", NEW));
    let follows = sts_with_image(&client, "follows", NEW).await;
    assert!(
        follows.metadata.generation > follows_before.metadata.generation,
        "a template change is a new generation (the control for the checks below)"
    );
    let pinned = sts.get("pinned").await.unwrap();
    assert_eq!(
        gateway_image(&pinned),
        OLD,
        "the pinned pool keeps its image"
    );
    assert_eq!(
        pinned.metadata.generation, before.metadata.generation,
        "the pinned pool's StatefulSet is not rolled"
    );

    // Opting in, one pool at a time: the pool moves when its own image changes.
    pools
        .patch(
            "pinned",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"image": NEW}}})),
        )
        .await
        .unwrap();
    sts_with_image(&client, "pinned", NEW).await;
    op.stop().await;
}

#[tokio::test]
async fn pin_gateway_images_keeps_every_running_pool_on_its_image_across_an_upgrade() {
    let (_sim, client) = cluster().await;
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    let op = Operator::start(&client, operator_with_default_image("op-old", OLD));
    pools
        .create(&PostParams::default(), &pool("running", json!({})))
        .await
        .unwrap();
    let before = sts_with_image(&client, "running", OLD).await;
    op.stop().await;

    // The upgraded operator, with a new default and the flag: it pins the pool to the
    // image its StatefulSet runs before its controller renders anything.
    let mut args = operator_with_default_image("op-new", NEW);
    args.pin_gateway_images = true;
    let op = Operator::start(&client, args);
    let pinned = eventually(
        "the pool pinned and observed",
        Duration::from_secs(15),
        || async {
            let p = pools.get("running").await.ok()?;
            let observed = p.status.as_ref()?.observed_generation? == p.metadata.generation?;
            (observed && p.spec.template.image.as_deref() == Some(OLD)).then_some(p)
        },
    )
    .await;
    assert_eq!(pinned.spec.template.image.as_deref(), Some(OLD));
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let after = sts.get("running").await.unwrap();
    assert_eq!(
        gateway_image(&after),
        OLD,
        "the running pool keeps its image"
    );
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "its StatefulSet is not rolled"
    );

    // A pool created under the new operator runs the new default.
    pools
        .create(&PostParams::default(), &pool("new", json!({})))
        .await
        .unwrap();
    sts_with_image(&client, "new", NEW).await;
    op.stop().await;
}

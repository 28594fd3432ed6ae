//! Pinning pools to the gateway image they run (`--pin-gateway-images`), so that an
//! operator upgrade with a new default image restarts no pool; each pool then moves
//! when its own `spec.template.image` is changed (opt-in rolling, docs/upgrading.md).
//!
//! The leader runs [`pin_running_images`] at the start of each term, before its
//! controller renders anything: a pool without `spec.template.image` whose StatefulSet
//! exists gets that StatefulSet's gateway image written into its spec. The rendered
//! pod template is then the one already running, so nothing rolls. A pool with no
//! StatefulSet yet runs nothing to keep and takes the default.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tether_crds::ConnectionPool;
use tracing::{info, warn};

use crate::resources::{GATEWAY_CONTAINER, base_name};

/// The image of the gateway container in a StatefulSet's pod template.
pub fn running_gateway_image(sts: &StatefulSet) -> Option<&str> {
    sts.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == GATEWAY_CONTAINER)?
        .image
        .as_deref()
}

/// The image to pin `pool` to: what it runs, when it follows the default image.
pub fn pin_for(pool: &ConnectionPool, running: Option<&str>) -> Option<String> {
    if pool.spec.template.image.is_some() {
        return None;
    }
    running.filter(|image| !image.is_empty()).map(str::to_owned)
}

/// Pins every unpinned pool (in `namespace`, or all) to the image its StatefulSet
/// runs; returns how many were pinned.
pub async fn pin_running_images(
    client: &Client,
    namespace: Option<&str>,
) -> Result<usize, kube::Error> {
    let pools: Api<ConnectionPool> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut pinned = 0;
    for pool in pools.list(&ListParams::default()).await? {
        if pool.spec.template.image.is_some() {
            continue;
        }
        let ns = pool.namespace().unwrap_or_default();
        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
        let running = sts.get_opt(&base_name(&pool)).await?;
        let Some(image) = pin_for(&pool, running.as_ref().and_then(running_gateway_image)) else {
            continue;
        };
        Api::<ConnectionPool>::namespaced(client.clone(), &ns)
            .patch(
                &pool.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"template": {"image": image}}})),
            )
            .await?;
        info!(pool = %pool.name_any(), namespace = %ns, %image, "pinned to the gateway image it runs");
        pinned += 1;
    }
    Ok(pinned)
}

/// [`pin_running_images`] until it succeeds: the controller must not start before,
/// or it would roll the pools that were to be pinned.
pub async fn pin_running_images_retrying(client: &Client, namespace: Option<&str>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match pin_running_images(client, namespace).await {
            Ok(n) => {
                info!(pinned = n, "pools pinned to their running gateway images");
                return;
            }
            Err(e) => {
                warn!(%e, ?delay, "pinning pools to their running images failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(image: Option<&str>) -> ConnectionPool {
        let mut pool = crate::fixtures::pool("p");
        pool.spec.template.image = image.map(str::to_owned);
        pool
    }

    fn sts(containers: serde_json::Value) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {
                "selector": {},
                "serviceName": "p",
                "template": {"spec": {"containers": containers}},
            },
        }))
        .unwrap()
    }

    #[test]
    fn the_gateway_container_image_is_the_running_one() {
        let s = sts(json!([
            {"name": "sidecar", "image": "other:1"},
            {"name": GATEWAY_CONTAINER, "image": "gw:1"},
        ]));
        assert_eq!(running_gateway_image(&s), Some("gw:1"));
        assert_eq!(
            running_gateway_image(&sts(json!([{"name": "x", "image": "y"}]))),
            None
        );
    }

    #[test]
    fn only_unpinned_pools_that_run_something_are_pinned() {
        assert_eq!(pin_for(&pool(None), Some("gw:1")), Some("gw:1".into()));
        assert_eq!(pin_for(&pool(Some("gw:0")), Some("gw:1")), None);
        assert_eq!(pin_for(&pool(None), None), None);
        assert_eq!(pin_for(&pool(None), Some("")), None);
    }
}

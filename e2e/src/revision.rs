//! StatefulSet revisions as the real StatefulSet controller keeps them, shared by the
//! [`crate::Kubelet`] and the [`crate::podsim`] simulator:
//!
//! ```text
//!  spec.template ──hash──► revision "<sts>-<hash>" ──► ControllerRevision object
//!                                                 └──► label controller-revision-hash
//!                                                      on every Pod created from it
//!  status: updateRevision = the template's revision; updatedReplicas = pods labelled
//!          with it; currentRevision moves to it once every pod runs it (OnDelete and
//!          RollingUpdate alike), currentReplicas = pods at currentRevision
//! ```
//!
//! With `updateStrategy: OnDelete` a pod changes revision only when it is deleted (it is
//! recreated from the template then); with `RollingUpdate` the controller replaces the
//! old pods itself, highest ordinal first, one at a time once every pod is Ready.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// The label the StatefulSet controller puts on each pod: the revision it runs.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// The revision name of the StatefulSet's current template: `<name>-<hash>`, the hash
/// an FNV-1a of the template's JSON (the real controller hashes the template too, with
/// its own encoding; only equality matters).
pub fn update_revision(sts: &StatefulSet) -> String {
    let template = sts
        .spec
        .as_ref()
        .map(|s| serde_json::to_string(&s.template).unwrap_or_default())
        .unwrap_or_default();
    let mut hash: u32 = 0x811c_9dc5;
    for byte in template.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{}-{hash:08x}", sts.name_any())
}

/// Whether the StatefulSet replaces old pods only when they are deleted.
pub fn on_delete(sts: &StatefulSet) -> bool {
    sts.spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref())
        == Some("OnDelete")
}

/// Creates the ControllerRevision of `revision` (the template it was made from), owned
/// by the StatefulSet, unless it exists.
pub async fn record(client: &Client, sts: &StatefulSet, revision: &str) -> kube::Result<()> {
    let ns = sts.namespace().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &ns);
    let template = sts.spec.as_ref().map(|s| s.template.clone());
    let object: ControllerRevision = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ControllerRevision",
        "metadata": {
            "name": revision, "namespace": ns,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "StatefulSet", "controller": true,
                "name": sts.name_any(), "uid": sts.metadata.uid,
            }],
        },
        "data": {"spec": {"template": template}},
        "revision": sts.metadata.generation.unwrap_or(1),
    }))
    .map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The StatefulSet's status fields about revisions, from the revision each existing pod
/// runs. `current` is the revision the pods ran before (it moves to `update` once every
/// pod runs that).
pub fn status_fields(
    pods: &BTreeMap<i32, String>,
    replicas: i32,
    current: &str,
    update: &str,
) -> (serde_json::Value, String) {
    let updated = pods.values().filter(|r| *r == update).count() as i32;
    let current = if updated >= replicas && pods.len() as i32 >= replicas {
        update.to_string()
    } else {
        current.to_string()
    };
    let at_current = pods.values().filter(|r| **r == current).count() as i32;
    (
        json!({
            "currentRevision": current, "updateRevision": update,
            "currentReplicas": at_current, "updatedReplicas": updated,
        }),
        current,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(annotation: &str) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "demo"},
            "spec": {"selector": {}, "serviceName": "demo",
                     "template": {"metadata": {"annotations": {"a": annotation}}}},
        }))
        .unwrap()
    }

    #[test]
    fn the_revision_follows_the_template_only() {
        let a = sts("1");
        let mut replicas = a.clone();
        replicas.spec.as_mut().unwrap().replicas = Some(7);
        assert_eq!(update_revision(&a), update_revision(&replicas));
        assert_ne!(update_revision(&a), update_revision(&sts("2")));
        assert!(update_revision(&a).starts_with("demo-"));
    }

    #[test]
    fn current_revision_moves_once_every_pod_is_updated() {
        let pods: BTreeMap<i32, String> = [(0, "old".to_string()), (1, "new".to_string())].into();
        let (fields, current) = status_fields(&pods, 2, "old", "new");
        assert_eq!(current, "old");
        assert_eq!(fields["updatedReplicas"], 1);
        assert_eq!(fields["currentReplicas"], 1);
        let pods: BTreeMap<i32, String> = [(0, "new".to_string()), (1, "new".to_string())].into();
        let (fields, current) = status_fields(&pods, 2, "old", "new");
        assert_eq!(current, "new");
        assert_eq!(fields["currentReplicas"], 2);
    }
}

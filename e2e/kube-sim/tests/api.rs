//! Conformance: the REST semantics kube-rs relies on (CRUD, selectors, conflicts, status
//! and scale subresources, generation, validation, finalizers, garbage collection,
//! namespaces, pagination, discovery, faults), each as the real API server documents it.

#![recursion_limit = "256"]

mod common;

use std::collections::BTreeMap;

use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use kube::core::DynamicObject;
use serde_json::json;
use tether_kube_sim::{FaultMatch, Server};

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "data": {"k": "v"},
    }))
    .unwrap()
}

fn rv(o: &impl kube::Resource) -> u64 {
    o.meta()
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn crud_selectors_and_status_errors() {
    let sim = Server::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
    let a = cms
        .create(&PostParams::default(), &cm("a", &[("app", "web")]))
        .await
        .unwrap();
    let b = cms
        .create(&PostParams::default(), &cm("b", &[("app", "db")]))
        .await
        .unwrap();
    assert!(a.metadata.uid.is_some());
    assert!(a.metadata.creation_timestamp.is_some());
    assert!(rv(&b) > rv(&a), "one increasing resourceVersion counter");
    assert_eq!(a.metadata.generation, None, "ConfigMaps have no generation");

    let web = cms
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(web.items.len(), 1);
    assert!(
        web.metadata
            .resource_version
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= rv(&b)
    );
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(by_name.items[0].metadata.name.as_deref(), Some("b"));
    let set = cms
        .list(&ListParams::default().labels("app in (web,db),app!=db"))
        .await
        .unwrap();
    assert_eq!(set.items.len(), 1);

    // AlreadyExists (409) with a Status body kube-rs parses.
    let s = status_of(cms.create(&PostParams::default(), &cm("a", &[])).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(s.message, "configmaps \"a\" already exists");
    assert_eq!(s.details.unwrap().name, "a");

    // NotFound (404).
    let s = status_of(cms.get("zzz").await);
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));

    // PUT with a stale resourceVersion: 409 Conflict; with the current one: success.
    let mut stale = a.clone();
    stale.data = Some(BTreeMap::from([("k".into(), "v2".into())]));
    let fresh = cms
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap();
    assert!(rv(&fresh) > rv(&a));
    let s = status_of(cms.replace("a", &PostParams::default(), &stale).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert!(
        s.message.contains("the object has been modified"),
        "{}",
        s.message
    );

    // A merge patch carrying a stale resourceVersion is a precondition too.
    let s = status_of(
        cms.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": rv(&a).to_string()}, "data": {"x": "y"}}),
            ),
        )
        .await,
    );
    assert_eq!(s.code, 409);

    // JSON patch with a failing test op: 422, object unchanged.
    let jp: json_patch::Patch = serde_json::from_value(json!([{"op": "test", "path": "/data/k", "value": "nope"}, {"op": "remove", "path": "/data/k"}])).unwrap();
    let s = status_of(
        cms.patch("a", &PatchParams::default(), &Patch::<()>::Json(jp))
            .await,
    );
    assert_eq!(s.code, 422);
    assert_eq!(cms.get("a").await.unwrap().data.unwrap()["k"], "v2");

    // A no-op write does not bump the resourceVersion.
    let same = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "v2"}})),
        )
        .await
        .unwrap();
    assert_eq!(rv(&same), rv(&fresh));

    // Strategic merge patch on a built-in.
    let sm = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(json!({"data": {"extra": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(sm.data.unwrap().len(), 2);

    // Delete: immediate (no finalizers) answers a Success Status.
    let d = cms.delete("b", &DeleteParams::default()).await.unwrap();
    assert!(d.is_right());
    assert_eq!(status_of(cms.get("b").await).code, 404);
}

#[tokio::test]
async fn namespaces_gate_creation_and_cascade_on_delete() {
    let sim = Server::start().await.unwrap();
    let client = sim.client().unwrap();
    let missing: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let s = status_of(missing.create(&PostParams::default(), &cm("a", &[])).await);
    assert_eq!(
        (s.code, s.message.as_str()),
        (404, "namespaces \"nope\" not found")
    );

    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
    )
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    cms.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    nss.delete("team", &DeleteParams::default()).await.unwrap();
    // While terminating, new content is forbidden (or the namespace is already gone).
    let s = status_of(cms.create(&PostParams::default(), &cm("b", &[])).await);
    assert!(s.code == 403 || s.code == 404, "{s:?}");
    eventually("namespace removal", PATIENCE, || async {
        nss.get_opt("team").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(cms.get_opt("a").await.unwrap().is_none());
}

#[tokio::test]
async fn pagination_with_limit_and_continue() {
    let sim = Server::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), &[]))
            .await
            .unwrap();
    }
    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().unwrap();
    let second = cms
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    let names: Vec<_> = second
        .items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["c2", "c3", "c4"]);
    assert!(second.metadata.continue_.is_none());
}

#[tokio::test]
async fn custom_resource_generation_status_and_scale_subresources() {
    let (_sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    let created = pools
        .create(&PostParams::default(), &{
            let mut p = pool("p", json!({"tenant": "acme"}));
            p.data["status"] = json!({"totalConnections": 99});
            p
        })
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is dropped on create when /status exists"
    );
    // Defaults from the schema.
    assert_eq!(created.data["spec"]["replicas"], 1);
    assert_eq!(created.data["spec"]["maxReplicas"], 10);

    // Status via the main endpoint is ignored; spec change bumps generation.
    let p1 = pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}, "status": {"totalConnections": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(p1.metadata.generation, Some(2));
    assert!(p1.data.get("status").is_none());

    // Spec via /status is ignored; status is written; generation unchanged.
    let p2 = pools
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"replicas": 7}, "status": {"totalConnections": 5, "replicas": 2}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(p2.data["spec"]["replicas"], 3);
    assert_eq!(p2.data["status"]["totalConnections"], 5);
    assert_eq!(p2.metadata.generation, Some(2));

    // Metadata-only change: no generation bump.
    let p3 = pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p3.metadata.generation, Some(2));
    assert!(rv(&p3) > rv(&p2));

    // /scale reads and writes spec.replicas through the CRD's paths.
    let scale = pools.get_scale("p").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(3));
    assert_eq!(scale.status.unwrap().replicas, 2);
    pools
        .patch_scale(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    let after = pools.get("p").await.unwrap();
    assert_eq!(after.data["spec"]["replicas"], 4);
    assert_eq!(after.metadata.generation, Some(3));
}

#[tokio::test]
async fn statefulset_scale_and_status() {
    let sim = Server::start().await.unwrap();
    let sts: Api<StatefulSet> = Api::default_namespaced(sim.client().unwrap());
    let obj: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "gw"},
        "spec": {"replicas": 2, "serviceName": "gw", "selector": {"matchLabels": {"app": "gw"}},
                 "template": {"metadata": {"labels": {"app": "gw"}}, "spec": {"containers": [{"name": "gw", "image": "gw:1"}]}}},
    }))
    .unwrap();
    let created = sts.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let scale = sts.get_scale("gw").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=gw"));
    let scale: k8s_openapi::api::autoscaling::v1::Scale =
        serde_json::from_value(json!({"metadata": {"name": "gw"}, "spec": {"replicas": 5}}))
            .unwrap();
    sts.replace_scale("gw", &PostParams::default(), &scale)
        .await
        .unwrap();
    let s = sts.get("gw").await.unwrap();
    assert_eq!(s.spec.unwrap().replicas, Some(5));
    assert_eq!(s.metadata.generation, Some(2));
    let st = sts
        .patch_status(
            "gw",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 5, "readyReplicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(st.status.unwrap().ready_replicas, Some(5));
}

#[tokio::test]
async fn schema_validation_answers_422_with_field_paths() {
    let (_sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    let bad = |spec| pool("bad", spec);
    for (spec, field, needle) in [
        (json!({}), "spec.tenant", "Required value"),
        (
            json!({"tenant": "Not_A_Label"}),
            "spec.tenant",
            "should match",
        ),
        (
            json!({"tenant": "a", "replicas": -1}),
            "spec.replicas",
            "greater than or equal to 0",
        ),
        (
            json!({"tenant": "a", "mode": "other"}),
            "spec.mode",
            "Unsupported value",
        ),
        (
            json!({"tenant": "a", "tags": ["1", "2", "3", "4"]}),
            "spec.tags",
            "must have at most 3 items",
        ),
        (
            json!({"tenant": "a", "replicas": "three"}),
            "spec.replicas",
            "must be of type integer",
        ),
        (
            json!({"tenant": "a", "minReplicas": 5, "maxReplicas": 2}),
            "spec",
            "minReplicas must not exceed maxReplicas",
        ),
    ] {
        let s = status_of(
            pools
                .create(&PostParams::default(), &bad(spec.clone()))
                .await,
        );
        assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{spec}");
        assert!(
            s.message
                .starts_with("ConnectionPool.tether.dev \"bad\" is invalid: "),
            "{}",
            s.message
        );
        assert!(s.message.contains(needle), "{spec}: {}", s.message);
        let causes = s.details.unwrap().causes;
        assert!(
            causes.iter().any(|c| c.field == field),
            "{spec}: {causes:?}"
        );
    }
    // Unknown fields are pruned (and warned about), not stored.
    let ok = pools
        .create(
            &PostParams::default(),
            &pool("ok", json!({"tenant": "a", "bogus": true})),
        )
        .await
        .unwrap();
    assert!(ok.data["spec"].get("bogus").is_none());
    // Updates are validated too.
    let s = status_of(
        pools
            .patch(
                "ok",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": -5}})),
            )
            .await,
    );
    assert_eq!(s.code, 422);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    let mut p = pool("f", json!({"tenant": "a"}));
    p.metadata.finalizers = Some(vec!["tether.dev/cleanup".into()]);
    let created = pools.create(&PostParams::default(), &p).await.unwrap();
    let d = pools.delete("f", &DeleteParams::default()).await.unwrap();
    let pending = d.left().expect("object returned while finalizers remain");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert_eq!(
        pending.metadata.generation,
        Some(2),
        "graceful deletion bumps generation"
    );
    // Still readable; new finalizers may not be added.
    let s = status_of(
        pools
            .patch(
                "f",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["tether.dev/cleanup", "other"]}})),
            )
            .await,
    );
    assert_eq!(s.code, 422);
    // Removing the last finalizer deletes it.
    let jp: json_patch::Patch = serde_json::from_value(json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "tether.dev/cleanup"}, {"op": "remove", "path": "/metadata/finalizers/0"}])).unwrap();
    pools
        .patch("f", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert!(pools.get_opt("f").await.unwrap().is_none());
    // Preconditions on delete.
    pools
        .create(&PostParams::default(), &pool("g", json!({"tenant": "a"})))
        .await
        .unwrap();
    let s = status_of(
        pools
            .delete(
                "g",
                &DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        uid: created.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!(s.code, 409);
}

/// A DELETE's preconditions as `rest.BeforeDelete` checks them: a UID of an object the
/// name no longer holds (deleted and re-created) or a resourceVersion it no longer has is
/// 409 Conflict naming both values, and nothing is deleted; matching ones delete.
#[tokio::test]
async fn delete_preconditions_on_uid_and_resource_version() {
    let sim = Server::start().await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(sim.client().unwrap());
    let pod = || -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-0"},
            "spec": {"containers": [{"name": "c", "image": "gateway"}]},
        }))
        .unwrap()
    };
    let first = pods.create(&PostParams::default(), &pod()).await.unwrap();
    pods.delete("web-0", &DeleteParams::default())
        .await
        .unwrap();
    let second = pods.create(&PostParams::default(), &pod()).await.unwrap();
    let (old_uid, new_uid) = (first.uid().unwrap(), second.uid().unwrap());
    assert_ne!(old_uid, new_uid);
    let with = |uid: Option<String>, resource_version: Option<String>| DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version,
        }),
        ..DeleteParams::default()
    };

    // The UID of the pod the name held before: refused, the successor kept.
    let s = status_of(
        pods.delete("web-0", &with(Some(old_uid.clone()), None))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        format!(
            "Operation cannot be fulfilled on Pod \"web-0\": the UID in the precondition \
             ({old_uid}) does not match the UID in record ({new_uid}). The object might have \
             been deleted and then recreated"
        )
    );
    let details = s.details.expect("details");
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("web-0", "Pod")
    );
    assert_eq!(
        pods.get("web-0").await.unwrap().uid(),
        Some(new_uid.clone())
    );

    // A resourceVersion the pod had before a change: refused too.
    let read_rv = second.resource_version().unwrap();
    let changed = pods
        .patch(
            "web-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"changed": "yes"}}})),
        )
        .await
        .unwrap();
    let current_rv = changed.resource_version().unwrap();
    let s = status_of(
        pods.delete("web-0", &with(None, Some(read_rv.clone())))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        format!(
            "Operation cannot be fulfilled on Pod \"web-0\": the ResourceVersion in the \
             precondition ({read_rv}) does not match the ResourceVersion in record \
             ({current_rv}). The object might have been modified"
        )
    );
    // A right UID does not excuse a stale resourceVersion.
    let s = status_of(
        pods.delete("web-0", &with(Some(new_uid.clone()), Some(read_rv)))
            .await,
    );
    assert_eq!(s.code, 409);
    assert!(pods.get_opt("web-0").await.unwrap().is_some());

    // Both current: deleted.
    pods.delete("web-0", &with(Some(new_uid), Some(current_rv)))
        .await
        .unwrap();
    assert!(pods.get_opt("web-0").await.unwrap().is_none());

    // A group's kind is qualified by the group, as `BeforeDelete` does.
    let sets: Api<StatefulSet> = Api::default_namespaced(sim.client().unwrap());
    let set: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "serviceName": "web",
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "gateway"}]}}},
    }))
    .unwrap();
    sets.create(&PostParams::default(), &set).await.unwrap();
    let s = status_of(
        sets.delete("web", &with(Some("not-its-uid".into()), None))
            .await,
    );
    assert_eq!(s.code, 409);
    assert!(
        s.message
            .starts_with("Operation cannot be fulfilled on StatefulSet.apps \"web\": the UID"),
        "{}",
        s.message
    );
}

fn owned_cm(name: &str, owner: &DynamicObject) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": [{
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool", "name": owner.metadata.name, "uid": owner.metadata.uid,
        "controller": true, "blockOwnerDeletion": true}]}}))
    .unwrap()
}

#[tokio::test]
async fn garbage_collection_background_foreground_orphan() {
    let (_sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());

    // Background: owner goes at once, dependents follow.
    let owner = pools
        .create(&PostParams::default(), &pool("bg", json!({"tenant": "a"})))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned_cm("bg-child", &owner))
        .await
        .unwrap();
    pools
        .delete("bg", &DeleteParams::background())
        .await
        .unwrap();
    eventually("background GC", PATIENCE, || async {
        cms.get_opt("bg-child")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // Foreground: the owner stays (foregroundDeletion finalizer) until dependents are gone.
    let owner = pools
        .create(&PostParams::default(), &pool("fg", json!({"tenant": "a"})))
        .await
        .unwrap();
    let mut child = owned_cm("fg-child", &owner);
    child.metadata.finalizers = Some(vec!["hold".into()]);
    cms.create(&PostParams::default(), &child).await.unwrap();
    let d = pools
        .delete("fg", &DeleteParams::foreground())
        .await
        .unwrap();
    assert!(
        d.left()
            .unwrap()
            .metadata
            .finalizers
            .unwrap()
            .contains(&"foregroundDeletion".to_string())
    );
    eventually("dependent marked for deletion", PATIENCE, || async {
        cms.get("fg-child")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .map(|_| ())
    })
    .await;
    assert!(
        pools.get_opt("fg").await.unwrap().is_some(),
        "owner waits for its dependents"
    );
    cms.patch(
        "fg-child",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    eventually("foreground owner removal", PATIENCE, || async {
        pools.get_opt("fg").await.unwrap().is_none().then_some(())
    })
    .await;

    // Orphan: dependents stay, their ownerReferences are removed.
    let owner = pools
        .create(&PostParams::default(), &pool("or", json!({"tenant": "a"})))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &owned_cm("or-child", &owner))
        .await
        .unwrap();
    pools
        .delete(
            "or",
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Orphan),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually("orphaning", PATIENCE, || async {
        pools.get_opt("or").await.unwrap().is_none().then_some(())
    })
    .await;
    let orphan = cms.get("or-child").await.unwrap();
    assert!(
        orphan
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    // A dependent whose owner never existed is collected.
    let ghost: DynamicObject = serde_json::from_value(
        json!({"metadata": {"name": "ghost", "uid": "00000000-0000-0000-0000-000000000000"}}),
    )
    .unwrap();
    cms.create(&PostParams::default(), &owned_cm("dangling", &ghost))
        .await
        .unwrap();
    eventually("dangling dependent GC", PATIENCE, || async {
        cms.get_opt("dangling")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn crd_deletion_removes_its_resources_and_type() {
    let (_sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    pools
        .create(&PostParams::default(), &pool("p", json!({"tenant": "a"})))
        .await
        .unwrap();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.get("connectionpools.tether.dev").await.unwrap();
    let conds = crd.status.unwrap().conditions.unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );
    crds.delete("connectionpools.tether.dev", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        status_of(pools.list(&ListParams::default()).await).code,
        404
    );
}

#[tokio::test]
async fn discovery_finds_builtins_and_runtime_crds() {
    let (_sim, client) = sim_with_crd().await;
    let d = kube::Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = d
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "tether.dev",
            "v1alpha1",
            "ConnectionPool",
        ))
        .unwrap();
    assert_eq!(ar.plural, "connectionpools");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let subs: Vec<_> = caps
        .subresources
        .iter()
        .map(|(r, _)| r.plural.clone())
        .collect();
    assert!(
        subs.contains(&"connectionpools/status".to_string())
            || subs.contains(&"status".to_string()),
        "{subs:?}"
    );
    for (g, k) in [
        ("apps", "StatefulSet"),
        ("coordination.k8s.io", "Lease"),
        ("policy", "PodDisruptionBudget"),
        ("events.k8s.io", "Event"),
        ("rbac.authorization.k8s.io", "RoleBinding"),
        ("", "ServiceAccount"),
    ] {
        assert!(
            d.resolve_gvk(&kube::api::GroupVersionKind::gvk(g, "v1", k))
                .is_some(),
            "{g}/{k}"
        );
    }
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
}

#[tokio::test]
async fn injected_faults_over_rust_api_and_http() {
    let (sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    pools
        .create(&PostParams::default(), &pool("p", json!({"tenant": "a"})))
        .await
        .unwrap();
    // 500 is not retried by kube-rs (429/503/504 are, by its default retry policy).
    sim.faults().fail_next(
        2,
        FaultMatch::verb("patch")
            .on("connectionpools")
            .subresource("status"),
        500,
    );
    let patch = Patch::Merge(json!({"status": {"totalConnections": 1}}));
    for _ in 0..2 {
        let s = status_of(
            pools
                .patch_status("p", &PatchParams::default(), &patch)
                .await,
        );
        assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"));
    }
    // Unmatched requests were never affected; the rule is used up.
    pools.get("p").await.unwrap();
    pools
        .patch_status("p", &PatchParams::default(), &patch)
        .await
        .unwrap();

    // A retried code: kube-rs rides out two 503s (each carrying Retry-After).
    sim.faults()
        .fail_next(2, FaultMatch::verb("get").on("connectionpools"), 503);
    pools.get("p").await.unwrap();
    assert!(sim.faults().rules().is_empty(), "both failures were served");

    // Same through the HTTP control endpoint.
    let http = reqwest_like(
        &sim,
        "POST",
        "/_sim/faults",
        r#"{"verb":"get","resource":"connectionpools","count":1,"status":500}"#,
    )
    .await;
    assert!(http.starts_with("HTTP/1.1 201"), "{http}");
    assert_eq!(status_of(pools.get("p").await).code, 500);
    pools.get("p").await.unwrap();
}

/// A minimal HTTP/1.1 request over a TcpStream (keeps the suite free of an HTTP client dep).
pub async fn reqwest_like(sim: &Server, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

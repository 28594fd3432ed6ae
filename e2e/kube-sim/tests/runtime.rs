//! Conformance: watches and the kube-rs runtime (watcher, Controller), server-side apply
//! with several field managers, Lease-based leader election, 410 Gone and recovery.

#![recursion_limit = "256"]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::DynamicObject;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use serde_json::json;
use tether_kube_sim::Server;

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"app": "x"}}, "data": {"k": "v"}}),
    )
    .unwrap()
}

#[tokio::test]
async fn raw_watch_from_resource_version_with_selectors_and_bookmarks() {
    let sim = Server::builder()
        .bookmark_interval(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
    let a = cms.create(&PostParams::default(), &cm("a")).await.unwrap();
    let from = a.metadata.resource_version.clone().unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    // Stops matching the selector: seen as DELETED by a selector watch.
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})),
    )
    .await
    .unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();

    let wp = WatchParams::default().labels("app=x").timeout(5);
    let mut stream = cms.watch(&wp, &from).await.unwrap().boxed();
    let mut seen = Vec::new();
    while let Some(ev) = stream.try_next().await.unwrap() {
        match ev {
            WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.data.unwrap()["k"])),
            WatchEvent::Modified(o) => seen.push(format!("MODIFIED {}", o.data.unwrap()["k"])),
            WatchEvent::Deleted(o) => {
                seen.push(format!("DELETED {}", o.metadata.labels.unwrap()["app"]))
            }
            WatchEvent::Bookmark(b) => {
                let rv: u64 = b.metadata.resource_version.parse().unwrap();
                assert!(rv >= sim.store().resource_version() - 1);
                seen.push("BOOKMARK".into());
                break;
            }
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    // The real server sends the change that made an object leave the selector as DELETED
    // and then nothing for the object (its deletion no longer matches).
    assert_eq!(seen, ["MODIFIED 2", "DELETED y", "BOOKMARK"]);
}

#[tokio::test]
async fn too_old_resource_version_is_410_gone_in_an_error_event() {
    let sim = Server::builder().history(2).start().await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
    let first = cms.create(&PostParams::default(), &cm("a")).await.unwrap();
    for i in 0..3 {
        cms.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": i.to_string()}})),
        )
        .await
        .unwrap();
    }
    let mut stream = cms
        .watch(
            &WatchParams::default(),
            first.metadata.resource_version.as_deref().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(s)) => {
            assert_eq!(s.code, 410);
            assert_eq!(s.reason, "Expired");
            assert!(
                s.message.starts_with("too old resource version"),
                "{}",
                s.message
            );
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "stream ends after the error"
    );
}

#[tokio::test]
async fn watcher_survives_dropped_streams_and_compaction() {
    for streaming in [false, true] {
        let sim = Server::start().await.unwrap();
        let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
        cms.create(&PostParams::default(), &cm("before"))
            .await
            .unwrap();
        let cfg = if streaming {
            watcher::Config::default().streaming_lists()
        } else {
            watcher::Config::default()
        };
        let names = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let sink = names.clone();
        let task = tokio::spawn(async move {
            let mut s = watcher(cms, cfg).boxed();
            while let Some(ev) = s.next().await {
                if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev {
                    sink.lock().push(o.metadata.name.unwrap());
                }
            }
        });
        let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
        eventually("initial list", PATIENCE, || async {
            names.lock().contains(&"before".to_string()).then_some(())
        })
        .await;
        cms.create(&PostParams::default(), &cm("live"))
            .await
            .unwrap();
        eventually("live event", PATIENCE, || async {
            names.lock().contains(&"live".to_string()).then_some(())
        })
        .await;
        // Cut the stream and compact history: the watcher must re-list (410) and continue.
        sim.faults().compact();
        sim.faults().drop_watches();
        cms.create(&PostParams::default(), &cm("after"))
            .await
            .unwrap();
        eventually("event after reconnect", PATIENCE, || async {
            names.lock().contains(&"after".to_string()).then_some(())
        })
        .await;
        task.abort();
    }
}

#[tokio::test]
async fn controller_reconciles_and_owns_children() {
    let (_sim, client) = sim_with_crd().await;
    let pools_api = pools(&client, "default");
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    struct Ctx {
        client: kube::Client,
        runs: AtomicUsize,
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        runs: AtomicUsize::new(0),
    });
    async fn reconcile(p: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        ctx.runs.fetch_add(1, Ordering::SeqCst);
        let name = p.metadata.name.clone().unwrap();
        let cms: Api<ConfigMap> = Api::default_namespaced(ctx.client.clone());
        let child = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("{name}-config"), "ownerReferences": [{
                "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool", "name": name, "uid": p.metadata.uid, "controller": true}]},
            "data": {"tenant": p.data["spec"]["tenant"]},
        });
        cms.patch(
            &format!("{name}-config"),
            &PatchParams::apply("tether-operator").force(),
            &Patch::Apply(child),
        )
        .await?;
        let pools: Api<DynamicObject> =
            Api::default_namespaced_with(ctx.client.clone(), &pool_resource());
        let status = json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
            "status": {"observedGeneration": p.metadata.generation}});
        pools
            .patch_status(
                &name,
                &PatchParams::apply("tether-operator").force(),
                &Patch::Apply(status),
            )
            .await?;
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<DynamicObject>, _: &kube::Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(100))
    }
    let controller = Controller::new_with(
        pools_api.clone(),
        watcher::Config::default(),
        pool_resource(),
    )
    .owns_with(cms.clone(), (), watcher::Config::default())
    .run(reconcile, error_policy, ctx.clone())
    .for_each(|_| async {});
    let task = tokio::spawn(controller);

    pools_api
        .create(
            &PostParams::default(),
            &pool("p", json!({"tenant": "acme"})),
        )
        .await
        .unwrap();
    eventually("child config map", PATIENCE, || async {
        cms.get_opt("p-config")
            .await
            .unwrap()
            .map(|c| c.data.unwrap()["tenant"].clone())
    })
    .await;
    eventually("observedGeneration", PATIENCE, || async {
        (pools_api.get("p").await.unwrap().data["status"]["observedGeneration"] == 1).then_some(())
    })
    .await;

    // A spec change reconciles again and updates the child.
    pools_api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tenant": "other"}})),
        )
        .await
        .unwrap();
    eventually("child follows spec", PATIENCE, || async {
        (cms.get("p-config").await.unwrap().data.unwrap()["tenant"] == "other").then_some(())
    })
    .await;

    // Someone edits the owned child: the controller (owns) puts it back.
    cms.patch(
        "p-config",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"tenant": "tampered"}})),
    )
    .await
    .unwrap();
    eventually("child restored", PATIENCE, || async {
        (cms.get("p-config").await.unwrap().data.unwrap()["tenant"] == "other").then_some(())
    })
    .await;
    assert!(ctx.runs.load(Ordering::SeqCst) >= 3);

    // Deleting the pool garbage-collects the child.
    pools_api
        .delete("p", &DeleteParams::default())
        .await
        .unwrap();
    eventually("child collected", PATIENCE, || async {
        cms.get_opt("p-config")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn server_side_apply_two_managers_on_a_list_map_status() {
    let (_sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    pools
        .create(
            &PostParams::default(),
            &pool("p", json!({"tenant": "acme"})),
        )
        .await
        .unwrap();
    let entry = |pod: &str, conns: i64| {
        json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool", "metadata": {"name": "p"},
               "status": {"pods": [{"name": pod, "connections": conns, "ready": true}]}})
    };
    // Two gateway pods report concurrently, each under its own field manager.
    let (pp0, pp1) = (
        PatchParams::apply("gateway-pod-0"),
        PatchParams::apply("gateway-pod-1"),
    );
    let (e0, e1) = (
        Patch::Apply(entry("pod-0", 10)),
        Patch::Apply(entry("pod-1", 20)),
    );
    let (a, b) = tokio::join!(
        pools.patch_status("p", &pp0, &e0),
        pools.patch_status("p", &pp1, &e1)
    );
    a.unwrap();
    b.unwrap();
    for round in 0..5 {
        pools
            .patch_status(
                "p",
                &PatchParams::apply("gateway-pod-0"),
                &Patch::Apply(entry("pod-0", 100 + round)),
            )
            .await
            .unwrap();
    }
    let p = pools.get("p").await.unwrap();
    let pods = p.data["status"]["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert_eq!(
        pods.iter().find(|x| x["name"] == "pod-0").unwrap()["connections"],
        104
    );
    assert_eq!(
        pods.iter().find(|x| x["name"] == "pod-1").unwrap()["connections"],
        20
    );
    let managers: Vec<_> = p
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| (m.manager.unwrap(), m.operation.unwrap(), m.subresource))
        .collect();
    assert!(
        managers.contains(&(
            "gateway-pod-0".into(),
            "Apply".into(),
            Some("status".into())
        )),
        "{managers:?}"
    );
    assert!(managers.contains(&(
        "gateway-pod-1".into(),
        "Apply".into(),
        Some("status".into())
    )));

    // A pod that stops reporting its entry (applies an empty list) removes only its own entry.
    pools.patch_status("p", &PatchParams::apply("gateway-pod-1"), &Patch::Apply(json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool", "status": {"pods": []}}))).await.unwrap();
    let p = pools.get("p").await.unwrap();
    let names: Vec<_> = p.data["status"]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].clone())
        .collect();
    assert_eq!(names, [json!("pod-0")]);
}

#[tokio::test]
async fn server_side_apply_conflicts_force_and_field_removal() {
    let (_sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    let cfg = |spec: serde_json::Value| json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool", "metadata": {"name": "p"}, "spec": spec});
    // Apply-to-create.
    let created = pools
        .patch(
            "p",
            &PatchParams::apply("alice"),
            &Patch::Apply(cfg(json!({"tenant": "acme", "replicas": 2, "tags": ["a"]}))),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(
        created.metadata.managed_fields.as_ref().unwrap()[0]
            .operation
            .as_deref(),
        Some("Apply")
    );
    // Same value from another manager: shared, no conflict.
    pools
        .patch(
            "p",
            &PatchParams::apply("bob"),
            &Patch::Apply(cfg(json!({"tenant": "acme", "replicas": 2}))),
        )
        .await
        .unwrap();
    // Different value: 409 naming the other managers and the field.
    let s = status_of(
        pools
            .patch(
                "p",
                &PatchParams::apply("carol"),
                &Patch::Apply(cfg(json!({"tenant": "acme", "replicas": 5}))),
            )
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert!(
        s.message
            .starts_with("Apply failed with 2 conflicts: conflict with \"alice\": .spec.replicas"),
        "{}",
        s.message
    );
    let causes = s.details.unwrap().causes;
    assert!(
        causes
            .iter()
            .all(|c| c.reason == "FieldManagerConflict" && c.field == ".spec.replicas")
    );
    // Forced: carol takes the field.
    let forced = pools
        .patch(
            "p",
            &PatchParams::apply("carol").force(),
            &Patch::Apply(cfg(json!({"tenant": "acme", "replicas": 5}))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data["spec"]["replicas"], 5);
    // alice stops applying `tags` (owned only by her): removed. `tenant` is shared: kept.
    let after = pools
        .patch(
            "p",
            &PatchParams::apply("alice"),
            &Patch::Apply(cfg(json!({"tenant": "acme"}))),
        )
        .await
        .unwrap();
    assert!(after.data["spec"].get("tags").is_none(), "{:?}", after.data);
    assert_eq!(after.data["spec"]["tenant"], "acme");
    // A plain update (merge patch) takes ownership from appliers: re-applying conflicts.
    let pp = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    pools
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"spec": {"tenant": "edited"}})),
        )
        .await
        .unwrap();
    let s = status_of(
        pools
            .patch(
                "p",
                &PatchParams::apply("alice"),
                &Patch::Apply(cfg(json!({"tenant": "acme"}))),
            )
            .await,
    );
    assert!(
        s.message
            .contains("conflict with \"kubectl-edit\": .spec.tenant"),
        "{}",
        s.message
    );
}

/// A minimal lease-based leader election over the API's optimistic concurrency, the way
/// kube-runtime-based operators and client-go's leaderelection do it: take the lease when
/// absent or expired, renew while held, write with the read resourceVersion.
async fn try_acquire(leases: &Api<Lease>, me: &str, now_ms: i64, ttl_ms: i64) -> bool {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let stamp = MicroTime(k8s_openapi::jiff::Timestamp::from_millisecond(now_ms).unwrap());
    match leases.get_opt("leader").await.unwrap() {
        None => {
            let l: Lease = serde_json::from_value(json!({"metadata": {"name": "leader"}, "spec": {"holderIdentity": me, "leaseDurationSeconds": 1}})).unwrap();
            let mut l = l;
            l.spec.as_mut().unwrap().renew_time = Some(stamp);
            leases.create(&PostParams::default(), &l).await.is_ok()
        }
        Some(mut l) => {
            let spec = l.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let renewed = spec.renew_time.map(|t| t.0.as_millisecond()).unwrap_or(0);
            if holder != me && now_ms < renewed + ttl_ms {
                return false;
            }
            let s = l.spec.as_mut().unwrap();
            if holder != me {
                s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
            }
            s.holder_identity = Some(me.to_string());
            s.renew_time = Some(stamp);
            // replace carries metadata.resourceVersion: a concurrent writer gets 409.
            leases
                .replace("leader", &PostParams::default(), &l)
                .await
                .is_ok()
        }
    }
}

#[tokio::test]
async fn lease_leader_election_with_two_contenders() {
    let sim = Server::start().await.unwrap();
    let leases: Api<Lease> = Api::default_namespaced(sim.client().unwrap());
    let ttl = 1_000;
    // Logical clock so the test asserts behaviour, not timings.
    for t in 0..20i64 {
        let now = t * 300;
        let (a, b) = tokio::join!(
            try_acquire(&leases, "a", now, ttl),
            try_acquire(&leases, "b", now, ttl)
        );
        let holder = leases
            .get("leader")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .unwrap();
        assert!(!(a && b), "both contenders won round {t}");
        if a {
            assert_eq!(holder, "a");
        }
        if b {
            assert_eq!(holder, "b");
        }
        if t == 0 {
            assert!(a || b, "someone wins the free lease");
        }
    }
    // The holder stops renewing; after the TTL the other takes over and transitions count.
    let holder = leases
        .get("leader")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    let other = if holder == "a" { "b" } else { "a" };
    assert!(
        !try_acquire(&leases, other, 20 * 300, ttl).await,
        "lease still valid"
    );
    assert!(
        try_acquire(&leases, other, 20 * 300 + ttl + 1, ttl).await,
        "expired lease is taken"
    );
    let l = leases.get("leader").await.unwrap().spec.unwrap();
    assert_eq!(l.holder_identity.as_deref(), Some(other));
    assert!(l.lease_transitions.unwrap() >= 1);
}

#[tokio::test]
async fn kube_runtime_finalizer_helper_adds_and_cleans_up() {
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    let sim = Server::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
    cms.create(&PostParams::default(), &cm("f")).await.unwrap();
    let cleaned = Arc::new(AtomicUsize::new(0));
    let run = |obj: ConfigMap| {
        let cms = cms.clone();
        let cleaned = cleaned.clone();
        async move {
            finalizer(&cms, "tether.dev/cleanup", Arc::new(obj), |ev| async move {
                if let Finalizer::Cleanup(_) = ev {
                    cleaned.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, kube::Error>(Action::await_change())
            })
            .await
        }
    };
    // First pass adds the finalizer (JSON patch: test null + add).
    run(cms.get("f").await.unwrap()).await.unwrap();
    assert_eq!(
        cms.get("f").await.unwrap().metadata.finalizers.unwrap(),
        ["tether.dev/cleanup"]
    );
    // Apply pass, then deletion: the cleanup runs and the finalizer removal deletes it.
    run(cms.get("f").await.unwrap()).await.unwrap();
    cms.delete("f", &DeleteParams::default()).await.unwrap();
    run(cms.get("f").await.unwrap()).await.unwrap();
    assert_eq!(cleaned.load(Ordering::SeqCst), 1);
    assert!(cms.get_opt("f").await.unwrap().is_none());
}

#[tokio::test]
async fn kube_runtime_event_recorder_creates_then_patches_series() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let sim = Server::start().await.unwrap();
    let client = sim.client().unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let obj = cms
        .create(&PostParams::default(), &cm("src"))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tether-operator".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Warning,
        reason: "InvalidSpec".into(),
        note: Some("bad".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = kube::Resource::object_ref(&obj, &());
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(client);
    let list = events.list(&Default::default()).await.unwrap();
    assert_eq!(
        list.items.len(),
        1,
        "the repeat is recorded as a series on the same Event"
    );
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("InvalidSpec"));
    assert_eq!(e.regarding.as_ref().unwrap().name.as_deref(), Some("src"));
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
}

/// core/v1 and events.k8s.io/v1 Events are one storage: a write through either API is
/// read, listed (with that API's field selectors) and watched through the other, with
/// the real server's field mapping.
#[tokio::test]
async fn core_and_events_v1_events_are_one_store() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event as EventsV1;
    use kube::api::ListParams;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let sim = Server::start().await.unwrap();
    let client = sim.client().unwrap();
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let v1: Api<EventsV1> = Api::default_namespaced(client.clone());
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let obj = cms
        .create(&PostParams::default(), &cm("src"))
        .await
        .unwrap();

    // A core/v1 watch is open before the events.k8s.io/v1 write.
    let mut core_watch = core
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tether-operator".into(),
            instance: Some("op-0".into()),
        },
    );
    let reference = kube::Resource::object_ref(&obj, &());
    let ev = Event {
        type_: EventType::Warning,
        reason: "InvalidSpec".into(),
        note: Some("bad spec".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();

    // Read through core/v1 with its field names and field selectors (kubectl describe).
    let by_object = core
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=ConfigMap,involvedObject.name=src,involvedObject.uid={}",
            obj.metadata.uid.clone().unwrap()
        )))
        .await
        .unwrap();
    assert_eq!(by_object.items.len(), 1);
    let e = &by_object.items[0];
    assert_eq!(e.message.as_deref(), Some("bad spec"));
    assert_eq!(e.reason.as_deref(), Some("InvalidSpec"));
    assert_eq!(e.involved_object.name.as_deref(), Some("src"));
    assert_eq!(e.reporting_component.as_deref(), Some("tether-operator"));
    assert_eq!(e.reporting_instance.as_deref(), Some("op-0"));
    assert_eq!(e.series.as_ref().and_then(|s| s.count), Some(2));
    assert!(e.event_time.is_some());

    // The core/v1 watch saw the create and the series update.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), core_watch.next())
            .await
            .expect("watch event")
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(e) => seen.push(("ADDED", e.message)),
            WatchEvent::Modified(e) => seen.push(("MODIFIED", e.message)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            ("ADDED", Some("bad spec".to_string())),
            ("MODIFIED", Some("bad spec".to_string()))
        ]
    );

    // A core/v1 write (client-go's older recorder) is an events.k8s.io/v1 Event too.
    let legacy: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "src.legacy"},
        "involvedObject": {"kind": "ConfigMap", "name": "src", "namespace": "default"},
        "reason": "Synced", "message": "synced ok", "type": "Normal", "count": 3,
        "source": {"component": "old-controller", "host": "node-1"},
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:01:00Z",
    }))
    .unwrap();
    core.create(&PostParams::default(), &legacy).await.unwrap();
    let e = v1.get("src.legacy").await.unwrap();
    assert_eq!(e.note.as_deref(), Some("synced ok"));
    assert_eq!(
        e.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("src")
    );
    assert_eq!(e.deprecated_count, Some(3));
    assert_eq!(
        e.deprecated_source
            .as_ref()
            .and_then(|s| s.component.as_deref()),
        Some("old-controller")
    );
    assert!(e.deprecated_last_timestamp.is_some());
    // events.k8s.io/v1 field selectors use its own names.
    let synced = v1
        .list(&ListParams::default().fields("regarding.name=src,reason=Synced"))
        .await
        .unwrap();
    assert_eq!(synced.items.len(), 1);
    assert_eq!(
        core.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
    assert_eq!(
        v1.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    // Deleting through one API removes it from both.
    v1.delete("src.legacy", &DeleteParams::default())
        .await
        .unwrap();
    assert!(core.get_opt("src.legacy").await.unwrap().is_none());
}

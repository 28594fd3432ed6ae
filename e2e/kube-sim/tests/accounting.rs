//! The stand-in at scale and its API accounting, asserted by counts (never timings):
//! a request's cost does not grow with unrelated objects (the store's own counter of
//! objects examined), watch fan-out considers only the watchers an event concerns, and
//! `Server::stats()` / `GET /_sim/stats` count exactly what was sent.

#![recursion_limit = "256"]

mod common;

use common::*;
use futures::AsyncBufReadExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tether_kube_sim::Server;
use tether_kube_sim::stats::Snapshot;
use tether_kube_sim::store::{Target, WatchStart, WriteOpts};

fn target(sim: &Server, plural: &str, ns: &str) -> Target {
    Target {
        rt: sim.store().registry().find("", "v1", plural).unwrap(),
        version: "v1".into(),
        namespace: Some(ns.into()),
        name: None,
        subresource: None,
    }
}

/// `n` ConfigMaps in `ns` straight through the store, labelled `i` = index mod 10.
fn fill(sim: &Server, ns: &str, n: usize) {
    let t = target(sim, "configmaps", ns);
    for i in 0..n {
        let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("filler-{i}"), "labels": {"i": (i % 10).to_string()}},
            "data": {"k": "v"}});
        sim.store()
            .create(&t, obj, &WriteOpts::default())
            .expect("create");
    }
}

/// Watchers that an apply of `default/target` does not concern: other namespaces and
/// other names. Returned to keep them open.
fn unrelated_watchers(sim: &Server, n: usize) -> Vec<WatchStart> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            sim.store()
                .watch(
                    &target(sim, "configmaps", &format!("other-{i}")),
                    Some(sim.store().resource_version()),
                )
                .unwrap(),
        );
        out.push(
            sim.store()
                .watch_scoped(
                    &target(sim, "configmaps", "default"),
                    Some(sim.store().resource_version()),
                    Some(&format!("filler-{i}")),
                )
                .unwrap(),
        );
    }
    out
}

/// Applies `default/target` twice (create, then change) and reads it back; returns what
/// the store examined for it, once the garbage collector has caught up.
async fn apply_twice_and_get(sim: &Server) -> tether_kube_sim::Snapshot {
    let client = sim.client().unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    sim.settle().await;
    let before = sim.stats().snapshot();
    for v in ["1", "2"] {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "target", "labels": {"i": "3"}}, "data": {"v": v}});
        cms.patch("target", &PatchParams::apply("bench"), &Patch::Apply(cm))
            .await
            .unwrap();
    }
    cms.get("target").await.unwrap();
    sim.settle().await;
    sim.stats().snapshot().since(&before)
}

#[tokio::test]
async fn apply_among_10000_unrelated_objects_touches_the_index_not_a_scan() {
    // The same calls with nothing else stored, then with 10,000 unrelated ConfigMaps in
    // the same namespace and 200 unrelated watchers (other namespaces, other names).
    let empty = Server::start().await.unwrap();
    let _quiet = unrelated_watchers(&empty, 0);
    let _ns_watch = empty
        .store()
        .watch(&target(&empty, "configmaps", "default"), None)
        .unwrap();
    let baseline = apply_twice_and_get(&empty).await;

    let crowded = Server::start().await.unwrap();
    fill(&crowded, "default", 10_000);
    let _unrelated = unrelated_watchers(&crowded, 100);
    let _ns_watch = crowded
        .store()
        .watch(
            &target(&crowded, "configmaps", "default"),
            Some(crowded.store().resource_version()),
        )
        .unwrap();
    let d = apply_twice_and_get(&crowded).await;

    // Structural: the work is the same whatever else is stored.
    assert_eq!(
        d.objects_examined, baseline.objects_examined,
        "objects examined with 10,000 unrelated objects vs none"
    );
    // And small: each apply reads the object (the handler's existence check and the
    // write), the get reads it once.
    assert!(d.objects_examined <= 6, "{}", d.objects_examined);
    // Two events (ADDED, MODIFIED), each offered to the one namespace watcher only.
    assert_eq!(d.watchers_examined, 2);
    assert_eq!(d.watchers_examined, baseline.watchers_examined);
    assert_eq!(d.requests("patch", "configmaps"), 2);
    assert_eq!(d.requests("get", "configmaps"), 1);
    assert_eq!(d.by_field_manager()["bench"], 2);
}

#[tokio::test]
async fn selected_lists_visit_only_their_candidates() {
    let sim = Server::start().await.unwrap();
    fill(&sim, "default", 2_000);
    fill(&sim, "kube-system", 500);
    let cms: Api<ConfigMap> = Api::namespaced(sim.client().unwrap(), "default");
    let all: Api<ConfigMap> = Api::all(sim.client().unwrap());
    let examined =
        |before: &tether_kube_sim::Snapshot| sim.stats().snapshot().since(before).objects_examined;

    // A label equality comes from the label index: exactly the matching objects.
    let s = sim.stats().snapshot();
    let l = cms
        .list(&ListParams::default().labels("i=3"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 200);
    assert_eq!(examined(&s), 200);

    // A name pinned by the field selector is one lookup.
    let s = sim.stats().snapshot();
    let l = cms
        .list(&ListParams::default().fields("metadata.name=filler-7"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(examined(&s), 1);

    // A namespace is a range of the ordered map: the other namespace is never visited.
    let s = sim.stats().snapshot();
    let l = Api::<ConfigMap>::namespaced(sim.client().unwrap(), "kube-system")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(l.items.len(), 500);
    assert_eq!(examined(&s), 500);

    // Pages continue where the last ended: 2,500 objects in pages of 1,000 visit each
    // object once, plus the remaining ones counted for remainingItemCount.
    let s = sim.stats().snapshot();
    let p1 = all.list(&ListParams::default().limit(1000)).await.unwrap();
    assert_eq!(p1.metadata.remaining_item_count, Some(1500));
    let token = p1.metadata.continue_.clone().unwrap();
    let p2 = all
        .list(&ListParams::default().limit(1000).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(p2.metadata.remaining_item_count, Some(500));
    assert_eq!(p2.items.len(), 1000);
    assert_eq!(examined(&s), 2500 + 1500);
}

#[tokio::test]
async fn garbage_collection_work_follows_the_writes_not_the_store_size() {
    let (sim, client) = sim_with_crd().await;
    fill(&sim, "default", 5_000);
    let pools = pools(&client, "default");
    let p = pools
        .create(
            &Default::default(),
            &pool("owner", json!({"tenant": "acme"})),
        )
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..3 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("child-{i}"),
            "ownerReferences": [{"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
                "name": "owner", "uid": p.metadata.uid.clone().unwrap()}]}}))
            .unwrap();
        cms.create(&Default::default(), &cm).await.unwrap();
    }
    sim.settle().await;
    let before = sim.stats().snapshot();
    pools
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    eventually("children collected", PATIENCE, || async {
        for i in 0..3 {
            if cms.get_opt(&format!("child-{i}")).await.unwrap().is_some() {
                return None;
            }
        }
        Some(())
    })
    .await;
    sim.settle().await;
    let d = sim.stats().snapshot().since(&before);
    // The owner, its three dependents (each queued once by the owner's removal, read
    // to check its owners, then deleted) and the polling gets — nothing of the 5,000.
    let polls = d.requests("get", "configmaps");
    assert!(
        d.objects_examined <= 12 + polls,
        "{} examined, {polls} polling gets",
        d.objects_examined
    );
}

/// Reads `n` lines of a watch stream; returns them and their bytes (newline included).
async fn read_lines(
    lines: &mut (impl futures::AsyncBufRead + Unpin),
    n: usize,
) -> (Vec<Value>, u64) {
    let mut out = Vec::new();
    let mut bytes = 0;
    for _ in 0..n {
        let mut l = String::new();
        let got = lines.read_line(&mut l).await.unwrap();
        assert!(got > 0, "stream ended early");
        bytes += got as u64;
        out.push(serde_json::from_str(&l).unwrap());
    }
    (out, bytes)
}

#[tokio::test]
async fn stats_count_exactly_what_was_sent() {
    let (sim, client) = sim_with_crd().await;
    sim.stats().reset();
    assert_eq!(sim.stats().snapshot(), tether_kube_sim::Snapshot::default());

    // A watch of the pools labelled team=a, from a client with its own User-Agent.
    let req = http::Request::get(
        "/apis/tether.dev/v1alpha1/namespaces/default/connectionpools?watch=1&labelSelector=team%3Da",
    )
    .header("User-Agent", "stats-test/1.0")
    .body(Vec::new())
    .unwrap();
    let mut stream = Box::pin(client.request_stream(req).await.unwrap());

    let pools = pools(&client, "default");
    let apply = |name: &str, team: &str, replicas: i64| {
        json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
            "metadata": {"name": name, "labels": {"team": team}},
            "spec": {"tenant": "acme", "replicas": replicas}})
    };
    // 3 applies by "op": p1 created, changed; p2 created (team b: not watched).
    for (name, team, r) in [("p1", "a", 1), ("p1", "a", 2), ("p2", "b", 1)] {
        pools
            .patch(
                name,
                &PatchParams::apply("op"),
                &Patch::Apply(apply(name, team, r)),
            )
            .await
            .unwrap();
    }
    // 2 status applies by two pods.
    for pod in ["pod-0", "pod-1"] {
        let st = json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
            "metadata": {"name": "p1"}, "status": {"pods": [{"name": pod, "connections": 5}]}});
        pools
            .patch_status("p1", &PatchParams::apply(pod), &Patch::Apply(st))
            .await
            .unwrap();
    }
    pools.get("p1").await.unwrap();
    assert_eq!(status_of(pools.get("missing").await).code, 404);
    pools.list(&ListParams::default()).await.unwrap();
    pools.delete("p1", &DeleteParams::default()).await.unwrap();

    // The watch saw: ADDED p1, MODIFIED p1 (spec), MODIFIED ×2 (status), DELETED p1.
    let (events, bytes) = read_lines(&mut stream, 5).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["ADDED", "MODIFIED", "MODIFIED", "MODIFIED", "DELETED"]
    );

    let s = sim.stats().snapshot();
    // Requests, by what was sent.
    let pools_req = |verb: &str, sub: Option<&str>, manager: Option<&str>, code: u16| {
        s.count(|k| {
            k.verb == verb
                && k.group == "tether.dev"
                && k.version == "v1alpha1"
                && k.resource == "connectionpools"
                && k.subresource.as_deref() == sub
                && k.field_manager.as_deref() == manager
                && k.code == code
        })
    };
    assert_eq!(pools_req("patch", None, Some("op"), 201), 2);
    assert_eq!(pools_req("patch", None, Some("op"), 200), 1);
    assert_eq!(pools_req("patch", Some("status"), Some("pod-0"), 200), 1);
    assert_eq!(pools_req("patch", Some("status"), Some("pod-1"), 200), 1);
    assert_eq!(pools_req("get", None, None, 200), 1);
    assert_eq!(pools_req("get", None, None, 404), 1);
    assert_eq!(pools_req("list", None, None, 200), 1);
    assert_eq!(pools_req("delete", None, None, 200), 1);
    assert_eq!(pools_req("watch", None, None, 200), 1);
    assert_eq!(s.requests_total(), 10);
    assert_eq!(s.by_user_agent()["stats-test/1.0"], 1);
    assert_eq!(s.by_user_agent()[""], 9);
    assert_eq!(
        s.by_resource()["tether.dev/v1alpha1/connectionpools/status"],
        2
    );

    // The watch, by resource + selector + user agent: exactly the lines and bytes read.
    assert_eq!(s.watches.len(), 1);
    let w = &s.watches[0];
    assert_eq!(w.key.resource, "tether.dev/v1alpha1/connectionpools");
    assert_eq!(w.key.namespace.as_deref(), Some("default"));
    assert_eq!(w.key.label_selector, "team=a");
    assert_eq!(w.key.user_agent, "stats-test/1.0");
    assert_eq!((w.opened, w.open, w.events, w.bytes), (1, 1, 5, bytes));
    assert_eq!(w.by_type["MODIFIED"], 3);
    assert_eq!(s.watch_total().bytes, bytes);

    // The same over HTTP (the /_sim endpoints are not counted themselves).
    let doc: Value = client
        .request(http::Request::get("/_sim/stats").body(Vec::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(doc["requests"]["total"], 10);
    assert_eq!(doc["requests"]["byVerb"]["patch"], 5);
    assert_eq!(doc["requests"]["byFieldManager"]["op"], 3);
    assert_eq!(doc["requests"]["byCode"]["404"], 1);
    assert_eq!(doc["watches"]["events"], 5);
    assert_eq!(doc["watches"]["bytes"], bytes);
    assert_eq!(doc["watches"]["entries"][0]["labelSelector"], "team=a");
    assert_eq!(doc["watches"]["entries"][0]["byType"]["DELETED"], 1);
    assert!(doc["store"]["objectsExamined"].as_u64().unwrap() > 0);
    // And as a `Snapshot`, for harnesses in another process.
    let remote: Snapshot = client
        .request(
            http::Request::get("/_sim/snapshot")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(remote.requests_total(), 10);
    assert_eq!(remote.watch_total().bytes, bytes);

    // Reset over HTTP: counters start again from zero; the open watch is still known.
    client
        .request_text(
            http::Request::delete("/_sim/stats")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let s = sim.stats().snapshot();
    assert_eq!(s.requests_total(), 0);
    assert_eq!(s.watch_total().events, 0);
    assert_eq!(s.watch_total().open, 1);
    drop(stream);
    eventually("watch closed", PATIENCE, || async {
        (sim.stats().snapshot().watch_total().open == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_name_pinned_watch_is_offered_only_its_object() {
    let sim = Server::start().await.unwrap();
    let client = sim.client().unwrap();
    // One watch by field selector, one by URL (`.../configmaps/cm-7?watch=1`).
    let by_selector = http::Request::get(
        "/api/v1/namespaces/default/configmaps?watch=1&fieldSelector=metadata.name%3Dcm-3",
    )
    .body(Vec::new())
    .unwrap();
    let by_url = http::Request::get("/api/v1/namespaces/default/configmaps/cm-7?watch=1")
        .body(Vec::new())
        .unwrap();
    let mut w3 = Box::pin(client.request_stream(by_selector).await.unwrap());
    let mut w7 = Box::pin(client.request_stream(by_url).await.unwrap());
    let before = sim.stats().snapshot();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..10 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}})).unwrap();
        cms.create(&Default::default(), &cm).await.unwrap();
    }
    let (e3, _) = read_lines(&mut w3, 1).await;
    let (e7, _) = read_lines(&mut w7, 1).await;
    assert_eq!(e3[0]["object"]["metadata"]["name"], "cm-3");
    assert_eq!(e7[0]["object"]["metadata"]["name"], "cm-7");
    let d = sim.stats().snapshot().since(&before);
    // Ten events; each pinned watcher was considered for its own object's event only.
    assert_eq!(d.watchers_examined, 2);
    let pinned = |sel: &str| d.watch(|k| k.field_selector == sel).events;
    assert_eq!(pinned("metadata.name=cm-3"), 1);
    assert_eq!(pinned("metadata.name=cm-7"), 1);
}

#[tokio::test]
async fn a_watch_whose_client_stops_reading_counts_what_was_written_and_queues_the_rest() {
    let sim = Server::start().await.unwrap();
    let client = sim.client().unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // Every event of this object is a 256 KiB line.
    let big: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "big"}, "data": {"payload": "x".repeat(256 << 10), "n": "0"}}),
    )
    .unwrap();
    cms.create(&Default::default(), &big).await.unwrap();
    let req = http::Request::get(format!(
        "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={}",
        sim.store().resource_version()
    ))
    .body(Vec::new())
    .unwrap();
    // Opened, then not read: the connection's buffers fill, and the stand-in stops
    // writing (hyper polls the body only while it can write) and queues the rest.
    let mut stream = Box::pin(client.request_stream(req).await.unwrap());
    let watch = || sim.stats().snapshot().watch_total();
    let mut sent = 0u64;
    // (An event waits a moment in any case, between its write and the stream's next
    // poll: a few waiting in a row mean the stream is held up.)
    while watch().queued < 3 {
        assert!(
            sent < 1000,
            "{sent} events written, none queued: {:?}",
            watch()
        );
        sent += 1;
        cms.patch(
            "big",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"n": sent.to_string()}})),
        )
        .await
        .unwrap();
    }
    // What was written plus what waits is every event; none was lost or counted twice.
    eventually("written + queued = sent", PATIENCE, || async {
        let w = watch();
        (w.events + w.queued == sent).then_some(())
    })
    .await;
    let w = watch();
    assert!(w.events < sent && w.queued >= 3, "{w:?}");
    // Read it all: then everything was written, as many lines as were read, and
    // nothing waits any more.
    let (lines, bytes) = read_lines(&mut stream, sent as usize).await;
    assert_eq!(
        lines.last().unwrap()["object"]["data"]["n"],
        sent.to_string()
    );
    let w = watch();
    assert_eq!((w.events, w.bytes, w.queued), (sent, bytes, 0), "{w:?}");
    drop(stream);
    eventually("watch closed", PATIENCE, || async {
        (watch().open == 0).then_some(())
    })
    .await;
    assert_eq!(watch().queued, 0);
}

/// Each change is serialized once, whatever the number of watchers; the event log keeps
/// those bytes once per event, and a MODIFIED event's `old` is the previous event's bytes
/// (shared, not a second copy). Before, each watcher serialized every event again and the
/// log kept every change as two JSON trees (old and new object).
#[tokio::test]
async fn each_change_is_serialized_once_and_the_log_keeps_it_once() {
    let (sim, client) = sim_with_crd().await;
    let pools = pools(&client, "default");
    pools
        .create(&Default::default(), &pool("p", json!({"tenant": "acme"})))
        .await
        .unwrap();
    let t = Target {
        rt: sim
            .store()
            .registry()
            .find("tether.dev", "v1alpha1", "connectionpools")
            .unwrap(),
        version: "v1alpha1".into(),
        namespace: Some("default".into()),
        name: None,
        subresource: None,
    };
    let from = sim.store().resource_version();
    // Four watchers of every pool, as stream clients.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let req = http::Request::get(format!(
            "/apis/tether.dev/v1alpha1/namespaces/default/connectionpools?watch=1&resourceVersion={from}"
        ))
        .body(Vec::new())
        .unwrap();
        streams.push(Box::pin(client.request_stream(req).await.unwrap()));
    }
    let before = sim.stats().snapshot();
    let reports = 10;
    for i in 0..reports {
        let st = json!({"apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
            "metadata": {"name": "p"}, "status": {"pods": [{"name": format!("p-{}", i % 3), "connections": i}]}});
        pools
            .patch_status(
                "p",
                &PatchParams::apply(&format!("pod-{}", i % 3)).force(),
                &Patch::Apply(st),
            )
            .await
            .unwrap();
    }
    for s in &mut streams {
        let (events, _) = read_lines(s, reports).await;
        assert!(events.iter().all(|e| e["type"] == "MODIFIED"), "{events:?}");
    }
    let s = sim.stats().snapshot().since(&before);
    assert_eq!(s.watch_total().events, 4 * reports as u64);
    assert_eq!(
        s.objects_encoded, reports as u64,
        "one serialization per change, not one per watcher"
    );

    // The log: one copy of each version, `old` shared with the event before.
    let start = sim.store().watch(&t, Some(from)).unwrap();
    let events = &start.backlog;
    assert_eq!(events.len(), reports);
    for pair in events.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        let old = next.old.as_ref().expect("MODIFIED keeps the object before");
        assert_eq!(old, &prev.object);
        assert_eq!(
            old.as_ptr(),
            prev.object.as_ptr(),
            "old is the previous event's bytes, not a copy"
        );
    }
    let latest = serde_json::to_vec(
        &sim.store()
            .get(&Target {
                name: Some("p".into()),
                ..t.clone()
            })
            .unwrap(),
    )
    .unwrap()
    .len();
    let kept: usize = events.iter().map(|e| e.retained_bytes()).sum();
    assert!(
        kept <= reports * latest,
        "{kept} bytes kept for {reports} events of an object of at most {latest} bytes"
    );
}

//! Conformance: a kube-rs `watcher` feeding a `reflector` keeps its cache current across
//! `compact()` + `drop_watches()` while an object changes every 100 ms, for a built-in
//! namespaced kind and a custom resource, on both ways back: resuming from its last
//! resourceVersion (still in the compacted log) and 410 Gone followed by a re-list. The
//! stand-in counts exactly the object events the watcher read, and nothing stays queued.

#![recursion_limit = "256"]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};
use tether_kube_sim::Server;
use tether_test_support::until;
use tokio::time::Instant;

const NS: &str = "scale";

/// What the watcher handed to the reflector.
#[derive(Default)]
struct Seen {
    /// Apply + Delete (one per ADDED/MODIFIED/DELETED line read from a watch).
    applied: AtomicU64,
    /// `Event::Init`: a (re-)list started.
    inits: AtomicU64,
    /// Errors (410 Gone among them).
    errors: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    ConfigMap,
    Crd,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Way {
    /// The watcher's last resourceVersion is the compaction's: it resumes from there.
    Resume,
    /// Another type was written after the watcher's last event: its resourceVersion is
    /// older than the compaction, so it gets 410 Gone and re-lists.
    Gone,
}

/// The counter `write` put in the object.
fn counter(o: &DynamicObject, kind: Kind) -> u64 {
    let v = match kind {
        Kind::Crd => o.data.pointer("/status/totalConnections"),
        Kind::ConfigMap => o.data.pointer("/data/n"),
    };
    match v {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// Writes counter `n` into the object (a CR through `/status`, as the pods report).
async fn write(api: &Api<DynamicObject>, kind: Kind, n: u64) {
    let r = match kind {
        Kind::Crd => {
            api.patch_status(
                "obj",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"totalConnections": n}})),
            )
            .await
        }
        Kind::ConfigMap => {
            api.patch(
                "obj",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"n": n.to_string()}})),
            )
            .await
        }
    };
    r.expect("write");
}

async fn reflector_recovers(kind: Kind, way: Way) {
    let sim = Server::start().await.unwrap();
    let client = sim.client().unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
    )
    .await
    .unwrap();
    let (ar, obj): (ApiResource, DynamicObject) = match kind {
        Kind::Crd => {
            install_crd(&client).await;
            (pool_resource(), pool("obj", json!({"tenant": "t"})))
        }
        Kind::ConfigMap => (
            ApiResource::erase::<ConfigMap>(&()),
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "obj"}, "data": {"n": "0"},
            }))
            .unwrap(),
        ),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
    api.create(&PostParams::default(), &obj).await.unwrap();

    // The operator's shape: a plain watcher with the default backoff, into a reflector.
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let reader = writer.as_reader();
    let seen = Arc::new(Seen::default());
    let sink = seen.clone();
    let watched: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
    let task = tokio::spawn(async move {
        let events = watcher(watched, watcher::Config::default())
            .default_backoff()
            .map(move |ev| {
                let n = match &ev {
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => &sink.applied,
                    Ok(watcher::Event::Init) => &sink.inits,
                    Ok(_) => return ev,
                    Err(_) => &sink.errors,
                };
                n.fetch_add(1, Ordering::SeqCst);
                ev
            });
        let mut s = reflector(writer, events).boxed();
        while s.next().await.is_some() {}
    });
    reader.wait_until_ready().await.unwrap();
    let current = move || {
        reader
            .state()
            .iter()
            .find(|o| o.metadata.name.as_deref() == Some("obj"))
            .map(|o| counter(o, kind))
            .unwrap_or(0)
    };

    // The writer: the object every 100 ms; the test holds `turn` to act between writes.
    let written = Arc::new(AtomicU64::new(0));
    let turn = Arc::new(tokio::sync::Mutex::new(false));
    let writer_task = {
        let (api, written, turn) = (api.clone(), written.clone(), turn.clone());
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                {
                    let stop = turn.lock().await;
                    if *stop {
                        return;
                    }
                    n += 1;
                    write(&api, kind, n).await;
                    written.store(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    until(
        "the reflector following the writes",
        Duration::from_secs(30),
        || current() >= 5,
    )
    .await;

    let at_drop = {
        let _turn = turn.lock().await;
        let at = written.load(Ordering::SeqCst);
        // Caught up, so that the way back is the one this case is about.
        until(
            "the reflector at the last write",
            Duration::from_secs(30),
            || current() == at,
        )
        .await;
        if way == Way::Gone {
            let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
            let lease = serde_json::from_value(json!({"metadata": {"name": "elsewhere"}}));
            leases
                .create(&PostParams::default(), &lease.unwrap())
                .await
                .unwrap();
        }
        sim.faults().compact();
        sim.faults().drop_watches();
        at
    };

    // A write made after the drop reaches the cache. The bound is generous: the
    // assertion is that it happens, not how fast.
    let deadline = Instant::now() + Duration::from_secs(60);
    while current() <= at_drop + 1 {
        assert!(
            Instant::now() < deadline,
            "{kind:?}/{way:?}: the reflector is stuck at {} since the drop at {at_drop} ({} written); inits {}, errors {}; {:?}",
            current(),
            written.load(Ordering::SeqCst),
            seen.inits.load(Ordering::SeqCst),
            seen.errors.load(Ordering::SeqCst),
            sim.stats().snapshot().watches
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Quiesce: the cache holds the last write, and the stand-in counted as delivered
    // exactly the object events the watcher read (none sit unread anywhere), with
    // nothing left queued for the watch.
    *turn.lock().await = true;
    writer_task.await.unwrap();
    let last = written.load(Ordering::SeqCst);
    until(
        "the last write in the cache",
        Duration::from_secs(30),
        || current() == last,
    )
    .await;
    let resource = match kind {
        Kind::Crd => "tether.dev/v1alpha1/connectionpools",
        Kind::ConfigMap => "v1/configmaps",
    };
    let objects = |w: &tether_kube_sim::stats::WatchCount| -> u64 {
        ["ADDED", "MODIFIED", "DELETED"]
            .iter()
            .map(|t| w.by_type.get(*t).copied().unwrap_or(0))
            .sum()
    };
    let w = sim.stats().snapshot().watch(|k| k.resource == resource);
    assert_eq!(
        objects(&w),
        seen.applied.load(Ordering::SeqCst),
        "{kind:?}/{way:?}: object events counted as delivered vs read: {w:?}"
    );
    assert_eq!((w.open, w.queued), (1, 0), "{kind:?}/{way:?}: {w:?}");
    let (inits, errors) = (
        seen.inits.load(Ordering::SeqCst),
        seen.errors.load(Ordering::SeqCst),
    );
    match way {
        // The first watch, then the resumed one; the first list only.
        Way::Resume => {
            assert_eq!((w.opened, inits, errors), (2, 1, 0), "{kind:?}: {w:?}")
        }
        // The first watch, the resumed one (410 Gone), the one after the re-list.
        Way::Gone => {
            assert_eq!((w.opened, inits, errors), (3, 2, 1), "{kind:?}: {w:?}");
            assert_eq!(w.by_type.get("ERROR"), Some(&1));
        }
    }
    task.abort();
}

#[tokio::test]
async fn reflector_resumes_after_compaction_and_dropped_watches_configmap() {
    reflector_recovers(Kind::ConfigMap, Way::Resume).await;
}

#[tokio::test]
async fn reflector_resumes_after_compaction_and_dropped_watches_crd() {
    reflector_recovers(Kind::Crd, Way::Resume).await;
}

#[tokio::test]
async fn reflector_relists_after_410_on_compaction_and_dropped_watches_configmap() {
    reflector_recovers(Kind::ConfigMap, Way::Gone).await;
}

#[tokio::test]
async fn reflector_relists_after_410_on_compaction_and_dropped_watches_crd() {
    reflector_recovers(Kind::Crd, Way::Gone).await;
}

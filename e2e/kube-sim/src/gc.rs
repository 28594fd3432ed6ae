//! The garbage collector and namespace finalizer: the only controllers the stand-in runs.
//!
//! Runs as a background task woken after writes (as the real GC reacts to its informers,
//! so deletions of dependents are asynchronous, as clients expect):
//!
//! * background propagation: an object whose every ownerReference names a uid that no
//!   longer exists is deleted (its own finalizers still apply);
//! * foreground propagation: an owner being deleted with the `foregroundDeletion`
//!   finalizer has its dependents deleted; once none remain the finalizer is removed;
//! * orphan propagation: the `orphan` finalizer makes the GC strip ownerReferences to the
//!   owner from its dependents, then removes the finalizer;
//! * namespaces being deleted have their contents deleted, then disappear.
//!
//! Not modelled: `blockOwnerDeletion` ordering beyond the above, and ownerReferences whose
//! uid exists but whose kind/name do not match (the real GC treats those as absent).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use crate::store::{DeleteOpts, State, Store};

fn uid(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/uid").and_then(Value::as_str)
}

fn deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

fn has_finalizer(obj: &Value, f: &str) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(f)))
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// One pass; returns whether anything changed (the caller repeats until quiet).
pub(crate) fn collect_once(st: &mut State) -> bool {
    let all = st.all_objects();
    let uids: HashSet<&str> = all.iter().filter_map(|(_, o)| uid(o)).collect();
    let mut dependents: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (_, o)) in all.iter().enumerate() {
        for u in owner_uids(o) {
            dependents.entry(u).or_default().push(i);
        }
    }
    let background = DeleteOpts {
        propagation: Some("Background".into()),
        ..Default::default()
    };
    let mut changed = false;
    for (key, obj) in &all {
        let Some(t) = st.target_of(key, obj) else {
            continue;
        };
        let my_uid = uid(obj).unwrap_or_default().to_string();
        let deps: Vec<&(crate::registry::ResourceKey, Value)> = dependents
            .get(&my_uid)
            .map(|v| v.iter().map(|i| &all[*i]).collect())
            .unwrap_or_default();
        if deleting(obj) && has_finalizer(obj, "orphan") {
            for (dk, d) in &deps {
                if let Some(dt) = st.target_of(dk, d) {
                    let refs: Vec<Value> = d
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter(|r| r.get("uid").and_then(Value::as_str) != Some(&my_uid))
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    st.set_owner_refs(&dt, refs);
                }
            }
            st.remove_finalizer(&t, "orphan");
            return true;
        }
        if deleting(obj) && has_finalizer(obj, "foregroundDeletion") {
            let live: Vec<_> = deps.iter().filter(|(_, d)| !deleting(d)).collect();
            for (dk, d) in &live {
                if let Some(dt) = st.target_of(dk, d) {
                    let _ = st.delete(&dt, &background, "generic-garbage-collector");
                    changed = true;
                }
            }
            if deps.is_empty() {
                st.remove_finalizer(&t, "foregroundDeletion");
                return true;
            }
            continue;
        }
        if key.0.is_empty() && key.1 == "namespaces" && deleting(obj) {
            let ns = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let contents: Vec<_> = all
                .iter()
                .filter(|(k, o)| {
                    !(k.0.is_empty() && k.1 == "namespaces")
                        && o.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
                })
                .collect();
            for (ck, c) in &contents {
                if !deleting(c)
                    && let Some(ct) = st.target_of(ck, c)
                {
                    let _ = st.delete(&ct, &background, "namespace-controller");
                    changed = true;
                }
            }
            if contents.is_empty() {
                st.finalize_namespace(&t);
                return true;
            }
            continue;
        }
        let owners = owner_uids(obj);
        if !owners.is_empty() && !deleting(obj) && owners.iter().all(|u| !uids.contains(u.as_str()))
        {
            let _ = st.delete(&t, &background, "generic-garbage-collector");
            changed = true;
        }
    }
    changed
}

/// Runs the collector until the store is dropped.
pub(crate) async fn run(store: Arc<Store>) {
    loop {
        store.gc.notified().await;
        // Repeat until quiet: one deletion can orphan further dependents.
        while store.with_state(collect_once) {}
    }
}

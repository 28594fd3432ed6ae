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

use std::sync::Arc;

use serde_json::Value;

use crate::store::{DeleteOpts, ObjRef, State, Store, deleting, owner_uids, uid_of};

fn has_finalizer(obj: &Value, f: &str) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(f)))
}

/// Handles one queued object. The store queues exactly the objects a write concerns (see
/// `State::put` and `State::take`), as the real GC's graph reacts to informer events, so
/// the collector's work per write does not grow with the number of stored objects.
pub(crate) fn collect(st: &mut State, r: &ObjRef) {
    let Some(obj) = st.object(r).cloned() else {
        return;
    };
    let Some(t) = st.target_of(&r.0, &obj) else {
        return;
    };
    let background = DeleteOpts {
        propagation: Some("Background".into()),
        ..Default::default()
    };
    let my_uid = uid_of(&obj).unwrap_or_default().to_string();
    if deleting(&obj) && has_finalizer(&obj, "orphan") {
        for (dr, d) in st.dependents_of(&my_uid) {
            if let Some(dt) = st.target_of(&dr.0, &d) {
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
        return;
    }
    if deleting(&obj) && has_finalizer(&obj, "foregroundDeletion") {
        // Dependents being deleted still hold the owner; their removal queues it again.
        let deps = st.dependents_of(&my_uid);
        for (dr, d) in &deps {
            if !deleting(d)
                && let Some(dt) = st.target_of(&dr.0, d)
            {
                let _ = st.delete(&dt, &background, "generic-garbage-collector");
            }
        }
        if deps.is_empty() {
            st.remove_finalizer(&t, "foregroundDeletion");
        }
        return;
    }
    if r.0.0.is_empty() && r.0.1 == "namespaces" && deleting(&obj) {
        let contents = st.namespace_contents(&r.2);
        for (cr, c) in &contents {
            if !deleting(c)
                && let Some(ct) = st.target_of(&cr.0, c)
            {
                let _ = st.delete(&ct, &background, "namespace-controller");
            }
        }
        if contents.is_empty() {
            st.finalize_namespace(&t);
        }
        return;
    }
    let owners = owner_uids(&obj);
    if !owners.is_empty() && !deleting(&obj) && owners.iter().all(|u| !st.uid_exists(u)) {
        let _ = st.delete(&t, &background, "generic-garbage-collector");
    }
}

/// Runs the collector until the store is dropped: after each wake-up, drains the queue
/// one object per lock acquisition so that requests interleave with a long cascade.
pub(crate) async fn run(store: Arc<Store>) {
    loop {
        store.gc.notified().await;
        while store.with_state(|st| match st.gc_pop() {
            Some(r) => {
                collect(st, &r);
                true
            }
            None => false,
        }) {}
    }
}

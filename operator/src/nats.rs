//! The managed NATS as a child that may fail on its own: what needs its StatefulSet
//! re-created, which volumes grow in place, and what a failure means for the pool. Pure;
//! the controller does the API calls.
//!
//! ```text
//!   live NATS StatefulSet ─┐
//!   desired (resources)  ──┴─► recreate_reason ── Some ──► delete (orphan: pods and
//!                              │                           claims stay) ─► next pass creates
//!                              └─ None ─► server-side apply ─► claims_to_grow ─► patch PVCs
//!   any failure ─► NatsProblem ─► BusAvailable=False + Event; gateways and scaling go on
//! ```
//!
//! Why re-create and not refuse: a StatefulSet's `volumeClaimTemplates`, `serviceName`,
//! `podManagementPolicy` and `selector` cannot change (a real API server answers 422),
//! yet adding `delivery.storage`, resizing it or growing the server into a cluster are
//! ordinary day-two changes. Deleting the StatefulSet with `propagationPolicy: Orphan`
//! keeps its pods serving and its PersistentVolumeClaims bound (a StatefulSet never
//! deletes claims unless told to); the new StatefulSet adopts the pods and rolls them to
//! the new template one at a time. A claim that must grow is patched in place (allowed
//! when its storage class has `allowVolumeExpansion`); a claim never shrinks (the API
//! refuses it, and the refusal becomes the pool's condition).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::validate::SpecError;

/// Why the managed NATS is not (fully) applied. Never gates the gateways: it becomes the
/// pool's `BusAvailable` condition and an Event, and is retried on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsProblem {
    /// The API server refused a NATS object (400/422: nothing a retry fixes until the
    /// spec changes).
    #[error("{0}")]
    Rejected(String),
    /// An API call about a NATS object failed (retried).
    #[error("applying the managed NATS failed: {0}")]
    Api(String),
    /// The StatefulSet is being re-created to change a field that cannot change in
    /// place; its pods keep running meanwhile.
    #[error("re-creating the NATS StatefulSet {name} (its pods and volumes are kept): {reason}")]
    Recreating {
        /// The StatefulSet.
        name: String,
        /// The fields that changed.
        reason: String,
    },
    /// A volume could not grow to the new `delivery.storage`.
    #[error("volume {claim} could not be resized to {size}: {message}")]
    Resize {
        /// The PersistentVolumeClaim.
        claim: String,
        /// The size asked for.
        size: String,
        /// The API server's answer.
        message: String,
    },
}

impl NatsProblem {
    /// The condition's and the Event's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            NatsProblem::Rejected(_) => "NatsRejected",
            NatsProblem::Api(_) => "NatsApplyFailed",
            NatsProblem::Recreating { .. } => "NatsRecreating",
            NatsProblem::Resize { .. } => "NatsVolumeResizeFailed",
        }
    }

    /// A spec problem of a NATS object as a NATS problem.
    pub fn from_spec(problem: SpecError) -> Self {
        NatsProblem::Rejected(problem.to_string())
    }
}

/// The fields of `desired` that differ from `live` and cannot change in place; `None`
/// when an apply can do the change. Compares what the operator sets: claim templates
/// by name and requested storage, not the defaults a server fills in.
pub fn recreate_reason(live: &StatefulSet, desired: &StatefulSet) -> Option<String> {
    let (Some(a), Some(b)) = (live.spec.as_ref(), desired.spec.as_ref()) else {
        return None;
    };
    let mut changed = Vec::new();
    if a.service_name.as_deref().unwrap_or_default()
        != b.service_name.as_deref().unwrap_or_default()
    {
        changed.push("serviceName");
    }
    let policy = |p: &Option<String>| p.clone().unwrap_or_else(|| "OrderedReady".into());
    if policy(&a.pod_management_policy) != policy(&b.pod_management_policy) {
        changed.push("podManagementPolicy");
    }
    if a.selector.match_labels != b.selector.match_labels {
        changed.push("selector");
    }
    if claims(a.volume_claim_templates.as_deref()) != claims(b.volume_claim_templates.as_deref()) {
        changed.push("volumeClaimTemplates (delivery.storage)");
    }
    (!changed.is_empty()).then(|| format!("{} cannot change in place", changed.join(", ")))
}

/// Claim templates as (name → requested storage).
fn claims(templates: Option<&[PersistentVolumeClaim]>) -> BTreeMap<String, Option<Quantity>> {
    templates
        .unwrap_or_default()
        .iter()
        .map(|claim| {
            let storage = claim
                .spec
                .as_ref()
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .cloned();
            (claim.metadata.name.clone().unwrap_or_default(), storage)
        })
        .collect()
}

/// The storage a desired StatefulSet's `data` claim template asks for.
pub fn requested_storage(desired: &StatefulSet) -> Option<Quantity> {
    claims(desired.spec.as_ref()?.volume_claim_templates.as_deref())
        .remove("data")
        .flatten()
}

/// Names of the claims the StatefulSet's pods hold (`data-<sts>-<ordinal>`), for
/// `replicas` pods.
pub fn claim_names(sts: &str, replicas: i32) -> Vec<String> {
    (0..replicas.max(0))
        .map(|i| format!("data-{sts}-{i}"))
        .collect()
}

/// Whether an existing claim must be patched to `want`: its request differs. A smaller
/// `want` is tried too, so that the API server's refusal (claims never shrink) reaches
/// the pool's condition instead of the spec silently not applying.
pub fn claim_needs_resize(claim: &PersistentVolumeClaim, want: &Quantity) -> bool {
    let have = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    have != Some(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sts(spec: serde_json::Value) -> StatefulSet {
        serde_json::from_value(json!({"metadata": {"name": "p-nats"}, "spec": spec})).unwrap()
    }

    fn spec(storage: Option<&str>, service: &str) -> serde_json::Value {
        let mut spec = json!({
            "serviceName": service,
            "podManagementPolicy": "Parallel",
            "replicas": 3,
            "selector": {"matchLabels": {"app": "nats"}},
            "template": {"metadata": {"labels": {"app": "nats"}}},
        });
        if let Some(size) = storage {
            spec["volumeClaimTemplates"] = json!([{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
            }]);
        }
        spec
    }

    #[test]
    fn only_fields_that_cannot_change_in_place_ask_for_a_re_create() {
        let live = sts(spec(None, "p-nats-cluster"));
        // Replicas and the template change by apply.
        let mut scaled = spec(None, "p-nats-cluster");
        scaled["replicas"] = json!(5);
        scaled["template"]["metadata"]["labels"]["x"] = json!("y");
        assert_eq!(recreate_reason(&live, &sts(scaled)), None);
        // Adding, resizing or removing storage does not.
        let added = recreate_reason(&live, &sts(spec(Some("10Gi"), "p-nats-cluster"))).unwrap();
        assert!(added.contains("volumeClaimTemplates"), "{added}");
        let sized = sts(spec(Some("10Gi"), "p-nats-cluster"));
        assert!(recreate_reason(&sized, &sts(spec(Some("20Gi"), "p-nats-cluster"))).is_some());
        assert_eq!(
            recreate_reason(&sized, &sts(spec(Some("10Gi"), "p-nats-cluster"))),
            None
        );
        assert!(recreate_reason(&sized, &live).is_some());
        // The headless Service of a StatefulSet made before clusters existed.
        let old = recreate_reason(&sts(spec(None, "p-nats")), &live).unwrap();
        assert!(old.contains("serviceName"), "{old}");
        // A server-filled default is no change.
        let mut defaulted = spec(None, "p-nats-cluster");
        defaulted["podManagementPolicy"] = json!(null);
        let mut ordered = spec(None, "p-nats-cluster");
        ordered["podManagementPolicy"] = json!("OrderedReady");
        assert_eq!(recreate_reason(&sts(defaulted), &sts(ordered)), None);
    }

    #[test]
    fn claims_are_named_per_pod_and_resized_when_their_request_differs() {
        assert_eq!(claim_names("p-nats", 2), ["data-p-nats-0", "data-p-nats-1"]);
        let want = requested_storage(&sts(spec(Some("20Gi"), "s"))).unwrap();
        assert_eq!(want, Quantity("20Gi".into()));
        let claim = |size: &str| -> PersistentVolumeClaim {
            serde_json::from_value(json!({"spec": {"resources": {"requests": {"storage": size}}}}))
                .unwrap()
        };
        assert!(claim_needs_resize(&claim("10Gi"), &want));
        assert!(!claim_needs_resize(&claim("20Gi"), &want));
        assert_eq!(requested_storage(&sts(spec(None, "s"))), None);
    }
}

//! Which objects a pool may write: pure checks, run before anything is written.
//!
//! ```text
//!  spec part of reconcile(pool)
//!    1. siblings (pool cache) ── name_collision(pool, older sibling) ─► NameCollision
//!    2. each child: GET metadata ── check_owner(pool, kind/name, meta) ─► ChildNotOwned
//!    3. only then: server-side apply of every child
//! ```
//!
//! Children are applied with `force`, which takes every field it sets from whoever had
//! it, the `ownerReferences` included: applied blindly, a pool adopts any object that
//! happens to carry one of its children's names (a user's Service `web-api` when pool
//! `web` is created), rewrites it, and the garbage collector then deletes it with the
//! pool. So before writing, every child that exists must carry this pool's *controller*
//! reference (matched by uid, so a new pool of the same name does not inherit a deleted
//! one's leftovers); one that does not stops the whole spec part, with nothing written.
//!
//! Children are named `P`, `P-api`, `P-headless`, `P-nats`... so pool `a-api` and pool
//! `a` both want a Service `a-api`. Renaming the children injectively would move the
//! Services clients and backends already address, so instead two pools whose children
//! could collide are refused deterministically: the older pool (creation time, then
//! name) keeps its names, the younger one is refused with a condition naming it. The
//! check covers every child a pool may ever have (the managed-NATS ones too), so
//! switching NATS on later cannot collide either. See docs/operator.md.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use tether_crds::ConnectionPool;

use crate::resources;
use crate::validate::SpecError;

/// The kinds of object a pool writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// apps/v1.
    StatefulSet,
    /// v1.
    Service,
    /// policy/v1.
    PodDisruptionBudget,
    /// v1.
    ConfigMap,
    /// v1.
    ServiceAccount,
    /// rbac.authorization.k8s.io/v1.
    Role,
    /// rbac.authorization.k8s.io/v1.
    RoleBinding,
    /// networking.k8s.io/v1.
    NetworkPolicy,
    /// v1: the generated managed-NATS token.
    Secret,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One object of a pool: kind and name.
pub type Child = (Kind, String);

/// Every (kind, name) a pool called `name` may ever write, managed NATS included. Pods
/// (`P-<ordinal>`, `P-nats-<ordinal>`) and PVCs follow from the StatefulSet names.
pub fn child_names(name: &str) -> BTreeSet<Child> {
    let with = |suffix: &str| format!("{name}{suffix}");
    BTreeSet::from([
        (Kind::StatefulSet, name.to_string()),
        (Kind::StatefulSet, with("-nats")),
        (Kind::Service, name.to_string()),
        (Kind::Service, with("-headless")),
        (Kind::Service, with("-api")),
        (Kind::Service, with("-nats")),
        (Kind::Service, with("-nats-cluster")),
        (Kind::PodDisruptionBudget, name.to_string()),
        (Kind::PodDisruptionBudget, with("-nats")),
        (Kind::ConfigMap, with("-config")),
        (Kind::ServiceAccount, with("-gateway")),
        (Kind::Role, with("-gateway")),
        (Kind::RoleBinding, with("-gateway")),
        (Kind::NetworkPolicy, with("-gateway")),
        (Kind::NetworkPolicy, with("-nats")),
        (Kind::Secret, with("-nats-auth")),
    ])
}

/// Every object both pools would write, as (kind, name).
pub fn shared_children(a: &str, b: &str) -> Vec<Child> {
    // Every child name starts with its pool's name: only a pool whose name starts with
    // the other's can share one (a quick exit for a namespace of many pools).
    if a == b || !(a.starts_with(b) || b.starts_with(a)) {
        return Vec::new();
    }
    child_names(a)
        .intersection(&child_names(b))
        .cloned()
        .collect()
}

/// An older sibling that would write objects this pool writes too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    /// The sibling's name.
    pub pool: String,
    /// The objects both would write, (kind, name).
    pub objects: Vec<Child>,
}

impl Collision {
    /// The refusal, naming the sibling and the first shared object.
    pub fn refusal(&self) -> SpecError {
        let (kind, name) = &self.objects[0];
        SpecError::NameCollision {
            pool: self.pool.clone(),
            object: format!("{kind}/{name}"),
        }
    }
}

/// Whether `other` was there first: older creation time, then the smaller name (two
/// pools created within the same second still get one answer).
fn precedes(other: &ConnectionPool, pool: &ConnectionPool) -> bool {
    let created = |p: &ConnectionPool| p.metadata.creation_timestamp.clone().map(|t| t.0);
    match (created(other), created(pool)) {
        (Some(a), Some(b)) if a != b => a < b,
        _ => other.name_any() < pool.name_any(),
    }
}

/// The earliest sibling (another pool of `pool`'s namespace) that precedes `pool` and
/// would write an object `pool` writes too. Such a pool is refused, unless it already
/// controls every shared object: it was created in the same second as the sibling
/// (which the name tie-break prefers) and got there first, and refusing it now would
/// leave both pools refused (the sibling meets its objects as `ChildNotOwned`).
pub fn name_collision<'a>(
    pool: &ConnectionPool,
    siblings: impl IntoIterator<Item = &'a ConnectionPool>,
) -> Option<Collision> {
    let ns = pool.namespace();
    let name = pool.name_any();
    siblings
        .into_iter()
        .filter(|s| s.namespace() == ns && s.name_any() != name && precedes(s, pool))
        .filter_map(|s| {
            let objects = shared_children(&name, &s.name_any());
            (!objects.is_empty()).then_some((s, objects))
        })
        .min_by(|(a, _), (b, _)| {
            if precedes(a, b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        })
        .map(|(sibling, objects)| Collision {
            pool: sibling.name_any(),
            objects,
        })
}

/// Whether `meta` (of an existing object) names `pool` as its controller, by uid.
pub fn controlled_by(meta: &ObjectMeta, pool: &ConnectionPool) -> bool {
    let Some(uid) = pool.metadata.uid.as_deref() else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// The refusal of `pool` if `Kind/name` exists (`meta`) and is not its own. The owner
/// named in the message is the object's controller, if it has one.
pub fn check_owner(
    pool: &ConnectionPool,
    kind: Kind,
    name: &str,
    meta: Option<&ObjectMeta>,
) -> Result<(), SpecError> {
    let Some(meta) = meta else {
        return Ok(());
    };
    if controlled_by(meta, pool) {
        return Ok(());
    }
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| format!("{} {}", o.kind, o.name));
    Err(SpecError::ChildNotOwned {
        object: format!("{kind}/{name}"),
        owner,
    })
}

/// The (kind, name) of every child the spec part is about to write for `pool`, in the
/// order it writes them (`generated_secret`: the managed NATS token is generated).
pub fn planned_children(pool: &ConnectionPool, desired: &resources::Desired) -> Vec<Child> {
    let name = |meta: &ObjectMeta| meta.name.clone().unwrap_or_default();
    let mut out = vec![
        (
            Kind::ServiceAccount,
            name(&desired.service_account.metadata),
        ),
        (Kind::Role, name(&desired.role.metadata)),
        (Kind::RoleBinding, name(&desired.role_binding.metadata)),
        (Kind::ConfigMap, name(&desired.config_map.metadata)),
        (Kind::Service, name(&desired.headless_service.metadata)),
        (Kind::Service, name(&desired.client_service.metadata)),
        (Kind::Service, name(&desired.api_service.metadata)),
        (Kind::PodDisruptionBudget, name(&desired.pdb.metadata)),
        (Kind::NetworkPolicy, name(&desired.gateway_policy.metadata)),
    ];
    if let Some(policy) = &desired.nats_policy {
        out.push((Kind::NetworkPolicy, name(&policy.metadata)));
    }
    if let Some(svc) = &desired.nats_cluster_service {
        out.push((Kind::Service, name(&svc.metadata)));
    }
    if let Some(pdb) = &desired.nats_pdb {
        out.push((Kind::PodDisruptionBudget, name(&pdb.metadata)));
    }
    if let Some((sts, svc)) = &desired.nats {
        out.push((Kind::Service, name(&svc.metadata)));
        out.push((Kind::StatefulSet, name(&sts.metadata)));
    }
    if resources::generates_nats_token(pool) {
        out.push((Kind::Secret, resources::nats_auth_secret_name(pool)));
    }
    out.push((Kind::StatefulSet, name(&desired.stateful_set.metadata)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pool;
    use crate::resources::{Settings, desired};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    fn created(mut p: ConnectionPool, secs: i64) -> ConnectionPool {
        p.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap(),
        ));
        p.metadata.uid = Some(format!("uid-{}", p.name_any()));
        p
    }

    #[test]
    fn the_names_listed_are_the_names_written() {
        // Every child the builders produce is in `child_names`, for a pool with every
        // optional child switched on: the collision check covers what is applied.
        let mut p = pool("acme");
        p.spec.replicas.max = 3;
        p.spec.routing =
            serde_json::from_value(serde_json::json!({"nats": {"managed": true}})).unwrap();
        let d = desired(&p, &Settings::default(), 1).unwrap();
        let all = child_names("acme");
        let planned = planned_children(&p, &d);
        assert_eq!(planned.len(), 16, "{planned:?}");
        for child in planned {
            assert!(all.contains(&child), "{child:?} missing from child_names");
        }
    }

    #[test]
    fn sibling_names_that_share_a_child() {
        let svc = |n: &str| vec![(Kind::Service, n.to_string())];
        assert_eq!(shared_children("a", "a-api"), svc("a-api"));
        assert_eq!(shared_children("a-api", "a"), svc("a-api"));
        assert_eq!(shared_children("a", "a-headless"), svc("a-headless"));
        // The StatefulSet too, hence the pods a-nats-0... and their volumes.
        assert_eq!(
            shared_children("a", "a-nats"),
            vec![
                (Kind::StatefulSet, "a-nats".to_string()),
                (Kind::Service, "a-nats".to_string()),
                (Kind::PodDisruptionBudget, "a-nats".to_string()),
            ]
        );
        // Names that only look close write different objects.
        for other in [
            "a-config",
            "a-gateway",
            "a-nats-auth",
            "a-0",
            "b",
            "ab",
            "a-apix",
        ] {
            assert_eq!(shared_children("a", other), vec![], "{other}");
        }
        assert!(shared_children("a", "a").is_empty());
    }

    #[test]
    fn the_older_pool_keeps_its_names_and_the_younger_is_refused() {
        let a = created(pool("a"), 0);
        let a_api = created(pool("a-api"), 10);
        let b = created(pool("b"), 5);
        let all = [a.clone(), a_api.clone(), b.clone()];
        assert_eq!(name_collision(&a, &all), None);
        assert_eq!(name_collision(&b, &all), None);
        assert_eq!(
            name_collision(&a_api, &all).map(|c| c.refusal()),
            Some(SpecError::NameCollision {
                pool: "a".into(),
                object: "Service/a-api".into()
            })
        );
        // Created the other way round, the other one is refused.
        let a = created(pool("a"), 20);
        let all = [a.clone(), a_api.clone()];
        assert_eq!(name_collision(&a_api, &all), None);
        assert_eq!(
            name_collision(&a, &all).map(|c| c.refusal().reason()),
            Some("NameCollision")
        );
        // The same second: the smaller name wins, from either side.
        let a = created(pool("a"), 10);
        let all = [a.clone(), a_api.clone()];
        assert_eq!(name_collision(&a, &all), None);
        assert!(name_collision(&a_api, &all).is_some());
        // Another namespace is no sibling.
        let mut elsewhere = created(pool("a"), 0);
        elsewhere.metadata.namespace = Some("other".into());
        assert_eq!(name_collision(&a_api, &[elsewhere]), None);
    }

    #[test]
    fn only_an_object_this_pool_controls_may_be_written() {
        let p = created(pool("web"), 0);
        assert_eq!(check_owner(&p, Kind::Service, "web-api", None), Ok(()));

        let reference = |uid: &str, controller: bool| OwnerReference {
            api_version: "tether.dev/v1alpha1".into(),
            kind: "ConnectionPool".into(),
            name: "web".into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: Some(true),
        };
        let with = |refs: Vec<OwnerReference>| ObjectMeta {
            owner_references: Some(refs),
            ..Default::default()
        };
        let ours = with(vec![reference("uid-web", true)]);
        assert_eq!(
            check_owner(&p, Kind::Service, "web-api", Some(&ours)),
            Ok(())
        );

        // A user's object: no owner at all.
        let users = ObjectMeta::default();
        let err = check_owner(&p, Kind::Service, "web-api", Some(&users)).unwrap_err();
        assert_eq!(err.reason(), "ChildNotOwned");
        assert!(err.to_string().contains("Service/web-api"), "{err}");
        assert!(err.may_resolve_itself());

        // A deleted pool's leftover (same name, another uid), and a non-controller
        // reference of ours: neither is ours to write.
        let stale = with(vec![reference("uid-old", true)]);
        let err = check_owner(&p, Kind::Service, "web-api", Some(&stale)).unwrap_err();
        assert!(err.to_string().contains("ConnectionPool web"), "{err}");
        let weak = with(vec![reference("uid-web", false)]);
        assert!(check_owner(&p, Kind::Service, "web-api", Some(&weak)).is_err());
    }
}

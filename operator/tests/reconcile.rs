//! The operator end to end against the Kubernetes API stand-in (real HTTP, real watches):
//! create, change, delete, invalid specs, injected API faults, and that the pods'
//! status entries survive the operator's status writes.

mod common;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_kube_sim::FaultMatch;
use tether_operator::resources::CONFIG_HASH_ANNOTATION;

fn pools(client: &Client) -> Api<ConnectionPool> {
    Api::namespaced(client.clone(), NS)
}

fn api<K>(client: &Client) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(client.clone(), NS)
}

async fn wait_sts(client: &Client, name: &str) -> StatefulSet {
    let sts = api::<StatefulSet>(client);
    eventually("the StatefulSet", Duration::from_secs(10), || async {
        sts.get_opt(name).await.unwrap()
    })
    .await
}

/// Does what the StatefulSet controller would: `ready` pods exist, updated and ready.
async fn play_statefulset_controller(client: &Client, sts: &StatefulSet, ready: i32) {
    api::<StatefulSet>(client)
        .patch_status(
            &sts.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "replicas": ready, "readyReplicas": ready, "updatedReplicas": ready, "availableReplicas": ready,
                "observedGeneration": sts.metadata.generation, "currentRevision": "r1", "updateRevision": "r1",
            }})),
        )
        .await
        .unwrap();
}

fn template_hash(sts: &StatefulSet) -> String {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone()
}

#[tokio::test]
async fn a_new_pool_gets_its_objects_owners_probes_rbac_and_status() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    let created = pools(&client)
        .create(&PostParams::default(), &pool("acme", json!({})))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    let sts = wait_sts(&client, "acme").await;
    let owned = |meta: &kube::api::ObjectMeta| {
        let owners = meta.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1, "{:?}", meta.name);
        assert_eq!(
            (owners[0].uid.as_str(), owners[0].controller),
            (uid.as_str(), Some(true))
        );
        assert_eq!(meta.labels.as_ref().unwrap()["tether.dev/pool"], "acme");
    };
    owned(&sts.metadata);
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.test/tether-gateway:test")
    );
    assert_eq!(
        container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );

    let cm = eventually("the ConfigMap", Duration::from_secs(10), || async {
        api::<ConfigMap>(&client)
            .get_opt("acme-config")
            .await
            .unwrap()
    })
    .await;
    owned(&cm.metadata);
    let yaml = &cm.data.as_ref().unwrap()["gateway.yaml"];
    tether_config::GatewayConfig::from_yaml(yaml).expect("the gateway accepts the rendered config");
    for name in ["acme", "acme-headless", "acme-api"] {
        owned(&api::<Service>(&client).get(name).await.unwrap().metadata);
    }
    owned(
        &api::<PodDisruptionBudget>(&client)
            .get("acme")
            .await
            .unwrap()
            .metadata,
    );
    owned(
        &api::<ServiceAccount>(&client)
            .get("acme-gateway")
            .await
            .unwrap()
            .metadata,
    );
    // Neighbours are kept off the push API.
    let policy = api::<NetworkPolicy>(&client)
        .get("acme-gateway")
        .await
        .unwrap();
    owned(&policy.metadata);
    let role = api::<Role>(&client).get("acme-gateway").await.unwrap();
    owned(&role.metadata);
    let rule = &role.rules.as_ref().unwrap()[0];
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&["acme".to_string()][..])
    );
    owned(
        &api::<RoleBinding>(&client)
            .get("acme-gateway")
            .await
            .unwrap()
            .metadata,
    );

    // Children were written by one field manager, server-side.
    let managers: Vec<_> = sts
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["tether-operator"]);

    let pool = eventually("status", Duration::from_secs(10), || async {
        let p = pools(&client).get("acme").await.unwrap();
        (p.status.as_ref()?.observed_generation == p.metadata.generation).then_some(p)
    })
    .await;
    assert!(
        pool.finalizers()
            .contains(&"tether.dev/cleanup".to_string())
    );
    assert_eq!(
        condition(&pool, "Degraded"),
        Some(("False".into(), "AsExpected".into()))
    );
    assert_eq!(
        condition(&pool, "Ready").unwrap().0,
        "False",
        "no pod is ready yet"
    );
    let status = pool.status.as_ref().unwrap();
    assert_eq!(status.desired_replicas, Some(1));
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/name=tether-gateway,tether.dev/pool=acme")
    );

    // Play the StatefulSet controller: all pods ready → the pool turns Ready.
    play_statefulset_controller(&client, &sts, 1).await;
    let ready = eventually("Ready", Duration::from_secs(10), || async {
        let p = pools(&client).get("acme").await.unwrap();
        (condition(&p, "Ready")? == ("True".to_string(), "Available".to_string())).then_some(p)
    })
    .await;
    assert_eq!(ready.status.unwrap().ready_replicas, Some(1));
    op.stop().await;
}

#[tokio::test]
async fn spec_changes_converge_and_roll_pods_only_for_config() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    let routed =
        json!({"replicas": {"min": 1, "max": 4}, "routing": {"nats": {"url": "nats://bus:4222"}}});
    pools(&client)
        .create(&PostParams::default(), &pool("acme", routed))
        .await
        .unwrap();
    let before = wait_sts(&client, "acme").await;
    assert_eq!(before.spec.as_ref().unwrap().replicas, Some(1));

    // A resize changes the replicas, not the pod template: no rollout.
    pools(&client)
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": {"min": 3}}})),
        )
        .await
        .unwrap();
    let resized = eventually("3 replicas", Duration::from_secs(10), || async {
        let sts = api::<StatefulSet>(&client).get("acme").await.unwrap();
        (sts.spec.as_ref()?.replicas == Some(3)).then_some(sts)
    })
    .await;
    assert_eq!(
        resized.spec.as_ref().unwrap().template,
        before.spec.as_ref().unwrap().template
    );

    // A limit change changes gateway.yaml: new hash on the template, so the pods roll.
    pools(&client)
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"limits": {"outboundQueue": 256}}})),
        )
        .await
        .unwrap();
    let rolled = eventually("a new config hash", Duration::from_secs(10), || async {
        let sts = api::<StatefulSet>(&client).get("acme").await.unwrap();
        (template_hash(&sts) != template_hash(&before)).then_some(sts)
    })
    .await;
    let cm = api::<ConfigMap>(&client).get("acme-config").await.unwrap();
    assert!(cm.data.unwrap()["gateway.yaml"].contains("outboundQueue: 256"));
    assert_eq!(rolled.spec.as_ref().unwrap().replicas, Some(3));

    // A manual edit of a child is taken back on the next reconcile.
    api::<Service>(&client)
        .patch(
            "acme-api",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tether.dev/pool": "hijacked"}}})),
        )
        .await
        .unwrap();
    eventually("the label restored", Duration::from_secs(10), || async {
        let svc = api::<Service>(&client).get("acme-api").await.unwrap();
        (svc.labels()["tether.dev/pool"] == "acme").then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn deleting_a_pool_removes_everything() {
    let (sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    let managed = json!({"routing": {"nats": {"managed": true}}});
    pools(&client)
        .create(&PostParams::default(), &pool("acme", managed))
        .await
        .unwrap();
    wait_sts(&client, "acme").await;
    wait_sts(&client, "acme-nats").await;
    // A managed NATS without credentials gets a generated token, never runs open.
    let token = api::<Secret>(&client).get("acme-nats-auth").await.unwrap();
    assert_eq!(
        token.metadata.owner_references.as_ref().unwrap()[0].name,
        "acme"
    );
    let value = token.data.as_ref().unwrap()["token"].0.clone();
    assert_eq!(value.len(), 64, "32 random bytes, hex");

    pools(&client)
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the pool gone", Duration::from_secs(10), || async {
        pools(&client)
            .get_opt("acme")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    eventually(
        "the generated NATS token gone",
        Duration::from_secs(10),
        || async {
            api::<Secret>(&client)
                .get_opt("acme-nats-auth")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    eventually("children gone", Duration::from_secs(10), || async {
        let left = children_of(&client, "acme").await;
        (left == 0).then_some(())
    })
    .await;
    // The token went with the garbage collector: the operator holds no right to delete
    // Secrets (the chart grants get and create only) and never asks.
    let secret_deletes = sim
        .stats()
        .snapshot()
        .count(|k| k.verb == "delete" && k.resource == "secrets");
    assert_eq!(secret_deletes, 0);
    op.stop().await;
}

/// Pod `acme-0` reports `connections` under its own field manager, as the gateway does
/// (dated now: undated or stale entries are ignored and pruned by the autoscaler); then
/// waits until the pool's total shows it.
async fn report(client: &Client, connections: i64) {
    let entry = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": "acme"},
        "status": {"pods": [{"name": "acme-0", "connections": connections, "ready": true,
                             "draining": false, "bootId": "b1",
                             "observedAt": k8s_openapi::jiff::Timestamp::now().to_string()}]},
    });
    pools(client)
        .patch_status(
            "acme",
            &PatchParams::apply("tether-gateway/acme-0"),
            &Patch::Apply(entry),
        )
        .await
        .unwrap();
    eventually(
        &format!("totalConnections {connections}"),
        Duration::from_secs(10),
        || async {
            let p = pools(client).get("acme").await.unwrap();
            (p.status?.total_connections == Some(connections)).then_some(())
        },
    )
    .await;
}

/// The objects labelled as `pool`'s children, of every kind the operator applies.
async fn children_of(client: &Client, pool: &str) -> usize {
    async fn count<K>(client: &Client, selector: &ListParams) -> usize
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        api::<K>(client).list(selector).await.unwrap().items.len()
    }
    let selector = ListParams::default().labels(&format!("tether.dev/pool={pool}"));
    count::<StatefulSet>(client, &selector).await
        + count::<Service>(client, &selector).await
        + count::<ConfigMap>(client, &selector).await
        + count::<NetworkPolicy>(client, &selector).await
        + count::<PodDisruptionBudget>(client, &selector).await
        + count::<ServiceAccount>(client, &selector).await
        + count::<Role>(client, &selector).await
        + count::<RoleBinding>(client, &selector).await
}

async fn warning_events(client: &Client, reason: &str) -> Vec<Event> {
    api::<Event>(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some("Warning"))
        .collect()
}

#[tokio::test]
async fn invalid_specs_get_a_condition_and_an_event_and_no_objects() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));

    // The schema refuses what it can: CEL rejects min > max at admission.
    let refused = pools(&client)
        .create(
            &PostParams::default(),
            &pool("bad", json!({"replicas": {"min": 3, "max": 2}})),
        )
        .await;
    match refused {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{s:?}"),
        other => panic!("expected 422, got {other:?}"),
    }

    // What needs the cluster or a parser is the operator's: a missing Secret...
    let missing = json!({"auth": {"apiKeysSecretRef": {"name": "nope", "key": "keys"}}});
    pools(&client)
        .create(&PostParams::default(), &pool("nosecret", missing))
        .await
        .unwrap();
    // ...and an image reference that does not parse.
    let bad_image = json!({"template": {"image": "Not A/Valid:image:"}});
    pools(&client)
        .create(&PostParams::default(), &pool("badimage", bad_image))
        .await
        .unwrap();

    for (name, reason) in [("nosecret", "SecretMissing"), ("badimage", "InvalidImage")] {
        let p = eventually(reason, Duration::from_secs(10), || async {
            let p = pools(&client).get(name).await.unwrap();
            (condition(&p, "Degraded")? == ("True".to_string(), reason.to_string())).then_some(p)
        })
        .await;
        assert_eq!(condition(&p, "Ready").unwrap().0, "False");
        let events = eventually("a Warning event", Duration::from_secs(10), || async {
            let events = warning_events(&client, reason).await;
            (!events.is_empty()).then_some(events)
        })
        .await;
        let regarding = events[0].regarding.as_ref().unwrap();
        assert_eq!(regarding.name.as_deref(), Some(name));
        assert!(
            api::<StatefulSet>(&client)
                .get_opt(name)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            api::<ConfigMap>(&client)
                .get_opt(&format!("{name}-config"))
                .await
                .unwrap()
                .is_none()
        );
    }

    // Once the Secret exists, the pool converges without being touched.
    create_secret(&client, "nope", "keys").await;
    wait_sts(&client, "nosecret").await;
    eventually("recovered", Duration::from_secs(10), || async {
        let p = pools(&client).get("nosecret").await.unwrap();
        (condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    // A permanent problem is not retried in a loop: with no change, few reconciles run.
    let before = op.metrics.reconciles();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        op.metrics.reconciles() - before < 5,
        "hot loop: {} reconciles",
        op.metrics.reconciles() - before
    );
    op.stop().await;
}

/// Creates a pool and waits (up to 20 s) until its spec was applied (`Degraded` False).
async fn create_and_wait_applied(client: &Client, name: &str) {
    pools(client)
        .create(&PostParams::default(), &pool(name, json!({})))
        .await
        .unwrap();
    eventually("status written", Duration::from_secs(20), || async {
        let p = pools(client).get(name).await.unwrap();
        (condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
}

/// A disruption budget written as a count in a string (`"2"`) passes the CRD's rule, but
/// the API server's PodDisruptionBudget validation refuses a string that is not a
/// percentage (the stand-in as well): the pool still converges, with a budget of 2.
#[tokio::test]
async fn a_disruption_count_written_as_a_string_reaches_the_budget_as_a_number() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    pools(&client)
        .create(
            &PostParams::default(),
            &pool("acme", json!({"disruption": {"maxUnavailable": "2"}})),
        )
        .await
        .unwrap();
    eventually("the spec applied", Duration::from_secs(20), || async {
        let p = pools(&client).get("acme").await.unwrap();
        (condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    let pdb = api::<PodDisruptionBudget>(&client)
        .get("acme")
        .await
        .unwrap();
    assert_eq!(pdb.spec.unwrap().max_unavailable, Some(IntOrString::Int(2)));
    op.stop().await;
}

#[tokio::test]
async fn api_faults_are_retried_until_the_pool_converges() {
    let (sim, client) = cluster().await;
    // Server errors fail the reconcile (retried by error_policy with backoff);
    // throttling and 503s are retried inside kube's client, honouring Retry-After.
    sim.faults()
        .fail_next(1, FaultMatch::verb("get").on("secrets"), 500);
    sim.faults()
        .fail_next(1, FaultMatch::verb("patch").on("configmaps"), 500);
    sim.faults()
        .fail_next(1, FaultMatch::verb("patch").on("statefulsets"), 500);
    sim.faults()
        .fail_next(2, FaultMatch::verb("patch").on("connectionpools"), 429);
    sim.faults()
        .fail_next(1, FaultMatch::verb("patch").on("services"), 503);
    let op = Operator::start(&client, args("op-a"));
    // Backoff after three failures in a row: about 1 + 2 + 4 s.
    create_and_wait_applied(&client, "acme").await;
    assert!(op.metrics.errors() >= 3, "errors: {}", op.metrics.errors());
    op.stop().await;
}

#[tokio::test]
async fn a_reconcile_whose_api_call_never_answers_is_cut_off_and_retried() {
    let (sim, client) = cluster().await;
    // The first Secret read of the reconcile hangs for an hour: kube's client has no
    // read timeout, so without a bound on the reconcile this pool would never converge.
    sim.faults().add(tether_kube_sim::faults::FaultRule {
        matches: FaultMatch::verb("get").on("secrets"),
        count: Some(1),
        delay_ms: Some(3_600_000),
        ..Default::default()
    });
    let mut a = args("op-a");
    a.reconcile_timeout = Duration::from_secs(1);
    let op = Operator::start(&client, a);
    create_and_wait_applied(&client, "acme").await;
    assert!(op.metrics.errors() >= 1, "errors: {}", op.metrics.errors());
    op.stop().await;
}

#[tokio::test]
async fn the_operator_never_wipes_the_pods_status_entries() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    pools(&client)
        .create(&PostParams::default(), &pool("acme", json!({})))
        .await
        .unwrap();
    let sts = wait_sts(&client, "acme").await;
    play_statefulset_controller(&client, &sts, 1).await;

    // A gateway pod applies its own entry under its own field manager, as the gateway
    // does; the total reflects it once the operator reconciles (the status write
    // triggers one)...
    report(&client, 42).await;
    // ...and further operator writes (a spec change → new observedGeneration) keep it.
    pools(&client)
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"drain": {"deadlineSeconds": 30}}})),
        )
        .await
        .unwrap();
    let p = eventually("observedGeneration 2", Duration::from_secs(10), || async {
        let p = pools(&client).get("acme").await.unwrap();
        (p.status.as_ref()?.observed_generation == Some(2)).then_some(p)
    })
    .await;
    let pods = &p.status.as_ref().unwrap().pods;
    assert_eq!(pods.len(), 1);
    assert_eq!((pods[0].name.as_str(), pods[0].connections), ("acme-0", 42));
    op.stop().await;
}

/// The operator's own applies come back to it as watch events on its children; they are
/// no edit to take back. Creating a pool, and later changing its spec, applies each of
/// its children once (not once more for the echo of each apply).
#[tokio::test]
async fn each_child_is_applied_once_per_spec_change() {
    let (sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    let child_applies = || {
        sim.stats().snapshot().count(|k| {
            k.verb == "patch"
                && k.field_manager.as_deref() == Some("tether-operator")
                && k.resource != "connectionpools"
                && k.resource != "pods"
        })
    };
    pools(&client)
        .create(&PostParams::default(), &pool("acme", json!({})))
        .await
        .unwrap();
    let sts = wait_sts(&client, "acme").await;
    play_statefulset_controller(&client, &sts, 1).await;
    // A report, then a wait for the total it shows: the operator has worked through
    // everything queued before it, the echoes of its own applies included.
    report(&client, 5).await;
    let owned = children_of(&client, "acme").await;
    assert!(owned >= 8, "{owned} children");
    assert_eq!(child_applies(), owned as u64, "applies on create");

    let before = child_applies();
    pools(&client)
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"drain": {"deadlineSeconds": 31}}})),
        )
        .await
        .unwrap();
    eventually("observedGeneration 2", Duration::from_secs(10), || async {
        let p = pools(&client).get("acme").await.unwrap();
        (p.status.as_ref()?.observed_generation == Some(2)).then_some(())
    })
    .await;
    report(&client, 6).await;
    assert_eq!(
        child_applies() - before,
        owned as u64,
        "applies on a spec change"
    );
    op.stop().await;
}

/// `--concurrency` bounds the reconciles in flight: with every apply held up by the API
/// server, a burst of pools is worked on at most that many at a time. `--debounce`
/// folds the burst of events one pool's own apply causes into one reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_and_debounce_reach_the_controller() {
    use tether_kube_sim::faults::FaultMatch;
    let (sim, client) = cluster().await;
    sim.faults().add_latency(
        FaultMatch::verb("patch").on("configmaps"),
        Duration::from_millis(300),
    );
    let mut bounded = args("op-a");
    bounded.concurrency = 2;
    bounded.debounce = Duration::from_millis(500);
    let op = Operator::start(&client, bounded);
    for i in 0..8 {
        pools(&client)
            .create(
                &PostParams::default(),
                &pool(&format!("burst-{i}"), json!({})),
            )
            .await
            .unwrap();
    }
    for i in 0..8 {
        wait_sts(&client, &format!("burst-{i}")).await;
    }
    let most = op.metrics.most_in_flight();
    assert!(most <= 2, "{most} reconciles at once with --concurrency 2");
    assert!(most >= 1);
    // Settled: with a half-second debounce, each pool's burst of child and status
    // events (8 children, its status, its finalizer) was folded into a few reconciles.
    sim.faults().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_pool = op.metrics.reconciles() as f64 / 8.0;
    assert!(per_pool <= 6.0, "{per_pool} reconciles per pool");
    op.stop().await;
}

/// The pool's `Degraded` condition once it is True with `reason`, and the Warning Events
/// of that reason about it.
async fn refused(client: &Client, name: &str, reason: &str) -> (ConnectionPool, Vec<Event>) {
    let p = eventually(reason, Duration::from_secs(10), || async {
        let p = pools(client).get(name).await.unwrap();
        (condition(&p, "Degraded")? == ("True".to_string(), reason.to_string())).then_some(p)
    })
    .await;
    let events = eventually("a Warning event", Duration::from_secs(10), || async {
        let events: Vec<Event> = warning_events(client, reason)
            .await
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        (!events.is_empty()).then_some(events)
    })
    .await;
    (p, events)
}

fn degraded_message(pool: &ConnectionPool) -> String {
    pool.status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message
        .clone()
}

async fn wait_pool_gone(client: &Client, name: &str) {
    eventually("the pool gone", Duration::from_secs(10), || async {
        pools(client)
            .get_opt(name)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

/// Issue 21: pool `bar-web` must not adopt, rewrite or delete a user's Service that
/// happens to be called like its push-API Service.
#[tokio::test]
async fn a_users_object_with_a_childs_name_is_never_adopted_rewritten_or_deleted() {
    let (_sim, client) = cluster().await;
    let services = api::<Service>(&client);
    let users: Service = serde_json::from_value(json!({
        "metadata": {"name": "bar-web-api", "labels": {"team": "other"}},
        "spec": {"selector": {"app": "other"}, "ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap();
    let before = services
        .create(&PostParams::default(), &users)
        .await
        .unwrap();
    let as_json = |svc: &Service| serde_json::to_string(svc).unwrap();

    let op = Operator::start(&client, args("op-a"));
    pools(&client)
        .create(&PostParams::default(), &pool("bar-web", json!({})))
        .await
        .unwrap();
    let (p, events) = refused(&client, "bar-web", "ChildNotOwned").await;
    let message = degraded_message(&p);
    assert!(message.contains("Service/bar-web-api"), "{message}");
    assert!(
        events[0]
            .note
            .as_deref()
            .unwrap()
            .contains("Service/bar-web-api")
    );
    // Nothing was written: not the user's Service, not any other child.
    assert_eq!(
        as_json(&services.get("bar-web-api").await.unwrap()),
        as_json(&before)
    );
    assert_eq!(children_of(&client, "bar-web").await, 0);
    assert!(
        api::<StatefulSet>(&client)
            .get_opt("bar-web")
            .await
            .unwrap()
            .is_none()
    );

    // Deleting the pool leaves the user's Service as it was.
    pools(&client)
        .delete("bar-web", &DeleteParams::default())
        .await
        .unwrap();
    wait_pool_gone(&client, "bar-web").await;
    assert_eq!(
        as_json(&services.get("bar-web-api").await.unwrap()),
        as_json(&before)
    );

    // Once the user's object is gone, the pool converges without being touched.
    pools(&client)
        .create(&PostParams::default(), &pool("bar-web", json!({})))
        .await
        .unwrap();
    refused(&client, "bar-web", "ChildNotOwned").await;
    services
        .delete("bar-web-api", &DeleteParams::default())
        .await
        .unwrap();
    wait_sts(&client, "bar-web").await;
    eventually("recovered", Duration::from_secs(10), || async {
        let p = pools(&client).get("bar-web").await.unwrap();
        (condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    let svc = services.get("bar-web-api").await.unwrap();
    assert_eq!(svc.labels()["tether.dev/pool"], "bar-web");
    op.stop().await;
}

/// Every object of the kinds the operator writes, as (kind/name, owner uids).
async fn owners_of_everything(client: &Client) -> Vec<(String, Vec<String>)> {
    async fn of<K>(client: &Client, out: &mut Vec<(String, Vec<String>)>)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        for obj in api::<K>(client)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            let uids = obj
                .owner_references()
                .iter()
                .map(|o| o.uid.clone())
                .collect();
            out.push((format!("{}/{}", K::kind(&()), obj.name_any()), uids));
        }
    }
    let mut out = Vec::new();
    of::<StatefulSet>(client, &mut out).await;
    of::<Service>(client, &mut out).await;
    of::<ConfigMap>(client, &mut out).await;
    of::<NetworkPolicy>(client, &mut out).await;
    of::<PodDisruptionBudget>(client, &mut out).await;
    of::<ServiceAccount>(client, &mut out).await;
    of::<Role>(client, &mut out).await;
    of::<RoleBinding>(client, &mut out).await;
    of::<Secret>(client, &mut out).await;
    out
}

/// Issue 21: pools `a` and `a-api` both name a Service `a-api` (the push API of `a`, the
/// client Service of `a-api`). The older pool keeps it; the younger is refused with a
/// condition and an Event naming the older, writes nothing, and converges once the
/// older is gone.
#[tokio::test]
async fn sibling_pools_whose_children_collide_never_write_the_same_object() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    let a = pools(&client)
        .create(&PostParams::default(), &pool("a", json!({})))
        .await
        .unwrap();
    wait_sts(&client, "a").await;
    let a_api_svc = api::<Service>(&client).get("a-api").await.unwrap();

    let younger = pools(&client)
        .create(&PostParams::default(), &pool("a-api", json!({})))
        .await
        .unwrap();
    let (p, events) = refused(&client, "a-api", "NameCollision").await;
    let message = degraded_message(&p);
    assert!(
        message.contains("ConnectionPool \"a\"") && message.contains("Service/a-api"),
        "{message}"
    );
    assert!(events[0].note.as_deref().unwrap().contains("\"a\""));
    assert_eq!(children_of(&client, "a-api").await, 0);
    // Pool a's Service is as pool a wrote it.
    let now = api::<Service>(&client).get("a-api").await.unwrap();
    assert_eq!(now.resource_version(), a_api_svc.resource_version());
    let a_uid = a.metadata.uid.clone().unwrap();
    let younger_uid = younger.metadata.uid.clone().unwrap();
    for (object, uids) in owners_of_everything(&client).await {
        assert!(!uids.contains(&younger_uid), "{object} written by a-api");
        assert!(uids.len() <= 1, "{object} has owners {uids:?}");
    }
    assert_eq!(
        condition(&pools(&client).get("a").await.unwrap(), "Degraded").unwrap(),
        ("False".to_string(), "AsExpected".to_string())
    );

    // Pool a deleted: its children go with it, and a-api takes its names.
    pools(&client)
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    wait_pool_gone(&client, "a").await;
    wait_sts(&client, "a-api").await;
    eventually("a-api recovered", Duration::from_secs(10), || async {
        let p = pools(&client).get("a-api").await.unwrap();
        (condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    for (object, uids) in owners_of_everything(&client).await {
        assert!(!uids.contains(&a_uid), "{object} still pool a's");
    }
    op.stop().await;
}

/// The same pair created back to back, the other way round, both reconciled at once:
/// whichever is refused (`NameCollision`, or `ChildNotOwned` when the younger got to
/// the shared Service first), no object carries both pools, and the pool that holds
/// the names stays healthy.
#[tokio::test]
async fn sibling_pools_created_together_never_share_an_object() {
    let (_sim, client) = cluster().await;
    let op = Operator::start(&client, args("op-a"));
    let first = pools(&client)
        .create(&PostParams::default(), &pool("a-api", json!({})))
        .await
        .unwrap();
    let second = pools(&client)
        .create(&PostParams::default(), &pool("a", json!({})))
        .await
        .unwrap();
    let outcome = |name: &'static str| {
        let client = client.clone();
        async move {
            let p = pools(&client).get(name).await.unwrap();
            condition(&p, "Degraded")
        }
    };
    let (ok, bad) = eventually(
        "one applied, one refused",
        Duration::from_secs(20),
        || async {
            let (x, y) = (outcome("a-api").await?, outcome("a").await?);
            let applied = |c: &(String, String)| c.0 == "False";
            let refusal = |c: &(String, String)| {
                c.0 == "True" && (c.1 == "NameCollision" || c.1 == "ChildNotOwned")
            };
            if applied(&x) && refusal(&y) {
                Some((&first, &second))
            } else if applied(&y) && refusal(&x) {
                Some((&second, &first))
            } else {
                None
            }
        },
    )
    .await;
    // Settle, then look again: the refusal holds and the healthy pool stays healthy.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        outcome(if ok.name_any() == "a" { "a" } else { "a-api" })
            .await
            .unwrap()
            .0,
        "False"
    );
    let bad_uid = bad.metadata.uid.clone().unwrap();
    assert_eq!(children_of(&client, &bad.name_any()).await, 0);
    for (object, uids) in owners_of_everything(&client).await {
        assert!(
            !uids.contains(&bad_uid),
            "{object} written by the refused pool"
        );
        assert!(uids.len() <= 1, "{object} has owners {uids:?}");
    }
    op.stop().await;
}

/// Issue 21 (Low): with the chart's `tenantNamespaces`, the operator holds no rights on
/// Secrets outside them. A pool there is refused with a condition and an Event saying
/// what is missing (not an error retried blindly in back-off), and converges once the
/// right is granted.
#[tokio::test]
async fn a_pool_where_the_operator_may_not_read_secrets_says_so() {
    let (sim, client) = cluster().await;
    sim.faults()
        .fail_next(10_000, FaultMatch::verb("get").on("secrets"), 403);
    let op = Operator::start(&client, args("op-a"));
    pools(&client)
        .create(&PostParams::default(), &pool("acme", json!({})))
        .await
        .unwrap();
    let (p, events) = refused(&client, "acme", "Forbidden").await;
    let message = degraded_message(&p);
    assert!(
        message.contains("get Secret") && message.contains("tenantNamespaces"),
        "{message}"
    );
    assert!(events[0].note.as_deref().unwrap().contains("get Secret"));
    assert_eq!(children_of(&client, "acme").await, 0);

    sim.faults().clear();
    wait_sts(&client, "acme").await;
    eventually("recovered", Duration::from_secs(10), || async {
        let p = pools(&client).get("acme").await.unwrap();
        (condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    op.stop().await;
}

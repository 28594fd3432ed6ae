//! How big the pool object gets, measured through the real write paths against the
//! Kubernetes API stand-in (which, like etcd, refuses objects over 1.5 MiB):
//! `replicas.max` gateway pods each apply their `status.pods[]` entry exactly as
//! `status::report_loop` does (`report_body`, `with_pending_messages`, one field manager
//! per pod, so one `managedFields` entry per pod), with every field at its widest (a
//! pool name of the longest allowed length, counts at their schema maximum, an
//! instruction id); the operator applies an instruction for every pod and a full set of
//! conditions. The serialized object, `managedFields` included, must stay under
//! 1 MiB: half a MiB of headroom below etcd's limit.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::{ConnectionPool, ConnectionPoolStatus, PodInstruction};
use tether_gateway::status::{Snapshot, field_manager, report_body, with_pending_messages};
use tether_kube_sim::Server;

/// The budget the object must stay under.
const BUDGET: usize = 1 << 20;

/// The largest `replicas.max` the CRD allows (its schema maximum), read from the CRD so
/// that the measurement follows the cap.
fn crd_max_pods() -> i32 {
    let crd = serde_json::to_value(tether_crds::crd()).unwrap();
    let max = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["replicas"]["properties"]["max"]["maximum"];
    max.as_f64().expect("replicas.max has a maximum") as i32
}

/// The longest pool name the operator accepts (47: its StatefulSet's pods must get a
/// `controller-revision-hash` label within 63 characters).
fn longest_name() -> String {
    "p".repeat(47)
}

async fn cluster(name: &str, max_pods: i32) -> (Server, Client) {
    let sim = Server::start().await.expect("stand-in starts");
    let client = sim.client().unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &tether_crds::crd())
        .await
        .unwrap();
    let pool: ConnectionPool = serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "tenant": "acme",
            "replicas": {"min": 1, "max": max_pods},
            "routing": {"nats": {"url": "nats://nats:4222"}},
            "auth": {
                "jwt": {"secretRef": {"name": "jwt", "key": "k"}},
                "apiKeysSecretRef": {"name": "keys", "key": "k"},
            },
        },
    }))
    .unwrap();
    let pools: Api<ConnectionPool> = Api::default_namespaced(client.clone());
    for _ in 0..50 {
        match pools.create(&PostParams::default(), &pool).await {
            Ok(_) => break,
            Err(e) => eprintln!("creating the pool: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (sim, client)
}

/// The pool as stored and served: the bytes of its JSON, `managedFields` included.
async fn stored_bytes(client: &Client, name: &str) -> usize {
    let request = http::Request::get(format!(
        "/apis/tether.dev/v1alpha1/namespaces/default/connectionpools/{name}"
    ))
    .body(Vec::new())
    .unwrap();
    let text = client.request_text(request).await.unwrap();
    assert!(
        text.contains("\"managedFields\""),
        "the served object carries managedFields"
    );
    text.len()
}

/// One pod's report, applied as the gateway applies it (`PATCH` of the status with an
/// apply patch, its own field manager, forced). Sent raw: the answer (the whole pool
/// object, up to a MiB) is not decoded, which in a debug build would cost more than the
/// apply itself.
async fn apply_report(client: &Client, name: &str, pod: &str, body: &serde_json::Value) {
    let request = http::Request::patch(format!(
        "/apis/tether.dev/v1alpha1/namespaces/default/connectionpools/{name}/status?fieldManager={}&force=true",
        field_manager(pod)
    ))
    .header("content-type", "application/apply-patch+yaml")
    .body(serde_json::to_vec(body).unwrap())
    .unwrap();
    client
        .request_text(request)
        .await
        .unwrap_or_else(|e| panic!("report of {pod} refused: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_object_stays_under_a_mebibyte_at_replicas_max() {
    let max_pods = crd_max_pods();
    let name = longest_name();
    let (_sim, client) = cluster(&name, max_pods).await;
    let pools: Api<ConnectionPool> = Api::default_namespaced(client.clone());
    let now = Timestamp::now();
    let empty = stored_bytes(&client, &name).await;

    // Every pod's report, as the gateway writes it, every field at its widest.
    for o in 0..max_pods {
        let pod = format!("{name}-{o}");
        let snap = Snapshot {
            connections: 100_000_000,
            refused: 100_000_000,
            ready: true,
            draining: false,
            bus_connected: Some(true),
            instruction: Some(format!("shed-{}", now.as_millisecond())),
        };
        let mut body = report_body(&name, &pod, &uuid::Uuid::new_v4().to_string(), &snap, now);
        with_pending_messages(&mut body, u64::MAX / 2);
        apply_report(&client, &name, &pod, &body).await;
    }
    let reports = stored_bytes(&client, &name).await;

    // The operator's part at its largest: an instruction for every pod (a drain of the
    // whole pool, with a shed count) and a full set of conditions with long messages.
    let issued = Time(now);
    let status = ConnectionPoolStatus {
        instructions: (0..max_pods)
            .map(|o| PodInstruction {
                pod: format!("{name}-{o}"),
                id: format!("drain-{}", now.as_millisecond()),
                drain: true,
                shed: Some(100_000_000),
                issued_at: Some(issued.clone()),
                admission_closed_until: Some(issued.clone()),
            })
            .collect(),
        conditions: [
            "Ready",
            "Progressing",
            "Degraded",
            "Scaling",
            "PodsCreatable",
            "RollingOut",
            "BusAvailable",
            "NatsApplied",
        ]
        .iter()
        .map(|t| Condition {
            type_: (*t).into(),
            status: "False".into(),
            reason: "SomeReason".into(),
            message: "m".repeat(1024),
            observed_generation: Some(1),
            last_transition_time: issued.clone(),
        })
        .collect(),
        total_connections: Some(100_000_000_000),
        replicas: Some(max_pods),
        ready_replicas: Some(max_pods),
        desired_replicas: Some(max_pods),
        observed_generation: Some(1),
        last_scale_time: Some(issued.clone()),
        selector: Some(format!(
            "app.kubernetes.io/instance={name},tether.dev/pool={name}"
        )),
        pods: vec![],
        updated_replicas: Some(max_pods),
        rebalance: Some(tether_crds::RebalanceStatus {
            window_start: issued.clone(),
            budget: i64::MAX,
            shed: i64::MAX,
            failures: i32::MAX,
            backoff_until: Some(issued.clone()),
        }),
    };
    let body = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": name},
        "status": status,
    });
    pools
        .patch_status(
            &name,
            &PatchParams::apply("tether-operator").force(),
            &Patch::Apply(body),
        )
        .await
        .expect("the stand-in (etcd's 1.5 MiB limit) accepts the largest pool object");
    let largest = stored_bytes(&client, &name).await;

    let stored = pools.get_status(&name).await.unwrap().status.unwrap();
    assert_eq!(
        stored.pods.len(),
        max_pods as usize,
        "every pod's entry is kept"
    );
    assert_eq!(stored.instructions.len(), max_pods as usize);
    let per_pod = (reports - empty) / max_pods as usize;
    let per_instruction = (largest - reports) / max_pods as usize;
    println!(
        "pool object: {empty} B empty, {reports} B with {max_pods} reports ({per_pod} B per pod, \
         entry and managedFields), {largest} B with the operator's instructions and conditions \
         ({per_instruction} B per instruction); budget {BUDGET} B"
    );
    assert!(
        largest < BUDGET,
        "the largest pool object is {largest} B, over the {BUDGET} B budget"
    );
}

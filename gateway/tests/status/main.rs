//! The pod's side of autoscaling against the Kubernetes API stand-in: a real gateway
//! reports its connection count into `status.pods[]` (one field manager per pod, so two
//! pods never overwrite each other), follows shed and drain instructions the operator
//! writes on its own Pod's annotation and echoes their ids, reports refused agents as
//! demand, never watches the pool, survives API errors, and withdraws its entry on
//! clean shutdown.

#[path = "../gateway/common.rs"]
mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::json;
use tether_config::StatusConfig;
use tether_crds::{ConnectionPool, INSTRUCTION_ANNOTATION, PodReport};
use tether_gateway::status::{StatusHandle, spawn_with_client};
use tether_kube_sim::Server;
use tether_kube_sim::faults::FaultMatch;
use tokio_tungstenite::tungstenite::Message;

const POOL: &str = "p";

async fn cluster() -> (Server, Client) {
    let sim = Server::start().await.expect("stand-in starts");
    let client = sim.client().unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ConnectionPool::crd())
        .await
        .unwrap();
    let pool: ConnectionPool = serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": POOL, "namespace": "default"},
        "spec": {
            "tenant": "acme",
            "replicas": {"min": 1, "max": 1},
            "auth": {
                "jwt": {"secretRef": {"name": "jwt", "key": "k"}},
                "apiKeysSecretRef": {"name": "keys", "key": "k"},
            },
        },
    }))
    .unwrap();
    // CRD registration is asynchronous on a real server; retry briefly.
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

fn status_config(pod: &str) -> StatusConfig {
    StatusConfig {
        namespace: "default".into(),
        pool: POOL.into(),
        pod_name: Some(pod.into()),
        report_interval_seconds: 1,
        change_percent: 5,
        change_connections: 100,
    }
}

async fn reports(client: &Client) -> Vec<PodReport> {
    let pools: Api<ConnectionPool> = Api::default_namespaced(client.clone());
    pools
        .get_status(POOL)
        .await
        .unwrap()
        .status
        .map(|s| s.pods)
        .unwrap_or_default()
}

async fn report_of(client: &Client, pod: &str) -> Option<PodReport> {
    reports(client).await.into_iter().find(|p| p.name == pod)
}

/// Polls the pool until `pod`'s entry satisfies `ok` (or is absent, for `None`).
async fn await_report(client: &Client, pod: &str, ok: impl Fn(Option<&PodReport>) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let report = report_of(client, pod).await;
        if ok(report.as_ref()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; last report of {pod}: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes (or with `None` removes) `pod`'s instruction, as the operator does: a merge
/// patch of the annotation on the pod's own Pod object.
async fn instruct(client: &Client, pod: &str, instruction: Option<serde_json::Value>) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let value = instruction.map(|i| i.to_string());
    pods.patch(
        pod,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {INSTRUCTION_ANNOTATION: value}}})),
    )
    .await
    .unwrap();
}

/// The Pod object a kubelet would have created for `pod`.
async fn create_pod(client: &Client, pod: &str) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let object: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": "default"},
        "spec": {"containers": [{"name": "gateway", "image": "tether-gateway"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &object).await.unwrap();
}

async fn start(client: &Client, pod: &str) -> (TestGateway, StatusHandle) {
    start_with(client, pod, |_| {}).await
}

async fn start_with(
    client: &Client,
    pod: &str,
    tweak: impl FnOnce(&mut tether_config::GatewayConfig),
) -> (TestGateway, StatusHandle) {
    create_pod(client, pod).await;
    let gw = TestGateway::start_with(tweak).await;
    let handle = spawn_with_client(
        gw.gateway.state().clone(),
        status_config(pod),
        Some(client.clone()),
    );
    (gw, handle)
}

/// Reads frames until the socket closes; returns whether a `reconnect` hint came first
/// and the close code.
async fn until_closed(ws: &mut Ws) -> (bool, Option<u16>) {
    let mut hinted = false;
    while let Ok(Some(frame)) = tokio::time::timeout(PATIENCE, ws.next()).await {
        match frame {
            Ok(Message::Text(text)) => hinted |= text.contains("\"reconnect\""),
            Ok(Message::Close(frame)) => return (hinted, frame.map(|f| u16::from(f.code))),
            Ok(_) => {}
            Err(_) => return (hinted, None),
        }
    }
    (hinted, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_report_their_own_entries_and_withdraw_them() {
    let (_sim, client) = cluster().await;
    let (a, handle_a) = start(&client, "p-0").await;
    let (b, handle_b) = start(&client, "p-1").await;
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| r.connections == 0 && r.ready)
    })
    .await;
    await_report(&client, "p-1", |r| r.is_some()).await;

    let _a1 = a.agent("a1", &[]).await;
    let _a2 = a.agent("a2", &[]).await;
    let _b1 = b.agent("b1", &[]).await;
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.connections == 2)).await;
    await_report(&client, "p-1", |r| r.is_some_and(|r| r.connections == 1)).await;
    let entry = report_of(&client, "p-0").await.unwrap();
    assert!(entry.observed_at.is_some() && entry.boot_id.is_some());
    assert!(!entry.draining);

    // The operator's own status writes leave the pods' entries alone.
    let pools: Api<ConnectionPool> = Api::default_namespaced(client.clone());
    let operator_status = json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": POOL},
        "status": {"totalConnections": 3},
    });
    pools
        .patch_status(
            POOL,
            &PatchParams::apply("tether-operator").force(),
            &Patch::Apply(operator_status),
        )
        .await
        .unwrap();
    assert_eq!(reports(&client).await.len(), 2);

    handle_a.shutdown(Duration::from_secs(5)).await;
    await_report(&client, "p-0", |r| r.is_none()).await;
    assert!(
        report_of(&client, "p-1").await.is_some(),
        "p-1 keeps its entry"
    );
    handle_b.shutdown(Duration::from_secs(5)).await;
    assert!(reports(&client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_retried_with_the_latest_count() {
    let (sim, client) = cluster().await;
    sim.faults().fail_next(
        6,
        FaultMatch::verb("patch")
            .on("connectionpools")
            .subresource("status"),
        500,
    );
    let (gw, handle) = start(&client, "p-0").await;
    let _a1 = gw.agent("a1", &[]).await;
    let _a2 = gw.agent("a2", &[]).await;
    let _a3 = gw.agent("a3", &[]).await;
    // Connections were served while the API failed; the first report that lands
    // carries today's count, not the count of the first attempt.
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.connections == 3)).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_and_drain_instructions_are_followed_and_a_drain_can_be_called_off() {
    let (_sim, client) = cluster().await;
    let (gw, handle) = start(&client, "p-0").await;
    let mut agents = Vec::new();
    for i in 0..6 {
        agents.push(gw.agent(&format!("a{i}"), &[]).await);
    }
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.connections == 6)).await;

    // Shed 2: exactly two agents get a hint and a 1012; the pod stays ready.
    instruct(
        &client,
        "p-0",
        Some(json!({"pod": "p-0", "id": "r1", "shed": 2})),
    )
    .await;
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| r.connections == 4 && r.ready && r.instruction.as_deref() == Some("r1"))
    })
    .await;
    let mut closed = Vec::new();
    for (i, ws) in agents.iter_mut().enumerate() {
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        {
            assert!(text.contains("\"reconnect\""), "{text}");
            closed.push(i);
        }
    }
    assert_eq!(closed.len(), 2, "shed closes exactly two");
    for i in closed.into_iter().rev() {
        let (_, code) = until_closed(&mut agents[i]).await;
        assert_eq!(code, Some(1012));
        agents.remove(i);
    }
    // The same id again is not a new instruction; one naming another pod is ignored.
    instruct(
        &client,
        "p-0",
        Some(json!({"pod": "p-0", "id": "r1", "shed": 2})),
    )
    .await;
    create_pod(&client, "p-9").await;
    instruct(
        &client,
        "p-9",
        Some(json!({"pod": "p-9", "id": "x", "drain": true})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.gateway.state().hub.len(), 4);
    assert!(!gw.gateway.state().is_draining());

    // Drain: unready, new agents refused with 503, every agent hinted and closed; the
    // reports echo the drain's id.
    instruct(
        &client,
        "p-0",
        Some(json!({"pod": "p-0", "id": "d1", "drain": true})),
    )
    .await;
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| {
            r.connections == 0 && r.draining && !r.ready && r.instruction.as_deref() == Some("d1")
        })
    })
    .await;
    for ws in &mut agents {
        let (hinted, code) = until_closed(ws).await;
        assert!(hinted, "reconnect hint before the close");
        assert_eq!(code, Some(1012));
    }
    assert_eq!(
        refused_status(&gw.ws_url(), Some(&token("late", &[], 60))).await,
        503
    );

    // Called off: ready again, agents welcome.
    instruct(&client, "p-0", None).await;
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| r.ready && !r.draining)
    })
    .await;
    let _back = gw.agent("back", &[]).await;
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.connections == 1)).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_closed_refuses_newcomers_keeps_agents_and_reopens_by_itself() {
    let (_sim, client) = cluster().await;
    let (gw, handle) = start(&client, "p-0").await;
    let _kept = gw.agent("kept", &[]).await;
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| r.connections == 1 && r.ready)
    })
    .await;
    let ready = || async { gw.get("/readyz").await.status().as_u16() };
    assert_eq!(ready().await, 200);

    // Closed for a rebalancing episode, until a time 3 s ahead: unready (the Service
    // drops it), newcomers get 503, the agents it holds stay.
    let until =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(3);
    instruct(
        &client,
        "p-0",
        Some(json!({"pod": "p-0", "id": "close-1", "admissionClosedUntil": until.to_string()})),
    )
    .await;
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| !r.ready && !r.draining && r.instruction.as_deref() == Some("close-1"))
    })
    .await;
    assert_eq!(ready().await, 503);
    assert_eq!(
        refused_status(&gw.ws_url(), Some(&token("new", &[], 60))).await,
        503
    );
    assert_eq!(gw.gateway.state().hub.len(), 1, "admitted agents stay");

    // The operator went away without lifting it: the pod reopens by itself at that time,
    // with the annotation still there.
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.ready)).await;
    assert_eq!(ready().await, 200);
    let _new = gw.agent("new", &[]).await;

    // Closed again far ahead, then the episode ends (annotation removed): open at once.
    let until =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(600);
    instruct(
        &client,
        "p-0",
        Some(json!({"pod": "p-0", "id": "close-2", "admissionClosedUntil": until.to_string()})),
    )
    .await;
    await_report(&client, "p-0", |r| r.is_some_and(|r| !r.ready)).await;
    instruct(&client, "p-0", None).await;
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.ready)).await;
    let _third = gw.agent("third", &[]).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_refused_by_a_full_pod_are_reported_as_demand() {
    let (_sim, client) = cluster().await;
    let (gw, handle) = start_with(&client, "p-0", |c| c.limits.max_connections = 2).await;
    let _a1 = gw.agent("a1", &[]).await;
    let _a2 = gw.agent("a2", &[]).await;
    for i in 0..3 {
        let late = token(&format!("late{i}"), &[], 60);
        assert_eq!(refused_status(&gw.ws_url(), Some(&late)).await, 503);
    }
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| r.connections == 2 && r.refused == 3)
    })
    .await;
    // Counted once: the next report carries only what was refused since.
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.refused == 0)).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_never_watches_or_reads_its_pool() {
    let (sim, client) = cluster().await;
    let (gw, handle) = start(&client, "p-0").await;
    let _a1 = gw.agent("a1", &[]).await;
    await_report(&client, "p-0", |r| r.is_some_and(|r| r.connections == 1)).await;
    instruct(
        &client,
        "p-0",
        Some(json!({"pod": "p-0", "id": "r1", "shed": 1})),
    )
    .await;
    await_report(&client, "p-0", |r| {
        r.is_some_and(|r| r.instruction.as_deref() == Some("r1"))
    })
    .await;
    handle.shutdown(Duration::from_secs(5)).await;
    let stats = sim.stats().snapshot();
    let count = |verb: &str, resource: &str| -> u64 {
        stats
            .requests
            .iter()
            .filter(|r| r.key.verb == verb && r.key.resource == resource)
            .map(|r| r.count)
            .sum()
    };
    // The test reads the status itself (`get`); nobody lists or watches pools.
    assert_eq!(
        count("list", "connectionpools") + count("watch", "connectionpools"),
        0
    );
    assert!(count("watch", "pods") >= 1, "the pod watches its own Pod");
    // Its Pod, and only its Pod: every pod watch is pinned to one name.
    for w in stats
        .watches
        .iter()
        .filter(|w| w.key.resource.ends_with("/pods"))
    {
        assert_eq!(w.key.field_selector, "metadata.name=p-0", "{w:?}");
    }
    assert!(
        stats
            .watches
            .iter()
            .all(|w| !w.key.resource.ends_with("connectionpools")),
        "{:?}",
        stats.watches
    );
}

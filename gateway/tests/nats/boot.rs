//! A pod whose NATS is not there when it starts: it starts anyway, serves its own
//! agents, and attaches to the bus once NATS is reachable.

use serde_json::{Value, json};

use crate::common::{PATIENCE, eventually};
use crate::harness::*;

#[tokio::test]
async fn a_pod_started_without_nats_serves_its_agents_and_attaches_when_nats_comes() {
    let mut nats = Nats::not_started();
    let p0 = Pod::start_unattached(&nats, "gw-0", |_| {}).await;

    // No bus: the pod is ready and serves its own agents; it says the bus is down.
    assert!(!p0.bus_connected());
    assert_eq!(p0.get("/readyz").await.status(), 200);
    let stats: Value = p0.get("/v1/stats").await.json().await.unwrap();
    assert_eq!(stats["bus_connected"], false, "{stats}");
    let mut early = p0.agent("agent-early", &[]).await;
    push_reaches(&p0, "agent-early", &mut early, json!("local")).await;
    // Another pod's agent cannot be reached without the bus: 503, not 404.
    let response = p0
        .post("/v1/agents/agent-elsewhere/messages", json!("x"))
        .await;
    assert_eq!(response.status(), 503);

    // NATS comes: the pod attaches and registers the agent that connected before.
    nats.restart(false).await;
    tether_test_support::until("gw-0 attached to the bus", 3 * PATIENCE, || {
        p0.bus_connected()
    })
    .await;
    let probe = nats_client(&nats).await;
    tether_test_support::eventually("agent-early in the directory", PATIENCE, || async {
        directory_entry(&probe, "acme", "agent-early").await
    })
    .await;
    let stats: Value = p0.get("/v1/stats").await.json().await.unwrap();
    assert_eq!(stats["bus_connected"], true, "{stats}");

    // Routing across pods works both ways.
    let p1 = Pod::start(&nats, "gw-1").await;
    push_reaches(&p1, "agent-early", &mut early, json!("via the bus")).await;
    let mut late = p1.agent("agent-late", &[]).await;
    push_reaches(&p0, "agent-late", &mut late, json!("from gw-0")).await;
    // Both pods count each other's agents (the census runs on the bus).
    eventually(|| {
        p0.gateway.state().router.connections_elsewhere() == 1
            && p1.gateway.state().router.connections_elsewhere() == 1
    })
    .await;
}

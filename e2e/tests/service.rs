//! The pool's client Service on this machine: SDK agents (`tether-agent`) reach real
//! gateway processes through the kubelet's proxy on one address, and a drained pod's
//! agent reconnects (on the gateway's `reconnect` hint) through the same address to
//! another Ready pod.
//!
//! Needs the binaries: `cargo build -p tether-gateway -p tether-operator` first.

use std::time::Duration;

use serde_json::{Value, json};
use tether_agent::{Agent, State};
use tether_e2e::*;
use tether_test_support::push_api;

const POOL: &str = "svc";
const PATIENCE: Duration = Duration::from_secs(60);

/// The pod holding `agent`, from the push API's presence lookup on `internal`.
async fn presence(http: &reqwest::Client, internal: &str, agent: &str) -> Option<String> {
    let response = http
        .get(format!("http://{internal}/v1/agents/{agent}"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["pod"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_agent_follows_the_service_to_another_ready_pod_after_a_drain() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .create_pool(
            POOL,
            json!({
                "replicas": {"min": 2, "max": 2},
                "drain": {"connectionsPerSecond": 100, "deadlineSeconds": 20, "reconnectJitterMs": 200},
                "reportIntervalSeconds": 1,
            }),
        )
        .await?;
    let mut operator = cluster.start_operator().await?;
    let kubelet = Kubelet::start(&cluster, POOL)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let result = async {
        eventually("two ready gateway pods", PATIENCE, || async {
            (kubelet.ready_count() == 2).then_some(())
        })
        .await?;
        let url = kubelet.service_url();
        let service = kubelet.service();
        anyhow::ensure!(
            url.starts_with("ws://127.0.0.1:"),
            "the Service is on loopback: {url}"
        );

        // One SDK agent through the Service; pushes through the push API reach it.
        let pushes = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let agent = Agent::builder(url.clone(), minter("svc-agent"))
            .options(test_agent_options())
            .on_push({
                let pushes = pushes.clone();
                move |push| {
                    pushes.lock().extend(push.id);
                    async {}
                }
            })
            .start()?;
        let first = tokio::time::timeout(PATIENCE, agent.connected()).await??;
        let first_pod = eventually("the agent in the Service's conntrack", PATIENCE, || {
            let per_pod = service.per_pod();
            async move { per_pod.into_keys().next() }
        })
        .await?;
        let endpoints = kubelet.endpoints();
        let held_by = endpoints
            .iter()
            .find(|e| e.pod == first_pod)
            .expect("the agent's pod is an endpoint");
        anyhow::ensure!(
            presence(&http, &held_by.internal, "svc-agent")
                .await
                .as_deref()
                == Some(first_pod.as_str()),
            "the gateway and the Service agree on the agent's pod"
        );
        let body = json!({"hello": "through the service"});
        let accepted = push_api::push(&http, &held_by.internal, API_KEY, "svc-agent", &body).await;
        anyhow::ensure!(accepted.status().as_u16() == 202, "push accepted");
        eventually("the push through the Service", PATIENCE, || {
            let got = !pushes.lock().is_empty();
            async move { got.then_some(()) }
        })
        .await?;

        // Drain the agent's pod: it turns unready, hints and closes; the agent comes back
        // through the same address and the Service sends it to the other Ready pod.
        let drained = http
            .post(format!("http://{}/admin/drain", held_by.internal))
            .bearer_auth(API_KEY)
            .send()
            .await?;
        anyhow::ensure!(drained.status().is_success(), "drain accepted: {drained:?}");
        let mut state = agent.state();
        let second = tokio::time::timeout(
            PATIENCE,
            state.wait_for(|s| matches!(s, State::Connected(s) if s.number > first.number)),
        )
        .await??
        .clone();
        let State::Connected(second) = second else {
            unreachable!("waited for Connected")
        };
        anyhow::ensure!(
            second.agent_id == "svc-agent",
            "the same agent, a new session"
        );
        let other = endpoints
            .iter()
            .find(|e| e.pod != first_pod)
            .expect("a second pod");
        let second_pod = eventually("the agent on the other pod", PATIENCE, || {
            let per_pod = service.per_pod();
            let other = other.pod.clone();
            async move { (per_pod.keys().collect::<Vec<_>>() == [&other]).then_some(other) }
        })
        .await?;
        anyhow::ensure!(
            presence(&http, &other.internal, "svc-agent")
                .await
                .as_deref()
                == Some(second_pod.as_str()),
            "the gateway agrees the agent moved to {second_pod}"
        );
        let totals = service.totals();
        anyhow::ensure!(
            totals.get(&first_pod) == Some(&1),
            "no new connection went to the drained pod: {totals:?}"
        );
        agent.close().await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    kubelet.shutdown().await;
    let _ = operator.kill().await;
    result
}

/// Without a Ready pod the Service has no endpoints: a connection is closed at once and
/// the SDK keeps retrying until a pod is Ready (here: the pool's first pod starting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_agent_waits_for_the_first_ready_pod_behind_the_service() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kubelet = Kubelet::start(&cluster, POOL)?;
    let agent = Agent::builder(kubelet.service_url(), minter("early-agent"))
        .options(test_agent_options())
        .start()?;
    // No StatefulSet yet: attempts fail, the agent keeps trying.
    let mut state = agent.state();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|s| matches!(s, State::Waiting { .. })),
    )
    .await??;
    cluster
        .create_pool(
            POOL,
            json!({"replicas": {"min": 1, "max": 1}, "reportIntervalSeconds": 1}),
        )
        .await?;
    let mut operator = cluster.start_operator().await?;
    let session = tokio::time::timeout(PATIENCE, agent.connected()).await;
    agent.close().await;
    kubelet.shutdown().await;
    let _ = operator.kill().await;
    let session = session??;
    anyhow::ensure!(session.agent_id == "early-agent");
    Ok(())
}

//! The closed autoscaling loop, end to end: the API stand-in, the real operator
//! process, a kubelet running real gateway processes for the StatefulSet, and SDK agents
//! (`tether-agent`) whose number goes 0 → many → few → 0, all connecting to the pool's
//! one Service address (the kubelet's proxy picks a Ready pod for each new connection).
//!
//! Needs the binaries: `cargo build -p tether-gateway -p tether-operator` first.
//! `closed_loop_small` runs in CI (1 → 3 → 1 pods, a few hundred agents);
//! `closed_loop_large` is the documented larger run (`E2E_AGENTS`, `E2E_MAX_PODS`,
//! `E2E_TARGET` tune it) and prints figures:
//! `cargo test -p tether-e2e --release --test closed_loop -- --ignored --nocapture`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_crds::ConnectionPool;
use tether_e2e::*;

const POOL: &str = "loop";

struct Scenario {
    agents_many: usize,
    agents_few: usize,
    target: i64,
    max_pods: i32,
    spread_percent: i32,
    /// Generous deadline of each phase.
    patience: Duration,
}

fn pool_spec(s: &Scenario) -> serde_json::Value {
    json!({
        "replicas": {"min": 1, "max": s.max_pods},
        "scaling": {
            "targetConnectionsPerPod": s.target,
            "tolerancePercent": 10,
            "scaleUp": {"maxPodsPerStep": s.max_pods, "periodSeconds": 3},
            "scaleDown": {"stabilizationSeconds": 6, "maxPodsPerStep": 1},
            "rebalanceSpreadPercent": s.spread_percent,
        },
        "limits": {"maxConnectionsPerPod": s.target * 4},
        "drain": {"connectionsPerSecond": 500, "deadlineSeconds": 30, "reconnectJitterMs": 500},
        "reportIntervalSeconds": 1,
    })
}

async fn pool(cluster: &Cluster) -> ConnectionPool {
    cluster.pools().get(POOL).await.expect("pool")
}

fn scaling_condition(p: &ConnectionPool) -> Option<(String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == tether_crds::CONDITION_SCALING)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the StatefulSet has `replicas` ready gateways, every agent is connected
/// and the pool's status reports them all.
async fn settle(
    cluster: &Cluster,
    kubelet: &Kubelet,
    agents: &Agents,
    replicas: usize,
    patience: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let want = agents.len();
    eventually(
        &format!("{replicas} ready pods, {want} agents connected and reported"),
        patience,
        || async {
            let ready = kubelet.endpoints().iter().filter(|e| e.ready).count();
            let p = pool(cluster).await;
            let status = p.status.clone().unwrap_or_default();
            let ok = ready == replicas
                && kubelet.endpoints().len() == replicas
                && agents.connected() == want
                && status.total_connections == Some(want as i64)
                && status.desired_replicas == Some(replicas as i32);
            ok.then_some(())
        },
    )
    .await?;
    Ok(started.elapsed())
}

/// Max and mean of connections per pod, from the Service's conntrack table.
fn spread(agents: &Agents, pods: usize) -> (usize, f64) {
    let per_pod = agents.per_pod();
    let max = per_pod.values().copied().max().unwrap_or(0);
    let mean = agents.len() as f64 / pods as f64;
    (max, mean)
}

async fn run(s: Scenario) -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.create_pool(POOL, pool_spec(&s)).await?;
    let mut operator = cluster.start_operator()?;
    let kubelet = Kubelet::start(&cluster, POOL)?;
    let mut agents = Agents::through(kubelet.service());
    let expected_many =
        ((s.agents_many as i64 + s.target - 1) / s.target).min(i64::from(s.max_pods)) as usize;
    let result = async {
        // 0 agents: the pool sits at its minimum.
        settle(&cluster, &kubelet, &agents, 1, s.patience).await?;
        println!("phase 0: 1 pod, 0 agents");

        // 0 → many: scale up, then rebalance the old pod's agents over the new pods.
        let t0 = Instant::now();
        agents.scale_to(s.agents_many).await;
        let to_scale = settle(&cluster, &kubelet, &agents, expected_many, s.patience).await?;
        let reconnects_before = agents.stats.reconnects.load(Ordering::Relaxed);
        let bound = 1.0 + f64::from(s.spread_percent) / 100.0;
        let (max, mean) = eventually("spread within the bound", s.patience, || async {
            let (max, mean) = spread(&agents, expected_many);
            let p = pool(&cluster).await;
            let balanced = max as f64 <= mean * bound + 2.0
                && agents.connected() == agents.len()
                && p.status.as_ref().is_some_and(|st| st.instructions.is_empty());
            balanced.then_some((max, mean))
        })
        .await?;
        let storm = agents.stats.reconnects.load(Ordering::Relaxed);
        println!(
            "phase many: {} agents → {expected_many} pods in {:?} (scaled and all connected after {to_scale:?}); \
             balanced after {:?}: max {max} per pod vs mean {mean:.0}; reconnect storm: {storm} reconnects ({} after the size settled); \
             sessions {}, refused handshakes {}; per pod {:?}",
            s.agents_many,
            t0.elapsed(),
            t0.elapsed(),
            storm - reconnects_before.min(storm),
            agents.stats.sessions.load(Ordering::Relaxed),
            agents.stats.refused.load(Ordering::Relaxed),
            agents.per_pod()
        );

        // many → few: drain before removing pods; pushes to the staying agents while
        // pods drain must all arrive.
        let t1 = Instant::now();
        agents.scale_to(s.agents_few).await;
        let staying: Vec<String> = (0..s.agents_few).map(|i| format!("agent-{i}")).collect();
        let pick = {
            let staying = staying.clone();
            move || {
                use rand::seq::IndexedRandom;
                staying.choose(&mut rand::rng()).cloned()
            }
        };
        let pusher = Pusher::start(kubelet.endpoints_handle(), pick, Duration::from_millis(20));
        let expected_few = ((s.agents_few as i64 + s.target - 1) / s.target).max(1) as usize;
        let to_scale_down = settle(&cluster, &kubelet, &agents, expected_few, s.patience).await?;
        let accepted = pusher.finish().await;
        // Give the last accepted pushes a moment to be read.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut lost = Vec::new();
        for (agent, id) in &accepted {
            let state = agents.state_of(agent).expect("staying agent");
            if !state.received.lock().contains(id) {
                lost.push((agent.clone(), id.clone()));
            }
        }
        println!(
            "phase few: {} agents → {expected_few} pods in {to_scale_down:?}; {} pushes accepted during the drain, {} lost",
            s.agents_few,
            accepted.len(),
            lost.len()
        );
        anyhow::ensure!(!accepted.is_empty(), "pushes were accepted during the drain");
        anyhow::ensure!(lost.is_empty(), "accepted pushes lost: {lost:?}");
        let _ = t1;

        // few → 0: back at the minimum, nothing left.
        agents.scale_to(0).await;
        settle(&cluster, &kubelet, &agents, 1, s.patience).await?;
        let p = eventually("Scaling condition at rest", s.patience, || async {
            let p = pool(&cluster).await;
            let at_rest = scaling_condition(&p).is_some_and(|(st, _)| st == "False")
                && p.status.as_ref().is_some_and(|st| st.instructions.is_empty());
            at_rest.then_some(p)
        })
        .await?;
        println!("phase 0 again: status {:?}", scaling_condition(&p));

        // No pod was removed while it still held agents: every stopped pod had been
        // told to drain and held nothing at SIGTERM.
        let removals = kubelet.removals();
        println!("removals: {removals:?}");
        anyhow::ensure!(!removals.is_empty(), "pods were removed on the way down");
        for r in &removals {
            anyhow::ensure!(r.was_drain_instructed, "{} stopped without a drain", r.pod);
            anyhow::ensure!(r.connections_at_sigterm == 0, "{} stopped holding {} connections", r.pod, r.connections_at_sigterm);
        }

        // Replicas followed the load without flapping: up, then down.
        let history = kubelet.replicas_history();
        println!("StatefulSet sizes: {history:?}");
        let turns = history
            .windows(3)
            .filter(|w| (w[1] > w[0]) != (w[2] > w[1]))
            .count();
        anyhow::ensure!(turns <= 1, "replicas flapped: {history:?}");
        anyhow::ensure!(history.iter().all(|r| (1..=s.max_pods).contains(r)), "outside bounds: {history:?}");
        anyhow::ensure!(history.contains(&(expected_many as i32)), "never reached {expected_many}: {history:?}");

        // Every scale action left an Event.
        let events: kube::Api<k8s_openapi::api::core::v1::Event> = kube::Api::namespaced(cluster.client.clone(), NS);
        let reasons: HashMap<String, usize> = events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r).or_default() += 1;
                m
            });
        let events_v1: kube::Api<k8s_openapi::api::events::v1::Event> = kube::Api::namespaced(cluster.client.clone(), NS);
        let mut reasons = reasons;
        for e in events_v1.list(&Default::default()).await?.items {
            if let Some(r) = e.reason {
                *reasons.entry(r).or_default() += 1;
            }
        }
        println!("events: {reasons:?}");
        for r in ["ScaledUp", "DrainStarted", "ScaledDown"] {
            anyhow::ensure!(reasons.contains_key(r), "no {r} Event: {reasons:?}");
        }
        // The operator ran with the chart's rules and each gateway with its pool's
        // service account (see docs/testing.md): none of them was ever refused.
        let stats = cluster.sim.stats().snapshot();
        let refused: Vec<_> = stats.requests.iter().filter(|r| r.key.code == 403).collect();
        anyhow::ensure!(refused.is_empty(), "requests refused by RBAC: {refused:?}");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    agents.scale_to(0).await;
    kubelet.shutdown().await;
    let _ = operator.kill().await;
    if let Err(e) = &result {
        let log = std::fs::read_to_string(cluster.operator_log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "operator log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        eprintln!("failed: {e:#}");
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_small() -> anyhow::Result<()> {
    run(Scenario {
        agents_many: 150,
        agents_few: 40,
        target: 50,
        max_pods: 3,
        spread_percent: 25,
        patience: Duration::from_secs(60),
    })
    .await
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "larger closed loop: prints figures (see docs/benchmarks.md)"]
async fn closed_loop_large() -> anyhow::Result<()> {
    let agents: usize = env_or("E2E_AGENTS", 6_000);
    let pods: i32 = env_or("E2E_MAX_PODS", 6);
    let target: i64 = env_or(
        "E2E_TARGET",
        (agents as i64 + i64::from(pods) - 1) / i64::from(pods),
    );
    run(Scenario {
        agents_many: agents,
        agents_few: agents / 10,
        target,
        max_pods: pods,
        spread_percent: 25,
        patience: Duration::from_secs(300),
    })
    .await
}

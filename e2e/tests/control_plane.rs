//! The control plane at scale, held to budgets by counts (never timings): the API
//! stand-in, the real operator process, and the pod simulator playing the kubelet and
//! every gateway pod's reporting for many pools.
//!
//! `control_plane_budgets` runs in CI (`SCALE_POOLS` pools of up to 5 pods, 100 by
//! default); the large runs documented in docs/benchmarks.md use the same scenario:
//! `SCALE_POOLS=10000 cargo test -p tether-e2e --release --test control_plane -- --nocapture`
//! (build the operator with `--release` first).
//!
//! Budgets, from issue 10: in steady state the operator writes nothing on a report it
//! need not act on (API writes per pool per minute ≤ reporting pods × reports per
//! minute, plus a small constant), applies no child without a spec change, and each
//! report costs at most 2 watch events; every pool converges; nothing scales on a stale
//! or foreign report; every removed pod was drained exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_e2e::eventually;
use tether_e2e::podsim::{PodSim, SimConfig};
use tether_e2e::scale::{
    self, Steady, child_applies, is_write, operator_writes, pool_name, settled, usage,
};
use tether_kube_sim::faults::FaultMatch;
use tokio::process::Child;

const NS: &str = "scale";
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The size of a run (environment variables, CI defaults).
#[derive(Debug, Clone, Copy)]
struct Scenario {
    /// Pools (`SCALE_POOLS`).
    pools: usize,
    /// Pods each pool grows to (`SCALE_PODS`).
    pods: i64,
    /// The pods' report interval (`SCALE_REPORT_SECONDS`); heartbeats every two.
    report_seconds: i64,
}

impl Scenario {
    fn from_env() -> Self {
        Self {
            pools: env_or("SCALE_POOLS", 100),
            pods: env_or("SCALE_PODS", 5),
            report_seconds: env_or("SCALE_REPORT_SECONDS", 4),
        }
    }

    /// Load for half a pod less than `pods`: every pool grows to `pods` and rebalances.
    fn load(&self) -> i64 {
        scale::load(self.pods)
    }
}

/// Polls `f` until it yields, at most `patience`, every `every` (listing thousands of
/// pools ten times a second would load the stand-in more than the operator does).
async fn poll<T, F, Fut>(
    what: &str,
    patience: Duration,
    every: Duration,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

async fn stand_in() -> anyhow::Result<(tether_kube_sim::Server, Client, tempfile::TempDir)> {
    let sim = tether_kube_sim::Server::start().await?;
    let client = sim.client()?;
    let dir = tempfile::tempdir()?;
    sim.write_kubeconfig(dir.path().join("kubeconfig"))?;
    tether_e2e::install(&client, NS).await?;
    Ok((sim, client, dir))
}

fn operator(dir: &tempfile::TempDir) -> anyhow::Result<Child> {
    println!("e2e runtime: processes (the operator binary; pods simulated by podsim, no kubelet)");
    tether_e2e::spawn_operator(
        &dir.path().join("kubeconfig"),
        &dir.path().join("operator.log"),
        &[
            "--namespace",
            NS,
            "--gateway-image",
            "tether-gateway:scale",
            "--concurrency",
            "8",
        ],
        &std::env::var("SCALE_OPERATOR_LOG").unwrap_or_else(|_| "warn,tether_operator=info".into()),
    )
}

async fn create_pools(client: &Client, s: Scenario) -> anyhow::Result<()> {
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    for i in 0..s.pools {
        let manifest = scale::pool_manifest(&pool_name(i), NS, s.pods, s.report_seconds);
        pools
            .create(&PostParams::default(), &serde_json::from_value(manifest)?)
            .await?;
    }
    Ok(())
}

async fn pool(client: &Client, name: &str) -> ConnectionPool {
    Api::<ConnectionPool>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .expect("pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_budgets() -> anyhow::Result<()> {
    let scenario = Scenario::from_env();
    let (n, pods_per_pool) = (scenario.pools, scenario.pods as i32);
    let patience = Duration::from_secs(env_or("SCALE_PATIENCE_SECONDS", 180));
    let every = Duration::from_millis((n as u64).clamp(100, 2_000));
    let (sim, client, dir) = stand_in().await?;
    let mut op = operator(&dir)?;
    let pods = PodSim::start(client.clone(), SimConfig::new(NS)).await;
    let world = pods.world.clone();
    let result = async {
        let load = scenario.load();
        world.set_demand((0..n).map(|i| (pool_name(i), load)));
        let started = Instant::now();
        create_pools(&client, scenario).await?;
        let created = started.elapsed();
        // Killed mid-scale-up: the next operator picks up from the status alone.
        eventually("a scale-up under way", patience, || async {
            let p = pool(&client, &pool_name(n - 1)).await;
            p.status.and_then(|s| s.desired_replicas).filter(|d| *d > 1)
        })
        .await?;
        op.kill().await?;
        op = operator(&dir)?;
        let pid = op.id().context("operator pid")?;
        poll("every pool at its size, holding its load", patience, every, || async {
            (settled(&client, pods_per_pool, load).await == n).then_some(())
        })
        .await?;
        let converged = started.elapsed();
        let (cpu_converged, rss_converged) = usage(pid);
        println!(
            "{scenario:?}: created in {created:?}, converged ({pods_per_pool} pods each, balanced) after {converged:?}; \
             operator {cpu_converged:.1} CPU-s so far, RSS {} MiB",
            rss_converged / 1024
        );

        // Steady state: only the pods write, each report reaches one watcher.
        let reports_before = world.reports.load(Ordering::Relaxed);
        let before = sim.stats().snapshot();
        let window = Duration::from_secs(env_or("SCALE_WINDOW_SECONDS", 24));
        tokio::time::sleep(window).await;
        let steady = sim.stats().snapshot().since(&before);
        let (cpu_steady, rss_steady) = usage(pid);
        let reports = world.reports.load(Ordering::Relaxed) - reports_before;
        let cost = Steady::measure(&steady, n, window.as_secs_f64());
        println!(
            "steady {cost}; operator {:.2} CPU-s per 1,000 reports, RSS {} MiB",
            (cpu_steady - cpu_converged) * 1000.0 / reports.max(1) as f64,
            rss_steady / 1024,
        );
        let broken = cost.violations();
        anyhow::ensure!(broken.is_empty(), "budgets broken: {broken:?}; {:?}", steady.requests);
        // Every report is one write (reports in flight at the window's edges aside).
        anyhow::ensure!(
            cost.reports.abs_diff(reports) <= 2 * SimConfig::new(NS).report_concurrency as u64,
            "{} report writes for {reports} reports",
            cost.reports
        );
        anyhow::ensure!(settled(&client, pods_per_pool, load).await == n, "a pool moved in steady state");

        // Dropped watches and a compacted history (410 Gone): the operator re-lists and,
        // since nothing changed, applies and writes nothing.
        let before = sim.stats().snapshot();
        sim.faults().compact();
        sim.faults().drop_watches();
        tokio::time::sleep(Duration::from_secs(3 * scenario.report_seconds as u64)).await;
        let relisted = sim.stats().snapshot().since(&before);
        println!(
            "after dropped watches: {} lists, {} watches opened, child applies {}, operator writes {}",
            relisted.count(|k| k.verb == "list"),
            relisted.watches.iter().map(|w| w.opened).sum::<u64>(),
            child_applies(&relisted),
            operator_writes(&relisted)
        );
        for w in relisted.watches.iter().filter(|w| w.key.resource.ends_with("connectionpools")) {
            println!("  pool watch after the drop: {w:?}");
        }
        anyhow::ensure!(
            relisted.watches.iter().map(|w| w.opened).sum::<u64>() > 0,
            "watches were opened again"
        );
        anyhow::ensure!(child_applies(&relisted) == 0, "a re-list caused child applies");
        anyhow::ensure!(
            Steady::measure(&relisted, n, 3.0 * scenario.report_seconds as f64).per_pool_minute(operator_writes(&relisted)) <= 1.0,
            "a re-list caused operator writes: {:?}",
            relisted
                .requests
                .iter()
                .filter(|r| r.key.resource != "connectionpools" || r.key.field_manager.is_none())
                .filter(|r| is_write(&r.key))
                .collect::<Vec<_>>()
        );

        // Foreign and stale reports move nothing. A foreign pod's entry (an ordinal the
        // pool does not have, another pool's name), and a pod that goes silent.
        let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
        let foreign = pool_name(0);
        let intruder = json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
            "metadata": {"name": foreign},
            "status": {"pods": [
                {"name": format!("{foreign}-9"), "connections": 100_000, "ready": true},
                {"name": "elsewhere-0", "connections": 100_000, "ready": true},
            ]},
        });
        pools
            .patch_status(&foreign, &PatchParams::apply("intruder").force(), &Patch::Apply(intruder))
            .await?;
        let quiet = pool_name(1.min(n - 1));
        world
            .pods
            .lock()
            .get_mut(&format!("{quiet}-{}", pods_per_pool - 1))
            .context("pod to silence")?
            .silent = true;
        eventually("foreign and stale entries pruned", patience, || async {
            let f = pool(&client, &foreign).await.status.unwrap_or_default();
            let q = pool(&client, &quiet).await.status.unwrap_or_default();
            let foreign_gone = f.pods.iter().all(|p| !p.name.ends_with("-9") && p.name != "elsewhere-0");
            let stale_gone = q
                .pods
                .iter()
                .all(|p| p.name != format!("{quiet}-{}", pods_per_pool - 1));
            (foreign_gone && stale_gone).then_some(())
        })
        .await?;
        for name in [&foreign, &quiet] {
            let s = pool(&client, name).await.status.unwrap_or_default();
            anyhow::ensure!(
                s.desired_replicas == Some(pods_per_pool),
                "{name} scaled on a foreign or stale report: {s:?}"
            );
        }

        // Load falls in a tenth of the pools: drains first, each pod drained once, then
        // the pools shrink to one pod.
        let shrinking: Vec<String> = (0..n).step_by(10).map(pool_name).collect();
        world.set_demand(shrinking.iter().map(|p| (p.clone(), scale::TARGET / 2)));
        // Killed mid-drain, and throttled (429) after: no drain is issued twice, none is
        // lost, nothing scales on what the dead operator saw.
        eventually("a drain under way", patience, || async {
            let p = pool(&client, &shrinking[0]).await;
            p.status.filter(|s| s.instructions.iter().any(|i| i.drain))
        })
        .await?;
        op.kill().await?;
        sim.faults().fail_next(20, FaultMatch::verb("patch"), 429);
        op = operator(&dir)?;
        poll("shrinking pools at one pod", patience, every, || async {
            let mut done = 0;
            for p in &shrinking {
                let s = pool(&client, p).await.status.unwrap_or_default();
                if s.desired_replicas == Some(1) && s.replicas == Some(1) && s.instructions.is_empty() {
                    done += 1;
                }
            }
            (done == shrinking.len()).then_some(())
        })
        .await?;
        // Every pod acted on each instruction id once, and was told to drain once at most.
        for (name, pod) in world.pods.lock().iter() {
            let mut seen = BTreeMap::new();
            for id in &pod.acted {
                *seen.entry(id).or_insert(0) += 1;
            }
            anyhow::ensure!(seen.values().all(|n| *n == 1), "{name} acted twice: {:?}", pod.acted);
            let drains = pod.acted.iter().filter(|id| id.starts_with("drain-")).count();
            anyhow::ensure!(drains <= 1, "{name} drained {drains} times: {:?}", pod.acted);
        }
        let total = sim.stats().snapshot();
        println!(
            "whole run: {} requests, operator writes {}, child applies {}, reports {}, report errors {}",
            total.requests_total(),
            operator_writes(&total),
            child_applies(&total),
            world.reports.load(Ordering::Relaxed),
            world.report_errors.load(Ordering::Relaxed),
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = op.kill().await;
    if let Err(e) = &result {
        let all = Api::<ConnectionPool>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await?;
        let unsettled = all.items.iter().filter(|p| {
            p.status.as_ref().is_none_or(|s| {
                !s.instructions.is_empty() || s.desired_replicas != s.ready_replicas
            })
        });
        let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
        let pruned: Vec<&str> = log.lines().filter(|l| l.contains("pruned")).collect();
        eprintln!(
            "prunes:\n{}",
            pruned[pruned.len().saturating_sub(3)..].join("\n")
        );
        eprintln!("operator log: {} lines", log.lines().count());
        let first: Vec<&str> = log.lines().filter(|l| l.contains("p00003")).collect();
        eprintln!(
            "p00003:\n{}",
            first[first.len().saturating_sub(12)..].join("\n")
        );
        let blind: Vec<&str> = log.lines().filter(|l| l.contains("NoReports")).collect();
        eprintln!(
            "steps without reports:\n{}",
            blind[blind.len().saturating_sub(3)..].join("\n")
        );
        if let Some(first) = pruned.first() {
            let pool = first
                .split("pool=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("");
            let around: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&format!("pool={pool}")))
                .collect();
            eprintln!(
                "around the first prune:\n{}",
                around[around.len().saturating_sub(30)..].join("\n")
            );
        }
        for p in unsettled.take(3) {
            let name = p.metadata.name.clone().unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(&name)).collect();
            eprintln!(
                "operator on {name}:\n{}",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
            let s = p.status.clone().unwrap_or_default();
            eprintln!(
                "unsettled {}: desired {:?} ready {:?} total {:?} instructions {:?} pods {:?} conditions {:?}",
                p.metadata.name.as_deref().unwrap_or_default(),
                s.desired_replicas,
                s.ready_replicas,
                s.total_connections,
                s.instructions,
                s.pods
                    .iter()
                    .map(|r| (
                        r.name.clone(),
                        r.connections,
                        r.draining,
                        r.instruction.clone()
                    ))
                    .collect::<Vec<_>>(),
                s.conditions
                    .iter()
                    .map(|c| (c.type_.clone(), c.reason.clone(), c.message.clone()))
                    .collect::<Vec<_>>(),
            );
        }
        eprintln!(
            "reports {}, report errors {}",
            world.reports.load(Ordering::Relaxed),
            world.report_errors.load(Ordering::Relaxed)
        );
        eprintln!(
            "simulated pods: {:?}",
            world
                .pods
                .lock()
                .iter()
                .take(6)
                .map(|(n, p)| (n.clone(), p.connections, p.draining))
                .collect::<Vec<_>>()
        );
        let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "operator log (last lines):\n{}\nfailed: {e:#}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    result
}

//! Operator-run rollouts, end to end (issue 22, item 1).
//!
//! `rollout_batches_keep_agents_and_pushes`: the API stand-in, the real operator, the
//! kubelet running a 10-pod pool as real gateways (processes, or containers with
//! `E2E_RUNTIME=containers`), 200 SDK agents through the pool's Service, and pushes
//! (direct with retry, and durable) all through a change of the pod template. Asserted
//! by counts: never more than one batch of pods out of the Service and never more than
//! one batch of agents disconnected (sampled throughout), every replaced pod empty at
//! SIGTERM (pre-drained), every agent back, every accepted push delivered, every pod at
//! the new revision, the Events, and the pool balanced at the end (max/mean ≤ 1.15).
//!
//! `rollout_completes_when_drained_agents_never_return`: the same pool with half its
//! agents never coming back once drained; the rollout completes by counts, without
//! waiting for them (see the test).
//!
//! `rollout_pauses_and_resumes`: the operator and the pod simulator (no gateway
//! processes): `spec.rollout.paused` holds a rollout (condition `RollingOut`, reason
//! `RolloutPaused`, an Event `RolloutPaused`, no pod replaced), `false` resumes it to the
//! end (an Event `RolloutResumed`).
//!
//! `rollout_time` (ignored; the figures in docs/benchmarks.md): the time of a rollout of
//! `ROLLOUT_PODS` simulated pods (default 10, and 100), batches of 10 %:
//! `ROLLOUT_PODS=100 cargo test -p tether-e2e --test rollout rollout_time -- --ignored --nocapture`.
//!
//! Needs the binaries: `cargo build -p tether-gateway -p tether-operator` first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tether_crds::{CONDITION_ROLLING_OUT, ConnectionPool};
use tether_e2e::podsim::{PodSim, SimConfig};
use tether_e2e::revision::REVISION_LABEL;
use tether_e2e::*;

const POOL: &str = "roll";
const PODS: usize = 10;
const AGENTS: usize = 200;
/// `rollout.maxUnavailable` of the e2e pool: 20 % of 10 pods.
const BATCH: usize = 2;
/// A pool balanced after a rollout (docs/operator.md, "Rollouts"): the busiest pod holds
/// at most 1.15 × the mean. The episode after a rollout works to 1.10
/// (`autoscale::ROLLOUT_FILL_SPREAD_PERCENT`), tighter than the pool's own 1.25.
const MAX_OVER_MEAN: f64 = 1.15;

/// The busiest pod's agents over the mean per pod, every pod of the pool counted (an
/// empty pod is not in the Service's table).
fn max_over_mean(per_pod: &BTreeMap<String, usize>) -> f64 {
    let agents: usize = per_pod.values().sum();
    let max = per_pod.values().copied().max().unwrap_or(0);
    max as f64 * PODS as f64 / agents.max(1) as f64
}

fn pool_spec() -> Value {
    json!({
        "replicas": {"min": PODS, "max": PODS},
        "scaling": {
            "targetConnectionsPerPod": AGENTS / PODS,
            "tolerancePercent": 50,
            "rebalanceSpreadPercent": 25,
        },
        "limits": {"maxConnectionsPerPod": AGENTS},
        "drain": {"connectionsPerSecond": 200, "deadlineSeconds": 30, "reconnectJitterMs": 500},
        "rollout": {"maxUnavailable": "20%"},
        "delivery": {"maxAgeSeconds": 600},
        "reportIntervalSeconds": 1,
    })
}

fn condition(p: &ConnectionPool, type_: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Event reasons in `ns`, counted once each: core/v1 and events.k8s.io/v1 Events are
/// one storage (the operator writes the latter, `kubectl describe` reads the former),
/// so one list sees them all.
async fn event_reasons(client: &Client, ns: &str) -> anyhow::Result<HashMap<String, usize>> {
    let mut reasons: HashMap<String, usize> = HashMap::new();
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    for e in core.list(&Default::default()).await?.items {
        *reasons.entry(e.reason.unwrap_or_default()).or_default() += 1;
    }
    Ok(reasons)
}

/// Changes the gateway pods' template (an annotation): a new revision to roll out.
async fn change_template(
    pools: &Api<ConnectionPool>,
    name: &str,
    value: &str,
) -> anyhow::Result<()> {
    let patch = json!({"spec": {"template": {"annotations": {"e2e.tether.dev/rollout": value}}}});
    pools
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// The revision of each pod of `pool`, by name.
async fn pod_revisions(
    client: &Client,
    ns: &str,
    pool: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&format!("tether.dev/pool={pool}")))
        .await?
        .items
        .into_iter()
        .map(|p| {
            let revision = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REVISION_LABEL).cloned())
                .unwrap_or_default();
            (p.metadata.name.unwrap_or_default(), revision)
        })
        .collect())
}

/// A push the push API accepted: agent, message id, durable.
type Accepted = (String, String, bool);

/// What the sampler saw during the rollout.
#[derive(Debug, Default)]
struct Samples {
    count: AtomicUsize,
    /// Most agents disconnected at once.
    most_disconnected: AtomicUsize,
    /// Most pods out of the Service (not Ready, or not running) at once.
    most_unready: AtomicUsize,
    /// Most agents one pod held.
    most_per_pod: AtomicUsize,
}

/// Pushes during the rollout: to random agents through random Ready pods, direct ones
/// retried (another pod, a moment later) until the push API accepts them, durable ones
/// stored with an Idempotency-Key. Returns the accepted (agent, id, durable) triples.
fn start_pushes(
    endpoints: Arc<Mutex<BTreeMap<i32, Endpoint>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Accepted>, usize)> {
    tokio::spawn(async move {
        use rand::seq::IndexedRandom;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let mut accepted = Vec::new();
        let mut retries = 0;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(25)).await;
            n += 1;
            let agent = format!("agent-{}", rand::random_range(0..AGENTS));
            let durable = n.is_multiple_of(2);
            let key = format!("rollout-push-{n}");
            // Direct pushes to an agent between pods answer 404: retried until it is
            // back (the documented client behaviour), for at most 20 s.
            let give_up = Instant::now() + Duration::from_secs(20);
            while Instant::now() < give_up {
                let ready: Vec<Endpoint> = endpoints
                    .lock()
                    .values()
                    .filter(|e| e.ready)
                    .cloned()
                    .collect();
                let Some(endpoint) = ready.choose(&mut rand::rng()).cloned() else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let url = format!(
                    "http://{}/v1/agents/{agent}/messages{}",
                    endpoint.internal,
                    if durable { "?delivery=durable" } else { "" }
                );
                let response = http
                    .post(url)
                    .bearer_auth(API_KEY)
                    .header("Idempotency-Key", &key)
                    .json(&json!({"n": n}))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().as_u16() == 202 => {
                        let id = r
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_string))
                            .unwrap_or_else(|| key.clone());
                        accepted.push((agent.clone(), id, durable));
                        break;
                    }
                    _ => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        (accepted, retries)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_batches_keep_agents_and_pushes() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.create_pool(POOL, pool_spec()).await?;
    let mut operator = cluster.start_operator().await?;
    let kubelet = Kubelet::start(&cluster, POOL)?;
    let mut agents = Agents::through(kubelet.service());
    let patience = Duration::from_secs(240);
    let result = async {
        eventually("10 ready pods", patience, || async {
            (kubelet.ready_count() == PODS).then_some(())
        })
        .await?;
        agents.scale_to(AGENTS).await;
        eventually("every agent connected and reported", patience, || async {
            let p = cluster.pools().get(POOL).await.ok()?;
            let total = p.status.as_ref()?.total_connections?;
            (agents.connected() == AGENTS && total == AGENTS as i64).then_some(())
        })
        .await?;
        let before = pod_revisions(&cluster.client, NS, POOL).await?;
        anyhow::ensure!(before.len() == PODS, "pods before: {before:?}");
        let old_revision = before.values().next().cloned().unwrap_or_default();
        anyhow::ensure!(
            !old_revision.is_empty() && before.values().all(|r| *r == old_revision),
            "every pod labelled with one revision: {before:?}"
        );
        let removals_before = kubelet.removals().len();
        let reconnects_before = agents.stats.reconnects.load(Ordering::Relaxed);

        // Sample agents and pods throughout the rollout.
        let samples = Arc::new(Samples::default());
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let samples = samples.clone();
            let stop = stop.clone();
            let endpoints = kubelet.endpoints_handle();
            let connected = {
                // The agents' states, shared with the sampler task.
                let states: Vec<_> = (0..AGENTS)
                    .filter_map(|i| agents.state_of(&format!("agent-{i}")))
                    .collect();
                move || states.iter().filter(|s| s.connected.load(Ordering::SeqCst)).count()
            };
            let per_pod = {
                let service = kubelet.service().conntrack();
                move || service.lock().per_pod()
            };
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let disconnected = AGENTS - connected();
                    let ready = endpoints.lock().values().filter(|e| e.ready).count();
                    let most = per_pod().values().copied().max().unwrap_or(0);
                    samples.count.fetch_add(1, Ordering::Relaxed);
                    samples.most_disconnected.fetch_max(disconnected, Ordering::Relaxed);
                    samples.most_unready.fetch_max(PODS - ready.min(PODS), Ordering::Relaxed);
                    samples.most_per_pod.fetch_max(most, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let pushes = start_pushes(kubelet.endpoints_handle(), stop.clone());

        let started = Instant::now();
        change_template(&cluster.pools(), POOL, "2").await?;
        let sets: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), NS);
        let rolled = eventually("every pod at the new revision and Ready", patience, || async {
            let sts = sets.get(POOL).await.ok()?;
            let status = sts.status?;
            let update = status.update_revision?;
            let p = cluster.pools().get(POOL).await.ok()?;
            let (st, reason, message) = condition(&p, CONDITION_ROLLING_OUT)?;
            let done = update != old_revision
                && status.current_revision.as_deref() == Some(update.as_str())
                && status.updated_replicas == Some(PODS as i32)
                && p.status.as_ref()?.updated_replicas == Some(PODS as i32)
                && st == "False"
                && reason == "RolloutComplete"
                && kubelet.ready_count() == PODS;
            done.then_some((update, message))
        })
        .await?;
        let took = started.elapsed();
        eventually("every agent back", patience, || async {
            (agents.connected() == AGENTS).then_some(())
        })
        .await?;
        stop.store(true, Ordering::SeqCst);
        let _ = sampler.await;
        let (accepted, retries) = pushes.await?;

        // Every accepted push arrives (durable ones once their agent is back).
        let missing = || -> Vec<(String, String, bool)> {
            accepted
                .iter()
                .filter(|(agent, id, _)| {
                    agents
                        .state_of(agent)
                        .is_none_or(|s| !s.received.lock().contains(id))
                })
                .cloned()
                .collect()
        };
        let delivered = eventually("every accepted push delivered", Duration::from_secs(30), || async {
            missing().is_empty().then_some(())
        })
        .await;
        let durable = accepted.iter().filter(|a| a.2).count();
        let reconnects = agents.stats.reconnects.load(Ordering::Relaxed) - reconnects_before;
        println!(
            "rollout of {PODS} pods in batches of {BATCH}: {took:?} ({}); {} samples: at most {} agents disconnected and {} pods out of the Service at once, \
             at most {} agents on one pod; {reconnects} reconnects; pushes accepted: {} ({durable} durable), retries {retries}",
            rolled.1,
            samples.count.load(Ordering::Relaxed),
            samples.most_disconnected.load(Ordering::Relaxed),
            samples.most_unready.load(Ordering::Relaxed),
            samples.most_per_pod.load(Ordering::Relaxed),
            accepted.len(),
        );
        anyhow::ensure!(delivered.is_ok(), "accepted pushes lost: {:?}", missing());
        anyhow::ensure!(durable > 0 && accepted.len() > durable, "both kinds of push accepted: {} ({durable} durable)", accepted.len());

        // One batch at a time: pods out of the Service, and agents between pods.
        let most_unready = samples.most_unready.load(Ordering::Relaxed);
        anyhow::ensure!(most_unready <= BATCH, "{most_unready} pods out of the Service at once");
        let bound = BATCH * samples.most_per_pod.load(Ordering::Relaxed);
        let most_disconnected = samples.most_disconnected.load(Ordering::Relaxed);
        anyhow::ensure!(
            most_disconnected <= bound && most_disconnected < AGENTS / 2,
            "{most_disconnected} agents disconnected at once (one batch holds at most {bound})"
        );
        // Each agent moved at most a few times (its pod's batch, and rebalancing),
        // never the whole fleet per batch.
        anyhow::ensure!(reconnects <= 3 * AGENTS as u64, "{reconnects} reconnects");

        // Every pod replaced once, each pre-drained (empty at SIGTERM).
        let removals: Vec<Removal> = kubelet.removals().into_iter().skip(removals_before).collect();
        let replaced: std::collections::BTreeSet<&str> = removals.iter().map(|r| r.pod.as_str()).collect();
        anyhow::ensure!(removals.len() == PODS && replaced.len() == PODS, "replacements: {removals:?}");
        for r in &removals {
            anyhow::ensure!(r.connections_at_sigterm == 0, "{} replaced holding {} connections", r.pod, r.connections_at_sigterm);
        }
        let after = pod_revisions(&cluster.client, NS, POOL).await?;
        anyhow::ensure!(after.len() == PODS && after.values().all(|r| *r == rolled.0), "pods after: {after:?}");
        let revisions: Api<ControllerRevision> = Api::namespaced(cluster.client.clone(), NS);
        let names: Vec<String> = revisions.list(&Default::default()).await?.items.into_iter().filter_map(|r| r.metadata.name).collect();
        anyhow::ensure!(names.contains(&old_revision) && names.contains(&rolled.0), "ControllerRevisions: {names:?}");

        // The pool balanced at the end, counting agents per pod over every pod, once
        // the pool is at rest (no round of shedding or closing under way): the episode
        // that follows a rollout fills the last batch, which came back empty.
        println!("per pod after the rollout: {:?}", agents.per_pod());
        let balanced = eventually("the pool balanced and at rest after the rollout", patience, || async {
            let p = cluster.pools().get(POOL).await.ok()?;
            let at_rest = p.status.as_ref()?.instructions.is_empty();
            let per_pod = agents.per_pod();
            let ratio = max_over_mean(&per_pod);
            (at_rest && agents.connected() == AGENTS && ratio <= MAX_OVER_MEAN).then_some((per_pod, ratio))
        })
        .await;
        let (per_pod, ratio) = match balanced {
            Ok(b) => b,
            Err(e) => anyhow::bail!("{e:#}: per pod {:?}", agents.per_pod()),
        };
        println!("balanced: per pod {per_pod:?}, max/mean {ratio:.2}");

        let reasons = event_reasons(&cluster.client, NS).await?;
        println!("events: {reasons:?}");
        for r in ["RolloutStarted", "BatchStarted", "RolloutComplete"] {
            anyhow::ensure!(reasons.contains_key(r), "no {r} Event: {reasons:?}");
        }
        anyhow::ensure!(reasons.get("BatchStarted").copied().unwrap_or(0) >= PODS / BATCH, "batches: {reasons:?}");
        // The operator's rights (the chart's RBAC) were enough.
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
        cluster.print_failure(e);
    }
    result
}

/// Reconnecting SDK agents in the one-shot test.
const RETURNING: usize = 100;
/// Agents that never come back once drained, in the one-shot test.
const ONE_SHOT: usize = 100;

/// A second actor during the rollout: half the agents never come back once their pod
/// drains them (an agent behind a NAT that dropped it, one whose back-off outlasts the
/// rollout). Each batch loses them for good, so the pool's total falls batch by batch
/// and never returns; the rollout must not wait for it. Its drains end by count (the
/// pod's report: draining, 0 connections), never by `drain.deadlineSeconds` — set to
/// 600 s here, so a rollout that waited for any deadline would not finish five batches
/// within the test's patience. Asserted by counts: the rollout completes with every pod
/// at the new revision, every replaced pod empty at SIGTERM, every
/// one-shot agent gone and none back, every reconnecting agent back, and the pool's
/// `totalConnections` counting the agents that are there, not the ones that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_completes_when_drained_agents_never_return() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let mut spec = pool_spec();
    spec["drain"]["deadlineSeconds"] = json!(600);
    cluster.create_pool(POOL, spec).await?;
    let mut operator = cluster.start_operator().await?;
    let kubelet = Kubelet::start(&cluster, POOL)?;
    let mut agents = Agents::through(kubelet.service());
    let patience = Duration::from_secs(240);
    let result = async {
        eventually("10 ready pods", patience, || async {
            (kubelet.ready_count() == PODS).then_some(())
        })
        .await?;
        agents.scale_to(RETURNING).await;
        let one_shot = OneShotAgents::start(&kubelet.service().ws_url(), ONE_SHOT, 100.0, patience);
        eventually("every agent connected and reported", patience, || async {
            let p = cluster.pools().get(POOL).await.ok()?;
            let total = p.status.as_ref()?.total_connections?;
            (agents.connected() == RETURNING
                && one_shot.connected() == ONE_SHOT
                && total == (RETURNING + ONE_SHOT) as i64)
                .then_some(())
        })
        .await?;
        let old_revision = pod_revisions(&cluster.client, NS, POOL)
            .await?
            .values()
            .next()
            .cloned()
            .unwrap_or_default();
        let removals_before = kubelet.removals().len();

        change_template(&cluster.pools(), POOL, "2").await?;
        let sets: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), NS);
        let new_revision = eventually("the rollout complete", patience, || async {
            let status = sets.get(POOL).await.ok()?.status?;
            let update = status.update_revision?;
            let p = cluster.pools().get(POOL).await.ok()?;
            let (st, reason, _) = condition(&p, CONDITION_ROLLING_OUT)?;
            let done = update != old_revision
                && status.updated_replicas == Some(PODS as i32)
                && st == "False"
                && reason == "RolloutComplete"
                && kubelet.ready_count() == PODS;
            done.then_some(update)
        })
        .await?;
        // Every pod was replaced, so every one-shot agent was drained once: none is
        // left, none came back. The reconnecting ones are all back, and the pool counts
        // what is there.
        let total = eventually(
            "the pool counts the agents that are there",
            patience,
            || async {
                let p = cluster.pools().get(POOL).await.ok()?;
                let total = p.status.as_ref()?.total_connections?;
                (agents.connected() == RETURNING && total == RETURNING as i64).then_some(total)
            },
        )
        .await?;
        let gone = ONE_SHOT - one_shot.connected();
        let ever = one_shot.ever_connected();
        one_shot.stop();
        anyhow::ensure!(
            gone == ONE_SHOT && ever == ONE_SHOT as u64,
            "one-shot agents: {gone} gone of {ONE_SHOT}, {ever} connections ever"
        );
        let removals: Vec<Removal> = kubelet
            .removals()
            .into_iter()
            .skip(removals_before)
            .collect();
        let replaced: std::collections::BTreeSet<&str> =
            removals.iter().map(|r| r.pod.as_str()).collect();
        anyhow::ensure!(
            removals.len() == PODS && replaced.len() == PODS,
            "replacements: {removals:?}"
        );
        // (The kubelet's `was_drain_instructed` is not asserted: the operator deletes a
        // drained pod before it withdraws the instruction from the status, so the
        // kubelet may read the status either side of that write.)
        for r in &removals {
            anyhow::ensure!(
                r.connections_at_sigterm == 0,
                "{} replaced holding {} connections",
                r.pod,
                r.connections_at_sigterm
            );
        }
        let after = pod_revisions(&cluster.client, NS, POOL).await?;
        anyhow::ensure!(
            after.len() == PODS && after.values().all(|r| *r == new_revision),
            "pods after: {after:?}"
        );
        // The step that completes the rollout publishes its Events after writing the
        // status the condition was read from and delivering its instructions to the
        // pods (`controller`, `autoscale::after_apply`): wait for them.
        let complete = |reasons: &HashMap<String, usize>| {
            reasons.get("BatchStarted").copied().unwrap_or(0) == PODS / BATCH
                && reasons.get("RolloutComplete") == Some(&1)
        };
        let _ = eventually(
            "the RolloutComplete Event",
            Duration::from_secs(10),
            || async {
                let reasons = event_reasons(&cluster.client, NS).await.ok()?;
                complete(&reasons).then_some(())
            },
        )
        .await;
        let reasons = event_reasons(&cluster.client, NS).await?;
        anyhow::ensure!(complete(&reasons), "{reasons:?}");
        println!(
            "one-shot rollout: {gone} of {ONE_SHOT} one-shot agents gone, {} of {RETURNING} \
             reconnecting agents back, total {total}; events {reasons:?}",
            agents.connected()
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    agents.scale_to(0).await;
    kubelet.shutdown().await;
    let _ = operator.kill().await;
    if let Err(e) = &result {
        cluster.print_failure(e);
    }
    result
}

// === simulated pods ===

const SIM_NS: &str = "rollouts";

/// The stand-in, the operator (admin credentials) and the pod simulator.
struct SimCluster {
    _sim: tether_kube_sim::Server,
    client: Client,
    dir: tempfile::TempDir,
    operator: tokio::process::Child,
    pods: PodSim,
}

impl SimCluster {
    async fn start() -> anyhow::Result<Self> {
        let sim = tether_kube_sim::Server::start().await?;
        let client = sim.client()?;
        let dir = tempfile::tempdir()?;
        sim.write_kubeconfig(dir.path().join("kubeconfig"))?;
        install(&client, SIM_NS).await?;
        let operator = spawn_operator(
            &dir.path().join("kubeconfig"),
            &dir.path().join("operator.log"),
            &[
                "--namespace",
                SIM_NS,
                "--gateway-image",
                "tether-gateway:sim",
            ],
            &std::env::var("ROLLOUT_OPERATOR_LOG")
                .unwrap_or_else(|_| "warn,tether_operator=info".into()),
        )?;
        let pods = PodSim::start(client.clone(), SimConfig::new(SIM_NS)).await;
        Ok(Self {
            _sim: sim,
            client,
            dir,
            operator,
            pods,
        })
    }

    fn pools(&self) -> Api<ConnectionPool> {
        Api::namespaced(self.client.clone(), SIM_NS)
    }

    /// A pool of `pods` pods (fixed), 100 agents each, batches of `max_unavailable`.
    async fn create_pool(
        &self,
        name: &str,
        pods: i64,
        max_unavailable: Value,
        paused: bool,
    ) -> anyhow::Result<()> {
        let mut manifest = scale::pool_manifest(name, SIM_NS, pods, 2);
        manifest["spec"]["replicas"]["min"] = json!(pods);
        manifest["spec"]["rollout"] = json!({"maxUnavailable": max_unavailable, "paused": paused});
        self.pods
            .world
            .set_demand([(name.to_string(), scale::TARGET * pods)]);
        self.pools()
            .create(&PostParams::default(), &serde_json::from_value(manifest)?)
            .await?;
        Ok(())
    }

    async fn pool(&self, name: &str) -> Option<ConnectionPool> {
        self.pools().get(name).await.ok()
    }

    /// Waits until `name` runs `pods` pods holding their load, every pod at one revision
    /// other than `not` (the old one, after a template change: until the StatefulSet
    /// has seen the change, the old revision looks settled too).
    async fn settled(
        &self,
        name: &str,
        pods: i32,
        not: Option<&str>,
        patience: Duration,
    ) -> anyhow::Result<String> {
        let one = eventually(
            &format!("{name}: {pods} pods at one revision"),
            patience,
            || async {
                let p = self.pool(name).await?;
                let status = p.status?;
                let revisions = pod_revisions(&self.client, SIM_NS, name).await.ok()?;
                let one = revisions.values().next()?.clone();
                (status.ready_replicas == Some(pods)
                    && status.updated_replicas == Some(pods)
                    && revisions.len() == pods as usize
                    && revisions.values().all(|r| *r == one)
                    && not != Some(one.as_str()))
                .then_some(one)
            },
        )
        .await?;
        Ok(one)
    }

    /// Runs kubectl (`$KUBECTL` or `PATH`) against the stand-in in the test namespace:
    /// the commands docs/operator.md gives to pause, resume and wait for a rollout.
    async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
        let out = tokio::process::Command::new(bin)
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .args(["-n", SIM_NS])
            .args(args)
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl patch` of `spec.rollout.paused`, as docs/operator.md gives it.
    async fn set_paused(&self, pool: &str, paused: bool) -> anyhow::Result<()> {
        let patch = json!({"spec": {"rollout": {"paused": paused}}}).to_string();
        self.kubectl(&["patch", "cpool", pool, "--type", "merge", "-p", &patch])
            .await
            .map(drop)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_pauses_and_resumes() -> anyhow::Result<()> {
    let mut c = SimCluster::start().await?;
    let patience = Duration::from_secs(120);
    let result = async {
        c.create_pool("paused", 4, json!(1), false).await?;
        let old = c.settled("paused", 4, None, patience).await?;

        // A template change while paused: the condition says so, nothing is replaced.
        // Paused and resumed with kubectl, as docs/operator.md says.
        c.set_paused("paused", true).await?;
        change_template(&c.pools(), "paused", "2").await?;
        let message = eventually("RollingOut: RolloutPaused", patience, || async {
            let p = c.pool("paused").await?;
            let (st, reason, message) = condition(&p, CONDITION_ROLLING_OUT)?;
            (st == "True" && reason == "RolloutPaused").then_some(message)
        })
        .await?;
        anyhow::ensure!(message.starts_with("0/4 updated"), "{message}");
        eventually("a RolloutPaused Event", patience, || async {
            let reasons = event_reasons(&c.client, SIM_NS).await.ok()?;
            reasons.contains_key("RolloutPaused").then_some(())
        })
        .await?;
        // Several operator steps later (the pods report every 2 s), still nothing replaced.
        let reports = c.pods.world.reports.load(Ordering::Relaxed);
        eventually("more reports while paused", patience, || async {
            (c.pods.world.reports.load(Ordering::Relaxed) >= reports + 12).then_some(())
        })
        .await?;
        let revisions = pod_revisions(&c.client, SIM_NS, "paused").await?;
        anyhow::ensure!(
            revisions.values().all(|r| *r == old),
            "a pod was replaced while paused: {revisions:?}"
        );
        let p = c.pool("paused").await.expect("pool");
        anyhow::ensure!(
            p.status
                .as_ref()
                .is_some_and(|s| s.instructions.is_empty() && s.updated_replicas == Some(0)),
            "paused: {:?}",
            p.status
        );

        // Resumed: batch by batch to the end, which `kubectl wait` sees.
        c.set_paused("paused", false).await?;
        c.kubectl(&[
            "wait",
            "cpool/paused",
            "--for=condition=RollingOut=false",
            "--timeout=120s",
        ])
        .await?;
        let new = c.settled("paused", 4, Some(&old), patience).await?;
        anyhow::ensure!(new != old, "the new revision rolled out");
        let (st, reason, message) = eventually("RollingOut False", patience, || async {
            let p = c.pool("paused").await?;
            condition(&p, CONDITION_ROLLING_OUT).filter(|(st, _, _)| st == "False")
        })
        .await?;
        println!("resumed and done: {st} {reason}: {message}");
        anyhow::ensure!(
            reason == "RolloutComplete" && message.starts_with("4/4 updated"),
            "{reason}: {message}"
        );
        let reasons = event_reasons(&c.client, SIM_NS).await?;
        anyhow::ensure!(
            reasons.get("BatchStarted").copied().unwrap_or(0) >= 4,
            "{reasons:?}"
        );
        anyhow::ensure!(reasons.contains_key("RolloutComplete"), "{reasons:?}");
        // One pause, one resume: an Event each, however many steps it stayed paused.
        anyhow::ensure!(
            reasons.get("RolloutPaused") == Some(&1) && reasons.get("RolloutResumed") == Some(&1),
            "{reasons:?}"
        );
        // Each pod acted on exactly one rollout drain: no pod drained twice.
        for (name, pod) in c.pods.world.pods.lock().iter() {
            anyhow::ensure!(pod.acted.len() <= 1, "{name} acted on {:?}", pod.acted);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = &result {
        eprintln!(
            "operator log (last lines):\n{}\nfailed: {e:#}",
            c.log_tail()
        );
    }
    let _ = c.operator.kill().await;
    result
}

/// The time of one rollout of `ROLLOUT_PODS` simulated pods in batches of 10 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (docs/benchmarks.md, Rollouts)"]
async fn rollout_time() -> anyhow::Result<()> {
    let pods: i64 = std::env::var("ROLLOUT_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut c = SimCluster::start().await?;
    let patience = Duration::from_secs(600);
    let result = async {
        c.create_pool("timed", pods, json!("10%"), false).await?;
        let old = c.settled("timed", pods as i32, None, patience).await?;
        let started = Instant::now();
        change_template(&c.pools(), "timed", "2").await?;
        let new = c.settled("timed", pods as i32, Some(&old), patience).await?;
        let took = started.elapsed();
        anyhow::ensure!(new != old);
        let reasons = event_reasons(&c.client, SIM_NS).await?;
        println!(
            "rollout of {pods} simulated pods, batches of 10 %: {took:.1?} ({} batches, {:.2?} per batch)",
            reasons.get("BatchStarted").copied().unwrap_or(0),
            took / reasons.get("BatchStarted").copied().unwrap_or(1).max(1) as u32
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = &result {
        eprintln!(
            "operator log (last lines):\n{}\nfailed: {e:#}",
            c.log_tail()
        );
    }
    let _ = c.operator.kill().await;
    result
}

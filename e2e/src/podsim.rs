//! A pod simulator for control-plane scale tests: it plays the kubelet and the gateways'
//! status reporting for every replica of every pool's StatefulSet, without a gateway
//! process, so one machine can hold thousands of pools.
//!
//! ```text
//!  StatefulSets (watch) ──► Pod objects <pool>-<n> created / deleted, StatefulSet status
//!  Pods (one watch)     ──► tether.dev/instruction: drain → empty now, draining, echo id
//!                                                   shed N → N agents leave, briefly
//!                                                   closed to new ones, echo id
//!                                                   admissionClosedUntil T → unready,
//!                                                   no new agents until T (any id)
//!  load script          ──► demand per pool: agents placed evenly on accepting pods up to
//!                           maxConnectionsPerPod, the rest counted as refused
//!  every pod            ──► SSA of its own status.pods[] entry, field manager
//!                           tether-gateway-<pod>, on the gateway's own schedule
//!                           (`tether_gateway::status::next_report`)
//! ```
//!
//! What the simulator writes counts as the pods' traffic; tests compare it with what the
//! operator writes (by field manager) in the stand-in's accounting.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use parking_lot::Mutex;
use serde_json::json;
use tether_crds::{ConnectionPool, INSTRUCTION_ANNOTATION, PodInstruction};
use tether_gateway::status::{Significance, Snapshot, field_manager, next_report, report_body};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Label the simulator puts on the Pods it creates.
pub const SIM_LABEL: &str = "tether.dev/simulated";

/// One simulated gateway pod.
#[derive(Debug, Clone)]
pub struct SimPod {
    /// Its pool.
    pub pool: String,
    /// Agents connected to it.
    pub connections: i64,
    /// Agents refused since its last report (it was full).
    pub refused: i64,
    /// Draining on an instruction.
    pub draining: bool,
    /// Closed to new agents until then (a shed round).
    pub shedding_until: Option<Instant>,
    /// Closed to new agents, and unready, until then (a rebalancing episode's
    /// `admissionClosedUntil`, as the gateway follows it: the time of the current
    /// instruction, none without one).
    pub admission_closed_until: Option<Timestamp>,
    /// The instruction id it acts on (echoed in reports).
    pub instruction: Option<String>,
    /// Every instruction id it acted on, in order (a drain or shed acted on twice would
    /// show twice).
    pub acted: Vec<String>,
    /// Random id of this "process".
    pub boot_id: String,
    /// Stops reporting (a hung or partitioned pod), for staleness tests.
    pub silent: bool,
    /// The StatefulSet template revision it was created from.
    pub revision: String,
    /// Its Pod object's uid; once the watch has shown it, its deletion ends the pod.
    uid: Option<String>,
    seen: bool,
    last: Option<(Instant, Snapshot)>,
}

impl SimPod {
    /// Whether it takes new agents (and so reports itself ready): not draining, not
    /// shedding, admission not closed (the gateway's `admits_newcomers`).
    fn admits(&self, now: Instant, wall: Timestamp) -> bool {
        !self.draining
            && self.shedding_until.is_none_or(|t| now >= t)
            && self.admission_closed_until.is_none_or(|t| wall >= t)
    }
}

/// What the simulation shares with the test driving it.
#[derive(Debug, Default)]
pub struct World {
    /// Agents that want to connect to each pool (the load script writes it).
    pub demand: Mutex<HashMap<String, i64>>,
    /// The pods, by name.
    pub pods: Mutex<BTreeMap<String, SimPod>>,
    /// Status reports written (accepted by the API server).
    pub reports: AtomicU64,
    /// Status reports that failed.
    pub report_errors: AtomicU64,
}

impl World {
    /// Sets every listed pool's demand.
    pub fn set_demand(&self, pools: impl IntoIterator<Item = (String, i64)>) {
        self.demand.lock().extend(pools);
    }
}

/// The running simulator.
pub struct PodSim {
    /// Shared state.
    pub world: Arc<World>,
    task: JoinHandle<()>,
}

impl Drop for PodSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How the simulated pods behave.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Namespace of the pools.
    pub namespace: String,
    /// How often the simulation steps.
    pub tick: Duration,
    /// Status reports in flight at once.
    pub report_concurrency: usize,
    /// Reporting thresholds (as the operator renders them).
    pub significance: Significance,
    /// How long a shedding pod refuses new agents.
    pub shed_window: Duration,
    /// Agents wanting each pool the load script names nothing for (`None`: no agents).
    pub default_demand: Option<i64>,
}

impl SimConfig {
    /// Defaults for `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.into(),
            tick: Duration::from_millis(200),
            report_concurrency: 32,
            significance: Significance {
                percent: 5,
                connections: 100,
            },
            shed_window: Duration::from_secs(1),
            default_demand: None,
        }
    }
}

impl PodSim {
    /// Starts simulating every pool's pods in `config.namespace`.
    pub async fn start(client: Client, config: SimConfig) -> Self {
        let world = Arc::new(World::default());
        let task = tokio::spawn(run(client, config, world.clone()));
        Self { world, task }
    }
}

struct Caches {
    sets: Store<StatefulSet>,
    pods: Store<Pod>,
    pools: Store<ConnectionPool>,
}

fn cache<K>(api: Api<K>, config: watcher::Config) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

async fn run(client: Client, config: SimConfig, world: Arc<World>) {
    let ns = config.namespace.clone();
    let caches = Caches {
        sets: cache(
            Api::<StatefulSet>::namespaced(client.clone(), &ns),
            watcher::Config::default(),
        ),
        pods: cache(
            Api::<Pod>::namespaced(client.clone(), &ns),
            watcher::Config::default().labels(&format!("{SIM_LABEL}=true")),
        ),
        // Only for the pools' limits and report intervals. A field selector that every
        // pool matches keeps this watch apart from the operator's in the stand-in's
        // accounting (both are kube-rs clients).
        pools: cache(
            Api::<ConnectionPool>::namespaced(client.clone(), &ns),
            watcher::Config::default().fields(&format!("metadata.namespace={ns}")),
        ),
    };
    let _ = caches.sets.wait_until_ready().await;
    let _ = caches.pods.wait_until_ready().await;
    let _ = caches.pools.wait_until_ready().await;
    // The kubelet and the pods run side by side, as they do on a node: a gateway
    // reports on its own schedule whatever the kubelet is busy with. In one loop, the
    // reports waited for every pod creation of a scale-up (a hundred pools 1 → 5:
    // 800 requests, seconds on a loaded machine), heartbeats came later than the
    // operator's staleness bound, whole pools' entries were pruned as stale and the
    // pools never settled.
    let kubelet_loop = async {
        let mut tick = tokio::time::interval(config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sts_status: HashMap<String, StsMemory> = HashMap::new();
        loop {
            tick.tick().await;
            if let Err(e) = kubelet(&client, &ns, &caches, &world, &mut sts_status).await {
                warn!(%e, "pod simulator: kubelet step failed");
            }
        }
    };
    let pods_loop = async {
        let mut tick = tokio::time::interval(config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            follow_instructions(&ns, &caches, &world, config.shed_window);
            place_load(&caches, &world, config.default_demand);
            report(&client, &ns, &config, &caches, &world).await;
        }
    };
    tokio::join!(kubelet_loop, pods_loop);
}

/// StatefulSets synced at once by the simulated controller (kube-controller-manager's
/// default `--concurrent-statefulset-syncs`).
const CONCURRENT_STATEFULSET_SYNCS: usize = 5;

/// What the simulator last wrote of a StatefulSet's status, and its current revision.
#[derive(Debug, Default)]
struct StsMemory {
    status: Option<serde_json::Value>,
    current: Option<String>,
    recorded: HashSet<String>,
    /// The update revision of the generation it was computed for: hashing the template
    /// of every StatefulSet at every tick cost the simulator most of its step.
    revision: Option<(Option<i64>, String)>,
}

/// Pods for every StatefulSet replica, labelled with the template revision they were
/// created from ([`crate::revision`]); gone ones deleted; a pod whose Pod object was
/// deleted (a rollout, `OnDelete`) is recreated at the update revision; with
/// `RollingUpdate`, one old pod at a time is replaced; StatefulSet status kept.
async fn kubelet(
    client: &Client,
    ns: &str,
    caches: &Caches,
    world: &World,
    sts_status: &mut HashMap<String, StsMemory>,
) -> kube::Result<()> {
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let sets_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let mut wanted: HashSet<String> = HashSet::new();
    // Pods whose object the watch showed and no longer shows (or shows anew): deleted.
    {
        let mut pods = world.pods.lock();
        let mut deleted = Vec::new();
        for (name, pod) in pods.iter_mut() {
            let object = caches.pods.get(&ObjectRef::new(name).within(ns));
            let same =
                object.is_some_and(|o| o.metadata.uid.is_some() && o.metadata.uid == pod.uid);
            if same {
                pod.seen = true;
            } else if pod.seen {
                deleted.push(name.clone());
            }
        }
        for name in deleted {
            debug!(pod = %name, "simulated pod deleted; recreating it");
            pods.remove(&name);
        }
    }
    // Every replica is wanted before any StatefulSet is synced, so that one that fails
    // (and is retried at the next tick) never has its pods taken for gone.
    let sets = caches.sets.state();
    for sts in &sets {
        let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        wanted.extend((0..replicas).map(|o| format!("{}-{o}", sts.name_any())));
    }
    // One StatefulSet's failure does not hold up the others (the step used to return on
    // the first error, skipping every StatefulSet after it in the cache's order). Several
    // are synced at once, as kube-controller-manager does (`--concurrent-statefulset-syncs`,
    // 5 by default): one at a time, a hundred pools scaling up at once waited minutes for
    // their pods, and the control-plane test's pools never settled.
    let synced: Vec<(String, StsMemory, kube::Result<()>)> = futures_util::stream::iter(sets)
        .map(|sts| {
            let name = sts.name_any();
            let mut memory = sts_status.remove(&name).unwrap_or_default();
            let (pods_api, sets_api) = (&pods_api, &sets_api);
            async move {
                let result = sync_set(client, pods_api, sets_api, &sts, world, &mut memory).await;
                (name, memory, result)
            }
        })
        .buffer_unordered(CONCURRENT_STATEFULSET_SYNCS)
        .collect()
        .await;
    let mut first_error = None;
    for (name, memory, result) in synced {
        if let Err(e) = result {
            debug!(%e, sts = %name, "pod simulator: StatefulSet step failed");
            first_error.get_or_insert(e);
        }
        sts_status.insert(name, memory);
    }
    let gone: Vec<String> = world
        .pods
        .lock()
        .keys()
        .filter(|name| !wanted.contains(*name))
        .cloned()
        .collect();
    for name in gone {
        world.pods.lock().remove(&name);
        match pods_api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One StatefulSet's step of [`kubelet`]: its ControllerRevision, its pods (created,
/// replaced on `RollingUpdate`) and its status.
async fn sync_set(
    client: &Client,
    pods_api: &Api<Pod>,
    sets_api: &Api<StatefulSet>,
    sts: &StatefulSet,
    world: &World,
    memory: &mut StsMemory,
) -> kube::Result<()> {
    let pool = sts.name_any();
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    // A template change bumps the generation.
    let generation = sts.metadata.generation;
    let update = match &memory.revision {
        Some((at, update)) if *at == generation && generation.is_some() => update.clone(),
        _ => {
            let update = crate::revision::update_revision(sts);
            memory.revision = Some((generation, update.clone()));
            update
        }
    };
    if memory.recorded.insert(update.clone())
        && let Err(e) = crate::revision::record(client, sts, &update).await
    {
        memory.recorded.remove(&update);
        debug!(%e, "pod simulator: ControllerRevision");
    }
    let current = memory.current.get_or_insert_with(|| update.clone()).clone();
    // RollingUpdate: the controller replaces the highest old pod, one at a time.
    if !crate::revision::on_delete(sts) {
        let all_there =
            (0..replicas).all(|o| world.pods.lock().contains_key(&format!("{pool}-{o}")));
        let old = (0..replicas)
            .rev()
            .map(|o| format!("{pool}-{o}"))
            .find(|n| {
                world
                    .pods
                    .lock()
                    .get(n)
                    .is_some_and(|p| p.revision != update)
            });
        if all_there && let Some(name) = old {
            world.pods.lock().remove(&name);
            match pods_api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    for o in 0..replicas {
        let name = format!("{pool}-{o}");
        if world.pods.lock().contains_key(&name) {
            continue;
        }
        let mut labels = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref()?.labels.clone())
            .unwrap_or_default();
        labels.insert(SIM_LABEL.into(), "true".into());
        labels.insert("tether.dev/pool".into(), pool.clone());
        labels.insert(crate::revision::REVISION_LABEL.into(), update.clone());
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": sts.namespace(), "labels": labels},
            "spec": {"containers": [{"name": "gateway", "image": "simulated"}]},
        }))
        .expect("pod json");
        let uid = match pods_api.create(&PostParams::default(), &pod).await {
            Ok(created) => created.metadata.uid,
            // Left over from an earlier run of the simulator: taken over as it is.
            Err(kube::Error::Api(s)) if s.code == 409 => None,
            Err(e) => return Err(e),
        };
        // Running and Ready at once (what a rollout waits for before its next batch).
        let ready = json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}});
        pods_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(ready))
            .await?;
        world.pods.lock().insert(
            name,
            SimPod {
                pool: pool.clone(),
                connections: 0,
                refused: 0,
                draining: false,
                shedding_until: None,
                admission_closed_until: None,
                instruction: None,
                acted: Vec::new(),
                boot_id: format!("{:016x}", rand::random::<u64>()),
                silent: false,
                revision: update.clone(),
                uid,
                seen: false,
                last: None,
            },
        );
    }
    // Every replica runs and is ready; the status follows each new generation and
    // each pod's revision.
    // The pool's pods only (names sort by pool): a scan of every pod for every
    // StatefulSet at every tick grew with the square of the pools.
    let prefix = format!("{pool}-");
    let revisions: BTreeMap<i32, String> = world
        .pods
        .lock()
        .range(prefix.clone()..)
        .take_while(|(n, _)| n.starts_with(&prefix))
        .filter(|(_, p)| p.pool == pool)
        .filter_map(|(n, p)| Some((crate::scaling_ordinal(&pool, n)?, p.revision.clone())))
        .filter(|(o, _)| *o < replicas)
        .collect();
    let (fields, current) = crate::revision::status_fields(&revisions, replicas, &current, &update);
    memory.current = Some(current);
    let mut status = json!({
        "observedGeneration": sts.metadata.generation,
        "replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
    });
    if let (Some(status), serde_json::Value::Object(fields)) = (status.as_object_mut(), fields) {
        status.extend(fields);
    }
    if memory.status.as_ref() != Some(&status) {
        sets_api
            .patch_status(
                &pool,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
        memory.status = Some(status);
    }
    Ok(())
}

/// Acts on each pod's instruction annotation as the gateway does.
fn follow_instructions(ns: &str, caches: &Caches, world: &World, shed_window: Duration) {
    let mut pods = world.pods.lock();
    for (name, pod) in pods.iter_mut() {
        let object = caches.pods.get(&ObjectRef::new(name).within(ns));
        let instruction: Option<PodInstruction> = object.as_ref().and_then(|p| {
            let raw = p.annotations().get(INSTRUCTION_ANNOTATION)?;
            serde_json::from_str(raw).ok()
        });
        // Admission follows every instruction, whatever its id (the gateway's `follow`).
        pod.admission_closed_until = instruction
            .as_ref()
            .filter(|i| i.pod == *name)
            .and_then(|i| i.admission_closed_until.as_ref())
            .map(|t| t.0);
        match instruction {
            Some(i) if i.pod == *name => {
                if pod.acted.last() != Some(&i.id) {
                    pod.acted.push(i.id.clone());
                    if let Some(n) = i.shed.filter(|_| !i.drain) {
                        pod.connections -= n.min(pod.connections);
                        pod.shedding_until = Some(Instant::now() + shed_window);
                    }
                }
                pod.instruction = Some(i.id.clone());
                if i.drain {
                    pod.draining = true;
                    pod.connections = 0;
                }
            }
            _ => pod.draining = false,
        }
    }
}

/// Places each pool's demand: agents that are not connected connect to the pods that
/// accept them, evenly, up to the limit; the rest are refused. Fewer agents leave
/// evenly.
fn place_load(caches: &Caches, world: &World, default_demand: Option<i64>) {
    let mut demand = world.demand.lock().clone();
    let pools = caches.pools.state();
    if let Some(agents) = default_demand {
        for p in &pools {
            demand.entry(p.name_any()).or_insert(agents);
        }
    }
    let limits: HashMap<String, i64> = pools
        .iter()
        .map(|p| {
            (
                p.name_any(),
                i64::from(p.spec.limits.max_connections_per_pod),
            )
        })
        .collect();
    let (now, wall) = (Instant::now(), Timestamp::now());
    let mut pods = world.pods.lock();
    let mut by_pool: HashMap<String, Vec<String>> = HashMap::new();
    for (name, pod) in pods.iter() {
        by_pool
            .entry(pod.pool.clone())
            .or_default()
            .push(name.clone());
    }
    for (pool, want) in demand {
        let max = limits.get(&pool).copied().unwrap_or(i64::MAX);
        let names = by_pool.remove(&pool).unwrap_or_default();
        let held: i64 = names.iter().map(|n| pods[n].connections).sum();
        if want < held {
            let mut leave = held - want;
            for n in &names {
                let p = pods.get_mut(n).expect("pod");
                let share = (p.connections * (held - want) + held - 1) / held.max(1);
                let gone = share.min(leave).min(p.connections);
                p.connections -= gone;
                leave -= gone;
            }
            continue;
        }
        let accepting: Vec<String> = names
            .iter()
            .filter(|n| {
                let p = &pods[*n];
                p.admits(now, wall)
            })
            .cloned()
            .collect();
        let mut arriving = want - held;
        let mut round = accepting.clone();
        while arriving > 0 && !round.is_empty() {
            let each = (arriving / round.len() as i64).max(1);
            let mut next = Vec::new();
            for n in &round {
                if arriving == 0 {
                    break;
                }
                let p = pods.get_mut(n).expect("pod");
                let took = each.min(max - p.connections).min(arriving).max(0);
                p.connections += took;
                arriving -= took;
                if p.connections < max {
                    next.push(n.clone());
                }
            }
            round = next;
        }
        if arriving > 0 {
            // Full (or nobody accepting): these agents were refused, and retry.
            let full: Vec<&String> = accepting.iter().collect();
            if let Some(first) = full.first() {
                pods.get_mut(*first).expect("pod").refused += arriving;
            }
        }
    }
}

/// Writes every due report, a bounded number at a time.
async fn report(
    client: &Client,
    ns: &str,
    config: &SimConfig,
    caches: &Caches,
    world: &Arc<World>,
) {
    // Each pod reports on its pool's interval, as the gateway does.
    let intervals: HashMap<String, Duration> = caches
        .pools
        .state()
        .iter()
        .map(|p| {
            let secs = u64::try_from(p.spec.effective_report_interval_seconds()).unwrap_or(10);
            (p.name_any(), Duration::from_secs(secs.max(1)))
        })
        .collect();
    let (now, wall) = (Instant::now(), Timestamp::now());
    let due: Vec<(String, String, Snapshot)> = {
        let pods = world.pods.lock();
        pods.iter()
            .filter(|(_, p)| !p.silent)
            .filter_map(|(name, p)| {
                let snap = Snapshot {
                    connections: p.connections,
                    refused: p.refused,
                    ready: p.admits(now, wall),
                    draining: p.draining,
                    // Simulated pods have no bus (their pools route nothing).
                    bus_connected: None,
                    instruction: p.instruction.clone(),
                };
                let last = p.last.as_ref().map(|(at, s)| (*at, s));
                let interval = *intervals.get(&p.pool)?;
                let at = next_report(last, &snap, config.significance, interval, 1.0);
                (at <= Instant::now()).then(|| (name.clone(), p.pool.clone(), snap))
            })
            .collect()
    };
    // The gateway's request (SSA of its entry through /status), sent raw: the reply is the
    // whole pool (hundreds of KB for a pool of a thousand pods) and no simulated pod reads
    // it, so decoding it once per report would make the simulator the bottleneck.
    let pools =
        kube::core::Request::new(<ConnectionPool as kube::Resource>::url_path(&(), Some(ns)));
    futures_util::stream::iter(due)
        .for_each_concurrent(config.report_concurrency, |(name, pool, snap)| {
            let pools = &pools;
            let world = world.clone();
            async move {
                let boot = world
                    .pods
                    .lock()
                    .get(&name)
                    .map(|p| p.boot_id.clone())
                    .unwrap_or_default();
                let body = report_body(&pool, &name, &boot, &snap, Timestamp::now());
                let params = PatchParams::apply(&field_manager(&name)).force();
                let sent =
                    match pools.patch_subresource("status", &pool, &params, &Patch::Apply(body)) {
                        Ok(req) => client.request_text(req).await.map(drop),
                        Err(e) => Err(kube::Error::BuildRequest(e)),
                    };
                match sent {
                    Ok(_) => {
                        world.reports.fetch_add(1, Ordering::Relaxed);
                        if let Some(p) = world.pods.lock().get_mut(&name) {
                            p.refused -= snap.refused.min(p.refused);
                            p.last = Some((Instant::now(), snap));
                        }
                    }
                    Err(e) => {
                        world.report_errors.fetch_add(1, Ordering::Relaxed);
                        debug!(%e, pod = %name, "simulated report failed");
                    }
                }
            }
        })
        .await;
}

//! The kubelet: runs the pool's StatefulSet as real `tether-gateway` processes (or, in
//! container mode, as containers from the gateway image with the pod spec as rendered:
//! [`crate::container`]), keeps their Pods' readiness and the StatefulSet's status, and
//! serves the pool's client Service through a [`ServiceProxy`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tokio_util_free::Stop;
use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tether_crds::ConnectionPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use crate::cluster::Cluster;
use crate::container::{self, HttpProbe, PodVolumes, RunningContainer, container_port};
use crate::revision;
use crate::runtime::ContainerEnv;
use crate::service_proxy::{Backend, EndpointSource, ServiceProxy};
use crate::{API_KEY, NS, binary};

/// A gateway pod the kubelet runs.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Pod name.
    pub pod: String,
    /// Public (WebSocket) address.
    pub public: String,
    /// Internal (push API) address.
    pub internal: String,
    /// Passes its readiness probe.
    pub ready: bool,
    /// The container's id (container mode).
    pub container_id: Option<String>,
}

/// A pod the kubelet stopped, and what it held then.
#[derive(Debug, Clone)]
pub struct Removal {
    /// Pod name.
    pub pod: String,
    /// Connections the gateway held when it got SIGTERM (its `/v1/stats`).
    pub connections_at_sigterm: i64,
    /// Whether the pool's status carried a drain instruction for it then.
    pub was_drain_instructed: bool,
    /// When the instruction was issued (for the deadline), if any.
    pub drain_issued_at: Option<k8s_openapi::jiff::Timestamp>,
}

struct RunningPod {
    workload: Workload,
    endpoint: Endpoint,
    /// The template revision it was created from (its `controller-revision-hash`).
    revision: String,
    /// The StatefulSet it was created from: a restart of its process (as a kubelet
    /// restarts a container) keeps its revision.
    from: Arc<StatefulSet>,
    /// Its Pod object's uid: when that object is deleted (or replaced), the pod stops.
    uid: Option<String>,
}

/// What runs a pod.
enum Workload {
    /// A host process (config paths and listeners rewritten).
    Process(Child),
    /// A container, its volumes and its probes.
    Container(Box<ContainerPod>),
}

struct ContainerPod {
    container: RunningContainer,
    volumes: PodVolumes,
    readiness: Option<ProbeState>,
    liveness: Option<ProbeState>,
    last_refresh: Instant,
}

/// One probe's schedule and counters (the kubelet's prober).
struct ProbeState {
    probe: HttpProbe,
    url: String,
    started: Instant,
    last: Option<Instant>,
    successes: u32,
    failures: u32,
    ok: bool,
}

// === impl ProbeState ===

impl ProbeState {
    fn new(probe: HttpProbe, ip: &str, ok: bool) -> Self {
        let url = format!("http://{ip}:{}{}", probe.port, probe.path);
        Self {
            probe,
            url,
            started: Instant::now(),
            last: None,
            successes: 0,
            failures: 0,
            ok,
        }
    }

    /// Probes when due; returns the result (unchanged between probes).
    async fn tick(&mut self, http: &reqwest::Client) -> bool {
        let now = Instant::now();
        let due = now >= self.started + self.probe.initial_delay
            && self.last.is_none_or(|t| now >= t + self.probe.period);
        if !due {
            return self.ok;
        }
        self.last = Some(now);
        let passed = http
            .get(&self.url)
            .timeout(self.probe.timeout.max(Duration::from_millis(500)))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success() || r.status().is_redirection());
        if passed {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= self.probe.success_threshold {
                self.ok = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.probe.failure_threshold {
                self.ok = false;
            }
        }
        self.ok
    }
}

// === impl Workload ===

impl Workload {
    fn exited(&mut self) -> bool {
        match self {
            Self::Process(child) => child.try_wait().ok().flatten().is_some(),
            Self::Container(c) => c.container.exited().is_some(),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn terminate(self, grace: Duration) {
        match self {
            Self::Process(child) => terminate(child, grace).await,
            Self::Container(c) => c.container.stop(grace).await,
        }
    }
}

/// The part of a kubelet, a StatefulSet controller and kube-proxy the loop needs.
pub struct Kubelet {
    endpoints: Arc<Mutex<BTreeMap<i32, Endpoint>>>,
    removals: Arc<Mutex<Vec<Removal>>>,
    replicas_seen: Arc<Mutex<Vec<(Instant, i32)>>>,
    service: ServiceProxy,
    stop: Stop,
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    /// Starts running the pool's StatefulSet, with its client Service on a free
    /// loopback port.
    pub fn start(cluster: &Cluster, pool: &str) -> anyhow::Result<Self> {
        Self::start_with_service(cluster, pool, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts running the pool's StatefulSet, with its client Service on `service`
    /// (a fixed port gives users one address that outlives every pod).
    pub fn start_with_service(
        cluster: &Cluster,
        pool: &str,
        service: SocketAddr,
    ) -> anyhow::Result<Self> {
        let gateway = match cluster.containers {
            Some(_) => None,
            None => Some(binary("tether-gateway")?),
        };
        let endpoints = Arc::new(Mutex::new(BTreeMap::new()));
        let removals = Arc::new(Mutex::new(Vec::new()));
        let replicas_seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Stop::default();
        let state = KubeletLoop {
            client: cluster.client.clone(),
            api_url: cluster.sim.url(),
            root: cluster.dir.path().join("pods"),
            gateway,
            containers: cluster.containers.clone(),
            retry_at: HashMap::new(),
            pool: pool.to_string(),
            running: BTreeMap::new(),
            endpoints: endpoints.clone(),
            removals: removals.clone(),
            replicas_seen: replicas_seen.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            last_sts_status: None,
            current_revision: None,
            recorded: std::collections::HashSet::new(),
            stopping: HashMap::new(),
        };
        let task = tokio::spawn(state.run(stop.clone()));
        let service = ServiceProxy::start(service, service_endpoints(endpoints.clone()))
            .with_context(|| format!("binding the pool's Service on {service}"))?;
        Ok(Self {
            endpoints,
            removals,
            replicas_seen,
            service,
            stop,
            task,
        })
    }

    /// The pool's client Service (its address, and its connections per pod).
    pub fn service(&self) -> &ServiceProxy {
        &self.service
    }

    /// The agents' WebSocket URL through the pool's client Service.
    pub fn service_url(&self) -> String {
        self.service.ws_url()
    }

    /// The pods' endpoints now.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoints.lock().values().cloned().collect()
    }

    /// How many pods are Ready (in the Service) now.
    pub fn ready_count(&self) -> usize {
        self.endpoints.lock().values().filter(|e| e.ready).count()
    }

    /// Shared view of the endpoints (for agents).
    pub fn endpoints_handle(&self) -> Arc<Mutex<BTreeMap<i32, Endpoint>>> {
        self.endpoints.clone()
    }

    /// Pods stopped so far.
    pub fn removals(&self) -> Vec<Removal> {
        self.removals.lock().clone()
    }

    /// Every distinct StatefulSet size the kubelet saw, in order.
    pub fn replicas_history(&self) -> Vec<i32> {
        let seen = self.replicas_seen.lock();
        let mut out: Vec<i32> = Vec::new();
        for (_, r) in seen.iter() {
            if out.last() != Some(r) {
                out.push(*r);
            }
        }
        out
    }

    /// Stops every gateway (SIGTERM, as at node shutdown) and the loop.
    pub async fn shutdown(self) {
        self.service.stop();
        self.stop.stop();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// The Service's endpoints: the running pods' public addresses and readiness, read by
/// the proxy on every new connection (the kubelet removes a pod from the map the moment
/// it stops it, as a terminating pod leaves the Service's endpoints).
fn service_endpoints(endpoints: Arc<Mutex<BTreeMap<i32, Endpoint>>>) -> EndpointSource {
    Arc::new(move || {
        endpoints
            .lock()
            .values()
            .filter_map(|e| {
                Some(Backend {
                    pod: e.pod.clone(),
                    addr: e.public.parse().ok()?,
                    ready: e.ready,
                })
            })
            .collect()
    })
}

struct KubeletLoop {
    client: Client,
    /// The API server's address, for the pods' kubeconfigs.
    api_url: String,
    root: PathBuf,
    /// The gateway binary (process mode).
    gateway: Option<PathBuf>,
    /// Container mode's network, API access and images.
    containers: Option<Arc<ContainerEnv>>,
    /// Ordinals whose start failed, and when to try again (a crash-loop back-off).
    retry_at: HashMap<i32, Instant>,
    pool: String,
    running: BTreeMap<i32, RunningPod>,
    endpoints: Arc<Mutex<BTreeMap<i32, Endpoint>>>,
    removals: Arc<Mutex<Vec<Removal>>>,
    replicas_seen: Arc<Mutex<Vec<(Instant, i32)>>>,
    http: reqwest::Client,
    last_sts_status: Option<Value>,
    /// The StatefulSet's `currentRevision`: what the pods ran before the template last
    /// changed (it becomes the update revision once every pod runs that).
    current_revision: Option<String>,
    /// Revisions whose ControllerRevision exists.
    recorded: std::collections::HashSet<String>,
    /// Pods being stopped for their replacement: the ordinal is started again (at the
    /// update revision) only once the old process is gone, as a StatefulSet waits for
    /// the old Pod before it creates its successor.
    stopping: HashMap<i32, tokio::task::JoinHandle<()>>,
}

impl KubeletLoop {
    async fn run(mut self, stop: Stop) {
        while !stop.is_stopped() {
            if let Err(e) = self.sync().await {
                debug!(%e, "kubelet sync");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = stop.stopped() => {}
            }
        }
        let ordinals: Vec<i32> = self.running.keys().copied().collect();
        let grace = Duration::from_secs(20);
        let stops = ordinals.into_iter().filter_map(|o| self.running.remove(&o));
        futures_util::future::join_all(stops.map(|p| p.workload.terminate(grace))).await;
    }

    async fn sync(&mut self) -> anyhow::Result<()> {
        let sets: Api<StatefulSet> = Api::namespaced(self.client.clone(), NS);
        let Some(sts) = sets.get_opt(&self.pool).await? else {
            return Ok(());
        };
        let spec = sts.spec.clone().context("sts spec")?;
        let replicas = spec.replicas.unwrap_or(1);
        let sts = Arc::new(sts);
        let update = revision::update_revision(&sts);
        if self.recorded.insert(update.clone())
            && let Err(e) = revision::record(&self.client, &sts, &update).await
        {
            self.recorded.remove(&update);
            debug!(%e, "kubelet: ControllerRevision");
        }
        let current = self
            .current_revision
            .get_or_insert_with(|| update.clone())
            .clone();
        self.replicas_seen.lock().push((Instant::now(), replicas));
        let grace = spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);

        // Removed ordinals: out of the endpoints at once (as a terminating pod leaves the
        // Service's endpoints), SIGTERM, SIGKILL after the grace period.
        let doomed: Vec<i32> = self
            .running
            .keys()
            .copied()
            .filter(|o| *o >= replicas)
            .collect();
        for o in doomed {
            let pod = self.running.remove(&o).expect("running");
            self.endpoints.lock().remove(&o);
            let connections = self.stats_connections(&pod.endpoint.internal).await;
            let (instructed, issued) = self.drain_instruction(&pod.endpoint.pod).await;
            info!(pod = %pod.endpoint.pod, connections, instructed, "kubelet: stopping pod");
            self.removals.lock().push(Removal {
                pod: pod.endpoint.pod.clone(),
                connections_at_sigterm: connections,
                was_drain_instructed: instructed,
                drain_issued_at: issued,
            });
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
            let name = pod.endpoint.pod.clone();
            tokio::spawn(async move {
                pod.workload
                    .terminate(Duration::from_secs(grace.max(1) as u64))
                    .await;
                let _ = pods.delete(&name, &DeleteParams::default()).await;
            });
        }

        // Pods whose Pod object was deleted (a rollout's `OnDelete`) stop; the
        // StatefulSet then recreates them from its template, at the update revision.
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let objects: HashMap<String, Option<String>> = pods_api
            .list(&ListParams::default().labels(&format!("tether.dev/pool={}", self.pool)))
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p.metadata.uid))
            .collect();
        let deleted: Vec<i32> = self
            .running
            .iter()
            .filter(|(_, p)| {
                p.uid
                    .as_ref()
                    .is_some_and(|uid| objects.get(&p.endpoint.pod) != Some(&Some(uid.clone())))
            })
            .map(|(o, _)| *o)
            .collect();
        for o in deleted {
            self.replace(o, grace, false).await;
        }
        // RollingUpdate: the controller replaces old pods itself, highest ordinal first,
        // one at a time, once every pod is Ready.
        self.stopping.retain(|_, h| !h.is_finished());
        if !revision::on_delete(&sts)
            && self.stopping.is_empty()
            && self.running.len() as i32 == replicas
            && self.running.values().all(|p| p.endpoint.ready)
            && let Some(o) = self
                .running
                .iter()
                .rev()
                .find(|(_, p)| p.revision != update)
                .map(|(o, _)| *o)
        {
            self.replace(o, grace, true).await;
        }

        // Missing or exited pods: (re)start them, as the kubelet restarts a container.
        for o in 0..replicas {
            if self.stopping.get(&o).is_some_and(|h| !h.is_finished()) {
                continue;
            }
            let exited = match self.running.get_mut(&o) {
                Some(p) => p.workload.exited(),
                None => true,
            };
            if exited {
                // A restart keeps the pod's revision; a new pod gets the update revision.
                let mut from = sts.clone();
                if let Some(old) = self.running.remove(&o) {
                    warn!(ordinal = o, "gateway exited; restarting it");
                    self.endpoints.lock().remove(&o);
                    from = old.from.clone();
                    old.workload.terminate(Duration::from_secs(1)).await;
                }
                if self.retry_at.get(&o).is_some_and(|t| Instant::now() < *t) {
                    continue;
                }
                match self.start_pod(&from, o).await {
                    Ok(pod) => {
                        self.retry_at.remove(&o);
                        self.endpoints.lock().insert(o, pod.endpoint.clone());
                        self.running.insert(o, pod);
                    }
                    Err(e) => {
                        warn!(ordinal = o, "could not start the gateway: {e:#}");
                        self.retry_at
                            .insert(o, Instant::now() + Duration::from_secs(2));
                    }
                }
            }
        }

        // Container mode: Secret and ConfigMap volumes follow their objects, and a
        // failing liveness probe restarts the container.
        for (o, pod) in &mut self.running {
            let Workload::Container(c) = &mut pod.workload else {
                continue;
            };
            if c.last_refresh.elapsed() >= VOLUME_REFRESH {
                c.last_refresh = Instant::now();
                match c.volumes.refresh(&self.client).await {
                    Ok(0) => {}
                    Ok(n) => {
                        info!(pod = %pod.endpoint.pod, volumes = n, "kubelet: volumes updated")
                    }
                    Err(e) => warn!(ordinal = o, "volume refresh: {e:#}"),
                }
            }
            if let Some(l) = &mut c.liveness
                && !l.tick(&self.http).await
            {
                warn!(pod = %pod.endpoint.pod, url = %l.url, "liveness probe failed; killing the container");
                c.container.kill().await;
            }
        }

        // Readiness probes.
        let mut ready_count = 0;
        for (o, pod) in &mut self.running {
            let ready = match &mut pod.workload {
                Workload::Process(_) => self
                    .http
                    .get(format!("http://{}/readyz", pod.endpoint.internal))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                Workload::Container(c) => match &mut c.readiness {
                    Some(r) => r.tick(&self.http).await,
                    None => true,
                },
            };
            if ready {
                ready_count += 1;
            }
            if ready != pod.endpoint.ready {
                pod.endpoint.ready = ready;
                if let Some(e) = self.endpoints.lock().get_mut(o) {
                    e.ready = ready;
                }
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
                let status = json!({"status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": if ready { "True" } else { "False" }},
                ]}});
                let _ = pods
                    .patch_status(
                        &pod.endpoint.pod,
                        &PatchParams::default(),
                        &Patch::Merge(status),
                    )
                    .await;
            }
        }
        let running = self.running.len() as i32;
        let revisions: BTreeMap<i32, String> = self
            .running
            .iter()
            .map(|(o, p)| (*o, p.revision.clone()))
            .collect();
        let (fields, current) = revision::status_fields(&revisions, replicas, &current, &update);
        self.current_revision = Some(current);
        let mut status = json!({
            "observedGeneration": sts.metadata.generation,
            "replicas": running, "readyReplicas": ready_count, "availableReplicas": ready_count,
        });
        if let (Some(status), Value::Object(fields)) = (status.as_object_mut(), fields) {
            status.extend(fields);
        }
        if self.last_sts_status.as_ref() != Some(&status) {
            sets.patch_status(
                &self.pool,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
            self.last_sts_status = Some(status);
        }
        Ok(())
    }

    /// Stops pod `o` for its replacement: out of the endpoints at once, SIGTERM (SIGKILL
    /// after `grace` seconds), its Pod object deleted when `delete` (the controller's own
    /// RollingUpdate; under OnDelete someone else deleted it). The ordinal starts again
    /// once the process is gone.
    async fn replace(&mut self, o: i32, grace: i64, delete: bool) {
        let Some(pod) = self.running.remove(&o) else {
            return;
        };
        self.endpoints.lock().remove(&o);
        let connections = self.stats_connections(&pod.endpoint.internal).await;
        let (instructed, issued) = self.drain_instruction(&pod.endpoint.pod).await;
        info!(pod = %pod.endpoint.pod, revision = %pod.revision, connections, "kubelet: replacing pod");
        self.removals.lock().push(Removal {
            pod: pod.endpoint.pod.clone(),
            connections_at_sigterm: connections,
            was_drain_instructed: instructed,
            drain_issued_at: issued,
        });
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let name = pod.endpoint.pod.clone();
        let stop = tokio::spawn(async move {
            pod.workload
                .terminate(Duration::from_secs(grace.max(1) as u64))
                .await;
            if delete {
                let _ = pods.delete(&name, &DeleteParams::default()).await;
            }
        });
        self.stopping.insert(o, stop);
    }

    async fn stats_connections(&self, internal: &str) -> i64 {
        let stats = self
            .http
            .get(format!("http://{internal}/v1/stats"))
            .bearer_auth(API_KEY)
            .send()
            .await;
        match stats {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["connections"].as_i64())
                .unwrap_or(-1),
            Err(_) => -1,
        }
    }

    async fn drain_instruction(&self, pod: &str) -> (bool, Option<k8s_openapi::jiff::Timestamp>) {
        let pools: Api<ConnectionPool> = Api::namespaced(self.client.clone(), NS);
        let Ok(pool) = pools.get(&self.pool).await else {
            return (false, None);
        };
        let instruction = pool
            .status
            .and_then(|s| s.instructions.into_iter().find(|i| i.pod == pod && i.drain));
        match instruction {
            Some(i) => (true, i.issued_at.map(|t| t.0)),
            None => (false, None),
        }
    }

    /// Creates a pod's object as the StatefulSet controller does (replacing a leftover of
    /// the same name). A refusal (a ResourceQuota's 403) is recorded as that controller
    /// records it: a Warning Event `FailedCreate` on the StatefulSet, repeated ones
    /// counted on the same Event; the pod is then retried with a back-off.
    async fn create_pod(&self, sts: &StatefulSet, name: &str, pod: &Pod) -> anyhow::Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let _ = pods.delete(name, &DeleteParams::default()).await;
        match pods.create(&PostParams::default(), pod).await {
            Ok(created) => Ok(created),
            Err(kube::Error::Api(status)) => {
                let message = format!(
                    "create Pod {name} in StatefulSet {} failed error: {}",
                    self.pool, status.message
                );
                self.record_failed_create(sts, &message).await;
                bail!("{message}")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A FailedCreate Event on the StatefulSet, as client-go's recorder writes it: the
    /// same message again bumps `count` and `lastTimestamp` of one Event.
    async fn record_failed_create(&self, sts: &StatefulSet, message: &str) {
        use k8s_openapi::api::core::v1::Event;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let events: Api<Event> = Api::namespaced(self.client.clone(), NS);
        let now =
            serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or_default();
        let digest = fnv1a(message);
        let name = format!("{}.{digest:016x}", self.pool);
        if let Ok(existing) = events.get(&name).await {
            let count = existing.count.unwrap_or(1) + 1;
            let _ = events
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"count": count, "lastTimestamp": now})),
                )
                .await;
            return;
        }
        let event = json!({
            "metadata": {"name": name, "namespace": NS},
            "involvedObject": {
                "apiVersion": "apps/v1", "kind": "StatefulSet", "namespace": NS,
                "name": self.pool, "uid": sts.metadata.uid,
            },
            "reason": "FailedCreate", "message": message, "type": "Warning",
            "source": {"component": "statefulset-controller"},
            "reportingComponent": "statefulset-controller",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        });
        match serde_json::from_value::<Event>(event) {
            Ok(event) => {
                if let Err(e) = events.create(&PostParams::default(), &event).await {
                    warn!(%e, "could not record the FailedCreate event");
                }
            }
            Err(e) => warn!(%e, "FailedCreate event"),
        }
    }

    /// Starts ordinal `o` as the runtime says.
    async fn start_pod(&self, sts: &Arc<StatefulSet>, o: i32) -> anyhow::Result<RunningPod> {
        let revision = revision::update_revision(sts);
        let (workload, endpoint, uid) = match &self.containers {
            Some(env) => self.start_container_pod(env, sts, o, &revision).await?,
            None => self.start_process_pod(sts, o, &revision).await?,
        };
        Ok(RunningPod {
            workload,
            endpoint,
            revision,
            from: sts.clone(),
            uid,
        })
    }

    /// Container mode: the Pod object from the StatefulSet's template (as the
    /// StatefulSet controller makes it), its own network namespace, its volumes and
    /// environment resolved as a kubelet resolves them, and the container.
    async fn start_container_pod(
        &self,
        env: &ContainerEnv,
        sts: &StatefulSet,
        o: i32,
        revision: &str,
    ) -> anyhow::Result<(Workload, Endpoint, Option<String>)> {
        let name = format!("{}-{o}", self.pool);
        let root = self.root.join(&name);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let template = sts
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .context("pod template")?;
        let meta = template.metadata.unwrap_or_default();
        let mut labels = meta.labels.unwrap_or_default();
        labels.insert(revision::REVISION_LABEL.into(), revision.into());
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": NS,
                "labels": labels, "annotations": meta.annotations,
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "StatefulSet", "controller": true,
                    "name": self.pool, "uid": sts.metadata.uid,
                }],
            },
            "spec": template.spec.context("pod template spec")?,
        }))?;
        let pod = self.create_pod(sts, &name, &pod).await?;
        let uid = pod.metadata.uid.clone();
        let spec = pod.spec.clone().context("pod spec")?;
        let c = spec.containers.first().context("container")?.clone();

        let netns = env.network.attach(&name)?;
        let ip = netns.ip.to_string();
        let (run, volumes) =
            container::prepare(&self.client, &env.api, &pod, &c, &ip, &root).await?;
        let port = |n: &str| {
            container_port(
                &c,
                &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n.into()),
            )
        };
        // The Services' targetPorts (`ws`, `api`) name the container's ports.
        let endpoint = Endpoint {
            pod: name.clone(),
            public: format!("{ip}:{}", port("ws")?),
            internal: format!("{ip}:{}", port("api")?),
            ready: false,
            container_id: None,
        };
        let readiness = c
            .readiness_probe
            .as_ref()
            .map(|p| HttpProbe::from_spec(p, &c))
            .transpose()?
            .map(|p| ProbeState::new(p, &ip, false));
        let liveness = c
            .liveness_probe
            .as_ref()
            .map(|p| HttpProbe::from_spec(p, &c))
            .transpose()?
            .map(|p| ProbeState::new(p, &ip, true));
        let container = RunningContainer::start(&run, netns, &root.join("container.log")).await?;
        let endpoint = Endpoint {
            container_id: Some(container.id.clone()),
            ..endpoint
        };
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        let _ = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await;
        info!(pod = %name, public = %endpoint.public, id = %container.id, "kubelet: container started");
        Ok((
            Workload::Container(Box::new(ContainerPod {
                container,
                volumes,
                readiness,
                liveness,
                last_refresh: Instant::now(),
            })),
            endpoint,
            uid,
        ))
    }

    /// Process mode: the pod's files (config from the ConfigMap, Secret volumes) under
    /// a temp dir, a Pod object, and the gateway process with the pod's environment.
    async fn start_process_pod(
        &self,
        sts: &StatefulSet,
        o: i32,
        revision: &str,
    ) -> anyhow::Result<(Workload, Endpoint, Option<String>)> {
        let name = format!("{}-{o}", self.pool);
        let root = self.root.join(&name);
        std::fs::create_dir_all(&root)?;
        let template = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .context("pod template")?;
        let container = template.containers.first().context("container")?;

        // Volumes: ConfigMap and Secret items, written under the pod's root.
        let mut mounts: HashMap<String, String> = HashMap::new();
        for m in container.volume_mounts.iter().flatten() {
            mounts.insert(m.name.clone(), m.mount_path.clone());
        }
        for volume in template.volumes.iter().flatten() {
            let Some(mount) = mounts.get(&volume.name) else {
                continue;
            };
            if let Some(cm) = &volume.config_map {
                let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), NS);
                let map = cms.get(&cm.name).await?;
                let text = map
                    .data
                    .and_then(|d| d.get("gateway.yaml").cloned())
                    .context("gateway.yaml in the ConfigMap")?;
                let rewritten = rewrite_config(&text, &root)?;
                write_file(&root, mount, &rewritten)?;
            }
            if let Some(secret) = &volume.secret {
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NS);
                let s = secrets
                    .get(secret.secret_name.as_deref().context("secretName")?)
                    .await?;
                let data = s.data.unwrap_or_default();
                // The stand-in, like older servers, may keep `stringData` as given.
                let strings = s.string_data.unwrap_or_default();
                for item in secret.items.iter().flatten() {
                    let value = match (data.get(&item.key), strings.get(&item.key)) {
                        (Some(bytes), _) => String::from_utf8_lossy(&bytes.0).into_owned(),
                        (None, Some(text)) => text.clone(),
                        (None, None) => bail!("secret key {} missing", item.key),
                    };
                    write_file(&root, &format!("{mount}/{}", item.path), &value)?;
                }
            }
        }
        let config = root.join(
            container
                .args
                .as_ref()
                .and_then(|a| a.get(1))
                .context("--config arg")?
                .trim_start_matches('/'),
        );

        // The Pod object, not ready yet.
        let mut labels = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        // The container's resources ride along: a namespace's ResourceQuota judges them.
        labels.insert(revision::REVISION_LABEL.into(), revision.into());
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{
                "name": "gateway", "image": container.image, "resources": container.resources,
            }]},
        }))?;
        let uid = self.create_pod(sts, &name, &pod).await?.metadata.uid;

        // The pod's API credentials, as a kubelet gives them: a bound token of the pod's
        // service account (TokenRequest), so the gateway has exactly what the operator's
        // Role grants that account.
        let account = template
            .service_account_name
            .as_deref()
            .context("the pod template names no service account")?;
        let token = crate::cluster::request_token(&self.client, NS, account).await?;
        let kubeconfig = root.join("kubeconfig");
        crate::cluster::write_token_kubeconfig(&kubeconfig, &self.api_url, &token)?;

        let log = std::fs::File::create(root.join("gateway.log"))?;
        let gateway = self.gateway.as_ref().context("gateway binary")?;
        let mut child = Command::new(gateway)
            .arg("--config")
            .arg(&config)
            .env("POD_NAME", &name)
            .env("POD_NAMESPACE", NS)
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("E2E_GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("tether-gateway listening") {
                    return Ok::<_, std::io::Error>(Some(line));
                }
            }
            Ok(None)
        })
        .await
        .context("gateway start timed out")??
        .context("gateway exited before listening")?;
        // Keep draining stdout so the gateway never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_string)
        };
        let endpoint = Endpoint {
            pod: name.clone(),
            public: field("public=").context("public addr")?,
            internal: field("internal=").context("internal addr")?,
            ready: false,
            container_id: None,
        };
        info!(pod = %name, public = %endpoint.public, %revision, "kubelet: pod started");
        Ok((Workload::Process(child), endpoint, uid))
    }
}

/// How often container mode re-reads a running pod's ConfigMaps and Secrets (a
/// kubelet's sync is about a minute; shorter here so tests need not wait).
const VOLUME_REFRESH: Duration = Duration::from_secs(2);

fn write_file(root: &Path, abs: &str, content: &str) -> anyhow::Result<()> {
    let path = root.join(abs.trim_start_matches('/'));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, content)?;
    Ok(())
}

/// The pod's config with loopback listeners on free ports and every absolute
/// `/etc/tether/...` path moved under the pod's root (its "container filesystem").
pub fn rewrite_config(text: &str, root: &Path) -> anyhow::Result<String> {
    let mut config: serde_yaml::Value = serde_yaml::from_str(text)?;
    fn walk(v: &mut serde_yaml::Value, root: &Path) {
        match v {
            serde_yaml::Value::String(s) if s.starts_with("/etc/tether/") => {
                *s = root.join(s.trim_start_matches('/')).display().to_string();
            }
            serde_yaml::Value::Mapping(m) => m.values_mut().for_each(|v| walk(v, root)),
            serde_yaml::Value::Sequence(s) => s.iter_mut().for_each(|v| walk(v, root)),
            _ => {}
        }
    }
    walk(&mut config, root);
    config["listen"]["public"] = "127.0.0.1:0".into();
    config["listen"]["internal"] = "127.0.0.1:0".into();
    // Many pods share this host: the rendered probe port (8082) is per pod in a cluster.
    config["listen"]["probes"] = "127.0.0.1:0".into();
    Ok(serde_yaml::to_string(&config)?)
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(mut child: Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        warn!("gateway ignored SIGTERM for the grace period; killing it");
        let _ = child.kill().await;
    }
}

/// A stable 64-bit hash of `text` (FNV-1a): names an Event after its message, so a
/// repeat finds it.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

//! Harness of the closed-loop end-to-end tests.
//!
//! ```text
//!  Cluster: tether-kube-sim (in process) + CRD + namespace + Secrets + nats-server
//!     ▲  ▲                                   ▲
//!     │  └── tether-operator (child process, KUBECONFIG) scales the StatefulSet,
//!     │      writes drain/shed instructions into the pool's status
//!     └───── Kubelet (task here): for each StatefulSet replica a real `tether-gateway`
//!            process with the pod's name, namespace, ConfigMap and Secret files; a Pod
//!            object whose Ready condition follows /readyz; SIGTERM (then SIGKILL after
//!            the grace period) for removed ordinals; the StatefulSet's status
//!            and the pool's client Service: a TCP proxy on one stable loopback address
//!            that sends each new connection to a Ready pod ([`service_proxy`])
//!  Agents (tasks here): SDK agents (`tether-agent`) that connect through that Service,
//!            honour reconnect hints, record pushes
//! ```
//!
//! The kubelet records, for every pod it stops, how many connections the gateway still
//! held at that moment (from its `/v1/stats`), so a test can assert that no pod was
//! removed while it still held agents.

pub mod podsim;
pub mod scale;
pub mod service_proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use parking_lot::Mutex;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};
use tether_agent::{Agent, Backoff, Hs256Minter, Options, ReconnectPolicy, State};
use tether_crds::ConnectionPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util_free::Stop;
use tracing::{debug, info, warn};

use crate::service_proxy::{Backend, Conntrack, EndpointSource, ServiceProxy};

/// Namespace of the test pools.
pub const NS: &str = "tenants";
/// The agents' HS256 secret (in the pool's JWT Secret).
pub const JWT_SECRET: &str = "e2e-jwt-secret-0123456789abcdef0123456789";
/// The push API key (in the pool's API-key Secret).
pub const API_KEY: &str = "e2e-api-key";

/// A tiny cancellation flag (the harness needs no more than this).
mod tokio_util_free {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Cloneable stop flag with a notification.
    #[derive(Clone, Default, Debug)]
    pub struct Stop(Arc<(AtomicBool, tokio::sync::Notify)>);

    impl Stop {
        /// Raises the flag and wakes the waiters.
        pub fn stop(&self) {
            self.0.0.store(true, Ordering::SeqCst);
            self.0.1.notify_waiters();
        }
        /// Whether the flag is up.
        pub fn is_stopped(&self) -> bool {
            self.0.0.load(Ordering::SeqCst)
        }
        /// Resolves once the flag is up.
        pub async fn stopped(&self) {
            loop {
                let notified = self.0.1.notified();
                if self.is_stopped() {
                    return;
                }
                notified.await;
            }
        }
    }
}

/// The directory holding the workspace's built binaries (`target/debug`), found from
/// the test executable's own path (`target/debug/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Path of a workspace binary; fails with the command that builds it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first with `cargo build -p tether-gateway -p tether-operator` \
             (the e2e tests run the real binaries)",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port (bound and released; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Installs the ConnectionPool CRD (unless present) and creates namespace `ns` with the Secrets every
/// pool of the harness references (`jwt`/`hs256`, `api-keys`/`keys`).
pub async fn install(client: &Client, ns: &str) -> anyhow::Result<()> {
    // Installed once for every namespace a harness uses.
    match Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ConnectionPool::crd())
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        other => {
            other?;
        }
    }
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, key, value) in [
        ("jwt", "hs256", JWT_SECRET.to_string()),
        ("api-keys", "keys", format!("{API_KEY}\n")),
    ] {
        let secret: Secret = serde_json::from_value(
            json!({"metadata": {"name": name}, "stringData": {key: value}}),
        )?;
        secrets.create(&PostParams::default(), &secret).await?;
    }
    Ok(())
}

// === Cluster ===

/// The API stand-in with the CRD, the namespace and the pool's Secrets, a NATS server,
/// and a temp dir for kubeconfig, pod files and logs.
pub struct Cluster {
    /// The stand-in (dropped last).
    pub sim: tether_kube_sim::Server,
    /// Client of the stand-in.
    pub client: Client,
    /// kubeconfig for child processes.
    pub kubeconfig: PathBuf,
    /// NATS URL for the pool's routing.
    pub nats_url: String,
    nats: Child,
    /// Scratch space (pod roots, logs).
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts everything.
    pub async fn start() -> anyhow::Result<Self> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "tether_e2e=info".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir()?;
        let sim = tether_kube_sim::Server::start().await?;
        let client = sim.client()?;
        let kubeconfig = dir.path().join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig)?;
        install(&client, NS).await?;
        let port = free_port();
        let store = dir.path().join("nats");
        std::fs::create_dir_all(&store)?;
        let nats_bin = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::var_os("NATS_SERVER").map(PathBuf::from))
        .find(|p| p.exists())
        .context("nats-server not found (apt-get install nats-server, or set NATS_SERVER)")?;
        let nats = Command::new(nats_bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nats-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("nats-server did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            sim,
            client,
            kubeconfig,
            nats_url: format!("nats://127.0.0.1:{port}"),
            nats,
            dir,
        })
    }

    /// The pools API in [`NS`].
    pub fn pools(&self) -> Api<ConnectionPool> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Creates a pool from a spec (merged over the Secrets' references and the NATS URL).
    pub async fn create_pool(&self, name: &str, spec: Value) -> anyhow::Result<()> {
        let mut full = json!({
            "tenant": "acme",
            "auth": {
                "jwt": {"secretRef": {"name": "jwt", "key": "hs256"}},
                "apiKeysSecretRef": {"name": "api-keys", "key": "keys"},
            },
            "routing": {"nats": {"url": self.nats_url}},
        });
        merge(&mut full, spec);
        let pool: ConnectionPool = serde_json::from_value(json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
            "metadata": {"name": name, "namespace": NS},
            "spec": full,
        }))?;
        self.pools().create(&PostParams::default(), &pool).await?;
        Ok(())
    }

    /// Starts the real operator process against the stand-in.
    pub fn start_operator(&self) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.dir.path().join("operator.log"))?;
        let child = Command::new(binary("tether-operator")?)
            .args([
                "--no-leader-election",
                "--namespace",
                NS,
                "--admin-addr",
                "127.0.0.1:0",
                "--gateway-image",
                "tether-gateway:e2e",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("E2E_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(child)
    }

    /// Path of the operator's log (kept in the temp dir; printed on failure).
    pub fn operator_log(&self) -> PathBuf {
        self.dir.path().join("operator.log")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.nats.start_kill();
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// === Kubelet ===

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
    child: Child,
    endpoint: Endpoint,
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
        let gateway = binary("tether-gateway")?;
        let endpoints = Arc::new(Mutex::new(BTreeMap::new()));
        let removals = Arc::new(Mutex::new(Vec::new()));
        let replicas_seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Stop::default();
        let state = KubeletLoop {
            client: cluster.client.clone(),
            kubeconfig: cluster.kubeconfig.clone(),
            root: cluster.dir.path().join("pods"),
            gateway,
            pool: pool.to_string(),
            running: BTreeMap::new(),
            endpoints: endpoints.clone(),
            removals: removals.clone(),
            replicas_seen: replicas_seen.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            last_sts_status: None,
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
    kubeconfig: PathBuf,
    root: PathBuf,
    gateway: PathBuf,
    pool: String,
    running: BTreeMap<i32, RunningPod>,
    endpoints: Arc<Mutex<BTreeMap<i32, Endpoint>>>,
    removals: Arc<Mutex<Vec<Removal>>>,
    replicas_seen: Arc<Mutex<Vec<(Instant, i32)>>>,
    http: reqwest::Client,
    last_sts_status: Option<(i32, i32)>,
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
        futures_util::future::join_all(stops.map(|p| terminate(p.child, grace))).await;
    }

    async fn sync(&mut self) -> anyhow::Result<()> {
        let sets: Api<StatefulSet> = Api::namespaced(self.client.clone(), NS);
        let Some(sts) = sets.get_opt(&self.pool).await? else {
            return Ok(());
        };
        let spec = sts.spec.clone().context("sts spec")?;
        let replicas = spec.replicas.unwrap_or(1);
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
                terminate(pod.child, Duration::from_secs(grace.max(1) as u64)).await;
                let _ = pods.delete(&name, &DeleteParams::default()).await;
            });
        }

        // Missing or exited pods: (re)start them, as the kubelet restarts a container.
        for o in 0..replicas {
            let exited = match self.running.get_mut(&o) {
                Some(p) => p.child.try_wait().ok().flatten().is_some(),
                None => true,
            };
            if exited {
                if self.running.remove(&o).is_some() {
                    warn!(ordinal = o, "gateway exited; restarting it");
                    self.endpoints.lock().remove(&o);
                }
                match self.start_pod(&sts, o).await {
                    Ok(pod) => {
                        self.endpoints.lock().insert(o, pod.endpoint.clone());
                        self.running.insert(o, pod);
                    }
                    Err(e) => warn!(ordinal = o, %e, "could not start the gateway"),
                }
            }
        }

        // Readiness probes.
        let mut ready_count = 0;
        for (o, pod) in &mut self.running {
            let ready = self
                .http
                .get(format!("http://{}/readyz", pod.endpoint.internal))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
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
        if self.last_sts_status != Some((running, ready_count)) {
            let status = json!({"status": {
                "observedGeneration": sts.metadata.generation,
                "replicas": running, "readyReplicas": ready_count, "availableReplicas": ready_count,
                "currentReplicas": running, "updatedReplicas": running,
            }});
            sets.patch_status(&self.pool, &PatchParams::default(), &Patch::Merge(status))
                .await?;
            self.last_sts_status = Some((running, ready_count));
        }
        Ok(())
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

    /// Starts ordinal `o`: the pod's files (config from the ConfigMap, Secret volumes),
    /// a Pod object, and the gateway process with the pod's environment.
    async fn start_pod(&self, sts: &StatefulSet, o: i32) -> anyhow::Result<RunningPod> {
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
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let labels = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "gateway", "image": container.image}]},
        }))?;
        let _ = pods.delete(&name, &DeleteParams::default()).await;
        let _ = pods.create(&PostParams::default(), &pod).await;

        let log = std::fs::File::create(root.join("gateway.log"))?;
        let mut child = Command::new(&self.gateway)
            .arg("--config")
            .arg(&config)
            .env("POD_NAME", &name)
            .env("POD_NAMESPACE", NS)
            .env("KUBECONFIG", &self.kubeconfig)
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
        };
        info!(pod = %name, public = %endpoint.public, "kubelet: pod started");
        Ok(RunningPod { child, endpoint })
    }
}

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

// === Agents ===

/// Counters over all agents, read from the SDK's connection state.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Sessions opened (first connects included).
    pub sessions: AtomicU64,
    /// Sessions that ended and were followed by a reconnect (drains, sheds, a pod's
    /// exit): the reconnect storm.
    pub reconnects: AtomicU64,
    /// Connection attempts that failed (refused upgrade, no Ready pod, reset).
    pub refused: AtomicU64,
}

/// One agent's shared state.
#[derive(Debug, Default)]
pub struct AgentState {
    /// Currently connected (welcome received, socket open).
    pub connected: AtomicBool,
    /// Push ids received.
    pub received: Mutex<HashSet<String>>,
}

struct RunningAgent {
    id: String,
    state: Arc<AgentState>,
    agent: Agent,
    watcher: tokio::task::JoinHandle<()>,
}

/// A fleet of SDK agents (`tether-agent`) that can grow and shrink. They all connect to
/// one URL — the pool's client Service — and the Service picks their pods, so the SDK's
/// own reconnect rules (hints, back-off, overload floor) are what the loop exercises.
pub struct Agents {
    url: String,
    service: Option<Arc<Mutex<Conntrack>>>,
    options: Options,
    agents: Vec<RunningAgent>,
    /// Counters.
    pub stats: Arc<AgentStats>,
    next_id: u64,
}

impl Agents {
    /// No agents yet; they will connect through the kubelet's Service.
    pub fn through(service: &ServiceProxy) -> Self {
        let mut agents = Self::with_url(service.ws_url());
        agents.service = Some(service.conntrack());
        agents
    }

    /// No agents yet; they will connect to `url` (per-pod counts are then unknown).
    pub fn with_url(url: String) -> Self {
        Self {
            url,
            service: None,
            options: test_agent_options(),
            agents: Vec::new(),
            stats: Arc::default(),
            next_id: 0,
        }
    }

    /// Number of running agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Grows or shrinks to `n` agents (the newest leave first, closing with 1000).
    pub async fn scale_to(&mut self, n: usize) {
        while self.agents.len() < n {
            let id = format!("agent-{}", self.next_id);
            self.next_id += 1;
            let state = Arc::new(AgentState::default());
            let mut minter = Hs256Minter::new(JWT_SECRET.as_bytes(), id.clone());
            minter.tenant = Some("acme".into());
            let received = state.clone();
            let agent = Agent::builder(self.url.clone(), minter)
                .options(self.options.clone())
                .on_push(move |push| {
                    if let Some(id) = push.id {
                        received.received.lock().insert(id);
                    }
                    async {}
                })
                .start()
                .expect("a valid Service URL");
            let watcher = tokio::spawn(watch_agent(
                agent.state(),
                state.clone(),
                self.stats.clone(),
            ));
            self.agents.push(RunningAgent {
                id,
                state,
                agent,
                watcher,
            });
            if self.agents.len().is_multiple_of(50) {
                // Arrive in waves rather than one burst of SYNs.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let leaving: Vec<_> = self.agents.drain(n..).collect();
        let closes = leaving.iter().map(|a| async {
            let _ = tokio::time::timeout(Duration::from_secs(5), a.agent.close()).await;
        });
        futures_util::future::join_all(closes).await;
        for a in leaving {
            a.state.connected.store(false, Ordering::SeqCst);
            a.watcher.abort();
        }
    }

    /// How many agents are connected now.
    pub fn connected(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.state.connected.load(Ordering::SeqCst))
            .count()
    }

    /// Open connections per pod, from the Service's conntrack table (empty when the
    /// agents do not go through a [`ServiceProxy`]).
    pub fn per_pod(&self) -> BTreeMap<String, usize> {
        self.service
            .as_ref()
            .map(|t| t.lock().per_pod())
            .unwrap_or_default()
    }

    /// A random connected agent's id and state.
    pub fn random_connected(&self) -> Option<(String, Arc<AgentState>)> {
        let connected: Vec<_> = self
            .agents
            .iter()
            .filter(|a| a.state.connected.load(Ordering::SeqCst))
            .collect();
        connected
            .choose(&mut rand::rng())
            .map(|a| (a.id.clone(), a.state.clone()))
    }

    /// The state of agent `id`, if it still runs.
    pub fn state_of(&self, id: &str) -> Option<Arc<AgentState>> {
        self.agents
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.state.clone())
    }
}

/// The SDK's options with a shorter back-off: the production cap (30 s) would let one
/// unlucky agent sit out a whole test phase after a few refused attempts during a
/// rebalance, while the behaviour under test (hints, the overload floor) is the same.
pub fn test_agent_options() -> Options {
    Options {
        reconnect: ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(2),
            },
            overload_floor: Duration::from_millis(500),
        },
        ..Options::default()
    }
}

/// Follows one agent's SDK state into its flag and the fleet's counters.
async fn watch_agent(
    mut rx: tokio::sync::watch::Receiver<State>,
    state: Arc<AgentState>,
    stats: Arc<AgentStats>,
) {
    let mut previous = rx.borrow_and_update().clone();
    while rx.changed().await.is_ok() {
        let now = rx.borrow_and_update().clone();
        match (&previous, &now) {
            (_, State::Connected(_)) => {
                stats.sessions.fetch_add(1, Ordering::Relaxed);
                state.connected.store(true, Ordering::SeqCst);
            }
            (State::Connected(_), State::Waiting { .. }) => {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                state.connected.store(false, Ordering::SeqCst);
            }
            (_, State::Waiting { .. }) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            _ => state.connected.store(false, Ordering::SeqCst),
        }
        previous = now;
    }
    state.connected.store(false, Ordering::SeqCst);
}

/// An HS256 token for `agent`, valid for an hour.
pub fn token(agent: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": agent, "exp": exp, "tenant": "acme"}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("token")
}

fn pick_ready(endpoints: &Mutex<BTreeMap<i32, Endpoint>>) -> Option<Endpoint> {
    let ready: Vec<Endpoint> = endpoints
        .lock()
        .values()
        .filter(|e| e.ready)
        .cloned()
        .collect();
    ready.choose(&mut rand::rng()).cloned()
}

// === Pushes ===

/// Pushes sent to random connected agents through random ready pods; remembers each one
/// the push API accepted (202) so a test can check every one arrived.
pub struct Pusher {
    accepted: Arc<Mutex<Vec<(String, String)>>>,
    stop: Stop,
    task: tokio::task::JoinHandle<()>,
}

impl Pusher {
    /// Starts pushing every `every` to agents of `agents` (a snapshot of ids and
    /// states is taken on each push through `pick`).
    pub fn start(
        endpoints: Arc<Mutex<BTreeMap<i32, Endpoint>>>,
        pick: impl Fn() -> Option<String> + Send + 'static,
        every: Duration,
    ) -> Self {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Stop::default();
        let task = tokio::spawn({
            let accepted = accepted.clone();
            let stop = stop.clone();
            async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                let mut n = 0u64;
                while !stop.is_stopped() {
                    tokio::time::sleep(every).await;
                    let (Some(agent), Some(endpoint)) = (pick(), pick_ready(&endpoints)) else {
                        continue;
                    };
                    n += 1;
                    let key = format!("push-{n}");
                    let response = http
                        .post(format!(
                            "http://{}/v1/agents/{agent}/messages",
                            endpoint.internal
                        ))
                        .bearer_auth(API_KEY)
                        .header("Idempotency-Key", &key)
                        .json(&json!({"n": n}))
                        .send()
                        .await;
                    if let Ok(r) = response
                        && r.status().as_u16() == 202
                    {
                        let id = r
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_string))
                            .unwrap_or(key);
                        accepted.lock().push((agent, id));
                    }
                }
            }
        });
        Self {
            accepted,
            stop,
            task,
        }
    }

    /// Stops pushing; returns the accepted (agent, message id) pairs.
    pub async fn finish(self) -> Vec<(String, String)> {
        self.stop.stop();
        let _ = self.task.await;
        self.accepted.lock().clone()
    }
}

//! The kubelet: runs the pool's StatefulSet as real `tether-gateway` processes, keeps
//! their Pods' readiness and the StatefulSet's status, and serves the pool's client
//! Service through a [`ServiceProxy`].

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
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tether_crds::ConnectionPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use crate::cluster::Cluster;
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
            api_url: cluster.sim.url(),
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
    /// The API server's address, for the pods' kubeconfigs.
    api_url: String,
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
        let mut child = Command::new(&self.gateway)
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

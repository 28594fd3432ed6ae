//! The cluster: the API stand-in with the CRD, the namespace and the pools' Secrets,
//! a NATS server, and the real operator process.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tether_crds::ConnectionPool;
use tether_test_support::json::merge;
use tokio::process::{Child, Command};

use crate::container::{self, HttpProbe, RunningContainer};
use crate::runtime::{ContainerEnv, Runtime, operator_deployment, render_chart};
use crate::{API_KEY, JWT_SECRET, NS, binary, free_port};

/// The operator's service account as the chart installs it (release `tether` in
/// namespace `tether-system`).
pub const OPERATOR_SA: (&str, &str) = ("tether-system", "tether-operator");

/// The kinds of the chart's RBAC (and the account it binds) that the harness installs.
const CHART_RBAC_KINDS: [&str; 5] = [
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// The operator's RBAC in `chart` (the chart as [`render_chart`] renders it with
/// `watchNamespace` = the harness's `--namespace`, through the real Helm engine): so that
/// the e2e proves the chart's grant sufficient, and least.
pub fn chart_rbac(chart: &[Value]) -> anyhow::Result<Vec<&Value>> {
    let objects: Vec<&Value> = chart
        .iter()
        .filter(|o| {
            o["kind"]
                .as_str()
                .is_some_and(|k| CHART_RBAC_KINDS.contains(&k))
        })
        .collect();
    if !objects.iter().any(|o| o["kind"] == "ServiceAccount") {
        bail!("the chart renders no ServiceAccount for the operator");
    }
    Ok(objects)
}

/// Installs the operator's RBAC of `chart` (see [`chart_rbac`]): the release namespace,
/// the ServiceAccount, Roles and bindings, applied unchanged.
pub async fn install_operator_rbac(client: &Client, chart: &[Value]) -> anyhow::Result<()> {
    let ssa = PatchParams::apply("tether-e2e-chart");
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_SA.0}});
    Api::<Namespace>::all(client.clone())
        .patch(OPERATOR_SA.0, &ssa, &Patch::Apply(namespace))
        .await?;
    for object in chart_rbac(chart)? {
        let name = object["metadata"]["name"]
            .as_str()
            .context("metadata.name")?;
        let namespace = object["metadata"]["namespace"].as_str();
        let kind = object["kind"].as_str().unwrap_or_default();
        let patch = Patch::Apply(object);
        match (kind, namespace) {
            ("ServiceAccount", Some(n)) => {
                Api::<ServiceAccount>::namespaced(client.clone(), n)
                    .patch(name, &ssa, &patch)
                    .await?;
            }
            ("Role", Some(n)) => {
                Api::<Role>::namespaced(client.clone(), n)
                    .patch(name, &ssa, &patch)
                    .await?;
            }
            ("RoleBinding", Some(n)) => {
                Api::<RoleBinding>::namespaced(client.clone(), n)
                    .patch(name, &ssa, &patch)
                    .await?;
            }
            ("ClusterRole", None) => {
                Api::<ClusterRole>::all(client.clone())
                    .patch(name, &ssa, &patch)
                    .await?;
            }
            ("ClusterRoleBinding", None) => {
                Api::<ClusterRoleBinding>::all(client.clone())
                    .patch(name, &ssa, &patch)
                    .await?;
            }
            _ => bail!("unexpected {kind} {name} (namespace {namespace:?}) in the chart's RBAC"),
        }
    }
    Ok(())
}

/// A bound token of service account `sa` in `ns`, from the TokenRequest API (what a
/// kubelet mounts into a pod, and `kubectl create token` prints).
pub async fn request_token(client: &Client, ns: &str, sa: &str) -> anyhow::Result<String> {
    let req = http::Request::post(format!(
        "/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        // A year, as a real apiserver extends the tokens a kubelet requests
        // (--service-account-extend-token-expiration): the harness, unlike a kubelet,
        // never refreshes them, and the local platform may run for hours.
        "spec": {"expirationSeconds": 365 * 24 * 3600},
    }))?)?;
    let answer: Value = client
        .request(req)
        .await
        .with_context(|| format!("TokenRequest for {ns}/{sa}"))?;
    answer
        .pointer("/status/token")
        .and_then(Value::as_str)
        .map(str::to_string)
        .context("TokenRequest answered without a token")
}

/// Writes a kubeconfig for the API at `url` whose user is `token`'s.
pub fn write_token_kubeconfig(path: &Path, url: &str, token: &str) -> anyhow::Result<()> {
    std::fs::write(path, tether_kube_sim::kubeconfig_for(url, token))
        .with_context(|| format!("writing {}", path.display()))
}

/// Starts the real `tether-operator` binary against `kubeconfig` without leader
/// election, its admin server on a free port, `args` added, its output in `log`, and
/// killed when the handle is dropped.
pub fn spawn_operator(
    kubeconfig: &Path,
    log: &Path,
    args: &[&str],
    rust_log: &str,
) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    Command::new(binary("tether-operator")?)
        .args(["--no-leader-election", "--admin-addr", "127.0.0.1:0"])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", rust_log)
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .context("starting tether-operator")
}

/// Installs the ConnectionPool CRD (unless present) and creates namespace `ns` with the Secrets every
/// pool of the harness references (`jwt`/`hs256`, `api-keys`/`keys`).
pub async fn install(client: &Client, ns: &str) -> anyhow::Result<()> {
    // Installed once for every namespace a harness uses; the CRD as the chart ships it
    // (plain-text descriptions), so `kubectl explain` on the local platform shows it.
    match Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &tether_crds::crd())
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

/// The API stand-in with the CRD, the namespace and the pool's Secrets, a NATS server,
/// and a temp dir for kubeconfig, pod files and logs.
pub struct Cluster {
    /// The stand-in (dropped last).
    pub sim: tether_kube_sim::Server,
    /// Client of the stand-in.
    pub client: Client,
    /// The administrator's kubeconfig (the harness, tests, users of `tether-local`).
    pub kubeconfig: PathBuf,
    /// The operator's kubeconfig: a token of the chart's service account, so the
    /// operator has exactly what the chart grants it.
    pub operator_kubeconfig: PathBuf,
    /// NATS URL for the pool's routing.
    pub nats_url: String,
    nats: Child,
    /// How the kubelet runs pods (and how the operator runs).
    pub runtime: Runtime,
    /// Container mode's pod network, API address for pods and images.
    pub containers: Option<Arc<ContainerEnv>>,
    /// The chart as rendered for this cluster (see [`render_chart`]).
    pub chart: Vec<Value>,
    /// Scratch space (pod roots, logs).
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts everything, pods run as `E2E_RUNTIME` says (processes by default).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Runtime::from_env()?).await
    }

    /// Starts everything, pods run by `runtime`; prints which (every test's output
    /// says how its pods ran).
    pub async fn start_with(runtime: Runtime) -> anyhow::Result<Self> {
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
        // Rendered once: its RBAC is installed now, its Deployment runs the operator in
        // container mode.
        let chart = render_chart(NS, &operator_log_level()).await?;
        install_operator_rbac(&client, &chart).await?;
        let operator_kubeconfig = dir.path().join("operator-kubeconfig");
        let token = request_token(&client, OPERATOR_SA.0, OPERATOR_SA.1).await?;
        write_token_kubeconfig(&operator_kubeconfig, &sim.url(), &token)?;
        let containers = match runtime {
            Runtime::Processes => None,
            Runtime::Containers => Some(Arc::new(ContainerEnv::start(sim.addr()).await?)),
        };
        // Pods reach NATS where they are: loopback for processes, the bridge's host
        // address for containers.
        let nats_host = match &containers {
            Some(c) => c.network.host_ip().to_string(),
            None => "127.0.0.1".to_string(),
        };
        match &containers {
            Some(c) => println!(
                "e2e runtime: containers (podman + runc; images {} and {}; pod network {}/24)",
                c.images.operator,
                c.images.gateway,
                c.network.host_ip()
            ),
            None => println!("e2e runtime: processes (gateways and operator as host processes)"),
        }
        let port = free_port();
        let store = dir.path().join("nats");
        std::fs::create_dir_all(&store)?;
        let nats = Command::new(tether_test_support::nats_server_binary()?)
            .args(["-a", &nats_host, "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nats-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect((nats_host.as_str(), port))
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
            operator_kubeconfig,
            nats_url: format!("nats://{nats_host}:{port}"),
            nats,
            runtime,
            containers,
            chart,
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

    /// Starts the real operator against the stand-in: a process, or in container mode
    /// a container from its image running the chart's Deployment as rendered.
    pub async fn start_operator(&self) -> anyhow::Result<Operator> {
        match &self.containers {
            None => Ok(Operator::Process(spawn_operator(
                &self.operator_kubeconfig,
                &self.dir.path().join("operator.log"),
                &["--namespace", NS, "--gateway-image", "tether-gateway:e2e"],
                &operator_log_level(),
            )?)),
            Some(env) => {
                let container = start_operator_container(self, env).await?;
                Ok(Operator::Container(container))
            }
        }
    }

    /// Path of the operator's log (kept in the temp dir; printed on failure).
    pub fn operator_log(&self) -> PathBuf {
        self.dir.path().join("operator.log")
    }

    /// Prints the last lines of the operator's log and `error`: what a failed e2e test
    /// leaves for whoever reads its output.
    pub fn print_failure(&self, error: &anyhow::Error) {
        let log = std::fs::read_to_string(self.operator_log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        eprintln!(
            "operator log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        eprintln!("failed: {error:#}");
    }
}

/// The operator's RUST_LOG: `E2E_OPERATOR_LOG`, else info.
fn operator_log_level() -> String {
    std::env::var("E2E_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into())
}

/// The running operator.
#[derive(Debug)]
pub enum Operator {
    /// A host process.
    Process(Child),
    /// A container (removed by id when dropped).
    Container(RunningContainer),
}

// === impl Operator ===

impl Operator {
    /// Stops it at once.
    pub async fn kill(&mut self) -> std::io::Result<()> {
        match self {
            Self::Process(child) => child.kill().await,
            Self::Container(c) => {
                c.kill().await;
                Ok(())
            }
        }
    }

    /// Waits until it exits.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Self::Process(child) => child.wait().await,
            Self::Container(c) => c.wait().await,
        }
    }
}

/// The operator as a pod of the chart's Deployment: the pod template as rendered (image,
/// args, env with `valueFrom`, security context), run in its own network namespace, and
/// ready once the template's readiness probe passes.
async fn start_operator_container(
    cluster: &Cluster,
    env: &ContainerEnv,
) -> anyhow::Result<RunningContainer> {
    let deployment = operator_deployment(&cluster.chart)?;
    let release_ns = deployment["metadata"]["namespace"]
        .as_str()
        .unwrap_or("tether-system")
        .to_string();
    let template = &deployment["spec"]["template"];
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "tether-operator-0",
            "namespace": release_ns,
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
        },
        "spec": template["spec"],
    }))
    .context("the chart's pod template")?;
    let c = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .context("operator container")?
        .clone();
    let root = cluster.dir.path().join("pods").join("tether-operator-0");
    std::fs::create_dir_all(&root)?;
    let netns = env.network.attach("operator")?;
    let pod_ip = netns.ip.to_string();
    let (spec, _volumes) =
        container::prepare(&cluster.client, &env.api, &pod, &c, &pod_ip, &root).await?;
    let mut running = RunningContainer::start(&spec, netns, &cluster.operator_log()).await?;
    if let Some(probe) = &c.readiness_probe {
        let probe = HttpProbe::from_spec(probe, &c)?;
        let url = format!("http://{pod_ip}:{}{}", probe.port, probe.path);
        let http = reqwest::Client::builder()
            .timeout(probe.timeout.max(Duration::from_secs(1)))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if running.exited().is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(cluster.operator_log()).unwrap_or_default();
                bail!("the operator container never passed its readiness probe {url}; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "e2e operator: container {} from {} (chart-rendered args {:?})",
        &running.id[..12.min(running.id.len())],
        spec.image,
        spec.args
    );
    Ok(running)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.nats.start_kill();
    }
}

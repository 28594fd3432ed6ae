//! The cluster: the API stand-in with the CRD, the namespace and the pools' Secrets,
//! a NATS server, and the real operator process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tether_crds::ConnectionPool;
use tether_test_support::json::merge;
use tokio::process::{Child, Command};

use crate::{API_KEY, JWT_SECRET, NS, binary, free_port};

/// The operator's service account as the chart installs it (release `tether` in
/// namespace `tether-system`).
pub const OPERATOR_SA: (&str, &str) = ("tether-system", "tether-operator");

/// The rules the chart grants the operator on pools and their children: the
/// `tether.poolRules` block of `charts/tether/templates/_helpers.tpl`, which the chart
/// renders into its ClusterRole (or, with `watchNamespace`, a Role there) unchanged —
/// read from the chart itself, so that the e2e proves the chart's grant sufficient.
pub fn chart_operator_rules() -> anyhow::Result<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tether/templates/_helpers.tpl"
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let start = text
        .find(r#"{{- define "tether.poolRules" -}}"#)
        .context("tether.poolRules in the chart's helpers")?;
    let body = &text[start..];
    let body = &body[body.find('\n').context("define line")? + 1..];
    let body = &body[..body
        .find("{{- end -}}")
        .context("end of tether.poolRules")?];
    if body.contains("{{") {
        bail!("tether.poolRules is templated now: render it with Helm instead");
    }
    let rules: Value = serde_yaml::from_str(body).context("tether.poolRules as YAML")?;
    if rules.as_array().is_none_or(|r| r.is_empty()) {
        bail!("tether.poolRules is not a list of rules: {rules}");
    }
    Ok(rules)
}

/// Installs the operator's RBAC as the chart does with `watchNamespace: ns` (what the
/// harness's `--namespace ns` corresponds to): its ServiceAccount in the release
/// namespace, a Role in `ns` with the chart's rules, and the RoleBinding.
pub async fn install_operator_rbac(client: &Client, ns: &str) -> anyhow::Result<()> {
    let (sa_ns, sa) = OPERATOR_SA;
    let ssa = PatchParams::apply("tether-e2e-chart");
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": sa_ns}});
    Api::<Namespace>::all(client.clone())
        .patch(sa_ns, &ssa, &Patch::Apply(namespace))
        .await?;
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": sa_ns}});
    Api::<ServiceAccount>::namespaced(client.clone(), sa_ns)
        .patch(sa, &ssa, &Patch::Apply(account))
        .await?;
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": sa, "namespace": ns},
        "rules": chart_operator_rules()?,
    });
    Api::<Role>::namespaced(client.clone(), ns)
        .patch(sa, &ssa, &Patch::Apply(role))
        .await?;
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": sa, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_ns}],
    });
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .patch(sa, &ssa, &Patch::Apply(binding))
        .await?;
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
        "spec": {"expirationSeconds": 3600},
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
        install_operator_rbac(&client, NS).await?;
        let operator_kubeconfig = dir.path().join("operator-kubeconfig");
        let token = request_token(&client, OPERATOR_SA.0, OPERATOR_SA.1).await?;
        write_token_kubeconfig(&operator_kubeconfig, &sim.url(), &token)?;
        let port = free_port();
        let store = dir.path().join("nats");
        std::fs::create_dir_all(&store)?;
        let nats = Command::new(tether_test_support::nats_server_binary()?)
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
            operator_kubeconfig,
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

    /// Starts the real operator process against the stand-in, as the chart's service
    /// account.
    pub fn start_operator(&self) -> anyhow::Result<Child> {
        spawn_operator(
            &self.operator_kubeconfig,
            &self.dir.path().join("operator.log"),
            &["--namespace", NS, "--gateway-image", "tether-gateway:e2e"],
            &std::env::var("E2E_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
        )
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

//! The cluster: the API stand-in with the CRD, the namespace and the pools' Secrets,
//! a NATS server, and the real operator process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tether_crds::ConnectionPool;
use tether_test_support::json::merge;
use tokio::process::{Child, Command};

use crate::{API_KEY, JWT_SECRET, NS, binary, free_port};

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
        spawn_operator(
            &self.kubeconfig,
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

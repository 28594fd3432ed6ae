//! Which runtime the local kubelet uses, and what container mode needs on the host.
//!
//! - [`Runtime::Processes`] (the default; fast): each pod is a `tether-gateway` process
//!   on loopback, its files under a temp dir and its config's paths and listeners
//!   rewritten to fit (see [`crate::rewrite_config`]).
//! - [`Runtime::Containers`] (`E2E_RUNTIME=containers`, `tether-local --containers`):
//!   each pod is a container from the built image, run with the pod spec as rendered
//!   ([`crate::container`]), in its own network namespace on a bridge
//!   ([`crate::podnet`]); the operator runs from its image too, with the args and env
//!   the Helm chart renders.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::process::Command;
use tracing::info;

use crate::container::ApiAccess;
use crate::podnet::PodNetwork;

/// How pods run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Host processes with rewritten paths and ports.
    Processes,
    /// Real containers (podman + runc) from the images, pod specs as rendered.
    Containers,
}

impl Runtime {
    /// `E2E_RUNTIME`: `processes` (default) or `containers`.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("E2E_RUNTIME").as_deref() {
            Err(_) | Ok("") | Ok("processes") => Ok(Self::Processes),
            Ok("containers") => Ok(Self::Containers),
            Ok(other) => bail!("E2E_RUNTIME must be `processes` or `containers`, not {other:?}"),
        }
    }

    /// `processes` or `containers`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Processes => "processes",
            Self::Containers => "containers",
        }
    }
}

/// The names the images are loaded under: the chart's defaults (repository and the
/// chart's appVersion as the tag).
pub const OPERATOR_REPOSITORY: &str = "ghcr.io/tether-dev/tether-operator";
/// See [`OPERATOR_REPOSITORY`].
pub const GATEWAY_REPOSITORY: &str = "ghcr.io/tether-dev/tether-gateway";

/// The workspace root (charts/, scripts/).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where `scripts/images` writes the archives: `E2E_IMAGES`, else `target/images`.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("E2E_IMAGES") {
        Some(d) => PathBuf::from(d),
        None => crate::bin_dir()
            .parent()
            .expect("target dir")
            .join("images"),
    }
}

/// What container mode holds for one cluster: the pod network, and the stand-in's
/// address as the pods see it (a forwarder on the bridge's host address).
pub struct ContainerEnv {
    /// The bridge pods attach to.
    pub network: Arc<PodNetwork>,
    /// How pods reach the API.
    pub api: ApiAccess,
    /// Image references loaded (operator, gateway).
    pub images: Images,
    forwarder: tokio::task::JoinHandle<()>,
}

/// Loaded image references.
#[derive(Debug, Clone)]
pub struct Images {
    /// `ghcr.io/tether-dev/tether-operator:<tag>`.
    pub operator: String,
    /// `ghcr.io/tether-dev/tether-gateway:<tag>`.
    pub gateway: String,
}

impl ContainerEnv {
    /// Loads the images, creates the pod network and exposes the stand-in (at `api`,
    /// on loopback) on the bridge's host address.
    pub async fn start(api: SocketAddr) -> anyhow::Result<Self> {
        let images = load_images().await?;
        let network = PodNetwork::create()?;
        let listener = tokio::net::TcpListener::bind((network.host_ip(), 0))
            .await
            .context("binding the API forwarder on the pod bridge")?;
        let local = listener.local_addr()?;
        let forwarder = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(api).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self {
            network,
            api: ApiAccess {
                server: format!("http://{local}"),
            },
            images,
            forwarder,
        })
    }
}

impl Drop for ContainerEnv {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

/// `podman load`s the operator and gateway archives unless the same manifests are
/// loaded already; returns their references.
pub async fn load_images() -> anyhow::Result<Images> {
    let dir = images_dir();
    let mut refs = Vec::new();
    for name in ["tether-operator", "tether-gateway"] {
        let archive = dir.join(format!("{name}.tar"));
        let summary = dir.join(format!("{name}.json"));
        if !archive.exists() || !summary.exists() {
            bail!(
                "{} is missing: container mode runs the built images; build them with \
                 `scripts/images --profile debug` (or `scripts/images` for release binaries)",
                archive.display()
            );
        }
        let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
        let reference = summary["reference"]
            .as_str()
            .context("reference in the image summary")?
            .to_string();
        let digest = summary["manifest"].as_str().unwrap_or_default().to_string();
        let loaded = Command::new("podman")
            .args([
                "image",
                "inspect",
                "--format",
                "{{.Digest}} {{.Id}}",
                &reference,
            ])
            .output()
            .await
            .context("running podman (container mode needs podman and runc)")?;
        let loaded_text = String::from_utf8_lossy(&loaded.stdout).into_owned();
        let mut fields = loaded_text.split_whitespace();
        let (current, previous_id) = (fields.next().unwrap_or(""), fields.next());
        if !loaded.status.success() || current != digest {
            let out = Command::new("podman")
                .arg("load")
                .arg("--quiet")
                .arg("--input")
                .arg(&archive)
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "podman load -i {}: {}",
                    archive.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            info!(%reference, %digest, "image loaded");
            // The image this one replaced under the same name is left untagged: remove
            // it (podman refuses while a container still uses it, which is fine).
            if let Some(id) = previous_id.filter(|_| loaded.status.success()) {
                let _ = Command::new("podman")
                    .args(["rmi", id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
            }
        }
        refs.push(reference);
    }
    Ok(Images {
        operator: refs[0].clone(),
        gateway: refs[1].clone(),
    })
}

/// The chart's values for the e2e install: namespaced, watching `watch_namespace` (the
/// harness's `--namespace`), one replica without leader election (as process mode runs
/// it), `log_level` as RUST_LOG.
fn e2e_chart_values(watch_namespace: &str, log_level: &str) -> Value {
    serde_json::json!({
        "watchNamespace": watch_namespace,
        "replicaCount": 1,
        "leaderElection": {"enabled": false},
        "logLevel": log_level,
        "logFormat": "text",
    })
}

/// Every object the chart renders for the e2e install (the real Helm engine, through
/// `charts/render.py`), in the order Helm prints them.
pub async fn render_chart(watch_namespace: &str, log_level: &str) -> anyhow::Result<Vec<Value>> {
    let out = Command::new("python3")
        .arg(workspace_root().join("charts/render.py"))
        .arg("--values")
        .arg(e2e_chart_values(watch_namespace, log_level).to_string())
        .output()
        .await
        .context("running python3 charts/render.py")?;
    if !out.status.success() {
        bail!(
            "rendering the chart (pip install helm-python-sdk pyyaml, or scripts/install-deps): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The operator's Deployment in `chart` (as [`render_chart`] renders it).
pub fn operator_deployment(chart: &[Value]) -> anyhow::Result<&Value> {
    chart
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "tether-operator")
        .context("the chart renders no tether-operator Deployment")
}

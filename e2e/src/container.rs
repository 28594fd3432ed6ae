//! Container mode: a pod spec run as a real container under podman + runc, the way a
//! kubelet runs it — nothing in the spec rewritten, so a wrong spec fails here as it
//! would on a cluster.
//!
//! ```text
//!   Pod (name, namespace, labels, serviceAccountName) + PodSpec (rendered by the operator
//!   or the chart)
//!     │ pod_env()        env: value, $(VAR) expansion, valueFrom fieldRef / secretKeyRef /
//!     │                  configMapKeyRef, envFrom
//!     │ PodVolumes       ConfigMap / Secret / emptyDir volumes written as the kubelet's
//!     │                  atomic writer does (..data symlink swap, defaultMode, fsGroup),
//!     │                  refreshed while the pod runs; subPath mounts stay as started
//!     │ service_account_volume()   the API credentials (see its doc)
//!     ▼
//!   podman run --network ns:<pod netns> --user U:G --read-only --cap-drop all
//!     --security-opt no-new-privileges -v <volume>:<mountPath>:ro ... <image> <args>
//!     probes (httpGet) against <pod IP>:<containerPort>
//! ```
//!
//! Containers are removed by id when their handle drops (a test that fails or panics
//! leaves none behind).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, HTTPGetAction, Pod, PodSpec, Probe, Secret,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::Client;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::podnet::PodNetns;

/// Where a kubelet mounts a pod's service-account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Open files and processes a container may hold: at or below this process's hard
/// limits (a container cannot raise them; this machine allows 20,000 open files).
const NOFILE: u32 = 20_000;
const NPROC: u32 = 4_096;

/// How a pod reaches the API server from its network namespace.
#[derive(Debug, Clone)]
pub struct ApiAccess {
    /// `http://<host side of the pod bridge>:<port>`.
    pub server: String,
}

/// A pod's API credentials: the files of its service-account volume and the env.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceAccountMount {
    /// Files of the volume at [`SERVICE_ACCOUNT_DIR`].
    pub files: BTreeMap<String, Vec<u8>>,
    /// Variables added to the container's environment.
    pub env: Vec<(String, String)>,
}

/// What the kubelet gives a pod to reach the API server: the files of the service-account
/// volume (mounted at [`SERVICE_ACCOUNT_DIR`]) and the environment, or `None` when the
/// pod opts out (`automountServiceAccountToken: false`).
///
/// A kubelet mounts `token`, `ca.crt` and `namespace` and sets `KUBERNETES_SERVICE_HOST`
/// and `_PORT`; clients then use their in-cluster config, which in kube-rs (as in
/// client-go) always speaks HTTPS. The stand-in serves plain HTTP, so this volume also
/// carries a `kubeconfig` for the same server, and `KUBECONFIG` names it: the one
/// difference from a cluster in how a pod reaches the API (docs/testing.md); its user
/// reads the mounted `token` file (`tokenFile`), as the in-cluster config would. This is
/// the one place that decides a pod's API identity; `token` is a bound token of the
/// pod's service account ([`pod_token`]).
pub fn service_account_volume(
    api: &ApiAccess,
    pod: &Pod,
    token: &str,
) -> Option<ServiceAccountMount> {
    let spec = pod.spec.as_ref()?;
    if spec.automount_service_account_token == Some(false) {
        return None;
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: in-cluster\n  cluster:\n    server: {server}\n\
         contexts:\n- name: in-cluster\n  context:\n    cluster: in-cluster\n    user: pod\n    namespace: {namespace}\n\
         current-context: in-cluster\nusers:\n- name: pod\n  user:\n    tokenFile: {SERVICE_ACCOUNT_DIR}/token\n",
        server = api.server,
    );
    let files = BTreeMap::from([
        ("token".to_string(), token.as_bytes().to_vec()),
        ("namespace".to_string(), namespace.into_bytes()),
        ("kubeconfig".to_string(), kubeconfig.into_bytes()),
    ]);
    let (host, port) = api
        .server
        .trim_start_matches("http://")
        .rsplit_once(':')
        .unwrap_or(("", ""));
    let env = vec![
        ("KUBERNETES_SERVICE_HOST".to_string(), host.to_string()),
        ("KUBERNETES_SERVICE_PORT".to_string(), port.to_string()),
        (
            "KUBECONFIG".to_string(),
            format!("{SERVICE_ACCOUNT_DIR}/kubeconfig"),
        ),
    ];
    Some(ServiceAccountMount { files, env })
}

/// A bound token of the pod's service account (`default` when it names none), from the
/// TokenRequest API as a kubelet gets it; `None` when the pod opts out of the mount.
pub async fn pod_token(client: &Client, pod: &Pod) -> anyhow::Result<Option<String>> {
    let spec = pod.spec.as_ref().context("pod without a spec")?;
    if spec.automount_service_account_token == Some(false) {
        return Ok(None);
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    crate::cluster::request_token(client, namespace, account)
        .await
        .map(Some)
}

/// Everything the kubelet builds for a pod's container before it runs it — the one
/// function that decides a pod's mounts and environment: its volumes written under
/// `root` (kept for [`PodVolumes::refresh`]), the service-account volume and env of
/// [`service_account_volume`], the env of [`pod_env`], and the security settings of
/// [`RunSpec::from_pod`].
pub async fn prepare(
    client: &Client,
    api: &ApiAccess,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
    root: &Path,
) -> anyhow::Result<(RunSpec, PodVolumes)> {
    let token = pod_token(client, pod).await?;
    let (sa_files, sa_env) = token
        .and_then(|token| service_account_volume(api, pod, &token))
        .map(|sa| (sa.files, sa.env))
        .unzip();
    let (volumes, mounts) = PodVolumes::create(client, root, pod, container, sa_files).await?;
    let mut run = RunSpec::from_pod(pod, container)?;
    run.env = pod_env(client, pod, container, pod_ip).await?;
    run.env.extend(sa_env.into_iter().flatten());
    run.mounts = mounts;
    // `$(VAR)` in command and args reads the container's env (the kubelet's rule).
    let env = run.env.clone();
    run.args = run.args.iter().map(|a| expand(a, &env)).collect();
    if let Some(command) = &mut run.command {
        *command = command.iter().map(|a| expand(a, &env)).collect();
    }
    Ok((run, volumes))
}

/// An HTTP probe resolved against the container's ports.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpProbe {
    /// Request path.
    pub path: String,
    /// Container port.
    pub port: u16,
    /// Seconds before the first probe.
    pub initial_delay: Duration,
    /// Seconds between probes.
    pub period: Duration,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// Consecutive failures that flip the result.
    pub failure_threshold: u32,
    /// Consecutive successes that flip it back.
    pub success_threshold: u32,
}

impl HttpProbe {
    /// The probe as the kubelet reads it (defaults: period 10 s, timeout 1 s, failure
    /// threshold 3, success threshold 1); only `httpGet` probes are supported here.
    pub fn from_spec(probe: &Probe, container: &Container) -> anyhow::Result<Self> {
        let HTTPGetAction { path, port, .. } = probe
            .http_get
            .as_ref()
            .context("only httpGet probes run in container mode")?;
        Ok(Self {
            path: path.clone().unwrap_or_else(|| "/".into()),
            port: container_port(container, port)?,
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10),
            timeout: secs(probe.timeout_seconds, 1),
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
            success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
        })
    }
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(0) as u64)
}

/// A port given by number or by the name of one of the container's ports.
pub fn container_port(container: &Container, port: &IntOrString) -> anyhow::Result<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).context("port out of range"),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port as u16)
            .with_context(|| format!("container {} has no port named {name}", container.name)),
    }
}

/// The container's environment as the kubelet builds it: `env` in order (each `value`
/// may use `$(EARLIER)`; `valueFrom` reads the Pod's fields, Secrets and ConfigMaps),
/// after `envFrom`; then what [`service_account_volume`] adds.
pub async fn pod_env(
    client: &Client,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(key, _)| *key != k);
        env.push((k, v));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match maps.get_opt(&r.name).await? {
                Some(m) => {
                    for (k, v) in m.data.unwrap_or_default() {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => bail!("configmap {:?} not found (envFrom)", r.name),
            }
        }
        if let Some(r) = &from.secret_ref {
            match secrets.get_opt(&r.name).await? {
                Some(s) => {
                    for (k, v) in secret_data(&s) {
                        set(&mut env, format!("{prefix}{k}"), lossy(v));
                    }
                }
                None if r.optional == Some(true) => {}
                None => bail!("secret {:?} not found (envFrom)", r.name),
            }
        }
    }
    for EnvVar {
        name,
        value,
        value_from,
    } in container.env.iter().flatten()
    {
        let v = match (value, value_from) {
            (Some(v), _) => expand(v, &env),
            (None, None) => String::new(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    field(pod, &f.field_path, pod_ip)?
                } else if let Some(r) = &from.secret_key_ref {
                    let s = secrets.get_opt(&r.name).await?;
                    match s.as_ref().and_then(|s| secret_data(s).remove(&r.key)) {
                        Some(v) => lossy(v),
                        None if r.optional == Some(true) => continue,
                        None => bail!("secret {:?} key {:?} not found (env {name})", r.name, r.key),
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let m = maps.get_opt(&r.name).await?;
                    match m.and_then(|m| m.data.unwrap_or_default().remove(&r.key)) {
                        Some(v) => v,
                        None if r.optional == Some(true) => continue,
                        None => bail!(
                            "configmap {:?} key {:?} not found (env {name})",
                            r.name,
                            r.key
                        ),
                    }
                } else {
                    bail!("env {name}: this valueFrom is not supported in container mode")
                }
            }
        };
        set(&mut env, name.clone(), v);
    }
    Ok(env)
}

/// `$(VAR)` references to variables defined earlier, `$$` for a literal `$`; unknown
/// references stay as written (the kubelet's rule).
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(end) = tail.strip_prefix("$(").and_then(|t| t.find(')')) {
            let var = &tail[2..2 + end];
            match env.iter().rev().find(|(k, _)| k == var) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..3 + end]),
            }
            rest = &tail[3 + end..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// A downward-API field of the Pod.
pub fn field(pod: &Pod, path: &str, pod_ip: &str) -> anyhow::Result<String> {
    let meta = &pod.metadata;
    let key = |p: &str, prefix: &str| -> Option<String> {
        p.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "spec.nodeName" => "local".into(),
        "status.podIP" => pod_ip.into(),
        p => {
            if let Some(k) = key(p, "metadata.labels['") {
                meta.labels
                    .clone()
                    .unwrap_or_default()
                    .remove(&k)
                    .unwrap_or_default()
            } else if let Some(k) = key(p, "metadata.annotations['") {
                meta.annotations
                    .clone()
                    .unwrap_or_default()
                    .remove(&k)
                    .unwrap_or_default()
            } else {
                bail!("fieldRef {p:?} is not supported in container mode")
            }
        }
    })
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    // The stand-in, like older servers, may keep `stringData` as given.
    for (k, v) in s.string_data.clone().unwrap_or_default() {
        out.entry(k).or_insert_with(|| v.into_bytes());
    }
    out
}

fn lossy(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

// === PodVolumes ===

/// A bind mount of the container.
#[derive(Debug, Clone, PartialEq)]
pub struct BindMount {
    /// Path on the host.
    pub host: PathBuf,
    /// Path in the container.
    pub container: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// The pod's volumes on the host, under `<root>/volumes/<name>`, kept current.
#[derive(Debug)]
pub struct PodVolumes {
    root: PathBuf,
    namespace: String,
    spec: PodSpec,
    service_account: Option<BTreeMap<String, Vec<u8>>>,
    generation: u64,
}

/// One volume's files: path in the volume → (content, mode).
type VolumeFiles = BTreeMap<String, (Vec<u8>, u32)>;

impl PodVolumes {
    /// Writes every volume of the pod spec and returns the volumes and the
    /// container's mounts.
    pub async fn create(
        client: &Client,
        root: &Path,
        pod: &Pod,
        container: &Container,
        service_account: Option<BTreeMap<String, Vec<u8>>>,
    ) -> anyhow::Result<(Self, Vec<BindMount>)> {
        let mut volumes = Self {
            root: root.join("volumes"),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            spec: pod.spec.clone().context("pod spec")?,
            service_account,
            generation: 0,
        };
        std::fs::create_dir_all(&volumes.root)?;
        volumes.refresh(client).await?;
        let mut mounts = Vec::new();
        let declared: HashMap<&str, _> = volumes
            .spec
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.as_str(), v))
            .collect();
        for m in container.volume_mounts.iter().flatten() {
            if !declared.contains_key(m.name.as_str()) {
                bail!(
                    "volumeMount {:?}: no volume of that name in the pod",
                    m.name
                );
            }
            let dir = volumes.root.join(&m.name);
            let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                // A subPath mount binds what the path is when the container starts and
                // never sees updates (as on a cluster).
                Some(sub) => std::fs::canonicalize(dir.join(sub)).with_context(|| {
                    format!("subPath {sub:?} of volume {:?} does not exist", m.name)
                })?,
                None => dir,
            };
            mounts.push(BindMount {
                host,
                container: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        if volumes.service_account.is_some()
            && !mounts.iter().any(|m| m.container == SERVICE_ACCOUNT_DIR)
        {
            mounts.push(BindMount {
                host: volumes.root.join("kube-api-access"),
                container: SERVICE_ACCOUNT_DIR.into(),
                read_only: true,
            });
        }
        Ok((volumes, mounts))
    }

    /// Re-reads the ConfigMaps and Secrets and rewrites the volumes whose content
    /// changed (an atomic swap: running containers see the old or the new set, never
    /// half of one). Returns how many volumes changed.
    pub async fn refresh(&mut self, client: &Client) -> anyhow::Result<usize> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
        let gid = self
            .spec
            .security_context
            .as_ref()
            .and_then(|s| s.fs_group)
            .map(|g| g as u32);
        let mut wanted: Vec<(String, VolumeFiles, bool)> = Vec::new();
        for v in self.spec.volumes.iter().flatten() {
            if let Some(cm) = &v.config_map {
                let mode = cm.default_mode.unwrap_or(0o644) as u32;
                let data: BTreeMap<String, Vec<u8>> = match maps.get_opt(&cm.name).await? {
                    Some(m) => {
                        let mut d: BTreeMap<String, Vec<u8>> = m
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect();
                        for (k, v) in m.binary_data.unwrap_or_default() {
                            d.insert(k, v.0);
                        }
                        d
                    }
                    None if cm.optional == Some(true) => BTreeMap::new(),
                    None => bail!("configmap {:?} not found (volume {})", cm.name, v.name),
                };
                let files = project(&data, cm.items.as_deref(), mode, &v.name)?;
                wanted.push((v.name.clone(), files, false));
            } else if let Some(s) = &v.secret {
                let name = s
                    .secret_name
                    .clone()
                    .context("secret volume without secretName")?;
                let mode = s.default_mode.unwrap_or(0o644) as u32;
                let data = match secrets.get_opt(&name).await? {
                    Some(secret) => secret_data(&secret),
                    None if s.optional == Some(true) => BTreeMap::new(),
                    None => bail!("secret {name:?} not found (volume {})", v.name),
                };
                let files = project(&data, s.items.as_deref(), mode, &v.name)?;
                wanted.push((v.name.clone(), files, false));
            } else if v.empty_dir.is_some() {
                wanted.push((v.name.clone(), BTreeMap::new(), true));
            } else {
                bail!(
                    "volume {:?}: only configMap, secret and emptyDir volumes run in container mode",
                    v.name
                );
            }
        }
        if let Some(files) = &self.service_account {
            let files = files
                .iter()
                .map(|(k, v)| (k.clone(), (v.clone(), 0o644)))
                .collect();
            wanted.push(("kube-api-access".into(), files, false));
        }
        let mut changed = 0;
        for (name, files, empty_dir) in wanted {
            let dir = self.root.join(&name);
            if empty_dir {
                if !dir.exists() {
                    std::fs::create_dir_all(&dir)?;
                    // emptyDir: writable by the pod (fsGroup, or everyone as on a node).
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
                }
                continue;
            }
            self.generation += 1;
            if write_atomic(&dir, &files, gid, self.generation)? {
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// The files of a ConfigMap/Secret volume: every key, or the listed `items` (a listed
/// key that is missing fails the pod, as on a cluster).
fn project(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    mode: u32,
    volume: &str,
) -> anyhow::Result<VolumeFiles> {
    let mut files = VolumeFiles::new();
    match items {
        None => {
            for (k, v) in data {
                files.insert(k.clone(), (v.clone(), mode));
            }
        }
        Some(items) => {
            for item in items {
                let v = data
                    .get(&item.key)
                    .with_context(|| format!("volume {volume}: key {:?} missing", item.key))?;
                let m = item.mode.map(|m| m as u32).unwrap_or(mode);
                files.insert(item.path.clone(), (v.clone(), m));
            }
        }
    }
    Ok(files)
}

/// The kubelet's atomic writer: files in `..<generation>/`, `..data` pointing at it,
/// each top-level name a symlink through `..data`; a new set is a new directory and
/// one rename of `..data`. With `gid` (the pod's fsGroup), files belong to that group
/// and are group-readable. Returns whether anything changed.
pub fn write_atomic(
    dir: &Path,
    files: &VolumeFiles,
    gid: Option<u32>,
    generation: u64,
) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    let current = read_current(&data);
    let same = current.as_ref().is_some_and(|cur| {
        cur.len() == files.len() && files.iter().all(|(k, (v, _))| cur.get(k) == Some(v))
    });
    if same {
        return Ok(false);
    }
    let gen_name = format!("..{generation}_{}", std::process::id());
    let gen_dir = dir.join(&gen_name);
    std::fs::create_dir_all(&gen_dir)?;
    std::fs::set_permissions(&gen_dir, std::fs::Permissions::from_mode(0o755))?;
    for (path, (content, mode)) in files {
        let file = gen_dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
        let mut mode = *mode & 0o777;
        if let Some(g) = gid {
            std::os::unix::fs::chown(&file, Some(0), Some(g))?;
            mode |= 0o040;
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
    }
    let old = std::fs::read_link(&data).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&gen_name, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    let tops: std::collections::BTreeSet<String> = files
        .keys()
        .map(|p| p.split('/').next().unwrap_or(p).to_string())
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{top}"), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(dir.join(&name));
        }
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

fn read_current(data: &Path) -> Option<BTreeMap<String, Vec<u8>>> {
    let root = std::fs::canonicalize(data).ok()?;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()? {
            let p = e.ok()?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(&root).ok()?.to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).ok()?);
            }
        }
    }
    Some(out)
}

// === Podman ===

/// What `podman run` is given for one container.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Pod name (the container's hostname, and its log file's name).
    pub pod: String,
    /// Image reference (must be loaded: no registry is reachable).
    pub image: String,
    /// `command` (replaces the image's entrypoint).
    pub command: Option<Vec<String>>,
    /// `args`.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Bind mounts.
    pub mounts: Vec<BindMount>,
    /// `runAsUser`, `runAsGroup` (container's, else the pod's).
    pub user: Option<i64>,
    /// Group.
    pub group: Option<i64>,
    /// `runAsNonRoot`.
    pub run_as_non_root: bool,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// `capabilities.drop` contains `ALL`.
    pub drop_all_capabilities: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
}

impl RunSpec {
    /// Reads a container of a pod spec (the security settings merged pod over container
    /// as the kubelet does); env and mounts are resolved separately.
    pub fn from_pod(pod: &Pod, container: &Container) -> anyhow::Result<Self> {
        let spec = pod.spec.as_ref().context("pod spec")?;
        let psc = spec.security_context.clone().unwrap_or_default();
        let csc = container.security_context.clone().unwrap_or_default();
        Ok(Self {
            pod: pod.metadata.name.clone().context("pod name")?,
            image: container.image.clone().context("container image")?,
            command: container.command.clone(),
            args: container.args.clone().unwrap_or_default(),
            env: Vec::new(),
            mounts: Vec::new(),
            user: csc.run_as_user.or(psc.run_as_user),
            group: csc.run_as_group.or(psc.run_as_group),
            run_as_non_root: csc.run_as_non_root.or(psc.run_as_non_root) == Some(true),
            read_only_root: csc.read_only_root_filesystem == Some(true),
            drop_all_capabilities: csc
                .capabilities
                .as_ref()
                .and_then(|c| c.drop.as_ref())
                .is_some_and(|d| d.iter().any(|c| c == "ALL")),
            no_new_privileges: csc.allow_privilege_escalation == Some(false),
        })
    }

    /// The `podman run` arguments (after `run`).
    pub fn podman_args(&self, netns: &str, cidfile: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "--rm",
            "--pull=never",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--log-driver",
            "none",
            "--sig-proxy=false",
        ]
        .map(String::from)
        .to_vec();
        a.push(format!("--cidfile={}", cidfile.display()));
        a.push(format!("--network=ns:{netns}"));
        a.push(format!("--hostname={}", self.pod));
        a.push(format!("--ulimit=nofile={NOFILE}:{NOFILE}"));
        a.push(format!("--ulimit=nproc={NPROC}:{NPROC}"));
        match (self.user, self.group) {
            (Some(u), Some(g)) => a.push(format!("--user={u}:{g}")),
            (Some(u), None) => a.push(format!("--user={u}")),
            _ => {}
        }
        if self.read_only_root {
            a.push("--read-only".into());
            // A kubelet mounts no writable /tmp; podman would add one unless told not to.
            a.push("--read-only-tmpfs=false".into());
        }
        if self.drop_all_capabilities {
            a.push("--cap-drop=all".into());
        }
        if self.no_new_privileges {
            a.push("--security-opt=no-new-privileges".into());
        }
        for (k, v) in &self.env {
            a.push(format!("--env={k}={v}"));
        }
        for m in &self.mounts {
            let ro = if m.read_only { ":ro" } else { "" };
            a.push(format!("--volume={}:{}{ro}", m.host.display(), m.container));
        }
        if let Some(cmd) = &self.command {
            a.push(format!(
                "--entrypoint={}",
                serde_json::to_string(cmd).expect("json")
            ));
        }
        a.push(self.image.clone());
        a.extend(self.args.iter().cloned());
        a
    }
}

/// The image's own user (`Config.User`), for the `runAsNonRoot` check.
pub async fn image_user(image: &str) -> anyhow::Result<String> {
    let out = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Config.User}}", image])
        .output()
        .await
        .context("running podman")?;
    if !out.status.success() {
        bail!(
            "image {image} is not loaded (ErrImageNeverPull): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A running container (its `podman run` attached, so its exit is the child's); removed
/// by id when dropped.
#[derive(Debug)]
pub struct RunningContainer {
    /// Container id.
    pub id: String,
    child: Child,
    /// The pod's network namespace (deleted after the container).
    pub netns: PodNetns,
    removed: bool,
}

impl RunningContainer {
    /// Starts `spec` in `netns`, its output appended to `log`.
    pub async fn start(spec: &RunSpec, netns: PodNetns, log: &Path) -> anyhow::Result<Self> {
        // One inspect: it refuses an image that is not loaded (ErrImageNeverPull) and
        // gives the image's user for the runAsNonRoot check.
        let image_user = image_user(&spec.image).await?;
        if spec.run_as_non_root {
            let uid = match spec.user {
                Some(u) => u.to_string(),
                None => image_user.split(':').next().unwrap_or("").to_string(),
            };
            if uid.is_empty() || uid == "0" || uid == "root" {
                bail!(
                    "CreateContainerConfigError: container has runAsNonRoot and image will run as root ({} user {uid:?})",
                    spec.image
                );
            }
        }
        let cidfile = log.with_extension("cid");
        let _ = std::fs::remove_file(&cidfile);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        // Its own process group, and no signal proxying: a Ctrl-C at the terminal reaches
        // the harness only, which stops containers by id with their grace period.
        let mut child = Command::new("podman")
            .arg("run")
            .args(spec.podman_args(&netns.path(), &cidfile))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting podman")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let id = loop {
            if let Ok(id) = std::fs::read_to_string(&cidfile)
                && !id.trim().is_empty()
            {
                break id.trim().to_string();
            }
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "container of pod {} failed to start ({status}): {}",
                    spec.pod,
                    tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!("podman did not create the container of pod {}", spec.pod);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        info!(pod = %spec.pod, id = %&id[..12.min(id.len())], ip = %netns.ip, "container started");
        Ok(Self {
            id,
            child,
            netns,
            removed: false,
        })
    }

    /// The container has exited (and its exit code, when known).
    pub fn exited(&mut self) -> Option<Option<i32>> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            Ok(None) => None,
            Err(_) => Some(None),
        }
    }

    /// SIGKILL now, and the container removed.
    pub async fn kill(&mut self) {
        let id = self.id.clone();
        let _ = tokio::task::spawn_blocking(move || remove(&id)).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        self.removed = true;
    }

    /// Waits until the container exits.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// SIGTERM, SIGKILL after `grace` (`podman stop -t`), then removes the container.
    pub async fn stop(mut self, grace: Duration) {
        let secs = grace.as_secs().max(1).to_string();
        let stopped = Command::new("podman")
            .args(["stop", "--time", &secs, &self.id])
            .output()
            .await;
        match stopped {
            Ok(out) if out.status.success() => {}
            Ok(out) => warn!(
                id = %self.id,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "podman stop failed; removing the container"
            ),
            Err(e) => warn!(id = %self.id, %e, "podman stop failed; removing the container"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        remove(&self.id);
        self.removed = true;
    }
}

/// `podman rm --force` of one container by id (synchronous: runs from `Drop`).
fn remove(id: &str) {
    let _ = std::process::Command::new("podman")
        .args(["rm", "--force", "--time", "0", "--ignore", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        if !self.removed {
            remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p-0", "namespace": "ns", "uid": "u1",
                         "labels": {"app": "x"}, "annotations": {"a": "b"}},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("a$b", &env), "a$b");
    }

    #[test]
    fn downward_api_fields() {
        let p = pod(json!({"containers": [], "serviceAccountName": "sa"}));
        assert_eq!(field(&p, "metadata.name", "").unwrap(), "p-0");
        assert_eq!(field(&p, "metadata.namespace", "").unwrap(), "ns");
        assert_eq!(field(&p, "metadata.labels['app']", "").unwrap(), "x");
        assert_eq!(field(&p, "metadata.annotations['a']", "").unwrap(), "b");
        assert_eq!(field(&p, "status.podIP", "10.0.0.2").unwrap(), "10.0.0.2");
        assert_eq!(field(&p, "spec.serviceAccountName", "").unwrap(), "sa");
        assert!(field(&p, "status.hostIPs", "").is_err());
    }

    #[test]
    fn security_context_becomes_podman_flags() {
        let p = pod(json!({
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": true},
            "containers": [{"name": "c", "image": "img:1", "args": ["--config", "/etc/x.yaml"],
                "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                    "capabilities": {"drop": ["ALL"]}}}],
        }));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let mut spec = RunSpec::from_pod(&p, c).unwrap();
        spec.mounts.push(BindMount {
            host: "/h".into(),
            container: "/etc/x.yaml".into(),
            read_only: true,
        });
        let args = spec.podman_args("/run/netns/n", Path::new("/tmp/cid"));
        for want in [
            "--user=65532:65532",
            "--read-only",
            "--cap-drop=all",
            "--security-opt=no-new-privileges",
            "--network=ns:/run/netns/n",
            "--volume=/h:/etc/x.yaml:ro",
            "--ulimit=nofile=20000:20000",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
        assert_eq!(
            &args[args.len() - 3..],
            ["img:1", "--config", "/etc/x.yaml"]
        );
        assert!(!args.iter().any(|a| a.starts_with("--entrypoint")));
    }

    #[test]
    fn probes_resolve_named_ports_and_defaults() {
        let c: Container = serde_json::from_value(json!({
            "name": "c", "ports": [{"name": "api", "containerPort": 8081}],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "api"}, "periodSeconds": 5},
        }))
        .unwrap();
        let p = HttpProbe::from_spec(c.readiness_probe.as_ref().unwrap(), &c).unwrap();
        assert_eq!(p.port, 8081);
        assert_eq!(p.path, "/readyz");
        assert_eq!(p.period, Duration::from_secs(5));
        assert_eq!(p.failure_threshold, 3);
        let bad: Probe = serde_json::from_value(json!({"httpGet": {"port": "nope"}})).unwrap();
        assert!(HttpProbe::from_spec(&bad, &c).is_err());
    }

    #[test]
    fn atomic_writer_swaps_whole_sets_and_sets_group() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("vol");
        let files = |s: &str| -> VolumeFiles {
            BTreeMap::from([("keys".to_string(), (s.as_bytes().to_vec(), 0o440))])
        };
        assert!(write_atomic(&v, &files("one"), Some(65532), 1).unwrap());
        assert_eq!(std::fs::read_to_string(v.join("keys")).unwrap(), "one");
        let meta = std::fs::metadata(v.join("keys")).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(meta.gid(), 65532);
        assert_eq!(meta.mode() & 0o777, 0o440);
        // Same content: nothing rewritten.
        assert!(!write_atomic(&v, &files("one"), Some(65532), 2).unwrap());
        // New content: the path now reads the new set, the old generation is gone.
        assert!(write_atomic(&v, &files("two"), Some(65532), 3).unwrap());
        assert_eq!(std::fs::read_to_string(v.join("keys")).unwrap(), "two");
        let gens = std::fs::read_dir(&v)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(gens, 1);
        // A key removed from the object disappears from the volume.
        let other: VolumeFiles = BTreeMap::from([("jwt".to_string(), (b"k".to_vec(), 0o440))]);
        assert!(write_atomic(&v, &other, None, 4).unwrap());
        assert!(std::fs::symlink_metadata(v.join("keys")).is_err());
        assert_eq!(std::fs::read_to_string(v.join("jwt")).unwrap(), "k");
    }

    #[test]
    fn service_account_volume_follows_automount() {
        let api = ApiAccess {
            server: "http://10.213.0.1:6443".into(),
        };
        let p = pod(json!({"containers": []}));
        let sa = service_account_volume(&api, &p, "t0k3n").unwrap();
        assert_eq!(sa.files["namespace"], b"ns");
        assert_eq!(sa.files["token"], b"t0k3n");
        assert!(
            String::from_utf8_lossy(&sa.files["kubeconfig"]).contains("http://10.213.0.1:6443")
        );
        assert!(
            sa.env
                .contains(&("KUBERNETES_SERVICE_PORT".into(), "6443".into()))
        );
        let off = pod(json!({"containers": [], "automountServiceAccountToken": false}));
        assert!(service_account_volume(&api, &off, "t0k3n").is_none());
    }
}

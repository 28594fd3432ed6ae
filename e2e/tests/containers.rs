//! Container mode only (`E2E_RUNTIME=containers`, as CI runs it after `scripts/images`):
//! what a container runtime checks that host processes cannot. A gateway pod runs from
//! the image with the pod spec the operator rendered, as a kubelet runs it — user 65532,
//! read-only root, no capabilities, the ConfigMap and Secrets read-only at their real
//! mount paths, env from the downward API — and a rotated Secret reaches the running
//! container through its volume. In process mode these tests say so and return.

use std::time::Duration;

use serde_json::{Value, json};
use tether_e2e::*;

const POOL: &str = "ctr";
const PATIENCE: Duration = Duration::from_secs(90);

fn container_mode() -> bool {
    let mode = Runtime::from_env().expect("E2E_RUNTIME");
    if mode != Runtime::Containers {
        println!(
            "e2e runtime: {} — this test needs E2E_RUNTIME=containers (scripts/images first); nothing ran",
            mode.name()
        );
    }
    mode == Runtime::Containers
}

async fn podman(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("podman")
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "podman {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn stats(http: &reqwest::Client, internal: &str, key: &str) -> Option<u16> {
    let r = http
        .get(format!("http://{internal}/v1/stats"))
        .bearer_auth(key)
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

/// A one-pod pool, the operator and the kubelet; runs `body` with the ready endpoint.
async fn with_one_pod<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(Cluster, Endpoint) -> Fut,
    Fut: std::future::Future<Output = (Cluster, anyhow::Result<()>)>,
{
    let cluster = Cluster::start().await?;
    cluster
        .create_pool(
            POOL,
            json!({"replicas": {"min": 1, "max": 1}, "reportIntervalSeconds": 1}),
        )
        .await?;
    let mut operator = cluster.start_operator().await?;
    let kubelet = Kubelet::start(&cluster, POOL)?;
    let ready = eventually("a ready gateway container", PATIENCE, || {
        let e = kubelet.endpoints().into_iter().find(|e| e.ready);
        async move { e }
    })
    .await;
    let (cluster, result) = match ready {
        Ok(endpoint) => body(cluster, endpoint).await,
        Err(e) => (cluster, Err(e.into())),
    };
    kubelet.shutdown().await;
    let _ = operator.kill().await;
    if result.is_err() {
        let root = cluster.dir.path().join("pods").join(format!("{POOL}-0"));
        let log = std::fs::read_to_string(root.join("container.log")).unwrap_or_default();
        eprintln!("gateway container log:\n{log}");
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_container_runs_as_the_rendered_pod_spec_says() -> anyhow::Result<()> {
    if !container_mode() {
        return Ok(());
    }
    with_one_pod(|cluster, endpoint| async move {
        let result = async {
            let id = endpoint.container_id.clone().expect("container mode");
            let inspect: Value = serde_json::from_str(&podman(&["inspect", &id]).await?)?;
            let c = &inspect[0];
            println!(
                "container {}: image {}, user {}, read-only root {}, caps dropped {}, args {}",
                &id[..12],
                c["ImageName"],
                c["Config"]["User"],
                c["HostConfig"]["ReadonlyRootfs"],
                c["HostConfig"]["CapDrop"],
                c["Args"]
            );
            // The image the operator rendered (the chart's gateway image), its args,
            // user and read-only root as the pod spec says.
            anyhow::ensure!(
                c["ImageName"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("ghcr.io/tether-dev/tether-gateway:")),
                "image {}",
                c["ImageName"]
            );
            anyhow::ensure!(c["Args"] == json!(["--config", "/etc/tether/gateway.yaml"]));
            anyhow::ensure!(c["Config"]["User"] == "65532:65532");
            anyhow::ensure!(c["HostConfig"]["ReadonlyRootfs"] == true);
            anyhow::ensure!(
                c["HostConfig"]["CapDrop"]
                    .as_array()
                    .is_some_and(|caps| caps.iter().any(|c| c == "CAP_NET_BIND_SERVICE")),
                "capabilities dropped: {}",
                c["HostConfig"]["CapDrop"]
            );
            // The process itself runs as 65532 (its /proc entry on the host: the image
            // has no ps, no shell).
            let pid = c["State"]["Pid"].as_i64().unwrap_or_default();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            for id_line in status
                .lines()
                .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:"))
            {
                anyhow::ensure!(
                    id_line.split_whitespace().skip(1).all(|f| f == "65532"),
                    "gateway process: {id_line}"
                );
            }
            // Env from the downward API.
            let env: Vec<String> = serde_json::from_value(c["Config"]["Env"].clone())?;
            for want in ["POD_NAME=ctr-0", "POD_NAMESPACE=tenants"] {
                anyhow::ensure!(env.iter().any(|e| e == want), "{want} not in {env:?}");
            }
            // The ConfigMap and the Secrets at their real paths, read-only.
            let mounts: Vec<(String, bool)> = c["Mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    (
                        m["Destination"].as_str().unwrap_or_default().to_string(),
                        m["RW"] == true,
                    )
                })
                .collect();
            println!("mounts: {mounts:?}");
            for path in [
                "/etc/tether/gateway.yaml",
                "/etc/tether/secrets/jwt",
                "/etc/tether/secrets/api-keys",
            ] {
                anyhow::ensure!(
                    mounts.iter().any(|(d, rw)| d == path && !rw),
                    "{path} is not mounted read-only: {mounts:?}"
                );
            }
            // The pod reads them as 65532: its push API takes the key from the Secret,
            // and it reports to the API through its service-account volume.
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?;
            anyhow::ensure!(stats(&http, &endpoint.internal, API_KEY).await == Some(200));
            anyhow::ensure!(stats(&http, &endpoint.internal, "wrong").await == Some(401));
            eventually("the pod's own status entry", PATIENCE, || async {
                let p = cluster.pools().get(POOL).await.ok()?;
                p.status?
                    .pods
                    .iter()
                    .any(|p| p.name == "ctr-0")
                    .then_some(())
            })
            .await?;
            Ok(())
        }
        .await;
        (cluster, result)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_reaches_the_running_container() -> anyhow::Result<()> {
    if !container_mode() {
        return Ok(());
    }
    with_one_pod(|cluster, endpoint| async move {
        let result = async {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?;
            let rotated = "e2e-rotated-api-key";
            anyhow::ensure!(stats(&http, &endpoint.internal, rotated).await == Some(401));
            // Rotate: the Secret's new content reaches the mounted files (the kubelet's
            // atomic swap) and the gateway's periodic reload picks it up; the
            // container is never restarted.
            let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
                kube::Api::namespaced(cluster.client.clone(), NS);
            let patch = json!({"stringData": {"keys": format!("{rotated}\n")}, "data": null});
            secrets
                .patch(
                    "api-keys",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(patch),
                )
                .await?;
            eventually("the rotated key accepted", PATIENCE, || async {
                (stats(&http, &endpoint.internal, rotated).await == Some(200)).then_some(())
            })
            .await?;
            anyhow::ensure!(stats(&http, &endpoint.internal, API_KEY).await == Some(401));
            let id = endpoint.container_id.clone().expect("container mode");
            let running = podman(&["inspect", "--format", "{{.State.Running}}", &id]).await?;
            anyhow::ensure!(running.trim() == "true", "the same container still runs");
            Ok(())
        }
        .await;
        (cluster, result)
    })
    .await
}

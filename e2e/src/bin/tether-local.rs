//! `tether-local`: the whole platform on this machine in one command — the Kubernetes
//! API stand-in, NATS, the real operator, a local "kubelet" that runs a gateway process
//! per StatefulSet replica, the pool's client Service (a proxy on one stable loopback
//! address, balancing new connections over Ready pods), and one `ConnectionPool` — with
//! a kubeconfig `kubectl` can use. Stops everything on Ctrl-C.
//!
//! `TETHER_LOCAL_SERVICE` moves the Service (default `127.0.0.1:8090`; port 0 picks one).
//!
//! `--containers` runs the gateway pods and the operator as containers from the images
//! `scripts/images` built (podman + runc), each pod in its own network namespace with
//! the pod spec as rendered; the default runs them as host processes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::json;
use tether_e2e::{API_KEY, Cluster, JWT_SECRET, Kubelet, NS, Runtime, eventually, token};

const POOL: &str = "demo";
/// Where the pool's client Service listens unless `TETHER_LOCAL_SERVICE` says otherwise.
const DEFAULT_SERVICE: &str = "127.0.0.1:8090";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::from_env()?;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--containers" => runtime = Runtime::Containers,
            "--processes" => runtime = Runtime::Processes,
            other => {
                bail!("unknown argument {other:?} (tether-local [--containers | --processes])")
            }
        }
    }
    let service: SocketAddr = std::env::var("TETHER_LOCAL_SERVICE")
        .unwrap_or_else(|_| DEFAULT_SERVICE.into())
        .parse()
        .context("TETHER_LOCAL_SERVICE must be an address such as 127.0.0.1:8090")?;
    let cluster = Cluster::start_with(runtime).await?;
    let mut operator = cluster.start_operator().await?;
    cluster
        .create_pool(
            POOL,
            json!({
                "replicas": {"min": 1, "max": 6},
                // Scale down 30 s after the load leaves (not the default 5 minutes), so
                // a demo shows the whole episode.
                "scaling": {
                    "targetConnectionsPerPod": 1000,
                    "scaleDown": {"stabilizationSeconds": 30},
                },
                "reportIntervalSeconds": 2,
            }),
        )
        .await?;
    let kubelet = Kubelet::start_with_service(&cluster, POOL, service).with_context(|| {
        format!("is {service} in use? set TETHER_LOCAL_SERVICE=127.0.0.1:<port> (0 picks one)")
    })?;
    let first = eventually("a ready gateway pod", Duration::from_secs(60), || {
        let ready = kubelet.endpoints().into_iter().find(|e| e.ready);
        async move { ready }
    })
    .await?;

    let kubeconfig = cluster.kubeconfig.display();
    let url = kubelet.service_url();
    println!(
        r#"
Tether is running locally (pods as {mode}).

  export KUBECONFIG={kubeconfig}
  kubectl get connectionpools -n {NS}          # or: kubectl get cpool -n {NS} -w
  kubectl get statefulsets,pods -n {NS}
  kubectl edit cpool {POOL} -n {NS}            # change replicas, limits, ...

Service {POOL} (every Ready pod, new connections balanced): {url}
  agent token:  {token}
  JWT secret:   {JWT_SECRET}   (HS256, tenant acme)
  API key:      {API_KEY}

  cargo run -p tether-agent -- connect --url {url} --token {token}
  cargo run -p tether-agent -- connect --url {url} --hs256-secret {JWT_SECRET} --tenant acme --agent-id agent-2
  curl -X POST http://{internal}/v1/agents/local-agent/messages \
       -H 'Authorization: Bearer {API_KEY}' -H 'Content-Type: application/json' -d '{{"hello":"agent"}}'
       (push API of pod {pod}; any pod routes to the agent's pod)

Load through the Service (watch `kubectl get cpool -n {NS} -w` scale up, rebalance, scale down):
  cargo run --release -p tether-bench -- connect -n 5000 --rate 500 --hold 120 \
       --url {url} --hs256-secret {JWT_SECRET} --tenant acme

Operator log: {log}
Ctrl-C stops everything.
"#,
        mode = runtime.name(),
        pod = first.pod,
        internal = first.internal,
        token = token("local-agent"),
        log = cluster.operator_log().display(),
    );

    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        status = operator.wait() => println!("operator exited: {status:?}"),
    }
    kubelet.shutdown().await;
    let _ = operator.kill().await;
    Ok(())
}

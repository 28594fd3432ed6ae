//! `tether-local`: the whole platform on this machine in one command — the Kubernetes
//! API stand-in, NATS, the real operator, a local "kubelet" that runs a gateway process
//! per StatefulSet replica, and one `ConnectionPool` — with a kubeconfig `kubectl` can use.
//! Stops everything on Ctrl-C.

use std::time::Duration;

use serde_json::json;
use tether_e2e::{API_KEY, Cluster, Kubelet, NS, eventually, token};

const POOL: &str = "demo";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let mut operator = cluster.start_operator()?;
    cluster
        .create_pool(
            POOL,
            json!({
                "replicas": {"min": 1, "max": 4},
                "scaling": {"targetConnectionsPerPod": 1000},
                "reportIntervalSeconds": 2,
            }),
        )
        .await?;
    let kubelet = Kubelet::start(&cluster, POOL)?;
    let first = eventually("a ready gateway pod", Duration::from_secs(60), || {
        let ready = kubelet.endpoints().into_iter().find(|e| e.ready);
        async move { ready }
    })
    .await?;

    let kubeconfig = cluster.kubeconfig.display();
    println!(
        r#"
Tether is running locally.

  export KUBECONFIG={kubeconfig}
  kubectl get connectionpools -n {NS}          # or: kubectl get cpool -n {NS} -w
  kubectl get statefulsets,pods -n {NS}
  kubectl edit cpool {POOL} -n {NS}            # change replicas, limits, ...

Gateway pod {pod}: agents connect to ws://{public}/v1/connect, push API on http://{internal}
  agent token:  {token}
  API key:      {API_KEY}

  cargo run -p tether-agent -- connect --url ws://{public}/v1/connect --token {token}
  curl -X POST http://{internal}/v1/agents/local-agent/messages \
       -H 'Authorization: Bearer {API_KEY}' -H 'Content-Type: application/json' -d '{{"hello":"agent"}}'

Operator log: {log}
Ctrl-C stops everything.
"#,
        pod = first.pod,
        public = first.public,
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

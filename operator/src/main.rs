//! `tether-operator`: parses flags, sets up telemetry, connects to the API server
//! (in-cluster or `KUBECONFIG`) and runs the operator until SIGTERM or Ctrl-C.

use clap::Parser;
use tether_operator::app::{Args, run};
use tether_operator::metrics::{self, Metrics};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs, spans (one per reconcile) and metrics: OTLP when the `OTEL_*` variables ask
    // for it, and always the Prometheus text of `/metrics`, from the same instruments.
    let mut telemetry = tether_telemetry::Options::new(metrics::SCOPE)
        .json(args.log_format == "json")
        .default_filter("info,kube=warn")
        .prometheus(true)
        .attribute("k8s.namespace.name", args.lease_namespace.clone());
    if let Some(identity) = &args.identity {
        telemetry = telemetry
            .instance(identity.clone())
            .attribute("k8s.pod.name", identity.clone());
    }
    let telemetry = tether_telemetry::init(telemetry)?;
    let metrics = std::sync::Arc::new(Metrics::from_telemetry(&telemetry));
    let client = kube::Client::try_default().await?;
    run(client, args, metrics, shutdown_signal()).await?;
    // Flushes the last spans and metrics.
    drop(telemetry);
    Ok(())
}

/// Resolves on the first SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

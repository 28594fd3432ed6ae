//! The operator process: flags, admin server, leader election and the controller,
//! wired together. `main` only parses [`Args`] and calls [`run`].
//!
//! ```text
//!  lease loop ──leader: watch<bool>──► while leader: controller::run with a fresh Context
//!      │        (every lease call bounded     lease lost: the controller is dropped at
//!      │         by the renew deadline)        once (no reconcile outlives the term);
//!      │                                      shutdown: in-flight reconciles get until
//!      │                                      the renew deadline, then the lease is released
//!  admin server (/healthz /readyz /metrics) runs throughout
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::controller::{self, Context, Scope};
use crate::lease::{Elector, LeaseConfig};
use crate::metrics::Metrics;
use crate::pin;
use crate::resources::Settings;

/// Command-line flags (each with an environment variable the chart sets).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tether-operator",
    version,
    about = "Reconciles Tether ConnectionPools into gateway fleets"
)]
pub struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "TETHER_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Gateway image for pools that do not set `spec.template.image`.
    #[arg(long, env = "TETHER_GATEWAY_IMAGE")]
    pub gateway_image: Option<String>,
    /// Image of managed NATS servers.
    #[arg(long, env = "TETHER_NATS_IMAGE", default_value = "nats:2.11-alpine")]
    pub nats_image: String,
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "TETHER_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Identity in the leader lease and in Events (default: `POD_NAME`, else host and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Namespace of the leader lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader lease.
    #[arg(long, env = "TETHER_LEASE_NAME", default_value = "tether-operator")]
    pub lease_name: String,
    /// How long a silent leader keeps the lease (e.g. `15s`).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How often the leader renews the lease (and a follower looks again).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_renew: Duration,
    /// Run without leader election (one replica only).
    #[arg(long)]
    pub no_leader_election: bool,
    /// How soon a pool waiting for a missing Secret is looked at again.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub secret_recheck: Duration,
    /// Longest time one reconcile may take before it is dropped and retried (an API
    /// call that never answers would otherwise freeze its pool).
    #[arg(long, env = "TETHER_RECONCILE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconcile_timeout: Duration,
    /// Most reconciles in flight at once (0: unbounded).
    #[arg(long, env = "TETHER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// Debounce of reconcile requests (coalesces the burst of events an apply causes).
    /// Keep it well below the pods' report interval: every request restarts it.
    #[arg(long, env = "TETHER_DEBOUNCE", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,
    /// Least time between two autoscaling steps of one pool (pod reports arriving
    /// faster are folded into the next step).
    #[arg(long, env = "TETHER_SCALE_SPACING", default_value = "1s", value_parser = humantime::parse_duration)]
    pub scale_spacing: Duration,
    /// At the start of each leadership term, before reconciling, pin every pool without
    /// `spec.template.image` to the gateway image its StatefulSet runs, so a new
    /// `--gateway-image` restarts no running pool (docs/upgrading.md).
    #[arg(long, env = "TETHER_PIN_GATEWAY_IMAGES")]
    pub pin_gateway_images: bool,
    /// Log format: `text` or `json`.
    #[arg(long, env = "TETHER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// How long a leader may go without renewing before it steps down: two thirds of the
/// lease duration (client-go's 10 s of 15 s), so it stops before anyone may take over.
pub fn renew_deadline(lease_duration: Duration) -> Duration {
    lease_duration.mul_f64(2.0 / 3.0)
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "tether-operator".into());
    format!("{host}-{}", std::process::id())
}

/// Aborts a spawned task when dropped, so that dropping [`run`]'s future (a test
/// simulating a crash) stops everything it started.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the operator with `client` until `shutdown` resolves, then stops the
/// controller, releases the lease and returns. Reconciles are recorded in `metrics`.
pub async fn run(
    client: Client,
    args: Args,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let Args {
        namespace,
        gateway_image,
        nats_image,
        admin_addr,
        identity,
        lease_namespace,
        lease_name,
        lease_duration,
        lease_renew,
        no_leader_election,
        secret_recheck,
        reconcile_timeout,
        concurrency,
        debounce,
        scale_spacing,
        pin_gateway_images,
        log_format: _, // used by main's telemetry setup
    } = args;
    let identity = identity.unwrap_or_else(default_identity);
    let mut settings = Settings {
        nats_image,
        ..Settings::default()
    };
    if let Some(image) = gateway_image {
        settings.gateway_image = image;
    }
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind(admin_addr).await?;
    info!(addr = %listener.local_addr()?, %identity, "admin server listening");
    let app = admin::router(AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    let mut admin_stop = stop_rx.clone();
    let admin_task = AbortOnDrop(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            })
            .await
    }));

    let (leader_tx, mut leader_rx) = watch::channel(false);
    let lease_task = if no_leader_election {
        leader_tx.send_replace(true);
        // Keep the sender alive for the whole run.
        let mut stop = stop_rx.clone();
        AbortOnDrop(tokio::spawn(async move {
            let _leader_tx = leader_tx;
            let _ = stop.wait_for(|s| *s).await;
        }))
    } else {
        let elector = Elector::new(
            client.clone(),
            LeaseConfig {
                name: lease_name,
                namespace: lease_namespace,
                identity: identity.clone(),
                duration: lease_duration,
                renew_every: lease_renew,
                renew_deadline: renew_deadline(lease_duration),
            },
        );
        AbortOnDrop(tokio::spawn(elector.run(leader_tx, stop_rx.clone())))
    };
    ready.store(true, Ordering::Relaxed);

    let scope = Scope {
        namespace,
        concurrency,
        debounce,
    };
    // In-flight reconciles may finish on shutdown, but not past the point where the
    // lease could be taken over: the renew deadline.
    let grace = renew_deadline(lease_duration);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            led = leader_rx.wait_for(|l| *l) => if led.is_err() { break },
            _ = &mut shutdown => break,
        }
        if pin_gateway_images {
            // Before the controller renders anything, or it would roll the pools that
            // were to be pinned.
            tokio::select! {
                _ = pin::pin_running_images_retrying(&client, scope.namespace.as_deref()) => {}
                _ = &mut shutdown => break,
            }
        }
        metrics.set_leader(true);
        info!("leading: starting the controller with a fresh state");
        // A fresh Context per term: no scaling history or cached decision of an earlier
        // term survives into this one.
        let mut ctx = Context::new(
            client.clone(),
            settings.clone(),
            metrics.clone(),
            Some(identity.clone()),
        );
        ctx.secret_recheck = secret_recheck;
        ctx.reconcile_timeout = reconcile_timeout;
        ctx.scale_spacing = scale_spacing;
        let mut stopping = stop_rx.clone();
        let graceful = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        let mut controller = AbortOnDrop(tokio::spawn(controller::run(
            Arc::new(ctx),
            scope.clone(),
            graceful,
        )));
        let mut leadership = leader_rx.clone();
        let lost = async move {
            let _ = leadership.wait_for(|l| !*l).await;
        };
        // (shutting down, the task already finished)
        let (shutting_down, finished) = tokio::select! {
            _ = &mut controller.0 => (false, true),
            _ = lost => {
                // Lost: stop at once. A reconcile half-way through would otherwise
                // force-apply under a lease someone else may hold by now.
                controller.0.abort();
                (false, false)
            }
            _ = &mut shutdown => {
                stop_tx.send_replace(true);
                let finished = tokio::time::timeout(grace, &mut controller.0).await.is_ok();
                if !finished {
                    warn!(?grace, "reconciles still running at the renew deadline: aborted");
                    controller.0.abort();
                }
                (true, finished)
            }
        };
        if !finished {
            // Wait for the abort to land: nothing of this term runs past this point.
            let _ = (&mut controller.0).await;
        }
        metrics.set_leader(false);
        if shutting_down {
            break;
        }
        info!("lost the leader lease: controller stopped, campaigning again");
    }
    stop_tx.send_replace(true);
    let _ = (&mut { lease_task }.0).await;
    let _ = (&mut { admin_task }.0).await;
    Ok(())
}

//! Harness of the closed-loop end-to-end tests.
//!
//! ```text
//!  Cluster: tether-kube-sim (in process) + CRD + namespace + Secrets + nats-server
//!     ▲  ▲                                   ▲
//!     │  └── tether-operator (child process, KUBECONFIG) scales the StatefulSet,
//!     │      writes drain/shed instructions into the pool's status
//!     └───── Kubelet (task here): for each StatefulSet replica a real `tether-gateway`
//!            process with the pod's name, namespace, ConfigMap and Secret files (or, in
//!            container mode, a container from the image run with the pod spec as
//!            rendered, see [`runtime`] and [`container`]); a Pod
//!            object whose Ready condition follows /readyz; SIGTERM (then SIGKILL after
//!            the grace period) for removed ordinals; the StatefulSet's status
//!            and the pool's client Service: a TCP proxy on one stable loopback address
//!            that sends each new connection to a Ready pod ([`service_proxy`])
//!  Agents (tasks here): SDK agents (`tether-agent`) that connect through that Service,
//!            honour reconnect hints, record pushes
//! ```
//!
//! One module a role: [`Cluster`] (`cluster`), [`Kubelet`] (`kubelet`), the Service's
//! proxy ([`service_proxy`]), [`Agents`] (`agents`) and the [`Pusher`] (`pusher`);
//! everything public is re-exported here. Polling, ports and the nats-server lookup
//! come from `tether-test-support`.
//!
//! The kubelet records, for every pod it stops, how many connections the gateway still
//! held at that moment (from its `/v1/stats`), so a test can assert that no pod was
//! removed while it still held agents.

mod agents;
mod cluster;
pub mod container;
mod kubelet;
pub mod podnet;
pub mod podsim;
mod pusher;
pub mod revision;
pub mod runtime;
pub mod scale;
pub mod service_proxy;

use std::path::PathBuf;

use anyhow::bail;

pub use agents::{
    AgentState, AgentStats, Agents, OneShotAgents, minter, test_agent_options, token,
};
pub use cluster::{
    Cluster, OPERATOR_SA, Operator, chart_rbac, install, install_operator_rbac, request_token,
    spawn_operator, write_token_kubeconfig,
};
pub use kubelet::{Endpoint, Kubelet, Removal, rewrite_config};
pub use pusher::Pusher;
pub use runtime::Runtime;
/// A free loopback port (bound and released; good enough for a test).
pub use tether_test_support::free_port;
/// Polls `f` until it returns `Some`, for at most `timeout`; the error names `what`.
pub use tether_test_support::try_eventually as eventually;

/// The ordinal of pod `pod` of pool `pool` (`<pool>-<n>`).
pub fn scaling_ordinal(pool: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(pool)?.strip_prefix('-')?.parse().ok()
}

/// Namespace of the test pools.
pub const NS: &str = "tenants";
/// The agents' HS256 secret (in the pool's JWT Secret).
pub const JWT_SECRET: &str = "e2e-jwt-secret-0123456789abcdef0123456789";
/// The push API key (in the pool's API-key Secret).
pub const API_KEY: &str = "e2e-api-key-0123456789";

/// A tiny cancellation flag (the harness needs no more than this).
mod tokio_util_free {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Cloneable stop flag with a notification.
    #[derive(Clone, Default, Debug)]
    pub struct Stop(Arc<(AtomicBool, tokio::sync::Notify)>);

    impl Stop {
        /// Raises the flag and wakes the waiters.
        pub fn stop(&self) {
            self.0.0.store(true, Ordering::SeqCst);
            self.0.1.notify_waiters();
        }
        /// Whether the flag is up.
        pub fn is_stopped(&self) -> bool {
            self.0.0.load(Ordering::SeqCst)
        }
        /// Resolves once the flag is up.
        pub async fn stopped(&self) {
            loop {
                let notified = self.0.1.notified();
                if self.is_stopped() {
                    return;
                }
                notified.await;
            }
        }
    }
}

/// The directory holding the workspace's built binaries (`target/debug`), found from
/// the test executable's own path (`target/debug/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Path of a workspace binary; fails with the command that builds it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first with `cargo build -p tether-gateway -p tether-operator` \
             (the e2e tests run the real binaries)",
            path.display()
        );
    }
    Ok(path)
}

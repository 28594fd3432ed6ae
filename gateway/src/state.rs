//! The state shared by every handler and session of one gateway process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

use tether_config::GatewayConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiKeys, TokenVerifier};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::quota::Quotas;
use crate::router::Router;
use crate::upstream::Upstream;

/// Everything a handler or session needs; one `Arc` of it per process.
pub struct AppState {
    /// The validated configuration.
    pub config: GatewayConfig,
    /// This pod's name (the hostname in a StatefulSet).
    pub pod: String,
    /// Local connections.
    pub hub: Arc<Hub>,
    /// Delivery across the pool.
    pub router: Arc<dyn Router>,
    /// Agent token verification.
    pub verifier: TokenVerifier,
    /// Push-API keys.
    pub api_keys: ApiKeys,
    /// Where agent messages go, if configured.
    pub upstream: Option<Upstream>,
    /// The tenant backend's say on each handshake (`auth.connectCheck`).
    pub connect_check: Option<crate::connect_check::ConnectCheck>,
    /// The push API's rate quotas (`quotas`).
    pub quotas: Quotas,
    /// OpenTelemetry instruments.
    pub metrics: Metrics,
    /// Connections admitted (including upgrades in progress); bounded by
    /// `limits.maxConnections`.
    pub admitted: AtomicUsize,
    /// Upgrades refused because the pod was full, ever (the status reporter sends the
    /// increase since its previous report: demand the pool could not serve).
    pub refused_full: AtomicU64,
    /// Upgrades refused because the pool was at `quotas.maxConnections`, ever: not
    /// demand (more pods would not admit them), so kept apart from `refused_full`.
    pub refused_capped: AtomicU64,
    /// Set once a drain starts: no new upgrades, readiness false.
    pub draining: AtomicBool,
    /// Set while an instructed shed round runs and its agents reconnect: no new
    /// upgrades, readiness false, so that the agents it sheds land on other pods.
    pub shedding: AtomicBool,
    /// Until when (Unix milliseconds; 0: open) the operator closed this pod to new agents
    /// for a rebalancing episode: readiness false and upgrades refused with 503, so that
    /// the agents other pods shed land on lighter pods. An absolute time, not a flag, so
    /// that a pod whose operator died mid-episode reopens by itself.
    pub admission_closed_until_ms: AtomicI64,
    /// Cancelled to start a drain.
    pub drain_requested: CancellationToken,
    /// Every session and background task, so shutdown can wait for them (axum's
    /// graceful shutdown does not wait for upgraded sockets).
    pub tasks: TaskTracker,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("pod", &self.pod)
            .field("connections", &self.hub.len())
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether a shed round is under way.
    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Acquire)
    }

    /// Whether admission is closed for a rebalancing episode (and not expired).
    pub fn is_admission_closed(&self) -> bool {
        let until = self.admission_closed_until_ms.load(Ordering::Acquire);
        until > 0 && k8s_openapi::jiff::Timestamp::now().as_millisecond() < until
    }

    /// Whether the pod takes new agents: not draining, not shedding, admission open.
    /// (Readiness also needs the router; see `/readyz`.)
    pub fn admits_newcomers(&self) -> bool {
        !self.is_draining() && !self.is_shedding() && !self.is_admission_closed()
    }

    /// Reserves a connection slot; `None` when the pod is full. A refusal is not
    /// counted here: only an agent that could have connected is demand
    /// ([`AppState::refused_for_capacity`]), not an anonymous or forged handshake.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let max = self.config.limits.max_connections;
        let admitted = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        admitted.ok().map(|_| Admission {
            state: Some(self.clone()),
        })
    }

    /// An authenticated agent was refused because the pod is full: demand the pool
    /// could not serve (the status reporter sends its increase).
    pub fn refused_for_capacity(&self) {
        self.refused_full.fetch_add(1, Ordering::Relaxed);
    }

    /// Releases a slot that [`Admission::into_session`] handed over.
    pub(crate) fn release_admission(&self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }

    /// Starts a drain (idempotent).
    pub fn request_drain(&self) {
        self.drain_requested.cancel();
    }
}

/// A reserved connection slot, released on drop.
#[derive(Debug)]
pub struct Admission {
    /// `None` once handed to a session.
    state: Option<Arc<AppState>>,
}

impl Admission {
    /// Hands the slot to a connection's session, whose `Drop` releases it
    /// ([`AppState::release_admission`]); returns the state it was taken from. The
    /// session then keeps one `Arc<AppState>` for both, 8 bytes less in every
    /// connection's task.
    pub(crate) fn into_session(mut self) -> Arc<AppState> {
        self.state.take().expect("an admission is handed over once")
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            state.release_admission();
        }
    }
}

//! The pod's side of the autoscaling loop: it reports its connection count into its
//! pool's `status.pods[]` and follows the operator's instructions in
//! `status.instructions[]`.
//!
//! ```text
//!   hub.len(), ready, draining ──(every 100 ms: due? pure `next_report`)──► SSA /status
//!        status.pods[{name, connections, ready, draining, observedAt, bootId}]
//!        field manager `tether-gateway-<pod>`: pods never overwrite each other
//!   watch pool (fieldSelector metadata.name) ──► instruction for this pod?
//!        drain ──► shed::drain_in_place (unready, stays up)   gone ──► drain called off
//!        shed N (new id) ──► shed::shed(N)
//! ```
//!
//! The instructions travel through the pool object the pod already reads and writes
//! rather than through the admin endpoint: the operator needs no network path to every
//! pod (no NetworkPolicy hole, no pod IPs, works across clusters' API proxies), the
//! instruction survives an operator failover, and a pod that restarts under the same
//! name sees it again.
//!
//! Reporting runs on its own task and only reads counters, so API errors or a slow API
//! server never hold a connection up; a failed report is retried with back-off, and each
//! attempt sends the count of that moment, never a queued old one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use rand::Rng;
use serde_json::json;
use tether_config::StatusConfig;
use tether_crds::{ConnectionPool, PodInstruction};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::state::AppState;

/// What a pod reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Open agent connections.
    pub connections: i64,
    /// Accepting new agents.
    pub ready: bool,
    /// Draining (instructed or for shutdown).
    pub draining: bool,
}

/// When the next report is due, given the last one that reached the API server.
///
/// - nothing sent yet: now;
/// - `ready` or `draining` changed: 250 ms after the last report (the operator waits on
///   these to finish a drain);
/// - the count moved by at least 1 % (and at least one connection): one interval after
///   the last report, so a pod writes at most once per interval for counts;
/// - nothing changed: two intervals after the last report, which keeps the entry fresh
///   (the operator ignores entries older than three intervals).
///
/// `jitter` (e.g. 0.9..1.1) stretches the interval so pods that started together do not
/// write together.
pub fn next_report(
    last: Option<(Instant, Snapshot)>,
    current: Snapshot,
    interval: Duration,
    jitter: f64,
) -> Instant {
    let Some((at, sent)) = last else {
        return Instant::now();
    };
    let interval = interval.mul_f64(jitter.clamp(0.5, 1.5));
    if sent.ready != current.ready || sent.draining != current.draining {
        return at + Duration::from_millis(250).min(interval);
    }
    let threshold = (sent.connections / 100).max(1);
    if (current.connections - sent.connections).abs() >= threshold {
        at + interval
    } else {
        at + interval * 2
    }
}

/// Back-off after `failures` failed reports in a row: 250 ms doubling, capped at the
/// report interval (a report must still land well within the staleness window).
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << failures.min(8));
    base.min(interval).max(Duration::from_millis(250))
}

/// The field manager of one pod's entry.
pub fn field_manager(pod: &str) -> String {
    // Field managers are limited to 128 characters; pod names to 63.
    format!("tether-gateway-{pod}")
}

/// The server-side-apply body of this pod's entry.
pub fn report_body(
    pool: &str,
    pod: &str,
    boot_id: &str,
    snap: Snapshot,
    now: Timestamp,
) -> serde_json::Value {
    json!({
        "apiVersion": format!("{}/{}", tether_crds::GROUP, tether_crds::VERSION),
        "kind": "ConnectionPool",
        "metadata": {"name": pool},
        "status": {"pods": [{
            "name": pod,
            "connections": snap.connections,
            "ready": snap.ready,
            "draining": snap.draining,
            "observedAt": now.to_string(),
            "bootId": boot_id,
        }]},
    })
}

/// The body that withdraws this pod's entry: applying nothing under the pod's field
/// manager removes every field it owned (and only those).
pub fn withdraw_body(pool: &str) -> serde_json::Value {
    json!({
        "apiVersion": format!("{}/{}", tether_crds::GROUP, tether_crds::VERSION),
        "kind": "ConnectionPool",
        "metadata": {"name": pool},
    })
}

/// What the pod is doing about its instructions.
#[derive(Debug, Default)]
struct Following {
    /// The instructed drain under way, if any.
    drain: Option<CancellationToken>,
    /// The last shed instruction acted on, and its task's stop.
    shed: Option<(String, CancellationToken)>,
}

/// The running reporter and instruction follower of one gateway process.
#[derive(Debug)]
pub struct StatusHandle {
    stop: CancellationToken,
    reporter: JoinHandle<()>,
    follower: JoinHandle<()>,
}

impl StatusHandle {
    /// Stops following instructions and reporting, then withdraws this pod's entry
    /// (clean shutdown), giving the API server at most `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        self.stop.cancel();
        self.follower.abort();
        let _ = tokio::time::timeout(timeout, self.reporter).await;
    }
}

/// Starts reporting and following instructions for `state`'s pod. Needs a Kubernetes
/// client (in-cluster, or `KUBECONFIG`); without one it logs and keeps retrying.
pub fn spawn(state: Arc<AppState>, config: StatusConfig) -> StatusHandle {
    spawn_with_client(state, config, None)
}

/// [`spawn`] with a given client (tests, or an embedding that has one already).
pub fn spawn_with_client(
    state: Arc<AppState>,
    config: StatusConfig,
    client: Option<kube::Client>,
) -> StatusHandle {
    let pod = config
        .pod_name
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| state.pod.clone());
    let boot_id = uuid::Uuid::new_v4().to_string();
    let stop = CancellationToken::new();
    let client = Arc::new(tokio::sync::OnceCell::new_with(client));
    let reporter = tokio::spawn(report_loop(
        state.clone(),
        config.clone(),
        pod.clone(),
        boot_id,
        client.clone(),
        stop.clone(),
    ));
    let follower = tokio::spawn(follow_loop(state, config, pod, client, stop.clone()));
    StatusHandle {
        stop,
        reporter,
        follower,
    }
}

type SharedClient = Arc<tokio::sync::OnceCell<kube::Client>>;

/// The client, created on first use; retried (with a warning) until it works.
async fn client(cell: &SharedClient, stop: &CancellationToken) -> Option<kube::Client> {
    let mut failures = 0;
    loop {
        match cell.get_or_try_init(kube::Client::try_default).await {
            Ok(client) => return Some(client.clone()),
            Err(e) => {
                warn!(%e, "no Kubernetes client for status reporting; retrying");
                failures += 1;
                tokio::select! {
                    () = tokio::time::sleep(retry_delay(failures, Duration::from_secs(10))) => {}
                    () = stop.cancelled() => return None,
                }
            }
        }
    }
}

fn snapshot(state: &AppState) -> Snapshot {
    let draining = state.is_draining();
    Snapshot {
        connections: state.hub.len() as i64,
        ready: !draining && state.router.ready(),
        draining,
    }
}

async fn report_loop(
    state: Arc<AppState>,
    config: StatusConfig,
    pod: String,
    boot_id: String,
    cell: SharedClient,
    stop: CancellationToken,
) {
    let Some(client) = client(&cell, &stop).await else {
        return;
    };
    let api: Api<ConnectionPool> = Api::namespaced(client, &config.namespace);
    let params = PatchParams::apply(&field_manager(&pod)).force();
    let interval = Duration::from_secs(config.report_interval_seconds);
    let mut last: Option<(Instant, Snapshot)> = None;
    let mut failures = 0u32;
    let mut retry_at = Instant::now();
    let mut jitter = 1.0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(pool = %config.pool, %pod, %boot_id, "status reporting started");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let current = snapshot(&state);
        let due = next_report(last, current, interval, jitter).max(retry_at);
        if Instant::now() < due {
            continue;
        }
        let body = report_body(&config.pool, &pod, &boot_id, current, Timestamp::now());
        match api
            .patch_status(&config.pool, &params, &Patch::Apply(body))
            .await
        {
            Ok(_) => {
                debug!(
                    connections = current.connections,
                    ready = current.ready,
                    draining = current.draining,
                    "status reported"
                );
                last = Some((Instant::now(), current));
                failures = 0;
                jitter = rand::rng().random_range(0.9..1.1);
            }
            Err(e) => {
                failures += 1;
                retry_at = Instant::now() + retry_delay(failures, interval);
                warn!(%e, failures, "status report failed; retrying with the latest count");
            }
        }
    }
    // Clean shutdown: withdraw the entry so the operator does not wait for it to go stale.
    match api
        .patch_status(
            &config.pool,
            &params,
            &Patch::Apply(withdraw_body(&config.pool)),
        )
        .await
    {
        Ok(_) => info!(%pod, "status entry withdrawn"),
        Err(e) => warn!(%e, "could not withdraw the status entry; it will go stale"),
    }
}

async fn follow_loop(
    state: Arc<AppState>,
    config: StatusConfig,
    pod: String,
    cell: SharedClient,
    stop: CancellationToken,
) {
    let Some(client) = client(&cell, &stop).await else {
        return;
    };
    let api: Api<ConnectionPool> = Api::namespaced(client, &config.namespace);
    let watch = watcher::Config::default().fields(&format!("metadata.name={}", config.pool));
    let mut pools = std::pin::pin!(watcher(api, watch).default_backoff().applied_objects());
    let mut following = Following::default();
    loop {
        let next = tokio::select! {
            next = pools.next() => next,
            () = stop.cancelled() => break,
        };
        match next {
            Some(Ok(pool)) => {
                let instruction = pool
                    .status
                    .as_ref()
                    .and_then(|s| s.instructions.iter().find(|i| i.pod == pod));
                follow(&state, &mut following, instruction);
            }
            Some(Err(e)) => warn!(%e, "watching the pool for instructions"),
            None => break,
        }
    }
    if let Some(drain) = following.drain.take() {
        drain.cancel();
    }
    if let Some((_, shed)) = following.shed.take() {
        shed.cancel();
    }
}

/// Brings what the pod does in line with its current instruction.
fn follow(state: &Arc<AppState>, following: &mut Following, instruction: Option<&PodInstruction>) {
    let drain = instruction.is_some_and(|i| i.drain);
    match (&following.drain, drain) {
        (None, true) => {
            info!(
                "instructed to drain: refusing new agents, closing connections with reconnect hints"
            );
            state.draining.store(true, Ordering::Release);
            let token = CancellationToken::new();
            let (state, stop) = (state.clone(), token.clone());
            tokio::spawn(async move {
                let closed = crate::shed::drain_in_place(&state, &stop).await;
                debug!(closed, "instructed drain ended");
            });
            following.drain = Some(token);
        }
        (Some(token), false) => {
            token.cancel();
            following.drain = None;
            // A shutdown drain (SIGTERM) is final; only an instructed one is called off.
            if !state.drain_requested.is_cancelled() {
                info!("drain called off: accepting agents again");
                state.draining.store(false, Ordering::Release);
            }
        }
        _ => {}
    }
    let shed = instruction.and_then(|i| i.shed.filter(|n| *n > 0).map(|n| (i.id.clone(), n)));
    if let Some((id, count)) = shed
        && following.shed.as_ref().is_none_or(|(last, _)| *last != id)
    {
        if let Some((_, previous)) = following.shed.take() {
            previous.cancel();
        }
        info!(count, %id, "instructed to shed connections");
        let token = CancellationToken::new();
        let (state, stop) = (state.clone(), token.clone());
        tokio::spawn(async move {
            let closed = crate::shed::shed(&state, count as usize, &stop).await;
            debug!(closed, "shed finished");
        });
        following.shed = Some((id, token));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(10);

    fn snap(connections: i64) -> Snapshot {
        Snapshot {
            connections,
            ready: true,
            draining: false,
        }
    }

    #[test]
    fn first_report_is_due_at_once() {
        let before = Instant::now();
        assert!(next_report(None, snap(0), I, 1.0) <= Instant::now().max(before));
    }

    #[test]
    fn a_count_change_waits_one_interval_and_no_change_two() {
        let at = Instant::now();
        assert_eq!(
            next_report(Some((at, snap(100))), snap(150), I, 1.0),
            at + I
        );
        assert_eq!(
            next_report(Some((at, snap(100))), snap(100), I, 1.0),
            at + 2 * I
        );
        // Below 1 %: noise, not worth a write.
        assert_eq!(
            next_report(Some((at, snap(10_000))), snap(10_050), I, 1.0),
            at + 2 * I
        );
        // Any change counts on a small pod.
        assert_eq!(next_report(Some((at, snap(3))), snap(2), I, 1.0), at + I);
    }

    #[test]
    fn readiness_and_draining_flips_are_reported_quickly() {
        let at = Instant::now();
        let draining = Snapshot {
            connections: 5,
            ready: false,
            draining: true,
        };
        assert_eq!(
            next_report(Some((at, snap(5))), draining, I, 1.0),
            at + Duration::from_millis(250)
        );
    }

    #[test]
    fn jitter_stretches_the_interval_within_bounds() {
        let at = Instant::now();
        assert_eq!(
            next_report(Some((at, snap(1))), snap(50), I, 1.1),
            at + I.mul_f64(1.1)
        );
        assert_eq!(
            next_report(Some((at, snap(1))), snap(50), I, 9.0),
            at + I.mul_f64(1.5)
        );
    }

    #[test]
    fn retries_back_off_up_to_the_interval() {
        assert_eq!(retry_delay(1, I), Duration::from_millis(500));
        assert_eq!(retry_delay(3, I), Duration::from_secs(2));
        assert_eq!(retry_delay(30, I), I);
    }

    #[test]
    fn the_body_names_only_this_pods_entry() {
        let body = report_body("p", "p-1", "boot", snap(7), Timestamp::UNIX_EPOCH);
        assert_eq!(body["metadata"], json!({"name": "p"}));
        assert_eq!(
            body["status"]["pods"],
            json!([{"name": "p-1", "connections": 7, "ready": true, "draining": false,
                    "observedAt": "1970-01-01T00:00:00Z", "bootId": "boot"}])
        );
        assert!(withdraw_body("p").get("status").is_none());
        assert_eq!(field_manager("p-1"), "tether-gateway-p-1");
    }
}

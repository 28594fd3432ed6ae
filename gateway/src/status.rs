//! The pod's side of the autoscaling loop: it reports its connection count into its
//! pool's `status.pods[]` and follows the operator's instructions, which arrive on the
//! annotation `tether.dev/instruction` of its own Pod object.
//!
//! ```text
//!   hub.len(), refused, ready, draining, bus connected, instruction id
//!        ──(every 100 ms: due? pure `next_report`)──► SSA /status of the pool
//!        status.pods[{name, connections, refused, ready, draining, busConnected, instruction, observedAt, bootId,
//!                     pendingMessages (the pool's durable backlog, with a durable queue)}]
//!        field manager `tether-gateway-<pod>`: pods never overwrite each other
//!   watch own Pod (fieldSelector metadata.name=<pod>) ──► annotation changed?
//!        drain ──► shed::drain_in_place (unready, stays up)   gone ──► drain called off
//!        shed N (new id) ──► shed::shed(N)
//!        admissionClosedUntil T ──► unready, upgrades refused (503) until T (renewed by
//!                                   the operator; absent: open)
//! ```
//!
//! Why the Pod and not the pool: every pod writes the pool (its report), so a pod
//! watching the pool would receive every other pod's report — watch traffic growing
//! with the square of the pool's size. Its own Pod changes only when the kubelet or the
//! operator touches it, and only that pod reads it. (A downward-API file would need no
//! API access at all, but the kubelet refreshes it only on its sync period, up to a
//! minute or more: too slow for a drain.) The operator needs no network path to every
//! pod, the instruction survives an operator failover, and a container restarted in the
//! same Pod sees it again. Each report echoes the id of the instruction the pod acts on,
//! so the operator completes a drain only on a report made while draining for it.
//!
//! Reporting runs on its own task and only reads counters, so API errors or a slow API
//! server never hold a connection up; a failed report is retried with back-off, and each
//! attempt sends the count of that moment, never a queued old one.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use rand::Rng;
use serde_json::json;
use tether_config::StatusConfig;
use tether_crds::{ConnectionPool, INSTRUCTION_ANNOTATION, PodInstruction};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::state::AppState;

/// What a pod reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Open agent connections.
    pub connections: i64,
    /// Agents refused because the pod was full, since the previous report.
    pub refused: i64,
    /// Accepting new agents.
    pub ready: bool,
    /// Draining (instructed or for shutdown).
    pub draining: bool,
    /// Connected to the message bus (`None`: the pod has none). Not part of `ready`:
    /// the operator turns it into the pool's `BusAvailable` condition.
    pub bus_connected: Option<bool>,
    /// Id of the instruction the pod acts on (or acted on last).
    pub instruction: Option<String>,
}

/// When a change of the connection count is worth a report before the heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Significance {
    /// Percent of the last reported count.
    pub percent: u64,
    /// Connections; the smaller of the two thresholds applies.
    pub connections: u64,
}

impl Significance {
    /// The thresholds of a status configuration.
    pub fn of(config: &StatusConfig) -> Self {
        Self {
            percent: config.change_percent,
            connections: config.change_connections,
        }
    }

    fn threshold(&self, last: i64) -> i64 {
        let by_percent = last.unsigned_abs().saturating_mul(self.percent) / 100;
        by_percent.min(self.connections).max(1) as i64
    }
}

/// When the next report is due, given the last one that reached the API server.
///
/// - nothing sent yet: now;
/// - `ready`, `draining`, the bus connection or the instruction changed, or agents were
///   refused for want of room: 250 ms after the last report (the operator waits on these to finish a drain
///   or to scale up a full pool);
/// - the count moved by a significant amount ([`Significance`]): one interval after the
///   last report, so a pod writes at most once per interval for counts;
/// - otherwise: two intervals after the last report, a heartbeat that keeps the entry
///   fresh (the operator ignores entries unchanged for three intervals).
///
/// `jitter` (e.g. 0.9..1.1) stretches the interval so pods that started together do not
/// write together.
pub fn next_report(
    last: Option<(Instant, &Snapshot)>,
    current: &Snapshot,
    significance: Significance,
    interval: Duration,
    jitter: f64,
) -> Instant {
    let Some((at, sent)) = last else {
        return Instant::now();
    };
    let interval = interval.mul_f64(jitter.clamp(0.5, 1.5));
    if sent.ready != current.ready
        || sent.draining != current.draining
        || sent.bus_connected != current.bus_connected
        || sent.instruction != current.instruction
        || (current.refused > 0 && sent.refused == 0)
    {
        return at + Duration::from_millis(250).min(interval);
    }
    let threshold = significance.threshold(sent.connections);
    if (current.connections - sent.connections).abs() >= threshold || current.refused > 0 {
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
    snap: &Snapshot,
    now: Timestamp,
) -> serde_json::Value {
    let mut entry = json!({
        "name": pod,
        "connections": snap.connections,
        "ready": snap.ready,
        "draining": snap.draining,
        "observedAt": now.to_string(),
        "bootId": boot_id,
    });
    if snap.refused > 0 {
        entry["refused"] = json!(snap.refused);
    }
    if let Some(id) = &snap.instruction {
        entry["instruction"] = json!(id);
    }
    if let Some(connected) = snap.bus_connected {
        entry["busConnected"] = json!(connected);
    }
    json!({
        "apiVersion": format!("{}/{}", tether_crds::GROUP, tether_crds::VERSION),
        "kind": "ConnectionPool",
        "metadata": {"name": pool},
        "status": {"pods": [entry]},
    })
}

/// Adds the pool's durable backlog (messages pending across its agents, as this pod
/// read it from the stream) to this pod's entry of a report body.
pub fn with_pending_messages(body: &mut serde_json::Value, pending: u64) {
    body["status"]["pods"][0]["pendingMessages"] = json!(pending);
}

/// The instruction carried by a Pod's annotation; `None` when absent or unreadable (an
/// unreadable one is logged: only the operator writes it).
pub fn instruction_of(pod: &Pod) -> Option<PodInstruction> {
    let raw = pod
        .metadata
        .annotations
        .as_ref()?
        .get(INSTRUCTION_ANNOTATION)?;
    match serde_json::from_str(raw) {
        Ok(instruction) => Some(instruction),
        Err(e) => {
            warn!(%e, "unreadable instruction annotation; ignored");
            None
        }
    }
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
    /// The id of the instruction acted on last, shared with the reporter.
    acting_on: Arc<Mutex<Option<String>>>,
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
    let acting_on = Arc::new(Mutex::new(None));
    let reporter = tokio::spawn(report_loop(
        Reporter {
            state: state.clone(),
            config: config.clone(),
            pod: pod.clone(),
            boot_id,
            acting_on: acting_on.clone(),
        },
        client.clone(),
        stop.clone(),
    ));
    let follower = tokio::spawn(follow_loop(
        state,
        config,
        pod,
        acting_on,
        client,
        stop.clone(),
    ));
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

/// What the report loop reads from.
struct Reporter {
    state: Arc<AppState>,
    config: StatusConfig,
    pod: String,
    boot_id: String,
    acting_on: Arc<Mutex<Option<String>>>,
}

impl Reporter {
    /// The pod now; `refused_base` is the refusal count at the last report.
    fn snapshot(&self, refused_base: u64) -> Snapshot {
        let state = &self.state;
        let draining = state.is_draining();
        Snapshot {
            connections: state.hub.len() as i64,
            refused: state
                .refused_full
                .load(Ordering::Relaxed)
                .saturating_sub(refused_base) as i64,
            ready: state.admits_newcomers(),
            draining,
            bus_connected: state.router.bus_connected(),
            instruction: self
                .acting_on
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

async fn report_loop(reporter: Reporter, cell: SharedClient, stop: CancellationToken) {
    let Some(client) = client(&cell, &stop).await else {
        return;
    };
    let Reporter {
        config,
        pod,
        boot_id,
        ..
    } = &reporter;
    let api: Api<ConnectionPool> = Api::namespaced(client, &config.namespace);
    let params = PatchParams::apply(&field_manager(pod)).force();
    let interval = Duration::from_secs(config.report_interval_seconds);
    let significance = Significance::of(config);
    let mut last: Option<(Instant, Snapshot)> = None;
    let mut refused_base = 0u64;
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
        let refused_now = reporter.state.refused_full.load(Ordering::Relaxed);
        let current = reporter.snapshot(refused_base);
        let due = next_report(
            last.as_ref().map(|(at, s)| (*at, s)),
            &current,
            significance,
            interval,
            jitter,
        )
        .max(retry_at);
        if Instant::now() < due {
            continue;
        }
        let mut body = report_body(&config.pool, pod, boot_id, &current, Timestamp::now());
        // Read when a report is made, not on every tick, and never a reason to report:
        // the backlog rides on the reports connections cause (and the heartbeat).
        if let Some(pending) = reporter.state.router.durable_backlog().await {
            with_pending_messages(&mut body, pending);
        }
        match api
            .patch_status(&config.pool, &params, &Patch::Apply(body))
            .await
        {
            Ok(_) => {
                debug!(
                    connections = current.connections,
                    refused = current.refused,
                    ready = current.ready,
                    draining = current.draining,
                    instruction = ?current.instruction,
                    "status reported"
                );
                last = Some((Instant::now(), current));
                // Refusals are counted from here on for the next report.
                refused_base = refused_now;
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
    acting_on: Arc<Mutex<Option<String>>>,
    cell: SharedClient,
    stop: CancellationToken,
) {
    let Some(client) = client(&cell, &stop).await else {
        return;
    };
    // This pod's own Pod object, and nothing else.
    let api: Api<Pod> = Api::namespaced(client, &config.namespace);
    let watch = watcher::Config::default().fields(&format!("metadata.name={pod}"));
    let mut pods = std::pin::pin!(watcher(api, watch).default_backoff().applied_objects());
    let mut following = Following {
        acting_on,
        ..Default::default()
    };
    loop {
        let next = tokio::select! {
            next = pods.next() => next,
            () = stop.cancelled() => break,
        };
        match next {
            Some(Ok(object)) => {
                let instruction = instruction_of(&object).filter(|i| i.pod == pod);
                follow(&state, &mut following, instruction.as_ref());
            }
            Some(Err(e)) => warn!(%e, "watching this pod for instructions"),
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
    if let Some(i) = instruction {
        // Reports from now on say which instruction the pod acts on.
        *following
            .acting_on
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(i.id.clone());
    }
    // Admission closed for a rebalancing episode, until the instruction's time (renewed
    // by the operator while the episode lasts); no instruction, or none with a time:
    // open. Read on every change of the annotation, whatever its id.
    let closed_until = instruction
        .and_then(|i| i.admission_closed_until.as_ref())
        .map_or(0, |t| t.0.as_millisecond());
    let was = state
        .admission_closed_until_ms
        .swap(closed_until, Ordering::AcqRel);
    if (was > 0) != (closed_until > 0) {
        info!(
            closed = closed_until > 0,
            "admission {} for rebalancing",
            if closed_until > 0 {
                "closed"
            } else {
                "reopened"
            }
        );
    }
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
    const SIG: Significance = Significance {
        percent: 5,
        connections: 100,
    };

    fn snap(connections: i64) -> Snapshot {
        Snapshot {
            connections,
            refused: 0,
            ready: true,
            draining: false,
            bus_connected: None,
            instruction: None,
        }
    }

    fn next(sent: i64, now: &Snapshot, at: Instant) -> Instant {
        next_report(Some((at, &snap(sent))), now, SIG, I, 1.0)
    }

    #[test]
    fn first_report_is_due_at_once() {
        let before = Instant::now();
        assert!(next_report(None, &snap(0), SIG, I, 1.0) <= Instant::now().max(before));
    }

    #[test]
    fn a_significant_change_waits_one_interval_and_anything_else_two() {
        let at = Instant::now();
        assert_eq!(next(100, &snap(150), at), at + I);
        assert_eq!(next(100, &snap(100), at), at + 2 * I);
        // Below 5 %: noise, not worth a write before the heartbeat.
        assert_eq!(next(1_000, &snap(1_040), at), at + 2 * I);
        assert_eq!(next(1_000, &snap(1_050), at), at + I);
        // On a big pod 100 connections are enough, though far below 5 %.
        assert_eq!(next(100_000, &snap(100_099), at), at + 2 * I);
        assert_eq!(next(100_000, &snap(100_100), at), at + I);
        // Any change counts on a small pod.
        assert_eq!(next(3, &snap(2), at), at + I);
    }

    #[test]
    fn thresholds_come_from_the_configuration() {
        let at = Instant::now();
        let coarse = Significance {
            percent: 50,
            connections: 1_000,
        };
        let moved = snap(140);
        assert_eq!(
            next_report(Some((at, &snap(100))), &moved, coarse, I, 1.0),
            at + 2 * I
        );
        assert_eq!(
            next_report(Some((at, &snap(100))), &moved, SIG, I, 1.0),
            at + I
        );
    }

    #[test]
    fn flips_instructions_and_refusals_are_reported_quickly() {
        let at = Instant::now();
        let quick = at + Duration::from_millis(250);
        let draining = Snapshot {
            connections: 5,
            ready: false,
            draining: true,
            ..snap(5)
        };
        assert_eq!(next(5, &draining, at), quick);
        let acting = Snapshot {
            instruction: Some("drain-1".into()),
            ..snap(5)
        };
        assert_eq!(next(5, &acting, at), quick);
        let full = Snapshot {
            refused: 3,
            ..snap(5)
        };
        assert_eq!(next(5, &full, at), quick);
        let bus_lost = Snapshot {
            bus_connected: Some(false),
            ..snap(5)
        };
        assert_eq!(next(5, &bus_lost, at), quick);
    }

    #[test]
    fn jitter_stretches_the_interval_within_bounds() {
        let at = Instant::now();
        let sent = snap(1);
        assert_eq!(
            next_report(Some((at, &sent)), &snap(50), SIG, I, 1.1),
            at + I.mul_f64(1.1)
        );
        assert_eq!(
            next_report(Some((at, &sent)), &snap(50), SIG, I, 9.0),
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
        let body = report_body("p", "p-1", "boot", &snap(7), Timestamp::UNIX_EPOCH);
        assert_eq!(body["metadata"], json!({"name": "p"}));
        assert_eq!(
            body["status"]["pods"],
            json!([{"name": "p-1", "connections": 7, "ready": true, "draining": false,
                    "observedAt": "1970-01-01T00:00:00Z", "bootId": "boot"}])
        );
        let acting = Snapshot {
            refused: 4,
            instruction: Some("shed-9".into()),
            ..snap(7)
        };
        let body = report_body("p", "p-1", "boot", &acting, Timestamp::UNIX_EPOCH);
        assert_eq!(body["status"]["pods"][0]["refused"], json!(4));
        assert_eq!(body["status"]["pods"][0]["instruction"], json!("shed-9"));
        // A pod with a bus says whether it reaches it; one without says nothing.
        let cut_off = Snapshot {
            bus_connected: Some(false),
            ..snap(7)
        };
        let body = report_body("p", "p-1", "boot", &cut_off, Timestamp::UNIX_EPOCH);
        assert_eq!(body["status"]["pods"][0]["busConnected"], json!(false));
        assert_eq!(body["status"]["pods"][0]["ready"], json!(true));
        let mut body = report_body("p", "p-1", "boot", &snap(7), Timestamp::UNIX_EPOCH);
        with_pending_messages(&mut body, 12);
        assert_eq!(body["status"]["pods"][0]["pendingMessages"], json!(12));
        assert_eq!(body["status"]["pods"][0]["connections"], json!(7));
        assert!(withdraw_body("p").get("status").is_none());
        assert_eq!(field_manager("p-1"), "tether-gateway-p-1");
    }

    #[test]
    fn instructions_are_read_from_the_pods_annotation() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p-0", "annotations": {
                INSTRUCTION_ANNOTATION: r#"{"pod":"p-0","id":"drain-1","drain":true}"#,
            }},
        }))
        .unwrap();
        let i = instruction_of(&pod).unwrap();
        assert_eq!((i.id.as_str(), i.drain), ("drain-1", true));
        let garbled: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p-0", "annotations": {INSTRUCTION_ANNOTATION: "{"}},
        }))
        .unwrap();
        assert!(instruction_of(&garbled).is_none());
        assert!(instruction_of(&Pod::default()).is_none());
    }
}

//! Autoscaling orchestration: turns the scaling [`Decision`](crate::scaling::Decision)
//! into StatefulSet replicas and per-pod instructions, across reconciles.
//!
//! ```text
//!  scale-up:    replicas := decision                      ──► Event ScaledUp
//!               drains of pods that are kept are called off ──► Event DrainCancelled
//!  scale-down:  instructions[pod].drain for the highest ordinals ──► Event DrainStarted
//!               ... each reconcile: drained (reported 0 while draining) or deadline passed?
//!               all done ──► replicas := decision            ──► Event ScaledDown
//!  rebalance:   size settled, every pod ready and reporting, some pod above
//!               mean × (1 + rebalanceSpreadPercent) ──► instructions[pod].shed = excess
//!               (one round at a time; next round after it had time to act and be reported)
//!  stale:       status.pods[] entries older than 3 report intervals, or of pods the
//!               StatefulSet no longer has, are ignored and pruned
//! ```
//!
//! Everything that decides is the pure [`plan`]; [`Autoscaler::step`] reads the
//! StatefulSet and remembers each pool's [`History`] (in memory, as the HPA does; a new
//! leader starts a fresh stabilization window, so a failover never causes a
//! scale-down). The plan's instructions live in the pool's status, so a drain in
//! progress survives a failover.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tether_crds::{CONDITION_SCALING, ConnectionPool, ConnectionPoolStatus, PodInstruction};
use tracing::{debug, info, warn};

use crate::resources::base_name;
use crate::scaling::{
    Decision, History, Observed, Policy, decide, is_stale, live_reports, ordinal,
};

/// Drain and rebalance settings from the spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Orchestration {
    /// How long a pod may take to drain before it is removed anyway.
    pub drain_deadline: Duration,
    /// Connections a pod closes per second when draining or shedding.
    pub close_rate: u32,
    /// Upper bound of the agents' reconnect delay.
    pub reconnect_jitter: Duration,
    /// Rebalance bound: percent above the mean; 0 turns rebalancing off.
    pub spread_percent: i32,
}

impl Orchestration {
    /// The settings of a pool spec.
    pub fn from_pool(pool: &ConnectionPool) -> Self {
        let drain = &pool.spec.drain;
        Self {
            drain_deadline: Duration::from_secs(
                u64::try_from(drain.deadline_seconds).unwrap_or(60),
            ),
            close_rate: u32::try_from(drain.connections_per_second)
                .unwrap_or(1)
                .max(1),
            reconnect_jitter: Duration::from_millis(
                u64::try_from(drain.reconnect_jitter_ms).unwrap_or(0),
            ),
            spread_percent: pool.spec.scaling.rebalance_spread_percent.max(0),
        }
    }
}

/// An Event to publish about the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleEvent {
    /// Event reason (`ScaledUp`, `DrainStarted`, ...).
    pub reason: &'static str,
    /// Human-readable note.
    pub note: String,
}

/// What one reconcile should do about the pool's size.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The StatefulSet's replicas to apply.
    pub stateful_set_replicas: i32,
    /// `status.desiredReplicas`: where the pool is heading (below the StatefulSet's size
    /// while pods drain).
    pub desired_replicas: i32,
    /// `status.totalConnections` over live reports.
    pub total_connections: i64,
    /// `status.instructions`.
    pub instructions: Vec<PodInstruction>,
    /// The Scaling condition: (in progress, reason, message).
    pub scaling: (bool, &'static str, String),
    /// Events to publish.
    pub events: Vec<ScaleEvent>,
    /// The pool's size changed in this step (`lastScaleTime`).
    pub scaled: bool,
    /// `status.pods[]` entries to remove.
    pub prune: Vec<String>,
    /// When to look again.
    pub requeue: Duration,
    /// The policy's decision behind it.
    pub decision: Decision,
    /// The size the decision was made from.
    pub decided_from: i32,
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// Plans one step. `current` is the StatefulSet's replicas (None before it exists).
pub fn plan(
    pool: &ConnectionPool,
    current: Option<i32>,
    history: &History,
    now: Timestamp,
) -> Plan {
    let name = pool.name_any();
    let policy = Policy::from_spec(&pool.spec);
    let orch = Orchestration::from_pool(pool);
    let status = pool.status.clone().unwrap_or_default();
    let n = current
        .or(status.desired_replicas)
        .unwrap_or(policy.min)
        .max(0);
    let stale_after = policy.stale_after();
    let live = live_reports(&name, &status.pods, n, stale_after, now);
    let total: i64 = live.iter().map(|l| l.connections).sum();
    let report_of = |ordinal: i32| live.iter().find(|l| l.ordinal == ordinal);
    let has_entry = |ordinal: i32| {
        status
            .pods
            .iter()
            .any(|p| crate::scaling::ordinal(&name, &p.name) == Some(ordinal))
    };
    let pod_name = |ordinal: i32| format!("{name}-{ordinal}");

    let drains: BTreeMap<i32, &PodInstruction> = status
        .instructions
        .iter()
        .filter(|i| i.drain)
        .filter_map(|i| Some((ordinal(&name, &i.pod)?, i)))
        .collect();
    // A scale-down in progress: decide from the size the pool is settling at, so the
    // decision does not waver between "remove" and "keep" while pods drain.
    let settling = status
        .desired_replicas
        .filter(|d| *d < n && drains.keys().any(|o| *o >= *d && *o < n));
    let decided_from = settling.unwrap_or(n);
    let decision = decide(
        &policy,
        &Observed {
            replicas: decided_from,
            reports: live.clone(),
        },
        history,
        now,
    );
    // While a drain is under way, the pool only goes further down once it is done (a
    // step is drained and removed before the next begins); going up calls it off.
    let wanted = match settling {
        Some(floor) => decision.replicas.max(floor),
        None => decision.replicas,
    };

    let mut events = Vec::new();
    let mut instructions: Vec<PodInstruction> = Vec::new();
    let mut scaled = false;
    let stateful_set_replicas;
    let mut scaling = (
        !matches!(
            decision.reason.as_str(),
            "Stable" | "WithinTolerance" | "NoReports"
        ),
        decision.reason.as_str(),
        decision.message.clone(),
    );

    // Drains of pods that stay are called off.
    let keep_from = wanted.min(n);
    let cancelled: Vec<String> = drains
        .iter()
        .filter(|(o, _)| **o < keep_from)
        .map(|(_, i)| i.pod.clone())
        .collect();
    if !cancelled.is_empty() {
        events.push(ScaleEvent {
            reason: "DrainCancelled",
            note: format!(
                "drain of {} called off: {}",
                cancelled.join(", "),
                decision.message
            ),
        });
    }

    if wanted >= n {
        stateful_set_replicas = wanted;
        if wanted > n {
            scaled = true;
            events.push(ScaleEvent {
                reason: "ScaledUp",
                note: format!("{n} → {wanted} pods: {}", decision.message),
            });
        }
    } else {
        // Scale-down: drain the highest ordinals first.
        let mut pending = Vec::new();
        let mut started = Vec::new();
        let mut deadline_passed = Vec::new();
        for o in wanted..n {
            let instruction = match drains.get(&o) {
                Some(existing) => (*existing).clone(),
                None => {
                    started.push(pod_name(o));
                    PodInstruction {
                        pod: pod_name(o),
                        id: format!("drain-{}", now.as_millisecond()),
                        drain: true,
                        shed: None,
                        issued_at: Some(Time(now)),
                    }
                }
            };
            let issued = instruction.issued_at.as_ref().map_or(now, |t| t.0);
            let drained = report_of(o).is_some_and(|r| r.draining && r.connections == 0);
            let expired = now.duration_since(issued) >= signed(orch.drain_deadline);
            if !drained {
                if expired {
                    deadline_passed.push(format!(
                        "{} ({} connections)",
                        pod_name(o),
                        report_of(o).map_or(0, |r| r.connections)
                    ));
                } else {
                    pending.push(format!(
                        "{} ({})",
                        pod_name(o),
                        report_of(o).map_or("not reported yet".to_string(), |r| format!(
                            "{} connections",
                            r.connections
                        ))
                    ));
                }
            }
            instructions.push(instruction);
        }
        if !started.is_empty() {
            events.push(ScaleEvent {
                reason: "DrainStarted",
                note: format!(
                    "draining {} before scaling {n} → {wanted}: {}",
                    started.join(", "),
                    decision.message
                ),
            });
        }
        if pending.is_empty() {
            stateful_set_replicas = wanted;
            scaled = true;
            let mut note = format!("{n} → {wanted} pods after draining");
            if !deadline_passed.is_empty() {
                note.push_str(&format!(
                    "; drain deadline passed for {}",
                    deadline_passed.join(", ")
                ));
            }
            events.push(ScaleEvent {
                reason: "ScaledDown",
                note,
            });
            scaling = (
                true,
                "ScaledDown",
                format!("{n} → {wanted} pods: {}", decision.message),
            );
        } else {
            stateful_set_replicas = n;
            scaling = (
                true,
                "Draining",
                format!(
                    "scaling {n} → {wanted} once drained; waiting for {}",
                    pending.join(", ")
                ),
            );
        }
    }

    // Pods beyond the new size keep their drain instruction until their entry is gone,
    // so that a pod still shutting down never turns ready again.
    for (o, i) in &drains {
        if *o >= stateful_set_replicas
            && !instructions.iter().any(|k| k.pod == i.pod)
            && has_entry(*o)
        {
            instructions.push((*i).clone());
        }
    }

    // Rebalance once the size has settled.
    let settled = wanted == n
        && instructions
            .iter()
            .all(|i| ordinal(&name, &i.pod).is_some_and(|o| o >= n));
    if settled
        && orch.spread_percent > 0
        && let Some((round, reason)) =
            rebalance(&name, &status.instructions, &live, n, &policy, &orch, now)
    {
        // A new round (not one still running) gets an Event.
        if let Some(note) = &reason {
            events.push(ScaleEvent {
                reason: "Rebalancing",
                note: note.clone(),
            });
        }
        scaling = (
            true,
            "Rebalancing",
            reason.unwrap_or_else(|| "rebalancing round in progress".into()),
        );
        instructions.extend(round);
    }
    instructions.sort_by(|a, b| a.pod.cmp(&b.pod));

    let prune = status
        .pods
        .iter()
        .filter(|p| {
            let gone = ordinal(&name, &p.name).is_none_or(|o| o >= stateful_set_replicas)
                && !instructions.iter().any(|i| i.pod == p.name);
            gone || is_stale(p, stale_after, now)
        })
        .map(|p| p.name.clone())
        .collect();

    Plan {
        stateful_set_replicas,
        desired_replicas: wanted,
        total_connections: total,
        instructions,
        scaling,
        events,
        scaled,
        prune,
        requeue: policy
            .report_interval
            .clamp(Duration::from_millis(500), Duration::from_secs(10)),
        decision,
        decided_from,
    }
}

/// One rebalancing step: the shed instructions to keep or issue, and a note when a new
/// round starts (`None` while a round is still in progress). `None` when balanced (or
/// not every pod is ready and reporting).
fn rebalance(
    name: &str,
    previous: &[PodInstruction],
    live: &[crate::scaling::Live],
    n: i32,
    policy: &Policy,
    orch: &Orchestration,
    now: Timestamp,
) -> Option<(Vec<PodInstruction>, Option<String>)> {
    let running: Vec<&PodInstruction> = previous
        .iter()
        .filter(|i| i.shed.is_some() && !i.drain)
        .collect();
    if let Some(first) = running.first() {
        // A round lasts until its pods had time to close the excess and report it.
        let most = running.iter().filter_map(|i| i.shed).max().unwrap_or(0);
        let round = Duration::from_secs_f64(most as f64 / f64::from(orch.close_rate))
            + orch.reconnect_jitter
            + policy.report_interval * 2;
        let issued = first.issued_at.as_ref().map_or(now, |t| t.0);
        if now.duration_since(issued) < signed(round) {
            return Some((running.into_iter().cloned().collect(), None));
        }
    }
    let all_reporting = live.len() == n as usize && live.iter().all(|l| l.ready && !l.draining);
    if n < 2 || !all_reporting {
        return None;
    }
    let total: i64 = live.iter().map(|l| l.connections).sum();
    let mean = total as f64 / f64::from(n);
    let bound = mean * (1.0 + f64::from(orch.spread_percent) / 100.0);
    let heavy: Vec<_> = live
        .iter()
        .filter(|l| l.connections as f64 > bound && l.connections as f64 - mean >= 2.0)
        .collect();
    if heavy.is_empty() {
        return None;
    }
    let id = format!("shed-{}", now.as_millisecond());
    let round: Vec<PodInstruction> = heavy
        .iter()
        .map(|l| PodInstruction {
            pod: format!("{name}-{}", l.ordinal),
            id: id.clone(),
            drain: false,
            shed: Some(l.connections - mean.ceil() as i64),
            issued_at: Some(Time(now)),
        })
        .collect();
    let note = format!(
        "mean {mean:.0} connections per pod, bound {bound:.0}: shedding {}",
        round
            .iter()
            .map(|i| format!("{} from {}", i.shed.unwrap_or(0), i.pod))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Some((round, Some(note)))
}

/// Writes the plan into the operator's status: desired size, total, instructions, the
/// Scaling condition (keeping its transition time while its status holds) and
/// `lastScaleTime`.
pub fn write_status(
    status: &mut ConnectionPoolStatus,
    previous: Option<&ConnectionPoolStatus>,
    plan: &Plan,
    generation: Option<i64>,
    now: Timestamp,
) {
    status.desired_replicas = Some(plan.desired_replicas);
    status.total_connections = Some(plan.total_connections);
    status.instructions = plan.instructions.clone();
    status.last_scale_time = if plan.scaled {
        Some(Time(now))
    } else {
        previous.and_then(|p| p.last_scale_time.clone())
    };
    let (active, reason, message) = &plan.scaling;
    let status_str = if *active { "True" } else { "False" };
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == CONDITION_SCALING))
        .filter(|c| c.status == status_str)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    status.conditions.retain(|c| c.type_ != CONDITION_SCALING);
    status.conditions.push(Condition {
        type_: CONDITION_SCALING.into(),
        status: status_str.into(),
        reason: (*reason).into(),
        message: message.clone(),
        observed_generation: generation,
        last_transition_time: since,
    });
}

// === impl Autoscaler ===

/// Per-pool scaling memory of this operator process.
#[derive(Debug, Default)]
pub struct Autoscaler {
    histories: Mutex<HashMap<(String, String), History>>,
}

impl Autoscaler {
    /// Reads the StatefulSet's replicas and plans one step for `pool`, recording the
    /// decision in the pool's history.
    pub async fn step(
        &self,
        client: &Client,
        pool: &ConnectionPool,
        now: Timestamp,
    ) -> Result<Plan, kube::Error> {
        let ns = pool.namespace().unwrap_or_default();
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
        let current = sets
            .get_opt(&base_name(pool))
            .await?
            .and_then(|s| s.spec.and_then(|s| s.replicas));
        let key = (ns, pool.name_any());
        let mut histories = self.histories.lock().unwrap_or_else(|e| e.into_inner());
        let history = histories.entry(key).or_default();
        let plan = plan(pool, current, history, now);
        history.record(
            &plan.decision,
            plan.decided_from,
            &Policy::from_spec(&pool.spec),
            now,
        );
        debug!(pool = %pool.name_any(), replicas = plan.stateful_set_replicas, desired = plan.desired_replicas,
               total = plan.total_connections, reason = plan.scaling.1, "autoscale step");
        Ok(plan)
    }

    /// Forgets a deleted pool.
    pub fn forget(&self, pool: &ConnectionPool) {
        let key = (pool.namespace().unwrap_or_default(), pool.name_any());
        self.histories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }
}

/// After the status was applied: publishes the plan's Events and prunes stale
/// `status.pods[]` entries. Best effort: failures are logged and retried next step.
pub async fn after_apply(client: &Client, recorder: &Recorder, pool: &ConnectionPool, plan: &Plan) {
    for event in &plan.events {
        info!(pool = %pool.name_any(), reason = event.reason, note = %event.note, "scaling");
        let published = recorder
            .publish(
                &Event {
                    type_: EventType::Normal,
                    reason: event.reason.into(),
                    note: Some(event.note.clone()),
                    action: "Scale".into(),
                    secondary: None,
                },
                &pool.object_ref(&()),
            )
            .await;
        if let Err(err) = published {
            warn!(pool = %pool.name_any(), %err, "could not publish event");
        }
    }
    if !plan.prune.is_empty() {
        prune(client, pool, &plan.prune).await;
    }
}

/// Removes the named `status.pods[]` entries with a JSON patch whose `test` operations
/// make it fail (and be retried) if the list changed since it was read.
async fn prune(client: &Client, pool: &ConnectionPool, names: &[String]) {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<ConnectionPool> = Api::namespaced(client.clone(), &ns);
    let Ok(fresh) = api.get_status(&pool.name_any()).await else {
        return;
    };
    let pods = fresh.status.map(|s| s.pods).unwrap_or_default();
    let mut ops = Vec::new();
    // Highest index first, so earlier removals do not shift later ones.
    for (i, p) in pods.iter().enumerate().rev() {
        if names.contains(&p.name) {
            ops.push(serde_json::json!({"op": "test", "path": format!("/status/pods/{i}/name"), "value": p.name}));
            ops.push(serde_json::json!({"op": "remove", "path": format!("/status/pods/{i}")}));
        }
    }
    if ops.is_empty() {
        return;
    }
    let Ok(patch) = serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(ops))
    else {
        return;
    };
    match api
        .patch_status(
            &pool.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => info!(pool = %pool.name_any(), pruned = ?names, "stale pod entries pruned"),
        Err(err) => debug!(%err, "pruning pod entries failed; retried next step"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pool as fixture_pool;
    use tether_crds::PodReport;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    /// A pool `p`: 1..=5 pods, target 100, rebalance bound 25 %, drain deadline 30 s,
    /// scale-down window 0 (scale-down decisions are immediate here; the window is the
    /// policy's business, tested in `scaling`).
    fn pool(
        reports: &[(i32, i64, bool)],
        instructions: Vec<PodInstruction>,
        desired: Option<i32>,
        at: i64,
    ) -> ConnectionPool {
        let mut p = fixture_pool("p");
        p.spec.replicas.min = 1;
        p.spec.replicas.max = 5;
        p.spec.scaling.target_connections_per_pod = 100;
        p.spec.scaling.scale_down.stabilization_seconds = 0;
        p.spec.scaling.scale_up.period_seconds = 1;
        p.spec.scaling.scale_up.max_pods_per_step = 4;
        p.spec.scaling.scale_down.max_pods_per_step = 2;
        p.spec.drain.deadline_seconds = 30;
        p.spec.report_interval_seconds = 2;
        p.status = Some(ConnectionPoolStatus {
            pods: reports
                .iter()
                .map(|(o, c, draining)| PodReport {
                    name: format!("p-{o}"),
                    connections: *c,
                    ready: !draining,
                    draining: *draining,
                    observed_at: Some(Time(t(at))),
                    boot_id: None,
                })
                .collect(),
            instructions,
            desired_replicas: desired,
            ..Default::default()
        });
        p
    }

    fn old_history() -> History {
        History {
            since: Some(t(-10_000)),
            ..History::default()
        }
    }

    #[test]
    fn scale_up_raises_the_stateful_set_at_once() {
        let p = pool(&[(0, 350, false)], vec![], Some(1), 100);
        let plan = plan(&p, Some(1), &old_history(), t(100));
        assert_eq!(
            (
                plan.stateful_set_replicas,
                plan.desired_replicas,
                plan.scaled
            ),
            (4, 4, true)
        );
        assert_eq!(plan.events[0].reason, "ScaledUp");
        assert!(plan.instructions.is_empty());
    }

    #[test]
    fn scale_down_drains_the_highest_ordinals_before_lowering_replicas() {
        let p = pool(
            &[(0, 20, false), (1, 20, false), (2, 20, false)],
            vec![],
            Some(3),
            100,
        );
        let step1 = plan(&p, Some(3), &old_history(), t(100));
        // 60 connections: one pod; at most two removed per step.
        assert_eq!(
            (step1.stateful_set_replicas, step1.desired_replicas),
            (3, 1)
        );
        let drained: Vec<_> = step1
            .instructions
            .iter()
            .map(|i| (i.pod.as_str(), i.drain))
            .collect();
        assert_eq!(drained, vec![("p-1", true), ("p-2", true)]);
        assert_eq!(step1.events[0].reason, "DrainStarted");
        assert_eq!(step1.scaling.1, "Draining");

        // p-2 is empty, p-1 still holds agents: keep waiting, same instructions.
        let p = pool(
            &[(0, 50, false), (1, 10, true), (2, 0, true)],
            step1.instructions.clone(),
            Some(1),
            105,
        );
        let step2 = plan(&p, Some(3), &old_history(), t(105));
        assert_eq!(step2.stateful_set_replicas, 3);
        assert_eq!(step2.instructions, step1.instructions);
        assert!(step2.events.is_empty());

        // Both drained: replicas go down; the instructions stay while the pods' entries do.
        let p = pool(
            &[(0, 60, false), (1, 0, true), (2, 0, true)],
            step1.instructions.clone(),
            Some(1),
            110,
        );
        let step3 = plan(&p, Some(3), &old_history(), t(110));
        assert_eq!((step3.stateful_set_replicas, step3.scaled), (1, true));
        assert_eq!(step3.events[0].reason, "ScaledDown");
        assert_eq!(step3.instructions, step1.instructions);
        assert!(
            step3.prune.is_empty(),
            "entries of pods being stopped stay until withdrawn"
        );

        // The pods withdrew their entries: instructions dropped.
        let p = pool(&[(0, 60, false)], step1.instructions.clone(), Some(1), 115);
        let step4 = plan(&p, Some(1), &old_history(), t(115));
        assert!(step4.instructions.is_empty());
        assert_eq!(step4.stateful_set_replicas, 1);
    }

    #[test]
    fn one_step_is_drained_and_removed_before_the_next_begins() {
        // 4 pods, load for 1, at most 2 removed per step: p-2 and p-3 drain first.
        let p = pool(
            &[(0, 5, false), (1, 5, false), (2, 5, false), (3, 5, false)],
            vec![],
            Some(4),
            100,
        );
        let first = plan(&p, Some(4), &old_history(), t(100));
        assert_eq!(
            (first.stateful_set_replicas, first.desired_replicas),
            (4, 2)
        );
        // Still draining: the next decision would go lower, but waits for this step.
        let p = pool(
            &[(0, 8, false), (1, 8, false), (2, 2, true), (3, 2, true)],
            first.instructions.clone(),
            Some(2),
            101,
        );
        let waiting = plan(&p, Some(4), &old_history(), t(101));
        assert_eq!(
            (waiting.stateful_set_replicas, waiting.desired_replicas),
            (4, 2)
        );
        assert_eq!(waiting.instructions, first.instructions);
    }

    #[test]
    fn a_drain_past_its_deadline_no_longer_blocks_the_scale_down() {
        let instructions = vec![PodInstruction {
            pod: "p-1".into(),
            id: "d".into(),
            drain: true,
            shed: None,
            issued_at: Some(Time(t(0))),
        }];
        let p = pool(
            &[(0, 10, false), (1, 5, true)],
            instructions.clone(),
            Some(1),
            20,
        );
        assert_eq!(
            plan(&p, Some(2), &old_history(), t(20)).stateful_set_replicas,
            2
        );
        let p = pool(&[(0, 10, false), (1, 5, true)], instructions, Some(1), 31);
        let done = plan(&p, Some(2), &old_history(), t(31));
        assert_eq!(done.stateful_set_replicas, 1);
        assert!(
            done.events[0]
                .note
                .contains("deadline passed for p-1 (5 connections)"),
            "{:?}",
            done.events
        );
    }

    #[test]
    fn a_scale_up_during_a_drain_calls_it_off() {
        let instructions = vec![PodInstruction {
            pod: "p-1".into(),
            id: "d".into(),
            drain: true,
            shed: None,
            issued_at: Some(Time(t(0))),
        }];
        let p = pool(&[(0, 190, false), (1, 150, true)], instructions, Some(1), 5);
        let plan = plan(&p, Some(2), &old_history(), t(5));
        assert!(plan.stateful_set_replicas >= 4, "{plan:?}");
        assert!(plan.instructions.is_empty(), "drain cancelled");
        let reasons: Vec<_> = plan.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, vec!["DrainCancelled", "ScaledUp"]);
    }

    #[test]
    fn rebalance_sheds_the_excess_of_heavy_pods_one_round_at_a_time() {
        // Just scaled 1 → 3: the old pod holds everything.
        let p = pool(
            &[(0, 270, false), (1, 10, false), (2, 20, false)],
            vec![],
            Some(3),
            100,
        );
        let round = plan(&p, Some(3), &old_history(), t(100));
        assert_eq!(round.stateful_set_replicas, 3);
        assert_eq!(round.instructions.len(), 1);
        let shed = &round.instructions[0];
        assert_eq!(
            (shed.pod.as_str(), shed.shed, shed.drain),
            ("p-0", Some(170), false)
        );
        assert_eq!(round.scaling.1, "Rebalancing");
        assert_eq!(round.events[0].reason, "Rebalancing");

        // While the round runs, the same instruction stays and no new Event is sent.
        let p = pool(
            &[(0, 200, false), (1, 40, false), (2, 60, false)],
            round.instructions.clone(),
            Some(3),
            102,
        );
        let running = plan(&p, Some(3), &old_history(), t(102));
        assert_eq!(running.instructions, round.instructions);
        assert!(running.events.is_empty());

        // Balanced after the round: the instruction goes.
        let p = pool(
            &[(0, 110, false), (1, 90, false), (2, 100, false)],
            round.instructions.clone(),
            Some(3),
            120,
        );
        let balanced = plan(&p, Some(3), &old_history(), t(120));
        assert!(balanced.instructions.is_empty(), "{balanced:?}");
        assert_ne!(balanced.scaling.1, "Rebalancing");
    }

    #[test]
    fn stale_and_gone_entries_are_ignored_and_pruned() {
        let mut p = pool(
            &[(0, 100, false), (1, 100, false), (7, 500, false)],
            vec![],
            Some(2),
            100,
        );
        // p-1 reported 7 s ago: older than 3 × 2 s.
        p.status.as_mut().unwrap().pods[1].observed_at = Some(Time(t(93)));
        let plan = plan(&p, Some(2), &old_history(), t(100));
        assert_eq!(plan.total_connections, 100);
        assert_eq!(plan.prune, vec!["p-1".to_string(), "p-7".to_string()]);
    }

    #[test]
    fn scaling_condition_keeps_its_transition_time() {
        let p = pool(&[(0, 100, false)], vec![], Some(1), 100);
        let first = plan(&p, Some(1), &old_history(), t(100));
        let mut status = ConnectionPoolStatus::default();
        write_status(&mut status, None, &first, Some(1), t(100));
        let cond = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_SCALING)
            .unwrap()
            .clone();
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("False", "WithinTolerance")
        );
        let mut next = ConnectionPoolStatus::default();
        write_status(&mut next, Some(&status), &first, Some(1), t(200));
        let again = next
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_SCALING)
            .unwrap();
        assert_eq!(again.last_transition_time, cond.last_transition_time);
        assert_eq!(next.desired_replicas, Some(1));
    }
}

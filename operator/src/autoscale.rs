//! Autoscaling orchestration: turns the scaling [`Decision`](crate::scaling::Decision)
//! into StatefulSet replicas and per-pod instructions, across reconciles.
//!
//! ```text
//!  scale-up:    replicas := decision                      ──► Event ScaledUp
//!               drains of pods that are kept are called off ──► Event DrainCancelled
//!  scale-down:  instruction drain for the highest ordinals    ──► Event DrainStarted
//!               ... each step: drained (a report echoing the drain's id, draining, 0
//!               connections) or deadline passed?
//!               all done ──► replicas := decision            ──► Event ScaledDown
//!  rebalance:   size settled (no scale-up pending), every pod ready and reporting,
//!               the total still for the settle window, no back-off, some pod above
//!               mean × (1 + rebalanceSpreadPercent): an episode begins with a budget =
//!               the excess measured then, capped by what is left of the pool's budget
//!               window (status.rebalance, across episodes and restarts); each round
//!               is what the pods left open take up to the mean, and every other pod
//!               gets "admission closed" (unready, 503) while it lasts;
//!               the first round is a probe (firstRoundPercent of the excess), the next
//!               waits until the shed agents are back (total recovered). Not back in
//!               time ──► the episode stops (Event RebalanceStopped) and the next one
//!               backs off exponentially; budget spent ──► stops until resized/balanced.
//!  stale:       status.pods[] entries the operator has not seen change for 3 report
//!               intervals (its own clock), or of pods the StatefulSet no longer has,
//!               are ignored and pruned
//! ```
//!
//! The orchestration is one typed state machine per pool: each step ends in one
//! [`State`] — `Steady`, `ScalingUp`, `Draining`, `ScalingDown`, `Holding` (a
//! scale-down held while shed agents come back) or `Rebalancing` (an episode's
//! [`Rebalance`] phase). The size part is the pure [`transition`], whose doc lists the
//! priorities (a scale-up calls off a drain, a drain under way finishes before the pool
//! goes lower, a new scale-down waits for shed agents, rebalancing only once the size
//! settled); [`plan`] adds the rebalancing step. Why the pool is where it is, is a
//! [`Reason`], rendered in one place for the `Scaling` condition
//! ([`Plan::scaling_condition`], derived from the state), the Events and the metric.
//!
//! Everything that decides is the pure [`plan`]. [`Autoscaler`] is the memory of one
//! leadership term (each term starts a fresh one, as the HPA does: a new leader starts a
//! fresh stabilization window, so a failover never causes a scale-down): each pool's
//! [`History`], when each pod entry last changed, and which instructions were delivered.
//!
//! Instructions are delivered on the annotation [`INSTRUCTION_ANNOTATION`] of each
//! pod's own Pod object (read by that pod alone through a watch of one object), and
//! recorded in `status.instructions` so that a drain in progress survives a failover.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use tether_crds::{
    ConnectionPool, INSTRUCTION_ANNOTATION, PodInstruction, PodReport, RebalanceStatus,
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::scaling::{
    Ages, Decision, History, Live, Observed, Policy, Reason as PolicyReason, decide, is_stale,
    live_reports, ordinal,
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
    /// How long the total must have held still before an episode starts.
    pub settle_window: Duration,
    /// How far (percent of the total) it may move within that window.
    pub settle_percent: i32,
    /// The shed budget's window across episodes.
    pub budget_window: Duration,
    /// The first back-off after an episode whose shed agents did not come back.
    pub backoff: Duration,
    /// How long one admission-closed instruction holds unless renewed.
    pub admission_ttl: Duration,
    /// The share (percent) of each heavy pod's excess an episode's first round sheds.
    pub first_round_percent: i32,
}

impl Orchestration {
    /// The settings of a pool spec.
    pub fn from_pool(pool: &ConnectionPool) -> Self {
        let drain = &pool.spec.drain;
        let rebalance = &pool.spec.scaling.rebalance;
        // Small changes reach the status only with a pod's heartbeat (two report
        // intervals): a shorter settle window would see a still total that is not.
        let report = secs(pool.spec.effective_report_interval_seconds());
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
            settle_window: secs(rebalance.settle_seconds).max(report * 2),
            settle_percent: rebalance.settle_percent.clamp(0, 100),
            budget_window: secs(rebalance.budget_window_seconds),
            backoff: secs(rebalance.backoff_seconds).max(Duration::from_secs(1)),
            admission_ttl: secs(rebalance.admission_close_seconds).max(report * 3),
            first_round_percent: rebalance.first_round_percent.clamp(1, 100),
        }
    }
}

fn secs(n: i32) -> Duration {
    Duration::from_secs(u64::try_from(n).unwrap_or(0))
}

// === states, reasons, transitions ===

/// Why the pool's orchestration is where it is: the reason of the `Scaling` condition
/// and of the scaling Events, rendered in one place ([`Reason::as_str`]); nothing
/// matches the rendered text back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// More pods (the policy's reason; also an Event).
    ScaledUp,
    /// Fewer pods, after their drain (condition and Event).
    ScaledDown,
    /// The spec's bounds moved past the current size (the policy's).
    OutOfBounds,
    /// More pods are needed, but the last scale-up is too recent (the policy's).
    ScaleUpLimited,
    /// Fewer pods would do, not for the whole stabilization window yet (the policy's).
    ScaleDownStabilizing,
    /// The mean is within the tolerance of the target (the policy's).
    WithinTolerance,
    /// The recommendation equals the current size (the policy's).
    Stable,
    /// No fresh report to decide on (the policy's).
    NoReports,
    /// Pods drain before the StatefulSet shrinks (condition).
    Draining,
    /// A drain began (Event).
    DrainStarted,
    /// Drains of pods that stay were called off (Event).
    DrainCancelled,
    /// A rebalancing episode acts, waits or has stopped (condition); a round began (Event).
    Rebalancing,
    /// An episode stopped issuing rounds (Event).
    RebalanceStopped,
    /// A rollout replaces pods in batches (conditions `Scaling` and `RollingOut`).
    RollingOut,
    /// A new template revision began rolling out (Event).
    RolloutStarted,
    /// A batch of pods began draining before its replacement (Event).
    BatchStarted,
    /// Every pod runs the new revision (Event; `RollingOut` False).
    RolloutComplete,
    /// `spec.rollout.paused`: no new batch (Event and condition).
    RolloutPaused,
    /// `spec.rollout.paused` turned false on a paused rollout: batches go on (Event).
    RolloutResumed,
    /// The rollout waits for a drain or a rebalancing episode to end (condition).
    RolloutWaiting,
}

impl Reason {
    /// The CamelCase text of conditions, Events and the metric label: the one place a
    /// reason becomes a string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ScaledUp => "ScaledUp",
            Reason::ScaledDown => "ScaledDown",
            Reason::OutOfBounds => "OutOfBounds",
            Reason::ScaleUpLimited => "ScaleUpLimited",
            Reason::ScaleDownStabilizing => "ScaleDownStabilizing",
            Reason::WithinTolerance => "WithinTolerance",
            Reason::Stable => "Stable",
            Reason::NoReports => "NoReports",
            Reason::Draining => "Draining",
            Reason::DrainStarted => "DrainStarted",
            Reason::DrainCancelled => "DrainCancelled",
            Reason::Rebalancing => "Rebalancing",
            Reason::RebalanceStopped => "RebalanceStopped",
            Reason::RollingOut => "RollingOut",
            Reason::RolloutStarted => "RolloutStarted",
            Reason::BatchStarted => "BatchStarted",
            Reason::RolloutComplete => "RolloutComplete",
            Reason::RolloutPaused => "RolloutPaused",
            Reason::RolloutResumed => "RolloutResumed",
            Reason::RolloutWaiting => "RolloutWaiting",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<PolicyReason> for Reason {
    fn from(reason: PolicyReason) -> Self {
        match reason {
            PolicyReason::ScaledUp => Reason::ScaledUp,
            PolicyReason::ScaledDown => Reason::ScaledDown,
            PolicyReason::OutOfBounds => Reason::OutOfBounds,
            PolicyReason::ScaleUpLimited => Reason::ScaleUpLimited,
            PolicyReason::ScaleDownStabilizing => Reason::ScaleDownStabilizing,
            PolicyReason::WithinTolerance => Reason::WithinTolerance,
            PolicyReason::Stable => Reason::Stable,
            PolicyReason::NoReports => Reason::NoReports,
        }
    }
}

/// Where the pool's orchestration is after a step: one state at a time. Which state
/// wins when several could apply is [`transition`]'s order.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// No change of size under way and no episode acting; the policy's decision says
    /// why (within tolerance, stabilizing a scale-down, rate-limited...).
    Steady,
    /// The StatefulSet grows from `from` to `to` in this step.
    ScalingUp {
        /// Pods before.
        from: i32,
        /// Pods after.
        to: i32,
    },
    /// Pods `to..from` drain; the StatefulSet shrinks once none is pending.
    Draining {
        /// Pods now.
        from: i32,
        /// Pods once drained.
        to: i32,
        /// The pods still draining, with their connections.
        pending: Vec<String>,
    },
    /// Every drain is done (or past its deadline): the StatefulSet shrinks in this step.
    ScalingDown {
        /// Pods before.
        from: i32,
        /// Pods after.
        to: i32,
        /// Pods removed with connections left because their drain deadline passed.
        overdue: Vec<String>,
    },
    /// A scale-down held back while the agents a rebalance round shed come back: they
    /// are between pods, not gone.
    Holding {
        /// The size held.
        pods: i32,
        /// Shed agents not back yet.
        missing: i64,
    },
    /// A rebalancing episode acts, waits or has stopped (only once the size settled).
    Rebalancing(Rebalance),
    /// A new pod template replaces the pods batch by batch ([`roll_out`]).
    RollingOut(RolloutProgress),
}

/// The phase of a rebalancing episode.
#[derive(Debug, Clone, PartialEq)]
pub enum Rebalance {
    /// The pool is uneven, but its total still moves (agents arriving or leaving): no
    /// episode starts before it held still for the settle window.
    Settling(Settling),
    /// A round was issued in this step; `note` has the figures and the pods.
    Round {
        /// What the round sheds, from which pods.
        note: String,
    },
    /// The last round is still running.
    RoundRunning,
    /// The round is over and its shed agents are not all back: the next waits.
    AwaitingAgents {
        /// Agents not back yet.
        missing: i64,
    },
    /// The episode issues no more rounds until the pool is resized or balanced.
    Stopped {
        /// Why.
        why: String,
    },
}

/// The `Scaling` condition of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingCondition {
    /// Status True: something is under way.
    pub active: bool,
    /// Its reason.
    pub reason: Reason,
    /// The figures behind it.
    pub message: String,
}

/// An Event to publish about the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleEvent {
    /// Event reason.
    pub reason: Reason,
    /// Human-readable note.
    pub note: String,
}

/// A rebalancing episode: the rounds of shedding that follow one measured imbalance.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    /// Pods in the pool when it began; a resize ends it.
    pub replicas: i32,
    /// Connections over the pool when it began: shed agents count as back once the
    /// total is there again (within 1 %).
    pub total_at_start: i64,
    /// The most the whole episode may shed: the excess measured when it began.
    pub budget: i64,
    /// Connections asked to be shed so far.
    pub shed: i64,
    /// Shed agents must be back by then, or the episode stops.
    pub recover_by: Timestamp,
    /// When the episode stopped issuing rounds, and why.
    pub stopped: Option<(Timestamp, String)>,
    /// Its bound, percent above the mean: `rebalanceSpreadPercent`, or
    /// [`ROLLOUT_FILL_SPREAD_PERCENT`] for the episode that follows a rollout.
    pub spread_percent: i32,
}

/// The bound (percent above the mean, when the pool's own is wider) of the rebalancing
/// that follows a rollout. Without surge pods, the last batch comes back empty after its
/// agents moved to the other pods: a pool of `n` pods in batches of `b` ends the
/// rollout at `n / (n − b)` of the mean on the pods that took them (1.25 for 2 of 10),
/// right at the default bound, where no episode starts. That imbalance is the
/// operator's own, not noise: the episode after a rollout works to this tighter bound,
/// so the pool ends within it (shed pods go down to the mean, and the pods that
/// receive fill up to it).
pub const ROLLOUT_FILL_SPREAD_PERCENT: i32 = 10;

impl Episode {
    /// Agents shed by its rounds that have not come back yet (0 within a 1 % slack).
    fn missing(&self, total: i64) -> i64 {
        let slack = (self.total_at_start / 100).max(2);
        if total < self.total_at_start.saturating_sub(slack) {
            self.total_at_start - total
        } else {
            0
        }
    }

    /// Whether shed agents are still on their way back to the pool: the total is low
    /// by them, not because load left.
    fn awaiting_shed_agents(&self, replicas: i32, total: i64, now: Timestamp) -> bool {
        self.replicas == replicas
            && self.stopped.is_none()
            && self.shed > 0
            && self.missing(total) > 0
            && now < self.recover_by
    }
}

/// What one reconcile should do about the pool's size.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Where the orchestration is after this step.
    pub state: State,
    /// The StatefulSet's replicas to apply.
    pub stateful_set_replicas: i32,
    /// `status.desiredReplicas`: where the pool is heading (below the StatefulSet's size
    /// while pods drain).
    pub desired_replicas: i32,
    /// `status.totalConnections` over live reports.
    pub total_connections: i64,
    /// `status.instructions`.
    pub instructions: Vec<PodInstruction>,
    /// Events to publish.
    pub events: Vec<ScaleEvent>,
    /// The pool's size changed in this step (`lastScaleTime`).
    pub scaled: bool,
    /// `status.pods[]` entries to remove.
    pub prune: Vec<String>,
    /// When to look again if nothing else happens.
    pub requeue: Duration,
    /// The policy's decision behind it.
    pub decision: Decision,
    /// The size the decision was made from.
    pub decided_from: i32,
    /// The rebalancing episode after this step.
    pub episode: Option<Episode>,
    /// A rollout's progress while pods are not all at the new revision (the
    /// `RollingOut` condition), also when it waits behind another state.
    pub rollout: Option<RolloutProgress>,
    /// The rollout this term runs, after this step (the autoscaler's memory).
    pub rollout_memory: Option<Rollout>,
    /// Drained pods to delete in this step, so that the StatefulSet (`OnDelete`)
    /// recreates them at the new revision.
    pub delete: Vec<PodToDelete>,
    /// A rollout completed and no episode has rebalanced the pool to
    /// [`ROLLOUT_FILL_SPREAD_PERCENT`] yet (the autoscaler's memory).
    pub fill_after_rollout: bool,
    /// `status.rebalance`: the budget window and back-off after this step.
    pub rebalance: Option<RebalanceStatus>,
}

impl Plan {
    /// Whether the pool is changing: the Scaling condition's status, without rendering
    /// its message (the requeue of every step asks only this).
    pub fn is_active(&self) -> bool {
        match &self.state {
            State::Steady | State::ScalingUp { .. } => !self.decision.reason.at_rest(),
            State::Rebalancing(Rebalance::Stopped { .. }) => false,
            // Paused, a rollout waits for the user: nothing is under way.
            State::RollingOut(p) => !matches!(p.phase, RolloutPhase::Paused),
            State::Draining { .. }
            | State::ScalingDown { .. }
            | State::Holding { .. }
            | State::Rebalancing(_) => true,
        }
    }

    /// The `Scaling` condition: rendered from the state (and, where no orchestration is
    /// under way, the policy's decision).
    pub fn scaling_condition(&self) -> ScalingCondition {
        let decision = &self.decision;
        let (active, reason, message) = match &self.state {
            State::Steady | State::ScalingUp { .. } => (
                self.is_active(),
                decision.reason.into(),
                decision.message.clone(),
            ),
            State::Draining { from, to, pending } => (
                true,
                Reason::Draining,
                format!(
                    "scaling {from} → {to} once drained; waiting for {}",
                    pending.join(", ")
                ),
            ),
            State::ScalingDown { from, to, .. } => (
                true,
                Reason::ScaledDown,
                format!("{from} → {to} pods: {}", decision.message),
            ),
            State::Holding { pods, missing } => (
                true,
                Reason::Rebalancing,
                format!(
                    "holding {pods} pods while {missing} shed agents come back ({})",
                    decision.message
                ),
            ),
            State::Rebalancing(phase) => {
                let message = match phase {
                    Rebalance::Round { note } => note.clone(),
                    Rebalance::RoundRunning => "rebalancing round in progress".into(),
                    Rebalance::Settling(s) => match s.moved {
                        Some(moved) => format!(
                            "uneven, but the total moved by {moved} connections within {}s: rebalancing waits for arrivals to settle",
                            s.window.as_secs()
                        ),
                        None => format!(
                            "uneven; rebalancing waits until the total was watched for {}s",
                            s.window.as_secs()
                        ),
                    },
                    Rebalance::AwaitingAgents { missing } => format!(
                        "waiting for {missing} shed agents to come back before the next round"
                    ),
                    Rebalance::Stopped { why } => format!("rebalancing stopped: {why}"),
                };
                (self.is_active(), Reason::Rebalancing, message)
            }
            State::RollingOut(progress) => {
                (self.is_active(), progress.reason(), progress.message())
            }
        };
        ScalingCondition {
            active,
            reason,
            message,
        }
    }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

/// What a step sees of the pool: plain data, read once from its status.
#[derive(Debug, Clone)]
pub struct View {
    /// The pool's name (pods are `<name>-<ordinal>`).
    pub name: String,
    /// The StatefulSet's size (or where it is heading before it exists).
    pub replicas: i32,
    /// Fresh reports of pods the StatefulSet has.
    pub live: Vec<Live>,
    /// Connections over `live`.
    pub total: i64,
    /// Drain instructions in the status, by ordinal.
    pub drains: BTreeMap<i32, PodInstruction>,
    /// Ordinals that have an entry in `status.pods[]` (fresh or not).
    pub entries: Vec<i32>,
    /// A scale-down under way: the size the pool is settling at.
    pub settling: Option<i32>,
}

impl View {
    /// What `pool` (whose StatefulSet has `current` replicas) looks like to a step.
    pub fn of(pool: &ConnectionPool, current: Option<i32>, policy: &Policy, ages: &Ages) -> Self {
        let name = pool.name_any();
        let status = pool.status.clone().unwrap_or_default();
        let n = current
            .or(status.desired_replicas)
            .unwrap_or(policy.min)
            .max(0);
        let live = live_reports(&name, &status.pods, n, policy.stale_after(), ages);
        let total: i64 = live
            .iter()
            .fold(0i64, |sum, l| sum.saturating_add(l.connections));
        // A rollout's drains are its own ([`roll_out`]): not a scale-down's.
        let drains: BTreeMap<i32, PodInstruction> = status
            .instructions
            .iter()
            .filter(|i| i.drain && !is_rollout(i))
            .filter_map(|i| Some((ordinal(&name, &i.pod)?, i.clone())))
            .collect();
        // A scale-down in progress: decide from the size the pool is settling at, so the
        // decision does not waver between "remove" and "keep" while pods drain.
        let settling = status
            .desired_replicas
            .filter(|d| *d < n && drains.keys().any(|o| *o >= *d && *o < n));
        let entries = status
            .pods
            .iter()
            .filter_map(|p| ordinal(&name, &p.name))
            .collect();
        Self {
            name,
            replicas: n,
            live,
            total,
            drains,
            entries,
            settling,
        }
    }

    fn report_of(&self, ordinal: i32) -> Option<&Live> {
        self.live.iter().find(|l| l.ordinal == ordinal)
    }

    fn pod_name(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.name)
    }
}

/// The outcome of [`transition`]: the size part of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The state the size logic leaves the pool in (a rebalancing step may follow).
    pub state: State,
    /// The StatefulSet's replicas to apply.
    pub stateful_set_replicas: i32,
    /// Where the pool is heading.
    pub wanted: i32,
    /// Drain instructions to keep or issue.
    pub instructions: Vec<PodInstruction>,
    /// Events of the transition.
    pub events: Vec<ScaleEvent>,
    /// The size changes in this step.
    pub scaled: bool,
    /// When time alone changes the answer.
    pub look_again: Option<Duration>,
}

/// The size transition of one step, pure. In order of priority:
///
/// 1. **Scale-up** (the policy wants more pods than the StatefulSet has): at once; it
///    calls off the drains of pods that are kept (`DrainCancelled`).
/// 2. **A drain under way** (`view.settling`): goes on; the pool only goes further down
///    once it is done (the policy can only raise its floor, calling off drains above).
/// 3. **Holding**: no new scale-down while an episode's shed agents are coming back —
///    the dip is them, not load leaving.
/// 4. **Scale-down**: drain the highest ordinals (`DrainStarted`, state `Draining`);
///    once each is drained (a report echoing the drain's id, draining, 0 connections)
///    or past its deadline, the StatefulSet shrinks (`ScalingDown`).
/// 5. **Steady** otherwise; [`plan`] then lets a rebalancing episode act if the size
///    settled.
pub fn transition(
    view: &View,
    decision: &Decision,
    episode: Option<&Episode>,
    orch: &Orchestration,
    now: Timestamp,
) -> Transition {
    let n = view.replicas;
    let mut look_again = None;
    let mut wanted = match view.settling {
        Some(floor) => decision.replicas.max(floor),
        None => decision.replicas,
    };
    let mut held = None;
    if let Some(ep) = episode.filter(|e| e.awaiting_shed_agents(n, view.total, now))
        && wanted < n
        && view.settling.is_none()
    {
        held = Some(ep.missing(view.total));
        wanted = n;
        look_again = Some(elapsed(now, ep.recover_by));
    }

    let mut events = Vec::new();
    // Drains of pods that stay are called off.
    let keep_from = wanted.min(n);
    let cancelled: Vec<&str> = view
        .drains
        .iter()
        .filter(|(o, _)| **o < keep_from)
        .map(|(_, i)| i.pod.as_str())
        .collect();
    if !cancelled.is_empty() {
        events.push(ScaleEvent {
            reason: Reason::DrainCancelled,
            note: format!(
                "drain of {} called off: {}",
                cancelled.join(", "),
                decision.message
            ),
        });
    }

    if wanted >= n {
        let state = if wanted > n {
            events.push(ScaleEvent {
                reason: Reason::ScaledUp,
                note: format!("{n} → {wanted} pods: {}", decision.message),
            });
            State::ScalingUp {
                from: n,
                to: wanted,
            }
        } else if let Some(missing) = held {
            State::Holding { pods: n, missing }
        } else {
            State::Steady
        };
        return Transition {
            state,
            stateful_set_replicas: wanted,
            wanted,
            instructions: Vec::new(),
            events,
            scaled: wanted > n,
            look_again,
        };
    }

    // Scale-down: drain the highest ordinals first.
    let mut instructions = Vec::new();
    let mut pending = Vec::new();
    let mut started = Vec::new();
    let mut overdue = Vec::new();
    for o in wanted..n {
        let instruction = match view.drains.get(&o) {
            Some(existing) => existing.clone(),
            None => {
                started.push(view.pod_name(o));
                PodInstruction {
                    pod: view.pod_name(o),
                    id: format!("drain-{}", now.as_millisecond()),
                    drain: true,
                    shed: None,
                    issued_at: Some(Time(now)),
                    admission_closed_until: None,
                }
            }
        };
        let issued = instruction.issued_at.as_ref().map_or(now, |t| t.0);
        // Only a report made while acting on this very instruction counts: not one
        // from a cancelled drain, a shutdown drain or an earlier boot of the pod.
        let report = view.report_of(o);
        let drained = report.is_some_and(|r| {
            r.draining && r.connections == 0 && r.instruction.as_ref() == Some(&instruction.id)
        });
        let left = orch.drain_deadline.saturating_sub(elapsed(issued, now));
        if !drained {
            if left.is_zero() {
                overdue.push(format!(
                    "{} ({} connections)",
                    view.pod_name(o),
                    report.map_or(0, |r| r.connections)
                ));
            } else {
                look_again = Some(look_again.map_or(left, |r: Duration| r.min(left)));
                pending.push(format!(
                    "{} ({})",
                    view.pod_name(o),
                    report.map_or("not reported yet".to_string(), |r| format!(
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
            reason: Reason::DrainStarted,
            note: format!(
                "draining {} before scaling {n} → {wanted}: {}",
                started.join(", "),
                decision.message
            ),
        });
    }
    let (state, stateful_set_replicas) = if pending.is_empty() {
        let mut note = format!("{n} → {wanted} pods after draining");
        if !overdue.is_empty() {
            note.push_str(&format!(
                "; drain deadline passed for {}",
                overdue.join(", ")
            ));
        }
        events.push(ScaleEvent {
            reason: Reason::ScaledDown,
            note,
        });
        (
            State::ScalingDown {
                from: n,
                to: wanted,
                overdue,
            },
            wanted,
        )
    } else {
        (
            State::Draining {
                from: n,
                to: wanted,
                pending,
            },
            n,
        )
    };
    Transition {
        scaled: stateful_set_replicas != n,
        state,
        stateful_set_replicas,
        wanted,
        instructions,
        events,
        look_again,
    }
}

/// Plans one step. `current` is the StatefulSet's replicas (None before it exists);
/// `ages` says how long ago this operator saw each pod entry change. The size part is
/// [`transition`]; a rebalancing step follows once the size settled.
pub fn plan(
    pool: &ConnectionPool,
    current: Option<i32>,
    history: &History,
    ages: &Ages,
    now: Timestamp,
) -> Plan {
    plan_with(pool, current, history, ages, &RolloutView::default(), now)
}

/// [`plan`] with what a rollout needs: the pods' revisions and the rollout under way.
/// Then a [`roll_out`] step follows the size and rebalancing parts.
pub fn plan_with(
    pool: &ConnectionPool,
    current: Option<i32>,
    history: &History,
    ages: &Ages,
    rollout: &RolloutView,
    now: Timestamp,
) -> Plan {
    let policy = Policy::from_spec(&pool.spec);
    let orch = Orchestration::from_pool(pool);
    let status = pool.status.clone().unwrap_or_default();
    let stale_after = policy.stale_after();
    let view = View::of(pool, current, &policy, ages);
    let (name, n) = (view.name.as_str(), view.replicas);
    let decided_from = view.settling.unwrap_or(n);
    let decision = decide(
        &policy,
        &Observed {
            replicas: decided_from,
            reports: view.live.clone(),
        },
        history,
        now,
    );
    let Transition {
        mut state,
        stateful_set_replicas,
        wanted,
        mut instructions,
        mut events,
        scaled,
        look_again,
    } = transition(&view, &decision, history.rebalance.as_ref(), &orch, now);
    let mut requeue = look_again;

    // Pods beyond the new size keep their drain instruction until their entry is gone,
    // so that a pod still shutting down never turns ready again.
    for (o, i) in &view.drains {
        if *o >= stateful_set_replicas
            && !instructions.iter().any(|k| k.pod == i.pod)
            && view.entries.contains(o)
        {
            instructions.push(i.clone());
        }
    }

    // Rebalance once the size has settled.
    let settled = wanted == n
        && instructions
            .iter()
            .all(|i| ordinal(name, &i.pod).is_some_and(|o| o >= n));
    let mut episode = history.rebalance.clone().filter(|e| e.replicas == n);
    // Every pod must also be Ready as the kubelet sees it (the StatefulSet's
    // readyReplicas): a pod that reports itself ready is not yet in the Service's
    // endpoints until its readiness probe passed (one probe period later), and agents
    // shed before then come back to the only pods the Service has: the heavy ones.
    let in_service = status.ready_replicas.is_none_or(|ready| ready >= n);
    // No episode starts while a rollout is pending (replaced pods come back empty and
    // would look light); one already under way finishes first and the rollout waits.
    let rolling = rollout_pending(name, rollout, &status.instructions, n);
    let episode_on = episode.as_ref().is_some_and(|e| e.stopped.is_none())
        || status.instructions.iter().any(|i| i.shed.is_some());
    // A rollout that ends in this step (its memory still says it ran batches) leaves
    // the last batch empty: the next episode fills it (see ROLLOUT_FILL_SPREAD_PERCENT).
    let rollout_ended = !rolling && rollout.under_way.as_ref().is_some_and(|r| r.batches > 0);
    let mut fill_after_rollout = history.fill_after_rollout || rollout_ended;
    if fill_after_rollout && episode.as_ref().is_some_and(|e| e.stopped.is_some()) {
        // An episode stopped before the rollout measured agents that have all moved
        // since; it no longer holds the pool (a back-off in `status.rebalance` does).
        episode = None;
    }
    let mut record = status.rebalance.clone();
    if settled && orch.spread_percent > 0 && (!rolling || episode_on) {
        let step = rebalance(
            RebalanceInput {
                name,
                previous: &status.instructions,
                live: &view.live,
                n,
                in_service,
                scale_pending: decision.reason == PolicyReason::ScaleUpLimited,
                settle: settled_total(&history.totals, view.total, &orch, now),
                record: record.take(),
                episode: episode.take(),
                after_rollout: fill_after_rollout && !rolling,
            },
            &policy,
            &orch,
            now,
        );
        if !rolling
            && (step.balanced
                || step.episode.as_ref().is_some_and(|e| {
                    e.spread_percent <= ROLLOUT_FILL_SPREAD_PERCENT && e.stopped.is_none()
                }))
        {
            fill_after_rollout = false;
        }
        episode = step.episode;
        record = step.record;
        if let Some(event) = step.event {
            events.push(event);
        }
        if let Some(phase) = step.phase {
            state = State::Rebalancing(phase);
        }
        if let Some(at) = step.look_again {
            requeue = Some(requeue.map_or(at, |r: Duration| r.min(at)));
        }
        instructions.extend(step.round);
    }

    // Rollout, behind a drain under way and a rebalancing episode that acts.
    let blocked = match &state {
        State::Draining { .. } | State::ScalingDown { .. } => Some(RolloutBlocker::ScaleDownDrain),
        State::Rebalancing(phase) if !matches!(phase, Rebalance::Stopped { .. }) => {
            Some(RolloutBlocker::RebalancingEpisode)
        }
        _ => None,
    };
    let step = roll_out(
        &RolloutInput {
            name,
            spec: &pool.spec.rollout,
            view: rollout,
            previous: &status.instructions,
            live: &view.live,
            replicas: stateful_set_replicas,
            blocked,
            disruption_allowed: pool.spec.disruption.pods_allowed(stateful_set_replicas),
        },
        &orch,
        now,
    );
    if let Some(progress) = &step.progress
        && blocked.is_none()
        && matches!(state, State::Steady | State::Holding { .. })
    {
        state = State::RollingOut(progress.clone());
    }
    if let Some(at) = step.look_again {
        requeue = Some(requeue.map_or(at, |r: Duration| r.min(at)));
    }
    // One instruction per pod (the status list is keyed by pod): what the size and
    // rebalancing parts decided stays.
    let mut step = step;
    step.instructions
        .retain(|r| !instructions.iter().any(|i| i.pod == r.pod));
    instructions.extend(step.instructions);
    events.extend(step.events);
    instructions.sort_by(|a, b| a.pod.cmp(&b.pod));

    let prune = status
        .pods
        .iter()
        .filter(|p| {
            let gone = ordinal(name, &p.name).is_none_or(|o| o >= stateful_set_replicas)
                && !instructions.iter().any(|i| i.pod == p.name);
            gone || is_stale(p, ages, stale_after)
        })
        .map(|p| p.name.clone())
        .collect();

    let mut plan = Plan {
        state,
        stateful_set_replicas,
        desired_replicas: wanted,
        total_connections: view.total,
        instructions,
        events,
        scaled,
        prune,
        requeue: Duration::ZERO,
        decision,
        decided_from,
        episode,
        rollout: step.progress,
        rollout_memory: step.memory,
        delete: step.delete,
        fill_after_rollout,
        rebalance: record,
    };
    // Reports trigger the next step; time alone matters for deadlines, rounds, the
    // windows of the policy and for noticing that pods went silent.
    plan.requeue = requeue
        .unwrap_or(if plan.is_active() {
            policy.report_interval
        } else {
            stale_after
        })
        .clamp(
            Duration::from_millis(500),
            stale_after.max(Duration::from_secs(1)),
        );
    plan
}

/// What rebalancing does in one step.
#[derive(Debug, Default)]
struct RebalanceStep {
    /// Shed and admission-closed instructions to keep or issue.
    round: Vec<PodInstruction>,
    /// The episode afterwards.
    episode: Option<Episode>,
    /// The budget window and back-off afterwards (`status.rebalance`).
    record: Option<RebalanceStatus>,
    /// An Event, when a round starts or the episode stops.
    event: Option<ScaleEvent>,
    /// The episode's phase, when it has one to show (the pool's state then).
    phase: Option<Rebalance>,
    /// When time alone changes the answer.
    look_again: Option<Duration>,
    /// No episode under way, the total settled, and no pod above the bound.
    balanced: bool,
}

impl RebalanceStep {
    fn look_again_at(mut self, at: Option<Duration>) -> Self {
        if let Some(at) = at {
            self.look_again = Some(self.look_again.map_or(at, |l| l.min(at)));
        }
        self
    }
}

/// What a rebalancing step reads besides the settings.
#[derive(Debug)]
struct RebalanceInput<'a> {
    /// The pool's name.
    name: &'a str,
    /// The instructions in the status before this step.
    previous: &'a [PodInstruction],
    /// Fresh reports.
    live: &'a [Live],
    /// Pods.
    n: i32,
    /// Every pod Ready for the kubelet (in the Service's endpoints).
    in_service: bool,
    /// The policy wants more pods than the rate limit lets it add yet.
    scale_pending: bool,
    /// Whether the total held still over the settle window.
    settle: Result<(), Settling>,
    /// `status.rebalance`.
    record: Option<RebalanceStatus>,
    /// The episode of this term, if any.
    episode: Option<Episode>,
    /// A rollout completed since the last episode: a new one works to
    /// [`ROLLOUT_FILL_SPREAD_PERCENT`] (within the budget window as any episode).
    after_rollout: bool,
}

/// The total is still moving (or has not been watched for a whole window yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Settling {
    /// How far the total moved within the window (None: not watched that long yet).
    pub moved: Option<i64>,
    /// The window.
    pub window: Duration,
    /// When to look again.
    pub retry: Duration,
}

/// Whether the pool's total connections held still (within `settle_percent` of `total`)
/// over the settle window, from the totals of earlier steps (`totals`, oldest first).
/// A total seen for less than a whole window has not settled: a new leader waits one.
fn settled_total(
    totals: &std::collections::VecDeque<(Timestamp, i64)>,
    total: i64,
    orch: &Orchestration,
    now: Timestamp,
) -> Result<(), Settling> {
    let window = orch.settle_window;
    let start = now - signed(window);
    let Some(anchor) = totals.iter().rposition(|(at, _)| *at <= start) else {
        let retry = totals
            .front()
            .map_or(window, |(at, _)| window.saturating_sub(elapsed(*at, now)));
        return Err(Settling {
            moved: None,
            window,
            retry,
        });
    };
    let moved = totals
        .iter()
        .skip(anchor)
        .map(|(_, t)| t.abs_diff(total))
        .max()
        .unwrap_or(0);
    let allowed = total.unsigned_abs() * orch.settle_percent.unsigned_abs() as u64 / 100;
    if moved <= allowed {
        Ok(())
    } else {
        Err(Settling {
            moved: Some(i64::try_from(moved).unwrap_or(i64::MAX)),
            window,
            // A report interval or so: the next step sees whether it still moves.
            retry: window / 4,
        })
    }
}

/// Records the total of a step, keeping one sample at or before the settle window's
/// start (the anchor [`settled_total`] compares with) and everything after it.
pub fn note_total(
    totals: &mut std::collections::VecDeque<(Timestamp, i64)>,
    now: Timestamp,
    total: i64,
    window: Duration,
) {
    totals.push_back((now, total));
    let start = now - signed(window);
    while totals.len() > 1 && totals[1].0 <= start {
        totals.pop_front();
    }
    // Steps come at most one per `--scale-spacing`; bound the memory all the same.
    while totals.len() > 4096 {
        totals.pop_front();
    }
}

/// The back-off after `failures` episodes in a row whose shed agents did not come back:
/// `backoff × 2^(failures − 1)`, at most an hour.
fn backoff_after(orch: &Orchestration, failures: i32) -> Duration {
    let doublings = u32::try_from(failures.saturating_sub(1).clamp(0, 20)).unwrap_or(0);
    (orch.backoff * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// The longest rebalancing back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The admission-closed instructions of an episode's step. Closed to new agents: every
/// pod at or above the pool's mean (⌈mean⌉, the level heavy pods are shed down to,
/// which is at or below the rebalance bound), every pod shedding in this round, every
/// pod a new round leaves out of its receivers (`open`, see [`receivers`]), and, between
/// rounds, every pod closed already (a pod's count only grows while it is closed to
/// nobody but shed agents, so reopening it would only let it pass the bound). So shed
/// agents land only on pods that can take them, and a pod that fills up to the mean
/// while they arrive is closed at the next step. The lightest pod is never closed, so
/// the pool always has a pod open. Shed instructions in `shedding` get the closing time
/// too; a time is renewed once less than half of `admission_ttl` is left, and otherwise
/// kept, so a step rewrites no annotation needlessly. Returns the instructions and when
/// the first renewal is due.
#[allow(clippy::too_many_arguments)]
fn admission(
    name: &str,
    live: &[Live],
    n: i32,
    shedding: Vec<PodInstruction>,
    open: Option<&[i32]>,
    previous: &[PodInstruction],
    orch: &Orchestration,
    now: Timestamp,
) -> (Vec<PodInstruction>, Option<Duration>) {
    let total = live
        .iter()
        .fold(0i64, |sum, l| sum.saturating_add(l.connections));
    let level = (total + i64::from(n.max(1)) - 1) / i64::from(n.max(1));
    let lightest = live
        .iter()
        .filter(|l| {
            !shedding
                .iter()
                .any(|s| s.pod == format!("{name}-{}", l.ordinal))
        })
        .min_by_key(|l| (l.connections, l.ordinal))
        .map(|l| l.ordinal);
    let ttl = signed(orch.admission_ttl);
    let until_for = |pod: &str| {
        previous
            .iter()
            .find(|i| i.pod == pod)
            .and_then(|i| i.admission_closed_until.as_ref())
            .map(|t| t.0)
            .filter(|t| *t > now + signed(orch.admission_ttl / 2))
            .unwrap_or(now + ttl)
    };
    let mut out = Vec::new();
    for mut i in shedding {
        i.admission_closed_until = Some(Time(until_for(&i.pod)));
        out.push(i);
    }
    let closed_before = |pod: &str| {
        previous
            .iter()
            .any(|i| i.pod == pod && !i.drain && i.admission_closed_until.is_some())
    };
    for l in live {
        let pod = format!("{name}-{}", l.ordinal);
        let close = match open {
            Some(open) => l.connections >= level || !open.contains(&l.ordinal),
            None => l.connections >= level || closed_before(&pod),
        };
        if !close || Some(l.ordinal) == lightest || out.iter().any(|i| i.pod == pod) {
            continue;
        }
        let until = Some(Time(until_for(&pod)));
        // A pod closed already keeps its instruction (its reports echo the id).
        let instruction = match previous
            .iter()
            .find(|i| i.pod == pod && i.shed.is_none() && !i.drain)
        {
            Some(kept) => PodInstruction {
                admission_closed_until: until,
                ..kept.clone()
            },
            None => PodInstruction {
                pod,
                id: format!("close-{}", now.as_millisecond()),
                drain: false,
                shed: None,
                issued_at: Some(Time(now)),
                admission_closed_until: until,
            },
        };
        out.push(instruction);
    }
    let renew = out
        .iter()
        .filter_map(|i| i.admission_closed_until.as_ref())
        .map(|t| elapsed(now, t.0 - signed(orch.admission_ttl / 2)))
        .min();
    (out, renew)
}

/// One rebalancing step. An episode starts only once the size and the total settled and
/// no back-off holds it; its budget is the excess measured then, capped by what is left
/// of the pool's budget window (`status.rebalance`), so no sequence of episodes sheds
/// more within the window than the first one measured. Rounds run one at a time, each
/// no bigger than the pods left open take up to the mean ([`receivers`]), with every
/// other pod closed to newcomers ([`admission`]); the next
/// waits for the shed agents to come back, and an episode whose agents did not stops
/// and backs the next one off ([`backoff_after`]).
fn rebalance(
    input: RebalanceInput<'_>,
    policy: &Policy,
    orch: &Orchestration,
    now: Timestamp,
) -> RebalanceStep {
    let RebalanceInput {
        name,
        previous,
        live,
        n,
        in_service,
        scale_pending,
        settle,
        mut record,
        episode,
        after_rollout,
    } = input;
    // The bound a new episode works to; one under way keeps its own.
    let new_spread = if after_rollout {
        orch.spread_percent.min(ROLLOUT_FILL_SPREAD_PERCENT)
    } else {
        orch.spread_percent
    };
    let spread = episode.as_ref().map_or(new_spread, |e| e.spread_percent);
    let running: Vec<&PodInstruction> = previous
        .iter()
        .filter(|i| i.shed.is_some() && !i.drain)
        .collect();
    if let Some(first) = running.first() {
        // A round lasts until its pods had time to close the excess and report it.
        let most = running.iter().filter_map(|i| i.shed).max().unwrap_or(0);
        let round = Duration::from_secs_f64(most.max(0) as f64 / f64::from(orch.close_rate))
            + orch.reconnect_jitter
            + policy.report_interval * 2;
        let issued = first.issued_at.as_ref().map_or(now, |t| t.0);
        let left = round.saturating_sub(elapsed(issued, now));
        if !left.is_zero() {
            let shedding = running.into_iter().cloned().collect();
            let (round, renew) = admission(name, live, n, shedding, None, previous, orch, now);
            return RebalanceStep {
                round,
                episode,
                record,
                phase: Some(Rebalance::RoundRunning),
                look_again: Some(left),
                ..Default::default()
            }
            .look_again_at(renew);
        }
    }
    let total: i64 = live
        .iter()
        .fold(0i64, |sum, l| sum.saturating_add(l.connections));
    // A stopped episode stays stopped until the pool is resized (a new size starts
    // afresh, within the window's budget) or is balanced again: shedding more would
    // only chase agents that are away. Its pods are open again.
    if let Some(ep) = &episode
        && let Some((_, why)) = &ep.stopped
    {
        let balanced =
            live.len() == n as usize && heavy_pods(live, n, ep.spread_percent).is_empty();
        return RebalanceStep {
            phase: (!balanced).then(|| Rebalance::Stopped { why: why.clone() }),
            episode: (!balanced).then_some(episode.clone()).flatten(),
            record,
            ..Default::default()
        };
    }
    // Pods closed by this episode report themselves unready, and the kubelet takes
    // them out of the Service: readiness is asked of the pods only to begin one.
    let reporting = live.len() == n as usize && live.iter().all(|l| !l.draining);
    let may_begin = in_service && live.iter().all(|l| l.ready);
    if n < 2 || !reporting || (episode.is_none() && !may_begin) {
        let round = if episode.is_some() && n >= 2 {
            admission(name, live, n, Vec::new(), None, previous, orch, now).0
        } else {
            Vec::new()
        };
        return RebalanceStep {
            round,
            episode,
            record,
            ..Default::default()
        };
    }
    let mean = total as f64 / f64::from(n);
    let bound = mean * (1.0 + f64::from(spread) / 100.0);
    let heavy = heavy_pods(live, n, spread);
    let stop = |mut ep: Episode, mut record: Option<RebalanceStatus>, why: String, failed: bool| {
        ep.stopped = Some((now, why.clone()));
        let mut why = why;
        if failed {
            let r = record.get_or_insert(RebalanceStatus {
                window_start: Time(now),
                budget: ep.budget,
                shed: ep.shed,
                failures: 0,
                backoff_until: None,
            });
            r.failures = r.failures.saturating_add(1);
            let wait = backoff_after(orch, r.failures);
            r.backoff_until = Some(Time(now + signed(wait)));
            why.push_str(&format!(
                "; no new episode for {}s ({} in a row)",
                wait.as_secs(),
                r.failures
            ));
        }
        RebalanceStep {
            event: Some(ScaleEvent {
                reason: Reason::RebalanceStopped,
                note: why.clone(),
            }),
            phase: Some(Rebalance::Stopped { why }),
            episode: Some(ep),
            record,
            ..Default::default()
        }
    };
    let excess = |l: &Live| l.connections.saturating_sub(mean.ceil() as i64).max(0);
    let mut ep = match episode {
        Some(ep) => {
            let missing = ep.missing(total);
            if missing > 0 {
                let left = elapsed(now, ep.recover_by);
                if left.is_zero() {
                    return stop(
                        ep,
                        record,
                        format!("{missing} shed agents did not come back; not shedding more"),
                        true,
                    );
                }
                let (round, renew) =
                    admission(name, live, n, Vec::new(), None, previous, orch, now);
                return RebalanceStep {
                    round,
                    episode: Some(ep),
                    record,
                    phase: Some(Rebalance::AwaitingAgents { missing }),
                    look_again: Some(left),
                    ..Default::default()
                }
                .look_again_at(renew);
            }
            if heavy.is_empty() {
                // Balanced and the shed agents are back: the episode is over, and it
                // clears the back-off.
                if let Some(r) = &mut record {
                    r.failures = 0;
                    r.backoff_until = None;
                }
                return RebalanceStep {
                    record,
                    ..Default::default()
                };
            }
            if ep.shed >= ep.budget {
                let why = format!(
                    "{} of the {} connections of excess measured when it began were shed and the pool is still uneven",
                    ep.shed, ep.budget
                );
                return stop(ep, record, why, false);
            }
            ep
        }
        None => {
            if heavy.is_empty() {
                return RebalanceStep {
                    record,
                    balanced: settle.is_ok(),
                    ..Default::default()
                };
            }
            // More pods are coming: the new ones fill through the Service, and this
            // imbalance is not the one to measure.
            if scale_pending {
                return RebalanceStep {
                    record,
                    ..Default::default()
                };
            }
            if let Err(settling) = settle {
                return RebalanceStep {
                    record,
                    look_again: Some(settling.retry),
                    phase: Some(Rebalance::Settling(settling)),
                    ..Default::default()
                };
            }
            if let Some(until) = record
                .as_ref()
                .and_then(|r| r.backoff_until.as_ref())
                .map(|t| t.0)
                .filter(|until| *until > now)
            {
                return RebalanceStep {
                    phase: Some(Rebalance::Stopped {
                        why: format!(
                            "backing off after episodes whose shed agents did not come back, until {until}"
                        ),
                    }),
                    look_again: Some(elapsed(now, until)),
                    record,
                    ..Default::default()
                };
            }
            let measured: i64 = heavy.iter().map(|l| excess(l)).sum();
            let window_end = |r: &RebalanceStatus| r.window_start.0 + signed(orch.budget_window);
            let budget = match record.as_mut() {
                // The fill after a rollout too: the window's budget bounds every
                // episode in it, whatever imbalance started it.
                Some(r) if now < window_end(r) => {
                    let left = r.budget.saturating_sub(r.shed);
                    if left <= 0 {
                        let end = window_end(r);
                        return RebalanceStep {
                            phase: Some(Rebalance::Stopped {
                                why: format!(
                                    "the {} connections of excess measured at {} were shed; no more before {end}",
                                    r.budget, r.window_start.0
                                ),
                            }),
                            look_again: Some(elapsed(now, end)),
                            record,
                            ..Default::default()
                        };
                    }
                    measured.min(left)
                }
                _ => {
                    // A new window: its budget is the excess measured now.
                    let (failures, backoff_until) = record
                        .take()
                        .map_or((0, None), |r| (r.failures, r.backoff_until));
                    record = Some(RebalanceStatus {
                        window_start: Time(now),
                        budget: measured,
                        shed: 0,
                        failures,
                        backoff_until,
                    });
                    measured
                }
            };
            Episode {
                replicas: n,
                total_at_start: total,
                budget,
                shed: 0,
                recover_by: now,
                stopped: None,
                spread_percent: new_spread,
            }
        }
    };
    let id = format!("shed-{}", now.as_millisecond());
    let mut left = ep.budget - ep.shed;
    // The first round is a probe: a share of each pod's excess. The rest goes only once
    // those agents came back, so agents that never return cost at most that share.
    let share = if ep.shed == 0 {
        i64::from(orch.first_round_percent)
    } else {
        100
    };
    // The round is no bigger than its receivers take without passing the mean (the
    // Service spreads the shed agents evenly over the pods that admit them), and the
    // heaviest pods shed first.
    let (open, room) = receivers(live, &heavy, mean.ceil() as i64);
    left = left.min(room);
    let mut heaviest = heavy.clone();
    heaviest.sort_by_key(|l| (std::cmp::Reverse(l.connections), l.ordinal));
    let mut shedding = Vec::new();
    for l in heaviest {
        let count = (excess(l).saturating_mul(share) + 99) / 100;
        let count = count.min(left);
        if count <= 0 {
            break;
        }
        left -= count;
        shedding.push(PodInstruction {
            pod: format!("{name}-{}", l.ordinal),
            id: id.clone(),
            drain: false,
            shed: Some(count),
            issued_at: Some(Time(now)),
            admission_closed_until: None,
        });
    }
    shedding.sort_by(|a, b| a.pod.cmp(&b.pod));
    if shedding.is_empty() {
        // Only with pods missing from the reports' sum (never while a pod is heavy):
        // shedding would move the imbalance, not end it.
        let why = format!("no pod below the mean ({mean:.0}) has room for shed agents");
        return stop(ep, record, why, false);
    }
    let shed: i64 = shedding.iter().filter_map(|i| i.shed).sum();
    let most = shedding.iter().filter_map(|i| i.shed).max().unwrap_or(0);
    let round_time = Duration::from_secs_f64(most as f64 / f64::from(orch.close_rate))
        + orch.reconnect_jitter
        + policy.report_interval * 2;
    ep.shed = ep.shed.saturating_add(shed);
    ep.total_at_start = ep.total_at_start.max(total);
    if let Some(r) = &mut record {
        r.shed = r.shed.saturating_add(shed);
    }
    // Agents get the round, their reconnect delay and three report intervals to show up.
    ep.recover_by = now + signed(round_time + orch.reconnect_jitter + policy.report_interval * 3);
    let note = format!(
        "mean {mean:.0} connections per pod, bound {bound:.0}: shedding {} (episode: {} of {} shed)",
        shedding
            .iter()
            .map(|i| format!("{} from {}", i.shed.unwrap_or(0), i.pod))
            .collect::<Vec<_>>()
            .join(", "),
        ep.shed,
        ep.budget,
    );
    let (round, renew) = admission(name, live, n, shedding, Some(&open), previous, orch, now);
    RebalanceStep {
        round,
        episode: Some(ep),
        record,
        event: Some(ScaleEvent {
            reason: Reason::Rebalancing,
            note: note.clone(),
        }),
        phase: Some(Rebalance::Round { note }),
        look_again: Some(round_time),
        balanced: false,
    }
    .look_again_at(renew)
}

/// The pods a round's shed agents may land on, and how many agents they take in all.
/// The Service spreads new connections evenly over the pods that admit them, so with
/// `m` pods open each gets a share of `round / m`, and the round must fit the room of
/// the fullest of them up to `level` (⌈mean⌉, where heavy pods are shed down to: the
/// shed agents then fill the light pods no further than the heavy ones end, and the
/// bound keeps its whole margin for an uneven spread). Open the `m` roomiest of the
/// pods that are not heavy, `m` chosen for the largest round (`m × the m-th largest
/// room`, the larger `m` on a tie): a pod just below the mean is left closed rather than
/// sent a share that carries it past the bound (the 1.40 of the ramp through the
/// Service). The room is never zero while a pod is heavy: the pods' deficits to the
/// level add up to at least the heavy pods' excess. Returns the open ordinals and the
/// round's room.
fn receivers(live: &[Live], heavy: &[&Live], level: i64) -> (Vec<i32>, i64) {
    let mut candidates: Vec<(i64, i32)> = live
        .iter()
        .filter(|l| !heavy.iter().any(|h| h.ordinal == l.ordinal))
        .map(|l| (level.saturating_sub(l.connections).max(0), l.ordinal))
        .collect();
    candidates.sort_by_key(|(room, ordinal)| (std::cmp::Reverse(*room), *ordinal));
    let (mut best, mut open) = (0i64, 0usize);
    for (i, (room, _)) in candidates.iter().enumerate() {
        let m = i as i64 + 1;
        let round = room.saturating_mul(m);
        if round >= best && round > 0 {
            (best, open) = (round, i + 1);
        }
    }
    let mut open: Vec<i32> = candidates[..open].iter().map(|(_, o)| *o).collect();
    open.sort_unstable();
    (open, best)
}

/// Pods above the rebalance bound, `spread_percent` above the mean (and at least two
/// connections above the mean).
fn heavy_pods(live: &[Live], n: i32, spread_percent: i32) -> Vec<&Live> {
    let total = live
        .iter()
        .fold(0i64, |sum, l| sum.saturating_add(l.connections));
    let mean = total as f64 / f64::from(n.max(1));
    let bound = mean * (1.0 + f64::from(spread_percent) / 100.0);
    live.iter()
        .filter(|l| l.connections as f64 > bound && l.connections as f64 - mean >= 2.0)
        .collect()
}

// === rollouts ===

/// Instruction ids of a rollout's drains start with this: they are the rollout's, not
/// a scale-down's ([`View::drains`] leaves them out).
pub const ROLLOUT_ID_PREFIX: &str = "rollout-";

/// Whether `i` is a rollout's drain (not a scale-down's or a rebalancing round's).
pub fn is_rollout(i: &PodInstruction) -> bool {
    i.drain && i.id.starts_with(ROLLOUT_ID_PREFIX)
}

/// One gateway Pod as a rollout sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRevision {
    /// Its `controller-revision-hash` label: the template revision it runs.
    pub revision: Option<String>,
    /// Its Ready condition (what the Service goes by).
    pub ready: bool,
    /// It is being deleted.
    pub terminating: bool,
    /// Its `metadata.uid`: which pod of that name was listed.
    pub uid: String,
}

/// A rollout's drained pod to delete: its name, and the UID of the pod that was listed at
/// the old revision and drained. The delete carries that UID as a precondition, so a
/// successor that took the name since (the list was older than the API's state, or an
/// earlier step's delete went through) is refused by the API server (409) and kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodToDelete {
    /// `<pool>-<ordinal>`.
    pub name: String,
    /// The UID of the pod that was drained.
    pub uid: String,
}

/// The pods' revisions, read (a list of the pool's Pods) only while the StatefulSet
/// says a rollout is under way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revisions {
    /// The StatefulSet's `status.updateRevision`: the revision of its template now.
    pub update: String,
    /// The pool's Pods by ordinal.
    pub pods: BTreeMap<i32, PodRevision>,
}

/// The rollout one leadership term runs (its memory, for the Events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// The revision being rolled out.
    pub revision: String,
    /// Batches started so far (0: held by `spec.rollout.paused` before its first).
    pub batches: u32,
    /// Held by `spec.rollout.paused`, its `RolloutPaused` Event sent: the next step
    /// that finds it unpaused sends `RolloutResumed`, once.
    pub paused: bool,
}

/// What [`plan_with`] gets to roll out with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutView {
    /// The pods' revisions; `None` when the StatefulSet has every pod at its revision.
    pub revisions: Option<Revisions>,
    /// The rollout under way in this term, if any.
    pub under_way: Option<Rollout>,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutPhase {
    /// A batch began draining in this step.
    BatchStarted {
        /// The batch's number (1-based).
        number: u32,
        /// Its pods.
        pods: Vec<String>,
    },
    /// The batch drains; its pods are deleted once each is empty (or its deadline passed).
    Draining {
        /// Pods still draining.
        pending: Vec<String>,
    },
    /// The batch's pods were deleted, or some pod is not Ready: the next batch waits
    /// until every pod is back and Ready.
    Replacing {
        /// Pods deleted in this step, or not Ready yet.
        pods: Vec<String>,
    },
    /// `spec.rollout.paused`.
    Paused,
    /// Behind another state (a scale-down's drain, a rebalancing episode).
    Waiting {
        /// What it waits for.
        behind: RolloutBlocker,
    },
}

/// What a rollout's next batch waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutBlocker {
    /// A scale-down drains pods.
    ScaleDownDrain,
    /// A rebalancing episode sheds agents.
    RebalancingEpisode,
    /// Every outdated pod carries another instruction (a shed round) still under way.
    InstructionsUnderWay,
}

impl RolloutBlocker {
    /// Its words in the `RollingOut` condition's message.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleDownDrain => "a scale-down's drain",
            Self::RebalancingEpisode => "the rebalancing episode",
            Self::InstructionsUnderWay => "instructions under way",
        }
    }
}

/// A rollout's progress: the `RollingOut` condition, and the pool's state while the
/// rollout acts.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutProgress {
    /// Pods at the new revision.
    pub updated: i32,
    /// Pods in the pool.
    pub total: i32,
    /// Pods per batch.
    pub batch: i32,
    /// Where it is.
    pub phase: RolloutPhase,
}

impl RolloutProgress {
    /// The reason of the `RollingOut` (and, while it acts, `Scaling`) condition.
    pub fn reason(&self) -> Reason {
        match self.phase {
            RolloutPhase::Paused => Reason::RolloutPaused,
            RolloutPhase::Waiting { .. } => Reason::RolloutWaiting,
            _ => Reason::RollingOut,
        }
    }

    /// The condition's message, counts first (`3/10 updated`).
    pub fn message(&self) -> String {
        let counts = format!(
            "{}/{} updated, batches of {}",
            self.updated, self.total, self.batch
        );
        match &self.phase {
            RolloutPhase::BatchStarted { number, pods } => {
                format!("{counts}: batch {number} draining {}", pods.join(", "))
            }
            RolloutPhase::Draining { pending } => {
                format!("{counts}: draining {}", pending.join(", "))
            }
            RolloutPhase::Replacing { pods } => {
                format!("{counts}: waiting for {} to be Ready", pods.join(", "))
            }
            RolloutPhase::Paused => format!("{counts}: paused (spec.rollout.paused)"),
            RolloutPhase::Waiting { behind } => {
                format!("{counts}: waiting for {}", behind.as_str())
            }
        }
    }
}

/// The inputs of one [`roll_out`] step.
#[derive(Debug, Clone)]
pub struct RolloutInput<'a> {
    /// The pool's name (pods are `<name>-<ordinal>`).
    pub name: &'a str,
    /// `spec.rollout`.
    pub spec: &'a tether_crds::RolloutSpec,
    /// Revisions and memory.
    pub view: &'a RolloutView,
    /// `status.instructions` as they are.
    pub previous: &'a [PodInstruction],
    /// Fresh reports.
    pub live: &'a [Live],
    /// The StatefulSet's replicas after this step's size part.
    pub replicas: i32,
    /// Another state that must end before a new batch starts.
    pub blocked: Option<RolloutBlocker>,
    /// Pods the PodDisruptionBudget lets evictions take at once
    /// ([`tether_crds::DisruptionSpec::pods_allowed`]).
    pub disruption_allowed: i32,
}

/// What a rollout does in one step.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RolloutStep {
    /// Its drain instructions to keep or issue.
    pub instructions: Vec<PodInstruction>,
    /// Drained pods to delete now.
    pub delete: Vec<PodToDelete>,
    /// Events.
    pub events: Vec<ScaleEvent>,
    /// Progress while some pod is not at the new revision.
    pub progress: Option<RolloutProgress>,
    /// The memory afterwards.
    pub memory: Option<Rollout>,
    /// When time alone changes the answer (a drain deadline).
    pub look_again: Option<Duration>,
}

/// Whether a rollout has work left: a pod below the new revision, or a batch in flight.
fn rollout_pending(name: &str, view: &RolloutView, previous: &[PodInstruction], n: i32) -> bool {
    let outdated = view.revisions.as_ref().is_some_and(|r| {
        r.pods
            .range(0..n)
            .any(|(_, p)| p.revision.as_deref() != Some(r.update.as_str()))
    });
    outdated
        || previous
            .iter()
            .any(|i| is_rollout(i) && ordinal(name, &i.pod).is_some_and(|o| o < n))
}

/// One rollout step, pure. The StatefulSet's update strategy is `OnDelete`: pods change
/// revision only when deleted, and the operator picks which, when:
///
/// 1. **A batch in flight** (drain instructions with the [`ROLLOUT_ID_PREFIX`]): each
///    pod that is drained (a report echoing the id, draining, 0 connections) or past
///    `drain.deadlineSeconds` is deleted (the StatefulSet recreates it at the new
///    revision); the others keep draining. Paused, the drains still pending are called
///    off (their pods turn ready again at the old revision).
/// 2. **Paused**: no new batch.
/// 3. **Blocked** (a scale-down's drain, a rebalancing episode under way): no new batch.
/// 4. **Some pod missing, terminating or not Ready**: no new batch; replacements come
///    back first, so at most one batch of agents is ever between pods.
/// 5. **A new batch**: `rollout.maxUnavailable` of the pods below the new revision,
///    highest ordinals first (as the StatefulSet controller orders them), get a drain
///    instruction — the paced, jittered `reconnect` hints of a scale-down's drain.
///
/// A pod created meanwhile (a scale-up) is at the new revision from the start.
pub fn roll_out(input: &RolloutInput<'_>, orch: &Orchestration, now: Timestamp) -> RolloutStep {
    let RolloutInput {
        name,
        spec,
        view,
        previous,
        live,
        replicas: n,
        blocked,
        disruption_allowed,
    } = input.clone();
    let pod_name = |o: i32| format!("{name}-{o}");
    let in_flight: Vec<&PodInstruction> = previous.iter().filter(|i| is_rollout(i)).collect();
    let Some(revisions) = &view.revisions else {
        // Every pod is at the StatefulSet's revision: the rollout, if one ran, is over.
        let events = view
            .under_way
            .iter()
            .filter(|r| r.batches > 0)
            .map(|r| ScaleEvent {
                reason: Reason::RolloutComplete,
                note: format!(
                    "every pod runs revision {} ({} batches)",
                    r.revision, r.batches
                ),
            })
            .collect();
        return RolloutStep {
            events,
            ..Default::default()
        };
    };
    let at_update = |o: i32| {
        revisions
            .pods
            .get(&o)
            .is_some_and(|p| p.revision.as_deref() == Some(revisions.update.as_str()))
    };
    let updated = (0..n).filter(|o| at_update(*o)).count() as i32;
    let batch = spec.batch_size(n);
    let mut step = RolloutStep {
        memory: view
            .under_way
            .clone()
            .filter(|r| r.revision == revisions.update),
        ..Default::default()
    };
    let progress = |phase: RolloutPhase| RolloutProgress {
        updated,
        total: n,
        batch,
        phase,
    };

    // 1. The batch in flight.
    let mut pending = Vec::new();
    for i in &in_flight {
        let Some(o) = ordinal(name, &i.pod) else {
            continue;
        };
        if o >= n || at_update(o) {
            continue; // removed by a scale-down, or replaced already
        }
        let Some(listed) = revisions.pods.get(&o).filter(|p| !p.terminating) else {
            // Deleted by an earlier step (gone from the list, or terminating), its
            // replacement not listed yet: nothing to delete (and the UID precondition
            // would refuse a delete that reached the replacement).
            continue;
        };
        if spec.paused {
            continue; // called off: the pod turns ready again
        }
        let report = live.iter().find(|l| l.ordinal == o);
        let drained = report.is_some_and(|r| {
            r.draining && r.connections == 0 && r.instruction.as_deref() == Some(i.id.as_str())
        });
        let issued = i.issued_at.as_ref().map_or(now, |t| t.0);
        let left = orch.drain_deadline.saturating_sub(elapsed(issued, now));
        if drained || left.is_zero() {
            step.delete.push(PodToDelete {
                name: i.pod.clone(),
                uid: listed.uid.clone(),
            });
        } else {
            step.look_again = Some(step.look_again.map_or(left, |r: Duration| r.min(left)));
            pending.push(i.pod.clone());
            step.instructions.push((*i).clone());
        }
    }
    let outdated: Vec<i32> = (0..n).rev().filter(|o| !at_update(*o)).collect();
    if outdated.is_empty() && pending.is_empty() {
        // The last batch is back at the new revision.
        if let Some(r) = step.memory.take().filter(|r| r.batches > 0) {
            step.events.push(ScaleEvent {
                reason: Reason::RolloutComplete,
                note: format!(
                    "{n}/{n} pods run revision {} ({} batches)",
                    r.revision, r.batches
                ),
            });
        }
        return step;
    }
    if !pending.is_empty() {
        step.progress = Some(progress(RolloutPhase::Draining { pending }));
        return step;
    }
    if !step.delete.is_empty() {
        step.progress = Some(progress(RolloutPhase::Replacing {
            pods: step.delete.iter().map(|d| d.name.clone()).collect(),
        }));
        return step;
    }
    // 2., 3. A pause and a resume are each one Event (the memory says which was sent).
    if spec.paused {
        let memory = step.memory.get_or_insert_with(|| Rollout {
            revision: revisions.update.clone(),
            batches: 0,
            paused: false,
        });
        if !memory.paused {
            memory.paused = true;
            step.events.push(ScaleEvent {
                reason: Reason::RolloutPaused,
                note: format!(
                    "revision {} paused by spec.rollout.paused at {updated}/{n} updated",
                    revisions.update
                ),
            });
        }
        step.progress = Some(progress(RolloutPhase::Paused));
        return step;
    }
    if let Some(memory) = step.memory.as_mut().filter(|r| r.paused) {
        memory.paused = false;
        step.events.push(ScaleEvent {
            reason: Reason::RolloutResumed,
            note: format!(
                "revision {} resumed at {updated}/{n} updated",
                revisions.update
            ),
        });
    }
    if let Some(behind) = blocked {
        step.progress = Some(progress(RolloutPhase::Waiting { behind }));
        return step;
    }
    // 4. Every pod back and Ready before the next batch.
    let not_ready: Vec<String> = (0..n)
        .filter(|o| {
            revisions
                .pods
                .get(o)
                .is_none_or(|p| !p.ready || p.terminating)
        })
        .map(pod_name)
        .collect();
    if !not_ready.is_empty() {
        step.progress = Some(progress(RolloutPhase::Replacing { pods: not_ready }));
        return step;
    }
    // 5. A new batch: pods that carry another instruction (a shed round) are left for
    // later.
    let busy = |o: i32| previous.iter().any(|i| i.pod == pod_name(o));
    let chosen: Vec<i32> = outdated
        .into_iter()
        .filter(|o| !busy(*o))
        .take(batch as usize)
        .collect();
    if chosen.is_empty() {
        step.progress = Some(progress(RolloutPhase::Waiting {
            behind: RolloutBlocker::InstructionsUnderWay,
        }));
        return step;
    }
    let mut memory = step.memory.take().unwrap_or_else(|| Rollout {
        revision: revisions.update.clone(),
        batches: 0,
        paused: false,
    });
    if memory.batches == 0 {
        // The operator deletes a batch's pods itself, past the PodDisruptionBudget: a
        // batch larger than the budget is obeyed, and said so.
        let over_budget = if batch > disruption_allowed {
            format!(
                "; a batch is more than the {disruption_allowed} pods the PodDisruptionBudget allows, so evictions wait while one is out"
            )
        } else {
            String::new()
        };
        step.events.push(ScaleEvent {
            reason: Reason::RolloutStarted,
            note: format!(
                "rolling out revision {} over {n} pods in batches of {batch} ({updated} already updated){over_budget}",
                revisions.update
            ),
        });
    }
    memory.batches += 1;
    let id = format!("{ROLLOUT_ID_PREFIX}{}", now.as_millisecond());
    let pods: Vec<String> = chosen.iter().map(|o| pod_name(*o)).collect();
    step.instructions = pods
        .iter()
        .map(|pod| PodInstruction {
            pod: pod.clone(),
            id: id.clone(),
            drain: true,
            shed: None,
            issued_at: Some(Time(now)),
            admission_closed_until: None,
        })
        .collect();
    step.events.push(ScaleEvent {
        reason: Reason::BatchStarted,
        note: format!(
            "batch {}: draining {} ({updated}/{n} updated)",
            memory.batches,
            pods.join(", ")
        ),
    });
    step.progress = Some(progress(RolloutPhase::BatchStarted {
        number: memory.batches,
        pods,
    }));
    step.look_again = Some(orch.drain_deadline);
    step.memory = Some(memory);
    step
}

// === impl Autoscaler ===

/// What the autoscaler remembers about one pool during one leadership term.
#[derive(Debug, Default)]
struct PoolMemory {
    history: History,
    /// Per pod entry: a fingerprint of its content and when this process saw it change.
    seen: HashMap<String, (u64, Instant)>,
    /// Instruction delivered to each pod's annotation in this term ([`delivery`]).
    delivered: HashMap<String, String>,
    /// When the status was last written, for pacing `totalConnections` refreshes.
    last_status_write: Option<Instant>,
    /// The rollout under way in this term.
    rollout: Option<Rollout>,
}

/// Per-pool scaling memory of one leadership term. Create a new one per term: nothing
/// learnt under an earlier lease carries over.
#[derive(Debug, Default)]
pub struct Autoscaler {
    pools: Mutex<HashMap<(String, String), PoolMemory>>,
}

/// The age of an entry last changed `at`: by the watch's progress, or by the wall clock
/// less three staleness bounds when the watch fell silent (see [`Autoscaler::step`]).
fn age(now: Instant, at: Instant, progress: Instant, stale_after: Duration) -> Duration {
    let by_events = progress.saturating_duration_since(at);
    let by_clock = now
        .saturating_duration_since(at)
        .saturating_sub(stale_after * 3);
    by_events.max(by_clock)
}

fn fingerprint(report: &PodReport) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(report)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

fn key(pool: &ConnectionPool) -> (String, String) {
    (pool.namespace().unwrap_or_default(), pool.name_any())
}

impl Autoscaler {
    /// Plans one step for `pool` whose StatefulSet has `current` replicas, noting which
    /// pod entries changed since the last step and recording the decision.
    ///
    /// `progress` is when the operator's pool watch last delivered an event. Staleness
    /// is measured on the operator's clock as far as its view has progressed: an entry's
    /// age is how long before the latest event seen it last changed. A watch that
    /// stalls (a stream the server stopped feeding, an overloaded operator) therefore
    /// freezes every age instead of making every report look stale at once — which
    /// would prune healthy entries and count their pods as missing. A pod that stops
    /// reporting while others go on turns stale on time; if everything falls silent
    /// (every pod of a lone pool gone), wall-clock age takes over after three more
    /// staleness bounds.
    ///
    /// `revisions` are the pods' template revisions, read while the StatefulSet has pods
    /// below its update revision (`None` otherwise): see [`roll_out`].
    pub fn step(
        &self,
        pool: &ConnectionPool,
        current: Option<i32>,
        revisions: Option<Revisions>,
        progress: Instant,
        now: Timestamp,
    ) -> Plan {
        let span = info_span!("autoscale", pool = %pool.name_any(), replicas = current);
        let _entered = span.enter();
        let policy = Policy::from_spec(&pool.spec);
        let stale_after = policy.stale_after();
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let memory = pools.entry(key(pool)).or_default();
        let seen_now = Instant::now();
        let pods = pool
            .status
            .as_ref()
            .map(|s| s.pods.as_slice())
            .unwrap_or_default();
        memory
            .seen
            .retain(|name, _| pods.iter().any(|p| p.name == *name));
        let mut ages = Ages::new();
        for report in pods {
            let print = fingerprint(report);
            let (seen_print, at) = memory
                .seen
                .entry(report.name.clone())
                .or_insert((print, seen_now));
            if *seen_print != print {
                *seen_print = print;
                *at = seen_now;
            }
            ages.insert(
                report.name.clone(),
                age(seen_now, *at, progress, stale_after),
            );
        }
        let rollout = RolloutView {
            revisions,
            under_way: memory.rollout.clone(),
        };
        let plan = plan_with(pool, current, &memory.history, &ages, &rollout, now);
        memory.rollout = plan.rollout_memory.clone();
        memory
            .history
            .record(&plan.decision, plan.decided_from, &policy, now);
        memory.history.rebalance = plan.episode.clone();
        memory.history.fill_after_rollout = plan.fill_after_rollout;
        note_total(
            &mut memory.history.totals,
            now,
            plan.total_connections,
            Orchestration::from_pool(pool).settle_window,
        );
        debug!(
            replicas = plan.stateful_set_replicas,
            desired = plan.desired_replicas,
            total = plan.total_connections,
            state = ?plan.state,
            oldest_report = ?ages.values().max(),
            watch_silent_for = ?seen_now.saturating_duration_since(progress),
            "autoscale step"
        );
        plan
    }

    /// Whether a `totalConnections`-only refresh of the status is due (about once per
    /// report interval).
    pub fn status_refresh_due(&self, pool: &ConnectionPool) -> bool {
        let interval = Policy::from_spec(&pool.spec).report_interval;
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .get(&key(pool))
            .and_then(|m| m.last_status_write)
            .is_none_or(|at| at.elapsed() >= interval)
    }

    /// Notes that the status of `pool` was written.
    pub fn status_written(&self, pool: &ConnectionPool) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.entry(key(pool)).or_default().last_status_write = Some(Instant::now());
    }

    /// Forgets a deleted pool.
    pub fn forget(&self, pool: &ConnectionPool) {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key(pool));
    }

    /// Removes the annotation of every pod whose instruction ended (recorded in the
    /// status or delivered in this term, and not in the plan). Called *before* the status
    /// drops the instruction: a crash in between leaves the record, and the next term
    /// withdraws again — never an annotation that nobody remembers.
    pub async fn withdraw(
        &self,
        client: &Client,
        pool: &ConnectionPool,
        plan: &Plan,
    ) -> Result<(), kube::Error> {
        let recorded: Vec<String> = pool
            .status
            .as_ref()
            .map(|s| s.instructions.iter().map(|i| i.pod.clone()).collect())
            .unwrap_or_default();
        let ended: std::collections::BTreeSet<String> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let delivered = pools.get(&key(pool)).map(|m| &m.delivered);
            recorded
                .into_iter()
                .chain(delivered.into_iter().flat_map(|d| d.keys().cloned()))
                .filter(|pod| !plan.instructions.iter().any(|i| i.pod == *pod))
                .collect()
        };
        let (pods, params) = pod_api(client, pool);
        for pod in &ended {
            annotate(&pods, &params, pod, None).await?;
            debug!(%pod, "instruction withdrawn");
            self.note_delivered(pool, pod, None);
        }
        Ok(())
    }

    /// Sets the annotation of each pod whose instruction this term has not delivered
    /// yet: one merge patch of one Pod (a Pod that is gone is fine). Called *after* the
    /// status recorded the plan: a crash in between leaves the record, which the next
    /// term delivers with the same id — a pod is never told to drain twice under two ids.
    pub async fn deliver(
        &self,
        client: &Client,
        pool: &ConnectionPool,
        plan: &Plan,
    ) -> Result<(), kube::Error> {
        let pending: Vec<PodInstruction> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let delivered = pools.get(&key(pool)).map(|m| &m.delivered);
            plan.instructions
                .iter()
                .filter(|i| {
                    delivered.is_none_or(|d| d.get(&i.pod).is_none_or(|have| *have != delivery(i)))
                })
                .cloned()
                .collect()
        };
        let (pods, params) = pod_api(client, pool);
        for instruction in &pending {
            let value = serde_json::to_string(instruction).unwrap_or_default();
            annotate(&pods, &params, &instruction.pod, Some(value)).await?;
            info!(pod = %instruction.pod, id = %instruction.id, drain = instruction.drain,
                  shed = ?instruction.shed, "instruction delivered");
            self.note_delivered(pool, &instruction.pod, Some(&delivery(instruction)));
        }
        Ok(())
    }

    fn note_delivered(&self, pool: &ConnectionPool, pod: &str, id: Option<&str>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let delivered = &mut pools.entry(key(pool)).or_default().delivered;
        match id {
            Some(id) => delivered.insert(pod.to_string(), id.to_string()),
            None => delivered.remove(pod),
        };
    }
}

/// What a delivered annotation is remembered by: the id and the admission-closed time,
/// which the operator renews under the same id while an episode lasts.
fn delivery(i: &PodInstruction) -> String {
    match &i.admission_closed_until {
        Some(until) => format!("{}@{}", i.id, until.0.as_millisecond()),
        None => i.id.clone(),
    }
}

fn pod_api(client: &Client, pool: &ConnectionPool) -> (Api<Pod>, PatchParams) {
    let pods = Api::namespaced(client.clone(), &pool.namespace().unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(crate::controller::FIELD_MANAGER.into()),
        ..Default::default()
    };
    (pods, params)
}

/// Sets (or with `None` removes) the instruction annotation of one Pod. A merge patch,
/// not an apply: a Pod that is gone answers 404 instead of being created half-empty.
async fn annotate(
    pods: &Api<Pod>,
    params: &PatchParams,
    pod: &str,
    value: Option<String>,
) -> Result<(), kube::Error> {
    let body = serde_json::json!({"metadata": {"annotations": {INSTRUCTION_ANNOTATION: value}}});
    match pods.patch(pod, params, &Patch::Merge(body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// After the status was applied: publishes the plan's Events and prunes stale
/// `status.pods[]` entries. Best effort: failures are logged and retried next step.
/// Each scaling Event gets its own `scaling` span, and its note names that span's trace,
/// so `kubectl describe` leads to the trace (and the trace's attributes to the Event).
///
/// Every decision is its own Event object. kube's `Recorder` folds repeats of one
/// reason into a series that keeps the *first* note (its cache key has no note), so
/// `1 → 2` then `2 → 3` would show as `1 → 2 (x2)`: the one place a user looks to learn
/// why the pool scaled would be wrong. A fresh `Recorder` per decision has an empty
/// cache, so it creates a new Event (named `<pool>.<nanoseconds>`) every time; decisions
/// are spaced by `scale_spacing`, so this is at most one Event per pool per step.
pub async fn after_apply(client: &Client, reporter: &Reporter, pool: &ConnectionPool, plan: &Plan) {
    for event in &plan.events {
        let span = info_span!("scaling", pool = %pool.name_any(), reason = %event.reason, note = %event.note);
        async {
            info!(pool = %pool.name_any(), reason = %event.reason, note = %event.note, "scaling");
            let note = event_note(&event.note, tether_telemetry::current_trace_id().as_deref());
            let published = Recorder::new(client.clone(), reporter.clone())
                .publish(
                    &Event {
                        type_: EventType::Normal,
                        reason: event.reason.to_string(),
                        note: Some(note),
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
        .instrument(span)
        .await;
    }
    if !plan.prune.is_empty() {
        prune(client, pool, &plan.prune).await;
    }
}

/// The most an Event's note may hold (events.k8s.io/v1 rejects longer ones).
pub const EVENT_NOTE_MAX: usize = 1024;

/// An Event's note: `note`, cut at a character boundary to fit, then the trace id.
fn event_note(note: &str, trace: Option<&str>) -> String {
    let suffix = trace.map(|id| format!(" (trace {id})")).unwrap_or_default();
    let room = EVENT_NOTE_MAX - suffix.len();
    let mut text = if note.len() > room {
        let mut cut = room - '…'.len_utf8();
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &note[..cut])
    } else {
        note.to_string()
    };
    text.push_str(&suffix);
    text
}

/// Removes the named `status.pods[]` entries with a JSON patch whose `test` operations
/// make it fail (and be retried) if the list changed since it was read. The list is the
/// one the operator's cache holds: if it moved on since, the tests fail and the next
/// step tries again with a fresher copy.
async fn prune(client: &Client, pool: &ConnectionPool, names: &[String]) {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<ConnectionPool> = Api::namespaced(client.clone(), &ns);
    let pods = pool
        .status
        .as_ref()
        .map(|s| s.pods.as_slice())
        .unwrap_or_default();
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
    use tether_crds::ConnectionPoolStatus;

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
        // Whole rounds: the probe round has its own test.
        p.spec.scaling.rebalance.first_round_percent = 100;
        // A draining pod echoes the id of the drain it acts on.
        let acting_on = |pod: &str| {
            instructions
                .iter()
                .find(|i| i.pod == pod && i.drain)
                .map(|i| i.id.clone())
        };
        p.status = Some(ConnectionPoolStatus {
            pods: reports
                .iter()
                .map(|(o, c, draining)| PodReport {
                    name: format!("p-{o}"),
                    connections: *c,
                    refused: 0,
                    instruction: draining.then(|| acting_on(&format!("p-{o}"))).flatten(),
                    ready: !draining,
                    draining: *draining,
                    observed_at: Some(Time(t(at))),
                    boot_id: None,
                    pending_messages: None,
                    bus_connected: None,
                })
                .collect(),
            instructions,
            desired_replicas: desired,
            ..Default::default()
        });
        p
    }

    /// Every entry just seen changing.
    fn fresh(p: &ConnectionPool) -> Ages {
        p.status
            .iter()
            .flat_map(|s| &s.pods)
            .map(|r| (r.name.clone(), Duration::ZERO))
            .collect()
    }

    fn old_history() -> History {
        History {
            since: Some(t(-10_000)),
            ..History::default()
        }
    }

    /// A history in which the pool's total has been `total` for long before `at`.
    fn settled_at(total: i64, at: i64) -> History {
        History {
            totals: [(t(at - 1_000), total)].into(),
            ..old_history()
        }
    }

    #[test]
    fn scale_up_raises_the_stateful_set_at_once() {
        let p = pool(&[(0, 350, false)], vec![], Some(1), 100);
        let plan = plan(&p, Some(1), &old_history(), &fresh(&p), t(100));
        assert_eq!(
            (
                plan.stateful_set_replicas,
                plan.desired_replicas,
                plan.scaled
            ),
            (4, 4, true)
        );
        assert_eq!(plan.events[0].reason, Reason::ScaledUp);
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
        let step1 = plan(&p, Some(3), &old_history(), &fresh(&p), t(100));
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
        assert_eq!(step1.events[0].reason, Reason::DrainStarted);
        assert_eq!(step1.scaling_condition().reason, Reason::Draining);

        // p-2 is empty, p-1 still holds agents: keep waiting, same instructions.
        let p = pool(
            &[(0, 50, false), (1, 10, true), (2, 0, true)],
            step1.instructions.clone(),
            Some(1),
            105,
        );
        let step2 = plan(&p, Some(3), &old_history(), &fresh(&p), t(105));
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
        let step3 = plan(&p, Some(3), &old_history(), &fresh(&p), t(110));
        assert_eq!((step3.stateful_set_replicas, step3.scaled), (1, true));
        assert_eq!(step3.events[0].reason, Reason::ScaledDown);
        assert_eq!(step3.instructions, step1.instructions);
        assert!(
            step3.prune.is_empty(),
            "entries of pods being stopped stay until withdrawn"
        );

        // The pods withdrew their entries: instructions dropped.
        let p = pool(&[(0, 60, false)], step1.instructions.clone(), Some(1), 115);
        let step4 = plan(&p, Some(1), &old_history(), &fresh(&p), t(115));
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
        let first = plan(&p, Some(4), &old_history(), &fresh(&p), t(100));
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
        let waiting = plan(&p, Some(4), &old_history(), &fresh(&p), t(101));
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
            admission_closed_until: None,
        }];
        let p = pool(
            &[(0, 10, false), (1, 5, true)],
            instructions.clone(),
            Some(1),
            20,
        );
        assert_eq!(
            plan(&p, Some(2), &old_history(), &fresh(&p), t(20)).stateful_set_replicas,
            2
        );
        let p = pool(&[(0, 10, false), (1, 5, true)], instructions, Some(1), 31);
        let done = plan(&p, Some(2), &old_history(), &fresh(&p), t(31));
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
            admission_closed_until: None,
        }];
        let p = pool(&[(0, 190, false), (1, 150, true)], instructions, Some(1), 5);
        let plan = plan(&p, Some(2), &old_history(), &fresh(&p), t(5));
        assert!(plan.stateful_set_replicas >= 4, "{plan:?}");
        assert!(plan.instructions.is_empty(), "drain cancelled");
        let reasons: Vec<_> = plan.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, vec![Reason::DrainCancelled, Reason::ScaledUp]);
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
        let round = plan(&p, Some(3), &settled_at(300, 100), &fresh(&p), t(100));
        assert_eq!(round.stateful_set_replicas, 3);
        assert_eq!(round.instructions.len(), 1);
        let shed = &round.instructions[0];
        // 170 of excess, of which p-1 and p-2 take an even 80 each up to the mean.
        assert_eq!(
            (shed.pod.as_str(), shed.shed, shed.drain),
            ("p-0", Some(160), false)
        );
        assert_eq!(round.scaling_condition().reason, Reason::Rebalancing);
        assert_eq!(round.events[0].reason, Reason::Rebalancing);

        // While the round runs, the same instruction stays and no new Event is sent.
        let p = pool(
            &[(0, 200, false), (1, 40, false), (2, 60, false)],
            round.instructions.clone(),
            Some(3),
            102,
        );
        let running = plan(&p, Some(3), &settled_at(300, 100), &fresh(&p), t(102));
        assert_eq!(running.instructions, round.instructions);
        assert!(running.events.is_empty());

        // Balanced after the round: the instruction goes.
        let p = pool(
            &[(0, 110, false), (1, 90, false), (2, 100, false)],
            round.instructions.clone(),
            Some(3),
            120,
        );
        let balanced = plan(&p, Some(3), &settled_at(300, 100), &fresh(&p), t(120));
        assert!(balanced.instructions.is_empty(), "{balanced:?}");
        assert_ne!(balanced.scaling_condition().reason, Reason::Rebalancing);
    }

    #[test]
    fn rebalance_waits_until_every_pod_is_ready_for_the_kubelet() {
        // Just scaled 1 → 3; the new pods report themselves ready, but the StatefulSet
        // counts one Ready pod: the Service would send shed agents back to p-0.
        let mut p = pool(
            &[(0, 270, false), (1, 10, false), (2, 20, false)],
            vec![],
            Some(3),
            100,
        );
        p.status.as_mut().unwrap().ready_replicas = Some(1);
        let waiting = plan(&p, Some(3), &settled_at(300, 100), &fresh(&p), t(100));
        assert!(waiting.instructions.is_empty(), "{waiting:?}");
        assert!(waiting.events.is_empty(), "{waiting:?}");

        // Once the kubelet's probes passed on all three, the round starts.
        p.status.as_mut().unwrap().ready_replicas = Some(3);
        let round = plan(&p, Some(3), &settled_at(300, 100), &fresh(&p), t(101));
        assert_eq!(round.instructions.len(), 1);
        assert_eq!(round.instructions[0].shed, Some(160));
    }

    #[test]
    fn stale_and_gone_entries_are_ignored_and_pruned() {
        let p = pool(
            &[(0, 100, false), (1, 100, false), (7, 500, false)],
            vec![],
            Some(2),
            100,
        );
        // p-1's entry has not changed for 7 s on the operator's clock: older than 3 × 2 s.
        let mut ages = fresh(&p);
        ages.insert("p-1".into(), Duration::from_secs(7));
        let plan = plan(&p, Some(2), &old_history(), &ages, t(100));
        assert_eq!(plan.total_connections, 100);
        assert_eq!(plan.prune, vec!["p-1".to_string(), "p-7".to_string()]);
    }

    #[test]
    fn ages_stop_growing_while_the_watch_is_silent() {
        let bound = Duration::from_secs(6);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // The watch delivers: an entry unchanged for 10 s is 10 s old.
        assert_eq!(age(at(10), at(0), at(10), bound), Duration::from_secs(10));
        // The watch fell silent at 10 s: an entry that changed at 5 s stays 5 s old...
        assert_eq!(age(at(15), at(5), at(10), bound), Duration::from_secs(5));
        assert_eq!(age(at(22), at(5), at(10), bound), Duration::from_secs(5));
        // ...while one that had stopped long before the others is stale all the same.
        assert_eq!(age(at(22), at(1), at(10), bound), Duration::from_secs(9));
        // Silent for good (every pod gone): the wall clock takes over, three bounds late.
        assert_eq!(age(at(40), at(5), at(10), bound), Duration::from_secs(17));
    }

    #[test]
    fn only_a_report_echoing_the_drain_id_completes_it() {
        let drain = PodInstruction {
            pod: "p-1".into(),
            id: "drain-2".into(),
            drain: true,
            shed: None,
            issued_at: Some(Time(t(0))),
            admission_closed_until: None,
        };
        let mut p = pool(
            &[(0, 10, false), (1, 0, true)],
            vec![drain.clone()],
            Some(1),
            5,
        );
        // An empty, draining report left over from an earlier drain (or boot).
        p.status.as_mut().unwrap().pods[1].instruction = Some("drain-1".into());
        let waiting = plan(&p, Some(2), &old_history(), &fresh(&p), t(5));
        assert_eq!(waiting.stateful_set_replicas, 2, "{waiting:?}");
        assert_eq!(waiting.scaling_condition().reason, Reason::Draining);
        assert!(waiting.requeue <= Duration::from_secs(25));
        p.status.as_mut().unwrap().pods[1].instruction = Some("drain-2".into());
        let done = plan(&p, Some(2), &old_history(), &fresh(&p), t(6));
        assert_eq!((done.stateful_set_replicas, done.scaled), (1, true));
    }

    /// Plays rebalancing steps for a pool of three at `per_pod`, feeding each plan's
    /// episode and instructions into the next step, like the Autoscaler does.
    fn rebalance_step(per_pod: [i64; 3], previous: &Plan, at: i64) -> Plan {
        // The pool stays at three pods whatever its load: rebalancing alone is tested.
        step_with_min(per_pod, previous, at, 3)
    }

    fn step_with_min(per_pod: [i64; 3], previous: &Plan, at: i64, min: i32) -> Plan {
        let reports: Vec<_> = per_pod
            .iter()
            .enumerate()
            .map(|(o, c)| (o as i32, *c, false))
            .collect();
        let mut p = pool(&reports, previous.instructions.clone(), Some(3), at);
        p.spec.replicas.min = min;
        p.spec.drain.reconnect_jitter_ms = 1000;
        p.spec.drain.connections_per_second = 1000;
        p.status.as_mut().unwrap().rebalance = previous.rebalance.clone();
        let mut history = settled_at(per_pod.iter().sum(), at);
        history.rebalance = previous.episode.clone();
        plan(&p, Some(3), &history, &fresh(&p), t(at))
    }

    /// A step with no rebalancing under way, to start from.
    fn before_any_round() -> Plan {
        plan(
            &pool(&[], vec![], Some(3), 0),
            Some(3),
            &old_history(),
            &Ages::new(),
            t(0),
        )
    }

    fn shed_total(plan: &Plan) -> i64 {
        plan.instructions.iter().filter_map(|i| i.shed).sum()
    }

    #[test]
    fn a_rebalance_episode_never_sheds_more_than_its_first_excess() {
        // 2,500 agents on one pod of three (the runaway measured on the local platform).
        let start = rebalance_step([250, 0, 0], &before_any_round(), 100);
        assert_eq!(shed_total(&start), 250 - 84);
        let budget = start.episode.as_ref().unwrap().budget;
        assert_eq!(budget, 166);
        // The shed agents stay away (behind NATs, long back-off): the round ends, the
        // pool waits for them instead of recomputing the mean from what is left.
        let mut last = start.clone();
        let mut shed = shed_total(&start);
        for at in (101..200).step_by(3) {
            let step = rebalance_step([84, 0, 0], &last, at);
            // Only a new round counts (admission-closed instructions shed nothing).
            shed += step
                .instructions
                .iter()
                .filter(|i| i.id != start.instructions[0].id)
                .filter_map(|i| i.shed)
                .sum::<i64>();
            last = step;
        }
        assert_eq!(shed, budget, "no round beyond the first: {last:?}");
        assert_eq!(last.scaling_condition().reason, Reason::Rebalancing);
        assert!(
            last.scaling_condition()
                .message
                .contains("did not come back"),
            "{}",
            last.scaling_condition().message
        );
        assert!(last.instructions.is_empty());
    }

    // === rebalancing rules: settle, admission, budget across episodes, back-off ===

    /// A step of a pool of `per_pod.len()` pods held at that size, fed with the previous
    /// plan's instructions, episode and `status.rebalance`; `history` carries the totals
    /// of earlier steps (and `since`). Settings: settle window 30 s (the default), report
    /// interval 2 s, admission TTL 30 s, budget window `window` seconds, back-off 60 s.
    fn pool_step(per_pod: &[i64], previous: &Plan, history: History, at: i64, window: i32) -> Plan {
        pool_step_with(per_pod, previous, history, at, |p| {
            p.spec.scaling.rebalance.budget_window_seconds = window;
        })
    }

    fn pool_step_with(
        per_pod: &[i64],
        previous: &Plan,
        mut history: History,
        at: i64,
        tweak: impl FnOnce(&mut ConnectionPool),
    ) -> Plan {
        let n = per_pod.len() as i32;
        let reports: Vec<_> = per_pod
            .iter()
            .enumerate()
            .map(|(o, c)| (o as i32, *c, false))
            .collect();
        let mut p = pool(&reports, previous.instructions.clone(), Some(n), at);
        p.spec.replicas.min = n;
        p.spec.replicas.max = n;
        p.spec.drain.reconnect_jitter_ms = 1000;
        p.spec.drain.connections_per_second = 1000;
        tweak(&mut p);
        p.status.as_mut().unwrap().rebalance = previous.rebalance.clone();
        history.rebalance = previous.episode.clone();
        plan(&p, Some(n), &history, &fresh(&p), t(at))
    }

    fn sheds(plan: &Plan) -> Vec<(&str, i64)> {
        plan.instructions
            .iter()
            .filter_map(|i| Some((i.pod.as_str(), i.shed?)))
            .collect()
    }

    fn closed(plan: &Plan) -> Vec<&str> {
        plan.instructions
            .iter()
            .filter(|i| i.admission_closed_until.is_some())
            .map(|i| i.pod.as_str())
            .collect()
    }

    #[test]
    fn no_episode_starts_while_arrivals_still_ramp() {
        let before = before_any_round();
        // Agents still arrive: 150 → 250 → 300 over the last 40 s. Uneven, but no shed.
        let ramping = History {
            totals: [(t(60), 150), (t(80), 250)].into(),
            ..old_history()
        };
        let step = pool_step(&[270, 10, 20], &before, ramping, 100, 600);
        assert!(step.instructions.is_empty(), "{step:?}");
        assert!(step.episode.is_none() && step.rebalance.is_none());
        assert!(
            matches!(
                step.state,
                State::Rebalancing(Rebalance::Settling(Settling {
                    moved: Some(150),
                    ..
                }))
            ),
            "{:?}",
            step.state
        );
        let condition = step.scaling_condition();
        assert!(condition.active && condition.message.contains("settle"));
        // A new leader has not watched the total for a window yet: it waits one.
        let fresh_term = pool_step(&[270, 10, 20], &before, old_history(), 100, 600);
        assert!(fresh_term.instructions.is_empty(), "{fresh_term:?}");
        assert!(matches!(
            fresh_term.state,
            State::Rebalancing(Rebalance::Settling(Settling { moved: None, .. }))
        ));
        // The total held at 300 (within 2 %) for the 30 s window: the episode starts.
        let held = History {
            totals: [(t(60), 150), (t(80), 250), (t(100), 300), (t(115), 299)].into(),
            ..old_history()
        };
        let step = pool_step(&[270, 10, 20], &before, held, 130, 600);
        // 170 of excess; p-1 and p-2 take 90 + 80 up to the mean, an even share of at
        // most 80 each: 160 now, the rest in the next round.
        assert_eq!(sheds(&step), [("p-0", 160)]);
    }

    #[test]
    fn totals_keep_one_sample_before_the_window_and_everything_after() {
        let mut totals = std::collections::VecDeque::new();
        let window = Duration::from_secs(30);
        for (at, total) in [(0, 10), (10, 20), (20, 30), (45, 30), (60, 30)] {
            note_total(&mut totals, t(at), total, window);
        }
        // At 60 the window starts at 30: the anchor is the sample at 20.
        assert_eq!(totals, [(t(20), 30), (t(45), 30), (t(60), 30)]);
        let orch = orch();
        let long = Orchestration {
            settle_window: window,
            ..orch
        };
        assert_eq!(settled_total(&totals, 30, &long, t(60)), Ok(()));
        assert!(settled_total(&totals, 40, &long, t(60)).is_err());
    }

    #[test]
    fn a_pending_scale_up_defers_the_episode() {
        // Three pods hold 450 at a target of 100: five are wanted, the rate limit holds
        // the scale-up. Measuring the imbalance now would shed agents the next pods
        // should take: no episode.
        let reports = [(0, 390, false), (1, 30, false), (2, 30, false)];
        let mut p = pool(&reports, vec![], Some(3), 100);
        p.spec.scaling.scale_up.period_seconds = 60;
        let history = History {
            last_scale_up: Some(t(95)),
            ..settled_at(450, 100)
        };
        let step = plan(&p, Some(3), &history, &fresh(&p), t(100));
        assert_eq!(step.decision.reason, PolicyReason::ScaleUpLimited);
        assert!(step.instructions.is_empty(), "{step:?}");
        assert!(step.episode.is_none());
    }

    #[test]
    fn during_an_episode_every_pod_at_or_above_the_mean_is_closed_to_newcomers() {
        // Mean 150, bound 187: p-0 sheds its excess; p-1 (at the mean, under the bound)
        // sheds nothing but is closed too, so the shed agents land on p-2 and p-3 only.
        let start = pool_step(
            &[400, 150, 30, 20],
            &before_any_round(),
            settled_at(600, 100),
            100,
            600,
        );
        // p-2 and p-3 take an even share of at most 120 each up to the mean: 240 of the
        // 250 now.
        assert_eq!(sheds(&start), [("p-0", 240)]);
        assert_eq!(closed(&start), ["p-0", "p-1"]);
        let until = |plan: &Plan, pod: &str| {
            plan.instructions
                .iter()
                .find(|i| i.pod == pod)
                .and_then(|i| i.admission_closed_until.clone())
                .map(|t| t.0)
        };
        assert_eq!(until(&start, "p-0"), Some(t(130)));
        let p1 = start.instructions.iter().find(|i| i.pod == "p-1").unwrap();
        assert_eq!((p1.shed, p1.drain), (None, false));
        // The round runs: same instructions, same closing times (nothing rewritten).
        let running = pool_step(
            &[250, 150, 100, 100],
            &start,
            settled_at(600, 105),
            105,
            600,
        );
        assert_eq!(running.instructions, start.instructions);
        assert_eq!(running.state, State::Rebalancing(Rebalance::RoundRunning));
        // p-2 filled up to the mean while the round ran: closed as well.
        let filling = pool_step(&[250, 150, 160, 40], &start, settled_at(600, 104), 104, 600);
        assert_eq!(closed(&filling), ["p-0", "p-1", "p-2"]);
        // Balanced with every agent back: the episode is over and every pod reopens.
        let done = pool_step(
            &[150, 150, 150, 150],
            &running,
            settled_at(600, 112),
            112,
            600,
        );
        assert!(done.instructions.is_empty(), "{done:?}");
        assert!(done.episode.is_none());
    }

    #[test]
    fn a_round_is_no_bigger_than_its_open_pods_take_up_to_the_mean() {
        // Mean 100, bound 125 (the ramp through the Service that ended at 1.40). Pods
        // at 99 are below the mean: left open, an even share of the 150 of excess
        // (37 each) carried them to 136. Now only p-3 and p-4 are open, the round is
        // what they take up to the mean (2 × 74), and p-1 and p-2 are closed.
        let start = pool_step(
            &[250, 99, 99, 26, 26],
            &before_any_round(),
            settled_at(500, 100),
            100,
            600,
        );
        assert_eq!(sheds(&start), [("p-0", 148)]);
        assert_eq!(closed(&start), ["p-0", "p-1", "p-2"]);
        assert_eq!(start.episode.as_ref().unwrap().budget, 150);
        // The shed agents came back, to p-3 and p-4 alone: within the bound, and the
        // episode is over.
        let done = pool_step(
            &[102, 99, 99, 100, 100],
            &start,
            settled_at(500, 110),
            110,
            600,
        );
        assert!(done.instructions.is_empty(), "{done:?}");
        assert!(done.episode.is_none());
    }

    #[test]
    fn receivers_are_the_roomiest_pods_for_the_largest_round() {
        let live = |counts: &[i64]| -> Vec<Live> {
            counts
                .iter()
                .enumerate()
                .map(|(o, c)| Live {
                    ordinal: o as i32,
                    connections: *c,
                    refused: 0,
                    ready: true,
                    draining: false,
                    instruction: None,
                })
                .collect()
        };
        let pods = live(&[300, 90, 90, 0]);
        let heavy = vec![&pods[0]];
        // Rooms to 120: 30, 30, 120. One pod takes 120, three take 3 × 30 = 90.
        assert_eq!(receivers(&pods, &heavy, 120), (vec![3], 120));
        // Rooms 20, 20, 20, 20: all four, 80 (ties go to the larger set).
        let pods = live(&[180, 80, 80, 80, 80]);
        assert_eq!(receivers(&pods, &[&pods[0]], 100), (vec![1, 2, 3, 4], 80));
        // Rooms 40, 40, 10: two pods (80) rather than three (30) or one (40).
        let pods = live(&[290, 60, 60, 90]);
        assert_eq!(receivers(&pods, &[&pods[0]], 100), (vec![1, 2], 80));
    }

    /// Plays an episode against a Service that spreads every shed agent, at once, over
    /// the pods that admit them by name in turn (as the harness's Service and
    /// kube-proxy's round robin do), feeding each plan into the next step.
    fn play_episode(start: &[i64], probe: i32) -> (Vec<i64>, Vec<Plan>) {
        play_episode_after(start, probe, false)
    }

    /// [`play_episode`], `after_rollout`: a rollout has just completed (the autoscaler's
    /// memory carried from each plan into the next step).
    fn play_episode_after(start: &[i64], probe: i32, after_rollout: bool) -> (Vec<i64>, Vec<Plan>) {
        let mut fill_after_rollout = after_rollout;
        let mut counts = start.to_vec();
        let total: i64 = counts.iter().sum();
        let n = counts.len() as i64;
        let bound = total as f64 / n as f64 * 1.25;
        let mut plans = Vec::new();
        let mut previous = before_any_round();
        let mut turn = 0usize;
        let mut at = 100;
        for _ in 0..60 {
            let history = History {
                fill_after_rollout,
                ..settled_at(total, at)
            };
            let step = pool_step_with(&counts, &previous, history, at, |p| {
                p.spec.scaling.rebalance.first_round_percent = probe;
            });
            fill_after_rollout = step.fill_after_rollout;
            let fresh_round: Vec<(usize, i64)> =
                if step.events.iter().any(|e| e.reason == Reason::Rebalancing) {
                    sheds(&step)
                        .iter()
                        .map(|(pod, k)| (pod[2..].parse().unwrap(), *k))
                        .collect()
                } else {
                    Vec::new()
                };
            let closed: Vec<usize> = closed(&step)
                .iter()
                .map(|pod| pod[2..].parse().unwrap())
                .collect();
            let mut away = 0;
            for (o, k) in fresh_round {
                counts[o] -= k;
                away += k;
            }
            let open: Vec<usize> = (0..counts.len()).filter(|o| !closed.contains(o)).collect();
            assert!(!open.is_empty() || away == 0, "{step:?}");
            for _ in 0..away {
                counts[open[turn % open.len()]] += 1;
                turn += 1;
            }
            for (o, c) in counts.iter().enumerate() {
                assert!(
                    (*c as f64) <= bound || start[o] as f64 >= *c as f64,
                    "p-{o} pushed past the bound: {counts:?} after {step:?}"
                );
            }
            let over = step.instructions.is_empty() && step.episode.is_none();
            plans.push(step);
            if over {
                break;
            }
            previous = plans.last().unwrap().clone();
            at += 10;
        }
        (counts, plans)
    }

    #[test]
    fn episodes_end_within_the_bound_and_never_push_a_light_pod_past_it() {
        let starts: [&[i64]; 6] = [
            &[250, 99, 99, 26, 26],
            &[200, 100, 100, 50, 50],
            &[400, 100, 0, 0, 0],
            &[160, 160, 60, 60, 60],
            &[270, 10, 20],
            &[180, 180, 20, 20],
        ];
        for start in starts {
            for probe in [100, 25] {
                let (end, plans) = play_episode(start, probe);
                let total: i64 = end.iter().sum();
                let mean = total as f64 / end.len() as f64;
                let max = *end.iter().max().unwrap() as f64;
                assert!(
                    max <= mean * 1.25,
                    "{start:?} (probe {probe} %) ended at {end:?}: {:?}",
                    plans.last()
                );
                assert!(
                    plans.last().unwrap().instructions.is_empty(),
                    "{start:?} (probe {probe} %): {:?}",
                    plans.last()
                );
            }
        }
    }

    /// A rollout of 10 pods in batches of 2 ends with the last batch empty and its
    /// agents on the other pods: 1.25 of the mean, the pool's own bound, where no
    /// episode starts. The episode after a rollout works to its own bound instead and
    /// ends the pool within 1.10 of the mean, every time, whatever the starting shape.
    #[test]
    fn the_episode_after_a_rollout_fills_the_last_batch_to_the_rollouts_bound() {
        let starts: [&[i64]; 4] = [
            // The last batch's agents spread evenly over the other eight.
            &[0, 0, 25, 25, 25, 25, 25, 25, 25, 25],
            // ...unevenly (each batch spread over every pod left in the Service).
            &[0, 0, 12, 12, 22, 22, 30, 30, 36, 36],
            // What five e2e runs ended at before.
            &[13, 13, 25, 25, 22, 22, 20, 20, 20, 20],
            &[0, 25, 25, 25, 25],
        ];
        let ratio = |end: &[i64]| {
            let total: i64 = end.iter().sum();
            *end.iter().max().unwrap() as f64 * end.len() as f64 / total as f64
        };
        for start in starts {
            // Without a rollout, the pool's own bound (25 %) holds: a pool within it
            // is left alone.
            if ratio(start) <= 1.25 {
                let (end, plans) = play_episode_after(start, 100, false);
                assert_eq!(end, start, "{:?}", plans.last());
            }
            for probe in [100, 25] {
                let (end, plans) = play_episode_after(start, probe, true);
                let last = plans.last().unwrap();
                let bound = 1.0 + f64::from(ROLLOUT_FILL_SPREAD_PERCENT) / 100.0;
                assert!(
                    ratio(&end) <= bound + 1e-9,
                    "{start:?} (probe {probe} %) ended at {end:?} ({:.3}): {last:?}",
                    ratio(&end)
                );
                assert!(last.instructions.is_empty(), "{last:?}");
                assert!(!last.fill_after_rollout, "the fill is over: {last:?}");
                // No agent moved that was not above the mean.
                let shed: i64 = plans.iter().map(shed_total).sum();
                let total: i64 = start.iter().sum();
                let level = (total + start.len() as i64 - 1) / start.len() as i64;
                let excess: i64 = start.iter().map(|c| (c - level).max(0)).sum();
                assert!(
                    shed <= excess,
                    "{start:?}: {shed} agents moved, {excess} above the mean"
                );
            }
        }
        // A pool the rollout left balanced already: no episode, and the memory goes.
        let (end, plans) = play_episode_after(&[20, 20, 21, 19, 20], 100, true);
        assert_eq!(end, vec![20, 20, 21, 19, 20]);
        assert!(plans.iter().all(|p| p.events.is_empty()), "{plans:?}");
        assert!(!plans.last().unwrap().fill_after_rollout);
    }

    /// The fill after a rollout stays within the window's shed budget like any episode:
    /// with the budget spent by an episode shortly before, nothing is shed, and the
    /// memory waits for the window to end.
    #[test]
    fn the_fill_after_a_rollout_stays_within_the_windows_budget() {
        let mut previous = before_any_round();
        previous.rebalance = Some(RebalanceStatus {
            window_start: Time(t(50)),
            budget: 40,
            shed: 40,
            failures: 0,
            backoff_until: None,
        });
        let left = [0, 0, 25, 25, 25, 25, 25, 25, 25, 25];
        let history = History {
            fill_after_rollout: true,
            ..settled_at(200, 100)
        };
        let step = pool_step(&left, &previous, history, 100, 600);
        assert_eq!(shed_total(&step), 0, "{step:?}");
        assert!(
            matches!(&step.state, State::Rebalancing(Rebalance::Stopped { why }) if why.contains("no more before")),
            "{:?}",
            step.state
        );
        assert!(
            step.fill_after_rollout,
            "still to fill once the window ends"
        );
        // Once the window is over, the fill runs.
        let history = History {
            fill_after_rollout: true,
            ..settled_at(200, 700)
        };
        let step = pool_step(&left, &previous, history, 700, 600);
        assert!(shed_total(&step) > 0, "{step:?}");
        assert!(!step.fill_after_rollout);
    }

    #[test]
    fn admission_is_renewed_at_half_its_time_and_never_closes_every_pod() {
        let live = |counts: &[i64]| -> Vec<Live> {
            counts
                .iter()
                .enumerate()
                .map(|(o, c)| Live {
                    ordinal: o as i32,
                    connections: *c,
                    refused: 0,
                    ready: false,
                    draining: false,
                    instruction: None,
                })
                .collect()
        };
        let orch = orch();
        let closing = |pod: &str, until: i64| PodInstruction {
            pod: pod.into(),
            id: "close-1".into(),
            drain: false,
            shed: None,
            issued_at: Some(Time(t(0))),
            admission_closed_until: Some(Time(t(until))),
        };
        // 20 s left of 30: kept, same id.
        let (kept, renew) = admission(
            "p",
            &live(&[200, 100]),
            2,
            vec![],
            None,
            &[closing("p-0", 120)],
            &orch,
            t(100),
        );
        assert_eq!(kept, [closing("p-0", 120)]);
        assert_eq!(renew, Some(Duration::from_secs(5)));
        // 10 s left: renewed to 30 s from now, same id.
        let (renewed, _) = admission(
            "p",
            &live(&[200, 100]),
            2,
            vec![],
            None,
            &[closing("p-0", 110)],
            &orch,
            t(100),
        );
        assert_eq!(renewed.len(), 1);
        assert_eq!(renewed[0].id, "close-1");
        assert_eq!(renewed[0].admission_closed_until, Some(Time(t(130))));
        // Every pod at the mean: the lightest (by name on a tie) stays open.
        let (even, _) = admission(
            "p",
            &live(&[100, 100, 100]),
            3,
            vec![],
            None,
            &[],
            &orch,
            t(100),
        );
        let pods: Vec<_> = even.iter().map(|i| i.pod.as_str()).collect();
        assert_eq!(pods, ["p-1", "p-2"]);
    }

    #[test]
    fn the_first_round_is_a_probe_and_the_rest_follows_once_its_agents_are_back() {
        let probe = |p: &mut ConnectionPool| p.spec.scaling.rebalance.first_round_percent = 25;
        let first = pool_step_with(
            &[400, 150, 30, 20],
            &before_any_round(),
            settled_at(600, 100),
            100,
            probe,
        );
        // A quarter of the 250 of excess (rounded up); the episode's budget is all of it.
        assert_eq!(sheds(&first), [("p-0", 63)]);
        assert_eq!(first.episode.as_ref().unwrap().budget, 250);
        // They came back (to the light pods): the rest goes in the next round.
        let next = pool_step_with(
            &[337, 150, 60, 53],
            &first,
            settled_at(600, 106),
            106,
            probe,
        );
        // 187 left of the excess; p-2 and p-3 take 90 each up to the mean.
        assert_eq!(sheds(&next), [("p-0", 180)]);
        // Had they not come back, nothing more is shed and the episode stops.
        let mut last = first;
        for at in (106..130).step_by(2) {
            last = pool_step_with(&[337, 150, 30, 20], &last, settled_at(537, at), at, probe);
            assert!(sheds(&last).is_empty() || at < 106, "{last:?}");
        }
        assert!(
            matches!(last.state, State::Rebalancing(Rebalance::Stopped { .. })),
            "{:?}",
            last.state
        );
        assert_eq!(last.rebalance.as_ref().unwrap().shed, 63);
    }

    #[test]
    fn the_shed_budget_holds_across_episodes_and_a_restart() {
        // Three pods: the first episode measures 170 of excess and sheds it.
        let first = pool_step(
            &[270, 15, 15],
            &before_any_round(),
            settled_at(300, 100),
            100,
            600,
        );
        assert_eq!(sheds(&first), [("p-0", 170)]);
        let record = first.rebalance.clone().unwrap();
        assert_eq!((record.budget, record.shed), (170, 170));
        // The pool grew to five and is uneven again (the shed agents went back to the
        // heavy pods): a new size begins a new episode, but the window's budget is
        // spent — nothing is shed, the pool says until when.
        let mut carried = first.clone();
        carried.instructions.clear();
        carried.episode = None;
        let resized = pool_step(
            &[170, 65, 65, 0, 0],
            &carried,
            settled_at(300, 160),
            160,
            600,
        );
        assert!(sheds(&resized).is_empty(), "{resized:?}");
        assert!(
            matches!(&resized.state, State::Rebalancing(Rebalance::Stopped { why }) if why.contains("no more before")),
            "{:?}",
            resized.state
        );
        assert_eq!(resized.rebalance, first.rebalance, "kept in the status");
        // A budget partly spent caps the next episode at what is left: 200 measured,
        // 150 shed, 50 left of the 110 measured now. The term is new (no episode in
        // memory): the record in the status is what holds the bound.
        carried.rebalance = Some(RebalanceStatus {
            shed: 150,
            budget: 200,
            ..record.clone()
        });
        let capped = pool_step(
            &[170, 65, 65, 0, 0],
            &carried,
            settled_at(300, 160),
            160,
            600,
        );
        assert_eq!(sheds(&capped), [("p-0", 50)]);
        assert_eq!(capped.rebalance.as_ref().unwrap().shed, 200);
        // Once the window is over, a new one begins with the excess measured then.
        let later = pool_step(
            &[170, 65, 65, 0, 0],
            &carried,
            settled_at(300, 800),
            800,
            600,
        );
        assert_eq!(sheds(&later), [("p-0", 110)]);
        let renewed = later.rebalance.unwrap();
        assert_eq!(
            (renewed.window_start, renewed.budget, renewed.shed),
            (Time(t(800)), 110, 110)
        );
    }

    #[test]
    fn episodes_whose_agents_do_not_come_back_back_off_exponentially() {
        // A 10 s budget window, so only the back-off holds the next episode.
        let mut count = 250;
        let mut last = pool_step(
            &[count, 0, 0],
            &before_any_round(),
            settled_at(count, 100),
            100,
            10,
        );
        let mut at = 100;
        let mut backoffs = Vec::new();
        for _ in 0..3 {
            let shed: i64 = sheds(&last).iter().map(|(_, n)| n).sum();
            assert!(shed > 0, "{last:?}");
            // The shed agents never come back; the episode stops after its recovery
            // deadline and sets the back-off.
            count -= shed;
            let mut stopped = None;
            for _ in 0..20 {
                at += 2;
                let step = pool_step(&[count, 0, 0], &last, settled_at(count, at), at, 10);
                let is_stop = step
                    .events
                    .iter()
                    .any(|e| e.reason == Reason::RebalanceStopped);
                last = step;
                if is_stop {
                    stopped = Some(at);
                    break;
                }
            }
            let stopped_at = stopped.expect("the episode stops");
            let record = last.rebalance.clone().unwrap();
            let until = record.backoff_until.unwrap().0;
            backoffs.push(until.duration_since(t(stopped_at)).as_secs());
            // Another term (no episode in memory), the pool still uneven: held back
            // until the back-off ends, whatever the budget window says.
            let mut carried = last.clone();
            carried.episode = None;
            carried.instructions.clear();
            let held = pool_step(
                &[count, 0, 0],
                &carried,
                settled_at(count, at + 30),
                at + 30,
                10,
            );
            assert!(sheds(&held).is_empty(), "{held:?}");
            assert!(
                held.scaling_condition().message.contains("backing off"),
                "{}",
                held.scaling_condition().message
            );
            at = stopped_at + until.duration_since(t(stopped_at)).as_secs() + 1;
            last = pool_step(&[count, 0, 0], &carried, settled_at(count, at), at, 10);
        }
        assert_eq!(backoffs, [60, 120, 240]);
        // An episode whose agents come back (evenly, after the round) clears it.
        let shed: i64 = sheds(&last).iter().map(|(_, n)| n).sum();
        assert!(shed > 0, "{last:?}");
        let even = [count / 3 + count % 3, count / 3, count / 3];
        let back = pool_step(&even, &last, settled_at(count, at + 10), at + 10, 10);
        assert!(back.episode.is_none(), "{back:?}");
        let record = back.rebalance.unwrap();
        assert_eq!((record.failures, record.backoff_until), (0, None));
    }

    #[test]
    fn event_notes_fit_and_name_their_trace() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            event_note("1 → 3 pods", Some(trace)),
            format!("1 → 3 pods (trace {trace})")
        );
        assert_eq!(event_note("1 → 3 pods", None), "1 → 3 pods");
        // A round over a thousand pods names them all: cut (on a character boundary)
        // so the note fits and the trace id survives.
        let long = "shedding 84 from p-1 → ".repeat(100);
        let note = event_note(&long, Some(trace));
        assert!(note.len() <= EVENT_NOTE_MAX, "{}", note.len());
        assert!(note.ends_with(&format!("… (trace {trace})")), "{note}");
    }

    #[test]
    fn no_scale_down_while_shed_agents_come_back() {
        // 300 agents on one pod of three: a round sheds 200 of them.
        let first = step_with_min([300, 0, 0], &before_any_round(), 100, 1);
        assert_eq!(shed_total(&first), 200, "{first:?}");
        // Mid-reconnect the pool holds 100: one pod would do, but the dip is the shed
        // agents, not load leaving. No drain, the pool stays at three.
        let dip = step_with_min([100, 0, 0], &first, 103, 1);
        assert_eq!(
            (dip.desired_replicas, dip.stateful_set_replicas),
            (3, 3),
            "{dip:?}"
        );
        assert!(dip.instructions.iter().all(|i| !i.drain), "{dip:?}");
        assert_eq!(
            dip.scaling_condition().reason,
            Reason::Rebalancing,
            "{dip:?}"
        );
        // They never come back: the episode stops waiting, and the policy decides from
        // what is there.
        let mut last = dip;
        for at in (104..160).step_by(4) {
            last = step_with_min([100, 0, 0], &last, at, 1);
        }
        assert!(last.desired_replicas < 3, "{last:?}");
    }

    #[test]
    fn the_next_round_waits_for_the_shed_agents_and_stays_within_the_budget() {
        let first = rebalance_step([250, 0, 0], &before_any_round(), 100);
        // Round over (166 / 1000 per s + 1 s + 4 s), agents not back yet: wait.
        let waiting = rebalance_step([84, 40, 40], &first, 106);
        assert!(sheds(&waiting).is_empty(), "{waiting:?}");
        // p-0, at the mean now, stays closed to newcomers while they come back.
        assert_eq!(closed(&waiting), ["p-0"]);
        assert!(
            waiting.scaling_condition().message.contains("waiting for"),
            "{}",
            waiting.scaling_condition().message
        );
        // A load balancer sent them all back to the same pod: the total recovered, the
        // pod is as heavy as before, and the budget is spent: stop, no second round.
        let back = rebalance_step([250, 0, 0], &waiting, 108);
        assert!(
            back.instructions.is_empty(),
            "stopped: every pod reopens: {back:?}"
        );
        assert!(
            back.events
                .iter()
                .any(|e| e.reason == Reason::RebalanceStopped),
            "{:?}",
            back.events
        );
        // Evenly back: balanced, the episode is over.
        let even = rebalance_step([84, 83, 83], &waiting, 108);
        assert!(
            even.episode.is_none() && even.instructions.is_empty(),
            "{even:?}"
        );
    }

    #[test]
    fn scaling_condition_keeps_its_transition_time() {
        let mut p = pool(&[(0, 100, false)], vec![], Some(1), 100);
        let first = plan(&p, Some(1), &old_history(), &fresh(&p), t(100));
        let status = crate::status::pool_status(&p, &Default::default(), Some(&first), t(100));
        let cond = status
            .conditions
            .iter()
            .find(|c| c.type_ == tether_crds::CONDITION_SCALING)
            .unwrap()
            .clone();
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("False", "WithinTolerance")
        );
        p.status.as_mut().unwrap().conditions = status.conditions.clone();
        let next = crate::status::pool_status(&p, &Default::default(), Some(&first), t(200));
        let again = next
            .conditions
            .iter()
            .find(|c| c.type_ == tether_crds::CONDITION_SCALING)
            .unwrap();
        assert_eq!(again.last_transition_time, cond.last_transition_time);
        assert_eq!(next.desired_replicas, Some(1));
    }

    // === transitions, without a pool or I/O ===

    fn decision(replicas: i32, reason: PolicyReason) -> Decision {
        Decision {
            replicas,
            recommendation: replicas,
            reason,
            message: "m".into(),
        }
    }

    fn drain(o: i32, id: &str, issued: i64) -> (i32, PodInstruction) {
        (
            o,
            PodInstruction {
                pod: format!("p-{o}"),
                id: id.into(),
                drain: true,
                shed: None,
                issued_at: Some(Time(t(issued))),
                admission_closed_until: None,
            },
        )
    }

    /// A view of `n` pods: `live` is (ordinal, connections, instruction echoed while
    /// draining).
    fn view(
        n: i32,
        live: &[(i32, i64, Option<&str>)],
        drains: Vec<(i32, PodInstruction)>,
        settling: Option<i32>,
    ) -> View {
        let live: Vec<Live> = live
            .iter()
            .map(|(o, c, acting)| Live {
                ordinal: *o,
                connections: *c,
                refused: 0,
                ready: acting.is_none(),
                draining: acting.is_some(),
                instruction: acting.map(String::from),
            })
            .collect();
        View {
            name: "p".into(),
            replicas: n,
            total: live.iter().map(|l| l.connections).sum(),
            entries: live.iter().map(|l| l.ordinal).collect(),
            live,
            drains: drains.into_iter().collect(),
            settling,
        }
    }

    fn orch() -> Orchestration {
        Orchestration {
            drain_deadline: Duration::from_secs(30),
            close_rate: 100,
            reconnect_jitter: Duration::ZERO,
            spread_percent: 25,
            settle_window: Duration::from_secs(4),
            settle_percent: 2,
            budget_window: Duration::from_secs(600),
            backoff: Duration::from_secs(60),
            admission_ttl: Duration::from_secs(30),
            first_round_percent: 100,
        }
    }

    fn reasons(t: &Transition) -> Vec<Reason> {
        t.events.iter().map(|e| e.reason).collect()
    }

    #[test]
    fn a_scale_up_outranks_a_drain_under_way_and_calls_it_off() {
        let v = view(
            3,
            &[(0, 90, None), (1, 90, None), (2, 40, Some("d"))],
            vec![drain(2, "d", 0)],
            Some(2),
        );
        let step = transition(
            &v,
            &decision(5, PolicyReason::ScaledUp),
            None,
            &orch(),
            t(5),
        );
        assert_eq!(step.state, State::ScalingUp { from: 3, to: 5 });
        assert_eq!((step.stateful_set_replicas, step.scaled), (5, true));
        assert!(step.instructions.is_empty());
        assert_eq!(reasons(&step), [Reason::DrainCancelled, Reason::ScaledUp]);
    }

    #[test]
    fn a_drain_under_way_keeps_its_floor_and_its_ids() {
        // Draining 4 → 2; the policy now wants 1: this step finishes first.
        let v = view(
            4,
            &[
                (0, 9, None),
                (1, 9, None),
                (2, 3, Some("d")),
                (3, 0, Some("d")),
            ],
            vec![drain(2, "d", 0), drain(3, "d", 0)],
            Some(2),
        );
        let step = transition(
            &v,
            &decision(1, PolicyReason::ScaledDown),
            None,
            &orch(),
            t(5),
        );
        assert_eq!(
            step.state,
            State::Draining {
                from: 4,
                to: 2,
                pending: vec!["p-2 (3 connections)".into()]
            }
        );
        assert_eq!((step.stateful_set_replicas, step.wanted), (4, 2));
        assert!(step.instructions.iter().all(|i| i.id == "d"));
        assert!(step.events.is_empty(), "no second DrainStarted");
        assert_eq!(step.look_again, Some(Duration::from_secs(25)));
        // p-2 drained too: the StatefulSet shrinks.
        let v = view(
            4,
            &[
                (0, 9, None),
                (1, 9, None),
                (2, 0, Some("d")),
                (3, 0, Some("d")),
            ],
            vec![drain(2, "d", 0), drain(3, "d", 0)],
            Some(2),
        );
        let step = transition(
            &v,
            &decision(1, PolicyReason::ScaledDown),
            None,
            &orch(),
            t(6),
        );
        assert_eq!(
            step.state,
            State::ScalingDown {
                from: 4,
                to: 2,
                overdue: vec![]
            }
        );
        assert_eq!((step.stateful_set_replicas, step.scaled), (2, true));
        assert_eq!(reasons(&step), [Reason::ScaledDown]);
    }

    #[test]
    fn shed_agents_coming_back_hold_a_new_scale_down_but_not_one_under_way() {
        let episode = Episode {
            replicas: 3,
            total_at_start: 300,
            budget: 200,
            shed: 200,
            recover_by: t(20),
            stopped: None,
            spread_percent: 25,
        };
        let v = view(
            3,
            &[(0, 100, None), (1, 0, None), (2, 0, None)],
            vec![],
            None,
        );
        let d = decision(1, PolicyReason::ScaledDown);
        let held = transition(&v, &d, Some(&episode), &orch(), t(10));
        assert_eq!(
            held.state,
            State::Holding {
                pods: 3,
                missing: 200
            }
        );
        assert_eq!((held.stateful_set_replicas, held.wanted), (3, 3));
        assert!(held.instructions.is_empty() && held.events.is_empty());
        assert_eq!(held.look_again, Some(Duration::from_secs(10)));
        // Past `recover_by` nothing holds it: the drain starts.
        let late = transition(&v, &d, Some(&episode), &orch(), t(21));
        assert!(
            matches!(late.state, State::Draining { to: 1, .. }),
            "{late:?}"
        );
        assert_eq!(reasons(&late), [Reason::DrainStarted]);
        // A drain already under way is not held.
        let v = view(
            3,
            &[(0, 100, None), (1, 0, None), (2, 5, Some("d"))],
            vec![drain(2, "d", 0)],
            Some(2),
        );
        let going = transition(&v, &d, Some(&episode), &orch(), t(10));
        assert!(
            matches!(going.state, State::Draining { to: 2, .. }),
            "{going:?}"
        );
    }

    #[test]
    fn an_overdue_drain_is_named_and_no_longer_waited_for() {
        let v = view(
            2,
            &[(0, 9, None), (1, 4, Some("d"))],
            vec![drain(1, "d", 0)],
            Some(1),
        );
        let step = transition(
            &v,
            &decision(1, PolicyReason::ScaledDown),
            None,
            &orch(),
            t(31),
        );
        assert_eq!(
            step.state,
            State::ScalingDown {
                from: 2,
                to: 1,
                overdue: vec!["p-1 (4 connections)".into()]
            }
        );
    }

    #[test]
    fn no_change_is_steady() {
        let v = view(2, &[(0, 90, None), (1, 90, None)], vec![], None);
        for reason in [
            PolicyReason::WithinTolerance,
            PolicyReason::ScaleDownStabilizing,
            PolicyReason::ScaleUpLimited,
        ] {
            let step = transition(&v, &decision(2, reason), None, &orch(), t(1));
            assert_eq!(step.state, State::Steady);
            assert!(step.events.is_empty() && !step.scaled);
        }
    }

    #[test]
    fn the_scaling_condition_is_rendered_from_the_state() {
        let p = pool(&[(0, 100, false)], vec![], Some(1), 100);
        let mut plan = plan(&p, Some(1), &old_history(), &fresh(&p), t(100));
        let rendered = |plan: &Plan| {
            let c = plan.scaling_condition();
            (c.active, c.reason)
        };
        // Steady: the policy's reason, active unless at rest.
        assert_eq!(plan.state, State::Steady);
        assert_eq!(rendered(&plan), (false, Reason::WithinTolerance));
        plan.decision.reason = PolicyReason::ScaleDownStabilizing;
        assert_eq!(rendered(&plan), (true, Reason::ScaleDownStabilizing));
        for (state, expected) in [
            (
                State::Draining {
                    from: 3,
                    to: 1,
                    pending: vec!["p-2 (4 connections)".into()],
                },
                (true, Reason::Draining),
            ),
            (
                State::ScalingDown {
                    from: 3,
                    to: 1,
                    overdue: vec![],
                },
                (true, Reason::ScaledDown),
            ),
            (
                State::Holding {
                    pods: 3,
                    missing: 7,
                },
                (true, Reason::Rebalancing),
            ),
            (
                State::Rebalancing(Rebalance::RoundRunning),
                (true, Reason::Rebalancing),
            ),
            (
                State::Rebalancing(Rebalance::Stopped { why: "x".into() }),
                (false, Reason::Rebalancing),
            ),
        ] {
            plan.state = state;
            assert_eq!(rendered(&plan), expected, "{:?}", plan.state);
        }
        assert_eq!(plan.scaling_condition().message, "rebalancing stopped: x");
    }

    #[test]
    fn each_reason_is_rendered_once_as_its_name() {
        let all = [
            Reason::ScaledUp,
            Reason::ScaledDown,
            Reason::OutOfBounds,
            Reason::ScaleUpLimited,
            Reason::ScaleDownStabilizing,
            Reason::WithinTolerance,
            Reason::Stable,
            Reason::NoReports,
            Reason::Draining,
            Reason::DrainStarted,
            Reason::DrainCancelled,
            Reason::Rebalancing,
            Reason::RebalanceStopped,
        ];
        for reason in all {
            assert_eq!(reason.to_string(), format!("{reason:?}"));
            assert_eq!(reason.as_str(), format!("{reason:?}"));
        }
        for policy in [
            PolicyReason::ScaledUp,
            PolicyReason::ScaledDown,
            PolicyReason::OutOfBounds,
            PolicyReason::ScaleUpLimited,
            PolicyReason::ScaleDownStabilizing,
            PolicyReason::WithinTolerance,
            PolicyReason::Stable,
            PolicyReason::NoReports,
        ] {
            assert_eq!(Reason::from(policy).as_str(), format!("{policy:?}"));
        }
    }
}

#[cfg(test)]
mod rollout_tests {
    //! The rollout part of the state machine: batches, their drains and replacements,
    //! pause, and its priorities against scaling and rebalancing. Pure: plans over
    //! plain pools, no I/O.
    use super::*;
    use crate::fixtures::pool as fixture_pool;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use tether_crds::ConnectionPoolStatus;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    /// A pool `p` of `n` pods, 100 connections each unless `conns` says otherwise,
    /// batches of 20 % (two pods of ten), with `instructions` in its status. A pod
    /// whose instruction is a drain reports draining with `drained` connections left.
    fn pool(n: i32, instructions: Vec<PodInstruction>, drained: i64) -> ConnectionPool {
        let mut p = fixture_pool("p");
        p.spec.replicas.min = n;
        p.spec.replicas.max = n;
        p.spec.scaling.target_connections_per_pod = 100;
        p.spec.scaling.scale_down.stabilization_seconds = 0;
        p.spec.drain.deadline_seconds = 30;
        p.spec.report_interval_seconds = 2;
        p.spec.rollout.max_unavailable = IntOrString::String("20%".into());
        let reports = (0..n)
            .map(|o| {
                let name = format!("p-{o}");
                let drain = instructions.iter().find(|i| i.pod == name && i.drain);
                PodReport {
                    name,
                    connections: if drain.is_some() { drained } else { 100 },
                    refused: 0,
                    instruction: drain.map(|i| i.id.clone()),
                    ready: drain.is_none(),
                    draining: drain.is_some(),
                    observed_at: Some(Time(t(0))),
                    boot_id: None,
                    pending_messages: None,
                    bus_connected: None,
                }
            })
            .collect();
        p.status = Some(ConnectionPoolStatus {
            pods: reports,
            instructions,
            desired_replicas: Some(n),
            ready_replicas: Some(n),
            ..Default::default()
        });
        p
    }

    /// Revisions: pods in `new` at revision "new", the others at "old"; `not_ready`
    /// ordinals not Ready; `missing` ordinals without a Pod.
    fn revisions(n: i32, new: &[i32], not_ready: &[i32], missing: &[i32]) -> Revisions {
        Revisions {
            update: "new".into(),
            pods: (0..n)
                .filter(|o| !missing.contains(o))
                .map(|o| {
                    let revision = if new.contains(&o) { "new" } else { "old" };
                    (
                        o,
                        PodRevision {
                            revision: Some(revision.into()),
                            ready: !not_ready.contains(&o),
                            terminating: false,
                            uid: format!("{revision}-uid-{o}"),
                        },
                    )
                })
                .collect(),
        }
    }

    fn fresh(p: &ConnectionPool) -> Ages {
        p.status
            .iter()
            .flat_map(|s| &s.pods)
            .map(|r| (r.name.clone(), Duration::ZERO))
            .collect()
    }

    fn history() -> History {
        History {
            since: Some(t(-10_000)),
            ..History::default()
        }
    }

    fn step(p: &ConnectionPool, n: i32, view: RolloutView, at: i64) -> Plan {
        plan_with(p, Some(n), &history(), &fresh(p), &view, t(at))
    }

    fn view(r: Revisions, under_way: Option<Rollout>) -> RolloutView {
        RolloutView {
            revisions: Some(r),
            under_way,
        }
    }

    fn reasons(plan: &Plan) -> Vec<Reason> {
        plan.events.iter().map(|e| e.reason).collect()
    }

    fn pods(plan: &Plan) -> Vec<&str> {
        plan.instructions.iter().map(|i| i.pod.as_str()).collect()
    }

    fn deleted(plan: &Plan) -> Vec<&str> {
        plan.delete.iter().map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn a_template_change_drains_one_batch_of_the_highest_ordinals() {
        let p = pool(10, vec![], 0);
        let plan = step(&p, 10, view(revisions(10, &[], &[], &[]), None), 100);
        assert_eq!(pods(&plan), vec!["p-8", "p-9"]);
        assert!(plan.instructions.iter().all(|i| i.drain && is_rollout(i)));
        assert_eq!(
            reasons(&plan),
            vec![Reason::RolloutStarted, Reason::BatchStarted]
        );
        assert!(plan.delete.is_empty());
        // Within the PodDisruptionBudget (10 % of 10 pods, rounded up: 1)? No: 2 > 1.
        assert!(
            plan.events[0]
                .note
                .ends_with("more than the 1 pods the PodDisruptionBudget allows, so evictions wait while one is out"),
            "{}",
            plan.events[0].note
        );
        let mut within = pool(10, vec![], 0);
        within.spec.disruption.max_unavailable = IntOrString::String("20%".into());
        let within = step(&within, 10, view(revisions(10, &[], &[], &[]), None), 100);
        assert!(
            within.events[0].note.ends_with("(0 already updated)"),
            "{}",
            within.events[0].note
        );
        assert_eq!(plan.stateful_set_replicas, 10);
        let State::RollingOut(progress) = &plan.state else {
            panic!("{:?}", plan.state);
        };
        assert_eq!(
            (progress.updated, progress.total, progress.batch),
            (0, 10, 2)
        );
        assert!(
            progress.message().starts_with("0/10 updated"),
            "{}",
            progress.message()
        );
        assert_eq!(plan.scaling_condition().reason, Reason::RollingOut);
        assert!(plan.is_active());
        assert_eq!(plan.rollout_memory.as_ref().map(|r| r.batches), Some(1));
    }

    #[test]
    fn a_drained_batch_is_deleted_and_the_next_waits_until_its_pods_are_ready() {
        let batch = step(
            &pool(10, vec![], 0),
            10,
            view(revisions(10, &[], &[], &[]), None),
            100,
        );
        let memory = batch.rollout_memory.clone();
        // Still draining: nothing deleted, the instructions stay.
        let p = pool(10, batch.instructions.clone(), 40);
        let draining = step(
            &p,
            10,
            view(revisions(10, &[], &[], &[]), memory.clone()),
            105,
        );
        assert!(draining.delete.is_empty());
        assert_eq!(draining.instructions, batch.instructions);
        assert!(draining.events.is_empty());
        // Drained (reports echo the id with 0 connections): deleted, instructions go.
        let p = pool(10, batch.instructions.clone(), 0);
        let drained = step(
            &p,
            10,
            view(revisions(10, &[], &[], &[]), memory.clone()),
            110,
        );
        assert_eq!(deleted(&drained), vec!["p-8", "p-9"]);
        // Each by the UID of the old-revision pod that was listed and drained: the
        // delete's precondition, so a successor of the same name is never hit.
        assert_eq!(
            drained
                .delete
                .iter()
                .map(|d| d.uid.as_str())
                .collect::<Vec<_>>(),
            vec!["old-uid-8", "old-uid-9"]
        );
        assert!(drained.instructions.is_empty());
        // Recreated at the new revision, one not Ready yet: no new batch.
        let p = pool(10, vec![], 0);
        let waiting = step(
            &p,
            10,
            view(revisions(10, &[8, 9], &[9], &[]), memory.clone()),
            112,
        );
        assert!(waiting.instructions.is_empty(), "{waiting:?}");
        assert!(matches!(
            waiting.rollout.as_ref().map(|r| &r.phase),
            Some(RolloutPhase::Replacing { pods }) if pods == &vec!["p-9".to_string()]
        ));
        // A pod missing (its successor not created yet) holds it too.
        let missing = step(
            &p,
            10,
            view(revisions(10, &[8], &[], &[9]), memory.clone()),
            112,
        );
        assert!(missing.instructions.is_empty());
        // Every pod Ready: the next batch.
        let next = step(&p, 10, view(revisions(10, &[8, 9], &[], &[]), memory), 114);
        assert_eq!(pods(&next), vec!["p-6", "p-7"]);
        assert_eq!(reasons(&next), vec![Reason::BatchStarted]);
        assert_eq!(next.rollout.as_ref().map(|r| r.updated), Some(2));
        assert!(
            next.rollout
                .as_ref()
                .unwrap()
                .message()
                .starts_with("2/10 updated")
        );
    }

    #[test]
    fn a_pod_deleted_already_is_not_deleted_again() {
        let batch = step(
            &pool(10, vec![], 0),
            10,
            view(revisions(10, &[], &[], &[]), None),
            100,
        );
        // Both drained; p-9 was deleted by the previous step and its replacement is
        // not listed yet, p-8 is still there at the old revision.
        let p = pool(10, batch.instructions.clone(), 0);
        let next = step(
            &p,
            10,
            view(revisions(10, &[], &[], &[9]), batch.rollout_memory.clone()),
            110,
        );
        assert_eq!(deleted(&next), vec!["p-8"]);
        assert!(next.instructions.is_empty(), "{:?}", next.instructions);
        // Once both are gone, nothing is deleted and the batch waits for them.
        let gone = step(
            &p,
            10,
            view(revisions(10, &[], &[], &[8, 9]), batch.rollout_memory),
            111,
        );
        assert!(gone.delete.is_empty(), "{:?}", gone.delete);
        assert!(matches!(
            gone.rollout.as_ref().map(|r| &r.phase),
            Some(RolloutPhase::Replacing { .. })
        ));
        assert!(gone.instructions.is_empty());
    }

    #[test]
    fn a_drain_past_its_deadline_no_longer_holds_the_batch() {
        let batch = step(
            &pool(10, vec![], 0),
            10,
            view(revisions(10, &[], &[], &[]), None),
            100,
        );
        let p = pool(10, batch.instructions.clone(), 7);
        let late = step(&p, 10, view(revisions(10, &[], &[], &[]), None), 131);
        assert_eq!(deleted(&late), vec!["p-8", "p-9"]);
    }

    #[test]
    fn the_last_batch_back_completes_the_rollout() {
        let p = pool(10, vec![], 0);
        let all: Vec<i32> = (0..10).collect();
        let under_way = Some(Rollout {
            revision: "new".into(),
            batches: 5,
            paused: false,
        });
        let done = step(
            &p,
            10,
            view(revisions(10, &all, &[], &[]), under_way.clone()),
            200,
        );
        assert_eq!(reasons(&done), vec![Reason::RolloutComplete]);
        assert!(done.rollout.is_none() && done.rollout_memory.is_none());
        // The last batch came back empty: the next episode fills it.
        assert!(done.fill_after_rollout);
        assert!(!matches!(done.state, State::RollingOut(_)));
        // The StatefulSet already says so (no revisions read): complete as well.
        let done = step(
            &p,
            10,
            RolloutView {
                revisions: None,
                under_way,
            },
            200,
        );
        assert_eq!(reasons(&done), vec![Reason::RolloutComplete]);
    }

    #[test]
    fn paused_starts_no_batch_and_calls_off_one_draining() {
        let mut p = pool(10, vec![], 0);
        p.spec.rollout.paused = true;
        let paused = step(&p, 10, view(revisions(10, &[], &[], &[]), None), 100);
        assert!(paused.instructions.is_empty());
        assert_eq!(
            paused.rollout.as_ref().map(RolloutProgress::reason),
            Some(Reason::RolloutPaused)
        );
        // Paused before its first batch: one RolloutPaused Event, then none while it
        // stays paused.
        assert_eq!(reasons(&paused), vec![Reason::RolloutPaused]);
        let still = step(
            &p,
            10,
            view(revisions(10, &[], &[], &[]), paused.rollout_memory.clone()),
            102,
        );
        assert!(still.events.is_empty(), "{:?}", still.events);
        assert!(still.instructions.is_empty());

        let batch = step(
            &pool(10, vec![], 0),
            10,
            view(revisions(10, &[], &[], &[]), None),
            100,
        );
        let mut p = pool(10, batch.instructions.clone(), 50);
        p.spec.rollout.paused = true;
        let called_off = step(
            &p,
            10,
            view(revisions(10, &[], &[], &[]), batch.rollout_memory.clone()),
            105,
        );
        assert!(called_off.instructions.is_empty(), "{called_off:?}");
        assert!(called_off.delete.is_empty());
        // Not a scale-down's drain: no DrainCancelled, only the pause.
        assert_eq!(reasons(&called_off), vec![Reason::RolloutPaused]);
        assert_eq!(
            called_off
                .rollout_memory
                .as_ref()
                .map(|r| (r.batches, r.paused)),
            Some((1, true))
        );

        // Resumed: one RolloutResumed Event, and the batch starts again (batch 2 of the
        // same rollout, no second RolloutStarted).
        let p = pool(10, vec![], 0);
        let resumed = step(
            &p,
            10,
            view(
                revisions(10, &[], &[], &[]),
                called_off.rollout_memory.clone(),
            ),
            110,
        );
        assert_eq!(pods(&resumed), vec!["p-8", "p-9"]);
        assert_eq!(
            reasons(&resumed),
            vec![Reason::RolloutResumed, Reason::BatchStarted]
        );
        assert_eq!(
            resumed
                .rollout_memory
                .as_ref()
                .map(|r| (r.batches, r.paused)),
            Some((2, false))
        );
        // Resumed before its first batch: resumed, then started.
        let unpaused = step(
            &p,
            10,
            view(revisions(10, &[], &[], &[]), still.rollout_memory.clone()),
            110,
        );
        assert_eq!(
            reasons(&unpaused),
            vec![
                Reason::RolloutResumed,
                Reason::RolloutStarted,
                Reason::BatchStarted
            ]
        );
    }

    #[test]
    fn a_rollout_waits_for_a_rebalancing_episode_under_way() {
        let mut p = pool(4, vec![], 0);
        p.spec.scaling.rebalance_spread_percent = 25;
        // An episode is running: p-0 sheds.
        let shed = PodInstruction {
            pod: "p-0".into(),
            id: "shed-1".into(),
            drain: false,
            shed: Some(50),
            issued_at: Some(Time(t(99))),
            admission_closed_until: None,
        };
        p.status.as_mut().unwrap().instructions = vec![shed.clone()];
        p.status.as_mut().unwrap().pods[0].connections = 250;
        let plan = step(&p, 4, view(revisions(4, &[], &[], &[]), None), 100);
        assert!(
            matches!(plan.state, State::Rebalancing(_)),
            "{:?}",
            plan.state
        );
        // The episode's instruction stands (closed to newcomers while it sheds), and no
        // rollout batch joins it.
        assert_eq!(
            plan.instructions,
            vec![PodInstruction {
                admission_closed_until: plan.instructions[0].admission_closed_until.clone(),
                ..shed
            }]
        );
        assert!(plan.instructions[0].admission_closed_until.is_some());
        assert_eq!(
            plan.rollout.as_ref().map(|r| &r.phase),
            Some(&RolloutPhase::Waiting {
                behind: RolloutBlocker::RebalancingEpisode
            })
        );
    }

    #[test]
    fn no_rebalancing_episode_starts_while_rolling_out() {
        let mut p = pool(4, vec![], 0);
        p.spec.scaling.rebalance_spread_percent = 25;
        // Uneven, as replaced pods come back empty.
        p.status.as_mut().unwrap().pods[3].connections = 0;
        p.status.as_mut().unwrap().pods[0].connections = 200;
        let plan = step(&p, 4, view(revisions(4, &[3], &[], &[]), None), 100);
        assert!(plan.episode.is_none());
        assert!(
            plan.instructions.iter().all(is_rollout),
            "{:?}",
            plan.instructions
        );
        assert!(matches!(plan.state, State::RollingOut(_)));
        // Without a rollout the same pool rebalances.
        let plan = step(&p, 4, RolloutView::default(), 100);
        assert!(
            matches!(plan.state, State::Rebalancing(_)),
            "{:?}",
            plan.state
        );
    }

    #[test]
    fn a_scale_up_outranks_the_rollout_and_its_new_pods_are_updated() {
        let mut p = pool(4, vec![], 0);
        p.spec.replicas.max = 8;
        for r in &mut p.status.as_mut().unwrap().pods {
            r.connections = 190;
        }
        let plan = step(&p, 4, view(revisions(4, &[], &[], &[]), None), 100);
        assert!(
            matches!(plan.state, State::ScalingUp { from: 4, .. }),
            "{:?}",
            plan.state
        );
        // The new pods do not exist yet: no batch until they are up and Ready.
        assert!(plan.instructions.is_empty());
        let to = plan.stateful_set_replicas;
        // Once they run (at the new revision, as the StatefulSet creates them), the
        // rollout goes on over the old ones only.
        let mut p = pool(to, vec![], 0);
        for r in &mut p.status.as_mut().unwrap().pods {
            r.connections = 100;
        }
        let new: Vec<i32> = (4..to).collect();
        let plan = step(&p, to, view(revisions(to, &new, &[], &[]), None), 110);
        assert!(
            plan.instructions
                .iter()
                .all(|i| ordinal("p", &i.pod).is_some_and(|o| o < 4))
        );
        assert_eq!(plan.rollout.as_ref().map(|r| r.updated), Some(to - 4));
    }

    #[test]
    fn a_scale_down_drain_holds_new_batches_and_keeps_its_own_drains() {
        let mut p = pool(4, vec![], 0);
        p.spec.replicas.min = 1;
        for r in &mut p.status.as_mut().unwrap().pods {
            r.connections = 20;
        }
        let plan = step(&p, 4, view(revisions(4, &[], &[], &[]), None), 100);
        assert!(
            matches!(plan.state, State::Draining { .. }),
            "{:?}",
            plan.state
        );
        assert!(
            plan.instructions.iter().all(|i| !is_rollout(i)),
            "{:?}",
            plan.instructions
        );
        assert_eq!(
            plan.rollout.as_ref().map(|r| &r.phase),
            Some(&RolloutPhase::Waiting {
                behind: RolloutBlocker::ScaleDownDrain
            })
        );
    }

    #[test]
    fn rollout_reasons_render_once() {
        for r in [
            Reason::RollingOut,
            Reason::RolloutStarted,
            Reason::BatchStarted,
            Reason::RolloutComplete,
            Reason::RolloutPaused,
            Reason::RolloutResumed,
            Reason::RolloutWaiting,
        ] {
            assert_eq!(format!("{r:?}"), r.as_str());
        }
    }
}

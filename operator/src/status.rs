//! Pure status logic: the one place that builds the operator's part of the status
//! (conditions, counts, desired size, instructions, observedGeneration) from what it
//! observed and what the autoscaler planned. One writer per field: nothing else in the
//! operator computes a status field.
//!
//! The operator never writes `status.pods[]` (each gateway pod owns its entry); the
//! [`ConnectionPoolStatus`] built here leaves it empty, and an empty list is not
//! serialized, so the operator's server-side apply claims none of it.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tether_crds::{
    CONDITION_BUS_AVAILABLE, CONDITION_DEGRADED, CONDITION_NATS_APPLIED, CONDITION_PROGRESSING,
    CONDITION_READY, CONDITION_ROLLING_OUT, CONDITION_SCALING, ConnectionPool,
    ConnectionPoolStatus,
};

use crate::autoscale::Plan;
use crate::creation::{self, PodCreation};
use crate::nats::NatsProblem;
use crate::resources::selector_string;
use crate::validate::SpecError;

/// What one reconcile saw and did.
#[derive(Debug, Clone, Default)]
pub struct Observed<'a> {
    /// The StatefulSet as the operator's cache has it, with its status.
    pub stateful_set: Option<&'a StatefulSet>,
    /// Why the spec could not be applied, if so.
    pub problem: Option<&'a SpecError>,
    /// Whether the StatefulSet could create its pods (see [`crate::creation`]).
    pub pod_creation: PodCreation,
    /// Why the managed NATS is not applied, if so (it never stops the rest).
    pub nats: Option<&'a NatsProblem>,
}

/// The whole operator-owned status. `plan` is the autoscaler's step (none while the spec
/// cannot be applied: the pool then keeps its last size and instructions).
pub fn pool_status(
    pool: &ConnectionPool,
    observed: &Observed<'_>,
    plan: Option<&Plan>,
    now: Timestamp,
) -> ConnectionPoolStatus {
    let previous = pool.status.clone().unwrap_or_default();
    let sts_status = observed.stateful_set.and_then(|s| s.status.as_ref());
    let replicas = sts_status.map(|s| s.replicas).or(previous.replicas);
    let ready_replicas = sts_status
        .map(|s| s.ready_replicas.unwrap_or(0))
        .or(previous.ready_replicas);
    let target = plan
        .map(|p| p.stateful_set_replicas)
        .or_else(|| {
            observed
                .stateful_set
                .and_then(|s| s.spec.as_ref()?.replicas)
        })
        .or(previous.desired_replicas)
        .unwrap_or(1);

    let mut conditions = conditions(pool, observed, target, now);
    conditions.extend(creation::condition(pool, &observed.pod_creation, now));
    conditions.extend(keep_transition(
        pool,
        bus_conditions(pool, observed.nats, replicas, now),
    ));
    match plan {
        Some(plan) => {
            conditions.push(scaling_condition(pool, plan, now));
            conditions.push(rolling_out_condition(pool, plan, sts_status, now));
        }
        None => conditions.extend(
            previous
                .conditions
                .iter()
                .filter(|c| c.type_ == CONDITION_SCALING || c.type_ == CONDITION_ROLLING_OUT)
                .cloned(),
        ),
    }
    ConnectionPoolStatus {
        pods: vec![],
        total_connections: Some(plan.map_or_else(
            || total_connections(pool, replicas),
            |p| p.total_connections,
        )),
        replicas,
        ready_replicas,
        desired_replicas: plan
            .map(|p| p.desired_replicas)
            .or(previous.desired_replicas),
        updated_replicas: sts_status
            .and_then(|s| s.updated_replicas)
            .or(previous.updated_replicas),
        last_scale_time: if plan.is_some_and(|p| p.scaled) {
            Some(Time(now))
        } else {
            previous.last_scale_time.clone()
        },
        observed_generation: pool.metadata.generation,
        selector: Some(selector_string(pool)),
        conditions,
        instructions: plan.map_or(previous.instructions, |p| p.instructions.clone()),
        rebalance: plan.map_or(previous.rebalance, |p| p.rebalance.clone()),
    }
}

/// The Scaling condition of a plan, keeping its transition time while its status holds.
fn scaling_condition(pool: &ConnectionPool, plan: &Plan, now: Timestamp) -> Condition {
    let scaling = plan.scaling_condition();
    let status = if scaling.active { "True" } else { "False" };
    let since = pool
        .status
        .as_ref()
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == CONDITION_SCALING))
        .filter(|c| c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: CONDITION_SCALING.into(),
        status: status.into(),
        reason: scaling.reason.to_string(),
        message: scaling.message,
        observed_generation: pool.metadata.generation,
        last_transition_time: since,
    }
}

/// The RollingOut condition: True with the rollout's counts while pods are below the
/// StatefulSet's revision, False (`RolloutComplete`) otherwise. Keeps its transition
/// time while its status holds.
fn rolling_out_condition(
    pool: &ConnectionPool,
    plan: &Plan,
    sts_status: Option<&k8s_openapi::api::apps::v1::StatefulSetStatus>,
    now: Timestamp,
) -> Condition {
    let (status, reason, message) = match &plan.rollout {
        Some(progress) => ("True", progress.reason().to_string(), progress.message()),
        None => {
            let updated = sts_status.and_then(|s| s.updated_replicas).unwrap_or(0);
            let replicas = sts_status.map_or(0, |s| s.replicas);
            let revision = sts_status
                .and_then(|s| s.update_revision.clone())
                .unwrap_or_default();
            (
                "False",
                crate::autoscale::Reason::RolloutComplete.to_string(),
                format!("{updated}/{replicas} updated (revision {revision})"),
            )
        }
    };
    let since = pool
        .status
        .as_ref()
        .and_then(|p| {
            p.conditions
                .iter()
                .find(|c| c.type_ == CONDITION_ROLLING_OUT)
        })
        .filter(|c| c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: CONDITION_ROLLING_OUT.into(),
        status: status.into(),
        reason,
        message,
        observed_generation: pool.metadata.generation,
        last_transition_time: since,
    }
}

/// Whether `next` is worth a write over what the pool's status holds now: any change of
/// an operator-owned field, at once, except two kinds of figures that move with every
/// report — `totalConnections`, and a condition's message when the condition's status,
/// reason and generation stay — which are written when `refresh_due` (the caller's
/// pacing, about once per report interval), or at once when the total moved by at least
/// 5 % (or 100 connections). A transition is never held back; figures in a message
/// (`378 connections on 4 reporting of 5 pods`, flipping as one pod's report arrives
/// late) no longer cost a write each, so the operator's own writes do not double the
/// pods' report traffic.
pub fn worth_writing(
    pool: &ConnectionPool,
    next: &ConnectionPoolStatus,
    refresh_due: bool,
) -> bool {
    let mut current = pool.status.clone().unwrap_or_default();
    current.pods.clear();
    let (now_total, next_total) = (
        current.total_connections.unwrap_or(-1),
        next.total_connections.unwrap_or(-1),
    );
    current.total_connections = next.total_connections;
    // Conditions are a list map keyed by type: a server-side apply keeps the stored
    // order and appends a new type at the end, so the stored order need not be ours.
    // Compared in one order, or every step would look like a change.
    let mut next = next.clone();
    next.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    current.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    let next = &next;
    let moved = (next_total - now_total).abs();
    let total_moved_enough = moved >= 100 || moved * 20 >= now_total.max(1);
    if current == *next {
        return moved > 0 && (refresh_due || total_moved_enough);
    }
    // Take the next messages of conditions that did not transition: if that makes the
    // two equal, only figures changed.
    for condition in &mut current.conditions {
        if let Some(same) = next.conditions.iter().find(|n| {
            n.type_ == condition.type_
                && n.status == condition.status
                && n.reason == condition.reason
                && n.observed_generation == condition.observed_generation
        }) {
            condition.message.clone_from(&same.message);
            condition.last_transition_time = same.last_transition_time.clone();
        }
    }
    current != *next || refresh_due || total_moved_enough
}

/// Connections over the pods that exist: entries of pods with an ordinal at or above
/// the StatefulSet's size are left over from a scale-down and do not count.
pub fn total_connections(pool: &ConnectionPool, replicas: Option<i32>) -> i64 {
    let Some(status) = &pool.status else { return 0 };
    let prefix = format!("{}-", pool.name_any());
    status
        .pods
        .iter()
        .filter(|p| {
            let ordinal = p
                .name
                .strip_prefix(&prefix)
                .and_then(|o| o.parse::<i32>().ok());
            match (ordinal, replicas) {
                (Some(o), Some(r)) => o < r,
                (Some(_), None) => true,
                (None, _) => false,
            }
        })
        .map(|p| p.connections.max(0))
        .sum()
}

/// `BusAvailable` (a pool with routing) from the pods' reports of their bus connection,
/// and `NatsApplied` (a managed NATS) from the last apply of its objects. Neither
/// touches Ready: a pod serves its own agents without the bus, and a failing NATS
/// object never stops the gateways or scaling.
pub fn bus_conditions(
    pool: &ConnectionPool,
    nats: Option<&NatsProblem>,
    replicas: Option<i32>,
    now: Timestamp,
) -> Vec<Condition> {
    let Some(routing) = &pool.spec.routing else {
        return vec![];
    };
    let new = |type_: &str, status: &str, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: pool.metadata.generation,
        last_transition_time: Time(now),
    };
    let prefix = format!("{}-", pool.name_any());
    let reporting: Vec<bool> = pool
        .status
        .iter()
        .flat_map(|s| &s.pods)
        .filter(|p| {
            let ordinal = p
                .name
                .strip_prefix(&prefix)
                .and_then(|o| o.parse::<i32>().ok());
            ordinal.is_some_and(|o| replicas.is_none_or(|r| o < r))
        })
        .filter_map(|p| p.bus_connected)
        .collect();
    let cut_off = reporting.iter().filter(|c| !**c).count();
    let bus = match (reporting.len(), cut_off) {
        (0, _) => new(
            CONDITION_BUS_AVAILABLE,
            "Unknown",
            "NoReports",
            "no gateway pod has reported its bus connection yet".into(),
        ),
        (n, 0) => new(
            CONDITION_BUS_AVAILABLE,
            "True",
            "Connected",
            format!("{n}/{n} gateway pods reach the bus"),
        ),
        (n, d) => new(
            CONDITION_BUS_AVAILABLE,
            "False",
            "PodsDisconnected",
            format!(
                "{d} of {n} gateway pods cannot reach the bus: they serve their own agents, \
                 pushes for agents on other pods and durable pushes answer 503"
            ),
        ),
    };
    let mut out = vec![bus];
    if routing.nats.managed == Some(true) {
        out.push(match nats {
            None => new(
                CONDITION_NATS_APPLIED,
                "True",
                "Applied",
                "the managed NATS objects are applied".into(),
            ),
            Some(problem) => new(
                CONDITION_NATS_APPLIED,
                "False",
                problem.reason(),
                problem.to_string(),
            ),
        });
    }
    out
}

/// `fresh` with each condition's `lastTransitionTime` kept from the pool's status while
/// its status does not change.
fn keep_transition(pool: &ConnectionPool, fresh: Vec<Condition>) -> Vec<Condition> {
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    fresh
        .into_iter()
        .map(|mut c| {
            if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
            c
        })
        .collect()
}

/// Ready, Progressing and Degraded for what was observed. A condition keeps its
/// `lastTransitionTime` while its status does not change.
pub fn conditions(
    pool: &ConnectionPool,
    observed: &Observed<'_>,
    target: i32,
    now: Timestamp,
) -> Vec<Condition> {
    let generation = pool.metadata.generation;
    let new = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    let fresh = if let Some(problem) = observed.problem {
        let message = problem.to_string();
        vec![
            new(CONDITION_READY, false, problem.reason(), message.clone()),
            new(
                CONDITION_PROGRESSING,
                false,
                problem.reason(),
                message.clone(),
            ),
            new(CONDITION_DEGRADED, true, problem.reason(), message),
        ]
    } else {
        let rollout = observed.stateful_set.map(|s| rollout(s, target));
        let (ready, progressing) = match rollout {
            None => (
                new(
                    CONDITION_READY,
                    false,
                    "Creating",
                    "creating the gateway StatefulSet".into(),
                ),
                new(
                    CONDITION_PROGRESSING,
                    true,
                    "Creating",
                    "creating the gateway StatefulSet".into(),
                ),
            ),
            Some(r) if r.complete() => (
                new(
                    CONDITION_READY,
                    true,
                    "Available",
                    format!("{}/{target} gateway pods ready", r.ready),
                ),
                new(
                    CONDITION_PROGRESSING,
                    false,
                    "Stable",
                    "rollout complete".into(),
                ),
            ),
            Some(r) => {
                let (reason, message) = if !r.observed {
                    (
                        "RollingOut",
                        "the StatefulSet controller has not seen the new spec yet".to_string(),
                    )
                } else if r.updated < target || r.replicas != target {
                    (
                        "RollingOut",
                        format!("{}/{target} pods updated, {} exist", r.updated, r.replicas),
                    )
                } else {
                    (
                        "PodsNotReady",
                        format!("{}/{target} gateway pods ready", r.ready),
                    )
                };
                (
                    new(CONDITION_READY, false, reason, message.clone()),
                    new(CONDITION_PROGRESSING, true, reason, message),
                )
            }
        };
        vec![
            ready,
            progressing,
            new(
                CONDITION_DEGRADED,
                false,
                "AsExpected",
                "the spec was applied".into(),
            ),
        ]
    };
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    fresh
        .into_iter()
        .map(|mut c| {
            if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
            c
        })
        .collect()
}

/// The StatefulSet's rollout progress.
#[derive(Debug, Clone, Copy)]
struct Rollout {
    observed: bool,
    replicas: i32,
    updated: i32,
    ready: i32,
    target: i32,
    same_revision: bool,
}

impl Rollout {
    fn complete(&self) -> bool {
        self.observed
            && self.same_revision
            && self.replicas == self.target
            && self.updated >= self.target
            && self.ready >= self.target
    }
}

fn rollout(sts: &StatefulSet, target: i32) -> Rollout {
    let status = sts.status.clone().unwrap_or_default();
    let observed = match (status.observed_generation, sts.metadata.generation) {
        (Some(seen), Some(current)) => seen >= current,
        (_, None) => true,
        (None, Some(_)) => false,
    };
    let same_revision = match (&status.current_revision, &status.update_revision) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    Rollout {
        observed,
        replicas: status.replicas,
        updated: status.updated_replicas.unwrap_or(0),
        ready: status.ready_replicas.unwrap_or(0),
        target,
        same_revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{pool, sts_with_status};
    use tether_crds::PodReport;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    /// The autoscaler's step for a pool without reports, at `replicas` pods.
    fn planned(p: &ConnectionPool, replicas: i32) -> Plan {
        crate::autoscale::plan(
            p,
            Some(replicas),
            &Default::default(),
            &Default::default(),
            at(100),
        )
    }

    fn find<'a>(conds: &'a [Condition], type_: &str) -> &'a Condition {
        conds.iter().find(|c| c.type_ == type_).unwrap()
    }

    /// A pool whose status holds `conditions` and `total` connections.
    fn with_status(conditions: Vec<Condition>, total: i64) -> ConnectionPool {
        let mut p = pool("acme");
        p.status = Some(ConnectionPoolStatus {
            conditions,
            total_connections: Some(total),
            ..Default::default()
        });
        p
    }

    fn scaling(status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: "Scaling".into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: Time(at(100)),
        }
    }

    #[test]
    fn figures_in_a_message_wait_for_the_refresh_and_transitions_do_not() {
        let held = scaling(
            "False",
            "WithinTolerance",
            "378 connections on 5 reporting of 5 pods",
        );
        let p = with_status(vec![held.clone()], 378);
        let next_with = |conditions: Vec<Condition>, total: i64| ConnectionPoolStatus {
            conditions,
            total_connections: Some(total),
            ..Default::default()
        };
        let next = |condition: Condition, total: i64| next_with(vec![condition], total);

        // Nothing changed: no write, refresh or not.
        assert!(!worth_writing(&p, &next(held.clone(), 378), false));
        assert!(!worth_writing(&p, &next(held.clone(), 378), true));
        // One pod's report late: only the figures in the message moved.
        let late = scaling(
            "False",
            "WithinTolerance",
            "302 connections on 4 reporting of 5 pods",
        );
        assert!(!worth_writing(&p, &next(late.clone(), 378), false));
        assert!(
            worth_writing(&p, &next(late.clone(), 378), true),
            "at the report pace"
        );
        // ... and with the total moved by 20 %, at once.
        assert!(worth_writing(&p, &next(late, 302), false));
        // A transition (another reason, another status) is written at once.
        let up = scaling(
            "True",
            "ScaledUp",
            "378 connections on 5 reporting of 5 pods",
        );
        assert!(worth_writing(&p, &next(up, 378), false));
        let other_reason = scaling(
            "False",
            "Stable",
            "378 connections on 5 reporting of 5 pods",
        );
        assert!(worth_writing(&p, &next(other_reason, 378), false));
        // A condition that appears is written at once.
        let mut more = next(held.clone(), 378);
        more.conditions.push(Condition {
            type_: "Ready".into(),
            ..held.clone()
        });
        assert!(worth_writing(&p, &more, false));
        // The stored order of the conditions is the server's (a new type appended at
        // the end): the same conditions in another order are no change.
        let ready = Condition {
            type_: "Ready".into(),
            ..held.clone()
        };
        let stored = with_status(vec![held.clone(), ready.clone()], 378);
        assert!(!worth_writing(
            &stored,
            &next_with(vec![ready, held.clone()], 378),
            true
        ));
        // Another field of the status is written at once.
        let mut desired = next(held, 378);
        desired.desired_replicas = Some(3);
        assert!(worth_writing(&p, &desired, false));
    }

    #[test]
    fn a_new_pool_is_creating() {
        let p = pool("acme");
        let status = pool_status(&p, &Observed::default(), Some(&planned(&p, 1)), at(100));
        assert_eq!(status.desired_replicas, Some(1));
        assert_eq!(status.last_scale_time, None, "creating is not scaling");
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(find(&status.conditions, "Ready").reason, "Creating");
        assert_eq!(find(&status.conditions, "Progressing").status, "True");
        assert_eq!(find(&status.conditions, "Degraded").status, "False");
        assert!(status.pods.is_empty());
    }

    #[test]
    fn ready_when_the_rollout_is_complete() {
        let p = pool("acme");
        let sts = sts_with_status(2, 2, 2, 2);
        let observed = Observed {
            stateful_set: Some(&sts),
            problem: None,
            ..Default::default()
        };
        let status = pool_status(&p, &observed, Some(&planned(&p, 2)), at(100));
        let ready = find(&status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Available")
        );
        assert_eq!(find(&status.conditions, "Progressing").status, "False");
        assert_eq!(status.ready_replicas, Some(2));

        let rolling = sts_with_status(2, 2, 1, 1);
        let observed = Observed {
            stateful_set: Some(&rolling),
            problem: None,
            ..Default::default()
        };
        let status = pool_status(&p, &observed, Some(&planned(&p, 2)), at(100));
        assert_eq!(find(&status.conditions, "Ready").reason, "RollingOut");
        assert_eq!(find(&status.conditions, "Progressing").status, "True");
    }

    #[test]
    fn a_problem_degrades_and_keeps_the_last_size() {
        let mut p = pool("acme");
        p.status = Some(ConnectionPoolStatus {
            desired_replicas: Some(3),
            last_scale_time: Some(Time(at(5))),
            ..Default::default()
        });
        let problem = SpecError::SecretMissing {
            name: "acme-jwt".into(),
            field: "auth.jwt.secretRef".into(),
        };
        let observed = Observed {
            stateful_set: None,
            problem: Some(&problem),
            ..Default::default()
        };
        let status = pool_status(&p, &observed, None, at(100));
        assert_eq!(status.desired_replicas, Some(3));
        assert_eq!(status.last_scale_time, Some(Time(at(5))));
        let degraded = find(&status.conditions, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "SecretMissing")
        );
        assert!(degraded.message.contains("acme-jwt"));
        assert_eq!(find(&status.conditions, "Ready").status, "False");
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut p = pool("acme");
        let sts = sts_with_status(1, 1, 1, 1);
        let observed = Observed {
            stateful_set: Some(&sts),
            problem: None,
            ..Default::default()
        };
        let first = pool_status(&p, &observed, Some(&planned(&p, 1)), at(100));
        p.status = Some(first);
        let second = pool_status(&p, &observed, Some(&planned(&p, 1)), at(200));
        assert_eq!(
            find(&second.conditions, "Ready").last_transition_time,
            Time(at(100))
        );
        p.status = Some(second);
        let down = sts_with_status(1, 1, 1, 0);
        let observed = Observed {
            stateful_set: Some(&down),
            problem: None,
            ..Default::default()
        };
        let third = pool_status(&p, &observed, Some(&planned(&p, 1)), at(300));
        assert_eq!(
            find(&third.conditions, "Ready").last_transition_time,
            Time(at(300))
        );
        assert_eq!(
            find(&third.conditions, "Degraded").last_transition_time,
            Time(at(100))
        );
    }

    #[test]
    fn totals_count_only_pods_that_exist() {
        let mut p = pool("acme");
        let report = |name: &str, connections| PodReport {
            name: name.into(),
            connections,
            refused: 0,
            instruction: None,
            ready: true,
            draining: false,
            observed_at: None,
            boot_id: None,
            pending_messages: None,
            bus_connected: None,
        };
        p.status = Some(ConnectionPoolStatus {
            pods: vec![
                report("acme-0", 10),
                report("acme-1", 5),
                report("acme-2", 7),
                report("other-0", 99),
            ],
            ..Default::default()
        });
        assert_eq!(total_connections(&p, Some(2)), 15);
        assert_eq!(total_connections(&p, None), 22);
    }
}

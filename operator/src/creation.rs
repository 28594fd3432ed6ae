//! Whether the gateway StatefulSet can create its pods: the pool's `PodsCreatable`
//! condition.
//!
//! ```text
//!   StatefulSet short of pods (spec.replicas > status.replicas)?
//!        no ──► Created (True)
//!        yes ─► list core/v1 Events: involvedObject = the StatefulSet, reason FailedCreate
//!                 a recent one ──► Refused (False, FailedCreate, the API server's message)
//!                 none         ──► Unknown (pods are on their way: the condition is kept)
//! ```
//!
//! Why Events: the StatefulSet controller reports a refused pod (a ResourceQuota's
//! "exceeded quota" or "must specify", PodSecurity, a missing PriorityClass) only as a
//! `FailedCreate` Event on the StatefulSet; unlike a ReplicaSet it sets no condition. The
//! Events are read only while pods are missing, one list per autoscaling step of that
//! pool, never per report of a healthy pool, and the operator does not watch Events (a
//! cluster's Events are many and churn).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tether_crds::{CONDITION_PODS_CREATABLE, ConnectionPool};
use tracing::debug;

/// The Event reason the StatefulSet controller gives a pod it could not create.
pub const FAILED_CREATE: &str = "FailedCreate";

/// How recent a FailedCreate Event must be to count. The StatefulSet controller retries
/// with a back-off of up to ~16 minutes and updates the Event's `lastTimestamp` (and
/// `count`) on every retry; an older Event is from an earlier episode.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(20 * 60);

/// How long a StatefulSet may be short of pods before its Events are read. A
/// scale-up's pods are created within seconds and every report reconciles the pool:
/// reading Events meanwhile (a list the API server answers by scanning the namespace's
/// Events) would cost one list per report of every growing pool, and 100 pools scaling
/// up at once slowed the control-plane test's API server until reports came late. A
/// refused pod is retried by the StatefulSet controller, so its FailedCreate Event is
/// still there when the grace ends.
pub const STALL_GRACE: Duration = Duration::from_secs(10);

/// When one pool's Events are worth listing: only once the StatefulSet has been short
/// of pods for [`STALL_GRACE`], and then at most once per `every` (the pool's report
/// interval), the answer kept in between.
#[derive(Debug, Clone)]
pub struct CreationWatch {
    missing_since: Instant,
    listed: Option<(Instant, PodCreation)>,
}

impl CreationWatch {
    /// Pods found missing at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            missing_since: now,
            listed: None,
        }
    }

    /// What to answer without listing at `now`, or `None` when it is time to list.
    pub fn without_listing(&self, now: Instant, every: Duration) -> Option<PodCreation> {
        if now.saturating_duration_since(self.missing_since) < STALL_GRACE {
            return Some(PodCreation::Unknown);
        }
        match &self.listed {
            Some((at, seen)) if now.saturating_duration_since(*at) < every => Some(seen.clone()),
            _ => None,
        }
    }

    /// Keeps what a list at `at` found.
    pub fn listed(&mut self, at: Instant, seen: PodCreation) {
        self.listed = Some((at, seen));
    }
}

/// Longest message the condition carries.
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// What is known about the creation of the gateway pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PodCreation {
    /// Not looked at, or pods are missing without a refusal (yet): the condition keeps
    /// its last value.
    #[default]
    Unknown,
    /// Every pod the StatefulSet wants exists.
    Created,
    /// The last attempt was refused, with the API server's message.
    Refused(String),
}

/// Whether the StatefulSet has fewer pods than it wants (as its controller last
/// reported).
pub fn pods_missing(sts: &StatefulSet) -> bool {
    let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let have = sts.status.as_ref().map_or(0, |s| s.replicas);
    have < want
}

/// When an Event last happened: `lastTimestamp` (the legacy recorder's, updated on every
/// repeat), else its series' or its own `eventTime`, else its creation.
fn last_seen(e: &Event) -> Option<Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.series.as_ref()?.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The message of the latest FailedCreate Event among `events` that happened within
/// [`REFUSAL_WINDOW`] of `now`.
pub fn latest_refusal(events: &[Event], now: Timestamp) -> Option<String> {
    let window = i64::try_from(REFUSAL_WINDOW.as_secs()).unwrap_or(i64::MAX);
    events
        .iter()
        .filter(|e| e.reason.as_deref() == Some(FAILED_CREATE))
        .filter_map(|e| Some((last_seen(e)?, e)))
        .filter(|(at, _)| now.as_second() - at.as_second() <= window)
        .max_by_key(|(at, _)| *at)
        .map(|(_, e)| e.message.clone().unwrap_or_default())
}

/// The `PodsCreatable` condition for `creation`, keeping its transition time while its
/// status holds; `Unknown` keeps the previous condition (none before the first answer).
pub fn condition(
    pool: &ConnectionPool,
    creation: &PodCreation,
    now: Timestamp,
) -> Option<Condition> {
    let previous = pool.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_PODS_CREATABLE)
    });
    let (status, reason, message) = match creation {
        PodCreation::Unknown => return previous.cloned(),
        PodCreation::Created => (
            "True",
            "Created",
            "the gateway StatefulSet has created every pod it wants".to_string(),
        ),
        PodCreation::Refused(message) => (
            "False",
            FAILED_CREATE,
            // Bounded: the pool object's size is budgeted (docs/operator.md, "How big
            // the pool object gets"); a quota's refusal is a few hundred characters.
            message.chars().take(MAX_MESSAGE_CHARS).collect(),
        ),
    };
    let since = previous
        .filter(|c| c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Some(Condition {
        type_: CONDITION_PODS_CREATABLE.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: pool.metadata.generation,
        last_transition_time: since,
    })
}

/// Whether `next` turns the condition False where it was not: worth an Event on the pool.
pub fn newly_refused(pool: &ConnectionPool, next: &PodCreation) -> Option<String> {
    let PodCreation::Refused(message) = next else {
        return None;
    };
    let was_refused = pool.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_PODS_CREATABLE && c.status == "False")
    });
    (!was_refused).then(|| message.clone())
}

/// Looks at the StatefulSet (and, only while it is short of pods, at its FailedCreate
/// Events). A failed list (e.g. an operator installed without the right to list Events)
/// is `Unknown`: the condition is informative, never a reason to fail a reconcile.
pub async fn observe(client: &Client, sts: Option<&StatefulSet>, now: Timestamp) -> PodCreation {
    let Some(sts) = sts else {
        return PodCreation::Unknown;
    };
    if !pods_missing(sts) {
        return PodCreation::Created;
    }
    let Some(ns) = sts.namespace() else {
        return PodCreation::Unknown;
    };
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let mut fields = format!(
        "involvedObject.kind=StatefulSet,involvedObject.name={},reason={FAILED_CREATE}",
        sts.name_any()
    );
    // Events of an earlier StatefulSet of the same name are not this one's.
    if let Some(uid) = &sts.metadata.uid {
        fields.push_str(&format!(",involvedObject.uid={uid}"));
    }
    match events.list(&ListParams::default().fields(&fields)).await {
        Ok(list) => {
            latest_refusal(&list.items, now).map_or(PodCreation::Unknown, PodCreation::Refused)
        }
        Err(err) => {
            debug!(statefulset = %sts.name_any(), %err, "could not list the StatefulSet's Events");
            PodCreation::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{pool, sts_with_status};
    use serde_json::json;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn event(reason: &str, message: &str, last: i64) -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": format!("e{last}"), "namespace": "tenants"},
            "involvedObject": {"kind": "StatefulSet", "name": "acme"},
            "reason": reason, "message": message,
            "lastTimestamp": at(last).to_string(),
        }))
        .unwrap()
    }

    #[test]
    fn events_are_listed_only_after_the_grace_and_then_once_per_interval() {
        let start = Instant::now();
        let every = Duration::from_secs(2);
        let mut watch = CreationWatch::new(start);
        // Within the grace: pods on their way, nothing listed.
        assert_eq!(
            watch.without_listing(start + STALL_GRACE / 2, every),
            Some(PodCreation::Unknown)
        );
        // Stalled: list, then keep the answer for an interval.
        let listed_at = start + STALL_GRACE;
        assert_eq!(watch.without_listing(listed_at, every), None);
        watch.listed(listed_at, PodCreation::Refused("quota".into()));
        assert_eq!(
            watch.without_listing(listed_at + every / 2, every),
            Some(PodCreation::Refused("quota".into()))
        );
        assert_eq!(watch.without_listing(listed_at + every, every), None);
    }

    #[test]
    fn a_statefulset_short_of_pods_is_missing_some() {
        assert!(pods_missing(&sts_with_status(3, 2, 2, 2)));
        assert!(!pods_missing(&sts_with_status(3, 3, 3, 0)));
    }

    #[test]
    fn the_latest_recent_refusal_wins() {
        let now = 10_000;
        let events = [
            event("FailedCreate", "old", now - 60),
            event(
                "SuccessfulCreate",
                "create Pod acme-1 in StatefulSet acme successful",
                now,
            ),
            event("FailedCreate", "newest", now - 5),
        ];
        assert_eq!(latest_refusal(&events, at(now)).as_deref(), Some("newest"));
        let stale = [event("FailedCreate", "long ago", now - 3600)];
        assert_eq!(latest_refusal(&stale, at(now)), None);
        assert_eq!(latest_refusal(&[], at(now)), None);
    }

    #[test]
    fn the_condition_follows_creation_and_keeps_its_transition_time() {
        let mut p = pool("acme");
        assert_eq!(condition(&p, &PodCreation::Unknown, at(1)), None);
        let refused = PodCreation::Refused("exceeded quota: compute".into());
        let c = condition(&p, &refused, at(1)).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "FailedCreate")
        );
        assert_eq!(c.message, "exceeded quota: compute");
        assert_eq!(
            newly_refused(&p, &refused).as_deref(),
            Some("exceeded quota: compute")
        );

        p.status = Some(tether_crds::ConnectionPoolStatus {
            conditions: vec![c.clone()],
            ..Default::default()
        });
        // Still refused: same transition time, no new Event; unknown keeps it.
        assert_eq!(
            condition(&p, &refused, at(50))
                .unwrap()
                .last_transition_time,
            c.last_transition_time
        );
        assert_eq!(newly_refused(&p, &refused), None);
        assert_eq!(condition(&p, &PodCreation::Unknown, at(60)), Some(c));
        let created = condition(&p, &PodCreation::Created, at(70)).unwrap();
        assert_eq!(
            (created.status.as_str(), created.reason.as_str()),
            ("True", "Created")
        );
        assert_eq!(created.last_transition_time, Time(at(70)));
    }
}

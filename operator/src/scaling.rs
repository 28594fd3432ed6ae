//! The scaling policy: a pure function from what the pods reported to how many pods the
//! pool should have, modelled on the HorizontalPodAutoscaler's behaviour.
//!
//! ```text
//!  status.pods[] ──live_reports (fresh, existing ordinals)──► Observed
//!  Policy (spec) + Observed + History + now ──decide──► Decision { replicas, reason }
//!       recommendation = ceil(total / target), unless the mean is within the tolerance
//!       up:   at most scaleUp.maxPodsPerStep per scaleUp.periodSeconds
//!       down: only to the highest recommendation of the stabilization window,
//!             at most scaleDown.maxPodsPerStep at a time
//!       always within replicas.min..=replicas.max
//! ```
//!
//! Pods without a fresh report are treated much as the HPA treats missing metrics: as
//! empty when deciding a scale-up, as full when deciding a scale-down, so a silent pod
//! never causes a resize on its own. "Full" is what a pod can hold
//! (`maxConnectionsPerPod`), not the target as in the HPA: a gateway pod may hold several
//! times its target, and a pod whose reports stopped landing (an overloaded API server)
//! may be one of those. Counting it at the target once drained 100 of 1,000 pods whose
//! stale neighbours held 400 agents each, and the pool then had to grow back.
//!
//! Demand is what pods hold plus what they refused because they were full: a pool whose
//! pods sit at `maxConnectionsPerPod` while agents get 503 is under-sized, even if the
//! mean of what it holds looks within the tolerance.
//!
//! Freshness is judged on the operator's own monotonic clock: an entry is fresh while it
//! changed (heartbeats change `observedAt`) less than three report intervals ago *as
//! the operator saw it*. Comparing the pod's `observedAt` with the operator's wall
//! clock would make every report stale (or none) under a clock skew between nodes.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tether_crds::{ConnectionPoolSpec, PodReport};

/// The knobs of `spec.replicas` and `spec.scaling`, in the units the policy uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Fewest pods.
    pub min: i32,
    /// Most pods.
    pub max: i32,
    /// Connections per pod to aim for.
    pub target: i64,
    /// Connections a pod can hold (`limits.maxConnectionsPerPod`).
    pub most_per_pod: i64,
    /// Dead band around the target, as a fraction (0.1 = 10 %).
    pub tolerance: f64,
    /// Most pods added per step.
    pub up_step: i32,
    /// Least time between two scale-ups.
    pub up_period: Duration,
    /// Most pods removed per step.
    pub down_step: i32,
    /// How long a lower recommendation must hold before pods are removed.
    pub down_window: Duration,
    /// The pods' report interval (stretched for large pools); entries older than three
    /// are stale.
    pub report_interval: Duration,
}

impl Policy {
    /// The policy of a pool spec (values the schema should have refused are clamped).
    pub fn from_spec(spec: &ConnectionPoolSpec) -> Self {
        let secs = |s: i32| Duration::from_secs(u64::try_from(s).unwrap_or(0));
        let min = spec.replicas.min.max(1);
        Self {
            min,
            max: spec.replicas.max.max(min),
            target: i64::from(spec.scaling.target_connections_per_pod.max(1)),
            most_per_pod: i64::from(spec.limits.max_connections_per_pod.max(1)),
            tolerance: f64::from(spec.scaling.tolerance_percent.clamp(0, 100)) / 100.0,
            up_step: spec.scaling.scale_up.max_pods_per_step.max(1),
            up_period: secs(spec.scaling.scale_up.period_seconds),
            down_step: spec.scaling.scale_down.max_pods_per_step.max(1),
            down_window: secs(spec.scaling.scale_down.stabilization_seconds),
            report_interval: secs(spec.effective_report_interval_seconds()),
        }
    }

    /// Age beyond which a pod's report no longer counts.
    pub fn stale_after(&self) -> Duration {
        self.report_interval * 3
    }
}

/// One usable pod report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// The pod's ordinal in the StatefulSet.
    pub ordinal: i32,
    /// Its connections.
    pub connections: i64,
    /// Agents it refused because it was full, since its previous report.
    pub refused: i64,
    /// The instruction id it acts on.
    pub instruction: Option<String>,
    /// It accepts agents.
    pub ready: bool,
    /// It is draining.
    pub draining: bool,
}

/// The StatefulSet ordinal of `pod` in pool `pool` (`<pool>-<n>`).
pub fn ordinal(pool: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(pool)?
        .strip_prefix('-')?
        .parse()
        .ok()
        .filter(|n: &i32| *n >= 0)
}

/// How long ago the operator saw each `status.pods[]` entry change, by pod name.
pub type Ages = HashMap<String, Duration>;

/// Whether an entry is stale: unchanged for longer than `stale_after` on the operator's
/// clock, or never seen.
pub fn is_stale(report: &PodReport, ages: &Ages, stale_after: Duration) -> bool {
    ages.get(&report.name).is_none_or(|age| *age > stale_after)
}

/// The reports that count: fresh, and from a pod with an ordinal below `existing` (the
/// StatefulSet's size; higher ordinals are gone or going).
pub fn live_reports(
    pool: &str,
    pods: &[PodReport],
    existing: i32,
    stale_after: Duration,
    ages: &Ages,
) -> Vec<Live> {
    let mut live: Vec<Live> = pods
        .iter()
        .filter(|p| !is_stale(p, ages, stale_after))
        .filter_map(|p| {
            let ordinal = ordinal(pool, &p.name).filter(|o| *o < existing)?;
            Some(Live {
                ordinal,
                connections: p.connections.max(0),
                refused: p.refused.max(0),
                instruction: p.instruction.clone(),
                ready: p.ready,
                draining: p.draining,
            })
        })
        .collect();
    live.sort_by_key(|l| l.ordinal);
    live.dedup_by_key(|l| l.ordinal);
    live
}

/// What the policy sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Pods the pool has now (or is settling at, during a drain).
    pub replicas: i32,
    /// Live reports of those pods.
    pub reports: Vec<Live>,
}

impl Observed {
    /// Connections over the live reports.
    pub fn total(&self) -> i64 {
        self.reports
            .iter()
            .fold(0i64, |sum, r| sum.saturating_add(r.connections))
    }

    /// Demand: connections plus the agents refused for want of room.
    pub fn demand(&self) -> i64 {
        self.reports.iter().fold(0i64, |sum, r| {
            sum.saturating_add(r.connections).saturating_add(r.refused)
        })
    }

    /// Agents refused for want of room, over the live reports.
    pub fn refused(&self) -> i64 {
        self.reports
            .iter()
            .fold(0i64, |sum, r| sum.saturating_add(r.refused))
    }
}

/// What the autoscaler remembers between decisions (in memory, like the HPA).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// When this process started watching the pool: no scale-down before a whole
    /// stabilization window of recommendations has been seen (after a failover too).
    pub since: Option<Timestamp>,
    /// Recent recommendations, oldest first, within the stabilization window.
    pub recommendations: VecDeque<(Timestamp, i32)>,
    /// The last scale-up.
    pub last_scale_up: Option<Timestamp>,
    /// The rebalancing episode under way (or stopped), if any.
    pub rebalance: Option<crate::autoscale::Episode>,
    /// The pool's total connections at each step, oldest first, over the rebalance
    /// settle window (see `autoscale::note_total`): an episode starts only once it
    /// stopped moving.
    pub totals: VecDeque<(Timestamp, i64)>,
    /// A rollout completed and the pool has not been rebalanced to the rollout's bound
    /// since (see `autoscale::ROLLOUT_FILL_SPREAD_PERCENT`).
    pub fill_after_rollout: bool,
}

impl History {
    /// Records a decision made at `now`, dropping what fell out of the window.
    pub fn record(&mut self, decision: &Decision, current: i32, policy: &Policy, now: Timestamp) {
        self.since.get_or_insert(now);
        self.recommendations
            .push_back((now, decision.recommendation));
        let window = SignedDuration::try_from(policy.down_window).unwrap_or(SignedDuration::MAX);
        while let Some((at, _)) = self.recommendations.front() {
            if now.duration_since(*at) > window {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
        if decision.replicas > current {
            self.last_scale_up = Some(now);
        }
    }
}

/// Why the decision is what it is. Rendered, with the orchestration's own reasons, by
/// [`crate::autoscale::Reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// More pods.
    ScaledUp,
    /// Fewer pods.
    ScaledDown,
    /// The spec's bounds moved past the current size.
    OutOfBounds,
    /// More pods are needed but the last scale-up is too recent.
    ScaleUpLimited,
    /// Fewer pods would do, but not for the whole stabilization window yet.
    ScaleDownStabilizing,
    /// The mean is within the tolerance of the target.
    WithinTolerance,
    /// The recommendation equals the current size (often a bound).
    Stable,
    /// No pod has a fresh report: nothing to decide on.
    NoReports,
}

impl Reason {
    /// Whether the decision leaves the pool as it is with nothing pending (the Scaling
    /// condition is False): within tolerance, stable, or nothing to decide on.
    pub fn at_rest(self) -> bool {
        matches!(
            self,
            Reason::Stable | Reason::WithinTolerance | Reason::NoReports
        )
    }
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Pods the pool should have now.
    pub replicas: i32,
    /// What the load alone asks for (within bounds), before rate limits and
    /// stabilization; recorded in the history.
    pub recommendation: i32,
    /// Why.
    pub reason: Reason,
    /// The figures behind it, for the condition message.
    pub message: String,
}

fn ceil_div(a: i64, b: i64) -> i64 {
    let b = b.max(1);
    a.max(0) / b + i64::from(a.max(0) % b != 0)
}

/// Decides the pool's size. Pure: the same inputs give the same decision.
pub fn decide(policy: &Policy, observed: &Observed, history: &History, now: Timestamp) -> Decision {
    let current = observed.replicas.max(0);
    let clamp = |n: i64| n.clamp(i64::from(policy.min), i64::from(policy.max)) as i32;
    let total = observed.demand();
    let refused = observed.refused();
    let held = observed.total();
    let decision = |replicas: i32, recommendation: i32, reason: Reason, detail: &str| Decision {
        replicas,
        recommendation,
        reason,
        message: if refused > 0 {
            format!(
                "{held} connections and {refused} refused for want of room on {} reporting of {current} pods (target {} per pod): {detail}",
                observed.reports.len(),
                policy.target
            )
        } else {
            format!(
                "{held} connections on {} reporting of {current} pods (target {} per pod): {detail}",
                observed.reports.len(),
                policy.target
            )
        },
    };

    // Bounds first: a spec change (or `kubectl scale`) is obeyed at once.
    if current < policy.min || current > policy.max {
        let to = clamp(i64::from(current));
        return decision(
            to,
            to,
            Reason::OutOfBounds,
            &format!("outside {}..={}", policy.min, policy.max),
        );
    }
    if observed.reports.is_empty() {
        return decision(current, current, Reason::NoReports, "no fresh pod reports");
    }

    let reporting = observed.reports.len() as i64;
    let missing = (i64::from(current) - reporting).max(0);
    // Missing pods count as empty for a scale-up and as full for a scale-down.
    let up = ceil_div(total, policy.target);
    let assumed_full = missing.saturating_mul(policy.most_per_pod.max(policy.target));
    let down = ceil_div(total.saturating_add(assumed_full), policy.target);
    let raw = if up > i64::from(current) {
        up
    } else if down < i64::from(current) {
        down
    } else {
        i64::from(current)
    };
    let assumed_total = if up > i64::from(current) {
        total
    } else {
        total.saturating_add(assumed_full)
    };
    let ratio = assumed_total as f64 / (i64::from(current.max(1)) * policy.target) as f64;
    let within = (ratio - 1.0).abs() <= policy.tolerance && current > 0;
    let recommendation = if within { current } else { clamp(raw) };

    if recommendation > current {
        let limited = history.last_scale_up.is_some_and(|at| {
            now.duration_since(at)
                < SignedDuration::try_from(policy.up_period).unwrap_or(SignedDuration::MAX)
        });
        if limited {
            return decision(
                current,
                recommendation,
                Reason::ScaleUpLimited,
                &format!(
                    "{recommendation} pods wanted, last scale-up less than {:?} ago",
                    policy.up_period
                ),
            );
        }
        let to = recommendation.min(current.saturating_add(policy.up_step));
        return decision(
            to,
            recommendation,
            Reason::ScaledUp,
            &format!("{recommendation} pods wanted"),
        );
    }
    if recommendation < current {
        let window = SignedDuration::try_from(policy.down_window).unwrap_or(SignedDuration::MAX);
        let watched_long_enough = history
            .since
            .is_some_and(|s| now.duration_since(s) >= window);
        // The highest recommendation of the window, this one included.
        let stabilized = history
            .recommendations
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= window)
            .map(|(_, r)| *r)
            .fold(recommendation, i32::max);
        if !watched_long_enough || stabilized >= current {
            return decision(
                current,
                recommendation,
                Reason::ScaleDownStabilizing,
                &format!(
                    "{recommendation} pods would do; waiting for the {:?} stabilization window",
                    policy.down_window
                ),
            );
        }
        let to = stabilized.max(current.saturating_sub(policy.down_step));
        return decision(
            to,
            recommendation,
            Reason::ScaledDown,
            &format!("{stabilized} pods suffice"),
        );
    }
    let (reason, detail) = if within {
        (
            Reason::WithinTolerance,
            format!(
                "mean within {:.0} % of the target",
                policy.tolerance * 100.0
            ),
        )
    } else {
        (Reason::Stable, "at the recommended size".to_string())
    };
    decision(current, recommendation, reason, &detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy {
            min: 1,
            max: 10,
            target: 100,
            most_per_pod: 400,
            tolerance: 0.1,
            up_step: 2,
            up_period: Duration::from_secs(10),
            down_step: 1,
            down_window: Duration::from_secs(60),
            report_interval: Duration::from_secs(2),
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn observed(replicas: i32, per_pod: &[i64]) -> Observed {
        Observed {
            replicas,
            reports: per_pod
                .iter()
                .enumerate()
                .map(|(i, c)| Live {
                    ordinal: i as i32,
                    connections: *c,
                    refused: 0,
                    instruction: None,
                    ready: true,
                    draining: false,
                })
                .collect(),
        }
    }

    fn watched(since: i64) -> History {
        History {
            since: Some(t(since)),
            ..History::default()
        }
    }

    #[test]
    fn ordinals_and_staleness() {
        assert_eq!(ordinal("p", "p-3"), Some(3));
        assert_eq!(ordinal("p", "pp-3"), None);
        assert_eq!(ordinal("p", "p-x"), None);
        let report = |name: &str| PodReport {
            name: name.into(),
            connections: 5,
            refused: 0,
            instruction: None,
            ready: true,
            draining: false,
            // The pod's own clock says nothing about freshness: a year-old stamp from a
            // skewed node is fresh if the operator saw the entry change just now.
            observed_at: Some(Time(t(-31_536_000))),
            boot_id: None,
            pending_messages: None,
            bus_connected: None,
        };
        let pods = [
            report("p-0"),
            report("p-1"), // unchanged for 7 s on the operator's clock: stale
            report("p-2"), // never seen by this operator
            report("p-3"), // beyond the StatefulSet
            report("other-0"),
        ];
        let ages: Ages = [("p-0", 1), ("p-1", 7), ("p-3", 0), ("other-0", 0)]
            .into_iter()
            .map(|(n, s)| (n.to_string(), Duration::from_secs(s)))
            .collect();
        let live = live_reports("p", &pods, 3, Duration::from_secs(6), &ages);
        assert_eq!(live.iter().map(|l| l.ordinal).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn refused_agents_count_as_demand() {
        // Two full pods within the tolerance of what they hold, but turning agents away.
        let mut full = observed(2, &[105, 105]);
        let d = decide(&policy(), &full, &watched(0), t(100));
        assert_eq!(d.reason, Reason::WithinTolerance);
        full.reports[0].refused = 120;
        let d = decide(&policy(), &full, &watched(0), t(100));
        assert_eq!(
            (d.replicas, d.reason),
            (4, Reason::ScaledUp),
            "{}",
            d.message
        );
        assert!(d.message.contains("120 refused"), "{}", d.message);
    }

    #[test]
    fn absurd_counts_saturate_instead_of_overflowing() {
        let d = decide(
            &policy(),
            &observed(3, &[i64::MAX, i64::MAX, 5]),
            &watched(0),
            t(100),
        );
        assert_eq!((d.replicas, d.reason), (5, Reason::ScaledUp));
    }

    #[test]
    fn scales_up_by_at_most_a_step_then_waits_for_the_period() {
        let p = policy();
        let d = decide(&p, &observed(1, &[900]), &watched(0), t(100));
        assert_eq!(
            (d.replicas, d.recommendation, d.reason),
            (3, 9, Reason::ScaledUp)
        );
        let mut h = watched(0);
        h.record(&d, 1, &p, t(100));
        let d = decide(&p, &observed(3, &[300, 300, 300]), &h, t(105));
        assert_eq!((d.replicas, d.reason), (3, Reason::ScaleUpLimited));
        let d = decide(&p, &observed(3, &[300, 300, 300]), &h, t(111));
        assert_eq!((d.replicas, d.reason), (5, Reason::ScaledUp));
    }

    #[test]
    fn tolerance_band_holds() {
        let d = decide(&policy(), &observed(2, &[105, 104]), &watched(0), t(100));
        assert_eq!((d.replicas, d.reason), (2, Reason::WithinTolerance));
        let d = decide(&policy(), &observed(2, &[115, 110]), &watched(0), t(100));
        assert_eq!((d.replicas, d.reason), (3, Reason::ScaledUp));
    }

    #[test]
    fn scale_down_waits_for_the_window_and_takes_its_highest_recommendation() {
        let p = policy();
        let mut h = watched(0);
        // Watched for less than the window: hold.
        let d = decide(&p, &observed(4, &[10, 10, 10, 10]), &h, t(30));
        assert_eq!((d.replicas, d.reason), (4, Reason::ScaleDownStabilizing));
        // A recommendation of 4 within the window blocks it.
        h.recommendations.push_back((t(40), 4));
        let d = decide(&p, &observed(4, &[10, 10, 10, 10]), &h, t(90));
        assert_eq!(d.reason, Reason::ScaleDownStabilizing);
        // Once that falls out of the window: one pod at a time.
        let d = decide(&p, &observed(4, &[10, 10, 10, 10]), &h, t(101));
        assert_eq!(
            (d.replicas, d.recommendation, d.reason),
            (3, 1, Reason::ScaledDown)
        );
    }

    #[test]
    fn missing_reports_never_cause_a_resize_on_their_own() {
        let p = policy();
        // Two of four pods silent, the others near the target: as if the silent ones
        // were full, no scale-down (counting them as empty would halve the pool).
        let d = decide(&p, &observed(4, &[95, 95]), &watched(-1000), t(100));
        assert_eq!((d.replicas, d.reason), (4, Reason::Stable));
        // Two of four silent, the others overloaded: as if the silent ones were empty.
        let d = decide(&p, &observed(4, &[300, 300]), &watched(-1000), t(100));
        assert_eq!((d.replicas, d.reason), (6, Reason::ScaledUp));
        let d = decide(&p, &observed(4, &[]), &watched(-1000), t(100));
        assert_eq!((d.replicas, d.reason), (4, Reason::NoReports));
    }

    #[test]
    fn silent_pods_may_hold_up_to_their_limit_so_no_scale_down_on_them() {
        let p = policy();
        // Ten pods: four report nearly nothing, six are silent (their reports stopped
        // landing) and may hold up to 400 each. At the target they would add up to 620
        // for ten pods and drain three; at what they can hold, nothing moves.
        let d = decide(&p, &observed(10, &[5, 5, 5, 5]), &watched(-1000), t(100));
        assert_eq!(d.replicas, 10, "{d:?}");
        // Once they report what they hold, the pool is sized on what is there.
        let d = decide(
            &p,
            &observed(10, &[5, 5, 5, 5, 5, 5, 5, 5, 5, 5]),
            &watched(-1000),
            t(100),
        );
        assert!(d.replicas < 10, "{d:?}");
    }

    #[test]
    fn bounds_are_obeyed_at_once() {
        let mut p = policy();
        p.min = 3;
        let d = decide(&p, &observed(1, &[0]), &History::default(), t(0));
        assert_eq!((d.replicas, d.reason), (3, Reason::OutOfBounds));
        p.max = 4;
        let d = decide(&p, &observed(6, &[0]), &History::default(), t(0));
        assert_eq!((d.replicas, d.reason), (4, Reason::OutOfBounds));
    }

    /// Runs the policy in a loop: one decision per second, the pool at its decision.
    fn simulate(p: &Policy, loads: &[i64], start: i32) -> Vec<i32> {
        let mut h = History::default();
        let mut replicas = start;
        let mut sizes = Vec::new();
        for (s, load) in loads.iter().enumerate() {
            let n = replicas.max(1) as i64;
            let per_pod: Vec<i64> = (0..n).map(|i| load / n + i64::from(i < load % n)).collect();
            let now = t(s as i64);
            let d = decide(p, &observed(replicas, &per_pod), &h, now);
            h.record(&d, replicas, p, now);
            replicas = d.replicas;
            sizes.push(replicas);
        }
        sizes
    }

    proptest! {
        #[test]
        fn never_outside_the_bounds(loads in prop::collection::vec(0i64..3_000, 1..200), min in 1i32..4, extra in 0i32..8, start in 0i32..15) {
            let mut p = policy();
            p.min = min;
            p.max = min + extra;
            for size in simulate(&p, &loads, start) {
                prop_assert!(size >= p.min && size <= p.max, "{size} outside {}..={}", p.min, p.max);
            }
        }

        #[test]
        fn no_flapping_under_noise(base in 100i64..900, noise in prop::collection::vec(-0.3f64..0.3, 300)) {
            // Every scale-down comes a whole stabilization window after the last
            // scale-up: noise can add pods, but never make them come and go.
            let p = policy();
            let loads: Vec<i64> = noise.iter().map(|n| (base as f64 * (1.0 + n)) as i64).collect();
            let sizes = simulate(&p, &loads, 1);
            let window = p.down_window.as_secs() as usize;
            let mut last_up = None;
            for s in 1..sizes.len() {
                if sizes[s] > sizes[s - 1] {
                    last_up = Some(s);
                }
                if sizes[s] < sizes[s - 1] {
                    prop_assert!(last_up.is_none_or(|u| s - u >= window), "down at {s} after up at {last_up:?}: {sizes:?}");
                }
            }
        }

        #[test]
        fn converges_under_constant_load(load in 0i64..1_000, start in 1i32..10) {
            let p = policy();
            let sizes = simulate(&p, &vec![load; 400], start);
            let last = *sizes.last().unwrap();
            // Settled: the last 100 decisions agree, and the size carries the load
            // within the tolerance (or sits at a bound).
            prop_assert!(sizes[300..].iter().all(|s| *s == last), "{sizes:?}");
            let mean = load as f64 / f64::from(last);
            let fits = (mean / p.target as f64 - 1.0).abs() <= p.tolerance
                || i64::from(last) == (load + p.target - 1) / p.target
                || last == p.min || last == p.max;
            prop_assert!(fits, "load {load} settled at {last}");
        }
    }
}

//! Reconcile metrics in the Prometheus text format (served on the admin port's
//! `/metrics`): count, errors, duration histogram, leadership.
//!
//! The last few thousand durations are also kept raw, so the benchmark can report
//! exact quantiles rather than bucket bounds.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How many recent durations are kept for [`Metrics::recent_durations`].
const RECENT: usize = 10_000;

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Counter,
    duration: Histogram,
    leader: Gauge,
    recent: Mutex<VecDeque<Duration>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Metrics ===

impl Metrics {
    /// Registers every metric under the `tether_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether_operator");
        let reconciles = Counter::default();
        let errors = Counter::default();
        // 1 ms .. ~16 s
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were retried",
            errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile took",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this process holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    /// Records one reconcile.
    pub fn observe_reconcile(&self, took: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.errors.inc();
        }
        self.duration.observe(took.as_secs_f64());
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// Sets the leadership gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Reconciles run so far.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    /// Failed reconciles so far.
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    /// The most recent reconcile durations (at most 10,000), oldest first.
    pub fn recent_durations(&self) -> Vec<Duration> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The `q`-quantile (0..=1) of `durations`, nearest rank; `None` when empty.
pub fn quantile(durations: &[Duration], q: f64) -> Option<Duration> {
    if durations.is_empty() {
        return None;
    }
    let mut sorted = durations.to_vec();
    sorted.sort();
    let rank = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counts_and_histogram() {
        let m = Metrics::new();
        m.observe_reconcile(Duration::from_millis(3), false);
        m.observe_reconcile(Duration::from_millis(30), true);
        m.set_leader(true);
        let text = m.encode();
        assert!(
            text.contains("tether_operator_reconciles_total 2"),
            "{text}"
        );
        assert!(
            text.contains("tether_operator_reconcile_errors_total 1"),
            "{text}"
        );
        assert!(
            text.contains("tether_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("tether_operator_leader 1"), "{text}");
        assert_eq!(m.recent_durations().len(), 2);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let d: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&d, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&d, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&d, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}

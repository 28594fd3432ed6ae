//! The operator's OpenTelemetry instruments, read by two exporters at once: OTLP (when
//! the `OTEL_*` variables ask for it) and the Prometheus text of the admin port's
//! `/metrics`. Both read the same instruments through one meter provider
//! (`tether_telemetry`), so scrapers and OTLP see one set of values.
//!
//! | instrument | Prometheus | what |
//! |---|---|---|
//! | `tether.operator.reconciles` | `tether_operator_reconciles_total` | reconciles run |
//! | `tether.operator.reconcile.errors` | `tether_operator_reconcile_errors_total` | reconciles that failed |
//! | `tether.operator.reconcile.duration` (s) | `tether_operator_reconcile_duration_seconds_*` | time per reconcile |
//! | `tether.operator.leader` | `tether_operator_leader` | 1 while holding the lease |
//! | `tether.operator.scaling.decisions` | `tether_operator_scaling_decisions_total` | scaling Events, by `reason` |
//! | `tether.operator.pool.replicas.desired` | `tether_operator_pool_replicas_desired` | `status.desiredReplicas` |
//! | `tether.operator.pool.replicas` | `tether_operator_pool_replicas` | `status.replicas` |
//! | `tether.operator.pool.replicas.ready` | `tether_operator_pool_replicas_ready` | `status.readyReplicas` |
//! | `tether.operator.pool.connections` | `tether_operator_pool_connections` | `status.totalConnections` |
//! | `tether.operator.pool.report.age` (s) | `tether_operator_pool_report_age_seconds` | age of the oldest pod report, now |
//! | `tether.operator.pool.reports.stale` | `tether_operator_pool_reports_stale` | pod reports older than 3 report intervals, now |
//!
//! Pool instruments carry `tether.pool` and `tether.pool.namespace`; they are observed
//! at export time from the last status seen per pool ([`Metrics::observe_pool`]), so
//! report age keeps growing while a pod is silent, and a forgotten pool's series end.
//! Only the leader exports them: losing the lease forgets every pool.
//!
//! The last few thousand durations are also kept raw, so the benchmark can report
//! exact quantiles rather than bucket bounds; counts are kept beside the counters for
//! tests and the benchmark (OTel counters cannot be read back).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube::ResourceExt;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    AsyncInstrumentBuilder, Counter, Gauge, Histogram, Meter, MeterProvider as _, ObservableGauge,
};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tether_crds::ConnectionPool;
use tether_telemetry::{PrometheusText, Telemetry};

/// How many recent durations are kept for [`Metrics::recent_durations`].
const RECENT: usize = 10_000;

/// The instrumentation scope (and `service.name`) of the operator's metrics.
pub const SCOPE: &str = "tether-operator";

/// A pod report older than this many report intervals is stale (the scaling policy
/// ignores it).
const STALE_INTERVALS: u32 = 3;

/// The status of one pool, as last seen.
#[derive(Debug, Clone, Default, PartialEq)]
struct PoolView {
    desired: Option<i64>,
    replicas: Option<i64>,
    ready: Option<i64>,
    connections: Option<i64>,
    reports: Vec<SystemTime>,
    stale_after: Duration,
}

/// Pools by (namespace, name).
type Pools = Arc<Mutex<BTreeMap<(String, String), PoolView>>>;

/// The operator's metrics.
pub struct Metrics {
    reconciles: Counter<u64>,
    errors: Counter<u64>,
    duration: Histogram<f64>,
    leader: Gauge<i64>,
    scaling: Counter<u64>,
    pools: Pools,
    // Observable instruments report through their callbacks while registered.
    _observed: Vec<ObservableGauge<f64>>,
    reconcile_count: AtomicU64,
    error_count: AtomicU64,
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
    recent: Mutex<VecDeque<Duration>>,
    prometheus: Option<PrometheusText>,
    // Set when this value owns its meter provider (`Metrics::new`).
    _provider: Option<SdkMeterProvider>,
}

/// A running reconcile (see [`Metrics::reconcile_running`]).
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn pool_attributes(namespace: &str, pool: &str) -> [KeyValue; 2] {
    [
        KeyValue::new("tether.pool.namespace", namespace.to_owned()),
        KeyValue::new("tether.pool", pool.to_owned()),
    ]
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Finishes `gauge` with a callback that observes `value` of every pool (`None` skips
/// the pool). Names stay literal at the call site, where the dashboard test reads them.
fn observe_pools(
    gauge: AsyncInstrumentBuilder<'_, ObservableGauge<f64>, f64>,
    pools: &Pools,
    value: fn(&PoolView, SystemTime) -> Option<f64>,
) -> ObservableGauge<f64> {
    let pools = pools.clone();
    gauge
        .with_callback(move |observer| {
            let now = SystemTime::now();
            for ((namespace, pool), view) in lock(&pools).iter() {
                if let Some(v) = value(view, now) {
                    observer.observe(v, &pool_attributes(namespace, pool));
                }
            }
        })
        .build()
}

// === impl Metrics ===

impl Metrics {
    /// Metrics on a meter provider of their own, with only the Prometheus text view
    /// (tests, benchmarks, anything run without [`tether_telemetry::init`]).
    pub fn new() -> Self {
        match tether_telemetry::prometheus_meter_provider(SCOPE) {
            Ok((provider, text)) => {
                let mut metrics = Self::with_meter(&provider.meter(SCOPE), Some(text));
                metrics._provider = Some(provider);
                metrics
            }
            Err(err) => {
                tracing::warn!(%err, "no Prometheus view of the operator's metrics");
                Self::with_meter(&opentelemetry::global::meter(SCOPE), None)
            }
        }
    }

    /// Metrics on the global meter provider that [`tether_telemetry::init`] installed,
    /// served as text from its Prometheus view.
    pub fn from_telemetry(telemetry: &Telemetry) -> Self {
        Self::with_meter(&opentelemetry::global::meter(SCOPE), telemetry.prometheus())
    }

    /// Instruments on `meter`; `/metrics` serves `prometheus` (empty without it).
    pub fn with_meter(meter: &Meter, prometheus: Option<PrometheusText>) -> Self {
        let pools = Pools::default();
        let observed = vec![
            observe_pools(
                meter
                    .f64_observable_gauge("tether.operator.pool.replicas.desired")
                    .with_description("Pods the pool is heading for (status.desiredReplicas)"),
                &pools,
                |v, _| v.desired.map(|n| n as f64),
            ),
            observe_pools(
                meter
                    .f64_observable_gauge("tether.operator.pool.replicas")
                    .with_description("Pods of the pool's StatefulSet (status.replicas)"),
                &pools,
                |v, _| v.replicas.map(|n| n as f64),
            ),
            observe_pools(
                meter
                    .f64_observable_gauge("tether.operator.pool.replicas.ready")
                    .with_description("Ready pods of the pool (status.readyReplicas)"),
                &pools,
                |v, _| v.ready.map(|n| n as f64),
            ),
            observe_pools(
                meter
                    .f64_observable_gauge("tether.operator.pool.connections")
                    .with_description(
                        "Agent connections over the pool's live pods (status.totalConnections)",
                    ),
                &pools,
                |v, _| v.connections.map(|n| n as f64),
            ),
            observe_pools(
                meter
                    .f64_observable_gauge("tether.operator.pool.report.age")
                    .with_unit("s")
                    .with_description("Age of the oldest pod report in the pool's status"),
                &pools,
                |v, now| {
                    v.reports
                        .iter()
                        .map(|at| now.duration_since(*at).unwrap_or_default())
                        .max()
                        .map(|age| age.as_secs_f64())
                },
            ),
            observe_pools(
                meter
                    .f64_observable_gauge("tether.operator.pool.reports.stale")
                    .with_description(
                        "Pod reports older than three report intervals (ignored by scaling)",
                    ),
                &pools,
                |v, now| {
                    let stale = v
                        .reports
                        .iter()
                        .filter(|at| now.duration_since(**at).unwrap_or_default() > v.stale_after)
                        .count();
                    Some(stale as f64)
                },
            ),
        ];
        let leader = meter
            .i64_gauge("tether.operator.leader")
            .with_description("1 while this process holds the leader lease")
            .build();
        leader.record(0, &[]);
        Self {
            reconciles: meter
                .u64_counter("tether.operator.reconciles")
                .with_description("Reconciles run")
                .build(),
            errors: meter
                .u64_counter("tether.operator.reconcile.errors")
                .with_description("Reconciles that failed and were retried")
                .build(),
            duration: meter
                .f64_histogram("tether.operator.reconcile.duration")
                .with_unit("s")
                .with_description("Time one reconcile took")
                .build(),
            leader,
            scaling: meter
                .u64_counter("tether.operator.scaling.decisions")
                .with_description("Scaling decisions, by the reason of the Event written for each")
                .build(),
            pools,
            _observed: observed,
            reconcile_count: AtomicU64::new(0),
            error_count: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            prometheus,
            _provider: None,
        }
    }

    /// Records one reconcile.
    pub fn observe_reconcile(&self, took: Duration, failed: bool) {
        self.reconciles.add(1, &[]);
        self.reconcile_count.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.add(1, &[]);
            self.error_count.fetch_add(1, Ordering::Relaxed);
        }
        self.duration.record(took.as_secs_f64(), &[]);
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    /// Sets the leadership gauge. Losing the lease forgets every pool: a follower
    /// exports no pool state, which would only grow stale.
    pub fn set_leader(&self, leader: bool) {
        self.leader.record(i64::from(leader), &[]);
        if !leader {
            lock(&self.pools).clear();
        }
    }

    /// Records a scaling decision of `pool`; `reason` is the reason of the Event the
    /// operator writes for it (`ScaledUp`, `DrainStarted`, `ScaledDown`, ...).
    pub fn observe_scaling(&self, pool: &ConnectionPool, reason: &str) {
        let [namespace, name] =
            pool_attributes(&pool.namespace().unwrap_or_default(), &pool.name_any());
        self.scaling.add(
            1,
            &[namespace, name, KeyValue::new("reason", reason.to_owned())],
        );
    }

    /// Remembers `pool`'s status for the pool gauges (replicas, readiness, connections,
    /// report age); they are read at export time.
    pub fn observe_pool(&self, pool: &ConnectionPool) {
        let status = pool.status.clone().unwrap_or_default();
        let interval = u64::try_from(pool.spec.effective_report_interval_seconds()).unwrap_or(1);
        let view = PoolView {
            desired: status.desired_replicas.map(i64::from),
            replicas: status.replicas.map(i64::from),
            ready: status.ready_replicas.map(i64::from),
            connections: status.total_connections,
            reports: status
                .pods
                .iter()
                .filter_map(|p| p.observed_at.as_ref())
                .map(|t| SystemTime::from(t.0))
                .collect(),
            stale_after: Duration::from_secs(interval) * STALE_INTERVALS,
        };
        lock(&self.pools).insert(
            (pool.namespace().unwrap_or_default(), pool.name_any()),
            view,
        );
    }

    /// Ends `pool`'s gauges (the pool is gone).
    pub fn forget_pool(&self, pool: &ConnectionPool) {
        lock(&self.pools).remove(&(pool.namespace().unwrap_or_default(), pool.name_any()));
    }

    /// Counts a reconcile as running until the returned guard is dropped.
    pub fn reconcile_running(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.most_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight(self)
    }

    /// The most reconciles that ran at once so far (bounded by `--concurrency`).
    pub fn most_in_flight(&self) -> u64 {
        self.most_in_flight.load(Ordering::Acquire)
    }

    /// Reconciles run so far.
    pub fn reconciles(&self) -> u64 {
        self.reconcile_count.load(Ordering::Relaxed)
    }

    /// Failed reconciles so far.
    pub fn errors(&self) -> u64 {
        self.error_count.load(Ordering::Relaxed)
    }

    /// The most recent reconcile durations (at most 10,000), oldest first.
    pub fn recent_durations(&self) -> Vec<Duration> {
        lock(&self.recent).iter().copied().collect()
    }

    /// The Prometheus text exposition (empty when there is no Prometheus view).
    pub fn encode(&self) -> String {
        self.prometheus
            .as_ref()
            .map(PrometheusText::encode)
            .unwrap_or_default()
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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use tether_crds::{ConnectionPoolStatus, PodReport};

    use super::*;

    /// The value of the series `name{labels}` whose label text contains every part.
    fn value(text: &str, name: &str, parts: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

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
        assert_eq!((m.reconciles(), m.errors()), (2, 1));
        assert_eq!(m.recent_durations().len(), 2);
    }

    fn report(name: &str, age: Duration) -> PodReport {
        PodReport {
            name: name.into(),
            connections: 10,
            refused: 0,
            instruction: None,
            ready: true,
            draining: false,
            observed_at: Some(Time(
                k8s_openapi::jiff::Timestamp::try_from(SystemTime::now() - age).unwrap(),
            )),
            boot_id: None,
            pending_messages: None,
            bus_connected: None,
        }
    }

    #[test]
    fn pool_gauges_follow_the_last_status_and_end_with_the_pool() {
        let m = Metrics::new();
        let mut pool = crate::fixtures::pool("p1");
        pool.spec.report_interval_seconds = 10;
        pool.status = Some(ConnectionPoolStatus {
            desired_replicas: Some(3),
            replicas: Some(3),
            ready_replicas: Some(2),
            total_connections: Some(20),
            pods: vec![
                report("p1-0", Duration::from_secs(5)),
                report("p1-1", Duration::from_secs(45)),
            ],
            ..Default::default()
        });
        m.set_leader(true);
        m.observe_pool(&pool);
        m.observe_scaling(&pool, "ScaledUp");
        let text = m.encode();
        let of = |name| {
            value(
                &text,
                name,
                &["tether_pool=\"p1\"", "tether_pool_namespace=\"tenants\""],
            )
        };
        assert_eq!(
            of("tether_operator_pool_replicas_desired"),
            Some(3.0),
            "{text}"
        );
        assert_eq!(of("tether_operator_pool_replicas"), Some(3.0), "{text}");
        assert_eq!(
            of("tether_operator_pool_replicas_ready"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(of("tether_operator_pool_connections"), Some(20.0), "{text}");
        assert_eq!(
            of("tether_operator_pool_reports_stale"),
            Some(1.0),
            "{text}"
        );
        let age = of("tether_operator_pool_report_age_seconds").unwrap();
        assert!((45.0..100.0).contains(&age), "oldest report's age: {age}");
        assert_eq!(
            value(
                &text,
                "tether_operator_scaling_decisions_total",
                &["reason=\"ScaledUp\"", "tether_pool=\"p1\""]
            ),
            Some(1.0),
            "{text}"
        );

        m.forget_pool(&pool);
        let text = m.encode();
        assert!(
            !text.contains("tether_operator_pool_replicas_desired{"),
            "{text}"
        );

        m.observe_pool(&pool);
        m.set_leader(false);
        let text = m.encode();
        assert!(
            !text.contains("tether_operator_pool_replicas_desired{"),
            "a follower exports no pool state: {text}"
        );
        assert!(text.contains("tether_operator_leader 0"), "{text}");
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

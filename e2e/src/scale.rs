//! The control-plane scale scenario, shared by the CI test (`tests/control_plane.rs`,
//! everything in one process) and the large runs (`tether-scale run`, the stand-in, the
//! operator and the pod simulator in separate processes): the pools it creates, how it
//! reads the stand-in's accounting, and the budgets it holds the operator to.

use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use tether_crds::ConnectionPool;
use tether_kube_sim::stats::{RequestKey, Snapshot};

/// Connections per pod the pools aim at.
pub const TARGET: i64 = 100;

/// The kinds of child the operator applies for a pool.
pub const CHILDREN: [&str; 8] = [
    "networkpolicies",
    "statefulsets",
    "services",
    "configmaps",
    "poddisruptionbudgets",
    "serviceaccounts",
    "roles",
    "rolebindings",
];

/// Pool `i`'s name (unique across namespaces).
pub fn pool_name(i: usize) -> String {
    format!("p{i:05}")
}

/// Load for half a pod less than `pods`: a pool under it grows to `pods` pods and
/// rebalances on the way.
pub fn load(pods: i64) -> i64 {
    TARGET * pods - TARGET / 2
}

/// A pool that grows from one pod to `pods` under [`load`], with Secrets named as
/// [`crate::install`] creates them.
pub fn pool_manifest(name: &str, namespace: &str, pods: i64, report_seconds: i64) -> Value {
    json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "tenant": "acme",
            "replicas": {"min": 1, "max": pods},
            "scaling": {
                "targetConnectionsPerPod": TARGET,
                "scaleUp": {"maxPodsPerStep": pods.min(100), "periodSeconds": 1},
                "scaleDown": {"stabilizationSeconds": 5, "maxPodsPerStep": (pods / 2).clamp(2, 100)},
            },
            "limits": {"maxConnectionsPerPod": TARGET * 4},
            "auth": {
                "jwt": {"secretRef": {"name": "jwt", "key": "hs256"}},
                "apiKeysSecretRef": {"name": "api-keys", "key": "keys"},
            },
            "routing": {"nats": {"url": "nats://127.0.0.1:4222"}},
            "drain": {"connectionsPerSecond": 1000, "deadlineSeconds": 30, "reconnectJitterMs": 200},
            "reportIntervalSeconds": report_seconds,
        },
    })
}

/// CPU seconds and resident memory (KiB) of a process, from /proc.
pub fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, rss)
}

/// Whether `pods` pods holding `connections` are a size the policy keeps: the mean
/// within the default 10 % tolerance of [`TARGET`], or else exactly the pods the
/// connections need at the target. (Past ten pods more than one size qualifies: 950
/// agents sit as well on 9 pods as on 10.)
pub fn policy_keeps(pods: i32, connections: i64) -> bool {
    let pods = i64::from(pods);
    let within = (connections - TARGET * pods).abs() * 10 <= TARGET * pods;
    pods > 0 && (within || pods == (connections + TARGET - 1) / TARGET)
}

/// Whether a pool of `pods` replicas has a report from every one of them, each ready and
/// none draining, and none holding more than the pool's rebalance spread above the mean
/// (the operator's rule for a heavy pod). Without it a big pool counted as settled while
/// its late pods had not reported yet, and the rebalance episode that followed ran in
/// the "steady" window (1 pool × 1,000 pods: 302 shed instructions, 1,820 operator
/// writes in 60 s).
pub fn balanced(pool: &ConnectionPool, pods: i32) -> bool {
    let name = pool.metadata.name.as_deref().unwrap_or_default();
    let Some(status) = &pool.status else {
        return false;
    };
    let ours: Vec<&tether_crds::PodReport> = (0..pods)
        .filter_map(|i| {
            let want = format!("{name}-{i}");
            status.pods.iter().find(|p| p.name == want)
        })
        .collect();
    if pods < 1 || ours.len() != pods as usize || ours.iter().any(|p| !p.ready || p.draining) {
        return false;
    }
    let total: i64 = ours.iter().map(|p| p.connections).sum();
    let mean = total as f64 / f64::from(pods);
    let spread = f64::from(pool.spec.scaling.rebalance_spread_percent.max(0));
    let bound = mean * (1.0 + spread / 100.0);
    spread == 0.0
        || ours
            .iter()
            .all(|p| p.connections as f64 <= bound || p.connections as f64 - mean < 2.0)
}

/// Whether the operator says nothing is under way: the `Scaling` condition is `False`
/// and its reason is not `Rebalancing` (an episode between rounds, waiting for shed
/// agents or stopped). Without it a pool whose pods looked balanced between two rounds
/// counted as settled, and the episode's later rounds ran in the "steady" window
/// (50 pools × 5 pods: 15.9–17.5 operator writes per pool per minute).
pub fn at_rest(pool: &ConnectionPool) -> bool {
    pool.status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == tether_crds::CONDITION_SCALING)
        .is_some_and(|c| c.status == "False" && c.reason != "Rebalancing")
}

/// Pools (in every namespace) that hold `connections` on ready pods, at most
/// `max_pods`, at a size the policy keeps ([`policy_keeps`]), [`balanced`], with nothing
/// in progress ([`at_rest`], no instruction) and the current generation observed.
pub async fn settled(client: &Client, max_pods: i32, connections: i64) -> usize {
    let pools: Api<ConnectionPool> = Api::all(client.clone());
    let Ok(list) = pools.list(&ListParams::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|p| {
            let Some(s) = &p.status else { return false };
            let desired = s.desired_replicas.unwrap_or_default();
            desired <= max_pods
                && policy_keeps(desired, connections)
                && s.ready_replicas == Some(desired)
                && s.total_connections == Some(connections)
                && s.instructions.is_empty()
                && s.observed_generation == p.metadata.generation
                && balanced(p, desired)
                && at_rest(p)
        })
        .count()
}

/// How many pools (in every namespace) want each size.
pub async fn sizes(client: &Client) -> kube::Result<std::collections::BTreeMap<i32, usize>> {
    let mut sizes = std::collections::BTreeMap::new();
    for p in Api::<ConnectionPool>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        let desired = p
            .status
            .and_then(|s| s.desired_replicas)
            .unwrap_or_default();
        *sizes.entry(desired).or_insert(0) += 1;
    }
    Ok(sizes)
}

/// A write verb.
pub fn is_write(k: &RequestKey) -> bool {
    matches!(
        k.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// The operator's writes: applies and patches under its field manager, its Events,
/// and its prunes of stale `status.pods[]` entries (JSON patches without a manager).
pub fn operator_writes(s: &Snapshot) -> u64 {
    s.count(is_operator_write)
}

fn is_operator_write(k: &RequestKey) -> bool {
    is_write(k)
        && (k.field_manager.as_deref() == Some("tether-operator")
            || k.resource == "events"
            || (k.resource == "connectionpools" && k.verb == "patch" && k.field_manager.is_none()))
}

/// The operator's writes by what they wrote: `verb resource[/subresource] code`, so a
/// broken write budget says what the operator spent it on.
pub fn operator_writes_by_target(s: &Snapshot) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for r in &s.requests {
        let k = &r.key;
        if r.count == 0 || !is_operator_write(k) {
            continue;
        }
        let sub = k
            .subresource
            .as_deref()
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        *out.entry(format!("{} {}{sub} {}", k.verb, k.resource, k.code))
            .or_default() += r.count;
    }
    out
}

/// The operator's applies of children.
pub fn child_applies(s: &Snapshot) -> u64 {
    s.count(|k| {
        k.verb == "patch"
            && k.field_manager.as_deref() == Some("tether-operator")
            && CHILDREN.contains(&k.resource.as_str())
    })
}

/// Object events (not bookmarks) delivered on pool watches, the simulator's own watch
/// excepted: it stands for nothing a real pod does (gateways never watch their pool).
/// The simulator tells its watch apart with a `metadata.namespace=` field selector.
pub fn pool_watch_events(s: &Snapshot) -> u64 {
    s.watches
        .iter()
        .filter(|w| w.key.resource.ends_with("/connectionpools"))
        .filter(|w| !w.key.field_selector.starts_with("metadata.namespace="))
        .map(|w| {
            ["ADDED", "MODIFIED", "DELETED"]
                .iter()
                .map(|t| w.by_type.get(*t).copied().unwrap_or(0))
                .sum::<u64>()
        })
        .sum()
}

/// The pods' status reports (server-side applies under `tether-gateway-<pod>`).
pub fn report_writes(s: &Snapshot) -> u64 {
    s.count(|k| {
        k.verb == "patch"
            && k.resource == "connectionpools"
            && k.field_manager
                .as_deref()
                .is_some_and(|m| m.starts_with("tether-gateway-"))
    })
}

/// What a steady-state window cost, and the budgets of issue 10 it is held to.
#[derive(Debug, Clone)]
pub struct Steady {
    /// Pools in the run.
    pub pools: usize,
    /// Length of the window, seconds.
    pub seconds: f64,
    /// Reports the pods wrote.
    pub reports: u64,
    /// Writes by the operator.
    pub operator_writes: u64,
    /// Every write.
    pub all_writes: u64,
    /// Child applies (none without a spec change).
    pub child_applies: u64,
    /// Object events on the pool watches that stand for real clients.
    pub pool_watch_events: u64,
    /// Every request.
    pub requests: u64,
    /// Bytes written on every watch.
    pub watch_bytes: u64,
}

impl Steady {
    /// The window's cost from the stand-in's accounting.
    pub fn measure(window: &Snapshot, pools: usize, seconds: f64) -> Self {
        Self {
            pools,
            seconds,
            reports: report_writes(window),
            operator_writes: operator_writes(window),
            all_writes: window.count(is_write),
            child_applies: child_applies(window),
            pool_watch_events: pool_watch_events(window),
            requests: window.requests_total(),
            watch_bytes: window.watches.iter().map(|w| w.bytes).sum(),
        }
    }

    /// Per pool per minute.
    pub fn per_pool_minute(&self, x: u64) -> f64 {
        x as f64 / self.pools.max(1) as f64 / (self.seconds / 60.0)
    }

    /// Budgets broken, as sentences (none in a healthy run): the pods reported; the
    /// operator applied no child and wrote at most once per pool per minute (it need
    /// not act on a steady report); each report reached at most two watch events.
    pub fn violations(&self) -> Vec<String> {
        let mut broken = Vec::new();
        if self.reports == 0 {
            broken.push("the pods wrote no report".to_string());
        }
        if self.child_applies > 0 {
            broken.push(format!(
                "{} child applies without a spec change",
                self.child_applies
            ));
        }
        let writes = self.per_pool_minute(self.operator_writes);
        if writes > 1.0 {
            broken.push(format!("operator writes per pool per minute: {writes:.2}"));
        }
        if self.pool_watch_events > 2 * self.reports {
            broken.push(format!(
                "{} pool watch events for {} reports",
                self.pool_watch_events, self.reports
            ));
        }
        broken
    }
}

impl std::fmt::Display for Steady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} s: {} reports ({:.1}/pool/min), operator writes {} ({:.2}/pool/min), \
             all writes {} ({:.1}/pool/min), child applies {}, pool watch events {} ({:.2}/report), \
             requests {} ({:.0}/s), watch bytes {:.0}/s",
            self.seconds,
            self.reports,
            self.per_pool_minute(self.reports),
            self.operator_writes,
            self.per_pool_minute(self.operator_writes),
            self.all_writes,
            self.per_pool_minute(self.all_writes),
            self.child_applies,
            self.pool_watch_events,
            self.pool_watch_events as f64 / self.reports.max(1) as f64,
            self.requests,
            self.requests as f64 / self.seconds,
            self.watch_bytes as f64 / self.seconds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sizes_the_policy_keeps() {
        // 450 agents: only 5 pods (4 would hold 112 each, 6 only 75).
        assert!(policy_keeps(5, 450) && !policy_keeps(4, 450) && !policy_keeps(6, 450));
        // 250 agents: 3 pods (83 each, below the band, but 2 would be over it).
        assert!(policy_keeps(3, 250) && !policy_keeps(2, 250));
        // 950 agents: 9 or 10 pods.
        assert!(policy_keeps(9, 950) && policy_keeps(10, 950) && !policy_keeps(8, 950));
        assert!(!policy_keeps(0, 0));
    }

    #[test]
    fn balanced_wants_every_pod_reporting_and_none_heavy() {
        let mut pool: ConnectionPool =
            serde_json::from_value(pool_manifest("p", "ns", 3, 10)).expect("manifest");
        let report = |i: i32, connections: i64| {
            serde_json::from_value::<tether_crds::PodReport>(
                json!({"name": format!("p-{i}"), "connections": connections, "ready": true}),
            )
            .expect("report")
        };
        let mut status = tether_crds::ConnectionPoolStatus {
            pods: vec![report(0, 100), report(1, 100)],
            ..Default::default()
        };
        pool.status = Some(status.clone());
        assert!(!balanced(&pool, 3), "a pod has not reported");
        status.pods.push(report(2, 100));
        status.pods.push(report(9, 100_000)); // not one of the 3: ignored
        pool.status = Some(status.clone());
        assert!(balanced(&pool, 3));
        status.pods[0].connections = 400; // mean 200, bound 250 at the default spread
        pool.status = Some(status.clone());
        assert!(!balanced(&pool, 3), "a heavy pod");
        pool.spec.scaling.rebalance_spread_percent = 0; // rebalancing off
        assert!(balanced(&pool, 3));
    }
}

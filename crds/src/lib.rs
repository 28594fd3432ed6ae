//! The `ConnectionPool` custom resource (`tether.dev/v1alpha1`).
//!
//! One `ConnectionPool` per tenant describes a gateway fleet: how many pods, how they
//! scale, the limits each pod enforces, how agents and backends authenticate, where agent
//! messages go, how pods route pushes to each other and how they drain. The operator
//! (`tether-operator`) turns it into a StatefulSet and its companions; each gateway pod
//! reports its connection count into `status.pods[]`.
//!
//! ```text
//!   ConnectionPoolSpec ──(operator: pure builders)──► StatefulSet, Services, PDB, RBAC, ConfigMap
//!          ▲                                                   │
//!          │ kubectl apply                                     ▼ pods
//!   ConnectionPoolStatus ◄── status.pods[<pod>] (SSA, one field manager per pod)
//!                       ◄── everything else (SSA, field manager `tether-operator`)
//! ```
//!
//! The types are the single source of truth: the schema (with bounds, enums, patterns and
//! CEL rules for cross-field constraints) and `kubectl explain` descriptions come from
//! them, and the `crdgen` binary renders the YAML committed under `crds/` and the Helm
//! chart. [`check_generated`] is what CI uses to refuse a stale copy.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvVar, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Tether resource.
pub const GROUP: &str = "tether.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Condition type: the pool serves agents at its desired size with the current spec.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: a rollout or a resize is under way.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: the pool cannot reach its desired state (bad spec, missing Secret,
/// API errors); the reason and message say why.
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Condition type: the gateway StatefulSet can create its pods. False (reason
/// `FailedCreate`) when the StatefulSet controller's last attempt was refused (a
/// ResourceQuota, a PodSecurity level, a missing PriorityClass), with the API server's
/// message.
pub const CONDITION_PODS_CREATABLE: &str = "PodsCreatable";
/// Condition type (pools with routing): every gateway pod reaches the message bus
/// (`True`), some report they do not (`False`, reason `PodsDisconnected`, with how many),
/// or none has said yet (`Unknown`). Readiness does not depend on it.
pub const CONDITION_BUS_AVAILABLE: &str = "BusAvailable";
/// Condition type (managed NATS): the NATS objects are applied (`True`), or why not
/// (`False`: `NatsRejected`, `NatsApplyFailed`, `NatsRecreating`,
/// `NatsVolumeResizeFailed`). A NATS failure never stops the gateways or scaling.
pub const CONDITION_NATS_APPLIED: &str = "NatsApplied";

/// A DNS-1123 label: what a tenant id must look like, since it ends up in names and labels.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain: what a Secret name must look like.
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A Secret data key.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// Spec of a ConnectionPool: one tenant's fleet of WebSocket gateway pods.
// Each printer column repeats `type_ = ...`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "ConnectionPool",
    plural = "connectionpools",
    singular = "connectionpool",
    shortname = "cpool",
    category = "tether",
    namespaced,
    status = "ConnectionPoolStatus",
    derive = "PartialEq",
    doc = "A ConnectionPool is one tenant's autoscaled fleet of Tether WebSocket gateways: agents connect to it, tenant backends push to them through it.",
    scale(
        spec_replicas_path = ".spec.replicas.min",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Tenant",
        type_ = "string",
        json_path = ".spec.tenant",
        description = "Tenant id"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.totalConnections",
        description = "Open agent connections over all pods"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Gateway pods that exist"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas",
        description = "Gateway pods the operator wants"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Gateway pods that pass their readiness probe"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.scaling.targetConnectionsPerPod * (100 + self.scaling.tolerancePercent) < self.limits.maxConnectionsPerPod * 100",
        "message": "scaling.targetConnectionsPerPod plus scaling.tolerancePercent must stay below limits.maxConnectionsPerPod: pods must have headroom left when the pool scales up, or new agents are refused while the autoscaler sees nothing to do"
    },
    {
        "rule": "self.tenant == oldSelf.tenant",
        "message": "tenant is immutable: agents' tokens and the bus subjects are bound to it (create a new pool instead)"
    },
    {
        "rule": "self.replicas.max == 1 || has(self.routing)",
        "message": "routing is required when replicas.max > 1: pods need a message bus to reach agents connected to other pods"
    },
    {
        "rule": "!has(self.delivery) || has(self.routing)",
        "message": "delivery needs routing: the durable queue is a NATS JetStream stream"
    },
    {
        "rule": "!has(self.delivery) || !has(self.routing) || !has(self.routing.nats.managed) || !self.routing.nats.managed || (has(self.delivery.replicas) ? self.delivery.replicas : 1) <= (has(self.routing.nats.replicas) ? self.routing.nats.replicas : 1)",
        "message": "delivery.replicas cannot exceed routing.nats.replicas: each stream replica needs its own NATS server"
    }
]))]
pub struct ConnectionPoolSpec {
    /// Tenant id (a DNS label). Agents' tokens whose `tenant` claim differs are refused;
    /// it also namespaces the pool's subjects on the message bus.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub tenant: String,

    /// Bounds of the number of gateway pods; the autoscaler stays within them.
    pub replicas: ReplicasSpec,

    /// How the pool grows and shrinks with its connection count.
    #[serde(default)]
    pub scaling: ScalingSpec,

    /// Limits each gateway pod enforces.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// How agents (JWT) and tenant backends (API keys) authenticate.
    pub auth: AuthSpec,

    /// Where agents' messages go: an HTTP endpoint of the tenant's backend. Without it,
    /// messages agents send are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamSpec>,

    /// The message bus between pods. Required when `replicas.max` > 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSpec>,

    /// Durable delivery: a per-agent queue on the pool's NATS JetStream, so pushes
    /// for an agent that is between connections are delivered, in order and
    /// acknowledged, when it is back. Without it, pushes go straight to the agent's
    /// socket (404 when it is not connected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,

    /// How a gateway pod empties itself before it stops (scale-down, rollout, eviction).
    #[serde(default)]
    pub drain: DrainSpec,

    /// How the operator replaces the gateway pods when their template changes (image,
    /// env, configuration): in batches, each drained before it is replaced.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Pod template knobs of the gateway pods.
    #[serde(default)]
    pub template: PodTemplateSpec,

    /// How many gateway pods voluntary disruptions (node drains, evictions) may take at
    /// once: the pool's PodDisruptionBudget.
    #[serde(default)]
    pub disruption: DisruptionSpec,

    /// The client-facing Service that agents connect to.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Quotas: rates of the push API's sending calls (pushes, requests, group sends,
    /// broadcasts), enforced by each gateway pod (over one, a call gets 429 with
    /// `Retry-After`), and a pool-wide connection cap. Unset: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<QuotasSpec>,

    /// Who may reach the push API (port `api`, 8081) through the pool's NetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiSpec>,

    /// TLS terminated by the gateways themselves on the agents' port (ws, 8080), for when nothing in front of them (an L4 load balancer) terminates it. The port then speaks only TLS. The certificate is reloaded when the Secret changes, without dropping open connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<GatewayTlsSpec>,

    /// Longest time between two status reports of a gateway pod, in seconds. Pods report
    /// on change, at most this far apart; entries older than three intervals are stale.
    #[serde(default = "default_report_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub report_interval_seconds: i32,

    /// Most status reports per second the whole pool sends in steady state. Every report
    /// rewrites the pool object, whose size grows with its pods, so a large pool's pods
    /// report less often: past `maxReportsPerSecond × reportIntervalSeconds` pods
    /// (`replicas.max`) the interval stretches to `replicas.max / maxReportsPerSecond`
    /// seconds.
    #[serde(default = "default_max_reports_per_second")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_reports_per_second: i32,
}

fn default_report_interval() -> i32 {
    10
}

fn default_max_reports_per_second() -> i32 {
    20
}

impl ConnectionPoolSpec {
    /// The report interval the pool's pods use and the operator judges staleness by:
    /// `reportIntervalSeconds`, stretched so that `replicas.max` pods reporting once per
    /// interval stay within `maxReportsPerSecond`. It depends on the spec alone (the
    /// largest size, not the current one), so a resize never changes the pods'
    /// configuration.
    pub fn effective_report_interval_seconds(&self) -> i32 {
        let configured = self.report_interval_seconds.max(1);
        let pods = self.replicas.max.max(1);
        let rate = self.max_reports_per_second.max(1);
        // Ceiling division: the pool may never go over its rate.
        let stretched = pods.saturating_add(rate - 1) / rate;
        configured.max(stretched)
    }
}

/// Most gateway pods a pool may have (`replicas.max`), and so most entries in
/// `status.pods` and `status.instructions`: what keeps the pool object under 1 MiB
/// (see [`ReplicasSpec::max`]).
pub const MAX_POOL_PODS: i32 = 800;

/// Bounds of the pool's size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    { "rule": "self.min <= self.max", "message": "replicas.min must not exceed replicas.max" }
]))]
pub struct ReplicasSpec {
    /// Fewest gateway pods, also while idle. `kubectl scale` sets this field.
    #[schemars(range(min = 1, max = MAX_POOL_PODS))]
    pub min: i32,
    /// Most gateway pods. At most 800: the pool object carries one status entry per pod
    /// (each written under the pod's own field manager, so with a managedFields entry)
    /// and an instruction per pod at most; at 800 pods, every field at its widest, it is
    /// measured at 0.96 MB, under 1 MiB and within etcd's 1.5 MiB object limit (1,000
    /// pods measured 1.20 MB; docs/operator.md, "How big the pool object gets").
    #[schemars(range(min = 1, max = MAX_POOL_PODS))]
    pub max: i32,
}

/// Autoscaling policy: desired pods = ceil(total connections / target), within a
/// tolerance band, bounded by `replicas` and by the per-step limits below.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// Connections per pod the autoscaler aims for.
    #[serde(default = "default_target_connections")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub target_connections_per_pod: i32,
    /// How fast the pool grows.
    #[serde(default)]
    pub scale_up: ScaleUpSpec,
    /// How fast the pool shrinks (every removed pod is drained first).
    #[serde(default)]
    pub scale_down: ScaleDownSpec,
    /// Dead band around the target, in percent: no resize while the mean connections per
    /// pod is within this many percent of the target. An integer, per the Kubernetes API
    /// conventions (no floats in specs).
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0, max = 100))]
    pub tolerance_percent: i32,
    /// Rebalancing after a scale-up: pods holding more than this many percent above the
    /// mean connections per pod are asked to shed the excess gradually (`reconnect`
    /// hints at `drain.connectionsPerSecond`), until every pod is within the bound.
    /// 0 turns rebalancing off.
    #[serde(default = "default_rebalance_spread")]
    #[schemars(range(min = 0, max = 1000))]
    pub rebalance_spread_percent: i32,
    /// When a rebalancing episode may start, what it may shed and how it backs off
    /// (docs/autoscaling.md, "Rebalance").
    #[serde(default)]
    pub rebalance: RebalanceSpec,
}

/// Rebalancing rules that keep it from destroying what it balances: wait for arrivals to
/// settle, close the heavy pods to newcomers during an episode, hold one shed budget
/// across episodes and back off when shed agents do not come back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// An episode starts only once the pool's total connections moved by less than
    /// `settlePercent` over this many seconds (stretched to two report intervals, the
    /// pace at which small changes are reported): while agents still arrive, the Service
    /// fills the new pods anyway, and shedding then only adds reconnects.
    #[serde(default = "default_settle_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub settle_seconds: i32,
    /// How much the total may move (percent of it) within `settleSeconds` and still
    /// count as settled.
    #[serde(default = "default_settle_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub settle_percent: i32,
    /// The shed budget's window, in seconds: from the first episode on, for this long the
    /// pool sheds in all no more than the excess measured when that episode began, however
    /// many episodes (resizes) follow. Kept in `status.rebalance`, so an operator restart
    /// does not renew it.
    #[serde(default = "default_budget_window_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub budget_window_seconds: i32,
    /// After an episode whose shed agents did not come back, no new episode for this
    /// many seconds, doubled after each further such episode (capped at one hour);
    /// an episode whose agents came back resets it.
    #[serde(default = "default_backoff_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub backoff_seconds: i32,
    /// The first round of an episode sheds at most this share (percent) of each heavy
    /// pod's excess; the rest follows only once those agents came back. An episode whose
    /// agents do not return (behind a NAT that dropped them, or not running a reconnecting
    /// SDK) thus destroys at most this share of the excess.
    #[serde(default = "default_first_round_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub first_round_percent: i32,
    /// How long one "admission closed" instruction keeps a pod unready and refusing
    /// upgrades unless the operator renews it (it does while the episode lasts). An
    /// operator that dies mid-episode therefore leaves no pod closed for longer than
    /// this (at least three report intervals are used).
    #[serde(default = "default_admission_close_seconds")]
    #[schemars(range(min = 5, max = 3600))]
    pub admission_close_seconds: i32,
}

fn default_settle_seconds() -> i32 {
    30
}

fn default_settle_percent() -> i32 {
    2
}

fn default_budget_window_seconds() -> i32 {
    600
}

fn default_backoff_seconds() -> i32 {
    60
}

fn default_first_round_percent() -> i32 {
    25
}

fn default_admission_close_seconds() -> i32 {
    30
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        Self {
            settle_seconds: default_settle_seconds(),
            settle_percent: default_settle_percent(),
            budget_window_seconds: default_budget_window_seconds(),
            backoff_seconds: default_backoff_seconds(),
            first_round_percent: default_first_round_percent(),
            admission_close_seconds: default_admission_close_seconds(),
        }
    }
}

fn default_rebalance_spread() -> i32 {
    25
}

fn default_target_connections() -> i32 {
    10_000
}

fn default_tolerance() -> i32 {
    10
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            target_connections_per_pod: default_target_connections(),
            scale_up: ScaleUpSpec::default(),
            scale_down: ScaleDownSpec::default(),
            tolerance_percent: default_tolerance(),
            rebalance_spread_percent: default_rebalance_spread(),
            rebalance: RebalanceSpec::default(),
        }
    }
}

/// Scale-up rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleUpSpec {
    /// Most pods added in one step.
    #[serde(default = "default_up_step")]
    #[schemars(range(min = 1, max = 100))]
    pub max_pods_per_step: i32,
    /// Least time between two scale-up steps, in seconds.
    #[serde(default = "default_up_period")]
    #[schemars(range(min = 1, max = 3600))]
    pub period_seconds: i32,
}

fn default_up_step() -> i32 {
    4
}

fn default_up_period() -> i32 {
    30
}

impl Default for ScaleUpSpec {
    fn default() -> Self {
        Self {
            max_pods_per_step: default_up_step(),
            period_seconds: default_up_period(),
        }
    }
}

/// Scale-down rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownSpec {
    /// How long the lower desired size must hold before pods are removed, in seconds, so
    /// that a short dip does not cost a drain.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 86400))]
    pub stabilization_seconds: i32,
    /// Most pods drained and removed in one step.
    #[serde(default = "default_down_step")]
    #[schemars(range(min = 1, max = 100))]
    pub max_pods_per_step: i32,
}

fn default_stabilization() -> i32 {
    300
}

fn default_down_step() -> i32 {
    1
}

impl Default for ScaleDownSpec {
    fn default() -> Self {
        Self {
            stabilization_seconds: default_stabilization(),
            max_pods_per_step: default_down_step(),
        }
    }
}

/// Limits each gateway pod enforces.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Most concurrent agent connections on one pod; more are refused with 503 before the
    /// WebSocket upgrade.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections_per_pod: i32,
    /// Largest WebSocket message (and push body) accepted, in bytes.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 128, max = 16_777_216))]
    pub max_message_bytes: i32,
    /// Messages queued for one agent before it counts as a slow consumer and is closed.
    #[serde(default = "default_outbound_queue")]
    #[schemars(range(min = 1, max = 65536))]
    pub outbound_queue: i32,
    /// Sustained messages per second one agent may send (bursts up to twice that).
    #[serde(default = "default_messages_per_second")]
    #[schemars(range(min = 1, max = 100_000))]
    pub messages_per_second_per_connection: i32,
    /// Close a connection that sent nothing for this long, in seconds; 0 disables it
    /// (pings still detect dead peers).
    #[serde(default)]
    #[schemars(range(min = 0, max = 604_800))]
    pub idle_timeout_seconds: i32,
}

fn default_max_connections() -> i32 {
    20_000
}

fn default_max_message_bytes() -> i32 {
    65_536
}

fn default_outbound_queue() -> i32 {
    64
}

fn default_messages_per_second() -> i32 {
    50
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_connections_per_pod: default_max_connections(),
            max_message_bytes: default_max_message_bytes(),
            outbound_queue: default_outbound_queue(),
            messages_per_second_per_connection: default_messages_per_second(),
            idle_timeout_seconds: 0,
        }
    }
}

/// Rate quotas of the push API, per gateway pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotasSpec {
    /// The rate each API key may send at; a key over it gets 429 while other keys go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_api_key: Option<RateQuotaSpec>,
    /// The rate all of the tenant's API keys together may send at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_tenant: Option<RateQuotaSpec>,
    /// Most agent connections of the whole pool, all pods together (the pods count over
    /// the bus, at most a second late). More are refused with 503, and are not scaling
    /// demand: the pool does not grow for agents its cap would refuse anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_connections: Option<i64>,
}

/// A token bucket: `perSecond` calls a second on average, bursts of `burst`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    { "rule": "self.burst >= self.perSecond", "message": "burst must be at least perSecond" }
]))]
pub struct RateQuotaSpec {
    /// Sustained calls per second.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub per_second: i32,
    /// Calls allowed at once after a quiet period.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub burst: i32,
}

/// One key of a Secret in the pool's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (same namespace as the pool).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

/// TLS on the gateways' public port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTlsSpec {
    /// A kubernetes.io/tls Secret in the pool's namespace: its tls.crt (PEM chain, leaf first) and tls.key are mounted read-only into the gateway pods.
    pub secret_ref: SecretNameRef,
}

/// A Secret named by itself (its keys are fixed by its type).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretNameRef {
    /// Name of the Secret (same namespace as the pool).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// Authentication of agents and tenant backends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// How agents' JWTs (sent before the WebSocket upgrade) are verified.
    pub jwt: JwtSpec,
    /// Secret key holding the push API's keys, one per line (`#` starts a comment).
    /// Tenant backends send one as `Authorization: Bearer <key>`.
    pub api_keys_secret_ref: SecretKeyRef,
    /// How long a revocation (`POST /v1/agents/{id}/revoke`) without an explicit
    /// `until` lasts, in seconds: at least the longest lifetime of the agents' tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub revocation_default_seconds: Option<i32>,
}

/// Agent token verification. Exactly one key source: a shared HS256 secret, or PEM
/// public keys (RS256/ES256) — never both, which would invite algorithm confusion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.secretRef) ? 1 : 0) + (has(self.publicKeysSecretRef) ? 1 : 0) + (has(self.jwks) ? 1 : 0) == 1",
        "message": "set exactly one of auth.jwt.secretRef (HS256), auth.jwt.publicKeysSecretRef and auth.jwt.jwks (RS256/ES256)"
    }
]))]
pub struct JwtSpec {
    /// Secret key holding the HS256 shared secret (raw bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the public keys of RS256/ES256 tokens: one or more PEM blocks
    /// (RSA, EC P-256), or a JWKS document (`{"keys":[...]}`) whose `kid`s select the
    /// key a token names, so keys rotate by `kid` without a restart (re-read every 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_keys_secret_ref: Option<SecretKeyRef>,
    /// Public keys of RS256/ES256 tokens fetched from an identity provider's JWKS URL,
    /// cached and refreshed, so its key rotations need no Secret update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<JwksSpec>,
    /// Required `iss` claim, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: Option<String>,
    /// Required `aud` claim, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub audience: Option<String>,
}

/// A JWKS URL the gateways fetch agents' token keys from (system CA roots).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.maxStaleSeconds >= self.refreshIntervalSeconds",
        "message": "jwks.maxStaleSeconds must be at least jwks.refreshIntervalSeconds"
    }
]))]
pub struct JwksSpec {
    /// The `https://` URL of the JWKS document.
    #[schemars(length(min = 9, max = 2048), regex(pattern = "^https://"))]
    pub url: String,
    /// How often the key set is fetched again, in seconds. A token naming an unknown
    /// `kid` also fetches it, at most once per 10 seconds.
    #[serde(default = "default_jwks_refresh")]
    #[schemars(range(min = 10, max = 86_400))]
    pub refresh_interval_seconds: i32,
    /// How long the last good key set is used while the URL fails, in seconds; past it
    /// every token is refused until a fetch succeeds.
    #[serde(default = "default_jwks_max_stale")]
    #[schemars(range(min = 10, max = 604_800))]
    pub max_stale_seconds: i32,
}

fn default_jwks_refresh() -> i32 {
    300
}

fn default_jwks_max_stale() -> i32 {
    86_400
}

/// An agent event forwarded to the upstream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamEvent {
    /// An agent connected.
    Connect,
    /// An agent disconnected.
    Disconnect,
    /// An agent sent a message (`send`, `request`, binary frame).
    Message,
}

/// The tenant backend endpoint that receives agents' messages and events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// URL the gateway POSTs to (`http://` or `https://`).
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Secret key holding the HMAC-SHA256 key (at least 32 bytes) that signs each POST
    /// (`X-Tether-Signature`). Required: an unsigned upstream would accept forged agent
    /// messages from anyone who can reach it.
    pub secret_ref: SecretKeyRef,
    /// Deadline of one POST, in milliseconds.
    #[serde(default = "default_upstream_timeout")]
    #[schemars(range(min = 1, max = 300_000))]
    pub timeout_ms: i32,
    /// Events forwarded; `message` is needed for agents' `send` and `request`.
    #[serde(default = "default_upstream_events")]
    #[schemars(length(max = 3), extend("x-kubernetes-list-type" = "set"))]
    pub events: Vec<UpstreamEvent>,
}

fn default_upstream_timeout() -> i32 {
    5_000
}

fn default_upstream_events() -> Vec<UpstreamEvent> {
    vec![UpstreamEvent::Message]
}

/// The message bus between gateway pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// NATS: either an existing server (`url`) or one the operator runs for this pool
    /// (`managed: true`).
    pub nats: NatsRoutingSpec,
}

/// NATS settings: exactly one of `url` and `managed: true`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.url) != (has(self.managed) && self.managed)",
        "message": "set exactly one of routing.nats.url and routing.nats.managed: true"
    },
    {
        "rule": "!has(self.tls) || has(self.url)",
        "message": "routing.nats.tls applies to an existing NATS (url)"
    },
    {
        "rule": "has(self.url) || !has(self.auth) || !(has(self.auth.nkeySeedSecretRef) || has(self.auth.credsSecretRef))",
        "message": "a managed NATS takes routing.nats.auth user/passwordSecretRef or tokenSecretRef"
    },
    {
        "rule": "!has(self.replicas) || (has(self.managed) && self.managed)",
        "message": "routing.nats.replicas sizes a managed NATS (managed: true); an existing NATS (url) is sized where it runs"
    },
    {
        "rule": "!has(self.replicas) || self.replicas % 2 == 1",
        "message": "routing.nats.replicas must be odd (1, 3, 5 or 7): a NATS cluster's JetStream needs a majority of its servers, and an even count tolerates no more failures than the odd count below it"
    },
    {
        "rule": "!has(self.resources) || (has(self.managed) && self.managed)",
        "message": "routing.nats.resources applies to a managed NATS (managed: true)"
    }
]))]
pub struct NatsRoutingSpec {
    /// Server URL(s) of an existing NATS (JetStream enabled), comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(nats|tls)://[^\s]+$"))]
    pub url: Option<String>,
    /// Run a small NATS server for this pool, owned by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<bool>,
    /// Credentials the gateways present to NATS. Anything that can publish on the
    /// pool's subjects can push to or disconnect its agents: give each pool an account
    /// limited to its own subjects. With `managed: true` the operator's NATS requires
    /// these (user + password, or token) from every client; without them it generates a
    /// token (Secret `<pool>-nats-auth`, key `token`), so a managed NATS never runs open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<NatsAuthSpec>,
    /// TLS to an existing NATS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTlsSpec>,
    /// Servers of a managed NATS (default 1): an odd count. With 3 or more they form a
    /// cluster (routes over the `<pool>-nats-cluster` headless Service), one server may
    /// go away (a PodDisruptionBudget allows one at a time; pods prefer distinct nodes),
    /// and the pool's JetStream streams and buckets keep 3 replicas, so a durable
    /// message stored once survives the loss of any one server. Changing it rolls the
    /// NATS servers one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 7))]
    pub replicas: Option<i32>,
    /// CPU and memory requests and limits of each managed NATS server (default:
    /// requests 100m CPU and 256Mi, limit 1Gi memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// NATS credentials, each from a Secret key: one of user + password, token, NKey seed
/// or a `.creds` file.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.user) ? 1 : 0) + (has(self.tokenSecretRef) ? 1 : 0) + (has(self.nkeySeedSecretRef) ? 1 : 0) + (has(self.credsSecretRef) ? 1 : 0) <= 1",
        "message": "set one of user, tokenSecretRef, nkeySeedSecretRef and credsSecretRef"
    },
    {
        "rule": "has(self.user) == has(self.passwordSecretRef)",
        "message": "user and passwordSecretRef go together"
    }
]))]
pub struct NatsAuthSpec {
    /// User name (with `passwordSecretRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub user: Option<String>,
    /// Secret key holding the password of `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding an NKey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding a `.creds` file (user JWT + NKey seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_secret_ref: Option<SecretKeyRef>,
}

/// TLS to NATS, each file from a Secret key.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.certSecretRef) == has(self.keySecretRef)",
        "message": "certSecretRef and keySecretRef go together"
    }
]))]
pub struct NatsTlsSpec {
    /// CA bundle (PEM) that signs the server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Client certificate (PEM), for servers that verify clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_secret_ref: Option<SecretKeyRef>,
    /// Key of the client certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretKeyRef>,
}

/// The durable per-agent queue (docs/routing.md, "Durable delivery").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// The delivery of a push that does not ask (`?delivery=direct|durable`).
    #[serde(default)]
    pub mode: DeliveryMode,
    /// An unacknowledged message older than this is removed (0: kept until acknowledged).
    #[serde(default = "default_delivery_max_age")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub max_age_seconds: i32,
    /// Pending messages per agent; a push beyond it is refused (429), nothing is dropped.
    #[serde(default = "default_delivery_max_messages")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_messages_per_agent: i32,
    /// Bytes of pending messages of the whole pool; a push beyond it is refused (429).
    /// 0: no limit but the NATS server's storage. (JetStream limits messages per
    /// subject, not bytes, so there is no per-agent byte limit.)
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_bytes: i64,
    /// Replicas of the stream (1 for a single NATS server, 3 on a NATS cluster). On a
    /// managed NATS of 3 or more servers (`routing.nats.replicas`) the stream keeps at
    /// least 3, whatever this says.
    #[serde(default = "default_delivery_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    /// Size of the managed NATS's JetStream volume (a PersistentVolumeClaim per NATS
    /// pod, e.g. `10Gi`). Without it a managed NATS keeps JetStream in an `emptyDir`:
    /// stored messages survive gateway crashes and NATS container restarts, but not the
    /// NATS pod's deletion. Ignored for an existing NATS (`routing.nats.url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Quantity>,
}

/// How a push to one agent is delivered.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeliveryMode {
    /// Into the agent's outbound queue on its pod; 404 when it is not connected.
    #[default]
    Direct,
    /// Stored first (202 once stored), delivered and acknowledged whenever the agent is
    /// connected.
    Durable,
}

fn default_delivery_max_age() -> i32 {
    7 * 24 * 3600
}

fn default_delivery_max_messages() -> i32 {
    1000
}

fn default_delivery_replicas() -> i32 {
    1
}

/// How a gateway pod drains: it turns unready, sends agents a `reconnect` hint and
/// closes their sockets at a bounded rate, then exits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Connections closed per second while draining.
    #[serde(default = "default_drain_rate")]
    #[schemars(range(min = 1, max = 100_000))]
    pub connections_per_second: i32,
    /// After this long the remaining connections are closed at once. The pods' grace
    /// period is set above it.
    #[serde(default = "default_drain_deadline")]
    #[schemars(range(min = 1, max = 3600))]
    pub deadline_seconds: i32,
    /// Upper bound of the random delay in each `reconnect` hint, in milliseconds, so that
    /// agents do not all come back at once.
    #[serde(default = "default_drain_jitter")]
    #[schemars(range(min = 0, max = 600_000))]
    pub reconnect_jitter_ms: i32,
}

fn default_drain_rate() -> i32 {
    500
}

fn default_drain_deadline() -> i32 {
    60
}

fn default_drain_jitter() -> i32 {
    2_000
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            connections_per_second: default_drain_rate(),
            deadline_seconds: default_drain_deadline(),
            reconnect_jitter_ms: default_drain_jitter(),
        }
    }
}

/// The gateway pods' PodDisruptionBudget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionSpec {
    /// Most gateway pods a voluntary disruption may take down at once: a count (`2`) or
    /// a percentage of the pool's pods (`"10%"`, rounded up, so at least one pod). Each
    /// evicted pod drains and its agents reconnect to the others, so a larger value drains
    /// nodes faster at the cost of a larger reconnect wave. Pods that are not ready may
    /// always be evicted (`unhealthyPodEvictionPolicy: AlwaysAllow`): a crash-looping pod
    /// never blocks a node drain.
    // The rule reads both forms through `string(self)` (the CEL libraries that check it
    // client-side lack `type()`), so it lets a count written as a string (`"2"`) through;
    // the operator renders it as a number, as the PodDisruptionBudget API requires.
    #[serde(default = "default_max_unavailable")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "string(self).matches('^([1-9][0-9]*|(100|[1-9][0-9]?)%)$')",
        "message": "disruption.maxUnavailable must be a count of at least 1 or a percentage from 1% to 100%: 0 would block every node drain"
    }]))]
    pub max_unavailable: IntOrString,
}

/// How a template change reaches the pods. The StatefulSet's update strategy is
/// `OnDelete`: the operator, not the StatefulSet controller, picks the pods to replace.
/// Each batch is drained first (paced, jittered `reconnect` hints, as a scale-down
/// drains), then its pods are deleted and come back at the new revision; the next batch
/// starts once every pod is Ready again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "string(self.maxUnavailable).matches('^([1-9][0-9]{0,5}|([1-9][0-9]?|100)%)$')",
        "message": "rollout.maxUnavailable must be a count of pods (1 or more) or a percentage from 1% to 100%"
    }
]))]
pub struct RolloutSpec {
    /// Most pods replaced at once: a count (`2`) or a percentage of the pool (`"10%"`,
    /// rounded down, at least one pod; the Kubernetes IntOrString convention). The agents
    /// of at most this many pods are between pods at any time.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
    /// Stops starting new batches (a batch still draining is called off and its pods
    /// stay at the old revision); `false` resumes. Pods created meanwhile, by a
    /// scale-up, already run the new revision.
    #[serde(default)]
    pub paused: bool,
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::String("10%".into())
}

impl Default for DisruptionSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
        }
    }
}

impl DisruptionSpec {
    /// Pods the PodDisruptionBudget lets voluntary disruptions (evictions) take at once
    /// in a pool of `replicas`, as the disruption controller computes it: the count, or
    /// the percentage rounded *up*; never above the pool.
    pub fn pods_allowed(&self, replicas: i32) -> i32 {
        let replicas = replicas.max(0);
        let allowed = match &self.max_unavailable {
            IntOrString::Int(n) => i64::from(*n),
            IntOrString::String(s) => match s.strip_suffix('%') {
                Some(percent) => {
                    let percent = percent.parse::<i64>().unwrap_or(10).clamp(0, 100);
                    (i64::from(replicas) * percent + 99) / 100
                }
                None => s.parse().unwrap_or(1),
            },
        };
        i32::try_from(allowed.clamp(0, i64::from(replicas))).unwrap_or(replicas)
    }
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
            paused: false,
        }
    }
}

impl RolloutSpec {
    /// Pods per batch in a pool of `replicas`: the count, or the percentage rounded
    /// *down*, never below one nor above the pool (Kubernetes' rolling-update convention,
    /// as a StatefulSet's or a Deployment's `maxUnavailable`). A value the schema would
    /// refuse counts as the default. Rounded down where the PodDisruptionBudget rounds
    /// up ([`DisruptionSpec::pods_allowed`]): with the same value for both, a batch never
    /// takes more pods out than the budget lets evictions take.
    pub fn batch_size(&self, replicas: i32) -> i32 {
        let replicas = replicas.max(1);
        let wanted = match &self.max_unavailable {
            IntOrString::Int(n) => *n,
            IntOrString::String(s) => match s.strip_suffix('%') {
                Some(percent) => {
                    let percent = percent
                        .parse::<i64>()
                        .ok()
                        .filter(|p| (1..=100).contains(p))
                        .unwrap_or(10);
                    i32::try_from(i64::from(replicas) * percent / 100).unwrap_or(replicas)
                }
                // A count written as a string (the schema accepts `"3"` like `3`).
                None => s.parse().unwrap_or(1),
            },
        };
        wanted.clamp(1, replicas)
    }
}

/// When the kubelet pulls the gateway image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    /// Every pod start.
    Always,
    /// Only when the node lacks it.
    IfNotPresent,
    /// Never (the image must be on the node).
    Never,
}

/// Knobs of the gateway pods' template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateSpec {
    /// Gateway image reference; defaults to the image the operator was installed with
    /// (its `--gateway-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Image pull policy of the gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Secrets (of the pool's namespace) holding credentials for a private registry,
    /// as in a pod's `imagePullSecrets`; used for the gateway image (and a managed
    /// NATS's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// CPU and memory requests and limits of the gateway container. Without it, the
    /// operator derives them from the pool's limits and the measured cost of a
    /// connection (docs/sizing.md): memory request 64Mi + 4.5 KiB ×
    /// `scaling.targetConnectionsPerPod`, memory limit 64Mi + 18 KiB ×
    /// `limits.maxConnectionsPerPod`, CPU request 50 µs × `targetConnectionsPerPod`
    /// (at least 100m), no CPU limit (a throttled gateway misses pings). Given, it
    /// replaces the defaults whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Topology spread constraints of the gateway pods. Without it, pods spread over
    /// zones (`topology.kubernetes.io/zone`) and nodes (`kubernetes.io/hostname`), each
    /// with `maxSkew: 1` and `whenUnsatisfiable: ScheduleAnyway` (a preference: a pool
    /// still scales on a single node). Given, it replaces the defaults (`[]`: no
    /// spreading); a constraint without `labelSelector` gets the pool's pod selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// PriorityClass of the gateway pods (it must exist, or the pods are refused and the
    /// pool's `PodsCreatable` condition says so). A gateway pod evicted to make room for
    /// another workload disconnects every agent it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub priority_class_name: Option<String>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Extra environment variables of the gateway container (e.g. `RUST_LOG`,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`). `POD_NAME`, `POD_NAMESPACE` and `TETHER_*` are
    /// reserved.
    // The reserved names are checked by the operator (an Event and a condition), not by
    // a CEL rule: a rule over an EnvVar list has an unbounded cost estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub env: Option<Vec<EnvVar>>,
    /// Extra annotations of the pods (e.g. for a service mesh or a log shipper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Access to the push API (the gateways' internal port).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// Callers admitted to the push API besides the pool's own pods and the pods of the
    /// pool's namespace labelled `tether.dev/api-client=<pool name>`: backends in other
    /// namespaces, or a Prometheus scraping `/metrics`. Each entry becomes a peer of the
    /// pool's NetworkPolicy rule for the `api` port; callers still need an API key for
    /// every route but /healthz, /readyz and /metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub allowed_from: Vec<ApiPeer>,
}

/// One NetworkPolicy peer admitted to the push API.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.namespaceSelector) || has(self.podSelector)",
        "message": "an api.allowedFrom entry needs namespaceSelector, podSelector or both"
    }
]))]
pub struct ApiPeer {
    /// Namespaces whose pods are admitted (by their labels, e.g.
    /// `kubernetes.io/metadata.name: backends`). `{}` selects every namespace. With
    /// podSelector: only the matching pods of those namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods admitted, in the pool's namespace (or, with namespaceSelector, in the
    /// selected namespaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Type of the client-facing Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster (behind an ingress or a mesh).
    #[default]
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// A cloud load balancer.
    LoadBalancer,
}

/// The client-facing Service agents connect to (public port only; the push API gets a
/// separate ClusterIP Service).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations of the Service (e.g. load balancer settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Observed state of a ConnectionPool. `pods[]` entries are written by the gateway pods
/// themselves (one field manager each); the rest by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolStatus {
    /// One entry per gateway pod, applied by that pod. At most one per pod of the largest
    /// pool (`replicas.max` ≤ 800): with each entry's managedFields, the pool object
    /// then stays under 1 MiB (etcd refuses objects over 1.5 MiB).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_POOL_PODS), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub pods: Vec<PodReport>,
    /// Open agent connections over all live pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_connections: Option<i64>,
    /// Gateway pods that exist (the StatefulSet's replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Gateway pods that pass their readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Gateway pods the operator wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Gateway pods at the StatefulSet's current template revision (its
    /// `updatedReplicas`): below `replicas` while a rollout is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
    /// When the operator last changed the number of pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Label selector of the pool's pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Ready, Progressing, Degraded and Scaling, in the standard condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The operator's record of its instructions to individual pods (drain before a
    /// scale-down, shed connections to rebalance after a scale-up). Gateway pods do not
    /// read it: each instruction is delivered on the annotation
    /// `tether.dev/instruction` of the pod's own Pod object, and the pod's report
    /// echoes the id it acts on (`pods[].instruction`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_POOL_PODS), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pod"]))]
    pub instructions: Vec<PodInstruction>,
    /// The rebalancing budget and back-off that outlive one episode (and one operator):
    /// written by the operator alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceStatus>,
}

/// What rebalancing remembers across episodes: the budget window and the back-off.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceStatus {
    /// When the window's first episode began; the window lasts
    /// `scaling.rebalance.budgetWindowSeconds`.
    pub window_start: Time,
    /// The excess measured when that episode began: the most the pool sheds within the
    /// window.
    #[schemars(range(min = 0))]
    pub budget: i64,
    /// Connections asked to be shed within the window so far.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub shed: i64,
    /// Episodes in a row whose shed agents did not come back.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    #[schemars(range(min = 0))]
    pub failures: i32,
    /// No new episode starts before this time (the back-off after `failures`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_until: Option<Time>,
}

fn is_zero_i32(n: &i32) -> bool {
    *n == 0
}

/// What the operator asks one gateway pod to do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodInstruction {
    /// The pod the instruction is for.
    #[schemars(length(min = 1, max = 63))]
    pub pod: String,
    /// Identifies this instruction: a pod acts once per id, so a new rebalancing round
    /// gets a new id.
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// Drain: turn unready, refuse new agents and close every connection with a
    /// `reconnect` hint, without exiting; the operator removes the pod once it reports
    /// no connections (or `drain.deadlineSeconds` passed). Removing the instruction
    /// cancels the drain and the pod turns ready again.
    #[serde(default)]
    pub drain: bool,
    /// Shed: close this many connections gradually with `reconnect` hints, so that
    /// their agents reconnect through the Service to less loaded pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub shed: Option<i64>,
    /// When the operator issued the instruction (the drain deadline counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// Admission closed until then: during a rebalancing episode the pod is unready and
    /// refuses upgrades (503, as while shedding), so that shed agents land only on
    /// lighter pods. The operator renews it while the episode lasts and removes it when
    /// the episode ends; a pod whose operator died reopens at this time by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission_closed_until: Option<Time>,
}

/// Annotation on a gateway's own Pod object that carries its current instruction: the
/// JSON of a [`PodInstruction`] (`{"pod", "id", "drain"?, "shed"?, "issuedAt"?,
/// "admissionClosedUntil"?}`).
/// Only the operator writes it and only that pod reads it (a watch of one Pod by
/// `metadata.name`), so an instruction costs one watch event to one reader, whatever the
/// size of the pool. No annotation: no instruction (a drain under way is called off).
pub const INSTRUCTION_ANNOTATION: &str = "tether.dev/instruction";

/// Condition type: the autoscaler's last decision (reason `ScaledUp`, `ScaledDown`,
/// `Draining`, `Rebalancing`, `Stable`, ...), with the figures behind it in the message.
pub const CONDITION_SCALING: &str = "Scaling";

/// Condition type: a rollout of a new pod template (reason `RollingOut`, `Paused`,
/// `Waiting` while True; `RolloutComplete` when False), with the counts (`3/10 updated`)
/// in the message.
pub const CONDITION_ROLLING_OUT: &str = "RollingOut";

/// One gateway pod's report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    /// Pod name.
    // Bounded (a StatefulSet's pod name is a DNS label) so that the largest pool object
    // is a known size (docs/operator.md, "How big the pool object gets").
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Open agent connections on the pod.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100_000_000))]
    pub connections: i64,
    /// Agents refused because the pod was full (503 at `limits.maxConnectionsPerPod`)
    /// since its previous report: demand the pool could not serve, which the autoscaler
    /// counts as connections.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 100_000_000))]
    pub refused: i64,
    /// Id of the instruction (annotation `tether.dev/instruction`) the pod is acting on, or
    /// acted on last. The operator completes a drain only on a report that echoes the
    /// drain's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub instruction: Option<String>,
    /// The pod accepts new connections.
    #[serde(default)]
    pub ready: bool,
    /// The pod is draining: it accepts nothing and is closing its connections.
    #[serde(default)]
    pub draining: bool,
    /// The pod reaches the pool's message bus (NATS). Absent for a pod without one.
    /// Not part of `ready`: a pod serves its own agents without the bus; the operator
    /// turns these into the pool's `BusAvailable` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus_connected: Option<bool>,
    /// When the pod wrote this entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
    /// Random id of the gateway process, so a restarted pod with the same name is told
    /// apart from its predecessor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub boot_id: Option<String>,
    /// Durable messages pending across the pool's agents (`spec.delivery`), as this pod
    /// read them from the pool's stream when it reported: every pod reads the same
    /// pool-wide count, so any fresh entry shows the pool's backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_messages: Option<i64>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

// === generated YAML ===

/// The CRD as installed: the derived one with every description turned into what
/// `kubectl explain` shows well. Doc comments are written for rustdoc: hard-wrapped
/// lines (which `kubectl explain` prints as broken lines, since it wraps text itself)
/// and intra-doc links (`` [`Foo::bar`] ``) that mean nothing to a cluster user.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = ConnectionPool::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let mut value = serde_json::to_value(&*schema).expect("a schema serializes");
            clean_descriptions(&mut value);
            *schema = serde_json::from_value(value).expect("a cleaned schema deserializes");
        }
    }
    crd
}

fn clean_descriptions(node: &mut serde_json::Value) {
    match node {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = plain_description(text);
                    }
                    other => clean_descriptions(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(clean_descriptions),
        _ => {}
    }
}

/// A doc comment as plain text: paragraphs kept (blank lines), the lines of each joined
/// with spaces, and rustdoc links `` [`x`] `` / `[x]` reduced to `` `x` `` / `x`.
pub fn plain_description(text: &str) -> String {
    let paragraphs: Vec<String> = text
        .split("\n\n")
        .map(|p| {
            p.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|p| !p.is_empty())
        .collect();
    let joined = paragraphs.join("\n\n");
    let mut out = String::with_capacity(joined.len());
    let mut rest = joined.as_str();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        // A link is `[text]` not followed by `(` (a markdown link keeps its text only).
        match after.find(']') {
            Some(close) if !after[..close].contains('[') => {
                let inner = &after[..close];
                let tail = &after[close + 1..];
                let is_link = inner.starts_with('`') && inner.ends_with('`') && inner.len() > 1
                    || inner
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                        && inner.chars().next().is_some_and(|c| c.is_ascii_uppercase());
                if is_link {
                    out.push_str(inner);
                } else {
                    out.push('[');
                    out.push_str(inner);
                    out.push(']');
                }
                rest = tail;
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The CRD as YAML, exactly as committed under `crds/` and `charts/tether/crds/`.
pub fn crd_yaml() -> String {
    let crd = crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "# Generated by `cargo run -p tether-crds --bin crdgen -- --write` from crds/src/lib.rs.\n# Do not edit by hand.\n{body}"
    )
}

/// The files that hold a copy of the generated CRD, relative to the repository root.
pub const GENERATED_FILES: [&str; 2] = [
    "crds/connectionpool.yaml",
    "charts/tether/crds/connectionpool.yaml",
];

/// The generated field reference, relative to the repository root.
pub const REFERENCE_FILE: &str = "docs/crd.md";

/// Every generated file with its expected content.
pub fn generated() -> Vec<(&'static str, String)> {
    let yaml = crd_yaml();
    let mut files: Vec<_> = GENERATED_FILES.iter().map(|f| (*f, yaml.clone())).collect();
    files.push((REFERENCE_FILE, reference::markdown()));
    files
}

/// Returns the generated files under `root` whose content differs from what the types
/// generate (missing files count as different).
pub fn check_generated(root: &std::path::Path) -> Vec<String> {
    generated()
        .into_iter()
        .filter(|(rel, want)| std::fs::read_to_string(root.join(rel)).ok().as_deref() != Some(want))
        .map(|(rel, _)| rel.to_string())
        .collect()
}

pub mod reference;

#[cfg(test)]
mod tests;

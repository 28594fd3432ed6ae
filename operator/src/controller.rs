//! The reconcile loop: I/O around the pure builders, acting only on what changed.
//!
//! ```text
//!  pools (watch, cached) ──predicate: generation, deletion, finalizers, status.pods──┐
//!  children (metadata watches; StatefulSets in full, cached) ──changed by someone? ──┤
//!                                                            (marks the pool dirty) ▼
//!  reconcile(pool):  spec part — only when the generation moved, a child was changed
//!                    or deleted by someone else, or a missing Secret may have appeared:
//!                    validate, check Secrets, server-side apply every child
//!                    autoscale part — on every trigger (pod reports), at most once per
//!                    `scale_spacing` per pool: plan (pure), apply the StatefulSet alone
//!                    when its replicas change, deliver instructions to Pod annotations
//!                    status — built in one place (`status::pool_status`), written only
//!                    when an operator-owned field changed
//! ```
//!
//! A pod report therefore costs no child apply and no read: the pool and its
//! StatefulSet come from the watch caches. A spec the operator cannot act on becomes a
//! `Degraded` condition and a Warning Event, with nothing created; API failures return
//! an error and `error_policy` retries with a per-pool exponential backoff. Nothing here
//! panics on input.

use std::collections::HashMap;

use crate::creation::{CreationWatch, PodCreation};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self as kube_controller, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_crds::{CONDITION_DEGRADED, ConnectionPool};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::Metrics;
use crate::nats::{self, NatsProblem};
use crate::ownership;
use crate::resources::{self, Desired, MANAGED_BY, Settings};
use crate::status::{Observed, pool_status, worth_writing};
use crate::validate::{SpecError, validate};

/// The one field manager the operator applies with (children and status alike).
pub const FIELD_MANAGER: &str = "tether-operator";
/// Finalizer that makes deletion wait for the operator's cleanup.
pub const FINALIZER: &str = "tether.dev/cleanup";
/// Safety-net requeue of a healthy pool.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Least time between two autoscaling steps of one pool, by default: a pool of 1,000
/// pods sends ~100 reports a second, and one step per report would be wasted work.
pub const SCALE_SPACING: Duration = Duration::from_secs(1);
/// How soon a pool waiting for a Secret is looked at again, by default. Secrets are not
/// watched: that would cache every Secret of the cluster in the operator's memory.
pub const SECRET_RECHECK: Duration = Duration::from_secs(30);
/// Default of [`Context::reconcile_timeout`].
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a reconcile failed (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed (network, 5xx, 429, conflict...).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer helper failed, around one of ours or on its own patch.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// A ConnectionPool without a namespace (the CRD is namespaced, so a bug elsewhere).
    #[error("ConnectionPool has no namespace")]
    NoNamespace,
    /// The reconcile did not finish in time (an API call that never answered).
    #[error("reconcile did not finish within {0:?}")]
    TimedOut(Duration),
}

/// What every reconcile of one leadership term shares. A new term builds a new
/// Context: nothing learnt under an earlier lease (scaling history, what was applied)
/// carries over.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Who the Events name as their reporter (scaling decisions each get a fresh
    /// recorder from it: see `autoscale::after_apply`).
    pub reporter: Reporter,
    /// Operator-wide settings (default images).
    pub settings: Settings,
    /// Reconcile counters and timings.
    pub metrics: Arc<Metrics>,
    /// How soon a pool waiting for a Secret is looked at again.
    pub secret_recheck: Duration,
    /// Longest time one reconcile may take. kube's client sets no read timeout, and
    /// kube-runtime never runs two reconciles of one pool at once: without a bound, one
    /// API call that never answers freezes that pool (no scaling, no status) for good.
    pub reconcile_timeout: Duration,
    /// Least time between two autoscaling steps of one pool.
    pub scale_spacing: Duration,
    /// Consecutive failures per pool, for the backoff.
    failures: Mutex<HashMap<ObjectRef<ConnectionPool>, u32>>,
    /// Scaling memory per pool.
    pub autoscaler: crate::autoscale::Autoscaler,
    /// What the spec part last did per pool.
    applied: Mutex<HashMap<ObjectRef<ConnectionPool>, Applied>>,
    /// Changes and deletions of children seen by the watches, per pool, until its next
    /// reconcile reads them (`take_dirty`).
    dirty: Dirty,
    /// The resourceVersion each child had after the operator's own last apply, per pool:
    /// a watched change carrying it is our write coming back, not someone else's edit.
    written: Mutex<HashMap<ObjectRef<ConnectionPool>, HashMap<String, String>>>,
    /// When each pool's autoscaler last stepped.
    stepped: Mutex<HashMap<ObjectRef<ConnectionPool>, Instant>>,
    /// The managed NATS's last apply per pool: its problem, if any, and when to retry it
    /// (on its own: a NATS failure never holds the gateways or scaling).
    nats: Mutex<HashMap<ObjectRef<ConnectionPool>, NatsState>>,
    /// Since when each pool's StatefulSet is short of pods, and what its Events last
    /// said (see [`Context::pod_creation`]).
    pod_creation: Mutex<HashMap<ObjectRef<ConnectionPool>, CreationWatch>>,
    /// When the pool watch last delivered anything: the clock that report staleness is
    /// measured against (see `Autoscaler::step`).
    pool_watch_progress: Arc<Mutex<Instant>>,
    /// The pools, from the controller's own watch: the siblings a pool's children must
    /// not collide with (see `ownership`).
    pools: Store<ConnectionPool>,
    pool_writer: Mutex<Option<reflector::store::Writer<ConnectionPool>>>,
    /// The pools' StatefulSets, from a watch.
    stateful_sets: Store<StatefulSet>,
    stateful_set_writer: Mutex<Option<reflector::store::Writer<StatefulSet>>>,
}

type Dirty = Arc<Mutex<HashMap<ObjectRef<ConnectionPool>, Vec<ChildChange>>>>;

/// A change to a child that a watch delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChildChange {
    /// `Kind/name`.
    child: String,
    /// The version it changed to; `None` for a deletion.
    resource_version: Option<String>,
}

fn child_key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The managed NATS's last apply for one pool.
#[derive(Debug, Clone)]
struct NatsState {
    problem: Option<NatsProblem>,
    retry_at: Instant,
}

/// How soon a failed NATS apply is tried again: a re-create waits only for the old
/// StatefulSet to be gone; other failures back off a little.
fn nats_retry_after(problem: &NatsProblem) -> Duration {
    match problem {
        NatsProblem::Recreating { .. } => Duration::from_secs(1),
        NatsProblem::Api(_) => Duration::from_secs(5),
        NatsProblem::Rejected(_) | NatsProblem::Resize { .. } => Duration::from_secs(30),
    }
}

/// The outcome of the spec part for one pool.
#[derive(Debug, Clone)]
struct Applied {
    /// The generation it acted on.
    generation: Option<i64>,
    /// Why nothing could be applied, if so.
    problem: Option<SpecError>,
    /// The StatefulSet's replicas as last applied (ahead of the cache).
    replicas: Option<i32>,
}

// === impl Context ===

impl Context {
    /// Whether the StatefulSet's pods were created ([`crate::creation::observe`]). While
    /// pods are missing, the Events are listed only once the StatefulSet looks stalled
    /// and then at most once per report interval ([`CreationWatch`]): every report
    /// reconciles the pool, and a scale-up's pods are missing until they start.
    async fn pod_creation(
        &self,
        pool: &ConnectionPool,
        sts: Option<&StatefulSet>,
        now: Timestamp,
    ) -> PodCreation {
        let key = ObjectRef::from_obj(pool);
        if !sts.is_some_and(crate::creation::pods_missing) {
            lock(&self.pod_creation).remove(&key);
            return crate::creation::observe(&self.client, sts, now).await;
        }
        let every = crate::scaling::Policy::from_spec(&pool.spec).report_interval;
        let at = Instant::now();
        if let Some(answer) = lock(&self.pod_creation)
            .entry(key.clone())
            .or_insert_with(|| CreationWatch::new(at))
            .without_listing(at, every)
        {
            return answer;
        }
        let seen = crate::creation::observe(&self.client, sts, now).await;
        if let Some(watch) = lock(&self.pod_creation).get_mut(&key) {
            watch.listed(at, seen.clone());
        }
        seen
    }

    /// A context whose Events name `instance` as the reporting instance.
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        let (stateful_sets, writer) = reflector::store();
        let (pools, pool_writer) = reflector::store();
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            settings,
            metrics,
            secret_recheck: SECRET_RECHECK,
            reconcile_timeout: RECONCILE_TIMEOUT,
            scale_spacing: SCALE_SPACING,
            failures: Mutex::default(),
            autoscaler: Default::default(),
            applied: Mutex::default(),
            dirty: Dirty::default(),
            written: Mutex::default(),
            stepped: Mutex::default(),
            nats: Mutex::default(),
            pod_creation: Mutex::default(),
            pool_watch_progress: Arc::new(Mutex::new(Instant::now())),
            pools,
            pool_writer: Mutex::new(Some(pool_writer)),
            stateful_sets,
            stateful_set_writer: Mutex::new(Some(writer)),
        }
    }

    fn record_failure(&self, pool: ObjectRef<ConnectionPool>) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(pool).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn reset_failures(&self, pool: &ObjectRef<ConnectionPool>) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pool);
    }

    fn applied(&self, pool: &ObjectRef<ConnectionPool>) -> Option<Applied> {
        lock(&self.applied).get(pool).cloned()
    }

    fn record_applied(&self, pool: ObjectRef<ConnectionPool>, applied: Applied) {
        lock(&self.applied).insert(pool, applied);
    }

    /// Whether someone else changed or deleted one of the pool's children since the
    /// last look; the changes our own applies caused are no reason to apply again
    /// (each spec change would otherwise cost every child twice).
    fn take_dirty(&self, pool: &ObjectRef<ConnectionPool>) -> bool {
        let Some(changes) = lock(&self.dirty).remove(pool) else {
            return false;
        };
        let written = lock(&self.written);
        let ours = written.get(pool);
        changes.iter().any(|change| {
            change.resource_version.is_none()
                || ours.and_then(|w| w.get(&change.child)) != change.resource_version.as_ref()
        })
    }

    fn record_written<K: Resource<DynamicType = ()>>(
        &self,
        pool: &ObjectRef<ConnectionPool>,
        child: &K,
    ) {
        let (Some(name), Some(version)) = (&child.meta().name, &child.meta().resource_version)
        else {
            return;
        };
        lock(&self.written)
            .entry(pool.clone())
            .or_default()
            .insert(child_key(&K::kind(&()), name), version.clone());
    }

    /// Whether the pool's last NATS apply failed and is due for another try.
    fn nats_retry_due(&self, pool: &ObjectRef<ConnectionPool>) -> bool {
        lock(&self.nats)
            .get(pool)
            .is_some_and(|n| n.problem.is_some() && n.retry_at <= Instant::now())
    }

    /// Records a NATS apply's outcome; a new problem (or its end) is an Event.
    async fn record_nats(&self, pool: &ConnectionPool, problem: Option<NatsProblem>) {
        let key = ObjectRef::from_obj(pool);
        let retry_at = Instant::now() + problem.as_ref().map_or(Duration::ZERO, nats_retry_after);
        let before = lock(&self.nats)
            .insert(
                key,
                NatsState {
                    problem: problem.clone(),
                    retry_at,
                },
            )
            .and_then(|n| n.problem);
        match (&before, &problem) {
            (_, Some(now)) if before.as_ref() != Some(now) => {
                warn!(pool = %pool.name_any(), reason = now.reason(), %now, "managed NATS not applied; the gateways go on");
                if !matches!(now, NatsProblem::Recreating { .. }) {
                    publish(
                        self,
                        pool,
                        EventType::Warning,
                        now.reason(),
                        now.to_string(),
                    )
                    .await;
                }
            }
            (Some(_), None) => {
                publish(
                    self,
                    pool,
                    EventType::Normal,
                    "NatsApplied",
                    "the managed NATS objects are applied".into(),
                )
                .await;
            }
            _ => {}
        }
    }

    /// How long until the pool's autoscaler may step again (zero: now), noting a step.
    fn claim_step(&self, pool: &ObjectRef<ConnectionPool>) -> Duration {
        let mut stepped = lock(&self.stepped);
        let wait = stepped.get(pool).map_or(Duration::ZERO, |at| {
            self.scale_spacing.saturating_sub(at.elapsed())
        });
        if wait.is_zero() {
            stepped.insert(pool.clone(), Instant::now());
        }
        wait
    }

    /// The pool's StatefulSet as the watch cache has it.
    fn stateful_set(&self, pool: &ConnectionPool) -> Option<Arc<StatefulSet>> {
        let key = ObjectRef::new(&resources::base_name(pool))
            .within(&pool.namespace().unwrap_or_default());
        self.stateful_sets.get(&key)
    }

    fn forget(&self, pool: &ConnectionPool) {
        let key = ObjectRef::from_obj(pool);
        lock(&self.applied).remove(&key);
        lock(&self.stepped).remove(&key);
        lock(&self.nats).remove(&key);
        lock(&self.written).remove(&key);
        self.autoscaler.forget(pool);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Delay before retry number `attempt` (1-based): 1 s doubling to 5 min, with up to 20 %
/// jitter so pools that failed together do not retry together.
pub fn backoff(attempt: u32, jitter_seed: u64) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << attempt.saturating_sub(1).min(9));
    let base = base.min(Duration::from_secs(300));
    let jitter = base.mul_f64((jitter_seed % 1000) as f64 / 5000.0);
    base + jitter
}

/// Reconciles one pool. Errors are retried by [`error_policy`].
pub async fn reconcile(pool: Arc<ConnectionPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!(
        "reconcile",
        pool = %pool.name_any(),
        namespace = pool.namespace().unwrap_or_default(),
        generation = pool.metadata.generation.unwrap_or_default(),
    );
    let started = Instant::now();
    let _running = ctx.metrics.reconcile_running();
    let work = async {
        let ns = pool.namespace().ok_or(Error::NoNamespace)?;
        let api: Api<ConnectionPool> = Api::namespaced(ctx.client.clone(), &ns);
        if add_finalizer(&api, &pool).await? {
            // The patch is a change of its own: the next reconcile applies.
            return Ok(Action::await_change());
        }
        finalizer(&api, FINALIZER, pool.clone(), |event| async {
            match event {
                finalizer::Event::Apply(pool) => apply(&pool, &ctx).await,
                finalizer::Event::Cleanup(pool) => cleanup(&pool, &ctx).await,
            }
        })
        .await
        .map_err(|err| Error::Finalizer(Box::new(err)))
    }
    .instrument(span);
    // Cut off, the reconcile is dropped mid-way, as if the operator had crashed there:
    // every step is written to survive that (see docs/operator.md), and the error
    // policy retries it with back-off.
    let result = tokio::time::timeout(ctx.reconcile_timeout, work)
        .await
        .unwrap_or(Err(Error::TimedOut(ctx.reconcile_timeout)));
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.is_err());
    if result.is_ok() {
        ctx.reset_failures(&ObjectRef::from_obj(&*pool));
    }
    result
}

/// Adds [`FINALIZER`] if it is missing and the pool is not being deleted; returns
/// whether it patched. kube's `finalizer` helper would do it with a JSON-patch `test` of
/// a null `/metadata/finalizers`, which only some servers accept for a missing path; a
/// `test` of the `resourceVersion` read gives the same optimistic concurrency everywhere.
async fn add_finalizer(api: &Api<ConnectionPool>, pool: &ConnectionPool) -> Result<bool, Error> {
    if pool.metadata.deletion_timestamp.is_some()
        || pool.finalizers().iter().any(|f| f == FINALIZER)
    {
        return Ok(false);
    }
    let ops = if pool.finalizers().is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": pool.resource_version()},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": pool.finalizers()},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    api.patch::<ConnectionPool>(
        &pool.name_any(),
        &PatchParams::default(),
        &Patch::Json(patch),
    )
    .await?;
    Ok(true)
}

/// Retry policy after a failed reconcile: exponential backoff per pool, never a hot loop.
pub fn error_policy(pool: Arc<ConnectionPool>, err: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.record_failure(ObjectRef::from_obj(&*pool));
    let seed = Timestamp::now().subsec_nanosecond().unsigned_abs() as u64;
    let delay = backoff(attempt, seed);
    warn!(pool = %pool.name_any(), namespace = ?pool.namespace(), %err, attempt, ?delay, "reconcile failed; will retry");
    Action::requeue(delay)
}

async fn apply(pool: &ConnectionPool, ctx: &Context) -> Result<Action, Error> {
    ctx.metrics.observe_pool(pool);
    let key = ObjectRef::from_obj(pool);
    let previous = ctx.applied(&key);
    let spec_due = match &previous {
        None => true,
        Some(applied) => {
            applied.generation != pool.metadata.generation
                || applied
                    .problem
                    .as_ref()
                    .is_some_and(SpecError::may_resolve_itself)
        }
    };
    // Read (and clear) the mark in any case: an apply now covers it.
    let spec_due = ctx.take_dirty(&key) || spec_due;
    let wait = ctx.claim_step(&key);
    if !spec_due && !wait.is_zero() {
        // A report within the spacing: the step it asks for runs when the spacing ends.
        return Ok(Action::requeue(wait));
    }
    if ctx.stateful_sets.wait_until_ready().await.is_err() {
        warn!("the StatefulSet cache is gone; reconciling without it");
    }
    let cached = ctx.stateful_set(pool);
    let current = previous
        .as_ref()
        .and_then(|a| a.replicas)
        .or_else(|| cached.as_ref().and_then(|s| s.spec.as_ref()?.replicas));

    // The autoscaler decides the StatefulSet's replicas (and drains before lowering them).
    let now = Timestamp::now();
    let progress = *lock(&ctx.pool_watch_progress);
    let revisions = revisions(&ctx.client, pool, cached.as_deref()).await?;
    let plan = ctx.autoscaler.step(pool, current, revisions, progress, now);
    let replicas = plan.stateful_set_replicas;
    let mut applied_sts: Option<StatefulSet> = None;
    let problem = if spec_due {
        let outcome = apply_spec(pool, ctx, replicas).await?;
        let problem = outcome.as_ref().err().cloned();
        match &outcome {
            Ok(_) if was_degraded(pool) => {
                publish(
                    ctx,
                    pool,
                    EventType::Normal,
                    "Recovered",
                    "the spec was applied".into(),
                )
                .await;
            }
            Ok(_) => {}
            Err(problem) => {
                info!(pool = %pool.name_any(), reason = problem.reason(), %problem, "spec cannot be applied");
                publish(
                    ctx,
                    pool,
                    EventType::Warning,
                    problem.reason(),
                    problem.to_string(),
                )
                .await;
            }
        }
        applied_sts = outcome.ok();
        problem
    } else {
        let mut problem = previous.as_ref().and_then(|a| a.problem.clone());
        if problem.is_none() && current != Some(replicas) {
            // A resize alone: the StatefulSet is the only object that changes.
            match apply_stateful_set(pool, ctx, replicas).await? {
                Ok(sts) => applied_sts = Some(sts),
                Err(rejected) => problem = Some(rejected),
            }
        }
        if problem.is_none() && ctx.nats_retry_due(&key) {
            // A NATS apply that failed: retried on its own, the rest is in place.
            if let Ok(desired) = resources::desired(pool, &ctx.settings, replicas) {
                let outcome = apply_nats(pool, &desired, ctx).await;
                ctx.record_nats(pool, outcome).await;
            }
        }
        problem
    };
    let nats_state = lock(&ctx.nats).get(&key).cloned();
    let nats_problem = nats_state.as_ref().and_then(|n| n.problem.clone());
    let nats_retry = nats_state.filter(|n| n.problem.is_some()).map(|n| {
        n.retry_at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    });
    ctx.record_applied(
        key,
        Applied {
            generation: pool.metadata.generation,
            replicas: if problem.is_none() {
                Some(replicas)
            } else {
                current
            },
            problem: problem.clone(),
        },
    );

    let plan = problem.is_none().then_some(plan);
    if let Some(plan) = &plan {
        // A rollout's drained pods go first: withdrawing their drain before would make
        // them ready for a moment, and the Service would send them agents.
        delete_pods(&ctx.client, pool, &plan.delete).await?;
        // Ended instructions leave the pods before they leave the record...
        ctx.autoscaler.withdraw(&ctx.client, pool, plan).await?;
    }
    let sts = applied_sts.as_ref().or(cached.as_deref());
    let pod_creation = ctx.pod_creation(pool, sts, now).await;
    if let Some(message) = crate::creation::newly_refused(pool, &pod_creation) {
        publish(
            ctx,
            pool,
            EventType::Warning,
            crate::creation::FAILED_CREATE,
            message,
        )
        .await;
    }
    let observed = Observed {
        stateful_set: sts,
        problem: problem.as_ref(),
        pod_creation,
        nats: nats_problem.as_ref(),
    };
    let status = pool_status(pool, &observed, plan.as_ref(), now);
    if worth_writing(pool, &status, ctx.autoscaler.status_refresh_due(pool)) {
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", tether_crds::GROUP, tether_crds::VERSION),
            "kind": "ConnectionPool",
            "metadata": {"name": pool.name_any()},
            "status": status,
        });
        let api: Api<ConnectionPool> = Api::namespaced(
            ctx.client.clone(),
            &pool.namespace().ok_or(Error::NoNamespace)?,
        );
        api.patch_status(&pool.name_any(), &apply_params(), &Patch::Apply(body))
            .await?;
        ctx.autoscaler.status_written(pool);
    }
    if let Some(plan) = &plan {
        // ...and new ones enter the record before they reach the pods.
        ctx.autoscaler.deliver(&ctx.client, pool, plan).await?;
    }
    Ok(match (&plan, &problem, nats_retry) {
        (Some(plan), _, _) => {
            for event in &plan.events {
                ctx.metrics.observe_scaling(pool, event.reason.as_str());
            }
            crate::autoscale::after_apply(&ctx.client, &ctx.reporter, pool, plan).await;
            Action::requeue(plan.requeue.min(RESYNC).min(nats_retry.unwrap_or(RESYNC)))
        }
        (None, Some(problem), _) if problem.may_resolve_itself() => {
            Action::requeue(ctx.secret_recheck)
        }
        (None, None, Some(retry)) => Action::requeue(retry),
        _ => Action::await_change(),
    })
}

/// The label a StatefulSet puts on each of its pods: the template revision it runs.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// The pool's pods and their revisions, read only while a rollout has work: the
/// StatefulSet has pods below its update revision, or the pool's status has a
/// rollout's drain in flight. A list of the pool's pods, so it costs nothing while no
/// rollout runs.
async fn revisions(
    client: &Client,
    pool: &ConnectionPool,
    sts: Option<&StatefulSet>,
) -> Result<Option<crate::autoscale::Revisions>, Error> {
    let Some(status) = sts.and_then(|s| s.status.as_ref()) else {
        return Ok(None);
    };
    let Some(update) = status.update_revision.clone() else {
        return Ok(None);
    };
    let in_flight = pool
        .status
        .as_ref()
        .is_some_and(|s| s.instructions.iter().any(crate::autoscale::is_rollout));
    // Pods below the update revision exist only while the current revision is not the
    // update revision (the controller moves it once every pod runs the update). Fewer
    // updated pods than replicas with the two equal is a scale-up whose new pods are not
    // there yet, not a rollout: listing the pods then, on every reconcile, was a list
    // per report for every pool that scaled up.
    let behind = status.current_revision.as_ref() != Some(&update);
    if !behind && !in_flight {
        return Ok(None);
    }
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = pods
        .list(&ListParams::default().labels(&resources::selector_string(pool)))
        .await?;
    let name = pool.name_any();
    let pods = list
        .items
        .iter()
        .filter_map(|p| {
            let o = crate::scaling::ordinal(&name, p.metadata.name.as_deref()?)?;
            let uid = p.metadata.uid.clone()?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Some((
                o,
                crate::autoscale::PodRevision {
                    revision: p.labels().get(REVISION_LABEL).cloned(),
                    ready,
                    terminating: p.metadata.deletion_timestamp.is_some(),
                    uid,
                },
            ))
        })
        .collect();
    Ok(Some(crate::autoscale::Revisions { update, pods }))
}

/// Deletes a rollout's drained pods; the StatefulSet (`OnDelete`) recreates each at its
/// update revision. Each delete carries the drained pod's UID as a precondition: a pod
/// of that name that is not the one drained (its successor, created since the list the
/// step was planned from) is refused with 409 and kept. That, or a pod already gone, is
/// fine: the pod the rollout meant is no longer there.
async fn delete_pods(
    client: &Client,
    pool: &ConnectionPool,
    targets: &[crate::autoscale::PodToDelete],
) -> Result<(), Error> {
    if targets.is_empty() {
        return Ok(());
    }
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for target in targets {
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid: Some(target.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&target.name, &params).await {
            Ok(_) => {
                info!(pool = %pool.name_any(), pod = %target.name, uid = %target.uid, "rollout: pod deleted for its replacement")
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                info!(pool = %pool.name_any(), pod = %target.name, uid = %target.uid, message = %status.message, "rollout: the drained pod is gone, its successor kept")
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// The spec part: validate, check the Secrets, apply every child. `Ok(Err(_))` is a
/// spec problem (nothing applied); `Err(_)` an API failure.
async fn apply_spec(
    pool: &ConnectionPool,
    ctx: &Context,
    replicas: i32,
) -> Result<Result<StatefulSet, SpecError>, Error> {
    if let Err(problem) = validate(pool) {
        return Ok(Err(problem));
    }
    let siblings = ctx.pools.state();
    if let Some(collision) = ownership::name_collision(pool, siblings.iter().map(|p| &**p)) {
        let ns = pool.namespace().ok_or(Error::NoNamespace)?;
        for (kind, name) in &collision.objects {
            let meta = existing_child(&ctx.client, &ns, *kind, name).await?;
            if !meta.is_some_and(|m| ownership::controlled_by(&m, pool)) {
                return Ok(Err(collision.refusal()));
            }
        }
    }
    let desired = resources::desired(pool, &ctx.settings, replicas);
    if let Ok(desired) = &desired
        && let Err(problem) = check_ownership(pool, desired, ctx).await?
    {
        return Ok(Err(problem));
    }
    if let Err(problem) = ensure_nats_token(pool, ctx).await? {
        return Ok(Err(problem));
    }
    if let Err(problem) = check_secrets(pool, ctx).await? {
        return Ok(Err(problem));
    }
    match desired {
        Err(problem) => Ok(Err(problem)),
        Ok(desired) => apply_children(pool, &desired, ctx).await,
    }
}

/// Reads the metadata of every child about to be written: one that exists without this
/// pool's controller reference is a problem, and nothing is written (a forced apply
/// would adopt it: take its fields and add the pool's ownerReference, and the garbage
/// collector would delete it with the pool). A read per child per spec change, never
/// per report. The window between this read and the apply that creates a child is not
/// closed: an object created in it is adopted (see docs/operator.md).
async fn check_ownership(
    pool: &ConnectionPool,
    desired: &Desired,
    ctx: &Context,
) -> Result<Result<(), SpecError>, Error> {
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let client = &ctx.client;
    for (kind, name) in ownership::planned_children(pool, desired) {
        let meta = match existing_child(client, &ns, kind, &name).await {
            Err(Error::Kube(err)) => forbidden(Err(err), || format!("get {kind} {name:?}"))?,
            other => Ok(other?),
        };
        let meta = match meta {
            Ok(meta) => meta,
            Err(problem) => return Ok(Err(problem)),
        };
        if let Err(problem) = ownership::check_owner(pool, kind, &name, meta.as_ref()) {
            return Ok(Err(problem));
        }
    }
    Ok(Ok(()))
}

/// The metadata of the child `kind`/`name`, if it exists.
async fn existing_child(
    client: &Client,
    ns: &str,
    kind: ownership::Kind,
    name: &str,
) -> Result<Option<kube::api::ObjectMeta>, Error> {
    use ownership::Kind;
    match kind {
        Kind::StatefulSet => existing::<StatefulSet>(client, ns, name).await,
        Kind::Service => existing::<Service>(client, ns, name).await,
        Kind::PodDisruptionBudget => existing::<PodDisruptionBudget>(client, ns, name).await,
        Kind::ConfigMap => existing::<ConfigMap>(client, ns, name).await,
        Kind::ServiceAccount => existing::<ServiceAccount>(client, ns, name).await,
        Kind::Role => existing::<Role>(client, ns, name).await,
        Kind::RoleBinding => existing::<RoleBinding>(client, ns, name).await,
        Kind::NetworkPolicy => existing::<NetworkPolicy>(client, ns, name).await,
        Kind::Secret => existing::<Secret>(client, ns, name).await,
    }
}

/// The metadata of `name`, if it exists.
async fn existing<K>(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<kube::api::ObjectMeta>, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api.get_metadata_opt(name).await?.map(|m| m.metadata))
}

/// A 403 as a spec problem: the operator's RBAC does not reach the pool's namespace
/// (the chart's `tenantNamespaces`). Retried every `--secret-recheck`, as a Role may be
/// granted later, instead of failing the reconcile into back-off with nothing shown.
fn forbidden<T>(
    result: Result<T, kube::Error>,
    action: impl FnOnce() -> String,
) -> Result<Result<T, SpecError>, Error> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(Err(SpecError::Forbidden {
            action: action(),
            message: status.message,
        })),
        Err(err) => Err(err.into()),
    }
}

/// Applies the StatefulSet alone, at `replicas` (its other fields as the spec has them).
async fn apply_stateful_set(
    pool: &ConnectionPool,
    ctx: &Context,
    replicas: i32,
) -> Result<Result<StatefulSet, SpecError>, Error> {
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    match resources::desired(pool, &ctx.settings, replicas) {
        Err(problem) => Ok(Err(problem)),
        Ok(desired) => server_side_apply(&ctx.client, &ns, &desired.stateful_set).await,
    }
}

fn was_degraded(pool: &ConnectionPool) -> bool {
    pool.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_DEGRADED))
        .is_some_and(|c| c.status == "True")
}

fn apply_params() -> PatchParams {
    // Force: the operator is the only writer of these fields; a stray manual edit of a
    // child is taken back rather than reported as a conflict forever.
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Creates the token Secret of a managed NATS that the pool gives no credentials for,
/// if it is missing: 32 random bytes, hex. Never rewritten: a new token would lock the
/// running gateways out of the running server until both restarted.
async fn ensure_nats_token(
    pool: &ConnectionPool,
    ctx: &Context,
) -> Result<Result<(), SpecError>, Error> {
    if !resources::generates_nats_token(pool) {
        return Ok(Ok(()));
    }
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = resources::nats_auth_secret_name(pool);
    if secrets.get_metadata_opt(&name).await?.is_some() {
        return Ok(Ok(()));
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let Ok(secret) = resources::nats_token_secret(pool, &token) else {
        return Ok(Ok(())); // an unsaved pool: validate() has refused it already
    };
    let params = kube::api::PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match secrets.create(&params, &secret).await {
        Ok(_) => info!(pool = %pool.name_any(), secret = %name, "generated the managed NATS token"),
        // Another reconcile (or an earlier term) made it: keep that one.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => {
            return forbidden::<()>(Err(err), || format!("create Secret {name:?}"));
        }
    }
    Ok(Ok(()))
}

/// Checks that every referenced Secret exists and has its key. `Ok(Err(_))` is a spec
/// problem; `Err(_)` an API failure.
async fn check_secrets(
    pool: &ConnectionPool,
    ctx: &Context,
) -> Result<Result<(), SpecError>, Error> {
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut fetched: HashMap<String, Option<Secret>> = HashMap::new();
    for mount in resources::secret_mounts(pool) {
        let name = &mount.source.name;
        if !fetched.contains_key(name) {
            match forbidden(secrets.get_opt(name).await, || {
                format!("get Secret {name:?}")
            })? {
                Ok(secret) => fetched.insert(name.clone(), secret),
                Err(problem) => return Ok(Err(problem)),
            };
        }
        let Some(secret) = &fetched[name] else {
            return Ok(Err(SpecError::SecretMissing {
                name: name.clone(),
                field: mount.field.into(),
            }));
        };
        let has_key = secret
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(&mount.source.key))
            || secret
                .string_data
                .as_ref()
                .is_some_and(|d| d.contains_key(&mount.source.key));
        if !has_key {
            return Ok(Err(SpecError::SecretKeyMissing {
                name: name.clone(),
                key: mount.source.key.clone(),
                field: mount.field.into(),
            }));
        }
    }
    Ok(Ok(()))
}

/// Applies every child; the StatefulSet last, so its pods find their ConfigMap, account
/// and Services in place. Returns the StatefulSet as the server has it (with status).
async fn apply_children(
    pool: &ConnectionPool,
    desired: &Desired,
    ctx: &Context,
) -> Result<Result<StatefulSet, SpecError>, Error> {
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let client = &ctx.client;
    let key = ObjectRef::from_obj(pool);
    macro_rules! ssa {
        ($obj:expr) => {
            match server_side_apply(client, &ns, $obj).await? {
                Ok(applied) => {
                    ctx.record_written(&key, &applied);
                    applied
                }
                Err(problem) => return Ok(Err(problem)),
            }
        };
    }
    ssa!(&desired.service_account);
    ssa!(&desired.role);
    ssa!(&desired.role_binding);
    ssa!(&desired.config_map);
    ssa!(&desired.headless_service);
    ssa!(&desired.client_service);
    ssa!(&desired.api_service);
    ssa!(&desired.pdb);
    ssa!(&desired.gateway_policy);
    // The managed NATS before the gateways (their pods find its Service in place), but
    // its failure is the NATS's own condition: the gateways and scaling go on.
    let nats = apply_nats(pool, desired, ctx).await;
    ctx.record_nats(pool, nats).await;
    let sts = ssa!(&desired.stateful_set);
    debug!(pool = %pool.name_any(), hash = %desired.config_hash, "children applied");
    Ok(Ok(sts))
}

/// Applies the managed NATS (or removes it when the pool no longer has one), turning
/// every failure into a [`NatsProblem`] instead of an error of the reconcile. A change
/// its StatefulSet cannot take in place re-creates it (see [`nats`]).
async fn apply_nats(
    pool: &ConnectionPool,
    desired: &Desired,
    ctx: &Context,
) -> Option<NatsProblem> {
    let ns = pool.namespace()?;
    let client = &ctx.client;
    let key = ObjectRef::from_obj(pool);
    let api_problem = |e: Error| NatsProblem::Api(e.to_string());
    macro_rules! ssa {
        ($obj:expr) => {
            match server_side_apply(client, &ns, $obj).await {
                Ok(Ok(applied)) => {
                    ctx.record_written(&key, &applied);
                    applied
                }
                Ok(Err(problem)) => return Some(NatsProblem::from_spec(problem)),
                Err(e) => return Some(api_problem(e)),
            }
        };
    }
    let Some((sts, svc)) = &desired.nats else {
        // A pool that switched from managed NATS to an external one drops its server.
        let name = resources::nats_name(pool);
        let removed = async {
            delete_if_owned::<StatefulSet>(client, &ns, &name, pool).await?;
            delete_if_owned::<Service>(client, &ns, &name, pool).await?;
            delete_if_owned::<Service>(client, &ns, &resources::nats_cluster_name(pool), pool)
                .await?;
            delete_if_owned::<PodDisruptionBudget>(client, &ns, &name, pool).await?;
            delete_if_owned::<NetworkPolicy>(client, &ns, &name, pool).await
        };
        return removed.await.err().map(api_problem);
    };
    if let Some(policy) = &desired.nats_policy {
        ssa!(policy);
    }
    ssa!(svc);
    if let Some(cluster) = &desired.nats_cluster_service {
        ssa!(cluster);
    }
    if let Some(pdb) = &desired.nats_pdb {
        ssa!(pdb);
    }
    let name = resources::nats_name(pool);
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let live = match api.get_opt(&name).await {
        Ok(live) => live,
        Err(e) => return Some(api_problem(e.into())),
    };
    if let Some(live) = &live {
        if live.metadata.deletion_timestamp.is_some() {
            return Some(NatsProblem::Recreating {
                name,
                reason: "waiting for the old StatefulSet to be gone".into(),
            });
        }
        if let Some(reason) = nats::recreate_reason(live, sts) {
            // Orphan: the pods keep serving and the new StatefulSet adopts them; the
            // claims are never deleted with a StatefulSet. The uid precondition makes
            // sure it is the object just read (a concurrent re-create is not undone).
            let params = DeleteParams {
                propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
                preconditions: Some(kube::api::Preconditions {
                    uid: live.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                Err(e) => return Some(api_problem(e.into())),
            }
            info!(pool = %pool.name_any(), statefulset = %name, %reason, "re-creating the NATS StatefulSet");
            publish(
                ctx,
                pool,
                EventType::Normal,
                "NatsRecreating",
                format!("re-creating StatefulSet {name} (pods and volumes kept): {reason}"),
            )
            .await;
            return Some(NatsProblem::Recreating { name, reason });
        }
    }
    ssa!(sts);
    grow_claims(pool, sts, &ns, ctx).await
}

/// Patches the managed NATS's existing volumes to the size `delivery.storage` asks for
/// (new pods get it from the claim template; existing claims keep theirs otherwise).
async fn grow_claims(
    pool: &ConnectionPool,
    sts: &StatefulSet,
    ns: &str,
    ctx: &Context,
) -> Option<NatsProblem> {
    let want = nats::requested_storage(sts)?;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let name = resources::nats_name(pool);
    for claim in nats::claim_names(&name, resources::nats_replicas(pool)) {
        let existing = match api.get_opt(&claim).await {
            Ok(Some(existing)) => existing,
            Ok(None) => continue,
            Err(e) => return Some(NatsProblem::Api(e.to_string())),
        };
        if !nats::claim_needs_resize(&existing, &want) {
            continue;
        }
        let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": want}}}});
        match api
            .patch(&claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => info!(pool = %pool.name_any(), %claim, size = %want.0, "NATS volume resized"),
            Err(kube::Error::Api(status)) if (400..500).contains(&status.code) => {
                return Some(NatsProblem::Resize {
                    claim,
                    size: want.0.clone(),
                    message: status.message,
                });
            }
            Err(e) => return Some(NatsProblem::Api(e.to_string())),
        }
    }
    None
}

/// One server-side apply. A 400/422 answer means the object built from the spec is
/// invalid (a bad quantity, a bad toleration...), which no retry can fix.
async fn server_side_apply<K>(
    client: &Client,
    ns: &str,
    obj: &K,
) -> Result<Result<K, SpecError>, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    match api.patch(&name, &apply_params(), &Patch::Apply(obj)).await {
        Ok(applied) => Ok(Ok(applied)),
        Err(kube::Error::Api(status)) if status.code == 400 || status.code == 422 => {
            Ok(Err(SpecError::Rejected {
                object: format!("{}/{name}", K::kind(&())),
                message: status.message,
            }))
        }
        Err(err) => Err(err.into()),
    }
}

/// Deletes `name` if it exists and this pool controls it; absent is success.
async fn delete_if_owned<K>(
    client: &Client,
    ns: &str,
    name: &str,
    pool: &ConnectionPool,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let Some(existing) = api.get_metadata_opt(name).await? else {
        return Ok(());
    };
    let owned = existing
        .owner_references()
        .iter()
        .any(|o| Some(&o.uid) == pool.metadata.uid.as_ref());
    if owned {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Deletion: remove every child. Owner references would let the garbage collector do
/// it eventually; doing it here makes deletion complete before the pool disappears, and
/// is where a drain-before-delete will go.
async fn cleanup(pool: &ConnectionPool, ctx: &Context) -> Result<Action, Error> {
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    ctx.forget(pool);
    ctx.metrics.forget_pool(pool);
    let client = &ctx.client;
    let base = resources::base_name(pool);
    let rbac = resources::rbac_name(pool);
    let nats = resources::nats_name(pool);
    delete_if_owned::<StatefulSet>(client, &ns, &base, pool).await?;
    delete_if_owned::<StatefulSet>(client, &ns, &nats, pool).await?;
    delete_if_owned::<PodDisruptionBudget>(client, &ns, &base, pool).await?;
    delete_if_owned::<PodDisruptionBudget>(client, &ns, &nats, pool).await?;
    delete_if_owned::<NetworkPolicy>(client, &ns, &rbac, pool).await?;
    delete_if_owned::<NetworkPolicy>(client, &ns, &resources::nats_name(pool), pool).await?;
    for svc in [
        base.clone(),
        resources::headless_name(pool),
        resources::api_service_name(pool),
        resources::nats_cluster_name(pool),
        nats,
    ] {
        delete_if_owned::<Service>(client, &ns, &svc, pool).await?;
    }
    delete_if_owned::<ConfigMap>(client, &ns, &resources::config_map_name(pool), pool).await?;
    // Not the generated NATS token: the operator holds no right to delete Secrets (see
    // charts/tether/templates/_helpers.tpl); it carries the pool's ownerReference, so the
    // garbage collector deletes it once the pool is gone.
    delete_if_owned::<RoleBinding>(client, &ns, &rbac, pool).await?;
    delete_if_owned::<Role>(client, &ns, &rbac, pool).await?;
    delete_if_owned::<ServiceAccount>(client, &ns, &rbac, pool).await?;
    info!(pool = %pool.name_any(), namespace = %ns, "children deleted");
    Ok(Action::await_change())
}

/// Publishes an Event about `pool`; Events are best effort, a failure is only logged.
async fn publish(
    ctx: &Context,
    pool: &ConnectionPool,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
        warn!(pool = %pool.name_any(), %err, "could not publish event");
    }
}

/// Which pools one operator process manages, and how many at once.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Most reconciles in flight (0: unbounded). A bound keeps a burst of pools (an
    /// operator restart, a namespace applied at once) from queueing hundreds of requests
    /// at the API server at the same moment.
    pub concurrency: u16,
    /// Trailing-edge debounce of reconcile requests: the burst of watch events a pool's
    /// own apply causes becomes one reconcile. Keep it short: a pool whose pods report
    /// more often than this would never be reconciled (kube-runtime resets the timer on
    /// every request); per-pool pacing of autoscaling is `Context::scale_spacing`.
    pub debounce: Duration,
}

impl Scope {
    /// The kube-runtime controller configuration for this scope.
    pub fn controller_config(&self) -> kube_controller::Config {
        kube_controller::Config::default()
            .concurrency(self.concurrency)
            .debounce(self.debounce)
    }
}

fn api_for<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match &scope.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// What makes a pool worth a reconcile: its spec (generation), its deletion and
/// finalizers, and its pods' reports. The operator's own status writes are not: they
/// would reconcile every pool once more after each of its steps.
fn pool_trigger(pool: &ConnectionPool) -> Option<u64> {
    let pods = pool
        .status
        .as_ref()
        .map(|s| serde_json::to_string(&s.pods).unwrap_or_default());
    Some(hash_of(&(
        pool.metadata.generation,
        pool.metadata.deletion_timestamp.is_some(),
        pool.finalizers(),
        pods,
    )))
}

/// The part of a StatefulSet the spec decides (everything but `replicas`, which the
/// autoscaler moves without a spec change).
fn stateful_set_spec_version(sts: &StatefulSet) -> u64 {
    let mut spec = sts.spec.clone().unwrap_or_default();
    spec.replicas = None;
    hash_of(&serde_json::to_string(&spec).unwrap_or_default())
}

/// What the status part reads of a StatefulSet: its replicas and status.
fn stateful_set_status_version(sts: &StatefulSet) -> u64 {
    hash_of(&(
        sts.spec.as_ref().and_then(|s| s.replicas),
        serde_json::to_string(&sts.status).unwrap_or_default(),
    ))
}

/// A child without status: any write is an edit.
fn meta_version<K: Resource>(obj: &K) -> u64 {
    hash_of(&obj.meta().resource_version)
}

/// A child whose status moves on its own (a PodDisruptionBudget counts healthy pods):
/// only its generation says its spec was edited.
fn meta_generation<K: Resource>(obj: &K) -> u64 {
    hash_of(&obj.meta().generation)
}

/// Notes a change (or, `deleted`, the deletion) of `obj` for the pool that controls it:
/// unless the change was the operator's own apply, the pool's children are applied
/// again.
fn mark_owner_dirty<K: Resource<DynamicType = ()>>(obj: &K, dirty: &Dirty, deleted: bool) {
    let ns = obj.meta().namespace.clone().unwrap_or_default();
    let change = ChildChange {
        child: child_key(
            &K::kind(&()),
            obj.meta().name.as_deref().unwrap_or_default(),
        ),
        resource_version: if deleted {
            None
        } else {
            obj.meta().resource_version.clone()
        },
    };
    for owner in obj.owner_references() {
        if owner.kind == "ConnectionPool" && owner.controller == Some(true) {
            lock(dirty)
                .entry(ObjectRef::new(&owner.name).within(&ns))
                .or_default()
                .push(change.clone());
        }
    }
}

/// Turns the watch of one kind of child into triggers of its pool: an object whose
/// spec `version` changed since it was last seen (an edit: the pool is marked dirty and
/// its children applied again), that was deleted (same), or whose `status_version`
/// changed (a look at the status only). Re-lists after a dropped watch trigger nothing
/// for objects that did not change.
fn child_triggers<K, S>(
    events: S,
    dirty: Dirty,
    version: fn(&K) -> u64,
    status_version: fn(&K) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let mut seen: HashMap<ObjectRef<K>, (u64, u64)> = HashMap::new();
    events.flat_map(move |event| {
        let out: Vec<Result<K, watcher::Error>> = match event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                let now = (version(&obj), status_version(&obj));
                match seen.insert(ObjectRef::from_obj(&obj), now) {
                    Some(before) if before == now => vec![],
                    Some(before) if before.0 == now.0 => vec![Ok(obj)],
                    _ => {
                        mark_owner_dirty(&obj, &dirty, false);
                        vec![Ok(obj)]
                    }
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                seen.remove(&ObjectRef::from_obj(&obj));
                mark_owner_dirty(&obj, &dirty, true);
                vec![Ok(obj)]
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => vec![],
            Err(err) => {
                // The watch's own back-off retries it. Passed on, the error would make
                // the Controller pause *every* trigger stream (one shared back-off),
                // the pools' included: a few 410s after a dropped watch once froze the
                // pool cache for 20 s.
                warn!(%err, kind = K::kind(&()).as_ref(), "watch error; retrying");
                vec![]
            }
        };
        futures::stream::iter(out)
    })
}

fn no_status<K>(_: &K) -> u64 {
    0
}

/// The metadata watch of one kind of child, as pool triggers.
fn child_metadata<K>(
    ctx: &Context,
    scope: &Scope,
    version: fn(&PartialObjectMeta<K>) -> u64,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let labels = format!("app.kubernetes.io/managed-by={MANAGED_BY}");
    let api: Api<PartialObjectMeta<K>> = match &scope.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let events = watcher(api, watcher::Config::default().labels(&labels)).default_backoff();
    child_triggers(events, ctx.dirty.clone(), version, no_status)
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first.
/// Dropping the returned future stops it at once (leadership lost).
pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = &ctx.client;
    let (Some(sts_writer), Some(pools_writer)) = (
        lock(&ctx.stateful_set_writer).take(),
        lock(&ctx.pool_writer).take(),
    ) else {
        warn!("controller::run called twice on one Context");
        return;
    };
    // Children are selected by label so the operator caches its own objects only, and
    // watched as metadata where the content is not needed (a smaller cache).
    let labels = format!("app.kubernetes.io/managed-by={MANAGED_BY}");
    let stateful_sets = watcher(
        api_for::<StatefulSet>(client, &scope),
        watcher::Config::default().labels(&labels),
    )
    .default_backoff()
    .modify(|sts| {
        // Neither read nor compared: keep them out of the cache.
        sts.managed_fields_mut().clear();
    })
    .reflect(sts_writer);
    let stateful_sets = child_triggers(
        stateful_sets,
        ctx.dirty.clone(),
        stateful_set_spec_version,
        stateful_set_status_version,
    );

    let pools_reader = ctx.pools.clone();
    let progress = ctx.pool_watch_progress.clone();
    let pools = watcher(
        api_for::<ConnectionPool>(client, &scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(move |event| {
        if matches!(
            event,
            Ok(watcher::Event::Apply(_) | watcher::Event::InitApply(_))
        ) {
            *lock(&progress) = Instant::now();
        }
        event
    })
    .modify(|pool| pool.managed_fields_mut().clear())
    .reflect(pools_writer)
    .applied_objects()
    // Errors stay here, retried by the watch's own back-off (see `child_triggers`).
    .filter_map(|pool| async move {
        match pool {
            Ok(pool) => Some(Ok(pool)),
            Err(err) => {
                warn!(%err, "pool watch error; retrying");
                None
            }
        }
    })
    .predicate_filter(pool_trigger, Default::default());

    info!(namespace = ?scope.namespace, concurrency = scope.concurrency, debounce = ?scope.debounce, "controller starting");
    Controller::for_stream(pools, pools_reader)
        .with_config(scope.controller_config())
        .owns_stream(stateful_sets)
        .owns_stream(child_metadata::<Service>(&ctx, &scope, meta_version))
        .owns_stream(child_metadata::<ConfigMap>(&ctx, &scope, meta_version))
        .owns_stream(child_metadata::<PodDisruptionBudget>(
            &ctx,
            &scope,
            meta_generation,
        ))
        .owns_stream(child_metadata::<ServiceAccount>(&ctx, &scope, meta_version))
        .owns_stream(child_metadata::<Role>(&ctx, &scope, meta_version))
        .owns_stream(child_metadata::<RoleBinding>(&ctx, &scope, meta_version))
        .owns_stream(child_metadata::<NetworkPolicy>(
            &ctx,
            &scope,
            meta_generation,
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((pool, _)) => debug!(pool = %pool.name, "reconciled"),
                Err(err) => debug!(%err, "reconcile error (retried by error_policy)"),
            }
        })
        .await;
    info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1, 0), Duration::from_secs(1));
        assert_eq!(backoff(2, 0), Duration::from_secs(2));
        assert_eq!(backoff(5, 0), Duration::from_secs(16));
        assert_eq!(backoff(40, 0), Duration::from_secs(300));
        let jittered = backoff(3, 999);
        assert!(
            jittered > Duration::from_secs(4) && jittered < Duration::from_secs(5),
            "{jittered:?}"
        );
    }
}

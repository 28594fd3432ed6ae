//! The reconcile loop: I/O around the pure builders.
//!
//! One reconcile of a pool: add the finalizer if missing, check the spec (pure) and the
//! Secrets it references (API), build the desired objects (pure), server-side apply them
//! under one field manager, then apply the operator's part of the status. A spec the
//! operator cannot act on becomes a `Degraded` condition and a Warning Event, with
//! nothing created; API failures return an error and `error_policy` retries with a
//! per-pool exponential backoff. Nothing here panics on input.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_crds::{CONDITION_DEGRADED, ConnectionPool};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::Metrics;
use crate::resources::{self, Desired, MANAGED_BY, Settings};
use crate::status::{Observed, pool_status};
use crate::validate::{SpecError, validate};

/// The one field manager the operator applies with (children and status alike).
pub const FIELD_MANAGER: &str = "tether-operator";
/// Finalizer that makes deletion wait for the operator's cleanup.
pub const FINALIZER: &str = "tether.dev/cleanup";
/// Safety-net requeue of a healthy pool.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon a pool waiting for a Secret is looked at again, by default. Secrets are not
/// watched: that would cache every Secret of the cluster in the operator's memory.
pub const SECRET_RECHECK: Duration = Duration::from_secs(30);

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
}

/// What every reconcile shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Operator-wide settings (default images).
    pub settings: Settings,
    /// Reconcile counters and timings.
    pub metrics: Arc<Metrics>,
    /// How soon a pool waiting for a Secret is looked at again.
    pub secret_recheck: Duration,
    /// Consecutive failures per pool, for the backoff.
    failures: Mutex<HashMap<ObjectRef<ConnectionPool>, u32>>,
    /// Scaling memory per pool (the stabilization window's recommendations).
    pub autoscaler: crate::autoscale::Autoscaler,
}

// === impl Context ===

impl Context {
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
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            secret_recheck: SECRET_RECHECK,
            failures: Mutex::default(),
            autoscaler: Default::default(),
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
    let result = async {
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
    .instrument(span)
    .await;
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
    // The autoscaler decides the StatefulSet's replicas (and drains before lowering them).
    let now = Timestamp::now();
    let plan = ctx.autoscaler.step(&ctx.client, pool, now).await?;
    let target = plan.stateful_set_replicas;
    let outcome: Result<StatefulSet, SpecError> = match validate(pool) {
        Err(problem) => Err(problem),
        Ok(()) => match check_secrets(pool, ctx).await? {
            Err(problem) => Err(problem),
            Ok(()) => match resources::desired(pool, &ctx.settings, target) {
                Err(problem) => Err(problem),
                Ok(desired) => apply_children(pool, &desired, ctx).await?,
            },
        },
    };
    let (observed, action) = match &outcome {
        Ok(sts) => {
            if was_degraded(pool) {
                publish(
                    ctx,
                    pool,
                    EventType::Normal,
                    "Recovered",
                    "the spec was applied".into(),
                )
                .await;
            }
            (
                Observed {
                    stateful_set: Some(sts),
                    problem: None,
                },
                Action::requeue(plan.requeue.min(RESYNC)),
            )
        }
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
            let action = if problem.may_resolve_itself() {
                Action::requeue(ctx.secret_recheck)
            } else {
                Action::await_change()
            };
            (
                Observed {
                    stateful_set: None,
                    problem: Some(problem),
                },
                action,
            )
        }
    };
    let mut status = pool_status(pool, &observed, target, now);
    let applied = outcome.is_ok();
    if applied {
        crate::autoscale::write_status(
            &mut status,
            pool.status.as_ref(),
            &plan,
            pool.metadata.generation,
            now,
        );
    } else {
        // Nothing was applied: keep the instructions as they were.
        status.instructions = pool
            .status
            .as_ref()
            .map(|s| s.instructions.clone())
            .unwrap_or_default();
    }
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
    if applied {
        crate::autoscale::after_apply(&ctx.client, &ctx.recorder, pool, &plan).await;
    }
    Ok(action)
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
            fetched.insert(name.clone(), secrets.get_opt(name).await?);
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
    macro_rules! ssa {
        ($obj:expr) => {
            match server_side_apply(client, &ns, $obj).await? {
                Ok(applied) => applied,
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
    match &desired.nats {
        Some((sts, svc)) => {
            ssa!(svc);
            ssa!(sts);
        }
        None => {
            // A pool that switched from managed NATS to an external one drops its server.
            let name = resources::nats_name(pool);
            delete_if_owned::<StatefulSet>(client, &ns, &name, pool).await?;
            delete_if_owned::<Service>(client, &ns, &name, pool).await?;
        }
    }
    let sts = ssa!(&desired.stateful_set);
    debug!(pool = %pool.name_any(), hash = %desired.config_hash, "children applied");
    Ok(Ok(sts))
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
    ctx.autoscaler.forget(pool);
    let client = &ctx.client;
    let base = resources::base_name(pool);
    let rbac = resources::rbac_name(pool);
    let nats = resources::nats_name(pool);
    delete_if_owned::<StatefulSet>(client, &ns, &base, pool).await?;
    delete_if_owned::<StatefulSet>(client, &ns, &nats, pool).await?;
    delete_if_owned::<PodDisruptionBudget>(client, &ns, &base, pool).await?;
    for svc in [
        base.clone(),
        resources::headless_name(pool),
        resources::api_service_name(pool),
        nats,
    ] {
        delete_if_owned::<Service>(client, &ns, &svc, pool).await?;
    }
    delete_if_owned::<ConfigMap>(client, &ns, &resources::config_map_name(pool), pool).await?;
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
    /// own apply causes (nine children, its status) becomes one reconcile.
    pub debounce: Duration,
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

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = &ctx.client;
    // Children are selected by label so the operator caches its own objects only.
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    info!(namespace = ?scope.namespace, "controller starting");
    Controller::new(
        api_for::<ConnectionPool>(client, &scope),
        watcher::Config::default(),
    )
    .owns(api_for::<StatefulSet>(client, &scope), children.clone())
    .owns(api_for::<Service>(client, &scope), children.clone())
    .owns(api_for::<ConfigMap>(client, &scope), children.clone())
    .owns(
        api_for::<PodDisruptionBudget>(client, &scope),
        children.clone(),
    )
    .owns(api_for::<ServiceAccount>(client, &scope), children.clone())
    .owns(api_for::<Role>(client, &scope), children.clone())
    .owns(api_for::<RoleBinding>(client, &scope), children)
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

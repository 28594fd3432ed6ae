//! [`NatsRouter`]: the [`Router`] for a pool of pods.
//!
//! ```text
//!  push API ──> NatsRouter ──local?──> LocalRouter ──> hub
//!                   │ no
//!                   ├── cache / directory (KV) ──> pod ──request──> tether.<ns>.pod.<pod>.push
//!                   │                                                      │
//!  other pod:  serve loop (3 subscriptions per pod) ──> LocalRouter ──> hub ┘ answer
//! ```
//!
//! Each pod holds exactly three subscriptions, whatever its number of agents: its own
//! subject (`tether.<ns>.pod.<pod>.*`), the pool's group subjects and the broadcast
//! subject. No task and no subscription exists per agent; the directory lives in NATS.
//!
//! What lives on the bus (directory, revocations, census, durable queue, those three
//! subscriptions) is a `Bus` that exists once the pod attached: `connect` attaches in
//! a task that retries each step until NATS answers, so a pod whose NATS is not there
//! yet starts and serves its local agents, and everything that needs the bus answers
//! 503 until then.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::{Client, Message, RequestErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tether_protocol::CloseCode;
use tokio::sync::Notify;
use tracing::{Instrument, debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::census::Census;
use super::directory::{self, Cache, Directory, DirectoryError, Me, Reconcile, Route};
use super::durable::Durable;
use super::health::NatsHealth;
use super::retry::{self, Backoff};
use super::revocations::RevocationBus;
use super::subjects::{PodOp, Subjects};
use super::wire::{self, Answer, Call};
use crate::hub::{AgentReply, Connection, Hub, Outbound};
use crate::revocation::Revocation;
use crate::router::{
    DurableReceipt, ExpiredMessage, LocalRouter, MessageStatus, Page, Presence, Push, Request,
    RouteError, Router,
};

/// Timeouts and sizes of the NATS router.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Wait for another pod's answer to a push, presence or disconnect.
    pub call_timeout: Duration,
    /// Extra wait on top of an agent's own timeout (request, acked push).
    pub call_margin: Duration,
    /// How long a group send or broadcast waits for every known pod's count.
    pub fanout_timeout: Duration,
    /// Wait for a directory write on connect/disconnect before giving up (the
    /// connection is kept; re-registration fixes the directory later).
    pub directory_timeout: Duration,
    /// Agents remembered by the push-side directory cache.
    pub cache_capacity: usize,
    /// How often the pod list is re-read from the registry.
    pub pods_refresh: Duration,
    /// How often a pod with unregistered connections retries.
    pub retry_interval: Duration,
    /// After a NATS reconnect, other pods may not have re-registered their agents yet:
    /// for this long a directory miss answers 503 instead of 404.
    pub settle: Duration,
    /// How long a start waits to attach to the bus before the pod starts without it
    /// (attaching goes on in the background).
    pub attach_wait: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(5),
            call_margin: Duration::from_secs(2),
            fanout_timeout: Duration::from_secs(1),
            directory_timeout: Duration::from_secs(2),
            cache_capacity: 65_536,
            pods_refresh: Duration::from_secs(5),
            retry_interval: Duration::from_secs(2),
            settle: Duration::from_secs(5),
            attach_wait: Duration::from_secs(10),
        }
    }
}

/// Routes across the pool over NATS.
#[derive(Clone)]
pub struct NatsRouter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRouter")
            .field("pod", &self.inner.me.pod)
            .field("bus_connected", &self.bus_connected())
            .finish_non_exhaustive()
    }
}

struct Inner {
    local: LocalRouter,
    hub: Arc<Hub>,
    me: Me,
    subjects: Subjects,
    client: Client,
    /// Set once this pod attached to the bus.
    bus: OnceLock<Bus>,
    /// `delivery.durable` is configured (the queue itself is on the bus).
    durable_configured: bool,
    /// How often to look for expired durable messages, from the configuration.
    sweep_interval: Option<Duration>,
    cache: Cache,
    tuning: Tuning,
    /// Some local connection is missing from the directory (written while NATS was
    /// away, or NATS lost the bucket): re-register.
    dirty: AtomicBool,
    /// The serve loop is running.
    serving: AtomicBool,
    pods: Arc<Mutex<KnownPods>>,
    outage: Arc<Outage>,
    /// The connection's state and counters; the `tether.nats.*` instruments observe it
    /// while it lives.
    health: Arc<NatsHealth>,
    _nats_instruments: crate::metrics::NatsInstruments,
}

/// What the NATS client's events tell about outages.
#[derive(Default)]
struct Outage {
    /// The connection was lost since the last `Connected`.
    lost: AtomicBool,
    /// Directory misses are not trusted until then.
    settle_until: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct KnownPods {
    refreshed: Option<Instant>,
    pods: BTreeSet<String>,
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// NATS refused the first connection for a reason retrying cannot fix (wrong
    /// credentials, a TLS error, a malformed URL). An unreachable NATS is not one.
    #[error("connecting to NATS at {url}: {message}")]
    Connect {
        /// Server URL(s).
        url: String,
        /// Why.
        message: String,
    },
    /// A credential file could not be used.
    #[error("NATS credentials in {path}: {message}")]
    Credentials {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        message: String,
    },
}

/// Room a message needs on the bus besides its body: the call's metadata (agent id and
/// message id, JSON-escaped), the `push` envelope around the body, and the headers
/// (trace context; durable: de-duplication id, message id, digest).
pub const ENVELOPE_OVERHEAD: usize = 8 * 1024;

/// The largest body a server with `max_payload` carries.
pub fn body_limit(max_payload: usize) -> usize {
    max_payload.saturating_sub(ENVELOPE_OVERHEAD)
}

fn unavailable(what: impl std::fmt::Display) -> RouteError {
    RouteError::Unavailable(what.to_string())
}

/// The servers of `url`: one URL or several, comma-separated.
fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, NatsError> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| NatsError::Connect {
                    url: u.to_owned(),
                    message: e.to_string(),
                })
        })
        .collect()
}

/// Whether a first connection that failed this way is worth retrying in the background
/// (NATS not there yet, or its name not resolvable yet), rather than a configuration
/// that will not work (wrong credentials or TLS settings, a bad URL): that one fails
/// the start.
fn unreachable_at_start(kind: async_nats::ConnectErrorKind) -> bool {
    use async_nats::ConnectErrorKind as Kind;
    match kind {
        Kind::Io | Kind::TimedOut | Kind::Dns | Kind::MaxReconnects => true,
        Kind::ServerParse | Kind::Authentication | Kind::AuthorizationViolation | Kind::Tls => {
            false
        }
    }
}

/// What this pod holds on the bus once attached. None of it exists while NATS is
/// unreachable or JetStream not ready since start: the pod then serves its local agents
/// only (see [`NatsRouter::connect`]).
struct Bus {
    directory: Directory,
    /// The durable per-agent queue, when `delivery.durable` is configured.
    durable: Option<Durable>,
    /// Revoked agents and tokens, stored and announced on the bus.
    revocations: RevocationBus,
    /// The other pods' connection counts.
    census: Arc<Census>,
}

/// Why a call cannot leave this pod before it attached to the bus.
const NOT_ATTACHED: &str = "not attached to the bus yet (NATS unreachable or JetStream not ready \
                            since this pod started); cannot route to other pods";

impl NatsRouter {
    /// Connects to NATS and attaches this pod to the bus: opens the pool's directory,
    /// revocations and (with `durable`) durable queue, subscribes this pod's subjects
    /// and starts serving other pods' calls.
    ///
    /// Waits at most `tuning.attach_wait` for that. A pod whose NATS is unreachable,
    /// or whose JetStream is not ready (a fresh cluster electing its meta leader),
    /// still starts: it serves its local agents, reports the bus as disconnected, and
    /// keeps attaching in the background with bounded back-off ([`retry`](super::retry)).
    /// Only a configuration NATS cannot work with (a bad URL, unreadable credentials)
    /// fails the start.
    pub async fn connect(
        config: &tether_config::NatsConfig,
        namespace: &str,
        hub: Arc<Hub>,
        pod: &str,
        tuning: Tuning,
        durable: Option<(&tether_config::DurableConfig, usize)>,
    ) -> Result<Self, NatsError> {
        let reconnected = Arc::new(Notify::new());
        let on_event = reconnected.clone();
        let outage = Arc::new(Outage::default());
        let on_outage = outage.clone();
        let health = Arc::new(NatsHealth::default());
        let on_health = health.clone();
        let settle = tuning.settle;
        let pod_name = pod.to_owned();
        let url = config.url.as_str();
        let subjects = Subjects::new(namespace);
        let options = super::credentials::apply(async_nats::ConnectOptions::new(), config).await?;
        let options = options
            .custom_inbox_prefix(subjects.inbox_prefix())
            .name(format!("tether-gateway/{pod}"))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            // Come back within a second of NATS returning: pushes answer 503 meanwhile.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).min(1000))
            })
            .event_callback(move |event| {
                on_health.record(&event);
                let on_event = on_event.clone();
                let on_outage = on_outage.clone();
                let pod = pod_name.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            info!(%pod, "NATS connected");
                            if on_outage.lost.swap(false, Ordering::AcqRel) {
                                *on_outage.settle_until.lock() = Some(Instant::now() + settle);
                                on_event.notify_one();
                            }
                        }
                        async_nats::Event::Disconnected => {
                            warn!(%pod, "NATS disconnected");
                            on_outage.lost.store(true, Ordering::Release);
                        }
                        other => debug!(%pod, event = %other, "NATS event"),
                    }
                }
            });
        // Every server of a cluster, so the client moves to another when its own goes
        // away (async-nats does not split a comma-separated string itself).
        let servers = server_addrs(url)?;
        let client = match options.clone().connect(servers.as_slice()).await {
            Ok(client) => {
                health.mark_connected();
                Ok(client)
            }
            // An unreachable NATS at start is an outage like any other: the client
            // keeps connecting in the background and the pod starts without the bus.
            Err(e) if unreachable_at_start(e.kind()) => {
                warn!(%e, url, "NATS unreachable at start; connecting in the background");
                options
                    .retry_on_initial_connect()
                    .connect(servers.as_slice())
                    .await
            }
            Err(e) => Err(e),
        }
        .map_err(|e| NatsError::Connect {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
        let nats_instruments = crate::metrics::nats_instruments(
            &opentelemetry::global::meter("tether-gateway"),
            &health,
        );
        let attach_wait = tuning.attach_wait;
        let inner = Arc::new(Inner {
            local: LocalRouter::new(hub.clone(), pod),
            hub,
            me: Me {
                pod: pod.to_owned(),
                boot: uuid::Uuid::new_v4().simple().to_string(),
            },
            subjects,
            client,
            bus: OnceLock::new(),
            durable_configured: durable.is_some(),
            sweep_interval: durable
                .and_then(|(d, _)| super::durable::sweep_interval(d.max_age_seconds)),
            cache: Cache::new(tuning.cache_capacity),
            tuning,
            dirty: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            pods: Arc::default(),
            outage,
            health,
            _nats_instruments: nats_instruments,
        });
        let attaching = tokio::spawn(attach(
            inner.clone(),
            config.replicas.unwrap_or(1).max(1),
            durable.map(|(d, outbound_queue)| (d.clone(), outbound_queue)),
            reconnected,
        ));
        if tokio::time::timeout(attach_wait, attaching).await.is_err() {
            warn!(
                pod,
                url, "starting without the bus: serving local agents only until NATS is usable"
            );
        }
        Ok(Self { inner })
    }

    /// The NATS client (tests and metrics).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The pool's subject names.
    pub fn subjects(&self) -> &Subjects {
        &self.inner.subjects
    }

    /// This process's boot id.
    pub fn boot_id(&self) -> &str {
        &self.inner.me.boot
    }

    /// The durable queue, if configured.
    pub fn durable_queue(&self) -> Option<&Durable> {
        self.inner.durable()
    }

    /// Agents in the push-side directory cache.
    pub fn cached_routes(&self) -> usize {
        self.inner.cache.len()
    }
}

// === attaching to the bus ===

/// Opens what the bus holds for this pod, each step retried until NATS answers; then
/// serves other pods' calls and registers the agents that connected meanwhile.
async fn attach(
    inner: Arc<Inner>,
    replicas: usize,
    durable: Option<(tether_config::DurableConfig, usize)>,
    reconnected: Arc<Notify>,
) {
    let backoff = Backoff::default();
    let on_retry = || inner.health.record_bus_retry();
    let me: &Inner = &inner;
    let js = &async_nats::jetstream::new(me.client.clone());
    let durable = match &durable {
        Some((config, outbound_queue)) => Some(
            retry::until_ok("opening the durable queue", backoff, on_retry, move || {
                let (client, hub) = (me.client.clone(), me.hub.clone());
                Durable::open(
                    client,
                    js.clone(),
                    &me.subjects,
                    config,
                    hub,
                    *outbound_queue,
                )
            })
            .await,
        ),
        None => None,
    };
    let revocations = retry::until_ok("opening the revocations", backoff, on_retry, move || {
        RevocationBus::start(
            me.client.clone(),
            js,
            &me.subjects,
            me.hub.clone(),
            replicas,
        )
    })
    .await;
    let census = retry::until_ok("subscribing to the census", backoff, on_retry, move || {
        let subject = me.subjects.census();
        Census::start(
            me.client.clone(),
            subject,
            me.hub.clone(),
            me.me.pod.clone(),
        )
    })
    .await;
    let directory = retry::until_ok("opening the directory", backoff, on_retry, move || {
        Directory::open(js.clone(), &me.subjects, replicas)
    })
    .await;
    let previous_boot = retry::until_ok("registering this pod", backoff, on_retry, || async {
        let previous = directory.pod_boot(&me.me.pod).await?;
        directory.announce(&me.me).await?;
        Ok::<_, DirectoryError>(previous)
    })
    .await;
    let subjects = &[
        me.subjects.pod_wildcard(&me.me.pod),
        me.subjects.group_wildcard(),
        me.subjects.broadcast(),
    ];
    let incoming = retry::until_ok(
        "subscribing this pod",
        backoff,
        on_retry,
        move || async move {
            let mut subscriptions = Vec::with_capacity(subjects.len());
            for subject in subjects {
                let subscription = me.client.subscribe(subject.clone()).await;
                subscriptions.push(subscription.map_err(|e| e.to_string())?);
            }
            // Subscriptions must be in place before anyone routes to this pod.
            me.client.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(subscriptions)
        },
    )
    .await;
    // Only now may this pod write directory entries: a pod routing to one of them
    // before the subscriptions were in place would find no responder and drop it.
    let _ = inner.bus.set(Bus {
        directory,
        durable,
        revocations,
        census,
    });
    inner.serving.store(true, Ordering::Release);
    tokio::spawn(serve(
        inner.clone(),
        futures_util::stream::select_all(incoming),
    ));
    // Agents that connected before the bus was there are not in the directory yet.
    if inner.dirty.load(Ordering::Acquire) {
        reconnected.notify_one();
    }
    tokio::spawn(keep_registered(inner.clone(), reconnected));

    if let Some(previous) = previous_boot.filter(|b| *b != inner.me.boot) {
        let inner = inner.clone();
        tokio::spawn(async move {
            let Some(bus) = inner.bus.get() else { return };
            match bus
                .directory
                .sweep_previous_incarnations(&inner.me, Duration::from_secs(60))
                .await
            {
                Ok(n) => info!(
                    previous,
                    removed = n,
                    "swept a previous incarnation's entries"
                ),
                Err(e) => warn!(%e, "sweep of a previous incarnation's entries failed"),
            }
        });
    }
    info!(pod = %inner.me.pod, "routing on NATS");
}

// === impl Inner: the calling side ===

impl Inner {
    fn connected_to_nats(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// "Not found", unless the directory may still be incomplete after an outage.
    fn not_found(&self) -> RouteError {
        let settling = self
            .outage
            .settle_until
            .lock()
            .is_some_and(|until| Instant::now() < until);
        if settling {
            unavailable("the directory is being rebuilt after a NATS outage")
        } else {
            RouteError::NotConnected
        }
    }

    /// The bus, while this pod is attached and NATS reachable.
    fn require_bus(&self) -> Result<&Bus, RouteError> {
        match self.bus.get() {
            Some(bus) if self.connected_to_nats() => Ok(bus),
            Some(_) => Err(unavailable(
                "NATS is unreachable; cannot route to other pods",
            )),
            None => Err(unavailable(NOT_ATTACHED)),
        }
    }

    /// The durable queue, once attached.
    fn durable(&self) -> Option<&Durable> {
        self.bus.get()?.durable.as_ref()
    }

    /// The durable queue, or why a durable call cannot be served.
    fn durable_queue(&self) -> Result<&Durable, RouteError> {
        if !self.durable_configured {
            return Err(unavailable("delivery.durable is not configured"));
        }
        self.durable().ok_or_else(|| unavailable(NOT_ATTACHED))
    }

    /// One NATS request carrying the current trace context.
    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, async_nats::RequestError> {
        let request = async_nats::Request::new()
            .payload(payload)
            .headers(wire::trace_headers())
            .timeout(Some(timeout));
        self.client.send_request(subject, request).await
    }

    /// Calls the pod that holds `agent`. At most one directory read (none on a cache
    /// hit) and one request; a stale cache entry costs one more of each. A stale
    /// directory entry (its pod answers "not here" or no longer exists) is removed and
    /// the agent counts as not connected.
    async fn call_agent(
        &self,
        agent: &str,
        op: PodOp,
        call: &Call,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Answer, RouteError> {
        let directory = &self.require_bus()?.directory;
        let payload = wire::encode_call(call, body).map_err(unavailable)?;
        for _ in 0..2 {
            let (route, revision, cached) = match self.cache.get(agent) {
                Some((route, revision)) => (route, revision, true),
                None => match directory.lookup(agent).await {
                    Ok(Some((route, revision))) => {
                        self.cache.put(agent, route.clone(), revision);
                        (route, revision, false)
                    }
                    Ok(None) => return Err(self.not_found()),
                    Err(e) => return Err(unavailable(e)),
                },
            };
            if route.on_pod(&self.me) {
                // The directory says "here" but the hub (checked first) disagrees:
                // a previous incarnation's entry or a disconnect being recorded.
                self.cache.invalidate(agent);
                if !cached {
                    Self::drop_stale(directory, agent, revision).await;
                    return Err(self.not_found());
                }
                continue;
            }
            let stale = match self
                .request(self.subjects.pod(&route.pod, op), payload.clone(), timeout)
                .await
            {
                Ok(message) => match Answer::decode(&message.payload) {
                    Ok(Answer::NotHere) => true,
                    Ok(answer) => return Ok(answer),
                    Err(e) => {
                        return Err(unavailable(format!("bad answer from {}: {e}", route.pod)));
                    }
                },
                Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                    debug!(pod = %route.pod, "no responder: pod is gone");
                    true
                }
                Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                    return Err(unavailable(format!("pod {} did not answer", route.pod)));
                }
                Err(e) => return Err(unavailable(e)),
            };
            if stale {
                self.cache.invalidate(agent);
                if !cached {
                    Self::drop_stale(directory, agent, revision).await;
                    return Err(self.not_found());
                }
                // The cached route may be older than the directory: read it once more.
            }
        }
        Err(self.not_found())
    }

    async fn drop_stale(directory: &Directory, agent: &str, revision: u64) {
        match directory.remove(agent, revision).await {
            Ok(true) => debug!(agent, "removed a stale directory entry"),
            Ok(false) => {}
            Err(e) => debug!(%e, agent, "could not remove a stale directory entry"),
        }
    }

    /// The pods to expect answers from in a fan-out.
    async fn known_pods(&self, directory: &Directory) -> BTreeSet<String> {
        let fresh = {
            let known = self.pods.lock();
            known
                .refreshed
                .is_some_and(|t| t.elapsed() < self.tuning.pods_refresh)
                .then(|| known.pods.clone())
        };
        if let Some(pods) = fresh {
            return pods;
        }
        let mut pods: BTreeSet<String> = match directory.pods().await {
            Ok(pods) => pods.into_iter().collect(),
            Err(e) => {
                debug!(%e, "pod registry unreadable; using the last known pods");
                self.pods.lock().pods.clone()
            }
        };
        pods.insert(self.me.pod.clone());
        let mut known = self.pods.lock();
        known.pods = pods.clone();
        known.refreshed = Some(Instant::now());
        pods
    }

    /// Publishes a frame once to a fan-out subject; every pod (this one included)
    /// queues it for its local members and answers with its count.
    async fn fan_out(
        &self,
        subject: String,
        group: Option<&str>,
        frame: Outbound,
    ) -> Result<usize, RouteError> {
        let directory = &self.require_bus()?.directory;
        let (body, binary) = wire::frame_body(&frame);
        let call = Call::Fanout {
            group: group.map(str::to_owned),
            binary,
        };
        let payload = wire::encode_call(&call, &body).map_err(unavailable)?;
        let expected = self.known_pods(directory).await;
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(unavailable)?;
        self.client
            .publish_with_reply_and_headers(subject, inbox, wire::trace_headers(), payload)
            .await
            .map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + self.tuning.fanout_timeout;
        let mut answered = BTreeSet::new();
        let mut delivered = 0;
        while !expected.is_subset(&answered) {
            let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await else {
                break;
            };
            if let Ok(Answer::Delivered { pod, n }) = Answer::decode(&message.payload)
                && answered.insert(pod)
            {
                delivered += n;
            }
        }
        if answered.is_empty() {
            // Not even this pod saw it: the bus did not carry the message.
            return Err(unavailable("the fan-out did not reach any pod"));
        }
        let missing: Vec<String> = expected.difference(&answered).cloned().collect();
        let newcomers = answered.difference(&expected).count();
        if newcomers > 0 {
            self.pods.lock().pods.extend(answered.iter().cloned());
        }
        if !missing.is_empty() {
            warn!(?missing, "pods did not confirm a fan-out; probing them");
            for pod in missing {
                self.probe(directory, pod);
            }
        }
        Ok(delivered)
    }

    /// Checks a pod that missed a fan-out; one with no responder is dead and leaves
    /// the registry.
    fn probe(&self, directory: &Directory, pod: String) {
        let client = self.client.clone();
        let subject = self.subjects.pod(&pod, PodOp::Ping);
        let directory = directory.clone();
        let payload = wire::encode_call(&Call::Ping, &[]).unwrap_or_default();
        let timeout = self.tuning.call_timeout;
        let pods = self.pods.clone();
        tokio::spawn(async move {
            let request = async_nats::Request::new()
                .payload(payload)
                .timeout(Some(timeout));
            if let Err(e) = client.send_request(subject, request).await
                && e.kind() == RequestErrorKind::NoResponders
            {
                info!(%pod, "pod is gone; removing it from the registry");
                let _ = directory.forget_pod(&pod).await;
                pods.lock().pods.remove(&pod);
            }
        });
    }

    /// Scatter-gather of a call over every known pod (used by the listing).
    async fn ask_every_pod(&self, call: &Call) -> Result<Vec<Answer>, RouteError> {
        let directory = &self.require_bus()?.directory;
        let payload = wire::encode_call(call, &[]).map_err(unavailable)?;
        let pods: Vec<String> = self
            .known_pods(directory)
            .await
            .into_iter()
            .filter(|p| *p != self.me.pod)
            .collect();
        let asks = pods.iter().map(|pod| {
            self.request(
                self.subjects.pod(pod, PodOp::List),
                payload.clone(),
                self.tuning.call_timeout,
            )
        });
        let results = futures_util::future::join_all(asks).await;
        let mut answers = Vec::new();
        for (pod, result) in pods.into_iter().zip(results) {
            match result {
                Ok(message) => answers.push(Answer::decode(&message.payload).map_err(unavailable)?),
                Err(e) if e.kind() == RequestErrorKind::NoResponders => self.probe(directory, pod),
                Err(e) => return Err(unavailable(format!("pod {pod}: {e}"))),
            }
        }
        Ok(answers)
    }
}

// === impl Inner: durable delivery ===

impl Inner {
    /// Tells the pod holding `agent` (if any) that something was stored for it.
    ///
    /// A kick is a call like a push: the pod answers "not here" when it does not hold
    /// the agent (it moved: drain, rebalance, reconnect), and [`Inner::call_agent`] then
    /// drops the stale cache entry and asks the directory's current owner. A kick that
    /// still fails (NATS away, pod silent) is made up by the agent's next connect or
    /// the next kick: the message is stored either way.
    async fn kick(&self, agent: &str) {
        let Some(durable) = self.durable() else {
            return;
        };
        if let Some(conn) = self.hub.get(agent).filter(|c| !c.is_closing()) {
            durable.kick(&conn);
            return;
        }
        let call = Call::Kick {
            agent: agent.to_owned(),
        };
        match self
            .call_agent(agent, PodOp::Kick, &call, &[], self.tuning.call_timeout)
            .await
        {
            Ok(_) => {}
            Err(RouteError::NotConnected) => {
                debug!(
                    agent,
                    "kick: agent not connected; it gets its backlog on connect"
                );
            }
            Err(e) => {
                debug!(%e, agent, "kick not delivered; the agent gets it on its next connect or kick")
            }
        }
    }
}

// === impl Inner: connection bookkeeping ===

fn route_of(me: &Me, conn: &Connection) -> Route {
    Route {
        pod: me.pod.clone(),
        boot: me.boot.clone(),
        conn: conn.id,
        at_ms: conn.connected_at_ms,
    }
}

impl Inner {
    /// Records a connection; tells the pod of the older connection (if any) to close it.
    /// A connection that lost to a newer one on another pod (the comparison happens
    /// inside the directory's compare-and-set) is closed here with 4003.
    async fn register(
        &self,
        directory: &Directory,
        conn: &Connection,
    ) -> Result<(), DirectoryError> {
        let route = route_of(&self.me, conn);
        let written = directory.register(&conn.agent_id, &route, &self.me).await?;
        self.cache.invalidate(&conn.agent_id);
        match written {
            directory::Written::Newer(newer) => {
                debug!(agent = %conn.agent_id, pod = %newer.pod, "a newer connection exists elsewhere");
                conn.close(CloseCode::Replaced);
            }
            directory::Written::Replaced(previous) => {
                if let Some(old) = directory::to_replace(previous.as_ref(), &self.me) {
                    self.tell_replace(&conn.agent_id, old).await;
                }
            }
        }
        Ok(())
    }

    async fn tell_replace(&self, agent: &str, old: directory::Replace) {
        let pod = old.pod;
        let call = Call::Replace {
            agent: agent.to_owned(),
            conn: old.conn,
            boot: Some(old.boot),
        };
        if let Ok(payload) = wire::encode_call(&call, &[]) {
            // Fire and forget: if it is lost, the other pod's re-registration after its
            // own outage finds the newer entry and closes its connection.
            let subject = self.subjects.pod(&pod, PodOp::Replace);
            if let Err(e) = self
                .client
                .publish_with_headers(subject, wire::trace_headers(), payload)
                .await
            {
                debug!(%e, pod, agent, "replace notice not sent");
            }
        }
    }

    /// Re-registers every local connection the directory does not name (after a NATS
    /// outage or loss of the bucket).
    async fn reregister_all(&self) -> Result<usize, DirectoryError> {
        let bus = self
            .bus
            .get()
            .ok_or_else(|| DirectoryError(NOT_ATTACHED.into()))?;
        let directory = &bus.directory;
        directory.ensure().await?;
        directory.announce(&self.me).await?;
        self.cache.clear();
        let conns = self.hub.snapshot();
        let results = futures_util::stream::iter(conns)
            .map(|conn| async move {
                let entry = directory.lookup(&conn.agent_id).await?;
                let route = entry.as_ref().map(|(r, _)| r);
                match directory::reconcile(route, &self.me, conn.id, conn.connected_at_ms) {
                    Reconcile::Keep => Ok(0),
                    Reconcile::CloseLocal => {
                        conn.close(CloseCode::Replaced);
                        Ok(0)
                    }
                    Reconcile::Write { .. } => {
                        self.register(directory, &conn).await?;
                        // Connected while NATS was away: its backlog was not looked at.
                        if let Some(durable) = &bus.durable {
                            durable.connected(&conn).await;
                        }
                        Ok(1)
                    }
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<Result<usize, DirectoryError>>>()
            .await;
        let mut written = 0;
        for result in results {
            written += result?;
        }
        Ok(written)
    }
}

/// Re-registers local connections after each NATS reconnect, and retries while some
/// connection could not be written.
async fn keep_registered(inner: Arc<Inner>, reconnected: Arc<Notify>) {
    loop {
        let woke_by_reconnect = tokio::select! {
            () = reconnected.notified() => true,
            () = tokio::time::sleep(inner.tuning.retry_interval) => false,
        };
        if !woke_by_reconnect && !inner.dirty.load(Ordering::Acquire) {
            continue;
        }
        if !inner.connected_to_nats() {
            inner.dirty.store(true, Ordering::Release);
            continue;
        }
        inner.dirty.store(false, Ordering::Release);
        match inner.reregister_all().await {
            Ok(n) => info!(written = n, "directory re-registration done"),
            Err(e) => {
                warn!(%e, "directory re-registration failed; retrying");
                inner.dirty.store(true, Ordering::Release);
            }
        }
    }
}

// === impl Inner: the serving side ===

/// Serves other pods' calls from this pod's three subscriptions.
async fn serve(inner: Arc<Inner>, mut incoming: impl futures_util::Stream<Item = Message> + Unpin) {
    while let Some(message) = incoming.next().await {
        let span = info_span!("nats.call", subject = %message.subject);
        if let Some(parent) = wire::remote_parent(message.headers.as_ref()) {
            let _ = span.set_parent(parent);
        }
        let Ok((call, body)) = wire::decode_call(&message.payload) else {
            warn!(subject = %message.subject, "undecodable call");
            continue;
        };
        let reply = message.reply.clone();
        match call {
            // These wait for an agent (bounded by the hub's pending limit), or walk the
            // whole hub (a listing page): off the loop, so they hold up no other call.
            Call::Request { .. }
            | Call::List { .. }
            | Call::Push {
                ack_ms: Some(_), ..
            } => {
                let inner = inner.clone();
                tokio::spawn(
                    async move {
                        let answer = inner.answer(call, body).await;
                        inner.send_answer(reply, answer).await;
                    }
                    .instrument(span),
                );
            }
            _ => {
                async {
                    let answer = inner.answer(call, body).await;
                    inner.send_answer(reply, answer).await;
                }
                .instrument(span)
                .await;
            }
        }
    }
    inner.serving.store(false, Ordering::Release);
    warn!("NATS subscriptions ended");
}

impl Inner {
    async fn send_answer(&self, reply: Option<async_nats::Subject>, answer: Option<Answer>) {
        if let (Some(reply), Some(answer)) = (reply, answer)
            && let Err(e) = self.client.publish(reply, answer.encode()).await
        {
            debug!(%e, "answer not sent");
        }
    }

    /// Performs a call from another pod on this pod's hub.
    async fn answer(&self, call: Call, body: Bytes) -> Option<Answer> {
        let result = |r: Result<(), RouteError>| match r {
            Ok(()) => Answer::Ok,
            Err(e) => Answer::from_error(&e),
        };
        Some(match call {
            Call::Push {
                agent,
                id,
                binary,
                ack_ms,
            } => match wire::frame_of(body, binary) {
                Ok(frame) => result(
                    self.local
                        .push(
                            &agent,
                            Push {
                                id,
                                frame,
                                ack_timeout: ack_ms.map(Duration::from_millis),
                            },
                        )
                        .await,
                ),
                Err(e) => Answer::Failed {
                    message: e.to_string(),
                },
            },
            Call::Request {
                agent,
                id,
                timeout_ms,
            } => match wire::frame_of(body, false) {
                Ok(frame) => match self
                    .local
                    .request(
                        &agent,
                        Request {
                            id,
                            frame,
                            timeout: Duration::from_millis(timeout_ms),
                        },
                    )
                    .await
                {
                    Ok(Ok(data)) => Answer::Reply {
                        data: data.get().to_owned(),
                    },
                    Ok(Err(error)) => Answer::AgentError { error },
                    Err(e) => Answer::from_error(&e),
                },
                Err(e) => Answer::Failed {
                    message: e.to_string(),
                },
            },
            Call::Presence { agent } => match self.hub.get(&agent) {
                Some(conn) => Answer::Presence {
                    presence: self.local.presence_of(&conn).into(),
                },
                None => Answer::NotHere,
            },
            Call::Disconnect { agent } => result(self.local.disconnect(&agent).await),
            Call::Replace { agent, conn, boot } => {
                // Connection ids restart with each process: the boot id tells an entry
                // of a previous incarnation from the connection that reuses its id.
                if let Some(current) = self.hub.get(&agent)
                    && directory::replace_applies(&self.me, current.id, conn, boot.as_deref())
                {
                    debug!(agent, conn, "newer connection on another pod: closing ours");
                    current.close(CloseCode::Replaced);
                }
                return None;
            }
            Call::List { cursor, limit } => {
                let (conns, next) = self.hub.list(cursor.as_deref(), limit);
                Answer::Page {
                    agents: conns
                        .iter()
                        .map(|c| self.local.presence_of(c).into())
                        .collect(),
                    more: next.is_some(),
                }
            }
            Call::Ping => Answer::Ok,
            // A replaced connection may still be here, closing: that is "not here" too.
            Call::Kick { agent } => match (
                self.durable(),
                self.hub.get(&agent).filter(|c| !c.is_closing()),
            ) {
                (Some(durable), Some(conn)) => {
                    durable.kick(&conn);
                    Answer::Ok
                }
                // "Not here": the caller re-resolves the agent through the directory.
                _ => Answer::NotHere,
            },
            Call::Fanout { group, binary } => {
                let n = match wire::frame_of(body, binary) {
                    Ok(frame) => match &group {
                        Some(group) => self.hub.deliver_to_group(group, &frame).await,
                        None => self.hub.broadcast(&frame).await,
                    },
                    Err(_) => 0,
                };
                Answer::Delivered {
                    pod: self.me.pod.clone(),
                    n,
                }
            }
        })
    }
}

// === impl Router for NatsRouter ===

#[async_trait]
impl Router for NatsRouter {
    fn connections_elsewhere(&self) -> u64 {
        let inner = &self.inner;
        inner
            .bus
            .get()
            .map_or(0, |bus| bus.census.elsewhere(&inner.me.pod))
    }

    async fn revoke(&self, revocation: &Revocation) -> Result<(), RouteError> {
        let inner = &self.inner;
        inner
            .require_bus()?
            .revocations
            .publish(revocation)
            .await
            .map_err(unavailable)?;
        // This pod also hears its own announcement; applying it now makes the answer
        // mean "closed here already".
        inner.hub.revoke(revocation);
        Ok(())
    }

    async fn connected(&self, conn: &Arc<Connection>) {
        let inner = &self.inner;
        let Ok(bus) = inner.require_bus() else {
            inner.dirty.store(true, Ordering::Release);
            return;
        };
        let register = inner.register(&bus.directory, conn);
        match tokio::time::timeout(inner.tuning.directory_timeout, register).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(%e, agent = %conn.agent_id, "directory write failed; will retry");
                inner.dirty.store(true, Ordering::Release);
            }
            Err(_) => {
                warn!(agent = %conn.agent_id, "directory write timed out; will retry");
                inner.dirty.store(true, Ordering::Release);
            }
        }
        // After the directory names this pod: a durable push stored from now on kicks
        // this pod, and one stored before is found by this look.
        if let Some(durable) = &bus.durable
            && !conn.is_closing()
        {
            durable.connected(conn).await;
        }
    }

    async fn disconnected(&self, conn: &Arc<Connection>) {
        let inner = &self.inner;
        if let Some(durable) = inner.durable() {
            durable.disconnected(conn.id);
        }
        // A newer local connection of the agent already overwrote the entry.
        if inner.hub.get(&conn.agent_id).is_some() {
            return;
        }
        let Ok(bus) = inner.require_bus() else {
            return;
        };
        // A failed delete leaves an entry naming this pod; the next push finds it
        // stale ("not here") and removes it.
        let unregister = bus.directory.unregister(&conn.agent_id, &inner.me, conn.id);
        if let Ok(Err(e)) = tokio::time::timeout(inner.tuning.directory_timeout, unregister).await {
            debug!(%e, agent = %conn.agent_id, "directory delete failed");
        }
    }

    async fn push(&self, agent: &str, push: Push) -> Result<(), RouteError> {
        let inner = &self.inner;
        if inner.hub.get(agent).is_some() {
            match inner.local.push(agent, push.clone()).await {
                Err(RouteError::NotConnected) => {}
                other => return other,
            }
        }
        let (body, binary) = wire::frame_body(&push.frame);
        let call = Call::Push {
            agent: agent.to_owned(),
            id: push.id,
            binary,
            ack_ms: push.ack_timeout.map(|d| d.as_millis() as u64),
        };
        let timeout = match push.ack_timeout {
            Some(t) => t + inner.tuning.call_margin,
            None => inner.tuning.call_timeout,
        };
        match inner
            .call_agent(agent, PodOp::Push, &call, &body, timeout)
            .await?
        {
            Answer::Ok => Ok(()),
            other => Err(other
                .to_error()
                .unwrap_or_else(|| unavailable("unexpected answer to a push"))),
        }
    }

    async fn request(&self, agent: &str, request: Request) -> Result<AgentReply, RouteError> {
        let inner = &self.inner;
        if inner.hub.get(agent).is_some() {
            match inner.local.request(agent, request.clone()).await {
                Err(RouteError::NotConnected) => {}
                other => return other,
            }
        }
        let (body, _) = wire::frame_body(&request.frame);
        let call = Call::Request {
            agent: agent.to_owned(),
            id: request.id,
            timeout_ms: request.timeout.as_millis() as u64,
        };
        let timeout = request.timeout + inner.tuning.call_margin;
        match inner
            .call_agent(agent, PodOp::Request, &call, &body, timeout)
            .await?
        {
            Answer::Reply { data } => tether_protocol::RawValue::from_string(data)
                .map(Ok)
                .map_err(|e| unavailable(format!("bad reply from the agent's pod: {e}"))),
            Answer::AgentError { error } => Ok(Err(error)),
            other => Err(other
                .to_error()
                .unwrap_or_else(|| unavailable("unexpected answer to a request"))),
        }
    }

    async fn send_to_group(&self, group: &str, frame: Outbound) -> Result<usize, RouteError> {
        let subject = self.inner.subjects.group(group);
        self.inner.fan_out(subject, Some(group), frame).await
    }

    async fn broadcast(&self, frame: Outbound) -> Result<usize, RouteError> {
        let subject = self.inner.subjects.broadcast();
        self.inner.fan_out(subject, None, frame).await
    }

    async fn presence(&self, agent: &str) -> Result<Option<Presence>, RouteError> {
        let inner = &self.inner;
        if let Some(conn) = inner.hub.get(agent) {
            return Ok(Some(inner.local.presence_of(&conn)));
        }
        let call = Call::Presence {
            agent: agent.to_owned(),
        };
        match inner
            .call_agent(
                agent,
                PodOp::Presence,
                &call,
                &[],
                inner.tuning.call_timeout,
            )
            .await
        {
            Ok(Answer::Presence { presence }) => Ok(Some(presence.into())),
            Ok(other) => Err(other
                .to_error()
                .unwrap_or_else(|| unavailable("unexpected answer to a presence call"))),
            Err(RouteError::NotConnected) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, cursor: Option<&str>, limit: usize) -> Result<Page, RouteError> {
        let inner = &self.inner;
        let call = Call::List {
            cursor: cursor.map(str::to_owned),
            limit,
        };
        let mut pages = Vec::new();
        for answer in inner.ask_every_pod(&call).await? {
            pages.push(
                wire::page_of(answer)
                    .ok_or_else(|| unavailable("unexpected answer to a listing"))?,
            );
        }
        let (conns, next) = inner.hub.list(cursor, limit);
        pages.push((
            conns.iter().map(|c| inner.local.presence_of(c)).collect(),
            next.is_some(),
        ));
        Ok(wire::merge_pages(pages, limit))
    }

    async fn disconnect(&self, agent: &str) -> Result<(), RouteError> {
        let inner = &self.inner;
        if inner.hub.get(agent).is_some() {
            return inner.local.disconnect(agent).await;
        }
        let call = Call::Disconnect {
            agent: agent.to_owned(),
        };
        match inner
            .call_agent(
                agent,
                PodOp::Disconnect,
                &call,
                &[],
                inner.tuning.call_timeout,
            )
            .await?
        {
            Answer::Ok => Ok(()),
            other => Err(other
                .to_error()
                .unwrap_or_else(|| unavailable("unexpected answer to a disconnect"))),
        }
    }

    fn durable(&self) -> bool {
        self.inner.durable_configured
    }

    async fn push_durable(
        &self,
        agent: &str,
        id: &str,
        frame: Bytes,
    ) -> Result<DurableReceipt, RouteError> {
        let inner = &self.inner;
        let durable = inner.durable_queue()?;
        inner.require_bus()?;
        let stored = durable.store(agent, id, frame).await?;
        // Off the push's path: the message is stored, the 202 need not wait for the
        // agent's pod (nor for a re-resolution when the route was stale).
        let kicker = self.inner.clone();
        let agent = agent.to_owned();
        tokio::spawn(async move { kicker.kick(&agent).await });
        Ok(DurableReceipt {
            sequence: stored.sequence,
            duplicate: stored.duplicate,
        })
    }

    async fn durable_status(
        &self,
        agent: Option<&str>,
        id: &str,
    ) -> Result<Option<MessageStatus>, RouteError> {
        self.inner.durable_queue()?.status(agent, id).await
    }

    async fn durable_backlog(&self) -> Option<u64> {
        self.inner.durable()?.backlog().await.ok()
    }

    fn durable_sweep_interval(&self) -> Option<Duration> {
        self.inner.sweep_interval
    }

    async fn durable_expired(&self) -> Result<Option<ExpiredMessage>, RouteError> {
        let inner = &self.inner;
        let (Some(bus), Some(durable)) = (inner.bus.get(), inner.durable()) else {
            return Ok(None);
        };
        // One sweeper per pool: the first pod of the registry by name. Two pods that
        // disagree for a moment both tell the upstream (same id: its Idempotency-Key).
        let first = inner.known_pods(&bus.directory).await.into_iter().next();
        if first.as_deref() != Some(inner.me.pod.as_str()) {
            return Ok(None);
        }
        durable.oldest_expired().await
    }

    async fn durable_expire(&self, expired: &ExpiredMessage) -> Result<(), RouteError> {
        match self.inner.durable() {
            Some(durable) => durable.expire(expired).await,
            None => Ok(()),
        }
    }

    fn durable_drains(&self) -> usize {
        self.inner.durable().map_or(0, Durable::draining)
    }

    fn acked(&self, conn: &Arc<Connection>, id: &str) -> bool {
        self.inner
            .durable()
            .is_some_and(|durable| durable.acked(conn.id, id))
    }

    fn max_body_bytes(&self) -> Option<usize> {
        // The server's announced limit, as of the current connection (an atomic the
        // client keeps: no copy of the server's INFO on every push).
        Some(body_limit(self.inner.client.max_payload()))
    }

    fn bus_connected(&self) -> Option<bool> {
        Some(self.inner.connected_to_nats() && self.inner.serving.load(Ordering::Acquire))
    }
}

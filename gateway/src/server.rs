//! Process assembly: listeners, the public accept loop, the internal API server and the
//! drain that ends them.
//!
//! ```text
//!  public listener ──accept──> hyper http1 (header timeout) ──> /v1/connect ──101──> connection task (driver)
//!  internal listener ──accept (cap)──> hyper http1 (header timeout) ──> axum (push API, admin, health)
//!  drain (SIGTERM | POST /admin/drain) ──> readiness false, stop accepting,
//!        reconnect hints + 1012 at drain.connectionsPerSecond, exit when empty or at the deadline
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tether_config::GatewayConfig;
use tether_protocol::CloseCode;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::{ApiKeys, KeyError, TokenVerifier};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::router::{LocalRouter, Router};
use crate::state::AppState;
use crate::tls::{Accepted, CertStore};
use crate::upstream::Upstream;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Keys or secrets could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] tether_config::ConfigError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The router could not be set up.
    #[error("routing: {0}")]
    Routing(String),
    /// `listen.tls` names files that do not hold a usable certificate and key.
    #[error("listen.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The first fetch of `auth.jwt.jwks` failed: with no key at all, no agent could
    /// connect, so the pod does not pretend to be ready.
    #[error("auth.jwt.jwks: {0}")]
    Jwks(#[from] crate::jwks::JwksError),
}

/// Builds the router once the hub exists (the cross-pod router needs the hub to deliver
/// what other pods forward to this one).
pub type RouterFactory = Box<
    dyn FnOnce(
            Arc<Hub>,
        )
            -> futures_util::future::BoxFuture<'static, Result<Arc<dyn Router>, StartError>>
        + Send,
>;

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    public_addr: SocketAddr,
    internal_addr: SocketAddr,
    probes_addr: Option<SocketAddr>,
    state: Arc<AppState>,
    tls: Option<Arc<CertStore>>,
    done: JoinHandle<()>,
}

fn listen(addr: &str, backlog: u32) -> Result<TcpListener, StartError> {
    let bind_error = |source| StartError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let parsed: SocketAddr = addr.parse().map_err(|_| {
        bind_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "expected IP:PORT",
        ))
    })?;
    let socket = if parsed.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(parsed).map_err(bind_error)?;
    socket.listen(backlog).map_err(bind_error)
}

impl Gateway {
    /// Starts a gateway: routing on NATS when `routing.nats` is set, else within this
    /// process only.
    pub async fn start(config: GatewayConfig, pod: String) -> Result<Self, StartError> {
        let pod_name = pod.clone();
        if let Some(nats) = config.routing.nats.clone() {
            if !nats.auth.is_set() {
                warn!(
                    "routing.nats has no credentials: anything that reaches NATS can push to \
                     and disconnect this pool's agents (see docs/security.md)"
                );
            }
            let namespace = crate::nats::namespace(&config);
            let durable = config.delivery.durable.clone();
            let outbound_queue = config.limits.outbound_queue;
            return Self::start_with_router(
                config,
                pod,
                Box::new(move |hub| {
                    Box::pin(async move {
                        let router = crate::nats::NatsRouter::connect(
                            &nats,
                            &namespace,
                            hub,
                            &pod_name,
                            crate::nats::Tuning::default(),
                            durable.as_ref().map(|d| (d, outbound_queue)),
                        )
                        .await
                        .map_err(|e| StartError::Routing(e.to_string()))?;
                        Ok(Arc::new(router) as Arc<dyn Router>)
                    })
                }),
            )
            .await;
        }
        Self::start_with_router(
            config,
            pod,
            Box::new(move |hub| {
                Box::pin(async move {
                    Ok(Arc::new(LocalRouter::new(hub, &pod_name)) as Arc<dyn Router>)
                })
            }),
        )
        .await
    }

    /// Starts a gateway with the router the factory builds.
    pub async fn start_with_router(
        config: GatewayConfig,
        pod: String,
        make_router: RouterFactory,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let verifier = TokenVerifier::from_config(&config.auth.jwt, config.tenant.clone())?;
        verifier.refresh_remote().await?;
        let api_keys = match &config.auth.api_keys_file {
            Some(path) => ApiKeys::from_file(path)?,
            None => {
                return Err(KeyError::Invalid(
                    "auth.apiKeysFile is required: the push API never runs unauthenticated".into(),
                )
                .into());
            }
        };
        if config
            .upstream
            .as_ref()
            .is_some_and(|u| u.secret_file.is_none())
        {
            warn!(
                "upstream.secretFile is not set: events reach the upstream unsigned, so it \
                 cannot tell them from forgeries (see docs/security.md)"
            );
        }
        let connect_check = config
            .auth
            .connect_check
            .as_ref()
            .map(crate::connect_check::ConnectCheck::new)
            .transpose()?;
        let upstream = config
            .upstream
            .as_ref()
            .map(|u| Upstream::new(u, config.limits.max_message_bytes))
            .transpose()?;
        let tls = config
            .listen
            .tls
            .as_ref()
            .map(CertStore::load)
            .transpose()?;
        let public = listen(&config.listen.public, config.listen.backlog)?;
        let internal = listen(&config.listen.internal, config.listen.backlog)?;
        let public_addr = public.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen.public.clone(),
            source,
        })?;
        let internal_addr = internal.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen.internal.clone(),
            source,
        })?;
        let probes = match &config.listen.probes {
            Some(addr) => {
                let listener = listen(addr, config.listen.backlog)?;
                let bound = listener.local_addr().map_err(|source| StartError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
                Some((listener, bound))
            }
            None => None,
        };
        let probes_addr = probes.as_ref().map(|(_, addr)| *addr);
        let hub = Arc::new(Hub::new(
            config.limits.outbound_queue,
            config.limits.max_pending_requests,
        ));
        let router = make_router(hub.clone()).await?;
        if let Some(bus) = router.max_body_bytes()
            && bus < config.limits.max_message_bytes
        {
            warn!(
                max_message_bytes = config.limits.max_message_bytes,
                bus_limit = bus,
                "limits.maxMessageBytes exceeds what the NATS server carries (max_payload less \
                 the envelope): larger pushes are refused with 413"
            );
        }
        let quotas = crate::quota::Quotas::new(&config.quotas, std::time::Instant::now());
        let state = Arc::new(AppState {
            config,
            pod,
            hub,
            router,
            verifier,
            api_keys,
            connect_check,
            quotas,
            upstream,
            metrics: Metrics::global(),
            admitted: AtomicUsize::new(0),
            refused_full: Default::default(),
            refused_capped: Default::default(),
            shedding: Default::default(),
            admission_closed_until_ms: Default::default(),
            draining: AtomicBool::new(false),
            drain_requested: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let done = tokio::spawn(run(
            state.clone(),
            public,
            internal,
            probes.map(|(listener, _)| listener),
            tls.clone(),
        ));
        Ok(Self {
            public_addr,
            internal_addr,
            probes_addr,
            state,
            tls,
            done,
        })
    }

    /// Where agents connect.
    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// Where the push API listens.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_addr
    }

    /// Where the probe listener (`/healthz`, `/readyz` only) listens, if configured.
    pub fn probes_addr(&self) -> Option<SocketAddr> {
        self.probes_addr
    }

    /// The public port's certificate when the gateway terminates TLS itself.
    pub fn tls(&self) -> Option<&Arc<CertStore>> {
        self.tls.as_ref()
    }

    /// The shared state (connection counts, hub) for status reporting and tests.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Starts draining; [`Gateway::wait`] returns once the drain is over.
    pub fn drain(&self) {
        self.state.request_drain();
    }

    /// Waits until the gateway has drained and stopped.
    pub async fn wait(self) {
        if let Err(e) = self.done.await {
            warn!(%e, "gateway task failed");
        }
    }
}

async fn run(
    state: Arc<AppState>,
    public: TcpListener,
    internal: TcpListener,
    probes: Option<TcpListener>,
    tls: Option<Arc<CertStore>>,
) {
    let stop_accepting = CancellationToken::new();
    let stop_internal = CancellationToken::new();
    let reload_tls = tls
        .clone()
        .map(|store| tokio::spawn(crate::tls::reload_loop(store)));
    let accept = tokio::spawn(accept_loop(
        state.clone(),
        public,
        tls,
        stop_accepting.clone(),
    ));
    let internal_server = tokio::spawn(serve_internal(
        state.clone(),
        internal,
        stop_internal.clone(),
        crate::api::router(state.clone()),
        state.config.listen.max_internal_connections,
    ));
    // Probes keep answering through the drain (readiness says "draining") until the
    // internal port stops too.
    let probe_server = probes.map(|listener| {
        tokio::spawn(serve_internal(
            state.clone(),
            listener,
            stop_internal.clone(),
            crate::api::probes(state.clone()),
            PROBE_CONNECTIONS,
        ))
    });
    let reload_keys = tokio::spawn(reload_keys(state.clone()));
    let refresh_jwks = state
        .verifier
        .remote()
        .map(|remote| Duration::from_secs(remote.config().refresh_interval_seconds))
        .map(|every| tokio::spawn(refresh_jwks(state.clone(), every)));
    let liveness = tokio::spawn(crate::liveness::sweep(
        state.hub.clone(),
        state.config.limits.clone(),
        state.metrics.messages_sent.clone(),
    ));

    let status = state
        .config
        .status
        .clone()
        .map(|config| crate::status::spawn(state.clone(), config));
    let expiry = state
        .router
        .durable_sweep_interval()
        .map(|every| tokio::spawn(sweep_expired(state.clone(), every)));

    state.drain_requested.cancelled().await;
    drain(&state).await;
    stop_accepting.cancel();
    let _ = accept.await;
    reload_keys.abort();
    if let Some(refresh_jwks) = refresh_jwks {
        refresh_jwks.abort();
    }
    if let Some(reload_tls) = reload_tls {
        reload_tls.abort();
    }
    liveness.abort();
    if let Some(expiry) = expiry {
        expiry.abort();
    }
    stop_internal.cancel();
    let _ = internal_server.await;
    if let Some(probe_server) = probe_server {
        let _ = probe_server.await;
    }
    if let Some(status) = status {
        status.shutdown(Duration::from_secs(5)).await;
    }
    info!("gateway stopped");
}

/// Most expired durable messages handled per sweep (the rest wait for the next one).
const EXPIRED_PER_SWEEP: usize = 1000;

/// Removes durable messages that outlived `maxAgeSeconds`, telling the upstream first
/// with an `expired` event (`id` = the message id, also its `Idempotency-Key`). A
/// message whose event the upstream did not accept stays and is tried on the next sweep.
async fn sweep_expired(state: Arc<AppState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for _ in 0..EXPIRED_PER_SWEEP {
            let expired = match state.router.durable_expired().await {
                Ok(Some(expired)) => expired,
                Ok(None) => break,
                Err(e) => {
                    debug!(%e, "expiry sweep failed; retrying at the next sweep");
                    break;
                }
            };
            if let Some(upstream) = &state.upstream {
                let event = crate::upstream::Event {
                    kind: "expired",
                    agent_id: &expired.agent,
                    id: Some(&expired.id),
                    data: None,
                    binary: None,
                };
                if let Err(e) = upstream.post(&event).await {
                    warn!(%e, id = %expired.id, "upstream did not take an expired event; retrying");
                    break;
                }
            }
            if let Err(e) = state.router.durable_expire(&expired).await {
                debug!(%e, "expired message not removed; retrying at the next sweep");
                break;
            }
            state
                .metrics
                .messages_dropped
                .add(1, &crate::metrics::label("reason", "expired"));
        }
    }
}

/// Mounted Secrets change in place when rotated; pick the new keys up (API keys and
/// the agents' JWT keys alike).
async fn reload_keys(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = state.api_keys.reload() {
            warn!(%e, "keeping the previous API keys");
        }
        if let Err(e) = state.verifier.reload() {
            warn!(%e, "keeping the previous JWT keys");
        }
    }
}

/// Fetches `auth.jwt.jwks` every `refreshIntervalSeconds`; a failure keeps the keys
/// (logged and counted by the fetch itself).
async fn refresh_jwks(state: Arc<AppState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let _ = state.verifier.refresh_remote().await;
    }
}

/// How long internal-API connections may finish their requests once the drain is
/// over; then they are dropped. A half-sent request must not hold the process.
const INTERNAL_GRACE: Duration = Duration::from_secs(2);

/// HTTP/1 settings both ports share: the header deadline (slowloris) and the largest
/// request head (header flood, 431 above it).
fn http1_builder(listen: &tether_config::ListenConfig) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(listen.header_timeout_ms))
        .max_buf_size(listen.max_header_bytes);
    builder
}

/// Accepts one connection, or `None` once `stop` is cancelled.
async fn accept(listener: &TcpListener, stop: &CancellationToken) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return None,
        };
        match accepted {
            Ok((stream, _)) => {
                // Small answers must not wait for Nagle + delayed ACK (tens of ms).
                let _ = stream.set_nodelay(true);
                return Some(stream);
            }
            Err(e) => {
                // EMFILE/ENFILE: back off instead of spinning; the backlog holds the
                // rest of the burst meanwhile.
                warn!(%e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Concurrent connections on the probe listener: a kubelet needs one or two; the cap
/// is its own, so the internal port's clients cannot use it up.
const PROBE_CONNECTIONS: usize = 64;

/// The internal port (the push API, admin and health) and the probe port. Not
/// `axum::serve`: that sets no header deadline, caps nothing, and its graceful shutdown
/// waits for every connection — a neighbour's half-sent request would hold the process
/// forever.
async fn serve_internal(
    state: Arc<AppState>,
    listener: TcpListener,
    stop: CancellationToken,
    app: axum::Router,
    cap: usize,
) {
    let builder = http1_builder(&state.config.listen);
    let slots = Arc::new(Semaphore::new(cap));
    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    while let Some(stream) = accept(&listener, &stop).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: close at once rather than queue; a backend retries, a flood ends.
            state
                .metrics
                .handshakes
                .add(1, &crate::metrics::label("result", "internal_full"));
            continue;
        };
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let (stop, hard_stop) = (stop.clone(), hard_stop.clone());
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                _ = connection => {}
                () = hard_stop.cancelled() => {}
            }
        });
    }
    connections.close();
    if tokio::time::timeout(INTERNAL_GRACE, connections.wait())
        .await
        .is_err()
    {
        hard_stop.cancel();
        connections.wait().await;
    }
}

/// The public port: upgrades only. Connections that have not finished their upgrade
/// (TLS handshake included) are capped by `listen.maxPendingUpgrades`; beyond it new
/// ones are closed at accept.
async fn accept_loop(
    state: Arc<AppState>,
    listener: TcpListener,
    tls: Option<Arc<CertStore>>,
    stop: CancellationToken,
) {
    let app = crate::upgrade::public_app(state.clone());
    let builder = http1_builder(&state.config.listen);
    let pending = Arc::new(Semaphore::new(state.config.listen.max_pending_upgrades));
    let tls = tls.map(|store| {
        (
            tokio_rustls::TlsAcceptor::from(store.server_config()),
            store.handshake_timeout(),
        )
    });
    while let Some(stream) = accept(&listener, &stop).await {
        let Ok(slot) = pending.clone().try_acquire_owned() else {
            state
                .metrics
                .handshakes
                .add(1, &crate::metrics::label("result", "pending_full"));
            continue;
        };
        if let Some((acceptor, timeout)) = &tls {
            // The handshake runs in the connection's task, holding its pending slot, so
            // a client that never speaks TLS costs one slot until the deadline.
            let (acceptor, timeout) = (acceptor.clone(), *timeout);
            let (app, builder, state_for_task) = (app.clone(), builder.clone(), state.clone());
            state.tasks.spawn(async move {
                let _slot = slot;
                let tls = match crate::tls::handshake(&acceptor, timeout, stream).await {
                    Accepted::Tls(tls) => tls,
                    Accepted::Refused(result) => {
                        state_for_task
                            .metrics
                            .handshakes
                            .add(1, &crate::metrics::label("result", result));
                        return;
                    }
                };
                // Corked as below, now that the TLS handshake has left unhindered.
                let _ = socket2::SockRef::from(tls.get_ref().0).set_tcp_cork(true);
                let service = TowerToHyperService::new(app);
                let _ = builder
                    .serve_connection(TokioIo::new(*tls), service)
                    .with_upgrades()
                    .await;
            });
            continue;
        }
        // Corked until the connection's driver has written its first frame (it uncorks
        // then): the 101 that hyper writes and the `welcome` leave in one segment —
        // one delivery and one wake-up of the agent instead of two. A refused
        // handshake is flushed by its close.
        let _ = socket2::SockRef::from(&stream).set_tcp_cork(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        state.tasks.spawn(async move {
            // Held until the HTTP phase ends: after a 101 the socket is the session's.
            let _slot = slot;
            let _ = connection.await;
        });
    }
}

/// Empties the gateway: no new upgrades, every agent gets a `reconnect` hint and a 1012
/// close at `drain.connectionsPerSecond`, then the process may exit. Frames queued before
/// a connection's close are written before it, so an accepted push is not lost.
async fn drain(state: &Arc<AppState>) {
    let span = info_span!("drain", pod = %state.pod);
    async {
        // Keep accepting so late clients get a clear 503 instead of a refused
        // connection; the handshake checks `draining`.
        state.draining.store(true, Ordering::Release);
        let config = &state.config.drain;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(config.deadline_seconds);
        let connections = state.hub.snapshot();
        info!(connections = connections.len(), "drain started");
        state
            .metrics
            .drain_remaining
            .add(connections.len() as i64, &[]);

        // Sessions past admission when the drain started register afterwards: scan
        // again until a scan finds nothing open (or the deadline passes).
        let mut batch = connections;
        while !batch.is_empty() && tokio::time::Instant::now() < deadline {
            let mut remaining = batch.into_iter();
            crate::shed::close_paced(
                state,
                || {
                    let next = remaining.next();
                    if next.is_some() {
                        state.metrics.drain_remaining.add(-1, &[]);
                    }
                    next
                },
                config.connections_per_second,
                "drain",
                tokio::time::sleep_until(deadline),
            )
            .await;
            batch = state
                .hub
                .snapshot()
                .into_iter()
                .filter(|c| !c.is_closing())
                .collect();
            state.metrics.drain_remaining.add(batch.len() as i64, &[]);
        }

        // Wait for the sessions (and upstream calls) to finish, up to the deadline; an
        // upgrade that was past admission may still register meanwhile, so look again
        // every 200 ms and close what is new.
        state.tasks.close();
        let finished = loop {
            tokio::select! {
                () = state.tasks.wait() => break true,
                () = tokio::time::sleep_until(deadline) => break false,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    for conn in state.hub.snapshot().into_iter().filter(|c| !c.is_closing()) {
                        crate::shed::hint_and_close(state, &conn, "drain");
                    }
                }
            }
        };
        if !finished {
            let left = state.hub.len();
            warn!(left, "drain deadline passed; closing the rest now");
            for conn in state.hub.snapshot() {
                conn.close(CloseCode::GoingAway);
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), state.tasks.wait()).await;
        }
        info!("drain finished");
    }
    .instrument(span)
    .await
}

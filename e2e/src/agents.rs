//! The agents: a fleet of SDK agents that grows and shrinks, connecting through the
//! pool's client Service.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::seq::IndexedRandom;
use tether_agent::{Agent, Backoff, Hs256Minter, Options, ReconnectPolicy, State};

use crate::JWT_SECRET;
use crate::service_proxy::{Conntrack, ServiceProxy};

/// Counters over all agents, read from the SDK's connection state.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Sessions opened (first connects included).
    pub sessions: AtomicU64,
    /// Sessions that ended and were followed by a reconnect (drains, sheds, a pod's
    /// exit): the reconnect storm.
    pub reconnects: AtomicU64,
    /// Connection attempts that failed (refused upgrade, no Ready pod, reset).
    pub refused: AtomicU64,
}

/// One agent's shared state.
#[derive(Debug, Default)]
pub struct AgentState {
    /// Currently connected (welcome received, socket open).
    pub connected: AtomicBool,
    /// Push ids received.
    pub received: Mutex<HashSet<String>>,
}

struct RunningAgent {
    id: String,
    state: Arc<AgentState>,
    agent: Agent,
    watcher: tokio::task::JoinHandle<()>,
}

/// A fleet of SDK agents (`tether-agent`) that can grow and shrink. They all connect to
/// one URL — the pool's client Service — and the Service picks their pods, so the SDK's
/// own reconnect rules (hints, back-off, overload floor) are what the loop exercises.
pub struct Agents {
    url: String,
    service: Option<Arc<Mutex<Conntrack>>>,
    options: Options,
    agents: Vec<RunningAgent>,
    /// Counters.
    pub stats: Arc<AgentStats>,
    next_id: u64,
}

impl Agents {
    /// No agents yet; they will connect through the kubelet's Service.
    pub fn through(service: &ServiceProxy) -> Self {
        let mut agents = Self::with_url(service.ws_url());
        agents.service = Some(service.conntrack());
        agents
    }

    /// No agents yet; they will connect to `url` (per-pod counts are then unknown).
    pub fn with_url(url: String) -> Self {
        Self {
            url,
            service: None,
            options: test_agent_options(),
            agents: Vec::new(),
            stats: Arc::default(),
            next_id: 0,
        }
    }

    /// Number of running agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Grows or shrinks to `n` agents (the newest leave first, closing with 1000).
    pub async fn scale_to(&mut self, n: usize) {
        self.grow(n, None).await;
        self.shrink(n).await;
    }

    /// Grows to `n` agents arriving at `per_second` (a load that ramps, as
    /// `tether-bench connect --rate` does).
    pub async fn ramp_to(&mut self, n: usize, per_second: f64) {
        self.grow(n, Some(per_second)).await;
    }

    async fn grow(&mut self, n: usize, per_second: Option<f64>) {
        let started = tokio::time::Instant::now();
        let first = self.agents.len();
        while self.agents.len() < n {
            if let Some(rate) = per_second {
                let due = (self.agents.len() - first) as f64 / rate.max(1.0);
                tokio::time::sleep_until(started + Duration::from_secs_f64(due)).await;
            }
            let id = format!("agent-{}", self.next_id);
            self.next_id += 1;
            let state = Arc::new(AgentState::default());
            let received = state.clone();
            let agent = Agent::builder(self.url.clone(), minter(&id))
                .options(self.options.clone())
                .on_push(move |push| {
                    if let Some(id) = push.id {
                        received.received.lock().insert(id);
                    }
                    async {}
                })
                .start()
                .expect("a valid Service URL");
            let watcher = tokio::spawn(watch_agent(
                agent.state(),
                state.clone(),
                self.stats.clone(),
            ));
            self.agents.push(RunningAgent {
                id,
                state,
                agent,
                watcher,
            });
            if per_second.is_none() && self.agents.len().is_multiple_of(50) {
                // Arrive in waves rather than one burst of SYNs.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    async fn shrink(&mut self, n: usize) {
        if self.agents.len() <= n {
            return;
        }
        let leaving: Vec<_> = self.agents.drain(n..).collect();
        let closes = leaving.iter().map(|a| async {
            let _ = tokio::time::timeout(Duration::from_secs(5), a.agent.close()).await;
        });
        futures_util::future::join_all(closes).await;
        for a in leaving {
            a.state.connected.store(false, Ordering::SeqCst);
            a.watcher.abort();
        }
    }

    /// How many agents are connected now.
    pub fn connected(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.state.connected.load(Ordering::SeqCst))
            .count()
    }

    /// Open connections per pod, from the Service's conntrack table (empty when the
    /// agents do not go through a [`ServiceProxy`]).
    pub fn per_pod(&self) -> BTreeMap<String, usize> {
        self.service
            .as_ref()
            .map(|t| t.lock().per_pod())
            .unwrap_or_default()
    }

    /// A random connected agent's id and state.
    pub fn random_connected(&self) -> Option<(String, Arc<AgentState>)> {
        let connected: Vec<_> = self
            .agents
            .iter()
            .filter(|a| a.state.connected.load(Ordering::SeqCst))
            .collect();
        connected
            .choose(&mut rand::rng())
            .map(|a| (a.id.clone(), a.state.clone()))
    }

    /// The state of agent `id`, if it still runs.
    pub fn state_of(&self, id: &str) -> Option<Arc<AgentState>> {
        self.agents
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.state.clone())
    }
}

/// The SDK's options with a shorter back-off: the production cap (30 s) would let one
/// unlucky agent sit out a whole test phase after a few refused attempts during a
/// rebalance, while the behaviour under test (hints, the overload floor) is the same.
pub fn test_agent_options() -> Options {
    Options {
        reconnect: ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(2),
            },
            overload_floor: Duration::from_millis(500),
        },
        ..Options::default()
    }
}

/// Follows one agent's SDK state into its flag and the fleet's counters.
async fn watch_agent(
    mut rx: tokio::sync::watch::Receiver<State>,
    state: Arc<AgentState>,
    stats: Arc<AgentStats>,
) {
    let mut previous = rx.borrow_and_update().clone();
    while rx.changed().await.is_ok() {
        let now = rx.borrow_and_update().clone();
        match (&previous, &now) {
            (_, State::Connected(_)) => {
                stats.sessions.fetch_add(1, Ordering::Relaxed);
                state.connected.store(true, Ordering::SeqCst);
            }
            (State::Connected(_), State::Waiting { .. }) => {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                state.connected.store(false, Ordering::SeqCst);
            }
            (_, State::Waiting { .. }) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            _ => state.connected.store(false, Ordering::SeqCst),
        }
        previous = now;
    }
    state.connected.store(false, Ordering::SeqCst);
}

/// The SDK's HS256 minter for `agent` in the pools' tenant, with the pools' secret.
pub fn minter(agent: &str) -> Hs256Minter {
    let mut minter = Hs256Minter::new(JWT_SECRET.as_bytes(), agent);
    minter.tenant = Some("acme".into());
    minter
}

/// An HS256 token for `agent`, valid for an hour.
pub fn token(agent: &str) -> String {
    minter(agent).mint().expect("HS256 minting cannot fail")
}

/// Agents that never come back: each connects once through `url` (retrying a refused
/// or failed first attempt, as a starting agent does), holds its socket, and when the
/// gateway closes it (a shed, a drain) it is gone for good — an agent behind a NAT that
/// dropped it, or one whose back-off outlasts the test. What rebalancing may destroy.
pub struct OneShotAgents {
    connected: Arc<Vec<AtomicBool>>,
    ever: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl OneShotAgents {
    /// Starts `n` agents (`oneshot-<i>`) at `per_second`, spread evenly; returns at once.
    /// An agent that has not connected within `patience` gives up.
    pub fn start(url: &str, n: usize, per_second: f64, patience: Duration) -> Self {
        let connected: Arc<Vec<AtomicBool>> =
            Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
        let ever = Arc::new(AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        let tasks = (0..n)
            .map(|i| {
                let (url, connected, ever) = (url.to_string(), connected.clone(), ever.clone());
                let at = started + Duration::from_secs_f64(i as f64 / per_second.max(1.0));
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let token = token(&format!("oneshot-{i}"));
                    let deadline = tokio::time::Instant::now() + patience;
                    let mut ws = loop {
                        match one_connect(&url, &token).await {
                            Some(ws) => break ws,
                            None if tokio::time::Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            None => return,
                        }
                    };
                    connected[i].store(true, Ordering::SeqCst);
                    ever.fetch_add(1, Ordering::Relaxed);
                    // Reading answers the gateway's pings; a close or an error ends it.
                    while let Some(Ok(frame)) = futures_util::StreamExt::next(&mut ws).await {
                        if frame.is_close() {
                            break;
                        }
                    }
                    connected[i].store(false, Ordering::SeqCst);
                })
            })
            .collect();
        Self {
            connected,
            ever,
            tasks,
        }
    }

    /// Agents connected now.
    pub fn connected(&self) -> usize {
        self.connected
            .iter()
            .filter(|c| c.load(Ordering::SeqCst))
            .count()
    }

    /// Agents that connected at least once.
    pub fn ever_connected(&self) -> u64 {
        self.ever.load(Ordering::Relaxed)
    }

    /// Closes every agent (the tasks end; their sockets drop).
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

type OneShotSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One upgrade offering `tether.v1` with `token`, through to the gateway's `welcome`.
async fn one_connect(url: &str, token: &str) -> Option<OneShotSocket> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().ok()?;
    let headers = request.headers_mut();
    headers.insert("sec-websocket-protocol", "tether.v1".parse().ok()?);
    headers.insert("authorization", format!("Bearer {token}").parse().ok()?);
    let connect = tokio_tungstenite::connect_async(request);
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .ok()?
        .ok()?;
    // The session is open once the gateway's first frame (its `welcome`) arrived.
    loop {
        let frame = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(&mut ws),
        )
        .await
        .ok()??
        .ok()?;
        if frame.is_text() {
            return Some(ws);
        }
        if frame.is_close() {
            return None;
        }
    }
}

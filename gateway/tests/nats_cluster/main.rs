//! A bus that survives a node: three real `nats-server`s clustered on loopback
//! (JetStream on, stores in temp dirs), two gateway pods that list all three, durable
//! pushes under load; the server leading the durable stream is killed mid-run and
//! restarted later. Every push that got a 202 reaches its agent, pushes keep being
//! accepted while the server is down (the stream has three replicas), and no gateway
//! turns unready at any point (`/readyz` polled throughout).

#[path = "../gateway/common.rs"]
mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tether_config::{DurableConfig, GatewayConfig, NatsConfig};
use tether_gateway::Gateway;
use tether_gateway::nats::subjects::Subjects;
use tether_protocol::{AgentMessage, GatewayMessage};
use tether_test_support::free_port;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use common::{API_KEY, PATIENCE, Ws, send_text};

/// Servers in the cluster.
const SERVERS: usize = 3;
/// Agents, all on the second pod; pushes go through both pods.
const AGENTS: usize = 8;
/// Pushes accepted before the kill, and while the server is down, before moving on.
const ACCEPTED_BEFORE: u64 = 150;
const ACCEPTED_DURING: u64 = 150;
/// Most push attempts in all: the test stops by itself even if the bus never recovers.
const MAX_ATTEMPTS: u64 = 20_000;

/// One server of the cluster.
struct Server {
    name: String,
    port: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// Three servers routing to each other.
struct Cluster {
    servers: Vec<Server>,
    cluster_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster_ports: Vec<u16> = (0..SERVERS).map(|_| free_port()).collect();
        let servers = (0..SERVERS)
            .map(|i| Server {
                name: format!("n{i}"),
                port: free_port(),
                store: dir.path().join(format!("n{i}")),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            servers,
            cluster_ports,
            _dir: dir,
        };
        for i in 0..SERVERS {
            cluster.spawn(i);
        }
        for i in 0..SERVERS {
            cluster.await_listening(i).await;
        }
        cluster.await_jetstream().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .cluster_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
            .collect();
        let server = &mut self.servers[i];
        let child = Command::new(tether_test_support::nats_server_binary().unwrap())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&server.store)
            .args(["--name", &server.name, "--cluster_name", "tether"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.cluster_ports[i]),
            ])
            .args(["--routes", &routes.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        server.child = Some(child);
    }

    async fn await_listening(&self, i: usize) {
        let addr = format!("127.0.0.1:{}", self.servers[i].port);
        tether_test_support::eventually(&format!("{addr} listens"), PATIENCE, || async {
            tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ())
        })
        .await;
    }

    /// Waits until the cluster's JetStream can hold a three-replica stream (its meta
    /// leader is elected and every server has joined).
    async fn await_jetstream(&self) {
        let client = async_nats::connect(self.addrs().as_slice()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        tether_test_support::eventually("JetStream R3 ready", PATIENCE * 6, || async {
            let created = js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "probe".into(),
                    subjects: vec!["probe".into()],
                    num_replicas: SERVERS,
                    ..Default::default()
                })
                .await;
            created.ok()?;
            js.delete_stream("probe").await.ok().map(|_| ())
        })
        .await;
    }

    /// Every live server, for the test's own clients.
    fn addrs(&self) -> Vec<async_nats::ServerAddr> {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| format!("nats://127.0.0.1:{}", s.port).parse().unwrap())
            .collect()
    }

    /// Every server's client URL, comma-separated (what the operator renders).
    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn index_of(&self, name: &str) -> usize {
        self.servers.iter().position(|s| s.name == name).unwrap()
    }

    /// SIGKILL: no goodbye to clients or to the other servers.
    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.await_listening(i).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..SERVERS {
            self.kill(i);
        }
    }
}

struct Pod {
    gateway: Gateway,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Pod {
    async fn start(cluster: &Cluster, name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let urls = cluster.urls();
        let config = common::config(dir.path(), |c: &mut GatewayConfig| {
            c.routing.nats = Some(NatsConfig {
                url: urls,
                namespace: None,
                auth: Default::default(),
                tls: None,
                replicas: Some(SERVERS),
            });
            c.delivery.durable = Some(DurableConfig {
                replicas: SERVERS,
                ..DurableConfig::default()
            });
        });
        let gateway = Gateway::start(config, name.into())
            .await
            .expect("gateway starts on the cluster");
        Self {
            gateway,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.internal_addr())
    }

    fn bus_connected(&self) -> bool {
        self.gateway.state().router.bus_connected() == Some(true)
    }
}

/// What the agents received: (agent, number) pairs.
type Received = Arc<Mutex<HashMap<String, BTreeSet<u64>>>>;

/// An agent that acknowledges every durable push, until `stop`.
async fn run_agent(mut ws: Ws, agent: String, received: Received, stop: CancellationToken) {
    loop {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            () = stop.cancelled() => return,
        };
        let Some(Ok(Message::Text(text))) = frame else {
            match frame {
                Some(Ok(_)) => continue,
                other => panic!("agent {agent}'s socket ended: {other:?}"),
            }
        };
        if let Ok(GatewayMessage::Push { id, data, ack }) = GatewayMessage::decode(&text) {
            assert!(ack, "a durable push asks for an ack");
            let n: u64 = serde_json::from_str(data.get()).unwrap();
            received.lock().entry(agent.clone()).or_default().insert(n);
            send_text(&mut ws, &AgentMessage::Ack { id }.encode()).await;
        }
    }
}

async fn connect_agent(pod: &Pod, agent: &str) -> Ws {
    let url = format!("ws://{}/v1/connect", pod.gateway.public_addr());
    let token = common::token(agent, &[], 3600);
    let (mut ws, _) = common::connect(&url, Some(&token))
        .await
        .expect("agent connects");
    match common::next_message(&mut ws).await {
        GatewayMessage::Welcome(w) => assert_eq!(w.agent_id, agent),
        other => panic!("expected welcome, got {other:?}"),
    }
    ws
}

/// Counts of the load so far.
#[derive(Default)]
struct Load {
    attempts: AtomicU64,
    accepted_total: AtomicU64,
    /// Accepted while a server was down.
    accepted_during: AtomicU64,
    down: AtomicBool,
}

/// Durable pushes round-robin over agents, through `pod`; records what got a 202.
async fn push_loop(
    http: reqwest::Client,
    api: String,
    worker: u64,
    load: Arc<Load>,
    accepted: Arc<Mutex<Vec<(String, u64)>>>,
    stop: CancellationToken,
) {
    let mut k = 0u64;
    while !stop.is_cancelled() && load.attempts.fetch_add(1, Ordering::Relaxed) < MAX_ATTEMPTS {
        k += 1;
        // Unique per worker: numbers never repeat across workers.
        let n = k * 10 + worker;
        let agent = format!("agent-{}", n as usize % AGENTS);
        let response = http
            .post(format!("{api}/v1/agents/{agent}/messages?delivery=durable"))
            .bearer_auth(API_KEY)
            .header("Idempotency-Key", format!("k-{n}"))
            .json(&json!(n))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let Ok(response) = response else { continue };
        match response.status().as_u16() {
            202 => {
                accepted.lock().push((agent, n));
                load.accepted_total.fetch_add(1, Ordering::Relaxed);
                if load.down.load(Ordering::Acquire) {
                    load.accepted_during.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Not stored while the stream elects a new leader: the caller was told.
            503 => tokio::time::sleep(Duration::from_millis(20)).await,
            other => {
                let body: Value = response.json().await.unwrap_or_default();
                panic!("a durable push answered {other}: {body}");
            }
        }
    }
}

/// Polls both pods' `/readyz` until `stop`; returns every answer that was not 200.
async fn readiness_watch(urls: Vec<String>, stop: CancellationToken) -> (u64, Vec<String>) {
    let http = reqwest::Client::new();
    let (mut polls, mut unready) = (0u64, Vec::new());
    while !stop.is_cancelled() {
        for url in &urls {
            polls += 1;
            match http.get(url).timeout(Duration::from_secs(5)).send().await {
                Ok(r) if r.status() == 200 => {}
                Ok(r) => unready.push(format!("{url}: {}", r.status())),
                Err(e) => unready.push(format!("{url}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (polls, unready)
}

/// The server that leads the pool's durable stream now (once it has one: right after a
/// kill the stream may be electing).
async fn stream_leader(cluster: &Cluster) -> String {
    let client = async_nats::connect(cluster.addrs().as_slice())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    tether_test_support::eventually("the stream's leader", PATIENCE, || async {
        let mut stream = js
            .get_stream(Subjects::new("acme").durable_stream())
            .await
            .ok()?;
        let info = stream.info().await.ok()?;
        assert_eq!(
            info.config.num_replicas, SERVERS,
            "the stream has three replicas"
        );
        info.cluster.as_ref()?.leader.clone()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_no_accepted_durable_push_and_no_readiness() {
    let mut cluster = Cluster::start().await;
    let (p0, p1) = tokio::join!(Pod::start(&cluster, "gw-0"), Pod::start(&cluster, "gw-1"));
    // A start does not wait for the bus for ever (a slow JetStream would otherwise fail
    // it): the load begins once both pods attached.
    tether_test_support::until("both pods attached to the bus", PATIENCE * 3, || {
        p0.bus_connected() && p1.bus_connected()
    })
    .await;

    let stop_agents = CancellationToken::new();
    let received: Received = Arc::default();
    let mut agents = Vec::new();
    for a in 0..AGENTS {
        let agent = format!("agent-{a}");
        let ws = connect_agent(&p1, &agent).await;
        agents.push(tokio::spawn(run_agent(
            ws,
            agent,
            received.clone(),
            stop_agents.clone(),
        )));
    }

    let stop_probes = CancellationToken::new();
    let probes = tokio::spawn(readiness_watch(
        vec![p0.api("/readyz"), p1.api("/readyz")],
        stop_probes.clone(),
    ));
    let stop_load = CancellationToken::new();
    let load = Arc::new(Load::default());
    let accepted: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let pushers: Vec<_> = [(&p0, 0u64), (&p1, 1), (&p0, 2)]
        .into_iter()
        .map(|(pod, worker)| {
            tokio::spawn(push_loop(
                pod.http.clone(),
                pod.api(""),
                worker,
                load.clone(),
                accepted.clone(),
                stop_load.clone(),
            ))
        })
        .collect();

    tether_test_support::until("pushes accepted before the kill", PATIENCE, || {
        load.accepted_total.load(Ordering::Relaxed) >= ACCEPTED_BEFORE
    })
    .await;
    let leader = stream_leader(&cluster).await;
    let victim = cluster.index_of(&leader);
    load.down.store(true, Ordering::Release);
    cluster.kill(victim);

    // The pods find the other servers, and durable pushes are stored again by the two
    // that remain (a majority of the stream's three replicas).
    tether_test_support::until("both pods on the bus again", PATIENCE, || {
        p0.bus_connected() && p1.bus_connected()
    })
    .await;
    tether_test_support::until("pushes accepted with a server down", PATIENCE * 2, || {
        load.accepted_during.load(Ordering::Relaxed) >= ACCEPTED_DURING
    })
    .await;
    assert_ne!(stream_leader(&cluster).await, leader, "a new leader");

    load.down.store(false, Ordering::Release);
    cluster.restart(victim).await;
    stop_load.cancel();
    for pusher in pushers {
        pusher.await.unwrap();
    }

    // Every 202 reaches its agent.
    let accepted = accepted.lock().clone();
    let total = accepted.len();
    tether_test_support::until("every accepted push delivered", PATIENCE * 2, || {
        let received = received.lock();
        accepted
            .iter()
            .all(|(agent, n)| received.get(agent).is_some_and(|r| r.contains(n)))
    })
    .await;
    stop_probes.cancel();
    let (polls, unready) = probes.await.unwrap();
    assert!(polls > 0);
    assert!(unready.is_empty(), "a pod turned unready: {unready:?}");
    assert!(total as u64 >= ACCEPTED_BEFORE + ACCEPTED_DURING);
    stop_agents.cancel();
    for agent in agents {
        agent.await.unwrap();
    }
}

//! Orchestration: for each target, start it, connect the agents through the workers,
//! measure memory, run the mode's load, and collect one [`TargetResult`].

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
    sync::Semaphore,
};

use crate::{
    children, pusher, report,
    stats::{self, Hist, unix_nanos},
    target::{Deployment, Kind, Paths, SHARD_CAPACITY, Tuning, Variant},
    worker::{self, Cmd, Event, Job},
};

/// Pipelined connections of the push driver to each shard's push API.
const PUSH_LANES_PER_SHARD: usize = 2;
/// Most unanswered pushes per connection; beyond it a push is counted as not sent.
const PUSH_LANE_DEPTH: usize = 4096;

/// Most sockets one worker process holds (the fd limit is ~20,000 per process).
const WORKER_CAPACITY: u64 = 19_000;

/// Command line of `tether-bench`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "tether-bench",
    version,
    about = "Side-by-side WebSocket gateway benchmarks"
)]
pub struct Args {
    /// What to measure.
    #[command(subcommand)]
    pub mode: Mode,
}

/// The benchmark modes (every mode first opens and measures the connections).
#[derive(Subcommand, Debug, Clone)]
pub enum Mode {
    /// Open N connections at rate R, hold them, report handshake rate and memory.
    Connect(Common),
    /// Push at a fixed rate to random agents; report push-API → agent latency.
    Push(Common),
    /// Requests at a fixed rate to random agents; report round-trip latency.
    Request(Common),
    /// Broadcasts to all agents; report fan-out deliveries per second.
    Broadcast(Common),
    /// Close a fraction of agents at once; report how fast they are back.
    Churn(Common),
    /// Hold a million connections (default) with lean clients and work on them: idle
    /// with pings, push at a fixed rate, one broadcast to all, a reconnect storm.
    Million(Million),
    /// Internal: a load worker process (started by the bench itself).
    #[command(hide = true)]
    Worker,
    /// Internal: a lean (mio) load worker process, for `million`.
    #[command(hide = true)]
    LeanWorker,
}

/// Options of `million`: every phase runs on the same connections, target by target.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Million {
    /// Servers to run one after the other, each holding all the connections (`limit`
    /// pings on the same schedule: the floor of the idle phase).
    #[arg(long, value_delimiter = ',', default_value = "tether")]
    pub targets: Vec<Kind>,
    /// More Tether targets after `--targets`, each from its own gateway binary
    /// (`NAME=PATH`, repeatable), as in the other modes: rows `tether[NAME]`.
    #[arg(long = "tether-variant", value_name = "NAME=PATH")]
    pub tether_variants: Vec<Variant>,
    /// Connections (agents).
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    pub connections: u64,
    /// Connections opened per second, over all client processes.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Most connections per process, server shard and client alike (one process may
    /// hold ~20,000 descriptors here).
    #[arg(long, default_value_t = 18_000)]
    pub per_process: u64,
    /// Handshakes in flight per client process.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds the connections are held idle (pings on) while CPU is measured.
    #[arg(long, default_value_t = 300.0)]
    pub idle: f64,
    /// Seconds between the server's pings to each agent (tether: `limits.pingIntervalSeconds`).
    #[arg(long, default_value_t = 30)]
    pub ping_interval: u64,
    /// Push phase: messages per second to random agents.
    #[arg(long, default_value_t = 10_000.0)]
    pub msg_rate: f64,
    /// Push phase: seconds of load.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Payload size in bytes (padding added to the timestamp probe).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Reconnect storm: fraction of agents closed at once.
    #[arg(long, default_value_t = 0.1)]
    pub fraction: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory of tether-gateway and peer-limit (default: this binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The bench/peers directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/peers"))]
    pub peers_dir: PathBuf,
}

impl Million {
    /// The options of the shared phases (push, broadcast, churn) for this run.
    fn common(&self) -> Common {
        Common {
            targets: self.targets.clone(),
            tether_variants: self.tether_variants.clone(),
            connections: self.connections,
            rate: self.rate,
            workers: Some(self.connections.div_ceil(self.per_process.max(1))),
            shards: Some(self.connections.div_ceil(self.per_process.max(1)) as usize),
            concurrency: self.concurrency,
            hold: 3.0,
            msg_rate: self.msg_rate,
            duration: self.duration,
            payload_bytes: self.payload_bytes,
            broadcasts: 1,
            interval_ms: 0,
            fraction: self.fraction,
            json: self.json.clone(),
            bin_dir: self.bin_dir.clone(),
            peers_dir: self.peers_dir.clone(),
            url: None,
            hs256_secret: None,
            hs256_secret_file: None,
            tenant: None,
        }
    }
}

/// Options shared by every mode.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Common {
    /// Servers to run side by side, in order.
    #[arg(long, value_delimiter = ',', default_value = "tether,axum")]
    pub targets: Vec<Kind>,
    /// More Tether targets, run after `--targets` in the same invocation, each from
    /// its own gateway binary (`NAME=PATH`, repeatable): builds compared side by side,
    /// e.g. the same gateway with another global allocator. Rows are `tether[NAME]`.
    #[arg(long = "tether-variant", value_name = "NAME=PATH")]
    pub tether_variants: Vec<Variant>,
    /// Connections (agents).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: u64,
    /// Connections opened per second, over all workers.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Worker processes (default: enough for ≤19,000 sockets each).
    #[arg(long)]
    pub workers: Option<u64>,
    /// Server processes per target (default: enough for ≤19,500 connections each).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds to hold the idle connections before the memory reading.
    #[arg(long, default_value_t = 3.0)]
    pub hold: f64,
    /// push/request: messages per second.
    #[arg(long, default_value_t = 1000.0)]
    pub msg_rate: f64,
    /// push/request: seconds of load.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Payload size in bytes (padding added to the timestamp probe).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// broadcast: how many broadcasts.
    #[arg(long, default_value_t = 10)]
    pub broadcasts: u64,
    /// broadcast: pause between broadcasts, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// churn: fraction of agents closed at once.
    #[arg(long, default_value_t = 0.3)]
    pub fraction: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory of tether-gateway, peer-axum, peer-axum-tuned, peer-limit (default: this binary's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The bench/peers directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/peers"))]
    pub peers_dir: PathBuf,
    /// Load an already running Tether gateway or Service instead of starting targets
    /// (`ws://127.0.0.1:8090/v1/connect`: the local platform's Service). `--targets` is
    /// then ignored, no server memory or CPU is read, and connections the server closes
    /// (drain, rebalancing) reconnect as agents do, after the `reconnect` hint's delay.
    /// Modes: connect and churn (the others need the push API's address).
    #[arg(long)]
    pub url: Option<String>,
    /// With `--url`: the HS256 secret the server verifies agents' JWTs with; each agent
    /// gets its own token (`sub` = `agent-<n>`), since one token shared by many
    /// connections would make each replace the previous (one connection per agent id).
    #[arg(
        long,
        env = "TETHER_BENCH_HS256_SECRET",
        requires = "url",
        hide_env_values = true
    )]
    pub hs256_secret: Option<String>,
    /// With `--url`: a file holding the HS256 secret (as `tether-agent
    /// --hs256-secret-file` takes it, e.g. the path the dev gateway prints); trailing
    /// whitespace is trimmed as the gateway does.
    #[arg(
        long,
        env = "TETHER_BENCH_HS256_SECRET_FILE",
        requires = "url",
        conflicts_with = "hs256_secret"
    )]
    pub hs256_secret_file: Option<PathBuf>,
    /// With `--url`: the `tenant` claim of the minted tokens (the pool's `spec.tenant`).
    #[arg(long, requires = "url")]
    pub tenant: Option<String>,
}

impl Common {
    /// The HS256 secret of `--url` mode: `--hs256-secret`, or the contents of
    /// `--hs256-secret-file` (trailing whitespace trimmed, as the gateway reads it).
    pub fn secret(&self) -> anyhow::Result<Option<String>> {
        match (&self.hs256_secret, &self.hs256_secret_file) {
            (Some(secret), _) => Ok(Some(secret.clone())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --hs256-secret-file {}", path.display()))?;
                Ok(Some(text.trim_end().to_owned()))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Results for one target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetResult {
    /// Target name.
    pub target: String,
    /// Whether clients authenticated (JWT) — peers do not.
    pub authenticated: bool,
    /// Server processes.
    pub shards: usize,
    /// Sessions opened.
    pub connections_ok: u64,
    /// Failed attempts by cause.
    pub failed: BTreeMap<String, u64>,
    /// Wall seconds of the connect phase.
    pub connect_s: f64,
    /// Sessions per wall second.
    pub handshakes_per_s: f64,
    /// Median handshake (TCP + upgrade + auth + first frame), ms.
    pub handshake_p50_ms: f64,
    /// p99 handshake, ms.
    pub handshake_p99_ms: f64,
    /// Server CPU seconds spent in the connect phase.
    pub connect_cpu_s: f64,
    /// Sessions per server CPU second (the per-core rate).
    pub handshakes_per_cpu_s: f64,
    /// Of `connect_cpu_s`, the seconds spent in the kernel (stime).
    pub connect_sys_cpu_s: f64,
    /// Server RSS before the connections, KiB (all shards).
    pub rss_base_kib: u64,
    /// Server RSS with the connections idle, KiB.
    pub rss_kib: u64,
    /// RSS delta per connection, bytes.
    pub rss_per_conn_bytes: f64,
    /// Kernel TCP memory delta per connection (both ends: client and server are local).
    pub kernel_per_conn_bytes: f64,
    /// push or request results.
    pub latency: Option<LatencyResult>,
    /// broadcast results.
    pub broadcast: Option<BroadcastResult>,
    /// churn results.
    pub churn: Option<ChurnResult>,
    /// million: the idle phase.
    pub idle: Option<IdleResult>,
    /// million: connections open at the end, and closed by the server over the run.
    pub end: Option<EndResult>,
}

/// The idle phase of `million`: what holding the connections costs with pings on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleResult {
    /// Seconds held.
    pub seconds: f64,
    /// Server CPU seconds over the phase.
    pub server_cpu_s: f64,
    /// Server cores busy per million connections.
    pub cores_per_million: f64,
    /// Pings the clients answered.
    pub pings: u64,
    /// Server CPU per ping cycle (ping written, pong read), µs.
    pub us_per_ping: f64,
    /// Client CPU seconds over the phase (the lean clients, for scale).
    pub client_cpu_s: f64,
}

/// How `million` ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndResult {
    /// Connections open after the last phase.
    pub open: u64,
    /// Connections the server closed over the whole run (not the churn's own closes).
    pub dropped: u64,
}

/// Latency of pushes (push API → agent) or requests (HTTP round trip).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencyResult {
    /// Messages scheduled (rate × duration).
    pub scheduled: u64,
    /// Written to the server.
    pub sent: u64,
    /// Scheduled but not written, by the driver's own limit (also in `errors`, by
    /// cause): the machine, not the server, fell behind.
    pub not_sent: u64,
    /// Accepted by the server (2xx).
    pub accepted: u64,
    /// Received by agents (push) or answered (request).
    pub delivered: u64,
    /// Failures by HTTP status or cause.
    pub errors: BTreeMap<String, u64>,
    /// Achieved rate, messages per second.
    pub rate: f64,
    /// Latency quantiles, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// p99.9, ms.
    pub p999_ms: f64,
    /// Max, ms.
    pub max_ms: f64,
    /// p99 of how late the driver sent a message against its schedule, ms.
    pub send_lag_p99_ms: f64,
    /// Server CPU seconds during the load.
    pub server_cpu_s: f64,
}

/// Broadcast fan-out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BroadcastResult {
    /// Broadcasts sent.
    pub broadcasts: u64,
    /// Deliveries expected (broadcasts × connections).
    pub expected: u64,
    /// Deliveries received.
    pub delivered: u64,
    /// From the first send to the last delivery, seconds.
    pub elapsed_s: f64,
    /// Deliveries per wall second while a broadcast was in flight.
    pub deliveries_per_s: f64,
    /// Server CPU seconds during the phase.
    pub server_cpu_s: f64,
    /// Of `server_cpu_s`, the seconds spent in the kernel (stime).
    pub server_sys_cpu_s: f64,
    /// Deliveries per server CPU second (the per-core rate).
    pub deliveries_per_cpu_s: f64,
    /// Delivery latency from send, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
}

/// Reconnect storm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnResult {
    /// Agents closed at once.
    pub closed: u64,
    /// Back with a new session.
    pub back: u64,
    /// Seconds until the last one was back.
    pub elapsed_s: f64,
    /// Reconnects per second.
    pub reconnects_per_s: f64,
    /// Close-to-welcome time, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// Server CPU seconds during the storm.
    pub server_cpu_s: f64,
}

/// Entry point of the binary after argument parsing. The coordinator modes stop the
/// processes they started when the bench gets SIGINT or SIGTERM ([`crate::children`]).
pub async fn main_with(args: Args) -> anyhow::Result<()> {
    match args.mode {
        Mode::Worker => return worker::run().await,
        Mode::LeanWorker => return crate::lean::run_process(),
        _ => {}
    }
    tokio::select! {
        outcome = coordinate(args) => outcome,
        signal = children::stop_signal() => {
            let signal = signal?;
            let killed = children::kill_children();
            eprintln!("tether-bench: signal {signal}: stopped {killed} server and client processes");
            std::process::exit(128 + signal);
        }
    }
}

/// Runs one coordinator mode over every target.
async fn coordinate(args: Args) -> anyhow::Result<()> {
    let (name, common) = match args.mode {
        Mode::Worker | Mode::LeanWorker => bail!("worker modes do not coordinate"),
        Mode::Connect(c) => ("connect", c),
        Mode::Push(c) => ("push", c),
        Mode::Request(c) => ("request", c),
        Mode::Broadcast(c) => ("broadcast", c),
        Mode::Churn(c) => ("churn", c),
        Mode::Million(m) => return million(m).await,
    };
    let paths = Paths {
        bin_dir: match &common.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("binary has no directory")?
                .to_owned(),
        },
        peers_dir: common.peers_dir.clone(),
        gateway: None,
    };
    let mut results = Vec::new();
    if let Some(url) = &common.url {
        if !matches!(name, "connect" | "churn") {
            bail!("--url supports connect and churn ({name} needs the push API's address)");
        }
        eprintln!("== {name}: {url} ({} connections)", common.connections);
        let deployment = Deployment::external(url, common.secret()?, common.tenant.clone())?;
        let n = common.connections.max(1);
        let workers = worker_count(&common, n)?;
        let mut result = measure(name, &deployment, &common, n, workers).await?;
        result.target = url.clone();
        results.push(result);
    }
    let targets = if common.url.is_some() {
        Vec::new()
    } else {
        target_list(&common, &paths)
    };
    for (label, kind, paths) in targets {
        eprintln!("== {name}: {label} ({} connections)", common.connections);
        match run_target(name, kind, &common, &paths).await {
            Ok(result) => results.push(TargetResult {
                target: label,
                ..result
            }),
            Err(err) => {
                eprintln!("{label} failed: {err:#}");
                results.push(TargetResult {
                    target: format!("{label} (failed: {err})"),
                    ..TargetResult::default()
                });
            }
        }
    }
    print!("{}", report::table(name, &common, &results));
    if let Some(path) = &common.json {
        let doc = serde_json::json!({"mode": name, "options": common, "results": results});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    if results.iter().any(|r| r.connections_ok == 0) {
        bail!("a target opened no connection");
    }
    Ok(())
}

/// `tether-bench million`: for each target, start its shards, open the connections
/// through lean client processes, then run the phases on them (see [`drive_million`]).
async fn million(m: Million) -> anyhow::Result<()> {
    let c = m.common();
    let paths = Paths {
        bin_dir: match &m.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("binary has no directory")?
                .to_owned(),
        },
        peers_dir: m.peers_dir.clone(),
        gateway: None,
    };
    let n = m.connections.max(1);
    if m.per_process == 0 || m.per_process > WORKER_CAPACITY {
        bail!("--per-process must be 1..={WORKER_CAPACITY} (the descriptor limit per process)");
    }
    if !(0.0..=1.0).contains(&m.fraction) {
        bail!("--fraction must be within 0..=1");
    }
    let processes = n.div_ceil(m.per_process);
    let tuning = Tuning {
        ping_interval_seconds: Some(m.ping_interval),
    };
    let mut results = Vec::new();
    for (label, kind, paths) in target_list(&c, &paths) {
        eprintln!(
            "== million: {label} ({n} connections: {processes} server shards, {processes} clients)"
        );
        let outcome = async {
            let d = Deployment::start(kind, processes as usize, &paths, &tuning).await?;
            let result = measure_with("million", &d, &c, n, processes, m.idle).await;
            d.stop().await;
            result
        }
        .await;
        match outcome {
            Ok(result) => results.push(TargetResult {
                target: label,
                ..result
            }),
            Err(err) => {
                eprintln!("{label} failed: {err:#}");
                results.push(TargetResult {
                    target: format!("{label} (failed: {err})"),
                    ..TargetResult::default()
                });
            }
        }
    }
    print!("{}", report::table("million", &c, &results));
    if let Some(path) = &m.json {
        let doc = serde_json::json!({"mode": "million", "options": m, "results": results});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    if results.iter().any(|r| r.connections_ok == 0) {
        bail!("a target opened no connection");
    }
    Ok(())
}

/// The phases of `million`, in order, on the same connections: idle (`idle` seconds,
/// pings on), push at a fixed rate, one broadcast to all, a reconnect storm; then the
/// count of connections open and dropped.
async fn drive_million(
    d: &Deployment,
    c: &Common,
    idle: f64,
    procs: &mut [WorkerProc],
    result: &mut TargetResult,
) -> anyhow::Result<()> {
    let pids = d.pids();
    let clients: Vec<u32> = procs.iter().filter_map(|p| p.child.id()).collect();
    eprintln!("   idle {idle:.0} s");
    collect(procs).await?;
    let (cpu_before, client_before) = (cpu_of(&pids), cpu_of(&clients));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(idle.max(0.0))).await;
    let seconds = started.elapsed().as_secs_f64();
    let held = collect(procs).await?;
    let server_cpu_s = cpu_of(&pids) - cpu_before;
    result.idle = Some(IdleResult {
        seconds,
        server_cpu_s,
        cores_per_million: server_cpu_s / seconds.max(1e-9) * 1e6
            / result.connections_ok.max(1) as f64,
        pings: held.pings,
        us_per_ping: server_cpu_s * 1e6 / held.pings.max(1) as f64,
        client_cpu_s: cpu_of(&clients) - client_before,
    });
    eprintln!("   push {:.0} msg/s for {:.0} s", c.msg_rate, c.duration);
    drive_messages("push", d, c, result.connections_ok.max(1), procs, result).await?;
    eprintln!("   broadcast");
    drive_broadcast(d, c, procs, result).await?;
    eprintln!("   reconnect storm ({:.0} %)", c.fraction * 100.0);
    drive_churn(c, &pids, procs, result).await?;
    let end = collect(procs).await?;
    result.end = Some(EndResult {
        open: end.open,
        dropped: end.dropped,
    });
    Ok(())
}

/// The targets of a run in order, each with its row label and where its binaries
/// are: `--targets`, then every `--tether-variant` as `tether[NAME]` with its own
/// gateway binary.
fn target_list(common: &Common, paths: &Paths) -> Vec<(String, Kind, Paths)> {
    let mut targets: Vec<(String, Kind, Paths)> = common
        .targets
        .iter()
        .map(|kind| (kind.name().to_owned(), *kind, paths.clone()))
        .collect();
    for variant in &common.tether_variants {
        let paths = Paths {
            gateway: Some(variant.path.clone()),
            ..paths.clone()
        };
        targets.push((format!("tether[{}]", variant.name), Kind::Tether, paths));
    }
    targets
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    events: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    async fn command(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        Ok(())
    }

    async fn event(&mut self, limit: Duration) -> anyhow::Result<Event> {
        let line = tokio::time::timeout(limit, self.events.next_line())
            .await
            .context("worker did not answer in time")??
            .context("worker exited")?;
        Ok(serde_json::from_str(&line)?)
    }
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| stats::cpu_seconds(*p).ok())
        .sum()
}

fn sys_of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| stats::sys_cpu_seconds(*p).ok())
        .sum()
}

fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| stats::rss_kib(*p).ok()).sum()
}

async fn run_target(
    mode: &str,
    kind: Kind,
    c: &Common,
    paths: &Paths,
) -> anyhow::Result<TargetResult> {
    let n = c.connections.max(1);
    let shards = c
        .shards
        .unwrap_or_else(|| n.div_ceil(SHARD_CAPACITY as u64 - 500) as usize);
    let workers = worker_count(c, n)?;
    let deployment = Deployment::start(kind, shards, paths, &Tuning::default()).await?;
    let result = measure(mode, &deployment, c, n, workers).await;
    deployment.stop().await;
    result
}

fn worker_count(c: &Common, n: u64) -> anyhow::Result<u64> {
    let workers = c
        .workers
        .unwrap_or_else(|| n.div_ceil(WORKER_CAPACITY))
        .max(1);
    if n.div_ceil(workers) > WORKER_CAPACITY {
        bail!("{workers} workers cannot hold {n} sockets (≤{WORKER_CAPACITY} each)");
    }
    Ok(workers)
}

async fn measure(
    mode: &str,
    d: &Deployment,
    c: &Common,
    n: u64,
    workers: u64,
) -> anyhow::Result<TargetResult> {
    measure_with(mode, d, c, n, workers, 0.0).await
}

async fn measure_with(
    mode: &str,
    d: &Deployment,
    c: &Common,
    n: u64,
    workers: u64,
    idle: f64,
) -> anyhow::Result<TargetResult> {
    let pids = d.pids();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_base = rss_of(&pids);
    let sock_base = stats::tcp_socket_mem_bytes()?;
    let cpu_base = cpu_of(&pids);
    let sys_base = sys_of(&pids);

    let exe = std::env::current_exe()?;
    let per_worker = n.div_ceil(workers);
    let mut procs = Vec::new();
    for index in 0..workers {
        let first = index * per_worker;
        let count = per_worker.min(n.saturating_sub(first));
        if count == 0 {
            break;
        }
        let mut child = Command::new(&exe)
            .arg(if mode == "million" {
                "lean-worker"
            } else {
                "worker"
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let events = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        let job = Job {
            index: index as u32,
            first,
            count,
            prefix: "agent-".into(),
            shards: d.ws_addrs(),
            secret: d.secret.clone(),
            rate: c.rate / workers as f64,
            concurrency: c.concurrency,
            path: d.external.as_ref().map(|e| e.path.clone()),
            tenant: d.external.as_ref().and_then(|e| e.tenant.clone()),
            reconnect: d.external.is_some(),
        };
        stdin
            .write_all(format!("{}\n", serde_json::to_string(&job)?).as_bytes())
            .await?;
        procs.push(WorkerProc {
            child,
            stdin,
            events,
        });
    }

    let mut result = TargetResult {
        target: d.kind.name().into(),
        authenticated: d.secret.is_some(),
        shards: d.shards.len(),
        ..TargetResult::default()
    };
    let mut handshake = Hist::default();
    // A safety deadline, not a pace: a loaded machine connects far slower than
    // `--rate` (a 200k run here reached ~1,000/s against 10,000), and each worker
    // answers only once every attempt ended, each bounded by its own timeout.
    let connect_limit = Duration::from_secs_f64(n as f64 / c.rate.max(1.0) * 10.0 + 300.0);
    for proc in &mut procs {
        match proc.event(connect_limit).await? {
            Event::Connected {
                ok,
                failed,
                elapsed_s,
                handshake: h,
            } => {
                result.connections_ok += ok;
                for (cause, count) in failed {
                    *result.failed.entry(cause).or_insert(0) += count;
                }
                result.connect_s = result.connect_s.max(elapsed_s);
                handshake.add(&Hist::decode(&h)?);
            }
            other => bail!("unexpected worker event {other:?}"),
        }
    }
    result.connect_cpu_s = cpu_of(&pids) - cpu_base;
    result.connect_sys_cpu_s = sys_of(&pids) - sys_base;
    result.handshakes_per_s = result.connections_ok as f64 / result.connect_s.max(1e-9);
    result.handshakes_per_cpu_s = result.connections_ok as f64 / result.connect_cpu_s.max(0.01);
    result.handshake_p50_ms = handshake.quantile_ms(0.5);
    result.handshake_p99_ms = handshake.quantile_ms(0.99);

    tokio::time::sleep(Duration::from_secs_f64(c.hold.max(0.5))).await;
    result.rss_base_kib = rss_base;
    result.rss_kib = rss_of(&pids);
    let ok = result.connections_ok.max(1) as f64;
    result.rss_per_conn_bytes = (result.rss_kib as f64 - rss_base as f64) * 1024.0 / ok;
    result.kernel_per_conn_bytes = (stats::tcp_socket_mem_bytes()? as f64 - sock_base as f64) / ok;

    let outcome = match mode {
        "push" | "request" => drive_messages(mode, d, c, n, &mut procs, &mut result).await,
        "broadcast" => drive_broadcast(d, c, &mut procs, &mut result).await,
        "churn" => drive_churn(c, &pids, &mut procs, &mut result).await,
        "million" => drive_million(d, c, idle, &mut procs, &mut result).await,
        _ => Ok(()),
    };
    for proc in &mut procs {
        let _ = proc.command(&Cmd::Stop).await;
    }
    for proc in &mut procs {
        let _ = tokio::time::timeout(Duration::from_secs(10), proc.child.wait()).await;
        let _ = proc.child.start_kill();
    }
    outcome?;
    Ok(result)
}

/// Everything the driver needs to address one target's push API.
struct Api {
    client: reqwest::Client,
    kind: Kind,
    key: Option<String>,
    controls: Vec<std::net::SocketAddr>,
}

impl Api {
    fn new(d: &Deployment) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(4096)
                .timeout(Duration::from_secs(30))
                .build()?,
            kind: d.kind,
            key: d.api_key.clone(),
            controls: d.shards.iter().map(|s| s.control).collect(),
        })
    }

    fn url(&self, shard: usize, path: &str) -> String {
        format!("http://{}{path}", self.controls[shard])
    }

    fn post(&self, url: String, body: String) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        req
    }

    fn request(&self, agent: u64, body: String) -> reqwest::RequestBuilder {
        let shard = (agent % self.controls.len() as u64) as usize;
        let path = match self.kind {
            Kind::Tether => format!("/v1/agents/agent-{agent}/requests?timeout_ms=5000"),
            _ => format!("/request/agent-{agent}?timeout_ms=5000"),
        };
        self.post(self.url(shard, &path), body)
    }

    fn broadcast(&self, shard: usize, body: String) -> reqwest::RequestBuilder {
        let path = match self.kind {
            Kind::Tether => "/v1/broadcast",
            _ => "/broadcast",
        };
        self.post(self.url(shard, path), body)
    }
}

/// The workers' reports summed: deliveries since the last report, and the state now.
#[derive(Default)]
struct Reported {
    pushes: u64,
    requests: u64,
    latency: Hist,
    last_ns: u64,
    pings: u64,
    open: u64,
    dropped: u64,
}

async fn collect(procs: &mut [WorkerProc]) -> anyhow::Result<Reported> {
    let mut sum = Reported::default();
    for proc in procs.iter_mut() {
        proc.command(&Cmd::Report).await?;
    }
    for proc in procs.iter_mut() {
        match proc.event(Duration::from_secs(30)).await? {
            Event::Report {
                pushes,
                requests,
                latency,
                last_ns,
                open,
                dropped,
                pings,
            } => {
                sum.pushes += pushes;
                sum.requests += requests;
                sum.latency.add(&Hist::decode(&latency)?);
                sum.last_ns = sum.last_ns.max(last_ns);
                sum.pings += pings;
                sum.open += open;
                sum.dropped += dropped;
            }
            other => bail!("unexpected worker event {other:?}"),
        }
    }
    Ok(sum)
}

async fn collect_reports(procs: &mut [WorkerProc]) -> anyhow::Result<(u64, u64, Hist, u64)> {
    let r = collect(procs).await?;
    Ok((r.pushes, r.requests, r.latency, r.last_ns))
}

/// Collects the clients' deliveries until `expected` arrived or none came for `quiet`:
/// how many, their latencies, and when the last arrived (at least `last_ns`).
async fn await_deliveries(
    procs: &mut [WorkerProc],
    expected: u64,
    quiet: Duration,
    mut last_ns: u64,
) -> anyhow::Result<(u64, Hist, u64)> {
    let (mut delivered, mut latency) = (0, Hist::default());
    let mut quiet_since = Instant::now();
    while delivered < expected && quiet_since.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (p, _, l, t) = collect_reports(procs).await?;
        if p > 0 {
            quiet_since = Instant::now();
        }
        delivered += p;
        latency.add(&l);
        last_ns = last_ns.max(t);
    }
    Ok((delivered, latency, last_ns))
}

async fn drive_messages(
    mode: &str,
    d: &Deployment,
    c: &Common,
    n: u64,
    procs: &mut [WorkerProc],
    result: &mut TargetResult,
) -> anyhow::Result<()> {
    if mode == "push" {
        return drive_pushes(d, c, n, procs, result).await;
    }
    let api = Arc::new(Api::new(d)?);
    let pids = d.pids();
    collect_reports(procs).await?; // reset counters
    let cpu_before = cpu_of(&pids);
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let accepted = Arc::new(AtomicU64::new(0));
    let rtt = Arc::new(Mutex::new(Hist::default()));
    // A request's answer waits for the agent, so requests cannot share a pipelined
    // connection (one slow answer would hold the ones behind it): each is its own
    // `reqwest` call, at most this many at once; beyond it a request is not sent and
    // is counted as such.
    let in_flight = Arc::new(Semaphore::new(4096));
    let total = (c.msg_rate * c.duration).round() as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut sent = 0;
    let mut lag = Hist::default();
    for i in 0..total {
        // Open loop: message i leaves at i / rate, whatever happened to the ones before.
        let scheduled = start + Duration::from_secs_f64(i as f64 / c.msg_rate);
        tokio::time::sleep_until(scheduled).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            *errors
                .lock()
                .expect("lock")
                .entry(pusher::SATURATED.into())
                .or_insert(0) += 1;
            continue;
        };
        sent += 1;
        lag.record_us(scheduled.elapsed().as_micros() as u64);
        let agent = rand::random_range(0..n);
        let req = api.request(agent, pusher::probe(c.payload_bytes));
        let (errors, accepted, rtt) = (errors.clone(), accepted.clone(), rtt.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = req.send().await;
            drop(permit);
            match outcome {
                Ok(resp) if resp.status().is_success() => {
                    let _ = resp.bytes().await;
                    accepted.fetch_add(1, Ordering::Relaxed);
                    rtt.lock()
                        .expect("lock")
                        .record_us(sent.elapsed().as_micros() as u64);
                }
                Ok(resp) => {
                    *errors
                        .lock()
                        .expect("lock")
                        .entry(resp.status().as_u16().to_string())
                        .or_insert(0) += 1;
                }
                Err(err) => {
                    let cause = if err.is_timeout() {
                        "timeout"
                    } else {
                        "http error"
                    };
                    *errors
                        .lock()
                        .expect("lock")
                        .entry(cause.into())
                        .or_insert(0) += 1;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, requests, _, _) = collect_reports(procs).await?;
    let server_cpu_s = cpu_of(&pids) - cpu_before;
    let hist = rtt.lock().expect("lock").clone();
    let errors = errors.lock().expect("lock").clone();
    let not_sent = total - sent;
    result.latency = Some(LatencyResult {
        scheduled: total,
        sent,
        not_sent,
        accepted: accepted.load(Ordering::Relaxed),
        delivered: requests,
        errors,
        rate: requests as f64 / elapsed.max(1e-9),
        p50_ms: hist.quantile_ms(0.5),
        p99_ms: hist.quantile_ms(0.99),
        p999_ms: hist.quantile_ms(0.999),
        max_ms: hist.quantile_ms(1.0),
        send_lag_p99_ms: lag.quantile_ms(0.99),
        server_cpu_s,
    });
    Ok(())
}

/// Pushes at `--msg-rate` for `--duration` through the pipelined push driver
/// ([`pusher`]): every scheduled push is sent, answered, or counted as not sent with
/// its reason; latency is the agents' receipt time minus the send time in the probe.
async fn drive_pushes(
    d: &Deployment,
    c: &Common,
    n: u64,
    procs: &mut [WorkerProc],
    result: &mut TargetResult,
) -> anyhow::Result<()> {
    let api = pusher::PushApi {
        shards: d.shards.iter().map(|s| s.control).collect(),
        tether: d.kind == Kind::Tether,
        key: d.api_key.clone(),
    };
    let pids = d.pids();
    collect_reports(procs).await?; // reset counters
    let cpu_before = cpu_of(&pids);
    let total = (c.msg_rate * c.duration).round() as u64;
    let pace = pusher::Pace {
        rate: c.msg_rate,
        total,
        lanes_per_shard: PUSH_LANES_PER_SHARD,
        depth: PUSH_LANE_DEPTH,
        drain: Duration::from_secs(30),
    };
    let payload_bytes = c.payload_bytes;
    let pushed = pusher::run(&api, n, pace, || pusher::probe(payload_bytes)).await?;
    // Deliveries trail the answers by a little; wait until every accepted push arrived
    // or nothing moved for 2 s.
    let (delivered, latency, _) =
        await_deliveries(procs, pushed.accepted, Duration::from_secs(2), 0).await?;
    let server_cpu_s = cpu_of(&pids) - cpu_before;
    result.latency = Some(LatencyResult {
        scheduled: total,
        sent: pushed.sent,
        not_sent: pushed.not_sent(),
        accepted: pushed.accepted,
        delivered,
        errors: pushed.errors.clone(),
        rate: delivered as f64 / pushed.elapsed_s.max(1e-9),
        p50_ms: latency.quantile_ms(0.5),
        p99_ms: latency.quantile_ms(0.99),
        p999_ms: latency.quantile_ms(0.999),
        max_ms: latency.quantile_ms(1.0),
        send_lag_p99_ms: pushed.lag.quantile_ms(0.99),
        server_cpu_s,
    });
    Ok(())
}

async fn drive_broadcast(
    d: &Deployment,
    c: &Common,
    procs: &mut [WorkerProc],
    result: &mut TargetResult,
) -> anyhow::Result<()> {
    let api = Api::new(d)?;
    let pids = d.pids();
    collect_reports(procs).await?;
    let cpu_before = cpu_of(&pids);
    let sys_before = sys_of(&pids);
    let first_ns = unix_nanos();
    for b in 0..c.broadcasts {
        if b > 0 {
            tokio::time::sleep(Duration::from_millis(c.interval_ms)).await;
        }
        let sends = (0..api.controls.len())
            .map(|shard| api.broadcast(shard, pusher::probe(c.payload_bytes)).send());
        for outcome in futures_util::future::join_all(sends).await {
            let status = outcome?.status();
            if !status.is_success() {
                bail!("broadcast answered {status}");
            }
        }
    }
    let expected = c.broadcasts * result.connections_ok;
    // Wait until every delivery arrived or nothing moved for 5 s.
    let (delivered, latency, last_ns) =
        await_deliveries(procs, expected, Duration::from_secs(5), first_ns).await?;
    let server_cpu_s = cpu_of(&pids) - cpu_before;
    let server_sys_cpu_s = sys_of(&pids) - sys_before;
    let elapsed_s = (last_ns.saturating_sub(first_ns)) as f64 / 1e9;
    // The pauses between broadcasts are idle time, not fan-out: count only the spans in
    // flight by taking out the configured gaps.
    let busy_s =
        (elapsed_s - (c.broadcasts.saturating_sub(1) * c.interval_ms) as f64 / 1000.0).max(1e-6);
    result.broadcast = Some(BroadcastResult {
        broadcasts: c.broadcasts,
        expected,
        delivered,
        elapsed_s,
        deliveries_per_s: delivered as f64 / busy_s,
        server_cpu_s,
        server_sys_cpu_s,
        deliveries_per_cpu_s: delivered as f64 / server_cpu_s.max(0.01),
        p50_ms: latency.quantile_ms(0.5),
        p99_ms: latency.quantile_ms(0.99),
    });
    Ok(())
}

async fn drive_churn(
    c: &Common,
    pids: &[u32],
    procs: &mut [WorkerProc],
    result: &mut TargetResult,
) -> anyhow::Result<()> {
    let cpu_before = cpu_of(pids);
    for proc in procs.iter_mut() {
        proc.command(&Cmd::Churn {
            fraction: c.fraction,
        })
        .await?;
    }
    let mut churn = ChurnResult::default();
    let mut hist = Hist::default();
    for proc in procs.iter_mut() {
        match proc.event(Duration::from_secs(150)).await? {
            Event::Churned {
                closed,
                back,
                elapsed_s,
                reconnect,
            } => {
                churn.closed += closed;
                churn.back += back;
                churn.elapsed_s = churn.elapsed_s.max(elapsed_s);
                hist.add(&Hist::decode(&reconnect)?);
            }
            other => bail!("unexpected worker event {other:?}"),
        }
    }
    churn.server_cpu_s = cpu_of(pids) - cpu_before;
    churn.reconnects_per_s = churn.back as f64 / churn.elapsed_s.max(1e-9);
    churn.p50_ms = hist.quantile_ms(0.5);
    churn.p99_ms = hist.quantile_ms(0.99);
    result.churn = Some(churn);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_args(extra: &[&str]) -> Result<Common, clap::Error> {
        let args = Args::try_parse_from(
            [
                "tether-bench",
                "connect",
                "--url",
                "ws://127.0.0.1:8090/v1/connect",
            ]
            .iter()
            .chain(extra),
        )?;
        match args.mode {
            Mode::Connect(common) => Ok(common),
            _ => panic!("connect mode"),
        }
    }

    #[test]
    fn the_secret_is_taken_as_a_value_or_a_file_like_the_agent_cli_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwt-secret");
        std::fs::write(&file, "s3cret-of-the-gateway\n").unwrap();
        let by_value = connect_args(&["--hs256-secret", "s3cret-of-the-gateway"]).unwrap();
        let by_file = connect_args(&["--hs256-secret-file", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            by_value.secret().unwrap().as_deref(),
            Some("s3cret-of-the-gateway")
        );
        assert_eq!(by_file.secret().unwrap(), by_value.secret().unwrap());
        let both = connect_args(&[
            "--hs256-secret",
            "x",
            "--hs256-secret-file",
            file.to_str().unwrap(),
        ])
        .unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        let missing = connect_args(&["--hs256-secret-file", "/nonexistent/secret"]).unwrap();
        let err = missing.secret().unwrap_err();
        assert!(
            format!("{err:#}").starts_with("reading --hs256-secret-file /nonexistent/secret: "),
            "{err:#}"
        );
    }

    #[test]
    fn variants_run_after_the_targets_each_with_its_own_gateway() {
        let args = Args::parse_from([
            "tether-bench",
            "connect",
            "--targets",
            "tether,limit",
            "--tether-variant",
            "jemalloc=/tmp/je/tether-gateway",
            "--tether-variant",
            "glibc=/tmp/gl/tether-gateway",
        ]);
        let Mode::Connect(common) = args.mode else {
            panic!("connect mode");
        };
        let paths = Paths {
            bin_dir: PathBuf::from("/bin-dir"),
            peers_dir: PathBuf::from("/peers"),
            gateway: None,
        };
        let targets: Vec<(String, Kind, PathBuf)> = target_list(&common, &paths)
            .into_iter()
            .map(|(label, kind, paths)| (label, kind, paths.gateway_bin()))
            .collect();
        assert_eq!(
            targets,
            [
                (
                    "tether".into(),
                    Kind::Tether,
                    "/bin-dir/tether-gateway".into()
                ),
                (
                    "limit".into(),
                    Kind::Limit,
                    "/bin-dir/tether-gateway".into()
                ),
                (
                    "tether[jemalloc]".into(),
                    Kind::Tether,
                    "/tmp/je/tether-gateway".into()
                ),
                (
                    "tether[glibc]".into(),
                    Kind::Tether,
                    "/tmp/gl/tether-gateway".into()
                ),
            ]
        );
    }
}

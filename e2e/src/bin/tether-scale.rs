//! `tether-scale`: the control-plane scale scenario with every part in its own process,
//! for runs too large for one test process (docs/benchmarks.md, "Control plane at
//! scale"). The CI-sized run is `tests/control_plane.rs`; this one measures.
//!
//! ```text
//!  tether-scale run ──spawns──► tether-kube-sim        (the API stand-in)
//!        │                      tether-operator         (release build, all namespaces)
//!        │                      tether-scale podsim × S (each plays the kubelet and the
//!        │                                               gateways' reports for its namespaces)
//!        └── creates the pools, waits for them to converge, measures a steady window
//!            by the stand-in's accounting (/_sim/snapshot), changes every pool's spec and
//!            waits again; prints the figures and any budget broken (exit 1 if one is)
//! ```
//!
//! `cargo build --release -p tether-operator -p tether-kube-sim && cargo build --release -p tether-e2e --bin tether-scale`
//! then `target/release/tether-scale run --pools 10000 --pods 10 --namespaces 20 --shards 2`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;
use tether_e2e::podsim::{PodSim, SimConfig};
use tether_e2e::scale::{self, Steady, child_applies, pool_name, settled, usage};
use tether_e2e::{bin_dir, install, spawn_operator};
use tether_kube_sim::stats::Snapshot;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
#[command(
    about = "Control-plane scale runs: stand-in, operator and pod simulator in separate processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Orchestrate a whole run and print its figures.
    Run(RunArgs),
    /// Simulate the pods of every pool in the given namespaces (KUBECONFIG).
    Podsim(PodsimArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Pools to create.
    #[arg(long, default_value_t = 1000)]
    pools: usize,
    /// Pods each pool grows to, at most the CRD's ceiling (`tether_crds::MAX_POOL_PODS`,
    /// 800: what keeps the pool object under 1 MiB); the CRD refuses larger pools.
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(i64).range(1..=i64::from(tether_crds::MAX_POOL_PODS)))]
    pods: i64,
    /// Namespaces the pools are spread over (tenants; the simulator shards by them).
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Pod-simulator processes.
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// The pools' `reportIntervalSeconds` (pods heartbeat every two intervals).
    #[arg(long, default_value_t = 30)]
    report_seconds: i64,
    /// Steady-state window measured, seconds.
    #[arg(long, default_value_t = 120)]
    window: u64,
    /// Longest wait for convergence, seconds.
    #[arg(long, default_value_t = 1800)]
    patience: u64,
    /// Pool creates (and spec patches) in flight at once.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// The operator's `--concurrency`.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// The stand-in's `--history`: events kept per resource type (a watcher further behind
    /// gets 410 Gone and re-lists). Each keeps its object: mind the memory with big pools.
    #[arg(long, default_value_t = 100_000)]
    history: usize,
    /// Keep logs and kubeconfig here (default: a temporary directory, removed).
    #[arg(long)]
    keep: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PodsimArgs {
    /// A namespace to simulate (repeat).
    #[arg(long = "namespace", required = true)]
    namespaces: Vec<String>,
    /// Agents wanting each pool.
    #[arg(long)]
    load: i64,
    /// Reports in flight at once, per namespace.
    #[arg(long, default_value_t = 32)]
    report_concurrency: usize,
    /// Simulation step, milliseconds.
    #[arg(long, default_value_t = 500)]
    tick_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Run(args) => run(args).await,
        Cmd::Podsim(args) => podsim(args).await,
    }
}

async fn podsim(args: PodsimArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let mut sims = Vec::new();
    for ns in &args.namespaces {
        let mut config = SimConfig::new(ns);
        config.default_demand = Some(args.load);
        config.report_concurrency = args.report_concurrency;
        config.tick = Duration::from_millis(args.tick_ms);
        sims.push(PodSim::start(client.clone(), config).await);
    }
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        let (mut pods, mut reports, mut errors, mut twice) = (0, 0, 0, 0);
        for sim in &sims {
            let w = &sim.world;
            reports += w.reports.load(std::sync::atomic::Ordering::Relaxed);
            errors += w.report_errors.load(std::sync::atomic::Ordering::Relaxed);
            let all = w.pods.lock();
            pods += all.len();
            twice += all.values().filter(|p| acted_twice(&p.acted)).count();
        }
        eprintln!(
            "podsim: {pods} pods, {reports} reports, {errors} report errors, {twice} pods acted twice on one instruction"
        );
    }
}

fn acted_twice(acted: &[String]) -> bool {
    let mut seen = std::collections::HashSet::new();
    acted.iter().any(|id| !seen.insert(id))
}

/// A child process whose output goes to a log file.
fn spawn_logged(
    program: &Path,
    args: &[String],
    log: &Path,
    kubeconfig: &Path,
) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    Command::new(program)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

async fn snapshot(http: &reqwest::Client, url: &str) -> anyhow::Result<Snapshot> {
    Ok(http
        .get(format!("{url}/_sim/snapshot"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Waits until every pool is settled, polling no more often than the list costs allow.
async fn converge(
    client: &Client,
    a: &RunArgs,
    what: &str,
    started: Instant,
) -> anyhow::Result<Duration> {
    // A list of every pool costs the stand-in as much as a few hundred reports: 10,000
    // pools listed every 10 s slowed a run noticeably.
    let every = Duration::from_millis((a.pools as u64 * 5).clamp(1_000, 60_000));
    let deadline = started + Duration::from_secs(a.patience);
    loop {
        let done = settled(client, a.pods as i32, scale::load(a.pods)).await;
        if done == a.pools {
            let took = started.elapsed();
            println!("{what}: pools by size {:?}", scale::sizes(client).await?);
            return Ok(took);
        }
        eprintln!(
            "{:>6.0} s  {what}: {done}/{} pools settled",
            started.elapsed().as_secs_f64(),
            a.pools
        );
        if Instant::now() > deadline {
            bail!(
                "{what}: {done}/{} pools settled after {} s",
                a.pools,
                a.patience
            );
        }
        tokio::time::sleep(every).await;
    }
}

fn namespace(i: usize) -> String {
    format!("tenant-{i:03}")
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = a.keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");

    // The stand-in.
    let mut sim = Command::new(bin_dir().join("tether-kube-sim"))
        .args(["--kubeconfig".into(), kubeconfig.display().to_string()])
        .args(["--history".into(), a.history.to_string()])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("kube-sim.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("starting tether-kube-sim (build it with --release)")?;
    let mut lines = BufReader::new(sim.stdout.take().context("stdout")?).lines();
    let url = loop {
        let line = lines.next_line().await?.context("tether-kube-sim exited")?;
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.trim().to_string();
        }
    };
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = Client::try_from(config)?;
    let http = reqwest::Client::new();
    for n in 0..a.namespaces {
        install(&client, &namespace(n)).await?;
    }

    let concurrency = a.concurrency.to_string();
    let operator = spawn_operator(
        &kubeconfig,
        &dir.join("operator.log"),
        &[
            "--gateway-image",
            "tether-gateway:scale",
            "--concurrency",
            &concurrency,
        ],
        &std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,tether_operator=info".into()),
    )?;
    let op_pid = operator.id().context("operator pid")?;
    let mut shards = Vec::new();
    for s in 0..a.shards {
        let mut args = vec![
            "podsim".to_string(),
            "--load".into(),
            scale::load(a.pods).to_string(),
        ];
        for n in (s..a.namespaces).step_by(a.shards) {
            args.extend(["--namespace".into(), namespace(n)]);
        }
        let exe = std::env::current_exe()?;
        shards.push(spawn_logged(
            &exe,
            &args,
            &dir.join(format!("podsim-{s}.log")),
            &kubeconfig,
        )?);
    }
    let sim_pid = sim.id().context("stand-in pid")?;
    let shard_pids: Vec<u32> = shards.iter().filter_map(Child::id).collect();
    let report = |label: &str| {
        let (op_cpu, op_rss) = usage(op_pid);
        let (sim_cpu, sim_rss) = usage(sim_pid);
        let (sh_cpu, sh_rss) = shard_pids
            .iter()
            .map(|p| usage(*p))
            .fold((0.0, 0), |(c, r), (c2, r2)| (c + c2, r + r2));
        println!(
            "{label}: operator {op_cpu:.1} CPU-s, RSS {} MiB; stand-in {sim_cpu:.1} CPU-s, RSS {} MiB; \
             simulators {sh_cpu:.1} CPU-s, RSS {} MiB",
            op_rss / 1024,
            sim_rss / 1024,
            sh_rss / 1024
        );
        (op_cpu, op_rss)
    };

    // 1. Create every pool; wait until each has grown to its size and holds its load.
    println!(
        "scenario: {} pools × {} pods over {} namespaces, {} simulator processes, reports every {} s",
        a.pools, a.pods, a.namespaces, a.shards, a.report_seconds
    );
    let at_start = snapshot(&http, &url).await?;
    let started = Instant::now();
    let creates = futures_util::stream::iter(0..a.pools)
        .map(|i| {
            let client = client.clone();
            let ns = namespace(i % a.namespaces);
            async move {
                let manifest = scale::pool_manifest(&pool_name(i), &ns, a.pods, a.report_seconds);
                let pool: ConnectionPool = serde_json::from_value(manifest)?;
                Api::<ConnectionPool>::namespaced(client, &ns)
                    .create(&PostParams::default(), &pool)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(a.writers)
        .collect::<Vec<_>>()
        .await;
    creates.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    println!(
        "created {} pools in {:.1} s",
        a.pools,
        started.elapsed().as_secs_f64()
    );
    let converged = converge(&client, &a, "creates", started).await?;
    let created_applies = child_applies(&snapshot(&http, &url).await?.since(&at_start));
    println!(
        "converged after {:.1} s; {created_applies} child applies ({:.1} per pool)",
        converged.as_secs_f64(),
        created_applies as f64 / a.pools as f64
    );
    let (cpu_converged, _) = report("after convergence");

    // 2. Steady state: the budgets of issue 10, by the stand-in's accounting.
    let before = snapshot(&http, &url).await?;
    tokio::time::sleep(Duration::from_secs(a.window)).await;
    let window = snapshot(&http, &url).await?.since(&before);
    let steady = Steady::measure(&window, a.pools, a.window as f64);
    let (cpu_steady, _) = report("after the steady window");
    println!(
        "steady {steady}; operator {:.2} CPU-s per 1,000 reports",
        (cpu_steady - cpu_converged) * 1000.0 / steady.reports.max(1) as f64
    );
    println!(
        "steady: operator writes by target {:?}",
        scale::operator_writes_by_target(&window)
    );
    let mut broken = steady.violations();

    // 3. One spec change everywhere (a drain setting): every pool's children applied
    //    again, once, and the new generation observed.
    let before = snapshot(&http, &url).await?;
    let started = Instant::now();
    let patches = futures_util::stream::iter(0..a.pools)
        .map(|i| {
            let client = client.clone();
            let ns = namespace(i % a.namespaces);
            async move {
                let patch = json!({"spec": {"drain": {"deadlineSeconds": 31}}});
                Api::<ConnectionPool>::namespaced(client, &ns)
                    .patch(&pool_name(i), &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(a.writers)
        .collect::<Vec<_>>()
        .await;
    patches.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let changed = converge(&client, &a, "spec change", started).await?;
    let change = snapshot(&http, &url).await?.since(&before);
    let applies = child_applies(&change);
    println!(
        "spec change everywhere observed after {:.1} s: {applies} child applies ({:.1} per pool)",
        changed.as_secs_f64(),
        applies as f64 / a.pools as f64
    );
    // Each child once, as when the pools were created.
    if applies > created_applies {
        broken.push(format!(
            "{applies} child applies for one spec change of {} pools ({created_applies} to create them)",
            a.pools
        ));
    }
    report("at the end");
    drop(shards);
    drop(operator);
    let _ = sim.kill().await;
    if !broken.is_empty() {
        bail!("budgets broken: {broken:?}");
    }
    println!("every budget held");
    Ok(())
}

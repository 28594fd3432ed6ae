//! `tether-kube-sim`: serve the Kubernetes API stand-in on a loopback port and write a
//! kubeconfig for it. Prints `listening on http://127.0.0.1:PORT` once ready.

use std::path::PathBuf;

use clap::Parser;

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(about = "In-memory Kubernetes API stand-in for tests")]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0, env = "KUBE_SIM_PORT")]
    port: u16,
    /// Where to write a kubeconfig pointing at the server.
    #[arg(long, env = "KUBE_SIM_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Events kept per resource type before watches from older versions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_interval: u64,
    /// Events a watch may have waiting for a client that stopped reading before it is
    /// closed.
    #[arg(long, default_value_t = 10_000)]
    watch_buffer: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let Args {
        port,
        kubeconfig,
        history,
        bookmark_interval,
        watch_buffer,
    } = Args::parse();
    let sim = tether_kube_sim::Server::builder()
        .port(port)
        .history(history)
        .bookmark_interval(std::time::Duration::from_secs(bookmark_interval))
        .watch_buffer(watch_buffer)
        .start()
        .await?;
    if let Some(path) = kubeconfig {
        sim.write_kubeconfig(&path)?;
    }
    println!("listening on {}", sim.url());
    // Stop on SIGINT or SIGTERM (how test harnesses end child processes).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

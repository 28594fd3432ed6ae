//! `tether-gateway`: parses arguments and runs one gateway process.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use jsonwebtoken::{EncodingKey, Header};
use rand::Rng;
use tether_config::GatewayConfig;
use tether_gateway::Gateway;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

// The allocator decides how much of the handshakes' short-lived memory stays behind
// between a process's idle connections. Measured side by side (docs/benchmarks.md,
// "Allocators"): jemalloc 790–860 B per idle connection, mimalloc 920–1,040 B, glibc
// 1,140–1,240 B, and jemalloc's fixed cost per process is the smallest too.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "tether-gateway", version, about = "Tether WebSocket gateway")]
struct Args {
    /// Gateway configuration file (YAML, see docs/configuration.md).
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Development mode: local addresses, generated keys, a printed agent token.
    #[arg(long)]
    dev: bool,
    /// Override `listen.public`.
    #[arg(long, env = "TETHER_PUBLIC_ADDR")]
    public_addr: Option<String>,
    /// Override `listen.internal`.
    #[arg(long, env = "TETHER_INTERNAL_ADDR")]
    internal_addr: Option<String>,
    /// This pod's name (the downward API sets `POD_NAME`).
    #[arg(long, env = "POD_NAME", default_value = "gateway-0")]
    pod_name: String,
    /// Log as JSON lines.
    #[arg(long, env = "TETHER_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        config,
        dev,
        public_addr,
        internal_addr,
        pod_name,
        log_json,
    } = Args::parse();

    let mut config = match &config {
        Some(path) => GatewayConfig::from_file(path)?,
        None if dev => GatewayConfig::default(),
        None => anyhow::bail!("--config (or TETHER_CONFIG) is required outside --dev"),
    };
    let dev_credentials = if dev {
        Some(dev_setup(&mut config)?)
    } else {
        None
    };
    if let Some(addr) = public_addr {
        config.listen.public = addr;
    }
    if let Some(addr) = internal_addr {
        config.listen.internal = addr;
    }

    // Pod and pool name every span and metric (`instance`, `tether_pool` in Prometheus).
    let mut telemetry = tether_telemetry::Options::new("tether-gateway")
        .json(log_json)
        // `/metrics` on the internal port serves the same instruments as OTLP.
        .prometheus(true)
        .instance(pod_name.clone())
        .attribute("k8s.pod.name", pod_name.clone());
    if let Some(status) = &config.status {
        telemetry = telemetry
            .attribute("k8s.namespace.name", status.namespace.clone())
            .attribute("tether.pool", status.pool.clone());
    }
    let _telemetry = tether_telemetry::init(telemetry)?;

    let gateway = Gateway::start(config, pod_name).await?;
    println!(
        "tether-gateway listening public={} internal={}",
        gateway.public_addr(),
        gateway.internal_addr()
    );
    if let Some(credentials) = dev_credentials {
        credentials.print(&gateway);
    }
    std::io::stdout().flush()?;

    let state = gateway.state().clone();
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("signal received: draining (send it again to exit at once)");
        state.request_drain();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        std::process::exit(1);
    });
    gateway.wait().await;
    Ok(())
}

/// What dev mode generated, to print once the listeners are bound.
struct DevCredentials {
    token: String,
    api_key: String,
}

/// Dev mode: loopback addresses, a fresh HS256 secret and API key in a private temp
/// directory, and a day-long token for agent `dev-agent` in group `dev`.
fn dev_setup(config: &mut GatewayConfig) -> anyhow::Result<DevCredentials> {
    let dir = std::env::temp_dir().join(format!("tether-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let random_hex = |bytes: usize| {
        let mut buf = vec![0u8; bytes];
        rand::rng().fill(&mut buf[..]);
        hex::encode(buf)
    };
    let secret = random_hex(32);
    let api_key = format!("dev-{}", random_hex(16));
    let secret_file = dir.join("jwt-secret");
    let keys_file = dir.join("api-keys");
    std::fs::write(&secret_file, &secret)?;
    std::fs::write(&keys_file, format!("{api_key}\n"))?;
    config.auth.jwt.hs256_secret_file = Some(secret_file);
    config.auth.jwt.public_keys_file = None;
    config.auth.api_keys_file = Some(keys_file);
    if config.listen == tether_config::ListenConfig::default() {
        config.listen.public = "127.0.0.1:8080".into();
        config.listen.internal = "127.0.0.1:8081".into();
    }
    let claims = serde_json::json!({
        "sub": "dev-agent",
        "groups": ["dev"],
        "exp": tether_gateway::hub::unix_now() + 24 * 3600,
    });
    let token = jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?;
    Ok(DevCredentials { token, api_key })
}

impl DevCredentials {
    fn print(&self, gateway: &Gateway) {
        let (public, internal) = (gateway.public_addr(), gateway.internal_addr());
        println!(
            r#"
Dev mode. Agent token (agent "dev-agent", group "dev", valid 24 h):
  {token}

Connect an agent:
  cargo run -p tether-agent -- connect --url ws://{public}/v1/connect --token {token}

Push to it (API key {key}):
  curl -i -X POST http://{internal}/v1/agents/dev-agent/messages \
       -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
       -d '{{"hello":"agent"}}'
"#,
            token = self.token,
            key = self.api_key,
        );
    }
}

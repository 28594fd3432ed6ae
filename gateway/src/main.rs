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
    /// Development mode: local addresses, generated keys in a private temporary
    /// directory (removed on exit), a printed agent token. Not combined with --config:
    /// dev mode replaces the keys a configuration names.
    #[arg(long, conflicts_with = "config")]
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
    // Held until `main` returns: dropping it removes the dev keys.
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

    // Signal handlers first: a SIGTERM that arrives as soon as the addresses are printed
    // must drain (and, in dev mode, remove the keys), not kill the process outright.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let gateway = Gateway::start(config, pod_name).await?;
    println!(
        "tether-gateway listening public={} internal={}",
        gateway.public_addr(),
        gateway.internal_addr()
    );
    if let Some(credentials) = &dev_credentials {
        credentials.print(&gateway);
    }
    std::io::stdout().flush()?;

    let state = gateway.state().clone();
    let dev_dir = dev_credentials.as_ref().map(|c| c.dir.path().to_owned());
    tokio::spawn(async move {
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
        // `exit` runs no destructors: remove the dev keys first.
        if let Some(dir) = dev_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(1);
    });
    gateway.wait().await;
    drop(dev_credentials);
    Ok(())
}

/// What dev mode generated, to print once the listeners are bound.
struct DevCredentials {
    token: String,
    api_key: String,
    secret_file: PathBuf,
    /// The private directory of the generated keys; removed when dropped.
    dir: tempfile::TempDir,
}

/// Dev mode: loopback addresses, a fresh HS256 secret and API key in a private
/// temporary directory (created atomically with mode 0700 by `mkdtemp`, its files 0600,
/// removed on exit), and a day-long token for agent `dev-agent` in group `dev`.
fn dev_setup(config: &mut GatewayConfig) -> anyhow::Result<DevCredentials> {
    use std::os::unix::fs::PermissionsExt;
    // The mode is given at creation (mkdir with 0700), so the directory is never open
    // to others, not even between its creation and a later chmod.
    let dir = tempfile::Builder::new()
        .prefix("tether-dev-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("creating the dev mode's private directory")?;
    let random_hex = |bytes: usize| {
        let mut buf = vec![0u8; bytes];
        rand::rng().fill(&mut buf[..]);
        hex::encode(buf)
    };
    let secret = random_hex(32);
    let api_key = format!("dev-{}", random_hex(16));
    let secret_file = dir.path().join("jwt-secret");
    let keys_file = dir.path().join("api-keys");
    write_private(&secret_file, secret.as_bytes())?;
    write_private(&keys_file, format!("{api_key}\n").as_bytes())?;
    config.auth.jwt.hs256_secret_file = Some(secret_file.clone());
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
    Ok(DevCredentials {
        token,
        api_key,
        secret_file,
        dir,
    })
}

/// Writes a file only its owner can read (created new: never an existing file).
fn write_private(path: &std::path::Path, content: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(content)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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

JWT secret (HS256) for more agents, in a private directory removed on exit:
  {secret}
  cargo run -p tether-agent -- connect --url ws://{public}/v1/connect --hs256-secret-file {secret} --agent-id agent-2

Push to it (API key {key}):
  curl -i -X POST http://{internal}/v1/agents/dev-agent/messages \
       -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
       -d '{{"hello":"agent"}}'
"#,
            token = self.token,
            key = self.api_key,
            secret = self.secret_file.display(),
        );
    }
}

//! The servers under test: Tether gateway processes and the peers of `bench/peers/`,
//! each started as one or more shard processes (one process may hold at most ~20,000
//! file descriptors here), each printing one `listening ...` line on stdout.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A server implementation the bench can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The Tether gateway (JWT auth, tether.v1).
    Tether,
    /// axum + tokio-tungstenite with defaults (naive Rust).
    Axum,
    /// axum + tokio-tungstenite with a 1 KiB read buffer, no write buffer, mimalloc.
    AxumTuned,
    /// Node.js `ws`.
    NodeWs,
    /// Python `websockets`.
    PythonWebsockets,
    /// The floor: a bare mio loop, no framework, no auth, no idle buffers (`peer-limit`).
    Limit,
}

impl Kind {
    /// The name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tether => "tether",
            Kind::Axum => "axum-default",
            Kind::AxumTuned => "axum-tuned",
            Kind::NodeWs => "node-ws",
            Kind::PythonWebsockets => "python-websockets",
            Kind::Limit => "limit",
        }
    }

    /// Whether clients authenticate (only Tether verifies a JWT; peers accept anyone).
    pub fn authenticates(self) -> bool {
        self == Kind::Tether
    }
}

/// Where the launcher finds binaries and peer sources.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Directory of `tether-gateway`, `peer-axum`, `peer-axum-tuned`, `peer-limit`.
    pub bin_dir: PathBuf,
    /// `bench/peers`.
    pub peers_dir: PathBuf,
    /// The `tether-gateway` binary to start (default: the one in `bin_dir`; a
    /// `--tether-variant` names another build, e.g. with another allocator).
    pub gateway: Option<PathBuf>,
}

impl Paths {
    /// The gateway binary this run starts for a Tether target.
    pub fn gateway_bin(&self) -> PathBuf {
        self.gateway
            .clone()
            .unwrap_or_else(|| self.bin_dir.join("tether-gateway"))
    }
}

/// Another build of the gateway run as one more Tether target in the same invocation
/// (`--tether-variant NAME=PATH`): its row is named `tether[NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Variant {
    /// The row's label inside `tether[…]`.
    pub name: String,
    /// The `tether-gateway` binary (or a script that `exec`s one, so the PID measured
    /// is the gateway's).
    pub path: PathBuf,
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, path) = s
            .split_once('=')
            .filter(|(name, path)| !name.is_empty() && !path.is_empty())
            .ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            path: PathBuf::from(path),
        })
    }
}

/// One running server process.
#[derive(Debug)]
pub struct Shard {
    /// Its process id (for RSS and CPU readings).
    pub pid: u32,
    /// WebSocket listen address.
    pub ws: SocketAddr,
    /// Control (push API) address.
    pub control: SocketAddr,
    child: Child,
}

/// A started target: its shards and how to reach them.
#[derive(Debug)]
pub struct Deployment {
    /// Which implementation.
    pub kind: Kind,
    /// The shard processes; agent `i` connects to shard `i % len`.
    pub shards: Vec<Shard>,
    /// Tether only: the HS256 secret agents' tokens are signed with.
    pub secret: Option<String>,
    /// Tether only: the push-API key.
    pub api_key: Option<String>,
    /// An already running server (`--url`): agents connect here, nothing was started.
    pub external: Option<External>,
    _dir: tempfile::TempDir,
}

/// A server the bench did not start (`--url`): the local platform's Service, a gateway
/// in a cluster. Only the connection side is measured (no server RSS or CPU readings).
#[derive(Debug, Clone)]
pub struct External {
    /// The `host:port` of the URL, resolved.
    pub addr: SocketAddr,
    /// The URL's path (`/v1/connect`).
    pub path: String,
    /// The `tenant` claim of minted tokens, if the pool requires one.
    pub tenant: Option<String>,
}

/// Reads `ws://host:port/path` into the address to connect to and the path.
pub fn parse_ws_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    use std::net::ToSocketAddrs;
    let rest = url.strip_prefix("ws://").with_context(|| {
        format!("--url must be a ws:// URL, got {url:?} (wss is not supported)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/v1/connect"),
    };
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority:?} (host:port)"))?
        .next()
        .with_context(|| format!("{authority:?} resolves to no address"))?;
    Ok((addr, path.to_string()))
}

/// Server settings a mode chooses (the defaults leave each server's own).
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Seconds between the server's pings to each connection: Tether's
    /// `limits.pingIntervalSeconds`, `limit`'s `PING_INTERVAL_SECONDS` (it does not ping
    /// without it). The other peers never ping.
    pub ping_interval_seconds: Option<u64>,
}

/// Per-shard connection cap given to Tether (its `limits.maxConnections`).
pub const SHARD_CAPACITY: usize = 19_500;

impl Deployment {
    /// Starts `shards` processes of `kind`.
    pub async fn start(
        kind: Kind,
        shards: usize,
        paths: &Paths,
        tuning: &Tuning,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut secret = None;
        let mut api_key = None;
        let mut started = Vec::new();
        for index in 0..shards.max(1) {
            let command = match kind {
                Kind::Tether => {
                    let s = secret.get_or_insert_with(|| random_hex(32)).clone();
                    let k = api_key.get_or_insert_with(|| random_hex(24)).clone();
                    let config = write_gateway_config(dir.path(), &s, &k, tuning)?;
                    let mut c = Command::new(paths.gateway_bin());
                    c.arg("--config").arg(config);
                    c.env(
                        "RUST_LOG",
                        std::env::var("TETHER_BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
                    );
                    c
                }
                Kind::Axum => Command::new(paths.bin_dir.join("peer-axum")),
                Kind::AxumTuned => Command::new(paths.bin_dir.join("peer-axum-tuned")),
                Kind::Limit => {
                    let mut c = Command::new(paths.bin_dir.join("peer-limit"));
                    if let Some(interval) = tuning.ping_interval_seconds {
                        c.env("PING_INTERVAL_SECONDS", interval.to_string());
                    }
                    c
                }
                Kind::NodeWs => {
                    let script = paths.peers_dir.join("node/server.js");
                    if !paths.peers_dir.join("node/node_modules/ws").exists() {
                        bail!(
                            "node peer needs its package: cd {} && npm install",
                            paths.peers_dir.join("node").display()
                        );
                    }
                    let mut c = Command::new("node");
                    c.arg(script);
                    c
                }
                Kind::PythonWebsockets => {
                    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
                    let mut c = Command::new(python);
                    c.arg(paths.peers_dir.join("python/server.py"));
                    c
                }
            };
            let shard = spawn(command, kind, index).await?;
            started.push(shard);
        }
        Ok(Self {
            kind,
            shards: started,
            secret,
            api_key,
            external: None,
            _dir: dir,
        })
    }

    /// A running Tether server at `url` (nothing is started); agents' tokens are minted
    /// with `secret` (HS256), with `tenant` as their `tenant` claim.
    pub fn external(
        url: &str,
        secret: Option<String>,
        tenant: Option<String>,
    ) -> anyhow::Result<Self> {
        let (addr, path) = parse_ws_url(url)?;
        Ok(Self {
            kind: Kind::Tether,
            shards: Vec::new(),
            secret,
            api_key: None,
            external: Some(External { addr, path, tenant }),
            _dir: tempfile::tempdir()?,
        })
    }

    /// Where agents connect: every shard's WebSocket address, or the external one.
    pub fn ws_addrs(&self) -> Vec<SocketAddr> {
        match &self.external {
            Some(e) => vec![e.addr],
            None => self.shards.iter().map(|s| s.ws).collect(),
        }
    }

    /// The shard that serves agent number `i`.
    pub fn shard_of(&self, i: u64) -> &Shard {
        &self.shards[(i % self.shards.len() as u64) as usize]
    }

    /// The process ids of all shards.
    pub fn pids(&self) -> Vec<u32> {
        self.shards.iter().map(|s| s.pid).collect()
    }

    /// Stops every shard.
    pub async fn stop(mut self) {
        for shard in &mut self.shards {
            let _ = shard.child.start_kill();
            let _ = shard.child.wait().await;
        }
    }
}

fn write_gateway_config(
    dir: &Path,
    secret: &str,
    api_key: &str,
    tuning: &Tuning,
) -> anyhow::Result<PathBuf> {
    let secret_file = dir.join("hs256.secret");
    let keys_file = dir.join("api-keys");
    std::fs::write(&secret_file, secret)?;
    std::fs::write(&keys_file, format!("{api_key}\n"))?;
    let mut config = tether_config::GatewayConfig::default();
    config.listen.public = "127.0.0.1:0".into();
    config.listen.internal = "127.0.0.1:0".into();
    config.limits.max_connections = SHARD_CAPACITY;
    if let Some(interval) = tuning.ping_interval_seconds {
        config.limits.ping_interval_seconds = interval;
    }
    config.auth.jwt.hs256_secret_file = Some(secret_file);
    config.auth.api_keys_file = Some(keys_file);
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config.to_yaml())?;
    Ok(path)
}

async fn spawn(mut command: Command, kind: Kind, index: usize) -> anyhow::Result<Shard> {
    command
        .env("PORT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {} shard {index}: {command:?}", kind.name()))?;
    let pid = child.id().context("child has no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addrs = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addrs) = parse_listening(&line) {
                return Ok(addrs);
            }
        }
        bail!("{} exited before listening", kind.name())
    })
    .await
    .with_context(|| format!("{} did not print its listening line", kind.name()))??;
    // Keep draining stdout so a chatty server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Shard {
        pid,
        ws: addrs.0,
        control: addrs.1,
        child,
    })
}

/// Reads `tether-gateway listening public=A internal=B` or `listening ws=A control=B`.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut ws = None;
    let mut control = None;
    if !line.contains("listening") {
        return None;
    }
    for word in line.split_whitespace() {
        if let Some((key, value)) = word.split_once('=') {
            match key {
                "public" | "ws" => ws = value.parse().ok(),
                "internal" | "control" => control = value.parse().ok(),
                _ => {}
            }
        }
    }
    Some((ws?, control?))
}

fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_variants() {
        let v: Variant = "jemalloc=/tmp/je/tether-gateway".parse().unwrap();
        assert_eq!(v.name, "jemalloc");
        assert_eq!(v.path, PathBuf::from("/tmp/je/tether-gateway"));
        assert!("jemalloc".parse::<Variant>().is_err());
        assert!("=/x".parse::<Variant>().is_err());
        assert!("x=".parse::<Variant>().is_err());
    }

    #[test]
    fn parses_ws_urls() {
        let (addr, path) = parse_ws_url("ws://127.0.0.1:8090/v1/connect").unwrap();
        assert_eq!((addr.port(), path.as_str()), (8090, "/v1/connect"));
        let (addr, path) = parse_ws_url("ws://localhost:9").unwrap();
        assert!(addr.ip().is_loopback());
        assert_eq!((addr.port(), path.as_str()), (9, "/v1/connect"));
        assert!(parse_ws_url("wss://127.0.0.1:1/v1/connect").is_err());
        assert!(parse_ws_url("http://127.0.0.1:1/").is_err());
        assert!(parse_ws_url("ws://127.0.0.1/v1/connect").is_err());
    }

    #[test]
    fn parses_both_listening_lines() {
        let (ws, control) = parse_listening(
            "tether-gateway listening public=127.0.0.1:4000 internal=127.0.0.1:4001",
        )
        .unwrap();
        assert_eq!(ws.port(), 4000);
        assert_eq!(control.port(), 4001);
        let (ws, control) =
            parse_listening("listening ws=127.0.0.1:5 control=127.0.0.1:6").unwrap();
        assert_eq!((ws.port(), control.port()), (5, 6));
        assert!(parse_listening("starting").is_none());
    }
}

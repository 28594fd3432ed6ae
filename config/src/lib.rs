//! The gateway's configuration file (`gateway.yaml`).
//!
//! The operator renders one of these per pool into a ConfigMap (secrets stay in mounted
//! Secret files and are referenced by path); a developer writes one by hand or uses the
//! gateway's `--dev` defaults. Every limit the gateway enforces lives here, with its
//! default, so that `docs/configuration.md` and the CRD's `limits` map onto it one to one.
//!
//! All fields use camelCase like the `ConnectionPool` spec they are rendered from, and
//! every section has defaults, so an empty file is a valid (dev-only) configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not match the schema.
    #[error("parsing config: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// A value is out of its allowed range or two values contradict each other.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Tenant id; tokens whose `tenant` claim (if present) differs are refused with 403.
    pub tenant: Option<String>,
    /// Listen addresses and socket options.
    pub listen: ListenConfig,
    /// Connection and message limits.
    pub limits: Limits,
    /// How agents and backends authenticate.
    pub auth: AuthConfig,
    /// Where agents' messages go.
    pub upstream: Option<UpstreamConfig>,
    /// How pushes reach the pod that holds an agent's socket.
    pub routing: RoutingConfig,
    /// How the gateway empties itself before it exits.
    pub drain: DrainConfig,
    /// Reporting of this pod's connection count into the pool's status.
    pub status: Option<StatusConfig>,
    /// Rate quotas of the push API, per API key and per tenant (docs/security.md,
    /// "Quotas").
    #[serde(skip_serializing_if = "QuotaConfig::is_default")]
    pub quotas: QuotaConfig,
    /// How pushes to one agent are delivered: straight to its socket, or through a
    /// durable per-agent queue (docs/routing.md, "Durable delivery").
    #[serde(skip_serializing_if = "DeliveryConfig::is_default")]
    pub delivery: DeliveryConfig,
}

/// Listen addresses and socket options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ListenConfig {
    /// Public address: agents' WebSockets (`GET /v1/connect`).
    pub public: String,
    /// Internal address: the push API, admin and health endpoints.
    pub internal: String,
    /// Address of a listener serving only `/healthz` and `/readyz`, with its own small
    /// connection cap, so that clients holding `maxInternalConnections` on the
    /// internal port cannot fail the kubelet's probes (and get the pod restarted).
    /// Unset: probes are answered on the internal port only. The operator sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<String>,
    /// Listen backlog. Reconnect storms arrive as bursts of SYNs; a small backlog makes
    /// the kernel drop them and clients wait a full SYN retransmit (1 s) per drop.
    pub backlog: u32,
    /// Deadline for the HTTP headers of a request on either port (slowloris), in
    /// milliseconds.
    pub header_timeout_ms: u64,
    /// Largest HTTP request head (request line + headers) accepted on either port, in
    /// bytes; a longer head is answered 431 and the connection closed.
    pub max_header_bytes: usize,
    /// Public-port TCP connections that have not finished their upgrade yet (headers,
    /// auth). Above it new connections are closed at once: a flood of half-open
    /// handshakes cannot hold more than this many sockets and buffers.
    pub max_pending_upgrades: usize,
    /// Concurrent TCP connections on the internal port (push API, health); more are
    /// closed at accept.
    pub max_internal_connections: usize,
    /// TLS on the public port, terminated by the gateway itself (instead of a load
    /// balancer). Absent: the public port speaks plain HTTP/WebSocket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// TLS on the public port: a certificate chain and its key as PEM files (a mounted
/// `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`), reloaded when they change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key_file: PathBuf,
    /// Deadline for the TLS handshake of a new connection, in milliseconds; a client
    /// that opens TCP and does not finish its handshake in time is closed. It holds a
    /// `listen.maxPendingUpgrades` slot meanwhile.
    #[serde(default = "TlsConfig::default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// How often the files are read again, in milliseconds; a changed, valid pair
    /// replaces the certificate for new connections (open ones keep theirs).
    #[serde(default = "TlsConfig::default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

impl TlsConfig {
    /// The pair `cert_file`/`key_file` with the default deadline and reload interval.
    pub fn new(cert_file: PathBuf, key_file: PathBuf) -> Self {
        Self {
            cert_file,
            key_file,
            handshake_timeout_ms: Self::default_handshake_timeout_ms(),
            reload_interval_ms: Self::default_reload_interval_ms(),
        }
    }

    fn default_handshake_timeout_ms() -> u64 {
        10_000
    }

    fn default_reload_interval_ms() -> u64 {
        5_000
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            public: "0.0.0.0:8080".into(),
            internal: "0.0.0.0:8081".into(),
            probes: None,
            backlog: 4096,
            header_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_pending_upgrades: 1024,
            max_internal_connections: 1024,
            tls: None,
        }
    }
}

/// Connection and message limits; each maps to a `spec.limits` field of the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Limits {
    /// Most concurrent agent connections on this pod; more get 503 before the upgrade.
    pub max_connections: usize,
    /// Largest WebSocket message (and push body) accepted, in bytes.
    pub max_message_bytes: usize,
    /// Messages queued for one agent before it counts as a slow consumer and is closed.
    pub outbound_queue: usize,
    /// Sustained messages per second one agent may send.
    pub messages_per_second: u32,
    /// Burst above the sustained rate (token bucket size).
    pub message_burst: u32,
    /// Messages over the rate in a row before the connection is closed with 1008;
    /// fewer get a `rate_limited` error each.
    pub max_rate_violations: u32,
    /// Malformed envelopes in a row before the connection is closed with 1008.
    pub max_invalid_envelopes: u32,
    /// Close a connection with no inbound frame for this long (0 = never).
    pub idle_timeout_seconds: u64,
    /// How often the gateway pings each agent.
    pub ping_interval_seconds: u64,
    /// How long after a ping the pong may take before the peer counts as dead.
    pub pong_timeout_seconds: u64,
    /// Default and largest timeout of a request to an agent, in milliseconds.
    pub request_timeout_ms: u64,
    /// Upper bound on a caller-chosen request timeout, in milliseconds.
    pub max_request_timeout_ms: u64,
    /// In-flight requests per agent (gateway → agent) before 429.
    pub max_pending_requests: usize,
    /// Size of the read buffer each worker thread shares between its connections, in
    /// bytes: one read call takes at most this much. No connection owns a read buffer;
    /// an unfinished frame's bytes are kept aside until it completes.
    pub read_buffer_bytes: usize,
    /// Bytes the gateway may hold unwritten for one socket (frames the kernel has not
    /// taken yet) before it stops taking more from the outbound queue and stops reading
    /// what would add answers (pongs, errors).
    pub max_write_buffer_bytes: usize,
    /// How long the kernel may refuse a connection's pending frames — from the first
    /// write it does not take until everything pending (the close frame included) is
    /// written — before the agent counts as a slow consumer and its socket is dropped,
    /// in milliseconds.
    pub write_timeout_ms: u64,
    /// Agent `send`/`request` messages of one connection waiting on the upstream at
    /// once; more are refused with `nack`/`error` code `overloaded`.
    pub max_upstream_in_flight: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            max_message_bytes: 64 * 1024,
            outbound_queue: 64,
            messages_per_second: 50,
            message_burst: 100,
            max_rate_violations: 20,
            max_invalid_envelopes: 10,
            idle_timeout_seconds: 0,
            ping_interval_seconds: 30,
            pong_timeout_seconds: 20,
            request_timeout_ms: 10_000,
            max_request_timeout_ms: 60_000,
            max_pending_requests: 64,
            read_buffer_bytes: 16 * 1024,
            max_write_buffer_bytes: 1024 * 1024,
            write_timeout_ms: 10_000,
            max_upstream_in_flight: 8,
        }
    }
}

/// How agents (JWT) and backends (API keys) authenticate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Agent tokens.
    pub jwt: JwtConfig,
    /// How long a revocation without an explicit `until` lasts, in seconds (docs/push-api.md,
    /// "Revocation"): at least the longest token lifetime the issuer hands out. Left out
    /// of rendered YAML at its default, so pools that do not set it render as before.
    #[serde(skip_serializing_if = "is_default_revocation")]
    pub revocation_default_seconds: u64,
    /// File with one push-API key per line (a mounted Secret), optionally followed by
    /// its scopes: `<key> push,request,presence` or `<key> admin`; a bare key has every
    /// scope (the format before scopes). `#` starts a comment. See docs/security.md.
    pub api_keys_file: Option<PathBuf>,
    /// Ask the tenant's backend whether to admit each agent (docs/security.md,
    /// "Connect check").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_check: Option<ConnectCheckConfig>,
}

/// What a connect check does when the backend cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unreachable {
    /// Refuse the agent (503, it retries): nobody gets in unchecked.
    #[default]
    Deny,
    /// Admit the agent with its token's groups: availability over the check.
    Allow,
}

/// The connect check: before the upgrade, the gateway POSTs the verified agent to the
/// backend, signed like upstream events, and applies its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectCheckConfig {
    /// The backend's URL (`http://` or `https://`).
    pub url: String,
    /// HMAC-SHA256 key (at least 32 bytes) signing `"{timestamp}.{body}"`.
    pub secret_file: PathBuf,
    /// Timeout of one check, in milliseconds.
    #[serde(default = "ConnectCheckConfig::default_timeout")]
    pub timeout_ms: u64,
    /// How long an answer is reused for the same agent id, in seconds (0: ask on every
    /// handshake).
    #[serde(default = "ConnectCheckConfig::default_cache")]
    pub cache_seconds: u64,
    /// What to do when the backend does not answer in time, answers another status than
    /// 200 or an unreadable body.
    #[serde(default)]
    pub on_unreachable: Unreachable,
}

impl ConnectCheckConfig {
    /// A check against `url` signed with the key in `secret_file`, with the defaults.
    pub fn new(url: impl Into<String>, secret_file: PathBuf) -> Self {
        Self {
            url: url.into(),
            secret_file,
            timeout_ms: Self::default_timeout(),
            cache_seconds: Self::default_cache(),
            on_unreachable: Unreachable::Deny,
        }
    }
    fn default_timeout() -> u64 {
        2_000
    }
    fn default_cache() -> u64 {
        60
    }
}

const DEFAULT_REVOCATION_SECONDS: u64 = 24 * 3600;

fn is_default_revocation(seconds: &u64) -> bool {
    *seconds == DEFAULT_REVOCATION_SECONDS
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt: JwtConfig::default(),
            api_keys_file: None,
            revocation_default_seconds: DEFAULT_REVOCATION_SECONDS,
            connect_check: None,
        }
    }
}

/// Rate quotas on the push API's calls (pushes, requests, group sends, broadcasts).
/// Each is a token bucket per gateway pod; unset means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// The rate each API key may call at; one key over it gets 429 while the others
    /// go on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_api_key: Option<RateQuota>,
    /// The rate all of the tenant's keys together may call at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_tenant: Option<RateQuota>,
    /// Most agent connections of the whole pool (all pods together, counted over the
    /// bus); more are refused with 503 and are not scaling demand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
}

impl QuotaConfig {
    /// Whether no quota is set (the section is then left out of rendered YAML).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A token bucket: `perSecond` calls a second on average, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateQuota {
    /// Sustained calls per second.
    pub per_second: u32,
    /// Calls allowed at once after a quiet period (at least `perSecond`).
    pub burst: u32,
}

/// A JWKS fetched over HTTPS: cached, refreshed every `refreshIntervalSeconds` and when
/// a token names an unknown `kid` (at most once per `minRefreshIntervalSeconds`), and
/// served stale for at most `maxStaleSeconds` while the URL fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwksConfig {
    /// The `https://` URL of the JWKS document.
    pub url: String,
    /// Extra CA certificates (PEM) trusted besides the system roots, for an identity
    /// provider behind a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How often the key set is fetched again, in seconds.
    #[serde(default = "JwksConfig::default_refresh_interval")]
    pub refresh_interval_seconds: u64,
    /// Least time between two fetches, in seconds: a token naming an unknown `kid`
    /// fetches at most this often, so forged `kid`s cannot hammer the provider.
    #[serde(default = "JwksConfig::default_min_refresh_interval")]
    pub min_refresh_interval_seconds: u64,
    /// How long the last good key set is used after fetches started failing, in
    /// seconds; past it every token is refused until a fetch succeeds.
    #[serde(default = "JwksConfig::default_max_stale")]
    pub max_stale_seconds: u64,
    /// Timeout of one fetch (connect, TLS, headers and body), in milliseconds.
    #[serde(default = "JwksConfig::default_timeout")]
    pub timeout_ms: u64,
}

impl JwksConfig {
    /// A JWKS at `url` with the default intervals.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            refresh_interval_seconds: Self::default_refresh_interval(),
            min_refresh_interval_seconds: Self::default_min_refresh_interval(),
            max_stale_seconds: Self::default_max_stale(),
            timeout_ms: Self::default_timeout(),
        }
    }
    fn default_refresh_interval() -> u64 {
        300
    }
    fn default_min_refresh_interval() -> u64 {
        10
    }
    fn default_max_stale() -> u64 {
        24 * 3600
    }
    fn default_timeout() -> u64 {
        5_000
    }
}

/// Agent token verification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct JwtConfig {
    /// File holding the HS256 shared secret (raw bytes, trailing newline trimmed).
    pub hs256_secret_file: Option<PathBuf>,
    /// File holding the public keys: PEM (RSA for RS256, EC P-256 for ES256), one or
    /// more blocks, or a JWKS document (`{"keys":[...]}`) whose `kid`s select the key a
    /// token names. Re-read while running, so keys rotate without a restart.
    pub public_keys_file: Option<PathBuf>,
    /// Public keys fetched from a JWKS URL (an identity provider's
    /// `.well-known/jwks.json`), cached and refreshed; instead of the two files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<JwksConfig>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// Grace after `exp` for an in-band `refresh` before the socket closes with 4001.
    pub refresh_grace_seconds: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            hs256_secret_file: None,
            public_keys_file: None,
            jwks: None,
            issuer: None,
            audience: None,
            leeway_seconds: 30,
            refresh_grace_seconds: 0,
        }
    }
}

/// Which agent events are forwarded to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamEvent {
    /// An agent connected.
    Connect,
    /// An agent disconnected.
    Disconnect,
    /// An agent sent a message (`send`, `request`, binary frame).
    Message,
}

/// Where agents' messages go: an HTTP endpoint of the tenant's backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// URL the gateway POSTs to.
    pub url: String,
    /// File with the HMAC-SHA256 key that signs each POST (`X-Tether-Signature`), at
    /// least 32 bytes.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Deadline of one POST, in milliseconds.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_ms: u64,
    /// Events forwarded; `message` is needed for `send` and `request`.
    #[serde(default = "default_upstream_events")]
    pub events: Vec<UpstreamEvent>,
    /// Concurrent POSTs in flight from this pod; more wait (back-pressure on agents).
    #[serde(default = "default_upstream_concurrency")]
    pub max_concurrency: usize,
    /// How long a message may wait for one of the `maxConcurrency` slots before it is
    /// refused (`nack` code `overloaded`), in milliseconds.
    #[serde(default = "default_upstream_queue_timeout")]
    pub queue_timeout_ms: u64,
}

fn default_upstream_queue_timeout() -> u64 {
    1_000
}

fn default_upstream_timeout() -> u64 {
    5_000
}

fn default_upstream_events() -> Vec<UpstreamEvent> {
    vec![UpstreamEvent::Message]
}

fn default_upstream_concurrency() -> usize {
    256
}

/// The message bus between pods.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// NATS bus; without it the gateway routes in memory (one pod, dev mode).
    pub nats: Option<NatsConfig>,
}

/// NATS connection settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Subject/bucket namespace; defaults to the tenant (or `dev`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// How the gateway authenticates to NATS. A bus without credentials lets anything
    /// that reaches it push to or disconnect any agent: production pools set one.
    #[serde(default)]
    pub auth: NatsAuth,
    /// TLS to NATS.
    #[serde(default)]
    pub tls: Option<NatsTls>,
    /// JetStream replicas of the pool's directory buckets (1 when absent): 3 on a NATS
    /// cluster, so that routing survives the loss of one server. The durable stream
    /// takes `delivery.durable.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
}

/// NATS credentials: at most one of these (each a mounted Secret file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct NatsAuth {
    /// User name, with `passwordFile`.
    pub user: Option<String>,
    /// File holding the password of `user`.
    pub password_file: Option<PathBuf>,
    /// File holding a bearer token.
    pub token_file: Option<PathBuf>,
    /// File holding an NKey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT + NKey seed) of a decentralised-auth account.
    pub creds_file: Option<PathBuf>,
}

impl NatsAuth {
    /// Whether any credential is configured.
    pub fn is_set(&self) -> bool {
        self.user.is_some()
            || self.token_file.is_some()
            || self.nkey_seed_file.is_some()
            || self.creds_file.is_some()
    }
}

/// TLS to NATS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct NatsTls {
    /// CA bundle (PEM) that signs the server's certificate; the system roots otherwise.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients.
    pub cert_file: Option<PathBuf>,
    /// Key of `certFile` (PEM).
    pub key_file: Option<PathBuf>,
}

/// How a push to one agent is delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeliveryMode {
    /// Into the agent's outbound queue on the pod that holds its socket; 404 when the
    /// agent is not connected.
    #[default]
    Direct,
    /// Stored in the pool's JetStream stream first (202 once stored), delivered in
    /// order and acknowledged by the agent whenever it is connected.
    Durable,
}

/// Delivery of pushes to one agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// The mode of a push that does not say (`?delivery=direct|durable`).
    pub mode: DeliveryMode,
    /// The durable queue; without it durable pushes are refused (400). Needs
    /// `routing.nats` with JetStream.
    pub durable: Option<DurableConfig>,
}

impl DeliveryConfig {
    /// Direct delivery and no durable queue (left out of a rendered file).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The pool's durable per-agent queue: one JetStream stream, one subject per agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DurableConfig {
    /// A message not acknowledged within this long is removed (0: kept until acked).
    pub max_age_seconds: u64,
    /// Pending messages per agent; a push beyond it is refused with 429.
    pub max_messages_per_agent: u64,
    /// Bytes of pending messages of the whole pool (the stream's `max_bytes`); a push
    /// beyond it is refused with 429 (0: no limit).
    pub max_bytes: u64,
    /// Stream replicas (1 for a single NATS server, 3 for a cluster).
    pub replicas: usize,
    /// Messages written to one agent before its acks are awaited.
    pub in_flight: usize,
    /// How long `GET /v1/messages/{id}` still knows a message after its last change
    /// (acknowledged, expired), on top of `maxAgeSeconds`.
    pub status_retention_seconds: u64,
}

impl Default for DurableConfig {
    fn default() -> Self {
        Self {
            max_age_seconds: 7 * 24 * 3600,
            max_messages_per_agent: 1000,
            max_bytes: 0,
            replicas: 1,
            in_flight: 32,
            status_retention_seconds: 24 * 3600,
        }
    }
}

/// How the gateway empties itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct DrainConfig {
    /// Connections closed per second while draining.
    pub connections_per_second: u32,
    /// After this long the remaining connections are closed at once and the process exits.
    pub deadline_seconds: u64,
    /// Upper bound of the random delay in each `reconnect` hint, so that agents do not
    /// all come back in the same millisecond.
    pub reconnect_jitter_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            connections_per_second: 500,
            deadline_seconds: 60,
            reconnect_jitter_ms: 2_000,
        }
    }
}

/// Status reporting into `ConnectionPool.status.pods[]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusConfig {
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
    /// This pod's name; when absent the gateway reads the `POD_NAME` environment
    /// variable (set from the downward API), since one ConfigMap serves every pod.
    #[serde(default)]
    pub pod_name: Option<String>,
    /// Longest time between two reports.
    #[serde(default = "default_report_interval")]
    pub report_interval_seconds: u64,
    /// A change of the connection count worth a report before the heartbeat is due:
    /// at least this many percent of the last reported count...
    #[serde(default = "default_change_percent")]
    pub change_percent: u64,
    /// ...or at least this many connections, whichever is smaller (and at least one).
    /// Smaller moves wait for the heartbeat (two report intervals).
    #[serde(default = "default_change_connections")]
    pub change_connections: u64,
}

fn default_report_interval() -> u64 {
    10
}

fn default_change_percent() -> u64 {
    5
}

fn default_change_connections() -> u64 {
    100
}

// === impl GatewayConfig ===

impl GatewayConfig {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: GatewayConfig = if text.trim().is_empty() {
            GatewayConfig::default()
        } else {
            serde_yaml::from_str(text)?
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a YAML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Renders the configuration as YAML (what the operator puts in the ConfigMap).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config always serializes")
    }

    /// Checks ranges and cross-field rules; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let positive = [
            ("limits.maxConnections", l.max_connections as u64),
            ("limits.maxMessageBytes", l.max_message_bytes as u64),
            ("limits.outboundQueue", l.outbound_queue as u64),
            ("limits.messagesPerSecond", u64::from(l.messages_per_second)),
            ("limits.pingIntervalSeconds", l.ping_interval_seconds),
            ("limits.pongTimeoutSeconds", l.pong_timeout_seconds),
            ("limits.requestTimeoutMs", l.request_timeout_ms),
            ("limits.maxPendingRequests", l.max_pending_requests as u64),
            ("limits.readBufferBytes", l.read_buffer_bytes as u64),
            (
                "drain.connectionsPerSecond",
                u64::from(self.drain.connections_per_second),
            ),
            ("listen.backlog", u64::from(self.listen.backlog)),
            ("listen.headerTimeoutMs", self.listen.header_timeout_ms),
            (
                "listen.maxPendingUpgrades",
                self.listen.max_pending_upgrades as u64,
            ),
            (
                "listen.maxInternalConnections",
                self.listen.max_internal_connections as u64,
            ),
            ("limits.writeTimeoutMs", l.write_timeout_ms),
            (
                "limits.maxUpstreamInFlight",
                u64::from(l.max_upstream_in_flight),
            ),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!(
                "{name} must be greater than 0"
            )));
        }
        if l.message_burst < l.messages_per_second {
            return Err(ConfigError::Invalid(
                "limits.messageBurst must be at least limits.messagesPerSecond".into(),
            ));
        }
        if l.request_timeout_ms > l.max_request_timeout_ms {
            return Err(ConfigError::Invalid(
                "limits.requestTimeoutMs must not exceed limits.maxRequestTimeoutMs".into(),
            ));
        }
        if l.max_write_buffer_bytes < l.max_message_bytes {
            return Err(ConfigError::Invalid(
                "limits.maxWriteBufferBytes must be at least limits.maxMessageBytes".into(),
            ));
        }
        if self.listen.max_header_bytes < 8192 {
            // hyper's smallest read buffer; below it the limit would not hold.
            return Err(ConfigError::Invalid(
                "listen.maxHeaderBytes must be at least 8192".into(),
            ));
        }
        if let Some(tls) = &self.listen.tls {
            if tls.handshake_timeout_ms == 0 {
                return Err(ConfigError::Invalid(
                    "listen.tls.handshakeTimeoutMs must be greater than 0".into(),
                ));
            }
            if tls.reload_interval_ms < 100 {
                return Err(ConfigError::Invalid(
                    "listen.tls.reloadIntervalMs must be at least 100".into(),
                ));
            }
        }
        let jwt = &self.auth.jwt;
        if jwt.hs256_secret_file.is_some() && jwt.public_keys_file.is_some() {
            return Err(ConfigError::Invalid(
                "auth.jwt: set hs256SecretFile or publicKeysFile, not both (algorithm confusion)"
                    .into(),
            ));
        }
        let key_sources = [
            jwt.hs256_secret_file.is_some(),
            jwt.public_keys_file.is_some(),
            jwt.jwks.is_some(),
        ];
        if key_sources.iter().filter(|set| **set).count() > 1 {
            return Err(ConfigError::Invalid(
                "auth.jwt: set one of hs256SecretFile, publicKeysFile or jwks".into(),
            ));
        }
        if let Some(jwks) = &jwt.jwks {
            if !jwks.url.starts_with("https://") {
                return Err(ConfigError::Invalid(
                    "auth.jwt.jwks.url must be an https:// URL: keys fetched in clear could be \
                     replaced on the way"
                        .into(),
                ));
            }
            if jwks.refresh_interval_seconds == 0 || jwks.timeout_ms == 0 {
                return Err(ConfigError::Invalid(
                    "auth.jwt.jwks: refreshIntervalSeconds and timeoutMs must be greater than 0"
                        .into(),
                ));
            }
            if jwks.max_stale_seconds < jwks.refresh_interval_seconds {
                return Err(ConfigError::Invalid(
                    "auth.jwt.jwks.maxStaleSeconds must be at least refreshIntervalSeconds: \
                     keys would go stale between two scheduled fetches"
                        .into(),
                ));
            }
            if jwks.min_refresh_interval_seconds > jwks.refresh_interval_seconds {
                return Err(ConfigError::Invalid(
                    "auth.jwt.jwks.minRefreshIntervalSeconds must not exceed \
                     refreshIntervalSeconds"
                        .into(),
                ));
            }
        }
        if let Some(check) = &self.auth.connect_check {
            if !(check.url.starts_with("http://") || check.url.starts_with("https://")) {
                return Err(ConfigError::Invalid(
                    "auth.connectCheck.url must be an http:// or https:// URL".into(),
                ));
            }
            if check.timeout_ms == 0 {
                return Err(ConfigError::Invalid(
                    "auth.connectCheck.timeoutMs must be greater than 0".into(),
                ));
            }
        }
        if self.auth.revocation_default_seconds == 0 {
            return Err(ConfigError::Invalid(
                "auth.revocationDefaultSeconds must be greater than 0".into(),
            ));
        }
        if self.quotas.max_connections == Some(0) {
            return Err(ConfigError::Invalid(
                "quotas.maxConnections must be greater than 0 (leave it out for no cap)".into(),
            ));
        }
        for (name, quota) in [
            ("quotas.perApiKey", &self.quotas.per_api_key),
            ("quotas.perTenant", &self.quotas.per_tenant),
        ] {
            if let Some(q) = quota
                && (q.per_second == 0 || q.burst < q.per_second)
            {
                return Err(ConfigError::Invalid(format!(
                    "{name}: perSecond must be greater than 0 and burst at least perSecond"
                )));
            }
        }
        if let Some(upstream) = &self.upstream {
            if !(upstream.url.starts_with("http://") || upstream.url.starts_with("https://")) {
                return Err(ConfigError::Invalid(
                    "upstream.url must be an http:// or https:// URL".into(),
                ));
            }
            if upstream.timeout_ms == 0
                || upstream.max_concurrency == 0
                || upstream.queue_timeout_ms == 0
            {
                return Err(ConfigError::Invalid(
                    "upstream.timeoutMs, upstream.maxConcurrency and upstream.queueTimeoutMs \
                     must be greater than 0"
                        .into(),
                ));
            }
        }
        if self.delivery.mode == DeliveryMode::Durable && self.delivery.durable.is_none() {
            return Err(ConfigError::Invalid(
                "delivery.mode durable needs delivery.durable".into(),
            ));
        }
        if let Some(durable) = &self.delivery.durable {
            if self.routing.nats.is_none() {
                return Err(ConfigError::Invalid(
                    "delivery.durable needs routing.nats (the queue is a JetStream stream)".into(),
                ));
            }
            if durable.max_messages_per_agent == 0
                || durable.in_flight == 0
                || !(1..=5).contains(&durable.replicas)
            {
                return Err(ConfigError::Invalid(
                    "delivery.durable: maxMessagesPerAgent and inFlight must be greater than 0, \
                     replicas 1..=5"
                        .into(),
                ));
            }
        }
        if let Some(nats) = &self.routing.nats {
            let a = &nats.auth;
            let methods = [
                a.user.is_some() || a.password_file.is_some(),
                a.token_file.is_some(),
                a.nkey_seed_file.is_some(),
                a.creds_file.is_some(),
            ];
            if methods.iter().filter(|m| **m).count() > 1 {
                return Err(ConfigError::Invalid(
                    "routing.nats.auth: set one of user/passwordFile, tokenFile, \
                     nkeySeedFile or credsFile"
                        .into(),
                ));
            }
            if a.user.is_some() != a.password_file.is_some() {
                return Err(ConfigError::Invalid(
                    "routing.nats.auth: user and passwordFile go together".into(),
                ));
            }
            if let Some(tls) = &nats.tls
                && tls.cert_file.is_some() != tls.key_file.is_some()
            {
                return Err(ConfigError::Invalid(
                    "routing.nats.tls: certFile and keyFile go together".into(),
                ));
            }
        }
        if let Some(status) = &self.status
            && status.report_interval_seconds == 0
        {
            return Err(ConfigError::Invalid(
                "status.reportIntervalSeconds must be greater than 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_tls_parses_with_defaults_and_checks_its_bounds() {
        let yaml = "listen:\n  tls:\n    certFile: /tls/tls.crt\n    keyFile: /tls/tls.key\n";
        let tls = GatewayConfig::from_yaml(yaml).unwrap().listen.tls.unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("/tls/tls.crt"));
        assert_eq!(tls.key_file, PathBuf::from("/tls/tls.key"));
        assert_eq!(
            (tls.handshake_timeout_ms, tls.reload_interval_ms),
            (10_000, 5_000)
        );
        let missing_key = "listen:\n  tls:\n    certFile: /tls/tls.crt\n";
        assert!(
            GatewayConfig::from_yaml(missing_key)
                .unwrap_err()
                .to_string()
                .contains("keyFile")
        );
        let zero = format!("{yaml}    handshakeTimeoutMs: 0\n");
        assert!(
            GatewayConfig::from_yaml(&zero)
                .unwrap_err()
                .to_string()
                .contains("listen.tls.handshakeTimeoutMs")
        );
        let fast = format!("{yaml}    reloadIntervalMs: 10\n");
        assert!(
            GatewayConfig::from_yaml(&fast)
                .unwrap_err()
                .to_string()
                .contains("listen.tls.reloadIntervalMs")
        );
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(
            GatewayConfig::from_yaml("").unwrap(),
            GatewayConfig::default()
        );
    }

    #[test]
    fn durable_delivery_needs_its_queue_and_nats() {
        let durable_mode = "delivery:\n  mode: durable\n";
        assert!(
            GatewayConfig::from_yaml(durable_mode)
                .unwrap_err()
                .to_string()
                .contains("needs delivery.durable")
        );
        let without_nats = "delivery:\n  durable: {}\n";
        assert!(
            GatewayConfig::from_yaml(without_nats)
                .unwrap_err()
                .to_string()
                .contains("needs routing.nats")
        );
        let full = "routing:\n  nats:\n    url: nats://n:4222\ndelivery:\n  mode: durable\n  \
                    durable:\n    maxAgeSeconds: 60\n    maxMessagesPerAgent: 5\n    replicas: 3\n";
        let config = GatewayConfig::from_yaml(full).unwrap();
        assert_eq!(config.delivery.mode, DeliveryMode::Durable);
        let durable = config.delivery.durable.unwrap();
        assert_eq!(
            (
                durable.max_age_seconds,
                durable.max_messages_per_agent,
                durable.replicas
            ),
            (60, 5, 3)
        );
        let zero =
            "routing:\n  nats:\n    url: nats://n:4222\ndelivery:\n  durable:\n    inFlight: 0\n";
        assert!(GatewayConfig::from_yaml(zero).is_err());
    }

    #[test]
    fn yaml_round_trips() {
        let mut config = GatewayConfig {
            tenant: Some("acme".into()),
            ..GatewayConfig::default()
        };
        config.limits.max_connections = 10;
        config.upstream = Some(UpstreamConfig {
            url: "http://backend:9000/events".into(),
            secret_file: Some("/secrets/upstream/hmac".into()),
            timeout_ms: 1000,
            events: vec![UpstreamEvent::Connect, UpstreamEvent::Message],
            max_concurrency: 8,
            queue_timeout_ms: 500,
        });
        let text = config.to_yaml();
        assert_eq!(GatewayConfig::from_yaml(&text).unwrap(), config);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = GatewayConfig::from_yaml("limits:\n  maxConections: 5\n").unwrap_err();
        assert!(err.to_string().contains("maxConections"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = GatewayConfig::from_yaml("limits:\n  outboundQueue: 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.outboundQueue"), "{err}");
        let err = GatewayConfig::from_yaml(
            "auth:\n  jwt:\n    hs256SecretFile: /a\n    publicKeysFile: /b\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = GatewayConfig::from_yaml("upstream:\n  url: ftp://x\n").unwrap_err();
        assert!(err.to_string().contains("upstream.url"), "{err}");
    }
}

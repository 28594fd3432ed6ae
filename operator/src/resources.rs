//! Pure builders: a `ConnectionPool` (plus the operator's settings) in, the desired
//! child objects out. No I/O here, so every rule is unit-tested (see `tests` below).
//!
//! Names of a pool `P`:
//!
//! | object | name |
//! |---|---|
//! | ConfigMap (`gateway.yaml`) | `P-config` |
//! | StatefulSet (gateways) | `P` |
//! | Service, headless (pod DNS) | `P-headless` |
//! | Service, client-facing (agents, port `ws`) | `P` |
//! | Service, push API (ClusterIP, port `api`) | `P-api` |
//! | PodDisruptionBudget | `P` |
//! | ServiceAccount, Role, RoleBinding | `P-gateway` |
//! | managed NATS StatefulSet + Service + PodDisruptionBudget | `P-nats` |
//! | managed NATS headless Service (server DNS names, cluster routes) | `P-nats-cluster` |
//! | NetworkPolicy, gateways (`ws` open, `api` only from allowed pods) | `P-gateway` |
//! | NetworkPolicy, managed NATS (only from the pool's gateways) | `P-nats` |

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tether_config::{
    AuthConfig, DeliveryConfig, DeliveryMode, DrainConfig, DurableConfig, GatewayConfig,
    JwksConfig, JwtConfig, Limits, ListenConfig, NatsAuth, NatsConfig, NatsTls, QuotaConfig,
    RateQuota, RoutingConfig, StatusConfig, TlsConfig, UpstreamConfig,
    UpstreamEvent as ConfigEvent,
};
use tether_crds::{ConnectionPool, ImagePullPolicy, SecretKeyRef, ServiceType, UpstreamEvent};

use crate::validate::SpecError;

/// Port of agents' WebSockets (`GET /v1/connect`).
pub const WS_PORT: i32 = 8080;
/// Port of the push API, admin and health endpoints.
pub const API_PORT: i32 = 8081;
/// Port serving only `/healthz` and `/readyz` (the kubelet's probes), with its own
/// connection cap: clients holding the API port's cap cannot fail the probes.
pub const PROBE_PORT: i32 = 8082;
/// NATS client port of a managed NATS.
pub const NATS_PORT: i32 = 4222;
/// Where the ConfigMap's `gateway.yaml` is mounted; the gateway gets `--config` with it.
pub const CONFIG_PATH: &str = "/etc/tether/gateway.yaml";
/// Directory under which each referenced Secret key is mounted read-only.
pub const SECRETS_DIR: &str = "/etc/tether/secrets";
/// Pod-template annotation carrying the hash of `gateway.yaml`: a config change changes
/// the template, so the StatefulSet rolls the pods; anything else leaves them alone.
pub const CONFIG_HASH_ANNOTATION: &str = "tether.dev/config-hash";
/// Label carrying the pool's name on every child object and pod.
pub const POOL_LABEL: &str = "tether.dev/pool";
/// Label a pod in the pool's namespace carries (value: the pool's name) to be allowed
/// to the gateways' push API by [`gateway_network_policy`].
pub const API_CLIENT_LABEL: &str = "tether.dev/api-client";
/// Label carrying the tenant on every child object and pod.
pub const TENANT_LABEL: &str = "tether.dev/tenant";
/// `app.kubernetes.io/managed-by` value of every child; the operator's watches select on it.
pub const MANAGED_BY: &str = "tether-operator";
/// Seconds added to `drain.deadlineSeconds` for the pods' termination grace period, so
/// that the kubelet's SIGKILL never cuts a drain short.
pub const GRACE_MARGIN_SECONDS: i64 = 15;
/// UID and GID the gateway runs as (the image's non-root user).
pub const GATEWAY_UID: i64 = 65532;

/// Operator-wide settings that shape every pool's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Gateway image for pools that do not set `template.image`.
    pub gateway_image: String,
    /// Image of a managed NATS server.
    pub nats_image: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            gateway_image: format!(
                "ghcr.io/tether-dev/tether-gateway:{}",
                env!("CARGO_PKG_VERSION")
            ),
            nats_image: "nats:2.11-alpine".into(),
        }
    }
}

/// Every object the operator keeps for one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The gateway configuration, as rendered into the ConfigMap.
    pub config: GatewayConfig,
    /// Hash of the rendered `gateway.yaml` (also on the pod template).
    pub config_hash: String,
    /// `P-config`.
    pub config_map: ConfigMap,
    /// `P-gateway`.
    pub service_account: ServiceAccount,
    /// `P-gateway`: patch this pool's status, nothing else.
    pub role: Role,
    /// `P-gateway`.
    pub role_binding: RoleBinding,
    /// `P-headless`.
    pub headless_service: Service,
    /// `P`.
    pub client_service: Service,
    /// `P-api`.
    pub api_service: Service,
    /// `P`.
    pub pdb: PodDisruptionBudget,
    /// `P-nats` StatefulSet and Service when `routing.nats.managed`.
    pub nats: Option<(StatefulSet, Service)>,
    /// `P-nats-cluster`: the managed NATS servers' headless Service (their DNS names,
    /// which the gateways and the cluster routes use).
    pub nats_cluster_service: Option<Service>,
    /// `P-nats`: one managed NATS server away at a time.
    pub nats_pdb: Option<PodDisruptionBudget>,
    /// `P-gateway`: only the pool's pods and opted-in backends reach the push API.
    pub gateway_policy: NetworkPolicy,
    /// `P-nats`: only the pool's gateways reach its managed NATS.
    pub nats_policy: Option<NetworkPolicy>,
    /// `P`: the gateways.
    pub stateful_set: StatefulSet,
}

// === names and labels ===

/// Name of the gateway container in the StatefulSet's pod template.
pub const GATEWAY_CONTAINER: &str = "gateway";

/// Name of the StatefulSet, the client Service and the PDB.
pub fn base_name(pool: &ConnectionPool) -> String {
    pool.name_any()
}

/// Name of the ConfigMap.
pub fn config_map_name(pool: &ConnectionPool) -> String {
    format!("{}-config", pool.name_any())
}

/// Name of the headless Service.
pub fn headless_name(pool: &ConnectionPool) -> String {
    format!("{}-headless", pool.name_any())
}

/// Name of the push-API Service.
pub fn api_service_name(pool: &ConnectionPool) -> String {
    format!("{}-api", pool.name_any())
}

/// Name of the ServiceAccount, Role and RoleBinding.
pub fn rbac_name(pool: &ConnectionPool) -> String {
    format!("{}-gateway", pool.name_any())
}

/// Name of the managed NATS StatefulSet and Service.
pub fn nats_name(pool: &ConnectionPool) -> String {
    format!("{}-nats", pool.name_any())
}

/// Labels that select the pool's gateway pods. Kept small and fixed: a StatefulSet's
/// selector is immutable.
pub fn selector_labels(pool: &ConnectionPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tether-gateway".to_string(),
        ),
        (POOL_LABEL.to_string(), pool.name_any()),
    ])
}

/// The selector as a string, for `status.selector` (the scale subresource).
pub fn selector_string(pool: &ConnectionPool) -> String {
    selector_labels(pool)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels of every child object (and the gateway pods).
pub fn labels(pool: &ConnectionPool, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pool);
    if component != "gateway" {
        labels.insert(
            "app.kubernetes.io/name".into(),
            format!("tether-{component}"),
        );
    }
    labels.insert("app.kubernetes.io/instance".into(), pool.name_any());
    labels.insert("app.kubernetes.io/component".into(), component.into());
    labels.insert("app.kubernetes.io/part-of".into(), "tether".into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels.insert(TENANT_LABEL.into(), pool.spec.tenant.clone());
    labels
}

fn owner_ref(pool: &ConnectionPool) -> Result<OwnerReference, SpecError> {
    pool.controller_owner_ref(&())
        .ok_or(SpecError::NotPersisted)
}

fn meta(pool: &ConnectionPool, name: String, component: &str) -> Result<Value, SpecError> {
    Ok(json!({
        "name": name,
        "namespace": pool.namespace(),
        "labels": labels(pool, component),
        "ownerReferences": [owner_ref(pool)?],
    }))
}

/// Turns a JSON shape into its typed object; the shapes are fixed, so a failure is a bug
/// in this module, reported rather than panicking.
fn typed<T: DeserializeOwned>(what: &'static str, value: Value) -> Result<T, SpecError> {
    serde_json::from_value(value).map_err(|err| SpecError::Internal(format!("{what}: {err}")))
}

// === the gateway configuration ===

/// Where a referenced Secret key is mounted: `volume` under [`SECRETS_DIR`], file `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMount {
    /// Volume name (also the directory under [`SECRETS_DIR`]).
    pub volume: &'static str,
    /// File name inside the directory (fixed, so the config does not depend on the key).
    pub file: &'static str,
    /// The Secret and key it comes from.
    pub source: SecretKeyRef,
    /// The spec field that references it (for error messages).
    pub field: &'static str,
}

impl SecretMount {
    /// Absolute path of the mounted file.
    pub fn path(&self) -> String {
        format!("{SECRETS_DIR}/{}/{}", self.volume, self.file)
    }
}

/// Every Secret key a pool references, with where it is mounted.
pub fn secret_mounts(pool: &ConnectionPool) -> Vec<SecretMount> {
    let auth = &pool.spec.auth;
    let mut mounts = vec![];
    if let Some(source) = &auth.jwt.secret_ref {
        mounts.push(SecretMount {
            volume: "jwt",
            file: "hs256",
            source: source.clone(),
            field: "auth.jwt.secretRef",
        });
    }
    if let Some(source) = &auth.jwt.public_keys_secret_ref {
        mounts.push(SecretMount {
            volume: "jwt",
            file: "public-keys.pem",
            source: source.clone(),
            field: "auth.jwt.publicKeysSecretRef",
        });
    }
    if let Some(tls) = &pool.spec.tls {
        // Two volumes of the same Secret: the gateway refuses a certificate and key that
        // do not match, so a moment where one is updated before the other keeps the
        // previous pair until both agree.
        for (volume, file, field) in [
            ("tls-cert", "tls.crt", "tls.secretRef (tls.crt)"),
            ("tls-key", "tls.key", "tls.secretRef (tls.key)"),
        ] {
            mounts.push(SecretMount {
                volume,
                file,
                source: SecretKeyRef {
                    name: tls.secret_ref.name.clone(),
                    key: file.into(),
                },
                field,
            });
        }
    }
    mounts.push(SecretMount {
        volume: "api-keys",
        file: "keys",
        source: auth.api_keys_secret_ref.clone(),
        field: "auth.apiKeysSecretRef",
    });
    if let Some(source) = pool.spec.upstream.as_ref().map(|u| &u.secret_ref) {
        mounts.push(SecretMount {
            volume: "upstream",
            file: "hmac",
            source: source.clone(),
            field: "upstream.secretRef",
        });
    }
    let nats = pool.spec.routing.as_ref().map(|r| &r.nats);
    if let Some(auth) = nats_auth(pool).as_ref() {
        let refs = [
            (
                &auth.password_secret_ref,
                "nats-password",
                "password",
                "routing.nats.auth.passwordSecretRef",
            ),
            (
                &auth.token_secret_ref,
                "nats-token",
                "token",
                "routing.nats.auth.tokenSecretRef",
            ),
            (
                &auth.nkey_seed_secret_ref,
                "nats-nkey",
                "seed",
                "routing.nats.auth.nkeySeedSecretRef",
            ),
            (
                &auth.creds_secret_ref,
                "nats-creds",
                "nats.creds",
                "routing.nats.auth.credsSecretRef",
            ),
        ];
        for (source, volume, file, field) in refs {
            if let Some(source) = source {
                mounts.push(SecretMount {
                    volume,
                    file,
                    source: source.clone(),
                    field,
                });
            }
        }
    }
    if let Some(tls) = nats.and_then(|n| n.tls.as_ref()) {
        let refs = [
            (
                &tls.ca_secret_ref,
                "nats-ca",
                "ca.pem",
                "routing.nats.tls.caSecretRef",
            ),
            (
                &tls.cert_secret_ref,
                "nats-cert",
                "cert.pem",
                "routing.nats.tls.certSecretRef",
            ),
            (
                &tls.key_secret_ref,
                "nats-key",
                "key.pem",
                "routing.nats.tls.keySecretRef",
            ),
        ];
        for (source, volume, file, field) in refs {
            if let Some(source) = source {
                mounts.push(SecretMount {
                    volume,
                    file,
                    source: source.clone(),
                    field,
                });
            }
        }
    }
    mounts
}

/// Name of the Secret holding the token the operator generates for a managed NATS
/// whose pool gives no `routing.nats.auth` (key [`NATS_TOKEN_KEY`]).
pub fn nats_auth_secret_name(pool: &ConnectionPool) -> String {
    format!("{}-nats-auth", pool.name_any())
}

/// Key of the generated token in [`nats_auth_secret_name`].
pub const NATS_TOKEN_KEY: &str = "token";

/// Whether the operator must generate the managed NATS's token: the pool runs a managed
/// NATS and brings no credentials of its own.
pub fn generates_nats_token(pool: &ConnectionPool) -> bool {
    pool.spec
        .routing
        .as_ref()
        .is_some_and(|r| r.nats.managed == Some(true) && r.nats.auth.is_none())
}

/// The credentials the pool's gateways present to NATS (and a managed NATS requires):
/// the spec's, or for a managed NATS without them a token the operator generated — a
/// managed NATS never runs open, so nothing but the pool's own pods can publish on its
/// subjects (push to or disconnect its agents).
pub fn nats_auth(pool: &ConnectionPool) -> Option<tether_crds::NatsAuthSpec> {
    let nats = &pool.spec.routing.as_ref()?.nats;
    match &nats.auth {
        Some(auth) => Some(auth.clone()),
        None if generates_nats_token(pool) => Some(tether_crds::NatsAuthSpec {
            token_secret_ref: Some(SecretKeyRef {
                name: nats_auth_secret_name(pool),
                key: NATS_TOKEN_KEY.into(),
            }),
            ..Default::default()
        }),
        None => None,
    }
}

/// The Secret holding a managed NATS's generated `token` (owned by the pool, so it goes
/// with it). The operator creates it once and never rewrites it.
pub fn nats_token_secret(
    pool: &ConnectionPool,
    token: &str,
) -> Result<k8s_openapi::api::core::v1::Secret, SpecError> {
    typed(
        "Secret",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": meta(pool, nats_auth_secret_name(pool), "nats")?,
            "type": "Opaque",
            "stringData": {NATS_TOKEN_KEY: token},
        }),
    )
}

/// NATS credentials and TLS as the gateway reads them: paths of the mounted Secrets.
fn nats_settings(pool: &ConnectionPool, mounts: &[SecretMount]) -> (NatsAuth, Option<NatsTls>) {
    let nats = pool.spec.routing.as_ref().map(|r| &r.nats);
    let auth = NatsAuth {
        user: nats_auth(pool).and_then(|a| a.user),
        password_file: mount_path(mounts, "nats-password"),
        token_file: mount_path(mounts, "nats-token"),
        nkey_seed_file: mount_path(mounts, "nats-nkey"),
        creds_file: mount_path(mounts, "nats-creds"),
    };
    let tls = nats.and_then(|n| n.tls.as_ref()).map(|_| NatsTls {
        ca_file: mount_path(mounts, "nats-ca"),
        cert_file: mount_path(mounts, "nats-cert"),
        key_file: mount_path(mounts, "nats-key"),
    });
    (auth, tls)
}

fn mount_path(mounts: &[SecretMount], volume: &str) -> Option<std::path::PathBuf> {
    mounts
        .iter()
        .find(|m| m.volume == volume)
        .map(|m| m.path().into())
}

/// The NATS URL(s) a pool's gateways use, if any. A managed cluster is listed server
/// by server (comma-separated): the client picks another one when its server goes
/// away, and does not depend on the cluster's gossip reaching it first.
pub fn nats_url(pool: &ConnectionPool) -> Option<String> {
    let nats = &pool.spec.routing.as_ref()?.nats;
    if nats.managed == Some(true) {
        let ns = pool.namespace().unwrap_or_else(|| "default".into());
        let servers = nats_replicas(pool);
        if servers == 1 {
            return Some(format!("nats://{}.{ns}.svc:{NATS_PORT}", nats_name(pool)));
        }
        Some(
            nats_server_hosts(pool)
                .iter()
                .map(|host| format!("nats://{host}:{NATS_PORT}"))
                .collect::<Vec<_>>()
                .join(","),
        )
    } else {
        nats.url.clone()
    }
}

/// Port of a managed NATS cluster's routes between its servers.
pub const NATS_CLUSTER_PORT: i32 = 6222;

/// Name of a managed NATS's headless Service (the servers' DNS names).
pub fn nats_cluster_name(pool: &ConnectionPool) -> String {
    format!("{}-nats-cluster", pool.name_any())
}

/// Servers of the pool's managed NATS (`routing.nats.replicas`, default 1).
pub fn nats_replicas(pool: &ConnectionPool) -> i32 {
    pool.spec
        .routing
        .as_ref()
        .and_then(|r| r.nats.replicas)
        .unwrap_or(1)
        .max(1)
}

/// The DNS name of each managed NATS server (`P-nats-<i>.P-nats-cluster.<ns>.svc`).
pub fn nats_server_hosts(pool: &ConnectionPool) -> Vec<String> {
    let ns = pool.namespace().unwrap_or_else(|| "default".into());
    let (sts, svc) = (nats_name(pool), nats_cluster_name(pool));
    (0..nats_replicas(pool))
        .map(|i| format!("{sts}-{i}.{svc}.{ns}.svc"))
        .collect()
}

/// Whether the pool runs its own NATS cluster (a managed NATS of 3 or more servers),
/// whose JetStream keeps 3 copies of everything the pool stores.
fn managed_cluster(pool: &ConnectionPool) -> bool {
    pool.spec
        .routing
        .as_ref()
        .is_some_and(|r| r.nats.managed == Some(true))
        && nats_replicas(pool) >= 3
}

/// JetStream replicas of the pool's directory buckets: 3 on a managed cluster (routing
/// then survives one server's loss), else 1.
pub fn directory_replicas(pool: &ConnectionPool) -> Option<usize> {
    managed_cluster(pool).then_some(3)
}

/// JetStream replicas of the durable stream: `delivery.replicas`, at least 3 on a
/// managed cluster (CEL keeps it within `routing.nats.replicas`).
pub fn stream_replicas(pool: &ConnectionPool) -> usize {
    let configured = pool
        .spec
        .delivery
        .as_ref()
        .map_or(1, |d| usize::try_from(d.replicas).unwrap_or(1).max(1));
    if managed_cluster(pool) {
        configured.max(3)
    } else {
        configured
    }
}

/// Renders the pool's spec into the gateway's configuration and checks it the way the
/// gateway will, so a spec the gateway would refuse never reaches a pod.
/// `spec.quotas` as the gateway's `quotas` section.
fn quota_config(pool: &ConnectionPool) -> QuotaConfig {
    let rate = |q: &tether_crds::RateQuotaSpec| RateQuota {
        per_second: u32::try_from(q.per_second).unwrap_or(0),
        burst: u32::try_from(q.burst).unwrap_or(0),
    };
    pool.spec
        .quotas
        .as_ref()
        .map(|q| QuotaConfig {
            per_api_key: q.per_api_key.as_ref().map(rate),
            per_tenant: q.per_tenant.as_ref().map(rate),
            max_connections: q.max_connections.and_then(|n| u64::try_from(n).ok()),
        })
        .unwrap_or_default()
}

/// `spec.delivery` as the gateway's `delivery` section: a pool with it gets the durable
/// queue (and its default mode); one without keeps direct delivery only.
fn delivery_config(pool: &ConnectionPool) -> DeliveryConfig {
    let Some(delivery) = &pool.spec.delivery else {
        return DeliveryConfig::default();
    };
    let positive = |v: i64| u64::try_from(v).unwrap_or(0);
    DeliveryConfig {
        mode: match delivery.mode {
            tether_crds::DeliveryMode::Direct => DeliveryMode::Direct,
            tether_crds::DeliveryMode::Durable => DeliveryMode::Durable,
        },
        durable: Some(DurableConfig {
            max_age_seconds: positive(delivery.max_age_seconds.into()),
            max_messages_per_agent: positive(delivery.max_messages_per_agent.into()),
            max_bytes: positive(delivery.max_bytes),
            replicas: stream_replicas(pool),
            ..DurableConfig::default()
        }),
    }
}

pub fn gateway_config(pool: &ConnectionPool) -> Result<GatewayConfig, SpecError> {
    let spec = &pool.spec;
    let mounts = secret_mounts(pool);
    let positive = |v: i32| u64::try_from(v).unwrap_or(0);
    let defaults = Limits::default();
    let max_message_bytes = positive(spec.limits.max_message_bytes) as usize;
    let rate = positive(spec.limits.messages_per_second_per_connection) as u32;
    let limits = Limits {
        max_connections: positive(spec.limits.max_connections_per_pod) as usize,
        max_message_bytes,
        outbound_queue: positive(spec.limits.outbound_queue) as usize,
        messages_per_second: rate,
        // The spec has one rate knob; bursts of twice the rate absorb reconnect chatter.
        message_burst: rate.saturating_mul(2),
        idle_timeout_seconds: positive(spec.limits.idle_timeout_seconds),
        // A socket must be able to buffer at least one whole message.
        max_write_buffer_bytes: defaults.max_write_buffer_bytes.max(max_message_bytes),
        ..defaults
    };
    let jwt = JwtConfig {
        hs256_secret_file: spec
            .auth
            .jwt
            .secret_ref
            .as_ref()
            .and_then(|_| mount_path(&mounts, "jwt")),
        public_keys_file: spec
            .auth
            .jwt
            .public_keys_secret_ref
            .as_ref()
            .and_then(|_| mount_path(&mounts, "jwt")),
        jwks: spec.auth.jwt.jwks.as_ref().map(|j| JwksConfig {
            refresh_interval_seconds: positive(j.refresh_interval_seconds),
            max_stale_seconds: positive(j.max_stale_seconds),
            ..JwksConfig::new(j.url.clone())
        }),
        issuer: spec.auth.jwt.issuer.clone(),
        audience: spec.auth.jwt.audience.clone(),
        ..JwtConfig::default()
    };
    let upstream = spec.upstream.as_ref().map(|u| UpstreamConfig {
        url: u.url.clone(),
        secret_file: mount_path(&mounts, "upstream"),
        timeout_ms: positive(u.timeout_ms),
        events: u
            .events
            .iter()
            .map(|e| match e {
                UpstreamEvent::Connect => ConfigEvent::Connect,
                UpstreamEvent::Disconnect => ConfigEvent::Disconnect,
                UpstreamEvent::Message => ConfigEvent::Message,
            })
            .collect(),
        max_concurrency: 256,
        queue_timeout_ms: 1_000,
    });
    let config = GatewayConfig {
        tenant: Some(spec.tenant.clone()),
        listen: ListenConfig {
            probes: Some(format!("0.0.0.0:{PROBE_PORT}")),
            tls: match (
                mount_path(&mounts, "tls-cert"),
                mount_path(&mounts, "tls-key"),
            ) {
                (Some(cert_file), Some(key_file)) => Some(TlsConfig::new(cert_file, key_file)),
                _ => None,
            },
            ..Default::default()
        },
        limits,
        auth: AuthConfig {
            jwt,
            api_keys_file: mount_path(&mounts, "api-keys"),
            revocation_default_seconds: spec
                .auth
                .revocation_default_seconds
                .map_or(AuthConfig::default().revocation_default_seconds, positive),
            ..AuthConfig::default()
        },
        upstream,
        routing: RoutingConfig {
            nats: nats_url(pool).map(|url| {
                let (auth, tls) = nats_settings(pool, &mounts);
                NatsConfig {
                    url,
                    // The bus namespace is the pool's identity (namespace/name), not
                    // `spec.tenant`: tenants need not be unique, and two pools on one
                    // bus must never share a subject, bucket, stream or pod registry.
                    namespace: Some(bus_namespace(pool)),
                    auth,
                    tls,
                    replicas: directory_replicas(pool),
                }
            }),
        },
        delivery: delivery_config(pool),
        quotas: quota_config(pool),
        drain: DrainConfig {
            connections_per_second: positive(spec.drain.connections_per_second) as u32,
            deadline_seconds: positive(spec.drain.deadline_seconds),
            reconnect_jitter_ms: positive(spec.drain.reconnect_jitter_ms),
        },
        status: Some(StatusConfig {
            namespace: pool.namespace().unwrap_or_else(|| "default".into()),
            pool: pool.name_any(),
            pod_name: None,
            report_interval_seconds: positive(spec.effective_report_interval_seconds()),
            change_percent: 5,
            change_connections: 100,
        }),
    };
    config
        .validate()
        .map_err(|err| SpecError::Config(err.to_string()))?;
    Ok(config)
}

/// The namespace of a pool's subjects, buckets and streams on its NATS:
/// `<namespace>/<name>`, unique per pool in the cluster (the gateway encodes it
/// injectively into one subject token).
pub fn bus_namespace(pool: &ConnectionPool) -> String {
    format!(
        "{}/{}",
        pool.namespace().unwrap_or_else(|| "default".into()),
        pool.name_any()
    )
}

/// Room a message needs on the bus besides its body (the gateway's
/// `nats::router::ENVELOPE_OVERHEAD`: call metadata, `push` envelope, headers).
pub const NATS_ENVELOPE_BYTES: i64 = 8 * 1024;

/// NATS's own default `max_payload`; a managed NATS never carries less.
const NATS_DEFAULT_MAX_PAYLOAD: i64 = 1024 * 1024;

/// The ConfigMap key of a managed NATS's configuration file.
pub const NATS_CONFIG_KEY: &str = "nats.conf";

/// Where a managed NATS reads its configuration file.
const NATS_CONFIG_PATH: &str = "/etc/nats/nats.conf";

/// The `max_payload` a managed NATS needs to carry the pool's largest message with its
/// envelope (never less than NATS's default).
fn nats_max_payload(pool: &ConnectionPool) -> i64 {
    (i64::from(pool.spec.limits.max_message_bytes) + NATS_ENVELOPE_BYTES)
        .max(NATS_DEFAULT_MAX_PAYLOAD)
}

/// A managed NATS's configuration file (`None`: the pool has no managed NATS). Command
/// line flags cannot set `max_payload`; and credentials on the command line would be
/// readable in the process list, so the file names them by environment variable
/// (`$NATS_TOKEN`, `$NATS_PASSWORD`, filled from the Secret): the ConfigMap holds no
/// secret and the server's arguments carry none.
fn nats_config(pool: &ConnectionPool) -> Option<String> {
    if pool.spec.routing.as_ref()?.nats.managed != Some(true) {
        return None;
    }
    let mut conf = format!("max_payload: {}\n", nats_max_payload(pool));
    let servers = nats_replicas(pool);
    if servers > 1 {
        // Each server's name is its pod's (JetStream in a cluster needs unique names);
        // routes go to every server by its stable DNS name (a server skips the route to
        // itself). The name and the routes are fixed by the spec, so the file (and its
        // hash) changes only with `routing.nats.replicas`.
        let routes = nats_server_hosts(pool)
            .iter()
            .map(|host| format!("    nats://{host}:{NATS_CLUSTER_PORT}\n"))
            .collect::<String>();
        let name = serde_json::to_string(&format!("tether-{}", pool.name_any()))
            .expect("strings serialize");
        conf.push_str(&format!(
            "server_name: $POD_NAME\ncluster {{\n  name: {name}\n  listen: \"0.0.0.0:{NATS_CLUSTER_PORT}\"\n  routes: [\n{routes}  ]\n}}\n"
        ));
    }
    if let Some(auth) = nats_auth(pool).as_ref() {
        if let (Some(user), Some(_)) = (&auth.user, &auth.password_secret_ref) {
            // JSON string quoting is valid NATS configuration quoting.
            let user = serde_json::to_string(user).expect("strings serialize");
            conf.push_str(&format!(
                "authorization {{\n  user: {user}\n  password: $NATS_PASSWORD\n}}\n"
            ));
        } else if auth.token_secret_ref.is_some() {
            conf.push_str("authorization {\n  token: $NATS_TOKEN\n}\n");
        }
    }
    Some(conf)
}

/// SHA-256 of the rendered configuration, hex.
pub fn config_hash(yaml: &str) -> String {
    hex::encode(Sha256::digest(yaml.as_bytes()))
}

// === the objects ===

/// Builds every child object of `pool`, with the StatefulSet at `replicas` pods.
pub fn desired(
    pool: &ConnectionPool,
    settings: &Settings,
    replicas: i32,
) -> Result<Desired, SpecError> {
    let config = gateway_config(pool)?;
    let yaml = config.to_yaml();
    let hash = config_hash(&yaml);
    let ns = pool.namespace();
    let rbac = rbac_name(pool);

    let config_map = typed(
        "ConfigMap",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(pool, config_map_name(pool), "gateway")?,
            "data": nats_config(pool).map_or_else(
                || json!({"gateway.yaml": yaml}),
                |nats| json!({"gateway.yaml": yaml, NATS_CONFIG_KEY: nats}),
            ),
        }),
    )?;
    let service_account = typed(
        "ServiceAccount",
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": meta(pool, rbac.clone(), "gateway")?,
        }),
    )?;
    // Pods report into `status.pods[]` of their own pool and of nothing else: the rule
    // names the pool, so a compromised gateway cannot touch other tenants' pools. They do
    // not read the pool (every pod watching an object every pod writes would make watch
    // traffic grow with the square of the pods): each reads its instructions from its
    // own Pod object (a list/watch with `fieldSelector=metadata.name=<pod>`, which
    // `resourceNames` permits), read-only, and only the pool's own pods by name.
    let pod_names: Vec<String> = (0..pool.spec.replicas.max.max(1))
        .map(|o| format!("{}-{o}", base_name(pool)))
        .collect();
    let role = typed(
        "Role",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta(pool, rbac.clone(), "gateway")?,
            "rules": [{
                "apiGroups": [tether_crds::GROUP],
                "resources": ["connectionpools/status"],
                "resourceNames": [pool.name_any()],
                "verbs": ["get", "patch"],
            }, {
                "apiGroups": [""],
                "resources": ["pods"],
                "resourceNames": pod_names,
                "verbs": ["get", "list", "watch"],
            }],
        }),
    )?;
    let role_binding = typed(
        "RoleBinding",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta(pool, rbac.clone(), "gateway")?,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rbac},
            "subjects": [{"kind": "ServiceAccount", "name": rbac, "namespace": ns}],
        }),
    )?;
    let ports = json!([
        {"name": "ws", "port": WS_PORT, "targetPort": "ws", "protocol": "TCP"},
        {"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"},
    ]);
    // Headless: stable per-pod DNS names; not-ready pods stay resolvable so that the
    // push API can still reach a draining pod's agents.
    let headless_service = typed(
        "Service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(pool, headless_name(pool), "gateway")?,
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": true,
                "selector": selector_labels(pool),
                "ports": ports,
            },
        }),
    )?;
    let mut client_meta = meta(pool, base_name(pool), "gateway")?;
    if let Some(annotations) = &pool.spec.service.annotations {
        client_meta["annotations"] = json!(annotations);
    }
    let service_type = match pool.spec.service.type_ {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    // Only the public port: the push API must not ride on a LoadBalancer.
    let client_service = typed(
        "Service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": client_meta,
            "spec": {
                "type": service_type,
                "selector": selector_labels(pool),
                "ports": [{"name": "ws", "port": WS_PORT, "targetPort": "ws", "protocol": "TCP"}],
            },
        }),
    )?;
    let api_service = typed(
        "Service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(pool, api_service_name(pool), "gateway")?,
            "spec": {
                "type": "ClusterIP",
                "selector": selector_labels(pool),
                "ports": [{"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"}],
            },
        }),
    )?;
    // `spec.disruption.maxUnavailable` (default 10 %): each eviction costs a drain and
    // a reconnect wave, but one pod at a time makes a node drain of a large pool take
    // hours. Unready pods serve no agents, so evicting them costs nothing: AlwaysAllow
    // keeps a crash-looping pod from blocking every node drain.
    let pdb = disruption_budget(
        meta(pool, base_name(pool), "gateway")?,
        pdb_max_unavailable(&pool.spec.disruption.max_unavailable),
        selector_labels(pool),
        Some("AlwaysAllow"),
    )?;
    let managed = pool.spec.routing.as_ref().and_then(|r| r.nats.managed) == Some(true);
    let nats = if managed {
        Some(managed_nats(pool, settings)?)
    } else {
        None
    };
    let (nats_cluster_service, nats_pdb) = if managed {
        (Some(nats_cluster_service(pool)?), Some(nats_pdb(pool)?))
    } else {
        (None, None)
    };
    let stateful_set = gateway_stateful_set(pool, settings, replicas, &hash)?;
    Ok(Desired {
        config,
        config_hash: hash,
        config_map,
        service_account,
        role,
        role_binding,
        headless_service,
        client_service,
        api_service,
        pdb,
        nats_policy: match &nats {
            Some(_) => Some(nats_network_policy(pool)?),
            None => None,
        },
        nats,
        nats_cluster_service,
        nats_pdb,
        gateway_policy: gateway_network_policy(pool)?,
        stateful_set,
    })
}

fn gateway_stateful_set(
    pool: &ConnectionPool,
    settings: &Settings,
    replicas: i32,
    config_hash: &str,
) -> Result<StatefulSet, SpecError> {
    let spec = &pool.spec;
    let template = &spec.template;
    let mounts = secret_mounts(pool);

    let mut pod_annotations = template.annotations.clone().unwrap_or_default();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash.into());

    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
    ];
    for var in template.env.iter().flatten() {
        env.push(json!(var));
    }

    let mut volumes = vec![json!({
        "name": "config",
        "configMap": {"name": config_map_name(pool), "defaultMode": 0o444},
    })];
    // The ConfigMap is mounted by subPath at the path the gateway expects; subPath mounts
    // do not see ConfigMap updates, which is fine: a new config rolls the pods anyway.
    let mut volume_mounts = vec![json!({
        "name": "config", "mountPath": CONFIG_PATH, "subPath": "gateway.yaml", "readOnly": true,
    })];
    for mount in &mounts {
        volumes.push(json!({
            "name": format!("secret-{}", mount.volume),
            "secret": {
                "secretName": mount.source.name,
                "items": [{"key": mount.source.key, "path": mount.file}],
                // Group-readable by the pod's fsGroup, nobody else.
                "defaultMode": 0o440,
            },
        }));
        volume_mounts.push(json!({
            "name": format!("secret-{}", mount.volume),
            "mountPath": format!("{SECRETS_DIR}/{}", mount.volume),
            "readOnly": true,
        }));
    }

    let mut container = json!({
        "name": GATEWAY_CONTAINER,
        "image": template.image.clone().unwrap_or_else(|| settings.gateway_image.clone()),
        "args": ["--config", CONFIG_PATH],
        "env": env,
        "ports": [
            {"name": "ws", "containerPort": WS_PORT, "protocol": "TCP"},
            {"name": "api", "containerPort": API_PORT, "protocol": "TCP"},
            {"name": "probes", "containerPort": PROBE_PORT, "protocol": "TCP"},
        ],
        // Readiness turns false while draining, so the Services stop sending new agents.
        // Probes have their own port (and cap): see `PROBE_PORT`.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "probes"},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "probes"},
            "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "volumeMounts": volume_mounts,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(policy) = template.image_pull_policy {
        container["imagePullPolicy"] = json!(match policy {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        });
    }
    container["resources"] = match &template.resources {
        Some(resources) => json!(resources),
        None => default_resources(pool),
    };

    let mut pod_spec = json!({
        "serviceAccountName": rbac_name(pool),
        "automountServiceAccountToken": true,
        "terminationGracePeriodSeconds": i64::from(spec.drain.deadline_seconds) + GRACE_MARGIN_SECONDS,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": GATEWAY_UID,
            "runAsGroup": GATEWAY_UID,
            "fsGroup": GATEWAY_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    });
    if let Some(selector) = &template.node_selector {
        pod_spec["nodeSelector"] = json!(selector);
    }
    let spread = topology_spread(pool);
    if !spread.is_empty() {
        pod_spec["topologySpreadConstraints"] = json!(spread);
    }
    if let Some(class) = &template.priority_class_name {
        pod_spec["priorityClassName"] = json!(class);
    }
    if let Some(tolerations) = &template.tolerations {
        pod_spec["tolerations"] = json!(tolerations);
    }
    if let Some(secrets) = template
        .image_pull_secrets
        .as_ref()
        .filter(|s| !s.is_empty())
    {
        pod_spec["imagePullSecrets"] = json!(secrets);
    }

    let mut pod_labels = labels(pool, "gateway");
    pod_labels.remove("app.kubernetes.io/managed-by");
    typed(
        "StatefulSet",
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": meta(pool, base_name(pool), "gateway")?,
            "spec": {
                "replicas": replicas,
                "serviceName": headless_name(pool),
                // Pods start and stop together: a gateway needs no ordered bring-up, and
                // a scale-up during a connection storm must not wait pod by pod.
                "podManagementPolicy": "Parallel",
                // The operator rolls the pods itself (autoscale.rs, `RollingOut`): in
                // batches of `rollout.maxUnavailable`, each drained with paced hints
                // before its pods are deleted. `RollingUpdate` would SIGTERM one pod at a
                // time, each drained only by its own shutdown; partitions would still
                // leave the order and pace to the StatefulSet controller.
                "updateStrategy": {"type": "OnDelete"},
                "revisionHistoryLimit": 5,
                "selector": {"matchLabels": selector_labels(pool)},
                "template": {
                    "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                    "spec": pod_spec,
                },
            },
        }),
    )
}

// === placement and size of the gateway pods ===

/// Memory of one idle, authenticated connection: ≈ 0.8 KB in the gateway plus ≈ 3.7 KB
/// of kernel socket memory, which is charged to the pod's memory cgroup
/// (docs/sizing.md, "What one connection costs").
pub const MEMORY_PER_CONNECTION: i64 = 4_608;
/// Memory per connection allowed up to the limit: four times the idle cost, for the
/// outbound queues of busy agents and the allocator's slack.
pub const LIMIT_MEMORY_PER_CONNECTION: i64 = 4 * MEMORY_PER_CONNECTION;
/// The gateway process without connections (≈ 30 MB measured), with room.
pub const BASE_MEMORY: i64 = 64 << 20;
/// CPU requested per targeted connection, in nanocores: a handshake costs ≈ 37 µs, so
/// 50 µs per connection lets a pod take its whole target of reconnecting agents (a
/// neighbour's drain or loss) in about one second of CPU.
pub const CPU_NANOS_PER_CONNECTION: i64 = 50_000;
/// Least CPU request, in millicores.
pub const MIN_CPU_MILLIS: i64 = 100;

/// The gateway container's requests and limits when `spec.template.resources` is not
/// given, derived from the pool's own limits and the measured cost of a connection (see
/// the constants above). No CPU limit: a CFS-throttled gateway misses pings and slows
/// its drains (docs/sizing.md). Requests make the pods Burstable rather than
/// BestEffort (first to be evicted under memory pressure), and let them be created in
/// a namespace whose ResourceQuota requires requests.
pub fn default_resources(pool: &ConnectionPool) -> Value {
    const MI: i64 = 1 << 20;
    let target = i64::from(pool.spec.scaling.target_connections_per_pod.max(1));
    let max = i64::from(pool.spec.limits.max_connections_per_pod.max(1));
    let mebibytes = |bytes: i64| format!("{}Mi", (bytes + MI - 1) / MI);
    let cpu = ((target * CPU_NANOS_PER_CONNECTION + 999_999) / 1_000_000).max(MIN_CPU_MILLIS);
    json!({
        "requests": {
            "cpu": format!("{cpu}m"),
            "memory": mebibytes(BASE_MEMORY + target * MEMORY_PER_CONNECTION),
        },
        "limits": {
            "memory": mebibytes(BASE_MEMORY + max * LIMIT_MEMORY_PER_CONNECTION),
        },
    })
}

/// Topology keys the gateway pods spread over by default: zones first, then nodes.
pub const DEFAULT_SPREAD_KEYS: [&str; 2] =
    ["topology.kubernetes.io/zone", "kubernetes.io/hostname"];

/// The gateway pods' topology spread constraints: `spec.template.topologySpreadConstraints`
/// when given (a constraint without a label selector gets the pool's), else one per
/// [`DEFAULT_SPREAD_KEYS`] with `maxSkew: 1` and `ScheduleAnyway`. Losing a node or a
/// zone then costs a pool a share of its agents, not all of them; ScheduleAnyway keeps
/// it a preference, so a pool still scales on one node or in one zone.
pub fn topology_spread(pool: &ConnectionPool) -> Vec<Value> {
    let selector = json!({"matchLabels": selector_labels(pool)});
    match &pool.spec.template.topology_spread_constraints {
        Some(given) => given
            .iter()
            .map(|c| {
                let mut c = json!(c);
                if c.get("labelSelector").is_none_or(Value::is_null) {
                    c["labelSelector"] = selector.clone();
                }
                c
            })
            .collect(),
        None => DEFAULT_SPREAD_KEYS
            .iter()
            .map(|key| {
                json!({
                    "maxSkew": 1,
                    "topologyKey": key,
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": selector,
                })
            })
            .collect(),
    }
}

/// The gateways' NetworkPolicy: agents reach `ws` from anywhere; the push API (`api`)
/// only from the pool's own pods, from pods of the pool's namespace labelled
/// [`API_CLIENT_LABEL`]`=<pool>` (the tenant's backends opt in), and from the peers of
/// `spec.api.allowedFrom` (backends in other namespaces, a Prometheus scraping
/// `/metrics`). A neighbour elsewhere in the cluster cannot call the push API. (Kubelet
/// probes are not subject to NetworkPolicy.)
pub fn gateway_network_policy(pool: &ConnectionPool) -> Result<NetworkPolicy, SpecError> {
    let mut api_peers = vec![
        json!({"podSelector": {"matchLabels": selector_labels(pool)}}),
        json!({"podSelector": {"matchLabels": {API_CLIENT_LABEL: pool.name_any()}}}),
    ];
    for peer in pool.spec.api.iter().flat_map(|a| &a.allowed_from) {
        let mut entry = serde_json::Map::new();
        if let Some(namespaces) = &peer.namespace_selector {
            entry.insert("namespaceSelector".into(), json!(namespaces));
        }
        if let Some(pods) = &peer.pod_selector {
            entry.insert("podSelector".into(), json!(pods));
        }
        // The CRD refuses an entry with neither selector; an empty peer here would
        // admit everyone, so it is skipped should one get through.
        if !entry.is_empty() {
            api_peers.push(serde_json::Value::Object(entry));
        }
    }
    typed(
        "NetworkPolicy",
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(pool, rbac_name(pool), "gateway")?,
            "spec": {
                "podSelector": {"matchLabels": selector_labels(pool)},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"ports": [{"protocol": "TCP", "port": WS_PORT}]},
                    {
                        "ports": [{"protocol": "TCP", "port": API_PORT}],
                        "from": api_peers,
                    },
                ],
            },
        }),
    )
}

pub fn nats_network_policy(pool: &ConnectionPool) -> Result<NetworkPolicy, SpecError> {
    typed(
        "NetworkPolicy",
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(pool, nats_name(pool), "nats")?,
            "spec": {
                "podSelector": {"matchLabels": nats_selector(pool)},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "ports": [{"protocol": "TCP", "port": NATS_PORT}],
                        "from": [{"podSelector": {"matchLabels": selector_labels(pool)}}],
                    },
                    // The cluster's routes carry no credentials of their own: only the
                    // pool's NATS servers reach each other's route port.
                    {
                        "ports": [{"protocol": "TCP", "port": NATS_CLUSTER_PORT}],
                        "from": [{"podSelector": {"matchLabels": nats_selector(pool)}}],
                    },
                ],
            },
        }),
    )
}

/// The labels that select a pool's managed NATS pods.
fn nats_selector(pool: &ConnectionPool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tether-nats".to_string(),
        ),
        (POOL_LABEL.to_string(), pool.name_any()),
    ])
}

/// Requests and limits of a managed NATS server without `routing.nats.resources`: a
/// request, so that the server is not the first thing evicted under memory pressure
/// (BestEffort) and is admitted under a ResourceQuota; a memory limit above what a
/// pool's bus needs, so that a runaway server cannot take its node down. No CPU limit:
/// throttling a bus delays every pod's routing.
pub fn default_nats_resources() -> Value {
    json!({
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    })
}

/// `P-nats-cluster`: the headless Service that gives each managed NATS server its DNS
/// name. Not-ready servers are published too: servers must find each other's routes
/// before any of them can report ready (JetStream needs a quorum).
fn nats_cluster_service(pool: &ConnectionPool) -> Result<Service, SpecError> {
    typed(
        "Service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(pool, nats_cluster_name(pool), "nats")?,
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": true,
                "selector": nats_selector(pool),
                "ports": [
                    {"name": "client", "port": NATS_PORT, "targetPort": "client", "protocol": "TCP"},
                    {"name": "cluster", "port": NATS_CLUSTER_PORT, "targetPort": "cluster", "protocol": "TCP"},
                ],
            },
        }),
    )
}

/// `P-nats`: a node drain takes one managed NATS server at a time, so a cluster keeps
/// its JetStream quorum (a single server may still go: nothing would ever drain it).
fn nats_pdb(pool: &ConnectionPool) -> Result<PodDisruptionBudget, SpecError> {
    disruption_budget(
        meta(pool, nats_name(pool), "nats")?,
        json!(1),
        nats_selector(pool),
        None,
    )
}

/// `maxUnavailable` as a PodDisruptionBudget takes it: the CRD lets a count through
/// written as a string (`"2"`), which the API server's PodDisruptionBudget validation
/// refuses (a string must be a percentage), so it is rendered as the number it is.
fn pdb_max_unavailable(value: &IntOrString) -> Value {
    match value {
        IntOrString::String(s) => match s.parse::<i32>() {
            Ok(count) => json!(count),
            Err(_) => json!(s),
        },
        IntOrString::Int(count) => json!(count),
    }
}

/// A PodDisruptionBudget over the pods `selector` picks. `unhealthy_eviction` is the
/// `unhealthyPodEvictionPolicy`, or the API default (`IfHealthyBudget`) when `None`.
fn disruption_budget(
    metadata: Value,
    max_unavailable: Value,
    selector: BTreeMap<String, String>,
    unhealthy_eviction: Option<&str>,
) -> Result<PodDisruptionBudget, SpecError> {
    let mut spec = json!({
        "maxUnavailable": max_unavailable,
        "selector": {"matchLabels": selector},
    });
    if let Some(policy) = unhealthy_eviction {
        spec["unhealthyPodEvictionPolicy"] = json!(policy);
    }
    typed(
        "PodDisruptionBudget",
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": metadata,
            "spec": spec,
        }),
    )
}

fn managed_nats(
    pool: &ConnectionPool,
    settings: &Settings,
) -> Result<(StatefulSet, Service), SpecError> {
    let name = nats_name(pool);
    let selector = nats_selector(pool);
    // JetStream holds the agent directory (a key-value bucket).
    let args = vec![
        // `max_payload` from `limits.maxMessageBytes` (file, key `nats.conf` of the
        // pool's ConfigMap); flags below override nothing in it.
        json!("--config"),
        json!(NATS_CONFIG_PATH),
        json!("--jetstream"),
        json!("--store_dir"),
        json!("/data"),
        json!("--http_port"),
        json!("8222"),
    ];
    // The server's name in a cluster (`server_name: $POD_NAME` in its file).
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    // The server requires the pool's credentials from every client: `routing.nats.auth`
    // or the token the operator generated. The secret reaches it as an environment
    // variable that its configuration file references (`nats_config`), never in the
    // object nor on its command line; CEL admits user + password or a token here.
    if let Some(auth) = nats_auth(pool).as_ref() {
        let from = |name: &str, source: &SecretKeyRef| json!({"name": name, "valueFrom": {"secretKeyRef": {"name": source.name, "key": source.key}}});
        if let (Some(_), Some(password)) = (&auth.user, &auth.password_secret_ref) {
            env.push(from("NATS_PASSWORD", password));
        } else if let Some(token) = &auth.token_secret_ref {
            env.push(from("NATS_TOKEN", token));
        }
    }
    // The directory is a cache the gateways rebuild on reconnect and needs no volume;
    // a durable queue with `delivery.storage` gets one PersistentVolumeClaim per NATS
    // pod, so stored messages outlive the NATS pod. (A StatefulSet's claim templates
    // cannot change in place: the operator re-creates the NATS StatefulSet when they
    // change, keeping its pods and claims — `nats::recreate_reason`, docs/operator.md.)
    let data_volume = pool
        .spec
        .delivery
        .as_ref()
        .and_then(|d| d.storage.as_ref())
        .map(|size| {
            json!({
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": size}},
                },
            })
        });
    let mut sts: StatefulSet = typed(
        "StatefulSet",
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": meta(pool, name.clone(), "nats")?,
            "spec": {
                "replicas": nats_replicas(pool),
                // The headless Service: each server's DNS name, for routes and clients.
                "serviceName": nats_cluster_name(pool),
                // All servers at once: a cluster's servers become ready only together
                // (JetStream needs a quorum), so OrderedReady would wait forever on the
                // first one.
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": selector},
                "template": {
                    // The server reads its file only at start: any change to it (a new
                    // limit, other credentials) rolls the server, as for the gateways.
                    "metadata": {
                        "labels": labels(pool, "nats"),
                        "annotations": {CONFIG_HASH_ANNOTATION: config_hash(&nats_config(pool).unwrap_or_default())},
                    },
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        // Servers on distinct nodes where the scheduler can: one node's
                        // loss then takes one server, which a cluster survives.
                        "affinity": {"podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [{
                                "weight": 100,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": selector},
                                },
                            }],
                        }},
                        "containers": [{
                            "name": "nats",
                            "image": settings.nats_image,
                            "args": args,
                            "env": env,
                            "resources": pool.spec.routing.as_ref()
                                .and_then(|r| r.nats.resources.as_ref())
                                .map_or_else(default_nats_resources, |r| json!(r)),
                            "ports": [
                                {"name": "client", "containerPort": NATS_PORT, "protocol": "TCP"},
                                {"name": "cluster", "containerPort": NATS_CLUSTER_PORT, "protocol": "TCP"},
                                {"name": "monitor", "containerPort": 8222, "protocol": "TCP"},
                            ],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "monitor"}, "periodSeconds": 5},
                            "livenessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"}, "periodSeconds": 10},
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/data"},
                                {"name": "config", "mountPath": "/etc/nats", "readOnly": true},
                            ],
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }],
                        "volumes": [
                            {"name": "data", "emptyDir": {}},
                            {"name": "config", "configMap": {
                                "name": config_map_name(pool),
                                "items": [{"key": NATS_CONFIG_KEY, "path": "nats.conf"}],
                            }},
                        ],
                    },
                },
            },
        }),
    )?;
    // A private registry's credentials serve the managed NATS's image too (it is
    // mirrored there when the cluster cannot pull from Docker Hub).
    if let Some(secrets) = pool
        .spec
        .template
        .image_pull_secrets
        .as_ref()
        .filter(|s| !s.is_empty())
        && let Some(pod) = sts.spec.as_mut().and_then(|s| s.template.spec.as_mut())
    {
        pod.image_pull_secrets = Some(secrets.clone());
    }
    if let Some(claim) = data_volume
        && let Some(spec) = sts.spec.as_mut()
    {
        // The claim template provides `data`; the config file stays a volume.
        if let Some(volumes) = spec
            .template
            .spec
            .as_mut()
            .and_then(|pod| pod.volumes.as_mut())
        {
            volumes.retain(|v| v.name != "data");
        }
        spec.volume_claim_templates = Some(vec![typed("PersistentVolumeClaim", claim)?]);
    }
    let svc = typed(
        "Service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(pool, nats_name(pool), "nats")?,
            "spec": {
                "selector": selector,
                "ports": [{"name": "client", "port": NATS_PORT, "targetPort": "client", "protocol": "TCP"}],
            },
        }),
    )?;
    Ok((sts, svc))
}

#[cfg(test)]
mod tests;

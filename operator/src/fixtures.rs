//! Test-only builders of pools and StatefulSets.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use kube::api::ObjectMeta;
use tether_crds::{
    AuthSpec, ConnectionPool, ConnectionPoolSpec, JwtSpec, ReplicasSpec, SecretKeyRef,
};

/// A minimal valid pool named `name` in namespace `tenants`, as the API server would
/// return it (uid, generation, defaults filled in).
pub fn pool(name: &str) -> ConnectionPool {
    let spec: ConnectionPoolSpec = serde_json::from_value(serde_json::json!({
        "tenant": "acme",
        "replicas": {"min": 1, "max": 1},
        "auth": {
            "jwt": {"secretRef": {"name": "acme-jwt", "key": "hs256"}},
            "apiKeysSecretRef": {"name": "acme-api-keys", "key": "keys"},
        },
    }))
    .expect("fixture spec");
    let mut pool = ConnectionPool::new(name, spec);
    pool.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("tenants".into()),
        uid: Some("0b5a4c1e-7d2f-4f3e-9a61-3c2b1d0e9f88".into()),
        generation: Some(1),
        ..Default::default()
    };
    pool
}

/// A secret reference.
pub fn secret(name: &str, key: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: name.into(),
        key: key.into(),
    }
}

/// The full-featured spec pieces tests switch on.
pub fn with_public_keys(mut pool: ConnectionPool) -> ConnectionPool {
    pool.spec.auth = AuthSpec {
        jwt: JwtSpec {
            secret_ref: None,
            public_keys_secret_ref: Some(secret("acme-jwt-keys", "public.pem")),
            jwks: None,
            issuer: Some("https://id.example".into()),
            audience: Some("tether".into()),
        },
        api_keys_secret_ref: secret("acme-api-keys", "keys"),
        revocation_default_seconds: None,
    };
    pool.spec.replicas = ReplicasSpec { min: 2, max: 5 };
    pool
}

/// A StatefulSet of `replicas` pods at generation 1 whose controller has seen it, with
/// `current` pods existing, `updated` on the new revision and `ready` ready.
pub fn sts_with_status(replicas: i32, current: i32, updated: i32, ready: i32) -> StatefulSet {
    StatefulSet {
        metadata: ObjectMeta {
            generation: Some(1),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::apps::v1::StatefulSetSpec {
            replicas: Some(replicas),
            ..Default::default()
        }),
        status: Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas: current,
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            current_revision: Some("r1".into()),
            update_revision: Some("r1".into()),
            ..Default::default()
        }),
    }
}

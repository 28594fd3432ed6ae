//! Spec checks the schema cannot express (or that an older CRD might not enforce), and
//! the error type for specs the operator cannot act on.
//!
//! A [`SpecError`] is permanent until the user changes something: the reconciler turns
//! it into a `Degraded` condition and a Warning Event, creates nothing, and waits for a
//! change instead of retrying in a loop.

use std::sync::LazyLock;

use kube::ResourceExt;
use regex::Regex;
use tether_crds::ConnectionPool;

/// Why a pool's spec cannot be turned into objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The pool's name cannot prefix the children's names.
    #[error(
        "pool name {0:?} must be a DNS-1035 label of at most 47 characters (it prefixes Service names such as <name>-headless)"
    )]
    BadName(String),
    /// `replicas.min` above `replicas.max`.
    #[error("replicas.min ({min}) must not exceed replicas.max ({max})")]
    Replicas {
        /// `replicas.min`.
        min: i32,
        /// `replicas.max`.
        max: i32,
    },
    /// Zero or two JWT key sources.
    #[error("auth.jwt: set exactly one of secretRef (HS256) and publicKeysSecretRef (RS256/ES256)")]
    JwtKeySource,
    /// More than one pod but no bus between them.
    #[error("routing is required when replicas.max > 1")]
    RoutingRequired,
    /// `routing.nats` names neither or both sources.
    #[error("routing.nats: set exactly one of url and managed: true")]
    NatsSource,
    /// An environment variable the operator sets itself.
    #[error(
        "template.env: {0} is set by the operator (POD_NAME, POD_NAMESPACE and TETHER_* are reserved)"
    )]
    ReservedEnv(String),
    /// The image reference does not parse.
    #[error("template.image {0:?} is not a valid image reference")]
    BadImage(String),
    /// The rendered gateway configuration would be refused by the gateway.
    #[error("gateway configuration: {0}")]
    Config(String),
    /// A referenced Secret does not exist.
    #[error("Secret {name:?} (referenced by {field}) does not exist")]
    SecretMissing {
        /// The Secret.
        name: String,
        /// The spec field that references it.
        field: String,
    },
    /// A referenced Secret lacks the key.
    #[error("Secret {name:?} has no key {key:?} (referenced by {field})")]
    SecretKeyMissing {
        /// The Secret.
        name: String,
        /// The key.
        key: String,
        /// The spec field that references it.
        field: String,
    },
    /// The API server refused an object built from the spec (HTTP 400/422).
    #[error("the API server refused {object}: {message}")]
    Rejected {
        /// `Kind/name`.
        object: String,
        /// The server's message.
        message: String,
    },
    /// An object with a child's name exists and this pool is not its controller: it is
    /// left exactly as it is (nothing of the spec is applied while it is there).
    #[error(
        "{object} exists and is not this pool's ({}): nothing was written; delete or rename it, or rename the pool",
        owner.as_deref().map_or("it has no controller".to_string(), |o| format!("it belongs to {o}"))
    )]
    ChildNotOwned {
        /// `Kind/name`.
        object: String,
        /// Its controller, `Kind name`, if it has one.
        owner: Option<String>,
    },
    /// An older pool of the namespace writes an object of the same kind and name.
    #[error(
        "ConnectionPool {pool:?} was created first and also writes {object}: this pool is refused, nothing was written; rename it"
    )]
    NameCollision {
        /// The older pool.
        pool: String,
        /// `Kind/name` both would write.
        object: String,
    },
    /// The operator's RBAC does not allow what the pool needs in its namespace.
    #[error(
        "the operator may not {action} in this namespace ({message}); grant it there (Helm value tenantNamespaces)"
    )]
    Forbidden {
        /// What it tried, e.g. `get Secret "acme-jwt"`.
        action: String,
        /// The API server's message.
        message: String,
    },
    /// The pool has no uid yet, so children cannot point at it.
    #[error("the pool has no metadata.uid yet")]
    NotPersisted,
    /// A bug in the builders.
    #[error("internal error building objects: {0}")]
    Internal(String),
}

impl SpecError {
    /// The CamelCase reason used in the condition and the Event.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::SecretMissing { .. } | SpecError::SecretKeyMissing { .. } => "SecretMissing",
            SpecError::BadImage(_) => "InvalidImage",
            SpecError::Rejected { .. } => "RejectedByAPIServer",
            SpecError::ChildNotOwned { .. } => "ChildNotOwned",
            SpecError::NameCollision { .. } => "NameCollision",
            SpecError::Forbidden { .. } => "Forbidden",
            SpecError::NotPersisted | SpecError::Internal(_) => "InternalError",
            _ => "InvalidSpec",
        }
    }

    /// Whether the fix may come from outside the pool (a Secret being created, a user's
    /// object or an older pool deleted), so the reconciler should look again after a
    /// while rather than only on a spec change: none of those is watched.
    pub fn may_resolve_itself(&self) -> bool {
        matches!(
            self,
            SpecError::SecretMissing { .. }
                | SpecError::SecretKeyMissing { .. }
                | SpecError::ChildNotOwned { .. }
                | SpecError::NameCollision { .. }
                | SpecError::Forbidden { .. }
                | SpecError::NotPersisted
        )
    }
}

static DNS_1035: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z]([-a-z0-9]*[a-z0-9])?$").expect("static regex"));

// The reference grammar of the distribution project, simplified: optional registry host
// (with port), lowercase path components, optional tag, optional sha256 digest.
static IMAGE: LazyLock<Regex> = LazyLock::new(|| {
    let host = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?";
    let component = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
    Regex::new(&format!(
        r"^(?:{host}/)?{component}(?:/{component})*(?::[\w][\w.-]{{0,127}})?(?:@sha256:[0-9a-f]{{64}})?$"
    ))
    .expect("static regex")
});

/// Whether `image` is a well-formed image reference.
pub fn valid_image(image: &str) -> bool {
    image.len() <= 512 && IMAGE.is_match(image)
}

/// Checks what needs no API call. Returns the first problem, in spec order.
pub fn validate(pool: &ConnectionPool) -> Result<(), SpecError> {
    let name = pool.name_any();
    if name.len() > 47 || !DNS_1035.is_match(&name) {
        return Err(SpecError::BadName(name));
    }
    let spec = &pool.spec;
    if spec.replicas.min > spec.replicas.max {
        return Err(SpecError::Replicas {
            min: spec.replicas.min,
            max: spec.replicas.max,
        });
    }
    if spec.auth.jwt.secret_ref.is_some() == spec.auth.jwt.public_keys_secret_ref.is_some() {
        return Err(SpecError::JwtKeySource);
    }
    match &spec.routing {
        None if spec.replicas.max > 1 => return Err(SpecError::RoutingRequired),
        Some(routing) if routing.nats.url.is_some() == (routing.nats.managed == Some(true)) => {
            return Err(SpecError::NatsSource);
        }
        _ => {}
    }
    for var in spec.template.env.iter().flatten() {
        if var.name == "POD_NAME" || var.name == "POD_NAMESPACE" || var.name.starts_with("TETHER_")
        {
            return Err(SpecError::ReservedEnv(var.name.clone()));
        }
    }
    if let Some(image) = &spec.template.image
        && !valid_image(image)
    {
        return Err(SpecError::BadImage(image.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pool;

    #[test]
    fn image_references() {
        for good in [
            "tether-gateway",
            "nats:2.11-alpine",
            "ghcr.io/tether-dev/tether-gateway:0.1.0",
            "localhost:5000/team/gw@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "registry.example.com/a/b/c:v1_2.3-rc",
        ] {
            assert!(valid_image(good), "{good}");
        }
        for bad in [
            "",
            "Ghcr.io/UPPER/Case",
            "image with spaces",
            "gw:",
            "gw:-leading-dash",
            "ghcr.io//double",
            "gw@sha256:short",
            "https://ghcr.io/gw",
        ] {
            assert!(!valid_image(bad), "{bad}");
        }
    }

    #[test]
    fn a_valid_pool_passes() {
        assert_eq!(validate(&pool("acme")), Ok(()));
    }

    #[test]
    fn names_that_cannot_prefix_services_are_refused() {
        assert!(matches!(
            validate(&pool("9lives")),
            Err(SpecError::BadName(_))
        ));
        let long = "a".repeat(48);
        assert!(matches!(validate(&pool(&long)), Err(SpecError::BadName(_))));
        assert_eq!(validate(&pool(&"a".repeat(47))), Ok(()));
    }

    #[test]
    fn cross_field_rules_hold_without_the_schema() {
        let mut p = pool("acme");
        p.spec.replicas.min = 3;
        assert_eq!(validate(&p), Err(SpecError::Replicas { min: 3, max: 1 }));

        let mut p = pool("acme");
        p.spec.auth.jwt.public_keys_secret_ref = p.spec.auth.jwt.secret_ref.clone();
        assert_eq!(validate(&p), Err(SpecError::JwtKeySource));

        let mut p = pool("acme");
        p.spec.replicas.max = 3;
        assert_eq!(validate(&p), Err(SpecError::RoutingRequired));
    }

    #[test]
    fn reserved_env_and_bad_images_are_refused() {
        let mut p = pool("acme");
        p.spec.template.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "TETHER_CONFIG".into(),
            value: Some("/tmp/x".into()),
            ..Default::default()
        }]);
        assert_eq!(
            validate(&p),
            Err(SpecError::ReservedEnv("TETHER_CONFIG".into()))
        );

        let mut p = pool("acme");
        p.spec.template.image = Some("not a ref".into());
        let err = validate(&p).unwrap_err();
        assert_eq!(err.reason(), "InvalidImage");
        assert!(!err.may_resolve_itself());
    }
}

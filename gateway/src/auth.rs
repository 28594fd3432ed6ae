//! Authentication: agents' JWTs (checked before the WebSocket upgrade and again on each
//! in-band `refresh`) and backends' API keys (checked on every push-API call).
//!
//! Algorithm confusion is impossible by construction: a verifier holds either one HS256
//! secret or a set of public keys, never both, and a token's `alg` must belong to the
//! family of the key it is checked against. `alg: none` does not parse.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use parking_lot::RwLock;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tether_config::JwtConfig;

/// Longest agent id accepted (`sub`), in bytes.
pub const MAX_AGENT_ID_LEN: usize = 256;
/// Longest group name accepted, in bytes.
pub const MAX_GROUP_LEN: usize = 128;
/// Most groups one token may name.
pub const MAX_GROUPS: usize = 64;

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all (401).
    #[error("missing credentials")]
    Missing,
    /// Credentials that do not verify: bad signature, expired, malformed (401).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// A valid token for someone else: wrong audience or tenant (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
}

/// Why the key material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key file held nothing usable.
    #[error("{0}")]
    Invalid(String),
}

/// The facts the gateway takes from a verified agent token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The agent id (`sub`).
    pub agent_id: String,
    /// Groups (`groups` claim).
    pub groups: Vec<String>,
    /// Expiry, Unix seconds (`exp`).
    pub expires_at: u64,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    tenant: Option<String>,
}

enum Keys {
    Hs256(DecodingKey),
    Public(Vec<DecodingKey>),
}

/// Verifies agent tokens against the pool's keys.
pub struct TokenVerifier {
    keys: Keys,
    /// One validation per accepted algorithm: jsonwebtoken refuses a validation that
    /// lists algorithms of another family than the key's.
    validations: Vec<Validation>,
    tenant: Option<String>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field(
                "algorithms",
                &self
                    .validations
                    .iter()
                    .map(|v| v.algorithms[0])
                    .collect::<Vec<_>>(),
            )
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Splits a file into its PEM blocks (`-----BEGIN …-----` … `-----END …-----`).
fn pem_blocks(text: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let Some(end_marker) = rest[start..].find("-----END ") else {
            break;
        };
        let after_end = start + end_marker;
        let close = rest[after_end + 9..]
            .find("-----")
            .map(|i| after_end + 9 + i + 5)
            .unwrap_or(rest.len());
        blocks.push(&rest[start..close]);
        rest = &rest[close..];
    }
    blocks
}

impl TokenVerifier {
    /// A verifier from the pool's JWT settings.
    pub fn from_config(config: &JwtConfig, tenant: Option<String>) -> Result<Self, KeyError> {
        let keys = match (&config.hs256_secret_file, &config.public_keys_file) {
            (Some(path), None) => {
                let mut secret = read(path)?;
                while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
                    secret.pop();
                }
                if secret.len() < 32 {
                    return Err(KeyError::Invalid(format!(
                        "{}: an HS256 secret needs at least 32 bytes",
                        path.display()
                    )));
                }
                Keys::Hs256(DecodingKey::from_secret(&secret))
            }
            (None, Some(path)) => {
                let text = String::from_utf8(read(path)?)
                    .map_err(|_| KeyError::Invalid(format!("{}: not PEM text", path.display())))?;
                let keys = pem_blocks(&text)
                    .into_iter()
                    .map(|block| {
                        DecodingKey::from_rsa_pem(block.as_bytes())
                            .or_else(|_| DecodingKey::from_ec_pem(block.as_bytes()))
                            .map_err(|e| {
                                KeyError::Invalid(format!("{}: bad key: {e}", path.display()))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if keys.is_empty() {
                    return Err(KeyError::Invalid(format!(
                        "{}: no PEM public key found",
                        path.display()
                    )));
                }
                Keys::Public(keys)
            }
            (None, None) => {
                return Err(KeyError::Invalid(
                    "auth.jwt needs hs256SecretFile or publicKeysFile".into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(KeyError::Invalid(
                    "auth.jwt: set hs256SecretFile or publicKeysFile, not both".into(),
                ));
            }
        };
        Ok(Self::new(keys, config, tenant))
    }

    /// A verifier for one HS256 secret (dev mode and tests).
    pub fn hs256(secret: &[u8], config: &JwtConfig, tenant: Option<String>) -> Self {
        Self::new(
            Keys::Hs256(DecodingKey::from_secret(secret)),
            config,
            tenant,
        )
    }

    fn new(keys: Keys, config: &JwtConfig, tenant: Option<String>) -> Self {
        let algorithms = match &keys {
            Keys::Hs256(_) => vec![Algorithm::HS256],
            Keys::Public(_) => vec![Algorithm::RS256, Algorithm::ES256],
        };
        let validations = algorithms
            .into_iter()
            .map(|alg| {
                let mut validation = Validation::new(alg);
                validation.leeway = config.leeway_seconds;
                validation.validate_nbf = true;
                validation.set_required_spec_claims(&["exp", "sub"]);
                match &config.audience {
                    Some(aud) => validation.set_audience(&[aud]),
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = &config.issuer {
                    validation.set_issuer(&[iss]);
                }
                validation
            })
            .collect();
        Self {
            keys,
            validations,
            tenant,
        }
    }

    /// Verifies a token and returns the agent it names.
    pub fn verify(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let Some(validation) = self
            .validations
            .iter()
            .find(|v| v.algorithms[0] == header.alg)
        else {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        };
        let candidates: Vec<&DecodingKey> = match &self.keys {
            Keys::Hs256(key) => vec![key],
            Keys::Public(keys) => keys
                .iter()
                .filter(|k| k.family() == header.alg.family())
                .collect(),
        };
        let mut last = AuthError::Invalid("no key for this algorithm".into());
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => return self.identity(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidAudience => {
                            AuthError::Forbidden("token is for another audience".into())
                        }
                        // With several public keys, a signature mismatch means "try the next key".
                        _ => AuthError::Invalid(e.to_string()),
                    };
                    if matches!(last, AuthError::Forbidden(_)) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn identity(&self, claims: Claims) -> Result<AgentIdentity, AuthError> {
        if let (Some(expected), Some(actual)) = (&self.tenant, &claims.tenant)
            && expected != actual
        {
            return Err(AuthError::Forbidden(format!(
                "token is for tenant {actual:?}, this pool serves {expected:?}"
            )));
        }
        validate_name("sub", &claims.sub, MAX_AGENT_ID_LEN)?;
        if claims.groups.len() > MAX_GROUPS {
            return Err(AuthError::Invalid(format!(
                "at most {MAX_GROUPS} groups per token"
            )));
        }
        for group in &claims.groups {
            validate_name("group", group, MAX_GROUP_LEN)?;
        }
        let mut groups = claims.groups;
        groups.sort_unstable();
        groups.dedup();
        Ok(AgentIdentity {
            agent_id: claims.sub,
            groups,
            expires_at: claims.exp,
        })
    }
}

/// Agent ids and group names end up in log lines, URLs and bus subjects: refuse empty,
/// oversized or control-character names up front.
fn validate_name(what: &str, name: &str, max: usize) -> Result<(), AuthError> {
    if name.is_empty() || name.len() > max || name.chars().any(char::is_control) {
        return Err(AuthError::Invalid(format!(
            "{what} must be 1..={max} bytes without control characters"
        )));
    }
    Ok(())
}

/// The push API's keys, compared in constant time. Reloadable, because the operator
/// mounts them from a Secret that can be rotated while the pod runs.
#[derive(Debug)]
pub struct ApiKeys {
    path: Option<PathBuf>,
    keys: RwLock<Vec<Vec<u8>>>,
}

impl ApiKeys {
    /// Keys read from a file: one per line, blank lines and `#` comments ignored.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let keys = Self::parse(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            keys: RwLock::new(keys),
        })
    }

    /// Fixed keys (dev mode and tests).
    pub fn fixed(keys: Vec<String>) -> Self {
        Self {
            path: None,
            keys: RwLock::new(keys.into_iter().map(String::into_bytes).collect()),
        }
    }

    fn parse(path: &Path) -> Result<Vec<Vec<u8>>, KeyError> {
        let text = String::from_utf8(read(path)?)
            .map_err(|_| KeyError::Invalid(format!("{}: not UTF-8", path.display())))?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err(KeyError::Invalid(format!(
                "{}: no API key found",
                path.display()
            )));
        }
        Ok(keys)
    }

    /// Re-reads the key file; keeps the old keys if the file is unreadable or empty.
    pub fn reload(&self) -> Result<(), KeyError> {
        if let Some(path) = &self.path {
            let keys = Self::parse(path)?;
            *self.keys.write() = keys;
        }
        Ok(())
    }

    /// Whether `presented` is one of the keys. Every key is compared, each in constant
    /// time, so timing tells nothing about which key or prefix matched.
    pub fn verify(&self, presented: &str) -> bool {
        let presented = presented.as_bytes();
        self.keys.read().iter().fold(0u8, |found, key| {
            found | key.as_slice().ct_eq(presented).unwrap_u8()
        }) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        crate::hub::unix_now()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn config() -> JwtConfig {
        JwtConfig {
            audience: Some("tether".into()),
            issuer: Some("https://issuer.example".into()),
            ..JwtConfig::default()
        }
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::hs256(SECRET, &config(), Some("acme".into()))
    }

    fn claims() -> serde_json::Value {
        json!({"sub": "agent-1", "exp": now() + 60, "aud": "tether",
               "iss": "https://issuer.example", "groups": ["b", "a", "a"], "tenant": "acme"})
    }

    #[test]
    fn accepts_valid_token() {
        let id = verifier().verify(&hs(claims())).unwrap();
        assert_eq!(id.agent_id, "agent-1");
        assert_eq!(id.groups, ["a", "b"]);
    }

    #[test]
    fn refuses_expired_wrong_issuer_and_bad_signature() {
        let mut c = claims();
        c["exp"] = json!(now() - 3600);
        assert!(matches!(
            verifier().verify(&hs(c)),
            Err(AuthError::Invalid(_))
        ));
        let mut c = claims();
        c["iss"] = json!("https://evil.example");
        assert!(matches!(
            verifier().verify(&hs(c)),
            Err(AuthError::Invalid(_))
        ));
        let token = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
        )
        .unwrap();
        assert!(matches!(
            verifier().verify(&token),
            Err(AuthError::Invalid(_))
        ));
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        assert!(matches!(
            verifier().verify(&hs(c)),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn leeway_tolerates_small_skew() {
        let mut c = claims();
        c["exp"] = json!(now() - 5);
        assert!(verifier().verify(&hs(c)).is_ok());
        let mut c = claims();
        c["nbf"] = json!(now() + 3600);
        assert!(matches!(
            verifier().verify(&hs(c)),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn wrong_audience_or_tenant_is_forbidden() {
        let mut c = claims();
        c["aud"] = json!("someone-else");
        assert!(matches!(
            verifier().verify(&hs(c)),
            Err(AuthError::Forbidden(_))
        ));
        let mut c = claims();
        c["tenant"] = json!("globex");
        assert!(matches!(
            verifier().verify(&hs(c)),
            Err(AuthError::Forbidden(_))
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64.encode(claims().to_string());
        let token = format!("{header}.{payload}.");
        assert!(matches!(
            verifier().verify(&token),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        let mut c = claims();
        c["sub"] = json!("agent\n1");
        assert!(matches!(
            verifier().verify(&hs(c)),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn api_keys_match_exactly() {
        let keys = ApiKeys::fixed(vec!["key-one".into(), "key-two".into()]);
        assert!(keys.verify("key-two"));
        assert!(!keys.verify("key-tw"));
        assert!(!keys.verify("key-two "));
        assert!(!keys.verify(""));
    }

    #[test]
    fn api_key_file_skips_comments_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# rotated monthly\nalpha\n\n").unwrap();
        let keys = ApiKeys::from_file(&path).unwrap();
        assert!(keys.verify("alpha"));
        std::fs::write(&path, "beta\n").unwrap();
        keys.reload().unwrap();
        assert!(keys.verify("beta") && !keys.verify("alpha"));
        std::fs::write(&path, "").unwrap();
        assert!(keys.reload().is_err());
        assert!(
            keys.verify("beta"),
            "an empty file must not lock everyone out"
        );
    }

    #[test]
    fn pem_blocks_are_split() {
        let text = "junk\n-----BEGIN PUBLIC KEY-----\nAAA\n-----END PUBLIC KEY-----\n\
                    -----BEGIN PUBLIC KEY-----\nBBB\n-----END PUBLIC KEY-----\n";
        let blocks = pem_blocks(text);
        assert_eq!(blocks.len(), 2);
        assert!(blocks[1].contains("BBB") && blocks[1].ends_with("-----END PUBLIC KEY-----"));
    }
}

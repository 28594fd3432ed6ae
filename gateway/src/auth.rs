//! Authentication: agents' JWTs (checked before the WebSocket upgrade and again on each
//! in-band `refresh`) and backends' API keys (checked on every push-API call).
//!
//! Algorithm confusion is impossible by construction: a verifier holds either one HS256
//! secret or a set of public keys, never both, and a token's `alg` must belong to the
//! family of the key it is checked against. `alg: none` does not parse.
//!
//! Keys rotate without a restart: both the JWT key file and the API-key file are
//! re-read while running ([`TokenVerifier::reload`], [`ApiKeys::reload`]); a public-key
//! file may be a JWKS whose `kid`s pick the key a token names, so old and new keys
//! overlap during a rotation. API keys carry scopes ([`Scope`]): a push key cannot
//! drain the pod or disconnect agents.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation, errors::ErrorKind};
use parking_lot::RwLock;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tether_config::JwtConfig;

use crate::jwks::{JwksError, Remote};

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
    /// The token's id (`jti`), if it has one: what `POST /v1/tokens/{jti}/revoke`
    /// names.
    pub jti: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    jti: Option<String>,
}

enum Keys {
    Hs256(DecodingKey),
    Public(Vec<PublicKey>),
}

/// A public key and the `kid` it was published under (JWKS), if any.
pub struct PublicKey {
    pub(crate) kid: Option<String>,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Verifies agent tokens against the pool's keys.
pub struct TokenVerifier {
    keys: RwLock<Keys>,
    /// Where the keys came from, to re-read them on rotation (`None`: fixed keys, or
    /// keys fetched from a JWKS URL).
    source: Option<JwtConfig>,
    /// The JWKS URL the keys are fetched from (`auth.jwt.jwks`).
    remote: Option<Remote>,
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

/// Public keys from a JWKS document (`{"keys":[...]}`): RSA and EC keys, each with its
/// `kid`. Symmetric (`oct`) keys are refused: a public-key file must not hold secrets.
fn jwks_keys(path: &Path, text: &str) -> Result<Vec<PublicKey>, KeyError> {
    let bad = |what: String| KeyError::Invalid(format!("{}: {what}", path.display()));
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(text).map_err(|e| bad(format!("not a JWKS document: {e}")))?;
    set.keys
        .iter()
        .map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("bad key: {e}")))?;
            if key.family() == AlgorithmFamily::Hmac {
                return Err(bad("symmetric keys do not belong in publicKeysFile".into()));
            }
            Ok(PublicKey {
                kid: jwk.common.key_id.clone(),
                key,
            })
        })
        .collect()
}

fn load_keys(config: &JwtConfig) -> Result<Keys, KeyError> {
    Ok(
        match (&config.hs256_secret_file, &config.public_keys_file) {
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
                let keys = if text.trim_start().starts_with('{') {
                    jwks_keys(path, &text)?
                } else {
                    pem_blocks(&text)
                        .into_iter()
                        .map(|block| {
                            DecodingKey::from_rsa_pem(block.as_bytes())
                                .or_else(|_| DecodingKey::from_ec_pem(block.as_bytes()))
                                .map(|key| PublicKey { kid: None, key })
                                .map_err(|e| {
                                    KeyError::Invalid(format!("{}: bad key: {e}", path.display()))
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?
                };
                if keys.is_empty() {
                    return Err(KeyError::Invalid(format!(
                        "{}: no PEM public key found",
                        path.display()
                    )));
                }
                Keys::Public(keys)
            }
            // Filled by the first fetch (`TokenVerifier::refresh_remote`), which the
            // gateway awaits before it listens.
            (None, None) if config.jwks.is_some() => Keys::Public(Vec::new()),
            (None, None) => {
                return Err(KeyError::Invalid(
                    "auth.jwt needs hs256SecretFile, publicKeysFile or jwks".into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(KeyError::Invalid(
                    "auth.jwt: set hs256SecretFile or publicKeysFile, not both".into(),
                ));
            }
        },
    )
}

impl TokenVerifier {
    /// A verifier from the pool's JWT settings.
    pub fn from_config(config: &JwtConfig, tenant: Option<String>) -> Result<Self, KeyError> {
        let keys = load_keys(config)?;
        let mut verifier = Self::new(keys, config, tenant);
        match &config.jwks {
            Some(jwks) => verifier.remote = Some(Remote::new(jwks)?),
            None => verifier.source = Some(config.clone()),
        }
        Ok(verifier)
    }

    /// Re-reads the key file (a rotated Secret); keeps the current keys if the new file
    /// is unreadable or holds no usable key, so a bad rotation locks nobody out.
    pub fn reload(&self) -> Result<(), KeyError> {
        if let Some(config) = &self.source {
            let keys = load_keys(config)?;
            let same_kind = matches!(
                (&*self.keys.read(), &keys),
                (Keys::Hs256(_), Keys::Hs256(_)) | (Keys::Public(_), Keys::Public(_))
            );
            if !same_kind {
                return Err(KeyError::Invalid(
                    "the key file changed between a secret and public keys; restart to switch"
                        .into(),
                ));
            }
            *self.keys.write() = keys;
        }
        Ok(())
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
                // jsonwebtoken checks `aud` and `iss` only when a token carries them (and
                // a claim of the wrong type counts as absent): a configured audience or
                // issuer is therefore also a required claim, else a token minted for
                // another service with the same key and no `aud` would pass.
                let mut required = vec!["exp", "sub"];
                if config.audience.is_some() {
                    required.push("aud");
                }
                if config.issuer.is_some() {
                    required.push("iss");
                }
                validation.set_required_spec_claims(&required);
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
            keys: RwLock::new(keys),
            source: None,
            remote: None,
            validations,
            tenant,
        }
    }

    /// The JWKS URL the keys come from, if they are fetched.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// Fetches the JWKS again (rate-limited by `minRefreshIntervalSeconds`) and, if it
    /// yields keys, uses them from now on. `Ok(false)`: no fetch (fixed keys, or the
    /// rate limit). A failure keeps the current keys.
    pub async fn refresh_remote(&self) -> Result<bool, JwksError> {
        let Some(remote) = &self.remote else {
            return Ok(false);
        };
        match remote.fetch().await? {
            Some(keys) => {
                *self.keys.write() = Keys::Public(keys);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether `token` names a `kid` that none of the current keys has.
    fn names_unknown_kid(&self, token: &str) -> bool {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return false;
        };
        let Some(kid) = header.kid else {
            return false;
        };
        match &*self.keys.read() {
            Keys::Hs256(_) => false,
            Keys::Public(keys) => !keys.iter().any(|k| k.kid.as_deref() == Some(&kid)),
        }
    }

    /// Whether a refused `token` might verify after a JWKS fetch: the keys come from a
    /// JWKS URL and none has the `kid` it names.
    pub fn awaits_fetch(&self, token: &str) -> bool {
        self.remote.is_some() && self.names_unknown_kid(token)
    }

    /// [`TokenVerifier::verify`], and for keys fetched from a JWKS URL: a token naming
    /// an unknown `kid` fetches the set again first (a rotation the periodic refresh
    /// has not seen yet), at most once per `minRefreshIntervalSeconds` however many
    /// such tokens arrive.
    pub async fn verify_fetching(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        let first = self.verify(token);
        if first.is_ok() || self.remote.is_none() || !self.names_unknown_kid(token) {
            return first;
        }
        // Fetched or not (another handshake may have fetched a moment ago), check the
        // keys again; a failed fetch leaves them as they were.
        let _ = self.refresh_remote().await;
        self.verify(token)
    }

    /// Verifies a token and returns the agent it names.
    pub fn verify(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        if let Some(remote) = &self.remote
            && remote.stale(std::time::Instant::now())
        {
            let state = remote.state();
            let why = match (state.last_error, state.last_success) {
                (Some(e), _) => e.to_string(),
                (None, Some(at)) => format!(
                    "last good fetch {} s ago, none attempted since",
                    at.elapsed().as_secs()
                ),
                (None, None) => "never fetched".to_owned(),
            };
            return Err(AuthError::Invalid(format!(
                "no current signing keys: the JWKS was not fetched successfully within \
                 auth.jwt.jwks.maxStaleSeconds ({why})"
            )));
        }
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
        let keys = self.keys.read();
        let candidates: Vec<&DecodingKey> = match &*keys {
            Keys::Hs256(key) => vec![key],
            Keys::Public(keys) => {
                let family: Vec<&PublicKey> = keys
                    .iter()
                    .filter(|k| k.key.family() == header.alg.family())
                    .collect();
                // A token naming a `kid` is checked against that key only, when the
                // keys have ids (JWKS); an unknown `kid` is refused outright.
                match &header.kid {
                    Some(kid) if family.iter().any(|k| k.kid.is_some()) => {
                        let named: Vec<&DecodingKey> = family
                            .iter()
                            .filter(|k| k.kid.as_deref() == Some(kid))
                            .map(|k| &k.key)
                            .collect();
                        if named.is_empty() {
                            return Err(AuthError::Invalid("unknown key id (kid)".into()));
                        }
                        named
                    }
                    _ => family.iter().map(|k| &k.key).collect(),
                }
            }
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
                        ErrorKind::MissingRequiredClaim(claim) => AuthError::Invalid(format!(
                            "token lacks the required `{claim}` claim (or it has the wrong type)"
                        )),
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
        // A pool with a tenant takes only tokens that say so: a token without the claim
        // could have been minted for any tenant sharing the issuer and keys.
        if let Some(expected) = &self.tenant {
            match &claims.tenant {
                Some(actual) if actual == expected => {}
                Some(_) => {
                    return Err(AuthError::Forbidden("token is for another tenant".into()));
                }
                None => {
                    return Err(AuthError::Forbidden(
                        "token has no tenant claim; this pool requires one".into(),
                    ));
                }
            }
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
        if let Some(jti) = &claims.jti {
            validate_name("jti", jti, MAX_AGENT_ID_LEN)?;
        }
        let mut groups = claims.groups;
        groups.sort_unstable();
        groups.dedup();
        Ok(AgentIdentity {
            agent_id: claims.sub,
            groups,
            expires_at: claims.exp,
            jti: claims.jti,
        })
    }
}

/// Agent ids and group names end up in log lines, URLs and bus subjects: refuse empty,
/// oversized or control-character names up front.
fn validate_name(what: &str, name: &str, max: usize) -> Result<(), AuthError> {
    if !valid_name(name, max) {
        return Err(AuthError::Invalid(format!(
            "{what} must be 1..={max} bytes without control characters"
        )));
    }
    Ok(())
}

/// What an API key may do on the push API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Send to one agent or to a group (`POST /v1/agents/{a}/messages`,
    /// `POST /v1/groups/{g}/messages`).
    Push,
    /// Request-response to one agent (`POST /v1/agents/{a}/requests`).
    Request,
    /// Presence lookup, listing and stats (`GET /v1/agents[/{a}]`, `GET /v1/stats`).
    Presence,
    /// Broadcast to every agent, disconnect an agent, drain the pod.
    Admin,
}

impl Scope {
    const ALL: [Scope; 4] = [Scope::Push, Scope::Request, Scope::Presence, Scope::Admin];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The name used in the key file.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Push => "push",
            Scope::Request => "request",
            Scope::Presence => "presence",
            Scope::Admin => "admin",
        }
    }
}

/// A set of scopes, as a bit mask (selected in constant time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope: what a key without scopes (the format before scopes) gets.
    pub const ALL: Scopes = Scopes(0b1111);

    /// Whether the set holds `scope`.
    pub fn allows(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Parses `push,request` (`*` or `all`: every scope).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut bits = 0;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" || name == "all" {
                bits |= Scopes::ALL.0;
                continue;
            }
            let scope = Scope::ALL
                .into_iter()
                .find(|s| s.name() == name)
                .ok_or_else(|| {
                    format!("unknown scope {name:?} (push, request, presence, admin, all)")
                })?;
            bits |= scope.bit();
        }
        if bits == 0 {
            return Err("no scope given".into());
        }
        Ok(Scopes(bits))
    }
}

/// Whether `name` is a valid agent id or group name: 1..=`max` bytes, no control
/// characters.
pub fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty() && name.len() <= max && !name.chars().any(char::is_control)
}

/// The push API's keys with their scopes, compared in constant time. Reloadable,
/// because the operator mounts them from a Secret that can be rotated while the pod
/// runs.
///
/// File format, one key per line, `#` comments and blank lines ignored:
///
/// ```text
/// # backend that pushes and asks
/// k3y-one push,request,presence
/// # operations
/// k3y-two admin,presence
/// # a bare key (the format before scopes) has every scope
/// k3y-three
/// ```
#[derive(Debug)]
pub struct ApiKeys {
    path: Option<PathBuf>,
    /// SHA-256 of each key: every comparison is of 32 bytes, so its time tells
    /// nothing about a key's length (a constant-time compare of unequal lengths
    /// returns early).
    keys: RwLock<Vec<([u8; 32], Scopes)>>,
}

/// Shortest API key accepted from a key file, in bytes.
pub const MIN_API_KEY_LEN: usize = 16;

/// The SHA-256 of an API key: how keys are held, and a key's identity for its quota.
pub fn key_hash(key: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key).into()
}

impl ApiKeys {
    /// Keys read from a file (format above).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let keys = Self::parse(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            keys: RwLock::new(keys),
        })
    }

    /// Fixed keys with every scope (dev mode and tests).
    pub fn fixed(keys: Vec<String>) -> Self {
        Self::scoped(keys.into_iter().map(|k| (k, Scopes::ALL)).collect())
    }

    /// Fixed keys with their scopes.
    pub fn scoped(keys: Vec<(String, Scopes)>) -> Self {
        Self {
            path: None,
            keys: RwLock::new(
                keys.into_iter()
                    .map(|(k, s)| (key_hash(k.as_bytes()), s))
                    .collect(),
            ),
        }
    }

    fn parse(path: &Path) -> Result<Vec<([u8; 32], Scopes)>, KeyError> {
        let text = String::from_utf8(read(path)?)
            .map_err(|_| KeyError::Invalid(format!("{}: not UTF-8", path.display())))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, scopes) = match line.split_once(char::is_whitespace) {
                Some((key, scopes)) => (
                    key,
                    Scopes::parse(scopes.trim()).map_err(|e| {
                        KeyError::Invalid(format!("{}:{}: {e}", path.display(), n + 1))
                    })?,
                ),
                None => (line, Scopes::ALL),
            };
            if key.len() < MIN_API_KEY_LEN {
                return Err(KeyError::Invalid(format!(
                    "{}:{}: an API key needs at least {MIN_API_KEY_LEN} bytes (this one has {}); \
                     generate one with `openssl rand -hex 24`",
                    path.display(),
                    n + 1,
                    key.len()
                )));
            }
            keys.push((key_hash(key.as_bytes()), scopes));
        }
        if keys.is_empty() {
            return Err(KeyError::Invalid(format!(
                "{}: no API key found",
                path.display()
            )));
        }
        Ok(keys)
    }

    /// Re-reads the key file; keeps the old keys if the file is unreadable, malformed
    /// or empty.
    pub fn reload(&self) -> Result<(), KeyError> {
        if let Some(path) = &self.path {
            let keys = Self::parse(path)?;
            *self.keys.write() = keys;
        }
        Ok(())
    }

    /// The scopes of `presented`, or `None` if it is no key. Every key is compared,
    /// each in constant time, and the scopes are selected by mask, so timing tells
    /// nothing about which key or prefix matched.
    pub fn verify(&self, presented: &str) -> Option<Scopes> {
        let presented = key_hash(presented.as_bytes());
        let (found, scopes) =
            self.keys
                .read()
                .iter()
                .fold((0u8, 0u8), |(found, scopes), (key, key_scopes)| {
                    let eq = key.as_slice().ct_eq(presented.as_slice()).unwrap_u8();
                    // 0xFF when equal, 0 otherwise.
                    let mask = eq.wrapping_neg();
                    (found | eq, scopes | (mask & key_scopes.0))
                });
        (found == 1).then_some(Scopes(scopes))
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
        tether_test_support::hs256(SECRET, &claims)
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
        let token = tether_test_support::hs256(b"another-secret-another-secret-xx", &claims());
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
    fn a_pool_with_a_tenant_requires_the_claim() {
        let mut c = claims();
        c.as_object_mut().unwrap().remove("tenant");
        assert!(matches!(
            verifier().verify(&hs(c.clone())),
            Err(AuthError::Forbidden(_))
        ));
        // A pool without a tenant takes tokens without the claim.
        let open = TokenVerifier::hs256(SECRET, &config(), None);
        assert!(open.verify(&hs(c)).is_ok());
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn signed(alg: Algorithm, kid: Option<&str>, private: &str) -> String {
        let pem = std::fs::read(fixture(private)).unwrap();
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
            _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, &claims(), &key).unwrap()
    }

    fn jwks_verifier(dir: &Path) -> TokenVerifier {
        let path = dir.join("jwks.json");
        std::fs::copy(fixture("jwks.json"), &path).unwrap();
        let config = JwtConfig {
            public_keys_file: Some(path),
            ..config()
        };
        TokenVerifier::from_config(&config, Some("acme".into())).unwrap()
    }

    #[test]
    fn jwks_keys_are_selected_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let v = jwks_verifier(dir.path());
        for (alg, kid, key) in [
            (Algorithm::RS256, "rsa-1", "rsa-private.pem"),
            (Algorithm::RS256, "rsa-2", "rsa2-private.pem"),
            (Algorithm::ES256, "ec-1", "ec-private.pem"),
        ] {
            assert!(v.verify(&signed(alg, Some(kid), key)).is_ok(), "{kid}");
        }
        // Signed by rsa-1 but naming rsa-2: only rsa-2 is tried.
        assert!(matches!(
            v.verify(&signed(Algorithm::RS256, Some("rsa-2"), "rsa-private.pem")),
            Err(AuthError::Invalid(_))
        ));
        let unknown = v
            .verify(&signed(Algorithm::RS256, Some("rsa-9"), "rsa-private.pem"))
            .unwrap_err();
        assert!(unknown.to_string().contains("kid"), "{unknown}");
        // No kid: every key of the token's family is tried.
        assert!(
            v.verify(&signed(Algorithm::RS256, None, "rsa2-private.pem"))
                .is_ok()
        );
        // An HS256 token against public keys: wrong family, refused.
        assert!(matches!(
            v.verify(&hs(claims())),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn jwt_keys_reload_and_a_bad_file_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.pem");
        std::fs::copy(fixture("rsa-public.pem"), &path).unwrap();
        let config = JwtConfig {
            public_keys_file: Some(path.clone()),
            ..config()
        };
        let v = TokenVerifier::from_config(&config, Some("acme".into())).unwrap();
        let old = signed(Algorithm::RS256, None, "rsa-private.pem");
        let new = signed(Algorithm::RS256, Some("rsa-2"), "rsa2-private.pem");
        assert!(v.verify(&old).is_ok() && v.verify(&new).is_err());
        // Rotation: the Secret now holds a JWKS with both keys.
        std::fs::copy(fixture("jwks.json"), &path).unwrap();
        v.reload().unwrap();
        assert!(v.verify(&new).is_ok());
        std::fs::write(&path, "garbage").unwrap();
        assert!(v.reload().is_err());
        assert!(v.verify(&new).is_ok(), "a bad file keeps the previous keys");
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
        assert!(keys.verify("key-two").is_some());
        assert!(keys.verify("key-tw").is_none());
        assert!(keys.verify("key-two ").is_none());
        assert!(keys.verify("").is_none());
    }

    #[test]
    fn api_key_file_skips_comments_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# rotated monthly\nalpha-0123456789ab\n\n").unwrap();
        let keys = ApiKeys::from_file(&path).unwrap();
        assert_eq!(keys.verify("alpha-0123456789ab"), Some(Scopes::ALL));
        std::fs::write(&path, "beta-0123456789abcd\n").unwrap();
        keys.reload().unwrap();
        assert!(
            keys.verify("beta-0123456789abcd").is_some()
                && keys.verify("alpha-0123456789ab").is_none()
        );
        std::fs::write(&path, "").unwrap();
        assert!(keys.reload().is_err());
        assert!(
            keys.verify("beta-0123456789abcd").is_some(),
            "an empty file must not lock everyone out"
        );
        std::fs::write(&path, "gamma-0123456789abc push,bogus\n").unwrap();
        let err = keys.reload().unwrap_err().to_string();
        assert!(err.contains(":1:") && err.contains("bogus"), "{err}");
        assert!(
            keys.verify("beta-0123456789abcd").is_some(),
            "a malformed file keeps the old keys"
        );
    }

    #[test]
    fn short_api_keys_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# fine\nlong-enough-key-0123\nshort-key push\n").unwrap();
        let err = ApiKeys::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(":3:") && err.contains("at least 16 bytes") && err.contains("has 9"),
            "{err}"
        );
        std::fs::write(&path, "exactly-16-bytes\n").unwrap();
        assert!(
            ApiKeys::from_file(&path)
                .unwrap()
                .verify("exactly-16-bytes")
                .is_some()
        );
    }

    #[test]
    fn api_keys_carry_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            "pusher-0123456789 push,request\nops-0123456789abc\tadmin, presence\nold-0123456789abc\n",
        )
        .unwrap();
        let keys = ApiKeys::from_file(&path).unwrap();
        let pusher = keys.verify("pusher-0123456789").unwrap();
        assert!(pusher.allows(Scope::Push) && pusher.allows(Scope::Request));
        assert!(!pusher.allows(Scope::Admin) && !pusher.allows(Scope::Presence));
        let ops = keys.verify("ops-0123456789abc").unwrap();
        assert!(ops.allows(Scope::Admin) && ops.allows(Scope::Presence));
        assert!(!ops.allows(Scope::Push));
        assert_eq!(keys.verify("old-0123456789abc"), Some(Scopes::ALL));
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

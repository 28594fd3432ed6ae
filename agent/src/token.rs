//! Where the agent's JWT comes from. The SDK asks its [`TokenProvider`] for a token on
//! every connect and again before the current one expires (in-band `refresh`), so a
//! provider that fetches short-lived tokens from the customer's identity service keeps a
//! session alive indefinitely.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// A boxed, sendable future (the provider trait must stay object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a token could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading a token or secret file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Signing a token failed.
    #[error("signing token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    /// A custom provider failed.
    #[error("{0}")]
    Other(String),
}

/// Produces the bearer token for the next connect or refresh.
pub trait TokenProvider: Send + Sync + 'static {
    /// A currently valid token.
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>>;
}

/// A fixed token (demos, tests, tokens that never expire).
#[derive(Debug, Clone)]
pub struct StaticToken(pub String);

impl TokenProvider for StaticToken {
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        let token = self.0.clone();
        Box::pin(async move { Ok(token) })
    }
}

/// Re-reads a file on every call, so that a sidecar or a mounted Secret can rotate it.
#[derive(Debug, Clone)]
pub struct TokenFile(pub PathBuf);

impl TokenProvider for TokenFile {
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(async move {
            let text =
                tokio::fs::read_to_string(&self.0)
                    .await
                    .map_err(|source| TokenError::Read {
                        path: self.0.clone(),
                        source,
                    })?;
            Ok(text.trim().to_owned())
        })
    }
}

/// A provider made from an async closure.
pub struct FnToken<F>(pub F);

impl<F, Fut> TokenProvider for FnToken<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
{
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin((self.0)())
    }
}

/// Wraps an async closure as a shared provider.
pub fn token_fn<F, Fut>(f: F) -> Arc<dyn TokenProvider>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
{
    Arc::new(FnToken(f))
}

/// Mints HS256 tokens locally from the gateway's shared secret. For development, demos,
/// tests and the benchmark only: a production agent must not hold the signing secret.
#[derive(Clone)]
pub struct Hs256Minter {
    key: jsonwebtoken::EncodingKey,
    /// The `sub` claim (agent id).
    pub agent_id: String,
    /// Token lifetime.
    pub ttl: Duration,
    /// The `groups` claim.
    pub groups: Vec<String>,
    /// The `tenant` claim, if any.
    pub tenant: Option<String>,
    /// The `aud` claim, if any.
    pub audience: Option<String>,
    /// The `iss` claim, if any.
    pub issuer: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

impl std::fmt::Debug for Hs256Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hs256Minter")
            .field("agent_id", &self.agent_id)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Hs256Minter {
    /// A minter for `agent_id` with a one-hour lifetime and no groups.
    pub fn new(secret: &[u8], agent_id: impl Into<String>) -> Self {
        Self {
            key: jsonwebtoken::EncodingKey::from_secret(secret),
            agent_id: agent_id.into(),
            ttl: Duration::from_secs(3600),
            groups: Vec::new(),
            tenant: None,
            audience: None,
            issuer: None,
        }
    }

    /// Reads the secret from a file (trailing newline trimmed, as the gateway does).
    pub fn from_secret_file(
        path: &std::path::Path,
        agent_id: impl Into<String>,
    ) -> Result<Self, TokenError> {
        let bytes = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let trimmed = bytes.trim_ascii_end();
        Ok(Self::new(trimmed, agent_id))
    }

    /// Signs a token valid from now for `ttl`.
    pub fn mint(&self) -> Result<String, TokenError> {
        self.mint_for(&self.agent_id)
    }

    /// Signs a token for another agent id with this minter's settings (the bench mints
    /// thousands of ids from one minter).
    pub fn mint_for(&self, agent_id: &str) -> Result<String, TokenError> {
        let now = unix_now();
        let claims = Claims {
            sub: agent_id,
            exp: now + self.ttl.as_secs().max(1),
            iat: now,
            groups: &self.groups,
            tenant: self.tenant.as_deref(),
            aud: self.audience.as_deref(),
            iss: self.issuer.as_deref(),
        };
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &self.key,
        )?)
    }
}

impl TokenProvider for Hs256Minter {
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        let token = self.mint();
        Box::pin(async move { token })
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn minted_tokens_verify_with_the_secret() {
        let mut minter = Hs256Minter::new(b"s3cret", "agent-7");
        minter.groups = vec!["eu".into()];
        minter.ttl = Duration::from_secs(120);
        let token = minter.token().await.unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "agent-7");
        assert_eq!(data.claims["groups"][0], "eu");
        let exp = data.claims["exp"].as_u64().unwrap();
        assert!(exp > unix_now() + 60 && exp <= unix_now() + 120);
    }

    #[tokio::test]
    async fn token_file_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").unwrap();
        let provider = TokenFile(path.clone());
        assert_eq!(provider.token().await.unwrap(), "one");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(provider.token().await.unwrap(), "two");
    }
}

//! Agent-token keys fetched from a JWKS URL (`auth.jwt.jwks`): an identity provider's
//! `.well-known/jwks.json`, so that its key rotations need no Secret update.
//!
//! ```text
//!   startup ──┐   every refreshIntervalSeconds ──┐   token with an unknown kid ──┐
//!             ▼                                  ▼                               ▼
//!        Remote::fetch (one at a time; at most once per minRefreshIntervalSeconds)
//!             │ ok: replace the verifier's keys      │ error: keep them, count, log
//!             ▼                                      ▼
//!        TokenVerifier keys  ◄── used until maxStaleSeconds after the last good fetch
//! ```
//!
//! A fetch that fails in any way — connect, TLS, timeout, a non-200 status, a body that
//! is not a JWKS or holds no usable key — keeps the previous key set: a broken or
//! compromised-looking answer must not lock every agent out. Only when no fetch has
//! succeeded for `maxStaleSeconds` are tokens refused, so a provider that is gone for
//! good does not keep keys it may have revoked alive forever.
//!
//! The decisions (may this fetch run, are the keys too old) are pure functions of the
//! times involved ([`fetch_allowed`], [`is_stale`]), tested without a clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{AlgorithmFamily, DecodingKey};
use opentelemetry::metrics::Counter;
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tether_config::JwksConfig;
use tracing::{info, warn};

use crate::auth::{KeyError, PublicKey};
use crate::metrics::label;

/// Largest JWKS document accepted: real ones are a few KiB; a provider answering
/// megabytes is broken (or hostile) and must not fill the gateway's memory.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Why a fetch did not produce a key set. The previous keys stay in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Connect, TLS or I/O failure, including the timeout.
    #[error("fetching {url}: {message}")]
    Request {
        /// The JWKS URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The provider answered with another status than 200.
    #[error("fetching {url}: HTTP {status}")]
    Status {
        /// The JWKS URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The body is not a usable JWKS (not JSON, no usable key, too large).
    #[error("{url}: {message}")]
    Body {
        /// The JWKS URL.
        url: String,
        /// What is wrong with it.
        message: String,
    },
}

impl JwksError {
    /// The metric label of this failure.
    pub fn kind(&self) -> &'static str {
        match self {
            JwksError::Request { message, .. } if message.contains("timed out") => "timeout",
            JwksError::Request { .. } => "request",
            JwksError::Status { .. } => "status",
            JwksError::Body { .. } => "body",
        }
    }
}

/// Whether a fetch may run now: the first always, later ones at least `min_interval`
/// after the previous attempt (successful or not).
pub fn fetch_allowed(last_attempt: Option<Instant>, now: Instant, min_interval: Duration) -> bool {
    last_attempt.is_none_or(|last| now.saturating_duration_since(last) >= min_interval)
}

/// Whether keys last fetched at `last_success` are too old to check tokens with.
pub fn is_stale(last_success: Option<Instant>, now: Instant, max_stale: Duration) -> bool {
    last_success.is_none_or(|ok| now.saturating_duration_since(ok) > max_stale)
}

/// What happened to the fetches so far (for the verifier's decisions, logs and tests).
#[derive(Debug, Clone, Default)]
pub struct FetchState {
    /// When the last fetch started.
    pub last_attempt: Option<Instant>,
    /// When the last successful fetch ended.
    pub last_success: Option<Instant>,
    /// The last failure, cleared by a success.
    pub last_error: Option<JwksError>,
    /// Fetches started, ever.
    pub attempts: u64,
    /// Fetches that failed, ever.
    pub failures: u64,
}

/// The remote key source: the URL, its HTTP client and the fetch bookkeeping.
pub struct Remote {
    config: JwksConfig,
    http: reqwest::Client,
    /// Held for the whole fetch: concurrent handshakes naming the same new `kid` wait
    /// for one fetch instead of each starting one.
    fetching: tokio::sync::Mutex<()>,
    state: Mutex<FetchState>,
    /// `tether.jwks.fetches`, by result.
    fetches: Counter<u64>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

/// The roots a JWKS fetch trusts: the system's (honouring `SSL_CERT_FILE` and
/// `SSL_CERT_DIR`) plus `caFile`'s.
fn client_tls(config: &JwksConfig) -> Result<rustls::ClientConfig, KeyError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are not fatal: a private CA in `caFile` may be
    // all this provider needs.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.clone(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                KeyError::Invalid(format!("{}: not PEM certificates: {e}", path.display()))
            })?;
        if certs.is_empty() {
            return Err(KeyError::Invalid(format!(
                "{}: no certificate in auth.jwt.jwks.caFile",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                KeyError::Invalid(format!("{}: bad CA certificate: {e}", path.display()))
            })?;
        }
    }
    if roots.is_empty() {
        return Err(KeyError::Invalid(
            "auth.jwt.jwks: no trusted CA (no system roots and no caFile)".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KeyError::Invalid(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The usable public keys of a fetched JWKS. Keys this gateway cannot use (another key
/// type, a symmetric key) are skipped, as providers publish keys for other consumers
/// too; a set with none usable is an error.
pub fn parse(url: &str, body: &[u8]) -> Result<Vec<PublicKey>, JwksError> {
    let bad = |message: String| JwksError::Body {
        url: url.to_owned(),
        message,
    };
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(body)
        .map_err(|e| bad(format!("not a JWKS document ({{\"keys\":[...]}}): {e}")))?;
    let keys: Vec<PublicKey> = set
        .keys
        .iter()
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            matches!(key.family(), AlgorithmFamily::Rsa | AlgorithmFamily::Ec).then(|| PublicKey {
                kid: jwk.common.key_id.clone(),
                key,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(bad(format!(
            "no usable RSA or EC P-256 key among {} keys",
            set.keys.len()
        )));
    }
    Ok(keys)
}

impl Remote {
    /// A remote source for `config`; no fetch yet.
    pub fn new(config: &JwksConfig) -> Result<Self, KeyError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(client_tls(config)?)
            .https_only(true)
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| KeyError::Invalid(format!("auth.jwt.jwks: HTTP client: {e}")))?;
        let fetches = opentelemetry::global::meter("tether-gateway")
            .u64_counter("tether.jwks.fetches")
            .with_description("JWKS fetches by result (ok, or why it failed)")
            .build();
        Ok(Self {
            config: config.clone(),
            http,
            fetching: tokio::sync::Mutex::new(()),
            state: Mutex::new(FetchState::default()),
            fetches,
        })
    }

    /// The settings.
    pub fn config(&self) -> &JwksConfig {
        &self.config
    }

    /// A copy of the fetch bookkeeping.
    pub fn state(&self) -> FetchState {
        self.state.lock().clone()
    }

    /// Whether the keys are past `maxStaleSeconds` since the last good fetch.
    pub fn stale(&self, now: Instant) -> bool {
        is_stale(
            self.state.lock().last_success,
            now,
            Duration::from_secs(self.config.max_stale_seconds),
        )
    }

    /// Fetches the key set unless one was fetched less than `minRefreshIntervalSeconds`
    /// ago. `Ok(None)`: skipped by the rate limit (a concurrent caller may just have
    /// fetched — check the keys again).
    pub async fn fetch(&self) -> Result<Option<Vec<PublicKey>>, JwksError> {
        let _one_at_a_time = self.fetching.lock().await;
        {
            let mut state = self.state.lock();
            let now = Instant::now();
            let min = Duration::from_secs(self.config.min_refresh_interval_seconds);
            if !fetch_allowed(state.last_attempt, now, min) {
                return Ok(None);
            }
            state.last_attempt = Some(now);
            state.attempts += 1;
        }
        let result = self.get().await;
        let mut state = self.state.lock();
        match &result {
            Ok(keys) => {
                if state.last_error.is_some() || state.last_success.is_none() {
                    info!(url = %self.config.url, keys = keys.len(), "JWKS fetched");
                }
                state.last_success = Some(Instant::now());
                state.last_error = None;
                self.fetches.add(1, &label("result", "ok"));
            }
            Err(e) => {
                warn!(%e, "JWKS fetch failed; keeping the previous keys");
                state.failures += 1;
                state.last_error = Some(e.clone());
                self.fetches.add(1, &label("result", e.kind()));
            }
        }
        result.map(Some)
    }

    async fn get(&self) -> Result<Vec<PublicKey>, JwksError> {
        let url = &self.config.url;
        let request = |e: reqwest::Error| JwksError::Request {
            url: url.clone(),
            // reqwest's Display omits the cause (the TLS or connect error); the chain
            // is what tells an operator what to fix.
            message: error_chain(&e),
        };
        let mut response = self
            .http
            .get(url)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(request)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(JwksError::Status {
                url: url.clone(),
                status: response.status().as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(JwksError::Body {
                    url: url.clone(),
                    message: format!("larger than {MAX_JWKS_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        parse(url, &body)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_are_rate_limited_from_the_previous_attempt() {
        let t0 = Instant::now();
        let min = Duration::from_secs(10);
        assert!(fetch_allowed(None, t0, min));
        assert!(!fetch_allowed(Some(t0), t0 + Duration::from_secs(9), min));
        assert!(fetch_allowed(Some(t0), t0 + Duration::from_secs(10), min));
        // A clock that went backwards (another thread's `now`) does not allow a fetch.
        assert!(!fetch_allowed(Some(t0 + Duration::from_secs(1)), t0, min));
    }

    #[test]
    fn keys_go_stale_only_after_the_bound() {
        let t0 = Instant::now();
        let max = Duration::from_secs(60);
        assert!(is_stale(None, t0, max), "never fetched: nothing to use");
        assert!(!is_stale(Some(t0), t0 + Duration::from_secs(60), max));
        assert!(is_stale(Some(t0), t0 + Duration::from_secs(61), max));
    }

    #[test]
    fn garbage_and_unusable_sets_are_errors() {
        let err = parse("https://idp", b"<html>oops</html>").unwrap_err();
        assert!(matches!(err, JwksError::Body { .. }) && err.to_string().contains("not a JWKS"));
        let err = parse("https://idp", br#"{"keys":[]}"#).unwrap_err();
        assert!(err.to_string().contains("no usable"), "{err}");
        // A symmetric key is never taken from a JWKS URL.
        let oct =
            br#"{"keys":[{"kty":"oct","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0","kid":"s"}]}"#;
        assert!(parse("https://idp", oct).is_err());
        let jwks = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwks.json"),
        )
        .unwrap();
        let keys = parse("https://idp", &jwks).unwrap();
        assert_eq!(keys.len(), 3);
    }
}

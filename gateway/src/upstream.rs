//! Agent → backend: events POSTed to the tenant's upstream URL.
//!
//! Each POST body is one JSON event, signed with HMAC-SHA256 over
//! `"{timestamp}.{body}"` (the timestamp is sent too, so a receiver can refuse replays).
//! A 2xx answer acknowledges the event; anything else (or a timeout) is a failure the
//! agent sees as `nack` and retries — delivery is at-least-once, and the message id is
//! sent as `Idempotency-Key` so the backend can deduplicate.
//!
//! A hostile or broken upstream cannot hold the gateway: every POST has a deadline,
//! waits for a pod-wide slot at most `queueTimeoutMs`, is not redirected (a 3xx is a
//! failure, so an upstream cannot bounce signed events elsewhere), and its answer is
//! read up to `limits.maxMessageBytes` only. Errors carry detail for logs; agents see
//! only [`UpstreamError::agent_message`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tether_config::{UpstreamConfig, UpstreamEvent};
use tether_protocol::RawValue;
use tokio::sync::Semaphore;

use crate::auth::KeyError;

/// Header carrying the signing timestamp (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-tether-timestamp";
/// Header carrying `v1=<hex hmac>`.
pub const SIGNATURE_HEADER: &str = "x-tether-signature";
/// Shortest HMAC key accepted (the output size of SHA-256).
pub const MIN_SECRET_BYTES: usize = 32;

/// Why an event was not accepted by the upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No upstream is configured, or it does not take this event kind.
    #[error("no upstream configured for agent messages")]
    NotConfigured,
    /// The upstream answered with a non-2xx status.
    #[error("upstream answered {status}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// From `Retry-After`, in milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// The upstream could not be reached or did not answer in time.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// Every pod-wide slot stayed busy for `queueTimeoutMs`, or the connection has
    /// `limits.maxUpstreamInFlight` messages waiting already.
    #[error("too many upstream calls in flight")]
    Overloaded,
    /// The upstream's answer exceeded `limits.maxMessageBytes`.
    #[error("upstream answer exceeds {0} bytes")]
    TooLarge(usize),
}

impl UpstreamError {
    /// What an agent is told: a fixed text per kind of failure. The upstream's URL and
    /// the HTTP client's error text stay in the gateway's logs.
    pub fn agent_message(&self) -> String {
        match self {
            UpstreamError::NotConfigured => "no upstream receives agent messages".into(),
            UpstreamError::Rejected { status, .. } => format!("upstream answered {status}"),
            UpstreamError::Unreachable(_) => "upstream unreachable".into(),
            UpstreamError::Overloaded => "too many messages in flight; retry later".into(),
            UpstreamError::TooLarge(_) => "upstream answer too large".into(),
        }
    }
}

/// One event, as POSTed.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    /// `message`, `request`, `connect`, `disconnect` or `expired` (a durable push).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The agent.
    pub agent_id: &'a str,
    /// Message id (idempotency key), for `message` and `request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    /// JSON payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    /// Base64 payload of a binary frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
}

/// Signs `"{timestamp}.{body}"`; returns the header value `v1=<hex>`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The upstream client.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    url: Arc<str>,
    secret: Option<Arc<[u8]>>,
    events: Vec<UpstreamEvent>,
    in_flight: Arc<Semaphore>,
    queue_timeout: Duration,
    max_answer_bytes: usize,
}

impl Upstream {
    /// A client for the configured upstream whose answers may be `max_answer_bytes`
    /// long at most.
    pub fn new(config: &UpstreamConfig, max_answer_bytes: usize) -> Result<Self, KeyError> {
        let secret = match &config.secret_file {
            Some(path) => {
                let mut key = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: path.clone(),
                    source,
                })?;
                while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
                    key.pop();
                }
                if key.len() < MIN_SECRET_BYTES {
                    return Err(KeyError::Invalid(format!(
                        "{}: the upstream HMAC key needs at least {MIN_SECRET_BYTES} bytes",
                        path.display()
                    )));
                }
                Some(Arc::from(key))
            }
            None => None,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| KeyError::Invalid(format!("upstream client: {e}")))?;
        Ok(Self {
            client,
            url: config.url.as_str().into(),
            secret,
            events: config.events.clone(),
            in_flight: Arc::new(Semaphore::new(config.max_concurrency)),
            queue_timeout: Duration::from_millis(config.queue_timeout_ms),
            max_answer_bytes,
        })
    }

    /// Whether this event kind is forwarded.
    pub fn wants(&self, event: UpstreamEvent) -> bool {
        self.events.contains(&event)
    }

    /// POSTs one event; returns the response body on 2xx.
    #[tracing::instrument(level = "debug", skip_all, fields(kind = event.kind, agent = event.agent_id))]
    pub async fn post(&self, event: &Event<'_>) -> Result<Bytes, UpstreamError> {
        // Bounded concurrency: a slow backend makes agents wait for acks instead of
        // piling up unbounded requests in this process; bounded waiting, so the wait
        // itself cannot pile up either.
        let _permit = tokio::time::timeout(self.queue_timeout, self.in_flight.acquire())
            .await
            .map_err(|_| UpstreamError::Overloaded)?
            .map_err(|_| UpstreamError::Unreachable("shutting down".into()))?;
        // Serialized only now: waiters hold no copy of their payload.
        let body = serde_json::to_vec(event).expect("events always serialize");
        let timestamp = crate::hub::unix_now();
        let mut request = self
            .client
            .post(&*self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string());
        if let Some(id) = event.id {
            request = request.header("idempotency-key", id);
        }
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, timestamp, &body));
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after_ms = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| s * 1000);
            return Err(UpstreamError::Rejected {
                status: status.as_u16(),
                retry_after_ms,
            });
        }
        let limit = self.max_answer_bytes;
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(UpstreamError::TooLarge(limit));
        }
        let mut response = response;
        let mut answer = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?
        {
            if answer.len() + chunk.len() > limit {
                return Err(UpstreamError::TooLarge(limit));
            }
            answer.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_hmac_key_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hmac");
        std::fs::write(&path, "too-short\n").unwrap();
        let config = UpstreamConfig {
            url: "http://127.0.0.1:9/events".into(),
            secret_file: Some(path.clone()),
            timeout_ms: 1000,
            events: vec![UpstreamEvent::Message],
            max_concurrency: 1,
            queue_timeout_ms: 1000,
        };
        let err = Upstream::new(&config, 1024).unwrap_err().to_string();
        assert!(err.contains("32 bytes"), "{err}");
        std::fs::write(&path, "k".repeat(32)).unwrap();
        assert!(Upstream::new(&config, 1024).is_ok());
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            sign(b"key", 1_700_000_000, br#"{"a":1}"#),
            "v1=a438e398bfafc57e4396bb7fc2304422f0f768e965d073ca313cb52e22e6ad03"
        );
    }
}

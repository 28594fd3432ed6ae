//! Pure decisions of the connection loop: when to reconnect, when to refresh the token,
//! whether a refused `send` is worth retrying. No I/O and no clocks of their own (the
//! caller passes `now` and a random source), so every rule is unit-tested here.

use std::time::Duration;

use rand::Rng;
use tether_protocol::{CloseCode, ErrorCode};

/// Exponential back-off with full jitter: the n-th retry waits a uniformly random time in
/// `[0, min(cap, base * 2^n)]`. Full jitter spreads a reconnect storm over the whole
/// window instead of synchronising clients on the same exponential steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Window of the first retry.
    pub base: Duration,
    /// Largest window.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The upper bound of the window for retry number `attempt` (0-based).
    pub fn window(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random delay in `[0, window(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let window = self.window(attempt).as_millis() as u64;
        Duration::from_millis(rng.random_range(0..=window))
    }
}

/// How one connection attempt or session ended, as far as the reconnect decision cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The gateway answered the upgrade request with an HTTP error.
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The gateway's reason: the `message` of its JSON error body, or the body's
        /// text (empty when it sent none).
        message: String,
    },
    /// No HTTP answer: the TCP connect was refused, the name did not resolve, TLS
    /// failed, or nothing answered before the connect deadline.
    Unreachable {
        /// What failed, as the transport reported it.
        cause: String,
    },
    /// The gateway closed the session with a close frame.
    Closed {
        /// The close code.
        code: u16,
        /// The delay of a `reconnect` hint received before the close, if any.
        hint: Option<Duration>,
    },
    /// The transport failed without a close frame: refused TCP connect, reset, EOF, a
    /// handshake timeout, or no pong in time (dead server).
    Lost {
        /// The delay of a `reconnect` hint received before the loss, if any.
        hint: Option<Duration>,
    },
    /// The token provider failed to produce a token.
    TokenUnavailable,
    /// The TLS handshake failed on a certificate: the gateway's is not trusted or not
    /// valid for its name, or the gateway refused the agent's (mTLS).
    CertificateRejected {
        /// What was wrong, in words.
        cause: String,
    },
    /// The HTTP proxy answered `CONNECT` with an error status.
    ProxyRefused {
        /// The proxy's status.
        status: u16,
        /// Which proxy refused which tunnel, with its status line.
        line: String,
    },
}

/// Why the agent stopped for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopReason {
    /// The application closed the agent.
    #[error("closed by the application")]
    Closed,
    /// The gateway refused the token (HTTP 401/403): retrying the same credentials would
    /// only hammer the gateway.
    #[error("authentication rejected with HTTP {status}{}", reason(message))]
    AuthRejected {
        /// 401 or 403.
        status: u16,
        /// The gateway's reason (its error body's `message`).
        message: String,
    },
    /// The gateway refused the upgrade with a status no retry can change (404 for a
    /// wrong path, 400, 405, 426 for a request that is not a WebSocket upgrade ...):
    /// the URL or the client is wrong, not the moment.
    #[error(
        "the gateway refused the connection with HTTP {status}{}",
        reason(message)
    )]
    HttpRejected {
        /// The HTTP status.
        status: u16,
        /// The gateway's reason (its error body's `message`, or the body's text).
        message: String,
    },
    /// The TLS handshake failed on a certificate (untrusted issuer, wrong name, expired,
    /// or a client certificate the gateway refuses): the same certificates fail every
    /// retry.
    #[error("TLS: {message}")]
    Tls {
        /// What was wrong, in words.
        message: String,
    },
    /// The HTTP proxy refused the tunnel with a status no retry can change (407 for
    /// missing or wrong credentials, 403 for a destination it forbids ...).
    #[error("the proxy refused the tunnel with HTTP {status}: {line}")]
    ProxyRejected {
        /// The proxy's status.
        status: u16,
        /// Which proxy refused which tunnel, with its status line.
        line: String,
    },
    /// The gateway closed with a code that forbids reconnecting (token invalid, replaced
    /// by a newer connection, disconnected by a backend).
    #[error("closed by the gateway with code {code}, which forbids reconnecting")]
    Refused {
        /// The close code.
        code: u16,
    },
}

fn reason(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Rejected { status, message } => {
                write!(f, "the gateway answered HTTP {status}{}", reason(message))
            }
            Ended::Unreachable { cause } => write!(f, "could not reach the gateway: {cause}"),
            Ended::Closed { code, hint } => {
                write!(f, "the gateway closed the session with code {code}")?;
                match hint {
                    Some(hint) => write!(f, " after asking to reconnect in {hint:?}"),
                    None => Ok(()),
                }
            }
            Ended::Lost { .. } => f.write_str("the connection was lost"),
            Ended::TokenUnavailable => f.write_str("the token provider failed"),
            Ended::CertificateRejected { cause } => write!(f, "TLS: {cause}"),
            Ended::ProxyRefused { status, line } => {
                write!(f, "the proxy refused the tunnel with HTTP {status}: {line}")
            }
        }
    }
}

/// Whether an HTTP refusal of the upgrade may succeed on a later attempt. Server errors,
/// 408 and 429 are moments; every other 4xx (and any status that is neither an error nor
/// 101, such as a redirect or a 200 from something that is not a gateway) says the URL,
/// the credentials or the client are wrong, and retrying would repeat it forever.
pub fn status_is_retryable(status: u16) -> bool {
    matches!(status, 408 | 429) || (500..600).contains(&status)
}

/// What to do after a session or attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Connect again after this delay.
    Reconnect(Duration),
    /// Give up.
    Stop(StopReason),
}

/// Reconnect rules beyond the plain back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// The back-off used for ordinary failures.
    pub backoff: Backoff,
    /// Added to the back-off when the gateway says it is overloaded (close 1013, HTTP
    /// 503/429): coming back at once would add to the overload.
    pub overload_floor: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            overload_floor: Duration::from_secs(1),
        }
    }
}

/// Decides whether and when to reconnect. `attempt` counts consecutive failures since
/// the last session that got a `welcome` (0 for the first retry).
pub fn decide(
    ended: &Ended,
    attempt: u32,
    policy: &ReconnectPolicy,
    rng: &mut impl Rng,
) -> Decision {
    let backoff = policy.backoff.delay(attempt, rng);
    match *ended {
        Ended::Rejected {
            status: status @ (401 | 403),
            ref message,
        } => Decision::Stop(StopReason::AuthRejected {
            status,
            message: message.clone(),
        }),
        Ended::Rejected {
            status: 503 | 429, ..
        } => Decision::Reconnect(policy.overload_floor + backoff),
        Ended::Rejected {
            status,
            ref message,
        } if !status_is_retryable(status) => Decision::Stop(StopReason::HttpRejected {
            status,
            message: message.clone(),
        }),
        Ended::CertificateRejected { ref cause } => Decision::Stop(StopReason::Tls {
            message: cause.clone(),
        }),
        Ended::ProxyRefused { status, ref line } if !status_is_retryable(status) => {
            Decision::Stop(StopReason::ProxyRejected {
                status,
                line: line.clone(),
            })
        }
        Ended::Rejected { .. }
        | Ended::Unreachable { .. }
        | Ended::TokenUnavailable
        | Ended::ProxyRefused { .. } => Decision::Reconnect(backoff),
        Ended::Closed { code, hint } => match CloseCode::from_code(code) {
            Some(known) if !known.should_reconnect() => {
                Decision::Stop(StopReason::Refused { code })
            }
            // The gateway already jittered its hint across its agents; honour it as is.
            _ if hint.is_some() => Decision::Reconnect(hint.unwrap_or_default()),
            Some(CloseCode::TryAgainLater) => Decision::Reconnect(policy.overload_floor + backoff),
            // The token ran out: a fresh one fixes it, so come back without waiting for
            // the back-off to grow (still jittered: many agents may share an expiry).
            Some(CloseCode::TokenExpired) => Decision::Reconnect(policy.backoff.delay(0, rng)),
            _ => Decision::Reconnect(backoff),
        },
        Ended::Lost { hint: Some(hint) } => Decision::Reconnect(hint),
        Ended::Lost { hint: None } => Decision::Reconnect(backoff),
    }
}

/// How long to wait before refreshing a token that expires at `expires_at` (Unix
/// seconds), seen at `now` (Unix seconds). The refresh happens `margin` before expiry,
/// but never later than half of the remaining life, so that short-lived tokens still
/// leave time for a slow token provider and a retry.
pub fn refresh_delay(now: u64, expires_at: u64, margin: Duration) -> Duration {
    let remaining = Duration::from_secs(expires_at.saturating_sub(now));
    let lead = margin.min(remaining / 2);
    remaining - lead
}

/// Whether a `nack` with this code may succeed later. Size and shape errors never will;
/// everything else (upstream down, timeout, rate limit, overload) is transient.
pub fn nack_is_retryable(code: ErrorCode) -> bool {
    !matches!(code, ErrorCode::BadRequest | ErrorCode::TooLarge)
}

/// The delay before re-sending a `send` that was refused: the gateway's `retry_after_ms`
/// when it gave one, otherwise the back-off for this attempt.
pub fn resend_delay(
    retry_after_ms: Option<u64>,
    attempt: u32,
    backoff: &Backoff,
    rng: &mut impl Rng,
) -> Duration {
    match retry_after_ms {
        Some(ms) => Duration::from_millis(ms),
        None => backoff.delay(attempt, rng),
    }
}

/// The ids of the last `capacity` pushes handled, so a redelivered push (a durable
/// push whose `ack` was lost with the connection, or a backend's retry with the same
/// `Idempotency-Key`) is acknowledged without reaching the handler twice. Bounded: the
/// oldest id is forgotten first.
#[derive(Debug)]
pub struct DedupWindow {
    capacity: usize,
    order: std::collections::VecDeque<String>,
    seen: std::collections::HashSet<String>,
}

impl DedupWindow {
    /// Remembers at most `capacity` ids (0 turns de-duplication off).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: std::collections::VecDeque::new(),
            seen: std::collections::HashSet::new(),
        }
    }

    /// Whether `id` was handled within the window.
    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    /// Records a handled id, forgetting the oldest beyond the capacity.
    pub fn insert(&mut self, id: &str) {
        if self.capacity == 0 || !self.seen.insert(id.to_owned()) {
            return;
        }
        self.order.push_back(id.to_owned());
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn backoff_window_doubles_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert_eq!(b.window(0), Duration::from_millis(100));
        assert_eq!(b.window(1), Duration::from_millis(200));
        assert_eq!(b.window(3), Duration::from_millis(800));
        assert_eq!(b.window(4), Duration::from_secs(1));
        assert_eq!(b.window(200), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_covers_the_window() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        };
        let mut rng = rng();
        let delays: Vec<_> = (0..2000).map(|_| b.delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        // Full jitter: both ends of the window are used, not only the upper half.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(700)));
    }

    #[test]
    fn auth_failures_stop() {
        let p = ReconnectPolicy::default();
        for status in [401, 403] {
            let message = "forbidden: token has no tenant claim".to_owned();
            let ended = Ended::Rejected {
                status,
                message: message.clone(),
            };
            assert_eq!(
                decide(&ended, 0, &p, &mut rng()),
                Decision::Stop(StopReason::AuthRejected { status, message })
            );
        }
        for code in [4002, 4003, 4005] {
            assert_eq!(
                decide(
                    &Ended::Closed {
                        code,
                        hint: Some(Duration::from_secs(1))
                    },
                    0,
                    &p,
                    &mut rng()
                ),
                Decision::Stop(StopReason::Refused { code })
            );
        }
    }

    #[test]
    fn certificate_failures_and_final_proxy_refusals_stop_transient_ones_retry() {
        let p = ReconnectPolicy::default();
        let cause = "invalid peer certificate: UnknownIssuer".to_owned();
        assert_eq!(
            decide(
                &Ended::CertificateRejected {
                    cause: cause.clone()
                },
                0,
                &p,
                &mut rng()
            ),
            Decision::Stop(StopReason::Tls { message: cause })
        );
        for status in [407, 403, 400] {
            let line = format!("proxy:3128 answered CONNECT gw:443 with `HTTP/1.1 {status} x`");
            assert_eq!(
                decide(
                    &Ended::ProxyRefused {
                        status,
                        line: line.clone()
                    },
                    0,
                    &p,
                    &mut rng()
                ),
                Decision::Stop(StopReason::ProxyRejected { status, line })
            );
        }
        for status in [502, 503, 504] {
            let ended = Ended::ProxyRefused {
                status,
                line: String::new(),
            };
            assert!(matches!(
                decide(&ended, 0, &p, &mut rng()),
                Decision::Reconnect(_)
            ));
        }
    }

    fn rejected(status: u16) -> Ended {
        Ended::Rejected {
            status,
            message: String::new(),
        }
    }

    #[test]
    fn a_wrong_url_or_client_stops_with_the_gateways_reason() {
        let p = ReconnectPolicy::default();
        for status in [400, 404, 405, 426, 200, 301] {
            let message = format!("reason {status}");
            let ended = Ended::Rejected {
                status,
                message: message.clone(),
            };
            assert_eq!(
                decide(&ended, 0, &p, &mut rng()),
                Decision::Stop(StopReason::HttpRejected { status, message })
            );
        }
        let stop = StopReason::HttpRejected {
            status: 404,
            message: "agents connect at GET /v1/connect".into(),
        };
        assert_eq!(
            stop.to_string(),
            "the gateway refused the connection with HTTP 404: agents connect at GET /v1/connect"
        );
        let bare = StopReason::AuthRejected {
            status: 401,
            message: String::new(),
        };
        assert_eq!(bare.to_string(), "authentication rejected with HTTP 401");
    }

    #[test]
    fn ended_says_why_in_words() {
        let cases = [
            (
                Ended::Rejected {
                    status: 503,
                    message: "gateway is draining".into(),
                },
                "the gateway answered HTTP 503: gateway is draining",
            ),
            (
                Ended::Unreachable {
                    cause: "Connection refused (os error 111)".into(),
                },
                "could not reach the gateway: Connection refused (os error 111)",
            ),
            (rejected(502), "the gateway answered HTTP 502"),
        ];
        for (ended, text) in cases {
            assert_eq!(ended.to_string(), text);
        }
    }

    #[test]
    fn reconnect_hint_is_honoured_exactly() {
        let p = ReconnectPolicy::default();
        let hint = Some(Duration::from_millis(1234));
        for ended in [
            Ended::Closed { code: 1012, hint },
            Ended::Closed { code: 1001, hint },
            Ended::Lost { hint },
        ] {
            assert_eq!(
                decide(&ended, 5, &p, &mut rng()),
                Decision::Reconnect(Duration::from_millis(1234)),
                "{ended:?}"
            );
        }
    }

    #[test]
    fn overload_backs_off_above_the_floor() {
        let p = ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
            },
            overload_floor: Duration::from_secs(2),
        };
        let mut rng = rng();
        for ended in [
            Ended::Closed {
                code: 1013,
                hint: None,
            },
            rejected(503),
            rejected(429),
        ] {
            for attempt in 0..4 {
                match decide(&ended, attempt, &p, &mut rng) {
                    Decision::Reconnect(d) => {
                        assert!(d >= Duration::from_secs(2), "{ended:?} {d:?}");
                        assert!(d <= Duration::from_secs(2) + p.backoff.window(attempt));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn transient_failures_use_the_growing_backoff() {
        let p = ReconnectPolicy::default();
        let mut rng = rng();
        for ended in [
            Ended::Lost { hint: None },
            Ended::Closed {
                code: 1006,
                hint: None,
            },
            Ended::Closed {
                code: 4007,
                hint: None,
            },
            rejected(502),
            rejected(500),
            rejected(408),
            Ended::Unreachable {
                cause: "Connection refused (os error 111)".into(),
            },
            Ended::TokenUnavailable,
        ] {
            match decide(&ended, 6, &p, &mut rng) {
                Decision::Reconnect(d) => assert!(d <= p.backoff.window(6)),
                other => panic!("{ended:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn token_expiry_reconnects_within_the_first_window() {
        let p = ReconnectPolicy::default();
        match decide(
            &Ended::Closed {
                code: 4001,
                hint: None,
            },
            9,
            &p,
            &mut rng(),
        ) {
            Decision::Reconnect(d) => assert!(d <= p.backoff.base),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refresh_happens_before_expiry() {
        let margin = Duration::from_secs(60);
        // Long-lived token: refresh one margin before expiry.
        assert_eq!(refresh_delay(1000, 4600, margin), Duration::from_secs(3540));
        // Short-lived token: halfway through its remaining life.
        assert_eq!(refresh_delay(1000, 1010, margin), Duration::from_secs(5));
        // Already expired: at once.
        assert_eq!(refresh_delay(2000, 1000, margin), Duration::ZERO);
    }

    #[test]
    fn only_transient_nacks_are_retried() {
        assert!(!nack_is_retryable(ErrorCode::BadRequest));
        assert!(!nack_is_retryable(ErrorCode::TooLarge));
        for code in [
            ErrorCode::UpstreamError,
            ErrorCode::Timeout,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::Overloaded,
            ErrorCode::Unknown,
        ] {
            assert!(nack_is_retryable(code), "{code:?}");
        }
    }

    #[test]
    fn resend_prefers_the_gateway_hint() {
        let b = Backoff::default();
        assert_eq!(
            resend_delay(Some(700), 3, &b, &mut rng()),
            Duration::from_millis(700)
        );
        assert!(resend_delay(None, 0, &b, &mut rng()) <= b.base);
    }

    #[test]
    fn the_dedup_window_forgets_the_oldest_id_first() {
        let mut w = DedupWindow::new(2);
        w.insert("a");
        w.insert("b");
        w.insert("a"); // already there: no reordering, no growth
        assert!(w.contains("a") && w.contains("b"));
        w.insert("c");
        assert!(!w.contains("a"), "the oldest is forgotten");
        assert!(w.contains("b") && w.contains("c"));
        assert_eq!(w.len(), 2);
        let mut off = DedupWindow::new(0);
        off.insert("a");
        assert!(!off.contains("a") && off.is_empty());
    }
}

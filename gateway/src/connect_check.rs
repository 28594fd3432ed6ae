//! The connect check (`auth.connectCheck`): before the upgrade, the gateway asks the
//! tenant's backend whether to admit a verified agent, and applies its answer.
//!
//! ```text
//!  handshake ─► token ok, not revoked ─► cache (per agent id, cacheSeconds) ─hit─► answer
//!                                              │ miss
//!                                              ▼
//!             POST url {"agent_id","groups","tenant","jti"}   x-tether-timestamp,
//!                                                              x-tether-signature: v1=HMAC
//!             200 {"allow":true,"groups":[…]} ─► admit, groups added to the token's
//!             200 {"allow":false,"reason":…}  ─► 403 to the agent
//!             anything else, or timeoutMs     ─► onUnreachable: deny (503) | allow
//! ```
//!
//! Definite answers are cached per agent id; failures are not, so the next handshake
//! asks again. The decision ([`decide`]) is a pure function of the backend's outcome
//! and the policy.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tether_config::{ConnectCheckConfig, Unreachable};
use tracing::warn;

use crate::auth::{AgentIdentity, KeyError, MAX_GROUP_LEN, MAX_GROUPS, valid_name};
use crate::upstream::{MIN_SECRET_BYTES, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};

/// Most agents whose answer is cached; past it, answers are not cached until expired
/// entries are swept (a flood of distinct agent ids must not grow memory without bound).
pub const MAX_CACHED: usize = 100_000;
/// Longest `reason` passed on to the agent, in bytes.
pub const MAX_REASON_BYTES: usize = 200;
/// Largest answer read from the backend.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the gateway does with a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admit, adding these groups to the token's.
    Admit {
        /// Groups the backend added.
        groups: Vec<String>,
    },
    /// The backend refused the agent: 403 with its reason.
    Refuse {
        /// The backend's reason (sanitised, bounded).
        reason: String,
    },
    /// The backend could not answer and the policy is `deny`: 503.
    Unavailable,
}

/// The backend's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Answer {
    /// Whether to admit.
    pub allow: bool,
    /// Groups to add (admitted agents only).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Why not (refused agents only).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Why the backend gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// Unreachable or too slow.
    #[error("connect check unreachable: {0}")]
    Unreachable(String),
    /// Another status than 200.
    #[error("connect check answered {0}")]
    Status(u16),
    /// A body that is not an answer, or names invalid groups.
    #[error("connect check answer: {0}")]
    Body(String),
}

/// The decision for the backend's `outcome` under `policy`.
pub fn decide(outcome: &Result<Answer, CheckError>, policy: Unreachable) -> Decision {
    match outcome {
        Ok(answer) if answer.allow => Decision::Admit {
            groups: answer.groups.clone(),
        },
        Ok(answer) => Decision::Refuse {
            reason: sanitise(answer.reason.as_deref().unwrap_or("refused by the backend")),
        },
        Err(_) => match policy {
            Unreachable::Deny => Decision::Unavailable,
            Unreachable::Allow => Decision::Admit { groups: Vec::new() },
        },
    }
}

/// The reason as the agent sees it: printable, at most [`MAX_REASON_BYTES`].
fn sanitise(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_REASON_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// Checks the groups an answer adds: the token rules, and at most [`MAX_GROUPS`] with
/// the token's own.
fn check_groups(answer: &Answer) -> Result<(), CheckError> {
    if answer.groups.len() > MAX_GROUPS {
        return Err(CheckError::Body(format!("more than {MAX_GROUPS} groups")));
    }
    match answer.groups.iter().find(|g| !valid_name(g, MAX_GROUP_LEN)) {
        Some(bad) => Err(CheckError::Body(format!(
            "group {:?} is not 1..={MAX_GROUP_LEN} bytes without control characters",
            bad.escape_debug().to_string()
        ))),
        None => Ok(()),
    }
}

#[derive(Serialize)]
struct Query<'a> {
    agent_id: &'a str,
    groups: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<&'a str>,
}

/// The checker: HTTP client, key and the per-agent cache.
pub struct ConnectCheck {
    config: ConnectCheckConfig,
    http: reqwest::Client,
    secret: Vec<u8>,
    cache: Mutex<HashMap<String, (Decision, Instant)>>,
}

impl std::fmt::Debug for ConnectCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectCheck")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

impl ConnectCheck {
    /// A checker for `config`; reads its key.
    pub fn new(config: &ConnectCheckConfig) -> Result<Self, KeyError> {
        let mut secret = std::fs::read(&config.secret_file).map_err(|source| KeyError::Read {
            path: config.secret_file.clone(),
            source,
        })?;
        while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
            secret.pop();
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::Invalid(format!(
                "{}: the connect check's HMAC key needs at least {MIN_SECRET_BYTES} bytes",
                config.secret_file.display()
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            // A redirect would send the signed query elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| KeyError::Invalid(format!("auth.connectCheck: HTTP client: {e}")))?;
        Ok(Self {
            config: config.clone(),
            http,
            secret,
            cache: Mutex::default(),
        })
    }

    /// The decision for `identity` of tenant `tenant`: cached, else asked.
    pub async fn check(&self, identity: &AgentIdentity, tenant: Option<&str>) -> Decision {
        let now = Instant::now();
        if let Some((decision, until)) = self.cache.lock().get(&identity.agent_id)
            && *until > now
        {
            return decision.clone();
        }
        let outcome = self.ask(identity, tenant).await;
        if let Err(e) = &outcome {
            warn!(%e, agent = %identity.agent_id, policy = ?self.config.on_unreachable, "connect check failed");
        }
        let decision = decide(&outcome, self.config.on_unreachable);
        if outcome.is_ok() && self.config.cache_seconds > 0 {
            let until = now + Duration::from_secs(self.config.cache_seconds);
            let mut cache = self.cache.lock();
            if cache.len() >= MAX_CACHED {
                cache.retain(|_, (_, until)| *until > now);
            }
            if cache.len() < MAX_CACHED {
                cache.insert(identity.agent_id.clone(), (decision.clone(), until));
            }
        }
        decision
    }

    async fn ask(
        &self,
        identity: &AgentIdentity,
        tenant: Option<&str>,
    ) -> Result<Answer, CheckError> {
        let body = serde_json::to_vec(&Query {
            agent_id: &identity.agent_id,
            groups: &identity.groups,
            tenant,
            jti: identity.jti.as_deref(),
        })
        .expect("a query always serialises");
        let timestamp = crate::hub::unix_now();
        let mut response = self
            .http
            .post(&self.config.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(&self.secret, timestamp, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| CheckError::Unreachable(e.to_string()))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(CheckError::Status(response.status().as_u16()));
        }
        let mut text = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| CheckError::Unreachable(e.to_string()))?
        {
            if text.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CheckError::Body(format!(
                    "larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            text.extend_from_slice(&chunk);
        }
        let answer: Answer =
            serde_json::from_slice(&text).map_err(|e| CheckError::Body(e.to_string()))?;
        check_groups(&answer)?;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(allow: bool, groups: &[&str], reason: Option<&str>) -> Answer {
        Answer {
            allow,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            reason: reason.map(Into::into),
        }
    }

    #[test]
    fn answers_and_failures_map_to_decisions() {
        let admit = Ok(answer(true, &["ops"], None));
        assert_eq!(
            decide(&admit, Unreachable::Deny),
            Decision::Admit {
                groups: vec!["ops".into()]
            }
        );
        let refuse = Ok(answer(false, &[], Some("suspended\nfor billing")));
        assert_eq!(
            decide(&refuse, Unreachable::Allow),
            Decision::Refuse {
                reason: "suspendedfor billing".into()
            },
            "a refusal is a refusal whatever the policy; control characters dropped"
        );
        let down = Err(CheckError::Status(500));
        assert_eq!(decide(&down, Unreachable::Deny), Decision::Unavailable);
        assert_eq!(
            decide(&down, Unreachable::Allow),
            Decision::Admit { groups: vec![] }
        );
    }

    #[test]
    fn reasons_are_bounded_and_groups_checked() {
        let long = "é".repeat(500);
        assert!(sanitise(&long).len() <= MAX_REASON_BYTES);
        assert!(check_groups(&answer(true, &["ok"], None)).is_ok());
        assert!(check_groups(&answer(true, &["bad\u{0}"], None)).is_err());
        let many: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("g{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check_groups(&answer(true, &many, None)).is_err());
    }
}

//! Revoked agents and tokens: `POST /v1/agents/{id}/revoke` and
//! `POST /v1/tokens/{jti}/revoke` refuse an agent's (or one token's) connections until
//! a time, on every pod of the pool.
//!
//! ```text
//!  push API (any pod) ──> Router::revoke ──> KV tether-<ns>-revoked  (kept across restarts)
//!                                   └──────> publish <root>.revoke ──> every pod: Hub::revoke
//!  pod start / every resync ──> read the whole bucket ──> Hub::revoke for each entry
//! ```
//!
//! Each pod keeps the list in memory ([`Revocations`], in its hub) and checks it at the
//! handshake and on every `refresh`; a revocation reaching a pod closes that agent's
//! (or token's) connection there with 4008. Entries lapse on their own at `until`.
//!
//! The list itself is pure: what is revoked and whether an identity is, given `now`.

use std::collections::HashMap;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revoked {
    /// Every token of this agent id (`sub`).
    Agent(String),
    /// The token with this id (`jti`), whichever agent it names.
    Token(String),
}

/// One revocation: who, and until when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The agent or token.
    #[serde(flatten)]
    pub revoked: Revoked,
    /// Unix seconds after which it no longer applies.
    pub until: u64,
}

/// The revocations a pod knows of.
#[derive(Debug, Default)]
pub struct Revocations {
    entries: RwLock<HashMap<Revoked, u64>>,
}

impl Revocations {
    /// Records `revocation` (a later `until` for the same name wins: revoking again
    /// can extend a revocation, never shorten it). Returns whether it changed anything.
    pub fn insert(&self, revocation: &Revocation, now: u64) -> bool {
        if revocation.until <= now {
            return false;
        }
        let mut entries = self.entries.write();
        let until = entries.entry(revocation.revoked.clone()).or_insert(0);
        if revocation.until > *until {
            *until = revocation.until;
            true
        } else {
            false
        }
    }

    /// Until when `agent` (or its token `jti`) is revoked, if it is at `now`.
    pub fn revoked_until(&self, agent: &str, jti: Option<&str>, now: u64) -> Option<u64> {
        let entries = self.entries.read();
        let by_agent = entries.get(&Revoked::Agent(agent.to_owned())).copied();
        let by_token = jti.and_then(|jti| entries.get(&Revoked::Token(jti.to_owned())).copied());
        by_agent.max(by_token).filter(|until| *until > now)
    }

    /// Forgets lapsed entries.
    pub fn prune(&self, now: u64) {
        self.entries.write().retain(|_, until| *until > now);
    }

    /// Entries in force or not yet pruned.
    pub fn len(&self) -> usize {
        self.entries.read().len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, until: u64) -> Revocation {
        Revocation {
            revoked: Revoked::Agent(id.into()),
            until,
        }
    }

    #[test]
    fn an_agent_or_its_token_is_revoked_until_the_time() {
        let list = Revocations::default();
        assert!(list.insert(&agent("a-1", 100), 10));
        assert!(list.insert(
            &Revocation {
                revoked: Revoked::Token("t-9".into()),
                until: 200
            },
            10
        ));
        assert_eq!(list.revoked_until("a-1", None, 50), Some(100));
        assert_eq!(
            list.revoked_until("a-1", None, 100),
            None,
            "lapsed at until"
        );
        assert_eq!(list.revoked_until("a-2", Some("t-9"), 50), Some(200));
        assert_eq!(list.revoked_until("a-1", Some("t-9"), 50), Some(200));
        assert_eq!(list.revoked_until("a-2", Some("t-8"), 50), None);
    }

    #[test]
    fn revoking_again_extends_never_shortens() {
        let list = Revocations::default();
        assert!(list.insert(&agent("a", 100), 0));
        assert!(!list.insert(&agent("a", 50), 0));
        assert_eq!(list.revoked_until("a", None, 60), Some(100));
        assert!(list.insert(&agent("a", 150), 0));
        assert_eq!(list.revoked_until("a", None, 120), Some(150));
        // Already lapsed: nothing recorded.
        assert!(!list.insert(&agent("b", 5), 10));
        list.prune(200);
        assert!(list.is_empty());
    }

    #[test]
    fn the_wire_form_names_one_of_agent_or_jti() {
        let r = agent("a-1", 7);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"agent":"a-1","until":7}"#);
        assert_eq!(serde_json::from_str::<Revocation>(&text).unwrap(), r);
        let t: Revocation = serde_json::from_str(r#"{"token":"j","until":9}"#).unwrap();
        assert_eq!(t.revoked, Revoked::Token("j".into()));
        assert!(serde_json::from_str::<Revocation>(r#"{"until":9}"#).is_err());
    }
}

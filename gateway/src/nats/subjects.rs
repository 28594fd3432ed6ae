//! Subject, key and bucket names: pure functions, no I/O.
//!
//! Everything a tenant or an agent controls (pool namespace, agent ids, group names,
//! pod names) is encoded into one *token* before it goes into a subject, a KV key or a
//! bucket name. A token contains only `[A-Za-z0-9-]` plus `_XX` escapes (one per UTF-8
//! byte, upper-case hex), so it can never contain `.` (a new subject level), `*` or `>`
//! (wildcards), whitespace (the protocol's separator) or anything a KV key or a stream
//! name refuses. The escape character itself is escaped, so the encoding is injective:
//! two different ids never share a token, and no id can widen a subscription.
//!
//! ```text
//!  tether.<ns>.pod.<pod>.<op>     requests for one pod (push, request, presence, ...)
//!  tether.<ns>.group.<group>      a group send, fanned out by every pod
//!  tether.<ns>.broadcast          a broadcast, fanned out by every pod
//!  tether.<ns>.durable.<agent>    an agent's durable queue (stream tether-<ns>-durable)
//!  KV tether-<ns>-agents  key a.<agent> → pod + connection epoch
//!  KV tether-<ns>-pods    key <pod>     → pod boot id
//!  KV tether-<ns>-messages key m.<agent>.<id> → durable message status
//! ```

use std::fmt::Write;

/// Encodes a name into a token safe for a subject level, a KV key and a stream name.
/// The empty string becomes `_` (no escape is a lone `_`).
pub fn token(name: &str) -> String {
    if name.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "_{byte:02X}");
        }
    }
    out
}

/// Decodes a [`token`]; `None` if it is not one.
pub fn untoken(token: &str) -> Option<String> {
    if token == "_" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => {
                let hex = token.get(i + 1..i + 3)?;
                let byte = u8::from_str_radix(hex, 16).ok()?;
                // Only the canonical (upper-case, needed) escape decodes, so a token has
                // exactly one spelling.
                if byte.is_ascii_alphanumeric() || byte == b'-' || hex != format!("{byte:02X}") {
                    return None;
                }
                out.push(byte);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'-' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The operations a pod answers on its own subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodOp {
    /// Queue a message for a local agent (answer: queued / not here / full).
    Push,
    /// Forward a request to a local agent and answer with its reply.
    Request,
    /// Presence of a local agent.
    Presence,
    /// Close a local agent's connection (push API `DELETE`).
    Disconnect,
    /// A newer connection of the agent registered elsewhere: close the older one here.
    Replace,
    /// A page of local agents.
    List,
    /// Liveness probe (used to detect dead pods left in the registry).
    Ping,
    /// A durable message was stored for a local agent: deliver its backlog.
    Kick,
}

impl PodOp {
    /// Every operation.
    pub const ALL: [PodOp; 8] = [
        PodOp::Push,
        PodOp::Request,
        PodOp::Presence,
        PodOp::Disconnect,
        PodOp::Replace,
        PodOp::List,
        PodOp::Ping,
        PodOp::Kick,
    ];

    /// The last subject level.
    pub fn as_str(self) -> &'static str {
        match self {
            PodOp::Push => "push",
            PodOp::Request => "request",
            PodOp::Presence => "presence",
            PodOp::Disconnect => "disconnect",
            PodOp::Replace => "replace",
            PodOp::List => "list",
            PodOp::Ping => "ping",
            PodOp::Kick => "kick",
        }
    }

    /// Parses the last subject level.
    pub fn parse(level: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == level)
    }
}

/// Names of one pool's subjects, keys and buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// `tether.<ns>`
    root: String,
    ns: String,
}

impl Subjects {
    /// Names for the pool namespace `namespace` (a tenant id or an explicit namespace).
    pub fn new(namespace: &str) -> Self {
        let ns = token(namespace);
        Self {
            root: format!("tether.{ns}"),
            ns,
        }
    }

    /// The prefix of this pool's reply subjects (`_INBOX.tether.<ns>`): a NATS account
    /// or user for the pool can then be allowed `_INBOX.tether.<ns>.>` only, instead of
    /// every client's `_INBOX.>` (docs/security.md has the whole permission set).
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX.{}", self.root)
    }

    /// The subject of one operation on one pod.
    pub fn pod(&self, pod: &str, op: PodOp) -> String {
        format!("{}.pod.{}.{}", self.root, token(pod), op.as_str())
    }

    /// What a pod subscribes to for its own operations.
    pub fn pod_wildcard(&self, pod: &str) -> String {
        format!("{}.pod.{}.*", self.root, token(pod))
    }

    /// Parses the operation out of a subject received on [`Subjects::pod_wildcard`].
    pub fn pod_op(&self, subject: &str) -> Option<PodOp> {
        subject.rsplit('.').next().and_then(PodOp::parse)
    }

    /// The subject of a group send.
    pub fn group(&self, group: &str) -> String {
        format!("{}.group.{}", self.root, token(group))
    }

    /// What every pod subscribes to for group sends (one subscription per pod, not
    /// per group: see docs/routing.md).
    pub fn group_wildcard(&self) -> String {
        format!("{}.group.*", self.root)
    }

    /// The group a subject received on [`Subjects::group_wildcard`] names.
    pub fn group_of(&self, subject: &str) -> Option<String> {
        let rest = subject.strip_prefix(&self.root)?.strip_prefix(".group.")?;
        untoken(rest)
    }

    /// The pool's broadcast subject.
    pub fn broadcast(&self) -> String {
        format!("{}.broadcast", self.root)
    }

    /// The directory bucket (agent → pod).
    pub fn agents_bucket(&self) -> String {
        format!("tether-{}-agents", self.ns)
    }

    /// The pod registry bucket (pod → boot id).
    pub fn pods_bucket(&self) -> String {
        format!("tether-{}-pods", self.ns)
    }

    /// The durable queue's stream (one per pool; docs/routing.md, "Durable delivery").
    pub fn durable_stream(&self) -> String {
        format!("tether-{}-durable", self.ns)
    }

    /// The subjects the durable stream holds: one per agent.
    pub fn durable_wildcard(&self) -> String {
        format!("{}.durable.*", self.root)
    }

    /// The durable queue subject of one agent.
    pub fn durable(&self, agent: &str) -> String {
        format!("{}.durable.{}", self.root, token(agent))
    }

    /// The agent a durable queue subject names.
    pub fn agent_of_durable(&self, subject: &str) -> Option<String> {
        let rest = subject
            .strip_prefix(&self.root)?
            .strip_prefix(".durable.")?;
        untoken(rest)
    }

    /// The durable messages' status bucket (message id → agent, sequence, state).
    pub fn messages_bucket(&self) -> String {
        format!("tether-{}-messages", self.ns)
    }

    /// The status key of agent `agent`'s durable message `id`: idempotency keys are
    /// the caller's and scoped to one agent, so two agents' messages with one key
    /// never share a record.
    pub fn message_key(agent: &str, id: &str) -> String {
        format!("m.{}.{}", token(agent), token(id))
    }

    /// The KV subjects of every agent's status record for message `id` (a wildcard
    /// over the agent level, for `GET /v1/messages/{id}` without an agent).
    pub fn message_subjects_of_id(&self, id: &str) -> String {
        format!("$KV.{}.m.*.{}", self.messages_bucket(), token(id))
    }

    /// The KV key a status-bucket subject names (`$KV.<bucket>.<key>`).
    pub fn message_key_of_subject(&self, subject: &str) -> Option<String> {
        subject
            .strip_prefix(&format!("$KV.{}.", self.messages_bucket()))
            .map(str::to_owned)
    }

    /// The JetStream de-duplication id (`Nats-Msg-Id`) of agent `agent`'s message `id`:
    /// the stream de-duplicates per stream, so the agent is part of it. The agent's
    /// token holds no `.`, so the first `.` separates the two (injective).
    pub fn durable_msg_id(agent: &str, id: &str) -> String {
        format!("{}.{id}", token(agent))
    }

    /// The revocations bucket (agent or token → until; docs/push-api.md, "Revocation").
    pub fn revocations_bucket(&self) -> String {
        format!("tether-{}-revoked", self.ns)
    }

    /// The subject each pod announces its connection count on (the pool-wide cap).
    pub fn census(&self) -> String {
        format!("{}.census", self.root)
    }

    /// The subject a new revocation is announced on to every pod.
    pub fn revocations(&self) -> String {
        format!("{}.revoke", self.root)
    }

    /// The revocations-bucket key of an agent (`a.`) or a token id (`t.`): the
    /// prefixes keep an agent and a token of the same name apart.
    pub fn revocation_key(revoked: &crate::revocation::Revoked) -> String {
        match revoked {
            crate::revocation::Revoked::Agent(agent) => format!("a.{}", token(agent)),
            crate::revocation::Revoked::Token(jti) => format!("t.{}", token(jti)),
        }
    }

    /// The directory key of an agent.
    pub fn agent_key(agent: &str) -> String {
        format!("a.{}", token(agent))
    }

    /// The agent an agent key names.
    pub fn agent_of_key(key: &str) -> Option<String> {
        untoken(key.strip_prefix("a.")?)
    }

    /// The registry key of a pod.
    pub fn pod_key(pod: &str) -> String {
        token(pod)
    }

    /// The pod a registry key names.
    pub fn pod_of_key(key: &str) -> Option<String> {
        untoken(key)
    }
}

/// Whether a string is one valid NATS subject level without wildcards: what every
/// encoded token must be.
pub fn is_literal_level(level: &str) -> bool {
    !level.is_empty()
        && level
            .bytes()
            .all(|b| !b.is_ascii_whitespace() && b != b'.' && b != b'*' && b != b'>')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &[&str] = &[
        "",
        ".",
        "a.b",
        "*",
        ">",
        "a.>",
        "a.*.c",
        "a b",
        "a\tb",
        "a\r\nPUB x 1",
        "_",
        "_2E",
        "é",
        "agent-1",
        "Agent_1",
        "tether.acme.broadcast",
        "../../etc",
    ];

    #[test]
    fn tokens_are_single_literal_levels_and_round_trip() {
        for name in HOSTILE {
            let t = token(name);
            assert!(is_literal_level(&t), "{name:?} -> {t:?}");
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{t:?}"
            );
            assert_eq!(untoken(&t).as_deref(), Some(*name), "{t:?}");
        }
    }

    #[test]
    fn tokens_are_injective() {
        let mut seen = std::collections::HashMap::new();
        for name in HOSTILE {
            if let Some(other) = seen.insert(token(name), *name) {
                panic!("{name:?} and {other:?} share a token");
            }
        }
        // The escape character is escaped, so an id spelling an escape differs from
        // the id it would decode to.
        assert_ne!(token("_2E"), token("."));
        assert_eq!(token("agent-1"), "agent-1");
        assert_eq!(token("a.b"), "a_2Eb");
    }

    #[test]
    fn non_canonical_tokens_are_refused() {
        for bad in ["a.b", "a b", "_2e", "_41", "_4", "_ZZ", "*", ">", "é"] {
            assert_eq!(untoken(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn subjects_keep_hostile_names_in_one_level() {
        let s = Subjects::new("acme.*");
        assert_eq!(s.broadcast(), "tether.acme_2E_2A.broadcast");
        let subject = s.pod("gw.0", PodOp::Push);
        assert_eq!(subject, "tether.acme_2E_2A.pod.gw_2E0.push");
        assert_eq!(s.pod_op(&subject), Some(PodOp::Push));
        assert_eq!(s.pod_wildcard("gw.0"), "tether.acme_2E_2A.pod.gw_2E0.*");
        for group in HOSTILE {
            let subject = s.group(group);
            assert_eq!(subject.split('.').count(), 4, "{subject}");
            assert_eq!(s.group_of(&subject).as_deref(), Some(*group));
        }
        assert_eq!(s.group_of("tether.other.group.x"), None);
        for agent in HOSTILE {
            let key = Subjects::agent_key(agent);
            assert_eq!(Subjects::agent_of_key(&key).as_deref(), Some(*agent));
        }
        assert_eq!(s.agents_bucket(), "tether-acme_2E_2A-agents");
        assert_eq!(s.pods_bucket(), "tether-acme_2E_2A-pods");
    }

    #[test]
    fn pools_never_share_names() {
        let a = Subjects::new("acme");
        let b = Subjects::new("acme.broadcast");
        assert_ne!(a.broadcast(), b.broadcast());
        assert!(!b.broadcast().starts_with(&format!("{}.", a.broadcast())));
        assert_ne!(
            a.agents_bucket(),
            Subjects::new("acme-agents").pods_bucket()
        );
    }

    #[test]
    fn durable_subjects_are_one_level_per_agent() {
        let s = Subjects::new("acme");
        assert_eq!(s.durable_stream(), "tether-acme-durable");
        for agent in ["a1", "a.b", "*", ">", "a b", ""] {
            let subject = s.durable(agent);
            assert_eq!(subject.matches('.').count(), 3, "{subject}");
            assert_eq!(s.agent_of_durable(&subject).as_deref(), Some(agent));
        }
        assert_eq!(s.durable_wildcard(), "tether.acme.durable.*");
        assert_eq!(s.messages_bucket(), "tether-acme-messages");
        assert_eq!(Subjects::message_key("a1", "a.b*"), "m.a1.a_2Eb_2A");
        assert_eq!(
            s.message_subjects_of_id("a.b*"),
            "$KV.tether-acme-messages.m.*.a_2Eb_2A"
        );
        assert_eq!(
            s.message_key_of_subject("$KV.tether-acme-messages.m.a1.x"),
            Some("m.a1.x".to_string())
        );
    }

    #[test]
    fn idempotency_is_scoped_to_the_agent_injectively() {
        // One key, two agents: two ids and two status keys.
        assert_ne!(
            Subjects::durable_msg_id("a", "k"),
            Subjects::durable_msg_id("b", "k")
        );
        assert_ne!(
            Subjects::message_key("a", "k"),
            Subjects::message_key("b", "k")
        );
        // Agent and key boundaries cannot be shifted: ("a.b", "c") vs ("a", "b.c").
        let mut seen = std::collections::HashMap::new();
        for agent in HOSTILE {
            for id in HOSTILE {
                let msg_id = Subjects::durable_msg_id(agent, id);
                let key = Subjects::message_key(agent, id);
                assert_eq!(key.split('.').count(), 3, "{key}");
                if let Some(other) = seen.insert((msg_id, key), (*agent, *id)) {
                    panic!("{:?} and {other:?} share an id", (agent, id));
                }
            }
        }
    }

    #[test]
    fn ops_round_trip() {
        for op in PodOp::ALL {
            assert_eq!(PodOp::parse(op.as_str()), Some(op));
        }
        assert_eq!(PodOp::parse("nope"), None);
    }
}

//! Fault injection for tests: fail matching requests with a status code, delay them, or
//! cut every open watch stream. Driven by the Rust API ([`Faults`]) or over HTTP at
//! `/_sim/faults` (see [`crate::http`]).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::store::Store;

/// Which requests a rule applies to; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultMatch {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: Option<String>,
    /// Resource plural, e.g. `connectionpools`.
    pub resource: Option<String>,
    /// Subresource, e.g. `status`.
    pub subresource: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Object name.
    pub name: Option<String>,
}

/// One injected fault.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FaultRule {
    /// Which requests.
    #[serde(flatten)]
    pub matches: FaultMatch,
    /// How many more matching requests it applies to (None: all).
    pub count: Option<u32>,
    /// Fail with this HTTP status (a `metav1.Status` body with the usual reason).
    pub status: Option<u16>,
    /// Message of the failure.
    pub message: Option<String>,
    /// Delay before the request is served (or failed).
    pub delay_ms: Option<u64>,
}

/// What a request passes to the fault check.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// Kubernetes verb.
    pub verb: String,
    /// Resource plural.
    pub resource: String,
    /// Subresource.
    pub subresource: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Name.
    pub name: Option<String>,
}

/// The faults handle (cheap to clone).
#[derive(Clone)]
pub struct Faults {
    rules: Arc<Mutex<Vec<FaultRule>>>,
    store: Arc<Store>,
}

// === impl FaultMatch ===

impl FaultMatch {
    /// Matches a verb (any resource).
    pub fn verb(verb: &str) -> Self {
        FaultMatch {
            verb: Some(verb.into()),
            ..Default::default()
        }
    }

    /// Matches any request to a resource.
    pub fn resource(resource: &str) -> Self {
        FaultMatch {
            resource: Some(resource.into()),
            ..Default::default()
        }
    }

    /// Narrows to a resource.
    pub fn on(mut self, resource: &str) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Narrows to a subresource.
    pub fn subresource(mut self, subresource: &str) -> Self {
        self.subresource = Some(subresource.into());
        self
    }

    /// Narrows to a name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    fn matches(&self, r: &RequestInfo) -> bool {
        let ok = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        ok(&self.verb, Some(&r.verb))
            && ok(&self.resource, Some(&r.resource))
            && ok(&self.subresource, r.subresource.as_deref())
            && ok(&self.namespace, r.namespace.as_deref())
            && ok(&self.name, r.name.as_deref())
    }
}

// === impl Faults ===

impl Faults {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        Faults {
            rules: Arc::default(),
            store,
        }
    }

    /// Adds a rule.
    pub fn add(&self, rule: FaultRule) {
        self.rules.lock().push(rule);
    }

    /// Fails the next `n` matching requests with `status`.
    pub fn fail_next(&self, n: u32, m: FaultMatch, status: u16) {
        self.add(FaultRule {
            matches: m,
            count: Some(n),
            status: Some(status),
            ..Default::default()
        });
    }

    /// Delays every matching request by `delay` until cleared.
    pub fn add_latency(&self, m: FaultMatch, delay: Duration) {
        self.add(FaultRule {
            matches: m,
            delay_ms: Some(delay.as_millis() as u64),
            ..Default::default()
        });
    }

    /// Ends every open watch stream now.
    pub fn drop_watches(&self) {
        self.store.drop_watches();
    }

    /// Drops the event history: watches from any earlier resourceVersion get 410 Gone.
    pub fn compact(&self) {
        self.store.compact();
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().clear();
    }

    /// The active rules.
    pub fn rules(&self) -> Vec<FaultRule> {
        self.rules.lock().clone()
    }

    /// Decides a request's fate: a delay to wait and maybe an error to answer with.
    /// Consumes one use of each counted rule that matched.
    pub fn check(&self, r: &RequestInfo) -> (Duration, Option<ApiError>) {
        let mut rules = self.rules.lock();
        let mut delay = Duration::ZERO;
        let mut error = None;
        for rule in rules.iter_mut() {
            if rule.count == Some(0) || !rule.matches.matches(r) {
                continue;
            }
            if let Some(c) = &mut rule.count {
                *c -= 1;
            }
            delay += Duration::from_millis(rule.delay_ms.unwrap_or(0));
            if let Some(code) = rule.status
                && error.is_none()
            {
                let msg = rule
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("injected fault: {} {}", r.verb, r.resource));
                let mut e = ApiError::for_code(code, msg);
                if code == 429 || code == 503 {
                    e.retry_after = Some(1);
                }
                error = Some(e);
            }
        }
        rules.retain(|r| r.count != Some(0));
        (delay, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_rules_expire_and_match_narrowly() {
        let f = Faults::new(Arc::new(Store::new(10)));
        f.fail_next(
            2,
            FaultMatch::verb("patch")
                .on("connectionpools")
                .subresource("status"),
            500,
        );
        let hit = RequestInfo {
            verb: "patch".into(),
            resource: "connectionpools".into(),
            subresource: Some("status".into()),
            ..Default::default()
        };
        let miss = RequestInfo {
            verb: "patch".into(),
            resource: "connectionpools".into(),
            ..Default::default()
        };
        assert!(f.check(&miss).1.is_none());
        assert_eq!(f.check(&hit).1.unwrap().code, 500);
        assert_eq!(f.check(&hit).1.unwrap().reason, "InternalError");
        assert!(f.check(&hit).1.is_none(), "rule used up");
        assert!(f.rules().is_empty());
    }

    #[test]
    fn latency_accumulates_without_failing() {
        let f = Faults::new(Arc::new(Store::new(10)));
        f.add_latency(FaultMatch::resource("leases"), Duration::from_millis(30));
        let r = RequestInfo {
            verb: "get".into(),
            resource: "leases".into(),
            ..Default::default()
        };
        let (d, e) = f.check(&r);
        assert_eq!(d, Duration::from_millis(30));
        assert!(e.is_none());
        assert_eq!(f.rules().len(), 1, "uncounted rules stay");
    }
}

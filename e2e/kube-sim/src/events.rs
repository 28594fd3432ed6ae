//! Events: core/v1 `Event` and events.k8s.io/v1 `Event` are one storage, as on a real
//! cluster (both REST endpoints read and write the same etcd keys). Objects are stored in
//! core/v1 form; the events.k8s.io/v1 endpoints convert on the way in and out with the
//! real server's field mapping (`pkg/apis/events/v1/conversion.go` and the generated
//! conversions through the internal type):
//!
//! | events.k8s.io/v1 | core/v1 |
//! |---|---|
//! | `regarding` | `involvedObject` |
//! | `note` | `message` |
//! | `deprecatedSource` | `source` |
//! | `deprecatedFirstTimestamp` | `firstTimestamp` |
//! | `deprecatedLastTimestamp` | `lastTimestamp` |
//! | `deprecatedCount` | `count` |
//! | `reportingController` | `reportingComponent` |
//!
//! `eventTime`, `series`, `reason`, `action`, `related`, `type`, `reportingInstance` and
//! metadata keep their names. So an Event the operator writes through kube's `Recorder`
//! (events.k8s.io/v1) is what `kubectl get events` and `kubectl describe` (core/v1) show.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::registry::ResourceType;

/// (events.k8s.io/v1 name, core/v1 name).
const RENAMES: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

/// Whether `rt` is events.k8s.io's Event (served from core/v1 Event storage).
pub fn is_events_v1(rt: &ResourceType) -> bool {
    rt.group == "events.k8s.io" && rt.plural == "events"
}

fn rename(obj: &Value, to_core: bool, api_version: &str) -> Value {
    let Some(m) = obj.as_object() else {
        return obj.clone();
    };
    let mut out = Map::new();
    for (k, v) in m {
        let renamed = RENAMES.iter().find_map(|(ev, core)| {
            let (from, to) = if to_core { (ev, core) } else { (core, ev) };
            (k == from).then_some(*to)
        });
        // A name of the other version that has no counterpart here is dropped, as a typed
        // decode would (e.g. `message` sent to events.k8s.io/v1 is an unknown field).
        let foreign = RENAMES.iter().any(|(ev, core)| {
            let other = if to_core { core } else { ev };
            k == other
        });
        match renamed {
            Some(to) => {
                out.insert(to.to_string(), v.clone());
            }
            None if foreign => {}
            None => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    Value::Object(out)
}

/// A stored (core/v1) object as `rt` serves it.
pub fn read_as<'v>(rt: &ResourceType, stored: &'v Value) -> Cow<'v, Value> {
    if is_events_v1(rt) {
        Cow::Owned(rename(stored, false, "events.k8s.io/v1"))
    } else {
        Cow::Borrowed(stored)
    }
}

/// An object written through `rt` in its storage (core/v1) form.
pub fn to_storage<'v>(rt: &ResourceType, obj: &'v Value) -> Cow<'v, Value> {
    if is_events_v1(rt) {
        Cow::Owned(rename(obj, true, "v1"))
    } else {
        Cow::Borrowed(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;
    use serde_json::json;

    #[test]
    fn events_v1_fields_map_to_core_and_back() {
        let rt = builtins()
            .into_iter()
            .find(|t| t.group == "events.k8s.io")
            .unwrap();
        let ev = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "ns"},
            "regarding": {"kind": "ConnectionPool", "name": "p"}, "note": "scaled",
            "reason": "Scaled", "action": "Scale", "type": "Normal",
            "reportingController": "tether-operator", "reportingInstance": "op-0",
            "eventTime": "2026-01-01T00:00:00.000000Z", "deprecatedCount": 2,
            "series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"}});
        let core = to_storage(&rt, &ev).into_owned();
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["message"], "scaled");
        assert_eq!(core["reportingComponent"], "tether-operator");
        assert_eq!(core["reportingInstance"], "op-0");
        assert_eq!(core["count"], 2);
        assert_eq!(core["series"]["count"], 2);
        assert!(core.get("note").is_none() && core.get("regarding").is_none());
        assert_eq!(read_as(&rt, &core).into_owned(), ev);
    }
}

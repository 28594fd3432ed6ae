//! Schema, CEL and generated-YAML tests of the ConnectionPool types.

use super::*;
use kube::core::cel::{ScopeContext, Validator, analyze_rule, compile_schema};
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = ConnectionPool::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap(),
    )
    .unwrap()
}

/// A valid pool as a user would write it, as JSON so tests can break one field.
fn minimal() -> Value {
    json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ConnectionPool",
        "metadata": {"name": "acme", "namespace": "tenants"},
        "spec": {
            "tenant": "acme",
            "replicas": {"min": 1, "max": 1},
            "auth": {
                "jwt": {"secretRef": {"name": "acme-jwt", "key": "hs256"}},
                "apiKeysSecretRef": {"name": "acme-api-keys", "key": "keys"}
            }
        }
    })
}

/// The messages of the CEL rules that `object` breaks (schema defaults applied first,
/// as the apiserver does).
fn cel_failures(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), object, None) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn names_subresources_and_columns() {
    let crd = ConnectionPool::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("connectionpools.tether.dev")
    );
    assert_eq!(crd.spec.names.short_names, Some(vec!["cpool".to_string()]));
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, VERSION);
    let sub = version.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas.min");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    let columns: Vec<_> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Tenant",
            "Connections",
            "Replicas",
            "Desired",
            "Ready",
            "Status",
            "Age"
        ]
    );
}

#[test]
fn status_lists_are_maps_so_each_pod_owns_its_entry() {
    let s = schema();
    let pods = &s["properties"]["status"]["properties"]["pods"];
    assert_eq!(pods["x-kubernetes-list-type"], "map");
    assert_eq!(pods["x-kubernetes-list-map-keys"], json!(["name"]));
    let conditions = &s["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn field_docs_become_descriptions() {
    let s = schema();
    let tenant = &s["properties"]["spec"]["properties"]["tenant"];
    assert!(
        tenant["description"]
            .as_str()
            .unwrap()
            .starts_with("Tenant id")
    );
    assert_eq!(tenant["pattern"], DNS_LABEL_PATTERN);
    let min = &s["properties"]["spec"]["properties"]["replicas"]["properties"]["min"];
    assert_eq!(min["minimum"], json!(1.0));
}

#[test]
fn every_cel_rule_compiles_in_crd_scope() {
    let s = schema();
    let compiled = compile_schema(&s);
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
    let text = serde_json::to_string(&s).unwrap();
    let rules: Vec<Value> = find_rules(&s);
    assert!(rules.len() >= 5, "rules: {rules:?} in {text}");
    for rule in rules {
        let rule = rule["rule"].as_str().unwrap();
        let warnings = analyze_rule(rule, &compiled, ScopeContext::CrdValidation);
        assert!(warnings.is_empty(), "{rule}: {warnings:?}");
    }
}

fn find_rules(v: &Value) -> Vec<Value> {
    let mut out = vec![];
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "x-kubernetes-validations" {
                    out.extend(child.as_array().unwrap().iter().cloned());
                } else {
                    out.extend(find_rules(child));
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| out.extend(find_rules(i))),
        _ => {}
    }
    out
}

#[test]
fn minimal_pool_is_valid_and_defaults_fill_in() {
    assert_eq!(cel_failures(&minimal()), Vec::<String>::new());
    let pool: ConnectionPool = serde_json::from_value(minimal()).unwrap();
    assert_eq!(pool.spec.limits, LimitsSpec::default());
    assert_eq!(pool.spec.drain.deadline_seconds, 60);
    assert_eq!(pool.spec.report_interval_seconds, 10);
    assert_eq!(pool.spec.service.type_, ServiceType::ClusterIP);
}

#[test]
fn a_large_pool_reports_less_often_to_stay_within_its_rate() {
    let spec = |max: i32, interval: i32, rate: i32| {
        let mut pool = minimal();
        pool["spec"]["replicas"] = json!({"min": 1, "max": max});
        pool["spec"]["reportIntervalSeconds"] = json!(interval);
        pool["spec"]["maxReportsPerSecond"] = json!(rate);
        serde_json::from_value::<ConnectionPool>(pool).unwrap().spec
    };
    // Default rate: 20 reports/s.
    let pool: ConnectionPool = serde_json::from_value(minimal()).unwrap();
    assert_eq!(pool.spec.max_reports_per_second, 20);
    // 200 pods every 10 s is 20/s: the configured interval stands.
    assert_eq!(spec(200, 10, 20).effective_report_interval_seconds(), 10);
    // One pod more and the interval stretches (rounded up, never over the rate).
    assert_eq!(spec(201, 10, 20).effective_report_interval_seconds(), 11);
    assert_eq!(spec(1000, 10, 20).effective_report_interval_seconds(), 50);
    assert_eq!(spec(1000, 10, 1000).effective_report_interval_seconds(), 10);
    // A longer configured interval is never shortened.
    assert_eq!(spec(1000, 300, 20).effective_report_interval_seconds(), 300);
    assert_eq!(spec(1000, 10, 1).effective_report_interval_seconds(), 1000);
}

#[test]
fn min_above_max_is_refused() {
    let mut pool = minimal();
    pool["spec"]["replicas"] = json!({"min": 3, "max": 2});
    pool["spec"]["routing"] = json!({"nats": {"url": "nats://nats:4222"}});
    let failures = cel_failures(&pool);
    assert!(
        failures
            .iter()
            .any(|f| f.contains("replicas.min must not exceed")),
        "{failures:?}"
    );
}

#[test]
fn exactly_one_jwt_key_source() {
    let mut both = minimal();
    both["spec"]["auth"]["jwt"]["publicKeysSecretRef"] = json!({"name": "k", "key": "pem"});
    let mut neither = minimal();
    neither["spec"]["auth"]["jwt"] = json!({"issuer": "https://id.example"});
    for pool in [both, neither] {
        let failures = cel_failures(&pool);
        assert!(
            failures
                .iter()
                .any(|f| f.contains("exactly one of auth.jwt")),
            "{failures:?}"
        );
    }
    let mut public = minimal();
    public["spec"]["auth"]["jwt"] = json!({"publicKeysSecretRef": {"name": "k", "key": "pem"}});
    assert_eq!(cel_failures(&public), Vec::<String>::new());
}

#[test]
fn multi_pod_pools_need_routing() {
    let mut pool = minimal();
    pool["spec"]["replicas"] = json!({"min": 1, "max": 4});
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("routing is required")),
        "{failures:?}"
    );
    pool["spec"]["routing"] = json!({"nats": {"managed": true}});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
}

#[test]
fn nats_is_url_or_managed_not_both() {
    let mut pool = minimal();
    pool["spec"]["routing"] = json!({"nats": {"url": "nats://n:4222", "managed": true}});
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("routing.nats.url")),
        "{failures:?}"
    );
    pool["spec"]["routing"] = json!({"nats": {"managed": false}});
    assert!(!cel_failures(&pool).is_empty());
}

#[test]
fn a_managed_nats_cluster_is_odd_and_holds_the_streams_replicas() {
    let mut pool = minimal();
    pool["spec"]["replicas"]["max"] = json!(4);
    pool["spec"]["routing"] = json!({"nats": {"managed": true, "replicas": 3,
        "resources": {"requests": {"memory": "512Mi"}}}});
    pool["spec"]["delivery"] = json!({"replicas": 3});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
    pool["spec"]["routing"]["nats"]["replicas"] = json!(2);
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("must be odd")),
        "{failures:?}"
    );
    pool["spec"]["routing"]["nats"]["replicas"] = json!(1);
    let failures = cel_failures(&pool);
    assert!(
        failures
            .iter()
            .any(|f| f.contains("cannot exceed routing.nats.replicas")),
        "{failures:?}"
    );
    // Sizing and resources are the managed server's; an existing NATS is sized elsewhere.
    pool["spec"]["delivery"] = json!({});
    pool["spec"]["routing"] = json!({"nats": {"url": "nats://n:4222", "replicas": 3,
        "resources": {"requests": {"memory": "512Mi"}}}});
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("sizes a managed NATS")),
        "{failures:?}"
    );
    assert!(
        failures
            .iter()
            .any(|f| f.contains("resources applies to a managed NATS")),
        "{failures:?}"
    );
}

#[test]
fn nats_credentials_are_one_method_and_only_for_an_existing_bus() {
    let secret = |key: &str| json!({"name": "acme-nats", "key": key});
    let mut pool = minimal();
    pool["spec"]["routing"] = json!({"nats": {"url": "tls://n:4222",
        "auth": {"user": "acme", "passwordSecretRef": secret("password")},
        "tls": {"caSecretRef": secret("ca.crt")}}});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
    pool["spec"]["routing"]["nats"]["auth"]["tokenSecretRef"] = secret("token");
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("set one of")),
        "{failures:?}"
    );
    pool["spec"]["routing"] = json!({"nats": {"url": "nats://n:4222", "auth": {"user": "acme"}}});
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("go together")),
        "{failures:?}"
    );
    pool["spec"]["routing"] = json!({"nats": {"managed": true,
        "auth": {"tokenSecretRef": secret("token")}}});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
    pool["spec"]["routing"]["nats"]["auth"] = json!({"credsSecretRef": secret("creds")});
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("managed NATS takes")),
        "{failures:?}"
    );
    pool["spec"]["routing"] = json!({"nats": {"managed": true,
        "tls": {"caSecretRef": secret("ca.crt")}}});
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("existing NATS")),
        "{failures:?}"
    );
}

#[test]
fn scaling_target_must_fit_in_a_pod() {
    let mut pool = minimal();
    pool["spec"]["limits"] = json!({"maxConnectionsPerPod": 1000});
    let failures = cel_failures(&pool);
    assert!(
        failures
            .iter()
            .any(|f| f.contains("targetConnectionsPerPod")),
        "{failures:?}"
    );
    pool["spec"]["scaling"] = json!({"targetConnectionsPerPod": 800});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
    // Pods must keep headroom above the target plus the tolerance band: at 950 (+10 %)
    // a pod is full before the mean leaves the band, and agents get 503 while the
    // autoscaler sees nothing to do.
    pool["spec"]["scaling"] = json!({"targetConnectionsPerPod": 950});
    let failures = cel_failures(&pool);
    assert!(
        failures.iter().any(|f| f.contains("headroom")),
        "{failures:?}"
    );
    pool["spec"]["scaling"] = json!({"targetConnectionsPerPod": 950, "tolerancePercent": 5});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
}

#[test]
fn tenant_is_immutable() {
    let old = minimal();
    let mut new = minimal();
    new["spec"]["tenant"] = json!("globex");
    let errors = Validator::new()
        .validate(&schema(), &new, Some(&old))
        .expect_err("a new tenant is refused");
    assert!(
        errors.iter().any(|e| e.to_string().contains("immutable")),
        "{errors:?}"
    );
    // Creation has no old object: any valid tenant.
    assert_eq!(cel_failures(&new), Vec::<String>::new());
    assert!(
        Validator::new()
            .validate(&schema(), &new, Some(&new))
            .is_ok()
    );
}

#[test]
fn status_lists_and_counts_are_bounded() {
    let status = &schema()["properties"]["status"]["properties"];
    // One entry per pod of the largest pool: what keeps the object's size known.
    let max_pods = &schema()["properties"]["spec"]["properties"]["replicas"]["properties"]["max"];
    assert_eq!(max_pods["maximum"].as_f64(), Some(800.0));
    assert_eq!(status["pods"]["maxItems"], json!(800));
    assert_eq!(status["instructions"]["maxItems"], json!(800));
    assert_eq!(
        status["pods"]["items"]["properties"]["name"]["maxLength"],
        json!(63)
    );
    assert_eq!(
        status["pods"]["items"]["properties"]["bootId"]["maxLength"],
        json!(64)
    );
    assert_eq!(
        status["instructions"]["items"]["properties"]["id"]["maxLength"],
        json!(128)
    );
    let report = &status["pods"]["items"]["properties"];
    assert_eq!(report["connections"]["maximum"].as_f64(), Some(1e8));
    assert_eq!(report["refused"]["minimum"].as_f64(), Some(0.0));
}

#[test]
fn operator_status_patch_leaves_pods_out() {
    // The operator applies status with its own field manager; a `pods` key in its body,
    // even empty, would claim the list and wipe the pods' entries.
    let status = ConnectionPoolStatus {
        replicas: Some(2),
        ..Default::default()
    };
    let body = serde_json::to_value(&status).unwrap();
    assert_eq!(body, json!({"replicas": 2}));
}

#[test]
fn committed_yaml_is_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stale = check_generated(&root);
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the types: run `cargo run -p tether-crds --bin crdgen -- --write`"
    );
}

#[test]
fn examples_are_valid_pools() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let yaml = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            let value = serde_json::to_value(yaml).unwrap();
            if value["kind"] != "ConnectionPool" {
                continue;
            }
            seen += 1;
            let failures = cel_failures(&value);
            assert!(failures.is_empty(), "{}: {failures:?}", path.display());
            let pool: ConnectionPool = serde_json::from_value(value).unwrap();
            assert!(!pool.spec.tenant.is_empty());
        }
    }
    assert!(
        seen >= 2,
        "expected a minimal and a full example in {}",
        dir.display()
    );
}

#[test]
fn an_upstream_must_be_signed() {
    let upstream = &schema()["properties"]["spec"]["properties"]["upstream"];
    let required: Vec<&str> = upstream["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(required.contains(&"secretRef"), "{required:?}");
}

#[test]
fn durable_delivery_needs_routing() {
    let mut pool = minimal();
    pool["spec"]["delivery"] = json!({"mode": "durable"});
    let failures = cel_failures(&pool);
    assert!(
        failures
            .iter()
            .any(|f| f.contains("delivery needs routing")),
        "{failures:?}"
    );
    pool["spec"]["routing"] = json!({"nats": {"managed": true}});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
}

/// Every `description` in a schema, with its path.
fn descriptions(node: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match node {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(text) if key == "description" => {
                        out.push((path.to_owned(), text.clone()))
                    }
                    other => descriptions(other, &format!("{path}.{key}"), out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| descriptions(i, path, out)),
        _ => {}
    }
}

#[test]
fn kubectl_explain_shows_plain_text_without_rustdoc_links_or_broken_lines() {
    // What is installed: the committed YAML, parsed as `kubectl explain` reads it.
    let committed: Value = serde_yaml::from_str(&crd_yaml()).unwrap();
    let mut found = Vec::new();
    descriptions(&committed, "", &mut found);
    assert!(found.len() > 100, "descriptions found: {}", found.len());
    let link = regex_lite_link();
    for (path, text) in &found {
        assert!(
            !link(text),
            "{path}: rustdoc link syntax in `kubectl explain`: {text}"
        );
        let single_newline = text.replace("\n\n", "").contains('\n');
        assert!(
            !single_newline,
            "{path}: a hard-wrapped line shows broken in `kubectl explain`: {text:?}"
        );
    }
    // The raw derive still has both, so the cleaning is what removes them.
    let mut raw = Vec::new();
    descriptions(&schema(), "", &mut raw);
    assert!(raw.iter().any(|(_, t)| t.contains('\n')));
}

/// `[`Foo`]`, `[Foo::bar]` or `[`Foo::bar`]`: rustdoc's intra-doc link syntax.
fn regex_lite_link() -> impl Fn(&str) -> bool {
    |text: &str| {
        let mut rest = text;
        while let Some(open) = rest.find('[') {
            let after = &rest[open + 1..];
            if let Some(close) = after.find(']') {
                let inner = &after[..close];
                let code = inner.len() > 1 && inner.starts_with('`') && inner.ends_with('`');
                let path = !inner.is_empty()
                    && inner.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && inner
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                if code || path {
                    return true;
                }
            }
            rest = after;
        }
        false
    }
}

#[test]
fn plain_descriptions_keep_paragraphs_and_drop_link_brackets() {
    assert_eq!(
        plain_description(
            "One line\nwrapped here.\n\nSecond [`Foo::bar`] and [Baz]\nand [not a link]."
        ),
        "One line wrapped here.\n\nSecond `Foo::bar` and Baz and [not a link]."
    );
    assert_eq!(plain_description("[ unclosed"), "[ unclosed");
}

#[test]
fn image_pull_secrets_and_api_peers_are_part_of_the_spec() {
    let mut pool = minimal();
    pool["spec"]["template"] = json!({"imagePullSecrets": [{"name": "registry-creds"}]});
    pool["spec"]["api"] = json!({"allowedFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backends"}}},
        {"podSelector": {"matchLabels": {"app": "billing"}}},
    ]});
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
    let parsed: ConnectionPool = serde_json::from_value(pool.clone()).unwrap();
    assert_eq!(
        parsed
            .spec
            .template
            .image_pull_secrets
            .as_deref()
            .map(|s| s[0].name.as_str()),
        Some("registry-creds")
    );
    assert_eq!(parsed.spec.api.unwrap().allowed_from.len(), 2);
    pool["spec"]["api"] = json!({"allowedFrom": [{}]});
    assert_eq!(
        cel_failures(&pool),
        [
            "spec.api.allowedFrom[0]: an api.allowedFrom entry needs namespaceSelector, podSelector or both"
        ]
    );
}

#[test]
fn disruption_budget_is_a_count_or_a_percentage_and_never_zero() {
    let pool: ConnectionPool = serde_json::from_value(minimal()).unwrap();
    assert_eq!(
        pool.spec.disruption.max_unavailable,
        IntOrString::String("10%".into()),
        "default"
    );
    let disruption = &schema()["properties"]["spec"]["properties"]["disruption"];
    assert_eq!(
        disruption["properties"]["maxUnavailable"]["x-kubernetes-int-or-string"],
        json!(true)
    );
    for ok in [
        json!(1),
        json!(5),
        json!("1%"),
        json!("10%"),
        json!("25%"),
        json!("100%"),
    ] {
        let mut pool = minimal();
        pool["spec"]["disruption"] = json!({"maxUnavailable": ok});
        assert_eq!(cel_failures(&pool), Vec::<String>::new(), "{ok} is valid");
    }
    for bad in [
        json!(0),
        json!(-1),
        json!("0%"),
        json!("101%"),
        json!("10 %"),
        json!("ten%"),
    ] {
        let mut pool = minimal();
        pool["spec"]["disruption"] = json!({"maxUnavailable": bad});
        let failures = cel_failures(&pool);
        assert!(
            failures
                .iter()
                .any(|f| f.contains("disruption.maxUnavailable")),
            "{bad} is refused: {failures:?}"
        );
    }
}

#[test]
fn spread_and_priority_class_are_in_the_template() {
    let template = &schema()["properties"]["spec"]["properties"]["template"]["properties"];
    let spread = &template["topologySpreadConstraints"];
    assert_eq!(spread["type"], json!("array"));
    assert_eq!(spread["maxItems"], json!(8));
    assert!(spread["items"]["properties"]["whenUnsatisfiable"].is_object());
    assert_eq!(template["priorityClassName"]["maxLength"], json!(253));
    let mut pool = minimal();
    pool["spec"]["template"] = json!({
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
        }],
        "priorityClassName": "tether-gateways",
    });
    assert_eq!(cel_failures(&pool), Vec::<String>::new());
    let parsed: ConnectionPool = serde_json::from_value(pool).unwrap();
    assert_eq!(
        parsed.spec.template.priority_class_name.as_deref(),
        Some("tether-gateways")
    );
}

#[test]
fn rollout_batches_are_a_count_or_a_percentage_of_the_pool() {
    let spec = |v: IntOrString| RolloutSpec {
        max_unavailable: v,
        paused: false,
    };
    let default = RolloutSpec::default();
    assert_eq!(default.batch_size(10), 1);
    assert_eq!(default.batch_size(100), 10);
    // Rounded down, never below one pod.
    assert_eq!(default.batch_size(3), 1);
    assert_eq!(spec(IntOrString::String("25%".into())).batch_size(10), 2);
    assert_eq!(spec(IntOrString::String("100%".into())).batch_size(7), 7);
    assert_eq!(spec(IntOrString::Int(3)).batch_size(10), 3);
    // A count written as a string, as `kubectl patch` may send it.
    assert_eq!(spec(IntOrString::String("3".into())).batch_size(10), 3);
    // Never more than the pool.
    assert_eq!(spec(IntOrString::Int(50)).batch_size(4), 4);
}

/// The rollout's batch rounds a percentage down (at least one pod), the
/// PodDisruptionBudget rounds it up: the same value never gives a batch larger than
/// what the budget lets evictions take, at any pool size the CRD allows.
#[test]
fn a_batch_never_exceeds_the_disruption_budget_of_the_same_value() {
    let both = |v: IntOrString| {
        (
            RolloutSpec {
                max_unavailable: v.clone(),
                paused: false,
            },
            DisruptionSpec { max_unavailable: v },
        )
    };
    let (rollout, disruption) = both(IntOrString::String("10%".into()));
    // 10 % of 15 pods: 1.5, a batch of 1, a budget of 2.
    assert_eq!(
        (rollout.batch_size(15), disruption.pods_allowed(15)),
        (1, 2)
    );
    // 10 % of 5: 0.5, a batch of 1 (at least one), a budget of 1.
    assert_eq!((rollout.batch_size(5), disruption.pods_allowed(5)), (1, 1));
    assert_eq!(
        (rollout.batch_size(100), disruption.pods_allowed(100)),
        (10, 10)
    );
    let (rollout, disruption) = both(IntOrString::Int(3));
    assert_eq!(
        (rollout.batch_size(10), disruption.pods_allowed(10)),
        (3, 3)
    );
    assert_eq!((rollout.batch_size(2), disruption.pods_allowed(2)), (2, 2));
    // The defaults are the same value.
    assert_eq!(
        RolloutSpec::default().max_unavailable,
        DisruptionSpec::default().max_unavailable
    );
    for percent in 1..=100 {
        let (rollout, disruption) = both(IntOrString::String(format!("{percent}%")));
        for pods in 1..=MAX_POOL_PODS {
            let (batch, allowed) = (rollout.batch_size(pods), disruption.pods_allowed(pods));
            assert!(
                (1..=allowed).contains(&batch),
                "{percent}% of {pods}: batch {batch}, budget {allowed}"
            );
        }
    }
}

#[test]
fn rollout_max_unavailable_is_validated() {
    for good in [
        json!(1),
        json!(250),
        json!("1%"),
        json!("10%"),
        json!("100%"),
    ] {
        let mut pool = minimal();
        pool["spec"]["rollout"] = json!({"maxUnavailable": good});
        assert_eq!(cel_failures(&pool), Vec::<String>::new(), "{good}");
    }
    for bad in [
        json!(0),
        json!(-2),
        json!("0%"),
        json!("101%"),
        json!("ten"),
        json!("5 %"),
    ] {
        let mut pool = minimal();
        pool["spec"]["rollout"] = json!({"maxUnavailable": bad});
        let failures = cel_failures(&pool);
        assert!(
            failures
                .iter()
                .any(|f| f.contains("rollout.maxUnavailable must be")),
            "{bad}: {failures:?}"
        );
    }
}

//! The Grafana dashboards shipped in `charts/tether/dashboards/` query only metrics the
//! code exports.
//!
//! The exported names come from the code itself: every instrument-creation call
//! (`meter.u64_counter("tether.handshakes")...build()`) in the gateway's and the
//! operator's sources, with its kind and unit, turned into Prometheus series by the
//! same rules as the exporters ([`tether_telemetry::names`], checked against the real
//! Prometheus exporter in its unit tests). An instrument named by anything but a string
//! literal fails the test, so the scan cannot silently miss one.
//!
//! Every panel must also be described in `docs/observability.md`.
//!
//! The scan is checked against what a scraper reads: a real gateway's `/metrics`, after
//! an agent connected and received a push, serves only names the scan found, and the
//! ones the gateway dashboard is built on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use tether_telemetry::names::{Kind, series};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// One instrument found in the sources.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Found {
    name: String,
    unit: String,
    kind: String,
    file: String,
}

/// Every instrument created in `source`: `.<u64|i64|f64>_<kind>("name")`, with the
/// `.with_unit("..")` of its builder chain (up to its `.build()` or the next creation).
fn instruments_in(source: &str, file: &str) -> Result<Vec<Found>, String> {
    let create = Regex::new(r"\.((?:u64|i64|f64)_[a-z_]+)\s*\(").unwrap();
    let literal = Regex::new(r#"^\s*"([^"]+)"\s*\)"#).unwrap();
    let unit = Regex::new(r#"\.with_unit\(\s*"([^"]*)"\s*\)"#).unwrap();
    let calls: Vec<_> = create
        .captures_iter(source)
        .filter(|c| Kind::from_meter_method(&c[1]).is_some())
        .map(|c| {
            let whole = c.get(0).unwrap();
            (c[1].to_owned(), whole.start(), whole.end())
        })
        .collect();
    let mut found = Vec::new();
    for (i, (method, start, end)) in calls.iter().enumerate() {
        let Some(name) = literal.captures(&source[*end..]) else {
            let line = source[..*start].lines().count();
            return Err(format!(
                "{file}:{line}: `{method}` is not called with a string literal: dashboards are \
                 checked against literal instrument names"
            ));
        };
        let next = calls.get(i + 1).map_or(source.len(), |c| c.1);
        let chain_end = source[*end..next]
            .find(".build()")
            .map_or(next, |at| end + at);
        let unit = unit
            .captures(&source[*end..chain_end])
            .map(|c| c[1].to_owned())
            .unwrap_or_default();
        found.push(Found {
            name: name[1].to_owned(),
            unit,
            kind: method.clone(),
            file: file.to_owned(),
        });
    }
    Ok(found)
}

/// The Prometheus series every instrument of the gateway and the operator yields.
fn exported() -> BTreeMap<String, Found> {
    let root = root();
    let mut files = Vec::new();
    for krate in ["gateway/src", "operator/src"] {
        rust_files(&root.join(krate), &mut files);
    }
    let mut out = BTreeMap::new();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        let rel = file.strip_prefix(&root).unwrap().display().to_string();
        for found in instruments_in(&source, &rel).unwrap_or_else(|e| panic!("{e}")) {
            let kind = Kind::from_meter_method(&found.kind).unwrap();
            for name in series(kind, &found.name, &found.unit) {
                out.insert(name, found.clone());
            }
        }
    }
    out
}

/// The metric names a PromQL expression selects (not functions, labels or keywords).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    // `label_values(selector, label)` (a Grafana variable query): only the selector.
    let label_values =
        Regex::new(r"^\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$").unwrap();
    if let Some(c) = label_values.captures(expr) {
        return metrics_in(&c[1]);
    }
    let strings = Regex::new(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`"#).unwrap();
    let matchers = Regex::new(r"\{[^}]*\}").unwrap();
    let ranges = Regex::new(r"\[[^\]]*\]").unwrap();
    let label_lists =
        Regex::new(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)").unwrap();
    let token = Regex::new(r"[a-zA-Z_:][a-zA-Z0-9_:]*").unwrap();
    let keywords = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "Inf",
        "NaN",
    ];
    let expr = strings.replace_all(expr, "\"\"");
    let expr = matchers.replace_all(&expr, " ");
    let expr = ranges.replace_all(&expr, " ");
    let expr = label_lists.replace_all(&expr, " ");
    let mut out = BTreeSet::new();
    for m in token.find_iter(&expr) {
        let before = expr[..m.start()].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_digit() || c == '.' || c == '$') {
            continue; // 1e3, $variable
        }
        if expr[m.end()..].trim_start().starts_with('(') || keywords.contains(&m.as_str()) {
            continue; // a function or an aggregation
        }
        out.insert(m.as_str().to_owned());
    }
    out
}

/// Every query of a dashboard: (where, expression).
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            panels(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    let mut out = Vec::new();
    for p in all {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((format!("panel {:?}", p["title"]), expr.to_owned()));
            }
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = v["query"]["query"].as_str().or(v["query"].as_str());
        if v["type"] == "query"
            && let Some(q) = query
        {
            out.push((format!("variable {:?}", v["name"]), q.to_owned()));
        }
    }
    out
}

/// What is wrong with `dashboard` against the `exported` series.
fn problems(dashboard: &Value, exported: &BTreeMap<String, Found>) -> Vec<String> {
    let mut out = Vec::new();
    for (place, expr) in queries(dashboard) {
        let names = metrics_in(&expr);
        if names.is_empty() {
            out.push(format!("{place}: no metric in `{expr}`"));
        }
        for name in names {
            if !exported.contains_key(&name) {
                out.push(format!(
                    "{place}: `{name}` is not exported by the code (in `{expr}`)"
                ));
            }
        }
    }
    out
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("charts/tether/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            out.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let exported = exported();
    // The scan found the instruments both binaries are known for.
    for must in [
        "tether_connections_active",
        "tether_handshakes_total",
        "tether_push_duration_seconds_bucket",
        "tether_operator_reconciles_total",
    ] {
        assert!(
            exported.contains_key(must),
            "{must} not found: {:?}",
            exported.keys()
        );
    }
    let boards = dashboards();
    assert_eq!(
        boards.iter().map(|b| b.0.as_str()).collect::<Vec<_>>(),
        ["tether-gateway.json", "tether-operator.json"]
    );
    let mut all = Vec::new();
    for (file, board) in &boards {
        all.extend(
            problems(board, &exported)
                .into_iter()
                .map(|p| format!("{file}: {p}")),
        );
    }
    assert!(all.is_empty(), "dashboard problems:\n{}", all.join("\n"));
}

#[test]
fn dashboards_are_well_formed_and_documented() {
    let docs = std::fs::read_to_string(root().join("docs/observability.md")).unwrap();
    for (file, board) in dashboards() {
        let uid = board["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty() && uid.len() <= 40, "{file}: uid {uid:?}");
        assert!(
            board["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: title"
        );
        let mut ids = BTreeSet::new();
        for panel in board["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(
                ids.insert(panel["id"].as_i64().unwrap()),
                "{file}: duplicate id in {title:?}"
            );
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {title:?} uses the dashboard's data source variable"
            );
            assert!(
                panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{file}: {title:?} has no query"
            );
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{file}: {title:?} has no description"
            );
            assert!(
                docs.contains(&format!("**{title}**")),
                "{file}: panel {title:?} is not described in docs/observability.md"
            );
        }
    }
}

#[test]
fn promql_names_are_told_from_functions_labels_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, outcome) (rate(tether_push_duration_seconds_bucket{tether_pool=~"$pool", op="push"}[$__rate_interval]))) / on (instance) group_left (k8s_pod_name) max without (le) (tether_operator_leader offset 5m) > bool 1e3"#;
    assert_eq!(
        metrics_in(expr),
        BTreeSet::from([
            "tether_push_duration_seconds_bucket".to_owned(),
            "tether_operator_leader".to_owned()
        ])
    );
    assert_eq!(
        metrics_in(r#"label_values(tether_connections_active{ns=~"$namespace"}, tether_pool)"#),
        BTreeSet::from(["tether_connections_active".to_owned()])
    );
}

#[test]
fn a_query_on_a_metric_nobody_exports_is_reported() {
    let exported = exported();
    let board = serde_json::json!({
        "panels": [{"title": "ghost", "targets": [{"expr": "sum(rate(tether_ghosts_total[5m]))"}]}],
    });
    let found = problems(&board, &exported);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("tether_ghosts_total"), "{found:?}");
}

#[test]
fn instrument_scan_reads_names_units_and_refuses_computed_names() {
    let source = r#"
        let a = meter.f64_histogram("x.duration").with_unit("s").with_description("d").build();
        let b = meter.u64_counter("x.count")
            .build();
        let c = helper(meter.f64_observable_gauge("x.age").with_unit("s"), &pools);
        let d = meter.i64_up_down_counter("x.active").build();
    "#;
    let found = instruments_in(source, "src.rs").unwrap();
    let got: Vec<_> = found
        .iter()
        .map(|f| (f.name.as_str(), f.unit.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("x.duration", "s"),
            ("x.count", ""),
            ("x.age", "s"),
            ("x.active", "")
        ]
    );
    let err = instruments_in("meter.u64_counter(NAME).build()", "src.rs").unwrap_err();
    assert!(err.contains("string literal"), "{err}");
}

/// The metric names of a Prometheus text exposition (not `# HELP`/`# TYPE` lines).
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_gateways_metrics_endpoint_serves_the_names_the_dashboards_query() {
    let _telemetry =
        tether_telemetry::init(tether_telemetry::Options::new("tether-gateway").prometheus(true))
            .unwrap();
    const SECRET: &str = "integration-secret-of-at-least-32-bytes";
    const KEY: &str = "integration-key-0123456789";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("keys"), format!("{KEY}\n")).unwrap();
    let mut config = tether_config::GatewayConfig::default();
    config.listen.public = "127.0.0.1:0".into();
    config.listen.internal = "127.0.0.1:0".into();
    config.auth.jwt.hs256_secret_file = Some(dir.path().join("secret"));
    config.auth.api_keys_file = Some(dir.path().join("keys"));
    let gateway = tether_gateway::Gateway::start(config, "g-0".into())
        .await
        .unwrap();
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let agent = tether_agent::Agent::builder(
        format!("ws://{}/v1/connect", gateway.public_addr()),
        tether_agent::Hs256Minter::new(SECRET.as_bytes(), "a1"),
    )
    .on_push(move |push| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(push.id);
        }
    })
    .start()
    .unwrap();
    agent.connected().await.unwrap();
    let http = reqwest::Client::new();
    let resp = tether_test_support::push_api::push(
        &http,
        gateway.internal_addr(),
        KEY,
        "a1",
        &serde_json::json!({"n": 1}),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 202);
    pushes.recv().await.unwrap();

    let resp = http
        .get(format!("http://{}/metrics", gateway.internal_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
    );
    let text = resp.text().await.unwrap();
    let scraped = scraped_names(&text);
    let exported = exported();
    let unknown: Vec<_> = scraped
        .iter()
        .filter(|n| n.starts_with("tether_") && !exported.contains_key(*n))
        .collect();
    assert!(
        unknown.is_empty(),
        "/metrics serves names the source scan does not know: {unknown:?}"
    );
    for must in [
        "tether_connections_active",
        "tether_handshakes_total",
        "tether_push_duration_seconds_bucket",
        "tether_messages_sent_total",
    ] {
        assert!(scraped.contains(must), "{must} not scraped:\n{text}");
    }
    // The gateway dashboard's queries name these; each one it names that the run above
    // produced is served under exactly the name the dashboard uses.
    let (_, board) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "tether-gateway.json")
        .unwrap();
    let queried: BTreeSet<String> = queries(&board)
        .iter()
        .flat_map(|(_, expr)| metrics_in(expr))
        .collect();
    let served = queried.intersection(&scraped).count();
    assert!(
        served >= 4,
        "the dashboard's core series come from /metrics: {served} of {queried:?}"
    );
    agent.close().await;
    gateway.drain();
    gateway.wait().await;
}

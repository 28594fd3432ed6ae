//! The printed table: one row per target, the mode's columns, and Tether's advantage
//! over each peer (a ratio > 1 means Tether is better on that figure).

use std::fmt::Write;

use crate::run::{Common, TargetResult};

/// Renders the results of one run.
pub fn table(mode: &str, c: &Common, results: &[TargetResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{mode}: {} connections, {} targets (peers do not authenticate; tether verifies a JWT per connection)\n",
        c.connections,
        results.len()
    );
    let mut rows: Vec<Vec<String>> = vec![vec![
        "target".into(),
        "shards".into(),
        "ok".into(),
        "failed".into(),
        "conn/s".into(),
        "conn/cpu-s".into(),
        "sys %".into(),
        "hs p50 ms".into(),
        "hs p99 ms".into(),
        "rss MiB".into(),
        "rss B/conn".into(),
        "kernel B/conn".into(),
    ]];
    for r in results {
        rows.push(vec![
            r.target.clone(),
            r.shards.to_string(),
            r.connections_ok.to_string(),
            r.failed.values().sum::<u64>().to_string(),
            format!("{:.0}", r.handshakes_per_s),
            format!("{:.0}", r.handshakes_per_cpu_s),
            percent(r.connect_sys_cpu_s, r.connect_cpu_s),
            format!("{:.2}", r.handshake_p50_ms),
            format!("{:.2}", r.handshake_p99_ms),
            format!("{:.1}", r.rss_kib as f64 / 1024.0),
            format!("{:.0}", r.rss_per_conn_bytes),
            format!("{:.0}", r.kernel_per_conn_bytes),
        ]);
    }
    render(&mut out, &rows);
    // `million` runs every phase on the same connections: one table per phase.
    let sections: &[&str] = if mode == "million" {
        &["idle", "push", "broadcast", "churn", "end"]
    } else {
        std::slice::from_ref(&mode)
    };
    for section in sections {
        if mode == "million" {
            let _ = writeln!(out, "\n{section}:");
        }
        section_table(&mut out, section, results);
    }
    ratios(&mut out, mode, results);
    floor(&mut out, mode, results);
    out
}

/// The table of one phase (`push`, `broadcast`, …); nothing for `connect`.
fn section_table(out: &mut String, mode: &str, results: &[TargetResult]) {
    let mode_rows: Option<Vec<Vec<String>>> = match mode {
        "idle" => Some(
            std::iter::once(
                [
                    "target",
                    "seconds",
                    "cpu-s",
                    "cores/1M conn",
                    "pings",
                    "µs/ping",
                    "client cpu-s",
                ]
                .map(String::from)
                .to_vec(),
            )
            .chain(results.iter().filter_map(|r| {
                let i = r.idle.as_ref()?;
                Some(vec![
                    r.target.clone(),
                    format!("{:.1}", i.seconds),
                    format!("{:.2}", i.server_cpu_s),
                    format!("{:.3}", i.cores_per_million),
                    i.pings.to_string(),
                    format!("{:.1}", i.us_per_ping),
                    format!("{:.2}", i.client_cpu_s),
                ])
            }))
            .collect(),
        ),
        "end" => Some(
            std::iter::once(["target", "open", "dropped"].map(String::from).to_vec())
                .chain(results.iter().filter_map(|r| {
                    let e = r.end.as_ref()?;
                    Some(vec![
                        r.target.clone(),
                        e.open.to_string(),
                        e.dropped.to_string(),
                    ])
                }))
                .collect(),
        ),
        "push" | "request" => Some(
            std::iter::once(
                [
                    "target",
                    "scheduled",
                    "not sent",
                    "sent",
                    "accepted",
                    "delivered",
                    "errors",
                    "msg/s",
                    "p50 ms",
                    "p99 ms",
                    "p999 ms",
                    "max ms",
                    "send lag p99 ms",
                    "cpu-s",
                ]
                .map(String::from)
                .to_vec(),
            )
            .chain(results.iter().filter_map(|r| {
                let l = r.latency.as_ref()?;
                Some(vec![
                    r.target.clone(),
                    l.scheduled.to_string(),
                    l.not_sent.to_string(),
                    l.sent.to_string(),
                    l.accepted.to_string(),
                    l.delivered.to_string(),
                    (l.errors.values().sum::<u64>() - l.not_sent).to_string(),
                    format!("{:.0}", l.rate),
                    format!("{:.2}", l.p50_ms),
                    format!("{:.2}", l.p99_ms),
                    format!("{:.2}", l.p999_ms),
                    format!("{:.2}", l.max_ms),
                    format!("{:.2}", l.send_lag_p99_ms),
                    format!("{:.2}", l.server_cpu_s),
                ])
            }))
            .collect(),
        ),
        "broadcast" => Some(
            std::iter::once(
                [
                    "target",
                    "expected",
                    "delivered",
                    "deliv/s",
                    "cpu-s",
                    "deliv/cpu-s",
                    "sys %",
                    "p50 ms",
                    "p99 ms",
                ]
                .map(String::from)
                .to_vec(),
            )
            .chain(results.iter().filter_map(|r| {
                let b = r.broadcast.as_ref()?;
                Some(vec![
                    r.target.clone(),
                    b.expected.to_string(),
                    b.delivered.to_string(),
                    format!("{:.0}", b.deliveries_per_s),
                    format!("{:.2}", b.server_cpu_s),
                    format!("{:.0}", b.deliveries_per_cpu_s),
                    percent(b.server_sys_cpu_s, b.server_cpu_s),
                    format!("{:.2}", b.p50_ms),
                    format!("{:.2}", b.p99_ms),
                ])
            }))
            .collect(),
        ),
        "churn" => Some(
            std::iter::once(
                [
                    "target", "closed", "back", "seconds", "reconn/s", "p50 ms", "p99 ms", "cpu-s",
                ]
                .map(String::from)
                .to_vec(),
            )
            .chain(results.iter().filter_map(|r| {
                let ch = r.churn.as_ref()?;
                Some(vec![
                    r.target.clone(),
                    ch.closed.to_string(),
                    ch.back.to_string(),
                    format!("{:.2}", ch.elapsed_s),
                    format!("{:.0}", ch.reconnects_per_s),
                    format!("{:.2}", ch.p50_ms),
                    format!("{:.2}", ch.p99_ms),
                    format!("{:.2}", ch.server_cpu_s),
                ])
            }))
            .collect(),
        ),
        _ => None,
    };
    if let Some(rows) = mode_rows {
        out.push('\n');
        render(out, &rows);
    }
    if matches!(mode, "push" | "request") {
        // Every message the table does not count as accepted, by cause: nothing is
        // left out silently.
        for r in results {
            if let Some(l) = r.latency.as_ref().filter(|l| !l.errors.is_empty()) {
                let causes: Vec<String> = l
                    .errors
                    .iter()
                    .map(|(cause, n)| format!("{cause}: {n}"))
                    .collect();
                let _ = writeln!(out, "  {} errors: {}", r.target, causes.join(", "));
            }
        }
    }
}

/// With the `limit` target in the run: tether's cost split into the floor (what the
/// kernel and any server must pay, measured by `limit`) and the rest (ours).
fn floor(out: &mut String, mode: &str, results: &[TargetResult]) {
    let (Some(t), Some(l)) = (
        results
            .iter()
            .find(|r| r.target == "tether" && r.connections_ok > 0),
        results
            .iter()
            .find(|r| r.target == "limit" && r.connections_ok > 0),
    ) else {
        return;
    };
    let per = |rate: f64| if rate > 0.0 { 1e6 / rate } else { f64::NAN };
    let mut parts = vec![
        format!(
            "rss/conn {:.0} B = {:.0} floor + {:.0} ours ({:.1}x the floor)",
            t.rss_per_conn_bytes,
            l.rss_per_conn_bytes,
            t.rss_per_conn_bytes - l.rss_per_conn_bytes,
            t.rss_per_conn_bytes / l.rss_per_conn_bytes.max(1.0),
        ),
        format!(
            "cpu/handshake {:.1} µs = {:.1} floor + {:.1} ours",
            per(t.handshakes_per_cpu_s),
            per(l.handshakes_per_cpu_s),
            per(t.handshakes_per_cpu_s) - per(l.handshakes_per_cpu_s),
        ),
    ];
    if matches!(mode, "broadcast" | "million")
        && let (Some(tb), Some(lb)) = (&t.broadcast, &l.broadcast)
    {
        parts.push(format!(
            "cpu/delivery {:.2} µs = {:.2} floor + {:.2} ours ({:.2}x the floor's deliveries/cpu-s)",
            per(tb.deliveries_per_cpu_s),
            per(lb.deliveries_per_cpu_s),
            per(tb.deliveries_per_cpu_s) - per(lb.deliveries_per_cpu_s),
            tb.deliveries_per_cpu_s / lb.deliveries_per_cpu_s.max(1e-9),
        ));
    }
    if let (Some(ti), Some(li)) = (&t.idle, &l.idle) {
        parts.push(format!(
            "idle cpu/ping {:.1} µs = {:.1} floor + {:.1} ours ({:.2}x the floor)",
            ti.us_per_ping,
            li.us_per_ping,
            ti.us_per_ping - li.us_per_ping,
            ti.us_per_ping / li.us_per_ping.max(1e-9),
        ));
    }
    let _ = writeln!(
        out,
        "\ntether over the floor (limit: no framework, no auth, no idle buffers):"
    );
    for part in parts {
        let _ = writeln!(out, "  {part}");
    }
}

fn ratios(out: &mut String, mode: &str, results: &[TargetResult]) {
    let Some(tether) = results.iter().find(|r| r.target == "tether") else {
        return;
    };
    let _ = writeln!(
        out,
        "\ntether's advantage (peer ÷ tether for costs, tether ÷ peer for rates; > 1 = tether better):"
    );
    for peer in results
        .iter()
        .filter(|r| r.target != "tether" && r.connections_ok > 0)
    {
        let mut parts = vec![
            format!(
                "rss/conn {}",
                ratio(peer.rss_per_conn_bytes, tether.rss_per_conn_bytes)
            ),
            format!(
                "conn/cpu-s {}",
                ratio(tether.handshakes_per_cpu_s, peer.handshakes_per_cpu_s)
            ),
        ];
        match mode {
            "push" | "request" => {
                if let (Some(t), Some(p)) = (&tether.latency, &peer.latency) {
                    parts.push(format!("p99 {}", ratio(p.p99_ms, t.p99_ms)));
                }
            }
            "million" => {
                if let (Some(t), Some(p)) = (&tether.latency, &peer.latency) {
                    parts.push(format!("p99 {}", ratio(p.p99_ms, t.p99_ms)));
                }
                if let (Some(t), Some(p)) = (&tether.broadcast, &peer.broadcast) {
                    parts.push(format!(
                        "deliv/cpu-s {}",
                        ratio(t.deliveries_per_cpu_s, p.deliveries_per_cpu_s)
                    ));
                }
            }
            "broadcast" => {
                if let (Some(t), Some(p)) = (&tether.broadcast, &peer.broadcast) {
                    parts.push(format!(
                        "deliv/cpu-s {}",
                        ratio(t.deliveries_per_cpu_s, p.deliveries_per_cpu_s)
                    ));
                }
            }
            "churn" => {
                if let (Some(t), Some(p)) = (&tether.churn, &peer.churn) {
                    parts.push(format!(
                        "reconn/s {}",
                        ratio(t.reconnects_per_s, p.reconnects_per_s)
                    ));
                }
            }
            _ => {}
        }
        let _ = writeln!(out, "  vs {:<18} {}", peer.target, parts.join("  "));
    }
}

/// The kernel's share of a CPU figure (stime ÷ utime+stime).
fn percent(part: f64, whole: f64) -> String {
    if whole <= 0.0 {
        return "n/a".into();
    }
    format!("{:.0}", 100.0 * part / whole)
}

fn ratio(numerator: f64, denominator: f64) -> String {
    if denominator <= 0.0 || !numerator.is_finite() {
        return "n/a".into();
    }
    format!("{:.2}x", numerator / denominator)
}

fn render(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (n, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == 0 {
                    format!("{cell:<w$}", w = widths[i])
                } else {
                    format!("{cell:>w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "| {} |", line.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    if i == 0 {
                        format!(":{}", "-".repeat(w.saturating_sub(1).max(1)))
                    } else {
                        format!("{}:", "-".repeat(w.saturating_sub(1).max(1)))
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "|{}|",
                rule.iter()
                    .map(|r| format!(" {r} "))
                    .collect::<Vec<_>>()
                    .join("|")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_point_the_right_way() {
        assert_eq!(ratio(10.0, 5.0), "2.00x");
        assert_eq!(ratio(1.0, 0.0), "n/a");
    }

    #[test]
    fn the_floor_line_splits_tether_cost() {
        let results = vec![
            TargetResult {
                target: "tether".into(),
                connections_ok: 10,
                rss_per_conn_bytes: 2000.0,
                handshakes_per_cpu_s: 10_000.0,
                ..Default::default()
            },
            TargetResult {
                target: "limit".into(),
                connections_ok: 10,
                rss_per_conn_bytes: 500.0,
                handshakes_per_cpu_s: 40_000.0,
                ..Default::default()
            },
        ];
        let mut out = String::new();
        floor(&mut out, "connect", &results);
        assert!(
            out.contains("rss/conn 2000 B = 500 floor + 1500 ours (4.0x the floor)")
                && out.contains("cpu/handshake 100.0 µs = 25.0 floor + 75.0 ours"),
            "{out}"
        );
        let mut out = String::new();
        floor(&mut out, "connect", &results[..1]);
        assert!(out.is_empty(), "no floor line without limit: {out}");
    }

    #[test]
    fn table_has_a_row_per_target_and_a_ratio_line() {
        let results = vec![
            TargetResult {
                target: "tether".into(),
                connections_ok: 10,
                rss_per_conn_bytes: 1000.0,
                handshakes_per_cpu_s: 100.0,
                ..Default::default()
            },
            TargetResult {
                target: "node-ws".into(),
                connections_ok: 10,
                rss_per_conn_bytes: 5000.0,
                handshakes_per_cpu_s: 50.0,
                ..Default::default()
            },
        ];
        let c = <crate::run::Args as clap::Parser>::parse_from(["tether-bench", "connect"]);
        let crate::run::Mode::Connect(common) = c.mode else {
            panic!()
        };
        let text = table("connect", &common, &results);
        assert!(text.contains("| tether "), "{text}");
        assert!(
            text.contains("vs node-ws")
                && text.contains("rss/conn 5.00x")
                && text.contains("conn/cpu-s 2.00x"),
            "{text}"
        );
    }
}

//! How an OTel instrument's name becomes Prometheus series names.
//!
//! The OTel → Prometheus compatibility rules, as the Prometheus reader of this crate
//! (`opentelemetry-prometheus`), the OTel Collector's Prometheus exporters and
//! Prometheus' own OTLP receiver apply them:
//!
//! - characters other than `[a-zA-Z0-9_:]` become `_` (`tether.push.duration` →
//!   `tether_push_duration`);
//! - a known unit is appended (`s` → `_seconds`, `By` → `_bytes`, `1` → `_ratio`);
//!   annotations such as `{connection}` are dropped;
//! - monotonic counters end in `_total`; histograms are three series, `_bucket`, `_sum`
//!   and `_count`; up-down counters and gauges are gauges, named as they are.
//!
//! Dashboards are written against these names; the dashboard test turns the names the
//! code creates into these series and checks every query against them. A unit test
//! keeps this module and the real exporter in agreement.

/// The kind of an OTel instrument, as far as its Prometheus names are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Monotonic sum (`u64_counter`, `f64_observable_counter`, ...).
    Counter,
    /// Non-monotonic sum (`i64_up_down_counter`, ...): a Prometheus gauge.
    UpDownCounter,
    /// Last value (`f64_gauge`, `i64_observable_gauge`, ...).
    Gauge,
    /// Explicit-bucket histogram.
    Histogram,
}

// === impl Kind ===

impl Kind {
    /// The kind created by a `Meter` method such as `u64_counter` or
    /// `i64_observable_up_down_counter`; `None` for any other method.
    pub fn from_meter_method(method: &str) -> Option<Kind> {
        let (number, rest) = method.split_once('_')?;
        if !matches!(number, "u64" | "i64" | "f64") {
            return None;
        }
        let rest = rest.strip_prefix("observable_").unwrap_or(rest);
        match rest {
            "counter" => Some(Kind::Counter),
            "up_down_counter" => Some(Kind::UpDownCounter),
            "gauge" => Some(Kind::Gauge),
            "histogram" => Some(Kind::Histogram),
            _ => None,
        }
    }
}

fn unit_suffix(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "1" => "ratio",
        "%" => "percent",
        _ => return None,
    })
}

/// The Prometheus metric name of an instrument, before the kind's suffixes.
pub fn base_name(name: &str, unit: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    if let Some(suffix) = unit_suffix(unit) {
        out.push('_');
        out.push_str(suffix);
    }
    out
}

/// Every Prometheus series name an instrument yields.
pub fn series(kind: Kind, name: &str, unit: &str) -> Vec<String> {
    let base = base_name(name, unit);
    match kind {
        Kind::Counter if base.ends_with("_total") => vec![base],
        Kind::Counter => vec![format!("{base}_total")],
        Kind::UpDownCounter | Kind::Gauge => vec![base],
        Kind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use opentelemetry::metrics::MeterProvider as _;

    use super::*;

    #[test]
    fn meter_methods_map_to_kinds() {
        assert_eq!(Kind::from_meter_method("u64_counter"), Some(Kind::Counter));
        assert_eq!(
            Kind::from_meter_method("f64_observable_counter"),
            Some(Kind::Counter)
        );
        assert_eq!(
            Kind::from_meter_method("i64_observable_up_down_counter"),
            Some(Kind::UpDownCounter)
        );
        assert_eq!(Kind::from_meter_method("f64_gauge"), Some(Kind::Gauge));
        assert_eq!(
            Kind::from_meter_method("f64_histogram"),
            Some(Kind::Histogram)
        );
        assert_eq!(Kind::from_meter_method("meter"), None);
        assert_eq!(Kind::from_meter_method("u64_things"), None);
    }

    /// The names here are the names the real exporter writes, for every kind and unit
    /// the project uses.
    #[test]
    fn agrees_with_the_prometheus_exporter() {
        let (provider, text) = crate::prometheus_meter_provider("names-test").unwrap();
        let meter = provider.meter("names-test");
        meter.u64_counter("a.count").build().add(1, &[]);
        meter
            .u64_counter("a.bytes.sent")
            .with_unit("By")
            .build()
            .add(1, &[]);
        meter
            .i64_up_down_counter("b.active")
            .with_unit("{connection}")
            .build()
            .add(1, &[]);
        meter
            .f64_gauge("c.level")
            .with_unit("1")
            .build()
            .record(0.5, &[]);
        meter
            .f64_histogram("d.duration")
            .with_unit("s")
            .build()
            .record(0.1, &[]);
        let _observed = meter
            .i64_observable_gauge("e.age")
            .with_unit("s")
            .with_callback(|o| o.observe(3, &[]))
            .build();
        let _observed_count = meter
            .u64_observable_counter("f.seen")
            .with_callback(|o| o.observe(3, &[]))
            .build();

        let expected: BTreeSet<String> = [
            series(Kind::Counter, "a.count", ""),
            series(Kind::Counter, "a.bytes.sent", "By"),
            series(Kind::UpDownCounter, "b.active", "{connection}"),
            series(Kind::Gauge, "c.level", "1"),
            series(Kind::Histogram, "d.duration", "s"),
            series(Kind::Gauge, "e.age", "s"),
            series(Kind::Counter, "f.seen", ""),
        ]
        .into_iter()
        .flatten()
        .collect();
        let out = text.encode();
        let exported: BTreeSet<String> = out
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
            .filter(|n| n != "target_info")
            .collect();
        assert_eq!(exported, expected, "{out}");
    }
}

//! Measurements: latency histograms (shipped between processes), and what the kernel
//! says about a process (RSS, CPU time) and about TCP socket memory.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer, V2Serializer},
};

/// A latency histogram in microseconds (1 µs .. 1 h, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"))
    }
}

impl Hist {
    /// Records one sample in microseconds (clamped into range).
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    /// Merges another histogram.
    pub fn add(&mut self, other: &Hist) {
        let _ = self.0.add(&other.0);
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether no sample was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A quantile in milliseconds (0 when empty).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// Base64 of the HdrHistogram V2 encoding, for the worker protocol.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .expect("serializing into a Vec");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Decodes [`Hist::encode`].
    pub fn decode(text: &str) -> anyhow::Result<Self> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
        let hist = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
        Ok(Self(hist))
    }
}

/// Nanoseconds since the Unix epoch: the clock shared by all bench processes (they run
/// on one machine, so push latency is measured across processes with it).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// Resident set size of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_status_kib(&status, "VmRSS:").context("no VmRSS line")
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU time of a process, in seconds (`/proc/<pid>/stat` fields 14 and
/// 15, in clock ticks of 1/100 s, the value on every Linux this runs on).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu(&stat).context("unexpected /proc/pid/stat format")
}

/// CPU seconds a process spent in the kernel (stime): syscalls, the TCP stack, epoll.
pub fn sys_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_times(&stat)
        .map(|(_, sys)| sys)
        .context("unexpected /proc/pid/stat format")
}

fn parse_stat_cpu(stat: &str) -> Option<f64> {
    parse_stat_times(stat).map(|(user, sys)| user + sys)
}

/// (utime, stime) in seconds.
fn parse_stat_times(stat: &str) -> Option<(f64, f64)> {
    // The command name (field 2) may contain spaces; fields after its ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime as f64 / 100.0, stime as f64 / 100.0))
}

/// Kernel memory of all TCP sockets, in bytes (`TCP: ... mem N` of
/// `/proc/net/sockstat`, in 4 KiB pages).
pub fn tcp_socket_mem_bytes() -> anyhow::Result<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    parse_sockstat_mem(&sockstat).context("no TCP mem in /proc/net/sockstat")
}

fn parse_sockstat_mem(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            return words.next()?.parse::<u64>().ok().map(|pages| pages * 4096);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let status = "Name:\tx\nVmPeak:\t  9 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(12345));
        let stat = "42 (my proc) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 1000 10";
        assert_eq!(parse_stat_cpu(stat), Some(3.0));
        assert_eq!(parse_stat_times(stat), Some((2.5, 0.5)));
        let sockstat =
            "sockets: used 300\nTCP: inuse 10 orphan 0 tw 2 alloc 12 mem 7\nUDP: inuse 1 mem 0\n";
        assert_eq!(parse_sockstat_mem(sockstat), Some(7 * 4096));
    }

    #[test]
    fn histograms_survive_the_worker_protocol() {
        let mut h = Hist::default();
        for us in [100, 200, 300, 10_000] {
            h.record_us(us);
        }
        let back = Hist::decode(&h.encode()).unwrap();
        assert_eq!(back.len(), 4);
        assert!((back.quantile_ms(1.0) - 10.0).abs() < 0.1);
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
        assert!(sys_cpu_seconds(std::process::id()).unwrap() >= 0.0);
        tcp_socket_mem_bytes().unwrap();
    }
}

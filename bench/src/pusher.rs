//! The push driver: open-loop pushes at a fixed rate over a few persistent, pipelined
//! HTTP/1.1 connections ("lanes") per shard.
//!
//! A `reqwest` request costs the driver tens of µs of CPU and a task; on two shared
//! cores at 10,000 msg/s that was enough for the driver to fall behind, pile up 4,096
//! requests in flight and drop most pushes before sending them (the million's push
//! phase measured nothing). Here a push is a formatted request appended to its lane's
//! buffer; each lane's writer sends whatever accumulated in one `write`, its reader
//! parses the answers in order (HTTP/1.1 pipelining: every server here answers a
//! connection's requests in order):
//!
//! ```text
//!   schedule (message i at i / rate) ──► agent ──► shard's lane (round robin)
//!       └─ lane full (`depth` unanswered) ──► counted: "not sent: driver saturated"
//!   lane writer ──write──► server       lane reader ◄──responses── server (count by status)
//! ```
//!
//! Nothing is dropped silently: every scheduled push ends as accepted (2xx), an error by
//! status or cause, or not sent with its reason. How late the driver itself sent each
//! push against its schedule is measured too (`lag`): when it grows, the machine — not
//! the server under test — is the bottleneck.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Notify,
    task::JoinSet,
};

use crate::stats::{Hist, unix_nanos};

/// Cause counted when a lane already has `depth` unanswered pushes.
pub const SATURATED: &str = "not sent: driver saturated";
/// Cause counted for pushes routed to a lane whose connection was lost.
pub const LANE_LOST: &str = "not sent: connection lost";
/// Cause counted for pushes sent on a connection that was lost before answering.
pub const LOST_IN_FLIGHT: &str = "connection lost";
/// Cause counted for pushes still unanswered at the end.
pub const NO_ANSWER: &str = "no answer";

/// A lock's guard; a panic elsewhere does not make the counts unreadable.
fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Largest response head the reader accepts.
const MAX_HEAD: usize = 16 * 1024;

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushApi {
    /// Each shard's push API address; agent `n` lives on shard `n % shards.len()`.
    pub shards: Vec<SocketAddr>,
    /// Tether's path form (`/v1/agents/{id}/messages`) or the peers' (`/push/{id}`).
    pub tether: bool,
    /// The API key (Tether), sent as a bearer token.
    pub key: Option<String>,
}

impl PushApi {
    /// The request pushing `body` to agent `agent`, as bytes on the wire.
    pub fn request(&self, agent: u64, body: &str, into: &mut Vec<u8>) {
        use std::io::Write;
        let shard = self.shards[(agent % self.shards.len() as u64) as usize];
        let _ = if self.tether {
            write!(into, "POST /v1/agents/agent-{agent}/messages HTTP/1.1\r\n")
        } else {
            write!(into, "POST /push/agent-{agent} HTTP/1.1\r\n")
        };
        let _ = write!(
            into,
            "Host: {shard}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(key) = &self.key {
            let _ = write!(into, "Authorization: Bearer {key}\r\n");
        }
        into.extend_from_slice(b"\r\n");
        into.extend_from_slice(body.as_bytes());
    }
}

/// How a push run is paced and bounded.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Pushes per second.
    pub rate: f64,
    /// Pushes in all.
    pub total: u64,
    /// Connections per shard.
    pub lanes_per_shard: usize,
    /// Most unanswered pushes per connection; a push beyond it is not sent (counted).
    pub depth: usize,
    /// How long to wait for the last answers after the last send.
    pub drain: Duration,
}

/// What became of every scheduled push.
#[derive(Debug, Clone, Default)]
pub struct Pushed {
    /// Written to a connection.
    pub sent: u64,
    /// Answered 2xx.
    pub accepted: u64,
    /// Everything else by status or cause, the pushes not sent included (their causes
    /// start with "not sent").
    pub errors: BTreeMap<String, u64>,
    /// How late each push was appended against its schedule, µs.
    pub lag: Hist,
    /// Seconds from the first scheduled send to the last answer.
    pub elapsed_s: f64,
}

impl Pushed {
    /// Pushes scheduled but never written.
    pub fn not_sent(&self) -> u64 {
        self.errors
            .iter()
            .filter(|(cause, _)| cause.starts_with("not sent"))
            .map(|(_, n)| n)
            .sum()
    }
}

/// One connection's shared state: requests waiting for the writer, and the count of
/// requests written or waiting that are not answered yet.
#[derive(Debug, Default)]
struct LaneState {
    pending: Vec<u8>,
    unanswered: usize,
    lost: bool,
}

/// What a lane says to a push offered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Queued for the writer.
    Queued,
    /// `depth` pushes are unanswered on it already.
    Saturated,
    /// Its connection is gone.
    Lost,
}

/// Whether a lane takes one more push: the pure rule behind [`Lane::offer`].
pub fn admit(unanswered: usize, depth: usize, lost: bool) -> Admission {
    if lost {
        Admission::Lost
    } else if unanswered >= depth {
        Admission::Saturated
    } else {
        Admission::Queued
    }
}

#[derive(Debug, Default)]
struct Lane {
    state: Mutex<LaneState>,
    wake: Notify,
}

impl Lane {
    /// Appends one request (formatted by `write`) unless the lane is full or lost.
    fn offer(&self, depth: usize, write: impl FnOnce(&mut Vec<u8>)) -> Admission {
        let mut state = locked(&self.state);
        let admission = admit(state.unanswered, depth, state.lost);
        if admission == Admission::Queued {
            state.unanswered += 1;
            write(&mut state.pending);
            drop(state);
            self.wake.notify_one();
        }
        admission
    }
}

/// Counts kept by the readers.
#[derive(Debug, Default)]
struct Answers {
    accepted: u64,
    errors: BTreeMap<String, u64>,
    last: Option<Instant>,
}

/// Pushes `pace.total` messages at `pace.rate` to random agents among `agents`, the
/// body of each made by `body` (called when it is sent, so a timestamp in it is the
/// send time), and accounts for every one.
pub async fn run(
    api: &PushApi,
    agents: u64,
    pace: Pace,
    mut body: impl FnMut() -> String,
) -> anyhow::Result<Pushed> {
    let lanes_per_shard = pace.lanes_per_shard.max(1);
    let answers = Arc::new(Mutex::new(Answers::default()));
    let mut tasks = JoinSet::new();
    let mut lanes: Vec<Vec<Arc<Lane>>> = Vec::with_capacity(api.shards.len());
    for addr in &api.shards {
        let mut shard = Vec::with_capacity(lanes_per_shard);
        for _ in 0..lanes_per_shard {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let lane = Arc::new(Lane::default());
            let (reader, writer) = stream.into_split();
            tasks.spawn(write_lane(lane.clone(), writer, answers.clone()));
            tasks.spawn(read_lane(lane.clone(), reader, answers.clone()));
            shard.push(lane);
        }
        lanes.push(shard);
    }

    let mut pushed = Pushed::default();
    let mut not_sent: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut turn = vec![0usize; lanes.len()];
    let rate = pace.rate.max(1e-3);
    let start = Instant::now();
    let mut next = 0u64;
    while next < pace.total {
        // Open loop: push i is due at i / rate, whatever happened to the ones before;
        // everything due by now goes out in this turn.
        let now = Instant::now();
        let due = ((now - start).as_secs_f64() * rate) as u64 + 1;
        while next < due.min(pace.total) {
            let scheduled = start + Duration::from_secs_f64(next as f64 / rate);
            let agent = rand::random_range(0..agents.max(1));
            let shard = (agent % lanes.len() as u64) as usize;
            let lane = &lanes[shard][turn[shard] % lanes_per_shard];
            turn[shard] += 1;
            let admission = lane.offer(pace.depth, |buf| api.request(agent, &body(), buf));
            match admission {
                Admission::Queued => {
                    pushed.sent += 1;
                    pushed.lag.record_us(
                        scheduled
                            .elapsed()
                            .as_micros()
                            .try_into()
                            .unwrap_or(u64::MAX),
                    );
                }
                Admission::Saturated => *not_sent.entry(SATURATED).or_default() += 1,
                Admission::Lost => *not_sent.entry(LANE_LOST).or_default() += 1,
            }
            next += 1;
        }
        if next < pace.total {
            let at = start + Duration::from_secs_f64(next as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
        }
    }

    // The last answers, bounded.
    let deadline = Instant::now() + pace.drain;
    let unanswered = || -> usize {
        lanes
            .iter()
            .flatten()
            .map(|l| {
                let s = locked(&l.state);
                if s.lost { 0 } else { s.unanswered }
            })
            .sum()
    };
    while unanswered() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still = unanswered() as u64;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    let answers = std::mem::take(&mut *locked(&answers));
    pushed.accepted = answers.accepted;
    pushed.errors = answers.errors;
    if still > 0 {
        *pushed.errors.entry(NO_ANSWER.into()).or_default() += still;
    }
    for (cause, n) in not_sent {
        *pushed.errors.entry(cause.into()).or_default() += n;
    }
    pushed.elapsed_s = answers
        .last
        .map_or(start.elapsed(), |last| {
            last.saturating_duration_since(start)
        })
        .as_secs_f64();
    Ok(pushed)
}

/// Marks a lane lost: what it still owed is counted once, and nothing more is queued.
fn lose(lane: &Lane, answers: &Mutex<Answers>) {
    let owed = {
        let mut state = locked(&lane.state);
        if std::mem::replace(&mut state.lost, true) {
            return;
        }
        state.pending.clear();
        std::mem::take(&mut state.unanswered)
    };
    if owed > 0 {
        *locked(answers)
            .errors
            .entry(LOST_IN_FLIGHT.into())
            .or_default() += owed as u64;
    }
}

/// Writes whatever accumulated in the lane, in one write per wake.
async fn write_lane(
    lane: Arc<Lane>,
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    answers: Arc<Mutex<Answers>>,
) {
    let mut batch = Vec::new();
    loop {
        lane.wake.notified().await;
        loop {
            {
                let mut state = locked(&lane.state);
                if state.lost {
                    return;
                }
                std::mem::swap(&mut batch, &mut state.pending);
            }
            if batch.is_empty() {
                break;
            }
            if writer.write_all(&batch).await.is_err() {
                return lose(&lane, &answers);
            }
            batch.clear();
        }
    }
}

/// Reads answers in order and counts them by status.
async fn read_lane(
    lane: Arc<Lane>,
    mut reader: tokio::net::tcp::OwnedReadHalf,
    answers: Arc<Mutex<Answers>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut scratch).await {
            Ok(0) | Err(_) => return lose(&lane, &answers),
            Ok(n) => n,
        };
        buf.extend_from_slice(&scratch[..n]);
        let mut at = 0;
        let mut statuses: Vec<u16> = Vec::new();
        loop {
            match parse_response(&buf[at..]) {
                Ok(Some((status, used))) => {
                    statuses.push(status);
                    at += used;
                }
                Ok(None) => break,
                Err(_) => return lose(&lane, &answers),
            }
        }
        buf.drain(..at);
        if statuses.is_empty() {
            continue;
        }
        {
            let mut state = locked(&lane.state);
            state.unanswered = state.unanswered.saturating_sub(statuses.len());
        }
        let mut answers = locked(&answers);
        for status in statuses {
            if (200..300).contains(&status) {
                answers.accepted += 1;
            } else {
                *answers.errors.entry(status.to_string()).or_default() += 1;
            }
        }
        answers.last = Some(Instant::now());
    }
}

/// One response at the start of `buf`: `Ok(Some((status, bytes)))` when complete
/// (head and a `Content-Length` body), `Ok(None)` while incomplete.
pub fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let Some(head) = crate::lean::parse_head(&mut response, buf, MAX_HEAD)? else {
        return Ok(None);
    };
    let status = response.code.ok_or("no status")?;
    let mut length = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked answers are not expected from a push".into());
        }
    }
    let length = length.unwrap_or(0);
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some((status, head + length)))
}

/// The probe body of a push: the send time in Unix ns, padded to `payload_bytes`.
pub fn probe(payload_bytes: usize) -> String {
    let pad = payload_bytes.saturating_sub(40);
    format!(r#"{{"t":{},"pad":"{}"}}"#, unix_nanos(), "x".repeat(pad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_takes_pushes_up_to_its_depth_and_none_once_lost() {
        assert_eq!(admit(0, 2, false), Admission::Queued);
        assert_eq!(admit(1, 2, false), Admission::Queued);
        assert_eq!(admit(2, 2, false), Admission::Saturated);
        assert_eq!(admit(0, 2, true), Admission::Lost);
    }

    #[test]
    fn responses_are_taken_whole_and_in_order() {
        let two = b"HTTP/1.1 202 Accepted\r\ncontent-length: 9\r\n\r\n{\"id\":1}\nHTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        let (status, used) = parse_response(two).unwrap().unwrap();
        assert_eq!((status, &two[used - 9..used]), (202, &b"{\"id\":1}\n"[..]));
        let (status, rest) = parse_response(&two[used..]).unwrap().unwrap();
        assert_eq!((status, used + rest), (404, two.len()));
        // Cut anywhere before its end, a response waits for more.
        for cut in [5, 30, used - 1] {
            assert_eq!(parse_response(&two[..cut]), Ok(None), "cut {cut}");
        }
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn requests_name_the_agent_its_shard_and_the_key() {
        let api = PushApi {
            shards: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            tether: true,
            key: Some("k".into()),
        };
        let mut out = Vec::new();
        api.request(3, "{}", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v1/agents/agent-3/messages HTTP/1.1\r\n"));
        assert!(text.contains("Host: 127.0.0.1:2\r\n"));
        assert!(text.contains("Authorization: Bearer k\r\n"));
        assert!(text.ends_with("Content-Length: 2\r\nAuthorization: Bearer k\r\n\r\n{}"));
        let peer = PushApi {
            tether: false,
            key: None,
            ..api
        };
        let mut out = Vec::new();
        peer.request(4, "{}", &mut out);
        assert!(out.starts_with(b"POST /push/agent-4 HTTP/1.1\r\n"));
    }
}

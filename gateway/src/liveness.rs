//! Liveness without a timer per connection: one sweeper task per process checks every
//! connection once a second and queues a ping or a close where one is due.
//!
//! The second is cut into [`SWEEP_SLICES`] ticks, each acting on one slice of the
//! connections (by connection id): connections opened together (a reconnect storm, a
//! load test) come due together, and one tick pinging all of them at once is a burst
//! of task wakes, writes and pongs that every push behind it waits for — at 100,000
//! connections it tripled the push p99 (docs/benchmarks.md).
//!
//! Connections opened together would also stay together: a connection is pinged one
//! interval after it was last heard from, and its pong sets that again, so a reconnect
//! storm's connections come due in a wave every interval. So each connection gets a
//! phase ([`phase`], from its id; no byte stored): it counts as quiet since up to one
//! interval before it opened, and its first ping — hence every later one — falls on a
//! second of the interval of its own. The connections accepted in one second are
//! pinged spread evenly over the interval, each still within one interval of opening.
//!
//! A tokio `Sleep` costs over 100 bytes inline in every session future, and re-arming it
//! on each message costs timer-wheel work; at a million idle sockets both add up. Here a
//! connection carries four small atomics ([`Clock`]), its session stamps them as frames
//! arrive, and [`verdict`] — a pure function — decides. Deadlines are second-granular,
//! which is plenty for pings every tens of seconds and token lifetimes in minutes.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tether_config::Limits;
use tether_protocol::CloseCode;

use opentelemetry::metrics::Counter;

use crate::hub::{Connection, Hub, Outbound, take_direct_writes, unix_now};
use crate::metrics::label;

/// Where the process clock starts ([`now_secs`]) instead of 0, ≈ 12 days: a new
/// connection's stamp is set up to one ping interval (at most this much) in the past,
/// which must not wrap below zero in a process that has just started.
pub const CLOCK_START: u32 = 1 << 20;

/// Seconds since the process started plus [`CLOCK_START`]: a compact, monotonic time
/// for per-connection stamps (u32 lasts 136 years).
pub fn now_secs() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed().as_secs();
    CLOCK_START.saturating_add(u32::try_from(elapsed).unwrap_or(u32::MAX))
}

/// A connection's phase: how many seconds before it opened it counts as quiet since,
/// in `0..ping_interval_seconds` (capped at [`CLOCK_START`]), so that its first ping is
/// due `ping_interval_seconds - phase` seconds after it opened.
///
/// Connection ids are handed out in order ([`Hub::next_connection_id`]), so
/// consecutive connections take consecutive phases — in runs of [`SWEEP_SLICES`],
/// one connection per sweep slice: the connections of a burst are spread over every
/// second of the interval and, within each second, over every tick of the sweep.
pub fn phase(id: u64, ping_interval_seconds: u64) -> u32 {
    let interval = ping_interval_seconds.clamp(1, u64::from(CLOCK_START));
    // Below `CLOCK_START`, so it fits.
    ((id / SWEEP_SLICES) % interval) as u32
}

/// Unix seconds as stored in a [`Clock`]: saturated at `u32::MAX` (the year 2106).
fn clamp_unix(secs: u64) -> u32 {
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Per-connection liveness stamps, written by the session and read by the sweeper.
#[derive(Debug)]
pub struct Clock {
    last_inbound: AtomicU32,
    last_data: AtomicU32,
    /// When the unanswered ping was sent, plus one (0: none outstanding).
    ping_sent: AtomicU32,
    /// Unix seconds after which the session ends unless refreshed (32 bits last until
    /// 2106; a later expiry is kept as 2106): 4 bytes less in every connection.
    expires_at: AtomicU32,
}

impl Clock {
    /// A clock for a connection that opened now and expires at `expires_at`.
    pub fn new(expires_at: u64) -> Self {
        let now = now_secs();
        Self {
            last_inbound: AtomicU32::new(now),
            last_data: AtomicU32::new(now),
            ping_sent: AtomicU32::new(0),
            expires_at: AtomicU32::new(clamp_unix(expires_at)),
        }
    }

    /// Counts the connection as quiet since `phase` seconds before it opened
    /// ([`phase`]), so its first ping comes that much earlier. Called once, before the
    /// connection is registered (and the sweeper can see it).
    pub fn set_phase(&self, phase: u32) {
        // The stamp is at least `CLOCK_START`, so this cannot wrap.
        self.last_inbound
            .fetch_sub(phase.min(CLOCK_START), Ordering::Relaxed);
    }

    /// Any frame arrived: the peer is alive. `data` for text and binary messages.
    pub fn touch(&self, data: bool) {
        self.touch_at(now_secs(), data);
    }

    fn touch_at(&self, now: u32, data: bool) {
        self.last_inbound.store(now, Ordering::Relaxed);
        if data {
            self.last_data.store(now, Ordering::Relaxed);
        }
        self.ping_sent.store(0, Ordering::Relaxed);
    }

    /// A refreshed token moved the expiry.
    pub fn set_expiry(&self, expires_at: u64) {
        self.expires_at
            .store(clamp_unix(expires_at), Ordering::Relaxed);
    }

    /// The current expiry (Unix seconds).
    pub fn expires_at(&self) -> u64 {
        u64::from(self.expires_at.load(Ordering::Relaxed))
    }

    fn stamps(&self) -> Stamps {
        let ping = self.ping_sent.load(Ordering::Relaxed);
        Stamps {
            last_inbound: self.last_inbound.load(Ordering::Relaxed),
            last_data: self.last_data.load(Ordering::Relaxed),
            ping_sent: ping.checked_sub(1),
            expires_at: self.expires_at(),
        }
    }

    fn ping_sent_now(&self, now: u32) {
        self.ping_sent.store(now + 1, Ordering::Relaxed);
    }
}

/// A snapshot of a connection's stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamps {
    /// Last frame of any kind (process seconds); before the first, the connection's
    /// opening moved back by its [`phase`].
    pub last_inbound: u32,
    /// Last text or binary message (process seconds).
    pub last_data: u32,
    /// When the outstanding ping was sent, if one is.
    pub ping_sent: Option<u32>,
    /// Token expiry plus grace (Unix seconds).
    pub expires_at: u64,
}

/// What a connection needs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing.
    Fine,
    /// Nothing heard for a ping interval: ask.
    Ping,
    /// End it with this code.
    Close(CloseCode),
}

/// Decides what a connection needs, from its stamps, the time (process seconds and
/// Unix seconds) and the limits.
pub fn verdict(stamps: Stamps, now: u32, unix: u64, limits: &Limits) -> Verdict {
    if unix >= stamps.expires_at {
        return Verdict::Close(CloseCode::TokenExpired);
    }
    let elapsed = |since: u32| u64::from(now.saturating_sub(since));
    if limits.idle_timeout_seconds > 0 && elapsed(stamps.last_data) >= limits.idle_timeout_seconds {
        return Verdict::Close(CloseCode::IdleTimeout);
    }
    match stamps.ping_sent {
        Some(sent) if elapsed(sent) >= limits.pong_timeout_seconds => {
            Verdict::Close(CloseCode::PingTimeout)
        }
        Some(_) => Verdict::Fine,
        None if elapsed(stamps.last_inbound) >= limits.ping_interval_seconds => Verdict::Ping,
        None => Verdict::Fine,
    }
}

/// Ticks per second of the sweep; each acts on the connections whose id falls in its
/// slice, so every connection is still looked at once a second.
pub const SWEEP_SLICES: u64 = 10;

/// Checks every connection once a second, a slice per tick, forever; each tick also
/// adds the frames deliveries wrote straight to sockets ([`take_direct_writes`]) to
/// `sent` (the drivers count the frames they write themselves).
pub async fn sweep(hub: Arc<Hub>, limits: Limits, sent: Counter<u64>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / SWEEP_SLICES as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper = Sweeper::default();
    for slice in (0..SWEEP_SLICES).cycle() {
        tick.tick().await;
        sweeper.tick(&hub, slice, now_secs(), unix_now(), &limits);
        let direct = take_direct_writes();
        if direct > 0 {
            sent.add(direct, &label("kind", "queued"));
        }
    }
}

/// The sweep's state between ticks: the connections found due, by slice.
///
/// Walking every connection on every tick to pick out one slice cost ten passes over
/// the hub per second — the bulk of an idle gateway's CPU at tens of thousands of
/// connections per process, growing with the count. Instead the tick of slice 0 walks
/// the hub once and files the few connections that need something (about one in a
/// ping interval's seconds) under their slice; each tick then acts on its own, so the
/// pings stay spread over the second as before.
#[derive(Debug, Default)]
pub struct Sweeper {
    due: [Vec<Arc<Connection>>; SWEEP_SLICES as usize],
}

impl Sweeper {
    /// One tick for `slice` at `now` (process seconds) and `unix`: on slice 0, one pass
    /// over the hub files what is due; then the slice's connections are checked again
    /// (a pong may have arrived since) and get their ping or close. Returns how many
    /// connections it acted on.
    pub fn tick(&mut self, hub: &Hub, slice: u64, now: u32, unix: u64, limits: &Limits) -> usize {
        if slice == 0 {
            for due in &mut self.due {
                due.clear();
            }
            hub.for_each(|conn| {
                if verdict(conn.clock.stamps(), now, unix, limits) != Verdict::Fine {
                    self.due[(conn.id % SWEEP_SLICES) as usize].push(conn.clone());
                }
            });
        }
        let Some(due) = self.due.get_mut(slice as usize) else {
            return 0;
        };
        let mut acted = 0;
        for conn in due.drain(..) {
            match verdict(conn.clock.stamps(), now, unix, limits) {
                Verdict::Fine => continue,
                Verdict::Ping => {
                    conn.clock.ping_sent_now(now);
                    // One slot over the bound: a ping must not be refused by a full
                    // queue, and a full queue's writes will time the connection out.
                    let _ = conn.enqueue(Outbound::Ping, limits.outbound_queue + 1);
                }
                Verdict::Close(code) => conn.close(code),
            }
            acted += 1;
        }
        acted
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn limits() -> Limits {
        Limits {
            ping_interval_seconds: 30,
            pong_timeout_seconds: 10,
            idle_timeout_seconds: 0,
            ..Limits::default()
        }
    }

    fn stamps() -> Stamps {
        Stamps {
            last_inbound: 100,
            last_data: 100,
            ping_sent: None,
            expires_at: 10_000,
        }
    }

    /// Connections that come due together are pinged a slice per tick, not all at once,
    /// and every one of them exactly once per second.
    #[test]
    fn a_sweep_tick_pings_one_slice_of_the_connections_due() {
        let hub = Hub::new(8, 8);
        let conns: Vec<_> = (0..100u64)
            .map(|i| {
                let conn =
                    Connection::new(hub.next_connection_id(), &format!("a{i}"), vec![], u64::MAX);
                hub.register(&conn);
                conn
            })
            .collect();
        let l = limits();
        let due = now_secs() + l.ping_interval_seconds as u32;
        let mut sweeper = Sweeper::default();
        let per_tick: Vec<usize> = (0..SWEEP_SLICES)
            .map(|slice| sweeper.tick(&hub, slice, due, 0, &l))
            .collect();
        assert_eq!(per_tick, vec![10; SWEEP_SLICES as usize]);
        for conn in &conns {
            assert_eq!(conn.queue_len(), 1, "connection {} pinged once", conn.id);
        }
        // Pinged: nothing more is due until the pong timeout.
        assert_eq!(sweeper.tick(&hub, 0, due, 0, &l), 0);
    }

    /// The pass of slice 0 files what is due; a connection heard from before its own
    /// tick is checked again there and left alone, and one that left the hub meanwhile
    /// is only dropped (its ping goes nowhere).
    #[test]
    fn a_connection_heard_from_before_its_tick_is_not_pinged() {
        let hub = Hub::new(8, 8);
        let conns: Vec<_> = (0..20u64)
            .map(|i| {
                let conn =
                    Connection::new(hub.next_connection_id(), &format!("a{i}"), vec![], u64::MAX);
                hub.register(&conn);
                conn
            })
            .collect();
        let l = limits();
        let due = now_secs() + l.ping_interval_seconds as u32;
        let mut sweeper = Sweeper::default();
        assert_eq!(
            sweeper.tick(&hub, 0, due, 0, &l),
            2,
            "slice 0: ids 10 and 20"
        );
        let answered = conns.iter().find(|c| c.id % SWEEP_SLICES == 5).unwrap();
        answered.clock.touch_at(due, false);
        let gone = conns.iter().find(|c| c.id % SWEEP_SLICES == 6).unwrap();
        hub.unregister(gone);
        let acted: usize = (1..SWEEP_SLICES)
            .map(|slice| sweeper.tick(&hub, slice, due, 0, &l))
            .sum();
        assert_eq!(acted, 17);
        assert_eq!(answered.queue_len(), 0);
        for conn in conns.iter().filter(|c| c.id != answered.id) {
            assert_eq!(conn.queue_len(), 1, "connection {}", conn.id);
        }
    }

    /// Connections accepted in the same second (a reconnect storm) are pinged spread
    /// over the interval — every second of it, and every sweep tick of each second,
    /// takes an even share — each within one interval (plus a sweep period) of opening.
    /// Those that answer are pinged again one interval after their first ping, so the
    /// spread stays; those that do not are closed once the pong timeout has passed.
    #[test]
    fn connections_opened_together_are_pinged_spread_over_the_interval() {
        const N: usize = 3_000;
        let l = limits();
        let interval = l.ping_interval_seconds as u32;
        let pong_timeout = l.pong_timeout_seconds as u32;
        let hub = Hub::new(8, 8);
        let opened = now_secs();
        let conns: Vec<_> = (0..N)
            .map(|i| {
                let conn =
                    Connection::new(hub.next_connection_id(), &format!("a{i}"), vec![], u64::MAX);
                conn.clock
                    .set_phase(phase(conn.id, l.ping_interval_seconds));
                hub.register(&conn);
                conn
            })
            .collect();
        // Opened by the real clock: at most one second boundary was crossed meanwhile.
        assert!(now_secs() - opened <= 1);

        // The sweep, tick by tick, for two intervals and a bit; the test plays the
        // drivers: it takes what each tick queued, and the connections with an even id
        // answer their pings at once while the others never do.
        let mut pings: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut closed: HashMap<u64, u32> = HashMap::new();
        let mut first_pings_per_tick = Vec::new();
        let mut out = Vec::new();
        let mut sweeper = Sweeper::default();
        for second in opened..=opened + 2 * interval + 2 {
            for slice in 0..SWEEP_SLICES {
                sweeper.tick(&hub, slice, second, 0, &l);
                let mut first_pings = 0;
                for conn in &conns {
                    conn.take_queued(&mut out);
                    for frame in out.drain(..) {
                        match frame {
                            Outbound::Ping => {
                                let sent = pings.entry(conn.id).or_default();
                                first_pings += usize::from(sent.is_empty());
                                sent.push(second);
                                if conn.id % 2 == 0 {
                                    conn.clock.touch_at(second, false);
                                }
                            }
                            Outbound::Close(CloseCode::PingTimeout) => {
                                assert_eq!(closed.insert(conn.id, second), None);
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                first_pings_per_tick.push(first_pings);
            }
        }

        // Every connection pinged within one interval of opening (+ one second: the
        // boundary the opening may have crossed).
        assert_eq!(pings.len(), N);
        for (id, sent) in &pings {
            assert!(
                sent[0] > opened && sent[0] <= opened + interval + 1,
                "connection {id} first pinged {} s after opening",
                sent[0] - opened
            );
        }
        // Spread: each second of the interval and each tick of the sweep carries about
        // its share (all N in one second without the phase).
        let per_second: Vec<usize> = first_pings_per_tick
            .chunks(SWEEP_SLICES as usize)
            .map(|ticks| ticks.iter().sum())
            .collect();
        let second_share = N / interval as usize;
        for s in 1..=interval as usize {
            assert!(
                per_second[s] >= second_share / 2 && per_second[s] <= second_share * 3 / 2,
                "{} first pings in second {s} (share {second_share}): {per_second:?}",
                per_second[s]
            );
        }
        let tick_share = second_share / SWEEP_SLICES as usize;
        let busiest = first_pings_per_tick.iter().max().copied();
        assert!(
            busiest <= Some(tick_share * 3 / 2),
            "busiest tick {busiest:?} (share {tick_share})"
        );
        // Answered: pinged again one interval later, so the spread stays. Unanswered:
        // closed when the pong timeout ran out, never pinged twice.
        for conn in &conns {
            let sent = &pings[&conn.id];
            if conn.id % 2 == 0 {
                assert_eq!(sent[1], sent[0] + interval, "connection {}", conn.id);
                assert!(
                    !closed.contains_key(&conn.id),
                    "connection {} closed",
                    conn.id
                );
            } else {
                assert_eq!(sent.len(), 1, "connection {} pinged twice", conn.id);
                assert_eq!(closed.get(&conn.id), Some(&(sent[0] + pong_timeout)));
            }
        }
    }

    #[test]
    fn a_phase_is_within_the_interval() {
        assert_eq!(phase(12_345, 1), 0);
        assert_eq!(phase(12_345, 0), 0);
        assert_eq!(phase(29 * SWEEP_SLICES, 30), 29);
        assert_eq!(phase(30 * SWEEP_SLICES, 30), 0);
        assert!(phase(u64::MAX, u64::MAX) < CLOCK_START);
        // A phase set on a new clock cannot wrap it, even right after the process started.
        let clock = Clock::new(10_000);
        clock.set_phase(u32::MAX);
        assert!(clock.stamps().last_inbound <= now_secs());
    }

    #[test]
    fn pings_after_a_quiet_interval_then_closes_without_pong() {
        let l = limits();
        assert_eq!(verdict(stamps(), 129, 0, &l), Verdict::Fine);
        assert_eq!(verdict(stamps(), 130, 0, &l), Verdict::Ping);
        let pinged = Stamps {
            ping_sent: Some(130),
            ..stamps()
        };
        assert_eq!(verdict(pinged, 139, 0, &l), Verdict::Fine);
        assert_eq!(
            verdict(pinged, 140, 0, &l),
            Verdict::Close(CloseCode::PingTimeout)
        );
    }

    #[test]
    fn expiry_wins_over_everything() {
        let s = Stamps {
            expires_at: 500,
            ..stamps()
        };
        assert_eq!(
            verdict(s, 100, 500, &limits()),
            Verdict::Close(CloseCode::TokenExpired)
        );
        assert_eq!(verdict(s, 100, 499, &limits()), Verdict::Fine);
    }

    #[test]
    fn idle_timeout_counts_only_data() {
        let l = Limits {
            idle_timeout_seconds: 60,
            ..limits()
        };
        // Pongs keep last_inbound fresh, but no data for 60 s still closes.
        let s = Stamps {
            last_inbound: 159,
            ..stamps()
        };
        assert_eq!(verdict(s, 159, 0, &l), Verdict::Fine);
        assert_eq!(
            verdict(s, 160, 0, &l),
            Verdict::Close(CloseCode::IdleTimeout)
        );
    }

    #[test]
    fn clock_touch_clears_the_outstanding_ping() {
        let clock = Clock::new(10_000);
        clock.ping_sent_now(now_secs());
        assert!(clock.stamps().ping_sent.is_some());
        clock.touch(false);
        assert_eq!(clock.stamps().ping_sent, None);
    }
}

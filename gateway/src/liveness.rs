//! Liveness without a timer per connection: one sweeper task per process looks at each
//! connection when it is due ([`Sweeper`]: a wheel of connections by the tick they are
//! next due at) and queues a ping or a close.
//!
//! The second is cut into [`SWEEP_SLICES`] ticks, each acting on one slice (by
//! connection id) of the connections due that second: connections opened together (a
//! reconnect storm, a load test) come due together, and one tick pinging all of them at once is a burst
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
    let elapsed = process_start().elapsed().as_secs();
    CLOCK_START.saturating_add(u32::try_from(elapsed).unwrap_or(u32::MAX))
}

/// When the process clock ([`now_secs`], [`now_ticks`]) started.
fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
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

    /// A refreshed token moved the expiry; the caller tells the sweep
    /// ([`Hub::expiry_moved`]), since the new expiry may come before the second the
    /// connection is filed for.
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
/// slice (`id % SWEEP_SLICES`), so that connections due in the same second are spread
/// over it.
pub const SWEEP_SLICES: u64 = 10;

/// How far ahead the sweep files a connection at most, in seconds: one due later (a
/// token expiring in an hour, a ping interval longer than this) is looked at again
/// then and filed further. Longer than the default ping interval, so that an idle
/// connection is looked at twice per ping cycle (its ping, its pong's deadline).
pub const HORIZON_SECONDS: u32 = 64;

/// Sweep ticks since the process started, offset like [`now_secs`]:
/// `now_ticks() / SWEEP_SLICES == now_secs()`.
pub fn now_ticks() -> u64 {
    let elapsed = process_start().elapsed().as_millis() / u128::from(1000 / SWEEP_SLICES);
    u64::from(CLOCK_START) * SWEEP_SLICES + u64::try_from(elapsed).unwrap_or(u64::MAX / 2)
}

/// The second (process seconds) at which a connection whose verdict is
/// [`Verdict::Fine`] at `now` may first need something: the earliest of its ping, its
/// pong's deadline, its idle timeout and its token's expiry. Later than `now` whenever
/// the verdict is `Fine`; stamps only move forward between looks (a frame arriving),
/// so looking again then is not late — at worst it finds nothing due and files the
/// connection again. (One exception, harmless: with a pong timeout longer than the
/// ping interval, a pong arriving meanwhile makes the next ping due before the pong's
/// deadline the connection is filed for; that ping goes out at the deadline.) The one
/// stamp that can move back, the expiry on a `refresh`, asks for a look of its own
/// ([`Hub::expiry_moved`]).
pub fn next_due(stamps: Stamps, now: u32, unix: u64, limits: &Limits) -> u32 {
    let after = |since: u32, seconds: u64| {
        u32::try_from(u64::from(since).saturating_add(seconds)).unwrap_or(u32::MAX)
    };
    let expiry = after(now, stamps.expires_at.saturating_sub(unix));
    let liveness = match stamps.ping_sent {
        Some(sent) => after(sent, limits.pong_timeout_seconds),
        None => after(stamps.last_inbound, limits.ping_interval_seconds),
    };
    let idle = match limits.idle_timeout_seconds {
        0 => u32::MAX,
        seconds => after(stamps.last_data, seconds),
    };
    expiry.min(liveness).min(idle)
}

/// Looks at each connection when it is due, forever, a tick every
/// `1 / SWEEP_SLICES` s; each tick also adds the frames deliveries wrote straight to
/// sockets ([`take_direct_writes`]) to `sent` (the drivers count the frames they write
/// themselves).
pub async fn sweep(hub: Arc<Hub>, limits: Limits, sent: Counter<u64>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / SWEEP_SLICES as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper = Sweeper::starting_at(now_ticks());
    loop {
        tick.tick().await;
        sweeper.tick(&hub, now_ticks(), unix_now(), &limits);
        let direct = take_direct_writes();
        if direct > 0 {
            sent.add(direct, &label("kind", "queued"));
        }
    }
}

/// The sweep's state between ticks: a timer wheel of connections by the tick they are
/// next due at.
///
/// A pass over the whole hub once a second cost ~7 % of an idle gateway's CPU at
/// ~17,000 connections per process (`perf` of the 100,000-connection run,
/// docs/benchmarks.md), growing with the count, for about one connection in thirty that needed anything. Here each
/// connection sits in the slot of the tick it is next due at ([`next_due`]: its second,
/// and within it its id's slice) and a tick takes only its own slot, so an idle
/// connection is looked at twice per ping cycle (its ping, then its pong's deadline)
/// instead of every second. The sessions do not touch the wheel when frames arrive:
/// a connection found not due after all (it was heard from) is filed again by its new
/// stamps. New connections reach the wheel through [`Hub::register`], looked at and
/// filed on the next tick.
///
/// A slot per tick of [`HORIZON_SECONDS`], reused lap after lap: a connection is filed
/// at most that far ahead, so every slot holds one tick's connections. Each
/// connection is in the wheel once; one that closed, or that nothing but the wheel
/// holds any more, is dropped when it comes due. An expiry brought forward by a
/// `refresh` ([`Hub::expiry_moved`]) is the one stamp that moves back: it gets an
/// entry of its own in a second wheel, which only closes the connection if its token
/// has expired and is never filed again.
#[derive(Debug)]
pub struct Sweeper {
    /// Every connection, by the tick it is next due at.
    slots: Vec<Vec<Arc<Connection>>>,
    /// Connections whose expiry a `refresh` brought within the horizon, by the tick of
    /// that expiry.
    expiries: Vec<Vec<Arc<Connection>>>,
    /// The first tick whose slots have not been taken yet.
    next_tick: u64,
    /// The connections being looked at (kept between ticks for its allocation).
    taken: Vec<Arc<Connection>>,
    /// Connections whose stamps were looked at, for the tests of the work per tick.
    #[cfg(test)]
    looked_at: usize,
}

/// Slots in the wheel: one per tick of the horizon.
const SLOTS: u64 = HORIZON_SECONDS as u64 * SWEEP_SLICES;

impl Sweeper {
    /// An empty wheel whose first tick is `tick` ([`now_ticks`]).
    pub fn starting_at(tick: u64) -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            expiries: (0..SLOTS).map(|_| Vec::new()).collect(),
            next_tick: tick,
            taken: Vec::new(),
            #[cfg(test)]
            looked_at: 0,
        }
    }

    /// One tick at `now_tick` ([`now_ticks`]) and `unix` (Unix seconds): takes the
    /// slots of every tick up to `now_tick` not taken yet (one, unless the task was
    /// late) and the connections registered since the last tick, and looks at each —
    /// a ping or a close if one is due, then filed again for when it next will be.
    /// Returns how many connections it pinged or closed.
    pub fn tick(&mut self, hub: &Hub, now_tick: u64, unix: u64, limits: &Limits) -> usize {
        let now = u32::try_from(now_tick / SWEEP_SLICES).unwrap_or(u32::MAX);
        let mut acted = 0;
        // Every slot once at most: after a stall longer than the horizon every slot
        // is behind (and holds only connections due by now).
        let behind = now_tick
            .saturating_add(1)
            .saturating_sub(self.next_tick)
            .min(SLOTS);
        let mut taken = std::mem::take(&mut self.taken);
        for tick in self.next_tick..self.next_tick + behind {
            taken.append(&mut self.expiries[(tick % SLOTS) as usize]);
        }
        for conn in taken.drain(..) {
            if gone(&conn) {
                continue;
            }
            if let Verdict::Close(code) = verdict(conn.clock.stamps(), now, unix, limits) {
                conn.close(code);
                acted += 1;
            }
        }
        for conn in hub.take_expiry_moved() {
            let stamps = conn.clock.stamps();
            let expiry = now.saturating_add(
                u32::try_from(stamps.expires_at.saturating_sub(unix)).unwrap_or(u32::MAX),
            );
            // Beyond the horizon the connection's own entry comes round first.
            if !gone(&conn) && expiry < now.saturating_add(HORIZON_SECONDS - 1) {
                let tick = u64::from(expiry.max(now + 1)) * SWEEP_SLICES + conn.id % SWEEP_SLICES;
                self.expiries[(tick % SLOTS) as usize].push(conn);
            }
        }

        taken.extend(hub.take_to_schedule());
        for tick in self.next_tick..self.next_tick + behind {
            // The slot's allocation goes with it: kept, every slot holds the most it
            // ever held plus its growth's leftovers (RSS per connection 55-85 B
            // above the sweep's one pass, 100,000 connections); remade as it fills
            // again, 27 B (18,000 connections, docs/benchmarks.md).
            taken.extend(std::mem::take(&mut self.slots[(tick % SLOTS) as usize]));
        }
        self.next_tick = self.next_tick.max(now_tick.saturating_add(1));
        for conn in taken.drain(..) {
            if gone(&conn) {
                continue;
            }
            #[cfg(test)]
            {
                self.looked_at += 1;
            }
            match verdict(conn.clock.stamps(), now, unix, limits) {
                Verdict::Fine => {}
                Verdict::Ping => {
                    conn.clock.ping_sent_now(now);
                    // One slot over the bound: a ping must not be refused by a full
                    // queue, and a full queue's writes will time the connection out.
                    let _ = conn.enqueue(Outbound::Ping, limits.outbound_queue + 1);
                    acted += 1;
                }
                Verdict::Close(code) => {
                    conn.close(code);
                    acted += 1;
                    continue;
                }
            }
            let due = next_due(conn.clock.stamps(), now, unix, limits).clamp(
                now.saturating_add(1),
                now.saturating_add(HORIZON_SECONDS - 1),
            );
            let tick = u64::from(due) * SWEEP_SLICES + conn.id % SWEEP_SLICES;
            self.slots[(tick % SLOTS) as usize].push(conn);
        }
        self.taken = taken;
        acted
    }

    /// Connections filed in the wheel (expiry entries included), for tests.
    #[cfg(test)]
    fn filed(&self) -> usize {
        self.slots.iter().chain(&self.expiries).map(Vec::len).sum()
    }
}

/// Whether the sweep can forget `conn`: the wheel's is the last reference (the session
/// has ended), or it is closing (its driver ends it, with a deadline of its own).
fn gone(conn: &Arc<Connection>) -> bool {
    Arc::strong_count(conn) == 1 || conn.is_closing()
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

    fn register(hub: &Hub, n: usize) -> Vec<Arc<Connection>> {
        (0..n)
            .map(|i| {
                let conn =
                    Connection::new(hub.next_connection_id(), &format!("a{i}"), vec![], u64::MAX);
                hub.register(&conn);
                conn
            })
            .collect()
    }

    fn tick_of(second: u32, slice: u64) -> u64 {
        u64::from(second) * SWEEP_SLICES + slice
    }

    /// Connections that come due together are pinged a slice per tick, not all at once,
    /// each exactly once, and then filed for their pong's deadline.
    #[test]
    fn a_sweep_tick_pings_one_slice_of_the_connections_due() {
        let hub = Hub::new(8, 8);
        let conns = register(&hub, 100);
        let l = limits();
        let opened = conns[0].clock.stamps().last_inbound;
        assert!(
            conns
                .iter()
                .all(|c| c.clock.stamps().last_inbound == opened)
        );
        let mut sweeper = Sweeper::starting_at(tick_of(opened, 0));
        // Filed on the first tick, nothing due yet.
        assert_eq!(sweeper.tick(&hub, tick_of(opened, 0), 0, &l), 0);
        assert_eq!(sweeper.filed(), 100);
        let due = opened + l.ping_interval_seconds as u32;
        assert_eq!(sweeper.tick(&hub, tick_of(due, 0) - 1, 0, &l), 0);
        let per_tick: Vec<usize> = (0..SWEEP_SLICES)
            .map(|slice| sweeper.tick(&hub, tick_of(due, slice), 0, &l))
            .collect();
        assert_eq!(per_tick, vec![10; SWEEP_SLICES as usize]);
        for conn in &conns {
            assert_eq!(conn.queue_len(), 1, "connection {} pinged once", conn.id);
        }
        // Pinged: nothing more is due until the pong timeout.
        let pong_deadline = due + l.pong_timeout_seconds as u32;
        assert_eq!(sweeper.tick(&hub, tick_of(pong_deadline, 0) - 1, 0, &l), 0);
        assert_eq!(sweeper.filed(), 100);
    }

    /// A connection heard from before its tick is looked at then, left alone and filed
    /// for its next ping; one whose session ended (the wheel holds the last reference)
    /// or that is closing is dropped from the wheel, and nothing is written to it.
    #[test]
    fn a_connection_heard_from_before_its_tick_is_not_pinged_and_ended_ones_are_dropped() {
        let hub = Hub::new(8, 8);
        let mut conns = register(&hub, 20);
        let l = limits();
        let opened = conns[0].clock.stamps().last_inbound;
        let mut sweeper = Sweeper::starting_at(tick_of(opened, 0));
        sweeper.tick(&hub, tick_of(opened, 0), 0, &l);
        let due = opened + l.ping_interval_seconds as u32;

        let answered = conns
            .iter()
            .find(|c| c.id % SWEEP_SLICES == 5)
            .unwrap()
            .clone();
        answered.clock.touch_at(due - 1, false);
        let closing = conns
            .iter()
            .find(|c| c.id % SWEEP_SLICES == 7)
            .unwrap()
            .clone();
        closing.stop_accepting();
        let gone = conns.iter().position(|c| c.id % SWEEP_SLICES == 6).unwrap();
        let gone = conns.remove(gone);
        hub.unregister(&gone);
        let gone_id = gone.id;
        drop(gone);

        let acted: usize = (0..SWEEP_SLICES)
            .map(|slice| sweeper.tick(&hub, tick_of(due, slice), 0, &l))
            .sum();
        assert_eq!(acted, 17, "20 less the answered, the gone and the closing");
        assert_eq!(answered.queue_len(), 0);
        assert_eq!(closing.queue_len(), 0);
        for conn in conns
            .iter()
            .filter(|c| c.id != answered.id && c.id != closing.id)
        {
            assert_eq!(conn.queue_len(), 1, "connection {}", conn.id);
        }
        assert!(conns.iter().all(|c| c.id != gone_id));
        // 17 pinged and the answered one filed again; the other two left the wheel.
        assert_eq!(sweeper.filed(), 18);
        // The answered one is pinged one interval after it was heard from.
        let again = due - 1 + l.ping_interval_seconds as u32;
        sweeper.tick(&hub, tick_of(again, 4), 0, &l);
        assert_eq!(answered.queue_len(), 0);
        sweeper.tick(&hub, tick_of(again, 5), 0, &l);
        assert_eq!(answered.queue_len(), 1);
    }

    /// An idle connection that answers its pings is looked at twice per ping cycle
    /// (its ping, its pong's deadline), not once a second: the sweep's work follows
    /// what is due, not the number of connections held.
    #[test]
    fn idle_connections_are_looked_at_twice_per_ping_cycle() {
        const N: usize = 1_000;
        let hub = Hub::new(8, 8);
        let conns = register(&hub, N);
        let l = limits();
        let interval = l.ping_interval_seconds as u32;
        let opened = conns[0].clock.stamps().last_inbound;
        let mut sweeper = Sweeper::starting_at(tick_of(opened, 0));
        let mut pings = 0;
        let mut out = Vec::new();
        for tick in tick_of(opened, 0)..tick_of(opened + 3 * interval, 0) {
            pings += sweeper.tick(&hub, tick, 0, &l);
            let second = (tick / SWEEP_SLICES) as u32;
            for conn in &conns {
                conn.take_queued(&mut out);
                if out.drain(..).any(|frame| matches!(frame, Outbound::Ping)) {
                    conn.clock.touch_at(second, false);
                }
            }
        }
        // Pinged at 30, 60 (not yet at 90): two pings each, and every connection kept.
        assert_eq!(pings, 2 * N);
        assert_eq!(sweeper.filed(), N);
        // The first look files them; then per cycle a ping and a pong deadline.
        assert_eq!(sweeper.looked_at, N + 2 * N + 2 * N);
    }

    /// A `refresh` that brings the expiry forward is acted on at the new expiry, not at
    /// the second the connection was filed for; its entry in the wheel is dropped when
    /// it comes round (the connection is closing).
    #[test]
    fn an_expiry_brought_forward_by_a_refresh_closes_on_time() {
        let hub = Hub::new(8, 8);
        let conns = register(&hub, 3);
        let l = limits();
        let opened = conns[0].clock.stamps().last_inbound;
        let unix_at = |second: u32| 1_000_000 + u64::from(second - opened);
        let mut sweeper = Sweeper::starting_at(tick_of(opened, 0));
        sweeper.tick(&hub, tick_of(opened, 0), unix_at(opened), &l);
        assert_eq!(sweeper.filed(), 3);

        let refreshed = &conns[1];
        refreshed.clock.set_expiry(unix_at(opened + 5));
        hub.expiry_moved(refreshed);
        let mut closed_at = None;
        let mut out = Vec::new();
        for tick in tick_of(opened, 1)..tick_of(opened + 10, 0) {
            let second = (tick / SWEEP_SLICES) as u32;
            sweeper.tick(&hub, tick, unix_at(second), &l);
            refreshed.take_queued(&mut out);
            if out
                .iter()
                .any(|f| matches!(f, Outbound::Close(CloseCode::TokenExpired)))
            {
                closed_at.get_or_insert(second);
            }
            out.clear();
        }
        assert_eq!(closed_at, Some(opened + 5));
        // The others are still filed once each (for their pings); the closed one left.
        assert_eq!(
            sweeper.filed(),
            3,
            "each in the wheel once, the closed one too"
        );
        sweeper.tick(&hub, tick_of(opened + 31, 0), unix_at(opened + 31), &l);
        assert_eq!(sweeper.filed(), 2);
    }

    /// A sweep task that fell behind (a stall of a minute and more) takes every slot
    /// it missed on its next tick: what came due meanwhile is acted on at once, and no
    /// connection is lost from the wheel.
    #[test]
    fn a_late_tick_catches_up_without_losing_connections() {
        const N: usize = 200;
        let hub = Hub::new(8, 8);
        let conns = register(&hub, N);
        let l = limits();
        let opened = conns[0].clock.stamps().last_inbound;
        let mut sweeper = Sweeper::starting_at(tick_of(opened, 0));
        sweeper.tick(&hub, tick_of(opened, 0), 0, &l);
        // Next tick 100 s later (beyond the horizon): every connection is due and
        // pinged at once.
        let late = opened + 100;
        assert_eq!(sweeper.tick(&hub, tick_of(late, 3), 0, &l), N);
        assert_eq!(sweeper.filed(), N);
        for conn in &conns {
            assert_eq!(conn.queue_len(), 1);
        }
        // Nobody answers: each is closed at its pong deadline, in its own slice.
        let deadline = late + l.pong_timeout_seconds as u32;
        let closed: usize = (0..SWEEP_SLICES)
            .map(|slice| sweeper.tick(&hub, tick_of(deadline, slice), 0, &l))
            .sum();
        assert_eq!(closed, N);
        assert_eq!(sweeper.filed(), 0);
    }

    #[test]
    fn next_due_is_when_the_verdict_first_changes() {
        let l = Limits {
            idle_timeout_seconds: 45,
            ..limits()
        };
        let cases = [
            stamps(),
            Stamps {
                ping_sent: Some(131),
                last_inbound: 101,
                ..stamps()
            },
            Stamps {
                last_data: 60,
                ..stamps()
            },
            Stamps {
                expires_at: 1_000 + 17,
                ..stamps()
            },
        ];
        for (i, s) in cases.into_iter().enumerate() {
            for now in 100..140 {
                let unix = 1_000 + u64::from(now - 100);
                if verdict(s, now, unix, &l) != Verdict::Fine {
                    continue;
                }
                let due = next_due(s, now, unix, &l);
                assert!(due > now, "case {i} at {now}");
                let unix_at = |second: u32| unix + u64::from(second - now);
                assert_eq!(
                    verdict(s, due - 1, unix_at(due - 1), &l),
                    Verdict::Fine,
                    "case {i} at {now}: fine until {due}"
                );
                assert_ne!(
                    verdict(s, due, unix_at(due), &l),
                    Verdict::Fine,
                    "case {i} at {now}: due at {due}"
                );
            }
        }
        // Nothing configured to come due soon: far ahead, never before `now`.
        let never = Stamps {
            expires_at: u64::MAX,
            ..stamps()
        };
        let far = Limits {
            ping_interval_seconds: u64::MAX,
            ..limits()
        };
        assert_eq!(next_due(never, 100, 1_000, &far), u32::MAX);
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
        let mut sweeper = Sweeper::starting_at(tick_of(opened, 0));
        for second in opened..=opened + 2 * interval + 2 {
            for slice in 0..SWEEP_SLICES {
                sweeper.tick(&hub, tick_of(second, slice), 0, &l);
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

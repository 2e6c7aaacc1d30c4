//! Whether a WebSocket's client is still there, and the node's watch over all of its
//! WebSockets.
//!
//! The rules ([`verdict`]): a client heard from (any frame) within `ws_ping_interval_ms`
//! needs nothing; one that was not is sent a ping; one that answers no ping within
//! `ws_pong_timeout_ms` is closed with 4011, and one that sent no message (pongs do not
//! count) for `ws_idle_timeout_ms`, when set, with 4012.
//!
//! A `/ws` connection keeps no timer of its own. [`SocketWatch`] holds every open `/ws`
//! connection's [`ConnHandle`] and sweeps them on one timer, a quarter of the shortest of
//! those intervals (at most a second, at least 50 ms): a connection due a ping is asked for
//! one through its handle, one that is dead is kicked. Its clock is the sweep's: a frame
//! costs an atomic store, not a clock read or a timer reset. At shutdown the watch kicks
//! every connection, which then closes with 1012. So an idle connection is its socket, its
//! state and its queue, and nothing that wakes it.
//!
//! A guided session's connection (`/chat`) keeps a [`Liveness`] and a timer of its own,
//! under the same rules.

use std::ops::Add;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use slab::Slab;
use tokio_util::sync::CancellationToken;

use super::End;
use super::socket::Incoming;
use crate::config::Limits;
use crate::hub::{ConnHandle, Kick};

/// What a liveness check asks of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    Fine,
    Ping,
    Dead(End),
}

/// The liveness rules over one connection's times, on any clock: heard from at `heard`, last
/// spoke at `spoke`, asked to ping at `ping_sent` (if it was), checked at `now`.
fn verdict<T>(heard: T, spoke: T, ping_sent: Option<T>, now: T, limits: &Limits) -> Check
where
    T: Copy + Ord + Add<Duration, Output = T>,
{
    let idle = limits.ws_idle_timeout_ms;
    if !idle.is_zero() && now >= spoke + idle {
        return Check::Dead(End::Idle);
    }
    if let Some(sent) = ping_sent.filter(|sent| heard < *sent) {
        return if now >= sent + limits.ws_pong_timeout_ms {
            Check::Dead(End::NoPong)
        } else {
            Check::Fine
        };
    }
    let every = limits.ws_ping_interval_ms;
    if !every.is_zero() && now >= heard + every {
        return Check::Ping;
    }
    Check::Fine
}

/// A connection's liveness kept by its own task: when the client was last heard from and
/// last spoke, and the ping awaiting an answer. Checked lazily: the timer fires at the
/// earliest deadline and the check decides from the times, so a frame costs a clock read,
/// not a timer reset.
#[derive(Debug)]
pub(super) struct Liveness {
    heard: Instant,
    spoke: Instant,
    ping_sent: Option<Instant>,
}

/// Far enough ahead to mean "no check" for a timer.
const NEVER: Duration = Duration::from_secs(86_400 * 365);

impl Liveness {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Self {
            heard: now,
            spoke: now,
            ping_sent: None,
        }
    }

    /// Notes a frame from the client (errors pass through).
    pub(super) fn heard<E>(&mut self, incoming: Result<Incoming, E>) -> Result<Incoming, E> {
        if let Ok(frame) = &incoming {
            let now = Instant::now();
            self.heard = now;
            if !matches!(frame, Incoming::Pong) {
                self.spoke = now;
            }
        }
        incoming
    }

    /// When the next check is due.
    pub(super) fn next_check(&self, limits: &Limits) -> Instant {
        let unanswered = self.ping_sent.filter(|sent| self.heard < *sent);
        let liveness = match unanswered {
            Some(sent) => Some(sent + limits.ws_pong_timeout_ms),
            None if !limits.ws_ping_interval_ms.is_zero() => {
                Some(self.heard + limits.ws_ping_interval_ms)
            }
            None => None,
        };
        let idle = limits.ws_idle_timeout_ms;
        let idle = (!idle.is_zero()).then(|| self.spoke + idle);
        match (liveness, idle) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.heard + NEVER,
        }
    }

    pub(super) fn check(&mut self, now: Instant, limits: &Limits) -> Check {
        let check = verdict(self.heard, self.spoke, self.ping_sent, now, limits);
        if check == Check::Ping {
            self.ping_sent = Some(now);
        }
        check
    }
}

/// Milliseconds on the watch's clock, for [`verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ms(u64);

impl Add<Duration> for Ms {
    type Output = Ms;

    fn add(self, d: Duration) -> Ms {
        Ms(self
            .0
            .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

/// Every open `/ws` connection of the node, swept for liveness on one timer and kicked at
/// shutdown.
#[derive(Debug)]
pub struct SocketWatch {
    connections: Mutex<Slab<ConnHandle>>,
    /// Tokio's clock, which tests can pause.
    epoch: tokio::time::Instant,
    /// The clock: milliseconds since `epoch` at the last sweep (connections' times are
    /// noted on it).
    now: AtomicU64,
    shutdown: CancellationToken,
}

/// A connection's place in the watch; dropping it takes the connection out.
#[derive(Debug)]
pub(super) struct Watched {
    watch: Arc<SocketWatch>,
    key: usize,
}

/// Sweeps at most this often.
const FINEST: Duration = Duration::from_millis(50);
/// Sweeps at least this often (when any check is configured).
const COARSEST: Duration = Duration::from_secs(1);

impl SocketWatch {
    /// An empty watch whose connections are kicked when `shutdown` is cancelled (once
    /// [`Self::run`] runs).
    pub fn new(shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            connections: Mutex::new(Slab::new()),
            epoch: tokio::time::Instant::now(),
            now: AtomicU64::new(1),
            shutdown,
        })
    }

    /// The watch's clock.
    pub(super) fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    /// How many connections are watched.
    pub fn len(&self) -> usize {
        self.connections.lock().len()
    }

    /// True when no connection is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Watches `handle`'s connection until the returned place is dropped. One that opens
    /// during shutdown is kicked at once.
    pub(super) fn watch(self: &Arc<Self>, handle: &ConnHandle) -> Watched {
        let now = self.now();
        handle.heard(now, true);
        let key = self.connections.lock().insert(handle.clone());
        if self.shutdown.is_cancelled() {
            handle.kick(Kick::Shutdown);
        }
        Watched {
            watch: Arc::clone(self),
            key,
        }
    }

    /// How often to sweep under `limits` (`None`: no check is configured).
    fn period(limits: &Limits) -> Option<Duration> {
        [
            limits.ws_ping_interval_ms,
            limits.ws_pong_timeout_ms,
            limits.ws_idle_timeout_ms,
        ]
        .into_iter()
        .filter(|d| !d.is_zero())
        .min()
        .map(|d| (d / 4).clamp(FINEST, COARSEST))
    }

    /// Checks every connection at the current time: asks for pings, kicks the dead.
    fn sweep(&self, limits: &Limits) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now.store(now, Ordering::Relaxed);
        let connections = self.connections.lock();
        for (_, handle) in connections.iter() {
            let (heard, spoke, ping_sent) = handle.times();
            let ping_sent = (ping_sent != 0).then_some(Ms(ping_sent));
            match verdict(Ms(heard), Ms(spoke), ping_sent, Ms(now), limits) {
                Check::Fine => {}
                Check::Ping => handle.ask_ping(now),
                Check::Dead(End::Idle) => handle.kick(Kick::Idle),
                Check::Dead(_) => handle.kick(Kick::NoPong),
            }
        }
    }

    /// Sweeps every connection on the period `limits` ask for until shutdown, then kicks
    /// them all.
    pub async fn run(self: Arc<Self>, limits: Limits) {
        if let Some(period) = Self::period(&limits) {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = self.shutdown.cancelled() => break,
                    _ = tick.tick() => self.sweep(&limits),
                }
            }
        } else {
            self.shutdown.cancelled().await;
        }
        for (_, handle) in self.connections.lock().iter() {
            handle.kick(Kick::Shutdown);
        }
    }
}

impl Watched {
    /// The watch's clock, for [`ConnHandle::heard`].
    pub(super) fn now(&self) -> u64 {
        self.watch.now()
    }

    /// Milliseconds since the watch's epoch, read now rather than at the last sweep: for a
    /// deadline kept in 8 bytes instead of an `Instant`'s 16.
    pub(super) fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.watch.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The connection goes on under a new handle (its identity changed), keeping its times.
    pub(super) fn replace(&self, old: &ConnHandle, new: &ConnHandle) {
        let (heard, spoke, _) = old.times();
        new.heard(spoke, true);
        new.heard(heard, false);
        if let Some(slot) = self.watch.connections.lock().get_mut(self.key) {
            *slot = new.clone();
        }
        if let Some(kick) = old.kicked_for() {
            new.kick(kick);
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.watch.connections.lock().try_remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Identity, Role};

    fn limits(ping: u64, pong: u64, idle: u64) -> Limits {
        Limits {
            ws_ping_interval_ms: Duration::from_millis(ping),
            ws_pong_timeout_ms: Duration::from_millis(pong),
            ws_idle_timeout_ms: Duration::from_millis(idle),
            ..Limits::default()
        }
    }

    #[test]
    fn the_rules_ping_a_quiet_client_then_close_it_and_close_a_silent_one() {
        let l = limits(100, 50, 1000);
        let v = |heard, spoke, ping: Option<u64>, now| {
            verdict(Ms(heard), Ms(spoke), ping.map(Ms), Ms(now), &l)
        };
        assert_eq!(v(0, 0, None, 99), Check::Fine);
        assert_eq!(v(0, 0, None, 100), Check::Ping);
        // A ping asked for at 100 and not answered: fine until 150, dead from then.
        assert_eq!(v(0, 0, Some(100), 149), Check::Fine);
        assert_eq!(v(0, 0, Some(100), 150), Check::Dead(End::NoPong));
        // Any frame answers it (a pong at 120), and the next ping is due 100 after.
        assert_eq!(v(120, 0, Some(100), 200), Check::Fine);
        assert_eq!(v(120, 0, Some(100), 220), Check::Ping);
        // Answering pings is not speaking: 1000 after its last message, it is closed.
        assert_eq!(v(990, 0, Some(950), 1000), Check::Dead(End::Idle));
        assert_eq!(v(990, 10, Some(950), 1000), Check::Fine);
        // Nothing configured: never a check.
        let none = limits(0, 0, 0);
        assert_eq!(
            verdict(Ms(0), Ms(0), None, Ms(u64::MAX / 2), &none),
            Check::Fine
        );
        assert_eq!(SocketWatch::period(&none), None);
        assert_eq!(SocketWatch::period(&l), Some(Duration::from_millis(50)));
        assert_eq!(
            SocketWatch::period(&limits(25_000, 10_000, 0)),
            Some(Duration::from_secs(1))
        );
    }

    fn handle(id: u64) -> ConnHandle {
        let identity = Identity {
            user_id: format!("u{id}"),
            name: "U".into(),
            role: Role::Visitor,
            domain_id: Arc::from("demo"),
            anonymous: true,
            room: None,
            label: None,
        };
        ConnHandle::new(id, Arc::new(identity), 8).0
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_pings_the_quiet_kicks_the_dead_and_everyone_at_shutdown() {
        let shutdown = CancellationToken::new();
        let watch = SocketWatch::new(shutdown.clone());
        let l = limits(200, 200, 0);
        let run = tokio::spawn(Arc::clone(&watch).run(l));
        let (quiet, talker) = (handle(1), handle(2));
        let placed = [watch.watch(&quiet), watch.watch(&talker)];
        assert_eq!(watch.len(), 2);
        // The talker is heard every 100 ms; the quiet one never.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            talker.heard(watch.now(), true);
        }
        assert_ne!(quiet.times().2, 0, "the quiet one was asked for a ping");
        assert_eq!(talker.times().2, 0);
        assert_eq!(quiet.kicked_for(), Some(Kick::NoPong));
        assert_eq!(talker.kicked_for(), None);

        drop(placed);
        assert!(watch.is_empty());
        let late = handle(3);
        let _late = watch.watch(&late);
        shutdown.cancel();
        run.await.unwrap();
        assert_eq!(late.kicked_for(), Some(Kick::Shutdown));
        // One that opens during shutdown is kicked at once.
        let later = handle(4);
        let _later = watch.watch(&later);
        assert_eq!(later.kicked_for(), Some(Kick::Shutdown));
    }
}

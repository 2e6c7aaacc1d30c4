//! A connection as the hub sees it: an identity, a bounded outbound queue, and the signals
//! its transport task waits for.
//!
//! The hub never waits on a socket. It pushes [`Envelope`]s into each member's queue without
//! waiting (or, for a parked connection, writes what the socket takes now: see below); a
//! full queue means the client is not reading fast enough, and the connection is
//! *kicked*: its transport task closes it with [`CLOSE_SLOW_CONSUMER`] and the client recovers
//! from its last `seq`. Nobody else ever waits for a slow client. The hub also kicks the
//! members of a room whose stream it cannot continue in order ([`Kick::Resync`], closed with
//! [`CLOSE_RESYNC`]); the node kicks every connection at shutdown, and its liveness sweep
//! kicks the ones that stopped answering or asks them to ping.
//!
//! A queue is bounded twice: in events, and in bytes (each envelope's [`Envelope::size`],
//! roughly its encoded length), so that a slow client of a room of large messages is let go
//! before its backlog holds megabytes.
//!
//! What an idle connection keeps here is much of what it costs, so the queue is a
//! `VecDeque` behind a lock that holds no memory while empty (its buffer is freed whenever
//! it is drained) with a single waker: the connection's task is the only one that waits,
//! for events, a kick or a ping alike.
//!
//! ## Parked connections: the hub writes, the task sleeps
//!
//! Waking a connection's task to write one frame costs more than the write: the task is
//! scheduled, polls its queue, its cursors and its socket, and goes back to sleep. So a
//! task that has been getting events and has nothing left to do *parks* its writing end
//! here ([`Parked`]: its cursors, its socket and how its dialect frames an event) and
//! sleeps on its socket and queue as before. While it is parked and its queue holds
//! nothing else, [`ConnHandle::push`] passes an event through the parked cursors and
//! queues it as *taken*, without waking the task; the taken events are framed and sent in
//! one `send` when the delivery round ends ([`corked`]: the commit pipeline and the broker
//! deliver all they have, then write every parked socket that took events), or at once
//! outside a round.
//!
//! Everything else goes the way it always did, and the task takes the parked end back
//! ([`Receiver::reclaim`], with the taken events not yet written) before it reads, writes
//! or moves a cursor:
//! - an event the cursors cannot take (a gap to fill from the store), or any event queued
//!   behind one that was not taken, is queued and wakes the task;
//! - a round that brings more than [`MAX_TAKEN`] events (a burst) leaves the rest to the
//!   task, which writes them all in batches;
//! - a socket that does not take a whole write leaves the rest to the task (woken), which
//!   writes it, with its timeout for slow clients, before anything else.
//!
//! The task parks again only when it has written events since it last parked and has
//! nothing to write. So each connection still gets its rooms in `seq` order with no gap
//! and no duplicate, whoever writes.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use super::Event;
use super::cursor::{Cursors, Step};
use crate::model::Identity;

/// WebSocket close code for a connection whose outbound queue overflowed. Private-use range;
/// clients should reconnect and rejoin with `since` to recover what they missed.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

/// WebSocket close code for a connection the server could not keep in `seq` order (a gap in
/// a room's stream that the store could not fill). Private-use range; clients should
/// reconnect and rejoin with `since`, which reads the room from the store.
pub const CLOSE_RESYNC: u16 = 4009;

/// Why a connection was kicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    /// Its outbound queue overflowed.
    SlowConsumer = 1,
    /// A room's stream could not be continued in order for it.
    Resync = 2,
    /// The node is shutting down.
    Shutdown = 3,
    /// It did not answer a ping in time.
    NoPong = 4,
    /// Its client sent no message for too long.
    Idle = 5,
}

impl Kick {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Kick::SlowConsumer,
            2 => Kick::Resync,
            3 => Kick::Shutdown,
            4 => Kick::NoPong,
            5 => Kick::Idle,
            _ => return None,
        })
    }
}

const NOT_KICKED: u8 = 0;

/// An event on its way to clients, with a slot for its encoded bytes so that a frame is
/// serialised once and the bytes shared by every recipient using that transport's format.
#[derive(Debug)]
pub struct Envelope {
    /// What happened.
    pub event: Event,
    /// The native WebSocket encoding, filled by the first connection that writes it.
    pub native: OnceLock<bytes::Bytes>,
    /// The Eclipse dialect's encoding, likewise.
    pub eclipse: OnceLock<bytes::Bytes>,
    /// About how many bytes the event takes once encoded: what it costs a queue.
    pub size: usize,
}

/// What an encoded event costs beyond its text (field names, ids, timestamps).
const FRAME_OVERHEAD: usize = 256;

impl Envelope {
    /// Wraps an event for fan-out.
    pub fn new(event: Event) -> Arc<Self> {
        let size = FRAME_OVERHEAD
            + match &event {
                Event::Message(m) => m.content.len() + m.data.as_ref().map_or(0, json_size),
                Event::Delta { delta, .. } => delta.len(),
                Event::Frame(bytes) => bytes.len(),
                Event::Notification(n) => n.content.len() + n.data.as_ref().map_or(0, String::len),
                Event::Channel(c) => c.event.len() + c.data.len(),
                _ => 0,
            };
        Arc::new(Self {
            event,
            native: OnceLock::new(),
            eclipse: OnceLock::new(),
            size,
        })
    }
}

/// Roughly the encoded length of `value`, without encoding it.
fn json_size(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(|v| json_size(v) + 1).sum::<usize>(),
        Value::Object(map) => {
            2 + map
                .iter()
                .map(|(k, v)| k.len() + 4 + json_size(v))
                .sum::<usize>()
        }
    }
}

/// Cheap, cloneable handle to one connection, held by every room it joined.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<ConnInner>);

#[derive(Debug)]
struct ConnInner {
    /// Unique within this process.
    id: u64,
    /// Who is connected.
    identity: Arc<Identity>,
    /// The queue and the waiting task.
    outbound: Mutex<Outbound>,
    /// Set once (to a [`Kick`]) when the queue overflowed, the hub asked for a resync, the
    /// node shuts down or the liveness sweep gave up on the client; the transport then
    /// closes the connection. The first reason stays.
    kicked: AtomicU8,
    /// Most events queued.
    capacity: usize,
    /// Most bytes queued ([`Envelope::size`]); `usize::MAX` when not counted.
    max_bytes: usize,
    /// When the client was last heard from (any frame) and last spoke (a message), and when
    /// the ping now awaiting an answer was asked for (0: none), in the node clock's
    /// milliseconds; kept by the transport, read by the liveness sweep.
    heard: AtomicU64,
    spoke: AtomicU64,
    ping_sent: AtomicU64,
}

#[derive(Debug, Default)]
struct Outbound {
    queue: VecDeque<Arc<Envelope>>,
    /// Bytes of the events queued.
    bytes: usize,
    /// The connection's task, waiting for an event, a kick or a ping.
    waker: Option<Waker>,
    /// A ping is asked for and not yet taken.
    ping: bool,
    /// The receiving end is gone: the connection's task ended.
    closed: bool,
    /// The task's writing end, while the task is parked ([`Parked`]).
    parked: Option<Box<Parked>>,
}

/// A parked connection's writing end: what [`ConnHandle::push`] needs to write its events
/// to its socket without waking its task (see the module's header).
pub struct Parked {
    /// The connection's position in each room it joined, lent by its task.
    pub cursors: Cursors,
    /// Its socket.
    stream: Arc<TcpStream>,
    /// Appends an event as a WebSocket frame in the connection's dialect.
    frame: fn(&mut Vec<u8>, &Envelope),
    /// How many events at the front of the queue the parked end took (past its cursors),
    /// to be written when the round ends.
    taken: u32,
    /// How much of the taken events' frames the socket took (short of all of them: `over`
    /// is set). The frames are made again for the task rather than kept: an offset costs
    /// every parked connection less than a buffer.
    sent: u32,
    /// The task takes over: the socket did not take a whole write, or a round brought
    /// more than [`MAX_TAKEN`] events. Nothing more is taken here; the task is woken and
    /// writes the taken events with the rest of its queue.
    over: bool,
    /// Frames written to clients (the node's `frames_out`), counted once per write.
    frames_out: Counter,
}

/// Most events a parked end takes in one round (a whole round); what comes beyond goes to
/// the task.
const MAX_TAKEN: u32 = DELIVERY_ROUND as u32;

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("taken", &self.taken)
            .field("sent", &self.sent)
            .field("over", &self.over)
            .finish_non_exhaustive()
    }
}

/// What [`Parked::take`] did with an event.
enum Taken {
    /// Taken, to be written at the round's end.
    Next,
    /// The connection was sent it already.
    Dropped,
    /// Not for the parked end: the task must handle it (a gap, a full round, or the
    /// socket is full).
    Refused,
}

impl Parked {
    /// A parked end over `stream`, with the task's `cursors`.
    pub fn new(
        cursors: Cursors,
        stream: Arc<TcpStream>,
        frame: fn(&mut Vec<u8>, &Envelope),
        frames_out: Counter,
    ) -> Box<Self> {
        Box::new(Self {
            cursors,
            stream,
            frame,
            taken: 0,
            sent: 0,
            over: false,
            frames_out,
        })
    }

    fn take(&mut self, envelope: &Envelope) -> Taken {
        if self.over {
            return Taken::Refused;
        }
        if self.taken >= MAX_TAKEN {
            self.over = true;
            return Taken::Refused;
        }
        match self.cursors.advance(&envelope.event) {
            Step::Next => {
                self.taken += 1;
                Taken::Next
            }
            Step::Sent => Taken::Dropped,
            Step::Gap { .. } => Taken::Refused,
        }
    }

    /// How many events were taken, counted as written frames, and forgotten (the caller
    /// takes them off the queue).
    fn settle(&mut self) -> u32 {
        let taken = std::mem::take(&mut self.taken);
        self.frames_out.inc_by(u64::from(taken));
        taken
    }

    /// Frames the taken events (the first `taken` of `queue`) into `out`.
    fn frame_taken(&self, queue: &VecDeque<Arc<Envelope>>, out: &mut Vec<u8>) {
        for envelope in queue.iter().take(self.taken as usize) {
            (self.frame)(out, envelope);
        }
    }

    /// Sends `bytes` as far as the socket takes them now; how many it took. Straight to
    /// the socket, past the runtime's readiness bookkeeping: a short count leaves the rest
    /// to the task, whose write learns readiness afresh.
    fn send(&self, bytes: &[u8]) -> usize {
        let socket = socket2::SockRef::from(self.stream.as_ref());
        let mut written = 0;
        while written < bytes.len() {
            match socket.send(&bytes[written..]) {
                Ok(n) if n > 0 => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
        written
    }
}

thread_local! {
    /// The connections framed into during this thread's delivery round, if one is open.
    static ROUND: RefCell<Option<Vec<ConnHandle>>> = const { RefCell::new(None) };
}

/// Runs `deliver` as one delivery round: events it pushes to parked connections are
/// framed, and each of those sockets is written once when it returns (instead of once per
/// event). Rounds on one thread nest into the outermost. `deliver` must not wait.
pub fn corked<T>(deliver: impl FnOnce() -> T) -> T {
    let opened = ROUND.with(|round| {
        let mut round = round.borrow_mut();
        if round.is_some() {
            false
        } else {
            *round = Some(Vec::new());
            true
        }
    });
    if !opened {
        return deliver();
    }
    // Written even if `deliver` panics, so that nothing framed is left behind.
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            let framed = ROUND
                .with(|round| round.borrow_mut().take())
                .unwrap_or_default();
            let mut scratch = Vec::new();
            for conn in framed {
                conn.write_parked(&mut scratch);
            }
        }
    }
    let _close = Close;
    deliver()
}

/// Most events a delivery loop hands to the hub in one round ([`corked`]) before it writes
/// the parked sockets: a bound on how long a round keeps the first event's frames waiting.
pub const DELIVERY_ROUND: usize = 256;

/// Adds `conn` to the open delivery round; false when no round is open.
fn join_round(conn: &ConnHandle) -> bool {
    ROUND.with(|round| match round.borrow_mut().as_mut() {
        Some(framed) => {
            framed.push(conn.clone());
            true
        }
        None => false,
    })
}

/// What the connection's task is woken for, most urgent first.
#[derive(Debug)]
pub enum Signal {
    /// The connection must close.
    Kicked(Kick),
    /// The liveness sweep asks for a ping.
    Ping,
    /// The next queued event.
    Event(Arc<Envelope>),
}

impl ConnHandle {
    /// Creates the handle and the receiving end of its queue of `capacity` events (not
    /// bounded in bytes).
    pub fn new(id: u64, identity: Arc<Identity>, capacity: usize) -> (Self, Receiver) {
        Self::bounded(id, identity, capacity, usize::MAX)
    }

    /// Creates the handle and the receiving end of its queue of `capacity` events and
    /// `max_bytes` bytes.
    pub fn bounded(
        id: u64,
        identity: Arc<Identity>,
        capacity: usize,
        max_bytes: usize,
    ) -> (Self, Receiver) {
        let inner = ConnInner {
            id,
            identity,
            outbound: Mutex::new(Outbound::default()),
            kicked: AtomicU8::new(NOT_KICKED),
            capacity: capacity.max(1),
            max_bytes,
            heard: AtomicU64::new(0),
            spoke: AtomicU64::new(0),
            ping_sent: AtomicU64::new(0),
        };
        let handle = Self(Arc::new(inner));
        let rx = Receiver(handle.clone());
        (handle, rx)
    }

    /// Connection id.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Who is connected.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.0.identity
    }

    /// Queues an event without waiting. Returns false when the queue was full: the
    /// connection is then kicked and the event dropped (the client recovers by `seq`).
    pub fn push(&self, envelope: Arc<Envelope>) -> bool {
        let waker = {
            let mut out = self.0.outbound.lock();
            if out.closed || self.is_kicked() {
                // The transport task has ended or is closing: nothing more goes out.
                return true;
            }
            // The first event always fits, however large: a queue only ever holds what the
            // client has not read yet.
            let full = !out.queue.is_empty()
                && (out.queue.len() >= self.0.capacity
                    || (self.0.max_bytes != usize::MAX
                        && out.bytes + envelope.size > self.0.max_bytes));
            if full {
                drop(out);
                self.kick(Kick::SlowConsumer);
                return false;
            }
            // A parked end takes an event only if nothing it did not take is queued.
            let queued = out.queue.len();
            let taken = match out.parked.as_mut() {
                Some(parked) if parked.taken as usize == queued => parked.take(&envelope),
                _ => Taken::Refused,
            };
            if matches!(taken, Taken::Dropped) {
                return true;
            }
            out.bytes += envelope.size;
            out.queue.push_back(envelope);
            // The first event taken is written when the round ends, or now; a socket that
            // does not take it leaves the rest to the task, woken below.
            if matches!(taken, Taken::Next)
                && (queued > 0
                    || join_round(self)
                    || Self::write_taken(&self.0, &mut out, &mut Vec::new()))
            {
                return true;
            }
            out.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Writes the events the parked end took, waking the task if the socket did not take
    /// them all.
    fn write_parked(&self, scratch: &mut Vec<u8>) {
        let waker = {
            let mut out = self.0.outbound.lock();
            if Self::write_taken(&self.0, &mut out, scratch) {
                return;
            }
            out.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Sends the events the parked end took (framed in `scratch`) and takes them off the
    /// queue. False when the socket did not take them all (or failed): the parked end is
    /// then over, and the task must be woken to write the rest.
    fn write_taken(conn: &ConnInner, out: &mut Outbound, scratch: &mut Vec<u8>) -> bool {
        let Some(parked) = out.parked.as_mut() else {
            return true;
        };
        if parked.over || parked.taken == 0 {
            // Nothing taken, or the task (woken) writes it.
            return true;
        }
        scratch.clear();
        parked.frame_taken(&out.queue, scratch);
        let written = parked.send(scratch);
        if written < scratch.len() {
            // Frames are far below 4 GiB (`limits.max_frame_bytes`).
            parked.sent = u32::try_from(written).unwrap_or(u32::MAX);
            parked.over = true;
            return false;
        }
        let taken = parked.settle();
        for _ in 0..taken {
            pop(conn, out);
        }
        true
    }

    /// True once the connection's task has ended (nobody reads its queue any more).
    pub fn is_closed(&self) -> bool {
        self.0.outbound.lock().closed
    }

    /// Asks the transport to close the connection so that the client reconnects and
    /// recovers from its last `seq` ([`CLOSE_RESYNC`]).
    pub fn resync(&self) {
        self.kick(Kick::Resync);
    }

    /// Kicks the connection, unless it already was (the first reason stays).
    pub fn kick(&self, reason: Kick) {
        if self
            .0
            .kicked
            .compare_exchange(
                NOT_KICKED,
                reason as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.wake();
        }
    }

    /// Asks the connection's task to ping its client, noting when (`now`, on the node clock).
    pub fn ask_ping(&self, now: u64) {
        self.0.ping_sent.store(now.max(1), Ordering::Release);
        let waker = {
            let mut out = self.0.outbound.lock();
            out.ping = true;
            out.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn wake(&self) {
        let waker = self.0.outbound.lock().waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// True once the connection has been kicked.
    pub fn is_kicked(&self) -> bool {
        self.0.kicked.load(Ordering::Acquire) != NOT_KICKED
    }

    /// Why the connection was kicked, if it was.
    pub fn kicked_for(&self) -> Option<Kick> {
        Kick::from_u8(self.0.kicked.load(Ordering::Acquire))
    }

    /// Resolves when the connection has been kicked ([`Self::kicked_for`] says why). Only
    /// the connection's own task may wait: it shares the one waker with [`Receiver`].
    pub async fn kicked(&self) -> Kick {
        poll_fn(|cx| {
            if let Some(kick) = self.kicked_for() {
                return Poll::Ready(kick);
            }
            self.0.outbound.lock().waker = Some(cx.waker().clone());
            match self.kicked_for() {
                Some(kick) => Poll::Ready(kick),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Notes a frame from the client at `now` (the node clock); `message` when it was more
    /// than a pong.
    pub fn heard(&self, now: u64, message: bool) {
        self.0.heard.store(now, Ordering::Relaxed);
        if message {
            self.0.spoke.store(now, Ordering::Relaxed);
        }
    }

    /// When the client was last heard from, last spoke, and was asked for a ping (0: never).
    pub fn times(&self) -> (u64, u64, u64) {
        (
            self.0.heard.load(Ordering::Relaxed),
            self.0.spoke.load(Ordering::Relaxed),
            self.0.ping_sent.load(Ordering::Acquire),
        )
    }
}

/// The receiving end of a connection's queue, held by its transport task.
#[derive(Debug)]
pub struct Receiver(ConnHandle);

impl Receiver {
    /// The most urgent of a kick, a ping asked for and the next event, or `Pending` with
    /// the task's waker kept.
    pub fn poll_signal(&mut self, cx: &mut Context<'_>) -> Poll<Signal> {
        self.poll(cx, true)
    }

    /// [`Self::poll_signal`] for a task that takes no event now: a kick or a ping asked
    /// for, or `Pending` with the waker kept. Queued events stay queued.
    pub fn poll_control(&mut self, cx: &mut Context<'_>) -> Poll<Signal> {
        self.poll(cx, false)
    }

    fn poll(&mut self, cx: &mut Context<'_>, events: bool) -> Poll<Signal> {
        let conn = &self.0;
        if let Some(kick) = conn.kicked_for() {
            return Poll::Ready(Signal::Kicked(kick));
        }
        let mut out = conn.0.outbound.lock();
        if out.ping {
            out.ping = false;
            return Poll::Ready(Signal::Ping);
        }
        if events && let Some(envelope) = Self::pop(conn, &mut out) {
            return Poll::Ready(Signal::Event(envelope));
        }
        if out.waker.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
            out.waker = Some(cx.waker().clone());
        }
        drop(out);
        // A kick sets its flag before taking the lock: seen now, or its wake-up is ours.
        match conn.kicked_for() {
            Some(kick) => Poll::Ready(Signal::Kicked(kick)),
            None => Poll::Pending,
        }
    }

    /// Parks the task's writing end (see the module's header), unless an event is queued
    /// or the connection is kicked (the task has work: it is, or will be, woken). Gives
    /// `parked` back when it does not park it.
    pub fn park(&mut self, parked: Box<Parked>) -> Result<(), Box<Parked>> {
        let mut out = self.0.0.outbound.lock();
        if !out.queue.is_empty() || out.closed || self.0.is_kicked() {
            return Err(parked);
        }
        out.parked = Some(parked);
        Ok(())
    }

    /// Takes the parked writing end back, with the frames of the events it took and did
    /// not write whole (what the socket has not taken of them), which the task writes
    /// before anything else.
    pub fn reclaim(&mut self) -> Option<(Box<Parked>, Vec<u8>)> {
        let mut out = self.0.0.outbound.lock();
        let mut parked = out.parked.take()?;
        let mut unwritten = Vec::new();
        parked.frame_taken(&out.queue, &mut unwritten);
        unwritten.drain(..(parked.sent as usize).min(unwritten.len()));
        // Counted as written here: the task writes them.
        for _ in 0..parked.settle() {
            pop(&self.0.0, &mut out);
        }
        Some((parked, unwritten))
    }

    /// Whether an event is queued.
    pub fn has_events(&self) -> bool {
        !self.0.0.outbound.lock().queue.is_empty()
    }

    /// The next queued event, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Envelope>> {
        let mut out = self.0.0.outbound.lock();
        Self::pop(&self.0, &mut out)
    }

    /// Hands queued events to `take` in order, up to `max` of them and under one lock,
    /// while it accepts them; the event it refuses stays first in the queue. Returns how
    /// many it took.
    pub fn drain_while(
        &mut self,
        max: usize,
        mut take: impl FnMut(&Arc<Envelope>) -> bool,
    ) -> usize {
        let conn = &self.0;
        let mut out = conn.0.outbound.lock();
        let mut taken = 0;
        while taken < max && out.queue.front().is_some_and(&mut take) {
            Self::pop(conn, &mut out);
            taken += 1;
        }
        taken
    }

    /// The next event; `None` once the connection is kicked and its queue empty (nothing
    /// more will come).
    pub async fn recv(&mut self) -> Option<Arc<Envelope>> {
        poll_fn(|cx| {
            if let Some(envelope) = self.try_recv() {
                return Poll::Ready(Some(envelope));
            }
            match self.poll_signal(cx) {
                Poll::Ready(Signal::Event(envelope)) => Poll::Ready(Some(envelope)),
                Poll::Ready(Signal::Kicked(_)) => Poll::Ready(None),
                Poll::Ready(Signal::Ping) | Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    fn pop(conn: &ConnHandle, out: &mut Outbound) -> Option<Arc<Envelope>> {
        pop(&conn.0, out)
    }
}

/// Takes the next event off `out`'s queue, giving back what it counted.
fn pop(conn: &ConnInner, out: &mut Outbound) -> Option<Arc<Envelope>> {
    let envelope = out.queue.pop_front()?;
    if conn.max_bytes != usize::MAX {
        out.bytes -= envelope.size;
    }
    if out.queue.is_empty() && out.queue.capacity() > 0 {
        out.queue = VecDeque::new();
    }
    Some(envelope)
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut out = self.0.0.outbound.lock();
        out.closed = true;
        out.queue = VecDeque::new();
        out.waker = None;
        out.parked = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn identity() -> Arc<Identity> {
        Arc::new(Identity {
            user_id: "u".into(),
            name: "u".into(),
            role: Role::Visitor,
            domain_id: Arc::from("demo"),
            anonymous: true,
            room: None,
            label: None,
        })
    }

    fn frame(len: usize) -> Arc<Envelope> {
        Envelope::new(Event::Frame(bytes::Bytes::from(vec![b'x'; len])))
    }

    #[test]
    fn a_queue_is_bounded_in_bytes_as_well_as_events() {
        let (conn, _rx) = ConnHandle::bounded(1, identity(), 1000, 10_000);
        for _ in 0..3 {
            assert!(conn.push(frame(3_000)));
        }
        assert!(!conn.is_kicked());
        // 3 × 3,256 bytes queued; one more would pass 10,000.
        assert!(!conn.push(frame(3_000)));
        assert_eq!(conn.kicked_for(), Some(Kick::SlowConsumer));

        // What is read is given back.
        let (conn, mut rx2) = ConnHandle::bounded(2, identity(), 1000, 10_000);
        for _ in 0..20 {
            assert!(conn.push(frame(3_000)));
            rx2.try_recv().unwrap();
        }
        assert!(!conn.is_kicked());
        // A single event larger than the bound still goes to a client that is not behind.
        assert!(conn.push(frame(50_000)));
        assert!(!conn.is_kicked());
    }

    #[test]
    fn draining_takes_in_order_up_to_a_limit_and_leaves_a_refused_event_first() {
        let (conn, mut rx) = ConnHandle::bounded(1, identity(), 1000, 4_000);
        for len in 1..=5 {
            assert!(conn.push(frame(len)));
        }
        let len = |e: &Arc<Envelope>| e.size - FRAME_OVERHEAD;
        let mut seen = Vec::new();
        assert_eq!(
            rx.drain_while(2, |e| {
                seen.push(len(e));
                true
            }),
            2
        );
        assert_eq!(seen, [1, 2]);
        assert_eq!(rx.drain_while(10, |e| len(e) != 4), 1, "3 taken, 4 refused");
        assert_eq!(
            rx.try_recv().map(|e| len(&e)),
            Some(4),
            "the refused one is next"
        );
        assert_eq!(rx.drain_while(10, |_| true), 1);
        assert_eq!(rx.drain_while(10, |_| true), 0);
        let out = conn.0.outbound.lock();
        assert_eq!(
            (out.bytes, out.queue.capacity()),
            (0, 0),
            "counts given back, buffer freed"
        );
        drop(out);
        // What was drained is given back to the byte bound.
        for _ in 0..10 {
            assert!(conn.push(frame(3_000)));
            assert!(conn.push(frame(10)));
            assert_eq!(rx.drain_while(10, |_| true), 2);
        }
        assert!(!conn.is_kicked());
    }

    #[test]
    fn an_unbounded_queue_counts_events_only() {
        let (conn, _rx) = ConnHandle::new(1, identity(), 3);
        for _ in 0..3 {
            assert!(conn.push(frame(1_000_000)));
        }
        assert!(!conn.push(frame(1)));
        assert_eq!(conn.kicked_for(), Some(Kick::SlowConsumer));
    }

    /// A waker that counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl Count {
        /// A waker counting into the returned `Count`.
        fn waker() -> (Arc<Self>, Waker) {
            let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
            let waker = Waker::from(Arc::clone(&count));
            (count, waker)
        }

        fn woken(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_waiting_task_is_woken_by_an_event_a_ping_and_a_kick_and_a_kick_comes_first() {
        let (count, waker) = Count::waker();
        let mut cx = Context::from_waker(&waker);
        let woken = || count.woken();
        let (conn, mut rx) = ConnHandle::new(1, identity(), 8);

        assert!(rx.poll_signal(&mut cx).is_pending());
        assert!(conn.push(frame(10)));
        assert_eq!(woken(), 1);
        assert!(matches!(
            rx.poll_signal(&mut cx),
            Poll::Ready(Signal::Event(_))
        ));

        assert!(rx.poll_signal(&mut cx).is_pending());
        conn.ask_ping(42);
        assert_eq!(woken(), 2);
        assert_eq!(conn.times().2, 42);
        assert!(matches!(rx.poll_signal(&mut cx), Poll::Ready(Signal::Ping)));
        assert!(rx.poll_signal(&mut cx).is_pending());

        // Queued events wait behind a kick: the connection closes.
        assert!(conn.push(frame(10)));
        conn.kick(Kick::Shutdown);
        conn.kick(Kick::SlowConsumer);
        assert_eq!(
            conn.kicked_for(),
            Some(Kick::Shutdown),
            "the first reason stays"
        );
        assert!(matches!(
            rx.poll_signal(&mut cx),
            Poll::Ready(Signal::Kicked(Kick::Shutdown))
        ));
        // Nothing more is queued for a kicked connection.
        assert!(conn.push(frame(10)));
        assert!(rx.try_recv().is_some(), "what was queued before");
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn a_task_taking_no_events_still_hears_pings_and_kicks_and_the_events_stay_queued() {
        let (_, waker) = Count::waker();
        let mut cx = Context::from_waker(&waker);
        let (conn, mut rx) = ConnHandle::new(1, identity(), 8);

        assert!(conn.push(frame(10)));
        assert!(rx.poll_control(&mut cx).is_pending());
        assert!(rx.has_events());
        conn.ask_ping(42);
        assert!(matches!(
            rx.poll_control(&mut cx),
            Poll::Ready(Signal::Ping)
        ));
        assert!(rx.poll_control(&mut cx).is_pending());
        assert!(conn.push(frame(10)));
        conn.kick(Kick::Shutdown);
        assert!(matches!(
            rx.poll_control(&mut cx),
            Poll::Ready(Signal::Kicked(Kick::Shutdown))
        ));
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn a_closed_queue_takes_nothing_and_an_emptied_one_gives_its_memory_back() {
        let (conn, mut rx) = ConnHandle::new(1, identity(), 1000);
        for _ in 0..100 {
            assert!(conn.push(frame(1)));
        }
        while rx.try_recv().is_some() {}
        assert_eq!(conn.0.outbound.lock().queue.capacity(), 0);
        assert!(!conn.is_closed());
        drop(rx);
        assert!(conn.is_closed());
        assert!(conn.push(frame(1)));
        assert!(conn.0.outbound.lock().queue.is_empty());
    }

    /// A parked end's framing in these tests: a message as `seq;`, a frame as its bytes.
    fn seq_frame(out: &mut Vec<u8>, envelope: &Envelope) {
        match &envelope.event {
            Event::Message(m) => out.extend_from_slice(format!("{};", m.seq).as_bytes()),
            Event::Frame(bytes) => out.extend_from_slice(bytes),
            _ => {}
        }
    }

    fn message(seq: u64) -> Arc<Envelope> {
        Envelope::new(Event::Message(crate::model::Message::sample(room(), seq)))
    }

    fn room() -> crate::model::RoomKey {
        crate::model::RoomKey::new("demo", "r")
    }

    /// The server and client ends of a loopback TCP connection.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    /// A parked end over `server`, in `room()` at `seq` 0, counting into `frames`.
    fn parked(server: TcpStream, frames: &Counter) -> Box<Parked> {
        let mut cursors = Cursors::default();
        cursors.insert(room(), super::super::Cursor { from: 0, upto: 0 });
        Parked::new(cursors, Arc::new(server), seq_frame, frames.clone())
    }

    /// What the client has been sent, waiting up to `wait` for `len` bytes.
    async fn read(client: &mut TcpStream, len: usize, wait: std::time::Duration) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < len {
            match tokio::time::timeout(wait, client.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        got
    }

    #[tokio::test]
    async fn a_parked_connection_is_written_by_the_hub_in_order_and_its_task_sleeps() {
        let (count, waker) = Count::waker();
        let mut cx = Context::from_waker(&waker);
        let woken = || count.woken();
        let (conn, mut rx) = ConnHandle::new(1, identity(), 64);
        let (server, mut client) = tcp_pair().await;
        let frames = Counter::default();
        assert!(rx.poll_signal(&mut cx).is_pending());
        rx.park(parked(server, &frames)).unwrap();
        let second = std::time::Duration::from_secs(5);
        let none = std::time::Duration::from_millis(100);

        // Outside a round, at once; in a round, when it ends.
        assert!(conn.push(message(1)));
        assert_eq!(read(&mut client, 2, second).await, b"1;");
        corked(|| {
            assert!(conn.push(message(2)));
            assert_eq!(conn.0.outbound.lock().parked.as_ref().unwrap().taken, 1);
        });
        assert_eq!(read(&mut client, 2, second).await, b"2;");
        // Non-message events go as they come; messages the connection was sent do not.
        assert!(
            conn.push(Envelope::new(Event::Frame(bytes::Bytes::from_static(
                b"t;"
            ))))
        );
        assert!(conn.push(message(2)));
        assert!(conn.push(message(1)));
        assert_eq!(read(&mut client, 3, none).await, b"t;");
        assert_eq!((woken(), frames.get()), (0, 3), "the task slept throughout");

        // A gap is the task's to fill: queued, and the task woken.
        assert!(conn.push(message(5)));
        assert!(conn.push(message(6)));
        assert_eq!(woken(), 1);
        let (back, unwritten) = rx
            .reclaim()
            .expect("still parked until the task reclaims it");
        assert!(unwritten.is_empty());
        assert_eq!(back.cursors.get(&room()).map(|c| c.upto), Some(2));
        let queued: Vec<u64> = std::iter::from_fn(|| rx.try_recv())
            .map(|e| match &e.event {
                Event::Message(m) => m.seq,
                _ => 0,
            })
            .collect();
        assert_eq!(queued, [5, 6]);
        assert!(
            read(&mut client, 1, none).await.is_empty(),
            "nothing else was sent"
        );

        // A connection with an event queued does not park; a closed one lets go of it.
        assert!(conn.push(message(7)));
        let back = rx.park(back).expect_err("an event waits in the queue");
        rx.try_recv().unwrap();
        rx.park(back).unwrap();
        drop(rx);
        assert!(conn.0.outbound.lock().parked.is_none());
        assert!(conn.push(message(3)));
        assert!(read(&mut client, 1, none).await.is_empty());
    }

    #[tokio::test]
    async fn a_burst_or_a_full_socket_goes_back_to_the_task_with_nothing_lost() {
        let (count, waker) = Count::waker();
        let mut cx = Context::from_waker(&waker);
        let woken = || count.woken();
        let none = std::time::Duration::from_millis(100);

        // A round's events go in one write; past `MAX_TAKEN`, the rest is the task's.
        let (conn, mut rx) = ConnHandle::new(1, identity(), 1000);
        let (server, mut client) = tcp_pair().await;
        assert!(rx.poll_signal(&mut cx).is_pending());
        rx.park(parked(server, &Counter::default())).unwrap();
        corked(|| {
            for seq in 1..=3 {
                assert!(conn.push(message(seq)));
            }
        });
        assert_eq!(read(&mut client, 6, none).await, b"1;2;3;");
        assert_eq!(woken(), 0);
        let last = u64::from(MAX_TAKEN) + 10;
        corked(|| {
            for seq in 4..=last {
                assert!(conn.push(message(seq)));
            }
        });
        assert_eq!(woken(), 1);
        assert!(read(&mut client, 1, none).await.is_empty());
        let (back, unwritten) = rx.reclaim().unwrap();
        let expected: String = (4..4 + u64::from(MAX_TAKEN))
            .map(|seq| format!("{seq};"))
            .collect();
        assert_eq!(String::from_utf8(unwritten).unwrap(), expected);
        assert_eq!(
            back.cursors.get(&room()).map(|c| c.upto),
            Some(3 + u64::from(MAX_TAKEN))
        );
        let queued: Vec<u64> = std::iter::from_fn(|| rx.try_recv())
            .map(|e| match &e.event {
                Event::Message(m) => m.seq,
                _ => 0,
            })
            .collect();
        assert_eq!(
            queued,
            (4 + u64::from(MAX_TAKEN)..=last).collect::<Vec<_>>()
        );

        // A frame larger than the socket takes: the task gets what is left of it.
        let (conn, mut rx) = ConnHandle::new(2, identity(), 64);
        let (server, mut client) = tcp_pair().await;
        let server = Arc::new(server);
        assert!(rx.poll_signal(&mut cx).is_pending());
        let mut cursors = Cursors::default();
        cursors.insert(room(), super::super::Cursor { from: 0, upto: 0 });
        rx.park(Parked::new(
            cursors,
            Arc::clone(&server),
            seq_frame,
            Counter::default(),
        ))
        .unwrap();
        let big: Vec<u8> = (0..32 << 20).map(|i: u32| (i % 251) as u8).collect();
        assert!(conn.push(Envelope::new(Event::Frame(bytes::Bytes::from(big.clone())))));
        assert_eq!(woken(), 2, "the task is woken to finish");
        assert!(conn.push(message(1)), "and later events wait for it");
        let rest = rx.reclaim().unwrap().1;
        assert!(!rest.is_empty() && rest.len() < big.len());
        let reader = tokio::spawn(async move { read(&mut client, 32 << 20, none * 20).await });
        let mut written = 0;
        while written < rest.len() {
            server.writable().await.unwrap();
            match server.try_write(&rest[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let got = reader.await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big, "every byte once, in order");
        assert!(rx.try_recv().is_some());
    }
}

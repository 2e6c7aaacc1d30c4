//! A connection as the hub sees it: an identity and a bounded outbound queue.
//!
//! The hub never writes to a socket. It pushes [`Envelope`]s into each member's queue with
//! `try_send`; a full queue means the client is not reading fast enough, and the connection is
//! *kicked*: its transport task closes it with [`CLOSE_SLOW_CONSUMER`] and the client recovers
//! from its last `seq`. Nobody else ever waits for a slow client. The hub also kicks the
//! members of a room whose stream it cannot continue in order ([`Kick::Resync`], closed with
//! [`CLOSE_RESYNC`]).
//!
//! A queue is bounded twice: in events, and in bytes (each envelope's [`Envelope::size`],
//! roughly its encoded length), so that a slow client of a room of large messages is let go
//! before its backlog holds megabytes.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

use super::Event;
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
pub enum Kick {
    /// Its outbound queue overflowed.
    SlowConsumer,
    /// A room's stream could not be continued in order for it.
    Resync,
}

const NOT_KICKED: u8 = 0;
const KICKED_SLOW: u8 = 1;
const KICKED_RESYNC: u8 = 2;

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
    /// Bounded outbound queue, drained by the transport task.
    tx: mpsc::Sender<Arc<Envelope>>,
    /// Set once (to a `KICKED_…` value) when the queue overflowed or the hub asked for a
    /// resync; the transport then closes the connection.
    kicked: AtomicU8,
    /// Wakes the transport task when kicked.
    kick: Notify,
    /// Bytes of the events queued ([`Envelope::size`]), and the most allowed.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
}

impl ConnHandle {
    /// Creates the handle and the receiving end of its queue of `capacity` events (not
    /// bounded in bytes).
    pub fn new(
        id: u64,
        identity: Arc<Identity>,
        capacity: usize,
    ) -> (Self, mpsc::Receiver<Arc<Envelope>>) {
        Self::bounded(id, identity, capacity, usize::MAX)
    }

    /// Creates the handle and the receiving end of its queue of `capacity` events and
    /// `max_bytes` bytes. Whoever reads the queue gives each event's bytes back with
    /// [`Self::taken`].
    pub fn bounded(
        id: u64,
        identity: Arc<Identity>,
        capacity: usize,
        max_bytes: usize,
    ) -> (Self, mpsc::Receiver<Arc<Envelope>>) {
        let (tx, rx) = mpsc::channel(capacity);
        let inner = ConnInner {
            id,
            identity,
            tx,
            kicked: AtomicU8::new(NOT_KICKED),
            kick: Notify::new(),
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
        };
        (Self(Arc::new(inner)), rx)
    }

    /// An event was taken off the queue: its bytes are free again.
    pub fn taken(&self, envelope: &Envelope) {
        if self.0.max_bytes != usize::MAX {
            self.0
                .queued_bytes
                .fetch_sub(envelope.size, Ordering::AcqRel);
        }
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
        let size = envelope.size;
        let counted = self.0.max_bytes != usize::MAX;
        if counted {
            let before = self.0.queued_bytes.fetch_add(size, Ordering::AcqRel);
            // The first event always fits, however large: a queue only ever holds what the
            // client has not read yet.
            if before > 0 && before + size > self.0.max_bytes {
                self.0.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                self.kick_for(KICKED_SLOW);
                return false;
            }
        }
        match self.0.tx.try_send(envelope) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if counted {
                    self.0.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                }
                self.kick_for(KICKED_SLOW);
                false
            }
            // The transport task has ended; the connection is leaving its rooms.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        }
    }

    /// True once the connection's task has ended (nobody reads its queue any more).
    pub fn is_closed(&self) -> bool {
        self.0.tx.is_closed()
    }

    /// Asks the transport to close the connection so that the client reconnects and
    /// recovers from its last `seq` ([`CLOSE_RESYNC`]).
    pub fn resync(&self) {
        self.kick_for(KICKED_RESYNC);
    }

    /// Kicks the connection, unless it already was (the first reason stays).
    fn kick_for(&self, reason: u8) {
        if self
            .0
            .kicked
            .compare_exchange(NOT_KICKED, reason, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.0.kick.notify_one();
        }
    }

    /// True once the connection has been kicked.
    pub fn is_kicked(&self) -> bool {
        self.0.kicked.load(Ordering::Acquire) != NOT_KICKED
    }

    /// Why the connection was kicked, if it was.
    pub fn kick(&self) -> Option<Kick> {
        match self.0.kicked.load(Ordering::Acquire) {
            KICKED_SLOW => Some(Kick::SlowConsumer),
            KICKED_RESYNC => Some(Kick::Resync),
            _ => None,
        }
    }

    /// Resolves when the connection has been kicked ([`Self::kick`] says why).
    pub async fn kicked(&self) {
        if self.is_kicked() {
            return;
        }
        self.0.kick.notified().await;
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
        assert_eq!(conn.kick(), Some(Kick::SlowConsumer));

        // What is read is given back.
        let (conn, mut rx2) = ConnHandle::bounded(2, identity(), 1000, 10_000);
        for _ in 0..20 {
            assert!(conn.push(frame(3_000)));
            let envelope = rx2.try_recv().unwrap();
            conn.taken(&envelope);
        }
        assert!(!conn.is_kicked());
        // A single event larger than the bound still goes to a client that is not behind.
        assert!(conn.push(frame(50_000)));
        assert!(!conn.is_kicked());
    }

    #[test]
    fn an_unbounded_queue_counts_events_only() {
        let (conn, _rx) = ConnHandle::new(1, identity(), 3);
        for _ in 0..3 {
            assert!(conn.push(frame(1_000_000)));
        }
        assert!(!conn.push(frame(1)));
        assert_eq!(conn.kick(), Some(Kick::SlowConsumer));
    }
}

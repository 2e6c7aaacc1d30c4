//! A connection as the hub sees it: an identity and a bounded outbound queue.
//!
//! The hub never writes to a socket. It pushes [`Envelope`]s into each member's queue with
//! `try_send`; a full queue means the client is not reading fast enough, and the connection is
//! *kicked*: its transport task closes it with [`CLOSE_SLOW_CONSUMER`] and the client recovers
//! from its last `seq`. Nobody else ever waits for a slow client. The hub also kicks the
//! members of a room whose stream it cannot continue in order ([`Kick::Resync`], closed with
//! [`CLOSE_RESYNC`]).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

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
}

impl Envelope {
    /// Wraps an event for fan-out.
    pub fn new(event: Event) -> Arc<Self> {
        Arc::new(Self {
            event,
            native: OnceLock::new(),
        })
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
}

impl ConnHandle {
    /// Creates the handle and the receiving end of its queue of `capacity` events.
    pub fn new(
        id: u64,
        identity: Arc<Identity>,
        capacity: usize,
    ) -> (Self, mpsc::Receiver<Arc<Envelope>>) {
        let (tx, rx) = mpsc::channel(capacity);
        let inner = ConnInner {
            id,
            identity,
            tx,
            kicked: AtomicU8::new(NOT_KICKED),
            kick: Notify::new(),
        };
        (Self(Arc::new(inner)), rx)
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
        match self.0.tx.try_send(envelope) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
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

//! A connection as the hub sees it: an identity and a bounded outbound queue.
//!
//! The hub never writes to a socket. It pushes [`Envelope`]s into each member's queue with
//! `try_send`; a full queue means the client is not reading fast enough, and the connection is
//! *kicked*: its transport task closes it with [`CLOSE_SLOW_CONSUMER`] and the client recovers
//! from its last `seq`. Nobody else ever waits for a slow client.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc};

use super::Event;
use crate::model::Identity;

/// WebSocket close code for a connection whose outbound queue overflowed. Private-use range;
/// clients should reconnect and rejoin with `since` to recover what they missed.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

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
    /// Set once the queue overflowed; the transport then closes the connection.
    kicked: AtomicBool,
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
            kicked: AtomicBool::new(false),
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
                if !self.0.kicked.swap(true, Ordering::AcqRel) {
                    self.0.kick.notify_one();
                }
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

    /// True once the queue has overflowed.
    pub fn is_kicked(&self) -> bool {
        self.0.kicked.load(Ordering::Acquire)
    }

    /// Resolves when the connection has been kicked.
    pub async fn kicked(&self) {
        if self.is_kicked() {
            return;
        }
        self.0.kick.notified().await;
    }
}

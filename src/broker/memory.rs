//! In-process broker: one node, no network. Publishing is handing the message to this
//! node's handler, on the publishing thread; there is nobody to relay room events to, and
//! presence is the hub's own.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use super::occupancy::Counts;
use super::{Broker, Handler, Occupancy, Presence, Relay};
use crate::event::{Event, PresentUser};
use crate::model::{Message, RoomKey};

/// Delivers published messages to this process's handler (and so to its hub).
#[derive(Debug, Default)]
pub struct MemoryBroker {
    /// Set once by [`Broker::register`]; read on every publication (one atomic load).
    handler: OnceLock<Arc<dyn Handler>>,
}

impl MemoryBroker {
    /// A broker delivering to whichever handler is registered.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Broker for MemoryBroker {
    fn register(&self, handler: Arc<dyn Handler>) {
        let _ = self.handler.set(handler);
    }

    fn publish(&self, message: Arc<Message>) {
        if let Some(handler) = self.handler.get() {
            handler.message(message);
        }
    }

    fn relay(&self) -> Arc<dyn Relay> {
        Arc::new(Alone)
    }

    fn presence(&self) -> Arc<dyn Presence> {
        Arc::new(MemoryPresence)
    }

    fn occupancy(&self) -> Arc<dyn Occupancy> {
        Arc::new(Alone)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn topology(&self) -> crate::node::Topology {
        crate::node::Topology::Single
    }
}

/// The relay and occupancy of a single node: there is no other node.
#[derive(Debug)]
struct Alone;

impl Relay for Alone {
    fn relay(&self, _event: &Event) {}
}

impl Occupancy for Alone {
    fn shared(&self) -> bool {
        false
    }

    fn changed(&self, _key: &RoomKey, _count: usize) {}

    fn elsewhere<'a>(&'a self, _domain: &'a str, _prefix: &'a str) -> Counts<'a> {
        Box::pin(std::future::ready(Vec::new()))
    }
}

/// Presence on a single node: the hub's local users are all there is; nothing to record,
/// nobody to ask, and a leave is announced at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryPresence;

impl Presence for MemoryPresence {
    fn joined(&self, _room: &RoomKey, _user: &PresentUser) {}

    fn left(&self, _room: &RoomKey, _user: &PresentUser) -> bool {
        false
    }

    fn elsewhere<'a>(
        &'a self,
        _room: &'a RoomKey,
    ) -> Pin<Box<dyn Future<Output = Vec<PresentUser>> + Send + 'a>> {
        Box::pin(std::future::ready(Vec::new()))
    }
}

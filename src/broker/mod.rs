//! The broker carries stored messages from the node that stored them to every node's hub.
//!
//! **Delivery guarantee:** live delivery is *at most once* and, per room, in the order
//! published. A lost or reordered message is never lost to clients: the hub checks every
//! message's `seq` and fetches any gap from the store before delivering what follows it; with
//! a broker that [may lose](Broker::may_lose) messages it also compares its active rooms with
//! the store every `broker_position_check_ms`, which brings a lost last message within two
//! intervals; and a reconnecting client recovers from its last `seq`. The store, not the
//! broker, is the source of truth.
//!
//! [`memory::MemoryBroker`] (the default) hands messages straight to this process's hub.
//! [`redis::RedisBroker`] carries them, and the hub's room events, between several nodes.

pub mod memory;
pub mod redis;
pub mod shared;

use std::sync::Arc;

use crate::hub::Event;
use crate::model::{Conversation, Message};

/// What other nodes publish that is not for a room's members: changes of hand-off state
/// (so that caches of room states stay right) and the agents' inbox feed. Implemented by
/// the hand-off service.
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// A room's hand-off state changed on another node.
    fn conversation_changed(&self, conversation: Arc<Conversation>);

    /// An inbox event (`Event::InboxUpdate`, `Event::NoteAdded`) for the domain's agents
    /// on this node.
    fn to_agents(&self, domain: &str, event: Event);
}

/// Rebuilds this node's live domain table when another node changed the domains in the
/// store (implemented by the domain service). The broker calls it one call at a time, and
/// once more after a call for every change announced while that call ran.
pub trait DomainListener: Send + Sync + std::fmt::Debug {
    /// The stored domains may have changed: rebuild the table from the store.
    fn domains_changed<'a>(&'a self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// Publishes stored messages to every node.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes a message that the store has committed. Never blocks.
    fn publish(&self, message: Arc<Message>);

    /// Short name for health output (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Whether other nodes share this broker.
    fn topology(&self) -> crate::node::Topology;

    /// Stops the broker once the node has published its last message: what is queued for
    /// the other nodes is sent (within a second), then its connections are closed. Called
    /// once, at shutdown, after the store has flushed and the commit pipeline drained.
    fn close(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    /// Whether a publication can be lost on its way to another node. The hub then compares
    /// its active rooms with the store now and then, since a lost *last* message leaves no
    /// later one to reveal the gap ([`crate::hub::Hub::check_positions`]). The in-process
    /// broker hands every message to the hub directly: nothing to check.
    fn may_lose(&self) -> bool {
        false
    }

    /// Whether the broker is connected (always, for the in-process one).
    fn healthy(&self) -> bool {
        true
    }

    /// Sends an inbox event of `domain` to the agents on the other nodes (none for the
    /// in-process broker).
    fn to_agents(&self, _domain: &str, _event: &Event) {}

    /// Where events for [`Remote`] from other nodes go (once, at start-up).
    fn set_remote(&self, _remote: Arc<dyn Remote>) {}

    /// Tells the other nodes that this node committed a change of the stored domains or
    /// their keys (nothing for the in-process broker). Never blocks.
    fn domains_changed(&self) {}

    /// Who rebuilds this node's domain table when another node changed the domains, and
    /// after the broker reconnects (a change announced meanwhile may have been lost). Once,
    /// at start-up; the broker keeps only a weak reference.
    fn set_domain_listener(&self, _listener: std::sync::Weak<dyn DomainListener>) {}
}

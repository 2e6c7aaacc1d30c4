//! The broker carries stored messages and room events from the node where they happen to
//! every node; [`Presence`] says who is in a room on the other nodes.
//!
//! **Delivery guarantee:** live delivery is *at most once* and, per room, in the order
//! published. A lost or reordered message is never lost to clients: the hub checks every
//! message's `seq` and fetches any gap from the store before delivering what follows it; with
//! a broker that [may lose](Broker::may_lose) messages it also compares its active rooms with
//! the store every `broker_position_check_ms`, which brings a lost last message within two
//! intervals; and a reconnecting client recovers from its last `seq`. The store, not the
//! broker, is the source of truth.
//!
//! **What the broker knows of the node.** Nothing but one [`Handler`], registered once at
//! start-up ([`Broker::register`]): everything the broker delivers to this node goes through
//! it (committed messages, the other nodes' room events, the agents' feed, users'
//! notifications, "the domains
//! changed", "you may have missed something"), and the node (`crate::node::Events`) hands
//! each to the hub or the service it is for. The broker never sees the hub: it is built
//! first, the hub is built with the broker's [`Relay`] and [`Presence`], and the handler that
//! leads to the hub is registered last.
//!
//! [`memory::MemoryBroker`] (the default) hands messages straight to the handler on the
//! publishing thread; it relays nothing and its presence is the hub's own. [`redis::RedisBroker`]
//! carries messages, room events and presence between several nodes.
//!
//! Depends on the model, the metrics, the node's supervisor and the room-event type
//! ([`crate::event`]); never on the hub or a service.

pub mod memory;
pub mod occupancy;
pub mod presence;
pub mod redis;
pub mod shared;

use std::pin::Pin;
use std::sync::Arc;

pub use occupancy::{ChannelChange, Occupancy};
pub use presence::Presence;

use crate::event::{Event, PresentUser};
use crate::model::{Message, RoomKey};
use crate::store::notifications::Notification;

/// What the broker delivers to this node, and what a networked [`Presence`] asks of it.
/// Implemented by the node (`crate::node::Events`), which passes each call on to the hub, the
/// hand-off service or the domain service; registered once with [`Broker::register`].
pub trait Handler: Send + Sync + std::fmt::Debug {
    /// A committed message, this node's or another's, for this node's members. Called in
    /// the order published, per room in `seq` order, on the caller's thread: keep it quick.
    fn message(&self, message: Arc<Message>);

    /// A room event another node published (typing, a delta, a read receipt, a room-status
    /// change, an agent joining or leaving, a presence change) for this node's members.
    fn room_event(&self, event: Event);

    /// An event of `domain`'s agents' feed (`Event::InboxUpdate`, `Event::NoteAdded`)
    /// another node published, for the agents connected here.
    fn agent_event(&self, domain: &str, event: Event);

    /// A notification another node stored, for its user's subscribers here.
    fn notification(&self, notification: Arc<Notification>);

    /// Another node changed the stored domains, or the broker reconnected and a change may
    /// have been missed: rebuild the domain table from the store. The broker calls it one
    /// call at a time, and once more after a call for every change announced while that call
    /// ran.
    fn domains_changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;

    /// Deliveries may have been lost (the broker reconnected, or its reader fell behind):
    /// catch every active room up from the store.
    fn resync(&self);

    /// Every active room's users present on this node (for a networked presence's renewal).
    fn local_presence(&self) -> Vec<(RoomKey, Vec<PresentUser>)>;

    /// Whether `user_id` is present in `room` on this node now.
    fn is_present(&self, room: &RoomKey, user_id: &str) -> bool;

    /// A leave that [`Presence::left`] held back is settled: `gone` when the user is on no
    /// other node. Called exactly once for each leave held back.
    fn leave_settled(&self, room: &RoomKey, user: PresentUser, gone: bool);

    /// A channel changed on the cluster as a whole ([`Occupancy`]): its first subscriber
    /// on any node, its last one gone, a presence member's first connection anywhere or
    /// last one gone. Called on one node only, for a shared broker.
    fn channel_change(&self, change: ChannelChange);
}

/// Carries this node's room events (those of `Hub::broadcast`: typing, read receipts,
/// streamed deltas, hand-off changes) to the other nodes, whose brokers hand them to their
/// [`Handler::room_event`]. Stored messages travel with [`Broker::publish`] instead, in `seq`
/// order; presence changes with [`Presence`]. A single node relays nothing.
pub trait Relay: Send + Sync + std::fmt::Debug {
    /// Sends `event` to the other nodes. Never blocks.
    fn relay(&self, event: &Event);
}

/// Publishes stored messages to every node.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Where everything this broker delivers to this node goes. Called once, at start-up,
    /// before the first message is published; later calls are ignored.
    fn register(&self, handler: Arc<dyn Handler>);

    /// Publishes a message that the store has committed, to this node's handler first and
    /// then to the other nodes. Never blocks.
    fn publish(&self, message: Arc<Message>);

    /// Where the hub sends its room events for the other nodes.
    fn relay(&self) -> Arc<dyn Relay>;

    /// Who is present in a room on the other nodes, and how this node's joins and leaves
    /// reach them.
    fn presence(&self) -> Arc<dyn Presence>;

    /// How many subscribers the channels have on the other nodes, and how this node's
    /// counts reach them.
    fn occupancy(&self) -> Arc<dyn Occupancy>;

    /// Short name for health output (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Whether other nodes share this broker.
    fn topology(&self) -> crate::node::Topology;

    /// Stops the broker once the node has published its last message: what is queued for
    /// the other nodes is sent (within a second), then its connections are closed. Called
    /// once, at shutdown, after the store has flushed and the commit pipeline drained.
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }

    /// Whether a publication can be lost on its way to another node. The hub then compares
    /// its active rooms with the store now and then, since a lost *last* message leaves no
    /// later one to reveal the gap (`Hub::check_positions`). The in-process
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

    /// Sends a notification this node stored (`Event::Notification`) to its user's
    /// subscribers on the other nodes (none for the in-process broker). Never blocks.
    fn to_user(&self, _event: &Event) {}

    /// Tells the other nodes that this node committed a change of the stored domains or
    /// their keys (nothing for the in-process broker). Never blocks.
    fn domains_changed(&self) {}
}

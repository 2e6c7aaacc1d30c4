//! The node: what one Parlor process runs beneath its transports and services.
//!
//! - [`Supervisor`] — every task and thread the node starts, its shutdown token, and the
//!   rule that a worker's panic fails the node instead of stopping part of it silently.
//! - [`Events`] — the node's broker handler: what the broker delivers (messages, the other
//!   nodes' room events, the agents' feed, domain changes, "catch up") goes from it to the
//!   hub or the service it is for.
//! - [`pipeline`] — the way a committed message leaves the store: in commit order to the
//!   broker (and so to every node's hub) and to the observers of committed messages (the
//!   hand-off service).
//! - [`Topology`] — whether the node is alone or one of several, which decides what it must
//!   check against the store and what it hears from the others.
//!
//! The hub (`crate::hub`), the broker (`crate::broker`) and the store (`crate::store`) are
//! the node's parts; `App::build` (in `lib.rs`) puts them together, in this order: the
//! broker (knowing nothing of the rest), the hub with the broker's relay and presence, the
//! services, and last the [`Events`] handler registered with the broker.

pub mod events;
pub mod pipeline;
pub mod supervisor;

pub use events::Events;
pub use supervisor::Supervisor;

/// Whether this node serves alone or as one of several sharing a broker and a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One process: the in-process broker; every commit and every room state is this
    /// node's own.
    Single,
    /// Several nodes: another node may have committed a message or changed a room a
    /// moment ago, so decisions that depend on it read the store.
    Cluster,
}

impl Topology {
    /// True for [`Topology::Cluster`].
    pub fn is_cluster(self) -> bool {
        self == Self::Cluster
    }
}

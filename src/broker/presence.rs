//! Presence across nodes: who is in a room on the *other* nodes, and how this node's own
//! joins and leaves reach them.
//!
//! The hub keeps the users present on this node (tabs of one user count once) and decides
//! when a user arrives (first local connection) or goes (last one). It tells its
//! [`Presence`] of both, and asks it for the members elsewhere when someone joins. A single
//! node's presence ([`crate::broker::memory::MemoryPresence`]) has no one else to ask or
//! tell; the Redis one (`crate::broker::redis::presence`) keeps one entry per (user, node)
//! with a TTL, so that a user is announced once however many tabs and nodes they use, and
//! the users of a node that died go within the TTL.
//!
//! **Leaves are settled.** A user leaving this node may still be on another: then nobody
//! must be told. [`Presence::left`] may therefore hold the announcement to this node's
//! members back until it knows; it then calls [`Handler::leave_settled`] exactly once,
//! saying whether the user is gone from every node, and the hub announces the leave if the
//! user has not come back meanwhile.
//!
//! [`Handler::leave_settled`]: super::Handler::leave_settled

use std::pin::Pin;

use crate::event::PresentUser;
use crate::model::RoomKey;

/// This node's view of presence on the other nodes.
pub trait Presence: Send + Sync + std::fmt::Debug {
    /// The first connection of `user` on this node joined `room`: record it and tell the
    /// other nodes. Never blocks.
    fn joined(&self, room: &RoomKey, user: &PresentUser);

    /// The last connection of `user` on this node left `room`: record it and tell the other
    /// nodes. Returns true when the announcement to this node's members is held back until
    /// the presence knows whether the user is on another node: it then calls
    /// [`super::Handler::leave_settled`] exactly once, later. False: the hub announces the
    /// leave here at once. Never blocks.
    fn left(&self, room: &RoomKey, user: &PresentUser) -> bool;

    /// The users present in `room` on the other nodes (each once).
    fn elsewhere<'a>(
        &'a self,
        room: &'a RoomKey,
    ) -> Pin<Box<dyn Future<Output = Vec<PresentUser>> + Send + 'a>>;
}

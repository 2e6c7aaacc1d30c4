//! Channel occupancy across nodes: how many connections subscribe to each Pusher channel
//! on the *other* nodes, and the cluster-wide changes that Pusher's webhooks report.
//!
//! The hub counts the subscribers of each channel on this node and tells its [`Occupancy`]
//! every new count. A single node's occupancy ([`crate::broker::memory`]) has no one to
//! tell: the hub itself sees a channel's first subscriber and its last, and a presence
//! member's first connection and last ([`Occupancy::shared`] is false). A shared one
//! (`crate::broker::redis::occupancy`) keeps every node's counts where the others read
//! them, and decides, in one place for the whole cluster, when a channel becomes occupied
//! or vacated; it then calls [`super::Handler::channel_change`] on the node whose change
//! it was. A presence member's first connection and last are decided the same way by the
//! shared [`super::Presence`].

use std::pin::Pin;

use crate::model::RoomKey;

/// Subscriber counts by room id, when read.
pub type Counts<'a> = Pin<Box<dyn Future<Output = Vec<(String, usize)>> + Send + 'a>>;

/// A change of a channel on the cluster as a whole (what Pusher's webhooks report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelChange {
    /// The channel's first subscriber, on any node.
    Occupied(RoomKey),
    /// The channel's last subscriber left, on every node.
    Vacated(RoomKey),
    /// A presence channel's member (by user id) has its first connection in it.
    MemberAdded(RoomKey, String),
    /// A presence channel's member has no connection left in it on any node.
    MemberRemoved(RoomKey, String),
}

/// This node's view of the channels' subscribers on the other nodes.
pub trait Occupancy: Send + Sync + std::fmt::Debug {
    /// Whether other nodes share it: then it, not the hub, reports [`ChannelChange`]s.
    fn shared(&self) -> bool;

    /// The channel `key` has `count` subscribers on this node now (0: none). Called under
    /// the channel's lock, so the last count told is this node's count. Never blocks.
    fn changed(&self, key: &RoomKey, count: usize);

    /// The subscribers on the other nodes of the channels of `domain` whose room ids start
    /// with `prefix` (a channel key's `#{app}#`), by room id; channels with none left out.
    fn elsewhere<'a>(&'a self, domain: &'a str, prefix: &'a str) -> Counts<'a>;
}

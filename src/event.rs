//! The one room-event type: what happens in a room on its way to the room's members, on
//! this node and, serialized as it is, on the other nodes.
//!
//! Its own module so that the hub that produces and fans events out and the broker that
//! carries them between nodes both depend on it, and not on each other. Depends on the
//! model, the store's inbox entry and the hub's channel-event type only.

use std::sync::Arc;

use crate::model::{Agent, Conversation, Message, Note, Role, RoomKey};
use crate::store::InboxEntry;
use crate::store::notifications::Notification;

/// Something that happened in a room, on its way to the room's members — on this node, and
/// (serialized as it is) to the other nodes' hubs through a networked broker. The one type
/// for room events: the transports encode it for their clients, the broker carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "camelCase")]
pub enum Event {
    /// A stored message (`message-received`).
    Message(Arc<Message>),
    /// A member came or went (first connection of a user in, last one out).
    Presence {
        /// The room.
        room: RoomKey,
        /// Who.
        user: PresentUser,
        /// True when joined, false when left.
        joined: bool,
    },
    /// A member started or stopped typing.
    Typing {
        /// The room.
        room: RoomKey,
        /// Who.
        user: PresentUser,
        /// Typing or not.
        typing: bool,
    },
    /// More text of a reply the assistant is streaming into the room (`message-delta`).
    Delta {
        /// The room.
        room: RoomKey,
        /// The reply's id: the stored message's `clientMessageId` once it is complete.
        message_id: Arc<str>,
        /// The new text.
        delta: String,
        /// 0, 1, 2… per reply, so a client can put deltas in order and spot a gap.
        index: u64,
    },
    /// A frame already encoded for one connection: a reply produced after the request
    /// that asked for it (the deltas of an `ai-stream`). It never leaves its node.
    #[serde(skip)]
    Frame(bytes::Bytes),
    /// A support room's hand-off state changed (`room-status`); `seq` is that of the stored
    /// system message recording it.
    RoomStatus {
        /// The new state.
        conversation: Arc<Conversation>,
        /// The system message's `seq`.
        seq: u64,
    },
    /// An agent took the room (`agent-joined`).
    AgentJoined {
        /// The room.
        room: RoomKey,
        /// Who.
        agent: Agent,
    },
    /// An agent gave the room up (`agent-left`): `unassigned`, `transferred` or `resolved`.
    AgentLeft {
        /// The room.
        room: RoomKey,
        /// Who.
        agent: Agent,
        /// Why.
        reason: LeftReason,
    },
    /// A room's entry in the agents' inbox changed (`inbox-update`).
    InboxUpdate(Arc<InboxEntry>),
    /// An agent wrote an internal note (`note-added`), for agents only.
    NoteAdded(Arc<Note>),
    /// A notification stored for one user (`notification`; docs/notifications.md): for
    /// that user's live subscribers on every node, not for a room.
    Notification(Arc<Notification>),
    /// An event published on a Pusher channel (`crate::hub::channels`): for the
    /// channel's subscribers on every node; nothing is stored.
    Channel(Arc<crate::hub::ChannelEvent>),
    /// A member read the room up to `seq`.
    ReadReceipt {
        /// The room.
        room: RoomKey,
        /// Reader's user id.
        user_id: String,
        /// Highest read `seq`.
        seq: u64,
    },
}

/// Why an agent left a room (`agent-left`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeftReason {
    /// The agent gave the room back to the queue.
    Unassigned,
    /// Another agent took it.
    Transferred,
    /// The conversation was resolved.
    Resolved,
}

impl LeftReason {
    /// The reason as clients read it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unassigned => "unassigned",
            Self::Transferred => "transferred",
            Self::Resolved => "resolved",
        }
    }
}

impl Event {
    /// The room the event belongs to (for the agents' feed and notes: the room the entry
    /// is about); `None` for a connection's own frame and a user's notification.
    pub fn room(&self) -> Option<&RoomKey> {
        match self {
            Event::Message(m) => Some(&m.room),
            Event::Presence { room, .. }
            | Event::Typing { room, .. }
            | Event::Delta { room, .. }
            | Event::AgentJoined { room, .. }
            | Event::AgentLeft { room, .. }
            | Event::ReadReceipt { room, .. } => Some(room),
            Event::RoomStatus { conversation, .. } => Some(&conversation.room),
            Event::InboxUpdate(entry) => Some(&entry.conversation.room),
            Event::NoteAdded(note) => Some(&note.room),
            Event::Channel(event) => Some(&event.key),
            Event::Frame(_) | Event::Notification(_) => None,
        }
    }
}

/// A user present in a room.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PresentUser {
    /// User id.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// What a presence channel's member is shown with (Pusher's `user_info`, JSON text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Arc<str>>,
}

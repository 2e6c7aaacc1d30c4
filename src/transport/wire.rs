//! JSON shapes shared by the native WebSocket protocol and the HTTP API.
//!
//! A stored message has one JSON form everywhere (history, HTTP listings, `message-received`):
//! the WeeziQ seed's fields (`id`, `message`, `userId`, `userName`, `role`, `timestamp`,
//! `chatRoomId`) plus `roomId`, `seq`, `messageType`, `clientMessageId` and `data`.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::error_code::ErrorCode;
use crate::hub::{Event, PresentUser};
use crate::model::{Agent, Conversation, Message, Note, iso};
use crate::store::notifications::Notification;
use crate::store::{Customer, InboxEntry};

/// A stored message on the wire. With `frame` set it is a complete `message-received` frame.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireMessage<'a> {
    /// Frame type when sent as a frame of its own.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub frame: Option<&'static str>,
    pub id: &'a str,
    pub room_id: &'a str,
    /// The seed's name for `roomId`.
    pub chat_room_id: &'a str,
    pub seq: u64,
    /// The text (the seed's field name).
    pub message: &'a str,
    pub message_type: &'a str,
    pub user_id: &'a str,
    pub user_name: &'a str,
    pub role: &'a str,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a Value>,
}

impl<'a> WireMessage<'a> {
    /// The message object.
    pub fn of(m: &'a Message) -> Self {
        Self {
            frame: None,
            id: &m.id,
            room_id: &m.room.room_id,
            chat_room_id: &m.room.room_id,
            seq: m.seq,
            message: &m.content,
            message_type: &m.kind,
            user_id: &m.author.user_id,
            user_name: &m.author.name,
            role: &m.author.role,
            timestamp: iso(m.created_at),
            client_message_id: m.client_message_id.as_deref(),
            data: m.data.as_ref(),
        }
    }

    /// The message as a `message-received` frame.
    pub fn frame(m: &'a Message) -> Self {
        Self {
            frame: Some("message-received"),
            ..Self::of(m)
        }
    }
}

/// A present user on the wire.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireUser<'a> {
    pub user_id: &'a str,
    pub name: &'a str,
    pub role: &'static str,
}

impl<'a> From<&'a PresentUser> for WireUser<'a> {
    fn from(u: &'a PresentUser) -> Self {
        Self {
            user_id: &u.user_id,
            name: &u.name,
            role: u.role.as_str(),
        }
    }
}

/// Serialises a value that cannot fail to serialise (plain structs of strings and numbers).
pub fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(v) => Bytes::from(v),
        Err(e) => {
            tracing::error!(error = %e, "failed to encode a frame");
            Bytes::from_static(br#"{"type":"error","code":"internal","message":"encoding failed"}"#)
        }
    }
}

/// `frame` (a native frame's JSON) in the Eclipse dialect: a stored message is
/// `type: "message"`, every other type is in snake case (`agent-joined` → `agent_joined`),
/// and a frame about a room names it `chatId` too.
pub fn eclipse_frame(frame: &[u8]) -> Bytes {
    let Ok(serde_json::Value::Object(mut v)) = serde_json::from_slice::<serde_json::Value>(frame)
    else {
        return Bytes::copy_from_slice(frame);
    };
    if let Some(serde_json::Value::String(kind)) = v.get_mut("type") {
        *kind = match kind.as_str() {
            "message-received" => "message".to_owned(),
            other => other.replace('-', "_"),
        };
    }
    if let Some(room) = v.get("roomId").cloned() {
        v.insert("chatId".to_owned(), room);
    }
    to_bytes(&v)
}

/// The native encoding of a hub event.
pub fn encode_event(event: &Event) -> Bytes {
    match event {
        Event::Message(m) => to_bytes(&WireMessage::frame(m)),
        Event::Presence { room, user, joined } => to_bytes(&serde_json::json!({
            "type": "presence",
            "roomId": &*room.room_id,
            "event": if *joined { "join" } else { "leave" },
            "user": WireUser::from(user),
        })),
        Event::Typing { room, user, typing } => to_bytes(&serde_json::json!({
            "type": "typing",
            "roomId": &*room.room_id,
            "userId": user.user_id,
            "userName": user.name,
            "isTyping": typing,
        })),
        Event::Frame(bytes) => bytes.clone(),
        Event::Delta {
            room,
            message_id,
            delta,
            index,
        } => to_bytes(&serde_json::json!({
            "type": "message-delta",
            "roomId": &*room.room_id,
            "messageId": &**message_id,
            "delta": delta,
            "index": index,
        })),
        Event::RoomStatus { conversation, seq } => to_bytes(&serde_json::json!({
            "type": "room-status",
            "roomId": &*conversation.room.room_id,
            "seq": seq,
            "changed": true,
            "conversation": conversation_json(conversation),
        })),
        Event::AgentJoined { room, agent } => to_bytes(&serde_json::json!({
            "type": "agent-joined",
            "roomId": &*room.room_id,
            "agent": agent_json(agent),
        })),
        Event::AgentLeft {
            room,
            agent,
            reason,
        } => to_bytes(&serde_json::json!({
            "type": "agent-left",
            "roomId": &*room.room_id,
            "agent": agent_json(agent),
            "reason": reason.as_str(),
        })),
        Event::InboxUpdate(entry) => to_bytes(&serde_json::json!({
            "type": "inbox-update",
            "conversation": inbox_entry_json(entry, false),
        })),
        Event::NoteAdded(note) => to_bytes(&serde_json::json!({
            "type": "note-added",
            "roomId": &*note.room.room_id,
            "note": note_json(note),
        })),
        Event::ReadReceipt { room, user_id, seq } => to_bytes(&serde_json::json!({
            "type": "read-receipt",
            "roomId": &*room.room_id,
            "userId": user_id,
            "seq": seq,
        })),
        Event::Notification(n) => to_bytes(&serde_json::json!({
            "type": "notification",
            "notification": notification_json(n),
        })),
        // A Pusher channel's event: only Pusher sockets subscribe to channels, and they
        // write their own frame; this form is for completeness.
        Event::Channel(c) => to_bytes(&serde_json::json!({
            "type": "channel-event",
            "channel": c.channel(),
            "event": c.event,
            "data": serde_json::from_str::<Value>(&c.data).unwrap_or(Value::Null),
        })),
    }
}

/// A notification as every transport shows it (`docs/notifications.md`): seed 004's message
/// object, with `seq`.
pub fn notification_json(n: &Notification) -> Value {
    // Stored as the JSON text the sender gave; a value that no longer parses shows as null.
    let data = n
        .data
        .as_deref()
        .and_then(|d| serde_json::from_str::<Value>(d).ok())
        .unwrap_or(Value::Null);
    serde_json::json!({
        "id": n.id,
        "userId": n.user_id,
        "orgId": n.org_id,
        "taskId": n.task_id,
        "type": n.kind.as_str(),
        "content": n.content,
        "data": data,
        "read": n.read,
        "createdAt": iso(n.created_at),
        "seq": n.seq,
    })
}

/// `{userId, name}`.
pub fn agent_json(agent: &Agent) -> Value {
    serde_json::json!({ "userId": agent.user_id, "name": agent.name })
}

/// A support room's hand-off state (`docs/handoff.md`, "The conversation object").
pub fn conversation_json(c: &Conversation) -> Value {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(iso);
    serde_json::json!({
        "roomId": &*c.room.room_id,
        "status": c.status.as_str(),
        "assignee": c.assignee.as_ref().map(agent_json),
        "waitingSince": time(c.waiting_since),
        "assignedAt": time(c.assigned_at),
        "firstResponseAt": time(c.first_response_at),
        "firstResponseSecs": c.first_response_secs(),
        "resolvedAt": time(c.resolved_at),
        "updatedAt": (c.version > 0).then(|| iso(c.updated_at)),
    })
}

/// Longest message preview in an inbox entry, in characters.
const PREVIEW_CHARS: usize = 140;

/// An inbox entry: the conversation plus the room's latest message and its visitor; with
/// `reader`, also the reader's position and unread count.
pub fn inbox_entry_json(e: &InboxEntry, reader: bool) -> Value {
    let mut v = conversation_json(&e.conversation);
    let m = &e.last_message;
    let preview: String = m.content.chars().take(PREVIEW_CHARS).collect();
    v["lastSeq"] = m.seq.into();
    v["lastMessage"] = serde_json::json!({
        "seq": m.seq,
        "message": preview,
        "role": m.author.role,
        "userName": m.author.name,
        "timestamp": iso(m.created_at),
    });
    v["visitor"] = match &e.created_by {
        Some(id) => serde_json::json!({
            "userId": id,
            "name": e.visitor_name.as_deref().unwrap_or("Visitor"),
        }),
        None => Value::Null,
    };
    v["createdAt"] = iso(e.created_at).into();
    if reader {
        v["readSeq"] = e.read_seq.into();
        v["unread"] = m.seq.saturating_sub(e.read_seq).into();
    }
    v
}

/// A stored customer, as agents see it beside a conversation.
pub fn customer_json(user_id: &str, c: Option<&Customer>) -> Value {
    let Some(c) = c else {
        return serde_json::json!({ "userId": user_id });
    };
    serde_json::json!({
        "userId": user_id,
        "name": c.name,
        "firstSeen": iso(c.first_seen),
        "lastSeen": iso(c.last_seen),
        "context": c.context,
        "data": c.data,
    })
}

/// An internal note.
pub fn note_json(n: &Note) -> Value {
    serde_json::json!({
        "id": n.id,
        "roomId": &*n.room.room_id,
        "text": n.text,
        "author": agent_json(&n.author),
        "timestamp": iso(n.created_at),
    })
}

/// `{"error":{"code","message"}}`, the HTTP error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
}

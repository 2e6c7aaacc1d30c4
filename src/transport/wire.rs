//! JSON shapes shared by the native WebSocket protocol and the HTTP API.
//!
//! A stored message has one JSON form everywhere (history, HTTP listings, `message-received`):
//! the WeeziQ seed's fields (`id`, `message`, `userId`, `userName`, `role`, `timestamp`,
//! `chatRoomId`) plus `roomId`, `seq`, `messageType`, `clientMessageId` and `data`.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::hub::{Event, PresentUser};
use crate::model::{Message, iso};

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
        Event::ReadReceipt { room, user_id, seq } => to_bytes(&serde_json::json!({
            "type": "read-receipt",
            "roomId": &*room.room_id,
            "userId": user_id,
            "seq": seq,
        })),
    }
}

/// `{"error":{"code","message"}}`, the HTTP error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub code: &'a str,
    pub message: &'a str,
}

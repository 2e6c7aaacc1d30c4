//! The internal data model shared by every layer: identities, rooms, messages.
//!
//! These types carry no wire format. Transports translate them to and from JSON frames; the
//! store maps them to rows. Depends on nothing else in the crate.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Who is on a connection or behind an HTTP request. Set from a verified token, or as an
/// anonymous visitor. An anonymous WebSocket connection may swap it once for a token's,
/// with an `auth` frame before it joins a room, or settle it with its first `join-room`
/// (its domain and, where the domain lets clients name themselves, its id); nothing else
/// a client sends changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable user id within the domain.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// What the user may do (see `auth::policy`).
    pub role: Role,
    /// The tenant the user belongs to.
    pub domain_id: Arc<str>,
    /// True when no token was presented and the server generated this identity.
    pub anonymous: bool,
    /// The one room a domain token names (its `claims.room`, Eclipse's `chatId`): the
    /// connection is joined to it at connect and a visitor may use it whoever created it.
    pub room: Option<Box<str>>,
    /// Set for an identity the client named itself (`anonymous_identity = "client"`): the
    /// visitor role name it chose (`customer`, `user`, `visitor`), shown on its messages.
    /// The policy treats it as `role`.
    pub label: Option<&'static str>,
}

/// Roles an identity can hold. A client never gets a role by claiming it in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Anonymous website visitor or signed-in customer.
    Visitor,
    /// Human support agent of a domain.
    Agent,
    /// Administrator of one domain (a token's `admin` role); with the domain `*`, the holder
    /// of an admin key, who manages every domain (`auth::policy::may_manage_domains`).
    Admin,
    /// A back end calling the server API.
    Service,
}

impl Role {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Visitor => "visitor",
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "visitor" => Role::Visitor,
            "agent" => Role::Agent,
            "admin" => Role::Admin,
            "service" => Role::Service,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A room is addressed by its domain and its id: the same id in two domains names two rooms,
/// so no lookup can cross a tenant boundary by guessing an id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RoomKey {
    /// Owning domain.
    pub domain_id: Arc<str>,
    /// Room id, unique within the domain.
    pub room_id: Arc<str>,
}

impl RoomKey {
    /// Builds a key.
    pub fn new(domain_id: impl Into<Arc<str>>, room_id: impl Into<Arc<str>>) -> Self {
        Self {
            domain_id: domain_id.into(),
            room_id: room_id.into(),
        }
    }

    /// Whether it is a Pusher channel's key rather than a room's: `#{app_id}#{channel}`
    /// (`crate::hub::channels`; `#` is in no room id).
    pub fn is_channel(&self) -> bool {
        self.room_id.starts_with('#')
    }
}

impl fmt::Display for RoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain_id, self.room_id)
    }
}

/// The author of a stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Author {
    /// User id of the author: the domain's assistant writes as its bot's `author_id`
    /// (`ai-assistant` by default), hand-off status messages as `system`.
    pub user_id: String,
    /// Display name at the time of writing.
    pub name: String,
    /// Role label shown with the message: the author's identity role, unless a service or
    /// admin author chose another label of [`MESSAGE_ROLES`] (`auth::policy::message_role`).
    /// The assistant's replies carry `assistant`, its notices and hand-off status messages
    /// `system`.
    pub role: String,
}

/// Role labels a message may carry.
pub const MESSAGE_ROLES: &[&str] = &[
    "visitor",
    "user",
    "customer",
    "agent",
    "assistant",
    "system",
    "admin",
    "service",
];

/// A stored message. `seq` is the room's offset: 1, 2, 3… with no gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Globally unique id.
    pub id: String,
    /// Room the message belongs to.
    pub room: RoomKey,
    /// Position in the room, assigned by the store.
    pub seq: u64,
    /// Who wrote it.
    pub author: Author,
    /// Message type: `text` for chat, `status` for the hand-off's status messages.
    pub kind: String,
    /// The text.
    pub content: String,
    /// Structured extras (actions, attachments…), if any.
    pub data: Option<serde_json::Value>,
    /// Client-chosen id making a send idempotent.
    pub client_message_id: Option<String>,
    /// When the store accepted it.
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
impl Message {
    /// A stored text message of `room` at `seq`, for unit tests.
    pub(crate) fn sample(room: RoomKey, seq: u64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            id: format!("m{seq}"),
            room,
            seq,
            author: Author {
                user_id: "u".into(),
                name: "U".into(),
                role: "visitor".into(),
            },
            kind: "text".into(),
            content: String::new(),
            data: None,
            client_message_id: None,
            created_at: now_ms(),
        })
    }
}

/// A message about to be stored (no id, `seq` or time yet).
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Target room; created on first use.
    pub room: RoomKey,
    /// Who writes it.
    pub author: Author,
    /// Message type.
    pub kind: String,
    /// The text.
    pub content: String,
    /// Structured extras.
    pub data: Option<serde_json::Value>,
    /// Idempotency key.
    pub client_message_id: Option<String>,
}

impl NewMessage {
    /// The message as stored with `id`, `seq` and `created_at`.
    pub fn stored(&self, id: String, seq: u64, created_at: DateTime<Utc>) -> Message {
        Message {
            id,
            room: self.room.clone(),
            seq,
            author: self.author.clone(),
            kind: self.kind.clone(),
            content: self.content.clone(),
            data: self.data.clone(),
            client_message_id: self.client_message_id.clone(),
            created_at,
        }
    }
}

/// A room's stored description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// Its key.
    pub key: RoomKey,
    /// `support`: every room is created with this kind.
    pub kind: String,
    /// User id of whoever created it.
    pub created_by: Option<String>,
    /// Highest stored `seq` (0 when empty).
    pub last_seq: u64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Where a support room stands in the hand-off from the bot to a human (`docs/handoff.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoomStatus {
    /// The bot answers.
    #[default]
    Bot,
    /// The visitor asked for a human; nobody has taken the room yet.
    Waiting,
    /// An agent has the room; the bot is silent.
    Assigned,
    /// Done; a new visitor message reopens it with the bot.
    Resolved,
}

impl RoomStatus {
    /// Every status, in the order of the state machine.
    pub const ALL: [RoomStatus; 4] = [
        RoomStatus::Bot,
        RoomStatus::Waiting,
        RoomStatus::Assigned,
        RoomStatus::Resolved,
    ];

    /// The lowercase wire and stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomStatus::Bot => "bot",
            RoomStatus::Waiting => "waiting",
            RoomStatus::Assigned => "assigned",
            RoomStatus::Resolved => "resolved",
        }
    }

    /// Parses a wire or stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A human agent as a conversation names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// User id.
    pub user_id: String,
    /// Display name.
    pub name: String,
}

/// A support room's hand-off state. A room that never left the bot has none stored; it is
/// [`Conversation::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The room.
    pub room: RoomKey,
    /// Where it stands.
    pub status: RoomStatus,
    /// The agent who has it (`assigned`).
    pub assignee: Option<Agent>,
    /// When the visitor started waiting for a human (kept through an unassign).
    pub waiting_since: Option<DateTime<Utc>>,
    /// When the current assignee took it.
    pub assigned_at: Option<DateTime<Utc>>,
    /// When an agent first wrote after the room left the bot.
    pub first_response_at: Option<DateTime<Utc>>,
    /// When it was resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Grows by one per change, so that of two copies the newer is known.
    pub version: u64,
    /// The `seq` of the system message that recorded the last change (0: none), so a
    /// message can be told to be older or newer than the state.
    pub status_seq: u64,
}

impl Conversation {
    /// A room the bot has: nothing decided yet.
    pub fn new(room: RoomKey) -> Self {
        Self {
            room,
            status: RoomStatus::Bot,
            assignee: None,
            waiting_since: None,
            assigned_at: None,
            first_response_at: None,
            resolved_at: None,
            updated_at: DateTime::<Utc>::default(),
            version: 0,
            status_seq: 0,
        }
    }

    /// Seconds from the start of the wait (or the assignment) to the first agent message.
    pub fn first_response_secs(&self) -> Option<i64> {
        self.first_response_ms().map(|ms| ms / 1000)
    }

    /// [`Self::first_response_secs`] in milliseconds.
    pub fn first_response_ms(&self) -> Option<i64> {
        let start = self.waiting_since.or(self.assigned_at)?;
        Some((self.first_response_at? - start).num_milliseconds().max(0))
    }
}

/// An agent-only note on a room, kept apart from the room's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Note {
    /// Unique id.
    pub id: String,
    /// The room.
    pub room: RoomKey,
    /// Who wrote it.
    pub author: Agent,
    /// The text.
    pub text: String,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// Whether a message's role label is a visitor's: `visitor`, or the names a client that
/// names itself may use (`customer`, `user`).
pub fn is_visitor_label(role: &str) -> bool {
    matches!(role, "visitor" | "customer" | "user")
}

/// Ids (rooms, domains, client message ids, user ids) are 1–128 printable ASCII characters
/// from a conservative set, so they are safe in URLs, logs and Redis channel names.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'))
}

/// Nesting depth of a JSON value: 0 for a scalar, 1 for a flat object or array.
pub fn json_depth(value: &serde_json::Value) -> usize {
    // Iterative, so a hostile document cannot overflow the stack here.
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(a) => Box::new(a.iter()),
            serde_json::Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(depth + 1);
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    deepest
}

/// Current time truncated to milliseconds, the precision the store keeps.
pub fn now_ms() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// ISO-8601 with milliseconds and `Z`, as the seeds write timestamps.
pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("room-123"));
        assert!(valid_id("a.b:c@d_e"));
        assert!(!valid_id(""));
        assert!(!valid_id("has space"));
        assert!(!valid_id("slash/no"));
        assert!(!valid_id(&"x".repeat(129)));
        assert!(!valid_id("ünï"));
    }

    #[test]
    fn depth() {
        use serde_json::json;
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": 2}]})), 3);
    }

    #[test]
    fn iso_format() {
        let t = DateTime::from_timestamp_millis(1_704_067_200_000).unwrap_or_default();
        assert_eq!(iso(t), "2024-01-01T00:00:00.000Z");
    }
}

//! One tenant's settings: its tokens, rooms, hand-off, business hours, keys and limits.

use super::*;

/// One tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// Stable identifier (`domainId` on the wire).
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Which rooms a visitor may use: only the ones it created (`owned`), or any room of
    /// the domain whose id it knows (`open`, the demo playground).
    #[serde(default)]
    pub visitor_rooms: VisitorRooms,
    /// Web origins (`https://shop.example`) whose pages may use this domain: CORS, the
    /// WebSocket `Origin` check and visitor tokens. `"*"` allows any origin; empty allows
    /// none (server-to-server use only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// Hashes (`sha256:HEX`) of the server API keys the domain's back end may present;
    /// `parlor key --domain ID` makes one. Several while a key rotates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_keys: Vec<String>,
    /// Pusher-style app key and secret pairs, kept as given (a secret that signs must be
    /// readable); stored and listed by the admin API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pusher_keys: Vec<PusherKeyConfig>,
    /// Tokens from the domain's own identity provider (see `docs/auth.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// Limits of this domain, tighter than the server's.
    #[serde(default, skip_serializing_if = "DomainLimits::is_unset")]
    pub limits: DomainLimits,
    /// File limits of this domain, tighter than `[files]`'s (see `docs/files.md`).
    #[serde(default, skip_serializing_if = "DomainFiles::is_unset")]
    pub files: DomainFiles,
    /// The AI assistant answering visitors in this domain's support rooms; none when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<BotConfig>,
    /// Hand-off from the bot to human agents (see `docs/handoff.md`).
    #[serde(default)]
    pub handoff: HandoffConfig,
    /// Whether a client without a token may choose this domain by naming it (`domainId`
    /// in `join-room`, `ai-chat`, `ai-stream`, `/ai/*`, `/api/messages`); from a browser,
    /// only on a page of its `allowed_origins`. The demo is always chosen by default.
    #[serde(default, skip_serializing_if = "is_false")]
    pub public: bool,
    /// Who names a client that has no token: the server (`server`, a stable id per
    /// browser) or the client itself (`client`, its `userId` / `userName` / `role` from
    /// `join-room` or the request body, trusted as sent: WeeziQ's model).
    #[serde(default, skip_serializing_if = "AnonymousIdentity::is_server")]
    pub anonymous_identity: AnonymousIdentity,
    /// The wire dialect of its connections (see `docs/migrate/`).
    #[serde(default, skip_serializing_if = "Dialect::is_native")]
    pub dialect: Dialect,
    /// A shared secret the domain's back end may present as `Authorization: Bearer`
    /// wherever a server key is taken (`POST /api/publish`, the assign endpoints…):
    /// Eclipse's `INTERNAL_API_SECRET`. At least 16 bytes, no dots or spaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_secret: Option<Secret>,
    /// Guided-session templates (`docs/sessions.md`): JSON files, each path relative to
    /// the working directory; a `*` in the file name (`templates/*.json`) takes every match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<String>,
    /// The domain's own AI service for guided sessions: Parlor calls
    /// `POST {ai_service_url}/v1/chat/next-question` after every answer (Largence's
    /// contract). Without it, Parlor's built-in guide asks the template's questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai_service_url: Option<String>,
    /// Sent to the AI service as `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai_service_api_key: Option<Secret>,
    /// Where the domain's events are posted, signed, from a durable outbox
    /// (`docs/webhooks.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfig>,
}

/// One webhook of a domain: the events it wants, posted to `url` and signed with `secret`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// An `http://` or `https://` URL with a host; one webhook per URL in a domain.
    pub url: String,
    /// Signs every post (`X-Parlor-Signature`); at least 16 bytes.
    pub secret: Secret,
    /// The events it wants; at least one (a new kind of event is never sent unasked).
    pub events: Vec<WebhookEvent>,
}

/// The events a domain's webhooks can ask for (`docs/webhooks.md`, "Events").
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum WebhookEvent {
    /// A message was stored in a room (status messages of hand-offs included).
    #[serde(rename = "message.created")]
    MessageCreated,
    /// A room asked for a human (bot → waiting).
    #[serde(rename = "conversation.escalated")]
    ConversationEscalated,
    /// An agent took a room.
    #[serde(rename = "conversation.assigned")]
    ConversationAssigned,
    /// A room went from one agent to another.
    #[serde(rename = "conversation.transferred")]
    ConversationTransferred,
    /// Its agent left a room, which waits for another.
    #[serde(rename = "conversation.unassigned")]
    ConversationUnassigned,
    /// A room was resolved.
    #[serde(rename = "conversation.resolved")]
    ConversationResolved,
    /// A resolved room came back (escalated or assigned again).
    #[serde(rename = "conversation.reopened")]
    ConversationReopened,
    /// A guided session completed with its document.
    #[serde(rename = "session.completed")]
    SessionCompleted,
    /// A notification was stored for a user.
    #[serde(rename = "notification.created")]
    NotificationCreated,
    /// A visitor was seen for the first time.
    #[serde(rename = "visitor.added")]
    VisitorAdded,
    /// A visitor left the site (reported by `/visitors/remove`).
    #[serde(rename = "visitor.removed")]
    VisitorRemoved,
}

impl WebhookEvent {
    /// Every event, in the order of the documentation.
    pub const ALL: [WebhookEvent; 11] = [
        Self::MessageCreated,
        Self::ConversationEscalated,
        Self::ConversationAssigned,
        Self::ConversationTransferred,
        Self::ConversationUnassigned,
        Self::ConversationResolved,
        Self::ConversationReopened,
        Self::SessionCompleted,
        Self::NotificationCreated,
        Self::VisitorAdded,
        Self::VisitorRemoved,
    ];

    /// Its name on the wire (`type` of the body, `X-Parlor-Event`).
    pub fn name(self) -> &'static str {
        match self {
            Self::MessageCreated => "message.created",
            Self::ConversationEscalated => "conversation.escalated",
            Self::ConversationAssigned => "conversation.assigned",
            Self::ConversationTransferred => "conversation.transferred",
            Self::ConversationUnassigned => "conversation.unassigned",
            Self::ConversationResolved => "conversation.resolved",
            Self::ConversationReopened => "conversation.reopened",
            Self::SessionCompleted => "session.completed",
            Self::NotificationCreated => "notification.created",
            Self::VisitorAdded => "visitor.added",
            Self::VisitorRemoved => "visitor.removed",
        }
    }

    /// The event named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }

    /// Its bit in a set of events.
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Who names a token-less client of a domain.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousIdentity {
    /// The server: a `v_…` id, the same across reconnects of one browser.
    #[default]
    Server,
    /// The client: whatever `userId` it sends (it is trusted; use only where that is fine).
    Client,
}

impl AnonymousIdentity {
    fn is_server(&self) -> bool {
        *self == Self::Server
    }
}

/// How a domain's connections speak.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// Parlor's protocol (WeeziQ's frames and their extensions).
    #[default]
    Native,
    /// The Eclipse chat's: upgrade at `/` too, the room from the token's claim, messages
    /// as `type: "message"` and hand-off events in snake case (`agent_joined`).
    Eclipse,
}

impl Dialect {
    fn is_native(&self) -> bool {
        *self == Self::Native
    }
}

/// A domain's hand-off from the bot to human agents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HandoffConfig {
    /// Whether the bot offers a human when asked, and the room can wait for an agent.
    /// Agents can still assign and resolve rooms when off.
    pub enabled: bool,
    /// Words or phrases in a visitor's message (matched case-insensitively, as whole
    /// words) that make the bot offer a human instead of answering.
    pub phrases: Vec<String>,
    /// The bot's offer.
    pub offer_text: String,
    /// The label of the offer's button.
    pub action_label: String,
    /// Stored when a room starts waiting within business hours.
    pub connecting_text: String,
    /// Stored when a room starts waiting outside business hours.
    pub out_of_hours_text: String,
    /// IANA time zone of `business_hours` (`Europe/Berlin`).
    pub timezone: String,
    /// When agents are there: `"mon-fri 09:00-17:00"`, `"sat 10:00-13:00"`… Empty: always.
    pub business_hours: Vec<String>,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            phrases: [
                "human",
                "agent",
                "person",
                "representative",
                "real person",
                "someone real",
                "support team",
                "operator",
            ]
            .map(str::to_owned)
            .to_vec(),
            offer_text: "I can connect you with someone from our support team.".to_owned(),
            action_label: "Connect with Customer Support".to_owned(),
            connecting_text: "⏱️ Connecting you to a support agent…".to_owned(),
            out_of_hours_text: "Our team is away right now. Leave a message and an agent will \
                                reply when we're back."
                .to_owned(),
            timezone: "UTC".to_owned(),
            business_hours: Vec::new(),
        }
    }
}

/// When a domain's agents are there, parsed from [`HandoffConfig::business_hours`].
#[derive(Debug, Clone)]
pub struct BusinessHours {
    tz: chrono_tz::Tz,
    /// (weekdays Monday = 0, minute of day it opens, minute it closes); none: always open.
    rules: Vec<([bool; 7], u32, u32)>,
}

impl HandoffConfig {
    /// The business hours, or why they cannot be read.
    pub fn hours(&self) -> Result<BusinessHours, String> {
        let tz: chrono_tz::Tz = self.timezone.parse().map_err(|_| {
            format!(
                "unknown time zone {:?} (use an IANA name such as Europe/Berlin)",
                self.timezone
            )
        })?;
        let rules = self
            .business_hours
            .iter()
            .map(|r| {
                parse_hours_rule(r).ok_or_else(|| {
                    format!("cannot read business hours {r:?}; write e.g. \"mon-fri 09:00-17:00\"")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(BusinessHours { tz, rules })
    }
}

impl BusinessHours {
    /// Whether agents are there at `at`.
    pub fn is_open(&self, at: chrono::DateTime<chrono::Utc>) -> bool {
        use chrono::{Datelike, Timelike};
        if self.rules.is_empty() {
            return true;
        }
        let local = at.with_timezone(&self.tz);
        let day = local.weekday().num_days_from_monday() as usize;
        let minute = local.hour() * 60 + local.minute();
        self.rules
            .iter()
            .any(|(days, open, close)| days[day] && (*open..*close).contains(&minute))
    }
}

/// `"mon-fri 09:00-17:00"`, `"sat 10:00-13:00"`, `"mon,wed 08:30-12:00"`.
fn parse_hours_rule(rule: &str) -> Option<([bool; 7], u32, u32)> {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |d: &str| DAYS.iter().position(|x| d.eq_ignore_ascii_case(x));
    let minute = |t: &str| -> Option<u32> {
        let (h, m) = t.split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
    };
    let (days_part, times) = rule.trim().split_once(char::is_whitespace)?;
    let mut days = [false; 7];
    for part in days_part.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    let (open, close) = times.trim().split_once('-')?;
    let (open, close) = (minute(open.trim())?, minute(close.trim())?);
    (open < close).then_some((days, open, close))
}

/// A Pusher-style app key and its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PusherKeyConfig {
    /// The app id of the HTTP API's `/apps/{id}` (default: the domain id). Keys of one id
    /// share its channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// The public app key (what `pusher-js` is given).
    pub key: String,
    /// The secret that signs channel authorisations and HTTP API calls.
    pub secret: Secret,
    /// Where the app's channel changes are posted, signed with this key
    /// (`docs/pusher.md`, "Webhooks").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<PusherWebhookConfig>,
}

/// One webhook of a Pusher app: Pusher's `channel_occupied`, `channel_vacated`,
/// `member_added` and `member_removed`, posted to `url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PusherWebhookConfig {
    /// An `http://` or `https://` URL.
    pub url: String,
    /// The events it wants (default: all four).
    #[serde(default = "PusherWebhookEvent::all")]
    pub events: Vec<PusherWebhookEvent>,
}

/// The events of Pusher's webhooks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PusherWebhookEvent {
    /// A channel's first subscriber, on any node.
    ChannelOccupied,
    /// A channel's last subscriber gone, from every node.
    ChannelVacated,
    /// A presence channel's member's first connection.
    MemberAdded,
    /// A presence channel's member's last connection gone.
    MemberRemoved,
}

impl PusherWebhookEvent {
    /// Every event.
    pub fn all() -> Vec<Self> {
        vec![
            Self::ChannelOccupied,
            Self::ChannelVacated,
            Self::MemberAdded,
            Self::MemberRemoved,
        ]
    }

    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChannelOccupied => "channel_occupied",
            Self::ChannelVacated => "channel_vacated",
            Self::MemberAdded => "member_added",
            Self::MemberRemoved => "member_removed",
        }
    }
}

/// Per-domain limits; unset values fall back to `[limits]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DomainLimits {
    /// Simultaneous WebSocket connections of this domain on this node; further upgrades get
    /// 503 `too_many_connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Client frames per second per connection (sustained).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<u32>,
    /// Burst of client frames above the sustained rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_burst: Option<u32>,
}

impl DomainLimits {
    /// True when nothing is set.
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// Which rooms of a domain a visitor may join, read and write.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum VisitorRooms {
    /// Only rooms the visitor created.
    #[default]
    Owned,
    /// Any room whose id the visitor knows.
    Open,
}

impl DomainConfig {
    /// A domain with the defaults: visitors use their own rooms, Parlor tokens only.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            visitor_rooms: VisitorRooms::Owned,
            allowed_origins: Vec::new(),
            server_keys: Vec::new(),
            pusher_keys: Vec::new(),
            jwt: None,
            limits: DomainLimits::default(),
            files: DomainFiles::default(),
            bot: None,
            handoff: HandoffConfig::default(),
            public: false,
            anonymous_identity: AnonymousIdentity::Server,
            dialect: Dialect::Native,
            internal_secret: None,
            templates: Vec::new(),
            ai_service_url: None,
            ai_service_api_key: None,
            webhooks: Vec::new(),
        }
    }

    /// The built-in domain anonymous visitors land in.
    pub fn demo() -> Self {
        Self {
            visitor_rooms: VisitorRooms::Open,
            allowed_origins: vec!["*".to_owned()],
            bot: Some(BotConfig {
                system_prompt: "You are the assistant of the Parlor demo. Answer questions \
                                about Parlor briefly, from the passages you are given."
                    .to_owned(),
                knowledge_dir: Some(BUILTIN_DEMO_KNOWLEDGE.to_owned()),
                ..BotConfig::default()
            }),
            ..Self::new(DEMO_DOMAIN, "Parlor demo")
        }
    }
}

/// How a domain's own JWTs are verified and read. A token belongs to the domain whose
/// `issuer` list holds its `iss` claim; its signature must then verify with this domain's
/// keys: one of `secret` (HS256/384/512), `public_keys` (PEM) or `jwks_url`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256/384/512 tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// Public keys, each PEM text or the path of a PEM file (RSA, EC P-256/P-384, Ed25519).
    pub public_keys: Vec<String>,
    /// A JWKS document (e.g. `https://PROJECT.supabase.co/auth/v1/.well-known/jwks.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Accepted `alg` values. Empty: HS256 with a secret, else RS256 and ES256.
    pub algorithms: Vec<String>,
    /// Accepted `iss` values; at least one. They also say which domain a token is for.
    pub issuer: Vec<String>,
    /// Accepted `aud` values. Empty: `aud` is not checked.
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// How long a fetched JWKS is used before it is fetched again, in seconds. A token with
    /// an unknown `kid` fetches it sooner, at most once per `jwks_min_refresh_secs`.
    pub jwks_cache_secs: u64,
    /// Shortest time between two JWKS fetches, in seconds.
    pub jwks_min_refresh_secs: u64,
    /// Timeout of one JWKS fetch, in milliseconds. On failure the cached keys stay in use.
    pub jwks_timeout_ms: u64,
    /// Where the identity is in the claims.
    pub claims: ClaimPaths,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            secret: None,
            public_keys: Vec::new(),
            jwks_url: None,
            algorithms: Vec::new(),
            issuer: Vec::new(),
            audience: Vec::new(),
            leeway_secs: 30,
            jwks_cache_secs: 300,
            jwks_min_refresh_secs: 10,
            jwks_timeout_ms: 3000,
            claims: ClaimPaths::default(),
        }
    }
}

/// Dotted paths to the identity in a token's claims (`app_metadata.role` reads
/// `{"app_metadata": {"role": …}}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimPaths {
    /// User id; required in every token.
    pub user_id: String,
    /// Display name; the user id when absent.
    pub name: String,
    /// Role: `visitor`, `agent`, `admin` or `service`.
    pub role: String,
    /// Role of a token without the role claim.
    pub default_role: String,
    /// The room the token is for (Eclipse's `chatId`): a connection with it is joined to
    /// that room at connect, and a visitor may use that room whoever created it. Unset:
    /// `chatId` in a domain with `dialect = "eclipse"`, none elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

impl ClaimPaths {
    /// The room claim in a domain of `dialect`.
    pub fn room_claim(&self, dialect: Dialect) -> Option<&str> {
        match (&self.room, dialect) {
            (Some(path), _) => Some(path.as_str()).filter(|p| !p.is_empty()),
            (None, Dialect::Eclipse) => Some("chatId"),
            (None, Dialect::Native) => None,
        }
    }
}

impl Default for ClaimPaths {
    fn default() -> Self {
        Self {
            user_id: "sub".to_owned(),
            name: "name".to_owned(),
            role: "role".to_owned(),
            default_role: "visitor".to_owned(),
            room: None,
        }
    }
}

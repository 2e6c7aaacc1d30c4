//! Typed configuration.
//!
//! One [`Config`] value is built at start-up from, in increasing priority: built-in defaults,
//! a TOML file (`parlor.toml` when present, or `--config FILE`), `PARLOR_*` environment
//! variables (`PARLOR_SECTION__KEY`, e.g. `PARLOR_LIMITS__MESSAGES_PER_SECOND=50`) and
//! command-line flags. It is validated once ([`Config::validate`]) and then passed down
//! through state; nothing reads configuration from a global.
//!
//! Every key is documented in `parlor.example.toml`; a test keeps that file and these
//! defaults in step. Secrets are wrapped in [`Secret`] so `Debug` never prints them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP and WebSocket listener binds to: `HOST:PORT`, the host an IP
    /// address or a name resolved at start-up. The default, `127.0.0.1:8080`, is reachable
    /// from this machine only; servers and containers listen on `0.0.0.0:8080`.
    pub listen: ListenAddr,
    /// Storage location: `sqlite://PATH` (created if missing), or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` (also `postgresql://`) for several
    /// nodes sharing one PostgreSQL database (its schema is created or migrated at start-up).
    pub database: String,
    /// Message distribution between nodes: `memory` (one node) or `redis://HOST:PORT` (several
    /// nodes sharing a PostgreSQL database; see `docs/deploy.md`).
    pub broker: String,
    /// Prefix of the Redis keys and channels, so several clusters can share one Redis.
    pub broker_prefix: String,
    /// With Redis: how long a node's presence entries live without renewal (renewed every
    /// third of it); the users of a node that died disappear from rooms after this long.
    pub broker_presence_ttl_secs: u64,
    /// With Redis: how often each node compares its active rooms' last `seq` with the store,
    /// so that a room's last message lost between nodes (which no later message reveals)
    /// reaches every member within two of these intervals and a store read.
    #[serde(with = "duration_ms")]
    pub broker_position_check_ms: Duration,
    /// Log output format: `text` for people, `json` for log collectors.
    pub log_format: LogFormat,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax; `RUST_LOG` overrides it.
    pub log_level: String,
    /// How long a graceful shutdown may take before the process exits anyway.
    #[serde(with = "duration_ms")]
    pub shutdown_timeout_ms: Duration,
    /// Per-connection and per-message limits.
    pub limits: Limits,
    /// Storage tuning.
    pub store: StoreConfig,
    /// Authentication settings.
    pub auth: AuthConfig,
    /// AI providers (see `docs/ai.md`).
    pub ai: AiConfig,
    /// Reverse proxies (addresses or CIDR ranges, e.g. `10.0.0.0/8`) whose
    /// `X-Forwarded-For` header is believed: a request from one of them is limited by the
    /// client address it forwarded. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
    /// The web pages: widget, agent inbox, demo (see `docs/handoff.md`).
    pub web: WebConfig,
    /// Guided sessions (`/chat`, see `docs/sessions.md`).
    pub sessions: SessionsConfig,
    /// Tenants. A `demo` domain is always present (see [`Config::validate`]).
    pub domains: Vec<DomainConfig>,
}

/// Guided sessions: how long they are kept, and how the domain's AI service is called.
/// Durations are written with a unit: `500ms`, `30s`, `15m`, `24h`, `7d`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Incomplete sessions untouched for this long are deleted.
    #[serde(with = "duration_text")]
    pub stale_after: Duration,
    /// Complete sessions and their documents are deleted this long after completion;
    /// `0s` keeps them.
    #[serde(with = "duration_text")]
    pub keep_completed: Duration,
    /// How often one node looks for sessions to delete.
    #[serde(with = "duration_text")]
    pub cleanup_every: Duration,
    /// Longest a call to a domain's AI service may take, connecting included.
    #[serde(with = "duration_text")]
    pub ai_service_timeout: Duration,
    /// Automatic retries of a failed AI-service call (1 s, 2 s, 4 s… apart); after them the
    /// user's next message retries.
    pub ai_service_retries: u32,
    /// Clarifying questions the built-in guide may ask per question when the domain's AI
    /// vendor finds an answer vague (0: never).
    pub follow_ups: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(24 * 3600),
            keep_completed: Duration::ZERO,
            cleanup_every: Duration::from_secs(600),
            ai_service_timeout: Duration::from_secs(30),
            ai_service_retries: 5,
            follow_ups: 1,
        }
    }
}

/// The pages compiled into the binary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Whether `POST /api/dev/agent-token` hands out agent tokens of the `demo` domain to
    /// anyone, so the demo's inbox can be tried at once. Turn it off in production.
    pub dev_login: bool,
    /// Serve the pages from this folder instead of the copies compiled in (for working on
    /// them without rebuilding). Unset: the compiled-in pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            dev_login: true,
            dir: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenAddr::new("127.0.0.1", 8080),
            database: "sqlite://parlor.db".to_owned(),
            broker: "memory".to_owned(),
            broker_prefix: "parlor".to_owned(),
            broker_presence_ttl_secs: 30,
            broker_position_check_ms: Duration::from_secs(1),
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            shutdown_timeout_ms: Duration::from_secs(10),
            limits: Limits::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            ai: AiConfig::default(),
            trusted_proxies: Vec::new(),
            web: WebConfig::default(),
            sessions: SessionsConfig::default(),
            domains: vec![DomainConfig::demo()],
        }
    }
}

/// A `HOST:PORT` to listen on. The host is an IP address (`127.0.0.1`, `[::1]`) or a name
/// (`localhost`); a name is looked up when the server starts, so a typo is reported then,
/// in a sentence, instead of failing the parse of the whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ListenAddr {
    /// IP address or host name, without the brackets of an IPv6 address.
    host: String,
    port: u16,
}

impl ListenAddr {
    /// `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    /// The IP address or host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port; 0 lets the system choose one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket addresses the host stands for: an IP address as it is, a name as the
    /// system's resolver answers (`localhost` is usually `127.0.0.1` and `::1`).
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        std::net::ToSocketAddrs::to_socket_addrs(&(self.host.as_str(), self.port))
            .map(Iterator::collect)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not HOST:PORT (write e.g. 127.0.0.1:8080, localhost:8080 or [::1]:8080)"
            )
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let host = match host.strip_prefix('[') {
            Some(inner) => {
                let inner = inner.strip_suffix(']').ok_or_else(bad)?;
                inner.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
                inner
            }
            // An IPv6 address needs its brackets: in `::1:8080` the port is ambiguous.
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        let valid_name = |h: &str| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if host.is_empty() || !(host.contains(':') || valid_name(host)) {
            return Err(bad());
        }
        Ok(Self::new(host, port))
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ListenAddr> for String {
    fn from(addr: ListenAddr) -> String {
        addr.to_string()
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits on what one client may do. Every violation is answered with an `error` frame (or an
/// HTTP 4xx) and changes nothing else.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Maximum simultaneous WebSocket connections on this node; further upgrades get 503.
    pub max_connections: usize,
    /// Largest WebSocket frame (and message) accepted, in bytes. A larger frame is answered
    /// with `frame_too_large` and the connection is closed with code 1009.
    pub max_frame_bytes: usize,
    /// Largest chat message text, in bytes of UTF-8. Larger ones get `message_too_long`.
    pub max_message_bytes: usize,
    /// Sustained client frames per second per connection (token bucket refill rate).
    pub messages_per_second: u32,
    /// Burst of client frames allowed above the sustained rate.
    pub messages_burst: u32,
    /// Rooms one connection may be joined to at once.
    pub rooms_per_connection: usize,
    /// Outbound frames queued per connection before it is treated as a slow consumer and
    /// closed with code 4008.
    pub outbound_queue: usize,
    /// The same bound in bytes (about the frames' encoded length): a client this far behind
    /// is closed with 4008 too.
    pub outbound_queue_bytes: usize,
    /// Messages sent in `message-history` when a client joins without `since`.
    pub history_on_join: usize,
    /// Most messages replayed in one `message-history` frame when recovering with `since`;
    /// a longer gap is sent as several consecutive frames.
    pub replay_chunk: usize,
    /// Most messages a rejoin with `since` replays. A client further behind gets the newest
    /// `max_replay` with `truncated: true` and pages back with `history`.
    pub max_replay: usize,
    /// Rooms with more users than this do not announce joins and leaves (`presence`), and
    /// `room-joined` lists only this many members (with `memberCount`): presence costs O(N)
    /// per join, so it is kept to rooms small enough to afford it.
    pub presence_max_members: usize,
    /// Largest page a `history` request or HTTP listing returns.
    pub max_page: usize,
    /// Largest HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// WebSocket connections per second from one IP address (sustained), and the burst
    /// allowed above it. Beyond: HTTP 429 `rate_limited` with `Retry-After`.
    pub ip_connects_per_second: u32,
    pub ip_connects_burst: u32,
    /// HTTP API requests per second from one IP address, and the burst above it
    /// (`/health` and `/metrics` are not counted).
    pub ip_requests_per_second: u32,
    pub ip_requests_burst: u32,
    /// Visitor tokens (`POST /api/visitor-token`) one IP address may get per minute.
    pub ip_visitor_tokens_per_minute: u32,
    /// WebSocket connections plus HTTP API requests per second by one authenticated
    /// identity (a token's user, or a server key), from any address, and the burst above
    /// it. Anonymous callers are limited by address only.
    pub identity_requests_per_second: u32,
    pub identity_requests_burst: u32,
    /// Open TCP connections (HTTP and WebSocket) from one address (an IPv6 address counts
    /// by its /64). The next one is answered 429 `too_many_connections` and closed at once.
    /// Connections from a trusted proxy are not counted here (the proxy carries many
    /// clients); `ip_max_websockets` still counts the clients behind it. 0: no cap.
    pub ip_max_connections: u32,
    /// Open WebSockets from one address (IPv6: its /64; behind a trusted proxy, the
    /// forwarded client address). The next upgrade gets 429 `too_many_connections`. 0: no
    /// cap.
    pub ip_max_websockets: u32,
    /// Time a client has to send a request's headers, counted from the connection's start
    /// or from the end of the previous response: the header-read timeout and the keep-alive
    /// idle timeout in one. A connection that runs out of it is closed.
    #[serde(with = "duration_ms")]
    pub header_timeout_ms: Duration,
    /// Time a request's whole body has to arrive, counted from its headers. Beyond: 408
    /// `request_timeout` and the connection is closed.
    #[serde(with = "duration_ms")]
    pub body_timeout_ms: Duration,
    /// A WebSocket from which nothing arrived for this long is sent a ping. 0: no pings.
    #[serde(with = "duration_ms")]
    pub ws_ping_interval_ms: Duration,
    /// Time a client has to answer a ping (any frame counts) before it is closed with 4011.
    #[serde(with = "duration_ms")]
    pub ws_pong_timeout_ms: Duration,
    /// A WebSocket whose client sends no message (pongs do not count) for this long is
    /// closed with 4012. 0 (the default): never, as listeners may stay quiet for hours.
    #[serde(with = "duration_ms")]
    pub ws_idle_timeout_ms: Duration,
    /// Questions to the assistant per minute from one address (IPv6: its /64), for
    /// visitors (`/ai/*`, `ai-chat`, `ai-stream` and the bot's replies in rooms); across
    /// the cluster with Redis. Beyond: 429 `rate_limited` with `Retry-After`.
    pub ip_ai_requests_per_minute: u32,
    /// AI tokens (prompt plus completion) the questions of one address may use per minute;
    /// once spent, its next question waits for the minute to end (429). Counted per node.
    pub ip_ai_tokens_per_minute: u64,
    /// Model calls one domain may have running at once; the next gets 429 `rate_limited`.
    pub ai_calls_per_domain: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 19_500,
            max_frame_bytes: 1024 * 1024,
            max_message_bytes: 16 * 1024,
            messages_per_second: 20,
            messages_burst: 40,
            rooms_per_connection: 64,
            outbound_queue: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            history_on_join: 50,
            replay_chunk: 500,
            max_replay: 10_000,
            presence_max_members: 100,
            max_page: 200,
            max_body_bytes: 256 * 1024,
            ip_connects_per_second: 50,
            ip_connects_burst: 500,
            ip_requests_per_second: 100,
            ip_requests_burst: 500,
            ip_visitor_tokens_per_minute: 10,
            identity_requests_per_second: 50,
            identity_requests_burst: 200,
            ip_max_connections: 1000,
            ip_max_websockets: 500,
            header_timeout_ms: Duration::from_secs(10),
            body_timeout_ms: Duration::from_secs(30),
            ws_ping_interval_ms: Duration::from_secs(25),
            ws_pong_timeout_ms: Duration::from_secs(10),
            ws_idle_timeout_ms: Duration::ZERO,
            ip_ai_requests_per_minute: 30,
            ip_ai_tokens_per_minute: 60_000,
            ai_calls_per_domain: 64,
        }
    }
}

/// Storage tuning.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite `synchronous` level: `normal` survives a crash or `kill -9` of Parlor (WAL);
    /// `full` also survives power loss, at the price of an fsync per group commit.
    pub sqlite_synchronous: SqliteSync,
    /// Most write operations committed in one transaction (group commit).
    pub max_batch: usize,
    /// Most write operations waiting for the writer. When the queue is full, senders wait
    /// for room (with PostgreSQL at most its 10 s deadline, then `store_unavailable`), so
    /// a store that falls behind slows senders down instead of filling memory.
    pub write_queue: usize,
    /// Recent messages kept in memory per active room, serving recovery without the store.
    pub room_cache: usize,
    /// Read connections kept open to the database.
    pub read_pool: usize,
    /// Most connections each node opens to PostgreSQL (the writer uses one at a time, reads
    /// the others). Ignored with SQLite.
    pub postgres_pool: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            sqlite_synchronous: SqliteSync::Normal,
            max_batch: 1024,
            write_queue: 4096,
            room_cache: 128,
            read_pool: 4,
            postgres_pool: 16,
        }
    }
}

/// SQLite durability level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    /// Durable across process crashes (WAL is written before commit returns).
    Normal,
    /// Durable across power loss (fsync on every commit).
    Full,
}

/// Server-wide authentication settings: the secret of Parlor's own tokens, visitor tokens'
/// lifetime and the admin keys. Each domain's own tokens are configured on the domain
/// ([`JwtConfig`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret for connection tokens. Unset: tokens are refused and every connection is
    /// an anonymous visitor of the `demo` domain.
    pub jwt_secret: Option<Secret>,
    /// Lifetime of a visitor token from `POST /api/visitor-token`, in seconds: how long a
    /// browser keeps the same anonymous identity.
    pub visitor_token_ttl_secs: u64,
    /// Hashes (`sha256:HEX`) of the admin keys that may use `/api/admin`;
    /// `parlor key --admin` makes one. Empty: the admin API is closed.
    pub admin_keys: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            visitor_token_ttl_secs: 30 * 24 * 3600,
            admin_keys: Vec::new(),
        }
    }
}

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

/// AI providers, by name. Domains' bots list the names they use, in fallback order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AiConfig {
    /// `[ai.providers.NAME]` tables. `OPENAI_API_KEY`, `ANTHROPIC_API_KEY` and
    /// `GOOGLE_AI_API_KEY`/`GEMINI_API_KEY` add `openai`, `anthropic` and `gemini` when no
    /// provider has that name.
    pub providers: std::collections::BTreeMap<String, ProviderConfig>,
}

/// Which API a provider speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions (also Ollama, vLLM, llama.cpp, OpenRouter, Groq).
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini.
    Gemini,
}

impl ProviderKind {
    /// The vendor's public API base URL.
    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::Openai => "https://api.openai.com/v1",
            ProviderKind::Anthropic => "https://api.anthropic.com",
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com",
        }
    }
}

/// One AI provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The API it speaks.
    pub kind: ProviderKind,
    /// API base URL; the vendor's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// API key (prefer the environment: `PARLOR_AI__PROVIDERS__NAME__API_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    /// Model name.
    pub model: String,
    /// Longest reply, in tokens.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Time to connect and get the response headers, in milliseconds.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Time from the call to the first token, in milliseconds.
    #[serde(default = "default_first_token_ms")]
    pub first_token_timeout_ms: u64,
    /// Time for the whole reply, in milliseconds.
    #[serde(default = "default_total_ms")]
    pub total_timeout_ms: u64,
    /// Retries after a 429, a 5xx or a failed connection, with back-off (honouring
    /// `Retry-After` up to 10 s) before the next provider is tried.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_max_tokens() -> u32 {
    512
}
fn default_connect_ms() -> u64 {
    5_000
}
fn default_first_token_ms() -> u64 {
    15_000
}
fn default_total_ms() -> u64 {
    120_000
}
fn default_retries() -> u32 {
    1
}

impl ProviderConfig {
    /// A provider of `kind` with `model` and the default timeouts.
    pub fn new(kind: ProviderKind, model: impl Into<String>) -> Self {
        Self {
            kind,
            base_url: None,
            api_key: None,
            model: model.into(),
            max_tokens: default_max_tokens(),
            connect_timeout_ms: default_connect_ms(),
            first_token_timeout_ms: default_first_token_ms(),
            total_timeout_ms: default_total_ms(),
            retries: default_retries(),
        }
    }
}

/// A domain's AI assistant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BotConfig {
    /// Whether it answers visitors' messages in support rooms.
    pub enabled: bool,
    /// Providers (names from `[ai.providers]`) in fallback order. After them come the
    /// knowledge-base answer and then the offer of a human. Empty: the knowledge base
    /// answers (and, on the demo, the providers the vendors' environment variables add).
    pub providers: Vec<String>,
    /// Instructions given to the model.
    pub system_prompt: String,
    /// Folder of Markdown/text documents to answer from; `"builtin:demo"` is the demo's
    /// shipped documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knowledge_dir: Option<String>,
    /// How often the knowledge folder is checked for changed files, in seconds.
    pub knowledge_check_secs: u64,
    /// Knowledge-base passages put into the prompt.
    pub context_passages: usize,
    /// Recent room messages given to the model as the conversation.
    pub history_messages: usize,
    /// Questions one visitor may put to the assistant per minute (room messages and the
    /// AI endpoints together); beyond, `rate_limited`.
    pub visitor_messages_per_minute: u32,
    /// Provider tokens (prompt plus completion) the domain may use per UTC day; beyond,
    /// `budget_exceeded` until midnight. Unset: no budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_token_budget: Option<u64>,
    /// The user id the assistant's messages carry (`userId` on the wire).
    pub author_id: String,
    /// The name the assistant's messages carry (`userName` on the wire).
    pub author_name: String,
}

/// The assistant's user id unless a domain's bot says otherwise (WeeziQ's).
pub const ASSISTANT_ID: &str = "ai-assistant";
/// The assistant's name unless a domain's bot says otherwise (WeeziQ's).
pub const ASSISTANT_NAME: &str = "AI Assistant";

impl Default for BotConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            providers: Vec::new(),
            system_prompt: "You are a helpful support assistant. Answer briefly and only from \
                            what you know about this product; when unsure, offer a human agent."
                .to_owned(),
            knowledge_dir: None,
            knowledge_check_secs: 10,
            context_passages: 3,
            history_messages: 20,
            visitor_messages_per_minute: 10,
            daily_token_budget: None,
            author_id: ASSISTANT_ID.to_owned(),
            author_name: ASSISTANT_NAME.to_owned(),
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

/// The shipped documents, as a `knowledge_dir` value.
pub const BUILTIN_DEMO_KNOWLEDGE: &str = "builtin:demo";

/// A Pusher-style app key and its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PusherKeyConfig {
    /// The public app key (what `pusher-js` is given).
    pub key: String,
    /// The secret that signs channel authorisations and HTTP API calls.
    pub secret: Secret,
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
            bot: None,
            handoff: HandoffConfig::default(),
            public: false,
            anonymous_identity: AnonymousIdentity::Server,
            dialect: Dialect::Native,
            internal_secret: None,
            templates: Vec::new(),
            ai_service_url: None,
            ai_service_api_key: None,
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

/// Identifier of the built-in demo domain.
pub const DEMO_DOMAIN: &str = "demo";

/// A configuration value that must never be printed.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a configuration was refused. Each is one sentence naming the key as the user wrote
/// it: in the file (with its line) or as an environment variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file is missing, unreadable or not TOML.
    #[error("cannot read the configuration file {}: {reason}", path.display())]
    File {
        /// The file, as it was named.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key of the file or the environment is unknown, or its value has the wrong type.
    #[error("{place} {problem}")]
    Key {
        /// Where the key was written: "`limits.x` in parlor.toml, line 3", or "the
        /// environment variable PARLOR_LIMITS__X".
        place: String,
        /// What is wrong, with a suggestion when one is close ("is not a configuration
        /// key; did you mean …?").
        problem: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Command-line values that override the file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<ListenAddr>,
    /// `--database`
    pub database: Option<String>,
    /// `--broker`
    pub broker: Option<String>,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Loads defaults, then `file` (or `./parlor.toml` when `file` is `None` and it exists),
    /// then `PARLOR_*` variables, then `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let file = match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::File {
                        path: path.to_owned(),
                        reason: "there is no such file".to_owned(),
                    });
                }
                Some(path.to_owned())
            }
            None => Some(PathBuf::from("parlor.toml")).filter(|p| p.exists()),
        };
        if let Some(path) = &file {
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only variables naming a configuration key are read: `PARLOR_TEST_*` configures the
        // test suite, `PARLOR_CONFIG` names the file, and a deployment may have other
        // `PARLOR_*` variables of its own (see [`ignored_env_vars`]). A typo inside a known
        // section (`PARLOR_LIMITS__TYPO`) is still refused.
        let env = Env::prefixed("PARLOR_")
            .filter(|key| is_config_key(key.as_str()))
            .split("__");
        figment = figment.merge(env);
        let mut config: Config = figment
            .extract()
            .map_err(|e| explain::figment_error(e, file.as_deref()))?;
        if let Some(listen) = &overrides.listen {
            config.listen.clone_from(listen);
        }
        if let Some(database) = &overrides.database {
            config.database.clone_from(database);
        }
        if let Some(broker) = &overrides.broker {
            config.broker.clone_from(broker);
        }
        if let Some(format) = overrides.log_format {
            config.log_format = format;
        }
        config.add_vendor_providers(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work, and adds the `demo` domain when missing.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let positive = [
            ("limits.max_connections", l.max_connections),
            ("limits.max_frame_bytes", l.max_frame_bytes),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.messages_per_second", l.messages_per_second as usize),
            ("limits.messages_burst", l.messages_burst as usize),
            ("limits.rooms_per_connection", l.rooms_per_connection),
            ("limits.outbound_queue", l.outbound_queue),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
            ("limits.replay_chunk", l.replay_chunk),
            ("limits.max_replay", l.max_replay),
            ("limits.presence_max_members", l.presence_max_members),
            ("limits.max_page", l.max_page),
            ("limits.max_body_bytes", l.max_body_bytes),
            (
                "limits.ip_connects_per_second",
                l.ip_connects_per_second as usize,
            ),
            ("limits.ip_connects_burst", l.ip_connects_burst as usize),
            (
                "limits.ip_requests_per_second",
                l.ip_requests_per_second as usize,
            ),
            ("limits.ip_requests_burst", l.ip_requests_burst as usize),
            (
                "limits.ip_visitor_tokens_per_minute",
                l.ip_visitor_tokens_per_minute as usize,
            ),
            (
                "limits.header_timeout_ms",
                usize::from(!l.header_timeout_ms.is_zero()),
            ),
            (
                "limits.body_timeout_ms",
                usize::from(!l.body_timeout_ms.is_zero()),
            ),
            (
                "limits.ws_pong_timeout_ms",
                usize::from(!l.ws_pong_timeout_ms.is_zero()),
            ),
            (
                "limits.ip_ai_requests_per_minute",
                l.ip_ai_requests_per_minute as usize,
            ),
            (
                "limits.ip_ai_tokens_per_minute",
                usize::try_from(l.ip_ai_tokens_per_minute).unwrap_or(usize::MAX),
            ),
            ("limits.ai_calls_per_domain", l.ai_calls_per_domain),
            ("store.max_batch", self.store.max_batch),
            ("store.write_queue", self.store.write_queue),
            ("store.room_cache", self.store.room_cache),
            ("store.read_pool", self.store.read_pool),
            ("store.postgres_pool", self.store.postgres_pool),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be greater than 0"
                )));
            }
        }
        if l.max_message_bytes > l.max_frame_bytes {
            return Err(ConfigError::Invalid(
                "limits.max_message_bytes cannot exceed limits.max_frame_bytes".to_owned(),
            ));
        }
        let s = &self.sessions;
        for (name, value) in [
            ("sessions.stale_after", s.stale_after),
            ("sessions.cleanup_every", s.cleanup_every),
            ("sessions.ai_service_timeout", s.ai_service_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be longer than 0s"
                )));
            }
        }
        if self.database_path().is_none() && self.postgres_url().is_none() {
            return Err(ConfigError::Invalid(format!(
                "database must be sqlite://PATH or postgres://USER@HOST/DATABASE (got {:?})",
                self.database
            )));
        }
        if self.broker_url().is_none() && self.broker != "memory" {
            return Err(ConfigError::Invalid(format!(
                "broker must be \"memory\" or redis://HOST:PORT (got {:?})",
                self.broker
            )));
        }
        if let Some(url) = self.broker_url() {
            check_url_parameters("broker", url, BROKER_PARAMETERS)?;
            if url.starts_with("redis://") && url_parameter(url, "sslrootcert").is_some() {
                return Err(ConfigError::Invalid(
                    "broker: sslrootcert is for TLS; use a rediss:// URL".to_owned(),
                ));
            }
        }
        if let Some(url) = self.postgres_url() {
            check_url_parameters("database", url, POSTGRES_PARAMETERS)?;
        }
        if self.broker_position_check_ms < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "broker_position_check_ms must be at least 100".to_owned(),
            ));
        }
        if self.broker_presence_ttl_secs == 0 {
            return Err(ConfigError::Invalid(
                "broker_presence_ttl_secs must be greater than 0".to_owned(),
            ));
        }
        if !crate::model::valid_id(&self.broker_prefix) {
            return Err(ConfigError::Invalid(
                "broker_prefix must be 1-128 characters of A-Z a-z 0-9 - _ . : @".to_owned(),
            ));
        }
        if let Some(secret) = &self.auth.jwt_secret
            && secret.expose().len() < 16
        {
            return Err(ConfigError::Invalid(
                "auth.jwt_secret must be at least 16 bytes".to_owned(),
            ));
        }
        for d in &self.domains {
            if !crate::model::valid_id(&d.id) {
                return Err(ConfigError::Invalid(format!(
                    "invalid domain id {:?}",
                    d.id
                )));
            }
            d.handoff
                .hours()
                .map_err(|e| ConfigError::Invalid(format!("domains.{}.handoff: {e}", d.id)))?;
        }
        self.trusted_proxy_ranges()?;
        for (name, p) in &self.ai.providers {
            if p.model.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "ai.providers.{name}.model is empty"
                )));
            }
            if p.connect_timeout_ms == 0 || p.first_token_timeout_ms == 0 || p.total_timeout_ms == 0
            {
                return Err(ConfigError::Invalid(format!(
                    "ai.providers.{name}: timeouts must be greater than 0"
                )));
            }
        }
        for d in &self.domains {
            for name in d.bot.iter().flat_map(|b| &b.providers) {
                if !self.ai.providers.contains_key(name) {
                    return Err(ConfigError::Invalid(format!(
                        "domains.{}.bot.providers names {name:?}, which is not in [ai.providers]",
                        d.id
                    )));
                }
            }
        }
        if !self.domains.iter().any(|d| d.id == DEMO_DOMAIN) {
            self.domains.push(DomainConfig::demo());
        }
        Ok(())
    }

    /// Adds the providers the vendors' own environment variables describe (`OPENAI_API_KEY`
    /// with `OPENAI_BASE_URL` and `OPENAI_MODEL`; `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`,
    /// `ANTHROPIC_MODEL`; `GOOGLE_AI_API_KEY` or `GEMINI_API_KEY`, `GEMINI_BASE_URL`,
    /// `GEMINI_MODEL`), unless a provider of that name is configured. A demo bot without
    /// its own provider list then uses them, OpenAI first.
    pub fn add_vendor_providers(&mut self, env: impl Fn(&str) -> Option<String>) {
        let vendors = [
            (
                "openai",
                ProviderKind::Openai,
                &["OPENAI_API_KEY"][..],
                "OPENAI",
                "gpt-4o-mini",
            ),
            (
                "anthropic",
                ProviderKind::Anthropic,
                &["ANTHROPIC_API_KEY"][..],
                "ANTHROPIC",
                "claude-haiku-4-5",
            ),
            (
                "gemini",
                ProviderKind::Gemini,
                &["GOOGLE_AI_API_KEY", "GEMINI_API_KEY"][..],
                "GEMINI",
                "gemini-2.5-flash",
            ),
        ];
        let mut added = Vec::new();
        for (name, kind, keys, prefix, model) in vendors {
            let Some(key) = keys.iter().find_map(|k| env(k)) else {
                continue;
            };
            if self.ai.providers.contains_key(name) {
                continue;
            }
            let mut provider = ProviderConfig::new(
                kind,
                env(&format!("{prefix}_MODEL")).unwrap_or_else(|| model.to_owned()),
            );
            provider.base_url = env(&format!("{prefix}_BASE_URL"));
            provider.api_key = Some(Secret::new(key));
            self.ai.providers.insert(name.to_owned(), provider);
            added.push(name.to_owned());
        }
        if let Some(bot) = self
            .domains
            .iter_mut()
            .find(|d| d.id == DEMO_DOMAIN)
            .and_then(|d| d.bot.as_mut())
            && bot.providers.is_empty()
        {
            bot.providers = added;
        }
    }

    /// `trusted_proxies` parsed; a bare address is a range of one.
    pub fn trusted_proxy_ranges(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::Invalid(format!(
                            "trusted_proxies: {p:?} is not an IP address or CIDR range"
                        ))
                    })
            })
            .collect()
    }

    /// The Redis URL of `broker`, if it names one (`memory` does not).
    pub fn broker_url(&self) -> Option<&str> {
        (self.broker.starts_with("redis://") || self.broker.starts_with("rediss://"))
            .then_some(self.broker.as_str())
    }

    /// The SQLite file path of `database`, if it is a `sqlite://` URL.
    pub fn database_path(&self) -> Option<PathBuf> {
        let rest = self
            .database
            .strip_prefix("sqlite://")
            .or_else(|| self.database.strip_prefix("sqlite:"))?;
        (!rest.is_empty()).then(|| PathBuf::from(rest))
    }

    /// `database`, if it is a `postgres://` or `postgresql://` URL.
    pub fn postgres_url(&self) -> Option<&str> {
        let rest = self
            .database
            .strip_prefix("postgres://")
            .or_else(|| self.database.strip_prefix("postgresql://"))?;
        (!rest.is_empty()).then_some(self.database.as_str())
    }
}

/// A URL without its password (`postgres://parlor:…@db/parlor`), for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        // Only a password is hidden: `postgres://parlor@db` has none to hide.
        Some(at) if rest[..at].contains(':') => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &url[..scheme_end], &rest[at..])
        }
        _ => url.to_owned(),
    }
}

/// The query parameters of a `broker` URL Parlor honours (the CA that verifies a
/// `rediss://` server).
const BROKER_PARAMETERS: &[&str] = &["sslrootcert"];

/// The query parameters of a PostgreSQL `database` URL the driver honours; it would ignore
/// any other (`sslnegotiation`, `channel_binding`, `gssencmode`…) with a warning, which for
/// a security setting means silently connecting without it.
const POSTGRES_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The query of `url` as (name, value) pairs, undecoded.
fn url_parameters(url: &str) -> impl Iterator<Item = (&str, &str)> {
    url.split_once('?')
        .map_or("", |(_, q)| q.split('#').next().unwrap_or_default())
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The value of the query parameter `name` of `url`, undecoded.
pub fn url_parameter<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    url_parameters(url)
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Refuses a URL with a query parameter outside `known`: what the connection would not
/// honour must stop the start, not be dropped on the way.
fn check_url_parameters(key: &str, url: &str, known: &[&str]) -> Result<(), ConfigError> {
    for (name, _) in url_parameters(url) {
        let known = known.contains(&name) || (key == "database" && name.starts_with("options["));
        if !known {
            return Err(ConfigError::Invalid(format!(
                "{key}: the URL parameter {name:?} is not supported (supported: {})",
                if key == "database" {
                    POSTGRES_PARAMETERS.join(", ")
                } else {
                    BROKER_PARAMETERS.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// Top-level keys of [`Config`], as environment variables spell them (lowercased).
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "database",
    "broker",
    "broker_prefix",
    "broker_presence_ttl_secs",
    "broker_position_check_ms",
    "log_format",
    "log_level",
    "shutdown_timeout_ms",
    "limits",
    "store",
    "auth",
    "ai",
    "trusted_proxies",
    "web",
    "domains",
];

/// True when `key` (a `PARLOR_` variable without its prefix) sets a configuration key.
fn is_config_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let top = key.split("__").next().unwrap_or_default();
    TOP_LEVEL_KEYS.contains(&top)
}

/// A `PARLOR_*` variable that names no configuration key and was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredVar {
    /// The variable.
    pub name: String,
    /// The configuration variable it is probably a typo of (`PARLOR_LISTEN` for
    /// `PARLOR_LISTN`).
    pub suggestion: Option<String>,
}

/// `PARLOR_*` variables that are not configuration and were ignored (for a start-up warning).
pub fn ignored_env_vars() -> Vec<IgnoredVar> {
    std::env::vars()
        .filter_map(|(name, _)| {
            let key = name.strip_prefix("PARLOR_")?;
            let lower = key.to_ascii_lowercase();
            if is_config_key(key) || lower.starts_with("test_") || lower == "config" {
                return None;
            }
            let mut parts = lower.split("__");
            let top = parts.next().unwrap_or_default();
            let rest: Vec<&str> = parts.collect();
            let suggestion = explain::closest(top, TOP_LEVEL_KEYS).map(|close| {
                let mut var = format!("PARLOR_{}", close.to_ascii_uppercase());
                for part in &rest {
                    var.push_str("__");
                    var.push_str(&part.to_ascii_uppercase());
                }
                var
            });
            Some(IgnoredVar { name, suggestion })
        })
        .collect()
}

/// Turns figment's errors into [`ConfigError`] sentences.
///
/// Figment knows the path of a bad key and which provider gave it, but prints the profile
/// (`default.limits.x`), every allowed key and no line. This finds the key where the user
/// wrote it: the environment variable (matched case-insensitively, as figment reads them)
/// or the file, whose line it reads from the TOML with positions.
mod explain {
    use std::path::Path;

    use figment::error::{Actual, Kind};
    use figment::{Error, Source};

    use super::ConfigError;

    /// The prefix of the configuration's environment variables.
    const PREFIX: &str = "PARLOR_";

    /// Where a bad key was written.
    enum Origin {
        /// A file, with the line of the key when it could be found.
        File { key: String, line: Option<usize> },
        /// An environment variable.
        Env { var: String },
        /// Neither could be told (a built-in value): only the key.
        Key(String),
    }

    /// The sentence for the first of figment's errors. `file` is the configuration file
    /// that was read, if any.
    pub(super) fn figment_error(error: Error, file: Option<&Path>) -> ConfigError {
        let Some(error) = error.into_iter().next() else {
            return ConfigError::Invalid("the configuration cannot be read".to_owned());
        };
        let from_file = matches!(
            error.metadata.as_ref().and_then(|m| m.source.as_ref()),
            Some(Source::File(_))
        );
        let from_env = error
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.contains("environment"));
        // A file that is not TOML fails before any key is read.
        if from_file
            && error.path.is_empty()
            && let (Kind::Message(reason), Some(path)) = (&error.kind, file)
        {
            return ConfigError::File {
                path: path.to_owned(),
                reason: toml_reason(reason),
            };
        }
        let path = &error.path;
        let env_var = env_var_for(path);
        let origin = match (from_env, from_file, env_var, file) {
            (true, _, Some(var), _) => Origin::Env { var },
            (true, _, None, _) => Origin::Env {
                var: format!("{PREFIX}{}", path.join("__").to_ascii_uppercase()),
            },
            (false, true, _, Some(file)) => Origin::File {
                key: display_key(path),
                line: line_of(file, path),
            },
            (false, false, Some(var), _) => Origin::Env { var },
            (false, false, None, Some(file)) if line_of(file, path).is_some() => Origin::File {
                key: display_key(path),
                line: line_of(file, path),
            },
            _ => Origin::Key(display_key(path)),
        };
        let place = match &origin {
            Origin::File { key, line } => {
                let line = line.map(|l| format!(", line {l}")).unwrap_or_default();
                let file = file.map(|f| f.display().to_string()).unwrap_or_default();
                format!("`{key}` in {file}{line}")
            }
            Origin::Env { var } => format!("the environment variable {var}"),
            Origin::Key(key) if key.is_empty() => "the configuration".to_owned(),
            Origin::Key(key) => format!("`{key}`"),
        };
        let problem = match &error.kind {
            Kind::UnknownField(found, expected) => {
                let parent = &path[..path.len().saturating_sub(1)];
                let suggestion = closest(found, expected).map(|close| match &origin {
                    Origin::Env { .. } => {
                        let mut key = parent.to_vec();
                        key.push(close.to_owned());
                        format!("{PREFIX}{}", key.join("__").to_ascii_uppercase())
                    }
                    _ => {
                        let mut key = parent.to_vec();
                        key.push(close.to_owned());
                        format!("`{}`", display_key(&key))
                    }
                });
                let section = if parent.is_empty() {
                    "the top level".to_owned()
                } else {
                    format!("`{}`", display_key(parent))
                };
                match suggestion {
                    Some(s) => format!("is not a configuration key; did you mean {s}?"),
                    None if expected.len() <= FEW_KEYS => format!(
                        "is not a configuration key (the keys of {section} are {})",
                        expected.join(", ")
                    ),
                    None => format!(
                        "is not a configuration key (parlor.example.toml shows every key of \
                         {section})"
                    ),
                }
            }
            Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
                format!(
                    "must be {}, not {}",
                    expected_text(expected),
                    actual_text(actual)
                )
            }
            Kind::UnknownVariant(found, expected) => {
                let choices: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
                let choices = match choices.split_last() {
                    Some((last, [])) => last.clone(),
                    Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                    None => "nothing".to_owned(),
                };
                format!("must be {choices}, not {found:?}")
            }
            Kind::MissingField(name) => format!("needs the key `{name}`"),
            Kind::Message(message) => format!("is invalid: {message}"),
            other => format!("is invalid: {other}"),
        };
        ConfigError::Key { place, problem }
    }

    /// Sections with at most this many keys list them after an unknown key; larger ones
    /// point to the example file instead of a paragraph of names.
    const FEW_KEYS: usize = 8;

    /// toml's error ("TOML parse error at line 1, column 12", a snippet of the file with a
    /// caret, then what was expected) as one line: "line 1, column 12: invalid array,
    /// expected `]`".
    fn toml_reason(text: &str) -> String {
        let mut lines = text.lines();
        let head = lines.next().unwrap_or_default();
        let at = head.strip_prefix("TOML parse error at ").unwrap_or(head);
        let snippet = |line: &str| {
            let line = line.trim_start();
            line.starts_with('|')
                || line
                    .split_once(" |")
                    .is_some_and(|(n, _)| n.bytes().all(|b| b.is_ascii_digit()))
        };
        let what: Vec<&str> = lines
            .map(str::trim)
            .filter(|l| !l.is_empty() && !snippet(l))
            .collect();
        if what.is_empty() {
            at.to_owned()
        } else {
            format!("{at}: {}", what.join(", "))
        }
    }

    /// `domains[0].bot.enabled` for the path `domains`, `0`, `bot`, `enabled`.
    fn display_key(path: &[String]) -> String {
        let mut key = String::new();
        for part in path {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                key.push_str(&format!("[{part}]"));
            } else {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(part);
            }
        }
        key
    }

    /// The environment variable that sets `path`, spelled as it is set.
    fn env_var_for(path: &[String]) -> Option<String> {
        if path.is_empty() {
            return None;
        }
        let wanted = path.join("__");
        std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .find(|name| {
                name.get(..PREFIX.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
                    && name
                        .get(PREFIX.len()..)
                        .is_some_and(|rest| rest.eq_ignore_ascii_case(&wanted))
            })
    }

    /// The line of `path` in the TOML file: of the key itself, or of the deepest table on
    /// its way that exists (a missing key is reported on its table's line).
    fn line_of(file: &Path, path: &[String]) -> Option<usize> {
        let text = std::fs::read_to_string(file).ok()?;
        let doc = toml_edit::ImDocument::parse(text.as_str()).ok()?;
        let span = span_in_table(doc.as_table(), path)?;
        Some(text.get(..span.start)?.matches('\n').count() + 1)
    }

    type Span = std::ops::Range<usize>;

    fn span_in_table(table: &dyn toml_edit::TableLike, path: &[String]) -> Option<Span> {
        let (first, rest) = path.split_first()?;
        let (key, item) = table.get_key_value(first)?;
        span_in_item(item, rest).or_else(|| key.span())
    }

    fn span_in_item(item: &toml_edit::Item, path: &[String]) -> Option<Span> {
        let (first, rest) = path.split_first()?;
        if let Some(table) = item.as_table_like() {
            return span_in_table(table, path);
        }
        let index: usize = first.parse().ok()?;
        if let Some(tables) = item.as_array_of_tables() {
            let table = tables.get(index)?;
            return span_in_table(table, rest).or_else(|| table.span());
        }
        let value = item.as_array()?.get(index)?;
        value
            .as_inline_table()
            .and_then(|t| span_in_table(t, rest))
            .or_else(|| value.span())
    }

    /// serde's name of an expected type, for people.
    fn expected_text(expected: &str) -> String {
        match expected {
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number".to_owned(),
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_owned(),
            "f32" | "f64" => "a number".to_owned(),
            "a sequence" => "a list".to_owned(),
            "a map" => "a table".to_owned(),
            e if e.starts_with("struct ") => "a table".to_owned(),
            e => e.to_owned(),
        }
    }

    /// A value that was found, for people.
    fn actual_text(actual: &Actual) -> String {
        match actual {
            Actual::Str(s) => format!("the string {s:?}"),
            Actual::Unsigned(n) => format!("the number {n}"),
            Actual::Signed(n) => format!("the number {n}"),
            Actual::Float(n) => format!("the number {n}"),
            Actual::Bool(b) => format!("{b}"),
            Actual::Seq => "a list".to_owned(),
            Actual::Map => "a table".to_owned(),
            other => other.to_string(),
        }
    }

    /// The candidate closest to `found`, if it is close enough to be a typo of it: at most
    /// a third of its letters differ (at least one may).
    pub(super) fn closest<'a>(found: &str, candidates: &[&'a str]) -> Option<&'a str> {
        let found = found.to_ascii_lowercase();
        let limit = (found.chars().count() / 3).max(1);
        candidates
            .iter()
            .map(|c| (edit_distance(&found, c), *c))
            .filter(|(d, _)| *d <= limit)
            .min_by_key(|(d, _)| *d)
            .map(|(_, c)| c)
    }

    /// Levenshtein distance: insertions, deletions and substitutions of one character.
    fn edit_distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = (above + 1)
                    .min(row[j] + 1)
                    .min(diagonal + usize::from(ca != *cb));
                diagonal = above;
            }
        }
        row[b.len()]
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn typos_find_their_key() {
            let keys = ["max_frame_bytes", "max_message_bytes", "max_page"];
            assert_eq!(closest("max_frame_bytez", &keys), Some("max_frame_bytes"));
            assert_eq!(closest("MAX_PAGES", &keys), Some("max_page"));
            assert_eq!(closest("colour", &keys), None);
            assert_eq!(edit_distance("kitten", "sitting"), 3);
            assert_eq!(edit_distance("", "abc"), 3);
        }

        #[test]
        fn toml_errors_fit_on_one_line() {
            let text = "TOML parse error at line 1, column 12\n  |\n1 | listen = [\n  |            ^\ninvalid array\nexpected `]`\n";
            assert_eq!(
                toml_reason(text),
                "line 1, column 12: invalid array, expected `]`"
            );
        }

        #[test]
        fn keys_are_shown_as_written() {
            let path = ["domains", "1", "bot", "enabled"].map(String::from);
            assert_eq!(display_key(&path), "domains[1].bot.enabled");
        }

        #[test]
        fn lines_are_found_in_tables_arrays_and_dotted_keys() {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("parlor.toml");
            std::fs::write(
                &file,
                "listen = \"127.0.0.1:1\"\nlimits.max_page = 5\n\n[[domains]]\nid = \"a\"\n\n\
                 [[domains]]\nid = \"b\"\nbot = { enabled = true }\n",
            )
            .unwrap();
            let line = |p: &[&str]| {
                line_of(
                    &file,
                    &p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
                )
            };
            assert_eq!(line(&["listen"]), Some(1));
            assert_eq!(line(&["limits", "max_page"]), Some(2));
            assert_eq!(line(&["domains", "1", "id"]), Some(8));
            assert_eq!(line(&["domains", "1", "bot", "enabled"]), Some(9));
            assert_eq!(
                line(&["domains", "0", "name"]),
                Some(4),
                "a missing key: its table"
            );
            assert_eq!(line(&["store"]), None);
        }
    }
}

/// Durations written with a unit (`500ms`, `30s`, `15m`, `24h`, `7d`); a bare number is
/// seconds.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let text = match ms {
            0 => "0s".to_owned(),
            ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
            ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        s.serialize_str(&text)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Seconds(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Written::deserialize(d)? {
            Written::Seconds(s) => Ok(Duration::from_secs(s)),
            Written::Text(t) => parse(&t).ok_or_else(|| {
                D::Error::custom(format!(
                    "{t:?} is not a duration: write a number with a unit, e.g. 500ms, 30s, \
                     15m, 24h or 7d"
                ))
            }),
        }
    }

    pub fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (n, unit) = text.split_at(digits);
        let n: u64 = n.parse().ok()?;
        let ms = match unit.trim() {
            "ms" => 1,
            "s" | "" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        n.checked_mul(ms).map(Duration::from_millis)
    }
}

/// Durations are written as whole milliseconds in the file and environment.
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_with_units() {
        let ms = |t: &str| duration_text::parse(t).map(|d| d.as_millis());
        assert_eq!(ms("500ms"), Some(500));
        assert_eq!(ms("30s"), Some(30_000));
        assert_eq!(ms("15m"), Some(900_000));
        assert_eq!(ms("24h"), Some(86_400_000));
        assert_eq!(ms("7d"), Some(604_800_000));
        assert_eq!(ms(" 90 "), Some(90_000));
        for bad in ["", "h", "1w", "-1s", "1.5h", "99999999999999999999d"] {
            assert_eq!(ms(bad), None, "{bad}");
        }
        let config = toml_from("[sessions]\nstale_after = \"2h\"\nkeep_completed = 3600\n");
        assert_eq!(config.sessions.stale_after, Duration::from_secs(7200));
        assert_eq!(config.sessions.keep_completed, Duration::from_secs(3600));
        let wrong = Figment::from(Toml::string("[sessions]\nstale_after = \"soon\"\n"))
            .extract::<Config>()
            .expect_err("refused");
        assert!(wrong.to_string().contains("is not a duration"), "{wrong}");
        let mut zero = toml_from("[sessions]\nstale_after = \"0s\"\n");
        let refused = zero.validate().expect_err("0s refused");
        assert!(
            refused.to_string().contains("sessions.stale_after"),
            "{refused}"
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://parlor:s3cret@db:5432/parlor?sslmode=require"),
            "postgres://parlor:…@db:5432/parlor?sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:pw@cache:6379"),
            "redis://:…@cache:6379"
        );
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(
            redact_url("postgres://parlor@db/parlor"),
            "postgres://parlor@db/parlor"
        );
        assert_eq!(redact_url("sqlite://parlor.db"), "sqlite://parlor.db");
        assert_eq!(
            redact_url("sqlite:///a@b/parlor.db"),
            "sqlite:///a@b/parlor.db"
        );
    }

    #[test]
    fn business_hours() {
        use chrono::TimeZone;
        let h = HandoffConfig {
            timezone: "Europe/Berlin".into(),
            business_hours: vec!["mon-fri 09:00-17:00".into(), "sat 10:00-13:00".into()],
            ..HandoffConfig::default()
        }
        .hours()
        .unwrap();
        // 2026-12-02 is a Wednesday; Berlin is UTC+1 in December.
        let utc = |d, hh, mm| {
            chrono::Utc
                .with_ymd_and_hms(2026, 12, d, hh, mm, 0)
                .unwrap()
        };
        assert!(h.is_open(utc(2, 8, 0)), "09:00 Berlin");
        assert!(!h.is_open(utc(2, 7, 59)), "08:59 Berlin");
        assert!(!h.is_open(utc(2, 16, 0)), "17:00 Berlin is closed");
        assert!(h.is_open(utc(5, 9, 30)), "Saturday 10:30");
        assert!(!h.is_open(utc(6, 10, 0)), "Sunday");
        assert!(
            HandoffConfig::default()
                .hours()
                .unwrap()
                .is_open(utc(6, 3, 0))
        );
        for bad in [
            "mon-fri",
            "xyz 09:00-10:00",
            "mon 10:00-09:00",
            "mon 25:00-26:00",
        ] {
            let c = HandoffConfig {
                business_hours: vec![bad.into()],
                ..HandoffConfig::default()
            };
            assert!(c.hours().is_err(), "{bad}");
        }
        let tz = HandoffConfig {
            timezone: "Mars/Olympus".into(),
            ..HandoffConfig::default()
        };
        assert!(tz.hours().unwrap_err().contains("time zone"));
    }

    #[test]
    fn example_file_matches_defaults() {
        let text = include_str!("../parlor.example.toml");
        let mut from_example: Config = toml_from(text);
        from_example.validate().ok();
        let mut defaults = Config::default();
        defaults.validate().ok();
        assert_eq!(
            from_example, defaults,
            "parlor.example.toml drifted from the defaults"
        );
    }

    fn toml_from(text: &str) -> Config {
        match Figment::from(Toml::string(text)).extract() {
            Ok(c) => c,
            Err(e) => panic!("example config does not parse: {e}"),
        }
    }

    #[test]
    fn loads_a_file_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("parlor-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("parlor.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9999\"\n[limits]\nmessages_per_second = 7\n[[domains]]\nid = \"acme\"\n",
        )
        .unwrap();
        let flags = Overrides {
            database: Some("sqlite:///tmp/x.db".into()),
            ..Overrides::default()
        };
        let c = Config::load(Some(&path), &flags).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.limits.messages_per_second, 7);
        assert_eq!(
            c.limits.messages_burst,
            Limits::default().messages_burst,
            "unset keys keep defaults"
        );
        assert_eq!(c.database, "sqlite:///tmp/x.db", "flags win over the file");
        let ids: Vec<&str> = c.domains.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["acme", "demo"], "the demo domain is always there");
        assert!(Config::load(Some(&dir.join("missing.toml")), &Overrides::default()).is_err());
        std::fs::write(&path, "[limits]\nmessages_per_second = \"fast\"\n").unwrap();
        assert!(
            Config::load(Some(&path), &Overrides::default()).is_err(),
            "wrong types are refused"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn rejects_bad_values() {
        let mut c = Config::default();
        c.limits.outbound_queue = 0;
        assert!(c.validate().is_err());
        for database in ["mysql://x", "postgres://", "parlor.db"] {
            let mut c = Config {
                database: database.into(),
                ..Config::default()
            };
            assert!(c.validate().is_err(), "{database}");
        }
        for database in ["postgres://parlor@db/parlor", "postgresql://db:5433/parlor"] {
            let mut c = Config {
                database: database.into(),
                ..Config::default()
            };
            c.validate().expect(database);
            assert_eq!(c.postgres_url(), Some(database));
            assert_eq!(c.database_path(), None);
        }
        let mut c = Config::default();
        c.auth.jwt_secret = Some(Secret::new("short"));
        assert!(c.validate().is_err());
    }

    #[test]
    fn vendor_variables_add_providers_for_the_demo_bot() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let mut c = Config::default();
        c.add_vendor_providers(env(&[
            ("GEMINI_API_KEY", "g-key"),
            ("OPENAI_API_KEY", "x"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1"),
            ("OPENAI_MODEL", "llama3.2"),
        ]));
        let openai = &c.ai.providers["openai"];
        assert_eq!(openai.kind, ProviderKind::Openai);
        assert_eq!(
            openai.base_url.as_deref(),
            Some("http://127.0.0.1:11434/v1")
        );
        assert_eq!(openai.model, "llama3.2");
        assert_eq!(c.ai.providers["gemini"].api_key, Some(Secret::new("g-key")));
        let demo_bot = c.domains[0].bot.as_ref().unwrap();
        assert_eq!(demo_bot.providers, ["openai", "gemini"], "OpenAI first");
        c.validate().unwrap();

        // A configured provider of that name, or a demo bot with its own list, wins.
        let mut c = Config::default();
        c.ai.providers.insert(
            "openai".into(),
            ProviderConfig::new(ProviderKind::Openai, "gpt-4o"),
        );
        c.domains[0].bot.as_mut().unwrap().providers = vec!["openai".into()];
        c.add_vendor_providers(env(&[("OPENAI_API_KEY", "x"), ("ANTHROPIC_API_KEY", "a")]));
        assert_eq!(c.ai.providers["openai"].model, "gpt-4o");
        assert!(c.ai.providers.contains_key("anthropic"));
        assert_eq!(c.domains[0].bot.as_ref().unwrap().providers, ["openai"]);
        // A trusted proxy that is not an address or a range is refused too.
        let mut bad = Config {
            trusted_proxies: vec!["10.0.0.0/8".into(), "proxy.local".into()],
            ..Config::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("proxy.local")
        );
        // A bot naming a provider that does not exist is refused at start-up.
        c.domains[0].bot.as_mut().unwrap().providers = vec!["nope".into()];
        assert!(c.validate().unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = Config::default();
        c.auth.jwt_secret = Some(Secret::new("a-very-secret-value"));
        assert!(!format!("{c:?}").contains("a-very-secret-value"));
    }

    #[test]
    fn only_configuration_variables_are_read() {
        assert!(is_config_key("LIMITS__MESSAGES_PER_SECOND"));
        assert!(is_config_key("listen"));
        assert!(!is_config_key("BIN"));
        assert!(!is_config_key("TEST_DATABASE_URL"));
        assert!(!is_config_key("CONFIG"));
    }

    #[test]
    fn listen_addresses() {
        let parse = |s: &str| s.parse::<ListenAddr>();
        assert_eq!(
            parse("localhost:8080"),
            Ok(ListenAddr::new("localhost", 8080))
        );
        assert_eq!(parse("[::1]:0"), Ok(ListenAddr::new("::1", 0)));
        assert_eq!(parse("[::1]:0").unwrap().to_string(), "[::1]:0");
        assert_eq!(
            parse("0.0.0.0:8080").unwrap().resolve().unwrap(),
            [SocketAddr::from(([0, 0, 0, 0], 8080))]
        );
        for bad in [
            "8080",
            ":8080",
            "localhost",
            "::1:8080",
            "[::1:8080",
            "a b:1",
            "h:99999",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
        assert_eq!(Config::default().listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let r: Result<Config, _> = Figment::from(Toml::string("[limits]\nnope = 1\n")).extract();
        assert!(r.is_err());
    }
}

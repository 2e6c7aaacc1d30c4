//! Where the server listens, what one client may do, storage tuning and the server's own
//! token settings.

use super::*;

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
    /// Visitor reports (`POST /visitors/add`, `/visitors/remove`) one IP address may send
    /// per minute.
    pub ip_visitor_reports_per_minute: u32,
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
            ip_visitor_reports_per_minute: 120,
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
    /// Most committed messages on their way to the broker and the hand-off service. Beyond
    /// it, a client's send waits (at most 10 s, then `store_unavailable`) before it is
    /// written; the node's own writes (the assistant, hand-off) never wait.
    pub pipeline_backlog: usize,
    /// Recent messages kept in memory per active room, serving recovery without the store.
    pub room_cache: usize,
    /// Read connections kept open to the database.
    pub read_pool: usize,
    /// Most connections each node opens to PostgreSQL for reads (the writer keeps one more
    /// of its own). Ignored with SQLite.
    pub postgres_pool: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            sqlite_synchronous: SqliteSync::Normal,
            max_batch: 1024,
            write_queue: 4096,
            pipeline_backlog: 16_384,
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

//! The native WebSocket transport at `/ws` (the WeeziQ protocol; see `docs/protocol.md`).
//!
//! One task per connection owns the socket. It waits on five things at once: shutdown, being
//! kicked as a slow consumer, its liveness timer (pings to a quiet client, close 4011 when
//! none is answered, 4012 after `ws_idle_timeout_ms` of silence when set), events in its
//! bounded queue (written in batches with one flush), and frames from the client (parsed,
//! rate-limited, handed to the chat service, answered).
//! A client frame never makes the server wait for anyone else; an invalid one gets an `error`
//! frame and nothing else happens.

pub mod frame;
pub mod guided;
pub mod socket;

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use self::socket::{Incoming, RecvError, WsSocket};
use super::ai::AskBody;
use super::edge::AddressSlot;
use super::error::ApiError;
use super::http::bearer_token;
use super::listen::TcpSlot;
use super::wire::{
    WireMessage, WireUser, agent_json, conversation_json, eclipse_frame, encode_event,
    inbox_entry_json, note_json, to_bytes,
};
use crate::auth::domains::DomainPermit;
use crate::auth::policy;
use crate::broker::shared::Online;
use crate::config::{AnonymousIdentity, Dialect};
use crate::error_code::ErrorCode;
use crate::hub::{
    CLOSE_RESYNC, CLOSE_SLOW_CONSUMER, ConnHandle, Cursor, Cursors, Envelope, Event, Joined, Kick,
    Replay, Step,
};
use crate::metrics::AT_CONNECTION;
use crate::model::Message;
use crate::model::{Conversation, Identity, Role, RoomKey, RoomStatus, iso, now_ms};
use crate::service::ServiceError;
use crate::service::chat::{MAX_NAME_CHARS, Outgoing, not_joined};
use crate::service::handoff::{Action, AgentRef, Service};
use crate::store::CustomerProfile;
use crate::transport::AppState;

/// Close code sent on graceful shutdown ("service restart"): reconnect, possibly elsewhere.
pub const CLOSE_RESTART: u16 = 1012;
/// Close code for a frame or message above `limits.max_frame_bytes`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a protocol violation.
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Close code for a text message that is not UTF-8.
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code for a client that answered no ping within `limits.ws_pong_timeout_ms`.
pub const CLOSE_NO_PONG: u16 = 4011;
/// Close code for a client that sent no message within `limits.ws_idle_timeout_ms`.
pub const CLOSE_IDLE: u16 = 4012;
/// Close code for a guided session's connection another connection took over.
pub const CLOSE_REPLACED: u16 = 4013;
/// Most queued events written per flush.
const WRITE_BATCH: usize = 64;
/// Stop adding events to a write once this many bytes are pending.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// A client that accepts no data for this long is disconnected as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the close frame may take to reach a client being disconnected.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after connecting an anonymous connection may authenticate with an `auth` frame.
const AUTH_FRAME_WINDOW: Duration = Duration::from_secs(10);
/// How long a connection closed for an oversized frame stays open so the client can read why.
const LINGER: Duration = Duration::from_secs(1);

/// Query parameters of the upgrade request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WsQuery {
    /// Join this room right away (the seed's `/ws?roomId=`).
    room_id: Option<String>,
    /// Connection token.
    token: Option<String>,
    /// Without a token: the domain to be a visitor of (the demo, or a public one).
    domain_id: Option<String>,
}

/// `GET /ws`: checks the handshake, authenticates, checks capacity, and upgrades.
pub async fn upgrade(
    State(app): State<AppState>,
    Query(query): Query<WsQuery>,
    mut req: Request,
) -> Response {
    let key = match handshake_key(req.headers()) {
        Ok(key) => key,
        Err(message) => return upgrade_required(&app, message),
    };
    let offered = subprotocols(req.headers());
    let token = upgrade_token(query.token.as_deref(), req.headers(), &offered);
    let identified = match token.as_deref() {
        None => Ok(super::visitor::anonymous(req.extensions())),
        token => app.auth.identify(token).await,
    };
    let identity = match identified {
        Ok(identity) => identity,
        Err(e) => {
            app.metrics.client_error(e.code().as_str());
            return ApiError::unauthorized(e.code(), e.to_string()).into_response();
        }
    };
    // A token-less client from a public domain's own site is in that domain from the
    // start (`?domainId=` names one explicitly), so that its `?roomId=` room is that
    // domain's.
    let identity = if identity.anonymous {
        let claimed = crate::auth::Claimed {
            domain_id: query.domain_id.as_deref(),
            ..crate::auth::Claimed::default()
        };
        match app
            .auth
            .settle(&identity, claimed, super::ai::page_origin(req.headers()))
        {
            Ok(settled) => settled,
            Err(e) => {
                app.metrics.client_error(e.code().as_str());
                return super::error::ApiError::from(ServiceError::from(e)).into_response();
            }
        }
    } else {
        identity
    };
    let gate = match Gate::pass(&app, &req, &identity).await {
        Ok(gate) => gate,
        Err(refused) => return refused,
    };
    let Gate {
        origin,
        address,
        admitted,
        permits,
    } = gate;
    // Only visitors have a context worth showing to agents.
    let browser = (identity.role == Role::Visitor)
        .then(|| req.headers().get(header::USER_AGENT)?.to_str().ok())
        .flatten()
        .map(|ua| Box::from(truncate(ua, MAX_CONTEXT_CHARS)));
    let limits = &app.config.limits;
    let identity_anonymous = identity.anonymous;
    let dialect = dialect_of(&app, &identity);
    // A token that names its room (Eclipse's `chatId`) joins it at once.
    let auto_join = query
        .room_id
        .or_else(|| identity.room.as_deref().map(str::to_owned));
    let id = app.next_connection_id();
    let (handle, rx) = ConnHandle::bounded(
        id,
        Arc::new(identity),
        limits.outbound_queue,
        limits.outbound_queue_bytes,
    );
    let online = app
        .shared
        .online(handle.identity(), handle.identity().role.as_str());
    let connection = Connection {
        limiter: admitted.limiter,
        frame_rate: admitted.frame_rate,
        app: app.clone(),
        handle,
        rx,
        rooms: Cursors::default(),
        current_room: None,
        display_name: None,
        origin,
        auth_until: Instant::now() + AUTH_FRAME_WINDOW,
        settled: !identity_anonymous,
        pending_join: None,
        dialect,
        permits,
        address,
        online,
        browser,
    };
    let max_message = limits.max_frame_bytes;
    let on_upgrade = hyper::upgrade::on(&mut req);
    app.supervisor.spawn_isolated("connection", async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                connection
                    .run(WsSocket::new(upgraded, max_message), auto_join)
                    .await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    switching_protocols(&key, &offered)
}

/// An upgrade's token: `?token=`, else `Authorization: Bearer`, else the `bearer.<token>`
/// subprotocol (browsers cannot set headers on a WebSocket). An empty `?token=` is no
/// token: it must not hide the header.
fn upgrade_token(query: Option<&str>, headers: &HeaderMap, offered: &[String]) -> Option<String> {
    query
        .filter(|t| !t.is_empty())
        .or_else(|| bearer_token(headers))
        .or_else(|| {
            offered
                .iter()
                .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        })
        .map(str::to_owned)
}

/// The answer to a request that is not a WebSocket handshake.
fn upgrade_required(app: &AppState, message: &str) -> Response {
    app.metrics.client_error("upgrade_required");
    let mut res = ApiError::new(
        StatusCode::UPGRADE_REQUIRED,
        ErrorCode::UpgradeRequired,
        message,
    )
    .into_response();
    res.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    res.headers_mut().insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    res
}

/// The 101 that completes a handshake with `key`.
fn switching_protocols(key: &str, offered: &[String]) -> Response {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = res.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    // A client that offers subprotocols must get one back; never echo the token.
    if offered.iter().any(|p| p == SUBPROTOCOL) {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    res
}

/// The places an admitted WebSocket holds in the server's and its domain's connection
/// limits, and under its address's caps on WebSockets and on TCP connections.
type Permits = (
    OwnedSemaphorePermit,
    DomainPermit,
    Option<AddressSlot>,
    Option<TcpSlot>,
);

/// What an upgrade passed on its way in: the checks every WebSocket endpoint makes once its
/// caller is known.
struct Gate {
    /// The page's origin (`None` for Parlor's own pages and non-browser clients).
    origin: Option<Box<str>>,
    /// The client's address (behind a trusted proxy, the forwarded one).
    address: Option<std::net::IpAddr>,
    /// The domain's frame limits.
    admitted: Admitted,
    /// Its places in the connection limits.
    permits: Permits,
}

impl Gate {
    /// The identity's connect rate, the page's origin, shutdown, and the address's, the
    /// server's and the domain's connection limits, in that order; the refusal as the
    /// response to send.
    fn pass<'a>(
        app: &'a AppState,
        req: &Request,
        identity: &'a Identity,
    ) -> impl Future<Output = Result<Self, Response>> + Send + 'a {
        // Read what the request says before waiting: a request is not `Sync`.
        let origin = if super::edge::same_origin(req.headers()) {
            None
        } else {
            super::edge::origin(req.headers()).map(Box::<str>::from)
        };
        let address = super::edge::ClientIp::of(app, req).0;
        let tcp_slot = req.extensions().get::<TcpSlot>().cloned();
        Self::admit(app, identity, origin, address, tcp_slot)
    }

    async fn admit(
        app: &AppState,
        identity: &Identity,
        origin: Option<Box<str>>,
        address: Option<std::net::IpAddr>,
        tcp_slot: Option<TcpSlot>,
    ) -> Result<Self, Response> {
        if let Err(wait) = app.edge.check_identity(identity).await {
            app.metrics.client_error("rate_limited");
            return Err(
                ApiError::rate_limited(wait, "connections by this identity").into_response()
            );
        }
        // A browser page may open sockets only for domains that list its origin; Parlor's
        // own pages (the inbox) serve every domain.
        if !app
            .edge
            .origin_allowed(&identity.domain_id, origin.as_deref())
        {
            app.metrics.client_error("origin_not_allowed");
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                ErrorCode::OriginNotAllowed,
                "this origin may not use the domain (allowed_origins)",
            )
            .into_response());
        }
        if app.supervisor.shutdown().is_cancelled() {
            return Err(
                ApiError::unavailable(ErrorCode::ShuttingDown, "server is shutting down")
                    .into_response(),
            );
        }
        let address_slot = match address.map(|ip| app.edge.websockets.open(ip)) {
            Some(None) => {
                app.metrics.refused("address_websockets");
                app.metrics.client_error("too_many_connections");
                let max = app.edge.websockets.max();
                return Err(ApiError::too_many_connections(format!(
                    "this address has {max} WebSockets open (limits.ip_max_websockets); close \
                     some first"
                ))
                .into_response());
            }
            Some(Some(slot)) => Some(slot),
            None => None,
        };
        let Ok(permit) = Arc::clone(&app.connection_permits).try_acquire_owned() else {
            app.metrics.refused("server_full");
            app.metrics.client_error("too_many_connections");
            return Err(ApiError::unavailable(
                ErrorCode::TooManyConnections,
                "connection limit reached",
            )
            .into_response());
        };
        let Some((domain_permit, admitted)) = admit_to_domain(app, identity) else {
            app.metrics.refused("domain_full");
            app.metrics.client_error("too_many_connections");
            return Err(
                ApiError::unavailable(ErrorCode::TooManyConnections, DOMAIN_FULL).into_response(),
            );
        };
        Ok(Self {
            origin,
            address,
            permits: (permit, domain_permit, address_slot, tcp_slot),
            admitted,
        })
    }
}

const DOMAIN_FULL: &str = "this domain's connection limit is reached";

/// A connection's frame limiter, set by its domain.
struct Admitted {
    limiter: DefaultDirectRateLimiter,
    frame_rate: u32,
}

/// Admits a connection of `identity` under its domain's limits (`None`: the domain is at
/// its connection limit): its place among the domain's connections, and its frame limiter
/// (the domain's frame rate, else the server's).
fn admit_to_domain(app: &AppState, identity: &Identity) -> Option<(DomainPermit, Admitted)> {
    let domains = app.auth.domains();
    let domain_limits = domains
        .load()
        .get(&identity.domain_id)
        .map(|d| d.settings.limits.clone())
        .unwrap_or_default();
    let permit = domains.admit(&identity.domain_id, domain_limits.max_connections)?;
    let limits = &app.config.limits;
    let frame_rate = domain_limits
        .messages_per_second
        .unwrap_or(limits.messages_per_second);
    let per_second = NonZeroU32::new(frame_rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(
        domain_limits
            .messages_burst
            .unwrap_or(limits.messages_burst),
    )
    .unwrap_or(NonZeroU32::MIN);
    Some((
        permit,
        Admitted {
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            frame_rate,
        },
    ))
}

/// The subprotocol Parlor answers with when a client offers it.
pub const SUBPROTOCOL: &str = "parlor";
/// A client may carry its token as the subprotocol `bearer.<token>` (next to `parlor`).
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// The subprotocols a client offered, in order.
fn subprotocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Checks an RFC 6455 opening handshake and returns its `Sec-WebSocket-Key`.
fn handshake_key(headers: &HeaderMap) -> Result<String, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(
            "this endpoint speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err("Sec-WebSocket-Version must be 13");
    }
    match headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(key) if key.len() == 24 && key.ends_with("==") => Ok(key.to_owned()),
        _ => Err("missing or malformed Sec-WebSocket-Key"),
    }
}

/// Adds `envelope` to the socket's write buffer in the connection's dialect, encoded once
/// per dialect for every connection that writes it.
fn write(socket: &mut WsSocket, envelope: &Envelope, dialect: Dialect) {
    let native = envelope
        .native
        .get_or_init(|| encode_event(&envelope.event));
    match dialect {
        Dialect::Native => socket.queue_text(native),
        Dialect::Eclipse => {
            socket.queue_text(envelope.eclipse.get_or_init(|| eclipse_frame(native)));
        }
    }
}

/// The dialect of `identity`'s domain.
fn dialect_of(app: &AppState, identity: &Identity) -> Dialect {
    app.auth
        .domains()
        .load()
        .get(&identity.domain_id)
        .map_or(Dialect::Native, |d| d.settings.dialect)
}

/// Ends the WebSocket: a `reconnect` hint on shutdown, then the close frame with the
/// documented code (written within a bounded time), then the TCP half-close.
async fn close(socket: &mut WsSocket, end: End) {
    let (code, reason) = match end {
        End::Shutdown => {
            let frame = json!({ "type": "reconnect", "reason": "server shutting down", "timestamp": iso(now_ms()) });
            socket.queue_text(&to_bytes(&frame));
            (CLOSE_RESTART, "server restarting")
        }
        End::SlowConsumer => (CLOSE_SLOW_CONSUMER, "slow consumer: outbound queue full"),
        End::Resync => (CLOSE_RESYNC, "out of sync: rejoin with since"),
        End::FrameTooLarge => (CLOSE_TOO_BIG, "frame too large"),
        End::ProtocolError => (CLOSE_PROTOCOL, "protocol error"),
        End::InvalidUtf8 => (CLOSE_INVALID_DATA, "text frame is not UTF-8"),
        End::NoPong => (CLOSE_NO_PONG, "no answer to ping"),
        End::Idle => (CLOSE_IDLE, "idle for too long"),
        End::Replaced => (CLOSE_REPLACED, "session continued in another connection"),
        End::Complete => (1000, "session complete"),
        End::Unavailable => (1011, "server error: try again"),
        End::Unusable => (1008, "only frames the server ignores"),
        End::ClientClosed => (1000, ""),
        End::TransportError => return,
    };
    socket.queue_close(code, reason);
    // A kicked client may still be reading what was queued before the close frame; give
    // it a bounded moment, then drop it.
    if tokio::time::timeout(CLOSE_TIMEOUT, socket.flush())
        .await
        .is_ok_and(|r| r.is_ok())
    {
        socket.shutdown().await;
    }
    if matches!(end, End::FrameTooLarge) {
        // Lingering close: the rest of the oversized frame is still arriving. Dropping the
        // socket now would reset the connection and the client would lose the error and
        // close frames it has not read yet.
        tokio::time::sleep(LINGER).await;
    }
}

/// How a connection kicked by the hub ends.
fn kicked_end(handle: &ConnHandle) -> End {
    match handle.kick() {
        Some(Kick::Resync) => End::Resync,
        _ => End::SlowConsumer,
    }
}

/// Why the connection loop ended.
#[derive(Debug, Clone, Copy)]
enum End {
    ClientClosed,
    Shutdown,
    SlowConsumer,
    /// A room's stream could not be continued in order for this connection.
    Resync,
    FrameTooLarge,
    ProtocolError,
    InvalidUtf8,
    TransportError,
    /// No answer to a ping in time.
    NoPong,
    /// No message from the client in time.
    Idle,
    /// A guided session's connection that a newer one took over.
    Replaced,
    /// A guided session ended in its document.
    Complete,
    /// The server could not serve the connection (its storage failed).
    Unavailable,
    /// A guided session's client sent nothing but frames it ignores.
    Unusable,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::Shutdown => "shutdown",
            End::SlowConsumer => "slow_consumer",
            End::Resync => "resync",
            End::FrameTooLarge => "frame_too_large",
            End::ProtocolError => "protocol_error",
            End::InvalidUtf8 => "invalid_utf8",
            End::TransportError => "transport_error",
            End::NoPong => "ping_timeout",
            End::Idle => "idle_timeout",
            End::Replaced => "replaced",
            End::Complete => "session_complete",
            End::Unavailable => "unavailable",
            End::Unusable => "unusable_frames",
        }
    }
}

/// A connection's liveness: when the client was last heard from (any frame) and last
/// spoke (a message or a ping), and the ping awaiting an answer; the intervals are the
/// `ws_*` limits. Checked lazily: the timer fires at the earliest deadline and the check
/// decides from the times, so a frame costs a clock read, not a timer reset.
#[derive(Debug)]
struct Liveness {
    heard: Instant,
    spoke: Instant,
    ping_sent: Option<Instant>,
}

/// What a liveness check asks of the connection.
enum Check {
    Fine,
    Ping,
    Dead(End),
}

/// Far enough ahead to mean "no check" for a timer.
const NEVER: Duration = Duration::from_secs(86_400 * 365);

impl Liveness {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            heard: now,
            spoke: now,
            ping_sent: None,
        }
    }

    /// Notes a frame from the client (errors pass through).
    fn heard<E>(&mut self, incoming: Result<Incoming, E>) -> Result<Incoming, E> {
        if let Ok(frame) = &incoming {
            let now = Instant::now();
            self.heard = now;
            if !matches!(frame, Incoming::Pong) {
                self.spoke = now;
            }
        }
        incoming
    }

    /// The ping still waiting for an answer, if any.
    fn unanswered(&self) -> Option<Instant> {
        self.ping_sent.filter(|sent| self.heard < *sent)
    }

    /// When the next check is due.
    fn next_check(&self, limits: &crate::config::Limits) -> Instant {
        let liveness = match self.unanswered() {
            Some(sent) => Some(sent + limits.ws_pong_timeout_ms),
            None if !limits.ws_ping_interval_ms.is_zero() => {
                Some(self.heard + limits.ws_ping_interval_ms)
            }
            None => None,
        };
        let idle = limits.ws_idle_timeout_ms;
        let idle = (!idle.is_zero()).then(|| self.spoke + idle);
        match (liveness, idle) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.heard + NEVER,
        }
    }

    fn check(&mut self, now: Instant, limits: &crate::config::Limits) -> Check {
        let idle = limits.ws_idle_timeout_ms;
        if !idle.is_zero() && now >= self.spoke + idle {
            return Check::Dead(End::Idle);
        }
        if let Some(sent) = self.unanswered() {
            return if now >= sent + limits.ws_pong_timeout_ms {
                Check::Dead(End::NoPong)
            } else {
                Check::Fine
            };
        }
        self.ping_sent = None;
        let every = limits.ws_ping_interval_ms;
        if !every.is_zero() && now >= self.heard + every {
            self.ping_sent = Some(now);
            return Check::Ping;
        }
        Check::Fine
    }
}

/// State of one connection, owned by its task.
struct Connection {
    app: AppState,
    handle: ConnHandle,
    rx: mpsc::Receiver<Arc<Envelope>>,
    /// Rooms joined, each with what the client was sent there: a message it was sent is
    /// never written again, and one ahead of its position is written only after the gap.
    rooms: Cursors,
    /// The room `send-message` without `roomId` goes to (last joined).
    current_room: Option<Arc<str>>,
    /// Name an anonymous visitor gave in `join-room`.
    display_name: Option<String>,
    limiter: DefaultDirectRateLimiter,
    /// Sustained frames per second `limiter` allows (for its error message).
    frame_rate: u32,
    /// The upgrade's `Origin`, for checking the domain an `auth` frame moves to (`None` for
    /// Parlor's own pages and non-browser clients, which every domain accepts).
    origin: Option<Box<str>>,
    /// Until when an anonymous connection may still authenticate with an `auth` frame.
    auth_until: Instant,
    /// How the connection's domain speaks.
    dialect: Dialect,
    /// The `?roomId=` room of a token-less connection in a domain where clients name
    /// themselves, until the client's first frame joins it.
    pending_join: Option<Box<str>>,
    /// Whether the identity is final: a token's at once; a token-less connection's at its
    /// first `join-room`, which may name its domain and (where the domain allows) itself.
    settled: bool,
    /// This connection's places in the server's and its domain's connection limits, and
    /// under its address's caps on WebSockets and on TCP connections.
    permits: Permits,
    /// Counts the user among the domain's online users (across the cluster).
    online: Online,
    /// A visitor's browser (the upgrade's `User-Agent`), for the context its first
    /// `join-room` stores; dropped at that join.
    browser: Option<Box<str>>,
    /// The client's address (behind a trusted proxy, the forwarded one), which visitors'
    /// AI questions are charged to.
    address: Option<std::net::IpAddr>,
}

/// The socket failed or the client is too slow; the loop must end.
struct Gone(End);

type Sent = Result<(), Gone>;

/// `id` of a request, echoed as `replyTo`.
type ReplyTo = Option<Value>;

impl Connection {
    async fn run(mut self, mut socket: WsSocket, auto_join: Option<String>) {
        let metrics = Arc::clone(&self.app.metrics);
        metrics.connections.inc();
        metrics.connections_total.inc();
        tracing::debug!(conn = self.handle.id(), user = %self.handle.identity().user_id, "connected");

        let mut end = None;
        // Where a token-less client names itself, its `?roomId=` room waits for it to say
        // who it is: its first frame (a `join-room`, normally) joins it.
        let names_itself = !self.settled
            && self
                .app
                .auth
                .domains()
                .load()
                .get(&self.handle.identity().domain_id)
                .is_some_and(|d| d.settings.anonymous_identity == AnonymousIdentity::Client);
        match auto_join {
            Some(room) if names_itself => self.pending_join = Some(room.into()),
            Some(room) => {
                if let Err(Gone(e)) = Box::pin(self.auto_join(&mut socket, room)).await {
                    end = Some(e);
                }
            }
            None => {}
        }
        let end = match end {
            Some(e) => e,
            None => self.serve(&mut socket).await,
        };

        for key in self.rooms.take_rooms() {
            self.app.chat.leave(&self.handle, &key);
        }
        self.app.handoff.unsubscribe(&self.handle);
        Box::pin(close(&mut socket, end)).await;
        metrics.connections.dec();
        metrics.disconnect(end.label());
        tracing::debug!(
            conn = self.handle.id(),
            reason = end.label(),
            "disconnected"
        );
    }

    /// The connection's main loop. Everything but the wait itself is boxed so that the state
    /// an idle connection keeps is only this loop's few hundred bytes; the request paths
    /// (join, store calls) are large and short-lived. The waits for shutdown and for a kick
    /// are registered once, not on every turn: a delivery costs the queue's wake-up alone.
    async fn serve(&mut self, socket: &mut WsSocket) -> End {
        let shutdown = self.app.supervisor.shutdown().clone();
        let shutdown = shutdown.cancelled();
        let mut shutdown = std::pin::pin!(shutdown);
        let config = Arc::clone(&self.app.config);
        let limits = &config.limits;
        let mut live = Liveness::new();
        let check = tokio::time::sleep_until(live.next_check(limits).into());
        let mut check = std::pin::pin!(check);
        // An `auth` frame replaces the handle: the kick is then awaited on the new one.
        loop {
            let watched = self.handle.clone();
            let kicked = watched.kicked();
            let mut kicked = std::pin::pin!(kicked);
            while self.handle.same(&watched) {
                let step = tokio::select! {
                    biased;
                    () = &mut shutdown => return End::Shutdown,
                    () = &mut kicked => return kicked_end(&watched),
                    () = &mut check => {
                        let now = Instant::now();
                        let step = match live.check(now, limits) {
                            Check::Fine => Ok(()),
                            Check::Ping => {
                                socket.queue_ping();
                                Box::pin(self.bounded(socket.flush())).await
                            }
                            Check::Dead(end) => return end,
                        };
                        check.as_mut().reset(live.next_check(limits).into());
                        step
                    }
                    event = self.rx.recv() => match event {
                        Some(envelope) => Box::pin(self.write_events(socket, envelope)).await,
                        None => return End::TransportError,
                    },
                    incoming = socket.recv() => match live.heard(incoming) {
                        Ok(Incoming::Text(text)) => Box::pin(self.on_text(socket, text)).await,
                        Ok(Incoming::Pong) => Ok(()),
                        Ok(Incoming::Binary(_)) => {
                            Box::pin(self.error(socket, None, ErrorCode::UnsupportedFrame, "binary frames are not supported; send JSON text")).await
                        }
                        Ok(Incoming::Ping(payload)) => {
                            socket.queue_pong(&payload);
                            Box::pin(self.bounded(socket.flush())).await
                        }
                        Ok(Incoming::Close) => return End::ClientClosed,
                        Err(RecvError::TooLarge) => {
                            let limit = self.app.config.limits.max_frame_bytes;
                            let message = format!("frames are limited to {limit} bytes");
                            let _ = Box::pin(self.error(socket, None, ErrorCode::FrameTooLarge, &message)).await;
                            return End::FrameTooLarge;
                        }
                        Err(RecvError::Protocol(_)) => return End::ProtocolError,
                        Err(RecvError::InvalidUtf8) => return End::InvalidUtf8,
                        Err(RecvError::Gone) => return End::TransportError,
                    },
                };
                if let Err(Gone(end)) = step {
                    return end;
                }
            }
        }
    }

    /// Writes `first` and whatever else is queued, then flushes once.
    async fn write_events(&mut self, socket: &mut WsSocket, first: Arc<Envelope>) -> Sent {
        let mut next = Some(first);
        let mut written = 0u64;
        while let Some(envelope) = next.take() {
            self.handle.taken(&envelope);
            match self.advance(&envelope) {
                Step::Sent => {}
                Step::Next => {
                    write(socket, &envelope, self.dialect);
                    written += 1;
                }
                Step::Gap { after, before } => {
                    if let Event::Message(message) = &envelope.event {
                        written += Box::pin(self.fill(socket, message, after, before)).await?;
                        self.advance(&envelope);
                    }
                    write(socket, &envelope, self.dialect);
                    written += 1;
                }
            }
            if written < WRITE_BATCH as u64 && socket.pending() < WRITE_BATCH_BYTES {
                next = self.rx.try_recv().ok();
            }
        }
        self.bounded(socket.flush()).await?;
        self.app.metrics.frames_out.inc_by(written);
        Ok(())
    }

    /// Where `envelope` stands against this connection's position in its room, moving the
    /// position past it when it is the next message. Events other than stored messages are
    /// always `Next`; a message of a room the connection left is `Sent` (nothing more to
    /// get there).
    fn advance(&mut self, envelope: &Envelope) -> Step {
        let Event::Message(message) = &envelope.event else {
            return Step::Next;
        };
        let Some(cursor) = self.rooms.get_mut(&message.room) else {
            return Step::Sent;
        };
        let step = cursor.step(message.seq);
        if step == Step::Next {
            cursor.sent(message.seq);
        }
        step
    }

    /// Writes the messages of `message`'s room after `after` and before `before` (the
    /// gap ahead of `message`), read from the room cache or the store, and returns how many.
    /// A gap that cannot be read whole ends the connection with 4009: the client
    /// reconnects and recovers from its last `seq`.
    async fn fill(
        &mut self,
        socket: &mut WsSocket,
        message: &Message,
        after: u64,
        before: u64,
    ) -> Result<u64, Gone> {
        let metrics = Arc::clone(&self.app.metrics);
        metrics.stream_gaps.get_or_create(&AT_CONNECTION).inc();
        let missing = before - after - 1;
        let read = if missing > self.app.config.limits.max_replay as u64 {
            None
        } else {
            self.app
                .chat
                .hub()
                .messages_between(&message.room, after, before - 1)
                .await
                .ok()
        };
        let whole = read.filter(|page| {
            page.len() as u64 == missing
                && page.iter().zip(after + 1..).all(|(m, seq)| m.seq == seq)
        });
        let Some(page) = whole else {
            tracing::warn!(room = %message.room, after, before, "cannot fill a connection's gap; asking it to resync");
            metrics.stream_resyncs.get_or_create(&AT_CONNECTION).inc();
            return Err(Gone(End::Resync));
        };
        metrics
            .stream_filled
            .get_or_create(&AT_CONNECTION)
            .inc_by(missing);
        for m in page {
            let envelope = Envelope::new(Event::Message(m));
            self.advance(&envelope);
            write(socket, &envelope, self.dialect);
        }
        Ok(missing)
    }

    /// Sends one frame now.
    async fn send(&self, socket: &mut WsSocket, bytes: Bytes) -> Sent {
        socket.queue_text(&bytes);
        self.bounded(socket.flush()).await?;
        self.app.metrics.frames_out.inc();
        Ok(())
    }

    /// Runs a socket write unless the client is kicked or stalls for [`WRITE_TIMEOUT`]. The
    /// write is tried first: one that completes at once never registers a wait for the kick.
    async fn bounded(&self, write: impl Future<Output = std::io::Result<()>>) -> Sent {
        tokio::select! {
            biased;
            result = tokio::time::timeout(WRITE_TIMEOUT, write) => match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Gone(End::TransportError)),
                Err(_) => Err(Gone(End::SlowConsumer)),
            },
            () = self.handle.kicked() => Err(Gone(kicked_end(&self.handle))),
        }
    }

    async fn error(
        &self,
        socket: &mut WsSocket,
        reply_to: ReplyTo,
        code: ErrorCode,
        message: &str,
    ) -> Sent {
        self.app.metrics.client_error(code.as_str());
        let frame =
            json!({ "type": "error", "code": code, "message": message, "replyTo": reply_to });
        self.send(socket, to_bytes(&frame)).await
    }

    async fn service_error(
        &self,
        socket: &mut WsSocket,
        reply_to: ReplyTo,
        e: &ServiceError,
    ) -> Sent {
        if let ServiceError::Unavailable(cause) = e {
            tracing::warn!(error = %cause, "store unavailable");
        }
        self.error(socket, reply_to, e.code(), &e.to_string()).await
    }

    async fn on_text(&mut self, socket: &mut WsSocket, raw: String) -> Sent {
        self.app.metrics.frames_in.inc();
        let raw = raw.as_str();
        // Every frame counts against the rate, garbage included.
        if self.limiter.check().is_err() {
            let rate = self.frame_rate;
            let reply_to = serde_json::from_str::<Head<'_>>(raw)
                .ok()
                .and_then(|h| h.id)
                .filter(|id| id.is_string() || id.is_number());
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::RateLimited,
                    &format!("more than {rate} frames per second; slow down"),
                )
                .await;
        }
        let head: Head<'_> = match serde_json::from_str(raw) {
            Ok(h) => h,
            Err(e) if e.is_data() => {
                return self
                    .error(
                        socket,
                        None,
                        ErrorCode::InvalidFrame,
                        "a frame must be a JSON object with a string `type`",
                    )
                    .await;
            }
            Err(_) => {
                return self
                    .error(
                        socket,
                        None,
                        ErrorCode::InvalidJson,
                        "frame is not valid JSON",
                    )
                    .await;
            }
        };
        let reply_to = match head.id {
            None | Some(Value::String(_) | Value::Number(_)) => head.id,
            Some(_) => {
                return self
                    .error(
                        socket,
                        None,
                        ErrorCode::InvalidFrame,
                        "`id` must be a string or a number",
                    )
                    .await;
            }
        };
        let Some(kind) = head.kind else {
            return self
                .error(socket, reply_to, ErrorCode::InvalidFrame, "missing `type`")
                .await;
        };
        // Each frame type: parse its fields, then hand it to its handler; a frame whose
        // fields do not parse gets `invalid_frame` naming the field.
        macro_rules! handle {
            ($frame:ty, $handler:ident) => {
                match parse::<$frame>(raw) {
                    Ok(f) => self.$handler(socket, f, reply_to).await,
                    Err(m) => {
                        self.error(socket, reply_to, ErrorCode::InvalidFrame, &m)
                            .await
                    }
                }
            };
        }
        // A `?roomId=` room still waiting for the client to say who it is: any frame but a
        // `join-room` (which joins it itself) joins it first.
        if kind != "join-room"
            && let Some(room) = self.pending_join.take()
        {
            Box::pin(self.auto_join(socket, room.to_string())).await?;
        }
        match kind.as_ref() {
            "join-room" => handle!(JoinRoom, join),
            "send-message" => handle!(SendMessage, send_message),
            "leave-room" => handle!(RoomRef, leave),
            "history" => handle!(History, history),
            "typing" => handle!(Typing, typing),
            "read" => handle!(Read, read),
            "presence" => handle!(RoomRef, presence),
            "auth" => handle!(Auth, auth),
            "ai-chat" => handle!(AskBody, ai_chat),
            "ai-stream" => handle!(AskBody, ai_stream),
            "escalate" => handle!(EscalateFrame, escalate),
            "assign" => handle!(AgentFrame, assign),
            "transfer" => handle!(AgentFrame, transfer),
            "unassign" => handle!(RoomRef, unassign),
            "resolve" => handle!(RoomRef, resolve),
            "note" => handle!(NoteFrame, note),
            "subscribe-inbox" => handle!(SubscribeInbox, subscribe_inbox),
            "unsubscribe-inbox" => {
                let was = self.app.handoff.unsubscribe(&self.handle);
                let frame =
                    json!({ "type": "inbox-unsubscribed", "replyTo": reply_to, "subscribed": was });
                self.send(socket, to_bytes(&frame)).await
            }
            "ping" => {
                let frame =
                    json!({ "type": "pong", "timestamp": iso(now_ms()), "replyTo": reply_to });
                self.send(socket, to_bytes(&frame)).await
            }
            other => {
                let message = format!("unknown frame type {:?}", truncate(other, 64));
                self.error(socket, reply_to, ErrorCode::UnknownType, &message)
                    .await
            }
        }
    }

    /// `auth`: an anonymous connection becomes the token's identity. Allowed once, within
    /// [`AUTH_FRAME_WINDOW`] of connecting and before joining any room, so no room ever saw
    /// the connection under another identity.
    async fn auth(&mut self, socket: &mut WsSocket, f: Auth, reply_to: ReplyTo) -> Sent {
        if !self.handle.identity().anonymous
            || !self.rooms.is_empty()
            || Instant::now() > self.auth_until
        {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::AuthNotAllowed,
                    "send `auth` once, first, within 10 s of connecting, before joining a room",
                )
                .await;
        }
        if f.token.is_empty() {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::InvalidFrame,
                    "`token` must not be empty",
                )
                .await;
        }
        let identity = match self.app.auth.identify(Some(&f.token)).await {
            Ok(identity) => identity,
            Err(e) => {
                let message = e.to_string();
                return self.error(socket, reply_to, e.code(), &message).await;
            }
        };
        if !self
            .app
            .edge
            .origin_allowed(&identity.domain_id, self.origin.as_deref())
        {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::OriginNotAllowed,
                    "this origin may not use the domain (allowed_origins)",
                )
                .await;
        }
        let frame = json!({
            "type": "authenticated",
            "replyTo": reply_to,
            "userId": identity.user_id,
            "userName": identity.name,
            "role": identity.role.as_str(),
            "domainId": &*identity.domain_id,
        });
        // The connection now counts against the new domain's limits.
        let admitted = if identity.domain_id == self.handle.identity().domain_id {
            None
        } else {
            let Some(admitted) = admit_to_domain(&self.app, &identity) else {
                return self
                    .error(socket, reply_to, ErrorCode::TooManyConnections, DOMAIN_FULL)
                    .await;
            };
            Some(admitted)
        };
        self.rebind(identity, admitted);
        self.settled = true;
        self.display_name = None;
        self.current_room = None;
        self.send(socket, to_bytes(&frame)).await
    }

    /// Makes `identity` the connection's, in a room-less connection: a new handle and
    /// queue, counted among its online users and, when `admitted` (to another domain),
    /// against that domain's limits.
    fn rebind(&mut self, identity: Identity, admitted: Option<(DomainPermit, Admitted)>) {
        if let Some((permit, admitted)) = admitted {
            self.permits.1 = permit;
            self.limiter = admitted.limiter;
            self.frame_rate = admitted.frame_rate;
        }
        let (handle, rx) = ConnHandle::bounded(
            self.handle.id(),
            Arc::new(identity),
            self.app.config.limits.outbound_queue,
            self.app.config.limits.outbound_queue_bytes,
        );
        self.handle = handle;
        self.rx = rx;
        let who = self.handle.identity();
        self.online = self.app.shared.online(who, who.role.as_str());
        self.dialect = dialect_of(&self.app, who);
    }

    /// A token-less connection's first `join-room`: the identity its fields settle
    /// ([`crate::auth::Authenticator::settle`]) becomes the connection's. The `?roomId=`
    /// room joined at connect is left under the old identity and, in the same domain, kept
    /// with what the client was sent there (the join that follows sends only what is
    /// missing); a room of the domain it leaves is forgotten.
    async fn settle(&mut self, socket: &mut WsSocket, f: &JoinRoom) -> Result<Sent, ServiceError> {
        let current = Arc::clone(self.handle.identity());
        let claimed = crate::auth::Claimed {
            domain_id: f.domain_id.as_deref(),
            user_id: f.user_id.as_deref(),
            user_name: f.user_name.as_deref(),
            role: f.role.as_deref(),
        };
        let identity = self
            .app
            .auth
            .settle(&current, claimed, self.origin.as_deref())?;
        if identity == *current {
            self.settled = true;
            return Ok(Ok(()));
        }
        // Admitted to the new domain first: a refusal leaves everything as it was.
        let admitted = if identity.domain_id == current.domain_id {
            None
        } else {
            Some(
                admit_to_domain(&self.app, &identity).ok_or_else(|| ServiceError::Conflict {
                    code: ErrorCode::TooManyConnections,
                    message: DOMAIN_FULL.to_owned(),
                })?,
            )
        };
        self.settled = true;
        let domain = Arc::clone(&identity.domain_id);
        for key in self.rooms.keys() {
            self.app.chat.leave(&self.handle, &key);
        }
        // What the old queue holds still goes out, in order, before the queue is replaced;
        // the positions it moves are the ones kept.
        while let Ok(envelope) = self.rx.try_recv() {
            if let Err(gone) = Box::pin(self.write_events(socket, envelope)).await {
                return Ok(Err(gone));
            }
        }
        let joined = self.rooms.take();
        self.rebind(identity, admitted);
        // The current room stays the one named (a `join-room` without `roomId` joins it
        // in the new domain). A room of the same domain is joined again as the new
        // identity, from where the connection stands: what came meanwhile is written now.
        for (key, cursor) in joined {
            if key.domain_id != domain {
                continue;
            }
            let rejoined = self
                .app
                .chat
                .join(&self.handle, &key.room_id, Replay::Since(cursor.upto), None)
                .await?;
            self.rooms.insert(key, cursor);
            for m in rejoined.history {
                let envelope = Envelope::new(Event::Message(m));
                if self.advance(&envelope) == Step::Next {
                    write(socket, &envelope, self.dialect);
                }
            }
            if let Err(gone) = self.bounded(socket.flush()).await {
                return Ok(Err(gone));
            }
        }
        Ok(Ok(()))
    }

    /// The key of the room a frame refers to: its `roomId`, else the current room.
    fn room_of(&self, room_id: Option<&str>) -> Result<RoomKey, ServiceError> {
        let id = self.target_room(room_id)?;
        self.app.chat.room_key(self.handle.identity(), &id)
    }

    /// Like [`Self::room_of`], for a room this connection has joined.
    fn joined_room(&self, room_id: Option<&str>) -> Result<RoomKey, ServiceError> {
        let key = self.room_of(room_id)?;
        if self.rooms.contains(&key) {
            Ok(key)
        } else {
            Err(not_joined())
        }
    }

    /// The room a frame refers to: its `roomId`, else the current room.
    fn target_room(&self, room_id: Option<&str>) -> Result<String, ServiceError> {
        match room_id {
            Some(r) => Ok(r.to_owned()),
            None => self
                .current_room
                .as_deref()
                .map(str::to_owned)
                .ok_or_else(not_joined),
        }
    }

    /// Joins `room` as the `?roomId=` of the upgrade asked.
    async fn auto_join(&mut self, socket: &mut WsSocket, room: String) -> Sent {
        let frame = JoinRoom {
            room_id: Some(room),
            auto: true,
            ..JoinRoom::default()
        };
        self.join(socket, frame, None).await
    }

    async fn join(&mut self, socket: &mut WsSocket, mut f: JoinRoom, reply_to: ReplyTo) -> Sent {
        // The `?roomId=` room still waiting: this is the join it waited for (a `join-room`
        // naming no room joins it), and another room named here comes first.
        let pending = if f.auto {
            None
        } else {
            self.pending_join.take()
        };
        if let Some(room) = &pending
            && f.room_id.is_none()
        {
            f.room_id = Some(room.to_string());
        }
        // This frame asks for the waiting room itself (joined or refused, it is answered).
        let asks_for_it = pending
            .as_deref()
            .is_some_and(|room| f.room_id.as_deref() == Some(room));
        let sent = Box::pin(self.join_now(socket, f, reply_to)).await;
        match pending {
            // Still nobody (the frame was refused before it said who): it waits on.
            Some(room) if !self.settled => {
                self.pending_join = Some(room);
                sent
            }
            Some(_) if asks_for_it => sent,
            Some(room) if sent.is_ok() => Box::pin(self.auto_join(socket, room.to_string())).await,
            _ => sent,
        }
    }

    async fn join_now(&mut self, socket: &mut WsSocket, f: JoinRoom, reply_to: ReplyTo) -> Sent {
        if !self.settled && !f.auto {
            match self.settle(socket, &f).await {
                Ok(sent) => sent?,
                Err(e) => return self.service_error(socket, reply_to, &e).await,
            }
        }
        let identity = Arc::clone(self.handle.identity());
        // A token's domain is the token's (a `domainId` beside it is not read); a
        // token-less connection stays in the domain its first `join-room` settled.
        if identity.anonymous
            && let Some(d) = f.domain_id.as_deref()
            && d != &*identity.domain_id
        {
            let message = format!(
                "this connection is in domain {:?}; use another connection for another domain",
                &*identity.domain_id
            );
            return self
                .error(socket, reply_to, ErrorCode::Forbidden, &message)
                .await;
        }
        if let Some(role) = f.role.as_deref()
            && let Err(m) = policy::message_role(&identity, Some(role))
        {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::Forbidden,
                    &format!("{m}; roles come from the token"),
                )
                .await;
        }
        let Ok(room_id) = self.target_room(f.room_id.as_deref()) else {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::InvalidFrame,
                    "missing `roomId`",
                )
                .await;
        };
        let key = match self.app.chat.room_key(&identity, &room_id) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let max_rooms = self.app.config.limits.rooms_per_connection;
        if !self.rooms.contains(&key) && self.rooms.len() >= max_rooms {
            let message = format!("a connection may join at most {max_rooms} rooms");
            return self
                .error(socket, reply_to, ErrorCode::TooManyRooms, &message)
                .await;
        }
        if identity.anonymous
            && let Some(name) = f.user_name.as_deref().filter(|n| !n.trim().is_empty())
        {
            self.display_name = Some(name.chars().take(MAX_NAME_CHARS).collect());
        }
        // The browser is kept only until the first join (the widget sends its context
        // then), not for the connection's whole life.
        let browser = self.browser.take();
        let context = f
            .context
            .as_ref()
            .filter(|_| identity.role == Role::Visitor)
            .and_then(|c| visitor_context(c, browser.as_deref()));
        let profile = (f.user_name.is_some() || f.customer_data.is_some() || context.is_some())
            .then(|| CustomerProfile {
                name: f.user_name.clone(),
                data: f.customer_data.clone().filter(Value::is_object),
                context,
            });
        // A room the connection is in already: only what it was never sent.
        let already = self.rooms.get(&key);
        let replay = match (already, f.since) {
            (Some(cursor), since) => Replay::Again { cursor, since },
            (None, Some(s)) => Replay::Since(s),
            (None, None) => Replay::Last(self.app.config.limits.history_on_join),
        };
        let joined = match self
            .app
            .chat
            .join(&self.handle, &room_id, replay, profile)
            .await
        {
            Ok(j) => j,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        self.current_room = Some(key.room_id.clone());
        let status = match self.app.handoff.status_of(&key).await {
            Some(c) => Some((c, self.app.handoff.service(&key.domain_id).await)),
            None => None,
        };
        let mut sent = self
            .send_joined(socket, &key, &joined, status.as_ref(), reply_to)
            .await;
        // A reply the assistant is streaming: its text so far, then the deltas that follow
        // (a delta whose index is not above this one's repeats text already given).
        if let (Ok(()), Some(partial)) = (&sent, self.app.ai.partial(&key)) {
            let frame = json!({
                "type": "message-delta",
                "roomId": &*key.room_id,
                "messageId": &*partial.message_id,
                "delta": partial.text,
                "index": partial.index,
                "catchUp": true,
            });
            sent = self.send(socket, to_bytes(&frame)).await;
        }
        let cursor = already.map_or_else(|| Cursor::of(&joined), |c| c.rejoined(&joined));
        // Under the hub's own key, which every message delivered here carries too.
        self.rooms
            .insert(self.app.chat.hub().canonical(key), cursor);
        sent
    }

    /// `room-joined`, then the catch-up as one or more `message-history` frames, written
    /// before anything from the queue so the client sees the room in `seq` order.
    async fn send_joined(
        &self,
        socket: &mut WsSocket,
        key: &RoomKey,
        joined: &Joined,
        status: Option<&(Arc<Conversation>, Service)>,
        reply_to: ReplyTo,
    ) -> Sent {
        let members: Vec<WireUser<'_>> = joined.members.iter().map(WireUser::from).collect();
        let mut frame = json!({
            "type": "room-joined",
            "roomId": &*key.room_id,
            "replyTo": reply_to,
            "lastSeq": joined.last_seq,
            "members": members,
            "memberCount": joined.member_count,
            // So that a client can count what it may send (the widget's counter) instead
            // of learning it from a refusal.
            "limits": { "messageBytes": self.app.config.limits.max_message_bytes },
            "timestamp": iso(now_ms()),
        });
        // A support room says where it stands in the hand-off, and who answers there.
        if let Some((c, service)) = status {
            frame["status"] = c.status.as_str().into();
            frame["assignee"] = c.assignee.as_ref().map_or(Value::Null, agent_json);
            frame["service"] = json!({
                "assistant": service.assistant,
                "people": service.people,
                "open": service.open,
            });
        }
        socket.queue_text(&to_bytes(&frame));
        let chunk = self.app.config.limits.replay_chunk;
        let mut chunks = joined.history.chunks(chunk).peekable();
        if chunks.peek().is_none() {
            let frame = json!({ "type": "message-history", "roomId": &*key.room_id, "messages": [], "truncated": joined.truncated, "more": false });
            socket.queue_text(&to_bytes(&frame));
        }
        while let Some(part) = chunks.next() {
            let messages: Vec<WireMessage<'_>> = part.iter().map(|m| WireMessage::of(m)).collect();
            let frame = json!({
                "type": "message-history",
                "roomId": &*key.room_id,
                "messages": messages,
                "truncated": joined.truncated,
                "more": chunks.peek().is_some(),
            });
            socket.queue_text(&to_bytes(&frame));
        }
        self.bounded(socket.flush()).await
    }

    async fn send_message(
        &mut self,
        socket: &mut WsSocket,
        f: SendMessage,
        reply_to: ReplyTo,
    ) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let identity = Arc::clone(self.handle.identity());
        self.app
            .handoff
            .take_on_reply(&identity, &key.room_id)
            .await;
        // Before the message is stored: the assistant's reply to it is charged to the
        // address it came from. Noted here, not at connect, so idle listeners cost nothing.
        if let Some(ip) = self.address {
            self.app.ai.note_visitor_address(&identity, ip);
        }
        let out = Outgoing {
            room_id: &key.room_id,
            text: f.message,
            client_message_id: f.client_message_id,
            role: f.role.as_deref(),
            display_name: self.display_name.as_deref(),
            data: f.data,
        };
        match self.app.chat.send(&identity, out).await {
            Ok(appended) => {
                let m = &appended.message;
                let frame = Ack {
                    kind: "message-ack",
                    reply_to: reply_to.as_ref(),
                    id: &m.id,
                    room_id: &m.room.room_id,
                    seq: m.seq,
                    client_message_id: m.client_message_id.as_deref(),
                    duplicate: appended.duplicate,
                    timestamp: iso(m.created_at),
                };
                socket.queue_text(&to_bytes(&frame));
                self.app.metrics.frames_out.inc();
                if appended.duplicate {
                    return self.bounded(socket.flush()).await;
                }
                // If events are already queued (the sender's own `message-received`, say),
                // write them with the ack in one syscall. Do not yield to wait for them: a
                // sender that waits lets every subscriber write each message on its own, and
                // measured, that tripled the CPU per fan-out delivery.
                match self.rx.try_recv() {
                    Ok(envelope) => self.write_events(socket, envelope).await,
                    Err(_) => self.bounded(socket.flush()).await,
                }
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    async fn leave(&mut self, socket: &mut WsSocket, f: RoomRef, reply_to: ReplyTo) -> Sent {
        let key = match self.room_of(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        if !self.rooms.remove(&key) {
            return self.service_error(socket, reply_to, &not_joined()).await;
        }
        self.app.chat.leave(&self.handle, &key);
        if self.current_room.as_deref() == Some(&*key.room_id) {
            self.current_room = None;
        }
        let frame = json!({ "type": "room-left", "roomId": &*key.room_id, "replyTo": reply_to });
        self.send(socket, to_bytes(&frame)).await
    }

    async fn history(&mut self, socket: &mut WsSocket, f: History, reply_to: ReplyTo) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let room_id = &*key.room_id;
        let identity = Arc::clone(self.handle.identity());
        let limit = f.limit.unwrap_or(50);
        match self
            .app
            .chat
            .history(&identity, room_id, f.before, limit)
            .await
        {
            Ok((page, has_more)) => {
                let messages: Vec<WireMessage<'_>> = page.iter().map(WireMessage::of).collect();
                let frame = json!({
                    "type": "history",
                    "replyTo": reply_to,
                    "roomId": room_id,
                    "messages": messages,
                    "hasMore": has_more,
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    async fn typing(&mut self, socket: &mut WsSocket, f: Typing, reply_to: ReplyTo) -> Sent {
        let result = self.room_of(f.room_id.as_deref()).and_then(|key| {
            self.app
                .chat
                .typing(&self.handle, &key, f.is_typing.unwrap_or(true))
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    /// `ai-chat` → one `ai-response` when the answer is complete.
    async fn ai_chat(&mut self, socket: &mut WsSocket, f: AskBody, reply_to: ReplyTo) -> Sent {
        self.ai(socket, f, reply_to, false).await
    }

    /// `ai-stream` → `ai-stream-start`, `ai-stream-delta`…, `ai-stream-end`.
    async fn ai_stream(&mut self, socket: &mut WsSocket, f: AskBody, reply_to: ReplyTo) -> Sent {
        self.ai(socket, f, reply_to, true).await
    }

    /// Starts an answer; a task of its own sends it, so the connection keeps serving frames
    /// meanwhile. The answer stops when the connection ends.
    async fn ai(
        &mut self,
        socket: &mut WsSocket,
        f: AskBody,
        reply_to: ReplyTo,
        stream: bool,
    ) -> Sent {
        let conversation = f.conversation_id.clone();
        let started = match f.caller(&self.app, self.handle.identity(), self.origin.as_deref()) {
            Ok(me) => self.app.ai.ask(&me, f.into_ask(), self.address).await,
            Err(e) => Err(e),
        };
        let mut events = match started {
            Ok(events) => events,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let handle = self.handle.clone();
        let reply_to: Option<Value> = reply_to;
        let stream_id = format!("ai-{}", uuid::Uuid::now_v7().simple());
        tokio::spawn(async move {
            let push = |frame: Value| {
                !handle.is_closed() && handle.push(Envelope::new(Event::Frame(to_bytes(&frame))))
            };
            let mut gathered = super::ai::Gathered::default();
            let mut index = 0;
            while let Some(event) = events.recv().await {
                gathered.add(&event);
                if !stream {
                    if handle.is_closed() {
                        return;
                    }
                    continue;
                }
                let mut v = super::ai::event_json(&event, &mut index);
                let kind = match v["type"].as_str() {
                    Some("start") => "ai-stream-start",
                    Some("delta") => "ai-stream-delta",
                    Some("fallback") => "ai-stream-fallback",
                    _ => continue,
                };
                v["type"] = kind.into();
                v["streamId"] = stream_id.as_str().into();
                v["replyTo"] = reply_to.clone().unwrap_or(Value::Null);
                if !push(v) {
                    return;
                }
            }
            let mut end = gathered.answer();
            end["type"] = if stream {
                "ai-stream-end"
            } else {
                "ai-response"
            }
            .into();
            end["replyTo"] = reply_to.unwrap_or(Value::Null);
            if stream {
                end["streamId"] = stream_id.into();
            }
            if let Some(id) = conversation {
                end["conversationId"] = id.into();
            }
            push(end);
        });
        Ok(())
    }

    async fn read(&mut self, socket: &mut WsSocket, f: Read, reply_to: ReplyTo) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let room_id = &*key.room_id;
        let identity = Arc::clone(self.handle.identity());
        match self.app.chat.mark_read(&identity, room_id, f.seq).await {
            Ok(seq) => {
                let frame = json!({
                    "type": "read-receipt",
                    "replyTo": reply_to,
                    "roomId": room_id,
                    "userId": identity.user_id,
                    "seq": seq,
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    async fn presence(&mut self, socket: &mut WsSocket, f: RoomRef, reply_to: ReplyTo) -> Sent {
        let key = match self.joined_room(f.room_id.as_deref()) {
            Ok(k) => k,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        let room_id = &*key.room_id;
        let users = self.app.chat.hub().presence_all(&key).await;
        let members: Vec<WireUser<'_>> = users.iter().map(WireUser::from).collect();
        let frame = json!({ "type": "presence", "replyTo": reply_to, "roomId": room_id, "members": members });
        self.send(socket, to_bytes(&frame)).await
    }
}

impl Connection {
    /// Runs a hand-off action on the frame's room (or the current one) and answers with the
    /// room's state.
    async fn handoff(
        &mut self,
        socket: &mut WsSocket,
        room_id: Option<&str>,
        action: Action,
        reply_to: ReplyTo,
    ) -> Sent {
        let identity = Arc::clone(self.handle.identity());
        let result = match self.target_room(room_id) {
            Ok(room) => self.app.handoff.act(&identity, &room, action).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                let frame = json!({
                    "type": "room-status",
                    "replyTo": reply_to,
                    "roomId": &*outcome.conversation.room.room_id,
                    "seq": outcome.seq,
                    "changed": outcome.changed,
                    "conversation": conversation_json(&outcome.conversation),
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    async fn escalate(
        &mut self,
        socket: &mut WsSocket,
        f: EscalateFrame,
        reply_to: ReplyTo,
    ) -> Sent {
        let action = Action::Escalate { reason: f.reason };
        self.handoff(socket, f.room_id.as_deref(), action, reply_to)
            .await
    }

    async fn assign(&mut self, socket: &mut WsSocket, f: AgentFrame, reply_to: ReplyTo) -> Sent {
        let agent = f.agent_id.map(|user_id| AgentRef {
            user_id,
            name: f.agent_name,
        });
        self.handoff(
            socket,
            f.room_id.as_deref(),
            Action::Assign(agent),
            reply_to,
        )
        .await
    }

    async fn transfer(&mut self, socket: &mut WsSocket, f: AgentFrame, reply_to: ReplyTo) -> Sent {
        let Some(user_id) = f.agent_id else {
            return self
                .error(
                    socket,
                    reply_to,
                    ErrorCode::InvalidFrame,
                    "invalid frame: missing field `agentId`",
                )
                .await;
        };
        let agent = AgentRef {
            user_id,
            name: f.agent_name,
        };
        self.handoff(
            socket,
            f.room_id.as_deref(),
            Action::Transfer(agent),
            reply_to,
        )
        .await
    }

    async fn unassign(&mut self, socket: &mut WsSocket, f: RoomRef, reply_to: ReplyTo) -> Sent {
        self.handoff(socket, f.room_id.as_deref(), Action::Unassign, reply_to)
            .await
    }

    async fn resolve(&mut self, socket: &mut WsSocket, f: RoomRef, reply_to: ReplyTo) -> Sent {
        self.handoff(socket, f.room_id.as_deref(), Action::Resolve, reply_to)
            .await
    }

    async fn note(&mut self, socket: &mut WsSocket, f: NoteFrame, reply_to: ReplyTo) -> Sent {
        let identity = Arc::clone(self.handle.identity());
        let result = match self.target_room(f.room_id.as_deref()) {
            Ok(room) => self.app.handoff.add_note(&identity, &room, &f.text).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(note) => {
                let frame = json!({
                    "type": "note-added",
                    "replyTo": reply_to,
                    "roomId": &*note.room.room_id,
                    "note": note_json(&note),
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }

    async fn subscribe_inbox(
        &mut self,
        socket: &mut WsSocket,
        f: SubscribeInbox,
        reply_to: ReplyTo,
    ) -> Sent {
        let statuses = match parse_statuses(f.status.as_deref()) {
            Ok(s) => s,
            Err(e) => return self.service_error(socket, reply_to, &e).await,
        };
        match self.app.handoff.subscribe(&self.handle, statuses).await {
            Ok(entries) => {
                let list: Vec<Value> = entries.iter().map(|e| inbox_entry_json(e, true)).collect();
                let agents: Vec<Value> = self
                    .app
                    .handoff
                    .agents_online(&self.handle.identity().domain_id)
                    .await
                    .iter()
                    .map(agent_json)
                    .collect();
                let frame = json!({
                    "type": "inbox",
                    "replyTo": reply_to,
                    "conversations": list,
                    "agents": agents,
                });
                self.send(socket, to_bytes(&frame)).await
            }
            Err(e) => self.service_error(socket, reply_to, &e).await,
        }
    }
}

/// The statuses an inbox filter names: `open` (all but resolved; the default), `all`, or
/// one status.
pub fn parse_statuses(filter: Option<&str>) -> Result<Vec<RoomStatus>, ServiceError> {
    match filter.unwrap_or("open") {
        "open" => Ok(vec![
            RoomStatus::Bot,
            RoomStatus::Waiting,
            RoomStatus::Assigned,
        ]),
        "all" => Ok(Vec::new()),
        other => RoomStatus::parse(other).map(|s| vec![s]).ok_or_else(|| {
            ServiceError::invalid(
                ErrorCode::InvalidStatus,
                "status must be open, all, bot, waiting, assigned or resolved",
            )
        }),
    }
}

/// `s` cut to at most `max` characters.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parses a frame body; the error says which field is wrong, without echoing the input.
fn parse<'a, T: Deserialize<'a>>(raw: &'a str) -> Result<T, String> {
    serde_json::from_str(raw).map_err(|e| {
        let text = e.to_string();
        let text = text.split(" at line").next().unwrap_or("invalid frame");
        format!("invalid frame: {}", truncate(text, 200))
    })
}

/// `message-ack`, the hottest reply: a typed struct rather than a JSON map.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    reply_to: Option<&'a Value>,
    id: &'a str,
    room_id: &'a str,
    seq: u64,
    client_message_id: Option<&'a str>,
    duplicate: bool,
    timestamp: String,
}

/// The fields every frame may have.
#[derive(Debug, Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    id: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JoinRoom {
    room_id: Option<String>,
    since: Option<u64>,
    /// A client without a token: the domain it wants (a public one, or the demo).
    domain_id: Option<String>,
    /// A client without a token, in a domain that lets clients name themselves: its id.
    user_id: Option<String>,
    user_name: Option<String>,
    customer_data: Option<Value>,
    /// Where a visitor is: `{page, title, referrer, language, timeZone}` (the widget's).
    context: Option<Value>,
    /// Checked, never granted.
    role: Option<String>,
    /// The `?roomId=` join at connect (it settles nobody's identity).
    #[serde(skip)]
    auto: bool,
}

/// The longest value kept of a visitor's context, in characters.
const MAX_CONTEXT_CHARS: usize = 512;

/// The fields of `join-room`'s `context` that are kept, as sent.
const CONTEXT_FIELDS: [&str; 5] = ["page", "title", "referrer", "language", "timeZone"];

/// A visitor's context as stored: the known string fields of what the client sent (each cut
/// to [`MAX_CONTEXT_CHARS`]) and the browser the server saw; `None` when `sent` is no
/// object. Anything else in `sent` is dropped.
fn visitor_context(sent: &Value, browser: Option<&str>) -> Option<Value> {
    let sent = sent.as_object()?;
    let mut context = serde_json::Map::new();
    for field in CONTEXT_FIELDS {
        if let Some(text) = sent.get(field).and_then(Value::as_str)
            && !text.trim().is_empty()
        {
            context.insert(field.into(), truncate(text, MAX_CONTEXT_CHARS).into());
        }
    }
    if let Some(browser) = browser {
        context.insert("browser".into(), browser.into());
    }
    Some(Value::Object(context))
}

#[derive(Debug, Deserialize)]
struct Auth {
    token: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendMessage {
    room_id: Option<String>,
    message: String,
    client_message_id: Option<String>,
    role: Option<String>,
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomRef {
    room_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EscalateFrame {
    room_id: Option<String>,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentFrame {
    room_id: Option<String>,
    agent_id: Option<String>,
    agent_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NoteFrame {
    room_id: Option<String>,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscribeInbox {
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct History {
    room_id: Option<String>,
    before: Option<u64>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Typing {
    room_id: Option<String>,
    is_typing: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Read {
    room_id: Option<String>,
    seq: u64,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Every decoder a client frame can reach: the head, then each frame type's fields.
    fn decode_all(raw: &str) {
        let _ = serde_json::from_str::<Head<'_>>(raw);
        let _ = parse::<JoinRoom>(raw);
        let _ = parse::<Auth>(raw);
        let _ = parse::<SendMessage>(raw);
        let _ = parse::<RoomRef>(raw);
        let _ = parse::<EscalateFrame>(raw);
        let _ = parse::<AgentFrame>(raw);
        let _ = parse::<NoteFrame>(raw);
        let _ = parse::<SubscribeInbox>(raw);
        let _ = parse::<History>(raw);
        let _ = parse::<Typing>(raw);
        let _ = parse::<Read>(raw);
        let _ = parse::<AskBody>(raw);
    }

    /// Any JSON value, nested a few levels, with the frames' own keys likely.
    fn json() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("type".to_owned()),
            Just("id".to_owned()),
            Just("roomId".to_owned()),
            Just("since".to_owned()),
            Just("seq".to_owned()),
            Just("content".to_owned()),
            Just("data".to_owned()),
            Just("token".to_owned()),
            Just("message".to_owned()),
            ".{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,20}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_frame_decoders_take_any_json(value in json()) {
            decode_all(&value.to_string());
        }

        #[test]
        fn the_frame_decoders_take_any_text(
            value in json(),
            cut in any::<usize>(),
            noise in ".{0,16}",
        ) {
            // Truncated and spliced JSON: the malformed frames a client really sends.
            let text = value.to_string();
            let mut at = cut % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            decode_all(&format!("{}{noise}{}", &text[..at], &text[at..]));
            decode_all(&text[..at]);
        }

        #[test]
        fn a_valid_send_message_reads_back(
            room in "[A-Za-z0-9_-]{1,20}",
            content in ".{0,200}",
            id in any::<u32>(),
        ) {
            let raw = json!({ "type": "send-message", "id": id, "roomId": room, "message": content })
                .to_string();
            let head: Head<'_> = serde_json::from_str(&raw).unwrap();
            prop_assert_eq!(head.kind.as_deref(), Some("send-message"));
            prop_assert_eq!(head.id, Some(Value::from(id)));
            let frame = parse::<SendMessage>(&raw).unwrap();
            prop_assert_eq!(frame.room_id.as_deref(), Some(room.as_str()));
            prop_assert_eq!(frame.message, content);
        }
    }
}

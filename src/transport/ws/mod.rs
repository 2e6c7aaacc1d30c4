//! The native WebSocket transport at `/ws` (the WeeziQ protocol; see `docs/protocol.md`).
//!
//! One task per connection owns the socket. While idle it waits in one poll on two things:
//! its queue (events from the hub, a kick, a ping asked for by the node's liveness sweep)
//! and frames from the client (parsed, rate-limited, handed to the chat service,
//! answered). Events are delivered inside that poll: each passes the connection's cursor in
//! its room, the ready ones go into one write, and the write is flushed at once, with no
//! timer and no future of their own. Only a message ahead of the cursor (a gap to read
//! first) or a socket that does not take the whole write leaves the poll for the slower
//! path, which waits with a deadline (`WRITE_TIMEOUT`) and gives up on a stalled client.
//! A client frame never makes the server wait for anyone else; an invalid one gets an `error`
//! frame and nothing else happens. A `send-message` is queued for the store and the next
//! frame read at once: up to [`MAX_IN_FLIGHT`] messages are committed meanwhile and
//! acknowledged in order as their commits end; any other frame waits for them, and no event
//! is taken while one is unanswered, so a sender's own message never overtakes its ack.
//!
//! Files: `upgrade` (handshake, token, admission), `incoming` (client frames' fields),
//! `requests` (what each frame does), `agents` (hand-off frames and the inbox), `frame` and
//! `socket` (the WebSocket layer), `guided` (`/chat`); this file holds the connection's loop,
//! its writes and its liveness.

mod agents;
pub mod frame;
pub mod guided;
mod incoming;
mod liveness;
pub mod pusher;
mod requests;
pub mod socket;
mod upgrade;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use self::frame::Opcode;
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
    Parked, Receiver, Replay, Signal, Step,
};
use crate::metrics::{AT_CONNECTION, Metrics};
use crate::model::Message;
use crate::model::{Conversation, Identity, Role, RoomKey, RoomStatus, iso, now_ms};
use crate::service::ServiceError;
use crate::service::chat::{Committing, MAX_NAME_CHARS, Outgoing, not_joined};
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
/// Most of a client's messages queued for the store and not yet acknowledged; at this many
/// the connection reads no further frame until one is.
const MAX_IN_FLIGHT: usize = 128;
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

pub use agents::parse_statuses;
use incoming::*;
pub use liveness::SocketWatch;
use liveness::{Check, Liveness, Watched};
use upgrade::*;
pub use upgrade::{SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX, WsQuery, upgrade};

/// Adds `envelope` to the socket's write buffer in the connection's dialect.
fn write(socket: &mut WsSocket, envelope: &Envelope, dialect: Dialect) {
    socket.queue_text(encoded(envelope, dialect));
}

/// `envelope` in `dialect`, encoded once per dialect for every connection that writes it.
fn encoded(envelope: &Envelope, dialect: Dialect) -> &[u8] {
    let native = envelope
        .native
        .get_or_init(|| encode_event(&envelope.event));
    match dialect {
        Dialect::Native => native,
        Dialect::Eclipse => envelope.eclipse.get_or_init(|| eclipse_frame(native)),
    }
}

/// How a parked connection of `dialect` frames an event ([`Parked`]).
fn framing(dialect: Dialect) -> fn(&mut Vec<u8>, &Envelope) {
    match dialect {
        Dialect::Native => |out, envelope| {
            frame::encode(out, Opcode::Text, encoded(envelope, Dialect::Native));
        },
        Dialect::Eclipse => |out, envelope| {
            frame::encode(out, Opcode::Text, encoded(envelope, Dialect::Eclipse));
        },
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
        End::Unauthorized => (4001, "unauthorized"),
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

/// Adds the acknowledgement (or the error) of each of the client's messages in `sends` whose
/// commit has ended to the socket's write buffer, oldest first, stopping at the first still
/// being committed (answers come in the order the messages were queued). Returns whether it
/// wrote anything.
fn queue_acks(
    sends: &mut Sends,
    metrics: &Metrics,
    cx: &mut std::task::Context<'_>,
    socket: &mut WsSocket,
) -> bool {
    let mut wrote = false;
    while let Some(front) = sends.front_mut() {
        let Poll::Ready(result) = Pin::new(&mut front.committing).poll(cx) else {
            break;
        };
        let reply_to = sends.pop_front().map(|f| f.reply_to).unwrap_or_default();
        match result {
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
                metrics.frames_out.inc();
            }
            Err(e) => queue_service_error(metrics, socket, reply_to, &e),
        }
        wrote = true;
    }
    wrote
}

/// Adds an `error` frame to the socket's write buffer.
fn queue_error(
    metrics: &Metrics,
    socket: &mut WsSocket,
    reply_to: ReplyTo,
    code: ErrorCode,
    message: &str,
) {
    metrics.client_error(code.as_str());
    metrics.frames_out.inc();
    let reply_to = reply_to.unwrap_or_default();
    let frame = json!({ "type": "error", "code": code, "message": message, "replyTo": reply_to });
    socket.queue_text(&to_bytes(&frame));
}

/// [`queue_error`] for a service's error.
fn queue_service_error(
    metrics: &Metrics,
    socket: &mut WsSocket,
    reply_to: ReplyTo,
    e: &ServiceError,
) {
    if let ServiceError::Unavailable(cause) = e {
        tracing::warn!(error = %cause, "store unavailable");
    }
    queue_error(metrics, socket, reply_to, e.code(), &e.to_string());
}

/// How a kicked connection ends.
fn kicked_end(kick: Kick) -> End {
    match kick {
        Kick::SlowConsumer => End::SlowConsumer,
        Kick::Resync => End::Resync,
        Kick::Shutdown => End::Shutdown,
        Kick::NoPong => End::NoPong,
        Kick::Idle => End::Idle,
    }
}

/// Why the connection loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// A Pusher client's sign-in was refused, or its user's connections were terminated.
    Unauthorized,
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
            End::Unauthorized => "unauthorized",
        }
    }
}

/// State of one connection, owned by its task.
struct Connection {
    app: AppState,
    handle: ConnHandle,
    /// Its queue, kicks and pings.
    rx: Receiver,
    /// Its place in the node's [`SocketWatch`].
    watched: Watched,
    /// Rooms joined, each with what the client was sent there: a message it was sent is
    /// never written again, and one ahead of its position is written only after the gap.
    rooms: Cursors,
    /// The room `send-message` without `roomId` goes to (last joined).
    current_room: Option<Arc<str>>,
    /// The client's messages queued for the store, oldest first, each acknowledged once it
    /// is committed ([`Self::queue_acks`]). Any other frame waits until they all are.
    sends: Sends,
    /// Name an anonymous visitor gave in `join-room`.
    display_name: Option<Box<str>>,
    limiter: FrameLimiter,
    /// Sustained frames per second `limiter` allows (for its error message).
    frame_rate: u32,
    /// The upgrade's `Origin`, for checking the domain an `auth` frame moves to (`None` for
    /// Parlor's own pages and non-browser clients, which every domain accepts).
    origin: Option<Box<str>>,
    /// Until when an anonymous connection may still authenticate with an `auth` frame, in
    /// [`Watched::elapsed_ms`].
    auth_until: u64,
    /// How the connection's domain speaks.
    dialect: Dialect,
    /// Whether its writing end is parked in its queue, for the hub to write its events
    /// ([`Self::park`], [`Self::reclaim`]).
    park: Park,
    /// The `?roomId=` room (or the token's), until the connection starts and joins it; in a
    /// domain where clients name themselves, a token-less connection's until its first frame.
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

/// Where a connection's writing end is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Park {
    /// With its task, which has written no event since it last parked: it stays there
    /// while the task sleeps (a connection that never gets an event keeps no parked end).
    Held,
    /// With its task, which wrote events lately: it is parked when the task goes idle.
    Parks,
    /// Parked in the connection's queue: the hub writes its events.
    Parked,
}

/// A connection's frame limiter. On the standard library's monotonic clock, which takes no
/// room in the limiter (governor's default clock keeps a calibrated TSC clock, 40 bytes, in
/// every limiter, and calibrates it at each connection).
type FrameLimiter = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<Instant>>;

/// A client's message queued for the store, waiting to be acknowledged.
struct InFlight {
    reply_to: ReplyTo,
    committing: Committing,
}

/// A connection's messages in flight, oldest first: no memory (one word in the connection)
/// while it has none.
// Boxed so that the connection, which every idle socket keeps, grows by a word, not four.
#[allow(clippy::box_collection)]
#[derive(Default)]
struct Sends(Option<Box<VecDeque<InFlight>>>);

impl Sends {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, sent: InFlight) {
        self.0.get_or_insert_default().push_back(sent);
    }

    fn front_mut(&mut self) -> Option<&mut InFlight> {
        self.0.as_mut()?.front_mut()
    }

    fn pop_front(&mut self) -> Option<InFlight> {
        self.0.as_mut()?.pop_front()
    }

    /// Frees the queue's memory if it is empty.
    fn release(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }
}

/// The socket failed or the client is too slow; the loop must end.
struct Gone(End);

type Sent = Result<(), Gone>;

/// `id` of a request, echoed as `replyTo`.
type ReplyTo = Option<Value>;

/// What woke an idle connection, once the events it could write at once are written.
enum Wake {
    /// It must close.
    Kicked(Kick),
    /// The liveness sweep asks for a ping.
    Ping,
    /// Events are written but the socket has not taken them all yet.
    Flush,
    /// A stored message ahead of the connection's position: the gap comes first.
    Gap(Arc<Envelope>),
    /// The socket failed while writing.
    Broken,
    /// A frame from the client.
    Frame(Result<Incoming, RecvError>),
}

impl Connection {
    /// Serves the connection until it ends, then closes it. The connection and its socket
    /// are boxed, so that the task an idle connection keeps is small: its state lives in
    /// the boxes, and the futures of requests exist only while one runs.
    async fn run(mut self: Box<Self>, mut socket: Box<WsSocket>) {
        let metrics = Arc::clone(&self.app.metrics);
        metrics.connections.inc();
        metrics.connections_total.inc();
        tracing::debug!(conn = self.handle.id(), user = %self.handle.identity().user_id, "connected");

        let mut end = None;
        // The connection's `?roomId=` room (or its token's) is joined now, except where a
        // token-less client names itself: the room waits for it to say who it is, and its
        // first frame (a `join-room`, normally) joins it.
        let names_itself = !self.settled
            && self
                .app
                .auth
                .domains()
                .load()
                .get(&self.handle.identity().domain_id)
                .is_some_and(|d| d.settings.anonymous_identity == AnonymousIdentity::Client);
        if !names_itself
            && let Some(room) = self.pending_join.take()
            && let Err(Gone(e)) = Box::pin(self.auto_join(&mut socket, room.into())).await
        {
            end = Some(e);
        }
        let end = match end {
            Some(e) => e,
            None => self.serve(&mut socket).await,
        };
        // Messages still being committed are acknowledged before the close frame, unless
        // the client is gone.
        if !self.sends.is_empty() && !matches!(end, End::ClientClosed | End::TransportError) {
            let settle = tokio::time::timeout(CLOSE_TIMEOUT, self.settle_sends(&mut socket));
            let _ = Box::pin(settle).await;
        }

        for key in self.rooms.take_rooms() {
            self.app.chat.leave(&self.handle, &key);
        }
        self.app.handoff.unsubscribe(&self.handle);
        self.app.notifications.unsubscribe(&self.handle);
        Box::pin(close(&mut socket, end)).await;
        metrics.connections.dec();
        metrics.disconnect(end.label());
        tracing::debug!(
            conn = self.handle.id(),
            reason = end.label(),
            "disconnected"
        );
    }

    /// The connection's main loop. While idle it waits on one poll of its queue (events,
    /// kicks, the watch's pings) and its socket, with no future of its own; everything
    /// else is boxed, as the request paths (join, store calls) are large and short-lived.
    async fn serve(&mut self, socket: &mut WsSocket) -> End {
        loop {
            // Events are delivered inside this poll while they can be: written in order
            // and flushed at once, as the socket usually takes them whole. Only a gap to
            // fill from the store or a socket that does not take everything leaves it.
            let wake = std::future::poll_fn(|cx| {
                // Whatever woke the task, it takes its writing end back first, and writes
                // the events the hub took there and did not write whole.
                if self.park == Park::Parked {
                    self.reclaim(socket);
                    if socket.pending() > 0 {
                        match socket.poll_flush(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(_)) => return Poll::Ready(Wake::Broken),
                            Poll::Pending => return Poll::Ready(Wake::Flush),
                        }
                    }
                }
                loop {
                    let acked = self.queue_acks(cx, socket);
                    // While one of the client's messages is being committed, no event is
                    // taken: its own message must not reach it before its ack. (The store
                    // hands a commit's messages on just before it answers their senders.)
                    let signal = if self.sends.is_empty() {
                        self.rx.poll_signal(cx)
                    } else {
                        self.rx.poll_control(cx)
                    };
                    match signal {
                        Poll::Ready(Signal::Kicked(kick)) => {
                            return Poll::Ready(Wake::Kicked(kick));
                        }
                        Poll::Ready(Signal::Ping) => return Poll::Ready(Wake::Ping),
                        Poll::Ready(Signal::Event(envelope)) => {
                            if let Some(ahead) = self.queue_ready(socket, envelope) {
                                return Poll::Ready(Wake::Gap(ahead));
                            }
                            match socket.poll_flush(cx) {
                                Poll::Ready(Ok(())) => continue,
                                Poll::Ready(Err(_)) => return Poll::Ready(Wake::Broken),
                                Poll::Pending => return Poll::Ready(Wake::Flush),
                            }
                        }
                        Poll::Pending => {
                            if acked {
                                match socket.poll_flush(cx) {
                                    Poll::Ready(Ok(())) => {}
                                    Poll::Ready(Err(_)) => return Poll::Ready(Wake::Broken),
                                    Poll::Pending => return Poll::Ready(Wake::Flush),
                                }
                            }
                            // A client with many messages in flight, or with events
                            // waiting for its acks, is read again once they are
                            // acknowledged (their answers wake this poll): the events it
                            // holds back meanwhile stay few.
                            if self.sends.len() >= MAX_IN_FLIGHT
                                || (!self.sends.is_empty() && self.rx.has_events())
                            {
                                return Poll::Pending;
                            }
                            let frame = socket.poll_recv(cx);
                            if frame.is_pending() && self.sends.is_empty() {
                                socket.release();
                                self.sends.release();
                                self.park(socket);
                            }
                            return frame.map(Wake::Frame);
                        }
                    }
                }
            })
            .await;
            let step = match wake {
                Wake::Kicked(kick) => return kicked_end(kick),
                Wake::Broken => return End::TransportError,
                Wake::Ping => {
                    socket.queue_ping();
                    Box::pin(self.flush(socket)).await
                }
                Wake::Flush => Box::pin(self.flush(socket)).await,
                Wake::Gap(envelope) => Box::pin(self.write_events(socket, envelope)).await,
                Wake::Frame(incoming) => {
                    if let Ok(frame) = &incoming {
                        let message = !matches!(frame, Incoming::Pong);
                        self.handle.heard(self.watched.now(), message);
                    }
                    match incoming {
                        Ok(Incoming::Text(text)) => Box::pin(self.on_text(socket, text)).await,
                        Ok(Incoming::Pong) => Ok(()),
                        Ok(Incoming::Binary(_)) => {
                            Box::pin(self.error(
                                socket,
                                None,
                                ErrorCode::UnsupportedFrame,
                                "binary frames are not supported; send JSON text",
                            ))
                            .await
                        }
                        Ok(Incoming::Ping(payload)) => {
                            socket.queue_pong(&payload);
                            Box::pin(self.flush(socket)).await
                        }
                        Ok(Incoming::Close) => return End::ClientClosed,
                        Err(RecvError::TooLarge) => {
                            let limit = self.app.config.limits.max_frame_bytes;
                            let message = format!("frames are limited to {limit} bytes");
                            let _ = Box::pin(self.error(
                                socket,
                                None,
                                ErrorCode::FrameTooLarge,
                                &message,
                            ))
                            .await;
                            return End::FrameTooLarge;
                        }
                        Err(RecvError::Protocol(_)) => return End::ProtocolError,
                        Err(RecvError::InvalidUtf8) => return End::InvalidUtf8,
                        Err(RecvError::Gone) => return End::TransportError,
                    }
                }
            };
            if let Err(Gone(end)) = step {
                return end;
            }
        }
    }

    /// Parks the connection's writing end in its queue, so that the hub writes its events
    /// while the task sleeps ([`Parked`]): when it got events lately and has nothing left
    /// to write, over a TCP stream.
    fn park(&mut self, socket: &WsSocket) {
        if self.park != Park::Parks || socket.pending() > 0 {
            return;
        }
        let Some(stream) = socket.tcp() else {
            return;
        };
        let parked = Parked::new(
            std::mem::take(&mut self.rooms),
            Arc::clone(stream),
            framing(self.dialect),
            self.app.metrics.frames_out.clone(),
        );
        match self.rx.park(parked) {
            Ok(()) => self.park = Park::Parked,
            Err(mut parked) => self.rooms = std::mem::take(&mut parked.cursors),
        }
    }

    /// Takes the writing end back from the queue, with the frames of the events the hub
    /// took there and did not write whole, which go first.
    fn reclaim(&mut self, socket: &mut WsSocket) {
        self.park = Park::Held;
        if let Some((mut parked, unwritten)) = self.rx.reclaim() {
            self.rooms = std::mem::take(&mut parked.cursors);
            socket.queue_framed(&unwritten);
        }
    }

    /// [`queue_acks`] for this connection.
    fn queue_acks(&mut self, cx: &mut std::task::Context<'_>, socket: &mut WsSocket) -> bool {
        queue_acks(&mut self.sends, &self.app.metrics, cx, socket)
    }

    /// Waits until every message of the client's in flight is acknowledged, and writes the
    /// acknowledgements: a reply to any later frame comes after them.
    async fn settle_sends(&mut self, socket: &mut WsSocket) -> Sent {
        if self.sends.is_empty() {
            return Ok(());
        }
        std::future::poll_fn(|cx| {
            self.queue_acks(cx, socket);
            if self.sends.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        self.flush(socket).await
    }

    /// Adds `first` and whatever else is queued to the socket's write buffer, up to a batch,
    /// without waiting. Stops at a stored message ahead of the connection's position and
    /// returns it unwritten: the gap before it must be read first ([`Self::write_events`]).
    fn queue_ready(
        &mut self,
        socket: &mut WsSocket,
        first: Arc<Envelope>,
    ) -> Option<Arc<Envelope>> {
        let dialect = self.dialect;
        let mut written = 0u64;
        let mut put = |rooms: &mut Cursors, socket: &mut WsSocket, envelope: &Envelope| match rooms
            .advance(&envelope.event)
        {
            Step::Sent => true,
            Step::Next => {
                write(socket, envelope, dialect);
                written += 1;
                true
            }
            Step::Gap { .. } => false,
        };
        if !put(&mut self.rooms, socket, &first) {
            return Some(first);
        }
        let rooms = &mut self.rooms;
        let mut blocked = false;
        self.rx.drain_while(WRITE_BATCH - 1, |envelope| {
            if socket.pending() >= WRITE_BATCH_BYTES {
                return false;
            }
            blocked = !put(rooms, socket, envelope);
            !blocked
        });
        self.app.metrics.frames_out.inc_by(written);
        if written > 0 {
            self.park = Park::Parks;
        }
        // The message ahead is first in the queue (only this task takes from it).
        if blocked { self.rx.try_recv() } else { None }
    }

    /// Writes `first` (a message ahead of the connection's position, or any event) after
    /// the gap before it, then whatever else is queued, and flushes.
    async fn write_events(&mut self, socket: &mut WsSocket, first: Arc<Envelope>) -> Sent {
        let mut next = Some(first);
        while let Some(envelope) = next.take() {
            let Some(ahead) = self.queue_ready(socket, envelope) else {
                break;
            };
            let step = match (self.rooms.advance(&ahead.event), &ahead.event) {
                (Step::Gap { after, before }, Event::Message(message)) => {
                    let filled = Box::pin(self.fill(socket, message, after, before)).await?;
                    self.app.metrics.frames_out.inc_by(filled);
                    self.rooms.advance(&ahead.event)
                }
                (step, _) => step,
            };
            if step == Step::Next {
                write(socket, &ahead, self.dialect);
                self.app.metrics.frames_out.inc();
            }
            if socket.pending() < WRITE_BATCH_BYTES {
                next = self.rx.try_recv();
            }
        }
        self.flush(socket).await
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
            self.rooms.advance(&envelope.event);
            write(socket, &envelope, self.dialect);
        }
        Ok(missing)
    }

    /// Sends one frame now.
    async fn send(&self, socket: &mut WsSocket, bytes: Bytes) -> Sent {
        socket.queue_text(&bytes);
        self.flush(socket).await?;
        self.app.metrics.frames_out.inc();
        Ok(())
    }

    /// Writes what the socket's buffer holds. A write the socket takes whole (the usual
    /// case) sets no timer; one it does not is finished unless the client is kicked or
    /// stalls for [`WRITE_TIMEOUT`].
    async fn flush(&self, socket: &mut WsSocket) -> Sent {
        match std::future::poll_fn(|cx| Poll::Ready(socket.poll_flush(cx))).await {
            Poll::Ready(Ok(())) => return Ok(()),
            Poll::Ready(Err(_)) => return Err(Gone(End::TransportError)),
            Poll::Pending => {}
        }
        tokio::select! {
            result = tokio::time::timeout(WRITE_TIMEOUT, socket.flush()) => match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Gone(End::TransportError)),
                Err(_) => Err(Gone(End::SlowConsumer)),
            },
            kick = self.handle.kicked() => Err(Gone(kicked_end(kick))),
        }
    }

    async fn error(
        &self,
        socket: &mut WsSocket,
        reply_to: ReplyTo,
        code: ErrorCode,
        message: &str,
    ) -> Sent {
        queue_error(&self.app.metrics, socket, reply_to, code, message);
        self.flush(socket).await
    }

    async fn service_error(
        &self,
        socket: &mut WsSocket,
        reply_to: ReplyTo,
        e: &ServiceError,
    ) -> Sent {
        queue_service_error(&self.app.metrics, socket, reply_to, e);
        self.flush(socket).await
    }

    async fn on_text(&mut self, socket: &mut WsSocket, raw: String) -> Sent {
        self.app.metrics.frames_in.inc();
        let raw = raw.as_str();
        // Every frame counts against the rate, garbage included.
        let limited = self.limiter.check().is_err();
        // The client's messages in flight are acknowledged before any other frame is
        // answered; a further `send-message` is queued behind them.
        if !self.sends.is_empty()
            && (limited
                || !serde_json::from_str::<Head<'_>>(raw)
                    .is_ok_and(|h| h.kind.as_deref() == Some("send-message")))
        {
            self.settle_sends(socket).await?;
        }
        if limited {
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
            "subscribe-notifications" => {
                handle!(SubscribeNotifications, subscribe_notifications)
            }
            "unsubscribe-notifications" => {
                let was = self.app.notifications.unsubscribe(&self.handle);
                let frame = json!({
                    "type": "notifications-unsubscribed",
                    "replyTo": reply_to,
                    "subscribed": was,
                });
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every idle connection keeps, against the allocator's size classes: jemalloc
    /// rounds an allocation up to its class (… 128, 160, 192, 224, 256, 320, 384 …), so a
    /// field that pushes the boxed connection or its socket past a class boundary costs every
    /// connection the whole step (BENCHMARKS.md, "idle").
    #[test]
    fn an_idle_connection_fits_its_allocation_classes() {
        let connection = std::mem::size_of::<Connection>();
        let socket = std::mem::size_of::<WsSocket>();
        assert!(connection <= 320, "Connection is {connection} bytes");
        assert!(socket <= 128, "WsSocket is {socket} bytes");
    }
}

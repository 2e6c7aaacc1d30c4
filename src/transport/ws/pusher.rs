//! `GET /app/{key}`: Pusher Channels protocol 7 over a WebSocket (`docs/pusher.md`), so an
//! app's unchanged `pusher-js` (and Laravel Echo over it) works with Parlor in Pusher's
//! place.
//!
//! The app key names one of a domain's `pusher_keys` ([`App`]); its secret checks every
//! signed subscription and sign-in exactly as Pusher does, so an app's own auth endpoint
//! signing with the `pusher` SDK works as it is. An unknown key gets `pusher:error` 4001
//! and close 4001, which `pusher-js` does not retry. After `pusher:connection_established`
//! the client may:
//! - `pusher:ping`; `pusher:subscribe` / `pusher:unsubscribe` to public, `private-`,
//!   `private-encrypted-` and `presence-` channels, which live in the hub
//!   ([`crate::hub::channels`]) and so reach every node; a presence channel's members come
//!   and go with `pusher_internal:member_added` / `member_removed`, cluster-wide;
//! - send client events (`client-*`) on the private and presence channels it is in, to the
//!   other subscribers (not back to itself), at most [`CLIENT_EVENTS_PER_SECOND`];
//! - `pusher:signin`, after which the HTTP API's events for the user (`#server-to-user-{id}`)
//!   reach it, and `terminate_connections` closes it;
//! - hear its user's notifications on `private-user-{id}`, each as the event `chat-message`
//!   with seed 004's message object as its data.
//!
//! A connection is served as a `/ws` one is (`super`): one task, idle in one poll of its
//! queue and its socket, writing every event queued into one write; the node's
//! [`super::SocketWatch`] pings it and closes it when it stops answering, so it keeps no
//! timer; its state and socket are boxed and its write buffer freed when idle.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::Poll;

use axum::extract::{Path, Request, State};
use axum::response::Response;
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use serde_json::{Value, json};

use super::socket::{Incoming, RecvError, WsSocket};
use super::{End, Gate, WRITE_TIMEOUT, handshake, switching_protocols};
use crate::hub::channels::{ChannelEvent, channel_name, is_channel};
use crate::hub::{ConnHandle, Envelope, Event, PresentUser, Receiver, Signal};
use crate::model::{Identity, Role, RoomKey};
use crate::transport::AppState;
use crate::transport::pusher::{
    App, Kind, MAX_EVENT_BYTES, MAX_EVENT_NAME_LEN, SERVER_TO_USER, invalid_channel, truncate,
};
use crate::transport::wire::notification_json;

/// What `pusher:connection_established` announces: the client pings after this many
/// seconds without a frame.
const ACTIVITY_TIMEOUT_SECS: u64 = 120;
/// Most channels one connection may subscribe to.
const MAX_CHANNELS: usize = 100;
/// The channel prefix of a user's notifications.
const USER_CHANNEL: &str = "private-user-";
/// The event a notification is on `private-user-{id}` (seed 004).
const NOTIFICATION_EVENT: &str = "chat-message";
/// Client events one connection may send per second, as Pusher allows.
pub const CLIENT_EVENTS_PER_SECOND: u32 = 10;
/// Longest presence `user_id` accepted.
const MAX_USER_ID_LEN: usize = 128;
/// Largest presence `user_info`, in bytes of JSON (Pusher's limit is 1 KB).
const MAX_USER_INFO_BYTES: usize = 1024;
/// The event, on a signed-in user's channel, that closes the user's connections (the HTTP
/// API's `terminate_connections`); never sent to a client.
pub const TERMINATE: &str = "#terminate";

/// `GET /app/{key}`: upgrades, then speaks the Pusher protocol (an unknown key is told so
/// over the socket, as `pusher-js` expects).
pub async fn upgrade(
    State(app): State<AppState>,
    Path(app_key): Path<String>,
    mut req: Request,
) -> Response {
    let (key, offered) = match handshake(&app, req.headers()) {
        Ok(handshake) => handshake,
        Err(refused) => return *refused,
    };
    let found = App::by_key(&app, &app_key);
    let max_message = app.config.limits.max_frame_bytes;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let Some(pusher) = found else {
        app.metrics.client_error("unknown_app_key");
        app.supervisor.spawn_isolated("connection", async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut socket = WsSocket::new(upgraded, max_message);
                let message = format!("App key {} does not exist.", truncate(&app_key));
                refuse(&mut socket, 4001, &message).await;
            }
        });
        return switching_protocols(&key, &offered);
    };
    let id = app.next_connection_id();
    // Digits, a dot, digits, as the `pusher` SDK checks; the first part random, so that a
    // signature made for one socket cannot be replayed on a socket of another node that
    // happens to have the same connection number.
    let socket_id = format!(
        "{}.{id}",
        uuid::Uuid::new_v4().as_u64_pair().0 % 1_000_000_000
    );
    let identity = Identity {
        user_id: format!("pusher:{socket_id}"),
        name: "Pusher client".to_owned(),
        role: Role::Visitor,
        domain_id: Arc::clone(&pusher.domain),
        anonymous: true,
        room: None,
        label: None,
    };
    let gate = match Gate::pass(&app, &req, &identity).await {
        Ok(gate) => gate,
        Err(refused) => return refused,
    };
    let limits = &app.config.limits;
    let (handle, rx) = ConnHandle::bounded(
        id,
        Arc::new(identity),
        limits.outbound_queue,
        limits.outbound_queue_bytes,
    );
    let watched = app.sockets.watch(&handle);
    let client = Box::new(Client {
        app: app.clone(),
        pusher,
        socket_id,
        handle,
        rx,
        watched,
        channels: Subs::default(),
        user: None,
        client_events: RateLimiter::direct_with_clock(
            Quota::per_second(NonZeroU32::new(CLIENT_EVENTS_PER_SECOND).unwrap_or(NonZeroU32::MIN)),
            governor::clock::MonotonicClock,
        ),
    });
    app.supervisor.spawn_isolated("connection", async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = Box::new(WsSocket::new(upgraded, max_message));
                client.run(gate, socket).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    switching_protocols(&key, &offered)
}

/// Writes what waits in `socket`, within [`WRITE_TIMEOUT`].
async fn flushed(socket: &mut WsSocket) -> Result<(), End> {
    match tokio::time::timeout(WRITE_TIMEOUT, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::TransportError),
        Err(_) => Err(End::SlowConsumer),
    }
}

/// Sends `pusher:error` with `code` and closes with the same code.
async fn refuse(socket: &mut WsSocket, code: u16, message: &str) {
    socket.queue_text(error_frame(Some(code), message).as_bytes());
    finish(socket, code, "").await;
}

/// Closes with `code`, within [`WRITE_TIMEOUT`].
async fn finish(socket: &mut WsSocket, code: u16, reason: &str) {
    socket.queue_close(code, reason);
    if tokio::time::timeout(WRITE_TIMEOUT, socket.flush())
        .await
        .is_ok_and(|r| r.is_ok())
    {
        socket.shutdown().await;
    }
}

/// The close code and reason of `end` in Pusher's terms, which decide what `pusher-js`
/// does next: 4100–4199 reconnect after a pause, 4200–4299 at once, while 4000–4099 and
/// 4300 and up are final; so `/ws`'s 4008 for a slow client would stop `pusher-js` for good.
/// `None`: the transport is gone.
fn close_code(end: End) -> Option<(u16, &'static str)> {
    Some(match end {
        End::Shutdown => (4200, "Server is closing. Please reconnect shortly."),
        End::SlowConsumer => (4100, "Over capacity: the client does not read fast enough"),
        End::NoPong => (4201, "Pong reply not received"),
        End::Idle => (4202, "Closed after inactivity"),
        End::Unauthorized => (4009, "Connection is unauthorized"),
        End::FrameTooLarge => (1009, "frame too large"),
        End::ProtocolError => (1002, "protocol error"),
        End::InvalidUtf8 => (1007, "text frame is not UTF-8"),
        End::ClientClosed => (1000, ""),
        End::TransportError => return None,
        _ => (1011, "server error: try again"),
    })
}

/// `pusher:error` (its `data` an object, as Pusher sends it; `code` null for an error
/// that is not one of Pusher's numbered ones).
fn error_frame(code: Option<u16>, message: &str) -> String {
    json!({ "event": "pusher:error", "data": { "code": code, "message": message } }).to_string()
}

/// `pusher:subscription_error` for `channel` (soketi's shape, which Laravel Echo reads).
fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> String {
    json!({
        "event": "pusher:subscription_error",
        "channel": channel,
        "data": { "type": kind, "error": message, "status": status },
    })
    .to_string()
}

/// A client frame: `data` is an object for `pusher:*` events, anything for client events.
#[derive(Debug, Deserialize)]
struct Frame {
    event: String,
    #[serde(default)]
    data: Value,
    channel: Option<String>,
}

/// `pusher:subscribe`'s data.
#[derive(Debug, Deserialize)]
struct Subscribe {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

/// `pusher:signin`'s data.
#[derive(Debug, Deserialize)]
struct Signin {
    auth: String,
    user_data: String,
}

/// One subscription of a connection.
#[derive(Debug)]
struct Sub {
    /// The channel's key in the hub.
    key: RoomKey,
    kind: Kind,
    /// The member's user id, in a presence channel.
    member: Option<String>,
}

/// A connection's subscriptions by channel name: a list with room for exactly what it
/// holds (most connections hold one or two channels; a map would keep room for more).
#[derive(Debug, Default)]
struct Subs(Vec<(Box<str>, Sub)>);

impl Subs {
    fn get(&self, name: &str) -> Option<&Sub> {
        self.0.iter().find(|(n, _)| &**n == name).map(|(_, s)| s)
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds or replaces the subscription to `name`.
    fn insert(&mut self, name: &str, sub: Sub) {
        match self.0.iter_mut().find(|(n, _)| &**n == name) {
            Some((_, old)) => *old = sub,
            None => {
                self.0.reserve_exact(1);
                self.0.push((name.into(), sub));
            }
        }
    }

    fn remove(&mut self, name: &str) -> Option<Sub> {
        let at = self.0.iter().position(|(n, _)| &**n == name)?;
        Some(self.0.swap_remove(at).1)
    }

    fn take(&mut self) -> Vec<(Box<str>, Sub)> {
        std::mem::take(&mut self.0)
    }
}

/// One Pusher connection.
struct Client {
    app: AppState,
    pusher: App,
    socket_id: String,
    handle: ConnHandle,
    /// Its queue of events.
    rx: Receiver,
    /// Its place in the node's [`super::SocketWatch`], which pings it and closes it when
    /// it stops answering.
    watched: super::liveness::Watched,
    channels: Subs,
    /// The signed-in user and the hub key of their server-to-user channel.
    user: Option<(String, RoomKey)>,
    /// Its client events' limiter (on the standard clock, which takes no room in it).
    client_events: super::FrameLimiter,
}

/// What woke a connection, once the events it could write at once are written.
enum Wake {
    /// It must close.
    Kicked(crate::hub::Kick),
    /// The node's liveness sweep asks for a ping.
    Ping,
    /// Events are written but the socket has not taken them all yet.
    Flush,
    /// The loop ends (the socket failed, or an event ended the connection).
    End(End),
    /// A frame from the client.
    Frame(Result<Incoming, RecvError>),
}

impl Client {
    /// Serves the connection until it ends, then closes it. The client and its socket are
    /// boxed, so that the task an idle connection keeps is small.
    async fn run(mut self: Box<Self>, gate: Gate, mut socket: Box<WsSocket>) {
        let metrics = Arc::clone(&self.app.metrics);
        metrics.connections.inc();
        metrics.connections_total.inc();
        let established = json!({
            "event": "pusher:connection_established",
            "data": json!({
                "socket_id": self.socket_id,
                "activity_timeout": ACTIVITY_TIMEOUT_SECS,
            }).to_string(),
        });
        socket.queue_text(established.to_string().as_bytes());
        let end = match Box::pin(flushed(&mut socket)).await {
            Ok(()) => self.serve(&gate, &mut socket).await,
            Err(end) => end,
        };
        for (name, sub) in self.channels.take() {
            self.leave(&name, &sub);
        }
        if let Some((_, key)) = self.user.take() {
            self.app.chat.hub().unsubscribe(&key, &self.handle);
        }
        let Self { rx, watched, .. } = *self;
        drop((rx, watched));
        match close_code(end) {
            Some((code, reason)) if code >= 4000 => {
                Box::pin(refuse(&mut socket, code, reason)).await;
            }
            Some((code, reason)) => Box::pin(finish(&mut socket, code, reason)).await,
            None => {}
        }
        drop(gate);
        metrics.connections.dec();
        metrics.disconnect(end.label());
    }

    /// The connection's loop. While idle it waits on one poll of its queue (events, kicks,
    /// the node's liveness sweep asking for a ping) and its socket, with no timer or
    /// future of its own. Events are written inside that poll, every one queued into one
    /// write, flushed at once; only a socket that does not take the whole write leaves it
    /// for the slower path, which waits with a deadline.
    async fn serve(&mut self, gate: &Gate, socket: &mut WsSocket) -> End {
        loop {
            let wake = std::future::poll_fn(|cx| {
                // Every queued event into the write buffer, a round at a time, each round
                // flushed at once.
                loop {
                    let mut taken = 0;
                    while taken < crate::hub::DELIVERY_ROUND {
                        match self.rx.poll_signal(cx) {
                            Poll::Ready(Signal::Kicked(kick)) => {
                                return Poll::Ready(Wake::Kicked(kick));
                            }
                            Poll::Ready(Signal::Ping) => return Poll::Ready(Wake::Ping),
                            Poll::Ready(Signal::Event(envelope)) => {
                                if let Err(end) = self.deliver(&envelope, socket) {
                                    return Poll::Ready(Wake::End(end));
                                }
                                taken += 1;
                            }
                            Poll::Pending => break,
                        }
                    }
                    if socket.pending() > 0 {
                        match socket.poll_flush(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(_)) => {
                                return Poll::Ready(Wake::End(End::TransportError));
                            }
                            Poll::Pending => return Poll::Ready(Wake::Flush),
                        }
                    }
                    // A full round may have left events queued: take them too.
                    if taken < crate::hub::DELIVERY_ROUND {
                        break;
                    }
                }
                let frame = socket.poll_recv(cx);
                if frame.is_pending() {
                    socket.release();
                }
                frame.map(Wake::Frame)
            })
            .await;
            match wake {
                Wake::Kicked(kick) => return super::kicked_end(kick),
                Wake::End(end) => return end,
                Wake::Ping => socket.queue_ping(),
                Wake::Flush => {}
                Wake::Frame(incoming) => {
                    if let Ok(frame) = &incoming {
                        let message = !matches!(frame, Incoming::Pong);
                        self.handle.heard(self.watched.now(), message);
                    }
                    match incoming {
                        Ok(Incoming::Text(text)) => {
                            self.app.metrics.frames_in.inc();
                            if gate.admitted.limiter.check().is_err() {
                                socket.queue_text(
                                    error_frame(
                                        Some(4301),
                                        "Client event rejected due to rate limit",
                                    )
                                    .as_bytes(),
                                );
                            } else if let Err(end) = Box::pin(self.frame(&text, socket)).await {
                                return end;
                            }
                        }
                        Ok(Incoming::Binary(_) | Incoming::Pong) => {}
                        Ok(Incoming::Ping(payload)) => socket.queue_pong(&payload),
                        Ok(Incoming::Close) => return End::ClientClosed,
                        Err(RecvError::TooLarge) => return End::FrameTooLarge,
                        Err(RecvError::Protocol(_)) => return End::ProtocolError,
                        Err(RecvError::InvalidUtf8) => return End::InvalidUtf8,
                        Err(RecvError::Gone) => return End::TransportError,
                    }
                }
            }
            if socket.pending() > 0
                && let Err(end) = Box::pin(flushed(socket)).await
            {
                return end;
            }
        }
    }

    /// Writes an event for the connection: a notification on its user's channel, a
    /// channel's event, a presence member coming or going. `Err` ends the connection (the
    /// signed-in user's connections were terminated).
    fn deliver(&self, envelope: &Envelope, socket: &mut WsSocket) -> Result<(), End> {
        let frame = match &envelope.event {
            Event::Notification(n) => {
                let channel = format!("{USER_CHANNEL}{}", n.user_id);
                if !self.channels.contains_key(&channel) {
                    return Ok(());
                }
                let frame = json!({
                    "event": NOTIFICATION_EVENT,
                    "channel": channel,
                    "data": notification_json(n).to_string(),
                });
                bytes::Bytes::from(frame.to_string())
            }
            Event::Channel(event) => {
                let name = event.channel();
                let to_user = self.user.as_ref().is_some_and(|(_, key)| *key == event.key);
                if !to_user && !self.channels.contains_key(name)
                    || event.except.as_deref() == Some(self.socket_id.as_str())
                {
                    return Ok(());
                }
                if to_user && event.event == TERMINATE {
                    return Err(End::Unauthorized);
                }
                // Every subscriber writes the same bytes: encoded once.
                envelope.native.get_or_init(|| channel_frame(event)).clone()
            }
            Event::Presence { room, user, joined } if is_channel(room) => {
                let Some(name) = channel_name(room) else {
                    return Ok(());
                };
                if !self
                    .channels
                    .get(name)
                    .is_some_and(|s| s.kind == Kind::Presence)
                {
                    return Ok(());
                }
                envelope
                    .native
                    .get_or_init(|| member_frame(name, user, *joined))
                    .clone()
            }
            _ => return Ok(()),
        };
        socket.queue_text(&frame);
        self.app.metrics.frames_out.inc();
        Ok(())
    }

    /// Handles one client frame. `Err` ends the connection.
    async fn frame(&mut self, text: &str, socket: &mut WsSocket) -> Result<(), End> {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            self.app.metrics.client_error("bad_frame");
            let message = "a frame is a JSON object with a string \"event\"";
            socket.queue_text(error_frame(None, message).as_bytes());
            return Ok(());
        };
        match frame.event.as_str() {
            "pusher:ping" => {
                socket.queue_text(br#"{"event":"pusher:pong","data":"{}"}"#);
            }
            "pusher:pong" => {}
            "pusher:subscribe" => match serde_json::from_value::<Subscribe>(frame.data) {
                Ok(s) => self.subscribe(s, socket).await,
                Err(_) => {
                    let message = "pusher:subscribe needs data.channel (and strings for \
                                   data.auth and data.channel_data)";
                    socket.queue_text(error_frame(None, message).as_bytes());
                }
            },
            "pusher:unsubscribe" => {
                let channel = frame.data.get("channel").and_then(Value::as_str);
                if let Some(channel) = channel
                    && let Some(sub) = self.channels.remove(channel)
                {
                    self.leave(channel, &sub);
                }
            }
            "pusher:signin" => match serde_json::from_value::<Signin>(frame.data) {
                Ok(signin) => return self.signin(&signin, socket),
                Err(_) => {
                    let message = "pusher:signin needs data.auth and data.user_data";
                    socket.queue_text(error_frame(None, message).as_bytes());
                }
            },
            event if event.starts_with("client-") => {
                self.client_event(frame, socket);
            }
            // Unknown events are ignored, as the protocol asks.
            _ => {}
        }
        Ok(())
    }

    /// Ends the subscription `sub` to `name` (already taken out of `channels`).
    fn leave(&self, name: &str, sub: &Sub) {
        self.app.chat.hub().unsubscribe(&sub.key, &self.handle);
        if let Some(user) = name.strip_prefix(USER_CHANNEL) {
            self.app.notifications.unsubscribe_from(&self.handle, user);
        }
    }

    async fn subscribe(&mut self, s: Subscribe, socket: &mut WsSocket) {
        let channel = s.channel;
        if let Some(user) = channel.strip_prefix(SERVER_TO_USER) {
            // `pusher-js` subscribes to its user's channel once signed in: the sign-in
            // already did; anyone else's is not this connection's.
            let frame = if self.user.as_ref().is_some_and(|(id, _)| id == user) {
                json!({
                    "event": "pusher_internal:subscription_succeeded",
                    "channel": channel,
                    "data": "{}",
                })
                .to_string()
            } else {
                self.app.metrics.client_error("invalid_signature");
                subscription_error(
                    &channel,
                    "AuthError",
                    "a user's channel is the signed-in user's only",
                    401,
                )
            };
            socket.queue_text(frame.as_bytes());
            return;
        }
        if let Some(message) = invalid_channel(&channel) {
            socket.queue_text(error_frame(Some(4009), &message).as_bytes());
            return;
        }
        if self.channels.len() >= MAX_CHANNELS && !self.channels.contains_key(&channel) {
            self.app.metrics.client_error("too_many_channels");
            let message = format!("at most {MAX_CHANNELS} channels per connection");
            socket.queue_text(error_frame(Some(4009), &message).as_bytes());
            return;
        }
        let kind = Kind::of(&channel);
        let auth = s.auth.as_deref().unwrap_or_default();
        let mut member = None;
        match kind {
            Kind::Public => {}
            Kind::Private | Kind::Encrypted => {
                let parts: [&[u8]; 3] = [self.socket_id.as_bytes(), b":", channel.as_bytes()];
                if !self.pusher.verify_auth(auth, &parts) {
                    return self.unauthorised(&channel, socket);
                }
            }
            Kind::Presence => {
                let data = s.channel_data.as_deref().unwrap_or_default();
                let parts: [&[u8]; 5] = [
                    self.socket_id.as_bytes(),
                    b":",
                    channel.as_bytes(),
                    b":",
                    data.as_bytes(),
                ];
                if !self.pusher.verify_auth(auth, &parts) {
                    return self.unauthorised(&channel, socket);
                }
                match presence_member(data) {
                    Ok(user) => member = Some(user),
                    Err(message) => {
                        self.app.metrics.client_error("bad_channel_data");
                        socket.queue_text(
                            subscription_error(&channel, "InvalidChannelData", &message, 400)
                                .as_bytes(),
                        );
                        return;
                    }
                }
            }
        }
        if let Some(user) = channel.strip_prefix(USER_CHANNEL)
            && kind == Kind::Private
            && crate::model::valid_id(user)
            && let Err(e) = self
                .app
                .notifications
                .subscribe_for(&self.handle, user)
                .await
        {
            socket.queue_text(
                subscription_error(&channel, "ServerError", &e.to_string(), 503).as_bytes(),
            );
            return;
        }
        let key = self.pusher.channel(&channel);
        let hub = &self.app.chat.hub();
        let data = if let Some(user) = member {
            let limit = self.app.config.limits.presence_max_members;
            let mut present = hub.presence_all(&key).await;
            if present.len() >= limit && !present.iter().any(|u| u.user_id == user.user_id) {
                self.app.metrics.client_error("presence_full");
                let message = format!("a presence channel has at most {limit} members");
                socket.queue_text(
                    subscription_error(&channel, "LimitReached", &message, 4100).as_bytes(),
                );
                return;
            }
            let user_id = user.user_id.clone();
            let subscribed = hub.subscribe(&key, &self.handle, Some(user.clone()));
            for u in subscribed.members {
                if !present.iter().any(|p| p.user_id == u.user_id) {
                    present.push(u);
                }
            }
            if !present.iter().any(|p| p.user_id == user_id) {
                present.push(user);
            }
            self.channels.insert(
                &channel,
                Sub {
                    key,
                    kind,
                    member: Some(user_id),
                },
            );
            presence_data(&present)
        } else {
            hub.subscribe(&key, &self.handle, None);
            self.channels.insert(
                &channel,
                Sub {
                    key,
                    kind,
                    member: None,
                },
            );
            "{}".to_owned()
        };
        socket.queue_text(
            json!({
                "event": "pusher_internal:subscription_succeeded",
                "channel": channel,
                "data": data,
            })
            .to_string()
            .as_bytes(),
        );
    }

    fn unauthorised(&self, channel: &str, socket: &mut WsSocket) {
        self.app.metrics.client_error("invalid_signature");
        socket.queue_text(
            subscription_error(channel, "AuthError", "The connection is unauthorized.", 401)
                .as_bytes(),
        );
    }

    /// `pusher:signin`: `auth` is the app's signature of `socket_id::user::user_data`.
    fn signin(&mut self, signin: &Signin, socket: &mut WsSocket) -> Result<(), End> {
        let parts: [&[u8]; 3] = [
            self.socket_id.as_bytes(),
            b"::user::",
            signin.user_data.as_bytes(),
        ];
        let id = serde_json::from_str::<Value>(&signin.user_data)
            .ok()
            .and_then(|data| user_id(data.get("id")?));
        let Some(id) = id.filter(|_| self.pusher.verify_auth(&signin.auth, &parts)) else {
            self.app.metrics.client_error("invalid_signin");
            socket.queue_text(error_frame(Some(4009), "Connection is unauthorized").as_bytes());
            return Err(End::Unauthorized);
        };
        let key = self.pusher.channel(&format!("{SERVER_TO_USER}{id}"));
        if let Some((_, old)) = self.user.replace((id, key.clone())) {
            self.app.chat.hub().unsubscribe(&old, &self.handle);
        }
        self.app.chat.hub().subscribe(&key, &self.handle, None);
        socket.queue_text(
            json!({
                "event": "pusher:signin_success",
                "data": json!({ "user_data": signin.user_data }).to_string(),
            })
            .to_string()
            .as_bytes(),
        );
        Ok(())
    }

    /// A client event: to the other subscribers of a private or presence channel the
    /// connection is in.
    fn client_event(&self, frame: Frame, socket: &mut WsSocket) {
        let channel = frame.channel.unwrap_or_default();
        let refused = match self.channels.get(&channel) {
            None => Some(format!(
                "client event on {:?}, which this connection is not subscribed to",
                truncate(&channel)
            )),
            Some(sub) if !matches!(sub.kind, Kind::Private | Kind::Presence) => Some(format!(
                "client events go on private and presence channels only, not {:?}",
                truncate(&channel)
            )),
            Some(_) if frame.event.len() > MAX_EVENT_NAME_LEN => Some(format!(
                "an event name has at most {MAX_EVENT_NAME_LEN} characters"
            )),
            Some(_) => None,
        };
        if let Some(message) = refused {
            self.app.metrics.client_error("client_event_refused");
            socket.queue_text(error_frame(None, &message).as_bytes());
            return;
        }
        let data = frame.data.to_string();
        if data.len() > MAX_EVENT_BYTES {
            self.app.metrics.client_error("event_too_large");
            let message = format!("client event data is over {MAX_EVENT_BYTES} bytes");
            socket.queue_text(error_frame(None, &message).as_bytes());
            return;
        }
        if self.client_events.check().is_err() {
            socket.queue_text(
                error_frame(Some(4301), "Client event rejected due to rate limit").as_bytes(),
            );
            return;
        }
        let Some(sub) = self.channels.get(&channel) else {
            return;
        };
        self.app.chat.hub().publish(ChannelEvent {
            key: sub.key.clone(),
            event: frame.event,
            data,
            user_id: sub.member.clone(),
            except: Some(self.socket_id.clone()),
        });
    }
}

/// A presence subscription's `channel_data`: `{"user_id": string or number, "user_info"?}`.
fn presence_member(data: &str) -> Result<PresentUser, String> {
    let value: Value =
        serde_json::from_str(data).map_err(|_| "channel_data is not a JSON object".to_owned())?;
    let user_id = value
        .get("user_id")
        .and_then(user_id)
        .ok_or("channel_data.user_id must be a non-empty string or a number")?;
    if user_id.len() > MAX_USER_ID_LEN {
        return Err(format!(
            "channel_data.user_id has at most {MAX_USER_ID_LEN} characters"
        ));
    }
    let info = match value.get("user_info") {
        None | Some(Value::Null) => None,
        Some(info) => {
            let text = info.to_string();
            if text.len() > MAX_USER_INFO_BYTES {
                return Err(format!(
                    "channel_data.user_info is over {MAX_USER_INFO_BYTES} bytes"
                ));
            }
            Some(Arc::from(text))
        }
    };
    Ok(PresentUser {
        name: user_id.clone(),
        user_id,
        role: Role::Visitor,
        info,
    })
}

/// A user id as Pusher has it: a non-empty string, or a number written as one.
fn user_id(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The `presence` data of `pusher_internal:subscription_succeeded`.
fn presence_data(members: &[PresentUser]) -> String {
    let ids: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
    let hash: serde_json::Map<String, Value> = members
        .iter()
        .map(|m| (m.user_id.clone(), info_value(m)))
        .collect();
    json!({ "presence": { "ids": ids, "hash": hash, "count": members.len() } }).to_string()
}

/// A member's `user_info` (null when it has none).
fn info_value(user: &PresentUser) -> Value {
    user.info
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Value::Null)
}

/// `pusher_internal:member_added` / `member_removed` on the presence channel `name`.
fn member_frame(name: &str, user: &PresentUser, joined: bool) -> bytes::Bytes {
    let frame = if joined {
        json!({
            "event": "pusher_internal:member_added",
            "channel": name,
            "data": json!({ "user_id": user.user_id, "user_info": info_value(user) }).to_string(),
        })
    } else {
        json!({
            "event": "pusher_internal:member_removed",
            "channel": name,
            "data": json!({ "user_id": user.user_id }).to_string(),
        })
    };
    bytes::Bytes::from(frame.to_string())
}

/// A channel event as its subscribers get it. `data` is JSON text already (a string, for
/// the HTTP API's events; any value for client events), written as it is; `user_id` is set
/// for client events on presence channels.
fn channel_frame(event: &ChannelEvent) -> bytes::Bytes {
    let quoted = |text: &str| Value::String(text.to_owned()).to_string();
    let mut frame = format!(
        r#"{{"event":{},"channel":{},"data":{}"#,
        quoted(&event.event),
        quoted(event.channel()),
        event.data
    );
    if let Some(user_id) = &event.user_id {
        frame.push_str(r#","user_id":"#);
        frame.push_str(&quoted(user_id));
    }
    frame.push('}');
    bytes::Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_channel_data_is_checked() {
        let member = presence_member(r#"{"user_id":7,"user_info":{"name":"Ann"}}"#).unwrap();
        assert_eq!(member.user_id, "7");
        assert_eq!(member.info.as_deref(), Some(r#"{"name":"Ann"}"#));
        assert!(presence_member(r#"{"user_id":""}"#).is_err());
        assert!(presence_member(r#"{"user_info":{}}"#).is_err());
        assert!(presence_member("nope").is_err());
        let big = format!(r#"{{"user_id":"a","user_info":"{}"}}"#, "x".repeat(1100));
        assert!(presence_member(&big).is_err());
    }
}

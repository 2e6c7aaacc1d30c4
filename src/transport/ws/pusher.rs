//! `GET /app/{key}`: Pusher Channels protocol 7 over a WebSocket (`docs/pusher.md`), so an
//! app's unchanged `pusher-js` can listen to its users' notifications on
//! `private-user-{id}` (seed 004) with Parlor in Pusher's place.
//!
//! The app key names one of a domain's `pusher_keys`; its secret checks every private
//! channel's authorisation exactly as Pusher does (HMAC-SHA256 of `socket_id:channel`, hex,
//! after `key:`), so an app's own auth endpoint signing with the `pusher` SDK works as it
//! is. An unknown key gets `pusher:error` 4001 and close 4001, which `pusher-js` does not
//! retry. After `pusher:connection_established` the client may `pusher:ping` and
//! `pusher:subscribe` / `pusher:unsubscribe`:
//! - a public channel, or a `private-` one with a valid signature, is subscribed
//!   (`pusher_internal:subscription_succeeded`);
//! - `private-user-{id}` also carries that user's notifications, each as the event
//!   `chat-message` with seed 004's message object as its data;
//! - a wrong signature is refused with `pusher:subscription_error` (status 401), as soketi
//!   and Laravel Echo expect; presence and encrypted channels and client events are refused
//!   with a `pusher:error` that says so.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::Response;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::socket::{Incoming, RecvError, WsSocket};
use super::{End, Gate, Liveness, WRITE_TIMEOUT, handshake, switching_protocols};
use crate::config::Secret;
use crate::hub::{ConnHandle, Event, Receiver};
use crate::model::{Identity, Role};
use crate::transport::AppState;
use crate::transport::wire::notification_json;

/// What `pusher:connection_established` announces: the client pings after this many
/// seconds without a frame.
const ACTIVITY_TIMEOUT_SECS: u64 = 120;
/// Longest channel name Pusher accepts.
const MAX_CHANNEL_LEN: usize = 164;
/// Most channels one connection may subscribe to.
const MAX_CHANNELS: usize = 100;
/// The channel prefix of a user's notifications.
const USER_CHANNEL: &str = "private-user-";
/// The event a notification is on `private-user-{id}` (seed 004).
const NOTIFICATION_EVENT: &str = "chat-message";

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
    let found = app
        .auth
        .domains()
        .load()
        .pusher_key(&app_key, chrono::Utc::now())
        .map(|k| (Arc::clone(&k.domain), k.secret.clone()));
    let max_message = app.config.limits.max_frame_bytes;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let Some((domain, secret)) = found else {
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
        domain_id: domain,
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
    let task_app = app.clone();
    app.supervisor.spawn_isolated("connection", async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WsSocket::new(upgraded, max_message);
                let client = Client {
                    app: task_app,
                    app_key,
                    secret,
                    socket_id,
                    handle,
                    channels: HashSet::new(),
                };
                client.run(gate, rx, socket).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    switching_protocols(&key, &offered)
}

/// At most 64 characters of `s`, for messages that quote the client.
fn truncate(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(at, _)| &s[..at])
}

/// Sends `pusher:error` with `code` and closes with the same code.
async fn refuse(socket: &mut WsSocket, code: u16, message: &str) {
    socket.queue_text(error_frame(code, message).as_bytes());
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
        End::FrameTooLarge => (1009, "frame too large"),
        End::ProtocolError => (1002, "protocol error"),
        End::InvalidUtf8 => (1007, "text frame is not UTF-8"),
        End::ClientClosed => (1000, ""),
        End::TransportError => return None,
        _ => (1011, "server error: try again"),
    })
}

/// `pusher:error` (its `data` an object, as Pusher sends it).
fn error_frame(code: u16, message: &str) -> String {
    json!({ "event": "pusher:error", "data": { "code": code, "message": message } }).to_string()
}

/// A client frame: `data` is an object for `pusher:*` events.
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
}

/// One Pusher connection.
struct Client {
    app: AppState,
    app_key: String,
    secret: Secret,
    socket_id: String,
    handle: ConnHandle,
    channels: HashSet<String>,
}

impl Client {
    async fn run(mut self, gate: Gate, mut rx: Receiver, mut socket: WsSocket) {
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
        let end = match tokio::time::timeout(WRITE_TIMEOUT, socket.flush()).await {
            Ok(Ok(())) => Box::pin(self.serve(&gate, &mut rx, &mut socket)).await,
            _ => End::TransportError,
        };
        for channel in std::mem::take(&mut self.channels) {
            if let Some(user) = channel.strip_prefix(USER_CHANNEL) {
                self.app.notifications.unsubscribe_from(&self.handle, user);
            }
        }
        drop(rx);
        match close_code(end) {
            Some((code, reason)) if code >= 4000 => refuse(&mut socket, code, reason).await,
            Some((code, reason)) => finish(&mut socket, code, reason).await,
            None => {}
        }
        drop(gate);
        metrics.connections.dec();
        metrics.disconnect(end.label());
    }

    async fn serve(&mut self, gate: &Gate, rx: &mut Receiver, socket: &mut WsSocket) -> End {
        let shutdown = self.app.supervisor.shutdown().clone();
        let limits = self.app.config.limits.clone();
        let mut live = Liveness::new();
        let check = tokio::time::sleep_until(live.next_check(&limits).into());
        let mut check = std::pin::pin!(check);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return End::Shutdown,
                () = &mut check => {
                    match live.check(std::time::Instant::now(), &limits) {
                        super::Check::Fine => {}
                        super::Check::Ping => socket.queue_ping(),
                        super::Check::Dead(end) => return end,
                    }
                    check.as_mut().reset(live.next_check(&limits).into());
                }
                envelope = rx.recv() => match envelope {
                    Some(envelope) => self.deliver(&envelope.event, socket),
                    None => return match self.handle.kicked_for() {
                        Some(crate::hub::Kick::Shutdown) => End::Shutdown,
                        _ => End::SlowConsumer,
                    },
                },
                incoming = socket.recv() => match live.heard(incoming) {
                    Ok(Incoming::Text(text)) => {
                        self.app.metrics.frames_in.inc();
                        if gate.admitted.limiter.check().is_err() {
                            socket.queue_text(
                                error_frame(4301, "Client event rejected due to rate limit").as_bytes(),
                            );
                        } else {
                            Box::pin(self.frame(&text, socket)).await;
                        }
                    }
                    Ok(Incoming::Binary(_) | Incoming::Pong) => {}
                    Ok(Incoming::Ping(payload)) => socket.queue_pong(&payload),
                    Ok(Incoming::Close) => return End::ClientClosed,
                    Err(RecvError::TooLarge) => return End::FrameTooLarge,
                    Err(RecvError::Protocol(_)) => return End::ProtocolError,
                    Err(RecvError::InvalidUtf8) => return End::InvalidUtf8,
                    Err(RecvError::Gone) => return End::TransportError,
                },
            }
            if socket.pending() > 0 {
                match tokio::time::timeout(WRITE_TIMEOUT, socket.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return End::TransportError,
                    Err(_) => return End::SlowConsumer,
                }
            }
        }
    }

    /// Writes an event for the connection: a notification on its user's channel.
    fn deliver(&self, event: &Event, socket: &mut WsSocket) {
        let Event::Notification(n) = event else {
            return;
        };
        let channel = format!("{USER_CHANNEL}{}", n.user_id);
        if !self.channels.contains(&channel) {
            return;
        }
        let frame = json!({
            "event": NOTIFICATION_EVENT,
            "channel": channel,
            "data": notification_json(n).to_string(),
        });
        socket.queue_text(frame.to_string().as_bytes());
        self.app.metrics.frames_out.inc();
    }

    /// Handles one client frame.
    async fn frame(&mut self, text: &str, socket: &mut WsSocket) {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            socket
                .queue_text(error_frame(4000, "a frame is a JSON object with an event").as_bytes());
            return;
        };
        match frame.event.as_str() {
            "pusher:ping" => {
                socket.queue_text(
                    json!({ "event": "pusher:pong", "data": {} })
                        .to_string()
                        .as_bytes(),
                );
            }
            "pusher:pong" => {}
            "pusher:subscribe" => match serde_json::from_value::<Subscribe>(frame.data) {
                Ok(s) => self.subscribe(s, socket).await,
                Err(_) => socket.queue_text(
                    error_frame(4000, "pusher:subscribe needs data.channel").as_bytes(),
                ),
            },
            "pusher:unsubscribe" => {
                let channel = frame.data.get("channel").and_then(Value::as_str);
                if let Some(channel) = channel
                    && self.channels.remove(channel)
                    && let Some(user) = channel.strip_prefix(USER_CHANNEL)
                {
                    self.app.notifications.unsubscribe_from(&self.handle, user);
                }
            }
            event if event.starts_with("client-") => {
                let message = format!(
                    "client events are not available on this server (channel {})",
                    truncate(frame.channel.as_deref().unwrap_or_default())
                );
                socket.queue_text(error_frame(4301, &message).as_bytes());
            }
            // Unknown events are ignored, as the protocol asks.
            _ => {}
        }
    }

    async fn subscribe(&mut self, s: Subscribe, socket: &mut WsSocket) {
        let channel = s.channel;
        if channel.is_empty()
            || channel.len() > MAX_CHANNEL_LEN
            || !channel
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
        {
            let message = format!(
                "invalid channel name {:?}: 1–{MAX_CHANNEL_LEN} characters of A-Z a-z 0-9 _ - = @ , . ;",
                truncate(&channel)
            );
            socket.queue_text(error_frame(4009, &message).as_bytes());
            return;
        }
        if self.channels.len() >= MAX_CHANNELS && !self.channels.contains(&channel) {
            let message = format!("at most {MAX_CHANNELS} channels per connection");
            socket.queue_text(error_frame(4009, &message).as_bytes());
            return;
        }
        if channel.starts_with("presence-") || channel.starts_with("private-encrypted-") {
            let message = format!(
                "{} channels are not available on this server",
                if channel.starts_with("presence-") {
                    "presence"
                } else {
                    "encrypted"
                }
            );
            socket.queue_text(subscription_error(&channel, &message, 400).as_bytes());
            return;
        }
        if channel.starts_with("private-") {
            if !self.authorised(&channel, s.auth.as_deref().unwrap_or_default()) {
                self.app.metrics.client_error("invalid_signature");
                socket.queue_text(
                    subscription_error(&channel, "The connection is unauthorized.", 401).as_bytes(),
                );
                return;
            }
            if let Some(user) = channel.strip_prefix(USER_CHANNEL)
                && crate::model::valid_id(user)
                && let Err(e) = self
                    .app
                    .notifications
                    .subscribe_for(&self.handle, user)
                    .await
            {
                socket.queue_text(subscription_error(&channel, &e.to_string(), 503).as_bytes());
                return;
            }
        }
        socket.queue_text(
            json!({
                "event": "pusher_internal:subscription_succeeded",
                "channel": channel,
                "data": "{}",
            })
            .to_string()
            .as_bytes(),
        );
        self.channels.insert(channel);
    }

    /// Whether `auth` is the app's signature of this socket's subscription to `channel`:
    /// `key:hex(HMAC-SHA256(secret, "socket_id:channel"))`, compared in constant time.
    fn authorised(&self, channel: &str, auth: &str) -> bool {
        let Some((key, signature)) = auth.split_once(':') else {
            return false;
        };
        let Some(signature) = hex_decode(signature) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes()) else {
            return false;
        };
        mac.update(self.socket_id.as_bytes());
        mac.update(b":");
        mac.update(channel.as_bytes());
        key == self.app_key && mac.verify_slice(&signature).is_ok()
    }
}

/// `pusher:subscription_error` for `channel` (soketi's shape, which Laravel Echo reads).
fn subscription_error(channel: &str, message: &str, status: u16) -> String {
    json!({
        "event": "pusher:subscription_error",
        "channel": channel,
        "data": { "type": "AuthError", "error": message, "status": status },
    })
    .to_string()
}

/// Lower- or upper-case hex to bytes; `None` for anything else.
fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? * 16 + digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decodes_both_cases_and_refuses_the_rest() {
        assert_eq!(hex_decode("00ff7A"), Some(vec![0, 255, 122]));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode(""), Some(Vec::new()));
    }
}

//! WebSocket plumbing shared by the scenarios: resolving the target, opening a
//! connection from a chosen loopback source address, joining a room (or, in Pusher
//! protocol, subscribing to a channel: [`Protocol`]), and decoding the few server frames
//! the benchmark cares about.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

pub type Ws = WebSocketStream<TcpStream>;

/// A resolved benchmark target: the URL to put in the handshake and the
/// socket address to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// Source addresses to spread client sockets over; empty means "let the
    /// kernel choose".
    pub sources: Vec<IpAddr>,
}

impl Target {
    /// Parses `ws://HOST:PORT/PATH`, resolves HOST and checks that it is a
    /// loopback address: this tool generates load only against the local
    /// machine. `source_count` source addresses are taken from 127.0.0.2
    /// upwards (only for an IPv4 target).
    pub async fn resolve(url: &str, source_count: u8) -> Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?} (expected ws://HOST:PORT/PATH)"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => bail!("wss:// is not supported; benchmark the plain ws:// listener"),
            other => bail!("URL {url:?} has scheme {other:?}; expected ws://"),
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("URL {url:?} has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("cannot resolve {host:?}"))?
                .next()
                .ok_or_else(|| anyhow!("{host:?} resolved to no address"))?,
        };
        if !addr.ip().is_loopback() {
            bail!(
                "{addr} is not a loopback address; parlor-bench only generates load against \
                 127.0.0.0/8 or ::1"
            );
        }
        let sources = if addr.is_ipv4() {
            (0..source_count.min(250))
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            url: url.to_owned(),
            addr,
            sources,
        })
    }

    /// The source address for the `index`-th connection (round robin).
    pub fn source_for(&self, index: usize) -> Option<IpAddr> {
        if self.sources.is_empty() {
            None
        } else {
            self.sources.get(index % self.sources.len()).copied()
        }
    }

    /// Opens a TCP connection (bound to `source` if given) and performs the
    /// WebSocket handshake, all within `limit`.
    pub async fn connect(&self, source: Option<IpAddr>, limit: Duration) -> Result<Ws> {
        let attempt = async {
            let socket = if self.addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .context("cannot create socket")?;
            if let Some(ip) = source {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .with_context(|| format!("cannot bind source address {ip}"))?;
            }
            let stream = socket
                .connect(self.addr)
                .await
                .with_context(|| format!("TCP connect to {} failed", self.addr))?;
            stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
            // Small read buffers: the idle scenario holds thousands of
            // connections and tungstenite allocates the buffer up front.
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
            let (ws, _response) = client_async_with_config(self.url.as_str(), stream, Some(config))
                .await
                .with_context(|| format!("WebSocket handshake with {} failed", self.url))?;
            Ok::<Ws, anyhow::Error>(ws)
        };
        timeout(limit, attempt)
            .await
            .map_err(|_| anyhow!("connecting to {} timed out after {limit:?}", self.url))?
    }
}

/// The fields of a server frame that the scenarios look at. Anything else
/// (other fields, other frame types) is ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub reply_to: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub room_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// The chat text for `message-received`, the explanation for `error`.
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
}

impl<'a> ServerFrame<'a> {
    pub fn parse(text: &'a str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    pub fn describe_error(&self) -> String {
        format!(
            "server error {}: {}",
            self.code.as_deref().unwrap_or("(no code)"),
            self.message.as_deref().unwrap_or("(no message)")
        )
    }
}

/// Formats a close frame (or its absence) for error messages, e.g.
/// `closed by server (4008 slow consumer)`.
pub fn describe_close(msg: &Message) -> String {
    match msg {
        Message::Close(Some(frame)) => {
            let code: u16 = frame.code.into();
            format!("closed by server ({code} {})", frame.reason)
        }
        _ => "closed by server (no close frame)".to_owned(),
    }
}

/// The close code of a close frame, if it has one.
pub fn close_code(msg: &Message) -> Option<u16> {
    match msg {
        Message::Close(Some(frame)) => Some(frame.code.into()),
        _ => None,
    }
}

/// Builds a `join-room` request.
pub fn join_request(request_id: &str, room: &str) -> String {
    serde_json::json!({ "type": "join-room", "id": request_id, "roomId": room }).to_string()
}

/// Builds a `send-message` request.
pub fn send_request(request_id: &str, room: &str, text: &str, client_id: &str) -> String {
    serde_json::json!({
        "type": "send-message",
        "id": request_id,
        "roomId": room,
        "message": text,
        "clientMessageId": client_id,
    })
    .to_string()
}

/// What `join-room` told us.
#[derive(Debug, Clone, Copy)]
pub struct Joined {
    pub last_seq: u64,
}

/// Sends `join-room` and waits (until `deadline`) for the matching
/// `room-joined`. Frames of other types that arrive meanwhile are dropped.
pub async fn join_room(
    ws: &mut Ws,
    room: &str,
    request_id: &str,
    limit: Duration,
) -> Result<Joined> {
    ws.send(Message::text(join_request(request_id, room)))
        .await
        .context("sending join-room failed")?;
    let deadline = Instant::now() + limit;
    loop {
        let msg = match timeout_at(deadline, ws.next()).await {
            Err(_) => bail!("no room-joined for {room:?} within {limit:?}"),
            Ok(None) => bail!("connection ended while joining {room:?}"),
            Ok(Some(Err(e))) => bail!("connection failed while joining {room:?}: {e}"),
            Ok(Some(Ok(msg))) => msg,
        };
        let text = match &msg {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => bail!("{} while joining {room:?}", describe_close(&msg)),
            _ => continue,
        };
        let Some(frame) = ServerFrame::parse(text) else {
            continue;
        };
        let answers_us = frame.reply_to.as_deref() == Some(request_id);
        match frame.kind.as_ref() {
            "room-joined" if answers_us => {
                return Ok(Joined {
                    last_seq: frame.last_seq.unwrap_or(0),
                });
            }
            // An error that answers nothing in particular is taken as the
            // answer too: nothing else is outstanding on this connection.
            "error" if answers_us || frame.reply_to.is_none() => {
                bail!("join-room {room:?} refused: {}", frame.describe_error())
            }
            _ => continue,
        }
    }
}

/// The protocol a subscriber speaks: Parlor's own (`/ws`) or Pusher Channels protocol 7
/// (`/app/{key}`, see `crate::pusher`). The fan-out and idle subscribers are the same for
/// both but for joining and reading frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    #[default]
    Parlor,
    Pusher,
}

impl Protocol {
    /// The value of a worker's `--protocol` argument.
    pub fn arg(self) -> &'static str {
        match self {
            Protocol::Parlor => "parlor",
            Protocol::Pusher => "pusher",
        }
    }

    /// Joins `room` (Parlor: `join-room` with `request_id`; Pusher: waits for the
    /// connection to be established and subscribes to the public channel `room`), within
    /// `limit`.
    pub async fn join(
        self,
        ws: &mut Ws,
        room: &str,
        request_id: &str,
        limit: Duration,
    ) -> Result<()> {
        match self {
            Protocol::Parlor => join_room(ws, room, request_id, limit).await.map(drop),
            Protocol::Pusher => crate::pusher::socket::subscribe(ws, room, limit).await,
        }
    }
}

/// A subscriber's reading of one text frame.
#[derive(Debug)]
pub enum Delivery<'a> {
    /// A message for the subscriber's room: its `seq` (if the protocol has one) and text.
    Message {
        seq: Option<u64>,
        body: Cow<'a, str>,
    },
    /// A protocol-level ping to answer (Pusher's `pusher:ping`).
    Ping,
    /// An error the server reported.
    ServerError(String),
    /// Anything else: other rooms, presence, acks.
    Ignored,
    /// Not a frame of the protocol.
    Malformed,
}

/// Sends a close frame and waits briefly for the close handshake; errors are
/// irrelevant at that point.
pub async fn close_quietly(mut ws: Ws) {
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_and_ignores_extra_fields() {
        let text = r#"{"type":"message-received","id":"m1","roomId":"r","chatRoomId":"r","seq":7,
            "message":"t:1:2","userId":"u","role":"visitor","extra":{"nested":[1,2]}}"#;
        let f = ServerFrame::parse(text);
        assert!(f.is_some());
        if let Some(f) = f {
            assert_eq!(f.kind, "message-received");
            assert_eq!(f.seq, Some(7));
            assert_eq!(f.message.as_deref(), Some("t:1:2"));
            assert_eq!(f.room_id.as_deref(), Some("r"));
        }
        assert!(ServerFrame::parse("not json").is_none());
        assert!(ServerFrame::parse(r#"{"no":"type"}"#).is_none());
    }

    #[test]
    fn request_builders_are_json() -> Result<()> {
        let v: serde_json::Value =
            serde_json::from_str(&send_request("s1", "r", "hi \"x\"", "c1"))?;
        assert_eq!(v["type"], "send-message");
        assert_eq!(v["message"], "hi \"x\"");
        assert_eq!(v["clientMessageId"], "c1");
        let v: serde_json::Value = serde_json::from_str(&join_request("j1", "r"))?;
        assert_eq!(v["roomId"], "r");
        Ok(())
    }

    #[tokio::test]
    async fn refuses_non_loopback_targets() {
        assert!(Target::resolve("ws://10.0.0.1:80/ws", 0).await.is_err());
        assert!(Target::resolve("http://127.0.0.1:80/ws", 0).await.is_err());
        let t = Target::resolve("ws://127.0.0.1:8080/ws", 8).await;
        assert!(t.is_ok());
        if let Ok(t) = t {
            assert_eq!(t.sources.len(), 8);
            assert_eq!(
                t.source_for(9),
                Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))
            );
        }
    }
}

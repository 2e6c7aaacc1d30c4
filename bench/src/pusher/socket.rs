//! The client's side of Pusher Channels protocol 7 that the scenarios use: waiting for
//! `pusher:connection_established`, subscribing to a public channel, answering
//! `pusher:ping`, and reading channel events.
//!
//! Servers differ in the order of a frame's fields and in whether `data` of a `pusher:`
//! event is an object or JSON text in a string, so frames are read by key, never by
//! position: a channel event with a plain string `data` is scanned without a JSON parser
//! (this is most of what a fan-out subscriber reads), anything else is parsed in full.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Delivery, Ws};

/// The answer to `pusher:ping`.
pub const PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;

/// A frame read in full: the fields the scenarios look at.
#[derive(Debug, Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    /// An object, or JSON text in a string (Pusher's own events), or the string an app sent.
    #[serde(default)]
    data: Value,
}

impl Frame<'_> {
    /// `data` as an object: decoded from JSON text if it is a string.
    fn data_object(&self) -> Value {
        match &self.data {
            Value::String(text) => serde_json::from_str(text).unwrap_or(Value::Null),
            other => other.clone(),
        }
    }

    /// A `pusher:error` or `pusher:subscription_error`, for messages.
    fn describe_error(&self) -> String {
        let data = self.data_object();
        let code = data
            .get("code")
            .or_else(|| data.get("status"))
            .map_or_else(|| "(no code)".to_owned(), Value::to_string);
        let message = data
            .get("message")
            .or_else(|| data.get("error"))
            .and_then(Value::as_str)
            .unwrap_or("(no message)");
        format!("{} {code}: {message}", self.event)
    }
}

/// The `pusher:subscribe` frame for a public channel.
pub fn subscribe_request(channel: &str) -> String {
    serde_json::json!({ "event": "pusher:subscribe", "data": { "channel": channel } }).to_string()
}

/// Waits for `pusher:connection_established`, subscribes to the public `channel` and waits
/// for `pusher_internal:subscription_succeeded`, all within `limit`. Pings meanwhile are
/// answered; a `pusher:error` or `pusher:subscription_error` ends it with an error.
pub async fn subscribe(ws: &mut Ws, channel: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    await_event(ws, "pusher:connection_established", None, deadline, limit).await?;
    ws.send(Message::text(subscribe_request(channel)))
        .await
        .map_err(|e| anyhow!("sending pusher:subscribe failed: {e}"))?;
    await_event(
        ws,
        "pusher_internal:subscription_succeeded",
        Some(channel),
        deadline,
        limit,
    )
    .await
}

/// Reads until the event `wanted` (for `channel`, if given) arrives.
async fn await_event(
    ws: &mut Ws,
    wanted: &str,
    channel: Option<&str>,
    deadline: Instant,
    limit: Duration,
) -> Result<()> {
    loop {
        let msg = match timeout_at(deadline, ws.next()).await {
            Err(_) => bail!("no {wanted} within {limit:?}"),
            Ok(None) => bail!("connection ended while waiting for {wanted}"),
            Ok(Some(Err(e))) => bail!("connection failed while waiting for {wanted}: {e}"),
            Ok(Some(Ok(msg))) => msg,
        };
        let text = match &msg {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => bail!("{} while waiting for {wanted}", net::describe_close(&msg)),
            _ => continue,
        };
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text) else {
            continue;
        };
        match frame.event.as_ref() {
            e if e == wanted && (channel.is_none() || frame.channel.as_deref() == channel) => {
                return Ok(());
            }
            "pusher:ping" => ws
                .send(Message::text(PONG))
                .await
                .map_err(|e| anyhow!("sending pusher:pong failed: {e}"))?,
            "pusher:error" | "pusher:subscription_error" => {
                bail!("{} while waiting for {wanted}", frame.describe_error())
            }
            _ => {}
        }
    }
}

/// Reads one text frame of a subscriber of `channel`: a channel event's `data` (when it is
/// a string), a ping to answer, a server error, or something to ignore.
pub fn decode<'a>(text: &'a str, channel: &str) -> Delivery<'a> {
    if let Some((event_channel, data)) = scan_event(text) {
        return if event_channel == channel {
            Delivery::Message {
                seq: None,
                body: Cow::Borrowed(data),
            }
        } else {
            Delivery::Ignored
        };
    }
    let Ok(frame) = serde_json::from_str::<Frame<'_>>(text) else {
        return Delivery::Malformed;
    };
    match frame.event.as_ref() {
        "pusher:ping" => Delivery::Ping,
        "pusher:error" | "pusher:subscription_error" => {
            Delivery::ServerError(frame.describe_error())
        }
        e if e.starts_with("pusher") => Delivery::Ignored,
        _ if frame.channel.as_deref() != Some(channel) => Delivery::Ignored,
        _ => match frame.data {
            Value::String(data) => Delivery::Message {
                seq: None,
                body: Cow::Owned(data),
            },
            _ => Delivery::Malformed,
        },
    }
}

/// Reads an app's channel event (`event` not starting with `pusher`) whose `channel` and
/// `data` are strings without escapes, in any field order: (channel, data). `None` for
/// anything else, which `decode` then parses in full.
fn scan_event(text: &str) -> Option<(&str, &str)> {
    static EVENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""event":""#));
    static CHANNEL: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""channel":""#));
    static DATA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""data":""#));
    let bytes = text.as_bytes();
    if !text.starts_with('{') {
        return None;
    }
    let string_after = |key: &Finder<'_>| -> Option<&str> {
        let start = key.find(bytes)? + key.needle().len();
        let end = start + memchr::memchr(b'"', &bytes[start..])?;
        let v = text.get(start..end)?;
        // An escape would need the full parser.
        memchr::memchr(b'\\', v.as_bytes()).is_none().then_some(v)
    };
    let event = string_after(&EVENT)?;
    if event.starts_with("pusher") {
        return None;
    }
    Some((string_after(&CHANNEL)?, string_after(&DATA)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(d: Delivery<'_>) -> Option<String> {
        match d {
            Delivery::Message { body, .. } => Some(body.into_owned()),
            _ => None,
        }
    }

    #[test]
    fn reads_events_in_any_field_order() {
        for text in [
            r#"{"event":"bench-event","channel":"bench","data":"t:5:7:xx"}"#,
            r#"{"channel":"bench","data":"t:5:7:xx","event":"bench-event"}"#,
            r#"{"data":"t:5:7:xx","event":"bench-event","channel":"bench","user_id":"u"}"#,
        ] {
            assert_eq!(scan_event(text), Some(("bench", "t:5:7:xx")), "{text}");
            assert_eq!(body(decode(text, "bench")).as_deref(), Some("t:5:7:xx"));
            assert!(matches!(decode(text, "other"), Delivery::Ignored));
        }
        // Escapes go through the parser and come out decoded.
        let escaped = r#"{"event":"e","channel":"bench","data":"a\"b"}"#;
        assert_eq!(scan_event(escaped), None);
        assert_eq!(body(decode(escaped, "bench")).as_deref(), Some("a\"b"));
    }

    #[test]
    fn tells_pings_errors_and_noise_apart() {
        assert!(matches!(
            decode(r#"{"event":"pusher:ping","data":{}}"#, "bench"),
            Delivery::Ping
        ));
        assert!(matches!(
            decode(r#"{"event":"pusher:ping","data":"{}"}"#, "bench"),
            Delivery::Ping
        ));
        match decode(
            r#"{"event":"pusher:error","data":{"code":4301,"message":"slow down"}}"#,
            "bench",
        ) {
            Delivery::ServerError(e) => assert_eq!(e, "pusher:error 4301: slow down"),
            _ => panic!("not an error"),
        }
        assert!(matches!(
            decode(
                r#"{"event":"pusher_internal:subscription_succeeded","channel":"bench","data":"{}"}"#,
                "bench"
            ),
            Delivery::Ignored
        ));
        assert!(matches!(decode("not json", "bench"), Delivery::Malformed));
        assert!(matches!(
            decode(r#"{"event":"e","channel":"bench","data":{"x":1}}"#, "bench"),
            Delivery::Malformed
        ));
    }

    #[test]
    fn describes_subscription_errors() {
        let f: Frame<'_> = serde_json::from_str(
            r#"{"event":"pusher:subscription_error","channel":"c","data":{"type":"AuthError","error":"bad","status":401}}"#,
        )
        .unwrap();
        assert_eq!(f.describe_error(), "pusher:subscription_error 401: bad");
        let v: Value = serde_json::from_str(&subscribe_request("bench")).unwrap();
        assert_eq!(v["data"]["channel"], "bench");
    }
}

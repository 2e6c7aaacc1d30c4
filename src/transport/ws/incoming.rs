//! Client frames as they arrive: the typed fields of each request, parsed leniently where
//! the seeds' clients differ, and the visitor context a first join stores.

use super::*;

/// `s` cut to at most `max` characters.
pub(super) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parses a frame body; the error says which field is wrong, without echoing the input.
pub(super) fn parse<'a, T: Deserialize<'a>>(raw: &'a str) -> Result<T, String> {
    serde_json::from_str(raw).map_err(|e| {
        let text = e.to_string();
        let text = text.split(" at line").next().unwrap_or("invalid frame");
        format!("invalid frame: {}", truncate(text, 200))
    })
}

/// `message-ack`, the hottest reply: a typed struct rather than a JSON map.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Ack<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) reply_to: Option<&'a Value>,
    pub(super) id: &'a str,
    pub(super) room_id: &'a str,
    pub(super) seq: u64,
    pub(super) client_message_id: Option<&'a str>,
    pub(super) duplicate: bool,
    pub(super) timestamp: String,
}

/// The fields every frame may have.
#[derive(Debug, Deserialize)]
pub(super) struct Head<'a> {
    #[serde(rename = "type", borrow)]
    pub(super) kind: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) id: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct JoinRoom {
    pub(super) room_id: Option<String>,
    pub(super) since: Option<u64>,
    /// A client without a token: the domain it wants (a public one, or the demo).
    pub(super) domain_id: Option<String>,
    /// A client without a token, in a domain that lets clients name themselves: its id.
    pub(super) user_id: Option<String>,
    pub(super) user_name: Option<String>,
    pub(super) customer_data: Option<Value>,
    /// Where a visitor is: `{page, title, referrer, language, timeZone}` (the widget's).
    pub(super) context: Option<Value>,
    /// Checked, never granted.
    pub(super) role: Option<String>,
    /// The `?roomId=` join at connect (it settles nobody's identity).
    #[serde(skip)]
    pub(super) auto: bool,
}

/// The longest value kept of a visitor's context, in characters.
pub(super) const MAX_CONTEXT_CHARS: usize = 512;

/// The fields of `join-room`'s `context` that are kept, as sent.
pub(super) const CONTEXT_FIELDS: [&str; 5] = ["page", "title", "referrer", "language", "timeZone"];

/// A visitor's context as stored: the known string fields of what the client sent (each cut
/// to [`MAX_CONTEXT_CHARS`]) and the browser the server saw; `None` when `sent` is no
/// object. Anything else in `sent` is dropped.
pub(super) fn visitor_context(sent: &Value, browser: Option<&str>) -> Option<Value> {
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
pub(super) struct Auth {
    pub(super) token: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SendMessage {
    pub(super) room_id: Option<String>,
    pub(super) message: String,
    pub(super) client_message_id: Option<String>,
    pub(super) role: Option<String>,
    pub(super) data: Option<Value>,
    /// Files of the room to attach (`[{"fileId"}]`).
    pub(super) attachments: Option<Vec<crate::transport::files::AttachmentRef>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RoomRef {
    pub(super) room_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EscalateFrame {
    pub(super) room_id: Option<String>,
    pub(super) reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AgentFrame {
    pub(super) room_id: Option<String>,
    pub(super) agent_id: Option<String>,
    pub(super) agent_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NoteFrame {
    pub(super) room_id: Option<String>,
    pub(super) text: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SubscribeInbox {
    pub(super) status: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SubscribeNotifications {
    pub(super) since: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct History {
    pub(super) room_id: Option<String>,
    pub(super) before: Option<u64>,
    pub(super) limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Typing {
    pub(super) room_id: Option<String>,
    pub(super) is_typing: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Read {
    pub(super) room_id: Option<String>,
    pub(super) seq: u64,
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
        let _ = parse::<SubscribeNotifications>(raw);
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

//! Seed 000 (WeeziQ WebSocket service, v1) against Parlor, with the seed's own example
//! frames and bodies verbatim: `/ws?roomId=` then `join-room`, `send-message`, `ping`, the
//! AI reply after each customer message, `/ai/chat`, `/ai/stream` and `/api/messages`.
//! Every response field the seed shows is checked, and no message reaches a connection
//! twice, in the join flow or after a reconnect with `since`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
#[path = "common/fake_ai.rs"]
mod fake_ai;

use common::{Client, TestServer};
use fake_ai::{FakeVendor, Reply};
use parlor::config::{
    AnonymousIdentity, BotConfig, Config, DomainConfig, ProviderConfig, ProviderKind, VisitorRooms,
};
use serde_json::{Value, json};

/// The seed's frames and bodies, exactly as its README shows them.
const JOIN_ROOM: &str = r#"{
  "type": "join-room",
  "userId": "user-123",
  "userName": "John Doe",
  "role": "customer",
  "domainId": "domain-123",
  "customerData": {
    "name": "John Doe",
    "email": "john@example.com"
  }
}"#;
const SEND_MESSAGE: &str = r#"{
  "type": "send-message",
  "message": "Hello, how can you help me?"
}"#;
const PING: &str = r#"{
  "type": "ping"
}"#;
const AI_BODY: &str = r#"{
  "message": "Hello",
  "context": "You are a helpful assistant",
  "model": "openai"
}"#;
const SAVE_MESSAGE: &str = r#"{
  "message": "Hello",
  "role": "user",
  "chatRoomId": "room-id"
}"#;

const ANSWER: &str = "Hello! How can I help you today?";

/// The seed's site as a Parlor domain: public (its widget has no token), its visitors
/// named by the client (the seed's model), any room id usable, an assistant.
async fn server(fake: &FakeVendor) -> TestServer {
    let base = fake.url("/v1");
    TestServer::start_with(move |c: &mut Config| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base);
        p.retries = 0;
        c.ai.providers.insert("openai".into(), p);
        let bot = BotConfig {
            providers: vec!["openai".into()],
            ..BotConfig::default()
        };
        c.domains[0].bot = Some(bot.clone());
        c.domains.push(DomainConfig {
            public: true,
            anonymous_identity: AnonymousIdentity::Client,
            visitor_rooms: VisitorRooms::Open,
            allowed_origins: vec!["https://weeziq.com".into()],
            bot: Some(bot),
            ..common::chat_domain("domain-123", "WeeziQ")
        });
        c.domains.push(common::chat_domain("private", "Not public"));
    })
    .await
}

fn frame(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// Reads frames until the `message-history` that follows a `room-joined`, and returns
/// both.
async fn joined(c: &mut Client) -> (Value, Value) {
    let joined = c.recv_type("room-joined").await;
    let history = c.recv_type("message-history").await;
    (joined, history)
}

fn ids(history: &Value) -> Vec<String> {
    history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_v1_client_works_unchanged() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &[ANSWER],
        (12, 8),
        true,
    ))])
    .await;
    let s = server(&fake).await;

    // 1. The client connects with the room id, then joins with the seed's frame.
    let mut c = Client::connect(&s.ws("/ws?roomId=room-123")).await;
    let (first, auto) = joined(&mut c).await;
    assert_eq!(first["roomId"], "room-123");
    assert_eq!(auto["messages"], json!([]));
    c.send(frame(JOIN_ROOM)).await;
    let (room, history) = joined(&mut c).await;
    assert_eq!(room["type"], "room-joined");
    assert_eq!(room["roomId"], "room-123");
    assert!(room["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(history["type"], "message-history");
    assert_eq!(history["messages"], json!([]));

    // 2.-6. The message is saved and broadcast under the client's own id and role, then
    // the assistant's reply as the seed's `ai-assistant`.
    c.send(frame(SEND_MESSAGE)).await;
    let mine = c.recv_type("message-received").await;
    assert_eq!(mine["message"], "Hello, how can you help me?");
    assert_eq!(mine["userId"], "user-123");
    assert_eq!(mine["userName"], "John Doe");
    assert_eq!(mine["role"], "customer");
    assert_eq!(mine["chatRoomId"], "room-123");
    let reply = c.recv_type("message-received").await;
    for field in ["id", "timestamp"] {
        assert!(reply[field].is_string(), "{field} in {reply}");
    }
    assert_eq!(reply["type"], "message-received");
    assert_eq!(reply["message"], ANSWER);
    assert_eq!(reply["userId"], "ai-assistant");
    assert_eq!(reply["userName"], "AI Assistant");
    assert_eq!(reply["role"], "assistant");
    assert_eq!(reply["chatRoomId"], "room-123");

    c.send(frame(PING)).await;
    let pong = c.recv_type("pong").await;
    assert!(pong["timestamp"].as_str().unwrap().ends_with('Z'));

    // A reconnect: the seed's flow again, and with `since` after the first message. Each
    // message reaches the connection once, and the customer is the same one.
    drop(c);
    let mut again = Client::connect(&s.ws("/ws?roomId=room-123")).await;
    let (_, auto) = joined(&mut again).await;
    assert_eq!(
        auto["messages"],
        json!([]),
        "the demo's room-123 is another room"
    );
    again.send(frame(JOIN_ROOM)).await;
    let (_, history) = joined(&mut again).await;
    assert_eq!(ids(&history), [mine["id"].clone(), reply["id"].clone()]);
    let mut with_since = frame(JOIN_ROOM);
    with_since["since"] = json!(1);
    again.send(with_since).await;
    let (_, replay) = joined(&mut again).await;
    assert_eq!(replay["messages"], json!([]), "it has both already");
    let mut fresh = Client::connect(&s.ws("/ws")).await;
    let mut since = frame(JOIN_ROOM);
    since["roomId"] = json!("room-123");
    since["since"] = json!(1);
    fresh.send(since).await;
    let (_, replay) = joined(&mut fresh).await;
    assert_eq!(ids(&replay), [reply["id"].clone()]);
    assert_eq!(replay["messages"][0]["userId"], "ai-assistant");

    // The customer record is keyed by the client's id: one, whatever the connections.
    let agent = s.token_in("domain-123", "agent-1", "agent");
    let (status, visitor) = s.get_with("/api/rooms/room-123/visitor", &agent).await;
    assert_eq!(status, 200, "{visitor}");
    assert_eq!(visitor["visitor"]["userId"], "user-123", "{visitor}");
    assert_eq!(visitor["visitor"]["data"]["email"], "john@example.com");
    s.stop().await;
}

#[tokio::test]
async fn the_v1_http_endpoints_take_the_seed_bodies() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &["Hi ", "there"],
        (5, 2),
        true,
    ))])
    .await;
    let s = server(&fake).await;
    let http = reqwest::Client::new();

    // `/ai/chat` and `/ai/stream` with the seed's body, and no Content-Type at all.
    let res = http
        .post(s.http("/ai/chat"))
        .body(AI_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["response"], "Hi there");
    let asked = &fake.received()[0].body;
    assert!(
        asked.to_string().contains("You are a helpful assistant"),
        "{asked}"
    );
    let res = http
        .post(s.http("/ai/stream"))
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(AI_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = res.text().await.unwrap();
    assert!(events.contains("event: delta"), "{events}");
    assert!(events.contains("event: end"), "{events}");

    // `curl -d` sends the seed's body as a form: read as JSON too.
    let res = http
        .post(s.http("/ai/chat"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(AI_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Save a message, then read the room's history (the seed's shapes).
    let res = http
        .post(s.http("/api/messages"))
        .body(SAVE_MESSAGE)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let saved: Value = res.json().await.unwrap();
    assert_eq!(saved["message"], "Hello");
    assert_eq!(saved["chatRoomId"], "room-id");
    let listed: Value = http
        .get(s.http("/api/messages?chatRoomId=room-id"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["messages"][0]["id"], saved["id"]);
    s.stop().await;
}

#[tokio::test]
async fn bad_identities_and_domains_are_refused_and_store_nothing() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &["x"],
        (1, 1),
        true,
    ))])
    .await;
    let s = server(&fake).await;
    let cases = [
        (json!({ "domainId": "nope" }), "unknown_domain"),
        (json!({ "domainId": "private" }), "unknown_domain"),
        (json!({ "role": "agent" }), "forbidden"),
        (json!({ "role": "admin" }), "forbidden"),
        (json!({ "role": "assistant" }), "forbidden"),
        (json!({ "role": "system" }), "forbidden"),
        (json!({ "userId": "not an id!" }), "invalid_user_id"),
        // The assistant's and the server's own ids.
        (json!({ "userId": "ai-assistant" }), "invalid_user_id"),
        (json!({ "userId": "system" }), "invalid_user_id"),
    ];
    for (change, code) in cases {
        let mut c = Client::connect(&s.ws("/ws")).await;
        let mut join = frame(JOIN_ROOM);
        join["roomId"] = json!("guarded");
        for (k, v) in change.as_object().unwrap() {
            join[k] = v.clone();
        }
        let id = c.request(join.clone()).await;
        let answer = c.reply(&id).await;
        assert_eq!(answer["type"], "error", "{join}: {answer}");
        assert_eq!(answer["code"], code, "{join}: {answer}");
        // Not joined, so nothing can be written.
        let id = c
            .request(json!({ "type": "send-message", "roomId": "guarded", "message": "x" }))
            .await;
        assert_eq!(c.reply(&id).await["code"], "not_joined");
    }
    // Over HTTP too, and from a page the public domain does not list.
    let http = reqwest::Client::new();
    for (body, origin, status, code) in [
        (
            json!({ "message": "x", "chatRoomId": "guarded", "domainId": "private" }),
            None,
            404,
            "unknown_domain",
        ),
        (
            json!({ "message": "x", "chatRoomId": "guarded", "domainId": "domain-123", "role": "agent" }),
            None,
            403,
            "forbidden",
        ),
        (
            json!({ "message": "x", "chatRoomId": "guarded", "domainId": "domain-123" }),
            Some("https://evil.example"),
            404,
            "unknown_domain",
        ),
    ] {
        let mut req = http.post(s.http("/api/messages")).json(&body);
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        let (got, answer) = common::status_and_body(req.send().await.unwrap()).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let agent = s.token_in("domain-123", "agent-1", "agent");
    let (status, page) = s.get_with("/api/rooms/guarded/messages", &agent).await;
    assert_eq!(
        (status, page["error"]["code"].as_str()),
        (404, Some("room_not_found")),
        "not even the room was made: {page}"
    );
    assert!(fake.received().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn from_the_sites_own_page_the_auto_joined_room_is_the_sites() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &[ANSWER],
        (1, 1),
        true,
    ))])
    .await;
    let s = server(&fake).await;
    // Someone was there before.
    let mut first = Client::connect(&s.ws("/ws?domainId=domain-123")).await;
    first.send(frame(JOIN_ROOM)).await;
    first
        .send(json!({ "type": "join-room", "roomId": "room-123" }))
        .await;
    first.recv_type("message-history").await;
    let id = first
        .request(json!({ "type": "send-message", "roomId": "room-123", "message": "earlier" }))
        .await;
    let ack = first.reply(&id).await;
    assert_eq!(ack["type"], "message-ack", "{ack}");

    // The widget on https://weeziq.com: its page's origin puts it in domain-123 at once,
    // where clients name themselves, so its room waits for the seed's join-room (which
    // names no room: the one of the URL).
    let mut req = s.ws("/ws?roomId=room-123").into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://weeziq.com".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = Client { ws, next_id: 0 };
    // A join refused before it says who the client is leaves the room waiting.
    let mut bad = frame(JOIN_ROOM);
    bad["role"] = json!("agent");
    let id = c.request(bad).await;
    assert_eq!(c.reply(&id).await["code"], "forbidden");
    c.send(frame(JOIN_ROOM)).await;
    let (room, history) = joined(&mut c).await;
    assert_eq!(room["roomId"], "room-123");
    assert_eq!(room["members"].as_array().unwrap().len(), 1, "{room}");
    assert_eq!(
        ids(&history),
        [ack["id"].clone()],
        "the site's room, once: {history}"
    );
    c.send(frame(SEND_MESSAGE)).await;
    let mine = c.recv_type("message-received").await;
    assert_eq!(
        (mine["userId"].as_str(), mine["seq"].as_u64()),
        (Some("user-123"), Some(2))
    );

    // A page of another site naming the domain is refused at the upgrade.
    let mut req = s
        .ws("/ws?roomId=room-123&domainId=domain-123")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(refused.to_string().contains("404"), "{refused}");
    s.stop().await;
}

//! Seed 001 (WeeziQ WebSocket service, v2) against Parlor, with the seed's own example
//! frames and bodies verbatim: `join-room` and `send-message` carrying the client's ids,
//! `ai-chat` and `ai-stream` over the socket and `/ai/chat` / `/ai/stream` over HTTP with
//! `"domainId": "weeziq.com"`, health at `/`. Also: AI limits count per the client's own id,
//! and a browser without a token stays one visitor across reconnects.
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
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const JOIN_ROOM: &str = r#"{
  "type": "join-room",
  "roomId": "room-123",
  "userId": "user-456",
  "userName": "John Doe"
}"#;
const SEND_MESSAGE: &str = r#"{
  "type": "send-message",
  "roomId": "room-123",
  "message": "Hello world!",
  "userId": "user-456",
  "userName": "John Doe",
  "role": "user"
}"#;
const AI_CHAT: &str = r#"{
  "type": "ai-chat",
  "message": "What is AI?",
  "model": "gpt-3.5-turbo",
  "domainId": "weeziq.com",
  "userId": "user-456",
  "conversationId": "conv-789"
}"#;
const AI_STREAM: &str = r#"{
  "type": "ai-stream",
  "message": "Explain quantum computing",
  "model": "gpt-4",
  "domainId": "weeziq.com",
  "userId": "user-456",
  "conversationId": "conv-789"
}"#;
const HTTP_AI_CHAT: &str = r#"{
  "message": "Hello AI!",
  "model": "gpt-3.5-turbo",
  "domainId": "weeziq.com",
  "userId": "user-123",
  "conversationId": "conv-456"
}"#;
const HTTP_AI_STREAM: &str = r#"{
  "message": "Tell me a story",
  "model": "gpt-4",
  "domainId": "weeziq.com",
  "userId": "user-123",
  "conversationId": "conv-456"
}"#;

/// A v2 deployment: its default (token-less) domain lets clients name themselves, and
/// `weeziq.com` is public with an assistant that allows each visitor `per_minute` questions.
async fn server(fake: &FakeVendor, per_minute: u32) -> TestServer {
    let base = fake.url("/v1");
    TestServer::start_with(move |c: &mut Config| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base);
        p.retries = 0;
        c.ai.providers.insert("openai".into(), p);
        c.domains[0].anonymous_identity = AnonymousIdentity::Client;
        c.domains.push(DomainConfig {
            public: true,
            anonymous_identity: AnonymousIdentity::Client,
            visitor_rooms: VisitorRooms::Open,
            allowed_origins: vec!["https://weeziq.com".into()],
            bot: Some(BotConfig {
                providers: vec!["openai".into()],
                visitor_messages_per_minute: per_minute,
                ..BotConfig::default()
            }),
            ..common::chat_domain("weeziq.com", "WeeziQ")
        });
        c.domains.push(DomainConfig {
            public: true,
            allowed_origins: vec!["*".into()],
            visitor_rooms: VisitorRooms::Open,
            ..common::chat_domain("shop", "A shop that names its visitors")
        });
    })
    .await
}

fn frame(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn answer(texts: &[&str]) -> Reply {
    Reply::stream(fake_ai::openai_stream(texts, (7, 3), true))
}

#[tokio::test]
async fn the_v2_socket_frames_work_unchanged() {
    let fake = FakeVendor::start(vec![answer(&["AI is ", "a field."])]).await;
    let s = server(&fake, 100).await;
    let mut c = Client::connect(&s.ws("/ws")).await;
    c.send(frame(JOIN_ROOM)).await;
    let joined = c.recv_type("room-joined").await;
    assert_eq!(joined["roomId"], "room-123");
    assert_eq!(joined["members"][0]["userId"], "user-456");
    c.recv_type("message-history").await;

    c.send(frame(SEND_MESSAGE)).await;
    let m = c.recv_type("message-received").await;
    assert_eq!(m["message"], "Hello world!");
    assert_eq!(m["roomId"], "room-123");
    assert_eq!(m["userId"], "user-456", "its own id comes back: {m}");
    assert_eq!(m["userName"], "John Doe");
    assert_eq!(m["role"], "user");

    // The seed's AI frames, on the public domain they name.
    c.send(frame(AI_CHAT)).await;
    let r = c.recv_type("ai-response").await;
    assert_eq!(r["response"], "AI is a field.");
    assert_eq!(r["conversationId"], "conv-789");
    assert_eq!(r["model"], "gpt-3.5-turbo");
    c.send(frame(AI_STREAM)).await;
    let start = c.recv_type("ai-stream-start").await;
    let mut text = String::new();
    loop {
        let f = c.recv().await;
        match f["type"].as_str() {
            Some("ai-stream-delta") => text.push_str(f["delta"].as_str().unwrap()),
            Some("ai-stream-end") => {
                assert_eq!(f["streamId"], start["streamId"]);
                assert_eq!(f["conversationId"], "conv-789");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(text, "AI is a field.");
    let asked = fake.received();
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[1].body["model"], "gpt-4");
    s.stop().await;
}

#[tokio::test]
async fn the_v2_http_endpoints_and_health() {
    let fake = FakeVendor::start(vec![answer(&["Once ", "upon a time."])]).await;
    let s = server(&fake, 100).await;
    let http = reqwest::Client::new();
    let health: Value = http
        .get(s.http("/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");

    let res = http
        .post(s.http("/ai/chat"))
        .header("Content-Type", "application/json")
        .header("Origin", "https://weeziq.com")
        .body(HTTP_AI_CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let a: Value = res.json().await.unwrap();
    assert_eq!(a["response"], "Once upon a time.");
    assert_eq!(a["conversationId"], "conv-456");
    let res = http
        .post(s.http("/ai/stream"))
        .header("Content-Type", "application/json")
        .body(HTTP_AI_STREAM)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = res.text().await.unwrap();
    assert!(
        events.contains("event: start") && events.contains("event: end"),
        "{events}"
    );

    // The same body from a page weeziq.com does not list, or naming a domain that is not
    // there: refused, and no vendor is asked.
    let before = fake.received().len();
    for (origin, domain) in [
        (Some("https://evil.example"), "weeziq.com"),
        (None, "nowhere.example"),
    ] {
        let mut body = frame(HTTP_AI_CHAT);
        body["domainId"] = json!(domain);
        let mut req = http.post(s.http("/ai/chat")).json(&body);
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        let (status, answer) = common::status_and_body(req.send().await.unwrap()).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (404, Some("unknown_domain"))
        );
    }
    let mut c = Client::connect(&s.ws("/ws")).await;
    let mut ask = frame(AI_CHAT);
    ask["domainId"] = json!("nowhere.example");
    let id = c.request(ask).await;
    assert_eq!(c.reply(&id).await["code"], "unknown_domain");
    assert_eq!(fake.received().len(), before);
    s.stop().await;
}

#[tokio::test]
async fn ai_limits_count_per_the_clients_own_id() {
    let fake = FakeVendor::start(vec![answer(&["ok"])]).await;
    let s = server(&fake, 2).await;
    let http = reqwest::Client::new();
    let ask = |user: &str| {
        let mut body = frame(HTTP_AI_CHAT);
        body["userId"] = json!(user);
        http.post(s.http("/ai/chat")).json(&body).send()
    };
    for _ in 0..2 {
        assert_eq!(ask("user-a").await.unwrap().status(), 200);
    }
    let (status, refused) = common::status_and_body(ask("user-a").await.unwrap()).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    // Another visitor of the same address has its own allowance.
    assert_eq!(ask("user-b").await.unwrap().status(), 200);
    assert_eq!(fake.received().len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn a_browser_without_a_token_stays_one_visitor() {
    let fake = FakeVendor::start(vec![answer(&["ok"])]).await;
    let s = server(&fake, 100).await;
    // In a domain that names its visitors itself, the cookie keeps the id.
    let join =
        json!({ "type": "join-room", "roomId": "lobby", "domainId": "shop", "userId": "ignored" });
    let (ws, res) = tokio_tungstenite::connect_async(s.ws("/ws")).await.unwrap();
    let cookie = res
        .headers()
        .get("set-cookie")
        .expect("a visitor cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("parlor_visitor="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_owned();
    let mut first = Client { ws, next_id: 0 };
    first.send(join.clone()).await;
    let joined = first.recv_type("room-joined").await;
    let me = joined["members"][0]["userId"].as_str().unwrap().to_owned();
    assert!(me.starts_with("v_"), "the server names visitors here: {me}");
    drop(first);

    let mut req = s.ws("/ws").into_client_request().unwrap();
    req.headers_mut().insert("cookie", pair.parse().unwrap());
    let (ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(
        res.headers().get("set-cookie").is_none(),
        "the cookie is kept"
    );
    let mut again = Client { ws, next_id: 0 };
    again.send(join.clone()).await;
    let joined = again.recv_type("room-joined").await;
    let users: Vec<&str> = joined["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert_eq!(users, [me.as_str()], "the same visitor");

    // A page of a site no domain names cannot be that visitor, nor get the cookie.
    let mut req = s.ws("/ws").into_client_request().unwrap();
    req.headers_mut().insert("cookie", pair.parse().unwrap());
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let (ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(res.headers().get("set-cookie").is_none());
    let mut stranger = Client { ws, next_id: 0 };
    stranger.send(join.clone()).await;
    let joined = stranger.recv_type("room-joined").await;
    assert_eq!(joined["memberCount"], 2, "another visitor: {joined}");
    drop(stranger);

    // A forged or foreign cookie is a new visitor, never an error.
    let mut req = s.ws("/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        "cookie",
        "parlor_visitor=forged.token.here".parse().unwrap(),
    );
    let (ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(res.headers().get("set-cookie").is_some());
    let mut other = Client { ws, next_id: 0 };
    other.send(join).await;
    let joined = other.recv_type("room-joined").await;
    assert!(joined["memberCount"].as_u64().unwrap() >= 2, "{joined}");
    s.stop().await;
}

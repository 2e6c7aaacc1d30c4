//! The seeds' AI endpoints over real HTTP and WebSocket, with the seeds' request shapes:
//! `POST /ai/chat`, `POST /ai/stream` (server-sent events), and the `ai-chat` / `ai-stream`
//! frames; conversations that keep their history; and the refusals.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
#[path = "common/fake_ai.rs"]
mod fake_ai;

use common::TestServer;
use fake_ai::{FakeVendor, Reply};
use parlor::config::{BotConfig, Config, DomainConfig, ProviderConfig, ProviderKind, VisitorRooms};
use serde_json::{Value, json};

async fn server(fake: &FakeVendor) -> TestServer {
    let base = fake.url("/v1");
    TestServer::start_with(move |c: &mut Config| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base);
        p.retries = 0;
        c.ai.providers.insert("fake".into(), p);
        c.domains[0].bot = Some(BotConfig {
            providers: vec!["fake".into()],
            ..BotConfig::default()
        });
        c.domains.push(DomainConfig {
            bot: Some(BotConfig {
                providers: vec!["fake".into()],
                ..BotConfig::default()
            }),
            visitor_rooms: VisitorRooms::Owned,
            ..common::chat_domain("shop", "Shop")
        });
        c.domains.push(common::chat_domain("nobot", "No bot"));
    })
    .await
}

fn answer(texts: &[&str]) -> Reply {
    Reply::stream(fake_ai::openai_stream(texts, (12, 3), true))
}

async fn post(
    s: &TestServer,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value, String) {
    let mut req = reqwest::Client::new().post(s.http(path)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, json, text)
}

fn token(domain: &str, user: &str) -> String {
    parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        user,
        None,
        "visitor",
        domain,
        600,
    )
    .unwrap()
}

#[tokio::test]
async fn ai_chat_answers_with_the_seeds_shape() {
    let fake = FakeVendor::start(vec![
        answer(&["Hello ", "there!"]),
        answer(&["GPT-4 here."]),
    ])
    .await;
    let s = server(&fake).await;
    // Seed 000's request.
    let (status, body, raw) = post(
        &s,
        "/ai/chat",
        None,
        json!({ "message": "Hello", "context": "You are a helpful assistant", "model": "openai" }),
    )
    .await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(body["response"], "Hello there!");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["usage"]["promptTokens"], 12);
    assert_eq!(body["usage"]["completionTokens"], 3);
    assert_eq!(body["usage"]["totalTokens"], 15);
    let asked = &fake.received()[0].body;
    let system = asked["messages"][0]["content"].as_str().unwrap();
    assert!(system.ends_with("You are a helpful assistant"), "{system}");
    assert_eq!(
        asked["model"], "gpt-4o-mini",
        "the alias maps to the configured model"
    );

    // Seed 001's request: an explicit model name passes through.
    let (status, body, _) = post(
        &s,
        "/ai/chat",
        None,
        json!({ "message": "Hello AI!", "model": "gpt-4", "domainId": "demo",
                "userId": "user-123" }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["response"], "GPT-4 here.");
    assert_eq!(fake.received()[1].body["model"], "gpt-4");
}

#[tokio::test]
async fn a_conversation_keeps_its_history_and_its_owner() {
    let fake = FakeVendor::start(vec![answer(&["Paris."]), answer(&["About 2.1 million."])]).await;
    let s = server(&fake).await;
    let ann = token("shop", "ann");
    let (status, first, raw) = post(
        &s,
        "/ai/chat",
        Some(&ann),
        json!({ "message": "What is the capital of France?", "conversationId": "conv-789" }),
    )
    .await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(first["conversationId"], "conv-789");
    let (status, _, _) = post(
        &s,
        "/ai/chat",
        Some(&ann),
        json!({ "message": "How many people live there?", "conversationId": "conv-789" }),
    )
    .await;
    assert_eq!(status, 200);
    let messages = fake.received()[1].body["messages"].clone();
    let turns: Vec<(&str, &str)> = messages
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        turns,
        [
            ("user", "What is the capital of France?"),
            ("assistant", "Paris."),
            ("user", "How many people live there?")
        ]
    );
    // In a domain whose visitors own their rooms, another visitor cannot use it.
    let (status, body, _) = post(
        &s,
        "/ai/chat",
        Some(&token("shop", "mallory")),
        json!({ "message": "What did Ann ask?", "conversationId": "conv-789" }),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        fake.received().len(),
        2,
        "the refused question reached no vendor"
    );
}

#[tokio::test]
async fn ai_stream_sends_server_sent_events() {
    let fake = FakeVendor::start(vec![answer(&["Quantum ", "computers ", "use qubits."])]).await;
    let s = server(&fake).await;
    let res = reqwest::Client::new()
        .post(s.http("/ai/stream"))
        .json(
            &json!({ "message": "Explain quantum computing", "model": "gpt-4",
                       "domainId": "demo", "userId": "user-456", "conversationId": "conv-1" }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let body = res.text().await.unwrap();
    let events: Vec<(String, Value)> = body
        .split("\n\n")
        .filter(|b| !b.trim().is_empty() && !b.starts_with(':'))
        .map(|block| {
            let name = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap()
                .to_owned();
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["start", "delta", "delta", "delta", "end"], "{body}");
    assert_eq!(events[1].1["delta"], "Quantum ");
    assert_eq!(events[3].1["index"], 2);
    assert_eq!(events[4].1["usage"]["totalTokens"], 15);
    assert_eq!(events[4].1["model"], "gpt-4");
}

#[tokio::test]
async fn ai_frames_over_the_socket() {
    let fake = FakeVendor::start(vec![
        answer(&["AI is ", "software."]),
        answer(&["Once ", "upon a time."]),
    ])
    .await;
    let s = server(&fake).await;
    let mut c = s.connect().await;
    c.send(
        json!({ "type": "ai-chat", "id": "a1", "message": "What is AI?", "model": "gpt-3.5-turbo",
                   "domainId": "demo", "userId": "user-456", "conversationId": "conv-789" }),
    )
    .await;
    let response = c.recv_type("ai-response").await;
    assert_eq!(response["replyTo"], "a1");
    assert_eq!(response["response"], "AI is software.");
    assert_eq!(response["conversationId"], "conv-789");

    c.send(
        json!({ "type": "ai-stream", "id": "s1", "message": "Tell me a story", "model": "gpt-4" }),
    )
    .await;
    let start = c.recv_type("ai-stream-start").await;
    assert_eq!(start["replyTo"], "s1");
    let mut text = String::new();
    loop {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "ai-stream-delta" => {
                assert_eq!(f["streamId"], start["streamId"]);
                text.push_str(f["delta"].as_str().unwrap());
            }
            "ai-stream-end" => {
                assert_eq!(f["response"], "Once upon a time.");
                assert_eq!(f["replyTo"], "s1");
                break;
            }
            other => panic!("unexpected {other}: {f}"),
        }
    }
    assert_eq!(text, "Once upon a time.");
    // The socket kept serving frames: a ping still answers.
    c.send(json!({ "type": "ping", "id": "p" })).await;
    assert_eq!(c.recv_type("pong").await["replyTo"], "p");
}

#[tokio::test]
async fn bad_requests_are_refused_and_reach_no_vendor() {
    let fake = FakeVendor::start(vec![answer(&["never"])]).await;
    let s = server(&fake).await;
    for (token, body, status, code) in [
        (None, json!({ "message": "" }), 400, "empty_message"),
        (
            None,
            json!({ "message": "x".repeat(20_000) }),
            413,
            "message_too_long",
        ),
        (
            None,
            json!({ "message": "hi", "domainId": "shop" }),
            403,
            "forbidden",
        ),
        (None, json!({ "nope": 1 }), 400, "invalid_body"),
        (
            Some(token("nobot", "u")),
            json!({ "message": "hi" }),
            503,
            "ai_unavailable",
        ),
        (
            None,
            json!({ "message": "hi", "conversationId": "bad id!" }),
            400,
            "invalid_conversation_id",
        ),
    ] {
        for path in ["/ai/chat", "/ai/stream"] {
            let (got, answer, raw) = post(&s, path, token.as_deref(), body.clone()).await;
            assert_eq!(got, status, "{path} {body}: {raw}");
            assert_eq!(answer["error"]["code"], code, "{path} {body}");
        }
    }
    assert!(fake.received().is_empty());
    let mut c = s.connect().await;
    c.send(json!({ "type": "ai-chat", "id": "x", "message": "  " }))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["replyTo"].as_str()),
        (Some("empty_message"), Some("x"))
    );
}

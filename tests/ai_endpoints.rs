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
    server_with(fake, |_| {}).await
}

async fn server_with(fake: &FakeVendor, configure: impl FnOnce(&mut Config)) -> TestServer {
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
        configure(c);
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
            // Not public: a client without a token cannot pick it.
            None,
            json!({ "message": "hi", "domainId": "shop" }),
            404,
            "unknown_domain",
        ),
        (
            Some(token("shop", "u")),
            json!({ "message": "hi", "domainId": "demo" }),
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

/// `POST /ai/chat` without a token from the loopback address `from`: status, `Retry-After`
/// and the JSON body.
async fn ask_from(s: &TestServer, from: &str, message: &str) -> (u16, Option<String>, Value) {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let res = client
        .post(s.http("/ai/chat"))
        .json(&json!({ "message": message }))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn token_less_callers_of_one_address_share_one_ai_budget() {
    let fake = FakeVendor::start(vec![answer(&["Fine."])]).await;
    let s = server_with(&fake, |c| c.limits.ip_ai_requests_per_minute = 20).await;
    // Every token-less call is a new visitor, so only the address can bound them.
    let (mut answered, mut refused) = (0, 0);
    for i in 0..300 {
        let (status, retry, body) = ask_from(&s, "127.0.0.1", &format!("question {i}")).await;
        match status {
            200 => answered += 1,
            429 => {
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                let secs: u64 = retry.expect("Retry-After").parse().unwrap();
                assert!((1..=60).contains(&secs), "Retry-After {secs}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((answered, refused), (20, 280));
    assert_eq!(
        fake.received().len(),
        20,
        "the model is called for answered ones only"
    );
    // Another address has its own budget.
    let (status, _, body) = ask_from(&s, "127.0.0.2", "and me?").await;
    assert_eq!(status, 200, "{body}");

    // The same budget covers `ai-chat` frames on fresh connections.
    let mut frames_refused = 0;
    for i in 0..5 {
        let mut c = s.connect().await;
        let id = c
            .request(json!({ "type": "ai-chat", "message": format!("frame {i}") }))
            .await;
        let reply = c.reply(&id).await;
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "rate_limited", "{reply}");
            frames_refused += 1;
        }
    }
    assert_eq!(frames_refused, 5);
    assert_eq!(fake.received().len(), 21);
}

#[tokio::test]
async fn an_address_that_spent_its_tokens_waits_for_the_minute() {
    let fake = FakeVendor::start(vec![answer(&["Fine."])]).await;
    // Each answer costs 12 + 3 tokens: the third call finds the minute's 30 spent.
    let s = server_with(&fake, |c| c.limits.ip_ai_tokens_per_minute = 30).await;
    for _ in 0..2 {
        let (status, _, body) = ask_from(&s, "127.0.0.1", "hello").await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, retry, body) = ask_from(&s, "127.0.0.1", "hello").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens"),
        "{body}"
    );
    assert!(retry.is_some());
    assert_eq!(fake.received().len(), 2);
    // A signed-in agent is not a stranger: no address budget.
    let agent = parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        "agent-1",
        None,
        "agent",
        "demo",
        600,
    )
    .unwrap();
    let (status, _, body) = post(&s, "/ai/chat", Some(&agent), json!({ "message": "hi" })).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_domain_runs_at_most_its_calls_at_once() {
    let slow = Reply::Stream {
        pieces: fake_ai::openai_stream(&["Slow ", "answer."], (12, 3), true)
            .into_iter()
            .map(|p| (std::time::Duration::from_millis(300), p))
            .collect(),
        cut: false,
    };
    let fake = FakeVendor::start(vec![slow]).await;
    let s = server_with(&fake, |c| c.limits.ai_calls_per_domain = 1).await;
    let first = tokio::spawn({
        let url = s.http("/ai/chat");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({ "message": "first" }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, retry, body) = ask_from(&s, "127.0.0.2", "second").await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("already"), "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(first.await.unwrap(), 200);
    // The place is free again once the first answer is done.
    let (status, _, body) = ask_from(&s, "127.0.0.2", "third").await;
    assert_eq!(status, 200, "{body}");
}

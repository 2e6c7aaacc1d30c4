//! The assistant in support rooms, over real sockets, with providers played by a local fake
//! vendor: streamed `message-delta`s then one stored assistant message seen by every
//! member in `seq` order; the knowledge base answering with no key, its sources in the
//! message's data, small talk, and the offer of a person once per conversation; fallback
//! with a visible system message; cancellation by a newer visitor message (the vendor sees the request
//! dropped); a late joiner getting the text so far.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
#[path = "common/fake_ai.rs"]
mod fake_ai;

use std::time::Duration;

use common::{Client, TestServer};
use fake_ai::{FakeVendor, Reply};
use parlor::config::{BotConfig, Config, ProviderConfig, ProviderKind};
use serde_json::{Value, json};

/// A server whose demo bot uses the fake OpenAI-compatible vendor, then `knowledge`.
async fn server(fake: &FakeVendor, knowledge: Option<&str>, retries: u32) -> TestServer {
    server_with(fake, knowledge, retries, |_| {}).await
}

/// [`server`], then `configure`.
async fn server_with(
    fake: &FakeVendor,
    knowledge: Option<&str>,
    retries: u32,
    configure: impl FnOnce(&mut Config),
) -> TestServer {
    let base = fake.url("/v1");
    let knowledge = knowledge.map(str::to_owned);
    TestServer::start_with(move |c: &mut Config| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base);
        p.retries = retries;
        p.first_token_timeout_ms = 2_000;
        c.ai.providers.insert("fake".into(), p);
        c.domains[0].bot = Some(BotConfig {
            providers: vec!["fake".into()],
            knowledge_dir: knowledge,
            ..BotConfig::default()
        });
        configure(c);
    })
    .await
}

/// A vendor streaming "Let me think about it." with `pause(i)` before its i-th chunk.
async fn slow_vendor(pause: impl Fn(usize) -> Duration) -> FakeVendor {
    let pieces = fake_ai::openai_stream(&["Let ", "me ", "think ", "about ", "it."], (1, 5), true)
        .into_iter()
        .enumerate()
        .map(|(i, p)| (pause(i), p))
        .collect();
    FakeVendor::start(vec![Reply::Stream { pieces, cut: false }]).await
}

/// Frames until the first stored message with `role`, returning (deltas, that message).
async fn reply(client: &mut Client, role: &str) -> (Vec<Value>, Value) {
    let mut deltas = Vec::new();
    loop {
        let f = client.recv().await;
        match f["type"].as_str() {
            Some("message-delta") => deltas.push(f),
            Some("message-received") if f["role"] == role => return (deltas, f),
            _ => {}
        }
    }
}

/// A `message-received` frame is the message itself (text in `message`).
fn message(frame: &Value) -> &Value {
    frame
}

#[tokio::test]
async fn a_visitor_message_gets_a_streamed_reply_stored_once_for_every_member() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &["Your order ", "ships ", "today."],
        (42, 7),
        true,
    ))])
    .await;
    let s = server(&fake, None, 0).await;
    let mut visitor = s.connect_as("ann").await;
    let mut other = s.connect_as("bob").await;
    visitor.join("support-1", None).await;
    other.join("support-1", None).await;
    visitor
        .say("support-1", "Where is my order?", Some("q1"))
        .await;

    for client in [&mut visitor, &mut other] {
        let (deltas, stored) = reply(client, "assistant").await;
        let text: String = deltas
            .iter()
            .map(|d| d["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Your order ships today.");
        let indexes: Vec<u64> = deltas
            .iter()
            .map(|d| d["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, [0, 1, 2]);
        let m = message(&stored);
        assert_eq!(m["message"], "Your order ships today.");
        assert_eq!(m["seq"], 2, "right after the visitor's message: {stored}");
        assert_eq!(m["clientMessageId"], deltas[0]["messageId"]);
        assert_eq!(m["data"]["provider"], "fake");
        assert_eq!(m["data"]["usage"]["promptTokens"], 42);
        assert_eq!(m["data"]["usage"]["completionTokens"], 7);
    }
    // The vendor got the system prompt and the visitor's question.
    let asked = &fake.received()[0].body;
    assert_eq!(asked["messages"][0]["role"], "system");
    let last = asked["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last,
        json!({ "role": "user", "content": "Where is my order?" })
    );
    // Stored once: the history has the question and one answer.
    let mut late = s.connect_as("cy").await;
    let (_, history) = late.join("support-1", None).await;
    let roles: Vec<&str> = history
        .iter()
        .map(|m| m["role"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(roles, ["visitor", "assistant"], "{history:?}");
}

#[tokio::test]
async fn the_demo_answers_from_its_knowledge_base_without_any_key() {
    let s = TestServer::start_with(|c| {
        c.domains[0].bot.as_mut().unwrap().enabled = true;
        c.domains[0].handoff.enabled = true;
    })
    .await;
    let mut visitor = s.connect().await;
    visitor.join("help", None).await;
    visitor
        .say(
            "help",
            "How do I get the messages I missed after I reconnect?",
            None,
        )
        .await;
    let (deltas, stored) = reply(&mut visitor, "assistant").await;
    assert!(!deltas.is_empty());
    let content = message(&stored)["message"].as_str().unwrap();
    assert!(content.contains("since"), "{content}");
    assert!(!content.contains("Source"), "{content}");
    let streamed: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, content, "the deltas are the stored text");
    let data = &message(&stored)["data"];
    assert_eq!(data["provider"], "kb");
    assert_eq!(
        data["sources"],
        json!([{ "title": "Lost connection and reconnecting",
                 "document": "lost-connection.md",
                 "heading": "Catching up after a reconnect" }])
    );

    // A question the documents do not answer gets the offer of a human.
    visitor.say("help", "zxqv wplk", None).await;
    let (_, offer) = reply(&mut visitor, "assistant").await;
    assert_eq!(message(&offer)["data"]["offerHuman"], true, "{offer}");
    assert_eq!(
        message(&offer)["data"]["actions"][0]["id"],
        "escalate",
        "{offer}"
    );
}

/// An agent's token for the demo domain.
fn agent_token() -> String {
    parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        "alice",
        Some("Alice"),
        "agent",
        "demo",
        600,
    )
    .unwrap()
}

#[tokio::test]
async fn the_demo_offers_a_person_once_per_conversation_and_keeps_answering() {
    let s = TestServer::start_with(|c| {
        c.domains[0].bot.as_mut().unwrap().enabled = true;
        c.domains[0].handoff.enabled = true;
    })
    .await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("help", None).await;
    let mut ask = async |text: &str| {
        visitor.say("help", text, None).await;
        let (_, stored) = reply(&mut visitor, "assistant").await;
        stored
    };

    // Small talk: a polite line, no search, no offer.
    let hello = ask("Hello!").await;
    assert_eq!(hello["message"], "Hello! How can I help you today?");
    assert_eq!(hello["data"]["provider"], "kb");
    assert!(hello["data"].get("sources").is_none(), "{hello}");
    assert!(hello["data"].get("offerHuman").is_none(), "{hello}");

    // The first question nobody can answer gets the offer, with its button.
    let first = ask("Can you write me a poem about cats?").await;
    assert_eq!(first["data"]["offerHuman"], true, "{first}");
    assert_eq!(first["data"]["noAnswer"], true, "{first}");
    assert_eq!(first["data"]["actions"][0]["id"], "escalate", "{first}");

    // A later answerable question is answered as usual.
    let price = ask("How much does it cost?").await;
    assert!(
        price["message"].as_str().unwrap().contains("costs nothing"),
        "{price}"
    );
    assert_eq!(
        price["data"]["sources"][0]["document"],
        "pricing-and-licence.md"
    );
    assert_eq!(
        price["data"]["sources"][0]["heading"],
        "How much does Parlor cost?"
    );

    // The next unanswerable ones: asked to rephrase, not offered a person again.
    for question in ["What's the weather in Paris tomorrow?", "zxqv wplk"] {
        let again = ask(question).await;
        assert_eq!(
            again["message"],
            "Sorry, I couldn't find an answer to that. Could you put it another way?",
            "{again}"
        );
        assert_eq!(again["data"]["noAnswer"], true, "{again}");
        assert!(again["data"].get("offerHuman").is_none(), "{again}");
        assert!(again["data"].get("actions").is_none(), "{again}");
    }
    let thanks = ask("thanks!").await;
    assert!(
        thanks["message"]
            .as_str()
            .unwrap()
            .starts_with("You're welcome")
    );

    // Resolved and reopened, the room holds a new conversation: the offer comes again.
    let (status, body) = s
        .post_with("/api/rooms/help/resolve", &agent_token(), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let reopened = ask("zxqv wplk").await;
    assert_eq!(reopened["data"]["offerHuman"], true, "{reopened}");
}

#[tokio::test]
async fn a_failing_provider_falls_back_visibly_to_the_knowledge_base() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("returns.md"),
        "# Returns\n\nYou can return any item within 30 days for a full refund.",
    )
    .unwrap();
    let fake = FakeVendor::start(vec![Reply::Error {
        status: 503,
        headers: vec![],
        body: fake_ai::openai_error("The server is overloaded", "server_error"),
    }])
    .await;
    let s = server(&fake, Some(dir.path().to_str().unwrap()), 1).await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("r", None).await;
    visitor
        .say("r", "Can I return an item for a refund?", None)
        .await;
    let (_, notice) = reply(&mut visitor, "system").await;
    assert_eq!(message(&notice)["data"]["fallbackFrom"], "fake", "{notice}");
    assert_eq!(message(&notice)["data"]["error"], "unavailable");
    let (_, answer) = reply(&mut visitor, "assistant").await;
    let m = message(&answer);
    assert!(
        m["message"].as_str().unwrap().contains("30 days"),
        "{answer}"
    );
    assert_eq!(m["data"]["provider"], "kb");
    assert_eq!(fake.received().len(), 2, "one retry, then the fallback");
}

#[tokio::test]
async fn a_newer_visitor_message_cancels_the_reply_in_progress() {
    let slow: Vec<(Duration, String)> =
        fake_ai::openai_stream(&["one ", "two ", "three ", "four ", "five "], (1, 5), true)
            .into_iter()
            .map(|p| (Duration::from_millis(300), p))
            .collect();
    let fast = fake_ai::openai_stream(&["Second answer."], (1, 2), true);
    let fake = FakeVendor::start(vec![
        Reply::Stream {
            pieces: slow,
            cut: false,
        },
        Reply::stream(fast),
    ])
    .await;
    let s = server(&fake, None, 0).await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("r", None).await;
    visitor.say("r", "First question", None).await;
    // Wait for the first reply to start streaming.
    loop {
        let f = visitor.recv().await;
        if f["type"] == "message-delta" && f["delta"] == "one " {
            break;
        }
    }
    // A second client joining now gets the text so far.
    let mut late = s.connect_as("bob").await;
    let (_, _) = late.join("r", None).await;
    let catch_up = late.recv_type("message-delta").await;
    assert_eq!(catch_up["catchUp"], true, "{catch_up}");
    assert!(
        catch_up["delta"].as_str().unwrap().starts_with("one "),
        "{catch_up}"
    );

    visitor.say("r", "Second question", None).await;
    assert!(
        fake.wait_hung_up(1).await,
        "the first generation was not cancelled upstream"
    );
    let (_, interrupted) = reply(&mut visitor, "assistant").await;
    let m = message(&interrupted);
    assert_eq!(m["data"]["interrupted"], true, "{interrupted}");
    assert!(m["message"].as_str().unwrap().starts_with("one "));
    let (_, second) = reply(&mut visitor, "assistant").await;
    assert_eq!(message(&second)["message"], "Second answer.");
    assert!(message(&second)["data"]["interrupted"].is_null());
    let seqs = (
        message(&interrupted)["seq"].as_u64().unwrap(),
        message(&second)["seq"].as_u64().unwrap(),
    );
    assert!(seqs.0 < seqs.1, "{seqs:?}");
}

#[tokio::test]
async fn an_agent_answering_takes_over_from_the_assistant() {
    let fake = slow_vendor(|_| Duration::from_millis(300)).await;
    let s = server(&fake, None, 0).await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("r", None).await;
    let agent_token = parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        "alice",
        Some("Alice"),
        "agent",
        "demo",
        600,
    )
    .unwrap();
    let mut agent = Client::connect(&s.ws(&format!("/ws?token={agent_token}"))).await;
    agent.join("r", None).await;
    visitor.say("r", "I need help with my invoice", None).await;
    loop {
        let f = visitor.recv().await;
        if f["type"] == "message-delta" {
            break;
        }
    }
    agent.say("r", "Hi, I'm Alice, I can help.", None).await;
    assert!(fake.wait_hung_up(1).await, "the assistant kept generating");
    let (_, stopped) = reply(&mut visitor, "assistant").await;
    assert_eq!(stopped["data"]["interrupted"], true, "{stopped}");
}

#[tokio::test]
async fn a_reply_streaming_at_shutdown_is_stored_as_interrupted() {
    // The first word at once, then a long pause: the server stops in the pause.
    let fake = slow_vendor(|i| Duration::from_millis(if i < 2 { 50 } else { 3_000 })).await;
    let s = server(&fake, None, 0).await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("r", None).await;
    visitor.say("r", "I need help with my invoice", None).await;
    loop {
        let f = visitor.recv().await;
        if f["type"] == "message-delta" {
            break;
        }
    }
    // The reply is under way; the visitor leaves and the server stops. Shutdown ends the
    // reply like an agent taking over, and its text so far is committed before the store
    // flushes.
    drop(visitor);
    let restarted = s.restart().await;
    assert!(fake.wait_hung_up(1).await, "the assistant kept generating");
    let mut reader = restarted.connect_as("ann").await;
    let (_, history) = reader.join("r", Some(0)).await;
    let stopped = history
        .iter()
        .find(|m| m["role"] == "assistant")
        .unwrap_or_else(|| panic!("the reply is stored: {history:?}"));
    assert_eq!(stopped["data"]["interrupted"], true, "{stopped}");
    assert!(
        message(stopped)["message"]
            .as_str()
            .unwrap()
            .starts_with("Let "),
        "the text so far is kept: {stopped}"
    );
}

#[tokio::test]
async fn replies_to_token_less_visitors_are_charged_to_their_address() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &["Hello."],
        (10, 2),
        true,
    ))])
    .await;
    let s = server_with(&fake, None, 0, |c| c.limits.ip_ai_requests_per_minute = 2).await;
    // Each connection without a token is a new visitor: only the address ties them.
    for i in 0..3 {
        let mut visitor = s.connect().await;
        let room = format!("help-{i}");
        visitor.join(&room, None).await;
        visitor.say(&room, "hello", None).await;
        if i < 2 {
            let (_, answer) = reply(&mut visitor, "assistant").await;
            assert_eq!(answer["message"], "Hello.");
        } else {
            let (_, notice) = reply(&mut visitor, "system").await;
            assert_eq!(notice["data"]["error"], "rate_limited", "{notice}");
        }
    }
    assert_eq!(
        fake.received().len(),
        2,
        "the model is called for the answered ones only"
    );
}

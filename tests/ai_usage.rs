//! AI usage and budgets over real HTTP and WebSocket: one usage row per provider call
//! (including the failed one and the fallback), `GET /api/usage` by model and by day for
//! the domain's back end only, a visitor's questions per minute and a domain's daily token
//! budget, and the Prometheus counters.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
#[path = "common/fake_ai.rs"]
mod fake_ai;

use std::time::Duration;

use common::TestServer;
use fake_ai::{FakeVendor, Reply};
use parlor::auth::keys;
use parlor::config::{BotConfig, Config, DomainConfig, ProviderConfig, ProviderKind};
use serde_json::{Value, json};

struct Setup {
    s: TestServer,
    shop_key: String,
    other_key: String,
    _kb: tempfile::TempDir,
}

async fn setup(fake: &FakeVendor, bot: impl FnOnce(&mut BotConfig) + Send + 'static) -> Setup {
    let kb = tempfile::tempdir().unwrap();
    std::fs::write(
        kb.path().join("returns.md"),
        "# Returns\n\nReturns are free within 30 days.",
    )
    .unwrap();
    let (shop_key, shop_entry) = keys::generate();
    let (other_key, other_entry) = keys::generate();
    let base = fake.url("/v1");
    let dir = kb.path().to_str().unwrap().to_owned();
    let s = TestServer::start_with(move |c: &mut Config| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base);
        p.retries = 0;
        c.ai.providers.insert("fake".into(), p);
        let mut b = BotConfig {
            providers: vec!["fake".into()],
            knowledge_dir: Some(dir),
            ..BotConfig::default()
        };
        bot(&mut b);
        c.domains.push(DomainConfig {
            server_keys: vec![shop_entry],
            bot: Some(b),
            ..common::chat_domain("shop", "Shop")
        });
        c.domains.push(DomainConfig {
            server_keys: vec![other_entry],
            ..common::chat_domain("other", "Other")
        });
    })
    .await;
    Setup {
        s,
        shop_key,
        other_key,
        _kb: kb,
    }
}

fn visitor(user: &str) -> String {
    parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        user,
        None,
        "visitor",
        "shop",
        600,
    )
    .unwrap()
}

/// Polls `GET /api/usage` until its total has `calls` calls (rows are written in the
/// background).
async fn usage_with(s: &TestServer, key: &str, query: &str, calls: u64) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let (status, body) = s.get_with(&format!("/api/usage{query}"), key).await;
        assert_eq!(status, 200, "{body}");
        if body["total"]["calls"] == calls {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("usage never reached {calls} calls: {last}");
}

#[tokio::test]
async fn every_call_is_recorded_and_reported_to_the_back_end_only() {
    let fake = FakeVendor::start(vec![
        Reply::stream(fake_ai::openai_stream(&["Hi!"], (42, 7), true)),
        Reply::Error {
            status: 503,
            headers: vec![],
            body: fake_ai::openai_error("overloaded", "server_error"),
        },
    ])
    .await;
    let Setup {
        s,
        shop_key,
        other_key,
        _kb,
    } = setup(&fake, |_| {}).await;
    let mut ann = common::Client::connect(&s.ws(&format!("/ws?token={}", visitor("ann")))).await;
    ann.join("r1", None).await;
    ann.say("r1", "Hello", None).await;
    loop {
        let f = ann.recv().await;
        if f["type"] == "message-received" && f["role"] == "assistant" {
            break;
        }
    }
    ann.say("r1", "How do returns work?", None).await;
    loop {
        let f = ann.recv().await;
        if f["type"] == "message-received" && f["role"] == "assistant" {
            assert!(f["message"].as_str().unwrap().contains("30 days"), "{f}");
            break;
        }
    }

    let by_model = usage_with(&s, &shop_key, "?groupBy=model", 3).await;
    assert_eq!(
        by_model["groups"],
        json!([
            { "key": "fake/gpt-4o-mini", "calls": 2, "failed": 1, "promptTokens": 42,
              "completionTokens": 7, "totalTokens": 49,
              "meanLatencyMs": by_model["groups"][0]["meanLatencyMs"] },
            { "key": "kb/kb", "calls": 1, "failed": 0, "promptTokens": 0,
              "completionTokens": 0, "totalTokens": 0,
              "meanLatencyMs": by_model["groups"][1]["meanLatencyMs"] }
        ]),
        "{by_model}"
    );
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let by_day = usage_with(
        &s,
        &shop_key,
        &format!("?groupBy=day&from={today}&to={today}"),
        3,
    )
    .await;
    assert_eq!(by_day["groups"][0]["key"], today.as_str());
    assert_eq!(by_day["total"]["totalTokens"], 49);
    // Yesterday had nothing.
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let (_, empty) = s
        .get_with(
            &format!("/api/usage?from={yesterday}&to={yesterday}"),
            &shop_key,
        )
        .await;
    assert_eq!(empty["total"]["calls"], 0);

    // Only the domain's back end (or admins) may read it.
    let (status, body) = s.get_with("/api/usage", &visitor("ann")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = s.get_with("/api/usage?domainId=shop", &other_key).await;
    assert_eq!(status, 403);
    let (_, theirs) = s.get_with("/api/usage", &other_key).await;
    assert_eq!(
        theirs["total"]["calls"], 0,
        "another domain sees none of it"
    );
    for bad in [
        "?groupBy=week",
        "?from=yesterday",
        "?from=2026-11-22&to=2026-11-01",
    ] {
        let (status, body) = s.get_with(&format!("/api/usage{bad}"), &shop_key).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    let metrics = reqwest::get(s.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"parlor_ai_calls_total{provider="fake",outcome="ok"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"parlor_ai_calls_total{provider="fake",outcome="unavailable"} 1"#));
    assert!(metrics.contains(r#"parlor_ai_tokens_total{provider="fake",kind="prompt"} 42"#));
}

async fn ask(s: &TestServer, token: &str) -> (u16, Value, Option<String>) {
    let res = reqwest::Client::new()
        .post(s.http("/ai/chat"))
        .bearer_auth(token)
        .json(&json!({ "message": "Hello" }))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, res.json().await.unwrap_or(Value::Null), retry)
}

#[tokio::test]
async fn a_visitor_asking_too_often_is_rate_limited() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &["Hi"],
        (1, 1),
        true,
    ))])
    .await;
    let setup = setup(&fake, |b| b.visitor_messages_per_minute = 2).await;
    let s = &setup.s;
    let ann = visitor("ann");
    assert_eq!(ask(s, &ann).await.0, 200);
    assert_eq!(ask(s, &ann).await.0, 200);
    let (status, body, retry) = ask(s, &ann).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(retry.is_some_and(|r| r.parse::<u64>().unwrap() >= 1));
    // Another visitor is not affected; nor is the domain's back end.
    assert_eq!(ask(s, &visitor("bob")).await.0, 200);
    assert_eq!(ask(s, &setup.shop_key).await.0, 200);
    assert_eq!(
        fake.received().len(),
        4,
        "the refused question reached no vendor"
    );
}

#[tokio::test]
async fn a_domain_over_its_daily_budget_gets_budget_exceeded() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &["Hi"],
        (30, 19),
        true,
    ))])
    .await;
    let setup = setup(&fake, |b| b.daily_token_budget = Some(40)).await;
    let s = &setup.s;
    assert_eq!(ask(s, &visitor("ann")).await.0, 200);
    // The usage is counted as soon as the call ends.
    let (status, body, retry) = ask(s, &visitor("bob")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert!(retry.is_some());
    // In a room, the visitor is told so by a system message.
    let mut cy = common::Client::connect(&s.ws(&format!("/ws?token={}", visitor("cy")))).await;
    cy.join("r", None).await;
    cy.say("r", "Hello?", None).await;
    let notice = loop {
        let f = cy.recv().await;
        if f["type"] == "message-received" && f["role"] == "system" {
            break f;
        }
    };
    assert_eq!(notice["data"]["error"], "budget_exceeded", "{notice}");
    assert_eq!(fake.received().len(), 1);

    // The count starts again from the store after a restart.
    let Setup { s, shop_key, .. } = setup;
    let s = s.restart().await;
    let (status, body, _) = ask(&s, &visitor("dan")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("budget_exceeded"))
    );
    let _ = shop_key;
}

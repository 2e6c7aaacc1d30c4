//! Knowledge bases over real HTTP: documents uploaded through the admin API answer at once
//! and stop answering when deleted; a knowledge folder is re-indexed when a file changes;
//! and only an administrator manages documents.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::TestServer;
use parlor::auth::keys;
use parlor::config::{BotConfig, DomainConfig};
use reqwest::Method;
use serde_json::{Value, json};

async fn ask(s: &TestServer, domain_token: Option<&str>, question: &str) -> Value {
    let mut req = reqwest::Client::new()
        .post(s.http("/ai/chat"))
        .json(&json!({ "message": question }));
    if let Some(t) = domain_token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn upload(s: &TestServer, admin: &str, path: &str, text: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .put(s.http(path))
        .bearer_auth(admin)
        .header("content-type", "text/markdown")
        .body(text.to_owned())
        .send()
        .await
        .unwrap();
    common::status_and_body(res).await
}

#[tokio::test]
async fn uploaded_documents_answer_at_once_and_stop_when_deleted() {
    let (admin, entry) = keys::generate_with(keys::ADMIN_KEY_PREFIX);
    let s = TestServer::start_with(move |c| {
        c.auth.admin_keys = vec![entry];
        c.domains[0].bot.as_mut().unwrap().enabled = true;
    })
    .await;
    let question = "Which payment cards does the shop accept?";
    let before = ask(&s, None, question).await;
    assert_eq!(before["offerHuman"], true, "{before}");

    let doc = "# Payments\n\nThe shop accepts Visa, Mastercard and American Express cards.";
    let (status, body) = upload(
        &s,
        &admin,
        "/api/admin/domains/demo/knowledge/payments.md",
        doc,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let answer = ask(&s, None, question).await;
    // The passage itself, its source named beside it, not in it.
    assert_eq!(
        answer["response"], "The shop accepts Visa, Mastercard and American Express cards.",
        "{answer}"
    );
    assert_eq!(
        answer["sources"],
        json!([{ "title": "Payments", "document": "payments.md", "heading": "Payments" }])
    );
    // The shipped documents still answer beside it.
    let other = ask(&s, None, "Is Parlor open source, under which licence?").await;
    assert!(
        other["response"].as_str().unwrap().contains("Apache"),
        "{other}"
    );

    let (status, _) = upload(
        &s,
        &admin,
        "/api/admin/domains/demo/knowledge/payments.md",
        doc,
    )
    .await;
    assert_eq!(status, 200, "replacing answers 200");
    let (_, list) = s
        .get_with("/api/admin/domains/demo/knowledge", &admin)
        .await;
    assert_eq!(list["documents"][0]["name"], "payments.md");
    assert_eq!(list["documents"][0]["bytes"], doc.len());

    // Survives a restart, then goes away when deleted.
    let s = s.restart().await;
    assert!(
        ask(&s, None, question).await["response"]
            .as_str()
            .unwrap()
            .contains("Visa")
    );
    let (status, _) = s
        .call(
            Method::DELETE,
            "/api/admin/domains/demo/knowledge/payments.md",
            &admin,
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(ask(&s, None, question).await["offerHuman"], true);
    let (status, _) = s
        .call(
            Method::DELETE,
            "/api/admin/domains/demo/knowledge/payments.md",
            &admin,
            None,
        )
        .await;
    assert_eq!(status, 404);

    // Refusals change nothing.
    for (path, text, want) in [
        (
            "/api/admin/domains/demo/knowledge/..%2Fetc%2Fpasswd",
            "x",
            400,
        ),
        ("/api/admin/domains/demo/knowledge/notes.exe", "x", 400),
        ("/api/admin/domains/demo/knowledge/empty.md", "  \n", 400),
        ("/api/admin/domains/nope/knowledge/a.md", "x", 404),
    ] {
        let (status, body) = upload(&s, &admin, path, text).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    let (status, _) = upload(&s, "pk_nope", "/api/admin/domains/demo/knowledge/a.md", "x").await;
    assert_eq!(status, 401);
    let (_, list) = s
        .get_with("/api/admin/domains/demo/knowledge", &admin)
        .await;
    assert_eq!(list["documents"], json!([]));
}

#[tokio::test]
async fn a_knowledge_folder_is_reindexed_when_a_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hours.md"),
        "# Opening hours\n\nWe open at nine.",
    )
    .unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let s = TestServer::start_with(move |c| {
        c.domains.push(DomainConfig {
            bot: Some(BotConfig {
                knowledge_dir: Some(path),
                knowledge_check_secs: 1,
                ..BotConfig::default()
            }),
            ..common::chat_domain("shop", "Shop")
        });
    })
    .await;
    let token = parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        "u",
        None,
        "agent",
        "shop",
        600,
    )
    .unwrap();
    let question = "Do you deliver on Sundays?";
    assert_eq!(ask(&s, Some(&token), question).await["offerHuman"], true);
    std::fs::create_dir(dir.path().join("shipping")).unwrap();
    std::fs::write(
        dir.path().join("shipping").join("delivery.md"),
        "# Delivery\n\nWe deliver every day, Sundays included.",
    )
    .unwrap();
    let mut answered = Value::Null;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answered = ask(&s, Some(&token), question).await;
        if answered["offerHuman"] != true {
            break;
        }
    }
    assert_eq!(
        answered["response"], "We deliver every day, Sundays included.",
        "{answered}"
    );
    assert_eq!(answered["sources"][0]["document"], "shipping/delivery.md");
    assert_eq!(answered["sources"][0]["title"], "Delivery");
}

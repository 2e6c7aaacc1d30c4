//! Server API keys: the seed-002 token flow (a back end asks `POST /api/ws/token` for a
//! user's connection token, the browser connects with it), server-side publish, rotation
//! with two keys, and what a key may not do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Client, TestServer};
use parlor::auth::keys;
use parlor::config::DomainConfig;
use serde_json::{Value, json};

struct Keys {
    acme_old: String,
    acme_new: String,
    globex: String,
}

async fn server() -> (TestServer, Keys) {
    let (acme_old, old_entry) = keys::generate();
    let (acme_new, new_entry) = keys::generate();
    let (globex, globex_entry) = keys::generate();
    let s = TestServer::start_with(move |c| {
        c.domains.push(DomainConfig {
            server_keys: vec![old_entry, new_entry],
            ..common::chat_domain("acme", "Acme")
        });
        c.domains.push(DomainConfig {
            server_keys: vec![globex_entry],
            ..common::chat_domain("globex", "Globex")
        });
    })
    .await;
    (
        s,
        Keys {
            acme_old,
            acme_new,
            globex,
        },
    )
}

async fn call(s: &TestServer, path: &str, key: &str, body: Value) -> (u16, Value) {
    s.post_with(path, key, &body).await
}

#[tokio::test]
async fn a_back_end_gets_a_token_for_its_user_who_then_chats_with_its_published_replies() {
    let (s, k) = server().await;
    let (status, body) = call(
        &s,
        "/api/ws/token",
        &k.acme_new,
        json!({ "userId": "cust-9", "name": "Dana", "role": "visitor", "ttlSecs": 600 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["domainId"], "acme");
    assert_eq!(body["role"], "visitor");
    assert!(body["expiresAt"].as_str().unwrap().ends_with('Z'));
    let token = body["token"].as_str().unwrap();

    // The browser connects with the token: it is Dana, a visitor of acme.
    let mut dana = Client::connect(&s.ws(&format!("/ws?token={token}"))).await;
    dana.join("support-9", None).await;
    dana.say("support-9", "my order is late", None).await;
    let own = dana.recv_type("message-received").await;
    assert_eq!(
        (&own["userId"], &own["userName"], &own["role"]),
        (&json!("cust-9"), &json!("Dana"), &json!("visitor"))
    );

    // The back end publishes a reply into Dana's room, labelled as the assistant.
    let (status, body) = call(
        &s,
        "/api/publish",
        &k.acme_old,
        json!({ "roomId": "support-9", "message": "Let me check.", "role": "assistant",
                "clientMessageId": "reply-1" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let reply = dana.recv_type("message-received").await;
    assert_eq!(reply["message"], "Let me check.");
    assert_eq!(reply["role"], "assistant");
    assert_eq!(reply["seq"], 2);
    // Publishing is idempotent like any send.
    let (status, again) = call(
        &s,
        "/api/publish",
        &k.acme_old,
        json!({ "chatRoomId": "support-9", "message": "Let me check.", "role": "assistant",
                "clientMessageId": "reply-1" }),
    )
    .await;
    assert_eq!((status, &again["seq"]), (200, &json!(2)));
}

#[tokio::test]
async fn what_a_server_key_may_not_do() {
    let (s, k) = server().await;
    // Another domain's key cannot publish into acme: its rooms are its own domain's, and
    // naming acme is refused outright.
    let (status, body) = call(
        &s,
        "/api/publish",
        &k.globex,
        json!({ "roomId": "support-9", "message": "spam", "domainId": "acme" }),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );

    // No key, a wrong key, or a user's token cannot publish or mint.
    let (status, body) = call(
        &s,
        "/api/publish",
        "pk_0000000000000000000000000000000000000000000000000000000000000000",
        json!({ "roomId": "r", "message": "x" }),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("invalid_token"))
    );
    let user = s.token("mallory");
    for path in ["/api/publish", "/api/ws/token"] {
        let (status, body) = call(
            &s,
            path,
            &user,
            json!({ "roomId": "r", "message": "x", "userId": "x" }),
        )
        .await;
        assert!(
            status == 403 || status == 400,
            "{path}: a user token must not be a server key: {status} {body}"
        );
        assert_ne!(status / 100, 2);
    }
    let res = reqwest::Client::new()
        .post(s.http("/api/ws/token"))
        .json(&json!({ "userId": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 403, "anonymous callers cannot mint");

    // Tokens are for visitors and agents only, with a bounded lifetime and a valid user id.
    for (body, code) in [
        (json!({ "userId": "x", "role": "admin" }), "forbidden"),
        (json!({ "userId": "x", "role": "service" }), "forbidden"),
        (json!({ "userId": "x", "role": "wizard" }), "invalid_role"),
        (json!({ "userId": "x", "ttlSecs": 0 }), "invalid_ttl"),
        (json!({ "userId": "x", "ttlSecs": 999_999 }), "invalid_ttl"),
        (json!({ "userId": "bad id!" }), "invalid_user_id"),
    ] {
        let (status, reply) = call(&s, "/api/ws/token", &k.acme_new, body.clone()).await;
        assert_eq!(reply["error"]["code"], code, "{body} → {status} {reply}");
    }
    // An agent token minted by acme's key is an acme agent, nothing more.
    let (_, body) = call(
        &s,
        "/api/ws/token",
        &k.acme_new,
        json!({ "userId": "ann", "role": "agent" }),
    )
    .await;
    let agent = body["token"].as_str().unwrap();
    let res = reqwest::Client::new()
        .post(s.http("/api/ws/token"))
        .bearer_auth(agent)
        .json(&json!({ "userId": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 403, "an agent cannot mint tokens");
}

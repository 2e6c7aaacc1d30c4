//! The admin API over real HTTP and WebSocket: domains created, changed and removed at run
//! time take effect at once and survive a restart; keys rotate with a grace period; stored
//! secrets never come back out; and nobody without the admin key gets in.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use parlor::auth::keys;
use parlor::config::{DomainConfig, Secret};
use reqwest::Method;
use serde_json::{Value, json};

const HS_SECRET: &str = "tenant-hs256-secret-0123456789-abcdef";
const INTERNAL_SECRET: &str = "globex-internal-secret-0123456789";

/// A server with an admin key and a config-file domain `acme` with a server key.
async fn server() -> (TestServer, String, String) {
    let (admin, admin_entry) = keys::generate_with(keys::ADMIN_KEY_PREFIX);
    let (acme_key, acme_entry) = keys::generate();
    let s = TestServer::start_with(move |c| {
        c.auth.admin_keys = vec![admin_entry];
        c.domains.push(DomainConfig {
            server_keys: vec![acme_entry],
            allowed_origins: vec!["https://acme.example".into()],
            ..common::chat_domain("acme", "Acme")
        });
    })
    .await;
    (s, admin, acme_key)
}

async fn put(s: &TestServer, admin: &str, id: &str, body: &Value) -> (u16, Value) {
    s.call(
        Method::PUT,
        &format!("/api/admin/domains/{id}"),
        admin,
        Some(body),
    )
    .await
}

async fn delete(s: &TestServer, admin: &str, path: &str) -> u16 {
    s.call(Method::DELETE, path, admin, None).await.0
}

/// An HS256 token of the tenant's own identity provider.
fn tenant_token(user: &str, role: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "iss": "https://id.globex.example", "sub": user, "role": role, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap()
}

fn globex_settings() -> Value {
    json!({
        "name": "Globex",
        "visitorRooms": "owned",
        "allowedOrigins": ["https://globex.example"],
        "jwt": { "secret": HS_SECRET, "issuer": ["https://id.globex.example"] },
        "internalSecret": INTERNAL_SECRET,
        "limits": { "maxConnections": 2 },
        // Plain chat rooms (no assistant, no hand-off), so nothing but the test writes.
        "handoff": { "enabled": false }
    })
}

async fn publish(s: &TestServer, key: &str, room: &str) -> u16 {
    s.post_with(
        "/api/publish",
        key,
        &json!({ "roomId": room, "message": "hello", "role": "assistant" }),
    )
    .await
    .0
}

#[tokio::test]
async fn only_the_admin_key_opens_the_admin_api() {
    let (s, admin, acme_key) = server().await;
    let (status, body) = s.get_with("/api/admin/domains", &admin).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "demo"]);
    assert_eq!(body["domains"][0]["source"], "config");

    let (other_admin, _) = keys::generate_with(keys::ADMIN_KEY_PREFIX);
    let domain_admin = parlor::auth::issue_token(
        &Secret::new(common::TEST_SECRET),
        "boss",
        None,
        "admin",
        "acme",
        600,
    )
    .unwrap();
    for token in [other_admin.as_str(), &acme_key, &domain_admin, "", "ak_"] {
        let (status, body) = s.get_with("/api/admin/domains", token).await;
        assert_eq!(status, 401, "{token:?} got in: {body}");
        assert_eq!(body["error"]["code"], "invalid_token");
        let (status, _) = put(&s, token, "evil", &globex_settings()).await;
        assert_eq!(status, 401);
    }
    // The admin key is not a token anywhere else.
    let (status, body) = s.get_with("/api/messages?chatRoomId=r", &admin).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        Client::try_connect(&s.ws(&format!("/ws?token={admin}")))
            .await
            .is_err()
    );
    // Nothing was created by the refused calls.
    let (status, _) = s.get_with("/api/admin/domains/evil", &admin).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_domain_created_at_run_time_works_at_once_and_after_a_restart() {
    let (s, admin, _) = server().await;
    // Before: the tenant's tokens are unknown.
    let url = |s: &TestServer| s.ws(&format!("/ws?token={}", tenant_token("ann", "visitor")));
    assert!(Client::try_connect(&url(&s)).await.is_err());

    let (status, body) = put(&s, &admin, "globex", &globex_settings()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["source"], "api");
    assert_eq!(body["allowedOrigins"], json!(["https://globex.example"]));
    assert_eq!(body["limits"]["maxConnections"], 2);
    assert_eq!(body["jwt"]["hasSecret"], true);
    assert_eq!(body["hasInternalSecret"], true);
    for secret in [HS_SECRET, INTERNAL_SECRET] {
        assert!(
            !body.to_string().contains(secret),
            "a stored secret came back: {body}"
        );
    }
    // The internal secret works as the domain's back end at once.
    assert_eq!(publish(&s, INTERNAL_SECRET, "g-0").await, 201);

    let mut ann = Client::connect(&url(&s)).await;
    let (joined, _) = ann.join("g-1", None).await;
    assert_eq!(joined["type"], "room-joined", "{joined}");
    ann.say("g-1", "hi from globex", Some("c1")).await;

    // Replacing the settings answers 200 and changes them at once.
    let mut changed = globex_settings();
    changed["name"] = json!("Globex Corp");
    let (status, body) = put(&s, &admin, "globex", &changed).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "Globex Corp");
    drop(ann);

    // A restart loads it from the database.
    let s = s.restart().await;
    let (status, body) = s.get_with("/api/admin/domains/globex", &admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "Globex Corp");
    let mut ann = Client::connect(&url(&s)).await;
    let (_, history) = ann.join("g-1", None).await;
    assert_eq!(history.len(), 1, "{history:?}");

    // Removed: its tokens stop working for new connections; the rooms stay stored.
    drop(ann);
    assert_eq!(delete(&s, &admin, "/api/admin/domains/globex").await, 204);
    assert!(Client::try_connect(&url(&s)).await.is_err());
    assert_eq!(delete(&s, &admin, "/api/admin/domains/globex").await, 404);
    let s = s.restart().await;
    assert!(Client::try_connect(&url(&s)).await.is_err());
    let (status, _) = put(&s, &admin, "globex", &globex_settings()).await;
    assert_eq!(status, 201);
    let mut ann = Client::connect(&url(&s)).await;
    let (_, history) = ann.join("g-1", None).await;
    assert_eq!(
        history.len(),
        1,
        "recreating the domain reaches its rooms again"
    );
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_reason_and_change_nothing() {
    let (s, admin, _) = server().await;
    let cases = [
        (
            json!({ "allowedOrigins": ["globex.example"] }),
            "scheme://host",
        ),
        (json!({ "visitorRoomz": "open" }), "`visitorRoomz`"),
        (
            json!({ "jwt": { "secret": HS_SECRET, "jwksUrl": "http://127.0.0.1:1/j", "issuer": ["x"] } }),
            "exactly one",
        ),
        (
            json!({ "limits": { "maxConnections": 0 } }),
            "greater than 0",
        ),
        (json!({ "serverKeys": ["md5:00"] }), "sha256"),
        (json!({ "id": "other" }), "differs"),
        (json!([1, 2]), "object"),
    ];
    for (body, why) in cases {
        let (status, answer) = put(&s, &admin, "globex", &body).await;
        assert_eq!(status, 400, "{body} was accepted: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{body}: {message:?} lacks {why:?}");
    }
    // An issuer another domain already uses would let one tenant's tokens land in another.
    let (status, _) = put(&s, &admin, "globex", &globex_settings()).await;
    assert_eq!(status, 201);
    let (status, answer) = put(&s, &admin, "initech", &globex_settings()).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("two domains")
    );
    // Invalid id in the path.
    let (status, _) = put(&s, &admin, "bad%20id", &json!({})).await;
    assert_eq!(status, 400);
    // Config-file domains belong to the file.
    let (status, answer) = put(&s, &admin, "acme", &json!({ "name": "Hijacked" })).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "domain_in_config_file");
    assert_eq!(delete(&s, &admin, "/api/admin/domains/acme").await, 409);
    let (_, list) = s.get_with("/api/admin/domains", &admin).await;
    let ids: Vec<&str> = list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "demo", "globex"]);
    assert_eq!(list["domains"][0]["name"], "Acme");
}

#[tokio::test]
async fn server_keys_rotate_with_a_grace_period_and_revoke_at_once() {
    let (s, admin, acme_key) = server().await;
    let add = |body: Value| {
        let s = &s;
        let admin = admin.clone();
        async move {
            s.post_with("/api/admin/domains/acme/keys", &admin, &body)
                .await
        }
    };
    let (status, first) = add(json!({})).await;
    assert_eq!(status, 201, "{first}");
    let first_key = first["key"].as_str().unwrap().to_owned();
    assert!(first_key.starts_with("pk_"));
    assert_eq!(publish(&s, &first_key, "r").await, 201);
    assert_eq!(
        publish(&s, &acme_key, "r").await,
        201,
        "config key still works"
    );

    // Rotate: the new key works now, the old one for one more second.
    let (status, second) = add(json!({ "retireOthersAfterSecs": 1 })).await;
    assert_eq!(status, 201, "{second}");
    let second_key = second["key"].as_str().unwrap().to_owned();
    assert_eq!(publish(&s, &second_key, "r").await, 201);
    assert_eq!(publish(&s, &first_key, "r").await, 201, "grace period");
    let (_, view) = s.get_with("/api/admin/domains/acme", &admin).await;
    let keys = view["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys[0]["expiresAt"].is_string() && keys[1]["expiresAt"].is_null());
    assert!(!view.to_string().contains(&first_key[3..]), "{view}");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(publish(&s, &first_key, "r").await, 401, "grace is over");
    assert_eq!(publish(&s, &second_key, "r").await, 201);
    let (_, view) = s.get_with("/api/admin/domains/acme", &admin).await;
    assert_eq!(view["keys"][0]["active"], false);

    // Survives a restart; revocation is immediate.
    let s = s.restart().await;
    assert_eq!(publish(&s, &second_key, "r").await, 201);
    assert_eq!(publish(&s, &first_key, "r").await, 401);
    let second_id = second["id"].as_str().unwrap();
    assert_eq!(
        delete(
            &s,
            &admin,
            &format!("/api/admin/domains/acme/keys/{second_id}")
        )
        .await,
        204
    );
    assert_eq!(publish(&s, &second_key, "r").await, 401);
    assert_eq!(
        delete(
            &s,
            &admin,
            &format!("/api/admin/domains/acme/keys/{second_id}")
        )
        .await,
        404
    );
    // Unknown domain, unknown kind.
    let (status, _) = s
        .post_with("/api/admin/domains/nope/keys", &admin, &json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = s
        .post_with(
            "/api/admin/domains/acme/keys",
            &admin,
            &json!({ "kind": "root" }),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_pusher_key_pair_shows_its_secret_once() {
    let (s, admin, _) = server().await;
    let (status, pair) = s
        .post_with(
            "/api/admin/domains/acme/keys",
            &admin,
            &json!({ "kind": "pusher" }),
        )
        .await;
    assert_eq!(status, 201, "{pair}");
    let secret = pair["secret"].as_str().unwrap();
    assert!(secret.len() >= 32);
    let (_, view) = s.get_with("/api/admin/domains/acme", &admin).await;
    assert_eq!(view["keys"][0]["key"], pair["key"]);
    assert_eq!(view["keys"][0]["kind"], "pusher");
    assert!(!view.to_string().contains(secret), "{view}");
}

#[tokio::test]
async fn a_domain_limits_its_connections_and_frame_rate() {
    let (s, admin, _) = server().await;
    let mut settings = globex_settings();
    settings["limits"] = json!({ "maxConnections": 2, "messagesPerSecond": 1, "messagesBurst": 2 });
    assert_eq!(put(&s, &admin, "globex", &settings).await.0, 201);
    let url = |user: &str| s.ws(&format!("/ws?token={}", tenant_token(user, "agent")));
    let mut a = Client::connect(&url("a")).await;
    let b = Client::connect(&url("b")).await;
    let third = Client::try_connect(&url("c")).await;
    match third {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 503),
        other => panic!("third connection: {:?}", other.map(|_| ())),
    }
    // Other domains are not affected.
    let _demo = s.connect().await;
    // A place frees when a connection closes.
    drop(b);
    let mut admitted = false;
    for _ in 0..50 {
        if Client::try_connect(&url("c")).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "the closed connection's place was not given back");
    // Two frames of burst, then `rate_limited`.
    for i in 0..2 {
        a.send(json!({ "type": "ping", "id": format!("p{i}") }))
            .await;
        assert_eq!(a.recv_type("pong").await["replyTo"], format!("p{i}"));
    }
    a.send(json!({ "type": "ping", "id": "p2" })).await;
    let error = a.recv_type("error").await;
    assert_eq!(error["code"], "rate_limited", "{error}");
}

#[tokio::test]
async fn visitor_tokens_work_without_a_configured_secret_and_outlive_a_restart() {
    let s = TestServer::start_with(|c| c.auth.jwt_secret = None).await;
    let (status, body) = common::status_and_body(
        reqwest::Client::new()
            .post(s.http("/api/visitor-token"))
            .json(&json!({ "domainId": "demo" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    let user = body["userId"].as_str().unwrap().to_owned();
    let s = s.restart().await;
    let mut c = Client::connect(&s.ws(&format!("/ws?token={token}"))).await;
    let (joined, _) = c.join("lobby", None).await;
    assert_eq!(joined["members"][0]["userId"], user, "{joined}");
}

//! Seed 002 (the Eclipse ws-server) against Parlor's `eclipse` dialect: the customer's app
//! signs HS256 tokens with its `JWT_SECRET` and claims `userId` and `chatId` (no `iss`);
//! the client connects at the server's bare URL, is in its chat at once, and switches on
//! `type: "message"` and `agent_joined`; the back end publishes with `INTERNAL_API_SECRET`
//! and assigns at `/api/chats/{id}/assign`. Several tabs of one chat stay in sync.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Client, TestServer};
use parlor::config::{ClaimPaths, Config, Dialect, DomainConfig, JwtConfig, Secret};
use serde_json::{Value, json};

/// The seed's own shared secrets (its README's `.env.local`).
const JWT_SECRET: &str = "6f52209920346cecd52e3c04a9bd89f61b36bfeca98c5e1ef39e1f72c655c847";
const INTERNAL_API_SECRET: &str =
    "42aec25f537b789468b932f13f693f6ea28112add82df9ee31b9e86781dd4b3b";
const CHAT: &str = "cmh1chat0001";

fn eclipse_domain(id: &str) -> DomainConfig {
    DomainConfig {
        dialect: Dialect::Eclipse,
        internal_secret: Some(Secret::new(INTERNAL_API_SECRET)),
        jwt: Some(JwtConfig {
            secret: Some(Secret::new(JWT_SECRET)),
            claims: ClaimPaths {
                user_id: "userId".into(),
                ..ClaimPaths::default()
            },
            ..JwtConfig::default()
        }),
        ..DomainConfig::new(id, "Eclipse")
    }
}

async fn server() -> TestServer {
    TestServer::start_with(|c: &mut Config| c.domains.push(eclipse_domain("eclipse"))).await
}

/// A token as the seed's `/api/ws/token` makes one.
fn token(claims: Value) -> String {
    let mut claims = claims;
    let now = chrono::Utc::now().timestamp();
    claims["iat"] = json!(now);
    claims["exp"] = json!(now + 3600);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn customer(user: &str, chat: &str) -> String {
    token(json!({ "userId": user, "chatId": chat }))
}

async fn backend(s: &TestServer, path: &str, secret: &str, body: &Value) -> (u16, Value) {
    s.post_with(path, secret, body).await
}

#[tokio::test]
async fn the_eclipse_client_works_unchanged() {
    let s = server().await;
    // A plain GET of the bare URL is still the health check.
    let health: Value = reqwest::get(s.http("/"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");

    // Two tabs of the customer's chat, at the bare URL, each in the chat at once.
    let url = s.ws(&format!("/?token={}", customer("cust-1", CHAT)));
    let mut tab1 = Client::connect(&url).await;
    let mut tab2 = Client::connect(&url).await;
    for tab in [&mut tab1, &mut tab2] {
        let joined = tab.recv_type("room-joined").await;
        assert_eq!(joined["roomId"], CHAT);
    }

    // The back end saves a reply in its own database and publishes it.
    let (status, stored) = backend(
        &s,
        "/api/publish",
        INTERNAL_API_SECRET,
        &json!({ "chatId": CHAT, "content": "Hi! How can I help you?", "userId": "agent-7", "userName": "Dana", "role": "agent" }),
    )
    .await;
    assert_eq!(status, 201, "{stored}");
    for tab in [&mut tab1, &mut tab2] {
        let m = tab.recv_type("message").await;
        assert_eq!(m["chatId"], CHAT);
        assert_eq!(m["message"], "Hi! How can I help you?");
        assert_eq!(m["userId"], "agent-7");
        assert_eq!(m["userName"], "Dana");
        assert_eq!(m["role"], "agent");
        assert_eq!(m["id"], stored["id"]);
    }

    // The customer writes on the socket; both tabs see it as a `message`.
    let id = tab1
        .request(json!({ "type": "send-message", "message": "I have a question" }))
        .await;
    assert_eq!(tab1.reply(&id).await["type"], "message-ack");
    for tab in [&mut tab1, &mut tab2] {
        let m = tab.recv_type("message").await;
        assert_eq!(m["userId"], "cust-1");
        assert_eq!(m["message"], "I have a question");
    }

    // An agent takes the chat in the customer's app: `agent_joined` reaches every tab.
    let (status, assigned) = backend(
        &s,
        &format!("/api/chats/{CHAT}/assign"),
        INTERNAL_API_SECRET,
        &json!({ "agentId": "agent-7", "agentName": "Dana" }),
    )
    .await;
    assert_eq!(status, 200, "{assigned}");
    for tab in [&mut tab1, &mut tab2] {
        let joined = tab.recv_type("agent_joined").await;
        assert_eq!(joined["chatId"], CHAT);
        assert_eq!(joined["agent"]["userId"], "agent-7", "{joined}");
        assert_eq!(joined["agent"]["name"], "Dana");
    }
    s.stop().await;
}

#[tokio::test]
async fn bad_tokens_secrets_and_chats_are_refused_and_store_nothing() {
    let s = server().await;
    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "userId": "x", "chatId": CHAT, "exp": chrono::Utc::now().timestamp() + 60 }),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-of-enough-length-0123456789"),
    )
    .unwrap();
    for (t, why) in [
        (customer("cust-1", "bad chat id!"), "chatId"),
        (token(json!({ "userId": "cust-1", "chatId": 42 })), "chatId"),
        (token(json!({ "chatId": CHAT })), "userId"),
        (wrong_key, "signature"),
    ] {
        let res = reqwest::Client::new()
            .get(s.http(&format!("/?token={t}")))
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        let (status, body) = common::status_and_body(res).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(body["error"]["code"], "invalid_token");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(why) || why == "signature",
            "{why}: {message}"
        );
    }
    // A wrong internal secret publishes and assigns nothing.
    for path in [
        "/api/publish".to_owned(),
        format!("/api/chats/{CHAT}/assign"),
    ] {
        let (status, body) = backend(
            &s,
            &path,
            "not-the-internal-secret",
            &json!({ "chatId": CHAT, "content": "x", "agentId": "a" }),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("invalid_token"))
        );
    }
    // A customer stays in its own chat: another's is not its to read or write.
    let mut other =
        Client::connect(&s.ws(&format!("/?token={}", customer("cust-2", "cmh2")))).await;
    other.recv_type("room-joined").await;
    let mut owner = Client::connect(&s.ws(&format!("/?token={}", customer("cust-1", CHAT)))).await;
    owner.recv_type("room-joined").await;
    let id = other
        .request(json!({ "type": "join-room", "roomId": CHAT }))
        .await;
    assert_eq!(other.reply(&id).await["code"], "forbidden");
    let page = owner.stored(CHAT).await;
    assert!(page.is_empty(), "{page:?}");
    s.stop().await;
}

#[tokio::test]
async fn two_domains_cannot_both_take_tokens_without_an_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database: format!("sqlite://{}", dir.path().join("x.db").display()),
        ..Config::default()
    };
    config.domains.push(eclipse_domain("one"));
    let mut two = eclipse_domain("two");
    two.internal_secret = None;
    config.domains.push(two);
    let err = match parlor::App::build(config, tokio_util::sync::CancellationToken::new()).await {
        Ok(_) => panic!("two issuer-less domains must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("at most one domain"), "{err}");
}

/// An issuer-less domain that verifies with public keys: its RS256 tokens reach it (they
/// are never Parlor's, which are HS256), and Parlor's own tokens still work beside it.
#[tokio::test]
async fn an_issuer_less_domain_takes_its_own_algorithms_and_parlor_tokens_still_work() {
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
    let s = TestServer::start_with(|c: &mut Config| {
        c.domains.push(DomainConfig {
            dialect: Dialect::Eclipse,
            jwt: Some(JwtConfig {
                public_keys: vec![format!("{FIXTURES}/rsa1.pub.pem")],
                algorithms: vec!["RS256".into()],
                claims: ClaimPaths {
                    user_id: "userId".into(),
                    ..ClaimPaths::default()
                },
                ..JwtConfig::default()
            }),
            ..DomainConfig::new("rsa", "RS256 without iss")
        });
    })
    .await;
    let key = std::fs::read_to_string(format!("{FIXTURES}/rsa1.key.pem")).unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({ "userId": "cust-9", "chatId": "c-9", "exp": chrono::Utc::now().timestamp() + 60 }),
        &jsonwebtoken::EncodingKey::from_rsa_pem(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let mut c = Client::connect(&s.ws(&format!("/?token={token}"))).await;
    let joined = c.recv_type("room-joined").await;
    assert_eq!(joined["roomId"], "c-9");
    assert_eq!(joined["members"][0]["userId"], "cust-9");
    let mut own = s.connect_as("parlor-user").await;
    let (joined, _) = own.join("lobby", None).await;
    assert_eq!(joined["members"][0]["userId"], "parlor-user");
    s.stop().await;
}

//! A domain's own JWTs over real sockets and HTTP: HS256 with a secret, RS256 from a PEM
//! file, RS256/ES256 from a local JWKS server (rotation and outage), claim paths, and the
//! tokens that must be refused.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use common::{Client, TEST_SECRET, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parlor::config::{ClaimPaths, DomainConfig, JwtConfig, Secret};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
const HS_SECRET: &str = "hs-domain-secret-0123456789-abcdefghij";
const HS_ISSUER: &str = "https://backend.hs.example";
const PEM_ISSUER: &str = "https://login.pem.example";
const JWKS_ISSUER: &str = "https://project.jwks.example/auth/v1";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).expect("fixture")
}

fn jwk(name: &str) -> Value {
    serde_json::from_str(&fixture(&format!("{name}.jwk.json"))).expect("jwk")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Signs `claims` with `alg` and the private key in fixture `key` (or the HS secret).
fn sign(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(key.as_bytes())
        }
        Algorithm::ES256 => {
            EncodingKey::from_ec_pem(fixture(&format!("{key}.key.pem")).as_bytes()).unwrap()
        }
        _ => EncodingKey::from_rsa_pem(fixture(&format!("{key}.key.pem")).as_bytes()).unwrap(),
    };
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

/// Supabase-shaped claims: role and name nested in metadata.
fn claims(iss: &str, sub: &str) -> Value {
    json!({
        "iss": iss, "sub": sub, "aud": "authenticated", "exp": now() + 600,
        "role": "authenticated",
        "app_metadata": { "parlor_role": "agent" },
        "user_metadata": { "name": format!("Agent {sub}") },
    })
}

fn nested_claims() -> ClaimPaths {
    ClaimPaths {
        user_id: "sub".into(),
        name: "user_metadata.name".into(),
        role: "app_metadata.parlor_role".into(),
        default_role: "visitor".into(),
        ..ClaimPaths::default()
    }
}

/// A JWKS document served over HTTP, with a switch to take it down and a fetch counter.
#[derive(Clone, Default)]
struct JwksServer {
    keys: Arc<parking_lot::Mutex<Vec<Value>>>,
    down: Arc<AtomicBool>,
    /// Answer with a document far larger than any key set.
    huge: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> (Self, String) {
        let server = Self::default();
        *server.keys.lock() = keys;
        let app = axum::Router::new()
            .route("/.well-known/jwks.json", axum::routing::get(serve_jwks))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (server, url)
    }
}

async fn serve_jwks(State(s): State<JwksServer>) -> axum::response::Response {
    s.fetches.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if s.huge.load(Ordering::SeqCst) {
        let mut keys = s.keys.lock().clone();
        keys.push(json!({ "kty": "oct", "k": "x".repeat(400 * 1024) }));
        return Json(json!({ "keys": keys })).into_response();
    }
    Json(json!({ "keys": *s.keys.lock() })).into_response()
}

async fn server(jwks_url: Option<&str>) -> TestServer {
    let jwks_url = jwks_url.map(str::to_owned);
    TestServer::start_with(move |c| {
        c.domains.push(DomainConfig {
            jwt: Some(JwtConfig {
                secret: Some(Secret::new(HS_SECRET)),
                issuer: vec![HS_ISSUER.into()],
                claims: nested_claims(),
                ..JwtConfig::default()
            }),
            ..common::chat_domain("hs", "HS256 back end")
        });
        c.domains.push(DomainConfig {
            jwt: Some(JwtConfig {
                public_keys: vec![format!("{FIXTURES}/rsa1.pub.pem")],
                issuer: vec![PEM_ISSUER.into()],
                audience: vec!["authenticated".into()],
                leeway_secs: 5,
                claims: nested_claims(),
                ..JwtConfig::default()
            }),
            ..common::chat_domain("pem", "PEM keys")
        });
        if let Some(url) = jwks_url {
            c.domains.push(DomainConfig {
                jwt: Some(JwtConfig {
                    jwks_url: Some(url),
                    issuer: vec![JWKS_ISSUER.into()],
                    audience: vec!["authenticated".into()],
                    jwks_min_refresh_secs: 0,
                    jwks_timeout_ms: 1000,
                    claims: nested_claims(),
                    ..JwtConfig::default()
                }),
                ..common::chat_domain("jwks", "JWKS")
            });
        }
    })
    .await
}

/// `GET /api/messages` with `token`: the status and the error code, if any.
async fn http_status(s: &TestServer, token: &str) -> (u16, Value) {
    s.get_with("/api/messages?chatRoomId=probe", token).await
}

/// Connects with `token`, sends a message in `room`, and returns it as broadcast.
async fn speak_as(s: &TestServer, token: &str, room: &str) -> Value {
    let mut c = Client::connect(&s.ws(&format!("/ws?token={token}"))).await;
    c.join(room, None).await;
    c.say(room, "hello", None).await;
    c.recv_type("message-received").await
}

/// The last message of `room` in `domain`, read by a Parlor-token agent of that domain.
async fn last_in(s: &TestServer, domain: &str, room: &str) -> Option<Value> {
    let secret = Secret::new(TEST_SECRET);
    let token =
        parlor::auth::issue_token(&secret, "reader", None, "agent", domain, 60).expect("token");
    let mut c = Client::connect(&s.ws(&format!("/ws?token={token}"))).await;
    let (_, history) = c.join(room, None).await;
    history.last().cloned()
}

#[tokio::test]
async fn hs256_domain_token_maps_nested_claims_into_its_domain() {
    let s = server(None).await;
    let token = sign(
        Algorithm::HS256,
        HS_SECRET,
        None,
        &claims(HS_ISSUER, "u-42"),
    );
    let m = speak_as(&s, &token, "hs-room").await;
    assert_eq!(m["userId"], "u-42");
    assert_eq!(m["userName"], "Agent u-42");
    assert_eq!(m["role"], "agent");
    let stored = last_in(&s, "hs", "hs-room")
        .await
        .expect("message in domain hs");
    assert_eq!(stored["userId"], "u-42");
    assert!(
        last_in(&s, "demo", "hs-room").await.is_none(),
        "the message must not be in the demo domain"
    );

    // Without the role claim the configured default applies.
    let mut c = claims(HS_ISSUER, "u-43");
    c["app_metadata"] = json!({});
    let m = speak_as(
        &s,
        &sign(Algorithm::HS256, HS_SECRET, None, &c),
        "hs-room-2",
    )
    .await;
    assert_eq!(m["role"], "visitor");
}

#[tokio::test]
async fn pem_domain_accepts_rs256_and_refuses_every_bad_token() {
    let s = server(None).await;
    let good = claims(PEM_ISSUER, "p-1");
    let token = sign(Algorithm::RS256, "rsa1", None, &good);
    assert_eq!(http_status(&s, &token).await.0, 200);

    let public_pem = fixture("rsa1.pub.pem");
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let unsigned = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(good.to_string())
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            sign(
                Algorithm::RS256,
                "rsa1",
                None,
                &with(json!({"exp": now() - 60})),
            ),
            "expired",
        ),
        (
            "not yet valid",
            sign(
                Algorithm::RS256,
                "rsa1",
                None,
                &with(json!({"nbf": now() + 300})),
            ),
            "not valid yet",
        ),
        (
            "wrong audience",
            sign(
                Algorithm::RS256,
                "rsa1",
                None,
                &with(json!({"aud": "someone-else"})),
            ),
            "audience",
        ),
        (
            // The domain names an audience: a token that names none is not for it.
            "no audience",
            {
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("aud");
                sign(Algorithm::RS256, "rsa1", None, &c)
            },
            "aud",
        ),
        (
            "wrong key",
            sign(Algorithm::RS256, "rsa2", None, &good),
            "signature",
        ),
        (
            // Signed correctly, but for an issuer no domain accepts: it is then a Parlor
            // token candidate, and the server's own secret does not verify it.
            "unknown issuer",
            sign(
                Algorithm::RS256,
                "rsa1",
                None,
                &with(json!({"iss": "https://evil.example"})),
            ),
            "invalid",
        ),
        ("alg none", unsigned, "invalid"),
        (
            // The classic confusion: HMAC "signed" with the public key's PEM text.
            "HS256 with the RSA public key as secret",
            sign(Algorithm::HS256, &public_pem, None, &good),
            "not accepted",
        ),
        (
            "truncated",
            {
                let t = sign(Algorithm::RS256, "rsa1", None, &good);
                t[..t.len() - 20].to_owned()
            },
            "invalid",
        ),
        (
            "no exp",
            {
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("exp");
                sign(Algorithm::RS256, "rsa1", None, &c)
            },
            "exp",
        ),
        (
            "no user id",
            {
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("sub");
                sign(Algorithm::RS256, "rsa1", None, &c)
            },
            "user id",
        ),
        (
            "unknown role",
            sign(
                Algorithm::RS256,
                "rsa1",
                None,
                &with(json!({"app_metadata": {"parlor_role": "superuser"}})),
            ),
            "unknown role",
        ),
        ("garbage", "not.a.token".to_owned(), "invalid"),
    ];
    for (name, token, reason) in cases {
        let (status, body) = http_status(&s, &token).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"]["code"], "invalid_token", "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(reason),
            "{name}: {message:?} should mention {reason:?}"
        );
        // The WebSocket refuses it the same way wherever it comes: `?token=`, the
        // `Authorization` header, the `bearer.` subprotocol (before any frame), and the
        // `auth` frame of an anonymous connection.
        let refused = Client::try_connect(&s.ws(&format!("/ws?token={token}"))).await;
        assert!(refused.is_err(), "{name}: the socket must be refused");
        for (header, value) in [
            ("authorization", format!("Bearer {token}")),
            ("sec-websocket-protocol", format!("parlor, bearer.{token}")),
        ] {
            let mut req = s.ws("/ws").into_client_request().unwrap();
            let Ok(value) = value.parse() else {
                // Not a valid header value (the garbage cases): no client can send it.
                continue;
            };
            req.headers_mut().insert(header, value);
            let refused = tokio_tungstenite::connect_async(req).await;
            let Err(tokio_tungstenite::tungstenite::Error::Http(res)) = refused else {
                panic!("{name}: the socket with the token in {header} must be refused");
            };
            assert_eq!(res.status(), 401, "{name}: {header}");
        }
        let mut anonymous = Client::connect(&s.ws("/ws")).await;
        let id = anonymous
            .request(json!({ "type": "auth", "token": token }))
            .await;
        let reply = anonymous.reply(&id).await;
        assert_eq!(reply["type"], "error", "{name}: {reply}");
        assert_eq!(reply["code"], "invalid_token", "{name}: {reply}");
    }
    // Nothing above left a trace: the probe room has no message.
    assert!(last_in(&s, "pem", "probe").await.is_none());
}

#[tokio::test]
async fn jwks_domain_verifies_rs256_and_es256_follows_rotation_and_survives_an_outage() {
    let (jwks, url) = JwksServer::start(vec![jwk("rsa1"), jwk("ec1")]).await;
    let s = server(Some(&url)).await;

    let rs = sign(
        Algorithm::RS256,
        "rsa1",
        Some("rsa1"),
        &claims(JWKS_ISSUER, "j-1"),
    );
    let es = sign(
        Algorithm::ES256,
        "ec1",
        Some("ec1"),
        &claims(JWKS_ISSUER, "j-2"),
    );
    for _ in 0..3 {
        assert_eq!(http_status(&s, &rs).await.0, 200);
        assert_eq!(http_status(&s, &es).await.0, 200);
    }
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "keys are cached");
    let m = speak_as(&s, &es, "jwks-room").await;
    assert_eq!(
        (m["userId"].as_str(), m["role"].as_str()),
        (Some("j-2"), Some("agent"))
    );

    // Rotation: a token signed by a key the JWKS does not publish yet is refused…
    let rotated = sign(
        Algorithm::RS256,
        "rsa2",
        Some("rsa2"),
        &claims(JWKS_ISSUER, "j-3"),
    );
    let (status, body) = http_status(&s, &rotated).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown key id")
    );
    // …and accepted once the provider publishes it: an unknown kid fetches the JWKS again.
    jwks.keys.lock().push(jwk("rsa2"));
    assert_eq!(http_status(&s, &rotated).await.0, 200);

    // Outage: the keys already held keep working, an unknown key is still refused.
    jwks.down.store(true, Ordering::SeqCst);
    let before = jwks.fetches.load(Ordering::SeqCst);
    assert_eq!(http_status(&s, &rs).await.0, 200);
    assert_eq!(http_status(&s, &rotated).await.0, 200);
    let stranger = sign(
        Algorithm::RS256,
        "rsa2",
        Some("rsa-9"),
        &claims(JWKS_ISSUER, "j-4"),
    );
    assert_eq!(http_status(&s, &stranger).await.0, 401);
    assert!(
        jwks.fetches.load(Ordering::SeqCst) > before,
        "the unknown kid tried the JWKS"
    );
    // A kid it knows, but a key of the wrong type for the token's algorithm.
    let mismatched = sign(
        Algorithm::RS256,
        "rsa1",
        Some("ec1"),
        &claims(JWKS_ISSUER, "j-5"),
    );
    assert_eq!(http_status(&s, &mismatched).await.0, 401);
}

#[tokio::test]
async fn unusable_domain_jwt_settings_stop_the_server_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            JwtConfig {
                secret: Some(Secret::new(HS_SECRET)),
                jwks_url: Some("http://127.0.0.1:1/jwks.json".into()),
                issuer: vec!["x".into()],
                ..JwtConfig::default()
            },
            "exactly one",
        ),
        (
            JwtConfig {
                secret: Some(Secret::new("short")),
                issuer: vec!["x".into()],
                ..JwtConfig::default()
            },
            "32 bytes",
        ),
        (
            JwtConfig {
                secret: Some(Secret::new(HS_SECRET)),
                issuer: vec!["x".into()],
                algorithms: vec!["RS256".into()],
                ..JwtConfig::default()
            },
            "go with",
        ),
        (
            JwtConfig {
                public_keys: vec!["/nonexistent/key.pem".into()],
                issuer: vec!["x".into()],
                ..JwtConfig::default()
            },
            "cannot read",
        ),
    ];
    for (jwt, expected) in cases {
        let mut config = parlor::config::Config {
            database: format!("sqlite://{}", dir.path().join("x.db").display()),
            ..parlor::config::Config::default()
        };
        config.domains.push(DomainConfig {
            jwt: Some(jwt),
            ..common::chat_domain("bad", "")
        });
        let err = match parlor::App::build(config, tokio_util::sync::CancellationToken::new()).await
        {
            Ok(_) => panic!("the server must refuse a domain with {expected:?} wrong"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("domains.bad.jwt"), "{err}");
        assert!(
            err.contains(expected),
            "{err:?} should mention {expected:?}"
        );
    }
}

#[tokio::test]
async fn every_configured_algorithm_verifies_and_only_those() {
    const ISS: &str = "https://algs.example";
    let s = TestServer::start_with(|c| {
        let domain = |id: &str, iss: &str, jwt: JwtConfig| DomainConfig {
            jwt: Some(JwtConfig {
                issuer: vec![iss.into()],
                ..jwt
            }),
            ..common::chat_domain(id, id)
        };
        c.domains.push(domain(
            "ed",
            &format!("{ISS}/ed"),
            JwtConfig {
                public_keys: vec![format!("{FIXTURES}/ed1.pub.pem")],
                algorithms: vec!["EdDSA".into()],
                ..JwtConfig::default()
            },
        ));
        c.domains.push(domain(
            "ps",
            &format!("{ISS}/ps"),
            JwtConfig {
                public_keys: vec![fixture("rsa1.pub.pem")],
                algorithms: vec!["PS256".into(), "RS512".into()],
                ..JwtConfig::default()
            },
        ));
        c.domains.push(domain(
            "hs512",
            &format!("{ISS}/hs512"),
            JwtConfig {
                secret: Some(Secret::new(HS_SECRET)),
                algorithms: vec!["HS512".into()],
                ..JwtConfig::default()
            },
        ));
    })
    .await;
    let claims_for =
        |d: &str| json!({ "iss": format!("{ISS}/{d}"), "sub": "a-1", "exp": now() + 60 });
    let ed = {
        let key = EncodingKey::from_ed_pem(fixture("ed1.key.pem").as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims_for("ed"), &key).unwrap()
    };
    let accepted = [
        ed,
        sign(Algorithm::PS256, "rsa1", None, &claims_for("ps")),
        sign(Algorithm::RS512, "rsa1", None, &claims_for("ps")),
        sign(Algorithm::HS512, HS_SECRET, None, &claims_for("hs512")),
    ];
    for token in &accepted {
        let (status, body) = http_status(&s, token).await;
        assert_eq!(status, 200, "{body}");
    }
    let refused = [
        sign(Algorithm::RS256, "rsa1", None, &claims_for("ps")),
        sign(Algorithm::HS256, HS_SECRET, None, &claims_for("hs512")),
        sign(Algorithm::ES256, "ec1", None, &claims_for("ed")),
    ];
    for token in &refused {
        let (status, body) = http_status(&s, token).await;
        assert_eq!(status, 401, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not accepted"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn an_oversized_jwks_is_not_read_and_its_keys_are_not_trusted() {
    let (jwks, url) = JwksServer::start(vec![jwk("rsa1")]).await;
    jwks.huge.store(true, Ordering::SeqCst);
    let s = server(Some(&url)).await;
    let token = sign(
        Algorithm::RS256,
        "rsa1",
        Some("rsa1"),
        &claims(JWKS_ISSUER, "j-1"),
    );
    let (status, body) = http_status(&s, &token).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);
    // Once the provider answers sensibly, the same token works.
    jwks.huge.store(false, Ordering::SeqCst);
    assert_eq!(http_status(&s, &token).await.0, 200);
}

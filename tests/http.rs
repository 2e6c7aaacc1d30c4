//! The HTTP API through the router with `oneshot`: seed endpoints, paging, health, metrics,
//! and every kind of bad request answered with `{"error":{"code","message"}}`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use parlor::config::Config;
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &str = "http-test-secret-0123456789";

struct Harness {
    router: axum::Router,
    app: parlor::App,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database: format!("sqlite://{}", dir.path().join("p.db").display()),
        ..Config::default()
    };
    config.limits.max_body_bytes = 64 * 1024;
    config.limits.max_message_bytes = 1000;
    config.auth.jwt_secret = Some(parlor::config::Secret::new(SECRET));
    config.validate().unwrap();
    let app = parlor::App::build(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    Harness {
        router: app.router(),
        app,
        _dir: dir,
    }
}

impl Harness {
    async fn call(&self, req: Request<Body>) -> (StatusCode, Value) {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        self.call(
            Request::post(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }
}

/// The `seq`s of a page's messages.
fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

fn assert_error(status: StatusCode, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn seed_message_endpoints_and_room_paging() {
    let h = harness().await;
    for i in 1..=5 {
        let (status, m) = h
            .post(
                "/api/messages",
                &json!({ "message": format!("m{i}"), "role": "user", "chatRoomId": "room-1" }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(m["seq"], i);
        assert_eq!(m["chatRoomId"], "room-1");
    }
    let (status, list) = h.get("/api/messages?chatRoomId=room-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["messages"].as_array().unwrap().len(), 5);

    let (_, page) = h.get("/api/rooms/room-1/messages?after=1&limit=2").await;
    assert_eq!(
        (
            seqs(&page),
            page["hasMore"].as_bool(),
            page["lastSeq"].as_u64()
        ),
        (vec![2, 3], Some(true), Some(5))
    );
    let (_, page) = h.get("/api/rooms/room-1/messages?before=3&limit=10").await;
    assert_eq!(
        (seqs(&page), page["hasMore"].as_bool()),
        (vec![1, 2], Some(false))
    );
    let (_, page) = h.get("/api/rooms/room-1/messages?limit=2").await;
    assert_eq!(seqs(&page), [4, 5], "no cursor gives the latest page");

    // Idempotent POST: the same author's clientMessageId again → 200 with the original.
    // (Idempotency keys are per author, so it takes a stable identity: a token.)
    let token = parlor::auth::issue_token(
        &parlor::config::Secret::new(SECRET),
        "backend",
        None,
        "service",
        "demo",
        600,
    )
    .unwrap();
    let body = json!({ "message": "once", "chatRoomId": "room-1", "clientMessageId": "k-1" });
    let post = || {
        Request::post("/api/messages")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (s1, first) = h.call(post()).await;
    let (s2, second) = h.call(post()).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(first["id"], second["id"]);
    // An anonymous caller using the same key is someone else: a new message.
    let (s3, third) = h.post("/api/messages", &body).await;
    assert_eq!(s3, StatusCode::CREATED);
    assert_ne!(third["id"], first["id"]);
}

#[tokio::test]
async fn a_failed_node_is_unhealthy_says_why_and_stops() {
    let h = harness().await;
    let supervisor = &h.app.state.supervisor;
    supervisor.panicked("sqlite-writer", &"disk on fire");
    let (status, body) = h.get("/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["failure"], "sqlite-writer panicked: disk on fire");
    assert!(
        h.app.state.supervisor.shutdown().is_cancelled(),
        "the node shuts down"
    );
    let (_, metrics) = h.get("/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(r#"parlor_task_panics_total{task="sqlite-writer"} 1"#),
        "the panic is counted"
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let h = harness().await;
    for path in ["/", "/health"] {
        let (status, body) = h.get(path).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "healthy");
        assert_eq!(body["connections"], json!({ "total": 0, "active": 0 }));
        assert_eq!(body["store"]["status"], "ok");
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
        assert!(body["uptime"].is_u64());
    }
    h.post(
        "/api/messages",
        &json!({ "message": "x", "chatRoomId": "r" }),
    )
    .await;
    let res = h
        .router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for name in [
        "parlor_connections ",
        "parlor_messages_stored_total 1",
        "parlor_store_latency_seconds_bucket",
        "parlor_fanout_dropped_total",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_store_nothing() {
    let h = harness().await;
    let raw = |method: &str, uri: &str, ctype: Option<&str>, body: Vec<u8>| {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(c) = ctype {
            b = b.header(header::CONTENT_TYPE, c);
        }
        b.body(Body::from(body)).unwrap()
    };
    let cases = [
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                b"{oops".to_vec(),
            ),
            400,
            "invalid_json",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                br#"{"message":"x"}"#.to_vec(),
            ),
            400,
            "invalid_body",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                br#"{"message":1,"chatRoomId":"r"}"#.to_vec(),
            ),
            400,
            "invalid_body",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("multipart/form-data; boundary=x"),
                br#"{"message":"x","chatRoomId":"r"}"#.to_vec(),
            ),
            415,
            "unsupported_media_type",
        ),
        (
            // A form (what `curl -d` sends) is read as JSON, and a real form is not JSON.
            raw(
                "POST",
                "/api/messages",
                Some("application/x-www-form-urlencoded"),
                b"message=x&chatRoomId=r".to_vec(),
            ),
            400,
            "invalid_json",
        ),
        (
            // Read as JSON (the seeds' clients post that way), and it is not.
            raw(
                "POST",
                "/api/messages",
                Some("text/plain;charset=UTF-8"),
                b"message=x&chatRoomId=r".to_vec(),
            ),
            400,
            "invalid_json",
        ),
        (
            raw("POST", "/api/messages", None, b"".to_vec()),
            400,
            "invalid_json",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                vec![b' '; 100 * 1024],
            ),
            413,
            "payload_too_large",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                br#"{"message":"x","chatRoomId":"a b"}"#.to_vec(),
            ),
            400,
            "invalid_room_id",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                br#"{"message":"","chatRoomId":"r"}"#.to_vec(),
            ),
            400,
            "empty_message",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                br#"{"message":"x","chatRoomId":"r","role":"assistant"}"#.to_vec(),
            ),
            403,
            "forbidden",
        ),
        (
            raw(
                "POST",
                "/api/messages",
                Some("application/json"),
                br#"{"message":"x","chatRoomId":"r","data":[1]}"#.to_vec(),
            ),
            400,
            "invalid_data",
        ),
        (
            raw("GET", "/api/messages", None, vec![]),
            400,
            "invalid_query",
        ),
        (
            raw("GET", "/api/rooms/r/messages?after=x", None, vec![]),
            400,
            "invalid_query",
        ),
        (
            raw(
                "GET",
                "/api/rooms/r/messages?after=1&before=2",
                None,
                vec![],
            ),
            404,
            "room_not_found",
        ),
        (
            raw("GET", "/api/rooms/nope/messages", None, vec![]),
            404,
            "room_not_found",
        ),
        (raw("GET", "/no/such/thing", None, vec![]), 404, "not_found"),
        (
            raw("DELETE", "/api/messages", None, vec![]),
            405,
            "method_not_allowed",
        ),
    ];
    for (req, status, code) in cases {
        let label = format!("{} {}", req.method(), req.uri());
        let (s, body) = h.call(req).await;
        assert_eq!(s.as_u16(), status, "{label}: {body}");
        assert_error(s, &body, status, code);
    }
    let too_long = "x".repeat(1001);
    let (s, body) = h
        .post(
            "/api/messages",
            &json!({ "message": too_long, "chatRoomId": "r" }),
        )
        .await;
    assert_error(s, &body, 413, "message_too_long");

    // None of that stored anything: the room does not even exist.
    let (s, body) = h.get("/api/rooms/r/messages").await;
    assert_error(s, &body, 404, "room_not_found");
    // A room that exists: after+before together is refused.
    h.post(
        "/api/messages",
        &json!({ "message": "ok", "chatRoomId": "r" }),
    )
    .await;
    let (s, body) = h.get("/api/rooms/r/messages?after=1&before=2").await;
    assert_error(s, &body, 400, "invalid_query");
}

#[tokio::test]
async fn tenants_are_isolated_by_domain() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database: format!("sqlite://{}", dir.path().join("p.db").display()),
        ..Config::default()
    };
    config.auth.jwt_secret = Some(parlor::config::Secret::new("tenant-secret-0123456789"));
    config
        .domains
        .push(parlor::config::DomainConfig::new("acme", "Acme"));
    config.validate().unwrap();
    let secret = config.auth.jwt_secret.clone().unwrap();
    let app = parlor::App::build(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let router = app.router();
    let token = |domain: &str| {
        parlor::auth::issue_token(&secret, "agent-1", None, "agent", domain, 600).unwrap()
    };
    let send = |domain: &str, req: axum::http::request::Builder| {
        req.header(header::AUTHORIZATION, format!("Bearer {}", token(domain)))
    };

    let post = send("acme", Request::post("/api/messages"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({ "message": "acme secret", "chatRoomId": "shared-name" }).to_string(),
        ))
        .unwrap();
    assert_eq!(
        router.clone().oneshot(post).await.unwrap().status(),
        StatusCode::CREATED
    );

    // The same room id from the demo domain (token and anonymous) is another, empty room.
    let from_demo = send("demo", Request::get("/api/rooms/shared-name/messages"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        router.clone().oneshot(from_demo).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let anon = Request::get("/api/messages?chatRoomId=shared-name")
        .body(Body::empty())
        .unwrap();
    let res = router.clone().oneshot(anon).await.unwrap();
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["messages"], json!([]));
    let from_acme = send("acme", Request::get("/api/rooms/shared-name/messages"))
        .body(Body::empty())
        .unwrap();
    let res = router.clone().oneshot(from_acme).await.unwrap();
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["messages"][0]["message"], "acme secret");
}

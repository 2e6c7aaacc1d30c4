//! The HTTP edge over real sockets: per-IP rate limits on connects, requests and visitor
//! tokens (429 with `Retry-After`), visitor tokens only for a domain's own origins, the
//! WebSocket `Origin` check, and CORS.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::TestServer;
use parlor::config::DomainConfig;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SHOP: &str = "https://shop.example";

async fn server(
    configure: impl FnOnce(&mut parlor::config::Config) + Send + 'static,
) -> TestServer {
    TestServer::start_with(move |c| {
        c.domains.push(DomainConfig {
            allowed_origins: vec![SHOP.into()],
            ..common::chat_domain("shop", "Shop")
        });
        configure(c);
    })
    .await
}

/// Opens `/ws` with an optional `Origin`; the HTTP status of a refused upgrade, or 101.
async fn ws_status(s: &TestServer, query: &str, origin: Option<&str>) -> u16 {
    let mut req = s.ws(&format!("/ws{query}")).into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

async fn visitor_token(s: &TestServer, domain: &str, origin: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(s.http("/api/visitor-token"))
        .json(&json!({ "domainId": domain }));
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    common::status_and_body(req.send().await.unwrap()).await
}

#[tokio::test]
async fn connects_and_requests_beyond_an_ips_budget_get_429_with_retry_after() {
    let s = server(|c| {
        c.limits.ip_connects_per_second = 1;
        c.limits.ip_connects_burst = 3;
        c.limits.ip_requests_per_second = 1;
        c.limits.ip_requests_burst = 4;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(ws_status(&s, "", None).await, 101);
    }
    assert_eq!(ws_status(&s, "", None).await, 429);
    // The bare URL's WebSocket (the Eclipse client's) draws on the same budget.
    let bare = s.ws("/").into_client_request().unwrap();
    match tokio_tungstenite::connect_async(bare).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 429);
        }
        other => panic!("the bare URL's upgrade must be limited: {other:?}"),
    }

    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..6 {
        let res = http
            .get(s.http("/api/messages?chatRoomId=r"))
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
        last = Some(res);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    let res = last.unwrap();
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    // Monitoring is never limited.
    for _ in 0..10 {
        assert_eq!(
            http.get(s.http("/health")).send().await.unwrap().status(),
            200
        );
    }
    assert!(s.metric("parlor_client_errors_total", "rate_limited").await >= 3.0);
}

#[tokio::test]
async fn visitor_tokens_only_for_the_domains_origins_and_rate_limited() {
    let s = server(|c| c.limits.ip_visitor_tokens_per_minute = 5).await;
    let (status, body) = visitor_token(&s, "shop", Some(SHOP)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["domainId"], "shop");
    let user = body["userId"].as_str().unwrap().to_owned();
    assert!(user.starts_with("v_"));
    let token = body["token"].as_str().unwrap().to_owned();

    // The token is a stable visitor identity of the shop domain.
    let mut req = s
        .ws(&format!("/ws?token={token}"))
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("Origin", SHOP.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = common::Client { ws, next_id: 0 };
    c.join("my-chat", None).await;
    c.say("my-chat", "hi", None).await;
    let m = c.recv_type("message-received").await;
    assert_eq!(
        (m["userId"].as_str(), m["role"].as_str()),
        (Some(user.as_str()), Some("visitor"))
    );

    for (origin, status, code) in [
        (Some("https://evil.example"), 403, "origin_not_allowed"),
        (None, 403, "origin_not_allowed"),
    ] {
        let (got, body) = visitor_token(&s, "shop", origin).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{origin:?}"
        );
    }
    let (got, body) = visitor_token(&s, "nowhere", Some(SHOP)).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (404, Some("unknown_domain"))
    );

    // The demo domain accepts any origin, and callers without one.
    assert_eq!(visitor_token(&s, "demo", None).await.0, 200);
    // Five attempts per minute from this address, refused ones included: the sixth is
    // refused.
    let (got, body) = visitor_token(&s, "shop", Some(SHOP)).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
}

#[tokio::test]
async fn sockets_and_cors_follow_each_domains_origins() {
    let s = server(|c| {
        // Without the demo's "*", CORS answers only for the listed origins.
        for d in &mut c.domains {
            if d.id == "demo" {
                d.allowed_origins.clear();
            }
        }
    })
    .await;
    let secret = parlor::config::Secret::new(common::TEST_SECRET);
    let shop = parlor::auth::issue_token(&secret, "u1", None, "visitor", "shop", 60).unwrap();
    let q = format!("?token={shop}");
    assert_eq!(ws_status(&s, &q, Some(SHOP)).await, 101);
    assert_eq!(ws_status(&s, &q, Some("https://shop.example/")).await, 101);
    assert_eq!(ws_status(&s, &q, Some("https://evil.example")).await, 403);
    assert_eq!(
        ws_status(&s, &q, None).await,
        101,
        "non-browser clients send no Origin"
    );
    // The demo domain now lists no origin: browser pages cannot open its sockets.
    assert_eq!(ws_status(&s, "", Some(SHOP)).await, 403);
    // Parlor's own pages (the inbox, served from this server) open any domain's sockets:
    // their origin is the host the request goes to.
    let own = format!("http://{}", s.addr);
    assert_eq!(ws_status(&s, &q, Some(&own)).await, 101);
    assert_eq!(ws_status(&s, "", Some(&own)).await, 101);
    // Another port of the same host is another origin.
    let other_port = format!("http://127.0.0.1:{}", s.addr.port() + 1);
    assert_eq!(ws_status(&s, &q, Some(&other_port)).await, 403);

    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, s.http("/api/messages"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let ok = preflight(SHOP).await.unwrap();
    assert_eq!(ok.headers()["access-control-allow-origin"], SHOP);
    let evil = preflight("https://evil.example").await.unwrap();
    assert!(evil.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn tokens_also_come_as_a_subprotocol_or_a_first_auth_frame() {
    let s = server(|_| {}).await;
    let secret = parlor::config::Secret::new(common::TEST_SECRET);
    let token = parlor::auth::issue_token(&secret, "sub-user", None, "agent", "demo", 60).unwrap();

    // Browsers cannot set headers on a WebSocket: `parlor, bearer.<token>` as subprotocols.
    let mut req = s.ws("/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("parlor, bearer.{token}").parse().unwrap(),
    );
    let (ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        res.headers()["sec-websocket-protocol"],
        "parlor",
        "never the token"
    );
    let mut c = common::Client { ws, next_id: 0 };
    c.join("sp-room", None).await;
    c.say("sp-room", "hi", None).await;
    let m = c.recv_type("message-received").await;
    assert_eq!(
        (m["userId"].as_str(), m["role"].as_str()),
        (Some("sub-user"), Some("agent"))
    );

    // An anonymous connection authenticates with its first frame.
    let mut c = common::Client::connect(&s.ws("/ws")).await;
    let id = c
        .request(json!({ "type": "auth", "token": "not-a-token" }))
        .await;
    let refused = c.reply(&id).await;
    assert_eq!(refused["code"], "invalid_token", "{refused}");
    let id = c.request(json!({ "type": "auth", "token": token })).await;
    let ok = c.reply(&id).await;
    assert_eq!(ok["type"], "authenticated", "{ok}");
    assert_eq!(
        (ok["userId"].as_str(), ok["domainId"].as_str()),
        (Some("sub-user"), Some("demo"))
    );
    c.join("af-room", None).await;
    c.say("af-room", "hello", None).await;
    let m = c.recv_type("message-received").await;
    assert_eq!(m["userId"], "sub-user");
    // Once only, and never after joining a room.
    let id = c.request(json!({ "type": "auth", "token": token })).await;
    assert_eq!(c.reply(&id).await["code"], "auth_not_allowed");
    let mut late = common::Client::connect(&s.ws("/ws")).await;
    late.join("late-room", None).await;
    let id = late
        .request(json!({ "type": "auth", "token": token }))
        .await;
    assert_eq!(late.reply(&id).await["code"], "auth_not_allowed");
}

#[tokio::test]
async fn one_identity_has_one_budget_across_sockets_and_requests() {
    let s = server(|c| {
        c.limits.identity_requests_per_second = 1;
        c.limits.identity_requests_burst = 3;
    })
    .await;
    let token = s.token("busy");
    assert_eq!(ws_status(&s, &format!("?token={token}"), None).await, 101);
    let http = reqwest::Client::new();
    let get = |t: Option<String>| {
        let mut r = http.get(s.http("/api/messages?chatRoomId=r"));
        if let Some(t) = t {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(get(Some(token.clone())).await.unwrap().status(), 200);
    assert_eq!(get(Some(token.clone())).await.unwrap().status(), 200);
    let refused = get(Some(token.clone())).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(ws_status(&s, &format!("?token={token}"), None).await, 429);
    // Others are not affected: another user, and anonymous callers.
    assert_eq!(get(Some(s.token("calm"))).await.unwrap().status(), 200);
    assert_eq!(get(None).await.unwrap().status(), 200);
}

/// Requests `GET /api/messages` as anonymous with an `X-Forwarded-For`; the status.
async fn forwarded_request(s: &TestServer, forwarded_for: &str) -> u16 {
    reqwest::Client::new()
        .get(s.http("/api/messages?chatRoomId=lobby"))
        .header("X-Forwarded-For", forwarded_for)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    let limits = |c: &mut parlor::config::Config| {
        c.limits.ip_requests_per_second = 1;
        c.limits.ip_requests_burst = 2;
    };
    // Not trusted: the header is ignored, so writing a new address each time escapes nothing.
    let s = server(move |c| limits(c)).await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(forwarded_request(&s, &format!("203.0.113.{i}")).await);
    }
    assert_eq!(
        statuses.iter().filter(|&&st| st == 429).count(),
        2,
        "{statuses:?}"
    );

    // Trusted (the test client is the proxy at 127.0.0.1): each forwarded client is counted
    // on its own, by the right-most address that is not a trusted proxy.
    let s = server(move |c| {
        limits(c);
        c.trusted_proxies = vec!["127.0.0.0/8".into(), "10.0.0.0/8".into()];
    })
    .await;
    for _ in 0..2 {
        assert_eq!(forwarded_request(&s, "198.51.100.7").await, 200);
        assert_eq!(
            forwarded_request(&s, "192.0.2.1, 198.51.100.8, 10.1.2.3").await,
            200
        );
    }
    assert_eq!(forwarded_request(&s, "198.51.100.7").await, 429);
    // A client cannot pose as another by prepending an address: 198.51.100.8 is still it.
    assert_eq!(
        forwarded_request(&s, "198.51.100.99, 198.51.100.8").await,
        429
    );
    assert_eq!(forwarded_request(&s, "198.51.100.9").await, 200);
}

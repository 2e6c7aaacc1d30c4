//! The domains' signed webhooks, end to end: a local receiver verifies every signature,
//! fails for a while, and still gets every event once recovered, in order per room; the
//! hand-off's HTTP endpoints raise their events; unusable settings are refused; the
//! delivery log shows the attempts; and, on PostgreSQL with two nodes, a node killed with
//! `kill -9` while it holds a delivery loses nothing: the other node takes it over.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::TestServer;
use common::cluster::eventually;
use hmac::Mac;
use parlor::auth::keys;
use parlor::config::{Config, DomainConfig, Secret, WebhookConfig, WebhookEvent};
use parlor::model::Role;
use serde_json::{Value, json};

const SECRET: &str = "whsec_test_0123456789abcdef";

/// How far a signature's time may be from the receiver's clock (the replay window).
const TOLERANCE_SECS: i64 = 300;

/// Checks `X-Parlor-Signature` of `body` as a receiver should: HMAC-SHA256 of
/// `"<t>.<body>"` with the secret, compared in constant time, `t` within the window.
fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if (chrono::Utc::now().timestamp() - t).abs() > TOLERANCE_SECS {
        return false;
    }
    v1.iter().any(|sig| {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(sig).is_ok()
    })
}

/// One post the receiver got.
#[derive(Debug, Clone)]
struct Post {
    id: String,
    event: String,
    body: Value,
    /// The answer it gave.
    status: u16,
}

#[derive(Default)]
struct Behaviour {
    /// Posts still to refuse with 500.
    fail_next: AtomicUsize,
    /// Refuse every post.
    fail_all: AtomicBool,
    /// Wait this long before answering.
    delay_ms: AtomicU64,
    /// Posts being answered now, and the most at once.
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    /// Posts whose signature did not verify, or whose headers disagreed with the body.
    forged: AtomicUsize,
    posts: parking_lot::Mutex<Vec<Post>>,
}

/// Counts a post in flight until dropped (also when the sender hangs up).
struct InFlight(Arc<Behaviour>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A local webhook receiver on 127.0.0.1.
struct Receiver {
    url: String,
    state: Arc<Behaviour>,
}

async fn receive(
    State(state): State<Arc<Behaviour>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(Arc::clone(&state));
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let genuine = verify(SECRET, &header("x-parlor-signature"), &body)
        && parsed["id"] == header("x-parlor-webhook-id")
        && parsed["type"] == header("x-parlor-event")
        && header("content-type") == "application/json";
    if !genuine {
        state.forged.fetch_add(1, Ordering::SeqCst);
    }
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let refuse = state.fail_all.load(Ordering::SeqCst)
        || state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    let status = if refuse || !genuine {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    state.posts.lock().push(Post {
        id: header("x-parlor-webhook-id"),
        event: header("x-parlor-event"),
        body: parsed,
        status: status.as_u16(),
    });
    status
}

impl Receiver {
    async fn start() -> Self {
        let state = Arc::new(Behaviour::default());
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// Posts it took (2xx), in the order they arrived.
    fn taken(&self) -> Vec<Post> {
        self.state
            .posts
            .lock()
            .iter()
            .filter(|p| p.status == 200)
            .cloned()
            .collect()
    }

    /// The first delivery of each event id, in arrival order.
    fn first_deliveries(&self) -> Vec<Post> {
        let mut seen = std::collections::HashSet::new();
        self.taken()
            .into_iter()
            .filter(|p| seen.insert(p.id.clone()))
            .collect()
    }

    /// Waits until `n` distinct events were taken.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Post> {
        let arrived = eventually(within, || async { self.first_deliveries().len() >= n }).await;
        let got = self.first_deliveries();
        assert!(arrived, "{} of {n} events arrived: {got:?}", got.len());
        got
    }

    fn refused(&self) -> usize {
        self.state
            .posts
            .lock()
            .iter()
            .filter(|p| p.status != 200)
            .count()
    }
}

/// A webhook of the demo domain to `url` for `events`.
fn hook(url: &str, events: &[WebhookEvent]) -> WebhookConfig {
    WebhookConfig {
        url: url.to_owned(),
        secret: Secret::new(SECRET),
        events: events.to_vec(),
    }
}

/// Quick retries for tests.
fn fast(c: &mut Config) {
    c.webhooks.poll_every = Duration::from_millis(50);
    c.webhooks.min_backoff = Duration::from_millis(100);
    c.webhooks.max_backoff = Duration::from_millis(300);
    c.webhooks.attempt_timeout = Duration::from_secs(2);
    c.webhooks.lease = Duration::from_secs(5);
}

/// A server whose demo domain posts `events` to `url`; with an admin key (returned).
async fn server_with(url: &str, events: &[WebhookEvent], handoff: bool) -> (TestServer, String) {
    let (admin, entry) = keys::generate_with(keys::ADMIN_KEY_PREFIX);
    let url = url.to_owned();
    let events = events.to_vec();
    let s = TestServer::start_with(move |c| {
        fast(c);
        c.auth.admin_keys = vec![entry];
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.webhooks = vec![hook(&url, &events)];
        demo.handoff.enabled = handoff;
    })
    .await;
    (s, admin)
}

#[test]
fn the_verification_snippet_refuses_a_wrong_secret_and_a_stale_time() {
    let body = br#"{"id":"wh_1"}"#;
    let t = chrono::Utc::now().timestamp();
    let header =
        parlor::service::webhooks::signature(SECRET, t, std::str::from_utf8(body).unwrap());
    assert!(verify(SECRET, &header, body));
    assert!(
        !verify("whsec_another_secret_0123", &header, body),
        "a wrong secret fails"
    );
    assert!(
        !verify(SECRET, &header, br#"{"id":"wh_2"}"#),
        "another body fails"
    );
    let old = parlor::service::webhooks::signature(
        SECRET,
        t - TOLERANCE_SECS - 10,
        std::str::from_utf8(body).unwrap(),
    );
    assert!(!verify(SECRET, &old, body), "outside the replay window");
    assert!(!verify(SECRET, "v1=00", body));
}

#[tokio::test]
async fn every_message_arrives_signed_and_in_order_per_room_after_the_receiver_recovers() {
    let receiver = Receiver::start().await;
    receiver.state.fail_next.store(7, Ordering::SeqCst);
    let (s, admin) = server_with(&receiver.url, &[WebhookEvent::MessageCreated], false).await;
    let mut ann = s.connect_as("ann").await;
    let mut bob = s.connect_as("bob").await;
    ann.join("room-a", None).await;
    bob.join("room-b", None).await;
    for i in 1..=6 {
        ann.say("room-a", &format!("a{i}"), None).await;
        bob.say("room-b", &format!("b{i}"), None).await;
    }
    let got = receiver.wait_for(12, Duration::from_secs(30)).await;
    assert_eq!(
        receiver.state.forged.load(Ordering::SeqCst),
        0,
        "every signature verified"
    );
    assert!(
        receiver.refused() >= 7,
        "the receiver refused the first posts"
    );

    let mut per_room: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for post in &got {
        assert_eq!(post.event, "message.created");
        assert_eq!(post.body["type"], "message.created");
        assert_eq!(post.body["domainId"], "demo");
        assert!(post.id.starts_with("wh_"), "{}", post.id);
        let data = &post.body["data"];
        per_room
            .entry(data["roomId"].as_str().unwrap().to_owned())
            .or_default()
            .push(data["seq"].as_u64().unwrap());
        let room = data["roomId"].as_str().unwrap();
        let seq = data["seq"].as_u64().unwrap();
        let prefix = if room == "room-a" { "a" } else { "b" };
        assert_eq!(data["content"], format!("{prefix}{seq}"));
        assert_eq!(data["author"]["role"], "visitor");
    }
    assert_eq!(
        per_room["room-a"],
        (1..=6).collect::<Vec<_>>(),
        "in order, none lost"
    );
    assert_eq!(
        per_room["room-b"],
        (1..=6).collect::<Vec<_>>(),
        "in order, none lost"
    );
    // Duplicates only as repeats of one id: every taken post is one of the 12 events.
    let ids: std::collections::HashSet<String> = got.iter().map(|p| p.id.clone()).collect();
    assert!(receiver.taken().iter().all(|p| ids.contains(&p.id)));

    // The log agrees: all delivered, the refused ones after several attempts.
    let log_ok = eventually(Duration::from_secs(5), || async {
        let (_, log) = s
            .get_with(
                "/api/admin/domains/demo/webhooks/deliveries?status=delivered",
                &admin,
            )
            .await;
        log["deliveries"].as_array().is_some_and(|d| d.len() == 12)
    })
    .await;
    assert!(log_ok);
    let (code, log) = s
        .get_with("/api/admin/domains/demo/webhooks/deliveries", &admin)
        .await;
    assert_eq!(code, 200, "{log}");
    let rows = log["deliveries"].as_array().unwrap();
    let attempts: u64 = rows.iter().map(|r| r["attempts"].as_u64().unwrap()).sum();
    assert!(attempts >= 12 + 7, "{log}");
    assert!(
        rows.iter()
            .any(|r| r["attempts"].as_u64() > Some(1) && r["lastStatus"] == 200)
    );
    assert!(
        s.metric("parlor_webhooks_total", "result=\"failed\"").await >= 7.0,
        "failed attempts are counted"
    );
    assert!(
        s.metric("parlor_webhooks_total", "result=\"delivered\"")
            .await
            >= 12.0
    );
    s.stop().await;
}

#[tokio::test]
async fn hand_off_endpoints_raise_their_conversation_events() {
    let receiver = Receiver::start().await;
    let conversation = [
        WebhookEvent::ConversationEscalated,
        WebhookEvent::ConversationAssigned,
        WebhookEvent::ConversationTransferred,
        WebhookEvent::ConversationUnassigned,
        WebhookEvent::ConversationResolved,
        WebhookEvent::ConversationReopened,
    ];
    let (s, _admin) = server_with(&receiver.url, &conversation, true).await;
    let mut ann = s.connect_as("ann").await;
    ann.join("help", None).await;
    ann.say("help", "hello", None).await;
    let alice = s.token_in("demo", "alice", Role::Agent.as_str());
    for (path, body) in [
        ("/api/rooms/help/escalate", json!({})),
        ("/api/rooms/help/assign", json!({})),
        (
            "/api/rooms/help/transfer",
            json!({ "agentId": "bob", "agentName": "Bob" }),
        ),
        ("/api/rooms/help/resolve", json!({})),
        ("/api/rooms/help/escalate", json!({})),
    ] {
        let (code, answer) = s.post_with(path, &alice, &body).await;
        assert_eq!(code, 200, "{path}: {answer}");
    }
    let got = receiver.wait_for(5, Duration::from_secs(20)).await;
    let events: Vec<&str> = got.iter().map(|p| p.event.as_str()).collect();
    assert_eq!(
        events,
        [
            "conversation.escalated",
            "conversation.assigned",
            "conversation.transferred",
            "conversation.resolved",
            "conversation.reopened"
        ]
    );
    let data: Vec<&Value> = got.iter().map(|p| &p.body["data"]).collect();
    assert!(data.iter().all(|d| d["roomId"] == "help"));
    assert_eq!(data[0]["status"], "waiting");
    assert_eq!(data[0]["previousStatus"], "bot");
    assert_eq!(data[1]["assignee"]["userId"], "alice");
    assert_eq!(data[2]["assignee"]["userId"], "bob");
    assert_eq!(data[2]["previousAssignee"]["userId"], "alice");
    assert_eq!(data[3]["status"], "resolved");
    assert_eq!(data[4]["previousStatus"], "resolved");
    assert_eq!(data[4]["status"], "waiting");
    let versions: Vec<u64> = data
        .iter()
        .map(|d| d["version"].as_u64().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    // Only what was asked for: no message.created.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.first_deliveries().len(), 5);
    assert_eq!(receiver.state.forged.load(Ordering::SeqCst), 0);
    s.stop().await;
}

#[tokio::test]
async fn unusable_webhook_settings_are_refused_with_a_clear_error() {
    let refused = |hook: WebhookConfig| {
        let mut d = DomainConfig::new("shop", "Shop");
        d.webhooks = vec![hook];
        parlor::auth::domains::Domains::new(&[d])
            .err()
            .map(|e| e.to_string())
    };
    let all = [WebhookEvent::MessageCreated];
    for url in [
        "ftp://example.com/hook",
        "example.com/hook",
        "http://",
        "javascript:alert(1)",
        "http://:8080/hook",
        "mailto:ops@example.com",
    ] {
        let error = refused(hook(url, &all)).unwrap_or_else(|| panic!("{url} accepted"));
        assert!(
            error.contains("must be an http:// or https:// URL with a host"),
            "{url}: {error}"
        );
    }
    let mut short = hook("https://example.com/hook", &all);
    short.secret = Secret::new("too-short");
    assert!(refused(short).unwrap().contains("at least 16 bytes"));
    let error = refused(hook("https://example.com/hook", &[])).unwrap();
    assert!(error.contains("events is empty"), "{error}");
    assert!(refused(hook("https://example.com/hook", &all)).is_none());
    let mut twice = DomainConfig::new("shop", "Shop");
    twice.webhooks = vec![
        hook("https://example.com/hook", &all),
        hook("https://example.com/hook", &all),
    ];
    let error = parlor::auth::domains::Domains::new(&[twice])
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("listed twice"), "{error}");

    // An unknown event name does not parse, in the file or through the admin API.
    let parsed = serde_json::from_value::<DomainConfig>(json!({
        "id": "shop",
        "webhooks": [{ "url": "https://example.com/hook", "secret": SECRET,
                        "events": ["message.deleted"] }]
    }));
    let error = parsed.unwrap_err().to_string();
    assert!(
        error.contains("unknown variant `message.deleted`"),
        "{error}"
    );

    let receiver = Receiver::start().await;
    let (s, admin) = server_with(&receiver.url, &all, false).await;
    for (webhook, expected) in [
        (
            json!({ "url": "ftp://example.com/h", "secret": SECRET, "events": ["message.created"] }),
            "must be an http:// or https:// URL",
        ),
        (
            json!({ "url": "https://example.com/h", "secret": "short", "events": ["message.created"] }),
            "at least 16 bytes",
        ),
        (
            json!({ "url": "https://example.com/h", "secret": SECRET, "events": ["message.deleted"] }),
            "message.deleted",
        ),
    ] {
        let (code, answer) = s
            .call(
                reqwest::Method::PUT,
                "/api/admin/domains/shop",
                &admin,
                Some(&json!({ "name": "Shop", "webhooks": [webhook] })),
            )
            .await;
        assert_eq!(code, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{message}");
    }
    // A run-time domain with a good webhook is stored; its secret is never shown.
    let (code, answer) = s
        .call(
            reqwest::Method::PUT,
            "/api/admin/domains/shop",
            &admin,
            Some(&json!({ "name": "Shop", "webhooks": [
                { "url": receiver.url, "secret": SECRET, "events": ["message.created"] }
            ] })),
        )
        .await;
    assert!(code == 200 || code == 201, "{answer}");
    let (_, shown) = s.get_with("/api/admin/domains/shop", &admin).await;
    assert_eq!(shown["webhooks"][0]["hasSecret"], true, "{shown}");
    assert!(!shown.to_string().contains(SECRET));
    s.stop().await;
}

#[tokio::test]
async fn the_delivery_log_pages_and_refuses_bad_requests() {
    let receiver = Receiver::start().await;
    receiver.state.fail_all.store(true, Ordering::SeqCst);
    let (s, admin) = server_with(&receiver.url, &[WebhookEvent::MessageCreated], false).await;
    let mut ann = s.connect_as("ann").await;
    for room in ["r1", "r2", "r3", "r4", "r5"] {
        ann.join(room, None).await;
        ann.say(room, "hi", None).await;
    }
    let path = "/api/admin/domains/demo/webhooks/deliveries";
    // Pending, failing: attempts and the receiver's status show.
    let failing = eventually(Duration::from_secs(10), || async {
        let (_, log) = s.get_with(&format!("{path}?status=pending"), &admin).await;
        log["deliveries"].as_array().is_some_and(|d| {
            d.len() == 5
                && d.iter().all(|r| {
                    r["attempts"].as_u64() >= Some(1)
                        && r["lastStatus"] == 500
                        && r["lastError"] == "the receiver answered 500"
                        && r["nextAttemptAt"].is_string()
                        && r["status"] == "pending"
                })
        })
    })
    .await;
    assert!(failing, "{:?}", s.get_with(path, &admin).await);
    let backlog = eventually(Duration::from_secs(10), || async {
        s.metric("parlor_webhooks_backlog", "").await == 5.0
            && s.metric("parlor_webhooks_oldest_pending_seconds", "").await > 0.0
    })
    .await;
    assert!(backlog, "the backlog gauges count the pending events");

    let (code, first) = s.get_with(&format!("{path}?limit=2"), &admin).await;
    assert_eq!(code, 200);
    assert_eq!(first["deliveries"].as_array().unwrap().len(), 2);
    let next = first["next"].as_str().expect("a next page").to_owned();
    let (_, second) = s
        .get_with(&format!("{path}?limit=2&before={next}"), &admin)
        .await;
    let (_, third) = s
        .get_with(
            &format!("{path}?limit=2&before={}", second["next"].as_str().unwrap()),
            &admin,
        )
        .await;
    assert_eq!(third["deliveries"].as_array().unwrap().len(), 1);
    assert!(third["next"].is_null());
    let rooms: Vec<String> = [&first, &second, &third]
        .iter()
        .flat_map(|p| p["deliveries"].as_array().unwrap().clone())
        .map(|d| d["partition"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        rooms,
        ["room:r5", "room:r4", "room:r3", "room:r2", "room:r1"]
    );
    let (_, none) = s
        .get_with(&format!("{path}?status=delivered"), &admin)
        .await;
    assert_eq!(none["deliveries"], json!([]));

    // Credentials.
    let (code, answer) = common::call(reqwest::Method::GET, &s.http(path), "", None).await;
    assert_eq!(code, 401, "{answer}");
    let (code, _) = s.get_with(path, "ak_not_a_real_key").await;
    assert_eq!(code, 401);
    let agent = s.token_in("demo", "alice", Role::Agent.as_str());
    let (code, _) = s.get_with(path, &agent).await;
    assert!(code == 401 || code == 403, "{code}");

    // Bad parameters.
    for (query, expected) in [
        ("status=bogus", "status \"bogus\""),
        ("limit=0", "limit \"0\""),
        ("limit=501", "limit \"501\""),
        ("limit=ten", "limit \"ten\""),
        ("before=-3", "before \"-3\""),
        ("before=x", "before \"x\""),
        ("colour=red", "unknown parameter \"colour\""),
        ("limit=1&limit=2", "given twice"),
    ] {
        let (code, answer) = s.get_with(&format!("{path}?{query}"), &admin).await;
        assert_eq!(code, 400, "{query}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_query", "{query}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{query}: {message}");
    }
    let (code, answer) = s
        .get_with("/api/admin/domains/nope/webhooks/deliveries", &admin)
        .await;
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (404, Some("domain_not_found"))
    );
    s.stop().await;
}

#[tokio::test]
async fn notifications_and_visitors_raise_their_events() {
    let receiver = Receiver::start().await;
    let (key, entry) = keys::generate_with(keys::KEY_PREFIX);
    let url = receiver.url.clone();
    let s = TestServer::start_with(move |c| {
        fast(c);
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.server_keys = vec![entry];
        demo.webhooks = vec![hook(
            &url,
            &[
                WebhookEvent::NotificationCreated,
                WebhookEvent::VisitorAdded,
                WebhookEvent::VisitorRemoved,
            ],
        )];
    })
    .await;
    let (code, answer) = s
        .post_with(
            "/api/notifications",
            &key,
            &json!({ "type": "confirmation", "taskId": "t1", "userId": "ann",
                     "content": "Meeting scheduled!", "data": { "eventId": "e1" } }),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
    let page = |path: &str, body: Value| {
        let url = s.http(path);
        async move {
            let res = reqwest::Client::new()
                .post(url)
                .header("origin", "https://shop.example")
                .header("user-agent", "Mozilla/5.0 (test)")
                .json(&body)
                .send()
                .await
                .unwrap();
            res.status().as_u16()
        }
    };
    let visitor = json!({ "domainId": "demo", "visitorId": "v1",
                          "visitorData": { "page": "https://shop.example/pricing" } });
    assert_eq!(page("/visitors/add", visitor.clone()).await, 200);
    // The same visit: no second `visitor.added`.
    assert_eq!(page("/visitors/add", visitor).await, 200);
    assert_eq!(
        page(
            "/visitors/remove",
            json!({ "domainId": "demo", "visitorId": "v1" })
        )
        .await,
        200
    );
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    let notification = got
        .iter()
        .find(|p| p.event == "notification.created")
        .unwrap();
    assert_eq!(notification.body["data"]["userId"], "ann");
    assert_eq!(notification.body["data"]["type"], "CONFIRMATION");
    assert_eq!(notification.body["data"]["data"]["eventId"], "e1");
    assert_eq!(notification.body["data"]["seq"], 1);
    let visits: Vec<&str> = got
        .iter()
        .filter(|p| p.body["data"]["visitorId"] == "v1")
        .map(|p| p.event.as_str())
        .collect();
    assert_eq!(
        visits,
        ["visitor.added", "visitor.removed"],
        "in order per visitor"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.first_deliveries().len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn a_completed_guided_session_raises_its_event() {
    let receiver = Receiver::start().await;
    let (s, _admin) = server_with(&receiver.url, &[WebhookEvent::SessionCompleted], false).await;
    // The demo's built-in NDA template, answered through `/chat` (docs/sessions.md).
    let url = s.ws(&format!(
        "/chat?token={}&templateId=mutual-nda",
        s.token("ann")
    ));
    let mut chat = common::Client::connect(&url).await;
    let first = chat.recv().await;
    let session = first["sessionId"].as_str().unwrap().to_owned();
    let mut last = Value::Null;
    for answer in [
        "Acme Ltd",
        "Globex GmbH",
        "To evaluate a possible partnership.",
        "2027-01-31",
        "3",
        "ireland",
        "legal@acme.example",
    ] {
        chat.send(json!({ "type": "user_message", "content": answer }))
            .await;
        last = chat.recv().await;
    }
    assert_eq!(last["type"], "session_complete", "{last}");
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    let data = &got[0].body["data"];
    assert_eq!(got[0].event, "session.completed");
    assert_eq!(data["sessionId"], session);
    assert_eq!(data["userId"], "ann");
    assert_eq!(data["templateId"], "mutual-nda");
    assert_eq!(data["document"]["id"], last["documentId"]);
    assert!(data["document"]["bytes"].as_u64() > Some(0), "{data}");
    s.stop().await;
}

#[tokio::test]
async fn an_event_never_taken_is_given_up_and_its_room_moves_on() {
    let receiver = Receiver::start().await;
    receiver.state.fail_all.store(true, Ordering::SeqCst);
    let (admin, entry) = keys::generate_with(keys::ADMIN_KEY_PREFIX);
    let url = receiver.url.clone();
    let s = TestServer::start_with(move |c| {
        fast(c);
        c.webhooks.retry_for = Duration::from_secs(1);
        c.auth.admin_keys = vec![entry];
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.webhooks = vec![hook(&url, &[WebhookEvent::MessageCreated])];
    })
    .await;
    let mut ann = s.connect_as("ann").await;
    ann.join("r", None).await;
    ann.say("r", "one", None).await;
    ann.say("r", "two", None).await;
    let path = "/api/admin/domains/demo/webhooks/deliveries";
    let both_dead = eventually(Duration::from_secs(15), || async {
        let (_, log) = s.get_with(&format!("{path}?status=dead"), &admin).await;
        log["deliveries"].as_array().is_some_and(|d| d.len() == 2)
    })
    .await;
    assert!(both_dead, "{:?}", s.get_with(path, &admin).await);
    let (_, dead) = s.get_with(&format!("{path}?status=dead"), &admin).await;
    for row in dead["deliveries"].as_array().unwrap() {
        assert!(row["attempts"].as_u64() >= Some(1), "{row}");
        assert_eq!(row["lastError"], "the receiver answered 500");
        assert!(row["finishedAt"].is_string() && row["nextAttemptAt"].is_null());
    }
    assert!(s.metric("parlor_webhooks_total", "result=\"dead\"").await >= 2.0);
    // The receiver is back: the room's next event is delivered, the dead ones are not.
    receiver.state.fail_all.store(false, Ordering::SeqCst);
    ann.say("r", "three", None).await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].body["data"]["content"], "three");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.first_deliveries().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn posts_to_one_url_are_bounded_per_node_and_rooms_go_in_parallel() {
    let receiver = Receiver::start().await;
    receiver.state.delay_ms.store(300, Ordering::SeqCst);
    let url = receiver.url.clone();
    let s = TestServer::start_with(move |c| {
        fast(c);
        c.webhooks.per_destination = 2;
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.webhooks = vec![hook(&url, &[WebhookEvent::MessageCreated])];
    })
    .await;
    let mut ann = s.connect_as("ann").await;
    for room in ["p1", "p2", "p3", "p4", "p5", "p6"] {
        ann.join(room, None).await;
        ann.say(room, "hi", None).await;
    }
    receiver.wait_for(6, Duration::from_secs(20)).await;
    assert_eq!(
        receiver.state.most_in_flight.load(Ordering::SeqCst),
        2,
        "two rooms at once, never more than per_destination"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_slow_receiver_does_not_hold_up_another_url() {
    let slow = Receiver::start().await;
    slow.state.delay_ms.store(1500, Ordering::SeqCst);
    let quick = Receiver::start().await;
    let urls = (slow.url.clone(), quick.url.clone());
    let s = TestServer::start_with(move |c| {
        fast(c);
        c.webhooks.per_destination = 2;
        c.webhooks.max_in_flight = 4;
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.webhooks = vec![
            hook(&urls.0, &[WebhookEvent::MessageCreated]),
            hook(&urls.1, &[WebhookEvent::MessageCreated]),
        ];
    })
    .await;
    let mut ann = s.connect_as("ann").await;
    for i in 0..10 {
        let room = format!("q{i}");
        ann.join(&room, None).await;
        ann.say(&room, "hi", None).await;
    }
    // The slow URL holds two places at most; the quick one gets the others at once (were
    // the slow one's events to take every place, the quick ones would wait 1.5 s a round).
    quick.wait_for(10, Duration::from_millis(1500)).await;
    assert!(
        slow.first_deliveries().len() < 10,
        "the quick URL was served while the slow one still had events waiting"
    );
    assert!(slow.state.most_in_flight.load(Ordering::SeqCst) <= 2);
    slow.wait_for(10, Duration::from_secs(30)).await;
    s.stop().await;
}

#[tokio::test]
async fn a_node_killed_while_it_holds_a_delivery_loses_nothing() {
    let Some((db_url, redis)) = common::cluster::servers() else {
        return;
    };
    let receiver = Receiver::start().await;
    receiver.state.fail_all.store(true, Ordering::SeqCst);
    receiver.state.delay_ms.store(700, Ordering::SeqCst);
    let config = common::cluster::NODE_CONFIG
        .replace(
            "[[domains]]",
            "[webhooks]\nlease = \"2s\"\nattempt_timeout = \"1s\"\npoll_every = \"100ms\"\n\
             min_backoff = \"100ms\"\nmax_backoff = \"200ms\"\n[[domains]]",
        )
        .replace(
            "[domains.bot]",
            &format!(
                "webhooks = [{{ url = \"{}\", secret = \"{SECRET}\", \
                 events = [\"message.created\"] }}]\n[domains.bot]",
                receiver.url
            ),
        );
    let db = common::cluster::Database::create(&db_url).await;
    let mut cluster = common::cluster::cluster_with_config(2, &redis, db, &config).await;
    let mut ann = common::Client::connect(&cluster.nodes[0].ws("ann")).await;
    ann.join("k", None).await;
    for i in 1..=8 {
        ann.say("k", &format!("m{i}"), None).await;
    }
    // Attempts are being made (and refused, slowly).
    assert!(
        eventually(Duration::from_secs(15), || async {
            receiver.state.posts.lock().len() >= 2
        })
        .await
    );
    // Find the node holding the head right now, and kill it mid-post.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.db().url())
        .await
        .unwrap();
    let mut holder: Option<String> = None;
    for _ in 0..400 {
        let now = chrono::Utc::now().timestamp_millis();
        holder = sqlx::query_scalar(
            "SELECT claimed_by FROM webhook_outbox WHERE claimed_by IS NOT NULL
               AND claimed_until > $1 AND status = 'pending' LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
        if holder.is_some() && receiver.state.in_flight.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let holder = holder.expect("a node holds the head");
    let victim = cluster
        .nodes
        .iter()
        .position(|n| holder.starts_with(&format!("pid{}-", n.child.id())))
        .unwrap_or_else(|| {
            panic!(
                "no node is {holder}: {}\n---\n{}",
                cluster.nodes[0].log_tail(),
                cluster.nodes[1].log_tail()
            )
        });
    cluster.nodes[victim].kill9();
    let survivor = 1 - victim;
    // The receiver recovers; the survivor takes the held row once its lease passes.
    receiver.state.fail_all.store(false, Ordering::SeqCst);
    receiver.state.delay_ms.store(0, Ordering::SeqCst);
    let got = receiver.wait_for(8, Duration::from_secs(30)).await;
    let seqs: Vec<u64> = got
        .iter()
        .map(|p| p.body["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "in order, none lost");
    assert_eq!(receiver.state.forged.load(Ordering::SeqCst), 0);
    assert_eq!(
        receiver.state.most_in_flight.load(Ordering::SeqCst),
        1,
        "one post of the room at a time, across both nodes"
    );
    assert!(
        cluster.nodes[survivor]
            .metric("parlor_webhooks_total", "result=\"delivered\"")
            .await
            >= 8.0
    );
    let statuses: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT status, COUNT(*) FROM webhook_outbox GROUP BY status",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let all_delivered = eventually(Duration::from_secs(5), || async {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.db().url())
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM webhook_outbox WHERE status <> 'delivered'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
            == 0
    })
    .await;
    assert!(all_delivered, "{statuses:?}");
    drop(conn);
    cluster.finish().await;
}

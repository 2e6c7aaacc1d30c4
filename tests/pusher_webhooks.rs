//! Pusher's webhooks (`docs/pusher.md`, "Webhooks") and cluster-wide occupancy: a local
//! receiver verifies every post's `X-Pusher-Signature`, fails the first post and gets it
//! again; a channel is reported occupied and vacated once however many connections and
//! nodes it has, a presence member added and removed once however many tabs; two nodes
//! on PostgreSQL + Redis count each other's subscribers, and a node killed with its
//! channels has them reported vacated by the survivor.
//!
//! The two-node test needs `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL` and says
//! it is skipped without them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use common::TestServer;
use common::pusher::{APP_KEY, APP_SECRET, PusherClient, hmac_hex};
use parking_lot::Mutex;
use parlor::config::{PusherKeyConfig, PusherWebhookConfig, PusherWebhookEvent, Secret};
use serde_json::{Value, json};

/// One post the receiver got: which hook, its body, the status it answered.
#[derive(Debug, Clone)]
struct Post {
    hook: String,
    body: String,
    status: u16,
}

/// A webhook receiver on 127.0.0.1: answers 500 to its first `fail` posts, 200 after.
#[derive(Clone, Default)]
struct Receiver {
    posts: Arc<Mutex<Vec<Post>>>,
    fail: Arc<Mutex<usize>>,
}

async fn take(
    State(r): State<Receiver>,
    Path(hook): Path<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    // Every post is signed by the app's key: checked here, as an app would.
    assert_eq!(headers["x-pusher-key"], APP_KEY);
    assert_eq!(headers["content-type"], "application/json");
    let signature = headers["x-pusher-signature"].to_str().unwrap();
    assert_eq!(signature, hmac_hex(APP_SECRET, body.as_bytes()), "{body}");
    assert_ne!(
        signature,
        hmac_hex("another-secret-of-16b", body.as_bytes()),
        "another secret does not verify"
    );
    let status = {
        let mut fail = r.fail.lock();
        if *fail > 0 {
            *fail -= 1;
            500
        } else {
            200
        }
    };
    r.posts.lock().push(Post { hook, body, status });
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    /// Starts it; returns it and its base URL.
    async fn start(fail: usize) -> (Self, String) {
        let receiver = Self {
            fail: Arc::new(Mutex::new(fail)),
            ..Self::default()
        };
        let app = axum::Router::new()
            .route("/hook/{name}", axum::routing::post(take))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, base)
    }

    /// The events `hook` took (posts answered 200), in order, as `name channel [user]`.
    fn events(&self, hook: &str) -> Vec<String> {
        self.posts
            .lock()
            .iter()
            .filter(|p| p.hook == hook && p.status == 200)
            .flat_map(|p| {
                let body: Value = serde_json::from_str(&p.body).unwrap();
                assert!(body["time_ms"].as_i64().unwrap() > 0, "{body}");
                body["events"].as_array().unwrap().clone()
            })
            .map(|e| {
                let mut line = format!(
                    "{} {}",
                    e["name"].as_str().unwrap(),
                    e["channel"].as_str().unwrap()
                );
                if let Some(user) = e["user_id"].as_str() {
                    line = format!("{line} {user}");
                }
                line
            })
            .collect()
    }

    /// Waits until `hook` took `n` events (and a moment more, for extra ones to show);
    /// returns them.
    async fn wait_for(&self, hook: &str, n: usize) -> Vec<String> {
        let ok = common::cluster::eventually(Duration::from_secs(20), || async {
            self.events(hook).len() >= n
        })
        .await;
        assert!(ok, "{hook} took {:?}, not {n} events", self.events(hook));
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.events(hook)
    }
}

/// The Pusher app of the demo domain, with a webhook for every event at `{base}/hook/all`
/// and one for `channel_vacated` only at `{base}/hook/vacated`.
fn app(base: &str) -> PusherKeyConfig {
    PusherKeyConfig {
        app_id: None,
        key: APP_KEY.to_owned(),
        secret: Secret::new(APP_SECRET),
        webhooks: vec![
            PusherWebhookConfig {
                url: format!("{base}/hook/all"),
                events: PusherWebhookEvent::all(),
            },
            PusherWebhookConfig {
                url: format!("{base}/hook/vacated"),
                events: vec![PusherWebhookEvent::ChannelVacated],
            },
        ],
    }
}

/// The events of `channel`, in order.
fn of(events: &[String], channel: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.split(' ').nth(1) == Some(channel))
        .cloned()
        .collect()
}

#[tokio::test]
async fn webhooks_report_each_change_once_signed_and_are_retried() {
    let (receiver, base) = Receiver::start(1).await;
    let s = TestServer::start_with(|c| {
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.pusher_keys = vec![app(&base)];
    })
    .await;
    let ws = s.ws("");
    // Two connections of one user, each in a public and a presence channel.
    let mut tab1 = PusherClient::connect(&ws).await;
    tab1.subscribe("news", None).await;
    tab1.subscribe("presence-room", Some("u1")).await;
    let mut tab2 = PusherClient::connect(&ws).await;
    tab2.subscribe("news", None).await;
    tab2.subscribe("presence-room", Some("u1")).await;
    let first = receiver.wait_for("all", 3).await;
    assert_eq!(
        first,
        [
            "channel_occupied news",
            "channel_occupied presence-room",
            "member_added presence-room u1"
        ]
    );
    // The first post was refused with 500, and posted again, the same.
    let posts = receiver.posts.lock().clone();
    assert_eq!(posts[0].status, 500);
    assert!(
        posts
            .iter()
            .skip(1)
            .any(|p| p.status == 200 && p.body == posts[0].body)
    );
    // One tab leaving changes nothing; an unsubscribe and a closed socket count alike.
    tab1.unsubscribe("news").await;
    drop(tab1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.events("all").len(),
        3,
        "{:?}",
        receiver.events("all")
    );
    tab2.unsubscribe("presence-room").await;
    drop(tab2);
    let all = receiver.wait_for("all", 6).await;
    assert_eq!(all.len(), 6, "{all:?}");
    assert_eq!(
        of(&all, "news"),
        ["channel_occupied news", "channel_vacated news"]
    );
    assert_eq!(
        of(&all, "presence-room"),
        [
            "channel_occupied presence-room",
            "member_added presence-room u1",
            "member_removed presence-room u1",
            "channel_vacated presence-room"
        ]
    );
    // The second hook wants vacated only.
    let mut vacated = receiver.wait_for("vacated", 2).await;
    vacated.sort();
    assert_eq!(
        vacated,
        ["channel_vacated news", "channel_vacated presence-room"]
    );
    assert!(s.metric("parlor_pusher_webhooks_total", "delivered").await >= 8.0);
    s.stop().await;
}

#[test]
fn a_webhook_url_that_is_not_http_is_refused_at_start() {
    for url in [
        "ftp://example.com/hook",
        "example.com/hook",
        "http://",
        "javascript:alert(1)",
    ] {
        let mut demo = parlor::config::DomainConfig::new("shop", "Shop");
        let mut key = app("http://unused");
        key.webhooks[0].url = url.to_owned();
        demo.pusher_keys = vec![key];
        let error = parlor::auth::domains::Domains::new(&[demo])
            .err()
            .unwrap_or_else(|| panic!("{url} accepted"));
        assert!(
            error
                .to_string()
                .contains("must be an http:// or https:// URL"),
            "{url}: {error}"
        );
    }
    let mut demo = parlor::config::DomainConfig::new("shop", "Shop");
    let mut key = app("http://unused");
    key.webhooks[1].events.clear();
    demo.pusher_keys = vec![key];
    let error = parlor::auth::domains::Domains::new(&[demo]).err().unwrap();
    assert!(error.to_string().contains("at least one event"), "{error}");
}

#[tokio::test]
async fn occupancy_and_webhooks_are_cluster_wide_and_outlive_a_killed_node() {
    let Some((db_url, redis)) = common::cluster::servers() else {
        return;
    };
    let (receiver, base) = Receiver::start(0).await;
    let config = common::cluster::NODE_CONFIG.replace(
        "[domains.bot]",
        &format!(
            "pusher_keys = [{{ key = \"{APP_KEY}\", secret = \"{APP_SECRET}\", \
             webhooks = [{{ url = \"{base}/hook/all\" }}] }}]\n[domains.bot]"
        ),
    );
    let db = common::cluster::Database::create(&db_url).await;
    let mut cluster = common::cluster::cluster_with_config(2, &redis, db, &config).await;
    let (a, b) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let ws = |port: u16| format!("ws://127.0.0.1:{port}");
    let http = |port: u16| format!("http://127.0.0.1:{port}");

    // One user on both nodes, in a public and a presence channel.
    let mut on_a = PusherClient::connect(&ws(a)).await;
    on_a.subscribe("news", None).await;
    on_a.subscribe("presence-room", Some("u1")).await;
    let mut on_b = PusherClient::connect(&ws(b)).await;
    on_b.subscribe("news", None).await;
    on_b.subscribe("presence-room", Some("u1")).await;
    on_b.subscribe("lonely", None).await;
    // Each node counts the other's subscribers.
    for port in [a, b] {
        let counted = common::cluster::eventually(Duration::from_secs(10), || async {
            let (status, body) = common::pusher::get(
                &http(port),
                "/apps/demo/channels/news",
                "info=subscription_count",
            )
            .await;
            status == 200 && body["subscription_count"] == 2 && body["occupied"] == true
        })
        .await;
        assert!(counted, "node on {port} counts both nodes' subscribers");
    }
    let (_, listed) = common::pusher::get(&http(a), "/apps/demo/channels", "").await;
    let mut names: Vec<&String> = listed["channels"].as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, ["lonely", "news", "presence-room"], "{listed}");
    let first = receiver.wait_for("all", 4).await;
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "channel_occupied lonely",
            "channel_occupied news",
            "channel_occupied presence-room",
            "member_added presence-room u1"
        ],
        "once each, whichever node: {first:?}"
    );

    // Leaving node A changes nothing: node B still has them.
    drop(on_a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.events("all").len(),
        4,
        "{:?}",
        receiver.events("all")
    );
    let (_, news) = common::pusher::get(
        &http(a),
        "/apps/demo/channels/news",
        "info=subscription_count",
    )
    .await;
    assert_eq!(news["subscription_count"], 1, "{news}");

    // Node B dies with its connections: node A reports their channels vacated and the
    // member removed, once the node's lease has run out.
    cluster.nodes[1].kill9();
    let all = receiver.wait_for("all", 8).await;
    assert_eq!(all.len(), 8, "{all:?}");
    let mut last: Vec<String> = all[4..].to_vec();
    last.sort();
    assert_eq!(
        last,
        [
            "channel_vacated lonely",
            "channel_vacated news",
            "channel_vacated presence-room",
            "member_removed presence-room u1"
        ]
    );
    let (_, listed) = common::pusher::get(&http(a), "/apps/demo/channels", "").await;
    assert_eq!(listed, json!({ "channels": {} }));
    drop(on_b);
    cluster.finish().await;
}

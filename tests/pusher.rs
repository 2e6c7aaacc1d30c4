//! The Pusher endpoint (`/app/{key}`, `docs/pusher.md`) with the real `pusher-js` 8 and
//! `pusher` npm packages run by Node (`tests/browser/pusher_client.mjs`): seed 004's user
//! listens on `private-user-{id}` through the app's own auth endpoint and gets each
//! notification as `chat-message`; a wrong signature, another user's channel signed for
//! someone else's socket, and an unknown app key are refused with Pusher's answers.
//!
//! Runs when `PARLOR_TEST_CHROMIUM` is set (the signal that `npm ci --prefix tests/browser`
//! installed the Node packages, as CI does) and says it is skipped otherwise; the two-node
//! test also needs `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{TestServer, WAIT};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use common::pusher::{APP_KEY, APP_SECRET, signed_query};

/// The Node packages, or `None` (skipped) when the suite is not installed.
fn suite() -> Option<PathBuf> {
    if std::env::var_os("PARLOR_TEST_CHROMIUM")
        .filter(|v| !v.is_empty())
        .is_none()
    {
        println!(
            "skipped: set PARLOR_TEST_CHROMIUM (and run `npm ci --prefix tests/browser`) to run \
             the pusher-js tests"
        );
        return None;
    }
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        suite.join("node_modules/pusher-js").is_dir() && suite.join("node_modules/pusher").is_dir(),
        "PARLOR_TEST_CHROMIUM is set but pusher-js or pusher is missing: run `npm ci --prefix \
         tests/browser` first"
    );
    Some(suite)
}

/// A server whose demo domain has the Pusher app and a server key; returns the key too.
async fn server() -> (TestServer, String) {
    let (key, entry) = parlor::auth::keys::generate_with(parlor::auth::keys::KEY_PREFIX);
    let s = TestServer::start_with(move |c| {
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.server_keys = vec![entry];
        demo.pusher_keys = vec![parlor::config::PusherKeyConfig {
            app_id: None,
            key: APP_KEY.to_owned(),
            secret: parlor::config::Secret::new(APP_SECRET),
            webhooks: Vec::new(),
        }];
    })
    .await;
    (s, key)
}

/// The script, running.
struct Script {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Lines read while waiting for another event, in order.
    seen: Vec<Value>,
}

impl Script {
    fn start(suite: &Path, s: &TestServer, key: &str, secret: &str, channels: &[&str]) -> Self {
        Self::start_at(suite, s.addr.port(), key, secret, channels)
    }

    /// The script against the server listening on 127.0.0.1:`port`, as the user "ann".
    fn start_at(suite: &Path, port: u16, key: &str, secret: &str, channels: &[&str]) -> Self {
        Self::spawn(
            suite,
            port,
            &[("APP_KEY", key), ("APP_SECRET", secret)],
            channels,
        )
    }

    /// The script as the app's user `user`, signing with the demo app's key.
    fn user(suite: &Path, port: u16, user: &str, channels: &[&str]) -> Self {
        let env = [
            ("APP_KEY", APP_KEY),
            ("APP_SECRET", APP_SECRET),
            ("USER_ID", user),
        ];
        Self::spawn(suite, port, &env, channels)
    }

    fn spawn(suite: &Path, port: u16, env: &[(&str, &str)], channels: &[&str]) -> Self {
        let mut command = Command::new("node");
        command
            .arg(suite.join("pusher_client.mjs"))
            .current_dir(suite)
            .env("PARLOR_PORT", port.to_string())
            .env("APP_ID", "demo")
            .env("CHANNELS", channels.join(","));
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start `node` (is Node.js installed?)");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Sends the script a command (see its header).
    async fn run(&mut self, command: Value) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// Runs an SDK command and returns its reply's status and body.
    async fn call(&mut self, command: Value) -> (u16, Value) {
        self.run(command).await;
        let reply = self.next("reply").await;
        (
            u16::try_from(reply["status"].as_u64().unwrap_or_default()).unwrap(),
            reply["body"].clone(),
        )
    }

    /// The next line the script printed whose `event` is `event` (lines printed before it
    /// stay for later calls).
    async fn next(&mut self, event: &str) -> Value {
        self.next_where(event, |_| true).await
    }

    /// The next line printed of `event` for which `matches` holds (the others stay for later
    /// calls).
    async fn next_where(&mut self, event: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self
            .seen
            .iter()
            .position(|v| v["event"] == event && matches(v))
        {
            return self.seen.remove(at);
        }
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!("no {event} from pusher-js in time; saw {:?}", self.seen)
                })
                .unwrap()
                .unwrap_or_else(|| panic!("pusher-js ended before {event}"));
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] == event && matches(&v) {
                return v;
            }
            self.seen.push(v);
        }
    }

    /// Whether a line of `event` was printed among those kept (after waiting `wait`).
    async fn saw(&mut self, event: &str, wait: Duration, matches: impl Fn(&Value) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout_at(deadline, self.lines.next_line()).await
        {
            self.seen.push(serde_json::from_str(&line).unwrap());
        }
        self.seen.iter().any(|v| v["event"] == event && matches(v))
    }

    async fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

#[tokio::test]
async fn pusher_js_gets_the_users_notifications_on_its_private_channel() {
    let Some(suite) = suite() else {
        return;
    };
    let (s, server_key) = server().await;
    let mut ann = Script::start(
        &suite,
        &s,
        APP_KEY,
        APP_SECRET,
        &["private-user-ann", "news"],
    );
    let connected = ann.next("connected").await;
    let socket_id = connected["socketId"].as_str().unwrap().to_owned();
    assert!(
        socket_id
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "a socket id is digits.digits: {socket_id}"
    );
    let subscribed: Vec<Value> = vec![ann.next("subscribed").await, ann.next("subscribed").await];
    let mut names: Vec<&str> = subscribed
        .iter()
        .map(|v| v["channel"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["news", "private-user-ann"]);

    let (status, sent) = s
        .post_with(
            "/api/notifications",
            &server_key,
            &json!({
                "type": "confirmation",
                "taskId": "task_123",
                "userId": "ann",
                "content": "Your meeting has been scheduled successfully.",
                "data": { "eventId": "event_789" },
            }),
        )
        .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["pusherSent"], true, "ann listens through pusher-js");
    let got = ann.next("chat-message").await;
    assert_eq!(got["channel"], "private-user-ann");
    let message = &got["message"];
    assert_eq!(message["id"], sent["messageId"]);
    assert_eq!(message["type"], "CONFIRMATION");
    assert_eq!(message["taskId"], "task_123");
    assert_eq!(
        message["content"],
        "Your meeting has been scheduled successfully."
    );
    assert_eq!(message["data"], json!({ "eventId": "event_789" }));
    assert_eq!(message["read"], false);

    // Another user's notification does not reach ann.
    let (_, bobs) = s
        .post_with(
            "/api/notifications",
            &server_key,
            &json!({ "type": "info", "userId": "bob", "content": "for bob" }),
        )
        .await;
    assert_eq!(bobs["pusherSent"], false);
    ann.finish().await;

    // Once ann's client is gone, nobody listens.
    let mut pushed = true;
    for _ in 0..50 {
        let (_, sent) = s
            .post_with(
                "/api/notifications",
                &server_key,
                &json!({ "type": "info", "userId": "ann", "content": "later" }),
            )
            .await;
        pushed = sent["pusherSent"] == true;
        if !pushed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!pushed, "a closed pusher-js connection stops listening");
    s.stop().await;
}

#[tokio::test]
async fn a_wrong_signature_and_an_unknown_key_are_refused_as_pusher_refuses_them() {
    let Some(suite) = suite() else {
        return;
    };
    let (s, _) = server().await;
    // The app's auth endpoint signs with another secret: the private channel is refused,
    // the public one is not.
    let mut wrong = Script::start(
        &suite,
        &s,
        APP_KEY,
        "not-the-secret",
        &["private-user-ann", "news"],
    );
    let refused = wrong.next("subscription_error").await;
    assert_eq!(
        (refused["channel"].clone(), refused["status"].clone()),
        (json!("private-user-ann"), json!(401))
    );
    let public = wrong.next("subscribed").await;
    assert_eq!(public["channel"], "news");
    wrong.finish().await;

    // An app key no domain has: pusher:error 4001, and pusher-js gives up for good.
    let mut unknown = Script::start(&suite, &s, "no-such-key", APP_SECRET, &["news"]);
    let error = unknown.next("error").await;
    assert_eq!(error["code"], 4001);
    loop {
        let state = unknown.next("state").await;
        if state["state"] == "disconnected" || state["state"] == "failed" {
            break;
        }
    }
    unknown.finish().await;
    s.stop().await;
}

#[tokio::test]
async fn notifications_events_and_presence_cross_nodes() {
    let Some(suite) = suite() else {
        return;
    };
    let Some((db_url, redis)) = common::cluster::servers() else {
        return;
    };
    let config = common::cluster::NODE_CONFIG.replace(
        "[domains.bot]",
        &format!(
            "pusher_keys = [{{ key = \"{APP_KEY}\", secret = \"{APP_SECRET}\" }}]\n[domains.bot]"
        ),
    );
    let db = common::cluster::Database::create(&db_url).await;
    let cluster = common::cluster::cluster_with_config(2, &redis, db, &config).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut ann = Script::start_at(&suite, b.port, APP_KEY, APP_SECRET, &["private-user-ann"]);
    ann.next("subscribed").await;
    // The domain's admin sends through node A, once node A sees ann listening on node B.
    let back_end = parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        "backend",
        None,
        "admin",
        "demo",
        600,
    )
    .unwrap();
    let mut sent = Value::Null;
    for i in 0..40 {
        let (status, answer) = common::call(
            reqwest::Method::POST,
            &a.http("/api/notifications"),
            &back_end,
            Some(&json!({ "type": "info", "userId": "ann", "content": format!("n{i}") })),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        sent = answer;
        if sent["pusherSent"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        sent["pusherSent"], true,
        "node A sees ann listening on node B"
    );
    // Every one sent reaches pusher-js on node B, in order, the last one included.
    let mut last = Value::Null;
    let mut seqs = Vec::new();
    while last["id"] != sent["messageId"] {
        last = ann.next("chat-message").await["message"].clone();
        seqs.push(last["seq"].as_u64().unwrap());
    }
    let all: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, all, "every notification once, in order");
    assert_eq!(last["type"], "INFO");
    ann.finish().await;

    // Presence is cluster-wide: carol on node B, dan on node A, in one presence channel.
    let mut carol = Script::user(&suite, b.port, "carol", &["presence-room", "news"]);
    carol.next("subscribed").await;
    carol.next("subscribed").await;
    let mut dan = Script::user(&suite, a.port, "dan", &["presence-room"]);
    let seen = dan.next("subscribed").await;
    assert_eq!(
        seen["members"]["ids"],
        json!(["carol", "dan"]),
        "node A lists node B's member"
    );
    let added = carol.next("member_added").await;
    assert_eq!(added["members"]["ids"], json!(["carol", "dan"]));
    assert_eq!(added["info"], json!({ "name": "User dan" }));
    // The HTTP API of node A reaches node B's subscriber, and counts node B's member.
    let (status, _) = dan
        .call(json!({ "do": "trigger", "channels": "news", "event": "across", "data": "a→b" }))
        .await;
    assert_eq!(status, 200);
    let across = carol.next_where("event", |v| v["name"] == "across").await;
    assert_eq!(across["data"], "a→b");
    let (_, users) = dan
        .call(json!({ "do": "get", "path": "/channels/presence-room", "params": { "info": "user_count" } }))
        .await;
    assert_eq!(users["user_count"], 2);
    // A client event crosses too.
    dan.run(json!({ "do": "client", "channel": "presence-room", "event": "client-hi", "data": 1 }))
        .await;
    let meta = carol
        .next_where("client-meta", |v| v["name"] == "client-hi")
        .await;
    assert_eq!(meta["userId"], "dan");
    dan.finish().await;
    let removed = carol.next("member_removed").await;
    assert_eq!(removed["id"], "dan");
    carol.finish().await;
    cluster.finish().await;
}

#[tokio::test]
async fn pusher_js_the_sdk_and_laravel_echo_use_public_private_and_presence_channels() {
    let Some(suite) = suite() else {
        return;
    };
    let (s, _) = server().await;
    let port = s.addr.port();
    let mut ann = Script::user(&suite, port, "ann", &["news", "private-orders"]);
    ann.next("subscribed").await;
    ann.next("subscribed").await;
    ann.run(json!({ "do": "subscribe", "channel": "presence-room" }))
        .await;
    let alone = ann.next("subscribed").await;
    assert_eq!(
        alone["members"],
        json!({ "count": 1, "ids": ["ann"], "me": "ann" })
    );

    // Bob comes: ann is told, and bob sees both, each with the user_info signed for them.
    let mut bob = Script::user(&suite, port, "bob", &["news", "private-orders"]);
    bob.next("subscribed").await;
    bob.next("subscribed").await;
    bob.run(json!({ "do": "subscribe", "channel": "presence-room" }))
        .await;
    let both = bob.next("subscribed").await;
    assert_eq!(
        both["members"],
        json!({ "count": 2, "ids": ["ann", "bob"], "me": "bob" })
    );
    let added = ann.next("member_added").await;
    assert_eq!(added["id"], "bob");
    assert_eq!(added["info"], json!({ "name": "User bob" }));
    assert_eq!(added["members"]["count"], 2);

    // The SDK triggers on a public and a private channel at once.
    let (status, body) = ann
        .call(json!({ "do": "trigger", "channels": ["news", "private-orders"], "event": "update", "data": { "n": 1 } }))
        .await;
    assert_eq!((status, body), (200, json!({})));
    for channel in ["news", "private-orders"] {
        let got = bob
            .next_where("event", |v| {
                v["channel"] == channel && v["name"] == "update"
            })
            .await;
        assert_eq!(got["data"], json!({ "n": 1 }));
        ann.next_where("event", |v| {
            v["channel"] == channel && v["name"] == "update"
        })
        .await;
    }
    // `socket_id` leaves the sender's own connection out.
    let (status, _) = ann
        .call(json!({ "do": "trigger", "channels": "news", "event": "mine", "data": "x", "exclude_me": true }))
        .await;
    assert_eq!(status, 200);
    bob.next_where("event", |v| v["name"] == "mine").await;
    // A batch.
    let (status, body) = ann
        .call(json!({ "do": "batch", "batch": [
            { "channel": "news", "name": "b1", "data": "one" },
            { "channel": "private-orders", "name": "b2", "data": "two" },
        ] }))
        .await;
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(
        bob.next_where("event", |v| v["name"] == "b1").await["data"],
        "one"
    );
    assert_eq!(
        bob.next_where("event", |v| v["name"] == "b2").await["data"],
        "two"
    );
    assert!(
        !ann.saw("event", Duration::from_millis(300), |v| v["name"] == "mine")
            .await,
        "the excluded socket did not get its own event"
    );

    // Client events: to the others on private and presence channels, with the sender's
    // user id on a presence channel, never back to the sender; not on a public channel.
    ann.run(json!({ "do": "client", "channel": "private-orders", "event": "client-typing", "data": { "t": 1 } }))
        .await;
    let typing = bob
        .next_where("event", |v| v["name"] == "client-typing")
        .await;
    assert_eq!(typing["data"], json!({ "t": 1 }));
    let meta = bob
        .next_where("client-meta", |v| v["name"] == "client-typing")
        .await;
    assert_eq!(meta["userId"], Value::Null);
    ann.run(
        json!({ "do": "client", "channel": "presence-room", "event": "client-wave", "data": "hi" }),
    )
    .await;
    let wave = bob
        .next_where("event", |v| v["name"] == "client-wave")
        .await;
    assert_eq!(wave["data"], "hi");
    let meta = bob
        .next_where("client-meta", |v| v["name"] == "client-wave")
        .await;
    assert_eq!(
        meta["userId"], "ann",
        "a presence channel's client event names its sender"
    );
    ann.run(json!({ "do": "client", "channel": "news", "event": "client-no", "data": 1 }))
        .await;
    let refused = ann.next("pusher-error").await;
    assert!(
        refused["data"]["message"]
            .as_str()
            .unwrap()
            .contains("private and presence"),
        "{refused}"
    );
    assert!(
        !ann.saw("event", Duration::from_millis(300), |v| v["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("client-")))
            .await
    );

    // What is occupied, through the SDK's `get`.
    let (status, body) = ann.call(json!({ "do": "get", "path": "/channels" })).await;
    assert_eq!(status, 200, "{body}");
    let mut names: Vec<&String> = body["channels"].as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, ["news", "presence-room", "private-orders"]);
    let (_, room) = ann
        .call(json!({ "do": "get", "path": "/channels/presence-room", "params": { "info": "user_count,subscription_count" } }))
        .await;
    assert_eq!(
        room,
        json!({ "user_count": 2, "subscription_count": 2, "occupied": true })
    );
    let (_, users) = ann
        .call(json!({ "do": "get", "path": "/channels/presence-room/users" }))
        .await;
    let mut ids: Vec<&str> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["ann", "bob"]);
    let (_, presence) = ann
        .call(json!({ "do": "get", "path": "/channels", "params": { "filter_by_prefix": "presence-", "info": "user_count" } }))
        .await;
    assert_eq!(
        presence,
        json!({ "channels": { "presence-room": { "user_count": 2 } } })
    );

    // Bob goes: ann is told.
    bob.finish().await;
    let removed = ann.next("member_removed").await;
    assert_eq!(
        (removed["id"].clone(), removed["members"]["count"].clone()),
        (json!("bob"), json!(1))
    );

    // Laravel Echo on the same client: `private('orders').listen('OrderShipped')`.
    ann.run(json!({ "do": "echo", "channel": "orders", "event": "OrderShipped" }))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = ann
        .call(json!({ "do": "trigger", "channels": "private-orders", "event": "App\\Events\\OrderShipped", "data": { "id": 7 } }))
        .await;
    assert_eq!(status, 200);
    assert_eq!(ann.next("echo").await["data"], json!({ "id": 7 }));

    // Sign-in, an event to the user, and the user's connections terminated.
    ann.run(json!({ "do": "signin" })).await;
    ann.next("signed_in").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = ann
        .call(json!({ "do": "send_to_user", "user": "ann", "event": "hello", "data": { "to": "ann" } }))
        .await;
    assert_eq!(status, 200);
    let hello = ann.next("user-event").await;
    assert_eq!(
        (hello["name"].clone(), hello["data"].clone()),
        (json!("hello"), json!({ "to": "ann" }))
    );
    let (status, _) = ann.call(json!({ "do": "terminate", "user": "ann" })).await;
    assert_eq!(status, 200);
    let closed = ann.next("pusher-error").await;
    assert_eq!(closed["data"]["code"], 4009);
    ann.finish().await;
    s.stop().await;
}

#[tokio::test]
async fn the_http_api_refuses_bad_requests_with_pushers_statuses() {
    let (s, _) = server().await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: String, query: String| {
        let url = format!("{}?{query}", s.http(path));
        let request = http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let res = request.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let event = |data: &str| json!({ "name": "e", "channel": "news", "data": data }).to_string();
    let path = "/apps/demo/events";
    let good = event("x");
    let (status, body) = post(
        path,
        good.clone(),
        signed_query("POST", path, &good, APP_SECRET, 0),
    )
    .await;
    assert_eq!((status, body), (200, json!({})));

    // A stale timestamp, a wrong secret, another app's id, a body that is not the one
    // signed, no signature at all.
    for (query, what) in [
        (
            signed_query("POST", path, &good, APP_SECRET, -601),
            "a stale timestamp",
        ),
        (
            signed_query("POST", path, &good, "not-the-secret", 0),
            "a wrong signature",
        ),
        (
            signed_query("POST", "/apps/other/events", &good, APP_SECRET, 0),
            "another path",
        ),
        (
            signed_query("POST", path, &event("y"), APP_SECRET, 0),
            "another body",
        ),
        (format!("auth_key={APP_KEY}"), "no signature"),
    ] {
        let (status, body) = post(path, good.clone(), query).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    }
    let (status, _) = post(
        "/apps/other/events",
        good.clone(),
        signed_query("POST", "/apps/other/events", &good, APP_SECRET, 0),
    )
    .await;
    assert_eq!(status, 401, "an app id the key is not of");

    // Each field wrong: 400, and 413 for data over 10 KB.
    let big = "x".repeat(10 * 1024 + 1);
    let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let batch: Vec<Value> = (0..11)
        .map(|i| json!({ "name": "e", "channel": format!("c{i}"), "data": "x" }))
        .collect();
    for (path, body, want) in [
        ("/apps/demo/events", event(&big), 413),
        ("/apps/demo/events", "{not json".to_owned(), 400),
        (
            "/apps/demo/events",
            json!({ "channel": "news", "data": "x" }).to_string(),
            400,
        ),
        (
            "/apps/demo/events",
            json!({ "name": "e", "channel": "news" }).to_string(),
            400,
        ),
        (
            "/apps/demo/events",
            json!({ "name": "e", "channel": "bad name", "data": "x" }).to_string(),
            400,
        ),
        (
            "/apps/demo/events",
            json!({ "name": "e", "channels": many, "data": "x" }).to_string(),
            400,
        ),
        (
            "/apps/demo/events",
            json!({ "name": "e", "channel": "news", "data": "x", "socket_id": "12" }).to_string(),
            400,
        ),
        (
            "/apps/demo/events",
            json!({ "name": "x".repeat(201), "channel": "news", "data": "x" }).to_string(),
            400,
        ),
        (
            "/apps/demo/batch_events",
            json!({ "batch": batch }).to_string(),
            400,
        ),
    ] {
        let (status, answer) = post(
            path,
            body.clone(),
            signed_query("POST", path, &body, APP_SECRET, 0),
        )
        .await;
        assert_eq!(
            status,
            want,
            "{path} {}: {answer}",
            &body[..body.len().min(80)]
        );
    }
    // Reading: user_count needs presence channels.
    let get = |path: &str, extra: &str| {
        let mut params: Vec<(String, String)> = vec![
            ("auth_key".into(), APP_KEY.into()),
            (
                "auth_timestamp".into(),
                chrono::Utc::now().timestamp().to_string(),
            ),
            ("auth_version".into(), "1.0".into()),
        ];
        for pair in extra.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap();
            params.push((k.into(), v.into()));
        }
        params.sort();
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let query = query.join("&");
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
        mac.update(format!("GET\n{path}\n{query}").as_bytes());
        let url = format!(
            "{}?{query}&auth_signature={}",
            s.http(path),
            hex::encode(mac.finalize().into_bytes())
        );
        let request = http.get(url);
        async move {
            let res = request.send().await.unwrap();
            (
                res.status().as_u16(),
                res.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(
        get("/apps/demo/channels", "").await,
        (200, json!({ "channels": {} }))
    );
    assert_eq!(get("/apps/demo/channels", "info=user_count").await.0, 400);
    assert_eq!(
        get("/apps/demo/channels/news", "info=user_count").await.0,
        400
    );
    assert_eq!(get("/apps/demo/channels/news/users", "").await.0, 400);
    assert_eq!(
        get("/apps/demo/channels/presence-x", "info=user_count").await,
        (200, json!({ "user_count": 0, "occupied": false }))
    );
    s.stop().await;
}

#[tokio::test]
async fn parlors_own_auth_endpoint_signs_the_users_own_channel_and_presence_only() {
    let (s, _) = server().await;
    let ann = s.token("ann");
    let http = reqwest::Client::new();
    let auth = |token: Option<&str>, socket: &str, channel: &str| {
        let mut request = http
            .post(s.http("/pusher/auth"))
            .form(&[("socket_id", socket), ("channel_name", channel)]);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let res = request.send().await.unwrap();
            (
                res.status().as_u16(),
                res.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, own) = auth(Some(&ann), "1.2", "private-user-ann").await;
    assert_eq!(status, 200, "{own}");
    {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
        mac.update(b"1.2:private-user-ann");
        let want = format!("{APP_KEY}:{}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(own["auth"], want.as_str());
    }
    let (status, presence) = auth(Some(&ann), "1.2", "presence-lobby").await;
    assert_eq!(status, 200);
    let data: Value = serde_json::from_str(presence["channel_data"].as_str().unwrap()).unwrap();
    assert_eq!(data["user_id"], "ann");
    for (token, socket, channel, want, code) in [
        (
            Some(ann.as_str()),
            "1.2",
            "private-user-bob",
            403,
            "forbidden",
        ),
        (
            Some(ann.as_str()),
            "1.2",
            "private-orders",
            403,
            "forbidden",
        ),
        (
            Some(ann.as_str()),
            "12",
            "private-user-ann",
            400,
            "invalid_socket_id",
        ),
        (
            Some(ann.as_str()),
            "1.2",
            "bad name",
            400,
            "invalid_channel",
        ),
        // Without a token the caller is an anonymous visitor of the demo domain, not ann.
        (None, "1.2", "private-user-ann", 403, "forbidden"),
    ] {
        let (status, body) = auth(token, socket, channel).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (want, Some(code)),
            "{channel} {socket}: {body}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn malformed_frames_oversize_events_and_a_thousand_channels_get_clear_errors() {
    let (s, _) = server().await;
    let mut ws = common::Client::connect(&s.ws(&format!("/app/{APP_KEY}"))).await;
    let hello = ws.recv().await;
    assert_eq!(hello["event"], "pusher:connection_established");
    for bad in [
        "not json",
        "[1,2]",
        r#"{"data":{}}"#,
        r#"{"event":"pusher:subscribe","data":{"auth":"x"}}"#,
    ] {
        ws.send_raw(tokio_tungstenite::tungstenite::Message::text(bad))
            .await;
        let error = ws.recv().await;
        assert_eq!(error["event"], "pusher:error", "{bad}: {error}");
        assert!(error["data"]["message"].is_string(), "{bad}: {error}");
    }
    // A thousand channels: the first hundred, then 4009 for each of the rest.
    let mut subscribed = 0;
    let mut refused = 0;
    for i in 0..1000 {
        ws.send(json!({ "event": "pusher:subscribe", "data": { "channel": format!("c{i}") } }))
            .await;
    }
    for _ in 0..1000 {
        let answer = ws.recv().await;
        match answer["event"].as_str() {
            Some("pusher_internal:subscription_succeeded") => subscribed += 1,
            Some("pusher:error") if answer["data"]["code"] == 4009 => refused += 1,
            _ => panic!("unexpected {answer}"),
        }
    }
    assert_eq!((subscribed, refused), (100, 900));
    for i in 0..2 {
        ws.send(json!({ "event": "pusher:unsubscribe", "data": { "channel": format!("c{i}") } }))
            .await;
    }
    // A private channel, then a client event over 10 KB on it: refused, nothing sent.
    let socket_id: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    let socket_id = socket_id["socket_id"].as_str().unwrap().to_owned();
    let sign = |text: &str| {
        format!(
            "{APP_KEY}:{}",
            common::pusher::hmac_hex(APP_SECRET, text.as_bytes())
        )
    };
    let auth = sign(&format!("{socket_id}:private-big"));
    ws.send(
        json!({ "event": "pusher:subscribe", "data": { "channel": "private-big", "auth": auth } }),
    )
    .await;
    assert_eq!(
        ws.recv().await["event"],
        "pusher_internal:subscription_succeeded"
    );
    let big = "x".repeat(10 * 1024 + 1);
    ws.send(json!({ "event": "client-big", "channel": "private-big", "data": big }))
        .await;
    let refused = ws.recv().await;
    assert!(
        refused["data"]["message"]
            .as_str()
            .unwrap()
            .contains("10240 bytes"),
        "{refused}"
    );
    // A signed presence subscription whose channel_data names no member.
    let data = r#"{"user_info":{}}"#;
    let auth = sign(&format!("{socket_id}:presence-x:{data}"));
    ws.send(json!({ "event": "pusher:subscribe", "data": { "channel": "presence-x", "auth": auth, "channel_data": data } }))
        .await;
    let refused = ws.recv().await;
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["data"]["status"], 400);
    // Another socket's signature: 401.
    let auth = sign("1.1:private-other");
    ws.send(json!({ "event": "pusher:subscribe", "data": { "channel": "private-other", "auth": auth } }))
        .await;
    assert_eq!(ws.recv().await["data"]["status"], 401);
    s.stop().await;
}

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
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const APP_KEY: &str = "app-key";
const APP_SECRET: &str = "app-secret-0123456789";

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

    /// The script against the server listening on 127.0.0.1:`port`.
    fn start_at(suite: &Path, port: u16, key: &str, secret: &str, channels: &[&str]) -> Self {
        let mut child = Command::new("node")
            .arg(suite.join("pusher_client.mjs"))
            .current_dir(suite)
            .env("PARLOR_PORT", port.to_string())
            .env("APP_KEY", key)
            .env("APP_SECRET", secret)
            .env("CHANNELS", channels.join(","))
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

    /// The next line the script printed whose `event` is `event` (lines printed before it
    /// stay for later calls).
    async fn next(&mut self, event: &str) -> Value {
        if let Some(at) = self.seen.iter().position(|v| v["event"] == event) {
            return self.seen.remove(at);
        }
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {event} from pusher-js in time"))
                .unwrap()
                .unwrap_or_else(|| panic!("pusher-js ended before {event}"));
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] == event {
                return v;
            }
            self.seen.push(v);
        }
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
async fn a_notification_sent_to_one_node_reaches_pusher_js_on_another() {
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
    cluster.finish().await;
}

//! Notifications (`docs/notifications.md`, seed 004): a back end sends, the user polls,
//! marks read and reads a task's timeline over HTTP, and gets them live on `/ws` and as
//! server-sent events; bad input is refused whole; two nodes on PostgreSQL + Redis.
//!
//! The two-node test needs `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL` and says
//! it is skipped without them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::cluster::{Cluster, Database, servers};
use common::{Client, TestServer, WAIT};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// A server whose demo domain has a server key; returns the key too.
async fn server() -> (TestServer, String) {
    let (key, entry) = parlor::auth::keys::generate_with(parlor::auth::keys::KEY_PREFIX);
    let s = TestServer::start_with(move |c| {
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.server_keys = vec![entry];
    })
    .await;
    (s, key)
}

/// What the seed's scheduling agent sends.
fn confirmation(user: &str, task: &str, content: &str) -> Value {
    json!({
        "type": "confirmation",
        "taskId": task,
        "userId": user,
        "content": content,
        "data": { "eventId": "event_789" },
        "timestamp": "2026-12-06T10:30:00Z",
    })
}

/// A `/ws` connection of `user` subscribed to its notifications after `since`; the
/// subscription's answer.
async fn subscribed(s: &TestServer, user: &str, since: Option<u64>) -> (Client, Value) {
    let mut c = s.connect_as(user).await;
    let mut frame = json!({ "type": "subscribe-notifications" });
    if let Some(since) = since {
        frame["since"] = json!(since);
    }
    let id = c.request(frame).await;
    let answer = c.reply(&id).await;
    assert_eq!(answer["type"], "notifications-subscribed", "{answer}");
    (c, answer)
}

#[tokio::test]
async fn the_seeds_flow_send_poll_mark_read_and_the_tasks_timeline() {
    let (s, key) = server().await;
    let ann = s.token("ann");
    let (mut live, answer) = subscribed(&s, "ann", None).await;
    assert_eq!(
        (answer["unread"].clone(), answer["lastSeq"].clone()),
        (json!(0), json!(0))
    );

    // The back end sends; ann is connected, so the push counts as sent.
    let (status, sent) = s
        .post_with(
            "/api/notifications",
            &key,
            &confirmation(
                "ann",
                "task_123",
                "Your meeting has been scheduled successfully.",
            ),
        )
        .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["success"], true);
    assert_eq!(sent["pusherSent"], true);
    assert_eq!(sent["databaseStored"], true);
    let id = sent["messageId"].as_str().unwrap().to_owned();

    let frame = live.recv_type("notification").await;
    let n = &frame["notification"];
    assert_eq!(n["id"], id.as_str());
    assert_eq!(n["type"], "CONFIRMATION", "written in upper case");
    assert_eq!(n["userId"], "ann");
    assert_eq!(n["taskId"], "task_123");
    assert_eq!(n["orgId"], Value::Null);
    assert_eq!(n["data"], json!({ "eventId": "event_789" }));
    assert_eq!(n["read"], false);
    assert_eq!(n["seq"], 1);
    assert!(n["createdAt"].as_str().unwrap().ends_with('Z'));

    // Polling lists it as unread.
    let (status, list) = s.get_with("/api/chat-messages", &ann).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 1);
    assert_eq!(list["hasMore"], false);
    assert_eq!(list["messages"][0], *n, "the same object everywhere");

    // Another user's mark-read is not counted and touches nothing.
    let (_, bob_marked) = s
        .post_with(
            "/api/chat-messages/mark-read",
            &s.token("bob"),
            &json!({ "messageIds": [id] }),
        )
        .await;
    assert_eq!(bob_marked, json!({ "success": true, "markedCount": 0 }));
    let (_, count) = s.get_with("/api/chat-messages/unread-count", &ann).await;
    assert_eq!(count, json!({ "count": 1, "lastSeq": 1 }));

    // A second notification of the task, then ann marks the first read.
    let mut update = confirmation("ann", "task_123", "Processing your request…");
    update["type"] = json!("SCHEDULING_UPDATE");
    update["orgId"] = json!("org_abc");
    let (_, second) = s.post_with("/api/notifications", &key, &update).await;
    let (_, marked) = s
        .post_with(
            "/api/chat-messages/mark-read",
            &ann,
            &json!({ "messageIds": [id, "not-one-of-ours"] }),
        )
        .await;
    assert_eq!(marked, json!({ "success": true, "markedCount": 1 }));

    let (status, task) = s.get_with("/api/chat-messages/task_123", &ann).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["taskId"], "task_123");
    assert_eq!(task["count"], 2);
    let timeline: Vec<(Value, Value, Value)> = task["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].clone(), m["type"].clone(), m["read"].clone()))
        .collect();
    assert_eq!(
        timeline,
        [
            (json!(id), json!("CONFIRMATION"), json!(true)),
            (
                second["messageId"].clone(),
                json!("SCHEDULING_UPDATE"),
                json!(false)
            ),
        ],
        "oldest first, with read state"
    );
    let (_, bobs_task) = s
        .get_with("/api/chat-messages/task_123", &s.token("bob"))
        .await;
    assert_eq!(
        bobs_task["count"], 0,
        "a task's notifications are ann's only"
    );

    // With nobody listening, the send is stored all the same.
    let (status, offline) = s
        .post_with(
            "/api/notifications",
            &key,
            &confirmation("carol", "t9", "Meeting cancelled"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            offline["success"].clone(),
            offline["pusherSent"].clone(),
            offline["databaseStored"].clone()
        ),
        (json!(true), json!(false), json!(true))
    );
    let (_, carols) = s.get_with("/api/chat-messages", &s.token("carol")).await;
    assert_eq!(carols["messages"][0]["content"], "Meeting cancelled");

    // Mark-all-read empties the unread list.
    let (_, all) = s
        .post_with("/api/chat-messages/mark-all-read", &ann, &json!({}))
        .await;
    assert_eq!(all, json!({ "success": true, "markedCount": 1 }));
    let (_, empty) = s.get_with("/api/chat-messages", &ann).await;
    assert_eq!(
        (empty["total"].clone(), empty["messages"].clone()),
        (json!(0), json!([]))
    );
    s.stop().await;
}

#[tokio::test]
async fn the_unread_list_pages_newest_first() {
    let (s, key) = server().await;
    let batch: Vec<Value> = (1..=5)
        .map(|i| confirmation("ann", "t", &format!("n{i}")))
        .collect();
    let (status, results) = s.post_with("/api/notifications", &key, &json!(batch)).await;
    assert_eq!(status, 200, "{results}");
    assert_eq!(
        results.as_array().unwrap().len(),
        5,
        "one result per notification"
    );
    let ann = s.token("ann");
    let (_, first) = s.get_with("/api/chat-messages?limit=2", &ann).await;
    let contents = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(contents(&first), ["n5", "n4"]);
    assert_eq!(
        (first["total"].clone(), first["hasMore"].clone()),
        (json!(5), json!(true))
    );
    let before = first["nextBefore"].as_u64().unwrap();
    let (_, second) = s
        .get_with(&format!("/api/chat-messages?limit=2&before={before}"), &ann)
        .await;
    assert_eq!(contents(&second), ["n3", "n2"]);
    let before = second["nextBefore"].as_u64().unwrap();
    let (_, last) = s
        .get_with(&format!("/api/chat-messages?limit=2&before={before}"), &ann)
        .await;
    assert_eq!(contents(&last), ["n1"]);
    assert_eq!(
        (last["hasMore"].clone(), last["nextBefore"].clone()),
        (json!(false), Value::Null)
    );
    s.stop().await;
}

#[tokio::test]
async fn a_subscriber_gets_what_was_stored_after_since_then_each_new_one_in_order() {
    let (s, key) = server().await;
    for i in 1..=3 {
        s.post_with(
            "/api/notifications",
            &key,
            &confirmation("ann", "t", &format!("n{i}")),
        )
        .await;
    }
    let (mut live, answer) = subscribed(&s, "ann", Some(1)).await;
    assert_eq!(
        (answer["unread"].clone(), answer["lastSeq"].clone()),
        (json!(3), json!(3))
    );
    // Stored ones first, then live ones, once each and in order; concurrent sends too.
    let sends = (4..=8).map(|i| {
        let (url, key) = (s.http("/api/notifications"), key.clone());
        async move {
            common::call(
                reqwest::Method::POST,
                &url,
                &key,
                Some(&confirmation("ann", "t", &format!("n{i}"))),
            )
            .await
        }
    });
    for (status, _) in futures_util::future::join_all(sends).await {
        assert_eq!(status, 200);
    }
    let mut seqs = Vec::new();
    while seqs.len() < 7 {
        let f = live.recv_type("notification").await;
        seqs.push(f["notification"]["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, [2, 3, 4, 5, 6, 7, 8]);

    // Unsubscribed, ann is no longer listening.
    let id = live
        .request(json!({ "type": "unsubscribe-notifications" }))
        .await;
    let gone = live.reply(&id).await;
    assert_eq!(
        (gone["type"].clone(), gone["subscribed"].clone()),
        (json!("notifications-unsubscribed"), json!(true))
    );
    let (_, after) = s
        .post_with("/api/notifications", &key, &confirmation("ann", "t", "n9"))
        .await;
    assert_eq!(after["pusherSent"], false);
    s.stop().await;
}

/// Reads server-sent events from `res` until `n` arrived: (event, id, data).
async fn sse_events(res: reqwest::Response, n: usize) -> Vec<(String, String, Value)> {
    let mut body = res.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("an event in time")
            .expect("the stream is open")
            .expect("bytes");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !event.is_empty() {
                events.push((event, id, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

#[tokio::test]
async fn the_event_stream_resumes_after_the_last_event_id() {
    let (s, key) = server().await;
    for i in 1..=2 {
        s.post_with(
            "/api/notifications",
            &key,
            &confirmation("ann", "t", &format!("n{i}")),
        )
        .await;
    }
    let res = reqwest::Client::new()
        .get(s.http("/api/chat-messages/stream"))
        .bearer_auth(s.token("ann"))
        .header("Last-Event-ID", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (_, sent) = s
        .post_with("/api/notifications", &key, &confirmation("ann", "t", "n3"))
        .await;
    assert_eq!(sent["pusherSent"], true, "the stream counts as listening");
    let events = sse_events(res, 2).await;
    let got: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|(e, id, d)| (e.as_str(), id.as_str(), d["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [("chat-message", "2", "n2"), ("chat-message", "3", "n3")]
    );
    assert_eq!(events[1].2["type"], "CONFIRMATION");

    // EventSource cannot set headers: ?token= and ?since= do.
    let res = reqwest::get(s.http(&format!(
        "/api/chat-messages/stream?token={}&since=2",
        s.token("ann")
    )))
    .await
    .unwrap();
    let events = sse_events(res, 1).await;
    assert_eq!(events[0].1, "3");

    for (query, code) in [
        (String::new(), "missing_token"),
        ("?token=nonsense".to_owned(), "invalid_token"),
    ] {
        let res = reqwest::get(s.http(&format!("/api/chat-messages/stream{query}")))
            .await
            .unwrap();
        let (status, body) = common::status_and_body(res).await;
        assert_eq!((status, body["error"]["code"].clone()), (401, json!(code)));
    }
    s.stop().await;
}

/// A user's request with bad input: method, path, token, body, and the status and code
/// expected.
type UserCase<'a> = (
    reqwest::Method,
    &'a str,
    &'a str,
    Option<Value>,
    u16,
    &'a str,
);

#[tokio::test]
async fn bad_input_is_refused_with_its_code_and_nothing_is_stored() {
    let (s, key) = server().await;
    let long = "x".repeat(10_001);
    let big: Vec<u32> = (0..3000).collect();
    let mut deep = json!(1);
    for _ in 0..70 {
        deep = json!([deep]);
    }
    let many: Vec<Value> = (0..101).map(|_| confirmation("ann", "t", "hi")).collect();
    let mut bad_in_batch = vec![confirmation("ann", "t", "fine"); 3];
    bad_in_batch[1]["type"] = json!("urgent");
    let with = |field: &str, value: Value| {
        let mut v = confirmation("ann", "t", "hi");
        v[field] = value;
        v
    };
    let without = |field: &str| {
        let mut v = confirmation("ann", "t", "hi");
        v.as_object_mut().unwrap().remove(field);
        v
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (without("type"), 400, "invalid_notification_type"),
        (
            with("type", json!("URGENT")),
            400,
            "invalid_notification_type",
        ),
        (with("type", json!(7)), 400, "invalid_body"),
        (without("userId"), 400, "invalid_user_id"),
        (with("userId", json!("ann smith")), 400, "invalid_user_id"),
        (without("content"), 400, "empty_message"),
        (with("content", json!("   ")), 400, "empty_message"),
        (with("content", json!(long)), 413, "message_too_long"),
        (with("taskId", json!("task 1")), 400, "invalid_task_id"),
        (with("orgId", json!("")), 400, "invalid_org_id"),
        (with("data", json!({ "big": big })), 413, "invalid_data"),
        (with("data", deep), 400, "invalid_data"),
        (
            with("timestamp", json!("yesterday")),
            400,
            "invalid_timestamp",
        ),
        (with("priority", json!("high")), 400, "invalid_body"),
        (json!("hello"), 400, "invalid_body"),
        (json!([]), 400, "invalid_body"),
        (json!(many), 413, "too_many_notifications"),
        (json!(bad_in_batch), 400, "invalid_notification_type"),
    ];
    for (body, status, code) in &cases {
        let (got, answer) = s.post_with("/api/notifications", &key, body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str().unwrap_or_default()),
            (*status, *code),
            "{body:.200} → {answer}"
        );
    }
    let (_, batch_error) = s
        .post_with("/api/notifications", &key, &cases[cases.len() - 1].0)
        .await;
    assert!(
        batch_error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("items[1]"),
        "{batch_error}"
    );

    // Who may send: a server key or the domain's admin, not a user, not nobody.
    let (status, answer) = s
        .post_with(
            "/api/notifications",
            &s.token("ann"),
            &confirmation("ann", "t", "hi"),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    let (status, _) = s
        .post_with("/api/notifications", "", &confirmation("ann", "t", "hi"))
        .await;
    assert_eq!(status, 403);

    // Nothing above was stored.
    let (_, count) = s
        .get_with("/api/chat-messages/unread-count", &s.token("ann"))
        .await;
    assert_eq!(count, json!({ "count": 0, "lastSeq": 0 }));

    // The users' side.
    let ann = s.token("ann");
    let too_many: Vec<String> = (0..1001).map(|i| format!("id{i}")).collect();
    let user_cases: Vec<UserCase<'_>> = vec![
        (
            reqwest::Method::GET,
            "/api/chat-messages",
            "",
            None,
            401,
            "missing_token",
        ),
        (
            reqwest::Method::GET,
            "/api/chat-messages",
            &key,
            None,
            403,
            "forbidden",
        ),
        (
            reqwest::Method::GET,
            "/api/chat-messages?limit=0",
            &ann,
            None,
            400,
            "invalid_query",
        ),
        (
            reqwest::Method::GET,
            "/api/chat-messages?limit=101",
            &ann,
            None,
            400,
            "invalid_query",
        ),
        (
            reqwest::Method::GET,
            "/api/chat-messages?before=x",
            &ann,
            None,
            400,
            "invalid_query",
        ),
        (
            reqwest::Method::GET,
            "/api/chat-messages?page=2",
            &ann,
            None,
            400,
            "invalid_query",
        ),
        (
            reqwest::Method::GET,
            "/api/chat-messages/unread-count",
            "",
            None,
            401,
            "missing_token",
        ),
        (
            reqwest::Method::GET,
            "/api/chat-messages/bad%20task",
            &ann,
            None,
            400,
            "invalid_task_id",
        ),
        (
            reqwest::Method::POST,
            "/api/chat-messages/mark-read",
            &ann,
            Some(json!({ "messageIds": [] })),
            400,
            "invalid_message_ids",
        ),
        (
            reqwest::Method::POST,
            "/api/chat-messages/mark-read",
            &ann,
            Some(json!({ "messageIds": too_many })),
            400,
            "invalid_message_ids",
        ),
        (
            reqwest::Method::POST,
            "/api/chat-messages/mark-read",
            &ann,
            Some(json!({ "messageIds": ["a'; DROP TABLE notifications; --"] })),
            400,
            "invalid_message_ids",
        ),
        (
            reqwest::Method::POST,
            "/api/chat-messages/mark-read",
            &ann,
            Some(json!({ "ids": ["x"] })),
            400,
            "invalid_body",
        ),
        (
            reqwest::Method::POST,
            "/api/chat-messages/mark-all-read",
            &key,
            Some(json!({})),
            403,
            "forbidden",
        ),
    ];
    for (method, path, token, body, status, code) in user_cases {
        let (got, answer) = s.call(method.clone(), path, token, body.as_ref()).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str().unwrap_or_default()),
            (status, code),
            "{method} {path} → {answer}"
        );
    }

    // /ws: a malformed subscription is an error frame, and the connection stays usable.
    let mut c = s.connect_as("ann").await;
    let id = c
        .request(json!({ "type": "subscribe-notifications", "since": "yesterday" }))
        .await;
    let error = c.reply(&id).await;
    assert_eq!(
        (error["type"].clone(), error["code"].clone()),
        (json!("error"), json!("invalid_frame"))
    );
    let mut anonymous = s.connect().await;
    let id = anonymous
        .request(json!({ "type": "subscribe-notifications" }))
        .await;
    let error = anonymous.reply(&id).await;
    assert_eq!(error["code"], "missing_token");
    s.stop().await;
}

/// A token of the demo domain for `user` with `role`, signed with the test secret.
fn demo_token(user: &str, role: &str) -> String {
    parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        user,
        Some(user),
        role,
        "demo",
        600,
    )
    .unwrap()
}

/// A client of `/ws` at `url`, subscribed to its notifications from the first.
async fn subscribed_at(url: &str) -> Client {
    let mut c = Client::connect(url).await;
    let id = c
        .request(json!({ "type": "subscribe-notifications", "since": 0 }))
        .await;
    let answer = c.reply(&id).await;
    assert_eq!(answer["type"], "notifications-subscribed", "{answer}");
    c
}

#[tokio::test]
async fn a_notification_sent_to_one_node_reaches_the_user_on_another() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let cluster = Cluster::start(2, None, &redis, Database::create(&db_url).await).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut on_b = subscribed_at(&b.ws("ann")).await;
    // The domain's admin may send, as a server key may.
    let back_end = demo_token("backend", "admin");
    // Node A learns that ann listens on B within the presence renewal.
    let mut pushed = false;
    for i in 0..20 {
        let (status, sent) = common::call(
            reqwest::Method::POST,
            &a.http("/api/notifications"),
            &back_end,
            Some(&confirmation("ann", "t", &format!("n{i}"))),
        )
        .await;
        assert_eq!(
            (status, sent["databaseStored"].clone()),
            (200, json!(true)),
            "{sent}"
        );
        if sent["pusherSent"] == true {
            pushed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(pushed, "node A sees ann listening on node B");
    // Every one of them reaches ann on B, in order.
    let (_, count) = common::call(
        reqwest::Method::GET,
        &b.http("/api/chat-messages/unread-count"),
        &demo_token("ann", "visitor"),
        None,
    )
    .await;
    let last = count["lastSeq"].as_u64().unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < last as usize {
        let f = on_b.recv_type("notification").await;
        seqs.push(f["notification"]["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    cluster.finish().await;
}

#[tokio::test]
async fn a_configured_cookie_carries_the_users_token() {
    let (key, entry) = parlor::auth::keys::generate_with(parlor::auth::keys::KEY_PREFIX);
    let s = TestServer::start_with(move |c| {
        let demo = c.domains.iter_mut().find(|d| d.id == "demo").unwrap();
        demo.server_keys = vec![entry];
        c.notifications.token_cookie = Some("session".to_owned());
    })
    .await;
    let (_, sent) = s
        .post_with("/api/notifications", &key, &confirmation("ann", "t", "hi"))
        .await;
    let id = sent["messageId"].clone();
    let client = reqwest::Client::new();
    let cookie = format!("theme=dark; session={}", s.token("ann"));
    let res = client
        .get(s.http("/api/chat-messages"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    let (status, list) = common::status_and_body(res).await;
    assert_eq!((status, list["total"].clone()), (200, json!(1)), "{list}");

    // A change another site's page would make with the user's cookie is refused…
    let res = client
        .post(s.http("/api/chat-messages/mark-read"))
        .header("Cookie", &cookie)
        .header("Origin", "https://elsewhere.example")
        .json(&json!({ "messageIds": [id] }))
        .send()
        .await
        .unwrap();
    let (status, body) = common::status_and_body(res).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("cross_site"))
    );
    let res = client
        .post(s.http("/api/chat-messages/mark-all-read"))
        .header("Cookie", &cookie)
        .header("Sec-Fetch-Site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let (_, count) = s
        .get_with("/api/chat-messages/unread-count", &s.token("ann"))
        .await;
    assert_eq!(count["count"], 1, "nothing was marked");

    // …and one from the site's own page is not.
    let res = client
        .post(s.http("/api/chat-messages/mark-read"))
        .header("Cookie", &cookie)
        .header("Sec-Fetch-Site", "same-origin")
        .json(&json!({ "messageIds": [id] }))
        .send()
        .await
        .unwrap();
    let (status, marked) = common::status_and_body(res).await;
    assert_eq!(
        (status, marked["markedCount"].clone()),
        (200, json!(1)),
        "{marked}"
    );

    // A bad token in the cookie is refused as one in the header; a header wins.
    let res = client
        .get(s.http("/api/chat-messages/unread-count"))
        .header("Cookie", "session=not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .get(s.http("/api/chat-messages/unread-count"))
        .header("Cookie", "session=not-a-token")
        .bearer_auth(s.token("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    s.stop().await;

    // Without the setting, the cookie means nothing.
    let (plain, _) = server().await;
    let res = client
        .get(plain.http("/api/chat-messages"))
        .header("Cookie", format!("session={}", plain.token("ann")))
        .send()
        .await
        .unwrap();
    let (status, body) = common::status_and_body(res).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("missing_token"))
    );
    plain.stop().await;
}

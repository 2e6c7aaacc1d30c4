//! The native WebSocket protocol over real sockets: the WeeziQ seed flow, recovery with
//! `since`, idempotent sends, presence/typing/read receipts, slow consumers, bad input and
//! graceful shutdown.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn seed_flow_join_send_broadcast_ping_and_http() {
    let server = TestServer::start().await;

    // Seed 000: connect with ?roomId=, the server joins and sends room-joined + history.
    let mut a = Client::connect(&server.ws("/ws?roomId=room-123")).await;
    let joined = a.recv_type("room-joined").await;
    assert_eq!(joined["roomId"], "room-123");
    assert!(joined["timestamp"].as_str().unwrap().ends_with('Z'));
    let history = a.recv_type("message-history").await;
    assert_eq!(history["messages"], json!([]));

    // A second client joins with the seed's join-room frame (profile fields, role
    // "customer"; the seed's domainId is tests/seed_weeziq.rs's, on a public domain).
    let mut b = server.connect().await;
    b.send(json!({
        "type": "join-room", "roomId": "room-123", "userId": "user-123", "userName": "John Doe",
        "role": "customer",
        "customerData": { "name": "John Doe", "email": "john@example.com" }
    }))
    .await;
    assert_eq!(b.recv_type("room-joined").await["roomId"], "room-123");
    b.recv_type("message-history").await;

    // Seed's send-message without roomId goes to the joined room; everyone gets it.
    b.send(json!({ "type": "send-message", "message": "Hello, how can you help me?" }))
        .await;
    let ack = b.recv_type("message-ack").await;
    assert_eq!(ack["seq"], 1);
    for client in [&mut a, &mut b] {
        let m = client.recv_type("message-received").await;
        assert_eq!(m["message"], "Hello, how can you help me?");
        assert_eq!(m["chatRoomId"], "room-123");
        assert_eq!(m["roomId"], "room-123");
        assert_eq!(m["seq"], 1);
        assert_eq!(m["id"], ack["id"]);
        assert_eq!(
            m["userName"], "John Doe",
            "anonymous visitor's display name from join-room"
        );
        assert_eq!(m["role"], "visitor", "a role in a frame grants nothing");
        assert!(m["userId"].as_str().unwrap().starts_with("v_"));
    }

    b.send(json!({ "type": "ping" })).await;
    let pong = b.recv_type("pong").await;
    assert!(pong["timestamp"].is_string());

    // POST /api/messages stores and broadcasts; GET returns both, in order.
    let http = reqwest::Client::new();
    let posted = http
        .post(server.http("/api/messages"))
        .json(&json!({ "message": "Hello", "role": "user", "chatRoomId": "room-123" }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 201);
    let posted: Value = posted.json().await.unwrap();
    assert_eq!(posted["seq"], 2);
    for client in [&mut a, &mut b] {
        let m = client.recv_type("message-received").await;
        assert_eq!(m["message"], "Hello");
        assert_eq!(m["seq"], 2);
    }
    let listed: Value = http
        .get(server.http("/api/messages?chatRoomId=room-123"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let texts: Vec<&str> = listed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Hello, how can you help me?", "Hello"]);

    // A later joiner gets the history.
    let mut c = server.connect().await;
    let (_, history) = c.join("room-123", None).await;
    assert_eq!(seqs(&history), [1, 2]);
    server.stop().await;
}

#[tokio::test]
async fn reconnect_with_since_replays_exactly_the_missed_messages() {
    let server = TestServer::start_with(|c| c.store.room_cache = 16).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.join("r", None).await;
    b.join("r", None).await;
    b.say("r", "before", None).await;
    let last_seen = a.recv_type("message-received").await["seq"]
        .as_u64()
        .unwrap();
    drop(a);

    // 50 messages while A is away: more than the room cache, so part comes from the store.
    for i in 0..50 {
        b.say("r", &format!("m{i}"), None).await;
    }
    let mut a = server.connect().await;
    let (joined, history) = a.join("r", Some(last_seen)).await;
    assert_eq!(joined["lastSeq"], 51);
    assert_eq!(seqs(&history), (2..=51).collect::<Vec<_>>());
    let texts: Vec<String> = history
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, (0..50).map(|i| format!("m{i}")).collect::<Vec<_>>());

    // Live messages continue right after, with no duplicate.
    b.say("r", "after", None).await;
    let next = a.recv_type("message-received").await;
    assert_eq!(next["seq"], 52);

    // Up to date: nothing to replay.
    let mut c = server.connect().await;
    let (_, history) = c.join("r", Some(52)).await;
    assert!(history.is_empty());
    server.stop().await;
}

/// Sends `join-room` and reads up to the last `message-history` of its catch-up. Returns
/// `room-joined`, the catch-up's `seq`s, and the `seq` of every `message-received` that
/// came meanwhile, appended to `live`.
async fn rejoin(
    client: &mut Client,
    room: &str,
    since: Option<u64>,
    live: &mut Vec<u64>,
) -> (Value, Vec<u64>) {
    let mut frame = json!({ "type": "join-room", "roomId": room });
    if let Some(s) = since {
        frame["since"] = json!(s);
    }
    let id = client.request(frame).await;
    let mut joined = Value::Null;
    let mut history = Vec::new();
    loop {
        let f = client.recv().await;
        match f["type"].as_str() {
            Some("room-joined") if f["replyTo"] == id.as_str() => joined = f,
            Some("message-history") if !joined.is_null() => {
                history.extend(seqs(f["messages"].as_array().unwrap()));
                if f["more"] != true {
                    return (joined, history);
                }
            }
            Some("message-received") => live.push(f["seq"].as_u64().unwrap()),
            Some("error") => panic!("join failed: {f}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_rejoin_replays_only_what_the_connection_was_never_sent() {
    let server = TestServer::start().await;
    let mut writer = server.connect_as("writer").await;
    writer.join("rj", None).await;
    for i in 1..=60 {
        writer.say("rj", &format!("m{i}"), None).await;
    }
    // The seed's way in: `?roomId=` joins at once (the latest 50), then `join-room` again.
    let url = server.ws(&format!("/ws?roomId=rj&token={}", server.token("reader")));
    let mut reader = Client::connect(&url).await;
    let mut live = Vec::new();
    let joined = reader.recv_type("room-joined").await;
    assert_eq!(joined["lastSeq"], 60);
    let first = reader.recv_type("message-history").await;
    assert_eq!(
        seqs(first["messages"].as_array().unwrap()),
        (11..=60).collect::<Vec<_>>()
    );
    let (again, replayed) = rejoin(&mut reader, "rj", None, &mut live).await;
    assert_eq!((again["lastSeq"].as_u64(), replayed), (Some(60), vec![]));
    writer.say("rj", "m61", None).await;
    // Older messages it never got, on request, once; its position stays where it was.
    let (older, replayed) = rejoin(&mut reader, "rj", Some(5), &mut live).await;
    assert_eq!(replayed, (6..=10).collect::<Vec<_>>());
    assert!(older["lastSeq"].as_u64().unwrap() >= 60, "{older}");
    let (_, replayed) = rejoin(&mut reader, "rj", Some(0), &mut live).await;
    assert_eq!(replayed, (1..=5).collect::<Vec<_>>());
    let (_, replayed) = rejoin(&mut reader, "rj", Some(0), &mut live).await;
    assert_eq!(replayed, Vec::<u64>::new());
    // Live messages arrive once each, whatever the rejoins.
    writer.say("rj", "m62", None).await;
    while live.last() != Some(&62) {
        let f = reader.recv().await;
        if f["type"] == "message-received" {
            live.push(f["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(live, [61, 62]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_while_the_room_is_busy_loses_and_repeats_nothing() {
    let server = TestServer::start().await;
    for round in 0..5 {
        let room = format!("busy-{round}");
        let url = server.ws(&format!(
            "/ws?roomId={room}&token={}",
            server.token("reader")
        ));
        let mut reader = Client::connect(&url).await;
        reader
            .send(json!({ "type": "join-room", "roomId": room }))
            .await;
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let url = server.ws(&format!("/ws?token={}", server.token(&format!("w{w}"))));
                let room = room.clone();
                tokio::spawn(async move {
                    let mut c = Client::connect(&url).await;
                    c.join(&room, None).await;
                    for k in 0..50 {
                        c.say(&room, &format!("w{w}-{k}"), None).await;
                    }
                })
            })
            .collect();
        let joined = reader.recv_type("room-joined").await;
        let start = joined["lastSeq"].as_u64().unwrap();
        let mut seen = seqs(
            reader.recv_type("message-history").await["messages"]
                .as_array()
                .unwrap(),
        );
        while seen.last().copied().unwrap_or(start) < 150 {
            let f = reader.recv().await;
            match f["type"].as_str() {
                Some("message-received") => seen.push(f["seq"].as_u64().unwrap()),
                Some("message-history") => seen.extend(seqs(f["messages"].as_array().unwrap())),
                _ => {}
            }
        }
        let first = seen.first().copied().unwrap_or(1);
        assert_eq!(
            seen,
            (first..=150).collect::<Vec<_>>(),
            "round {round}: every message once, in order"
        );
        for w in writers {
            w.await.unwrap();
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn recovery_across_server_restart_reads_sqlite() {
    let server = TestServer::start().await;
    let mut b = server.connect_as("ann").await;
    b.join("persist", None).await;
    for i in 0..50 {
        b.say("persist", &format!("m{i}"), Some(&format!("c{i}")))
            .await;
    }
    drop(b);
    let server = server.restart().await;
    let mut a = server.connect_as("ann").await;
    let (joined, history) = a.join("persist", Some(10)).await;
    assert_eq!(joined["lastSeq"], 50);
    assert_eq!(seqs(&history), (11..=50).collect::<Vec<_>>());
    // The sequence continues after the restart and idempotency keys survive it.
    let ack = a.say("persist", "new", None).await;
    assert_eq!(ack["seq"], 51);
    let dup = a.say("persist", "m0 again", Some("c0")).await;
    assert_eq!(dup["seq"], 1);
    assert_eq!(dup["duplicate"], true);
    server.stop().await;
}

#[tokio::test]
async fn same_client_message_id_is_stored_once_even_after_reconnect() {
    let server = TestServer::start().await;
    let mut a = server.connect_as("ann").await;
    let mut watcher = server.connect_as("watcher").await;
    a.join("idem", None).await;
    watcher.join("idem", None).await;
    let first = a.say("idem", "hello", Some("msg-1")).await;
    let again = a.say("idem", "hello", Some("msg-1")).await;
    assert_eq!(first["id"], again["id"]);
    assert_eq!(first["seq"], again["seq"]);
    assert_eq!(first["duplicate"], false);
    assert_eq!(again["duplicate"], true);
    drop(a);
    let mut a = server.connect_as("ann").await;
    a.join("idem", None).await;
    let third = a.say("idem", "hello", Some("msg-1")).await;
    assert_eq!(third["id"], first["id"]);

    // The watcher saw it once; the next message is seq 2.
    a.say("idem", "next", Some("msg-2")).await;
    let m1 = watcher.recv_type("message-received").await;
    let m2 = watcher.recv_type("message-received").await;
    assert_eq!((m1["seq"].as_u64(), m2["seq"].as_u64()), (Some(1), Some(2)));
    let listed: Value = reqwest::get(server.http("/api/messages?chatRoomId=idem"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["messages"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_back_to_back_are_acknowledged_in_order_and_before_the_next_request() {
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_second = 1000;
        c.limits.messages_burst = 1000;
    })
    .await;
    let mut a = server.connect_as("ann").await;
    let mut watcher = server.connect_as("watcher").await;
    a.join("pipe", None).await;
    watcher.join("pipe", None).await;

    // More messages than a connection keeps in flight (128), sent without waiting for any
    // ack; one empty (refused) and one repeating an earlier clientMessageId in the middle,
    // then a request of another kind.
    const SENT: usize = 140;
    const STORED: u64 = SENT as u64 - 2;
    let mut expected = Vec::new();
    for i in 0..SENT {
        let (text, cmid) = match i {
            20 => ("  ".to_owned(), "c20".to_owned()),
            25 => ("again".to_owned(), "c24".to_owned()),
            _ => (format!("t{i}"), format!("c{i}")),
        };
        a.send(
            json!({ "type": "send-message", "roomId": "pipe", "message": text,
                       "clientMessageId": cmid, "id": format!("m{i}") }),
        )
        .await;
        expected.push(format!("m{i}"));
    }
    a.send(json!({ "type": "history", "roomId": "pipe", "limit": 200, "id": "h" }))
        .await;
    expected.push("h".to_owned());

    // The sender gets each message's ack before the message itself.
    let mut replies = Vec::new();
    let mut acked = std::collections::HashSet::new();
    while replies.last().is_none_or(|f: &Value| f["replyTo"] != "h") {
        let f = a.recv().await;
        if f["type"] == "message-ack" {
            acked.insert(f["seq"].as_u64().unwrap());
        }
        if f["type"] == "message-received" {
            let seq = f["seq"].as_u64().unwrap();
            assert!(acked.contains(&seq), "message {seq} arrived before its ack");
        }
        if f.get("replyTo").is_some_and(|r| !r.is_null()) {
            replies.push(f);
        }
    }
    let order: Vec<&str> = replies
        .iter()
        .map(|f| f["replyTo"].as_str().unwrap())
        .collect();
    assert_eq!(order, expected, "one reply per frame, in the order sent");
    assert_eq!(replies[20]["type"], "error");
    assert_eq!(replies[20]["code"], "empty_message");
    assert_eq!(replies[25]["type"], "message-ack");
    assert_eq!(replies[25]["duplicate"], true);
    assert_eq!(replies[25]["seq"], replies[24]["seq"]);
    let stored: Vec<u64> = replies[..SENT]
        .iter()
        .enumerate()
        .filter(|(i, _)| ![20, 25].contains(i))
        .map(|(_, f)| {
            assert_eq!(f["type"], "message-ack");
            assert_eq!(f["duplicate"], false);
            f["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(
        stored,
        (1..=STORED).collect::<Vec<u64>>(),
        "numbered in the order sent"
    );

    // The request after them sees every one of them.
    let history = replies.last().unwrap();
    assert_eq!(history["type"], "history");
    assert_eq!(history["hasMore"], false);
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    let sent: Vec<String> = (0..SENT)
        .filter(|i| ![20, 25].contains(i))
        .map(|i| format!("t{i}"))
        .collect();
    assert_eq!(texts, sent);

    // Everyone in the room gets them once, in order.
    let mut seen = Vec::new();
    while seen.len() < STORED as usize {
        seen.push(watcher.recv_type("message-received").await);
    }
    assert_eq!(seqs(&seen), (1..=STORED).collect::<Vec<u64>>());
    server.stop().await;
}

#[tokio::test]
async fn presence_typing_read_receipts_and_leave() {
    let server = TestServer::start_with(|c| {
        c.auth.jwt_secret = Some(parlor::config::Secret::new("test-secret-0123456789"));
    })
    .await;
    let token = |user: &str, name: &str| {
        parlor::auth::issue_token(
            server.config.auth.jwt_secret.as_ref().unwrap(),
            user,
            Some(name),
            "visitor",
            "demo",
            600,
        )
        .unwrap()
    };
    let mut a =
        Client::connect(&server.ws(&format!("/ws?token={}", token("alice", "Alice")))).await;
    let mut b = Client::connect(&server.ws(&format!("/ws?token={}", token("bob", "Bob")))).await;
    a.join("p", None).await;
    let (joined, _) = b.join("p", None).await;
    let members: Vec<&str> = joined["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert!(
        members.contains(&"alice") && members.contains(&"bob"),
        "{joined}"
    );

    let presence = a.recv_type("presence").await;
    assert_eq!(presence["event"], "join");
    assert_eq!(presence["user"]["userId"], "bob");
    assert_eq!(presence["user"]["name"], "Bob");

    b.send(json!({ "type": "typing", "roomId": "p", "isTyping": true }))
        .await;
    let typing = a.recv_type("typing").await;
    assert_eq!(
        (typing["userId"].as_str(), typing["isTyping"].as_bool()),
        (Some("bob"), Some(true))
    );

    a.say("p", "one", None).await;
    a.say("p", "two", None).await;
    let id = b
        .request(json!({ "type": "read", "roomId": "p", "seq": 99 }))
        .await;
    let receipt = b.reply(&id).await;
    assert_eq!(receipt["type"], "read-receipt");
    assert_eq!(receipt["seq"], 2, "clamped to the last message");
    let seen = a.recv_type("read-receipt").await;
    assert_eq!(
        (seen["userId"].as_str(), seen["seq"].as_u64()),
        (Some("bob"), Some(2))
    );

    let id = a
        .request(json!({ "type": "presence", "roomId": "p" }))
        .await;
    assert_eq!(a.reply(&id).await["members"].as_array().unwrap().len(), 2);

    // A second tab of Bob does not announce him again; closing one tab keeps him present.
    let mut b2 = Client::connect(&server.ws(&format!("/ws?token={}", token("bob", "Bob")))).await;
    b2.join("p", None).await;
    drop(b2);
    let id = b
        .request(json!({ "type": "leave-room", "roomId": "p" }))
        .await;
    assert_eq!(b.reply(&id).await["type"], "room-left");
    let left = a.recv_type("presence").await;
    assert_eq!(
        (left["event"].as_str(), left["user"]["userId"].as_str()),
        (Some("leave"), Some("bob"))
    );

    // After leaving, sending there is refused.
    let id = b
        .request(json!({ "type": "send-message", "roomId": "p", "message": "x" }))
        .await;
    assert_eq!(b.reply(&id).await["code"], "not_joined");

    // history pages backwards.
    let id = a
        .request(json!({ "type": "history", "roomId": "p", "before": 2, "limit": 10 }))
        .await;
    let page = a.reply(&id).await;
    assert_eq!(seqs(page["messages"].as_array().unwrap()), [1]);
    assert_eq!(page["hasMore"], false);
    server.stop().await;
}

#[tokio::test]
async fn tokens_set_identity_and_bad_tokens_are_refused() {
    let secret = parlor::config::Secret::new("test-secret-0123456789");
    let server = TestServer::start_with(|c| c.auth.jwt_secret = Some(secret.clone())).await;
    let good =
        parlor::auth::issue_token(&secret, "agent-7", Some("Ada"), "agent", "demo", 600).unwrap();
    let mut a = Client::connect(&server.ws(&format!("/ws?token={good}"))).await;
    a.join("t", None).await;
    a.say("t", "hi", None).await;
    let m = a.recv_type("message-received").await;
    assert_eq!(
        (
            m["userId"].as_str(),
            m["userName"].as_str(),
            m["role"].as_str()
        ),
        (Some("agent-7"), Some("Ada"), Some("agent"))
    );

    let wrong_key = parlor::auth::issue_token(
        &parlor::config::Secret::new("another-secret-0123456789"),
        "x",
        None,
        "admin",
        "demo",
        600,
    )
    .unwrap();
    let unknown_domain =
        parlor::auth::issue_token(&secret, "x", None, "visitor", "nope", 600).unwrap();
    for (token, code) in [
        (wrong_key.as_str(), "invalid_token"),
        ("not.a.jwt", "invalid_token"),
        (unknown_domain.as_str(), "unknown_domain"),
    ] {
        assert!(
            Client::try_connect(&server.ws(&format!("/ws?token={token}")))
                .await
                .is_err()
        );
        let r = reqwest::Client::new()
            .get(server.http("/api/messages?chatRoomId=t"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
    }
    // Expired beyond the leeway is refused too (issue with a past exp by hand).
    let past = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "x", "exp": chrono::Utc::now().timestamp() - 3600 }),
        &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .unwrap();
    assert!(
        Client::try_connect(&server.ws(&format!("/ws?token={past}")))
            .await
            .is_err()
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_frames_get_documented_errors_and_change_nothing() {
    let server = TestServer::start().await;
    let mut bystander = server.connect().await;
    bystander.join("bad", None).await;
    let mut c = server.connect().await;
    c.join("bad", None).await;
    c.say("bad", "baseline", None).await;
    bystander.recv_type("message-received").await;

    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "invalid_json"),
        (Message::Text("[1,2,3]".into()), "invalid_frame"),
        (Message::Text(r#"{"id":"x"}"#.into()), "invalid_frame"),
        (Message::Binary(vec![1, 2, 3].into()), "unsupported_frame"),
        (
            Message::Text(r#"{"type":"launch-missiles"}"#.into()),
            "unknown_type",
        ),
        (
            Message::Text(r#"{"type":"send-message","roomId":"bad"}"#.into()),
            "invalid_frame",
        ),
        (
            Message::Text(r#"{"type":"send-message","roomId":"bad","message":42}"#.into()),
            "invalid_frame",
        ),
        (
            Message::Text(r#"{"type":"join-room","roomId":"bad","since":"yesterday"}"#.into()),
            "invalid_frame",
        ),
        (
            Message::Text(r#"{"type":"join-room","roomId":"../etc/passwd"}"#.into()),
            "invalid_room_id",
        ),
        (
            Message::Text(r#"{"type":"join-room","roomId":"bad","role":"admin"}"#.into()),
            "forbidden",
        ),
        (
            Message::Text(
                r#"{"type":"send-message","roomId":"bad","message":"x","role":"admin"}"#.into(),
            ),
            "forbidden",
        ),
        (
            Message::Text(r#"{"type":"send-message","roomId":"bad","message":"   "}"#.into()),
            "empty_message",
        ),
        (
            Message::Text(r#"{"type":"send-message","roomId":"other","message":"x"}"#.into()),
            "not_joined",
        ),
        (
            Message::Text(r#"{"type":"read","roomId":"bad","seq":-1}"#.into()),
            "invalid_frame",
        ),
    ];
    for (frame, code) in cases {
        c.send_raw(frame.clone()).await;
        let err = c.recv_type("error").await;
        assert_eq!(err["code"], code, "for {frame:?}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Profile data is bounded like a message: 100 KB of customerData is refused.
    let id = c
        .request(json!({ "type": "join-room", "roomId": "bad", "customerData": { "blob": "z".repeat(100_000) } }))
        .await;
    assert_eq!(c.reply(&id).await["code"], "invalid_data");

    // A 1 MB message (inside the 1 MiB frame limit) is refused, the connection lives on.
    let big = "x".repeat(1_000_000);
    let id = c
        .request(json!({ "type": "send-message", "roomId": "bad", "message": big }))
        .await;
    let err = c.reply(&id).await;
    assert_eq!(err["code"], "message_too_long");

    // A NUL character (which PostgreSQL cannot store) is refused on every backend.
    let id = c
        .request(json!({ "type": "send-message", "roomId": "bad", "message": "a\u{0}b" }))
        .await;
    assert_eq!(c.reply(&id).await["code"], "invalid_message");

    // Still alive, still able to send; the bystander saw nothing but the good messages.
    let ack = c.say("bad", "still here", None).await;
    assert_eq!(ack["seq"], 2, "no bad frame stored anything");
    assert_eq!(
        bystander.recv_type("message-received").await["message"],
        "still here"
    );

    // A 10 MB frame: frame_too_large, then close 1009. The server stops reading after the
    // frame header, so a raw client writes the frame from one half of the socket while the
    // other half reads the answer. Others carry on.
    drop(c);
    let (error, close_code) = oversized_frame(&server, 10 * 1024 * 1024).await;
    assert_eq!(error["code"], "frame_too_large");
    assert_eq!(close_code, 1009);
    let mut d = server.connect().await;
    d.join("bad", None).await;
    d.say("bad", "after the storm", None).await;
    assert_eq!(bystander.recv_type("message-received").await["seq"], 3);
    server.stop().await;
}

#[tokio::test]
async fn flood_above_the_rate_limit_is_refused() {
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_second = 5;
        c.limits.messages_burst = 5;
    })
    .await;
    let mut c = server.connect().await;
    c.join("flood", None).await; // uses one token
    for i in 0..30 {
        c.send(json!({ "type": "send-message", "roomId": "flood", "message": format!("f{i}"), "id": i })).await;
    }
    let (mut acks, mut limited) = (0, 0);
    for _ in 0..100 {
        let f = c.recv().await;
        match (f["type"].as_str(), f["code"].as_str()) {
            (Some("message-ack"), _) => acks += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => {}
        }
        if acks + limited == 30 {
            break;
        }
    }
    assert!(acks <= 5, "at most the burst got through, got {acks}");
    assert!(limited >= 25);
    let listed: Value = reqwest::get(server.http("/api/messages?chatRoomId=flood"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["messages"].as_array().unwrap().len(), acks);
    server.stop().await;
}

#[tokio::test]
async fn too_many_rooms_is_refused() {
    let server = TestServer::start_with(|c| c.limits.rooms_per_connection = 2).await;
    let mut c = server.connect().await;
    c.join("r1", None).await;
    c.join("r2", None).await;
    let id = c
        .request(json!({ "type": "join-room", "roomId": "r3" }))
        .await;
    assert_eq!(c.reply(&id).await["code"], "too_many_rooms");
    // Rejoining a room already joined is fine.
    c.join("r1", None).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_while_others_keep_up() {
    // A queue small enough that the slow client overflows it long before the 9 MB below
    // are sent, and large enough that a client that reads, even on a loaded CI machine,
    // never does.
    let server = TestServer::start_with(|c| c.limits.outbound_queue = 32).await;
    let mut slow = server.connect().await;
    slow.join("busy", None).await;
    let mut fast = server.connect().await;
    fast.join("busy", None).await;
    let mut sender = server.connect().await;
    sender.join("busy", None).await;

    // The slow client stops reading. Large messages fill the socket buffers quickly.
    let payload = "z".repeat(15_000);
    let total = 600u64;
    let fast_task = tokio::spawn(async move {
        let mut next = 1;
        while next <= total {
            let m = fast.recv_type("message-received").await;
            assert_eq!(m["seq"], next, "fast client sees every message in order");
            next += 1;
        }
        fast
    });
    // As soon as its queue overflows, the slow client reads again: after what was buffered
    // comes the close frame with the documented code.
    let metrics_url = server.http("/metrics");
    let slow_task = tokio::spawn(async move {
        for _ in 0..3000 {
            let text = reqwest::get(&metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if text
                .lines()
                .any(|l| l.starts_with("parlor_fanout_dropped_total") && !l.ends_with(" 0"))
            {
                return slow.closed().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the slow client's queue never overflowed");
    });
    for i in 0..total {
        let id = sender.request(json!({ "type": "send-message", "roomId": "busy", "message": payload, "clientMessageId": format!("s{i}") })).await;
        sender.reply(&id).await;
    }
    tokio::time::timeout(Duration::from_secs(30), fast_task)
        .await
        .expect("fast client keeps up")
        .expect("fast task");
    let close = tokio::time::timeout(Duration::from_secs(30), slow_task)
        .await
        .expect("slow client closed in time")
        .expect("slow task")
        .expect("close frame");
    assert_eq!(u16::from(close.code), parlor::hub::CLOSE_SLOW_CONSUMER);
    assert!(server.metric("parlor_disconnects", "slow_consumer").await >= 1.0);

    // It recovers by rejoining with its last seq.
    let mut back = server.connect().await;
    let (_, history) = back.join("busy", Some(0)).await;
    assert_eq!(history.len() as u64, total);
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_reconnect_and_closes_1012() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    c.join("bye", None).await;
    let shutdown = server.shutdown.clone();
    let started = std::time::Instant::now();
    shutdown.cancel();
    let hint = c.recv_type("reconnect").await;
    assert!(hint["reason"].is_string());
    let close = c.closed().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1012);
    tokio::time::timeout(Duration::from_secs(6), server.handle)
        .await
        .expect("run returns within the bound")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(6));
    // New connections are refused once stopped.
    assert!(
        Client::try_connect(&format!("ws://{}/ws", server.addr))
            .await
            .is_err()
    );
}

/// Opens a raw WebSocket, joins nothing, sends one text frame of `size` bytes and returns the
/// server's `error` frame and close code.
async fn oversized_frame(server: &TestServer, size: usize) -> (Value, u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    wr.write_all(handshake.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(rd.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    let writer = tokio::spawn(async move {
        let mut frame = vec![0x81, 0x80 | 127];
        frame.extend_from_slice(&(size as u64).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]); // mask key
        let _ = wr.write_all(&frame).await;
        let chunk = vec![b'y' ^ 1; 64 * 1024];
        let mut sent = 0;
        while sent < size {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
    });
    let mut error = Value::Null;
    let code = loop {
        let (opcode, payload) = tokio::time::timeout(common::WAIT, read_frame(&mut rd))
            .await
            .expect("frame in time");
        match opcode {
            0x1 => error = serde_json::from_slice(&payload).unwrap(),
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => {}
        }
    };
    writer.abort();
    (error, code)
}

/// Reads one unmasked server frame: (opcode, payload).
async fn read_frame(rd: &mut tokio::net::tcp::OwnedReadHalf) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let b0 = rd.read_u8().await.unwrap();
    let b1 = rd.read_u8().await.unwrap();
    let len = match b1 & 0x7f {
        126 => u64::from(rd.read_u16().await.unwrap()),
        127 => rd.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0; usize::try_from(len).unwrap()];
    rd.read_exact(&mut payload).await.unwrap();
    (b0 & 0x0f, payload)
}

#[tokio::test]
async fn token_edge_cases() {
    let server = TestServer::start().await;
    let secret = parlor::config::Secret::new(common::TEST_SECRET);
    // Identity providers put `aud` in their tokens; it must not make them invalid.
    let with_aud = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "aud-user", "aud": "my-app", "exp": chrono::Utc::now().timestamp() + 600 }),
        &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .unwrap();
    let mut c = Client::connect(&server.ws(&format!("/ws?token={with_aud}"))).await;
    c.join("aud", None).await;
    assert_eq!(c.say("aud", "hi", None).await["type"], "message-ack");
    assert_eq!(c.recv_type("message-received").await["userId"], "aud-user");

    // An empty ?token= does not hide the Authorization header.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            server.ws("/ws?token="),
        )
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", server.token("header-user"))
            .parse()
            .unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut h = Client { ws, next_id: 0 };
    h.join("aud", None).await;
    h.say("aud", "from the header", None).await;
    assert_eq!(
        h.recv_type("message-received").await["userId"],
        "header-user"
    );

    // Plain HTTP on /ws is told to upgrade.
    let r = reqwest::get(server.http("/ws")).await.unwrap();
    assert_eq!(r.status(), 426);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upgrade_required");
    server.stop().await;
}

#[tokio::test]
async fn garbage_frames_count_against_the_rate_limit() {
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_second = 3;
        c.limits.messages_burst = 3;
    })
    .await;
    let mut c = server.connect().await;
    for _ in 0..10 {
        c.send_raw(Message::Text("{garbage".into())).await;
    }
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(
            c.recv_type("error").await["code"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "invalid_json").count(),
        3,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "rate_limited").count(),
        7,
        "{codes:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn read_and_history_need_membership() {
    let server = TestServer::start().await;
    let mut owner = server.connect().await;
    owner.join("private", None).await;
    owner.say("private", "secret", None).await;
    let mut other = server.connect().await;
    for frame in [
        json!({ "type": "history", "roomId": "private" }),
        json!({ "type": "read", "roomId": "private", "seq": 1 }),
    ] {
        let id = other.request(frame).await;
        assert_eq!(other.reply(&id).await["code"], "not_joined");
    }
    server.stop().await;
}

#[tokio::test]
async fn presence_is_limited_to_small_rooms() {
    let server = TestServer::start_with(|c| c.limits.presence_max_members = 2).await;
    let mut a = server.connect_as("a").await;
    let mut b = server.connect_as("b").await;
    let mut c = server.connect_as("c").await;
    a.join("big", None).await;
    b.join("big", None).await;
    assert_eq!(
        a.recv_type("presence").await["user"]["userId"],
        "b",
        "small rooms announce joins"
    );
    let (joined, _) = c.join("big", None).await;
    assert_eq!(joined["memberCount"], 3);
    assert_eq!(
        joined["members"].as_array().unwrap().len(),
        2,
        "the list is cut to the limit"
    );
    // The third join was not announced: the next thing A sees is B's message.
    b.say("big", "hello", None).await;
    let next = a.recv().await;
    assert_eq!(
        next["type"], "message-received",
        "no presence event for c: {next}"
    );
    server.stop().await;
}

#[tokio::test]
async fn room_joined_gives_the_message_limit_in_utf8_bytes() {
    let server = TestServer::start_with(|c| c.limits.max_message_bytes = 100).await;
    let mut a = server.connect_as("a").await;
    let (joined, _) = a.join("limits", None).await;
    assert_eq!(joined["limits"], json!({ "messageBytes": 100 }), "{joined}");
    // The limit counts UTF-8 bytes, as a client counting with it does: 50 × "é" is 100.
    a.say("limits", &"é".repeat(50), None).await;
    let id = a
        .request(json!({ "type": "send-message", "roomId": "limits", "message": format!("{}a", "é".repeat(50)) }))
        .await;
    let refused = a.reply(&id).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("message_too_long")),
        "{refused}"
    );
    server.stop().await;
}

/// A close frame must carry a code a peer may send (RFC 6455 §7.4): reserved and
/// unassigned codes get 1002 (Autobahn 7.9.x), a valid one its normal close.
#[tokio::test]
async fn close_frames_with_invalid_codes_are_protocol_errors() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let server = TestServer::start().await;
    for (code, answer) in [
        (0u16, 1002u16),
        (999, 1002),
        (1004, 1002),
        (1005, 1002),
        (1006, 1002),
        (1015, 1002),
        (2999, 1002),
        (5000, 1002),
        (65535, 1002),
        (1000, 1000),
        (1001, 1000),
        (4000, 1000),
    ] {
        let mut c = server.connect().await;
        let frame = Frame::close(Some(CloseFrame {
            code: code.into(),
            reason: "".into(),
        }));
        c.send_raw(Message::Frame(frame)).await;
        let close = c.closed().await.expect("a close frame");
        assert_eq!(u16::from(close.code), answer, "client close code {code}");
    }
    server.stop().await;
}

/// A client may send its first frame in the same write as the upgrade request: the bytes
/// the HTTP layer read past the request are the start of the WebSocket stream.
#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    )
    .into_bytes();
    let join = br#"{"type":"join-room","id":"j","roomId":"at-once"}"#;
    let mask = [9u8, 8, 7, 6];
    bytes.extend_from_slice(&[0x81, 0x80 | join.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(join.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    wr.write_all(&bytes).await.unwrap();

    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(rd.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let (opcode, payload) = tokio::time::timeout(common::WAIT, read_frame(&mut rd))
        .await
        .expect("an answer in time");
    assert_eq!(opcode, 0x1);
    let joined: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(joined["type"], "room-joined", "{joined}");
    assert_eq!(joined["replyTo"], "j");
}

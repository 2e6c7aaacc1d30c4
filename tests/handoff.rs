//! Hand-off from the bot to human agents, over real sockets and HTTP: every transition of the
//! state machine (stored as a system message with a `seq`, broadcast as `room-status`,
//! `agent-joined`, `agent-left`), the bot offering a human and staying silent while a human
//! has the room, the live inbox, internal notes kept from visitors, the policy (visitors
//! cannot assign; another domain's agent cannot see the room), races between agents, bad
//! input, business hours, and the state surviving a restart.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
#[path = "common/fake_ai.rs"]
mod fake_ai;

use std::time::Duration;

use common::{Client, TEST_SECRET, TestServer};
use fake_ai::{FakeVendor, Reply};
use parlor::config::{BotConfig, Config, DomainConfig, ProviderConfig, ProviderKind, Secret};
use serde_json::{Value, json};

fn token(user: &str, name: &str, role: &str, domain: &str) -> String {
    parlor::auth::issue_token(
        &Secret::new(TEST_SECRET),
        user,
        Some(name),
        role,
        domain,
        600,
    )
    .unwrap()
}

async fn as_user(s: &TestServer, user: &str, name: &str, role: &str, domain: &str) -> Client {
    Client::connect(&s.ws(&format!("/ws?token={}", token(user, name, role, domain)))).await
}

/// The demo bot answering from the shipped knowledge base, plus domains `acme` (visitors
/// own their rooms, with the same bot) and `other`.
async fn server() -> TestServer {
    TestServer::start_with(|c: &mut Config| {
        for d in &mut c.domains {
            if let Some(b) = d.bot.as_mut() {
                b.enabled = true;
            }
            d.handoff.enabled = true;
        }
        let mut acme = DomainConfig::new("acme", "Acme");
        acme.bot = c.domains[0].bot.clone();
        c.domains.push(acme);
        c.domains.push(DomainConfig::new("other", "Other"));
    })
    .await
}

/// Frames until one of type `ty` matching `pred`.
async fn until(client: &mut Client, ty: &str, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let f = client.recv().await;
        if f["type"] == ty && pred(&f) {
            return f;
        }
    }
}

/// The next stored message with `role`.
async fn stored(client: &mut Client, role: &str) -> Value {
    until(client, "message-received", |f| f["role"] == role).await
}

/// Sends a hand-off frame and returns the reply.
async fn ask(client: &mut Client, frame: Value) -> Value {
    let id = client.request(frame).await;
    client.reply(&id).await
}

#[tokio::test]
async fn a_conversation_goes_from_the_bot_to_an_agent_and_back() {
    let s = server().await;
    let room = "support-ann";
    let mut visitor = s.connect_as("ann").await;
    let (joined, _) = visitor.join(room, None).await;
    assert_eq!(joined["status"], "bot", "{joined}");
    assert!(joined["assignee"].is_null());

    // Test 1 of seed 002: the bot answers.
    visitor
        .say(room, "How do I catch up after a reconnect?", None)
        .await;
    let answer = stored(&mut visitor, "assistant").await;
    assert!(answer["data"]["actions"].is_null(), "{answer}");

    // Test 2: asking for a human gets the offer, with the escalate action, not a model answer.
    visitor
        .say(room, "I need to speak with a human", None)
        .await;
    let offer = stored(&mut visitor, "assistant").await;
    assert_eq!(
        offer["data"]["actions"],
        json!([{ "id": "escalate", "label": "Connect with Customer Support" }]),
        "{offer}"
    );

    // The agents' live inbox sees the room.
    let mut alice = as_user(&s, "alice", "Alice", "agent", "demo").await;
    let inbox = ask(&mut alice, json!({ "type": "subscribe-inbox" })).await;
    assert_eq!(inbox["type"], "inbox", "{inbox}");
    let entry = inbox["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["roomId"] == room)
        .cloned()
        .expect("the room is in the inbox");
    assert_eq!(entry["status"], "bot");
    assert_eq!(entry["visitor"]["userId"], "ann");
    assert_eq!(entry["unread"], entry["lastSeq"]);

    // Choosing the action escalates.
    let status = ask(&mut visitor, json!({ "type": "escalate", "roomId": room })).await;
    assert_eq!(status["type"], "room-status", "{status}");
    assert_eq!(status["changed"], true);
    assert_eq!(status["conversation"]["status"], "waiting");
    assert!(status["conversation"]["waitingSince"].is_string());
    let notice = stored(&mut visitor, "system").await;
    assert_eq!(notice["message"], "⏱️ Connecting you to a support agent…");
    assert_eq!(notice["messageType"], "status");
    assert_eq!(notice["seq"], status["seq"]);
    let update = until(&mut alice, "inbox-update", |f| {
        f["conversation"]["status"] == "waiting"
    })
    .await;
    assert_eq!(update["conversation"]["roomId"], room);
    assert_eq!(update["conversation"]["lastSeq"], status["seq"]);
    // A second tab pressing the button changes nothing.
    let again = ask(&mut visitor, json!({ "type": "escalate", "roomId": room })).await;
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(again["conversation"]["status"], "waiting");
    // While waiting, the bot is silent.
    visitor.say(room, "Hello? Anyone?", None).await;

    // Test 3: the agent takes it.
    let (_, history) = alice.join(room, None).await;
    assert!(
        history.iter().any(|m| m["role"] == "assistant"),
        "bot turns in history"
    );
    let taken = ask(&mut alice, json!({ "type": "assign", "roomId": room })).await;
    assert_eq!(taken["conversation"]["status"], "assigned", "{taken}");
    assert_eq!(
        taken["conversation"]["assignee"],
        json!({ "userId": "alice", "name": "Alice" })
    );
    // The event and the stored notice travel apart: either may come first.
    let (mut joined_event, mut connected) = (Value::Null, Value::Null);
    while joined_event.is_null() || connected.is_null() {
        let f = visitor.recv().await;
        match f["type"].as_str() {
            Some("agent-joined") => joined_event = f,
            Some("message-received") if f["role"] == "system" => connected = f,
            _ => {}
        }
    }
    assert_eq!(joined_event["agent"]["name"], "Alice");
    assert_eq!(connected["message"], "✅ You're now connected to Alice");

    // Test 4: they talk; the bot stays silent.
    visitor.say(room, "I have a question", None).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    alice.say(room, "Hi! How can I help you?", None).await;
    loop {
        let f = visitor.recv_type("message-received").await;
        assert_ne!(
            f["role"], "assistant",
            "the bot spoke while a human had the room: {f}"
        );
        if f["role"] == "agent" {
            assert_eq!(f["message"], "Hi! How can I help you?");
            break;
        }
    }
    // The first response is recorded as the agent's message is committed.
    let alice_token = token("alice", "Alice", "agent", "demo");
    let mut c = Value::Null;
    for _ in 0..100 {
        let (code, body) = s
            .get_with(&format!("/api/rooms/{room}/conversation"), &alice_token)
            .await;
        assert_eq!(code, 200, "{body}");
        c = body;
        if c["firstResponseAt"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c["firstResponseAt"].is_string(), "{c}");
    assert!(c["firstResponseSecs"].as_i64().unwrap() >= 0);

    // Transfer, unassign, resolve.
    let moved = ask(
        &mut alice,
        json!({ "type": "transfer", "roomId": room, "agentId": "bob", "agentName": "Bob" }),
    )
    .await;
    assert_eq!(
        moved["conversation"]["assignee"]["userId"], "bob",
        "{moved}"
    );
    let left = until(&mut visitor, "agent-left", |_| true).await;
    assert_eq!(
        (left["agent"]["userId"].as_str(), left["reason"].as_str()),
        (Some("alice"), Some("transferred"))
    );
    let joined_event = until(&mut visitor, "agent-joined", |_| true).await;
    assert_eq!(joined_event["agent"]["name"], "Bob");
    let back = ask(&mut alice, json!({ "type": "unassign", "roomId": room })).await;
    assert_eq!(back["conversation"]["status"], "waiting", "{back}");
    assert!(back["conversation"]["assignee"].is_null());
    assert_eq!(
        back["conversation"]["waitingSince"],
        status["conversation"]["waitingSince"]
    );
    let done = ask(&mut alice, json!({ "type": "resolve", "roomId": room })).await;
    assert_eq!(done["conversation"]["status"], "resolved", "{done}");
    assert!(done["conversation"]["resolvedAt"].is_string());
    let resolved = until(&mut visitor, "message-received", |f| {
        f["data"]["action"] == "resolve"
    })
    .await;
    assert_eq!(
        resolved["message"],
        "This conversation was resolved by Alice."
    );
    // Nothing more to do to a resolved room.
    let nope = ask(&mut alice, json!({ "type": "resolve", "roomId": room })).await;
    assert_eq!(nope["code"], "invalid_transition", "{nope}");

    // A new visitor message reopens it with the bot, which answers again.
    visitor
        .say(room, "One more thing: what is Parlor?", None)
        .await;
    let reopened = until(&mut visitor, "room-status", |f| {
        f["conversation"]["status"] != "resolved"
    })
    .await;
    assert_eq!(reopened["conversation"]["status"], "bot", "{reopened}");
    stored(&mut visitor, "assistant").await;

    // Every transition is in the room's stream, gap-free.
    let all = visitor.stored(room).await;
    let seqs: Vec<u64> = all.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let actions: Vec<&str> = all
        .iter()
        .filter(|m| m["messageType"] == "status")
        .map(|m| m["data"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "escalate", "assign", "transfer", "unassign", "resolve", "reopen"
        ]
    );
}

#[tokio::test]
async fn visitors_cannot_run_the_inbox_and_other_domains_cannot_see_the_room() {
    let s = server().await;
    // In `acme` visitors own their rooms.
    let mut ann = as_user(&s, "ann", "Ann", "visitor", "acme").await;
    ann.join("support-ann", None).await;
    ann.say("support-ann", "Hello", None).await;
    for frame in [
        json!({ "type": "assign", "roomId": "support-ann" }),
        json!({ "type": "assign", "roomId": "support-ann", "agentId": "ann" }),
        json!({ "type": "unassign", "roomId": "support-ann" }),
        json!({ "type": "transfer", "roomId": "support-ann", "agentId": "x" }),
        json!({ "type": "resolve", "roomId": "support-ann" }),
        json!({ "type": "note", "roomId": "support-ann", "text": "hi" }),
        json!({ "type": "subscribe-inbox" }),
    ] {
        let reply = ask(&mut ann, frame.clone()).await;
        assert_eq!(reply["code"], "forbidden", "{frame} → {reply}");
    }
    let visitor_token = token("ann", "Ann", "visitor", "acme");
    for (path, body) in [
        ("/api/rooms/support-ann/assign", json!({})),
        ("/api/rooms/support-ann/resolve", json!({})),
        ("/api/rooms/support-ann/notes", json!({ "text": "x" })),
    ] {
        let (code, b) = s.post_with(path, &visitor_token, &body).await;
        assert_eq!(
            (code, b["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
    }
    let (code, _) = s.get_with("/api/inbox", &visitor_token).await;
    assert_eq!(code, 403);

    // Another visitor of the domain may not escalate Ann's room.
    let mut eve = as_user(&s, "eve", "Eve", "visitor", "acme").await;
    let reply = ask(
        &mut eve,
        json!({ "type": "escalate", "roomId": "support-ann" }),
    )
    .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    // Ann may.
    let reply = ask(
        &mut ann,
        json!({ "type": "escalate", "roomId": "support-ann" }),
    )
    .await;
    assert_eq!(reply["conversation"]["status"], "waiting", "{reply}");

    // An agent of another domain sees nothing of it and cannot take it.
    let outsider = token("mallory", "Mallory", "agent", "other");
    let (code, list) = s.get_with("/api/inbox?status=all", &outsider).await;
    assert_eq!(code, 200);
    assert_eq!(list["conversations"], json!([]), "{list}");
    let (code, b) = s
        .post_with("/api/rooms/support-ann/assign", &outsider, &json!({}))
        .await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (404, Some("room_not_found"))
    );
    let (code, _) = s.get_with("/api/rooms/support-ann/notes", &outsider).await;
    assert_eq!(
        code, 404,
        "not found: the room key is the caller's domain's"
    );
    let (code, _) = s
        .get_with("/api/rooms/support-ann/conversation", &outsider)
        .await;
    assert_eq!(code, 404);

    // The domain's own agent can.
    let agent = token("alice", "Alice", "agent", "acme");
    let (code, list) = s.get_with("/api/inbox?status=waiting", &agent).await;
    assert_eq!(code, 200);
    assert_eq!(list["conversations"][0]["roomId"], "support-ann", "{list}");
    let (code, b) = s
        .post_with("/api/rooms/support-ann/assign", &agent, &json!({}))
        .await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["conversation"]["assignee"]["name"], "Alice");
}

#[tokio::test]
async fn two_agents_racing_for_a_room_get_one_winner() {
    let s = server().await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("race", None).await;
    visitor.say("race", "hi", None).await;
    let a = token("alice", "Alice", "agent", "demo");
    let b = token("bob", "Bob", "agent", "demo");
    let (code, _) = s
        .post_with("/api/rooms/race/escalate", &a, &json!({}))
        .await;
    assert_eq!(code, 200);
    let empty = json!({});
    let (ra, rb) = tokio::join!(
        s.post_with("/api/rooms/race/assign", &a, &empty),
        s.post_with("/api/rooms/race/assign", &b, &empty)
    );
    let mut codes = [ra.0, rb.0];
    codes.sort_unstable();
    assert_eq!(codes, [200, 409], "{ra:?} {rb:?}");
    let loser = if ra.0 == 409 { &ra.1 } else { &rb.1 };
    assert_eq!(loser["error"]["code"], "invalid_transition");
    let winner = if ra.0 == 200 { "Alice" } else { "Bob" };
    assert!(
        loser["error"]["message"].as_str().unwrap().contains(winner),
        "the refusal names who has it: {loser}"
    );
    // Exactly one assignment was stored.
    let history = visitor.stored("race").await;
    let assigns = history
        .iter()
        .filter(|m| m["data"]["action"] == "assign")
        .count();
    assert_eq!(assigns, 1);
    assert_eq!(
        s.metric("parlor_handoff_transitions_total", "action=\"assign\"")
            .await,
        1.0
    );
    // The winner assigning again is not an error.
    let winner_token = if ra.0 == 200 { &a } else { &b };
    let (code, again) = s
        .post_with("/api/rooms/race/assign", winner_token, &json!({}))
        .await;
    assert_eq!(
        (code, again["changed"].as_bool()),
        (200, Some(false)),
        "{again}"
    );
}

#[tokio::test]
async fn notes_reach_agents_only_and_leave_no_hole_in_the_stream() {
    let s = server().await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("n1", None).await;
    visitor
        .say("n1", "How do I catch up after a reconnect?", None)
        .await;
    stored(&mut visitor, "assistant").await;
    let mut alice = as_user(&s, "alice", "Alice", "agent", "demo").await;
    ask(&mut alice, json!({ "type": "subscribe-inbox" })).await;
    let mut bob = as_user(&s, "bob", "Bob", "agent", "demo").await;
    ask(&mut bob, json!({ "type": "subscribe-inbox" })).await;
    alice.join("n1", None).await;
    let reply = ask(
        &mut alice,
        json!({ "type": "note", "roomId": "n1", "text": "VIP customer, be quick" }),
    )
    .await;
    assert_eq!(reply["type"], "note-added", "{reply}");
    let seen = until(&mut bob, "note-added", |_| true).await;
    assert_eq!(seen["note"]["text"], "VIP customer, be quick");
    assert_eq!(seen["note"]["author"]["name"], "Alice");
    let (code, list) = s
        .get_with("/api/rooms/n1/notes", &token("bob", "Bob", "agent", "demo"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(list["notes"][0]["text"], "VIP customer, be quick");
    // The visitor gets the next real message, with the next seq, and never the note.
    visitor.say("n1", "Still there?", None).await;
    loop {
        let f = visitor.recv().await;
        assert_ne!(f["type"], "note-added", "a note reached the visitor");
        assert!(
            !f.to_string().contains("VIP"),
            "a note reached the visitor: {f}"
        );
        if f["type"] == "message-received" && f["message"] == "Still there?" {
            break;
        }
    }
    let history = visitor.stored("n1").await;
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // Bad notes.
    for (frame, code) in [
        (
            json!({ "type": "note", "roomId": "n1", "text": "  " }),
            "empty_message",
        ),
        (
            json!({ "type": "note", "roomId": "n1", "text": "x".repeat(20_000) }),
            "message_too_long",
        ),
        (
            json!({ "type": "note", "roomId": "nowhere", "text": "x" }),
            "room_not_found",
        ),
        (json!({ "type": "note", "roomId": "n1" }), "invalid_frame"),
    ] {
        let reply = ask(&mut alice, frame).await;
        assert_eq!(reply["code"], code, "{reply}");
    }
    // A room that does not exist has no notes to list either.
    let (status, body) = s
        .get_with(
            "/api/rooms/nowhere/notes",
            &token("bob", "Bob", "agent", "demo"),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("room_not_found")),
        "{body}"
    );
}

#[tokio::test]
async fn bad_hand_off_requests_get_clear_errors_and_change_nothing() {
    let s = server().await;
    let agent = token("alice", "Alice", "agent", "demo");
    let mut alice = as_user(&s, "alice", "Alice", "agent", "demo").await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("b1", None).await;
    visitor.say("b1", "hi", None).await;
    for (frame, code) in [
        (
            json!({ "type": "assign", "roomId": "b1", "agentId": "no spaces" }),
            "invalid_agent",
        ),
        (
            json!({ "type": "transfer", "roomId": "b1" }),
            "invalid_frame",
        ),
        (
            json!({ "type": "transfer", "roomId": "b1", "agentId": "bob" }),
            "invalid_transition",
        ),
        (
            json!({ "type": "unassign", "roomId": "b1" }),
            "invalid_transition",
        ),
        (
            json!({ "type": "assign", "roomId": "ai:conv" }),
            "no_handoff",
        ),
        (
            json!({ "type": "assign", "roomId": "missing-room" }),
            "room_not_found",
        ),
        (
            json!({ "type": "assign", "roomId": "bad room" }),
            "invalid_room_id",
        ),
        (json!({ "type": "assign" }), "not_joined"),
        (json!({ "type": "assign", "roomId": 5 }), "invalid_frame"),
        (
            json!({ "type": "subscribe-inbox", "status": "sleeping" }),
            "invalid_status",
        ),
    ] {
        let reply = ask(&mut alice, frame.clone()).await;
        assert_eq!(reply["code"], code, "{frame} → {reply}");
    }
    let reply = ask(
        &mut visitor,
        json!({ "type": "escalate", "roomId": "b1", "reason": "x".repeat(2000) }),
    )
    .await;
    assert_eq!(reply["code"], "invalid_reason");
    for (path, body, code) in [
        ("/api/rooms/b1/assign", "{not json", "invalid_json"),
        ("/api/rooms/b1/assign", r#"{"agentId": 7}"#, "invalid_body"),
        ("/api/rooms/b1/assign", r#"{"agent": "x"}"#, "invalid_body"),
        ("/api/rooms/b1/transfer", "{}", "invalid_body"),
        ("/api/rooms/b1/resolve", r#"{"now": true}"#, "invalid_body"),
    ] {
        let res = reqwest::Client::new()
            .post(s.http(path))
            .bearer_auth(&agent)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, b) = common::status_and_body(res).await;
        assert_eq!(
            (status, b["error"]["code"].as_str()),
            (400, Some(code)),
            "{path} {body}"
        );
    }
    let (code, b) = s.get_with("/api/inbox?status=nope", &agent).await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (400, Some("invalid_status"))
    );
    // Nothing changed: the room is still the bot's, with only the visitor's message.
    let (code, c) = s.get_with("/api/rooms/b1/conversation", &agent).await;
    assert_eq!((code, c["status"].as_str()), (200, Some("bot")), "{c}");
    let history = visitor.stored("b1").await;
    assert!(
        history.iter().all(|m| m["messageType"] != "status"),
        "{history:?}"
    );
}

#[tokio::test]
async fn the_state_survives_a_restart() {
    let s = server().await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("keep", None).await;
    visitor.say("keep", "hello", None).await;
    let agent = token("alice", "Alice", "agent", "demo");
    s.post_with("/api/rooms/keep/escalate", &agent, &json!({}))
        .await;
    let (code, _) = s
        .post_with("/api/rooms/keep/assign", &agent, &json!({}))
        .await;
    assert_eq!(code, 200);
    drop(visitor);
    let s = s.restart().await;
    let mut visitor = s.connect_as("ann").await;
    let (joined, _) = visitor.join("keep", None).await;
    assert_eq!(joined["status"], "assigned", "{joined}");
    assert_eq!(joined["assignee"]["name"], "Alice");
    let (_, list) = s.get_with("/api/inbox?status=assigned", &agent).await;
    assert_eq!(list["conversations"][0]["roomId"], "keep", "{list}");
    assert_eq!(list["conversations"][0]["assignee"]["userId"], "alice");
    // And the bot stays silent after the restart too.
    let asked = visitor.say("keep", "are you there?", None).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = asked["seq"].as_u64().unwrap() - 1;
    let (_, list) = s
        .get_with(&format!("/api/rooms/keep/messages?after={after}"), &agent)
        .await;
    let roles: Vec<&str> = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["visitor"],
        "the bot answered while Alice had the room"
    );
}

#[tokio::test]
async fn outside_business_hours_the_room_still_waits_with_the_away_text() {
    use chrono::Datelike;
    // A day that is not today (in UTC), so the rule is closed now.
    let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let today = chrono::Utc::now().weekday().num_days_from_monday() as usize;
    let other = days[(today + 3) % 7];
    let s = TestServer::start_with(move |c: &mut Config| {
        c.domains[0].handoff.enabled = true;
        c.domains[0].handoff.business_hours = vec![format!("{other} 09:00-17:00")];
        c.domains[0].handoff.out_of_hours_text = "We're closed; we'll reply tomorrow.".into();
    })
    .await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("late", None).await;
    let reply = ask(
        &mut visitor,
        json!({ "type": "escalate", "roomId": "late" }),
    )
    .await;
    assert_eq!(reply["conversation"]["status"], "waiting", "{reply}");
    let notice = stored(&mut visitor, "system").await;
    assert_eq!(notice["message"], "We're closed; we'll reply tomorrow.");
}

#[tokio::test]
async fn bad_business_hours_stop_the_start_with_the_reason() {
    let mut c = Config::default();
    c.domains[0].handoff.business_hours = vec!["weekdays 9-5".into()];
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("domains.demo.handoff") && e.contains("weekdays 9-5"),
        "{e}"
    );
    let mut c = Config::default();
    c.domains[0].handoff.timezone = "Atlantis/Capital".into();
    assert!(c.validate().unwrap_err().to_string().contains("time zone"));
}

/// A server whose demo bot streams from the fake vendor.
async fn vendor_server(fake: &FakeVendor) -> TestServer {
    let base = fake.url("/v1");
    TestServer::start_with(move |c: &mut Config| {
        let mut p = ProviderConfig::new(ProviderKind::Openai, "gpt-4o-mini");
        p.base_url = Some(base);
        p.retries = 0;
        c.ai.providers.insert("fake".into(), p);
        c.domains[0].bot = Some(BotConfig {
            providers: vec!["fake".into()],
            ..BotConfig::default()
        });
        c.domains[0].handoff.enabled = true;
    })
    .await
}

#[tokio::test]
async fn the_model_can_ask_for_a_human_with_the_marker() {
    let fake = FakeVendor::start(vec![Reply::stream(fake_ai::openai_stream(
        &[
            "I can't see orders. ",
            "Let me get you someone. [hand",
            "off]",
        ],
        (10, 5),
        true,
    ))])
    .await;
    let s = vendor_server(&fake).await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("m1", None).await;
    visitor.say("m1", "Where is order 1234?", None).await;
    let mut streamed = String::new();
    let reply = loop {
        let f = visitor.recv().await;
        if f["type"] == "message-delta" {
            streamed.push_str(f["delta"].as_str().unwrap());
        }
        if f["type"] == "message-received" && f["role"] == "assistant" {
            break f;
        }
    };
    assert!(
        !streamed.contains("[hand"),
        "the marker was streamed: {streamed}"
    );
    assert_eq!(
        reply["message"],
        "I can't see orders. Let me get you someone."
    );
    assert_eq!(reply["data"]["actions"][0]["id"], "escalate", "{reply}");
    // The model was told about the marker.
    let sent = fake.received()[0].body.to_string();
    assert!(sent.contains("[handoff]"), "{sent}");
}

#[tokio::test]
async fn assigning_stops_the_bot_mid_reply() {
    let slow: Vec<(Duration, String)> =
        fake_ai::openai_stream(&["Let ", "me ", "look ", "into ", "it."], (1, 5), true)
            .into_iter()
            .map(|p| (Duration::from_millis(300), p))
            .collect();
    let fake = FakeVendor::start(vec![Reply::Stream {
        pieces: slow,
        cut: false,
    }])
    .await;
    let s = vendor_server(&fake).await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("stop", None).await;
    visitor.say("stop", "My invoice is wrong", None).await;
    until(&mut visitor, "message-delta", |_| true).await;
    let agent = token("alice", "Alice", "agent", "demo");
    let (code, b) = s
        .post_with("/api/rooms/stop/assign", &agent, &json!({}))
        .await;
    assert_eq!(code, 200, "{b}");
    assert!(fake.wait_hung_up(1).await, "the bot kept generating");
    let stopped = stored(&mut visitor, "assistant").await;
    assert_eq!(stopped["data"]["interrupted"], true, "{stopped}");
}

#[tokio::test]
async fn the_pages_and_the_development_login() {
    let s = server().await;
    let client = reqwest::Client::new();
    let res = client.get(s.http("/widget.js")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let res = client.get(s.http("/inbox")).send().await.unwrap();
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = client
        .get(s.http("/"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert!(
        html.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(html.text().await.unwrap().contains("widget.js"));
    // Not a browser: the seeds' JSON status.
    let (code, status) =
        common::status_and_body(client.get(s.http("/")).send().await.unwrap()).await;
    assert_eq!((code, status["status"].as_str()), (200, Some("healthy")));

    let (code, login) = common::status_and_body(
        client
            .post(s.http("/api/dev/agent-token"))
            .json(&json!({ "name": "Alice Smith" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200, "{login}");
    assert_eq!(
        (login["role"].as_str(), login["userId"].as_str()),
        (Some("agent"), Some("agent-alice-smith"))
    );
    let mut agent =
        Client::connect(&s.ws(&format!("/ws?token={}", login["token"].as_str().unwrap()))).await;
    let inbox = ask(&mut agent, json!({ "type": "subscribe-inbox" })).await;
    assert_eq!(inbox["type"], "inbox", "{inbox}");
    assert_eq!(inbox["agents"][0]["name"], "Alice Smith");
    let (code, agents) = s
        .get_with("/api/agents", login["token"].as_str().unwrap())
        .await;
    assert_eq!(
        (code, agents["agents"][0]["userId"].as_str()),
        (200, Some("agent-alice-smith"))
    );
    let (code, _) = common::status_and_body(
        client
            .post(s.http("/api/dev/agent-token"))
            .json(&json!({ "name": " " }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 400);

    // Only from the server's own machine: a client a trusted proxy forwards from elsewhere
    // is refused.
    let proxied = TestServer::start_with(|c| c.trusted_proxies = vec!["127.0.0.0/8".into()]).await;
    for (from, want) in [("203.0.113.7", 403), ("::1", 200), ("127.0.0.5", 200)] {
        let (code, b) = common::status_and_body(
            client
                .post(proxied.http("/api/dev/agent-token"))
                .header("X-Forwarded-For", from)
                .json(&json!({ "name": "Mallory" }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(code, want, "{from}: {b}");
        if want == 403 {
            assert_eq!(b["error"]["code"], "dev_login_local_only");
        }
    }

    let off = TestServer::start_with(|c| c.web.dev_login = false).await;
    let (code, b) = common::status_and_body(
        client
            .post(off.http("/api/dev/agent-token"))
            .json(&json!({ "name": "Alice" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (404, Some("dev_login_disabled"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_before_the_resolve_does_not_reopen_the_room() {
    let s = server().await;
    let agent = token("alice", "Alice", "agent", "demo");
    let mut alice = as_user(&s, "alice", "Alice", "agent", "demo").await;
    for round in 0..3 {
        let room = format!("late-{round}");
        let mut ann = s.connect_as(&format!("ann-{round}")).await;
        ann.join(&room, None).await;
        ask(&mut ann, json!({ "type": "escalate", "roomId": room })).await;
        ask(&mut alice, json!({ "type": "assign", "roomId": room })).await;
        // Keep the commit observer busy, so it sees the visitor's last message only after
        // the resolve has been stored.
        let mut busy = Vec::new();
        for i in 0..30 {
            let mut v = s.connect_as(&format!("busy-{round}-{i}")).await;
            let r = format!("busy-{round}-{i}");
            v.join(&r, None).await;
            busy.push((v, r));
        }
        for (v, r) in &mut busy {
            v.send(
                json!({ "type": "send-message", "roomId": r, "message": "I need a human please" }),
            )
            .await;
        }
        let said = ann.say(&room, "thanks, bye", None).await;
        let done = ask(&mut alice, json!({ "type": "resolve", "roomId": room })).await;
        assert!(done["seq"].as_u64() > said["seq"].as_u64(), "{done}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (_, c) = s
            .get_with(&format!("/api/rooms/{room}/conversation"), &agent)
            .await;
        assert_eq!(c["status"], "resolved", "round {round}: {c}");
    }
}

#[tokio::test]
async fn a_domain_without_hand_off_refuses_escalation() {
    let s = TestServer::start_with(|c: &mut Config| {
        c.domains[0].handoff.enabled = false;
    })
    .await;
    let mut visitor = s.connect_as("ann").await;
    visitor.join("solo", None).await;
    let reply = ask(
        &mut visitor,
        json!({ "type": "escalate", "roomId": "solo" }),
    )
    .await;
    assert_eq!(reply["code"], "handoff_disabled", "{reply}");
    let agent = token("alice", "Alice", "agent", "demo");
    let (code, b) = s
        .post_with("/api/rooms/solo/escalate", &agent, &json!({}))
        .await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (409, Some("handoff_disabled"))
    );
    let (_, c) = s.get_with("/api/rooms/solo/conversation", &agent).await;
    assert_eq!(c["status"], "bot", "{c}");
}

#[tokio::test]
async fn an_agent_replying_to_a_waiting_conversation_takes_it() {
    let s = server().await;
    let room = "support-reply";
    let mut visitor = s.connect_as("rita").await;
    visitor.join(room, None).await;
    let status = ask(&mut visitor, json!({ "type": "escalate", "roomId": room })).await;
    assert_eq!(status["conversation"]["status"], "waiting", "{status}");

    // Bob answers over the socket without pressing "Assign to me".
    let mut bob = as_user(&s, "bob", "Bob", "agent", "demo").await;
    bob.join(room, None).await;
    bob.say(room, "Hi Rita, I'm on it.", None).await;
    // The visitor learns who joined (agent-joined, and the stored notice before the answer).
    let (mut joined, mut notice) = (Value::Null, Value::Null);
    while joined.is_null() || notice.is_null() {
        let f = visitor.recv().await;
        if f["type"] == "agent-joined" {
            joined = f;
        } else if f["type"] == "message-received"
            && f["messageType"] == "status"
            && f["data"]["action"] == "assign"
        {
            notice = f;
        }
    }
    assert_eq!(joined["agent"]["name"], "Bob", "{joined}");
    assert_eq!(
        notice["message"], "✅ You're now connected to Bob",
        "{notice}"
    );
    let reply = stored(&mut visitor, "agent").await;
    assert_eq!(reply["message"], "Hi Rita, I'm on it.");
    assert!(
        reply["seq"].as_u64() > notice["seq"].as_u64(),
        "{notice} {reply}"
    );
    let (_, c) = s
        .get_with(
            &format!("/api/rooms/{room}/conversation"),
            &token("bob", "Bob", "agent", "demo"),
        )
        .await;
    assert_eq!(
        (c["status"].as_str(), c["assignee"]["userId"].as_str()),
        (Some("assigned"), Some("bob")),
        "{c}"
    );

    // Once it is Bob's, Alice writing over HTTP does not take it from him.
    let alice = token("alice", "Alice", "agent", "demo");
    let (code, _) = s
        .post_with(
            "/api/messages",
            &alice,
            &json!({ "message": "Bob has it", "chatRoomId": room }),
        )
        .await;
    assert_eq!(code, 201);
    let (_, c) = s
        .get_with(&format!("/api/rooms/{room}/conversation"), &alice)
        .await;
    assert_eq!(c["assignee"]["userId"], "bob", "{c}");

    // A room still with the bot is not taken by an agent's message, nor is one a visitor
    // writes in.
    let other = "support-bot-only";
    let mut v2 = s.connect_as("sam").await;
    v2.join(other, None).await;
    let (code, _) = s
        .post_with(
            "/api/messages",
            &alice,
            &json!({ "message": "Just looking", "chatRoomId": other }),
        )
        .await;
    assert_eq!(code, 201);
    let (_, c) = s
        .get_with(&format!("/api/rooms/{other}/conversation"), &alice)
        .await;
    assert_eq!(c["status"], "bot", "{c}");
}

#[tokio::test]
async fn a_domain_without_an_assistant_queues_its_visitors_for_a_person() {
    let s = TestServer::start_with(|c: &mut Config| {
        let mut people = DomainConfig::new("people", "People only");
        people.visitor_rooms = parlor::config::VisitorRooms::Open;
        c.domains.push(people);
        let mut nobody = DomainConfig::new("nobody", "Nobody");
        nobody.handoff.enabled = false;
        c.domains.push(nobody);
    })
    .await;
    let mut visitor = as_user(&s, "vic", "Vic", "visitor", "people").await;
    let (joined, _) = visitor.join("support-vic", None).await;
    assert_eq!(
        joined["service"],
        json!({ "assistant": false, "people": true, "open": true }),
        "{joined}"
    );
    let mut agent = as_user(&s, "ann", "Ann", "agent", "people").await;
    let inbox = ask(&mut agent, json!({ "type": "subscribe-inbox" })).await;
    assert_eq!(inbox["type"], "inbox");

    // The first message puts the conversation in the queue at once, with the notice.
    visitor
        .say("support-vic", "Hello, is anyone there?", None)
        .await;
    let (mut status, mut notice) = (Value::Null, Value::Null);
    while status.is_null() || notice.is_null() {
        let f = visitor.recv().await;
        if f["type"] == "room-status" {
            status = f;
        } else if f["type"] == "message-received" && f["role"] == "system" {
            notice = f;
        }
    }
    assert_eq!(status["conversation"]["status"], "waiting", "{status}");
    assert_eq!(
        notice["message"],
        "⏱\u{fe0f} Connecting you to a support agent…"
    );
    let update = until(&mut agent, "inbox-update", |f| {
        f["conversation"]["status"] == "waiting"
    })
    .await;
    assert_eq!(update["conversation"]["roomId"], "support-vic", "{update}");
    // Writing again changes nothing; nor does a visitor writing in someone else's room.
    visitor.say("support-vic", "Still here", None).await;
    let mut guest = as_user(&s, "gus", "Gus", "visitor", "people").await;
    guest.join("support-vic", None).await;
    guest.say("support-vic", "Me too", None).await;
    let (_, c) = s
        .get_with(
            "/api/rooms/support-vic/conversation",
            &token("ann", "Ann", "agent", "people"),
        )
        .await;
    assert_eq!(c["status"], "waiting", "{c}");
    let all = visitor.stored("support-vic").await;
    let statuses = all.iter().filter(|m| m["messageType"] == "status").count();
    assert_eq!(statuses, 1, "{all:?}");

    // With neither an assistant nor hand-off nobody answers: every such message is counted
    // (and the room logged once).
    let mut lonely = as_user(&s, "lou", "Lou", "visitor", "nobody").await;
    let (joined, _) = lonely.join("support-lou", None).await;
    assert_eq!(
        joined["service"],
        json!({ "assistant": false, "people": false, "open": true })
    );
    for (said, text) in [(1.0, "Hello?"), (2.0, "Anyone?")] {
        lonely.say("support-lou", text, None).await;
        let mut counted = 0.0;
        for _ in 0..100 {
            counted = s
                .metric("parlor_unanswered_total", "no_assistant_no_handoff")
                .await;
            if counted >= said {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(counted, said);
    }
}

#[tokio::test]
async fn a_domain_without_a_bot_section_answers_from_its_uploaded_documents() {
    let (admin, entry) = parlor::auth::keys::generate_with(parlor::auth::keys::ADMIN_KEY_PREFIX);
    let s = TestServer::start_with(move |c: &mut Config| {
        c.auth.admin_keys = vec![entry];
        c.domains.push(DomainConfig::new("shop", "Shop"));
        let mut off = DomainConfig::new("quiet", "Quiet");
        off.bot = Some(BotConfig {
            enabled: false,
            ..BotConfig::default()
        });
        c.domains.push(off);
    })
    .await;
    let upload = |domain: &'static str| {
        let (s, admin) = (&s, admin.clone());
        async move {
            let res = reqwest::Client::new()
                .put(s.http(&format!("/api/admin/domains/{domain}/knowledge/returns.md")))
                .bearer_auth(admin)
                .body("# Returns\n\nSend the item back within 30 days for a full refund.")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
        }
    };
    let mut visitor = as_user(&s, "vic", "Vic", "visitor", "shop").await;
    let (joined, _) = visitor.join("support-vic", None).await;
    assert_eq!(joined["service"]["assistant"], false, "{joined}");

    // Documents uploaded: the built-in assistant answers from them, with the source.
    upload("shop").await;
    upload("quiet").await;
    let mut visitor = as_user(&s, "val", "Val", "visitor", "shop").await;
    let (joined, _) = visitor.join("support-val", None).await;
    assert_eq!(joined["service"]["assistant"], true, "{joined}");
    visitor
        .say("support-val", "Can I return an item for a refund?", None)
        .await;
    let answer = loop {
        let f = visitor.recv().await;
        if f["type"] == "message-received" && f["role"] == "assistant" {
            break f;
        }
    };
    assert_eq!(
        answer["message"], "Send the item back within 30 days for a full refund.",
        "{answer}"
    );
    assert_eq!(answer["data"]["sources"][0]["document"], "returns.md");

    // A domain whose bot section turns the assistant off stays without one.
    let mut quiet = as_user(&s, "qui", "Qui", "visitor", "quiet").await;
    let (joined, _) = quiet.join("support-qui", None).await;
    assert_eq!(joined["service"]["assistant"], false, "{joined}");
}

#[tokio::test]
async fn agents_see_where_a_visitor_is_and_find_conversations_by_their_words() {
    let s = TestServer::start_with(|c: &mut Config| {
        c.domains.push(DomainConfig::new("shop", "Shop"));
    })
    .await;
    let url = s.ws(&format!(
        "/ws?token={}",
        token("vic", "Vic", "visitor", "shop")
    ));
    let request = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut r = url.into_client_request().unwrap();
        r.headers_mut().insert(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"
                .parse()
                .unwrap(),
        );
        r
    };
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut visitor = Client { ws, next_id: 0 };
    let long_title = "t".repeat(600);
    let id = visitor
        .request(json!({
            "type": "join-room",
            "roomId": "support-vic",
            "context": {
                "page": "https://shop.example/pricing",
                "title": long_title,
                "language": "de-DE",
                "timeZone": "Europe/Berlin",
                "secret": "dropped",
                "browser": "what the client claims is not kept",
            },
        }))
        .await;
    assert_eq!(visitor.reply(&id).await["type"], "room-joined");
    visitor
        .say("support-vic", "Where is parcel 4711?", None)
        .await;
    let mut other = as_user(&s, "max", "Max", "visitor", "shop").await;
    other.join("support-max", None).await;
    other.say("support-max", "Hello", None).await;

    let agent = token("ann", "Ann", "agent", "shop");
    let (status, body) = s.get_with("/api/rooms/support-vic/visitor", &agent).await;
    assert_eq!(status, 200, "{body}");
    let v = &body["visitor"];
    assert_eq!(v["userId"], "vic");
    assert_eq!(v["context"]["page"], "https://shop.example/pricing");
    assert_eq!(v["context"]["language"], "de-DE");
    assert_eq!(v["context"]["timeZone"], "Europe/Berlin");
    assert_eq!(v["context"]["title"].as_str().unwrap().chars().count(), 512);
    assert_eq!(
        v["context"]["browser"], "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0",
        "the browser is the one the server saw"
    );
    assert!(v["context"].get("secret").is_none(), "{v}");
    assert!(
        v["firstSeen"].is_string() && v["lastSeen"].is_string(),
        "{v}"
    );
    let rooms = body["conversations"].as_array().unwrap();
    assert_eq!(rooms.len(), 1, "only this visitor's conversations: {body}");

    let (_, found) = s
        .get_with("/api/inbox?status=all&q=PARCEL%204711", &agent)
        .await;
    let found: Vec<&str> = found["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["roomId"].as_str().unwrap())
        .collect();
    assert_eq!(found, ["support-vic"]);
    let (status, body) = s
        .get_with(&format!("/api/inbox?q={}", "x".repeat(201)), &agent)
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_query"))
    );

    // Visitors do not read other visitors' details; another domain's room is not found.
    let (status, _) = s
        .get_with(
            "/api/rooms/support-vic/visitor",
            &token("max", "Max", "visitor", "shop"),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = s
        .get_with(
            "/api/rooms/support-vic/visitor",
            &token("ann", "Ann", "agent", "demo"),
        )
        .await;
    assert_eq!(status, 404);
}

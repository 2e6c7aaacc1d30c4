//! `GET /stats/domain/{domainId}` over a history made through the public API (messages by
//! every role, escalation, assignment, transfer, resolution, reopening, visitors reporting
//! themselves and a visitor's page joining over `/ws`), checked against the figures the
//! story knows and against counts computed straight from the database file; who may read
//! it; every bad query.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Client, TEST_SECRET, TestServer};
use parlor::auth::keys;
use parlor::config::{DomainConfig, Secret, VisitorRooms};
use serde_json::{Value, json};

const ORIGIN: &str = "https://shop.example";

fn token(user: &str, role: &str, domain: &str) -> String {
    parlor::auth::issue_token(
        &Secret::new(TEST_SECRET),
        user,
        Some(user),
        role,
        domain,
        600,
    )
    .unwrap()
}

/// A POST of `body` to `url` from a page of [`ORIGIN`].
async fn report(url: &str, body: &Value) {
    let res = reqwest::Client::new()
        .post(url)
        .header("origin", ORIGIN)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
}

/// Messages per role of `domain`, counted from the database file itself.
fn stored_roles(s: &TestServer, domain: &str) -> BTreeMap<String, i64> {
    let db = rusqlite::Connection::open(s.db_path()).unwrap();
    let mut stmt = db
        .prepare(
            "SELECT m.author_role, COUNT(*) FROM messages m JOIN rooms r ON r.rid = m.room
             WHERE r.domain_id = ?1 GROUP BY m.author_role",
        )
        .unwrap();
    stmt.query_map([domain], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Rooms of `domain` in the database file.
fn stored_rooms(s: &TestServer, domain: &str) -> i64 {
    let db = rusqlite::Connection::open(s.db_path()).unwrap();
    db.query_row(
        "SELECT COUNT(*) FROM rooms WHERE domain_id = ?1",
        [domain],
        |r| r.get(0),
    )
    .unwrap()
}

/// The first message of `room` with `role` (and, if given, `action` in its data): its seq
/// and `created_at`.
fn stored_at(s: &TestServer, room: &str, role: &str, action: Option<&str>) -> (i64, i64) {
    let db = rusqlite::Connection::open(s.db_path()).unwrap();
    db.query_row(
        "SELECT m.seq, m.created_at FROM messages m JOIN rooms r ON r.rid = m.room
         WHERE r.domain_id = 'shop' AND r.id = ?1 AND m.author_role = ?2
           AND (?3 IS NULL OR json_extract(m.data, '$.action') = ?3)
         ORDER BY m.seq LIMIT 1",
        rusqlite::params![room, role, action],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[tokio::test]
async fn statistics_match_the_history_and_only_the_domain_may_read_them() {
    let (server_key, key_entry) = keys::generate();
    let (admin_key, admin_entry) = keys::generate_with(keys::ADMIN_KEY_PREFIX);
    let s = TestServer::start_with(move |c| {
        c.auth.admin_keys = vec![admin_entry];
        let mut shop = DomainConfig::new("shop", "Shop");
        shop.visitor_rooms = VisitorRooms::Open;
        shop.allowed_origins = vec![ORIGIN.to_owned()];
        shop.server_keys = vec![key_entry];
        c.domains.push(shop);
        c.domains.push(DomainConfig::new("other", "Other"));
    })
    .await;
    let boss = token("boss", "admin", "shop");
    let alice = token("alice", "agent", "shop");
    let bob = token("bob", "agent", "shop");
    let say = |who: String, room: &'static str, text: &'static str, role: Option<&str>| {
        let mut body = json!({ "chatRoomId": room, "message": text });
        if let Some(role) = role {
            body["role"] = json!(role);
        }
        let s = &s;
        async move {
            let (code, body) = s.post_with("/api/messages", &who, &body).await;
            assert_eq!(code, 201, "{body}");
        }
    };
    let act = |who: String, room: &'static str, action: &'static str, body: Value| {
        let s = &s;
        async move {
            let (code, body) = s
                .post_with(&format!("/api/rooms/{room}/{action}"), &who, &body)
                .await;
            assert_eq!(code, 200, "{action} {room}: {body}");
        }
    };

    // Three rooms the back end opens with an assistant's greeting.
    for room in ["r1", "r2", "r3"] {
        say(boss.clone(), room, "Hi! How can I help?", Some("assistant")).await;
    }
    // r1: the assistant alone answers.
    say(
        token("v1", "visitor", "shop"),
        "r1",
        "Do you ship abroad?",
        None,
    )
    .await;
    say(token("v1", "visitor", "shop"), "r1", "And to Norway?", None).await;
    say(boss.clone(), "r1", "Yes, everywhere.", Some("assistant")).await;
    // r2: the visitor asks for a person; Alice's reply takes it; she resolves it.
    say(
        token("v2", "visitor", "shop"),
        "r2",
        "My order is late",
        None,
    )
    .await;
    act(token("v2", "visitor", "shop"), "r2", "escalate", json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(alice.clone(), "r2", "Let me look", None).await;
    // r3: Alice takes it from the bot, hands it to Bob, who answers and resolves; the
    // visitor asks for a person again.
    say(token("v3", "visitor", "shop"), "r3", "Refund please", None).await;
    act(alice.clone(), "r3", "assign", json!({})).await;
    act(
        alice.clone(),
        "r3",
        "transfer",
        json!({ "agentId": "bob", "agentName": "bob" }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    say(bob.clone(), "r3", "Done", None).await;
    // r4: a visitor's own room in a domain without an assistant waits for a person at once.
    say(token("v4", "visitor", "shop"), "r4", "Anyone there?", None).await;
    // r5: a visitor's page joins over /ws with where it is: a sighting.
    let mut v5 =
        Client::connect(&s.ws(&format!("/ws?token={}", token("v5", "visitor", "shop")))).await;
    let id = v5
        .request(json!({ "type": "join-room", "roomId": "r5",
            "context": { "page": "https://shop.example/pricing", "referrer": "https://search.example/" } }))
        .await;
    assert_eq!(v5.reply(&id).await["type"], "room-joined");
    // Two pages report themselves.
    for visitor in ["p1", "p2"] {
        report(
            &s.http("/visitors/add"),
            &json!({ "domainId": "shop", "visitorId": visitor, "visitorData": { "page": "https://shop.example/" } }),
        )
        .await;
    }

    // The first responses and r4's queueing happen as the messages are committed: wait for
    // them (resolving before Alice's reply took r2 would change the story).
    let path = "/stats/domain/shop?interval=hour";
    let mut stats = Value::Null;
    for _ in 0..200 {
        stats = s.get_with(path, &alice).await.1;
        if stats["firstResponse"]["count"] == 2 && stats["conversations"]["escalated"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(stats["firstResponse"]["count"], 2, "{stats:#}");
    act(alice.clone(), "r2", "resolve", json!({})).await;
    act(bob.clone(), "r3", "resolve", json!({})).await;
    act(token("v3", "visitor", "shop"), "r3", "escalate", json!({})).await;

    let (code, stats) = s.get_with(path, &alice).await;
    assert_eq!(code, 200, "{stats}");
    assert_eq!(stats["domainId"], "shop");
    assert_eq!(stats["interval"], "hour");
    // Visitors: p1, p2 reported, v5 connected with its page.
    assert_eq!(stats["activeVisitors"], 3, "{stats:#}");
    assert_eq!(stats["visitorsToday"], 3);
    assert_eq!(stats["visitors"]["now"], 3);
    assert_eq!(stats["visitors"]["last7Days"], 3);
    assert_eq!(stats["visitors"]["last30Days"], 3);
    assert_eq!(stats["visitors"]["visits"], 3);
    // Conversations as the story made them.
    assert_eq!(
        stats["conversations"],
        json!({
            "started": 5,
            "aiAnswered": 3,
            "aiOnly": 1,
            "answeredWithoutHuman": 1.0 / 3.0,
            "escalated": 4,
            "assigned": 2,
            "transferred": 1,
            "resolved": 2,
            "reopened": 1,
        }),
        "{stats:#}"
    );
    assert_eq!(stats["conversations"]["started"], stored_rooms(&s, "shop"));
    // Messages: what the story wrote, and what the database holds, role by role.
    let by_role: BTreeMap<String, i64> =
        serde_json::from_value(stats["messages"]["byRole"].clone()).unwrap();
    assert_eq!(by_role, stored_roles(&s, "shop"));
    assert_eq!(
        (by_role["assistant"], by_role["visitor"], by_role["agent"]),
        (4, 5, 2)
    );
    assert_eq!(
        stats["messages"]["total"].as_i64().unwrap(),
        by_role.values().sum::<i64>()
    );
    assert_eq!(stats["aiReplies"], 4);
    // First responses: from the hand-over to the agent's message, as stored.
    let (_, escalated_at) = stored_at(&s, "r2", "system", Some("escalate"));
    let (_, alice_at) = stored_at(&s, "r2", "agent", None);
    let (_, transferred_at) = stored_at(&s, "r3", "system", Some("transfer"));
    let (_, bob_at) = stored_at(&s, "r3", "agent", None);
    let mut expected = [alice_at - escalated_at, bob_at - transferred_at];
    expected.sort_unstable();
    let (median, p90) = (
        stats["firstResponse"]["medianMs"].as_i64().unwrap(),
        stats["firstResponse"]["p90Ms"].as_i64().unwrap(),
    );
    for (got, want) in [(median, expected[0]), (p90, expected[1])] {
        assert!((got - want).abs() < 100, "{got} ms against {want} ms");
    }
    assert!(median >= 250 && p90 >= 550, "{median} {p90}");
    // No assistant configured: no tokens, no budget.
    assert_eq!(stats["aiTokens"]["totalTokens"], 0);
    assert!(stats["aiTokens"]["dailyBudget"].is_null());
    // The series holds every hour of the default range and sums to the totals.
    let series = stats["series"].as_array().unwrap();
    assert!((720..=722).contains(&series.len()), "{}", series.len());
    let sum = |field: &str| {
        series
            .iter()
            .map(|p| p[field].as_i64().unwrap())
            .sum::<i64>()
    };
    assert_eq!(
        sum("messages"),
        stats["messages"]["total"].as_i64().unwrap()
    );
    assert_eq!(sum("conversations"), 5);
    assert_eq!(sum("aiReplies"), 4);
    assert_eq!(sum("escalated"), 4);
    assert_eq!(sum("resolved"), 2);
    assert_eq!(sum("visitors"), 3);
    // By day, the same totals.
    let (_, days) = s.get_with("/stats/domain/shop", &boss).await;
    assert_eq!(days["interval"], "day");
    assert_eq!(days["conversations"], stats["conversations"]);
    assert_eq!(days["messages"], stats["messages"]);
    let day_series = days["series"].as_array().unwrap();
    assert!((30..=32).contains(&day_series.len()));
    assert_eq!(
        day_series
            .iter()
            .map(|p| p["messages"].as_i64().unwrap())
            .sum::<i64>(),
        stats["messages"]["total"].as_i64().unwrap()
    );
    // A range before all this holds none of it.
    let (_, before) = s
        .get_with("/stats/domain/shop?from=2026-01-01&to=2026-01-31", &boss)
        .await;
    assert_eq!(before["messages"]["total"], 0, "{before}");
    assert_eq!(before["conversations"]["started"], 0);
    assert!(before["conversations"]["answeredWithoutHuman"].is_null());
    assert_eq!(before["series"].as_array().unwrap().len(), 31);
    // The domain's back end reads them with its server key.
    let (code, by_key) = s.get_with("/stats/domain/shop", &server_key).await;
    assert_eq!(code, 200, "{by_key}");
    assert_eq!(by_key["conversations"], stats["conversations"]);

    // Who is on the site now, and a page that leaves.
    report(
        &s.http("/visitors/remove"),
        &json!({ "domainId": "shop", "visitorId": "p2" }),
    )
    .await;
    let (code, now) = s.get_with("/stats/domain/shop/visitors", &alice).await;
    assert_eq!(code, 200, "{now}");
    let ids: Vec<&str> = now["visitors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["visitorId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{now}");
    assert!(ids.contains(&"p1") && ids.contains(&"v5"), "{now}");
    let v5_row = now["visitors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["visitorId"] == "v5")
        .unwrap();
    assert_eq!(v5_row["visitor"]["page"], "https://shop.example/pricing");
    assert_eq!(v5_row["visitor"]["referrer"], "https://search.example/");
    assert_eq!(s.get_with(path, &alice).await.1["activeVisitors"], 2);

    // Who may not read them, and bad queries; nothing else is told.
    let cases: [(&str, String, u16, &str); 12] = [
        // Without a token: the demo's anonymous visitor.
        ("/stats/domain/shop", String::new(), 403, "forbidden"),
        ("/stats/domain/shop", "not-a-token".to_owned(), 401, ""),
        (
            "/stats/domain/shop",
            token("v1", "visitor", "shop"),
            403,
            "forbidden",
        ),
        (
            "/stats/domain/shop",
            token("eve", "agent", "other"),
            403,
            "forbidden",
        ),
        (
            "/stats/domain/shop/visitors",
            token("eve", "admin", "other"),
            403,
            "forbidden",
        ),
        ("/stats/domain/nope", alice.clone(), 404, "unknown_domain"),
        (
            "/stats/domain/shop?from=yesterday",
            alice.clone(),
            400,
            "invalid_query",
        ),
        (
            "/stats/domain/shop?interval=week",
            alice.clone(),
            400,
            "invalid_query",
        ),
        (
            "/stats/domain/shop?from=2026-02-01&to=2026-01-01",
            alice.clone(),
            400,
            "invalid_query",
        ),
        (
            "/stats/domain/shop?from=2025-01-01&to=2026-06-01",
            alice.clone(),
            400,
            "invalid_query",
        ),
        (
            "/stats/domain/shop?from=2026-01-01&to=2026-03-01&interval=hour",
            alice.clone(),
            400,
            "invalid_query",
        ),
        (
            "/stats/domain/shop?colour=red",
            alice.clone(),
            400,
            "invalid_query",
        ),
    ];
    for (path, who, status, code) in cases {
        let (got, body) = s.get_with(path, &who).await;
        assert_eq!(got, status, "{path}: {body}");
        if !code.is_empty() {
            assert_eq!(body["error"]["code"], code, "{path}: {body}");
        }
    }
    // An admin key works on the admin API only.
    let (code, body) = s.get_with("/stats/domain/shop", &admin_key).await;
    assert_eq!(code, 401, "{body}");
}

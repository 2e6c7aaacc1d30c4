//! Who may use which room, over real sockets and HTTP: in a domain with `visitor_rooms =
//! "owned"` a visitor uses only the rooms it created, agents use every room of their own
//! domain and none of another's, and every refusal leaves the room as it was.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Client, TEST_SECRET, TestServer};
use parlor::config::{DomainConfig, Secret, VisitorRooms};
use serde_json::{Value, json};

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        for id in ["acme", "globex"] {
            c.domains.push(DomainConfig {
                visitor_rooms: VisitorRooms::Owned,
                ..common::chat_domain(id, id)
            });
        }
    })
    .await
}

fn token(user: &str, role: &str, domain: &str) -> String {
    parlor::auth::issue_token(&Secret::new(TEST_SECRET), user, None, role, domain, 300)
        .expect("token")
}

async fn connect(s: &TestServer, user: &str, role: &str, domain: &str) -> Client {
    Client::connect(&s.ws(&format!("/ws?token={}", token(user, role, domain)))).await
}

async fn get(s: &TestServer, path: &str, token: &str) -> (u16, Value) {
    s.get_with(path, token).await
}

async fn post(s: &TestServer, room: &str, text: &str, token: &str) -> (u16, Value) {
    let body = json!({ "chatRoomId": room, "message": text });
    s.post_with("/api/messages", token, &body).await
}

#[tokio::test]
async fn a_visitor_cannot_use_another_visitors_room_by_guessing_its_id() {
    let s = server().await;
    let mut alice = connect(&s, "alice", "visitor", "acme").await;
    alice.join("alice-room", None).await;
    alice.say("alice-room", "private", None).await;
    let bob_token = token("bob", "visitor", "acme");

    // Over the socket: joining is refused with `forbidden`, and nothing is delivered.
    let mut bob = connect(&s, "bob", "visitor", "acme").await;
    let id = bob
        .request(json!({ "type": "join-room", "roomId": "alice-room" }))
        .await;
    let reply = bob.reply(&id).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "forbidden", "{reply}");
    let id = bob
        .request(json!({ "type": "send-message", "roomId": "alice-room", "message": "hi" }))
        .await;
    assert_eq!(bob.reply(&id).await["code"], "not_joined");
    let id = bob
        .request(json!({ "type": "history", "roomId": "alice-room" }))
        .await;
    assert_eq!(bob.reply(&id).await["type"], "error");

    // Over HTTP: every read and the post are refused the same way.
    for path in [
        "/api/messages?chatRoomId=alice-room",
        "/api/rooms/alice-room/messages",
        "/api/rooms/alice-room/messages?after=0",
    ] {
        let (status, body) = get(&s, path, &bob_token).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{path}: {body}");
    }
    let (status, body) = post(&s, "alice-room", "intrusion", &bob_token).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );

    // Alice still uses her room, and nothing of Bob's is in it.
    let alice_token = token("alice", "visitor", "acme");
    let (status, body) = get(&s, "/api/rooms/alice-room/messages", &alice_token).await;
    assert_eq!(status, 200, "{body}");
    let texts: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["private"]);
    assert_eq!(body["lastSeq"], 1);

    // A room nobody has used yet becomes Bob's own when he posts to it.
    let (status, _) = post(&s, "bob-room", "mine", &bob_token).await;
    assert_eq!(status, 201);
    let (status, _) = get(&s, "/api/messages?chatRoomId=bob-room", &alice_token).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn agents_use_every_room_of_their_domain_and_none_of_another() {
    let s = server().await;
    let mut alice = connect(&s, "alice", "visitor", "acme").await;
    alice.join("case-1", None).await;
    alice.say("case-1", "help please", None).await;

    let mut agent = connect(&s, "ann", "agent", "acme").await;
    let (_, history) = agent.join("case-1", None).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["message"], "help please");
    agent.say("case-1", "on it", None).await;
    let m = loop {
        let m = alice.recv_type("message-received").await;
        if m["message"] != "help please" {
            break m;
        }
    };
    assert_eq!(
        (m["message"].as_str(), m["role"].as_str()),
        (Some("on it"), Some("agent"))
    );

    // An agent of another domain names the same room id and reaches only its own domain's
    // room of that name, which is empty.
    let other = token("gus", "agent", "globex");
    let (status, body) = get(&s, "/api/messages?chatRoomId=case-1", &other).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"], json!([]));
    let (status, _) = get(&s, "/api/rooms/case-1/messages", &other).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_demo_domain_stays_an_open_playground() {
    let s = server().await;
    let mut a = Client::connect(&s.ws("/ws")).await;
    a.join("lobby", None).await;
    a.say("lobby", "anyone here?", None).await;
    let mut b = Client::connect(&s.ws("/ws")).await;
    let (_, history) = b.join("lobby", None).await;
    assert_eq!(
        history.len(),
        1,
        "anonymous visitors share demo rooms by id"
    );
}

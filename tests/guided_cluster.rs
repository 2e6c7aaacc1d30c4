//! Guided sessions (`/chat`) across processes: the last connection wins when the two
//! connections are on different nodes of a cluster, and every answer the server
//! acknowledged survives `kill -9` of the real binary.
//!
//! The cluster test needs `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL` and makes
//! a database and a Redis prefix of its own. The `kill -9` test runs on SQLite always, and
//! on a fresh PostgreSQL database of its own when `PARLOR_TEST_DATABASE_URL` is set.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Database, NODE_CONFIG, Node, servers};
use common::process::Server;
use common::{Client, TEST_SECRET};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// The demo's template.
const NDA: &str = "mutual-nda";

/// Valid answers to the demo template's questions, in order.
const ANSWERS: [&str; 7] = [
    "Acme Ltd",
    "Globex GmbH",
    "To evaluate a possible partnership.",
    "2027-01-31",
    "3",
    "ireland",
    "legal@acme.example",
];

/// How long a displaced connection may take to hear that it was replaced.
const REPLACED_WITHIN: Duration = Duration::from_secs(5);

/// A visitor token of the demo domain for `user`, signed with the test secret.
fn token(user: &str) -> String {
    parlor::auth::issue_token(
        &parlor::config::Secret::new(TEST_SECRET),
        user,
        Some(user),
        "visitor",
        "demo",
        600,
    )
    .unwrap()
}

/// `/chat` of the server at `addr` (`HOST:PORT`) for `user` and the demo template.
fn chat_url(addr: &str, user: &str) -> String {
    format!("ws://{addr}/chat?token={}&templateId={NDA}", token(user))
}

fn node_chat(node: &Node, user: &str) -> String {
    chat_url(&format!("127.0.0.1:{}", node.port), user)
}

async fn answer(c: &mut Client, content: &str) -> Value {
    c.send(json!({ "type": "user_message", "content": content }))
        .await;
    c.recv().await
}

/// The user's answers in a `session_resumed` history, in order.
fn user_turns(resumed: &Value) -> Vec<String> {
    resumed["history"]
        .as_array()
        .expect("a history")
        .iter()
        .filter(|t| t["role"] == "user")
        .map(|t| t["content"].as_str().unwrap().to_owned())
        .collect()
}

// ------------------------------------------------------------------------------------------
// Last connection wins across nodes
// ------------------------------------------------------------------------------------------

/// ann starts on node A and answers one question, then opens the template on node B: B
/// resumes the session where A left it, A is told it was replaced and closed with 4013, and
/// B carries on to the document. bob's session of the same template on node A is another
/// claim and is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_connection_wins_across_nodes() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let cluster = Cluster::start(2, None, &redis, db).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);

    let mut bob = Client::connect(&node_chat(a, "bob")).await;
    let bob_first = bob.recv().await;
    assert_eq!(bob_first["type"], "next_question", "{bob_first}");

    let mut on_a = Client::connect(&node_chat(a, "ann")).await;
    let first = on_a.recv().await;
    assert_eq!(first["type"], "next_question", "{first}");
    assert_eq!(first["question"]["id"], "party_a");
    let session = first["sessionId"].as_str().unwrap().to_owned();
    let second = answer(&mut on_a, ANSWERS[0]).await;
    assert_eq!(second["question"]["id"], "party_b", "{second}");

    // The same user and template on the other node: resumed, with the answer given on A.
    let mut on_b = Client::connect(&node_chat(b, "ann")).await;
    let resumed = on_b.recv().await;
    assert_eq!(resumed["type"], "session_resumed", "{resumed}");
    assert_eq!(resumed["sessionId"], session.as_str());
    assert_eq!(user_turns(&resumed), [ANSWERS[0]]);
    let pending = on_b.recv().await;
    assert_eq!(pending["type"], "next_question", "{pending}");
    assert_eq!(pending["question"]["id"], "party_b");
    assert_eq!(pending["sessionId"], session.as_str());

    // The connection on A hears of it through Redis and is closed.
    let replaced = tokio::time::timeout(REPLACED_WITHIN, on_a.recv())
        .await
        .expect("node A tells its connection it was replaced");
    assert_eq!(replaced["type"], "error", "{replaced}");
    assert_eq!(replaced["code"], "replaced", "{replaced}");
    let close = tokio::time::timeout(REPLACED_WITHIN, on_a.closed())
        .await
        .expect("node A closes the replaced connection")
        .expect("a close frame");
    assert_eq!(u16::from(close.code), 4013);

    // B carries on to the end.
    for (i, a) in ANSWERS.iter().enumerate().skip(1).take(5) {
        let next = answer(&mut on_b, a).await;
        assert_eq!(next["type"], "next_question", "answer {i}: {next}");
    }
    let done = answer(&mut on_b, ANSWERS[6]).await;
    assert_eq!(done["type"], "session_complete", "{done}");
    assert_eq!(done["sessionId"], session.as_str());
    let close = on_b.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000);

    // The document is in the shared database: node A serves it.
    let document = done["documentId"].as_str().unwrap();
    let (status, doc) = common::call(
        reqwest::Method::GET,
        &a.http(&format!("/api/documents/{document}")),
        &token("ann"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    let content = doc["content"].as_str().unwrap();
    assert!(
        content.contains("**Acme Ltd**") && content.contains("**Globex GmbH**"),
        "{content}"
    );

    // bob's connection on A was never displaced: it answers on, in its own session.
    let bob_next = answer(&mut bob, "Initech Inc").await;
    assert_eq!(bob_next["type"], "next_question", "{bob_next}");
    assert_eq!(bob_next["question"]["id"], "party_b");
    assert_eq!(bob_next["sessionId"], bob_first["sessionId"]);
    assert_ne!(bob_next["sessionId"], session.as_str());
    let bob_next = answer(&mut bob, "Hooli Corp").await;
    assert_eq!(bob_next["question"]["id"], "purpose", "{bob_next}");

    cluster.finish().await;
}

/// Rounds of the take-over race; each is one fresh user.
const RACE_ROUNDS: usize = 100;

/// A take-over on node B racing an answer sent on node A: whatever the order, B keeps the
/// session (its next answer is taken) and an answer A acknowledged is in B's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_take_over_racing_an_answer_leaves_the_session_to_the_new_connection() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let cluster = Cluster::start(2, None, &redis, db).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    for round in 0..RACE_ROUNDS {
        let user = format!("racer-{round}");
        let mut on_a = Client::connect(&node_chat(a, &user)).await;
        assert_eq!(on_a.recv().await["question"]["id"], "party_a");
        let url_b = node_chat(b, &user);
        let take_over = tokio::spawn(async move {
            let mut on_b = Client::connect(&url_b).await;
            let resumed = on_b.recv().await;
            let pending = on_b.recv().await;
            (on_b, resumed, pending)
        });
        // 0-9 ms after B starts connecting.
        tokio::time::sleep(Duration::from_millis((round % 10) as u64)).await;
        on_a.send(json!({ "type": "user_message", "content": ANSWERS[0] }))
            .await;
        let (mut on_b, resumed, pending) = take_over.await.unwrap();
        assert_eq!(
            resumed["type"], "session_resumed",
            "round {round}: {resumed}"
        );
        assert_eq!(pending["type"], "next_question", "round {round}: {pending}");
        // What A heard: its answer acknowledged (then replaced), or replaced at once.
        let mut acknowledged = false;
        loop {
            let frame = tokio::time::timeout(REPLACED_WITHIN, on_a.recv())
                .await
                .expect("node A answers or closes");
            match frame["type"].as_str() {
                Some("next_question") => acknowledged = true,
                Some("error") if frame["code"] == "replaced" => break,
                _ => panic!("round {round}: unexpected {frame}"),
            }
        }
        let had = user_turns(&resumed);
        if acknowledged {
            assert_eq!(
                had,
                [ANSWERS[0]],
                "round {round}: an acknowledged answer is missing"
            );
        }
        // B owns the session: its answer to the pending question is taken.
        let next_answer = if pending["question"]["id"] == "party_a" {
            ANSWERS[0]
        } else {
            ANSWERS[1]
        };
        let next = answer(&mut on_b, next_answer).await;
        assert_eq!(next["type"], "next_question", "round {round}: {next}");
    }
    cluster.finish().await;
}

// ------------------------------------------------------------------------------------------
// kill -9
// ------------------------------------------------------------------------------------------

/// Users answering at once.
const USERS: usize = 20;

/// Acknowledged answers every user must have before the kill.
const ACKS_BEFORE_KILL: usize = 6;

/// The configuration of the child: a cluster node's (the demo domain with the built-in
/// guide only: no assistant, so no AI vendor rewords the questions) and the test secret.
fn config() -> String {
    format!("{NODE_CONFIG}[auth]\njwt_secret = \"{TEST_SECRET}\"\n")
}

/// Starts the binary in `dir` on `database` and a free port, and waits for its "listening"
/// log line. The test's own `PARLOR_*` and vendor variables are not passed on, so only
/// [`config`] configures it.
fn spawn(dir: &Path, database: &str) -> Server {
    let file = dir.join("parlor.toml");
    std::fs::write(&file, config()).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_parlor"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("PARLOR_") || upper.ends_with("_API_KEY") {
            command.env_remove(&name);
        }
    }
    command
        .current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--database", database])
        .arg("--config")
        .arg(&file);
    Server::start(command)
}

/// What one user said before the kill.
#[derive(Debug, Default)]
struct Said {
    /// Answers whose `next_question` arrived, in order.
    acknowledged: Vec<String>,
    /// The answer sent last, whose reply had not arrived when the connection died.
    in_flight: Option<String>,
}

/// User `u`'s `k`th answer: the first three questions answered (each answer the user's own
/// words), then dates that do not read as dates, each stored and the question asked again,
/// so the session never completes and every answer is distinct.
fn nth_answer(u: usize, k: usize) -> String {
    match k {
        0 => format!("Party A of user {u}"),
        1 => format!("Party B of user {u}"),
        2 => format!("Purpose of user {u}"),
        _ => format!("not a date, user {u} answer {k}"),
    }
}

/// One user: opens the template, then answers one question at a time as fast as replies
/// come, reporting each acknowledgement on `acks`, until the connection dies.
async fn answer_until_killed(url: String, u: usize, acks: mpsc::UnboundedSender<usize>) -> Said {
    let mut said = Said::default();
    let mut c = Client::connect(&url).await;
    let first = c.recv().await;
    assert_eq!(first["type"], "next_question", "user {u}: {first}");
    for k in 0..100_000 {
        let content = nth_answer(u, k);
        said.in_flight = Some(content.clone());
        let frame = json!({ "type": "user_message", "content": content });
        if c.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            return said;
        }
        let reply = match tokio::time::timeout(Duration::from_secs(10), c.ws_next()).await {
            Ok(Some(reply)) => reply,
            Ok(None) => return said,
            Err(_) => panic!("user {u}: no reply and no close in 10 s"),
        };
        assert_eq!(reply["type"], "next_question", "user {u}: {reply}");
        said.acknowledged.push(said.in_flight.take().unwrap());
        let _ = acks.send(u);
    }
    panic!("user {u}: the server was never killed");
}

/// [`USERS`] users answer at once on `database`; the server gets SIGKILL as soon as every
/// user has [`ACKS_BEFORE_KILL`] acknowledged answers, with the next answer of each in
/// flight. A new process on the same database resumes each user's session with every
/// acknowledged answer in order, then at most the one in flight, and nothing else; and it
/// waits on the question it asked last.
async fn acknowledged_answers_survive_kill_9(dir: &Path, database: &str) {
    let mut server = spawn(dir, database);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
    let users: Vec<_> = (0..USERS)
        .map(|u| {
            let url = chat_url(&server.addr, &format!("user-{u}"));
            tokio::spawn(answer_until_killed(url, u, ack_tx.clone()))
        })
        .collect();
    drop(ack_tx);

    let mut acks = [0usize; USERS];
    let deadline = Instant::now() + Duration::from_secs(15);
    while acks.iter().any(|&n| n < ACKS_BEFORE_KILL) {
        let left = deadline.saturating_duration_since(Instant::now());
        let u = tokio::time::timeout(left, ack_rx.recv())
            .await
            .expect("every user gets its answers acknowledged in time")
            .expect("the users are answering");
        acks[u] += 1;
    }
    server.kill9();

    let mut said = Vec::new();
    for (u, user) in users.into_iter().enumerate() {
        let s = tokio::time::timeout(Duration::from_secs(15), user)
            .await
            .expect("each user sees the connection die")
            .unwrap_or_else(|e| panic!("user {u}: {e}"));
        said.push(s);
    }
    let in_flight = said.iter().filter(|s| s.in_flight.is_some()).count();
    assert!(
        in_flight > 0,
        "the kill landed while answers were in flight"
    );

    let server = spawn(dir, database);
    for (u, s) in said.iter().enumerate() {
        let mut c = Client::connect(&chat_url(&server.addr, &format!("user-{u}"))).await;
        let resumed = c.recv().await;
        assert_eq!(resumed["type"], "session_resumed", "user {u}: {resumed}");
        let stored = user_turns(&resumed);
        let mut with_in_flight = s.acknowledged.clone();
        with_in_flight.extend(s.in_flight.clone());
        assert!(
            stored == s.acknowledged || stored == with_in_flight,
            "user {u}: stored {stored:?}, acknowledged {:?}, in flight {:?}",
            s.acknowledged,
            s.in_flight
        );
        // Each answer was stored with the question that followed it.
        let history = resumed["history"].as_array().unwrap();
        let last = history.last().expect("a turn");
        assert_eq!(last["role"], "assistant", "user {u}: {resumed}");
        let pending = c.recv().await;
        assert_eq!(pending["type"], "next_question", "user {u}: {pending}");
        assert_eq!(
            pending["question"]["id"], last["questionId"],
            "user {u}: {pending}"
        );
        assert_eq!(pending["sessionId"], resumed["sessionId"]);
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_questions_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("parlor.db").display());
    acknowledged_answers_survive_kill_9(dir.path(), &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_questions_survive_kill_9_on_postgres() {
    let Some(url) = std::env::var("PARLOR_TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        eprintln!("skipped: set PARLOR_TEST_DATABASE_URL to run the PostgreSQL kill -9 test");
        return;
    };
    let db = Database::create(&url).await;
    let dir = tempfile::tempdir().unwrap();
    acknowledged_answers_survive_kill_9(dir.path(), &db.url()).await;
    db.drop_it().await;
}

//! Invariant 1: a message acknowledged to its sender survives whatever stops the server:
//! `kill -9`, an ordered shutdown (SIGTERM), or a part of the node failing (its store
//! writer panicking). A store that falls behind holds its senders back rather than queueing
//! without limit.
//!
//! The real `parlor` binary runs as a child process. Senders pipeline messages and record
//! every `message-ack`; the moment enough acks have arrived — with more sends still in
//! flight — the server is stopped. A fresh process on the same database must then hold every
//! acknowledged message with the acknowledged id and `seq`, and each room's sequence must be
//! gapless.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::process::Server;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Starts the binary on a free port, with `env` set, and waits for its "listening" log line.
fn spawn(db: &std::path::Path, env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_parlor"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--database",
        ])
        .arg(format!("sqlite://{}", db.display()))
        .env("PARLOR_LIMITS__MESSAGES_PER_SECOND", "100000")
        .env("PARLOR_LIMITS__MESSAGES_BURST", "100000")
        .envs(env.iter().copied());
    Server::start(command)
}

/// One acknowledged message: (room, clientMessageId) → (id, seq).
type Acked = HashMap<(String, String), (String, u64)>;

/// One `message-ack`: room, clientMessageId, id, seq.
type Ack = (String, String, String, u64);

const SENDERS: usize = 8;
const PER_SENDER: usize = 400;
const ROOMS: usize = 3;

/// Starts [`SENDERS`] connections, each pipelining [`PER_SENDER`] messages into one of
/// [`ROOMS`] rooms; every ack arrives on the returned channel, which closes when every
/// connection has ended.
fn start_senders(addr: &str) -> mpsc::UnboundedReceiver<Ack> {
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
    for s in 0..SENDERS {
        let url = format!("ws://{addr}/ws");
        let ack_tx = ack_tx.clone();
        tokio::spawn(async move {
            let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let room = format!("room-{}", s % ROOMS);
            let join = json!({ "type": "join-room", "roomId": room, "id": "join" });
            if sink
                .send(Message::Text(join.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
            let writer = tokio::spawn(async move {
                for i in 0..PER_SENDER {
                    let frame = json!({
                        "type": "send-message", "roomId": room, "id": i,
                        "message": format!("sender {s} message {i}"),
                        "clientMessageId": format!("s{s}-m{i}"),
                    });
                    if sink
                        .send(Message::Text(frame.to_string().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            while let Some(Ok(Message::Text(t))) = stream.next().await {
                let f: Value = serde_json::from_str(&t).unwrap();
                if f["type"] == "message-ack" {
                    let _ = ack_tx.send((
                        f["roomId"].as_str().unwrap().to_owned(),
                        f["clientMessageId"].as_str().unwrap().to_owned(),
                        f["id"].as_str().unwrap().to_owned(),
                        f["seq"].as_u64().unwrap(),
                    ));
                }
            }
            writer.abort();
        });
    }
    ack_rx
}

/// Acks until `target` have arrived.
async fn acks_until(rx: &mut mpsc::UnboundedReceiver<Ack>, target: usize) -> Acked {
    let mut acked = Acked::new();
    while acked.len() < target {
        let (room, cmid, id, seq) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("acks keep coming")
            .expect("senders alive");
        acked.insert((room, cmid), (id, seq));
    }
    acked
}

/// Adds the acks still arriving, until none came for `quiet` or the channel closed.
async fn remaining_acks(rx: &mut mpsc::UnboundedReceiver<Ack>, acked: &mut Acked, quiet: Duration) {
    while let Ok(Some((room, cmid, id, seq))) = tokio::time::timeout(quiet, rx.recv()).await {
        acked.insert((room, cmid), (id, seq));
    }
}

/// Restarts the server on `db` and checks that every acknowledged message is stored as it
/// was acknowledged, in gapless rooms.
async fn assert_stored(db: &std::path::Path, acked: &Acked) {
    let mut server = spawn(db, &[]);
    let http = reqwest::Client::new();
    let mut stored: Acked = Acked::new();
    let rooms: std::collections::BTreeSet<&String> = acked.keys().map(|(room, _)| room).collect();
    for room in rooms {
        let mut after = 0;
        let mut expected_seq = 1;
        loop {
            let url = format!(
                "http://{}/api/rooms/{room}/messages?after={after}&limit=200",
                server.addr
            );
            let page: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            let messages = page["messages"].as_array().unwrap();
            for m in messages {
                let seq = m["seq"].as_u64().unwrap();
                assert_eq!(seq, expected_seq, "gapless sequence in {room}");
                expected_seq += 1;
                // The demo's assistant answers too; its messages count for the
                // sequence, and only the senders' messages were acknowledged.
                if let Some(cmid) = m["clientMessageId"].as_str() {
                    stored.insert(
                        (room.clone(), cmid.to_owned()),
                        (m["id"].as_str().unwrap().to_owned(), seq),
                    );
                }
            }
            after = expected_seq - 1;
            if page["hasMore"] != true {
                break;
            }
        }
    }
    for (key, value) in acked {
        assert_eq!(
            stored.get(key),
            Some(value),
            "acknowledged message {key:?} is stored as acknowledged"
        );
    }
    server.kill9();
}

/// The server's `/health`.
async fn health(http: &reqwest::Client, base: &str) -> Value {
    http.get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls `/health` every few milliseconds and keeps the highest value seen at `pointer` (a
/// JSON pointer), until the task is aborted.
fn watch_most(
    http: &reqwest::Client,
    base: &str,
    pointer: &'static str,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let most = Arc::new(AtomicUsize::new(0));
    let (http, base, seen) = (http.clone(), base.to_owned(), Arc::clone(&most));
    let watching = tokio::spawn(async move {
        loop {
            let value = health(&http, &base)
                .await
                .pointer(pointer)
                .and_then(Value::as_u64)
                .unwrap();
            seen.fetch_max(usize::try_from(value).unwrap(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (watching, most)
}

/// `n` posts to `room-0` at once, with client ids `{prefix}{i}`; each must be stored (201).
async fn post_at_once(http: &reqwest::Client, base: &str, n: usize, prefix: &str) -> Acked {
    let posts: Vec<_> = (0..n)
        .map(|i| {
            let (http, base) = (http.clone(), base.to_owned());
            let cmid = format!("{prefix}{i}");
            tokio::spawn(async move {
                let response = http
                    .post(format!("{base}/api/messages"))
                    .json(&json!({
                        "message": format!("m{i}"),
                        "chatRoomId": "room-0",
                        "clientMessageId": cmid,
                    }))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap();
                (cmid, status, body)
            })
        })
        .collect();
    let mut acked = Acked::new();
    for post in posts {
        let (cmid, status, body) = tokio::time::timeout(Duration::from_secs(60), post)
            .await
            .expect("every post is answered")
            .unwrap();
        assert_eq!(
            status, 201,
            "a held-back post is stored, not refused: {body}"
        );
        acked.insert(
            ("room-0".to_owned(), cmid),
            (
                body["id"].as_str().unwrap().to_owned(),
                body["seq"].as_u64().unwrap(),
            ),
        );
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("parlor.db");
    let mut server = spawn(&db, &[]);
    let mut acks = start_senders(&server.addr);

    // Kill as soon as a good share is acknowledged, while sends are still in flight.
    let mut acked = acks_until(&mut acks, SENDERS * PER_SENDER / 3).await;
    server.kill9();
    // Acks already on the wire before the kill count too.
    remaining_acks(&mut acks, &mut acked, Duration::from_millis(500)).await;
    assert!(
        acked.len() < SENDERS * PER_SENDER,
        "the kill landed mid-stream"
    );
    assert_stored(&db, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_shutdown_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("parlor.db");
    let mut server = spawn(&db, &[]);
    let mut acks = start_senders(&server.addr);

    let mut acked = acks_until(&mut acks, SENDERS * PER_SENDER / 3).await;
    server.terminate();
    // The server tells every client to reconnect and closes; the senders end with that.
    remaining_acks(&mut acks, &mut acked, Duration::from_secs(20)).await;
    let status = server
        .exit_status(Duration::from_secs(20))
        .expect("the server stops within its shutdown deadline");
    assert!(status.success(), "an ordered stop exits 0: {status}");
    assert!(!server.logged("stopped").is_empty(), "it says it stopped");
    assert!(
        acked.len() < SENDERS * PER_SENDER,
        "the stop landed mid-stream"
    );
    assert_stored(&db, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_writer_panic_fails_the_node_which_exits_non_zero_losing_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("parlor.db");
    // The writer's 40th group commit panics, with sends in flight. Batches of at most 16
    // make the senders' 3,200 messages some 200 commits, so the 40th lands mid-stream
    // whatever the node's own start-up writes (clean-ups, leases) took on a loaded machine.
    let mut server = spawn(
        &db,
        &[
            ("PARLOR_FAILPOINTS", "sqlite-writer=panic@40"),
            ("PARLOR_STORE__MAX_BATCH", "16"),
        ],
    );
    let mut acks = start_senders(&server.addr);

    let mut acked = Acked::new();
    remaining_acks(&mut acks, &mut acked, Duration::from_secs(20)).await;
    let status = server
        .exit_status(Duration::from_secs(20))
        .expect("a failed node stops by itself");
    assert_eq!(status.code(), Some(1), "a failed node exits 1: {status}");
    let failed = server.logged("the node failed; shutting down");
    let reason = failed
        .first()
        .and_then(|line| line["fields"]["reason"].as_str())
        .expect("the failure is logged with its reason");
    assert!(
        reason.starts_with("sqlite-writer panicked: failpoint sqlite-writer"),
        "{reason}"
    );
    assert!(
        !acked.is_empty(),
        "messages were acknowledged before the panic"
    );
    assert!(
        acked.len() < SENDERS * PER_SENDER,
        "the panic landed mid-stream"
    );
    assert_stored(&db, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_holds_senders_back_instead_of_queueing_without_limit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("parlor.db");
    // Every group commit takes 100 ms more and takes at most 4 writes; 8 may wait.
    let mut server = spawn(
        &db,
        &[
            ("PARLOR_FAILPOINTS", "sqlite-writer=sleep:100"),
            ("PARLOR_STORE__WRITE_QUEUE", "8"),
            ("PARLOR_STORE__MAX_BATCH", "4"),
            ("PARLOR_LIMITS__IP_REQUESTS_PER_SECOND", "100000"),
            ("PARLOR_LIMITS__IP_REQUESTS_BURST", "100000"),
        ],
    );
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);

    // Watch the writer's queue while 100 posts arrive at once.
    let (watching, most) = watch_most(&http, &base, "/store/queued");
    let acked = post_at_once(&http, &base, 100, "p").await;
    watching.abort();
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= 8,
        "at most store.write_queue writes wait in the queue, saw {most}"
    );
    assert!(
        most >= 4,
        "the stall did hold writes back (the queue filled up), saw {most}"
    );
    server.kill9();
    assert_eq!(acked.len(), 100);
    assert_stored(&db, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pipeline_holds_clients_sends_at_the_door_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("parlor.db");
    // Every committed message waits 20 ms before it is observed: the pipeline drains 50
    // messages a second, and 16 may be on their way.
    let mut server = spawn(
        &db,
        &[
            ("PARLOR_FAILPOINTS", "observer=sleep:20"),
            ("PARLOR_STORE__PIPELINE_BACKLOG", "16"),
            ("PARLOR_LIMITS__IP_REQUESTS_PER_SECOND", "100000"),
            ("PARLOR_LIMITS__IP_REQUESTS_BURST", "100000"),
        ],
    );
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);

    // Watch the backlog while 100 posts arrive at once.
    let (watching, most) = watch_most(&http, &base, "/pipeline/backlog");
    let acked = post_at_once(&http, &base, 100, "b").await;
    // Everything committed is observed in the end.
    let drained = async {
        loop {
            if health(&http, &base).await["pipeline"]["backlog"] == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), drained)
        .await
        .expect("the pipeline drains");
    watching.abort();
    let most = most.load(Ordering::SeqCst);
    // A group commit's messages may be counted a moment late: a batch of slack at most.
    assert!(
        most <= 32,
        "the backlog stays near store.pipeline_backlog (16), saw {most}"
    );
    assert!(most >= 8, "the stall did fill the pipeline, saw {most}");
    server.kill9();
    assert_eq!(acked.len(), 100);
    assert_stored(&db, &acked).await;
}

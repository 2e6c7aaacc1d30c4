//! Invariant 1: a message acknowledged to its sender survives `kill -9` of the server.
//!
//! The real `parlor` binary runs as a child process. Senders pipeline messages and record
//! every `message-ack`; the moment enough acks have arrived — with more sends still in
//! flight — the child gets SIGKILL. A fresh process on the same database must then hold every
//! acknowledged message with the acknowledged id and `seq`, and each room's sequence must be
//! gapless.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::process::Server;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Starts the binary on a free port and waits for its "listening" log line.
fn spawn(db: &std::path::Path) -> Server {
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
        .env("PARLOR_LIMITS__MESSAGES_BURST", "100000");
    Server::start(command)
}

/// One acknowledged message: (room, clientMessageId) → (id, seq).
type Acked = HashMap<(String, String), (String, u64)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("parlor.db");
    let mut server = spawn(&db);

    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(String, String, String, u64)>();
    let senders = 8;
    let per_sender = 400;
    for s in 0..senders {
        let url = format!("ws://{}/ws", server.addr);
        let ack_tx = ack_tx.clone();
        tokio::spawn(async move {
            let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let room = format!("room-{}", s % 3);
            let join = json!({ "type": "join-room", "roomId": room, "id": "join" });
            if sink
                .send(Message::Text(join.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
            let writer = tokio::spawn(async move {
                for i in 0..per_sender {
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
    drop(ack_tx);

    // Kill as soon as a good share is acknowledged, while sends are still in flight.
    let mut acked = Acked::new();
    let target = senders * per_sender / 3;
    while acked.len() < target {
        let (room, cmid, id, seq) = tokio::time::timeout(Duration::from_secs(20), ack_rx.recv())
            .await
            .expect("acks keep coming")
            .expect("senders alive");
        acked.insert((room, cmid), (id, seq));
    }
    server.kill9();
    // Acks already on the wire before the kill count too.
    while let Ok(Some((room, cmid, id, seq))) =
        tokio::time::timeout(Duration::from_millis(500), ack_rx.recv()).await
    {
        acked.insert((room, cmid), (id, seq));
    }
    assert!(
        acked.len() < senders * per_sender,
        "the kill landed mid-stream"
    );

    let mut server = spawn(&db);
    let http = reqwest::Client::new();
    let mut stored: Acked = Acked::new();
    for r in 0..3 {
        let room = format!("room-{r}");
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
    for (key, value) in &acked {
        assert_eq!(
            stored.get(key),
            Some(value),
            "acknowledged message {key:?} is stored as acknowledged"
        );
    }
    server.kill9();
}

//! Invariant 2 at the last step: a connection that receives a room's message ahead of its
//! position (one it was due never reached its queue) writes the missing messages first,
//! read from the room cache or the store, so its client still gets the room in `seq` order
//! with nothing missing and nothing twice.
//!
//! The real `parlor` binary (a debug build) runs with the `hub-push=skip@3` fault: the hub
//! leaves the third stored message out of the one connection's queue. Nothing else can
//! make the hub skip a member, so without the fault this path never runs.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::process::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SENT: usize = 6;

#[tokio::test]
async fn a_message_that_skipped_a_connections_queue_is_written_before_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_parlor"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("parlor.db").display()
        ))
        .env("PARLOR_FAILPOINTS", "hub-push=skip@3");
    let server = Server::start(command);

    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let join = json!({ "type": "join-room", "roomId": "gap-room", "id": "join" });
    ws.send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    for i in 0..SENT {
        let frame = json!({
            "type": "send-message", "roomId": "gap-room", "id": i,
            "message": format!("message {i}"), "clientMessageId": format!("m{i}"),
        });
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    // Every message-received until all of ours arrived (the demo's assistant may answer
    // in between: its messages are part of the room too).
    let mut seqs = Vec::new();
    let mut ours = 0;
    while ours < SENT {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the messages arrive")
            .expect("the connection stays open")
            .unwrap();
        let Message::Text(text) = next else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] != "message-received" {
            continue;
        }
        seqs.push(frame["seq"].as_u64().unwrap());
        if frame["clientMessageId"]
            .as_str()
            .is_some_and(|id| id.starts_with('m'))
        {
            ours += 1;
        }
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "the room in order, without a gap or a repeat"
    );

    let metrics = format!("http://{}/metrics", server.addr);
    let gaps = common::metric(&metrics, "parlor_stream_gaps_total", "at=\"connection\"").await;
    let filled = common::metric(&metrics, "parlor_stream_filled_total", "at=\"connection\"").await;
    assert_eq!(
        gaps, 1.0,
        "the skipped message left one gap at the connection"
    );
    assert_eq!(filled, 1.0, "which was filled with that one message");
}

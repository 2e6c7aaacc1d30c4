//! The live stream across nodes: every connection of a room, on every node, receives the
//! room's messages as `message-received` frames in `seq` order with no gap and no
//! duplicate, when every node writes at once while the machine is busy, and when the broker
//! loses a room's last publication.
//!
//! Needs `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL` (three real processes on one
//! PostgreSQL database and one Redis). `PARLOR_TEST_STREAM_RUNS` sets how many times the
//! concurrent-senders scenario runs (default 6; run it 20 times to check a change of the
//! delivery path).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Client;
use common::cluster::{Cluster, Database, Node, servers};
use futures_util::{SinkExt, StreamExt};
use parlor::config::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Messages each client sends per room and run.
const PER_CLIENT: usize = 100;
/// Rooms written at once in each run (each with one client per node).
const ROOMS_PER_RUN: usize = 3;
/// How long a client may wait for the rest of a room's messages.
const COMPLETE_WITHIN: Duration = Duration::from_secs(30);

/// What one client saw of its room.
#[derive(Debug)]
struct Seen {
    node: usize,
    room: String,
    /// `lastSeq` of the first `room-joined`: every later message must arrive live.
    joined_at: u64,
    /// `seq` of every `message-received`, in arrival order.
    live: Vec<u64>,
    /// `seq` of every message in a `message-history` frame after the first one (the
    /// auto-join's, which is empty).
    replayed: Vec<u64>,
}

/// The `seq`s of a `message-history` frame's messages.
fn seqs(history: &Value) -> Vec<u64> {
    history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// Busy-loops on `threads` threads until `stop` is set: the "loaded machine" of the report.
fn burn_cpu(threads: usize, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<u64>> {
    (0..threads)
        .map(|_| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..10_000 {
                        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    }
                }
                x
            })
        })
        .collect()
}

/// One client of the scenario: connects with `?roomId=` (the seed's auto-join), sends the
/// seed's `join-room` at once, waits for the first `message-history`, sends `PER_CLIENT`
/// messages without waiting for acks, and reads until it has every message after the first
/// join's `lastSeq` (or gives up after [`COMPLETE_WITHIN`]). The clients of a room start
/// together but do not wait for each other, so a `join-room` may be answered while the
/// others already write.
async fn client(url: String, node: usize, room: String, total: usize) -> Seen {
    let mut c = Client::connect(&url).await;
    c.send(json!({ "type": "join-room", "roomId": room })).await;
    let joined = c.recv_type("room-joined").await;
    let first = c.recv_type("message-history").await;
    let last_seq = joined["lastSeq"].as_u64().unwrap();
    let history = seqs(&first);
    assert_eq!(
        history.last().copied().unwrap_or(0),
        last_seq,
        "the first catch-up ends at lastSeq: {joined} {first}"
    );
    for k in 0..PER_CLIENT {
        let text = format!("x-{node}-{k}");
        let frame = json!({ "type": "send-message", "roomId": room, "message": text, "clientMessageId": text });
        c.ws.feed(WsMessage::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    c.ws.flush().await.unwrap();
    let mut seen = Seen {
        node,
        room,
        joined_at: last_seq,
        live: Vec::new(),
        replayed: Vec::new(),
    };
    let expected = total - usize::try_from(last_seq).unwrap();
    let deadline = Instant::now() + COMPLETE_WITHIN;
    while seen.live.len() < expected && Instant::now() < deadline {
        let Ok(Some(Ok(WsMessage::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(500), c.ws.next()).await
        else {
            continue;
        };
        let f: Value = serde_json::from_str(&text).unwrap();
        match f["type"].as_str() {
            Some("message-received") => seen.live.push(f["seq"].as_u64().unwrap()),
            Some("message-history") => seen.replayed.extend(seqs(&f)),
            Some("error") => panic!("client on node {node}: {f}"),
            _ => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_gets_every_message_live_when_all_nodes_send_at_once() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let runs: usize = std::env::var("PARLOR_TEST_STREAM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let db = Database::create(&db_url).await;
    let c = Cluster::start(3, None, &redis, db).await;
    let total = PER_CLIENT * c.nodes.len();
    let mut failures = Vec::new();
    for run in 0..runs {
        let stop = Arc::new(AtomicBool::new(false));
        let burners = burn_cpu(2, &stop);
        let mut clients = Vec::new();
        for r in 0..ROOMS_PER_RUN {
            let room = format!("fresh-{run}-{r}");
            for (i, node) in c.nodes.iter().enumerate() {
                let url = format!(
                    "{}&roomId={room}",
                    node.ws_as(&format!("agent-{i}"), "agent")
                );
                clients.push(tokio::spawn(client(url, i, room.clone(), total)));
            }
        }
        let mut seen = Vec::new();
        for client in clients {
            seen.push(client.await.unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        for b in burners {
            b.join().unwrap();
        }
        for s in seen {
            let want: Vec<u64> = (s.joined_at + 1..=total as u64).collect();
            if s.live != want || !s.replayed.is_empty() {
                let missing: Vec<u64> = want
                    .iter()
                    .filter(|q| !s.live.contains(q))
                    .copied()
                    .collect();
                let mut counts = BTreeMap::new();
                for q in &s.live {
                    *counts.entry(*q).or_insert(0) += 1;
                }
                let doubled: Vec<u64> = counts
                    .into_iter()
                    .filter(|(_, n)| *n > 1)
                    .map(|(q, _)| q)
                    .collect();
                let in_order = s.live.windows(2).all(|w| w[0] < w[1]);
                failures.push(format!(
                    "run {run}, room {}, client on node {} (joined at {}): {} live messages, missing {missing:?}, twice {doubled:?}, in order: {in_order}, replayed by a rejoin {:?}",
                    s.room,
                    s.node,
                    s.joined_at,
                    s.live.len(),
                    s.replayed
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} connections did not get every message live once, in order:\n{}",
        failures.len(),
        runs * ROOMS_PER_RUN * c.nodes.len(),
        failures.join("\n")
    );
    c.finish().await;
}

/// A TCP relay to Redis that passes everything through, except that it sends a `PUBLISH`
/// whose payload contains one of its armed markers to another channel (nobody listens
/// there), once per marker: a publication lost between nodes, as a full outbox or a
/// dropped connection loses one. Redis still answers the command, so the publishing node
/// notices nothing.
struct LossyRelay {
    port: u16,
    armed: Arc<parking_lot::Mutex<Vec<String>>>,
    lost: Arc<std::sync::atomic::AtomicUsize>,
}

impl LossyRelay {
    async fn start(redis: &str) -> Self {
        let target = redis
            .strip_prefix("redis://")
            .unwrap_or(redis)
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
        let lost = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (armed2, lost2) = (Arc::clone(&armed), Arc::clone(&lost));
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (armed, lost) = (Arc::clone(&armed2), Arc::clone(&lost2));
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_redis, mut to_redis) = outbound.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_redis, &mut to_client).await;
                    });
                    let _ = relay_commands(&mut from_client, &mut to_redis, &armed, &lost).await;
                });
            }
        });
        Self { port, armed, lost }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Loses the next publication that contains `marker`.
    fn lose(&self, marker: &str) {
        self.armed.lock().push(marker.to_owned());
    }

    /// Publications lost so far.
    fn lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }
}

/// Copies RESP commands from a client to Redis one whole command at a time, rewriting the
/// channel of a `PUBLISH` that carries an armed marker.
async fn relay_commands(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    armed: &parking_lot::Mutex<Vec<String>>,
    lost: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        while let Some((args, used)) = parse_command(&buf) {
            let publish = args.len() == 3 && args[0].eq_ignore_ascii_case(b"PUBLISH");
            let marker = publish
                .then(|| {
                    let payload = String::from_utf8_lossy(&args[2]);
                    let mut armed = armed.lock();
                    let i = armed.iter().position(|m| payload.contains(m.as_str()))?;
                    Some(armed.remove(i))
                })
                .flatten();
            if marker.is_some() {
                lost.fetch_add(1, Ordering::SeqCst);
                let mut void = args[1].clone();
                void.extend_from_slice(b":lost");
                write_command(&mut out, &[&args[0], &void, &args[2]]);
            } else {
                out.extend_from_slice(&buf[..used]);
            }
            buf.drain(..used);
        }
        to.write_all(&out).await?;
    }
}

/// One whole RESP command (an array of bulk strings) at the start of `buf`: its arguments
/// and its length in bytes; `None` while it is incomplete.
fn parse_command(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let count: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, next) = line(buf, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        let end = next + len;
        if buf.len() < end + 2 {
            return None;
        }
        args.push(buf[next..end].to_vec());
        at = end + 2;
    }
    Some((args, at))
}

fn write_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads `room`'s `message-received` frames until `seq` `upto` has arrived, for 10 s at
/// most; returns their `seq`s and contents in arrival order.
async fn live_until(client: &mut Client, room: &str, upto: u64) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.last().is_none_or(|(seq, _)| *seq < upto) {
        let Ok(Some(f)) = tokio::time::timeout_at(deadline.into(), client.ws_next()).await else {
            break;
        };
        if f["type"] == "message-received" && f["roomId"] == room {
            seen.push((
                f["seq"].as_u64().unwrap(),
                f["message"].as_str().unwrap().to_owned(),
            ));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publications_the_broker_lost_reach_the_other_nodes_even_the_last_one() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let relay = LossyRelay::start(&redis).await;
    let db = Database::create(&db_url).await;
    // Node 0 talks to Redis through the relay; nodes 1 and 2 directly.
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("parlor-stream-{}", uuid::Uuid::new_v4().simple());
    let mut nodes = Vec::new();
    for i in 0..3 {
        let broker = if i == 0 { relay.url() } else { redis.clone() };
        let mut node = Node::start(dir.path(), &db.url(), &broker, &prefix, i);
        node.wait_healthy().await;
        nodes.push(node);
    }
    let c = Cluster {
        nodes,
        db: Some(db),
        dir,
        prefix,
    };
    let room = "lossy";
    let mut listeners = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let mut l = Client::connect(&node.ws(&format!("listener-{i}"))).await;
        l.join(room, None).await;
        listeners.push(l);
    }
    let mut sender = Client::connect(&c.nodes[0].ws("sender")).await;
    sender.join(room, None).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (middle, last) = (format!("middle-{suffix}"), format!("last-{suffix}"));
    relay.lose(&middle);
    relay.lose(&last);
    // Seq 2 is lost between nodes and revealed by seq 3; seq 5, the room's last message, is
    // revealed by nothing but the position check.
    let texts = ["one", &middle, "three", "four", &last];
    for t in texts {
        sender.say(room, t, None).await;
    }
    // The ack comes before the publication leaves the node: wait for the relay to see it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.lost() < 2 {
        assert!(
            Instant::now() < deadline,
            "the relay lost both publications"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lost_at = Instant::now();
    let want: Vec<(u64, String)> = (1..).zip(texts.iter().map(|t| (*t).to_owned())).collect();
    let bound = 2 * Config::default().broker_position_check_ms + Duration::from_millis(1500);
    for (i, l) in listeners.iter_mut().enumerate() {
        let got = live_until(l, room, 5).await;
        assert_eq!(got, want, "listener on node {i}");
    }
    let took = lost_at.elapsed();
    assert!(
        took <= bound,
        "the lost last message took {took:?} to reach every node (documented: two position checks and a store read)"
    );
    for node in &c.nodes[1..] {
        assert!(
            node.metric("parlor_stream_tail_repairs_total", "").await >= 1.0,
            "node {} caught the room up by its position check",
            node.port
        );
        assert!(
            node.metric("parlor_stream_gaps_total", "at=\"node\"").await >= 1.0,
            "node {} saw seq 3 ahead of the lost seq 2",
            node.port
        );
    }
    // The stream goes on with no duplicate: the next message is seq 6 everywhere.
    let mut writer = Client::connect(&c.nodes[2].ws("writer")).await;
    writer.join(room, None).await;
    writer.say(room, "six", None).await;
    for (i, l) in listeners.iter_mut().enumerate() {
        let got = live_until(l, room, 6).await;
        assert_eq!(got, [(6, "six".to_owned())], "listener on node {i}");
    }
    c.finish().await;
}

/// The seed's reconnect across nodes: a client that was on one node comes back on another
/// with `?roomId=`, then `join-room` with `since` (its last `seq`); it gets exactly what it
/// missed, once, and then the live messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_reconnect_on_another_node_replays_only_what_was_missed() {
    let Some((db_url, redis)) = servers() else {
        return;
    };
    let db = Database::create(&db_url).await;
    let c = Cluster::start(2, None, &redis, db).await;
    let room = "moving";
    let url = |node: &Node| format!("{}&roomId={room}", node.ws_as("reader", "agent"));
    let mut writer = Client::connect(&c.nodes[1].ws_as("writer", "agent")).await;
    writer.join(room, None).await;
    let mut reader = Client::connect(&url(&c.nodes[0])).await;
    reader.recv_type("message-history").await;
    for i in 1..=5 {
        writer.say(room, &format!("m{i}"), None).await;
    }
    let mut last = 0;
    while last < 5 {
        last = reader.recv_type("message-received").await["seq"]
            .as_u64()
            .unwrap();
    }
    drop(reader);
    for i in 6..=9 {
        writer.say(room, &format!("m{i}"), None).await;
    }
    let mut back = Client::connect(&url(&c.nodes[1])).await;
    back.recv_type("room-joined").await;
    let auto = back.recv_type("message-history").await;
    let mut seen = seqs(&auto);
    assert_eq!(
        seen,
        (1..=9).collect::<Vec<_>>(),
        "the auto-join's catch-up"
    );
    // The seed's join-room with since: this connection has all of it already.
    back.send(json!({ "type": "join-room", "roomId": room, "since": last }))
        .await;
    back.recv_type("room-joined").await;
    let replay = back.recv_type("message-history").await;
    assert_eq!(replay["messages"], json!([]), "nothing twice: {replay}");
    writer.say(room, "m10", None).await;
    seen.push(
        back.recv_type("message-received").await["seq"]
            .as_u64()
            .unwrap(),
    );
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    // A client that comes back without the auto-join gets only the missed part.
    let mut plain = Client::connect(&c.nodes[0].ws_as("reader", "agent")).await;
    let (_, missed) = plain.join(room, Some(5)).await;
    let missed: Vec<u64> = missed.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(missed, (6..=10).collect::<Vec<_>>());
    c.finish().await;
}

//! The Redis broker against a real Redis: two nodes (two hubs with their own brokers, over
//! one store) see each other's stored messages in `seq` order and each other's room events;
//! when Redis restarts, the nodes reconnect, re-subscribe, and catch up from the store on
//! what was published while it was down, with no gap and no duplicate.
//!
//! Needs `PARLOR_TEST_REDIS_URL` (e.g. `redis://127.0.0.1:6379`); the restart test also
//! starts a `redis-server` of its own on a free port, so the shared one is never touched.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::redis::OwnRedis;

use std::sync::Arc;
use std::time::Duration;

use parlor::broker::Broker;
use parlor::broker::redis::RedisBroker;
use parlor::config::StoreConfig;
use parlor::hub::{ConnHandle, Event, Hub, PresentUser, Receiver, Replay};
use parlor::metrics::Metrics;
use parlor::model::{Author, Identity, Message, NewMessage, Role, RoomKey};
use parlor::node::{Events, Supervisor};
use parlor::store::Store;
use parlor::store::sqlite::SqliteStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Cluster {
    store: Arc<dyn Store>,
    committed: mpsc::UnboundedReceiver<Arc<Message>>,
    nodes: Vec<(Arc<Hub>, Arc<RedisBroker>)>,
    _dir: tempfile::TempDir,
}

async fn cluster(url: &str, nodes: usize) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let (sink, committed) = mpsc::unbounded_channel();
    let path = dir.path().join("parlor.db");
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || {
            SqliteStore::open(&path, &StoreConfig::default(), sink)
        })
        .await
        .unwrap()
        .unwrap(),
    );
    let prefix = common::redis::prefix();
    let mut list = Vec::new();
    for _ in 0..nodes {
        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
        // As a node starts: the broker, the hub with it, then the node's handler.
        let broker =
            RedisBroker::connect(url, &prefix, Duration::from_secs(30), &metrics, &supervisor)
                .await
                .expect("broker connects");
        let hub = Hub::new(Arc::clone(&store), metrics, 100, 100, &*broker, &supervisor);
        broker.register(Arc::new(Events::new(Arc::clone(&hub))));
        list.push((hub, broker));
    }
    Cluster {
        store,
        committed,
        nodes: list,
        _dir: dir,
    }
}

fn member(id: u64) -> (ConnHandle, Receiver) {
    let identity = Identity {
        user_id: format!("user-{id}"),
        name: format!("User {id}"),
        role: Role::Visitor,
        domain_id: Arc::from("demo"),
        anonymous: false,
        room: None,
        label: None,
    };
    ConnHandle::new(id, Arc::new(identity), 1024)
}

fn text(room: &RoomKey, content: &str) -> NewMessage {
    NewMessage {
        room: room.clone(),
        author: Author {
            user_id: "user-1".into(),
            name: "User 1".into(),
            role: "visitor".into(),
        },
        kind: "text".into(),
        content: content.into(),
        data: None,
        client_message_id: None,
    }
}

/// Stores a message and publishes it from `node`, as that node's dispatcher does.
async fn send(c: &mut Cluster, node: usize, room: &RoomKey, content: &str) -> Arc<Message> {
    c.store.append(text(room, content)).await.unwrap();
    let committed = c.committed.recv().await.unwrap();
    c.nodes[node].1.publish(Arc::clone(&committed));
    committed
}

/// The next stored message a member receives (skipping presence and other events).
async fn next_message(rx: &mut Receiver) -> Arc<Message> {
    loop {
        let envelope = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a delivery in time")
            .expect("queue open");
        if let Event::Message(m) = &envelope.event {
            return Arc::clone(m);
        }
    }
}

#[tokio::test]
async fn two_nodes_see_each_others_messages_in_order_and_room_events() {
    let Some(url) = common::redis::test_url() else {
        return;
    };
    let mut c = cluster(&url, 2).await;
    let room = RoomKey::new("demo", "shared");
    let (conn_a, mut rx_a) = member(1);
    let (conn_b, mut rx_b) = member(2);
    c.nodes[0]
        .0
        .join(&room, &conn_a, Replay::Last(0), 100)
        .await
        .unwrap();
    c.nodes[1]
        .0
        .join(&room, &conn_b, Replay::Last(0), 100)
        .await
        .unwrap();
    for i in 0..50 {
        // Alternate the publishing node: each message is stored once, with the next seq.
        send(&mut c, i % 2, &room, &format!("m{i}")).await;
    }
    for rx in [&mut rx_a, &mut rx_b] {
        for want in 1..=50u64 {
            let m = next_message(rx).await;
            assert_eq!(m.seq, want);
            assert_eq!(m.content, format!("m{}", want - 1));
        }
    }
    // A room event on node A reaches the member on node B, once.
    c.nodes[0].0.broadcast(
        &room,
        Event::Typing {
            room: room.clone(),
            user: PresentUser {
                user_id: "user-1".into(),
                name: "User 1".into(),
                role: Role::Visitor,
                info: None,
            },
            typing: true,
        },
        Some(conn_a.id()),
    );
    let typing = loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx_b.recv())
            .await
            .expect("typing in time")
            .unwrap();
        if let Event::Typing { user, typing, .. } = &e.event {
            break (user.user_id.clone(), *typing);
        }
    };
    assert_eq!(typing, ("user-1".to_owned(), true));
    for (_, broker) in &c.nodes {
        assert!(broker.healthy());
        broker.close().await;
    }
}

#[tokio::test]
async fn after_redis_restarts_the_nodes_catch_up_from_the_store() {
    if common::redis::test_url().is_none() {
        return;
    }
    let mut redis = OwnRedis::start();
    let url = redis.url();
    let mut c = cluster(&url, 2).await;
    let room = RoomKey::new("demo", "through-a-restart");
    let (conn_b, mut rx_b) = member(2);
    c.nodes[1]
        .0
        .join(&room, &conn_b, Replay::Last(0), 100)
        .await
        .unwrap();
    send(&mut c, 0, &room, "before").await;
    assert_eq!(next_message(&mut rx_b).await.seq, 1);

    redis.kill();
    // Published while Redis is down: lost on the bus, kept by the store.
    for i in 0..5 {
        send(&mut c, 0, &room, &format!("during-{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    // Node B reconnects, re-subscribes, and catches the room up, in order, once each.
    for want in 2..=6u64 {
        let m = next_message(&mut rx_b).await;
        assert_eq!(m.seq, want, "{}", m.content);
    }
    // And live delivery works again.
    let mut live = None;
    for _ in 0..50 {
        send(&mut c, 0, &room, "after").await;
        live = Some(next_message(&mut rx_b).await);
        if live.as_ref().is_some_and(|m| m.content == "after") {
            break;
        }
    }
    let live = live.unwrap();
    assert_eq!(live.content, "after");
    assert_eq!(live.seq, 7, "nothing delivered twice or skipped");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx_b.recv())
            .await
            .is_err(),
        "no duplicate after the catch-up"
    );
}

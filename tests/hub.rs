//! The hub's own guarantees, driven directly on a real SQLite store: a room's members get its
//! messages in `seq` order with no gap and no duplicate whatever order (and however
//! incomplete) the deliveries come in; a gap is read from the store and never skipped; a
//! room whose last message was lost is caught up by the position check; and a gap the store
//! cannot fill sends the members back to reconnect instead of skipping ahead.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use parlor::broker::memory::MemoryBroker;
use parlor::config::StoreConfig;
use parlor::hub::{Check, ConnHandle, Cursor, Event, Hub, Kick, Receiver, Replay};
use parlor::metrics::Metrics;
use parlor::model::{Author, Identity, Message, NewMessage, Role, RoomKey};
use parlor::node::Supervisor;
use parlor::store::Store;
use parlor::store::sqlite::SqliteStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A hub on a fresh SQLite store (whose commits nobody delivers: the test does).
struct Fixture {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (sink, _) = mpsc::unbounded_channel();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("parlor.db"), &StoreConfig::default(), sink)
                .unwrap(),
        );
        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
        let hub = Hub::new(
            Arc::clone(&store),
            Arc::clone(&metrics),
            128,
            100,
            &MemoryBroker::new(),
            &supervisor,
        );
        Self {
            store,
            hub,
            metrics,
            _dir: dir,
        }
    }

    /// Stores `n` messages in `room` and returns them (not delivered).
    async fn append(&self, room: &RoomKey, n: usize) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        for i in 0..n {
            let appended = self
                .store
                .append(NewMessage {
                    room: room.clone(),
                    author: Author {
                        user_id: "writer".into(),
                        name: "Writer".into(),
                        role: "visitor".into(),
                    },
                    kind: "text".into(),
                    content: format!("m{i}"),
                    data: None,
                    client_message_id: None,
                })
                .await
                .unwrap();
            out.push(appended.message);
        }
        out
    }

    /// A member of `room` that joined before anything was written. Its queue holds more
    /// than any test sends, so a reader the scheduler runs late is never a slow consumer
    /// (that case is the WebSocket tests' to check).
    async fn member(&self, room: &RoomKey, id: u64) -> (ConnHandle, Receiver) {
        let identity = Arc::new(Identity {
            user_id: format!("reader-{id}"),
            name: "Reader".into(),
            role: Role::Visitor,
            domain_id: Arc::from("demo"),
            anonymous: false,
            room: None,
            label: None,
        });
        let (conn, rx) = ConnHandle::new(id, identity, 8192);
        self.store.ensure_room(room, None).await.unwrap();
        let joined = self
            .hub
            .join(room, &conn, Replay::Last(50), 1000)
            .await
            .unwrap();
        assert_eq!(joined.last_seq, 0);
        (conn, rx)
    }

    fn counter(&self, name: &str, filter: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The `seq`s of the messages in `rx` until `upto` (waiting up to `within`).
async fn seqs_until(rx: &mut Receiver, upto: u64, within: Duration) -> Vec<u64> {
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while seqs.last().is_none_or(|s| *s < upto) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(envelope)) => {
                if let Event::Message(m) = &envelope.event {
                    seqs.push(m.seq);
                }
            }
            _ => break,
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_missing_deliveries_reach_members_in_order_once() {
    let f = Fixture::new();
    let room = RoomKey::new("demo", "shuffled");
    let (_conn, mut rx) = f.member(&room, 1).await;
    let stored = f.append(&room, 8).await;
    // 2 and 6 never come from the broker; 5 comes twice; 1 comes again at the end.
    for i in [0, 2, 4, 3, 4, 7, 0] {
        f.hub.deliver(Arc::clone(&stored[i]));
    }
    let seqs = seqs_until(&mut rx, 8, Duration::from_secs(5)).await;
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    assert!(f.counter("parlor_stream_gaps_total", "node") >= 1.0);
    assert!(f.counter("parlor_stream_filled_total", "node") >= 2.0);
    // Nothing more comes.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_last_message_was_lost_is_caught_up_by_the_position_check() {
    let f = Fixture::new();
    let room = RoomKey::new("demo", "tail");
    let quiet = RoomKey::new("demo", "quiet");
    let (_conn, mut rx) = f.member(&room, 1).await;
    let (_other, mut quiet_rx) = f.member(&quiet, 2).await;
    let stored = f.append(&room, 3).await;
    f.hub.deliver(Arc::clone(&stored[0]));
    f.hub.deliver(Arc::clone(&stored[1]));
    assert_eq!(seqs_until(&mut rx, 2, Duration::from_secs(5)).await, [1, 2]);
    // Seq 3 is lost. The first check only notes the store's last seq: a message committed
    // a moment ago may still be on its way.
    assert_eq!(f.hub.check_positions(Check::Lost).await.unwrap(), 0);
    // Still behind at the next check: lost, and read from the store.
    assert_eq!(f.hub.check_positions(Check::Lost).await.unwrap(), 1);
    assert_eq!(seqs_until(&mut rx, 3, Duration::from_secs(5)).await, [3]);
    assert_eq!(f.counter("parlor_stream_tail_repairs_total", ""), 1.0);
    // Caught up: nothing more to do, and the late delivery of seq 3 is dropped.
    f.hub.deliver(Arc::clone(&stored[2]));
    assert_eq!(f.hub.check_positions(Check::Lost).await.unwrap(), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err()
    );
    // After a reconnect everything behind the store is caught up at once.
    let more = f.append(&quiet, 2).await;
    assert_eq!(more.len(), 2);
    assert_eq!(f.hub.check_positions(Check::All).await.unwrap(), 1);
    assert_eq!(
        seqs_until(&mut quiet_rx, 2, Duration::from_secs(5)).await,
        [1, 2]
    );
}

#[tokio::test(start_paused = true)]
async fn a_gap_the_store_cannot_fill_is_never_skipped() {
    let f = Fixture::new();
    let room = RoomKey::new("demo", "hole");
    let (conn, mut rx) = f.member(&room, 1).await;
    let stored = f.append(&room, 1).await;
    f.hub.deliver(Arc::clone(&stored[0]));
    // A message the store does not have (a store that lost data, say) announces seq 3.
    let mut phantom = (*stored[0]).clone();
    phantom.seq = 3;
    phantom.id = "phantom".into();
    f.hub.deliver(Arc::new(phantom));
    assert_eq!(seqs_until(&mut rx, 1, Duration::from_secs(1)).await, [1]);
    // The hub asks the store again and again, then gives up on the room: its members are
    // told to reconnect (close 4009) and seq 3 is never delivered past the hole.
    tokio::time::timeout(Duration::from_secs(60), conn.kicked())
        .await
        .expect("the member is kicked");
    assert_eq!(conn.kicked_for(), Some(Kick::Resync));
    assert!(rx.try_recv().is_none(), "nothing after the hole");
    assert!(
        !f.hub.is_active(&room),
        "the room starts over on the next join"
    );
    assert_eq!(f.counter("parlor_stream_resyncs_total", "node"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_between_reads_the_cache_or_the_store_and_a_rejoin_only_what_was_never_sent() {
    let f = Fixture::new();
    let room = RoomKey::new("demo", "between");
    let stored = f.append(&room, 300).await;
    // Nobody is in the room: from the store.
    let seqs = |page: Vec<Arc<Message>>| page.iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(f.hub.messages_between(&room, 10, 14).await.unwrap()),
        [11, 12, 13, 14]
    );
    assert!(
        f.hub
            .messages_between(&room, 14, 14)
            .await
            .unwrap()
            .is_empty()
    );
    // A member: the cache holds the last 128.
    let identity = Arc::new(Identity {
        user_id: "late".into(),
        name: "Late".into(),
        role: Role::Visitor,
        domain_id: Arc::from("demo"),
        anonymous: false,
        room: None,
        label: None,
    });
    let (conn, _rx) = ConnHandle::new(9, identity, 1024);
    let joined = f
        .hub
        .join(&room, &conn, Replay::Last(50), 1000)
        .await
        .unwrap();
    assert_eq!(joined.last_seq, 300);
    assert_eq!(joined.history.first().unwrap().seq, 251);
    assert_eq!(
        seqs(f.hub.messages_between(&room, 280, 283).await.unwrap()),
        [281, 282, 283]
    );
    assert_eq!(
        seqs(f.hub.messages_between(&room, 100, 103).await.unwrap()),
        [101, 102, 103]
    );
    // The connection was sent 251..=300. Rejoining without `since` replays nothing; with
    // `since` only the older part it was never sent, and its position stays.
    let cursor = Cursor::of(&joined);
    assert_eq!(
        cursor,
        Cursor {
            from: 250,
            upto: 300
        }
    );
    let again = |since| Replay::Again { cursor, since };
    let plain = f.hub.join(&room, &conn, again(None), 1000).await.unwrap();
    assert!(plain.history.is_empty());
    assert_eq!(plain.last_seq, 300);
    let older = f
        .hub
        .join(&room, &conn, again(Some(240)), 1000)
        .await
        .unwrap();
    assert_eq!(seqs(older.history.clone()), (241..=250).collect::<Vec<_>>());
    assert_eq!(older.last_seq, 300);
    assert_eq!(
        cursor.rejoined(&older),
        Cursor {
            from: 240,
            upto: 300
        }
    );
    let capped = f.hub.join(&room, &conn, again(Some(0)), 100).await.unwrap();
    assert_eq!(
        seqs(capped.history.clone()),
        (151..=250).collect::<Vec<_>>()
    );
    assert!(capped.truncated);
    assert_eq!(stored.len(), 300);
}

#[tokio::test(flavor = "current_thread")]
async fn what_a_room_holds_back_behind_a_gap_is_bounded_and_nothing_is_lost() {
    let f = Fixture::new();
    let room = RoomKey::new("demo", "flooded");
    let (_conn, mut rx) = f.member(&room, 1).await;
    let stored = f.append(&room, 5000).await;
    // Everything but the first, newest first, with no chance for the fill to run between
    // deliveries (one thread): all of it would wait behind the gap.
    for m in stored.iter().skip(1).rev() {
        f.hub.deliver(Arc::clone(m));
    }
    let held = f.hub.held(&room);
    assert!(held <= 4096, "{held} messages held back");
    let seqs = seqs_until(&mut rx, 5000, Duration::from_secs(30)).await;
    assert_eq!(seqs, (1..=5000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "current_thread")]
async fn catch_ups_asked_for_at_once_run_one_at_a_time() {
    let f = Fixture::new();
    let room = RoomKey::new("demo", "reconnecting");
    let (_conn, _rx) = f.member(&room, 1).await;
    // A broker that reconnects 50 times in a burst.
    for _ in 0..50 {
        f.hub.resync();
    }
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reads = f.counter("parlor_store_latency_seconds_count", "last_seqs");
    assert!((1.0..=2.0).contains(&reads), "{reads} catch-ups ran");
    // A later one still runs.
    f.hub.resync();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let more = f.counter("parlor_store_latency_seconds_count", "last_seqs");
    assert_eq!(more, reads + 1.0);
}

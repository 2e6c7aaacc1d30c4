//! SQLite schema upgrades: a database written by an older Parlor opens in this one with every
//! message, `seq` and idempotency key intact.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;

use parlor::config::StoreConfig;
use parlor::model::{Author, NewMessage, RoomKey};
use parlor::store::Store;
use parlor::store::sqlite::SqliteStore;
use parlor::store::stats::Stats;
use rusqlite::{Connection, params};
use tokio::sync::mpsc;

/// The schema of the first Parlor release, exactly as it shipped.
const V1: &str = include_str!("../src/store/migrations/sqlite/0001_init.sql");

/// Writes a version-1 database: room `a` with three messages (the second one keyed), room
/// `a` of another domain with one, and a message whose room row is missing.
fn write_v1(path: &std::path::Path) {
    let conn = Connection::open(path).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.execute_batch(V1).expect("schema v1");
    conn.pragma_update(None, "user_version", 1)
        .expect("version");
    for (domain, room) in [("demo", "a"), ("other", "a")] {
        conn.execute(
            "INSERT INTO rooms (domain_id, id, kind, created_by, created_at, updated_at)
             VALUES (?1, ?2, 'support', 'u1', 1000, 1000)",
            params![domain, room],
        )
        .expect("room");
    }
    let rows = [
        ("demo", "a", 1, None, "one"),
        ("demo", "a", 2, Some("k-2"), "two"),
        ("demo", "a", 3, None, "three"),
        ("other", "a", 1, None, "elsewhere"),
        ("demo", "orphan", 1, Some("k-o"), "no room row"),
    ];
    for (domain, room, seq, cmid, content) in rows {
        conn.execute(
            "INSERT INTO messages (domain_id, room_id, seq, id, author_id, author_name,
               author_role, kind, content, data, client_message_id, created_at)
             VALUES (?1, ?2, ?3, ?4, 'u1', 'User One', 'visitor', 'text', ?5, ?6, ?7, ?8)",
            params![
                domain,
                room,
                seq,
                format!("{domain}-{room}-{seq}"),
                content,
                (seq == 2).then_some(r#"{"x":1}"#),
                cmid,
                1000 + seq
            ],
        )
        .expect("message");
    }
}

fn keyed(key: &RoomKey, content: &str, cmid: &str) -> NewMessage {
    NewMessage {
        room: key.clone(),
        author: Author {
            user_id: "u1".into(),
            name: "User One".into(),
            role: "visitor".into(),
        },
        kind: "text".into(),
        content: content.into(),
        data: None,
        client_message_id: Some(cmid.into()),
    }
}

#[tokio::test]
async fn version_1_database_upgrades_without_losing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.db");
    write_v1(&path);

    let (sink, _committed) = mpsc::unbounded_channel();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&path, &StoreConfig::default(), sink).expect("open v1 db"));

    let demo = RoomKey::new("demo", "a");
    let page = store.messages_after(&demo, 0, 10).await.expect("after");
    let got: Vec<(u64, &str)> = page.iter().map(|m| (m.seq, m.content.as_str())).collect();
    assert_eq!(got, [(1, "one"), (2, "two"), (3, "three")]);
    assert_eq!(page[1].id, "demo-a-2");
    assert_eq!(page[1].client_message_id.as_deref(), Some("k-2"));
    assert_eq!(page[1].data, Some(serde_json::json!({"x": 1})));
    assert_eq!(page[1].author.name, "User One");
    assert_eq!(page[0].room, demo);

    let other = RoomKey::new("other", "a");
    let page = store.messages_after(&other, 0, 10).await.expect("after");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].content, "elsewhere");

    // A message whose room row was missing keeps its room, which now exists.
    let orphan = RoomKey::new("demo", "orphan");
    let room = store
        .room(&orphan)
        .await
        .expect("room")
        .expect("room created");
    assert_eq!(room.last_seq, 1);

    // Sequences continue where they stopped, and old idempotency keys still hold.
    let next = store
        .append(keyed(&demo, "four", "k-4"))
        .await
        .expect("append");
    assert_eq!((next.message.seq, next.duplicate), (4, false));
    let again = store
        .append(keyed(&demo, "two again", "k-2"))
        .await
        .expect("append");
    assert!(again.duplicate, "a version-1 key must still deduplicate");
    assert_eq!(
        (again.message.seq, again.message.content.as_str()),
        (2, "two")
    );
    let again = store
        .append(keyed(&orphan, "x", "k-o"))
        .await
        .expect("append");
    assert!(again.duplicate);
    assert_eq!(again.message.content, "no room row");

    let page = store.messages_before(&demo, 100, 2).await.expect("before");
    let seqs: Vec<u64> = page.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [3, 4]);
    store.close().await;

    // The upgrade ran once: reopening finds version 2 and changes nothing.
    let (sink, _committed) = mpsc::unbounded_channel();
    let store = SqliteStore::open(&path, &StoreConfig::default(), sink).expect("reopen");
    assert_eq!(
        store
            .messages_after(&demo, 0, 10)
            .await
            .expect("after")
            .len(),
        4
    );
    store.close().await;
    let conn = Connection::open(&path).expect("open");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 13);
}

/// The first five migrations, as the runner of earlier Parlor releases applied them: each in
/// a transaction of its own that also sets `PRAGMA user_version` to its number.
fn migrate_by_hand(conn: &mut Connection, migrations: &[&str]) {
    for (i, sql) in migrations.iter().enumerate() {
        let tx = conn.transaction().expect("begin");
        tx.execute_batch(sql).expect("migration");
        tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap())
            .expect("version");
        tx.commit().expect("commit");
    }
}

const V1_TO_V5: [&str; 5] = [
    V1,
    include_str!("../src/store/migrations/sqlite/0002_compact_room_keys.sql"),
    include_str!("../src/store/migrations/sqlite/0003_domain_admin.sql"),
    include_str!("../src/store/migrations/sqlite/0004_ai.sql"),
    include_str!("../src/store/migrations/sqlite/0005_handoff.sql"),
];

fn user_version(path: &std::path::Path) -> i64 {
    Connection::open(path)
        .expect("open")
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version")
}

#[tokio::test]
async fn a_version_5_database_of_the_earlier_runner_upgrades_to_the_latest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v5.db");
    {
        let mut conn = Connection::open(&path).expect("open");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        migrate_by_hand(&mut conn, &V1_TO_V5);
        conn.execute(
            "INSERT INTO rooms (domain_id, id, kind, created_by, created_at, updated_at)
             VALUES ('demo', 'a', 'support', 'u1', 1000, 1000)",
            [],
        )
        .expect("room");
        for seq in 1..=2 {
            conn.execute(
                "INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind,
                   content, client_message_id, created_at)
                 VALUES (1, ?1, ?2, 'u1', 'User One', 'visitor', 'text', ?3, ?4, 1000)",
                params![
                    seq,
                    format!("m{seq}"),
                    format!("hello {seq}"),
                    format!("k-{seq}")
                ],
            )
            .expect("message");
        }
        conn.execute(
            "INSERT INTO conversations (room, domain_id, status, waiting_since, updated_at,
               version, status_seq)
             VALUES (1, 'demo', 'waiting', 1500, 1500, 1, 2)",
            [],
        )
        .expect("conversation");
    }
    assert_eq!(user_version(&path), 5);

    let (sink, _committed) = mpsc::unbounded_channel();
    let store = SqliteStore::open(&path, &StoreConfig::default(), sink).expect("open v5 db");
    let key = RoomKey::new("demo", "a");
    let page = store.messages_after(&key, 0, 10).await.expect("after");
    let got: Vec<(u64, &str, &str)> = page
        .iter()
        .map(|m| (m.seq, m.id.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(got, [(1, "m1", "hello 1"), (2, "m2", "hello 2")]);
    let conversation = store
        .conversation(&key)
        .await
        .expect("conversation")
        .expect("stored");
    assert_eq!(conversation.status.as_str(), "waiting");
    assert_eq!((conversation.version, conversation.status_seq), (1, 2));
    let next = store
        .append(keyed(&key, "three", "k-3"))
        .await
        .expect("append");
    assert_eq!((next.message.seq, next.duplicate), (3, false));
    let again = store
        .append(keyed(&key, "one again", "k-1"))
        .await
        .expect("append");
    assert!(again.duplicate, "an old key still deduplicates");
    // The statistics count the history stored before them once (`0011_stats.sql`), and
    // what is written after it as it is written.
    let counted: Vec<(i64, String, i64)> = store
        .activity(
            "demo",
            chrono::DateTime::from_timestamp_millis(0).unwrap(),
            chrono::Utc::now() + chrono::Duration::hours(1),
        )
        .await
        .expect("activity")
        .into_iter()
        .map(|a| (a.at.timestamp_millis(), a.metric, a.n))
        .collect();
    assert_eq!(
        counted[..2],
        [
            (0, "conversations".to_owned(), 1),
            (0, "messages.visitor".to_owned(), 2)
        ],
        "{counted:?}"
    );
    assert_eq!(counted.len(), 3, "{counted:?}");
    assert_eq!(
        (counted[2].1.as_str(), counted[2].2),
        ("messages.visitor", 1)
    );
    store.close().await;

    // Migrations 6 to 13 ran: their tables exist, and the count is the latest.
    assert_eq!(user_version(&path), 13);
    let conn = Connection::open(&path).expect("open");
    for table in [
        "accounts",
        "customers",
        "guided_sessions",
        "leases",
        "notifications",
        "visitors",
        "activity_hours",
        "first_responses",
        "files",
        "webhook_outbox",
    ] {
        let found: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .expect("schema");
        assert_eq!(found, 1, "table {table}");
    }
}

#[tokio::test]
async fn a_database_of_a_newer_parlor_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("newer.db");
    let (sink, _committed) = mpsc::unbounded_channel();
    let store = SqliteStore::open(&path, &StoreConfig::default(), sink).expect("create");
    store
        .append(keyed(&RoomKey::new("demo", "a"), "kept", "k-1"))
        .await
        .expect("append");
    store.close().await;
    // A later release added a fourteenth migration.
    Connection::open(&path)
        .expect("open")
        .pragma_update(None, "user_version", 14)
        .expect("version");

    let (sink, _committed) = mpsc::unbounded_channel();
    let refused = SqliteStore::open(&path, &StoreConfig::default(), sink).expect_err("refused");
    let message = refused.to_string();
    assert!(
        message.contains("database schema version 14 is newer than this Parlor (13)"),
        "{message}"
    );
    assert_eq!(user_version(&path), 14);
    let kept: String = Connection::open(&path)
        .expect("open")
        .query_row("SELECT content FROM messages", [], |r| r.get(0))
        .expect("message");
    assert_eq!(kept, "kept");
}

//! PostgreSQL schema upgrades: a database migrated by the runner of earlier Parlor releases
//! (versions in `parlor_schema_migrations`) is adopted by sqlx's migrator with its data
//! intact, and a database of a newer Parlor is refused.
//!
//! Needs `PARLOR_TEST_DATABASE_URL`; each test makes a database of its own and drops it. The
//! tests pass without running when the variable is unset.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use parlor::config::StoreConfig;
use parlor::model::{Author, NewMessage, RoomKey};
use parlor::store::postgres::{PostgresStore, ScratchDatabase};
use parlor::store::{CustomerProfile, Store};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::mpsc;

/// The migrations of the earlier runner, which numbered them from 1 in this order.
const OLD_MIGRATIONS: [&str; 4] = [
    include_str!("../src/store/migrations/postgres/0001_init.sql"),
    include_str!("../src/store/migrations/postgres/0002_accounts.sql"),
    include_str!("../src/store/migrations/postgres/0003_customer_context.sql"),
    include_str!("../src/store/migrations/postgres/0004_guided.sql"),
];

/// A database of the test's own, dropped (with any connection left to it) at the end.
struct Database(ScratchDatabase);

impl Database {
    async fn create() -> Option<Self> {
        ScratchDatabase::from_env("parlor_m", "the PostgreSQL migration tests")
            .await
            .expect("create the test database")
            .map(Self)
    }

    async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.0.url()).await.expect("connect")
    }

    async fn open(&self) -> Result<PostgresStore, parlor::store::StoreError> {
        let (sink, _committed) = mpsc::unbounded_channel();
        PostgresStore::open(&self.0.url(), &StoreConfig::default(), sink).await
    }
}

/// Migrates `conn` to `version` as the earlier runner did: its bookkeeping table, then each
/// migration with its row, in a transaction of its own.
async fn migrate_the_old_way(conn: &mut PgConnection, version: usize) {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS parlor_schema_migrations (
             version     BIGINT PRIMARY KEY,
             applied_at  BIGINT NOT NULL
         )",
    )
    .await
    .expect("bookkeeping table");
    for (i, sql) in OLD_MIGRATIONS.iter().enumerate().take(version) {
        let mut tx = conn.begin().await.expect("begin");
        tx.execute(*sql).await.expect("migration");
        sqlx::query("INSERT INTO parlor_schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(i64::try_from(i + 1).unwrap())
            .bind(1_700_000_000_000_i64)
            .execute(&mut *tx)
            .await
            .expect("record");
        tx.commit().await.expect("commit");
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

async fn sqlx_versions(conn: &mut PgConnection) -> Vec<(i64, bool)> {
    sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
        .fetch_all(&mut *conn)
        .await
        .expect("versions")
}

async fn has_table(conn: &mut PgConnection, table: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&mut *conn)
        .await
        .expect("to_regclass")
}

#[tokio::test]
async fn a_version_2_database_of_the_earlier_runner_is_adopted_and_upgraded() {
    let Some(db) = Database::create().await else {
        return;
    };
    let mut conn = db.connect().await;
    migrate_the_old_way(&mut conn, 2).await;
    conn.execute(
        "INSERT INTO rooms (domain_id, id, kind, created_by, created_at, updated_at, last_seq)
         VALUES ('demo', 'a', 'support', 'u1', 1000, 1000, 2);
         INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind,
           content, client_message_id, created_at)
         SELECT rid, 1, 'm1', 'u1', 'User One', 'visitor', 'text', 'hello 1', 'k-1', 1000
         FROM rooms;
         INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind,
           content, client_message_id, created_at)
         SELECT rid, 2, 'm2', 'u1', 'User One', 'visitor', 'text', 'hello 2', 'k-2', 1001
         FROM rooms;
         INSERT INTO customers (domain_id, user_id, name, created_at, updated_at)
         VALUES ('demo', 'u1', 'User One', 1000, 1000);",
    )
    .await
    .expect("data");

    let store = db.open().await.expect("open the old database");
    let key = RoomKey::new("demo", "a");
    let page = store.messages_after(&key, 0, 10).await.expect("after");
    let got: Vec<(u64, &str, &str)> = page
        .iter()
        .map(|m| (m.seq, m.id.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(got, [(1, "m1", "hello 1"), (2, "m2", "hello 2")]);
    let next = store
        .append(keyed(&key, "three", "k-3"))
        .await
        .expect("append");
    assert_eq!((next.message.seq, next.duplicate), (3, false));
    let again = store
        .append(keyed(&key, "two again", "k-2"))
        .await
        .expect("append");
    assert!(again.duplicate, "an old key still deduplicates");
    // Migration 3 ran: customers have a context.
    store
        .upsert_customer(
            "demo",
            "u1",
            CustomerProfile {
                context: Some(serde_json::json!({"page": "/pricing"})),
                ..CustomerProfile::default()
            },
        )
        .await
        .expect("upsert");
    let customer = store
        .customer("demo", "u1")
        .await
        .expect("customer")
        .expect("stored");
    assert_eq!(customer.name.as_deref(), Some("User One"));
    assert_eq!(
        customer.context,
        Some(serde_json::json!({"page": "/pricing"}))
    );
    store.close().await;

    // The versions moved to sqlx's table (1 and 2 adopted, the others applied); the old table
    // is gone.
    assert_eq!(
        sqlx_versions(&mut conn).await,
        [
            (1, true),
            (2, true),
            (3, true),
            (4, true),
            (5, true),
            (6, true),
            (7, true),
            (8, true),
            (9, true)
        ]
    );
    let untimed: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE execution_time = -1 ORDER BY version",
    )
    .fetch_all(&mut conn)
    .await
    .expect("adopted");
    assert_eq!(untimed, [1, 2]);
    assert!(!has_table(&mut conn, "parlor_schema_migrations").await);
    assert!(has_table(&mut conn, "guided_sessions").await);

    // The adopted checksums are the files': sqlx checks them at every start.
    let store = db.open().await.expect("reopen");
    assert_eq!(
        store
            .messages_after(&key, 0, 10)
            .await
            .expect("after")
            .len(),
        3
    );
    store.close().await;
    conn.close().await.ok();
}

#[tokio::test]
async fn a_fully_migrated_database_of_the_earlier_runner_opens_as_it_is() {
    let Some(db) = Database::create().await else {
        return;
    };
    let mut conn = db.connect().await;
    migrate_the_old_way(&mut conn, 4).await;
    let store = db.open().await.expect("open");
    store.close().await;
    let untimed: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE execution_time = -1")
            .fetch_one(&mut conn)
            .await
            .expect("adopted");
    assert_eq!(untimed, 4, "every version adopted, none run again");
    assert!(!has_table(&mut conn, "parlor_schema_migrations").await);
    conn.close().await.ok();
}

#[tokio::test]
async fn a_database_of_a_newer_parlor_is_refused_untouched() {
    let Some(db) = Database::create().await else {
        return;
    };
    let mut conn = db.connect().await;
    // Recorded by sqlx's migrator of a later release.
    db.open().await.expect("create").close().await;
    conn.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (10, 'later', TRUE, '\\x00', 1)",
    )
    .await
    .expect("a later version");
    let refused = db.open().await.expect_err("refused").to_string();
    assert!(
        refused.contains("database schema version 10 is newer than this Parlor (9)"),
        "{refused}"
    );
    assert_eq!(sqlx_versions(&mut conn).await.len(), 10);
    conn.close().await.ok();
}

#[tokio::test]
async fn a_database_of_a_newer_earlier_runner_is_refused_untouched() {
    let Some(db) = Database::create().await else {
        return;
    };
    let mut conn = db.connect().await;
    migrate_the_old_way(&mut conn, 4).await;
    conn.execute("INSERT INTO parlor_schema_migrations (version, applied_at) VALUES (10, 0)")
        .await
        .expect("a later version");
    let refused = db.open().await.expect_err("refused").to_string();
    assert!(
        refused.contains("database schema version 10 is newer than this Parlor (9)"),
        "{refused}"
    );
    assert!(has_table(&mut conn, "parlor_schema_migrations").await);
    assert!(!has_table(&mut conn, "_sqlx_migrations").await);
    conn.close().await.ok();
}

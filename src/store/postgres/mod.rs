//! PostgreSQL implementation of [`Store`], for several Parlor nodes sharing one database.
//!
//! Everything the store decides is decided inside PostgreSQL transactions, so it holds
//! across processes:
//!
//! - **`seq`**: each room's row carries its `last_seq`. Every write to a room first locks
//!   that row (`SELECT … FOR NO KEY UPDATE`, or the `INSERT` creating it), and an append
//!   raises `last_seq` and inserts the message with the new value in one statement. The lock
//!   is held until `COMMIT`, so two nodes appending to one room are serialised by the
//!   database and the room stays gapless. No counter lives in memory between transactions.
//! - **Idempotency**: a unique index on `(room, author_id, client_message_id)`; the insert
//!   says `ON CONFLICT DO NOTHING`, and when it inserted nothing the stored original is read
//!   back (`duplicate: true`; the counter is raised only with an inserted row, so a duplicate
//!   consumes no `seq`).
//! - **Hand-off transitions**: `decide` runs after the room's row is locked, on the stored
//!   conversation, and its result is written with its system message in that transaction.
//!
//! **Group commit**: as in the SQLite store, writes travel to one writer task per store (per
//! node), which takes what is queued (up to `store.max_batch`), runs it in one transaction on
//! one pooled connection, and answers the callers only after `COMMIT`, having first handed
//! the new messages to the [`CommitSink`] in commit order. If the transaction fails because
//! of one statement, it is rolled back and every operation is retried in a transaction of its
//! own, so one bad write cannot fail its neighbours. If the database itself is unreachable
//! the whole batch fails at once (retrying each operation would only multiply the wait).
//!
//! **Lock order**: before a batch runs, its operations are put in a fixed order: room
//! operations by `(domain_id, room_id)`, then customer profiles by `(domain_id, user_id)`,
//! then domain changes and usage records in arrival order (a stable sort). Every
//! transaction of every node therefore takes its room locks in the same order, and every
//! other row a room operation writes (messages, read states, conversations, notes) is only
//! written under its room's lock, so two nodes' batches cannot deadlock on each other. The
//! operations of one batch were all in flight at once (none had been answered), so any
//! order among them is one their callers could have seen. Should the database still report
//! a deadlock (two admin changes, say), the batch is retried operation by operation.
//!
//! **Timeouts**: a connection is waited for at most [`ACQUIRE_TIMEOUT`], a statement runs at
//! most [`STATEMENT_TIMEOUT`] (PostgreSQL's `statement_timeout`), and a whole transaction or
//! read at most [`DEADLINE`] on the client side, so while PostgreSQL is down sends fail with
//! [`StoreError::Unavailable`] instead of hanging, and the pool reconnects by itself when it
//! is back. A transaction left idle by a vanished node is ended by the server after
//! [`IDLE_IN_TRANSACTION`], which frees its room locks.

mod accounts;
mod guided;

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, CommitSink, ConversationColumns, Customer, CustomerProfile, Decide, DomainChange,
    DomainKey, InboxEntry, InboxQuery, KeyKind, MAX_DATA_DEPTH, NewNote, Store, StoreError,
    StoredDomain, Transitioned, UsageGroup, UsageGrouping, UsageRecord,
};
use crate::config::StoreConfig;
use crate::model::{
    Agent, Author, Conversation, Message, NewMessage, Note, Room, RoomKey, json_depth, now_ms,
};

/// Schema migrations, applied in order; the table `parlor_schema_migrations` records which
/// ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_init.sql"),
    include_str!("../migrations/postgres/0002_accounts.sql"),
    include_str!("../migrations/postgres/0003_customer_context.sql"),
    include_str!("../migrations/postgres/0004_guided.sql"),
];

/// Key of the advisory lock held while migrating, so nodes starting together migrate one
/// after the other ("parlor_m").
const MIGRATION_LOCK: i64 = 0x7061_726c_6f72_5f6d;

/// Longest wait for a pooled connection (this includes connecting).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest a single statement may run, lock waits included (PostgreSQL's
/// `statement_timeout`).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a whole write transaction or a read may take, measured by Parlor: it also covers
/// a server that stopped answering without closing the connection.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// How long the server lets a transaction sit idle before ending it (and its locks).
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(15);

/// Longest `health` waits for `SELECT 1`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Column list matching [`message_at`], for `FROM messages m JOIN rooms r`.
macro_rules! message_columns {
    () => {
        "r.domain_id, r.id, m.seq, m.id, m.author_id, m.author_name, m.author_role, \
         m.kind, m.content, m.data, m.client_message_id, m.created_at"
    };
}

/// Messages with their room's public key.
macro_rules! messages_join {
    () => {
        " FROM messages m JOIN rooms r ON r.rid = m.room "
    };
}

/// Columns matching [`conversation_at`] (table alias `c`).
macro_rules! conversation_columns {
    () => {
        "c.status, c.assignee_id, c.assignee_name, c.waiting_since, c.assigned_at, \
         c.first_response_at, c.resolved_at, c.updated_at, c.version, c.status_seq"
    };
}

/// The columns of a room row as [`LockedRoom::from_row`] reads them.
macro_rules! room_columns {
    () => {
        "rid, kind, created_by, created_at, last_seq"
    };
}

/// The PostgreSQL store.
pub struct PostgresStore {
    /// Queue to the writer task; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<Pending>>>,
    /// The writer task, awaited on close.
    writer_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Connections for reads (and, through the writer, for writes).
    pool: PgPool,
    /// `host:port/database`, for logs (never the password).
    target: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// One write for the writer task.
enum Op {
    Append(NewMessage),
    EnsureRoom(RoomKey, Option<String>),
    MarkRead(RoomKey, String, u64),
    UpsertCustomer(String, String, CustomerProfile),
    Domain(DomainChange),
    Usage(UsageRecord),
    Transition(RoomKey, Option<String>, Decide),
    FirstResponse(RoomKey, DateTime<Utc>),
    AddNote(NewNote),
}

impl Op {
    /// Where the operation goes in a batch: see "Lock order" in the module documentation.
    fn order_key(&self) -> (u8, &str, &str) {
        match self {
            Op::Append(m) => (0, &m.room.domain_id, &m.room.room_id),
            Op::EnsureRoom(k, _)
            | Op::MarkRead(k, _, _)
            | Op::Transition(k, _, _)
            | Op::FirstResponse(k, _) => (0, &k.domain_id, &k.room_id),
            Op::AddNote(n) => (0, &n.room.domain_id, &n.room.room_id),
            Op::UpsertCustomer(domain, user, _) => (1, domain, user),
            Op::Domain(_) => (2, "", ""),
            Op::Usage(_) => (3, "", ""),
        }
    }
}

/// What a write produced.
enum Output {
    Appended(Appended),
    Room(Room),
    Seq(u64),
    Unit,
    Count(u64),
    Transitioned(Transitioned),
    Conversation(Option<Conversation>),
    Note(Note),
}

impl Output {
    /// The new message this output carries, if any, for the commit sink.
    fn committed(&self) -> Option<&Arc<Message>> {
        let appended = match self {
            Output::Appended(a) => Some(a),
            Output::Transitioned(t) => t.message.as_ref(),
            _ => None,
        }?;
        (!appended.duplicate).then_some(&appended.message)
    }
}

/// A queued write and where its result goes.
struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<Output, StoreError>>,
}

/// Why a transaction failed, and whether retrying its operations one by one can help.
#[derive(Debug)]
struct Failure {
    error: StoreError,
    /// True when one statement (one operation) failed; false when the database could not
    /// be reached, which no retry inside this batch would change.
    per_op: bool,
}

impl Failure {
    fn op(error: StoreError) -> Self {
        Self {
            error,
            per_op: true,
        }
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        let per_op = match &e {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // Connection exceptions, resource shortages, shutdowns and cancelled
                // (timed-out) statements concern the server, not one operation.
                !(code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code.starts_with("58"))
            }
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::RowNotFound => true,
            _ => false,
        };
        Self {
            error: store_error(e),
            per_op,
        }
    }
}

/// Maps a driver error to the store's error kinds.
fn store_error(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default().into_owned();
            let message = db.message().to_owned();
            if code.starts_with("23") {
                // Integrity constraint violation: the value clashes with a stored one.
                StoreError::Invalid(format!("conflicts with a stored value: {message}"))
            } else if code.starts_with("22") {
                // Data exception: the value cannot be stored as given.
                StoreError::Invalid(message)
            } else if code == "57014" {
                StoreError::Unavailable(format!(
                    "PostgreSQL statement timed out ({message}); the write was not stored"
                ))
            } else {
                StoreError::Unavailable(format!("PostgreSQL error {code}: {message}"))
            }
        }
        sqlx::Error::PoolTimedOut => StoreError::Unavailable(format!(
            "PostgreSQL unreachable: no connection within {} s",
            ACQUIRE_TIMEOUT.as_secs()
        )),
        sqlx::Error::PoolClosed => StoreError::Closed,
        e @ (sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }) => StoreError::Corrupt(e.to_string()),
        e @ (sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_)) => {
            StoreError::Unavailable(format!("PostgreSQL connection failed: {e}"))
        }
        e => StoreError::Unavailable(format!("PostgreSQL: {e}")),
    }
}

/// The error of an operation that outlived [`DEADLINE`].
/// Why PostgreSQL could not be used, in words: the system's reason for a connection that
/// failed ("connection refused"), or the server's message ("database \"x\" does not exist").
pub fn reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => crate::io_reason(io),
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

fn deadline_passed(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "PostgreSQL did not answer {what} within {} s",
        DEADLINE.as_secs()
    ))
}

fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A JSON document stored as text, decoded.
fn json_column(row: &PgRow, i: usize) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let text: Option<String> = row.try_get(i)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| sqlx::Error::ColumnDecode {
            index: i.to_string(),
            source: Box::new(e),
        })
    })
    .transpose()
}

/// A message from the [`message_columns`] starting at column `at`.
fn message_at(row: &PgRow, at: usize) -> Result<Message, sqlx::Error> {
    let domain: String = row.try_get(at)?;
    let room: String = row.try_get(at + 1)?;
    let seq: i64 = row.try_get(at + 2)?;
    Ok(Message {
        room: RoomKey::new(domain, room),
        seq: count(seq),
        id: row.try_get(at + 3)?,
        author: Author {
            user_id: row.try_get(at + 4)?,
            name: row.try_get(at + 5)?,
            role: row.try_get(at + 6)?,
        },
        kind: row.try_get(at + 7)?,
        content: row.try_get(at + 8)?,
        data: json_column(row, at + 9)?,
        client_message_id: row.try_get(at + 10)?,
        created_at: from_ms(row.try_get(at + 11)?),
    })
}

/// A conversation from the [`conversation_columns`] starting at column `at`; all `NULL`
/// (no row) is a room with the bot.
fn conversation_at(row: &PgRow, at: usize, key: RoomKey) -> Result<Conversation, sqlx::Error> {
    let time = |i: usize| row.try_get::<Option<i64>, _>(at + i);
    ConversationColumns {
        status: row.try_get(at)?,
        assignee: (row.try_get(at + 1)?, row.try_get(at + 2)?),
        times: [time(3)?, time(4)?, time(5)?, time(6)?, time(7)?],
        version: row.try_get::<Option<i64>, _>(at + 8)?.unwrap_or(0),
        status_seq: row.try_get::<Option<i64>, _>(at + 9)?.unwrap_or(0),
    }
    .into_conversation(key)
    .map_err(|e| sqlx::Error::ColumnDecode {
        index: at.to_string(),
        source: e.into(),
    })
}

/// A room row locked by the open transaction (or read, outside one).
#[derive(Debug, Clone)]
struct LockedRoom {
    rid: i64,
    kind: String,
    created_by: Option<String>,
    created_at: i64,
    /// As of the open transaction: raised by each append it makes.
    last_seq: i64,
}

impl LockedRoom {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            rid: row.try_get(0)?,
            kind: row.try_get(1)?,
            created_by: row.try_get(2)?,
            created_at: row.try_get(3)?,
            last_seq: row.try_get(4)?,
        })
    }

    fn room(&self, key: &RoomKey) -> Room {
        Room {
            key: key.clone(),
            kind: self.kind.clone(),
            created_by: self.created_by.clone(),
            last_seq: count(self.last_seq),
            created_at: from_ms(self.created_at),
        }
    }
}

/// Rooms locked by the open transaction.
type Locks = HashMap<RoomKey, LockedRoom>;

/// Text PostgreSQL cannot store (it refuses the NUL character in text values).
fn refuse_nul(fields: &[&str]) -> Result<(), StoreError> {
    if fields.iter().any(|f| f.contains('\0')) {
        return Err(StoreError::Invalid(
            "text contains a NUL character, which PostgreSQL cannot store".into(),
        ));
    }
    Ok(())
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://…` or `postgresql://…`), applies
    /// migrations and starts the writer task. New messages are reported to `sink` after
    /// they commit.
    pub async fn open(
        url: &str,
        config: &StoreConfig,
        sink: impl Into<CommitSink>,
    ) -> Result<Self, StoreError> {
        let sink = sink.into();
        let base = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?
            .application_name("parlor");
        let options = base.clone().options([
            (
                "statement_timeout",
                STATEMENT_TIMEOUT.as_millis().to_string(),
            ),
            (
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION.as_millis().to_string(),
            ),
        ]);
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        let unreachable = |e: sqlx::Error| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {target}: {}",
                reason(&e)
            ))
        };

        // Migrations run on a connection of their own, without the statement timeout: a
        // node waiting for another node's migration to finish may wait longer than that.
        let mut conn = tokio::time::timeout(DEADLINE, PgConnection::connect_with(&base))
            .await
            .map_err(|_| deadline_passed("a connection"))?
            .map_err(unreachable)?;
        let migrated = migrate(&mut conn).await;
        let _ = conn.close().await;
        migrated?;

        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(config.postgres_pool.max(1)).unwrap_or(u32::MAX))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_lazy_with(options);

        let (tx, rx) = mpsc::channel(config.write_queue.max(1));
        let alarm = sink.clone();
        let writer = Writer {
            pool: pool.clone(),
            sink,
        };
        let run = writer.run(rx, config.max_batch.max(1));
        let task = tokio::spawn(async move {
            if let Err(panic) =
                futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run)).await
            {
                alarm.panicked("postgres-writer", &*panic);
            }
        });
        Ok(Self {
            writer: Mutex::new(Some(tx)),
            writer_task: Mutex::new(Some(task)),
            pool,
            target,
        })
    }

    /// Queues `op` for the writer and waits for its committed result. The queue is bounded
    /// (`store.write_queue`): when it is full the caller waits for room, so a database that
    /// cannot keep up slows its senders down instead of growing without limit.
    async fn write<T>(&self, op: Op, pick: fn(Output) -> Option<T>) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let writer = self.writer.lock().clone().ok_or(StoreError::Closed)?;
        match tokio::time::timeout(DEADLINE, writer.send(Pending { op, reply })).await {
            Ok(sent) => sent.map_err(|_| StoreError::Closed)?,
            Err(_) => return Err(deadline_passed("a place in the write queue")),
        }
        drop(writer);
        let output = answer.await.map_err(|_| StoreError::Closed)??;
        pick(output).ok_or_else(|| StoreError::Corrupt("internal result mismatch".into()))
    }

    /// Runs a read within [`DEADLINE`].
    async fn read<T>(
        &self,
        what: &str,
        read: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(DEADLINE, read).await {
            Ok(result) => result.map_err(store_error),
            Err(_) => Err(deadline_passed(what)),
        }
    }
}

/// Applies the pending migrations under an advisory lock, so that nodes starting together
/// migrate one after the other and each sees the other's work.
async fn migrate(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(|e| migration_failed("lock", &e))?;
    let result = migrate_locked(conn).await;
    // Closing the connection would release the lock too; unlock so the order is plain.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    result
}

fn migration_failed(step: &str, e: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL migration failed ({step}): {e}"))
}

/// [`migrate`], once the lock is held.
async fn migrate_locked(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS parlor_schema_migrations (
             version     BIGINT PRIMARY KEY,
             applied_at  BIGINT NOT NULL
         )",
    )
    .execute(&mut *conn)
    .await
    .map_err(|e| migration_failed("bookkeeping table", &e))?;
    let applied: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM parlor_schema_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| migration_failed("read version", &e))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "database schema version {applied} is newer than this Parlor ({}); upgrade Parlor",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        apply_migration(conn, version, sql)
            .await
            .map_err(|e| migration_failed(&format!("version {version}"), &e))?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    Ok(())
}

/// Runs one migration and records it, in one transaction.
async fn apply_migration(
    conn: &mut PgConnection,
    version: i64,
    sql: &'static str,
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    // A string without arguments goes as a simple query, which may hold many statements.
    tx.execute(sql).await?;
    sqlx::query("INSERT INTO parlor_schema_migrations (version, applied_at) VALUES ($1, $2)")
        .bind(version)
        .bind(to_ms(now_ms()))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The writer task's state.
struct Writer {
    pool: PgPool,
    sink: CommitSink,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Pending>, max_batch: usize) {
        let mut batch = Vec::with_capacity(64);
        while let Some(pending) = rx.recv().await {
            batch.push(pending);
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            crate::failpoint::hit("postgres-writer");
            self.commit_batch(std::mem::take(&mut batch)).await;
        }
        tracing::debug!("postgres writer stopped");
    }

    /// Runs `batch` in one transaction; if one of its statements fails, retries each
    /// operation alone.
    async fn commit_batch(&self, mut batch: Vec<Pending>) {
        // Deterministic lock order (stable: each room keeps its arrival order).
        batch.sort_by(|a, b| a.op.order_key().cmp(&b.op.order_key()));
        let ops: Vec<&Op> = batch.iter().map(|p| &p.op).collect();
        let failure = match self.transaction(&ops).await {
            Ok(outputs) => {
                self.finish(batch.into_iter().zip(outputs));
                return;
            }
            Err(failure) => failure,
        };
        if batch.len() == 1 || !failure.per_op {
            tracing::warn!(error = %failure.error, size = batch.len(), "store write failed");
            for p in batch {
                let _ = p.reply.send(Err(failure.error.clone()));
            }
            return;
        }
        tracing::warn!(error = %failure.error, size = batch.len(), "batch failed; retrying one by one");
        let mut rest = batch.into_iter();
        while let Some(p) = rest.next() {
            match self.transaction(&[&p.op]).await {
                Ok(outputs) => self.finish(std::iter::once(p).zip(outputs)),
                Err(f) if f.per_op => {
                    let _ = p.reply.send(Err(f.error));
                }
                Err(f) => {
                    // The database went away mid-retry: fail the rest at once.
                    tracing::warn!(error = %f.error, "store write failed");
                    let _ = p.reply.send(Err(f.error.clone()));
                    for p in rest.by_ref() {
                        let _ = p.reply.send(Err(f.error.clone()));
                    }
                }
            }
        }
    }

    /// Runs `ops` in one transaction and commits, within [`DEADLINE`].
    async fn transaction(&self, ops: &[&Op]) -> Result<Vec<Output>, Failure> {
        let work = async {
            let mut tx = self.pool.begin().await?;
            let mut locks = Locks::new();
            let mut outputs = Vec::with_capacity(ops.len());
            for op in ops {
                match apply(&mut tx, &mut locks, op).await {
                    Ok(output) => outputs.push(output),
                    Err(failure) => {
                        let _ = tx.rollback().await;
                        return Err(failure);
                    }
                }
            }
            tx.commit().await.map_err(|e| match e {
                e @ sqlx::Error::Database(_) => Failure::from(e),
                e => Failure {
                    error: StoreError::Unavailable(format!(
                        "PostgreSQL connection lost during COMMIT ({e}); the write may not be stored"
                    )),
                    per_op: false,
                },
            })?;
            Ok(outputs)
        };
        match tokio::time::timeout(DEADLINE, work).await {
            Ok(result) => result,
            Err(_) => Err(Failure {
                error: deadline_passed("a write"),
                per_op: false,
            }),
        }
    }

    /// Hands committed messages to the sink, then answers the callers.
    fn finish(&self, done: impl Iterator<Item = (Pending, Output)>) {
        let done: Vec<(Pending, Output)> = done.collect();
        for (_, output) in &done {
            if let Some(message) = output.committed() {
                // The receiver lives as long as the server; if it is gone we are shutting down.
                self.sink.send(Arc::clone(message));
            }
        }
        for (pending, output) in done {
            let _ = pending.reply.send(Ok(output));
        }
    }
}

/// Applies one operation inside the open transaction.
async fn apply(conn: &mut PgConnection, locks: &mut Locks, op: &Op) -> Result<Output, Failure> {
    match op {
        Op::Append(m) => append(conn, locks, m).await.map(Output::Appended),
        Op::EnsureRoom(key, by) => {
            let room = lock_room(conn, locks, key, Some(by.as_deref()))
                .await?
                .ok_or_else(|| Failure::op(StoreError::Corrupt("room vanished".into())))?;
            Ok(Output::Room(room.room(key)))
        }
        Op::MarkRead(key, user, seq) => mark_read(conn, locks, key, user, *seq)
            .await
            .map(Output::Seq),
        Op::UpsertCustomer(domain, user, profile) => {
            let data = profile.data.as_ref().map(serde_json::Value::to_string);
            let context = profile.context.as_ref().map(serde_json::Value::to_string);
            sqlx::query(
                "INSERT INTO customers
                   (domain_id, user_id, name, data, context, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)
                 ON CONFLICT (domain_id, user_id) DO UPDATE SET
                   name = COALESCE(EXCLUDED.name, customers.name),
                   data = COALESCE(EXCLUDED.data, customers.data),
                   context = COALESCE(EXCLUDED.context, customers.context),
                   updated_at = EXCLUDED.updated_at",
            )
            .bind(domain)
            .bind(user)
            .bind(&profile.name)
            .bind(data)
            .bind(context)
            .bind(to_ms(now_ms()))
            .execute(&mut *conn)
            .await?;
            Ok(Output::Unit)
        }
        Op::Domain(change) => change_domains(conn, change).await.map(Output::Count),
        Op::Usage(r) => {
            sqlx::query(
                "INSERT INTO ai_usage (domain_id, room_id, user_id, provider, model,
                   prompt_tokens, completion_tokens, latency_ms, outcome, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&r.domain_id)
            .bind(&r.room_id)
            .bind(&r.user_id)
            .bind(&r.provider)
            .bind(&r.model)
            .bind(int(r.prompt_tokens))
            .bind(int(r.completion_tokens))
            .bind(int(r.latency_ms))
            .bind(&r.outcome)
            .bind(to_ms(r.created_at))
            .execute(&mut *conn)
            .await?;
            Ok(Output::Unit)
        }
        Op::Transition(key, by, decide) => transition(conn, locks, key, by.as_deref(), decide)
            .await
            .map(Output::Transitioned),
        Op::FirstResponse(key, at) => first_response(conn, locks, key, *at)
            .await
            .map(Output::Conversation),
        Op::AddNote(note) => add_note(conn, locks, note).await.map(Output::Note),
    }
}

/// Locks the room's row for the rest of the transaction and returns it; creates the room
/// (kind `support`, by `create`'s user) when `create` is `Some` and it is missing.
async fn lock_room<'a>(
    conn: &mut PgConnection,
    locks: &'a mut Locks,
    key: &RoomKey,
    create: Option<Option<&str>>,
) -> Result<Option<&'a mut LockedRoom>, Failure> {
    if locks.contains_key(key) {
        return Ok(locks.get_mut(key));
    }
    let select = || {
        sqlx::query(concat!(
            "SELECT ",
            room_columns!(),
            " FROM rooms WHERE domain_id = $1 AND id = $2 FOR NO KEY UPDATE"
        ))
        .bind(&*key.domain_id)
        .bind(&*key.room_id)
    };
    let mut row = select().fetch_optional(&mut *conn).await?;
    if row.is_none()
        && let Some(created_by) = create
    {
        // A row this transaction inserts is its own until COMMIT. If another transaction
        // inserts the same room meanwhile, this insert waits for it and then does nothing,
        // and the select below finds (and locks) that room.
        row = sqlx::query(concat!(
            "INSERT INTO rooms (domain_id, id, kind, created_by, created_at, updated_at)
             VALUES ($1, $2, 'support', $3, $4, $4)
             ON CONFLICT (domain_id, id) DO NOTHING RETURNING ",
            room_columns!()
        ))
        .bind(&*key.domain_id)
        .bind(&*key.room_id)
        .bind(created_by)
        .bind(to_ms(now_ms()))
        .fetch_optional(&mut *conn)
        .await?;
        if row.is_none() {
            row = select().fetch_optional(&mut *conn).await?;
        }
    }
    let Some(row) = row else {
        return Ok(None);
    };
    let room = LockedRoom::from_row(&row)?;
    Ok(Some(locks.entry(key.clone()).or_insert(room)))
}

async fn append(
    conn: &mut PgConnection,
    locks: &mut Locks,
    m: &NewMessage,
) -> Result<Appended, Failure> {
    let room = lock_room(conn, locks, &m.room, Some(Some(&m.author.user_id)))
        .await?
        .ok_or_else(|| Failure::op(StoreError::Corrupt("room vanished".into())))?;
    let rid = room.rid;
    let id = uuid::Uuid::now_v7().to_string();
    let created_at = now_ms();
    let data = m.data.as_ref().map(serde_json::Value::to_string);
    // One statement: insert the message with the room's next seq and, only if a row was
    // inserted, raise the room's counter. A repeated client_message_id inserts nothing and
    // leaves the counter alone; only then is the original looked up.
    let inserted = sqlx::query(
        "WITH inserted AS (
             INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind,
                                   content, data, client_message_id, created_at)
             SELECT r.rid, r.last_seq + 1, $2::text, $3::text, $4::text, $5::text, $6::text,
                    $7::text, $8::text, $9::text, $10::bigint
             FROM rooms r WHERE r.rid = $1::bigint
             ON CONFLICT (room, author_id, client_message_id)
             WHERE client_message_id IS NOT NULL
             DO NOTHING
             RETURNING room, seq
         )
         UPDATE rooms SET last_seq = inserted.seq FROM inserted WHERE rooms.rid = inserted.room
         RETURNING rooms.last_seq",
    )
    .bind(rid)
    .bind(&id)
    .bind(&m.author.user_id)
    .bind(&m.author.name)
    .bind(&m.author.role)
    .bind(&m.kind)
    .bind(&m.content)
    .bind(&data)
    .bind(&m.client_message_id)
    .bind(to_ms(created_at))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = inserted {
        let seq: i64 = row.try_get(0)?;
        room.last_seq = seq;
        return Ok(Appended {
            message: Arc::new(Message {
                id,
                room: m.room.clone(),
                seq: count(seq),
                author: m.author.clone(),
                kind: m.kind.clone(),
                content: m.content.clone(),
                data: m.data.clone(),
                client_message_id: m.client_message_id.clone(),
                created_at,
            }),
            duplicate: false,
        });
    }
    let existing = sqlx::query(concat!(
        "SELECT ",
        message_columns!(),
        messages_join!(),
        "WHERE m.room = $1 AND m.author_id = $2 AND m.client_message_id = $3"
    ))
    .bind(rid)
    .bind(&m.author.user_id)
    .bind(&m.client_message_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| {
        Failure::op(StoreError::Corrupt(format!(
            "append to {} inserted nothing and matched no stored message",
            m.room
        )))
    })?;
    Ok(Appended {
        message: Arc::new(message_at(&existing, 0)?),
        duplicate: true,
    })
}

async fn mark_read(
    conn: &mut PgConnection,
    locks: &mut Locks,
    key: &RoomKey,
    user: &str,
    seq: u64,
) -> Result<u64, Failure> {
    let last = lock_room(conn, locks, key, None)
        .await?
        .map_or(0, |r| r.last_seq);
    let seq = int(seq).min(last);
    let stored: i64 = sqlx::query_scalar(
        "INSERT INTO read_states (domain_id, room_id, user_id, seq, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (domain_id, room_id, user_id) DO UPDATE SET
           seq = GREATEST(read_states.seq, EXCLUDED.seq), updated_at = EXCLUDED.updated_at
         RETURNING seq",
    )
    .bind(&*key.domain_id)
    .bind(&*key.room_id)
    .bind(user)
    .bind(seq)
    .bind(to_ms(now_ms()))
    .fetch_one(&mut *conn)
    .await?;
    Ok(count(stored))
}

/// Decides and stores a hand-off transition (see [`Store::transition`]).
async fn transition(
    conn: &mut PgConnection,
    locks: &mut Locks,
    key: &RoomKey,
    created_by: Option<&str>,
    decide: &Decide,
) -> Result<Transitioned, Failure> {
    // The room's lock serialises every transition of the room, on every node: the
    // conversation read below is the latest committed one.
    let rid = lock_room(conn, locks, key, Some(created_by))
        .await?
        .ok_or_else(|| Failure::op(StoreError::Corrupt("room vanished".into())))?
        .rid;
    let current = sqlx::query(concat!(
        "SELECT ",
        conversation_columns!(),
        " FROM conversations c WHERE c.room = $1"
    ))
    .bind(rid)
    .fetch_optional(&mut *conn)
    .await?
    .map(|row| conversation_at(&row, 0, key.clone()))
    .transpose()?
    .unwrap_or_else(|| Conversation::new(key.clone()));
    let Some((mut next, message)) = decide(&current) else {
        return Ok(Transitioned {
            conversation: current,
            message: None,
        });
    };
    next.room = key.clone();
    next.version = current.version + 1;
    next.updated_at = now_ms();
    let opt = |t: Option<DateTime<Utc>>| t.map(to_ms);
    sqlx::query(
        "INSERT INTO conversations (room, domain_id, status, assignee_id, assignee_name,
           waiting_since, assigned_at, first_response_at, resolved_at, updated_at, version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (room) DO UPDATE SET status = EXCLUDED.status,
           assignee_id = EXCLUDED.assignee_id, assignee_name = EXCLUDED.assignee_name,
           waiting_since = EXCLUDED.waiting_since, assigned_at = EXCLUDED.assigned_at,
           first_response_at = EXCLUDED.first_response_at,
           resolved_at = EXCLUDED.resolved_at, updated_at = EXCLUDED.updated_at,
           version = EXCLUDED.version",
    )
    .bind(rid)
    .bind(&*key.domain_id)
    .bind(next.status.as_str())
    .bind(next.assignee.as_ref().map(|a| &a.user_id))
    .bind(next.assignee.as_ref().map(|a| &a.name))
    .bind(opt(next.waiting_since))
    .bind(opt(next.assigned_at))
    .bind(opt(next.first_response_at))
    .bind(opt(next.resolved_at))
    .bind(to_ms(next.updated_at))
    .bind(int(next.version))
    .execute(&mut *conn)
    .await?;
    refuse_nul(&[
        &message.content,
        &message.kind,
        &message.author.user_id,
        &message.author.name,
        &message.author.role,
    ])
    .map_err(Failure::op)?;
    let appended = append(conn, locks, &message).await?;
    next.status_seq = appended.message.seq;
    sqlx::query("UPDATE conversations SET status_seq = $2 WHERE room = $1")
        .bind(rid)
        .bind(int(next.status_seq))
        .execute(&mut *conn)
        .await?;
    Ok(Transitioned {
        conversation: next,
        message: Some(appended),
    })
}

async fn first_response(
    conn: &mut PgConnection,
    locks: &mut Locks,
    key: &RoomKey,
    at: DateTime<Utc>,
) -> Result<Option<Conversation>, Failure> {
    let Some(room) = lock_room(conn, locks, key, None).await? else {
        return Ok(None);
    };
    let rid = room.rid;
    let row = sqlx::query(concat!(
        "UPDATE conversations c SET first_response_at = $2, updated_at = $2,
           version = c.version + 1
         WHERE c.room = $1 AND c.first_response_at IS NULL
           AND c.status IN ('waiting', 'assigned')
         RETURNING ",
        conversation_columns!()
    ))
    .bind(rid)
    .bind(to_ms(at))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row
        .map(|row| conversation_at(&row, 0, key.clone()))
        .transpose()?)
}

async fn add_note(
    conn: &mut PgConnection,
    locks: &mut Locks,
    note: &NewNote,
) -> Result<Note, Failure> {
    let Some(room) = lock_room(conn, locks, &note.room, None).await? else {
        return Err(Failure::op(StoreError::Invalid(
            "the room does not exist".into(),
        )));
    };
    let rid = room.rid;
    let stored = Note {
        id: uuid::Uuid::now_v7().to_string(),
        room: note.room.clone(),
        author: note.author.clone(),
        text: note.text.clone(),
        created_at: now_ms(),
    };
    sqlx::query(
        "INSERT INTO notes (id, room, author_id, author_name, text, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&stored.id)
    .bind(rid)
    .bind(&stored.author.user_id)
    .bind(&stored.author.name)
    .bind(&stored.text)
    .bind(to_ms(stored.created_at))
    .execute(&mut *conn)
    .await?;
    Ok(stored)
}

/// Applies a [`DomainChange`] inside the open transaction.
async fn change_domains(conn: &mut PgConnection, change: &DomainChange) -> Result<u64, Failure> {
    let now = to_ms(now_ms());
    let done = match change {
        DomainChange::Declare { id, name } => {
            sqlx::query(
                "INSERT INTO domains (id, name, created_at, updated_at) VALUES ($1, $2, $3, $3)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
            )
            .bind(id)
            .bind(name)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
        DomainChange::Save { id, name, settings } => {
            sqlx::query(
                "INSERT INTO domains (id, name, settings, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $4)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,
                   settings = EXCLUDED.settings, updated_at = EXCLUDED.updated_at",
            )
            .bind(id)
            .bind(name)
            .bind(settings)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
        DomainChange::Remove { id } => {
            sqlx::query("DELETE FROM domain_keys WHERE domain_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "UPDATE domains SET settings = NULL, updated_at = $2
                 WHERE id = $1 AND settings IS NOT NULL",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
        DomainChange::AddKey(key) => {
            sqlx::query(
                "INSERT INTO domain_keys (id, domain_id, kind, public_id, secret, created_at,
                   expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&key.id)
            .bind(&key.domain_id)
            .bind(key.kind.as_str())
            .bind(&key.public_id)
            .bind(key.secret.expose())
            .bind(to_ms(key.created_at))
            .bind(key.expires_at.map(to_ms))
            .execute(&mut *conn)
            .await?
        }
        DomainChange::ExpireKeys {
            domain_id,
            kind,
            expires_at,
            keep,
        } => {
            sqlx::query(
                "UPDATE domain_keys SET expires_at = $3
                 WHERE domain_id = $1 AND kind = $2 AND id IS DISTINCT FROM $4
                   AND (expires_at IS NULL OR expires_at > $3)",
            )
            .bind(domain_id)
            .bind(kind.as_str())
            .bind(to_ms(*expires_at))
            .bind(keep)
            .execute(&mut *conn)
            .await?
        }
        DomainChange::RemoveKey { domain_id, id } => {
            sqlx::query("DELETE FROM domain_keys WHERE domain_id = $1 AND id = $2")
                .bind(domain_id)
                .bind(id)
                .execute(&mut *conn)
                .await?
        }
        DomainChange::PutDocument {
            domain_id,
            name,
            text,
        } => {
            sqlx::query(
                "INSERT INTO knowledge_documents (domain_id, name, text, updated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (domain_id, name) DO UPDATE SET
                   text = EXCLUDED.text, updated_at = EXCLUDED.updated_at",
            )
            .bind(domain_id)
            .bind(name)
            .bind(text)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
        DomainChange::RemoveDocument { domain_id, name } => {
            sqlx::query("DELETE FROM knowledge_documents WHERE domain_id = $1 AND name = $2")
                .bind(domain_id)
                .bind(name)
                .execute(&mut *conn)
                .await?
        }
        DomainChange::InstallSetting { name, value } => {
            sqlx::query(
                "INSERT INTO server_settings (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(value)
            .execute(&mut *conn)
            .await?
        }
    };
    Ok(done.rows_affected())
}

#[async_trait]
impl Store for PostgresStore {
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError> {
        if message
            .data
            .as_ref()
            .is_some_and(|d| json_depth(d) > MAX_DATA_DEPTH)
        {
            return Err(StoreError::Invalid(format!(
                "data is nested deeper than {MAX_DATA_DEPTH} levels"
            )));
        }
        refuse_nul(&[
            &message.content,
            &message.kind,
            &message.author.user_id,
            &message.author.name,
            &message.author.role,
            message.client_message_id.as_deref().unwrap_or_default(),
        ])?;
        self.write(Op::Append(message), |o| match o {
            Output::Appended(a) => Some(a),
            _ => None,
        })
        .await
    }

    async fn ensure_room(
        &self,
        key: &RoomKey,
        created_by: Option<&str>,
    ) -> Result<Room, StoreError> {
        let op = Op::EnsureRoom(key.clone(), created_by.map(str::to_owned));
        self.write(op, |o| match o {
            Output::Room(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let row = self
            .read(
                "a room read",
                sqlx::query(concat!(
                    "SELECT ",
                    room_columns!(),
                    " FROM rooms WHERE domain_id = $1 AND id = $2"
                ))
                .bind(&*key.domain_id)
                .bind(&*key.room_id)
                .fetch_optional(&self.pool),
            )
            .await?;
        row.map(|row| LockedRoom::from_row(&row).map(|r| r.room(key)))
            .transpose()
            .map_err(store_error)
    }

    async fn messages_after(
        &self,
        key: &RoomKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = self
            .read(
                "a history read",
                sqlx::query(concat!(
                    "SELECT ",
                    message_columns!(),
                    messages_join!(),
                    "WHERE r.domain_id = $1 AND r.id = $2 AND m.seq > $3 ORDER BY m.seq ASC LIMIT $4"
                ))
                .bind(&*key.domain_id)
                .bind(&*key.room_id)
                .bind(int(after))
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| message_at(row, 0))
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn last_seqs(&self, rooms: &[RoomKey]) -> Result<Vec<u64>, StoreError> {
        let domains: Vec<&str> = rooms.iter().map(|k| &*k.domain_id).collect();
        let ids: Vec<&str> = rooms.iter().map(|k| &*k.room_id).collect();
        let rows = self
            .read(
                "a position check",
                sqlx::query(
                    "SELECT COALESCE(r.last_seq, 0) \
                     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(domain_id, id, n) \
                     LEFT JOIN rooms r ON r.domain_id = k.domain_id AND r.id = k.id \
                     ORDER BY k.n",
                )
                .bind(&domains)
                .bind(&ids)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get::<i64, _>(0).map(count))
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn messages_before(
        &self,
        key: &RoomKey,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = self
            .read(
                "a history read",
                sqlx::query(concat!(
                    "SELECT ",
                    message_columns!(),
                    messages_join!(),
                    "WHERE r.domain_id = $1 AND r.id = $2 AND m.seq < $3 ORDER BY m.seq DESC LIMIT $4"
                ))
                .bind(&*key.domain_id)
                .bind(&*key.room_id)
                .bind(int(before))
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        let mut messages = rows
            .iter()
            .map(|row| message_at(row, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        messages.reverse();
        Ok(messages)
    }

    async fn mark_read(&self, key: &RoomKey, user_id: &str, seq: u64) -> Result<u64, StoreError> {
        let op = Op::MarkRead(key.clone(), user_id.to_owned(), seq);
        self.write(op, |o| match o {
            Output::Seq(s) => Some(s),
            _ => None,
        })
        .await
    }

    async fn read_position(&self, key: &RoomKey, user_id: &str) -> Result<u64, StoreError> {
        let seq: Option<i64> = self
            .read(
                "a read position",
                sqlx::query_scalar(
                    "SELECT seq FROM read_states
                     WHERE domain_id = $1 AND room_id = $2 AND user_id = $3",
                )
                .bind(&*key.domain_id)
                .bind(&*key.room_id)
                .bind(user_id)
                .fetch_optional(&self.pool),
            )
            .await?;
        Ok(seq.map_or(0, count))
    }

    async fn customer(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<Option<Customer>, StoreError> {
        let row = self
            .read(
                "a customer",
                sqlx::query(
                    "SELECT name, data, context, created_at, updated_at FROM customers
                     WHERE domain_id = $1 AND user_id = $2",
                )
                .bind(domain_id)
                .bind(user_id)
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let json = |at: usize| -> Result<Option<serde_json::Value>, sqlx::Error> {
            let text: Option<String> = row.try_get(at)?;
            Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
        };
        let customer = (|| -> Result<Customer, sqlx::Error> {
            Ok(Customer {
                name: row.try_get(0)?,
                data: json(1)?,
                context: json(2)?,
                first_seen: from_ms(row.try_get(3)?),
                last_seen: from_ms(row.try_get(4)?),
            })
        })()
        .map_err(store_error)?;
        Ok(Some(customer))
    }

    async fn upsert_customer(
        &self,
        domain_id: &str,
        user_id: &str,
        profile: CustomerProfile,
    ) -> Result<(), StoreError> {
        let op = Op::UpsertCustomer(domain_id.to_owned(), user_id.to_owned(), profile);
        self.write(op, |o| match o {
            Output::Unit => Some(()),
            _ => None,
        })
        .await
    }

    async fn change_domains(&self, change: DomainChange) -> Result<u64, StoreError> {
        self.write(Op::Domain(change), |o| match o {
            Output::Count(n) => Some(n),
            _ => None,
        })
        .await
    }

    async fn domains(&self) -> Result<Vec<StoredDomain>, StoreError> {
        let rows = self
            .read(
                "a domain read",
                sqlx::query("SELECT id, name, settings FROM domains ORDER BY id")
                    .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredDomain {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    settings: r.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    async fn domain_keys(&self) -> Result<Vec<DomainKey>, StoreError> {
        let rows = self
            .read(
                "a key read",
                sqlx::query(
                    "SELECT id, domain_id, kind, public_id, secret, created_at, expires_at
                     FROM domain_keys ORDER BY created_at, id",
                )
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get(2).map_err(store_error)?;
                Ok(DomainKey {
                    kind: KeyKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown key kind {kind:?}")))?,
                    id: r.try_get(0).map_err(store_error)?,
                    domain_id: r.try_get(1).map_err(store_error)?,
                    public_id: r.try_get(3).map_err(store_error)?,
                    secret: crate::config::Secret::new(
                        r.try_get::<String, _>(4).map_err(store_error)?,
                    ),
                    created_at: from_ms(r.try_get(5).map_err(store_error)?),
                    expires_at: r
                        .try_get::<Option<i64>, _>(6)
                        .map_err(store_error)?
                        .map(from_ms),
                })
            })
            .collect()
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.read(
            "a setting read",
            sqlx::query_scalar("SELECT value FROM server_settings WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool),
        )
        .await
    }

    async fn documents(
        &self,
        domain_id: &str,
    ) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
        let rows = self
            .read(
                "a document read",
                sqlx::query(
                    "SELECT name, text, updated_at FROM knowledge_documents
                     WHERE domain_id = $1 ORDER BY name",
                )
                .bind(domain_id)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, from_ms(r.try_get(2)?))))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    async fn record_usage(&self, record: UsageRecord) -> Result<(), StoreError> {
        self.write(Op::Usage(record), |o| match o {
            Output::Unit => Some(()),
            _ => None,
        })
        .await
    }

    async fn usage(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group: UsageGrouping,
    ) -> Result<Vec<UsageGroup>, StoreError> {
        // Integer division, as SQLite's `created_at / 1000`.
        let key = match group {
            UsageGrouping::Model => "provider || '/' || model",
            UsageGrouping::Day => {
                "to_char(to_timestamp(created_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
        };
        let sql = format!(
            "SELECT ({key}) COLLATE \"C\" AS k, COUNT(*),
                    COALESCE(SUM(CASE WHEN outcome <> 'ok' THEN 1 ELSE 0 END), 0)::BIGINT,
                    COALESCE(SUM(prompt_tokens), 0)::BIGINT,
                    COALESCE(SUM(completion_tokens), 0)::BIGINT,
                    TRUNC(AVG(latency_ms))::BIGINT
             FROM ai_usage WHERE domain_id = $1 AND created_at >= $2 AND created_at < $3
             GROUP BY 1 ORDER BY 1"
        );
        let rows = self
            .read(
                "a usage read",
                sqlx::query(&sql)
                    .bind(domain_id)
                    .bind(to_ms(from))
                    .bind(to_ms(to))
                    .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageGroup {
                    key: r.try_get(0)?,
                    calls: count(r.try_get(1)?),
                    failed: count(r.try_get(2)?),
                    prompt_tokens: count(r.try_get(3)?),
                    completion_tokens: count(r.try_get(4)?),
                    mean_latency_ms: r.try_get::<Option<i64>, _>(5)?.map_or(0, count),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    async fn conversation(&self, key: &RoomKey) -> Result<Option<Conversation>, StoreError> {
        let row = self
            .read(
                "a conversation read",
                sqlx::query(concat!(
                    "SELECT ",
                    conversation_columns!(),
                    " FROM conversations c JOIN rooms r ON r.rid = c.room
                     WHERE r.domain_id = $1 AND r.id = $2"
                ))
                .bind(&*key.domain_id)
                .bind(&*key.room_id)
                .fetch_optional(&self.pool),
            )
            .await?;
        row.map(|row| conversation_at(&row, 0, key.clone()))
            .transpose()
            .map_err(store_error)
    }

    async fn transition(
        &self,
        key: &RoomKey,
        created_by: Option<&str>,
        decide: Decide,
    ) -> Result<Transitioned, StoreError> {
        let op = Op::Transition(key.clone(), created_by.map(str::to_owned), decide);
        self.write(op, |o| match o {
            Output::Transitioned(t) => Some(t),
            _ => None,
        })
        .await
    }

    async fn first_response(
        &self,
        key: &RoomKey,
        at: DateTime<Utc>,
    ) -> Result<Option<Conversation>, StoreError> {
        self.write(Op::FirstResponse(key.clone(), at), |o| match o {
            Output::Conversation(c) => Some(c),
            _ => None,
        })
        .await
    }

    async fn inbox(&self, query: InboxQuery) -> Result<Vec<InboxEntry>, StoreError> {
        let statuses: Vec<String> = query
            .statuses
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        // `NOT ILIKE`: SQLite's LIKE ignores ASCII case, and room ids are ASCII.
        let sql = concat!(
            "SELECT r.id, r.created_by, r.created_at,
               COALESCE((SELECT v.author_name FROM messages v
                         WHERE v.room = r.rid AND v.author_id = r.created_by
                         ORDER BY v.seq DESC LIMIT 1), cu.name),
               COALESCE(rs.seq, 0), ",
            message_columns!(),
            ", ",
            conversation_columns!(),
            " FROM rooms r
             JOIN messages m ON m.room = r.rid AND m.seq = r.last_seq
             LEFT JOIN conversations c ON c.room = r.rid
             LEFT JOIN read_states rs ON rs.domain_id = r.domain_id AND rs.room_id = r.id
               AND rs.user_id = $2
             LEFT JOIN customers cu ON cu.domain_id = r.domain_id AND cu.user_id = r.created_by
             WHERE r.domain_id = $1 AND r.kind = 'support' AND r.id NOT ILIKE 'ai:%'
               AND (cardinality($4::text[]) = 0 OR COALESCE(c.status, 'bot') = ANY($4::text[]))
               AND ($5::text IS NULL OR r.created_by = $5)
               AND ($6::text IS NULL OR r.id ILIKE $6 OR cu.name ILIKE $6
                    OR EXISTS (SELECT 1 FROM messages s WHERE s.room = r.rid
                               AND (s.content ILIKE $6 OR s.author_name ILIKE $6)))
             ORDER BY COALESCE(c.status, 'bot') = 'waiting' DESC,
               CASE WHEN c.status = 'waiting' THEN c.waiting_since END ASC NULLS FIRST,
               m.created_at DESC, r.rid DESC
             LIMIT $3"
        );
        let rows = self
            .read(
                "an inbox read",
                sqlx::query(sql)
                    .bind(&query.domain_id)
                    .bind(&query.reader)
                    .bind(limit_param(query.limit))
                    .bind(&statuses)
                    .bind(&query.opened_by)
                    .bind(query.text_pattern())
                    .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let room_id: String = row.try_get(0)?;
                let key = RoomKey::new(query.domain_id.as_str(), room_id);
                let read: i64 = row.try_get(4)?;
                Ok(InboxEntry {
                    // The message columns start at 5, the conversation's at 17.
                    last_message: message_at(row, 5)?,
                    conversation: conversation_at(row, 17, key)?,
                    created_by: row.try_get(1)?,
                    created_at: from_ms(row.try_get(2)?),
                    visitor_name: row.try_get(3)?,
                    read_seq: count(read),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store_error)
    }

    async fn add_note(&self, note: NewNote) -> Result<Note, StoreError> {
        self.write(Op::AddNote(note), |o| match o {
            Output::Note(n) => Some(n),
            _ => None,
        })
        .await
    }

    async fn notes(&self, key: &RoomKey, limit: usize) -> Result<Vec<Note>, StoreError> {
        let rows = self
            .read(
                "a note read",
                sqlx::query(
                    "SELECT n.id, n.author_id, n.author_name, n.text, n.created_at
                     FROM notes n JOIN rooms r ON r.rid = n.room
                     WHERE r.domain_id = $1 AND r.id = $2
                     ORDER BY n.created_at DESC, n.id DESC LIMIT $3",
                )
                .bind(&*key.domain_id)
                .bind(&*key.room_id)
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        let mut notes = rows
            .iter()
            .map(|row| {
                Ok(Note {
                    id: row.try_get(0)?,
                    room: key.clone(),
                    author: Agent {
                        user_id: row.try_get(1)?,
                        name: row.try_get(2)?,
                    },
                    text: row.try_get(3)?,
                    created_at: from_ms(row.try_get(4)?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(store_error)?;
        notes.reverse();
        Ok(notes)
    }

    async fn health(&self) -> Result<(), StoreError> {
        if self
            .writer
            .lock()
            .as_ref()
            .is_none_or(mpsc::Sender::is_closed)
        {
            return Err(StoreError::Closed);
        }
        match tokio::time::timeout(HEALTH_TIMEOUT, sqlx::query("SELECT 1").execute(&self.pool))
            .await
        {
            Ok(result) => result.map(|_| ()).map_err(store_error),
            Err(_) => Err(StoreError::Unavailable(format!(
                "PostgreSQL did not answer SELECT 1 within {} s",
                HEALTH_TIMEOUT.as_secs()
            ))),
        }
    }

    fn queued(&self) -> usize {
        self.writer
            .lock()
            .as_ref()
            .map_or(0, |w| w.max_capacity() - w.capacity())
    }

    async fn flush(&self) {
        drop(self.writer.lock().take());
        let task = self.writer_task.lock().take();
        if let Some(task) = task {
            // The writer commits what is queued, then exits (dropping the commit sink).
            let _ = task.await;
        }
    }

    async fn close(&self) {
        self.flush().await;
        self.pool.close().await;
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}

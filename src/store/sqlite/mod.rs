//! SQLite implementation of [`Store`]: one file, WAL journal, one writer thread doing group
//! commit, a small pool of read connections.
//!
//! Writes travel as [`WriteOp`]s over a channel to a dedicated OS thread that owns the only
//! write connection. It takes every operation waiting in the channel (up to
//! `store.max_batch`), runs them in one `BEGIN IMMEDIATE … COMMIT`, and only then answers
//! each caller and hands the new messages to the [`CommitSink`]. Because one thread assigns
//! every `seq` and commits in order, room sequences are gapless and the sink sees them in
//! order. The thread keeps each room's last `seq` in memory so an append costs one insert.
//!
//! If an operation fails inside a batch, the batch is rolled back and each of its operations
//! is retried in a transaction of its own, so one bad write cannot fail its neighbours.
//!
//! With `synchronous = NORMAL` (the default) a committed transaction is in the WAL file
//! before `COMMIT` returns, so it survives `kill -9` of Parlor; `full` adds an fsync per
//! commit for power-loss durability.

mod accounts;
mod guided;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, CommitSink, ConversationColumns, Customer, CustomerProfile, Decide, DomainChange,
    DomainKey, InboxEntry, InboxQuery, KeyKind, MAX_DATA_DEPTH, NewNote, Store, StoreError,
    StoredDomain, Transitioned, UsageGroup, UsageGrouping, UsageRecord,
};
use crate::config::{SqliteSync, StoreConfig};
use crate::model::{
    Agent, Author, Conversation, Message, NewMessage, Note, Room, RoomKey, json_depth, now_ms,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_init.sql"),
    include_str!("../migrations/sqlite/0002_compact_room_keys.sql"),
    include_str!("../migrations/sqlite/0003_domain_admin.sql"),
    include_str!("../migrations/sqlite/0004_ai.sql"),
    include_str!("../migrations/sqlite/0005_handoff.sql"),
    include_str!("../migrations/sqlite/0006_accounts.sql"),
    include_str!("../migrations/sqlite/0007_customer_context.sql"),
    include_str!("../migrations/sqlite/0008_guided.sql"),
];

/// Column list matching [`row_to_message`], for `FROM messages m JOIN rooms r`
/// ([`messages_join`]).
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

/// The SQLite store.
pub struct SqliteStore {
    /// Queue to the writer thread; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<WriteOp>>>,
    /// The writer thread, joined on close.
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    /// Idle read connections.
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Database file.
    path: PathBuf,
    /// Most idle read connections kept.
    read_pool: usize,
    /// Reads running at once, at most `read_pool`: the others wait here, as futures, not
    /// on blocking threads with connections of their own (a flood of history requests
    /// would otherwise open a database connection and a file descriptor per request).
    read_slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One write for the writer thread, with where to send its result.
enum WriteOp {
    Append(NewMessage, oneshot::Sender<Result<Appended, StoreError>>),
    EnsureRoom(
        RoomKey,
        Option<String>,
        oneshot::Sender<Result<Room, StoreError>>,
    ),
    MarkRead(
        RoomKey,
        String,
        u64,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    UpsertCustomer(
        String,
        String,
        CustomerProfile,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    Domain(DomainChange, oneshot::Sender<Result<u64, StoreError>>),
    Usage(UsageRecord, oneshot::Sender<Result<(), StoreError>>),
    Transition(
        RoomKey,
        Option<String>,
        Decide,
        oneshot::Sender<Result<Transitioned, StoreError>>,
    ),
    FirstResponse(
        RoomKey,
        DateTime<Utc>,
        oneshot::Sender<Result<Option<Conversation>, StoreError>>,
    ),
    AddNote(NewNote, oneshot::Sender<Result<Note, StoreError>>),
    /// A write of another part of the store (accounts): it runs inside the batch's
    /// transaction like the others and is answered after `COMMIT`.
    Job(Box<dyn Job>),
}

/// A write given to the writer as a closure ([`SqliteStore::run`]).
trait Job: Send {
    /// Runs the write in the open transaction. After a rollback (a failed batch is retried
    /// one operation at a time) it runs again, so it must not depend on having run before.
    fn run(&self, conn: &Connection) -> Result<(), StoreError>;
    /// Answers with the result of the last run, once committed.
    fn answer(self: Box<Self>);
    /// Answers with `e`.
    fn fail(self: Box<Self>, e: &StoreError);
}

/// A [`Job`] made of a closure and the channel its caller waits on.
struct Task<T, F> {
    work: F,
    result: parking_lot::Mutex<Option<T>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Task<T, F>
where
    T: Send,
    F: Fn(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&self, conn: &Connection) -> Result<(), StoreError> {
        let value = (self.work)(conn)?;
        *self.result.lock() = Some(value);
        Ok(())
    }

    fn answer(self: Box<Self>) {
        let result = self
            .result
            .into_inner()
            .ok_or_else(|| StoreError::Corrupt("a write was answered before it ran".into()));
        let _ = self.reply.send(result);
    }

    fn fail(self: Box<Self>, e: &StoreError) {
        let _ = self.reply.send(Err(e.clone()));
    }
}

/// A finished operation's result, held until the batch commits.
enum Done {
    Append(Appended, oneshot::Sender<Result<Appended, StoreError>>),
    EnsureRoom(Room, oneshot::Sender<Result<Room, StoreError>>),
    MarkRead(u64, oneshot::Sender<Result<u64, StoreError>>),
    Unit(oneshot::Sender<Result<(), StoreError>>),
    Count(u64, oneshot::Sender<Result<u64, StoreError>>),
    Transition(
        Transitioned,
        oneshot::Sender<Result<Transitioned, StoreError>>,
    ),
    FirstResponse(
        Option<Conversation>,
        oneshot::Sender<Result<Option<Conversation>, StoreError>>,
    ),
    Note(Note, oneshot::Sender<Result<Note, StoreError>>),
    Job(Box<dyn Job>),
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies migrations and starts the
    /// writer thread. New messages are reported to `sink` after they commit.
    pub fn open(
        path: &Path,
        config: &StoreConfig,
        sink: impl Into<CommitSink>,
    ) -> Result<Self, StoreError> {
        let sink = sink.into();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot create the folder {}: {}",
                    dir.display(),
                    crate::io_reason(&e)
                ))
            })?;
        }
        let mut conn = Connection::open(path).map_err(unavailable)?;
        // A new database gets small pages: each commit writes every page it dirtied to the
        // WAL, and a chat batch dirties one page per active room, so page size sets the
        // bytes written per message. (It can only be chosen before the first table exists.)
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(unavailable)?;
        configure(&conn, config.sqlite_synchronous).map_err(unavailable)?;
        migrate(&mut conn)?;

        // Commits should not wait for a checkpoint: a thread of its own copies the WAL into
        // the database, and the writer only finishes the job when the WAL must restart (see
        // `checkpoint_loop`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(unavailable)?;
        let checkpoint_conn = Connection::open(path).map_err(unavailable)?;
        configure(&checkpoint_conn, config.sqlite_synchronous).map_err(unavailable)?;
        let (stop_checkpoints, stopped) = std::sync::mpsc::channel::<()>();
        let restart_wal = Arc::new(AtomicBool::new(false));
        let restart_request = Arc::clone(&restart_wal);
        let checkpointer = std::thread::Builder::new()
            .name("parlor-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoint_conn, &stopped, &restart_request))
            .map_err(|e| StoreError::Unavailable(format!("cannot start checkpoint thread: {e}")))?;

        let (tx, rx) = mpsc::channel(config.write_queue.max(1));
        let max_batch = config.max_batch;
        let thread = std::thread::Builder::new()
            .name("parlor-sqlite-writer".into())
            .spawn(move || {
                let alarm = sink.clone();
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Writer::new(conn, sink, restart_wal).run(rx, max_batch);
                }));
                // Writes are finished: stop the checkpointer, which truncates the WAL.
                drop(stop_checkpoints);
                let _ = checkpointer.join();
                if let Err(panic) = ran {
                    alarm.panicked("sqlite-writer", &*panic);
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;

        Ok(Self {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            readers: Arc::new(Mutex::new(Vec::new())),
            path: path.to_owned(),
            read_pool: config.read_pool,
            read_slots: Arc::new(tokio::sync::Semaphore::new(config.read_pool.max(1))),
        })
    }

    /// Queues a write and waits for its committed result. The queue is bounded
    /// (`store.write_queue`): when it is full the caller waits for room, so a store that
    /// cannot keep up slows its senders down instead of growing without limit.
    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let writer = self.writer.lock().clone().ok_or(StoreError::Closed)?;
        writer
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        drop(writer);
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `work` on the writer, inside one of its transactions (group-committed with the
    /// other writes), and returns its result once committed.
    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write(|reply| {
            WriteOp::Job(Box::new(Task {
                work,
                result: parking_lot::Mutex::new(None),
                reply,
            }))
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = Arc::clone(&self.read_slots)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        let keep = self.read_pool;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let pooled = readers.lock().pop();
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let c = Connection::open_with_flags(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(unavailable)?;
                    c.busy_timeout(std::time::Duration::from_secs(5))
                        .map_err(unavailable)?;
                    c
                }
            };
            let result = f(&conn).map_err(unavailable);
            let mut pool = readers.lock();
            if pool.len() < keep {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn configure(conn: &Connection, sync: SqliteSync) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            SqliteSync::Normal => "NORMAL",
            SqliteSync::Full => "FULL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

/// Page size of new databases, in bytes.
const PAGE_SIZE: i64 = 1024;

/// How often the checkpoint thread copies the WAL back into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// WAL frames (pages) after which the log is restarted from its beginning.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// Checkpoints the WAL until `stop` is dropped, then truncates it.
///
/// `PASSIVE` never blocks the writer or readers; it copies what it can and the next round
/// takes the rest. But SQLite only starts the WAL file over when a write transaction begins
/// with every frame already copied, which never happens while the writer keeps appending
/// behind this thread: under steady load the file would grow without end (measured: 637 MB
/// after 100,000 messages), and every page lookup walks its index. So when the log is longer
/// than `WAL_RESTART_FRAMES`, this thread raises `restart`; the writer then runs a `PASSIVE`
/// checkpoint itself between two batches, which copies only the frames written since this
/// thread's, and its next transaction rewinds the log.
fn checkpoint_loop(conn: &Connection, stop: &std::sync::mpsc::Receiver<()>, restart: &AtomicBool) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        if let Some((log, _)) = checkpoint(conn, "PASSIVE")
            && log > WAL_RESTART_FRAMES
        {
            restart.store(true, Ordering::Relaxed);
        }
    }
    checkpoint(conn, "TRUNCATE");
}

/// Runs a checkpoint; returns the WAL's frames and how many of them are in the database.
fn checkpoint(conn: &Connection, mode: &str) -> Option<(i64, i64)> {
    match conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    }) {
        Ok(frames) => Some(frames),
        Err(e) => {
            tracing::warn!(error = %e, mode, "WAL checkpoint failed");
            None
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(unavailable)?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "database schema version {applied} is newer than this Parlor ({}); upgrade Parlor",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction().map_err(unavailable)?;
        tx.execute_batch(sql)
            .map_err(|e| unavailable(format!("migration {}: {e}", i + 1)))?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        tracing::info!(version = i + 1, "applied database migration");
    }
    Ok(())
}

fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn row_to_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    message_at(row, 0)
}

/// A message from the [`message_columns`] starting at column `at`.
fn message_at(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Message> {
    let domain: String = row.get(at)?;
    let room: String = row.get(at + 1)?;
    let seq: i64 = row.get(at + 2)?;
    let data: Option<String> = row.get(at + 9)?;
    let data = match data {
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                at + 9,
                rusqlite::types::Type::Text,
                Box::new(e),
            )
        })?),
        None => None,
    };
    Ok(Message {
        room: RoomKey::new(domain, room),
        seq: u64::try_from(seq).unwrap_or(0),
        id: row.get(at + 3)?,
        author: Author {
            user_id: row.get(at + 4)?,
            name: row.get(at + 5)?,
            role: row.get(at + 6)?,
        },
        kind: row.get(at + 7)?,
        content: row.get(at + 8)?,
        data,
        client_message_id: row.get(at + 10)?,
        created_at: from_ms(row.get(at + 11)?),
    })
}

/// A room's last `seq` is not stored apart: it is the largest entry of the room in the
/// `(room, seq)` index, one seek, so appends never rewrite the `rooms` row.
fn select_room(conn: &Connection, key: &RoomKey) -> rusqlite::Result<Option<(i64, Room)>> {
    conn.prepare_cached(
        "SELECT r.rid, r.kind, r.created_by, r.created_at, \
           (SELECT COALESCE(MAX(m.seq), 0) FROM messages m WHERE m.room = r.rid) \
         FROM rooms r WHERE r.domain_id = ?1 AND r.id = ?2",
    )?
    .query_row(params![&*key.domain_id, &*key.room_id], |row| {
        let last: i64 = row.get(4)?;
        Ok((
            row.get(0)?,
            Room {
                key: key.clone(),
                kind: row.get(1)?,
                created_by: row.get(2)?,
                created_at: from_ms(row.get(3)?),
                last_seq: u64::try_from(last).unwrap_or(0),
            },
        ))
    })
    .optional()
}

/// Columns matching [`row_to_conversation`] (table alias `c`).
const CONVERSATION_COLUMNS: &str = "c.status, c.assignee_id, c.assignee_name, c.waiting_since, \
     c.assigned_at, c.first_response_at, c.resolved_at, c.updated_at, c.version, c.status_seq";

/// A conversation from [`CONVERSATION_COLUMNS`] starting at column `at`; a room without a
/// row (all `NULL`) is with the bot.
fn row_to_conversation(
    row: &rusqlite::Row<'_>,
    at: usize,
    key: RoomKey,
) -> rusqlite::Result<Conversation> {
    let time = |i: usize| row.get::<_, Option<i64>>(at + i);
    ConversationColumns {
        status: row.get(at)?,
        assignee: (row.get(at + 1)?, row.get(at + 2)?),
        times: [time(3)?, time(4)?, time(5)?, time(6)?, time(7)?],
        version: row.get::<_, Option<i64>>(at + 8)?.unwrap_or(0),
        status_seq: row.get::<_, Option<i64>>(at + 9)?.unwrap_or(0),
    }
    .into_conversation(key)
    .map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, e.into())
    })
}

fn select_conversation(
    conn: &Connection,
    rid: i64,
    key: &RoomKey,
) -> rusqlite::Result<Option<Conversation>> {
    conn.prepare_cached(&format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.room = ?1"
    ))?
    .query_row(params![rid], |row| row_to_conversation(row, 0, key.clone()))
    .optional()
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    sink: CommitSink,
    /// Per room: its store key and last `seq` as of the last commit (or inside the open
    /// batch).
    rooms: HashMap<RoomKey, RoomSlot>,
    /// The open batch changed the `seq` cache: forget the cache if it rolls back.
    dirty: bool,
    /// Raised by the checkpoint thread when the WAL should start over.
    restart_wal: Arc<AtomicBool>,
}

/// What the writer remembers of a room.
#[derive(Debug, Clone, Copy)]
struct RoomSlot {
    rid: i64,
    last_seq: u64,
}

/// Entries kept in the writer's room cache before it is cleared.
const ROOM_CACHE_MAX: usize = 100_000;

impl Writer {
    fn new(conn: Connection, sink: CommitSink, restart_wal: Arc<AtomicBool>) -> Self {
        Self {
            conn,
            sink,
            rooms: HashMap::new(),
            dirty: false,
            restart_wal,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>, max_batch: usize) {
        let mut batch = Vec::with_capacity(64);
        while let Some(op) = rx.blocking_recv() {
            batch.push(op);
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
            if self.restart_wal.load(Ordering::Relaxed) {
                self.finish_checkpoint();
            }
        }
        tracing::debug!("sqlite writer stopped");
    }

    /// Copies what is left of the WAL into the database, so that the next transaction starts
    /// the log over. If a reader still holds an old snapshot, the next batch tries again.
    fn finish_checkpoint(&mut self) {
        if let Some((log, copied)) = checkpoint(&self.conn, "PASSIVE")
            && log == copied
        {
            self.restart_wal.store(false, Ordering::Relaxed);
        }
    }

    /// Runs `batch` in one transaction; on failure, retries each operation alone.
    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        crate::failpoint::hit("sqlite-writer");
        if self.rooms.len() > ROOM_CACHE_MAX {
            self.rooms.clear();
        }
        match self.try_transaction(batch) {
            Ok(done) => {
                batch.clear();
                self.finish(done);
            }
            Err(e) if batch.len() == 1 => {
                tracing::warn!(error = %e, "store write failed");
                for op in batch.drain(..) {
                    fail(op, &e);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, size = batch.len(), "batch failed; retrying one by one");
                for op in std::mem::take(batch) {
                    let mut single = vec![op];
                    match self.try_transaction(&mut single) {
                        Ok(done) => self.finish(done),
                        Err(e) => {
                            for op in single {
                                fail(op, &e);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Executes all of `batch` and commits. On error everything is rolled back, the in-memory
    /// `seq` cache forgets what the batch did, and `batch` is left intact for a retry.
    fn try_transaction(&mut self, batch: &mut Vec<WriteOp>) -> Result<Vec<Done>, StoreError> {
        self.dirty = false;
        let result = (|| {
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(unavailable)?;
            let mut results = Vec::with_capacity(batch.len());
            for op in batch.iter() {
                results.push(self.apply(op)?);
            }
            self.conn.execute_batch("COMMIT").map_err(unavailable)?;
            Ok(results)
        })();
        match result {
            Ok(results) => {
                let done = batch
                    .drain(..)
                    .zip(results)
                    .map(|(op, r)| r.into_done(op))
                    .collect();
                Ok(done)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                // Rooms created or advanced by the failed batch no longer exist as cached;
                // forget everything rather than track which entries the batch touched.
                if self.dirty {
                    self.rooms.clear();
                }
                Err(e)
            }
        }
    }

    /// Applies one operation inside the open transaction.
    fn apply(&mut self, op: &WriteOp) -> Result<Applied, StoreError> {
        match op {
            WriteOp::Append(m, _) => self.append(m).map(Applied::Append),
            WriteOp::EnsureRoom(key, by, _) => self
                .ensure_room(key, by.as_deref())
                .map(|(_, room)| Applied::Room(room)),
            WriteOp::MarkRead(key, user, seq, _) => {
                self.mark_read(key, user, *seq).map(Applied::Read)
            }
            WriteOp::UpsertCustomer(domain, user, profile, _) => {
                let data = profile.data.as_ref().map(serde_json::Value::to_string);
                let context = profile.context.as_ref().map(serde_json::Value::to_string);
                let now = to_ms(now_ms());
                self.conn
                    .prepare_cached(
                        "INSERT INTO customers
                           (domain_id, user_id, name, data, context, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                         ON CONFLICT (domain_id, user_id) DO UPDATE SET
                           name = COALESCE(excluded.name, customers.name),
                           data = COALESCE(excluded.data, customers.data),
                           context = COALESCE(excluded.context, customers.context),
                           updated_at = excluded.updated_at",
                    )
                    .and_then(|mut s| {
                        s.execute(params![domain, user, profile.name, data, context, now])
                    })
                    .map_err(unavailable)?;
                Ok(Applied::Unit)
            }
            WriteOp::Domain(change, _) => self.change_domains(change).map(Applied::Count),
            WriteOp::Transition(key, by, decide, _) => self
                .transition(key, by.as_deref(), decide)
                .map(Applied::Transition),
            WriteOp::FirstResponse(key, at, _) => {
                self.first_response(key, *at).map(Applied::FirstResponse)
            }
            WriteOp::AddNote(note, _) => self.add_note(note).map(Applied::Note),
            WriteOp::Job(job) => job.run(&self.conn).map(|()| Applied::Unit),
            WriteOp::Usage(r, _) => {
                let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                self.conn
                    .prepare_cached(
                        "INSERT INTO ai_usage (domain_id, room_id, user_id, provider, model,
                           prompt_tokens, completion_tokens, latency_ms, outcome, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )
                    .and_then(|mut st| {
                        st.execute(params![
                            r.domain_id,
                            r.room_id,
                            r.user_id,
                            r.provider,
                            r.model,
                            n(r.prompt_tokens),
                            n(r.completion_tokens),
                            n(r.latency_ms),
                            r.outcome,
                            to_ms(r.created_at),
                        ])
                    })
                    .map_err(unavailable)?;
                Ok(Applied::Unit)
            }
        }
    }

    /// Applies a [`DomainChange`] inside the open transaction.
    fn change_domains(&self, change: &DomainChange) -> Result<u64, StoreError> {
        let now = to_ms(now_ms());
        let changed = (|| {
            match change {
            DomainChange::Declare { id, name } => self.conn.prepare_cached(
                "INSERT INTO domains (id, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            )?.execute(params![id, name, now]),
            DomainChange::Save { id, name, settings } => self.conn.prepare_cached(
                "INSERT INTO domains (id, name, settings, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name,
                   settings = excluded.settings, updated_at = excluded.updated_at",
            )?.execute(params![id, name, settings, now]),
            DomainChange::Remove { id } => {
                self.conn
                    .prepare_cached("DELETE FROM domain_keys WHERE domain_id = ?1")?
                    .execute(params![id])?;
                self.conn.prepare_cached(
                    "UPDATE domains SET settings = NULL, updated_at = ?2
                     WHERE id = ?1 AND settings IS NOT NULL",
                )?.execute(params![id, now])
            }
            DomainChange::AddKey(key) => self.conn.prepare_cached(
                "INSERT INTO domain_keys (id, domain_id, kind, public_id, secret, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?.execute(params![
                key.id,
                key.domain_id,
                key.kind.as_str(),
                key.public_id,
                key.secret.expose(),
                to_ms(key.created_at),
                key.expires_at.map(to_ms),
            ]),
            DomainChange::ExpireKeys { domain_id, kind, expires_at, keep } => self.conn.prepare_cached(
                "UPDATE domain_keys SET expires_at = ?3
                 WHERE domain_id = ?1 AND kind = ?2 AND id IS NOT ?4
                   AND (expires_at IS NULL OR expires_at > ?3)",
            )?.execute(params![domain_id, kind.as_str(), to_ms(*expires_at), keep]),
            DomainChange::RemoveKey { domain_id, id } => self.conn
                .prepare_cached("DELETE FROM domain_keys WHERE domain_id = ?1 AND id = ?2")?
                .execute(params![domain_id, id]),
            DomainChange::PutDocument {
                domain_id,
                name,
                text,
            } => self
                .conn
                .prepare_cached(
                    "INSERT INTO knowledge_documents (domain_id, name, text, updated_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (domain_id, name) DO UPDATE SET
                       text = excluded.text, updated_at = excluded.updated_at",
                )?
                .execute(params![domain_id, name, text, now]),
            DomainChange::RemoveDocument { domain_id, name } => self
                .conn
                .prepare_cached("DELETE FROM knowledge_documents WHERE domain_id = ?1 AND name = ?2")?
                .execute(params![domain_id, name]),
            DomainChange::InstallSetting { name, value } => self.conn
                .prepare_cached("INSERT OR IGNORE INTO server_settings (name, value) VALUES (?1, ?2)")?
                .execute(params![name, value]),
        }
        })();
        changed.map(|n| n as u64).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::Invalid(format!("conflicts with a stored value: {e}"))
            }
            e => unavailable(e),
        })
    }

    /// The room's row, created if missing, with its last `seq` as of the open batch.
    fn ensure_room(
        &mut self,
        key: &RoomKey,
        created_by: Option<&str>,
    ) -> Result<(RoomSlot, Room), StoreError> {
        if let Some((rid, room)) = select_room(&self.conn, key).map_err(unavailable)? {
            let slot = self.rooms.get(key).copied().unwrap_or(RoomSlot {
                rid,
                last_seq: room.last_seq,
            });
            let room = Room {
                last_seq: slot.last_seq,
                ..room
            };
            return Ok((slot, room));
        }
        let now = now_ms();
        let rid = self
            .conn
            .prepare_cached(
                "INSERT INTO rooms (domain_id, id, kind, created_by, created_at, updated_at)
                 VALUES (?1, ?2, 'support', ?3, ?4, ?4) RETURNING rid",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![&*key.domain_id, &*key.room_id, created_by, to_ms(now)],
                    |r| r.get(0),
                )
            })
            .map_err(unavailable)?;
        let slot = RoomSlot { rid, last_seq: 0 };
        self.rooms.insert(key.clone(), slot);
        self.dirty = true;
        let room = Room {
            key: key.clone(),
            kind: "support".to_owned(),
            created_by: created_by.map(str::to_owned),
            last_seq: 0,
            created_at: now,
        };
        Ok((slot, room))
    }

    /// The room's key and last `seq`, from the cache or the database (creating the room).
    fn room_slot(&mut self, key: &RoomKey, created_by: &str) -> Result<RoomSlot, StoreError> {
        if let Some(slot) = self.rooms.get(key) {
            return Ok(*slot);
        }
        let (slot, _) = self.ensure_room(key, Some(created_by))?;
        self.rooms.insert(key.clone(), slot);
        Ok(slot)
    }

    fn append(&mut self, m: &NewMessage) -> Result<Appended, StoreError> {
        let slot = self.room_slot(&m.room, &m.author.user_id)?;
        let seq = slot.last_seq + 1;
        let message = Message {
            id: uuid::Uuid::now_v7().to_string(),
            room: m.room.clone(),
            seq,
            author: m.author.clone(),
            kind: m.kind.clone(),
            content: m.content.clone(),
            data: m.data.clone(),
            client_message_id: m.client_message_id.clone(),
            created_at: now_ms(),
        };
        let data = message.data.as_ref().map(serde_json::Value::to_string);
        // A repeated client_message_id inserts nothing; only then is the original looked up,
        // so the usual append is a single statement.
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind,
                   content, data, client_message_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (room, author_id, client_message_id)
                 WHERE client_message_id IS NOT NULL
                 DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    slot.rid,
                    seq_param(seq),
                    message.id,
                    message.author.user_id,
                    message.author.name,
                    message.author.role,
                    message.kind,
                    message.content,
                    data,
                    message.client_message_id,
                    to_ms(message.created_at),
                ])
            })
            .map_err(unavailable)?;
        if inserted == 0 {
            let existing = self
                .conn
                .prepare_cached(concat!(
                    "SELECT ",
                    message_columns!(),
                    messages_join!(),
                    "WHERE m.room = ?1 AND m.author_id = ?2 AND m.client_message_id = ?3"
                ))
                .and_then(|mut s| {
                    s.query_row(
                        params![slot.rid, &m.author.user_id, &m.client_message_id],
                        row_to_message,
                    )
                })
                .map_err(unavailable)?;
            return Ok(Appended {
                message: Arc::new(existing),
                duplicate: true,
            });
        }
        if let Some(entry) = self.rooms.get_mut(&m.room) {
            entry.last_seq = seq;
        }
        self.dirty = true;
        Ok(Appended {
            message: Arc::new(message),
            duplicate: false,
        })
    }

    fn mark_read(&mut self, key: &RoomKey, user: &str, seq: u64) -> Result<u64, StoreError> {
        let last = match self.rooms.get(key) {
            Some(slot) => slot.last_seq,
            None => select_room(&self.conn, key)
                .map_err(unavailable)?
                .map_or(0, |(_, r)| r.last_seq),
        };
        let seq = seq.min(last);
        let now = to_ms(now_ms());
        let stored: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO read_states (domain_id, room_id, user_id, seq, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (domain_id, room_id, user_id) DO UPDATE SET
                   seq = MAX(read_states.seq, excluded.seq), updated_at = excluded.updated_at
                 RETURNING seq",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![&*key.domain_id, &*key.room_id, user, seq_param(seq), now],
                    |r| r.get(0),
                )
            })
            .map_err(unavailable)?;
        Ok(u64::try_from(stored).unwrap_or(0))
    }

    /// Decides and stores a hand-off transition (see [`Store::transition`]).
    fn transition(
        &mut self,
        key: &RoomKey,
        created_by: Option<&str>,
        decide: &Decide,
    ) -> Result<Transitioned, StoreError> {
        let (slot, _) = self.ensure_room(key, created_by)?;
        self.rooms.insert(key.clone(), slot);
        let current = select_conversation(&self.conn, slot.rid, key)
            .map_err(unavailable)?
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
        self.conn
            .prepare_cached(
                "INSERT INTO conversations (room, domain_id, status, assignee_id, assignee_name,
                   waiting_since, assigned_at, first_response_at, resolved_at, updated_at, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (room) DO UPDATE SET status = excluded.status,
                   assignee_id = excluded.assignee_id, assignee_name = excluded.assignee_name,
                   waiting_since = excluded.waiting_since, assigned_at = excluded.assigned_at,
                   first_response_at = excluded.first_response_at,
                   resolved_at = excluded.resolved_at, updated_at = excluded.updated_at,
                   version = excluded.version",
            )
            .and_then(|mut st| {
                st.execute(params![
                    slot.rid,
                    &*key.domain_id,
                    next.status.as_str(),
                    next.assignee.as_ref().map(|a| &a.user_id),
                    next.assignee.as_ref().map(|a| &a.name),
                    opt(next.waiting_since),
                    opt(next.assigned_at),
                    opt(next.first_response_at),
                    opt(next.resolved_at),
                    to_ms(next.updated_at),
                    i64::try_from(next.version).unwrap_or(i64::MAX),
                ])
            })
            .map_err(unavailable)?;
        let appended = self.append(&message)?;
        next.status_seq = appended.message.seq;
        self.conn
            .prepare_cached("UPDATE conversations SET status_seq = ?2 WHERE room = ?1")
            .and_then(|mut st| st.execute(params![slot.rid, seq_param(next.status_seq)]))
            .map_err(unavailable)?;
        Ok(Transitioned {
            conversation: next,
            message: Some(appended),
        })
    }

    fn first_response(
        &mut self,
        key: &RoomKey,
        at: DateTime<Utc>,
    ) -> Result<Option<Conversation>, StoreError> {
        let Some((rid, _)) = select_room(&self.conn, key).map_err(unavailable)? else {
            return Ok(None);
        };
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE conversations SET first_response_at = ?2, updated_at = ?2,
                   version = version + 1
                 WHERE room = ?1 AND first_response_at IS NULL
                   AND status IN ('waiting', 'assigned')",
            )
            .and_then(|mut st| st.execute(params![rid, to_ms(at)]))
            .map_err(unavailable)?;
        if changed == 0 {
            return Ok(None);
        }
        select_conversation(&self.conn, rid, key).map_err(unavailable)
    }

    fn add_note(&mut self, note: &NewNote) -> Result<Note, StoreError> {
        let Some((rid, _)) = select_room(&self.conn, &note.room).map_err(unavailable)? else {
            return Err(StoreError::Invalid("the room does not exist".into()));
        };
        let stored = Note {
            id: uuid::Uuid::now_v7().to_string(),
            room: note.room.clone(),
            author: note.author.clone(),
            text: note.text.clone(),
            created_at: now_ms(),
        };
        self.conn
            .prepare_cached(
                "INSERT INTO notes (id, room, author_id, author_name, text, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    stored.id,
                    rid,
                    stored.author.user_id,
                    stored.author.name,
                    stored.text,
                    to_ms(stored.created_at)
                ])
            })
            .map_err(unavailable)?;
        Ok(stored)
    }

    /// Hands committed messages to the sink, then answers the callers.
    fn finish(&mut self, done: Vec<Done>) {
        for d in &done {
            let appended = match d {
                Done::Append(a, _) => Some(a),
                Done::Transition(t, _) => t.message.as_ref(),
                _ => None,
            };
            if let Some(a) = appended
                && !a.duplicate
            {
                // The receiver lives as long as the server; if it is gone we are shutting down.
                self.sink.send(Arc::clone(&a.message));
            }
        }
        for d in done {
            match d {
                Done::Append(a, tx) => {
                    let _ = tx.send(Ok(a));
                }
                Done::EnsureRoom(r, tx) => {
                    let _ = tx.send(Ok(r));
                }
                Done::MarkRead(s, tx) => {
                    let _ = tx.send(Ok(s));
                }
                Done::Unit(tx) => {
                    let _ = tx.send(Ok(()));
                }
                Done::Count(n, tx) => {
                    let _ = tx.send(Ok(n));
                }
                Done::Transition(t, tx) => {
                    let _ = tx.send(Ok(t));
                }
                Done::FirstResponse(c, tx) => {
                    let _ = tx.send(Ok(c));
                }
                Done::Note(n, tx) => {
                    let _ = tx.send(Ok(n));
                }
                Done::Job(job) => job.answer(),
            }
        }
    }
}

/// What [`Writer::apply`] produced, before it is paired with its reply channel.
enum Applied {
    Append(Appended),
    Room(Room),
    Read(u64),
    Unit,
    Count(u64),
    Transition(Transitioned),
    FirstResponse(Option<Conversation>),
    Note(Note),
}

impl Applied {
    fn into_done(self, op: WriteOp) -> Done {
        match (self, op) {
            (Applied::Append(a), WriteOp::Append(_, tx)) => Done::Append(a, tx),
            (Applied::Room(r), WriteOp::EnsureRoom(_, _, tx)) => Done::EnsureRoom(r, tx),
            (Applied::Read(s), WriteOp::MarkRead(_, _, _, tx)) => Done::MarkRead(s, tx),
            (Applied::Unit, WriteOp::UpsertCustomer(_, _, _, tx) | WriteOp::Usage(_, tx)) => {
                Done::Unit(tx)
            }
            (Applied::Count(n), WriteOp::Domain(_, tx)) => Done::Count(n, tx),
            (Applied::Transition(t), WriteOp::Transition(_, _, _, tx)) => Done::Transition(t, tx),
            (Applied::FirstResponse(c), WriteOp::FirstResponse(_, _, tx)) => {
                Done::FirstResponse(c, tx)
            }
            (Applied::Note(n), WriteOp::AddNote(_, tx)) => Done::Note(n, tx),
            (Applied::Unit, WriteOp::Job(job)) => Done::Job(job),
            // `apply` maps each operation to its own result kind, so this cannot happen; if it
            // ever did, the caller gets an error rather than a wrong answer.
            (_, op) => {
                fail(op, &StoreError::Corrupt("internal result mismatch".into()));
                Done::Unit(oneshot::channel().0)
            }
        }
    }
}

fn fail(op: WriteOp, e: &StoreError) {
    let err = || e.clone();
    match op {
        WriteOp::Job(job) => job.fail(e),
        WriteOp::Append(_, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::EnsureRoom(_, _, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::MarkRead(_, _, _, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::UpsertCustomer(_, _, _, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::Domain(_, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::Usage(_, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::Transition(_, _, _, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::FirstResponse(_, _, tx) => {
            let _ = tx.send(Err(err()));
        }
        WriteOp::AddNote(_, tx) => {
            let _ = tx.send(Err(err()));
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
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
        self.write(|tx| WriteOp::Append(message, tx)).await
    }

    async fn ensure_room(
        &self,
        key: &RoomKey,
        created_by: Option<&str>,
    ) -> Result<Room, StoreError> {
        let by = created_by.map(str::to_owned);
        self.write(|tx| WriteOp::EnsureRoom(key.clone(), by, tx))
            .await
    }

    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let key = key.clone();
        self.read(move |c| Ok(select_room(c, &key)?.map(|(_, room)| room)))
            .await
    }

    async fn messages_after(
        &self,
        key: &RoomKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let key = key.clone();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                message_columns!(),
                messages_join!(),
                "WHERE r.domain_id = ?1 AND r.id = ?2 AND m.seq > ?3 ORDER BY m.seq ASC LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![
                    &*key.domain_id,
                    &*key.room_id,
                    seq_param(after),
                    limit_param(limit)
                ],
                row_to_message,
            )?;
            rows.collect()
        })
        .await
    }

    async fn last_seqs(&self, rooms: &[RoomKey]) -> Result<Vec<u64>, StoreError> {
        let rooms = rooms.to_vec();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT COALESCE(MAX(m.seq), 0) FROM rooms r JOIN messages m ON m.room = r.rid \
                 WHERE r.domain_id = ?1 AND r.id = ?2",
            )?;
            rooms
                .iter()
                .map(|key| {
                    stmt.query_row(params![&*key.domain_id, &*key.room_id], |row| {
                        row.get::<_, i64>(0)
                    })
                    .map(|last| u64::try_from(last).unwrap_or(0))
                })
                .collect()
        })
        .await
    }

    async fn messages_before(
        &self,
        key: &RoomKey,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let key = key.clone();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                message_columns!(),
                messages_join!(),
                "WHERE r.domain_id = ?1 AND r.id = ?2 AND m.seq < ?3 ORDER BY m.seq DESC LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![
                    &*key.domain_id,
                    &*key.room_id,
                    seq_param(before),
                    limit_param(limit)
                ],
                row_to_message,
            )?;
            let mut messages: Vec<Message> = rows.collect::<rusqlite::Result<_>>()?;
            messages.reverse();
            Ok(messages)
        })
        .await
    }

    async fn mark_read(&self, key: &RoomKey, user_id: &str, seq: u64) -> Result<u64, StoreError> {
        let user = user_id.to_owned();
        self.write(|tx| WriteOp::MarkRead(key.clone(), user, seq, tx))
            .await
    }

    async fn read_position(&self, key: &RoomKey, user_id: &str) -> Result<u64, StoreError> {
        let key = key.clone();
        let user = user_id.to_owned();
        self.read(move |c| {
            let seq: Option<i64> = c
                .prepare_cached(
                    "SELECT seq FROM read_states WHERE domain_id = ?1 AND room_id = ?2 AND user_id = ?3",
                )?
                .query_row(params![&*key.domain_id, &*key.room_id, user], |r| r.get(0))
                .optional()?;
            Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
        })
        .await
    }

    async fn customer(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<Option<Customer>, StoreError> {
        let (d, u) = (domain_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT name, data, context, created_at, updated_at FROM customers
                 WHERE domain_id = ?1 AND user_id = ?2",
            )?
            .query_row(params![d, u], |r| {
                let json = |at: usize| -> rusqlite::Result<Option<serde_json::Value>> {
                    let text: Option<String> = r.get(at)?;
                    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
                };
                Ok(Customer {
                    name: r.get(0)?,
                    data: json(1)?,
                    context: json(2)?,
                    first_seen: from_ms(r.get(3)?),
                    last_seen: from_ms(r.get(4)?),
                })
            })
            .optional()
        })
        .await
    }

    async fn upsert_customer(
        &self,
        domain_id: &str,
        user_id: &str,
        profile: CustomerProfile,
    ) -> Result<(), StoreError> {
        let (d, u) = (domain_id.to_owned(), user_id.to_owned());
        self.write(|tx| WriteOp::UpsertCustomer(d, u, profile, tx))
            .await
    }

    async fn change_domains(&self, change: DomainChange) -> Result<u64, StoreError> {
        self.write(|tx| WriteOp::Domain(change, tx)).await
    }

    async fn domains(&self) -> Result<Vec<StoredDomain>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT id, name, settings FROM domains ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok(StoredDomain {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    settings: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn domain_keys(&self) -> Result<Vec<DomainKey>, StoreError> {
        let rows: Vec<(
            String,
            String,
            String,
            Option<String>,
            String,
            i64,
            Option<i64>,
        )> = self
            .read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT id, domain_id, kind, public_id, secret, created_at, expires_at
                     FROM domain_keys ORDER BY created_at, id",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?;
                rows.collect()
            })
            .await?;
        rows.into_iter()
            .map(
                |(id, domain_id, kind, public_id, secret, created, expires)| {
                    Ok(DomainKey {
                        kind: KeyKind::parse(&kind).ok_or_else(|| {
                            StoreError::Corrupt(format!("unknown key kind {kind:?}"))
                        })?,
                        id,
                        domain_id,
                        public_id,
                        secret: crate::config::Secret::new(secret),
                        created_at: from_ms(created),
                        expires_at: expires.map(from_ms),
                    })
                },
            )
            .collect()
    }

    async fn documents(
        &self,
        domain_id: &str,
    ) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
        let domain = domain_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT name, text, updated_at FROM knowledge_documents
                 WHERE domain_id = ?1 ORDER BY name",
            )?;
            let rows = stmt.query_map(params![domain], |r| {
                Ok((r.get(0)?, r.get(1)?, from_ms(r.get(2)?)))
            })?;
            rows.collect()
        })
        .await
    }

    async fn record_usage(&self, record: UsageRecord) -> Result<(), StoreError> {
        self.write(|tx| WriteOp::Usage(record, tx)).await
    }

    async fn usage(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group: UsageGrouping,
    ) -> Result<Vec<UsageGroup>, StoreError> {
        let domain = domain_id.to_owned();
        let key = match group {
            UsageGrouping::Model => "provider || '/' || model",
            UsageGrouping::Day => "strftime('%Y-%m-%d', created_at / 1000, 'unixepoch')",
        };
        let sql = format!(
            "SELECT {key} AS k, COUNT(*), SUM(outcome <> 'ok'), SUM(prompt_tokens),
                    SUM(completion_tokens), CAST(AVG(latency_ms) AS INTEGER)
             FROM ai_usage WHERE domain_id = ?1 AND created_at >= ?2 AND created_at < ?3
             GROUP BY k ORDER BY k"
        );
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let count = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
            let rows = stmt.query_map(params![domain, to_ms(from), to_ms(to)], |r| {
                Ok(UsageGroup {
                    key: r.get(0)?,
                    calls: count(r.get(1)?),
                    failed: count(r.get(2)?),
                    prompt_tokens: count(r.get(3)?),
                    completion_tokens: count(r.get(4)?),
                    mean_latency_ms: count(r.get(5)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT value FROM server_settings WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn conversation(&self, key: &RoomKey) -> Result<Option<Conversation>, StoreError> {
        let key = key.clone();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {CONVERSATION_COLUMNS} FROM conversations c
                 JOIN rooms r ON r.rid = c.room WHERE r.domain_id = ?1 AND r.id = ?2"
            ))?
            .query_row(params![&*key.domain_id, &*key.room_id], |row| {
                row_to_conversation(row, 0, key.clone())
            })
            .optional()
        })
        .await
    }

    async fn transition(
        &self,
        key: &RoomKey,
        created_by: Option<&str>,
        decide: Decide,
    ) -> Result<Transitioned, StoreError> {
        let by = created_by.map(str::to_owned);
        self.write(|tx| WriteOp::Transition(key.clone(), by, decide, tx))
            .await
    }

    async fn first_response(
        &self,
        key: &RoomKey,
        at: DateTime<Utc>,
    ) -> Result<Option<Conversation>, StoreError> {
        self.write(|tx| WriteOp::FirstResponse(key.clone(), at, tx))
            .await
    }

    async fn inbox(&self, query: InboxQuery) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(move |c| {
            // Statuses are a closed set of fixed words, so they can be spelled into the SQL.
            let filter = if query.statuses.is_empty() {
                String::new()
            } else {
                let names: Vec<String> = query
                    .statuses
                    .iter()
                    .map(|s| format!("'{}'", s.as_str()))
                    .collect();
                format!("AND COALESCE(c.status, 'bot') IN ({})", names.join(", "))
            };
            let sql = format!(
                "SELECT r.id, r.created_by, r.created_at,
                   COALESCE((SELECT v.author_name FROM messages v
                             WHERE v.room = r.rid AND v.author_id = r.created_by
                             ORDER BY v.seq DESC LIMIT 1), cu.name),
                   COALESCE(rs.seq, 0),
                   {message_columns}, {CONVERSATION_COLUMNS}
                 FROM rooms r
                 JOIN messages m ON m.room = r.rid
                   AND m.seq = (SELECT MAX(x.seq) FROM messages x WHERE x.room = r.rid)
                 LEFT JOIN conversations c ON c.room = r.rid
                 LEFT JOIN read_states rs ON rs.domain_id = r.domain_id AND rs.room_id = r.id
                   AND rs.user_id = ?2
                 LEFT JOIN customers cu ON cu.domain_id = r.domain_id AND cu.user_id = r.created_by
                 WHERE r.domain_id = ?1 AND r.kind = 'support' AND r.id NOT LIKE 'ai:%' {filter}
                   AND (?4 IS NULL OR r.created_by = ?4)
                   AND (?5 IS NULL OR r.id LIKE ?5 ESCAPE '\\' OR cu.name LIKE ?5 ESCAPE '\\'
                        OR EXISTS (SELECT 1 FROM messages s WHERE s.room = r.rid
                                   AND (s.content LIKE ?5 ESCAPE '\\'
                                        OR s.author_name LIKE ?5 ESCAPE '\\')))
                 ORDER BY COALESCE(c.status, 'bot') = 'waiting' DESC,
                   CASE WHEN c.status = 'waiting' THEN c.waiting_since END ASC,
                   m.created_at DESC, r.rid DESC
                 LIMIT ?3",
                message_columns = message_columns!(),
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![
                    query.domain_id,
                    query.reader,
                    limit_param(query.limit),
                    query.opened_by,
                    query.text_pattern()
                ],
                |row| {
                    let room_id: String = row.get(0)?;
                    let key = RoomKey::new(query.domain_id.as_str(), room_id);
                    let read: i64 = row.get(4)?;
                    // The message columns start at 5 (row_to_message reads from 0).
                    let last_message = message_at(row, 5)?;
                    Ok(InboxEntry {
                        conversation: row_to_conversation(row, 17, key)?,
                        created_by: row.get(1)?,
                        created_at: from_ms(row.get(2)?),
                        visitor_name: row.get(3)?,
                        last_message,
                        read_seq: u64::try_from(read).unwrap_or(0),
                    })
                },
            )?;
            rows.collect()
        })
        .await
    }

    async fn add_note(&self, note: NewNote) -> Result<Note, StoreError> {
        self.write(|tx| WriteOp::AddNote(note, tx)).await
    }

    async fn notes(&self, key: &RoomKey, limit: usize) -> Result<Vec<Note>, StoreError> {
        let key = key.clone();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT n.id, n.author_id, n.author_name, n.text, n.created_at
                 FROM notes n JOIN rooms r ON r.rid = n.room
                 WHERE r.domain_id = ?1 AND r.id = ?2
                 ORDER BY n.created_at DESC, n.id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![&*key.domain_id, &*key.room_id, limit_param(limit)],
                |row| {
                    Ok(Note {
                        id: row.get(0)?,
                        room: key.clone(),
                        author: Agent {
                            user_id: row.get(1)?,
                            name: row.get(2)?,
                        },
                        text: row.get(3)?,
                        created_at: from_ms(row.get(4)?),
                    })
                },
            )?;
            let mut notes: Vec<Note> = rows.collect::<rusqlite::Result<_>>()?;
            notes.reverse();
            Ok(notes)
        })
        .await
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
        self.read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|_| ())
    }

    fn queued(&self) -> usize {
        self.writer
            .lock()
            .as_ref()
            .map_or(0, |w| w.max_capacity() - w.capacity())
    }

    async fn flush(&self) {
        drop(self.writer.lock().take());
        let thread = self.writer_thread.lock().take();
        if let Some(thread) = thread {
            // The writer drains its queue, then exits; join it off the async runtime.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    async fn close(&self) {
        self.flush().await;
        self.read_slots.close();
        self.readers.lock().clear();
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_run_at_most_read_pool_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, _committed) = mpsc::unbounded_channel();
        let config = StoreConfig {
            read_pool: 3,
            ..StoreConfig::default()
        };
        let store = Arc::new(SqliteStore::open(&dir.path().join("p.db"), &config, sink).unwrap());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let reads: Vec<_> = (0..40)
            .map(|_| {
                let (store, running, most) =
                    (Arc::clone(&store), Arc::clone(&running), Arc::clone(&most));
                tokio::spawn(async move {
                    store
                        .read(move |_| {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(5));
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        for read in reads {
            read.await.unwrap().unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} reads at once");
        assert!(store.readers.lock().len() <= 3);
    }
}

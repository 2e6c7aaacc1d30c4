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
//! **Batch append**: a batch of appends and nothing else (what a busy node mostly writes)
//! goes in as one statement in autocommit, so it costs one round trip instead of five: it
//! locks the rooms, finds the ids already stored, numbers the new messages from each room's
//! `last_seq`, inserts them and raises the counters ([`writes::append_all`]). When it cannot
//! (a room to create, a value refused, a duplicate another node committed meanwhile) it
//! fails whole, having changed nothing, and the batch runs operation by operation in a
//! transaction as above. The writer keeps a connection of its own, outside the pool, with
//! generic plans (`plan_cache_mode`), so the statement is planned once per connection, and
//! without sequential scans where an index serves ([`writer::SETTINGS`]).
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
//!
//! Parts: this file connects and holds the pool; [`writer`] is the writer task, [`writes`]
//! the SQL of each write, [`reads`] the [`Store`] methods, [`rows`] the row-to-model
//! mapping, [`migrate`] the schema migrations; [`accounts`] and [`guided`] the store's
//! other traits.

// First: its column-list macros are used by the modules below.
#[macro_use]
mod rows;

mod accounts;
mod files;
mod guided;
mod migrate;
mod notifications;
mod reads;
mod scratch;
mod stats;
mod visitors;
mod webhooks;
mod writer;
mod writes;

#[doc(hidden)]
pub use scratch::ScratchDatabase;

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::batch::{Handover, Output, Queue};
use super::{CommitSink, StoreError};
use crate::config::StoreConfig;
use writer::{Op, Writer};

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

/// The PostgreSQL store.
pub struct PostgresStore {
    /// Queue to the writer task.
    writer: Queue<Op>,
    /// The writer task, awaited on close.
    writer_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Connections for reads (and, through the writer, for writes).
    pool: PgPool,
    /// `host:port/database`, for logs (never the password).
    target: String,
    /// Which domains' writes add webhook outbox rows (shared with the writer).
    subscriptions: std::sync::Arc<super::webhooks::Subscriptions>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
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

/// Why PostgreSQL could not be used, in words: the system's reason for a connection that
/// failed ("connection refused"), or the server's message ("database \"x\" does not exist").
pub fn reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => crate::io_reason(io),
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// The error of an operation that outlived [`DEADLINE`].
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
        let migrated = migrate::migrate(&mut conn).await;
        let _ = conn.close().await;
        migrated?;

        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(config.postgres_pool.max(1)).unwrap_or(u32::MAX))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_lazy_with(options.clone());

        let (queue, intake) = Queue::new(config.write_queue, config.max_batch, writer::NAME);
        let queue =
            queue.with_full_wait(DEADLINE, || deadline_passed("a place in the write queue"));
        let alarm = sink.clone();
        let writer_options = options.options(writer::SETTINGS);
        let subscriptions = std::sync::Arc::new(super::webhooks::Subscriptions::default());
        let run = Writer::new(writer_options, std::sync::Arc::clone(&subscriptions))
            .run(intake, Handover::inline(sink));
        let task = tokio::spawn(async move {
            if let Err(panic) =
                futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run)).await
            {
                alarm.panicked(writer::NAME, &*panic);
            }
        });
        Ok(Self {
            writer: queue,
            writer_task: Mutex::new(Some(task)),
            pool,
            target,
            subscriptions,
        })
    }

    /// Queues `op` for the writer and waits for its committed result, which `pick` takes
    /// out of the output ([`Queue::submit`]). A caller waits at most [`DEADLINE`] for room
    /// in a full queue.
    async fn write<T>(&self, op: Op, pick: fn(Output) -> Option<T>) -> Result<T, StoreError> {
        self.writer.submit(op, pick).await
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

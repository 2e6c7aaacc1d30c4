//! SQLite implementation of [`Store`]: one file, WAL journal, one writer thread doing group
//! commit, a small pool of read connections.
//!
//! Writes travel as operations over a bounded channel to a dedicated OS thread that owns the
//! only write connection ([`writer`]). It takes every operation waiting in the channel (up to
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
//!
//! Parts: this file opens the database and holds the read pool; [`writer`] is the writer
//! thread and its room cache, [`writes`] the SQL of each write, [`reads`] the [`Store`]
//! methods, [`rows`] the row-to-model mapping, [`migrate`] the schema migrations, [`wal`]
//! the checkpoint thread; [`accounts`] and [`guided`] the store's other traits.

// First: its column-list macros are used by the modules below.
#[macro_use]
mod rows;

mod accounts;
mod files;
mod guided;
mod migrate;
mod notifications;
mod reads;
mod stats;
mod visitors;
mod wal;
mod webhooks;
mod writer;
mod writes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags};

use super::batch::{Handover, Output, Queue};
use super::{CommitSink, StoreError};
use crate::config::{SqliteSync, StoreConfig};
use writer::{Op, Writer};

/// The SQLite store.
pub struct SqliteStore {
    /// Queue to the writer thread.
    writer: Queue<Op>,
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
    /// Which domains' writes add webhook outbox rows (shared with the writer).
    subscriptions: Arc<super::webhooks::Subscriptions>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
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
        migrate::migrate(&mut conn)?;

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
            .spawn(move || wal::checkpoint_loop(&checkpoint_conn, &stopped, &restart_request))
            .map_err(|e| StoreError::Unavailable(format!("cannot start checkpoint thread: {e}")))?;

        let (queue, intake) = Queue::new(config.write_queue, config.max_batch, writer::NAME);
        let handover = Handover::through_runtime(sink);
        let subscriptions = Arc::new(super::webhooks::Subscriptions::default());
        let writer_subscriptions = Arc::clone(&subscriptions);
        let thread = std::thread::Builder::new()
            .name("parlor-sqlite-writer".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Writer::new(conn, restart_wal, writer_subscriptions).run(intake, &handover);
                }));
                // Writes are finished: stop the checkpointer, which truncates the WAL.
                drop(stop_checkpoints);
                let _ = checkpointer.join();
                if let Err(panic) = ran {
                    handover.panicked(writer::NAME, &*panic);
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;

        Ok(Self {
            writer: queue,
            writer_thread: Mutex::new(Some(thread)),
            readers: Arc::new(Mutex::new(Vec::new())),
            path: path.to_owned(),
            read_pool: config.read_pool,
            read_slots: Arc::new(tokio::sync::Semaphore::new(config.read_pool.max(1))),
            subscriptions,
        })
    }

    /// Queues `op` for the writer and waits for its committed result, which `pick` takes
    /// out of the output ([`Queue::submit`]).
    async fn write<T>(&self, op: Op, pick: fn(Output) -> Option<T>) -> Result<T, StoreError> {
        self.writer.submit(op, pick).await
    }

    /// Runs `work` on the writer, inside one of its transactions (group-committed with the
    /// other writes), and returns its result once committed. `work` may run more than once
    /// (see [`Op::Job`]).
    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let job: writer::Job = Box::new(move |conn| {
            work(conn).map(|value| Box::new(value) as Box<dyn std::any::Any + Send>)
        });
        self.write(Op::Job(job), |output| match output {
            Output::Any(value) => value.downcast::<T>().ok().map(|value| *value),
            _ => None,
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

fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::mpsc;

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

//! The writer thread: group commit of every write, and the room cache that lets an append
//! cost one insert.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

use super::{to_ms, unavailable, wal};
use crate::model::{Conversation, NewMessage, Note, Room, RoomKey, now_ms};
use crate::store::{
    Appended, CommitSink, CustomerProfile, Decide, DomainChange, NewNote, StoreError, Transitioned,
    UsageRecord,
};

/// One write for the writer thread, with where to send its result.
pub(super) enum WriteOp {
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
pub(super) trait Job: Send {
    /// Runs the write in the open transaction. After a rollback (a failed batch is retried
    /// one operation at a time) it runs again, so it must not depend on having run before.
    fn run(&self, conn: &Connection) -> Result<(), StoreError>;
    /// Answers with the result of the last run, once committed.
    fn answer(self: Box<Self>);
    /// Answers with `e`.
    fn fail(self: Box<Self>, e: &StoreError);
}

/// A [`Job`] made of a closure and the channel its caller waits on.
pub(super) struct Task<T, F> {
    pub(super) work: F,
    pub(super) result: parking_lot::Mutex<Option<T>>,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
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

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) sink: CommitSink,
    /// Per room: its store key and last `seq` as of the last commit (or inside the open
    /// batch).
    pub(super) rooms: HashMap<RoomKey, RoomSlot>,
    /// The open batch changed the `seq` cache: forget the cache if it rolls back.
    pub(super) dirty: bool,
    /// Raised by the checkpoint thread when the WAL should start over.
    pub(super) restart_wal: Arc<AtomicBool>,
}

/// What the writer remembers of a room.
#[derive(Debug, Clone, Copy)]
pub(super) struct RoomSlot {
    pub(super) rid: i64,
    pub(super) last_seq: u64,
}

/// Entries kept in the writer's room cache before it is cleared.
const ROOM_CACHE_MAX: usize = 100_000;

impl Writer {
    pub(super) fn new(conn: Connection, sink: CommitSink, restart_wal: Arc<AtomicBool>) -> Self {
        Self {
            conn,
            sink,
            rooms: HashMap::new(),
            dirty: false,
            restart_wal,
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriteOp>, max_batch: usize) {
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
        if let Some((log, copied)) = wal::checkpoint(&self.conn, "PASSIVE")
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

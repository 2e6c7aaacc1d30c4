//! The writer thread: runs the batches [`batch`](crate::store::batch) gives it, each in one
//! `BEGIN IMMEDIATE … COMMIT`, and keeps the room cache that lets an append cost one insert.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::{to_ms, unavailable, wal};
use crate::model::{NewMessage, RoomKey, now_ms};
use crate::store::StoreError;
use crate::store::batch::{Commit, Failure, Handover, Intake, Output};
use crate::store::stats::Tally;
use crate::store::webhooks::Subscriptions;
use crate::store::{CustomerProfile, Decide, DomainChange, NewNote, UsageRecord};

/// Name of the writer: its failpoint, and the task the supervisor reports if it panics.
pub(super) const NAME: &str = "sqlite-writer";

/// One write for the writer thread.
pub(super) enum Op {
    Append(NewMessage),
    EnsureRoom(RoomKey, Option<String>),
    MarkRead(RoomKey, String, u64),
    UpsertCustomer(String, String, CustomerProfile),
    Domain(DomainChange),
    Usage(UsageRecord),
    Transition(RoomKey, Option<String>, Decide),
    FirstResponse(RoomKey, DateTime<Utc>),
    AddNote(NewNote),
    /// A write of another part of the store (`Accounts`, `Guided`), given as a closure
    /// ([`SqliteStore::run`](super::SqliteStore)): it runs inside the batch's transaction like
    /// the others and is answered after `COMMIT`. After a rollback (a failed batch is retried
    /// one operation at a time) it runs again, so it must not depend on having run before.
    Job(Job),
}

/// The closure of an [`Op::Job`]; its value reaches the caller as [`Output::Any`].
pub(super) type Job = Box<dyn Fn(&Connection) -> Result<Box<dyn Any + Send>, StoreError> + Send>;

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) conn: Connection,
    /// Per room: its store key and last `seq` as of the last commit (or inside the open
    /// batch).
    pub(super) rooms: HashMap<RoomKey, RoomSlot>,
    /// The open batch changed the `seq` cache: forget the cache if it rolls back.
    pub(super) dirty: bool,
    /// Raised by the checkpoint thread when the WAL should start over.
    restart_wal: Arc<AtomicBool>,
    /// The statistics' counters the open batch moved, written before its `COMMIT`.
    pub(super) tally: Tally,
    /// Which domains' messages and transitions add webhook outbox rows.
    pub(super) subscriptions: Arc<Subscriptions>,
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
    pub(super) fn new(
        conn: Connection,
        restart_wal: Arc<AtomicBool>,
        subscriptions: Arc<Subscriptions>,
    ) -> Self {
        Self {
            conn,
            rooms: HashMap::new(),
            dirty: false,
            restart_wal,
            tally: Tally::default(),
            subscriptions,
        }
    }

    /// Commits batch after batch until the queue is closed and empty.
    pub(super) fn run(mut self, mut intake: Intake<Op>, handover: &Handover) {
        while let Some(mut commit) = intake.blocking_next() {
            if self.rooms.len() > ROOM_CACHE_MAX {
                self.rooms.clear();
            }
            self.commit(&mut commit, handover);
            if self.restart_wal.load(Ordering::Relaxed) {
                self.finish_checkpoint();
            }
        }
        tracing::debug!("sqlite writer stopped");
    }

    /// Runs the transactions `commit` asks for until every caller is answered.
    fn commit(&mut self, commit: &mut Commit<Op>, handover: &Handover) {
        while let Some(ops) = commit.ops() {
            let result = self.transaction(&ops).map_err(Failure::op);
            commit.record(result, handover);
        }
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

    /// Executes `ops` and commits. On error everything is rolled back and the in-memory `seq`
    /// cache forgets what the transaction did. Every error counts as the operation's: SQLite
    /// is a local file, so there is no connection to lose.
    fn transaction(&mut self, ops: &[&Op]) -> Result<Vec<Output>, StoreError> {
        self.dirty = false;
        self.tally.clear();
        let result = (|| {
            // Prepared once, like every statement of the writer: a quiet room commits one
            // message at a time, and parsing these two would cost as much as the insert.
            self.conn
                .prepare_cached("BEGIN IMMEDIATE")
                .and_then(|mut begin| begin.execute([]))
                .map_err(unavailable)?;
            let mut outputs = Vec::with_capacity(ops.len());
            for op in ops {
                outputs.push(self.apply(op)?);
            }
            self.write_tally()?;
            self.conn
                .prepare_cached("COMMIT")
                .and_then(|mut commit| commit.execute([]))
                .map_err(unavailable)?;
            Ok(outputs)
        })();
        if result.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
            // Rooms created or advanced by the failed batch no longer exist as cached;
            // forget everything rather than track which entries the batch touched.
            if self.dirty {
                self.rooms.clear();
            }
        }
        result
    }

    /// Applies one operation inside the open transaction.
    fn apply(&mut self, op: &Op) -> Result<Output, StoreError> {
        match op {
            Op::Append(m) => self.append(m).map(Output::Appended),
            Op::EnsureRoom(key, by) => self
                .ensure_room(key, by.as_deref())
                .map(|(_, room)| Output::Room(room)),
            Op::MarkRead(key, user, seq) => self.mark_read(key, user, *seq).map(Output::Seq),
            Op::UpsertCustomer(domain, user, profile) => {
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
                Ok(Output::Unit)
            }
            Op::Domain(change) => self.change_domains(change).map(Output::Count),
            Op::Transition(key, by, decide) => self
                .transition(key, by.as_deref(), decide)
                .map(Output::Transitioned),
            Op::FirstResponse(key, at) => self.first_response(key, *at).map(Output::Conversation),
            Op::AddNote(note) => self.add_note(note).map(Output::Note),
            Op::Job(job) => job(&self.conn).map(Output::Any),
            Op::Usage(r) => {
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
                Ok(Output::Unit)
            }
        }
    }
}

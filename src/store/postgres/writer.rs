//! The writer task: group commit of every write in a fixed lock order.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};

use super::rows::Locks;
use super::writes::{
    add_note, append, change_domains, first_response, lock_room, mark_read, transition,
};
use super::{DEADLINE, deadline_passed, int, store_error, to_ms};
use crate::model::{Conversation, Message, NewMessage, Note, Room, RoomKey, now_ms};
use crate::store::{
    Appended, CommitSink, CustomerProfile, Decide, DomainChange, NewNote, StoreError, Transitioned,
    UsageRecord,
};

/// One write for the writer task.
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
pub(super) enum Output {
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
pub(super) struct Pending {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Result<Output, StoreError>>,
}

/// Why a transaction failed, and whether retrying its operations one by one can help.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) error: StoreError,
    /// True when one statement (one operation) failed; false when the database could not
    /// be reached, which no retry inside this batch would change.
    pub(super) per_op: bool,
}

impl Failure {
    pub(super) fn op(error: StoreError) -> Self {
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

/// The writer task's state.
pub(super) struct Writer {
    pub(super) pool: PgPool,
    pub(super) sink: CommitSink,
}

impl Writer {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Pending>, max_batch: usize) {
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

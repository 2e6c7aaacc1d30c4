//! The writer task: runs the batches [`batch`](crate::store::batch) gives it, each in one
//! transaction on one pooled connection, its operations sorted into the lock order.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgPool};

use super::rows::Locks;
use super::writes::{
    add_note, append, change_domains, first_response, lock_room, mark_read, transition,
};
use super::{DEADLINE, deadline_passed, int, store_error, to_ms};
use crate::model::{NewMessage, RoomKey, now_ms};
use crate::store::batch::{Commit, Failure, Intake, Output};
use crate::store::{
    CommitSink, CustomerProfile, Decide, DomainChange, NewNote, StoreError, UsageRecord,
};

/// Name of the writer: its failpoint, and the task the supervisor reports if it panics.
pub(super) const NAME: &str = "postgres-writer";

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
    /// Where the operation goes in a batch: see "Lock order" in the [backend's
    /// documentation](super).
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
}

impl Writer {
    /// Commits batch after batch until the queue is closed and empty.
    pub(super) async fn run(self, mut intake: Intake<Op>, sink: CommitSink) {
        while let Some(mut commit) = intake.next().await {
            // Deterministic lock order (stable: each room keeps its arrival order).
            commit.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
            self.commit(&mut commit, &sink).await;
        }
        tracing::debug!("postgres writer stopped");
    }

    /// Runs the transactions `commit` asks for until every caller is answered.
    async fn commit(&self, commit: &mut Commit<Op>, sink: &CommitSink) {
        while let Some(ops) = commit.ops() {
            let result = self.transaction(&ops).await;
            commit.record(result, sink);
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
                e => Failure::database(StoreError::Unavailable(format!(
                    "PostgreSQL connection lost during COMMIT ({e}); the write may not be stored"
                ))),
            })?;
            Ok(outputs)
        };
        match tokio::time::timeout(DEADLINE, work).await {
            Ok(result) => result,
            Err(_) => Err(Failure::database(deadline_passed("a write"))),
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

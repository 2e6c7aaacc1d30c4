//! The writer task: runs the batches [`batch`](crate::store::batch) gives it, each in one
//! transaction on the writer's own connection, its operations sorted into the lock order; a
//! batch of appends only as one statement ([`append_all`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::rows::Locks;
use super::webhooks::append_all_with_events;
use super::writes::{
    add_note, append, append_all, change_domains, first_response, lock_room, mark_read, transition,
    write_tally,
};
use super::{ACQUIRE_TIMEOUT, DEADLINE, deadline_passed, int, store_error, to_ms};
use crate::config::WebhookEvent;
use crate::model::{NewMessage, RoomKey, now_ms};
use crate::store::batch::{Commit, Failure, Handover, Intake, Output};
use crate::store::webhooks::Subscriptions;
use crate::store::{CustomerProfile, Decide, DomainChange, NewNote, StoreError, UsageRecord};

/// Name of the writer: its failpoint, and the task the supervisor reports if it panics.
pub(super) const NAME: &str = "postgres-writer";

/// The writer connection's settings.
/// - Its statements are the same few, run again and again with different arrays: a generic
///   plan, made once per connection, spares PostgreSQL planning the batch append (a dozen
///   CTEs) at every commit.
/// - That plan is often made on a fresh database, before any statistics: every write
///   reaches its rows by key, so a table is never read whole where an index serves
///   (`enable_seqscan = off` only discourages a sequential scan; where no index serves one
///   is still used). With it the batch append's counter update looks each room up by its
///   key instead of scanning `rooms` (see [`append_all`]).
pub(super) const SETTINGS: [(&str, &str); 2] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
];

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
    /// How to connect (the pool's settings: statement and idle-transaction timeouts).
    options: PgConnectOptions,
    /// The writer's own connection, outside the pool, kept between transactions; closed
    /// when the database fails, so the next transaction starts on a fresh one.
    conn: Option<PgConnection>,
    /// Whose the statistics' counters this writer moves are (`activity_hours.writer`):
    /// its own rows, so the writers of several nodes never wait on each other's.
    id: Arc<str>,
    /// Which domains' messages and transitions add webhook outbox rows.
    subscriptions: Arc<Subscriptions>,
}

impl Writer {
    pub(super) fn new(options: PgConnectOptions, subscriptions: Arc<Subscriptions>) -> Self {
        Self {
            options,
            conn: None,
            id: uuid::Uuid::now_v7().to_string().into(),
            subscriptions,
        }
    }

    /// Commits batch after batch until the queue is closed and empty.
    pub(super) async fn run(mut self, mut intake: Intake<Op>, handover: Handover) {
        while let Some(mut commit) = intake.next().await {
            // Deterministic lock order (stable: each room keeps its arrival order).
            commit.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
            self.commit(&mut commit, &handover).await;
        }
        tracing::debug!("postgres writer stopped");
    }

    /// Runs the transactions `commit` asks for until every caller is answered.
    async fn commit(&mut self, commit: &mut Commit<Op>, handover: &Handover) {
        while let Some(ops) = commit.ops() {
            let result = self.transaction(&ops).await;
            commit.record(result, handover);
        }
    }

    /// Runs `ops` as one transaction and commits, within [`DEADLINE`]: a batch of two or
    /// more appends and nothing else as one statement ([`append_all`]), or, when that cannot
    /// take it, each operation in turn between `BEGIN` and `COMMIT`.
    async fn transaction(&mut self, ops: &[&Op]) -> Result<Vec<Output>, Failure> {
        let work = async {
            let appends: Option<Vec<&NewMessage>> = ops
                .iter()
                .map(|op| match op {
                    Op::Append(m) => Some(m),
                    _ => None,
                })
                .collect();
            if let Some(messages) = appends.filter(|m| m.len() >= 2) {
                let writer = Arc::clone(&self.id);
                let subscribed = messages.iter().any(|m| {
                    !self
                        .subscriptions
                        .urls(&m.room.domain_id, WebhookEvent::MessageCreated)
                        .is_empty()
                });
                let appended = if subscribed {
                    let subscriptions = Arc::clone(&self.subscriptions);
                    append_all_with_events(
                        self.connection().await?,
                        &messages,
                        &subscriptions,
                        &writer,
                    )
                    .await
                } else {
                    append_all(self.connection().await?, &messages, &writer).await
                };
                match appended {
                    Ok(appended) => {
                        return Ok(appended.into_iter().map(Output::Appended).collect());
                    }
                    Err(failure) if failure.per_op => {
                        tracing::debug!(error = %failure.error, "batch append taken the long way");
                    }
                    Err(failure) => return Err(failure),
                }
            }
            self.each_in_transaction(ops).await
        };
        let result = match tokio::time::timeout(DEADLINE, work).await {
            Ok(result) => result,
            Err(_) => Err(Failure::database(deadline_passed("a write"))),
        };
        if result.as_ref().is_err_and(|f| !f.per_op) {
            // Possibly broken, or left inside a transaction by the deadline.
            self.conn = None;
        }
        result
    }

    /// The writer's connection, connected first if it has none.
    async fn connection(&mut self) -> Result<&mut PgConnection, Failure> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let connect = PgConnection::connect_with(&self.options);
                tokio::time::timeout(ACQUIRE_TIMEOUT, connect)
                    .await
                    .map_err(|_| Failure::database(deadline_passed("a connection")))??
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Runs `ops` one after the other in one transaction and commits.
    async fn each_in_transaction(&mut self, ops: &[&Op]) -> Result<Vec<Output>, Failure> {
        let writer = Arc::clone(&self.id);
        let subscriptions = Arc::clone(&self.subscriptions);
        let mut tx = self.connection().await?.begin().await?;
        let mut locks = Locks::new();
        let mut outputs = Vec::with_capacity(ops.len());
        for op in ops {
            match apply(&mut tx, &mut locks, &subscriptions, op).await {
                Ok(output) => outputs.push(output),
                Err(failure) => {
                    let _ = tx.rollback().await;
                    return Err(failure);
                }
            }
        }
        if let Err(failure) = write_tally(&mut tx, &mut locks.tally, &writer).await {
            let _ = tx.rollback().await;
            return Err(failure);
        }
        tx.commit().await.map_err(lost_during_commit)?;
        Ok(outputs)
    }
}

/// The failure of a statement that commits (`COMMIT`, or a batch append, which commits by
/// itself): a connection lost meanwhile leaves the outcome unknown.
pub(super) fn lost_during_commit(e: sqlx::Error) -> Failure {
    match e {
        e @ sqlx::Error::Database(_) => Failure::from(e),
        e => Failure::database(StoreError::Unavailable(format!(
            "PostgreSQL connection lost during a commit ({e}); the write may not be stored"
        ))),
    }
}

/// Applies one operation inside the open transaction.
async fn apply(
    conn: &mut PgConnection,
    locks: &mut Locks,
    subscriptions: &Subscriptions,
    op: &Op,
) -> Result<Output, Failure> {
    match op {
        Op::Append(m) => append(conn, locks, subscriptions, m)
            .await
            .map(Output::Appended),
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
        Op::Transition(key, by, decide) => {
            transition(conn, locks, subscriptions, key, by.as_deref(), decide)
                .await
                .map(Output::Transitioned)
        }
        Op::FirstResponse(key, at) => first_response(conn, locks, key, *at)
            .await
            .map(Output::Conversation),
        Op::AddNote(note) => add_note(conn, locks, note).await.map(Output::Note),
    }
}

#[cfg(test)]
mod tests {
    //! The writer's bulk append, run directly (no retry one by one could hide its failure),
    //! against the PostgreSQL server `PARLOR_TEST_DATABASE_URL` names, in a database of its
    //! own. The store's behaviour as a whole is tested by `tests/store.rs` on both backends.

    use std::sync::Arc;

    use sqlx::Connection;

    use super::{Op, Writer, append_all};
    use crate::config::StoreConfig;
    use crate::model::{Author, Message, NewMessage, RoomKey};
    use crate::store::batch::Output;
    use crate::store::postgres::{PostgresStore, ScratchDatabase};
    use crate::store::{Appended, CommitSink, Store};

    fn message(room: &RoomKey, user: &str, content: &str, client_message_id: Option<&str>) -> Op {
        Op::Append(NewMessage {
            room: room.clone(),
            author: Author {
                user_id: user.into(),
                name: format!("Name of {user}"),
                role: "visitor".into(),
            },
            kind: "text".into(),
            content: content.into(),
            data: (user == "bob").then(|| serde_json::json!({ "from": user })),
            client_message_id: client_message_id.map(str::to_owned),
        })
    }

    fn appended(output: Output) -> Appended {
        match output {
            Output::Appended(a) => a,
            other => panic!("expected an append, got {other:?}"),
        }
    }

    fn new_message(op: &Op) -> &NewMessage {
        match op {
            Op::Append(m) => m,
            _ => unreachable!("appends only"),
        }
    }

    /// A store on a new database named after `prefix` (`None`, the tests skipped, when
    /// `PARLOR_TEST_DATABASE_URL` is unset); the database is dropped with the first value.
    async fn scratch_store(prefix: &str) -> Option<(ScratchDatabase, PostgresStore)> {
        let db = ScratchDatabase::from_env(prefix, "the PostgreSQL writer tests")
            .await
            .expect("create the test database")?;
        let (tx, _committed) = tokio::sync::mpsc::unbounded_channel::<Arc<Message>>();
        let store = PostgresStore::open(&db.url(), &StoreConfig::default(), CommitSink::new(tx))
            .await
            .expect("open");
        Some((db, store))
    }

    /// The batch append, one statement over a room with history and a room without
    /// messages, with ids repeated from the store and from the batch itself: the seqs and
    /// duplicates `append` one by one would give, stored as acknowledged. A room that does
    /// not exist yet, or a value PostgreSQL refuses, fails the statement as one operation's
    /// failure with nothing changed, and the writer then takes the batch the long way.
    #[tokio::test]
    async fn a_batch_of_appends_is_one_statement_with_the_outcome_of_one_by_one() {
        let Some((db, store)) = scratch_store("parlor_u").await else {
            return;
        };
        let a = RoomKey::new("acme", "a");
        let b = RoomKey::new("acme", "b");
        let c = RoomKey::new("acme", "c");
        let original = store
            .append(new_message(&message(&a, "alice", "first", Some("k1"))).clone())
            .await
            .expect("append")
            .message;
        for text in ["second", "third"] {
            let m = new_message(&message(&a, "alice", text, None)).clone();
            store.append(m).await.expect("append");
        }
        store.ensure_room(&b, Some("alice")).await.expect("room b");
        let mut conn = sqlx::PgConnection::connect(&db.url())
            .await
            .expect("connect");

        let ops = [
            message(&a, "alice", "fourth", None),
            message(&a, "alice", "first again", Some("k1")),
            message(&a, "alice", "fifth", Some("k2")),
            message(&a, "alice", "fifth again", Some("k2")),
            message(&a, "bob", "bob's own k2", Some("k2")),
            message(&b, "alice", "b one", None),
            message(&b, "alice", "b's own k1", Some("k1")),
        ];
        let messages: Vec<&NewMessage> = ops.iter().map(new_message).collect();
        let got = append_all(&mut conn, &messages, "test")
            .await
            .map_err(|f| f.error)
            .expect("one statement");
        let summary: Vec<(&str, u64, bool)> = got
            .iter()
            .map(|a| (&*a.message.room.room_id, a.message.seq, a.duplicate))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", 4, false),
                ("a", 1, true),
                ("a", 5, false),
                ("a", 5, true),
                ("a", 6, false),
                ("b", 1, false),
                ("b", 2, false),
            ]
        );
        assert_eq!(
            *got[1].message, *original,
            "a stored id returns the stored message"
        );
        assert_eq!(
            got[3].message, got[2].message,
            "an id repeated in the batch"
        );
        for (m, appended) in messages.iter().zip(&got).filter(|(_, a)| !a.duplicate) {
            assert_eq!(
                (
                    &appended.message.content,
                    &appended.message.author,
                    &appended.message.data
                ),
                (&m.content, &m.author, &m.data)
            );
        }
        for (room, last) in [(&a, 6), (&b, 2)] {
            let stored = store.messages_after(room, 0, 100).await.expect("history");
            let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "{room} is gapless");
            for a in got
                .iter()
                .filter(|a| a.message.room == *room && !a.duplicate)
            {
                let at = usize::try_from(a.message.seq).expect("seq") - 1;
                assert_eq!(stored[at], *a.message, "stored as acknowledged");
            }
            let room_row = store.room(room).await.expect("room").expect("exists");
            assert_eq!(room_row.last_seq, last, "{room}'s counter");
        }

        // A room that does not exist yet: the statement changes nothing…
        let with_new_room = [
            message(&a, "alice", "sixth", None),
            message(&c, "carol", "c one", Some("k1")),
            message(&c, "carol", "c two", None),
        ];
        let messages: Vec<&NewMessage> = with_new_room.iter().map(new_message).collect();
        let failure = append_all(&mut conn, &messages, "test")
            .await
            .expect_err("no room c yet");
        assert!(failure.per_op, "{:?}", failure.error);
        let room_row = store.room(&a).await.expect("room").expect("exists");
        assert_eq!(room_row.last_seq, 6, "the failed statement changed nothing");
        assert!(store.room(&c).await.expect("room").is_none());
        // …and the writer takes the batch the long way, which creates the room.
        let mut writer = Writer::new(db.url().parse().expect("options"), Arc::default());
        let outputs = writer
            .transaction(&with_new_room.iter().collect::<Vec<_>>())
            .await
            .map_err(|f| f.error)
            .expect("the long way");
        let seqs: Vec<(String, u64)> = outputs
            .into_iter()
            .map(appended)
            .map(|a| (a.message.room.room_id.to_string(), a.message.seq))
            .collect();
        assert_eq!(seqs, [("a".into(), 7), ("c".into(), 1), ("c".into(), 2)]);
        let c_room = store.room(&c).await.expect("room").expect("exists");
        assert_eq!(c_room.created_by.as_deref(), Some("carol"));

        // A value PostgreSQL refuses: one operation's failure, nothing stored.
        let bad = [
            message(&a, "alice", "fine", None),
            message(&b, "alice", "nul \0 byte", None),
        ];
        let messages: Vec<&NewMessage> = bad.iter().map(new_message).collect();
        let failure = append_all(&mut conn, &messages, "test")
            .await
            .expect_err("PostgreSQL refuses a NUL byte");
        assert!(failure.per_op, "{:?}", failure.error);
        let room_row = store.room(&a).await.expect("room").expect("exists");
        assert_eq!(room_row.last_seq, 7, "the failed statement changed nothing");

        conn.close().await.ok();
        store.close().await;
    }

    /// The generic plan of the batch append under the writer's settings, made on an empty,
    /// never-analysed schema (as the writer's first batch after a fresh start makes it):
    /// rooms are locked, stored ids looked up, counters raised and the statistics counted
    /// through the unique indexes, never by scanning a table.
    #[tokio::test]
    async fn the_batch_append_plans_index_lookups_without_statistics() {
        // Opening the store migrates the new database; nothing is written.
        let Some((db, store)) = scratch_store("parlor_p").await else {
            return;
        };
        store.close().await;
        let mut conn = sqlx::PgConnection::connect(&db.url())
            .await
            .expect("connect");
        let settings: String = super::SETTINGS
            .iter()
            .map(|(name, value)| format!("SET {name} = {value}; "))
            .collect();
        sqlx::raw_sql(&format!(
            "{settings}
             PREPARE append_all (text[], text[], text[], text[], text[], text[], text[],
                                 text[], text[], text[], bigint, text) AS {}",
            super::super::writes::APPEND_ALL
        ))
        .execute(&mut conn)
        .await
        .expect("prepare");
        let row = sqlx::query(
            "EXPLAIN (FORMAT JSON) EXECUTE append_all ('{d}', '{r}', '{i}', '{a}', '{n}',
                 '{visitor}', '{text}', '{c}', '{NULL}', '{k}', 0, 'w')",
        )
        .fetch_one(&mut conn)
        .await
        .expect("explain");
        // A `json` column: its text, without sqlx's type check (no `json` feature here).
        let plan: serde_json::Value =
            serde_json::from_str(sqlx::Row::try_get_unchecked::<&str, _>(&row, 0).expect("plan"))
                .expect("a JSON plan");
        // The relation of every sequential scan in the plan.
        fn scans(node: &serde_json::Value, out: &mut Vec<String>) {
            if node["Node Type"] == "Seq Scan" {
                out.push(node["Relation Name"].as_str().unwrap_or("?").into());
            }
            for child in node["Plans"].as_array().into_iter().flatten() {
                scans(child, out);
            }
        }
        let mut found: Vec<String> = Vec::new();
        scans(&plan[0]["Plan"], &mut found);
        assert!(
            found.is_empty(),
            "sequential scans of {found:?}; plan: {plan:#}"
        );
        conn.close().await.ok();
    }
}

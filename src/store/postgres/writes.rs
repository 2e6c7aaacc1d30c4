//! The SQL of each write, run by the writer inside its open transaction. Every write to a
//! room first locks the room's row ([`lock_room`]). A batch of appends only is one
//! statement of its own, [`append_all`], which locks the rooms itself.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgConnection;

use super::rows::{LockedRoom, Locks, conversation_at, message_at};
use super::webhooks::insert_outbox;
use super::writer::lost_during_commit;
use super::{count, int, refuse_nul, to_ms};
use crate::config::WebhookEvent;
use crate::model::{Conversation, NewMessage, Note, RoomKey, now_ms};
use crate::store::batch::Failure;
use crate::store::stats::{self, AI_CONVERSATIONS, AI_ONLY, CONVERSATIONS, Tally};
use crate::store::webhooks::{
    Partition, Subscriptions, conversation_event, conversation_payload, message_payload,
};
use crate::store::{Appended, Decide, DomainChange, NewNote, StoreError, Transitioned};

/// Locks the room's row for the rest of the transaction and returns it; creates the room
/// (kind `support`, by `create`'s user) when `create` is `Some` and it is missing.
pub(super) async fn lock_room<'a>(
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
        } else if stats::counted(&key.room_id) {
            locks
                .tally
                .add(&key.domain_id, to_ms(now_ms()), CONVERSATIONS, 1);
        }
    }
    let Some(row) = row else {
        return Ok(None);
    };
    let room = LockedRoom::from_row(&row)?;
    Ok(Some(locks.entry(key.clone()).or_insert(room)))
}

pub(super) async fn append(
    conn: &mut PgConnection,
    locks: &mut Locks,
    subscriptions: &Subscriptions,
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
        count_message(conn, locks, m, to_ms(created_at)).await?;
        let message = Arc::new(m.stored(id, count(seq), created_at));
        let events = subscriptions.rows(
            &m.room.domain_id,
            WebhookEvent::MessageCreated,
            Partition::Room(&m.room.room_id),
            || message_payload(&message),
        );
        insert_outbox(conn, &events).await?;
        return Ok(Appended {
            message,
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

/// Counts a stored message of a locked room for the statistics: its role's counter and,
/// for the room's first AI reply, the room's AI conversation counters.
async fn count_message(
    conn: &mut PgConnection,
    locks: &mut Locks,
    m: &NewMessage,
    at: i64,
) -> Result<(), Failure> {
    let key = &m.room;
    if !stats::counted(&key.room_id) {
        return Ok(());
    }
    let metric = stats::message_metric(&m.author.role);
    locks.tally.add(&key.domain_id, at, &metric, 1);
    if m.author.role != stats::ASSISTANT_ROLE {
        return Ok(());
    }
    let Some(room) = locks.get_mut(key).filter(|r| r.ai_replied_at.is_none()) else {
        return Ok(());
    };
    // The room is locked: what the lock read is the latest.
    room.ai_replied_at = Some(at);
    let (rid, created, handed_over) = (room.rid, room.created_at, room.handed_over_at);
    sqlx::query("UPDATE rooms SET ai_replied_at = $2 WHERE rid = $1")
        .bind(rid)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    locks
        .tally
        .add(&key.domain_id, created, AI_CONVERSATIONS, 1);
    if handed_over.is_none() {
        locks.tally.add(&key.domain_id, created, AI_ONLY, 1);
    }
    Ok(())
}

/// Counts a hand-off transition of a locked room for the statistics; the room's first
/// hand-over to people takes back its AI-only count.
async fn count_transition(
    conn: &mut PgConnection,
    locks: &mut Locks,
    current: &Conversation,
    next: &Conversation,
) -> Result<(), Failure> {
    let key = &next.room;
    let at = to_ms(next.updated_at);
    for metric in stats::transition_metrics(current, next) {
        locks.tally.add(&key.domain_id, at, metric, 1);
    }
    if !stats::hands_over(current, next) {
        return Ok(());
    }
    let Some(room) = locks.get_mut(key).filter(|r| r.handed_over_at.is_none()) else {
        return Ok(());
    };
    room.handed_over_at = Some(at);
    let (rid, created, ai_replied) = (room.rid, room.created_at, room.ai_replied_at);
    sqlx::query("UPDATE rooms SET handed_over_at = $2 WHERE rid = $1")
        .bind(rid)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    if ai_replied.is_some() {
        locks.tally.add(&key.domain_id, created, AI_ONLY, -1);
    }
    Ok(())
}

/// Writes the counters `tally` holds as `writer`'s, inside the open transaction.
pub(super) async fn write_tally(
    conn: &mut PgConnection,
    tally: &mut Tally,
    writer: &str,
) -> Result<(), Failure> {
    if tally.is_empty() {
        return Ok(());
    }
    let rows = tally.take();
    let domains: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let hours: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let metrics: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    let counts: Vec<i64> = rows.iter().map(|r| r.3).collect();
    sqlx::query(
        "INSERT INTO activity_hours (domain_id, at, metric, writer, n)
         SELECT d, a, m, $5, n FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[])
              AS t (d, a, m, n)
         ON CONFLICT (domain_id, at, metric, writer) DO UPDATE SET n = activity_hours.n + EXCLUDED.n",
    )
    .bind(&domains)
    .bind(&hours)
    .bind(&metrics)
    .bind(&counts)
    .bind(writer)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn mark_read(
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
pub(super) async fn transition(
    conn: &mut PgConnection,
    locks: &mut Locks,
    subscriptions: &Subscriptions,
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
    count_transition(conn, locks, &current, &next).await?;
    let appended = append(conn, locks, subscriptions, &message).await?;
    next.status_seq = appended.message.seq;
    sqlx::query("UPDATE conversations SET status_seq = $2 WHERE room = $1")
        .bind(rid)
        .bind(int(next.status_seq))
        .execute(&mut *conn)
        .await?;
    if let Some(event) = conversation_event(&current, &next) {
        let events =
            subscriptions.rows(&key.domain_id, event, Partition::Room(&key.room_id), || {
                conversation_payload(&current, &next)
            });
        insert_outbox(conn, &events).await?;
    }
    Ok(Transitioned {
        conversation: next,
        message: Some(appended),
    })
}

pub(super) async fn first_response(
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
    let conversation = row
        .map(|row| conversation_at(&row, 0, key.clone()))
        .transpose()?;
    if let Some(ms) = conversation
        .as_ref()
        .and_then(Conversation::first_response_ms)
    {
        sqlx::query(
            "INSERT INTO first_responses (domain_id, at, ms, room) VALUES ($1, $2, $3, $4)",
        )
        .bind(&*key.domain_id)
        .bind(to_ms(at))
        .bind(ms)
        .bind(rid)
        .execute(&mut *conn)
        .await?;
    }
    Ok(conversation)
}

pub(super) async fn add_note(
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
pub(super) async fn change_domains(
    conn: &mut PgConnection,
    change: &DomainChange,
) -> Result<u64, Failure> {
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

/// The statement of [`append_all`]; its parameters are the batch's columns as arrays, then
/// `created_at` and the writer's id (its statistics' counters, `docs/stats.md`).
pub(super) const APPEND_ALL: &str = concat!(
    "WITH k AS MATERIALIZED (
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
              WITH ORDINALITY AS k (domain_id, room_id, id, author_id, author_name,
                                    author_role, kind, content, data, cmid, ord)
     ),
     locked AS MATERIALIZED (
         SELECT r.rid, r.domain_id, r.id, r.last_seq, r.created_at, r.ai_replied_at,
                r.handed_over_at
         FROM (SELECT domain_id, room_id FROM k GROUP BY domain_id, room_id
               ORDER BY domain_id COLLATE \"C\", room_id COLLATE \"C\") q
         CROSS JOIN LATERAL (
             SELECT rid, domain_id, id, last_seq, created_at, ai_replied_at, handed_over_at
             FROM rooms
             WHERE domain_id = q.domain_id AND id = q.room_id
             LIMIT 1 FOR NO KEY UPDATE
         ) r
     ),
     keyed AS MATERIALIZED (
         SELECT k.*, l.rid, l.last_seq FROM k
         LEFT JOIN locked l ON l.domain_id = k.domain_id AND l.id = k.room_id
     ),
     found AS MATERIALIZED (
         SELECT k.ord, ",
    message_columns!(),
    " FROM keyed k
         CROSS JOIN LATERAL (SELECT k.domain_id, k.room_id AS id) r
         CROSS JOIN LATERAL (
             SELECT * FROM messages
             WHERE room = k.rid AND author_id = k.author_id AND client_message_id = k.cmid
             LIMIT 1
         ) m
         WHERE k.cmid IS NOT NULL
     ),
     fresh AS MATERIALIZED (
         SELECT k.*, k.last_seq + row_number() OVER (PARTITION BY k.rid ORDER BY k.ord) AS seq
         FROM keyed k WHERE k.ord NOT IN (SELECT ord FROM found)
     ),
     inserted AS (
         INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind,
                               content, data, client_message_id, created_at)
         SELECT rid, seq, id, author_id, author_name, author_role, kind, content, data,
                cmid, $11::bigint
         FROM fresh
         RETURNING room, seq, author_role
     ),
     raised AS (
         UPDATE rooms SET last_seq = t.seq,
                ai_replied_at = COALESCE(rooms.ai_replied_at, t.ai_at)
         FROM (SELECT room, max(seq) AS seq,
                      CASE WHEN bool_or(author_role = 'assistant') THEN $11::bigint END AS ai_at
               FROM inserted GROUP BY room) t
         WHERE rooms.rid = t.room
     ),
     tallied AS (
         INSERT INTO activity_hours (domain_id, at, metric, writer, n)
         SELECT domain_id, at, metric, $12::text, sum(n) FROM (
             SELECT domain_id, $11::bigint - mod($11::bigint, 3600000) AS at,
                    'messages.' || author_role AS metric, count(*) AS n
             FROM fresh WHERE room_id NOT LIKE '#%'
             GROUP BY domain_id, author_role
             UNION ALL
             SELECT l.domain_id, l.created_at - mod(l.created_at, 3600000), c.metric, 1
             FROM locked l
             CROSS JOIN (VALUES ('conversations.ai', false),
                                ('conversations.ai_only', true)) c (metric, only_ai)
             WHERE l.ai_replied_at IS NULL AND l.id NOT LIKE '#%'
               AND (NOT c.only_ai OR l.handed_over_at IS NULL)
               AND l.rid IN (SELECT rid FROM fresh WHERE author_role = 'assistant')
         ) s
         GROUP BY domain_id, at, metric
         ON CONFLICT (domain_id, at, metric, writer)
         DO UPDATE SET n = activity_hours.n + EXCLUDED.n
     )
     SELECT ord, NULL::text, NULL::text, seq, NULL::text, NULL::text, NULL::text,
            NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint
     FROM fresh
     UNION ALL
     SELECT * FROM found"
);

/// Appends `messages` (a batch of appends only) with one statement, outside any explicit
/// transaction: one round trip instead of the five a transaction of them takes (`BEGIN`,
/// the rooms' locks, the stored ids, the inserts, `COMMIT`). The statement locks the rooms in
/// the batch's lock order, finds the client message ids already stored, numbers the new
/// messages from each room's `last_seq`, inserts them, raises the counters and counts them
/// for the statistics (as this node's `writer`, `docs/stats.md`); it commits
/// as a whole or not at all. An id repeated within the batch is resolved here, before: its
/// first occurrence is sent, the others get its outcome as duplicates.
///
/// The writer runs it under a generic plan (`plan_cache_mode`), made once per connection at
/// its first batch, often while the tables are empty or their statistics stale: a join
/// planned then as a scan of `messages` would scan the whole table at every batch as it grows
/// (measured: 12k acks/s falling to 6.5k/s within nine seconds of a fresh database, while a
/// plan made on the same table grown and analysed took 22k/s). So the statement reaches
/// `rooms` and `messages` only through lookups of one row per key (`LATERAL … LIMIT 1`),
/// whose plan is the unique index whatever the statistics say; the counters' update, a join
/// the planner could make a scan of `rooms`, is kept to the index by the writer's
/// `enable_seqscan = off` ([`super::writer::SETTINGS`]).
///
/// Fails as one operation's failure ([`Failure::op`]), having changed nothing, when a room
/// does not exist yet (its messages would have no room: the `NOT NULL` on `messages.room`
/// refuses them) or when a duplicate was committed by another node between the statement's
/// snapshot and its lock (the unique index refuses it); the caller then runs the batch the
/// long way, whose [`append`] creates rooms and reads duplicates under the lock.
pub(super) async fn append_all(
    conn: &mut PgConnection,
    messages: &[&NewMessage],
    writer: &str,
) -> Result<Vec<Appended>, Failure> {
    // Index of the first message of the batch with the same (room, author, id), if any.
    let mut first_with: HashMap<(&RoomKey, &str, &str), usize> = HashMap::new();
    let mut repeats: Vec<Option<usize>> = Vec::with_capacity(messages.len());
    let mut sent: Vec<usize> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let key = m
            .client_message_id
            .as_deref()
            .map(|cmid| (&m.room, m.author.user_id.as_str(), cmid));
        match key.map(|k| *first_with.entry(k).or_insert(i)) {
            Some(first) if first != i => repeats.push(Some(first)),
            _ => {
                repeats.push(None);
                sent.push(i);
            }
        }
    }
    let created_at = now_ms();
    let mut ids: Vec<String> = sent
        .iter()
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let column = |f: fn(&NewMessage) -> &str| -> Vec<&str> {
        sent.iter().map(|&i| f(messages[i])).collect()
    };
    let data: Vec<Option<String>> = sent
        .iter()
        .map(|&i| messages[i].data.as_ref().map(serde_json::Value::to_string))
        .collect();
    let cmids: Vec<Option<&str>> = sent
        .iter()
        .map(|&i| messages[i].client_message_id.as_deref())
        .collect();
    let rows = sqlx::query(APPEND_ALL)
        .bind(column(|m| &m.room.domain_id))
        .bind(column(|m| &m.room.room_id))
        .bind(&ids)
        .bind(column(|m| &m.author.user_id))
        .bind(column(|m| &m.author.name))
        .bind(column(|m| &m.author.role))
        .bind(column(|m| &m.kind))
        .bind(column(|m| &m.content))
        .bind(&data)
        .bind(&cmids)
        .bind(to_ms(created_at))
        .bind(writer)
        .fetch_all(&mut *conn)
        .await
        .map_err(lost_during_commit)?;

    // What the statement said of each message sent, by its position among them.
    let mut outcome: Vec<Option<Appended>> = (0..sent.len()).map(|_| None).collect();
    for row in &rows {
        let ord: i64 = row.try_get(0)?;
        let slot = usize::try_from(ord - 1)
            .ok()
            .and_then(|at| outcome.get_mut(at))
            .filter(|slot| slot.is_none())
            .ok_or_else(|| {
                corrupt(format!(
                    "a batch append answered for message {ord} twice or out of range"
                ))
            })?;
        let stored_room: Option<String> = row.try_get(1)?;
        *slot = Some(match stored_room {
            // A stored original: the found columns, after `ord`.
            Some(_) => Appended {
                message: Arc::new(message_at(row, 1)?),
                duplicate: true,
            },
            None => {
                let at = usize::try_from(ord - 1).unwrap_or_default();
                let m = messages[sent[at]];
                let seq: i64 = row.try_get(3)?;
                Appended {
                    message: Arc::new(m.stored(
                        std::mem::take(&mut ids[at]),
                        count(seq),
                        created_at,
                    )),
                    duplicate: false,
                }
            }
        });
    }
    let mut by_message: Vec<Option<Appended>> = (0..messages.len()).map(|_| None).collect();
    for (at, appended) in outcome.into_iter().enumerate() {
        by_message[sent[at]] = Some(appended.ok_or_else(|| {
            corrupt(format!("a batch append left message {} unanswered", at + 1))
        })?);
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, repeat) in repeats.iter().enumerate() {
        let appended = match repeat {
            Some(first) => {
                let original = by_message[*first]
                    .as_ref()
                    .map(|a| Arc::clone(&a.message))
                    .ok_or_else(|| corrupt("a repeated id without its first".into()))?;
                Appended {
                    message: original,
                    duplicate: true,
                }
            }
            None => by_message[i]
                .as_ref()
                .map(|a| Appended {
                    message: Arc::clone(&a.message),
                    duplicate: a.duplicate,
                })
                .ok_or_else(|| corrupt("a batch append lost a message".into()))?,
        };
        out.push(appended);
    }
    Ok(out)
}

fn corrupt(what: String) -> Failure {
    Failure::op(StoreError::Corrupt(what))
}

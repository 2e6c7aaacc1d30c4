//! The [`Store`] trait on PostgreSQL: reads straight on the pool, writes queued to the
//! writer.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::rows::{LockedRoom, conversation_at, message_at};
use super::writer::Op;
use super::{
    HEALTH_TIMEOUT, PostgresStore, count, from_ms, int, limit_param, refuse_nul, store_error, to_ms,
};
use crate::model::{Agent, Conversation, Message, NewMessage, Note, Room, RoomKey, json_depth};
use crate::store::batch::Output;
use crate::store::{
    Answer, Appended, Customer, CustomerProfile, Decide, DomainChange, DomainKey, InboxEntry,
    InboxQuery, KeyKind, MAX_DATA_DEPTH, NewNote, Store, StoreError, StoredDomain, Transitioned,
    UsageGroup, UsageGrouping, UsageRecord,
};

#[async_trait]
impl Store for PostgresStore {
    async fn queue_append(&self, message: NewMessage) -> Result<Answer<Appended>, StoreError> {
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
        self.writer
            .enqueue(Op::Append(message), |o| match o {
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
        if !self.writer.is_open() {
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
        self.writer.queued()
    }

    async fn flush(&self) {
        self.writer.close();
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

//! The [`Store`] trait on SQLite: reads on the reader pool, writes queued to the writer.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::rows::{
    CONVERSATION_COLUMNS, message_at, row_to_conversation, row_to_message, select_room,
};
use super::writer::Op;
use super::{SqliteStore, from_ms, limit_param, seq_param, to_ms};
use crate::model::{Agent, Conversation, Message, NewMessage, Note, Room, RoomKey, json_depth};
use crate::store::batch::Output;
use crate::store::{
    Answer, Appended, Customer, CustomerProfile, Decide, DomainChange, DomainKey, InboxEntry,
    InboxQuery, KeyKind, MAX_DATA_DEPTH, NewNote, Store, StoreError, StoredDomain, Transitioned,
    UsageGroup, UsageGrouping, UsageRecord,
};

#[async_trait]
impl Store for SqliteStore {
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
        let by = created_by.map(str::to_owned);
        self.write(Op::EnsureRoom(key.clone(), by), |o| match o {
            Output::Room(r) => Some(r),
            _ => None,
        })
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
        self.write(Op::MarkRead(key.clone(), user, seq), |o| match o {
            Output::Seq(s) => Some(s),
            _ => None,
        })
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
        self.write(Op::UpsertCustomer(d, u, profile), |o| match o {
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
        self.write(Op::Transition(key.clone(), by, decide), |o| match o {
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
        self.write(Op::AddNote(note), |o| match o {
            Output::Note(n) => Some(n),
            _ => None,
        })
        .await
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
        if !self.writer.is_open() {
            return Err(StoreError::Closed);
        }
        self.read(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|_| ())
    }

    fn queued(&self) -> usize {
        self.writer.queued()
    }

    async fn flush(&self) {
        self.writer.close();
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

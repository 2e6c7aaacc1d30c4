//! The SQL of each write, run by the writer inside its open transaction.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::rows::{row_to_message, select_conversation, select_room};
use super::webhooks::insert_outbox;
use super::writer::{RoomSlot, Writer};
use super::{seq_param, to_ms, unavailable};
use crate::config::WebhookEvent;
use crate::model::{Conversation, Message, NewMessage, Note, Room, RoomKey, now_ms};
use crate::store::stats::{self, AI_CONVERSATIONS, AI_ONLY, CONVERSATIONS};
use crate::store::webhooks::{
    Partition, conversation_event, conversation_payload, message_payload,
};
use crate::store::{Appended, Decide, DomainChange, NewNote, StoreError, Transitioned};

impl Writer {
    /// Applies a [`DomainChange`] inside the open transaction.
    pub(super) fn change_domains(&self, change: &DomainChange) -> Result<u64, StoreError> {
        let now = to_ms(now_ms());
        let changed = (|| {
            match change {
            DomainChange::Declare { id, name } => self.conn.prepare_cached(
                "INSERT INTO domains (id, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            )?.execute(params![id, name, now]),
            DomainChange::Save { id, name, settings } => self.conn.prepare_cached(
                "INSERT INTO domains (id, name, settings, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name,
                   settings = excluded.settings, updated_at = excluded.updated_at",
            )?.execute(params![id, name, settings, now]),
            DomainChange::Remove { id } => {
                self.conn
                    .prepare_cached("DELETE FROM domain_keys WHERE domain_id = ?1")?
                    .execute(params![id])?;
                self.conn.prepare_cached(
                    "UPDATE domains SET settings = NULL, updated_at = ?2
                     WHERE id = ?1 AND settings IS NOT NULL",
                )?.execute(params![id, now])
            }
            DomainChange::AddKey(key) => self.conn.prepare_cached(
                "INSERT INTO domain_keys (id, domain_id, kind, public_id, secret, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?.execute(params![
                key.id,
                key.domain_id,
                key.kind.as_str(),
                key.public_id,
                key.secret.expose(),
                to_ms(key.created_at),
                key.expires_at.map(to_ms),
            ]),
            DomainChange::ExpireKeys { domain_id, kind, expires_at, keep } => self.conn.prepare_cached(
                "UPDATE domain_keys SET expires_at = ?3
                 WHERE domain_id = ?1 AND kind = ?2 AND id IS NOT ?4
                   AND (expires_at IS NULL OR expires_at > ?3)",
            )?.execute(params![domain_id, kind.as_str(), to_ms(*expires_at), keep]),
            DomainChange::RemoveKey { domain_id, id } => self.conn
                .prepare_cached("DELETE FROM domain_keys WHERE domain_id = ?1 AND id = ?2")?
                .execute(params![domain_id, id]),
            DomainChange::PutDocument {
                domain_id,
                name,
                text,
            } => self
                .conn
                .prepare_cached(
                    "INSERT INTO knowledge_documents (domain_id, name, text, updated_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (domain_id, name) DO UPDATE SET
                       text = excluded.text, updated_at = excluded.updated_at",
                )?
                .execute(params![domain_id, name, text, now]),
            DomainChange::RemoveDocument { domain_id, name } => self
                .conn
                .prepare_cached("DELETE FROM knowledge_documents WHERE domain_id = ?1 AND name = ?2")?
                .execute(params![domain_id, name]),
            DomainChange::InstallSetting { name, value } => self.conn
                .prepare_cached("INSERT OR IGNORE INTO server_settings (name, value) VALUES (?1, ?2)")?
                .execute(params![name, value]),
        }
        })();
        changed.map(|n| n as u64).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::Invalid(format!("conflicts with a stored value: {e}"))
            }
            e => unavailable(e),
        })
    }

    /// The room's row, created if missing, with its last `seq` as of the open batch.
    pub(super) fn ensure_room(
        &mut self,
        key: &RoomKey,
        created_by: Option<&str>,
    ) -> Result<(RoomSlot, Room), StoreError> {
        if let Some((rid, room)) = select_room(&self.conn, key).map_err(unavailable)? {
            let slot = self.rooms.get(key).copied().unwrap_or(RoomSlot {
                rid,
                last_seq: room.last_seq,
            });
            let room = Room {
                last_seq: slot.last_seq,
                ..room
            };
            return Ok((slot, room));
        }
        let now = now_ms();
        let rid = self
            .conn
            .prepare_cached(
                "INSERT INTO rooms (domain_id, id, kind, created_by, created_at, updated_at)
                 VALUES (?1, ?2, 'support', ?3, ?4, ?4) RETURNING rid",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![&*key.domain_id, &*key.room_id, created_by, to_ms(now)],
                    |r| r.get(0),
                )
            })
            .map_err(unavailable)?;
        let slot = RoomSlot { rid, last_seq: 0 };
        self.rooms.insert(key.clone(), slot);
        self.dirty = true;
        if stats::counted(&key.room_id) {
            self.tally.add(&key.domain_id, to_ms(now), CONVERSATIONS, 1);
        }
        let room = Room {
            key: key.clone(),
            kind: "support".to_owned(),
            created_by: created_by.map(str::to_owned),
            last_seq: 0,
            created_at: now,
        };
        Ok((slot, room))
    }

    /// The room's key and last `seq`, from the cache or the database (creating the room).
    pub(super) fn room_slot(
        &mut self,
        key: &RoomKey,
        created_by: &str,
    ) -> Result<RoomSlot, StoreError> {
        if let Some(slot) = self.rooms.get(key) {
            return Ok(*slot);
        }
        let (slot, _) = self.ensure_room(key, Some(created_by))?;
        self.rooms.insert(key.clone(), slot);
        Ok(slot)
    }

    pub(super) fn append(&mut self, m: &NewMessage) -> Result<Appended, StoreError> {
        let slot = self.room_slot(&m.room, &m.author.user_id)?;
        let seq = slot.last_seq + 1;
        let message = m.stored(uuid::Uuid::now_v7().to_string(), seq, now_ms());
        let data = message.data.as_ref().map(serde_json::Value::to_string);
        // A repeated client_message_id inserts nothing; only then is the original looked up,
        // so the usual append is a single statement.
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind,
                   content, data, client_message_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (room, author_id, client_message_id)
                 WHERE client_message_id IS NOT NULL
                 DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    slot.rid,
                    seq_param(seq),
                    message.id,
                    message.author.user_id,
                    message.author.name,
                    message.author.role,
                    message.kind,
                    message.content,
                    data,
                    message.client_message_id,
                    to_ms(message.created_at),
                ])
            })
            .map_err(unavailable)?;
        if inserted == 0 {
            let existing = self
                .conn
                .prepare_cached(concat!(
                    "SELECT ",
                    message_columns!(),
                    messages_join!(),
                    "WHERE m.room = ?1 AND m.author_id = ?2 AND m.client_message_id = ?3"
                ))
                .and_then(|mut s| {
                    s.query_row(
                        params![slot.rid, &m.author.user_id, &m.client_message_id],
                        row_to_message,
                    )
                })
                .map_err(unavailable)?;
            return Ok(Appended {
                message: Arc::new(existing),
                duplicate: true,
            });
        }
        if let Some(entry) = self.rooms.get_mut(&m.room) {
            entry.last_seq = seq;
        }
        self.dirty = true;
        self.count_message(&message, slot.rid)?;
        let events = self.subscriptions.rows(
            &m.room.domain_id,
            WebhookEvent::MessageCreated,
            Partition::Room(&m.room.room_id),
            || message_payload(&message),
        );
        insert_outbox(&self.conn, &events).map_err(unavailable)?;
        Ok(Appended {
            message: Arc::new(message),
            duplicate: false,
        })
    }

    /// Counts a stored message for the statistics: its role's counter and, for the room's
    /// first AI reply, the room's AI conversation counters.
    fn count_message(&mut self, message: &Message, rid: i64) -> Result<(), StoreError> {
        let room = &message.room;
        if !stats::counted(&room.room_id) {
            return Ok(());
        }
        let at = to_ms(message.created_at);
        let metric = stats::message_metric(&message.author.role);
        self.tally.add(&room.domain_id, at, &metric, 1);
        if message.author.role != stats::ASSISTANT_ROLE {
            return Ok(());
        }
        let first = self.first_time(
            "UPDATE rooms SET ai_replied_at = ?2 WHERE rid = ?1 AND ai_replied_at IS NULL
             RETURNING created_at, handed_over_at",
            rid,
            at,
        )?;
        if let Some((created, handed_over)) = first {
            self.tally
                .add(&room.domain_id, created, AI_CONVERSATIONS, 1);
            if handed_over.is_none() {
                self.tally.add(&room.domain_id, created, AI_ONLY, 1);
            }
        }
        Ok(())
    }

    /// Counts a hand-off transition of the room `rid` for the statistics; the room's first
    /// hand-over to people takes back its AI-only count.
    fn count_transition(
        &mut self,
        rid: i64,
        current: &Conversation,
        next: &Conversation,
    ) -> Result<(), StoreError> {
        let key = &next.room;
        let at = to_ms(next.updated_at);
        for metric in stats::transition_metrics(current, next) {
            self.tally.add(&key.domain_id, at, metric, 1);
        }
        if !stats::hands_over(current, next) {
            return Ok(());
        }
        let first = self.first_time(
            "UPDATE rooms SET handed_over_at = ?2 WHERE rid = ?1 AND handed_over_at IS NULL
             RETURNING created_at, ai_replied_at",
            rid,
            at,
        )?;
        if let Some((created, Some(_))) = first {
            self.tally.add(&key.domain_id, created, AI_ONLY, -1);
        }
        Ok(())
    }

    /// Runs `sql`, which sets one of the room `rid`'s "first time" columns to `at` if it
    /// is unset, returning the room's creation time and its other such column; `None`
    /// when the column was set already.
    fn first_time(
        &self,
        sql: &str,
        rid: i64,
        at: i64,
    ) -> Result<Option<(i64, Option<i64>)>, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut st| {
                st.query_row(params![rid, at], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(unavailable)
    }

    /// Writes the counters the open transaction moved.
    pub(super) fn write_tally(&mut self) -> Result<(), StoreError> {
        if self.tally.is_empty() {
            return Ok(());
        }
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT INTO activity_hours (domain_id, at, metric, writer, n)
                 VALUES (?1, ?2, ?3, '', ?4)
                 ON CONFLICT (domain_id, at, metric, writer) DO UPDATE SET n = n + excluded.n",
            )
            .map_err(unavailable)?;
        for (domain, at, metric, n) in self.tally.take() {
            st.execute(params![domain, at, metric, n])
                .map_err(unavailable)?;
        }
        Ok(())
    }

    pub(super) fn mark_read(
        &mut self,
        key: &RoomKey,
        user: &str,
        seq: u64,
    ) -> Result<u64, StoreError> {
        let last = match self.rooms.get(key) {
            Some(slot) => slot.last_seq,
            None => select_room(&self.conn, key)
                .map_err(unavailable)?
                .map_or(0, |(_, r)| r.last_seq),
        };
        let seq = seq.min(last);
        let now = to_ms(now_ms());
        let stored: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO read_states (domain_id, room_id, user_id, seq, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (domain_id, room_id, user_id) DO UPDATE SET
                   seq = MAX(read_states.seq, excluded.seq), updated_at = excluded.updated_at
                 RETURNING seq",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![&*key.domain_id, &*key.room_id, user, seq_param(seq), now],
                    |r| r.get(0),
                )
            })
            .map_err(unavailable)?;
        Ok(u64::try_from(stored).unwrap_or(0))
    }

    /// Decides and stores a hand-off transition (see [`Store::transition`]).
    pub(super) fn transition(
        &mut self,
        key: &RoomKey,
        created_by: Option<&str>,
        decide: &Decide,
    ) -> Result<Transitioned, StoreError> {
        let (slot, _) = self.ensure_room(key, created_by)?;
        self.rooms.insert(key.clone(), slot);
        let current = select_conversation(&self.conn, slot.rid, key)
            .map_err(unavailable)?
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
        self.conn
            .prepare_cached(
                "INSERT INTO conversations (room, domain_id, status, assignee_id, assignee_name,
                   waiting_since, assigned_at, first_response_at, resolved_at, updated_at, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (room) DO UPDATE SET status = excluded.status,
                   assignee_id = excluded.assignee_id, assignee_name = excluded.assignee_name,
                   waiting_since = excluded.waiting_since, assigned_at = excluded.assigned_at,
                   first_response_at = excluded.first_response_at,
                   resolved_at = excluded.resolved_at, updated_at = excluded.updated_at,
                   version = excluded.version",
            )
            .and_then(|mut st| {
                st.execute(params![
                    slot.rid,
                    &*key.domain_id,
                    next.status.as_str(),
                    next.assignee.as_ref().map(|a| &a.user_id),
                    next.assignee.as_ref().map(|a| &a.name),
                    opt(next.waiting_since),
                    opt(next.assigned_at),
                    opt(next.first_response_at),
                    opt(next.resolved_at),
                    to_ms(next.updated_at),
                    i64::try_from(next.version).unwrap_or(i64::MAX),
                ])
            })
            .map_err(unavailable)?;
        self.count_transition(slot.rid, &current, &next)?;
        let appended = self.append(&message)?;
        next.status_seq = appended.message.seq;
        self.conn
            .prepare_cached("UPDATE conversations SET status_seq = ?2 WHERE room = ?1")
            .and_then(|mut st| st.execute(params![slot.rid, seq_param(next.status_seq)]))
            .map_err(unavailable)?;
        if let Some(event) = conversation_event(&current, &next) {
            let events = self.subscriptions.rows(
                &key.domain_id,
                event,
                Partition::Room(&key.room_id),
                || conversation_payload(&current, &next),
            );
            insert_outbox(&self.conn, &events).map_err(unavailable)?;
        }
        Ok(Transitioned {
            conversation: next,
            message: Some(appended),
        })
    }

    pub(super) fn first_response(
        &mut self,
        key: &RoomKey,
        at: DateTime<Utc>,
    ) -> Result<Option<Conversation>, StoreError> {
        let Some((rid, _)) = select_room(&self.conn, key).map_err(unavailable)? else {
            return Ok(None);
        };
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE conversations SET first_response_at = ?2, updated_at = ?2,
                   version = version + 1
                 WHERE room = ?1 AND first_response_at IS NULL
                   AND status IN ('waiting', 'assigned')",
            )
            .and_then(|mut st| st.execute(params![rid, to_ms(at)]))
            .map_err(unavailable)?;
        if changed == 0 {
            return Ok(None);
        }
        let conversation = select_conversation(&self.conn, rid, key).map_err(unavailable)?;
        if let Some(ms) = conversation
            .as_ref()
            .and_then(Conversation::first_response_ms)
        {
            self.conn
                .prepare_cached(
                    "INSERT INTO first_responses (domain_id, at, ms, room) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut st| st.execute(params![&*key.domain_id, to_ms(at), ms, rid]))
                .map_err(unavailable)?;
        }
        Ok(conversation)
    }

    pub(super) fn add_note(&mut self, note: &NewNote) -> Result<Note, StoreError> {
        let Some((rid, _)) = select_room(&self.conn, &note.room).map_err(unavailable)? else {
            return Err(StoreError::Invalid("the room does not exist".into()));
        };
        let stored = Note {
            id: uuid::Uuid::now_v7().to_string(),
            room: note.room.clone(),
            author: note.author.clone(),
            text: note.text.clone(),
            created_at: now_ms(),
        };
        self.conn
            .prepare_cached(
                "INSERT INTO notes (id, room, author_id, author_name, text, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    stored.id,
                    rid,
                    stored.author.user_id,
                    stored.author.name,
                    stored.text,
                    to_ms(stored.created_at)
                ])
            })
            .map_err(unavailable)?;
        Ok(stored)
    }
}

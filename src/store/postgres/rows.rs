//! Rows to models: the column lists the queries select and the functions reading them back.

use std::collections::HashMap;

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{count, from_ms};
use crate::model::{Author, Conversation, Message, Room, RoomKey};
use crate::store::ConversationColumns;
use crate::store::stats::Tally;

/// Column list matching [`message_at`], for `FROM messages m JOIN rooms r`.
macro_rules! message_columns {
    () => {
        "r.domain_id, r.id, m.seq, m.id, m.author_id, m.author_name, m.author_role, \
         m.kind, m.content, m.data, m.client_message_id, m.created_at"
    };
}

/// Messages with their room's public key.
macro_rules! messages_join {
    () => {
        " FROM messages m JOIN rooms r ON r.rid = m.room "
    };
}

/// Columns matching [`conversation_at`] (table alias `c`).
macro_rules! conversation_columns {
    () => {
        "c.status, c.assignee_id, c.assignee_name, c.waiting_since, c.assigned_at, \
         c.first_response_at, c.resolved_at, c.updated_at, c.version, c.status_seq"
    };
}

/// The columns of a room row as [`LockedRoom::from_row`] reads them.
macro_rules! room_columns {
    () => {
        "rid, kind, created_by, created_at, last_seq, ai_replied_at, handed_over_at"
    };
}

/// A JSON document stored as text, decoded.
pub(super) fn json_column(row: &PgRow, i: usize) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let text: Option<String> = row.try_get(i)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| sqlx::Error::ColumnDecode {
            index: i.to_string(),
            source: Box::new(e),
        })
    })
    .transpose()
}

/// A message from the [`message_columns`] starting at column `at`.
pub(super) fn message_at(row: &PgRow, at: usize) -> Result<Message, sqlx::Error> {
    let domain: String = row.try_get(at)?;
    let room: String = row.try_get(at + 1)?;
    let seq: i64 = row.try_get(at + 2)?;
    Ok(Message {
        room: RoomKey::new(domain, room),
        seq: count(seq),
        id: row.try_get(at + 3)?,
        author: Author {
            user_id: row.try_get(at + 4)?,
            name: row.try_get(at + 5)?,
            role: row.try_get(at + 6)?,
        },
        kind: row.try_get(at + 7)?,
        content: row.try_get(at + 8)?,
        data: json_column(row, at + 9)?,
        client_message_id: row.try_get(at + 10)?,
        created_at: from_ms(row.try_get(at + 11)?),
    })
}

/// A conversation from the [`conversation_columns`] starting at column `at`; all `NULL`
/// (no row) is a room with the bot.
pub(super) fn conversation_at(
    row: &PgRow,
    at: usize,
    key: RoomKey,
) -> Result<Conversation, sqlx::Error> {
    let time = |i: usize| row.try_get::<Option<i64>, _>(at + i);
    ConversationColumns {
        status: row.try_get(at)?,
        assignee: (row.try_get(at + 1)?, row.try_get(at + 2)?),
        times: [time(3)?, time(4)?, time(5)?, time(6)?, time(7)?],
        version: row.try_get::<Option<i64>, _>(at + 8)?.unwrap_or(0),
        status_seq: row.try_get::<Option<i64>, _>(at + 9)?.unwrap_or(0),
    }
    .into_conversation(key)
    .map_err(|e| sqlx::Error::ColumnDecode {
        index: at.to_string(),
        source: e.into(),
    })
}

/// A room row locked by the open transaction (or read, outside one).
#[derive(Debug, Clone)]
pub(super) struct LockedRoom {
    pub(super) rid: i64,
    pub(super) kind: String,
    pub(super) created_by: Option<String>,
    pub(super) created_at: i64,
    /// As of the open transaction: raised by each append it makes.
    pub(super) last_seq: i64,
    /// Its first `assistant` message, as of the open transaction (`docs/stats.md`).
    pub(super) ai_replied_at: Option<i64>,
    /// Its first hand-over to people, as of the open transaction.
    pub(super) handed_over_at: Option<i64>,
}

impl LockedRoom {
    pub(super) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            rid: row.try_get(0)?,
            kind: row.try_get(1)?,
            created_by: row.try_get(2)?,
            created_at: row.try_get(3)?,
            last_seq: row.try_get(4)?,
            ai_replied_at: row.try_get(5)?,
            handed_over_at: row.try_get(6)?,
        })
    }

    pub(super) fn room(&self, key: &RoomKey) -> Room {
        Room {
            key: key.clone(),
            kind: self.kind.clone(),
            created_by: self.created_by.clone(),
            last_seq: count(self.last_seq),
            created_at: from_ms(self.created_at),
        }
    }
}

/// What the open transaction holds: the rooms it locked, and the statistics' counters it
/// moved (written before its `COMMIT`).
#[derive(Debug, Default)]
pub(super) struct Locks {
    rooms: HashMap<RoomKey, LockedRoom>,
    pub(super) tally: Tally,
}

impl Locks {
    pub(super) fn new() -> Self {
        Self::default()
    }
}

impl std::ops::Deref for Locks {
    type Target = HashMap<RoomKey, LockedRoom>;

    fn deref(&self) -> &Self::Target {
        &self.rooms
    }
}

impl std::ops::DerefMut for Locks {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rooms
    }
}

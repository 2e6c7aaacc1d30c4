//! Rows to models: the column lists the queries select and the functions reading them back.

use rusqlite::{Connection, OptionalExtension, params};

use super::from_ms;
use crate::model::{Author, Conversation, Message, Room, RoomKey};
use crate::store::ConversationColumns;

/// Column list matching [`row_to_message`], for `FROM messages m JOIN rooms r`
/// ([`messages_join`]).
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

pub(super) fn row_to_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    message_at(row, 0)
}

/// A message from the [`message_columns`] starting at column `at`.
pub(super) fn message_at(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Message> {
    let domain: String = row.get(at)?;
    let room: String = row.get(at + 1)?;
    let seq: i64 = row.get(at + 2)?;
    let data: Option<String> = row.get(at + 9)?;
    let data = match data {
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                at + 9,
                rusqlite::types::Type::Text,
                Box::new(e),
            )
        })?),
        None => None,
    };
    Ok(Message {
        room: RoomKey::new(domain, room),
        seq: u64::try_from(seq).unwrap_or(0),
        id: row.get(at + 3)?,
        author: Author {
            user_id: row.get(at + 4)?,
            name: row.get(at + 5)?,
            role: row.get(at + 6)?,
        },
        kind: row.get(at + 7)?,
        content: row.get(at + 8)?,
        data,
        client_message_id: row.get(at + 10)?,
        created_at: from_ms(row.get(at + 11)?),
    })
}

/// A room's last `seq` is not stored apart: it is the largest entry of the room in the
/// `(room, seq)` index, one seek, so appends never rewrite the `rooms` row.
pub(super) fn select_room(
    conn: &Connection,
    key: &RoomKey,
) -> rusqlite::Result<Option<(i64, Room)>> {
    conn.prepare_cached(
        "SELECT r.rid, r.kind, r.created_by, r.created_at, \
           (SELECT COALESCE(MAX(m.seq), 0) FROM messages m WHERE m.room = r.rid) \
         FROM rooms r WHERE r.domain_id = ?1 AND r.id = ?2",
    )?
    .query_row(params![&*key.domain_id, &*key.room_id], |row| {
        let last: i64 = row.get(4)?;
        Ok((
            row.get(0)?,
            Room {
                key: key.clone(),
                kind: row.get(1)?,
                created_by: row.get(2)?,
                created_at: from_ms(row.get(3)?),
                last_seq: u64::try_from(last).unwrap_or(0),
            },
        ))
    })
    .optional()
}

/// Columns matching [`row_to_conversation`] (table alias `c`).
pub(super) const CONVERSATION_COLUMNS: &str = "c.status, c.assignee_id, c.assignee_name, c.waiting_since, \
     c.assigned_at, c.first_response_at, c.resolved_at, c.updated_at, c.version, c.status_seq";

/// A conversation from [`CONVERSATION_COLUMNS`] starting at column `at`; a room without a
/// row (all `NULL`) is with the bot.
pub(super) fn row_to_conversation(
    row: &rusqlite::Row<'_>,
    at: usize,
    key: RoomKey,
) -> rusqlite::Result<Conversation> {
    let time = |i: usize| row.get::<_, Option<i64>>(at + i);
    ConversationColumns {
        status: row.get(at)?,
        assignee: (row.get(at + 1)?, row.get(at + 2)?),
        times: [time(3)?, time(4)?, time(5)?, time(6)?, time(7)?],
        version: row.get::<_, Option<i64>>(at + 8)?.unwrap_or(0),
        status_seq: row.get::<_, Option<i64>>(at + 9)?.unwrap_or(0),
    }
    .into_conversation(key)
    .map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, e.into())
    })
}

pub(super) fn select_conversation(
    conn: &Connection,
    rid: i64,
    key: &RoomKey,
) -> rusqlite::Result<Option<Conversation>> {
    conn.prepare_cached(&format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.room = ?1"
    ))?
    .query_row(params![rid], |row| row_to_conversation(row, 0, key.clone()))
    .optional()
}

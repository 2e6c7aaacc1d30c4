//! [`Notifications`] on SQLite: reads on the reader pool; writes as jobs of the writer
//! thread, group-committed with everything else (one writer: a user's counter and the rows
//! it numbers change in one step).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::{SqliteStore, from_ms, limit_param, seq_param, to_ms, unavailable};
use crate::config::WebhookEvent;
use crate::store::StoreError;
use crate::store::notifications::{
    NewNotification, Notification, NotificationType, Notifications, UnreadCount,
};
use crate::store::webhooks::Partition;
use crate::store::webhooks::{Subscriptions, notification_payload};

/// Columns matching [`notification_at`].
const COLUMNS: &str =
    "id, domain_id, user_id, org_id, task_id, type, content, data, read, created_at, seq";

/// A notification from [`COLUMNS`].
fn notification_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<Notification> {
    let kind: String = row.get(5)?;
    let seq: i64 = row.get(10)?;
    Ok(Notification {
        id: row.get(0)?,
        domain_id: row.get(1)?,
        user_id: row.get(2)?,
        org_id: row.get(3)?,
        task_id: row.get(4)?,
        kind: NotificationType::parse(&kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                5,
                rusqlite::types::Type::Text,
                format!("unknown notification type {kind:?}").into(),
            )
        })?,
        content: row.get(6)?,
        data: row.get(7)?,
        read: row.get(8)?,
        created_at: from_ms(row.get(9)?),
        seq: u64::try_from(seq).unwrap_or(0),
    })
}

/// Stores `batch`, numbering each notification from its user's counter.
fn insert(
    conn: &Connection,
    batch: &[NewNotification],
    subscriptions: &Subscriptions,
) -> rusqlite::Result<Vec<Notification>> {
    let now = Utc::now();
    let mut next = conn.prepare_cached(
        "INSERT INTO notification_users (domain_id, user_id, last_seq) VALUES (?1, ?2, 1)
         ON CONFLICT (domain_id, user_id) DO UPDATE SET last_seq = last_seq + 1
         RETURNING last_seq",
    )?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO notifications (domain_id, user_id, seq, id, org_id, task_id, type,
           content, data, read, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10)",
    )?;
    let mut stored = Vec::with_capacity(batch.len());
    for n in batch {
        let seq: i64 = next.query_row(params![n.domain_id, n.user_id], |row| row.get(0))?;
        insert.execute(params![
            n.domain_id,
            n.user_id,
            seq,
            n.id,
            n.org_id,
            n.task_id,
            n.kind.as_str(),
            n.content,
            n.data,
            to_ms(now)
        ])?;
        // What reads give back: milliseconds.
        let notification = n.stored(u64::try_from(seq).unwrap_or(0), from_ms(to_ms(now)));
        let events = subscriptions.rows(
            &n.domain_id,
            WebhookEvent::NotificationCreated,
            Partition::User(&n.user_id),
            || notification_payload(&notification),
        );
        super::webhooks::insert_outbox(conn, &events)?;
        stored.push(notification);
    }
    Ok(stored)
}

/// Runs `query` (with `COLUMNS` selected) and collects the notifications.
fn collect(
    conn: &Connection,
    query: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Vec<Notification>> {
    let mut stmt = conn.prepare_cached(query)?;
    let rows = stmt.query_map(params, notification_at)?;
    rows.collect()
}

#[async_trait]
impl Notifications for SqliteStore {
    async fn add_notifications(
        &self,
        batch: Vec<NewNotification>,
    ) -> Result<Vec<Notification>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let subscriptions = std::sync::Arc::clone(&self.subscriptions);
        self.run(move |conn| insert(conn, &batch, &subscriptions).map_err(unavailable))
            .await
    }

    async fn unread_notifications(
        &self,
        domain_id: &str,
        user_id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let (domain, user) = (domain_id.to_owned(), user_id.to_owned());
        let before = before.map_or(i64::MAX, seq_param);
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {COLUMNS} FROM notifications
                     WHERE domain_id = ?1 AND user_id = ?2 AND read = 0 AND seq < ?3
                     ORDER BY seq DESC LIMIT ?4"
                ),
                params![domain, user, before, limit_param(limit)],
            )
        })
        .await
    }

    async fn unread_count(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<UnreadCount, StoreError> {
        let (domain, user) = (domain_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            let (unread, last_seq): (i64, i64) = c
                .prepare_cached(
                    "SELECT
                       (SELECT COUNT(*) FROM notifications
                        WHERE domain_id = ?1 AND user_id = ?2 AND read = 0),
                       COALESCE((SELECT last_seq FROM notification_users
                        WHERE domain_id = ?1 AND user_id = ?2), 0)",
                )?
                .query_row(params![domain, user], |row| Ok((row.get(0)?, row.get(1)?)))?;
            Ok(UnreadCount {
                unread: u64::try_from(unread).unwrap_or(0),
                last_seq: u64::try_from(last_seq).unwrap_or(0),
            })
        })
        .await
    }

    async fn notifications_after(
        &self,
        domain_id: &str,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let (domain, user) = (domain_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            collect(
                c,
                &format!(
                    "SELECT {COLUMNS} FROM notifications
                     WHERE domain_id = ?1 AND user_id = ?2 AND seq > ?3
                     ORDER BY seq LIMIT ?4"
                ),
                params![domain, user, seq_param(after), limit_param(limit)],
            )
        })
        .await
    }

    async fn task_notifications(
        &self,
        domain_id: &str,
        user_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let (domain, user, task) = (domain_id.to_owned(), user_id.to_owned(), task_id.to_owned());
        self.read(move |c| {
            let mut latest = collect(
                c,
                &format!(
                    "SELECT {COLUMNS} FROM notifications
                     WHERE domain_id = ?1 AND user_id = ?2 AND task_id = ?3
                     ORDER BY seq DESC LIMIT ?4"
                ),
                params![domain, user, task, limit_param(limit)],
            )?;
            latest.reverse();
            Ok(latest)
        })
        .await
    }

    async fn mark_notifications_read(
        &self,
        domain_id: &str,
        user_id: &str,
        ids: Vec<String>,
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let (domain, user) = (domain_id.to_owned(), user_id.to_owned());
        // The ids travel as one JSON array parameter, however many there are.
        let ids = serde_json::to_string(&ids).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.run(move |conn| {
            let marked = conn
                .prepare_cached(
                    "UPDATE notifications SET read = 1
                     WHERE domain_id = ?1 AND user_id = ?2 AND read = 0
                       AND id IN (SELECT value FROM json_each(?3))",
                )
                .and_then(|mut s| s.execute(params![domain, user, ids]))
                .map_err(unavailable)?;
            Ok(marked as u64)
        })
        .await
    }

    async fn mark_all_notifications_read(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<u64, StoreError> {
        let (domain, user) = (domain_id.to_owned(), user_id.to_owned());
        self.run(move |conn| {
            let marked = conn
                .prepare_cached(
                    "UPDATE notifications SET read = 1
                     WHERE domain_id = ?1 AND user_id = ?2 AND read = 0",
                )
                .and_then(|mut s| s.execute(params![domain, user]))
                .map_err(unavailable)?;
            Ok(marked as u64)
        })
        .await
    }

    async fn expire_notifications(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.run(move |conn| {
            let gone = conn
                .prepare_cached("DELETE FROM notifications WHERE created_at < ?1")
                .and_then(|mut s| s.execute(params![to_ms(before)]))
                .map_err(unavailable)?;
            Ok(gone as u64)
        })
        .await
    }
}

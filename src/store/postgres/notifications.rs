//! [`Notifications`] on PostgreSQL. A batch is one transaction: each user's counter row is
//! raised (and so locked until commit) before that user's notifications are inserted, so
//! a user's notifications commit in `seq` order whichever nodes send them.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{PostgresStore, count, from_ms, limit_param, refuse_nul, store_error, to_ms};
use crate::config::WebhookEvent;
use crate::store::StoreError;
use crate::store::notifications::{
    NewNotification, Notification, NotificationType, Notifications, UnreadCount,
};
use crate::store::webhooks::Partition;
use crate::store::webhooks::notification_payload;

/// Columns matching [`notification_at`].
const COLUMNS: &str =
    "id, domain_id, user_id, org_id, task_id, type, content, data, read, created_at, seq";

/// A notification from [`COLUMNS`].
fn notification_at(row: &PgRow) -> Result<Notification, StoreError> {
    let get = |e: sqlx::Error| store_error(e);
    let kind: String = row.try_get(5).map_err(get)?;
    let seq: i64 = row.try_get(10).map_err(get)?;
    Ok(Notification {
        id: row.try_get(0).map_err(get)?,
        domain_id: row.try_get(1).map_err(get)?,
        user_id: row.try_get(2).map_err(get)?,
        org_id: row.try_get(3).map_err(get)?,
        task_id: row.try_get(4).map_err(get)?,
        kind: NotificationType::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown notification type {kind:?}")))?,
        content: row.try_get(6).map_err(get)?,
        data: row.try_get(7).map_err(get)?,
        read: row.try_get(8).map_err(get)?,
        created_at: from_ms(row.try_get(9).map_err(get)?),
        seq: count(seq),
    })
}

fn all_at(rows: &[PgRow]) -> Result<Vec<Notification>, StoreError> {
    rows.iter().map(notification_at).collect()
}

/// A `seq` as PostgreSQL's `BIGINT`.
fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

#[async_trait]
impl Notifications for PostgresStore {
    async fn add_notifications(
        &self,
        batch: Vec<NewNotification>,
    ) -> Result<Vec<Notification>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for n in &batch {
            let mut fields = vec![
                n.id.as_str(),
                &n.domain_id,
                &n.user_id,
                n.kind.as_str(),
                &n.content,
            ];
            fields.extend(n.org_id.as_deref());
            fields.extend(n.task_id.as_deref());
            fields.extend(n.data.as_deref());
            refuse_nul(&fields)?;
        }
        let now = from_ms(to_ms(Utc::now()));
        self.read("a notification write", async {
            let mut tx = self.pool.begin().await?;
            let mut stored = Vec::with_capacity(batch.len());
            for n in &batch {
                let seq: i64 = sqlx::query_scalar(
                    "INSERT INTO notification_users (domain_id, user_id, last_seq)
                     VALUES ($1, $2, 1)
                     ON CONFLICT (domain_id, user_id)
                       DO UPDATE SET last_seq = notification_users.last_seq + 1
                     RETURNING last_seq",
                )
                .bind(&n.domain_id)
                .bind(&n.user_id)
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO notifications (domain_id, user_id, seq, id, org_id, task_id,
                       type, content, data, read, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, FALSE, $10)",
                )
                .bind(&n.domain_id)
                .bind(&n.user_id)
                .bind(seq)
                .bind(&n.id)
                .bind(&n.org_id)
                .bind(&n.task_id)
                .bind(n.kind.as_str())
                .bind(&n.content)
                .bind(&n.data)
                .bind(to_ms(now))
                .execute(&mut *tx)
                .await?;
                let notification = n.stored(count(seq), now);
                let events = self.subscriptions.rows(
                    &n.domain_id,
                    WebhookEvent::NotificationCreated,
                    Partition::User(&n.user_id),
                    || notification_payload(&notification),
                );
                super::webhooks::insert_outbox(&mut tx, &events).await?;
                stored.push(notification);
            }
            tx.commit().await?;
            Ok(stored)
        })
        .await
    }

    async fn unread_notifications(
        &self,
        domain_id: &str,
        user_id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let rows = self
            .read(
                "a notification read",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM notifications
                     WHERE domain_id = $1 AND user_id = $2 AND NOT read AND seq < $3
                     ORDER BY seq DESC LIMIT $4"
                ))
                .bind(domain_id)
                .bind(user_id)
                .bind(before.map_or(i64::MAX, seq_param))
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        all_at(&rows)
    }

    async fn unread_count(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<UnreadCount, StoreError> {
        let (unread, last_seq): (i64, i64) = self
            .read(
                "a notification count",
                sqlx::query_as(
                    "SELECT
                       (SELECT count(*) FROM notifications
                        WHERE domain_id = $1 AND user_id = $2 AND NOT read),
                       COALESCE((SELECT last_seq FROM notification_users
                        WHERE domain_id = $1 AND user_id = $2), 0)",
                )
                .bind(domain_id)
                .bind(user_id)
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(UnreadCount {
            unread: count(unread),
            last_seq: count(last_seq),
        })
    }

    async fn notifications_after(
        &self,
        domain_id: &str,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let rows = self
            .read(
                "a notification read",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM notifications
                     WHERE domain_id = $1 AND user_id = $2 AND seq > $3
                     ORDER BY seq LIMIT $4"
                ))
                .bind(domain_id)
                .bind(user_id)
                .bind(seq_param(after))
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        all_at(&rows)
    }

    async fn task_notifications(
        &self,
        domain_id: &str,
        user_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let rows = self
            .read(
                "a notification read",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM notifications
                     WHERE domain_id = $1 AND user_id = $2 AND task_id = $3
                     ORDER BY seq DESC LIMIT $4"
                ))
                .bind(domain_id)
                .bind(user_id)
                .bind(task_id)
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        let mut latest = all_at(&rows)?;
        latest.reverse();
        Ok(latest)
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
        let marked = self
            .read(
                "a notification write",
                sqlx::query(
                    "UPDATE notifications SET read = TRUE
                     WHERE domain_id = $1 AND user_id = $2 AND NOT read AND id = ANY($3)",
                )
                .bind(domain_id)
                .bind(user_id)
                .bind(&ids)
                .execute(&self.pool),
            )
            .await?;
        Ok(marked.rows_affected())
    }

    async fn mark_all_notifications_read(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<u64, StoreError> {
        let marked = self
            .read(
                "a notification write",
                sqlx::query(
                    "UPDATE notifications SET read = TRUE
                     WHERE domain_id = $1 AND user_id = $2 AND NOT read",
                )
                .bind(domain_id)
                .bind(user_id)
                .execute(&self.pool),
            )
            .await?;
        Ok(marked.rows_affected())
    }

    async fn expire_notifications(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let gone = self
            .read(
                "a notification expiry",
                sqlx::query("DELETE FROM notifications WHERE created_at < $1")
                    .bind(to_ms(before))
                    .execute(&self.pool),
            )
            .await?;
        Ok(gone.rows_affected())
    }
}

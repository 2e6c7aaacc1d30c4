//! [`Outbox`] on PostgreSQL, shared by every node: rows are inserted by the writes that
//! raise events, inside their transactions ([`insert_outbox`]); any node claims partition
//! heads with a lease, `FOR UPDATE SKIP LOCKED`, so two nodes never take the same row and a
//! partition is never in two nodes' hands while a lease runs.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use super::writer::lost_during_commit;
use super::writes::append_all;
use super::{PostgresStore, from_ms, limit_param, to_ms};
use crate::model::NewMessage;
use crate::store::batch::Failure;
use crate::store::webhooks::{
    Attempt, Claim, ClaimedRow, Delivery, DeliveryQuery, DeliveryStatus, NewOutboxRow, Outbox,
    Outcome, Partition, Subscriptions, message_payload,
};
use crate::store::{Appended, StoreError};

/// The advisory lock of a partition (`domain`, `endpoint`, `partition_key` columns), held
/// by a transaction that adds to it or ends its head, to the end of the transaction: the
/// one decides whether its row is the head while the other hands the head on, never both
/// at once.
macro_rules! partition_lock {
    ($domain:expr, $endpoint:expr, $partition:expr) => {
        concat!(
            "pg_advisory_xact_lock(hashtextextended(",
            $domain,
            " || chr(31) || ",
            $endpoint,
            " || chr(31) || ",
            $partition,
            ", 7))"
        )
    };
}

/// Writes `rows` in the open transaction (which must be one: the partitions' locks last
/// to its end), in their order, with one statement. A row is due at once only when it is
/// its partition's head (no earlier row of the partition pending, in the table or in
/// `rows`); the others wait, with no `next_attempt_at`, until the row before them ends
/// ([`promote`]).
pub(super) async fn insert_outbox(
    conn: &mut PgConnection,
    rows: &[NewOutboxRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&NewOutboxRow) -> &str| -> Vec<&str> { rows.iter().map(f).collect() };
    // The partitions' locks, in one order for every writer.
    sqlx::query(concat!(
        "SELECT ",
        partition_lock!("d", "e", "p"),
        " FROM (SELECT DISTINCT d, e, p
               FROM UNNEST($1::text[], $2::text[], $3::text[]) AS t(d, e, p)
               ORDER BY d, e, p) s"
    ))
    .bind(column(|r| &r.domain_id))
    .bind(column(|r| &r.endpoint))
    .bind(column(|r| &r.partition))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO webhook_outbox (id, domain_id, endpoint, partition_key, event, payload,
           created_at, next_attempt_at)
         SELECT id, domain_id, endpoint, partition_key, event, payload, $7,
           CASE WHEN t.first AND NOT EXISTS (
                  SELECT 1 FROM webhook_outbox p
                  WHERE p.status = 'pending' AND p.domain_id = t.domain_id
                    AND p.endpoint = t.endpoint AND p.partition_key = t.partition_key)
                THEN $7 END
         FROM (
           SELECT u.*, row_number() OVER (
                    PARTITION BY u.domain_id, u.endpoint, u.partition_key ORDER BY u.n) = 1
                  AS first
           FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             WITH ORDINALITY AS u(id, domain_id, endpoint, partition_key, event, payload, n)
         ) t
         ORDER BY n",
    )
    .bind(column(|r| &r.id))
    .bind(column(|r| &r.domain_id))
    .bind(column(|r| &r.endpoint))
    .bind(column(|r| &r.partition))
    .bind(column(|r| r.event.name()))
    .bind(column(|r| &r.payload))
    .bind(to_ms(Utc::now()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Makes the next pending row of the partition of the row `id` (which just ended) due
/// (since it was written), in the open transaction that holds the partition's lock.
async fn promote(conn: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_outbox SET next_attempt_at = created_at
         WHERE next_attempt_at IS NULL AND seq = (
           SELECT p.seq FROM webhook_outbox p JOIN webhook_outbox f
             ON p.domain_id = f.domain_id AND p.endpoint = f.endpoint
            AND p.partition_key = f.partition_key
           WHERE f.id = $1 AND p.status = 'pending'
           ORDER BY p.seq LIMIT 1)",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// [`append_all`] in a transaction with the outbox rows of the messages whose domains have
/// a webhook for `message.created` (the batch append alone commits by itself, so it cannot
/// carry them).
pub(super) async fn append_all_with_events(
    conn: &mut PgConnection,
    messages: &[&NewMessage],
    subscriptions: &Subscriptions,
    writer: &str,
) -> Result<Vec<Appended>, Failure> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let appended = match append_all(&mut tx, messages, writer).await {
        Ok(appended) => appended,
        Err(failure) => {
            let _ = tx.rollback().await;
            return Err(failure);
        }
    };
    let mut events = Vec::new();
    for a in appended.iter().filter(|a| !a.duplicate) {
        let m = &a.message;
        events.extend(subscriptions.rows(
            &m.room.domain_id,
            crate::config::WebhookEvent::MessageCreated,
            Partition::Room(&m.room.room_id),
            || message_payload(m),
        ));
    }
    if let Err(e) = insert_outbox(&mut tx, &events).await {
        let _ = tx.rollback().await;
        return Err(e.into());
    }
    tx.commit().await.map_err(lost_during_commit)?;
    Ok(appended)
}

/// Columns of a claimed row, matching [`claimed_at`].
const CLAIMED_COLUMNS: &str = "o.id, o.domain_id, o.endpoint, o.partition_key, o.event, \
                               o.payload, o.created_at, o.attempts, o.seq";

fn claimed_at(row: &PgRow) -> Result<(i64, ClaimedRow), sqlx::Error> {
    Ok((
        row.try_get(8)?,
        ClaimedRow {
            id: row.try_get(0)?,
            domain_id: row.try_get(1)?,
            endpoint: row.try_get(2)?,
            partition: row.try_get(3)?,
            event: row.try_get(4)?,
            payload: row.try_get(5)?,
            created_at: from_ms(row.try_get(6)?),
            attempts: row.try_get::<i64, _>(7)?.try_into().unwrap_or(u32::MAX),
        },
    ))
}

/// Columns of the delivery log, matching [`delivery_at`].
const LOG_COLUMNS: &str = "id, event, endpoint, partition_key, status, attempts, last_status, \
                           last_error, created_at, last_attempt_at, next_attempt_at, \
                           finished_at, seq";

fn delivery_at(row: &PgRow) -> Result<Delivery, sqlx::Error> {
    let status: String = row.try_get(4)?;
    let status = DeliveryStatus::parse(&status).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "status".into(),
        source: format!("unknown delivery status {status:?}").into(),
    })?;
    let time = |ms: Option<i64>| ms.map(from_ms);
    let pending = status == DeliveryStatus::Pending;
    Ok(Delivery {
        id: row.try_get(0)?,
        event: row.try_get(1)?,
        url: row.try_get(2)?,
        partition: row.try_get(3)?,
        status: status.as_str(),
        attempts: row.try_get::<i64, _>(5)?.try_into().unwrap_or(u32::MAX),
        last_status: row
            .try_get::<Option<i64>, _>(6)?
            .and_then(|s| u16::try_from(s).ok()),
        last_error: row.try_get(7)?,
        created_at: from_ms(row.try_get(8)?),
        last_attempt_at: time(row.try_get(9)?),
        next_attempt_at: time(row.try_get(10)?).filter(|_| pending),
        finished_at: time(row.try_get(11)?),
        position: row.try_get(12)?,
    })
}

#[async_trait]
impl Outbox for PostgresStore {
    fn webhook_subscriptions(&self) -> &Subscriptions {
        &self.subscriptions
    }

    async fn enqueue_webhooks(&self, rows: Vec<NewOutboxRow>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.read("a webhook event", async {
            let mut tx = self.pool.begin().await?;
            insert_outbox(&mut tx, &rows).await?;
            tx.commit().await
        })
        .await
    }

    async fn claim_webhooks(&self, claim: &Claim) -> Result<Vec<ClaimedRow>, StoreError> {
        let until =
            claim.now + chrono::Duration::from_std(claim.lease).unwrap_or(chrono::Duration::MAX);
        // The candidates are locked (SKIP LOCKED: another node's are passed over) before the
        // cap per URL is applied: PostgreSQL locks no rows in a query with a window function.
        // Candidates beyond the cap are unlocked when the statement ends.
        let sql = format!(
            "UPDATE webhook_outbox o SET claimed_by = $1, claimed_until = $3
             FROM (
               SELECT seq FROM (
                 SELECT c.seq,
                   ROW_NUMBER() OVER (PARTITION BY c.endpoint ORDER BY c.seq) AS n
                 FROM (
                   SELECT h.seq, h.endpoint FROM webhook_outbox h
                   WHERE h.status = 'pending' AND h.next_attempt_at <= $2
                     AND (h.claimed_until IS NULL OR h.claimed_until <= $2)
                     AND NOT (h.endpoint = ANY($6::text[]))
                     AND NOT EXISTS (
                       SELECT 1 FROM webhook_outbox p
                       WHERE p.status = 'pending' AND p.domain_id = h.domain_id
                         AND p.endpoint = h.endpoint AND p.partition_key = h.partition_key
                         AND p.seq < h.seq)
                   ORDER BY h.seq LIMIT $7
                   FOR UPDATE SKIP LOCKED
                 ) c
               ) r
               WHERE r.n <= $5
               ORDER BY r.seq LIMIT $4
             ) pick
             WHERE o.seq = pick.seq
             RETURNING {CLAIMED_COLUMNS}"
        );
        // Candidates looked at: enough for the cap to leave `limit` in most cases.
        let scan = claim.limit.saturating_mul(4).max(claim.per_endpoint);
        let rows = self
            .read("a webhook claim", async {
                sqlx::query(&sql)
                    .bind(&claim.holder)
                    .bind(to_ms(claim.now))
                    .bind(to_ms(until))
                    .bind(limit_param(claim.limit))
                    .bind(limit_param(claim.per_endpoint))
                    .bind(&claim.skip)
                    .bind(limit_param(scan))
                    .fetch_all(&self.pool)
                    .await
            })
            .await?;
        let mut claimed = rows
            .iter()
            .map(claimed_at)
            .collect::<Result<Vec<_>, _>>()
            .map_err(super::store_error)?;
        claimed.sort_by_key(|(seq, _)| *seq);
        Ok(claimed.into_iter().map(|(_, row)| row).collect())
    }

    async fn finish_webhook(&self, id: &str, holder: &str, a: Attempt) -> Result<bool, StoreError> {
        let at = to_ms(a.at);
        let status = a.http_status.map(i64::from);
        let query = match &a.outcome {
            Outcome::Delivered => sqlx::query(
                "UPDATE webhook_outbox SET status = 'delivered', attempts = attempts + 1,
                   last_attempt_at = $3, last_status = $4, last_error = NULL, finished_at = $3,
                   claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND status = 'pending' AND $2::text IS NOT NULL",
            ),
            Outcome::Retry(_) => sqlx::query(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_attempt_at = $3,
                   last_status = $4, last_error = $5, next_attempt_at = $6,
                   claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND claimed_by = $2 AND status = 'pending'",
            ),
            Outcome::Dead => sqlx::query(
                "UPDATE webhook_outbox SET status = 'dead', attempts = attempts + 1,
                   last_attempt_at = $3, last_status = $4, last_error = $5, finished_at = $3,
                   claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND claimed_by = $2 AND status = 'pending'",
            ),
            Outcome::Released => sqlx::query(
                "UPDATE webhook_outbox SET claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND claimed_by = $2 AND status = 'pending'",
            ),
        };
        let query = query.bind(id).bind(holder);
        let query = match &a.outcome {
            Outcome::Delivered => query.bind(at).bind(status),
            Outcome::Retry(next) => query
                .bind(at)
                .bind(status)
                .bind(a.error.clone().map(|e| e.replace('\0', "")))
                .bind(to_ms(*next)),
            Outcome::Dead => query
                .bind(at)
                .bind(status)
                .bind(a.error.clone().map(|e| e.replace('\0', ""))),
            Outcome::Released => query,
        };
        let ends = matches!(a.outcome, Outcome::Delivered | Outcome::Dead);
        let done = self
            .read("a webhook outcome", async {
                if !ends {
                    return query.execute(&self.pool).await.map(|d| d.rows_affected());
                }
                // The row ends: the next of its partition becomes due, under the
                // partition's lock (see `insert_outbox`).
                let mut tx = self.pool.begin().await?;
                sqlx::query(concat!(
                    "SELECT ",
                    partition_lock!("domain_id", "endpoint", "partition_key"),
                    " FROM webhook_outbox WHERE id = $1"
                ))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                let changed = query.execute(&mut *tx).await?.rows_affected();
                if changed > 0 {
                    promote(&mut tx, id).await?;
                }
                tx.commit().await?;
                Ok(changed)
            })
            .await?;
        Ok(done > 0)
    }

    async fn webhook_deliveries(&self, q: DeliveryQuery) -> Result<Vec<Delivery>, StoreError> {
        let sql = format!(
            "SELECT {LOG_COLUMNS} FROM webhook_outbox
             WHERE domain_id = $1 AND ($2::text IS NULL OR status = $2)
               AND ($3::bigint IS NULL OR seq < $3)
             ORDER BY seq DESC LIMIT $4"
        );
        let rows = self
            .read("the webhook deliveries", async {
                sqlx::query(&sql)
                    .bind(&q.domain_id)
                    .bind(q.status.map(DeliveryStatus::as_str))
                    .bind(q.before)
                    .bind(limit_param(q.limit))
                    .fetch_all(&self.pool)
                    .await
            })
            .await?;
        rows.iter()
            .map(delivery_at)
            .collect::<Result<_, _>>()
            .map_err(super::store_error)
    }

    async fn prune_webhooks(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let done = self
            .read(
                "a webhook prune",
                sqlx::query(
                    "DELETE FROM webhook_outbox WHERE seq IN (
                       SELECT seq FROM webhook_outbox
                       WHERE status <> 'pending' AND finished_at < $1
                       LIMIT $2 FOR UPDATE SKIP LOCKED)",
                )
                .bind(to_ms(before))
                .bind(limit_param(limit))
                .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }

    async fn webhook_backlog(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        let row = self
            .read(
                "the webhook backlog",
                sqlx::query(
                    "SELECT COUNT(*), MIN(created_at) FROM webhook_outbox
                     WHERE status = 'pending'",
                )
                .fetch_one(&self.pool),
            )
            .await?;
        let pending: i64 = row.try_get(0).map_err(super::store_error)?;
        let oldest: Option<i64> = row.try_get(1).map_err(super::store_error)?;
        Ok((u64::try_from(pending).unwrap_or(0), oldest.map(from_ms)))
    }
}

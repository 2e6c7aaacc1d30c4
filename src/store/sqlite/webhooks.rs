//! [`Outbox`] on SQLite: rows are inserted by the writes that raise events, inside the
//! writer's transaction ([`insert_outbox`]); claims and outcomes are jobs of the writer
//! too, so one node (the only one SQLite has) takes each partition head once.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::{SqliteStore, from_ms, limit_param, to_ms, unavailable};
use crate::store::StoreError;
use crate::store::webhooks::{
    Attempt, Claim, ClaimedRow, Delivery, DeliveryQuery, DeliveryStatus, NewOutboxRow, Outbox,
    Outcome, Subscriptions,
};

/// Writes `rows` in the open transaction. A row is due at once only when it is its
/// partition's head (no earlier row of the partition pending); the others wait, with no
/// `next_attempt_at`, until the row before them ends ([`promote`]).
pub(super) fn insert_outbox(conn: &Connection, rows: &[NewOutboxRow]) -> rusqlite::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let now = to_ms(Utc::now());
    let mut insert = conn.prepare_cached(
        "INSERT INTO webhook_outbox (id, domain_id, endpoint, partition_key, event, payload,
           created_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
           CASE WHEN EXISTS (SELECT 1 FROM webhook_outbox p
                             WHERE p.status = 'pending' AND p.domain_id = ?2
                               AND p.endpoint = ?3 AND p.partition_key = ?4)
                THEN NULL ELSE ?7 END)",
    )?;
    for r in rows {
        insert.execute(params![
            r.id,
            r.domain_id,
            r.endpoint,
            r.partition,
            r.event.name(),
            r.payload,
            now
        ])?;
    }
    Ok(())
}

/// The heads of the partitions, due and not held, oldest first, at most `?5` per URL and
/// none of the URLs of the JSON array `?6`.
const CLAIM: &str = "UPDATE webhook_outbox SET claimed_by = ?1, claimed_until = ?3
     WHERE seq IN (
       SELECT seq FROM (
         SELECT h.seq,
           ROW_NUMBER() OVER (PARTITION BY h.endpoint ORDER BY h.seq) AS n
         FROM webhook_outbox h
         WHERE h.status = 'pending' AND h.next_attempt_at <= ?2
           AND (h.claimed_until IS NULL OR h.claimed_until <= ?2)
           AND h.endpoint NOT IN (SELECT value FROM json_each(?6))
           AND NOT EXISTS (
             SELECT 1 FROM webhook_outbox p
             WHERE p.status = 'pending' AND p.domain_id = h.domain_id
               AND p.endpoint = h.endpoint AND p.partition_key = h.partition_key
               AND p.seq < h.seq))
       WHERE n <= ?5
       ORDER BY seq LIMIT ?4)
     RETURNING id, domain_id, endpoint, partition_key, event, payload, created_at, attempts,
       seq";

/// Columns of the delivery log, matching [`delivery_at`].
const LOG_COLUMNS: &str = "id, event, endpoint, partition_key, status, attempts, last_status,
     last_error, created_at, last_attempt_at, next_attempt_at, finished_at, seq";

pub(super) fn delivery_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<Delivery> {
    let status: String = row.get(4)?;
    let status = DeliveryStatus::parse(&status).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            4,
            rusqlite::types::Type::Text,
            format!("unknown delivery status {status:?}").into(),
        )
    })?;
    let time = |ms: Option<i64>| ms.map(from_ms);
    let pending = status == DeliveryStatus::Pending;
    Ok(Delivery {
        id: row.get(0)?,
        event: row.get(1)?,
        url: row.get(2)?,
        partition: row.get(3)?,
        status: status.as_str(),
        attempts: row.get::<_, i64>(5)?.try_into().unwrap_or(u32::MAX),
        last_status: row
            .get::<_, Option<i64>>(6)?
            .and_then(|s| u16::try_from(s).ok()),
        last_error: row.get(7)?,
        created_at: from_ms(row.get(8)?),
        last_attempt_at: time(row.get(9)?),
        next_attempt_at: time(row.get(10)?).filter(|_| pending),
        finished_at: time(row.get(11)?),
        position: row.get(12)?,
    })
}

/// Makes the next pending row of the partition of the row `id` (which just ended) due:
/// since it was written.
fn promote(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE webhook_outbox SET next_attempt_at = created_at
         WHERE next_attempt_at IS NULL AND seq = (
           SELECT p.seq FROM webhook_outbox p JOIN webhook_outbox f
             ON p.domain_id = f.domain_id AND p.endpoint = f.endpoint
            AND p.partition_key = f.partition_key
           WHERE f.id = ?1 AND p.status = 'pending'
           ORDER BY p.seq LIMIT 1)",
    )?
    .execute(params![id])?;
    Ok(())
}

/// Records `attempt` (see [`Outbox::finish_webhook`]); a row that ended hands its
/// partition to the next row.
fn finish(conn: &Connection, id: &str, holder: &str, a: &Attempt) -> rusqlite::Result<usize> {
    let changed = record(conn, id, holder, a)?;
    if changed > 0 && matches!(a.outcome, Outcome::Delivered | Outcome::Dead) {
        promote(conn, id)?;
    }
    Ok(changed)
}

fn record(conn: &Connection, id: &str, holder: &str, a: &Attempt) -> rusqlite::Result<usize> {
    let at = to_ms(a.at);
    let status = a.http_status.map(i64::from);
    match &a.outcome {
        Outcome::Delivered => conn
            .prepare_cached(
                "UPDATE webhook_outbox SET status = 'delivered', attempts = attempts + 1,
                   last_attempt_at = ?2, last_status = ?3, last_error = NULL, finished_at = ?2,
                   claimed_by = NULL, claimed_until = NULL
                 WHERE id = ?1 AND status = 'pending'",
            )?
            .execute(params![id, at, status]),
        Outcome::Retry(next) => conn
            .prepare_cached(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_attempt_at = ?3,
                   last_status = ?4, last_error = ?5, next_attempt_at = ?6,
                   claimed_by = NULL, claimed_until = NULL
                 WHERE id = ?1 AND claimed_by = ?2 AND status = 'pending'",
            )?
            .execute(params![id, holder, at, status, a.error, to_ms(*next)]),
        Outcome::Dead => conn
            .prepare_cached(
                "UPDATE webhook_outbox SET status = 'dead', attempts = attempts + 1,
                   last_attempt_at = ?3, last_status = ?4, last_error = ?5, finished_at = ?3,
                   claimed_by = NULL, claimed_until = NULL
                 WHERE id = ?1 AND claimed_by = ?2 AND status = 'pending'",
            )?
            .execute(params![id, holder, at, status, a.error]),
        Outcome::Released => conn
            .prepare_cached(
                "UPDATE webhook_outbox SET claimed_by = NULL, claimed_until = NULL
                 WHERE id = ?1 AND claimed_by = ?2 AND status = 'pending'",
            )?
            .execute(params![id, holder]),
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    fn webhook_subscriptions(&self) -> &Subscriptions {
        &self.subscriptions
    }

    async fn enqueue_webhooks(&self, rows: Vec<NewOutboxRow>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.run(move |conn| insert_outbox(conn, &rows).map_err(unavailable))
            .await
    }

    async fn claim_webhooks(&self, claim: &Claim) -> Result<Vec<ClaimedRow>, StoreError> {
        let holder = claim.holder.clone();
        let until =
            claim.now + chrono::Duration::from_std(claim.lease).unwrap_or(chrono::Duration::MAX);
        let (now, until) = (to_ms(claim.now), to_ms(until));
        let (limit, per_endpoint) = (limit_param(claim.limit), limit_param(claim.per_endpoint));
        let skip = serde_json::Value::from(claim.skip.clone()).to_string();
        // Looked for on a reader first: an idle outbox costs the writer nothing.
        let due = self
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM webhook_outbox
                     WHERE status = 'pending' AND next_attempt_at <= ?1
                       AND (claimed_until IS NULL OR claimed_until <= ?1))",
                )?
                .query_row(params![now], |row| row.get::<_, bool>(0))
            })
            .await?;
        if !due {
            return Ok(Vec::new());
        }
        self.run(move |conn| {
            let mut rows = conn
                .prepare_cached(CLAIM)
                .and_then(|mut st| {
                    st.query_map(
                        params![holder, now, until, limit, per_endpoint, skip],
                        |row| {
                            Ok((
                                row.get::<_, i64>(8)?,
                                ClaimedRow {
                                    id: row.get(0)?,
                                    domain_id: row.get(1)?,
                                    endpoint: row.get(2)?,
                                    partition: row.get(3)?,
                                    event: row.get(4)?,
                                    payload: row.get(5)?,
                                    created_at: from_ms(row.get(6)?),
                                    attempts: row.get::<_, i64>(7)?.try_into().unwrap_or(u32::MAX),
                                },
                            ))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            rows.sort_by_key(|(seq, _)| *seq);
            Ok(rows.into_iter().map(|(_, row)| row).collect())
        })
        .await
    }

    async fn finish_webhook(
        &self,
        id: &str,
        holder: &str,
        attempt: Attempt,
    ) -> Result<bool, StoreError> {
        let (id, holder) = (id.to_owned(), holder.to_owned());
        self.run(move |conn| {
            finish(conn, &id, &holder, &attempt)
                .map(|n| n > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn webhook_deliveries(&self, q: DeliveryQuery) -> Result<Vec<Delivery>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {LOG_COLUMNS} FROM webhook_outbox
                 WHERE domain_id = ?1 AND (?2 IS NULL OR status = ?2)
                   AND (?3 IS NULL OR seq < ?3)
                 ORDER BY seq DESC LIMIT ?4"
            );
            let mut st = conn.prepare_cached(&sql)?;
            st.query_map(
                params![
                    q.domain_id,
                    q.status.map(DeliveryStatus::as_str),
                    q.before,
                    limit_param(q.limit)
                ],
                delivery_at,
            )?
            .collect()
        })
        .await
    }

    async fn prune_webhooks(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError> {
        let (before, limit) = (to_ms(before), limit_param(limit));
        self.run(move |conn| {
            conn.prepare_cached(
                "DELETE FROM webhook_outbox WHERE seq IN (
                   SELECT seq FROM webhook_outbox
                   WHERE status <> 'pending' AND finished_at < ?1 LIMIT ?2)",
            )
            .and_then(|mut st| st.execute(params![before, limit]))
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn webhook_backlog(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT COUNT(*), MIN(created_at) FROM webhook_outbox WHERE status = 'pending'",
                [],
                |row| {
                    Ok((
                        u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                        row.get::<_, Option<i64>>(1)?.map(from_ms),
                    ))
                },
            )
        })
        .await
    }
}

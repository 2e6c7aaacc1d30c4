//! [`Visitors`] on PostgreSQL. A batch is one transaction; each visitor's row is locked
//! (`FOR UPDATE`, or created) before its last sighting is read, so two nodes recording the
//! same visitor at once move the rollups once between them.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{PostgresStore, count, from_ms, limit_param, refuse_nul, store_error, to_ms};
use crate::config::WebhookEvent;
use crate::store::StoreError;
use crate::store::visitors::{Bucket, Interval, Sighting, Visitor, Visitors, day_of, hour_of};
use crate::store::webhooks::Partition;
use crate::store::webhooks::{Subscriptions, visitor_added_payload};

/// Columns matching [`visitor_at`].
const COLUMNS: &str =
    "domain_id, visitor_id, first_seen, last_seen, visits, page, referrer, user_agent, data";

/// A visitor from [`COLUMNS`].
fn visitor_at(row: &PgRow) -> Result<Visitor, StoreError> {
    let get = |e: sqlx::Error| store_error(e);
    Ok(Visitor {
        domain_id: row.try_get(0).map_err(get)?,
        visitor_id: row.try_get(1).map_err(get)?,
        first_seen: from_ms(row.try_get(2).map_err(get)?),
        last_seen: from_ms(row.try_get(3).map_err(get)?),
        visits: count(row.try_get(4).map_err(get)?),
        page: row.try_get(5).map_err(get)?,
        referrer: row.try_get(6).map_err(get)?,
        user_agent: row.try_get(7).map_err(get)?,
        data: row.try_get(8).map_err(get)?,
    })
}

/// Records one sighting and its rollups in `tx`; returns the visitor's row after it.
async fn record(
    tx: &mut sqlx::PgConnection,
    s: &Sighting,
    subscriptions: &Subscriptions,
) -> Result<PgRow, sqlx::Error> {
    let at = to_ms(s.at);
    let created = sqlx::query(
        "INSERT INTO visitors (domain_id, visitor_id, first_seen, last_seen, visits, page,
           referrer, user_agent, data)
         VALUES ($1, $2, $3, $3, 1, $4, $5, $6, $7)
         ON CONFLICT (domain_id, visitor_id) DO NOTHING",
    )
    .bind(&s.domain_id)
    .bind(&s.visitor_id)
    .bind(at)
    .bind(&s.page)
    .bind(&s.referrer)
    .bind(&s.user_agent)
    .bind(&s.data)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    let counts = if created {
        s.counts(None)
    } else {
        let previous: i64 = sqlx::query_scalar(
            "SELECT last_seen FROM visitors WHERE domain_id = $1 AND visitor_id = $2
             FOR UPDATE",
        )
        .bind(&s.domain_id)
        .bind(&s.visitor_id)
        .fetch_one(&mut *tx)
        .await?;
        let counts = s.counts(Some(previous));
        let newer = at >= previous;
        sqlx::query(
            "UPDATE visitors SET
               first_seen = LEAST(first_seen, $3),
               last_seen = GREATEST(last_seen, $3),
               visits = visits + $8,
               page = CASE WHEN $9 THEN COALESCE($4, page) ELSE page END,
               referrer = CASE WHEN $9 THEN COALESCE($5, referrer) ELSE referrer END,
               user_agent = CASE WHEN $9 THEN COALESCE($6, user_agent) ELSE user_agent END,
               data = CASE WHEN $9 THEN COALESCE($7, data) ELSE data END
             WHERE domain_id = $1 AND visitor_id = $2",
        )
        .bind(&s.domain_id)
        .bind(&s.visitor_id)
        .bind(at)
        .bind(&s.page)
        .bind(&s.referrer)
        .bind(&s.user_agent)
        .bind(&s.data)
        .bind(i64::from(counts.visit))
        .bind(newer)
        .execute(&mut *tx)
        .await?;
        counts
    };
    for (table, start, first) in [
        ("visitor_hours", hour_of(at), counts.hour),
        ("visitor_days", day_of(at), counts.day),
    ] {
        if first || counts.visit {
            sqlx::query(&format!(
                "INSERT INTO {table} (domain_id, at, visitors, visits) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (domain_id, at) DO UPDATE SET
                   visitors = {table}.visitors + $3, visits = {table}.visits + $4"
            ))
            .bind(&s.domain_id)
            .bind(start)
            .bind(i64::from(first))
            .bind(i64::from(counts.visit))
            .execute(&mut *tx)
            .await?;
        }
    }
    if counts.visit {
        let events = subscriptions.rows(
            &s.domain_id,
            WebhookEvent::VisitorAdded,
            Partition::Visitor(&s.visitor_id),
            || visitor_added_payload(s, created),
        );
        super::webhooks::insert_outbox(&mut *tx, &events).await?;
    }
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM visitors WHERE domain_id = $1 AND visitor_id = $2"
    ))
    .bind(&s.domain_id)
    .bind(&s.visitor_id)
    .fetch_one(&mut *tx)
    .await
}

#[async_trait]
impl Visitors for PostgresStore {
    async fn record_sightings(&self, batch: Vec<Sighting>) -> Result<Vec<Visitor>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for s in &batch {
            let mut fields = vec![s.domain_id.as_str(), &s.visitor_id];
            fields.extend(s.page.as_deref());
            fields.extend(s.referrer.as_deref());
            fields.extend(s.user_agent.as_deref());
            fields.extend(s.data.as_deref());
            refuse_nul(&fields)?;
        }
        let rows = self
            .read("a visitor write", async {
                let mut tx = self.pool.begin().await?;
                let mut rows = Vec::with_capacity(batch.len());
                for s in &batch {
                    rows.push(record(&mut tx, s, &self.subscriptions).await?);
                }
                tx.commit().await?;
                Ok(rows)
            })
            .await?;
        rows.iter().map(visitor_at).collect()
    }

    async fn visitor(
        &self,
        domain_id: &str,
        visitor_id: &str,
    ) -> Result<Option<Visitor>, StoreError> {
        let row = self
            .read(
                "a visitor",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM visitors WHERE domain_id = $1 AND visitor_id = $2"
                ))
                .bind(domain_id)
                .bind(visitor_id)
                .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref().map(visitor_at).transpose()
    }

    async fn visitors_since(
        &self,
        domain_id: &str,
        since: &[DateTime<Utc>],
    ) -> Result<Vec<u64>, StoreError> {
        let mut counts = Vec::with_capacity(since.len());
        for t in since {
            let n: i64 = self
                .read(
                    "a visitor count",
                    sqlx::query_scalar(
                        "SELECT COUNT(*) FROM visitors WHERE domain_id = $1 AND last_seen >= $2",
                    )
                    .bind(domain_id)
                    .bind(to_ms(*t))
                    .fetch_one(&self.pool),
                )
                .await?;
            counts.push(count(n));
        }
        Ok(counts)
    }

    async fn visitor_series(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        interval: Interval,
    ) -> Result<Vec<Bucket>, StoreError> {
        let (table, from) = match interval {
            Interval::Hour => ("visitor_hours", hour_of(to_ms(from))),
            Interval::Day => ("visitor_days", day_of(to_ms(from))),
        };
        let rows = self
            .read(
                "a visitor series",
                sqlx::query(&format!(
                    "SELECT at, visitors, visits FROM {table}
                     WHERE domain_id = $1 AND at >= $2 AND at < $3 ORDER BY at"
                ))
                .bind(domain_id)
                .bind(from)
                .bind(to_ms(to))
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let get = |e: sqlx::Error| store_error(e);
                Ok(Bucket {
                    at: from_ms(row.try_get(0).map_err(get)?),
                    visitors: count(row.try_get(1).map_err(get)?),
                    visits: count(row.try_get(2).map_err(get)?),
                })
            })
            .collect()
    }

    async fn visitors_named(
        &self,
        domain_id: &str,
        visitor_ids: &[String],
    ) -> Result<Vec<Visitor>, StoreError> {
        if visitor_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .read(
                "visitors by id",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM visitors WHERE domain_id = $1 AND visitor_id = ANY($2)"
                ))
                .bind(domain_id)
                .bind(visitor_ids)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter().map(visitor_at).collect()
    }

    async fn recent_visitors(
        &self,
        domain_id: &str,
        limit: usize,
    ) -> Result<Vec<Visitor>, StoreError> {
        let rows = self
            .read(
                "recent visitors",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM visitors WHERE domain_id = $1
                     ORDER BY last_seen DESC LIMIT $2"
                ))
                .bind(domain_id)
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter().map(visitor_at).collect()
    }
}

//! [`Visitors`] on SQLite: reads on the reader pool; a batch of sightings is one job of the
//! writer thread, group-committed with everything else (one writer: reading a visitor's last
//! sighting and moving the rollups it decides is one step).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, from_ms, limit_param, to_ms, unavailable};
use crate::config::WebhookEvent;
use crate::store::StoreError;
use crate::store::visitors::{Bucket, Interval, Sighting, Visitor, Visitors, day_of, hour_of};
use crate::store::webhooks::Partition;
use crate::store::webhooks::{Subscriptions, visitor_added_payload};

/// Columns matching [`visitor_at`].
const COLUMNS: &str =
    "domain_id, visitor_id, first_seen, last_seen, visits, page, referrer, user_agent, data";

/// A visitor from [`COLUMNS`].
fn visitor_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<Visitor> {
    let visits: i64 = row.get(4)?;
    Ok(Visitor {
        domain_id: row.get(0)?,
        visitor_id: row.get(1)?,
        first_seen: from_ms(row.get(2)?),
        last_seen: from_ms(row.get(3)?),
        visits: u64::try_from(visits).unwrap_or(0),
        page: row.get(5)?,
        referrer: row.get(6)?,
        user_agent: row.get(7)?,
        data: row.get(8)?,
    })
}

/// Records one sighting and its rollups; returns the visitor after it.
fn record(
    conn: &Connection,
    s: &Sighting,
    subscriptions: &Subscriptions,
) -> rusqlite::Result<Visitor> {
    let at = to_ms(s.at);
    let previous: Option<i64> = conn
        .prepare_cached("SELECT last_seen FROM visitors WHERE domain_id = ?1 AND visitor_id = ?2")?
        .query_row(params![s.domain_id, s.visitor_id], |row| row.get(0))
        .optional()?;
    let counts = s.counts(previous);
    let newer = previous.is_none_or(|prev| at >= prev);
    conn.prepare_cached(
        "INSERT INTO visitors (domain_id, visitor_id, first_seen, last_seen, visits, page,
           referrer, user_agent, data)
         VALUES (?1, ?2, ?3, ?3, 1, ?4, ?5, ?6, ?7)
         ON CONFLICT (domain_id, visitor_id) DO UPDATE SET
           first_seen = MIN(first_seen, ?3),
           last_seen = MAX(last_seen, ?3),
           visits = visits + ?8,
           page = CASE WHEN ?9 THEN COALESCE(?4, page) ELSE page END,
           referrer = CASE WHEN ?9 THEN COALESCE(?5, referrer) ELSE referrer END,
           user_agent = CASE WHEN ?9 THEN COALESCE(?6, user_agent) ELSE user_agent END,
           data = CASE WHEN ?9 THEN COALESCE(?7, data) ELSE data END",
    )?
    .execute(params![
        s.domain_id,
        s.visitor_id,
        at,
        s.page,
        s.referrer,
        s.user_agent,
        s.data,
        i64::from(counts.visit),
        newer
    ])?;
    for (table, start, first) in [
        ("visitor_hours", hour_of(at), counts.hour),
        ("visitor_days", day_of(at), counts.day),
    ] {
        if first || counts.visit {
            conn.prepare_cached(&format!(
                "INSERT INTO {table} (domain_id, at, visitors, visits) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (domain_id, at) DO UPDATE SET
                   visitors = visitors + ?3, visits = visits + ?4"
            ))?
            .execute(params![
                s.domain_id,
                start,
                i64::from(first),
                i64::from(counts.visit)
            ])?;
        }
    }
    if counts.visit {
        let events = subscriptions.rows(
            &s.domain_id,
            WebhookEvent::VisitorAdded,
            Partition::Visitor(&s.visitor_id),
            || visitor_added_payload(s, previous.is_none()),
        );
        super::webhooks::insert_outbox(conn, &events)?;
    }
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM visitors WHERE domain_id = ?1 AND visitor_id = ?2"
    ))?
    .query_row(params![s.domain_id, s.visitor_id], visitor_at)
}

#[async_trait]
impl Visitors for SqliteStore {
    async fn record_sightings(&self, batch: Vec<Sighting>) -> Result<Vec<Visitor>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let subscriptions = std::sync::Arc::clone(&self.subscriptions);
        self.run(move |conn| {
            batch
                .iter()
                .map(|s| record(conn, s, &subscriptions))
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(unavailable)
        })
        .await
    }

    async fn visitor(
        &self,
        domain_id: &str,
        visitor_id: &str,
    ) -> Result<Option<Visitor>, StoreError> {
        let (domain, visitor) = (domain_id.to_owned(), visitor_id.to_owned());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM visitors WHERE domain_id = ?1 AND visitor_id = ?2"
            ))?
            .query_row(params![domain, visitor], visitor_at)
            .optional()
        })
        .await
    }

    async fn visitors_since(
        &self,
        domain_id: &str,
        since: &[DateTime<Utc>],
    ) -> Result<Vec<u64>, StoreError> {
        let domain = domain_id.to_owned();
        let since: Vec<i64> = since.iter().map(|t| to_ms(*t)).collect();
        self.read(move |c| {
            let mut count = c.prepare_cached(
                "SELECT COUNT(*) FROM visitors WHERE domain_id = ?1 AND last_seen >= ?2",
            )?;
            since
                .iter()
                .map(|t| {
                    let n: i64 = count.query_row(params![domain, t], |row| row.get(0))?;
                    Ok(u64::try_from(n).unwrap_or(0))
                })
                .collect()
        })
        .await
    }

    async fn visitor_series(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        interval: Interval,
    ) -> Result<Vec<Bucket>, StoreError> {
        let domain = domain_id.to_owned();
        let (table, from) = match interval {
            Interval::Hour => ("visitor_hours", hour_of(to_ms(from))),
            Interval::Day => ("visitor_days", day_of(to_ms(from))),
        };
        let to = to_ms(to);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT at, visitors, visits FROM {table}
                 WHERE domain_id = ?1 AND at >= ?2 AND at < ?3 ORDER BY at"
            ))?;
            let rows = stmt.query_map(params![domain, from, to], |row| {
                let (visitors, visits): (i64, i64) = (row.get(1)?, row.get(2)?);
                Ok(Bucket {
                    at: from_ms(row.get(0)?),
                    visitors: u64::try_from(visitors).unwrap_or(0),
                    visits: u64::try_from(visits).unwrap_or(0),
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn visitors_named(
        &self,
        domain_id: &str,
        visitor_ids: &[String],
    ) -> Result<Vec<Visitor>, StoreError> {
        let domain = domain_id.to_owned();
        let ids = visitor_ids.to_vec();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM visitors WHERE domain_id = ?1 AND visitor_id = ?2"
            ))?;
            let mut found = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(v) = stmt.query_row(params![domain, id], visitor_at).optional()? {
                    found.push(v);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn recent_visitors(
        &self,
        domain_id: &str,
        limit: usize,
    ) -> Result<Vec<Visitor>, StoreError> {
        let domain = domain_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM visitors WHERE domain_id = ?1
                 ORDER BY last_seen DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![domain, limit_param(limit)], visitor_at)?;
            rows.collect()
        })
        .await
    }
}

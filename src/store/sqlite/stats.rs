//! [`Stats`] on SQLite: ranges of the counters' and the first responses' primary key and
//! index, on the reader pool (the writer counts, see `writes.rs`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::params;

use super::{SqliteStore, from_ms, limit_param, to_ms};
use crate::store::StoreError;
use crate::store::stats::{Activity, MAX_FIRST_RESPONSES, Stats, hour_start};

#[async_trait]
impl Stats for SqliteStore {
    async fn activity(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Activity>, StoreError> {
        let domain = domain_id.to_owned();
        let (from, to) = (hour_start(to_ms(from)), to_ms(to));
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT at, metric, SUM(n) FROM activity_hours
                 WHERE domain_id = ?1 AND at >= ?2 AND at < ?3
                 GROUP BY at, metric HAVING SUM(n) <> 0 ORDER BY at, metric",
            )?;
            let rows = stmt.query_map(params![domain, from, to], |row| {
                Ok(Activity {
                    at: from_ms(row.get(0)?),
                    metric: row.get(1)?,
                    n: row.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn first_response_times(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<u64>, StoreError> {
        let domain = domain_id.to_owned();
        let (from, to) = (to_ms(from), to_ms(to));
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT ms FROM first_responses
                 WHERE domain_id = ?1 AND at >= ?2 AND at < ?3 ORDER BY at DESC LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![domain, from, to, limit_param(MAX_FIRST_RESPONSES)],
                |row| {
                    row.get::<_, i64>(0)
                        .map(|ms| u64::try_from(ms).unwrap_or(0))
                },
            )?;
            rows.collect()
        })
        .await
    }
}

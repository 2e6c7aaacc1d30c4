//! [`Stats`] on PostgreSQL: ranges of the counters' primary key and the first responses'
//! index (the writer counts, see `writes.rs`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{PostgresStore, count, from_ms, to_ms};
use crate::store::StoreError;
use crate::store::stats::{Activity, MAX_FIRST_RESPONSES, Stats, hour_start};

#[async_trait]
impl Stats for PostgresStore {
    async fn activity(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Activity>, StoreError> {
        let rows = self
            .read(
                "the activity counters",
                sqlx::query(
                    "SELECT at, metric, SUM(n)::bigint FROM activity_hours
                     WHERE domain_id = $1 AND at >= $2 AND at < $3
                     GROUP BY at, metric HAVING SUM(n) <> 0 ORDER BY at, metric",
                )
                .bind(domain_id)
                .bind(hour_start(to_ms(from)))
                .bind(to_ms(to))
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Activity {
                    at: from_ms(row.try_get(0)?),
                    metric: row.try_get(1)?,
                    n: row.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(super::store_error)
    }

    async fn first_response_times(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<u64>, StoreError> {
        let times: Vec<i64> = self
            .read(
                "the first-response times",
                sqlx::query_scalar(
                    "SELECT ms FROM first_responses
                     WHERE domain_id = $1 AND at >= $2 AND at < $3 ORDER BY at DESC LIMIT $4",
                )
                .bind(domain_id)
                .bind(to_ms(from))
                .bind(to_ms(to))
                .bind(i64::try_from(MAX_FIRST_RESPONSES).unwrap_or(i64::MAX))
                .fetch_all(&self.pool),
            )
            .await?;
        Ok(times.into_iter().map(count).collect())
    }
}

//! A domain's visitors, as the statistics need them, and the [`Visitors`] trait every store
//! implements.
//!
//! **One row per visitor** (`visitors`, keyed by domain and visitor id): when the visitor was
//! first and last seen, how many visits they made, and what the last sighting said (page,
//! referrer, user agent, the `visitorData` / `customerData` given). A visit is a run of
//! sightings less than [`VISIT_GAP`] apart, as web analytics count sessions.
//!
//! **Counts without scans.** "Visitors in the last N days" is the number of rows whose
//! `last_seen` is within them (an index on `(domain, last_seen)`): a visitor seen in the
//! window has their last sighting in it. A series over time cannot be read from the rows
//! (they keep only the last sighting), so each sighting that is a visitor's first of an
//! hour, or of a (UTC) day, or that starts a visit, adds one to a rollup row
//! (`visitor_hours`, `visitor_days`): a day's unique visitors are not the sum of its hours'.
//! The sighting and its rollups are one transaction. Which counters a sighting moves is
//! decided once, from the previous `last_seen` ([`Sighting::counts`]), for both stores.
//!
//! Who is on the site *now* is not stored: it lives in the cluster's shared state, with a
//! TTL, like presence.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// Sightings further apart than this start a new visit (30 minutes).
pub const VISIT_GAP_MS: i64 = 30 * 60 * 1000;
/// [`VISIT_GAP_MS`] as a duration.
pub const VISIT_GAP: std::time::Duration = std::time::Duration::from_millis(30 * 60 * 1000);

/// Largest data kept of a visitor, in bytes of JSON text.
pub const MAX_DATA_BYTES: usize = 4096;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// One sighting of a visitor: a page view, a widget opening, a socket connecting.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    /// The domain.
    pub domain_id: String,
    /// The visitor's id (the widget's stable id, or the one the site gives).
    pub visitor_id: String,
    /// When (milliseconds are kept).
    pub at: DateTime<Utc>,
    /// The page, if known.
    pub page: Option<String>,
    /// The referrer, if known.
    pub referrer: Option<String>,
    /// The user agent, if known.
    pub user_agent: Option<String>,
    /// What the site said of the visitor (JSON text); replaces what was kept when given.
    pub data: Option<String>,
}

/// What a sighting adds to the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// It starts a visit.
    pub visit: bool,
    /// It is the visitor's first of its hour.
    pub hour: bool,
    /// It is the visitor's first of its (UTC) day.
    pub day: bool,
}

impl Sighting {
    /// What this sighting adds, after one at `previous` (none: a new visitor). A sighting
    /// older than the previous one adds nothing.
    pub fn counts(&self, previous: Option<i64>) -> Counts {
        let at = self.at.timestamp_millis();
        match previous {
            None => Counts {
                visit: true,
                hour: true,
                day: true,
            },
            Some(prev) if at <= prev => Counts::default(),
            Some(prev) => Counts {
                visit: at - prev > VISIT_GAP_MS,
                hour: hour_of(prev) != hour_of(at),
                day: day_of(prev) != day_of(at),
            },
        }
    }
}

/// The start of the hour of `ms` (unix milliseconds), in milliseconds.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// The start of the UTC day of `ms`, in milliseconds.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

/// A stored visitor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Visitor {
    /// The domain.
    pub domain_id: String,
    /// The visitor's id.
    pub visitor_id: String,
    /// First sighting.
    pub first_seen: DateTime<Utc>,
    /// Last sighting.
    pub last_seen: DateTime<Utc>,
    /// Visits made.
    pub visits: u64,
    /// The last page seen.
    pub page: Option<String>,
    /// The last referrer given.
    pub referrer: Option<String>,
    /// The last user agent.
    pub user_agent: Option<String>,
    /// What the site last said of the visitor (JSON text).
    pub data: Option<String>,
}

/// The width of a series' buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    /// Hours.
    Hour,
    /// UTC days.
    Day,
}

/// One bucket of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Where it starts.
    pub at: DateTime<Utc>,
    /// Distinct visitors seen in it.
    pub visitors: u64,
    /// Visits started in it.
    pub visits: u64,
}

/// Storage of visitors.
#[async_trait]
pub trait Visitors: Send + Sync {
    /// Records `batch` in one transaction, in order: each visitor's row, and the rollups
    /// their sightings move. Returns the visitors as they are after it.
    async fn record_sightings(&self, batch: Vec<Sighting>) -> Result<Vec<Visitor>, StoreError>;

    /// One visitor.
    async fn visitor(
        &self,
        domain_id: &str,
        visitor_id: &str,
    ) -> Result<Option<Visitor>, StoreError>;

    /// How many of the domain's visitors were seen at or after each of `since`.
    async fn visitors_since(
        &self,
        domain_id: &str,
        since: &[DateTime<Utc>],
    ) -> Result<Vec<u64>, StoreError>;

    /// The domain's visitors and visits per `interval` from `from` (rounded down to its
    /// bucket) to before `to`; buckets with none are left out.
    async fn visitor_series(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        interval: Interval,
    ) -> Result<Vec<Bucket>, StoreError>;

    /// Those of `visitor_ids` the domain has stored, in no order.
    async fn visitors_named(
        &self,
        domain_id: &str,
        visitor_ids: &[String],
    ) -> Result<Vec<Visitor>, StoreError>;

    /// The domain's visitors seen most recently, latest first, at most `limit`.
    async fn recent_visitors(
        &self,
        domain_id: &str,
        limit: usize,
    ) -> Result<Vec<Visitor>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Sighting {
        Sighting {
            domain_id: "d".into(),
            visitor_id: "v".into(),
            at: DateTime::from_timestamp_millis(ms).unwrap_or_default(),
            page: None,
            referrer: None,
            user_agent: None,
            data: None,
        }
    }

    #[test]
    fn a_sighting_counts_a_visit_an_hour_and_a_day_when_they_are_new() {
        let noon = 1_765_022_400_000; // 2025-12-06T12:00:00Z
        let all = Counts {
            visit: true,
            hour: true,
            day: true,
        };
        assert_eq!(at(noon).counts(None), all);
        // The same hour, within the gap: nothing new.
        assert_eq!(at(noon + 60_000).counts(Some(noon)), Counts::default());
        // The next hour, within the gap: an hour, not a visit.
        let next = Counts {
            hour: true,
            ..Counts::default()
        };
        assert_eq!(at(noon + HOUR_MS).counts(Some(noon + HOUR_MS - 1)), next);
        // Past the gap in the same hour: a visit.
        let visit = Counts {
            visit: true,
            ..Counts::default()
        };
        assert_eq!(at(noon + VISIT_GAP_MS + 1).counts(Some(noon)), visit);
        // The next day.
        assert_eq!(at(noon + DAY_MS).counts(Some(noon)), all);
        // An older sighting adds nothing.
        assert_eq!(at(noon).counts(Some(noon + 5)), Counts::default());
        assert_eq!(day_of(noon + 5), noon - 12 * HOUR_MS);
        assert_eq!(hour_of(noon + 5), noon);
    }
}

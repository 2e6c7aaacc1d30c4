//! A domain's statistics (`docs/stats.md`): visitors now and over time, conversations,
//! messages by role, the assistant's share, hand-offs, first-response times and AI tokens,
//! as totals over a range and as a series of hours or days.
//!
//! Everything is read from counters the store keeps as it writes
//! ([`crate::store::stats`], [`crate::store::visitors`]) and from the AI usage log's
//! index: a request reads a range of rows per figure, never the messages.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::auth::policy;
use crate::error_code::ErrorCode;
use crate::model::{Identity, iso};
use crate::service::ServiceError;
use crate::service::ai::AiService;
use crate::service::visitors::VisitorService;
use crate::store::stats::{self, Activity};
use crate::store::visitors::{Interval, Visitor, day_of, hour_of};
use crate::store::{Store, UsageGrouping};

/// The longest range of an hourly series (31 days of hours).
pub const MAX_HOURS: i64 = 31 * 24;
/// The longest range of a daily series (a leap year and a day).
pub const MAX_DAYS: i64 = 367;
/// Most visitors listed as on the site now.
pub const MAX_LISTED: usize = 200;

/// What a statistics request asks for.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// Start (inclusive).
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Width of the series' buckets.
    pub interval: Interval,
}

impl Range {
    /// The default range: the 30 days up to `now`, by day.
    pub fn last_30_days(now: DateTime<Utc>) -> Self {
        Self {
            from: now - Duration::days(30),
            to: now,
            interval: Interval::Day,
        }
    }

    /// Checks the range: `from` before `to`, and not more buckets than the interval allows.
    pub fn check(&self) -> Result<(), ServiceError> {
        if self.from >= self.to {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidQuery,
                "`from` must be before `to`",
            ));
        }
        let (limit, what) = match self.interval {
            Interval::Hour => (Duration::hours(MAX_HOURS), "31 days with `interval=hour`"),
            Interval::Day => (Duration::days(MAX_DAYS), "367 days with `interval=day`"),
        };
        if self.to - self.from > limit {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidQuery,
                format!("the range may span at most {what}"),
            ));
        }
        Ok(())
    }

    /// The start of the bucket holding `ms`.
    fn bucket(&self, ms: i64) -> i64 {
        match self.interval {
            Interval::Hour => hour_of(ms),
            Interval::Day => day_of(ms),
        }
    }

    /// Every bucket's start from `from`'s to `to`.
    fn buckets(&self) -> Vec<i64> {
        let step = match self.interval {
            Interval::Hour => 3_600_000,
            Interval::Day => 86_400_000,
        };
        let (mut at, end) = (
            self.bucket(self.from.timestamp_millis()),
            self.to.timestamp_millis(),
        );
        let mut all = Vec::new();
        while at < end {
            all.push(at);
            at += step;
        }
        all
    }
}

/// Visitors now and over fixed windows.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VisitorCounts {
    /// On the site now (reported in the last 5 minutes, or connected).
    pub now: u64,
    /// Seen since midnight UTC.
    pub today: u64,
    /// Seen in the last 7 days.
    pub last_7_days: u64,
    /// Seen in the last 30 days.
    pub last_30_days: u64,
    /// Distinct visitors per bucket, summed over the range (a visitor seen on two days
    /// counts twice).
    pub in_range: u64,
    /// Visits started in the range.
    pub visits: u64,
}

/// Conversations in the range.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConversationCounts {
    /// Started (rooms created).
    pub started: i64,
    /// Of those, how many the assistant answered.
    pub ai_answered: i64,
    /// Of those, how many never reached a human.
    pub ai_only: i64,
    /// `ai_only / ai_answered` (none without AI answers).
    pub answered_without_human: Option<f64>,
    /// Handed from the bot to people.
    pub escalated: i64,
    /// Assigned to an agent.
    pub assigned: i64,
    /// Moved from one agent to another.
    pub transferred: i64,
    /// Resolved.
    pub resolved: i64,
    /// Brought back after being resolved.
    pub reopened: i64,
}

/// Messages in the range.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageCounts {
    /// All of them.
    pub total: i64,
    /// Per role label (`visitor`, `assistant`, `agent`, `system`…).
    pub by_role: BTreeMap<String, i64>,
}

/// First-response times of the responses in the range.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FirstResponse {
    /// Responses counted.
    pub count: usize,
    /// Median (nearest rank), milliseconds.
    pub median_ms: Option<u64>,
    /// 90th percentile (nearest rank), milliseconds.
    pub p90_ms: Option<u64>,
}

/// AI tokens.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AiTokens {
    /// Provider calls in the range.
    pub calls: u64,
    /// Prompt tokens in the range.
    pub prompt_tokens: u64,
    /// Completion tokens in the range.
    pub completion_tokens: u64,
    /// Both.
    pub total_tokens: u64,
    /// Tokens used since midnight UTC.
    pub used_today: u64,
    /// The assistant's daily budget, if it has one.
    pub daily_budget: Option<u64>,
    /// `used_today / daily_budget`.
    pub budget_used: Option<f64>,
}

/// One bucket of the series.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Where the bucket starts (RFC 3339).
    pub at: String,
    /// Distinct visitors seen.
    pub visitors: u64,
    /// Visits started.
    pub visits: u64,
    /// Conversations started.
    pub conversations: i64,
    /// Messages written.
    pub messages: i64,
    /// The assistant's replies.
    pub ai_replies: i64,
    /// Hand-overs to people.
    pub escalated: i64,
    /// Resolutions.
    pub resolved: i64,
}

/// A domain's statistics.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DomainStats {
    /// The domain.
    pub domain_id: String,
    /// On the site now (seed 001's figure).
    pub active_visitors: u64,
    /// Seen today (UTC).
    pub visitors_today: u64,
    /// Start of the range (RFC 3339).
    pub from: String,
    /// End of the range (exclusive).
    pub to: String,
    /// `hour` or `day`.
    pub interval: &'static str,
    /// Visitors.
    pub visitors: VisitorCounts,
    /// Conversations.
    pub conversations: ConversationCounts,
    /// Messages.
    pub messages: MessageCounts,
    /// The assistant's replies (messages with the role `assistant`).
    pub ai_replies: i64,
    /// First-response times.
    pub first_response: FirstResponse,
    /// AI tokens.
    pub ai_tokens: AiTokens,
    /// Per bucket, every bucket of the range.
    pub series: Vec<Point>,
}

/// A visitor on the site now.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActiveVisitor {
    /// The visitor's id.
    pub visitor_id: String,
    /// What the store holds of them (none for a visitor only connected, never reported).
    pub visitor: Option<Visitor>,
}

/// Statistics of domains.
#[derive(Debug)]
pub struct StatsService {
    store: Arc<dyn Store>,
    visitors: Arc<VisitorService>,
    ai: Arc<AiService>,
}

/// The value at the nearest rank `p` (0 < p ≤ 1) of `sorted`.
fn nearest_rank(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // Ranks are small (at most `MAX_FIRST_RESPONSES`): the float is exact.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[allow(clippy::cast_precision_loss)]
fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole)
}

impl StatsService {
    /// Statistics from `store`, with who is on the site from `visitors` and budgets from
    /// `ai`.
    pub fn new(store: Arc<dyn Store>, visitors: Arc<VisitorService>, ai: Arc<AiService>) -> Self {
        Self {
            store,
            visitors,
            ai,
        }
    }

    /// Whether `caller` may read `domain`'s statistics: its agents, admins and back end.
    fn admit(caller: &Identity, domain: &str) -> Result<(), ServiceError> {
        if !policy::may_read_stats(caller) {
            return Err(ServiceError::Forbidden(
                "statistics are for the domain's agents, admins and back end".into(),
            ));
        }
        if &*caller.domain_id != domain {
            return Err(ServiceError::Forbidden(format!(
                "domain {domain:?} is not the caller's"
            )));
        }
        Ok(())
    }

    /// `domain`'s statistics over `range`, as of `now`.
    pub async fn domain(
        &self,
        caller: &Identity,
        domain: &str,
        range: Range,
        now: DateTime<Utc>,
    ) -> Result<DomainStats, ServiceError> {
        Self::admit(caller, domain)?;
        range.check()?;
        let midnight =
            DateTime::from_timestamp_millis(day_of(now.timestamp_millis())).unwrap_or(now);
        // Independent reads, at once.
        let windows = [midnight, now - Duration::days(7), now - Duration::days(30)];
        let store = &*self.store;
        let (active, budget, read) = tokio::join!(
            self.visitors.active(domain),
            self.ai.daily_token_budget(domain),
            async {
                tokio::try_join!(
                    store.visitors_since(domain, &windows),
                    store.visitor_series(domain, range.from, range.to, range.interval),
                    store.activity(domain, range.from, range.to),
                    store.first_response_times(domain, range.from, range.to),
                    store.usage(domain, range.from, range.to, UsageGrouping::Model),
                    store.usage(
                        domain,
                        midnight,
                        now + Duration::days(1),
                        UsageGrouping::Day
                    ),
                )
            }
        );
        let (windows, visitor_buckets, activity, mut times, usage, today) = read?;
        let active = active.len() as u64;
        let window = |i: usize| windows.get(i).copied().unwrap_or(0);
        times.sort_unstable();

        // The series: every bucket, zeros included.
        let buckets = range.buckets();
        let mut series: BTreeMap<i64, Point> = buckets
            .iter()
            .map(|&at| {
                let at_time = DateTime::from_timestamp_millis(at).unwrap_or_default();
                (
                    at,
                    Point {
                        at: iso(at_time),
                        ..Point::default()
                    },
                )
            })
            .collect();
        let (mut in_range, mut visits) = (0, 0);
        for b in &visitor_buckets {
            in_range += b.visitors;
            visits += b.visits;
            if let Some(p) = series.get_mut(&range.bucket(b.at.timestamp_millis())) {
                p.visitors += b.visitors;
                p.visits += b.visits;
            }
        }
        let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
        let mut by_role: BTreeMap<String, i64> = BTreeMap::new();
        for Activity { at, metric, n } in &activity {
            // Counters of rooms (started, AI-answered) are kept at the room's creation
            // hour, which may precede the range only when the range starts mid-hour.
            let point = series.get_mut(&range.bucket(at.timestamp_millis()));
            if let Some(role) = metric.strip_prefix(stats::MESSAGES_PREFIX) {
                *by_role.entry(role.to_owned()).or_default() += n;
                if let Some(p) = point {
                    p.messages += n;
                    if role == stats::ASSISTANT_ROLE {
                        p.ai_replies += n;
                    }
                }
                continue;
            }
            let name = match metric.as_str() {
                stats::CONVERSATIONS => stats::CONVERSATIONS,
                stats::AI_CONVERSATIONS => stats::AI_CONVERSATIONS,
                stats::AI_ONLY => stats::AI_ONLY,
                stats::ESCALATED => stats::ESCALATED,
                stats::ASSIGNED => stats::ASSIGNED,
                stats::TRANSFERRED => stats::TRANSFERRED,
                stats::RESOLVED => stats::RESOLVED,
                stats::REOPENED => stats::REOPENED,
                _ => continue,
            };
            *totals.entry(name).or_default() += n;
            if let Some(p) = point {
                match name {
                    stats::CONVERSATIONS => p.conversations += n,
                    stats::ESCALATED => p.escalated += n,
                    stats::RESOLVED => p.resolved += n,
                    _ => {}
                }
            }
        }
        let total = |name: &str| totals.get(name).copied().unwrap_or(0);
        let ai_replies = by_role.get(stats::ASSISTANT_ROLE).copied().unwrap_or(0);
        #[allow(clippy::cast_precision_loss)]
        let conversations = ConversationCounts {
            started: total(stats::CONVERSATIONS),
            ai_answered: total(stats::AI_CONVERSATIONS),
            ai_only: total(stats::AI_ONLY),
            answered_without_human: ratio(
                total(stats::AI_ONLY) as f64,
                total(stats::AI_CONVERSATIONS) as f64,
            ),
            escalated: total(stats::ESCALATED),
            assigned: total(stats::ASSIGNED),
            transferred: total(stats::TRANSFERRED),
            resolved: total(stats::RESOLVED),
            reopened: total(stats::REOPENED),
        };
        let used_today: u64 = today
            .iter()
            .map(|g| g.prompt_tokens + g.completion_tokens)
            .sum();
        let (prompt, completion) = usage.iter().fold((0, 0), |(p, c), g| {
            (p + g.prompt_tokens, c + g.completion_tokens)
        });
        #[allow(clippy::cast_precision_loss)]
        let ai_tokens = AiTokens {
            calls: usage.iter().map(|g| g.calls).sum(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            used_today,
            daily_budget: budget,
            budget_used: budget.and_then(|b| ratio(used_today as f64, b as f64)),
        };
        Ok(DomainStats {
            domain_id: domain.to_owned(),
            active_visitors: active,
            visitors_today: window(0),
            from: iso(range.from),
            to: iso(range.to),
            interval: match range.interval {
                Interval::Hour => "hour",
                Interval::Day => "day",
            },
            visitors: VisitorCounts {
                now: active,
                today: window(0),
                last_7_days: window(1),
                last_30_days: window(2),
                in_range,
                visits,
            },
            conversations,
            messages: MessageCounts {
                total: by_role.values().sum(),
                by_role,
            },
            ai_replies,
            first_response: FirstResponse {
                count: times.len(),
                median_ms: nearest_rank(&times, 0.5),
                p90_ms: nearest_rank(&times, 0.9),
            },
            ai_tokens,
            series: series.into_values().collect(),
        })
    }

    /// The visitors on `domain`'s site now, with what the store holds of each, the most
    /// recently seen first, at most [`MAX_LISTED`].
    pub async fn active_visitors(
        &self,
        caller: &Identity,
        domain: &str,
    ) -> Result<Vec<ActiveVisitor>, ServiceError> {
        Self::admit(caller, domain)?;
        let active: std::collections::BTreeSet<String> =
            self.visitors.active(domain).await.into_iter().collect();
        // Those seen most recently are the store's latest visitors that are on the site;
        // a connected visitor not seen lately (or never reported) fills what is left.
        let mut listed: Vec<ActiveVisitor> = self
            .store
            .recent_visitors(domain, MAX_LISTED)
            .await?
            .into_iter()
            .filter(|v| active.contains(&v.visitor_id))
            .map(|v| ActiveVisitor {
                visitor_id: v.visitor_id.clone(),
                visitor: Some(v),
            })
            .collect();
        let listed_ids: std::collections::HashSet<String> =
            listed.iter().map(|v| v.visitor_id.clone()).collect();
        let rest: Vec<String> = active
            .into_iter()
            .filter(|id| !listed_ids.contains(id))
            .take(MAX_LISTED - listed.len())
            .collect();
        let mut stored: std::collections::HashMap<String, Visitor> = self
            .store
            .visitors_named(domain, &rest)
            .await?
            .into_iter()
            .map(|v| (v.visitor_id.clone(), v))
            .collect();
        let mut others: Vec<ActiveVisitor> = rest
            .into_iter()
            .map(|id| ActiveVisitor {
                visitor: stored.remove(&id),
                visitor_id: id,
            })
            .collect();
        others.sort_by(|a, b| {
            let seen = |v: &ActiveVisitor| v.visitor.as_ref().map(|s| s.last_seen);
            seen(b)
                .cmp(&seen(a))
                .then_with(|| a.visitor_id.cmp(&b.visitor_id))
        });
        listed.extend(others);
        Ok(listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(nearest_rank(&[], 0.5), None);
        assert_eq!(nearest_rank(&[7], 0.9), Some(7));
        let ten: Vec<u64> = (1..=10).collect();
        assert_eq!(nearest_rank(&ten, 0.5), Some(5));
        assert_eq!(nearest_rank(&ten, 0.9), Some(9));
        let eleven: Vec<u64> = (1..=11).collect();
        assert_eq!(nearest_rank(&eleven, 0.5), Some(6));
        assert_eq!(nearest_rank(&eleven, 0.9), Some(10));
    }

    #[test]
    fn a_range_lists_every_bucket_and_refuses_too_many() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let range = Range {
            from: at("2026-12-01T10:30:00Z"),
            to: at("2026-12-01T13:00:00Z"),
            interval: Interval::Hour,
        };
        assert_eq!(range.buckets().len(), 3, "10:00, 11:00, 12:00");
        let days = Range {
            interval: Interval::Day,
            ..range
        };
        assert_eq!(days.buckets().len(), 1);
        assert!(range.check().is_ok());
        let long = Range {
            to: at("2027-01-02T00:00:00Z"),
            ..range
        };
        assert!(long.check().is_err(), "more than 31 days of hours");
        assert!(
            Range {
                interval: Interval::Day,
                ..long
            }
            .check()
            .is_ok()
        );
        let backwards = Range {
            from: range.to,
            to: range.from,
            ..range
        };
        assert!(backwards.check().is_err());
    }
}

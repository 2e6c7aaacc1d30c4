//! A domain's activity as the statistics need it (`docs/stats.md`), and the [`Stats`] trait
//! every store implements.
//!
//! **Counted where it happens.** Each write that the statistics count adds to a per-hour
//! counter (`activity_hours`: domain, hour, metric, writer, n) in the transaction that makes
//! it, so the counts are exactly what is stored, and a request sums at most a range of
//! those rows (its primary key), never the messages themselves:
//! - a room created: [`CONVERSATIONS`];
//! - a message stored: `messages.<role>` ([`message_metric`]);
//! - a hand-off transition: [`ESCALATED`], [`ASSIGNED`], [`TRANSFERRED`], [`RESOLVED`],
//!   [`REOPENED`] ([`transition_metrics`]);
//! - a room's first `assistant` message: [`AI_CONVERSATIONS`] and, unless the room already
//!   reached a human, [`AI_ONLY`]; a room's first escalation or assignment takes its
//!   [`AI_ONLY`] back. These two are counted at the hour the room was *created*, so "the
//!   share of conversations started in a range that the AI answered without a human" is
//!   their ratio, and stays right however late the hand-off comes.
//!
//! Each room keeps when it first had an AI reply and first reached a human
//! (`rooms.ai_replied_at`, `rooms.handed_over_at`), so each is counted once.
//!
//! **Writers never wait on each other.** A counter row is keyed by the writer that counted
//! (one per node on PostgreSQL, [`Tally`] flushed once per transaction), so the batches of
//! several nodes never queue on one hot row; reads sum over writers.
//!
//! **First-response times** are kept one per response (`first_responses`, indexed by domain
//! and time), so their median and 90th percentile are exact.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;
use crate::model::{Conversation, RoomStatus};

/// Rooms created.
pub const CONVERSATIONS: &str = "conversations";
/// Rooms with at least one AI reply (at the room's creation hour).
pub const AI_CONVERSATIONS: &str = "conversations.ai";
/// Rooms with an AI reply that never reached a human (at the room's creation hour).
pub const AI_ONLY: &str = "conversations.ai_only";
/// Conversations handed from the bot to people: escalated, or taken by an agent.
pub const ESCALATED: &str = "escalated";
/// Conversations assigned to an agent.
pub const ASSIGNED: &str = "assigned";
/// Conversations moved from one agent to another.
pub const TRANSFERRED: &str = "transferred";
/// Conversations resolved.
pub const RESOLVED: &str = "resolved";
/// Resolved conversations that came back to people.
pub const REOPENED: &str = "reopened";
/// Prefix of the per-role message counters.
pub const MESSAGES_PREFIX: &str = "messages.";

/// The role label of an `assistant` reply.
pub const ASSISTANT_ROLE: &str = "assistant";

const HOUR_MS: i64 = 3_600_000;

/// The counter of messages written with the role label `role`.
pub fn message_metric(role: &str) -> String {
    format!("{MESSAGES_PREFIX}{role}")
}

/// Whether a room key is counted: Pusher channels' keys (`#…`) are not conversations.
pub fn counted(room_id: &str) -> bool {
    !room_id.starts_with('#')
}

/// Whether people (not the bot) have the conversation.
fn with_people(status: RoomStatus) -> bool {
    matches!(status, RoomStatus::Waiting | RoomStatus::Assigned)
}

/// Whether the change from `current` to `next` hands the room from the bot (or from
/// resolved) to people.
pub fn hands_over(current: &Conversation, next: &Conversation) -> bool {
    !with_people(current.status) && with_people(next.status)
}

/// The counters a hand-off transition from `current` to `next` moves by one.
pub fn transition_metrics(current: &Conversation, next: &Conversation) -> Vec<&'static str> {
    let mut metrics = Vec::new();
    if hands_over(current, next) {
        metrics.push(ESCALATED);
        if current.status == RoomStatus::Resolved {
            metrics.push(REOPENED);
        }
    }
    if next.status == RoomStatus::Assigned {
        let agent = |c: &Conversation| c.assignee.as_ref().map(|a| a.user_id.clone());
        if current.status != RoomStatus::Assigned {
            metrics.push(ASSIGNED);
        } else if agent(current) != agent(next) {
            metrics.push(TRANSFERRED);
        }
    }
    if next.status == RoomStatus::Resolved && current.status != RoomStatus::Resolved {
        metrics.push(RESOLVED);
    }
    metrics
}

/// The start of the hour of `ms` (unix milliseconds).
pub fn hour_start(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// Counter changes gathered during one transaction, written at its end as one statement.
#[derive(Debug, Default)]
pub struct Tally {
    counts: HashMap<(String, i64, String), i64>,
}

impl Tally {
    /// Adds `n` to `metric` of `domain` for the hour of `at_ms`.
    pub fn add(&mut self, domain: &str, at_ms: i64, metric: &str, n: i64) {
        *self
            .counts
            .entry((domain.to_owned(), hour_start(at_ms), metric.to_owned()))
            .or_default() += n;
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Forgets everything counted (the transaction rolled back).
    pub fn clear(&mut self) {
        self.counts.clear();
    }

    /// Takes what was counted: `(domain, hour start, metric, n)`, zeros left out.
    pub fn take(&mut self) -> Vec<(String, i64, String, i64)> {
        self.counts
            .drain()
            .filter(|(_, n)| *n != 0)
            .map(|((domain, at, metric), n)| (domain, at, metric, n))
            .collect()
    }
}

/// One counter of one hour, summed over writers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// The hour's start.
    pub at: DateTime<Utc>,
    /// What was counted.
    pub metric: String,
    /// How many.
    pub n: i64,
}

/// Most first-response times a request reads; beyond it, the latest are used.
pub const MAX_FIRST_RESPONSES: usize = 100_000;

/// Storage of a domain's activity counters.
#[async_trait]
pub trait Stats: Send + Sync {
    /// The domain's counters per hour from `from` (rounded down to its hour) to before
    /// `to`, summed over writers; hours and metrics with none are left out.
    async fn activity(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Activity>, StoreError>;

    /// The domain's first-response times (milliseconds) of responses from `from` to before
    /// `to`, at most [`MAX_FIRST_RESPONSES`] (the latest), in no order.
    async fn first_response_times(
        &self,
        domain_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<u64>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Agent, RoomKey};

    fn conversation(status: RoomStatus, agent: Option<&str>) -> Conversation {
        let mut c = Conversation::new(RoomKey::new("d", "r"));
        c.status = status;
        c.assignee = agent.map(|a| Agent {
            user_id: a.into(),
            name: a.into(),
        });
        c
    }

    #[test]
    fn each_transition_moves_the_counters_it_is() {
        use RoomStatus::*;
        let bot = conversation(Bot, None);
        let waiting = conversation(Waiting, None);
        let ann = conversation(Assigned, Some("ann"));
        let bob = conversation(Assigned, Some("bob"));
        let resolved = conversation(Resolved, None);
        assert_eq!(transition_metrics(&bot, &waiting), [ESCALATED]);
        assert_eq!(transition_metrics(&bot, &ann), [ESCALATED, ASSIGNED]);
        assert_eq!(transition_metrics(&waiting, &ann), [ASSIGNED]);
        assert_eq!(transition_metrics(&ann, &bob), [TRANSFERRED]);
        assert!(transition_metrics(&ann, &waiting).is_empty(), "unassign");
        assert_eq!(transition_metrics(&ann, &resolved), [RESOLVED]);
        assert_eq!(
            transition_metrics(&resolved, &waiting),
            [ESCALATED, REOPENED]
        );
        assert_eq!(
            transition_metrics(&resolved, &bob),
            [ESCALATED, REOPENED, ASSIGNED]
        );
        assert!(hands_over(&bot, &waiting) && hands_over(&resolved, &ann));
        assert!(!hands_over(&waiting, &ann) && !hands_over(&ann, &resolved));
    }

    #[test]
    fn a_tally_sums_per_domain_hour_and_metric_and_drops_zeros() {
        let mut tally = Tally::default();
        tally.add("d", 3_600_000 + 5, "m", 1);
        tally.add("d", 7_199_999, "m", 2);
        tally.add("d", 7_200_000, "m", 1);
        tally.add("e", 10, "x", 1);
        tally.add("e", 20, "x", -1);
        let mut rows = tally.take();
        rows.sort();
        assert_eq!(
            rows,
            [
                ("d".to_owned(), 3_600_000, "m".to_owned(), 3),
                ("d".to_owned(), 7_200_000, "m".to_owned(), 1),
            ]
        );
        assert!(tally.is_empty());
        assert!(counted("room-1") && !counted("#app#chan"));
        assert_eq!(hour_start(-1), -3_600_000);
    }
}

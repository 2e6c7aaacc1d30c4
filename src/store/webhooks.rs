//! The webhook outbox: events for the domains' webhooks, written in the transaction of the
//! change they report, and taken from there by the delivery workers of every node.
//!
//! - [`Subscriptions`] says which domains have a webhook for which event. Every write that
//!   can raise an event looks its domain up there (one hash lookup; a domain without
//!   webhooks pays nothing else) and, when a webhook wants the event, adds one outbox row
//!   per such webhook inside its own transaction: an event is stored exactly when the change
//!   is, and a crash loses neither or both.
//! - An outbox row belongs to a *partition*: (domain, webhook URL, partition key), the key
//!   being the room for messages and conversations, the user for notifications, the
//!   visitor, the session. Rows of one partition are delivered one at a time in the order
//!   they were written: only a partition's oldest pending row (its head) can be taken.
//! - [`Outbox::claim_webhooks`] takes due heads for a node with a lease
//!   (`claimed_by`, `claimed_until`); on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so nodes
//!   claiming together never take the same row. A node that dies holding a lease loses
//!   nothing: once the lease passes, another node takes the row again.
//! - [`Outbox::finish_webhook`] records an attempt: delivered, retry at a later time, or
//!   dead (given up). Rows that ended are kept for the delivery log, then pruned.
//!
//! Depends on [`crate::config`] (the event names) only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::StoreError;
use crate::config::{DomainConfig, WebhookEvent};
use crate::model::{Conversation, Message, RoomStatus};

/// Which domains have webhooks for which events, swapped whole when the domains change.
#[derive(Debug, Default)]
pub struct Subscriptions {
    table: ArcSwap<HashMap<String, Vec<Endpoint>>>,
    /// Whether the table has a domain: with none (most servers), a write reads this flag
    /// and nothing else.
    any: std::sync::atomic::AtomicBool,
}

/// One webhook as the outbox sees it: its URL and the events it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where it is posted (names the partition).
    pub url: Arc<str>,
    /// Bits of [`WebhookEvent::bit`].
    pub events: u16,
}

impl Subscriptions {
    /// Publishes the webhooks of `domains`.
    pub fn replace<'a>(&self, domains: impl IntoIterator<Item = &'a DomainConfig>) {
        let mut table = HashMap::new();
        for d in domains {
            let endpoints: Vec<Endpoint> = d
                .webhooks
                .iter()
                .map(|h| Endpoint {
                    url: Arc::from(h.url.as_str()),
                    events: h.events.iter().fold(0, |bits, e| bits | e.bit()),
                })
                .collect();
            if !endpoints.is_empty() {
                table.insert(d.id.clone(), endpoints);
            }
        }
        let any = !table.is_empty();
        self.table.store(Arc::new(table));
        self.any.store(any, std::sync::atomic::Ordering::Release);
    }

    /// True when no domain has a webhook.
    pub fn is_empty(&self) -> bool {
        !self.any.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The URLs of `domain`'s webhooks that want `event` (none, for most domains, after one
    /// hash lookup).
    pub fn urls(&self, domain: &str, event: WebhookEvent) -> Vec<Arc<str>> {
        if self.is_empty() {
            return Vec::new();
        }
        let table = self.table.load();
        table.get(domain).map_or_else(Vec::new, |endpoints| {
            endpoints
                .iter()
                .filter(|e| e.events & event.bit() != 0)
                .map(|e| Arc::clone(&e.url))
                .collect()
        })
    }

    /// Outbox rows for `event` of `domain`, one per webhook that wants it (usually none).
    pub fn rows(
        &self,
        domain: &str,
        event: WebhookEvent,
        partition: Partition<'_>,
        payload: impl FnOnce() -> Value,
    ) -> Vec<NewOutboxRow> {
        let urls = self.urls(domain, event);
        if urls.is_empty() {
            return Vec::new();
        }
        let payload = payload().to_string();
        let partition = partition.to_string();
        urls.into_iter()
            .map(|url| NewOutboxRow {
                id: format!("wh_{}", uuid::Uuid::now_v7().simple()),
                domain_id: domain.to_owned(),
                endpoint: url.to_string(),
                partition: partition.clone(),
                event,
                payload: payload.clone(),
            })
            .collect()
    }
}

/// An outbox row about to be written with the change it reports.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOutboxRow {
    /// The event's id (`X-Parlor-Webhook-Id`, `id` of the body).
    pub id: String,
    /// The domain.
    pub domain_id: String,
    /// The webhook's URL.
    pub endpoint: String,
    /// What orders it: `room:ID`, `user:ID`, `visitor:ID`, `session:ID`.
    pub partition: String,
    /// What happened.
    pub event: WebhookEvent,
    /// The body's `data`, as JSON text.
    pub payload: String,
}

/// What orders an event: its room, user, visitor or session. Rows of one partition (and
/// webhook) are delivered one at a time, in the order they were written. Borrowed, so that
/// naming it costs nothing when no webhook wants the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition<'a> {
    /// A room's messages and hand-off (`room:ID`).
    Room(&'a str),
    /// A user's notifications (`user:ID`).
    User(&'a str),
    /// A visitor's comings and goings (`visitor:ID`).
    Visitor(&'a str),
    /// A guided session (`session:ID`).
    Session(&'a str),
}

impl std::fmt::Display for Partition<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Room(id) => write!(f, "room:{id}"),
            Self::User(id) => write!(f, "user:{id}"),
            Self::Visitor(id) => write!(f, "visitor:{id}"),
            Self::Session(id) => write!(f, "session:{id}"),
        }
    }
}

/// The `data` of `message.created`.
pub fn message_payload(m: &Message) -> Value {
    json!({
        "id": m.id,
        "roomId": &*m.room.room_id,
        "seq": m.seq,
        "author": { "userId": m.author.user_id, "name": m.author.name, "role": m.author.role },
        "type": m.kind,
        "content": m.content,
        "data": m.data,
        "clientMessageId": m.client_message_id,
        "createdAt": m.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// The event a hand-off transition from `before` to `after` raises, if any.
pub fn conversation_event(before: &Conversation, after: &Conversation) -> Option<WebhookEvent> {
    use RoomStatus::{Assigned, Bot, Resolved, Waiting};
    Some(match (before.status, after.status) {
        (Resolved, Resolved) => return None,
        (Resolved, _) => WebhookEvent::ConversationReopened,
        (_, Resolved) => WebhookEvent::ConversationResolved,
        (Assigned, Assigned) => WebhookEvent::ConversationTransferred,
        (_, Assigned) => WebhookEvent::ConversationAssigned,
        (Assigned, Waiting) => WebhookEvent::ConversationUnassigned,
        (_, Waiting) => WebhookEvent::ConversationEscalated,
        (_, Bot) => return None,
    })
}

/// The `data` of a `conversation.*` event.
pub fn conversation_payload(before: &Conversation, after: &Conversation) -> Value {
    let time = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    let agent = |c: &Conversation| {
        c.assignee
            .as_ref()
            .map(|a| json!({ "userId": a.user_id, "name": a.name }))
    };
    json!({
        "roomId": &*after.room.room_id,
        "status": after.status.as_str(),
        "previousStatus": before.status.as_str(),
        "assignee": agent(after),
        "previousAssignee": agent(before),
        "statusSeq": after.status_seq,
        "version": after.version,
        "waitingSince": time(after.waiting_since),
        "assignedAt": time(after.assigned_at),
        "resolvedAt": time(after.resolved_at),
        "updatedAt": time(Some(after.updated_at)),
    })
}

/// The `data` of `notification.created` (partition `user:ID`).
pub fn notification_payload(n: &super::notifications::Notification) -> Value {
    json!({
        "id": n.id,
        "userId": n.user_id,
        "orgId": n.org_id,
        "taskId": n.task_id,
        "type": n.kind.as_str(),
        "content": n.content,
        "data": n.data.as_deref().map(|d| serde_json::from_str::<Value>(d)
            .unwrap_or_else(|_| Value::String(d.to_owned()))),
        "seq": n.seq,
        "createdAt": n.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// The `data` of `visitor.added` (partition `visitor:ID`): a sighting that starts a visit.
pub fn visitor_added_payload(s: &super::visitors::Sighting, first_visit: bool) -> Value {
    json!({
        "visitorId": s.visitor_id,
        "at": s.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "firstVisit": first_visit,
        "page": s.page,
        "referrer": s.referrer,
        "userAgent": s.user_agent,
        "data": s.data.as_deref().map(|d| serde_json::from_str::<Value>(d)
            .unwrap_or_else(|_| Value::String(d.to_owned()))),
    })
}

/// The `data` of `visitor.removed` (partition `visitor:ID`).
pub fn visitor_removed_payload(visitor_id: &str, at: DateTime<Utc>) -> Value {
    json!({
        "visitorId": visitor_id,
        "at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// The `data` of `session.completed` (partition `session:ID`).
pub fn session_payload(
    session_id: &str,
    user_id: &str,
    template_id: &str,
    document: &super::guided::NewDocument,
    at: DateTime<Utc>,
) -> Value {
    json!({
        "sessionId": session_id,
        "userId": user_id,
        "templateId": template_id,
        "document": {
            "id": document.id,
            "title": document.title,
            "format": document.format,
            "bytes": document.content.as_ref().map(String::len),
        },
        "completedAt": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// Where an outbox row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Not delivered yet: waiting for its turn, its attempt or its retry.
    Pending,
    /// Taken by the receiver (a 2xx answer).
    Delivered,
    /// Given up after `webhooks.retry_for`, or its webhook was removed.
    Dead,
}

impl DeliveryStatus {
    /// Stored and listed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "delivered" => Some(Self::Delivered),
            "dead" => Some(Self::Dead),
            _ => None,
        }
    }
}

/// An outbox row a node claimed, to post.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedRow {
    /// The event's id.
    pub id: String,
    /// The domain.
    pub domain_id: String,
    /// The webhook's URL.
    pub endpoint: String,
    /// Its partition key.
    pub partition: String,
    /// The event's name as stored.
    pub event: String,
    /// The body's `data`, as JSON text.
    pub payload: String,
    /// When the event happened.
    pub created_at: DateTime<Utc>,
    /// Attempts finished before this one.
    pub attempts: u32,
}

/// What [`Outbox::claim_webhooks`] takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// Who takes the rows (`claimed_by`).
    pub holder: String,
    /// The time of the claim.
    pub now: DateTime<Utc>,
    /// The rows are held until `now + lease`.
    pub lease: Duration,
    /// At most this many rows.
    pub limit: usize,
    /// At most this many rows of one webhook URL, so that one busy receiver cannot take
    /// every place of the claimer.
    pub per_endpoint: usize,
    /// URLs whose rows are not wanted now (the claimer holds enough of theirs).
    pub skip: Vec<String>,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The receiver took it.
    Delivered,
    /// Try again at this time.
    Retry(DateTime<Utc>),
    /// Give up.
    Dead,
    /// Not attempted: give the row back at once, unchanged (the node could not post it
    /// in time).
    Released,
}

/// One finished (or abandoned) attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// When it ended.
    pub at: DateTime<Utc>,
    /// The result.
    pub outcome: Outcome,
    /// The receiver's HTTP status, if it answered.
    pub http_status: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// One row of the delivery log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The event's id.
    pub id: String,
    /// The event's name.
    #[serde(rename = "type")]
    pub event: String,
    /// The webhook's URL.
    pub url: String,
    /// Its partition key.
    pub partition: String,
    /// `pending`, `delivered` or `dead`.
    pub status: &'static str,
    /// Attempts finished.
    pub attempts: u32,
    /// The receiver's last HTTP status.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the event happened.
    pub created_at: DateTime<Utc>,
    /// When it was last attempted.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When it is attempted next (pending rows).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When it was delivered or given up.
    pub finished_at: Option<DateTime<Utc>>,
    /// Where it stands in the log (`before` of the next page).
    #[serde(skip)]
    pub position: i64,
}

/// Which rows [`Outbox::webhook_deliveries`] lists: a domain's newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryQuery {
    /// The domain.
    pub domain_id: String,
    /// Only rows in this state.
    pub status: Option<DeliveryStatus>,
    /// Only rows older than this position (the previous page's `next`).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// The outbox of the domains' webhooks.
#[async_trait]
pub trait Outbox {
    /// The subscriptions this store's writes consult.
    fn webhook_subscriptions(&self) -> &Subscriptions;

    /// Writes `rows` in a transaction of their own: for an event whose change is not
    /// stored anywhere else (a visitor's page saying it left).
    async fn enqueue_webhooks(&self, rows: Vec<NewOutboxRow>) -> Result<(), StoreError>;

    /// Claims due partition heads as `claim` says, oldest first. A row whose lease passed
    /// is due again.
    async fn claim_webhooks(&self, claim: &Claim) -> Result<Vec<ClaimedRow>, StoreError>;

    /// Records `attempt` of row `id` by `holder`. Delivered is recorded whoever holds the
    /// row (it was delivered); the others only by the holder, so a node whose lease passed
    /// cannot undo its successor's work. Returns whether the row changed.
    async fn finish_webhook(
        &self,
        id: &str,
        holder: &str,
        attempt: Attempt,
    ) -> Result<bool, StoreError>;

    /// The delivery log of a domain, newest first.
    async fn webhook_deliveries(&self, query: DeliveryQuery) -> Result<Vec<Delivery>, StoreError>;

    /// Deletes up to `limit` rows that ended before `before`; returns how many.
    async fn prune_webhooks(&self, before: DateTime<Utc>, limit: usize) -> Result<u64, StoreError>;

    /// Rows not delivered yet, and the time the oldest of them happened.
    async fn webhook_backlog(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, WebhookConfig};
    use crate::model::{Agent, RoomKey};

    #[test]
    fn only_subscribed_domains_and_events_get_rows() {
        let subs = Subscriptions::default();
        assert!(subs.urls("shop", WebhookEvent::MessageCreated).is_empty());
        let mut shop = DomainConfig::new("shop", "Shop");
        shop.webhooks = vec![
            WebhookConfig {
                url: "http://a.example/hook".into(),
                secret: Secret::new("0123456789abcdef"),
                events: vec![WebhookEvent::MessageCreated],
            },
            WebhookConfig {
                url: "http://b.example/hook".into(),
                secret: Secret::new("0123456789abcdef"),
                events: vec![WebhookEvent::ConversationResolved],
            },
        ];
        subs.replace([&shop, &DomainConfig::new("quiet", "Quiet")]);
        let urls = subs.urls("shop", WebhookEvent::MessageCreated);
        assert_eq!(urls, vec![Arc::from("http://a.example/hook")]);
        assert!(subs.urls("quiet", WebhookEvent::MessageCreated).is_empty());
        let rows = subs.rows(
            "shop",
            WebhookEvent::ConversationResolved,
            Partition::Room("r"),
            || json!({"x": 1}),
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].endpoint, "http://b.example/hook");
        assert_eq!(rows[0].payload, r#"{"x":1}"#);
        let mut called = false;
        let none = subs.rows(
            "quiet",
            WebhookEvent::MessageCreated,
            Partition::Room("r"),
            || {
                called = true;
                Value::Null
            },
        );
        assert!(none.is_empty() && !called, "no payload is built for nobody");
    }

    #[test]
    fn transitions_name_their_events() {
        let room = RoomKey::new("d", "r");
        let at = |status| Conversation {
            status,
            ..Conversation::new(room.clone())
        };
        let mut with = at(RoomStatus::Assigned);
        with.assignee = Some(Agent {
            user_id: "a".into(),
            name: "A".into(),
        });
        let cases = [
            (
                RoomStatus::Bot,
                RoomStatus::Waiting,
                "conversation.escalated",
            ),
            (
                RoomStatus::Waiting,
                RoomStatus::Assigned,
                "conversation.assigned",
            ),
            (
                RoomStatus::Assigned,
                RoomStatus::Assigned,
                "conversation.transferred",
            ),
            (
                RoomStatus::Assigned,
                RoomStatus::Waiting,
                "conversation.unassigned",
            ),
            (
                RoomStatus::Assigned,
                RoomStatus::Resolved,
                "conversation.resolved",
            ),
            (
                RoomStatus::Resolved,
                RoomStatus::Waiting,
                "conversation.reopened",
            ),
            (
                RoomStatus::Resolved,
                RoomStatus::Assigned,
                "conversation.reopened",
            ),
        ];
        for (from, to, name) in cases {
            let event = conversation_event(&at(from), &at(to)).map(WebhookEvent::name);
            assert_eq!(event, Some(name), "{from:?} -> {to:?}");
        }
        assert_eq!(
            conversation_event(&at(RoomStatus::Resolved), &at(RoomStatus::Resolved)),
            None
        );
        let payload = conversation_payload(&at(RoomStatus::Waiting), &with);
        assert_eq!(payload["assignee"]["userId"], "a");
        assert_eq!(payload["previousStatus"], "waiting");
    }
}

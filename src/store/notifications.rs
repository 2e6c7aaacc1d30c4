//! Notifications (see `docs/notifications.md`): typed messages to one user of a domain, with
//! unread state, and the [`Notifications`] trait every store implements.
//!
//! Each user's notifications are numbered 1, 2, 3… (`seq`) inside the transaction that
//! stores them, by a per-user counter whose row the transaction holds until it commits: a
//! user's notifications commit in `seq` order, so a reader that resumes after `seq` N never
//! misses one committed later with a smaller number.
//!
//! The store checks nothing but what it must to store a value (the notifications service
//! checks types, sizes and ids).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// What a notification is about (seed 004's `ChatMessageType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotificationType {
    /// Progress while a task runs ("Checking availability…").
    SchedulingUpdate,
    /// A task completed ("Meeting scheduled!").
    Confirmation,
    /// More information is needed ("Please provide a title").
    Clarification,
    /// Something was cancelled.
    Cancellation,
    /// Something failed.
    Error,
    /// Anything else.
    Info,
}

impl NotificationType {
    /// Every type, in the seed's order.
    pub const ALL: [NotificationType; 6] = [
        NotificationType::SchedulingUpdate,
        NotificationType::Confirmation,
        NotificationType::Clarification,
        NotificationType::Cancellation,
        NotificationType::Error,
        NotificationType::Info,
    ];

    /// Stored and wire name (upper case).
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationType::SchedulingUpdate => "SCHEDULING_UPDATE",
            NotificationType::Confirmation => "CONFIRMATION",
            NotificationType::Clarification => "CLARIFICATION",
            NotificationType::Cancellation => "CANCELLATION",
            NotificationType::Error => "ERROR",
            NotificationType::Info => "INFO",
        }
    }

    /// Parses a name in any case (`confirmation`, `Scheduling_Update`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

impl serde::Serialize for NotificationType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for NotificationType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown notification type {name:?}")))
    }
}

/// A notification to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// Identifier, chosen by the caller (a UUID).
    pub id: String,
    /// The domain.
    pub domain_id: String,
    /// The user it is for.
    pub user_id: String,
    /// The user's organisation, if the sender names one.
    pub org_id: Option<String>,
    /// The task it is about, if any.
    pub task_id: Option<String>,
    /// What it is about.
    pub kind: NotificationType,
    /// The text.
    pub content: String,
    /// Structured data, as JSON text.
    pub data: Option<String>,
}

impl NewNotification {
    /// The notification as stored with `seq` at `created_at`, unread: what a store returns
    /// for it.
    pub fn stored(&self, seq: u64, created_at: DateTime<Utc>) -> Notification {
        Notification {
            id: self.id.clone(),
            domain_id: self.domain_id.clone(),
            user_id: self.user_id.clone(),
            org_id: self.org_id.clone(),
            task_id: self.task_id.clone(),
            kind: self.kind,
            content: self.content.clone(),
            data: self.data.clone(),
            read: false,
            created_at,
            seq,
        }
    }
}

/// A stored notification (its serde form is how it travels between nodes).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Notification {
    /// Identifier.
    pub id: String,
    /// The domain.
    pub domain_id: String,
    /// The user it is for.
    pub user_id: String,
    /// The user's organisation.
    pub org_id: Option<String>,
    /// The task it is about.
    pub task_id: Option<String>,
    /// What it is about.
    pub kind: NotificationType,
    /// The text.
    pub content: String,
    /// Structured data, as JSON text.
    pub data: Option<String>,
    /// Marked read by its user.
    pub read: bool,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// Its place among its user's notifications: 1, 2, 3… in commit order, without gaps.
    pub seq: u64,
}

/// A user's unread notifications in all, and the `seq` of their latest notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnreadCount {
    /// Unread notifications.
    pub unread: u64,
    /// The user's last `seq` (0: none yet).
    pub last_seq: u64,
}

/// Storage of notifications.
#[async_trait]
pub trait Notifications: Send + Sync {
    /// Stores `batch` in one transaction, each the next `seq` of its user, and returns
    /// them as stored, in order. Returns only once durable.
    async fn add_notifications(
        &self,
        batch: Vec<NewNotification>,
    ) -> Result<Vec<Notification>, StoreError>;

    /// A user's unread notifications with `seq` below `before` (all when `None`), newest
    /// first, at most `limit`.
    async fn unread_notifications(
        &self,
        domain_id: &str,
        user_id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError>;

    /// How many of a user's notifications are unread, and their last `seq`.
    async fn unread_count(&self, domain_id: &str, user_id: &str)
    -> Result<UnreadCount, StoreError>;

    /// A user's notifications after `seq` `after`, read or not, oldest first, at most
    /// `limit`.
    async fn notifications_after(
        &self,
        domain_id: &str,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError>;

    /// A user's notifications of one task, read or not: the latest `limit`, oldest first.
    async fn task_notifications(
        &self,
        domain_id: &str,
        user_id: &str,
        task_id: &str,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError>;

    /// Marks those of `ids` that are the user's and unread as read; how many it marked.
    async fn mark_notifications_read(
        &self,
        domain_id: &str,
        user_id: &str,
        ids: Vec<String>,
    ) -> Result<u64, StoreError>;

    /// Marks every unread notification of the user as read; how many it marked.
    async fn mark_all_notifications_read(
        &self,
        domain_id: &str,
        user_id: &str,
    ) -> Result<u64, StoreError>;

    /// Removes notifications stored before `before`, read or not; how many went.
    async fn expire_notifications(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
}

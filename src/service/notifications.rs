//! Notifications (`docs/notifications.md`): a back end sends typed messages to one of its
//! users; they are stored first, then pushed to that user's live subscribers on every node.
//!
//! ## Live subscribers, in `seq` order without gaps
//!
//! A subscriber (a `/ws` connection that subscribed, an SSE stream) has a position: the
//! next `seq` of its user it should get. Each notification reaches it once and in order,
//! whatever way it comes (stored here, or published by another node through the broker):
//! - one it already got (`seq` below its position) is dropped;
//! - the next one is pushed;
//! - one past a gap (an earlier notification still on its way from another node, or lost
//!   by the broker) is held, and the subscriber is *filled* from the store: everything
//!   after its position, then what it held. A user's notifications commit in `seq` order
//!   (the store's counter), so a notification that was published has every earlier one
//!   committed: the store read has them (or they expired, and the store's order says so).
//!
//! Subscribing is the same fill, from the position the client names (`since`), so the
//! notifications stored before the subscription and those stored while it starts arrive
//! once each, in order, with nothing lost between.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use dashmap::DashMap;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc;

use super::ServiceError;
use crate::broker::Broker;
use crate::broker::shared::{Online, Shared};
use crate::config::NotificationsConfig;
use crate::error_code::ErrorCode;
use crate::event::Event;
use crate::hub::{ConnHandle, Envelope};
use crate::metrics::Metrics;
use crate::model::{Identity, Role, json_depth, valid_id};
use crate::node::Supervisor;
use crate::store::notifications::{NewNotification, Notification, NotificationType, UnreadCount};
use crate::store::{MAX_DATA_DEPTH, Store};

/// Most notifications one send stores.
pub const MAX_BATCH: usize = 100;
/// Longest `content`, in characters.
pub const MAX_CONTENT_CHARS: usize = 10_000;
/// Largest `data`, encoded, in bytes.
pub const MAX_DATA_BYTES: usize = 8 * 1024;
/// Most ids one mark-read names.
pub const MAX_MARK_IDS: usize = 1_000;
/// Most unread notifications one list returns.
pub const MAX_LIST: usize = 100;
/// Most notifications of one task returned.
pub const MAX_TASK_LIST: usize = 1_000;
/// Most stored notifications a new subscriber is sent before the live ones; older ones stay
/// readable with the list endpoints.
pub const MAX_REPLAY: u64 = 256;
/// What an SSE stream buffers for its client at most; a client slower than that is let go
/// and resumes from its last event id.
const STREAM_BUFFER: usize = 2 * MAX_REPLAY as usize;
/// How a subscriber counts as online cluster-wide (for `pusherSent`).
const LISTENING: &str = "notifications";
/// Reads of a fill that the store may fail before the subscriber is let go.
const FILL_ATTEMPTS: u32 = 5;

/// One notification as a back end sends it, before it is checked.
#[derive(Debug, Default, Clone)]
pub struct Draft {
    /// `type`, in any case.
    pub kind: Option<String>,
    /// The user it is for.
    pub user_id: Option<String>,
    /// The text.
    pub content: Option<String>,
    /// The task it is about.
    pub task_id: Option<String>,
    /// The user's organisation.
    pub org_id: Option<String>,
    /// Structured data.
    pub data: Option<Value>,
    /// When the sender made it (checked, not stored: `createdAt` is the store's clock).
    pub timestamp: Option<String>,
}

/// What a send did with one notification.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The stored notification.
    pub notification: Arc<Notification>,
    /// Whether the user had a live subscriber (here or, in a cluster, on another node).
    pub pushed: bool,
}

/// Where a subscriber's notifications go.
#[derive(Debug)]
enum Target {
    /// A `/ws` connection's queue (`notification` frames).
    Conn(ConnHandle),
    /// An SSE stream.
    Stream(mpsc::Sender<Arc<Notification>>),
}

impl Target {
    /// Hands `n` over; false when the subscriber is gone or cannot keep up (then it is
    /// dropped: a connection is kicked by its full queue, a stream ends and its client
    /// resumes from its last event id).
    fn push(&self, n: &Arc<Notification>) -> bool {
        match self {
            Target::Conn(conn) => {
                !conn.is_closed()
                    && conn.push(Envelope::new(Event::Notification(Arc::clone(n))))
                    && !conn.is_kicked()
            }
            Target::Stream(tx) => tx.try_send(Arc::clone(n)).is_ok(),
        }
    }
}

/// One live subscriber of a user.
#[derive(Debug)]
struct Sub {
    /// The connection's id, or a stream's own.
    id: u64,
    target: Target,
    /// The next `seq` it should get.
    next: u64,
    /// Notifications past a gap, held until the fill brings what comes before them.
    held: BTreeMap<u64, Arc<Notification>>,
    /// A fill from the store is running.
    filling: bool,
    /// Counts the user as listening on every node while it lasts.
    _online: Online,
}

impl Sub {
    /// Pushes `n` if it is this subscriber's next; false when the subscriber is gone.
    fn push(&mut self, n: &Arc<Notification>) -> bool {
        if !self.target.push(n) {
            return false;
        }
        self.next = n.seq + 1;
        true
    }

    /// Pushes what it holds from its position on, while contiguous; false when gone.
    fn push_held(&mut self) -> bool {
        self.held = self.held.split_off(&self.next);
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != self.next {
                return true;
            }
            let n = entry.remove();
            if !self.push(&n) {
                return false;
            }
        }
        true
    }
}

/// A user of a domain.
type UserKey = (Arc<str>, String);

/// The user's live subscribers on this node.
type Subs = Arc<Mutex<Vec<Sub>>>;

/// What [`NotificationService::offer`] asks of its caller.
enum Offered {
    /// Nothing more.
    Done,
    /// Fill subscriber `id` from the store.
    Fill(u64),
}

/// Typed notifications to users: sending, reading, marking read, live subscribers.
#[derive(Debug)]
pub struct NotificationService {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    shared: Shared,
    metrics: Arc<Metrics>,
    config: NotificationsConfig,
    supervisor: Supervisor,
    users: DashMap<UserKey, Subs>,
    /// The service itself, for the fills it starts in the background.
    me: std::sync::Weak<NotificationService>,
    /// Ids of SSE streams (from the top of the range: connection ids count from 1).
    stream_ids: AtomicU64,
}

impl NotificationService {
    /// A service storing in `store` and publishing to the other nodes through `broker`.
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        shared: Shared,
        metrics: Arc<Metrics>,
        config: NotificationsConfig,
        supervisor: &Supervisor,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            store,
            broker,
            shared,
            metrics,
            config,
            supervisor: supervisor.clone(),
            users: DashMap::new(),
            me: me.clone(),
            stream_ids: AtomicU64::new(u64::MAX / 2),
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NotificationsConfig {
        &self.config
    }

    // --------------------------------------------------------------------------------
    // Sending
    // --------------------------------------------------------------------------------

    /// Checks and stores `drafts` (one transaction), then pushes each to its user's live
    /// subscribers on every node. A bad draft refuses the whole batch, naming it when there
    /// are several.
    pub async fn send(
        self: &Arc<Self>,
        caller: &Identity,
        drafts: Vec<Draft>,
    ) -> Result<Vec<Sent>, ServiceError> {
        if !matches!(caller.role, Role::Service | Role::Admin) {
            return Err(ServiceError::Forbidden(
                "sending notifications needs a server key of the domain".into(),
            ));
        }
        if drafts.is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidBody,
                "send one notification or an array of them",
            ));
        }
        if drafts.len() > MAX_BATCH {
            return Err(ServiceError::TooLarge {
                code: ErrorCode::TooManyNotifications,
                message: format!("at most {MAX_BATCH} notifications per request"),
            });
        }
        let several = drafts.len() > 1;
        let mut batch = Vec::with_capacity(drafts.len());
        for (i, draft) in drafts.into_iter().enumerate() {
            let checked = check(&caller.domain_id, draft)
                .map_err(|e| if several { in_item(i, e) } else { e })?;
            batch.push(checked);
        }
        let stored = self.store.add_notifications(batch).await?;
        self.metrics.notification("stored", stored.len() as u64);
        let mut sent = Vec::with_capacity(stored.len());
        // Whether each user listens on another node: asked once per user of the batch.
        let mut elsewhere: std::collections::HashMap<String, bool> = Default::default();
        for n in stored {
            let n = Arc::new(n);
            self.broker.to_user(&Event::Notification(Arc::clone(&n)));
            let mut pushed = self.deliver(&n);
            if !pushed && self.broker.topology().is_cluster() {
                pushed = match elsewhere.get(&n.user_id) {
                    Some(listening) => *listening,
                    None => {
                        let listening = self
                            .shared
                            .is_online(&n.domain_id, LISTENING, &n.user_id)
                            .await;
                        elsewhere.insert(n.user_id.clone(), listening);
                        listening
                    }
                };
            }
            sent.push(Sent {
                notification: n,
                pushed,
            });
        }
        Ok(sent)
    }

    // --------------------------------------------------------------------------------
    // Reading
    // --------------------------------------------------------------------------------

    /// The caller's unread notifications before `before` (all when `None`), newest first:
    /// at most `limit` (1–100), whether there are more, and the unread count.
    pub async fn unread(
        &self,
        caller: &Identity,
        limit: usize,
        before: Option<u64>,
    ) -> Result<(Vec<Notification>, bool, UnreadCount), ServiceError> {
        reader(caller)?;
        if !(1..=MAX_LIST).contains(&limit) {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidQuery,
                format!("limit is 1 to {MAX_LIST}"),
            ));
        }
        let mut page = self
            .store
            .unread_notifications(&caller.domain_id, &caller.user_id, before, limit + 1)
            .await?;
        let more = page.len() > limit;
        page.truncate(limit);
        let count = self
            .store
            .unread_count(&caller.domain_id, &caller.user_id)
            .await?;
        Ok((page, more, count))
    }

    /// The caller's unread count and last `seq`.
    pub async fn count(&self, caller: &Identity) -> Result<UnreadCount, ServiceError> {
        reader(caller)?;
        Ok(self
            .store
            .unread_count(&caller.domain_id, &caller.user_id)
            .await?)
    }

    /// The caller's notifications of `task_id`, oldest first (the latest 1,000).
    pub async fn task(
        &self,
        caller: &Identity,
        task_id: &str,
    ) -> Result<Vec<Notification>, ServiceError> {
        reader(caller)?;
        if !valid_id(task_id) {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidTaskId,
                "a task id is 1–128 characters of A-Z a-z 0-9 - _ . : @",
            ));
        }
        Ok(self
            .store
            .task_notifications(&caller.domain_id, &caller.user_id, task_id, MAX_TASK_LIST)
            .await?)
    }

    /// Marks those of `ids` that are the caller's as read; how many were unread.
    pub async fn mark_read(
        &self,
        caller: &Identity,
        ids: Vec<String>,
    ) -> Result<u64, ServiceError> {
        reader(caller)?;
        if ids.is_empty() || ids.len() > MAX_MARK_IDS {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidMessageIds,
                format!("messageIds is an array of 1 to {MAX_MARK_IDS} ids"),
            ));
        }
        if let Some(bad) = ids.iter().position(|id| !valid_id(id)) {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidMessageIds,
                format!("messageIds[{bad}] is not a notification id"),
            ));
        }
        let marked = self
            .store
            .mark_notifications_read(&caller.domain_id, &caller.user_id, ids)
            .await?;
        self.metrics.notification("read", marked);
        Ok(marked)
    }

    /// Marks every notification of the caller read; how many were unread.
    pub async fn mark_all_read(&self, caller: &Identity) -> Result<u64, ServiceError> {
        reader(caller)?;
        let marked = self
            .store
            .mark_all_notifications_read(&caller.domain_id, &caller.user_id)
            .await?;
        self.metrics.notification("read", marked);
        Ok(marked)
    }

    // --------------------------------------------------------------------------------
    // Live subscribers
    // --------------------------------------------------------------------------------

    /// Subscribes `conn` to its user's notifications: those stored after `since` (at most
    /// the latest [`MAX_REPLAY`]; with no `since`, none) are queued first, in `seq` order,
    /// then every new one. Replaces an earlier subscription of the connection. Returns the
    /// unread count and last `seq` as they were when it started.
    pub async fn subscribe(
        self: &Arc<Self>,
        conn: &ConnHandle,
        since: Option<u64>,
    ) -> Result<UnreadCount, ServiceError> {
        let identity = Arc::clone(conn.identity());
        reader(&identity)?;
        self.unsubscribe(conn);
        self.start(identity, conn.id(), Target::Conn(conn.clone()), since)
            .await
    }

    /// Ends `conn`'s subscription; true if it had one.
    pub fn unsubscribe(&self, conn: &ConnHandle) -> bool {
        let identity = conn.identity();
        self.remove(&identity.domain_id, &identity.user_id, conn.id())
    }

    /// Subscribes `conn` to the notifications of `user`, a user of the connection's domain
    /// another credential vouched for (a Pusher connection's signed `private-user-{id}`
    /// channel), from the next one on. Ended by [`Self::unsubscribe_from`].
    pub async fn subscribe_for(
        self: &Arc<Self>,
        conn: &ConnHandle,
        user: &str,
    ) -> Result<UnreadCount, ServiceError> {
        let identity = Arc::new(Identity {
            user_id: user.to_owned(),
            name: user.to_owned(),
            role: Role::Visitor,
            domain_id: Arc::clone(&conn.identity().domain_id),
            anonymous: false,
            room: None,
            label: None,
        });
        self.remove(&identity.domain_id, user, conn.id());
        self.start(identity, conn.id(), Target::Conn(conn.clone()), None)
            .await
    }

    /// Ends `conn`'s subscription to `user`'s notifications; true if it had one.
    pub fn unsubscribe_from(&self, conn: &ConnHandle, user: &str) -> bool {
        self.remove(&conn.identity().domain_id, user, conn.id())
    }

    /// An SSE stream of the caller's notifications after `since` (see [`Self::subscribe`]);
    /// it ends when the client cannot keep up, and unsubscribes when dropped.
    pub async fn stream(
        self: &Arc<Self>,
        caller: &Arc<Identity>,
        since: Option<u64>,
    ) -> Result<(Listener, UnreadCount), ServiceError> {
        reader(caller)?;
        let id = self.stream_ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let count = self
            .start(Arc::clone(caller), id, Target::Stream(tx), since)
            .await?;
        Ok((
            Listener {
                rx,
                service: Arc::clone(self),
                domain: Arc::clone(&caller.domain_id),
                user: caller.user_id.clone(),
                id,
            },
            count,
        ))
    }

    /// Registers a subscriber of `identity`'s notifications and fills it from the store.
    async fn start(
        self: &Arc<Self>,
        identity: Arc<Identity>,
        id: u64,
        target: Target,
        since: Option<u64>,
    ) -> Result<UnreadCount, ServiceError> {
        let count = self
            .store
            .unread_count(&identity.domain_id, &identity.user_id)
            .await?;
        let oldest = count.last_seq.saturating_sub(MAX_REPLAY);
        let next = since.map_or(count.last_seq, |s| s.clamp(oldest, count.last_seq)) + 1;
        let key: UserKey = (Arc::clone(&identity.domain_id), identity.user_id.clone());
        let subs = Arc::clone(self.users.entry(key.clone()).or_default().value());
        subs.lock().push(Sub {
            id,
            target,
            next,
            held: BTreeMap::new(),
            filling: true,
            _online: self.shared.online(&identity, LISTENING),
        });
        // Anything committed from the count on: what the count missed, and what was pushed
        // while the subscriber was filling (held).
        self.fill(&key, id).await;
        Ok(count)
    }

    /// Removes subscriber `id` of a user; true if it was there.
    fn remove(&self, domain: &str, user: &str, id: u64) -> bool {
        let key: UserKey = (Arc::from(domain), user.to_owned());
        let Some(subs) = self.users.get(&key).map(|s| Arc::clone(s.value())) else {
            return false;
        };
        let removed = {
            let mut subs = subs.lock();
            let before = subs.len();
            subs.retain(|s| s.id != id);
            subs.len() != before
        };
        self.users.remove_if(&key, |_, s| s.lock().is_empty());
        removed
    }

    /// Offers `n` to its user's subscribers here; true when the user has one. Subscribers
    /// behind a gap are filled from the store in the background.
    fn deliver(&self, n: &Arc<Notification>) -> bool {
        let key: UserKey = (Arc::from(n.domain_id.as_str()), n.user_id.clone());
        let Some(subs) = self.users.get(&key).map(|s| Arc::clone(s.value())) else {
            return false;
        };
        let mut fills = Vec::new();
        let any = {
            let mut subs = subs.lock();
            subs.retain_mut(|sub| match Self::offer(sub, n) {
                Some(Offered::Fill(id)) => {
                    fills.push(id);
                    true
                }
                Some(Offered::Done) => true,
                None => false,
            });
            !subs.is_empty()
        };
        if any {
            self.metrics.notification("pushed", 1);
        } else {
            self.users.remove_if(&key, |_, s| s.lock().is_empty());
        }
        for id in fills {
            let Some(this) = self.me.upgrade() else {
                break;
            };
            let key = key.clone();
            self.supervisor.spawn("notification-fill", async move {
                this.fill(&key, id).await;
            });
        }
        any
    }

    /// What `sub` does with `n`; `None` when the subscriber is gone.
    fn offer(sub: &mut Sub, n: &Arc<Notification>) -> Option<Offered> {
        if n.seq < sub.next {
            return Some(Offered::Done);
        }
        if sub.filling {
            sub.held.insert(n.seq, Arc::clone(n));
            return Some(Offered::Done);
        }
        if n.seq == sub.next {
            return (sub.push(n) && sub.push_held()).then_some(Offered::Done);
        }
        sub.held.insert(n.seq, Arc::clone(n));
        sub.filling = true;
        Some(Offered::Fill(sub.id))
    }

    /// Brings subscriber `id` up to date from the store: reads what follows its position,
    /// pushes it, then what it held, until nothing is held past a gap. A store that keeps
    /// failing lets the subscriber go (a connection is told to resync; a stream ends).
    async fn fill(&self, key: &UserKey, id: u64) {
        let Some(subs) = self.users.get(key).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let mut failures = 0;
        loop {
            // Where it stands, and the last notification it held before this read.
            let Some((from, held_before)) = subs
                .lock()
                .iter()
                .find(|s| s.id == id)
                .map(|s| (s.next, s.held.last_key_value().map(|(seq, _)| *seq)))
            else {
                return;
            };
            let page = match self
                .store
                .notifications_after(&key.0, &key.1, from - 1, MAX_REPLAY as usize)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    failures += 1;
                    if failures >= FILL_ATTEMPTS {
                        tracing::warn!(error = %e, "cannot read notifications to fill a subscriber; letting it go");
                        self.drop_sub(&subs, id);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100 << failures)).await;
                    continue;
                }
            };
            let full = page.len() >= MAX_REPLAY as usize;
            let mut subs_now = subs.lock();
            let Some(index) = subs_now.iter().position(|s| s.id == id) else {
                return;
            };
            let sub = &mut subs_now[index];
            // The store's order is the truth: a jump in it is what expired.
            let mut alive = page
                .into_iter()
                .all(|n| n.seq < sub.next || sub.push(&Arc::new(n)));
            if alive
                && !full
                && let Some(limit) = held_before
            {
                // Held before the read began, and the read had nothing before them: what
                // came before them expired.
                let due: Vec<Arc<Notification>> = sub
                    .held
                    .range(..=limit)
                    .map(|(_, n)| Arc::clone(n))
                    .collect();
                alive = due.iter().all(|n| n.seq < sub.next || sub.push(n));
            }
            alive = alive && sub.push_held();
            if !alive {
                subs_now.remove(index);
                return;
            }
            if !full && sub.held.is_empty() {
                sub.filling = false;
                return;
            }
            // More to read, or something held came in during the read: read again.
        }
    }

    /// Lets subscriber `id` go after a fill failed.
    fn drop_sub(&self, subs: &Subs, id: u64) {
        let mut subs = subs.lock();
        if let Some(index) = subs.iter().position(|s| s.id == id) {
            if let Target::Conn(conn) = &subs[index].target {
                conn.resync();
            }
            subs.remove(index);
        }
    }

    // --------------------------------------------------------------------------------
    // Retention
    // --------------------------------------------------------------------------------

    /// Deletes notifications older than `retain_days`, if this node holds the cleanup
    /// lease; how many went.
    pub async fn clean_up(&self, node: &str) -> Result<u64, ServiceError> {
        if self.config.retain_days == 0 {
            return Ok(0);
        }
        let lease = self.config.cleanup_every.saturating_mul(2);
        if !self
            .store
            .take_lease("notifications-cleanup", node, lease)
            .await?
        {
            return Ok(0);
        }
        let before = Utc::now() - chrono::Duration::days(i64::from(self.config.retain_days));
        let gone = self.store.expire_notifications(before).await?;
        if gone > 0 {
            self.metrics.notification("expired", gone);
            tracing::info!(notifications = gone, "deleted old notifications");
        }
        Ok(gone)
    }
}

impl crate::node::events::NotificationListener for NotificationService {
    fn notification(&self, notification: Arc<Notification>) {
        self.deliver(&notification);
    }
}

/// An SSE stream's subscription: the notifications, in order; unsubscribes when dropped.
#[derive(Debug)]
pub struct Listener {
    rx: mpsc::Receiver<Arc<Notification>>,
    service: Arc<NotificationService>,
    domain: Arc<str>,
    user: String,
    id: u64,
}

impl Listener {
    /// The next notification; `None` once the subscription was let go.
    pub async fn next(&mut self) -> Option<Arc<Notification>> {
        self.rx.recv().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.service.remove(&self.domain, &self.user, self.id);
    }
}

/// Refuses callers that are not one user: no token, or a server key.
fn reader(caller: &Identity) -> Result<(), ServiceError> {
    if caller.anonymous {
        return Err(ServiceError::Unauthenticated {
            code: ErrorCode::MissingToken,
            message: "send the user's token as Authorization: Bearer".into(),
        });
    }
    if caller.role == Role::Service {
        return Err(ServiceError::Forbidden(
            "notifications are read with the user's own token, not a server key".into(),
        ));
    }
    Ok(())
}

/// `e` about item `i` of a batch.
fn in_item(i: usize, e: ServiceError) -> ServiceError {
    match e {
        ServiceError::Invalid { code, message } => ServiceError::Invalid {
            code,
            message: format!("items[{i}]: {message}"),
        },
        ServiceError::TooLarge { code, message } => ServiceError::TooLarge {
            code,
            message: format!("items[{i}]: {message}"),
        },
        other => other,
    }
}

/// Checks a draft of `domain` and makes it a notification to store.
fn check(domain: &str, d: Draft) -> Result<NewNotification, ServiceError> {
    let kind = match d.kind.as_deref() {
        None => {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidNotificationType,
                "type is required",
            ));
        }
        Some(k) => NotificationType::parse(k).ok_or_else(|| {
            ServiceError::invalid(
                ErrorCode::InvalidNotificationType,
                format!(
                    "type is one of {}",
                    NotificationType::ALL
                        .map(NotificationType::as_str)
                        .join(", ")
                ),
            )
        })?,
    };
    let user_id = match d.user_id {
        Some(u) if valid_id(&u) => u,
        _ => {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidUserId,
                "userId is 1–128 characters of A-Z a-z 0-9 - _ . : @",
            ));
        }
    };
    let content = d.content.unwrap_or_default();
    if content.trim().is_empty() {
        return Err(ServiceError::invalid(
            ErrorCode::EmptyMessage,
            "content is required",
        ));
    }
    if content.chars().count() > MAX_CONTENT_CHARS {
        return Err(ServiceError::TooLarge {
            code: ErrorCode::MessageTooLong,
            message: format!("content is at most {MAX_CONTENT_CHARS} characters"),
        });
    }
    let optional_id = |value: Option<String>, code: ErrorCode, name: &str| match value {
        Some(v) if !valid_id(&v) => Err(ServiceError::invalid(
            code,
            format!("{name} is 1–128 characters of A-Z a-z 0-9 - _ . : @"),
        )),
        v => Ok(v),
    };
    let task_id = optional_id(d.task_id, ErrorCode::InvalidTaskId, "taskId")?;
    let org_id = optional_id(d.org_id, ErrorCode::InvalidOrgId, "orgId")?;
    let data = match d.data {
        None | Some(Value::Null) => None,
        Some(value) => {
            if json_depth(&value) > MAX_DATA_DEPTH {
                return Err(ServiceError::invalid(
                    ErrorCode::InvalidData,
                    format!("data is nested deeper than {MAX_DATA_DEPTH} levels"),
                ));
            }
            let text = value.to_string();
            if text.len() > MAX_DATA_BYTES {
                return Err(ServiceError::TooLarge {
                    code: ErrorCode::InvalidData,
                    message: format!("data is at most {MAX_DATA_BYTES} bytes of JSON"),
                });
            }
            Some(text)
        }
    };
    if let Some(t) = &d.timestamp
        && chrono::DateTime::parse_from_rfc3339(t).is_err()
    {
        return Err(ServiceError::invalid(
            ErrorCode::InvalidTimestamp,
            "timestamp is an ISO 8601 time (2026-12-06T10:30:00Z)",
        ));
    }
    Ok(NewNotification {
        id: uuid::Uuid::now_v7().to_string(),
        domain_id: domain.to_owned(),
        user_id,
        org_id,
        task_id,
        kind,
        content,
        data,
    })
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::hub::Receiver;
    use crate::model::Message;
    use crate::store::sqlite::SqliteStore;

    struct Fixture {
        service: Arc<NotificationService>,
        store: Arc<dyn Store>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (sink, _) = mpsc::unbounded_channel::<Arc<Message>>();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(
                &dir.path().join("parlor.db"),
                &crate::config::StoreConfig::default(),
                sink,
            )
            .unwrap(),
        );
        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
        let service = NotificationService::new(
            Arc::clone(&store),
            Arc::new(MemoryBroker::new()),
            Shared::local(Arc::clone(&metrics)),
            metrics,
            NotificationsConfig::default(),
            &supervisor,
        );
        Fixture {
            service,
            store,
            _dir: dir,
        }
    }

    fn ann(id: u64) -> (ConnHandle, Receiver) {
        let identity = Identity {
            user_id: "ann".to_owned(),
            name: "Ann".to_owned(),
            role: Role::Visitor,
            domain_id: Arc::from("shop"),
            anonymous: false,
            room: None,
            label: None,
        };
        ConnHandle::new(id, Arc::new(identity), 1024)
    }

    /// Stores `n` notifications for ann without pushing them (as another node would).
    async fn stored_elsewhere(store: &dyn Store, n: usize) -> Vec<Arc<Notification>> {
        let batch = (0..n)
            .map(|i| NewNotification {
                id: uuid::Uuid::now_v7().to_string(),
                domain_id: "shop".to_owned(),
                user_id: "ann".to_owned(),
                org_id: None,
                task_id: None,
                kind: NotificationType::Info,
                content: format!("n{i}"),
                data: None,
            })
            .collect();
        store
            .add_notifications(batch)
            .await
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    /// The `seq`s queued for the connection, waiting up to a second for `n` of them.
    async fn seqs(rx: &mut Receiver, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while out.len() < n && tokio::time::Instant::now() < deadline {
            match rx.try_recv() {
                Some(envelope) => match &envelope.event {
                    Event::Notification(n) => out.push(n.seq),
                    other => panic!("not a notification: {other:?}"),
                },
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        out
    }

    /// Notifications that come out of order or not at all (lost between nodes) are read
    /// from the store when a later one arrives: each once, in order.
    #[tokio::test]
    async fn a_gap_is_filled_from_the_store_and_duplicates_are_dropped() {
        let f = fixture();
        let (conn, mut rx) = ann(1);
        let count = f.service.subscribe(&conn, None).await.unwrap();
        assert_eq!(count, UnreadCount::default());
        let stored = stored_elsewhere(&*f.store, 4).await;
        // The third arrives first: the first two were lost on their way.
        assert!(f.service.deliver(&stored[2]));
        assert_eq!(seqs(&mut rx, 3).await, [1, 2, 3]);
        // Late copies of what was filled change nothing; the fourth comes next.
        f.service.deliver(&stored[0]);
        f.service.deliver(&stored[2]);
        f.service.deliver(&stored[3]);
        assert_eq!(seqs(&mut rx, 2).await, [4]);
    }

    /// A subscription from `since` gets what was stored after it, and one from further
    /// back than [`MAX_REPLAY`] only the latest that many.
    #[tokio::test]
    async fn a_subscription_replays_from_since_within_its_bound() {
        let f = fixture();
        stored_elsewhere(&*f.store, MAX_REPLAY as usize + 10).await;
        let (conn, mut rx) = ann(1);
        let count = f
            .service
            .subscribe(&conn, Some(MAX_REPLAY + 7))
            .await
            .unwrap();
        assert_eq!(count.last_seq, MAX_REPLAY + 10);
        assert_eq!(
            seqs(&mut rx, 4).await,
            [MAX_REPLAY + 8, MAX_REPLAY + 9, MAX_REPLAY + 10]
        );
        let (conn, mut rx) = ann(2);
        f.service.subscribe(&conn, Some(0)).await.unwrap();
        let replayed = seqs(&mut rx, MAX_REPLAY as usize + 1).await;
        assert_eq!(replayed.len(), MAX_REPLAY as usize);
        assert_eq!(replayed[0], 11, "the latest {MAX_REPLAY}");
        // A closed connection is let go at its next notification.
        drop(rx);
        let next = stored_elsewhere(&*f.store, 1).await;
        assert!(
            f.service.deliver(&next[0]),
            "the first connection still listens"
        );
        f.service.unsubscribe(&conn);
        let (first, _) = ann(1);
        f.service.unsubscribe(&first);
        assert!(!f.service.deliver(&next[0]), "nobody listens");
    }
}

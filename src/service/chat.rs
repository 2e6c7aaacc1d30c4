//! Chat: joining rooms, sending, history, read state, typing.
//!
//! The path of one message: a transport calls [`ChatService::send`] (or [`ChatService::submit`],
//! to queue several without waiting for each commit); the message is checked against the
//! limits and the policy, stored (the store assigns `seq` and commits, grouped with
//! concurrent writes), and the caller gets the stored message back to acknowledge. The
//! store hands each committed message, in commit order, to the node's commit pipeline
//! ([`crate::node::pipeline`]), which publishes it to the broker; the broker delivers it to
//! every node's hub, and the hub to every member's queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::ServiceError;
use super::files::Attachments;
use crate::auth::Domains;
use crate::auth::policy;
use crate::config::Limits;
use crate::error_code::ErrorCode;
use crate::hub::roster::Named as _;
use crate::hub::{ConnHandle, Event, Hub, Joined, Replay};
use crate::metrics::Metrics;
use crate::model::{
    Author, Identity, Message, NewMessage, Role, Room, RoomKey, json_depth, now_ms, valid_id,
};
use crate::node::pipeline::{Admitted, Backlog};
use crate::store::visitors::{MAX_DATA_BYTES, Sighting};
use crate::store::{Answer, Appended, CustomerProfile, Store, StoreError};

/// Longest display name kept, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// Deepest `data` a client may attach to a message.
const MAX_CLIENT_DATA_DEPTH: usize = 16;
/// Longest a client's send waits for the commit pipeline to make room.
const ADMIT_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Chat operations shared by every transport.
#[derive(Debug)]
pub struct ChatService {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// Each domain's rule for visitors' rooms (the live table).
    domains: Arc<Domains>,
    /// Committed messages not yet through the commit pipeline; clients' sends wait on it.
    backlog: Arc<Backlog>,
}

/// A message to send.
#[derive(Debug, Default)]
pub struct Outgoing<'a> {
    /// Target room id (in the sender's domain).
    pub room_id: &'a str,
    /// Text.
    pub text: String,
    /// Idempotency key.
    pub client_message_id: Option<String>,
    /// Requested role label (honoured only for services and admins).
    pub role: Option<&'a str>,
    /// Display name an anonymous visitor gave in `join-room`.
    pub display_name: Option<&'a str>,
    /// Structured extras.
    pub data: Option<serde_json::Value>,
    /// Files attached, checked by the file service; kept in `data.attachments`.
    pub attachments: Attachments,
}

impl ChatService {
    /// Creates the service.
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        limits: Limits,
        domains: Arc<Domains>,
        backlog: Arc<Backlog>,
    ) -> Self {
        Self {
            store,
            hub,
            metrics,
            limits,
            domains,
            backlog,
        }
    }

    /// The commit pipeline's backlog (for `/health`).
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    /// Asks the policy whether `identity` may use the room, looking the room up only when
    /// the answer depends on it. With `create`, a missing room is created as the caller's
    /// (joining, posting); without, a missing room is simply allowed (reading finds nothing).
    /// Returns the room when the check had to look it up (so callers need not read it again).
    pub async fn authorize(
        &self,
        identity: &Identity,
        key: &RoomKey,
        create: bool,
    ) -> Result<Option<Room>, ServiceError> {
        let rule = self.domains.load().visitor_rooms(&identity.domain_id);
        if !policy::room_check_needed(identity, rule) {
            return Ok(None);
        }
        let room = if create {
            Some(
                self.timed(
                    "ensure_room",
                    self.store.ensure_room(key, Some(&identity.user_id)),
                )
                .await?,
            )
        } else {
            self.timed("room", self.store.room(key)).await?
        };
        if policy::may_use_room(identity, rule, room.as_ref()) {
            Ok(room)
        } else {
            Err(ServiceError::Forbidden(
                "this room belongs to someone else".to_owned(),
            ))
        }
    }

    /// The store behind the service (health checks).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The hub (connection bookkeeping for transports).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The configured limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Validates a room id and places it in the caller's domain.
    pub fn room_key(&self, identity: &Identity, room_id: &str) -> Result<RoomKey, ServiceError> {
        if !valid_id(room_id) {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidRoomId,
                "roomId must be 1-128 characters of A-Z a-z 0-9 - _ . : @",
            ));
        }
        Ok(policy::room_key(identity, room_id))
    }

    /// Joins `conn` to a room (creating the room on first use) and returns the catch-up.
    pub async fn join(
        &self,
        conn: &ConnHandle,
        room_id: &str,
        replay: Replay,
        profile: Option<CustomerProfile>,
    ) -> Result<Joined, ServiceError> {
        let identity = conn.identity();
        let key = self.room_key(identity, room_id)?;
        let exists = self.authorize(identity, &key, true).await?.is_some();
        if let Some(mut profile) = profile {
            // Profile data is stored as given, so it is bounded like a message.
            if let Some(data) = &profile.data {
                let size = data.to_string().len();
                if size > self.limits.max_message_bytes || json_depth(data) > MAX_CLIENT_DATA_DEPTH
                {
                    return Err(ServiceError::invalid(
                        ErrorCode::InvalidData,
                        format!(
                            "customerData must be a JSON object of at most {} bytes, nested at most {MAX_CLIENT_DATA_DEPTH} levels",
                            self.limits.max_message_bytes
                        ),
                    ));
                }
            }
            profile.name = profile
                .name
                .map(|n| n.chars().take(MAX_NAME_CHARS).collect());
            // A visitor's page joining with its context is a sighting of the visitor
            // (`docs/visitors.md`), stored in the same group commit as the profile.
            let sighting = sighting(identity, &profile);
            // Counting the visitor never costs them the join.
            let record = async {
                if let Some(s) = sighting
                    && let Err(e) = self.store.record_sightings(vec![s]).await
                {
                    tracing::warn!(error = %e, "a visitor's sighting was not stored");
                }
                Ok::<(), StoreError>(())
            };
            let upsert =
                self.store
                    .upsert_customer(&identity.domain_id, &identity.user_id, profile);
            self.timed("upsert_customer", async {
                tokio::try_join!(upsert, record).map(drop)
            })
            .await?;
        }
        // A room active on this node exists already: skip the write.
        if !exists && !self.hub.is_active(&key) {
            self.timed(
                "ensure_room",
                self.store.ensure_room(&key, Some(&identity.user_id)),
            )
            .await?;
        }
        let mut joined = self
            .hub
            .join(&key, conn, replay, self.limits.max_replay)
            .await?;
        // Users on other nodes count too (up to the same cap).
        if joined.members.len() < self.limits.presence_max_members {
            let before = joined.members.len();
            self.hub.add_remote_members(&key, &mut joined.members).await;
            joined.members.truncate(self.limits.presence_max_members);
            joined.member_count += joined.members.len() - before;
        }
        Ok(joined)
    }

    /// Removes `conn` from a room. Returns false if it was not in it.
    pub fn leave(&self, conn: &ConnHandle, key: &RoomKey) -> bool {
        self.hub.leave(key, conn)
    }

    /// [`Self::send`] for a caller that has not joined the room (the HTTP API): asks the
    /// policy first. Over a socket, joining the room already did.
    pub async fn post(
        &self,
        identity: &Identity,
        out: Outgoing<'_>,
    ) -> Result<Appended, ServiceError> {
        let key = self.room_key(identity, out.room_id)?;
        self.authorize(identity, &key, true).await?;
        self.send(identity, out).await
    }

    /// Stores a client's message and returns it (or the original, for a repeated
    /// `client_message_id`). Members receive it through the hub once it is committed. While
    /// the commit pipeline is full ([`Backlog`]) it waits, at most [`ADMIT_WITHIN`], before
    /// anything is written.
    pub async fn send(
        &self,
        identity: &Identity,
        out: Outgoing<'_>,
    ) -> Result<Appended, ServiceError> {
        self.submit(identity, out).await?.await
    }

    /// [`Self::send`] in two steps: returns once the message is checked and queued for the
    /// store, behind every message queued before it, with the [`Committing`] that resolves to
    /// the stored message. A connection queues its client's messages one after another and
    /// acknowledges them as they commit, so they are numbered in the order sent and several
    /// can share a commit.
    pub async fn submit(
        &self,
        identity: &Identity,
        out: Outgoing<'_>,
    ) -> Result<Committing, ServiceError> {
        let message = self.checked(identity, out)?;
        let Some(admitted) = self.backlog.admit(ADMIT_WITHIN).await else {
            return Err(ServiceError::Unavailable(StoreError::Unavailable(
                "committed messages are still being delivered; try again".into(),
            )));
        };
        self.queue(message, Some(admitted)).await
    }

    /// Queues a checked message for the store, holding `admitted` (the send's place in the
    /// pipeline, if it took one) until it is committed.
    async fn queue(
        &self,
        message: NewMessage,
        admitted: Option<Admitted>,
    ) -> Result<Committing, ServiceError> {
        let started = Instant::now();
        let answer = self.store.queue_append(message).await?;
        Ok(Committing {
            answer,
            started,
            metrics: Arc::clone(&self.metrics),
            _admitted: admitted,
        })
    }

    /// [`Self::send`] for the node's own writers (the assistant, hand-off): never held back
    /// by the pipeline, which may be waiting for them.
    pub async fn send_internal(
        &self,
        identity: &Identity,
        out: Outgoing<'_>,
    ) -> Result<Appended, ServiceError> {
        let message = self.checked(identity, out)?;
        self.queue(message, None).await?.await
    }

    /// The message `identity` may store from `out`, or why not.
    fn checked(&self, identity: &Identity, out: Outgoing<'_>) -> Result<NewMessage, ServiceError> {
        let key = self.room_key(identity, out.room_id)?;
        // A message may be its attachments alone.
        if out.text.trim().is_empty() && out.attachments.is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::EmptyMessage,
                "message must not be empty",
            ));
        }
        // PostgreSQL cannot store NUL in text, and no chat message needs one: refuse it on
        // every backend alike.
        if out.text.contains('\0') {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidMessage,
                "message must not contain NUL characters",
            ));
        }
        if out.text.len() > self.limits.max_message_bytes {
            return Err(ServiceError::TooLarge {
                code: ErrorCode::MessageTooLong,
                message: format!(
                    "message is {} bytes; the limit is {}",
                    out.text.len(),
                    self.limits.max_message_bytes
                ),
            });
        }
        if let Some(cmid) = &out.client_message_id
            && !valid_id(cmid)
        {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidClientMessageId,
                "clientMessageId must be 1-128 characters of A-Z a-z 0-9 - _ . : @",
            ));
        }
        if let Some(data) = &out.data
            && (!data.is_object() || json_depth(data) > MAX_CLIENT_DATA_DEPTH)
        {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidData,
                format!("data must be a JSON object nested at most {MAX_CLIENT_DATA_DEPTH} levels"),
            ));
        }
        // `data.attachments` is the server's: only files it checked go there.
        if out
            .data
            .as_ref()
            .is_some_and(|d| d.get(ATTACHMENTS).is_some())
        {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidData,
                "data.attachments is reserved: send files as `attachments` (their fileIds)",
            ));
        }
        let role = policy::message_role(identity, out.role)
            .map_err(|m| ServiceError::Forbidden(m.to_owned()))?;
        let name = match out.display_name {
            Some(n) if identity.anonymous && !n.trim().is_empty() => n
                .chars()
                .filter(|c| *c != '\0')
                .take(MAX_NAME_CHARS)
                .collect(),
            _ => identity.name.replace('\0', ""),
        };
        Ok(NewMessage {
            // The hub's own key when the room is active: its members' cursors hold the same.
            room: self.hub.canonical(key),
            author: Author {
                user_id: identity.user_id.clone(),
                name,
                role,
            },
            kind: "text".to_owned(),
            content: out.text,
            data: with_attachments(out.data, out.attachments),
            client_message_id: out.client_message_id,
        })
    }

    /// Up to `limit` messages before `before` (all the latest when `None`), ascending, and
    /// whether older ones exist.
    pub async fn history(
        &self,
        identity: &Identity,
        room_id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), ServiceError> {
        let key = self.room_key(identity, room_id)?;
        self.authorize(identity, &key, false).await?;
        self.page_before(&key, before, limit).await
    }

    /// The room and one page of it (after `after`, or before `before`, or the latest; not
    /// both), with whether more lie in that direction; one policy check for both.
    pub async fn room_page(
        &self,
        identity: &Identity,
        room_id: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Room, Vec<Message>, bool), ServiceError> {
        let key = self.room_key(identity, room_id)?;
        let looked_up = self.authorize(identity, &key, false).await?;
        let room = self.existing_room(&key, looked_up).await?;
        let (page, more) = match (after, before) {
            (Some(_), Some(_)) => {
                return Err(ServiceError::invalid(
                    ErrorCode::InvalidQuery,
                    "give `after` or `before`, not both",
                ));
            }
            (Some(after), None) => self.page_after(&key, after, limit).await?,
            (None, before) => self.page_before(&key, before, limit).await?,
        };
        Ok((room, page, more))
    }

    /// The room the policy check already read, or a read of it.
    async fn existing_room(
        &self,
        key: &RoomKey,
        looked_up: Option<Room>,
    ) -> Result<Room, ServiceError> {
        let room = match looked_up {
            Some(room) => Some(room),
            None => self.timed("room", self.store.room(key)).await?,
        };
        room.ok_or(ServiceError::RoomNotFound)
    }

    async fn page_before(
        &self,
        key: &RoomKey,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), ServiceError> {
        let limit = limit.clamp(1, self.limits.max_page);
        let page = self
            .timed(
                "history",
                self.store
                    .messages_before(key, before.unwrap_or(u64::MAX), limit),
            )
            .await?;
        let has_more = page.first().is_some_and(|m| m.seq > 1);
        Ok((page, has_more))
    }

    async fn page_after(
        &self,
        key: &RoomKey,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Message>, bool), ServiceError> {
        let limit = limit.clamp(1, self.limits.max_page);
        let mut page = self
            .timed("history", self.store.messages_after(key, after, limit + 1))
            .await?;
        let has_more = page.len() > limit;
        page.truncate(limit);
        Ok((page, has_more))
    }

    /// Records that the caller read the room up to `seq` and tells the room's members.
    pub async fn mark_read(
        &self,
        identity: &Identity,
        room_id: &str,
        seq: u64,
    ) -> Result<u64, ServiceError> {
        let key = self.room_key(identity, room_id)?;
        let stored = self
            .timed(
                "mark_read",
                self.store.mark_read(&key, &identity.user_id, seq),
            )
            .await?;
        self.hub.broadcast(
            &key,
            Event::ReadReceipt {
                room: key.clone(),
                user_id: identity.user_id.clone(),
                seq: stored,
            },
            None,
        );
        Ok(stored)
    }

    /// Tells the room's other members that `conn` is (or stopped) typing. Requires membership.
    pub fn typing(
        &self,
        conn: &ConnHandle,
        key: &RoomKey,
        typing: bool,
    ) -> Result<(), ServiceError> {
        if !self.hub.is_member(key, conn) {
            return Err(not_joined());
        }
        let id = conn.identity();
        let user = id.present();
        self.hub.broadcast(
            key,
            Event::Typing {
                room: key.clone(),
                user,
                typing,
            },
            Some(conn.id()),
        );
        Ok(())
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = f.await;
        self.metrics.observe_store(op, started.elapsed());
        result
    }
}

/// The sighting a visitor's join with `profile` makes, if it is one: a visitor's page
/// (its `context`) joining, with the page, referrer and browser from the context and the
/// data from `customerData`.
fn sighting(identity: &Identity, profile: &CustomerProfile) -> Option<Sighting> {
    if identity.role != Role::Visitor {
        return None;
    }
    let context = profile.context.as_ref()?.as_object()?;
    // The context's fields are cut to a few hundred characters by the transport; a NUL,
    // which no store keeps, drops the field.
    let text = |field: &str| {
        context
            .get(field)
            .and_then(|v| v.as_str())
            .filter(|t| !t.contains('\0'))
            .map(str::to_owned)
    };
    Some(Sighting {
        domain_id: identity.domain_id.to_string(),
        visitor_id: identity.user_id.clone(),
        at: now_ms(),
        page: text("page"),
        referrer: text("referrer"),
        user_agent: text("browser"),
        // At most what a page may report of its visitor (`POST /visitors/add`).
        data: profile
            .data
            .as_ref()
            .map(ToString::to_string)
            .filter(|d| d.len() <= MAX_DATA_BYTES && !d.contains("\\u0000")),
    })
}

/// A message queued by [`ChatService::submit`]: resolves to the stored message once it is
/// committed. It holds a client's send's place in the commit pipeline's [`Backlog`] until
/// then.
#[derive(Debug)]
#[must_use = "the message is queued either way; this says whether it was stored"]
pub struct Committing {
    answer: Answer<Appended>,
    started: Instant,
    metrics: Arc<Metrics>,
    _admitted: Option<Admitted>,
}

impl Future for Committing {
    type Output = Result<Appended, ServiceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = std::task::ready!(Pin::new(&mut self.answer).poll(cx));
        self.metrics.observe_store("append", self.started.elapsed());
        if result.as_ref().is_ok_and(|a| !a.duplicate) {
            self.metrics.messages_stored.inc();
        }
        Poll::Ready(result.map_err(ServiceError::from))
    }
}

/// The key of a message's `data` that holds its attachments.
pub const ATTACHMENTS: &str = "attachments";

/// `data` with `attachments` added under [`ATTACHMENTS`] (an object made when there was
/// none).
fn with_attachments(
    data: Option<serde_json::Value>,
    attachments: Attachments,
) -> Option<serde_json::Value> {
    if attachments.is_empty() {
        return data;
    }
    let mut data = match data {
        Some(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    data.insert(ATTACHMENTS.to_owned(), attachments.into_value());
    Some(serde_json::Value::Object(data))
}

/// The error for acting in a room one has not joined.
pub fn not_joined() -> ServiceError {
    ServiceError::Conflict {
        code: ErrorCode::NotJoined,
        message: "join the room first".to_owned(),
    }
}

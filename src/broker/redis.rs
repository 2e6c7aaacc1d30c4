//! Redis broker: several Parlor nodes share stored messages and room events over Redis
//! pub/sub.
//!
//! **What travels.** Every node publishes, on one channel (`{prefix}:bus`), the messages its
//! store committed (in commit order, so per room in `seq` order) and the room events of
//! [`Hub::broadcast`] (typing, read receipts, streamed AI deltas, hand-off changes). Every
//! node subscribes to the channel and hands what other nodes published to its own hub; its
//! own publications it has already delivered locally, without the round trip.
//!
//! **Guarantee.** Live delivery is at most once (Redis pub/sub keeps nothing for a node
//! that is not connected). Nothing is lost to clients: the hub checks each message's `seq`
//! and fetches a gap from the shared store before delivering what follows it, and after the
//! subscriber reconnects the hub catches every active room up from the store
//! ([`Hub::resync`]), so a room that went quiet during the outage is complete too.
//!
//! **Why one channel.** A channel per room would spare a node the messages of rooms nobody
//! on it has open, but it makes every join wait for a `SUBSCRIBE` round trip and opens a
//! window between loading a room and receiving its messages. With one channel every node
//! sees everything in publication order, which is simple and right for clusters of a few
//! nodes; sharded pub/sub (`SSUBSCRIBE`) only spreads the load on a Redis Cluster, which a
//! single channel cannot use anyway. The channel prefix lets several clusters share a Redis.
//!
//! **Presence across nodes.** Each room's present users are kept in a sorted set,
//! `{prefix}:presence:{domain}:{room}`, one member per (user, node), scored by when it
//! expires. A node adds its users when they arrive, removes them when their last local
//! connection leaves, and renews them every third of `broker_presence_ttl_secs`. So the
//! member list a joiner gets covers every node, a user leaving one node while still on
//! another is not announced as gone, and the users of a node that died disappear within
//! the TTL: the first node to remove an expired entry (`ZREM` answers 1 to one caller only)
//! announces the leave.
//!
//! Reconnection is fred's: exponential back-off, and the subscriber re-subscribes by
//! itself after Redis comes back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{
    ClientLike, Config as RedisConfig, EventInterface, KeysInterface, PubsubInterface,
    ReconnectPolicy, SortedSetsInterface,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Broker, Remote};
use crate::hub::{Event, Hub, PresentUser, Relay};
use crate::model::{Agent, Conversation, Message, Note, Role, RoomKey};
use crate::store::InboxEntry;

/// Most publications sent in one pipelined round trip.
const PUBLISH_BATCH: usize = 256;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[error("redis broker: {0}")]
pub struct BrokerError(String);

/// What one publication carries.
#[derive(Debug, Serialize, Deserialize)]
struct Publication {
    /// The publishing node.
    node: u64,
    /// What happened.
    event: Bus,
}

/// Events as they travel between nodes. (Each lives only between a socket read and its
/// delivery, so the size of the largest variant costs nothing worth boxing for.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
enum Bus {
    Message {
        message: Message,
    },
    Typing {
        room: RoomKey,
        user_id: String,
        name: String,
        role: Role,
        typing: bool,
    },
    ReadReceipt {
        room: RoomKey,
        user_id: String,
        seq: u64,
    },
    Delta {
        room: RoomKey,
        message_id: String,
        delta: String,
        index: u64,
    },
    RoomStatus {
        conversation: Conversation,
        seq: u64,
    },
    AgentJoined {
        room: RoomKey,
        agent: Agent,
    },
    AgentLeft {
        room: RoomKey,
        agent: Agent,
        reason: String,
    },
    Presence {
        room: RoomKey,
        user_id: String,
        name: String,
        role: Role,
        joined: bool,
    },
    /// A room's new entry for the domain's agents.
    Inbox {
        conversation: Conversation,
        created_by: Option<String>,
        visitor_name: Option<String>,
        created_at: chrono::DateTime<chrono::Utc>,
        last_message: Message,
    },
    /// An internal note for the domain's agents.
    Note {
        note: Note,
    },
}

impl Bus {
    /// The traveling form of a hub event; `None` for events that stay on their node.
    fn of(room: &RoomKey, event: &Event) -> Option<Self> {
        Some(match event {
            Event::Typing { user, typing, .. } => Bus::Typing {
                room: room.clone(),
                user_id: user.user_id.clone(),
                name: user.name.clone(),
                role: user.role,
                typing: *typing,
            },
            Event::ReadReceipt { user_id, seq, .. } => Bus::ReadReceipt {
                room: room.clone(),
                user_id: user_id.clone(),
                seq: *seq,
            },
            Event::Delta {
                message_id,
                delta,
                index,
                ..
            } => Bus::Delta {
                room: room.clone(),
                message_id: message_id.to_string(),
                delta: delta.clone(),
                index: *index,
            },
            Event::RoomStatus { conversation, seq } => Bus::RoomStatus {
                conversation: (**conversation).clone(),
                seq: *seq,
            },
            Event::AgentJoined { agent, .. } => Bus::AgentJoined {
                room: room.clone(),
                agent: agent.clone(),
            },
            Event::AgentLeft { agent, reason, .. } => Bus::AgentLeft {
                room: room.clone(),
                agent: agent.clone(),
                reason: (*reason).to_owned(),
            },
            Event::Presence { user, joined, .. } => Bus::Presence {
                room: room.clone(),
                user_id: user.user_id.clone(),
                name: user.name.clone(),
                role: user.role,
                joined: *joined,
            },
            Event::InboxUpdate(e) => Bus::Inbox {
                conversation: e.conversation.clone(),
                created_by: e.created_by.clone(),
                visitor_name: e.visitor_name.clone(),
                created_at: e.created_at,
                last_message: e.last_message.clone(),
            },
            Event::NoteAdded(note) => Bus::Note {
                note: (**note).clone(),
            },
            // Stored messages travel as `Bus::Message`; per-connection frames stay.
            Event::Message(_) | Event::Frame(_) => return None,
        })
    }

    /// Hands a publication from another node to this node's hub (or, for the agents'
    /// feed and state changes, to `remote`).
    fn deliver(self, hub: &Arc<Hub>, remote: Option<&Arc<dyn Remote>>) {
        let (room, event) = match self {
            Bus::Inbox {
                conversation,
                created_by,
                visitor_name,
                created_at,
                last_message,
            } => {
                if let Some(remote) = remote {
                    let domain = conversation.room.domain_id.clone();
                    let entry = InboxEntry {
                        conversation,
                        created_by,
                        visitor_name,
                        created_at,
                        last_message,
                        read_seq: 0,
                    };
                    remote.to_agents(&domain, Event::InboxUpdate(Arc::new(entry)));
                }
                return;
            }
            Bus::Note { note } => {
                if let Some(remote) = remote {
                    let domain = note.room.domain_id.clone();
                    remote.to_agents(&domain, Event::NoteAdded(Arc::new(note)));
                }
                return;
            }
            Bus::Presence {
                room,
                user_id,
                name,
                role,
                joined,
            } => {
                // Someone present here too was announced (or stays) already.
                if hub.presence(&room).iter().any(|u| u.user_id == user_id) {
                    return;
                }
                let user = PresentUser {
                    user_id,
                    name,
                    role,
                };
                let event = Event::Presence {
                    room: room.clone(),
                    user,
                    joined,
                };
                (room, event)
            }
            Bus::Message { message } => {
                hub.deliver(Arc::new(message));
                return;
            }
            Bus::Typing {
                room,
                user_id,
                name,
                role,
                typing,
            } => {
                let user = PresentUser {
                    user_id,
                    name,
                    role,
                };
                let event = Event::Typing {
                    room: room.clone(),
                    user,
                    typing,
                };
                (room, event)
            }
            Bus::ReadReceipt { room, user_id, seq } => {
                let event = Event::ReadReceipt {
                    room: room.clone(),
                    user_id,
                    seq,
                };
                (room, event)
            }
            Bus::Delta {
                room,
                message_id,
                delta,
                index,
            } => {
                let event = Event::Delta {
                    room: room.clone(),
                    message_id: Arc::from(message_id),
                    delta,
                    index,
                };
                (room, event)
            }
            Bus::RoomStatus { conversation, seq } => {
                let room = conversation.room.clone();
                let conversation = Arc::new(conversation);
                if let Some(remote) = remote {
                    remote.conversation_changed(Arc::clone(&conversation));
                }
                let event = Event::RoomStatus { conversation, seq };
                (room, event)
            }
            Bus::AgentJoined { room, agent } => {
                let event = Event::AgentJoined {
                    room: room.clone(),
                    agent,
                };
                (room, event)
            }
            Bus::AgentLeft {
                room,
                agent,
                reason,
            } => {
                let reason = match reason.as_str() {
                    "transferred" => "transferred",
                    "resolved" => "resolved",
                    _ => "unassigned",
                };
                let event = Event::AgentLeft {
                    room: room.clone(),
                    agent,
                    reason,
                };
                (room, event)
            }
        };
        hub.broadcast_local(&room, event, None);
    }
}

/// The Redis broker of one node.
#[derive(Debug)]
pub struct RedisBroker {
    hub: Arc<Hub>,
    /// This node's id in publications (random per process).
    node: u64,
    /// Publications waiting for the publisher task.
    outbox: mpsc::UnboundedSender<Bytes>,
    publisher: fred::clients::Client,
    subscriber: SubscriberClient,
    /// The hand-off service, for state changes and the agents' feed from other nodes.
    remote: Arc<std::sync::OnceLock<Arc<dyn Remote>>>,
    /// Whether the last PING (every second) was answered.
    reachable: std::sync::atomic::AtomicBool,
    /// Key prefix.
    prefix: String,
    /// Local presence changes and renewals, applied in order by one task.
    presence_changes: mpsc::UnboundedSender<PresenceWork>,
    /// How long a presence entry lives without renewal.
    presence_ttl: Duration,
}

/// Work for the presence task, done in the order it was asked for, so that a renewal
/// never puts back an entry a leave just removed.
#[derive(Debug)]
enum PresenceWork {
    /// A user's first local connection joined (`true`) or the last one left.
    Change(RoomKey, PresentUser, bool),
    /// Renew this node's entries and sweep expired ones.
    Renew,
}

/// One (user, node) entry of a room's presence set. Serialised the same way every time, so
/// the node that added it can remove it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PresenceEntry {
    user_id: String,
    name: String,
    role: Role,
    node: u64,
}

impl RedisBroker {
    /// Connects to Redis at `url`, subscribes to `{prefix}:bus` and starts relaying for
    /// `hub`. Fails when Redis cannot be reached now; once running, it reconnects by itself.
    pub async fn connect(
        url: &str,
        prefix: &str,
        presence_ttl: Duration,
        hub: Arc<Hub>,
    ) -> Result<Arc<Self>, BrokerError> {
        let config = RedisConfig::from_url(url)
            .map_err(|e| BrokerError(format!("invalid broker URL: {e}")))?;
        let policy = ReconnectPolicy::new_exponential(0, 100, 5_000, 2);
        let mut builder = fred::types::Builder::from_config(config);
        builder
            .set_policy(policy)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = Duration::from_secs(5);
            })
            .with_performance_config(|p| {
                // Deliveries queue here while the hub catches up; a lagging reader loses
                // the oldest, which the seq check then fetches from the store.
                p.broadcast_channel_capacity = 16_384;
                p.default_command_timeout = Duration::from_secs(5);
            });
        let publisher = builder
            .build()
            .map_err(|e| BrokerError(format!("cannot build the Redis client: {e}")))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| BrokerError(format!("cannot build the Redis subscriber: {e}")))?;
        let connect = async {
            publisher.init().await?;
            subscriber.init().await?;
            Ok::<_, fred::error::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(BrokerError(format!(
                    "cannot reach Redis at {}: {e}",
                    crate::config::redact_url(url)
                )));
            }
            Err(_) => {
                return Err(BrokerError(format!(
                    "Redis at {} did not answer within 10 s",
                    crate::config::redact_url(url)
                )));
            }
        }
        let channel = format!("{prefix}:bus");
        let (outbox, queued) = mpsc::unbounded_channel();
        let remote = Arc::new(std::sync::OnceLock::new());
        let (presence_changes, mut changes) = mpsc::unbounded_channel();
        let broker = Arc::new(Self {
            presence_changes,
            hub: Arc::clone(&hub),
            node: rand_node_id(),
            outbox,
            publisher: publisher.clone(),
            subscriber: subscriber.clone(),
            remote: Arc::clone(&remote),
            reachable: std::sync::atomic::AtomicBool::new(true),
            prefix: prefix.to_owned(),
            presence_ttl,
        });
        let watched = Arc::downgrade(&broker);
        tokio::spawn(async move {
            while let Some(work) = changes.recv().await {
                let Some(broker) = watched.upgrade() else {
                    return;
                };
                match work {
                    PresenceWork::Change(room, user, joined) => {
                        broker.apply_presence(room, user, joined).await;
                    }
                    PresenceWork::Renew => broker.renew_presence().await,
                }
            }
        });
        // Renew this node's presence entries and sweep expired ones.
        let watched = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval((presence_ttl / 3).max(Duration::from_millis(100)));
            loop {
                tick.tick().await;
                let Some(broker) = watched.upgrade() else {
                    return;
                };
                let _ = broker.presence_changes.send(PresenceWork::Renew);
            }
        });
        // A closed socket is noticed at once, a silent one only by asking: ping every second.
        let watched = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(broker) = watched.upgrade() else {
                    return;
                };
                let ping = broker.publisher.ping::<fred::types::Value>(None);
                let ok = matches!(
                    tokio::time::timeout(Duration::from_millis(900), ping).await,
                    Ok(Ok(_))
                );
                broker
                    .reachable
                    .store(ok, std::sync::atomic::Ordering::Relaxed);
            }
        });
        // Re-subscribe after every reconnect, then catch the active rooms up from the store.
        let _resubscribe = subscriber.manage_subscriptions();
        let mut reconnects = subscriber.reconnect_rx();
        let resync_hub = Arc::clone(&hub);
        tokio::spawn(async move {
            while reconnects.recv().await.is_ok() {
                tracing::info!("reconnected to Redis; catching rooms up from the store");
                // Give the re-subscription a moment, so nothing published after the
                // catch-up read is missed either.
                tokio::time::sleep(Duration::from_millis(200)).await;
                resync_hub.resync();
            }
        });
        let mut messages = subscriber.message_rx();
        subscriber
            .subscribe(channel.clone())
            .await
            .map_err(|e| BrokerError(format!("cannot subscribe to {channel}: {e}")))?;
        let me = broker.node;
        let deliver_hub = Arc::clone(&hub);
        tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(message) => {
                        let Some(bytes) = message.value.as_bytes() else {
                            continue;
                        };
                        match serde_json::from_slice::<Publication>(bytes) {
                            Ok(p) if p.node == me => {}
                            Ok(p) => p.event.deliver(&deliver_hub, remote.get()),
                            Err(e) => {
                                tracing::warn!(error = %e, "unreadable publication on the bus");
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "fell behind the bus; catching up from the store");
                        deliver_hub.resync();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        tokio::spawn(publish_loop(publisher, channel, queued));
        hub.set_relay(Arc::clone(&broker) as Arc<dyn Relay>);
        Ok(broker)
    }

    fn presence_key(&self, room: &RoomKey) -> String {
        format!(
            "{}:presence:{}:{}",
            self.prefix, room.domain_id, room.room_id
        )
    }

    fn entry(&self, user: &PresentUser) -> String {
        let entry = PresenceEntry {
            user_id: user.user_id.clone(),
            name: user.name.clone(),
            role: user.role,
            node: self.node,
        };
        serde_json::to_string(&entry).unwrap_or_default()
    }

    fn expiry_score(&self) -> f64 {
        let ms = chrono::Utc::now().timestamp_millis()
            + i64::try_from(self.presence_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        ms as f64
    }

    /// The live entries of a room's presence set.
    async fn live_entries(&self, room: &RoomKey) -> Vec<PresenceEntry> {
        let now = chrono::Utc::now().timestamp_millis();
        let raw: Result<Vec<String>, _> = self
            .publisher
            .zrangebyscore(self.presence_key(room), now, "+inf", false, None)
            .await;
        raw.unwrap_or_default()
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect()
    }

    /// Adds or renews users' entries of one room.
    async fn add_presence(&self, room: &RoomKey, users: &[PresentUser]) {
        if users.is_empty() {
            return;
        }
        let score = self.expiry_score();
        let values: Vec<(f64, String)> = users.iter().map(|u| (score, self.entry(u))).collect();
        let key = self.presence_key(room);
        let added: Result<(), _> = self
            .publisher
            .zadd(key.as_str(), None, None, false, false, values)
            .await;
        // An abandoned room's set goes away by itself.
        let ttl = i64::try_from(self.presence_ttl.as_secs().max(1) * 2).unwrap_or(60);
        let expired: Result<(), _> = self.publisher.expire(key.as_str(), ttl, None).await;
        if let Err(e) = added.and(expired) {
            tracing::debug!(room = %room, error = %e, "cannot record presence in Redis");
        }
    }

    /// Every third of the TTL: renew this node's entries, and announce the users whose
    /// entries expired (their node died) and who are nowhere else any more.
    async fn renew_presence(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        for (room, users) in self.hub.local_presence() {
            self.add_presence(&room, &users).await;
            let key = self.presence_key(&room);
            let stale: Vec<String> = self
                .publisher
                .zrangebyscore(key.as_str(), "-inf", now, false, None)
                .await
                .unwrap_or_default();
            for member in stale {
                let claimed: i64 = self
                    .publisher
                    .zrem(key.as_str(), member.as_str())
                    .await
                    .unwrap_or(0);
                let Ok(gone) = serde_json::from_str::<PresenceEntry>(&member) else {
                    continue;
                };
                if claimed != 1 || self.user_still_here(&room, &gone.user_id, None).await {
                    continue;
                }
                let user = PresentUser {
                    user_id: gone.user_id,
                    name: gone.name,
                    role: gone.role,
                };
                let event = Event::Presence {
                    room: room.clone(),
                    user,
                    joined: false,
                };
                if let Some(bus) = Bus::of(&room, &event) {
                    self.send(bus);
                }
                self.hub.broadcast_local(&room, event, None);
            }
        }
    }

    /// Whether `user` is present in `room` on some node (other than `except_node`).
    async fn user_still_here(&self, room: &RoomKey, user: &str, except_node: Option<u64>) -> bool {
        self.hub.presence(room).iter().any(|u| u.user_id == user)
            || self
                .live_entries(room)
                .await
                .iter()
                .any(|e| e.user_id == user && Some(e.node) != except_node)
    }

    /// A local presence change: record it, then tell the other nodes (a leave only if the
    /// user is on no other node). Changes are applied one at a time, in the order they
    /// happened (a quick join and leave must not reach Redis the other way round).
    async fn apply_presence(&self, room: RoomKey, user: PresentUser, joined: bool) {
        {
            if joined {
                self.add_presence(&room, std::slice::from_ref(&user)).await;
            } else {
                let removed: Result<i64, _> = self
                    .publisher
                    .zrem(self.presence_key(&room), self.entry(&user))
                    .await;
                if let Err(e) = removed {
                    tracing::debug!(room = %room, error = %e, "cannot remove presence in Redis");
                }
                if self
                    .live_entries(&room)
                    .await
                    .iter()
                    .any(|e| e.user_id == user.user_id)
                {
                    return;
                }
            }
            let event = Event::Presence {
                room: room.clone(),
                user,
                joined,
            };
            if let Some(bus) = Bus::of(&room, &event) {
                self.send(bus);
            }
        }
    }

    fn send(&self, event: Bus) {
        let publication = Publication {
            node: self.node,
            event,
        };
        match serde_json::to_vec(&publication) {
            Ok(bytes) => {
                let _ = self.outbox.send(Bytes::from(bytes));
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a publication"),
        }
    }

    /// Stops publishing and closes the connections.
    pub async fn close(&self) {
        let _ = self.subscriber.quit().await;
        let _ = self.publisher.quit().await;
    }
}

/// Publishes queued publications in order, many per round trip. A batch that fails (Redis
/// down) is dropped: live delivery is at most once, and the store has everything.
async fn publish_loop(
    client: fred::clients::Client,
    channel: String,
    mut queued: mpsc::UnboundedReceiver<Bytes>,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while queued.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let pipeline = client.pipeline();
        for payload in batch.drain(..) {
            let _: Result<(), _> = pipeline.publish(channel.as_str(), payload).await;
        }
        if let Err(e) = pipeline.all::<Vec<fred::types::Value>>().await {
            tracing::warn!(error = %e, "cannot publish to Redis; other nodes catch up from the store");
        }
    }
}

impl Broker for RedisBroker {
    fn publish(&self, message: Arc<Message>) {
        // This node's members get it at once; the others through Redis.
        self.hub.deliver(Arc::clone(&message));
        self.send(Bus::Message {
            message: (*message).clone(),
        });
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn healthy(&self) -> bool {
        self.reachable.load(std::sync::atomic::Ordering::Relaxed)
            && self.publisher.is_connected()
            && self.subscriber.is_connected()
    }

    fn to_agents(&self, domain: &str, event: &Event) {
        let room = RoomKey::new(domain, "");
        if let Some(bus) = Bus::of(&room, event) {
            self.send(bus);
        }
    }

    fn set_remote(&self, remote: Arc<dyn Remote>) {
        let _ = self.remote.set(remote);
    }
}

impl Relay for RedisBroker {
    fn relay(&self, room: &RoomKey, event: &Event) {
        if let Event::Presence { user, joined, .. } = event {
            // Recorded in Redis first; see `apply_presence`.
            let _ = self.presence_changes.send(PresenceWork::Change(
                room.clone(),
                user.clone(),
                *joined,
            ));
            return;
        }
        if let Some(bus) = Bus::of(room, event) {
            self.send(bus);
        }
    }

    fn members<'a>(
        &'a self,
        room: &'a RoomKey,
    ) -> std::pin::Pin<Box<dyn Future<Output = Vec<PresentUser>> + Send + 'a>> {
        Box::pin(async move {
            let mut users: Vec<PresentUser> = Vec::new();
            for e in self.live_entries(room).await {
                if e.node != self.node && !users.iter().any(|u| u.user_id == e.user_id) {
                    users.push(PresentUser {
                        user_id: e.user_id,
                        name: e.name,
                        role: e.role,
                    });
                }
            }
            users
        })
    }
}

/// A random node id.
fn rand_node_id() -> u64 {
    let id = uuid::Uuid::new_v4();
    let (high, low) = id.as_u64_pair();
    high ^ low
}

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
//! that is not connected, and a full outbox drops). Nothing is lost to clients: the hub
//! checks each message's `seq` and fetches a gap from the shared store before delivering
//! what follows it; after the subscriber reconnects (or its reader falls behind) the hub
//! catches every active room up from the store ([`Hub::resync`]); and every
//! `broker_position_check_ms` it compares its active rooms with the store, so a room whose
//! last publication was lost, with nothing after it to reveal the gap, is complete within
//! two intervals too ([`Hub::check_positions`]).
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
//! A leave on this node is announced to this node's members, too, only once Redis says
//! the user is on no other node (the presence task, in order with the user's joins). While
//! Redis does not answer, a leave is announced here at once, as on a single node.
//!
//! **Domains.** A change of the stored domains made through the admin API on one node is
//! announced on the bus (`domainsChanged`); the other nodes rebuild their tables from the
//! store ([`DomainListener`]). After the subscriber reconnects, a node rebuilds its own
//! table and announces a change too, so that one announced while Redis was away (by this
//! node or another) is not missed for long.
//!
//! **Bounded queues.** Publications wait for the publisher task in a queue of
//! [`OUTBOX_CAPACITY`], presence changes for the presence task in one of
//! [`PRESENCE_QUEUE`]. While Redis is away they fill up; what does not fit is dropped and
//! counted, with a warning at most every ten seconds. Live delivery is at most once and the
//! store closes gaps; a dropped presence change is made good by the next renewal (a join)
//! or by the TTL sweep (a leave, which is then announced here at once). Renewals are
//! coalesced: at most one waits at a time.
//!
//! Reconnection is fred's: exponential back-off, and the subscriber re-subscribes by
//! itself after Redis comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{
    ClientLike, Config as RedisConfig, EventInterface, KeysInterface, PubsubInterface,
    ReconnectPolicy, SortedSetsInterface,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::{Broker, DomainListener, Remote};
use crate::hub::{Event, Hub, PresentUser, Relay};
use crate::model::{Message, Role, RoomKey};
use crate::node::Supervisor;
use tokio_util::sync::CancellationToken;

/// Most publications sent in one pipelined round trip.
const PUBLISH_BATCH: usize = 256;

/// Publications waiting for the publisher at most, so that a Redis outage costs a bounded
/// amount of memory; more are dropped while Redis is away.
pub const OUTBOX_CAPACITY: usize = 65_536;

/// Presence changes waiting for the presence task at most.
pub const PRESENCE_QUEUE: usize = 16_384;

/// Rooms renewed per pipelined round trip.
const RENEW_BATCH: usize = 4_096;

/// Least time between two warnings about dropped work.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

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

/// What travels between nodes: a hub event (stored messages included), as the hub has it,
/// or a note that the stored domains changed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
enum Bus {
    /// A room event for the other nodes' hubs (or, for the agents' feed, their hand-off
    /// service).
    Room { event: Event },
    /// The stored domains changed: rebuild the domain table.
    DomainsChanged,
}

impl Bus {
    /// The traveling form of a hub event; `None` for a connection's own frame, which stays
    /// on its node.
    fn of(event: &Event) -> Option<Self> {
        (!matches!(event, Event::Frame(_))).then(|| Bus::Room {
            event: event.clone(),
        })
    }
}

/// Hands an event from another node to this node's hub (or, for the agents' feed and
/// state changes, to `remote`).
fn deliver(event: Event, hub: &Arc<Hub>, remote: Option<&Arc<dyn Remote>>) {
    match event {
        Event::Message(message) => hub.deliver(message),
        Event::InboxUpdate(entry) => {
            if let Some(remote) = remote {
                let domain = entry.conversation.room.domain_id.clone();
                remote.to_agents(&domain, Event::InboxUpdate(entry));
            }
        }
        Event::NoteAdded(note) => {
            if let Some(remote) = remote {
                let domain = note.room.domain_id.clone();
                remote.to_agents(&domain, Event::NoteAdded(note));
            }
        }
        Event::Presence {
            room,
            user,
            joined: false,
        } => {
            // Not if the user is present here (checked under the room lock), or leaving
            // here too (then this node's own leave tells).
            hub.announce_leave(&room, user);
        }
        Event::Presence { room, user, .. }
            if hub
                .presence(&room)
                .iter()
                .any(|u| u.user_id == user.user_id) =>
        {
            // Someone present here too was announced already.
        }
        Event::RoomStatus { conversation, seq } => {
            if let Some(remote) = remote {
                remote.conversation_changed(Arc::clone(&conversation));
            }
            let room = conversation.room.clone();
            hub.broadcast_local(&room, Event::RoomStatus { conversation, seq }, None);
        }
        Event::Frame(_) => {}
        event => {
            if let Some(room) = event.room().cloned() {
                hub.broadcast_local(&room, event, None);
            }
        }
    }
}

/// The Redis broker of one node.
#[derive(Debug)]
pub struct RedisBroker {
    hub: Arc<Hub>,
    /// This node's id in publications (random per process).
    node: u64,
    /// Publications waiting for the publisher task.
    outbox: mpsc::Sender<Bytes>,
    /// Publications dropped because the outbox was full.
    outbox_dropped: Dropped,
    publisher: fred::clients::Client,
    subscriber: SubscriberClient,
    /// The hand-off service, for state changes and the agents' feed from other nodes.
    remote: Arc<std::sync::OnceLock<Arc<dyn Remote>>>,
    /// Whether the last PING (every second) was answered.
    reachable: std::sync::atomic::AtomicBool,
    /// Key prefix.
    prefix: String,
    /// Local presence changes and renewals, applied in order by one task.
    presence_changes: mpsc::Sender<PresenceWork>,
    /// Presence changes dropped because their queue was full.
    presence_dropped: Dropped,
    /// A renewal is waiting in the presence queue (renewals are coalesced).
    renew_queued: AtomicBool,
    /// How long a presence entry lives without renewal.
    presence_ttl: Duration,
    /// Woken when the domain table should be rebuilt from the store.
    domains_dirty: Arc<Notify>,
    /// Cancelled by [`Broker::close`]: the broker's tasks end.
    closed: CancellationToken,
    /// Runs the broker's tasks.
    supervisor: Supervisor,
}

/// Counts work dropped from a full queue and warns about it, at most every ten seconds.
#[derive(Debug)]
struct Dropped {
    what: &'static str,
    total: AtomicU64,
    /// `parlor_broker_dropped_total` of this kind.
    counter: prometheus_client::metrics::counter::Counter,
    last_warning: parking_lot::Mutex<Option<Instant>>,
}

impl Dropped {
    fn new(what: &'static str, metrics: &crate::metrics::Metrics, kind: &'static str) -> Self {
        Self {
            what,
            counter: metrics
                .broker_dropped
                .get_or_create(&crate::metrics::ReasonLabel { reason: kind })
                .clone(),
            total: AtomicU64::new(0),
            last_warning: parking_lot::Mutex::new(None),
        }
    }

    fn record(&self) {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        self.counter.inc();
        let mut last = self.last_warning.lock();
        if last.is_none_or(|t| t.elapsed() >= DROP_WARNING_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                what = self.what,
                dropped_total = total,
                "Redis queue full (is Redis reachable?); dropping"
            );
        }
    }
}

/// Work for the presence task, done in the order it was asked for, so that a renewal
/// never puts back an entry a leave just removed.
#[derive(Debug)]
enum PresenceWork {
    /// A user's first local connection joined (`joined`) or the last one left. For a leave,
    /// `announce` says whether this node's members are still to be told (once Redis says
    /// the user is on no other node).
    Change {
        room: RoomKey,
        user: PresentUser,
        joined: bool,
        announce: bool,
    },
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
        supervisor: &Supervisor,
    ) -> Result<Arc<Self>, BrokerError> {
        // Deliveries queue in the subscriber while the hub catches up; a lagging reader loses
        // the oldest, which the seq check then fetches from the store.
        let (publisher, subscriber) = open_clients(url, Some(16_384)).await.map_err(BrokerError)?;
        let channel = format!("{prefix}:bus");
        let (outbox, queued) = mpsc::channel(OUTBOX_CAPACITY);
        let remote = Arc::new(std::sync::OnceLock::new());
        let (presence_changes, mut changes) = mpsc::channel(PRESENCE_QUEUE);
        let domains_dirty = Arc::new(Notify::new());
        let broker = Arc::new(Self {
            presence_changes,
            presence_dropped: Dropped::new("presence change", hub.metrics(), "presence"),
            renew_queued: AtomicBool::new(false),
            hub: Arc::clone(&hub),
            node: rand_node_id(),
            outbox,
            outbox_dropped: Dropped::new("publication", hub.metrics(), "publication"),
            publisher: publisher.clone(),
            subscriber: subscriber.clone(),
            remote: Arc::clone(&remote),
            reachable: AtomicBool::new(true),
            prefix: prefix.to_owned(),
            presence_ttl,
            domains_dirty: Arc::clone(&domains_dirty),
            closed: CancellationToken::new(),
            supervisor: supervisor.clone(),
        });
        let closed = broker.closed.clone();
        let watched = Arc::downgrade(&broker);
        let stop = closed.clone();
        supervisor.spawn("redis-presence", async move {
            while let Some(work) = stop.run_until_cancelled(changes.recv()).await.flatten() {
                let Some(broker) = watched.upgrade() else {
                    return;
                };
                match work {
                    PresenceWork::Change {
                        room,
                        user,
                        joined,
                        announce,
                    } => {
                        broker.apply_presence(room, user, joined, announce).await;
                    }
                    PresenceWork::Renew => {
                        broker.renew_queued.store(false, Ordering::Relaxed);
                        broker.renew_presence().await;
                    }
                }
            }
        });
        // Renew this node's presence entries and sweep expired ones.
        let watched = Arc::downgrade(&broker);
        let stop = closed.clone();
        supervisor.spawn("redis-presence-renewal", async move {
            let mut tick =
                tokio::time::interval((presence_ttl / 3).max(Duration::from_millis(100)));
            while stop.run_until_cancelled(tick.tick()).await.is_some() {
                let Some(broker) = watched.upgrade() else {
                    return;
                };
                // One renewal waiting is enough; it renews whatever is present by then.
                if !broker.renew_queued.swap(true, Ordering::Relaxed)
                    && broker
                        .presence_changes
                        .try_send(PresenceWork::Renew)
                        .is_err()
                {
                    broker.renew_queued.store(false, Ordering::Relaxed);
                }
            }
        });
        // A closed socket is noticed at once, a silent one only by asking: ping every second.
        let watched = Arc::downgrade(&broker);
        let stop = closed.clone();
        supervisor.spawn("redis-ping", async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while stop.run_until_cancelled(tick.tick()).await.is_some() {
                let Some(broker) = watched.upgrade() else {
                    return;
                };
                let ping = broker.publisher.ping::<fred::types::Value>(None);
                let ok = matches!(
                    tokio::time::timeout(Duration::from_millis(900), ping).await,
                    Ok(Ok(_))
                );
                broker.reachable.store(ok, Ordering::Relaxed);
            }
        });
        // Re-subscribe after every reconnect, then catch the active rooms up from the store,
        // rebuild the domain table and tell the other nodes to rebuild theirs (a change
        // announced while this node was away, by it or by another, may be lost).
        let _resubscribe = subscriber.manage_subscriptions();
        let mut reconnects = subscriber.reconnect_rx();
        let resync_hub = Arc::clone(&hub);
        let watched = Arc::downgrade(&broker);
        let stop = closed.clone();
        supervisor.spawn("redis-reconnects", async move {
            while let Some(Ok(_)) = stop.run_until_cancelled(reconnects.recv()).await {
                tracing::info!("reconnected to Redis; catching rooms up from the store");
                // Give the re-subscription a moment, so nothing published after the
                // catch-up read is missed either.
                tokio::time::sleep(Duration::from_millis(200)).await;
                resync_hub.resync();
                let Some(broker) = watched.upgrade() else {
                    return;
                };
                broker.domains_dirty.notify_one();
                broker.send(Bus::DomainsChanged);
            }
        });
        let mut messages = subscriber.message_rx();
        subscriber
            .subscribe(channel.clone())
            .await
            .map_err(|e| BrokerError(format!("cannot subscribe to {channel}: {e}")))?;
        let me = broker.node;
        let deliver_hub = Arc::clone(&hub);
        let stop = closed.clone();
        supervisor.spawn("redis-deliveries", async move {
            while let Some(received) = stop.run_until_cancelled(messages.recv()).await {
                match received {
                    Ok(message) => {
                        let Some(bytes) = message.value.as_bytes() else {
                            continue;
                        };
                        match serde_json::from_slice::<Publication>(bytes) {
                            Ok(p) if p.node == me => {}
                            Ok(Publication {
                                event: Bus::DomainsChanged,
                                ..
                            }) => domains_dirty.notify_one(),
                            Ok(Publication {
                                event: Bus::Room { event },
                                ..
                            }) => deliver(event, &deliver_hub, remote.get()),
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
        supervisor.spawn(
            "redis-publisher",
            publish_loop(publisher, channel, queued, closed),
        );
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

    /// How long a room's presence set outlives its last renewal, in seconds (an abandoned
    /// room's set goes away by itself).
    fn presence_set_ttl(&self) -> i64 {
        i64::try_from(self.presence_ttl.as_secs().max(1) * 2).unwrap_or(60)
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
        let expired: Result<(), _> = self
            .publisher
            .expire(key.as_str(), self.presence_set_ttl(), None)
            .await;
        if let Err(e) = added.and(expired) {
            tracing::debug!(room = %room, error = %e, "cannot record presence in Redis");
        }
    }

    /// Every third of the TTL: renew this node's entries, and announce the users whose
    /// entries expired (their node died) and who are nowhere else any more. Pipelined,
    /// [`RENEW_BATCH`] rooms at a time, in at most three round trips per batch.
    async fn renew_presence(&self) {
        let rooms = self.hub.local_presence();
        for batch in rooms.chunks(RENEW_BATCH) {
            self.renew_batch(batch).await;
        }
    }

    async fn renew_batch(&self, rooms: &[(RoomKey, Vec<PresentUser>)]) {
        let now = chrono::Utc::now().timestamp_millis();
        let score = self.expiry_score();
        let ttl = self.presence_set_ttl();
        let keys: Vec<String> = rooms
            .iter()
            .map(|(room, _)| self.presence_key(room))
            .collect();

        // 1. Renew this node's entries and read the expired ones.
        let pipeline = self.publisher.pipeline();
        let mut stale_reply = Vec::with_capacity(rooms.len());
        let mut commands = 0usize;
        for ((_, users), key) in rooms.iter().zip(&keys) {
            if !users.is_empty() {
                let values: Vec<(f64, String)> =
                    users.iter().map(|u| (score, self.entry(u))).collect();
                let _: Result<(), _> = pipeline
                    .zadd(key.as_str(), None, None, false, false, values)
                    .await;
                let _: Result<(), _> = pipeline.expire(key.as_str(), ttl, None).await;
                commands += 2;
            }
            let _: Result<(), _> = pipeline
                .zrangebyscore(key.as_str(), "-inf", now, false, None)
                .await;
            stale_reply.push(commands);
            commands += 1;
        }
        let replies = pipeline.try_all::<fred::types::Value>().await;
        if let Some(Err(e)) = replies.iter().find(|r| r.is_err()) {
            tracing::debug!(error = %e, rooms = rooms.len(), "cannot renew presence in Redis");
        }
        let mut stale: Vec<(usize, String)> = Vec::new();
        for (i, at) in stale_reply.iter().enumerate() {
            if let Some(Ok(value)) = replies.get(*at) {
                let members: Vec<String> = value.clone().convert().unwrap_or_default();
                stale.extend(members.into_iter().map(|m| (i, m)));
            }
        }
        if stale.is_empty() {
            return;
        }

        // 2. Claim the expired entries: `ZREM` answers 1 to one node only.
        let pipeline = self.publisher.pipeline();
        for (i, member) in &stale {
            let _: Result<(), _> = pipeline.zrem(keys[*i].as_str(), member.as_str()).await;
        }
        let claimed = pipeline.try_all::<i64>().await;
        let gone: Vec<(usize, PresenceEntry)> = stale
            .into_iter()
            .zip(claimed)
            .filter(|(_, claimed)| matches!(claimed, Ok(1)))
            .filter_map(|((i, member), _)| Some((i, serde_json::from_str(&member).ok()?)))
            .collect();
        if gone.is_empty() {
            return;
        }

        // 3. Who is still present in those rooms, on any node.
        let mut asked: Vec<usize> = gone.iter().map(|(i, _)| *i).collect();
        asked.dedup();
        let now = chrono::Utc::now().timestamp_millis();
        let pipeline = self.publisher.pipeline();
        for i in &asked {
            let _: Result<(), _> = pipeline
                .zrangebyscore(keys[*i].as_str(), now, "+inf", false, None)
                .await;
        }
        let live = pipeline.try_all::<Vec<String>>().await;
        let live: std::collections::HashMap<usize, Vec<PresenceEntry>> = asked
            .into_iter()
            .zip(live)
            .map(|(i, members)| {
                let entries = members
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|m| serde_json::from_str(m).ok())
                    .collect();
                (i, entries)
            })
            .collect();
        for (i, gone) in gone {
            let Some((room, _)) = rooms.get(i) else {
                continue;
            };
            let elsewhere = live
                .get(&i)
                .is_some_and(|entries| entries.iter().any(|e| e.user_id == gone.user_id));
            if elsewhere
                || self
                    .hub
                    .presence(room)
                    .iter()
                    .any(|u| u.user_id == gone.user_id)
            {
                continue;
            }
            let user = PresentUser {
                user_id: gone.user_id,
                name: gone.name,
                role: gone.role,
            };
            self.send(Bus::Room {
                event: Event::Presence {
                    room: room.clone(),
                    user: user.clone(),
                    joined: false,
                },
            });
            self.hub.announce_leave(room, user);
        }
    }

    /// A local presence change: record it, then tell the other nodes (a leave only if the
    /// user is on no other node, and then, when `announce`, this node's members too).
    /// Changes are applied one at a time, in the order they happened (a quick join and
    /// leave must not reach Redis, or this node's members, the other way round).
    async fn apply_presence(&self, room: RoomKey, user: PresentUser, joined: bool, announce: bool) {
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
                if announce {
                    self.hub.settle_leave(&room, user, false);
                }
                return;
            }
        }
        let event = Event::Presence {
            room: room.clone(),
            user,
            joined,
        };
        if let Some(bus) = Bus::of(&event) {
            self.send(bus);
        }
        if let Event::Presence {
            user,
            joined: false,
            ..
        } = event
            && announce
        {
            self.hub.settle_leave(&room, user, true);
        }
    }

    fn send(&self, event: Bus) {
        let publication = Publication {
            node: self.node,
            event,
        };
        match serde_json::to_vec(&publication) {
            Ok(bytes) => {
                if self.outbox.try_send(Bytes::from(bytes)).is_err() {
                    self.outbox_dropped.record();
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a publication"),
        }
    }
}

/// Publishes queued publications in order, many per round trip. A batch that fails (Redis
/// down) is dropped: live delivery is at most once, and the store has everything.
/// How long closing waits for the outbox to empty, and for each connection to close.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

async fn publish_loop(
    client: fred::clients::Client,
    channel: String,
    mut queued: mpsc::Receiver<Bytes>,
    closed: CancellationToken,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while closed
        .run_until_cancelled(queued.recv_many(&mut batch, PUBLISH_BATCH))
        .await
        .is_some_and(|n| n > 0)
    {
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
        self.send(Bus::Room {
            event: Event::Message(message),
        });
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn topology(&self) -> crate::node::Topology {
        crate::node::Topology::Cluster
    }

    fn close(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // What the commit pipeline handed over goes out first (the publisher empties
            // the outbox many at a time), then the connections close.
            let until = Instant::now() + CLOSE_FLUSH;
            while self.outbox.capacity() < self.outbox.max_capacity() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            self.closed.cancel();
            let _ = tokio::time::timeout(CLOSE_FLUSH, self.subscriber.quit()).await;
            let _ = tokio::time::timeout(CLOSE_FLUSH, self.publisher.quit()).await;
        })
    }

    fn may_lose(&self) -> bool {
        true
    }

    fn healthy(&self) -> bool {
        self.reachable.load(std::sync::atomic::Ordering::Relaxed)
            && self.publisher.is_connected()
            && self.subscriber.is_connected()
    }

    fn to_agents(&self, _domain: &str, event: &Event) {
        if let Some(bus) = Bus::of(event) {
            self.send(bus);
        }
    }

    fn set_remote(&self, remote: Arc<dyn Remote>) {
        let _ = self.remote.set(remote);
    }

    fn domains_changed(&self) {
        self.send(Bus::DomainsChanged);
    }

    fn set_domain_listener(&self, listener: std::sync::Weak<dyn DomainListener>) {
        // One rebuild at a time; announcements during a rebuild coalesce into one more.
        let dirty = Arc::clone(&self.domains_dirty);
        let stop = self.closed.clone();
        self.supervisor.spawn("domain-listener", async move {
            while stop.run_until_cancelled(dirty.notified()).await.is_some() {
                let Some(listener) = listener.upgrade() else {
                    return;
                };
                listener.domains_changed().await;
            }
        });
    }
}

impl Relay for RedisBroker {
    fn relay(&self, room: &RoomKey, event: &Event) {
        if let Event::Presence { user, joined, .. } = event {
            // Recorded in Redis first; see `apply_presence`. A join that does not fit is
            // recorded by the next renewal.
            let work = PresenceWork::Change {
                room: room.clone(),
                user: user.clone(),
                joined: *joined,
                announce: false,
            };
            if self.presence_changes.try_send(work).is_err() {
                self.presence_dropped.record();
            }
            return;
        }
        if let Some(bus) = Bus::of(event) {
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

    fn leave(&self, room: &RoomKey, user: &PresentUser) -> bool {
        // While Redis does not answer, the other nodes cannot be asked (and the presence
        // task would wait on timeouts): announce here at once, record it when Redis is back.
        let defer = self.healthy();
        let work = PresenceWork::Change {
            room: room.clone(),
            user: user.clone(),
            joined: false,
            announce: defer,
        };
        match self.presence_changes.try_send(work) {
            Ok(()) => defer,
            Err(_) => {
                // The entry expires by itself; the TTL sweep tells the other nodes.
                self.presence_dropped.record();
                false
            }
        }
    }
}

/// The TLS client of a `rediss://` broker: the server's certificate must chain to `ca` (a
/// PEM file of one or more certificates) when given, else to the system's roots
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
fn tls_connector(ca: Option<&str>) -> Result<fred::types::config::TlsConnector, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect)
                .map_err(|e| {
                    format!("broker: cannot read the CA file {path:?} (sslrootcert): {e}")
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "broker: the CA file {path:?} (sslrootcert) holds no certificate"
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("broker: a certificate in {path:?} is unusable: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // One odd certificate in the system store must not stop the start.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "broker: rediss:// needs CA certificates: none found in the system store; \
                     name a CA file with ?sslrootcert=PATH"
                        .to_owned(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("broker: TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config.into())
}

/// A command client and a subscriber client of the Redis at `url`, connected (within 10 s)
/// and reconnecting by themselves with exponential back-off from then on.
/// `delivery_buffer` sizes the subscriber's queue of received publications.
pub(super) async fn open_clients(
    url: &str,
    delivery_buffer: Option<usize>,
) -> Result<(fred::clients::Client, SubscriberClient), String> {
    // `sslrootcert` is Parlor's (the CA of a `rediss://` server), not fred's.
    let ca = crate::config::url_parameter(url, "sslrootcert").map(str::to_owned);
    let bare = url.split_once('?').map_or(url, |(u, _)| u);
    let mut config = RedisConfig::from_url(bare).map_err(|e| format!("invalid broker URL: {e}"))?;
    if bare.starts_with("rediss://") {
        config.tls = Some(tls_connector(ca.as_deref())?.into());
    }
    let server = match &config.server {
        fred::types::config::ServerConfig::Centralized { server } => {
            Some((server.host.to_string(), server.port))
        }
        _ => None,
    };
    let mut builder = fred::types::Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(5);
        })
        .with_performance_config(|p| {
            if let Some(n) = delivery_buffer {
                p.broadcast_channel_capacity = n;
            }
            p.default_command_timeout = Duration::from_secs(5);
        });
    let client = builder
        .build()
        .map_err(|e| format!("cannot build the Redis client: {e}"))?;
    let subscriber = builder
        .build_subscriber_client()
        .map_err(|e| format!("cannot build the Redis subscriber: {e}"))?;
    let connect = async {
        client.init().await?;
        subscriber.init().await?;
        Ok::<_, fred::error::Error>(())
    };
    let redacted = crate::config::redact_url(url);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(())) => Ok((client, subscriber)),
        Ok(Err(e)) => Err(format!(
            "cannot connect to Redis at {redacted}: {}",
            unreachable_reason(server.as_ref(), &e).await
        )),
        Err(_) => Err(format!("Redis at {redacted} did not answer within 10 s")),
    }
}

/// Why Redis could not be used, in words. fred keeps an I/O error only as its `Debug` text
/// (`Os { code: 111, … }`), so after a failed connection a plain one is tried to learn the
/// system's reason ("connection refused"); any other failure (a refused password) is fred's
/// own message.
async fn unreachable_reason(server: Option<&(String, u16)>, e: &fred::error::Error) -> String {
    if *e.kind() == fred::error::ErrorKind::IO
        && let Some((host, port)) = server
    {
        let probe = tokio::net::TcpStream::connect((host.as_str(), *port));
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Err(io)) => return crate::io_reason(&io),
            Err(_) => return "the connection timed out".to_owned(),
            Ok(Ok(_)) => {}
        }
    }
    let details = e.details();
    if details.contains("InvalidCertificate") {
        return format!(
            "the server's TLS certificate is not trusted ({details}); name the CA that signed \
             it with ?sslrootcert=PATH"
        );
    }
    details.to_owned()
}

/// A random node id.
fn rand_node_id() -> u64 {
    let id = uuid::Uuid::new_v4();
    let (high, low) = id.as_u64_pair();
    high ^ low
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::LeftReason;
    use crate::model::{Agent, Author, Conversation, Note};
    use crate::store::InboxEntry;

    fn message(room: &RoomKey) -> Arc<Message> {
        Arc::new(Message {
            id: "m1".to_owned(),
            room: room.clone(),
            seq: 7,
            author: Author {
                user_id: "ann".to_owned(),
                name: "Ann".to_owned(),
                role: "visitor".to_owned(),
            },
            kind: "text".to_owned(),
            content: "hello".to_owned(),
            data: Some(serde_json::json!({ "k": [1, 2] })),
            client_message_id: Some("c1".to_owned()),
            created_at: chrono::Utc::now(),
        })
    }

    /// Every room event but a connection's own frame crosses to another node and comes
    /// back as it was.
    #[test]
    fn room_events_travel_whole() {
        let room = RoomKey::new("shop", "r1");
        let user = PresentUser {
            user_id: "ann".to_owned(),
            name: "Ann".to_owned(),
            role: Role::Visitor,
        };
        let agent = Agent {
            user_id: "alice".to_owned(),
            name: "Alice".to_owned(),
        };
        let conversation = Arc::new(Conversation::new(room.clone()));
        let events = vec![
            Event::Message(message(&room)),
            Event::Presence {
                room: room.clone(),
                user: user.clone(),
                joined: true,
            },
            Event::Typing {
                room: room.clone(),
                user,
                typing: true,
            },
            Event::Delta {
                room: room.clone(),
                message_id: Arc::from("ai-1"),
                delta: "Hel".to_owned(),
                index: 3,
            },
            Event::RoomStatus {
                conversation: Arc::clone(&conversation),
                seq: 9,
            },
            Event::AgentJoined {
                room: room.clone(),
                agent: agent.clone(),
            },
            Event::AgentLeft {
                room: room.clone(),
                agent,
                reason: LeftReason::Transferred,
            },
            Event::InboxUpdate(Arc::new(InboxEntry {
                conversation: (*conversation).clone(),
                created_by: Some("ann".to_owned()),
                visitor_name: None,
                created_at: chrono::Utc::now(),
                last_message: (*message(&room)).clone(),
                read_seq: 0,
            })),
            Event::NoteAdded(Arc::new(Note {
                id: "n1".to_owned(),
                room: room.clone(),
                author: Agent {
                    user_id: "alice".to_owned(),
                    name: "Alice".to_owned(),
                },
                text: "VIP".to_owned(),
                created_at: chrono::Utc::now(),
            })),
            Event::ReadReceipt {
                room: room.clone(),
                user_id: "ann".to_owned(),
                seq: 5,
            },
        ];
        for event in events {
            let sent = Publication {
                node: 1,
                event: Bus::of(&event).expect("travels"),
            };
            let bytes = serde_json::to_vec(&sent).unwrap();
            let back: Publication = serde_json::from_slice(&bytes).unwrap();
            let Bus::Room { event: back } = back.event else {
                panic!("a room event comes back as one");
            };
            assert_eq!(format!("{back:?}"), format!("{event:?}"));
            assert_eq!(back.room(), Some(&room));
        }
        assert!(Bus::of(&Event::Frame(bytes::Bytes::from_static(b"{}"))).is_none());
    }
}

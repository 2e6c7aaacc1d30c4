//! Presence across nodes in Redis.
//!
//! Each room's present users are kept in a sorted set, `{prefix}:presence:{domain}:{room}`,
//! one member per (user, node), scored by when it expires. A node adds its users when they
//! arrive, removes them when their last local connection leaves, and renews them every
//! third of `broker_presence_ttl_secs`. So the member list a joiner gets covers every node,
//! a user leaving one node while still on another is not announced as gone, and the users
//! of a node that died disappear within the TTL: the first node to remove an expired entry
//! (`ZREM` answers 1 to one caller only) announces the leave.
//!
//! Adding or removing an entry and looking for the user's other entries are one Lua
//! script, so whether a user is new to the cluster, or gone from it, is decided in one
//! place: a presence channel's `member_added` and `member_removed` webhooks
//! ([`Handler::channel_change`]) come from the node whose change it was.
//!
//! A leave on this node is announced to this node's members, too, only once Redis says the
//! user is on no other node ([`Handler::leave_settled`], from the presence task, in order
//! with the user's joins). While Redis does not answer, a leave is announced here at once,
//! as on a single node.
//!
//! Changes and renewals wait for the presence task in a queue of [`PRESENCE_QUEUE`]; what
//! does not fit is dropped and counted. A dropped join is made good by the next renewal, a
//! dropped leave by the TTL sweep (and announced here at once). Renewals are coalesced: at
//! most one waits at a time.
//!
//! [`RedisPresence`] is what the hub holds; it only queues work and reads Redis. The task
//! that does the work reaches this node's users through the broker's registered
//! [`Handler`], which the hub's own presence must not hold (the handler holds the hub).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::{KeysInterface, SortedSetsInterface};
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Context;
use super::bus::{Bus, Dropped, Outbox};
use super::connection::Link;
use crate::broker::{ChannelChange, Handler, Presence};
use crate::event::{Event, PresentUser};
use crate::model::{Role, RoomKey};

/// Presence changes waiting for the presence task at most.
pub const PRESENCE_QUEUE: usize = 16_384;

/// Rooms renewed per pipelined round trip.
const RENEW_BATCH: usize = 4_096;

/// Adds or removes (`ARGV[1]` `1` or `0`) one entry (`ARGV[2]`, scored `ARGV[3]`, the set
/// living `ARGV[4]` seconds), then answers 1 when the user (`ARGV[5]`) has another live
/// entry (`ARGV[6]`: now): in one step, so of two nodes adding a user's first entries at
/// once only the first is told the user is new, and of two removing the last ones only the
/// second that the user is gone.
const CHANGE: &str = r"
local set, join, entry = KEYS[1], ARGV[1] == '1', ARGV[2]
if join then
  redis.call('ZADD', set, ARGV[3], entry)
  redis.call('EXPIRE', set, ARGV[4])
else
  redis.call('ZREM', set, entry)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', set, ARGV[6], '+inf')) do
  if m ~= entry then
    local ok, e = pcall(cjson.decode, m)
    if ok and e.user_id == ARGV[5] then
      return 1
    end
  end
end
return 0
";

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
    /// A presence channel member's `user_info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    info: Option<Arc<str>>,
    node: u64,
}

/// Removes a dead node's entries (those ending with `ARGV[1]`, `"node":{id}}`) of a
/// presence set, and answers the users who have no live entry left (`ARGV[2]`: now).
const FORGET: &str = r"
local set, suffix, now = KEYS[1], ARGV[1], ARGV[2]
local removed = {}
for _, m in ipairs(redis.call('ZRANGE', set, 0, -1)) do
  if string.sub(m, -#suffix) == suffix then
    redis.call('ZREM', set, m)
    local ok, e = pcall(cjson.decode, m)
    if ok then
      removed[#removed + 1] = e.user_id
    end
  end
end
local live = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', set, now, '+inf')) do
  local ok, e = pcall(cjson.decode, m)
  if ok then
    live[e.user_id] = true
  end
end
local gone = {}
for _, u in ipairs(removed) do
  if not live[u] then
    gone[#gone + 1] = u
    live[u] = true
  end
end
return gone
";

/// This node's presence in Redis.
#[derive(Debug)]
pub struct RedisPresence {
    link: Arc<Link>,
    /// Announces joins and leaves to the other nodes.
    outbox: Arc<Outbox>,
    /// Key prefix.
    prefix: String,
    /// How long a presence entry lives without renewal.
    ttl: Duration,
    /// Local presence changes and renewals, applied in order by one task.
    changes: mpsc::Sender<PresenceWork>,
    /// Presence changes dropped because their queue was full.
    dropped: Dropped,
    /// A renewal is waiting in the queue (renewals are coalesced).
    renew_queued: AtomicBool,
    /// [`CHANGE`].
    change: Script,
    /// [`FORGET`].
    forget: Script,
}

impl RedisPresence {
    /// Starts the presence task and the renewal timer (both end when the broker closes);
    /// the task reaches this node through the broker's handler once one is registered.
    pub(super) fn start(
        link: Arc<Link>,
        outbox: Arc<Outbox>,
        prefix: &str,
        ttl: Duration,
        metrics: &crate::metrics::Metrics,
        context: &Context,
    ) -> Arc<Self> {
        let Context {
            handler,
            supervisor,
            closed: stop,
        } = context;
        let handler = Arc::clone(handler);
        let (changes, mut work) = mpsc::channel(PRESENCE_QUEUE);
        let presence = Arc::new(Self {
            link,
            outbox,
            prefix: prefix.to_owned(),
            ttl,
            changes,
            dropped: Dropped::new("presence change", metrics, "presence"),
            renew_queued: AtomicBool::new(false),
            change: Script::from_lua(CHANGE),
            forget: Script::from_lua(FORGET),
        });
        let watched = Arc::downgrade(&presence);
        let until = stop.clone();
        supervisor.spawn("redis-presence", async move {
            while let Some(work) = until.run_until_cancelled(work.recv()).await.flatten() {
                let Some(presence) = watched.upgrade() else {
                    return;
                };
                if matches!(work, PresenceWork::Renew) {
                    presence.renew_queued.store(false, Ordering::Relaxed);
                }
                // Nobody is present before the node registered its handler.
                let Some(handler) = handler.get() else {
                    continue;
                };
                match work {
                    PresenceWork::Change {
                        room,
                        user,
                        joined,
                        announce,
                    } => {
                        presence
                            .apply(&**handler, room, user, joined, announce)
                            .await;
                    }
                    PresenceWork::Renew => presence.renew(&**handler).await,
                }
            }
        });
        // Renew this node's presence entries and sweep expired ones.
        let watched = Arc::downgrade(&presence);
        let until = stop.clone();
        supervisor.spawn("redis-presence-renewal", async move {
            let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
            while until.run_until_cancelled(tick.tick()).await.is_some() {
                let Some(presence) = watched.upgrade() else {
                    return;
                };
                // One renewal waiting is enough; it renews whatever is present by then.
                if !presence.renew_queued.swap(true, Ordering::Relaxed)
                    && presence.changes.try_send(PresenceWork::Renew).is_err()
                {
                    presence.renew_queued.store(false, Ordering::Relaxed);
                }
            }
        });
        presence
    }

    fn key(&self, room: &RoomKey) -> String {
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
            info: user.info.clone(),
            node: self.outbox.node(),
        };
        serde_json::to_string(&entry).unwrap_or_default()
    }

    fn expiry_score(&self) -> f64 {
        let ms = chrono::Utc::now().timestamp_millis()
            + i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2);
        ms as f64
    }

    /// The live entries of a room's presence set.
    async fn live_entries(&self, room: &RoomKey) -> Vec<PresenceEntry> {
        let now = chrono::Utc::now().timestamp_millis();
        let raw: Result<Vec<String>, _> = self
            .link
            .publisher
            .zrangebyscore(self.key(room), now, "+inf", false, None)
            .await;
        raw.unwrap_or_default()
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect()
    }

    /// How long a room's presence set outlives its last renewal, in seconds (an abandoned
    /// room's set goes away by itself).
    fn set_ttl(&self) -> i64 {
        i64::try_from(self.ttl.as_secs().max(1) * 2).unwrap_or(60)
    }

    /// Adds (`joined`) or removes `user`'s entry of `room`; answers whether the user has
    /// an entry of another node. An error answers false.
    async fn change(&self, room: &RoomKey, user: &PresentUser, joined: bool) -> bool {
        let args = vec![
            if joined { "1" } else { "0" }.to_owned(),
            self.entry(user),
            self.expiry_score().to_string(),
            self.set_ttl().to_string(),
            user.user_id.clone(),
            chrono::Utc::now().timestamp_millis().to_string(),
        ];
        let answer: Result<i64, _> = self
            .change
            .evalsha_with_reload(&self.link.publisher, self.key(room), args)
            .await;
        answer.unwrap_or_else(|e| {
            tracing::debug!(room = %room, error = %e, "cannot record presence in Redis");
            0
        }) == 1
    }

    /// Removes the entries of the dead node `node` from `room`'s set; answers the users
    /// that left with them. For a channel no live node holds, which no node's renewal
    /// sweeps (`super::occupancy`); whoever removes an entry first reports it, this or a
    /// renewal's sweep.
    pub(super) async fn forget_node(&self, room: &RoomKey, node: &str) -> Vec<String> {
        let args = vec![
            format!("\"node\":{node}}}"),
            chrono::Utc::now().timestamp_millis().to_string(),
        ];
        let answer: Result<Vec<String>, _> = self
            .forget
            .evalsha_with_reload(&self.link.publisher, self.key(room), args)
            .await;
        answer.unwrap_or_else(|e| {
            tracing::debug!(room = %room, error = %e, "cannot sweep presence in Redis");
            Vec::new()
        })
    }

    /// Every third of the TTL: renew this node's entries, and announce the users whose
    /// entries expired (their node died) and who are nowhere else any more. Pipelined,
    /// [`RENEW_BATCH`] rooms at a time, in at most three round trips per batch.
    async fn renew(&self, node: &dyn Handler) {
        let rooms = node.local_presence();
        for batch in rooms.chunks(RENEW_BATCH) {
            self.renew_batch(node, batch).await;
        }
    }

    async fn renew_batch(&self, node: &dyn Handler, rooms: &[(RoomKey, Vec<PresentUser>)]) {
        let now = chrono::Utc::now().timestamp_millis();
        let score = self.expiry_score();
        let ttl = self.set_ttl();
        let keys: Vec<String> = rooms.iter().map(|(room, _)| self.key(room)).collect();

        // 1. Renew this node's entries and read the expired ones.
        let pipeline = self.link.publisher.pipeline();
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
        let pipeline = self.link.publisher.pipeline();
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
        let pipeline = self.link.publisher.pipeline();
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
            if elsewhere || node.is_present(room, &gone.user_id) {
                continue;
            }
            if room.is_channel() {
                node.channel_change(ChannelChange::MemberRemoved(
                    room.clone(),
                    gone.user_id.clone(),
                ));
            }
            let event = Event::Presence {
                room: room.clone(),
                user: PresentUser {
                    user_id: gone.user_id,
                    name: gone.name,
                    role: gone.role,
                    info: gone.info,
                },
                joined: false,
            };
            if let Some(bus) = Bus::of(&event) {
                self.outbox.send(bus);
            }
            // As if another node announced it: not if the user came back here meanwhile.
            node.room_event(event);
        }
    }

    /// A local presence change: record it, then tell the other nodes (a leave only if the
    /// user is on no other node, and then, when `announce`, this node's members too).
    /// Changes are applied one at a time, in the order they happened (a quick join and
    /// leave must not reach Redis, or this node's members, the other way round).
    async fn apply(
        &self,
        node: &dyn Handler,
        room: RoomKey,
        user: PresentUser,
        joined: bool,
        announce: bool,
    ) {
        let elsewhere = self.change(&room, &user, joined).await;
        if !joined && elsewhere {
            if announce {
                node.leave_settled(&room, user, false);
            }
            return;
        }
        // A presence channel's webhooks: the member's first connection on the cluster, or
        // its last one gone.
        if room.is_channel() && !elsewhere {
            let id = user.user_id.clone();
            node.channel_change(if joined {
                ChannelChange::MemberAdded(room.clone(), id)
            } else {
                ChannelChange::MemberRemoved(room.clone(), id)
            });
        }
        let event = Event::Presence {
            room: room.clone(),
            user,
            joined,
        };
        if let Some(bus) = Bus::of(&event) {
            self.outbox.send(bus);
        }
        if let Event::Presence {
            user,
            joined: false,
            ..
        } = event
            && announce
        {
            node.leave_settled(&room, user, true);
        }
    }

    fn queue(&self, work: PresenceWork) -> bool {
        let queued = self.changes.try_send(work).is_ok();
        if !queued {
            self.dropped.record();
        }
        queued
    }
}

impl Presence for RedisPresence {
    fn joined(&self, room: &RoomKey, user: &PresentUser) {
        // Recorded in Redis first; see `apply`. A join that does not fit is recorded by
        // the next renewal.
        self.queue(PresenceWork::Change {
            room: room.clone(),
            user: user.clone(),
            joined: true,
            announce: false,
        });
    }

    fn left(&self, room: &RoomKey, user: &PresentUser) -> bool {
        // While Redis does not answer, the other nodes cannot be asked (and the presence
        // task would wait on timeouts): announce here at once, record it when Redis is back.
        let defer = self.link.healthy();
        let queued = self.queue(PresenceWork::Change {
            room: room.clone(),
            user: user.clone(),
            joined: false,
            announce: defer,
        });
        // Not queued: the entry expires by itself; the TTL sweep tells the other nodes.
        queued && defer
    }

    fn elsewhere<'a>(
        &'a self,
        room: &'a RoomKey,
    ) -> Pin<Box<dyn Future<Output = Vec<PresentUser>> + Send + 'a>> {
        Box::pin(async move {
            let me = self.outbox.node();
            let mut users: Vec<PresentUser> = Vec::new();
            for e in self.live_entries(room).await {
                if e.node != me && !users.iter().any(|u| u.user_id == e.user_id) {
                    users.push(PresentUser {
                        user_id: e.user_id,
                        name: e.name,
                        role: e.role,
                        info: e.info,
                    });
                }
            }
            users
        })
    }
}

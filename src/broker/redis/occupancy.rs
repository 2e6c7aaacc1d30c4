//! Channel occupancy across nodes in Redis.
//!
//! Each node keeps its channels' subscriber counts in a hash of its own,
//! `{prefix}:occupancy:{node}` (field `{domain}\t{room id}`, value the count), and its
//! lease in the sorted set `{prefix}:occupancy:nodes` (scored by when it expires). The
//! other nodes' counts of an app's channels are read from the hashes of the nodes whose
//! lease holds.
//!
//! **Writes are coalesced.** The hub tells every new count ([`Occupancy::changed`]); the
//! occupancy task writes only the last count of each channel it has not written yet, many
//! channels per script call. A channel that fills and empties between two writes is never
//! written at all.
//!
//! **One place decides.** A count going from zero to some, or back, is written by a Lua
//! script that also looks at every live node's hash, atomically: the channel is occupied
//! when no other node holds it yet, vacated when no other node holds it any more. So two
//! nodes taking a channel's first subscribers at once report it occupied once, and the
//! node whose write decided it calls [`Handler::channel_change`].
//!
//! **A node that dies.** Every third of the TTL each node renews its lease and sweeps the
//! nodes whose lease ran out: the first to remove one from the lease set (atomically,
//! in the same script) reads that node's hash, deletes it, and reports vacated every
//! channel no live node holds, after removing the dead node's members of those that are
//! presence channels (no live node's presence renewal looks at a channel it does not
//! hold). A node's hash lives three TTLs past its last renewal, so
//! it is still there to sweep.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::types::scripts::Script;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::Context;
use super::connection::Link;
use super::presence::RedisPresence;
use crate::broker::occupancy::Counts;
use crate::broker::{ChannelChange, Handler, Occupancy};
use crate::model::RoomKey;

/// Channels written per script call.
const WRITE_BATCH: usize = 512;

/// Records this node's counts (`ARGV[6..]`: field, count pairs) and answers, for each,
/// 1 when the channel became occupied on the cluster, 2 when vacated, 0 otherwise.
const CHANGE: &str = r"
local nodes, prefix, me = KEYS[1], ARGV[1], ARGV[2]
local now, expiry, ttl = ARGV[3], ARGV[4], ARGV[5]
local own = prefix .. me
redis.call('ZADD', nodes, expiry, me)
local live = redis.call('ZRANGEBYSCORE', nodes, now, '+inf')
local out = {}
for i = 6, #ARGV, 2 do
  local field, count = ARGV[i], tonumber(ARGV[i + 1])
  local before = tonumber(redis.call('HGET', own, field) or '0')
  if count > 0 then
    redis.call('HSET', own, field, count)
  else
    redis.call('HDEL', own, field)
  end
  local change = 0
  if (before > 0) ~= (count > 0) then
    change = (count > 0) and 1 or 2
    for _, n in ipairs(live) do
      if n ~= me and redis.call('HEXISTS', prefix .. n, field) == 1 then
        change = 0
        break
      end
    end
  end
  out[#out + 1] = change
end
redis.call('PEXPIRE', own, ttl)
return out
";

/// Renews this node's lease and sweeps the dead nodes: answers, for each channel that
/// only they held, the dead node and the channel's field.
const SWEEP: &str = r"
local nodes, prefix, me = KEYS[1], ARGV[1], ARGV[2]
local now, expiry, ttl = ARGV[3], ARGV[4], ARGV[5]
redis.call('ZADD', nodes, expiry, me)
redis.call('PEXPIRE', prefix .. me, ttl)
local dead = redis.call('ZRANGEBYSCORE', nodes, '-inf', '(' .. now)
if #dead == 0 then
  return {}
end
local live = redis.call('ZRANGEBYSCORE', nodes, now, '+inf')
local vacated = {}
for _, d in ipairs(dead) do
  redis.call('ZREM', nodes, d)
  local fields = redis.call('HKEYS', prefix .. d)
  redis.call('DEL', prefix .. d)
  for _, f in ipairs(fields) do
    local held = false
    for _, n in ipairs(live) do
      if redis.call('HEXISTS', prefix .. n, f) == 1 then
        held = true
        break
      end
    end
    if not held then
      vacated[#vacated + 1] = d
      vacated[#vacated + 1] = f
    end
  end
end
return vacated
";

/// The other live nodes' counts of the fields starting with `ARGV[4]`, summed: field
/// (without the domain part, `ARGV[5]` bytes), count, field, count…
const ELSEWHERE: &str = r"
local nodes, prefix, me = KEYS[1], ARGV[1], ARGV[2]
local now, match, skip = ARGV[3], ARGV[4], tonumber(ARGV[5])
local sums, order = {}, {}
for _, n in ipairs(redis.call('ZRANGEBYSCORE', nodes, now, '+inf')) do
  if n ~= me then
    local all = redis.call('HGETALL', prefix .. n)
    for i = 1, #all, 2 do
      local f = all[i]
      if string.sub(f, 1, #match) == match then
        if not sums[f] then
          order[#order + 1] = f
          sums[f] = 0
        end
        sums[f] = sums[f] + tonumber(all[i + 1])
      end
    end
  end
end
local out = {}
for _, f in ipairs(order) do
  out[#out + 1] = string.sub(f, skip + 1)
  out[#out + 1] = tostring(sums[f])
end
return out
";

/// This node's channel counts in Redis.
#[derive(Debug)]
pub struct RedisOccupancy {
    link: Arc<Link>,
    /// Where a dead node's presence channel members are removed.
    presence: Arc<RedisPresence>,
    /// `{prefix}:occupancy:`, which a node's id completes to its hash's key.
    hashes: String,
    /// `{prefix}:occupancy:nodes`.
    nodes: String,
    /// This node's id.
    node: String,
    /// How long a lease lives without renewal.
    ttl: Duration,
    /// Counts told and not yet written: the last one per channel.
    dirty: Mutex<HashMap<RoomKey, usize>>,
    /// Wakes the occupancy task when `dirty` gains a channel.
    wake: Notify,
    change: Script,
    sweep: Script,
    elsewhere: Script,
}

impl RedisOccupancy {
    /// Starts the occupancy task (it ends when the broker closes); it reaches this node
    /// through the broker's handler once one is registered.
    pub(super) fn start(
        link: Arc<Link>,
        presence: Arc<RedisPresence>,
        prefix: &str,
        node: u64,
        ttl: Duration,
        context: &Context,
    ) -> Arc<Self> {
        let occupancy = Arc::new(Self {
            link,
            presence,
            hashes: format!("{prefix}:occupancy:"),
            nodes: format!("{prefix}:occupancy:nodes"),
            node: node.to_string(),
            ttl,
            dirty: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            change: Script::from_lua(CHANGE),
            sweep: Script::from_lua(SWEEP),
            elsewhere: Script::from_lua(ELSEWHERE),
        });
        let handler = Arc::clone(&context.handler);
        let watched = Arc::downgrade(&occupancy);
        let until = context.closed.clone();
        context.supervisor.spawn("redis-occupancy", async move {
            let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
            // After a failed write, wait for the next tick rather than retry at once.
            let mut backing_off = false;
            loop {
                let Some(occupancy) = watched.upgrade() else {
                    return;
                };
                let woken = tokio::select! {
                    () = until.cancelled() => return,
                    _ = tick.tick() => false,
                    () = occupancy.wake.notified(), if !backing_off => true,
                };
                let handler = handler.get().map(Arc::clone);
                if !woken && let Some(handler) = &handler {
                    occupancy.renew(&**handler).await;
                }
                backing_off = !occupancy.flush(handler.as_deref()).await;
            }
        });
        occupancy
    }

    fn field(key: &RoomKey) -> String {
        format!("{}\t{}", key.domain_id, key.room_id)
    }

    fn key_of(field: &str) -> Option<RoomKey> {
        let (domain, room) = field.split_once('\t')?;
        Some(RoomKey::new(Arc::from(domain), room.to_owned()))
    }

    /// `[prefix, node, now, expiry, hash TTL]` in milliseconds, the scripts' first
    /// arguments.
    fn head(&self) -> Vec<String> {
        let now = chrono::Utc::now().timestamp_millis();
        let ttl = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 8);
        vec![
            self.hashes.clone(),
            self.node.clone(),
            now.to_string(),
            (now + ttl).to_string(),
            (ttl * 3).to_string(),
        ]
    }

    /// Writes the counts told since the last write; reports what they changed on the
    /// cluster. False when Redis did not take them (they are kept for the next try).
    pub(super) async fn flush(&self, handler: Option<&dyn Handler>) -> bool {
        let pending: Vec<(RoomKey, usize)> = std::mem::take(&mut *self.dirty.lock())
            .into_iter()
            .collect();
        for (at, batch) in pending.chunks(WRITE_BATCH).enumerate() {
            let mut args = self.head();
            for (key, count) in batch {
                args.push(Self::field(key));
                args.push(count.to_string());
            }
            let answer: Result<Vec<i64>, _> = self
                .change
                .evalsha_with_reload(&self.link.publisher, self.nodes.as_str(), args)
                .await;
            match answer {
                Ok(changes) => {
                    let Some(handler) = handler else { continue };
                    for ((key, _), change) in batch.iter().zip(changes) {
                        match change {
                            1 => handler.channel_change(ChannelChange::Occupied(key.clone())),
                            2 => handler.channel_change(ChannelChange::Vacated(key.clone())),
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot record channel occupancy in Redis");
                    // Kept for the next try, unless a newer count was told meanwhile.
                    let mut dirty = self.dirty.lock();
                    for (key, count) in pending.iter().skip(at * WRITE_BATCH) {
                        dirty.entry(key.clone()).or_insert(*count);
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Renews this node's lease; reports vacated the channels only a dead node held, and
    /// removed the members it had in those that are presence channels.
    async fn renew(&self, handler: &dyn Handler) {
        let answer: Result<Vec<String>, _> = self
            .sweep
            .evalsha_with_reload(&self.link.publisher, self.nodes.as_str(), self.head())
            .await;
        match answer {
            Ok(vacated) => {
                for pair in vacated.chunks_exact(2) {
                    let Some(key) = Self::key_of(&pair[1]) else {
                        continue;
                    };
                    for user in self.presence.forget_node(&key, &pair[0]).await {
                        handler.channel_change(ChannelChange::MemberRemoved(key.clone(), user));
                    }
                    handler.channel_change(ChannelChange::Vacated(key));
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot renew channel occupancy in Redis"),
        }
    }
}

impl Occupancy for RedisOccupancy {
    fn shared(&self) -> bool {
        true
    }

    fn changed(&self, key: &RoomKey, count: usize) {
        let first = {
            let mut dirty = self.dirty.lock();
            let first = dirty.is_empty();
            dirty.insert(key.clone(), count);
            first
        };
        if first {
            self.wake.notify_one();
        }
    }

    fn elsewhere<'a>(&'a self, domain: &'a str, prefix: &'a str) -> Counts<'a> {
        Box::pin(async move {
            let mut args = self.head();
            args.truncate(3);
            args.push(format!("{domain}\t{prefix}"));
            args.push((domain.len() + 1).to_string());
            let answer: Result<Vec<String>, _> = self
                .elsewhere
                .evalsha_with_reload(&self.link.publisher, self.nodes.as_str(), args)
                .await;
            let flat = answer.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "cannot read channel occupancy from Redis");
                Vec::new()
            });
            flat.chunks_exact(2)
                .filter_map(|pair| Some((pair[0].clone(), pair[1].parse().ok()?)))
                .filter(|(_, count)| *count > 0)
                .collect()
        })
    }
}

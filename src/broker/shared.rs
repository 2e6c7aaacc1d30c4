//! Cluster-wide state: what the nodes of a cluster must count and decide together, kept in
//! Redis when a Redis broker is configured and in this process otherwise.
//!
//! - **Rate limits** ([`Shared::take`]): a GCRA (generic cell rate algorithm) bucket per key,
//!   run as one Lua script on Redis's clock, so the nodes draw on one budget per client
//!   address or identity and skewed node clocks do not matter. Each node keeps its own
//!   `governor` limiter with the same quota in front of it: a flood is refused locally
//!   without a round trip, and when Redis does not answer within [`CALL_TIMEOUT`] the node's
//!   own limiter is the limit (a node never refuses service because Redis is down).
//! - **Counters** ([`Shared::counter`], [`Shared::add`]): integers with an expiry, such as
//!   the AI tokens a domain used today. A counter is seeded once from the store (by the first
//!   node that needs it) and then only increased, so restarts and new nodes agree.
//! - **Online users** ([`Shared::online`], [`Shared::online_counts`]): each connection
//!   holds an [`Online`] guard; the first local connection of a user adds a
//!   `(role, node, user)` entry to the domain's sorted set `{prefix}:online:{domain}`, scored
//!   by when it expires, and the last removes it. Entries are renewed every third of the TTL,
//!   so a dead node's users stop counting within the TTL. Counts are distinct users across
//!   nodes.
//! - **Last connection wins** ([`Shared::claim`]): a connection claims a key (a guided
//!   session, say); the key in Redis names its newest holder, and the holder it displaced —
//!   on this node or, through the `{prefix}:claims` channel, on another — is told so and
//!   can close. A displacement published while a node is cut off from Redis is lost (pub/sub
//!   is at most once); the next claim of the key corrects it.
//!
//! - **Marks with a lifetime** ([`Shared::mark`], [`Shared::marked`]): members of a named
//!   set that count until their time runs out or they are unmarked, such as a site's
//!   visitors seen in the last minutes; in Redis a sorted set `{prefix}:marks:{set}` scored
//!   by expiry.
//!
//! Without Redis everything lives in this process and is exact for one node.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use fred::clients::SubscriberClient;
use fred::prelude::{
    ClientLike, EventInterface, KeysInterface, PubsubInterface, SortedSetsInterface,
};
use fred::types::scripts::Script;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::model::{Identity, Role};

/// How long a call to Redis may take before the node decides alone.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a claim's record lives in Redis (a later claim replaces it anyway).
const CLAIM_TTL_MS: i64 = 24 * 3600 * 1000;

/// Most local online changes waiting for Redis; beyond it, changes are dropped and the next
/// renewal puts the node's entries right.
const ONLINE_QUEUE: usize = 65_536;

/// GCRA on Redis's clock. KEYS[1] the bucket; ARGV[1] microseconds per unit, ARGV[2] the
/// burst tolerance in microseconds (`interval * (burst - 1)`). Returns 0 when a unit was
/// taken, else the microseconds until one can be.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return math.ceil(wait) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
";

/// Seeds a counter unless it exists; answers its value. KEYS[1]; ARGV[1] value, ARGV[2] TTL ms.
const SEED: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return tonumber(redis.call('GET', KEYS[1]))
";

/// Adds to a counter that exists (a missing one is seeded from the store first); answers the
/// new value, or -1 when it does not exist. KEYS[1]; ARGV[1] the amount.
const ADD: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return -1
";

/// Sets KEYS[1] to ARGV[1] (PX ARGV[2]) and answers the value it replaced.
const CLAIM: &str = r"
local before = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return before
";

/// Deletes KEYS[1] if it still holds ARGV[1].
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Why the cluster state could not start.
#[derive(Debug, thiserror::Error)]
#[error("cluster state: {0}")]
pub struct SharedError(String);

/// A rate: `per_second` units on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained units per second.
    pub per_second: f64,
    /// Units that may be taken at once.
    pub burst: u32,
}

impl Rate {
    /// `n` per second, `burst` at once.
    pub fn per_second(n: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(n.max(1)),
            burst: burst.max(1),
        }
    }

    /// `n` per minute, `n` at once (as `governor`'s `Quota::per_minute`).
    pub fn per_minute(n: u32) -> Self {
        Self {
            per_second: f64::from(n.max(1)) / 60.0,
            burst: n.max(1),
        }
    }
}

/// Users online in a domain, across the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OnlineCounts {
    /// Distinct visitors with an open connection.
    pub visitors: usize,
    /// Distinct agents with an open connection.
    pub agents: usize,
}

/// Cluster-wide state (see the module header).
#[derive(Debug, Clone)]
pub struct Shared(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    redis: Option<RedisState>,
    metrics: Arc<Metrics>,
    /// This node's users online: (domain, role, user) → local connections.
    online: DashMap<OnlineKey, usize>,
    /// Claims held on this node: `scope/key` → (connection, its displacement signal).
    claims: DashMap<String, (u64, CancellationToken)>,
    /// Marks made on this node: set → member → expiry (unix milliseconds). What counts
    /// without Redis, or when it does not answer.
    marks: DashMap<String, HashMap<String, i64>>,
}

#[derive(Debug)]
struct RedisState {
    client: fred::clients::Client,
    subscriber: SubscriberClient,
    prefix: String,
    node: u64,
    ttl: Duration,
    gcra: Script,
    seed: Script,
    add: Script,
    claim: Script,
    release: Script,
    /// Online changes, applied in order by one task.
    online: mpsc::Sender<OnlineWork>,
    /// Cancelled by [`Shared::close`]: the state's tasks end.
    closed: CancellationToken,
}

/// A user online as `kind` (a role's name, or `inbox` for an agent watching the inbox),
/// equal for every connection of the same user: the connection's own identity is shared,
/// not copied, so counting a connection costs a few words.
#[derive(Debug, Clone)]
struct OnlineKey {
    who: Arc<Identity>,
    kind: &'static str,
}

impl OnlineKey {
    fn domain(&self) -> &Arc<str> {
        &self.who.domain_id
    }
}

impl PartialEq for OnlineKey {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.who.user_id == other.who.user_id
            && self.who.domain_id == other.who.domain_id
    }
}

impl Eq for OnlineKey {}

impl std::hash::Hash for OnlineKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.who.domain_id.hash(state);
        self.kind.hash(state);
        self.who.user_id.hash(state);
    }
}

/// One (kind, node, user) entry of a domain's online set. Serialised the same way every
/// time, so the node that added it can remove it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OnlineEntry<'a> {
    k: &'a str,
    n: u64,
    u: &'a str,
    m: &'a str,
}

#[derive(Debug)]
enum OnlineWork {
    Add(OnlineKey),
    Remove(OnlineKey),
    Renew,
}

/// Holds a user's place among a domain's online users for as long as it lives.
#[derive(Debug)]
pub struct Online {
    shared: Shared,
    key: Option<OnlineKey>,
}

impl Drop for Online {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let inner = &self.shared.0;
        let last = match inner.online.get_mut(&key) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            inner.online.remove_if(&key, |_, n| *n == 0);
            if let Some(redis) = &inner.redis {
                let _ = redis.online.try_send(OnlineWork::Remove(key));
            }
        }
    }
}

/// A connection's claim of a key ("last connection wins"). Dropping it gives the key up.
#[derive(Debug)]
pub struct Claim {
    shared: Shared,
    key: String,
    conn: u64,
    displaced: CancellationToken,
}

impl Claim {
    /// Resolves when a newer connection, on any node, claimed the key.
    pub async fn displaced(&self) {
        self.displaced.cancelled().await;
    }

    /// Whether a newer connection claimed the key.
    pub fn is_displaced(&self) -> bool {
        self.displaced.is_cancelled()
    }

    /// Whether this connection still holds the key, asked of Redis: a newer claim made on
    /// another node shows there before its notice reaches this node. True without Redis,
    /// and when Redis does not answer in time (the notice then decides).
    pub async fn confirmed(&self) -> bool {
        if self.is_displaced() {
            return false;
        }
        let Some(redis) = &self.shared.0.redis else {
            return true;
        };
        let key = redis.key(&format!("claim:{}", self.key));
        let read = redis.client.get::<Option<String>, _>(key);
        match tokio::time::timeout(CALL_TIMEOUT, read).await {
            Ok(Ok(Some(holder_now))) if holder_now != holder(redis.node, self.conn) => {
                self.displaced.cancel();
                false
            }
            Ok(Ok(_)) => true,
            _ => {
                self.shared.fallback("claim");
                true
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let inner = &self.shared.0;
        inner
            .claims
            .remove_if(&self.key, |_, (conn, _)| *conn == self.conn);
        if let Some(redis) = &inner.redis {
            let client = redis.client.clone();
            let script = redis.release.clone();
            let key = redis.key(&format!("claim:{}", self.key));
            let holder = holder(redis.node, self.conn);
            tokio::spawn(async move {
                let released: Result<i64, _> =
                    script.evalsha_with_reload(&client, key, holder).await;
                if let Err(e) = released {
                    tracing::debug!(error = %e, "cannot release a claim in Redis");
                }
            });
        }
    }
}

fn holder(node: u64, conn: u64) -> String {
    format!("{node:x}:{conn:x}")
}

impl RedisState {
    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    fn online_key(&self, domain: &str) -> String {
        self.key(&format!("online:{domain}"))
    }

    fn entry(&self, key: &OnlineKey) -> String {
        let entry = OnlineEntry {
            k: key.kind,
            n: self.node,
            u: &key.who.user_id,
            m: &key.who.name,
        };
        serde_json::to_string(&entry).unwrap_or_default()
    }

    fn expiry(&self) -> f64 {
        (chrono::Utc::now().timestamp_millis()
            + i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2)) as f64
    }

    /// Whether calls can be tried now (not while the client is reconnecting).
    fn up(&self) -> bool {
        self.client.is_connected()
    }
}

impl Shared {
    /// State kept in this process only (one node).
    pub fn local(metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner {
            redis: None,
            metrics,
            online: DashMap::new(),
            claims: DashMap::new(),
            marks: DashMap::new(),
        }))
    }

    /// State kept in the Redis at `url` under `prefix`, shared with every node using the same
    /// Redis and prefix. `ttl` bounds how long a dead node's online users still count.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
        metrics: Arc<Metrics>,
        supervisor: &crate::node::Supervisor,
    ) -> Result<Self, SharedError> {
        let node = {
            let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
            high ^ low
        };
        let (client, subscriber) = super::redis::connection::open_clients(url, None)
            .await
            .map_err(SharedError)?;
        let (online_tx, mut online_rx) = mpsc::channel(ONLINE_QUEUE);
        let shared = Self(Arc::new(Inner {
            redis: Some(RedisState {
                client,
                subscriber: subscriber.clone(),
                prefix: prefix.to_owned(),
                node,
                ttl,
                gcra: Script::from_lua(GCRA),
                seed: Script::from_lua(SEED),
                add: Script::from_lua(ADD),
                claim: Script::from_lua(CLAIM),
                release: Script::from_lua(RELEASE),
                online: online_tx,
                closed: CancellationToken::new(),
            }),
            metrics,
            online: DashMap::new(),
            claims: DashMap::new(),
            marks: DashMap::new(),
        }));
        let closed = shared
            .0
            .redis
            .as_ref()
            .map(|r| r.closed.clone())
            .unwrap_or_default();
        // Online changes and renewals, in order.
        let watched = Arc::downgrade(&shared.0);
        let stop = closed.clone();
        supervisor.spawn("shared-online", async move {
            let mut batch = Vec::new();
            while stop
                .run_until_cancelled(online_rx.recv_many(&mut batch, 1024))
                .await
                .is_some_and(|n| n > 0)
            {
                let Some(inner) = watched.upgrade() else {
                    return;
                };
                Self(inner).apply_online(std::mem::take(&mut batch)).await;
            }
        });
        let watched = Arc::downgrade(&shared.0);
        let stop = closed.clone();
        supervisor.spawn("shared-renewal", async move {
            let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
            while stop.run_until_cancelled(tick.tick()).await.is_some() {
                let Some(inner) = watched.upgrade() else {
                    return;
                };
                if let Some(redis) = &inner.redis {
                    let _ = redis.online.try_send(OnlineWork::Renew);
                }
            }
        });
        // Displacements of this node's claims by other nodes.
        let channel = format!("{prefix}:claims");
        let _resubscribe = subscriber.manage_subscriptions();
        let mut messages = subscriber.message_rx();
        subscriber
            .subscribe(channel.clone())
            .await
            .map_err(|e| SharedError(format!("cannot subscribe to {channel}: {e}")))?;
        let watched = Arc::downgrade(&shared.0);
        supervisor.spawn("shared-claims", async move {
            while let Some(received) = closed.run_until_cancelled(messages.recv()).await {
                match received {
                    Ok(message) => {
                        let Some(inner) = watched.upgrade() else {
                            return;
                        };
                        if let Some(text) = message.value.as_str() {
                            Self(inner).displace_remote(&text);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(shared)
    }

    /// Whether the state is shared with other nodes (Redis).
    pub fn is_cluster(&self) -> bool {
        self.0.redis.is_some()
    }

    fn fallback(&self, op: &'static str) {
        self.0
            .metrics
            .shared_fallbacks
            .get_or_create(&crate::metrics::OpLabel { op })
            .inc();
    }

    /// Takes one unit of the cluster-wide `bucket` of `key` at `rate`; on refusal, how long
    /// to wait. Without Redis, or when Redis does not answer in time, it allows: the caller's
    /// own limiter is the limit then.
    pub async fn take(&self, bucket: &str, key: &str, rate: Rate) -> Result<(), Duration> {
        let Some(redis) = &self.0.redis else {
            return Ok(());
        };
        if !redis.up() {
            self.fallback("rate");
            return Ok(());
        }
        let interval = 1_000_000.0 / rate.per_second;
        let tolerance = interval * f64::from(rate.burst - 1);
        let call = redis.gcra.evalsha_with_reload::<i64, _, _>(
            &redis.client,
            redis.key(&format!("rate:{bucket}:{key}")),
            vec![format!("{interval:.3}"), format!("{tolerance:.3}")],
        );
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(wait)) => Err(Duration::from_micros(u64::try_from(wait).unwrap_or(0))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cluster rate limit unavailable");
                self.fallback("rate");
                Ok(())
            }
            Err(_) => {
                self.fallback("rate");
                Ok(())
            }
        }
    }

    /// The value of the cluster-wide counter `key`: seeded with `seed()` (what the store
    /// knows) by the first node that asks, and living `ttl` from then. `None` without Redis
    /// or when it does not answer in time.
    pub async fn counter<F>(&self, key: &str, ttl: Duration, seed: F) -> Option<u64>
    where
        F: Future<Output = Option<u64>>,
    {
        let redis = self.0.redis.as_ref()?;
        if !redis.up() {
            self.fallback("counter");
            return None;
        }
        let key = redis.key(key);
        let existing: Option<i64> =
            match tokio::time::timeout(CALL_TIMEOUT, redis.client.get(key.as_str())).await {
                Ok(Ok(v)) => v,
                _ => {
                    self.fallback("counter");
                    return None;
                }
            };
        if let Some(v) = existing {
            return u64::try_from(v).ok();
        }
        let value = seed.await?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let call = redis.seed.evalsha_with_reload::<i64, _, _>(
            &redis.client,
            key,
            vec![value.to_string(), ttl_ms.to_string()],
        );
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(v)) => u64::try_from(v).ok(),
            _ => {
                self.fallback("counter");
                None
            }
        }
    }

    /// Adds `n` to the counter `key` if it exists (it is seeded by [`Shared::counter`]);
    /// answers the new value. `None` without Redis, when the counter does not exist, or when
    /// Redis does not answer in time.
    pub async fn add(&self, key: &str, n: u64) -> Option<u64> {
        let redis = self.0.redis.as_ref()?;
        let call = redis.add.evalsha_with_reload::<i64, _, _>(
            &redis.client,
            redis.key(key),
            n.to_string(),
        );
        match tokio::time::timeout(CALL_TIMEOUT * 4, call).await {
            Ok(Ok(v)) => u64::try_from(v).ok(),
            _ => {
                self.fallback("counter");
                None
            }
        }
    }

    /// Counts `who` online in its domain as `kind` (a role's name, or `inbox`) until the
    /// guard is dropped.
    pub fn online(&self, who: &Arc<Identity>, kind: &'static str) -> Online {
        let key = OnlineKey {
            who: Arc::clone(who),
            kind,
        };
        let first = {
            let mut n = self.0.online.entry(key.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first && let Some(redis) = &self.0.redis {
            let _ = redis.online.try_send(OnlineWork::Add(key.clone()));
        }
        Online {
            shared: self.clone(),
            key: Some(key),
        }
    }

    /// The distinct users online in `domain` on every node: (kind, user id, name). Without
    /// Redis (or when it does not answer in time), this node's.
    async fn online_entries(&self, domain: &str) -> Vec<(String, String, String)> {
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut users = Vec::new();
        let mut push = |kind: &str, user: &str, name: &str| {
            if seen.insert((kind.to_owned(), user.to_owned())) {
                users.push((kind.to_owned(), user.to_owned(), name.to_owned()));
            }
        };
        if let Some(redis) = &self.0.redis {
            let now = chrono::Utc::now().timestamp_millis();
            let call = redis.client.zrangebyscore::<Vec<String>, _, _, _>(
                redis.online_key(domain),
                now,
                "+inf",
                false,
                None,
            );
            if let Ok(Ok(entries)) = tokio::time::timeout(CALL_TIMEOUT * 4, call).await {
                for raw in &entries {
                    if let Ok(e) = serde_json::from_str::<OnlineEntry<'_>>(raw) {
                        push(e.k, e.u, e.m);
                    }
                }
                return users;
            }
            self.fallback("online");
        }
        for entry in &self.0.online {
            let key = entry.key();
            if &**key.domain() == domain && *entry.value() > 0 {
                push(key.kind, &key.who.user_id, &key.who.name);
            }
        }
        users
    }

    /// Whether `user_id` is online in `domain` as `kind` on any node (one read of the
    /// domain's entries in Redis; without it, this node's).
    pub async fn is_online(&self, domain: &str, kind: &str, user_id: &str) -> bool {
        self.online_entries(domain)
            .await
            .iter()
            .any(|(k, user, _)| k == kind && user == user_id)
    }

    /// Distinct visitors and agents connected to `domain`, on every node.
    pub async fn online_counts(&self, domain: &str) -> OnlineCounts {
        let mut counts = OnlineCounts::default();
        for (kind, _, _) in self.online_entries(domain).await {
            if kind == Role::Visitor.as_str() {
                counts.visitors += 1;
            } else if kind == Role::Agent.as_str() {
                counts.agents += 1;
            }
        }
        counts
    }

    /// The users online in `domain` as `kind`, on every node: (user id, name), by name.
    pub async fn online_users(&self, domain: &str, kind: &str) -> Vec<(String, String)> {
        let mut users: Vec<(String, String)> = self
            .online_entries(domain)
            .await
            .into_iter()
            .filter(|(k, _, _)| k == kind)
            .map(|(_, user, name)| (user, name))
            .collect();
        users.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        users
    }

    /// Marks `member` of `set` until `ttl` from now, on every node (a later mark extends
    /// it). Expired members are swept from the set meanwhile.
    pub async fn mark(&self, set: &str, member: &str, ttl: Duration) {
        let now = chrono::Utc::now().timestamp_millis();
        let until = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2));
        {
            let mut members = self.0.marks.entry(set.to_owned()).or_default();
            members.retain(|_, expiry| *expiry > now);
            members.insert(member.to_owned(), until);
        }
        if let Some(redis) = &self.0.redis {
            let key = redis.key(&format!("marks:{set}"));
            let pipeline = redis.client.pipeline();
            let _: Result<(), _> = pipeline
                .zadd(
                    key.as_str(),
                    None,
                    None,
                    false,
                    false,
                    (until as f64, member),
                )
                .await;
            let _: Result<(), _> = pipeline
                .zremrangebyscore(key.as_str(), "-inf", now as f64)
                .await;
            let seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2).max(1) * 2;
            let _: Result<(), _> = pipeline.expire(key.as_str(), seconds, None).await;
            let call = pipeline.all::<fred::types::Value>();
            if !matches!(tokio::time::timeout(CALL_TIMEOUT, call).await, Ok(Ok(_))) {
                self.fallback("marks");
            }
        }
    }

    /// Removes `member` from `set`, on every node.
    pub async fn unmark(&self, set: &str, member: &str) {
        if let Some(mut members) = self.0.marks.get_mut(set) {
            members.remove(member);
        }
        if let Some(redis) = &self.0.redis {
            let call = redis
                .client
                .zrem::<i64, _, _>(redis.key(&format!("marks:{set}")), member);
            if !matches!(tokio::time::timeout(CALL_TIMEOUT, call).await, Ok(Ok(_))) {
                self.fallback("marks");
            }
        }
    }

    /// The live members of `set`, on every node. Without Redis (or when it does not answer
    /// in time), this node's.
    pub async fn marked(&self, set: &str) -> Vec<String> {
        let now = chrono::Utc::now().timestamp_millis();
        if let Some(redis) = &self.0.redis {
            let call = redis.client.zrangebyscore::<Vec<String>, _, _, _>(
                redis.key(&format!("marks:{set}")),
                now as f64,
                "+inf",
                false,
                None,
            );
            if let Ok(Ok(members)) = tokio::time::timeout(CALL_TIMEOUT * 4, call).await {
                return members;
            }
            self.fallback("marks");
        }
        self.0
            .marks
            .get(set)
            .map(|members| {
                members
                    .iter()
                    .filter(|(_, expiry)| **expiry > now)
                    .map(|(member, _)| member.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies queued online changes in order, in one pipelined round trip.
    async fn apply_online(&self, work: Vec<OnlineWork>) {
        let Some(redis) = &self.0.redis else {
            return;
        };
        let score = redis.expiry();
        let pipeline = redis.client.pipeline();
        let mut touched: HashSet<Arc<str>> = HashSet::new();
        for w in work {
            match w {
                OnlineWork::Add(key) => {
                    let _: Result<(), _> = pipeline
                        .zadd(
                            redis.online_key(key.domain()),
                            None,
                            None,
                            false,
                            false,
                            (score, redis.entry(&key)),
                        )
                        .await;
                    touched.insert(Arc::clone(key.domain()));
                }
                OnlineWork::Remove(key) => {
                    // Gone only if no new local connection came meanwhile.
                    if self.0.online.contains_key(&key) {
                        continue;
                    }
                    let _: Result<(), _> = pipeline
                        .zrem(redis.online_key(key.domain()), redis.entry(&key))
                        .await;
                }
                OnlineWork::Renew => {
                    let now = chrono::Utc::now().timestamp_millis();
                    let mut domains: HashMap<Arc<str>, Vec<(f64, String)>> = HashMap::new();
                    for entry in &self.0.online {
                        domains
                            .entry(Arc::clone(entry.key().domain()))
                            .or_default()
                            .push((score, redis.entry(entry.key())));
                    }
                    for (domain, entries) in domains {
                        let key = redis.online_key(&domain);
                        for chunk in entries.chunks(1000) {
                            let _: Result<(), _> = pipeline
                                .zadd(key.as_str(), None, None, false, false, chunk.to_vec())
                                .await;
                        }
                        // Dead nodes' entries go; the set itself outlives a quiet domain briefly.
                        let _: Result<(), _> =
                            pipeline.zremrangebyscore(key.as_str(), "-inf", now).await;
                        touched.insert(domain);
                    }
                }
            }
        }
        let ttl = i64::try_from(redis.ttl.as_secs().max(1) * 2).unwrap_or(60);
        for domain in &touched {
            let _: Result<(), _> = pipeline.expire(redis.online_key(domain), ttl, None).await;
        }
        if let Err(e) = pipeline.all::<Vec<fred::types::Value>>().await {
            tracing::debug!(error = %e, "cannot record online users in Redis; the next renewal retries");
        }
    }

    /// Claims `key` of `scope` for connection `conn`: the newest claim wins, and the
    /// connection that held it (on any node) is told it was displaced.
    pub async fn claim(&self, scope: &str, key: &str, conn: u64) -> Claim {
        let full = format!("{scope}/{key}");
        let displaced = CancellationToken::new();
        if let Some((_, (old, token))) = self.0.claims.remove(&full)
            && old != conn
        {
            token.cancel();
        }
        self.0
            .claims
            .insert(full.clone(), (conn, displaced.clone()));
        if let Some(redis) = &self.0.redis {
            let me = holder(redis.node, conn);
            let call = redis.claim.evalsha_with_reload::<Option<String>, _, _>(
                &redis.client,
                redis.key(&format!("claim:{full}")),
                vec![me.clone(), CLAIM_TTL_MS.to_string()],
            );
            match tokio::time::timeout(CALL_TIMEOUT * 4, call).await {
                Ok(Ok(Some(before))) if before != me => {
                    let node_prefix = format!("{:x}:", redis.node);
                    if !before.starts_with(&node_prefix) {
                        let note = format!("{before} {full}");
                        let published: Result<(), _> =
                            redis.client.publish(redis.key("claims"), note).await;
                        if let Err(e) = published {
                            tracing::debug!(error = %e, "cannot tell another node of a displaced claim");
                        }
                    }
                }
                Ok(Ok(_)) => {}
                _ => self.fallback("claim"),
            }
        }
        Claim {
            shared: self.clone(),
            key: full,
            conn,
            displaced,
        }
    }

    /// Another node displaced the holder named in `note` (`node:conn scope/key`).
    fn displace_remote(&self, note: &str) {
        let Some(redis) = &self.0.redis else {
            return;
        };
        let Some((who, full)) = note.split_once(' ') else {
            return;
        };
        let Some((node, conn)) = who.split_once(':') else {
            return;
        };
        if u64::from_str_radix(node, 16).ok() != Some(redis.node) {
            return;
        }
        let Ok(conn) = u64::from_str_radix(conn, 16) else {
            return;
        };
        if let Some((_, (_, token))) = self.0.claims.remove_if(full, |_, (c, _)| *c == conn) {
            token.cancel();
        }
    }

    /// Closes the connections to Redis.
    pub async fn close(&self) {
        if let Some(redis) = &self.0.redis {
            redis.closed.cancel();
            let _ = redis.subscriber.quit().await;
            let _ = redis.client.quit().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_node_counts_its_own_users_and_claims() {
        let shared = Shared::local(Arc::new(Metrics::new()));
        let who = |user: &str, name: &str| {
            Arc::new(Identity {
                user_id: user.to_owned(),
                name: name.to_owned(),
                role: Role::Visitor,
                domain_id: Arc::from("shop"),
                anonymous: false,
                room: None,
                label: None,
            })
        };
        let a = shared.online(&who("ann", "Ann"), "visitor");
        let b = shared.online(&who("ann", "Ann"), "visitor");
        let _c = shared.online(&who("eve", "Eve"), "agent");
        let want = OnlineCounts {
            visitors: 1,
            agents: 1,
        };
        assert_eq!(shared.online_counts("shop").await, want);
        drop(a);
        assert_eq!(shared.online_counts("shop").await, want);
        drop(b);
        assert_eq!(shared.online_counts("shop").await.visitors, 0);
        assert_eq!(shared.online_counts("other").await, OnlineCounts::default());

        // Without Redis there is no cluster budget: the caller's limiter decides.
        assert!(
            shared
                .take("request", "k", Rate::per_second(1, 1))
                .await
                .is_ok()
        );
        assert!(
            shared
                .take("request", "k", Rate::per_second(1, 1))
                .await
                .is_ok()
        );
        assert_eq!(
            shared
                .counter("c", Duration::from_secs(1), async { Some(1) })
                .await,
            None
        );

        let first = shared.claim("session", "s", 1).await;
        let second = shared.claim("session", "s", 2).await;
        assert!(first.is_displaced() && !second.is_displaced());
        drop(first);
        let third = shared.claim("session", "s", 3).await;
        assert!(second.is_displaced() && !third.is_displaced());
    }
}

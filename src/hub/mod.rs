//! The hub: which connections are in which room, presence, and fan-out of room events.
//!
//! Rooms live here only while someone is in them. An active room keeps its last `seq`, a
//! small cache of its most recent messages (recovery without the store) and its members'
//! queues. Stored messages arrive through [`Hub::deliver`] from the broker, already in `seq`
//! order on a single node; the hub still checks: a message that would skip a `seq` is held
//! back and the gap is fetched from the store first, and one already delivered is dropped.
//! That keeps invariant 2 (every member sees every message once, in order) even when a
//! broker delivers out of order or loses messages.
//!
//! Joining is race-free: the catch-up a joiner needs is read from the store *before* it is
//! added to the room and from the cache *while* it is added, under the room lock that every
//! delivery also takes, so nothing published during the join can be missed or doubled.
//!
//! Depends on the model and the store; never on a transport or a wire format.

pub mod conn;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

pub use conn::{CLOSE_SLOW_CONSUMER, ConnHandle, Envelope};

use crate::metrics::Metrics;
use crate::model::{Agent, Conversation, Message, Note, Role, RoomKey};
use crate::store::{InboxEntry, Store, StoreError};

/// Something that happened in a room, on its way to the room's members.
#[derive(Debug)]
pub enum Event {
    /// A stored message (`message-received`).
    Message(Arc<Message>),
    /// A member came or went (first connection of a user in, last one out).
    Presence {
        /// The room.
        room: RoomKey,
        /// Who.
        user: PresentUser,
        /// True when joined, false when left.
        joined: bool,
    },
    /// A member started or stopped typing.
    Typing {
        /// The room.
        room: RoomKey,
        /// Who.
        user: PresentUser,
        /// Typing or not.
        typing: bool,
    },
    /// More text of a reply the assistant is streaming into the room (`message-delta`).
    Delta {
        /// The room.
        room: RoomKey,
        /// The reply's id: the stored message's `clientMessageId` once it is complete.
        message_id: Arc<str>,
        /// The new text.
        delta: String,
        /// 0, 1, 2… per reply, so a client can put deltas in order and spot a gap.
        index: u64,
    },
    /// A frame already encoded for one connection: a reply produced after the request
    /// that asked for it (the deltas of an `ai-stream`).
    Frame(bytes::Bytes),
    /// A support room's hand-off state changed (`room-status`); `seq` is that of the stored
    /// system message recording it.
    RoomStatus {
        /// The new state.
        conversation: Arc<Conversation>,
        /// The system message's `seq`.
        seq: u64,
    },
    /// An agent took the room (`agent-joined`).
    AgentJoined {
        /// The room.
        room: RoomKey,
        /// Who.
        agent: Agent,
    },
    /// An agent gave the room up (`agent-left`): `unassigned`, `transferred` or `resolved`.
    AgentLeft {
        /// The room.
        room: RoomKey,
        /// Who.
        agent: Agent,
        /// Why.
        reason: &'static str,
    },
    /// A room's entry in the agents' inbox changed (`inbox-update`).
    InboxUpdate(Arc<InboxEntry>),
    /// An agent wrote an internal note (`note-added`), for agents only.
    NoteAdded(Arc<Note>),
    /// A member read the room up to `seq`.
    ReadReceipt {
        /// The room.
        room: RoomKey,
        /// Reader's user id.
        user_id: String,
        /// Highest read `seq`.
        seq: u64,
    },
}

/// A user present in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentUser {
    /// User id.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
}

/// What a joiner receives: where the room stands and the messages it missed.
#[derive(Debug)]
pub struct Joined {
    /// The room's last `seq` when the join completed.
    pub last_seq: u64,
    /// Messages after the requested position, ascending, at most `max_replay`.
    pub history: Vec<Arc<Message>>,
    /// True when more messages were missed than `max_replay`: the oldest were left out and
    /// the client should page back with `history`.
    pub truncated: bool,
    /// Users present, including the joiner; at most `presence_max_members` of them.
    pub members: Vec<PresentUser>,
    /// How many users are present in all.
    pub member_count: usize,
}

/// How far back a join should replay.
#[derive(Debug, Clone, Copy)]
pub enum Replay {
    /// Everything after this `seq` (recovery).
    Since(u64),
    /// The most recent `n` messages (a fresh join).
    Last(usize),
}

/// Why a hub operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// All active rooms of this node.
#[derive(Debug)]
pub struct Hub {
    rooms: DashMap<RoomKey, Arc<RoomSlot>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Recent messages kept per active room.
    cache_size: usize,
    /// Rooms with more users than this do not announce joins and leaves, and joiners get a
    /// member list cut to this size: presence in a room of N costs O(N) per join, so O(N²)
    /// to fill it, which only small rooms can afford.
    presence_max_members: usize,
    /// Carries room events to the other nodes (set by a networked broker).
    relay: std::sync::OnceLock<Arc<dyn Relay>>,
}

/// Carries the events of [`Hub::broadcast`] (typing, read receipts, streamed deltas,
/// hand-off changes) to the other nodes, whose hubs hand them to their members with
/// [`Hub::broadcast_local`]. Stored messages travel through the broker instead, in `seq`
/// order. Implemented by a networked broker; a single node has none.
pub trait Relay: Send + Sync + std::fmt::Debug {
    /// Sends `event` of `room` to the other nodes. Never blocks.
    fn relay(&self, room: &RoomKey, event: &Event);

    /// The users present in `room` on the other nodes.
    fn members<'a>(
        &'a self,
        room: &'a RoomKey,
    ) -> std::pin::Pin<Box<dyn Future<Output = Vec<PresentUser>> + Send + 'a>>;

    /// The last connection of `user` on this node left `room`. Returns true when the relay
    /// takes the announcement to this node's members over: it must then call
    /// [`Hub::settle_leave`] exactly once, later, saying whether the user is on no other
    /// node. The default relays the leave and returns false: the hub announces it here at
    /// once.
    fn leave(&self, room: &RoomKey, user: &PresentUser) -> bool {
        let event = Event::Presence {
            room: room.clone(),
            user: user.clone(),
            joined: false,
        };
        self.relay(room, &event);
        false
    }
}

/// One active room: its state behind a lock, plus a once-cell for the initial load.
#[derive(Debug)]
struct RoomSlot {
    key: RoomKey,
    loaded: OnceCell<()>,
    state: Mutex<RoomState>,
}

#[derive(Debug, Default)]
struct RoomState {
    /// Connections in the room.
    members: HashMap<u64, ConnHandle>,
    /// Connections per present user, for presence (tabs of one user count once).
    users: HashMap<String, (PresentUser, usize)>,
    /// Highest `seq` delivered to members (and in the cache).
    last_seq: u64,
    /// The most recent messages, ascending and contiguous, ending at `last_seq`.
    cache: VecDeque<Arc<Message>>,
    /// Messages that arrived ahead of a gap, waiting for it to be filled.
    pending: BTreeMap<u64, Arc<Message>>,
    /// A gap fill is running.
    filling: bool,
    /// Users whose leave the relay holds back (see [`Relay::leave`]), with how many of
    /// their leaves are still to be settled. Their members never saw them go, so a rejoin
    /// meanwhile is not announced, and only the last of the leaves is.
    leaving: HashMap<String, u32>,
    /// The initial load has completed.
    ready: bool,
}

impl Hub {
    /// Creates an empty hub reading catch-up from `store`.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        cache_size: usize,
        presence_max_members: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            rooms: DashMap::new(),
            store,
            metrics,
            cache_size,
            presence_max_members,
            relay: std::sync::OnceLock::new(),
        })
    }

    /// Sets where room events go for the other nodes (once, at start-up).
    pub fn set_relay(&self, relay: Arc<dyn Relay>) {
        let _ = self.relay.set(relay);
    }

    /// Fetches from the store what each active room may have missed (after the broker lost
    /// its connection, say) and delivers it in order.
    pub fn resync(self: &Arc<Self>) {
        const PAGE: usize = 256;
        let slots: Vec<Arc<RoomSlot>> = self.rooms.iter().map(|e| Arc::clone(e.value())).collect();
        for slot in slots {
            let hub = Arc::clone(self);
            tokio::spawn(async move {
                loop {
                    let from = {
                        let st = slot.state.lock();
                        if !st.ready {
                            return;
                        }
                        st.last_seq
                    };
                    let page = match hub.store.messages_after(&slot.key, from, PAGE).await {
                        Ok(page) => page,
                        Err(e) => {
                            tracing::warn!(room = %slot.key, error = %e, "cannot catch up from the store");
                            return;
                        }
                    };
                    let full = page.len() == PAGE;
                    for m in page {
                        hub.deliver(Arc::new(m));
                    }
                    if !full {
                        return;
                    }
                }
            });
        }
    }

    /// True while anyone on this node is in (or joining) the room.
    pub fn is_active(&self, key: &RoomKey) -> bool {
        self.rooms.contains_key(key)
    }

    /// Number of active rooms.
    pub fn active_rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Adds `conn` to the room and returns what it missed: messages after `replay` (at most
    /// `max_replay`). The caller must send `Joined::history` to the client before anything
    /// from the connection's queue; every later message arrives through the queue.
    pub async fn join(
        self: &Arc<Self>,
        key: &RoomKey,
        conn: &ConnHandle,
        replay: Replay,
        max_replay: usize,
    ) -> Result<Joined, HubError> {
        let result = self.try_join(key, conn, replay, max_replay).await;
        if result.is_err() {
            // Do not keep an empty room (and what it buffers) for a join that failed.
            self.rooms
                .remove_if(key, |_, s| s.state.lock().members.is_empty());
        }
        result
    }

    async fn try_join(
        self: &Arc<Self>,
        key: &RoomKey,
        conn: &ConnHandle,
        replay: Replay,
        max_replay: usize,
    ) -> Result<Joined, HubError> {
        'restart: loop {
            let slot = self.slot(key);
            self.ensure_loaded(&slot).await?;

            let (mut cursor, mut truncated) = {
                let st = slot.state.lock();
                let last = st.last_seq;
                let from = match replay {
                    Replay::Since(s) => s.min(last),
                    Replay::Last(n) => last.saturating_sub(n as u64),
                };
                let max = max_replay as u64;
                if last - from > max {
                    (last - max, true)
                } else {
                    (from, false)
                }
            };
            let mut history: Vec<Arc<Message>> = Vec::new();
            loop {
                // Fast path: the cache covers everything after `cursor`.
                let target = {
                    let Some(live) = self.rooms.get(key) else {
                        continue 'restart;
                    };
                    if !Arc::ptr_eq(live.value(), &slot) {
                        continue 'restart;
                    }
                    let mut st = slot.state.lock();
                    let first_cached = st.cache.front().map_or(st.last_seq + 1, |m| m.seq);
                    if cursor + 1 >= first_cached || cursor >= st.last_seq {
                        history.extend(st.cache.iter().filter(|m| m.seq > cursor).cloned());
                        let joined = self.add_member(&mut st, conn);
                        let member_count = st.users.len();
                        let members = st
                            .users
                            .values()
                            .take(self.presence_max_members)
                            .map(|(u, _)| u.clone())
                            .collect();
                        if joined && member_count <= self.presence_max_members {
                            let user = present_user(conn);
                            let event = Event::Presence {
                                room: key.clone(),
                                user,
                                joined: true,
                            };
                            // Members on other nodes hear of it too.
                            if let Some(relay) = self.relay.get() {
                                relay.relay(key, &event);
                            }
                            // Back before the members here were told of the leave: they
                            // never saw the user go.
                            if !st.leaving.contains_key(&conn.identity().user_id) {
                                self.broadcast_locked(&st, &Envelope::new(event), Some(conn.id()));
                            }
                        }
                        return Ok(Joined {
                            last_seq: st.last_seq,
                            history,
                            truncated,
                            members,
                            member_count,
                        });
                    }
                    st.last_seq
                };
                // Slow path: read the part older than the cache from the store, unlocked.
                let want = usize::try_from(target - cursor)
                    .unwrap_or(usize::MAX)
                    .min(max_replay);
                let started = std::time::Instant::now();
                let page = self.store.messages_after(key, cursor, want).await?;
                self.metrics.observe_store("replay", started.elapsed());
                match page.last() {
                    Some(m) => cursor = m.seq,
                    None => {
                        // The store has nothing the room state says exists: trust the store.
                        cursor = target;
                        truncated = true;
                    }
                }
                history.extend(page.into_iter().map(Arc::new));
            }
        }
    }

    /// Removes `conn` from the room. Returns false if it was not a member.
    pub fn leave(&self, key: &RoomKey, conn: &ConnHandle) -> bool {
        let Some(slot) = self.rooms.get(key).map(|s| Arc::clone(s.value())) else {
            return false;
        };
        let (was_member, now_empty) = {
            let mut st = slot.state.lock();
            let Some(member) = st.members.remove(&conn.id()) else {
                return false;
            };
            let user_id = &member.identity().user_id;
            let mut gone = None;
            if let Some((user, count)) = st.users.get_mut(user_id) {
                *count -= 1;
                if *count == 0 {
                    gone = Some(user.clone());
                }
            }
            if let Some(user) = gone {
                let announce = st.users.len() <= self.presence_max_members;
                st.users.remove(&user.user_id);
                // A relay that knows the other nodes may hold the announcement back until
                // it knows the user is on none of them (see `Relay::leave`).
                let deferred = announce && self.relay.get().is_some_and(|r| r.leave(key, &user));
                if deferred {
                    *st.leaving.entry(user.user_id).or_insert(0) += 1;
                } else if announce {
                    // Announced now: a leave still held back has nothing left to say.
                    st.leaving.remove(&user.user_id);
                    self.announce_gone_locked(&st, key, user);
                }
            }
            (true, st.members.is_empty())
        };
        if now_empty {
            // Drop the room's cache once nobody is in it; a concurrent joiner re-checks the map
            // under the same shard lock, so it never joins an orphaned slot.
            self.rooms.remove_if(key, |_, s| {
                Arc::ptr_eq(s, &slot) && s.state.lock().members.is_empty()
            });
        }
        was_member
    }

    /// The node's metrics (for the broker's counters).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The relay settled a leave it held back ([`Relay::leave`]): `gone` when the user is
    /// on no other node. The last outstanding leave of the user is announced to this node's
    /// members, if the user is gone and has not come back here. Under the room lock, so a
    /// leave announced late never follows the announcement of a rejoin.
    pub fn settle_leave(&self, key: &RoomKey, user: PresentUser, gone: bool) {
        let Some(slot) = self.rooms.get(key).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let mut st = slot.state.lock();
        let Some(outstanding) = st.leaving.get_mut(&user.user_id) else {
            return;
        };
        *outstanding = outstanding.saturating_sub(1);
        if *outstanding > 0 {
            return;
        }
        st.leaving.remove(&user.user_id);
        if !gone || st.users.contains_key(&user.user_id) {
            return;
        }
        self.announce_gone_locked(&st, key, user);
    }

    /// Tells this node's members that `user`, last seen on another node, left the room,
    /// unless the user is present here or a leave of the user here is still to be settled
    /// (that one tells). Under the room lock, like [`Self::settle_leave`].
    pub fn announce_leave(&self, key: &RoomKey, user: PresentUser) {
        let Some(slot) = self.rooms.get(key).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let st = slot.state.lock();
        if st.users.contains_key(&user.user_id) || st.leaving.contains_key(&user.user_id) {
            return;
        }
        self.announce_gone_locked(&st, key, user);
    }

    /// Broadcasts `user`'s leave to this node's members (room lock held).
    fn announce_gone_locked(&self, st: &RoomState, key: &RoomKey, user: PresentUser) {
        let ev = Envelope::new(Event::Presence {
            room: key.clone(),
            user,
            joined: false,
        });
        self.broadcast_locked(st, &ev, None);
    }

    /// True if `conn` is in the room.
    pub fn is_member(&self, key: &RoomKey, conn: &ConnHandle) -> bool {
        self.rooms
            .get(key)
            .is_some_and(|s| s.state.lock().members.contains_key(&conn.id()))
    }

    /// Users present in the room (empty if the room is not active).
    pub fn presence(&self, key: &RoomKey) -> Vec<PresentUser> {
        self.rooms
            .get(key)
            .map(|s| {
                s.state
                    .lock()
                    .users
                    .values()
                    .map(|(u, _)| u.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The users present in the room on every node: this node's, plus what the relay knows
    /// of the others (each user once).
    pub async fn presence_all(&self, key: &RoomKey) -> Vec<PresentUser> {
        let mut users = self.presence(key);
        self.add_remote_members(key, &mut users).await;
        users
    }

    /// Adds to `users` those present in the room on other nodes (none without a relay).
    pub async fn add_remote_members(&self, key: &RoomKey, users: &mut Vec<PresentUser>) {
        if let Some(relay) = self.relay.get() {
            for u in relay.members(key).await {
                if !users.iter().any(|x| x.user_id == u.user_id) {
                    users.push(u);
                }
            }
        }
    }

    /// Every active room's present users on this node (for the relay's heartbeat).
    pub fn local_presence(&self) -> Vec<(RoomKey, Vec<PresentUser>)> {
        self.rooms
            .iter()
            .map(|e| {
                let users = e
                    .value()
                    .state
                    .lock()
                    .users
                    .values()
                    .map(|(u, _)| u.clone())
                    .collect();
                (e.key().clone(), users)
            })
            .collect()
    }

    /// Sends an ephemeral event (typing, read receipt…) to the room's members on every node,
    /// except the connection `skip`.
    pub fn broadcast(&self, key: &RoomKey, event: Event, skip: Option<u64>) {
        if let Some(relay) = self.relay.get() {
            relay.relay(key, &event);
        }
        self.broadcast_local(key, event, skip);
    }

    /// [`Self::broadcast`] to this node's members only (an event relayed from another node).
    pub fn broadcast_local(&self, key: &RoomKey, event: Event, skip: Option<u64>) {
        if let Some(slot) = self.rooms.get(key) {
            let st = slot.state.lock();
            self.broadcast_locked(&st, &Envelope::new(event), skip);
        }
    }

    /// Delivers a stored message to the room's members in `seq` order. Called by the broker.
    pub fn deliver(self: &Arc<Self>, message: Arc<Message>) {
        let Some(slot) = self.rooms.get(&message.room).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let mut st = slot.state.lock();
        if !st.ready || st.filling {
            if message.seq > st.last_seq {
                st.pending.insert(message.seq, message);
            }
            return;
        }
        if message.seq <= st.last_seq {
            return;
        }
        if message.seq == st.last_seq + 1 {
            self.apply_locked(&mut st, message);
            self.drain_pending_locked(&mut st);
            return;
        }
        st.pending.insert(message.seq, message);
        st.filling = true;
        drop(st);
        self.spawn_fill(slot);
    }

    fn slot(&self, key: &RoomKey) -> Arc<RoomSlot> {
        Arc::clone(
            self.rooms
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(RoomSlot {
                        key: key.clone(),
                        loaded: OnceCell::new(),
                        state: Mutex::new(RoomState::default()),
                    })
                })
                .value(),
        )
    }

    /// Loads the room's tail from the store the first time the slot is used.
    async fn ensure_loaded(self: &Arc<Self>, slot: &Arc<RoomSlot>) -> Result<(), HubError> {
        slot.loaded
            .get_or_try_init(|| async {
                let started = std::time::Instant::now();
                let tail = self
                    .store
                    .messages_before(&slot.key, u64::MAX, self.cache_size)
                    .await?;
                self.metrics.observe_store("load_room", started.elapsed());
                let mut st = slot.state.lock();
                st.last_seq = tail.last().map_or(0, |m| m.seq);
                st.cache = tail.into_iter().map(Arc::new).collect();
                st.ready = true;
                let last = st.last_seq;
                st.pending.retain(|seq, _| *seq > last);
                if st.pending.keys().next().is_some_and(|s| *s != last + 1) {
                    st.filling = true;
                    drop(st);
                    self.spawn_fill(Arc::clone(slot));
                } else {
                    self.drain_pending_locked(&mut st);
                }
                Ok::<(), HubError>(())
            })
            .await
            .map(|_| ())
    }

    /// Fetches a gap from the store, then delivers it and whatever waited behind it.
    fn spawn_fill(self: &Arc<Self>, slot: Arc<RoomSlot>) {
        let hub = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let (from, to) = {
                    let st = slot.state.lock();
                    let to = st.pending.keys().next().copied().unwrap_or(st.last_seq + 1);
                    (st.last_seq, to)
                };
                let want = usize::try_from(to.saturating_sub(from + 1))
                    .unwrap_or(usize::MAX)
                    .max(1);
                let fetched = match hub.store.messages_after(&slot.key, from, want).await {
                    Ok(page) => page,
                    Err(StoreError::Closed) => {
                        slot.state.lock().filling = false;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(room = %slot.key, error = %e, "cannot fill gap from store; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let mut st = slot.state.lock();
                let progressed = !fetched.is_empty();
                for m in fetched {
                    if m.seq == st.last_seq + 1 {
                        hub.apply_locked(&mut st, Arc::new(m));
                    }
                }
                hub.drain_pending_locked(&mut st);
                let gap = st
                    .pending
                    .keys()
                    .next()
                    .is_some_and(|s| *s != st.last_seq + 1);
                if !gap || !progressed {
                    // Done, or the store does not have the gap (yet): deliver what we hold in
                    // order and let the next delivery retry.
                    if gap {
                        tracing::warn!(room = %slot.key, last = st.last_seq, "gap not in store; skipping ahead");
                        let pending = std::mem::take(&mut st.pending);
                        for (_, m) in pending {
                            if m.seq > st.last_seq {
                                hub.apply_locked(&mut st, m);
                            }
                        }
                    }
                    st.filling = false;
                    return;
                }
            }
        });
    }

    fn drain_pending_locked(&self, st: &mut RoomState) {
        while let Some(entry) = st.pending.first_entry() {
            let seq = *entry.key();
            if seq <= st.last_seq {
                entry.remove();
            } else if seq == st.last_seq + 1 {
                let m = entry.remove();
                self.apply_locked(st, m);
            } else {
                break;
            }
        }
    }

    /// Appends to the cache and fans out. The caller holds the room lock and has checked that
    /// `message.seq == last_seq + 1`.
    fn apply_locked(&self, st: &mut RoomState, message: Arc<Message>) {
        st.last_seq = message.seq;
        st.cache.push_back(Arc::clone(&message));
        while st.cache.len() > self.cache_size {
            st.cache.pop_front();
        }
        self.broadcast_locked(st, &Envelope::new(Event::Message(message)), None);
    }

    fn broadcast_locked(&self, st: &RoomState, envelope: &Arc<Envelope>, skip: Option<u64>) {
        for (id, member) in &st.members {
            if Some(*id) == skip {
                continue;
            }
            if !member.push(Arc::clone(envelope)) {
                self.metrics.fanout_dropped.inc();
            }
        }
    }

    /// Adds a member; returns true when it is the user's first connection in the room.
    fn add_member(&self, st: &mut RoomState, conn: &ConnHandle) -> bool {
        if st.members.insert(conn.id(), conn.clone()).is_some() {
            return false;
        }
        let user = present_user(conn);
        let entry = st.users.entry(user.user_id.clone()).or_insert((user, 0));
        entry.1 += 1;
        entry.1 == 1
    }
}

fn present_user(conn: &ConnHandle) -> PresentUser {
    let id = conn.identity();
    PresentUser {
        user_id: id.user_id.clone(),
        name: id.name.clone(),
        role: id.role,
    }
}

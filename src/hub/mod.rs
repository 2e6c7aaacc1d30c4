//! The hub: which connections are in which room, presence, and fan-out of room events.
//!
//! Rooms live here only while someone is in them. An active room keeps its last `seq`, a
//! small cache of its most recent messages (recovery without the store) and its members'
//! queues. Stored messages arrive through [`Hub::deliver`], from this node's commits and
//! from the broker, already in `seq` order on a single node; the hub still checks: a
//! message that would skip a `seq` is held back and the gap is read from the store first
//! (never skipped: if the store cannot give it, the room's members are told to reconnect),
//! and one already delivered is dropped. A lost *last* message leaves no later one to show
//! the gap, so with a broker that can lose messages the node also compares its active rooms
//! with the store every second ([`Hub::check_positions`]) and catches up the ones that stay
//! behind. That keeps invariant 2 (every member sees every message once, in order) even
//! when a broker delivers out of order or loses messages; each connection checks the order
//! once more against its own position ([`Cursor`]).
//!
//! Joining is race-free: the catch-up a joiner needs is read from the store *before* it is
//! added to the room and from the cache *while* it is added, under the room lock that every
//! delivery also takes, so nothing published during the join can be missed or doubled.
//!
//! Room events travel to the other nodes through the broker's [`Relay`], and this node's
//! joins and leaves through its [`Presence`], both given to [`Hub::new`]; the broker delivers
//! to the hub through the node's handler (`crate::node::Events`), never directly.
//!
//! Depends on the model, the store, the event type ([`crate::event`]) and the broker's
//! traits; never on a transport or a wire format.

pub mod channels;
pub mod conn;
pub mod cursor;
pub mod roster;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

pub use channels::{ChannelEvent, Subscribed, Watcher};
pub use conn::{
    CLOSE_RESYNC, CLOSE_SLOW_CONSUMER, ConnHandle, DELIVERY_ROUND, Envelope, Kick, Parked,
    Receiver, Signal, corked,
};
pub use cursor::{Cursor, Cursors, Step};

pub use crate::event::{Event, LeftReason, PresentUser};

use crate::broker::{Broker, Occupancy, Presence, Relay};
use crate::metrics::{AT_NODE, Metrics};
use crate::model::{Identity, Message, RoomKey};
use crate::node::Supervisor;
use crate::store::{Store, StoreError};
use channels::{Channels, is_channel};
use roster::{Named, Roster};

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
    /// The connection is in the room already and stands at `cursor`: replay only what it
    /// was never sent, the messages after `since` older than its first catch-up. Its
    /// position does not move (`Joined::last_seq` is `cursor.upto`): everything later is
    /// already on its way through its queue.
    Again {
        /// Where the connection stands.
        cursor: Cursor,
        /// The client's last seen `seq`, if it gave one.
        since: Option<u64>,
    },
}

/// Most messages one gap-fill read asks the store for.
const FILL_PAGE: usize = 256;
/// Most messages a room holds back behind a gap. Past it, what is held is dropped and the
/// fill reads it all from the store instead (every delivered message is stored), so a
/// store that stalls while a room is busy costs bounded memory, not a growing buffer.
const MAX_HELD: usize = 16 * FILL_PAGE;
/// First wait before asking the store again for a gap it did not have.
const FILL_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between two such reads.
const FILL_RETRY_MAX: Duration = Duration::from_secs(1);
/// After this long without progress on a gap, the room's members are told to reconnect
/// (the store is the truth, and a rejoin with `since` reads it) instead of waiting longer.
const FILL_GIVE_UP: Duration = Duration::from_secs(10);
/// Rooms compared with the store per read of a position check.
const CHECK_BATCH: usize = 512;

/// Which rooms a position check catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Rooms still behind the last `seq` the store had at the previous check: a message
    /// committed that long ago and not delivered here was lost, not just on its way.
    Lost,
    /// Every room behind the store now (after the broker's connection came back, or its
    /// reader fell behind: anything may have been lost meanwhile).
    All,
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
    /// Pusher channels with subscribers here ([`channels`]).
    channels: Channels,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Recent messages kept per active room.
    cache_size: usize,
    /// Rooms with more users than this do not announce joins and leaves, and joiners get a
    /// member list cut to this size: presence in a room of N costs O(N) per join, so O(N²)
    /// to fill it, which only small rooms can afford.
    presence_max_members: usize,
    /// Carries room events to the other nodes (nothing on a single node); the broker's.
    relay: Arc<dyn Relay>,
    /// Who is present on the other nodes, and where this node's joins and leaves go; the
    /// broker's.
    presence: Arc<dyn Presence>,
    /// The channels' subscribers on the other nodes, and where this node's counts go; the
    /// broker's.
    occupancy: Arc<dyn Occupancy>,
    /// Told of the channels' cluster-wide changes (Pusher's webhooks), once set.
    watcher: std::sync::OnceLock<Arc<dyn Watcher>>,
    /// A [`Hub::resync`] is running, and whether another was asked for meanwhile: however
    /// often the broker reconnects, one catch-up runs at a time (and one more after it).
    resyncing: std::sync::atomic::AtomicBool,
    resync_again: std::sync::atomic::AtomicBool,
    /// Runs the gap fills and catch-ups: a panic in one would leave a room holding its
    /// messages back for good, so it fails the node instead.
    supervisor: Supervisor,
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
    /// Who is present, for presence (tabs of one user count once; a user is shown as the
    /// identity of their first connection in the room), and whose leave is held back.
    roster: Roster<Identity>,
    /// Highest `seq` delivered to members (and in the cache).
    last_seq: u64,
    /// The most recent messages, ascending and contiguous, ending at `last_seq`.
    cache: VecDeque<Arc<Message>>,
    /// Messages that arrived ahead of a gap, waiting for it to be filled.
    pending: BTreeMap<u64, Arc<Message>>,
    /// A gap fill is running.
    filling: bool,
    /// The fill must bring `last_seq` this far at least: the store's last `seq` when a
    /// position check found the room behind.
    fill_to: u64,
    /// The store's last `seq` at the previous position check.
    checked: u64,
    /// The initial load has completed.
    ready: bool,
}

/// Holds `message` back behind a gap, within [`MAX_HELD`]: when the room holds that many
/// already, it forgets them and has the fill read up to the highest from the store.
fn hold_locked(st: &mut RoomState, message: Arc<Message>) {
    if st.pending.len() < MAX_HELD {
        st.pending.insert(message.seq, message);
        return;
    }
    let highest = st
        .pending
        .last_key_value()
        .map_or(message.seq, |(seq, _)| (*seq).max(message.seq));
    st.fill_to = st.fill_to.max(highest);
    st.pending.clear();
}

impl Hub {
    /// Creates an empty hub reading catch-up from `store`, sending its room events and
    /// presence changes to the other nodes through `broker` (which it otherwise does not
    /// keep: the broker delivers to the hub through the node's [`crate::broker::Handler`]).
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        cache_size: usize,
        presence_max_members: usize,
        broker: &dyn Broker,
        supervisor: &Supervisor,
    ) -> Arc<Self> {
        Arc::new(Self {
            rooms: DashMap::new(),
            channels: Channels::default(),
            store,
            metrics,
            cache_size,
            presence_max_members,
            relay: broker.relay(),
            presence: broker.presence(),
            occupancy: broker.occupancy(),
            watcher: std::sync::OnceLock::new(),
            resyncing: std::sync::atomic::AtomicBool::new(false),
            resync_again: std::sync::atomic::AtomicBool::new(false),
            supervisor: supervisor.clone(),
        })
    }

    /// Catches every active room up from the store (after the broker lost its connection,
    /// or its reader fell behind), in the background.
    /// One catch-up runs at a time: a call while one runs has it run once more after.
    pub fn resync(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        self.resync_again.store(true, Ordering::SeqCst);
        if self.resyncing.swap(true, Ordering::SeqCst) {
            return;
        }
        let hub = Arc::clone(self);
        self.supervisor.spawn("hub-resync", async move {
            loop {
                while hub.resync_again.swap(false, Ordering::SeqCst) {
                    if let Err(e) = hub.check_positions(Check::All).await {
                        tracing::warn!(error = %e, "cannot catch rooms up from the store");
                    }
                }
                hub.resyncing.store(false, Ordering::SeqCst);
                // Asked for again between the last check and the flag going down, with
                // nobody to run it: run it here.
                if !hub.resync_again.load(Ordering::SeqCst)
                    || hub.resyncing.swap(true, Ordering::SeqCst)
                {
                    return;
                }
            }
        });
    }

    /// Compares every active room's last delivered `seq` with the store's, in batches of
    /// [`CHECK_BATCH`] rooms per read, and starts a fill for each room `check` selects; the
    /// fill delivers the missing messages in order. Returns how many rooms were behind.
    ///
    /// Run every `broker_position_check_ms` with a broker that may lose messages, this
    /// bounds how long a lost last message of a room (which no later message reveals as a
    /// gap) takes to reach the room's members: two intervals and a store read.
    pub async fn check_positions(self: &Arc<Self>, check: Check) -> Result<usize, HubError> {
        let slots: Vec<Arc<RoomSlot>> = self.rooms.iter().map(|e| Arc::clone(e.value())).collect();
        let mut behind = 0;
        for batch in slots.chunks(CHECK_BATCH) {
            let keys: Vec<RoomKey> = batch.iter().map(|s| s.key.clone()).collect();
            let started = Instant::now();
            let tops = self.store.last_seqs(&keys).await?;
            self.metrics.observe_store("last_seqs", started.elapsed());
            for (slot, top) in batch.iter().zip(tops) {
                let mut st = slot.state.lock();
                if !st.ready {
                    continue;
                }
                let previous = std::mem::replace(&mut st.checked, top);
                let due = match check {
                    Check::Lost => previous.min(top),
                    Check::All => top,
                };
                if st.last_seq >= due {
                    continue;
                }
                behind += 1;
                st.fill_to = st.fill_to.max(top);
                if !st.filling {
                    st.filling = true;
                    drop(st);
                    self.spawn_fill(Arc::clone(slot));
                }
            }
        }
        if behind > 0 {
            self.metrics.stream_tail_repairs.inc_by(behind as u64);
            tracing::info!(
                rooms = behind,
                ?check,
                "rooms behind the store; catching up"
            );
        }
        Ok(behind)
    }

    /// The stored messages of the room with `after < seq <= upto`, ascending: from the room
    /// cache when it holds them all, else from the store.
    pub async fn messages_between(
        &self,
        key: &RoomKey,
        after: u64,
        upto: u64,
    ) -> Result<Vec<Arc<Message>>, HubError> {
        if upto <= after {
            return Ok(Vec::new());
        }
        if let Some(slot) = self.rooms.get(key).map(|s| Arc::clone(s.value())) {
            let st = slot.state.lock();
            if st.cache.front().is_some_and(|m| m.seq <= after + 1) && st.last_seq >= upto {
                return Ok(st
                    .cache
                    .iter()
                    .filter(|m| m.seq > after && m.seq <= upto)
                    .cloned()
                    .collect());
            }
        }
        let want = usize::try_from(upto - after).unwrap_or(usize::MAX);
        let started = Instant::now();
        let page = self.store.messages_after(key, after, want).await?;
        self.metrics.observe_store("replay", started.elapsed());
        Ok(page
            .into_iter()
            .filter(|m| m.seq <= upto)
            .map(Arc::new)
            .collect())
    }

    /// True while anyone on this node is in (or joining) the room.
    pub fn is_active(&self, key: &RoomKey) -> bool {
        self.rooms.contains_key(key)
    }

    /// The active room's own key (the same allocations every holder shares), or `key` when
    /// the room is not active here. A message stored under it, and a connection's cursor
    /// kept under it, compare equal by pointer on every delivery instead of by content.
    pub fn canonical(&self, key: RoomKey) -> RoomKey {
        match self.rooms.get(&key) {
            Some(slot) => slot.key.clone(),
            None => key,
        }
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
        if let Replay::Again { cursor, since } = replay {
            return self.join_again(key, cursor, since, max_replay).await;
        }
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
                    Replay::Again { cursor, .. } => cursor.upto.min(last),
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
                        let (members, member_count) = self.members_locked(&st);
                        if joined && member_count <= self.presence_max_members {
                            let user = conn.identity().present();
                            // Members on other nodes hear of it too.
                            self.presence.joined(key, &user);
                            let event = Event::Presence {
                                room: key.clone(),
                                user,
                                joined: true,
                            };
                            // Back before the members here were told of the leave: they
                            // never saw the user go.
                            if !st.roster.is_leaving(&conn.identity().user_id) {
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

    /// [`Self::join`] of a connection already in the room (see [`Replay::Again`]).
    async fn join_again(
        &self,
        key: &RoomKey,
        cursor: Cursor,
        since: Option<u64>,
        max_replay: usize,
    ) -> Result<Joined, HubError> {
        let mut history = Vec::new();
        let mut truncated = false;
        if let Some(since) = since
            && since < cursor.from
        {
            let oldest = cursor.from.saturating_sub(max_replay as u64).max(since);
            truncated = oldest > since;
            history = self.messages_between(key, oldest, cursor.from).await?;
        }
        let (members, member_count) = self
            .rooms
            .get(key)
            .map(|slot| self.members_locked(&slot.state.lock()))
            .unwrap_or_default();
        Ok(Joined {
            last_seq: cursor.upto,
            history,
            truncated,
            members,
            member_count,
        })
    }

    /// The room's present users (at most `presence_max_members`) and how many there are.
    fn members_locked(&self, st: &RoomState) -> (Vec<PresentUser>, usize) {
        let members = st.roster.present(self.presence_max_members);
        (members, st.roster.len())
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
            if let Some(user) = st.roster.depart(&member.identity().user_id)
                && st.roster.len() < self.presence_max_members
                // A presence that knows the other nodes may hold the announcement back
                // until it knows the user is on none of them (see `Presence::left`).
                && let Some(user) = st.roster.left(key, user, &*self.presence)
            {
                self.announce_gone_locked(&st, key, user);
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

    /// The presence settled a leave it held back ([`Presence::left`]): `gone` when the user is
    /// on no other node. The last outstanding leave of the user is announced to this node's
    /// members, if the user is gone and has not come back here. Under the room lock, so a
    /// leave announced late never follows the announcement of a rejoin.
    pub fn settle_leave(&self, key: &RoomKey, user: PresentUser, gone: bool) {
        if is_channel(key) {
            return self.channel_settle(key, user, gone);
        }
        let Some(slot) = self.rooms.get(key).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let mut st = slot.state.lock();
        if st.roster.settle(&user.user_id, gone) {
            self.announce_gone_locked(&st, key, user);
        }
    }

    /// Tells this node's members that `user`, last seen on another node, left the room,
    /// unless the user is present here or a leave of the user here is still to be settled
    /// (that one tells). Under the room lock, like [`Self::settle_leave`].
    pub fn announce_leave(&self, key: &RoomKey, user: PresentUser) {
        if is_channel(key) {
            return self.channel_leave(key, user);
        }
        let Some(slot) = self.rooms.get(key).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let st = slot.state.lock();
        if st.roster.remote_leave_is_news(&user.user_id) {
            self.announce_gone_locked(&st, key, user);
        }
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
        if is_channel(key) {
            return self.channel_presence(key);
        }
        self.rooms
            .get(key)
            .map(|s| s.state.lock().roster.present(usize::MAX))
            .unwrap_or_default()
    }

    /// The users present in the room on every node: this node's, plus what the presence
    /// knows of the others (each user once).
    pub async fn presence_all(&self, key: &RoomKey) -> Vec<PresentUser> {
        let mut users = self.presence(key);
        self.add_remote_members(key, &mut users).await;
        users
    }

    /// Adds to `users` those present in the room on other nodes (none on a single node).
    pub async fn add_remote_members(&self, key: &RoomKey, users: &mut Vec<PresentUser>) {
        for u in self.presence.elsewhere(key).await {
            if !users.iter().any(|x| x.user_id == u.user_id) {
                users.push(u);
            }
        }
    }

    /// Whether `user_id` is present in the room on this node.
    pub fn is_present(&self, key: &RoomKey, user_id: &str) -> bool {
        if is_channel(key) {
            return self.channel_has(key, user_id);
        }
        self.rooms
            .get(key)
            .is_some_and(|s| s.state.lock().roster.contains(user_id))
    }

    /// Every active room's present users on this node (for the presence's renewal).
    pub fn local_presence(&self) -> Vec<(RoomKey, Vec<PresentUser>)> {
        self.rooms
            .iter()
            .map(|e| {
                let users = e.value().state.lock().roster.present(usize::MAX);
                (e.key().clone(), users)
            })
            .chain(self.channels_presence())
            .collect()
    }

    /// Sends an ephemeral event (typing, read receipt…) to the room's members on every node,
    /// except the connection `skip`.
    pub fn broadcast(&self, key: &RoomKey, event: Event, skip: Option<u64>) {
        self.relay.relay(&event);
        self.broadcast_local(key, event, skip);
    }

    /// [`Self::broadcast`] to this node's members only (an event relayed from another node).
    pub fn broadcast_local(&self, key: &RoomKey, event: Event, skip: Option<u64>) {
        if is_channel(key) {
            return self.channel_broadcast(key, event, skip);
        }
        if let Some(slot) = self.rooms.get(key) {
            let st = slot.state.lock();
            self.broadcast_locked(&st, &Envelope::new(event), skip);
        }
    }

    /// Messages `key` holds back behind a gap (at most [`MAX_HELD`]).
    pub fn held(&self, key: &RoomKey) -> usize {
        self.rooms
            .get(key)
            .map_or(0, |slot| slot.state.lock().pending.len())
    }

    /// Delivers a stored message to the room's members in `seq` order. Called by the broker.
    pub fn deliver(self: &Arc<Self>, message: Arc<Message>) {
        let Some(slot) = self.rooms.get(&message.room).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let mut st = slot.state.lock();
        if !st.ready || st.filling {
            if message.seq > st.last_seq {
                hold_locked(&mut st, message);
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
        self.metrics.stream_gaps.get_or_create(&AT_NODE).inc();
        hold_locked(&mut st, message);
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
                if st.pending.keys().next().is_some_and(|s| *s != last + 1) || st.fill_to > last {
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

    /// Starts [`Self::fill`] in the background (the caller has set `filling`).
    fn spawn_fill(self: &Arc<Self>, slot: Arc<RoomSlot>) {
        let hub = Arc::clone(self);
        let stop = self.supervisor.shutdown().clone();
        // At shutdown the members are gone: a fill waiting for the store need not finish.
        self.supervisor.spawn("hub-fill", async move {
            stop.run_until_cancelled(hub.fill(slot)).await;
        });
    }

    /// Reads what the room misses from the store and delivers it in order, with whatever
    /// waited behind it, until the room has every message up to its first held-back one
    /// (or up to `fill_to`) and nothing is held back. A range the store does not have yet
    /// is asked for again, with growing waits; after [`FILL_GIVE_UP`] without progress the
    /// room is dropped and its members told to reconnect ([`Self::evict`]): a message is
    /// never skipped.
    async fn fill(self: Arc<Self>, slot: Arc<RoomSlot>) {
        // Tokio's clock, which tests can pause and advance.
        let mut stalled_since = tokio::time::Instant::now();
        let mut wait = FILL_RETRY_FIRST;
        loop {
            // Each delivery here is a round of its own (`conn::corked`): the members that
            // take its messages parked are written once for all of them, after the lock.
            let next = conn::corked(|| {
                let mut st = slot.state.lock();
                self.drain_pending_locked(&mut st);
                let target = match st.pending.first_key_value() {
                    Some((&first, _)) => first - 1,
                    None => st.fill_to,
                };
                if target <= st.last_seq {
                    st.filling = false;
                    return None;
                }
                let want = usize::try_from(target - st.last_seq)
                    .unwrap_or(usize::MAX)
                    .min(FILL_PAGE);
                Some((st.last_seq, want))
            });
            let Some((after, want)) = next else {
                return;
            };
            match self.store.messages_after(&slot.key, after, want).await {
                Ok(page) if !page.is_empty() => {
                    let filled = conn::corked(|| {
                        let mut st = slot.state.lock();
                        let mut filled = 0;
                        for m in page {
                            if m.seq == st.last_seq + 1 {
                                self.apply_locked(&mut st, Arc::new(m));
                                filled += 1;
                            }
                        }
                        filled
                    });
                    self.metrics
                        .stream_filled
                        .get_or_create(&AT_NODE)
                        .inc_by(filled);
                    if filled > 0 {
                        stalled_since = tokio::time::Instant::now();
                        wait = FILL_RETRY_FIRST;
                        continue;
                    }
                }
                // The store does not have it (yet).
                Ok(_) => {}
                Err(StoreError::Closed) => {
                    slot.state.lock().filling = false;
                    return;
                }
                Err(e) => {
                    tracing::warn!(room = %slot.key, error = %e, "cannot fill a gap from the store; retrying");
                }
            }
            if stalled_since.elapsed() >= FILL_GIVE_UP {
                self.evict(&slot);
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(FILL_RETRY_MAX);
        }
    }

    /// Gives up on a room whose stream cannot be continued in order: drops its slot (and
    /// what it held back) and asks every member to reconnect ([`Kick::Resync`]); their
    /// rejoin with `since` reads the room from the store, and the next join here starts a
    /// fresh slot from the store too.
    fn evict(&self, slot: &Arc<RoomSlot>) {
        self.rooms.remove_if(&slot.key, |_, s| Arc::ptr_eq(s, slot));
        let mut st = slot.state.lock();
        st.filling = false;
        st.pending.clear();
        for member in st.members.values() {
            member.resync();
        }
        self.metrics
            .stream_resyncs
            .get_or_create(&AT_NODE)
            .inc_by(st.members.len() as u64);
        tracing::error!(
            room = %slot.key,
            last_seq = st.last_seq,
            members = st.members.len(),
            "the store does not have the next message of the room; its members must reconnect"
        );
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
            if Some(*id) == skip
                || (matches!(envelope.event, Event::Message(_))
                    && crate::failpoint::skip("hub-push"))
            {
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
        st.roster.arrive(Arc::clone(conn.identity()))
    }
}

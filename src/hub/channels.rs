//! Pusher channels in the hub: which connections subscribe to which channel, presence in
//! presence channels, and fan-out of channel events (`docs/pusher.md`).
//!
//! A channel has no history: an event reaches the subscribers connected when it is
//! published, on every node, and nothing is stored. So a channel is not a room (no `seq`,
//! no cache, no store), but it travels the same ways: its events go to the other nodes
//! through the broker's [`Relay`](crate::broker::Relay) as [`Event::Channel`], and the
//! members of a presence channel through the broker's [`Presence`](crate::broker::Presence)
//! under the channel's key, so they are cluster-wide, with the same arrive-once, leave-once
//! rules as a room's users ([`Roster`]).
//!
//! Each channel's subscriber count here goes to the broker's
//! [`Occupancy`](crate::broker::Occupancy), which answers for the other nodes' counts and,
//! on a cluster, decides when a channel becomes occupied or vacated; on a single node the
//! hub decides. Either way the [`Watcher`] hears of it (Pusher's webhooks).
//!
//! A channel's key is a [`RoomKey`] of its app's domain whose room id is
//! `#{app_id}#{channel}` ([`channel_key`]): `#` is in no room id and no channel name, so
//! a channel never meets a room, and the node's broker handler reaches the channel through
//! the same hub calls as a room (the hub sends keys of this form here).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::roster::Roster;
use super::{ConnHandle, Envelope, Event, Hub, PresentUser};
use crate::broker::ChannelChange;
use crate::model::RoomKey;

/// One event published on a channel.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ChannelEvent {
    /// The channel's key ([`channel_key`]).
    pub key: RoomKey,
    /// The event's name.
    pub event: String,
    /// Its data, as the publisher gave it (Pusher sends data as a string).
    pub data: String,
    /// The user who sent it, for a client event on a presence channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The socket not to deliver it to: the client event's sender, or the `socket_id` an
    /// HTTP publisher excluded (on whichever node it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<String>,
}

impl ChannelEvent {
    /// The channel's name.
    pub fn channel(&self) -> &str {
        channel_name(&self.key).unwrap_or_default()
    }
}

/// The key of `channel` of app `app_id` of `domain`.
pub fn channel_key(domain: &Arc<str>, app_id: &str, channel: &str) -> RoomKey {
    RoomKey::new(Arc::clone(domain), format!("#{app_id}#{channel}"))
}

/// Whether `key` is a channel's rather than a room's.
pub fn is_channel(key: &RoomKey) -> bool {
    key.is_channel()
}

/// The channel name of a channel's key.
pub fn channel_name(key: &RoomKey) -> Option<&str> {
    let rest = key.room_id.strip_prefix('#')?;
    rest.split_once('#').map(|(_, name)| name)
}

/// The app of a channel's key.
pub fn channel_app(key: &RoomKey) -> Option<&str> {
    let rest = key.room_id.strip_prefix('#')?;
    rest.split_once('#').map(|(app, _)| app)
}

/// One channel's subscribers on this node.
#[derive(Debug, Default)]
pub(super) struct ChannelState {
    /// Subscribed connections, with the member each is in a presence channel.
    members: HashMap<u64, (ConnHandle, Option<Arc<PresentUser>>)>,
    /// A presence channel's users here.
    roster: Roster<PresentUser>,
}

/// What a subscriber is told when its subscription succeeds.
#[derive(Debug, Default)]
pub struct Subscribed {
    /// A presence channel's members on this node, the subscriber included (at most
    /// `presence_max_members`); add the other nodes' with [`Hub::add_remote_members`].
    pub members: Vec<PresentUser>,
}

/// The channels of this node: each with subscribers here, and nothing else kept.
pub(super) type Channels = dashmap::DashMap<RoomKey, Arc<Mutex<ChannelState>>>;

/// Told of each [`ChannelChange`] of the cluster (Pusher's webhooks).
pub trait Watcher: Send + Sync + std::fmt::Debug {
    /// `change` happened. Called under a channel's lock: never blocks.
    fn change(&self, change: ChannelChange);
}

impl Hub {
    /// Subscribes `conn` to the channel `key`, as `member` in a presence channel. The
    /// member's first connection in the channel is announced to the others on every node
    /// (`Event::Presence` under the channel's key). A connection already subscribed keeps
    /// its subscription.
    pub fn subscribe(
        &self,
        key: &RoomKey,
        conn: &ConnHandle,
        member: Option<PresentUser>,
    ) -> Subscribed {
        let member = member.map(Arc::new);
        loop {
            let slot = Arc::clone(self.channels.entry(key.clone()).or_default().value());
            // A slot an unsubscribe emptied and removed meanwhile is not used: checked under
            // the map's shard lock, held while the slot is locked (the order `remove_if`
            // takes them in), so the slot cannot be removed while this subscriber goes in.
            let Some(live) = self.channels.get(key) else {
                continue;
            };
            if !Arc::ptr_eq(live.value(), &slot) {
                continue;
            }
            let mut st = slot.lock();
            if let std::collections::hash_map::Entry::Vacant(entry) = st.members.entry(conn.id()) {
                entry.insert((conn.clone(), member.as_ref().map(Arc::clone)));
                self.occupancy.changed(key, st.members.len());
                if st.members.len() == 1 {
                    self.local_change(|| ChannelChange::Occupied(key.clone()));
                }
                if let Some(member) = &member
                    && st.roster.arrive(Arc::clone(member))
                {
                    let user = PresentUser::clone(member);
                    self.presence.joined(key, &user);
                    self.local_change(|| {
                        ChannelChange::MemberAdded(key.clone(), user.user_id.clone())
                    });
                    if !st.roster.is_leaving(&user.user_id) {
                        let event = Event::Presence {
                            room: key.clone(),
                            user,
                            joined: true,
                        };
                        channel_broadcast_locked(&st, &Envelope::new(event), Some(conn.id()));
                    }
                }
            }
            return Subscribed {
                members: st.roster.present(self.presence_max_members),
            };
        }
    }

    /// Ends `conn`'s subscription to the channel `key`; a presence member's last
    /// connection leaving is announced on every node once the presence knows the member is
    /// on no other node. Returns false when `conn` was not subscribed.
    pub fn unsubscribe(&self, key: &RoomKey, conn: &ConnHandle) -> bool {
        let Some(slot) = self.channels.get(key).map(|s| Arc::clone(s.value())) else {
            return false;
        };
        let now_empty = {
            let mut st = slot.lock();
            let Some((_, member)) = st.members.remove(&conn.id()) else {
                return false;
            };
            self.occupancy.changed(key, st.members.len());
            if let Some(member) = member
                && let Some(user) = st.roster.depart(&member.user_id)
                && let Some(user) = st.roster.left(key, user, &*self.presence)
            {
                self.local_change(|| {
                    ChannelChange::MemberRemoved(key.clone(), user.user_id.clone())
                });
                announce_gone_locked(&st, key, user);
            }
            if st.members.is_empty() {
                self.local_change(|| ChannelChange::Vacated(key.clone()));
            }
            st.members.is_empty() && st.roster.is_empty()
        };
        if now_empty {
            self.channels.remove_if(key, |_, s| {
                Arc::ptr_eq(s, &slot) && {
                    let st = s.lock();
                    st.members.is_empty() && st.roster.is_empty()
                }
            });
        }
        true
    }

    /// Publishes `event` to its channel's subscribers on every node.
    pub fn publish(&self, event: ChannelEvent) {
        let key = event.key.clone();
        self.broadcast(&key, Event::Channel(Arc::new(event)), None);
    }

    /// The channels of `app_id` of `domain` with subscribers on any node, with how many
    /// each has.
    pub async fn occupied(&self, domain: &str, app_id: &str) -> Vec<(String, usize)> {
        let prefix = format!("#{app_id}#");
        let mut counts: HashMap<String, usize> = self
            .channels
            .iter()
            .filter(|e| &*e.key().domain_id == domain && e.key().room_id.starts_with(&prefix))
            .map(|e| (e.key().room_id.to_string(), e.value().lock().members.len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        for (room_id, n) in self.occupancy.elsewhere(domain, &prefix).await {
            *counts.entry(room_id).or_default() += n;
        }
        counts
            .into_iter()
            .filter_map(|(room_id, n)| Some((room_id.strip_prefix(&prefix)?.to_owned(), n)))
            .collect()
    }

    /// The channel `key`'s subscribers on every node.
    pub async fn subscriptions(&self, key: &RoomKey) -> usize {
        let here = self
            .channels
            .get(key)
            .map_or(0, |slot| slot.lock().members.len());
        let elsewhere: usize = self
            .occupancy
            .elsewhere(&key.domain_id, &key.room_id)
            .await
            .into_iter()
            .filter(|(room_id, _)| *room_id == *key.room_id)
            .map(|(_, n)| n)
            .sum();
        here + elsewhere
    }

    /// Has `watcher` told of the channels' cluster-wide changes from now on (once; later
    /// calls are ignored).
    pub fn watch_channels(&self, watcher: Arc<dyn Watcher>) {
        let _ = self.watcher.set(watcher);
    }

    /// A cluster-wide change of a channel, from this node's hub (a single node) or the
    /// broker (a shared one).
    pub fn channel_change(&self, change: ChannelChange) {
        if let Some(watcher) = self.watcher.get() {
            watcher.change(change);
        }
    }

    /// A change this node decides itself, for a broker that does not
    /// ([`Occupancy::shared`](crate::broker::Occupancy::shared)).
    fn local_change(&self, change: impl FnOnce() -> ChannelChange) {
        if !self.occupancy.shared() && self.watcher.get().is_some() {
            self.channel_change(change());
        }
    }

    /// A presence channel's members on this node.
    pub(super) fn channel_presence(&self, key: &RoomKey) -> Vec<PresentUser> {
        self.channels
            .get(key)
            .map(|slot| slot.lock().roster.present(usize::MAX))
            .unwrap_or_default()
    }

    /// Every presence channel's members here (for the presence's renewal).
    pub(super) fn channels_presence(&self) -> impl Iterator<Item = (RoomKey, Vec<PresentUser>)> {
        self.channels.iter().filter_map(|e| {
            let users = e.value().lock().roster.present(usize::MAX);
            (!users.is_empty()).then(|| (e.key().clone(), users))
        })
    }

    /// Whether `user_id` is a member of the presence channel `key` here.
    pub(super) fn channel_has(&self, key: &RoomKey, user_id: &str) -> bool {
        self.channels
            .get(key)
            .is_some_and(|slot| slot.lock().roster.contains(user_id))
    }

    /// [`Hub::settle_leave`] for a presence channel.
    pub(super) fn channel_settle(&self, key: &RoomKey, user: PresentUser, gone: bool) {
        let Some(slot) = self.channels.get(key).map(|s| Arc::clone(s.value())) else {
            return;
        };
        let mut st = slot.lock();
        if st.roster.settle(&user.user_id, gone) {
            announce_gone_locked(&st, key, user);
        }
        let empty = st.members.is_empty() && st.roster.is_empty();
        drop(st);
        if empty {
            self.channels.remove_if(key, |_, s| {
                Arc::ptr_eq(s, &slot) && {
                    let st = s.lock();
                    st.members.is_empty() && st.roster.is_empty()
                }
            });
        }
    }

    /// [`Hub::announce_leave`] for a presence channel.
    pub(super) fn channel_leave(&self, key: &RoomKey, user: PresentUser) {
        if let Some(slot) = self.channels.get(key) {
            let st = slot.lock();
            if st.roster.remote_leave_is_news(&user.user_id) {
                announce_gone_locked(&st, key, user);
            }
        }
    }

    /// [`Hub::broadcast_local`] for a channel.
    pub(super) fn channel_broadcast(&self, key: &RoomKey, event: Event, skip: Option<u64>) {
        if let Some(slot) = self.channels.get(key) {
            channel_broadcast_locked(&slot.lock(), &Envelope::new(event), skip);
        }
    }
}

/// Tells the channel's subscribers here that `user` left (channel lock held).
fn announce_gone_locked(st: &ChannelState, key: &RoomKey, user: PresentUser) {
    let event = Event::Presence {
        room: key.clone(),
        user,
        joined: false,
    };
    channel_broadcast_locked(st, &Envelope::new(event), None);
}

/// Queues `envelope` for every subscriber but `skip` (channel lock held). A subscriber that
/// cannot take it is closed by its queue, as in a room.
fn channel_broadcast_locked(st: &ChannelState, envelope: &Arc<Envelope>, skip: Option<u64>) {
    for (id, (conn, _)) in &st.members {
        if Some(*id) != skip {
            conn.push(Arc::clone(envelope));
        }
    }
}

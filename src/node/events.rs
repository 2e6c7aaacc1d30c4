//! The node's broker handler: where everything the broker delivers to this node goes.
//!
//! The broker knows one [`Handler`], registered at start-up; this is
//! it. [`Events`] passes each call on to the part of the node it is for: stored messages,
//! room events and presence questions to the hub; state changes and the agents' feed to
//! the hand-off service ([`Remote`]); users' notifications to the notifications service
//! ([`NotificationListener`]); "the domains changed" to the domain service
//! ([`DomainListener`]). So the broker depends on no part of the node, and the parts depend
//! on no broker.
//!
//! A committed message goes straight to [`Hub::deliver`], on the broker's thread: with the
//! in-process broker that is the dispatcher's, as if it called the hub itself.

use std::pin::Pin;
use std::sync::{Arc, Weak};

use crate::broker::Handler;
use crate::hub::{Event, Hub, PresentUser};
use crate::model::{Conversation, Message, RoomKey};
use crate::store::notifications::Notification;

/// What other nodes publish that is not for a room's members: changes of hand-off state
/// (so that caches of room states stay right) and the agents' inbox feed. Implemented by
/// the hand-off service.
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// A room's hand-off state changed on another node.
    fn conversation_changed(&self, conversation: Arc<Conversation>);

    /// An inbox event (`Event::InboxUpdate`, `Event::NoteAdded`) for the domain's agents
    /// on this node.
    fn to_agents(&self, domain: &str, event: Event);
}

/// Takes notifications other nodes stored to their users' subscribers here (implemented by
/// the notifications service).
pub trait NotificationListener: Send + Sync + std::fmt::Debug {
    /// A notification another node stored.
    fn notification(&self, notification: Arc<Notification>);
}

/// Rebuilds this node's live domain table when another node changed the domains in the
/// store (implemented by the domain service).
pub trait DomainListener: Send + Sync + std::fmt::Debug {
    /// The stored domains may have changed: rebuild the table from the store.
    fn domains_changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The node as its broker sees it.
///
/// The hub is held strongly (every message goes through it); the services weakly, since
/// they hold the broker, which holds this.
#[derive(Debug)]
pub struct Events {
    hub: Arc<Hub>,
    /// The hand-off service, for state changes and the agents' feed from other nodes.
    remote: Option<Weak<dyn Remote>>,
    /// The domain service, for changes of the stored domains made on other nodes.
    domains: Option<Weak<dyn DomainListener>>,
    /// The notifications service, for notifications stored on other nodes.
    notifications: Option<Weak<dyn NotificationListener>>,
}

impl Events {
    /// The handler of a node made of `hub` alone (no services: state changes, the agents'
    /// feed and domain changes from other nodes go nowhere).
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            remote: None,
            domains: None,
            notifications: None,
        }
    }

    /// Hands notifications stored on other nodes to `notifications`.
    #[must_use]
    pub fn with_notifications(
        mut self,
        notifications: &Arc<impl NotificationListener + 'static>,
    ) -> Self {
        let listener: Arc<dyn NotificationListener> =
            Arc::clone(notifications) as Arc<dyn NotificationListener>;
        self.notifications = Some(Arc::downgrade(&listener));
        self
    }

    /// Hands state changes and the agents' feed from other nodes to `remote`.
    #[must_use]
    pub fn with_remote(mut self, remote: &Arc<impl Remote + 'static>) -> Self {
        let remote: Arc<dyn Remote> = Arc::clone(remote) as Arc<dyn Remote>;
        self.remote = Some(Arc::downgrade(&remote));
        self
    }

    /// Hands domain changes made on other nodes to `domains`.
    #[must_use]
    pub fn with_domains(mut self, domains: &Arc<impl DomainListener + 'static>) -> Self {
        let domains: Arc<dyn DomainListener> = Arc::clone(domains) as Arc<dyn DomainListener>;
        self.domains = Some(Arc::downgrade(&domains));
        self
    }

    fn remote(&self) -> Option<Arc<dyn Remote>> {
        self.remote.as_ref().and_then(Weak::upgrade)
    }
}

impl Handler for Events {
    fn message(&self, message: Arc<Message>) {
        self.hub.deliver(message);
    }

    fn room_event(&self, event: Event) {
        match event {
            // Brokers hand stored messages to `message`; the same if one comes this way.
            Event::Message(message) => self.hub.deliver(message),
            Event::Presence {
                room,
                user,
                joined: false,
            } => {
                // Not if the user is present here (checked under the room lock), or leaving
                // here too (then this node's own leave tells).
                self.hub.announce_leave(&room, user);
            }
            Event::Presence { room, user, .. } if self.hub.is_present(&room, &user.user_id) => {
                // Someone present here too was announced already.
            }
            Event::RoomStatus { conversation, seq } => {
                if let Some(remote) = self.remote() {
                    remote.conversation_changed(Arc::clone(&conversation));
                }
                let room = conversation.room.clone();
                self.hub
                    .broadcast_local(&room, Event::RoomStatus { conversation, seq }, None);
            }
            Event::InboxUpdate(_) | Event::NoteAdded(_) => {
                if let Some(domain) = event.room().map(|r| Arc::clone(&r.domain_id)) {
                    self.agent_event(&domain, event);
                }
            }
            Event::Notification(notification) => self.notification(notification),
            Event::Frame(_) => {}
            event => {
                if let Some(room) = event.room().cloned() {
                    self.hub.broadcast_local(&room, event, None);
                }
            }
        }
    }

    fn agent_event(&self, domain: &str, event: Event) {
        if let Some(remote) = self.remote() {
            remote.to_agents(domain, event);
        }
    }

    fn notification(&self, notification: Arc<Notification>) {
        if let Some(listener) = self.notifications.as_ref().and_then(Weak::upgrade) {
            listener.notification(notification);
        }
    }

    fn domains_changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let listener = self.domains.as_ref().and_then(Weak::upgrade);
        Box::pin(async move {
            if let Some(listener) = listener {
                listener.domains_changed().await;
            }
        })
    }

    fn resync(&self) {
        self.hub.resync();
    }

    fn local_presence(&self) -> Vec<(RoomKey, Vec<PresentUser>)> {
        self.hub.local_presence()
    }

    fn is_present(&self, room: &RoomKey, user_id: &str) -> bool {
        self.hub.is_present(room, user_id)
    }

    fn leave_settled(&self, room: &RoomKey, user: PresentUser, gone: bool) {
        self.hub.settle_leave(room, user, gone);
    }

    fn channel_change(&self, change: crate::broker::ChannelChange) {
        self.hub.channel_change(change);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use parking_lot::Mutex;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::hub::{ConnHandle, Receiver, Replay};
    use crate::metrics::Metrics;
    use crate::model::{Agent, Author, Identity, NewMessage, Note, Role};
    use crate::node::Supervisor;
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;

    /// Records what reaches the hand-off service.
    #[derive(Debug, Default)]
    struct Handoff {
        changed: Mutex<Vec<RoomKey>>,
        to_agents: Mutex<Vec<(String, String)>>,
    }

    impl Remote for Handoff {
        fn conversation_changed(&self, conversation: Arc<Conversation>) {
            self.changed.lock().push(conversation.room.clone());
        }

        fn to_agents(&self, domain: &str, event: Event) {
            let kind = match event {
                Event::InboxUpdate(_) => "inbox",
                Event::NoteAdded(_) => "note",
                _ => "other",
            };
            self.to_agents
                .lock()
                .push((domain.to_owned(), kind.to_owned()));
        }
    }

    /// Counts rebuilds of the domain table.
    #[derive(Debug, Default)]
    struct DomainTable {
        rebuilds: AtomicUsize,
    }

    impl DomainListener for DomainTable {
        fn domains_changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async move {
                self.rebuilds.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    /// A node of one hub (on a fresh SQLite store) and its handler.
    struct Node {
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        events: Events,
        handoff: Arc<Handoff>,
        domains: Arc<DomainTable>,
        _dir: tempfile::TempDir,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (sink, _) = mpsc::unbounded_channel::<Arc<Message>>();
        let path = dir.path().join("parlor.db");
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&path, &crate::config::StoreConfig::default(), sink).unwrap(),
        );
        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
        let hub = Hub::new(
            Arc::clone(&store),
            metrics,
            16,
            16,
            &MemoryBroker::new(),
            &supervisor,
        );
        let handoff = Arc::new(Handoff::default());
        let domains = Arc::new(DomainTable::default());
        let events = Events::new(Arc::clone(&hub))
            .with_remote(&handoff)
            .with_domains(&domains);
        Node {
            store,
            hub,
            events,
            handoff,
            domains,
            _dir: dir,
        }
    }

    fn user(id: &str) -> PresentUser {
        PresentUser {
            user_id: id.to_owned(),
            name: id.to_uppercase(),
            role: Role::Visitor,
            info: None,
        }
    }

    /// `user_id`'s connection, joined to `room` with nothing to catch up on.
    async fn member(
        hub: &Arc<Hub>,
        room: &RoomKey,
        id: u64,
        user_id: &str,
    ) -> (ConnHandle, Receiver) {
        let identity = Identity {
            user_id: user_id.to_owned(),
            name: user_id.to_uppercase(),
            role: Role::Visitor,
            domain_id: Arc::clone(&room.domain_id),
            anonymous: false,
            room: None,
            label: None,
        };
        let (conn, rx) = ConnHandle::new(id, Arc::new(identity), 64);
        hub.join(room, &conn, Replay::Last(0), 10).await.unwrap();
        (conn, rx)
    }

    fn kinds(rx: &mut Receiver) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(envelope) = rx.try_recv() {
            out.push(match &envelope.event {
                Event::Message(m) => format!("message {}", m.seq),
                Event::Presence { user, joined, .. } => {
                    format!("presence {} {joined}", user.user_id)
                }
                Event::Typing { user, .. } => format!("typing {}", user.user_id),
                Event::RoomStatus { seq, .. } => format!("status {seq}"),
                other => format!("{other:?}"),
            });
        }
        out
    }

    fn new_message(room: &RoomKey, content: &str) -> NewMessage {
        NewMessage {
            room: room.clone(),
            author: Author {
                user_id: "bob".into(),
                name: "Bob".into(),
                role: "visitor".into(),
            },
            kind: "text".into(),
            content: content.into(),
            data: None,
            client_message_id: None,
        }
    }

    /// Each broker delivery reaches the part of the node it is for, and nothing else.
    #[tokio::test]
    async fn each_delivery_reaches_its_part_of_the_node() {
        let n = node();
        let room = RoomKey::new("shop", "r1");
        let (_ann, mut rx) = member(&n.hub, &room, 1, "ann").await;

        // A committed message: the hub, to the room's members.
        let stored = n.store.append(new_message(&room, "hi")).await.unwrap();
        n.events.message(Arc::clone(&stored.message));
        assert_eq!(kinds(&mut rx), ["message 1"]);

        // Another node's room events: this node's members.
        n.events.room_event(Event::Typing {
            room: room.clone(),
            user: user("bob"),
            typing: true,
        });
        n.events.room_event(Event::Presence {
            room: room.clone(),
            user: user("bob"),
            joined: true,
        });
        // Ann is present here: her arrival elsewhere was announced when she came here, and
        // she has not gone.
        n.events.room_event(Event::Presence {
            room: room.clone(),
            user: user("ann"),
            joined: true,
        });
        n.events.room_event(Event::Presence {
            room: room.clone(),
            user: user("ann"),
            joined: false,
        });
        n.events.room_event(Event::Presence {
            room: room.clone(),
            user: user("bob"),
            joined: false,
        });
        assert_eq!(
            kinds(&mut rx),
            ["typing bob", "presence bob true", "presence bob false"]
        );
        assert!(n.handoff.changed.lock().is_empty());

        // A hand-off change: the hand-off service's cache, then the members.
        let conversation = Arc::new(Conversation::new(room.clone()));
        n.events.room_event(Event::RoomStatus {
            conversation,
            seq: 2,
        });
        assert_eq!(*n.handoff.changed.lock(), std::slice::from_ref(&room));
        assert_eq!(kinds(&mut rx), ["status 2"]);

        // The agents' feed: the hand-off service only, under the event's domain.
        let note = Arc::new(Note {
            id: "n1".to_owned(),
            room: room.clone(),
            author: Agent {
                user_id: "alice".to_owned(),
                name: "Alice".to_owned(),
            },
            text: "VIP".to_owned(),
            created_at: chrono::Utc::now(),
        });
        n.events
            .agent_event("shop", Event::NoteAdded(Arc::clone(&note)));
        n.events.room_event(Event::NoteAdded(note));
        assert_eq!(
            *n.handoff.to_agents.lock(),
            [
                ("shop".to_owned(), "note".to_owned()),
                ("shop".to_owned(), "note".to_owned())
            ]
        );
        assert!(kinds(&mut rx).is_empty());

        // Domain changes: the domain service.
        n.events.domains_changed().await;
        n.events.domains_changed().await;
        assert_eq!(n.domains.rebuilds.load(Ordering::SeqCst), 2);

        // What networked presence asks of the node: the hub's local users.
        assert!(n.events.is_present(&room, "ann"));
        assert!(!n.events.is_present(&room, "bob"));
        assert_eq!(
            n.events.local_presence(),
            [(room.clone(), vec![user("ann")])]
        );
    }

    /// "You may have missed something": the hub catches its rooms up from the store.
    #[tokio::test]
    async fn resync_catches_the_rooms_up_from_the_store() {
        let n = node();
        let room = RoomKey::new("shop", "r2");
        let (_ann, mut rx) = member(&n.hub, &room, 1, "ann").await;
        // Committed, but its publication never arrived.
        n.store.append(new_message(&room, "lost")).await.unwrap();
        n.events.resync();
        let envelope = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("caught up in time")
            .unwrap();
        assert!(matches!(&envelope.event, Event::Message(m) if m.seq == 1));
    }

    /// The services are held weakly (they hold the broker, which holds the handler): once
    /// they are gone, their deliveries go nowhere.
    #[tokio::test]
    async fn deliveries_for_services_that_are_gone_go_nowhere() {
        let n = node();
        let Node {
            events,
            handoff,
            domains,
            ..
        } = n;
        let watched = Arc::downgrade(&handoff);
        drop(handoff);
        drop(domains);
        assert!(watched.upgrade().is_none());
        events.room_event(Event::RoomStatus {
            conversation: Arc::new(Conversation::new(RoomKey::new("shop", "r3"))),
            seq: 1,
        });
        events.domains_changed().await;
    }
}

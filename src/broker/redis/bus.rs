//! The bus: what one node publishes on `{prefix}:bus` and how the others take it in.
//!
//! A [`Publication`] is a JSON object naming the publishing node and carrying one [`Bus`]
//! item: a room event exactly as the hub has it ([`Event`], stored messages included), or
//! a note that the stored domains changed. Publications wait for the publisher task in the
//! [`Outbox`], a queue of [`OUTBOX_CAPACITY`]: while Redis is away it fills up, and what does
//! not fit is dropped and counted (live delivery is at most once; the store closes gaps).
//! The publisher sends them in order, many per round trip.
//!
//! Taking in: a node skips its own publications (it delivered them locally already),
//! known by their first bytes ([`own_prefix`]), and hands the rest to its [`Handler`]
//! ([`deliver`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Handler, Relay};
use crate::event::Event;

/// Most publications sent in one pipelined round trip.
const PUBLISH_BATCH: usize = 256;

/// Publications waiting for the publisher at most, so that a Redis outage costs a bounded
/// amount of memory; more are dropped while Redis is away.
pub const OUTBOX_CAPACITY: usize = 65_536;

/// Least time between two warnings about dropped work.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

/// How every publication of node `node` begins: serde writes a struct's fields in their
/// order, `node` first, so a node recognises its own publications (a room's every message,
/// back from Redis) by their first bytes and passes over them without parsing.
pub(super) fn own_prefix(node: u64) -> Vec<u8> {
    format!("{{\"node\":{node},").into_bytes()
}

/// What one publication carries. `node` must stay the first field ([`own_prefix`]).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Publication {
    /// The publishing node.
    pub(super) node: u64,
    /// What happened.
    pub(super) event: Bus,
}

/// What travels between nodes: a hub event (stored messages included), as the hub has it,
/// or a note that the stored domains changed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
pub(super) enum Bus {
    /// A room event for the other nodes' hubs (or, for the agents' feed, their hand-off
    /// service).
    Room {
        /// The event.
        event: Event,
    },
    /// The stored domains changed: rebuild the domain table.
    DomainsChanged,
}

impl Bus {
    /// The traveling form of a hub event; `None` for a connection's own frame, which stays
    /// on its node.
    pub(super) fn of(event: &Event) -> Option<Self> {
        (!matches!(event, Event::Frame(_))).then(|| Bus::Room {
            event: event.clone(),
        })
    }
}

/// Hands a room event from another node to this node's handler: a stored message to
/// [`Handler::message`], the agents' feed to [`Handler::agent_event`], a notification to
/// [`Handler::notification`], everything else to [`Handler::room_event`].
pub(super) fn deliver(event: Event, handler: &dyn Handler) {
    match event {
        Event::Message(message) => handler.message(message),
        Event::InboxUpdate(_) | Event::NoteAdded(_) => {
            if let Some(domain) = event.room().map(|r| Arc::clone(&r.domain_id)) {
                handler.agent_event(&domain, event);
            }
        }
        Event::Notification(notification) => handler.notification(notification),
        Event::Frame(_) => {}
        event => handler.room_event(event),
    }
}

/// Counts work dropped from a full queue and warns about it, at most every ten seconds.
#[derive(Debug)]
pub(super) struct Dropped {
    what: &'static str,
    total: AtomicU64,
    /// `parlor_broker_dropped_total` of this kind.
    counter: prometheus_client::metrics::counter::Counter,
    last_warning: parking_lot::Mutex<Option<Instant>>,
}

impl Dropped {
    pub(super) fn new(
        what: &'static str,
        metrics: &crate::metrics::Metrics,
        kind: &'static str,
    ) -> Self {
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

    pub(super) fn record(&self) {
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

/// This node's publications on their way to the publisher task. It is also the hub's
/// [`Relay`]: a room event becomes a publication.
#[derive(Debug)]
pub(super) struct Outbox {
    /// This node's id in publications (random per process).
    node: u64,
    queue: mpsc::Sender<Bytes>,
    /// Publications dropped because the outbox was full.
    dropped: Dropped,
}

impl Outbox {
    /// An outbox of node `node`, and the receiving end for [`publish_loop`].
    pub(super) fn new(
        node: u64,
        metrics: &crate::metrics::Metrics,
    ) -> (Self, mpsc::Receiver<Bytes>) {
        let (queue, queued) = mpsc::channel(OUTBOX_CAPACITY);
        let outbox = Self {
            node,
            queue,
            dropped: Dropped::new("publication", metrics, "publication"),
        };
        (outbox, queued)
    }

    /// This node's id.
    pub(super) fn node(&self) -> u64 {
        self.node
    }

    /// Queues `event` for the other nodes; dropped (and counted) when the outbox is full.
    pub(super) fn send(&self, event: Bus) {
        let publication = Publication {
            node: self.node,
            event,
        };
        match serde_json::to_vec(&publication) {
            Ok(bytes) => {
                if self.queue.try_send(Bytes::from(bytes)).is_err() {
                    self.dropped.record();
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a publication"),
        }
    }

    /// Waits, until `until` at most, for the publisher to take everything queued.
    pub(super) async fn drain(&self, until: Instant) {
        while self.queue.capacity() < self.queue.max_capacity() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Relay for Outbox {
    fn relay(&self, event: &Event) {
        if let Some(bus) = Bus::of(event) {
            self.send(bus);
        }
    }
}

/// Publishes queued publications in order, many per round trip, until `closed`. A batch
/// that fails (Redis down) is dropped: live delivery is at most once, and the store has
/// everything.
pub(super) async fn publish_loop(
    client: fred::clients::Client,
    channel: String,
    mut queued: mpsc::Receiver<Bytes>,
    closed: CancellationToken,
) {
    use fred::prelude::PubsubInterface;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{LeftReason, PresentUser};
    use crate::model::{Agent, Author, Conversation, Message, Note, Role, RoomKey};
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

    /// A node knows its own publications by their first bytes, and only its own.
    #[test]
    fn own_publications_are_known_by_their_prefix() {
        for node in [7_u64, 70, u64::MAX] {
            let bytes = serde_json::to_vec(&Publication {
                node,
                event: Bus::DomainsChanged,
            })
            .unwrap();
            assert!(bytes.starts_with(&own_prefix(node)), "{node}");
            for other in [node / 10, node.wrapping_add(1)] {
                assert!(!bytes.starts_with(&own_prefix(other)), "{node} vs {other}");
            }
        }
        let room = RoomKey::new("shop", "r1");
        let bytes = serde_json::to_vec(&Publication {
            node: 42,
            event: Bus::of(&Event::Message(message(&room))).unwrap(),
        })
        .unwrap();
        assert!(bytes.starts_with(&own_prefix(42)));
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
            info: None,
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

    /// Records which handler method each delivery reached.
    #[derive(Debug, Default)]
    struct Calls(parking_lot::Mutex<Vec<String>>);

    impl Handler for Calls {
        fn message(&self, message: Arc<Message>) {
            self.0.lock().push(format!("message {}", message.seq));
        }
        fn room_event(&self, event: Event) {
            let room = event.room().map(ToString::to_string).unwrap_or_default();
            self.0.lock().push(format!("room {room}"));
        }
        fn agent_event(&self, domain: &str, _event: Event) {
            self.0.lock().push(format!("agents {domain}"));
        }
        fn notification(&self, n: Arc<crate::store::notifications::Notification>) {
            self.0
                .lock()
                .push(format!("user {}/{}", n.domain_id, n.user_id));
        }
        fn domains_changed(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async {})
        }
        fn resync(&self) {}
        fn local_presence(&self) -> Vec<(RoomKey, Vec<PresentUser>)> {
            Vec::new()
        }
        fn is_present(&self, _room: &RoomKey, _user_id: &str) -> bool {
            false
        }
        fn leave_settled(&self, _room: &RoomKey, _user: PresentUser, _gone: bool) {}
        fn channel_change(&self, _change: crate::broker::ChannelChange) {}
    }

    /// What another node published reaches the handler method it is for.
    #[test]
    fn deliveries_reach_the_handler_method_they_are_for() {
        let room = RoomKey::new("shop", "r1");
        let calls = Calls::default();
        deliver(Event::Message(message(&room)), &calls);
        deliver(
            Event::ReadReceipt {
                room: room.clone(),
                user_id: "ann".to_owned(),
                seq: 7,
            },
            &calls,
        );
        deliver(
            Event::NoteAdded(Arc::new(Note {
                id: "n1".to_owned(),
                room,
                author: Agent {
                    user_id: "alice".to_owned(),
                    name: "Alice".to_owned(),
                },
                text: "VIP".to_owned(),
                created_at: chrono::Utc::now(),
            })),
            &calls,
        );
        let notification = crate::store::notifications::Notification {
            id: "x".to_owned(),
            domain_id: "shop".to_owned(),
            user_id: "ann".to_owned(),
            org_id: None,
            task_id: None,
            kind: crate::store::notifications::NotificationType::Info,
            content: "hi".to_owned(),
            data: None,
            read: false,
            created_at: chrono::Utc::now(),
            seq: 1,
        };
        // As it travels: serialized and read back.
        let bus = Bus::of(&Event::Notification(Arc::new(notification))).unwrap();
        let Bus::Room { event } =
            serde_json::from_slice(&serde_json::to_vec(&bus).unwrap()).unwrap()
        else {
            panic!("a room event");
        };
        deliver(event, &calls);
        deliver(Event::Frame(Bytes::from_static(b"{}")), &calls);
        assert_eq!(
            *calls.0.lock(),
            ["message 7", "room shop/r1", "agents shop", "user shop/ann"]
        );
    }
}

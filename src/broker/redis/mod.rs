//! Redis broker: several Parlor nodes share stored messages, room events and presence over
//! Redis.
//!
//! **What travels.** Every node publishes, on one channel (`{prefix}:bus`), the messages its
//! store committed (in commit order, so per room in `seq` order), the room events its hub
//! relays (typing, read receipts, streamed AI deltas, hand-off changes), its presence
//! changes and the agents' feed (`bus.rs`). Every node subscribes to the channel and hands
//! what other nodes published to its registered [`Handler`]; its own publications it has
//! already delivered locally, without the round trip.
//!
//! **Guarantee.** Live delivery is at most once (Redis pub/sub keeps nothing for a node
//! that is not connected, and a full outbox drops). Nothing is lost to clients: the hub
//! checks each message's `seq` and fetches a gap from the shared store before delivering
//! what follows it; after the subscriber reconnects (or its reader falls behind) the node
//! catches every active room up from the store ([`Handler::resync`]); and every
//! `broker_position_check_ms` the hub compares its active rooms with the store, so a room
//! whose last publication was lost, with nothing after it to reveal the gap, is complete
//! within two intervals too (`Hub::check_positions`).
//!
//! **Why one channel.** A channel per room would spare a node the messages of rooms nobody
//! on it has open, but it makes every join wait for a `SUBSCRIBE` round trip and opens a
//! window between loading a room and receiving its messages. With one channel every node
//! sees everything in publication order, which is simple and right for clusters of a few
//! nodes; sharded pub/sub (`SSUBSCRIBE`) only spreads the load on a Redis Cluster, which a
//! single channel cannot use anyway. The channel prefix lets several clusters share a Redis.
//!
//! **Presence across nodes** is kept in Redis sorted sets with a TTL ([`presence`]), and
//! the subscriber counts of Pusher channels in a hash per node with a lease
//! ([`occupancy`]).
//!
//! **Domains.** A change of the stored domains made through the admin API on one node is
//! announced on the bus (`domainsChanged`); the other nodes rebuild their tables from the
//! store ([`Handler::domains_changed`], one rebuild at a time). After the subscriber
//! reconnects, a node rebuilds its own table and announces a change too, so that one
//! announced while Redis was away (by this node or another) is not missed for long.
//!
//! **Bounded queues.** Publications wait for the publisher task in a queue of
//! `OUTBOX_CAPACITY` (`bus.rs`), presence changes for the presence task in one of
//! [`presence::PRESENCE_QUEUE`]. While Redis is away they fill up; what does not fit is
//! dropped and counted, with a warning at most every ten seconds.
//!
//! Reconnection is fred's (`connection.rs`): exponential back-off, and the subscriber
//! re-subscribes by itself after Redis comes back.
//!
//! The parts: this file (the broker, its tasks, start and close), `bus.rs` (the publication
//! format, the outbox and the publisher, delivery to the handler), [`presence`] and
//! `connection.rs` (the clients, TLS, their health).

mod bus;
pub(crate) mod connection;
pub mod occupancy;
pub mod presence;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Broker, Handler, Occupancy, Presence, Relay};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::model::Message;
use crate::node::Supervisor;
use bus::{Bus, Outbox, Publication};
use connection::Link;
use occupancy::RedisOccupancy;
use presence::RedisPresence;

/// How long closing waits for the outbox to empty, and for each connection to close.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Deliveries waiting in the subscriber at most while the node takes them in; a reader
/// that falls further behind loses the oldest and catches up from the store.
const DELIVERY_BUFFER: usize = 16_384;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[error("redis broker: {0}")]
pub struct BrokerError(String);

/// The registered handler: set once by [`Broker::register`], read by the broker's tasks.
type Slot = Arc<OnceLock<Arc<dyn Handler>>>;

/// What the broker's parts need to run their tasks and reach the node.
#[derive(Debug)]
pub(super) struct Context {
    /// This node's handler, once registered.
    handler: Slot,
    /// Runs the broker's tasks.
    supervisor: Supervisor,
    /// Cancelled by [`Broker::close`]: the broker's tasks end.
    closed: CancellationToken,
}

/// The Redis broker of one node.
#[derive(Debug)]
pub struct RedisBroker {
    /// Where deliveries go; the one late binding.
    handler: Slot,
    /// Publications waiting for the publisher task; also the hub's relay.
    outbox: Arc<Outbox>,
    /// The connections and their health.
    link: Arc<Link>,
    /// This node's presence in Redis (held by the hub too).
    presence: Arc<RedisPresence>,
    /// This node's channel counts in Redis (held by the hub too).
    occupancy: Arc<RedisOccupancy>,
    /// Woken when the domain table should be rebuilt from the store.
    domains_dirty: Arc<Notify>,
    /// Cancelled by [`Broker::close`]: the broker's tasks end.
    closed: CancellationToken,
}

impl RedisBroker {
    /// Connects to Redis at `url` and subscribes to `{prefix}:bus`. Deliveries go to the
    /// handler registered later ([`Broker::register`]). Fails when Redis cannot be reached
    /// now; once running, it reconnects by itself.
    pub async fn connect(
        url: &str,
        prefix: &str,
        presence_ttl: Duration,
        metrics: &Metrics,
        supervisor: &Supervisor,
    ) -> Result<Arc<Self>, BrokerError> {
        let (publisher, subscriber) = connection::open_clients(url, Some(DELIVERY_BUFFER))
            .await
            .map_err(BrokerError)?;
        let channel = format!("{prefix}:bus");
        let context = Context {
            handler: Arc::new(OnceLock::new()),
            supervisor: supervisor.clone(),
            closed: CancellationToken::new(),
        };
        let link = Link::start(
            publisher.clone(),
            subscriber.clone(),
            supervisor,
            context.closed.clone(),
        );
        let (outbox, queued) = Outbox::new(connection::rand_node_id(), metrics);
        let outbox = Arc::new(outbox);
        let presence = RedisPresence::start(
            Arc::clone(&link),
            Arc::clone(&outbox),
            prefix,
            presence_ttl,
            metrics,
            &context,
        );
        let occupancy = RedisOccupancy::start(
            Arc::clone(&link),
            Arc::clone(&presence),
            prefix,
            outbox.node(),
            presence_ttl,
            &context,
        );
        let broker = Arc::new(Self {
            handler: Arc::clone(&context.handler),
            outbox: Arc::clone(&outbox),
            link,
            presence,
            occupancy,
            domains_dirty: Arc::new(Notify::new()),
            closed: context.closed.clone(),
        });
        broker.spawn_domain_rebuilds(&context);
        broker.spawn_reconnects(&context);
        let mut messages = subscriber.message_rx();
        subscriber
            .subscribe(channel.clone())
            .await
            .map_err(|e| BrokerError(format!("cannot subscribe to {channel}: {e}")))?;
        let me = outbox.node();
        let own = bus::own_prefix(me);
        let handler = Arc::clone(&context.handler);
        let dirty = Arc::clone(&broker.domains_dirty);
        let stop = context.closed.clone();
        supervisor.spawn("redis-deliveries", async move {
            use tokio::sync::broadcast::error::{RecvError, TryRecvError};
            // One publication from the bus; false once the subscription is closed.
            let take = |received: Result<fred::types::Message, RecvError>| -> bool {
                match received {
                    Ok(message) => {
                        let Some(bytes) = message.value.as_bytes() else {
                            return true;
                        };
                        if bytes.starts_with(&own) {
                            return true;
                        }
                        match serde_json::from_slice::<Publication>(bytes) {
                            Ok(p) if p.node == me => {}
                            Ok(Publication {
                                event: Bus::DomainsChanged,
                                ..
                            }) => dirty.notify_one(),
                            Ok(Publication {
                                event: Bus::Room { event },
                                ..
                            }) => {
                                if let Some(handler) = handler.get() {
                                    bus::deliver(event, &**handler);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "unreadable publication on the bus");
                            }
                        }
                        true
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "fell behind the bus; catching up from the store");
                        if let Some(handler) = handler.get() {
                            handler.resync();
                        }
                        true
                    }
                    Err(RecvError::Closed) => false,
                }
            };
            while let Some(received) = stop.run_until_cancelled(messages.recv()).await {
                // What has arrived meanwhile is delivered in the same round, so that a
                // parked connection's socket is written once for all of it.
                let open = crate::hub::corked(|| {
                    let mut open = take(received);
                    for _ in 1..crate::hub::DELIVERY_ROUND {
                        if !open {
                            break;
                        }
                        match messages.try_recv() {
                            Ok(message) => open = take(Ok(message)),
                            Err(TryRecvError::Lagged(n)) => open = take(Err(RecvError::Lagged(n))),
                            Err(TryRecvError::Closed) => open = false,
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                    open
                });
                if !open {
                    break;
                }
            }
        });
        supervisor.spawn(
            "redis-publisher",
            bus::publish_loop(publisher, channel, queued, context.closed.clone()),
        );
        Ok(broker)
    }

    /// Rebuilds the domain table when told to: one rebuild at a time, announcements during
    /// a rebuild coalescing into one more.
    fn spawn_domain_rebuilds(&self, context: &Context) {
        let dirty = Arc::clone(&self.domains_dirty);
        let handler = Arc::clone(&context.handler);
        let stop = context.closed.clone();
        context.supervisor.spawn("domain-listener", async move {
            while stop.run_until_cancelled(dirty.notified()).await.is_some() {
                if let Some(handler) = handler.get() {
                    handler.domains_changed().await;
                }
            }
        });
    }

    /// Re-subscribes after every reconnect, then has the node catch its active rooms up
    /// from the store, rebuilds the domain table and tells the other nodes to rebuild
    /// theirs (a change announced while this node was away, by it or by another, may be
    /// lost).
    fn spawn_reconnects(&self, context: &Context) {
        let _resubscribe = self.link.subscriber.manage_subscriptions();
        let mut reconnects = self.link.subscriber.reconnect_rx();
        let handler = Arc::clone(&context.handler);
        let outbox = Arc::clone(&self.outbox);
        let dirty = Arc::clone(&self.domains_dirty);
        let stop = context.closed.clone();
        context.supervisor.spawn("redis-reconnects", async move {
            while let Some(Ok(_)) = stop.run_until_cancelled(reconnects.recv()).await {
                tracing::info!("reconnected to Redis; catching rooms up from the store");
                // Give the re-subscription a moment, so nothing published after the
                // catch-up read is missed either.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(handler) = handler.get() {
                    handler.resync();
                }
                dirty.notify_one();
                outbox.send(Bus::DomainsChanged);
            }
        });
    }
}

impl Broker for RedisBroker {
    fn register(&self, handler: Arc<dyn Handler>) {
        let _ = self.handler.set(handler);
    }

    fn publish(&self, message: Arc<Message>) {
        // This node's members get it at once; the others through Redis.
        if let Some(handler) = self.handler.get() {
            handler.message(Arc::clone(&message));
        }
        self.outbox.send(Bus::Room {
            event: Event::Message(message),
        });
    }

    fn relay(&self) -> Arc<dyn Relay> {
        Arc::clone(&self.outbox) as Arc<dyn Relay>
    }

    fn presence(&self) -> Arc<dyn Presence> {
        Arc::clone(&self.presence) as Arc<dyn Presence>
    }

    fn occupancy(&self) -> Arc<dyn Occupancy> {
        Arc::clone(&self.occupancy) as Arc<dyn Occupancy>
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn topology(&self) -> crate::node::Topology {
        crate::node::Topology::Cluster
    }

    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // What the commit pipeline handed over goes out first (the publisher empties
            // the outbox many at a time), then the connections close.
            self.outbox.drain(Instant::now() + CLOSE_FLUSH).await;
            // The channels this node's connections left are written, so the cluster does
            // not wait for the lease to run out to know them vacated.
            let handler = self.handler.get().map(Arc::clone);
            let _ =
                tokio::time::timeout(CLOSE_FLUSH, self.occupancy.flush(handler.as_deref())).await;
            self.closed.cancel();
            let _ = tokio::time::timeout(CLOSE_FLUSH, self.link.subscriber.quit()).await;
            let _ = tokio::time::timeout(CLOSE_FLUSH, self.link.publisher.quit()).await;
        })
    }

    fn may_lose(&self) -> bool {
        true
    }

    fn healthy(&self) -> bool {
        self.link.healthy()
    }

    fn to_agents(&self, _domain: &str, event: &Event) {
        self.outbox.relay(event);
    }

    fn to_user(&self, event: &Event) {
        self.outbox.relay(event);
    }

    fn domains_changed(&self) {
        self.outbox.send(Bus::DomainsChanged);
    }
}

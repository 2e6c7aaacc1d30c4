//! The commit pipeline: how a message leaves the store once it is committed.
//!
//! ```text
//! store writer ──CommitSink──► dispatcher ──► Broker::publish ──► every node's hub
//!                                  │
//!                                  └──► observer workers (per room, in commit order)
//! ```
//!
//! The store's writer hands every committed message to the [`CommitSink`] in commit order.
//! One dispatcher task publishes each to the broker (which hands it to this node's hub and
//! sends it to the others) and passes it to one of [`OBSERVERS`] ordered workers, chosen by
//! room, that run the [`Observer`] (the hand-off service: the inbox, the bot's turn). A
//! room's messages always reach the same worker, so it sees them in order; one room's slow
//! observation (a store write, or a read after another node wrote in the room) does not
//! hold up the other rooms.
//!
//! The writer's own queue is bounded (`store.write_queue`), so senders wait when the store
//! cannot keep up. Every task here runs under the node's [`Supervisor`]: a panic fails the
//! node rather than stopping delivery silently. At shutdown the store's writer exits after
//! its last commit, which closes the sink; the dispatcher then publishes what is left, the
//! workers observe what they were given, and all of them end.
//!
//! [`CommitSink`]: crate::store::CommitSink

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Supervisor;
use crate::broker::Broker;
use crate::model::{Message, RoomKey};

/// Ordered workers observing committed messages (each room always on the same one).
pub const OBSERVERS: usize = 8;

/// Sees every message this node commits, in commit order per room.
pub trait Observer: Send + Sync + 'static {
    /// Called once per committed message.
    fn observe(self: Arc<Self>, message: Arc<Message>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Starts the dispatcher and the observer workers. They end when `committed` closes (the
/// store's writer exits) and everything received is handled; the returned handle is the
/// dispatcher's.
pub fn start(
    supervisor: &Supervisor,
    mut committed: mpsc::UnboundedReceiver<Arc<Message>>,
    broker: Arc<dyn Broker>,
    observer: Arc<dyn Observer>,
) -> tokio::task::JoinHandle<()> {
    let workers: Vec<mpsc::UnboundedSender<Arc<Message>>> =
        std::iter::repeat_n(observer, OBSERVERS)
            .map(|observer| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Arc<Message>>();
                supervisor.spawn("observer", async move {
                    while let Some(message) = rx.recv().await {
                        Arc::clone(&observer).observe(message).await;
                    }
                });
                tx
            })
            .collect();
    supervisor.spawn("dispatcher", async move {
        while let Some(message) = committed.recv().await {
            crate::failpoint::hit("dispatcher");
            if let Some(worker) = workers.get(worker_of(&message.room, workers.len())) {
                let _ = worker.send(Arc::clone(&message));
            }
            broker.publish(message);
        }
    })
}

/// The observer worker of `room`, of `n`.
fn worker_of(room: &RoomKey, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut hasher);
    usize::try_from(hasher.finish() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
}

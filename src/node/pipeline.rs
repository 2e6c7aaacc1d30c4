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
//! cannot keep up. The pipeline is bounded as a whole by its [`Backlog`]: the messages
//! committed and not yet observed. Beyond `store.pipeline_backlog` a client's send waits
//! at the door ([`Backlog::admit`]) for the pipeline to catch up, before it is written.
//! Nothing inside the pipeline ever waits for room: the observer writes too (a reopened
//! room, the bot's offer), and a queue it waits on could wait on it in turn. Every task here runs under the node's [`Supervisor`]: a panic fails the
//! node rather than stopping delivery silently. At shutdown the store's writer exits after
//! its last commit, which closes the sink; the dispatcher then publishes what is left, the
//! workers observe what they were given, and all of them end.
//!
//! [`CommitSink`]: crate::store::CommitSink

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

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

/// The committed messages still on their way through the pipeline (handed to the commit
/// sink and not yet observed), plus the clients' sends admitted and not yet answered, and
/// the senders waiting for it to shrink.
#[derive(Debug)]
pub struct Backlog {
    /// Counted by the store's commit sink, one per committed message.
    entered: Arc<AtomicU64>,
    /// Counted by the observer workers, one per message observed.
    left: AtomicU64,
    /// Clients' sends let in ([`Self::admit`]) whose write has not returned yet.
    admitted: AtomicU64,
    limit: u64,
    /// Senders waiting in [`Self::admit`]: only then does a leaving message wake anybody.
    waiting: AtomicUsize,
    room: Notify,
}

/// A client's send let into the pipeline; dropped once its write has returned (by then
/// the commit sink counts the message).
#[derive(Debug)]
pub struct Admitted(Arc<Backlog>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
        self.0.wake();
    }
}

impl Backlog {
    /// A backlog that holds senders back from `limit` messages on.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            entered: Arc::new(AtomicU64::new(0)),
            left: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            limit: u64::try_from(limit.max(1)).unwrap_or(u64::MAX),
            waiting: AtomicUsize::new(0),
            room: Notify::new(),
        })
    }

    /// The counter the store's commit sink adds each committed message to.
    pub fn entries(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.entered)
    }

    /// Messages committed and not yet observed.
    pub fn len(&self) -> u64 {
        let left = self.left.load(Ordering::SeqCst);
        self.entered.load(Ordering::SeqCst).saturating_sub(left)
    }

    /// Whether no message is on its way.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A message was observed: it has left the pipeline.
    fn leave(&self) {
        self.left.fetch_add(1, Ordering::SeqCst);
        self.wake();
    }

    /// Wakes the waiting senders, if any, when there is room.
    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0
            && self.len() + self.admitted.load(Ordering::SeqCst) < self.limit
        {
            self.room.notify_waiters();
        }
    }

    /// Takes a place for a send if the backlog, with the sends already let in, is below the
    /// limit.
    fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut admitted = self.admitted.load(Ordering::SeqCst);
        loop {
            if self.len() + admitted >= self.limit {
                return None;
            }
            match self.admitted.compare_exchange(
                admitted,
                admitted + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Admitted(Arc::clone(self))),
                Err(now) => admitted = now,
            }
        }
    }

    /// Waits until the send has a place, for at most `within`; `None` when the backlog
    /// stayed full (the caller refuses the send: nothing was written). Keep the place
    /// until the write has returned.
    pub async fn admit(self: &Arc<Self>, within: Duration) -> Option<Admitted> {
        if let Some(place) = self.try_admit() {
            return Some(place);
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the check, so a place freed in between wakes it.
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(place) = self.try_admit() {
                return Some(place);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.try_admit();
            }
        }
    }
}

/// Starts the dispatcher and the observer workers. They end when `committed` closes (the
/// store's writer exits) and everything received is handled; the returned handle is the
/// dispatcher's.
pub fn start(
    supervisor: &Supervisor,
    mut committed: mpsc::UnboundedReceiver<Arc<Message>>,
    broker: Arc<dyn Broker>,
    observer: Arc<dyn Observer>,
    backlog: &Arc<Backlog>,
) -> tokio::task::JoinHandle<()> {
    let workers: Vec<mpsc::UnboundedSender<Arc<Message>>> =
        std::iter::repeat_n(observer, OBSERVERS)
            .map(|observer| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Arc<Message>>();
                let backlog = Arc::clone(backlog);
                supervisor.spawn("observer", async move {
                    while let Some(message) = rx.recv().await {
                        crate::failpoint::pause("observer").await;
                        Arc::clone(&observer).observe(message).await;
                        backlog.leave();
                    }
                });
                tx
            })
            .collect();
    supervisor.spawn("dispatcher", async move {
        let dispatch = |message: Arc<Message>| {
            crate::failpoint::hit("dispatcher");
            if let Some(worker) = workers.get(worker_of(&message.room, workers.len())) {
                let _ = worker.send(Arc::clone(&message));
            }
            broker.publish(message);
        };
        while let Some(message) = committed.recv().await {
            // What was committed meanwhile goes out in the same round, so that a parked
            // connection's socket is written once for all of it (`hub::corked`).
            crate::hub::corked(|| {
                dispatch(message);
                for _ in 1..crate::hub::DELIVERY_ROUND {
                    match committed.try_recv() {
                        Ok(message) => dispatch(message),
                        Err(_) => break,
                    }
                }
            });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_backlog_holds_sends_until_a_message_is_observed() {
        let backlog = Backlog::new(3);
        let committed = backlog.entries();
        // Two committed messages on their way and one send being written fill it.
        committed.fetch_add(2, Ordering::SeqCst);
        let writing = backlog.admit(Duration::ZERO).await.expect("a place");
        assert!(backlog.admit(Duration::from_millis(20)).await.is_none());
        // The write returns and its message is committed: still full.
        committed.fetch_add(1, Ordering::SeqCst);
        drop(writing);
        assert_eq!(backlog.len(), 3);
        assert!(backlog.admit(Duration::from_millis(20)).await.is_none());
        // A waiting send gets in as soon as a message is observed.
        let waiter = {
            let backlog = Arc::clone(&backlog);
            tokio::spawn(async move { backlog.admit(Duration::from_secs(5)).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "the send waits while the backlog is full"
        );
        backlog.leave();
        assert!(waiter.await.unwrap(), "the observed message made room");
        assert_eq!(backlog.len(), 2);
    }

    #[tokio::test]
    async fn concurrent_sends_never_take_more_places_than_the_limit() {
        let backlog = Backlog::new(4);
        let places: Vec<_> = futures_util::future::join_all(
            (0..10).map(|_| backlog.admit(Duration::from_millis(10))),
        )
        .await;
        assert_eq!(places.iter().filter(|p| p.is_some()).count(), 4);
    }
}

//! Group commit, written once for both backends: the bounded queue from the store to its
//! writer, the batches the writer takes from it, and what happens to a batch's callers.
//!
//! - [`Queue`] is the store's end: [`Queue::submit`] queues an operation and waits for its
//!   committed result; [`Queue::enqueue`] returns once it is queued, with the [`Answer`] to
//!   wait on, so a caller can queue its next operation behind it before the first commits. The queue is bounded (`store.write_queue`): when it is full the caller
//!   waits for room, so a database that cannot keep up slows its senders down instead of
//!   growing without limit.
//! - [`Intake`] is the writer's end: it waits for one operation, takes every other one
//!   already waiting (up to `store.max_batch`), runs the writer's failpoint and hands the
//!   writer a [`Commit`].
//! - [`Commit`] says which transactions to run and answers the callers: first the whole batch
//!   in one transaction; if one operation failed it (the transaction was rolled back), each
//!   operation alone, so one bad write cannot fail its neighbours; if the database itself
//!   failed (a [`Failure`] not caused by one operation), every caller left gets that error at
//!   once. After each commit it hands the new messages to the [`CommitSink`] in commit
//!   order, then answers their callers, through the writer's [`Handover`] (on the runtime,
//!   for a writer thread).
//!
//! The backend owns the transaction: it runs the operations [`Commit::ops`] names, in order,
//! in one transaction and reports the outputs or the failure to [`Commit::record`]. SQLite's
//! writer is a thread and PostgreSQL's a task; both drive the same [`Commit`]:
//!
//! ```text
//! while let Some(ops) = commit.ops() {
//!     let result = transaction(&ops);      // the backend's BEGIN … COMMIT or ROLLBACK
//!     commit.record(result, &handover);
//! }
//! ```
//!
//! Depends on [`crate::store`]'s types and [`crate::failpoint`] only.

use std::any::Any;
use std::cmp::Ordering;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::{mpsc, oneshot};

use super::{Appended, CommitSink, StoreError, Transitioned};
use crate::model::{Conversation, Message, Note, Room};

/// What a write produced, on either backend.
pub(crate) enum Output {
    /// An append (or a duplicate found instead).
    Appended(Appended),
    /// A room, created if it was missing.
    Room(Room),
    /// A read position as stored.
    Seq(u64),
    /// A write with nothing to report.
    Unit,
    /// Rows changed.
    Count(u64),
    /// A hand-off transition.
    Transitioned(Transitioned),
    /// A conversation, if the write changed one.
    Conversation(Option<Conversation>),
    /// A stored note.
    Note(Note),
    /// The value of a write given to the writer as a closure (SQLite's `Accounts` and
    /// `Guided` writes); the caller knows its type.
    Any(Box<dyn Any + Send>),
}

impl Output {
    /// The new message this output carries, if any, for the commit sink.
    fn committed(&self) -> Option<&Arc<Message>> {
        let appended = match self {
            Output::Appended(a) => Some(a),
            Output::Transitioned(t) => t.message.as_ref(),
            _ => None,
        }?;
        (!appended.duplicate).then_some(&appended.message)
    }
}

/// A queued write and where its result goes.
#[derive(Debug)]
pub(crate) struct Pending<Op> {
    /// The backend's operation.
    pub(crate) op: Op,
    /// The caller, waiting in [`Queue::submit`].
    reply: oneshot::Sender<Result<Output, StoreError>>,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Output::Appended(_) => "Appended",
            Output::Room(_) => "Room",
            Output::Seq(_) => "Seq",
            Output::Unit => "Unit",
            Output::Count(_) => "Count",
            Output::Transitioned(_) => "Transitioned",
            Output::Conversation(_) => "Conversation",
            Output::Note(_) => "Note",
            Output::Any(_) => "Any",
        })
    }
}

/// Why a transaction failed, and whether running its operations one by one can help.
#[derive(Debug)]
pub(crate) struct Failure {
    /// What every caller it concerns is told.
    pub(crate) error: StoreError,
    /// True when one statement (one operation) failed; false when the database could not
    /// be reached, which no retry inside this batch would change.
    pub(crate) per_op: bool,
}

impl Failure {
    /// One operation failed.
    pub(crate) fn op(error: StoreError) -> Self {
        Self {
            error,
            per_op: true,
        }
    }

    /// The database failed, whatever the operations.
    pub(crate) fn database(error: StoreError) -> Self {
        Self {
            error,
            per_op: false,
        }
    }
}

/// The store's end of the queue to its writer.
pub(crate) struct Queue<Op> {
    /// `None` once closed: the writer then drains what is queued and stops.
    sender: Mutex<Option<mpsc::Sender<Pending<Op>>>>,
    /// Longest wait for room in a full queue, and the error given after it; `None`: wait as
    /// long as it takes.
    full_wait: Option<(Duration, fn() -> StoreError)>,
    /// Wakes a writer thread that sleeps.
    bell: Arc<Bell>,
}

impl<Op> std::fmt::Debug for Queue<Op> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

impl<Op> Queue<Op> {
    /// A queue of `capacity` operations (at least one), and the writer's end of it.
    pub(crate) fn new(
        capacity: usize,
        max_batch: usize,
        failpoint: &'static str,
    ) -> (Self, Intake<Op>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let bell = Arc::new(Bell::default());
        let queue = Self {
            sender: Mutex::new(Some(tx)),
            full_wait: None,
            bell: Arc::clone(&bell),
        };
        let intake = Intake {
            rx,
            max_batch: max_batch.max(1),
            failpoint,
            bell,
        };
        (queue, intake)
    }

    /// The same queue, failing a write with `error()` when it waited `wait` for room.
    pub(crate) fn with_full_wait(mut self, wait: Duration, error: fn() -> StoreError) -> Self {
        self.full_wait = Some((wait, error));
        self
    }

    /// Queues `op` and waits for its committed result, which `pick` takes out of the
    /// [`Output`] (`None`: not the output this operation makes).
    pub(crate) async fn submit<T>(
        &self,
        op: Op,
        pick: fn(Output) -> Option<T>,
    ) -> Result<T, StoreError> {
        self.enqueue(op, pick).await?.await
    }

    /// Queues `op` behind every operation queued before it and returns once it is queued
    /// (waiting for room in a full queue); the [`Answer`] resolves when it is committed.
    pub(crate) async fn enqueue<T>(
        &self,
        op: Op,
        pick: fn(Output) -> Option<T>,
    ) -> Result<Answer<T>, StoreError> {
        let (reply, answer) = oneshot::channel();
        // Rings for the writer once this returns, with the queue's sender dropped: a writer
        // asleep on its bell then finds the operation, or finds the queue closed.
        let _ring = Ring(&self.bell);
        let sender = self.sender.lock().clone().ok_or(StoreError::Closed)?;
        let send = sender.send(Pending { op, reply });
        let sent = match self.full_wait {
            None => send.await,
            Some((wait, error)) => match tokio::time::timeout(wait, send).await {
                Ok(sent) => sent,
                Err(_) => return Err(error()),
            },
        };
        sent.map_err(|_| StoreError::Closed)?;
        Ok(Answer { answer, pick })
    }

    /// Writes queued and not yet taken by the writer.
    pub(crate) fn queued(&self) -> usize {
        self.sender
            .lock()
            .as_ref()
            .map_or(0, |s| s.max_capacity() - s.capacity())
    }

    /// Whether writes are still accepted and the writer is still there to take them.
    pub(crate) fn is_open(&self) -> bool {
        self.sender.lock().as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Accepts no more writes; the writer commits what is queued, then stops.
    pub(crate) fn close(&self) {
        drop(self.sender.lock().take());
        self.bell.ring();
    }
}

/// How a writer on a thread of its own ([`Intake::blocking_next`]) is woken: not by each
/// operation queued, but once the runtime has run the tasks that are ready.
///
/// On a busy core, a writer thread woken at every queued operation preempts the runtime
/// there and then, and commits that one operation alone: the group commit never groups.
/// Instead, the first operation queued while the writer sleeps spawns a task that yields
/// once (Tokio runs a yielded task after the other ready ones and a look at the sockets)
/// and then rings. By then the connections that had frames to read have queued theirs,
/// and they share one commit. A writer that is busy is never rung: it takes what was queued
/// meanwhile when it is done.
#[derive(Debug, Default)]
struct Bell {
    state: Mutex<BellState>,
    woken: Condvar,
}

#[derive(Debug, Default)]
struct BellState {
    /// The writer found the queue empty and waits on the bell.
    asleep: bool,
    /// A ring is on its way.
    ringing: bool,
}

impl Bell {
    /// An operation was queued (or the queue closed): wakes the writer if it sleeps, after
    /// the runtime's ready tasks when called on a runtime, at once otherwise.
    fn queued(self: &Arc<Self>) {
        let mut state = self.state.lock();
        if !state.asleep || state.ringing {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            drop(state);
            return self.ring();
        };
        state.ringing = true;
        drop(state);
        // Rings when the task ends, or when it is dropped unrun (its runtime shutting down).
        let ringer = Ringer(Arc::clone(self));
        runtime.spawn(async move {
            tokio::task::yield_now().await;
            drop(ringer);
        });
    }

    /// Wakes the writer now.
    fn ring(&self) {
        self.state.lock().ringing = false;
        self.woken.notify_one();
    }
}

/// Tells the [`Bell`] an operation was queued, when dropped.
struct Ring<'a>(&'a Arc<Bell>);

impl Drop for Ring<'_> {
    fn drop(&mut self) {
        self.0.queued();
    }
}

/// Rings the [`Bell`] when dropped.
struct Ringer(Arc<Bell>);

impl Drop for Ringer {
    fn drop(&mut self) {
        self.0.ring();
    }
}

/// A queued operation's result, once it is committed (see [`Queue::enqueue`]).
#[must_use = "the operation is queued either way; the answer says whether it was committed"]
pub struct Answer<T> {
    answer: oneshot::Receiver<Result<Output, StoreError>>,
    pick: fn(Output) -> Option<T>,
}

impl<T> std::fmt::Debug for Answer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer").finish_non_exhaustive()
    }
}

impl<T> Future for Answer<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let output = match Pin::new(&mut self.answer).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => Err(StoreError::Closed),
            Poll::Ready(Ok(result)) => result,
        };
        Poll::Ready(output.and_then(|o| {
            (self.pick)(o).ok_or_else(|| StoreError::Corrupt("internal result mismatch".into()))
        }))
    }
}

/// The writer's end of the queue.
#[derive(Debug)]
pub(crate) struct Intake<Op> {
    rx: mpsc::Receiver<Pending<Op>>,
    /// Most operations in one transaction (`store.max_batch`).
    max_batch: usize,
    /// The failpoint run before each batch (`sqlite-writer`, `postgres-writer`).
    failpoint: &'static str,
    /// What [`Self::blocking_next`] sleeps on.
    bell: Arc<Bell>,
}

impl<Op> Intake<Op> {
    /// The next batch, waiting on this thread for its first operation and for the
    /// [`Bell`]; `None` once the queue is closed and empty. For a writer on a thread of its
    /// own.
    pub(crate) fn blocking_next(&mut self) -> Option<Commit<Op>> {
        if let Ok(first) = self.rx.try_recv() {
            return Some(self.gather(first));
        }
        let bell = Arc::clone(&self.bell);
        let mut state = bell.state.lock();
        state.asleep = true;
        // Looked at under the lock: an operation queued after this look finds the writer
        // asleep and rings.
        loop {
            match self.rx.try_recv() {
                Ok(first) => {
                    state.asleep = false;
                    drop(state);
                    return Some(self.gather(first));
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => bell.woken.wait(&mut state),
            }
        }
    }

    /// The next batch; `None` once the queue is closed and empty.
    pub(crate) async fn next(&mut self) -> Option<Commit<Op>> {
        let first = self.rx.recv().await?;
        Some(self.gather(first))
    }

    /// `first` and whatever else is waiting, up to `max_batch` operations.
    fn gather(&mut self, first: Pending<Op>) -> Commit<Op> {
        let mut batch = VecDeque::with_capacity(self.max_batch.min(64));
        batch.push_back(first);
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(pending) => batch.push_back(pending),
                Err(_) => break,
            }
        }
        crate::failpoint::hit(self.failpoint);
        Commit {
            waiting: batch,
            alone: false,
        }
    }
}

/// One batch on its way into the database (see the module documentation).
#[derive(Debug)]
pub(crate) struct Commit<Op> {
    /// Operations whose callers are not answered yet, in commit order.
    waiting: VecDeque<Pending<Op>>,
    /// The whole batch failed because of one operation: each runs alone from then on.
    alone: bool,
}

impl<Op> Commit<Op> {
    /// Puts the batch in the order `cmp` gives (a stable sort: equal operations keep their
    /// arrival order). Only before the first transaction.
    pub(crate) fn sort_by(&mut self, cmp: impl Fn(&Op, &Op) -> Ordering) {
        self.waiting
            .make_contiguous()
            .sort_by(|a, b| cmp(&a.op, &b.op));
    }

    /// Operations whose callers are not answered yet.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.len()
    }

    /// The operations of the next transaction to run, in order; `None` once every caller
    /// is answered.
    pub(crate) fn ops(&self) -> Option<Vec<&Op>> {
        let take = if self.alone { 1 } else { self.waiting.len() };
        let ops: Vec<&Op> = self.waiting.iter().take(take).map(|p| &p.op).collect();
        (!ops.is_empty()).then_some(ops)
    }

    /// Takes the result of the transaction [`Commit::ops`] named: on success hands its new
    /// messages to the sink and answers its callers (through `handover`); on failure decides
    /// what runs next.
    pub(crate) fn record(&mut self, result: Result<Vec<Output>, Failure>, handover: &Handover) {
        let ran = if self.alone { 1 } else { self.waiting.len() };
        let answered = match result {
            Ok(outputs) => {
                let messages = outputs
                    .iter()
                    .filter_map(Output::committed)
                    .map(Arc::clone)
                    .collect();
                let mut outputs = outputs.into_iter();
                // The backend returns one output per operation; a missing one would be a
                // bug, which the caller hears of rather than getting a wrong answer.
                let answers = self
                    .waiting
                    .drain(..ran)
                    .map(|pending| {
                        let output = outputs
                            .next()
                            .ok_or_else(|| StoreError::Corrupt("internal result mismatch".into()));
                        (pending.reply, output)
                    })
                    .collect();
                Finished { messages, answers }
            }
            Err(failure) if failure.per_op && self.alone => {
                Finished::failed(self.waiting.pop_front().into_iter(), &failure.error)
            }
            Err(failure) if failure.per_op && ran > 1 => {
                tracing::warn!(error = %failure.error, size = ran, "batch failed; retrying one by one");
                self.alone = true;
                return;
            }
            Err(failure) => {
                tracing::warn!(error = %failure.error, size = self.waiting.len(), "store write failed");
                Finished::failed(self.waiting.drain(..), &failure.error)
            }
        };
        handover.hand(answered);
    }
}

/// Where a caller's result goes.
type Reply = oneshot::Sender<Result<Output, StoreError>>;

/// What one transaction leaves to hand over: its new messages, in commit order, and its
/// callers' results.
struct Finished {
    messages: Vec<Arc<Message>>,
    answers: Vec<(Reply, Result<Output, StoreError>)>,
}

impl Finished {
    /// `pending`'s callers, all told `error`.
    fn failed<Op>(pending: impl Iterator<Item = Pending<Op>>, error: &StoreError) -> Self {
        Self {
            messages: Vec::new(),
            answers: pending.map(|p| (p.reply, Err(error.clone()))).collect(),
        }
    }

    /// Hands the messages to `sink`, then answers the callers: a message is on its way to
    /// the hub before its sender hears it is stored.
    fn deliver(self, sink: &CommitSink) {
        for message in self.messages {
            // The receiver lives as long as the server; if it is gone we are shutting down.
            sink.send(message);
        }
        for (reply, result) in self.answers {
            // A caller that stopped waiting (its request was cancelled) needs no answer.
            let _ = reply.send(result);
        }
    }
}

/// How a writer hands its finished transactions over: to the [`CommitSink`] and to the
/// callers waiting on [`Answer`]s.
///
/// A writer task ([`Handover::inline`]) does it itself. A writer thread
/// ([`Handover::through_runtime`]) passes each transaction's results to one task on the
/// runtime, which does it there. Every message handed over and every answer wakes a task;
/// a task woken from another thread wakes a parked runtime thread with a system call, which
/// on a busy core preempts the writer at once, so a writer thread handing over message by
/// message would take turns with the runtime on the core every few messages. Through the
/// task, a transaction costs the writer one wake-up at most, and the tasks it wakes are
/// woken on the runtime's own thread.
#[derive(Debug)]
pub(crate) struct Handover {
    sink: CommitSink,
    /// To the task that hands over on the runtime; `None` for a writer that does it itself.
    task: Option<mpsc::UnboundedSender<Finished>>,
}

impl Handover {
    /// For a writer running on the runtime: it hands over itself.
    pub(crate) fn inline(sink: CommitSink) -> Self {
        Self { sink, task: None }
    }

    /// For a writer on a thread of its own: a task spawned on the current runtime hands
    /// over, in commit order. Without a runtime (a store opened outside one) the writer
    /// does it itself. The task ends once the writer has dropped this and everything given
    /// to it is handed over; its copy of the sink goes with it, so the sink still closes
    /// only after the last message.
    pub(crate) fn through_runtime(sink: CommitSink) -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Self::inline(sink);
        };
        // Unbounded, yet never longer than the callers waiting for an answer: each entry is
        // a transaction whose callers are all still waiting, and a client's sends wait for
        // a place in the pipeline's backlog (`store.pipeline_backlog`) before they queue.
        let (task, mut finished) = mpsc::unbounded_channel::<Finished>();
        let task_sink = sink.clone();
        runtime.spawn(async move {
            while let Some(transaction) = finished.recv().await {
                transaction.deliver(&task_sink);
            }
        });
        Self {
            sink,
            task: Some(task),
        }
    }

    fn hand(&self, finished: Finished) {
        match &self.task {
            Some(task) => {
                if let Err(unsent) = task.send(finished) {
                    // The task is gone (its runtime shut down): hand over here.
                    unsent.0.deliver(&self.sink);
                }
            }
            None => finished.deliver(&self.sink),
        }
    }

    /// Reports that the writer `name` panicked (see [`CommitSink::panicked`]).
    pub(crate) fn panicked(&self, name: &'static str, panic: &(dyn Any + Send)) {
        self.sink.panicked(name, panic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RoomKey;

    fn message(seq: u64) -> Arc<Message> {
        Message::sample(RoomKey::new("d", "r"), seq)
    }

    fn appended(seq: u64) -> Output {
        Output::Appended(Appended {
            message: message(seq),
            duplicate: false,
        })
    }

    /// Where a caller waits for its answer.
    type Answer = oneshot::Receiver<Result<Output, StoreError>>;

    /// A batch of `ops` (their numbers), with the channels their callers wait on.
    fn batch(ops: &[u32]) -> (Commit<u32>, Vec<Answer>) {
        let mut answers = Vec::new();
        let waiting = ops
            .iter()
            .map(|&op| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                Pending { op, reply }
            })
            .collect();
        let commit = Commit {
            waiting,
            alone: false,
        };
        (commit, answers)
    }

    /// A handover by the writer itself, and the sink's receiving end.
    fn sink() -> (Handover, mpsc::UnboundedReceiver<Arc<Message>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Handover::inline(CommitSink::new(tx)), rx)
    }

    fn seqs(rx: &mut mpsc::UnboundedReceiver<Arc<Message>>) -> Vec<u64> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| m.seq)
            .collect()
    }

    #[test]
    fn a_batch_that_commits_feeds_the_sink_in_order_then_answers_everyone() {
        let (sink, mut committed) = sink();
        let (mut commit, mut answers) = batch(&[1, 2, 3]);
        assert_eq!(commit.ops(), Some(vec![&1, &2, &3]));
        commit.record(Ok(vec![appended(1), Output::Unit, appended(2)]), &sink);
        assert_eq!(commit.ops(), None);
        assert_eq!(seqs(&mut committed), [1, 2]);
        let got: Vec<String> = answers
            .iter_mut()
            .map(|a| format!("{:?}", a.try_recv().expect("answered")))
            .collect();
        assert_eq!(got, ["Ok(Appended)", "Ok(Unit)", "Ok(Appended)"]);
    }

    #[test]
    fn one_bad_operation_fails_alone_and_its_neighbours_commit() {
        let (sink, mut committed) = sink();
        let (mut commit, mut answers) = batch(&[1, 2, 3]);
        commit.record(Err(Failure::op(StoreError::Invalid("bad".into()))), &sink);
        assert!(answers[0].try_recv().is_err(), "nobody is answered yet");

        assert_eq!(commit.ops(), Some(vec![&1]));
        commit.record(Ok(vec![appended(1)]), &sink);
        assert_eq!(commit.ops(), Some(vec![&2]));
        commit.record(Err(Failure::op(StoreError::Invalid("bad".into()))), &sink);
        assert_eq!(commit.ops(), Some(vec![&3]));
        commit.record(Ok(vec![appended(2)]), &sink);
        assert_eq!(commit.ops(), None);

        assert_eq!(seqs(&mut committed), [1, 2]);
        assert!(matches!(answers[0].try_recv(), Ok(Ok(Output::Appended(_)))));
        assert!(matches!(
            answers[1].try_recv(),
            Ok(Err(StoreError::Invalid(_)))
        ));
        assert!(matches!(answers[2].try_recv(), Ok(Ok(Output::Appended(_)))));
    }

    #[test]
    fn a_database_failure_fails_every_caller_left_at_once() {
        let (sink, mut committed) = sink();
        let (mut commit, mut answers) = batch(&[1, 2, 3]);
        commit.record(Err(Failure::database(StoreError::Closed)), &sink);
        assert_eq!(commit.ops(), None);
        for answer in &mut answers {
            assert!(matches!(answer.try_recv(), Ok(Err(StoreError::Closed))));
        }

        // Also in the middle of the one-by-one retry.
        let (mut commit, mut answers) = batch(&[1, 2, 3]);
        commit.record(Err(Failure::op(StoreError::Invalid("bad".into()))), &sink);
        commit.record(Ok(vec![appended(7)]), &sink);
        commit.record(Err(Failure::database(StoreError::Closed)), &sink);
        assert_eq!(commit.ops(), None);
        assert_eq!(seqs(&mut committed), [7]);
        assert!(matches!(answers[0].try_recv(), Ok(Ok(_))));
        assert!(matches!(answers[1].try_recv(), Ok(Err(StoreError::Closed))));
        assert!(matches!(answers[2].try_recv(), Ok(Err(StoreError::Closed))));
    }

    #[test]
    fn a_single_operation_that_fails_is_not_retried() {
        let (sink, _committed) = sink();
        let (mut commit, mut answers) = batch(&[1]);
        commit.record(Err(Failure::op(StoreError::Invalid("bad".into()))), &sink);
        assert_eq!(commit.ops(), None);
        assert!(matches!(
            answers[0].try_recv(),
            Ok(Err(StoreError::Invalid(_)))
        ));
    }

    #[tokio::test]
    async fn a_writer_thread_hands_over_through_the_runtime_in_commit_order() {
        let (tx, mut committed) = mpsc::unbounded_channel();
        let handover = Handover::through_runtime(CommitSink::new(tx));
        assert!(
            handover.task.is_some(),
            "a runtime was there to hand over on"
        );
        let (mut first, mut first_answers) = batch(&[1, 2]);
        let (mut second, second_answers) = batch(&[3, 4]);
        // The writer thread records two transactions and ends.
        std::thread::spawn(move || {
            first.record(Ok(vec![appended(1), appended(2)]), &handover);
            second.record(Err(Failure::database(StoreError::Closed)), &handover);
        })
        .join()
        .expect("the writer thread");
        // The first caller hears of its message only once it is in the sink, the second
        // caller after the first.
        assert!(matches!(
            (&mut first_answers[0]).await,
            Ok(Ok(Output::Appended(_)))
        ));
        assert_eq!(committed.try_recv().map(|m| m.seq).ok(), Some(1));
        assert!(matches!(
            (&mut first_answers[1]).await,
            Ok(Ok(Output::Appended(_)))
        ));
        assert_eq!(committed.recv().await.map(|m| m.seq), Some(2));
        for answer in second_answers {
            assert!(matches!(answer.await, Ok(Err(StoreError::Closed))));
        }
        // The writer's handover is gone and everything is handed over: the sink closes.
        assert!(committed.recv().await.is_none());
    }

    #[test]
    fn without_a_runtime_the_writer_hands_over_itself() {
        let (tx, mut committed) = mpsc::unbounded_channel();
        let handover = Handover::through_runtime(CommitSink::new(tx));
        assert!(handover.task.is_none());
        let (mut commit, mut answers) = batch(&[1]);
        commit.record(Ok(vec![appended(1)]), &handover);
        assert_eq!(seqs(&mut committed), [1]);
        assert!(matches!(answers[0].try_recv(), Ok(Ok(Output::Appended(_)))));
    }

    #[test]
    fn a_sorted_batch_keeps_arrival_order_among_equals() {
        let (mut commit, _answers) = batch(&[31, 10, 22, 11, 30]);
        commit.sort_by(|a, b| (a / 10).cmp(&(b / 10)));
        assert_eq!(commit.ops(), Some(vec![&10, &11, &22, &31, &30]));
    }

    /// A writer thread like SQLite's: reports the size of each batch, answers every
    /// operation with `Unit`, and ends when the queue is closed.
    fn writer_thread(
        mut intake: Intake<u32>,
    ) -> (
        std::thread::JoinHandle<()>,
        std::sync::mpsc::Receiver<usize>,
    ) {
        let (sizes, batches) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let (sink, _committed) = sink();
            while let Some(mut commit) = intake.blocking_next() {
                let _ = sizes.send(commit.len());
                while let Some(ops) = commit.ops() {
                    let outputs = ops.iter().map(|_| Output::Unit).collect();
                    commit.record(Ok(outputs), &sink);
                }
            }
        });
        (thread, batches)
    }

    fn asleep(queue: &Queue<u32>) -> bool {
        queue.bell.state.lock().asleep
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sleeping_writer_is_rung_once_the_ready_tasks_have_queued_theirs() {
        let (queue, intake) = Queue::<u32>::new(64, 64, "test-writer");
        let queue = Arc::new(queue);
        let (writer, batches) = writer_thread(intake);
        while !asleep(&queue) {
            tokio::task::yield_now().await;
        }
        // Ten tasks, ready together, each queue one operation: one commit takes them all.
        let callers: Vec<_> = (0..10)
            .map(|op| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.submit(op, |o| Some(format!("{o:?}"))).await })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.expect("caller").expect("answer"), "Unit");
        }
        assert_eq!(batches.recv().expect("a batch"), 10);

        // One task queueing one after another without waiting (a connection with several
        // messages in flight): also one commit.
        while !asleep(&queue) {
            tokio::task::yield_now().await;
        }
        let mut answers = Vec::new();
        for op in 0..5 {
            answers.push(queue.enqueue(op, Some).await.expect("queued"));
        }
        for answer in answers {
            assert!(matches!(answer.await, Ok(Output::Unit)));
        }
        assert_eq!(batches.recv().expect("a batch"), 5);

        // Closing the queue wakes the sleeping writer, which ends.
        while !asleep(&queue) {
            tokio::task::yield_now().await;
        }
        queue.close();
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("join")
            .expect("the writer ends");
        assert!(batches.try_recv().is_err());
    }

    #[test]
    fn a_ring_whose_runtime_shuts_down_before_it_runs_still_wakes_the_writer() {
        let (queue, intake) = Queue::<u32>::new(4, 4, "test-writer");
        let (writer, batches) = writer_thread(intake);
        while !asleep(&queue) {
            std::thread::yield_now();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        // Queued on a runtime that ends before its ring task runs.
        let answer = runtime.block_on(queue.enqueue(3, Some)).expect("queued");
        drop(runtime);
        assert_eq!(batches.recv().expect("a batch"), 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert!(matches!(runtime.block_on(answer), Ok(Output::Unit)));
        queue.close();
        writer.join().expect("the writer ends");
    }

    #[tokio::test]
    async fn the_intake_takes_at_most_max_batch_and_the_queue_counts_the_rest() {
        let (queue, mut intake) = Queue::<u32>::new(8, 3, "test-writer");
        let queue = Arc::new(queue);
        let callers: Vec<_> = (0..5)
            .map(|op| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.submit(op, |o| Some(format!("{o:?}"))).await })
            })
            .collect();
        while queue.queued() < 5 {
            tokio::task::yield_now().await;
        }
        let (sink, _committed) = sink();
        let mut first = intake.next().await.expect("a batch");
        assert_eq!(first.len(), 3);
        assert_eq!(queue.queued(), 2);
        while first.ops().is_some() {
            first.record(Ok(vec![Output::Unit, Output::Unit, Output::Unit]), &sink);
        }
        let mut second = intake.next().await.expect("a batch");
        assert_eq!(second.len(), 2);
        second.record(Ok(vec![Output::Unit, Output::Count(1)]), &sink);

        queue.close();
        assert!(intake.next().await.is_none(), "closed and drained");
        assert!(!queue.is_open());
        assert!(matches!(
            queue.submit(9, |_| Some(())).await,
            Err(StoreError::Closed)
        ));
        let mut answers = Vec::new();
        for caller in callers {
            answers.push(caller.await.expect("caller").expect("answered"));
        }
        answers.sort();
        assert_eq!(answers, ["Count", "Unit", "Unit", "Unit", "Unit"]);
    }
}

//! Every task and thread a node starts runs under its [`Supervisor`].
//!
//! Two groups, because shutdown stops them in stages:
//!
//! - **Connections and the work they asked for** ([`Supervisor::spawn_isolated`]): one task
//!   per HTTP connection and WebSocket, and the assistant's replies. A panic in one is a bug
//!   confined to it: the task ends, the client reconnects or asks again, the node counts it
//!   (`parlor_task_panics_total{task="connection"}`, `"ai-reply"`, …) and goes on.
//! - **Workers** ([`Supervisor::spawn`], [`Supervisor::spawn_thread`]): the store's writer,
//!   the commit pipeline, the broker's loops, timers. The node cannot keep its promises
//!   without them, so a panic in one — or a worker reporting that it cannot go on
//!   ([`Supervisor::fail`]) — fails the node: `/health` answers 503 with the reason, the
//!   node shuts down in order (clients are told to reconnect elsewhere) and the process
//!   exits non-zero, for the service manager to restart it. Nothing fails silently.
//!
//! Shutdown waits for the connections first ([`Supervisor::connections`]), then for the
//! workers, which end once what they carry is drained ([`Supervisor::workers`]).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, TaskLabel};

/// The node's tasks and threads, its shutdown token and, once something failed, why.
#[derive(Debug, Clone)]
pub struct Supervisor(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    shutdown: CancellationToken,
    connections: TaskTracker,
    workers: TaskTracker,
    failure: OnceLock<String>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    /// A supervisor whose failures cancel `shutdown`.
    pub fn new(shutdown: CancellationToken, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner {
            shutdown,
            connections: TaskTracker::new(),
            workers: TaskTracker::new(),
            failure: OnceLock::new(),
            metrics,
        }))
    }

    /// Cancelled when the node starts shutting down, for any reason.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    /// Runs a worker: a panic fails the node.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        self.0
            .workers
            .spawn(AssertUnwindSafe(task).catch_unwind().map(move |ended| {
                if let Err(panic) = ended {
                    this.panicked(name, &*panic);
                }
            }))
    }

    /// Runs a worker on an OS thread of its own (named `parlor-{name}`): a panic fails the
    /// node. Shutdown does not wait for threads; their owner joins them.
    pub fn spawn_thread<F>(
        &self,
        name: &'static str,
        work: F,
    ) -> std::io::Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let this = self.clone();
        std::thread::Builder::new()
            .name(format!("parlor-{name}"))
            .spawn(move || {
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(work)) {
                    this.panicked(name, &*panic);
                }
            })
    }

    /// Runs a connection's task, or work one asked for (`name` says which): a panic ends
    /// that task only. Shutdown waits for these before it flushes the store, so what they
    /// write is committed.
    pub fn spawn_isolated<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let metrics = Arc::clone(&self.0.metrics);
        // A combinator, not an `async` block: a block would keep `task` twice in its state
        // (as captured and as awaited), doubling every idle connection's task.
        self.0
            .connections
            .spawn(AssertUnwindSafe(task).catch_unwind().map(move |ended| {
                if let Err(panic) = ended {
                    metrics.task_panics.get_or_create(&TaskLabel { task: name }).inc();
                    tracing::error!(task = name, panic = %panic_text(&*panic), "a task panicked; it is ended");
                }
            }));
    }

    /// Fails the node: it cannot go on because of `reason`. The first reason is kept.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.0.failure.set(reason.clone()).is_ok() {
            tracing::error!(reason = %reason, "the node failed; shutting down");
        }
        self.0.shutdown.cancel();
    }

    /// Why the node failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.0.failure.get().map(String::as_str)
    }

    /// The connections' tasks and the work they asked for.
    pub fn connections(&self) -> &TaskTracker {
        &self.0.connections
    }

    /// The workers' tasks.
    pub fn workers(&self) -> &TaskTracker {
        &self.0.workers
    }

    /// Fails the node because the worker `name` panicked with `panic` (for workers the
    /// supervisor did not start itself, such as the store's writer).
    pub fn panicked(&self, name: &'static str, panic: &(dyn Any + Send)) {
        self.0
            .metrics
            .task_panics
            .get_or_create(&TaskLabel { task: name })
            .inc();
        self.fail(format!("{name} panicked: {}", panic_text(panic)));
    }
}

/// A panic's message, as `panic!` was given it.
fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_worker_panic_fails_the_node_and_cancels_it() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(shutdown.clone(), Arc::new(Metrics::new()));
        supervisor
            .spawn("dispatcher", async { panic!("boom") })
            .await
            .unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(supervisor.failure(), Some("dispatcher panicked: boom"));
    }

    #[tokio::test]
    async fn a_thread_panic_fails_the_node() {
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor::new(shutdown.clone(), Arc::new(Metrics::new()));
        let n = 3;
        supervisor
            .spawn_thread("writer", move || panic!("row {n}"))
            .unwrap()
            .join()
            .unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(supervisor.failure(), Some("writer panicked: row 3"));
    }

    #[tokio::test]
    async fn a_connection_panic_ends_that_connection_only() {
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new(shutdown.clone(), Arc::clone(&metrics));
        supervisor.spawn_isolated("connection", async { panic!("bad frame") });
        supervisor.connections().close();
        supervisor.connections().wait().await;
        assert!(!shutdown.is_cancelled());
        assert_eq!(supervisor.failure(), None);
        assert_eq!(
            metrics
                .task_panics
                .get_or_create(&TaskLabel { task: "connection" })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn the_first_failure_is_kept() {
        let supervisor = Supervisor::new(CancellationToken::new(), Arc::new(Metrics::new()));
        supervisor.fail("the store's writer stopped");
        supervisor.fail("something after");
        assert_eq!(supervisor.failure(), Some("the store's writer stopped"));
    }
}

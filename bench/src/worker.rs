//! Worker processes.
//!
//! One process can hold only about 19,900 sockets (the file-descriptor hard
//! limit is 20,000), so scenarios with many connections re-execute this
//! binary with the hidden `worker` subcommand and split the connections
//! between the copies.
//!
//! The protocol is line based: a worker writes one JSON object per line on
//! stdout (progress and diagnostics go to stderr, which is inherited), and
//! reads commands, one per line, from stdin. End of stdin counts as "stop".

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};

/// A running worker process whose stdout lines decode as `E`.
#[derive(Debug)]
pub struct Worker<E> {
    pub index: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Result<E>>,
    _event: PhantomData<E>,
}

impl<E: DeserializeOwned + Send + 'static> Worker<E> {
    /// Starts `current_exe() worker <args...>`.
    pub fn spawn(index: usize, args: &[String]) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot locate the parlor-bench executable")?;
        let mut child = Command::new(&exe)
            .arg("worker")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker process {}", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker {index} has no stdout pipe"))?;
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        let event = serde_json::from_str::<E>(&line).with_context(|| {
                            format!("worker {index} printed an unexpected line: {line}")
                        });
                        if tx.send(event).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!("reading worker {index} output: {e}")));
                        break;
                    }
                }
            }
        });
        Ok(Self {
            index,
            child,
            stdin,
            lines: rx,
            _event: PhantomData,
        })
    }

    /// The worker's process id (None once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The next event, or an error if the worker exits, misbehaves or says
    /// nothing before `deadline`.
    pub async fn next_event(&mut self, deadline: Instant, what: &str) -> Result<E> {
        match timeout_at(deadline, self.lines.recv()).await {
            Err(_) => bail!("worker {} did not report {what} in time", self.index),
            Ok(None) => {
                let status = timeout(Duration::from_secs(2), self.child.wait()).await;
                bail!(
                    "worker {} exited before reporting {what} (status: {})",
                    self.index,
                    match status {
                        Ok(Ok(s)) => s.to_string(),
                        _ => "unknown".to_owned(),
                    }
                )
            }
            Ok(Some(event)) => event,
        }
    }

    /// Sends one command line to the worker. A worker that has already gone
    /// away is not an error here; its missing report will be.
    pub async fn command(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let mut buf = line.to_owned();
            buf.push('\n');
            let _ = timeout(Duration::from_secs(2), stdin.write_all(buf.as_bytes())).await;
            let _ = timeout(Duration::from_secs(2), stdin.flush()).await;
        }
    }

    /// Closes stdin and waits up to `limit` for the worker to exit, killing
    /// it after that.
    pub async fn finish(mut self, limit: Duration) {
        drop(self.stdin.take());
        if timeout(limit, self.child.wait()).await.is_err() {
            eprintln!(
                "worker {} did not exit within {limit:?}; killing it",
                self.index
            );
            let _ = self.child.kill().await;
        }
    }
}

/// Worker side: writes one event as a JSON line on stdout.
pub fn emit<E: Serialize>(event: &E) -> Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(event).context("cannot encode worker event")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("cannot write to the parent process")?;
    out.flush().context("cannot write to the parent process")
}

/// Worker side: waits for the next command line from the parent. Returns
/// `None` at end of input (the parent closed the pipe or died).
pub async fn next_command(
    lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
) -> Option<String> {
    match lines.next_line().await {
        Ok(Some(line)) => Some(line.trim().to_owned()),
        _ => None,
    }
}

/// Splits `total` items into `parts` shares that differ by at most one.
pub fn split_evenly(total: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// Counts failures by message, keeping at most a handful of distinct
/// messages so a storm of identical errors stays readable.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorTally {
    pub total: u64,
    pub by_message: BTreeMap<String, u64>,
}

impl ErrorTally {
    const MAX_DISTINCT: usize = 10;

    pub fn add(&mut self, message: impl Into<String>) {
        self.total += 1;
        let message = message.into();
        if self.by_message.contains_key(&message) || self.by_message.len() < Self::MAX_DISTINCT {
            *self.by_message.entry(message).or_insert(0) += 1;
        } else {
            *self
                .by_message
                .entry("(other errors)".to_owned())
                .or_insert(0) += 1;
        }
    }

    pub fn merge(&mut self, other: &ErrorTally) {
        for (message, &count) in &other.by_message {
            for _ in 0..count {
                self.add(message.clone());
            }
        }
        // Keep the reported total exact even if `other` had dropped detail.
        let detailed: u64 = other.by_message.values().sum();
        self.total += other.total.saturating_sub(detailed);
    }
}

impl std::fmt::Display for ErrorTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.total == 0 {
            return write!(f, "none");
        }
        let mut first = true;
        for (message, count) in &self.by_message {
            if !first {
                write!(f, "; ")?;
            }
            first = false;
            write!(f, "{count}× {message}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_evenly() {
        assert_eq!(split_evenly(10, 3), vec![4, 3, 3]);
        assert_eq!(split_evenly(19000, 2), vec![9500, 9500]);
        assert_eq!(split_evenly(1, 2), vec![1, 0]);
        assert_eq!(split_evenly(5, 0), vec![5]);
    }

    #[test]
    fn tally_caps_distinct_messages() {
        let mut t = ErrorTally::default();
        for i in 0..20 {
            t.add(format!("e{i}"));
        }
        t.add("e0");
        assert_eq!(t.total, 21);
        assert_eq!(t.by_message.len(), ErrorTally::MAX_DISTINCT + 1);
        let mut u = ErrorTally::default();
        u.merge(&t);
        assert_eq!(u.total, 21);
    }
}

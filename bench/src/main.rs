//! `parlor-bench`: load generator and benchmark harness for the Parlor chat
//! server (and for anything else that speaks the same WebSocket subset, such
//! as the Node.js baselines in `bench/node/`).
//!
//! Scenarios, all against a server on the loopback interface:
//!
//! * `idle` — opens `--conns` WebSocket connections from source addresses
//!   127.0.0.2–127.0.0.9 (so that more than one address's worth of ephemeral
//!   ports is available), each joining one of `--rooms` rooms, spread over
//!   `--procs` worker processes (a process holds at most ~19,900 sockets).
//!   It samples the server's `VmRSS` before connecting and after all joined
//!   plus a settle period: RSS per connection = (after − before) ÷ joined.
//! * `fanout` — `--subs` subscribers and one sender in one room; the sender
//!   sends `--messages` messages (`burst`, or `paced` at `--rate`/s), each
//!   carrying its send time. Reports deliveries/s (deliveries ÷ first send to
//!   last receipt), delivery latency percentiles, the server's CPU-seconds
//!   per million deliveries (utime + stime from `/proc/PID/stat`), and checks
//!   that each subscriber got every message exactly once with increasing
//!   `seq` (missing / duplicate / out-of-order counts).
//! * `persist` — `--senders` connections each send `--messages` messages
//!   with at most `--window` unacknowledged, in their own rooms or one
//!   `--shared-room`; reports acknowledged messages/s and ack latency, then
//!   checks each room's `lastSeq` against the acks counted.
//! * `jetstream` — the `persist` workload against NATS JetStream (a fresh
//!   stream with file storage on `--url`, deleted afterwards): `--senders`
//!   connections publish `--messages` messages each with at most `--window`
//!   awaiting their `PubAck`; the same report and figure names as `persist`,
//!   labelled `jetstream`.
//! * `ai-stream` — `--streams` concurrent streamed AI replies from a fake
//!   OpenAI-compatible vendor the scenario runs itself: read directly, then
//!   through Parlor's `ai-stream` frame; reports the time to first token Parlor
//!   adds (p50/p99) and the server's CPU per stream.
//! * `sessions` — `--sessions` concurrent guided sessions (`/chat`) answering every
//!   `--pace-ms`, with the built-in guide (`--mode guide`) or a fake AI service the
//!   scenario runs (`--mode service`); reports answer → next question latency, the
//!   server's CPU per 1,000 answers and its RSS per session.
//! * `pusher fanout` / `pusher idle` — the fan-out and idle scenarios in Pusher Channels
//!   protocol 7, for Parlor and the Pusher-compatible servers (Soketi, Sockudo):
//!   `--subs` subscribers on one public channel get `--messages` events published through
//!   the signed HTTP API (`burst` with `--window` requests in flight, or `paced` at
//!   `--rate`); or `--conns` idle subscribed connections for the server's RSS per
//!   connection.
//! * `summarize` — turns the `--json` lines of runs into a Markdown table: one
//!   column for `parlor`, one for each baseline (`uws`, `node`, `jetstream`),
//!   and the ratio Parlor ÷ baseline for each.
//!
//! Every scenario prints a human-readable summary; with `--json` it prints
//! one JSON line on stdout instead (the human text then goes to stderr).
//! Progress goes to stderr. Every network wait is bounded by a timeout.
//! `bench/run.sh` runs the whole suite; BENCHMARKS.md describes the method.

mod aistream;
mod fanout;
mod idle;
mod jetstream;
mod net;
mod persist;
mod procfs;
mod pusher;
mod sessions;
mod stats;
mod summarize;
mod worker;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "parlor-bench",
    version,
    about = "Benchmarks for the Parlor chat server"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Server memory per idle, joined connection.
    Idle(idle::IdleArgs),
    /// Broadcast throughput, latency and CPU cost in one room.
    Fanout(fanout::FanoutArgs),
    /// Acknowledged (persisted) messages per second and ack latency.
    Persist(persist::PersistArgs),
    /// The persist workload against NATS JetStream (baseline for `persist`).
    #[command(name = "jetstream")]
    JetStream(jetstream::JetStreamArgs),
    /// Time to first token Parlor adds to streamed AI replies, and its CPU per stream.
    AiStream(aistream::AiStreamArgs),
    /// Guided sessions at a human pace: answer latency, server CPU and RSS per session.
    Sessions(sessions::SessionsArgs),
    /// Fan-out and idle connections in Pusher Channels protocol 7 (Parlor, Soketi, Sockudo).
    Pusher(pusher::PusherArgs),
    /// Markdown table (with ratios) from `--json` output lines.
    Summarize(summarize::SummarizeArgs),
    /// Internal: a worker process started by `idle` or `fanout` (or `pusher`).
    #[command(hide = true, subcommand)]
    Worker(WorkerCmd),
}

#[derive(Debug, Subcommand)]
enum WorkerCmd {
    Idle(idle::IdleWorkerArgs),
    FanoutSubs(fanout::FanoutWorkerArgs),
}

/// Options every load scenario takes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// WebSocket endpoint of the server (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Name of the system under test in reports (e.g. parlor, node).
    #[arg(long)]
    pub label: Option<String>,
    /// Print one machine-readable JSON summary line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Spread client sockets over this many source addresses from 127.0.0.2
    /// upwards (0: let the kernel choose).
    #[arg(long, default_value_t = 8)]
    pub source_addrs: u8,
    /// Limit for one connection's TCP connect + handshake, and for its
    /// join-room answer, in seconds.
    #[arg(long, default_value_t = 20)]
    pub connect_timeout_secs: u64,
}

impl CommonArgs {
    pub fn label(&self) -> String {
        self.label.clone().unwrap_or_else(|| "parlor".to_owned())
    }
}

/// A scenario's result: a serialisable summary and its human rendering.
#[derive(Debug)]
pub struct Report {
    json: Result<String>,
    human: String,
}

impl Report {
    pub fn new(summary: &impl Serialize, human: String) -> Self {
        Self {
            json: serde_json::to_string(summary).context("cannot encode the summary as JSON"),
            human,
        }
    }

    /// With `json`, the JSON line goes to stdout and the human text to
    /// stderr; otherwise the human text goes to stdout.
    pub fn print(self, json: bool) -> Result<()> {
        if json {
            eprintln!("{}", self.human);
            println!("{}", self.json?);
        } else {
            println!("{}", self.human);
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Idle(args) => idle::run(args).await,
        Cmd::Fanout(args) => fanout::run(args).await,
        Cmd::Persist(args) => persist::run(args).await,
        Cmd::JetStream(args) => jetstream::run(args).await,
        Cmd::AiStream(args) => aistream::run(args).await,
        Cmd::Sessions(args) => sessions::run(args).await,
        Cmd::Pusher(args) => pusher::run(args).await,
        Cmd::Summarize(args) => summarize::run(&args),
        Cmd::Worker(WorkerCmd::Idle(args)) => idle::worker_main(args).await,
        Cmd::Worker(WorkerCmd::FanoutSubs(args)) => fanout::worker_main(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parlor-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `fanout`: broadcast throughput and latency in one room.
//!
//! `--subs` subscriber connections join one fresh room; `--senders` more
//! connections (one by default) join it too and send `--messages` messages
//! between them (sender k the indices k, k + senders, …), either as fast as
//! each can (`burst`) or at `--rate` messages per second in all (`paced`). Each
//! message's text is `t:<send time, ns since the Unix epoch>:<index>:<pad>`,
//! so every subscriber can time each delivery against the shared wall clock
//! (which also works across worker processes) and check that it sees every
//! index exactly once, with `seq` strictly increasing.
//!
//! The subscribers ([`Subscribers`]) also serve `pusher fanout` (`crate::pusher`), where
//! they speak Pusher protocol 7 instead ([`Protocol`]) and have no `seq` to check.
//!
//! Figures: deliveries/s = deliveries ÷ (last receipt − first send); latency
//! percentiles over all deliveries; server CPU-seconds (utime + stime) spent
//! between just before the first send and the last receipt, per million
//! deliveries.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Delivery, Protocol, ServerFrame, Target, Ws};
use crate::procfs::{CpuUse, CpuWatch, Proc};
use crate::stats::{Latencies, LatencySummary, epoch_nanos, rate};
use crate::worker::{self, ErrorTally, Worker};
use crate::{CommonArgs, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Send every message as fast as the connection accepts them.
    Burst,
    /// Send at `--rate` messages per second.
    Paced,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Burst => "burst",
            Mode::Paced => "paced",
        }
    }
}

#[derive(Debug, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PID of the server process, for its CPU time and RSS. Without it those
    /// figures are left out.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Number of subscriber connections in the room.
    #[arg(long, default_value_t = 1000)]
    pub subs: usize,
    /// Number of messages sent (by all senders together).
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Sender connections, each in the room, sending their share of the messages at once.
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// The senders connect to these WebSocket URLs in turn (sender k to URL k mod n);
    /// by default to `--url`.
    #[arg(long, value_delimiter = ',')]
    pub sender_urls: Vec<String>,
    #[arg(long, value_enum, default_value_t = Mode::Burst)]
    pub mode: Mode,
    /// Messages per second in paced mode.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Worker processes for the subscribers; 1 keeps them in this process
    /// (fine up to a few thousand subscribers).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Filler bytes appended to each message text.
    #[arg(long, default_value_t = 32)]
    pub payload_bytes: usize,
    /// Pause between the last join and the first send, in milliseconds, so
    /// that join-time traffic (presence etc.) is not measured.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// How long to wait for deliveries after the last send, in seconds.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout_secs: u64,
    /// Upper bound, in seconds, for connecting and joining all subscribers.
    #[arg(long, default_value_t = 300)]
    pub join_timeout_secs: u64,
    /// Room to use; by default a fresh, unique room name.
    #[arg(long)]
    pub room: Option<String>,
    /// Several nodes of one cluster: the subscribers' worker processes connect to these
    /// WebSocket URLs in turn (worker i to URL i mod n), while the sender uses `--url`.
    /// Needs `--procs` of at least the number of URLs.
    #[arg(long, value_delimiter = ',')]
    pub sub_urls: Vec<String>,
}

/// Arguments of the hidden `worker fanout-subs` subcommand.
#[derive(Debug, Args)]
pub struct FanoutWorkerArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub room: String,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub offset: usize,
    #[arg(long)]
    pub messages: usize,
    #[arg(long)]
    pub source_addrs: u8,
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub connect_timeout_secs: u64,
    #[arg(long)]
    pub index: usize,
    /// What the subscribers speak (`room` is a Pusher channel's name for `pusher`).
    #[arg(long, value_enum, default_value_t = Protocol::Parlor)]
    pub protocol: Protocol,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum FanoutEvent {
    Ready { joined: u64, failed: ErrorTally },
    Result(SubsSummary),
}

/// What a group of subscribers saw. Mergeable across processes.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SubsSummary {
    pub subscribers: u64,
    pub joined: u64,
    pub join_failures: ErrorTally,
    /// Subscribers that received every message.
    pub complete: u64,
    /// Distinct messages received, summed over subscribers.
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// `message-received` frames (or other text frames) that could not be
    /// decoded.
    pub malformed: u64,
    /// Errors the server reported on a subscriber's connection (Pusher's `pusher:error`).
    #[serde(default)]
    pub server_errors: ErrorTally,
    /// Subscribers whose connection ended early, by reason.
    pub disconnected: ErrorTally,
    /// Epoch nanoseconds of the first and last receipt (0 = none).
    pub first_recv_nanos: u64,
    pub last_recv_nanos: u64,
    /// Delivery latency histogram as `[micros, count]` pairs.
    pub latency: Vec<[u64; 2]>,
}

impl SubsSummary {
    fn merge(&mut self, other: &SubsSummary) -> Result<()> {
        self.subscribers += other.subscribers;
        self.joined += other.joined;
        self.join_failures.merge(&other.join_failures);
        self.complete += other.complete;
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.malformed += other.malformed;
        self.server_errors.merge(&other.server_errors);
        self.disconnected.merge(&other.disconnected);
        if other.first_recv_nanos != 0
            && (self.first_recv_nanos == 0 || other.first_recv_nanos < self.first_recv_nanos)
        {
            self.first_recv_nanos = other.first_recv_nanos;
        }
        self.last_recv_nanos = self.last_recv_nanos.max(other.last_recv_nanos);
        let mut lat = Latencies::from_pairs(&self.latency)?;
        lat.merge(&Latencies::from_pairs(&other.latency)?);
        self.latency = lat.to_pairs();
        Ok(())
    }
}

/// What one subscriber saw.
#[derive(Debug)]
struct SubResult {
    ws: Option<Ws>,
    /// Received every message exactly once.
    complete: bool,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    malformed: u64,
    server_errors: ErrorTally,
    disconnect: Option<String>,
    first_recv: u64,
    last_recv: u64,
}

/// Where and how to run a group of subscribers.
#[derive(Debug, Clone)]
pub(crate) struct GroupSpec {
    pub(crate) target: Arc<Target>,
    /// The room, or Pusher channel, every subscriber joins.
    pub(crate) room: Arc<str>,
    pub(crate) messages: usize,
    pub(crate) offset: usize,
    pub(crate) count: usize,
    pub(crate) concurrency: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) protocol: Protocol,
}

/// A group of subscribers that have finished joining (or failing to).
#[derive(Debug)]
pub(crate) struct Group {
    subscribers: u64,
    joined: u64,
    failed: ErrorTally,
    tasks: Vec<JoinHandle<SubResult>>,
    stop: watch::Sender<bool>,
    latency: Arc<Mutex<Latencies>>,
}

impl Group {
    /// Spawns the subscribers and returns once each has joined or failed.
    async fn start(spec: GroupSpec) -> Self {
        let permits = Arc::new(Semaphore::new(spec.concurrency.max(1)));
        let (stop, stop_rx) = watch::channel(false);
        let latency = Arc::new(Mutex::new(Latencies::new()));
        let (joined_tx, mut joined_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let mut tasks = Vec::with_capacity(spec.count);
        for i in 0..spec.count {
            let spec = spec.clone();
            let permits = Arc::clone(&permits);
            let joined_tx = joined_tx.clone();
            let stop_rx = stop_rx.clone();
            let latency = Arc::clone(&latency);
            tasks.push(tokio::spawn(async move {
                let global = spec.offset + i;
                let connected = async {
                    let _permit = permits.acquire().await?;
                    let mut ws = spec
                        .target
                        .connect(spec.target.source_for(global), spec.connect_timeout)
                        .await?;
                    spec.protocol
                        .join(
                            &mut ws,
                            &spec.room,
                            &format!("j{global}"),
                            spec.connect_timeout,
                        )
                        .await?;
                    Ok::<_, anyhow::Error>(ws)
                }
                .await;
                match connected {
                    Ok(ws) => {
                        let _ = joined_tx.send(Ok(()));
                        drop(joined_tx);
                        subscribe(
                            ws,
                            spec.protocol,
                            &spec.room,
                            spec.messages,
                            &latency,
                            stop_rx,
                        )
                        .await
                    }
                    Err(e) => {
                        let _ = joined_tx.send(Err(format!("{e:#}")));
                        SubResult::failed()
                    }
                }
            }));
        }
        drop(joined_tx);
        let mut joined = 0;
        let mut failed = ErrorTally::default();
        while let Some(r) = joined_rx.recv().await {
            match r {
                Ok(()) => joined += 1,
                Err(e) => failed.add(e),
            }
        }
        Self {
            subscribers: spec.count as u64,
            joined,
            failed,
            tasks,
            stop,
            latency,
        }
    }

    /// Waits until every subscriber has all messages or `stop_when`
    /// completes (then tells them to stop), and sums up. The connections are
    /// returned still open so that closing them is not measured.
    async fn finish(self, stop_when: impl Future<Output = ()>) -> Result<(SubsSummary, Vec<Ws>)> {
        let all = futures_util::future::join_all(self.tasks);
        tokio::pin!(all);
        let results = tokio::select! {
            results = &mut all => results,
            () = stop_when => {
                let _ = self.stop.send(true);
                timeout(Duration::from_secs(30), &mut all)
                    .await
                    .context("subscribers did not stop within 30 s")?
            }
        };
        let mut summary = SubsSummary {
            subscribers: self.subscribers,
            joined: self.joined,
            join_failures: self.failed,
            ..SubsSummary::default()
        };
        let mut sockets = Vec::new();
        for r in results {
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    summary
                        .disconnected
                        .add(format!("subscriber task failed: {e}"));
                    continue;
                }
            };
            summary.received += r.received;
            summary.duplicates += r.duplicates;
            summary.out_of_order += r.out_of_order;
            summary.malformed += r.malformed;
            summary.server_errors.merge(&r.server_errors);
            summary.complete += u64::from(r.complete);
            if let Some(reason) = r.disconnect {
                summary.disconnected.add(reason);
            }
            if r.first_recv != 0
                && (summary.first_recv_nanos == 0 || r.first_recv < summary.first_recv_nanos)
            {
                summary.first_recv_nanos = r.first_recv;
            }
            summary.last_recv_nanos = summary.last_recv_nanos.max(r.last_recv);
            if let Some(ws) = r.ws {
                sockets.push(ws);
            }
        }
        summary.latency = self
            .latency
            .lock()
            .map(|hist| hist.to_pairs())
            .unwrap_or_default();
        Ok((summary, sockets))
    }
}

impl SubResult {
    fn failed() -> Self {
        Self {
            ws: None,
            complete: false,
            received: 0,
            duplicates: 0,
            out_of_order: 0,
            malformed: 0,
            server_errors: ErrorTally::default(),
            disconnect: None,
            first_recv: 0,
            last_recv: 0,
        }
    }
}

/// Encodes a message text: send time, index, filler.
pub(crate) fn payload(sent_nanos: u64, index: usize, pad: &str) -> String {
    format!("t:{sent_nanos}:{index}:{pad}")
}

/// Decodes `payload`'s output into (send time, index).
pub(crate) fn parse_payload(text: &str) -> Option<(u64, usize)> {
    let mut parts = text.strip_prefix("t:")?.splitn(3, ':');
    let sent = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    Some((sent, index))
}

/// One subscriber's receive loop: until it has every message, the
/// connection ends, or `stop` fires. Latencies go into the group's shared
/// histogram (one per process keeps memory flat however many subscribers).
async fn subscribe(
    mut ws: Ws,
    protocol: Protocol,
    room: &str,
    messages: usize,
    latency: &Mutex<Latencies>,
    mut stop: watch::Receiver<bool>,
) -> SubResult {
    let mut r = SubResult::failed();
    // One select around the whole loop rather than one per frame: re-arming
    // the stop watch for every frame costs more than the frame itself.
    let ended = tokio::select! {
        biased;
        _ = stop.changed() => None,
        ended = receive(&mut ws, protocol, room, messages, latency, &mut r) => Some(ended),
    };
    match ended {
        Some(Err(reason)) => r.disconnect = Some(reason),
        Some(Ok(())) | None => {
            r.complete = r.received as usize == messages;
            r.ws = Some(ws);
        }
    }
    r
}

/// The body of `subscribe`; returns `Err(reason)` if the connection ends.
async fn receive(
    ws: &mut Ws,
    protocol: Protocol,
    room: &str,
    messages: usize,
    latency: &Mutex<Latencies>,
    r: &mut SubResult,
) -> Result<(), String> {
    let mut seen = vec![false; messages];
    let mut last_seq: Option<u64> = None;
    // Latencies are kept here and added to the shared histogram once at the end: a lock
    // per delivery would cost the load generator more than the delivery costs the server.
    let mut local: Vec<u64> = Vec::with_capacity(messages);
    let result = receive_loop(
        ws,
        protocol,
        room,
        messages,
        r,
        &mut seen,
        &mut last_seq,
        &mut local,
    )
    .await;
    if let Ok(mut hist) = latency.lock() {
        for nanos in local {
            hist.record_nanos(nanos);
        }
    }
    result
}

/// The receive loop of `receive`, recording latencies into `local`.
#[allow(clippy::too_many_arguments)]
async fn receive_loop(
    ws: &mut Ws,
    protocol: Protocol,
    room: &str,
    messages: usize,
    r: &mut SubResult,
    seen: &mut [bool],
    last_seq: &mut Option<u64>,
    local: &mut Vec<u64>,
) -> Result<(), String> {
    while (r.received as usize) < messages {
        let msg = match ws.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return Err(format!("connection error: {e}")),
            None => return Err("connection ended without close frame".to_owned()),
        };
        let text = match &msg {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => return Err(net::describe_close(&msg)),
            _ => continue,
        };
        let now = epoch_nanos();
        let delivery = match protocol {
            Protocol::Parlor => decode_parlor(text, room),
            Protocol::Pusher => crate::pusher::socket::decode(text, room),
        };
        let (seq, body) = match delivery {
            Delivery::Message { seq, body } => (seq, body),
            Delivery::Ping => {
                // Pusher's keep-alive: a server that gets no pong closes the connection.
                let pong = Message::text(crate::pusher::socket::PONG);
                if let Err(e) = ws.send(pong).await {
                    return Err(format!("connection error: {e}"));
                }
                continue;
            }
            Delivery::ServerError(error) => {
                r.server_errors.add(error);
                continue;
            }
            Delivery::Ignored => continue,
            Delivery::Malformed => {
                r.malformed += 1;
                continue;
            }
        };
        let Some((sent, index)) = parse_payload(&body) else {
            r.malformed += 1;
            continue;
        };
        let Some(slot) = seen.get_mut(index) else {
            r.malformed += 1;
            continue;
        };
        if *slot {
            r.duplicates += 1;
            continue;
        }
        *slot = true;
        r.received += 1;
        if let Some(seq) = seq {
            if last_seq.is_some_and(|last| seq <= last) {
                r.out_of_order += 1;
            }
            *last_seq = Some(seq);
        }
        local.push(now.saturating_sub(sent));
        if r.first_recv == 0 {
            r.first_recv = now;
        }
        r.last_recv = now;
    }
    Ok(())
}

/// Reads a Parlor frame: a `message-received` for `room`, or something to ignore.
fn decode_parlor<'a>(text: &'a str, room: &str) -> Delivery<'a> {
    // The common case is read without a JSON parser (see `scan_message`); anything
    // else goes through the full parse.
    if let Some((frame_room, seq, body)) = scan_message(text) {
        if frame_room != room {
            return Delivery::Ignored;
        }
        return Delivery::Message {
            seq: Some(seq),
            body,
        };
    }
    let Some(frame) = ServerFrame::parse(text) else {
        return Delivery::Malformed;
    };
    if frame.kind != "message-received" || frame.room_id.as_deref() != Some(room) {
        return Delivery::Ignored;
    }
    match frame.message {
        Some(body) => Delivery::Message {
            seq: frame.seq,
            body: std::borrow::Cow::Owned(body.into_owned()),
        },
        None => Delivery::Malformed,
    }
}

/// Reads a `message-received` frame as both servers write it (`{"type":
/// "message-received", …, "roomId": "R", …, "seq": N, "message": "t:…", …}`, no escapes in
/// these fields) without a JSON parser: (room, seq, message). `None` for anything else,
/// which the caller then parses in full.
fn scan_message(text: &str) -> Option<(&str, u64, std::borrow::Cow<'_, str>)> {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    // Searchers built once: building one per search cost the load generator more than
    // the rest of its work on a frame.
    static ROOM: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""roomId":""#));
    static MESSAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""message":""#));
    static SEQ: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(r#""seq":"#));
    let rest = text.strip_prefix(r#"{"type":"message-received","#)?;
    let bytes = rest.as_bytes();
    let string_after = |key: &Finder<'_>| -> Option<&str> {
        let start = key.find(bytes)? + key.needle().len();
        let end = start + memchr::memchr(b'"', &bytes[start..])?;
        let v = rest.get(start..end)?;
        // An escape would need the full parser.
        memchr::memchr(b'\\', v.as_bytes()).is_none().then_some(v)
    };
    let room = string_after(&ROOM)?;
    let body = string_after(&MESSAGE)?;
    let seq_at = SEQ.find(bytes)? + SEQ.needle().len();
    let digits = &bytes[seq_at..];
    let end = digits
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    let seq = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
    Some((room, seq, std::borrow::Cow::Borrowed(body)))
}

/// Closes connections concurrently, bounded in time.
pub(crate) async fn close_all(sockets: Vec<Ws>) {
    let closing = futures_util::future::join_all(sockets.into_iter().map(net::close_quietly));
    let _ = timeout(Duration::from_secs(15), closing).await;
}

/// What the senders saw, together.
#[derive(Debug, Default, Serialize)]
pub struct SenderOutcome {
    pub sent: u64,
    pub acks: u64,
    pub errors: ErrorTally,
    pub first_send_nanos: u64,
    pub last_send_nanos: u64,
    pub send_seconds: f64,
}

impl SenderOutcome {
    /// Adds another sender's outcome: counts add up, the first send is the earliest, the
    /// last the latest.
    fn merge(&mut self, other: &SenderOutcome) {
        if other.sent > 0 {
            if self.sent == 0 || other.first_send_nanos < self.first_send_nanos {
                self.first_send_nanos = other.first_send_nanos;
            }
            self.last_send_nanos = self.last_send_nanos.max(other.last_send_nanos);
        }
        self.sent += other.sent;
        self.acks += other.acks;
        self.errors.merge(&other.errors);
        self.send_seconds = self.send_seconds.max(other.send_seconds);
    }
}

/// Subscribers, either here or in worker processes.
#[derive(Debug)]
pub(crate) enum Subscribers {
    Local(Group),
    Workers(Vec<Worker<FanoutEvent>>),
}

impl Subscribers {
    /// Starts `spec.count` subscribers, here when `procs` ≤ 1, else split over `procs`
    /// worker processes (worker i connecting to `urls[i mod n]`, or to `spec.target`
    /// without `urls`), and waits until each has joined or failed, until `join_deadline`.
    /// Returns them with the number joined and the failures.
    pub(crate) async fn start(
        spec: GroupSpec,
        procs: usize,
        urls: &[String],
        source_addrs: u8,
        join_deadline: Instant,
    ) -> Result<(Self, u64, ErrorTally)> {
        if procs <= 1 {
            let group = timeout_at(join_deadline, Group::start(spec))
                .await
                .context("subscribers did not finish joining within --join-timeout-secs")?;
            let (joined, failed) = (group.joined, group.failed.clone());
            return Ok((Subscribers::Local(group), joined, failed));
        }
        let mut workers = Vec::new();
        let mut offset = 0;
        let per_worker_concurrency = spec.concurrency.div_ceil(procs).max(1);
        for (index, count) in worker::split_evenly(spec.count, procs)
            .into_iter()
            .enumerate()
        {
            if count == 0 {
                continue;
            }
            let url = match urls.len() {
                0 => spec.target.url.clone(),
                n => urls[index % n].clone(),
            };
            let worker_args = vec![
                "fanout-subs".to_owned(),
                format!("--url={url}"),
                format!("--room={}", spec.room),
                format!("--count={count}"),
                format!("--offset={offset}"),
                format!("--messages={}", spec.messages),
                format!("--source-addrs={source_addrs}"),
                format!("--concurrency={per_worker_concurrency}"),
                format!("--connect-timeout-secs={}", spec.connect_timeout.as_secs()),
                format!("--index={index}"),
                format!("--protocol={}", spec.protocol.arg()),
            ];
            workers.push(Worker::spawn(index, &worker_args)?);
            offset += count;
        }
        let mut joined = 0;
        let mut failed = ErrorTally::default();
        for w in &mut workers {
            match w
                .next_event(join_deadline, "its joined subscribers")
                .await?
            {
                FanoutEvent::Ready {
                    joined: j,
                    failed: f,
                } => {
                    joined += j;
                    failed.merge(&f);
                }
                FanoutEvent::Result(_) => bail!("worker {} reported results before ready", w.index),
            }
        }
        Ok((Subscribers::Workers(workers), joined, failed))
    }

    /// The worker processes' ids, for their CPU time.
    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        match self {
            Subscribers::Local(_) => Vec::new(),
            Subscribers::Workers(workers) => workers.iter().filter_map(Worker::pid).collect(),
        }
    }

    /// Waits until every subscriber has every message or `drain_deadline` passes, and sums
    /// up: the summary, the connections held here (still open, so that closing them is not
    /// measured) and the workers (holding theirs until they are finished).
    pub(crate) async fn finish(
        self,
        drain_deadline: Instant,
    ) -> Result<(SubsSummary, Vec<Ws>, Vec<Worker<FanoutEvent>>)> {
        match self {
            Subscribers::Local(group) => {
                let (summary, sockets) = group.finish(sleep_until(drain_deadline)).await?;
                Ok((summary, sockets, Vec::new()))
            }
            Subscribers::Workers(mut workers) => {
                let summary = collect_worker_results(&mut workers, drain_deadline).await?;
                Ok((summary, Vec::new(), workers))
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub label: String,
    pub url: String,
    pub mode: Mode,
    pub rate: Option<f64>,
    pub subs: usize,
    pub messages: usize,
    pub senders: usize,
    pub payload_bytes: usize,
    pub procs: usize,
    pub room: String,
    pub joined: u64,
    pub join_failures: ErrorTally,
    pub sender: SenderOutcome,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub malformed: u64,
    pub complete_subscribers: u64,
    pub disconnected: ErrorTally,
    pub duration_seconds: f64,
    pub deliveries_per_second: f64,
    pub latency: LatencySummary,
    /// CPU and memory over the run (flattened: the same keys as ever).
    #[serde(flatten)]
    pub cpu: DeliveryCpu,
    pub figures: BTreeMap<String, f64>,
}

pub async fn run(args: FanoutArgs) -> Result<()> {
    if args.subs == 0 || args.messages == 0 || args.senders == 0 {
        bail!("--subs, --messages and --senders must be at least 1");
    }
    if args.senders > args.messages {
        bail!("--senders must not exceed --messages");
    }
    if args.mode == Mode::Paced && !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let target = Arc::new(Target::resolve(&args.common.url, args.common.source_addrs).await?);
    if !args.sub_urls.is_empty() && args.procs < args.sub_urls.len() {
        bail!("--sub-urls needs --procs of at least the number of URLs");
    }
    let mut sub_urls = Vec::new();
    for url in &args.sub_urls {
        sub_urls.push(Target::resolve(url, args.common.source_addrs).await?.url);
    }
    let mut sender_targets = Vec::new();
    for url in &args.sender_urls {
        sender_targets.push(Arc::new(
            Target::resolve(url, args.common.source_addrs).await?,
        ));
    }
    if sender_targets.is_empty() {
        sender_targets.push(Arc::clone(&target));
    }
    let server = args.pid.map(Proc::Pid);
    if let Some(server) = server {
        server.rss_kib()?;
    }
    let room: Arc<str> = match &args.room {
        Some(room) => room.as_str().into(),
        None => format!(
            "fanout-{}-{}",
            epoch_nanos() / 1_000_000,
            std::process::id()
        )
        .into(),
    };
    let connect_timeout = Duration::from_secs(args.common.connect_timeout_secs);
    let label = args.common.label();
    eprintln!(
        "fanout [{label}]: {} subscribers, {} messages ({}), room {room}",
        args.subs,
        args.messages,
        match args.mode {
            Mode::Burst => "burst".to_owned(),
            Mode::Paced => format!("paced at {}/s", args.rate),
        }
    );

    // 1. Subscribers connect and join.
    let join_started = Instant::now();
    let join_deadline = join_started + Duration::from_secs(args.join_timeout_secs);
    let spec = GroupSpec {
        target: Arc::clone(&target),
        room: Arc::clone(&room),
        messages: args.messages,
        offset: 0,
        count: args.subs,
        concurrency: args.concurrency,
        connect_timeout,
        protocol: Protocol::Parlor,
    };
    let (subscribers, joined, join_failures) = Subscribers::start(
        spec,
        args.procs,
        &sub_urls,
        args.common.source_addrs,
        join_deadline,
    )
    .await?;
    eprintln!(
        "fanout: {joined}/{} subscribers joined in {:.1} s; failures: {join_failures}",
        args.subs,
        join_started.elapsed().as_secs_f64()
    );
    if joined == 0 {
        bail!("no subscriber could join: {join_failures}");
    }

    // 2. The senders join too (each receives the room's broadcasts, which it
    // drains but does not count).
    let mut sender_sockets = Vec::with_capacity(args.senders);
    for k in 0..args.senders {
        let target = &sender_targets[k % sender_targets.len()];
        let mut ws = target
            .connect(target.source_for(args.subs + k), connect_timeout)
            .await
            .with_context(|| format!("sender {k}: connection failed"))?;
        net::join_room(&mut ws, &room, "sender-join", connect_timeout)
            .await
            .with_context(|| format!("sender {k} could not join"))?;
        sender_sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;

    // 3. Send, with the CPU clocks read around it.
    let mut clients = vec![Proc::SelfProc];
    clients.extend(subscribers.worker_pids().into_iter().map(Proc::Pid));
    let cpu_watch = CpuWatch::new(server, clients);
    let cpu_before = cpu_watch.sample()?;
    let cpu_started = Instant::now();
    let rss_before = server.map(|s| s.rss_kib()).transpose()?;
    let (stop_acks_tx, stop_acks_rx) = watch::channel(false);
    let started = Instant::now();
    let mut sending = Vec::with_capacity(args.senders);
    for (k, ws) in sender_sockets.into_iter().enumerate() {
        let (sink, stream) = ws.split();
        let share = Share {
            first: k,
            step: args.senders,
        };
        let expected_acks = share.count(args.messages) as u64;
        let ack_reader = tokio::spawn(count_acks(stream, expected_acks, stop_acks_rx.clone()));
        let plan = SendPlan {
            room: Arc::clone(&room),
            messages: args.messages,
            pad: "x".repeat(args.payload_bytes),
            interval: match args.mode {
                Mode::Burst => None,
                Mode::Paced => Some(Duration::from_secs_f64(1.0 / args.rate)),
            },
            started,
        };
        let send = tokio::spawn(send_messages(sink, plan, share));
        sending.push((send, ack_reader));
    }
    let mut sender = SenderOutcome::default();
    let mut senders = Vec::with_capacity(sending.len());
    for (send, ack_reader) in sending {
        let (sink, outcome) = send.await.context("a sender task failed")?;
        sender.merge(&outcome);
        senders.push((sink, ack_reader));
    }
    // If sending broke off, the missing messages will never arrive: do not
    // wait the full drain time for them.
    let drain = if sender.sent < args.messages as u64 {
        Duration::from_secs(args.drain_timeout_secs.min(5))
    } else {
        Duration::from_secs(args.drain_timeout_secs)
    };
    let drain_deadline = Instant::now() + drain;

    // 4. Wait for the deliveries.
    let (summary, local_sockets, workers) = subscribers.finish(drain_deadline).await?;
    let cpu_after = cpu_watch.sample()?;
    let cpu_interval = cpu_started.elapsed().as_secs_f64();
    let rss_after = server.map(|s| s.rss_kib()).transpose()?;

    // 5. Collect the senders' acks (bounded), then close everything.
    let ack_wait = drain_deadline.max(Instant::now() + Duration::from_secs(2));
    for (sink, mut ack_reader) in senders {
        let ack_outcome = match timeout_at(ack_wait, &mut ack_reader).await {
            Ok(outcome) => Some(outcome),
            Err(_) => {
                let _ = stop_acks_tx.send(true);
                timeout(Duration::from_secs(5), &mut ack_reader).await.ok()
            }
        };
        let (acks, ack_errors, stream) = match ack_outcome {
            Some(Ok(outcome)) => outcome,
            Some(Err(e)) => {
                let mut errors = ErrorTally::default();
                errors.add(format!("ack reader failed: {e}"));
                (0, errors, None)
            }
            None => {
                ack_reader.abort();
                let mut errors = ErrorTally::default();
                errors.add("ack reader did not stop".to_owned());
                (0, errors, None)
            }
        };
        sender.acks += acks;
        sender.errors.merge(&ack_errors);
        if let Some(stream) = stream
            && let Ok(ws) = sink.reunite(stream)
        {
            net::close_quietly(ws).await;
        }
    }
    let _ = stop_acks_tx.send(true);
    close_all(local_sockets).await;
    for w in workers {
        w.finish(Duration::from_secs(20)).await;
    }

    // 6. Figures.
    let expected = joined * args.messages as u64;
    let duration_ns = summary
        .last_recv_nanos
        .saturating_sub(sender.first_send_nanos);
    let duration_seconds = duration_ns as f64 / 1e9;
    let deliveries = summary.received;
    let deliveries_per_second = rate(deliveries, duration_seconds);
    let latency = Latencies::from_pairs(&summary.latency)?.summary();
    let cpu = DeliveryCpu::new(
        cpu_before.until(&cpu_after),
        cpu_interval,
        deliveries,
        (rss_before, rss_after),
    );

    let from = match args.senders {
        1 => String::new(),
        n => format!(" from {n} senders"),
    };
    let variant = match args.mode {
        Mode::Burst => format!(
            "fanout burst, {} subs × {} msgs{from}",
            args.subs, args.messages
        ),
        Mode::Paced => format!(
            "fanout paced {}/s, {} subs × {} msgs{from}",
            args.rate, args.subs, args.messages
        ),
    };
    let mut figures = BTreeMap::new();
    figures.insert(format!("{variant}: deliveries/s"), deliveries_per_second);
    figures.insert(format!("{variant}: latency p50 (ms)"), latency.p50_ms);
    figures.insert(format!("{variant}: latency p99 (ms)"), latency.p99_ms);
    figures.insert(format!("{variant}: latency max (ms)"), latency.max_ms);
    if let Some(v) = cpu.server_cpu_seconds_per_million {
        figures.insert(format!("{variant}: server CPU-s per 1M deliveries"), v);
    }

    let report = FanoutReport {
        scenario: "fanout",
        label,
        url: target.url.clone(),
        mode: args.mode,
        rate: (args.mode == Mode::Paced).then_some(args.rate),
        subs: args.subs,
        messages: args.messages,
        senders: args.senders,
        payload_bytes: args.payload_bytes,
        procs: args.procs,
        room: room.to_string(),
        joined,
        join_failures,
        sender,
        expected_deliveries: expected,
        deliveries,
        missing: expected.saturating_sub(deliveries),
        duplicates: summary.duplicates,
        out_of_order: summary.out_of_order,
        malformed: summary.malformed,
        complete_subscribers: summary.complete,
        disconnected: summary.disconnected,
        duration_seconds,
        deliveries_per_second,
        latency,
        cpu,
        figures,
    };
    let human = human_summary(&report);
    Report::new(&report, human).print(args.common.json)
}

fn human_summary(r: &FanoutReport) -> String {
    let mut out = format!(
        "fanout [{}] {} — {}{}, {} subscribers × {} messages\n",
        r.label,
        r.url,
        r.mode.name(),
        r.rate.map(|v| format!(" at {v}/s")).unwrap_or_default(),
        r.joined,
        r.messages
    );
    out += &format!(
        "  senders ({}): {} sent in {:.3} s, {} acked, errors: {}\n",
        r.senders, r.sender.sent, r.sender.send_seconds, r.sender.acks, r.sender.errors
    );
    out += &format!(
        "  deliveries: {}/{} (missing {}, duplicate {}, out of order {}, malformed {}); \
         {}/{} subscribers complete; disconnected: {}\n",
        r.deliveries,
        r.expected_deliveries,
        r.missing,
        r.duplicates,
        r.out_of_order,
        r.malformed,
        r.complete_subscribers,
        r.joined,
        r.disconnected
    );
    out += &format!(
        "  throughput: {:.0} deliveries/s over {:.3} s (first send → last receipt)\n",
        r.deliveries_per_second, r.duration_seconds
    );
    out += &format!("  latency: {}\n", r.latency);
    r.cpu.describe(&mut out);
    out
}

/// The server's and the machine's CPU over a fan-out run, and the server's memory before
/// and after: what `fanout` and `pusher fanout` both report.
#[derive(Debug, Serialize)]
pub struct DeliveryCpu {
    /// Wall time between the two CPU readings (just before the first send,
    /// and once every subscriber is done).
    pub cpu_interval_seconds: f64,
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_seconds_per_million: Option<f64>,
    /// Server CPU ÷ interval, in cores.
    pub server_cpu_utilisation: Option<f64>,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_kib: Option<u64>,
    /// CPU of the load generator: this process and its workers.
    pub client_cpu_seconds: f64,
    /// True when the load generator was busy for ≥ 90 % of the interval
    /// (it is pinned to one core): the figures then bound the client, not
    /// the server.
    pub client_saturated: bool,
    /// Machine CPU time (user + system) used by neither the server nor the
    /// load generator during the interval.
    pub other_cpu_seconds: Option<f64>,
    /// False when other processes used more than 10 % of a core during the
    /// interval: the figures are then skewed by them.
    pub machine_quiet: bool,
}

impl DeliveryCpu {
    /// The figures of `cpu`, used over `interval` seconds for `deliveries`, with the
    /// server's RSS before and after.
    pub fn new(
        cpu: CpuUse,
        interval: f64,
        deliveries: u64,
        (rss_before, rss_after): (Option<u64>, Option<u64>),
    ) -> Self {
        let share = |c: f64| if interval > 0.0 { c / interval } else { 0.0 };
        Self {
            cpu_interval_seconds: interval,
            server_cpu_seconds: cpu.server,
            server_cpu_seconds_per_million: cpu
                .server
                .filter(|_| deliveries > 0)
                .map(|c| c / deliveries as f64 * 1e6),
            server_cpu_utilisation: cpu.server.map(share),
            server_rss_before_kib: rss_before,
            server_rss_after_kib: rss_after,
            client_cpu_seconds: cpu.clients,
            client_saturated: share(cpu.clients) >= 0.9,
            other_cpu_seconds: cpu.other,
            machine_quiet: cpu.other.is_none_or(|o| share(o) <= 0.1),
        }
    }

    /// The human summary's lines about CPU and memory, with their warnings.
    pub fn describe(&self, out: &mut String) {
        match (self.server_cpu_seconds, self.server_cpu_seconds_per_million) {
            (Some(cpu), Some(per)) => {
                *out += &format!(
                    "  server CPU: {cpu:.2} s ({:.0}% of one core) → {per:.2} CPU-s per million \
                     deliveries; RSS {} → {} KiB\n",
                    self.server_cpu_utilisation.unwrap_or(0.0) * 100.0,
                    self.server_rss_before_kib.unwrap_or(0),
                    self.server_rss_after_kib.unwrap_or(0),
                );
            }
            _ => *out += "  server CPU: not measured (no --pid)\n",
        }
        *out += &format!(
            "  load generator CPU: {:.2} s; other processes: {} (over {:.2} s)",
            self.client_cpu_seconds,
            self.other_cpu_seconds
                .map_or_else(|| "n/a".to_owned(), |o| format!("{o:.2} s")),
            self.cpu_interval_seconds
        );
        if self.client_saturated {
            *out += "\n  WARNING: the load generator was CPU-bound; throughput is a lower bound \
                     for the server";
        }
        if !self.machine_quiet {
            *out += "\n  WARNING: other processes used more than 10% of a core meanwhile; \
                     figures are skewed";
        }
    }
}

/// Which message indices one sender sends: `first`, `first + step`, …
#[derive(Debug, Clone, Copy)]
struct Share {
    first: usize,
    step: usize,
}

impl Share {
    fn indices(self, messages: usize) -> impl Iterator<Item = usize> {
        (self.first..messages).step_by(self.step)
    }

    fn count(self, messages: usize) -> usize {
        self.indices(messages).count()
    }
}

/// What every sender sends, and when.
struct SendPlan {
    room: Arc<str>,
    messages: usize,
    pad: String,
    /// Paced: message `i` is due at `started + i × interval`.
    interval: Option<Duration>,
    started: Instant,
}

/// Sends one sender's share of the messages; returns the sink (to close later) and what
/// was sent.
async fn send_messages(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    plan: SendPlan,
    share: Share,
) -> (futures_util::stream::SplitSink<Ws, Message>, SenderOutcome) {
    let mut outcome = SenderOutcome::default();
    let room = &*plan.room;
    for index in share.indices(plan.messages) {
        if let Some(interval) = plan.interval {
            sleep_until(plan.started + interval.mul_f64(index as f64)).await;
        }
        let now = epoch_nanos();
        let frame = net::send_request(
            &format!("s{index}"),
            room,
            &payload(now, index, &plan.pad),
            &format!("{room}-c{index}"),
        );
        match timeout(Duration::from_secs(10), sink.send(Message::text(frame))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                outcome.errors.add(format!("send failed: {e}"));
                break;
            }
            Err(_) => {
                outcome.errors.add("send blocked for 10 s".to_owned());
                break;
            }
        }
        if outcome.sent == 0 {
            outcome.first_send_nanos = now;
        }
        outcome.last_send_nanos = now;
        outcome.sent += 1;
    }
    outcome.send_seconds = plan.started.elapsed().as_secs_f64();
    (sink, outcome)
}

/// Reads the sender's connection: counts `message-ack`s and `error`s that
/// answer a send, drains everything else.
async fn count_acks(
    mut stream: futures_util::stream::SplitStream<Ws>,
    expected: u64,
    mut stop: watch::Receiver<bool>,
) -> (
    u64,
    ErrorTally,
    Option<futures_util::stream::SplitStream<Ws>>,
) {
    let mut acks = 0;
    let mut errors = ErrorTally::default();
    while acks + errors.total < expected {
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = stream.next() => msg,
        };
        let msg = match msg {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                errors.add(format!("sender connection error: {e}"));
                return (acks, errors, None);
            }
            None => {
                errors.add("sender connection ended".to_owned());
                return (acks, errors, None);
            }
        };
        match &msg {
            Message::Text(text) => {
                let Some(frame) = ServerFrame::parse(text.as_str()) else {
                    continue;
                };
                let answers_send = frame
                    .reply_to
                    .as_deref()
                    .is_some_and(|r| r.starts_with('s'));
                match frame.kind.as_ref() {
                    "message-ack" if answers_send => acks += 1,
                    "error" if answers_send => errors.add(frame.describe_error()),
                    _ => {}
                }
            }
            Message::Close(_) => {
                errors.add(format!("sender {}", net::describe_close(&msg)));
                return (acks, errors, None);
            }
            _ => {}
        }
    }
    (acks, errors, Some(stream))
}

/// Waits for every worker's result until `deadline`, then asks the
/// stragglers to stop and report what they have.
async fn collect_worker_results(
    workers: &mut [Worker<FanoutEvent>],
    deadline: Instant,
) -> Result<SubsSummary> {
    let mut summary = SubsSummary::default();
    for w in workers.iter_mut() {
        let event = match w.next_event(deadline, "its results").await {
            Ok(event) => event,
            Err(_) => {
                w.command("stop").await;
                w.next_event(
                    Instant::now() + Duration::from_secs(30),
                    "its results after stop",
                )
                .await?
            }
        };
        match event {
            FanoutEvent::Result(s) => summary.merge(&s)?,
            FanoutEvent::Ready { .. } => bail!("worker {} reported ready twice", w.index),
        }
    }
    Ok(summary)
}

/// Body of the hidden `worker fanout-subs` subcommand.
pub async fn worker_main(args: FanoutWorkerArgs) -> Result<()> {
    let target = Arc::new(Target::resolve(&args.url, args.source_addrs).await?);
    let spec = GroupSpec {
        target,
        room: args.room.as_str().into(),
        messages: args.messages,
        offset: args.offset,
        count: args.count,
        concurrency: args.concurrency,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        protocol: args.protocol,
    };
    let group = Group::start(spec).await;
    worker::emit(&FanoutEvent::Ready {
        joined: group.joined,
        failed: group.failed.clone(),
    })?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let (summary, sockets) = group
        .finish(async {
            let _ = worker::next_command(&mut stdin).await;
        })
        .await?;
    worker::emit(&FanoutEvent::Result(summary))?;
    // Keep the connections open until the parent has read the server's CPU
    // clock; it closes our stdin when done.
    while worker::next_command(&mut stdin).await.is_some() {}
    close_all(sockets).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_frames_are_scanned_like_the_parser_reads_them() {
        let parlor = r#"{"type":"message-received","id":"x","roomId":"bench","chatRoomId":"bench","seq":42,"message":"t:5:7:zz","messageType":"text"}"#;
        let (room, seq, body) = scan_message(parlor).unwrap();
        assert_eq!((room, seq, body.as_ref()), ("bench", 42, "t:5:7:zz"));
        let full = ServerFrame::parse(parlor).unwrap();
        assert_eq!(
            (full.seq, full.message.as_deref()),
            (Some(42), Some("t:5:7:zz"))
        );
        assert!(scan_message(r#"{"type":"message-ack","seq":1}"#).is_none());
        assert!(
            scan_message(r#"{"type":"message-received","roomId":"a","seq":1,"message":"a\"b"}"#)
                .is_none()
        );
    }

    #[test]
    fn senders_share_the_messages_once_each() {
        let mut all: Vec<usize> = (0..3)
            .flat_map(|first| Share { first, step: 3 }.indices(10))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(Share { first: 0, step: 3 }.count(10), 4);
        assert_eq!(Share { first: 2, step: 3 }.count(10), 3);

        let mut total = SenderOutcome::default();
        for (sent, first, last) in [(4, 300, 900), (3, 200, 800), (0, 0, 0)] {
            total.merge(&SenderOutcome {
                sent,
                acks: sent,
                first_send_nanos: first,
                last_send_nanos: last,
                ..SenderOutcome::default()
            });
        }
        assert_eq!((total.sent, total.acks), (7, 7));
        assert_eq!((total.first_send_nanos, total.last_send_nanos), (200, 900));
    }

    #[test]
    fn payload_round_trip() {
        let text = payload(1_700_000_000_123_456_789, 42, "xxxx");
        assert_eq!(parse_payload(&text), Some((1_700_000_000_123_456_789, 42)));
        assert_eq!(parse_payload("t:5:7:"), Some((5, 7)));
        assert_eq!(parse_payload("hello"), None);
        assert_eq!(parse_payload("t:abc:1:"), None);
    }

    #[test]
    fn summaries_merge() -> Result<()> {
        let mut lat = Latencies::new();
        lat.record(Duration::from_millis(3));
        let a = SubsSummary {
            subscribers: 2,
            joined: 2,
            received: 10,
            first_recv_nanos: 50,
            last_recv_nanos: 90,
            latency: lat.to_pairs(),
            ..SubsSummary::default()
        };
        let b = SubsSummary {
            subscribers: 1,
            joined: 1,
            received: 5,
            duplicates: 1,
            first_recv_nanos: 40,
            last_recv_nanos: 80,
            latency: lat.to_pairs(),
            ..SubsSummary::default()
        };
        let mut total = SubsSummary::default();
        total.merge(&a)?;
        total.merge(&b)?;
        assert_eq!(total.received, 15);
        assert_eq!(total.duplicates, 1);
        assert_eq!(total.first_recv_nanos, 40);
        assert_eq!(total.last_recv_nanos, 90);
        assert_eq!(Latencies::from_pairs(&total.latency)?.count(), 2);
        Ok(())
    }
}

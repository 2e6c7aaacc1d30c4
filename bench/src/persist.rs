//! `persist`: durable-write throughput and acknowledgement latency.
//!
//! `--senders` connections each join a room (their own fresh room, or one
//! shared room with `--shared-room`) and send `--messages` messages, keeping
//! at most `--window` of them unacknowledged. Every `message-ack` is timed
//! against its send. Afterwards (unless `--no-verify`) a fresh connection
//! joins each room and checks that `room-joined.lastSeq` equals the number of
//! messages acknowledged in it.
//!
//! Figures: acknowledged messages/s = acks ÷ (last ack − first send); ack
//! latency percentiles over all acks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, ServerFrame, Target, Ws};
use crate::procfs::{CpuWatch, Proc};
use crate::stats::{Latencies, LatencySummary, epoch_nanos, rate};
use crate::worker::ErrorTally;
use crate::{CommonArgs, Report};

#[derive(Debug, Args)]
pub struct PersistArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PID of the server process, for its CPU time (optional).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Number of concurrent sender connections.
    #[arg(long, default_value_t = 100)]
    pub senders: usize,
    /// Messages each sender sends.
    #[arg(long, default_value_t = 200)]
    pub messages: usize,
    /// Messages a sender may have unacknowledged at once.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// All senders use one room instead of one room each.
    #[arg(long)]
    pub shared_room: bool,
    /// Filler bytes appended to each message text.
    #[arg(long, default_value_t = 32)]
    pub payload_bytes: usize,
    /// Longest wait for any single acknowledgement, in seconds.
    #[arg(long, default_value_t = 10)]
    pub ack_timeout_secs: u64,
    /// Upper bound for the whole sending phase, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Skip the check of each room's lastSeq after the run.
    #[arg(long)]
    pub no_verify: bool,
    /// The database the server stores in, when it runs in processes of its own (e.g.
    /// `PostgreSQL`): its name starts the figures' names, and the CPU other processes use
    /// meanwhile (the database's) is reported without calling the machine busy.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
}

/// What one sender saw: the room it wrote to (for `jetstream`, the subject).
#[derive(Debug)]
pub struct SenderResult {
    pub key: Arc<str>,
    pub sent: u64,
    pub acked: u64,
    pub errors: ErrorTally,
    pub latency: Latencies,
    pub last_ack: Option<Instant>,
}

impl SenderResult {
    /// Nothing sent yet to `key`.
    pub fn new(key: Arc<str>) -> Self {
        Self {
            key,
            sent: 0,
            acked: 0,
            errors: ErrorTally::default(),
            latency: Latencies::new(),
            last_ack: None,
        }
    }
}

/// Every sender's results added up.
pub struct Totals {
    pub sent: u64,
    pub acked: u64,
    pub errors: ErrorTally,
    pub latency: Latencies,
    /// From the first send to the last ack.
    pub duration_seconds: f64,
    /// Acks per room (subject), for the check after the run.
    pub acked_by_key: BTreeMap<Arc<str>, u64>,
}

/// Waits for every sender started at `started` and adds their results up; a
/// sender task that failed counts as an error.
pub async fn join_senders(
    tasks: Vec<tokio::task::JoinHandle<SenderResult>>,
    started: Instant,
) -> Totals {
    let mut totals = Totals {
        sent: 0,
        acked: 0,
        errors: ErrorTally::default(),
        latency: Latencies::new(),
        duration_seconds: 0.0,
        acked_by_key: BTreeMap::new(),
    };
    let mut last_ack = started;
    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => {
                totals.errors.add(format!("sender task failed: {e}"));
                continue;
            }
        };
        totals.sent += r.sent;
        totals.acked += r.acked;
        totals.errors.merge(&r.errors);
        totals.latency.merge(&r.latency);
        if let Some(t) = r.last_ack {
            last_ack = last_ack.max(t);
        }
        *totals.acked_by_key.entry(r.key).or_insert(0) += r.acked;
    }
    totals.duration_seconds = last_ack.duration_since(started).as_secs_f64();
    totals
}

#[derive(Debug, Default, Serialize)]
pub struct Verification {
    pub rooms_checked: u64,
    /// Rooms whose lastSeq matched the acknowledged count.
    pub rooms_matching: u64,
    /// Rooms whose lastSeq was below the acknowledged count (lost writes).
    pub rooms_short: u64,
    /// Rooms whose lastSeq was above it (e.g. persisted but not acked).
    pub rooms_over: u64,
    pub failures: ErrorTally,
    pub examples: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PersistReport {
    pub scenario: &'static str,
    pub label: String,
    pub url: String,
    pub senders: usize,
    pub connected: u64,
    pub connect_failures: ErrorTally,
    pub messages_per_sender: usize,
    pub window: usize,
    pub shared_room: bool,
    pub payload_bytes: usize,
    pub sent: u64,
    pub acked: u64,
    pub errors: ErrorTally,
    pub duration_seconds: f64,
    pub acked_per_second: f64,
    pub ack_latency: LatencySummary,
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_ms_per_message: Option<f64>,
    pub client_cpu_seconds: f64,
    /// Machine CPU (user + system) used by neither the server nor this
    /// process while sending.
    pub other_cpu_seconds: Option<f64>,
    /// False when other processes used more than 10 % of a core meanwhile; not judged
    /// (`None`) when the server's database runs in other processes.
    pub machine_quiet: Option<bool>,
    pub verification: Option<Verification>,
    pub figures: BTreeMap<String, f64>,
}

pub async fn run(args: PersistArgs) -> Result<()> {
    if args.senders == 0 || args.messages == 0 || args.window == 0 {
        bail!("--senders, --messages and --window must all be at least 1");
    }
    let target = Arc::new(Target::resolve(&args.common.url, args.common.source_addrs).await?);
    let server = args.pid.map(Proc::Pid);
    let limit = Duration::from_secs(args.common.connect_timeout_secs);
    let run_id = format!("{}-{}", epoch_nanos() / 1_000_000, std::process::id());
    let label = args.common.label();
    let room_for = |k: usize| -> Arc<str> {
        if args.shared_room {
            format!("persist-{run_id}").into()
        } else {
            format!("persist-{run_id}-{k}").into()
        }
    };
    eprintln!(
        "persist [{label}]: {} senders × {} messages, window {}, {}",
        args.senders,
        args.messages,
        args.window,
        if args.shared_room {
            "one shared room"
        } else {
            "one room each"
        }
    );

    // 1. Connect and join.
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut joins = Vec::with_capacity(args.senders);
    for k in 0..args.senders {
        let target = Arc::clone(&target);
        let permits = Arc::clone(&permits);
        let room = room_for(k);
        joins.push(tokio::spawn(async move {
            let _permit = permits.acquire().await?;
            let mut ws = target.connect(target.source_for(k), limit).await?;
            net::join_room(&mut ws, &room, &format!("j{k}"), limit).await?;
            Ok::<_, anyhow::Error>((ws, room))
        }));
    }
    let mut connections = Vec::new();
    let mut connect_failures = ErrorTally::default();
    for j in joins {
        match j.await {
            Ok(Ok(c)) => connections.push(c),
            Ok(Err(e)) => connect_failures.add(format!("{e:#}")),
            Err(e) => connect_failures.add(format!("connect task failed: {e}")),
        }
    }
    let connected = connections.len() as u64;
    eprintln!(
        "persist: {connected}/{} connected; failures: {connect_failures}",
        args.senders
    );
    if connections.is_empty() {
        bail!("no sender could connect: {connect_failures}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. Send.
    let cpu_watch = CpuWatch::new(server, vec![Proc::SelfProc]);
    let cpu_before = cpu_watch.sample()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let pad: Arc<str> = "x".repeat(args.payload_bytes).into();
    let mut tasks = Vec::new();
    for (k, (ws, room)) in connections.into_iter().enumerate() {
        let pad = Arc::clone(&pad);
        // clientMessageId must be unique per message: the server may treat a
        // repeated one in a room as a retry and deduplicate it.
        let client_prefix = format!("{run_id}-{k}");
        let spec = SendSpec {
            messages: args.messages,
            window: args.window,
            ack_timeout: Duration::from_secs(args.ack_timeout_secs),
            deadline,
        };
        tasks.push(tokio::spawn(send_and_await_acks(
            ws,
            room,
            pad,
            client_prefix,
            spec,
        )));
    }
    let Totals {
        sent,
        acked,
        errors,
        latency,
        duration_seconds,
        acked_by_key: acked_by_room,
    } = join_senders(tasks, started).await;
    let cpu_after = cpu_watch.sample()?;
    let cpu_interval = started.elapsed().as_secs_f64();
    let acked_per_second = rate(acked, duration_seconds);
    let ack_latency = latency.summary();
    let cpu = cpu_before.until(&cpu_after);
    let server_cpu = cpu.server;
    let server_cpu_ms_per_message = server_cpu
        .filter(|_| acked > 0)
        .map(|cpu| cpu * 1000.0 / acked as f64);

    // 3. Verify.
    let verification = if args.no_verify {
        None
    } else {
        Some(verify(&target, &acked_by_room, limit, args.concurrency).await)
    };

    let workload = variant(args.senders, args.messages, args.window, args.shared_room);
    let figures = figures(
        &match &args.database {
            Some(database) => format!("{database} {workload}"),
            None => workload,
        },
        acked_per_second,
        &ack_latency,
    );

    let report = PersistReport {
        scenario: "persist",
        label,
        url: target.url.clone(),
        senders: args.senders,
        connected,
        connect_failures,
        messages_per_sender: args.messages,
        window: args.window,
        shared_room: args.shared_room,
        payload_bytes: args.payload_bytes,
        sent,
        acked,
        errors,
        duration_seconds,
        acked_per_second,
        ack_latency,
        server_cpu_seconds: server_cpu,
        server_cpu_ms_per_message,
        client_cpu_seconds: cpu.clients,
        other_cpu_seconds: cpu.other,
        machine_quiet: args.database.is_none().then(|| {
            cpu.other
                .is_none_or(|o| cpu_interval <= 0.0 || o / cpu_interval <= 0.1)
        }),
        verification,
        figures,
    };
    let human = human_summary(&report, "lastSeq check", "rooms match");
    Report::new(&report, human).print(args.common.json)
}

/// The workload's name in figure names: the same for Parlor and for any
/// baseline that runs the same workload (`jetstream`), so that `summarize`
/// puts their figures on one row.
pub fn variant(senders: usize, messages: usize, window: usize, shared_room: bool) -> String {
    format!(
        "persist {senders} senders × {messages} msgs, window {window}{}",
        if shared_room { ", shared room" } else { "" }
    )
}

/// The comparison figures of a persist-shaped run.
pub fn figures(
    variant: &str,
    acked_per_second: f64,
    ack_latency: &LatencySummary,
) -> BTreeMap<String, f64> {
    let mut figures = BTreeMap::new();
    figures.insert(format!("{variant}: acked msgs/s"), acked_per_second);
    figures.insert(
        format!("{variant}: ack latency p50 (ms)"),
        ack_latency.p50_ms,
    );
    figures.insert(
        format!("{variant}: ack latency p99 (ms)"),
        ack_latency.p99_ms,
    );
    figures
}

/// The human rendering of a persist-shaped report; `check` names the
/// after-run verification and `matching` what its first count means.
pub fn human_summary(report: &PersistReport, check: &str, matching: &str) -> String {
    let mut human = format!(
        "{} [{}] {} — {} senders × {} messages, window {}{}\n  \
         sent {}, acked {} in {:.3} s → {:.0} acked messages/s; errors: {}\n  ack latency: {}",
        report.scenario,
        report.label,
        report.url,
        report.connected,
        report.messages_per_sender,
        report.window,
        if report.shared_room {
            ", shared room"
        } else {
            ""
        },
        report.sent,
        report.acked,
        report.duration_seconds,
        report.acked_per_second,
        report.errors,
        report.ack_latency,
    );
    if let (Some(cpu), Some(per)) = (report.server_cpu_seconds, report.server_cpu_ms_per_message) {
        human += &format!("\n  server CPU: {cpu:.2} s → {per:.3} CPU-ms per message");
    }
    human += &format!(
        "\n  load generator CPU: {:.2} s; other processes: {}",
        report.client_cpu_seconds,
        report
            .other_cpu_seconds
            .map_or_else(|| "n/a".to_owned(), |o| format!("{o:.2} s"))
    );
    if report.machine_quiet == Some(false) {
        human += "\n  WARNING: other processes used more than 10% of a core meanwhile; \
                  figures are skewed";
    }
    if let Some(v) = &report.verification {
        human += &format!(
            "\n  {check}: {}/{} {matching}, {} short (lost), {} over; failures: {}",
            v.rooms_matching, v.rooms_checked, v.rooms_short, v.rooms_over, v.failures
        );
        for e in &v.examples {
            human += &format!("\n    {e}");
        }
    }
    human
}

#[derive(Debug, Clone, Copy)]
struct SendSpec {
    messages: usize,
    window: usize,
    ack_timeout: Duration,
    deadline: Instant,
}

/// One sender: keeps up to `window` messages in flight until all are
/// answered, a wait exceeds `ack_timeout`, or the connection ends.
async fn send_and_await_acks(
    ws: Ws,
    room: Arc<str>,
    pad: Arc<str>,
    client_prefix: String,
    spec: SendSpec,
) -> SenderResult {
    let mut r = SenderResult::new(Arc::clone(&room));
    let (mut sink, mut stream) = ws.split();
    let mut in_flight: HashMap<String, Instant> = HashMap::new();
    let mut next = 0;
    let mut answered = 0;
    while answered < spec.messages {
        while in_flight.len() < spec.window && next < spec.messages {
            let id = format!("p{next}");
            let text = format!("persist {next} {pad}");
            let frame = net::send_request(&id, &room, &text, &format!("{client_prefix}-c{next}"));
            in_flight.insert(id, Instant::now());
            if let Err(e) = timeout(spec.ack_timeout, sink.send(Message::text(frame)))
                .await
                .map_err(|_| anyhow::anyhow!("send blocked for {:?}", spec.ack_timeout))
                .and_then(|r| r.context("send failed"))
            {
                r.errors.add(format!("{e:#}"));
                return r;
            }
            r.sent += 1;
            next += 1;
        }
        let wait_until = (Instant::now() + spec.ack_timeout).min(spec.deadline);
        let msg = match timeout_at(wait_until, stream.next()).await {
            Err(_) => {
                r.errors.add(format!(
                    "no ack within {:?} (or the run's --timeout-secs passed)",
                    spec.ack_timeout
                ));
                break;
            }
            Ok(None) => {
                r.errors.add("connection ended".to_owned());
                break;
            }
            Ok(Some(Err(e))) => {
                r.errors.add(format!("connection error: {e}"));
                break;
            }
            Ok(Some(Ok(msg))) => msg,
        };
        let text = match &msg {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => {
                r.errors.add(net::describe_close(&msg));
                break;
            }
            _ => continue,
        };
        let Some(frame) = ServerFrame::parse(text) else {
            continue;
        };
        let Some(sent_at) = frame
            .reply_to
            .as_deref()
            .and_then(|id| in_flight.remove(id))
        else {
            continue;
        };
        match frame.kind.as_ref() {
            "message-ack" => {
                let now = Instant::now();
                r.latency.record(now.duration_since(sent_at));
                r.acked += 1;
                r.last_ack = Some(now);
            }
            "error" => r.errors.add(frame.describe_error()),
            other => r.errors.add(format!("unexpected reply type {other:?}")),
        }
        answered += 1;
    }
    if let Ok(ws) = sink.reunite(stream) {
        net::close_quietly(ws).await;
    }
    r
}

/// Joins every room afresh and compares `lastSeq` with the acks counted.
async fn verify(
    target: &Arc<Target>,
    acked_by_room: &BTreeMap<Arc<str>, u64>,
    limit: Duration,
    concurrency: usize,
) -> Verification {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut checks = Vec::new();
    for (i, (room, &acked)) in acked_by_room.iter().enumerate() {
        let target = Arc::clone(target);
        let permits = Arc::clone(&permits);
        let room = Arc::clone(room);
        checks.push(tokio::spawn(async move {
            let _permit = permits.acquire().await?;
            let mut ws = target.connect(target.source_for(i), limit).await?;
            let joined = net::join_room(&mut ws, &room, "verify", limit).await?;
            net::close_quietly(ws).await;
            Ok::<_, anyhow::Error>((room, acked, joined.last_seq))
        }));
    }
    let mut v = Verification::default();
    for c in checks {
        v.rooms_checked += 1;
        match c.await {
            Ok(Ok((room, acked, last_seq))) => {
                if last_seq == acked {
                    v.rooms_matching += 1;
                    continue;
                }
                if last_seq < acked {
                    v.rooms_short += 1;
                } else {
                    v.rooms_over += 1;
                }
                if v.examples.len() < 5 {
                    v.examples
                        .push(format!("room {room}: {acked} acked but lastSeq {last_seq}"));
                }
            }
            Ok(Err(e)) => v.failures.add(format!("{e:#}")),
            Err(e) => v.failures.add(format!("check task failed: {e}")),
        }
    }
    v
}

//! `idle`: memory cost of idle, joined connections.
//!
//! The parent samples the server's RSS, starts `--procs` worker processes
//! that together open `--conns` connections (spread over the loopback source
//! addresses and `--rooms` rooms, each joined), waits for all of them plus a
//! settle period, samples the RSS again, then tells the workers to release
//! their connections. RSS per connection = (after − before) / joined.
//!
//! The same measurement serves Pusher servers (`pusher idle`): the connections then
//! subscribe to public channels instead of joining rooms, and answer `pusher:ping`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Delivery, Protocol, Target};
use crate::procfs::Proc;
use crate::worker::{self, ErrorTally, Worker};
use crate::{CommonArgs, Report};

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PID of the server process (its /proc/PID/status is sampled).
    #[arg(long)]
    pub pid: u32,
    /// Number of connections to open.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Number of rooms the connections are spread over (round robin).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Worker processes to spread the connections over (each process can
    /// hold about 19,900 sockets).
    #[arg(long, default_value_t = 2)]
    pub procs: usize,
    /// Connection attempts in flight at once, over all workers.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds to wait after the last join before sampling RSS.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Upper bound, in seconds, for opening and joining all connections.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

/// Arguments of the hidden `worker idle` subcommand.
#[derive(Debug, Args)]
pub struct IdleWorkerArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub conns: usize,
    /// Global index of this worker's first connection (picks rooms and
    /// source addresses so that workers do not overlap).
    #[arg(long)]
    pub offset: usize,
    #[arg(long)]
    pub rooms: usize,
    #[arg(long)]
    pub room_prefix: String,
    #[arg(long)]
    pub source_addrs: u8,
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub connect_timeout_secs: u64,
    #[arg(long)]
    pub index: usize,
    /// What the connections speak; for `pusher` the rooms are public channels.
    #[arg(long, value_enum, default_value_t = Protocol::Parlor)]
    pub protocol: Protocol,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum IdleEvent {
    Ready {
        joined: u64,
        failed: ErrorTally,
    },
    Released {
        /// Connections still open when the parent asked for release.
        alive: u64,
        /// Connections the server closed (or that failed) while idle.
        dropped: u64,
        close_codes: BTreeMap<String, u64>,
    },
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub label: String,
    pub url: String,
    pub conns: usize,
    pub rooms: usize,
    pub procs: usize,
    pub joined: u64,
    pub failed: ErrorTally,
    pub connect_seconds: f64,
    pub joins_per_second: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_conn_kib: f64,
    /// CPU the server used while the connections sat idle (the settle period): timers,
    /// keep-alives, presence renewal, position checks.
    pub idle_server_cpu_seconds: f64,
    /// Machine CPU over the same period not used by the server or this process: the
    /// database, Redis, the worker processes holding the connections, anything else.
    pub idle_other_cpu_seconds: Option<f64>,
    pub fds_before: Option<u64>,
    pub fds_after: Option<u64>,
    pub rss_after_release_kib: Option<u64>,
    pub alive_at_release: u64,
    pub dropped_while_idle: u64,
    pub close_codes: BTreeMap<String, u64>,
    pub figures: BTreeMap<String, f64>,
}

pub async fn run(args: IdleArgs) -> Result<()> {
    measure(args, Protocol::Parlor).await
}

/// The measurement, with connections that speak `protocol` (for Pusher, `--url` is the
/// app's socket URL, `/app/{key}?protocol=7`).
pub(crate) async fn measure(args: IdleArgs, protocol: Protocol) -> Result<()> {
    let (scenario, rooms_are) = match protocol {
        Protocol::Parlor => ("idle", "rooms"),
        Protocol::Pusher => ("pusher-idle", "channels"),
    };
    if args.conns == 0 || args.rooms == 0 || args.procs == 0 {
        bail!("--conns, --rooms and --procs must all be at least 1");
    }
    let target = Target::resolve(&args.common.url, args.common.source_addrs).await?;
    let server = Proc::Pid(args.pid);
    let room_prefix = format!(
        "idle-{}-{}",
        crate::stats::epoch_nanos() / 1_000_000,
        std::process::id()
    );

    let rss_before = server.rss_kib()?;
    let fds_before = server.open_fds().ok();
    eprintln!(
        "idle: server pid {} RSS {} KiB before; opening {} connections to {} from {} worker process(es)",
        args.pid, rss_before, args.conns, target.url, args.procs
    );

    let shares = worker::split_evenly(args.conns, args.procs);
    let per_worker_concurrency = args.concurrency.div_ceil(args.procs).max(1);
    let mut workers: Vec<Worker<IdleEvent>> = Vec::new();
    let mut offset = 0;
    for (index, &count) in shares.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let worker_args = vec![
            "idle".to_owned(),
            format!("--url={}", target.url),
            format!("--conns={count}"),
            format!("--offset={offset}"),
            format!("--rooms={}", args.rooms),
            format!("--room-prefix={room_prefix}"),
            format!("--source-addrs={}", args.common.source_addrs),
            format!("--concurrency={per_worker_concurrency}"),
            format!(
                "--connect-timeout-secs={}",
                args.common.connect_timeout_secs
            ),
            format!("--index={index}"),
            format!("--protocol={}", protocol.arg()),
        ];
        workers.push(Worker::spawn(index, &worker_args)?);
        offset += count;
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut joined = 0;
    let mut failed = ErrorTally::default();
    for w in &mut workers {
        match w.next_event(deadline, "its joined connections").await? {
            IdleEvent::Ready {
                joined: j,
                failed: f,
            } => {
                joined += j;
                failed.merge(&f);
            }
            other => bail!("worker {} sent {other:?} before ready", w.index),
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    if joined == 0 {
        bail!("no connection could join: {failed}");
    }
    eprintln!(
        "idle: {joined} joined, {} failed in {connect_seconds:.1} s; settling {} s",
        failed.total, args.settle_secs
    );

    let watch = crate::procfs::CpuWatch::new(Some(server), vec![Proc::SelfProc]);
    let idle_from = watch.sample()?;
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let idle_use = idle_from.until(&watch.sample()?);
    let rss_after = server.rss_kib()?;
    let fds_after = server.open_fds().ok();

    for w in &mut workers {
        w.command("release").await;
    }
    let release_deadline = Instant::now() + Duration::from_secs(60);
    let mut alive = 0;
    let mut dropped = 0;
    let mut close_codes: BTreeMap<String, u64> = BTreeMap::new();
    for w in &mut workers {
        match w.next_event(release_deadline, "its release").await {
            Ok(IdleEvent::Released {
                alive: a,
                dropped: d,
                close_codes: c,
            }) => {
                alive += a;
                dropped += d;
                for (code, n) in c {
                    *close_codes.entry(code).or_insert(0) += n;
                }
            }
            Ok(other) => eprintln!("worker {} sent {other:?} instead of released", w.index),
            Err(e) => eprintln!("{e:#}"),
        }
    }
    for w in workers {
        w.finish(Duration::from_secs(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_release = server.rss_kib().ok();

    let rss_per_conn = rss_after.saturating_sub(rss_before) as f64 / joined as f64;
    let joins_per_second = crate::stats::rate(joined, connect_seconds);
    let label = args.common.label();
    let mut figures = BTreeMap::new();
    figures.insert(
        format!(
            "{}, {} conns in {} {rooms_are}: server RSS per connection (KiB)",
            scenario.replace('-', " "),
            args.conns,
            args.rooms
        ),
        rss_per_conn,
    );
    // The connect+join rate is reported but not a comparison figure: it
    // depends on what each server sends per join (Parlor: member list and
    // presence to the room; the Node baseline: neither).
    let report = IdleReport {
        scenario,
        label,
        url: target.url.clone(),
        conns: args.conns,
        rooms: args.rooms,
        procs: args.procs,
        joined,
        failed,
        connect_seconds,
        joins_per_second,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_conn_kib: rss_per_conn,
        idle_server_cpu_seconds: idle_use.server.unwrap_or(0.0),
        idle_other_cpu_seconds: idle_use.other,
        fds_before,
        fds_after,
        rss_after_release_kib: rss_after_release,
        alive_at_release: alive,
        dropped_while_idle: dropped,
        close_codes,
        figures,
    };
    let human = format!(
        "{scenario} [{label}] {url}\n  connections: {joined}/{conns} joined over {rooms} {rooms_are} in {secs:.1} s \
         ({rate:.0}/s); failures: {failed}\n  server RSS: {before} KiB before, {after} KiB after \
         → {per:.1} KiB per connection\n  while idle ({settle} s): server CPU {idle_cpu:.3} s, \
         other processes {idle_other}\n  server fds: {fdb} before, {fda} after; RSS after release: {rel}\n  \
         at release: {alive} alive, {dropped} dropped while idle {codes:?}",
        label = report.label,
        url = report.url,
        joined = report.joined,
        conns = report.conns,
        rooms = report.rooms,
        secs = report.connect_seconds,
        rate = report.joins_per_second,
        failed = report.failed,
        before = report.rss_before_kib,
        after = report.rss_after_kib,
        per = report.rss_per_conn_kib,
        settle = args.settle_secs,
        idle_cpu = report.idle_server_cpu_seconds,
        idle_other = report
            .idle_other_cpu_seconds
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.3} s")),
        fdb = opt(report.fds_before),
        fda = opt(report.fds_after),
        rel = report
            .rss_after_release_kib
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v} KiB")),
        alive = report.alive_at_release,
        dropped = report.dropped_while_idle,
        codes = report.close_codes,
    );
    Report::new(&report, human).print(args.common.json)
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

/// Body of the hidden `worker idle` subcommand.
pub async fn worker_main(args: IdleWorkerArgs) -> Result<()> {
    let target = Arc::new(Target::resolve(&args.url, args.source_addrs).await?);
    let limit = Duration::from_secs(args.connect_timeout_secs);
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (release_tx, release_rx) = watch::channel(false);
    let (joined_tx, mut joined_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let dropped = Arc::new(AtomicU64::new(0));
    let close_counts = Arc::new(codes::Codes::default());
    let protocol = args.protocol;

    let mut tasks = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let global = args.offset + i;
        let room = format!("{}-{}", args.room_prefix, global % args.rooms);
        let target = Arc::clone(&target);
        let permits = Arc::clone(&permits);
        let joined_tx = joined_tx.clone();
        let mut release = release_rx.clone();
        let dropped = Arc::clone(&dropped);
        let close_counts = Arc::clone(&close_counts);
        tasks.push(tokio::spawn(async move {
            let connected = async {
                let _permit = permits.acquire().await?;
                let mut ws = target.connect(target.source_for(global), limit).await?;
                protocol
                    .join(&mut ws, &room, &format!("j{global}"), limit)
                    .await?;
                Ok::<_, anyhow::Error>(ws)
            }
            .await;
            let mut ws = match connected {
                Ok(ws) => {
                    let _ = joined_tx.send(Ok(()));
                    ws
                }
                Err(e) => {
                    let _ = joined_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            drop(joined_tx);
            // Hold the connection, draining whatever the server sends
            // (presence etc.), until released.
            loop {
                tokio::select! {
                    _ = release.changed() => break,
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Close(frame))) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            close_counts.add(net::close_code(&Message::Close(frame)).map_or_else(|| "none".to_owned(), |c| c.to_string()));
                            return;
                        }
                        Some(Ok(Message::Text(text))) if protocol == Protocol::Pusher => {
                            // Pusher's keep-alive: a server that gets no pong closes the
                            // connection.
                            if matches!(crate::pusher::socket::decode(text.as_str(), &room), Delivery::Ping)
                                && ws.send(Message::text(crate::pusher::socket::PONG)).await.is_err()
                            {
                                dropped.fetch_add(1, Ordering::Relaxed);
                                close_counts.add("error: sending pusher:pong failed".to_owned());
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            close_counts.add(format!("error: {e}"));
                            return;
                        }
                        None => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            close_counts.add("eof".to_owned());
                            return;
                        }
                    }
                }
            }
            net::close_quietly(ws).await;
        }));
    }
    drop(joined_tx);

    let mut joined = 0u64;
    let mut failed = ErrorTally::default();
    let mut last_progress = Instant::now();
    while let Some(result) = joined_rx.recv().await {
        match result {
            Ok(()) => joined += 1,
            Err(e) => failed.add(e),
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "  worker {}: {joined}/{} joined, {} failed",
                args.index, args.conns, failed.total
            );
        }
    }
    worker::emit(&IdleEvent::Ready { joined, failed })?;

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let _ = worker::next_command(&mut stdin).await;
    let dropped_now = dropped.load(Ordering::Relaxed);
    let _ = release_tx.send(true);
    let close_codes = close_counts.snapshot();
    worker::emit(&IdleEvent::Released {
        alive: joined.saturating_sub(dropped_now),
        dropped: dropped_now,
        close_codes,
    })?;
    let _ = timeout(
        Duration::from_secs(15),
        futures_util::future::join_all(tasks),
    )
    .await;
    Ok(())
}

/// A tiny thread-safe counter map for close codes.
mod codes {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub struct Codes(Mutex<BTreeMap<String, u64>>);

    impl Codes {
        pub fn add(&self, code: String) {
            if let Ok(mut map) = self.0.lock() {
                *map.entry(code).or_insert(0) += 1;
            }
        }

        pub fn snapshot(&self) -> BTreeMap<String, u64> {
            self.0.lock().map(|m| m.clone()).unwrap_or_default()
        }
    }
}

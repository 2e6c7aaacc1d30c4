//! `pusher`: the fan-out and idle scenarios in Pusher Channels protocol 7, so that the same
//! client measures Parlor and the Pusher-compatible servers (Soketi, Sockudo).
//!
//! * `pusher fanout` — `--subs` subscribers open `/app/{key}?protocol=7`, wait for
//!   `pusher:connection_established`, subscribe to the public channel `--channel` and wait
//!   for `pusher_internal:subscription_succeeded` (the subscribers of `fanout`, speaking
//!   Pusher: [`crate::fanout::Subscribers`], in worker processes with `--procs`). Then a
//!   publisher sends `--messages` events through the HTTP API (`POST /apps/{id}/events`,
//!   signed: [`api`]) over `--window` keep-alive connections, one request in flight on
//!   each: as fast as the server answers (`burst`), or at `--rate` events per second
//!   (`paced`). An event's `data` is the text `fanout` sends (`t:<ns since the epoch>:<index>:
//!   <filler>`), its time taken just before the request is signed and written, so latency
//!   runs from the start of the publish call to receipt.
//!
//!   Figures: deliveries (every subscriber must get every event once: missing and
//!   duplicates are counted), deliveries/s = deliveries ÷ (last receipt − first publish),
//!   latency percentiles, HTTP API refusals and failures, the API's own response time, and
//!   the server's CPU-seconds per million deliveries (utime + stime of `--pid` between just
//!   before the first publish and the last receipt).
//! * `pusher idle` — `idle`'s measurement with connections that each subscribe to one of
//!   `--channels` public channels and answer `pusher:ping`: server RSS per connection.
//!
//! `--url` names the server: its scheme, host and port are used (the socket path becomes
//! `/app/{key}?protocol=7`), and the HTTP API is at the same address.

pub(crate) mod api;
pub(crate) mod socket;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::http::Uri;

use crate::fanout::{self, DeliveryCpu, GroupSpec, Mode, Subscribers};
use crate::idle::{self, IdleArgs};
use crate::net::{Protocol, Target};
use crate::procfs::{CpuWatch, Proc};
use crate::stats::{Latencies, LatencySummary, epoch_nanos, rate};
use crate::worker::ErrorTally;
use crate::{CommonArgs, Report};

#[derive(Debug, Args)]
pub struct PusherArgs {
    #[command(subcommand)]
    pub scenario: PusherScenario,
}

#[derive(Debug, Subcommand)]
pub enum PusherScenario {
    /// Events published through the HTTP API to one channel's subscribers: deliveries/s,
    /// latency, server CPU per delivery.
    Fanout(PusherFanoutArgs),
    /// Server memory per idle, subscribed connection.
    Idle(PusherIdleArgs),
}

/// The app the server under test is configured with.
#[derive(Debug, Args)]
pub struct AppArgs {
    /// The app id (the HTTP API's `/apps/{id}`).
    #[arg(long, default_value = "bench")]
    pub app_id: String,
    /// The app key (the socket's `/app/{key}`, the API's `auth_key`).
    #[arg(long, default_value = "bench-key")]
    pub key: String,
    /// The app secret, which signs the API requests.
    #[arg(long, default_value = "bench-secret-0123456789")]
    pub secret: String,
}

impl AppArgs {
    fn app(&self) -> Result<api::App> {
        let app = api::App {
            id: self.app_id.clone(),
            key: self.key.clone(),
            secret: self.secret.clone(),
        };
        app.check()?;
        Ok(app)
    }
}

#[derive(Debug, Args)]
pub struct PusherFanoutArgs {
    // `--url`: the server's WebSocket address, `ws://HOST:PORT` (a path is replaced by
    // `/app/{key}?protocol=7`; the HTTP API is at the same HOST:PORT).
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub app: AppArgs,
    /// PID of the server process, for its CPU time and RSS (for Soketi: the node
    /// process). Without it those figures are left out.
    #[arg(long, visible_alias = "server-pid")]
    pub pid: Option<u32>,
    /// Number of subscriber connections on the channel.
    #[arg(long, default_value_t = 1000)]
    pub subs: usize,
    /// Number of events published.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    #[arg(long, value_enum, default_value_t = Mode::Burst)]
    pub mode: Mode,
    /// Events per second in paced mode.
    #[arg(long, default_value_t = 30.0)]
    pub rate: f64,
    /// API requests in flight at once: as many keep-alive connections, one request at a
    /// time on each.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Worker processes for the subscribers; 1 keeps them in this process.
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Filler bytes appended to each event's data.
    #[arg(long, default_value_t = 32)]
    pub payload_bytes: usize,
    /// Pause between the last subscription and the first publish, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// How long to wait for deliveries after the last publish, in seconds.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout_secs: u64,
    /// Upper bound, in seconds, for connecting and subscribing all subscribers.
    #[arg(long, default_value_t = 300)]
    pub join_timeout_secs: u64,
    /// Limit for one API request (connect, send, whole response), in seconds.
    #[arg(long, default_value_t = 10)]
    pub api_timeout_secs: u64,
    /// The public channel.
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// The events' name.
    #[arg(long, default_value = "bench-event")]
    pub event: String,
}

#[derive(Debug, Args)]
pub struct PusherIdleArgs {
    // `--url`: the server's WebSocket address, as for `pusher fanout`.
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub app: AppArgs,
    /// PID of the server process (its /proc/PID/status is sampled; for Soketi: the node
    /// process).
    #[arg(long, visible_alias = "server-pid")]
    pub pid: u32,
    /// Number of connections to open.
    #[arg(long, default_value_t = 19_000)]
    pub conns: usize,
    /// Number of public channels the connections are spread over (round robin).
    #[arg(long, default_value_t = 190)]
    pub channels: usize,
    /// Worker processes to spread the connections over (each process can hold about
    /// 19,900 sockets).
    #[arg(long, default_value_t = 2)]
    pub procs: usize,
    /// Connection attempts in flight at once, over all workers.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds to wait after the last subscription before sampling RSS.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Upper bound, in seconds, for opening and subscribing all connections.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

pub async fn run(args: PusherArgs) -> Result<()> {
    match args.scenario {
        PusherScenario::Fanout(args) => run_fanout(args).await,
        PusherScenario::Idle(args) => run_idle(args).await,
    }
}

/// The app's socket URL on the server `url` (`ws://HOST:PORT[/…]`).
fn socket_url(url: &str, key: &str) -> Result<String> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?} (expected ws://HOST:PORT)"))?;
    let scheme = uri.scheme_str().unwrap_or("ws");
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("URL {url:?} has no host"))?;
    Ok(format!(
        "{scheme}://{authority}/app/{key}?protocol=7&client=parlor-bench&version={}",
        env!("CARGO_PKG_VERSION")
    ))
}

async fn run_idle(args: PusherIdleArgs) -> Result<()> {
    let app = args.app.app()?;
    let common = CommonArgs {
        url: socket_url(&args.common.url, &app.key)?,
        ..args.common
    };
    let idle = IdleArgs {
        common,
        pid: args.pid,
        conns: args.conns,
        rooms: args.channels,
        procs: args.procs,
        concurrency: args.concurrency,
        settle_secs: args.settle_secs,
        timeout_secs: args.timeout_secs,
    };
    idle::measure(idle, Protocol::Pusher).await
}

/// What the publisher saw.
#[derive(Debug, Default, Serialize)]
pub struct PublisherOutcome {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered 2xx.
    pub accepted: u64,
    /// Requests refused (non-2xx, by status and body) or failed (no answer).
    pub failures: ErrorTally,
    /// Epoch nanoseconds of the first and last publish call's start.
    pub first_send_nanos: u64,
    pub last_send_nanos: u64,
    /// From the start of publishing to the last answer.
    pub send_seconds: f64,
    /// Request → response time of the API calls.
    pub api_latency: LatencySummary,
}

/// What every publishing connection sends, and when.
#[derive(Debug)]
struct PublishPlan {
    app: api::App,
    api_addr: std::net::SocketAddr,
    channel: String,
    event: String,
    messages: usize,
    pad: String,
    /// Paced: event `i` is due at `started + i × interval`, and carries that time, not
    /// the time it was sent: a server that holds the publisher back is charged for the
    /// wait (no coordinated omission).
    interval: Option<Duration>,
    started: Instant,
    /// `started` in nanoseconds since the epoch.
    started_epoch_nanos: u64,
    api_timeout: Duration,
    /// The next event index to send, shared by the connections.
    next: AtomicUsize,
}

/// One publishing connection's share of what the publisher saw.
#[derive(Debug, Default)]
struct Published {
    sent: u64,
    accepted: u64,
    failures: ErrorTally,
    first_send_nanos: u64,
    last_send_nanos: u64,
    api_latency: Latencies,
}

/// One keep-alive connection publishing events until all are taken.
async fn publish(plan: Arc<PublishPlan>) -> Published {
    let mut out = Published::default();
    let mut client = api::Client::new(plan.api_addr, plan.api_timeout);
    let path = plan.app.events_path();
    loop {
        let index = plan.next.fetch_add(1, Ordering::Relaxed);
        if index >= plan.messages {
            break;
        }
        let now = match plan.interval {
            Some(interval) => {
                let due = interval.mul_f64(index as f64);
                sleep_until(plan.started + due).await;
                plan.started_epoch_nanos + u64::try_from(due.as_nanos()).unwrap_or(u64::MAX)
            }
            None => epoch_nanos(),
        };
        let body = api::event_body(
            &plan.event,
            &plan.channel,
            &fanout::payload(now, index, &plan.pad),
        );
        let query = plan
            .app
            .signed_query("POST", &path, body.as_bytes(), now / 1_000_000_000);
        let asked = Instant::now();
        let answer = client.post_json(&format!("{path}?{query}"), &body).await;
        out.api_latency.record(asked.elapsed());
        if out.sent == 0 {
            out.first_send_nanos = now;
        }
        out.last_send_nanos = now;
        out.sent += 1;
        match answer {
            Ok(r) if (200..300).contains(&r.status) => out.accepted += 1,
            Ok(r) => out
                .failures
                .add(format!("HTTP {}: {}", r.status, r.body.trim())),
            Err(e) => out.failures.add(format!("{e:#}")),
        }
    }
    out
}

/// Publishes every event over `window` connections; returns what they saw.
async fn publish_all(plan: PublishPlan, window: usize) -> Result<PublisherOutcome> {
    let plan = Arc::new(plan);
    let tasks: Vec<_> = (0..window.max(1))
        .map(|_| tokio::spawn(publish(Arc::clone(&plan))))
        .collect();
    let mut total = PublisherOutcome::default();
    let mut latency = Latencies::new();
    for task in tasks {
        let p = task.await.context("a publisher task failed")?;
        if p.sent > 0 {
            if total.sent == 0 || p.first_send_nanos < total.first_send_nanos {
                total.first_send_nanos = p.first_send_nanos;
            }
            total.last_send_nanos = total.last_send_nanos.max(p.last_send_nanos);
        }
        total.sent += p.sent;
        total.accepted += p.accepted;
        total.failures.merge(&p.failures);
        latency.merge(&p.api_latency);
    }
    total.send_seconds = plan.started.elapsed().as_secs_f64();
    total.api_latency = latency.summary();
    Ok(total)
}

#[derive(Debug, Serialize)]
pub struct PusherFanoutReport {
    pub scenario: &'static str,
    pub label: String,
    pub url: String,
    pub mode: Mode,
    pub rate: Option<f64>,
    pub subs: usize,
    pub messages: usize,
    pub window: usize,
    pub payload_bytes: usize,
    pub procs: usize,
    pub channel: String,
    pub joined: u64,
    pub join_failures: ErrorTally,
    pub publisher: PublisherOutcome,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub malformed: u64,
    /// `pusher:error` frames the subscribers got.
    pub server_errors: ErrorTally,
    pub complete_subscribers: u64,
    pub disconnected: ErrorTally,
    pub duration_seconds: f64,
    pub deliveries_per_second: f64,
    pub latency: LatencySummary,
    /// CPU and memory over the run, from just before the first publish until every
    /// subscriber is done (flattened: the same keys as `fanout`'s).
    #[serde(flatten)]
    pub cpu: DeliveryCpu,
    pub figures: BTreeMap<String, f64>,
}

async fn run_fanout(args: PusherFanoutArgs) -> Result<()> {
    if args.subs == 0 || args.messages == 0 || args.window == 0 {
        bail!("--subs, --messages and --window must be at least 1");
    }
    if args.mode == Mode::Paced && !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of events per second");
    }
    let app = args.app.app()?;
    let url = socket_url(&args.common.url, &app.key)?;
    let target = Arc::new(Target::resolve(&url, args.common.source_addrs).await?);
    let server = args.pid.map(Proc::Pid);
    if let Some(server) = server {
        server.rss_kib()?;
    }
    let channel: Arc<str> = args.channel.as_str().into();
    let label = args.common.label();
    eprintln!(
        "pusher fanout [{label}]: {} subscribers on {channel}, {} events ({}), window {}",
        args.subs,
        args.messages,
        match args.mode {
            Mode::Burst => "burst".to_owned(),
            Mode::Paced => format!("paced at {}/s", args.rate),
        },
        args.window
    );

    // 1. Subscribers connect and subscribe.
    let join_started = Instant::now();
    let spec = GroupSpec {
        target: Arc::clone(&target),
        room: Arc::clone(&channel),
        messages: args.messages,
        offset: 0,
        count: args.subs,
        concurrency: args.concurrency,
        connect_timeout: Duration::from_secs(args.common.connect_timeout_secs),
        protocol: Protocol::Pusher,
    };
    let (subscribers, joined, join_failures) = Subscribers::start(
        spec,
        args.procs,
        &[],
        args.common.source_addrs,
        join_started + Duration::from_secs(args.join_timeout_secs),
    )
    .await?;
    eprintln!(
        "pusher fanout: {joined}/{} subscribed in {:.1} s; failures: {join_failures}",
        args.subs,
        join_started.elapsed().as_secs_f64()
    );
    if joined == 0 {
        bail!("no subscriber could subscribe: {join_failures}");
    }
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;

    // 2. Publish, with the CPU clocks read around it.
    let mut clients = vec![Proc::SelfProc];
    clients.extend(subscribers.worker_pids().into_iter().map(Proc::Pid));
    let cpu_watch = CpuWatch::new(server, clients);
    let cpu_before = cpu_watch.sample()?;
    let cpu_started = Instant::now();
    let rss_before = server.map(|s| s.rss_kib()).transpose()?;
    let plan = PublishPlan {
        app,
        api_addr: target.addr,
        channel: channel.to_string(),
        event: args.event.clone(),
        messages: args.messages,
        pad: "x".repeat(args.payload_bytes),
        interval: match args.mode {
            Mode::Burst => None,
            Mode::Paced => Some(Duration::from_secs_f64(1.0 / args.rate)),
        },
        started: Instant::now(),
        started_epoch_nanos: epoch_nanos(),
        api_timeout: Duration::from_secs(args.api_timeout_secs),
        next: AtomicUsize::new(0),
    };
    let publisher = publish_all(plan, args.window).await?;
    // Events the API did not take will never arrive: do not wait the full drain time.
    let drain = if publisher.accepted < args.messages as u64 {
        Duration::from_secs(args.drain_timeout_secs.min(5))
    } else {
        Duration::from_secs(args.drain_timeout_secs)
    };

    // 3. Wait for the deliveries.
    let (summary, local_sockets, workers) = subscribers.finish(Instant::now() + drain).await?;
    let cpu_after = cpu_watch.sample()?;
    let cpu_interval = cpu_started.elapsed().as_secs_f64();
    let rss_after = server.map(|s| s.rss_kib()).transpose()?;
    fanout::close_all(local_sockets).await;
    for w in workers {
        w.finish(Duration::from_secs(20)).await;
    }

    // 4. Figures.
    let expected = joined * args.messages as u64;
    let duration_seconds = summary
        .last_recv_nanos
        .saturating_sub(publisher.first_send_nanos) as f64
        / 1e9;
    let deliveries = summary.received;
    let deliveries_per_second = rate(deliveries, duration_seconds);
    let latency = Latencies::from_pairs(&summary.latency)?.summary();
    let cpu = DeliveryCpu::new(
        cpu_before.until(&cpu_after),
        cpu_interval,
        deliveries,
        (rss_before, rss_after),
    );
    let variant = match args.mode {
        Mode::Burst => format!(
            "pusher burst (window {}), {} subs × {} events",
            args.window, args.subs, args.messages
        ),
        Mode::Paced => format!(
            "pusher paced {}/s, {} subs × {} events",
            args.rate, args.subs, args.messages
        ),
    };
    let mut figures = BTreeMap::new();
    if args.mode == Mode::Burst {
        figures.insert(format!("{variant}: deliveries/s"), deliveries_per_second);
    }
    figures.insert(format!("{variant}: latency p99 (ms)"), latency.p99_ms);
    if let Some(v) = cpu.server_cpu_seconds_per_million {
        figures.insert(format!("{variant}: server CPU-s per 1M deliveries"), v);
    }

    let report = PusherFanoutReport {
        scenario: "pusher-fanout",
        label,
        url: target.url.clone(),
        mode: args.mode,
        rate: (args.mode == Mode::Paced).then_some(args.rate),
        subs: args.subs,
        messages: args.messages,
        window: args.window,
        payload_bytes: args.payload_bytes,
        procs: args.procs,
        channel: channel.to_string(),
        joined,
        join_failures,
        publisher,
        expected_deliveries: expected,
        deliveries,
        missing: expected.saturating_sub(deliveries),
        duplicates: summary.duplicates,
        malformed: summary.malformed,
        server_errors: summary.server_errors,
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

fn human_summary(r: &PusherFanoutReport) -> String {
    let p = &r.publisher;
    let mut out = format!(
        "pusher fanout [{}] {} — {}{}, {} subscribers on {} × {} events\n",
        r.label,
        r.url,
        r.mode.name(),
        r.rate.map(|v| format!(" at {v}/s")).unwrap_or_default(),
        r.joined,
        r.channel,
        r.messages
    );
    out += &format!(
        "  publisher (window {}): {} sent in {:.3} s, {} accepted; refused/failed: {}\n  \
         API response time: {}\n",
        r.window, p.sent, p.send_seconds, p.accepted, p.failures, p.api_latency
    );
    out += &format!(
        "  deliveries: {}/{} (missing {}, duplicate {}, malformed {}); pusher:error: {}; \
         {}/{} subscribers complete; disconnected: {}\n",
        r.deliveries,
        r.expected_deliveries,
        r.missing,
        r.duplicates,
        r.malformed,
        r.server_errors,
        r.complete_subscribers,
        r.joined,
        r.disconnected
    );
    out += &format!(
        "  throughput: {:.0} deliveries/s over {:.3} s (first publish → last receipt)\n",
        r.deliveries_per_second, r.duration_seconds
    );
    out += &format!("  latency (publish call → receipt): {}\n", r.latency);
    r.cpu.describe(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Mutex;

    #[test]
    fn socket_url_keeps_the_address_and_replaces_the_path() -> Result<()> {
        let url = socket_url("ws://127.0.0.1:16001/ws", "bench-key")?;
        assert!(
            url.starts_with("ws://127.0.0.1:16001/app/bench-key?protocol=7&"),
            "{url}"
        );
        assert_eq!(
            socket_url("ws://127.0.0.1:16002", "k")?,
            socket_url("ws://127.0.0.1:16002/", "k")?
        );
        Ok(())
    }

    /// Publishes to a fake API that answers 200, then 429, then closes: every event is
    /// sent once and each answer is counted.
    #[tokio::test]
    async fn publisher_sends_each_event_once_and_counts_refusals() -> Result<()> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = Arc::clone(&bodies);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((socket, _)) = listener.accept().await {
                let mut conn = BufReader::new(socket);
                loop {
                    let mut line = String::new();
                    let mut length = 0;
                    let mut target = String::new();
                    while conn.read_line(&mut line).await.unwrap_or(0) > 0 {
                        let l = line.trim_end().to_owned();
                        line.clear();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("Content-Length: ") {
                            length = v.parse().unwrap_or(0);
                        } else if l.starts_with("POST ") {
                            target = l;
                        }
                    }
                    if target.is_empty() {
                        break;
                    }
                    let mut body = vec![0; length];
                    if conn.read_exact(&mut body).await.is_err() {
                        break;
                    }
                    seen.lock()
                        .await
                        .push(String::from_utf8_lossy(&body).into_owned());
                    assert!(target.contains("/apps/bench/events?auth_key=bench-key&"));
                    n += 1;
                    let answer: &[u8] = match n % 3 {
                        1 => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                        2 => b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nslow",
                        _ => b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
                    };
                    let _ = conn.get_mut().write_all(answer).await;
                    if n % 3 == 0 {
                        break;
                    }
                }
            }
        });
        let plan = PublishPlan {
            app: api::App {
                id: "bench".into(),
                key: "bench-key".into(),
                secret: "s".into(),
            },
            api_addr: addr,
            channel: "c".into(),
            event: "e".into(),
            messages: 9,
            pad: "xx".into(),
            interval: None,
            started: Instant::now(),
            started_epoch_nanos: epoch_nanos(),
            api_timeout: Duration::from_secs(5),
            next: AtomicUsize::new(0),
        };
        let out = publish_all(plan, 1).await?;
        assert_eq!((out.sent, out.accepted, out.failures.total), (9, 6, 3));
        assert_eq!(out.failures.by_message.get("HTTP 429: slow"), Some(&3));
        let mut indices: Vec<usize> = Vec::new();
        for body in bodies.lock().await.iter() {
            let v: serde_json::Value = serde_json::from_str(body)?;
            let data = v["data"].as_str().unwrap_or_default().to_owned();
            let (_, index) = fanout::parse_payload(&data).ok_or_else(|| anyhow!("bad data"))?;
            indices.push(index);
        }
        indices.sort_unstable();
        assert_eq!(indices, (0..9).collect::<Vec<_>>());
        Ok(())
    }
}

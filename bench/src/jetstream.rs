//! `jetstream`: the `persist` workload against NATS JetStream, as a baseline
//! for Parlor's durable writes.
//!
//! The scenario creates a fresh stream with file storage (a unique name,
//! subjects `parlor-bench.<run>.>`) on a NATS server with JetStream enabled,
//! opens `--senders` client connections, and each sender publishes
//! `--messages` messages to a subject of its own (or one shared subject with
//! `--shared-room`), keeping at most `--window` publishes without their
//! `PubAck` (window 1: publish, await the ack, publish the next). The body of
//! each message is the text `persist` sends as a chat message (`persist <i> `
//! and `--payload-bytes` filler), and its `Nats-Msg-Id` header is unique, as
//! `persist`'s `clientMessageId` is (so the stream's duplicate check runs as
//! Parlor's does; `--no-msg-id` leaves the header out). Every `PubAck` is
//! timed against its publish. Afterwards (unless `--no-verify`) the stream's
//! per-subject message counts are compared with the acks counted, and the
//! stream is deleted.
//!
//! Figures: acknowledged messages/s = acks ÷ (last ack − first publish); ack
//! latency percentiles over all acks; with `--pid` (the NATS server's), the
//! server's CPU per message. The report has `persist`'s shape and figure
//! names, under the label `jetstream`, so that `summarize` sets it beside
//! Parlor's persist figures.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use clap::Args;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};

use crate::Report;
use crate::persist::{self, PersistReport, SenderResult, Totals, Verification};
use crate::procfs::{CpuWatch, Proc};
use crate::stats::{epoch_nanos, rate};
use crate::worker::ErrorTally;

#[derive(Debug, Args)]
pub struct JetStreamArgs {
    /// NATS server with JetStream enabled (loopback only).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub url: String,
    /// Name of the system under test in reports.
    #[arg(long, default_value = "jetstream")]
    pub label: String,
    /// Print one machine-readable JSON summary line on stdout.
    #[arg(long)]
    pub json: bool,
    /// PID of the NATS server process, for its CPU time (optional).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Number of concurrent senders, each on a connection of its own.
    #[arg(long, default_value_t = 100)]
    pub senders: usize,
    /// Messages each sender publishes.
    #[arg(long, default_value_t = 200)]
    pub messages: usize,
    /// Publishes a sender may have unacknowledged at once.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// All senders publish to one subject instead of one subject each.
    #[arg(long)]
    pub shared_room: bool,
    /// Filler bytes appended to each message body.
    #[arg(long, default_value_t = 32)]
    pub payload_bytes: usize,
    /// Leave out the `Nats-Msg-Id` header (no duplicate check by the stream).
    #[arg(long)]
    pub no_msg_id: bool,
    /// Longest wait for any single acknowledgement, in seconds.
    #[arg(long, default_value_t = 10)]
    pub ack_timeout_secs: u64,
    /// Upper bound for the whole publishing phase, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Limit for one connection, and for each stream management request, in
    /// seconds.
    #[arg(long, default_value_t = 20)]
    pub connect_timeout_secs: u64,
    /// Skip the check of the stream's per-subject counts after the run.
    #[arg(long)]
    pub no_verify: bool,
}

#[derive(Debug, Clone)]
struct SendSpec {
    messages: usize,
    window: usize,
    payload_bytes: usize,
    msg_id_prefix: Option<String>,
    stream: String,
    ack_timeout: Duration,
    deadline: Instant,
}

type AckFuture = Pin<
    Box<
        dyn Future<
                Output = (
                    Instant,
                    Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
                ),
            > + Send,
    >,
>;

pub async fn run(args: JetStreamArgs) -> Result<()> {
    if args.senders == 0 || args.messages == 0 || args.window == 0 {
        bail!("--senders, --messages and --window must all be at least 1");
    }
    let addr = loopback_address(&args.url).await?;
    let limit = Duration::from_secs(args.connect_timeout_secs);
    let run_id = format!("{}-{}", epoch_nanos() / 1_000_000, std::process::id());
    let stream_name = format!("parlor-bench-{run_id}");
    let prefix = format!("parlor-bench.{run_id}");
    eprintln!(
        "jetstream [{}]: {} senders × {} messages, window {}, {}, stream {stream_name} on {addr}",
        args.label,
        args.senders,
        args.messages,
        args.window,
        if args.shared_room {
            "one shared subject"
        } else {
            "one subject each"
        }
    );

    // The stream is created and deleted over a connection of its own.
    let admin = connect(&args.url, "parlor-bench-admin", limit).await?;
    let mut admin_js = jetstream::new(admin.clone());
    admin_js.set_timeout(limit);
    let config = stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{prefix}.>")],
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    };
    let created = timeout(limit, admin_js.create_stream(config))
        .await
        .map_err(|_| anyhow!("creating stream {stream_name} timed out after {limit:?}"))?
        .with_context(|| {
            format!(
                "cannot create stream {stream_name} on {} (is JetStream enabled?)",
                args.url
            )
        })?;

    let outcome = measure(&args, &created, &stream_name, &prefix, &run_id).await;

    let deleted = timeout(limit, admin_js.delete_stream(&stream_name)).await;
    match deleted {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("jetstream: could not delete stream {stream_name}: {e}"),
        Err(_) => eprintln!("jetstream: deleting stream {stream_name} timed out"),
    }
    let _ = timeout(Duration::from_secs(5), admin.drain()).await;
    let report = outcome?;
    let human = persist::human_summary(&report, "stream check", "subjects hold the acked count");
    Report::new(&report, human).print(args.json)
}

/// Connects the senders, publishes, and checks the stream.
async fn measure(
    args: &JetStreamArgs,
    created: &stream::Stream,
    stream_name: &str,
    prefix: &str,
    run_id: &str,
) -> Result<PersistReport> {
    let limit = Duration::from_secs(args.connect_timeout_secs);
    let server = args.pid.map(Proc::Pid);
    let subject_for = |k: usize| -> Arc<str> {
        if args.shared_room {
            format!("{prefix}.shared").into()
        } else {
            format!("{prefix}.{k}").into()
        }
    };

    // 1. Connect.
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut joins = Vec::with_capacity(args.senders);
    for k in 0..args.senders {
        let permits = Arc::clone(&permits);
        let url = args.url.clone();
        joins.push(tokio::spawn(async move {
            let _permit = permits.acquire().await?;
            connect(&url, &format!("parlor-bench-{k}"), limit).await
        }));
    }
    let mut clients = Vec::new();
    let mut connect_failures = ErrorTally::default();
    for (k, j) in joins.into_iter().enumerate() {
        match j.await {
            Ok(Ok(client)) => clients.push((k, client)),
            Ok(Err(e)) => connect_failures.add(format!("{e:#}")),
            Err(e) => connect_failures.add(format!("connect task failed: {e}")),
        }
    }
    let connected = clients.len() as u64;
    eprintln!(
        "jetstream: {connected}/{} connected; failures: {connect_failures}",
        args.senders
    );
    if clients.is_empty() {
        bail!("no sender could connect: {connect_failures}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. Publish.
    let cpu_watch = CpuWatch::new(server, vec![Proc::SelfProc]);
    let cpu_before = cpu_watch.sample()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let ack_timeout = Duration::from_secs(args.ack_timeout_secs);
    let mut tasks = Vec::new();
    for (k, client) in clients {
        let spec = SendSpec {
            messages: args.messages,
            window: args.window,
            payload_bytes: args.payload_bytes,
            msg_id_prefix: (!args.no_msg_id).then(|| format!("{run_id}-{k}")),
            stream: stream_name.to_owned(),
            ack_timeout,
            deadline,
        };
        tasks.push(tokio::spawn(publish_and_await_acks(
            client,
            subject_for(k),
            spec,
        )));
    }
    let Totals {
        sent,
        acked,
        errors,
        latency,
        duration_seconds,
        acked_by_key: acked_by_subject,
    } = persist::join_senders(tasks, started).await;
    let cpu_after = cpu_watch.sample()?;
    let cpu_interval = started.elapsed().as_secs_f64();
    let acked_per_second = rate(acked, duration_seconds);
    let ack_latency = latency.summary();
    let cpu = cpu_before.until(&cpu_after);
    let server_cpu_ms_per_message = cpu
        .server
        .filter(|_| acked > 0)
        .map(|cpu| cpu * 1000.0 / acked as f64);

    // 3. Verify.
    let verification = if args.no_verify {
        None
    } else {
        Some(verify(created, prefix, &acked_by_subject, limit).await)
    };

    let figures = persist::figures(
        &persist::variant(args.senders, args.messages, args.window, args.shared_room),
        acked_per_second,
        &ack_latency,
    );
    Ok(PersistReport {
        scenario: "jetstream",
        label: args.label.clone(),
        url: args.url.clone(),
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
        server_cpu_seconds: cpu.server,
        server_cpu_ms_per_message,
        client_cpu_seconds: cpu.clients,
        other_cpu_seconds: cpu.other,
        machine_quiet: Some(
            cpu.other
                .is_none_or(|o| cpu_interval <= 0.0 || o / cpu_interval <= 0.1),
        ),
        verification,
        figures,
    })
}

/// One sender: keeps up to `window` publishes in flight until all are
/// acknowledged, a wait exceeds `ack_timeout`, or the connection fails.
async fn publish_and_await_acks(
    client: async_nats::Client,
    subject: Arc<str>,
    spec: SendSpec,
) -> SenderResult {
    let mut r = SenderResult::new(Arc::clone(&subject));
    let mut js = jetstream::new(client.clone());
    js.set_timeout(spec.ack_timeout);
    let pad = "x".repeat(spec.payload_bytes);
    let mut in_flight: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    let mut next = 0;
    let mut answered = 0;
    while answered < spec.messages {
        while in_flight.len() < spec.window && next < spec.messages {
            let mut message =
                PublishMessage::build().payload(format!("persist {next} {pad}").into());
            if let Some(prefix) = &spec.msg_id_prefix {
                message = message.message_id(format!("{prefix}-c{next}"));
            }
            let sent_at = Instant::now();
            let published = timeout(
                spec.ack_timeout,
                js.send_publish(subject.to_string(), message),
            )
            .await;
            let ack = match published {
                Ok(Ok(ack)) => ack,
                Ok(Err(e)) => {
                    r.errors.add(format!("publish failed: {e}"));
                    return finish(r, client).await;
                }
                Err(_) => {
                    r.errors
                        .add(format!("publish blocked for {:?}", spec.ack_timeout));
                    return finish(r, client).await;
                }
            };
            in_flight.push(Box::pin(async move { (sent_at, ack.await) }));
            r.sent += 1;
            next += 1;
        }
        let wait_until = (Instant::now() + spec.ack_timeout).min(spec.deadline);
        let (sent_at, outcome) = match timeout_at(wait_until, in_flight.next()).await {
            Err(_) => {
                r.errors.add(format!(
                    "no ack within {:?} (or the run's --timeout-secs passed)",
                    spec.ack_timeout
                ));
                break;
            }
            Ok(None) => break,
            Ok(Some(done)) => done,
        };
        match outcome {
            Ok(ack) if ack.stream != spec.stream => {
                r.errors
                    .add(format!("ack from stream {:?}, not ours", ack.stream));
            }
            Ok(ack) if ack.duplicate => r.errors.add("ack marks a duplicate".to_owned()),
            Ok(_) => {
                let now = Instant::now();
                r.latency.record(now.duration_since(sent_at));
                r.acked += 1;
                r.last_ack = Some(now);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::PublishErrorKind::TimedOut
                        | jetstream::context::PublishErrorKind::BrokenPipe
                ) =>
            {
                r.errors.add(format!("ack failed: {e}"));
                break;
            }
            Err(e) => r.errors.add(format!("ack error: {e}")),
        }
        answered += 1;
    }
    finish(r, client).await
}

/// Closes a sender's connection (bounded) and hands back its result.
async fn finish(r: SenderResult, client: async_nats::Client) -> SenderResult {
    let _ = timeout(Duration::from_secs(5), client.drain()).await;
    r
}

/// Compares each subject's message count in the stream with the acks
/// counted for it.
async fn verify(
    created: &stream::Stream,
    prefix: &str,
    acked_by_subject: &BTreeMap<Arc<str>, u64>,
    limit: Duration,
) -> Verification {
    let mut v = Verification::default();
    let counts = timeout(limit, subject_counts(created, prefix))
        .await
        .map_err(|_| anyhow!("reading the stream's subjects timed out after {limit:?}"))
        .and_then(|r| r);
    let counts = match counts {
        Ok(counts) => counts,
        Err(e) => {
            v.rooms_checked = acked_by_subject.len() as u64;
            v.failures.add(format!("{e:#}"));
            return v;
        }
    };
    for (subject, &acked) in acked_by_subject {
        v.rooms_checked += 1;
        let stored = counts.get(subject.as_ref()).copied().unwrap_or(0);
        if stored == acked {
            v.rooms_matching += 1;
            continue;
        }
        if stored < acked {
            v.rooms_short += 1;
        } else {
            v.rooms_over += 1;
        }
        if v.examples.len() < 5 {
            v.examples.push(format!(
                "subject {subject}: {acked} acked but {stored} stored"
            ));
        }
    }
    v
}

async fn subject_counts(created: &stream::Stream, prefix: &str) -> Result<HashMap<String, u64>> {
    let mut subjects = created
        .info_with_subjects(format!("{prefix}.>"))
        .await
        .context("cannot read the stream's subjects")?;
    let mut counts = HashMap::new();
    while let Some(item) = subjects.next().await {
        let (subject, count) = item.context("cannot read the stream's subjects")?;
        counts.insert(subject, count as u64);
    }
    Ok(counts)
}

/// Opens one client connection, bounded by `limit`; servers the first one
/// announces are ignored, so that the client stays on the loopback address.
async fn connect(url: &str, name: &str, limit: Duration) -> Result<async_nats::Client> {
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(limit)
        .ignore_discovered_servers()
        .max_reconnects(3);
    timeout(limit, options.connect(url))
        .await
        .map_err(|_| anyhow!("connecting to {url} timed out after {limit:?}"))?
        .with_context(|| format!("cannot connect to {url}"))
}

/// Resolves `nats://HOST:PORT` (or `HOST:PORT`) and checks that every
/// address is on the loopback interface: this tool generates load only
/// against the local machine.
async fn loopback_address(url: &str) -> Result<SocketAddr> {
    let rest = match url.split_once("://") {
        Some(("nats", rest)) => rest,
        Some((scheme, _)) => bail!("URL {url:?} has scheme {scheme:?}; expected nats://"),
        None => url,
    };
    let host_port = rest.split(['/', '?']).next().unwrap_or(rest);
    if host_port.contains('@') || host_port.contains(',') {
        bail!("URL {url:?}: give one server, without credentials");
    }
    let has_port = match host_port.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => host_port.contains(':'),
    };
    let host_port = if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:4222")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port.as_str())
        .await
        .with_context(|| format!("cannot resolve {host_port:?}"))?
        .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| anyhow!("{host_port:?} resolved to no address"))?;
    if let Some(outside) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "{outside} is not a loopback address; parlor-bench only generates load against \
             127.0.0.0/8 or ::1"
        );
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_servers() -> Result<()> {
        assert_eq!(
            loopback_address("nats://127.0.0.1:4222").await?,
            "127.0.0.1:4222".parse()?
        );
        assert_eq!(
            loopback_address("127.0.0.3").await?,
            "127.0.0.3:4222".parse()?
        );
        assert_eq!(
            loopback_address("nats://[::1]").await?,
            "[::1]:4222".parse()?
        );
        assert!(loopback_address("nats://10.0.0.1:4222").await.is_err());
        assert!(loopback_address("tls://127.0.0.1:4222").await.is_err());
        assert!(loopback_address("nats://u:p@127.0.0.1:4222").await.is_err());
        Ok(())
    }
}

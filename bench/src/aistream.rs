//! `ai-stream`: what Parlor adds to streamed AI replies.
//!
//! The scenario runs a fake OpenAI-compatible vendor itself, on `--fake-port`: every
//! `POST …/chat/completions` gets an event stream whose first token comes after
//! `--first-token-ms`, followed by `--chunks` chunks `--chunk-interval-ms` apart, a usage
//! chunk and `data: [DONE]`. The server under test must be started with
//! `OPENAI_API_KEY=x OPENAI_BASE_URL=http://127.0.0.1:PORT/v1`, so that the demo's
//! assistant uses the fake (`bench/run.sh` does this).
//!
//! 1. **Direct**: `--streams` concurrent HTTP requests straight to the fake; time to the
//!    first token and to the end of each.
//! 2. **Through Parlor**: `--streams` WebSocket connections each send one `ai-stream`
//!    frame at the same moment; time to the first `ai-stream-delta` and to
//!    `ai-stream-end`, and the server's CPU time over the phase.
//!
//! Figures: time-to-first-token percentiles of both, the p50/p99 Parlor adds, and the
//! server's CPU milliseconds per stream.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{ServerFrame, Target};
use crate::procfs::{CpuWatch, Proc};
use crate::stats::{Latencies, LatencySummary};
use crate::worker::ErrorTally;
use crate::{CommonArgs, Report};

#[derive(Debug, Args)]
pub struct AiStreamArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PID of the server process, for its CPU time (optional).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Concurrent streamed replies.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Port the fake vendor listens on (127.0.0.1).
    #[arg(long, default_value_t = 18090)]
    pub fake_port: u16,
    /// The fake's delay before its first token, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub first_token_ms: u64,
    /// Text chunks per reply after the first.
    #[arg(long, default_value_t = 20)]
    pub chunks: usize,
    /// Delay between chunks, in milliseconds.
    #[arg(long, default_value_t = 25)]
    pub chunk_interval_ms: u64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Longest any stream may take, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

#[derive(Debug, Serialize)]
struct Phase {
    streams: usize,
    completed: u64,
    errors: ErrorTally,
    first_token: LatencySummary,
    complete: LatencySummary,
}

#[derive(Debug, Serialize)]
struct Summary {
    scenario: &'static str,
    label: String,
    streams: usize,
    fake_first_token_ms: u64,
    chunks: usize,
    chunk_interval_ms: u64,
    direct: Phase,
    parlor: Phase,
    added_first_token_p50_ms: f64,
    added_first_token_p99_ms: f64,
    server_cpu_ms_per_stream: Option<f64>,
    /// The headline figures, for `summarize`.
    figures: std::collections::BTreeMap<String, f64>,
}

/// The fake vendor's script.
#[derive(Debug, Clone, Copy)]
struct Script {
    first_token: Duration,
    chunks: usize,
    interval: Duration,
}

pub async fn run(args: AiStreamArgs) -> Result<()> {
    let script = Script {
        first_token: Duration::from_millis(args.first_token_ms),
        chunks: args.chunks,
        interval: Duration::from_millis(args.chunk_interval_ms),
    };
    let listener = TcpListener::bind(("127.0.0.1", args.fake_port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.fake_port))?;
    tokio::spawn(serve_fake(listener, script));
    let limit = Duration::from_secs(args.timeout_secs);

    eprintln!(
        "direct: {} concurrent streams from the fake vendor",
        args.streams
    );
    let direct = direct_phase(args.fake_port, args.streams, limit).await;

    eprintln!("through Parlor: connecting {} clients", args.streams);
    let target = Target::resolve(&args.common.url, args.common.source_addrs).await?;
    let connect_limit = Duration::from_secs(args.common.connect_timeout_secs);
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut connecting = Vec::with_capacity(args.streams);
    for i in 0..args.streams {
        let target = target.clone();
        let gate = Arc::clone(&gate);
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            target.connect(target.source_for(i), connect_limit).await
        }));
    }
    let mut sockets = Vec::with_capacity(args.streams);
    for c in connecting {
        sockets.push(c.await??);
    }
    let watch = CpuWatch::new(args.pid.map(Proc::Pid), vec![Proc::SelfProc]);
    let before = watch.sample()?;
    let start = Arc::new(tokio::sync::Barrier::new(args.streams));
    let mut tasks = Vec::with_capacity(args.streams);
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let frame =
                format!(r#"{{"type":"ai-stream","id":"s{i}","message":"Hello, question {i}"}}"#);
            let sent = Instant::now();
            ws.send(Message::text(frame)).await?;
            let mut first = None;
            let outcome = timeout(limit, async {
                while let Some(msg) = ws.next().await {
                    let Message::Text(text) = msg? else { continue };
                    let Some(f) = ServerFrame::parse(&text) else {
                        continue;
                    };
                    match f.kind.as_ref() {
                        "ai-stream-delta" if first.is_none() => first = Some(sent.elapsed()),
                        "ai-stream-end" => return Ok(sent.elapsed()),
                        "error" => bail!(f.describe_error()),
                        _ => {}
                    }
                }
                bail!("connection closed mid-stream")
            })
            .await
            .map_err(|_| anyhow::anyhow!("stream timed out"))??;
            crate::net::close_quietly(ws).await;
            Ok::<_, anyhow::Error>((first.context("no delta before the end")?, outcome))
        }));
    }
    let parlor = gather(args.streams, tasks).await;
    let after = watch.sample()?;
    let cpu = before.until(&after);

    let added = |p: fn(&LatencySummary) -> f64| p(&parlor.first_token) - p(&direct.first_token);
    let cpu_per_stream = cpu
        .server
        .map(|s| s * 1000.0 / parlor.completed.max(1) as f64);
    let mut figures = std::collections::BTreeMap::new();
    let n = args.streams;
    figures.insert(
        format!("ai-stream {n}: first token p50 ms, direct"),
        direct.first_token.p50_ms,
    );
    figures.insert(
        format!("ai-stream {n}: first token p50 ms, through Parlor"),
        parlor.first_token.p50_ms,
    );
    figures.insert(
        format!("ai-stream {n}: first token added p50 ms"),
        added(|s| s.p50_ms),
    );
    figures.insert(
        format!("ai-stream {n}: first token added p99 ms"),
        added(|s| s.p99_ms),
    );
    if let Some(ms) = cpu_per_stream {
        figures.insert(format!("ai-stream {n}: server CPU ms per stream"), ms);
    }
    let summary = Summary {
        figures,
        scenario: "ai-stream",
        label: args.common.label(),
        streams: args.streams,
        fake_first_token_ms: args.first_token_ms,
        chunks: args.chunks,
        chunk_interval_ms: args.chunk_interval_ms,
        added_first_token_p50_ms: added(|s| s.p50_ms),
        added_first_token_p99_ms: added(|s| s.p99_ms),
        server_cpu_ms_per_stream: cpu_per_stream,
        direct,
        parlor,
    };
    let human = format!(
        "ai-stream, {} concurrent streams (fake: first token after {} ms, {} chunks every {} ms)\n\
         direct: first token {}\n\
         parlor: first token {}\n\
         parlor adds p50 {:.1} ms, p99 {:.1} ms to the first token; server CPU {} per stream\n\
         completed: direct {}, parlor {}; errors: direct {}, parlor {}",
        summary.streams,
        summary.fake_first_token_ms,
        summary.chunks,
        summary.chunk_interval_ms,
        summary.direct.first_token,
        summary.parlor.first_token,
        summary.added_first_token_p50_ms,
        summary.added_first_token_p99_ms,
        summary.server_cpu_ms_per_stream.map_or_else(
            || "unknown (no --pid)".to_owned(),
            |ms| format!("{ms:.2} ms")
        ),
        summary.direct.completed,
        summary.parlor.completed,
        summary.direct.errors,
        summary.parlor.errors,
    );
    Report::new(&summary, human).print(args.common.json)
}

/// Waits for every stream and summarises them.
async fn gather(
    streams: usize,
    tasks: Vec<tokio::task::JoinHandle<Result<(Duration, Duration)>>>,
) -> Phase {
    let mut first = Latencies::new();
    let mut complete = Latencies::new();
    let mut errors = ErrorTally::default();
    for t in tasks {
        match t.await {
            Ok(Ok((f, c))) => {
                first.record(f);
                complete.record(c);
            }
            Ok(Err(e)) => errors.add(format!("{e:#}")),
            Err(e) => errors.add(format!("task failed: {e}")),
        }
    }
    Phase {
        streams,
        completed: complete.count(),
        errors,
        first_token: first.summary(),
        complete: complete.summary(),
    }
}

/// `streams` concurrent requests straight to the fake.
async fn direct_phase(port: u16, streams: usize, limit: Duration) -> Phase {
    let start = Arc::new(tokio::sync::Barrier::new(streams));
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.set_nodelay(true)?;
            start.wait().await;
            let body = r#"{"model":"x","messages":[{"role":"user","content":"Hello"}],"stream":true}"#;
            let request = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let sent = Instant::now();
            tcp.write_all(request.as_bytes()).await?;
            let mut seen = Vec::new();
            let mut buf = [0u8; 8192];
            let mut first = None;
            timeout(limit, async {
                loop {
                    let n = tcp.read(&mut buf).await?;
                    if n == 0 {
                        bail!("connection closed mid-stream");
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if first.is_none() && contains(&seen, b"\"content\":\"tok") {
                        first = Some(sent.elapsed());
                    }
                    if contains(&seen, b"[DONE]") {
                        return Ok(());
                    }
                }
            })
            .await
            .map_err(|_| anyhow::anyhow!("stream timed out"))??;
            Ok((first.context("no token")?, sent.elapsed()))
        }));
    }
    gather(streams, tasks).await
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The fake vendor: answers every request with the scripted event stream, then closes.
async fn serve_fake(listener: TcpListener, script: Script) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = answer(tcp, script).await;
        });
    }
}

async fn answer(mut tcp: TcpStream, script: Script) -> Result<()> {
    tcp.set_nodelay(true)?;
    // Read the request head and its body (content-length).
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let body_start = loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        seen.extend_from_slice(&buf[..n]);
        if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&seen[..body_start]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while seen.len() < body_start + length {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    tcp.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    )
    .await?;
    let chunk = |data: &str| {
        let event = format!("data: {data}\n\n");
        format!("{:x}\r\n{event}\r\n", event.len())
    };
    let delta = |i: usize| {
        chunk(&format!(
            r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[{{"index":0,"delta":{{"content":"tok{i} "}},"finish_reason":null}}]}}"#
        ))
    };
    tokio::time::sleep(script.first_token).await;
    tcp.write_all(delta(0).as_bytes()).await?;
    for i in 1..=script.chunks {
        tokio::time::sleep(script.interval).await;
        tcp.write_all(delta(i).as_bytes()).await?;
    }
    let end = chunk(
        r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
    ) + &chunk(
        r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":21,"total_tokens":41}}"#,
    ) + &chunk("[DONE]")
        + "0\r\n\r\n";
    tcp.write_all(end.as_bytes()).await?;
    tcp.shutdown().await?;
    Ok(())
}

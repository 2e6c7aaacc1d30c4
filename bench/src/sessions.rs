//! `sessions`: many concurrent guided sessions (`GET /chat`, `docs/sessions.md`)
//! answering at a human pace.
//!
//! Each of `--sessions` sessions is a user of its own with a Parlor token (HS256, signed
//! here with `--jwt-secret`, which must be the server's `auth.jwt_secret`), connecting
//! to `/chat?token=…&templateId=…`. Sessions are opened over `--ramp-secs`, at most
//! `--concurrency` at a time, from the loopback source addresses; each waits for its
//! first `next_question`. When all are open, every session sends `--answers` answers
//! `--pace-ms` apart, offset by `index × pace ÷ sessions` so that answers arrive evenly
//! spread (sessions ÷ pace answers per second), and times each answer to the server's
//! next `next_question` (or `session_complete`). A reply later than the next answer's
//! slot delays that answer (it is counted as late).
//!
//! Modes: `guide` answers the demo template `mutual-nda` with answers that validate, so
//! the server's built-in guide asks the next question (no AI vendor: no LLM call);
//! `service` runs a fake AI service on `--fake-port` that answers
//! `POST /v1/chat/next-question` at once with `{"status":"in_progress","nextQuestion":
//! {"text":"Question N?"}}` (or `completed` after `--complete-after` answers); the
//! server's demo domain must name it as `ai_service_url` (`bench/run.sh` writes the
//! configuration).
//!
//! Figures: answer → next question latency, the server's CPU per 1,000 answers over the
//! answer phase, and its RSS before the first connection, with every session open, and
//! after the last answer (RSS per session = (after − before) ÷ sessions opened). Error
//! frames, refused upgrades, closes and timeouts are counted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Target, Ws};
use crate::procfs::{CpuWatch, Proc};
use crate::stats::{Latencies, LatencySummary};
use crate::worker::ErrorTally;
use crate::{CommonArgs, Report};

/// Answers to the demo template `mutual-nda`, in its order, each of which validates.
const NDA_ANSWERS: [&str; 7] = [
    "Acme Ltd",
    "Globex GmbH",
    "To evaluate a possible partnership.",
    "2027-01-31",
    "3",
    "ireland",
    "legal@acme.example",
];

/// Most sockets one process can hold (the descriptor hard limit is 20,000).
const MAX_SESSIONS: usize = 19_000;

/// Who asks the questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The server's built-in guide (template questions, answers checked, offline).
    Guide,
    /// The domain's AI service: a fake this scenario runs, answering at once.
    Service,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Guide => "guide",
            Mode::Service => "service",
        }
    }
}

#[derive(Debug, Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PID of the server process (its /proc/PID/stat and status are read).
    #[arg(long, visible_alias = "server-pid")]
    pub pid: u32,
    /// Concurrent sessions, each a user of its own (at most 19,000: one process).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Time between a session's answers, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub pace_ms: u64,
    /// Answers each session sends after its first question.
    #[arg(long, default_value_t = 6)]
    pub answers: usize,
    /// Who asks the questions: the built-in guide or the (fake) AI service.
    #[arg(long, value_enum, default_value_t = Mode::Guide)]
    pub mode: Mode,
    /// Template to open (`guide` answers fit the demo's `mutual-nda`).
    #[arg(long, default_value = "mutual-nda")]
    pub template: String,
    /// The server's `auth.jwt_secret` (at least 16 bytes), to sign the users' tokens.
    #[arg(long, default_value = "parlor-bench-jwt-secret-0123456789")]
    pub jwt_secret: String,
    /// Domain the users belong to (the `domain` claim).
    #[arg(long, default_value = "demo")]
    pub domain: String,
    /// Port the fake AI service listens on (127.0.0.1), in `service` mode.
    #[arg(long, default_value_t = 18090)]
    pub fake_port: u16,
    /// The fake AI service answers `completed` once a session has this many answers
    /// (0: never).
    #[arg(long, default_value_t = 0)]
    pub complete_after: usize,
    /// Seconds over which the sessions are opened (evenly).
    #[arg(long, default_value_t = 10)]
    pub ramp_secs: u64,
    /// Sessions being opened (connect, upgrade, first question) at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds to wait after the last session opened before sampling RSS and answering.
    #[arg(long, default_value_t = 2)]
    pub settle_secs: u64,
    /// Longest wait for the first question, and for the reply to any answer, in seconds.
    #[arg(long, default_value_t = 30)]
    pub answer_timeout_secs: u64,
    /// Upper bound for the whole run, in seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

/// The token claims Parlor reads.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: String,
    role: &'a str,
    domain: &'a str,
    exp: u64,
}

/// A server frame of `/chat`: the fields this scenario looks at.
#[derive(Debug, Deserialize)]
struct ChatFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    question: Option<Question>,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Question {
    #[serde(default)]
    id: Option<String>,
}

/// What the server said after an answer (or at the start).
enum Said {
    /// `next_question`, with the question's id.
    Question(Option<String>),
    /// `session_complete`.
    Complete,
}

/// One session's answer phase.
#[derive(Debug, Default)]
struct Outcome {
    latencies: Vec<Duration>,
    sent: u64,
    answered: u64,
    /// The same question asked again (the guide refused the answer).
    reasked: u64,
    /// Answers sent after their slot because the previous reply came late.
    late: u64,
    completed: bool,
    errors: Vec<String>,
}

/// Shared by every session task.
#[derive(Debug)]
struct Ctx {
    target: Target,
    base_url: String,
    template: String,
    domain: String,
    key: EncodingKey,
    user_prefix: String,
    mode: Mode,
    sessions: usize,
    answers: usize,
    pace: Duration,
    ramp: Duration,
    reply_limit: Duration,
    connect_limit: Duration,
}

/// A session task's ties to the parent: the opening gate, its reports, and the signals
/// to start answering and to let go.
#[derive(Debug)]
struct Links {
    permits: Arc<Semaphore>,
    opened_tx: mpsc::UnboundedSender<Result<Duration, String>>,
    go_rx: watch::Receiver<Option<Instant>>,
    done_tx: mpsc::UnboundedSender<Outcome>,
    release_rx: watch::Receiver<bool>,
}

#[derive(Debug, Serialize)]
struct Summary {
    scenario: &'static str,
    label: String,
    url: String,
    mode: Mode,
    template: String,
    sessions: usize,
    pace_ms: u64,
    answers_per_session: usize,
    opened: u64,
    open_failures: ErrorTally,
    open_seconds: f64,
    first_question: LatencySummary,
    answers_sent: u64,
    answers_answered: u64,
    answers_reasked: u64,
    answers_late: u64,
    sessions_completed: u64,
    answer_errors: ErrorTally,
    /// Any refused session or error during the answers.
    errors: bool,
    answer_latency: LatencySummary,
    answer_phase_seconds: f64,
    answers_per_second: f64,
    server_cpu_open_seconds: Option<f64>,
    server_cpu_ms_per_session_opened: Option<f64>,
    server_cpu_answer_seconds: Option<f64>,
    server_cpu_seconds_per_1000_answers: Option<f64>,
    server_cpu_utilisation: Option<f64>,
    client_cpu_seconds: f64,
    other_cpu_seconds: Option<f64>,
    machine_quiet: bool,
    server_rss_before_kib: u64,
    server_rss_opened_kib: u64,
    server_rss_after_kib: u64,
    server_rss_after_close_kib: Option<u64>,
    rss_per_session_opened_kib: f64,
    rss_per_session_kib: f64,
    fake_service_calls: Option<u64>,
    figures: BTreeMap<String, f64>,
}

pub async fn run(args: SessionsArgs) -> Result<()> {
    if args.sessions == 0 || args.pace_ms == 0 {
        bail!("--sessions and --pace-ms must be at least 1");
    }
    if args.sessions > MAX_SESSIONS {
        bail!(
            "--sessions {} is more than one process can hold ({MAX_SESSIONS} sockets)",
            args.sessions
        );
    }
    if args.jwt_secret.len() < 16 {
        bail!("--jwt-secret must be at least 16 bytes (as the server's auth.jwt_secret)");
    }
    let target = Target::resolve(&args.common.url, args.common.source_addrs).await?;
    let server = Proc::Pid(args.pid);
    let fake_calls = Arc::new(AtomicU64::new(0));
    if args.mode == Mode::Service {
        let listener = TcpListener::bind(("127.0.0.1", args.fake_port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.fake_port))?;
        tokio::spawn(serve_fake(
            listener,
            args.complete_after,
            Arc::clone(&fake_calls),
        ));
    }
    let ctx = Arc::new(Ctx {
        base_url: target.url.clone(),
        target,
        template: args.template.clone(),
        domain: args.domain.clone(),
        key: EncodingKey::from_secret(args.jwt_secret.as_bytes()),
        user_prefix: format!(
            "bench-{}-{}",
            crate::stats::epoch_nanos() / 1_000_000,
            std::process::id()
        ),
        mode: args.mode,
        sessions: args.sessions,
        answers: args.answers,
        pace: Duration::from_millis(args.pace_ms),
        ramp: Duration::from_secs(args.ramp_secs),
        reply_limit: Duration::from_secs(args.answer_timeout_secs),
        connect_limit: Duration::from_secs(args.common.connect_timeout_secs),
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let watch_cpu = CpuWatch::new(Some(server), vec![Proc::SelfProc]);

    let rss_before = server.rss_kib()?;
    let cpu_before_open = watch_cpu.sample()?;
    eprintln!(
        "sessions: server pid {} RSS {rss_before} KiB before; opening {} {} sessions of {:?} \
         at {} over {} s",
        args.pid,
        args.sessions,
        args.mode.name(),
        args.template,
        ctx.base_url,
        args.ramp_secs
    );

    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<Duration, String>>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Outcome>();
    let (go_tx, go_rx) = watch::channel::<Option<Instant>>(None);
    let (release_tx, release_rx) = watch::channel(false);
    let ramp_start = Instant::now();
    let mut tasks = Vec::with_capacity(args.sessions);
    for index in 0..args.sessions {
        let links = Links {
            permits: Arc::clone(&permits),
            opened_tx: opened_tx.clone(),
            go_rx: go_rx.clone(),
            done_tx: done_tx.clone(),
            release_rx: release_rx.clone(),
        };
        tasks.push(tokio::spawn(session(
            Arc::clone(&ctx),
            index,
            ramp_start,
            links,
        )));
    }
    drop((opened_tx, done_tx));

    // Phase 1: open every session.
    let mut opened = 0u64;
    let mut open_failures = ErrorTally::default();
    let mut first_question = Latencies::new();
    let mut last_progress = Instant::now();
    for _ in 0..args.sessions {
        match timeout_at(deadline, opened_rx.recv()).await {
            Err(_) => bail!("sessions were still opening at the --timeout-secs limit"),
            Ok(None) => break,
            Ok(Some(Ok(latency))) => {
                opened += 1;
                first_question.record(latency);
            }
            Ok(Some(Err(e))) => open_failures.add(e),
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "  {opened}/{} open, {} failed",
                args.sessions, open_failures.total
            );
        }
    }
    let open_seconds = ramp_start.elapsed().as_secs_f64();
    if opened == 0 {
        bail!("no session could open: {open_failures}");
    }
    eprintln!(
        "sessions: {opened} open, {} failed in {open_seconds:.1} s; settling {} s",
        open_failures.total, args.settle_secs
    );
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss_opened = server.rss_kib()?;
    let cpu_opened = watch_cpu.sample()?;

    // Phase 2: answers, spread evenly over each pace interval.
    let go = Instant::now() + Duration::from_millis(100);
    let _ = go_tx.send(Some(go));
    eprintln!(
        "sessions: answering, {} answers each every {} ms ({:.0} answers/s)",
        args.answers,
        args.pace_ms,
        opened as f64 * 1000.0 / args.pace_ms as f64
    );
    let mut latencies = Latencies::new();
    let mut answer_errors = ErrorTally::default();
    let (mut sent, mut answered, mut reasked, mut late, mut completed) = (0, 0, 0, 0, 0);
    let mut done = 0u64;
    let mut last_answer_at = go;
    last_progress = Instant::now();
    while done < opened {
        match timeout_at(deadline, done_rx.recv()).await {
            Err(_) => bail!("sessions were still answering at the --timeout-secs limit"),
            Ok(None) => break,
            Ok(Some(o)) => {
                done += 1;
                last_answer_at = Instant::now();
                for l in &o.latencies {
                    latencies.record(*l);
                }
                sent += o.sent;
                answered += o.answered;
                reasked += o.reasked;
                late += o.late;
                completed += u64::from(o.completed);
                for e in o.errors {
                    answer_errors.add(e);
                }
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!("  {done}/{opened} sessions done");
        }
    }
    let cpu_answered = watch_cpu.sample()?;
    let rss_after = server.rss_kib()?;
    let answer_phase = last_answer_at.saturating_duration_since(go).as_secs_f64();

    // Release the sessions.
    let _ = release_tx.send(true);
    let _ = timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(tasks),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_close = server.rss_kib().ok();

    let open_cpu = cpu_before_open.until(&cpu_opened);
    let answer_cpu = cpu_opened.until(&cpu_answered);
    let per_1000 = answer_cpu
        .server
        .filter(|_| answered > 0)
        .map(|s| s * 1000.0 / answered as f64);
    let per_open = open_cpu.server.map(|s| s * 1000.0 / opened as f64);
    let share = |s: f64| {
        if answer_phase > 0.0 {
            s / answer_phase
        } else {
            0.0
        }
    };
    let rss_per_session = rss_after.saturating_sub(rss_before) as f64 / opened as f64;
    let rss_per_session_opened = rss_opened.saturating_sub(rss_before) as f64 / opened as f64;
    let answer_latency = latencies.summary();
    let errors = open_failures.total > 0 || answer_errors.total > 0;

    let n = args.sessions;
    let name = format!(
        "sessions {}, {n} at 1 answer/{} ms",
        args.mode.name(),
        args.pace_ms
    );
    let mut figures = BTreeMap::new();
    figures.insert(
        format!("{name}: answer → next question p50 ms"),
        answer_latency.p50_ms,
    );
    figures.insert(
        format!("{name}: answer → next question p99 ms"),
        answer_latency.p99_ms,
    );
    if let Some(c) = per_1000 {
        figures.insert(format!("{name}: server CPU-s per 1,000 answers"), c);
    }
    figures.insert(
        format!("{name}: server RSS per session (KiB)"),
        rss_per_session,
    );
    let summary = Summary {
        scenario: "sessions",
        label: args.common.label(),
        url: ctx.base_url.clone(),
        mode: args.mode,
        template: args.template.clone(),
        sessions: n,
        pace_ms: args.pace_ms,
        answers_per_session: args.answers,
        opened,
        open_failures,
        open_seconds,
        first_question: first_question.summary(),
        answers_sent: sent,
        answers_answered: answered,
        answers_reasked: reasked,
        answers_late: late,
        sessions_completed: completed,
        answer_errors,
        errors,
        answer_latency,
        answer_phase_seconds: answer_phase,
        answers_per_second: crate::stats::rate(answered, answer_phase),
        server_cpu_open_seconds: open_cpu.server,
        server_cpu_ms_per_session_opened: per_open,
        server_cpu_answer_seconds: answer_cpu.server,
        server_cpu_seconds_per_1000_answers: per_1000,
        server_cpu_utilisation: answer_cpu.server.map(share),
        client_cpu_seconds: answer_cpu.clients,
        other_cpu_seconds: answer_cpu.other,
        machine_quiet: answer_cpu.other.is_none_or(|o| share(o) <= 0.1),
        server_rss_before_kib: rss_before,
        server_rss_opened_kib: rss_opened,
        server_rss_after_kib: rss_after,
        server_rss_after_close_kib: rss_after_close,
        rss_per_session_opened_kib: rss_per_session_opened,
        rss_per_session_kib: rss_per_session,
        fake_service_calls: (args.mode == Mode::Service)
            .then(|| fake_calls.load(Ordering::Relaxed)),
        figures,
    };
    let human = human_summary(&summary);
    Report::new(&summary, human).print(args.common.json)
}

fn human_summary(s: &Summary) -> String {
    let secs = |v: Option<f64>, unit: &str| {
        v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.3}{unit}"))
    };
    let mut out = format!(
        "sessions [{}] {} mode {}, template {:?}: {} sessions, {} answers each every {} ms\n",
        s.label,
        s.url,
        s.mode.name(),
        s.template,
        s.sessions,
        s.answers_per_session,
        s.pace_ms
    );
    out += &format!(
        "  opened: {}/{} in {:.1} s; refused or failed: {}\n  first question (connect → \
         next_question): {}\n",
        s.opened, s.sessions, s.open_seconds, s.open_failures, s.first_question
    );
    out += &format!(
        "  answers: {} sent, {} answered ({:.0}/s over {:.1} s), {} asked again, {} late, {} \
         sessions complete; errors: {}\n",
        s.answers_sent,
        s.answers_answered,
        s.answers_per_second,
        s.answer_phase_seconds,
        s.answers_reasked,
        s.answers_late,
        s.sessions_completed,
        s.answer_errors
    );
    out += &format!("  answer → next question: {}\n", s.answer_latency);
    out += &format!(
        "  server CPU: opening {} ({} per session), answering {} ({:.0}% of one core) → {} \
         per 1,000 answers\n",
        secs(s.server_cpu_open_seconds, " s"),
        secs(s.server_cpu_ms_per_session_opened, " ms"),
        secs(s.server_cpu_answer_seconds, " s"),
        s.server_cpu_utilisation.unwrap_or(0.0) * 100.0,
        secs(s.server_cpu_seconds_per_1000_answers, " CPU-s"),
    );
    out += &format!(
        "  server RSS: {} KiB before, {} KiB with all open ({:.2} KiB per session), {} KiB \
         after the answers ({:.2} KiB per session), {} after close\n",
        s.server_rss_before_kib,
        s.server_rss_opened_kib,
        s.rss_per_session_opened_kib,
        s.server_rss_after_kib,
        s.rss_per_session_kib,
        s.server_rss_after_close_kib
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v} KiB")),
    );
    if let Some(calls) = s.fake_service_calls {
        out += &format!("  fake AI service: {calls} calls\n");
    }
    out += &format!(
        "  load generator CPU while answering: {:.2} s; other processes: {}",
        s.client_cpu_seconds,
        s.other_cpu_seconds
            .map_or_else(|| "n/a".to_owned(), |o| format!("{o:.2} s"))
    );
    if s.errors {
        out += "\n  WARNING: the run had errors (see above); its figures describe a failing run";
    }
    if !s.machine_quiet {
        out += "\n  WARNING: other processes used more than 10% of a core meanwhile; figures \
                are skewed";
    }
    out
}

/// One session: open it, wait for the go, answer on schedule, report, hold until
/// released.
async fn session(ctx: Arc<Ctx>, index: usize, ramp_start: Instant, links: Links) {
    let Links {
        permits,
        opened_tx,
        mut go_rx,
        done_tx,
        mut release_rx,
    } = links;
    let n = ctx.sessions as u32;
    let i = index as u32;
    sleep_until(ramp_start + ctx.ramp * i / n).await;
    let opening = async {
        let _permit = permits.acquire().await?;
        let target = Target {
            url: session_url(&ctx, index)?,
            ..ctx.target.clone()
        };
        let start = Instant::now();
        let mut ws = target
            .connect(target.source_for(index), ctx.connect_limit)
            .await
            .map_err(|e| {
                // Without the session's token, so that the same failure counts as one.
                let why = format!("{e:#}").replace(&target.url, &ctx.base_url);
                anyhow!("upgrade refused or failed: {why}")
            })?;
        match reply(&mut ws, ctx.reply_limit).await? {
            Said::Question(id) => Ok::<_, anyhow::Error>((ws, start.elapsed(), id)),
            Said::Complete => bail!("session_complete before the first question"),
        }
    }
    .await;
    let (mut ws, mut question) = match opening {
        Ok((ws, latency, id)) => {
            let _ = opened_tx.send(Ok(latency));
            (ws, id)
        }
        Err(e) => {
            let _ = opened_tx.send(Err(format!("{e:#}")));
            return;
        }
    };
    drop(opened_tx);

    let mut out = Outcome::default();
    let go = loop {
        if let Some(go) = *go_rx.borrow_and_update() {
            break go;
        }
        match drain_until(&mut ws, go_rx.changed(), &mut out.errors).await {
            Ok(Ok(())) => {}
            // The parent went away: nothing to report to.
            Ok(Err(_)) => return,
            Err(e) => {
                out.errors.push(e);
                let _ = done_tx.send(out);
                return;
            }
        }
    };
    let offset = ctx.pace * i / n;
    let mut open = true;
    for k in 0..ctx.answers {
        let slot = go + offset + ctx.pace * k as u32;
        if Instant::now() > slot {
            out.late += 1;
        } else if let Err(e) = drain_until(&mut ws, sleep_until(slot), &mut out.errors).await {
            out.errors.push(e);
            open = false;
            break;
        }
        let content = match ctx.mode {
            Mode::Guide => NDA_ANSWERS
                .get(k)
                .map_or_else(|| format!("answer {k}"), |a| (*a).to_owned()),
            Mode::Service => format!("Answer {} of session {index}.", k + 1),
        };
        let frame = serde_json::json!({ "type": "user_message", "content": content }).to_string();
        let sent = Instant::now();
        if let Err(e) = ws.send(Message::text(frame)).await {
            out.errors.push(format!("sending an answer failed: {e}"));
            open = false;
            break;
        }
        out.sent += 1;
        match reply(&mut ws, ctx.reply_limit).await {
            Ok(said) => {
                out.latencies.push(sent.elapsed());
                out.answered += 1;
                match said {
                    Said::Question(id) => {
                        if id.is_some() && id == question {
                            out.reasked += 1;
                        }
                        question = id;
                    }
                    Said::Complete => {
                        out.completed = true;
                        break;
                    }
                }
            }
            Err(e) => {
                let closed = e.to_string().contains("closed");
                out.errors.push(format!("{e:#}"));
                if closed {
                    open = false;
                    break;
                }
            }
        }
    }
    let completed = out.completed;
    let _ = done_tx.send(out);
    drop(done_tx);
    if !open || completed {
        // The server closes a complete session itself.
        if completed {
            let _ = timeout(Duration::from_secs(5), ws.next()).await;
        }
        return;
    }
    let mut ignored = Vec::new();
    let _ = drain_until(&mut ws, release_rx.changed(), &mut ignored).await;
    net::close_quietly(ws).await;
}

/// `/chat?token=…&templateId=…` for session `index`.
fn session_url(ctx: &Ctx, index: usize) -> Result<String> {
    let exp = crate::stats::epoch_nanos() / 1_000_000_000 + 24 * 3600;
    let claims = Claims {
        sub: format!("{}-{index}", ctx.user_prefix),
        role: "visitor",
        domain: &ctx.domain,
        exp,
    };
    let token = jsonwebtoken::encode(&Header::default(), &claims, &ctx.key)
        .context("cannot sign the session's token")?;
    let sep = if ctx.base_url.contains('?') { '&' } else { '?' };
    Ok(format!(
        "{}{sep}token={token}&templateId={}",
        ctx.base_url, ctx.template
    ))
}

/// Waits (at most `limit`) for the server's next question or `session_complete`; an
/// `error` frame, a close or the time limit is an error.
async fn reply(ws: &mut Ws, limit: Duration) -> Result<Said> {
    let deadline = Instant::now() + limit;
    loop {
        let msg = match timeout_at(deadline, ws.next()).await {
            Err(_) => bail!("no next_question within {limit:?}"),
            Ok(None) => bail!("connection closed (end of stream) while waiting for a question"),
            Ok(Some(Err(e))) => bail!("connection closed with an error while waiting: {e}"),
            Ok(Some(Ok(msg))) => msg,
        };
        let text = match &msg {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => bail!("connection {}", net::describe_close(&msg)),
            _ => continue,
        };
        let Ok(frame) = serde_json::from_str::<ChatFrame>(text) else {
            bail!("unreadable frame: {text}");
        };
        match frame.kind.as_str() {
            "next_question" => return Ok(Said::Question(frame.question.and_then(|q| q.id))),
            "session_complete" => return Ok(Said::Complete),
            "error" => bail!(
                "error frame {}",
                frame.code.as_deref().unwrap_or("(no code)")
            ),
            // `session_resumed` (a session of this user left over) precedes its question.
            _ => {}
        }
    }
}

/// Reads (and drops) whatever the server sends until `until` is ready, so that pings are
/// answered; `error` frames are noted in `errors`. A close ends it with an error.
async fn drain_until<F: std::future::Future>(
    ws: &mut Ws,
    until: F,
    errors: &mut Vec<String>,
) -> std::result::Result<F::Output, String> {
    let mut until = std::pin::pin!(until);
    loop {
        tokio::select! {
            out = &mut until => return Ok(out),
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(frame) = serde_json::from_str::<ChatFrame>(text.as_str()) {
                        match frame.kind.as_str() {
                            "error" => errors.push(format!(
                                "error frame {} (between answers)",
                                frame.code.as_deref().unwrap_or("(no code)")
                            )),
                            other => errors.push(format!("unexpected {other} between answers")),
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("connection {} between answers", net::describe_close(&Message::Close(frame))));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("connection failed between answers: {e}")),
                None => return Err("connection closed (end of stream) between answers".to_owned()),
            }
        }
    }
}

// ------------------------------------------------------------------------------------
// The fake AI service
// ------------------------------------------------------------------------------------

/// Answers `POST /v1/chat/next-question` on every connection, keeping connections open
/// (HTTP/1.1 keep-alive), as a pooled HTTP client expects.
async fn serve_fake(listener: TcpListener, complete_after: usize, calls: Arc<AtomicU64>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let calls = Arc::clone(&calls);
        tokio::spawn(async move {
            let _ = fake_connection(tcp, complete_after, &calls).await;
        });
    }
}

async fn fake_connection(
    mut tcp: TcpStream,
    complete_after: usize,
    calls: &AtomicU64,
) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut seen: Vec<u8> = Vec::with_capacity(4096);
    let mut buf = [0u8; 8192];
    loop {
        let body_start = loop {
            if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            seen.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&seen[..body_start]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let length: usize = header("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let close = header("connection:").is_some_and(|v| v == "close");
        let right_path = head.starts_with("post /v1/chat/next-question ");
        while seen.len() < body_start + length {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            seen.extend_from_slice(&buf[..n]);
        }
        let (status, body) = if right_path {
            let answers = user_turns(&seen[body_start..body_start + length]);
            calls.fetch_add(1, Ordering::Relaxed);
            let body = if complete_after > 0 && answers >= complete_after {
                r#"{"status":"completed","documentId":"bench-document"}"#.to_owned()
            } else {
                format!(
                    r#"{{"status":"in_progress","nextQuestion":{{"text":"Question {}?"}}}}"#,
                    answers + 1
                )
            };
            ("200 OK", body)
        } else {
            ("404 Not Found", r#"{"error":"not found"}"#.to_owned())
        };
        seen.drain(..body_start + length);
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        tcp.write_all(response.as_bytes()).await?;
        if close {
            tcp.shutdown().await?;
            return Ok(());
        }
    }
}

/// The user's turns in a `next-question` request's `history`.
fn user_turns(body: &[u8]) -> usize {
    #[derive(Deserialize)]
    struct Request {
        #[serde(default)]
        history: Vec<Turn>,
    }
    #[derive(Deserialize)]
    struct Turn {
        #[serde(default)]
        role: String,
    }
    serde_json::from_slice::<Request>(body)
        .map(|r| r.history.iter().filter(|t| t.role == "user").count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_user_turns() {
        let body = br#"{"sessionId":"s","history":[{"role":"assistant","content":"Q?"},
            {"role":"user","content":"A"},{"role":"assistant","content":"Q2?"},
            {"role":"user","content":"\"role\":\"user\""}]}"#;
        assert_eq!(user_turns(body), 2);
        assert_eq!(user_turns(b"not json"), 0);
    }

    #[tokio::test]
    async fn fake_service_keeps_connections_and_completes() -> Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let calls = Arc::new(AtomicU64::new(0));
        tokio::spawn(serve_fake(listener, 2, Arc::clone(&calls)));
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut ask = async |history: &str| -> Result<String> {
            let body = format!(r#"{{"sessionId":"s","history":[{history}]}}"#);
            let request = format!(
                "POST /v1/chat/next-question HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(request.as_bytes()).await?;
            let mut buf = vec![0u8; 4096];
            let n = timeout(Duration::from_secs(5), tcp.read(&mut buf)).await??;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let first = ask("").await?;
        assert!(first.contains("Question 1?"), "{first}");
        let second = ask(r#"{"role":"user","content":"a"}"#).await?;
        assert!(second.contains("Question 2?"), "{second}");
        let done = ask(r#"{"role":"user","content":"a"},{"role":"user","content":"b"}"#).await?;
        assert!(done.contains(r#""status":"completed""#), "{done}");
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        Ok(())
    }

    #[test]
    fn signs_tokens_the_server_reads() -> Result<()> {
        let ctx = Ctx {
            target: Target {
                url: "ws://127.0.0.1:1/chat".to_owned(),
                addr: "127.0.0.1:1".parse()?,
                sources: Vec::new(),
            },
            base_url: "ws://127.0.0.1:1/chat".to_owned(),
            template: "mutual-nda".to_owned(),
            domain: "demo".to_owned(),
            key: EncodingKey::from_secret(b"0123456789abcdef0123"),
            user_prefix: "bench-1".to_owned(),
            mode: Mode::Guide,
            sessions: 1,
            answers: 1,
            pace: Duration::from_secs(1),
            ramp: Duration::ZERO,
            reply_limit: Duration::from_secs(1),
            connect_limit: Duration::from_secs(1),
        };
        let url = session_url(&ctx, 7)?;
        let token = url
            .split("token=")
            .nth(1)
            .and_then(|t| t.split('&').next())
            .context("no token")?;
        assert!(url.ends_with("&templateId=mutual-nda"), "{url}");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef0123"),
            &validation,
        )?;
        assert_eq!(data.claims["sub"], "bench-1-7");
        assert_eq!(data.claims["role"], "visitor");
        assert_eq!(data.claims["domain"], "demo");
        Ok(())
    }
}

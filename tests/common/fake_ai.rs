//! A fake AI vendor: a real HTTP server on 127.0.0.1 that answers each request with the
//! next scripted reply, byte for byte as the vendor sends it (SSE framing and all), and
//! records what it was asked and whether the client hung up mid-reply.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use parking_lot::Mutex;
use serde_json::Value;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with an event stream: each piece after its delay; with `cut`, the connection is
    /// dropped after the last piece instead of ending the body.
    Stream {
        pieces: Vec<(Duration, String)>,
        cut: bool,
    },
    /// An error status with headers and a body.
    Error {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
}

impl Reply {
    /// The pieces sent at once, ended normally.
    pub fn stream(pieces: Vec<String>) -> Self {
        Reply::Stream {
            pieces: pieces.into_iter().map(|p| (Duration::ZERO, p)).collect(),
            cut: false,
        }
    }
}

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Debug, Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    received: Mutex<Vec<Received>>,
    /// Streams the client dropped before they ended.
    hung_up: AtomicUsize,
}

/// The running fake.
#[derive(Debug, Clone)]
pub struct FakeVendor {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeVendor {
    /// Starts the fake with `script` (one reply per request, in order; the last repeats).
    pub async fn start(script: Vec<Reply>) -> Self {
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            ..Shared::default()
        });
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, shared }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().clone()
    }

    /// How many streams the client dropped before their end.
    pub fn hung_up(&self) -> usize {
        self.shared.hung_up.load(Ordering::SeqCst)
    }

    /// Waits up to 5 s for `n` hang-ups.
    pub async fn wait_hung_up(&self, n: usize) -> bool {
        for _ in 0..100 {
            if self.hung_up() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Counts a hang-up when a stream is dropped before it finished.
struct HangUpGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl HangUpGuard {
    /// The stream ended normally.
    fn complete(mut self) {
        self.finished = true;
    }
}

impl Drop for HangUpGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.hung_up.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn answer(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let headers = req.headers().clone();
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    shared.received.lock().push(Received {
        path_and_query,
        headers,
        body,
    });
    let reply = {
        let mut script = shared.script.lock();
        if script.len() > 1 {
            script.pop_front()
        } else {
            script.front().cloned()
        }
    };
    match reply {
        None => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from("no script"))
            .unwrap(),
        Some(Reply::Error {
            status,
            headers,
            body,
        }) => {
            let mut res = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            for (name, value) in headers {
                res = res.header(name, value);
            }
            res.body(Body::from(body)).unwrap()
        }
        Some(Reply::Stream { pieces, cut }) => {
            let guard = HangUpGuard {
                shared: Arc::clone(&shared),
                finished: false,
            };
            let state = (VecDeque::from(pieces), guard, cut);
            let stream =
                futures_util::stream::unfold(state, |(mut pieces, mut guard, cut)| async move {
                    match pieces.pop_front() {
                        Some((delay, piece)) => {
                            tokio::time::sleep(delay).await;
                            Some((Ok(Bytes::from(piece)), (pieces, guard, cut)))
                        }
                        None if cut => {
                            // Let what was sent reach the client before the connection drops.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            guard.finished = true;
                            Some((
                                Err(std::io::Error::other("cut on purpose")),
                                (pieces, guard, false),
                            ))
                        }
                        None => {
                            guard.complete();
                            None
                        }
                    }
                });
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

// ------------------------------------------------------------------------------------------
// The vendors' wire formats
// ------------------------------------------------------------------------------------------

/// OpenAI Chat Completions chunks for `texts`, then the finish, the usage chunk and
/// `[DONE]`; without `end`, only the text chunks.
pub fn openai_stream(texts: &[&str], usage: (u64, u64), end: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        let v = serde_json::json!({
            "id": "chatcmpl-9x1", "object": "chat.completion.chunk", "created": 1_763_790_000,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_1",
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
            "usage": null
        });
        format!("data: {v}\n\n")
    };
    let mut out = vec![chunk(
        serde_json::json!({ "role": "assistant", "content": "", "refusal": null }),
        Value::Null,
    )];
    for t in texts {
        out.push(chunk(serde_json::json!({ "content": t }), Value::Null));
    }
    if end {
        out.push(chunk(serde_json::json!({}), "stop".into()));
        let usage = serde_json::json!({
            "id": "chatcmpl-9x1", "object": "chat.completion.chunk", "created": 1_763_790_000,
            "model": "gpt-4o-mini-2024-07-18", "choices": [],
            "usage": { "prompt_tokens": usage.0, "completion_tokens": usage.1,
                       "total_tokens": usage.0 + usage.1 }
        });
        out.push(format!("data: {usage}\n\n"));
        out.push("data: [DONE]\n\n".to_owned());
    }
    out
}

/// An OpenAI error body.
pub fn openai_error(message: &str, kind: &str) -> String {
    serde_json::json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })
        .to_string()
}

/// Anthropic Messages events for `texts`; without `end`, no `message_delta`/`message_stop`.
pub fn anthropic_stream(texts: &[&str], usage: (u64, u64), end: bool) -> Vec<String> {
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut out = vec![
        event(
            "message_start",
            serde_json::json!({ "type": "message_start", "message": {
                "id": "msg_01X", "type": "message", "role": "assistant", "content": [],
                "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": usage.0, "cache_creation_input_tokens": 0,
                           "cache_read_input_tokens": 0, "output_tokens": 1 } } }),
        ),
        event(
            "content_block_start",
            serde_json::json!({ "type": "content_block_start", "index": 0,
                                "content_block": { "type": "text", "text": "" } }),
        ),
        event("ping", serde_json::json!({ "type": "ping" })),
    ];
    for t in texts {
        out.push(event(
            "content_block_delta",
            serde_json::json!({ "type": "content_block_delta", "index": 0,
                                "delta": { "type": "text_delta", "text": t } }),
        ));
    }
    if end {
        out.push(event(
            "content_block_stop",
            serde_json::json!({ "type": "content_block_stop", "index": 0 }),
        ));
        out.push(event(
            "message_delta",
            serde_json::json!({ "type": "message_delta",
                                "delta": { "stop_reason": "end_turn", "stop_sequence": null },
                                "usage": { "output_tokens": usage.1 } }),
        ));
        out.push(event(
            "message_stop",
            serde_json::json!({ "type": "message_stop" }),
        ));
    }
    out
}

/// An Anthropic error body (also the `data` of an `error` event).
pub fn anthropic_error(message: &str, kind: &str) -> String {
    serde_json::json!({ "type": "error", "error": { "type": kind, "message": message } })
        .to_string()
}

/// Gemini `streamGenerateContent?alt=sse` events (CRLF-framed, as Google sends them); the
/// last carries `finishReason` and `usageMetadata`. Without `end`, no finish.
pub fn gemini_stream(texts: &[&str], usage: (u64, u64), end: bool) -> Vec<String> {
    let n = texts.len();
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let last = end && i + 1 == n;
            let mut candidate = serde_json::json!({
                "content": { "parts": [{ "text": t }], "role": "model" }, "index": 0
            });
            if last {
                candidate["finishReason"] = "STOP".into();
            }
            let mut v = serde_json::json!({
                "candidates": [candidate],
                "usageMetadata": { "promptTokenCount": usage.0, "totalTokenCount": usage.0 },
                "modelVersion": "gemini-2.5-flash", "responseId": "r1"
            });
            if last {
                v["usageMetadata"] = serde_json::json!({
                    "promptTokenCount": usage.0, "candidatesTokenCount": usage.1,
                    "totalTokenCount": usage.0 + usage.1
                });
            }
            format!("data: {v}\r\n\r\n")
        })
        .collect()
}

/// A Gemini error body.
pub fn gemini_error(code: u16, message: &str, status: &str) -> String {
    serde_json::json!({ "error": { "code": code, "message": message, "status": status } })
        .to_string()
}

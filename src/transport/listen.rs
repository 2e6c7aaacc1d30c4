//! The listener: accepts TCP connections and serves HTTP/1.1 (and WebSocket upgrades) on
//! each, under the edge's connection rules.
//!
//! - **Per-address cap** at accept, before a byte is read: an address (IPv6: its /64) with
//!   `limits.ip_max_connections` open connections gets a fixed 429 `too_many_connections`
//!   answer and is closed. A trusted proxy is not capped here; the clients behind it are
//!   capped by their WebSockets at the upgrade.
//! - **Header timeout**: a request's headers must arrive within `limits.header_timeout_ms`
//!   of the connection's start or of the previous response (hyper's header-read timer, which
//!   also ends idle keep-alive connections). A half-open or slow-header connection is closed.
//! - **Body timeout**: [`body_in_time`] gives a request's whole body
//!   `limits.body_timeout_ms`; a slower one gets 408 `request_timeout` and the connection
//!   closes.
//! - **Shutdown**: accepting stops when the server's token is cancelled; each connection
//!   finishes the request it is serving and closes. Connection tasks run under the node's
//!   supervisor, so the shutdown deadline covers them and a panic in one ends only it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use super::edge::AddressSlot;
use super::error::ApiError;
use crate::error_code::ErrorCode;
use crate::transport::AppState;

/// Retry-After of the per-address connection cap's answer, in seconds.
const CAP_RETRY_SECS: u64 = 5;
/// How long writing the cap's answer may take before the connection is just dropped.
const CAP_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after an accept error (out of file descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Shortest time between two warnings about failing accepts.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Accepts connections on `listener` and serves `router` on each until the server shuts
/// down.
pub async fn serve(listener: TcpListener, router: Router, app: AppState) {
    let shutdown = app.supervisor.shutdown().clone();
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: say so, once a minute at most.
                    if warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                        warned = Some(std::time::Instant::now());
                        tracing::warn!(error = %e, "cannot accept connections; retrying");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Chat frames are small and latency-bound: send them at once instead of letting
        // Nagle's algorithm hold them for the peer's delayed ACK (tens of milliseconds).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let slot = if app.edge.is_trusted_proxy(peer.ip()) {
            None
        } else {
            match app.edge.tcp.open(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    app.metrics.refused("address_connections");
                    tokio::spawn(refuse(stream, app.edge.tcp.max()));
                    continue;
                }
            }
        };
        app.supervisor.spawn_isolated(
            "connection",
            connection(stream, peer, router.clone(), app.clone(), slot),
        );
    }
}

/// A connection's place under the per-address cap, in each of its requests' extensions: a
/// WebSocket upgrade keeps it for the socket's life, so an upgraded connection stays counted.
#[derive(Debug, Clone)]
pub struct TcpSlot(pub Arc<AddressSlot>);

/// Serves one connection; `slot` holds its place under the per-address cap until it closes
/// (or, once upgraded, until its WebSocket does).
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    app: AppState,
    slot: Option<AddressSlot>,
) {
    let slot = slot.map(|slot| TcpSlot(Arc::new(slot)));
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if let Some(slot) = &slot {
            req.extensions_mut().insert(slot.clone());
        }
        router.clone().oneshot(req.map(Body::new))
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.config.limits.header_timeout_ms);
    let conn = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = app.supervisor.shutdown().cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        if e.is_timeout() {
            app.metrics.refused("header_timeout");
        }
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Answers a connection over its address's cap and closes it, without reading anything.
async fn refuse(mut stream: TcpStream, max: u32) {
    let body = serde_json::json!({
        "error": {
            "code": ErrorCode::TooManyConnections,
            "message": format!("this address has {max} connections open (limits.ip_max_connections); close some first"),
        }
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: \
         {CAP_RETRY_SECS}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(CAP_WRITE_TIMEOUT, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Middleware: a request's body must arrive whole within `limits.body_timeout_ms` of its
/// headers. When it does not, whatever the handler made of the cut body is replaced by 408
/// `request_timeout` with `Connection: close`.
pub async fn body_in_time(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let timed_out = Arc::new(AtomicBool::new(false));
    let body = Body::new(DeadlineBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(app.config.limits.body_timeout_ms)),
        timed_out: Arc::clone(&timed_out),
    });
    let res = next.run(Request::from_parts(parts, body)).await;
    if !timed_out.load(Ordering::Relaxed) {
        return res;
    }
    app.metrics.refused("body_timeout");
    let secs = app.config.limits.body_timeout_ms.as_secs_f64();
    let mut res = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        ErrorCode::RequestTimeout,
        format!("the request body did not arrive within {secs} s"),
    )
    .into_response();
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// A request body that fails once its deadline passes.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

/// The error a [`DeadlineBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("request body timed out")]
struct BodyTimedOut;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimedOut.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for DeadlineBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineBody").finish_non_exhaustive()
    }
}

//! A fake of a customer's AI service for guided sessions (seed 003's contract): answers
//! `POST /v1/chat/next-question` with the next scripted (status, body, delay) (500 once the
//! script ends) and records every request, on any path, with its headers and body, so a
//! call to the wrong path shows up (and gets a 404).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    /// `null` for a request on another path.
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct FakeService {
    script: Arc<Mutex<VecDeque<(u16, Value, Duration)>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeService {
    /// Starts on a free port of 127.0.0.1 with `script` answered at once.
    pub async fn start(script: Vec<(u16, Value)>) -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Self::default();
        for (status, body) in script {
            fake.push(status, body, Duration::ZERO);
        }
        fake.serve_on(listener);
        (fake, addr)
    }

    /// Serves on `listener` (a port chosen before the service is up).
    pub fn serve_on(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/v1/chat/next-question", axum::routing::post(next_question))
            .fallback(elsewhere)
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    /// Adds an answer to the script.
    pub fn push(&self, status: u16, body: Value, delay: Duration) {
        self.script.lock().push_back((status, body, delay));
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().clone()
    }
}

/// The contract's "ask this next".
pub fn question(text: &str) -> Value {
    json!({ "status": "in_progress", "nextQuestion": { "text": text } })
}

async fn next_question(
    State(fake): State<FakeService>,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    fake.received.lock().push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    let next = fake.script.lock().pop_front();
    let (status, body, delay) =
        next.unwrap_or((500, json!({ "error": "script ended" }), Duration::ZERO));
    tokio::time::sleep(delay).await;
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

async fn elsewhere(State(fake): State<FakeService>, uri: Uri, headers: HeaderMap) -> StatusCode {
    fake.received.lock().push(Received {
        path: uri.path().to_owned(),
        headers,
        body: Value::Null,
    });
    StatusCode::NOT_FOUND
}

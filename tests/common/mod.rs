//! Test harness: starts the real server on `127.0.0.1:0` with its own SQLite file, and a
//! WebSocket client that speaks JSON frames with timeouts on every wait.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

pub mod cluster;
pub mod fake_service;
pub mod process;
pub mod pusher;
pub mod redis;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parlor::config::Config;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// The JWT secret test servers use unless a test sets another.
pub const TEST_SECRET: &str = "parlor-test-secret-0123456789";

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), parlor::RunError>>,
    /// Keeps the database directory alive for the server's lifetime (and restarts).
    pub dir: Arc<tempfile::TempDir>,
}

impl TestServer {
    /// Defaults, with limits raised so tests are not throttled unless they mean to be.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = Config::default();
        config.limits.messages_per_second = 10_000;
        config.limits.messages_burst = 10_000;
        config.shutdown_timeout_ms = Duration::from_secs(5);
        config.database = format!("sqlite://{}", dir.path().join("parlor.db").display());
        config.auth.jwt_secret = Some(parlor::config::Secret::new(TEST_SECRET));
        // Plain chat rooms: the demo's assistant would answer every visitor message, and
        // without it hand-off would queue every visitor's own room for a person; tests that
        // want either turn it back on.
        for d in &mut config.domains {
            if let Some(bot) = d.bot.as_mut() {
                bot.enabled = false;
            }
            d.handoff.enabled = false;
        }
        configure(&mut config);
        config.validate().expect("valid test config");
        Self::launch(config, dir).await
    }

    async fn launch(config: Config, dir: Arc<tempfile::TempDir>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(parlor::run(config.clone(), listener, shutdown.clone()));
        let server = Self {
            addr,
            config,
            shutdown,
            handle,
            dir,
        };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&self) {
        let url = self.http("/health");
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server did not become healthy");
    }

    /// Stops gracefully and waits for `run` to return.
    pub async fn stop(self) -> (Config, Arc<tempfile::TempDir>) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server run ok");
        (self.config, self.dir)
    }

    /// Stops and starts again on the same database (new port).
    pub async fn restart(self) -> Self {
        let (config, dir) = self.stop().await;
        Self::launch(config, dir).await
    }

    pub fn ws(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("parlor.db")
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.ws("/ws")).await
    }

    /// A visitor token for `user` (a stable identity across reconnects).
    pub fn token(&self, user: &str) -> String {
        self.token_in("demo", user, "visitor")
    }

    /// A token for `user` with `role` in `domain`.
    pub fn token_in(&self, domain: &str, user: &str, role: &str) -> String {
        let secret = self
            .config
            .auth
            .jwt_secret
            .as_ref()
            .expect("test servers have a secret");
        parlor::auth::issue_token(secret, user, Some(user), role, domain, 600).expect("token")
    }

    /// Connects as `user`.
    pub async fn connect_as(&self, user: &str) -> Client {
        Client::connect(&self.ws(&format!("/ws?token={}", self.token(user)))).await
    }

    /// `method path` with a bearer token and an optional JSON body: the status and the
    /// JSON answer (`null` if none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        call(method, &self.http(path), token, body).await
    }

    /// `GET path` with a bearer token: the status and the JSON body (`null` if none).
    pub async fn get_with(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    /// `DELETE path` with a bearer token: the status and the JSON answer (`null` if none).
    pub async fn delete_with(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, token, None).await
    }

    /// `POST path` with a bearer token and a JSON body: the status and the JSON answer.
    pub async fn post_with(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    /// A counter or gauge value from `/metrics` (sum over labels matching `filter`).
    pub async fn metric(&self, name: &str, filter: &str) -> f64 {
        metric(&self.http("/metrics"), name, filter).await
    }
}

/// A counter or gauge value from the `/metrics` page at `url` (sum over the lines of `name`
/// whose labels contain `filter`).
pub async fn metric(url: &str, name: &str, filter: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A domain of plain chat rooms for tests that are not about the assistant or hand-off:
/// without an assistant, hand-off would queue every visitor's own room for a person.
pub fn chat_domain(id: &str, name: &str) -> parlor::config::DomainConfig {
    let mut d = parlor::config::DomainConfig::new(id, name);
    d.handoff.enabled = false;
    d
}

/// A WebSocket client speaking JSON frames.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub next_id: u64,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        Self { ws, next_id: 0 }
    }

    pub async fn try_connect(url: &str) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { ws, next_id: 0 })
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send raw");
    }

    /// Sends a request with a fresh `id` and returns the id.
    pub async fn request(&mut self, mut frame: Value) -> String {
        self.next_id += 1;
        let id = format!("req-{}", self.next_id);
        frame["id"] = json!(id);
        self.send(frame).await;
        id
    }

    /// The next JSON frame.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("frame ok");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next JSON frame, or `None` once the connection is gone (no timeout).
    pub async fn ws_next(&mut self) -> Option<Value> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next frame of type `ty`, skipping others (presence, typing…).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let f = self.recv().await;
            if f["type"] == ty {
                return f;
            }
        }
    }

    /// The reply to request `id` (an error frame counts as a reply).
    pub async fn reply(&mut self, id: &str) -> Value {
        loop {
            let f = self.recv().await;
            if f["replyTo"] == id {
                return f;
            }
        }
    }

    /// Joins and returns (`room-joined`, all history messages across chunks).
    pub async fn join(&mut self, room: &str, since: Option<u64>) -> (Value, Vec<Value>) {
        let mut frame = json!({ "type": "join-room", "roomId": room });
        if let Some(s) = since {
            frame["since"] = json!(s);
        }
        let id = self.request(frame).await;
        let joined = self.reply(&id).await;
        assert_eq!(joined["type"], "room-joined", "join failed: {joined}");
        let mut history = Vec::new();
        loop {
            let h = self.recv_type("message-history").await;
            history.extend(h["messages"].as_array().expect("messages").iter().cloned());
            if h["more"] != true {
                break;
            }
        }
        (joined, history)
    }

    /// Every stored message of a joined room, oldest first, paged back with `history` (a
    /// rejoin would not do: it replays only what the connection was never sent).
    pub async fn stored(&mut self, room: &str) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let mut frame = json!({ "type": "history", "roomId": room, "limit": 200 });
            if let Some(first) = all.first() {
                frame["before"] = first["seq"].clone();
            }
            let id = self.request(frame).await;
            let page = self.reply(&id).await;
            assert_eq!(page["type"], "history", "history failed: {page}");
            let mut messages = page["messages"].as_array().expect("messages").clone();
            messages.append(&mut all);
            all = messages;
            if page["hasMore"] != true {
                return all;
            }
        }
    }

    /// Sends a message and returns its ack.
    pub async fn say(&mut self, room: &str, text: &str, client_id: Option<&str>) -> Value {
        let mut frame = json!({ "type": "send-message", "roomId": room, "message": text });
        if let Some(c) = client_id {
            frame["clientMessageId"] = json!(c);
        }
        let id = self.request(frame).await;
        let ack = self.reply(&id).await;
        assert_eq!(ack["type"], "message-ack", "send failed: {ack}");
        ack
    }

    /// Waits for the server to close the connection; returns the close frame if one came.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// `method url` with a bearer token and an optional JSON body: the status and the JSON
/// answer (`null` if none).
pub async fn call(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(body);
    }
    status_and_body(req.send().await.expect("request")).await
}

/// A response's status and JSON body (`null` when the body is not JSON).
pub async fn status_and_body(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

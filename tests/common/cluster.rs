//! Several Parlor processes on one PostgreSQL database and one Redis, for the cluster tests:
//! a database of the test's own ([`Database`]), a node ([`Node`], the real binary with a
//! log file of its own) and a set of them ([`Cluster`]).
//!
//! Tests using it need `PARLOR_TEST_DATABASE_URL` and `PARLOR_TEST_REDIS_URL` ([`servers`]).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::{Client, TEST_SECRET};

/// A node's `parlor.toml`: the demo domain without its assistant, and limits no test client
/// reaches.
pub const NODE_CONFIG: &str = r#"shutdown_timeout_ms = 3000
[limits]
messages_per_second = 100000
messages_burst = 100000
ip_connects_per_second = 100000
ip_connects_burst = 100000
ip_requests_per_second = 100000
ip_requests_burst = 100000
[[domains]]
id = "demo"
name = "Parlor demo"
visitor_rooms = "open"
allowed_origins = ["*"]
[domains.bot]
enabled = false
"#;

pub fn servers() -> Option<(String, String)> {
    let db = std::env::var("PARLOR_TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty());
    let redis = std::env::var("PARLOR_TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty());
    match (db, redis) {
        (Some(db), Some(redis)) => Some((db, redis)),
        _ => {
            eprintln!(
                "skipped: set PARLOR_TEST_DATABASE_URL and PARLOR_TEST_REDIS_URL to run the cluster tests"
            );
            None
        }
    }
}

/// A database of the test's own on the server of `url`, dropped at the end.
pub struct Database {
    pub admin_url: String,
    pub name: String,
}

impl Database {
    pub async fn create(url: &str) -> Self {
        let name = format!(
            "parlor_cluster_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .expect("connect to PostgreSQL");
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        Self {
            admin_url: url.to_owned(),
            name,
        }
    }

    /// The URL of this database (same server and user as the admin URL).
    pub fn url(&self) -> String {
        with_database(&self.admin_url, &self.name)
    }

    /// The same, through another host and port (the relay).
    pub fn url_via(&self, port: u16) -> String {
        let url = self.url();
        let (scheme, rest) = url.split_once("://").unwrap();
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (format!("{a}@"), r),
            None => (String::new(), rest),
        };
        let path = rest.split_once('/').map_or("", |(_, p)| p);
        format!("{scheme}://{auth}127.0.0.1:{port}/{path}")
    }

    pub async fn count(&self, room: &str) -> i64 {
        let mut conn = sqlx::PgConnection::connect(&self.url()).await.unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM messages m JOIN rooms r ON r.rid = m.room WHERE r.id = $1",
        )
        .bind(room)
        .fetch_one(&mut conn)
        .await
        .unwrap()
    }

    pub async fn seqs(&self, room: &str) -> Vec<u64> {
        let mut conn = sqlx::PgConnection::connect(&self.url()).await.unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT m.seq FROM messages m JOIN rooms r ON r.rid = m.room WHERE r.id = $1 ORDER BY m.seq",
        )
        .bind(room)
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|s| u64::try_from(s).unwrap())
        .collect()
    }

    /// The room's messages as (`seq`, text), in `seq` order.
    pub async fn contents(&self, room: &str) -> Vec<(u64, String)> {
        let mut conn = sqlx::PgConnection::connect(&self.url()).await.unwrap();
        sqlx::query_as::<_, (i64, String)>(
            "SELECT m.seq, m.content FROM messages m JOIN rooms r ON r.rid = m.room WHERE r.id = $1 ORDER BY m.seq",
        )
        .bind(room)
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(seq, text)| (u64::try_from(seq).unwrap(), text))
        .collect()
    }

    pub async fn drop_it(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::raw_sql(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One Parlor process.
pub struct Node {
    /// Where it listens on 127.0.0.1.
    pub port: u16,
    pub child: Child,
    /// Its stderr (the log), kept in the cluster's directory.
    pub log: std::path::PathBuf,
}

impl Node {
    /// Starts node `i` on `database` and `broker` with the `parlor.toml` of `dir` (written
    /// with the test defaults if there is none).
    pub fn start(
        dir: &std::path::Path,
        database: &str,
        broker: &str,
        prefix: &str,
        i: usize,
    ) -> Self {
        Self::start_with(dir, database, broker, prefix, i, &[])
    }

    /// [`Self::start`] with more environment variables (`PARLOR_…` settings).
    pub fn start_with(
        dir: &std::path::Path,
        database: &str,
        broker: &str,
        prefix: &str,
        i: usize,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let config = dir.join("parlor.toml");
        if !config.exists() {
            std::fs::write(&config, NODE_CONFIG).unwrap();
        }
        let log = dir.join(format!("node-{i}-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_parlor"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database", database, "--broker", broker])
            .arg("--config")
            .arg(&config)
            .env("PARLOR_BROKER_PREFIX", prefix)
            // A dead node's users leave their rooms after at most this long.
            .env("PARLOR_BROKER_PRESENCE_TTL_SECS", "2")
            .env("PARLOR_AUTH__JWT_SECRET", TEST_SECRET)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start parlor");
        Self { port, child, log }
    }

    pub async fn wait_healthy(&mut self) {
        let url = format!("http://127.0.0.1:{}/health", self.port);
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("node exited with {status}: {}", self.log_tail());
            }
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node did not become healthy: {}", self.log_tail());
    }

    /// `/ws` as the visitor `user` of the demo domain.
    pub fn ws(&self, user: &str) -> String {
        self.ws_as(user, "visitor")
    }

    /// `/ws` as `user` of the demo domain with `role`.
    pub fn ws_as(&self, user: &str, role: &str) -> String {
        let token = parlor::auth::issue_token(
            &parlor::config::Secret::new(TEST_SECRET),
            user,
            Some(user),
            role,
            "demo",
            600,
        )
        .unwrap();
        format!("ws://127.0.0.1:{}/ws?token={token}", self.port)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A counter of this node's `/metrics` (summed over the labels matching `filter`).
    pub async fn metric(&self, name: &str, filter: &str) -> f64 {
        super::metric(&self.http("/metrics"), name, filter).await
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Nodes sharing one database, one Redis and one channel prefix.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub db: Option<Database>,
    /// Holds the config file and the nodes' logs.
    pub dir: tempfile::TempDir,
    /// The nodes' Redis key and channel prefix.
    pub prefix: String,
}

impl Cluster {
    pub async fn start(n: usize, database: Option<&str>, broker: &str, db: Database) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("parlor-cluster-{}", uuid::Uuid::new_v4().simple());
        let url = database.map_or_else(|| db.url(), str::to_owned);
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut node = Node::start(dir.path(), &url, broker, &prefix, i);
            // One at a time the first time, so the migrations run once.
            node.wait_healthy().await;
            nodes.push(node);
        }
        Self {
            nodes,
            db: Some(db),
            dir,
            prefix,
        }
    }

    pub fn db(&self) -> &Database {
        self.db.as_ref().unwrap()
    }

    pub async fn finish(mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        if let Some(db) = self.db.take() {
            db.drop_it().await;
        }
    }
}

/// Reads `message-received` frames of `room` until `n` have arrived; returns their seqs.
pub async fn collect_seqs(client: &mut Client, room: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        let f = client.recv().await;
        if f["type"] == "message-received" && f["roomId"] == room {
            seqs.push(f["seq"].as_u64().unwrap());
        }
    }
    seqs
}

/// Nodes sharing `config` (the whole parlor.toml), started like [`Cluster::start`].
pub async fn cluster_with_config(n: usize, broker: &str, db: Database, config: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("parlor.toml"), config).unwrap();
    let prefix = format!("parlor-cluster-{}", uuid::Uuid::new_v4().simple());
    let url = db.url();
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut node = Node::start(dir.path(), &url, broker, &prefix, i);
        node.wait_healthy().await;
        nodes.push(node);
    }
    Cluster {
        nodes,
        db: Some(db),
        dir,
        prefix,
    }
}

/// Retries `check` every 50 ms until it holds, for at most `within`; false if it never did.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

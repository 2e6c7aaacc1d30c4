//! A `redis-server` of a test's own, on a free port, that the test may kill and restart
//! (the machine's shared Redis is never stopped).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The Redis of `PARLOR_TEST_REDIS_URL`, or `None` (saying the tests are skipped).
pub fn test_url() -> Option<String> {
    let url = std::env::var("PARLOR_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!(
            "skipped: set PARLOR_TEST_REDIS_URL=redis://127.0.0.1:6379 to run the Redis tests"
        );
    }
    url
}

/// A fresh key and channel prefix, so parallel tests (and other users of the Redis) do not
/// hear each other.
pub fn prefix() -> String {
    format!("parlor-test-{}", uuid::Uuid::new_v4().simple())
}

/// A running (or killed) `redis-server`.
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts one on a free port.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut me = Self { port, child: None };
        me.restart();
        me
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (after [`Self::kill`]).
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (it is where PARLOR_TEST_REDIS_URL is set)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start");
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

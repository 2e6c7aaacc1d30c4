//! The real `parlor` binary as a child process, for tests that kill it with SIGKILL.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `parlor serve`.
pub struct Server {
    pub child: Child,
    /// `HOST:PORT` it listens on.
    pub addr: String,
    /// Every JSON log line it printed so far.
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Server {
    /// Starts `command`, a `parlor serve` with `--listen 127.0.0.1:0 --log-format json`, and
    /// waits for its "parlor listening" log line for the address.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn parlor");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "parlor listening" {
                    let _ = tx.send(v["fields"]["addr"].as_str().unwrap_or_default().to_owned());
                }
                kept.lock().unwrap().push(v);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server reports its address");
        Self { child, addr, logs }
    }

    /// The log lines printed so far whose message is `message`.
    pub fn logged(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["fields"]["message"] == message)
            .cloned()
            .collect()
    }

    /// Waits up to `within` for the process to exit by itself.
    pub fn exit_status(&mut self, within: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM (what a service manager sends to stop it).
    pub fn terminate(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("kill -TERM");
    }

    /// `kill -9`, and the process reaped.
    pub fn kill9(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9");
        self.child.wait().expect("reap");
    }
}

/// A failed assertion must not leave the server running (it would hold the test's output
/// pipe open).
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

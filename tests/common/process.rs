//! The real `parlor` binary as a child process, for tests that kill it with SIGKILL.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running `parlor serve`.
pub struct Server {
    pub child: Child,
    /// `HOST:PORT` it listens on.
    pub addr: String,
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
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["fields"]["message"] == "parlor listening"
                {
                    let _ = tx.send(v["fields"]["addr"].as_str().unwrap_or_default().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server reports its address");
        Self { child, addr }
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

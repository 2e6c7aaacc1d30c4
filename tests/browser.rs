//! The browser tests: `tests/browser/e2e.mjs` drives the widget and the agent inbox in
//! headless Chromium (with `playwright-core`) against this crate's `parlor` binary.
//!
//! They run when `PARLOR_TEST_CHROMIUM` names a Chromium binary (CI sets it), after
//! `npm ci --prefix tests/browser`; otherwise the test says so and passes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The whole script's budget; it has its own, shorter one and stops its server itself.
const TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn widget_and_inbox_in_a_browser() -> Result<()> {
    let Some(chromium) = std::env::var_os("PARLOR_TEST_CHROMIUM").filter(|v| !v.is_empty()) else {
        println!("skipped: set PARLOR_TEST_CHROMIUM=/usr/bin/chromium to run the browser tests");
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let suite = root.join("tests/browser");
    if !suite.join("node_modules/playwright-core").is_dir() {
        bail!(
            "PARLOR_TEST_CHROMIUM is set but the browser tests' packages are missing: \
             run `npm ci --prefix tests/browser` first"
        );
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    let out = target.join("browser");

    let child = Command::new("node")
        .arg(suite.join("e2e.mjs"))
        .current_dir(root)
        .env("PARLOR_BIN", env!("CARGO_BIN_EXE_parlor"))
        .env("PARLOR_TEST_CHROMIUM", &chromium)
        .env("PARLOR_TEST_OUT", &out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start `node` (is Node.js installed?)")?;
    let (status, stdout, stderr) = wait_with_timeout(child, TIMEOUT)?;

    print!("{stdout}");
    eprint!("{stderr}");
    match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!("the browser tests failed ({status}); see their output above"),
        None => bail!(
            "the browser tests did not finish within {} s; see their output above",
            TIMEOUT.as_secs()
        ),
    }
}

/// Waits for the child, reading its output as it comes (so a full pipe never blocks it).
/// After `timeout`, asks it to stop (SIGTERM: the script then stops its server), and kills
/// it if it does not; the status is then `None`.
fn wait_with_timeout(
    mut child: Child,
    timeout: Duration,
) -> Result<(Option<std::process::ExitStatus>, String, String)> {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            terminate(&mut child)?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// SIGTERM, up to 20 s to exit, then SIGKILL.
fn terminate(child: &mut Child) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let asked = Instant::now();
    while asked.elapsed() < Duration::from_secs(20) {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

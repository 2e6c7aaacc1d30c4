//! Reading a process's resource usage from `/proc`.
//!
//! Only what the scenarios need: resident set size (`VmRSS` in
//! `/proc/PID/status`), CPU time (`utime` + `stime`, fields 14 and 15 of
//! `/proc/PID/stat`) and the number of open file descriptors.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// Which process to read: a PID, or this process itself.
#[derive(Debug, Clone, Copy)]
pub enum Proc {
    Pid(u32),
    SelfProc,
}

impl Proc {
    fn path(self, file: &str) -> PathBuf {
        match self {
            Proc::Pid(pid) => PathBuf::from(format!("/proc/{pid}/{file}")),
            Proc::SelfProc => PathBuf::from(format!("/proc/self/{file}")),
        }
    }

    fn describe(self) -> String {
        match self {
            Proc::Pid(pid) => format!("process {pid}"),
            Proc::SelfProc => "this process".to_owned(),
        }
    }

    /// Resident set size in KiB (`VmRSS`).
    pub fn rss_kib(self) -> Result<u64> {
        let path = self.path("status");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (is {} still running?)",
                path.display(),
                self.describe()
            )
        })?;
        parse_vm_rss(&text).with_context(|| format!("no VmRSS line in {}", path.display()))
    }

    /// CPU time consumed so far (user + system).
    pub fn cpu_time(self) -> Result<Duration> {
        let path = self.path("stat");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (is {} still running?)",
                path.display(),
                self.describe()
            )
        })?;
        let ticks =
            parse_cpu_ticks(&text).with_context(|| format!("malformed {}", path.display()))?;
        Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
    }

    /// Number of open file descriptors (entries in `/proc/PID/fd`).
    pub fn open_fds(self) -> Result<u64> {
        let path = self.path("fd");
        let entries =
            std::fs::read_dir(&path).with_context(|| format!("cannot list {}", path.display()))?;
        Ok(entries.count() as u64)
    }
}

/// CPU time the whole machine has spent in user, nice and system mode
/// (the first three fields of the `cpu` line of `/proc/stat`; idle, I/O
/// wait, interrupts and steal are left out, as they are for a process's
/// utime + stime). Compared with the server's and the load generator's own
/// CPU time it shows how much other processes ran during a measurement.
pub fn machine_busy() -> Result<Duration> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let ticks = parse_machine_busy(&text).context("malformed /proc/stat")?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
}

fn parse_machine_busy(stat: &str) -> Result<u64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no aggregate cpu line"))?;
    line.split_whitespace()
        .skip(1)
        .take(3)
        .map(|f| f.parse::<u64>().context("cpu field is not a number"))
        .sum()
}

/// CPU accounting around a measurement: the server (if known), the load
/// generator's processes, and the machine as a whole.
#[derive(Debug, Clone)]
pub struct CpuWatch {
    server: Option<Proc>,
    clients: Vec<Proc>,
}

/// One reading of a [`CpuWatch`].
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    server: Option<Duration>,
    clients: Duration,
    machine: Option<Duration>,
}

/// CPU seconds used between two samples.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    pub server: Option<f64>,
    pub clients: f64,
    /// Machine busy time not accounted to the server or the load generator:
    /// other processes (and kernel threads).
    pub other: Option<f64>,
}

impl CpuWatch {
    pub fn new(server: Option<Proc>, clients: Vec<Proc>) -> Self {
        Self { server, clients }
    }

    /// Reads all clocks; the server's must be readable, a client process
    /// that has gone counts as zero.
    pub fn sample(&self) -> Result<CpuSample> {
        Ok(CpuSample {
            server: self.server.map(Proc::cpu_time).transpose()?,
            clients: self.clients.iter().filter_map(|p| p.cpu_time().ok()).sum(),
            machine: machine_busy().ok(),
        })
    }
}

impl CpuSample {
    pub fn until(&self, later: &CpuSample) -> CpuUse {
        let secs = |a: Duration, b: Duration| b.saturating_sub(a).as_secs_f64();
        let server = match (self.server, later.server) {
            (Some(a), Some(b)) => Some(secs(a, b)),
            _ => None,
        };
        let clients = secs(self.clients, later.clients);
        let other = match (self.machine, later.machine) {
            (Some(a), Some(b)) => Some((secs(a, b) - server.unwrap_or(0.0) - clients).max(0.0)),
            _ => None,
        };
        CpuUse {
            server,
            clients,
            other,
        }
    }
}

/// Extracts `VmRSS` (KiB) from the text of `/proc/PID/status`.
fn parse_vm_rss(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("VmRSS missing"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts
        .next()
        .ok_or_else(|| anyhow!("VmRSS has no value"))?
        .parse()
        .context("VmRSS value is not a number")?;
    match parts.next() {
        Some("kB") | None => Ok(value),
        Some(unit) => bail!("unexpected VmRSS unit {unit:?}"),
    }
}

/// Extracts `utime + stime` (clock ticks) from the text of `/proc/PID/stat`.
///
/// The second field (the command name) is in parentheses and may itself hold
/// spaces or parentheses, so fields are counted from the last `)`: the text
/// after it starts with field 3 (`state`), which puts `utime` (field 14) at
/// index 11 and `stime` (field 15) at index 12.
fn parse_cpu_ticks(stat: &str) -> Result<u64> {
    let close = stat
        .rfind(')')
        .ok_or_else(|| anyhow!("no ')' after the command name"))?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |index: usize, name: &str| -> Result<u64> {
        fields
            .get(index)
            .ok_or_else(|| anyhow!("field {name} missing"))?
            .parse::<u64>()
            .with_context(|| format!("field {name} is not a number"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` once (the crate forbids
/// `unsafe`, so no libc call); 100 when that fails, which is the value on
/// every mainstream Linux build.
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() -> Result<()> {
        let status = "Name:\tparlor\nVmPeak:\t  10 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status)?, 12345);
        assert!(parse_vm_rss("Name: x\n").is_err());
        Ok(())
    }

    #[test]
    fn parses_cpu_ticks_with_awkward_command_names() -> Result<()> {
        // Fields 14 and 15 are 250 and 50.
        let stat =
            "4242 (we ird) name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat)?, 300);
        assert!(parse_cpu_ticks("4242 (x) S 1").is_err());
        Ok(())
    }

    #[test]
    fn parses_machine_busy() -> Result<()> {
        let stat = "cpu  100 5 20 900 3 0 7 1 0 0\ncpu0 50 5 10 450 1 0 3 0 0 0\n";
        assert_eq!(parse_machine_busy(stat)?, 125);
        assert!(parse_machine_busy("intr 1 2 3\n").is_err());
        Ok(())
    }

    #[test]
    fn converts_ticks() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 1000), Duration::from_millis(3));
    }

    #[test]
    fn reads_own_process() -> Result<()> {
        assert!(Proc::SelfProc.rss_kib()? > 0);
        Proc::SelfProc.cpu_time()?;
        assert!(Proc::SelfProc.open_fds()? > 0);
        Ok(())
    }
}

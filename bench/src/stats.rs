//! Latency recording: an HDR histogram in microseconds that can be shipped
//! between processes as `[value, count]` pairs and merged.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded exactly: one hour, in microseconds. Larger values
/// are clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// A latency histogram with microsecond resolution and 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Latencies {
    pub fn new() -> Self {
        // The bounds are constants that hdrhistogram accepts (low >= 1,
        // high >= 2 * low, sigfig <= 5); the fallback is never taken.
        let hist = Histogram::new_with_bounds(1, MAX_MICROS, 3)
            .or_else(|_| Histogram::new(3))
            .unwrap_or_else(|_| unreachable_histogram());
        Self { hist }
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.hist.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    pub fn record_nanos(&mut self, nanos: u64) {
        self.record(Duration::from_nanos(nanos));
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Both sides share the same bounds, so `add` cannot fail; a failure
        // would only lose samples, never corrupt them.
        let _ = self.hist.add(&other.hist);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Summary in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        LatencySummary {
            samples: self.hist.len(),
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p90_ms: ms(self.hist.value_at_quantile(0.90)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            p999_ms: ms(self.hist.value_at_quantile(0.999)),
            max_ms: ms(self.hist.max()),
            mean_ms: self.hist.mean() / 1000.0,
        }
    }

    /// Non-empty buckets as `[value_micros, count]` pairs, for shipping to
    /// another process.
    pub fn to_pairs(&self) -> Vec<[u64; 2]> {
        self.hist
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect()
    }

    pub fn from_pairs(pairs: &[[u64; 2]]) -> Result<Self> {
        let mut out = Self::new();
        for &[value, count] in pairs {
            out.hist
                .record_n(value.clamp(1, MAX_MICROS), count)
                .context("bad latency bucket from worker")?;
        }
        Ok(out)
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

#[cold]
fn unreachable_histogram() -> Histogram<u64> {
    // `Histogram::new(3)` only fails for sigfig > 5; abort loudly rather than
    // continue with a broken recorder.
    panic!("hdrhistogram rejected constant bounds")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl std::fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.samples
        )
    }
}

/// Wall-clock time as nanoseconds since the Unix epoch. All processes on the
/// machine share this clock, which is what lets a subscriber in one process
/// time a message sent from another.
pub fn epoch_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `count / seconds`, or 0 when no time elapsed.
pub fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_round_trip() -> Result<()> {
        let mut l = Latencies::new();
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.samples, 100);
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max_ms - 100.0).abs() < 0.1, "{s:?}");

        let copy = Latencies::from_pairs(&l.to_pairs())?;
        assert_eq!(copy.count(), 100);
        let mut merged = Latencies::new();
        merged.merge(&l);
        merged.merge(&copy);
        assert_eq!(merged.count(), 200);
        assert!((merged.summary().p50_ms - 50.0).abs() < 0.1);
        Ok(())
    }

    #[test]
    fn empty_summary_is_zero() {
        let s = Latencies::new().summary();
        assert_eq!(s.samples, 0);
        assert!(s.max_ms.abs() < f64::EPSILON);
    }
}

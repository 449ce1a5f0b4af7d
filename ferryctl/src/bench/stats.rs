//! Latency percentiles and the numbers a bench scenario reports.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// Adds one sample.
    pub fn record(&mut self, latency: Duration) {
        self.0
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile (0..=1), nearest rank; `None` without samples.
    pub fn quantile(&mut self, q: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        self.0.sort_unstable();
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        Some(Duration::from_micros(self.0[rank - 1]))
    }
}

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    pub sent: u64,
    pub delivered: u64,
    /// Publishes answered per second.
    pub publish_rate: f64,
    /// Messages delivered per second, from first publish to last delivery.
    pub end_to_end_rate: f64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub p999: Option<Duration>,
    /// `None` when the sidecars expose no fsync counter.
    pub fsyncs_per_sec: Option<f64>,
    pub cpu_secs_per_million: f64,
    /// Largest resident set of any sidecar at the end.
    pub max_rss_bytes: u64,
    pub errors: u64,
}

/// Header line of [`Report::row`].
pub fn header() -> String {
    format!(
        "{:<28} {:>7} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>6}",
        "scenario",
        "sent",
        "deliv",
        "pub/s",
        "e2e/s",
        "p50",
        "p99",
        "p999",
        "fsync/s",
        "cpu-s/M",
        "rss-MiB",
        "errors"
    )
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}ms", d.as_secs_f64() * 1000.0))
}

impl Report {
    /// One aligned line.
    pub fn row(&self) -> String {
        format!(
            "{:<28} {:>7} {:>7} {:>9.0} {:>9.0} {:>8} {:>8} {:>8} {:>8} {:>9.1} {:>7.1} {:>6}",
            self.name,
            self.sent,
            self.delivered,
            self.publish_rate,
            self.end_to_end_rate,
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            self.fsyncs_per_sec
                .map_or("-".into(), |f| format!("{f:.0}")),
            self.cpu_secs_per_million,
            self.max_rss_bytes as f64 / (1024.0 * 1024.0),
            self.errors
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let mut l = Latencies::default();
        assert_eq!(l.quantile(0.5), None);
        for us in 1..=1000 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.quantile(0.5), Some(Duration::from_micros(500)));
        assert_eq!(l.quantile(0.99), Some(Duration::from_micros(990)));
        assert_eq!(l.quantile(0.999), Some(Duration::from_micros(999)));
        assert_eq!(l.quantile(1.0), Some(Duration::from_micros(1000)));
    }
}

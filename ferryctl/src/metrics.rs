//! Reading a sidecar's Prometheus metrics (`GET /metrics` on the admin port).
//!
//! `dev` and `bench` only need sums of a few counters, and the sidecar's exact metric names
//! may grow, so this parses the text format generically and matches names by substring
//! (`delivered`, `fsync`), rather than binding to one spelling.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::http::{self, HttpError};

/// One sample line: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(
            key.trim_matches(|c: char| c == ',' || c.is_whitespace())
                .to_owned(),
            value,
        );
        rest = &after[end..];
    }
    labels
}

/// Sum of every sample whose name satisfies `filter` (histogram buckets, sums and counts
/// excluded, and `_created` timestamps too).
pub fn sum(samples: &[Sample], filter: impl Fn(&str) -> bool) -> f64 {
    samples
        .iter()
        .filter(|s| {
            !["_bucket", "_sum", "_count", "_created"]
                .iter()
                .any(|x| s.name.ends_with(x))
        })
        .filter(|s| filter(&s.name))
        .map(|s| s.value)
        .sum()
}

/// Sum of the counters whose name contains `word` and ends in `_total`.
pub fn counter(samples: &[Sample], word: &str) -> f64 {
    sum(samples, |name| {
        name.ends_with("_total") && name.contains(word)
    })
}

/// Fetches and parses one sidecar's metrics.
pub async fn scrape(admin: SocketAddr) -> Result<Vec<Sample>, HttpError> {
    Ok(parse(&http::get(admin, "/metrics").await?.text()))
}

/// The counters `dev` shows, in order: what each word means is "messages that were ...".
pub const SUMMARY_WORDS: [&str; 9] = [
    "published",
    "stored",
    "publish_errors",
    "forwarded",
    "delivered",
    "acked",
    "redelivered",
    "dead_letter",
    "dropped",
];

/// The [`SUMMARY_WORDS`] counters of one sidecar.
pub fn summary(samples: &[Sample]) -> BTreeMap<&'static str, f64> {
    SUMMARY_WORDS
        .iter()
        .map(|w| (*w, counter(samples, w)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP ferry_delivered_total Deliveries.
# TYPE ferry_delivered_total counter
ferry_delivered_total{topic="default/orders",subscription="default/billing-orders"} 5
ferry_delivered_total{topic="default/x",subscription="a \"b\""} 2
ferry_published_total 7 1700000000
ferry_latency_seconds_bucket{le="0.1"} 3
ferry_fsyncs_total 11
garbage line
"#;

    #[test]
    fn parses_and_sums() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[1].labels["subscription"], "a \"b\"");
        assert_eq!(counter(&samples, "delivered"), 7.0);
        assert_eq!(counter(&samples, "published"), 7.0);
        assert_eq!(counter(&samples, "fsync"), 11.0);
        assert_eq!(sum(&samples, |n| n.contains("latency")), 0.0);
        assert_eq!(summary(&samples)["acked"], 0.0);
    }
}

//! The JSON-lines history that the end-to-end test app (`ferry-e2e-app`) writes, one file
//! per app process, and that the tests read back.
//!
//! The app runs inside a pod's network namespace, where the sidecar's app API is on that
//! namespace's loopback, out of the test process's reach; so the app records what it saw
//! and the test replays the files into its history checker. Each line is written with one
//! `write` call as soon as it happens (a delivery before its ack), so a killed app loses
//! nothing it already reported.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line of an app's history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AppEvent {
    /// A consumer's subscribe was confirmed by its sidecar.
    Subscribed { subscription: String },
    /// A publish is about to be sent.
    Attempt {
        producer: String,
        topic: String,
        id: String,
        key: Option<String>,
    },
    /// The sidecar acked a publish.
    Acked { id: String },
    /// A publish failed (the message stays "attempted"); the app retries it.
    PublishFailed { id: String, error: String },
    /// A delivery arrived (recorded before it is settled).
    Delivered {
        group: String,
        member: String,
        id: String,
        attempt: u32,
        key_sequence: u64,
        headers: BTreeMap<String, String>,
    },
    /// The app acked a delivery.
    ConsumerAcked {
        group: String,
        member: String,
        id: String,
    },
    /// The publisher sent everything it was asked to.
    Done { acked: u64, failed: u64 },
}

/// One line of a history file: the event and when the app saw it.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    /// Nanoseconds since the Unix epoch when the app wrote the line.
    #[serde(default)]
    at_ns: u64,
    #[serde(flatten)]
    event: AppEvent,
}

/// Appends events to a history file, one line per `write`.
#[derive(Debug)]
pub struct EventWriter {
    file: std::fs::File,
}

impl EventWriter {
    /// Creates (or appends to) `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self { file })
    }

    /// Writes one event as one line, stamped with the wall clock.
    pub fn write(&mut self, event: &AppEvent) -> std::io::Result<()> {
        let at_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let line = Line {
            at_ns,
            event: event.clone(),
        };
        let mut line = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

/// Reads every complete line of a history file (a torn last line, from an app killed
/// mid-write, is ignored). A missing file reads as empty.
pub fn read_events(path: &Path) -> std::io::Result<Vec<AppEvent>> {
    Ok(read_lines(path)?.into_iter().map(|l| l.event).collect())
}

fn read_lines(path: &Path) -> std::io::Result<Vec<Line>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

/// Every event of every file in `paths`, as one history in the order the events happened.
///
/// The apps run in separate processes (one per pod), so a file holds one app's order only;
/// a key that moves from one member to another is in order only across files. Every line
/// carries the host's wall clock, which all the pods' namespaces share, and an app writes a
/// delivery before it acks it, so a delivery that caused the next one (its ack let the key
/// move) is stamped before it. Equal stamps keep the file order.
pub fn read_merged(paths: &[std::path::PathBuf]) -> std::io::Result<Vec<AppEvent>> {
    let mut all = Vec::new();
    for path in paths {
        all.extend(read_lines(path)?);
    }
    all.sort_by_key(|l| l.at_ns);
    Ok(all.into_iter().map(|l| l.event).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn delivered(member: &str, id: &str) -> AppEvent {
        AppEvent::Delivered {
            group: "g".into(),
            member: member.into(),
            id: id.into(),
            attempt: 1,
            key_sequence: 0,
            headers: BTreeMap::new(),
        }
    }

    /// A key that moves from one member to another: the first member's delivery happened
    /// before the second's, so the merged history must say so, whatever the file order.
    #[test]
    fn merged_history_keeps_the_order_across_apps() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let mut wa = EventWriter::open(&a).unwrap();
        let mut wb = EventWriter::open(&b).unwrap();
        wb.write(&delivered("b", "m1")).unwrap();
        wa.write(&delivered("a", "m2")).unwrap();
        wb.write(&delivered("b", "m3")).unwrap();
        let merged = read_merged(&[a, b]).unwrap();
        assert_eq!(
            merged,
            vec![
                delivered("b", "m1"),
                delivered("a", "m2"),
                delivered("b", "m3")
            ]
        );
    }
}

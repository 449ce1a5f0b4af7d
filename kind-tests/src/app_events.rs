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

    /// Writes one event as one line.
    pub fn write(&mut self, event: &AppEvent) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

/// Reads every complete line of a history file (a torn last line, from an app killed
/// mid-write, is ignored). A missing file reads as empty.
pub fn read_events(path: &Path) -> std::io::Result<Vec<AppEvent>> {
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

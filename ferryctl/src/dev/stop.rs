//! What stops `ferryctl dev`: SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, systemd, a
//! container runtime) and SIGHUP (the terminal closed). Each one drains and stops every
//! sidecar; left to their default action, SIGTERM and SIGHUP ended `dev` at once and left
//! its sidecars running, holding the loopback ports the next `dev` needs.
//!
//! After the first signal, output goes through [`say`]: once the terminal is gone a
//! `println!` would panic on the failed write, and the sidecars would be killed instead of
//! drained.

use std::io::Write;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The signals `dev` stops on, watched from before the first sidecar starts: one that
/// arrives while the mesh starts is kept and acted on once it is up.
#[derive(Debug)]
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl StopSignals {
    /// Installs the handlers; from here on these signals no longer end the process.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next of them and returns its name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// Prints a line, ignoring a stdout that is gone (closed terminal or pipe).
pub fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

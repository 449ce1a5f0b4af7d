//! docs/reliability.md row 14: one sidecar's wall clock is 10 minutes behind, then jumps 20
//! minutes forward, then 20 minutes back, while it holds messages with TTLs and delays and
//! remembers ids for deduplication. The producer's sidecar runs under Debian's libfaketime
//! (`LD_PRELOAD`, the clock offset read from a file the test rewrites); the monotonic clock
//! stays real (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as a real kernel's never jumps.
//!
//! Pass: no premature TTL expiry (nothing expired, nothing dead-lettered, lost = 0), no
//! early release of delayed messages, no mass redelivery (duplicated = 0), and dedup still
//! suppresses an id inside its window across both jumps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ferry_sidecar_tests::harness::{TestMesh, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use ferryctl::client::App;
use tokio::time::Instant;

use super::common::{drain, group, pod, subscription, topic};
use super::durable_app::{publish_with, reconnecting_consumer};

/// Topics published to, one per look at the sidecar's clock.
const PROBES: usize = 24;

/// Where Debian's `libfaketime` package puts the thread-safe library.
fn libfaketime() -> anyhow::Result<PathBuf> {
    let arch = std::env::consts::ARCH;
    let path = PathBuf::from(format!(
        "/usr/lib/{arch}-linux-gnu/faketime/libfaketimeMT.so.1"
    ));
    if !path.is_file() {
        bail!(
            "{} is missing: install the Debian package faketime (kind-tests/control-plane.sh install does)",
            path.display()
        );
    }
    Ok(path)
}

/// Seconds since the epoch of a log line's leading RFC 3339 timestamp (ANSI colours
/// stripped), e.g. `2026-11-24T01:20:53.293004Z  INFO ...`.
fn line_time(line: &str) -> Option<i64> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let t = plain.trim_start().get(..19)?;
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn real_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// Sets the faked clock's offset and waits until the sidecar's log shows it: publishing to
/// a topic not used before makes the sidecar log "opened topic log" with its wall time.
async fn set_offset(
    mesh: &TestMesh,
    app: &mut App,
    history: &History,
    file: &Path,
    offset_s: i64,
    probe: &mut usize,
) -> anyhow::Result<()> {
    std::fs::write(file, format!("{offset_s:+}\n"))?;
    loop {
        *probe += 1;
        if *probe > PROBES {
            bail!("the sidecar's clock never showed an offset of {offset_s} s");
        }
        let topic = format!("default/probe-{probe}");
        publish_with(app, history, &topic, &format!("probe-{probe}"), |_| {}).await?;
        let lines = mesh.mesh.process("producer")?.output.lines();
        let seen = lines
            .iter()
            .rev()
            .find(|l| l.contains("opened topic log") && l.contains(&topic))
            .and_then(|l| line_time(l));
        if let Some(t) = seen {
            let skew = t - real_now();
            println!("clock_skew: sidecar clock offset {skew:+} s (asked {offset_s:+} s)");
            if (skew - offset_s).abs() <= 60 {
                return Ok(());
            }
        }
        // libfaketime re-reads the offset file once a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_skew_one_sidecar() -> anyhow::Result<()> {
    let lib = libfaketime()?;
    let mut crs = [
        topic("events", "durability: Disk, dedupWindow: 2m"),
        topic("events-dlq", "durability: Disk"),
        group("sink", "sink", ""),
        subscription(
            "sink-events",
            "events",
            "sink",
            "deadLetterTopic: events-dlq, ackWait: 3s, backoff: {initial: 100ms, max: 1s, multiplier: 2}",
        ),
    ]
    .concat();
    for k in 1..=PROBES {
        crs.push_str(&topic(&format!("probe-{k}"), "durability: Disk"));
    }
    let pods = [
        pod("sink-a", "zone-a", "sink"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mut mesh = TestMesh::start(&crs, &pods).await?;
    let clock_file = mesh.dir.path().join("faketime-offset");
    std::fs::write(&clock_file, "-600\n")?;
    let env: Vec<(String, String)> = [
        ("LD_PRELOAD", lib.to_string_lossy().into_owned()),
        (
            "FAKETIME_TIMESTAMP_FILE",
            clock_file.to_string_lossy().into_owned(),
        ),
        ("FAKETIME_CACHE_DURATION", "1".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    mesh.mesh
        .restart_with_env("producer", &env)
        .await
        .context("starting the producer under faketime")?;
    let history = History::default();
    let mut app = mesh.app("producer").await?;
    let mut probe = 0;
    set_offset(&mesh, &mut app, &history, &clock_file, -600, &mut probe).await?;

    let events = "default/events";
    // TTL 90 s: far less than the 20-minute jump, far more than this test needs.
    for i in 0..30 {
        publish_with(&mut app, &history, events, &format!("ttl-{i}"), |r| {
            r.ttl_ms = 90_000;
        })
        .await?;
    }
    let delay = Duration::from_secs(6);
    let delayed_from = Instant::now();
    for i in 0..10 {
        publish_with(&mut app, &history, events, &format!("delayed-{i}"), |r| {
            r.delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            r.ttl_ms = 90_000;
        })
        .await?;
    }
    let first = publish_with(&mut app, &history, events, "dup-0", |_| {}).await?;

    // 20 minutes forward while everything above waits: nobody consumes yet.
    set_offset(&mesh, &mut app, &history, &clock_file, 600, &mut probe).await?;
    let again = publish_with(&mut app, &history, events, "dup-0", |_| {}).await?;
    assert!(
        again.duplicate && again.offset == first.offset,
        "after +20 min: {again:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let consumer = reconnecting_consumer(
        mesh.app_addr("sink-a")?,
        "default/sink-events",
        "sink",
        "sink-a",
        history.clone(),
        stop.clone(),
    );
    let delayed_seen = {
        let history = history.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if history
                    .deliveries()
                    .iter()
                    .any(|d| d.message_id.starts_with("delayed-"))
                {
                    return Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        })
    };
    let expect = [Expect::AnyMember {
        group: "sink".into(),
        topic: events.into(),
        check_order: false,
    }];
    drain(
        &history,
        &expect,
        Duration::from_secs(60),
        "clock_skew after +20 min",
    )
    .await?;
    let first_delayed = delayed_seen
        .await?
        .context("no delayed message delivered")?;
    assert!(
        first_delayed.duration_since(delayed_from) >= delay,
        "a delayed message came {:?} after its publish, before its {delay:?} delay",
        first_delayed.duration_since(delayed_from)
    );

    // 20 minutes back: ids stay remembered, new messages flow, nothing is redelivered.
    set_offset(&mesh, &mut app, &history, &clock_file, -600, &mut probe).await?;
    let third = publish_with(&mut app, &history, events, "dup-0", |_| {}).await?;
    assert!(
        third.duplicate && third.offset == first.offset,
        "after -20 min: {third:?}"
    );
    for i in 0..20 {
        publish_with(&mut app, &history, events, &format!("after-{i}"), |_| {}).await?;
    }
    let c = drain(&history, &expect, Duration::from_secs(60), "clock_skew").await?;
    // Every message settled at the producer: any ack timeout the jumps had broken would
    // have shown up as a redelivery by then.
    let admin = mesh.mesh.endpoints("producer")?.admin;
    let settled = wait_for(
        Duration::from_secs(30),
        "the producer settled everything",
        || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(ferryctl::metrics::scrape(admin))
            })
            .is_ok_and(|s| {
                s.iter()
                    .filter(|x| x.name.contains("backlog_bytes"))
                    .filter(|x| x.labels.get("topic").is_some_and(|t| t == events))
                    .all(|x| x.value == 0.0)
            })
        },
    )
    .await;
    let samples = ferryctl::metrics::scrape(admin).await?;
    let expired = ferryctl::metrics::counter(&samples, "expired");
    let dead = ferryctl::metrics::counter(&samples, "dead_letter");
    println!("clock_skew: producer metrics expired={expired} dead_lettered={dead}");
    let after = history.check(&expect);
    println!("clock_skew: final history {after}");
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.await;
    settled?;
    assert_eq!((c.lost, c.unexpected), (0, 0), "{c}");
    assert_eq!(
        (after.lost, after.duplicated, after.unexpected),
        (0, 0, 0),
        "no premature expiry, no redelivery: {after}"
    );
    assert_eq!((expired, dead), (0.0, 0.0), "nothing expired early");
    Ok(())
}

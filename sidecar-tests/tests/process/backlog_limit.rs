//! Backlog limits on real processes (`retention.maxBytes`, the README's "backlog limits"):
//! a `Disk` topic limited to 64 KiB, and no app consuming, so every stored message is
//! unsettled. Publishes past the limit are refused with RESOURCE_EXHAUSTED and a message
//! naming `retention.maxBytes`, are never acked and never stored (none is delivered later);
//! once a consumer drains the backlog, publishing works again; nothing acked is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_sidecar_tests::harness::publish;
use ferry_sidecar_tests::history::History;
use tonic::Code;

use super::common::{billing_consumer, drain_orders, orders_mesh, wait_settled};

const LIMIT: u64 = 64 * 1024;
const PAYLOAD: usize = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_past_max_bytes_is_refused_and_nothing_lost() -> anyhow::Result<()> {
    let mesh = orders_mesh("durability: Disk, retention: {maxBytes: 64Ki}", "").await?;
    let history = History::default();
    let mut app = mesh.app("producer").await?;

    // Publish until refused, then a few more: all of those refused too.
    let mut acked = 0u64;
    let mut refused = BTreeSet::new();
    let mut first_refusal = None;
    for i in 0..200 {
        let id = format!("backlog-{i}");
        match publish(
            &mut app,
            &history,
            "producer",
            "default/orders",
            &id,
            None,
            vec![b'x'; PAYLOAD],
        )
        .await
        {
            Ok(()) if refused.is_empty() => acked += 1,
            Ok(()) => anyhow::bail!("{id} acked after an earlier refusal, with no consumer"),
            Err(status) => {
                first_refusal.get_or_insert(status);
                refused.insert(id);
                if refused.len() >= 10 {
                    break;
                }
            }
        }
    }
    let status = first_refusal.ok_or_else(|| anyhow::anyhow!("200 KiB acked past 64 KiB"))?;
    println!(
        "backlog_limit: {acked} acked, {} refused: {:?} {:?}",
        refused.len(),
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("retention.maxBytes"),
        "the status does not name the limit: {status:?}"
    );
    // The limit is what was configured: the payloads alone fill most of it.
    assert!(acked * PAYLOAD as u64 <= LIMIT, "{acked} acked");
    assert!(
        acked * PAYLOAD as u64 >= LIMIT / 2,
        "refused early: {acked} acked"
    );

    // A consumer drains the backlog; publishing resumes.
    let consumer = billing_consumer(&mesh, &history).await?;
    wait_settled(&mesh, "producer", "default/orders", Duration::from_secs(60)).await?;
    publish(
        &mut app,
        &history,
        "producer",
        "default/orders",
        "after-drain",
        None,
        vec![b'y'; PAYLOAD],
    )
    .await?;
    let c = drain_orders(&history, Duration::from_secs(60), "backlog_limit").await?;
    wait_settled(&mesh, "producer", "default/orders", Duration::from_secs(30)).await?;
    let stored_refused: Vec<String> = history
        .deliveries()
        .into_iter()
        .map(|d| d.message_id)
        .filter(|id| refused.contains(id))
        .collect();
    println!(
        "backlog_limit: history {c} refused={} (delivered anyway: {})",
        refused.len(),
        stored_refused.len()
    );
    assert_eq!((c.lost, c.unexpected, c.duplicated), (0, 0, 0), "{c}");
    assert!(
        stored_refused.is_empty(),
        "refused publishes were stored: {stored_refused:?}"
    );
    consumer.abort();
    Ok(())
}

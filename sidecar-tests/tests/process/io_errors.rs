//! docs/reliability.md row 10: `fsync` of the log fails (EIO, injected through the sidecar's
//! `log::fsync` failpoint, built with the `failpoints` feature). The failpoint's argument
//! limits it to the topic's segment files, so the rest of the sidecar keeps working.
//!
//! No publish is acked while its fsync fails: each gets an error naming the fsync, and the
//! log refuses further appends (it is poisoned: no fsync is retried on the same dirty
//! pages) until the sidecar restarts; the process never panics. After a restart without
//! the fault, publishing works again and every acked message is delivered: lost = 0.

use ferry_sidecar_tests::history::History;

use super::common::{ledger_mesh, read_back_ledger};
use super::durable_app::publish_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsync_errors_are_never_acked_and_poison_until_restart() -> anyhow::Result<()> {
    let mut mesh = ledger_mesh().await?;
    let history = History::default();
    let ledger = "default/ledger";
    let mut app = mesh.app("producer").await?;
    for i in 0..20 {
        publish_with(&mut app, &history, ledger, &format!("before-{i}"), |_| {}).await?;
    }

    // Every fsync of the ledger's segment files fails from now on.
    let fault = vec![(
        "FAILPOINTS".to_owned(),
        "log::fsync=return(ledger/0000)".to_owned(),
    )];
    mesh.mesh.restart_with_env("producer", &fault).await?;
    let pid = mesh.mesh.process("producer")?.pid;
    let mut app = mesh.app("producer").await?;
    let mut errors = Vec::new();
    for i in 0..10 {
        let r = publish_with(&mut app, &history, ledger, &format!("failing-{i}"), |_| {}).await;
        match r {
            Ok(ok) => anyhow::bail!("publish {i} was acked while fsync fails: {ok:?}"),
            Err(status) => errors.push(status),
        }
    }
    println!("io_errors: first refusal: {:?}", errors[0]);
    anyhow::ensure!(
        errors[0].message().contains("fsync") && errors[0].message().contains("failpoint"),
        "the first refusal names the failed fsync: {:?}",
        errors[0]
    );
    anyhow::ensure!(
        errors.iter().all(|e| e.code() == tonic::Code::Internal),
        "an fsync failure is INTERNAL: {errors:?}"
    );
    anyhow::ensure!(
        mesh.mesh.process("producer")?.pid == pid && mesh.mesh.reap_exited().is_empty(),
        "the sidecar kept running"
    );

    // Restarted without the fault: recovery, then publishing works again.
    mesh.mesh.restart("producer").await?;
    let mut app = mesh.app("producer").await?;
    for i in 0..20 {
        publish_with(&mut app, &history, ledger, &format!("after-{i}"), |_| {}).await?;
    }
    let counts = read_back_ledger(&mesh, &history, "io_errors").await?;
    anyhow::ensure!(counts.acked == 40, "40 publishes acked: {counts}");
    anyhow::ensure!(
        (counts.lost, counts.unexpected) == (0, 0),
        "lost or unexpected messages: {counts}"
    );
    // The restarts redeliver what was unsettled, each as an attempt > 1 (explained).
    anyhow::ensure!(
        counts.unexplained_duplicates == 0,
        "duplicates no redelivery explains: {counts}"
    );
    mesh.mesh.shutdown().await;
    Ok(())
}

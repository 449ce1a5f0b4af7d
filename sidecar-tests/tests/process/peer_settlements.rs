//! docs/reliability.md row 25: a settlement counts only from the sidecar entitled to give
//! it. Here the replica path: a `Replicated` topic's copies sit on a replica until their
//! producer trims them (`settled_ids`, and `settled_by` per subscription). A sidecar of the
//! same namespace and mesh CA, a member of the consuming group (so it may hold the topic),
//! forges trims of every copy in the producer's name. The replica holding them must refuse
//! them (PERMISSION_DENIED, counted; one holding nothing has nothing to trim); then the producer's node is lost, a replica takes
//! custody, and every acked message is delivered (lost = 0).

use std::time::Duration;

use ferry_api::proto::v1::peer_client::PeerClient;
use ferry_api::proto::v1::{ReplicateRequest, SubscriptionSettled};
use ferry_sidecar_tests::harness::{Behavior, TestMesh, publish, spawn_consumer, wait_for};
use ferry_sidecar_tests::history::{Expect, History};
use ferryctl::metrics::{counter, scrape};
use tokio::time::Instant;
use tonic::Code;

use super::common::{RUN_LIMIT, drain, group, subscription, topic};
use super::peer_authz::as_identity;

const TOPIC: &str = "default/orders";
const REPLICAS: [&str; 2] = ["billing-a", "billing-b"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_trims_drop_no_replica_copy() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Replicated, replicas: 2"),
        group("billing", "billing", ""),
        subscription("billing-orders", "orders", "billing", "maxInFlight: 10"),
    ]
    .concat();
    // The producer is in no group: only the takeover timeout tells the replica it is gone.
    let pods = "- {name: producer, zone: zone-a, serviceAccount: producer-sa}\n\
                - {name: billing-a, zone: zone-a, labels: {app: billing}}\n\
                - {name: billing-b, zone: zone-b, labels: {app: billing}}\n";
    let env = [("FERRY_REPLICA_TAKEOVER_AFTER", "3s")];
    let mut mesh = TestMesh::start_with_env(&crs, pods, &env).await?;
    let history = History::default();
    let mut app = mesh.app("producer").await?;
    let ids: Vec<String> = (0..60).map(|i| format!("trimmed-{i}")).collect();
    for id in &ids {
        publish(
            &mut app,
            &history,
            "producer",
            TOPIC,
            id,
            None,
            vec![b'r'; 256],
        )
        .await
        .map_err(|s| anyhow::anyhow!("publish {id}: {s}"))?;
    }
    drop(app);

    // The billing members' identity (default/default) forges the producer's trims: half
    // as settled by every subscription, half as settled by the one subscription.
    let (whole, per_sub) = ids.split_at(ids.len() / 2);
    let mut forged = 0;
    let mut refused = 0;
    let mut idle = 0;
    let mut denied_before = 0.0;
    for replica in REPLICAS {
        let ends = mesh.mesh.endpoints(replica)?;
        denied_before += counter(&scrape(ends.admin).await?, "peer_denied");
        let channel = as_identity(&mesh, &ends.peer.to_string(), "default", "default")?;
        let answer = PeerClient::new(channel)
            .replicate(ReplicateRequest {
                producer: "default/producer".into(),
                producer_address: mesh.mesh.endpoints("producer")?.peer.to_string(),
                topic: TOPIC.into(),
                incarnation: 1,
                copies: Vec::new(),
                settled_ids: whole.to_vec(),
                settled_by: vec![SubscriptionSettled {
                    subscription: "default/billing-orders".into(),
                    ids: per_sub.to_vec(),
                }],
            })
            .await;
        forged += 1;
        match answer {
            Err(s) if s.code() == Code::PermissionDenied => {
                refused += 1;
                println!(
                    "peer_settlements: forged trims on {replica} -> {:?}: {}",
                    s.code(),
                    s.message()
                );
            }
            // A replica that holds nothing for the producer has nothing to trim.
            Ok(r) if r.get_ref().held == 0 => {
                idle += 1;
                println!("peer_settlements: forged trims on {replica} -> it holds nothing");
            }
            other => println!("peer_settlements: forged trims on {replica} -> accepted: {other:?}"),
        }
    }
    let denied_after = {
        let mut n = 0.0;
        for replica in REPLICAS {
            n += counter(
                &scrape(mesh.mesh.endpoints(replica)?.admin).await?,
                "peer_denied",
            );
        }
        n
    };

    // The producer's node is lost; a replica takes custody of what it holds.
    let data = mesh.mesh.spec("producer")?.data_dir.clone();
    mesh.mesh.kill9("producer").await?;
    std::fs::remove_dir_all(&data)?;
    for member in REPLICAS {
        spawn_consumer(
            &mesh.app_addr(member)?,
            "default/billing-orders",
            "billing",
            member,
            &history,
            Behavior::Ack,
            Instant::now() + RUN_LIMIT,
        )
        .await?;
    }
    wait_for(Duration::from_secs(60), "a replica took custody", || {
        REPLICAS.iter().any(|p| {
            mesh.log_lines(p, "--replica-takeover-after")
                .is_ok_and(|l| !l.is_empty())
        })
    })
    .await?;
    let expect = [Expect::AnyMember {
        group: "billing".into(),
        topic: TOPIC.into(),
        check_order: false,
    }];
    let counts = drain(
        &history,
        &expect,
        Duration::from_secs(30),
        "peer_settlements",
    )
    .await
    .unwrap_or_else(|_| history.check(&expect));
    println!(
        "peer_settlements: forged calls {forged}, refused {refused}, on a replica holding \
         nothing {idle}, refusals counted {}, messages lost {} ({counts})",
        denied_after - denied_before,
        counts.lost
    );
    assert_eq!(refused + idle, forged, "a forged trim was accepted");
    assert!(refused >= 1, "no replica holding copies was asked");
    assert!(
        denied_after - denied_before >= f64::from(refused),
        "refusals not counted"
    );
    assert_eq!((counts.lost, counts.unexpected), (0, 0), "{counts}");
    Ok(())
}

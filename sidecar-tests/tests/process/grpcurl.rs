//! `grpcurl -plaintext` lists and calls the app API through gRPC server reflection, as a
//! user without the protobuf files would.

use ferry_sidecar_tests::harness::TestMesh;
use tokio::process::Command;

use super::common::{group, pod, subscription, topic};

async fn grpcurl(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let bin = ferry_kind_tests::tools::grpcurl().await?;
    let out = Command::new(&bin).args(args).output().await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ grpcurl {}\n{text}", args.join(" "));
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_calls_the_app_api_through_reflection() -> anyhow::Result<()> {
    let crs = [
        topic("orders", "durability: Disk"),
        group("billing", "billing", ""),
        subscription("billing-orders", "orders", "billing", ""),
    ]
    .concat();
    let pods = [
        pod("billing-a", "zone-a", "billing"),
        pod("producer", "zone-a", ""),
    ]
    .concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let addr = mesh.app_addr("producer")?;

    let (ok, services) = grpcurl(&["-plaintext", &addr, "list"]).await?;
    assert!(ok, "grpcurl list failed: {services}");
    assert!(services.lines().any(|l| l == "ferry.v1.App"), "{services}");
    // The peer service is not served on the app port, so it is not advertised there.
    assert!(!services.contains("ferry.v1.Peer"), "{services}");

    let (ok, methods) = grpcurl(&["-plaintext", &addr, "describe", "ferry.v1.App"]).await?;
    assert!(ok, "grpcurl describe failed: {methods}");
    for method in ["Publish", "PublishStream", "Consume", "Ack", "Nack"] {
        assert!(
            methods.contains(&format!("rpc {method}")),
            "no {method} in {methods}"
        );
    }

    // A call through reflection: the payload is base64 in protobuf JSON ("hello").
    let body = r#"{"topic":"orders","messageId":"grpcurl-1","payload":"aGVsbG8="}"#;
    let (ok, reply) = grpcurl(&["-plaintext", "-d", body, &addr, "ferry.v1.App/Publish"]).await?;
    assert!(ok, "grpcurl Publish failed: {reply}");
    assert!(
        reply.contains("grpcurl-1"),
        "the reply does not name the message: {reply}"
    );

    // A bad call gets the precise status, through reflection too.
    let body = r#"{"topic":"nope","payload":"aGVsbG8="}"#;
    let (ok, reply) = grpcurl(&["-plaintext", "-d", body, &addr, "ferry.v1.App/Publish"]).await?;
    assert!(!ok, "publishing to an unknown topic succeeded: {reply}");
    assert!(reply.contains("NotFound"), "expected NotFound: {reply}");
    Ok(())
}

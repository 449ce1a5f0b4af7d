//! docs/reliability.md row 23: each bad input on the app ports gets a precise status, and
//! garbage or huge headers on any port (app, peer, admin) do not crash a sidecar (same PID,
//! still answers).

use std::time::Duration;

use bytes::Bytes;
use ferry_api::proto::v1::{AckRequest, PublishRequest};
use ferry_sidecar_tests::harness::{TestMesh, seeded_rng};
use ferryctl::http;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use super::common::{group, pod, subscription, topic};

fn request(topic: &str, payload: usize) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        payload: vec![b'x'; payload].into(),
        ..PublishRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_app_ports_gets_precise_errors() -> anyhow::Result<()> {
    let mut rng = seeded_rng("bad_input_on_app_ports_gets_precise_errors");
    let crs = [
        topic("small", "durability: Disk, maxMessageBytes: 1024"),
        group("g", "g", ""),
        subscription("g-small", "small", "g", ""),
    ]
    .concat();
    let pods = [pod("g-a", "zone-a", "g"), pod("producer", "zone-a", "")].concat();
    let mesh = TestMesh::start(&crs, &pods).await?;
    let endpoints = mesh.mesh.endpoints("producer")?;
    let pid = mesh.mesh.process("producer")?.pid;
    let mut app = mesh.app("producer").await?;

    // gRPC.
    let too_big = app
        .publish(request("default/small", 2048))
        .await
        .expect_err("payload > maxMessageBytes");
    println!(
        "bad_input: oversized payload -> {:?}: {}",
        too_big.code(),
        too_big.message()
    );
    assert_eq!(too_big.code(), Code::InvalidArgument);
    let unknown = app
        .publish(request("default/nope", 10))
        .await
        .expect_err("unknown topic");
    println!(
        "bad_input: unknown topic -> {:?}: {}",
        unknown.code(),
        unknown.message()
    );
    assert_eq!(unknown.code(), Code::NotFound);
    let ack = app
        .ack(AckRequest {
            delivery_id: "no-such-delivery".into(),
        })
        .await
        .expect_err("unknown delivery id");
    println!(
        "bad_input: unknown delivery id -> {:?}: {}",
        ack.code(),
        ack.message()
    );
    assert_eq!(ack.code(), Code::NotFound);
    app.publish(request("default/small", 1024)).await?;

    // HTTP/JSON.
    let publish_path = "/v1/topics/default/small/publish";
    let malformed = http::post_json(endpoints.app_http, publish_path, "{\"payload\": ").await?;
    println!(
        "bad_input: malformed JSON -> {} {}",
        malformed.status,
        malformed.text()
    );
    assert_eq!(malformed.status, 400);
    let huge = Bytes::from(vec![b' '; 16 * 1024 * 1024]);
    match http::post_json(endpoints.app_http, publish_path, huge).await {
        Ok(r) => {
            println!("bad_input: 16 MiB body -> {}", r.status);
            assert_eq!(r.status, 413);
        }
        // A server may answer 413 and close before reading the whole body; the client then
        // sees a reset instead of the status. That still refuses the body.
        Err(e) => println!("bad_input: 16 MiB body -> connection closed early ({e})"),
    }
    let ack = http::post_json(
        endpoints.app_http,
        "/v1/deliveries/no-such-delivery/ack",
        "{}",
    )
    .await?;
    println!("bad_input: HTTP ack of unknown delivery -> {}", ack.status);
    assert_eq!(ack.status, 404);

    // Random bytes on every port of both sidecars (app gRPC and HTTP, peer, admin): the
    // connection is answered with an error or closed, nothing crashes.
    let consumer = mesh.mesh.endpoints("g-a")?;
    let consumer_pid = mesh.mesh.process("g-a")?.pid;
    let ports = [
        ("app gRPC", endpoints.app_grpc),
        ("app HTTP", endpoints.app_http),
        ("peer", endpoints.peer),
        ("admin", endpoints.admin),
        ("consumer peer", consumer.peer),
        ("consumer admin", consumer.admin),
    ];
    for (name, addr) in ports {
        let mut answers = Vec::new();
        for _ in 0..5 {
            let mut garbage = vec![0u8; 4096];
            rng.fill_bytes(&mut garbage);
            answers.push(send_and_read(addr, &garbage).await?);
        }
        println!("bad_input: random bytes on the {name} port -> {answers:?}");
        assert!(
            !answers.iter().any(|a| a == "silent"),
            "{name}: garbage left a connection open without an answer"
        );
    }
    // Huge headers on the HTTP ports: 431, or the connection closed.
    for (name, addr) in [("app HTTP", endpoints.app_http), ("admin", endpoints.admin)] {
        let mut request = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        request.extend(b"\r\n\r\n");
        let answer = send_and_read(addr, &request).await?;
        println!("bad_input: 1 MiB header on the {name} port -> {answer}");
        assert!(
            answer.starts_with("HTTP/1.1 431") || answer.starts_with("closed"),
            "{name}: {answer}"
        );
    }
    assert_eq!(mesh.mesh.process("producer")?.pid, pid);
    assert_eq!(mesh.mesh.process("g-a")?.pid, consumer_pid);
    let status = http::get(consumer.admin, "/healthz").await?;
    assert_eq!(status.status, 200, "the consumer is still healthy");
    let status = http::get(endpoints.admin, "/healthz").await?;
    assert_eq!(status.status, 200, "still healthy");
    let again = app
        .publish(request("default/small", 10))
        .await?
        .into_inner();
    println!(
        "bad_input: after garbage, publish still works (offset {})",
        again.offset
    );
    Ok(())
}

/// Writes `bytes` to `addr` and says how the server answered: its status line, `closed`,
/// or `silent` when it neither answered nor closed within a few seconds.
async fn send_and_read(addr: std::net::SocketAddr, bytes: &[u8]) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    // The server may close before taking everything; that is an answer too.
    let _ = stream.write_all(bytes).await;
    let mut buf = vec![0u8; 4096];
    Ok(
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => "closed".to_owned(),
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.starts_with("HTTP/") {
                    text.lines().next().unwrap_or_default().to_owned()
                } else {
                    format!("{n} bytes of HTTP/2 (a GOAWAY)")
                }
            }
            Err(_) => "silent".to_owned(),
        },
    )
}

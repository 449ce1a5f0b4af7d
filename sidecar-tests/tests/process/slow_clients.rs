//! docs/reliability.md row 23, slowloris: a client that opens a connection and sends part
//! of its request headers (HTTP ports) or no TLS handshake (peer port), then nothing, is
//! disconnected by the sidecar instead of holding the connection for ever; the sidecar keeps
//! serving (same PID, still answers).

use std::net::SocketAddr;
use std::time::Duration;

use ferry_sidecar_tests::harness::TestMesh;
use ferryctl::http;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::{pod, topic};

/// Opens a connection, sends `partial`, and waits (up to `deadline`) for the server to
/// close it. Returns whether it did.
async fn closed_by_server(
    addr: SocketAddr,
    partial: &[u8],
    deadline: Duration,
) -> anyhow::Result<bool> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(partial).await?;
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(deadline, async {
        loop {
            match tcp.read(&mut buf).await {
                // End of stream or reset: the server let go.
                Ok(0) | Err(_) => return,
                // A 408 or an alert before closing is fine; keep reading to the end.
                Ok(_) => continue,
            }
        }
    })
    .await;
    Ok(closed.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_disconnected() -> anyhow::Result<()> {
    let mesh = TestMesh::start(&topic("t", "durability: Disk"), &pod("solo", "zone-a", "")).await?;
    let e = mesh.mesh.endpoints("solo")?;
    let pid = mesh.mesh.process("solo")?.pid;
    // Header and handshake timeouts are 10 s; allow for a loaded machine.
    let deadline = Duration::from_secs(30);
    let partial_request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    for (port, addr, partial) in [
        ("admin", e.admin, &partial_request[..]),
        ("app HTTP", e.app_http, &partial_request[..]),
        ("peer", e.peer, &[0x16, 0x03, 0x01][..]),
    ] {
        let closed = closed_by_server(addr, partial, deadline).await?;
        println!("slow_clients: {port}: disconnected = {closed}");
        assert!(
            closed,
            "{port}: a client that stopped mid-request still holds its connection after {deadline:?}"
        );
    }
    assert_eq!(mesh.mesh.process("solo")?.pid, pid);
    let page = http::get(e.admin, "/healthz").await?;
    assert_eq!(page.status, 200, "the sidecar still answers");
    Ok(())
}

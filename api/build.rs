//! Compiles the protobuf contracts in `proto/` with `protox` (a pure-Rust protobuf compiler,
//! so building needs no `protoc` on the machine) and generates the tonic clients and
//! servers. The file descriptor set is also written to `OUT_DIR/ferry_descriptor.bin` for
//! gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ferry/v1/app.proto",
        "proto/ferry/v1/peer.proto",
        "proto/ferry/v1/identity.proto",
        "proto/ferry/v1/routing.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("ferry_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Payloads as `bytes::Bytes`: cloned by reference count, never copied.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}

//! Compiles proto/ferry/v1/ferry.proto with protox (a protobuf compiler in Rust, so no
//! `protoc` needs installing) and generates the tonic client and server code.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("ferry/v1/ferry.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set also serves gRPC reflection.
    std::fs::write(out.join("ferry_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}

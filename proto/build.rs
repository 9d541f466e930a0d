//! Compiles every `.proto` under `gatesvr/` with protox (pure Rust: no protoc to install).

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    collect(Path::new("gatesvr"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=gatesvr");
    let fds = protox::compile(&files, ["."])?;
    tonic_prost_build::configure()
        .bytes(".gatesvr.client.v1.ServerPush.data")
        // Shared, not copied, when the data plane keeps it for a retry on
        // another instance (dataplane/src/upstream.rs).
        .bytes(".gatesvr.upstream.v1.ProcessRequestRequest.payload")
        // A push's payload is sliced out of the received frame, not copied
        // into a Vec of its own (a PushBatch carries up to 1,024 of them).
        .bytes(".gatesvr.upstream.v1.PushToClientRequest.data")
        .compile_fds(fds)?;
    Ok(())
}

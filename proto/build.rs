//! Generates the kiln.v1 code with protox, so a plain `cargo build` needs no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "kiln/v1/common.proto",
    "kiln/v1/farm.proto",
    "kiln/v1/worker_link.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("kiln_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

//! Compiles `proto/cxrclip.proto` with protox (a Rust protobuf compiler), so building needs no
//! `protoc` binary, then generates the prost messages and the tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/cxrclip.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}

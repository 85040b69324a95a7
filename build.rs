//! Compiles the etcd v3 API and kvd's peer API with a vendored protoc, so no
//! system protoc is needed, and derives the JSON mapping of the etcd API
//! (for the HTTP gateway) from the same definitions.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    tonic_prost_build::configure().file_descriptor_set_path(&descriptors).compile_protos(
        &[
            "proto/mvccpb/kv.proto",
            "proto/authpb/auth.proto",
            "proto/etcdserverpb/rpc.proto",
            "proto/kvdpb/peer.proto",
            "proto/v3lockpb/v3lock.proto",
            "proto/v3electionpb/v3election.proto",
        ],
        &["proto"],
    )?;
    // etcd's gateway speaks JSON with the proto field names, 64-bit
    // integers as strings, bytes as base64 and zero values left out.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        // Its JSON is written by hand (src/proto.rs): kvd's auth revision
        // stays out of it.
        .exclude([".etcdserverpb.ResponseHeader"])
        .build(&[".mvccpb", ".authpb", ".etcdserverpb", ".v3lockpb", ".v3electionpb"])?;
    println!("cargo:rerun-if-changed=proto");
    // .cargo/config.toml sets it; a RUSTFLAGS of one's own replaces that.
    if std::env::var_os("CARGO_CFG_TOKIO_UNSTABLE").is_none() {
        println!(
            "cargo:warning=built without `--cfg tokio_unstable` (see .cargo/config.toml): \
             the members' runtime keeps tokio's LIFO slot, and puts from many clients run slower"
        );
    }
    Ok(())
}

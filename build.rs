//! Compiles the etcd v3 API and kvd's peer API with a vendored protoc, so no
//! system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/mvccpb/kv.proto",
            "proto/etcdserverpb/rpc.proto",
            "proto/kvdpb/peer.proto",
            "proto/v3lockpb/v3lock.proto",
            "proto/v3electionpb/v3election.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

//! The etcd v3 gRPC services kvd serves on its client port, one file each.

pub mod cluster;
pub mod election;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod watch;

/// Bytes etcd allows on top of `--max-request-bytes` for gRPC framing; larger
/// messages are refused by the gRPC layer itself.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

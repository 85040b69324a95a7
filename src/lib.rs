//! kvd: a Raft-replicated key-value store that speaks the etcd v3 API.
//!
//! # Layout
//!
//! - [`mvcc`]: etcd's data model (revisions, versions, history, compaction,
//!   Range/Put/DeleteRange/Txn semantics) over sled. Pure logic, no async.
//! - [`raft`]: openraft wiring: the type config and commands, the log store
//!   (segment files of its own, one fdatasync per batch), the proposal batcher
//!   (concurrent writes share a log entry), the state machine that applies
//!   commands to the MVCC store, and the peer network over tonic.
//! - [`node`]: one member: proposes writes (forwarding to the leader when it
//!   is not the leader), serves linearizable reads through ReadIndex, and fills
//!   response headers.
//! - [`read_index`]: ReadIndex rounds that concurrent linearizable reads share.
//! - [`lease`]: lease deadlines, kept by the leader, and lease requests.
//! - [`concurrency`]: locks and elections on keys, leases and watches.
//! - [`grpc`]: the etcd v3 gRPC services, one file per service (KV, Watch,
//!   Lease, Cluster, Maintenance, and etcd's Lock and Election).
//! - [`server`]: starts a member on its listeners and stops it on a signal.
//! - [`idle_memory`]: gives freed heap back to the system after a burst.
//! - [`metrics`]: counters and latency histograms for `GET /metrics`.
//! - [`client`]: the Rust client that `kvctl` and the tests use.
//! - [`config`]: `kvd`'s flags, named as etcd's.

pub mod backup;
pub mod client;
pub mod config;
pub mod error;
pub mod grpc;
pub mod idle_memory;
pub mod lease;
pub mod metrics;
pub mod mvcc;
pub mod node;
pub mod proto;
pub mod raft;
pub mod read_index;
pub mod server;

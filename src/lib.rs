//! kvd: a Raft-replicated key-value store that speaks the etcd v3 API.
//!
//! # Layout
//!
//! Layers import downward only (`docs/architecture.md` has the picture):
//!
//! - [`grpc`]: the etcd v3 services on the client port, one file each, the
//!   peer service on the peer port, and [`grpc::status`], the one table from
//!   errors to gRPC codes.
//! - [`node`]: one member and its typed API: key-value, leases, locks and
//!   elections, and what it answers followers as leader.
//! - [`read_index`]: ReadIndex rounds that concurrent linearizable reads
//!   share. [`lease`]: lease deadlines, pure bookkeeping.
//! - [`raft`]: openraft wiring: the types, the leader round trip
//!   ([`raft::leader`]), the proposal batcher and forwarder, the peer network,
//!   the log store (segment files) and the state machine.
//! - [`mvcc`]: etcd's data model over sled. Pure logic, no async.
//!
//! Beside them: [`server`] starts a member on its listeners and stops it;
//! [`join`] decides whether a member on an empty data directory may take
//! part (one that lost its data may not come back under its old id);
//! [`tls`] sets up TLS on the client and peer ports; [`config`] holds `kvd`'s flags; [`metrics`] the counters and histograms
//! for `GET /metrics`;
//! [`backup`] is the file `snapshot save` writes; [`error`] the errors a
//! client can see; [`proto`] the generated protobuf code; [`client`] the Rust
//! client that `kvctl` and the tests use.

pub mod auth;
pub mod backup;
pub mod client;
pub mod config;
pub mod error;
pub mod grpc;
pub mod join;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod mvcc;
pub mod node;
pub mod proto;
pub mod raft;
pub mod read_index;
pub mod runtime;
pub mod server;
pub mod tls;

//! Generated protobuf and gRPC code: the etcd v3 API (`etcdserverpb`,
//! `mvccpb`, `v3lockpb`, `v3electionpb`) and kvd's peer API (`kvdpb`).

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod kvdpb {
    tonic::include_proto!("kvdpb");
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

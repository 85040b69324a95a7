//! The server side of the peer API: hands Raft RPCs to openraft, and serves
//! the proposals and read-index requests that followers forward.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, RaftError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::{decode, encode, NodeId};
use crate::node::{encode_answer, Node};
use crate::proto::kvdpb::peer_server::Peer;
use crate::proto::kvdpb::RaftPayload;

/// The peer gRPC service of one member.
pub struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    /// A service for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        PeerService { node }
    }
}

fn input<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    decode(&req.into_inner().data).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn output<T, E>(res: Result<T, RaftError<NodeId, E>>) -> Result<Response<RaftPayload>, Status>
where
    T: Serialize,
    E: Serialize + std::error::Error,
{
    let data = encode(&res).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        output(self.node.raft.append_entries(input(req)?).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        output(self.node.raft.vote(input(req)?).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let res: Result<_, RaftError<NodeId, InstallSnapshotError>> =
            self.node.raft.install_snapshot(input(req)?).await;
        output(res)
    }

    async fn forward(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let answer = self.node.serve_forward(req.into_inner().data).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn forward_batch(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let list: Vec<Vec<u8>> = input(req)?;
        let answers = futures::future::join_all(list.into_iter().map(|bytes| self.node.serve_forward(bytes))).await;
        let data = encode(&answers).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftPayload { data }))
    }

    async fn lease(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let answer = self.node.serve_lease(input(req)?).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn read_index(&self, _req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let answer = self.node.serve_read_index().await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }
}

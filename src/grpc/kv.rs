//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::mvcc::{ops, txn};
use crate::node::Node;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::proto::kvdpb::{command, command_result};
use crate::raft::state_machine::txn_reads_history;

/// The KV service of one member.
pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    /// A service for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        KvService { node }
    }
}

fn mismatch() -> Status {
    Error::internal("unexpected command result").into()
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        ops::check_range(&req)?;
        if !req.serializable {
            self.node.read_barrier().await?;
        }
        let mut resp = {
            // A past revision is read from history in sled.
            let state = self.node.state.read_for(req.revision > 0)?;
            ops::range(&state.store, state.store.revision(), &req)?
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        ops::check_put(&req)?;
        match self.node.propose(command::Op::Put(req)).await? {
            command_result::Result::Put(mut resp) => {
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(mismatch()),
        }
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = req.into_inner();
        ops::check_delete(&req)?;
        match self.node.propose(command::Op::DeleteRange(req)).await? {
            command_result::Result::DeleteRange(mut resp) => {
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(mismatch()),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = req.into_inner();
        txn::check_txn(&req, self.node.limits.max_txn_ops)?;
        let mut resp = if txn::is_read_only(&req) {
            // As etcd does, a Txn that writes nothing is served locally after
            // a read barrier instead of going through the log.
            if !txn::is_serializable(&req) {
                self.node.read_barrier().await?;
            }
            let state = self.node.state.read_for(txn_reads_history(&req))?;
            txn::read_only(&state.store, &req)?
        } else {
            match self.node.propose(command::Op::Txn(req)).await? {
                command_result::Result::Txn(resp) => resp,
                _ => return Err(mismatch()),
            }
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let req = req.into_inner();
        let (rev, physical) = (req.revision, req.physical);
        let mut resp = match self.node.propose(command::Op::Compact(req)).await? {
            command_result::Result::Compact(resp) => resp,
            _ => return Err(mismatch()),
        };
        if physical {
            // As etcd does, the answer waits until this member has removed
            // the compacted history, however long the client waits.
            tokio::select! {
                done = self.node.state.await_physical(rev) => done?,
                () = self.node.stopped() => return Err(Error::Stopped.into()),
            }
        }
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

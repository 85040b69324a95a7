//! The Lock service (etcd's v3lockpb): Lock waits its turn among the
//! candidates for a name (see [`crate::concurrency`]); Unlock deletes the key.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::concurrency::{candidate_key, candidates_prefix, Abandon};
use crate::node::Node;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::v3lockpb::lock_server::Lock;
use crate::proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};

/// The Lock service of one member.
pub struct LockService {
    node: Arc<Node>,
}

impl LockService {
    /// A service for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        LockService { node }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let req = req.into_inner();
        let key = candidate_key(&req.name, req.lease);
        let claim = self.node.claim(&key, b"", req.lease).await?;
        let guard = Abandon::new(self.node.clone(), &key, claim.kv.create_revision, claim.created);
        self.node.wait_turn(&candidates_prefix(&req.name), &key, claim.kv.create_revision).await?;
        guard.disarm();
        let mut header = Some(ResponseHeader { revision: claim.revision, ..Default::default() });
        self.node.fill_header(&mut header);
        Ok(Response::new(LockResponse { header, key }))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let rev = self.node.delete_key(&req.into_inner().key).await?;
        let mut header = Some(ResponseHeader { revision: rev, ..Default::default() });
        self.node.fill_header(&mut header);
        Ok(Response::new(UnlockResponse { header }))
    }
}

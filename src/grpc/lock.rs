//! The Lock service (etcd's v3lockpb): Lock waits its turn among the
//! candidates for a name (see [`crate::node::coordination`]); Unlock deletes the key.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::coordination::{candidate_key, candidates_prefix, Abandon};
use crate::node::Member;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::v3lockpb::lock_server::Lock;
use crate::proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};

/// The Lock service of one member.
pub struct LockService {
    member: Arc<Member>,
}

impl LockService {
    /// A service for `member`.
    pub fn new(member: Arc<Member>) -> Self {
        LockService { member }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let req = req.into_inner();
        let key = candidate_key(&req.name, req.lease);
        let claim = self.member.claim(&key, b"", req.lease).await?;
        let guard = Abandon::new(self.member.clone(), &key, claim.kv.create_revision, claim.created);
        self.member.wait_turn(&candidates_prefix(&req.name), &key, claim.kv.create_revision).await?;
        guard.disarm();
        let mut header = Some(ResponseHeader { revision: claim.revision, ..Default::default() });
        self.member.fill_header(&mut header);
        Ok(Response::new(LockResponse { header, key }))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let rev = self.member.delete_key(&req.into_inner().key).await?;
        let mut header = Some(ResponseHeader { revision: rev, ..Default::default() });
        self.member.fill_header(&mut header);
        Ok(Response::new(UnlockResponse { header }))
    }
}

//! The Cluster service: the member list, from Raft's membership and the
//! attributes members published.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::Member;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::{self as pb, MemberListRequest, MemberListResponse};

/// The Cluster service of one member.
pub struct ClusterService {
    member: Arc<Member>,
}

impl ClusterService {
    /// A service for `member`.
    pub fn new(member: Arc<Member>) -> Self {
        ClusterService { member }
    }
}

/// The members as etcd lists them: voters and learners, with the name and
/// client URLs each published (empty until it has).
pub fn members(member: &Member) -> Vec<pb::Member> {
    let metrics = member.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let state = member.state.read();
    membership
        .nodes()
        .map(|(id, n)| {
            let attrs = state.attrs.get(id);
            pb::Member {
                id: *id,
                name: attrs.map(|a| a.name.clone()).unwrap_or_default(),
                peer_ur_ls: vec![n.addr.clone()],
                client_ur_ls: attrs.map(|a| a.client_urls.clone()).unwrap_or_default(),
                is_learner: !voters.contains(id),
            }
        })
        .collect()
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.member.read_barrier().await?;
        }
        let mut resp = MemberListResponse { header: None, members: members(&self.member) };
        self.member.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

//! The Cluster service: the member list, from Raft's membership and the
//! attributes members published, and membership changes
//! (`crate::node::membership`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::membership::{MemberEntry, MembershipChange};
use crate::node::Member;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::{
    self as pb, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};

/// The Cluster service of one member.
pub struct ClusterService {
    member: Arc<Member>,
}

impl ClusterService {
    /// A response header as etcd's Cluster service fills it: ids and term,
    /// no revision.
    fn header(&self, header: &mut Option<crate::proto::etcdserverpb::ResponseHeader>) {
        self.member.fill_header(header);
        if let Some(h) = header.as_mut() {
            h.revision = 0;
        }
    }

    /// A service for `member`.
    pub fn new(member: Arc<Member>) -> Self {
        ClusterService { member }
    }
}

/// The members as etcd lists them: voters and learners, with the name and
/// client URLs each published (empty until it has).
pub fn members(member: &Member) -> Vec<pb::Member> {
    listed(member, &member.member_entries())
}

/// `entries` as etcd lists members, with the names and client URLs
/// `member` knows.
fn listed(member: &Member, entries: &[MemberEntry]) -> Vec<pb::Member> {
    let state = member.state.read();
    entries
        .iter()
        .map(|e| {
            let attrs = state.attrs.get(&e.id);
            pb::Member {
                id: e.id,
                name: attrs.map(|a| a.name.clone()).unwrap_or_default(),
                peer_ur_ls: vec![e.peer_url.clone()],
                client_ur_ls: attrs.map(|a| a.client_urls.clone()).unwrap_or_default(),
                is_learner: e.learner,
            }
        })
        .collect()
}

impl ClusterService {
    /// Makes `change` and lists the members after it; the member it named
    /// comes first.
    async fn change(&self, change: MembershipChange) -> Result<(pb::Member, Vec<pb::Member>), Status> {
        // Membership changes are root's, while auth is on.
        self.member.authorize_admin()?;
        let outcome = self.member.change_members(change).await?;
        let members = listed(&self.member, &outcome.members);
        let named = members.iter().find(|m| m.id == outcome.id).cloned().unwrap_or_default();
        Ok((named, members))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.member.read_barrier().await?;
        }
        let mut resp = MemberListResponse { header: None, members: members(&self.member) };
        self.header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        let req = req.into_inner();
        let change = MembershipChange::Add { peer_urls: req.peer_ur_ls, learner: req.is_learner };
        let (member, members) = self.change(change).await?;
        let mut resp = MemberAddResponse { header: None, member: Some(member), members };
        self.header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        let (_, members) = self.change(MembershipChange::Remove { id: req.into_inner().id }).await?;
        let mut resp = MemberRemoveResponse { header: None, members };
        self.header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = req.into_inner();
        let (_, members) = self.change(MembershipChange::Update { id: req.id, peer_urls: req.peer_ur_ls }).await?;
        let mut resp = MemberUpdateResponse { header: None, members };
        self.header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let (_, members) = self.change(MembershipChange::Promote { id: req.into_inner().id }).await?;
        let mut resp = MemberPromoteResponse { header: None, members };
        self.header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

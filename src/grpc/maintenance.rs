//! The Maintenance service: member status.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{StatusRequest, StatusResponse};

/// The etcd API version kvd implements, reported by Status.
pub const API_VERSION: &str = "3.4.0";

/// The Maintenance service of one member.
pub struct MaintenanceService {
    node: Arc<Node>,
}

impl MaintenanceService {
    /// A service for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        MaintenanceService { node }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow().clone();
        let db_size = self.node.state.size_on_disk() as i64;
        let membership = m.membership_config.membership();
        let is_learner = !membership.voter_ids().any(|id| id == self.node.id);
        let mut errors = Vec::new();
        if m.current_leader.is_none() {
            errors.push(crate::error::Error::NoLeader.to_string());
        }
        let mut resp = StatusResponse {
            header: None,
            version: API_VERSION.to_string(),
            db_size,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            errors,
            db_size_in_use: db_size,
            is_learner,
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

//! What a member answers, as leader, when a follower asks it on a client's
//! behalf: to propose a write, or for a read index. (Lease questions are in
//! [`super::lease`].)

use super::Member;
use crate::error::Error;
use crate::raft::leader::{Forwarded, Proposal};
use crate::raft::Response;

impl Member {
    /// Handles a proposal forwarded by a follower. Its size is checked again
    /// here: the peer port is no way around `--max-request-bytes`.
    pub async fn serve_forward(&self, proposal: Proposal) -> Forwarded<Response> {
        if proposal.command.len() > self.limits.max_request_bytes {
            return Forwarded::Failed(Error::RequestTooLarge);
        }
        self.proposals.propose(proposal).await
    }

    /// Handles a read-index request from a follower.
    pub async fn serve_read_index(&self) -> Forwarded<Option<u64>> {
        self.reads.on_leader().await
    }
}

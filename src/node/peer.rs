//! What a member answers, as leader, when a follower asks it on a client's
//! behalf: to propose a write, or for a read index. (Lease questions are in
//! [`super::lease`].) And what any member answers a member that starts on an
//! empty data directory and asks whether the cluster already knows it.

use serde::{Deserialize, Serialize};

use super::Member;
use crate::error::Error;
use crate::raft::leader::{Forwarded, Proposal};
use crate::raft::{NodeId, Response};

/// A starting member's question: what do you know of me?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// The cluster the caller means to be part of.
    pub cluster_id: u64,
    /// The caller's member id.
    pub from: NodeId,
}

/// What a member knows of the caller of a [`ProbeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    /// The cluster this member belongs to.
    pub cluster_id: u64,
    /// This member's id.
    pub member_id: NodeId,
    /// The members (voters and learners) of the cluster as this member
    /// knows it; empty before it has joined one.
    pub members: Vec<NodeId>,
    /// Whether the caller took part in the cluster before: it published its
    /// attributes through the log, or this member, as leader, replicated
    /// entries to it. (A member id is made from the name, peer URLs and
    /// cluster token, so it names one member whatever cluster id the caller
    /// computed.)
    pub knows_you: bool,
    /// Each member's id and peer URL: a member that was added (`member
    /// add`) finds its id here by its peer URL.
    pub peers: Vec<(NodeId, String)>,
}

impl Member {
    /// Handles a proposal forwarded by member `from`. It is checked again
    /// here as the client port checks it (size, operations per Txn, keys and
    /// ranges): the peer port is no way around a limit. A member publishes
    /// only its own attributes, and a batch is only ever made by the leader.
    pub async fn serve_forward(&self, from: NodeId, proposal: Proposal) -> Forwarded<Response> {
        match self.check_forwarded(from, &proposal.command) {
            Ok(()) => self.proposals.propose(proposal).await,
            Err(e) => Forwarded::Failed(e),
        }
    }

    fn check_forwarded(&self, from: NodeId, command: &[u8]) -> Result<(), Error> {
        use crate::mvcc::{ops, txn};
        use crate::proto::kvdpb::{command::Op, Command};
        use prost::Message;
        if command.len() > self.limits.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        let refused = |why: &str| Error::ForwardRefused(why.to_string());
        let op = Command::decode(command).ok().and_then(|c| c.op).ok_or_else(|| refused("it does not decode"))?;
        match op {
            Op::Put(p) => ops::check_put(&p),
            Op::DeleteRange(d) => ops::check_delete(&d),
            Op::Txn(t) => txn::check_txn(&t, self.limits.max_txn_ops),
            Op::Compact(_) | Op::LeaseRevoke(_) => Ok(()),
            Op::LeaseGrant(g) if g.id == 0 => Err(refused("a lease grant without an ID")),
            Op::LeaseGrant(g) if g.ttl > crate::lease::MAX_LEASE_TTL => Err(Error::LeaseTtlTooLarge),
            Op::LeaseGrant(_) => Ok(()),
            Op::Publish(attrs) if attrs.id != from => {
                Err(refused(&format!("member {from:x} published the attributes of member {:x}", attrs.id)))
            }
            Op::Publish(_) => Ok(()),
            Op::Batch(_) => Err(refused("a batch of commands")),
            Op::Alarm(a) => super::alarm::check_alarm_change(&a),
            Op::LeaseExpire(_) => Err(refused("a lease expiry (only the leader's own expiry check proposes one)")),
        }
    }

    /// Handles a read-index request from a follower.
    pub async fn serve_read_index(&self) -> Forwarded<Option<u64>> {
        self.reads.on_leader().await
    }
}

impl Member {
    /// Answers a starting member's [`ProbeRequest`].
    pub fn serve_probe(&self, probe: &ProbeRequest) -> ProbeAnswer {
        let metrics = self.raft.metrics().borrow().clone();
        let members: Vec<NodeId> = metrics.membership_config.nodes().map(|(id, _)| *id).collect();
        let peers = metrics.membership_config.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        let published = self.state.read().attrs.contains_key(&probe.from);
        let replicated = metrics
            .replication
            .as_ref()
            .and_then(|progress| progress.get(&probe.from))
            .is_some_and(|matched| matched.is_some());
        ProbeAnswer {
            cluster_id: self.cluster_id,
            member_id: self.id,
            members,
            knows_you: published || replicated,
            peers,
        }
    }
}

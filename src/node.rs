//! One member of a kvd cluster: its Raft handle, its state, and the two paths
//! every client request takes.
//!
//! - Writes are proposed to Raft. A follower forwards the proposal to the
//!   leader over the peer API and returns the leader's answer, so clients may
//!   send writes to any member. A proposal is retried only when it certainly
//!   never reached a leader; otherwise the client gets "request timed out", as
//!   from etcd, because the write may have been applied.
//! - Linearizable reads first confirm a read index with the leader (ReadIndex;
//!   a follower asks the leader for it), wait until this member has applied
//!   that far, and then read local state. Serializable reads skip the first
//!   step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, RaftError};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::kvdpb::{command, command_result, Command, CommandResult};
use crate::raft::network::{CallError, Network, Rpc};
use crate::raft::state_machine::{reads_history, Shared};
use crate::raft::{decode, encode, NodeId, Raft, Response};

/// How a leader answers a forwarded proposal or read-index request.
#[derive(Debug, Serialize, Deserialize)]
pub enum Forwarded<T> {
    /// The leader handled it.
    Done(T),
    /// The receiver is not the leader; it names the leader it knows of.
    NotLeader(Option<NodeId>),
    /// The leader could not handle it.
    Failed(Error),
}

/// Request limits, from the flags of the same names.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest proposal, in bytes (`--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Most operations in one Txn (`--max-txn-ops`).
    pub max_txn_ops: usize,
}

/// A running member.
pub struct Node {
    /// This member's id.
    pub id: NodeId,
    /// The cluster's id.
    pub cluster_id: u64,
    /// The Raft handle.
    pub raft: Raft,
    /// The applied state.
    pub state: Arc<Shared>,
    /// Channels to peers (and the test partition switch).
    pub network: Network,
    /// Request limits.
    pub limits: Limits,
    /// How long a request may wait for a leader, a commit or a read index.
    pub request_timeout: Duration,
    /// The smallest TTL a lease is granted with, in seconds.
    pub min_lease_ttl: i64,
    /// The election timeout: a leader that has heard from no quorum for
    /// longer stops taking requests (see [`Node::cut_off`]).
    pub election: Duration,
    /// Lease deadlines, kept while this member leads.
    pub lessor: crate::lease::Lessor,
    /// Turns true when the member begins to stop.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Where proposals to this member's Raft go (see [`crate::raft::batcher`]).
    pub proposals: crate::raft::batcher::Proposals,
    /// Where writes forwarded to the leader go (see [`crate::raft::forwarder`]).
    pub forwards: crate::raft::forwarder::Forwarder,
    /// Read index rounds shared by linearizable reads.
    pub reads: crate::read_index::ReadIndex,
    /// Counters and latency histograms for `GET /metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Node {
    /// Resolves once the member begins to stop. Long-lived calls (watch,
    /// keep-alive and observe streams, waiting locks and campaigns) end on it,
    /// so that a stop is never held open by a client.
    pub async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Fills in a response header: the ids and term, and the current revision
    /// where the response carries none.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(Default::default);
        h.cluster_id = self.cluster_id;
        h.member_id = self.id;
        h.raft_term = self.term();
        if h.revision == 0 {
            h.revision = self.state.read().store.revision();
        }
    }

    /// Waits, up to `deadline`, until a leader other than `stale` is known.
    pub(crate) async fn await_leader(&self, stale: Option<NodeId>, deadline: Instant) {
        await_leader(&self.raft, stale, deadline).await
    }

    /// Replicates a write and returns what applying it produced.
    pub async fn propose(&self, op: command::Op) -> Result<command_result::Result, Error> {
        let alone = reads_history(&op);
        let bytes = Command { op: Some(op) }.encode_to_vec();
        if bytes.len() > self.limits.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        let deadline = Instant::now() + self.request_timeout;
        loop {
            if self.cut_off() {
                return Err(Error::NoLeader);
            }
            // A follower that knows the leader forwards at once; its own
            // Raft would only answer "not the leader".
            let known = self.leader();
            let leader = if known.is_some_and(|l| l != self.id) {
                known
            } else {
                match self.proposals.propose(bytes.clone(), alone).await {
                    Forwarded::Done(resp) => return unpack(resp),
                    Forwarded::NotLeader(leader) => leader,
                    Forwarded::Failed(e) => return Err(e),
                }
            };
            if let Some(leader) = leader {
                match self.forwards.forward(leader, bytes.clone(), deadline).await? {
                    Some(Forwarded::Done(resp)) => return unpack(resp),
                    Some(Forwarded::Failed(e)) => return Err(e),
                    Some(Forwarded::NotLeader(_)) | None => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(if self.leader().is_some() { Error::Timeout } else { Error::NoLeader });
            }
            self.await_leader(leader, deadline).await;
        }
    }

    /// Whether this member leads but has heard from no quorum of members for
    /// longer than an election timeout: it is cut off, and the others have
    /// probably elected a leader already. Like etcd's CheckQuorum, it then
    /// answers "no leader" at once, so that clients move to another member
    /// instead of waiting for a commit that cannot come.
    pub fn cut_off(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state.is_leader() && m.millis_since_quorum_ack.is_some_and(|ms| u128::from(ms) > self.election.as_millis())
    }

    /// Proposes `op` to this member's Raft only, never forwarding it: for
    /// decisions that hold only while this member leads (a lease expired on
    /// its clock). If it is no longer the leader the proposal is dropped.
    pub async fn propose_here(&self, op: command::Op) -> Result<command_result::Result, Error> {
        let alone = reads_history(&op);
        let bytes = Command { op: Some(op) }.encode_to_vec();
        match self.proposals.propose(bytes, alone).await {
            Forwarded::Done(resp) => unpack(resp),
            Forwarded::NotLeader(_) => Err(Error::NoLeader),
            Forwarded::Failed(e) => Err(e),
        }
    }

    /// Sends a request to the leader (see [`ask_leader`]).
    pub(crate) async fn ask_leader<T: serde::de::DeserializeOwned>(
        &self,
        leader: NodeId,
        rpc: Rpc,
        payload: Vec<u8>,
        deadline: Instant,
    ) -> Result<Option<Forwarded<T>>, Error> {
        ask_leader::<Forwarded<T>>(&self.raft, &self.network, leader, rpc, payload, deadline).await
    }

    /// Waits until this member's state reflects every write committed before
    /// the call (a linearizable read barrier). Concurrent calls share one
    /// ReadIndex round.
    pub async fn read_barrier(&self) -> Result<(), Error> {
        if self.cut_off() {
            return Err(Error::NoLeader);
        }
        let deadline = Instant::now() + self.request_timeout;
        let index = self.reads.get().await?;
        self.await_applied(index, deadline).await
    }

    pub(crate) async fn await_applied(&self, index: Option<u64>, deadline: Instant) -> Result<(), Error> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(index, "read index")
            .await
            .map(|_| ())
            .map_err(|_| Error::Timeout)
    }

    /// Handles a proposal forwarded by a follower.
    pub async fn serve_forward(&self, bytes: Vec<u8>) -> Forwarded<Response> {
        if bytes.len() > self.limits.max_request_bytes {
            return Forwarded::Failed(Error::RequestTooLarge);
        }
        // Decoded only to tell whether it needs an entry of its own; the
        // bytes go into the log as they came.
        let alone = match Command::decode(bytes.as_slice()) {
            Ok(Command { op: Some(op) }) => reads_history(&op),
            _ => false,
        };
        self.proposals.propose(bytes, alone).await
    }

    /// Handles a read-index request from a follower.
    pub async fn serve_read_index(&self) -> Forwarded<Option<u64>> {
        match self.reads.leader_read_index().await {
            Ok(read) => Forwarded::Done(read),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Forwarded::NotLeader(f.leader_id),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Forwarded::NotLeader(None),
            Err(RaftError::Fatal(_)) => Forwarded::Failed(Error::Stopped),
        }
    }
}

/// Waits, up to `deadline` (and at most 100 ms), until `raft` knows a leader
/// other than `stale`.
pub(crate) async fn await_leader(raft: &Raft, stale: Option<NodeId>, deadline: Instant) {
    let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
    let _ = raft.wait(Some(wait)).metrics(|m| m.current_leader.is_some() && m.current_leader != stale, "leader").await;
}

/// Sends `rpc` to `leader` over `network` and decodes its answer, a `T`
/// (mostly a [`Forwarded`]). `Ok(None)` means it was certainly not delivered
/// (or the leader's address is not known), so it may be retried; a request
/// that may have arrived but got no answer is `Err(Timeout)`.
pub(crate) async fn ask_leader<T: serde::de::DeserializeOwned>(
    raft: &Raft,
    network: &Network,
    leader: NodeId,
    rpc: Rpc,
    payload: Vec<u8>,
    deadline: Instant,
) -> Result<Option<T>, Error> {
    let node = raft.metrics().borrow().membership_config.membership().get_node(&leader).cloned();
    let Some(node) = node else { return Ok(None) };
    let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    match network.call(leader, &node.addr, rpc, payload, timeout).await {
        Ok(bytes) => Ok(Some(decode(&bytes)?)),
        Err(CallError::NotSent(_)) => Ok(None),
        Err(CallError::Unknown(m) | CallError::Broken(m)) => {
            tracing::debug!(leader, ?rpc, "request to the leader failed: {m}");
            Err(Error::Timeout)
        }
    }
}

fn unpack(resp: Response) -> Result<command_result::Result, Error> {
    let bytes = resp.0?;
    CommandResult::decode(bytes.as_slice())
        .ok()
        .and_then(|r| r.result)
        .ok_or_else(|| Error::internal("undecodable command result"))
}

/// Encodes a peer answer; an answer that cannot be encoded becomes a failure.
pub fn encode_answer<T: Serialize>(answer: &Forwarded<T>) -> Vec<u8> {
    encode(answer).unwrap_or_else(|e| encode(&Forwarded::<()>::Failed(e)).unwrap_or_default())
}

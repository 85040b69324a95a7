//! One member of a kvd cluster: its Raft handle, its state, and the typed API
//! the client and peer services call. One file per concern:
//!
//! - [`kv`]: Range, Put, DeleteRange, Txn and Compact;
//! - [`alarm`]: alarms, the storage quota and the disk's free space;
//! - [`auto_compaction`]: compaction by the flags that ask for it;
//! - [`lease`]: lease grant, revoke, keep-alive and time-to-live, and the
//!   leader's expiry task;
//! - [`coordination`]: the lock and election recipes on keys and leases;
//! - [`membership`]: member add, remove, update and promote;
//! - [`defrag`]: giving disk space back;
//! - [`leadership`]: handing leadership to another member (MoveLeader, and
//!   before a leader stops);
//! - [`peer`]: what this member answers when a follower asks it, as leader,
//!   to propose a write, for a read index or about a lease.
//!
//! Two paths every client request takes:
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

pub mod alarm;
pub mod auth;
pub mod auto_compaction;
pub mod coordination;
pub mod defrag;
pub mod kv;
pub mod leadership;
pub mod lease;
pub mod membership;
pub mod peer;
pub mod snapshots;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::kvdpb::{command, command_result, AuthStamp, Command, CommandResult};
use crate::raft::batcher::Proposals;
use crate::raft::forwarder::Forwarder;
use crate::raft::leader::{until_leader, Attempt, Forwarded, Proposal};
use crate::raft::network::Network;
use crate::raft::state_machine::{reads_history, Shared};
use crate::raft::{NodeId, Raft, Response};
use crate::read_index::ReadIndex;

/// Request limits, from the flags of the same names.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest proposal, in bytes (`--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Most operations in one Txn (`--max-txn-ops`).
    pub max_txn_ops: usize,
}

/// A running member.
pub struct Member {
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
    pub limits: RequestLimits,
    /// How long a request may wait for a leader, a commit or a read index.
    pub request_timeout: Duration,
    /// The smallest TTL a lease is granted with, in seconds.
    pub min_lease_ttl: i64,
    /// The election timeout: a leader that has heard from no quorum for
    /// longer stops taking requests (see [`Member::cut_off`]).
    pub election: Duration,
    /// Lease deadlines, kept while this member leads.
    pub lessor: crate::lease::Lessor,
    /// Keep-alives waiting for the next renewal batch.
    pub renewals: lease::Renewals,
    /// Revocations of expired leases under way.
    pub revocations: lease::Revocations,
    /// Turns true when the member begins to stop.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Where proposals to this member's Raft go (see [`crate::raft::batcher`]).
    pub proposals: Proposals,
    /// Where writes forwarded to the leader go (see [`crate::raft::forwarder`]).
    pub forwards: Forwarder,
    /// Read index rounds shared by linearizable reads.
    pub reads: ReadIndex,
    /// Counters and latency histograms for `GET /metrics`.
    pub metrics: Arc<Metrics>,
    /// Held by the leader while it makes a membership change: one at a time.
    pub membership_lock: tokio::sync::Mutex<()>,
    /// Whether a membership this member applied has listed it (see
    /// `Member::removed`).
    pub listed: std::sync::atomic::AtomicBool,
    /// Whether membership changes are checked against the members started
    /// and reachable (`--strict-reconfig-check`).
    pub strict_reconfig_check: bool,
    /// The quota and the disk space the member keeps free.
    pub space: alarm::Space,
    /// Senders the others vouched for (see `Member::vouched_for`).
    pub vouches: peer::Vouches,
    /// The throttle on password checks, and the bcrypt cost.
    pub logins: auth::Logins,
    /// The highest commit index the leader's AppendEntries have told this
    /// member's Raft, as far as it is sent ahead of their entries (see
    /// `Member::serve_append_entries`). Committed indexes only grow, under
    /// any leader, so one count serves every stream and call.
    pub commit_told: std::sync::atomic::AtomicU64,
}

/// A replicated write and the response applying it produces: the typed face
/// of a `kvdpb::Command` and its `CommandResult`.
pub(crate) trait Write {
    /// What applying it answers.
    type Output;
    /// The command that goes into the log.
    fn into_op(self) -> command::Op;
    /// This write's response out of what applying it produced; `None` if
    /// applying produced another kind (which would be a bug in apply).
    fn output(result: command_result::Result) -> Option<Self::Output>;
}

impl Member {
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

    /// Fills in a response header: the ids, the term, the auth revision, and
    /// the current revision where the response carries none.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(Default::default);
        h.cluster_id = self.cluster_id;
        h.member_id = self.id;
        h.raft_term = self.term();
        let state = self.state.read();
        h.auth_revision = state.auth.revision;
        if h.revision == 0 {
            h.revision = state.store.revision();
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

    /// Replicates a write through the leader and returns its response.
    pub(crate) async fn write<W: Write>(&self, write: W) -> Result<W::Output, Error> {
        let result = self.propose(write.into_op()).await?;
        W::output(result).ok_or_else(|| Error::internal("applying a write produced a response of another kind"))
    }

    /// A write the member makes of itself while it serves a client (an
    /// alarm it raises): not checked against the client's permissions.
    pub(crate) async fn write_as_member<W: Write>(&self, write: W) -> Result<W::Output, Error> {
        let result = self.propose_with(write.into_op(), None).await?;
        W::output(result).ok_or_else(|| Error::internal("applying a write produced a response of another kind"))
    }

    /// Replicates `op` and returns what applying it produced, once this
    /// member has applied it too: as from etcd, a read that follows on the
    /// same member, serializable or not, sees the write.
    pub(crate) async fn propose(&self, op: command::Op) -> Result<command_result::Result, Error> {
        self.propose_with(op, self.who()?.stamp()).await
    }

    /// [`Member::propose`] with `stamp` as who asked.
    async fn propose_with(&self, op: command::Op, stamp: Option<AuthStamp>) -> Result<command_result::Result, Error> {
        let result = self.replicate(op, stamp).await?;
        match revision_of(&result) {
            Some(rev) => self.await_revision(rev, Instant::now() + self.request_timeout).await?,
            // A change that names no revision (an auth change, a token
            // issued, an alarm), perhaps applied by another member: this
            // member answers once it has applied it too, as etcd's members
            // do, so that a token it hands out is one it knows and a read
            // that follows here sees the change. The commit index a read
            // barrier learns is at or past the change. These are rare (a
            // login costs a bcrypt check besides).
            None => self.read_barrier().await?,
        }
        Ok(result)
    }

    /// Waits until this member's store is at `rev` or later.
    async fn await_revision(&self, rev: i64, deadline: Instant) -> Result<(), Error> {
        // On the leader, and mostly on a follower too, it is there already.
        let Some(reached) = self.state.revision_reached(rev) else { return Ok(()) };
        match tokio::time::timeout_at(deadline.into(), reached).await {
            Err(_) => Err(Error::Timeout),
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Stopped),
        }
    }

    /// Replicates `op` through the leader and returns what applying it
    /// produced there.
    async fn replicate(&self, op: command::Op, stamp: Option<AuthStamp>) -> Result<command_result::Result, Error> {
        let proposal = self.proposal(op, stamp)?;
        let deadline = Instant::now() + self.request_timeout;
        let proposal = &proposal;
        until_leader(&self.raft, deadline, move || async move {
            if self.cut_off() {
                return Attempt::Answered(Err(Error::NoLeader));
            }
            // A follower that knows the leader forwards at once; its own
            // Raft would only answer "not the leader".
            let known = self.leader();
            let leader = if known.is_some_and(|l| l != self.id) {
                known
            } else {
                match self.proposals.propose(proposal.clone()).await {
                    Forwarded::Done(resp) => return Attempt::Answered(unpack(resp)),
                    Forwarded::NotLeader(leader) => leader,
                    Forwarded::Failed(e) => return Attempt::Answered(Err(e)),
                }
            };
            let Some(leader) = leader else { return Attempt::Retry { stale: None } };
            match self.forwards.forward(leader, proposal.clone(), deadline).await {
                Ok(Some(Forwarded::Done(resp))) => Attempt::Answered(unpack(resp)),
                Ok(Some(Forwarded::Failed(e))) | Err(e) => Attempt::Answered(Err(e)),
                Ok(Some(Forwarded::NotLeader(_)) | None) => Attempt::Retry { stale: Some(leader) },
            }
        })
        .await
    }

    /// Proposes `op` to this member's Raft only, never forwarding it: for
    /// decisions that hold only while this member leads (a lease expired on
    /// its clock). If it is no longer the leader the proposal is dropped.
    pub(crate) async fn propose_here(&self, op: command::Op) -> Result<command_result::Result, Error> {
        match self.proposals.propose(self.proposal(op, None)?).await {
            Forwarded::Done(resp) => unpack(resp),
            Forwarded::NotLeader(_) => Err(Error::NoLeader),
            Forwarded::Failed(e) => Err(e),
        }
    }

    /// Encodes `op` once, for every hop it takes, and checks its size.
    fn proposal(&self, op: command::Op, stamp: Option<AuthStamp>) -> Result<Proposal, Error> {
        let alone = reads_history(&op);
        let command = Command { op: Some(op), stamp }.encode_to_vec();
        if command.len() > self.limits.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        Ok(Proposal { command, alone })
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

    /// Counts each leader this member comes to know of, in its metrics,
    /// until it stops.
    pub async fn count_leader_changes(self: Arc<Self>) {
        let mut server = self.raft.server_metrics();
        let mut last = None;
        loop {
            let leader = server.borrow_and_update().current_leader;
            if leader.is_some() && leader != last {
                self.metrics.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            last = leader;
            tokio::select! {
                changed = server.changed() => if changed.is_err() { return },
                () = self.stopped() => return,
            }
        }
    }
}

/// The revision a write's response names: the store's revision once it was
/// applied.
fn revision_of(result: &command_result::Result) -> Option<i64> {
    use command_result::Result as R;
    let header = match result {
        R::Put(r) => r.header.as_ref(),
        R::DeleteRange(r) => r.header.as_ref(),
        R::Txn(r) => r.header.as_ref(),
        R::Compact(r) => r.header.as_ref(),
        R::LeaseGrant(r) => r.header.as_ref(),
        R::LeaseRevoke(r) => r.header.as_ref(),
        R::Published(_) | R::Alarm(_) | R::AuthRevision(_) => None,
    };
    header.map(|h| h.revision)
}

fn unpack(resp: Response) -> Result<command_result::Result, Error> {
    let bytes = resp.0?;
    CommandResult::decode(bytes.as_slice())
        .ok()
        .and_then(|r| r.result)
        .ok_or_else(|| Error::internal("undecodable command result"))
}

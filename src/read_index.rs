//! ReadIndex rounds shared by concurrent linearizable reads.
//!
//! A linearizable read needs a read index: a commit index confirmed by the
//! leader (a heartbeat round to a quorum) after the read arrived. One round
//! serves every read that arrived before it started, so reads queue while a
//! round is under way and the next round answers all of them at once: under
//! load there is one round in flight per member, not one per read. On a
//! follower a round is one request to the leader.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::oneshot;

use crate::error::Error;
use crate::raft::leader::{ask_leader, idempotent_attempt, until_leader, Attempt, Forwarded};
use crate::raft::network::{Network, Rpc};
use crate::raft::{NodeId, Raft};

type ReadAnswer = Result<Option<u64>, Error>;

/// The read index rounds of one member.
#[derive(Clone)]
pub struct ReadIndex {
    raft: Raft,
    network: Network,
    timeout: Duration,
    rounds: Arc<Mutex<Rounds>>,
    restored: Restored,
}

/// A floor under the read index of a leader that restarted as leader.
///
/// A member whose stored vote at start is its own, committed, takes up
/// leadership again in the same term without an election, and openraft then
/// takes the first entry it proposed in that term as the read index floor
/// (with its commit index, which after a restart is only what it had
/// applied). Entries after that first one may have been committed and
/// acknowledged before the restart, so such a read could miss them. Until a
/// new term begins, the floor is the last entry of its log at start: every
/// entry that can have been committed before the restart.
#[derive(Clone, Copy, Debug, Default)]
pub struct Restored {
    /// The term of the leadership restored at start, and the last log index
    /// then.
    term_and_last: Option<(u64, u64)>,
}

impl Restored {
    /// What member `id` found on disk at start.
    pub fn from_start(id: NodeId, vote: Option<openraft::Vote<NodeId>>, last: Option<crate::raft::LogId>) -> Self {
        let term_and_last = match (vote, last) {
            (Some(v), Some(last)) if v.is_committed() && v.leader_id().voted_for() == Some(id) => {
                Some((v.leader_id().get_term(), last.index))
            }
            _ => None,
        };
        Restored { term_and_last }
    }
}

#[derive(Default)]
struct Rounds {
    /// Whether a task is running rounds.
    running: bool,
    /// Reads waiting for the next round.
    waiting: Vec<oneshot::Sender<ReadAnswer>>,
}

impl ReadIndex {
    /// Read index rounds through `raft`, asking the leader over `network`
    /// when this member is a follower; a round gives up after `timeout`.
    pub fn new(raft: Raft, network: Network, timeout: Duration, restored: Restored) -> Self {
        ReadIndex { raft, network, timeout, rounds: Default::default(), restored }
    }

    /// This member's read index if it is the leader (a heartbeat round to a
    /// quorum confirms it), with the floor of a restored leadership.
    pub async fn leader_read_index(
        &self,
    ) -> Result<Option<u64>, RaftError<NodeId, CheckIsLeaderError<NodeId, crate::raft::Node>>> {
        let (read, _) = self.raft.get_read_log_id().await?;
        let read = read.map(|l| l.index);
        match self.restored.term_and_last {
            Some((term, last)) if self.raft.metrics().borrow().current_term == term => {
                Ok(Some(read.map_or(last, |r| r.max(last))))
            }
            _ => Ok(read),
        }
    }

    /// A read index confirmed after this call began: once this member has
    /// applied it, its state reflects every write committed before the call.
    pub async fn get(&self) -> ReadAnswer {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut r = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
            r.waiting.push(tx);
            !std::mem::replace(&mut r.running, true)
        };
        if start {
            // The rounds run in a task of their own, so a read whose client
            // goes away never strands the others.
            tokio::spawn(self.clone().run());
        }
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    async fn run(self) {
        loop {
            let waiting = {
                let mut r = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
                if r.waiting.is_empty() {
                    r.running = false;
                    return;
                }
                std::mem::take(&mut r.waiting)
            };
            let answer = self.round().await;
            for w in waiting {
                let _ = w.send(answer.clone());
            }
        }
    }

    /// One round: the leader's read index, from this member if it leads,
    /// else from the leader; retried across leader changes until the timeout.
    async fn round(&self) -> ReadAnswer {
        let deadline = Instant::now() + self.timeout;
        until_leader(&self.raft, deadline, || self.attempt(deadline)).await
    }

    async fn attempt(&self, deadline: Instant) -> Attempt<Option<u64>> {
        // Bounded like every other wait here: a round that openraft never
        // answered would hold up every later read on this member.
        let Ok(here) = tokio::time::timeout_at(deadline.into(), self.on_leader()).await else {
            return Attempt::Answered(Err(Error::Timeout));
        };
        let leader = match here {
            Forwarded::NotLeader(Some(leader)) => leader,
            answer => return answer.into(),
        };
        let asked = ask_leader::<Forwarded<Option<u64>>>(
            &self.raft,
            &self.network,
            leader,
            Rpc::ReadIndex,
            Vec::new(),
            deadline,
        )
        .await;
        idempotent_attempt(leader, asked)
    }

    /// The read index as the leader answers it, here or to a follower that
    /// asks: done, not the leader (with the leader this member knows of), or
    /// failed because Raft stopped.
    pub async fn on_leader(&self) -> Forwarded<Option<u64>> {
        match self.leader_read_index().await {
            Ok(read) => Forwarded::Done(read),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Forwarded::NotLeader(f.leader_id),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Forwarded::NotLeader(None),
            Err(RaftError::Fatal(_)) => Forwarded::Failed(Error::Stopped),
        }
    }
}

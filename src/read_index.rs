//! ReadIndex rounds shared by concurrent linearizable reads.
//!
//! A linearizable read needs a read index: a commit index confirmed by the
//! leader (a heartbeat round to a quorum) after the read arrived. One round
//! serves every read that arrived before it started, so reads queue while a
//! round is under way and the next round answers all of them at once: under
//! load there is one round in flight per member, not one per read. On a
//! follower a round is one request to the leader.

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The latest round that confirmed this member's leadership.
    confirmed: Arc<Mutex<Option<Confirmed>>>,
    /// How many rounds have.
    rounds_confirmed: Arc<AtomicU64>,
}

/// A round that confirmed this member's leadership: a quorum acknowledged a
/// heartbeat of `term` sent after `began`, and the read index it gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Confirmed {
    term: u64,
    began: Instant,
    read: Option<u64>,
}

impl Confirmed {
    /// Whether this round still answers, at `now`, for a leader of `term`
    /// that accepts a round begun less than `window` ago.
    fn answers(&self, term: u64, now: Instant, window: Duration) -> bool {
        self.term == term && now.saturating_duration_since(self.began) < window
    }
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

    /// The read index a leader's round gave as `read`, raised to the floor
    /// while the leadership restored at start lasts.
    ///
    /// The round tells which leadership answered: openraft's read log id is
    /// the later of the first entry of the leader's term and the commit
    /// index, so in the restored term it is of that term or an older one,
    /// and in any later term of this member's it is of that later term (its
    /// first entry there came after everything in the log at start). So the
    /// floor does not depend on when Raft's metrics first report the term
    /// (they say term 0 until then; the server now waits for that report
    /// before it serves, see `server::restored_state`).
    fn floor(&self, read: Option<crate::raft::LogId>) -> Option<u64> {
        match (self.term_and_last, read) {
            (Some((restored, last)), Some(r)) if r.leader_id.term <= restored => Some(r.index.max(last)),
            (Some((_, last)), None) => Some(last),
            (_, read) => read.map(|r| r.index),
        }
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
    /// Counts each round that confirmed this member's leadership in
    /// `rounds_confirmed`.
    pub fn new(
        raft: Raft,
        network: Network,
        timeout: Duration,
        restored: Restored,
        rounds_confirmed: Arc<AtomicU64>,
    ) -> Self {
        ReadIndex {
            raft,
            network,
            timeout,
            rounds: Default::default(),
            restored,
            confirmed: Default::default(),
            rounds_confirmed,
        }
    }

    /// [`ReadIndex::leader_read_index`], or the answer of a round that began
    /// less than `window` ago in `term`, the term this member leads in (the
    /// caller has just seen it lead; a round confirms it).
    ///
    /// Only for what tolerates a leadership that ended up to `window` ago
    /// without this member knowing: lease keep-alives, whose deadlines a new
    /// leader starts with that much grace (see [`crate::lease::Lessor`]). A
    /// new leader is elected only after a member of the quorum that
    /// acknowledged the round voted for it, so after the round began. Reads
    /// take a round each.
    pub async fn recent_leader_read_index(
        &self,
        term: u64,
        window: Duration,
    ) -> Result<Option<u64>, RaftError<NodeId, CheckIsLeaderError<NodeId, crate::raft::Node>>> {
        let confirmed = *self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        match confirmed {
            Some(c) if c.answers(term, Instant::now(), window) => Ok(c.read),
            _ => self.leader_read_index().await,
        }
    }

    /// This member's read index if it is the leader (a heartbeat round to a
    /// quorum confirms it), with the floor of a restored leadership.
    pub async fn leader_read_index(
        &self,
    ) -> Result<Option<u64>, RaftError<NodeId, CheckIsLeaderError<NodeId, crate::raft::Node>>> {
        let term = self.raft.metrics().borrow().current_term;
        let began = Instant::now();
        let (read, _) = self.raft.get_read_log_id().await?;
        self.rounds_confirmed.fetch_add(1, Ordering::Relaxed);
        let read = self.restored.floor(read);
        // Terms only grow: the same term after the round as before it is
        // the term the round confirmed.
        if self.raft.metrics().borrow().current_term == term {
            let mut c = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_none_or(|c| (c.term, c.began) < (term, began)) {
                *c = Some(Confirmed { term, began, read });
            }
        }
        Ok(read)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_answers_only_in_its_term_and_within_the_window() {
        let began = Instant::now();
        let c = Confirmed { term: 3, began, read: Some(7) };
        let window = Duration::from_millis(250);
        assert!(c.answers(3, began, window));
        assert!(c.answers(3, began + Duration::from_millis(249), window));
        assert!(!c.answers(3, began + window, window));
        assert!(!c.answers(4, began, window), "a later term needs its own round");
        assert!(!c.answers(3, began, Duration::ZERO), "no window: every call takes a round");
    }

    #[test]
    fn a_restored_leadership_reads_at_least_its_log_at_start_until_a_later_term() {
        let id = 7;
        let log_id = |term, index| crate::raft::LogId::new(openraft::CommittedLeaderId::new(term, id), index);
        let mut vote = openraft::Vote::new(3, id);
        vote.commit();
        let restored = Restored::from_start(id, Some(vote), Some(log_id(3, 100)));
        // In the restored term openraft answers with the term's first entry
        // (or an older commit index): the floor holds.
        assert_eq!(restored.floor(Some(log_id(3, 40))), Some(100));
        assert_eq!(restored.floor(Some(log_id(2, 30))), Some(100));
        assert_eq!(restored.floor(None), Some(100));
        assert_eq!(restored.floor(Some(log_id(3, 120))), Some(120), "a later commit index is kept");
        // A later term of this member's has its own first entry: no floor,
        // even below the old last entry (its log may have been cut back).
        assert_eq!(restored.floor(Some(log_id(5, 90))), Some(90));
        // A member that did not lead at start has no floor.
        let follower = Restored::from_start(id, Some(openraft::Vote::new_committed(3, 9)), Some(log_id(3, 100)));
        assert_eq!(follower.floor(Some(log_id(3, 40))), Some(40));
        let uncommitted = Restored::from_start(id, Some(openraft::Vote::new(3, id)), Some(log_id(3, 100)));
        assert_eq!(uncommitted.floor(Some(log_id(3, 40))), Some(40), "a vote not won restores no leadership");
    }
}

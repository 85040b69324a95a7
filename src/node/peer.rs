//! What a member answers, as leader, when a follower asks it on a client's
//! behalf: to propose a write, or for a read index. (Lease questions are in
//! [`super::lease`].) And what any member answers a member that starts on an
//! empty data directory and asks whether the cluster already knows it.

use std::sync::atomic::{AtomicU64, Ordering};

use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use serde::{Deserialize, Serialize};

use super::Member;
use crate::error::Error;
use crate::raft::leader::{Forwarded, Proposal};
use crate::raft::network::Rpc;
use crate::raft::state_machine::{membership_at, MembershipAt};
use crate::raft::{NodeId, Response, TypeConfig};

/// A starting member's question: what do you know of me?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// The cluster the caller means to be part of.
    pub cluster_id: u64,
    /// The caller's member id.
    pub from: NodeId,
}

/// What a member knows of the caller of a [`ProbeRequest`] (read with
/// [`ProbeAnswer::decode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// The log index of the membership `members` comes from (0 before
    /// any): a member that asks whether a sender is a member believes only
    /// a membership at least as new as the last it applied. `None` from a
    /// kvd that does not say (see [`ProbeAnswer::decode`]).
    pub membership_index: Option<u64>,
    /// Whether this member has a defragment under way, or about to begin:
    /// a member waits for it before it begins one by itself.
    pub defragmenting: bool,
    /// The term of the leader that appended the membership `members`
    /// comes from (0 before any): with the index, where it is in the log
    /// (see [`MembershipAt`]). `None` from a kvd that does not say.
    pub membership_term: Option<u64>,
}

/// Decodes one value from the front of `rest` and moves `rest` past it.
/// bincode's reader of a slice checks each length against the bytes there
/// (its reader of a stream would allocate whatever length a malformed
/// message claims), and a value has one encoding, so encoding it again
/// says how many bytes it took.
fn take<T: serde::de::DeserializeOwned + Serialize>(rest: &mut &[u8]) -> Result<T, crate::raft::CodecError> {
    let value: T = crate::raft::decode(rest)?;
    let used = bincode::serialized_size(&value).map_err(crate::raft::CodecError::Decode)?;
    *rest = usize::try_from(used).ok().and_then(|used| rest.get(used..)).unwrap_or_default();
    Ok(value)
}

/// The fields every kvd's [`ProbeAnswer`] begins with; later versions add
/// fields after them, each read only if the sender sent it.
#[derive(Serialize, Deserialize)]
struct FirstFields {
    cluster_id: u64,
    member_id: NodeId,
    members: Vec<NodeId>,
    knows_you: bool,
    peers: Vec<(NodeId, String)>,
}

impl ProbeAnswer {
    /// Decodes an answer, also one from a kvd that sends fewer fields (a
    /// cluster being upgraded a member at a time): what it does not say is
    /// `None` or false. The fields come in the order they were added, so
    /// each is read while bytes are left. (Earlier versions read this
    /// version's answers: they ignore the bytes after the fields they know.)
    pub fn decode(bytes: &[u8]) -> Result<ProbeAnswer, crate::raft::CodecError> {
        let mut rest = bytes;
        let first: FirstFields = take(&mut rest)?;
        let (membership_index, defragmenting) = if rest.is_empty() { (None, false) } else { take(&mut rest)? };
        let membership_term = if rest.is_empty() { None } else { take(&mut rest)? };
        Ok(ProbeAnswer {
            cluster_id: first.cluster_id,
            member_id: first.member_id,
            members: first.members,
            knows_you: first.knows_you,
            peers: first.peers,
            membership_index,
            defragmenting,
            membership_term,
        })
    }
}

/// The heartbeat to hand a follower's Raft ahead of `rpc`, so that it
/// applies what the leader committed without first syncing `rpc`'s entries.
///
/// openraft 0.9 writes and syncs a request's entries before it runs the rest
/// of the request (its core waits for the sync), and the leader's commit
/// index comes with the next entries. Under load a follower therefore
/// applied entry N only after syncing the entries that came with N's
/// commit, and a client's write through it, answered once this member has
/// applied it too, waited for that sync. The heartbeat is what the leader
/// itself sends between entries: its vote, `rpc`'s `prev_log_id`, no
/// entries, and the commit index no further than `prev_log_id` (which the
/// follower's log must hold to take `rpc` at all). So both requests are the
/// leader's own word, and each keeps Raft's rules. None when `rpc` carries
/// no entries (it is a heartbeat already) or tells no commit beyond `told`
/// (the highest told so far, which it raises to what `rpc` tells).
fn commit_ahead(rpc: &AppendEntriesRequest<TypeConfig>, told: &AtomicU64) -> Option<AppendEntriesRequest<TypeConfig>> {
    let upto = std::cmp::min(rpc.prev_log_id, rpc.leader_commit)?;
    let before = told.fetch_max(upto.index, Ordering::Relaxed);
    if rpc.entries.is_empty() || upto.index <= before {
        return None;
    }
    Some(AppendEntriesRequest {
        vote: rpc.vote,
        prev_log_id: rpc.prev_log_id,
        entries: Vec::new(),
        leader_commit: Some(upto),
    })
}

impl Member {
    /// Hands an AppendEntries from the leader to this member's Raft, behind
    /// the heartbeat [`commit_ahead`] makes of it, if any.
    pub async fn serve_append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        let Some(heartbeat) = commit_ahead(&rpc, &self.commit_told) else {
            return self.raft.append_entries(rpc).await;
        };
        // Raft's core takes requests in the order they are sent, and a call
        // sends its request when first polled: the heartbeat's goes first.
        // Its answer may be in by then (or Raft stopped): a finished future
        // is not polled again.
        let mut first = std::pin::pin!(self.raft.append_entries(heartbeat));
        if futures::poll!(first.as_mut()).is_ready() {
            return self.raft.append_entries(rpc).await;
        }
        let (_, answer) = tokio::join!(first, self.raft.append_entries(rpc));
        answer
    }

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
            Op::Auth(a) if a.change.is_none() => Err(refused("an empty auth change")),
            Op::Auth(_) => Ok(()),
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
        let at = membership_at(&metrics.membership_config);
        ProbeAnswer {
            cluster_id: self.cluster_id,
            member_id: self.id,
            members,
            knows_you: published || replicated,
            peers,
            membership_index: Some(at.index),
            defragmenting: self.state.defragmenting(),
            membership_term: Some(at.term),
        }
    }

    /// Whether this member may begin a defragment by itself: no other
    /// member it knows answers that one is under way there, or about to
    /// begin. A member that does not answer is not waited for (it may be
    /// down for long).
    pub async fn defragment_turn(&self) -> bool {
        let answers = self.probe_the_others().await;
        !answers.iter().flatten().any(|a| a.cluster_id == self.cluster_id && a.defragmenting)
    }

    /// Asks every other member of this member's membership a
    /// [`ProbeRequest`], each for at most [`VOUCH_TIMEOUT`]: their answers,
    /// `None` for one that did not answer.
    async fn probe_the_others(&self) -> Vec<Option<ProbeAnswer>> {
        let nodes: Vec<(NodeId, String)> = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            m.membership_config.nodes().filter(|(id, _)| **id != self.id).map(|(id, n)| (*id, n.addr.clone())).collect()
        };
        let request = ProbeRequest { cluster_id: self.cluster_id, from: self.id };
        let Ok(payload) = crate::raft::encode(&request) else { return vec![None; nodes.len()] };
        let asks = nodes.iter().map(|(id, addr)| {
            let payload = payload.clone();
            async move {
                let bytes = self.network.call(*id, addr, Rpc::Probe, payload, VOUCH_TIMEOUT).await.ok()?;
                ProbeAnswer::decode(&bytes).ok()
            }
        });
        futures::future::join_all(asks).await
    }
}

/// Whether a member's answer vouches for `from` to a member whose
/// membership does not list it, and which last applied the membership at
/// `applied` in the log. Only a membership at or after that one counts (in
/// the order of [`MembershipAt`]): an older one lists members removed since
/// (ids are never reused), and a member that has not yet applied a
/// removal, or was removed itself and never heard, would otherwise vouch
/// for the removed member; so would one that holds, at the same index or
/// later, a deposed leader's membership that was never committed. Not the
/// asker's own membership, which may be appended and not committed: a
/// removal that a new leader then drops must not leave the asker refusing
/// that leader, the member it meant to remove, whose membership is older.
/// A kvd that says only the index (an earlier version, while a cluster is
/// upgraded) is compared by index; one that says nothing of where its
/// membership is is taken at its word, as before.
fn vouches(answer: &ProbeAnswer, cluster_id: u64, from: NodeId, applied: MembershipAt) -> bool {
    let recent = match (answer.membership_term, answer.membership_index) {
        (Some(term), Some(index)) => MembershipAt { term, index } >= applied,
        (None, Some(index)) => index >= applied.index,
        (_, None) => true,
    };
    answer.cluster_id == cluster_id && recent && answer.members.contains(&from)
}

/// How long a member trusts what the others said of a sender its own
/// membership does not list.
const VOUCH_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a member keeps a refusal that not every member it asked gave
/// (some did not answer, or it knew no one to ask): the sender may be a
/// leader that a member which did not answer knows, and each refusal gives
/// this member's election timer time to run out and depose that leader.
const UNSURE_FOR: std::time::Duration = std::time::Duration::from_millis(200);

/// How long a member waits for the others to answer whether a sender is a
/// member.
const VOUCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the answers of the members asked (`Some(listed)`, or `None` for
/// one that did not answer) come to: whether the sender is vouched for, and
/// for how long that holds.
fn vouch_of(answers: &[Option<bool>]) -> (bool, std::time::Duration) {
    let ok = answers.contains(&Some(true));
    let sure = ok || (!answers.is_empty() && answers.iter().all(Option::is_some));
    (ok, if sure { VOUCH_FOR } else { UNSURE_FOR })
}

/// What the members this member knows said of senders it does not know
/// (see [`Member::vouched_for`]).
pub struct Vouches {
    /// Until when each answer holds, the answer, and where the membership
    /// this member had applied when it was given is in the log: a new one
    /// (a removal) ends it.
    said: std::sync::Mutex<std::collections::HashMap<NodeId, (std::time::Instant, bool, MembershipAt)>>,
    /// One round of asking at a time: a stranger that makes up ids cannot
    /// make this member flood the others; callers that wait longer than two
    /// rounds are refused.
    asking: tokio::sync::Semaphore,
}

impl Default for Vouches {
    fn default() -> Vouches {
        Vouches::new()
    }
}

impl Vouches {
    /// Ready to ask.
    pub fn new() -> Vouches {
        Vouches { said: Default::default(), asking: tokio::sync::Semaphore::new(1) }
    }
}

impl Member {
    /// Whether `from`, which this member's membership does not list, is a
    /// member all the same: some member of this member's membership lists
    /// it. A member that fell behind (restarted after being down, or joined
    /// from an older snapshot) does not know members added since, and one
    /// of them may be the leader that must catch it up. Strangers are not
    /// listed by anyone, and a removed member only by memberships older
    /// than the one this member applied, which do not count (see
    /// [`vouches`]). Answers are kept for [`VOUCH_FOR`], or for
    /// [`UNSURE_FOR`] a refusal that not every member asked gave, while
    /// the membership this member applied stays the same.
    pub async fn vouched_for(&self, from: NodeId) -> bool {
        let own = || self.state.applied_membership();
        let said = |v: &Vouches| {
            let said = v.said.lock().unwrap_or_else(|p| p.into_inner()).get(&from).copied();
            said.filter(|(until, _, at)| std::time::Instant::now() < *until && *at == own()).map(|(_, ok, _)| ok)
        };
        if let Some(ok) = said(&self.vouches) {
            return ok;
        }
        // Callers wait for a round under way, and find its answer after.
        let asking = tokio::time::timeout(2 * VOUCH_TIMEOUT, self.vouches.asking.acquire()).await;
        let Ok(Ok(_asking)) = asking else { return false };
        if let Some(ok) = said(&self.vouches) {
            return ok;
        }
        let applied = own();
        let answers = self.probe_the_others().await;
        if own() != applied {
            // The answers may be older than the membership this member
            // applied meanwhile: refused this time, asked again next.
            return false;
        }
        let answers: Vec<Option<bool>> =
            answers.iter().map(|a| a.as_ref().map(|a| vouches(a, self.cluster_id, from, applied))).collect();
        let (ok, kept) = vouch_of(&answers);
        let now = std::time::Instant::now();
        let until = now + kept;
        let mut said = self.vouches.said.lock().unwrap_or_else(|p| p.into_inner());
        if said.len() > 1024 {
            said.retain(|_, (until, _, _)| now < *until);
        }
        said.insert(from, (until, ok, applied));
        if ok {
            tracing::info!(member = %format!("{from:x}"), "a member this member's membership does not list yet is vouched for by the others");
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(index: u64) -> Option<crate::raft::LogId> {
        Some(crate::raft::LogId::new(openraft::CommittedLeaderId::new(3, 1), index))
    }

    fn entries(prev: u64, commit: Option<u64>, count: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: at(prev),
            entries: (prev + 1..=prev + count)
                .map(|i| openraft::Entry { log_id: at(i).expect("id"), payload: openraft::EntryPayload::Blank })
                .collect(),
            leader_commit: commit.and_then(at),
        }
    }

    /// Entries 11..=12 come with the commit of entry 10: the heartbeat ahead
    /// of them commits 10, with the leader's vote and `prev_log_id`. With
    /// the commit past `prev_log_id` (the leader committed more than this
    /// follower is known to hold) it commits only up to `prev_log_id`.
    #[test]
    fn a_heartbeat_ahead_of_entries_commits_no_further_than_prev_log_id() {
        let told = AtomicU64::new(0);
        let rpc = entries(10, Some(10), 2);
        let heartbeat = commit_ahead(&rpc, &told).expect("a heartbeat ahead");
        assert_eq!(heartbeat.vote, rpc.vote);
        assert_eq!(heartbeat.prev_log_id, at(10));
        assert!(heartbeat.entries.is_empty());
        assert_eq!(heartbeat.leader_commit, at(10));
        assert_eq!(told.load(Ordering::Relaxed), 10);

        let rpc = entries(12, Some(20), 3);
        assert_eq!(commit_ahead(&rpc, &told).expect("a heartbeat ahead").leader_commit, at(12));
        assert_eq!(told.load(Ordering::Relaxed), 12);
    }

    /// No heartbeat when there is nothing for it to add: a request without
    /// entries (a heartbeat itself, whose commit still counts as told), a
    /// commit already told, or none at all.
    #[test]
    fn no_heartbeat_ahead_when_it_would_tell_nothing_new() {
        let told = AtomicU64::new(0);
        assert!(commit_ahead(&entries(10, Some(10), 0), &told).is_none());
        assert_eq!(told.load(Ordering::Relaxed), 10, "a heartbeat's commit is told");
        assert!(commit_ahead(&entries(10, Some(10), 2), &told).is_none());
        assert!(commit_ahead(&entries(12, Some(9), 2), &told).is_none());
        assert!(commit_ahead(&entries(12, None, 2), &told).is_none());
        let from_start = AppendEntriesRequest { prev_log_id: None, ..entries(0, Some(4), 1) };
        assert!(commit_ahead(&from_start, &told).is_none());
        assert!(commit_ahead(&entries(12, Some(11), 2), &told).is_some());
    }

    #[test]
    fn a_refusal_is_kept_long_only_when_every_member_asked_refused() {
        assert_eq!(vouch_of(&[Some(false), Some(true)]), (true, VOUCH_FOR));
        assert_eq!(vouch_of(&[None, Some(true)]), (true, VOUCH_FOR));
        assert_eq!(vouch_of(&[Some(false), Some(false)]), (false, VOUCH_FOR));
        // One did not answer: it may know the sender.
        assert_eq!(vouch_of(&[Some(false), None]), (false, UNSURE_FOR));
        // No one to ask (the membership is not known yet).
        assert_eq!(vouch_of(&[]), (false, UNSURE_FOR));
    }

    fn answer(members: Vec<NodeId>, term: Option<u64>, index: Option<u64>) -> ProbeAnswer {
        ProbeAnswer {
            cluster_id: 9,
            member_id: 2,
            members,
            knows_you: false,
            peers: vec![(1, "http://a:1".into())],
            membership_index: index,
            defragmenting: false,
            membership_term: term,
        }
    }

    #[test]
    fn only_a_membership_at_or_after_the_one_the_asker_applied_vouches() {
        let at = |term, index| answer(vec![1, 2, 7], Some(term), Some(index));
        // The asker applied the membership at index 10, appended in term 3.
        let applied = MembershipAt { term: 3, index: 10 };
        // Added since: a leader it must follow.
        assert!(vouches(&at(3, 12), 9, 7, applied));
        assert!(vouches(&at(5, 11), 9, 7, applied));
        // The asker appended a membership without 7 that was never
        // committed; 7 leads with the membership the asker applied.
        assert!(vouches(&at(3, 10), 9, 7, applied));
        // Listed only by an older membership: removed since.
        assert!(!vouches(&at(3, 9), 9, 7, applied));
        assert!(!vouches(&at(2, 4), 9, 7, applied));
        // A deposed leader's membership, never committed, left on a member
        // that fell behind: at the same index as the one applied, or later,
        // but from an older term.
        assert!(!vouches(&at(2, 10), 9, 7, applied));
        assert!(!vouches(&at(2, 12), 9, 7, applied));
        // Not listed, or another cluster.
        assert!(!vouches(&answer(vec![1, 2], Some(3), Some(12)), 9, 7, applied));
        assert!(!vouches(&at(3, 12), 8, 7, applied));
    }

    #[test]
    fn answers_of_earlier_kvds_are_read_and_this_ones_by_earlier_kvds() {
        let applied = MembershipAt { term: 3, index: 10 };
        let first = || FirstFields {
            cluster_id: 9,
            member_id: 2,
            members: vec![1, 2, 7],
            knows_you: true,
            peers: vec![(1, "http://a:1".into())],
        };
        // The earliest kvd sends the first fields alone.
        let read = ProbeAnswer::decode(&crate::raft::encode(&first()).unwrap()).expect("read");
        assert_eq!((read.cluster_id, read.member_id, &read.members[..], read.knows_you), (9, 2, &[1, 2, 7][..], true));
        assert_eq!(read.peers, first().peers);
        assert_eq!((read.membership_index, read.defragmenting, read.membership_term), (None, false, None));
        // Taken at its word, as before.
        assert!(vouches(&read, 9, 7, applied));

        // The kvd before sends the index and whether it defragments.
        let indexed = |index: u64| crate::raft::encode(&(first(), Some(index), true)).unwrap();
        let read = ProbeAnswer::decode(&indexed(10)).expect("read");
        assert_eq!((read.membership_index, read.defragmenting, read.membership_term), (Some(10), true, None));
        // Compared by its index, as before.
        assert!(vouches(&read, 9, 7, applied));
        assert!(!vouches(&ProbeAnswer::decode(&indexed(9)).expect("read"), 9, 7, applied));

        let now = ProbeAnswer { defragmenting: true, ..answer(vec![1, 2, 7], Some(3), Some(12)) };
        let bytes = crate::raft::encode(&now).unwrap();
        assert_eq!(ProbeAnswer::decode(&bytes).expect("read"), now);
        let (_, index, defragmenting): (FirstFields, Option<u64>, bool) =
            crate::raft::decode(&bytes).expect("the kvd before reads it");
        assert_eq!((index, defragmenting), (Some(12), true));
        let by_earliest: FirstFields = crate::raft::decode(&bytes).expect("the earliest kvd reads it");
        assert_eq!((by_earliest.cluster_id, by_earliest.members), (9, vec![1, 2, 7]));
        assert!(ProbeAnswer::decode(&bytes[..bytes.len() - 24]).is_err(), "cut in the first fields");
        assert!(ProbeAnswer::decode(&bytes[..bytes.len() - 4]).is_err(), "cut in a later field");
        assert!(ProbeAnswer::decode(&[]).is_err(), "empty");
        // A length no answer has: refused, nothing of that size allocated.
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ProbeAnswer::decode(&huge).is_err(), "a list of 2^64 members");
    }
}

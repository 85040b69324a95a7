//! Membership changes: etcd's MemberAdd, MemberRemove, MemberUpdate and
//! MemberPromote, on openraft's learners and joint-consensus changes.
//!
//! Any member takes a change; a follower forwards it to the leader
//! ([`Rpc::Membership`]), which makes one change at a time and checks it as
//! etcd does with `--strict-reconfig-check` (on by default): a change that
//! would leave fewer started or reachable members than the new membership's
//! quorum is refused, with etcd's errors. A learner is promoted only once
//! its log has caught up. A member added gets
//! an id no member has had (made from its peer URL, the cluster and the
//! time), so a member that lost its data and is added again never comes back
//! under its old id; it learns the id at start by finding its peer URL in
//! the membership (`crate::join`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};

use super::peer::ProbeRequest;
use super::Member;
use crate::error::Error;
use crate::raft::leader::{ask_leader, until_leader, Attempt, Forwarded};
use crate::raft::network::Rpc;
use crate::raft::{encode, NodeId};

/// How long the leader waits for each member's answer when it counts the
/// members reachable now.
const REACH_TIMEOUT: Duration = Duration::from_secs(1);

/// How far behind the leader's log a learner may be and still be promoted,
/// as a fraction of the leader's last index (etcd's 90%).
const PROMOTE_READY: f64 = 0.9;

/// A change of the cluster's members.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a member with these peer URLs, as a learner or as a voter.
    Add {
        /// Its peer URLs (kvd takes one).
        peer_urls: Vec<String>,
        /// Whether it joins as a learner.
        learner: bool,
    },
    /// Remove a member.
    Remove {
        /// Its id.
        id: NodeId,
    },
    /// Change a member's peer URLs.
    Update {
        /// Its id.
        id: NodeId,
        /// Its new peer URLs (kvd takes one).
        peer_urls: Vec<String>,
    },
    /// Make a learner a voter.
    Promote {
        /// Its id.
        id: NodeId,
    },
}

/// One member as the membership holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// Its id.
    pub id: NodeId,
    /// Its peer URL.
    pub peer_url: String,
    /// Whether it is a learner.
    pub learner: bool,
}

/// What a membership change came to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipOutcome {
    /// The member added (its new id), or the one the change named.
    pub id: NodeId,
    /// The members once the change was committed.
    pub members: Vec<MemberEntry>,
}

/// A peer URL as members compare them: `scheme://host:port`.
pub fn normalize_peer_url(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return None;
    }
    let host = parsed.host_str()?;
    let port = parsed.port_or_known_default()?;
    let path_ok = parsed.path().is_empty() || parsed.path() == "/";
    (path_ok && parsed.query().is_none()).then(|| format!("{}://{}:{}", parsed.scheme(), host, port))
}

fn one_peer_url(urls: &[String]) -> Result<String, Error> {
    match urls {
        [one] => normalize_peer_url(one).ok_or(Error::MemberBadUrls),
        [] => Err(Error::MemberBadUrls),
        many => Err(Error::OnePeerUrl(many.len())),
    }
}

/// A member id that no member of `taken` has, made from the peer URL, the
/// cluster and the time (as etcd makes the ids of members it adds).
fn fresh_id(peer_url: &str, cluster_id: u64, taken: &BTreeSet<NodeId>) -> NodeId {
    let mut nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    loop {
        let seed = format!("{peer_url}/{cluster_id:x}/{nanos}");
        let id = crate::config::member_id(&seed, "member-add");
        if !taken.contains(&id) {
            return id;
        }
        nanos += 1;
    }
}

fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

impl Member {
    /// The members as this member's Raft knows them.
    pub fn member_entries(&self) -> Vec<MemberEntry> {
        let metrics = self.raft.metrics().borrow().clone();
        entries_of(metrics.membership_config.membership())
    }

    /// Records, once, that a membership this member applied lists it (see
    /// [`Member::removed`]); ends then, or when Raft stops.
    pub async fn record_when_listed(self: std::sync::Arc<Self>) {
        let mut metrics = self.raft.metrics();
        loop {
            let listed = {
                let m = metrics.borrow_and_update();
                let stored = &m.membership_config;
                stored.membership().nodes().any(|(id, _)| *id == self.id)
                    && stored.log_id().map(|l| l.index) <= m.last_applied.map(|l| l.index)
            };
            if listed {
                self.note_listed();
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    fn note_listed(&self) {
        if !self.listed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = self.state.note_listed() {
                tracing::warn!("recording that the membership lists this member: {e}");
            }
        }
    }

    /// Why this member must stop, if it was removed from the cluster: the
    /// membership it applied leaves it out, or most of the members it
    /// knows answer that it is not a member (it was removed while it was
    /// down or cut off, and never got the entry that says so).
    pub fn removed(&self) -> Option<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let stored = &metrics.membership_config;
        let membership = stored.membership();
        // Before it knows any membership, a member was removed from nothing.
        membership.nodes().next()?;
        let listed = membership.nodes().any(|(id, _)| *id == self.id);
        let applied = stored.log_id().map(|l| l.index) <= metrics.last_applied.map(|l| l.index);
        if listed && applied {
            self.note_listed();
        }
        // A member that joins replays the memberships from before it was
        // added; only one that was listed can have been removed.
        if !listed && applied && self.listed.load(std::sync::atomic::Ordering::Relaxed) {
            return Some("the member has been permanently removed from the cluster".into());
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let disowned = self.network.disowned_by();
        let by: Vec<String> =
            voters.iter().filter(|v| **v != self.id && disowned.contains(v)).map(|v| format!("{v:x}")).collect();
        (listed && by.len() >= quorum(voters.len())).then(|| {
            format!(
                "the member has been permanently removed from the cluster (members {} answer that it is not a member)",
                by.join(", ")
            )
        })
    }

    /// Makes a membership change, through the leader, and waits until this
    /// member knows the membership it led to.
    pub async fn change_members(&self, change: MembershipChange) -> Result<MembershipOutcome, Error> {
        let deadline = Instant::now() + self.request_timeout;
        let payload = encode(&change)?;
        let outcome = until_leader(&self.raft, deadline, || {
            let (change, payload) = (change.clone(), payload.clone());
            async move {
                match self.leader() {
                    None => Attempt::Retry { stale: None },
                    Some(leader) if leader == self.id => self.serve_membership(change).await.into(),
                    Some(leader) => {
                        let asked = ask_leader::<Forwarded<MembershipOutcome>>(
                            &self.raft,
                            &self.network,
                            leader,
                            Rpc::Membership,
                            payload,
                            deadline,
                        );
                        match asked.await {
                            Ok(Some(answer)) => answer.into(),
                            Ok(None) => Attempt::Retry { stale: Some(leader) },
                            Err(e) => Attempt::Answered(Err(e)),
                        }
                    }
                }
            }
        })
        .await?;
        // Answer with what this member serves from now on.
        let wanted: BTreeSet<NodeId> = outcome.members.iter().map(|m| m.id).collect();
        let _ = self
            .raft
            .wait(Some(deadline.saturating_duration_since(Instant::now())))
            .metrics(
                |m| m.membership_config.membership().nodes().map(|(id, _)| *id).collect::<BTreeSet<_>>() == wanted,
                "membership",
            )
            .await;
        Ok(outcome)
    }

    /// Makes a membership change as leader (see the module's text).
    pub async fn serve_membership(&self, change: MembershipChange) -> Forwarded<MembershipOutcome> {
        let leader = self.leader();
        if leader != Some(self.id) {
            return Forwarded::NotLeader(leader);
        }
        let _one_at_a_time = self.membership_lock.lock().await;
        match self.apply_change(change).await {
            Ok(outcome) => Forwarded::Done(outcome),
            Err(ChangeFailed::NotLeader(l)) => Forwarded::NotLeader(l),
            Err(ChangeFailed::Refused(e)) => Forwarded::Failed(e),
        }
    }

    async fn apply_change(&self, change: MembershipChange) -> Result<MembershipOutcome, ChangeFailed> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let nodes: BTreeMap<NodeId, BasicNode> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = nodes.keys().copied().filter(|id| !voters.contains(id)).collect();
        let url_taken = |url: &str, except: Option<NodeId>| {
            nodes.iter().any(|(id, n)| Some(*id) != except && normalize_peer_url(&n.addr).as_deref() == Some(url))
        };
        let (id, changes) = match change {
            MembershipChange::Add { peer_urls, learner } => {
                let url = one_peer_url(&peer_urls)?;
                if url_taken(&url, None) {
                    return Err(Error::PeerUrlExists.into());
                }
                if learner && !learners.is_empty() {
                    return Err(Error::TooManyLearners.into());
                }
                if !learner && self.strict_reconfig_check {
                    // etcd's IsReadyToAddVotingMember: a quorum of the new
                    // voters must have started, but one member may always
                    // add a second (the restore path); and every voter must
                    // be reachable now.
                    let started = self.started(&voters);
                    let one_to_two = voters.len() == 1 && started == 1;
                    if !one_to_two && started < quorum(voters.len() + 1) {
                        return Err(Error::NotEnoughStarted.into());
                    }
                    if self.reachable(&nodes, &voters).await.len() < voters.len() {
                        return Err(Error::Unhealthy.into());
                    }
                }
                let taken: BTreeSet<NodeId> = nodes.keys().copied().collect();
                let id = fresh_id(&url, self.cluster_id, &taken);
                let node = BasicNode::new(url);
                let changes = match learner {
                    true => ChangeMembers::AddNodes(BTreeMap::from([(id, node)])),
                    false => ChangeMembers::AddVoters(BTreeMap::from([(id, node)])),
                };
                (id, changes)
            }
            MembershipChange::Remove { id } => {
                if !nodes.contains_key(&id) {
                    return Err(Error::MemberNotFound.into());
                }
                if id == self.id && voters.len() > 1 {
                    // The leader removes itself: it hands leadership over
                    // first (clients see no election), and the new leader
                    // makes the change when it is asked again.
                    if let Some(successor) = self.best_successor() {
                        match self.transfer_leadership(successor).await {
                            Ok(()) => return Err(ChangeFailed::NotLeader(Some(successor))),
                            Err(e) => tracing::warn!("handing over leadership before removing this leader: {e}"),
                        }
                    }
                }
                if voters.contains(&id) {
                    if self.strict_reconfig_check {
                        // etcd's mayRemoveMember: a quorum of the voters left
                        // must have started; a voter that is unreachable may
                        // go; else the voters reachable now, less the one
                        // removed, must be a quorum of those left.
                        let left: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
                        if left.is_empty() || self.started(&left) < quorum(left.len()) {
                            return Err(Error::NotEnoughStarted.into());
                        }
                        let reachable = self.reachable(&nodes, &voters).await;
                        if reachable.contains(&id) && reachable.len() - 1 < quorum(left.len()) {
                            return Err(Error::Unhealthy.into());
                        }
                    }
                    (id, ChangeMembers::RemoveVoters(BTreeSet::from([id])))
                } else {
                    (id, ChangeMembers::RemoveNodes(BTreeSet::from([id])))
                }
            }
            MembershipChange::Update { id, peer_urls } => {
                if !nodes.contains_key(&id) {
                    return Err(Error::MemberNotFound.into());
                }
                let url = one_peer_url(&peer_urls)?;
                if url_taken(&url, Some(id)) {
                    return Err(Error::PeerUrlExists.into());
                }
                (id, ChangeMembers::SetNodes(BTreeMap::from([(id, BasicNode::new(url))])))
            }
            MembershipChange::Promote { id } => {
                if !nodes.contains_key(&id) {
                    return Err(Error::MemberNotFound.into());
                }
                if voters.contains(&id) {
                    return Err(Error::MemberNotLearner.into());
                }
                let last = metrics.last_log_index.unwrap_or(0);
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map_or(0, |log_id| log_id.index);
                if (matched as f64) < (last as f64) * PROMOTE_READY {
                    return Err(Error::LearnerNotReady.into());
                }
                // etcd's IsReadyToPromoteMember: the learner counts as
                // started; a quorum of the voters it joins must have.
                if self.strict_reconfig_check && self.started(&voters) + 1 < quorum(voters.len() + 1) {
                    return Err(Error::NotEnoughStarted.into());
                }
                (id, ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            }
        };
        tracing::info!(member = %format!("{id:x}"), ?changes, "membership change");
        if let (ChangeMembers::AddVoters(added), 1) = (&changes, voters.len()) {
            if let Some(node) = added.get(&id) {
                // A second voter for a one-member cluster (etcd's restore
                // path): its joint configuration cannot commit until the new
                // member runs, so it is made a learner now and a voter once
                // it has started and caught up, and the answer does not wait
                // for that. Until then the cluster has no quorum, as etcd's.
                let added = self.raft.add_learner(id, node.clone(), false).await.map_err(ChangeFailed::from)?;
                let raft = self.raft.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await
                    {
                        tracing::warn!(member = %format!("{id:x}"), "making the second member a voter: {e}");
                    }
                });
                let mut members = self.entries_after(&added);
                members.iter_mut().filter(|m| m.id == id).for_each(|m| m.learner = false);
                return Ok(MembershipOutcome { id, members });
            }
        }
        let intent = Intent::of(&changes);
        let failed = match self.raft.change_membership(changes, false).await {
            Ok(changed) => return Ok(MembershipOutcome { id, members: self.entries_after(&changed) }),
            Err(e) => ChangeFailed::from(e),
        };
        // A change of voters takes two entries: the joint configuration,
        // then the new one. Leadership lost between them leaves the first
        // committed: the change holds (the next leader finishes it, see
        // `finish_joint_changes`), and asking the next leader again would
        // answer "Peer URLs already exists" or "member not found".
        if let (ChangeFailed::NotLeader(_), Some(intent)) = (&failed, intent) {
            let metrics = self.raft.metrics().borrow().clone();
            if let Some(members) = committed_joint(&metrics.membership_config, metrics.last_applied, id, intent) {
                tracing::info!(member = %format!("{id:x}"), "membership change committed in its joint configuration before leadership moved");
                return Ok(MembershipOutcome { id, members });
            }
        }
        Err(failed)
    }

    /// Leaves a joint configuration that no change is finishing: its
    /// leader lost leadership, or stopped, between the change's two entries.
    /// Runs on every member and acts while it leads, once the same committed
    /// joint configuration has stayed for an election timeout (a change
    /// under way writes its second entry at once). Ends when the member
    /// stops.
    pub async fn finish_joint_changes(self: std::sync::Arc<Self>) {
        let mut seen = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.election) => {}
                () = self.stopped() => return,
            }
            let pending = self.unfinished_joint();
            match pending {
                Some((log_id, voters)) if seen == Some(log_id) => {
                    let _one_at_a_time = self.membership_lock.lock().await;
                    if self.unfinished_joint().map(|(l, _)| l) == Some(log_id) {
                        tracing::info!(?voters, "finishing a membership change left in its joint configuration");
                        if let Err(e) =
                            self.raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), false).await
                        {
                            tracing::warn!("finishing a membership change left in its joint configuration: {e}");
                        }
                    }
                    seen = None;
                }
                other => seen = other.map(|(l, _)| l),
            }
        }
    }

    /// The committed joint configuration this leader is in, if any: its
    /// log id and the voters it leads to.
    fn unfinished_joint(&self) -> Option<(crate::raft::LogId, BTreeSet<NodeId>)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.current_leader != Some(self.id) || !m.state.is_leader() {
            return None;
        }
        let stored = &m.membership_config;
        let configs = stored.membership().get_joint_config();
        let log_id = (*stored.log_id())?;
        let committed = m.last_applied.is_some_and(|a| a.index >= log_id.index);
        (configs.len() > 1 && committed).then(|| (log_id, configs.last().cloned().unwrap_or_default()))
    }

    /// The members as a change left them: from the change's own answer, as
    /// the metrics may not show it yet.
    fn entries_after(
        &self,
        written: &openraft::raft::ClientWriteResponse<crate::raft::TypeConfig>,
    ) -> Vec<MemberEntry> {
        written.membership.as_ref().map_or_else(|| self.member_entries(), entries_of)
    }

    /// How many of `which` have started: published their name and client
    /// URLs, as etcd counts started members.
    fn started(&self, which: &BTreeSet<NodeId>) -> usize {
        let state = self.state.read();
        which.iter().filter(|id| state.attrs.contains_key(id)).count()
    }

    /// The members of `which` that answer a probe within [`REACH_TIMEOUT`];
    /// this member always counts.
    async fn reachable(&self, nodes: &BTreeMap<NodeId, BasicNode>, which: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        let request = ProbeRequest { cluster_id: self.cluster_id, from: self.id };
        let Ok(payload) = encode(&request) else { return BTreeSet::from([self.id]) };
        let asks = which.iter().filter(|id| **id != self.id).filter_map(|id| {
            let node = nodes.get(id)?;
            let payload = payload.clone();
            Some(async move {
                let answered = self.network.call(*id, &node.addr, Rpc::Probe, payload, REACH_TIMEOUT).await.is_ok();
                answered.then_some(*id)
            })
        });
        let mut reachable: BTreeSet<NodeId> = futures::future::join_all(asks).await.into_iter().flatten().collect();
        reachable.insert(self.id);
        reachable
    }
}

/// What a change of voters asked for: member `id` to be among the voters
/// afterwards, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    /// Added as a voter, or promoted.
    Voter,
    /// Removed.
    Gone,
}

impl Intent {
    /// The intent of a change that takes a joint configuration, if it is one.
    fn of(changes: &ChangeMembers<NodeId, BasicNode>) -> Option<Intent> {
        match changes {
            ChangeMembers::AddVoters(_) | ChangeMembers::AddVoterIds(_) => Some(Intent::Voter),
            ChangeMembers::RemoveVoters(_) => Some(Intent::Gone),
            _ => None,
        }
    }
}

/// The members a change of member `id` leads to, when `stored` is a
/// committed joint configuration (applied by `applied`) whose new half made
/// that change.
fn committed_joint(
    stored: &openraft::StoredMembership<NodeId, BasicNode>,
    applied: Option<crate::raft::LogId>,
    id: NodeId,
    intent: Intent,
) -> Option<Vec<MemberEntry>> {
    let log_id = (*stored.log_id())?;
    if applied.is_none_or(|a| a.index < log_id.index) {
        return None;
    }
    let [old, new] = stored.membership().get_joint_config().as_slice() else { return None };
    let made = match intent {
        Intent::Voter => !old.contains(&id) && new.contains(&id),
        Intent::Gone => old.contains(&id) && !new.contains(&id),
    };
    // Voters the change removed leave the membership (changes are made
    // without keeping them as learners).
    made.then(|| {
        let nodes: BTreeMap<NodeId, BasicNode> = stored
            .membership()
            .nodes()
            .filter(|(n, _)| new.contains(n) || !old.contains(n))
            .map(|(n, node)| (*n, node.clone()))
            .collect();
        entries_of(&openraft::Membership::new(vec![new.clone()], nodes))
    })
}

/// The members a membership lists, learners marked.
fn entries_of(membership: &openraft::Membership<NodeId, BasicNode>) -> Vec<MemberEntry> {
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, n)| MemberEntry { id: *id, peer_url: n.addr.clone(), learner: !voters.contains(id) })
        .collect()
}

/// Why the leader did not make a change.
enum ChangeFailed {
    /// It is not the leader (any more).
    NotLeader(Option<NodeId>),
    /// The change was refused or failed.
    Refused(Error),
}

impl From<Error> for ChangeFailed {
    fn from(e: Error) -> Self {
        ChangeFailed::Refused(e)
    }
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> for ChangeFailed {
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Self {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ChangeFailed::NotLeader(f.leader_id),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_))) => {
                ChangeFailed::Refused(Error::MembershipChangeInProgress)
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::LearnerNotFound(_))) => {
                ChangeFailed::Refused(Error::MemberNotFound)
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ChangeFailed::Refused(Error::internal(e))
            }
            RaftError::Fatal(e) => ChangeFailed::Refused(Error::internal(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_joint_configuration_answers_for_the_change_it_makes() {
        use openraft::testing::log_id;
        let node = |n: u64| (n, BasicNode::new(format!("http://h{n}:2380")));
        let ids = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        // Adding voter 4 to 1, 2, 3 (with learner 9 alongside).
        let add = openraft::Membership::new(
            vec![ids(&[1, 2, 3]), ids(&[1, 2, 3, 4])],
            BTreeMap::from([node(1), node(2), node(3), node(4), node(9)]),
        );
        let stored = openraft::StoredMembership::new(Some(log_id(2, 1, 10)), add);
        let members = committed_joint(&stored, Some(log_id(2, 1, 10)), 4, Intent::Voter).expect("the change holds");
        let listed: Vec<(u64, bool)> = members.iter().map(|m| (m.id, m.learner)).collect();
        assert_eq!(listed, vec![(1, false), (2, false), (3, false), (4, false), (9, true)]);
        // Not applied yet: not known to be committed.
        assert_eq!(committed_joint(&stored, Some(log_id(2, 1, 9)), 4, Intent::Voter), None);
        assert_eq!(committed_joint(&stored, None, 4, Intent::Voter), None);
        // Another change's joint configuration does not answer for this one.
        assert_eq!(committed_joint(&stored, Some(log_id(2, 1, 10)), 5, Intent::Voter), None);
        assert_eq!(committed_joint(&stored, Some(log_id(2, 1, 10)), 3, Intent::Gone), None);

        // Removing voter 3: it leaves the membership.
        let remove =
            openraft::Membership::new(vec![ids(&[1, 2, 3]), ids(&[1, 2])], BTreeMap::from([node(1), node(2), node(3)]));
        let stored = openraft::StoredMembership::new(Some(log_id(2, 1, 12)), remove);
        let members = committed_joint(&stored, Some(log_id(2, 1, 14)), 3, Intent::Gone).expect("the change holds");
        assert_eq!(members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(committed_joint(&stored, Some(log_id(2, 1, 14)), 3, Intent::Voter), None);

        // A uniform configuration is no joint one.
        let uniform = openraft::Membership::new(vec![ids(&[1, 2])], BTreeMap::from([node(1), node(2)]));
        let stored = openraft::StoredMembership::new(Some(log_id(2, 1, 15)), uniform);
        assert_eq!(committed_joint(&stored, Some(log_id(2, 1, 15)), 2, Intent::Voter), None);
    }

    #[test]
    fn only_changes_of_voters_take_a_joint_configuration() {
        let one = |n: u64| BTreeMap::from([(n, BasicNode::new("http://h:2380"))]);
        assert_eq!(Intent::of(&ChangeMembers::AddVoters(one(4))), Some(Intent::Voter));
        assert_eq!(Intent::of(&ChangeMembers::AddVoterIds(BTreeSet::from([4]))), Some(Intent::Voter));
        assert_eq!(Intent::of(&ChangeMembers::RemoveVoters(BTreeSet::from([4]))), Some(Intent::Gone));
        assert_eq!(Intent::of(&ChangeMembers::AddNodes(one(4))), None);
        assert_eq!(Intent::of(&ChangeMembers::RemoveNodes(BTreeSet::from([4]))), None);
        assert_eq!(Intent::of(&ChangeMembers::SetNodes(one(4))), None);
    }

    #[test]
    fn peer_urls_compare_by_scheme_host_and_port() {
        assert_eq!(normalize_peer_url("http://127.0.0.1:2380").as_deref(), Some("http://127.0.0.1:2380"));
        assert_eq!(normalize_peer_url(" http://127.0.0.1:2380/ ").as_deref(), Some("http://127.0.0.1:2380"));
        assert_eq!(normalize_peer_url("https://h1").as_deref(), Some("https://h1:443"));
        for bad in ["", "127.0.0.1:2380", "unix:///x", "http://h:2380/path", "http://h:99999"] {
            assert_eq!(normalize_peer_url(bad), None, "{bad:?}");
        }
        assert!(matches!(one_peer_url(&[]), Err(Error::MemberBadUrls)));
        assert!(matches!(one_peer_url(&["a".into(), "b".into()]), Err(Error::OnePeerUrl(2))));
    }

    #[test]
    fn added_members_get_ids_no_member_had() {
        let taken = BTreeSet::new();
        let a = fresh_id("http://10.0.0.4:2380", 7, &taken);
        let b = fresh_id("http://10.0.0.4:2380", 7, &BTreeSet::from([a]));
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}

//! Handing leadership to another member: etcd's MoveLeader, and what a
//! leader does before it shuts down.
//!
//! The leader also hands over before it removes itself from the cluster
//! (`crate::node::membership`).
//!
//! openraft 0.9 has no leadership transfer, and a member refuses to vote
//! while it heard from a leader within the leader lease (the longest
//! election timeout). So the leader waits until the chosen member's log has
//! caught up with its own, then stops sending to every other member; once
//! their leases have run out it asks the chosen member to campaign, which
//! wins at once (its log is the most complete), well before any other
//! member's own election timer fires. Clients see no leader for about one
//! leader lease (two thirds of `--election-timeout`) and a round trip,
//! against an election timeout and a campaign after a leader fails.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::Member;
use crate::error::Error;
use crate::raft::leader::Forwarded;
use crate::raft::network::Rpc;
use crate::raft::NodeId;

/// How long past the leader lease the leader waits before the chosen member
/// campaigns: the other members' leases must have run out by then.
const LEASE_MARGIN: Duration = Duration::from_millis(20);

impl Member {
    /// Hands leadership to voter `target` (etcd's MoveLeader); answered by
    /// the leader only. Waits until `target` leads, up to the request
    /// timeout.
    pub async fn move_leader(&self, target: NodeId) -> Result<(), Error> {
        if self.leader() != Some(self.id) {
            return Err(Error::NotLeader);
        }
        let voters: BTreeSet<NodeId> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if !voters.contains(&target) {
            return Err(Error::BadLeaderTransferee);
        }
        if target == self.id {
            return Ok(());
        }
        // No membership change while leadership moves.
        let _one_at_a_time = self.membership_lock.lock().await;
        self.transfer_leadership(target).await
    }

    /// Hands leadership to `target` (a voter other than this leader) while
    /// the caller holds the membership lock.
    pub(super) async fn transfer_leadership(&self, target: NodeId) -> Result<(), Error> {
        let deadline = Instant::now() + self.request_timeout;
        self.await_caught_up(target, deadline).await?;
        let others: Vec<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.id && *id != target)
            .collect();
        self.network.silence(&others);
        let moved = self.hand_over(target, deadline).await;
        self.network.unsilence();
        moved
    }

    /// Waits until `target` has every entry this leader has.
    async fn await_caught_up(&self, target: NodeId, deadline: Instant) -> Result<(), Error> {
        let caught_up = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
            let matched = m.replication.as_ref().and_then(|r| r.get(&target).cloned().flatten()).map(|l| l.index);
            matched.is_some() && matched >= m.last_log_index
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(wait))
            .metrics(caught_up, "the new leader catches up")
            .await
            .map(drop)
            .map_err(|_| Error::LeaderTransferTimeout)
    }

    /// With the other members silenced: waits out their leases, has
    /// `target` campaign, and waits until it leads.
    async fn hand_over(&self, target: NodeId, deadline: Instant) -> Result<(), Error> {
        let lease = Duration::from_millis(self.raft.config().election_timeout_max);
        tokio::time::sleep(lease + LEASE_MARGIN).await;
        let node = self.raft.metrics().borrow().membership_config.membership().get_node(&target).cloned();
        let node = node.ok_or(Error::BadLeaderTransferee)?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let asked = self.network.call(target, &node.addr, Rpc::Campaign, Vec::new(), timeout).await;
        match asked.map(|bytes| crate::raft::decode::<Forwarded<()>>(&bytes)) {
            Ok(Ok(Forwarded::Done(()))) => {}
            Ok(Ok(Forwarded::Failed(e))) => return Err(e),
            other => {
                tracing::warn!(target = %format!("{target:x}"), "asking the new leader to campaign: {other:?}");
                return Err(Error::LeaderTransferTimeout);
            }
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(wait))
            .metrics(|m| m.current_leader == Some(target), "the new leader")
            .await
            .map(drop)
            .map_err(|_| Error::LeaderTransferTimeout)
    }

    /// Campaigns now, when the leader `from` asks (it hands over its
    /// leadership to this member).
    pub async fn serve_campaign(&self, from: NodeId) -> Forwarded<()> {
        if self.leader() != Some(from) {
            return Forwarded::Failed(Error::NotLeader);
        }
        tracing::info!(leader = %format!("{from:x}"), "campaigning: the leader hands over its leadership");
        match self.raft.trigger().elect().await {
            Ok(()) => Forwarded::Done(()),
            Err(e) => Forwarded::Failed(Error::internal(e)),
        }
    }

    /// The voter other than this leader whose log is the most complete.
    pub(super) fn best_successor(&self) -> Option<NodeId> {
        let metrics = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        metrics
            .replication
            .as_ref()
            .into_iter()
            .flatten()
            .filter(|(id, _)| voters.contains(id) && **id != self.id)
            .max_by_key(|(_, matched)| matched.map(|l| l.index))
            .map(|(id, _)| *id)
    }

    /// Before this leader shuts down: hands leadership to the voter whose
    /// log is the most complete, so that clients see no election timeout.
    /// Gives up after `within`.
    pub async fn step_down(&self, within: Duration) {
        if self.leader() != Some(self.id) {
            return;
        }
        let Some(target) = self.best_successor() else { return };
        match tokio::time::timeout(within, self.move_leader(target)).await {
            Ok(Ok(())) => tracing::info!(to = %format!("{target:x}"), "handed over leadership before stopping"),
            Ok(Err(e)) => tracing::warn!("could not hand over leadership before stopping: {e}"),
            Err(_) => {
                self.network.unsilence();
                tracing::warn!("could not hand over leadership within {within:?} before stopping")
            }
        }
    }
}

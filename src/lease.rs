//! Lease deadlines. Which leases exist, and with which keys, is replicated
//! state (in the MVCC store). When a lease expires is not: the leader alone
//! keeps a deadline per lease on its monotonic clock, extends it on each
//! keep-alive, and revokes an expired lease by proposing its revocation
//! through Raft like any write.
//!
//! Deadlines belong to one leader term. A member that becomes leader starts
//! every lease's countdown afresh (its full TTL from the moment it first sees
//! the lease as leader), so a lease never expires early because leadership
//! moved: the old leader's keep-alives are forgotten, never its grace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::Error;
use crate::node::{Forwarded, Node};
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveResponse,
};
use crate::proto::kvdpb::{command, command_result};
use crate::raft::encode;
use crate::raft::network::Rpc;

/// The largest TTL a lease may be granted with, as in etcd.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// How often the leader looks for expired leases.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// How long the leader waits for a revocation it proposed before proposing it
/// again.
const REVOKE_RETRY: Duration = Duration::from_secs(2);

/// A lease question only the leader can answer, sent by a follower.
#[derive(Debug, Serialize, Deserialize)]
pub enum LeaseCall {
    /// Extend the lease's deadline by its TTL; answers the TTL (0 if the lease
    /// does not exist).
    Renew(i64),
    /// How long the lease has left.
    TimeToLive {
        /// The lease.
        id: i64,
        /// Whether to list its keys.
        keys: bool,
    },
}

/// The leader's answer to a [`LeaseCall`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// Seconds left (renew: the TTL it was extended by); -1 or 0 if the lease
    /// does not exist, as etcd reports for each call.
    pub ttl: i64,
    /// The TTL the lease was granted with.
    pub granted_ttl: i64,
    /// Its keys, when asked for.
    pub keys: Vec<Vec<u8>>,
}

/// The leader's lease deadlines.
#[derive(Default)]
pub struct Lessor {
    inner: Mutex<Deadlines>,
}

#[derive(Default)]
struct Deadlines {
    /// The leader term the deadlines belong to.
    term: Option<u64>,
    due: HashMap<i64, Instant>,
    /// Revocations proposed, and when.
    revoking: HashMap<i64, Instant>,
}

impl Lessor {
    fn lock(&self) -> std::sync::MutexGuard<'_, Deadlines> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The deadlines of `term`, started afresh if they belonged to another.
    fn for_term(&self, term: u64) -> std::sync::MutexGuard<'_, Deadlines> {
        let mut d = self.lock();
        if d.term != Some(term) {
            *d = Deadlines { term: Some(term), ..Default::default() };
        }
        d
    }

    fn forget(&self) {
        let mut d = self.lock();
        if d.term.is_some() {
            *d = Deadlines::default();
        }
    }
}

impl Node {
    /// The term in which this member leads, if it does.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.current_leader == Some(self.id) && m.state.is_leader()).then_some(m.current_term)
    }

    /// Grants a lease (LeaseGrant).
    pub async fn lease_grant(&self, req: LeaseGrantRequest) -> Result<LeaseGrantResponse, Error> {
        if req.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        let id = if req.id == 0 { rand::thread_rng().gen_range(1..=i64::MAX) } else { req.id };
        // As etcd, a TTL below the minimum (one and a half election
        // timeouts, in whole seconds) is raised to it.
        let ttl = req.ttl.max(self.min_lease_ttl);
        match self.propose(command::Op::LeaseGrant(LeaseGrantRequest { ttl, id })).await? {
            command_result::Result::LeaseGrant(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::internal("unexpected command result")),
        }
    }

    /// Revokes a lease and deletes its keys (LeaseRevoke).
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        match self.propose(command::Op::LeaseRevoke(LeaseRevokeRequest { id })).await? {
            command_result::Result::LeaseRevoke(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::internal("unexpected command result")),
        }
    }

    /// Extends a lease by its TTL; returns the TTL, or 0 if the lease does not
    /// exist. Asks the leader when this member is not it.
    pub async fn lease_renew(&self, id: i64) -> Result<i64, Error> {
        Ok(self.lease_call(LeaseCall::Renew(id)).await?.ttl)
    }

    /// How long a lease has left (LeaseTimeToLive).
    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLiveResponse, Error> {
        let a = self.lease_call(LeaseCall::TimeToLive { id, keys }).await?;
        let mut resp =
            LeaseTimeToLiveResponse { header: None, id, ttl: a.ttl, granted_ttl: a.granted_ttl, keys: a.keys };
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Answers `call` here when this member leads, else asks the leader,
    /// retrying across leader changes until the request timeout.
    async fn lease_call(&self, call: LeaseCall) -> Result<LeaseAnswer, Error> {
        let deadline = Instant::now() + self.request_timeout;
        let payload = encode(&call)?;
        loop {
            let leader = self.leader();
            let answer = if leader == Some(self.id) {
                Some(self.serve_lease(crate::raft::decode(&payload)?).await)
            } else if let Some(leader) = leader {
                match self.ask_leader::<LeaseAnswer>(leader, Rpc::Lease, payload.clone(), deadline).await {
                    Ok(a) => a,
                    Err(Error::Timeout) => None,
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            match answer {
                Some(Forwarded::Done(a)) => return Ok(a),
                Some(Forwarded::Failed(e)) => return Err(e),
                Some(Forwarded::NotLeader(_)) | None => {}
            }
            if Instant::now() >= deadline {
                return Err(if self.leader().is_some() { Error::Timeout } else { Error::NoLeader });
            }
            self.await_leader(leader, deadline).await;
        }
    }

    /// Answers a lease call as the leader: confirms leadership and catches up
    /// with every committed write first (so a lease granted just before is
    /// known), then reads or extends the deadline.
    pub async fn serve_lease(&self, call: LeaseCall) -> Forwarded<LeaseAnswer> {
        let Some(term) = self.leading_term() else { return Forwarded::NotLeader(self.leader()) };
        // The read index of reads, with the floor of a leadership restored
        // at start: a restarted leader has applied only what it had before
        // the restart, and a revocation committed just before it would
        // otherwise let a keep-alive answer "alive" for a lease that is gone.
        match self.reads.leader_read_index().await {
            Ok(read) => {
                let deadline = Instant::now() + self.request_timeout;
                if let Err(e) = self.await_applied(read, deadline).await {
                    return Forwarded::Failed(e);
                }
            }
            Err(_) => return Forwarded::NotLeader(self.leader()),
        }
        if self.leading_term() != Some(term) {
            return Forwarded::NotLeader(self.leader());
        }
        let state = self.state.read();
        let now = Instant::now();
        let mut d = self.lessor.for_term(term);
        match call {
            LeaseCall::Renew(id) => {
                let Some(lease) = state.store.lease(id) else { return Forwarded::Done(LeaseAnswer::default()) };
                // An expired lease is being revoked (or is about to be, at
                // the next tick); renewing it now would answer "alive" for a
                // lease whose revocation may apply a moment later. It is
                // gone, as etcd answers.
                let expired = d.due.get(&id).is_some_and(|due| *due <= now) || d.revoking.contains_key(&id);
                if expired {
                    return Forwarded::Done(LeaseAnswer::default());
                }
                d.due.insert(id, now + secs(lease.ttl));
                Forwarded::Done(LeaseAnswer { ttl: lease.ttl, granted_ttl: lease.ttl, keys: Vec::new() })
            }
            LeaseCall::TimeToLive { id, keys } => {
                let Some(lease) = state.store.lease(id) else {
                    return Forwarded::Done(LeaseAnswer { ttl: -1, ..Default::default() });
                };
                let due = *d.due.entry(id).or_insert(now + secs(lease.ttl));
                let left = due.saturating_duration_since(now);
                Forwarded::Done(LeaseAnswer {
                    ttl: left.as_secs() as i64,
                    granted_ttl: lease.ttl,
                    keys: if keys { lease.keys.iter().cloned().collect() } else { Vec::new() },
                })
            }
        }
    }

    /// One pass of the leader's expiry check: proposes the revocation of
    /// every lease past its deadline. Followers forget their deadlines.
    fn expire_leases(self: &Arc<Self>) {
        let Some(term) = self.leading_term() else {
            self.lessor.forget();
            return;
        };
        let now = Instant::now();
        let expired: Vec<i64> = {
            let state = self.state.read();
            let mut d = self.lessor.for_term(term);
            let leases = state.store.leases();
            d.due.retain(|id, _| leases.contains_key(id));
            d.revoking.retain(|id, at| leases.contains_key(id) && now.duration_since(*at) < REVOKE_RETRY);
            let mut expired = Vec::new();
            for (id, lease) in leases {
                let due = *d.due.entry(*id).or_insert(now + secs(lease.ttl));
                if due <= now && !d.revoking.contains_key(id) {
                    expired.push(*id);
                }
            }
            for id in &expired {
                d.revoking.insert(*id, now);
            }
            expired
        };
        for id in expired {
            let node = self.clone();
            tokio::spawn(async move {
                // Only through this member's own log: if it was deposed
                // meanwhile (paused, cut off), its deadlines are stale and the
                // new leader, which restarted every countdown, decides.
                // Forwarding the revocation would cut short a lease the new
                // leader is keeping alive.
                let revoke = command::Op::LeaseRevoke(LeaseRevokeRequest { id });
                match node.propose_here(revoke).await.map(|_| ()) {
                    Ok(_) => tracing::info!(lease = format!("{id:x}"), "lease expired and was revoked"),
                    Err(Error::LeaseNotFound) => {}
                    Err(e) => tracing::warn!(lease = format!("{id:x}"), "revoking an expired lease failed: {e}"),
                }
            });
        }
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

/// Runs the leader's lease expiry check until `stop` turns true.
pub async fn run_expiry(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => node.expire_leases(),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The smallest TTL a lease gets: one and a half election timeouts, rounded up
/// to whole seconds, as etcd computes it.
pub fn min_lease_ttl(election: Duration) -> i64 {
    let ms = election.as_millis() as i64 * 3 / 2;
    (ms + 999) / 1000
}

//! The lease API of a member. Grants and revocations are replicated writes;
//! keep-alives and time-to-live questions are answered by the leader alone,
//! from the deadlines it keeps (see [`crate::lease`]), and a follower asks
//! the leader for them. The leader's expiry task revokes what has expired.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::Member;
use crate::error::Error;
use crate::lease::{LeaseAnswer, LeaseCall, MAX_LEASE_TTL, MAX_RENEWALS};
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveResponse,
};
use crate::proto::kvdpb::{command, LeaseExpire};
use crate::raft::encode;
use crate::raft::gather::{Limits, Queued};
use crate::raft::leader::{ask_leader, idempotent_attempt, until_leader, Attempt, Forwarded};
use crate::raft::network::Rpc;

/// How often the leader looks for expired leases.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// Revocations of expired leases the leader has under way at once. When
/// more leases expire together, the rest wait until these have applied: a
/// task and a proposal for each of 100,000 leases expiring together took
/// the members from about 100 MB to 250-490 MB.
pub const MAX_REVOKING: usize = 1024;

/// Renewal batches a member has under way at once. A keep-alive goes at
/// once while fewer are; otherwise it waits, with every other stream's, for
/// the next batch, so that under load a member makes a few renewal rounds
/// at a time, whatever the number of streams and leases, instead of one per
/// keep-alive.
const RENEWAL_LIMITS: Limits = Limits { in_flight: 4, items: MAX_RENEWALS, bytes: usize::MAX };
/// Keep-alives waiting for a batch; past this, keep-alives wait their turn.
const RENEWALS_QUEUED: usize = RENEWAL_LIMITS.in_flight * MAX_RENEWALS;

/// A keep-alive waiting for its batch, and where its lease's TTL (0 if the
/// lease is gone), or why the leader could not be asked, goes.
pub struct Renewal {
    id: i64,
    done: oneshot::Sender<Result<i64, Error>>,
}

/// Every keep-alive may join any batch.
impl Queued for Renewal {
    fn size(&self) -> usize {
        std::mem::size_of::<i64>()
    }

    fn joins(&self, _first: &Self) -> bool {
        true
    }
}

/// The queue of keep-alives a member renews in batches.
pub struct Renewals {
    tx: mpsc::Sender<Renewal>,
}

impl Renewals {
    /// The queue, and its receiving end for [`run_renewals`].
    pub fn new() -> (Renewals, mpsc::Receiver<Renewal>) {
        let (tx, rx) = mpsc::channel(RENEWALS_QUEUED);
        (Renewals { tx }, rx)
    }
}

/// Renews the keep-alives queued for `member` in batches until the member
/// stops or is gone.
pub async fn run_renewals(member: Weak<Member>, rx: mpsc::Receiver<Renewal>, mut stop: watch::Receiver<bool>) {
    let batches = crate::raft::gather::run(rx, RENEWAL_LIMITS, move |batch| {
        let member = member.upgrade();
        async move {
            match member {
                Some(member) => member.renew_batch(batch).await,
                None => {
                    for r in batch {
                        let _ = r.done.send(Err(Error::Stopped));
                    }
                }
            }
        }
    });
    tokio::select! {
        () = batches => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// The leader's revocations of expired leases under way.
#[derive(Default)]
pub struct Revocations {
    under_way: AtomicUsize,
    /// Told when the last one under way has ended, so that the expiry check
    /// looks again without waiting for its next tick.
    ended: Notify,
}

/// One revocation under way, counted until it ends however it ends.
struct UnderWay(Arc<Member>);

impl Drop for UnderWay {
    fn drop(&mut self) {
        let revocations = &self.0.revocations;
        if revocations.under_way.fetch_sub(1, Ordering::AcqRel) == 1 {
            revocations.ended.notify_one();
        }
    }
}

impl Member {
    /// The term in which this member leads, if it does.
    pub(crate) fn leading_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
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
        self.check_quota(super::alarm::LEASE_GRANT_COST).await?;
        let mut resp = self.write(LeaseGrantRequest { ttl, id }).await?;
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Revokes a lease and deletes its keys (LeaseRevoke).
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        let mut resp = self.write(LeaseRevokeRequest { id }).await?;
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Extends a lease by its TTL; returns the TTL, or 0 if the lease does not
    /// exist. Asks the leader when this member is not it, in one call with
    /// every other keep-alive that waits (see [`Renewals`]).
    pub async fn lease_renew(&self, id: i64) -> Result<i64, Error> {
        let (done, answer) = oneshot::channel();
        self.metrics.lease_renewals.fetch_add(1, Ordering::Relaxed);
        if self.renewals.tx.send(Renewal { id, done }).await.is_err() {
            return Err(Error::Stopped);
        }
        answer.await.unwrap_or(Err(Error::Stopped))
    }

    /// Renews one batch of keep-alives and answers each.
    async fn renew_batch(&self, batch: Vec<Renewal>) {
        self.metrics.lease_renewal_batches.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
        match self.renew_all(&ids).await {
            Ok(ttls) if ttls.len() == batch.len() => {
                for (r, ttl) in batch.into_iter().zip(ttls) {
                    let _ = r.done.send(Ok(ttl));
                }
            }
            answer => {
                let e = answer.err().unwrap_or_else(|| {
                    Error::internal(format!("the leader answered a batch of {} keep-alives wrongly", batch.len()))
                });
                for r in batch {
                    let _ = r.done.send(Err(e.clone()));
                }
            }
        }
    }

    /// Renews `ids` here when this member leads, else asks the leader in
    /// one call, retrying across leader changes until the request timeout;
    /// answers each lease's TTL (0 if it is gone), in order.
    async fn renew_all(&self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        let deadline = Instant::now() + self.request_timeout;
        let payload = encode(&ids)?;
        let payload = &payload;
        until_leader(&self.raft, deadline, || async move {
            let leader = self.leader();
            if leader == Some(self.id) {
                return self.serve_renewals(ids).await.into();
            }
            let Some(leader) = leader else { return Attempt::Retry { stale: None } };
            let asked = ask_leader::<Forwarded<Vec<i64>>>(
                &self.raft,
                &self.network,
                leader,
                Rpc::LeaseRenewals,
                payload.clone(),
                deadline,
            )
            .await;
            idempotent_attempt(leader, asked)
        })
        .await
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
        until_leader(&self.raft, deadline, || async move {
            let leader = self.leader();
            if leader == Some(self.id) {
                return self.serve_lease(call).await.into();
            }
            let Some(leader) = leader else { return Attempt::Retry { stale: None } };
            let payload = match encode(&call) {
                Ok(p) => p,
                Err(e) => return Attempt::Answered(Err(e.into())),
            };
            let asked =
                ask_leader::<Forwarded<LeaseAnswer>>(&self.raft, &self.network, leader, Rpc::Lease, payload, deadline)
                    .await;
            idempotent_attempt(leader, asked)
        })
        .await
    }

    /// Answers a lease call as the leader: confirms leadership and catches up
    /// with every committed write first (so a lease granted just before is
    /// known), then reads or extends the deadline.
    pub async fn serve_lease(&self, call: LeaseCall) -> Forwarded<LeaseAnswer> {
        let term = match self.lease_term().await {
            Ok(term) => term,
            Err(not) => return not,
        };
        let state = self.state.read();
        Forwarded::Done(self.lessor.answer(term, call, state.store.lease(call.id()), Instant::now()))
    }

    /// Renews each of `ids` as the leader, after one [`Member::lease_term`]
    /// for all of them: answers each lease's TTL (0 if it is gone), in
    /// order.
    pub async fn serve_renewals(&self, ids: &[i64]) -> Forwarded<Vec<i64>> {
        if ids.len() > MAX_RENEWALS {
            return Forwarded::Failed(Error::internal(format!(
                "{} keep-alives in one call; at most {MAX_RENEWALS} are taken",
                ids.len()
            )));
        }
        let term = match self.lease_term().await {
            Ok(term) => term,
            Err(not) => return not,
        };
        let state = self.state.read();
        let now = Instant::now();
        Forwarded::Done(
            ids.iter()
                .map(|id| self.lessor.answer(term, LeaseCall::Renew(*id), state.store.lease(*id), now).ttl)
                .collect(),
        )
    }

    /// The term this member leads in, once it has confirmed its leadership
    /// and applied every committed write (so a lease granted just before is
    /// known); else the answer to give instead.
    async fn lease_term<T>(&self) -> Result<u64, Forwarded<T>> {
        let Some(term) = self.leading_term() else { return Err(Forwarded::NotLeader(self.leader())) };
        // The read index of reads, with the floor of a leadership restored
        // at start: a restarted leader has applied only what it had before
        // the restart, and a revocation committed just before it would
        // otherwise let a keep-alive answer "alive" for a lease that is gone.
        // A confirmation up to a grace old will do: a new leader adds that
        // grace to every countdown it starts (see `crate::lease`).
        match self.reads.recent_leader_read_index(term, self.lessor.grace()).await {
            Ok(read) => {
                let deadline = Instant::now() + self.request_timeout;
                if let Err(e) = self.await_applied(read, deadline).await {
                    return Err(Forwarded::Failed(e));
                }
            }
            Err(_) => return Err(Forwarded::NotLeader(self.leader())),
        }
        if self.leading_term() != Some(term) {
            return Err(Forwarded::NotLeader(self.leader()));
        }
        Ok(term)
    }

    /// One pass of the leader's expiry check: proposes the revocation of
    /// the leases past their deadline, up to [`MAX_REVOKING`] under way.
    /// Followers forget their deadlines.
    fn expire_leases(self: &Arc<Self>) {
        let Some(term) = self.leading_term() else {
            self.lessor.forget();
            return;
        };
        let room = MAX_REVOKING.saturating_sub(self.revocations.under_way.load(Ordering::Acquire));
        if room == 0 {
            return;
        }
        let expired = {
            let state = self.state.read();
            self.lessor.expired(term, state.store.leases(), state.store.lease_log(), Instant::now(), room)
        };
        self.revocations.under_way.fetch_add(expired.len(), Ordering::AcqRel);
        for id in expired {
            let under_way = UnderWay(self.clone());
            tokio::spawn(async move {
                let member = &under_way.0;
                // Only through this member's own log: if it was deposed
                // meanwhile (paused, cut off), its deadlines are stale and the
                // new leader, which restarted every countdown, decides.
                // Forwarding the revocation would cut short a lease the new
                // leader is keeping alive.
                let revoke = command::Op::LeaseExpire(LeaseExpire { id, term });
                match member.propose_here(revoke).await.map(|_| ()) {
                    Ok(_) => tracing::info!(lease = format!("{id:x}"), "lease expired and was revoked"),
                    Err(Error::LeaseNotFound) => {}
                    // It waited for a log entry until another term: that
                    // term's leader decides anew.
                    Err(Error::StaleLeaseExpiry) => {
                        tracing::debug!(lease = format!("{id:x}"), term, "a lease expiry from an earlier term was void")
                    }
                    Err(e) => tracing::warn!(lease = format!("{id:x}"), "revoking an expired lease failed: {e}"),
                }
            });
        }
    }

    /// Runs the leader's lease expiry check until the member stops.
    pub async fn run_lease_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.expire_leases(),
                () = self.revocations.ended.notified() => self.expire_leases(),
                () = self.stopped() => return,
            }
        }
    }
}

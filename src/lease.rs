//! Lease deadlines. Which leases exist, and with which keys, is replicated
//! state (in the MVCC store). When a lease expires is not: the leader alone
//! keeps a deadline per lease on its monotonic clock, extends it on each
//! keep-alive, and revokes an expired lease by proposing its revocation
//! through Raft like any write (see `node::lease`).
//!
//! Deadlines belong to one leader term. A member that becomes leader starts
//! every lease's countdown afresh (its full TTL and a grace from the moment
//! it first sees the lease as leader), so a lease never expires early
//! because leadership moved: the old leader's keep-alives are forgotten,
//! never its grace. The grace covers keep-alives the old leader answered
//! after it was deposed without knowing it: it renews on a confirmation of
//! its leadership up to a grace old (see `node::lease`), and the new leader
//! was elected after that confirmation began.
//!
//! This module is bookkeeping only: it is given the term, the clock and the
//! leases, and decides; it has no Raft, no network and no async in it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::mvcc::{Lease, LeaseLog, LeaseMark};

/// The largest TTL a lease may be granted with, as in etcd.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// How long the leader waits for a revocation it proposed before proposing it
/// again.
const REVOKE_RETRY: Duration = Duration::from_secs(2);

/// A lease question only the leader can answer, sent by a follower.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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

impl LeaseCall {
    /// The lease it asks about.
    pub fn id(&self) -> i64 {
        match *self {
            LeaseCall::Renew(id) | LeaseCall::TimeToLive { id, .. } => id,
        }
    }
}

/// The leader's answer to a [`LeaseCall`].
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// Seconds left (renew: the TTL it was extended by); -1 or 0 if the lease
    /// does not exist, as etcd reports for each call.
    pub ttl: i64,
    /// The TTL the lease was granted with.
    pub granted_ttl: i64,
    /// Its keys, when asked for.
    pub keys: Vec<Vec<u8>>,
}

/// Most keep-alives renewed in one batch (one read index on the leader,
/// one peer call from a follower): 64 KiB of lease ids.
pub const MAX_RENEWALS: usize = 8192;

/// The leader's lease deadlines.
pub struct Lessor {
    inner: Mutex<Deadlines>,
    /// Added to a lease's first countdown in a term.
    grace: Duration,
}

#[derive(Default)]
struct Deadlines {
    /// The leader term the deadlines belong to.
    term: Option<u64>,
    due: HashMap<i64, Due>,
    /// The same deadlines, soonest first, so that a look for expired leases
    /// reads only those past due: going over 100,000 leases took 13.7 ms,
    /// ten times a second, under the state lock.
    order: BTreeSet<(Instant, i64)>,
    /// Revocations proposed, and when.
    revoking: HashMap<i64, Instant>,
    /// Where the store's leases stood (see [`LeaseLog`]) when the deadlines
    /// were last matched with them: until it changes, no lease has come or
    /// gone.
    matched: Option<LeaseMark>,
}

/// A lease's deadline, and which grant of its id it counts down for.
#[derive(Clone, Copy)]
struct Due {
    at: Instant,
    granted: u64,
}

impl Deadlines {
    fn set_due(&mut self, id: i64, at: Instant, granted: u64) {
        if let Some(old) = self.due.insert(id, Due { at, granted }) {
            self.order.remove(&(old.at, id));
        }
        self.order.insert((at, id));
    }

    fn drop_lease(&mut self, id: i64) {
        if let Some(old) = self.due.remove(&id) {
            self.order.remove(&(old.at, id));
        }
        self.revoking.remove(&id);
    }

    /// Forgets the deadline and revocation of an earlier grant of `lease`'s
    /// id, revoked and granted again since they were set.
    fn forget_earlier_grant(&mut self, id: i64, lease: &Lease) {
        if self.due.get(&id).is_some_and(|due| due.granted != lease.granted) {
            self.drop_lease(id);
        }
    }

    /// Matches lease `id`'s deadline with the store's `lease`: drops it if
    /// the lease is gone or was granted again, and starts the countdown of a
    /// lease without one at `start` and its TTL.
    fn match_lease(&mut self, id: i64, lease: Option<&Lease>, start: Instant) {
        match lease {
            None => self.drop_lease(id),
            Some(lease) => {
                self.forget_earlier_grant(id, lease);
                if !self.due.contains_key(&id) {
                    self.set_due(id, start + secs(lease.ttl), lease.granted);
                }
            }
        }
    }
}

impl Lessor {
    /// Deadlines whose first countdown in a term is the TTL and `grace`.
    pub fn new(grace: Duration) -> Self {
        Lessor { inner: Default::default(), grace }
    }

    /// The grace a lease's first countdown in a term gets: how old a
    /// confirmation of leadership a keep-alive may be answered on.
    pub fn grace(&self) -> Duration {
        self.grace
    }

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

    /// Drops every deadline: this member no longer leads.
    pub fn forget(&self) {
        let mut d = self.lock();
        if d.term.is_some() {
            *d = Deadlines::default();
        }
    }

    /// Answers `call` at `now` as the leader of `term`, for `lease` as the
    /// store has it (`None`: it does not exist).
    pub fn answer(&self, term: u64, call: LeaseCall, lease: Option<&Lease>, now: Instant) -> LeaseAnswer {
        let mut d = self.for_term(term);
        match call {
            LeaseCall::Renew(id) => {
                let Some(lease) = lease else { return LeaseAnswer::default() };
                d.forget_earlier_grant(id, lease);
                // An expired lease is being revoked (or is about to be, at
                // the next tick); renewing it now would answer "alive" for a
                // lease whose revocation may apply a moment later. It is
                // gone, as etcd answers.
                let expired = d.due.get(&id).is_some_and(|due| due.at <= now) || d.revoking.contains_key(&id);
                if expired {
                    return LeaseAnswer::default();
                }
                d.set_due(id, now + secs(lease.ttl), lease.granted);
                LeaseAnswer { ttl: lease.ttl, granted_ttl: lease.ttl, keys: Vec::new() }
            }
            LeaseCall::TimeToLive { id, keys } => {
                let Some(lease) = lease else { return LeaseAnswer { ttl: -1, ..Default::default() } };
                d.forget_earlier_grant(id, lease);
                let due = match d.due.get(&id) {
                    Some(due) => due.at,
                    None => {
                        let due = now + secs(lease.ttl) + self.grace;
                        d.set_due(id, due, lease.granted);
                        due
                    }
                };
                let left = due.saturating_duration_since(now);
                LeaseAnswer {
                    // The grace is the leader's margin, not the client's.
                    ttl: (left.as_secs() as i64).min(lease.ttl),
                    granted_ttl: lease.ttl,
                    keys: if keys { lease.keys.iter().cloned().collect() } else { Vec::new() },
                }
            }
        }
    }

    /// At most `limit` of the leases of `leases` past their deadline at
    /// `now`, soonest first, for the leader of `term` to revoke. Each is
    /// returned once, and again only if its revocation has not applied
    /// within [`REVOKE_RETRY`]. `log` is the store's record of the leases
    /// granted and revoked: those changed since the last look get their
    /// countdown started (new to this term, or granted again under an id
    /// revoked since) or dropped (gone); every lease is gone over only when
    /// the log no longer reaches back to the last look.
    pub fn expired(
        &self,
        term: u64,
        leases: &BTreeMap<i64, Lease>,
        log: &LeaseLog,
        now: Instant,
        limit: usize,
    ) -> Vec<i64> {
        let mut d = self.for_term(term);
        let mark = log.mark();
        if d.matched != Some(mark) {
            let start = now + self.grace;
            match d.matched.and_then(|matched| log.changed_since(matched)) {
                Some(changed) => {
                    for id in changed {
                        d.match_lease(id, leases.get(&id), start);
                    }
                }
                None => {
                    // A revocation is proposed only for a lease with a
                    // deadline, so dropping deadlines drops revocations too;
                    // `match_lease` drops those of earlier grants.
                    let gone: Vec<i64> = d.due.keys().filter(|id| !leases.contains_key(id)).copied().collect();
                    for id in gone {
                        d.drop_lease(id);
                    }
                    for (id, lease) in leases {
                        d.match_lease(*id, Some(lease), start);
                    }
                }
            }
            d.matched = Some(mark);
        }
        d.revoking.retain(|_, at| now.duration_since(*at) < REVOKE_RETRY);
        let d = &mut *d;
        let expired: Vec<i64> = d
            .order
            .iter()
            .take_while(|(due, _)| *due <= now)
            .map(|(_, id)| *id)
            .filter(|id| !d.revoking.contains_key(id))
            .take(limit)
            .collect();
        for id in &expired {
            d.revoking.insert(*id, now);
        }
        expired
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

/// The smallest TTL a lease gets: one and a half election timeouts, rounded up
/// to whole seconds, as etcd computes it.
pub fn min_lease_ttl(election: Duration) -> i64 {
    let ms = election.as_millis() as i64 * 3 / 2;
    (ms + 999) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::LeaseKeys;

    fn lease(ttl: i64, keys: &[&str]) -> Lease {
        Lease { ttl, keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(), granted: 1 }
    }

    /// The store's leases and its log of them, as the lessor is shown them.
    struct Leases {
        map: BTreeMap<i64, Lease>,
        log: LeaseLog,
    }

    impl Leases {
        fn granted(list: &[(i64, i64)]) -> Leases {
            let mut leases = Leases { map: BTreeMap::new(), log: LeaseLog::new() };
            for (id, ttl) in list {
                leases.grant(*id, *ttl);
            }
            leases
        }

        fn grant(&mut self, id: i64, ttl: i64) {
            let granted = self.log.record(id);
            self.map.insert(id, Lease { ttl, keys: LeaseKeys::default(), granted });
        }

        fn revoke(&mut self, id: i64) {
            self.map.remove(&id);
            self.log.record(id);
        }

        fn get(&self, id: i64) -> Option<&Lease> {
            self.map.get(&id)
        }

        fn expired(&self, l: &Lessor, term: u64, now: Instant) -> Vec<i64> {
            l.expired(term, &self.map, &self.log, now, usize::MAX)
        }
    }

    #[test]
    fn a_lease_expires_a_full_ttl_after_the_leader_first_sees_it() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let all = Leases::granted(&[(1, 5)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        assert!(all.expired(&l, 1, t0 + Duration::from_millis(4_999)).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(5)), vec![1]);
        // Proposed once; not again while the revocation is pending.
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(6)).is_empty());
        // Proposed again when it has not applied in time.
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(5) + REVOKE_RETRY), vec![1]);
    }

    #[test]
    fn leases_are_matched_only_when_the_store_says_they_changed_and_then_only_those_changed() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let mut all = Leases::granted(&[(1, 5)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        // Lease 2 came, but the log says nothing changed: its countdown
        // has not begun, and lease 1 still expires on time.
        all.map.insert(2, lease(3, &[]));
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(1)).is_empty());
        // Lease 3 is granted: the log names it alone, so lease 2, which it
        // does not name, is still not seen.
        all.grant(3, 3);
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(5)), vec![1, 3]);
        // Both revoked; a lease 1 granted again counts down afresh.
        all.revoke(1);
        all.revoke(3);
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(6)).is_empty());
        all.grant(1, 5);
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(7)).is_empty());
        assert!(all.expired(&l, 1, t0 + Duration::from_millis(11_999)).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(12)), vec![1]);
    }

    #[test]
    fn every_lease_is_matched_when_the_log_no_longer_reaches_back_to_the_last_look() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let mut all = Leases::granted(&[(1, 5), (2, 5)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        // Lease 1 revoked, lease 3 granted, lease 4 slipped in unlogged,
        // then more changes than the log keeps.
        all.revoke(1);
        all.grant(3, 4);
        all.map.insert(4, lease(4, &[]));
        for _ in 0..10_000 {
            all.grant(9, 60);
            all.revoke(9);
        }
        let at = t0 + Duration::from_secs(1);
        assert!(all.expired(&l, 1, at).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(5)), vec![2, 3, 4]);
    }

    #[test]
    fn at_most_the_limit_is_returned_at_a_look_and_the_rest_at_the_next() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let all = Leases::granted(&[(1, 5), (2, 5), (3, 5), (4, 6)]);
        assert!(l.expired(1, &all.map, &all.log, t0, 2).is_empty());
        let at = t0 + Duration::from_secs(6);
        assert_eq!(l.expired(1, &all.map, &all.log, at, 2), vec![1, 2]);
        assert_eq!(l.expired(1, &all.map, &all.log, at, 2), vec![3, 4]);
        assert!(l.expired(1, &all.map, &all.log, at, 2).is_empty());
    }

    #[test]
    fn a_lease_revoked_and_granted_again_under_its_id_counts_down_afresh() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let mut all = Leases::granted(&[(1, 5)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        // Revoked at 3 s and granted again with the same id before the next
        // look: the store's lease is a later grant.
        all.revoke(1);
        all.grant(1, 5);
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(3)).is_empty());
        assert!(all.expired(&l, 1, t0 + Duration::from_millis(7_999)).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(8)), vec![1]);
        // Expired and being revoked; a grant under the same id that a
        // keep-alive reaches before the next look is renewed, not refused.
        all.revoke(1);
        all.grant(1, 5);
        let at = t0 + Duration::from_secs(9);
        assert_eq!(l.answer(1, LeaseCall::Renew(1), all.get(1), at).ttl, 5);
        assert!(all.expired(&l, 1, at + Duration::from_millis(4_999)).is_empty());
        assert_eq!(all.expired(&l, 1, at + Duration::from_secs(5)), vec![1]);
    }

    #[test]
    fn leases_expire_soonest_first_and_a_renewal_reorders_them() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let mut all = Leases::granted(&[(1, 9), (2, 4), (3, 6)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        // Lease 2 renewed at 3 s: due at 7 s, after lease 3.
        assert_eq!(l.answer(1, LeaseCall::Renew(2), all.get(2), t0 + Duration::from_secs(3)).ttl, 4);
        assert!(all.expired(&l, 1, t0 + Duration::from_millis(5_999)).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(6)), vec![3]);
        // Lease 3's revocation applied.
        all.revoke(3);
        assert!(all.expired(&l, 1, t0 + Duration::from_millis(6_999)).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(9)), vec![2, 1]);
    }

    #[test]
    fn a_keep_alive_moves_the_deadline_and_an_expired_lease_cannot_be_renewed() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let all = Leases::granted(&[(1, 5)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        let at = t0 + Duration::from_secs(4);
        assert_eq!(l.answer(1, LeaseCall::Renew(1), all.get(1), at).ttl, 5);
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(8)).is_empty());
        assert_eq!(all.expired(&l, 1, at + Duration::from_secs(5)), vec![1]);
        // Being revoked: a keep-alive answers "gone".
        assert_eq!(l.answer(1, LeaseCall::Renew(1), all.get(1), at + Duration::from_secs(5)), LeaseAnswer::default());
    }

    #[test]
    fn a_new_term_restarts_every_countdown() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let all = Leases::granted(&[(1, 5)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        // A new leader term: the old deadline is forgotten.
        let later = t0 + Duration::from_secs(4);
        assert!(all.expired(&l, 2, later).is_empty());
        assert!(all.expired(&l, 2, t0 + Duration::from_secs(6)).is_empty());
        assert_eq!(all.expired(&l, 2, later + Duration::from_secs(5)), vec![1]);
    }

    #[test]
    fn a_new_term_counts_a_grace_beyond_the_ttl_and_time_to_live_does_not_show_it() {
        let grace = Duration::from_millis(250);
        let l = Lessor::new(grace);
        let t0 = Instant::now();
        let all = Leases::granted(&[(1, 5)]);
        assert!(all.expired(&l, 1, t0).is_empty());
        assert!(all.expired(&l, 1, t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(all.expired(&l, 1, t0 + Duration::from_secs(5) + grace), vec![1]);
        // A keep-alive extends by the TTL alone; TimeToLive never says more
        // than the TTL.
        let at = t0 + Duration::from_secs(1);
        let l = Lessor::new(grace);
        let ttl = LeaseCall::TimeToLive { id: 1, keys: false };
        assert_eq!(l.answer(2, ttl, all.get(1), t0).ttl, 5);
        assert_eq!(l.answer(2, LeaseCall::Renew(1), all.get(1), at).ttl, 5);
        assert!(all.expired(&l, 2, at + Duration::from_millis(4_999)).is_empty());
        assert_eq!(all.expired(&l, 2, at + Duration::from_secs(5)), vec![1]);
    }

    #[test]
    fn time_to_live_counts_down_and_lists_keys_when_asked() {
        let l = Lessor::new(Duration::ZERO);
        let t0 = Instant::now();
        let one = lease(10, &["a", "b"]);
        let call = LeaseCall::TimeToLive { id: 1, keys: true };
        assert_eq!(l.answer(1, call, Some(&one), t0).ttl, 10);
        let a = l.answer(1, call, Some(&one), t0 + Duration::from_millis(3_500));
        assert_eq!((a.ttl, a.granted_ttl, a.keys.len()), (6, 10, 2));
        let gone = l.answer(1, LeaseCall::TimeToLive { id: 2, keys: false }, None, t0);
        assert_eq!(gone.ttl, -1);
        assert_eq!(l.answer(1, LeaseCall::Renew(2), None, t0).ttl, 0);
    }

    #[test]
    fn the_minimum_ttl_is_one_and_a_half_election_timeouts_rounded_up() {
        assert_eq!(min_lease_ttl(Duration::from_millis(1000)), 2);
        assert_eq!(min_lease_ttl(Duration::from_millis(200)), 1);
        assert_eq!(min_lease_ttl(Duration::from_millis(2000)), 3);
    }
}

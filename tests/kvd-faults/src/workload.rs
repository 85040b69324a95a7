//! The client load the harness runs while it injects faults, and the record
//! of what every client asked and was told.
//!
//! - register clients: reads, writes and compare-and-swaps on a few keys,
//!   every value unique, recorded for the linearizability checker; each
//!   client also checks that the revisions it sees never go backwards;
//! - insert clients: puts of keys never written before, to count afterwards
//!   which acknowledged ones are missing;
//! - watchers, one per member: every revision must arrive exactly once and in
//!   order, across the faults, with the stream resuming where it broke off;
//! - lease clients: a lease never expires before its TTL has passed since
//!   the last keep-alive, and its keys go once it is let go;
//! - lock clients: writes fenced on the holder's token never go back to an
//!   older token;
//! - a compaction client: compacts, now and then, up to the revision every
//!   watcher has reached, half the time waiting for the history to be
//!   removed, so that faults meet compactions under way.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvd::client::Client;
use kvd::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kvd::proto::etcdserverpb::request_op::Request as Op;
use kvd::proto::etcdserverpb::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::linearizability::{Input, Output, Value};

/// Registers the clients share.
pub const REGISTERS: usize = 24;

/// One recorded register operation.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub key: usize,
    pub op: crate::linearizability::Op,
}

/// Everything the clients saw.
#[derive(Default)]
pub struct Record {
    pub registers: Mutex<Vec<Recorded>>,
    /// Revisions that went backwards for a client: (client, before, after).
    pub regressions: Mutex<Vec<String>>,
    pub inserts_acked: Mutex<Vec<String>>,
    pub inserts_failed: Mutex<Vec<String>>,
    pub inserts_unknown: Mutex<u64>,
    /// Per watcher: the revisions of the events it received, in order, with
    /// the number of events of each.
    pub watched: Mutex<Vec<Vec<(i64, usize)>>>,
    /// Watch anomalies seen as they happened.
    pub watch_errors: Mutex<Vec<String>>,
    /// Per watcher: the last revision it received.
    pub watch_progress: Mutex<Vec<i64>>,
    /// The highest revision a compaction was acknowledged at.
    pub compacted: Mutex<i64>,
    /// Leases kept alive and then let go.
    pub leases: Mutex<Vec<LeaseLife>>,
    pub lease_errors: Mutex<Vec<String>>,
    /// Writes fenced on a lock holder's token.
    pub fenced: Mutex<Vec<Fenced>>,
    /// Failed calls, counted by their error.
    pub errors: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Successful writes, (call, return) in ns since the start: for "writes
    /// resumed".
    pub write_acks: Mutex<Vec<(u64, u64)>>,
    /// Whether a fault (or the final heal) is under way.
    pub fault_under_way: AtomicBool,
    /// When the latest fault's effects ended, in ns since the start. Every
    /// new leader starts each lease's countdown again, so a lease's key
    /// outlives faults that keep coming; it must go once they have ended.
    pub faults_settled: AtomicU64,
}

impl Record {
    /// A fault begins (`true`) or its effects have ended (`false`, at `now`).
    pub fn fault(&self, under_way: bool, now: u64) {
        if !under_way {
            self.faults_settled.fetch_max(now, Ordering::Relaxed);
        }
        self.fault_under_way.store(under_way, Ordering::Relaxed);
    }

    /// Whether a lease whose last good keep-alive answered at `last_ok_ret`
    /// has had `bound` to expire at `now` with no fault in its way since.
    fn past_due(&self, last_ok_ret: u64, bound: u64, now: u64) -> bool {
        let from = last_ok_ret.max(self.faults_settled.load(Ordering::Relaxed));
        !self.fault_under_way.load(Ordering::Relaxed) && now > from + bound
    }
}

pub fn register_key(k: usize) -> Vec<u8> {
    format!("reg/{k}").into_bytes()
}

fn parse_value(kv: Option<&kvd::proto::mvccpb::KeyValue>) -> Value {
    kv.and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok()).unwrap_or(0)
}

/// The shared clock: nanoseconds since the run began.
#[derive(Clone, Copy)]
pub struct Clock(pub Instant);

impl Clock {
    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

pub use kvd_faults::cluster::Endpoints;

/// A client whose first choice is member `first` (it fails over to the
/// others).
pub fn client_from(endpoints: &Endpoints, first: usize) -> Client {
    let mut order = endpoints.clone();
    let n = order.addrs.len();
    order.addrs.rotate_left(first % n);
    order.client(Duration::from_millis(500))
}

/// What every load client of a run shares.
#[derive(Clone)]
pub struct Load {
    /// Where operations and anomalies are recorded.
    pub record: Arc<Record>,
    /// The run's clock.
    pub clock: Clock,
    /// Turns true when the clients must stop.
    pub stop: Arc<AtomicBool>,
    /// How long one operation may take.
    pub timeout: Duration,
    /// The run's seed.
    pub seed: u64,
}

/// A register client: sequential operations until `stop`.
pub async fn register_client(id: usize, client: Client, load: Load) {
    let Load { record, clock, stop, timeout, seed } = load;
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut known: Vec<Value> = vec![0; REGISTERS];
    let mut counter = 0u64;
    let mut last_rev = 0i64;
    let mut last_what = String::new();
    while !stop.load(Ordering::Relaxed) {
        let key = rng.gen_range(0..REGISTERS);
        let k = register_key(key);
        let choice = rng.gen_range(0..10);
        counter += 1;
        let fresh = (id as u64 + 1) * 1_000_000_000 + counter;
        let call = clock.now();
        let (input, result) = if choice < 4 {
            let r = tokio::time::timeout(timeout, client.range(RangeRequest { key: k, ..Default::default() })).await;
            let r = outcome(&record, r);
            (Input::Read, r.map(|resp| (resp.header.map(|h| h.revision), Output::Read(parse_value(resp.kvs.first())))))
        } else if choice < 7 {
            let put = PutRequest { key: k, value: fresh.to_string().into_bytes(), ..Default::default() };
            let r = tokio::time::timeout(timeout, client.put(put)).await;
            let r = outcome(&record, r);
            (Input::Write(fresh), r.map(|resp| (resp.header.map(|h| h.revision), Output::Written)))
        } else {
            let expected = known[key];
            let compare = if expected == 0 {
                Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: k.clone(),
                    target_union: Some(TargetUnion::Version(0)),
                    range_end: Vec::new(),
                }
            } else {
                Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: k.clone(),
                    target_union: Some(TargetUnion::Value(expected.to_string().into_bytes())),
                    range_end: Vec::new(),
                }
            };
            let put = PutRequest { key: k, value: fresh.to_string().into_bytes(), ..Default::default() };
            let txn = TxnRequest {
                compare: vec![compare],
                success: vec![RequestOp { request: Some(Op::RequestPut(put)) }],
                failure: Vec::new(),
            };
            let r = tokio::time::timeout(timeout, client.txn(txn)).await;
            let r = outcome(&record, r);
            (Input::Cas(expected, fresh), r.map(|resp| (resp.header.map(|h| h.revision), Output::Cas(resp.succeeded))))
        };
        let ret = clock.now();
        let (output, ret) = match result {
            Ok((rev, output)) => {
                let rev = rev.unwrap_or(0);
                let what = format!("{input:?} on reg/{key} -> {output:?} at revision {rev}, {:.3}s", ret as f64 / 1e9);
                if rev < last_rev {
                    record
                        .regressions
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("client {id}: {what} after {last_what}"));
                }
                if rev >= last_rev {
                    last_rev = rev;
                    last_what = what;
                }
                match output {
                    Output::Read(v) => known[key] = v,
                    Output::Written | Output::Cas(true) => {
                        known[key] = fresh;
                        record.write_acks.lock().unwrap_or_else(|p| p.into_inner()).push((call, ret));
                    }
                    _ => {}
                }
                (output, ret)
            }
            // A read that failed says nothing; a write that failed may still
            // take effect.
            Err(certain) if input == Input::Read => {
                if certain {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            Err(true) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(false) => (Output::Unknown, u64::MAX),
        };
        let op = crate::linearizability::Op { input, output, call, ret };
        record.registers.lock().unwrap_or_else(|p| p.into_inner()).push(Recorded { key, op });
        if output == Output::Unknown {
            // Give a struggling cluster a moment instead of piling on (and
            // keep the outcomes the checker must guess at few).
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Counts the error of a failed call; `Err(true)` if the call certainly had
/// no effect.
fn outcome<T>(record: &Record, r: Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>) -> Result<T, bool> {
    let (what, certain) = match r {
        Ok(Ok(v)) => return Ok(v),
        // A write the NOSPACE alarm refused was not applied.
        Ok(Err(s)) => (
            format!("{:?}: {}", s.code(), s.message()),
            kvd::client::not_sent(&s) || s.code() == tonic::Code::ResourceExhausted,
        ),
        Err(_) => ("timed out".to_string(), false),
    };
    *record.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(what).or_default() += 1;
    Err(certain)
}

/// An insert client: puts `ins/<id>/<n>`, each key once.
pub async fn insert_client(id: usize, client: Client, load: Load) {
    let Load { record, stop, timeout, .. } = load;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("ins/{id}/{n:08}");
        let put = PutRequest { key: key.clone().into_bytes(), value: b"x".to_vec(), ..Default::default() };
        match tokio::time::timeout(timeout, client.put(put)).await {
            Ok(Ok(_)) => record.inserts_acked.lock().unwrap_or_else(|p| p.into_inner()).push(key),
            Ok(Err(s)) if kvd::client::not_sent(&s) => {
                record.inserts_failed.lock().unwrap_or_else(|p| p.into_inner()).push(key)
            }
            _ => {
                *record.inserts_unknown.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A watcher of every key from revision 1 on, through member `first` first;
/// runs until `until` returns true for the revision it has reached.
pub async fn watcher(index: usize, client: Client, record: Arc<Record>, stop_at: Arc<Mutex<Option<i64>>>) {
    let req = WatchCreateRequest { key: vec![0], range_end: vec![0], start_revision: 1, ..Default::default() };
    let mut seen: Vec<(i64, usize)> = Vec::new();
    let fail = |m: String| record.watch_errors.lock().unwrap_or_else(|p| p.into_inner()).push(m);
    let mut stream = loop {
        match client.watch(req.clone()).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    loop {
        let last = seen.last().map(|&(r, _)| r).unwrap_or(1);
        if let Some(target) = *stop_at.lock().unwrap_or_else(|p| p.into_inner()) {
            if last >= target {
                break;
            }
        }
        let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
        let resp = match next {
            Err(_) => continue,
            Ok(None) => {
                fail(format!("watcher {index}: the stream ended"));
                break;
            }
            Ok(Some(Err(s))) => {
                fail(format!("watcher {index}: {s}"));
                break;
            }
            Ok(Some(Ok(resp))) => resp,
        };
        if resp.canceled {
            fail(format!("watcher {index}: canceled: {}", resp.cancel_reason));
            break;
        }
        for e in &resp.events {
            let rev = e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
            match seen.last_mut() {
                Some((r, n)) if *r == rev => *n += 1,
                Some((r, _)) if *r > rev => {
                    fail(format!("watcher {index}: revision {rev} after {r}"));
                    seen.push((rev, 1));
                }
                _ => seen.push((rev, 1)),
            }
        }
        if let (Some(&(rev, _)), Some(p)) =
            (seen.last(), record.watch_progress.lock().unwrap_or_else(|p| p.into_inner()).get_mut(index))
        {
            *p = rev;
        }
    }
    record.watched.lock().unwrap_or_else(|p| p.into_inner())[index] = seen;
}

/// The compaction client: every second or two, compacts at the lowest
/// revision the watchers have reached, if that moved on. A watcher resumes
/// after the last revision it got, so it never meets the compaction.
pub async fn compaction_client(client: Client, load: Load) {
    let Load { record, stop, seed, .. } = load;
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0_4ac7);
    let mut physical = false;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..2000))).await;
        let reached = record.watch_progress.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().min();
        let done = *record.compacted.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rev) = reached.filter(|&r| r > done) else { continue };
        physical = !physical;
        // Removing the history may take a while on a loaded member.
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.compact(CompactionRequest { revision: rev, physical }),
        )
        .await;
        if outcome(&record, r).is_ok() {
            let mut compacted = record.compacted.lock().unwrap_or_else(|p| p.into_inner());
            *compacted = (*compacted).max(rev);
        }
    }
}

/// Every key-value at `rev`, read from the member at `endpoint` alone;
/// `None` if it gives no answer within about 20 s.
pub async fn contents_at(endpoint: &Endpoints, rev: i64) -> Option<Vec<kvd::proto::mvccpb::KeyValue>> {
    let own = client_from(endpoint, 0);
    for _ in 0..100 {
        let req =
            RangeRequest { key: vec![0], range_end: vec![0], revision: rev, serializable: true, ..Default::default() };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), own.range(req)).await {
            return Some(r.kvs);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Checks what a watcher received against the final revision: every
/// revision from 2 to `last` exactly once, in order. Returns the problems.
pub fn check_watch(index: usize, seen: &[(i64, usize)], last: i64) -> Vec<String> {
    let mut problems = Vec::new();
    let mut revs = BTreeSet::new();
    let mut dup = HashSet::new();
    for &(r, _) in seen {
        if !revs.insert(r) {
            dup.insert(r);
        }
    }
    if !dup.is_empty() {
        let mut d: Vec<_> = dup.into_iter().collect();
        d.sort();
        problems.push(format!("watcher {index}: revisions delivered twice: {:?}", &d[..d.len().min(10)]));
    }
    let missing: Vec<i64> = (2..=last).filter(|r| !revs.contains(r)).collect();
    if !missing.is_empty() {
        problems.push(format!(
            "watcher {index}: {} revisions missing, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if let Some(&extra) = revs.iter().find(|&&r| r > last || r < 2) {
        problems.push(format!("watcher {index}: revision {extra} outside 2..={last}"));
    }
    problems
}

/// What a lease client saw of one lease: when its last keep-alive was called
/// and answered, and when its key was first seen gone.
#[derive(Debug, Clone)]
pub struct LeaseLife {
    pub ttl_ns: u64,
    pub last_ok_call: u64,
    pub last_ok_ret: u64,
    /// The answer time of the first read that found the key gone.
    pub gone: Option<u64>,
}

/// A lease client: grants a lease, puts a key with it, keeps it alive for a
/// while, then lets it expire and watches for the key to go. A keep-alive
/// that finds the lease gone, or a read that finds the key gone, before the
/// TTL has passed since the last successful keep-alive was called, is an
/// anomaly (the leader counts from when it got that keep-alive, which is
/// later).
pub async fn lease_client(id: usize, client: Client, load: Load) {
    let Load { record, clock, stop, timeout, seed } = load;
    const TTL: i64 = 2;
    let ttl_ns = Duration::from_secs(TTL as u64).as_nanos() as u64;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1ea5e ^ id as u64);
    let mut n = 0u64;
    let fail = |m: String| record.lease_errors.lock().unwrap_or_else(|p| p.into_inner()).push(m);
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let call = clock.now();
        let lease = match tokio::time::timeout(timeout, client.lease_grant(TTL, 0)).await {
            Ok(Ok(r)) if r.error.is_empty() => r.id,
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut life = LeaseLife { ttl_ns, last_ok_call: call, last_ok_ret: clock.now(), gone: None };
        let key = format!("lease/{id}/{n}").into_bytes();
        let put = PutRequest { key: key.clone(), value: b"x".to_vec(), lease, ..Default::default() };
        if !matches!(tokio::time::timeout(timeout, client.put(put)).await, Ok(Ok(_))) {
            // The lease may have expired already, or the put may still land:
            // nothing certain to check; let it go.
            continue;
        }
        // Keep it alive for a while.
        let until = clock.now() + rng.gen_range(500..4000) * 1_000_000;
        while clock.now() < until && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let call = clock.now();
            match tokio::time::timeout(timeout, client.lease_keep_alive_once(lease)).await {
                Ok(Ok(ttl)) if ttl > 0 => {
                    life.last_ok_call = call;
                    life.last_ok_ret = clock.now();
                }
                Ok(Ok(_)) => {
                    let ret = clock.now();
                    if ret < life.last_ok_call + ttl_ns {
                        fail(format!(
                            "lease {lease:x}: a keep-alive answered {:.3}s found it gone {} ms after the last good keep-alive was sent (TTL {TTL}s)",
                            ret as f64 / 1e9,
                            (ret - life.last_ok_call) / 1_000_000
                        ));
                    }
                    life.gone = Some(ret);
                    break;
                }
                _ => {}
            }
        }
        // Let it expire; watch the key go.
        while life.gone.is_none() {
            let r =
                tokio::time::timeout(timeout, client.range(RangeRequest { key: key.clone(), ..Default::default() }));
            if let Ok(Ok(resp)) = r.await {
                let ret = clock.now();
                if resp.kvs.is_empty() {
                    if ret < life.last_ok_call + ttl_ns {
                        fail(format!(
                            "lease {lease:x}: its key was gone {} ms after the last good keep-alive was sent (TTL {TTL}s)",
                            (ret - life.last_ok_call) / 1_000_000
                        ));
                    }
                    life.gone = Some(ret);
                    break;
                }
            }
            if record.past_due(life.last_ok_ret, ttl_ns + 30_000_000_000, clock.now()) {
                fail(format!("lease {lease:x}: its key was still there 30 s after its TTL, with no fault since"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        record.leases.lock().unwrap_or_else(|p| p.into_inner()).push(life);
    }
}

/// One write made while holding the lock, fenced on the holder's token.
#[derive(Debug, Clone, Copy)]
pub struct Fenced {
    pub token: i64,
    pub revision: i64,
}

/// A lock client: takes the lock "faults-lock" with a 2 s session, makes a
/// write fenced on its token (a Txn that succeeds only while its lock key
/// still exists with that create revision), releases it, and again.
pub async fn lock_client(client: Client, load: Load) {
    let Load { record, stop, timeout, .. } = load;
    while !stop.load(Ordering::Relaxed) {
        let session = match tokio::time::timeout(timeout, client.session(2)).await {
            Ok(Ok(s)) => s,
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let lock = client.lock_handle("faults-lock", &session);
        while !stop.load(Ordering::Relaxed) && matches!(session.state(), kvd::client::LeaseState::Alive(_)) {
            let guard = match tokio::time::timeout(Duration::from_secs(10), lock.lock()).await {
                Ok(Ok(g)) => g,
                _ => break,
            };
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Create as i32,
                    key: guard.key.clone(),
                    target_union: Some(TargetUnion::CreateRevision(guard.rev)),
                    range_end: Vec::new(),
                }],
                success: vec![RequestOp {
                    request: Some(Op::RequestPut(PutRequest {
                        key: b"fenced".to_vec(),
                        value: guard.rev.to_string().into_bytes(),
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            };
            if let Ok(Ok(resp)) = tokio::time::timeout(timeout, client.txn(txn)).await {
                if resp.succeeded {
                    let revision = resp.header.map(|h| h.revision).unwrap_or(0);
                    record.fenced.lock().unwrap_or_else(|p| p.into_inner()).push(Fenced { token: guard.rev, revision });
                }
            }
            let _ = tokio::time::timeout(timeout, lock.unlock(guard)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tokio::time::timeout(timeout, session.close(&client)).await;
    }
}

/// Fenced writes in revision order must carry tokens that never go down: a
/// holder whose lock was lost cannot write after a newer holder did.
pub fn check_fenced(writes: &[Fenced]) -> Vec<String> {
    let mut w = writes.to_vec();
    w.sort_by_key(|f| f.revision);
    w.windows(2)
        .filter(|p| p[1].token < p[0].token)
        .map(|p| {
            format!(
                "fenced write at revision {} with token {} after one at revision {} with token {}",
                p[1].revision, p[1].token, p[0].revision, p[0].token
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Record;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_lease_is_due_only_once_the_faults_have_ended() {
        let r = Record::default();
        assert!(!r.past_due(0, 2 * S, 2 * S));
        assert!(r.past_due(0, 2 * S, 2 * S + 1), "with no fault the bound counts from the last keep-alive");
        r.fault(true, S);
        assert!(!r.past_due(0, 2 * S, 10 * S), "never while a fault is under way");
        r.fault(false, 5 * S);
        assert!(!r.past_due(0, 2 * S, 7 * S), "the bound counts from when the faults ended");
        assert!(r.past_due(0, 2 * S, 7 * S + 1));
        assert!(!r.past_due(8 * S, 2 * S, 10 * S), "a later keep-alive counts from itself");
        assert!(r.past_due(8 * S, 2 * S, 10 * S + 1));
    }
}

//! The differential test: one seeded random sequence of KV operations (puts,
//! deletes, ranges with options, txns, compactions) is sent to a real etcd
//! 3.4 (Debian's `etcd-server`) and to a three-member kvd, and every response
//! or error is compared field by field (headers' ids and term aside).

mod support;

use std::time::Duration;

use kvd::client::Client;
use kvd::proto::etcdserverpb::compare::TargetUnion;
use kvd::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kvd::proto::etcdserverpb::request_op::Request;
use kvd::proto::etcdserverpb::response_op::Response;
use kvd::proto::etcdserverpb::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{wait_ready, Etcd, TestCluster};

const KEYS: &[&[u8]] = &[b"a", b"a/1", b"a/2", b"b", b"b\0", b"c", b"\xff", b"\xff\xff"];

struct Gen {
    rng: StdRng,
    /// The newest revision seen, to aim revision options near it.
    rev: i64,
}

impl Gen {
    fn key(&mut self) -> Vec<u8> {
        KEYS[self.rng.gen_range(0..KEYS.len())].to_vec()
    }

    fn range_end(&mut self, key: &[u8]) -> Vec<u8> {
        match self.rng.gen_range(0..5) {
            0 | 1 => Vec::new(),
            2 => kvd::mvcc::keys::prefix_end(key),
            3 => vec![0],
            _ => self.key(),
        }
    }

    fn rev_near(&mut self) -> i64 {
        match self.rng.gen_range(0..4) {
            0 => 0,
            1 => self.rng.gen_range(-1..=self.rev + 2),
            _ => (self.rev - self.rng.gen_range(0..6)).max(0),
        }
    }

    fn range(&mut self) -> RangeRequest {
        let key = self.key();
        let range_end = self.range_end(&key);
        let sort_target = self.rng.gen_range(0..5);
        let sort_order = self.rng.gen_range(0..3);
        // Among equal sort values etcd's order is unspecified, so a limit
        // would make the answer unspecified too.
        let limit =
            if sort_target == SortTarget::Key as i32 && self.rng.gen_bool(0.4) { self.rng.gen_range(0..4) } else { 0 };
        let filter = |g: &mut Gen| if g.rng.gen_bool(0.15) { g.rev_near() } else { 0 };
        RangeRequest {
            key,
            range_end,
            limit,
            revision: if self.rng.gen_bool(0.3) { self.rev_near() } else { 0 },
            sort_order,
            sort_target,
            // Serializable reads may be stale on a follower by design, so the
            // comparison uses linearizable reads only.
            serializable: false,
            keys_only: self.rng.gen_bool(0.2),
            count_only: self.rng.gen_bool(0.1),
            min_mod_revision: filter(self),
            max_mod_revision: filter(self),
            min_create_revision: filter(self),
            max_create_revision: filter(self),
        }
    }

    fn put(&mut self) -> PutRequest {
        let ignore_value = self.rng.gen_bool(0.1);
        PutRequest {
            key: self.key(),
            value: if ignore_value { Vec::new() } else { format!("v{}", self.rng.gen_range(0..100)).into_bytes() },
            lease: 0,
            prev_kv: self.rng.gen_bool(0.5),
            ignore_value,
            ignore_lease: self.rng.gen_bool(0.05),
        }
    }

    /// A DeleteRange. Inside a Txn it never deletes "from key on": etcd 3.4
    /// fails while applying a Txn that later puts a key such a delete covers
    /// (kvd refuses it as a duplicate key; see mvcc::txn).
    fn delete(&mut self, in_txn: bool) -> DeleteRangeRequest {
        let key = self.key();
        let mut range_end = self.range_end(&key);
        if in_txn && range_end == [0] {
            range_end = Vec::new();
        }
        DeleteRangeRequest { key, range_end, prev_kv: self.rng.gen_bool(0.5) }
    }

    fn compare(&mut self) -> Compare {
        let target = self.rng.gen_range(0..5);
        let n = self.rng.gen_range(0..=self.rev.max(1));
        let union = match target {
            0 => TargetUnion::Version(self.rng.gen_range(0..4)),
            1 => TargetUnion::CreateRevision(n),
            2 => TargetUnion::ModRevision(n),
            3 => TargetUnion::Value(format!("v{}", self.rng.gen_range(0..100)).into_bytes()),
            _ => TargetUnion::Lease(0),
        };
        let key = self.key();
        let range_end = if self.rng.gen_bool(0.2) { self.range_end(&key) } else { Vec::new() };
        Compare { result: self.rng.gen_range(0..4), target, key, target_union: Some(union), range_end }
    }

    fn ops(&mut self, depth: u32) -> Vec<RequestOp> {
        (0..self.rng.gen_range(0..4))
            .map(|_| {
                let request = match self.rng.gen_range(0..if depth < 1 { 4 } else { 3 }) {
                    0 => Request::RequestRange(self.range()),
                    1 => Request::RequestPut(self.put()),
                    2 => Request::RequestDeleteRange(self.delete(true)),
                    _ => Request::RequestTxn(self.txn(depth + 1)),
                };
                RequestOp { request: Some(request) }
            })
            .collect()
    }

    fn txn(&mut self, depth: u32) -> TxnRequest {
        TxnRequest {
            compare: (0..self.rng.gen_range(0..3)).map(|_| self.compare()).collect(),
            success: self.ops(depth),
            failure: self.ops(depth),
        }
    }
}

/// A response with the fields that differ between servers cleared.
#[derive(Debug, PartialEq)]
enum Outcome {
    Range(RangeResponse),
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse),
    Error(i32, String),
}

fn strip(h: &mut Option<ResponseHeader>) -> i64 {
    let h = h.get_or_insert_with(Default::default);
    h.cluster_id = 0;
    h.member_id = 0;
    h.raft_term = 0;
    // kvd's addition; etcd's header has none.
    h.auth_revision = 0;
    h.revision
}

/// Orders results sorted by a non-key target by key within equal values, as
/// etcd leaves that order unspecified.
fn normalise_range(req: &RangeRequest, resp: &mut RangeResponse) {
    if req.sort_target != SortTarget::Key as i32 || req.sort_order == SortOrder::None as i32 && req.sort_target != 0 {
        let target = |kv: &kvd::proto::mvccpb::KeyValue| -> Vec<u8> {
            match SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key) {
                SortTarget::Key => kv.key.clone(),
                SortTarget::Version => kv.version.to_be_bytes().to_vec(),
                SortTarget::Create => kv.create_revision.to_be_bytes().to_vec(),
                SortTarget::Mod => kv.mod_revision.to_be_bytes().to_vec(),
                SortTarget::Value => kv.value.clone(),
            }
        };
        let descend = req.sort_order == SortOrder::Descend as i32;
        resp.kvs.sort_by(|a, b| {
            let o = target(a).cmp(&target(b));
            (if descend { o.reverse() } else { o }).then_with(|| a.key.cmp(&b.key))
        });
    }
}

fn normalise_txn(req: &TxnRequest, resp: &mut TxnResponse) {
    let ops = if resp.succeeded { &req.success } else { &req.failure };
    for (op, r) in ops.iter().zip(resp.responses.iter_mut()) {
        match (&op.request, &mut r.response) {
            (Some(Request::RequestRange(q)), Some(Response::ResponseRange(a))) => normalise_range(q, a),
            (Some(Request::RequestTxn(q)), Some(Response::ResponseTxn(a))) => normalise_txn(q, a),
            _ => {}
        }
    }
}

async fn apply(client: &Client, op: &Op) -> (Outcome, i64) {
    let err = |s: tonic::Status| (Outcome::Error(s.code() as i32, s.message().to_string()), 0);
    match op {
        Op::Range(r) => match client.range(r.clone()).await {
            Ok(mut a) => {
                let rev = strip(&mut a.header);
                normalise_range(r, &mut a);
                (Outcome::Range(a), rev)
            }
            Err(s) => err(s),
        },
        Op::Put(p) => match client.put(p.clone()).await {
            Ok(mut a) => {
                let rev = strip(&mut a.header);
                (Outcome::Put(a), rev)
            }
            Err(s) => err(s),
        },
        Op::Delete(d) => match client.delete_range(d.clone()).await {
            Ok(mut a) => {
                let rev = strip(&mut a.header);
                (Outcome::Delete(a), rev)
            }
            Err(s) => err(s),
        },
        Op::Txn(t) => match client.txn(t.clone()).await {
            Ok(mut a) => {
                let rev = strip(&mut a.header);
                normalise_txn(t, &mut a);
                (Outcome::Txn(a), rev)
            }
            Err(s) => err(s),
        },
        Op::Compact(c) => match client.compact(*c).await {
            Ok(mut a) => {
                let rev = strip(&mut a.header);
                (Outcome::Compact(a), rev)
            }
            Err(s) => err(s),
        },
    }
}

#[derive(Debug)]
enum Op {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
}

fn next_op(g: &mut Gen) -> Op {
    match g.rng.gen_range(0..20) {
        0..=5 => Op::Put(g.put()),
        6..=7 => Op::Delete(g.delete(false)),
        8..=12 => Op::Range(g.range()),
        13..=18 => Op::Txn(g.txn(0)),
        _ => Op::Compact(CompactionRequest { revision: g.rev - g.rng.gen_range(-1..6), physical: g.rng.gen_bool(0.5) }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kvd_answers_like_etcd_for_random_kv_operations() {
    let etcd = Etcd::start();
    let reference = Client::new(std::slice::from_ref(&etcd.client), Duration::from_secs(2)).unwrap();
    wait_ready(&reference).await;
    let cluster = TestCluster::start(3, |_| {}).await;
    let members: Vec<Client> = (0..3).map(|i| cluster.client(i)).collect();
    let seeds: Vec<u64> = match std::env::var("KVD_DIFF_SEEDS") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => vec![1, 2, 3],
    };
    let per_seed: usize = std::env::var("KVD_DIFF_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(250);
    let mut g = Gen { rng: StdRng::seed_from_u64(0), rev: 1 };
    let mut compared = 0;
    for seed in seeds {
        g.rng = StdRng::seed_from_u64(seed);
        for step in 0..per_seed {
            let op = next_op(&mut g);
            let (want, rev) = apply(&reference, &op).await;
            let (got, _) = apply(&members[step % 3], &op).await;
            assert_eq!(got, want, "seed {seed}, step {step}: kvd and etcd differ on {op:?}");
            g.rev = g.rev.max(rev);
            compared += 1;
        }
        // Clear the keyspace between seeds so each seed starts alike.
        let all = Op::Delete(DeleteRangeRequest { key: vec![0], range_end: vec![0], prev_kv: false });
        let (want, _) = apply(&reference, &all).await;
        let (got, _) = apply(&members[0], &all).await;
        assert_eq!(got, want, "seed {seed}: final delete differs");
    }
    println!("compared {compared} responses with etcd 3.4");
    cluster.shutdown().await;
}

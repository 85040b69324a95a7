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

/// What one watch received, in order: each response's events (key, type,
/// value, mod revision, previous value) or, for a response without events,
/// what it said (created, cancelled and why, the compacted revision).
type Transcript = std::collections::BTreeMap<i64, Vec<String>>;

fn describe(resp: &WatchResponse) -> Vec<String> {
    let value = |kv: &Option<kvd::proto::mvccpb::KeyValue>| {
        kv.as_ref().map(|kv| format!("{}={}", String::from_utf8_lossy(&kv.key), String::from_utf8_lossy(&kv.value)))
    };
    if resp.events.is_empty() {
        let rev = if resp.created { strip(&mut resp.header.clone()) } else { 0 };
        return vec![format!(
            "created={} canceled={} compact={} reason={:?} rev={rev}",
            resp.created, resp.canceled, resp.compact_revision, resp.cancel_reason
        )];
    }
    resp.events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().expect("an event carries its key");
            format!("{} {:?} @{} prev={:?}", e.r#type, value(&e.kv), kv.mod_revision, value(&e.prev_kv))
        })
        .collect()
}

/// Runs the same watch session on one stream of `endpoint`: watches from a
/// past, the current and a future revision, with filters and previous
/// values, a compacted start, a duplicate id, a cancel mid-way and a
/// progress request; returns each watch's transcript and the progress
/// response's revision.
async fn watch_session(endpoint: &str) -> (Transcript, i64) {
    use kvd::proto::etcdserverpb::watch_client::WatchClient;
    use kvd::proto::etcdserverpb::watch_create_request::FilterType;
    use kvd::proto::etcdserverpb::watch_request::RequestUnion;
    let client = Client::new(&[endpoint.to_string()], Duration::from_secs(2)).unwrap();
    let put = |k: &str, v: &str| PutRequest { key: k.into(), value: v.into(), ..Default::default() };
    let mut revs = Vec::new();
    for (k, v) in [("a", "1"), ("b", "1"), ("a", "2"), ("c", "1"), ("a", "3"), ("b", "2")] {
        revs.push(client.put(put(k, v)).await.unwrap().header.unwrap().revision);
    }
    client.compact(CompactionRequest { revision: revs[1], physical: true }).await.unwrap();
    let current = *revs.last().unwrap();

    let (requests, rx) = tokio::sync::mpsc::channel(16);
    let send = |r: RequestUnion| {
        let requests = requests.clone();
        async move { requests.send(WatchRequest { request_union: Some(r) }).await.unwrap() }
    };
    let create = |key: &str, end: &[u8], start: i64| WatchCreateRequest {
        key: key.into(),
        range_end: end.to_vec(),
        start_revision: start,
        ..Default::default()
    };
    let mut transcript = Transcript::new();
    let mut progress = None;
    // Reads until `done` holds for what was read.
    async fn read_until(
        stream: &mut tonic::Streaming<WatchResponse>,
        transcript: &mut Transcript,
        progress: &mut Option<i64>,
        done: impl Fn(&Transcript, Option<i64>) -> bool,
    ) {
        while !done(transcript, *progress) {
            let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the watch stream answers")
                .expect("a watch response")
                .expect("the stream stays open");
            if resp.watch_id == -1 && !resp.created {
                *progress = Some(resp.header.expect("a header").revision);
            } else {
                transcript.entry(resp.watch_id).or_default().extend(describe(&resp));
            }
        }
    }
    let created = |n: usize| {
        move |t: &Transcript, _: Option<i64>| {
            t.values().flatten().filter(|l| l.starts_with("created=true")).count() >= n
        }
    };

    // 0: key a from a past revision, with previous values.
    send(RequestUnion::CreateRequest(WatchCreateRequest { prev_kv: true, ..create("a", b"", revs[2]) })).await;
    // A server answers the call once it has a response to send.
    let channel = kvd::client::channel(endpoint, Duration::from_secs(2), None).unwrap();
    let mut stream =
        WatchClient::new(channel).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // 1: every key from now on, deletes only.
    send(RequestUnion::CreateRequest(WatchCreateRequest {
        filters: vec![FilterType::Noput as i32],
        ..create("\0", b"\0", 0)
    }))
    .await;
    // 2: [a, c) from a past revision, puts only.
    send(RequestUnion::CreateRequest(WatchCreateRequest {
        filters: vec![FilterType::Nodelete as i32],
        ..create("a", b"c", revs[3])
    }))
    .await;
    // 100: key c from a future revision, under an id of the client's.
    send(RequestUnion::CreateRequest(WatchCreateRequest { watch_id: 100, ..create("c", b"", current + 3) })).await;
    read_until(&mut stream, &mut transcript, &mut progress, created(4)).await;
    // The same id again, and a start before the compacted revision.
    send(RequestUnion::CreateRequest(WatchCreateRequest { watch_id: 100, ..create("b", b"", 0) })).await;
    send(RequestUnion::CreateRequest(WatchCreateRequest { watch_id: 7, ..create("b", b"", revs[0]) })).await;
    read_until(&mut stream, &mut transcript, &mut progress, created(6)).await;

    // Watch 2 is cancelled once it has the next revision's event, before
    // any later one is written.
    let a4 = client.put(put("a", "4")).await.unwrap().header.unwrap().revision;
    read_until(&mut stream, &mut transcript, &mut progress, |t, _| {
        t.get(&2).is_some_and(|l| l.iter().any(|e| e.contains(&format!("@{a4} "))))
    })
    .await;
    send(RequestUnion::CancelRequest(kvd::proto::etcdserverpb::WatchCancelRequest { watch_id: 2 })).await;
    read_until(&mut stream, &mut transcript, &mut progress, |t, _| {
        t.get(&2).is_some_and(|l| l.last().is_some_and(|e| e.contains("canceled=true")))
    })
    .await;
    for (k, v) in [("c", "2"), ("b", "3")] {
        client.put(put(k, v)).await.unwrap();
    }
    client.delete_range(DeleteRangeRequest { key: "a".into(), ..Default::default() }).await.unwrap();
    client.put(put("c", "3")).await.unwrap();
    client.put(put("a", "5")).await.unwrap();
    // One revision every open watch sees: a put of a and of c, a delete of b.
    let last = client
        .txn(TxnRequest {
            success: vec![
                RequestOp { request: Some(Request::RequestPut(put("a", "6"))) },
                RequestOp { request: Some(Request::RequestPut(put("c", "4"))) },
                RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: "b".into(),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    read_until(&mut stream, &mut transcript, &mut progress, |t, _| {
        [0, 1, 100].iter().all(|id| t.get(id).is_some_and(|l| l.iter().any(|e| e.contains(&format!("@{last} ")))))
    })
    .await;
    send(RequestUnion::ProgressRequest(Default::default())).await;
    read_until(&mut stream, &mut transcript, &mut progress, |_, p| p.is_some()).await;
    (transcript, progress.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_sharing_a_stream_answer_like_etcd() {
    let etcd = Etcd::start();
    let reference = Client::new(std::slice::from_ref(&etcd.client), Duration::from_secs(2)).unwrap();
    wait_ready(&reference).await;
    let want = watch_session(&etcd.client).await;
    let cluster = TestCluster::start(3, |_| {}).await;
    // A follower's watches: served from its own applied state.
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let got = watch_session(&format!("http://{}", cluster.client_addrs[follower])).await;
    assert_eq!(got, want, "kvd's watches differ from etcd's");
    // What etcd answered is what the session is meant to check.
    // What etcd answered is what the session is meant to check: a watch
    // for each case, the duplicate id refused, the compacted start
    // cancelled, and progress as of the last write.
    let (t, progress) = &want;
    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![-1, 0, 1, 2, 7, 100], "{t:#?}");
    assert!(t[&-1][0].contains("duplicate watch ID"), "{t:#?}");
    assert!(t[&7].iter().any(|l| l.contains("canceled=true compact=3")), "{t:#?}");
    assert!(t[&0].last().is_some_and(|l| l.ends_with(&format!("@{progress} prev=Some(\"a=5\")"))), "{t:#?}");
    cluster.shutdown().await;
}

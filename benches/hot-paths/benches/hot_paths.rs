//! Micro-benchmarks of the write path's hot spots: applying committed puts to
//! the state machine (MVCC in sled) and appending entries to the Raft log;
//! and of the leader's look for expired leases, ten times a second.
//! `cargo bench -p kvd-benches` measures them; the test suite only builds
//! and runs each once (`cargo test --all-targets`), without timing anything.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvd::lease::Lessor;
use kvd::mvcc::{Lease, LeaseKeys, LeaseLog};
use kvd::proto::etcdserverpb::PutRequest;
use kvd::proto::kvdpb::{command, Command};
use kvd::raft::log_store::LogStore;
use kvd::raft::state_machine::StateMachine;
use kvd::raft::{Entry, Request};
use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
use openraft::testing::log_id;
use openraft::EntryPayload;
use prost::Message;

fn put_entry(index: u64) -> Entry {
    let put = PutRequest {
        key: format!("key-{:08}", index % 100_000).into_bytes(),
        value: vec![b'v'; 256],
        ..Default::default()
    };
    let bytes = Command { op: Some(command::Op::Put(put)), stamp: None }.encode_to_vec();
    Entry { log_id: log_id(1, 1, index), payload: EntryPayload::Normal(Request(bytes)) }
}

fn apply_puts(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new().path(dir.path().join("db")).open().expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    let mut next = 1u64;
    let mut group = c.benchmark_group("state_machine");
    for batch in [1u64, 64] {
        group.bench_function(format!("apply and commit {batch} put(s) of 256 B"), |b| {
            b.iter_batched(
                || {
                    let entries: Vec<Entry> = (next..next + batch).map(put_entry).collect();
                    next += batch;
                    entries
                },
                |entries| {
                    rt.block_on(sm.apply(entries)).expect("apply");
                    // Applying commits to sled only now and then; count the
                    // commit every time.
                    drop(sm.shared().read_committed().expect("commit"));
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn append_log(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = rt.block_on(async { LogStore::open(&dir.path().join("log")) }).expect("log store");
    let mut next = 1u64;
    let mut group = c.benchmark_group("raft_log");
    for batch in [1u64, 64] {
        group.bench_function(format!("append {batch} entr(ies) and fdatasync"), |b| {
            b.iter_batched(
                || {
                    let entries: Vec<Entry> = (next..next + batch).map(put_entry).collect();
                    next += batch;
                    entries
                },
                |entries| rt.block_on(log.blocking_append(entries)).expect("append"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// The leader's look for expired leases among 100,000: when none was
/// granted or revoked since the last look, when the store cannot tell which
/// were, and when one was (a client that grants or revokes leases all the
/// time).
fn look_for_expired_leases(c: &mut Criterion) {
    let lessor = Lessor::new(Duration::ZERO);
    let mut leases = BTreeMap::new();
    let mut log = LeaseLog::new();
    for id in 1..=100_000i64 {
        let granted = log.record(id);
        leases.insert(id, Lease { ttl: 3600, keys: LeaseKeys::default(), granted });
    }
    let now = Instant::now();
    let mut group = c.benchmark_group("lessor");
    group.bench_function("look at 100,000 leases, none changed", |b| {
        b.iter(|| lessor.expired(1, &leases, &log, now, 1024))
    });
    // What every look after a change cost before the store kept a log of
    // changes, and still costs when the log does not reach back to the
    // last look: a store opened anew (a snapshot installed) has a log of
    // its own.
    group.bench_function("look at 100,000 leases, every one matched", |b| {
        b.iter(|| lessor.expired(1, &leases, &LeaseLog::new(), now, 1024))
    });
    let churn = 1_000_000i64;
    group.bench_function("look at 100,000 leases, one granted or revoked since", |b| {
        b.iter(|| {
            if leases.remove(&churn).is_some() {
                log.record(churn);
            } else {
                let granted = log.record(churn);
                leases.insert(churn, Lease { ttl: 3600, keys: LeaseKeys::default(), granted });
            }
            lessor.expired(1, &leases, &log, now, 1024)
        })
    });
    group.finish();
}

criterion_group!(benches, apply_puts, append_log, look_for_expired_leases);
criterion_main!(benches);

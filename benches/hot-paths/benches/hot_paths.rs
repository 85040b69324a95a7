//! Micro-benchmarks of the write path's hot spots: applying committed puts to
//! the state machine (MVCC in sled) and appending entries to the Raft log.
//! `cargo bench -p kvd-benches` measures them; the test suite only builds
//! and runs each once (`cargo test --all-targets`), without timing anything.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
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

criterion_group!(benches, apply_puts, append_log);
criterion_main!(benches);

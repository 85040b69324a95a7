use super::*;
use crate::mvcc::{Batch, MvccStore};
use crate::proto::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse};
use crate::proto::kvdpb::{command_result, CommandResult};
use crate::raft::decode;
use openraft::storage::RaftStateMachine;
use openraft::testing::log_id;

/// A temporary state tree, and a value file in `dir`.
fn temp_files(dir: &Path) -> Files {
    let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
    let values = ValueLog::create(&dir.join("values-t"), 1).expect("value file");
    Files::new(tree, Arc::new(values))
}

pub(super) fn put(key: &str, value: &str) -> Command {
    let p = PutRequest { key: key.into(), value: value.into(), ..Default::default() };
    Command { op: Some(command::Op::Put(p)), stamp: None }
}

/// A Txn that reads `key` at `revision`.
fn read_at(key: &str, revision: i64) -> Command {
    let r = RangeRequest { key: key.into(), revision, ..Default::default() };
    let op = RequestOp { request: Some(request_op::Request::RequestRange(r)) };
    Command {
        op: Some(command::Op::Txn(TxnRequest { compare: vec![], success: vec![op], failure: vec![] })),
        stamp: None,
    }
}

pub(super) fn entry(index: u64, command: Command) -> Entry {
    Entry { log_id: log_id(1, 1, index), payload: EntryPayload::Normal(Request(command.encode_to_vec())) }
}

pub(super) fn batch(index: u64, commands: Vec<Command>) -> Entry {
    let commands = commands.iter().map(|c| c.encode_to_vec()).collect();
    entry(index, Command { op: Some(command::Op::Batch(crate::proto::kvdpb::CommandBatch { commands })), stamp: None })
}

fn result(response: &Response) -> command_result::Result {
    let bytes = response.0.as_ref().expect("applied");
    CommandResult::decode(bytes.as_slice()).expect("result").result.expect("some result")
}

fn values(txn: command_result::Result) -> Vec<Vec<u8>> {
    let command_result::Result::Txn(TxnResponse { responses, .. }) = txn else { panic!("not a txn: {txn:?}") };
    responses
        .into_iter()
        .flat_map(|r| match r.response {
            Some(crate::proto::etcdserverpb::response_op::Response::ResponseRange(r)) => r.kvs,
            other => panic!("not a range: {other:?}"),
        })
        .map(|kv| kv.value)
        .collect()
}

#[tokio::test]
async fn history_reads_see_every_earlier_entry_and_are_never_batched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    // Entry 1 writes revisions 2 and 3; entry 2, applied in the same
    // call, reads revision 3 from history: it must see entry 1.
    let out = sm.apply(vec![batch(1, vec![put("a", "1"), put("a", "2")]), entry(2, read_at("a", 3))]).await;
    let out = out.expect("apply");
    assert_eq!(values(result(&out[1])), vec![b"2".to_vec()]);
    // Within a batch, a history read could only see part of its own
    // entry; every member refuses it alike.
    let out = sm.apply(vec![batch(3, vec![put("a", "3"), read_at("a", 4)])]).await.expect("apply");
    let list: Vec<Response> = decode(out[0].0.as_ref().expect("batch applied")).expect("responses");
    assert!(matches!(result(&list[0]), command_result::Result::Put(_)));
    assert!(matches!(&list[1].0, Err(Error::Internal(m)) if m.contains("batched")), "{:?}", list[1].0);
}

#[tokio::test]
async fn a_revision_waiter_is_answered_once_its_revision_is_applied_and_not_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    let shared = sm.shared();
    let now = shared.read().store.revision();
    assert!(shared.revision_reached(now).is_none(), "the current revision is reached already");
    let mut next = shared.revision_reached(now + 1).expect("a waiter for the next revision");
    let mut later = shared.revision_reached(now + 2).expect("a waiter for the one after");
    // A waiter that gives up is dropped; its place goes when its revision does.
    drop(shared.revision_reached(now + 2).expect("a waiter that gives up"));
    sm.apply(vec![entry(1, put("a", "1"))]).await.expect("apply");
    assert_eq!(next.try_recv(), Ok(()), "revision {} was applied", now + 1);
    assert_eq!(later.try_recv(), Err(oneshot::error::TryRecvError::Empty), "revision {} was not", now + 2);
    sm.apply(vec![entry(2, put("a", "2"))]).await.expect("apply");
    assert_eq!(later.try_recv(), Ok(()));
    assert_eq!(shared.revision_waiters.lock().expect("waiters").len(), 0, "a waiter was kept");
    // One waiting when the member stops hears that it stopped.
    let stopping = shared.revision_reached(now + 3).expect("a waiter");
    drop(shared);
    drop(sm);
    let heard = tokio::time::timeout(std::time::Duration::from_secs(10), stopping).await;
    assert!(matches!(heard, Ok(Err(_))), "the waiter did not hear of the stop: {heard:?}");
}

/// Writes that gave up waiting (timed out) while applying stalled are
/// dropped as more come, not kept until their revisions are applied; one
/// still waiting is kept through every drop and answered.
#[tokio::test]
async fn revision_waiters_that_gave_up_are_dropped_while_applying_stalls() {
    use super::view::PRUNE_WAITERS_AT;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    let shared = sm.shared();
    let now = shared.read().store.revision();
    let mut waiting = shared.revision_reached(now + 1).expect("a waiter");
    for i in 0..3 * PRUNE_WAITERS_AT as i64 {
        drop(shared.revision_reached(now + 2 + i).expect("a waiter that gives up"));
        let kept = shared.revision_waiters.lock().expect("waiters").len();
        assert!(kept <= PRUNE_WAITERS_AT, "{kept} waiters kept after {} gave up", i + 1);
    }
    sm.apply(vec![entry(1, put("a", "1"))]).await.expect("apply");
    assert_eq!(waiting.try_recv(), Ok(()), "the write still waiting was not answered");
}

#[tokio::test]
async fn handed_off_writes_are_read_from_memory_until_sled_has_them() {
    use crate::mvcc::keys::RangeEnd;
    let dir = tempfile::tempdir().expect("tempdir");
    let n = MAX_UNFLUSHED_WRITES; // two sled writes per put: a hand-off is due
    let key = |i: usize| format!("k{i:05}");
    {
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        let puts = (0..n).map(|i| put(&key(i), &i.to_string())).collect();
        sm.apply(vec![batch(1, puts)]).await.expect("apply");
        let shared = sm.shared();
        {
            let state = shared.read();
            assert!(state.unflushed.is_empty(), "the group was not handed off");
            assert!(state.store.is_sending());
            // Every value reads at once, from memory or from sled.
            let kvs = state.store.current_kvs(b"k", &RangeEnd::Before(b"l".to_vec())).expect("read");
            let got: Vec<Vec<u8>> = kvs.into_iter().map(|kv| kv.value).collect();
            assert_eq!(got, (0..n).map(|i| i.to_string().into_bytes()).collect::<Vec<_>>());
        }
        // A command that reads history waits for the group on its way.
        let out = sm.apply(vec![entry(2, read_at(&key(0), 2))]).await.expect("apply");
        assert_eq!(values(result(&out[0])), vec![b"0".to_vec()]);
        // So does a read of history.
        let state = shared.read_committed().expect("commit");
        assert!(!state.store.is_sending());
        let old = state.store.at_revision(key(n - 1).as_bytes(), &RangeEnd::Single, n as i64 + 1).expect("read");
        assert_eq!(old.iter().map(|kv| kv.value.clone()).collect::<Vec<_>>(), vec![(n - 1).to_string().into_bytes()]);
        drop(state);
        db.flush().expect("flush");
    }
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let sm = StateMachine::open(&db, dir.path()).expect("state machine");
    assert_eq!(sm.last_applied().map(|l| l.index), Some(2));
    assert_eq!(sm.shared().read().store.len(), n);
}

#[tokio::test]
async fn applied_writes_wait_for_a_commit_and_are_read_from_disk_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = || vec![batch(1, vec![put("a", "1"), put("b", "2")]), entry(2, put("a", "3"))];
    {
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        sm.apply(entries()).await.expect("apply");
        db.flush().expect("flush");
    }
    // Not committed yet: the member starts from before them, and
    // applies them again from the log.
    {
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        assert_eq!(sm.last_applied(), None);
        assert!(sm.shared().read().store.is_empty());
        sm.apply(entries()).await.expect("apply again");
        // A read of history commits them.
        let shared = sm.shared();
        assert!(matches!(shared.read_committed().expect("commit"), Committed::Written(_)));
        assert!(matches!(shared.read_committed().expect("commit"), Committed::Read(_)));
        db.flush().expect("flush");
    }
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let sm = StateMachine::open(&db, dir.path()).expect("state machine");
    assert_eq!(sm.last_applied().map(|l| l.index), Some(2));
    let shared = sm.shared();
    let state = shared.read();
    let kvs = state.store.current_kvs(b"a", &crate::mvcc::keys::RangeEnd::Before(b"c".to_vec())).expect("read");
    let got: Vec<(&[u8], &[u8], i64)> = kvs.iter().map(|kv| (&kv.key[..], &kv.value[..], kv.version)).collect();
    assert_eq!(got, vec![(&b"a"[..], &b"3"[..], 2), (&b"b"[..], &b"2"[..], 1)]);
}

#[test]
fn snapshot_data_and_file_keep_the_layout_every_kvd_reads() {
    use std::io::{Cursor, Seek, SeekFrom};
    let dir = tempfile::tempdir().expect("tempdir");
    let files = temp_files(dir.path());
    let tree = files.tree.clone();
    // Records of three kinds the state tree holds: a member's attributes,
    // metadata and a run of revision order.
    for (k, v) in [(&b"a"[..], &b"1"[..]), (b"mb", b""), (b"s\xff", &[7u8; 300][..])] {
        tree.insert(k, v).expect("insert");
    }
    // The data as bincode gives the records' list, as older members wrote it.
    let mut out = Cursor::new(b"xy".to_vec());
    out.seek(SeekFrom::End(0)).expect("seek");
    let (_, len) = write_records(&files, None, &mut out).expect("write");
    let data = out.into_inner()[2..].to_vec();
    assert_eq!(len, data.len() as u64);
    let listed: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> = tree
        .iter()
        .map(|item| item.map(|(k, v)| (serde_bytes::ByteBuf::from(k.to_vec()), serde_bytes::ByteBuf::from(v.to_vec()))))
        .collect::<Result<_, _>>()
        .expect("iter");
    assert_eq!(data, encode(&listed).expect("encode"));
    let mut read = Vec::new();
    let count = for_each_record(&data[..], len, |k, v| {
        read.push((k.to_vec(), v.to_vec()));
        Ok(())
    })
    .expect("read");
    assert_eq!(count, 3);
    assert_eq!(read[2], (b"s\xff".to_vec(), vec![7u8; 300]));
    // Cut short, with a byte too many, or with a length beyond the rest:
    // refused, and nothing is allocated for the length.
    assert!(for_each_record(&data[..data.len() - 1], len - 1, |_, _| Ok(())).is_err());
    let mut more = data.clone();
    more.push(0);
    assert!(for_each_record(&more[..], len + 1, |_, _| Ok(())).is_err());
    let mut huge = data.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = for_each_record(&huge[..], len, |_, _| Ok(())).expect_err("a length past the end");
    assert!(err.to_string().contains("where"), "{err}");
    // Copied and checked in one pass: whole records are copied as they
    // are; damaged ones are refused; a failed write is told as one.
    let mut copy = Vec::new();
    assert_eq!(copy_records(&data[..], len, &mut copy).expect("copy"), len);
    assert_eq!(copy, data);
    let err = copy_records(&huge[..], len, &mut Vec::new()).expect_err("a length past the end");
    assert!(err.to_string().contains("damaged snapshot data"), "{err}");
    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("no space left"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let err = copy_records(&data[..], len, &mut Full).expect_err("the write fails");
    assert!(err.to_string().contains("write snapshot: no space left"), "{err}");
    // The file as bincode gives the struct of metadata and data.
    #[derive(serde::Serialize)]
    struct Layout {
        meta: Meta,
        data: serde_bytes::ByteBuf,
    }
    let meta = SnapshotMeta { last_log_id: Some(log_id(2, 1, 9)), snapshot_id: "2-9".into(), ..Default::default() };
    let path = dir.path().join(SNAPSHOT_FILE);
    let data_file = dir.path().join("data");
    std::fs::write(&data_file, &data).expect("write");
    let mut from = std::fs::File::open(&data_file).expect("open");
    write_file_with(&path, &meta, len, |out| copy_records(&mut from, len, out)).expect("write");
    let file = std::fs::read(&path).expect("read");
    let layout = Layout { meta: meta.clone(), data: serde_bytes::ByteBuf::from(data.clone()) };
    assert_eq!(file, encode(&layout).expect("encode"));
    let open = open_snapshot_file(dir.path()).expect("open").expect("a snapshot");
    assert_eq!(open.meta, meta);
    let data_at = (file.len() - data.len()) as u64;
    assert_eq!((open.data_at, open.len, open.whole_len, open.values), (data_at, len, len, None));
    // A member's own file: the longer header, then the same data (none of
    // these records is a history record kept apart).
    let built = build_file(&files, None, &path, &meta).expect("build");
    let own = std::fs::read(&path).expect("read");
    assert_eq!((built.len, built.whole_len, &own[built.data_at as usize..]), (len, len, &data[..]));
    let open = open_snapshot_file(dir.path()).expect("open").expect("a snapshot");
    assert_eq!((open.data_at, open.len, open.whole_len, open.values), (built.data_at, len, len, Some(1)));
    let file = own;
    // A file cut short, or one that claims more data than it holds, is
    // refused, not read past its end.
    std::fs::write(&path, &file[..file.len() - 1]).expect("cut");
    assert!(open_snapshot_file(dir.path()).is_err());
    let mut bad = file.clone();
    let at = file.len() - data.len() - 8;
    bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bad).expect("corrupt");
    assert!(open_snapshot_file(dir.path()).is_err());
    std::fs::write(&path, &file[..5]).expect("cut");
    assert!(open_snapshot_file(dir.path()).is_err());
}

#[tokio::test]
async fn an_install_cut_short_by_a_crash_is_finished_at_start() {
    use openraft::storage::RaftSnapshotBuilder;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    sm.apply(vec![batch(1, vec![put("a", "1"), put("b", "2")])]).await.expect("apply");
    let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");

    // The snapshot file is written and the tree half replaced when the
    // member stops.
    let other = tempfile::tempdir().expect("tempdir");
    {
        let db2 = super::super::open_sled(&sled::Config::new().path(other.path().join("db"))).expect("sled");
        // As an install writes it: the data whole.
        let whole = other.path().join("whole");
        let mut data = snapshot.snapshot;
        let mut out = tokio::fs::File::create(&whole).await.expect("create");
        let len = tokio::io::copy(&mut *data, &mut out).await.expect("read the snapshot");
        let mut whole = std::fs::File::open(&whole).expect("open");
        write_file_with(&other.path().join(SNAPSHOT_FILE), &snapshot.meta, len, |out| {
            copy_records(&mut whole, len, out)
        })
        .expect("write");
        db2.insert(INSTALLING, &[1u8]).expect("mark");
        db2.open_tree("state").expect("tree").insert(b"junk", b"x").expect("junk");
        db2.flush().expect("flush");
    }
    let db2 = super::super::open_sled(&sled::Config::new().path(other.path().join("db"))).expect("sled");
    let sm2 = StateMachine::open(&db2, other.path()).expect("state machine");
    assert_eq!(db2.get(INSTALLING).expect("get"), None);
    assert_eq!(sm2.shared().read().store.tree().get(b"junk").expect("get"), None);
    assert_eq!(sm2.last_applied(), snapshot.meta.last_log_id);
    let open = open_snapshot_file(other.path()).expect("open").expect("a snapshot");
    assert_eq!(open.values, None, "the whole file is kept until a snapshot replaces it");
    let shared = sm2.shared();
    let state = shared.read();
    let kvs = state.store.current_kvs(b"", &crate::mvcc::keys::RangeEnd::Unbounded).expect("read");
    let got: Vec<(&[u8], &[u8])> = kvs.iter().map(|kv| (&kv.key[..], &kv.value[..])).collect();
    assert_eq!(got, vec![(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"2"[..])]);
}

/// The versions of `key` in the store's history, packed or not.
fn versions(files: &crate::mvcc::Files, key: &[u8]) -> usize {
    use std::ops::Bound::{Excluded, Included};
    let (from, to) = (crate::mvcc::keys::hist_prefix(key), crate::mvcc::keys::hist_prefix_end(key));
    files.history().range(Included(from), Excluded(to)).count()
}

async fn physical(shared: &Shared, rev: i64) {
    let wait = tokio::time::timeout(std::time::Duration::from_secs(60), shared.await_physical(rev));
    wait.await.expect("physical compaction took over a minute").expect("physical compaction");
}

#[tokio::test]
async fn compacted_history_is_removed_in_steps_after_the_compaction_is_applied() {
    use crate::proto::etcdserverpb::CompactionRequest;
    // Versions of one key, more than one step reads.
    let n = 3 * COMPACTION_STEP;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    sm.apply(vec![batch(1, (0..n).map(|i| put("k", &i.to_string())).collect())]).await.expect("apply");
    let rev = n as i64 + 1;
    let compact = |revision| Command {
        op: Some(command::Op::Compact(CompactionRequest { revision, physical: false })),
        stamp: None,
    };
    let out = sm.apply(vec![entry(2, compact(rev - 10))]).await.expect("apply");
    assert!(matches!(result(&out[0]), command_result::Result::Compact(_)));
    // A second compaction before the first is done takes over its pass.
    let out = sm.apply(vec![entry(3, compact(rev))]).await.expect("apply");
    assert!(matches!(result(&out[0]), command_result::Result::Compact(_)));
    let shared = sm.shared();
    physical(&shared, rev).await;
    assert_eq!(
        versions(&sm.shared().read().store.files(), b"k"),
        1,
        "only the version at the compacted revision is left"
    );
    assert_eq!(shared.read().store.physical(), rev);
}

#[tokio::test]
async fn a_member_that_stopped_before_compacted_history_was_removed_removes_it_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rev = {
        // A compaction applied and committed, none of its history
        // removed yet: what a member leaves when it stops midway.
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let files = open_files(&db, dir.path(), "state").expect("files");
        let mut store = MvccStore::open(files.clone()).expect("store");
        let mut batch = Batch::default();
        for i in 0..100 {
            let mut w = store.write();
            w.put(b"k", i.to_string().into_bytes(), 0);
            batch.append(w.finish().0);
        }
        let rev = store.revision();
        store.compact(rev, &mut batch).expect("compact");
        store.seal(&mut batch);
        crate::raft::committer::commit_to(&files, batch).expect("commit");
        assert!(store.compaction_step().is_some());
        db.flush().expect("flush");
        rev
    };
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let sm = StateMachine::open(&db, dir.path()).expect("state machine");
    // Nothing is removed until the member has accepted the data dir.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        versions(&sm.shared().read().store.files(), b"k"),
        100,
        "history removed before the data dir was accepted"
    );
    sm.resume_compaction();
    physical(&sm.shared(), rev).await;
    assert_eq!(versions(&sm.shared().read().store.files(), b"k"), 1);
}

#[tokio::test]
async fn a_snapshot_holds_the_entry_it_names_though_later_ones_are_applied_before_it_is_built() {
    use openraft::storage::RaftSnapshotBuilder;
    let n = MAX_UNFLUSHED_WRITES;
    let key = |i: usize| format!("k{i:05}");
    let puts = |value: &str| (0..n).map(|i| put(&key(i), value)).collect::<Vec<_>>();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    // Values kept apart from the tree: the snapshot carries them whole.
    let a = "a".repeat(crate::mvcc::values::SEPARATE_FROM);
    sm.apply(vec![batch(1, puts(&a))]).await.expect("apply");
    let mut builder = sm.get_snapshot_builder().await;
    // Applying goes on while the tree is copied: a group large enough
    // to be handed off, and one more entry.
    sm.apply(vec![batch(2, puts("b"))]).await.expect("apply");
    sm.apply(vec![entry(3, put("late", "x"))]).await.expect("apply");
    let snapshot = builder.build_snapshot().await.expect("build");
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(1));

    let other = tempfile::tempdir().expect("tempdir");
    let db2 = super::super::open_sled(&sled::Config::new().path(other.path().join("db"))).expect("sled");
    let mut sm2 = StateMachine::open(&db2, other.path()).expect("state machine");
    sm2.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
    let shared = sm2.shared();
    {
        let state = shared.read();
        assert_eq!(state.store.revision(), n as i64 + 1);
        let kvs = state.store.current_kvs(b"", &crate::mvcc::keys::RangeEnd::Unbounded).expect("read");
        assert_eq!(kvs.len(), n, "only the keys of entry 1");
        assert!(kvs.iter().all(|kv| kv.value == a.as_bytes() && kv.version == 1), "values of entry 1 only");
        // The member that installed keeps them apart again.
        assert!(state.store.files().values.len() >= (n * a.len()) as u64);
    }
    // Both members hash the history alike, wherever they keep the values.
    let rev = n as i64 + 1;
    assert_eq!(sm.shared().hash_kv(rev).await.expect("hash"), shared.hash_kv(rev).await.expect("hash"));
}

#[tokio::test]
async fn a_lease_expiry_counts_only_in_an_entry_of_the_term_that_decided_it() {
    use crate::proto::etcdserverpb::LeaseGrantRequest;
    use crate::proto::kvdpb::LeaseExpire;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    let at = |term: u64, index: u64, op: command::Op| Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(Request(Command { op: Some(op), stamp: None }.encode_to_vec())),
    };
    let grant = command::Op::LeaseGrant(LeaseGrantRequest { ttl: 10, id: 7 });
    let expire = |term| command::Op::LeaseExpire(LeaseExpire { id: 7, term });
    // Decided by the leader of term 5, it waited past a leadership change
    // and landed in an entry of term 6: void, and the lease lives on.
    let out = sm.apply(vec![at(5, 1, grant), at(6, 2, expire(5))]).await.expect("apply");
    assert_eq!(out[1].0, Err(Error::StaleLeaseExpiry));
    assert!(sm.shared().read().store.lease(7).is_some());
    // Decided by term 6's leader, in its own entry: revoked.
    let out = sm.apply(vec![at(6, 3, expire(6))]).await.expect("apply");
    assert!(matches!(result(&out[0]), command_result::Result::LeaseRevoke(_)));
    assert!(sm.shared().read().store.lease(7).is_none());
}

/// The bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry"))
        .map(|e| match e.file_type().expect("type").is_dir() {
            true => dir_bytes(&e.path()),
            false => e.metadata().expect("metadata").len(),
        })
        .sum()
}

#[tokio::test]
async fn a_defragment_moves_the_live_state_into_a_new_database_while_applying_goes_on() {
    use crate::mvcc::keys::RangeEnd;
    use crate::proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest};
    use crate::raft::db_dir;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_dir::open_db_at(&db_dir::db_path(dir.path()).expect("path")).expect("sled");
    db.insert(b"member_id", &7u64.to_be_bytes()).expect("identity");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    // 2,000 keys of 4 KiB, then 90% of them deleted and compacted away.
    let value = "v".repeat(4096);
    for e in 0..20u64 {
        let puts = (0..100).map(|i| put(&format!("k{:05}", e * 100 + i), &value)).collect();
        sm.apply(vec![batch(e + 1, puts)]).await.expect("apply");
    }
    let delete = DeleteRangeRequest { key: b"k00000".to_vec(), range_end: b"k01800".to_vec(), ..Default::default() };
    sm.apply(vec![entry(21, Command { op: Some(command::Op::DeleteRange(delete)), stamp: None })]).await.expect("del");
    let rev = sm.shared().read().store.revision();
    let compact = CompactionRequest { revision: rev, physical: false };
    sm.apply(vec![entry(22, Command { op: Some(command::Op::Compact(compact)), stamp: None })]).await.expect("compact");
    let shared = sm.shared();
    physical(&shared, rev).await;
    shared.flush().await.expect("flush");
    let before = dir_bytes(&dir.path().join("db"));

    // Entries applied while the state is copied land in the new database.
    let defrag = tokio::spawn(async move { shared.defragment().await });
    for e in 23..63u64 {
        sm.apply(vec![entry(e, put(&format!("late{e:03}"), "x"))]).await.expect("apply during the defragment");
    }
    let done = defrag.await.expect("join").expect("defragment");
    sm.apply(vec![entry(63, put("after", "y"))]).await.expect("apply after");
    assert_eq!(db_dir::db_dirs(dir.path()).expect("dirs"), ("db.b", "db"));
    assert!(!dir.path().join("db").exists(), "the old database is removed");
    let after = dir_bytes(&dir.path().join("db.b"));
    assert!(after * 3 < before, "{after} bytes on disk after the defragment, {before} before ({done:?})");

    let expected: Vec<Vec<u8>> = (1800..2000)
        .map(|i| format!("k{i:05}").into_bytes())
        .chain([b"after".to_vec()])
        .chain((23..63).map(|e| format!("late{e:03}").into_bytes()))
        .collect();
    let keys = |shared: &Shared| -> Vec<Vec<u8>> {
        let state = shared.read_committed().expect("committed");
        let kvs = state.store.current_kvs(b"\0", &RangeEnd::Unbounded).expect("read");
        let mut keys: Vec<Vec<u8>> = kvs.into_iter().map(|kv| kv.key).collect();
        keys.sort_by_key(|k| (k.starts_with(b"k"), k.clone()));
        keys
    };
    let mut sorted = expected.clone();
    sorted.sort_by_key(|k| (k.starts_with(b"k"), k.clone()));
    assert_eq!(keys(&sm.shared()), sorted);
    sm.shared().flush().await.expect("flush");
    drop(sm);
    drop(db);

    // A start opens the new database: the same state, the same identity.
    let db = db_dir::open_db_at(&db_dir::db_path(dir.path()).expect("path")).expect("reopen");
    assert_eq!(db.get(b"member_id").expect("get").as_deref(), Some(&7u64.to_be_bytes()[..]));
    let sm = StateMachine::open(&db, dir.path()).expect("state machine");
    assert_eq!(sm.last_applied().map(|l| l.index), Some(63));
    assert_eq!(keys(&sm.shared()), sorted);
    // The values kept apart came along, and only the live ones.
    let shared = sm.shared();
    let state = shared.read_committed().expect("committed");
    let kvs = state.store.current_kvs(b"k", &RangeEnd::Before(b"l".to_vec())).expect("read");
    assert!(kvs.len() == 200 && kvs.iter().all(|kv| kv.value == value.as_bytes()));
    assert_eq!(state.store.files().values.len(), 200 * value.len() as u64);
}

#[tokio::test]
async fn the_space_of_removed_large_values_comes_back_after_compaction() {
    use crate::proto::etcdserverpb::CompactionRequest;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    // One key overwritten with values of 1 MiB, 80 MiB in all: every
    // version but the last is removed by the compaction.
    let value = "v".repeat(1 << 20);
    for i in 1..=80u64 {
        sm.apply(vec![entry(i, put("k", &value))]).await.expect("apply");
    }
    let shared = sm.shared();
    // The other members answer twice that one of them is defragmenting,
    // then that none is. Each time it asks, this member has claimed its
    // own defragment (so that one asking at the same moment waits).
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (answers, weak) = (asked.clone(), Arc::downgrade(&shared));
    shared.on_defragment_turn(move || {
        let claimed = weak.upgrade().is_some_and(|shared| shared.defragmenting());
        let mut asked = answers.lock().unwrap();
        asked.push(claimed);
        asked.len() > 2
    });
    let file = |shared: &Shared| shared.read().store.files().values.len();
    drop(shared.read_committed().expect("committed"));
    assert!(file(&shared) >= 80 << 20, "{} bytes", file(&shared));
    let rev = shared.read().store.revision();
    let compact = CompactionRequest { revision: rev, physical: false };
    sm.apply(vec![entry(81, Command { op: Some(command::Op::Compact(compact)), stamp: None })]).await.expect("compact");
    physical(&shared, rev).await;
    // The compaction thread then defragments, once its turn comes, with
    // no compaction after: the file holds the live value.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while file(&shared) > 2 << 20 {
        assert!(std::time::Instant::now() < deadline, "the value file still holds {} bytes", file(&shared));
        assert!(asked.lock().unwrap().len() <= 3, "asked again after its turn came");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(*asked.lock().unwrap(), vec![true, true, true], "asked before its turn, claimed each time");
    // The claim ends with the defragment, after the switch.
    while shared.defragmenting() {
        assert!(std::time::Instant::now() < deadline, "the claim outlived the defragment");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let kvs = shared.read().store.current_kvs(b"k", &crate::mvcc::keys::RangeEnd::Single).expect("read");
    assert_eq!(kvs[0].value, value.as_bytes());
    assert!(shared.size_on_disk() < 40 << 20, "{} bytes on disk", shared.size_on_disk());
}

#[tokio::test]
async fn the_membership_applied_last_is_known_after_a_restart_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        StateMachine::open(&db, dir.path()).expect("state machine")
    };
    let membership = |ids: &[u64]| {
        let nodes: std::collections::BTreeMap<u64, openraft::BasicNode> =
            ids.iter().map(|id| (*id, openraft::BasicNode::new(format!("http://n{id}")))).collect();
        EntryPayload::Membership(openraft::Membership::new(vec![nodes.keys().copied().collect()], nodes))
    };
    let mut sm = open();
    let at = |term, index| super::MembershipAt { term, index };
    assert_eq!(sm.shared().applied_membership(), at(0, 0), "before any");
    sm.apply(vec![Entry { log_id: log_id(1, 1, 1), payload: membership(&[1, 2, 3]) }]).await.expect("apply");
    sm.apply(vec![entry(2, put("k", "v"))]).await.expect("apply");
    assert_eq!(sm.shared().applied_membership(), at(1, 1));
    sm.apply(vec![Entry { log_id: log_id(2, 1, 3), payload: membership(&[1, 2]) }]).await.expect("apply");
    assert_eq!(sm.shared().applied_membership(), at(2, 3), "a removal applied by a leader of term 2");
    drop(sm.shared().read_committed().expect("committed"));
    drop(sm);
    assert_eq!(open().shared().applied_membership(), at(2, 3), "after a restart");
}

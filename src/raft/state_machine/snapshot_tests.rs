//! A member's own snapshot file: large values stay in the value file, and
//! what is sent from it has them back in place.

use std::io::SeekFrom;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::tests::{batch, entry, put};
use super::*;
use crate::raft::db_dir;

/// The state's records as snapshot data holds them: every value in place.
fn whole_data(shared: &Shared) -> Vec<u8> {
    let files = shared.read().store.files();
    let (out, _) = write_records(&files, None, std::io::Cursor::new(Vec::new())).expect("write records");
    out.into_inner()
}

async fn read_all(data: &mut SnapshotData) -> Vec<u8> {
    let mut out = Vec::new();
    data.read_to_end(&mut out).await.expect("read");
    out
}

/// 300 keys of 2 KiB and 300 small ones, in three entries.
async fn load(sm: &mut StateMachine) {
    let large = "L".repeat(2048);
    for e in 0..3u64 {
        let puts =
            (0..100).flat_map(|i| [put(&format!("big{e}-{i:03}"), &large), put(&format!("small{e}-{i:03}"), "s")]);
        sm.apply(vec![batch(e + 1, puts.collect())]).await.expect("apply");
    }
}

/// A member in a temporary data dir, given [`load`].
async fn loaded() -> (tempfile::TempDir, sled::Db, StateMachine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    load(&mut sm).await;
    (dir, db, sm)
}

#[tokio::test]
async fn a_members_own_snapshot_file_keeps_large_values_once_and_sends_them_whole() {
    let (dir, _db, mut sm) = loaded().await;
    let mut snapshot = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let whole = whole_data(&sm.shared());
    let on_disk = std::fs::metadata(dir.path().join(SNAPSHOT_FILE)).expect("snapshot file").len();
    assert!(on_disk * 4 < whole.len() as u64, "{on_disk} bytes on disk for {} bytes of data", whole.len());

    // Read as openraft reads it: its length, then chunk by chunk.
    let data = &mut *snapshot.snapshot;
    assert_eq!(data.seek(SeekFrom::End(0)).await.expect("seek"), whole.len() as u64);
    let mut read = Vec::new();
    while read.len() < whole.len() {
        data.seek(SeekFrom::Start(read.len() as u64)).await.expect("seek");
        let mut chunk = vec![0u8; 1000];
        let n = data.read(&mut chunk).await.expect("read");
        assert!(n > 0, "ended at {} of {}", read.len(), whole.len());
        read.extend_from_slice(&chunk[..n]);
    }
    assert!(read == whole, "the data sent differs from the state's records");
    // From any offset, as after a chunk that failed.
    for at in [whole.len() / 2, 1, 17, whole.len() - 3, whole.len()] {
        data.seek(SeekFrom::Start(at as u64)).await.expect("seek");
        assert!(read_all(data).await == whole[at..], "from {at}");
    }
    assert!(data.write_all(b"x").await.is_err(), "a built snapshot is not written to");
    let mut current = sm.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert!(read_all(&mut current.snapshot).await == whole);

    // A member that installs it keeps the values once, too, and sends them
    // whole.
    let other = tempfile::tempdir().expect("tempdir");
    let db2 = super::super::open_sled(&sled::Config::new().path(other.path().join("db"))).expect("sled");
    let mut sm2 = StateMachine::open(&db2, other.path()).expect("state machine");
    let mut received = sm2.begin_receiving_snapshot().await.expect("receive");
    received.write_all(&whole).await.expect("write");
    sm2.install_snapshot(&current.meta, received).await.expect("install");
    let open = open_snapshot_file(other.path()).expect("open").expect("a snapshot");
    assert_eq!(open.values, Some(sm2.shared().read().store.files().values.id()));
    assert!(open.len * 4 < whole.len() as u64 && open.whole_len == whole.len() as u64);
    let mut sent = sm2.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert!(read_all(&mut sent.snapshot).await == whole);
    assert!(whole_data(&sm2.shared()) == whole);
}

#[tokio::test]
async fn a_snapshot_file_that_points_into_a_replaced_value_file_is_built_again_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = db_dir::open_db_at(&db_dir::db_path(dir.path()).expect("path")).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    load(&mut sm).await;
    sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let whole = whole_data(&sm.shared());
    let old_values = sm.shared().read().store.files().values.id();
    // A defragment replaces the value file the snapshot file points into;
    // the member stops before the snapshot that would follow.
    sm.shared().defragment().await.expect("defragment");
    assert!(!dir.path().join("db").exists(), "the old database and its value file are removed");
    let new_values = sm.shared().read().store.files().values.id();
    assert_ne!(new_values, old_values);
    // Until then the snapshot still reads: its value file is held open.
    let mut current = sm.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert!(read_all(&mut current.snapshot).await == whole);
    let applied = sm.last_applied();
    sm.shared().flush().await.expect("flush");
    drop((sm, current, db));

    let db = db_dir::open_db_at(&db_dir::db_path(dir.path()).expect("path")).expect("reopen");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    let open = open_snapshot_file(dir.path()).expect("open").expect("a snapshot");
    assert_eq!((open.values, open.meta.last_log_id), (Some(new_values), applied));
    let mut current = sm.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert!(read_all(&mut current.snapshot).await == whole_data(&sm.shared()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_waits_for_a_busy_commit_thread_without_holding_the_state_lock() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    let shared = sm.shared();
    // The commit thread is held, as by a long snapshot copy.
    let (release, held) = std::sync::mpsc::channel::<()>();
    {
        let mut state = shared.write();
        let State { store, unflushed, .. } = &mut *state;
        unflushed.commit(store, &shared.committer).expect("commit");
        // Let go of after a minute whatever happens, so that a failing run
        // ends.
        let hold = move |_: &Files| {
            let _ = held.recv_timeout(Duration::from_secs(60));
        };
        shared.committer.run(hold).expect("hold the commit thread");
    }
    let puts =
        |from: usize| (from..from + group::LONG_JOB_GATHERED_WRITES).map(|i| put(&format!("k{i:06}"), "v")).collect();
    // Writes gather while it is busy, up to the bound (on a task of its
    // own, so that an apply that blocks its thread fails the test rather
    // than hangs it)...
    //
    // A failure is told only once the commit thread is let go and the
    // apply has ended, so that the state machine is dropped here: dropped by
    // the runtime as it shuts down, sled's flush of its last tree never
    // returned, and a failing run hung instead of failing.
    let mut first = tokio::spawn(async move {
        sm.apply(vec![batch(1, puts(0))]).await.expect("apply");
        sm
    });
    let waited = tokio::time::timeout(Duration::from_secs(30), &mut first).await;
    if waited.is_err() {
        drop(release);
        drop(first.await);
        panic!("an apply within the bound waited for the busy commit thread");
    }
    let mut sm = waited.expect("within the bound").expect("join");
    // ...then the next apply waits, holding no lock: readers go on.
    let next = tokio::spawn(async move {
        sm.apply(vec![batch(2, puts(group::LONG_JOB_GATHERED_WRITES))]).await.expect("apply");
        sm
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waits = !next.is_finished();
    let readable = shared.state.try_read().is_ok();
    release.send(()).expect("release");
    let sm = tokio::time::timeout(Duration::from_secs(30), next).await.expect("applied once released").expect("join");
    assert!(waits, "the apply waits for the commit thread");
    assert!(readable, "the state lock is free while it waits");
    assert_eq!(sm.last_applied().map(|l| l.index), Some(2));
    assert_eq!(shared.read().store.len(), 2 * group::LONG_JOB_GATHERED_WRITES);
}

#[tokio::test]
async fn a_data_dir_of_an_older_kvd_sends_its_whole_snapshot_file_until_a_new_one_replaces_it() {
    let (dir, db, mut sm) = loaded().await;
    let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let whole = whole_data(&sm.shared());
    sm.shared().flush().await.expect("flush");
    drop(sm);
    // As an older kvd left it: the snapshot file whole, and no id for the
    // value file.
    let data = dir.path().join("data");
    std::fs::write(&data, &whole).expect("write");
    let mut data = std::fs::File::open(&data).expect("open");
    let len = whole.len() as u64;
    write_file_with(&dir.path().join(SNAPSHOT_FILE), &snapshot.meta, len, |out| copy_records(&mut data, len, out))
        .expect("write");
    db.remove(values_id_key(STATE_TREES[0])).expect("remove the id");

    let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
    assert!(db.get(values_id_key(STATE_TREES[0])).expect("get").is_some(), "the value file got an id");
    let open = open_snapshot_file(dir.path()).expect("open").expect("a snapshot");
    assert_eq!((open.values, open.len), (None, whole.len() as u64));
    let mut current = sm.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert!(read_all(&mut current.snapshot).await == whole);
    // The next snapshot points into the value file.
    sm.apply(vec![batch(4, vec![put("later", "x")])]).await.expect("apply");
    sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let open = open_snapshot_file(dir.path()).expect("open").expect("a snapshot");
    assert_eq!(open.values, Some(sm.shared().read().store.files().values.id()));
    let mut current = sm.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert!(read_all(&mut current.snapshot).await == whole_data(&sm.shared()));
}

#[tokio::test]
async fn a_damaged_snapshot_received_replaces_nothing_and_leaves_no_part_behind() {
    let (dir, _db, mut sm) = loaded().await;
    let built = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let whole = whole_data(&sm.shared());
    let keys = sm.shared().read().store.len();
    // A newer snapshot whose data ends in the middle of a record.
    let mut meta = built.meta.clone();
    meta.last_log_id = Some(openraft::testing::log_id(9, 1, 99));
    meta.snapshot_id = "9-99".into();
    let mut received = sm.begin_receiving_snapshot().await.expect("receive");
    received.write_all(&whole[..whole.len() - 5]).await.expect("write");
    let err = sm.install_snapshot(&meta, received).await.expect_err("damaged data");
    assert!(err.to_string().contains("damaged snapshot data"), "{err}");
    // Or with a byte after its last record, which the loader that followed
    // it never reads.
    let mut received = sm.begin_receiving_snapshot().await.expect("receive");
    received.write_all(&[&whole[..], &[0]].concat()).await.expect("write");
    let err = sm.install_snapshot(&meta, received).await.expect_err("damaged data");
    assert!(err.to_string().contains("damaged snapshot data"), "{err}");
    // The member's own snapshot and state stay as they were.
    let current = sm.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert_eq!(current.meta.last_log_id, built.meta.last_log_id);
    assert_eq!(sm.shared().read().store.len(), keys);
    let parts = parts_left(dir.path());
    assert!(parts.is_empty(), "parts left: {parts:?}");
}

/// A record of a kind no kvd of this version writes, as a newer kvd with
/// another storage layout might.
const NEWER_KIND: &[u8] = b"v\x00\x00\x00\x00\x00\x00\x00\x01";

#[tokio::test]
async fn a_snapshot_of_a_newer_layout_is_refused_and_replaces_nothing() {
    let (_dir, _db, sm) = loaded().await;
    sm.shared().read().store.tree().insert(NEWER_KIND, &b"versions"[..]).expect("insert");
    let whole = whole_data(&sm.shared());
    let (dir2, _db2, mut sm2) = empty_member();
    sm2.apply(vec![batch(1, vec![put("old", "1")])]).await.expect("apply");
    let built = sm2.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let meta = Meta {
        last_log_id: Some(openraft::testing::log_id(9, 1, 99)),
        snapshot_id: "9-99".into(),
        ..built.meta.clone()
    };
    // Received at once, and in chunks that a loader follows as they land.
    for chunk in [whole.len(), 7000] {
        let mut received = sm2.begin_receiving_snapshot().await.expect("receive");
        receive(&mut received, &whole, chunk).await;
        let err = bounded(sm2.install_snapshot(&meta, received)).await.expect_err("a newer layout");
        assert!(err.to_string().contains("a record of a kind this kvd does not know"), "{err}");
        assert!(err.to_string().contains("begins with byte 0x76"), "{err}");
        let current = sm2.get_current_snapshot().await.expect("current").expect("a snapshot");
        assert_eq!(current.meta.last_log_id, built.meta.last_log_id);
        let state = sm2.shared();
        let state = state.read();
        assert_eq!(state.store.len(), 1);
        assert!(state.store.get(b"old").is_some());
        let parts = parts_left(dir2.path());
        assert!(parts.is_empty(), "parts left: {parts:?}");
    }
}

#[tokio::test]
async fn a_data_dir_with_records_of_a_newer_layout_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        load(&mut sm).await;
        let shared = sm.shared();
        let tree = shared.read().store.tree();
        // Before, between and after the kinds it knows.
        tree.insert(b"0", &b""[..]).expect("insert");
        let reopen = || {
            db.flush().expect("flush");
            StateMachine::open(&db, dir.path())
        };
        let err = reopen().err().expect("refused");
        assert!(err.to_string().contains("the data directory holds a record of a kind"), "{err}");
        assert!(err.to_string().contains("0x30"), "{err}");
        tree.remove(b"0").expect("remove");
        tree.insert(b"n", &b""[..]).expect("insert");
        let err = reopen().err().expect("refused");
        assert!(err.to_string().contains("0x6e"), "{err}");
        tree.remove(b"n").expect("remove");
        tree.insert(NEWER_KIND, &b""[..]).expect("insert");
        let err = reopen().err().expect("refused");
        assert!(err.to_string().contains("0x76"), "{err}");
        tree.remove(NEWER_KIND).expect("remove");
        db.flush().expect("flush");
    }
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let sm = StateMachine::open(&db, dir.path()).expect("the kinds it knows only");
    assert_eq!(sm.shared().read().store.len(), 600);
}

/// A member with no data in a temporary data dir.
fn empty_member() -> (tempfile::TempDir, sled::Db, StateMachine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
    let sm = StateMachine::open(&db, dir.path()).expect("state machine");
    (dir, db, sm)
}

/// The metadata and whole data of a snapshot of [`load`]'s state, and an
/// empty member to install it.
async fn a_snapshot_and_an_empty_member() -> (Meta, Vec<u8>, (tempfile::TempDir, sled::Db, StateMachine)) {
    let (_dir, _db, mut sm) = loaded().await;
    let built = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    (built.meta, whole_data(&sm.shared()), empty_member())
}

/// Writes `data` as openraft receives chunks of `chunk` bytes: a seek only
/// when the offset is not where the last write ended.
async fn receive(into: &mut SnapshotData, data: &[u8], chunk: usize) {
    for piece in data.chunks(chunk) {
        into.write_all(piece).await.expect("write");
    }
    into.shutdown().await.expect("shutdown");
}

fn installs_loaded(sm: &StateMachine) -> u64 {
    sm.shared().preloads.used.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs `received` as the snapshot `meta`, within a bound; checks that
/// the member then holds `whole`, and that `loaded` of its installs so far
/// used a loader's work.
async fn install_and_check(sm: &mut StateMachine, meta: &Meta, received: Box<SnapshotData>, whole: &[u8], loaded: u64) {
    bounded(sm.install_snapshot(meta, received)).await.expect("install");
    assert_eq!(installs_loaded(sm), loaded, "installs that used a loader's work");
    assert!(whole_data(&sm.shared()) == whole);
}

/// The same snapshot sent again as a new stream.
fn again(meta: &Meta) -> Meta {
    Meta { snapshot_id: format!("{}-again", meta.snapshot_id), ..meta.clone() }
}

fn parts_left(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(SNAPSHOT_FILE) && n != SNAPSHOT_FILE)
        .collect()
}

/// Within a bound: a loader and an install that waited for each other
/// would hang the test instead of failing it.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(60), f).await.expect("done within 60 s")
}

#[tokio::test]
async fn a_snapshot_received_in_order_is_loaded_as_it_arrives() {
    let (meta, whole, (dir2, db2, mut sm2)) = a_snapshot_and_an_empty_member().await;
    sm2.apply(vec![batch(1, vec![put("old", "1")])]).await.expect("apply");

    let mut received = sm2.begin_receiving_snapshot().await.expect("receive");
    receive(&mut received, &whole, 7000).await;
    install_and_check(&mut sm2, &meta, received, &whole, 1).await;
    assert_eq!(sm2.last_applied(), meta.last_log_id);
    assert!(parts_left(dir2.path()).is_empty(), "parts left: {:?}", parts_left(dir2.path()));
    // Its own snapshot file points into its new value file, and is sent
    // whole.
    let open = open_snapshot_file(dir2.path()).expect("open").expect("a snapshot");
    assert_eq!(open.values, Some(sm2.shared().read().store.files().values.id()));
    assert_eq!(open.meta.last_log_id, meta.last_log_id);
    let mut current = sm2.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert!(read_all(&mut current.snapshot).await == whole);
    // And all of it is there after a restart.
    sm2.shared().flush().await.expect("flush");
    drop((sm2, current));
    let sm2 = StateMachine::open(&db2, dir2.path()).expect("state machine");
    assert!(whole_data(&sm2.shared()) == whole);
    assert_eq!(sm2.last_applied(), meta.last_log_id);
}

#[tokio::test]
async fn a_snapshot_written_out_of_order_or_during_a_defragment_is_loaded_again_from_its_file() {
    let (meta, whole, (dir2, _db2, mut sm2)) = a_snapshot_and_an_empty_member().await;

    // A chunk written again at its offset, first with other bytes.
    let mut received = sm2.begin_receiving_snapshot().await.expect("receive");
    let (first, rest) = whole.split_at(5000);
    received.write_all(first).await.expect("write");
    received.write_all(&[0xab; 3000]).await.expect("write");
    received.seek(SeekFrom::Start(5000)).await.expect("seek");
    receive(&mut received, rest, 3000).await;
    install_and_check(&mut sm2, &meta, received, &whole, 0).await;

    // The database replaced by a defragment while the records load.
    let meta = again(&meta);
    let mut received = sm2.begin_receiving_snapshot().await.expect("receive");
    receive(&mut received, first, 1000).await;
    // Once the loader has begun on the tree not in use.
    let own_records = part_path(dir2.path(), preload::OWN_RECORDS_PART);
    bounded(async {
        while !own_records.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    sm2.shared().defragment().await.expect("defragment");
    receive(&mut received, rest, 3000).await;
    install_and_check(&mut sm2, &meta, received, &whole, 0).await;
    assert!(parts_left(dir2.path()).is_empty(), "parts left: {:?}", parts_left(dir2.path()));
}

#[tokio::test]
async fn a_stream_given_up_stops_its_loader_and_the_next_one_loads() {
    let (meta, whole, (dir2, _db2, mut sm2)) = a_snapshot_and_an_empty_member().await;

    // openraft begins the next stream before it drops the one it gave up.
    let mut given_up = sm2.begin_receiving_snapshot().await.expect("receive");
    given_up.write_all(&whole[..whole.len() / 2]).await.expect("write");
    given_up.flush().await.expect("flush");
    let mut next = sm2.begin_receiving_snapshot().await.expect("receive");
    drop(given_up);
    receive(&mut next, &whole, 64 << 10).await;
    install_and_check(&mut sm2, &meta, next, &whole, 1).await;

    // A stream given up and not yet dropped does not hold up the next:
    // its loader is stopped when the next begins, and the next one's does
    // the load.
    let meta = again(&meta);
    let mut stuck = sm2.begin_receiving_snapshot().await.expect("receive");
    stuck.write_all(&whole[..1000]).await.expect("write");
    stuck.flush().await.expect("flush");
    let mut next = sm2.begin_receiving_snapshot().await.expect("receive");
    receive(&mut next, &whole, 64 << 10).await;
    install_and_check(&mut sm2, &meta, next, &whole, 2).await;
    drop(stuck);
    assert!(parts_left(dir2.path()).iter().all(|p| !p.contains("own")), "{:?}", parts_left(dir2.path()));
}

#[tokio::test]
async fn a_stream_that_stops_sending_has_its_load_dropped_and_still_installs_if_it_goes_on() {
    let (meta, whole, (dir2, db2, mut sm2)) = a_snapshot_and_an_empty_member().await;
    let stall = std::time::Duration::from_millis(300);
    *sm2.shared().preloads.stalled_after.lock().expect("lock") = stall;
    let (_, other) = state_trees(&db2).expect("trees");
    let other_values = values_path(dir2.path(), other).expect("path");
    let own_records = part_path(dir2.path(), preload::OWN_RECORDS_PART);

    let mut stalled = sm2.begin_receiving_snapshot().await.expect("receive");
    let (first, rest) = whole.split_at(whole.len() / 2);
    stalled.write_all(first).await.expect("write");
    stalled.flush().await.expect("flush");
    // The loader has begun on the tree not in use...
    bounded(async {
        while !own_records.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(other_values.exists(), "the load's value file");
    // ...and, with no more data, gives its work up on its own: no part of
    // it is left, though the stream is still held.
    bounded(async {
        while own_records.exists() || other_values.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(db2.open_tree(other).expect("tree").is_empty(), "the tree not in use is empty again");
    // The rest arrives after all: the install loads the records from the
    // file received.
    receive(&mut stalled, rest, 4096).await;
    install_and_check(&mut sm2, &meta, stalled, &whole, 0).await;
    assert!(parts_left(dir2.path()).is_empty(), "parts left: {:?}", parts_left(dir2.path()));
}

#[tokio::test]
async fn a_member_that_stopped_once_the_tree_was_loaded_starts_on_it() {
    let (_dir, _db, sm) = loaded().await;
    let whole = whole_data(&sm.shared());
    let (dir2, db2, mut sm2) = empty_member();
    sm2.apply(vec![batch(1, vec![put("old", "1")])]).await.expect("apply");
    sm2.shared().flush().await.expect("flush");
    drop(sm2);
    // As an install leaves it just after the mark: the tree not in use
    // holds every record.
    let files = fresh_files(&db2, dir2.path(), STATE_TREES[1]).expect("files");
    let len = whole.len() as u64;
    let read = |each: EachRecord<'_>| for_each_record(&whole[..], len, each).map(drop);
    load_records::<std::fs::File>(&db2, &files, read, None).expect("load");
    db2.insert(INSTALLING, INSTALLING_LOADED).expect("mark");
    db2.flush().expect("flush");
    drop(files);

    let sm2 = StateMachine::open(&db2, dir2.path()).expect("state machine");
    assert_eq!(db2.get(INSTALLING).expect("get"), None);
    assert_eq!(state_trees(&db2).expect("trees").0, STATE_TREES[1]);
    assert!(whole_data(&sm2.shared()) == whole);
    assert_eq!(sm2.shared().read().store.tree().get(b"old").expect("get"), None);
}

/// Commits every write applied, and waits until they are in the tree.
fn commit_all(shared: &Shared) {
    {
        let mut state = shared.write();
        let State { store, unflushed, .. } = &mut *state;
        unflushed.commit(store, &shared.committer).expect("commit");
    }
    shared.committer.wait_idle().expect("committed");
}

/// Puts over keys of [`load`], a delete, a lease granted and one more: what
/// changes history, revision order, metadata and leases.
fn later_writes(from: u64) -> Vec<Entry> {
    use crate::proto::etcdserverpb::{DeleteRangeRequest, LeaseGrantRequest};
    let op = |op| Command { op: Some(op), stamp: None };
    let delete =
        DeleteRangeRequest { key: b"small1-000".to_vec(), range_end: b"small1-050".to_vec(), ..Default::default() };
    vec![
        batch(from, (0..50).map(|i| put(&format!("big0-{i:03}"), &"N".repeat(2048))).collect()),
        entry(from + 1, op(command::Op::DeleteRange(delete))),
        entry(from + 2, op(command::Op::LeaseGrant(LeaseGrantRequest { ttl: 10, id: 7 }))),
        batch(from + 3, (0..50).map(|i| put(&format!("new-{i:03}"), "n")).collect()),
    ]
}

/// A copy beside the commit thread is of the tree as it stood when it
/// began, whatever is committed while it goes on.
#[tokio::test]
async fn a_copy_is_of_the_tree_as_it_stood_though_later_groups_are_committed() {
    let (_dir, _db, mut sm) = loaded().await;
    let shared = sm.shared();
    commit_all(&shared);
    let before = whole_data(&shared);
    let (files, rev) = {
        let state = shared.read();
        (state.store.files(), state.store.revision())
    };
    let copying = shared.copies.begin();
    let as_of = AsOf::take(&files.tree, rev, Part::Whole, &copying).expect("take");
    sm.apply(later_writes(4)).await.expect("apply");
    commit_all(&shared);
    assert!(whole_data(&shared) != before, "the later writes are in the tree");
    let (out, _) = write_records(&files, Some(&as_of), std::io::Cursor::new(Vec::new())).expect("write records");
    let out = out.into_inner();
    let list = |d: &[u8]| {
        let mut v = Vec::new();
        for_each_record(d, d.len() as u64, |k, val| {
            v.push((k.to_vec(), val.to_vec()));
            Ok(())
        })
        .expect("records");
        v
    };
    let (a, b) = (list(&before), list(&out));
    for r in &a {
        if !b.contains(r) {
            eprintln!("missing {:?}", String::from_utf8_lossy(&r.0));
        }
    }
    for r in &b {
        if !a.contains(r) {
            eprintln!("extra {:?}", String::from_utf8_lossy(&r.0));
        }
    }
    assert!(out == before, "the copy holds what the tree held when it began, and only that");
    drop(copying);
    assert_eq!(shared.copies.under_way(), 0);
}

/// A snapshot built while entries are applied is of the state as of its
/// last log id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_while_entries_are_applied_is_of_its_last_log_id() {
    let (_dir, _db, mut sm) = loaded().await;
    let shared = sm.shared();
    commit_all(&shared);
    let expected = whole_data(&shared);
    let mut builder = sm.get_snapshot_builder().await;
    sm.apply(later_writes(4)).await.expect("apply");
    let mut snapshot = builder.build_snapshot().await.expect("build");
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(3));
    assert!(read_all(&mut snapshot.snapshot).await == expected, "the snapshot holds the state of entry 3");
    commit_all(&shared);
    assert!(whole_data(&shared) != expected, "the later entries are applied");
}

/// What removes or replaces records a copy reads waits for the copy: here
/// physical compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn physical_compaction_waits_for_a_copy_under_way() {
    use crate::proto::etcdserverpb::CompactionRequest;
    use std::time::Duration;
    let (_dir, _db, mut sm) = loaded().await;
    sm.apply(later_writes(4)).await.expect("apply");
    let shared = sm.shared();
    let rev = shared.read().store.revision();
    let copying = shared.copies.begin();
    let compact = CompactionRequest { revision: rev, physical: false };
    sm.apply(vec![entry(8, Command { op: Some(command::Op::Compact(compact)), stamp: None })]).await.expect("compact");
    let waited = tokio::time::timeout(Duration::from_millis(500), shared.await_physical(rev)).await;
    assert!(waited.is_err(), "compacted history was removed while a copy was under way");
    assert!(shared.read().store.physical() < rev);
    drop(copying);
    let done = tokio::time::timeout(Duration::from_secs(60), shared.await_physical(rev)).await;
    done.expect("physical compaction once the copy ended").expect("physical compaction");
}

/// One backup's copy at a time: another `snapshot save` waits for it
/// before it begins a copy of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_waits_for_the_copy_of_the_one_before() {
    use std::time::Duration;
    let (_dir, _db, sm) = loaded().await;
    let shared = sm.shared();
    let held = shared.backups.clone().lock_owned().await;
    let waiting = {
        let shared = shared.clone();
        tokio::spawn(async move { shared.backup().await.map(|(rev, _)| rev) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished() && shared.copies.under_way() == 0, "a backup began its copy beside another");
    drop(held);
    let rev =
        tokio::time::timeout(Duration::from_secs(30), waiting).await.expect("once the other ended").expect("join");
    assert_eq!(rev.expect("backup"), shared.read().store.revision());
}

/// Work waiting for copies to end goes before a backup asked for after it:
/// `snapshot save` called back to back cannot keep it waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_waits_for_work_that_waits_for_the_copies() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    let (_dir, _db, sm) = loaded().await;
    let shared = sm.shared();
    let order = Arc::new(AtomicUsize::new(0));
    let snapshot = shared.copies.begin();
    let (waiter_at, backup_at) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let waiter = {
        let (shared, order, at) = (shared.clone(), order.clone(), waiter_at.clone());
        tokio::task::spawn_blocking(move || {
            let _state = shared.write_without_copies();
            at.store(order.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        })
    };
    // Once the waiter is counted.
    bounded(async {
        while shared.copies.begin_unless_waited_for().is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let backup = {
        let (shared, order, at) = (shared.clone(), order.clone(), backup_at.clone());
        tokio::spawn(async move {
            let made = shared.backup().await.map(|(rev, _)| rev);
            at.store(order.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            made
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backup_at.load(Ordering::SeqCst), 0, "a backup was made while work waited for the copies");
    drop(snapshot);
    bounded(waiter).await.expect("the waiter");
    bounded(backup).await.expect("join").expect("backup");
    assert_eq!((waiter_at.load(Ordering::SeqCst), backup_at.load(Ordering::SeqCst)), (1, 2));
}

#[tokio::test]
async fn a_defragment_decided_while_another_ran_begins_only_if_still_worth_it() {
    let (dir, _db, sm) = loaded().await;
    let shared = sm.shared();
    let all = |shared: &Shared| {
        let end = crate::mvcc::keys::RangeEnd::Unbounded;
        shared.read().store.current_kvs(b"\0", &end).expect("read")
    };
    let kvs = all(&shared);
    assert_eq!(kvs.len(), 600);
    let in_use = || db_dir::db_dirs(dir.path()).expect("dirs").0;
    let (before, other) = db_dir::db_dirs(dir.path()).expect("dirs");
    // Asked once no other defragment holds the database, and found not
    // worth it any more: nothing is written.
    let asked = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut held = false;
            let done = shared
                .defragment_if(|s| {
                    held = s.db_change.try_lock().is_err();
                    false
                })
                .expect("defragment");
            (done.is_none(), held)
        })
    };
    let (skipped, held) = asked.await.expect("join");
    assert!(skipped, "not worth it: no defragment");
    assert!(held, "asked while holding the database");
    assert_eq!(in_use(), before);
    assert!(!dir.path().join(other).exists(), "no second database begun");
    // Still worth it: it defragments.
    let done = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || shared.defragment_if(|_| true).expect("defragment"))
    };
    assert!(done.await.expect("join").is_some());
    assert_ne!(in_use(), before);
    assert_eq!(all(&shared), kvs);
}

use super::*;

/// A temporary tree and value file; the directory lasts as long as the
/// guard.
pub(crate) fn temp_files() -> (Files, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
    let values = ValueLog::create(&dir.path().join("values"), 1).expect("value file");
    (Files::new(tree, Arc::new(values)), dir)
}

/// Commits `batch` to `files` as the commit thread does: values kept apart
/// first, synced, then the records.
pub(crate) fn commit_to(files: &Files, mut batch: Batch) {
    batch.separate_values(&files.values).expect("values");
    files.values.sync().expect("sync");
    files.tree.apply_batch(batch.into_sled()).expect("apply");
}

/// Seals `batch`'s run of changes and commits it to `files`, as the state
/// machine does with a group.
fn seal_and_commit(files: &Files, store: &mut MvccStore, mut batch: Batch) {
    store.seal(&mut batch);
    commit_to(files, batch);
}

fn write(store: &mut MvccStore, value: &str) -> Batch {
    let mut w = store.write();
    w.put(b"k", value.as_bytes().to_vec(), 0);
    w.finish().0
}

#[test]
fn the_history_hash_covers_values_and_revisions_up_to_the_one_asked() {
    let store_of = |values: &[&str]| {
        let (files, dir) = temp_files();
        let mut store = MvccStore::open(files.clone()).expect("open");
        for v in values {
            commit_to(&files, write(&mut store, v));
        }
        (files, dir)
    };
    let ((a, _a), (b, _b)) = (store_of(&["1", "2", "3"]), store_of(&["1", "2", "x"]));
    // Revisions 2..=4 hold the three versions.
    assert_eq!(hash_history(&a, 0, 3).unwrap(), hash_history(&b, 0, 3).unwrap());
    assert_ne!(hash_history(&a, 0, 4).unwrap(), hash_history(&b, 0, 4).unwrap());
    assert_ne!(hash_history(&a, 0, 3).unwrap(), hash_history(&a, 0, 4).unwrap());
    // Compacted at 3, the version at 2 is out of sight: it no longer counts.
    let (c, _c) = store_of(&["0", "2", "3"]);
    assert_ne!(hash_history(&a, 0, 4).unwrap(), hash_history(&c, 0, 4).unwrap());
    assert_eq!(hash_history(&a, 3, 4).unwrap(), hash_history(&c, 3, 4).unwrap());
}

#[test]
fn versions_handed_off_are_read_from_memory_until_they_are_sent() {
    let (files, _dir) = temp_files();
    let mut store = MvccStore::open(files.clone()).expect("open");
    let first = write(&mut store, "1");
    store.hand_off();
    let _second = write(&mut store, "2");
    // Neither batch is in the tree: the newest version is pending, the
    // one before it is on its way.
    let meta = *store.get(b"k").expect("live");
    assert_eq!(store.load(b"k", &meta).expect("load").value, b"2");
    let prev = store.prev_version(b"k", meta.mod_revision).expect("prev").expect("a previous version");
    assert_eq!(prev.value, b"1");
    // Once the first batch is in the tree, it is read from there.
    commit_to(&files, first);
    store.sent();
    assert!(!store.is_sending());
    let prev = store.prev_version(b"k", meta.mod_revision).expect("prev").expect("a previous version");
    assert_eq!(prev.value, b"1");
    // A version said to be sent that never reached the tree is gone
    // from memory: the reads above came from the overlay.
    store.hand_off();
    store.sent();
    assert!(store.load(b"k", &meta).is_err(), "the second version was never committed");
}

/// A tree holding 3,000 keys written in one revision, and the records of a
/// revision deleting them all but its last sled batch (the one with the
/// revision): a group cut short. Returns it and the revision it records.
fn a_tree_with_a_group_cut_short() -> (Files, tempfile::TempDir, i64) {
    use keys::RangeEnd;
    let (files, dir) = temp_files();
    let tree = files.tree.clone();
    let mut store = MvccStore::open(files.clone()).expect("open");
    let mut w = store.write();
    for i in 0..3000 {
        w.put(format!("k{i:04}").as_bytes(), b"v".to_vec(), 0);
    }
    let (mut batch, _) = w.finish();
    store.seal(&mut batch);
    for b in batch.into_sled_chunks(1000) {
        tree.apply_batch(b).expect("apply");
    }
    let before = store.revision();
    let mut w = store.write();
    let (deleted, _) = w.delete_range(b"k", &RangeEnd::Before(b"l".to_vec()), false).expect("delete");
    assert_eq!(deleted, 3000);
    let (mut batch, _) = w.finish();
    store.seal(&mut batch);
    let mut chunks = batch.into_sled_chunks(1000);
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    chunks.pop();
    for b in chunks {
        tree.apply_batch(b).expect("apply");
    }
    (files, dir, before)
}

#[test]
fn a_group_cut_short_between_its_sled_batches_is_removed_at_open() {
    use keys::RangeEnd;
    let (files, _dir, before) = a_tree_with_a_group_cut_short();
    let tree = files.tree.clone();
    let records = tree.len();
    let mut runs = 0;
    changes::each_run_after(&tree, before, |_, _, _| {
        runs += 1;
        Ok(())
    })
    .expect("runs");
    assert!(runs > 1, "3,000 deletions take more than one run");
    let reopened = MvccStore::open(files).expect("reopen");
    assert_eq!(reopened.revision(), before);
    assert_eq!(reopened.len(), 3000, "the deletion never happened");
    assert_eq!(tree.len(), records - 3000 - runs, "its 3,000 tombstones and its runs are gone");
    let kvs = reopened.current_kvs(b"k", &RangeEnd::Before(b"l".to_vec())).expect("read");
    assert_eq!(kvs.len(), 3000);
    assert!(kvs.iter().all(|kv| kv.mod_revision == before && kv.value == b"v"));
    // Nothing is left to find after `before`: a watch from there sees nothing.
    let mut after = 0;
    changes::walk(&tree, before + 1, i64::MAX, |_, _| {
        after += 1;
        Ok(true)
    })
    .expect("walk");
    assert_eq!(after, 0);
}

/// Copies every record of `files` into new ones, each history record
/// whole as snapshot data carries it, giving each to a [`Rebuild`] as a
/// snapshot install does; returns the store opened from the copy both
/// ways.
fn rebuilt_copy(files: &Files) -> (MvccStore, MvccStore, tempfile::TempDir) {
    let (copy, dir) = temp_files();
    let mut rebuild = Rebuild::default();
    let mut batch = Batch::default();
    for item in files.tree.iter() {
        let (k, v) = item.expect("record");
        if k.first() == Some(&keys::HIST) {
            // As an install takes it: decoded once, for the index and the
            // batch.
            let whole = values::whole_record(&v, &files.values).expect("whole");
            let kv = values::decode_whole(&whole).expect("decode");
            rebuild.version((k.len() + whole.len()) as u64, &kv);
            batch.insert_version(k.to_vec(), &kv);
        } else {
            rebuild.record(&k, &v).expect("a record of a store");
            batch.insert(&k, &v);
        }
    }
    commit_to(&copy, batch);
    let rebuilt = MvccStore::open_rebuilt(copy.clone(), rebuild).expect("open rebuilt");
    (rebuilt, MvccStore::open(copy).expect("open"), dir)
}

fn assert_same(a: &MvccStore, b: &MvccStore) {
    let everything = RangeEnd::Before(vec![0xff; 8]);
    assert_eq!(a.revision(), b.revision());
    assert_eq!(a.compacted(), b.compacted());
    assert_eq!(a.physical(), b.physical());
    assert_eq!(a.bytes_in_use(), b.bytes_in_use());
    assert_eq!(a.len(), b.len());
    assert_eq!(a.current_kvs(b"", &everything).unwrap(), b.current_kvs(b"", &everything).unwrap());
    let leases = |s: &MvccStore| s.leases().iter().map(|(id, l)| (*id, l.ttl, l.keys.clone())).collect::<Vec<_>>();
    assert_eq!(leases(a), leases(b));
}

#[test]
fn a_store_rebuilt_from_its_records_is_the_store_opened_from_its_tree() {
    use keys::RangeEnd;
    let (files, _dir) = temp_files();
    let mut store = MvccStore::open(files.clone()).expect("open");
    let mut batch = Batch::default();
    assert!(store.grant_lease(7, 60, &mut batch));
    assert!(store.grant_lease(9, 30, &mut batch));
    seal_and_commit(&files, &mut store, batch);
    for round in 0..3 {
        let mut w = store.write();
        for i in 0..50 {
            let lease = if i % 5 == 0 { 7 } else { 0 };
            // Every other value is large enough to be kept apart.
            let value = format!("v{round}").repeat(if i % 2 == 0 { 1 } else { values::SEPARATE_FROM });
            w.put(format!("k{i:02}").as_bytes(), value.into_bytes(), lease);
        }
        let (batch, _) = w.finish();
        seal_and_commit(&files, &mut store, batch);
    }
    // Deleted keys, one of them written again, and history compacted.
    let mut w = store.write();
    w.delete_range(b"k1", &RangeEnd::Before(b"k2".to_vec()), false).expect("delete");
    let (batch, _) = w.finish();
    seal_and_commit(&files, &mut store, batch);
    let mut w = store.write();
    w.put(b"k15", b"again".to_vec(), 9);
    let (batch, _) = w.finish();
    seal_and_commit(&files, &mut store, batch);
    let mut batch = Batch::default();
    store.compact(store.revision() - 2, &mut batch).expect("compact");
    seal_and_commit(&files, &mut store, batch);
    let (rebuilt, opened, _copy) = rebuilt_copy(&files);
    assert_same(&rebuilt, &opened);
    // And both are the store that wrote the records.
    assert_same(&rebuilt, &store);
    assert_eq!(rebuilt.len(), 41);
    assert_eq!(rebuilt.lease(9).expect("lease 9").keys.len(), 1);
    assert_eq!(rebuilt.lease(7).expect("lease 7").keys.len(), 8);
}

#[test]
fn records_of_a_group_cut_short_are_not_rebuilt_into_the_store() {
    let (files, _dir, _) = a_tree_with_a_group_cut_short();
    let (rebuilt, opened, _copy) = rebuilt_copy(&files);
    assert_same(&rebuilt, &opened);
    assert_eq!(rebuilt.len(), 3000, "the deletion never happened");
}

/// A store with `n` keys `k00`, `k01`, ... set to `value` (kept apart if
/// large), committed to its files.
fn committed_large_values(n: usize, value: &[u8]) -> (Files, tempfile::TempDir, MvccStore) {
    let (files, dir) = temp_files();
    let mut store = MvccStore::open(files.clone()).expect("open");
    let mut batch = Batch::default();
    for i in 0..n {
        let mut w = store.write();
        w.put(format!("k{i:02}").as_bytes(), value.to_vec(), 0);
        batch.append(w.finish().0);
    }
    store.seal(&mut batch);
    commit_to(&files, batch);
    (files, dir, store)
}

#[test]
fn opening_a_store_reads_no_value_kept_apart() {
    let big = vec![b'x'; values::SEPARATE_FROM * 4];
    let (files, dir, store) = committed_large_values(20, &big);
    assert_eq!(files.values.len(), 20 * big.len() as u64);
    // The index is rebuilt from the tree alone: over a value file of the
    // same length whose bytes are all wrong, the store opens whole, and
    // only a read of a value fails, with an error rather than a panic.
    let path = dir.path().join("elsewhere");
    std::fs::write(&path, vec![0u8; files.values.len() as usize]).expect("a file of zeros");
    let zeros = ValueLog::open(&path, 2).expect("value file of zeros");
    let reopened = MvccStore::open(Files::new(files.tree.clone(), Arc::new(zeros))).expect("reopen");
    assert_eq!((reopened.len(), reopened.revision(), reopened.bytes_in_use()), (20, 21, store.bytes_in_use()));
    let meta = *reopened.get(b"k07").expect("live");
    let e = reopened.load(b"k07", &meta).expect_err("no value file");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    // With its value file, every value reads back.
    let reopened = MvccStore::open(files).expect("reopen");
    let all = reopened.current_kvs(b"k", &keys::RangeEnd::Before(b"l".to_vec())).expect("read");
    assert!(all.len() == 20 && all.iter().all(|kv| kv.value == big));
}

#[test]
fn a_value_file_shorter_than_its_records_say_is_refused_at_open() {
    let big = vec![b'x'; values::SEPARATE_FROM];
    let (files, dir, _) = committed_large_values(10, &big);
    let held = files.values.len();
    assert_eq!(held, 10 * big.len() as u64);
    let path = dir.path().join("values");
    let open_with = |len: Option<u64>| {
        match len {
            Some(len) => std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(len)).expect("cut"),
            None => std::fs::remove_file(&path).expect("remove"),
        }
        // Opened as a member opens its files: a missing file is created.
        let values = ValueLog::open(&path, 1).expect("value file");
        MvccStore::open(Files::new(files.tree.clone(), Arc::new(values)))
    };
    // Bytes after the last value (what a crash leaves) are no harm.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"torn"))
        .expect("append");
    assert_eq!(open_with(Some(held + 4)).expect("a longer file opens").len(), 10);
    assert_eq!(open_with(Some(held)).expect("the file as written opens").len(), 10);
    for (len, what) in [(Some(held - 1), "one byte short"), (Some(held / 2), "half"), (None, "removed")] {
        let e = open_with(len).map(|_| ()).expect_err(what);
        let text = e.to_string();
        let holds = std::fs::metadata(&path).expect("file").len();
        assert!(text.contains(&format!("value file {}: it holds {holds} bytes", path.display())), "{what}: {text}");
        assert!(text.contains(&format!("up to byte {held}")), "{what}: {text}");
    }
}

#[test]
fn the_lease_mark_changes_with_each_lease_granted_or_revoked_and_between_stores() {
    let (files, _dir) = temp_files();
    let mut store = MvccStore::open(files.clone()).expect("open");
    let m0 = store.lease_log().mark();
    let mut batch = Batch::default();
    assert!(store.grant_lease(5, 10, &mut batch));
    let m1 = store.lease_log().mark();
    assert_ne!(m1, m0);
    // Granting a lease that exists changes nothing.
    assert!(!store.grant_lease(5, 10, &mut batch));
    assert_eq!(store.lease_log().mark(), m1);
    // A key attached is not a change of leases.
    let mut w = store.write();
    w.put(b"k", b"v".to_vec(), 5);
    let (b, _) = w.finish();
    batch.append(b);
    assert_eq!(store.lease_log().mark(), m1);
    let mut w = store.write();
    assert!(w.revoke_lease(5));
    let (b, _) = w.finish();
    batch.append(b);
    let m2 = store.lease_log().mark();
    assert!(m2 != m1 && m2 != m0);
    let changed = |since| store.lease_log().changed_since(since).map(|ids| ids.collect::<Vec<_>>());
    assert_eq!(changed(m0), Some(vec![5, 5]));
    assert_eq!(changed(m1), Some(vec![5]));
    store.seal(&mut batch);
    commit_to(&files, batch);
    store.committed();
    // The same leases opened again: a mark no store had, and no changes
    // it can tell since the other store's.
    let reopened = MvccStore::open(files).expect("reopen");
    assert!(![m0, m1, m2].contains(&reopened.lease_log().mark()));
    assert!(reopened.lease_log().changed_since(m2).is_none());
}

#[test]
fn a_put_over_a_live_key_keeps_its_creation_counts_its_version_and_moves_its_lease() {
    use crate::proto::etcdserverpb::PutRequest;
    let (files, _dir) = temp_files();
    let mut store = MvccStore::open(files).expect("open");
    let mut batch = Batch::default();
    assert!(store.grant_lease(5, 10, &mut batch));
    assert!(store.grant_lease(6, 10, &mut batch));
    let put = |store: &mut MvccStore, req: PutRequest| {
        let mut w = store.write();
        let resp = super::ops::put_owned(&mut w, req).expect("put");
        let (_, events) = w.finish();
        (resp, events)
    };
    let req = |value: &str, lease: i64| PutRequest {
        key: b"k".to_vec(),
        value: value.as_bytes().to_vec(),
        lease,
        ..Default::default()
    };
    // Created under lease 5.
    let (_, events) = put(&mut store, req("a", 5));
    let created = store.revision();
    assert_eq!(events.len(), 1);
    assert_eq!(store.get(b"k").map(|m| (m.create_revision, m.version, m.lease)), Some((created, 1, 5)));
    assert!(store.lease(5).expect("lease 5").keys.contains(b"k".as_ref()));
    // Put again under lease 6: the plain path, no previous version asked.
    let (resp, events) = put(&mut store, req("b", 6));
    assert_eq!(resp.prev_kv, None);
    let kv = events[0].kv.clone().expect("kv");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version, kv.lease), (created, store.revision(), 2, 6));
    assert_eq!(kv.value, b"b");
    assert!(!store.lease(5).expect("lease 5").keys.contains(b"k".as_ref()));
    assert!(store.lease(6).expect("lease 6").keys.contains(b"k".as_ref()));
    // With the previous version asked for and the lease kept.
    let before = store.revision();
    let (resp, events) = put(&mut store, PutRequest { prev_kv: true, ignore_lease: true, ..req("c", 0) });
    let prev = resp.prev_kv.expect("prev_kv");
    assert_eq!((prev.value.as_slice(), prev.mod_revision, prev.version, prev.lease), (&b"b"[..], before, 2, 6));
    let kv = events[0].kv.clone().expect("kv");
    assert_eq!((kv.create_revision, kv.version, kv.lease, kv.value.as_slice()), (created, 3, 6, &b"c"[..]));
    assert_eq!(
        store.get(b"k").map(|m| (m.create_revision, m.mod_revision, m.version, m.lease)),
        Some((created, store.revision(), 3, 6))
    );
    // A value kept while the lease goes back to none.
    let (_, events) = put(&mut store, PutRequest { ignore_value: true, ..req("", 0) });
    let kv = events[0].kv.clone().expect("kv");
    assert_eq!((kv.version, kv.lease, kv.value.as_slice()), (4, 0, &b"c"[..]));
    assert!(!store.lease(6).expect("lease 6").keys.contains(b"k".as_ref()));
    // Deleted and put again: a new creation.
    let mut w = store.write();
    w.delete_range(b"k", &keys::RangeEnd::Single, false).expect("delete");
    w.finish();
    let (_, _) = put(&mut store, req("d", 0));
    assert_eq!(store.get(b"k").map(|m| (m.create_revision, m.version)), Some((store.revision(), 1)));
}

#[test]
fn keys_held_in_the_index_and_apart_from_it_keep_one_order() {
    let (files, _dir) = temp_files();
    let mut store = MvccStore::open(files).expect("open");
    // Either side of the 24 bytes the index holds inside its nodes, with
    // long common prefixes, empty and high bytes.
    let mut keys: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        vec![b'k'; 23],
        vec![b'k'; 24],
        vec![b'k'; 25],
        [vec![b'k'; 24], vec![0]].concat(),
        [vec![b'k'; 24], vec![0xff]].concat(),
        [vec![b'k'; 23], vec![0xff]].concat(),
        vec![0xff; 40],
        vec![0],
    ];
    for (i, k) in keys.iter().enumerate() {
        let mut w = store.write();
        w.put(k, vec![i as u8], 0);
        w.finish();
    }
    keys.sort();
    let listed: Vec<Vec<u8>> = store.current(b"\0", &keys::RangeEnd::Unbounded).map(|(k, _)| k.to_vec()).collect();
    assert_eq!(listed, keys);
    for k in &keys {
        assert!(store.get(k).is_some(), "{k:?} is found");
        let single: Vec<_> = store.current(k, &keys::RangeEnd::Single).map(|(k, _)| k.to_vec()).collect();
        assert_eq!(single, vec![k.clone()]);
    }
    let from: Vec<Vec<u8>> = store
        .current(&[b'k'; 24], &keys::RangeEnd::Before([vec![b'k'; 24], vec![0xff]].concat()))
        .map(|(k, _)| k.to_vec())
        .collect();
    assert_eq!(from, vec![vec![b'k'; 24], [vec![b'k'; 24], vec![0]].concat(), vec![b'k'; 25]]);
}

#[test]
fn deletions_at_the_compacted_revision_are_removed_and_still_replayed() {
    use keys::RangeEnd;
    let (files, _dir) = temp_files();
    let mut store = MvccStore::open(files.clone()).expect("open");
    let mut w = store.write();
    for k in ["a", "b", "c"] {
        w.put(k.as_bytes(), b"1".to_vec(), 0);
    }
    let batch = w.finish().0;
    seal_and_commit(&files, &mut store, batch);
    let mut w = store.write();
    w.put(b"b", b"2".to_vec(), 0);
    let batch = w.finish().0;
    seal_and_commit(&files, &mut store, batch);
    // One revision deletes a and b and writes c again.
    let mut w = store.write();
    w.delete_range(b"a", &RangeEnd::Before(b"c".to_vec()), false).expect("delete");
    w.put(b"c", b"3".to_vec(), 0);
    let batch = w.finish().0;
    seal_and_commit(&files, &mut store, batch);
    let rev = store.revision();
    let all = RangeEnd::Unbounded;
    let replay = |store: &MvccStore| store.history_events(b"\0", &all, rev, rev, usize::MAX, true).expect("replay");
    let mut batch = Batch::default();
    store.compact(rev, &mut batch).expect("compact");
    seal_and_commit(&files, &mut store, batch);
    // Compacted, not yet removed: previous versions are out of sight.
    let (before, _) = replay(&store);
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(before.iter().all(|e| e.prev_kv.is_none()));
    let hash = hash_history(&files, rev, rev).expect("hash");
    while let Some(step) = store.compaction_step() {
        let done = step.run(&files, 2).expect("step");
        files.tree.apply_batch(done.batch.into_sled()).expect("apply");
        store.freed(done.freed);
        store.compaction_stepped(&step, done.next);
    }
    // Gone: a's first version and its tombstone, b's two versions and its
    // tombstone, c's first version. What stays of history is c at `rev`;
    // the run at `rev` stays too.
    let left: Vec<_> =
        files.history().all().map(|v| keys::parse_hist_key(&v.expect("version").rec).expect("key")).collect();
    assert_eq!(left, vec![(b"c".to_vec(), rev)]);
    let mut runs = Vec::new();
    changes::walk(&files.tree, rev, rev, |r, k| {
        runs.push((r, k.to_vec()));
        Ok(true)
    })
    .expect("walk");
    assert_eq!(runs.len(), 3, "the run at the compacted revision lists its three changes");
    // Reads at the compacted revision, the hash and a watch from it are as
    // before the records went.
    assert_eq!(store.at_revision(b"\0", &all, rev).expect("read").len(), 1);
    assert_eq!(hash_history(&files, rev, rev).expect("hash"), hash);
    let (after, _) = replay(&store);
    assert_eq!(after, before);
    let deleted: Vec<_> = after
        .iter()
        .filter(|e| e.r#type == EventType::Delete as i32)
        .map(|e| e.kv.as_ref().map(|kv| (kv.key.clone(), kv.mod_revision, kv.version)))
        .collect();
    assert_eq!(deleted, vec![Some((b"a".to_vec(), rev, 0)), Some((b"b".to_vec(), rev, 0))]);
    // Below it, a watch is refused as before.
    assert_eq!(store.history_events(b"\0", &all, rev - 1, rev, usize::MAX, false), Err(Error::Compacted));
}

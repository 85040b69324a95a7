use super::*;

fn write(store: &mut MvccStore, value: &str) -> Batch {
    let mut w = store.write();
    w.put(b"k", value.as_bytes().to_vec(), 0);
    w.finish().0
}

#[test]
fn the_history_hash_covers_values_and_revisions_up_to_the_one_asked() {
    let store_of = |values: &[&str]| {
        let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
        let mut store = MvccStore::open(tree.clone()).expect("open");
        for v in values {
            tree.apply_batch(write(&mut store, v).into_sled()).expect("apply");
        }
        tree
    };
    let a = store_of(&["1", "2", "3"]);
    let b = store_of(&["1", "2", "x"]);
    // Revisions 2..=4 hold the three versions.
    assert_eq!(hash_history(&a, 0, 3).unwrap(), hash_history(&b, 0, 3).unwrap());
    assert_ne!(hash_history(&a, 0, 4).unwrap(), hash_history(&b, 0, 4).unwrap());
    assert_ne!(hash_history(&a, 0, 3).unwrap(), hash_history(&a, 0, 4).unwrap());
    // Compacted at 3, the version at 2 is out of sight: it no longer counts.
    let c = store_of(&["0", "2", "3"]);
    assert_ne!(hash_history(&a, 0, 4).unwrap(), hash_history(&c, 0, 4).unwrap());
    assert_eq!(hash_history(&a, 3, 4).unwrap(), hash_history(&c, 3, 4).unwrap());
}

#[test]
fn versions_handed_off_are_read_from_memory_until_they_are_sent() {
    let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
    let mut store = MvccStore::open(tree.clone()).expect("open");
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
    tree.apply_batch(first.into_sled()).expect("apply");
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
fn a_tree_with_a_group_cut_short() -> (sled::Tree, i64) {
    use keys::RangeEnd;
    let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
    let mut store = MvccStore::open(tree.clone()).expect("open");
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
    (tree, before)
}

#[test]
fn a_group_cut_short_between_its_sled_batches_is_removed_at_open() {
    use keys::RangeEnd;
    let (tree, before) = a_tree_with_a_group_cut_short();
    let records = tree.len();
    let reopened = MvccStore::open(tree.clone()).expect("reopen");
    assert_eq!(reopened.revision(), before);
    assert_eq!(reopened.len(), 3000, "the deletion never happened");
    assert_eq!(tree.len(), records - 3000 - 1, "its 3,000 tombstones and its run are gone");
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

/// Copies every record of `tree` into a new tree, giving each to a
/// [`Rebuild`] as a snapshot install does; returns the copy and the store
/// opened from it both ways.
fn rebuilt_copy(tree: &sled::Tree) -> (MvccStore, MvccStore) {
    let copy = sled::Config::new().temporary(true).open().expect("sled").open_tree("c").expect("tree");
    let mut rebuild = Rebuild::default();
    for item in tree.iter() {
        let (k, v) = item.expect("record");
        rebuild.record(&k, &v).expect("a record of a store");
        copy.insert(k, v).expect("insert");
    }
    let rebuilt = MvccStore::open_rebuilt(copy.clone(), rebuild).expect("open rebuilt");
    (rebuilt, MvccStore::open(copy).expect("open"))
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
    let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
    let mut store = MvccStore::open(tree.clone()).expect("open");
    let commit = |store: &mut MvccStore, mut batch: Batch| {
        store.seal(&mut batch);
        tree.apply_batch(batch.into_sled()).expect("apply");
    };
    let mut batch = Batch::default();
    assert!(store.grant_lease(7, 60, &mut batch));
    assert!(store.grant_lease(9, 30, &mut batch));
    commit(&mut store, batch);
    for round in 0..3 {
        let mut w = store.write();
        for i in 0..50 {
            let lease = if i % 5 == 0 { 7 } else { 0 };
            w.put(format!("k{i:02}").as_bytes(), format!("v{round}").into_bytes(), lease);
        }
        let (batch, _) = w.finish();
        commit(&mut store, batch);
    }
    // Deleted keys, one of them written again, and history compacted.
    let mut w = store.write();
    w.delete_range(b"k1", &RangeEnd::Before(b"k2".to_vec()), false).expect("delete");
    let (batch, _) = w.finish();
    commit(&mut store, batch);
    let mut w = store.write();
    w.put(b"k15", b"again".to_vec(), 9);
    let (batch, _) = w.finish();
    commit(&mut store, batch);
    let mut batch = Batch::default();
    store.compact(store.revision() - 2, &mut batch).expect("compact");
    commit(&mut store, batch);
    let (rebuilt, opened) = rebuilt_copy(&tree);
    assert_same(&rebuilt, &opened);
    // And both are the store that wrote the records.
    assert_same(&rebuilt, &store);
    assert_eq!(rebuilt.len(), 41);
    assert_eq!(rebuilt.lease(9).expect("lease 9").keys.len(), 1);
    assert_eq!(rebuilt.lease(7).expect("lease 7").keys.len(), 8);
}

#[test]
fn records_of_a_group_cut_short_are_not_rebuilt_into_the_store() {
    let (tree, _) = a_tree_with_a_group_cut_short();
    let (rebuilt, opened) = rebuilt_copy(&tree);
    assert_same(&rebuilt, &opened);
    assert_eq!(rebuilt.len(), 3000, "the deletion never happened");
}

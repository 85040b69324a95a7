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

#[test]
fn a_group_cut_short_between_its_sled_batches_is_removed_at_open() {
    use keys::RangeEnd;
    let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
    let mut store = MvccStore::open(tree.clone()).expect("open");
    // 3,000 keys in one revision, whole.
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
    // One revision deletes them all; all but its last sled batch land.
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

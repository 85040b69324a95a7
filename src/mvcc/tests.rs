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

//! A property test of the MVCC store against a plain in-memory model: every
//! revision's full key-value state is kept in a map, and every read at every
//! revision must agree with it, across compactions and reopening the store.

use std::collections::BTreeMap;

use kvd::error::Error;
use kvd::mvcc::keys::RangeEnd;
use kvd::mvcc::{MvccStore, INITIAL_REVISION};
use kvd::proto::mvccpb::KeyValue;
use proptest::prelude::*;

const KEYS: &[&[u8]] = &[b"a", b"a\0", b"ab", b"b", b"c", b"\xff", b"\0"];

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u8),
    /// Puts several distinct keys in one revision.
    MultiPut(Vec<usize>, u8),
    Delete(usize, Option<usize>),
    Compact(i64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS.len();
    prop_oneof![
        4 => (k.clone(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        1 => (proptest::collection::btree_set(k.clone(), 1..4), any::<u8>()).prop_map(|(ks, v)| Op::MultiPut(ks.into_iter().collect(), v)),
        2 => (k.clone(), proptest::option::of(k)).prop_map(|(k, e)| Op::Delete(k, e)),
        1 => (0i64..40).prop_map(Op::Compact),
        1 => Just(Op::Reopen),
    ]
}

type State = BTreeMap<Vec<u8>, KeyValue>;

struct Model {
    /// The state after each revision.
    states: BTreeMap<i64, State>,
    compacted: i64,
}

impl Model {
    fn current(&self) -> (i64, &State) {
        let (r, s) = self.states.iter().next_back().expect("initial state");
        (*r, s)
    }
}

fn end_of(e: Option<usize>) -> RangeEnd {
    match e {
        None => RangeEnd::Single,
        Some(i) => RangeEnd::Before(KEYS[i].to_vec()),
    }
}

fn expected(state: &State, key: &[u8], end: &RangeEnd) -> Vec<KeyValue> {
    state.values().filter(|kv| end.contains(key, &kv.key)).cloned().collect()
}

fn check_all_reads(store: &MvccStore, model: &Model) {
    let (cur, _) = model.current();
    assert_eq!(store.revision(), cur);
    // What a watch event at `rev` reports as the previous key-value: the
    // version live at `rev - 1`, kept as long as `rev - 1` is not compacted.
    for rev in (model.compacted.max(INITIAL_REVISION) + 1)..=cur + 1 {
        for key in KEYS {
            let want = model.states.range(..rev).next_back().and_then(|(_, s)| s.get(*key).cloned());
            assert_eq!(store.prev_version(key, rev), Ok(want), "previous version of {key:?} at {rev}");
        }
    }
    for rev in 0..=cur + 1 {
        for (ki, key) in KEYS.iter().enumerate() {
            for end in [RangeEnd::Single, RangeEnd::Unbounded, end_of(Some((ki + 2) % KEYS.len()))] {
                let got = if rev > cur {
                    store.check_read_rev(rev, cur).map(|_| Vec::new())
                } else {
                    store.check_read_rev(rev, cur).and_then(|r| {
                        if r == cur {
                            store.current_kvs(key, &end)
                        } else {
                            store.at_revision(key, &end, r)
                        }
                    })
                };
                let want = if rev > cur {
                    Err(Error::FutureRev)
                } else if rev > 0 && rev < model.compacted {
                    Err(Error::Compacted)
                } else {
                    let r = if rev <= 0 { cur } else { rev };
                    Ok(expected(&model.states[&r], key, &end))
                };
                assert_eq!(got, want, "read of {key:?}..{end:?} at revision {rev}");
            }
        }
    }
}

/// After compaction at `rev`, history below `rev` holds only each key's
/// newest version, and only if that version is live.
fn check_no_dead_history(tree: &sled::Tree, rev: i64) {
    let mut seen = std::collections::BTreeSet::new();
    for item in tree.scan_prefix([kvd::mvcc::keys::HIST]) {
        let (k, v) = item.unwrap();
        let (key, r) = kvd::mvcc::keys::parse_hist_key(&k).expect("history key");
        if r < rev {
            let kv = <KeyValue as prost::Message>::decode(v.as_ref()).unwrap();
            assert!(kv.version != 0, "a deleted version below the compacted revision survived: {key:?}@{r}");
            assert!(seen.insert(key.clone()), "two versions of {key:?} below the compacted revision survived");
        }
    }
}

fn commit(tree: &sled::Tree, batch: kvd::mvcc::Batch) {
    tree.apply_batch(batch.into_sled()).expect("commit");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mvcc_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("state").unwrap();
        let mut store = MvccStore::open(tree.clone()).unwrap();
        let mut model = Model { states: BTreeMap::from([(INITIAL_REVISION, State::new())]), compacted: 0 };
        for op in ops {
            let (cur, state) = model.current();
            let mut next = state.clone();
            match op {
                Op::Put(..) | Op::MultiPut(..) => {
                    let (keys, v) = match op {
                        Op::Put(k, v) => (vec![k], v),
                        Op::MultiPut(ks, v) => (ks, v),
                        _ => unreachable!("matched above"),
                    };
                    let mut w = store.write();
                    for k in &keys {
                        w.put(KEYS[*k], vec![v], 0);
                        let prev = next.get(KEYS[*k]).cloned();
                        next.insert(KEYS[*k].to_vec(), KeyValue {
                            key: KEYS[*k].to_vec(),
                            create_revision: prev.as_ref().map(|p| p.create_revision).unwrap_or(cur + 1),
                            mod_revision: cur + 1,
                            version: prev.map(|p| p.version + 1).unwrap_or(1),
                            value: vec![v],
                            lease: 0,
                        });
                    }
                    // Reads through the write see its values before they
                    // are committed to the tree.
                    let all = w.store().current_kvs(b"\0", &RangeEnd::Unbounded);
                    prop_assert_eq!(all, Ok(expected(&next, b"\0", &RangeEnd::Unbounded)));
                    // ... and the versions it wrote, as the previous ones
                    // of a later revision.
                    for key in KEYS {
                        let prev = w.store().prev_version(key, cur + 2);
                        prop_assert_eq!(prev, Ok(next.get(*key).cloned()), "previous version of {:?}", key);
                    }
                    let (batch, events) = w.finish();
                    prop_assert_eq!(events.len(), keys.len());
                    commit(&tree, batch);
                    store.committed();
                    model.states.insert(cur + 1, next);
                }
                Op::Delete(k, e) => {
                    let end = end_of(e);
                    let doomed = expected(state, KEYS[k], &end);
                    let mut w = store.write();
                    let deleted = w.delete_range(KEYS[k], &end, true);
                    prop_assert_eq!(&deleted, &Ok((doomed.len(), doomed.clone())));
                    let (batch, _) = w.finish();
                    commit(&tree, batch);
                    store.committed();
                    if !doomed.is_empty() {
                        for kv in doomed {
                            next.remove(&kv.key);
                        }
                        model.states.insert(cur + 1, next);
                    }
                }
                Op::Compact(rev) => {
                    let mut batch = kvd::mvcc::Batch::default();
                    let got = store.compact(rev, &mut batch);
                    if rev <= model.compacted {
                        prop_assert_eq!(got, Err(Error::Compacted));
                    } else if rev > cur {
                        prop_assert_eq!(got, Err(Error::FutureRev));
                    } else {
                        prop_assert_eq!(got, Ok(()));
                        commit(&tree, batch);
                        model.compacted = rev;
                        check_no_dead_history(&tree, rev);
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = MvccStore::open(tree.clone()).unwrap();
                }
            }
            check_all_reads(&store, &model);
        }
    }
}

//! A property test of the MVCC store against a plain in-memory model: every
//! revision's full key-value state and events are kept in maps, and every
//! read and every replay of history from every revision must agree with
//! them, across compactions (whose removal of history goes in steps between
//! other operations) and reopening the store. Writes are committed to
//! the tree now after each, now several together, as the state machine
//! commits them in groups.

use std::collections::BTreeMap;

use kvd::error::Error;
use kvd::mvcc::keys::RangeEnd;
use kvd::mvcc::{Files, MvccStore, INITIAL_REVISION};
use kvd::proto::mvccpb::{event::EventType, Event, KeyValue};
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
    /// Commits the writes made since the last commit.
    Commit,
    /// Runs steps of physical compaction, each reading a few records.
    Step(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..KEYS.len();
    prop_oneof![
        4 => (k.clone(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        1 => (proptest::collection::btree_set(k.clone(), 1..4), any::<u8>()).prop_map(|(ks, v)| Op::MultiPut(ks.into_iter().collect(), v)),
        2 => (k.clone(), proptest::option::of(k)).prop_map(|(k, e)| Op::Delete(k, e)),
        1 => (0i64..40).prop_map(Op::Compact),
        1 => Just(Op::Reopen),
        3 => Just(Op::Commit),
        2 => (1usize..4, 1usize..5).prop_map(|(steps, limit)| Op::Step(steps, limit)),
    ]
}

type State = BTreeMap<Vec<u8>, KeyValue>;

struct Model {
    /// The state after each revision.
    states: BTreeMap<i64, State>,
    /// The events of each revision, in the order they were written.
    events: BTreeMap<i64, Vec<Event>>,
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

/// Checks every read; reads at past revisions only if every write is
/// `committed` to the tree, since they read the tree alone (the state
/// machine commits before such a read). Current reads and previous versions
/// also find writes not yet committed.
fn check_all_reads(store: &MvccStore, model: &Model, committed: bool) {
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
        if !committed && rev > 0 && rev < cur {
            continue;
        }
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

/// Replays history from every revision a watch may start at, for a key, a
/// range and every key, whole and in chunks of whole revisions, with and
/// without previous key-values.
fn check_replays(store: &MvccStore, model: &Model) {
    let (cur, _) = model.current();
    for from in model.compacted.max(INITIAL_REVISION)..=cur + 1 {
        for (key, end) in
            [(&b"a"[..], RangeEnd::Single), (b"a", RangeEnd::Before(b"b".to_vec())), (b"\0", RangeEnd::Unbounded)]
        {
            for with_prev in [false, true] {
                let want: Vec<Event> = model
                    .events
                    .range(from..)
                    .flat_map(|(rev, events)| {
                        let before = &model.states[&(rev - 1)];
                        events.iter().filter(|e| end.contains(key, &e.kv.as_ref().expect("kv").key)).map(move |e| {
                            // As etcd's, a previous version lost to compaction is left out.
                            let prev_kv = match with_prev && *rev > model.compacted {
                                true => before.get(&e.kv.as_ref().expect("kv").key).cloned(),
                                false => None,
                            };
                            Event { prev_kv, ..e.clone() }
                        })
                    })
                    .collect();
                for chunk in [usize::MAX, 1, 2] {
                    let mut got = Vec::new();
                    let mut next = from;
                    while next <= cur {
                        let (events, last) =
                            store.history_events(key, &end, next, cur, chunk, with_prev).expect("replay");
                        assert!(last >= next && last <= cur, "replay from {next} ended at {last}");
                        if let Some(e) = events.last() {
                            assert!(e.kv.as_ref().expect("kv").mod_revision <= last, "an event after the chunk's end");
                        }
                        got.extend(events);
                        next = last + 1;
                    }
                    assert_eq!(
                        got, want,
                        "replay of {key:?}..{end:?} from {from} in chunks of {chunk}, prev {with_prev}"
                    );
                }
            }
        }
    }
    if model.compacted > INITIAL_REVISION {
        let got = store.history_events(b"\0", &RangeEnd::Unbounded, model.compacted - 1, cur, usize::MAX, false);
        assert_eq!(got, Err(Error::Compacted));
    }
}

/// The value a put of `v` writes: for odd `v`, one large enough to be kept
/// apart from the tree (see `kvd::mvcc::values`).
fn value_of(v: u8) -> Vec<u8> {
    vec![v; if v % 2 == 1 { kvd::mvcc::values::SEPARATE_FROM } else { 1 }]
}

/// After compaction at `rev`, history at or below `rev` holds only each
/// key's newest version, and only if that version is live.
fn check_no_dead_history(files: &Files, rev: i64) {
    let mut seen = std::collections::BTreeSet::new();
    for item in files.history().all() {
        let version = item.unwrap();
        let (k, v) = (version.rec, version.stored);
        let (key, r) = kvd::mvcc::keys::parse_hist_key(&k).expect("history key");
        if r <= rev {
            let kv = kvd::mvcc::values::Stored::decode(v.as_ref()).unwrap().kv;
            assert!(kv.version != 0, "a deleted version at or below the compacted revision survived: {key:?}@{r}");
            assert!(seen.insert(key.clone()), "two versions of {key:?} at or below the compacted revision survived");
        }
    }
}

/// Runs up to `steps` steps of physical compaction reading at most `limit`
/// records each, as the compaction thread does: straight to the tree, while
/// later writes may wait in `unsaved`. Once a pass is complete, checks that
/// it removed what it must.
fn step(store: &mut MvccStore, files: &Files, steps: usize, limit: usize) {
    for _ in 0..steps {
        let Some(step) = store.compaction_step() else { return };
        let done = step.run(files, limit).expect("step");
        files.tree.apply_batch(done.batch.into_sled()).expect("commit step");
        files.packs.forget(done.unpacked.iter().map(|r| &r[..]));
        store.freed(done.freed);
        if store.compaction_stepped(&step, done.next) {
            assert_eq!(store.physical(), step.rev);
            check_no_dead_history(files, step.rev);
        }
    }
}

/// Commits the writes gathered in `unsaved` with their revision order, as
/// the state machine commits a group.
fn commit(store: &mut MvccStore, files: &Files, unsaved: &mut kvd::mvcc::Batch) {
    let tree = &files.tree;
    let mut batch = std::mem::take(unsaved);
    store.seal(&mut batch);
    // As the commit thread does: history packed, the oldest packs unpacked
    // past the most kept.
    files.commit(batch, 1000).expect("commit");
    store.committed();
    // With every write in the tree, the bytes the store counts are those of
    // its history (packed or not), revision-order and lease records there.
    let history: u64 = files
        .history()
        .all()
        .map(|v| v.expect("history"))
        .map(|v| kvd::mvcc::values::record_bytes(&v.rec, &v.stored).expect("history record"))
        .sum();
    let on_disk: u64 = history
        + [b's', b'l']
            .iter()
            .flat_map(|prefix| tree.scan_prefix([*prefix]))
            .map(|item| {
                let (k, v) = item.expect("scan");
                match k.first() {
                    Some(b'h') => kvd::mvcc::values::record_bytes(&k, &v).expect("history record"),
                    _ => (k.len() + v.len()) as u64,
                }
            })
            .sum::<u64>();
    assert_eq!(store.bytes_in_use(), on_disk);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mvcc_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let values = kvd::mvcc::values::ValueLog::create(&dir.path().join("values"), 1).unwrap();
        // Few versions packed at most: packs are unpacked as history grows
        // past them, as well as by compaction.
        let packs = std::sync::Arc::new(kvd::mvcc::packs::Packs::with_max(24));
        let files = Files { packs, ..Files::new(db.open_tree("state").unwrap(), std::sync::Arc::new(values)) };
        let mut store = MvccStore::open(files.clone()).unwrap();
        let mut model = Model { states: BTreeMap::from([(INITIAL_REVISION, State::new())]), events: BTreeMap::new(), compacted: 0 };
        let mut unsaved = kvd::mvcc::Batch::default();
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
                        w.put(KEYS[*k], value_of(v), 0);
                        let prev = next.get(KEYS[*k]).cloned();
                        next.insert(KEYS[*k].to_vec(), KeyValue {
                            key: KEYS[*k].to_vec(),
                            create_revision: prev.as_ref().map(|p| p.create_revision).unwrap_or(cur + 1),
                            mod_revision: cur + 1,
                            version: prev.map(|p| p.version + 1).unwrap_or(1),
                            value: value_of(v),
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
                    unsaved.append(batch);
                    let written = keys.iter().map(|k| Event { r#type: EventType::Put as i32, kv: next.get(KEYS[*k]).cloned(), prev_kv: None });
                    model.events.insert(cur + 1, written.collect());
                    model.states.insert(cur + 1, next);
                }
                Op::Delete(k, e) => {
                    let end = end_of(e);
                    let doomed = expected(state, KEYS[k], &end);
                    let mut w = store.write();
                    let deleted = w.delete_range(KEYS[k], &end, true);
                    prop_assert_eq!(&deleted, &Ok((doomed.len(), doomed.clone())));
                    let (batch, events) = w.finish();
                    unsaved.append(batch);
                    let tomb = |kv: &KeyValue| KeyValue { key: kv.key.clone(), mod_revision: cur + 1, ..Default::default() };
                    let written: Vec<Event> = doomed.iter().map(|kv| Event { r#type: EventType::Delete as i32, kv: Some(tomb(kv)), prev_kv: None }).collect();
                    prop_assert_eq!(&events, &written);
                    if !doomed.is_empty() {
                        for kv in doomed {
                            next.remove(&kv.key);
                        }
                        model.events.insert(cur + 1, written);
                        model.states.insert(cur + 1, next);
                    }
                }
                Op::Compact(rev) => {
                    // Compaction reads history: the state machine commits
                    // every write before it.
                    commit(&mut store, &files, &mut unsaved);
                    let mut batch = kvd::mvcc::Batch::default();
                    let got = store.compact(rev, &mut batch);
                    if rev <= model.compacted {
                        prop_assert_eq!(got, Err(Error::Compacted));
                    } else if rev > cur {
                        prop_assert_eq!(got, Err(Error::FutureRev));
                    } else {
                        prop_assert_eq!(got, Ok(()));
                        unsaved.append(batch);
                        commit(&mut store, &files, &mut unsaved);
                        model.compacted = rev;
                        prop_assert!(store.physical() < rev);
                    }
                }
                Op::Reopen => {
                    commit(&mut store, &files, &mut unsaved);
                    drop(store);
                    store = MvccStore::open(files.clone()).unwrap();
                }
                Op::Commit => commit(&mut store, &files, &mut unsaved),
                Op::Step(steps, limit) => step(&mut store, &files, steps, limit),
            }
            // Reads of history read the tree alone: like the state machine,
            // they wait for what was written to be committed.
            check_all_reads(&store, &model, unsaved.is_empty());
            if unsaved.is_empty() {
                check_replays(&store, &model);
            }
        }
        commit(&mut store, &files, &mut unsaved);
        check_all_reads(&store, &model, true);
        check_replays(&store, &model);
        // The hash members compare does not depend on how far physical
        // compaction has come.
        let (compacted, revision) = (store.compacted(), store.revision());
        let hash = |files: &Files, rev| kvd::mvcc::hash_history(files, compacted, rev).expect("hash");
        let before: Vec<u32> = (compacted.max(1)..=revision).map(|r| hash(&files, r)).collect();
        // Physical compaction always comes to an end, and reads agree after.
        step(&mut store, &files, usize::MAX, 3);
        prop_assert!(store.compaction_step().is_none());
        prop_assert_eq!(store.physical(), model.compacted);
        check_all_reads(&store, &model, true);
        check_replays(&store, &model);
        let after: Vec<u32> = (compacted.max(1)..=revision).map(|r| hash(&files, r)).collect();
        prop_assert_eq!(before, after);
    }
}

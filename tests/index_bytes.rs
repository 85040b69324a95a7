//! What the in-memory key index costs per key: the one part of a member's
//! memory that grows with the number of keys whatever the size of their
//! values, which stay on disk.
//!
//! The index is built by the store's own writes, as a member applies them.
//! Each group of writes is then dropped as if the commit thread had taken it
//! to sled, so that what remains allocated is what the store keeps in
//! memory. A counting allocator in front of jemalloc (kvd's allocator) adds
//! up the bytes jemalloc reserves for each block this thread holds, its
//! rounding to size classes included.
//!
//! `cargo test --release --test index_bytes -- --nocapture` prints the figures.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::Arc;

use kvd::mvcc::values::ValueLog;
use kvd::mvcc::{Batch, Files, MvccStore};
use tikv_jemallocator::Jemalloc;

/// Counts, per thread, the bytes of the blocks the thread allocated and
/// has not freed.
struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    // A thread being torn down has no counter left; its blocks are not ours.
    let _ = HELD.try_with(|h| h.set(h.get() + bytes));
}

fn held() -> isize {
    HELD.with(|h| h.get())
}

// SAFETY: every call is passed on to jemalloc unchanged; the counter is a
// thread-local integer that allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { Jemalloc.alloc(layout) };
        if !p.is_null() {
            count(unsafe { tikv_jemallocator::usable_size(p) } as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { Jemalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            count(unsafe { tikv_jemallocator::usable_size(p) } as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        count(-(unsafe { tikv_jemallocator::usable_size(p) } as isize));
        unsafe { Jemalloc.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = unsafe { tikv_jemallocator::usable_size(p) } as isize;
        let q = unsafe { Jemalloc.realloc(p, layout, new_size) };
        if !q.is_null() {
            count(unsafe { tikv_jemallocator::usable_size(q) } as isize - old);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Keys written; the index of 100,000 keys is far larger than anything
/// the store holds that does not grow with them.
const KEYS: u64 = 100_000;
/// Writes per group, as the state machine groups them before a commit.
const GROUP: u64 = 1_000;
/// Values are 1 KiB: were any of them kept in the index, it would cost
/// more than 1,024 bytes per key.
const VALUE_BYTES: usize = 1024;

/// A 16-byte key, as `kvctl bench put --key-size 16` writes.
fn key(n: u64) -> Vec<u8> {
    format!("key-{n:012}").into_bytes()
}

/// The order keys are written in: 0, 1, 2, ... or scattered over the key
/// space (a step prime to it visits every key once).
fn nth(i: u64, scattered: bool) -> u64 {
    if scattered {
        (i * 7_919) % KEYS
    } else {
        i
    }
}

/// Bytes the store holds per key after `KEYS` puts of distinct keys, each
/// with its own lease if `leased`; with `packed`, the places of the
/// versions packed as a commit packs them (see `kvd::mvcc::packs`)
/// included.
fn bytes_per_key(scattered: bool, leased: bool, packed: bool) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
    let values = ValueLog::create(&dir.path().join("values"), 1).expect("value file");
    let files = Files::new(tree, Arc::new(values));
    let mut store = MvccStore::open(files.clone()).expect("open");
    let before = held();
    for first in (0..KEYS).step_by(GROUP as usize) {
        let mut group = Batch::default();
        for i in first..first + GROUP {
            let n = nth(i, scattered);
            let lease = if leased { n as i64 + 1 } else { 0 };
            if leased {
                assert!(store.grant_lease(lease, 60, &mut group));
            }
            let mut w = store.write();
            w.put(&key(n), vec![b'v'; VALUE_BYTES], lease);
            let (batch, events) = w.finish();
            assert_eq!(events.len(), 1);
            group.append(batch);
        }
        store.seal(&mut group);
        // The commit thread would take the group to sled; reads of these
        // versions then go there. Packed, their places stay (sled itself,
        // which allocates on this thread too, is left out).
        if packed {
            group.separate_values(&files.values).expect("values");
            files.packs.add(group.pack_history());
        }
        store.committed();
        drop(group);
    }
    assert_eq!(store.len() as u64, KEYS);
    (held() - before) as f64 / KEYS as f64
}

#[test]
fn the_key_index_holds_no_values_and_a_lease_of_one_key_holds_no_set() {
    for scattered in [false, true] {
        let plain = bytes_per_key(scattered, false, false);
        let leased = bytes_per_key(scattered, true, false);
        let order = if scattered { "scattered" } else { "in order" };
        println!(
            "{KEYS} keys of 16 bytes written {order}: {plain:.0} bytes per key; \
             {leased:.0} with a lease each (lease and the key in its set included)"
        );
        // The index's B-tree holds a key's bytes and four 8-byte numbers;
        // half-full nodes at worst, jemalloc's size classes, and the inner
        // nodes come to about twice that. A value in it would add 1 KiB.
        assert!((32.0..200.0).contains(&plain), "{plain:.0} bytes per key {order}");
        assert!(leased > plain, "a lease and its key set cost something: {leased:.0} against {plain:.0}");
        // A lease of one key keeps it without a set of its own (see
        // `kvd::mvcc::LeaseKeys`): 96-122 bytes more, where a B-tree set of
        // one key made it 400-424.
        assert!(leased < plain + 200.0, "{leased:.0} bytes per leased key {order}, {plain:.0} without");
    }
}

#[test]
fn a_packed_version_costs_its_place_and_no_value() {
    for scattered in [false, true] {
        let plain = bytes_per_key(scattered, false, false);
        let packed = bytes_per_key(scattered, false, true);
        let order = if scattered { "scattered" } else { "in order" };
        println!(
            "{KEYS} keys of 16 bytes written {order}: {plain:.0} bytes per key; {packed:.0} with the place of its \
             packed version"
        );
        // A place holds the history record's key (27 bytes here, inside
        // the node) and where the version is (16 bytes), in a B-tree whose
        // nodes fill half to whole; the value (1 KiB) is in the value
        // file.
        let place = packed - plain;
        assert!((45.0..160.0).contains(&place), "{place:.0} bytes per place {order}");
    }
}

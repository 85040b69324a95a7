//! The MVCC key-value store: etcd's data model over sled.
//!
//! Every write gets the next cluster-wide revision; every version of every key
//! is kept, by key and by revision, until compaction removes what no read at or
//! after the compacted revision can see. What the newest version of each live
//! key is (its revisions, version and lease, not its value) is also held in
//! memory, as etcd holds its key index: a read at the current revision finds
//! its keys without scanning history, and reads each value by its exact
//! history record. Values stay on disk, so a member's memory grows with its
//! number of keys, not with their size.
//!
//! This module is pure: no async, no network. The Raft state machine drives it
//! and commits the sled batch each write produces together with the applied
//! log id.

pub mod batch;
pub mod changes;
mod compaction;
mod error;
mod hash;
pub mod keys;
mod lease_keys;
mod lease_log;
pub mod ops;
pub mod packs;
mod rebuild;
pub mod txn;
pub mod values;
mod writer;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
pub use batch::Batch;
pub use compaction::{CompactionStep, StepDone};
pub use error::StoreError;
pub use hash::hash_history;
use keys::RangeEnd;
pub use lease_keys::LeaseKeys;
pub use lease_log::{LeaseLog, LeaseMark};
pub use rebuild::Rebuild;
use values::{load_kv, Stored, ValueLog};
pub use writer::Writer;

/// Bytes of one lease record: its key (a prefix and the id) and its TTL.
const LEASE_RECORD_BYTES: u64 = 1 + 8 + 8;

/// The revision of a store that has never been written, as in etcd.
pub const INITIAL_REVISION: i64 = 1;

/// A granted lease as the store knows it. When it expires is not part of the
/// replicated state: the leader alone decides that, and revokes it through Raft.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    /// The TTL it was granted with, in seconds.
    pub ttl: i64,
    /// The live keys attached to it.
    pub keys: LeaseKeys,
    /// Which grant of its id this is, unique in the process (a lease
    /// generation, see [`LeaseLog`]): a lease revoked and
    /// granted again under the same id is not the lease it was, and its
    /// countdown starts afresh.
    pub granted: u64,
}

/// What the index holds of a live key's newest version: all but the value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Revision of the key's creation (since it was last deleted).
    pub create_revision: i64,
    /// Revision of its newest version.
    pub mod_revision: i64,
    /// Number of versions since creation.
    pub version: i64,
    /// The lease it is attached to, or 0.
    pub lease: i64,
}

impl Meta {
    fn of(kv: &KeyValue) -> Meta {
        Meta {
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }

    /// The key-value this describes, without its value.
    pub fn without_value(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: Vec::new(),
            lease: self.lease,
        }
    }
}

/// A key as the index holds it: up to 24 bytes inside the B-tree's node,
/// longer ones apart. A lookup compares the key with several in each node
/// it passes; held inside it, they are in the memory the node is read from
/// already, where a `Vec` sends each comparison elsewhere in memory (a walk
/// of 100,000 keys touched some thirty places, most of them out of the
/// CPU's caches while puts went on).
pub(crate) type IndexKey = smallvec::SmallVec<[u8; 24]>;

/// Where a store's records are: a sled tree, and the file of the values
/// kept apart from it (see [`values`]), whose positions its records name.
#[derive(Clone)]
pub struct Files {
    /// The tree of records.
    pub tree: sled::Tree,
    /// The values kept apart.
    pub values: Arc<ValueLog>,
    /// Where the packed versions of the tree's history are (see
    /// [`packs`]): empty until [`MvccStore::open`] reads them.
    pub packs: Arc<packs::Packs>,
}

impl Files {
    /// The files of a store in `tree` and `values`.
    pub fn new(tree: sled::Tree, values: Arc<ValueLog>) -> Files {
        Files { tree, values, packs: Arc::default() }
    }

    /// The store's history, packed and not.
    pub fn history(&self) -> packs::History<'_> {
        packs::History { tree: &self.tree, packs: &self.packs }
    }

    /// Commits a group of writes: the values kept apart go to the value
    /// file, which is synced, and then the records to the tree, the history
    /// records in packs, in sled batches of about `limit` writes applied in
    /// order (see [`Batch::into_sled_chunks`]); then the packed versions'
    /// places are recorded, and the oldest packs unpacked if more versions
    /// are packed than a store keeps ([`packs::MAX_PACKED`]).
    pub fn commit(&self, mut batch: Batch, limit: usize) -> Result<()> {
        if batch.separate_values(&self.values)? > 0 {
            self.values.sync()?;
        }
        let packed = batch.pack_history();
        let count = packed.len();
        for chunk in batch.into_sled_chunks(limit) {
            self.tree.apply_batch(chunk)?;
        }
        self.packs.add(packed);
        // Past the most packed versions kept, the oldest are unpacked, a
        // sled batch that writes their records and removes their packs.
        let over = self.packs.over(count);
        if over > 0 {
            let mut unpacking = sled::Batch::default();
            let unpacked = packs::unpack_oldest(&self.tree, over, &mut unpacking)?;
            self.tree.apply_batch(unpacking)?;
            self.packs.forget(unpacked.iter().map(|r| &r[..]));
        }
        Ok(())
    }
}

/// The files a store lives in, shared with the thread that commits to
/// them: a defragment moves the store into a tree of a new database, and a
/// value file of its own, while reads go on (see [`MvccStore::tree_cell`]).
pub type TreeCell = Arc<RwLock<Files>>;

/// An MVCC key-value store kept in one sled tree, and a value file.
pub struct MvccStore {
    tree: TreeCell,
    /// Newest version of every live key.
    index: BTreeMap<IndexKey, Meta>,
    /// Versions (deletions included) written but not yet committed to the
    /// tree, by history record key, so that reads through a write in
    /// progress, and before the state machine commits its group of writes,
    /// find them. All are newer than any version in the tree.
    pending: BTreeMap<Vec<u8>, KeyValue>,
    /// Versions handed off to be committed to the tree in the background
    /// (see [`MvccStore::hand_off`]): older than every pending one, newer
    /// than any in the tree, and perhaps in the tree already.
    sending: BTreeMap<Vec<u8>, KeyValue>,
    /// Which key each change since the last [`MvccStore::seal`] wrote.
    run: changes::Run,
    /// Granted leases.
    leases: BTreeMap<i64, Lease>,
    revision: i64,
    compacted: i64,
    /// The revision up to which history is physically removed: below
    /// `compacted` while compaction goes on in steps.
    physical: i64,
    /// The pass of physical compaction under way, and where its next step
    /// starts.
    pass: u64,
    cursor: Vec<u8>,
    /// Bytes of history, revision-order and lease records (keys and values),
    /// those not yet committed included: see [`MvccStore::bytes_in_use`].
    in_use: u64,
    /// See [`MvccStore::lease_log`].
    lease_log: LeaseLog,
}

impl MvccStore {
    /// Opens the store kept in `files`, rebuilding the in-memory index from
    /// history. The pass reads the history records alone, never a value
    /// kept apart.
    pub fn open(files: Files) -> Result<Self> {
        let tree = &files.tree;
        changes::upgrade(tree)?;
        let (revision, _) = revision_after_cut_short(tree)?;
        files.packs.load(tree)?;
        let mut rebuild = Rebuild::default();
        for item in files.history().all() {
            let version = item?;
            rebuild.record(&version.rec, &version.stored)?;
        }
        for prefix in [changes::RUNS, keys::LEASE] {
            for item in tree.scan_prefix([prefix]) {
                let (rec, value) = item?;
                rebuild.record(&rec, &value)?;
            }
        }
        Self::from_rebuild(files, rebuild.finish()?, revision)
    }

    /// Opens the store just written into `tree` from records that were
    /// also given to `rebuild` (a snapshot's), without reading the tree
    /// back; one that needs more than that (an older layout, the records
    /// of a commit cut short) is opened as [`MvccStore::open`] does.
    pub fn open_rebuilt(files: Files, rebuild: Rebuild) -> Result<Self> {
        if rebuild.old_layout {
            return Self::open(files);
        }
        match revision_after_cut_short(&files.tree)? {
            (revision, 0) => Self::from_rebuild(files, rebuild.finish()?, revision),
            // The records given to `rebuild` included what was removed.
            _ => Self::open(files),
        }
    }

    fn from_rebuild(files: Files, rebuild: Rebuild, revision: i64) -> Result<Self> {
        // Values are synced before the records that point at them are
        // written, so a file shorter than the records say lost its end (or
        // is not the store's): refused here, instead of a member that
        // serves an internal error for each value it lost.
        let held = files.values.len();
        if rebuild.values_end > held {
            return Err(StoreError::corrupt(format!(
                "value file {}: it holds {held} bytes, but the store's records point at values up to byte {}: \
                 it was cut short, removed or replaced. Remove this member, clear its data directory and add it \
                 again to have it catch up from the others",
                files.values.path().display(),
                rebuild.values_end
            ))
            .into());
        }
        let compacted = read_meta_i64(&files.tree, "compacted")?.unwrap_or(0);
        // An older kvd removed history at once, and wrote no such record.
        let physical = read_meta_i64(&files.tree, "physical")?.unwrap_or(compacted);
        let Rebuild { index, leases, in_use, .. } = rebuild;
        let mut store = MvccStore {
            tree: Arc::new(RwLock::new(files)),
            index,
            pending: BTreeMap::new(),
            sending: BTreeMap::new(),
            run: changes::Run::default(),
            leases,
            revision,
            compacted,
            physical,
            pass: 0,
            cursor: Vec::new(),
            in_use,
            lease_log: LeaseLog::new(),
        };
        if store.physical < store.compacted {
            store.start_pass();
        }
        Ok(store)
    }

    /// The lease `id`, if it is granted.
    pub fn lease(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every granted lease.
    pub fn leases(&self) -> &BTreeMap<i64, Lease> {
        &self.leases
    }

    /// Where the leases stand and which changed lately: its mark changes
    /// each time a lease is granted or revoked, and differs between any two
    /// stores of the process, so the same mark means the same leases (their
    /// keys aside).
    pub fn lease_log(&self) -> &LeaseLog {
        &self.lease_log
    }

    /// Grants lease `id` with `ttl` seconds; false if it already exists.
    pub fn grant_lease(&mut self, id: i64, ttl: i64, batch: &mut Batch) -> bool {
        if self.leases.contains_key(&id) {
            return false;
        }
        let granted = self.lease_log.record(id);
        self.leases.insert(id, Lease { ttl, keys: LeaseKeys::default(), granted });
        batch.insert(keys::lease_key(id), ttl.to_be_bytes());
        self.in_use += LEASE_RECORD_BYTES;
        true
    }

    /// Bytes of data the store holds: every version of every key kept
    /// (history records, keys and values as stored), the revision-order
    /// records that watches replay, and the leases. Compaction lowers it as
    /// it removes history. It is what `--quota-backend-bytes` limits, and
    /// what Status reports as `dbSizeInUse`; sled's files (`dbSize`) are
    /// larger, by sled's own overhead and space it has not reclaimed.
    pub fn bytes_in_use(&self) -> u64 {
        self.in_use
    }

    /// Records that a step of physical compaction removed `freed` bytes of
    /// records (see [`StepDone::freed`]).
    pub fn freed(&mut self, freed: u64) {
        self.in_use = self.in_use.saturating_sub(freed);
    }

    /// Events of revisions `from..=to` on keys in `[key, end)`, in revision
    /// order, read from history. Whole revisions only: it stops after the
    /// first revision that brings the count to `max_events` or more. Returns
    /// the events and the last revision read (so the caller goes on after it).
    pub fn history_events(
        &self,
        key: &[u8],
        end: &RangeEnd,
        from: i64,
        to: i64,
        max_events: usize,
        with_prev: bool,
    ) -> Result<(Vec<Event>, i64)> {
        if from > to {
            return Ok((Vec::new(), to));
        }
        if from < self.compacted {
            return Err(Error::Compacted);
        }
        let mut out = Vec::new();
        let mut last = to;
        let files = self.files();
        let (tree, values, history) = (&files.tree, &files.values, files.history());
        changes::walk(tree, from, to, |rev, k| {
            if out.len() >= max_events && out.last().map(event_rev) != Some(rev) {
                last = rev - 1;
                return Ok(false);
            }
            if !end.contains(key, k) {
                return Ok(true);
            }
            let kv = match history.get(&keys::hist_key(k, rev))? {
                Some(v) => load_kv(&v, values)?,
                // Compaction at `rev` removes only the deletions at `rev`
                // (a version written at the compacted revision is the
                // newest there, and kept unless it is a deletion); the
                // event is what the deletion wrote.
                None if rev == self.compacted => KeyValue { key: k.to_vec(), mod_revision: rev, ..Default::default() },
                None => return Err(Error::Compacted),
            };
            let prev_kv = if with_prev { self.prev_version(k, rev)? } else { None };
            let r#type = if kv.version == 0 { EventType::Delete } else { EventType::Put };
            out.push(Event { r#type: r#type as i32, kv: Some(kv), prev_kv });
            Ok(true)
        })?;
        Ok((out, last))
    }

    /// The live version of `key` before revision `rev`, read from history:
    /// what a watch event at `rev` reports as the previous key-value. None if
    /// the key was not live then, or if that version was compacted away.
    /// `key` must have a version at `rev`.
    pub fn prev_version(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>> {
        if rev <= self.compacted {
            // Replaced by the version at `rev`, at or below the compacted
            // revision: compacted away, though perhaps not removed yet.
            return Ok(None);
        }
        let (from, to) = (keys::hist_key(key, 0), keys::hist_key(key, rev));
        // Newest first: pending versions, then those being committed, then
        // the tree.
        for overlay in [&self.pending, &self.sending] {
            if let Some((_, kv)) = overlay.range(from.clone()..to.clone()).next_back() {
                return Ok(Some(kv.clone()).filter(|p| p.version != 0));
            }
        }
        let files = self.in_use_files();
        match files.history().last_in(&from, &to)? {
            Some((_, stored)) => {
                let stored = Stored::decode(&stored)?;
                match stored.kv.version {
                    0 => Ok(None),
                    _ => Ok(Some(stored.load(&files.values)?)),
                }
            }
            None => Ok(None),
        }
    }

    /// The full key-value of a live key whose index entry is `meta`.
    pub fn load(&self, key: &[u8], meta: &Meta) -> Result<KeyValue> {
        let rec = keys::hist_key(key, meta.mod_revision);
        if let Some(kv) = self.pending.get(&rec).or_else(|| self.sending.get(&rec)) {
            return Ok(kv.clone());
        }
        let files = self.in_use_files();
        match files.history().get(&rec)? {
            Some(v) => load_kv(&v, &files.values),
            None => Err(StoreError::inconsistent(format!(
                "the history record of a live key is missing (revision {})",
                meta.mod_revision
            ))
            .into()),
        }
    }

    /// Adds to `batch` the revision-order record of every change made since
    /// the last call. Every batch of writes committed to the tree needs it:
    /// a watch replays history in this order, and finds no change that a
    /// batch committed without it.
    pub fn seal(&mut self, batch: &mut Batch) {
        self.in_use += self.run.seal(batch);
    }

    /// Tells the store that every write made so far is committed to its
    /// tree, so their values are read from there from now on.
    pub fn committed(&mut self) {
        self.pending.clear();
        self.sending.clear();
    }

    /// Tells the store that the writes made so far are being committed to
    /// its tree in the background: they are read from memory until
    /// [`MvccStore::sent`] says they are there.
    pub fn hand_off(&mut self) {
        self.sending.append(&mut self.pending);
    }

    /// Tells the store that the writes handed off are in its tree.
    pub fn sent(&mut self) {
        self.sending.clear();
    }

    /// Whether writes handed off may still be on their way to the tree.
    pub fn is_sending(&self) -> bool {
        !self.sending.is_empty()
    }

    /// The sled tree the store lives in.
    pub fn tree(&self) -> sled::Tree {
        self.in_use_files().tree.clone()
    }

    /// The tree and the value file the store lives in.
    pub fn files(&self) -> Files {
        self.in_use_files().clone()
    }

    fn in_use_files(&self) -> std::sync::RwLockReadGuard<'_, Files> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The cell that holds the store's tree. Whoever replaces the tree in it
    /// must have copied every record of the old tree into the new one, and
    /// commit nothing more to the old: a read finds each version in the
    /// store's overlays or in whichever tree the cell holds when it looks.
    pub fn tree_cell(&self) -> TreeCell {
        self.tree.clone()
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The compacted revision (0 if never compacted).
    pub fn compacted(&self) -> i64 {
        self.compacted
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no key is live.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Checks that a read at `rev` (0 or less for current) can be served, and
    /// returns the revision it reads at.
    pub fn check_read_rev(&self, rev: i64, current: i64) -> Result<i64> {
        if rev > current {
            return Err(Error::FutureRev);
        }
        if rev <= 0 {
            return Ok(current);
        }
        if rev < self.compacted {
            return Err(Error::Compacted);
        }
        Ok(rev)
    }

    /// The index entry of `key`, if it is live.
    pub fn get(&self, key: &[u8]) -> Option<&Meta> {
        self.index.get(key)
    }

    /// Live keys in `[key, end)` at the current revision, in key order, with
    /// their index entries ([`MvccStore::load`] reads a value).
    pub fn current<'a>(
        &'a self,
        key: &'a [u8],
        end: &'a RangeEnd,
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a Meta)> + 'a> {
        use std::ops::Bound::*;
        let pair = |(k, m): (&'a IndexKey, &'a Meta)| (k.as_slice(), m);
        match end {
            RangeEnd::Single => Box::new(self.index.get_key_value(key).map(pair).into_iter()),
            RangeEnd::Unbounded => Box::new(self.index.range::<[u8], _>((Included(key), Unbounded)).map(pair)),
            RangeEnd::Before(e) if e.as_slice() <= key => Box::new(std::iter::empty()),
            RangeEnd::Before(e) => {
                Box::new(self.index.range::<[u8], _>((Included(key), Excluded(e.as_slice()))).map(pair))
            }
        }
    }

    /// Live key-values in `[key, end)` at the current revision, in key order,
    /// values included.
    pub fn current_kvs(&self, key: &[u8], end: &RangeEnd) -> Result<Vec<KeyValue>> {
        self.current(key, end).map(|(k, m)| self.load(k, m)).collect()
    }

    /// Key-values in `[key, end)` as they were at revision `rev`, in key order,
    /// read from history. `rev` must be at or above the compacted revision.
    pub fn at_revision(&self, key: &[u8], end: &RangeEnd, rev: i64) -> Result<Vec<KeyValue>> {
        use std::ops::Bound::{Excluded, Included};
        let start = keys::hist_prefix(key);
        let files = self.files();
        let values = &files.values;
        let to = match end {
            RangeEnd::Single => keys::hist_prefix_end(key),
            RangeEnd::Unbounded => vec![keys::HIST + 1],
            RangeEnd::Before(e) if e.as_slice() <= key => return Ok(Vec::new()),
            RangeEnd::Before(e) => keys::hist_prefix(e),
        };
        let iter = files.history().range(Included(start), Excluded(to)).map(|v| v.map(|v| (v.rec, v.stored)));
        let mut out = Vec::new();
        // The version each key had at `rev`; its value is read only once
        // it is known to be the one.
        let mut candidate: Option<Stored> = None;
        let mut current_key: Option<Vec<u8>> = None;
        for item in iter {
            let (rec, value) = item?;
            let (k, r) = keys::parse_hist_key(&rec).ok_or_else(|| StoreError::corrupt("history record key"))?;
            if current_key.as_deref() != Some(k.as_slice()) {
                if let Some(stored) = candidate.take() {
                    out.push(stored.load(values)?);
                }
                current_key = Some(k);
            }
            if r <= rev {
                let stored = Stored::decode(&value)?;
                candidate = if stored.kv.version == 0 { None } else { Some(stored) };
            }
        }
        if let Some(stored) = candidate {
            out.push(stored.load(values)?);
        }
        Ok(out)
    }

    /// Starts a write at the next revision. Its changes show in reads through
    /// the writer at once; the returned batch must be committed to sled.
    pub fn write(&mut self) -> Writer<'_> {
        let rev = self.revision + 1;
        Writer { store: self, batch: Batch::default(), rev, sub: 0, events: Vec::new() }
    }
}

fn event_rev(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// The revision `tree` records, once the records of a commit cut short
/// after it are removed; and how many were.
fn revision_after_cut_short(tree: &sled::Tree) -> Result<(i64, usize)> {
    let revision = read_meta_i64(tree, "revision")?.unwrap_or(INITIAL_REVISION);
    let cut_short = packs::remove_after(tree, revision)? + changes::remove_after(tree, revision)?;
    if cut_short > 0 {
        tracing::info!(records = cut_short, revision, "removed the records of a commit cut short");
    }
    Ok((revision, cut_short))
}

fn read_meta_i64(tree: &sled::Tree, name: &str) -> Result<Option<i64>> {
    match tree.get(keys::meta_key(name))? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 8] =
                v.as_ref().try_into().map_err(|_| StoreError::corrupt(format!("metadata record {name}")))?;
            Ok(Some(i64::from_be_bytes(bytes)))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

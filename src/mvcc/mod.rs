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
pub mod keys;
pub mod ops;
pub mod txn;

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;

use crate::error::{Error, Result};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
pub use batch::Batch;
use keys::RangeEnd;

/// The revision of a store that has never been written, as in etcd.
pub const INITIAL_REVISION: i64 = 1;

/// A granted lease as the store knows it. When it expires is not part of the
/// replicated state: the leader alone decides that, and revokes it through Raft.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    /// The TTL it was granted with, in seconds.
    pub ttl: i64,
    /// The live keys attached to it.
    pub keys: BTreeSet<Vec<u8>>,
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

/// An MVCC key-value store kept in one sled tree.
pub struct MvccStore {
    tree: sled::Tree,
    /// Newest version of every live key.
    index: BTreeMap<Vec<u8>, Meta>,
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
}

/// Ids of passes of physical compaction, unique in the process, so that a
/// step of a pass that was given up (a newer compaction, or a snapshot that
/// replaced the store) is told apart.
static PASSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One step of physical compaction to do: reads at most a given number of
/// records from `from` on and removes what no read at or after `rev` can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionStep {
    /// The pass the step belongs to.
    pub pass: u64,
    /// The compacted revision.
    pub rev: i64,
    /// The record key it starts at.
    pub from: Vec<u8>,
}

impl CompactionStep {
    /// Where a pass starts: the first history record.
    pub const FIRST: &'static [u8] = &[keys::HIST];

    /// The removals of this step, at most `limit` records read, and the
    /// record key the next step starts at; `None` when the pass is complete.
    /// The last step also records that history is compacted up to `rev`.
    /// Nothing but compaction changes the records it reads, so it may run
    /// while later revisions are applied.
    pub fn run(&self, tree: &sled::Tree, limit: usize) -> Result<(Batch, Option<Vec<u8>>)> {
        let limit = limit.max(1);
        let mut batch = Batch::default();
        let mut read = 0;
        let mut from = self.from.clone();
        if from.first() == Some(&keys::HIST) {
            match compact_history(tree, self.rev, &from, limit, &mut batch)? {
                (_, Some(next)) => return Ok((batch, Some(next))),
                (n, None) => read = n,
            }
            from = changes::first_run();
        }
        let left = limit.saturating_sub(read).max(1);
        match changes::compact(tree, self.rev, &from, left, &mut batch)? {
            Some(next) => Ok((batch, Some(next))),
            None => {
                batch.insert(keys::meta_key("physical"), self.rev.to_be_bytes());
                Ok((batch, None))
            }
        }
    }
}

/// Adds to `batch` the removal of every version older than `rev` that was
/// replaced or deleted by revision `rev`, reading history records from
/// `from` on, at most `limit` of them. Returns how many it read and the
/// record key to go on from, `None` at the end of history.
fn compact_history(
    tree: &sled::Tree,
    rev: i64,
    from: &[u8],
    limit: usize,
    batch: &mut Batch,
) -> Result<(usize, Option<Vec<u8>>)> {
    // History is sorted by key, then revision: a version older than `rev`
    // goes if the next record is a version of the same key at or before
    // `rev`, or if it is the newest such and a deletion. A step that stops
    // has decided every record before the one it stops at.
    let mut records = tree.range(from.to_vec()..vec![keys::HIST + 1]).map(|item| -> Result<_> {
        let (rec, value) = item?;
        let (key, r) = keys::parse_hist_key(&rec).ok_or_else(|| Error::internal("corrupt history record key"))?;
        Ok((rec, key, r, value))
    });
    let mut older: Option<(sled::IVec, Vec<u8>, sled::IVec)> = None;
    let mut read = 0;
    loop {
        let next = records.next().transpose()?;
        if let Some((old_rec, old_key, old_value)) = older.take() {
            if compacted_away(&old_key, &old_value, next.as_ref().map(|(_, key, r, _)| (key.as_slice(), *r)), rev)? {
                batch.remove(old_rec);
            }
        }
        let Some((rec, key, r, value)) = next else { return Ok((read, None)) };
        if read == limit {
            return Ok((read, Some(rec.to_vec())));
        }
        read += 1;
        if r < rev {
            older = Some((rec, key, value));
        }
    }
}

/// A hash of the history that reads at revisions `compacted` to `rev` can
/// see: every version from `compacted` to `rev`, and each key's newest
/// version before `compacted` unless that is a deletion. That is what stays
/// once compaction at `compacted` has removed what it removes, whether it has
/// yet or not, so members that applied the same entries agree on it. CRC-32
/// over each such history record's key and value, each preceded by its
/// length, in record order; versions after `rev` are left out. History
/// records at or below `rev` must all be committed to `tree`.
pub fn hash_history(tree: &sled::Tree, compacted: i64, rev: i64) -> Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut add = |rec: &[u8], value: &[u8]| {
        for part in [rec, value] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    };
    // The versions before `compacted` that compaction keeps (see
    // `compact_history`), decided once the record after each is read.
    let mut older: Option<(sled::IVec, Vec<u8>, sled::IVec)> = None;
    for item in tree.range(vec![keys::HIST]..vec![keys::HIST + 1]) {
        let (rec, value) = item?;
        let (key, r) = keys::parse_hist_key(&rec).ok_or_else(|| Error::internal("corrupt history record key"))?;
        if let Some((old_rec, old_key, old_value)) = older.take() {
            if !compacted_away(&old_key, &old_value, Some((&key, r)), compacted)? {
                add(&old_rec, &old_value);
            }
        }
        if r < compacted {
            older = Some((rec, key, value));
        } else if r <= rev {
            add(&rec, &value);
        }
    }
    if let Some((old_rec, old_key, old_value)) = older {
        if !compacted_away(&old_key, &old_value, None, compacted)? {
            add(&old_rec, &old_value);
        }
    }
    Ok(hasher.finalize())
}

/// Whether compaction at `rev` removes `value`, a version of `key` older
/// than `rev`, given the history record after it (its key and revision), if
/// any: it does if that is a later version of the same key at or before
/// `rev`, or if the version is a deletion.
fn compacted_away(key: &[u8], value: &[u8], next: Option<(&[u8], i64)>, rev: i64) -> Result<bool> {
    let superseded = next.is_some_and(|(k, r)| k == key && r <= rev);
    Ok(superseded || decode_kv(value)?.version == 0)
}

impl MvccStore {
    /// Opens the store kept in `tree`, rebuilding the in-memory index from
    /// history.
    pub fn open(tree: sled::Tree) -> Result<Self> {
        changes::upgrade(&tree)?;
        let revision = read_meta_i64(&tree, "revision")?.unwrap_or(INITIAL_REVISION);
        let compacted = read_meta_i64(&tree, "compacted")?.unwrap_or(0);
        // An older kvd removed history at once, and wrote no such record.
        let physical = read_meta_i64(&tree, "physical")?.unwrap_or(compacted);
        let mut index = BTreeMap::new();
        let mut last: Option<KeyValue> = None;
        for item in tree.scan_prefix([keys::HIST]) {
            let (_, value) = item?;
            let kv = decode_kv(&value)?;
            if let Some(prev) = last.take() {
                if prev.key != kv.key && prev.version != 0 {
                    index.insert(prev.key.clone(), Meta::of(&prev));
                }
            }
            last = Some(kv);
        }
        if let Some(prev) = last {
            if prev.version != 0 {
                index.insert(prev.key.clone(), Meta::of(&prev));
            }
        }
        let mut leases = BTreeMap::new();
        for item in tree.scan_prefix([keys::LEASE]) {
            let (rec, value) = item?;
            let id: [u8; 8] = rec
                .get(1..)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Error::internal("corrupt lease record key"))?;
            let ttl: [u8; 8] = value.as_ref().try_into().map_err(|_| Error::internal("corrupt lease record"))?;
            leases.insert(i64::from_be_bytes(id), Lease { ttl: i64::from_be_bytes(ttl), keys: BTreeSet::new() });
        }
        for (key, meta) in &index {
            if meta.lease != 0 {
                // A key can only have been attached to a lease that existed,
                // and revoking a lease deletes its keys in the same batch.
                let lease = leases
                    .get_mut(&meta.lease)
                    .ok_or_else(|| Error::internal(format!("key attached to unknown lease {:x}", meta.lease)))?;
                lease.keys.insert(key.clone());
            }
        }
        let mut store = MvccStore {
            tree,
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

    /// Grants lease `id` with `ttl` seconds; false if it already exists.
    pub fn grant_lease(&mut self, id: i64, ttl: i64, batch: &mut Batch) -> bool {
        if self.leases.contains_key(&id) {
            return false;
        }
        self.leases.insert(id, Lease { ttl, keys: BTreeSet::new() });
        batch.insert(keys::lease_key(id), ttl.to_be_bytes());
        true
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
        changes::walk(&self.tree, from, to, |rev, k| {
            if out.len() >= max_events && out.last().map(event_rev) != Some(rev) {
                last = rev - 1;
                return Ok(false);
            }
            if !end.contains(key, k) {
                return Ok(true);
            }
            let kv = match self.tree.get(keys::hist_key(k, rev))? {
                Some(v) => decode_kv(&v)?,
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
        match self.tree.range(from..to).next_back() {
            Some(item) => Ok(Some(decode_kv(&item?.1)?).filter(|p| p.version != 0)),
            None => Ok(None),
        }
    }

    /// The full key-value of a live key whose index entry is `meta`.
    pub fn load(&self, key: &[u8], meta: &Meta) -> Result<KeyValue> {
        let rec = keys::hist_key(key, meta.mod_revision);
        if let Some(kv) = self.pending.get(&rec).or_else(|| self.sending.get(&rec)) {
            return Ok(kv.clone());
        }
        match self.tree.get(&rec)? {
            Some(v) => decode_kv(&v),
            None => Err(Error::internal(format!(
                "the history record of a live key is missing (revision {})",
                meta.mod_revision
            ))),
        }
    }

    /// Adds to `batch` the revision-order record of every change made since
    /// the last call. Every batch of writes committed to the tree needs it:
    /// a watch replays history in this order, and finds no change that a
    /// batch committed without it.
    pub fn seal(&mut self, batch: &mut Batch) {
        self.run.seal(batch);
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
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
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
        let pair = |(k, m): (&'a Vec<u8>, &'a Meta)| (k.as_slice(), m);
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
        let start = keys::hist_prefix(key);
        let iter = match end {
            RangeEnd::Single => self.tree.scan_prefix(&start),
            RangeEnd::Unbounded => self.tree.range(start..vec![keys::HIST + 1]),
            RangeEnd::Before(e) if e.as_slice() <= key => return Ok(Vec::new()),
            RangeEnd::Before(e) => self.tree.range(start..keys::hist_prefix(e)),
        };
        let mut out = Vec::new();
        let mut candidate: Option<KeyValue> = None;
        let mut current_key: Option<Vec<u8>> = None;
        for item in iter {
            let (rec, value) = item?;
            let (k, r) = keys::parse_hist_key(&rec).ok_or_else(|| Error::internal("corrupt history record key"))?;
            if current_key.as_deref() != Some(k.as_slice()) {
                if let Some(kv) = candidate.take() {
                    out.push(kv);
                }
                current_key = Some(k);
            }
            if r <= rev {
                let kv = decode_kv(&value)?;
                candidate = if kv.version == 0 { None } else { Some(kv) };
            }
        }
        if let Some(kv) = candidate {
            out.push(kv);
        }
        Ok(out)
    }

    /// Starts a write at the next revision. Its changes show in reads through
    /// the writer at once; the returned batch must be committed to sled.
    pub fn write(&mut self) -> Writer<'_> {
        let rev = self.revision + 1;
        Writer { store: self, batch: Batch::default(), rev, sub: 0, events: Vec::new() }
    }

    /// Compacts at `rev`: from now on, reads and watches below `rev` are
    /// refused. The history no read at or after `rev` can see (every version
    /// older than `rev` that was replaced or deleted by revision `rev`) is
    /// removed afterwards, in steps ([`MvccStore::compaction_step`]), so
    /// that applying does not wait for it; until then it is left where no
    /// read looks. Versions at `rev` itself are kept whole.
    pub fn compact(&mut self, rev: i64, batch: &mut Batch) -> Result<()> {
        if rev <= self.compacted {
            return Err(Error::Compacted);
        }
        if rev > self.revision {
            return Err(Error::FutureRev);
        }
        self.compacted = rev;
        batch.insert(keys::meta_key("compacted"), rev.to_be_bytes());
        // Written with every compaction, so that its absence means a store
        // of an older kvd (see `open`).
        batch.insert(keys::meta_key("physical"), self.physical.to_be_bytes());
        self.start_pass();
        Ok(())
    }

    fn start_pass(&mut self) {
        self.pass = PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.cursor = CompactionStep::FIRST.to_vec();
    }

    /// The next step of physical compaction, if history below the compacted
    /// revision is not all removed yet. Every write at or below the
    /// compacted revision must be in the tree before the step runs.
    pub fn compaction_step(&self) -> Option<CompactionStep> {
        (self.physical < self.compacted).then(|| CompactionStep {
            pass: self.pass,
            rev: self.compacted,
            from: self.cursor.clone(),
        })
    }

    /// Tells the store that `step` is committed to the tree, and where the
    /// next one starts (`None`: the pass is complete). Returns whether
    /// history is now removed up to the compacted revision. A step of an
    /// earlier pass changes nothing.
    pub fn compaction_stepped(&mut self, step: &CompactionStep, next: Option<Vec<u8>>) -> bool {
        if step.pass != self.pass || self.physical >= self.compacted {
            return false;
        }
        match next {
            Some(next) => {
                self.cursor = next;
                false
            }
            None => {
                self.physical = step.rev;
                true
            }
        }
    }

    /// The revision up to which history is physically removed.
    pub fn physical(&self) -> i64 {
        self.physical
    }
}

/// A write in progress at one revision. Reads through it see its own changes.
pub struct Writer<'a> {
    store: &'a mut MvccStore,
    batch: Batch,
    rev: i64,
    sub: u32,
    events: Vec<Event>,
}

impl Writer<'_> {
    /// The store as this write sees it.
    pub fn store(&self) -> &MvccStore {
        self.store
    }

    /// The revision reads through this write see: the new revision once
    /// something changed, the old one before.
    pub fn view_revision(&self) -> i64 {
        if self.sub > 0 {
            self.rev
        } else {
            self.rev - 1
        }
    }

    /// The revision this write commits at.
    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// Puts `key`; returns the index entry of the previous version. `lease`,
    /// if not 0, must be granted. Its event carries no previous key-value:
    /// a watch that asks for one reads it from history
    /// ([`MvccStore::prev_version`]).
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Option<Meta> {
        let prev = self.store.index.get(key).copied();
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            self.detach(old_lease, key);
            if let Some(l) = self.store.leases.get_mut(&lease) {
                l.keys.insert(key.to_vec());
            }
        }
        let (create_revision, version) = match &prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (self.rev, 1),
        };
        let kv = KeyValue { key: key.to_vec(), create_revision, mod_revision: self.rev, version, value, lease };
        self.store.index.insert(key.to_vec(), Meta::of(&kv));
        self.record(kv.clone());
        self.events.push(Event { r#type: EventType::Put as i32, kv: Some(kv), prev_kv: None });
        prev
    }

    /// Deletes every live key in `[key, end)`; returns how many, and, if
    /// `load` is set, the deleted versions. Like a put's, the events carry
    /// no previous key-value.
    pub fn delete_range(&mut self, key: &[u8], end: &RangeEnd, load: bool) -> Result<(usize, Vec<KeyValue>)> {
        let doomed: Vec<(Vec<u8>, Meta)> = self.store.current(key, end).map(|(k, m)| (k.to_vec(), *m)).collect();
        let loaded = match load {
            true => doomed.iter().map(|(k, m)| self.store.load(k, m)).collect::<Result<Vec<_>>>()?,
            false => Vec::new(),
        };
        self.delete(&doomed);
        Ok((doomed.len(), loaded))
    }

    fn delete(&mut self, doomed: &[(Vec<u8>, Meta)]) {
        for (k, prev) in doomed {
            let tomb = KeyValue { key: k.clone(), mod_revision: self.rev, ..Default::default() };
            self.record(tomb.clone());
            self.detach(prev.lease, k);
            self.store.index.remove(k);
            self.events.push(Event { r#type: EventType::Delete as i32, kv: Some(tomb), prev_kv: None });
        }
    }

    /// Revokes lease `id`: deletes its keys at this revision and forgets it.
    /// Returns false if there is no such lease.
    pub fn revoke_lease(&mut self, id: i64) -> bool {
        let Some(lease) = self.store.leases.get(&id) else { return false };
        let doomed: Vec<(Vec<u8>, Meta)> =
            lease.keys.iter().filter_map(|k| self.store.index.get(k).map(|m| (k.clone(), *m))).collect();
        self.delete(&doomed);
        self.store.leases.remove(&id);
        self.batch.remove(keys::lease_key(id));
        true
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if lease != 0 {
            if let Some(l) = self.store.leases.get_mut(&lease) {
                l.keys.remove(key);
            }
        }
    }

    /// Writes a version to history, and keeps it among the pending ones
    /// until the state machine commits.
    fn record(&mut self, kv: KeyValue) {
        let rec = keys::hist_key(&kv.key, self.rev);
        self.batch.insert(&rec, kv.encode_to_vec());
        self.store.run.push(self.rev, self.sub, &kv.key);
        self.store.pending.insert(rec, kv);
        self.sub += 1;
    }

    /// Finishes the write: returns the sled batch to commit and the events it
    /// produced (empty if nothing changed, and then the revision stays).
    pub fn finish(self) -> (Batch, Vec<Event>) {
        let mut batch = self.batch;
        if self.sub > 0 {
            self.store.revision = self.rev;
            batch.insert(keys::meta_key("revision"), self.rev.to_be_bytes());
        }
        (batch, self.events)
    }
}

fn event_rev(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

fn decode_kv(value: &[u8]) -> Result<KeyValue> {
    KeyValue::decode(value).map_err(|e| Error::internal(format!("corrupt key-value record: {e}")))
}

fn read_meta_i64(tree: &sled::Tree, name: &str) -> Result<Option<i64>> {
    match tree.get(keys::meta_key(name))? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 8] =
                v.as_ref().try_into().map_err(|_| Error::internal(format!("corrupt metadata record {name}")))?;
            Ok(Some(i64::from_be_bytes(bytes)))
        }
    }
}

#[cfg(test)]
mod tests {
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
}

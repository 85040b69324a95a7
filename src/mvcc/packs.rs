//! Packed history: the versions a commit writes, a few records for them all.
//!
//! A history record per version costs a sled insert at a random place in
//! the tree, about a third of a member's CPU per put (docs/performance.md,
//! what one sled record per version costs). So the commit thread packs the
//! history records of each group it commits into pack records, `p` + the
//! revision of the first version in it + a part number, each about
//! [`PACK_BYTES`] long: a pack goes at the end of the tree, and a few
//! thousand puts take a few sled inserts. A version too large for a pack
//! ([`MAX_ENTRY`]) keeps its own history record.
//!
//! A pack lists its versions as entries: the history record's key and the
//! value as a history record would hold it (see [`super::values`]), each
//! preceded by its length (u32, big-endian). Where each packed version is,
//! is held in memory ([`Packs`]), by history record key, as etcd holds an
//! index of every revision it keeps; it is rebuilt from the packs at open.
//! Everything that reads history (reads, watches, compaction, the hash,
//! snapshots, a defragment) reads the two together, by history record key,
//! through [`History`]: what a pack holds reads as the history records it
//! replaced. Snapshot data and backups hold history records, as before;
//! an installed snapshot and a defragmented store hold no pack.
//!
//! Packs never change. Compaction that removes a packed version unpacks its
//! pack in the same sled batch ([`super::compaction`]): the versions of the
//! pack it keeps become history records of their own, and the pack goes.
//! A reader that found a version's place before that and finds no pack
//! there reads the history record instead: the record is written in the
//! batch that removes the pack, and the place forgotten only after it.
//!
//! A group cut short by a crash leaves packs whose first revision is past
//! the store's; they are removed at open ([`remove_after`]).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use super::keys::{hist_rev, parse_rev_key, HIST};
use super::StoreError;
use crate::error::Result;

/// The first byte of a pack's record key.
pub const PACKED: u8 = b'p';

/// A pack closes once its entries reach this many bytes. sled keeps up to
/// sixteen records in a leaf page, and writes a page of more than a
/// quarter of its 512 KiB segment as a file of its own: sixteen packs of
/// this size stay well below that.
pub const PACK_BYTES: usize = 4096;

/// A version whose history record (key and value) is longer than this
/// keeps its record: a pack stays small, and a read of a live value reads
/// little more than the value.
pub const MAX_ENTRY: usize = 1024;

/// The record key of the `part`-th pack of a group whose first packed
/// version is at revision `rev`.
pub fn pack_key(rev: i64, part: u32) -> [u8; 13] {
    super::keys::rev_key(PACKED, rev, part)
}

/// A packed version's history record key as the places hold it: up to 32
/// bytes (a key of up to 21) inside the B-tree's node, where a lookup
/// compares it without following a pointer elsewhere in memory (see
/// [`super::IndexKey`]).
pub type PlaceKey = smallvec::SmallVec<[u8; 32]>;

/// Where a packed version is: its pack, and the entry's offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    rev: i64,
    part: u32,
    at: u32,
}

impl Loc {
    fn pack(&self) -> [u8; 13] {
        pack_key(self.rev, self.part)
    }
}

/// Packs being written: the records and where each version is in them.
#[derive(Debug, Default)]
pub struct Packing {
    /// Finished packs: record key and value.
    pub records: Vec<([u8; 13], Vec<u8>)>,
    /// Each packed version's history record key and place.
    pub places: Vec<(PlaceKey, Loc)>,
    open: Option<(i64, Vec<u8>)>,
}

impl Packing {
    /// Whether a version's history record `rec` with value `stored` goes
    /// in a pack.
    pub fn fits(rec: &[u8], stored: &[u8]) -> bool {
        rec.first() == Some(&HIST) && rec.len() + stored.len() <= MAX_ENTRY && hist_rev(rec).is_some()
    }

    /// Adds a version (one that [`Packing::fits`]); versions come in the
    /// order of their revisions.
    pub fn push(&mut self, rec: &[u8], stored: &[u8]) {
        let rev = hist_rev(rec).unwrap_or_default();
        let part = self.records.len() as u32;
        let (first, buf) = self.open.get_or_insert_with(|| (rev, Vec::with_capacity(PACK_BYTES + MAX_ENTRY)));
        let at = buf.len() as u32;
        for part in [rec, stored] {
            buf.extend_from_slice(&(part.len() as u32).to_be_bytes());
            buf.extend_from_slice(part);
        }
        self.places.push((PlaceKey::from_slice(rec), Loc { rev: *first, part, at }));
        if buf.len() >= PACK_BYTES {
            self.close();
        }
    }

    /// Finishes the open pack, if any.
    pub fn close(&mut self) {
        if let Some((first, buf)) = self.open.take() {
            let part = self.records.len() as u32;
            self.records.push((pack_key(first, part), buf));
        }
    }
}

/// The entry of a pack at `at`: its history record key and value.
fn entry_at(pack: &[u8], at: usize) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let field = |from: usize| -> Option<std::ops::Range<usize>> {
        let len: [u8; 4] = pack.get(from..from.checked_add(4)?)?.try_into().ok()?;
        let start = from + 4;
        let end = start.checked_add(u32::from_be_bytes(len) as usize)?;
        (end <= pack.len()).then_some(start..end)
    };
    let rec = field(at)?;
    let stored = field(rec.end)?;
    Some((rec, stored))
}

/// An entry of a pack: its offset, and where its key and value are.
type Entry = (u32, std::ops::Range<usize>, std::ops::Range<usize>);

/// Each entry of a pack in turn.
fn entries(pack: &[u8]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < pack.len() {
        let (rec, stored) = entry_at(pack, at).ok_or_else(|| StoreError::corrupt("history pack"))?;
        if pack.get(rec.start) != Some(&HIST) || hist_rev(&pack[rec.clone()]).is_none() {
            return Err(StoreError::corrupt("history pack entry").into());
        }
        let offset = u32::try_from(at).map_err(|_| StoreError::corrupt("history pack longer than 4 GiB"))?;
        out.push((offset, rec, stored.clone()));
        at = stored.end;
    }
    Ok(out)
}

/// Packed versions a store keeps at most. Each costs its place in memory:
/// 82–110 bytes for a key of 16 bytes by `tests/index_bytes.rs` (a
/// member's resident memory grew by 40–210 bytes per place in the runs of
/// docs/performance.md), so a million of them take about 100 MB. Past
/// this many, each commit unpacks the oldest packs ([`Packs::over`]):
/// memory stays bounded however long history grows uncompacted, and puts
/// then cost a record per version again.
pub const MAX_PACKED: usize = 1_000_000;

/// Where each packed version of a store is, by history record key.
#[derive(Debug)]
pub struct Packs {
    places: RwLock<BTreeMap<PlaceKey, Loc>>,
    max: usize,
}

impl Default for Packs {
    fn default() -> Packs {
        Packs::with_max(MAX_PACKED)
    }
}

/// How many places a long read of history takes from the index at a time.
const CHUNK: usize = 512;

impl Packs {
    /// Places for at most about `max` packed versions.
    pub fn with_max(max: usize) -> Packs {
        Packs { places: RwLock::default(), max }
    }

    /// How many packed versions a commit that packed `packed` unpacks: those
    /// past the most kept, but no more than twice what it packed and a
    /// thousand, so that no one commit takes long, and history falls back
    /// under the bound.
    pub fn over(&self, packed: usize) -> usize {
        self.len().saturating_sub(self.max).min(2 * packed + 1024)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<PlaceKey, Loc>> {
        self.places.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<PlaceKey, Loc>> {
        self.places.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the places of every packed version in `tree`'s packs.
    pub fn load(&self, tree: &sled::Tree) -> Result<()> {
        let mut places = BTreeMap::new();
        for item in tree.scan_prefix([PACKED]) {
            let (key, pack) = item?;
            let (rev, part) = parse_rev_key(&key).ok_or_else(|| StoreError::corrupt("history pack key"))?;
            for (at, rec, _) in entries(&pack)? {
                places.insert(PlaceKey::from_slice(&pack[rec]), Loc { rev, part, at });
            }
        }
        *self.write() = places;
        Ok(())
    }

    /// Number of packed versions.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no version is packed.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Records the places of versions whose packs are now in the tree.
    pub fn add(&self, places: Vec<(PlaceKey, Loc)>) {
        if places.is_empty() {
            return;
        }
        let mut map = self.write();
        for (rec, loc) in places {
            map.insert(rec, loc);
        }
    }

    /// Forgets the places of versions whose packs are gone from the tree.
    pub fn forget<'a>(&self, recs: impl IntoIterator<Item = &'a [u8]>) {
        let mut map = self.write();
        for rec in recs {
            map.remove(rec);
        }
    }

    fn place(&self, rec: &[u8]) -> Option<Loc> {
        self.read().get(rec).copied()
    }

    /// Up to `n` places from `from` on, below `to`.
    fn chunk(&self, from: Bound<&[u8]>, to: Bound<&[u8]>, n: usize) -> Vec<(PlaceKey, Loc)> {
        self.read().range::<[u8], _>((from, to)).take(n).map(|(k, l)| (k.clone(), *l)).collect()
    }

    fn last_in(&self, from: &[u8], to: &[u8]) -> Option<(PlaceKey, Loc)> {
        self.read()
            .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
            .next_back()
            .map(|(k, l)| (k.clone(), *l))
    }
}

/// The value of the version `rec` in `pack`, where `loc` says it is.
fn value_in(pack: &sled::IVec, rec: &[u8], loc: Loc) -> Result<sled::IVec> {
    match entry_at(pack, loc.at as usize) {
        Some((k, v)) if pack[k.clone()] == *rec => Ok(pack.subslice(v.start, v.len())),
        _ => Err(StoreError::corrupt("history pack: a version is not where its place says").into()),
    }
}

/// A store's history: its history records and its packs, read as one.
#[derive(Clone, Copy)]
pub struct History<'a> {
    /// The tree.
    pub tree: &'a sled::Tree,
    /// The places of the packed versions.
    pub packs: &'a Packs,
}

/// A version read from a pack or a record, with the pack it was read from.
pub struct Version {
    /// The history record key.
    pub rec: sled::IVec,
    /// The value as a history record holds it.
    pub stored: sled::IVec,
    /// The pack's record key, if it came from a pack.
    pub pack: Option<[u8; 13]>,
}

impl<'a> History<'a> {
    /// The value of the history record `rec`, wherever it is kept.
    pub fn get(&self, rec: &[u8]) -> Result<Option<sled::IVec>> {
        // The place first: a version is unpacked into its record before
        // its place is forgotten.
        if let Some(loc) = self.packs.place(rec) {
            if let Some(v) = self.in_pack(rec, loc)? {
                return Ok(Some(v));
            }
        }
        Ok(self.tree.get(rec)?)
    }

    /// The version `rec` at `loc`, unless its pack is gone.
    fn in_pack(&self, rec: &[u8], loc: Loc) -> Result<Option<sled::IVec>> {
        match self.tree.get(loc.pack())? {
            Some(pack) => value_in(&pack, rec, loc).map(Some),
            None => Ok(None),
        }
    }

    /// The last version in `[from, to)`, by history record key.
    pub fn last_in(&self, from: &[u8], to: &[u8]) -> Result<Option<(sled::IVec, sled::IVec)>> {
        let packed = self.packs.last_in(from, to);
        let record = self.tree.range(from..to).next_back().transpose()?;
        match (packed, record) {
            (Some((k, loc)), r) if r.as_ref().is_none_or(|(rk, _)| rk[..] < k[..]) => {
                match self.in_pack(&k, loc)? {
                    Some(v) => Ok(Some((sled::IVec::from(&k[..]), v))),
                    // Unpacked since: its record is in the tree now.
                    None => Ok(self.tree.range(from..to).next_back().transpose()?),
                }
            }
            (_, r) => Ok(r),
        }
    }

    /// Every version from `from` on, below `to`, in history record key
    /// order.
    pub fn range(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> Range<'a> {
        Range {
            history: *self,
            from,
            to,
            packed: Vec::new().into_iter(),
            next_packed: None,
            records: None,
            end: None,
            last: None,
            pack: None,
        }
    }

    /// Every version, in history record key order.
    pub fn all(&self) -> Range<'a> {
        self.range(Bound::Included(vec![HIST]), Bound::Excluded(vec![HIST + 1]))
    }
}

/// Versions of a [`History`] in history record key order. The places are
/// read a chunk at a time, each before the records of the same span: a
/// version unpacked meanwhile is then found in one or the other (or both,
/// and given once).
pub struct Range<'a> {
    history: History<'a>,
    /// Where the next chunk starts.
    from: Bound<Vec<u8>>,
    to: Bound<Vec<u8>>,
    packed: std::vec::IntoIter<(PlaceKey, Loc)>,
    next_packed: Option<(PlaceKey, Loc)>,
    records: Option<std::iter::Peekable<sled::Iter>>,
    /// The end of the chunk being read (inclusive), None once the chunk
    /// reaches `to`.
    end: Option<Vec<u8>>,
    /// The last version given.
    last: Option<sled::IVec>,
    /// The last pack read: versions of keys written together are next to
    /// each other in key order too.
    pack: Option<([u8; 13], sled::IVec)>,
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Range<'_> {
    /// The version `rec` at `loc`, from the last pack read if it is there,
    /// unless its pack is gone. A pack never changes: one read before it
    /// was unpacked still holds the version as it is.
    fn value(&mut self, rec: &[u8], loc: Loc) -> Result<Option<sled::IVec>> {
        let key = loc.pack();
        let pack = match &self.pack {
            Some((k, pack)) if *k == key => pack.clone(),
            _ => match self.history.tree.get(key)? {
                Some(pack) => {
                    self.pack = Some((key, pack.clone()));
                    pack
                }
                None => return Ok(None),
            },
        };
        value_in(&pack, rec, loc).map(Some)
    }

    /// Starts the next chunk; false if the range is done.
    fn next_chunk(&mut self) -> bool {
        if self.records.is_some() {
            // The chunk just read ended at `end`: the next starts after it.
            match self.end.take() {
                Some(end) => self.from = Bound::Excluded(end),
                None => return false,
            }
        }
        let chunk = self.history.packs.chunk(as_ref(&self.from), as_ref(&self.to), CHUNK);
        let end = if chunk.len() == CHUNK { chunk.last().map(|(k, _)| k.to_vec()) } else { None };
        let to = match &end {
            Some(e) => Bound::Included(e.clone()),
            None => self.to.clone(),
        };
        self.records = Some(self.history.tree.range::<Vec<u8>, _>((self.from.clone(), to)).peekable());
        self.end = end;
        self.packed = chunk.into_iter();
        self.next_packed = self.packed.next();
        true
    }

    fn step(&mut self) -> Result<Option<Version>> {
        loop {
            if self.records.is_none() && !self.next_chunk() {
                return Ok(None);
            }
            let Some(records) = self.records.as_mut() else { return Ok(None) };
            let record = match records.peek() {
                Some(Ok((k, _))) => Some(k.clone()),
                Some(Err(_)) => match records.next() {
                    Some(Err(e)) => return Err(e.into()),
                    _ => continue,
                },
                None => None,
            };
            let from_records = match (&self.next_packed, &record) {
                (None, None) => {
                    if !self.next_chunk() {
                        return Ok(None);
                    }
                    continue;
                }
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some((pk, _)), Some(rk)) => {
                    let (same, first) = (rk[..] == pk[..], rk[..] < pk[..]);
                    if same {
                        // Unpacked while read: once is enough.
                        self.next_packed = self.packed.next();
                    }
                    same || first
                }
            };
            if from_records {
                match records.next() {
                    Some(Ok((rec, stored))) => {
                        if self.last.as_ref().is_some_and(|l| rec <= *l) {
                            // Given already, read from its record once its pack was gone.
                            continue;
                        }
                        self.last = Some(rec.clone());
                        return Ok(Some(Version { rec, stored, pack: None }));
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => continue,
                }
            }
            let Some((k, loc)) = self.next_packed.take() else { continue };
            self.next_packed = self.packed.next();
            let rec = sled::IVec::from(&k[..]);
            self.last = Some(rec.clone());
            match self.value(&k, loc)? {
                Some(stored) => return Ok(Some(Version { rec, stored, pack: Some(loc.pack()) })),
                // Unpacked since the place was read: the record is in the
                // tree now, written in the batch that removed the pack,
                // unless compaction removed the version with it (as a
                // record removed under a sled iterator, it is not given).
                None => match self.history.tree.get(&k)? {
                    Some(stored) => return Ok(Some(Version { rec, stored, pack: None })),
                    None => continue,
                },
            }
        }
    }
}

impl Iterator for Range<'_> {
    type Item = Result<Version>;

    fn next(&mut self) -> Option<Result<Version>> {
        self.step().transpose()
    }
}

/// The versions a pack holds: each history record key and value.
pub fn unpack(pack: &sled::IVec) -> Result<Vec<(sled::IVec, sled::IVec)>> {
    Ok(entries(pack)?
        .into_iter()
        .map(|(_, rec, stored)| (pack.subslice(rec.start, rec.len()), pack.subslice(stored.start, stored.len())))
        .collect())
}

/// Adds to `batch` the unpacking of the oldest packs of `tree`, those that
/// hold `versions` versions at least: a record of its own for each
/// version, and the pack's removal. Returns the versions unpacked, whose
/// places are to be forgotten once the batch is in the tree.
pub fn unpack_oldest(tree: &sled::Tree, versions: usize, batch: &mut sled::Batch) -> Result<Vec<sled::IVec>> {
    let mut out = Vec::new();
    for item in tree.scan_prefix([PACKED]) {
        if out.len() >= versions {
            break;
        }
        let (key, pack) = item?;
        for (rec, stored) in unpack(&pack)? {
            batch.insert(rec.clone(), stored);
            out.push(rec);
        }
        batch.remove(key);
    }
    Ok(out)
}

/// Removes the packs of groups after revision `rev` (cut short by a crash);
/// returns how many.
pub fn remove_after(tree: &sled::Tree, rev: i64) -> Result<usize> {
    let mut removed = 0;
    let from = pack_key(rev.saturating_add(1), 0);
    for item in tree.range(from.to_vec()..vec![PACKED + 1]) {
        let (key, _) = item?;
        tree.remove(key)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::ops::Bound::{Excluded, Included};

    use super::*;
    use crate::mvcc::keys::{hist_key, RangeEnd};
    use crate::mvcc::tests::temp_files;
    use crate::mvcc::values::SEPARATE_FROM;
    use crate::mvcc::{hash_history, Batch, Files, MvccStore};

    /// Commits `batch` as the commit thread does, packs and all.
    fn commit_packed(files: &Files, store: &mut MvccStore, mut batch: Batch) {
        store.seal(&mut batch);
        files.commit(batch, 1000).expect("commit");
        store.committed();
    }

    /// Commits `batch` with every version in a history record of its own,
    /// as a kvd before packs did.
    fn commit_plain(files: &Files, store: &mut MvccStore, mut batch: Batch) {
        store.seal(&mut batch);
        crate::mvcc::tests::commit_to(files, batch);
        store.committed();
    }

    /// Two stores given the same 30 groups of writes: the first packed
    /// (at most `max` versions), the second with a record per version.
    /// The directories last as long as the guards.
    struct Twins {
        packed: Files,
        a: MvccStore,
        plain: Files,
        b: MvccStore,
        _dirs: [tempfile::TempDir; 2],
    }

    fn twins(max: usize) -> Twins {
        let ((packed, p), (plain, q)) = (temp_files(), temp_files());
        let packed = Files { packs: std::sync::Arc::new(Packs::with_max(max)), ..packed };
        let mut a = MvccStore::open(packed.clone()).expect("open");
        let mut b = MvccStore::open(plain.clone()).expect("open");
        write_groups(&packed, &mut a, 0..30, true);
        write_groups(&plain, &mut b, 0..30, false);
        Twins { packed, a, plain, b, _dirs: [p, q] }
    }

    /// The store in `files` opened again, as at a start: the places read
    /// from the packs into places of their own, which keep at most `max`.
    fn reopen(files: &Files, max: usize) -> (Files, MvccStore) {
        let files = Files { packs: std::sync::Arc::new(Packs::with_max(max)), ..files.clone() };
        let store = MvccStore::open(files.clone()).expect("reopen");
        (files, store)
    }

    /// A value of `len` bytes that says which write it is.
    fn value(i: usize, len: usize) -> Vec<u8> {
        let mut v = format!("{i:06}").into_bytes();
        v.resize(len.max(6), b'.');
        v
    }

    /// Writes the same groups to `store`: puts of every size (packed, too
    /// large for a pack, kept apart), overwrites, deletions, several
    /// revisions per group.
    fn write_groups(files: &Files, store: &mut MvccStore, groups: std::ops::Range<usize>, packed: bool) {
        for g in groups {
            let mut batch = Batch::default();
            for r in 0..20 {
                let i = g * 20 + r;
                let mut w = store.write();
                let key = format!("k{:03}", (i * 7919) % 300);
                let len = match i % 10 {
                    0 => MAX_ENTRY + 10,
                    1 => SEPARATE_FROM + 3,
                    _ => 8 + i % 50,
                };
                w.put(key.as_bytes(), value(i, len), 0);
                if i % 13 == 0 {
                    // Keys other than the one just put: a revision writes a key once.
                    let (from, end) = (format!("{key}/"), format!("k{:03}", (i * 7919) % 300 + 5));
                    w.delete_range(from.as_bytes(), &RangeEnd::Before(end.into_bytes()), false).expect("delete");
                }
                if i % 17 == 0 {
                    // Two keys at one revision.
                    w.put(format!("t{:02}", i % 40).as_bytes(), value(i, 20), 0);
                }
                batch.append(w.finish().0);
            }
            if packed {
                commit_packed(files, store, batch);
            } else {
                commit_plain(files, store, batch);
            }
        }
    }

    /// Everything a read of history can see of `store`.
    fn reads(files: &Files, store: &MvccStore) -> Vec<String> {
        let all = RangeEnd::Unbounded;
        let mut out = vec![format!("{:?}", store.current_kvs(b"", &all).expect("current"))];
        let from = store.compacted().max(1);
        for rev in (from..=store.revision()).step_by(37) {
            out.push(format!("{rev}: {:?}", store.at_revision(b"", &all, rev).expect("at revision")));
        }
        let (events, _) = store.history_events(b"", &all, from, store.revision(), usize::MAX, true).expect("events");
        out.push(format!("{events:?}"));
        out.push(format!("{}", hash_history(files, store.compacted(), store.revision()).expect("hash")));
        out.push(format!("{}", store.bytes_in_use()));
        out
    }

    /// Checks two lists of reads are the same, saying which differs where.
    fn same(a: Vec<String>, b: Vec<String>) {
        assert_eq!(a.len(), b.len());
        for (n, (x, y)) in a.iter().zip(&b).enumerate() {
            if x != y {
                let at = x.bytes().zip(y.bytes()).take_while(|(p, q)| p == q).count();
                let from = at.saturating_sub(200);
                panic!(
                    "read {n} differs at byte {at}:\n{}\n{}",
                    &x[from..(at + 200).min(x.len())],
                    &y[from..(at + 200).min(y.len())]
                );
            }
        }
    }

    /// Runs a whole pass of physical compaction, in steps of `limit`.
    fn compact(files: &Files, store: &mut MvccStore, rev: i64, limit: usize) {
        let mut batch = Batch::default();
        store.compact(rev, &mut batch).expect("compact");
        commit_plain(files, store, batch);
        while let Some(step) = store.compaction_step() {
            let done = step.run(files, limit).expect("step");
            files.tree.apply_batch(done.batch.into_sled()).expect("apply");
            files.packs.forget(done.unpacked.iter().map(|r| &r[..]));
            store.freed(done.freed);
            store.compaction_stepped(&step, done.next);
        }
    }

    #[test]
    fn a_packed_store_reads_as_one_with_a_record_per_version() {
        let Twins { packed, a, plain, b, _dirs } = twins(MAX_PACKED);
        assert!(packed.packs.len() > 400, "{} versions packed", packed.packs.len());
        assert!(plain.packs.is_empty());
        assert!(packed.tree.len() < plain.tree.len() / 3, "{} records against {}", packed.tree.len(), plain.tree.len());
        same(reads(&packed, &a), reads(&plain, &b));
        // The versions one by one, through a previous version.
        for key in ["k000", "k017", "t05"] {
            let meta = a.get(key.as_bytes()).copied();
            assert_eq!(meta, b.get(key.as_bytes()).copied());
            if let Some(m) = meta {
                assert_eq!(a.load(key.as_bytes(), &m).expect("load"), b.load(key.as_bytes(), &m).expect("load"));
                assert_eq!(
                    a.prev_version(key.as_bytes(), m.mod_revision).expect("prev"),
                    b.prev_version(key.as_bytes(), m.mod_revision).expect("prev")
                );
            }
        }
        // Opened again, the places come from the packs.
        let places = packed.packs.len();
        let (reopened_files, reopened) = reopen(&packed, MAX_PACKED);
        assert_eq!(reopened_files.packs.len(), places);
        same(reads(&reopened_files, &reopened), reads(&plain, &b));
    }

    #[test]
    fn compaction_unpacks_what_it_keeps_and_agrees_with_a_store_without_packs() {
        let Twins { packed, mut a, plain, mut b, _dirs } = twins(MAX_PACKED);
        let before = packed.packs.len();
        let rev = a.revision() - 200;
        // Steps of a few versions: packs unpacked across steps.
        compact(&packed, &mut a, rev, 7);
        compact(&plain, &mut b, rev, 7);
        assert!(packed.packs.len() < before, "{} of {before} versions still packed", packed.packs.len());
        assert!(!packed.packs.is_empty(), "the newest groups keep their packs");
        same(reads(&packed, &a), reads(&plain, &b));
        // Every place left points at a pack that is there, and no version
        // is both packed and a record.
        let history = packed.history();
        for (rec, loc) in packed.packs.read().iter() {
            assert!(packed.tree.get(loc.pack()).expect("get").is_some());
            assert!(packed.tree.get(rec).expect("get").is_none());
            assert!(history.get(rec).expect("get").is_some());
        }
        // More writes, packed again, and a second compaction.
        write_groups(&packed, &mut a, 30..40, true);
        write_groups(&plain, &mut b, 30..40, false);
        let rev = a.revision() - 10;
        compact(&packed, &mut a, rev, 1000);
        compact(&plain, &mut b, rev, 1000);
        same(reads(&packed, &a), reads(&plain, &b));
        let (reopened_files, reopened) = reopen(&packed, MAX_PACKED);
        same(reads(&reopened_files, &reopened), reads(&plain, &b));
    }

    #[test]
    fn the_packs_of_a_group_cut_short_are_removed_at_open() {
        let (files, _dir) = temp_files();
        let mut store = MvccStore::open(files.clone()).expect("open");
        write_groups(&files, &mut store, 0..3, true);
        let (rev, places) = (store.revision(), files.packs.len());
        let mut batch = Batch::default();
        for i in 0..500 {
            let mut w = store.write();
            w.put(format!("n{i:03}").as_bytes(), value(i, 30), 0);
            batch.append(w.finish().0);
        }
        store.seal(&mut batch);
        batch.separate_values(&files.values).expect("values");
        let _ = batch.pack_history();
        let mut chunks = batch.into_sled_chunks(4);
        assert!(chunks.len() > 2, "{} chunks", chunks.len());
        // The last, with the store's revision, never reached the tree.
        chunks.pop();
        for c in chunks {
            files.tree.apply_batch(c).expect("apply");
        }
        assert!(files.tree.scan_prefix([PACKED]).count() > 3);
        let (reopened_files, reopened) = reopen(&files, MAX_PACKED);
        assert_eq!(reopened.revision(), rev);
        assert_eq!(reopened_files.packs.len(), places);
        assert!(reopened.current_kvs(b"n", &RangeEnd::Before(b"o".to_vec())).expect("read").is_empty());
        for (_, loc) in reopened_files.packs.read().iter() {
            assert!(loc.rev <= rev);
        }
    }

    #[test]
    fn past_the_most_packed_versions_the_oldest_are_unpacked() {
        let Twins { packed, a, plain, b, _dirs } = twins(150);
        // A group packs at most 20 versions; the bound holds after each.
        assert!((100..=150).contains(&packed.packs.len()), "{} versions packed", packed.packs.len());
        same(reads(&packed, &a), reads(&plain, &b));
        // The newest groups are the ones still packed.
        let oldest = packed.packs.read().values().map(|l| l.rev).min().expect("packed");
        assert!(oldest > a.revision() - 400, "a pack from revision {oldest} of {}", a.revision());
        let (reopened_files, reopened) = reopen(&packed, 150);
        same(reads(&reopened_files, &reopened), reads(&plain, &b));
    }

    #[test]
    fn a_batch_that_writes_a_version_twice_is_not_packed() {
        let mut batch = Batch::default();
        let kv = |v: &str| crate::proto::mvccpb::KeyValue { key: b"k".to_vec(), value: v.into(), ..Default::default() };
        batch.insert_version(hist_key(b"k", 2), &kv("first"));
        batch.insert_version(hist_key(b"j", 2), &kv("other"));
        batch.insert_version(hist_key(b"k", 2), &kv("second"));
        assert!(batch.pack_history().is_empty());
        assert_eq!(batch.inserts().filter(|(k, _)| k.first() == Some(&PACKED)).count(), 0);
        let mut batch = Batch::default();
        batch.insert_version(hist_key(b"k", 2), &kv("first"));
        batch.insert_version(hist_key(b"j", 2), &kv("other"));
        assert_eq!(batch.pack_history().len(), 2);
        assert_eq!(batch.inserts().count(), 1);
    }

    /// Writes `n` versions of key `i` as records when `i` is odd, in packs
    /// of a few each when it is even; returns every history record key.
    fn mixed_history(files: &Files, n: usize) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        let mut packing = Packing::default();
        let mut batch = sled::Batch::default();
        for i in 0..n {
            let rec = hist_key(format!("x{i:05}").as_bytes(), i as i64 + 1);
            let stored = value(i, 10);
            if i % 2 == 0 {
                packing.push(&rec, &stored);
                if i % 10 == 8 {
                    packing.close();
                }
            } else {
                batch.insert(rec.clone(), stored);
            }
            all.push(rec);
        }
        packing.close();
        for (k, v) in packing.records {
            batch.insert(&k[..], v);
        }
        files.tree.apply_batch(batch).expect("apply");
        files.packs.add(packing.places);
        all
    }

    #[test]
    fn a_range_gives_each_version_once_in_order_while_packs_are_unpacked() {
        let (files, _dir) = temp_files();
        let all = mixed_history(&files, 3 * CHUNK + 101);
        let history = files.history();
        let keys = |r: Range<'_>| -> Vec<Vec<u8>> { r.map(|v| v.expect("read").rec.to_vec()).collect() };
        assert_eq!(keys(history.all()), all);
        // Bounds, inside and across chunks.
        let (from, to) = (all[5].clone(), all[CHUNK * 2 + 3].clone());
        assert_eq!(keys(history.range(Included(from.clone()), Excluded(to.clone()))), all[5..CHUNK * 2 + 3].to_vec());
        assert_eq!(keys(history.range(Excluded(from), Included(to))), all[6..=CHUNK * 2 + 3].to_vec());
        // Half read, then every pack unpacked as compaction does: each
        // version still comes once.
        let mut range = history.all();
        let mut seen: Vec<Vec<u8>> = range.by_ref().take(CHUNK + 40).map(|v| v.expect("read").rec.to_vec()).collect();
        let mut batch = sled::Batch::default();
        let mut gone = Vec::new();
        for item in files.tree.scan_prefix([PACKED]) {
            let (key, pack) = item.expect("pack");
            for (rec, stored) in unpack(&pack).expect("unpack") {
                batch.insert(rec.clone(), stored);
                gone.push(rec);
            }
            batch.remove(key);
        }
        files.tree.apply_batch(batch).expect("apply");
        seen.extend(range.by_ref().take(30).map(|v| v.expect("read").rec.to_vec()));
        files.packs.forget(gone.iter().map(|r| &r[..]));
        seen.extend(range.map(|v| v.expect("read").rec.to_vec()));
        assert_eq!(seen, all);
        assert!(files.packs.is_empty());
        assert_eq!(keys(files.history().all()), all);
        // Packed again, and unpacked under a read as compaction unpacks:
        // the versions it removes are not given, and no error is.
        let (files, _dir) = temp_files();
        let all = mixed_history(&files, 3 * CHUNK + 101);
        let mut range = files.history().all();
        let mut seen: Vec<Vec<u8>> = range.by_ref().take(40).map(|v| v.expect("read").rec.to_vec()).collect();
        let mut batch = sled::Batch::default();
        let mut removed = std::collections::BTreeSet::new();
        for item in files.tree.scan_prefix([PACKED]) {
            let (key, pack) = item.expect("pack");
            for (n, (rec, stored)) in unpack(&pack).expect("unpack").into_iter().enumerate() {
                if n % 2 == 0 {
                    batch.insert(rec, stored);
                } else {
                    removed.insert(rec.to_vec());
                }
            }
            batch.remove(key);
        }
        files.tree.apply_batch(batch).expect("apply");
        seen.extend(range.map(|v| v.expect("read while packs go").rec.to_vec()));
        // In order, each once, every version kept among them; a removed
        // one only if read before it went (from a pack already read).
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        assert!(seen.iter().all(|r| all.contains(r)));
        assert!(all.iter().filter(|r| !removed.contains(*r)).all(|r| seen.contains(r)));
        assert!(seen.len() < all.len(), "{} of {} given", seen.len(), all.len());
    }

    #[test]
    fn a_version_is_read_from_its_record_once_its_pack_is_gone() {
        let (files, _dir) = temp_files();
        let all = mixed_history(&files, 40);
        let history = files.history();
        let (packed_rec, packed_place) = {
            let places = files.packs.read();
            let (k, l) = places.iter().next().expect("a packed version");
            (k.to_vec(), *l)
        };
        let stored = history.get(&packed_rec).expect("get").expect("packed version");
        assert_eq!(&stored[..], &value(0, 10)[..]);
        let last = history.last_in(&all[0], &all[3]).expect("last").expect("a version");
        assert_eq!(&last.0[..], &all[2][..]);
        // Unpacked, its place not yet forgotten.
        let pack = files.tree.get(packed_place.pack()).expect("get").expect("pack");
        let mut batch = sled::Batch::default();
        for (rec, stored) in unpack(&pack).expect("unpack") {
            batch.insert(rec, stored);
        }
        batch.remove(&packed_place.pack()[..]);
        files.tree.apply_batch(batch).expect("apply");
        assert_eq!(history.get(&packed_rec).expect("get").as_deref(), Some(&stored[..]));
        let last = history.last_in(&all[0], &all[1]).expect("last").expect("a version");
        assert_eq!(&last.0[..], &all[0][..]);
        // A damaged pack is an error, not a wrong value.
        let mut damaged = files.tree.scan_prefix([PACKED]).next().expect("a pack").expect("read").1.to_vec();
        damaged.truncate(5);
        let key = files.tree.scan_prefix([PACKED]).next().expect("a pack").expect("read").0;
        files.tree.insert(&key, damaged).expect("insert");
        assert!(Packs::default().load(&files.tree).is_err());
    }
}

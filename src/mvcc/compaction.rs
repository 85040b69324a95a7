//! Compaction: from a compacted revision on, reads below it are refused, and
//! the history no read can see any more is removed afterwards in steps, so
//! that applying never waits for a whole pass.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::packs::{unpack, History, Version};
use super::values::{record_bytes, Stored};
use super::StoreError;
use super::{changes, keys, Batch, Files, MvccStore};
use crate::error::{Error, Result};

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
    pub fn run(&self, files: &Files, limit: usize) -> Result<StepDone> {
        let limit = limit.max(1);
        let mut done = StepDone::default();
        let mut read = 0;
        let mut from = self.from.clone();
        if from.first() == Some(&keys::HIST) {
            match compact_history(files.history(), self.rev, &from, limit, &mut done)? {
                (_, Some(next)) => {
                    done.next = Some(next);
                    return Ok(done);
                }
                (n, None) => read = n,
            }
            from = changes::first_run();
        }
        let left = limit.saturating_sub(read).max(1);
        done.next = changes::compact(&files.tree, self.rev, &from, left, &mut done.batch, &mut done.freed)?;
        if done.next.is_none() {
            done.batch.insert(keys::meta_key("physical"), self.rev.to_be_bytes());
        }
        Ok(done)
    }
}

/// What one step of physical compaction does.
#[derive(Debug, Default)]
pub struct StepDone {
    /// The removals, to be applied to the tree.
    pub batch: Batch,
    /// Where the next step starts; `None` when the pass is complete.
    pub next: Option<Vec<u8>>,
    /// Bytes of the records it removes (see [`MvccStore::bytes_in_use`]).
    pub freed: u64,
    /// The versions of the packs it unpacks, whose places are to be
    /// forgotten ([`super::packs::Packs::forget`]) once the batch is in
    /// the tree.
    pub unpacked: Vec<sled::IVec>,
}

/// A pack's versions (history record key and value), and which of them go.
type Unpacked = (Vec<(sled::IVec, sled::IVec)>, BTreeSet<sled::IVec>);

/// Packs a step unpacks, by record key.
#[derive(Default)]
struct Unpacking {
    packs: BTreeMap<[u8; 13], Unpacked>,
    /// Versions in those packs.
    versions: usize,
}

impl Unpacking {
    /// Marks `rec`, read from `pack`, as removed.
    fn remove(&mut self, tree: &sled::Tree, pack: [u8; 13], rec: sled::IVec) -> Result<()> {
        if !self.packs.contains_key(&pack) {
            // Only compaction removes a pack, one step at a time.
            let value = tree.get(pack)?.ok_or_else(|| StoreError::inconsistent("a pack being compacted is gone"))?;
            let versions = unpack(&value)?;
            self.versions += versions.len();
            self.packs.insert(pack, (versions, BTreeSet::new()));
        }
        if let Some((_, gone)) = self.packs.get_mut(&pack) {
            gone.insert(rec);
        }
        Ok(())
    }

    /// Adds to `done` the removal of each pack, and a record of its own for
    /// each of its versions that stays.
    fn finish(self, done: &mut StepDone) {
        for (key, (versions, gone)) in self.packs {
            for (rec, stored) in versions {
                if !gone.contains(&rec) {
                    done.batch.insert(&rec, &stored);
                }
                done.unpacked.push(rec);
            }
            done.batch.remove(key);
        }
    }
}

/// Adds to `batch` the removal of every version at or below `rev` that was
/// replaced or deleted by revision `rev`, reading history from `from` on,
/// at most `limit` versions, those of the packs it unpacks included (see
/// [`super::packs`]). Returns how many it read and the record key to go on
/// from, `None` at the end of history.
fn compact_history(
    history: History<'_>,
    rev: i64,
    from: &[u8],
    limit: usize,
    done: &mut StepDone,
) -> Result<(usize, Option<Vec<u8>>)> {
    // History is sorted by key, then revision: a version at or below `rev`
    // goes if the next record is a version of the same key at or before
    // `rev`, or if it is the newest such and a deletion (a deletion at
    // `rev` itself included, as etcd removes it: its event is still
    // replayed from the run at `rev`, see `MvccStore::history_events`). A
    // step that stops has decided every record before the one it stops at.
    let mut records =
        history.range(Bound::Included(from.to_vec()), Bound::Excluded(vec![keys::HIST + 1])).map(|item| -> Result<_> {
            let version = item?;
            let (key, r) =
                keys::parse_hist_key(&version.rec).ok_or_else(|| StoreError::corrupt("history record key"))?;
            Ok((version, key, r))
        });
    let mut older: Option<(Version, Vec<u8>)> = None;
    let mut unpacking = Unpacking::default();
    let mut read = 0;
    loop {
        let next = records.next().transpose()?;
        if let Some((old, old_key)) = older.take() {
            if compacted_away(&old_key, &old.stored, next.as_ref().map(|(_, key, r)| (key.as_slice(), *r)), rev)? {
                done.freed += record_bytes(&old.rec, &old.stored)?;
                match old.pack {
                    Some(pack) => unpacking.remove(history.tree, pack, old.rec)?,
                    None => done.batch.remove(old.rec),
                }
            }
        }
        let Some((version, key, r)) = next else {
            unpacking.finish(done);
            return Ok((read, None));
        };
        if read + unpacking.versions >= limit {
            unpacking.finish(done);
            return Ok((read, Some(version.rec.to_vec())));
        }
        read += 1;
        if r <= rev {
            older = Some((version, key));
        }
    }
}

/// Whether compaction at `rev` removes `value`, a version of `key` at or
/// below `rev`, given the history record after it (its key and revision),
/// if any: it does if that is a later version of the same key at or before
/// `rev`, or if the version is a deletion.
pub(super) fn compacted_away(key: &[u8], value: &[u8], next: Option<(&[u8], i64)>, rev: i64) -> Result<bool> {
    let superseded = next.is_some_and(|(k, r)| k == key && r <= rev);
    Ok(superseded || Stored::decode(value)?.kv.version == 0)
}

impl MvccStore {
    /// Compacts at `rev`: from now on, reads and watches below `rev` are
    /// refused. The history no read at or after `rev` can see (every version
    /// at or below `rev` that was replaced or deleted by revision `rev`,
    /// the deletions at `rev` itself included) is removed afterwards, in
    /// steps ([`MvccStore::compaction_step`]), so that applying does not
    /// wait for it; until then it is left where no read looks. The
    /// revision-order run at `rev` stays, so a watch from `rev` still
    /// replays every event at `rev`.
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

    pub(super) fn start_pass(&mut self) {
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

//! Revision order: which key each change of each revision wrote.
//!
//! History records are sorted by key, so a watch that replays history needs a
//! second order to walk revisions in. Changes are recorded in runs: one record
//! per group of writes the state machine commits to sled together (or per
//! [`RUN_BYTES`] of it), not one per change. A sled insert costs about as much as a put's history record, and a
//! record per change took a seventh of each member's CPU under load.
//!
//! A run's record key is `s` + the revision and sub-index of its first change;
//! its value lists each change as the revision (8 bytes), the key's length
//! (4 bytes) and the key. Runs never overlap, so the run that holds a change
//! is the last one that starts at or before it. A run is cut at about
//! [`RUN_BYTES`], so one revision's changes may span several runs: sled copies
//! a large record whole each time it rewrites the node that holds it, and a
//! deletion of 270,000 keys in one revision made one run of 7.6 MB that the
//! database held six copies of after a defragment.

use super::batch::Batch;
use super::StoreError;
use crate::error::Result;

/// Prefix of run records.
pub const RUNS: u8 = b's';
/// Prefix of the record per change that kvd kept before runs: `r` + revision
/// + sub-index, the key as value. [`upgrade`] turns them into runs.
pub(crate) const OLD_CHANGES: u8 = b'r';
/// Most changes in one run that [`upgrade`] writes.
const UPGRADE_RUN: usize = 1024;
/// A run is cut once its changes take this many bytes, as history packs are
/// (see [`super::packs`]): a sled node of up to 17 such records stays under
/// the 128 KiB past which sled writes a node to a file of its own, and a
/// group of up to about 140 small writes is still one record.
pub const RUN_BYTES: usize = 4 << 10;

/// The record key of the run whose first change is the `sub`-th of `rev`.
fn run_key(rev: i64, sub: u32) -> [u8; 13] {
    super::keys::rev_key(RUNS, rev, sub)
}

/// Changes made since the last run was sealed.
#[derive(Debug, Default)]
pub struct Run {
    first: Option<(i64, u32)>,
    encoded: Vec<u8>,
    /// Runs already cut at [`RUN_BYTES`]: record key and value.
    cut: Vec<([u8; 13], Vec<u8>)>,
}

impl Run {
    /// Records that the `sub`-th change of `rev` wrote `key`.
    pub fn push(&mut self, rev: i64, sub: u32, key: &[u8]) {
        self.first.get_or_insert((rev, sub));
        self.encoded.extend_from_slice(&(rev as u64).to_be_bytes());
        self.encoded.extend_from_slice(&(key.len() as u32).to_be_bytes());
        self.encoded.extend_from_slice(key);
        if self.encoded.len() >= RUN_BYTES {
            self.cut_here();
        }
    }

    /// Ends the open run, if it holds any change: the next change starts
    /// another.
    fn cut_here(&mut self) {
        if let Some((rev, sub)) = self.first.take() {
            self.cut.push((run_key(rev, sub), std::mem::take(&mut self.encoded)));
        }
    }

    /// Adds the records of the runs made since the last call to `batch`, and
    /// starts a new run. Returns their bytes.
    pub fn seal(&mut self, batch: &mut Batch) -> u64 {
        self.cut_here();
        let mut bytes = 0;
        for (key, value) in self.cut.drain(..) {
            bytes += (key.len() + value.len()) as u64;
            batch.insert(key, value);
        }
        bytes
    }
}

/// The changes a run record lists, in order: revision and key.
fn parse(mut value: &[u8]) -> Result<Vec<(i64, &[u8])>> {
    let corrupt = || StoreError::corrupt("revision-order record");
    let mut out = Vec::new();
    while !value.is_empty() {
        let rev: [u8; 8] = value.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(corrupt)?;
        let len: [u8; 4] = value.get(8..12).and_then(|b| b.try_into().ok()).ok_or_else(corrupt)?;
        let end = 12usize.checked_add(u32::from_be_bytes(len) as usize).ok_or_else(corrupt)?;
        let key = value.get(12..end).ok_or_else(corrupt)?;
        out.push((u64::from_be_bytes(rev) as i64, key));
        value = &value[end..];
    }
    Ok(out)
}

/// Calls `f` with the revision and key of every change of revisions
/// `from..=to`, in revision order, until it returns false.
pub fn walk(tree: &sled::Tree, from: i64, to: i64, mut f: impl FnMut(i64, &[u8]) -> Result<bool>) -> Result<()> {
    // Revisions start at 1; the keys below sort as unsigned numbers.
    let from = from.max(0);
    if from > to {
        return Ok(());
    }
    let end = run_key(to.saturating_add(1), 0);
    // The run that holds the first change of `from` may start before it;
    // later runs may start within `from` too.
    let start = match tree.range(run_key(0, 0)..=run_key(from, 0)).next_back() {
        Some(item) => item?.0.to_vec(),
        None => run_key(from, 0).to_vec(),
    };
    for item in tree.range(start..end.to_vec()) {
        let (_, value) = item?;
        for (rev, key) in parse(&value)? {
            if rev > to {
                return Ok(());
            }
            if rev >= from && !f(rev, key)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Removes what a group of writes cut short by a crash left: every run of
/// changes after revision `rev` (the store's recorded revision), and the
/// history record of each change it lists (see
/// [`super::Batch::into_sled_chunks`]). Returns how many records it removed.
pub fn remove_after(tree: &sled::Tree, rev: i64) -> Result<usize> {
    let mut removed = 0;
    each_run_after(tree, rev, |run, _, changes| {
        // In small batches (sled's memory grows with a batch), the run
        // last: a start cut short again finds what is left.
        for changes in changes.chunks(1024) {
            let mut batch = sled::Batch::default();
            for (r, key) in changes {
                batch.remove(super::keys::hist_key(key, *r));
                removed += 1;
            }
            tree.apply_batch(batch)?;
        }
        tree.remove(run)?;
        removed += 1;
        Ok(())
    })?;
    Ok(removed)
}

/// Calls `f` with each run of changes after revision `rev`, in order: its
/// record key and value, and the revision and key of each change it lists.
/// Runs never span two groups, so after `rev`, the last revision of a group,
/// these are exactly the groups committed since.
pub fn each_run_after(
    tree: &sled::Tree,
    rev: i64,
    mut f: impl FnMut(&[u8], &[u8], &[(i64, &[u8])]) -> Result<()>,
) -> Result<()> {
    let from = run_key(rev.saturating_add(1), 0);
    for item in tree.range(from.to_vec()..vec![RUNS + 1]) {
        let (run, value) = item?;
        f(&run, &value, &parse(&value)?)?;
    }
    Ok(())
}

/// Where compaction of runs begins.
pub fn first_run() -> Vec<u8> {
    run_key(0, 0).to_vec()
}

/// Adds to `batch` the removal of each run whose every change is older than
/// `rev`, reading runs from the record key `from` on, at most `limit` of
/// them. Returns the record key to go on from, or `None` once no run that
/// starts below `rev` is left.
pub fn compact(
    tree: &sled::Tree,
    rev: i64,
    from: &[u8],
    limit: usize,
    batch: &mut Batch,
    freed: &mut u64,
) -> Result<Option<Vec<u8>>> {
    for (read, item) in tree.range(from.to_vec()..run_key(rev, 0).to_vec()).enumerate() {
        let (rec, value) = item?;
        if read == limit {
            return Ok(Some(rec.to_vec()));
        }
        if parse(&value)?.last().is_none_or(|(last, _)| *last < rev) {
            *freed += (rec.len() + value.len()) as u64;
            batch.remove(rec);
        }
    }
    Ok(None)
}

/// Turns the per-change records of an older kvd into runs, in one sled
/// batch. Does nothing if there are none.
pub fn upgrade(tree: &sled::Tree) -> Result<()> {
    let mut batch = Batch::default();
    let mut run = Run::default();
    let mut in_run = 0;
    for item in tree.scan_prefix([OLD_CHANGES]) {
        let (rec, key) = item?;
        let (rev, sub) = super::keys::parse_rev_key(&rec).ok_or_else(|| StoreError::corrupt("revision record key"))?;
        run.push(rev, sub, &key);
        batch.remove(rec);
        in_run += 1;
        if in_run == UPGRADE_RUN {
            run.seal(&mut batch);
            in_run = 0;
        }
    }
    run.seal(&mut batch);
    if !batch.is_empty() {
        tree.apply_batch(batch.into_sled())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> sled::Tree {
        sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree")
    }

    fn changes(tree: &sled::Tree, from: i64, to: i64) -> Vec<(i64, Vec<u8>)> {
        let mut out = Vec::new();
        walk(tree, from, to, |rev, key| {
            out.push((rev, key.to_vec()));
            Ok(true)
        })
        .expect("walk");
        out
    }

    fn commit(tree: &sled::Tree, run: &mut Run) {
        let mut batch = Batch::default();
        run.seal(&mut batch);
        tree.apply_batch(batch.into_sled()).expect("commit");
    }

    #[test]
    fn a_walk_finds_the_changes_of_its_revisions_across_runs() {
        let tree = tree();
        let mut run = Run::default();
        run.push(2, 0, b"a");
        run.push(3, 0, b"b");
        run.push(3, 1, b"");
        commit(&tree, &mut run);
        run.push(4, 0, b"c\0d");
        commit(&tree, &mut run);
        commit(&tree, &mut run); // an empty run writes nothing
        run.push(7, 0, b"e");
        commit(&tree, &mut run);
        assert_eq!(tree.len(), 3);
        assert_eq!(changes(&tree, 3, 4), vec![(3, b"b".to_vec()), (3, vec![]), (4, b"c\0d".to_vec())]);
        assert_eq!(changes(&tree, 5, 7), vec![(7, b"e".to_vec())]);
        assert_eq!(changes(&tree, 1, 2), vec![(2, b"a".to_vec())]);
        assert_eq!(changes(&tree, 8, 9), vec![]);
        assert_eq!(changes(&tree, 4, 3), vec![]);
        assert_eq!(changes(&tree, -5, 2), vec![(2, b"a".to_vec())]);
        // It stops when told to.
        let mut seen = 0;
        walk(&tree, 0, 10, |_, _| {
            seen += 1;
            Ok(seen < 2)
        })
        .expect("walk");
        assert_eq!(seen, 2);
    }

    #[test]
    fn a_revision_of_many_changes_is_cut_into_runs_a_walk_reads_whole() {
        let tree = tree();
        let mut run = Run::default();
        run.push(2, 0, b"before");
        commit(&tree, &mut run);
        // 5,000 keys of 100 bytes deleted in revision 3, and revision 4 in
        // the same group.
        let key = |i: u32| format!("{i:0100}").into_bytes();
        for i in 0..5000 {
            run.push(3, i, &key(i));
        }
        run.push(4, 0, b"after");
        commit(&tree, &mut run);
        let runs: Vec<_> = tree.scan_prefix([RUNS]).map(|r| r.expect("run")).collect();
        assert!(runs.len() >= 5000 * 112 / RUN_BYTES, "{} runs", runs.len());
        assert!(runs.iter().all(|(_, v)| v.len() < RUN_BYTES + 112), "a run past its bound");
        let want: Vec<_> = (0..5000).map(|i| (3, key(i))).chain([(4, b"after".to_vec())]).collect();
        // From the revision, from the one before, and through the runs.
        assert_eq!(changes(&tree, 3, 4), want);
        assert_eq!(changes(&tree, 2, 4)[1..], want[..]);
        assert_eq!(changes(&tree, 4, 9), vec![(4, b"after".to_vec())]);
        assert_eq!(changes(&tree, 3, 3).len(), 5000);
        // Compaction at 4 keeps what reaches 4, and removes the rest.
        let mut batch = Batch::default();
        assert_eq!(compact(&tree, 4, &first_run(), usize::MAX, &mut batch, &mut 0).expect("compact"), None);
        tree.apply_batch(batch.into_sled()).expect("commit");
        assert_eq!(tree.len(), 1);
        assert_eq!(changes(&tree, 4, 4), vec![(4, b"after".to_vec())]);
    }

    #[test]
    fn compaction_keeps_a_run_that_reaches_the_compacted_revision() {
        let tree = tree();
        let mut run = Run::default();
        run.push(2, 0, b"a");
        run.push(3, 0, b"b");
        commit(&tree, &mut run);
        run.push(4, 0, b"c");
        run.push(5, 0, b"d");
        commit(&tree, &mut run);
        // One run per step: the first step stops at the second run.
        let mut batch = Batch::default();
        let next = compact(&tree, 5, &first_run(), 1, &mut batch, &mut 0).expect("compact");
        assert_eq!(next, Some(run_key(4, 0).to_vec()));
        let next = compact(&tree, 5, &next.expect("more"), 1, &mut batch, &mut 0).expect("compact");
        assert_eq!(next, None);
        tree.apply_batch(batch.into_sled()).expect("commit");
        assert_eq!(tree.len(), 1);
        assert_eq!(changes(&tree, 5, 5), vec![(5, b"d".to_vec())]);
    }

    #[test]
    fn records_of_an_older_kvd_become_runs() {
        let tree = tree();
        for (rev, sub, key) in [(2i64, 0u32, &b"a"[..]), (3, 0, b"b"), (3, 1, b"c")] {
            let mut rec = vec![OLD_CHANGES];
            rec.extend_from_slice(&(rev as u64).to_be_bytes());
            rec.extend_from_slice(&sub.to_be_bytes());
            tree.insert(rec, key).expect("insert");
        }
        upgrade(&tree).expect("upgrade");
        assert_eq!(tree.scan_prefix([OLD_CHANGES]).count(), 0);
        assert_eq!(changes(&tree, 0, 9), vec![(2, b"a".to_vec()), (3, b"b".to_vec()), (3, b"c".to_vec())]);
    }

    #[test]
    fn a_corrupt_run_is_an_error_not_a_panic() {
        let tree = tree();
        tree.insert(run_key(2, 0), &[0u8, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 9, b'a'][..]).expect("insert");
        assert!(walk(&tree, 0, 9, |_, _| Ok(true)).is_err());
    }
}

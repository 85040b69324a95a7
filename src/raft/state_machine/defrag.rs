//! Defragment: the live state written into a new sled database, which
//! takes the old one's place while the member goes on serving.
//!
//! sled reuses the space of removed records but never shrinks its files:
//! 60,000 values of 1 KiB took 107 MB, and after 90% of them were removed
//! the files still took 118 MB, where a new database holding the rest took
//! 18 MB. So a defragment copies the state tree into a database in the
//! other directory of [`crate::raft::db_dir`], makes it the one in use, and
//! removes the old. The copy goes beside the commit thread, and only what
//! was committed meanwhile is copied between two groups: when the commit
//! thread made the whole copy, writes gathered behind it until they
//! reached their bound and then waited, and a defragment of 100,000 keys
//! of 1 KiB under puts held one for 816 ms.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::path::Path;

use super::super::committer::CommitError;
use super::super::db_dir::{db_dirs, open_db_at, remove_unused, set_in_use};
use super::records::{each_changeable_record, AsOf, Batches, Part};
use super::view::{Shared, State};
use super::{open_files_in, CURRENT_TREE, INSTALLING, STATE_TREES, VALUES_ID};
use crate::error::Error;
use crate::mvcc::changes;
use crate::mvcc::keys::{hist_key, HIST};
use crate::mvcc::values::load_kv;
use crate::mvcc::Files;

/// What a defragment did: the database's size on disk before and after,
/// in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Defragmented {
    /// Before.
    pub before: u64,
    /// After.
    pub after: u64,
}

/// Asks the other members whether this one may begin a defragment by
/// itself (see [`Shared::on_defragment_turn`]).
pub(super) type Turn = Box<dyn Fn() -> bool + Send + Sync>;

/// A defragment under way, or about to begin, on this member, until
/// dropped: the other members see it when they ask (see
/// [`Shared::defragmenting`]).
pub struct DefragmentClaim(Arc<AtomicUsize>);

impl Drop for DefragmentClaim {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// Marks a defragment under way on this member until the claim is
    /// dropped. A member that means to defragment by itself claims before
    /// it asks the others, so that of two members asking at once each sees
    /// the other's claim.
    pub fn claim_defragment(&self) -> DefragmentClaim {
        self.defragments.fetch_add(1, Ordering::SeqCst);
        DefragmentClaim(self.defragments.clone())
    }

    /// Whether a defragment is under way on this member, or about to begin.
    pub fn defragmenting(&self) -> bool {
        self.defragments.load(Ordering::SeqCst) > 0
    }

    /// Sets how this member learns whether it may begin a defragment by
    /// itself: `turn` answers false while another member has one under way
    /// or about to begin. Every member applies the same compactions, so
    /// the value files of all grow mostly removed at about the same moment;
    /// defragmenting one at a time leaves the others a quorum that is not
    /// copying. It runs on the compaction thread, and may block. Set once;
    /// later calls change nothing.
    pub fn on_defragment_turn(&self, turn: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.defragment_turn.set(Box::new(turn));
    }

    /// Whether this member may begin a defragment by itself now.
    pub(in crate::raft) fn defragment_turn(&self) -> bool {
        self.defragment_turn.get().is_none_or(|turn| turn())
    }

    /// Rewrites the member's database with only what is live, and switches
    /// to it:
    /// - the records outside the state tree (the member's identity and what
    ///   it noted) are copied first, with other such changes held off;
    /// - the state tree is copied as of one revision beside the commit
    ///   thread, as a snapshot is (see [`super::copies`]), while groups go
    ///   on being committed to the old tree: history and revision-order
    ///   records, which never change once written, and each value kept
    ///   apart into the new value file;
    /// - then the commit thread, between two groups, copies what was
    ///   committed since (the groups' revision-order and history records)
    ///   and every record a commit may change, flushes the new database,
    ///   makes it the one in use on disk, and then in memory: the store's
    ///   reads and later groups go to the new tree from that moment;
    /// - the old directory is removed.
    ///
    /// Until the switch, history stays as it is: physical compaction waits,
    /// as for any copy. Applying goes on meanwhile, and writes wait for the
    /// commit thread only during the last step. A member that stops at any
    /// point starts on one whole database (see [`crate::raft::db_dir`]).
    pub async fn defragment(self: &Arc<Self>) -> Result<Defragmented, Error> {
        let shared = self.clone();
        crate::raft::blocking(move || shared.defragment_now()).await
    }

    pub(in crate::raft) fn defragment_now(&self) -> Result<Defragmented, Error> {
        let _claim = self.claim_defragment();
        let _changing = self.changing_db();
        self.defragment_holding_the_db()
    }

    /// Defragments, as [`Shared::defragment_now`], if `still_worth` says so
    /// once no other defragment of this member is under way; `None` if it
    /// did not. A defragment decided while another ran (one an operator
    /// asked for, say) may find its work done by the time it may begin:
    /// at 1,000,000 keys a member's own defragment that followed one asked
    /// for wrote a second database for nothing.
    pub(in crate::raft) fn defragment_if(
        &self,
        still_worth: impl FnOnce(&Self) -> bool,
    ) -> Result<Option<Defragmented>, Error> {
        let _claim = self.claim_defragment();
        let _changing = self.changing_db();
        if !still_worth(self) {
            return Ok(None);
        }
        self.defragment_holding_the_db().map(Some)
    }

    /// The defragment itself; the caller holds [`Shared::changing_db`].
    fn defragment_holding_the_db(&self) -> Result<Defragmented, Error> {
        let before = self.size_on_disk();
        let old = self.db();
        let (in_use, other) = db_dirs(&self.dir)?;
        remove_unused(&self.dir)?;
        let path = self.dir.join(other);
        let new = open_db_at(&path)?;
        // Holds history as it is until the switch.
        let holding = self.copies.begin();
        let began = std::time::Instant::now();
        let copied = copy_outside_state(&old, &new).and_then(|()| self.copy_history_beside(&new, &path));
        let beside = began.elapsed();
        let (to, rev) = match copied {
            Ok(copied) => copied,
            Err(e) => {
                drop(new);
                let _ = remove_unused(&self.dir);
                return Err(e);
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (cell, dir) = (self.db.clone(), self.dir.clone());
        let work = move |files: &Files| {
            let began = std::time::Instant::now();
            let moved = catch_up(files, &to, rev)
                .and_then(|caught_up| {
                    new.insert(CURRENT_TREE, STATE_TREES[0].as_bytes())?;
                    new.flush()?;
                    Ok(caught_up)
                })
                .and_then(|caught_up| match set_in_use(&dir, other) {
                    Ok(()) => Ok((to, caught_up)),
                    Err(e) => {
                        // The rename may have happened before the failure.
                        let _ = set_in_use(&dir, in_use);
                        Err(e)
                    }
                });
            match moved {
                Ok((to, caught_up)) => {
                    *cell.write().unwrap_or_else(|p| p.into_inner()) = new;
                    let _ = tx.send(Ok((caught_up, began.elapsed())));
                    Some(to)
                }
                Err(e) => {
                    drop(new);
                    let _ = tx.send(Err(e));
                    None
                }
            }
        };
        let queued = {
            // No other copy may read the old tree past the switch.
            let mut state = self.write_without_other_copies(1);
            let State { store, unflushed, .. } = &mut *state;
            unflushed.commit(store, &self.committer).and_then(|()| self.committer.run_then_move(work))
        };
        let moved = queued.and_then(|()| {
            rx.recv().map_err(|_| Error::from(CommitError::Gone("during a defragment"))).and_then(|r| r)
        });
        // The commit thread lets go of the old tree, or the new database,
        // when the job ends.
        let idle = self.committer.wait_idle();
        drop(holding);
        let (caught_up, switch) = match moved {
            Ok(done) => done,
            Err(e) => {
                if matches!(db_dirs(&self.dir), Ok((dir, _)) if dir == in_use) {
                    let _ = std::fs::remove_dir_all(&path);
                }
                return Err(e);
            }
        };
        idle?;
        drop(old);
        if let Err(e) = remove_unused(&self.dir) {
            // Removed at the next start, or by the next defragment.
            tracing::warn!(error = %e, "the database replaced by a defragment is still on disk");
        }
        let after = self.size_on_disk();
        // `switch_ms`: how long the switch held the commit thread (writes
        // gather meanwhile, and wait only past their bound).
        tracing::info!(
            before,
            after,
            copied_beside_ms = beside.as_millis() as u64,
            caught_up,
            switch_ms = switch.as_millis() as u64,
            "defragmented"
        );
        Ok(Defragmented { before, after })
    }

    /// Copies the history and revision-order records of the state tree as
    /// of the last applied write into the state tree of `new`, whose
    /// directory is `new_dir`, beside the commit thread, and flushes `new`.
    /// Returns the new tree and the revision copied up to.
    fn copy_history_beside(&self, new: &sled::Db, new_dir: &Path) -> Result<(Files, i64), Error> {
        let to = open_files_in(new, new_dir, STATE_TREES[0])?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let copy = {
            let to = to.clone();
            let new = new.clone();
            move |files: &Files, as_of: &AsOf| {
                copy_history(files, as_of, &to)?;
                new.flush()?;
                Ok(as_of.rev())
            }
        };
        {
            let mut state = self.write();
            let State { store, unflushed, .. } = &mut *state;
            let (rev, copying) = (store.revision(), self.copies.begin());
            unflushed.commit(store, &self.committer)?;
            self.committer.run(move |files| copying.copy_as_of(files, rev, Part::History, tx, copy))?;
        }
        let rev = rx.blocking_recv().map_err(|_| Error::from(CommitError::Gone("before the copy")))??;
        Ok((to, rev))
    }
}

/// Copies the records of `old` outside the state trees into `new`.
fn copy_outside_state(old: &sled::Db, new: &sled::Db) -> Result<(), Error> {
    for item in old.iter() {
        let (k, v) = item?;
        if k.as_ref() != CURRENT_TREE && k.as_ref() != INSTALLING && !k.starts_with(VALUES_ID) {
            new.insert(k, v)?;
        }
    }
    Ok(())
}

/// Copies the history and revision-order records of `files` as of `as_of`,
/// a [`Part::History`], into `to`; the records a commit may change are
/// taken at the switch, as they are then (see [`catch_up`]).
fn copy_history(files: &Files, as_of: &AsOf, to: &Files) -> Result<(), Error> {
    let mut batch = Batches::new(to)?;
    as_of.for_each(files, |k, v| insert(&mut batch, files, k, v))?;
    batch.finish()
}

/// Inserts the record `k`, `v` of `files` into `batch`: a history record
/// with its value, wherever `files` keeps it.
fn insert(batch: &mut Batches<'_>, files: &Files, k: &[u8], v: &[u8]) -> Result<(), Error> {
    match k.first() {
        Some(&HIST) => batch.insert_version(k, &load_kv(v, &files.values)?),
        _ => batch.insert(k, v),
    }
}

/// Brings `to`, a copy of the history of `files` up to `rev` (see
/// [`Shared::copy_history_beside`]), up to date: the groups committed
/// since, their revision-order and history records, and every record a
/// commit may change, as they are now. On the commit thread, between two
/// groups; what compaction removes waits meanwhile, so nothing copied has
/// gone since.
fn catch_up(files: &Files, to: &Files, rev: i64) -> Result<u64, Error> {
    let mut batch = Batches::new(to)?;
    let mut records = 0u64;
    changes::each_run_after(&files.tree, rev, |run, value, changes| {
        records += 1 + changes.len() as u64;
        for (r, key) in changes {
            let k = hist_key(key, *r);
            let v = files.history().get(&k)?.ok_or_else(|| {
                Error::internal(format!("the history record of revision {r} that a run lists is missing"))
            })?;
            insert(&mut batch, files, &k, &v)?;
        }
        batch.insert(run, value)
    })?;
    each_changeable_record(&files.tree, |k, v| {
        records += 1;
        batch.insert(&k, &v)
    })?;
    batch.finish().map(|()| records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::keys::meta_key;
    use crate::mvcc::values::{ValueLog, SEPARATE_FROM};
    use crate::mvcc::{Batch, MvccStore};
    use prost::Message;

    fn files_in(dir: &Path) -> Files {
        std::fs::create_dir_all(dir).expect("dir");
        let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
        let values = ValueLog::create(&dir.join("values"), 1).expect("value file");
        Files::new(tree, Arc::new(values))
    }

    /// Every record, a history record with its value wherever it is kept,
    /// and history as history records whether packed or not.
    fn records(files: &Files) -> Vec<(Vec<u8>, Vec<u8>)> {
        let whole = |k: &[u8], v: &[u8]| match k.first() {
            Some(&HIST) => load_kv(v, &files.values).expect("value").encode_to_vec(),
            _ => v.to_vec(),
        };
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = files
            .tree
            .iter()
            .map(|item| item.expect("read"))
            .filter(|(k, _)| k.first() != Some(&HIST) && k.first() != Some(&crate::mvcc::packs::PACKED))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        out.extend(files.history().all().map(|v| v.expect("read")).map(|v| (v.rec.to_vec(), whole(&v.rec, &v.stored))));
        out.sort();
        out
    }

    #[test]
    fn a_copy_of_history_caught_up_at_the_switch_holds_what_was_committed_since() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (from, to) = (files_in(&dir.path().join("a")), files_in(&dir.path().join("b")));
        let mut store = MvccStore::open(from.clone()).expect("open");
        let commit = |store: &mut MvccStore, mut batch: Batch| {
            store.seal(&mut batch);
            crate::raft::committer::commit_to(&from, batch).expect("commit");
            store.committed();
        };
        let put = |store: &mut MvccStore, key: String, len: usize| {
            let mut w = store.write();
            w.put(key.as_bytes(), vec![key.len() as u8; len], 0);
            let batch = w.finish().0;
            commit(store, batch);
        };
        let mut batch = Batch::default();
        assert!(store.grant_lease(7, 60, &mut batch));
        commit(&mut store, batch);
        from.tree.insert(meta_key("removed-later"), &b"x"[..]).expect("insert");
        for i in 0..100 {
            put(&mut store, format!("k{i:03}"), if i % 2 == 0 { 10 } else { SEPARATE_FROM });
        }
        // The copy beside the commit thread.
        let copies = super::super::copies::Copies::default();
        let as_of = AsOf::take(&from.tree, store.revision(), Part::History, &copies.begin()).expect("take");
        copy_history(&from, &as_of, &to).expect("copy");
        // Committed meanwhile: new keys and versions, a delete, a lease
        // revoked with its key, a record a commit may change removed.
        for i in 50..150 {
            put(&mut store, format!("k{i:03}"), if i % 3 == 0 { 20 } else { SEPARATE_FROM + 1 });
        }
        let mut w = store.write();
        w.put(b"leased", b"v".to_vec(), 7);
        let batch = w.finish().0;
        commit(&mut store, batch);
        let mut w = store.write();
        w.delete_range(b"k000", &crate::mvcc::keys::RangeEnd::Before(b"k010".to_vec()), false).expect("delete");
        assert!(w.revoke_lease(7));
        let batch = w.finish().0;
        commit(&mut store, batch);
        from.tree.remove(meta_key("removed-later")).expect("remove");
        assert_ne!(records(&to), records(&from));

        catch_up(&from, &to, as_of.rev()).expect("catch up");
        assert_eq!(records(&to), records(&from));
        // The store opened on the copy is the store.
        let copy = MvccStore::open(to.clone()).expect("open the copy");
        let everything = crate::mvcc::keys::RangeEnd::Unbounded;
        assert_eq!(copy.revision(), store.revision());
        assert_eq!(
            copy.current_kvs(b"", &everything).expect("read"),
            store.current_kvs(b"", &everything).expect("read")
        );
    }
}

//! Defragment: the live state written into a new sled database, which
//! takes the old one's place while the member goes on serving.
//!
//! sled reuses the space of removed records but never shrinks its files:
//! 60,000 values of 1 KiB took 107 MB, and after 90% of them were removed
//! the files still took 118 MB, where a new database holding the rest took
//! 18 MB. So a defragment copies the state tree, between two groups of
//! writes on the commit thread, into a database in the other directory of
//! [`crate::raft::db_dir`], makes it the one in use, and removes the old.

use std::sync::Arc;

use super::super::committer::CommitError;
use super::super::db_dir::{db_dirs, open_db_at, remove_unused, set_in_use};
use super::records::Batches;
use super::view::{Shared, State};
use super::{open_files_in, CURRENT_TREE, INSTALLING, STATE_TREES, VALUES_ID};
use crate::error::Error;
use crate::mvcc::keys::HIST;
use crate::mvcc::values::load_kv;
use crate::mvcc::Files;
use std::path::Path;

/// What a defragment did: the database's size on disk before and after,
/// in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Defragmented {
    /// Before.
    pub before: u64,
    /// After.
    pub after: u64,
}

impl Shared {
    /// Rewrites the member's database with only what is live, and switches
    /// to it:
    /// - the records outside the state tree (the member's identity and what
    ///   it noted) are copied first, with other such changes held off;
    /// - the commit thread, between two groups of writes, copies the state
    ///   tree into the new database, flushes it, makes it the one in use on
    ///   disk, and then in memory: the store's reads and later groups go to
    ///   the new tree from that moment;
    /// - the old directory is removed.
    ///
    /// Applying goes on meanwhile, as for a snapshot, until its writes
    /// waiting for the commit thread reach their bound; then applying, and
    /// the reads that wait for it, wait for the copy. A member that stops
    /// at any point starts on one whole database (see
    /// [`crate::raft::db_dir`]).
    pub async fn defragment(self: &Arc<Self>) -> Result<Defragmented, Error> {
        let shared = self.clone();
        crate::raft::blocking(move || shared.defragment_now()).await
    }

    pub(in crate::raft) fn defragment_now(&self) -> Result<Defragmented, Error> {
        let _changing = self.changing_db();
        let before = self.size_on_disk();
        let old = self.db();
        let (in_use, other) = db_dirs(&self.dir)?;
        remove_unused(&self.dir)?;
        let path = self.dir.join(other);
        let new = open_db_at(&path)?;
        let copied = (|| {
            for item in old.iter() {
                let (k, v) = item?;
                if k.as_ref() != CURRENT_TREE && k.as_ref() != INSTALLING && !k.starts_with(VALUES_ID) {
                    new.insert(k, v)?;
                }
            }
            Ok::<_, Error>(())
        })();
        if let Err(e) = copied {
            drop(new);
            let _ = remove_unused(&self.dir);
            return Err(e);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (cell, dir, path_c) = (self.db.clone(), self.dir.clone(), path.clone());
        let work = move |files: &Files| {
            let moved = copy_state(files, &new, &path_c).and_then(|to| match set_in_use(&dir, other) {
                Ok(()) => Ok(to),
                Err(e) => {
                    // The rename may have happened before the failure.
                    let _ = set_in_use(&dir, in_use);
                    Err(e)
                }
            });
            match moved {
                Ok(to) => {
                    *cell.write().unwrap_or_else(|p| p.into_inner()) = new;
                    let _ = tx.send(Ok(()));
                    Some(to)
                }
                Err(e) => {
                    drop(new);
                    let _ = tx.send(Err(e));
                    None
                }
            }
        };
        {
            let mut state = self.write_without_copies();
            let State { store, unflushed, .. } = &mut *state;
            unflushed.commit(store, &self.committer)?;
            self.committer.run_then_move(work)?;
        }
        let moved = rx.recv().map_err(|_| Error::from(CommitError::Gone("during a defragment"))).and_then(|r| r);
        // The commit thread lets go of the old tree, or the new database,
        // when the job ends.
        let idle = self.committer.wait_idle();
        if let Err(e) = moved {
            if matches!(db_dirs(&self.dir), Ok((dir, _)) if dir == in_use) {
                let _ = std::fs::remove_dir_all(&path);
            }
            return Err(e);
        }
        idle?;
        drop(old);
        if let Err(e) = remove_unused(&self.dir) {
            // Removed at the next start, or by the next defragment.
            tracing::warn!(error = %e, "the database replaced by a defragment is still on disk");
        }
        let after = self.size_on_disk();
        tracing::info!(before, after, "defragmented");
        Ok(Defragmented { before, after })
    }
}

/// Copies every record of `files` into the state tree of `new`, whose
/// directory is `new_dir`, and each value kept apart into its value file;
/// makes it the tree in use there, and flushes `new`. What compaction
/// removed is left behind, in sled's files and the value file alike.
fn copy_state(files: &Files, new: &sled::Db, new_dir: &Path) -> Result<Files, Error> {
    let to = open_files_in(new, new_dir, STATE_TREES[0])?;
    let mut batch = Batches::new(&to)?;
    for item in files.tree.iter() {
        let (k, v) = item?;
        match k.first() {
            Some(&HIST) => batch.insert_version(&k, &load_kv(&v, &files.values)?)?,
            _ => batch.insert(&k, &v)?,
        }
    }
    batch.finish()?;
    new.insert(CURRENT_TREE, STATE_TREES[0].as_bytes())?;
    new.flush()?;
    Ok(to)
}

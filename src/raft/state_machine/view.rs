//! The applied state as request handlers see it: the MVCC store and member
//! attributes behind one lock, the broadcast of applied revisions that
//! watches follow, and the reads that need history, hashes or backups.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{broadcast, oneshot, watch};

use super::super::committer::{CommitError, Committer};
use super::super::NodeId;
use super::group::Group;
use super::records::{write_records, AsOf, Part};
use super::BACKUP_PREFIX;
use super::COMPACTION_STEP;
use crate::error::Error;
use crate::mvcc::{Batch, CompactionStep, MvccStore};
use crate::proto::kvdpb::MemberAttributes;
use crate::proto::mvccpb::Event;

/// What a member serves reads from: the MVCC store and the published member
/// attributes, as of the last applied entry.
pub struct State {
    /// The key-value data.
    pub store: MvccStore,
    /// Names and client URLs that members published about themselves.
    pub attrs: BTreeMap<NodeId, MemberAttributes>,
    /// Raised alarms: the member each is for, and its type (etcd's
    /// `AlarmType` number). Replicated like the data: every member refuses
    /// the same writes while one is raised.
    pub alarms: BTreeSet<(NodeId, i32)>,
    /// Users, roles and whether auth is on (see [`crate::auth`]).
    pub auth: crate::auth::AuthState,
    /// The tokens this member knows; kept in memory only, and across a
    /// snapshot install.
    pub tokens: std::sync::Arc<crate::auth::Tokens>,
    /// Writes of applied entries not yet committed to sled (see
    /// [`Shared::read_committed`]).
    pub(super) unflushed: Group,
}

/// A view of the state whose writes are all in sled, for reads of history
/// (see [`Shared::read_committed`]).
pub enum Committed<'a> {
    /// Nothing was waiting to be committed.
    Read(RwLockReadGuard<'a, State>),
    /// Writes were committed first; applying waits while this is held.
    Written(RwLockWriteGuard<'a, State>),
}

impl std::ops::Deref for Committed<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        match self {
            Committed::Read(g) => g,
            Committed::Written(g) => g,
        }
    }
}

/// The events of one applied revision, as watchers receive them. An entry
/// with no events announces that the state jumped to `rev` without events
/// (a snapshot was installed): watchers catch up from history.
#[derive(Debug)]
pub struct Applied {
    /// The revision.
    pub rev: i64,
    /// Its events in order, each with its previous key-value.
    pub events: Vec<Event>,
}

/// How many applied revisions the watch broadcast holds for watchers that
/// fall behind; a watcher further behind catches up from history on disk, so
/// memory stays bounded whatever watchers do.
pub(super) const WATCH_BUFFER: usize = 1024;

/// Where [`Shared::note_listed`] records that a membership listed this member.
const LISTED_KEY: &[u8] = b"listed_in_membership";

/// Where in the log a membership comes from: the term of the leader that
/// appended its entry, then the entry's index (both 0 before any). Ordered
/// as Raft orders log ids: a membership at or after the last one a member
/// applied was appended by a leader that had that one committed, so it
/// lists no member removed by it. Comparing indexes alone is not enough: a
/// deposed leader's entry that was never committed may sit on a member that
/// fell behind at the same index as the committed one, or later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct MembershipAt {
    /// The term of the leader that appended the entry.
    pub term: u64,
    /// The entry's log index.
    pub index: u64,
}

/// Where in the log `membership` comes from.
pub fn membership_at(membership: &openraft::StoredMembership<NodeId, openraft::BasicNode>) -> MembershipAt {
    membership.log_id().map_or(MembershipAt::default(), |l| MembershipAt { term: l.leader_id.term, index: l.index })
}

/// The state shared between the state machine and the request handlers.
pub struct Shared {
    /// The database in use; a defragment replaces it (see
    /// [`Shared::defragment`]).
    pub(super) db: Arc<RwLock<sled::Db>>,
    /// Held while the database, or the state tree in use, is replaced
    /// (defragment, snapshot install), and while records outside the state
    /// tree are written, so that a copy misses none.
    pub(super) db_change: std::sync::Mutex<()>,
    /// Copies of the state tree under way beside the commit thread (see
    /// [`super::copies`]).
    pub(super) copies: super::copies::Copies,
    /// Held while a backup's copy is under way, until the copy ends even if
    /// the client gave up: one at a time, however many clients ask, so that
    /// `snapshot save` calls do not run copies of the whole store side by
    /// side, each holding off what waits for copies.
    pub(super) backups: Arc<tokio::sync::Mutex<()>>,
    pub(super) state: RwLock<State>,
    pub(super) applied: broadcast::Sender<Arc<Applied>>,
    pub(super) committer: Committer,
    /// Wakes the compaction thread; dropping it ends the thread.
    pub(super) compaction: std::sync::mpsc::Sender<()>,
    /// How far physical compaction has come (see [`Shared::await_physical`]).
    pub(super) physical: watch::Sender<Physical>,
    /// The data dir: where snapshots and backups are written.
    pub(super) dir: std::path::PathBuf,
    /// Asks for a snapshot (see [`super::StateMachine::snapshot_every`]).
    pub(super) snapshot_wanted: Arc<tokio::sync::Notify>,
    /// Loads of snapshots as they arrive (see [`super::preload`]).
    pub(super) preloads: super::preload::Preloads,
    /// Defragments under way on this member, or about to begin (see
    /// [`Shared::claim_defragment`]).
    pub(super) defragments: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether this member may begin a defragment by itself now (see
    /// [`Shared::on_defragment_turn`]); without it, always.
    pub(super) defragment_turn: std::sync::OnceLock<super::defrag::Turn>,
    /// Where the last membership this member applied comes from; see
    /// [`Shared::applied_membership`].
    pub(super) membership_at: std::sync::Mutex<MembershipAt>,
    /// Who waits for which revision (see [`Shared::revision_reached`]).
    pub(super) revision_waiters: std::sync::Mutex<RevisionWaiters>,
}

/// Requests waiting until this member has applied a revision, by revision.
#[derive(Default)]
pub(super) struct RevisionWaiters {
    by_rev: BTreeMap<i64, Vec<oneshot::Sender<()>>>,
    /// The waiters in `by_rev`, those that gave up included.
    count: usize,
    /// The count at which those that gave up (timed out) are dropped: twice
    /// what the last drop left, and at least [`PRUNE_WAITERS_AT`], so that
    /// a member with many writes waiting for a stalled apply does not go
    /// over all of them for each new one.
    prune_at: usize,
}

/// The fewest waiters at which those that gave up are dropped.
pub(super) const PRUNE_WAITERS_AT: usize = 4096;

impl RevisionWaiters {
    fn add(&mut self, rev: i64, waiter: oneshot::Sender<()>) {
        if self.count >= self.prune_at.max(PRUNE_WAITERS_AT) {
            self.by_rev.retain(|_, list| {
                list.retain(|w| !w.is_closed());
                !list.is_empty()
            });
            self.count = self.by_rev.values().map(Vec::len).sum();
            self.prune_at = self.count.saturating_mul(2);
        }
        self.by_rev.entry(rev).or_default().push(waiter);
        self.count += 1;
    }

    /// Takes the waiters for `rev` and every revision before it.
    fn take_upto(&mut self, rev: i64) -> Vec<oneshot::Sender<()>> {
        if self.by_rev.first_key_value().is_none_or(|(&first, _)| first > rev) {
            return Vec::new();
        }
        let later = self.by_rev.split_off(&rev.saturating_add(1));
        let reached: Vec<_> = std::mem::replace(&mut self.by_rev, later).into_values().flatten().collect();
        self.count -= reached.len();
        reached
    }

    /// The waiters kept, those that gave up included.
    pub(super) fn len(&self) -> usize {
        self.count
    }
}

impl Drop for Shared {
    /// Ends the copies under way beside the commit thread, which hold the
    /// database's files open, before the commit thread is stopped.
    fn drop(&mut self) {
        self.copies.stop();
    }
}

/// A copy of every record of the state tree, as snapshot data, in a file
/// of its own (already unlinked: it goes when it is dropped).
pub struct BackupFile {
    /// Positioned at the start of the data.
    pub file: std::fs::File,
    /// The data's length in bytes.
    pub len: u64,
}

/// How far this member has removed compacted history.
#[derive(Debug, Clone, Default)]
pub(super) struct Physical {
    /// History below this revision is removed.
    pub(super) rev: i64,
    /// The compacted revision whose removal last failed, and why.
    pub(super) failed: Option<(i64, String)>,
}

impl Shared {
    /// Whether a membership this member applied has listed it (recorded in
    /// the data dir): only such a member can have been removed. A member
    /// that joins replays memberships from before it was added.
    pub fn was_listed(&self) -> bool {
        matches!(self.db().get(LISTED_KEY), Ok(Some(_)))
    }

    /// Where in the log the last membership this member applied comes
    /// from (0, 0 before any). Unlike openraft's membership, which may be
    /// one appended and not yet committed, it only moves forward.
    pub fn applied_membership(&self) -> MembershipAt {
        *self.membership_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn note_membership(&self, membership: &openraft::StoredMembership<NodeId, openraft::BasicNode>) {
        *self.membership_at.lock().unwrap_or_else(|p| p.into_inner()) = membership_at(membership);
    }

    /// Records that a membership this member applied lists it.
    pub fn note_listed(&self) -> Result<(), crate::error::Error> {
        let _changing = self.changing_db();
        let db = self.db();
        db.insert(LISTED_KEY, &[1u8])?;
        db.flush()?;
        Ok(())
    }

    /// The database in use.
    pub(super) fn db(&self) -> sled::Db {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Holds off other changes of the database (see [`Shared::db_change`]).
    pub(super) fn changing_db(&self) -> std::sync::MutexGuard<'_, ()> {
        self.db_change.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` once this member has applied revision `rev`; until then, a
    /// receiver that [`Shared::wake_revision_waiters`] answers when it has
    /// (or that fails when the member stops).
    ///
    /// A write through a follower waits here for the follower's own apply.
    /// Each waiter is woken once, when its revision is in: with every
    /// applied revision sent to every waiter instead, a follower under puts
    /// from 256 clients spent 5.6–6.9% of its CPU samples in waiters woken
    /// for a revision not theirs yet.
    pub fn revision_reached(&self, rev: i64) -> Option<oneshot::Receiver<()>> {
        if self.read().store.revision() >= rev {
            return None;
        }
        // The waiters' lock first, then the state's, here and where they are
        // woken: a revision applied after the check below wakes this waiter.
        let mut waiters = self.revision_waiters.lock().unwrap_or_else(|p| p.into_inner());
        if self.read().store.revision() >= rev {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        waiters.add(rev, tx);
        Some(rx)
    }

    /// Answers every waiter whose revision this member has applied. Called
    /// after applying, without the state lock.
    pub(super) fn wake_revision_waiters(&self) {
        let mut waiters = self.revision_waiters.lock().unwrap_or_else(|p| p.into_inner());
        if waiters.len() == 0 {
            return;
        }
        let reached = waiters.take_upto(self.read().store.revision());
        drop(waiters);
        for w in reached {
            let _ = w.send(());
        }
    }

    /// Subscribes to applied revisions. Also returns the current revision,
    /// read under the same lock: every revision after it reaches the receiver
    /// (or the receiver reports that it lagged).
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<Applied>>, i64) {
        let state = self.read();
        (self.applied.subscribe(), state.store.revision())
    }

    /// Locks the state for reading.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state lock, once no copy of the state tree is under way: for
    /// work that removes or replaces records a copy reads (see
    /// [`super::copies`]). A copy begins only under this lock, so work
    /// queued on the commit thread under it runs before any copy begins.
    /// Waits without the lock, so applying goes on meanwhile.
    pub(super) fn write_without_copies(&self) -> RwLockWriteGuard<'_, State> {
        self.write_without_other_copies(0)
    }

    /// [`Shared::write_without_copies`] for work that holds `ours` copies
    /// under way itself: waits until no other is.
    pub(super) fn write_without_other_copies(&self, ours: usize) -> RwLockWriteGuard<'_, State> {
        let _waiting = self.copies.waiting();
        loop {
            let state = self.write();
            if self.copies.under_way() <= ours {
                return state;
            }
            drop(state);
            self.copies.wait_at_most(ours);
        }
    }

    /// The state, with every applied write committed to sled first: what a
    /// read of history (a range at a past revision, a watch replay, a
    /// previous key-value) needs, since those read sled directly. Applying
    /// hands writes to the [`Committer`] only every [`MAX_UNFLUSHED_WRITES`]
    /// writes or [`MAX_UNFLUSHED_AGE`]; reads of current values find the
    /// rest, and those being committed, in the store's own overlay.
    pub fn read_committed(&self) -> Result<Committed<'_>, Error> {
        self.read_for(true)
    }

    /// The state for a read that reads `history` or not: committed first
    /// only if it does (see [`Shared::read_committed`]).
    pub fn read_for(&self, history: bool) -> Result<Committed<'_>, Error> {
        let state = self.read();
        if !history || (state.unflushed.is_empty() && !state.store.is_sending()) {
            return Ok(Committed::Read(state));
        }
        drop(state);
        let mut state = self.write();
        let State { store, unflushed, .. } = &mut *state;
        unflushed.commit(store, &self.committer)?;
        Ok(Committed::Written(state))
    }

    /// A copy of every record of the state tree as of the last applied
    /// entry, in the layout of snapshot data, and that entry's revision:
    /// what `snapshot save` sends. Copied to a file as of the last applied
    /// write, beside the commit thread, as for a Raft snapshot (see
    /// [`super::copies`]); applying and committing go on meanwhile. Nothing
    /// proportional to the data is held in memory.
    pub async fn backup(&self) -> Result<(i64, BackupFile), Error> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("{BACKUP_PREFIX}{n}"));
        let one_at_a_time = self.backups.clone().lock_owned().await;
        let (tx, rx) = oneshot::channel();
        let rev = loop {
            // Work that waits for copies to end goes first.
            self.copies.wait_your_turn().await;
            let mut state = self.write();
            let Some(copying) = self.copies.begin_unless_waited_for() else { continue };
            let State { store, unflushed, .. } = &mut *state;
            unflushed.commit(store, &self.committer)?;
            let rev = store.revision();
            // The commit thread takes what a commit may change; the rest is
            // copied beside it (see `copies`).
            self.committer.run(move |files| {
                copying.copy_as_of(files, rev, Part::Whole, tx, move |files, as_of| {
                    let copied = write_backup(files, as_of, &path);
                    drop(one_at_a_time);
                    copied
                })
            })?;
            break rev;
        };
        let backup = rx.await.map_err(|_| CommitError::Gone("before the copy"))??;
        Ok((rev, backup))
    }

    /// The hash of history up to `rev` (0 or less: the current revision),
    /// the compacted revision it assumes, and the revision it covers (see
    /// [`crate::mvcc::hash_history`]). History is read from sled while
    /// applying goes on; a compaction applied meanwhile would change what
    /// the hash must cover, so the hash is taken again then.
    pub async fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64), Error> {
        for _ in 0..3 {
            let (files, compacted, rev) = {
                let state = self.read_committed()?;
                let rev = state.store.check_read_rev(rev, state.store.revision())?;
                (state.store.files(), state.store.compacted(), rev)
            };
            let hash = crate::raft::blocking(move || crate::mvcc::hash_history(&files, compacted, rev)).await?;
            if self.read().store.compacted() == compacted {
                return Ok((hash, compacted, rev));
            }
        }
        Err(Error::Timeout)
    }

    /// Runs the next step of physical compaction on the commit thread,
    /// between two groups of writes, and waits for it. False if there is
    /// nothing to do.
    pub(in crate::raft) fn compaction_step(&self) -> Result<bool, Error> {
        let (step, done) = loop {
            // Waiting here, not under the state lock, keeps applying going
            // while the commit thread finishes a group.
            self.committer.wait_idle()?;
            let mut state = self.write_without_copies();
            if !self.committer.is_idle()? {
                continue;
            }
            let State { store, unflushed, .. } = &mut *state;
            let Some(step) = store.compaction_step() else { return Ok(false) };
            if step.from == CompactionStep::FIRST {
                // The compaction itself is on disk before any history it
                // hides is removed: a member that restarts must not serve
                // reads at a revision whose history is gone.
                unflushed.commit(store, &self.committer)?;
                tracing::info!(revision = step.rev, "removing compacted history");
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let work = step.clone();
            self.committer.run(move |files| {
                let done = work.run(files, COMPACTION_STEP).and_then(|done| {
                    files.tree.apply_batch(done.batch.into_sled())?;
                    files.packs.forget(done.unpacked.iter().map(|r| &r[..]));
                    Ok((done.next, done.freed))
                });
                let _ = tx.send(done);
            })?;
            break (step, rx);
        };
        let (next, freed) = done.recv().map_err(|_| CommitError::Gone("during a compaction step"))??;
        let mut state = self.write();
        state.store.freed(freed);
        if state.store.compaction_stepped(&step, next) {
            let rev = state.store.physical();
            tracing::info!(revision = rev, "removed compacted history");
            self.physical.send_replace(Physical { rev, failed: None });
        }
        Ok(true)
    }

    /// Records that physical compaction failed, for those waiting on it.
    pub(in crate::raft) fn compaction_failed(&self, e: Error) {
        let rev = self.read().store.compacted();
        self.physical.send_modify(|p| p.failed = Some((rev, e.to_string())));
    }

    /// Waits until history below `rev` is removed on this member: what a
    /// compaction with `physical` set answers after. An error if physical
    /// compaction at `rev` or later failed meanwhile.
    pub async fn await_physical(&self, rev: i64) -> Result<(), Error> {
        let mut physical = self.physical.subscribe();
        loop {
            {
                let now = physical.borrow_and_update();
                if now.rev >= rev {
                    return Ok(());
                }
                if let Some((failed, why)) = now.failed.as_ref().filter(|(failed, _)| *failed >= rev) {
                    return Err(CommitError::Compaction { rev: *failed, why: why.clone() }.into());
                }
            }
            if physical.changed().await.is_err() {
                return Err(Error::Stopped);
            }
        }
    }

    /// The durations of the commits of applied writes to sled.
    pub fn commit_histogram(&self) -> Arc<crate::metrics::Histogram> {
        self.committer.commit_histogram()
    }

    /// Writes everything sled holds in memory to disk.
    pub async fn flush(&self) -> Result<(), Error> {
        crate::raft::flush(&self.db()).await
    }

    /// Bytes of data the store holds (`MvccStore::bytes_in_use`).
    pub fn bytes_in_use(&self) -> u64 {
        self.read().store.bytes_in_use()
    }

    /// Bytes the member's database takes on disk: sled's files and the
    /// value file.
    pub fn size_on_disk(&self) -> u64 {
        let values = self.read().store.files().values.len();
        self.db().size_on_disk().unwrap_or(0) + values
    }

    /// Whether the value file is mostly values compaction has removed the
    /// records of: at least half of it, and at least `floor` bytes. Its
    /// space comes back only when a defragment copies the live values into
    /// a new file, so the compaction thread defragments then (see
    /// [`super::super::compactor`]); otherwise a key overwritten with large
    /// values grew the file without end under automatic compaction, where
    /// sled reuses the space of removed records.
    /// Asks for a snapshot: after a defragment, the snapshot file still
    /// points into the value file replaced, whose space comes back only
    /// once a snapshot of the new state replaces it.
    pub(in crate::raft) fn want_snapshot(&self) {
        self.snapshot_wanted.notify_one();
    }

    pub(in crate::raft) fn values_worth_reclaiming(&self, floor: u64) -> bool {
        let state = self.read();
        let file = state.store.files().values.len();
        // Every live value is counted in the bytes in use, so what is
        // beyond them is removed.
        let live_at_most = state.store.bytes_in_use();
        worth_reclaiming(file, live_at_most, floor)
    }
}

/// See [`Shared::values_worth_reclaiming`]: `file` bytes, of which at most
/// `live_at_most` are live.
fn worth_reclaiming(file: u64, live_at_most: u64, floor: u64) -> bool {
    let removed_at_least = file.saturating_sub(live_at_most);
    removed_at_least >= floor && removed_at_least >= live_at_most
}

#[cfg(test)]
#[test]
fn a_value_file_is_reclaimed_once_most_of_it_is_removed_values() {
    let mib = 1 << 20;
    assert!(!worth_reclaiming(0, 0, 64 * mib));
    // Mostly removed, but less than the floor.
    assert!(!worth_reclaiming(10 * mib, mib, 64 * mib));
    // Past the floor, but less than half removed.
    assert!(!worth_reclaiming(300 * mib, 200 * mib, 64 * mib));
    assert!(worth_reclaiming(400 * mib, 200 * mib, 64 * mib));
    assert!(worth_reclaiming(65 * mib, 0, 64 * mib));
}

/// The state machine openraft drives.
impl Shared {
    /// Adds one command's writes to the group and broadcasts its events.
    /// Called under the state lock, so that `subscribe` sees each revision
    /// either in the state or in the receiver.
    pub(super) fn publish(&self, state: &State, group: &mut Group, batch: Batch, events: Vec<Event>) {
        group.batch.append(batch);
        if !events.is_empty() {
            let _ = self.applied.send(Arc::new(Applied { rev: state.store.revision(), events }));
        }
    }
}

/// Writes every record of `tree` to a new file at `path`, which is unlinked
/// at once: a member that stops while the file is sent leaves nothing
/// behind (one that stops while it is written leaves it to be removed at
/// the next start).
fn write_backup(files: &crate::mvcc::Files, as_of: &AsOf, path: &std::path::Path) -> Result<BackupFile, Error> {
    use std::io::{Seek, SeekFrom};
    let io = |e: std::io::Error| Error::internal(format!("write backup: {e}"));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io)?;
    let written = (|| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let (_, len) = write_records(files, Some(as_of), &mut out)?;
        let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        Ok(BackupFile { file, len })
    })();
    let _ = std::fs::remove_file(path);
    written
}

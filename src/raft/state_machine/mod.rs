//! The Raft state machine: applies committed commands to the MVCC store.
//!
//! The effects of applied entries are committed to sled in groups, each in
//! one sled batch with the log id of its last entry, by a thread of its own
//! (see [`super::committer`]), so after a crash the store is exactly as of
//! some applied entry and openraft re-applies the rest from the log. A group
//! of more than a few thousand writes (one revision may delete any number
//! of keys) goes in several batches, since sled's memory grows far faster
//! than a batch: its history and revision-order records first, then one
//! batch with everything else and the log id. A crash between them leaves
//! only records of revisions the store never recorded, which
//! [`crate::mvcc::MvccStore::open`] removes: the group is still all or
//! nothing. The
//! state machine is not flushed per entry (the log is the durable record),
//! but it is flushed before a snapshot is handed to openraft, which may then
//! purge the log.
//!
//! Snapshots are a copy of the whole state tree as of one applied entry,
//! begun by the commit thread between two groups and made beside it while
//! applying and committing go on (see [`copies`]), kept in
//! `<data-dir>/snapshot.bin` and sent by openraft in chunks. The member's own
//! copy points into the state tree's value file for large values, as the
//! tree does, instead of holding them a second time; what is sent, and what
//! a member receives, holds every value. One is taken every
//! `--snapshot-count` client commands (see [`StateMachine::snapshot_every`]).

mod apply;
mod copies;
mod data;
mod defrag;
mod group;
mod preload;
mod records;
mod snapshot;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
mod view;

pub use apply::{alarm_name, reads_history, refused_by_alarm, txn_puts, txn_reads_history};
pub use data::SnapshotData;
pub use defrag::{DefragmentClaim, Defragmented};
pub use group::{MAX_UNFLUSHED_AGE, MAX_UNFLUSHED_WRITES};
pub use records::load_backup;
pub use snapshot::SnapshotBuilder;
pub use view::BackupFile;
pub use view::{membership_at, Applied, Committed, MembershipAt, Shared, State};

use self::apply::*;
use self::records::*;
use self::snapshot::*;
use self::view::*;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, OptionalSend, StorageIOError, StoredMembership};
use prost::Message;
use tokio::sync::{broadcast, oneshot, watch};

use super::committer::Committer;
use super::compactor;
use super::{encode, Entry, LogId, Node, NodeId, Request, Response, StorageError, TypeConfig};
use crate::error::Error;
use crate::mvcc::keys::meta_key;
use crate::mvcc::values::ValueLog;
use crate::mvcc::Files;
use crate::proto::kvdpb::{command, Command};

const ATTRS: u8 = b'a';
/// Prefix of an alarm's record: then the member id (8 bytes) and the alarm
/// type (4 bytes), big-endian; the value is empty.
const ALARMS: u8 = b'A';
const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT_FILE: &str = "snapshot.bin";
/// How the names of backups being written for `snapshot save` begin.
const BACKUP_PREFIX: &str = "backup-";
/// Set while a snapshot is installed into the state tree not in use: to
/// [`INSTALLING_FROM_FILE`] while it loads from the snapshot file, which a
/// member that stopped meanwhile loads again at start; to
/// [`INSTALLING_LOADED`] once the tree holds it all, which such a member
/// starts on.
const INSTALLING: &[u8] = b"installing_snapshot";
const INSTALLING_FROM_FILE: &[u8] = &[1];
const INSTALLING_LOADED: &[u8] = &[2];
/// Names the state tree in use: one of [`STATE_TREES`] (the first if unset).
const CURRENT_TREE: &[u8] = b"state_tree";
/// How the records naming each state tree's value file begin (see
/// [`values_id_key`]); a defragment's new database names its own.
const VALUES_ID: &[u8] = b"values_id.";
/// The two state trees: a snapshot is loaded into the one not in use while
/// the other serves, and they swap in a moment.
const STATE_TREES: [&str; 2] = ["state", "state.b"];

/// The name of the state tree in use, and of the other.
fn state_trees(db: &sled::Db) -> Result<(&'static str, &'static str), Error> {
    match db.get(CURRENT_TREE)? {
        Some(name) if name.as_ref() == STATE_TREES[1].as_bytes() => Ok((STATE_TREES[1], STATE_TREES[0])),
        Some(name) if name.as_ref() != STATE_TREES[0].as_bytes() => {
            Err(Error::internal(format!("unknown state tree {:?}", String::from_utf8_lossy(&name))))
        }
        _ => Ok((STATE_TREES[0], STATE_TREES[1])),
    }
}

/// The value file of the state tree `name` (see [`crate::mvcc::values`]):
/// in the directory of the database `data_dir` uses, beside sled's files,
/// so that a defragment's new database comes with its own.
fn values_path(data_dir: &Path, name: &str) -> Result<PathBuf, Error> {
    Ok(values_file(&super::db_dir::db_path(data_dir)?, name))
}

/// The value file of the state tree `name` of the database in `db_dir`.
fn values_file(db_dir: &Path, name: &str) -> PathBuf {
    db_dir.join(format!("values-{name}"))
}

/// The state tree `name` and its value file.
fn open_files(db: &sled::Db, data_dir: &Path, name: &str) -> Result<Files, Error> {
    open_files_in(db, &super::db_dir::db_path(data_dir)?, name)
}

/// The state tree `name` of `db`, whose directory is `db_dir`, and its
/// value file.
fn open_files_in(db: &sled::Db, db_dir: &Path, name: &str) -> Result<Files, Error> {
    let id = match db.get(values_id_key(name))? {
        Some(id) => {
            let id: [u8; 8] = id.as_ref().try_into().map_err(|_| Error::internal("corrupt value file id"))?;
            u64::from_be_bytes(id)
        }
        None => new_values_id(db, name)?,
    };
    let values = ValueLog::open(&values_file(db_dir, name), id)?;
    Ok(Files::new(db.open_tree(name)?, Arc::new(values)))
}

/// An empty state tree, and value file, in place of the one not in use.
fn fresh_files(db: &sled::Db, data_dir: &Path, name: &str) -> Result<Files, Error> {
    db.drop_tree(name)?;
    let id = new_values_id(db, name)?;
    let values = ValueLog::create(&values_path(data_dir, name)?, id)?;
    Ok(Files::new(db.open_tree(name)?, Arc::new(values)))
}

/// The record of `db` that holds the id of the value file of the state
/// tree `name` (see [`ValueLog`]).
fn values_id_key(name: &str) -> Vec<u8> {
    [VALUES_ID, name.as_bytes()].concat()
}

/// Gives the value file of the state tree `name` a new id, durably, before
/// anything is written to it.
fn new_values_id(db: &sled::Db, name: &str) -> Result<u64, Error> {
    let id = rand::random::<u64>();
    db.insert(values_id_key(name), &id.to_be_bytes())?;
    db.flush()?;
    Ok(id)
}

/// Makes the tree `name` the state tree in use, durably, and drops the
/// other and its value file.
fn use_tree(db: &sled::Db, data_dir: &Path, name: &str, other: &str) -> Result<(), Error> {
    db.insert(CURRENT_TREE, name.as_bytes())?;
    db.remove(INSTALLING)?;
    db.flush()?;
    drop_files(db, data_dir, other)
}

/// Drops the state tree `name` and removes its value file.
fn drop_files(db: &sled::Db, data_dir: &Path, name: &str) -> Result<(), Error> {
    db.drop_tree(name)?;
    let path = values_path(data_dir, name)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::internal(format!("remove {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}
/// Records one step of physical compaction reads at most: about 5 ms of
/// the commit thread, which applying may wait for. Larger steps are slower
/// per record as well: sled took 2.3 s to remove 114,000 records in one
/// batch, and 1.0 s in batches of a few hundred.
const COMPACTION_STEP: usize = 1000;

pub struct StateMachine {
    shared: Arc<Shared>,
    dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    /// What the member knows of the snapshot file.
    snapshot_file: Arc<std::sync::Mutex<OnDisk>>,
    /// Counts client commands toward a snapshot (see
    /// [`StateMachine::snapshot_every`]).
    due: SnapshotDue,
    /// The index of the last entry applied, for the log store to pace
    /// appends by (see [`StateMachine::applied_index`]). openraft's own
    /// metrics would not do: they learn of an apply from its core, which is
    /// the task waiting in the append.
    applied_index: watch::Sender<u64>,
}

/// Commands applied since the last snapshot was begun, and the count at
/// which one is asked for next. etcd's `--snapshot-count` counts requests,
/// each an entry of its own; kvd proposes many in one entry, so openraft's
/// count of entries would let the log hold many times as many writes.
#[derive(Debug)]
struct SnapshotDue {
    every: u64,
    since: u64,
    next: u64,
    ask: Arc<tokio::sync::Notify>,
}

impl SnapshotDue {
    /// Asks through `ask` once [`StateMachine::snapshot_every`] sets a count.
    fn new(ask: Arc<tokio::sync::Notify>) -> Self {
        SnapshotDue { every: u64::MAX, since: 0, next: u64::MAX, ask }
    }

    fn applied(&mut self, commands: u64) {
        self.since = self.since.saturating_add(commands);
        if self.since >= self.next {
            // Asked again each `every` more, should a request be lost in a
            // snapshot already under way.
            self.next = self.since.saturating_add(self.every);
            self.ask.notify_one();
        }
    }

    fn begun(&mut self) {
        self.since = 0;
        self.next = self.every;
    }
}

impl StateMachine {
    /// Opens the state machine kept in `db`; `dir` holds the snapshot file.
    /// Finishes a snapshot install that a crash interrupted.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<Self, Error> {
        remove_leftovers(dir)?;
        let (current, other) = state_trees(db)?;
        let installing = db.get(INSTALLING)?;
        let (current, rebuilt) = if installing.as_deref() == Some(INSTALLING_LOADED) {
            use_tree(db, dir, other, current)?;
            (other, None)
        } else if installing.is_some() {
            let open = open_snapshot_file(dir)?
                .ok_or_else(|| Error::internal("snapshot install was interrupted and its file is gone"))?;
            if open.values.is_some() {
                // An install publishes such a file only once it is done.
                return Err(Error::internal("snapshot install was interrupted and its file is the member's own"));
            }
            let files = fresh_files(db, dir, other)?;
            let (file, len) = (open.file, open.len);
            let rebuilt =
                load_records::<std::fs::File>(db, &files, |each| for_each_record(file, len, each).map(drop), None)?;
            use_tree(db, dir, other, current)?;
            (other, Some(rebuilt))
        } else {
            // What a load cut short left behind.
            drop_files(db, dir, other)?;
            (current, None)
        };
        let files = open_files(db, dir, current)?;
        let (state, last_applied, membership) = load_state(&files, rebuilt)?;
        let on_disk = snapshot_on_disk(dir, &files, last_applied, &membership)?;
        let physical = Physical { rev: state.store.physical(), failed: None };
        let (wake, woken) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            db: Arc::new(RwLock::new(db.clone())),
            db_change: std::sync::Mutex::new(()),
            copies: Default::default(),
            backups: Default::default(),
            committer: Committer::start(state.store.tree_cell())?,
            state: RwLock::new(state),
            applied: broadcast::channel(WATCH_BUFFER).0,
            dir: dir.to_path_buf(),
            compaction: wake,
            physical: watch::channel(physical).0,
            snapshot_wanted: Arc::new(tokio::sync::Notify::new()),
            preloads: Default::default(),
            defragments: Default::default(),
            defragment_turn: Default::default(),
            membership_at: membership_at(&membership).into(),
            revision_waiters: Default::default(),
        });
        compactor::start(Arc::downgrade(&shared), woken)?;
        let due = SnapshotDue::new(shared.snapshot_wanted.clone());
        Ok(StateMachine {
            shared,
            dir: dir.to_path_buf(),
            last_applied,
            membership,
            snapshot_file: Arc::new(std::sync::Mutex::new(on_disk)),
            due,
            applied_index: watch::channel(last_applied.map_or(0, |l| l.index)).0,
        })
    }

    /// Asks for a snapshot each time `every` client commands (or other
    /// entries) have been applied since the last one was begun, and after
    /// the compaction thread defragments: the caller waits on what this
    /// returns and has openraft build one.
    pub fn snapshot_every(&mut self, every: u64) -> Arc<tokio::sync::Notify> {
        self.due.every = every.max(1);
        self.due.begun();
        self.due.ask.clone()
    }

    /// Finishes, on its own thread, what a compaction pass that was cut
    /// short left in the data dir. Called once the member has accepted the
    /// data dir; nothing is removed from one it refuses.
    pub fn resume_compaction(&self) {
        let _ = self.shared.compaction.send(());
    }

    /// The last log id applied.
    pub fn last_applied(&self) -> Option<LogId> {
        self.last_applied
    }

    /// The index of the last entry applied, as it moves: the log store
    /// holds appends back while applying lags far behind what is
    /// committed (see [`crate::raft::log_store::LogStore::pace_by`]).
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.subscribe()
    }

    fn publish_applied(&self) {
        let index = self.last_applied.map_or(0, |l| l.index);
        self.applied_index.send_if_modified(|at| std::mem::replace(at, index) != index);
        self.shared.wake_revision_waiters();
    }

    /// The state that request handlers read.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Waits, holding neither the state lock nor a thread, while the commit
    /// thread is busy (with a defragment, say) and the writes gathered
    /// meanwhile have reached their bound. Applying would otherwise wait for
    /// it under the state lock, and every reader with it, each holding one
    /// of the runtime's threads: a snapshot at 1,000,000 keys that took the
    /// commit thread 2.5 s, when it made the copy itself, stalled members
    /// long enough to lose their leader.
    async fn room_to_apply(&self) -> Result<(), Error> {
        let long_job = self.shared.committer.on_long_job();
        let gathered = self.shared.read().unflushed.full(long_job);
        if gathered {
            self.shared.committer.idle().await?;
        }
        Ok(())
    }

    /// The last applied log id, for an error that names none.
    fn last(&self) -> LogId {
        self.last_applied.unwrap_or_default()
    }

    /// Applies `entries` in order under one hold of the state lock. Their
    /// writes join the group waiting to be committed to sled, which goes to
    /// the [`Committer`] with the last applied log id when it is due.
    /// Readers find writes not yet in sled in the store's overlay. A command
    /// that reads history from sled first has the writes of the entries
    /// before it committed; such a command is always proposed in an entry of
    /// its own (see [`reads_history`]), so that nothing but whole entries is
    /// ever committed.
    // openraft's StorageError is large by design; the trait fixes the type.
    #[allow(clippy::result_large_err)]
    fn apply_entries(&mut self, entries: impl IntoIterator<Item = Entry>) -> Result<Vec<Response>, StorageError> {
        let fail = |log_id: LogId, e: Error| StorageError::from(StorageIOError::apply(log_id, &e));
        let committer = &self.shared.committer;
        let mut state = self.shared.write();
        let mut group = std::mem::take(&mut state.unflushed);
        let compacted = state.store.compacted();
        let mut out = Vec::new();
        for entry in entries {
            let response = match &entry.payload {
                EntryPayload::Blank => Response(Ok(Default::default())),
                EntryPayload::Normal(Request(bytes)) => match Command::decode(bytes.as_slice()) {
                    Ok(Command { op: Some(command::Op::Batch(b)), .. }) => {
                        // One response per command, encoded together.
                        self.due.applied(b.commands.len() as u64);
                        let mut responses = Vec::with_capacity(b.commands.len());
                        for bytes in &b.commands {
                            let applied = apply_command(
                                &mut state,
                                decode_command(bytes),
                                entry.log_id.leader_id.term,
                                &mut group,
                                committer,
                                true,
                            );
                            let (batch, response, events) = applied.map_err(|e| fail(entry.log_id, e))?;
                            self.shared.publish(&state, &mut group, batch, events);
                            responses.push(response);
                        }
                        Response(Ok(serde_bytes::ByteBuf::from(
                            encode(&responses).map_err(|e| fail(entry.log_id, e.into()))?,
                        )))
                    }
                    decoded => {
                        self.due.applied(1);
                        let term = entry.log_id.leader_id.term;
                        let applied = apply_command(&mut state, decoded.ok(), term, &mut group, committer, false);
                        let (batch, response, events) = applied.map_err(|e| fail(entry.log_id, e))?;
                        self.shared.publish(&state, &mut group, batch, events);
                        response
                    }
                },
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    self.shared.note_membership(&self.membership);
                    let encoded = encode(&self.membership).map_err(|e| fail(entry.log_id, e.into()))?;
                    group.batch.insert(meta_key(MEMBERSHIP), encoded);
                    Response(Ok(Default::default()))
                }
            };
            group.last = Some(entry.log_id);
            group.since.get_or_insert_with(std::time::Instant::now);
            self.last_applied = Some(entry.log_id);
            out.push(response);
        }
        if let Some(last) = group.last {
            if group.due() {
                group.hand_off(&mut state.store, committer).map_err(|e| fail(last, e))?;
            }
        }
        state.unflushed = group;
        if state.store.compacted() != compacted {
            let _ = self.shared.compaction.send(());
        }
        Ok(out)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.room_to_apply().await.map_err(|e| StorageError::from(StorageIOError::apply(self.last(), &e)))?;
        let applied = self.apply_entries(entries);
        self.publish_applied();
        applied
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.due.begun();
        // The records and the last applied id must agree: every applied
        // write is committed first, and the commit thread takes the records
        // a commit may change before it commits any later group; the rest
        // are copied up to this revision. Applying goes on meanwhile:
        // openraft builds the snapshot on a task of its own.
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: snapshot_id(self.last_applied),
        };
        let (tx, rx) = oneshot::channel();
        let (path, for_copy) = (part_path(&self.dir, BUILD_PART), meta.clone());
        let started = {
            let mut state = self.shared.write();
            let State { store, unflushed, .. } = &mut *state;
            let committer = &self.shared.committer;
            let (rev, copying) = (store.revision(), self.shared.copies.begin());
            // The commit thread takes what a commit may change; the rest is
            // copied beside it (see `copies`).
            let copy = move |files: &Files| {
                copying.copy_as_of(files, rev, Part::Whole, tx, move |files, as_of| {
                    build_file(files, Some(as_of), &path, &for_copy)
                })
            };
            unflushed.commit(store, committer).and_then(|()| committer.run(copy))
        };
        let built = match started {
            Ok(()) => rx,
            // `tx` went with the copy that did not start: the build learns
            // why from a channel of its own.
            Err(e) => {
                let (failed, rx) = oneshot::channel();
                let _ = failed.send(Err(e));
                rx
            }
        };
        SnapshotBuilder {
            shared: self.shared.clone(),
            dir: self.dir.clone(),
            snapshot_file: self.snapshot_file.clone(),
            built: Some(built),
            meta,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        // A file of its own for each stream: a stream begun again while an
        // earlier one is still being installed must not touch its file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(None, &e));
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = part_path(&self.dir, &format!("{RECEIVE_PART}-{n}"));
        let (shared, dir) = (self.shared.clone(), self.dir.clone());
        let data = super::blocking(move || {
            let mut data = SnapshotData::receive_into(path.clone())?;
            // The records load as they arrive; without the loader the
            // install loads them after the last.
            let loader = std::fs::File::open(&path)
                .map_err(|e| Error::internal(format!("open received snapshot: {e}")))
                .and_then(|file| preload::Preload::start(&shared, &dir, file));
            match loader {
                Ok(loader) => data.follow(loader),
                Err(e) => tracing::warn!(error = %e, "the snapshot's records load only once it is all received"),
            }
            Ok(data)
        })
        .await
        .map_err(fail)?;
        Ok(Box::new(data))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e));
        let snapshot = if snapshot.is_expanding() {
            // A member's own snapshot handed over whole (openraft's tests
            // do): it is received as a stream is, into a file of its own.
            let mut from = snapshot;
            let mut into = self.begin_receiving_snapshot().await?;
            tokio::io::copy(&mut *from, &mut *into).await.map_err(|e| fail(Error::internal(e)))?;
            into
        } else {
            snapshot
        };
        let received = snapshot.into_file().await.map_err(|e| fail(Error::internal(e)))?;
        let (shared, meta_c) = (self.shared.clone(), meta.clone());
        let (dir, on_disk) = (self.dir.clone(), self.snapshot_file.clone());
        let data::Received { file, base, path, preload } = received;
        let installed =
            super::blocking(move || install_from(&shared, &dir, &on_disk, &meta_c, file, base, preload)).await;
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
        let bytes = installed.map_err(fail)?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.shared.note_membership(&self.membership);
        self.publish_applied();
        tracing::info!(snapshot = %meta.snapshot_id, bytes, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let (dir, on_disk) = (self.dir.clone(), self.snapshot_file.clone());
        let open = super::blocking(move || {
            // The file and the value file it points into are taken together.
            let on_disk = on_disk.lock().unwrap_or_else(|p| p.into_inner());
            let Some(open) = open_snapshot_file(&dir)? else { return Ok(None) };
            let data = match (open.values, &on_disk.values) {
                (None, _) => SnapshotData::new(open.file, open.data_at).map_err(Error::internal)?,
                (Some(id), Some(values)) if values.id() == id => {
                    SnapshotData::expanding(open.file, open.data_at, open.len, open.whole_len, values.clone())
                }
                (Some(_), _) => return Err(Error::internal("the snapshot file points into a value file not held")),
            };
            Ok(Some((open.meta, data)))
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?;
        Ok(open.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(data) }))
    }
}

/// What the member knows of its snapshot file at start. A file whose data
/// points into a value file other than the state tree's (the member stopped
/// after a defragment, before the snapshot that follows it) is built again
/// from the state, which is as of a later log id.
fn snapshot_on_disk(
    dir: &Path,
    files: &Files,
    last_applied: Option<LogId>,
    membership: &StoredMembership<NodeId, Node>,
) -> Result<OnDisk, Error> {
    let Some(open) = open_snapshot_file(dir)? else { return Ok(OnDisk::default()) };
    let last = open.meta.last_log_id;
    match open.values {
        None => return Ok(OnDisk { last, values: None }),
        Some(id) if id == files.values.id() => return Ok(OnDisk { last, values: Some(files.values.clone()) }),
        Some(_) => {}
    }
    drop(open);
    let meta = SnapshotMeta {
        last_log_id: last_applied,
        last_membership: membership.clone(),
        snapshot_id: snapshot_id(last_applied),
    };
    let path = part_path(dir, BUILD_PART);
    build_file(files, None, &path, &meta)?;
    let on_disk = std::sync::Mutex::new(OnDisk::default());
    publish_locked(dir, &path, &on_disk, last_applied, Some(files.values.clone()), false)?;
    tracing::info!(snapshot = %meta.snapshot_id, "built the snapshot again: it pointed into a value file replaced");
    Ok(on_disk.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// A snapshot's id: its last log id and when it was built, so that two
/// builds at one index (whose files may differ, as physical compaction went
/// on between them) never share an id while one is being sent.
fn snapshot_id(last_applied: Option<LogId>) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    match last_applied {
        Some(l) => format!("{}-{}-{nanos:x}", l.leader_id.term, l.index),
        None => format!("0-0-{nanos:x}"),
    }
}

/// Installs the snapshot data received from the leader into `received`
/// (from `base` on). With the work of the `preload` that followed it, and
/// that loaded every record, see [`install_loaded`]. Otherwise: checks
/// every record first, so a damaged snapshot changes nothing; makes it the
/// snapshot file; loads its records into the state tree not in use, while
/// the member goes on serving from the other; then swaps the trees under
/// the state lock, in a moment. Every step reads or writes one record, or
/// one small buffer, at a time. Returns the bytes of data received.
fn install_from(
    shared: &Shared,
    dir: &Path,
    on_disk: &std::sync::Mutex<OnDisk>,
    meta: &SnapshotMeta<NodeId, Node>,
    mut received: std::fs::File,
    base: u64,
    preload: Option<preload::Preload>,
) -> Result<u64, Error> {
    use std::io::{Seek, SeekFrom};
    let io = |e: std::io::Error| Error::internal(format!("read received snapshot: {e}"));
    let len = received.metadata().map_err(io)?.len().saturating_sub(base);
    let waited = std::time::Instant::now();
    // The state tree not in use is the loader's, or this install's, while
    // it loads.
    let (_slot, loaded) = match preload.map(preload::Preload::finish) {
        Some(Ok(p)) => (p.slot, Some(p.loaded)),
        Some(Err(e)) => {
            tracing::info!(error = %e, "the snapshot's records load again, from the file received");
            (shared.preloads.take_for_install(), None)
        }
        None => (shared.preloads.take_for_install(), None),
    };
    let waited = waited.elapsed();
    let _changing = shared.changing_db();
    let db = &shared.db();
    if let Some(loaded) = loaded {
        if loaded.usable(db, len)? {
            install_loaded(shared, dir, on_disk, meta, db, loaded, waited)?;
            return Ok(len);
        }
        tracing::info!("the snapshot's records load again: the database changed while they loaded");
        let _ = std::fs::remove_file(&loaded.own.path);
    }
    received.seek(SeekFrom::Start(base)).map_err(io)?;
    // Checked to be whole records as it is copied: a damaged one replaces
    // nothing. An installed snapshot is the leader's newest: it always
    // replaces.
    let install = part_path(dir, INSTALL_PART);
    if let Err(e) = write_file_with(&install, meta, len, |out| copy_records(&mut received, len, out)) {
        let _ = std::fs::remove_file(&install);
        return Err(e);
    }
    drop(received);
    publish_locked(dir, &install, on_disk, meta.last_log_id, None, false)?;
    let open = open_snapshot_file(dir)?.ok_or_else(|| Error::internal("the snapshot file vanished"))?;
    let (current, other) = state_trees(db)?;
    db.insert(INSTALLING, INSTALLING_FROM_FILE)?;
    db.flush()?;
    let files = fresh_files(db, dir, other)?;
    let started = std::time::Instant::now();
    // The member's own snapshot file is written as the records load: it
    // points into the new value file instead of holding every value again.
    let own_path = part_path(dir, OWN_PART);
    let mut own = Paced::writer(create_rw(&own_path)?);
    let own_at = start_file(&mut own, meta, Some(files.values.id()))?;
    let mut tee = RecordsOut::start(own)?;
    let (file, data_len) = (open.file, open.len);
    let read = |each: EachRecord<'_>| for_each_record(file, data_len, each).map(drop);
    let rebuilt = load_records(db, &files, read, Some(&mut tee))?;
    let (own, own_len, own_whole_len) = tee.finish()?;
    let mut own = Paced::into_file(own).map_err(|e| Error::internal(format!("write snapshot: {e}")))?;
    finish_file(&mut own, own_at, own_len, Some(own_whole_len))?;
    let values = files.values.clone();
    tracing::info!(records_ms = started.elapsed().as_millis() as u64, "loaded a snapshot's records");
    swap_in(shared, &files, rebuilt)?;
    use_tree(db, dir, other, current)?;
    // Until this replaces it, the file received is the snapshot: whole, and
    // as good.
    if let Err(e) = publish_locked(dir, &own_path, on_disk, meta.last_log_id, Some(values), false) {
        tracing::warn!(error = %e, "the installed snapshot is kept whole");
    }
    Ok(len)
}

/// Installs records a loader loaded as they arrived (`waited` is how long
/// the install waited for it to load the last ones). The member's own
/// snapshot file, pointing into the new value file, is written and made
/// the snapshot file first; then [`INSTALLING`] marks the tree loaded;
/// then the trees swap. A member that stops before the mark drops the new
/// tree and its value file at start, and builds its snapshot file again
/// from the state it kept; one that stops after it starts on the new tree.
fn install_loaded(
    shared: &Shared,
    dir: &Path,
    on_disk: &std::sync::Mutex<OnDisk>,
    meta: &SnapshotMeta<NodeId, Node>,
    db: &sled::Db,
    loaded: preload::LoadedRecords,
    waited: std::time::Duration,
) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let preload::LoadedRecords { other, files, rebuilt, own: records, .. } = loaded;
    let (current, _) = state_trees(db)?;
    let own_path = part_path(dir, OWN_PART);
    let written = (|| {
        let mut own = Paced::writer(create_rw(&own_path)?);
        let own_at = start_file(&mut own, meta, Some(files.values.id()))?;
        let mut from = &records.file;
        let copied = std::io::copy(&mut from, &mut own).map_err(|e| Error::internal(format!("write snapshot: {e}")))?;
        if copied != records.len {
            return Err(Error::internal(format!("{copied} bytes of records where {} were written", records.len)));
        }
        let mut own = Paced::into_file(own).map_err(|e| Error::internal(format!("write snapshot: {e}")))?;
        Ok::<_, Error>(finish_file(&mut own, own_at, records.len, Some(records.whole_len))?)
    })();
    let _ = std::fs::remove_file(&records.path);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&own_path);
        return Err(e);
    }
    publish_locked(dir, &own_path, on_disk, meta.last_log_id, Some(files.values.clone()), false)?;
    db.insert(INSTALLING, INSTALLING_LOADED)?;
    db.flush()?;
    let written = started.elapsed();
    swap_in(shared, &files, rebuilt)?;
    use_tree(db, dir, other, current)?;
    shared.preloads.used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        waited_ms = waited.as_millis() as u64,
        own_file_ms = written.as_millis() as u64,
        "installed a snapshot loaded as it arrived"
    );
    Ok(())
}

/// Makes the state in `files`, just loaded, the state in use, under the
/// state lock, in a moment.
fn swap_in(shared: &Shared, files: &Files, rebuilt: crate::mvcc::Rebuild) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let (mut new_state, _, _) = load_state(files, Some(rebuilt))?;
    tracing::info!(
        state_ms = started.elapsed().as_millis() as u64,
        keys = new_state.store.len(),
        "loaded a snapshot's state"
    );
    let mut state = shared.write_without_copies();
    // Groups of the state replaced go to the old tree, and no later one
    // may.
    shared.committer.switch(new_state.store.tree_cell())?;
    // Tokens are not in snapshots; those known go on working.
    new_state.tokens = state.tokens.clone();
    *state = new_state;
    // The snapshot may hold a pass of physical compaction cut short.
    shared.physical.send_replace(Physical { rev: state.store.physical(), failed: None });
    let _ = shared.compaction.send(());
    let rev = state.store.revision();
    let _ = shared.applied.send(Arc::new(Applied { rev, events: Vec::new() }));
    Ok(())
}

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
//! Snapshots are a copy of the whole state tree that the commit thread takes
//! between two groups while applying goes on, kept in
//! `<data-dir>/snapshot.bin` and sent by openraft in chunks.

mod apply;
mod data;
mod defrag;
mod group;
mod records;
mod snapshot;
#[cfg(test)]
mod tests;
mod view;

pub use apply::{alarm_name, reads_history, refused_by_alarm, txn_puts, txn_reads_history};
pub use data::SnapshotData;
pub use defrag::Defragmented;
pub use group::{MAX_UNFLUSHED_AGE, MAX_UNFLUSHED_WRITES};
pub use records::load_backup;
pub use snapshot::SnapshotBuilder;
pub use view::BackupFile;
pub use view::{Applied, Committed, Shared, State};

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
/// Set while a snapshot is loaded into the state tree not in use; a member
/// that stopped meanwhile loads it again at start.
const INSTALLING: &[u8] = b"installing_snapshot";
/// Names the state tree in use: one of [`STATE_TREES`] (the first if unset).
const CURRENT_TREE: &[u8] = b"state_tree";
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
    let values = ValueLog::open(&values_file(db_dir, name))?;
    Ok(Files { tree: db.open_tree(name)?, values: Arc::new(values) })
}

/// An empty state tree, and value file, in place of the one not in use.
fn fresh_files(db: &sled::Db, data_dir: &Path, name: &str) -> Result<Files, Error> {
    db.drop_tree(name)?;
    let values = ValueLog::create(&values_path(data_dir, name)?)?;
    Ok(Files { tree: db.open_tree(name)?, values: Arc::new(values) })
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
    /// The last log id of the snapshot in the snapshot file.
    snapshot_file: Arc<std::sync::Mutex<Option<LogId>>>,
}

impl StateMachine {
    /// Opens the state machine kept in `db`; `dir` holds the snapshot file.
    /// Finishes a snapshot install that a crash interrupted.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<Self, Error> {
        remove_leftovers(dir)?;
        let (current, other) = state_trees(db)?;
        let (current, rebuilt) = if db.get(INSTALLING)?.is_some() {
            let open = open_snapshot_file(dir)?
                .ok_or_else(|| Error::internal("snapshot install was interrupted and its file is gone"))?;
            let rebuilt = load_records(db, &fresh_files(db, dir, other)?, open.file, open.len)?;
            use_tree(db, dir, other, current)?;
            (other, Some(rebuilt))
        } else {
            // What a load cut short left behind.
            drop_files(db, dir, other)?;
            (current, None)
        };
        let files = open_files(db, dir, current)?;
        let (state, last_applied, membership) = load_state(&files, rebuilt)?;
        let on_disk = read_snapshot_meta(dir)?.and_then(|meta| meta.last_log_id);
        let physical = Physical { rev: state.store.physical(), failed: None };
        let (wake, woken) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            db: Arc::new(RwLock::new(db.clone())),
            db_change: std::sync::Mutex::new(()),
            committer: Committer::start(state.store.tree_cell())?,
            state: RwLock::new(state),
            applied: broadcast::channel(WATCH_BUFFER).0,
            dir: dir.to_path_buf(),
            compaction: wake,
            physical: watch::channel(physical).0,
        });
        compactor::start(Arc::downgrade(&shared), woken)?;
        Ok(StateMachine {
            shared,
            dir: dir.to_path_buf(),
            last_applied,
            membership,
            snapshot_file: Arc::new(std::sync::Mutex::new(on_disk)),
        })
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

    /// The state that request handlers read.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
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
                        let term = entry.log_id.leader_id.term;
                        let applied = apply_command(&mut state, decoded.ok(), term, &mut group, committer, false);
                        let (batch, response, events) = applied.map_err(|e| fail(entry.log_id, e))?;
                        self.shared.publish(&state, &mut group, batch, events);
                        response
                    }
                },
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
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
        self.apply_entries(entries)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The records and the last applied id must agree: every applied
        // write is committed first, and the commit thread writes the tree to
        // the file before it commits any later group. Applying goes on
        // meanwhile: openraft builds the snapshot on a task of its own.
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: snapshot_id(self.last_applied),
        };
        let (tx, rx) = oneshot::channel();
        let (path, for_copy) = (part_path(&self.dir, BUILD_PART), meta.clone());
        let copy = move |files: &Files| {
            let _ = tx.send(build_file(files, &path, &for_copy));
        };
        let started = {
            let mut state = self.shared.write();
            let State { store, unflushed, .. } = &mut *state;
            let committer = &self.shared.committer;
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
        let data = super::blocking(move || Ok(SnapshotData::receive_into(path)?)).await.map_err(fail)?;
        Ok(Box::new(data))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e));
        let received = snapshot.into_file().await.map_err(|e| fail(Error::internal(e)))?;
        let (shared, meta_c) = (self.shared.clone(), meta.clone());
        let (dir, on_disk) = (self.dir.clone(), self.snapshot_file.clone());
        let (file, base, path) = received;
        let installed = super::blocking(move || install_from(&shared, &dir, &on_disk, &meta_c, file, base)).await;
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
        installed.map_err(fail)?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let dir = self.dir.clone();
        let open = super::blocking(move || {
            let Some(open) = open_snapshot_file(&dir)? else { return Ok(None) };
            let data = SnapshotData::new(open.file, open.data_at).map_err(Error::internal)?;
            Ok(Some((open.meta, data)))
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?;
        Ok(open.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(data) }))
    }
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
/// (from `base` on): checks every record first, so a damaged snapshot
/// changes nothing; makes it the snapshot file; loads its records into the
/// state tree not in use, while the member goes on serving from the other;
/// then swaps the trees under the state lock, in a moment. Every step reads
/// or writes one record, or one small buffer, at a time.
fn install_from(
    shared: &Shared,
    dir: &Path,
    on_disk: &std::sync::Mutex<Option<LogId>>,
    meta: &SnapshotMeta<NodeId, Node>,
    mut received: std::fs::File,
    base: u64,
) -> Result<(), Error> {
    use std::io::{Seek, SeekFrom};
    let io = |e: std::io::Error| Error::internal(format!("read received snapshot: {e}"));
    let _changing = shared.changing_db();
    let db = &shared.db();
    let len = received.metadata().map_err(io)?.len().saturating_sub(base);
    received.seek(SeekFrom::Start(base)).map_err(io)?;
    for_each_record(&mut received, len, |_, _| Ok(()))?;
    // An installed snapshot is the leader's newest: it always replaces.
    received.seek(SeekFrom::Start(base)).map_err(io)?;
    let install = part_path(dir, INSTALL_PART);
    write_file_from(&install, meta, &mut received, len)?;
    drop(received);
    publish_locked(dir, &install, on_disk, meta.last_log_id, false)?;
    let open = open_snapshot_file(dir)?.ok_or_else(|| Error::internal("the snapshot file vanished"))?;
    let (current, other) = state_trees(db)?;
    db.insert(INSTALLING, &[1u8])?;
    db.flush()?;
    let files = fresh_files(db, dir, other)?;
    let started = std::time::Instant::now();
    let rebuilt = load_records(db, &files, open.file, open.len)?;
    let loaded = started.elapsed();
    let (mut new_state, _, _) = load_state(&files, Some(rebuilt))?;
    tracing::info!(
        records_ms = loaded.as_millis() as u64,
        state_ms = (started.elapsed() - loaded).as_millis() as u64,
        keys = new_state.store.len(),
        "loaded a snapshot's records"
    );
    {
        let mut state = shared.write();
        // Groups of the state replaced go to the old tree, and no later
        // one may.
        shared.committer.switch(new_state.store.tree_cell())?;
        // Tokens are not in snapshots; those known go on working.
        new_state.tokens = state.tokens.clone();
        *state = new_state;
        // The snapshot may hold a pass of physical compaction cut short.
        shared.physical.send_replace(Physical { rev: state.store.physical(), failed: None });
        let _ = shared.compaction.send(());
        let rev = state.store.revision();
        let _ = shared.applied.send(Arc::new(Applied { rev, events: Vec::new() }));
    }
    use_tree(db, dir, other, current)?;
    Ok(())
}

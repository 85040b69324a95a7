//! The Raft state machine: applies committed commands to the MVCC store.
//!
//! The effects of applied entries are committed to sled in groups, each in
//! one sled batch with the log id of its last entry, by a thread of its own
//! (see [`super::committer`]), so after a crash the store is exactly as of
//! some applied entry and openraft re-applies the rest from the log. The
//! state machine is not flushed per entry (the log is the durable record),
//! but it is flushed before a snapshot is handed to openraft, which may then
//! purge the log.
//!
//! Snapshots are a copy of the whole state tree that the commit thread takes
//! between two groups while applying goes on, kept in
//! `<data-dir>/snapshot.bin` and sent by openraft in chunks.

mod apply;
mod group;
mod records;
mod snapshot;
#[cfg(test)]
mod tests;
mod view;

pub use apply::{alarm_name, reads_history, refused_by_alarm, txn_puts, txn_reads_history};
pub use group::{MAX_UNFLUSHED_AGE, MAX_UNFLUSHED_WRITES};
pub use records::load_backup;
pub use snapshot::SnapshotBuilder;
pub use view::{Applied, Committed, Shared, State};

use self::apply::*;
use self::records::*;
use self::snapshot::*;
use self::view::*;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, OptionalSend, StorageIOError, StoredMembership};
use prost::Message;
use tokio::sync::{broadcast, oneshot, watch};

use super::committer::Committer;
use super::compactor;
use super::{decode, encode, Entry, LogId, Node, NodeId, Request, Response, StorageError, TypeConfig};
use crate::error::Error;
use crate::mvcc::keys::meta_key;
use crate::proto::kvdpb::{command, Command};

const ATTRS: u8 = b'a';
/// Prefix of an alarm's record: then the member id (8 bytes) and the alarm
/// type (4 bytes), big-endian; the value is empty.
const ALARMS: u8 = b'A';
const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT_FILE: &str = "snapshot.bin";
const INSTALLING: &[u8] = b"installing_snapshot";
/// Records one step of physical compaction reads at most: about 5 ms of
/// the commit thread, which applying may wait for. Larger steps are slower
/// per record as well: sled took 2.3 s to remove 114,000 records in one
/// batch, and 1.0 s in batches of a few hundred.
const COMPACTION_STEP: usize = 1000;

pub struct StateMachine {
    shared: Arc<Shared>,
    tree: sled::Tree,
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
        let tree = db.open_tree("state")?;
        if db.get(INSTALLING)?.is_some() {
            let stored = read_snapshot_file(dir)?
                .ok_or_else(|| Error::internal("snapshot install was interrupted and its file is gone"))?;
            load_records(db, &tree, &decode::<Records>(&stored.data)?)?;
        }
        let (state, last_applied, membership) = load_state(&tree)?;
        let on_disk = read_snapshot_meta(dir)?.and_then(|meta| meta.last_log_id);
        let physical = Physical { rev: state.store.physical(), failed: None };
        let (wake, woken) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            db: db.clone(),
            state: RwLock::new(state),
            applied: broadcast::channel(WATCH_BUFFER).0,
            committer: Committer::start(tree.clone())?,
            compaction: wake,
            physical: watch::channel(physical).0,
        });
        compactor::start(Arc::downgrade(&shared), woken)?;
        Ok(StateMachine {
            shared,
            tree,
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
        // write is committed first, and the commit thread copies the tree
        // before it commits any later group. Applying goes on meanwhile:
        // openraft builds the snapshot on a task of its own.
        let (tx, rx) = oneshot::channel();
        let copy = move |tree: &sled::Tree| {
            let _ = tx.send(copy_records(tree));
        };
        let started = {
            let mut state = self.shared.write();
            let State { store, unflushed, .. } = &mut *state;
            let committer = &self.shared.committer;
            unflushed.commit(store, committer).and_then(|()| committer.run(copy))
        };
        let records = match started {
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
            db: self.shared.db.clone(),
            dir: self.dir.clone(),
            snapshot_file: self.snapshot_file.clone(),
            records: Some(records),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e));
        let stored = StoredSnapshot { meta: meta.clone(), data: snapshot.into_inner() };
        let (shared, tree) = (self.shared.clone(), self.tree.clone());
        let (dir, on_disk) = (self.dir.clone(), self.snapshot_file.clone());
        super::blocking(move || {
            let records: Records = decode(&stored.data)?;
            // An installed snapshot is the leader's newest: it always replaces.
            write_snapshot_locked(&dir, &on_disk, &stored, false)?;
            let mut state = shared.write();
            // No group may land on top of the snapshot's records.
            shared.committer.wait_idle()?;
            load_records(&shared.db, &tree, &records)?;
            let (mut new_state, _, _) = load_state(&tree)?;
            // Tokens are not in snapshots; those known go on working.
            new_state.tokens = state.tokens.clone();
            *state = new_state;
            // The snapshot may hold a pass of physical compaction cut short.
            shared.physical.send_replace(Physical { rev: state.store.physical(), failed: None });
            let _ = shared.compaction.send(());
            let rev = state.store.revision();
            let _ = shared.applied.send(Arc::new(Applied { rev, events: Vec::new() }));
            Ok(())
        })
        .await
        .map_err(fail)?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let dir = self.dir.clone();
        let stored = super::blocking(move || Ok(read_snapshot_file(&dir)?))
            .await
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

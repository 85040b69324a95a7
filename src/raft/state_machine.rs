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

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, watch};

use super::committer::Committer;
use super::compactor;
use super::{decode, encode, Entry, LogId, Node, NodeId, Request, Response, StorageError, TypeConfig};
use crate::error::Error;
use crate::mvcc::keys::meta_key;
use crate::mvcc::{ops, txn, Batch, CompactionStep, MvccStore};
use crate::proto::etcdserverpb::{request_op, CompactionResponse, LeaseGrantResponse, LeaseRevokeResponse, TxnRequest};
use crate::proto::kvdpb::{command, command_result, Command, CommandResult, MemberAttributes};
use crate::proto::mvccpb::Event;

const ATTRS: u8 = b'a';
const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT_FILE: &str = "snapshot.bin";
const INSTALLING: &[u8] = b"installing_snapshot";
/// Records one step of physical compaction reads at most: about 5 ms of
/// the commit thread, which applying may wait for. Larger steps are slower
/// per record as well: sled took 2.3 s to remove 114,000 records in one
/// batch, and 1.0 s in batches of a few hundred.
const COMPACTION_STEP: usize = 1000;

/// What a member serves reads from: the MVCC store and the published member
/// attributes, as of the last applied entry.
pub struct State {
    /// The key-value data.
    pub store: MvccStore,
    /// Names and client URLs that members published about themselves.
    pub attrs: BTreeMap<NodeId, MemberAttributes>,
    /// Writes of applied entries not yet committed to sled (see
    /// [`Shared::read_committed`]).
    unflushed: Group,
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
const WATCH_BUFFER: usize = 1024;

/// The state shared between the state machine and the request handlers.
pub struct Shared {
    db: sled::Db,
    state: RwLock<State>,
    applied: broadcast::Sender<Arc<Applied>>,
    committer: Committer,
    /// Wakes the compaction thread; dropping it ends the thread.
    compaction: std::sync::mpsc::Sender<()>,
    /// How far physical compaction has come (see [`Shared::await_physical`]).
    physical: watch::Sender<Physical>,
}

/// How far this member has removed compacted history.
#[derive(Debug, Clone, Default)]
struct Physical {
    /// History below this revision is removed.
    rev: i64,
    /// The compacted revision whose removal last failed, and why.
    failed: Option<(i64, String)>,
}

impl Shared {
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

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    /// what `snapshot save` sends. The commit thread copies the tree between
    /// two groups, after every applied write is committed, as it does for a
    /// Raft snapshot; applying goes on meanwhile.
    pub async fn backup(&self) -> Result<(i64, Vec<u8>), Error> {
        let (tx, rx) = oneshot::channel();
        let rev = {
            let mut state = self.write();
            let State { store, unflushed, .. } = &mut *state;
            unflushed.commit(store, &self.committer)?;
            self.committer.run(move |tree| {
                let _ = tx.send(copy_records(tree));
            })?;
            store.revision()
        };
        let records = rx.await.map_err(|_| Error::internal("the commit thread ended before the copy"))??;
        Ok((rev, records))
    }

    /// The hash of history up to `rev` (0 or less: the current revision),
    /// the compacted revision it assumes, and the revision it covers (see
    /// [`crate::mvcc::hash_history`]). History is read from sled while
    /// applying goes on; a compaction applied meanwhile would change what
    /// the hash must cover, so the hash is taken again then.
    pub async fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64), Error> {
        for _ in 0..3 {
            let (tree, compacted, rev) = {
                let state = self.read_committed()?;
                let rev = state.store.check_read_rev(rev, state.store.revision())?;
                (state.store.tree().clone(), state.store.compacted(), rev)
            };
            let hash = super::blocking(move || crate::mvcc::hash_history(&tree, compacted, rev)).await?;
            if self.read().store.compacted() == compacted {
                return Ok((hash, compacted, rev));
            }
        }
        Err(Error::Timeout)
    }

    /// Runs the next step of physical compaction on the commit thread,
    /// between two groups of writes, and waits for it. False if there is
    /// nothing to do.
    pub(super) fn compaction_step(&self) -> Result<bool, Error> {
        let (step, done) = loop {
            // Waiting here, not under the state lock, keeps applying going
            // while the commit thread finishes a group.
            self.committer.wait_idle()?;
            let mut state = self.write();
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
            self.committer.run(move |tree| {
                let done = work.run(tree, COMPACTION_STEP).and_then(|(batch, next)| {
                    tree.apply_batch(batch.into_sled())?;
                    Ok(next)
                });
                let _ = tx.send(done);
            })?;
            break (step, rx);
        };
        let next = done.recv().map_err(|_| Error::internal("the commit thread ended during a compaction step"))??;
        let mut state = self.write();
        if state.store.compaction_stepped(&step, next) {
            let rev = state.store.physical();
            tracing::info!(revision = rev, "removed compacted history");
            self.physical.send_replace(Physical { rev, failed: None });
        }
        Ok(true)
    }

    /// Records that physical compaction failed, for those waiting on it.
    pub(super) fn compaction_failed(&self, e: Error) {
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
                    return Err(Error::internal(format!("physical compaction at revision {failed} failed: {why}")));
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
        super::flush(&self.db).await
    }

    /// Bytes the member's database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// The state machine openraft drives.
pub struct StateMachine {
    shared: Arc<Shared>,
    tree: sled::Tree,
    dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    /// The last log id of the snapshot in the snapshot file.
    snapshot_file: Arc<std::sync::Mutex<Option<LogId>>>,
}

/// A snapshot as the snapshot file holds it: bincode's layout of this
/// struct, the data last.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    /// Every record of the state tree (see [`copy_records`]).
    data: Vec<u8>,
}

/// The records of snapshot data, borrowed from it.
type Records<'a> = Vec<(&'a [u8], &'a [u8])>;

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
                    Ok(Command { op: Some(command::Op::Batch(b)) }) => {
                        // One response per command, encoded together.
                        let mut responses = Vec::with_capacity(b.commands.len());
                        for bytes in &b.commands {
                            let applied = apply_command(&mut state, decode_command(bytes), &mut group, committer, true);
                            let (batch, response, events) = applied.map_err(|e| fail(entry.log_id, e))?;
                            self.shared.publish(&state, &mut group, batch, events);
                            responses.push(response);
                        }
                        Response(Ok(serde_bytes::ByteBuf::from(encode(&responses).map_err(|e| fail(entry.log_id, e))?)))
                    }
                    decoded => {
                        let applied = apply_command(&mut state, decoded.ok(), &mut group, committer, false);
                        let (batch, response, events) = applied.map_err(|e| fail(entry.log_id, e))?;
                        self.shared.publish(&state, &mut group, batch, events);
                        response
                    }
                },
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    let encoded = encode(&self.membership).map_err(|e| fail(entry.log_id, e))?;
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

fn decode_command(bytes: &[u8]) -> Option<Command> {
    Command::decode(bytes).ok()
}

impl Shared {
    /// Adds one command's writes to the group and broadcasts its events.
    /// Called under the state lock, so that `subscribe` sees each revision
    /// either in the state or in the receiver.
    fn publish(&self, state: &State, group: &mut Group, batch: Batch, events: Vec<Event>) {
        group.batch.append(batch);
        if !events.is_empty() {
            let _ = self.applied.send(Arc::new(Applied { rev: state.store.revision(), events }));
        }
    }
}

/// Applied writes wait to be handed to the committer until there are this
/// many (8,192, when the commit still held the state lock, made p99 latency
/// jump).
pub const MAX_UNFLUSHED_WRITES: usize = 1024;
/// While the committer is busy, applied writes go on gathering up to this
/// many; then applying waits for it.
const MAX_GATHERED_WRITES: usize = 8 * MAX_UNFLUSHED_WRITES;
/// ... or until the oldest of them is this old (checked when entries are
/// applied).
pub const MAX_UNFLUSHED_AGE: std::time::Duration = std::time::Duration::from_millis(20);

/// The sled writes of consecutive applied entries not yet committed. They
/// are committed together with the last entry's log id, in one sled batch:
/// sled writes its log buffer out twice for every batch, which made a batch
/// per applied entry a third of a member's CPU under load. A crash loses
/// only writes whose entries are still in the Raft log, and applies them
/// again at start (the log is purged only after a snapshot, which commits).
#[derive(Default)]
struct Group {
    batch: Batch,
    /// The last entry whose writes are in `batch`.
    last: Option<LogId>,
    /// When the first write now waiting was applied.
    since: Option<std::time::Instant>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// Whether it is time to commit.
    fn due(&self) -> bool {
        self.batch.len() >= MAX_UNFLUSHED_WRITES || self.since.is_some_and(|t| t.elapsed() >= MAX_UNFLUSHED_AGE)
    }

    /// Commits every applied write now: waits for the group being committed
    /// in the background, then commits these with the last entry's log id,
    /// in one sled batch, and tells the store they are there.
    fn commit(&mut self, store: &mut MvccStore, committer: &Committer) -> Result<(), Error> {
        committer.wait_idle()?;
        store.sent();
        let Some(batch) = self.take(store)? else { return Ok(()) };
        store.tree().apply_batch(batch)?;
        store.committed();
        Ok(())
    }

    /// Hands the writes to the committer, unless it is still busy with the
    /// last group: then they go on gathering, up to [`MAX_GATHERED_WRITES`].
    fn hand_off(&mut self, store: &mut MvccStore, committer: &Committer) -> Result<(), Error> {
        if !committer.is_idle()? {
            if self.batch.len() < MAX_GATHERED_WRITES {
                return Ok(());
            }
            committer.wait_idle()?;
        }
        store.sent();
        let Some(batch) = self.take(store)? else { return Ok(()) };
        store.hand_off();
        committer.send(batch)
    }

    /// The sled batch of the writes, their revision order and the last
    /// entry's log id, if any entry was applied since the last one.
    fn take(&mut self, store: &mut MvccStore) -> Result<Option<sled::Batch>, Error> {
        let Some(last) = self.last.take() else { return Ok(None) };
        self.since = None;
        let mut batch = std::mem::take(&mut self.batch);
        store.seal(&mut batch);
        batch.insert(meta_key(APPLIED), encode(&Some(last))?);
        Ok(Some(batch.into_sled()))
    }
}

/// Whether a command goes into a log entry of its own: one that reads
/// history from sled while it is applied (a Txn with a range at a set
/// revision), which sled must then hold up to date, so the entries before it
/// are committed first and an entry is never committed in part; or a
/// compaction, since an older kvd read history to compact and refuses a
/// compaction batched with other commands.
pub fn reads_history(op: &command::Op) -> bool {
    match op {
        command::Op::Txn(t) => txn_reads_history(t),
        command::Op::Compact(_) => true,
        _ => false,
    }
}

/// Whether a Txn has a range at a set revision, at any depth.
pub fn txn_reads_history(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match &op.request {
        Some(request_op::Request::RequestRange(r)) => r.revision != 0,
        Some(request_op::Request::RequestTxn(inner)) => txn_reads_history(inner),
        _ => false,
    })
}

type Applying = (Batch, Response, Vec<Event>);

/// Applies one command. Errors a client caused come back in the `Response`;
/// an `Err` is a storage failure that leaves the member unable to go on.
/// Commands that read history first commit `group` to `tree`; `in_batch`
/// tells that earlier commands of the same entry may be in `group`, which
/// only whole entries may leave.
fn apply_command(
    state: &mut State,
    command: Option<Command>,
    group: &mut Group,
    committer: &Committer,
    in_batch: bool,
) -> Result<Applying, Error> {
    let refused = |e: Error| Ok((Batch::default(), Response(Err(e)), Vec::new()));
    let mut events = Vec::new();
    let Some(Command { op: Some(op) }) = command else {
        return refused(Error::internal("undecodable command in the log"));
    };
    if in_batch && reads_history(&op) {
        // The batcher never does this; refusing is the same on every member.
        return refused(Error::internal("a command that reads history was batched with others"));
    }
    let result = match op {
        // Batches are unpacked by the caller and never nested.
        command::Op::Batch(_) => return refused(Error::internal("a command batch inside a command batch")),
        command::Op::Put(p) => {
            if let Err(e) = ops::check_put_applies(&state.store, &p) {
                return refused(e);
            }
            let mut w = state.store.write();
            let resp = ops::put(&mut w, &p)?;
            let batch;
            (batch, events) = w.finish();
            (batch, command_result::Result::Put(resp))
        }
        command::Op::DeleteRange(d) => {
            let mut w = state.store.write();
            let resp = ops::delete_range(&mut w, &d)?;
            let batch;
            (batch, events) = w.finish();
            (batch, command_result::Result::DeleteRange(resp))
        }
        command::Op::Txn(t) => {
            if txn_reads_history(&t) {
                group.commit(&mut state.store, committer)?;
            }
            let path = match txn::plan(&state.store, &t) {
                Ok(path) => path,
                // A value that cannot be read is this member's fault, not
                // the request's: answering otherwise than the others would
                // let the members diverge.
                Err(e @ Error::Internal(_)) => return Err(e),
                Err(e) => return refused(e),
            };
            let mut w = state.store.write();
            let resp = txn::apply(&mut w, &t, &path)?;
            let batch;
            (batch, events) = w.finish();
            (batch, command_result::Result::Txn(resp))
        }
        command::Op::Compact(c) => {
            let mut batch = Batch::default();
            if let Err(e) = state.store.compact(c.revision, &mut batch) {
                return refused(e);
            }
            let header = ops::rev_header(state.store.revision());
            (batch, command_result::Result::Compact(CompactionResponse { header }))
        }
        command::Op::Publish(attrs) => {
            let mut batch = Batch::default();
            let mut key = vec![ATTRS];
            key.extend_from_slice(&attrs.id.to_be_bytes());
            batch.insert(key, attrs.encode_to_vec());
            state.attrs.insert(attrs.id, attrs);
            (batch, command_result::Result::Published(true))
        }
        command::Op::LeaseGrant(g) => {
            let mut batch = Batch::default();
            if !state.store.grant_lease(g.id, g.ttl, &mut batch) {
                return refused(Error::LeaseExist);
            }
            let header = ops::rev_header(state.store.revision());
            (
                batch,
                command_result::Result::LeaseGrant(LeaseGrantResponse {
                    header,
                    id: g.id,
                    ttl: g.ttl,
                    error: String::new(),
                }),
            )
        }
        command::Op::LeaseRevoke(r) => {
            let mut w = state.store.write();
            if !w.revoke_lease(r.id) {
                return refused(Error::LeaseNotFound);
            }
            let header = ops::rev_header(w.revision());
            let batch;
            (batch, events) = w.finish();
            let header = if events.is_empty() { ops::rev_header(state.store.revision()) } else { header };
            (batch, command_result::Result::LeaseRevoke(LeaseRevokeResponse { header }))
        }
    };
    let (batch, result) = result;
    let encoded = CommandResult { result: Some(result) }.encode_to_vec();
    Ok((batch, Response(Ok(serde_bytes::ByteBuf::from(encoded))), events))
}

type Loaded = (State, Option<LogId>, StoredMembership<NodeId, Node>);

fn load_state(tree: &sled::Tree) -> Result<Loaded, Error> {
    let read = |name: &str| tree.get(meta_key(name));
    let last_applied = match read(APPLIED)? {
        Some(v) => decode(&v)?,
        None => None,
    };
    let membership = match read(MEMBERSHIP)? {
        Some(v) => decode(&v)?,
        None => StoredMembership::default(),
    };
    let mut attrs = BTreeMap::new();
    for item in tree.scan_prefix([ATTRS]) {
        let (_, v) = item?;
        let a =
            MemberAttributes::decode(v.as_ref()).map_err(|e| Error::internal(format!("corrupt member record: {e}")))?;
        attrs.insert(a.id, a);
    }
    let store = MvccStore::open(tree.clone())?;
    Ok((State { store, attrs, unflushed: Group::default() }, last_applied, membership))
}

/// Every record of the state tree, as snapshot data: the layout bincode
/// gives a `Vec<(ByteBuf, ByteBuf)>` (a count, then each key and value as a
/// length and its bytes; integers u64 little-endian), which members of
/// every kvd version read. Written straight from the tree, so that the
/// records are held once while a snapshot is built, not twice.
fn copy_records(tree: &sled::Tree) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; 8];
    let mut count = 0u64;
    for item in tree.iter() {
        let (k, v) = item?;
        for part in [&k[..], &v[..]] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(part);
        }
        count += 1;
    }
    out[..8].copy_from_slice(&count.to_le_bytes());
    Ok(out)
}

/// Whether a record of the state tree belongs to the cluster that wrote it
/// rather than to its data: the last applied log id, the membership and the
/// members' published attributes.
fn is_cluster_record(key: &[u8]) -> bool {
    key.first() == Some(&ATTRS) || key == meta_key(APPLIED) || key == meta_key(MEMBERSHIP)
}

/// Writes the data records of `records` (snapshot data, as [`Shared::backup`]
/// copies it) into the state tree of `db`, a new data directory's, and
/// flushes it. The records of the cluster it came from are left out, so a
/// member started on the directory with `--initial-cluster-state new` forms
/// a new cluster that holds the data: its first revision is the next one.
pub fn load_backup(db: &sled::Db, records: &[u8]) -> Result<(), Error> {
    let records: Records = decode(records)?;
    let tree = db.open_tree("state")?;
    if !tree.is_empty() {
        return Err(Error::internal("the state tree is not empty"));
    }
    insert_in_batches(&tree, records.into_iter().filter(|(k, _)| !is_cluster_record(k)))?;
    db.flush()?;
    Ok(())
}

/// Records written to sled in one batch while a snapshot is loaded: a
/// batch holds a copy of what it writes, so a whole snapshot in one would
/// hold the data once more.
const LOAD_BATCH_BYTES: usize = 16 << 20;

/// Replaces the state tree with `records`, marking the install in progress so
/// that a crash midway is finished at the next start.
fn load_records(db: &sled::Db, tree: &sled::Tree, records: &Records<'_>) -> Result<(), Error> {
    db.insert(INSTALLING, &[1u8])?;
    db.flush()?;
    tree.clear()?;
    insert_in_batches(tree, records.iter().copied())?;
    db.flush()?;
    db.remove(INSTALLING)?;
    db.flush()?;
    Ok(())
}

/// Inserts `records` into `tree`, [`LOAD_BATCH_BYTES`] at a time.
fn insert_in_batches<'a>(
    tree: &sled::Tree,
    records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<(), Error> {
    let mut batch = sled::Batch::default();
    let mut bytes = 0;
    for (k, v) in records {
        batch.insert(k, v);
        bytes += k.len() + v.len();
        if bytes >= LOAD_BATCH_BYTES {
            tree.apply_batch(std::mem::take(&mut batch))?;
            bytes = 0;
        }
    }
    tree.apply_batch(batch)?;
    Ok(())
}

/// A snapshot's metadata.
type Meta = SnapshotMeta<NodeId, Node>;

/// The snapshot file, opened, with the metadata at its start read.
fn open_snapshot_file(dir: &Path) -> Result<Option<(Meta, std::io::BufReader<std::fs::File>)>, Error> {
    let io = |e: std::io::Error| Error::internal(format!("read snapshot: {e}"));
    let file = match std::fs::File::open(dir.join(SNAPSHOT_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut reader = std::io::BufReader::new(file);
    let meta = bincode::deserialize_from(&mut reader).map_err(|e| Error::internal(format!("read snapshot: {e}")))?;
    Ok(Some((meta, reader)))
}

/// The metadata of the snapshot in the snapshot file, without its data.
fn read_snapshot_meta(dir: &Path) -> Result<Option<Meta>, Error> {
    Ok(open_snapshot_file(dir)?.map(|(meta, _)| meta))
}

fn read_snapshot_file(dir: &Path) -> Result<Option<StoredSnapshot>, Error> {
    use std::io::{Read, Seek};
    let io = |e: std::io::Error| Error::internal(format!("read snapshot: {e}"));
    let Some((meta, mut reader)) = open_snapshot_file(dir)? else { return Ok(None) };
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    // The length must be what the file holds, before it is allocated.
    let at = reader.stream_position().map_err(io)?;
    let size = reader.get_ref().metadata().map_err(io)?.len();
    if size.checked_sub(at) != Some(len) {
        return Err(Error::internal(format!(
            "read snapshot: the file says {len} bytes of data and holds {}",
            size.saturating_sub(at)
        )));
    }
    let mut data = vec![0u8; usize::try_from(len).map_err(|_| Error::internal("read snapshot: too large"))?];
    reader.read_exact(&mut data).map_err(io)?;
    Ok(Some(StoredSnapshot { meta, data }))
}

/// Writes `stored` as the snapshot file, under the lock that builds and
/// installs share. With `only_if_newer` it keeps a file that already holds a
/// later snapshot: a snapshot built from an older state can finish after a
/// newer one was installed from the leader, and must not replace it (the log
/// before the newer one may already be purged). Returns whether it wrote.
fn write_snapshot_locked(
    dir: &Path,
    on_disk: &std::sync::Mutex<Option<LogId>>,
    stored: &StoredSnapshot,
    only_if_newer: bool,
) -> Result<bool, Error> {
    let mut on_disk = on_disk.lock().unwrap_or_else(|p| p.into_inner());
    if only_if_newer && on_disk.is_some() && *on_disk >= stored.meta.last_log_id {
        return Ok(false);
    }
    write_snapshot_file(dir, stored)?;
    *on_disk = stored.meta.last_log_id;
    Ok(true)
}

fn write_snapshot_file(dir: &Path, stored: &StoredSnapshot) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::internal(format!("write snapshot: {e}"));
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    {
        use std::io::Write;
        // bincode's layout of the struct, written in parts so that the data
        // is not copied.
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&encode(&stored.meta)?).map_err(io)?;
        f.write_all(&(stored.data.len() as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&stored.data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE)).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Builds a snapshot from a copy of the state taken between two applies.
pub struct SnapshotBuilder {
    db: sled::Db,
    dir: PathBuf,
    snapshot_file: Arc<std::sync::Mutex<Option<LogId>>>,
    /// The state's records as the commit thread copies them, or why they
    /// could not be copied; taken by the build.
    records: Option<oneshot::Receiver<Result<Vec<u8>, Error>>>,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(None, &e));
        let copied = self.records.take().ok_or_else(|| fail(Error::internal("the snapshot was built already")))?;
        let records = copied.await.unwrap_or_else(|_| Err(Error::internal("the commit thread ended before the copy")));
        let data = records.map_err(fail)?;
        // The log up to the snapshot may be purged once it is returned, so the
        // applied state must be on disk first.
        super::flush(&self.db).await.map_err(fail)?;
        let (last_applied, membership) = (self.last_applied, self.membership.clone());
        let (dir, on_disk) = (self.dir.clone(), self.snapshot_file.clone());
        let (stored, written) = super::blocking(move || {
            let id = match last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, data.len()),
                None => format!("0-0-{}", data.len()),
            };
            let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id: id };
            let stored = StoredSnapshot { meta, data };
            let written = write_snapshot_locked(&dir, &on_disk, &stored, true)?;
            Ok((stored, written))
        })
        .await
        .map_err(fail)?;
        let StoredSnapshot { meta, data } = stored;
        if written {
            tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        } else {
            tracing::info!(snapshot = %meta.snapshot_id, "built snapshot is older than the one on disk; kept that one");
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
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
            let (new_state, _, _) = load_state(&tree)?;
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
        let stored = super::blocking(move || read_snapshot_file(&dir))
            .await
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnResponse};
    use openraft::storage::RaftStateMachine;
    use openraft::testing::log_id;

    fn put(key: &str, value: &str) -> Command {
        let p = PutRequest { key: key.into(), value: value.into(), ..Default::default() };
        Command { op: Some(command::Op::Put(p)) }
    }

    /// A Txn that reads `key` at `revision`.
    fn read_at(key: &str, revision: i64) -> Command {
        let r = RangeRequest { key: key.into(), revision, ..Default::default() };
        let op = RequestOp { request: Some(request_op::Request::RequestRange(r)) };
        Command { op: Some(command::Op::Txn(TxnRequest { compare: vec![], success: vec![op], failure: vec![] })) }
    }

    fn entry(index: u64, command: Command) -> Entry {
        Entry { log_id: log_id(1, 1, index), payload: EntryPayload::Normal(Request(command.encode_to_vec())) }
    }

    fn batch(index: u64, commands: Vec<Command>) -> Entry {
        let commands = commands.iter().map(|c| c.encode_to_vec()).collect();
        entry(index, Command { op: Some(command::Op::Batch(crate::proto::kvdpb::CommandBatch { commands })) })
    }

    fn result(response: &Response) -> command_result::Result {
        let bytes = response.0.as_ref().expect("applied");
        CommandResult::decode(bytes.as_slice()).expect("result").result.expect("some result")
    }

    fn values(txn: command_result::Result) -> Vec<Vec<u8>> {
        let command_result::Result::Txn(TxnResponse { responses, .. }) = txn else { panic!("not a txn: {txn:?}") };
        responses
            .into_iter()
            .flat_map(|r| match r.response {
                Some(crate::proto::etcdserverpb::response_op::Response::ResponseRange(r)) => r.kvs,
                other => panic!("not a range: {other:?}"),
            })
            .map(|kv| kv.value)
            .collect()
    }

    #[tokio::test]
    async fn history_reads_see_every_earlier_entry_and_are_never_batched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        // Entry 1 writes revisions 2 and 3; entry 2, applied in the same
        // call, reads revision 3 from history: it must see entry 1.
        let out = sm.apply(vec![batch(1, vec![put("a", "1"), put("a", "2")]), entry(2, read_at("a", 3))]).await;
        let out = out.expect("apply");
        assert_eq!(values(result(&out[1])), vec![b"2".to_vec()]);
        // Within a batch, a history read could only see part of its own
        // entry; every member refuses it alike.
        let out = sm.apply(vec![batch(3, vec![put("a", "3"), read_at("a", 4)])]).await.expect("apply");
        let list: Vec<Response> = decode(out[0].0.as_ref().expect("batch applied")).expect("responses");
        assert!(matches!(result(&list[0]), command_result::Result::Put(_)));
        assert!(matches!(&list[1].0, Err(Error::Internal(m)) if m.contains("batched")), "{:?}", list[1].0);
    }

    #[tokio::test]
    async fn handed_off_writes_are_read_from_memory_until_sled_has_them() {
        use crate::mvcc::keys::RangeEnd;
        let dir = tempfile::tempdir().expect("tempdir");
        let n = MAX_UNFLUSHED_WRITES; // two sled writes per put: a hand-off is due
        let key = |i: usize| format!("k{i:05}");
        {
            let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
            let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
            let puts = (0..n).map(|i| put(&key(i), &i.to_string())).collect();
            sm.apply(vec![batch(1, puts)]).await.expect("apply");
            let shared = sm.shared();
            {
                let state = shared.read();
                assert!(state.unflushed.is_empty(), "the group was not handed off");
                assert!(state.store.is_sending());
                // Every value reads at once, from memory or from sled.
                let kvs = state.store.current_kvs(b"k", &RangeEnd::Before(b"l".to_vec())).expect("read");
                let got: Vec<Vec<u8>> = kvs.into_iter().map(|kv| kv.value).collect();
                assert_eq!(got, (0..n).map(|i| i.to_string().into_bytes()).collect::<Vec<_>>());
            }
            // A command that reads history waits for the group on its way.
            let out = sm.apply(vec![entry(2, read_at(&key(0), 2))]).await.expect("apply");
            assert_eq!(values(result(&out[0])), vec![b"0".to_vec()]);
            // So does a read of history.
            let state = shared.read_committed().expect("commit");
            assert!(!state.store.is_sending());
            let old = state.store.at_revision(key(n - 1).as_bytes(), &RangeEnd::Single, n as i64 + 1).expect("read");
            assert_eq!(
                old.iter().map(|kv| kv.value.clone()).collect::<Vec<_>>(),
                vec![(n - 1).to_string().into_bytes()]
            );
            drop(state);
            db.flush().expect("flush");
        }
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let sm = StateMachine::open(&db, dir.path()).expect("state machine");
        assert_eq!(sm.last_applied().map(|l| l.index), Some(2));
        assert_eq!(sm.shared().read().store.len(), n);
    }

    #[tokio::test]
    async fn applied_writes_wait_for_a_commit_and_are_read_from_disk_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entries = || vec![batch(1, vec![put("a", "1"), put("b", "2")]), entry(2, put("a", "3"))];
        {
            let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
            let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
            sm.apply(entries()).await.expect("apply");
            db.flush().expect("flush");
        }
        // Not committed yet: the member starts from before them, and
        // applies them again from the log.
        {
            let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
            let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
            assert_eq!(sm.last_applied(), None);
            assert!(sm.shared().read().store.is_empty());
            sm.apply(entries()).await.expect("apply again");
            // A read of history commits them.
            let shared = sm.shared();
            assert!(matches!(shared.read_committed().expect("commit"), Committed::Written(_)));
            assert!(matches!(shared.read_committed().expect("commit"), Committed::Read(_)));
            db.flush().expect("flush");
        }
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let sm = StateMachine::open(&db, dir.path()).expect("state machine");
        assert_eq!(sm.last_applied().map(|l| l.index), Some(2));
        let shared = sm.shared();
        let state = shared.read();
        let kvs = state.store.current_kvs(b"a", &crate::mvcc::keys::RangeEnd::Before(b"c".to_vec())).expect("read");
        let got: Vec<(&[u8], &[u8], i64)> = kvs.iter().map(|kv| (&kv.key[..], &kv.value[..], kv.version)).collect();
        assert_eq!(got, vec![(&b"a"[..], &b"3"[..], 2), (&b"b"[..], &b"2"[..], 1)]);
    }

    #[test]
    fn snapshot_data_and_file_keep_the_layout_every_kvd_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
        for (k, v) in [(&b"a"[..], &b"1"[..]), (b"bb", b""), (b"\xff", &[7u8; 300][..])] {
            tree.insert(k, v).expect("insert");
        }
        // The data as bincode gives the records' list, as older members wrote it.
        let data = copy_records(&tree).expect("copy");
        let listed: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> = tree
            .iter()
            .map(|item| {
                item.map(|(k, v)| (serde_bytes::ByteBuf::from(k.to_vec()), serde_bytes::ByteBuf::from(v.to_vec())))
            })
            .collect::<Result<_, _>>()
            .expect("iter");
        assert_eq!(data, encode(&listed).expect("encode"));
        let records: Records = decode(&data).expect("decode");
        assert_eq!(records.len(), 3);
        assert_eq!(records[2], (&b"\xff"[..], &[7u8; 300][..]));
        // The file as bincode gives the whole struct.
        let meta = SnapshotMeta { last_log_id: Some(log_id(2, 1, 9)), snapshot_id: "2-9".into(), ..Default::default() };
        let stored = StoredSnapshot { meta: meta.clone(), data };
        write_snapshot_file(dir.path(), &stored).expect("write");
        let file = std::fs::read(dir.path().join(SNAPSHOT_FILE)).expect("read");
        assert_eq!(file, encode(&stored).expect("encode"));
        assert_eq!(read_snapshot_meta(dir.path()).expect("meta"), Some(meta));
        let back = read_snapshot_file(dir.path()).expect("read").expect("a snapshot");
        assert_eq!(back.data, stored.data);
        // A file cut short, or one that claims more data than it holds, is
        // refused, not read past its end.
        std::fs::write(dir.path().join(SNAPSHOT_FILE), &file[..file.len() - 1]).expect("cut");
        assert!(read_snapshot_file(dir.path()).is_err());
        let mut bad = file.clone();
        let at = file.len() - stored.data.len() - 8;
        bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(dir.path().join(SNAPSHOT_FILE), &bad).expect("corrupt");
        assert!(read_snapshot_file(dir.path()).is_err());
        std::fs::write(dir.path().join(SNAPSHOT_FILE), &file[..5]).expect("cut");
        assert!(read_snapshot_meta(dir.path()).is_err());
    }

    #[tokio::test]
    async fn an_install_cut_short_by_a_crash_is_finished_at_start() {
        use openraft::storage::RaftSnapshotBuilder;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        sm.apply(vec![batch(1, vec![put("a", "1"), put("b", "2")])]).await.expect("apply");
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");

        // The snapshot file is written and the tree half replaced when the
        // member stops.
        let other = tempfile::tempdir().expect("tempdir");
        {
            let db2 = super::super::open_sled(&sled::Config::new().path(other.path().join("db"))).expect("sled");
            let stored = StoredSnapshot { meta: snapshot.meta.clone(), data: snapshot.snapshot.into_inner() };
            write_snapshot_file(other.path(), &stored).expect("write");
            db2.insert(INSTALLING, &[1u8]).expect("mark");
            db2.open_tree("state").expect("tree").insert(b"junk", b"x").expect("junk");
            db2.flush().expect("flush");
        }
        let db2 = super::super::open_sled(&sled::Config::new().path(other.path().join("db"))).expect("sled");
        let sm2 = StateMachine::open(&db2, other.path()).expect("state machine");
        assert_eq!(db2.get(INSTALLING).expect("get"), None);
        assert_eq!(sm2.tree.get(b"junk").expect("get"), None);
        assert_eq!(sm2.last_applied(), snapshot.meta.last_log_id);
        let shared = sm2.shared();
        let state = shared.read();
        let kvs = state.store.current_kvs(b"", &crate::mvcc::keys::RangeEnd::Unbounded).expect("read");
        let got: Vec<(&[u8], &[u8])> = kvs.iter().map(|kv| (&kv.key[..], &kv.value[..])).collect();
        assert_eq!(got, vec![(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"2"[..])]);
    }

    /// The history records of `key` in the state tree.
    fn versions(tree: &sled::Tree, key: &[u8]) -> usize {
        tree.scan_prefix(crate::mvcc::keys::hist_prefix(key)).count()
    }

    async fn physical(shared: &Shared, rev: i64) {
        let wait = tokio::time::timeout(std::time::Duration::from_secs(60), shared.await_physical(rev));
        wait.await.expect("physical compaction took over a minute").expect("physical compaction");
    }

    #[tokio::test]
    async fn compacted_history_is_removed_in_steps_after_the_compaction_is_applied() {
        use crate::proto::etcdserverpb::CompactionRequest;
        // Versions of one key, more than one step reads.
        let n = 3 * COMPACTION_STEP;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        sm.apply(vec![batch(1, (0..n).map(|i| put("k", &i.to_string())).collect())]).await.expect("apply");
        let rev = n as i64 + 1;
        let compact =
            |revision| Command { op: Some(command::Op::Compact(CompactionRequest { revision, physical: false })) };
        let out = sm.apply(vec![entry(2, compact(rev - 10))]).await.expect("apply");
        assert!(matches!(result(&out[0]), command_result::Result::Compact(_)));
        // A second compaction before the first is done takes over its pass.
        let out = sm.apply(vec![entry(3, compact(rev))]).await.expect("apply");
        assert!(matches!(result(&out[0]), command_result::Result::Compact(_)));
        let shared = sm.shared();
        physical(&shared, rev).await;
        assert_eq!(versions(&sm.tree, b"k"), 1, "only the version at the compacted revision is left");
        assert_eq!(shared.read().store.physical(), rev);
    }

    #[tokio::test]
    async fn a_member_that_stopped_before_compacted_history_was_removed_removes_it_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rev = {
            // A compaction applied and committed, none of its history
            // removed yet: what a member leaves when it stops midway.
            let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
            let tree = db.open_tree("state").expect("tree");
            let mut store = MvccStore::open(tree.clone()).expect("store");
            let mut batch = Batch::default();
            for i in 0..100 {
                let mut w = store.write();
                w.put(b"k", i.to_string().into_bytes(), 0);
                batch.append(w.finish().0);
            }
            let rev = store.revision();
            store.compact(rev, &mut batch).expect("compact");
            store.seal(&mut batch);
            tree.apply_batch(batch.into_sled()).expect("commit");
            assert!(store.compaction_step().is_some());
            db.flush().expect("flush");
            rev
        };
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let sm = StateMachine::open(&db, dir.path()).expect("state machine");
        physical(&sm.shared(), rev).await;
        assert_eq!(versions(&sm.tree, b"k"), 1);
    }

    #[tokio::test]
    async fn a_snapshot_holds_the_entry_it_names_though_later_ones_are_applied_before_it_is_built() {
        use openraft::storage::RaftSnapshotBuilder;
        let n = MAX_UNFLUSHED_WRITES;
        let key = |i: usize| format!("k{i:05}");
        let puts = |value: &str| (0..n).map(|i| put(&key(i), value)).collect::<Vec<_>>();
        let dir = tempfile::tempdir().expect("tempdir");
        let db = super::super::open_sled(&sled::Config::new().path(dir.path().join("db"))).expect("sled");
        let mut sm = StateMachine::open(&db, dir.path()).expect("state machine");
        sm.apply(vec![batch(1, puts("a"))]).await.expect("apply");
        let mut builder = sm.get_snapshot_builder().await;
        // Applying goes on while the tree is copied: a group large enough
        // to be handed off, and one more entry.
        sm.apply(vec![batch(2, puts("b"))]).await.expect("apply");
        sm.apply(vec![entry(3, put("late", "x"))]).await.expect("apply");
        let snapshot = builder.build_snapshot().await.expect("build");
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(1));

        let other = tempfile::tempdir().expect("tempdir");
        let db2 = super::super::open_sled(&sled::Config::new().path(other.path().join("db"))).expect("sled");
        let mut sm2 = StateMachine::open(&db2, other.path()).expect("state machine");
        sm2.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
        let shared = sm2.shared();
        let state = shared.read();
        assert_eq!(state.store.revision(), n as i64 + 1);
        let kvs = state.store.current_kvs(b"", &crate::mvcc::keys::RangeEnd::Unbounded).expect("read");
        assert_eq!(kvs.len(), n, "only the keys of entry 1");
        assert!(kvs.iter().all(|kv| kv.value == b"a" && kv.version == 1), "values of entry 1 only");
    }
}

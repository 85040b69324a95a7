//! The state tree's records: loading the state at start, copying every
//! record for a snapshot or a backup, and loading them back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use openraft::StoredMembership;
use prost::Message;

use super::super::{decode, LogId, Node, NodeId};
use super::group::Group;
use super::snapshot::SnapshotFileError;
use super::view::State;
use super::{ALARMS, APPLIED, ATTRS, MEMBERSHIP, STATE_TREES};
use crate::auth::AUTH;
use crate::error::Error;
use crate::mvcc::changes::{OLD_CHANGES, RUNS};
use crate::mvcc::keys::{hist_rev, meta_key, parse_rev_key, HIST, LEASE, META};
use crate::mvcc::packs::PACKED;
use crate::mvcc::values::{decode_whole, whole_len, whole_record};
use crate::mvcc::Batch;
use crate::mvcc::{Files, MvccStore, Rebuild};
use crate::proto::kvdpb::MemberAttributes;
use crate::proto::mvccpb::KeyValue;

pub(super) type Loaded = (State, Option<LogId>, StoredMembership<NodeId, Node>);

/// What takes each record of snapshot data, key and value, in turn.
pub(super) type EachRecord<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<(), Error>;

/// Loads the state kept in `tree`. With `rebuilt`, the store's in-memory
/// part comes from the records just loaded into `tree` (see
/// [`load_records`]) instead of a pass over the tree.
pub(super) fn load_state(files: &Files, rebuilt: Option<Rebuild>) -> Result<Loaded, Error> {
    let tree = &files.tree;
    // Records loaded from snapshot data were checked as they were read.
    if rebuilt.is_none() {
        refuse_unknown_kinds(tree)?;
    }
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
    let mut alarms = BTreeSet::new();
    for item in tree.scan_prefix([ALARMS]) {
        let (k, _) = item?;
        alarms.insert(parse_alarm_key(&k).ok_or_else(|| Error::internal("corrupt alarm record"))?);
    }
    let store = match rebuilt {
        Some(rebuild) => MvccStore::open_rebuilt(files.clone(), rebuild)?,
        None => MvccStore::open(files.clone())?,
    };
    let auth = crate::auth::AuthState::load(tree)?;
    let state = State { store, attrs, alarms, auth, tokens: Default::default(), unflushed: Group::default() };
    Ok((state, last_applied, membership))
}

/// Writes records as snapshot data to `out`, from where it stands: the
/// layout bincode gives a `Vec<(ByteBuf, ByteBuf)>` (a count, then each key
/// and value as a length and its bytes; integers u64 little-endian), which
/// members of every kvd version read. One record at a time: nothing
/// proportional to the data is held.
pub(super) struct RecordsOut<W: Write + Seek> {
    out: W,
    start: u64,
    count: u64,
    /// The data's length so far.
    len: u64,
    /// What the data's length will be once every value kept apart in it
    /// is put back in place (see [`write_state`]).
    whole_len: u64,
}

fn write_io(e: std::io::Error) -> Error {
    Error::internal(format!("write snapshot data: {e}"))
}

impl<W: Write + Seek> RecordsOut<W> {
    pub(super) fn start(mut out: W) -> Result<Self, Error> {
        let start = out.stream_position().map_err(write_io)?;
        out.write_all(&0u64.to_le_bytes()).map_err(write_io)?;
        Ok(RecordsOut { out, start, count: 0, len: 8, whole_len: 8 })
    }

    /// Writes the record `k`, whose value `v` is as the state tree holds
    /// it: a history record's value may be kept apart.
    pub(super) fn record(&mut self, k: &[u8], v: &[u8]) -> Result<(), Error> {
        let whole = match k.first() {
            Some(&HIST) => whole_len(v)?,
            _ => v.len(),
        };
        for part in [k, v] {
            self.out.write_all(&(part.len() as u64).to_le_bytes()).map_err(write_io)?;
            self.out.write_all(part).map_err(write_io)?;
        }
        self.count += 1;
        self.len += 16 + (k.len() + v.len()) as u64;
        self.whole_len += 16 + (k.len() + whole) as u64;
        Ok(())
    }

    /// Fills in the count and leaves `out` after the data. Returns it, the
    /// data's length, and that length with every value in place.
    pub(super) fn finish(mut self) -> Result<(W, u64, u64), Error> {
        self.out.seek(SeekFrom::Start(self.start)).map_err(write_io)?;
        self.out.write_all(&self.count.to_le_bytes()).map_err(write_io)?;
        self.out.seek(SeekFrom::Start(self.start + self.len)).map_err(write_io)?;
        Ok((self.out, self.len, self.whole_len))
    }
}

/// Writes every record of the state tree to `out` as snapshot data (see
/// [`RecordsOut`]) that every kvd version reads: a history record goes
/// whole, its value read from the value file if it is kept there. Returns
/// `out` and the data's length in bytes.
///
/// With `as_of`, the tree as it stood when that was taken, while later
/// groups are committed; without, the tree as it is, while nothing is.
pub(super) fn write_records<W: Write + Seek>(files: &Files, as_of: Option<&AsOf>, out: W) -> Result<(W, u64), Error> {
    let mut records = RecordsOut::start(out)?;
    each_record(files, as_of, |k, v| match k.first() {
        Some(&HIST) => records.record(k, &whole_record(v, &files.values)?),
        _ => records.record(k, v),
    })?;
    let (out, len, _) = records.finish()?;
    Ok((out, len))
}

/// Writes every record of the state tree to `out` as it is in the tree:
/// a history record whose value is kept apart names where the value is in
/// the tree's value file, instead of holding it. This is the member's own
/// snapshot file, which a value file of many GiB would otherwise double;
/// what is sent from it has every value put back in place (see
/// [`super::data::SnapshotData`]). Returns `out`, the data's length, and
/// its length with every value in place.
/// `as_of` as for [`write_records`].
pub(super) fn write_state<W: Write + Seek>(
    files: &Files,
    as_of: Option<&AsOf>,
    out: W,
) -> Result<(W, u64, u64), Error> {
    let mut records = RecordsOut::start(out)?;
    each_record(files, as_of, |k, v| records.record(k, v))?;
    records.finish()
}

/// Hands `each` every record of the state tree in key order: as it stood
/// when `as_of` was taken, or, without, as it is.
fn each_record(
    files: &Files,
    as_of: Option<&AsOf>,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    match as_of {
        Some(as_of) => as_of.for_each(files, each),
        None => {
            // History as history records, packed or not; packs themselves
            // are never copied.
            for item in files.tree.range(..vec![HIST]) {
                let (k, v) = item?;
                each(&k, &v)?;
            }
            for item in files.history().all() {
                let version = item?;
                each(&version.rec, &version.stored)?;
            }
            for item in files.tree.range(vec![HIST + 1]..vec![PACKED]) {
                let (k, v) = item?;
                each(&k, &v)?;
            }
            for item in files.tree.range(vec![PACKED + 1]..) {
                let (k, v) = item?;
                each(&k, &v)?;
            }
            Ok(())
        }
    }
}

/// The prefixes of records that never change once written, each with the
/// revision it was written at (history, packs of history and runs of
/// revision order), in key order. Physical compaction removes them, and a
/// defragment or an install replaces the tree; none of these runs while a
/// copy is under way (see [`super::copies`]).
const BY_REVISION: [u8; 3] = [HIST, PACKED, RUNS];

/// Hands `each` every record of `tree` that a commit may change (those
/// outside [`BY_REVISION`]'s prefixes), in key order.
pub(super) fn each_changeable_record(
    tree: &sled::Tree,
    mut each: impl FnMut(sled::IVec, sled::IVec) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut from: Vec<u8> = Vec::new();
    for p in BY_REVISION {
        for item in tree.range(from.as_slice()..&[p][..]) {
            let (k, v) = item?;
            each(k, v)?;
        }
        from = vec![p + 1];
    }
    for item in tree.range(from.as_slice()..) {
        let (k, v) = item?;
        each(k, v)?;
    }
    Ok(())
}

/// The revision a record of one of [`BY_REVISION`]'s prefixes was written
/// at: the last eight bytes of a history record's key, the eight after the
/// prefix of a run's or a pack's (its first change or version; each holds
/// changes or versions of one committed group only).
fn written_at(k: &[u8]) -> Option<i64> {
    match k.first() {
        Some(&HIST) => hist_rev(k),
        Some(&RUNS) | Some(&PACKED) => parse_rev_key(k).map(|(rev, _)| rev),
        _ => None,
    }
}

/// The state tree as it stood between two commits, for a copy made while
/// later groups are committed (see [`super::copies`]): every record a
/// commit may change (metadata, leases, auth, members' attributes,
/// alarms: a few per lease and per user), taken then, and the revision
/// then, past which history and revision-order records are left out.
pub(super) struct AsOf {
    rev: i64,
    /// Empty for a copy of history alone ([`Part::History`]).
    fixed: Vec<(sled::IVec, sled::IVec)>,
    /// Whether the copy should end early.
    stopping: Box<dyn Fn() -> bool + Send + Sync>,
}

/// What a copy as of a revision holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// Every record: a snapshot or a backup.
    Whole,
    /// History and revision-order records only: a defragment, which takes
    /// the records a commit may change at its switch.
    History,
}

impl AsOf {
    /// Takes the records a commit may change, if `part` holds them. On the
    /// commit thread, between two groups: `rev` is the store's revision once
    /// the last group committed is applied. The copy ends early, with an
    /// error, if the member stops meanwhile.
    pub(super) fn take(
        tree: &sled::Tree,
        rev: i64,
        part: Part,
        copying: &super::copies::Copying,
    ) -> Result<AsOf, Error> {
        let mut fixed = Vec::new();
        if part == Part::Whole {
            each_changeable_record(tree, |k, v| {
                fixed.push((k, v));
                Ok(())
            })?;
        }
        Ok(AsOf { rev, fixed, stopping: Box::new(copying.stop_check()) })
    }

    /// The revision it stands at.
    pub(super) fn rev(&self) -> i64 {
        self.rev
    }

    /// Hands `each` every record of `tree` as it stood (of its [`Part`]),
    /// in key order.
    /// History goes as history records, packed or not: packs themselves
    /// are never copied.
    pub(super) fn for_each(
        &self,
        files: &Files,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut fixed = self.fixed.iter().peekable();
        for p in BY_REVISION {
            while let Some((k, v)) = fixed.next_if(|(k, _)| k.as_ref() < &[p][..]) {
                each(k, v)?;
            }
            let records: Box<dyn Iterator<Item = Result<(sled::IVec, sled::IVec), Error>>> = match p {
                HIST => Box::new(files.history().all().map(|v| v.map(|v| (v.rec, v.stored)))),
                PACKED => continue,
                _ => Box::new(files.tree.scan_prefix([p]).map(|item| item.map_err(Error::from))),
            };
            for (n, item) in records.enumerate() {
                if n % 1024 == 0 && (self.stopping)() {
                    return Err(Error::Stopped);
                }
                let (k, v) = item?;
                if written_at(&k).is_none_or(|at| at <= self.rev) {
                    each(&k, &v)?;
                }
            }
        }
        for (k, v) in fixed {
            each(k, v)?;
        }
        Ok(())
    }
}

/// Reads `len` bytes of snapshot data from `from` and hands each record to
/// `each`, one at a time: only one record is ever in memory. The data must
/// be exactly as [`write_records`] lays it out, no byte more or less; a
/// length is checked against what is left before anything is allocated for
/// it. Returns the number of records.
pub(super) fn for_each_record(
    from: impl Read,
    len: u64,
    each: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<u64, Error> {
    let (count, read) = read_records(from.take(len), |_, end| Ok(end <= len), each)?;
    if read != len {
        return Err(damaged(format!("{} bytes after the last of {count} records", len - read)));
    }
    Ok(count)
}

fn damaged(why: String) -> Error {
    Error::internal(format!("damaged snapshot data: {why}"))
}

/// Reads the records of snapshot data from `from`, which may still be
/// arriving, and hands each to `each`; returns how many there were and the
/// bytes they took. Before anything is allocated for a length, `holds`
/// says whether the data reaches that far: `holds(from, end)` answers
/// whether it has at least `end` bytes, and may wait for them to arrive.
/// Bytes after the last record are left unread: the caller checks the
/// length.
pub(super) fn read_records<R: Read>(
    from: R,
    mut holds: impl FnMut(&mut R, u64) -> Result<bool, Error>,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
) -> Result<(u64, u64), Error> {
    let mut r = BufReader::with_capacity(1 << 20, from);
    let mut at = 0u64;
    let read_u64 = |r: &mut BufReader<R>, at: &mut u64| -> Result<u64, Error> {
        let mut n = [0u8; 8];
        r.read_exact(&mut n).map_err(|e| damaged(format!("{e} (after {at} bytes)")))?;
        *at += 8;
        Ok(u64::from_le_bytes(n))
    };
    let count = read_u64(&mut r, &mut at)?;
    let (mut key, mut value) = (Vec::new(), Vec::new());
    for _ in 0..count {
        for part in [&mut key, &mut value] {
            let n = read_u64(&mut r, &mut at)?;
            let end = match at.checked_add(n) {
                Some(end) if holds(r.get_mut(), end)? => end,
                _ => return Err(damaged(format!("a record of {n} bytes where the data ends before it"))),
            };
            part.resize(n as usize, 0);
            r.read_exact(part).map_err(|e| damaged(e.to_string()))?;
            at = end;
        }
        known_kind(&key)?;
        each(&key, &value)?;
    }
    Ok((count, at))
}

/// The first byte of each kind of record a state tree holds, in byte order:
/// alarms, auth, members' attributes, history, leases, metadata, the
/// per-change records of an older kvd, and runs of revision order. A new
/// kind of record goes here in the same change that writes it, or a
/// member refuses its own data directory at its next start.
const KINDS: [u8; 9] = [ALARMS, AUTH, ATTRS, HIST, LEASE, META, PACKED, OLD_CHANGES, RUNS];

/// Refuses a record of a kind this kvd does not know. Such a record comes
/// from a newer kvd, whose layout this one cannot read: loaded, or skipped,
/// it would leave a store that lacks what the record holds and serves as
/// if it were whole.
fn known_kind(key: &[u8]) -> Result<(), Error> {
    match key.first() {
        // Snapshot data holds history as history records, never packs.
        Some(kind) if KINDS.contains(kind) && *kind != PACKED => Ok(()),
        _ => Err(newer_layout("snapshot data holds", key, "use that version or a newer one")),
    }
}

/// The error for a record of a kind this kvd does not know, found where
/// `found` says; `then` says what to do.
fn newer_layout(found: &str, key: &[u8], then: &str) -> Error {
    let kind = match key.first() {
        Some(b) => format!("its key begins with byte 0x{b:02x}"),
        None => "its key is empty".into(),
    };
    Error::internal(format!(
        "{found} a record of a kind this kvd does not know ({kind}): it was written by a newer kvd, whose \
         storage layout this version cannot read; {then}"
    ))
}

/// Refuses a state tree that holds a record of a kind this kvd does not
/// know (see [`known_kind`]): a data directory a newer kvd wrote. It looks
/// only between and around the known kinds, a few lookups whatever the
/// tree's size.
pub(super) fn refuse_unknown_kinds(tree: &sled::Tree) -> Result<(), Error> {
    let mut from: Vec<u8> = Vec::new();
    let mut found = None;
    for kind in KINDS {
        if let Some(item) = tree.range(from.as_slice()..&[kind][..]).next() {
            found = Some(item?.0);
            break;
        }
        from = vec![kind + 1];
    }
    if found.is_none() {
        if let Some(item) = tree.range(from.as_slice()..).next() {
            found = Some(item?.0);
        }
    }
    match found {
        None => Ok(()),
        Some(key) => {
            Err(newer_layout("the data directory holds", &key, "run the version that wrote it, or a newer one"))
        }
    }
}

/// Copies `len` bytes of snapshot data from `from` to `to`, checking as it
/// goes that they are whole records, in one pass; answers how many it
/// copied.
pub(super) fn copy_records(from: impl Read, len: u64, to: &mut dyn Write) -> Result<u64, Error> {
    let mut copying = Copying { from, to, failed: None };
    let checked = for_each_record(&mut copying, len, |_, _| Ok(()));
    // A failed write ends the reading too: say which it was.
    if let Some(source) = copying.failed {
        return Err(SnapshotFileError::Io { what: "write", source }.into());
    }
    checked.map(|_| len)
}

/// A reader that writes what it reads to `to`.
struct Copying<'a, R> {
    from: R,
    to: &'a mut dyn Write,
    /// Why writing failed.
    failed: Option<std::io::Error>,
}

impl<R: Read> Read for Copying<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.from.read(buf)?;
        if let Err(e) = self.to.write_all(&buf[..n]) {
            let kind = e.kind();
            self.failed = Some(e);
            return Err(std::io::Error::new(kind, "writing the copy failed"));
        }
        Ok(n)
    }
}

/// Whether a record of the state tree belongs to the cluster that wrote it
/// rather than to its data: the last applied log id, the membership, the
/// members' published attributes and the alarms raised for them.
pub(super) fn is_cluster_record(key: &[u8]) -> bool {
    matches!(key.first(), Some(&ATTRS) | Some(&ALARMS)) || key == meta_key(APPLIED) || key == meta_key(MEMBERSHIP)
}

/// The record key of the alarm `alarm` of member `member`.
pub(super) fn alarm_key(member: NodeId, alarm: i32) -> Vec<u8> {
    let mut key = vec![ALARMS];
    key.extend_from_slice(&member.to_be_bytes());
    key.extend_from_slice(&alarm.to_be_bytes());
    key
}

fn parse_alarm_key(key: &[u8]) -> Option<(NodeId, i32)> {
    let member: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    let alarm: [u8; 4] = key.get(9..13)?.try_into().ok()?;
    (key.len() == 13).then(|| (NodeId::from_be_bytes(member), i32::from_be_bytes(alarm)))
}

/// Writes the data records of snapshot data (`len` bytes of `records`,
/// as [`Shared::backup`] writes them) into the state tree of `db`, a new
/// data directory's, and flushes it. The records of the cluster it came
/// from are left out, so a member started on the directory with
/// `--initial-cluster-state new` forms a new cluster that holds the data:
/// its first revision is the next one.
pub fn load_backup(db: &sled::Db, db_dir: &Path, records: impl Read, len: u64) -> Result<Files, Error> {
    let files = super::open_files_in(db, db_dir, STATE_TREES[0])?;
    if !files.tree.is_empty() {
        return Err(Error::internal("the state tree is not empty"));
    }
    let mut batch = Batches::new(&files)?;
    for_each_record(records, len, |k, v| if is_cluster_record(k) { Ok(()) } else { batch.insert_whole(k, v) })?;
    batch.finish()?;
    db.flush()?;
    Ok(files)
}

/// Records written to sled in one batch while a snapshot is loaded. sled
/// keeps memory in proportion to the batches it is given: loading 100 MB
/// of 1 KiB values left a process at 28 MB resident with batches of
/// 256 KiB, 40 MB with 1 MiB, 63 MB with 2 MiB and 140 MB with 4 MiB.
pub(super) const LOAD_BATCH_BYTES: usize = 256 << 10;

/// Writes the records of snapshot data into `files`, empty ones, and
/// flushes them. `read` hands each record to the function it is given (see
/// [`for_each_record`] and [`read_records`]). Returns what the records say of
/// the store's in-memory part, for [`load_state`].
///
/// With `tee`, each record is also written there as the tree holds it (see
/// [`write_state`]).
pub(super) fn load_records<W: Write + Seek>(
    db: &sled::Db,
    files: &Files,
    read: impl FnOnce(EachRecord<'_>) -> Result<(), Error>,
    tee: Option<&mut RecordsOut<W>>,
) -> Result<Rebuild, Error> {
    let mut batch = Batches::teeing(files, tee)?;
    let mut rebuild = Rebuild::default();
    read(&mut |k, v| {
        if k.first() != Some(&HIST) {
            rebuild.record(k, v)?;
            return batch.insert(k, v);
        }
        // Decoded once, for the index and for the value file.
        let kv = decode_whole(v)?;
        rebuild.version((k.len() + v.len()) as u64, &kv);
        batch.insert_version(k, &kv)
    })?;
    batch.finish()?;
    db.flush()?;
    Ok(rebuild)
}

/// Inserts records into a store's files, [`LOAD_BATCH_BYTES`] at a time,
/// keeping large values apart as a write does (see
/// [`crate::mvcc::values`]). The value file is synced once, at the end:
/// the files are not in use until they are whole.
///
/// sled takes each batch on a thread of its own while the next one is
/// decoded and its values written, so that the two halves of a load run
/// side by side rather than in turn.
pub(super) struct Batches<'f, W: Write + Seek = std::fs::File> {
    files: &'f Files,
    batch: Batch,
    bytes: usize,
    /// Where each record is also written, as the tree holds it.
    tee: Option<&'f mut RecordsOut<W>>,
    sled: Applier,
}

impl<'f> Batches<'f> {
    pub(super) fn new(files: &'f Files) -> Result<Self, Error> {
        Batches::teeing(files, None)
    }
}

/// A thread that applies batches to a sled tree in the order given. One
/// insert at a time instead of sled's atomic batches, which a tree not in
/// use does not need, caught up 10% faster but left sled's files larger: a
/// defragmented store of 30,000 keys of 1 KiB took 88 MB instead of 54.
/// A second thread is no faster: the records come in key order, so every
/// insert goes to the same leaf of sled's tree.
struct Applier {
    /// Batches for the thread; one waits while it applies another.
    tx: Option<std::sync::mpsc::SyncSender<sled::Batch>>,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
}

impl Applier {
    fn start(tree: sled::Tree) -> Result<Applier, Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<sled::Batch>(1);
        let thread = std::thread::Builder::new()
            .name("kvd-load".into())
            .spawn(move || {
                for batch in rx {
                    tree.apply_batch(batch)?;
                }
                Ok(())
            })
            .map_err(|e| Error::internal(format!("starting a thread to load records: {e}")))?;
        Ok(Applier { tx: Some(tx), thread: Some(thread) })
    }

    /// Hands `batch` to the thread; fails with the error that stopped it.
    fn apply(&mut self, batch: sled::Batch) -> Result<(), Error> {
        let sent = match &self.tx {
            Some(tx) => tx.send(batch).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The thread ended, which it does only on an error.
            self.finish()?;
            Err(Error::internal("the thread loading records ended early"))
        }
    }

    /// Waits until every batch given is applied.
    fn finish(&mut self) -> Result<(), Error> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(Error::internal("the thread loading records panicked")),
        }
    }
}

impl Drop for Applier {
    /// A load given up on still waits for the batch under way: the tree is
    /// not left to a thread that outlives the load.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl<'f, W: Write + Seek> Batches<'f, W> {
    /// Batches into `files`, each record also written to `tee` if given.
    pub(super) fn teeing(files: &'f Files, tee: Option<&'f mut RecordsOut<W>>) -> Result<Self, Error> {
        Ok(Batches { files, batch: Batch::default(), bytes: 0, tee, sled: Applier::start(files.tree.clone())? })
    }

    /// Inserts a record as snapshot data holds it: a history record whole.
    pub(super) fn insert_whole(&mut self, k: &[u8], v: &[u8]) -> Result<(), Error> {
        match k.first() {
            Some(&HIST) => self.insert_version(k, &decode_whole(v)?),
            _ => self.insert(k, v),
        }
    }

    /// Inserts the history record `k` of the version `kv`.
    pub(super) fn insert_version(&mut self, k: &[u8], kv: &KeyValue) -> Result<(), Error> {
        self.batch.insert_version(k.to_vec(), kv);
        self.added(k.len() + kv.key.len() + kv.value.len())
    }

    /// Inserts any other record.
    pub(super) fn insert(&mut self, k: &[u8], v: &[u8]) -> Result<(), Error> {
        self.batch.insert(k, v);
        self.added(k.len() + v.len())
    }

    fn added(&mut self, bytes: usize) -> Result<(), Error> {
        self.bytes += bytes;
        if self.bytes >= LOAD_BATCH_BYTES {
            self.apply()?;
        }
        Ok(())
    }

    fn apply(&mut self) -> Result<(), Error> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.separate_values(&self.files.values)?;
        if let Some(tee) = self.tee.as_mut() {
            for (k, v) in batch.inserts() {
                tee.record(k, v)?;
            }
        }
        self.sled.apply(batch.into_sled())?;
        self.bytes = 0;
        Ok(())
    }

    /// Inserts what is left, waits for sled to have every batch, and syncs
    /// the value file.
    pub(super) fn finish(mut self) -> Result<(), Error> {
        self.apply()?;
        self.sled.finish()?;
        self.files.values.sync()
    }
}

//! The Raft log and vote, in append-only segment files of kvd's own
//! (`<data-dir>/log/`), not in sled: an append is one `pwrite` and a batch of
//! appends is made durable by one `fdatasync` (DESIGN.md §3).
//!
//! - A segment `<first index, 20 digits>.log` holds records back to back:
//!   `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`, the
//!   payload being the bincode-encoded entry. A new segment starts past
//!   [`SEGMENT_BYTES`].
//! - A segment's file is allocated [`PREALLOC_BYTES`] ahead of its records
//!   (`posix_fallocate`, zeros). An `fdatasync` of a write that does not
//!   grow the file has no file size to commit, and on ext4 it took 90–115 µs
//!   instead of 140–155 µs on the machine kvd is measured on. Records end at
//!   the first header whose length is zero when nothing but zeros follows; a
//!   full segment is trimmed to its records.
//! - `append` writes the batch at once (readers see it when it returns) and
//!   hands its callback to a flusher thread, which covers every batch queued
//!   meanwhile with one `fdatasync` and only then tells openraft (group
//!   commit). No write is acknowledged before it is on disk. When the member
//!   handles at most one client write, `append` syncs on the calling thread
//!   instead: no other write waits for that worker (a read may, for the
//!   length of one `fdatasync`). The two thread wake-ups of the hand-off (on
//!   the leader and a follower, in series) had made a lone put's p50 1.19 ms
//!   against 1.04 ms with the sync in place.
//! - The vote and the purge point are small files replaced atomically
//!   (write, fsync, rename, fsync the directory). The vote is written after
//!   the log file is synced, so log and vote writes reach disk in order.
//! - At start every record is checked. A damaged record at the end of the
//!   last segment is a write torn by a crash and is cut off; damage anywhere
//!   else refuses the start, rather than serving a log that lost entries.
//!
//! The whole log store is this module, so it can be measured and changed on
//! its own.

// openraft's StorageError is large by design; the trait fixes the error type.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use tokio::sync::{mpsc, watch};

use super::{decode, encode, CodecError, Entry, LogId, NodeId, StorageError, TypeConfig, WritesInFlight};
use crate::error::Error;
use crate::metrics::Histogram;

mod files;
#[cfg(test)]
mod tests;

use files::{check_record, create_segment, preallocate, read_small_file, scan_segment, segment_name, write_small_file};

/// Bytes of log records one AppendEntries carries at most, or one record
/// if that alone is larger: well within the peer message limit
/// ([`super::network::message_limit`]), which fits any one entry. A member
/// catching up holds a few such messages at once, decoded, on both sides
/// (etcd's leader sends at most 1 MiB per message too): one that replayed
/// 95,000 puts of 256 bytes peaked at 139-153 MB, against 174-183 MB with
/// 4 MiB.
pub const REPLICATION_BATCH_BYTES: u64 = 1024 * 1024;

/// Bytes of committed log records that may wait to be applied before an
/// append waits for applying (see [`LogStore::pace_by`]).
pub const APPLY_BACKLOG_BYTES: u64 = 4 * 1024 * 1024;

/// A segment grows to about this size before the next one starts.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// A segment's file is allocated this far past its last record.
pub const PREALLOC_BYTES: u64 = 8 * 1024 * 1024;
/// The largest record accepted when reading (a bound on what a corrupt length
/// field can make the reader allocate).
const MAX_RECORD_BYTES: u32 = 256 * 1024 * 1024;
const HEADER_BYTES: u64 = 8;
const VOTE_FILE: &str = "vote";
const PURGED_FILE: &str = "purged";

/// Where one entry's record is.
#[derive(Clone, Copy)]
struct Loc {
    log_id: LogId,
    /// The segment's first index (its key in `segments`).
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Bytes of valid records.
    len: u64,
    /// The file's size: `len` and the zeros allocated past it.
    allocated: u64,
}

struct Inner {
    /// Segments by the first index they were created for.
    segments: BTreeMap<u64, Segment>,
    /// The entry locations after the purge point, in index order.
    locs: VecDeque<Loc>,
    purged: Option<LogId>,
    vote: Option<Vote<NodeId>>,
}

impl Inner {
    fn last_log_id(&self) -> Option<LogId> {
        self.locs.back().map(|l| l.log_id).or(self.purged)
    }

    fn active(&mut self) -> Option<(&u64, &mut Segment)> {
        self.segments.iter_mut().next_back()
    }
}

struct SharedLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

impl SharedLog {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the records of the entries after index `after` up to `upto`
    /// hold more than `limit` bytes.
    fn records_over(&self, after: u64, upto: u64, limit: u64) -> bool {
        let inner = self.lock();
        let from = inner.locs.partition_point(|l| l.log_id.index <= after);
        let mut bytes = 0u64;
        for loc in inner.locs.range(from..).take_while(|l| l.log_id.index <= upto) {
            bytes += HEADER_BYTES + u64::from(loc.len);
            if bytes > limit {
                return true;
            }
        }
        false
    }
}

/// The Raft log of one member; clones share it (and read it concurrently).
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<SharedLog>,
    flusher: mpsc::UnboundedSender<(Arc<File>, LogFlushed<TypeConfig>)>,
    writes: WritesInFlight,
    /// How long each sync of appended entries took.
    fsync: Arc<Histogram>,
    /// The last index openraft reported committed.
    committed: Arc<AtomicU64>,
    /// What appends wait on while applying lags, once set.
    pace: Option<Pace>,
}

/// See [`LogStore::pace_by`].
#[derive(Clone)]
struct Pace {
    applied: watch::Receiver<u64>,
    longest: std::time::Duration,
}

/// What can go wrong with the Raft log on disk. Every variant is a failure
/// of this member's storage, which a client sees as an internal error.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file operation failed; `what` names the operation and the file.
    #[error("{what}: {source}")]
    Io {
        /// The operation and its file.
        what: String,
        /// What the system answered.
        #[source]
        source: std::io::Error,
    },
    /// A record or file is damaged, or the log is not in a state kvd leaves
    /// it in; the text says which and where.
    #[error("{0}")]
    Damaged(String),
    /// An entry or the vote could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Reading the log an older kvd kept in sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
}

impl LogError {
    /// A damaged record or file, or a log in a state kvd never leaves it in.
    pub fn damaged(why: impl std::fmt::Display) -> Self {
        LogError::Damaged(why.to_string())
    }
}

impl From<LogError> for Error {
    fn from(e: LogError) -> Error {
        Error::internal(e)
    }
}

pub(super) fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> LogError {
    LogError::Io { what: what.to_string(), source: e }
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, checking every record, and starts
    /// its flusher thread.
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(format!("create {}", dir.display()), e))?;
        let vote = read_small_file(&dir.join(VOTE_FILE))?;
        let purged: Option<LogId> = read_small_file(&dir.join(PURGED_FILE))?;
        let mut names = Vec::new();
        for item in std::fs::read_dir(dir).map_err(|e| io_err(format!("list {}", dir.display()), e))? {
            let name = item.map_err(|e| io_err("list log dir", e))?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(".log").and_then(|n| n.parse::<u64>().ok()) {
                names.push(first);
            }
        }
        names.sort_unstable();
        let mut inner = Inner { segments: BTreeMap::new(), locs: VecDeque::new(), purged, vote };
        let count = names.len();
        for (i, first) in names.into_iter().enumerate() {
            let path = dir.join(segment_name(first));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_err(format!("open {}", path.display()), e))?;
            let (len, allocated) = scan_segment(&file, &path, first, i + 1 == count, &mut inner)?;
            inner.segments.insert(first, Segment { file: Arc::new(file), path, len, allocated });
        }
        if inner.segments.is_empty() {
            let first = purged.map_or(0, |p| p.index + 1);
            let seg = create_segment(dir, first)?;
            inner.segments.insert(first, seg);
        }
        let shared = Arc::new(SharedLog { dir: dir.to_path_buf(), inner: Mutex::new(inner) });
        let (flusher, pending) = mpsc::unbounded_channel();
        let fsync = Arc::new(Histogram::default());
        let timed = fsync.clone();
        std::thread::Builder::new()
            .name("kvd-log-flush".into())
            .spawn(move || flush_loop(pending, &timed))
            .map_err(|e| io_err("start the log flusher", e))?;
        Ok(LogStore {
            shared,
            flusher,
            writes: WritesInFlight::default(),
            fsync,
            committed: Arc::default(),
            pace: None,
        })
    }

    /// Has each append first wait, for at most `longest`, while the
    /// entries committed but not yet applied (by `applied`, the state
    /// machine's last applied index) hold more than [`APPLY_BACKLOG_BYTES`]
    /// of records.
    ///
    /// openraft acknowledges entries once they are in the log and hands
    /// every committed entry to the state machine at once, read back and
    /// decoded; it does not wait for applying. A member catching up by the
    /// log appends faster than it applies, and every entry between was held
    /// in memory: replaying 300,000 puts of 256 bytes, a member peaked at
    /// 220 MB without this wait and 186-191 MB with it (the others held
    /// 103-106 MB).
    ///
    /// Holding the append back holds back its acknowledgement, and so the
    /// leader's next AppendEntries. `longest` must stay well inside the
    /// leader's AppendEntries timeout (its heartbeat interval): past it the
    /// append goes on, so a state machine that cannot apply (a defragment
    /// holds its commit thread) slows appends but never stops them.
    pub fn pace_by(&mut self, applied: watch::Receiver<u64>, longest: std::time::Duration) {
        self.pace = Some(Pace { applied, longest });
    }

    /// Waits as [`LogStore::pace_by`] says.
    async fn let_applying_catch_up(&mut self) {
        let Some(pace) = self.pace.as_mut() else { return };
        let committed = self.committed.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + pace.longest;
        loop {
            let applied = *pace.applied.borrow_and_update();
            if committed <= applied || !self.shared.records_over(applied, committed, APPLY_BACKLOG_BYTES) {
                return;
            }
            match tokio::time::timeout_at(deadline, pace.applied.changed()).await {
                Ok(Ok(())) => {}
                // Out of time, or the state machine is gone.
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// Where to purge the log so that of its entries up to `upto` (those a
    /// snapshot covers) at most `keep_entries` entries and `keep_bytes`
    /// bytes of records stay: the last index to purge, or `None` when no
    /// entry past the purge point need go.
    pub fn purge_point(&self, upto: u64, keep_entries: u64, keep_bytes: u64) -> Option<u64> {
        let inner = self.shared.lock();
        let end = inner.locs.partition_point(|l| l.log_id.index <= upto);
        let mut kept_bytes = 0u64;
        for (kept, loc) in inner.locs.range(..end).rev().enumerate() {
            kept_bytes += HEADER_BYTES + u64::from(loc.len);
            if kept as u64 >= keep_entries || kept_bytes > keep_bytes {
                return Some(loc.log_id.index);
            }
        }
        None
    }

    /// The durations of the syncs that make appended entries durable.
    pub fn fsync_histogram(&self) -> Arc<Histogram> {
        self.fsync.clone()
    }

    /// The count of client writes in flight that `append` looks at; the
    /// member's proposal queues keep it.
    pub fn writes_in_flight(&self) -> WritesInFlight {
        self.writes.clone()
    }

    /// Moves a log kept in sled by earlier kvd versions (trees `raft_log` and
    /// `raft_meta` of `db`) into this store, when this store is empty, and
    /// drops the old trees.
    pub fn import_from_sled(&mut self, db: &sled::Db) -> Result<(), LogError> {
        let (log, meta) = (db.open_tree("raft_log")?, db.open_tree("raft_meta")?);
        if log.is_empty() && meta.is_empty() {
            return Ok(());
        }
        {
            let inner = self.shared.lock();
            if !inner.locs.is_empty() || inner.vote.is_some() {
                return Err(LogError::damaged("raft log found both in sled and in the log directory"));
            }
        }
        if let Some(v) = meta.get(b"vote")? {
            self.write_vote(&decode(&v)?)?;
        }
        if let Some(p) = meta.get(b"last_purged")? {
            let p: LogId = decode(&p)?;
            self.purge_to(p)?;
        }
        let mut entries = Vec::new();
        for item in log.iter() {
            entries.push(decode::<Entry>(&item?.1)?);
        }
        let count = entries.len();
        let file = self.write_entries(entries)?;
        file.sync_data().map_err(|e| io_err("sync imported log", e))?;
        drop((log, meta));
        db.drop_tree("raft_log")?;
        db.drop_tree("raft_meta")?;
        tracing::info!(entries = count, "moved the raft log out of sled into the log directory");
        Ok(())
    }

    /// Writes entries after the last one; returns the file to sync.
    fn write_entries(&self, entries: impl IntoIterator<Item = Entry>) -> Result<Arc<File>, LogError> {
        let mut inner = self.shared.lock();
        let mut buf = Vec::new();
        let mut locs = Vec::new();
        let (&segment, active) = inner.active().ok_or_else(|| LogError::damaged("no active log segment"))?;
        let base = active.len;
        for entry in entries {
            let payload = encode(&entry)?;
            let len = u32::try_from(payload.len()).map_err(|_| LogError::damaged("log entry over 4 GiB"))?;
            locs.push(Loc { log_id: entry.log_id, segment, offset: base + buf.len() as u64, len });
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        let end = base + buf.len() as u64;
        if end > active.allocated {
            active.allocated = preallocate(&active.file, active.allocated, end + PREALLOC_BYTES).max(end);
        }
        active.file.write_all_at(&buf, base).map_err(|e| io_err(format!("append to {}", active.path.display()), e))?;
        active.len = end;
        let file = active.file.clone();
        let full = active.len >= SEGMENT_BYTES;
        if full {
            // The zeros past the records are not needed any more.
            active.file.set_len(end).map_err(|e| io_err(format!("trim {}", active.path.display()), e))?;
            active.allocated = end;
        }
        inner.locs.extend(locs);
        if full {
            // The next segment starts after this one is durable, so that one
            // fdatasync of the newest file always covers every earlier write.
            file.sync_all().map_err(|e| io_err("sync a full log segment", e))?;
            let next = inner.last_log_id().map_or(0, |l| l.index + 1);
            let seg = create_segment(&self.shared.dir, next)?;
            inner.segments.insert(next, seg);
        }
        Ok(file)
    }

    fn write_vote(&self, vote: &Vote<NodeId>) -> Result<(), LogError> {
        let mut inner = self.shared.lock();
        if let Some((_, active)) = inner.active() {
            active.file.sync_data().map_err(|e| io_err("sync the log before the vote", e))?;
        }
        write_small_file(&self.shared.dir, VOTE_FILE, &encode(vote)?)?;
        inner.vote = Some(*vote);
        Ok(())
    }

    fn purge_to(&self, log_id: LogId) -> Result<(), LogError> {
        let mut inner = self.shared.lock();
        if inner.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        // The purge point is recorded first: a crash before the files go
        // leaves entries that are merely unused, never a gap.
        write_small_file(&self.shared.dir, PURGED_FILE, &encode(&log_id)?)?;
        inner.purged = Some(log_id);
        while inner.locs.front().is_some_and(|l| l.log_id.index <= log_id.index) {
            inner.locs.pop_front();
        }
        // Whole segments before the first kept entry go. When nothing is
        // kept, the log starts afresh in a segment named after the purge
        // point, so that indexes in every segment stay consecutive.
        let keep_from = match inner.locs.front() {
            Some(l) => l.segment,
            None => {
                let next = log_id.index + 1;
                if let std::collections::btree_map::Entry::Vacant(e) = inner.segments.entry(next) {
                    let seg = create_segment(&self.shared.dir, next)?;
                    e.insert(seg);
                }
                next
            }
        };
        let gone: Vec<u64> = inner.segments.range(..keep_from).map(|(k, _)| *k).collect();
        let gone: Vec<PathBuf> =
            gone.into_iter().filter_map(|first| inner.segments.remove(&first)).map(|s| s.path).collect();
        drop(inner);
        // Removing segments of 64 MiB takes ext4 long enough to hold up
        // openraft's core, which calls this: in three runs of the keys curve
        // at 100,000 keys, linearizable reads measured around a purge had a
        // p99 of 62 and 71 ms in two, 12-14 ms once the files went on a
        // thread of their own. A file left by a crash before it went holds
        // only entries before the purge point, and the next purge after a
        // start removes it; so does one a thread could not be started for:
        // the purge itself is done, and does not fail for want of it.
        if !gone.is_empty() {
            let spawned = std::thread::Builder::new().name("kvd-log-purge".into()).spawn(move || {
                for path in gone {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove a purged log segment");
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "purged log segments are left until the next start");
            }
        }
        Ok(())
    }

    fn truncate_from(&self, index: u64) -> Result<(), LogError> {
        let mut inner = self.shared.lock();
        let pos = inner.locs.partition_point(|l| l.log_id.index < index);
        let Some(&cut) = inner.locs.get(pos) else { return Ok(()) };
        inner.locs.truncate(pos);
        // Later segments go whole; the segment holding the first removed
        // entry is cut at its record and becomes the active one.
        let later: Vec<u64> = inner.segments.range(cut.segment + 1..).map(|(k, _)| *k).collect();
        for first in later {
            if let Some(seg) = inner.segments.remove(&first) {
                std::fs::remove_file(&seg.path).map_err(|e| io_err(format!("remove {}", seg.path.display()), e))?;
            }
        }
        let seg = inner.segments.get_mut(&cut.segment).ok_or_else(|| LogError::damaged("log segment missing"))?;
        seg.file.set_len(cut.offset).map_err(|e| io_err(format!("truncate {}", seg.path.display()), e))?;
        seg.file.sync_data().map_err(|e| io_err(format!("sync {}", seg.path.display()), e))?;
        seg.len = cut.offset;
        seg.allocated = cut.offset;
        Ok(())
    }

    /// The entries of indexes `start..end`, those there are; with `budget`,
    /// only the first of them whose records take at most `budget` bytes
    /// (always at least one).
    fn read(&self, start: u64, end: Option<u64>, budget: Option<u64>) -> Result<Vec<Entry>, LogError> {
        // Locations are taken under the lock; the reads happen outside it.
        let runs: Vec<(Arc<File>, Vec<Loc>)> = {
            let inner = self.shared.lock();
            let from = inner.locs.partition_point(|l| l.log_id.index < start);
            let to = end.map_or(inner.locs.len(), |e| inner.locs.partition_point(|l| l.log_id.index < e));
            let mut runs: Vec<(Arc<File>, Vec<Loc>)> = Vec::new();
            let mut taken = 0u64;
            for loc in inner.locs.range(from.min(to)..to) {
                taken += HEADER_BYTES + loc.len as u64;
                if budget.is_some_and(|b| taken > b) && !runs.is_empty() {
                    break;
                }
                match runs.last_mut() {
                    Some((_, locs)) if locs[0].segment == loc.segment => locs.push(*loc),
                    _ => {
                        let seg =
                            inner.segments.get(&loc.segment).ok_or_else(|| LogError::damaged("log segment missing"))?;
                        runs.push((seg.file.clone(), vec![*loc]));
                    }
                }
            }
            runs
        };
        let mut out = Vec::new();
        for (file, locs) in runs {
            // Records of one segment are contiguous: one read covers them.
            let begin = locs[0].offset;
            let last = locs[locs.len() - 1];
            let mut buf = vec![0u8; (last.offset + HEADER_BYTES + last.len as u64 - begin) as usize];
            file.read_exact_at(&mut buf, begin).map_err(|e| io_err("read the raft log", e))?;
            for loc in locs {
                let at = (loc.offset - begin) as usize;
                let payload = check_record(&buf[at..]).ok_or_else(|| {
                    LogError::damaged(format!("raft log record of index {} is damaged", loc.log_id.index))
                })?;
                out.push(decode(payload)?);
            }
        }
        Ok(out)
    }
}

/// Completes appends once they are durable: one fdatasync for every append
/// queued up meanwhile. It runs on its own thread (the sync blocks) and ends
/// when every `LogStore` handle is dropped.
fn flush_loop(mut pending: mpsc::UnboundedReceiver<(Arc<File>, LogFlushed<TypeConfig>)>, fsync: &Histogram) {
    while let Some(first) = pending.blocking_recv() {
        let mut waiting = vec![first];
        while let Ok(more) = pending.try_recv() {
            waiting.push(more);
        }
        // Earlier segments were synced before a newer one started, so the
        // newest file named in the batch is the only one left to sync.
        let synced = match waiting.last() {
            Some((file, _)) => timed_sync(file, fsync),
            None => Ok(()),
        };
        for (_, callback) in waiting {
            callback.log_io_completed(match &synced {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

/// Syncs a segment's data, recording how long it took.
fn timed_sync(file: &File, fsync: &Histogram) -> std::io::Result<()> {
    let start = std::time::Instant::now();
    let synced = file.sync_data();
    fsync.observe(start.elapsed());
    synced
}

fn read_err(e: LogError) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: LogError) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        self.read(start, end, None).map_err(read_err)
    }

    /// What one AppendEntries carries: entries up to
    /// [`REPLICATION_BATCH_BYTES`]. openraft asks for every entry a
    /// follower lacks, and while it searches for where a follower's log
    /// matches (after an election, that is from the middle of the log on),
    /// that was most of the log: a leader restarted over 32,768 entries of
    /// 16 KiB read them all, encoded them all, found the message too large
    /// for the peer and did it again, and grew past 900 MB.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        self.read(start, Some(end), Some(REPLICATION_BATCH_BYTES)).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.shared.lock();
        Ok(LogState { last_purged_log_id: inner.purged, last_log_id: inner.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let store = self.clone();
        let vote = *vote;
        let saved = tokio::task::spawn_blocking(move || store.write_vote(&vote)).await;
        saved
            .map_err(Error::internal)
            .and_then(|r| r.map_err(Error::from))
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.shared.lock().vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.let_applying_catch_up().await;
        let file = self.write_entries(entries).map_err(write_err)?;
        // openraft waits for this flush before its next log write, so an
        // inline sync never overtakes one queued to the flusher.
        if self.writes.count() <= 1 {
            callback.log_io_completed(timed_sync(&file, &self.fsync));
            return Ok(());
        }
        if let Err(mpsc::error::SendError((file, callback))) = self.flusher.send((file, callback)) {
            // The flusher thread is gone: sync here.
            callback.log_io_completed(timed_sync(&file, &self.fsync));
        }
        Ok(())
    }

    /// Only kept in memory, for [`LogStore::pace_by`]: openraft works
    /// without it after a restart.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Release);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.truncate_from(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.purge_to(log_id).map_err(write_err)
    }
}

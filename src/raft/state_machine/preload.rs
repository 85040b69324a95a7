//! Loading a snapshot's records while its chunks arrive.
//!
//! A member that catches up by snapshot used to take every chunk first
//! and only then load the records into the state tree not in use, one
//! sled insert each: the two halves, each about as long as the other, ran
//! one after the other. A loader thread now follows the data into the
//! file it is received into, and loads each record as soon as it is
//! there, so that the install has little left to do once the last chunk
//! is in.
//!
//! The loader is only a head start: the install uses its work when the
//! data arrived in order, all of it was loaded, and the database is still
//! the one it loaded into (a defragment replaces it). Otherwise the
//! install loads the records again from the file, as it would without a
//! loader. Nothing the loader writes is in use until the install makes it
//! so; a member that stops meanwhile drops it at start, as it drops any
//! load cut short.
//!
//! One state tree is not in use, so one load at a time uses it: the
//! loader holds [`Preloads::slot`] while it writes, and an install holds
//! it too. A stream begun stops the loader of any earlier one (openraft
//! has given that one up, or installs it without its loader's help), and
//! an install that must load again stops the newest loader before it waits
//! for the slot, so no two ever wait for each other.
//!
//! A stream can also just stop: a leader that loses its leadership midway
//! sends no more chunks, and a new leader that holds the entries the member
//! lacks sends those instead of a snapshot. openraft keeps such a stream
//! until another begins, so a loader that hears of no data for
//! [`STALLED_AFTER`] gives up: the tree not in use is emptied and its own
//! copy of the records removed, instead of both staying (with the loader's
//! thread) until the member's next snapshot or restart. Should the stream
//! go on after all, the install loads the records from the file received.

use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;

use super::records::{load_records, read_records, EachRecord, RecordsOut};
use super::snapshot::{create_rw, part_path};
use super::view::Shared;
use super::{drop_files, fresh_files, state_trees, values_id_key};
use crate::error::Error;
use crate::mvcc::{Files, Rebuild};

/// The part a loader writes the member's own copy of the records into;
/// the install puts a header before them.
pub(super) const OWN_RECORDS_PART: &str = "own-records";

/// How long a loader waits for more of its stream's data before it gives
/// up its work. The leader sends each chunk as soon as the one before is
/// answered, so a minute without one is a stream given up.
pub const STALLED_AFTER: Duration = Duration::from_secs(60);

/// Who may write the state tree not in use, and the newest loader.
#[derive(Debug)]
pub struct Preloads {
    slot: Arc<tokio::sync::Mutex<()>>,
    newest: Mutex<Option<Arc<Arrivals>>>,
    /// Installs that used a loader's work.
    pub(super) used: std::sync::atomic::AtomicU64,
    /// [`STALLED_AFTER`], but for tests.
    pub(super) stalled_after: Mutex<Duration>,
}

impl Default for Preloads {
    fn default() -> Preloads {
        Preloads {
            slot: Default::default(),
            newest: Default::default(),
            used: Default::default(),
            stalled_after: Mutex::new(STALLED_AFTER),
        }
    }
}

impl Preloads {
    /// Stops the newest loader, whose stream is given up or will be
    /// installed without its help (`why`), and names `next` the newest.
    fn replace_newest(&self, next: Option<Arc<Arrivals>>, why: &'static str) {
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = std::mem::replace(&mut *newest, next) {
            old.stop(why);
        }
    }

    /// The slot, for an install that loads the records itself: the newest
    /// loader is stopped first, so that it lets go. On a blocking thread.
    pub(super) fn take_for_install(&self) -> OwnedMutexGuard<()> {
        self.replace_newest(None, "an install loads the records itself");
        self.slot.clone().blocking_lock_owned()
    }
}

/// How far the data received into a file has come, as its loader sees it.
#[derive(Debug)]
pub struct Arrivals {
    state: Mutex<Arrived>,
    changed: Condvar,
    /// The longest wait for more data before the loader gives up.
    stalled_after: Duration,
}

#[derive(Debug)]
struct Arrived {
    /// The bytes from the start of the data that are in the file.
    end: u64,
    /// When `end` last moved on (or the stream began).
    moved: Instant,
    /// Set once the data is all received.
    finished: bool,
    /// Why the loader is to stop.
    stopped: Option<&'static str>,
}

impl Arrivals {
    fn new(stalled_after: Duration) -> Arrivals {
        let state = Arrived { end: 0, moved: Instant::now(), finished: false, stopped: None };
        Arrivals { state: Mutex::new(state), changed: Condvar::new(), stalled_after }
    }

    fn update(&self, change: impl FnOnce(&mut Arrived)) {
        change(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
    }

    /// The data is in the file up to `end`.
    pub(super) fn reached(&self, end: u64) {
        self.update(|a| {
            if end > a.end {
                a.end = end;
                a.moved = Instant::now();
            }
        });
    }

    /// The loader's work will not be used: it stops.
    pub(super) fn stop(&self, why: &'static str) {
        self.update(|a| {
            a.stopped.get_or_insert(why);
        });
    }

    fn finish(&self) {
        self.update(|a| a.finished = true);
    }

    /// Waits until the data holds at least `end` bytes (true), or is all
    /// received with fewer (false). Fails once the loader is stopped, or
    /// once no data has arrived for `stalled_after`.
    fn wait_for(&self, end: u64) -> Result<bool, Error> {
        let mut a = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(why) = a.stopped {
                return Err(Error::internal(format!("loading the snapshot as it arrived stopped: {why}")));
            }
            if a.end >= end || a.finished {
                return Ok(a.end >= end);
            }
            let waited = a.moved.elapsed();
            if waited >= self.stalled_after {
                return Err(Error::internal(format!(
                    "loading the snapshot as it arrived stopped: no data for {} s after {} bytes",
                    waited.as_secs(),
                    a.end
                )));
            }
            a = self.changed.wait_timeout(a, self.stalled_after - waited).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn received(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).end
    }
}

/// The file being received, read as far as the data has arrived.
struct Arriving {
    file: std::fs::File,
    at: u64,
    arrivals: Arc<Arrivals>,
}

impl Read for Arriving {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.arrivals.wait_for(self.at + 1).map_err(std::io::Error::other)? {
            return Ok(0);
        }
        let n = (self.arrivals.received() - self.at).min(buf.len() as u64) as usize;
        let n = self.file.read_at(&mut buf[..n], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// A loader following the data of one snapshot stream.
#[derive(Debug)]
pub struct Preload {
    arrivals: Arc<Arrivals>,
    thread: Option<std::thread::JoinHandle<Result<Preloaded, Error>>>,
}

/// What a loader loaded. Holds the slot until the install is done.
pub(super) struct Preloaded {
    pub(super) slot: OwnedMutexGuard<()>,
    pub(super) loaded: LoadedRecords,
}

/// The records of `len` bytes of data, loaded into `files`, the state tree
/// `other`; and the member's own copy of them in `own`.
pub(super) struct LoadedRecords {
    pub(super) other: &'static str,
    pub(super) files: Files,
    pub(super) rebuilt: Rebuild,
    pub(super) len: u64,
    pub(super) own: OwnRecords,
}

/// The member's own copy of the records loaded (see
/// [`super::records::write_state`]), without a header yet.
pub(super) struct OwnRecords {
    pub(super) path: PathBuf,
    /// Positioned at its start.
    pub(super) file: std::fs::File,
    pub(super) len: u64,
    pub(super) whole_len: u64,
}

impl LoadedRecords {
    /// Whether the install may use the load: every byte of the `len`
    /// received was loaded, into the database still in use (read under
    /// [`Shared::changing_db`]), whose tree not in use is still this one.
    pub(super) fn usable(&self, db: &sled::Db, len: u64) -> Result<bool, Error> {
        let id = db.get(values_id_key(self.other))?;
        let same_db = id.as_deref() == Some(&self.files.values.id().to_be_bytes()[..]);
        Ok(self.len == len && same_db && state_trees(db)?.1 == self.other)
    }
}

impl Preload {
    /// Starts a loader for the data received into `file` (from its start),
    /// which learns of each write through the [`Arrivals`] returned.
    pub(super) fn start(shared: &Arc<Shared>, dir: &Path, file: std::fs::File) -> Result<Preload, Error> {
        let stalled_after = *shared.preloads.stalled_after.lock().unwrap_or_else(|p| p.into_inner());
        let arrivals = Arc::new(Arrivals::new(stalled_after));
        shared.preloads.replace_newest(Some(arrivals.clone()), "a later snapshot stream began");
        let (shared, dir, a) = (shared.clone(), dir.to_path_buf(), arrivals.clone());
        let thread = std::thread::Builder::new()
            .name("kvd-preload".into())
            .spawn(move || {
                let reader = Arriving { file, at: 0, arrivals: a };
                preload(&shared, &dir, reader)
            })
            .map_err(|e| Error::internal(format!("starting a thread to load a snapshot: {e}")))?;
        Ok(Preload { arrivals, thread: Some(thread) })
    }

    pub(super) fn arrivals(&self) -> &Arc<Arrivals> {
        &self.arrivals
    }

    /// Tells the loader that the data is all received, and waits for its
    /// work. On a blocking thread.
    pub(super) fn finish(mut self) -> Result<Preloaded, Error> {
        self.arrivals.finish();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(loaded)) => loaded,
            Some(Err(_)) => Err(Error::internal("the thread loading a snapshot panicked")),
            None => Err(Error::internal("the snapshot's loader was already waited for")),
        }
    }
}

impl Drop for Preload {
    /// A stream given up stops its loader, which ends on its own.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.arrivals.stop("the snapshot stream was given up");
        }
    }
}

/// The loader's work: takes the slot, empties the state tree not in use,
/// and loads into it each record as it arrives. A load given up leaves
/// the tree empty again, and no part behind.
fn preload(shared: &Shared, dir: &Path, reader: Arriving) -> Result<Preloaded, Error> {
    let slot = shared.preloads.slot.clone().blocking_lock_owned();
    // Stopped while it waited: nothing is touched.
    reader.arrivals.wait_for(0)?;
    let loaded = load_arriving(shared, dir, reader);
    if let Err(e) = &loaded {
        tracing::info!(error = %e, "a snapshot's records loaded as they arrived are dropped");
        let _ = std::fs::remove_file(part_path(dir, OWN_RECORDS_PART));
        // Holding the slot, no one else writes the tree not in use, in the
        // database loaded into or in one a defragment put in its place.
        let _changing = shared.changing_db();
        let db = shared.db();
        if let Err(e) = state_trees(&db).and_then(|(_, other)| drop_files(&db, dir, other)) {
            tracing::warn!(error = %e, "a snapshot load given up is left in the tree not in use until the next");
        }
    }
    loaded.map(|loaded| Preloaded { slot, loaded })
}

fn load_arriving(shared: &Shared, dir: &Path, mut reader: Arriving) -> Result<LoadedRecords, Error> {
    let (db, other, files) = {
        let _changing = shared.changing_db();
        let db = shared.db();
        let (_, other) = state_trees(&db)?;
        let files = fresh_files(&db, dir, other)?;
        (db, other, files)
    };
    let path = part_path(dir, OWN_RECORDS_PART);
    let mut tee = RecordsOut::start(BufWriter::with_capacity(1 << 20, create_rw(&path)?))?;
    let mut len = 0;
    let read = |each: EachRecord<'_>| {
        let holds = |r: &mut &mut Arriving, end: u64| r.arrivals.wait_for(end);
        len = read_records(&mut reader, holds, each)?.1;
        Ok(())
    };
    let rebuilt = load_records(&db, &files, read, Some(&mut tee))?;
    // Bytes after the last record leave `len` short of the data's: the
    // install does not use this load, and its own check refuses the data.
    let (out, own_len, own_whole_len) = tee.finish()?;
    let mut file = out.into_inner().map_err(|e| Error::internal(format!("write snapshot: {}", e.error())))?;
    file.flush().map_err(|e| Error::internal(format!("write snapshot: {e}")))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::internal(format!("write snapshot: {e}")))?;
    let own = OwnRecords { path, file, len: own_len, whole_len: own_whole_len };
    Ok(LoadedRecords { other, files, rebuilt, len, own })
}

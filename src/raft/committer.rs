//! Commits the state machine's groups of writes to sled on a thread of its
//! own.
//!
//! A group of about a thousand writes takes sled 5–10 ms to commit. Done on
//! the state machine's task under the state lock, that stalled applying and
//! every read on the member for as long, a few times a second under load.
//! Handed to this thread, a group is committed while the next one is
//! applied; the store reads the versions on their way from memory until they
//! are in sled (see [`crate::mvcc::MvccStore::hand_off`]).
//!
//! One group at a time, in order, each with the log id of its last entry:
//! after a crash, sled holds the writes up to some applied entry, and the
//! Raft log has the rest. A snapshot's or a backup's copy of the tree begins
//! here, as one more job between two groups (see [`Committer::run`]), and
//! goes on beside it (see `state_machine::copies`); each step of physical
//! compaction (see [`super::compactor`]) and a defragment run here whole.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::Error;
use crate::metrics::Histogram;
use crate::mvcc::{Batch, Files, TreeCell};

/// The most writes handed to sled in one batch (see
/// [`crate::mvcc::Batch::into_sled_chunks`]): twice a group that is due.
pub const SLED_BATCH_WRITES: usize = 2 * super::state_machine::MAX_UNFLUSHED_WRITES;

/// Work on the tree that may give the files to commit to from then on.
type MoveWork = dyn FnOnce(&Files) -> Option<Files> + Send;

/// Work for the commit thread.
enum Job {
    /// A group of writes to commit.
    Commit(Batch),
    /// Something to do with the tree between two groups.
    Run(Box<dyn FnOnce(&Files) + Send>),
    /// Something to do with the tree between two groups, which may give
    /// the tree that takes its place in the cell.
    Move(Box<MoveWork>),
    /// Commit to the tree in another cell from now on.
    Switch(TreeCell),
}

/// The thread that commits handed-off groups, and what it is doing.
pub struct Committer {
    /// None only while dropping.
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    progress: Arc<(Mutex<Progress>, Condvar)>,
    /// How long each group took to commit.
    commits: Arc<Histogram>,
    /// Woken each time a job ends, for tasks that wait without holding a
    /// thread (see [`Committer::idle`]).
    ended: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Progress {
    /// A group is being committed.
    busy: bool,
    /// What it does is not a group's commit: a defragment's copy, say,
    /// which holds it for seconds.
    other_work: bool,
    /// Why a commit failed; the state machine cannot go on after that.
    failed: Option<String>,
}

impl Committer {
    /// Starts the thread committing to the tree in `cell` (the store's, see
    /// [`crate::mvcc::MvccStore::tree_cell`]). Dropping this waits for the
    /// thread to commit what it has and end, so that sled's files are free
    /// for the next start.
    pub fn start(mut cell: TreeCell) -> Result<Committer, Error> {
        let (tx, rx) = mpsc::channel::<Job>();
        let progress = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let theirs = progress.clone();
        let commits = Arc::new(Histogram::default());
        let timed = commits.clone();
        let ended = Arc::new(tokio::sync::Notify::new());
        let wake = ended.clone();
        let thread = std::thread::Builder::new()
            .name("kvd-sm-commit".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // The tree is let go of before the job is reported done:
                    // a defragment removes the old database once it is.
                    let tree = cell.read().unwrap_or_else(|p| p.into_inner()).clone();
                    let result = match job {
                        Job::Commit(batch) => {
                            let start = std::time::Instant::now();
                            let committed = commit_to(&tree, batch);
                            timed.observe(start.elapsed());
                            committed
                        }
                        Job::Run(work) => {
                            work(&tree);
                            Ok(())
                        }
                        Job::Move(work) => {
                            if let Some(to) = work(&tree) {
                                *cell.write().unwrap_or_else(|p| p.into_inner()) = to;
                            }
                            Ok(())
                        }
                        Job::Switch(to) => {
                            cell = to;
                            Ok(())
                        }
                    };
                    drop(tree);
                    let (lock, done) = &*theirs;
                    let mut progress = lock.lock().unwrap_or_else(|p| p.into_inner());
                    progress.busy = false;
                    progress.other_work = false;
                    if let Err(e) = result {
                        progress.failed = Some(e.to_string());
                    }
                    done.notify_all();
                    drop(progress);
                    wake.notify_waiters();
                }
            })
            .map_err(|source| CommitError::Spawn { thread: "state machine's commit", source })?;
        Ok(Committer { tx: Some(tx), thread: Some(thread), progress, commits, ended })
    }

    /// The durations of the groups' commits.
    pub fn commit_histogram(&self) -> Arc<Histogram> {
        self.commits.clone()
    }

    /// Whether no group is being committed. An error if a commit failed.
    pub fn is_idle(&self) -> Result<bool, Error> {
        Ok(self.busy()?.is_none())
    }

    /// Whether it is busy with a job other than a group's commit (see
    /// [`Committer::run`]), which may take it for seconds.
    pub fn on_long_job(&self) -> bool {
        let progress = self.lock();
        progress.busy && progress.other_work
    }

    /// None if it is idle; else whether it is on a long job (see
    /// [`Committer::on_long_job`]): both read under one lock.
    pub fn busy(&self) -> Result<Option<bool>, Error> {
        let progress = self.lock();
        check(&progress)?;
        Ok(progress.busy.then_some(progress.other_work))
    }

    /// Waits until no group is being committed. An error if a commit failed.
    pub fn wait_idle(&self) -> Result<(), Error> {
        let (_, done) = &*self.progress;
        let mut progress = self.lock();
        while progress.busy {
            progress = done.wait(progress).unwrap_or_else(|p| p.into_inner());
        }
        check(&progress)
    }

    /// Waits, without holding a thread, until no group is being committed.
    /// An error if a commit failed.
    pub async fn idle(&self) -> Result<(), Error> {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so that a job ending between the
            // check and the wait still wakes it.
            ended.as_mut().enable();
            if self.is_idle()? {
                return Ok(());
            }
            ended.await;
        }
    }

    /// Starts committing `batch`. The group before it must be committed.
    pub fn send(&self, batch: Batch) -> Result<(), Error> {
        self.begin(Job::Commit(batch))
    }

    /// Starts `work` with the tree on the commit thread, as if it were a
    /// group: the group before it must be committed, and the committer is
    /// busy until it ends. A snapshot's copy begins this way, so that it
    /// holds exactly the groups committed before it while applying goes
    /// on.
    pub fn run(&self, work: impl FnOnce(&Files) + Send + 'static) -> Result<(), Error> {
        self.begin(Job::Run(Box::new(work)))
    }

    /// Runs `work` as [`Committer::run`] does; if it gives a tree, that
    /// tree replaces the one in the cell before the next group is
    /// committed. A defragment copies the store into a new database so.
    pub fn run_then_move(&self, work: impl FnOnce(&Files) -> Option<Files> + Send + 'static) -> Result<(), Error> {
        self.begin(Job::Move(Box::new(work)))
    }

    /// Commits to the tree in `cell` from the next group on (a snapshot was
    /// loaded into a store of its own), once the groups before are
    /// committed; waits for the switch.
    pub fn switch(&self, cell: TreeCell) -> Result<(), Error> {
        self.wait_idle()?;
        self.begin(Job::Switch(cell))?;
        self.wait_idle()
    }

    fn begin(&self, job: Job) -> Result<(), Error> {
        let mut progress = self.lock();
        check(&progress)?;
        if progress.busy {
            return Err(CommitError::OutOfOrder.into());
        }
        let other_work = !matches!(job, Job::Commit(_));
        if self.tx.as_ref().is_none_or(|tx| tx.send(job).is_err()) {
            progress.failed = Some("the commit thread is gone".into());
            return check(&progress);
        }
        progress.busy = true;
        progress.other_work = other_work;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Commits a group of writes to `files`: the values kept apart go to the
/// value file, which is synced, and then the records to sled, the history
/// records in packs (see [`crate::mvcc::packs`]), in batches of at most
/// [`SLED_BATCH_WRITES`] applied in order; then the packed versions' places
/// are recorded.
pub fn commit_to(files: &Files, batch: Batch) -> Result<(), Error> {
    files.commit(batch, SLED_BATCH_WRITES)
}

fn check(progress: &Progress) -> Result<(), Error> {
    match &progress.failed {
        Some(why) => Err(CommitError::Failed(why.clone()).into()),
        None => Ok(()),
    }
}

/// A failure of the threads that commit applied writes and remove compacted
/// history. A client sees it as an internal error; the member stops applying.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A thread could not be started.
    #[error("cannot start the {thread} thread: {source}")]
    Spawn {
        /// Which thread.
        thread: &'static str,
        /// What the system answered.
        #[source]
        source: std::io::Error,
    },
    /// Work came out of order: a bug in the state machine, not in the disk.
    #[error("work was handed to the committer before the group before it was committed")]
    OutOfOrder,
    /// A commit to sled failed; later ones are refused.
    #[error("committing applied writes to sled failed: {0}")]
    Failed(String),
    /// The commit thread ended while work was waiting for it.
    #[error("the commit thread ended {0}")]
    Gone(&'static str),
    /// Removing compacted history failed; `rev` is the compaction's.
    #[error("physical compaction at revision {rev} failed: {why}")]
    Compaction {
        /// The compacted revision.
        rev: i64,
        /// What failed.
        why: String,
    },
}

impl From<CommitError> for Error {
    fn from(e: CommitError) -> Error {
        Error::internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_group_sent_is_in_sled_once_the_committer_is_idle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = sled::Config::new().temporary(true).open().expect("sled").open_tree("t").expect("tree");
        let values = crate::mvcc::values::ValueLog::create(&dir.path().join("v"), 1).expect("value file");
        let values = std::sync::Arc::new(values);
        let cell = std::sync::Arc::new(std::sync::RwLock::new(Files::new(tree.clone(), values.clone())));
        let committer = Committer::start(cell).expect("start");
        assert!(committer.is_idle().expect("idle"));
        let big = crate::proto::mvccpb::KeyValue {
            key: b"big".to_vec(),
            value: vec![5u8; crate::mvcc::values::SEPARATE_FROM],
            version: 1,
            ..Default::default()
        };
        for i in 0u32..50 {
            let mut batch = Batch::default();
            batch.insert(&b"k"[..], &i.to_be_bytes()[..]);
            batch.insert(&i.to_be_bytes()[..], &b"v"[..]);
            batch.insert_version(b"hbig".to_vec(), &big);
            committer.send(batch).expect("send");
            committer.wait_idle().expect("committed");
            assert_eq!(tree.get(b"k").expect("get").as_deref(), Some(&i.to_be_bytes()[..]));
            // The large value went to the value file before its record.
            assert_eq!(values.len(), (i as u64 + 1) * big.value.len() as u64);
            let stored = tree.get(b"hbig").expect("get").expect("record");
            assert_eq!(crate::mvcc::values::load_kv(&stored, &values).expect("load"), big);
        }
        assert_eq!(tree.len(), 52);
    }
}

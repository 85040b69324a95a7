//! Copies of the state tree made beside the commit thread.
//!
//! A snapshot or a backup is a copy of the state tree as of one applied
//! entry. Made on the commit thread, between two groups, it held every
//! commit for as long as it took (2.4 s at 900,000 keys of 1 KiB), and
//! writes waited once the groups gathered meanwhile reached their bound.
//! Now the commit thread only takes what a commit may change (the records
//! other than history and revision order, see [`super::records::AsOf`]) and
//! the copy of the rest goes on a thread of its own while groups are
//! committed: history and revision-order records never change once
//! written, and those of later revisions are left out.
//!
//! What removes or replaces such records waits until no copy is under way,
//! and queues its work on the commit thread under the state lock, where a
//! copy begins ([`super::Shared::write_without_copies`]): a step of
//! physical compaction, a defragment's switch to the database it copied
//! (the defragment's own copy aside), and the switch to a snapshot
//! installed. Each job queued before a copy began runs before the copy's
//! records are taken; none queued after runs until the copy ends. While
//! such work waits, no backup begins a copy: `snapshot save` called back to
//! back would otherwise begin each copy before the waiting work got the
//! lock, and keep it waiting for as long as the calls went on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::oneshot;

use super::records::{AsOf, Part};
use crate::error::Error;
use crate::mvcc::Files;

/// The copies under way on a member.
#[derive(Debug, Default)]
pub(super) struct Copies {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    under_way: Mutex<usize>,
    ended: Condvar,
    /// The member is stopping: copies end early.
    stopping: AtomicBool,
    /// How many wait for the state lock with no copy under way.
    waiting: tokio::sync::watch::Sender<usize>,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            under_way: Mutex::new(0),
            ended: Condvar::new(),
            stopping: AtomicBool::new(false),
            waiting: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Copies {
    /// Counts a copy under way until the value returned is dropped. Called
    /// under the state lock, so that work queued under it while none is
    /// under way runs before the copy begins.
    pub(super) fn begin(&self) -> Copying {
        *self.inner.under_way.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Copying { inner: self.inner.clone() }
    }

    /// A backup's copy: begins, under the state lock, only if nothing waits
    /// for the copies under way to end (see [`Copies::wait_your_turn`]).
    pub(super) fn begin_unless_waited_for(&self) -> Option<Copying> {
        (*self.inner.waiting.borrow() == 0).then(|| self.begin())
    }

    /// Resolves once nothing waits for copies to end; a backup waits so
    /// before it takes the state lock.
    pub(super) async fn wait_your_turn(&self) {
        let mut waiting = self.inner.waiting.subscribe();
        // The sender lives as long as `self`.
        let _ = waiting.wait_for(|n| *n == 0).await;
    }

    /// Counts work that waits for no copy to be under way, until the value
    /// returned is dropped: meanwhile no backup begins a copy.
    pub(super) fn waiting(&self) -> Waiting {
        self.inner.waiting.send_modify(|n| *n += 1);
        Waiting { inner: self.inner.clone() }
    }

    /// How many copies are under way.
    pub(super) fn under_way(&self) -> usize {
        *self.inner.under_way.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no copy is under way.
    pub(super) fn wait_none(&self) {
        self.wait_at_most(0)
    }

    /// Waits until at most `n` copies are under way.
    pub(super) fn wait_at_most(&self, n: usize) {
        let mut under_way = self.inner.under_way.lock().unwrap_or_else(|p| p.into_inner());
        while *under_way > n {
            under_way = self.inner.ended.wait(under_way).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ends every copy under way early and waits for them: they hold the
    /// database's files open, which the next start needs.
    pub(super) fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.wait_none();
    }
}

/// Work waiting for copies to end; see [`Copies::waiting`].
pub(super) struct Waiting {
    inner: Arc<Inner>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.inner.waiting.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// One copy under way; dropping it ends it.
#[derive(Debug)]
pub(super) struct Copying {
    inner: Arc<Inner>,
}

impl Copying {
    /// Whether the copy should end early: the member is stopping.
    pub(super) fn stop_check(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let inner = self.inner.clone();
        move || inner.stopping.load(Ordering::Relaxed)
    }

    /// On the commit thread, between two groups: takes the records of
    /// `files` a commit may change, as of `rev`, if `part` holds them (see
    /// [`AsOf`]), and runs `copy` of the rest beside the commit thread; what
    /// it comes to goes to `done`.
    pub(super) fn copy_as_of<T: Send + 'static>(
        self,
        files: &Files,
        rev: i64,
        part: Part,
        done: oneshot::Sender<Result<T, Error>>,
        copy: impl FnOnce(&Files, &AsOf) -> Result<T, Error> + Send + 'static,
    ) {
        let files = files.clone();
        match AsOf::take(&files.tree, rev, part, &self) {
            Ok(as_of) => self.run_beside(move || {
                let _ = done.send(copy(&files, &as_of));
            }),
            Err(e) => {
                let _ = done.send(Err(e));
            }
        }
    }

    /// Runs `work` on a thread of its own and ends the copy when it
    /// returns; if no thread can be started, runs it here.
    pub(super) fn run_beside(self, work: impl FnOnce() + Send + 'static) {
        let work = Arc::new(Mutex::new(Some((self, work))));
        let theirs = work.clone();
        let started = std::thread::Builder::new().name("kvd-copy".into()).spawn(move || {
            if let Some((_copying, work)) = theirs.lock().unwrap_or_else(|p| p.into_inner()).take() {
                work();
            }
        });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no thread for a copy of the state: copying on the commit thread");
            if let Some((_copying, work)) = work.lock().unwrap_or_else(|p| p.into_inner()).take() {
                work();
            }
        }
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        let mut n = self.inner.under_way.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        self.inner.ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_when_the_last_copy_ends_and_a_stop_ends_copies_early() {
        let copies = Copies::default();
        assert_eq!(copies.under_way(), 0);
        copies.wait_none();
        let first = copies.begin();
        let second = copies.begin();
        assert_eq!(copies.under_way(), 2);
        let (tx, rx) = std::sync::mpsc::channel();
        let stopping = second.stop_check();
        second.run_beside(move || {
            while !stopping() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = tx.send(());
        });
        drop(first);
        assert_eq!(copies.under_way(), 1, "the copy beside is still under way");
        copies.wait_at_most(1);
        // Stopped from a thread of its own, so that a stop that never
        // reaches the copy fails the test rather than hangs it.
        let copies = Arc::new(copies);
        let stopper = {
            let copies = copies.clone();
            std::thread::spawn(move || copies.stop())
        };
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the copy beside saw the stop");
        stopper.join().expect("stop");
        assert_eq!(copies.under_way(), 0);
    }

    #[tokio::test]
    async fn no_backup_begins_while_work_waits_for_the_copies_to_end() {
        let copies = Copies::default();
        let snapshot = copies.begin();
        let waiting = copies.waiting();
        assert!(copies.begin_unless_waited_for().is_none(), "a backup began before the work waiting");
        let turn = tokio::time::timeout(std::time::Duration::from_millis(200), copies.wait_your_turn()).await;
        assert!(turn.is_err(), "a backup's turn came while work waited");
        drop(snapshot);
        drop(waiting);
        tokio::time::timeout(std::time::Duration::from_secs(10), copies.wait_your_turn()).await.expect("its turn");
        let backup = copies.begin_unless_waited_for().expect("nothing waits");
        assert_eq!(copies.under_way(), 1);
        drop(backup);
        assert_eq!(copies.under_way(), 0);
    }
}

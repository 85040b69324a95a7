//! Physical compaction on a thread of its own.
//!
//! A compaction takes effect when it is applied: reads and watches below the
//! compacted revision are refused from then on. The history it made
//! unreadable is removed afterwards, a step at a time, each step a job of
//! the commit thread between two groups of writes (see
//! [`Shared::compaction_step`]). Removing it all at once held applying, and
//! every write, for half a second per 200,000 revisions.
//!
//! The thread sleeps until it is woken: when a compaction is applied, when
//! a snapshot is installed, and once at start, since a data dir or a
//! snapshot may hold a pass that was cut short.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use super::state_machine::Shared;
use crate::error::Error;

/// Wakes the compaction thread, or stops it.
#[derive(Default)]
pub struct Wake {
    state: Mutex<WakeState>,
    changed: Condvar,
}

#[derive(Default)]
struct WakeState {
    /// How many times the thread was woken.
    count: u64,
    stopped: bool,
}

impl Wake {
    /// Has the thread look for compaction work.
    pub fn wake(&self) {
        self.lock().count += 1;
        self.changed.notify_all();
    }

    /// Ends the thread once its current step is done.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    fn stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Waits until woken after `seen`; `None` once stopped.
    fn wait(&self, seen: u64) -> Option<u64> {
        let mut state = self.lock();
        while !state.stopped && state.count == seen {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        (!state.stopped).then_some(state.count)
    }

    fn lock(&self) -> MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts the thread. It holds the state only during a step, and ends when
/// the state is dropped or [`Wake::stop`] is called.
pub fn start(shared: Weak<Shared>, wake: Arc<Wake>) -> Result<(), Error> {
    wake.wake();
    std::thread::Builder::new()
        .name("kvd-compact".into())
        .spawn(move || run(shared, wake))
        .map(|_| ())
        .map_err(|e| Error::internal(format!("cannot start the compaction thread: {e}")))
}

fn run(shared: Weak<Shared>, wake: Arc<Wake>) {
    let mut seen = 0;
    while let Some(count) = wake.wait(seen) {
        seen = count;
        loop {
            if wake.stopped() {
                return;
            }
            let Some(shared) = shared.upgrade() else { return };
            match shared.compaction_step() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    // Tried again at the next wake; what is left is unread.
                    tracing::error!(error = %e, "physical compaction failed");
                    shared.compaction_failed(e);
                    break;
                }
            }
        }
    }
}

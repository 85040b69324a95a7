//! Physical compaction on a thread of its own.
//!
//! A compaction takes effect when it is applied: reads and watches below the
//! compacted revision are refused from then on. The history it made
//! unreadable is removed afterwards, a step at a time, each step a job of
//! the commit thread between two groups of writes (see
//! [`Shared::compaction_step`]). Removing it all at once held applying, and
//! every write, for half a second per 200,000 revisions.
//!
//! The thread sleeps until it is woken through its channel: when a
//! compaction is applied, when a snapshot is installed, and once at start
//! (when the member has accepted its data dir: `StateMachine::resume_compaction`),
//! since a data dir or a snapshot may hold a pass that was cut short. It
//! ends when the state, which holds the sending side, is dropped.
//!
//! After each round it also gives back the space of removed large values:
//! they stay in the value file (see [`crate::mvcc::values`]) until a
//! defragment copies the live ones into a new file, so once most of the
//! file is removed values, it defragments, when no other member is
//! defragmenting (see [`Shared::on_defragment_turn`]); until then it asks
//! again every second or two, for ten minutes at most.

use std::sync::mpsc;
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::committer::CommitError;
use super::state_machine::Shared;
use crate::error::Error;

/// Starts the thread, which waits for its first wake: the member wakes it
/// once its data dir has passed the checks at start (a data dir it refuses
/// is not worked on). It holds the state only during a step.
pub fn start(shared: Weak<Shared>, woken: mpsc::Receiver<()>) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("kvd-compact".into())
        .spawn(move || run(shared, woken))
        .map(|_| ())
        .map_err(|source| CommitError::Spawn { thread: "compaction", source }.into())
}

/// Removed values past which the value file is worth rewriting: a
/// defragment copies every live record, so it is not done for less.
const RECLAIM_FLOOR_BYTES: u64 = 64 * 1024 * 1024;

/// How long a member whose turn to defragment has not come waits before it
/// asks again, at least: a random part of up to as much again keeps two
/// members that asked at the same moment (and each saw the other's claim)
/// from asking together again.
const TURN_RETRY: Duration = Duration::from_secs(1);

/// How long a member waits for its turn at most: a defragment of another
/// member that never ends (a stuck disk) must not leave this member's value
/// file growing without end.
const MAX_TURN_WAIT: Duration = Duration::from_secs(600);

/// Whether a defragment that has waited `waited` for its turn waits on,
/// given whether its turn came (`turn`).
fn waits_on(turn: bool, waited: Duration) -> bool {
    !turn && waited < MAX_TURN_WAIT
}

/// Defragments if the value file is mostly removed values and no other
/// member is defragmenting. Returns since when a defragment waits for its
/// turn, if it does (`waiting`: since when it already did, and said so).
fn reclaim_values(shared: &Shared, waiting: Option<Instant>) -> Option<Instant> {
    if !shared.values_worth_reclaiming(RECLAIM_FLOOR_BYTES) {
        return None;
    }
    // Claimed before asking (see `Shared::claim_defragment`).
    let _claim = shared.claim_defragment();
    let since = waiting.unwrap_or_else(Instant::now);
    let turn = shared.defragment_turn();
    if waits_on(turn, since.elapsed()) {
        if waiting.is_none() {
            tracing::info!("the value file is mostly removed values, but another member is defragmenting: this member's defragment waits its turn");
        }
        return Some(since);
    }
    if turn {
        tracing::info!("the value file is mostly removed values: defragmenting to give their space back");
    } else {
        tracing::warn!(
            waited_s = since.elapsed().as_secs(),
            "the value file is mostly removed values, and another member has been defragmenting for as long as this member waits at most: defragmenting all the same"
        );
    }
    match shared.defragment_if(|s| s.values_worth_reclaiming(RECLAIM_FLOOR_BYTES)) {
        Ok(Some(_)) => shared.want_snapshot(),
        Ok(None) => tracing::info!("a defragment that ran meanwhile gave the space of removed values back"),
        // Tried again after the next compaction.
        Err(e) => tracing::warn!(error = %e, "defragment to give back the space of removed values failed"),
    }
    None
}

fn run(shared: Weak<Shared>, woken: mpsc::Receiver<()>) {
    // A round per wake; wakes that came meanwhile are served by the same
    // round. While a defragment waits its turn, it asks again each time the
    // wait for a wake ends (no compaction step: nothing new to remove).
    let mut waiting = None;
    loop {
        if waiting.is_some() {
            let again = TURN_RETRY + TURN_RETRY.mul_f64(rand::random::<f64>());
            match woken.recv_timeout(again) {
                Ok(()) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let Some(shared) = shared.upgrade() else { return };
                    waiting = reclaim_values(&shared, waiting);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else if woken.recv().is_err() {
            return;
        }
        while woken.try_recv().is_ok() {}
        loop {
            let Some(shared) = shared.upgrade() else { return };
            match shared.compaction_step() {
                Ok(true) => {}
                Ok(false) => {
                    waiting = reclaim_values(&shared, waiting);
                    break;
                }
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

#[cfg(test)]
#[test]
fn a_defragment_waits_for_its_turn_ten_minutes_at_most() {
    assert!(waits_on(false, Duration::ZERO));
    assert!(waits_on(false, MAX_TURN_WAIT - Duration::from_secs(1)));
    assert!(!waits_on(false, MAX_TURN_WAIT), "a member stuck defragmenting holds the others back for ever");
    assert!(!waits_on(true, Duration::ZERO));
    assert_eq!(MAX_TURN_WAIT, Duration::from_secs(600), "the docs say ten minutes");
}

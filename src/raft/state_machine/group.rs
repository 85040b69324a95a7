//! The commit group: writes applied since the last commit to sled, handed to
//! the commit thread together once they are due.

use super::super::committer::{commit_to, Committer};
use super::super::{encode, LogId};
use super::APPLIED;
use crate::error::Error;
use crate::mvcc::keys::meta_key;
use crate::mvcc::{Batch, MvccStore};

/// Applied writes wait to be handed to the committer until there are this
/// many (8,192, when the commit still held the state lock, made p99 latency
/// jump).
pub const MAX_UNFLUSHED_WRITES: usize = 1024;
/// While the committer is busy, applied writes go on gathering up to this
/// many; then the next apply waits for it before it takes the state lock
/// (see [`super::StateMachine::room_to_apply`]).
pub(super) const MAX_GATHERED_WRITES: usize = 8 * MAX_UNFLUSHED_WRITES;
/// Past this many, one apply of many entries waits for the committer with
/// the state lock held: the bound on what is gathered in memory.
const MAX_GATHERED_HELD: usize = 4 * MAX_GATHERED_WRITES;
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
pub(super) struct Group {
    pub(super) batch: Batch,
    /// The last entry whose writes are in `batch`.
    pub(super) last: Option<LogId>,
    /// When the first write now waiting was applied.
    pub(super) since: Option<std::time::Instant>,
}

impl Group {
    pub(super) fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// Whether it is time to commit.
    pub(super) fn due(&self) -> bool {
        self.batch.len() >= MAX_UNFLUSHED_WRITES || self.since.is_some_and(|t| t.elapsed() >= MAX_UNFLUSHED_AGE)
    }

    /// Commits every applied write now: waits for the group being committed
    /// in the background, then commits these with the last entry's log id,
    /// in one sled batch, and tells the store they are there.
    pub(super) fn commit(&mut self, store: &mut MvccStore, committer: &Committer) -> Result<(), Error> {
        committer.wait_idle()?;
        store.sent();
        let Some(batch) = self.take(store)? else { return Ok(()) };
        commit_to(&store.files(), batch)?;
        store.committed();
        Ok(())
    }

    /// Hands the writes to the committer, unless it is still busy with the
    /// last group (a snapshot's copy may keep it for seconds): then they go
    /// on gathering. Only past [`MAX_GATHERED_HELD`] does this wait, with
    /// the state lock held, which holds up every reader; the next apply
    /// waits for fewer without the lock.
    pub(super) fn hand_off(&mut self, store: &mut MvccStore, committer: &Committer) -> Result<(), Error> {
        if !committer.is_idle()? {
            if self.batch.len() < MAX_GATHERED_HELD {
                return Ok(());
            }
            committer.wait_idle()?;
        }
        store.sent();
        let Some(batch) = self.take(store)? else { return Ok(()) };
        store.hand_off();
        committer.send(batch)
    }

    /// The writes, their revision order and the last entry's log id, if
    /// any entry was applied since the last one.
    pub(super) fn take(&mut self, store: &mut MvccStore) -> Result<Option<Batch>, Error> {
        let Some(last) = self.last.take() else { return Ok(None) };
        self.since = None;
        let mut batch = std::mem::take(&mut self.batch);
        store.seal(&mut batch);
        batch.insert(meta_key(APPLIED), encode(&Some(last))?);
        Ok(Some(batch))
    }
}

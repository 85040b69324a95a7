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
/// While the committer is busy committing groups, applied writes go on
/// gathering up to this many, or [`MAX_GATHERED_BYTES`] of keys and values;
/// then the next apply waits for it before it takes the state lock (see
/// [`super::StateMachine::room_to_apply`]). A member catching up by the log,
/// whose committer is always busy, held two such groups and sled's copy of
/// one: with room for 65,536 writes or 32 MiB, replaying 95,000 puts of 256
/// bytes it peaked at 197-229 MB against 72-95 MB for the others, and at
/// 174-183 MB with room for 8,192 writes or 8 MiB. Replaying 300,000 puts
/// of 384 bytes, it peaked at 171-178 MB with that room and at 150-155 MB
/// with room for 2,048 writes or 2 MiB (others 74-81 MB). Puts were level:
/// in eight alternating pairs, 16,525/s against 15,871/s from 256 clients
/// and 11,220/s against 11,154/s from 64 (means; pairs moved by a quarter
/// between rounds).
pub(super) const MAX_GATHERED_WRITES: usize = 2 * MAX_UNFLUSHED_WRITES;
/// See [`MAX_GATHERED_WRITES`].
pub(super) const MAX_GATHERED_BYTES: usize = 2 << 20;
/// The room while the committer is on another job (see
/// [`Committer::on_long_job`]): the last step of a defragment, which copies
/// what was committed during its copy. When a defragment's whole copy was
/// one such job, with room for 8,192 writes puts at the leader stopped for
/// the rest of it (longest put 1.5 and 2.0 s, against 0.24 and 0.30 s with
/// this room, in a defragment of 200,000 keys of 1 KiB under puts from 64
/// clients). When
/// a snapshot's copy still held it, this room took the longest put of a
/// 1,000,000-key load from 1.7 s to 0.3 s.
pub(super) const LONG_JOB_GATHERED_WRITES: usize = 64 * MAX_UNFLUSHED_WRITES;
/// See [`LONG_JOB_GATHERED_WRITES`].
pub(super) const LONG_JOB_GATHERED_BYTES: usize = 32 << 20;
/// ... or this many writes of lease records, which a commit cannot split
/// (see [`crate::mvcc::Batch::into_sled_chunks`]): sled keeps a copy
/// of each tree node a batch changes until the whole batch is applied, so
/// its memory grows with the largest batch. 100,000 leases expiring at once
/// gathered tens of thousands of lease removals into one batch while the
/// committer was busy, and took each member from about 100 MB to 250-490
/// MB. Only the next apply waits for these, never one under the state lock
/// (see [`HELD_FACTOR`]): a burst of grants during a long commit or a
/// defragment must not hold up every reader for its seconds.
pub(super) const MAX_GATHERED_LEASE_WRITES: usize = super::super::committer::SLED_BATCH_WRITES;
/// Past this many times the bounds in writes and bytes, one apply of many
/// entries waits for the committer with the state lock held: the bound on
/// what is gathered in memory.
const HELD_FACTOR: usize = 4;
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

    /// Whether the writes gathered have reached `factor` times the bounds
    /// in writes and bytes on what waits for a busy committer.
    pub(super) fn gathered(&self, factor: usize, long_job: bool) -> bool {
        let (writes, bytes) = if long_job {
            (LONG_JOB_GATHERED_WRITES, LONG_JOB_GATHERED_BYTES)
        } else {
            (MAX_GATHERED_WRITES, MAX_GATHERED_BYTES)
        };
        self.batch.len() >= factor * writes || self.batch.bytes() >= factor * bytes
    }

    /// Whether the next apply waits for a busy committer before it takes
    /// the state lock: the writes gathered have reached a bound, in writes,
    /// bytes or lease writes; `long_job` when the committer is on a job
    /// other than a group's commit.
    pub(super) fn full(&self, long_job: bool) -> bool {
        self.gathered(1, long_job) || self.batch.lease_writes() >= MAX_GATHERED_LEASE_WRITES
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
    /// last group (a defragment may keep it for seconds): then they go
    /// on gathering. Only past [`HELD_FACTOR`] times their bounds does this
    /// wait, with the state lock held, which holds up every reader; the next
    /// apply waits for fewer without the lock.
    pub(super) fn hand_off(&mut self, store: &mut MvccStore, committer: &Committer) -> Result<(), Error> {
        if let Some(long_job) = committer.busy()? {
            if !self.gathered(HELD_FACTOR, long_job) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_gather_up_to_a_count_or_a_size() {
        let mut small = Group::default();
        let history = |i: usize| [&[crate::mvcc::keys::HIST][..], format!("k{i}").as_bytes()].concat();
        for i in 0..MAX_GATHERED_WRITES - 1 {
            small.batch.insert(history(i), "v");
        }
        assert!(!small.gathered(1, false) && !small.full(false));
        small.batch.insert(history(MAX_GATHERED_WRITES), "v");
        assert!(small.gathered(1, false) && small.full(false), "a count of small writes");
        assert!(!small.gathered(HELD_FACTOR, false));
        // A committer on a long job leaves more room.
        assert!(!small.gathered(1, true) && !small.full(true));

        let mut large = Group::default();
        let value = vec![0u8; 1 << 20];
        for i in 0..MAX_GATHERED_BYTES >> 20 {
            assert!(!large.gathered(1, false), "{i} MiB");
            large.batch.insert(format!("k{i}"), &value);
        }
        assert!(large.gathered(1, false), "a few large writes");
        assert!(!large.gathered(HELD_FACTOR, false));
        assert!(!large.gathered(1, true));
        for i in MAX_GATHERED_BYTES >> 20..LONG_JOB_GATHERED_BYTES >> 20 {
            large.batch.insert(format!("k{i}"), &value);
        }
        assert!(large.gathered(1, true), "the room beside a long job");
    }

    #[test]
    fn lease_writes_gather_up_to_a_count_of_their_own() {
        // Beside a long job the room for other writes is far larger than
        // the count of lease writes a commit may hold.
        const { assert!(2 * MAX_GATHERED_LEASE_WRITES < LONG_JOB_GATHERED_WRITES) };
        let mut group = Group::default();
        let lease = |i: usize| [&[crate::mvcc::keys::LEASE][..], &(i as i64).to_be_bytes()].concat();
        for i in 0..MAX_GATHERED_LEASE_WRITES - 1 {
            group.batch.remove(lease(i));
            group.batch.insert([&[crate::mvcc::keys::HIST][..], &lease(i)].concat(), "tombstone");
        }
        assert!(!group.full(true));
        group.batch.remove(lease(MAX_GATHERED_LEASE_WRITES));
        assert!(group.full(true) && group.full(false), "a count of lease writes");
        // However many there are beside a long job, they never make an
        // apply wait with the state lock held.
        for i in 0..HELD_FACTOR * MAX_GATHERED_LEASE_WRITES {
            group.batch.insert(lease(i), "ttl");
        }
        assert!(group.batch.lease_writes() >= HELD_FACTOR * MAX_GATHERED_LEASE_WRITES);
        assert!(!group.gathered(HELD_FACTOR, true));
    }
}

//! The Raft log and vote, in sled.
//!
//! Entries are keyed by index (big-endian, so sled's order is log order) and
//! encoded with bincode. `append` writes a batch and returns at once; a flusher
//! task then makes it durable and only then tells openraft. The flusher takes
//! every batch that queued up while the previous flush ran and covers them all
//! with one flush (group commit), so under load many client writes share one
//! fsync and no write is acknowledged before it is on disk. The vote is
//! flushed before it is acknowledged. This module is the whole log store, so that it can be
//! measured and replaced on its own (DESIGN.md §3).

// openraft's StorageError is large by design; the trait fixes the error type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use tokio::sync::mpsc;

use super::{decode, encode, Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"last_purged";

/// The Raft log of one member.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    /// Opens the log kept in `db` and starts its flusher task (so it must be
    /// called within a tokio runtime).
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let (flusher, pending) = mpsc::unbounded_channel();
        let flushing = db.clone();
        std::thread::Builder::new()
            .name("kvd-log-flush".into())
            .spawn(move || flush_loop(flushing, pending))
            .map_err(sled::Error::Io)?;
        Ok(LogStore { db: db.clone(), log: db.open_tree("raft_log")?, meta: db.open_tree("raft_meta")?, flusher })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self.meta.get(key).map_err(|e| StorageIOError::read(&e))?;
        raw.map(|v| decode(&v).map_err(|e| StorageIOError::read(&e).into())).transpose()
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.read_meta(PURGED)
    }
}

/// Completes appends once they are durable: one flush for every append that
/// queued up meanwhile. It runs on its own thread (a flush blocks) and ends
/// when every `LogStore` handle is dropped.
fn flush_loop(db: sled::Db, mut pending: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>) {
    while let Some(first) = pending.blocking_recv() {
        let mut waiting = vec![first];
        while let Ok(more) = pending.try_recv() {
            waiting.push(more);
        }
        let flushed = db.flush().map(|_| ());
        for callback in waiting {
            callback.log_io_completed(flushed.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
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
        let iter = match range.end_bound() {
            Bound::Included(i) => self.log.range(index_key(start)..=index_key(*i)),
            Bound::Excluded(i) => self.log.range(index_key(start)..index_key(*i)),
            Bound::Unbounded => self.log.range(index_key(start)..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(decode(&value).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, value)) => Some(decode::<Entry>(&value).map_err(|e| StorageIOError::read_logs(&e))?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.meta.insert(VOTE, bytes).map_err(|e| StorageIOError::write_vote(&e))?;
        super::flush(&self.db).await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        if let Err(mpsc::error::SendError(callback)) = self.flusher.send(callback) {
            // The flusher is gone (it could not keep up with a stop): flush here.
            let flushed = super::flush(&self.db).await.map_err(std::io::Error::other);
            callback.log_io_completed(flushed);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two steps leaves
        // entries that are merely unused, never a gap.
        let bytes = encode(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.meta.insert(PURGED, bytes).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

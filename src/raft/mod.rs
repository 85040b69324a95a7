//! openraft wiring: the type configuration, the replicated command, and the
//! storage and network pieces openraft drives.

pub mod batcher;
mod committer;
mod compactor;
pub mod db_dir;
pub mod forwarder;
pub(crate) mod gather;
pub mod leader;
pub mod log_store;
pub mod network;
pub mod snapshot_chunk;
pub mod state_machine;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A member's id: etcd's member id, derived from its peer URL and the cluster
/// token.
pub type NodeId = u64;

/// A member as Raft knows it: its peer URL.
pub type Node = openraft::BasicNode;

/// The size of the chunks a snapshot is sent to a member in.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

openraft::declare_raft_types!(
    /// kvd's openraft types.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = state_machine::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a member.
pub type Raft = openraft::Raft<TypeConfig>;
/// A storage failure as openraft reports it.
pub type StorageError = openraft::StorageError<NodeId>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;

/// A replicated write: a protobuf-encoded `kvdpb::Command`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The outcome of applying a [`Request`]: a protobuf-encoded
/// `kvdpb::CommandResult`, or the error etcd would answer. Every member
/// computes the same outcome from the same entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Result<serde_bytes::ByteBuf, Error>);

/// A value that could not be encoded, or bytes that do not decode as the
/// value expected (from a peer, the log or a snapshot).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("encode: {0}")]
    Encode(bincode::Error),
    /// The bytes are not an encoded value of the type expected.
    #[error("decode: {0}")]
    Decode(bincode::Error),
}

impl From<CodecError> for Error {
    fn from(e: CodecError) -> Error {
        Error::internal(e)
    }
}

/// Encodes a value for the peer API and the log (bincode).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serialize(value).map_err(CodecError::Encode)
}

/// Decodes a value encoded by [`encode`].
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    bincode::deserialize(bytes).map_err(CodecError::Decode)
}

/// How many client writes this member is handling right now: the proposal
/// and forwarding queues count them, and the log store looks at the count to
/// choose where to sync (see `LogStore::append`).
#[derive(Clone, Default)]
pub struct WritesInFlight(Arc<AtomicUsize>);

/// One write counted in [`WritesInFlight`] until it is dropped.
pub struct InFlight(Arc<AtomicUsize>);

impl WritesInFlight {
    /// Counts one more write until the returned guard is dropped.
    pub fn enter(&self) -> InFlight {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlight(self.0.clone())
    }

    /// The writes being handled.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long [`open_sled`] waits for a database closed in this process to
/// let go of its files.
const SLED_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens a sled database. A database closed a moment ago in this same
/// process (a member stopped and started again in place) can hold its file
/// lock for a few milliseconds longer, while sled's own threads finish with
/// it; a lock held past [`SLED_RELEASE_WAIT`] is reported as sled reports it.
pub fn open_sled(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + SLED_RELEASE_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            opened => return opened,
        }
    }
}

/// Flushes `db` to disk on a blocking thread.
///
/// sled 0.34's own `flush_async` can miss its wake-up when several flushes
/// (of one database or of several in one process) are polled at once, and the
/// awaiting task then never resumes; a blocking `flush` has no such race.
pub async fn flush(db: &sled::Db) -> Result<(), Error> {
    let db = db.clone();
    blocking(move || Ok(db.flush().map(|_| ())?)).await
}

/// Runs `work` on tokio's blocking threads: for flushes and for reads and
/// writes of whole snapshots, which would otherwise hold an async worker
/// (and with it heartbeats and every request on that worker) for as long as
/// they take.
pub async fn blocking<T, F>(work: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) => Err(Error::internal(format!("blocking task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::WritesInFlight;

    #[test]
    fn a_write_is_counted_until_its_guard_is_dropped() {
        let writes = WritesInFlight::default();
        let shared = writes.clone();
        let first = writes.enter();
        let second = shared.enter();
        assert_eq!(writes.count(), 2);
        drop(first);
        assert_eq!(shared.count(), 1);
        drop(second);
        assert_eq!(writes.count(), 0);
    }
}

//! Snapshot files and the snapshot builder: the copy of the state that
//! openraft sends to a member that fell behind the purged log.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{Snapshot, SnapshotMeta};
use openraft::{RaftSnapshotBuilder, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::super::committer::CommitError;
use super::super::{encode, CodecError, LogId, Node, NodeId, StorageError, TypeConfig};
use super::SNAPSHOT_FILE;
use crate::error::Error;

/// A snapshot as the snapshot file holds it: bincode's layout of this
/// struct, the data last.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredSnapshot {
    pub(super) meta: SnapshotMeta<NodeId, Node>,
    /// Every record of the state tree (see [`copy_records`]).
    pub(super) data: Vec<u8>,
}

/// What can go wrong with the snapshot file. A client sees it as an
/// internal error; openraft as a storage error of the snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// Reading or writing the file failed.
    #[error("{what} snapshot: {source}")]
    Io {
        /// "read" or "write".
        what: &'static str,
        /// What the system answered.
        #[source]
        source: std::io::Error,
    },
    /// The file is not as kvd writes it.
    #[error("read snapshot: {0}")]
    Damaged(String),
    /// The metadata could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl From<SnapshotFileError> for Error {
    fn from(e: SnapshotFileError) -> Error {
        Error::internal(e)
    }
}

fn read_err(source: std::io::Error) -> SnapshotFileError {
    SnapshotFileError::Io { what: "read", source }
}

fn write_err(source: std::io::Error) -> SnapshotFileError {
    SnapshotFileError::Io { what: "write", source }
}

/// A snapshot's metadata.
pub(super) type Meta = SnapshotMeta<NodeId, Node>;

/// The snapshot file, opened, with the metadata at its start read.
pub(super) fn open_snapshot_file(
    dir: &Path,
) -> Result<Option<(Meta, std::io::BufReader<std::fs::File>)>, SnapshotFileError> {
    let io = read_err;
    let file = match std::fs::File::open(dir.join(SNAPSHOT_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut reader = std::io::BufReader::new(file);
    let meta = bincode::deserialize_from(&mut reader).map_err(|e| SnapshotFileError::Damaged(e.to_string()))?;
    Ok(Some((meta, reader)))
}

/// The metadata of the snapshot in the snapshot file, without its data.
pub(super) fn read_snapshot_meta(dir: &Path) -> Result<Option<Meta>, SnapshotFileError> {
    Ok(open_snapshot_file(dir)?.map(|(meta, _)| meta))
}

pub(super) fn read_snapshot_file(dir: &Path) -> Result<Option<StoredSnapshot>, SnapshotFileError> {
    use std::io::{Read, Seek};
    let io = read_err;
    let Some((meta, mut reader)) = open_snapshot_file(dir)? else { return Ok(None) };
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    // The length must be what the file holds, before it is allocated.
    let at = reader.stream_position().map_err(io)?;
    let size = reader.get_ref().metadata().map_err(io)?.len();
    if size.checked_sub(at) != Some(len) {
        return Err(SnapshotFileError::Damaged(format!(
            "the file says {len} bytes of data and holds {}",
            size.saturating_sub(at)
        )));
    }
    let mut data = vec![0u8; usize::try_from(len).map_err(|_| SnapshotFileError::Damaged("too large".into()))?];
    reader.read_exact(&mut data).map_err(io)?;
    Ok(Some(StoredSnapshot { meta, data }))
}

/// Writes `stored` as the snapshot file, under the lock that builds and
/// installs share. With `only_if_newer` it keeps a file that already holds a
/// later snapshot: a snapshot built from an older state can finish after a
/// newer one was installed from the leader, and must not replace it (the log
/// before the newer one may already be purged). Returns whether it wrote.
pub(super) fn write_snapshot_locked(
    dir: &Path,
    on_disk: &std::sync::Mutex<Option<LogId>>,
    stored: &StoredSnapshot,
    only_if_newer: bool,
) -> Result<bool, SnapshotFileError> {
    let mut on_disk = on_disk.lock().unwrap_or_else(|p| p.into_inner());
    if only_if_newer && on_disk.is_some() && *on_disk >= stored.meta.last_log_id {
        return Ok(false);
    }
    write_snapshot_file(dir, stored)?;
    *on_disk = stored.meta.last_log_id;
    Ok(true)
}

pub(super) fn write_snapshot_file(dir: &Path, stored: &StoredSnapshot) -> Result<(), SnapshotFileError> {
    let io = write_err;
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    {
        use std::io::Write;
        // bincode's layout of the struct, written in parts so that the data
        // is not copied.
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&encode(&stored.meta)?).map_err(io)?;
        f.write_all(&(stored.data.len() as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&stored.data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE)).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Builds a snapshot from a copy of the state taken between two applies.
pub struct SnapshotBuilder {
    pub(super) db: sled::Db,
    pub(super) dir: PathBuf,
    pub(super) snapshot_file: Arc<std::sync::Mutex<Option<LogId>>>,
    /// The state's records as the commit thread copies them, or why they
    /// could not be copied; taken by the build.
    pub(super) records: Option<oneshot::Receiver<Result<Vec<u8>, Error>>>,
    pub(super) last_applied: Option<LogId>,
    pub(super) membership: StoredMembership<NodeId, Node>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(None, &e));
        let copied = self.records.take().ok_or_else(|| fail(Error::internal("the snapshot was built already")))?;
        let records = copied.await.unwrap_or_else(|_| Err(CommitError::Gone("before the copy").into()));
        let data = records.map_err(fail)?;
        // The log up to the snapshot may be purged once it is returned, so the
        // applied state must be on disk first.
        crate::raft::flush(&self.db).await.map_err(fail)?;
        let (last_applied, membership) = (self.last_applied, self.membership.clone());
        let (dir, on_disk) = (self.dir.clone(), self.snapshot_file.clone());
        let (stored, written) = crate::raft::blocking(move || {
            let id = match last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, data.len()),
                None => format!("0-0-{}", data.len()),
            };
            let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id: id };
            let stored = StoredSnapshot { meta, data };
            let written = write_snapshot_locked(&dir, &on_disk, &stored, true)?;
            Ok((stored, written))
        })
        .await
        .map_err(fail)?;
        let StoredSnapshot { meta, data } = stored;
        if written {
            tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        } else {
            tracing::info!(snapshot = %meta.snapshot_id, "built snapshot is older than the one on disk; kept that one");
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

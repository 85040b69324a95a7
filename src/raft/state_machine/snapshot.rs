//! Snapshot files and the snapshot builder: the copy of the state that
//! openraft sends to a member that fell behind the purged log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{Snapshot, SnapshotMeta};
use openraft::{RaftSnapshotBuilder, StorageIOError};

/// The part a snapshot is built into.
pub(super) const BUILD_PART: &str = "build";
/// The part a snapshot from the leader is received into.
pub(super) const RECEIVE_PART: &str = "receive";
/// The part a received snapshot is copied into, with its metadata.
pub(super) const INSTALL_PART: &str = "install";
use tokio::sync::oneshot;

use super::super::committer::CommitError;
use super::super::{encode, CodecError, LogId, Node, NodeId, StorageError, TypeConfig};
use super::data::SnapshotData;
use super::records::write_records;
use super::{BACKUP_PREFIX, SNAPSHOT_FILE};
use crate::error::Error;

/// The snapshot file is bincode's layout of a struct `{ meta, data }`
/// with `data` a byte string: the metadata, the data's length (u64,
/// little-endian), then the data (see [`write_records`]). It is written
/// and read in parts, so the data is never held in memory.
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

/// The snapshot file, opened.
pub(super) struct OpenSnapshot {
    pub(super) meta: Meta,
    /// Positioned at the start of the data.
    pub(super) file: std::fs::File,
    /// Where the data begins.
    pub(super) data_at: u64,
    /// The data's length: the rest of the file.
    pub(super) len: u64,
}

/// The snapshot file, opened, with the metadata at its start read and the
/// length of its data checked against the file's: nothing else is read.
pub(super) fn open_snapshot_file(dir: &Path) -> Result<Option<OpenSnapshot>, SnapshotFileError> {
    use std::io::{Read, Seek, SeekFrom};
    let io = read_err;
    let file = match std::fs::File::open(dir.join(SNAPSHOT_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut reader = std::io::BufReader::new(file);
    let meta: Meta = bincode::deserialize_from(&mut reader).map_err(|e| SnapshotFileError::Damaged(e.to_string()))?;
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    let data_at = reader.stream_position().map_err(io)?;
    let mut file = reader.into_inner();
    let size = file.metadata().map_err(io)?.len();
    if size.checked_sub(data_at) != Some(len) {
        return Err(SnapshotFileError::Damaged(format!(
            "the file says {len} bytes of data and holds {}",
            size.saturating_sub(data_at)
        )));
    }
    file.seek(SeekFrom::Start(data_at)).map_err(io)?;
    Ok(Some(OpenSnapshot { meta, file, data_at, len }))
}

/// The metadata of the snapshot in the snapshot file, without its data.
pub(super) fn read_snapshot_meta(dir: &Path) -> Result<Option<Meta>, SnapshotFileError> {
    Ok(open_snapshot_file(dir)?.map(|open| open.meta))
}

/// Where a snapshot is written before it becomes the snapshot file.
pub(super) fn part_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("{SNAPSHOT_FILE}.{what}"))
}

/// Removes what a member that stopped midway left of snapshots being
/// built, received or copied, and of backups being sent.
pub(super) fn remove_leftovers(dir: &Path) -> Result<(), SnapshotFileError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let partial = name.starts_with(&format!("{SNAPSHOT_FILE}.")) || name.starts_with(BACKUP_PREFIX);
        if partial {
            std::fs::remove_file(entry.path()).map_err(write_err)?;
        }
    }
    Ok(())
}

/// Creates the file at `path` (replacing one there) for writing and reading.
pub(super) fn create_rw(path: &Path) -> Result<std::fs::File, SnapshotFileError> {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(write_err)
}

/// Writes the header of a snapshot file: the metadata and a length to be
/// filled in by [`finish_file`]. Returns where the data begins.
pub(super) fn start_file(out: &mut impl std::io::Write, meta: &Meta) -> Result<u64, SnapshotFileError> {
    let head = encode(meta)?;
    out.write_all(&head).map_err(write_err)?;
    out.write_all(&0u64.to_le_bytes()).map_err(write_err)?;
    Ok(head.len() as u64 + 8)
}

/// Fills in the length of the data begun at `data_at` and makes the file
/// durable.
pub(super) fn finish_file(file: &mut std::fs::File, data_at: u64, len: u64) -> Result<(), SnapshotFileError> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(data_at - 8)).map_err(write_err)?;
    file.write_all(&len.to_le_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// Makes the file at `from` the snapshot file, durably, under the lock that
/// builds and installs share. With `only_if_newer` it keeps a file that
/// already holds a later snapshot: a snapshot built from an older state can
/// finish after a newer one was installed from the leader, and must not
/// replace it (the log before the newer one may already be purged); `from`
/// is then removed. Returns whether it replaced.
pub(super) fn publish_locked(
    dir: &Path,
    from: &Path,
    on_disk: &std::sync::Mutex<Option<LogId>>,
    last_log_id: Option<LogId>,
    only_if_newer: bool,
) -> Result<bool, SnapshotFileError> {
    let mut on_disk = on_disk.lock().unwrap_or_else(|p| p.into_inner());
    if only_if_newer && on_disk.is_some() && *on_disk >= last_log_id {
        std::fs::remove_file(from).map_err(write_err)?;
        return Ok(false);
    }
    std::fs::rename(from, dir.join(SNAPSHOT_FILE)).map_err(write_err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
    *on_disk = last_log_id;
    Ok(true)
}

/// Writes a snapshot file at `path` of `meta` and the `len` bytes of data
/// that `data` holds from where it stands, copied through a small buffer.
pub(super) fn write_file_from(
    path: &Path,
    meta: &Meta,
    data: &mut std::fs::File,
    len: u64,
) -> Result<(), SnapshotFileError> {
    use std::io::Read;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, create_rw(path)?);
    let data_at = start_file(&mut out, meta)?;
    let copied = std::io::copy(&mut data.take(len), &mut out).map_err(write_err)?;
    if copied != len {
        return Err(SnapshotFileError::Damaged(format!("{copied} bytes of data where {len} were expected")));
    }
    let mut file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    finish_file(&mut file, data_at, len)
}

/// Writes a snapshot file of `meta` and every record of `tree`, one record
/// at a time, at `path`; on the commit thread, between two groups. Returns
/// the file, where its data begins and the data's length.
pub(super) fn build_file(
    files: &crate::mvcc::Files,
    path: &Path,
    meta: &Meta,
) -> Result<(std::fs::File, u64, u64), Error> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, create_rw(path)?);
    let data_at = start_file(&mut out, meta)?;
    let len = write_records(files, &mut out)?;
    let mut file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    finish_file(&mut file, data_at, len)?;
    Ok((file, data_at, len))
}

/// What the commit thread hands the builder: the file written, where its
/// data begins and the data's length, or why it could not be written.
pub(super) type Built = Result<(std::fs::File, u64, u64), Error>;

/// Builds a snapshot from a copy of the state the commit thread writes to
/// a file between two applies.
pub struct SnapshotBuilder {
    pub(super) shared: Arc<super::Shared>,
    pub(super) dir: PathBuf,
    pub(super) snapshot_file: Arc<std::sync::Mutex<Option<LogId>>>,
    /// The file as the commit thread writes it; taken by the build.
    pub(super) built: Option<oneshot::Receiver<Built>>,
    pub(super) meta: Meta,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(None, &e));
        let built = self.built.take().ok_or_else(|| fail(Error::internal("the snapshot was built already")))?;
        let (file, data_at, len) =
            built.await.unwrap_or_else(|_| Err(CommitError::Gone("before the copy").into())).map_err(fail)?;
        // The log up to the snapshot may be purged once it is returned, so the
        // applied state must be on disk first.
        self.shared.flush().await.map_err(fail)?;
        let (dir, on_disk, last) = (self.dir.clone(), self.snapshot_file.clone(), self.meta.last_log_id);
        let written = crate::raft::blocking(move || {
            Ok(publish_locked(&dir, &part_path(&dir, BUILD_PART), &on_disk, last, true)?)
        })
        .await
        .map_err(fail)?;
        let meta = self.meta.clone();
        if written {
            tracing::info!(snapshot = %meta.snapshot_id, bytes = len, "built snapshot");
        } else {
            // The open file still reads what was built, though it is gone.
            tracing::info!(snapshot = %meta.snapshot_id, "built snapshot is older than the one on disk; kept that one");
        }
        let data = SnapshotData::new(file, data_at).map_err(|e| fail(Error::internal(e)))?;
        Ok(Snapshot { meta, snapshot: Box::new(data) })
    }
}

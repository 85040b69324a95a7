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
/// The part an installed snapshot is written into as the member's own
/// (see [`super::records::write_state`]).
pub(super) const OWN_PART: &str = "own";
use tokio::sync::oneshot;

use super::super::committer::CommitError;
use super::super::{encode, CodecError, LogId, Node, NodeId, StorageError, TypeConfig};
use super::data::SnapshotData;
use super::records::{write_state, AsOf};
use super::{BACKUP_PREFIX, SNAPSHOT_FILE};
use crate::error::Error;
use crate::mvcc::values::ValueLog;

/// The snapshot file is bincode's layout of a struct `{ meta, data }`
/// with `data` a byte string: the metadata, the data's length (u64,
/// little-endian), then the data (see [`super::records::RecordsOut`]). A
/// member's own snapshot file keeps its large values in the state tree's
/// value file rather than a second time (see
/// [`super::records::write_state`]); its metadata is then followed by
/// [`POINTS_INTO_VALUES`], the id of that value file, the data's length
/// with every value in place, and then the data's length and the data as
/// above. It is written and read in parts, so the data is never held in
/// memory.
///
/// No data is this long: a file whose first length is this has the longer
/// header.
const POINTS_INTO_VALUES: u64 = u64::from_le_bytes(*b"kvd.vals");

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
    /// The data's length as it is sent, with every value in place.
    pub(super) whole_len: u64,
    /// The id of the value file the data points into, if it does.
    pub(super) values: Option<u64>,
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
    let mut read_u64 = || {
        let mut n = [0u8; 8];
        reader.read_exact(&mut n).map(|()| u64::from_le_bytes(n)).map_err(io)
    };
    let (values, whole_len, len) = match read_u64()? {
        POINTS_INTO_VALUES => {
            let (values, whole_len) = (read_u64()?, read_u64()?);
            (Some(values), whole_len, read_u64()?)
        }
        len => (None, len, len),
    };
    let data_at = reader.stream_position().map_err(io)?;
    let mut file = reader.into_inner();
    let size = file.metadata().map_err(io)?.len();
    if size.checked_sub(data_at) != Some(len) {
        return Err(SnapshotFileError::Damaged(format!(
            "the file says {len} bytes of data and holds {}",
            size.saturating_sub(data_at)
        )));
    }
    if whole_len < len {
        return Err(SnapshotFileError::Damaged(format!("{whole_len} bytes of whole data in {len} bytes")));
    }
    file.seek(SeekFrom::Start(data_at)).map_err(io)?;
    Ok(Some(OpenSnapshot { meta, file, data_at, len, whole_len, values }))
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

/// How much of a large file is written before it is made durable so far.
/// A member writes its snapshot files beside the Raft log, and the log's
/// fsyncs queue behind whatever the disk is flushing: on this machine's
/// disk, beside a file of 300 MiB made durable at its end, a small write
/// and fdatasync waited up to 73–120 ms, and 7–10 ms with the file made
/// durable every 8 MiB. In a load of 1,000,000 keys of 1 KiB (ten
/// snapshots), three members' log fsyncs over 16 ms went from 134 to 36.
pub(super) const SYNC_EVERY: u64 = 8 << 20;

/// A file written in steps of [`SYNC_EVERY`], each made durable before the
/// next (see there), behind a buffer of 1 MiB.
pub(super) struct Paced {
    file: std::fs::File,
    unsynced: u64,
}

impl Paced {
    /// A buffered writer of `file`, made durable every [`SYNC_EVERY`].
    pub(super) fn writer(file: std::fs::File) -> std::io::BufWriter<Paced> {
        std::io::BufWriter::with_capacity(1 << 20, Paced { file, unsynced: 0 })
    }

    /// The file, once what the buffer held is written; not yet durable.
    pub(super) fn into_file(out: std::io::BufWriter<Paced>) -> std::io::Result<std::fs::File> {
        Ok(out.into_inner().map_err(|e| e.into_error())?.file)
    }
}

impl std::io::Write for Paced {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl std::io::Seek for Paced {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.file.seek(to)
    }
}

/// Writes the header of a snapshot file: the metadata, and lengths to be
/// filled in by [`finish_file`]; with `values`, the header of one whose
/// data points into the value file of that id. Returns where the data
/// begins.
pub(super) fn start_file(
    out: &mut impl std::io::Write,
    meta: &Meta,
    values: Option<u64>,
) -> Result<u64, SnapshotFileError> {
    let mut head = encode(meta)?;
    if let Some(values) = values {
        for n in [POINTS_INTO_VALUES, values, 0] {
            head.extend_from_slice(&n.to_le_bytes());
        }
    }
    out.write_all(&head).map_err(write_err)?;
    out.write_all(&0u64.to_le_bytes()).map_err(write_err)?;
    Ok(head.len() as u64 + 8)
}

/// Fills in the length of the data begun at `data_at`, and with
/// `whole_len` its length with every value in place, and makes the file
/// durable.
pub(super) fn finish_file(
    file: &mut std::fs::File,
    data_at: u64,
    len: u64,
    whole_len: Option<u64>,
) -> Result<(), SnapshotFileError> {
    use std::io::{Seek, SeekFrom, Write};
    if let Some(whole_len) = whole_len {
        file.seek(SeekFrom::Start(data_at - 16)).map_err(write_err)?;
        file.write_all(&whole_len.to_le_bytes()).map_err(write_err)?;
    }
    file.seek(SeekFrom::Start(data_at - 8)).map_err(write_err)?;
    file.write_all(&len.to_le_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// What a member knows of the snapshot file it holds.
#[derive(Debug, Default)]
pub(super) struct OnDisk {
    /// The last log id of its snapshot.
    pub(super) last: Option<LogId>,
    /// The value file its data points into, if it does: held open, so that
    /// it still reads once a defragment or an install has removed it, until
    /// a snapshot of the new state replaces this one.
    pub(super) values: Option<Arc<ValueLog>>,
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
    on_disk: &std::sync::Mutex<OnDisk>,
    last_log_id: Option<LogId>,
    values: Option<Arc<ValueLog>>,
    only_if_newer: bool,
) -> Result<bool, SnapshotFileError> {
    let mut on_disk = on_disk.lock().unwrap_or_else(|p| p.into_inner());
    if only_if_newer && on_disk.last.is_some() && on_disk.last >= last_log_id {
        std::fs::remove_file(from).map_err(write_err)?;
        return Ok(false);
    }
    std::fs::rename(from, dir.join(SNAPSHOT_FILE)).map_err(write_err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
    *on_disk = OnDisk { last: last_log_id, values };
    Ok(true)
}

/// Writes a snapshot file at `path` of `meta` and `len` bytes of data,
/// which `copy` writes into it and counts.
pub(super) fn write_file_with<E: From<SnapshotFileError>>(
    path: &Path,
    meta: &Meta,
    len: u64,
    copy: impl FnOnce(&mut dyn std::io::Write) -> Result<u64, E>,
) -> Result<(), E> {
    let mut out = Paced::writer(create_rw(path)?);
    let data_at = start_file(&mut out, meta, None)?;
    let copied = copy(&mut out)?;
    if copied != len {
        return Err(SnapshotFileError::Damaged(format!("{copied} bytes of data where {len} were expected")).into());
    }
    let mut file = Paced::into_file(out).map_err(write_err)?;
    Ok(finish_file(&mut file, data_at, len, None)?)
}

/// A snapshot file written and made durable, not yet published.
pub(super) struct BuiltFile {
    pub(super) file: std::fs::File,
    pub(super) data_at: u64,
    pub(super) len: u64,
    pub(super) whole_len: u64,
    /// The value file its data points into.
    pub(super) values: Arc<ValueLog>,
}

impl BuiltFile {
    /// Its data as openraft sends it, with every value in place.
    pub(super) fn data(self) -> SnapshotData {
        SnapshotData::expanding(self.file, self.data_at, self.len, self.whole_len, self.values)
    }
}

/// Writes a snapshot file of `meta` and every record of `files` as the
/// tree holds them (see [`write_state`]), one record at a time, at `path`;
/// beside the commit thread as of `as_of` (see [`super::copies`]), or, without,
/// while nothing is committed.
pub(super) fn build_file(
    files: &crate::mvcc::Files,
    as_of: Option<&AsOf>,
    path: &Path,
    meta: &Meta,
) -> Result<BuiltFile, Error> {
    let mut out = Paced::writer(create_rw(path)?);
    let data_at = start_file(&mut out, meta, Some(files.values.id()))?;
    let (_, len, whole_len) = write_state(files, as_of, &mut out)?;
    let mut file = Paced::into_file(out).map_err(write_err)?;
    finish_file(&mut file, data_at, len, Some(whole_len))?;
    Ok(BuiltFile { file, data_at, len, whole_len, values: files.values.clone() })
}

/// What the copy hands the builder: the file written, or why it could not
/// be written.
pub(super) type Built = Result<BuiltFile, Error>;

/// Builds a snapshot from a copy of the state as of one applied entry,
/// written to a file beside the commit thread.
pub struct SnapshotBuilder {
    pub(super) shared: Arc<super::Shared>,
    pub(super) dir: PathBuf,
    pub(super) snapshot_file: Arc<std::sync::Mutex<OnDisk>>,
    /// The file as the copy writes it; taken by the build.
    pub(super) built: Option<oneshot::Receiver<Built>>,
    pub(super) meta: Meta,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let fail = |e: Error| StorageError::from(StorageIOError::write_snapshot(None, &e));
        let built = self.built.take().ok_or_else(|| fail(Error::internal("the snapshot was built already")))?;
        let built = built.await.unwrap_or_else(|_| Err(CommitError::Gone("before the copy").into())).map_err(fail)?;
        // The log up to the snapshot may be purged once it is returned, so the
        // applied state must be on disk first.
        self.shared.flush().await.map_err(fail)?;
        let (dir, on_disk, last) = (self.dir.clone(), self.snapshot_file.clone(), self.meta.last_log_id);
        let values = built.values.clone();
        let written = crate::raft::blocking(move || {
            Ok(publish_locked(&dir, &part_path(&dir, BUILD_PART), &on_disk, last, Some(values), true)?)
        })
        .await
        .map_err(fail)?;
        let meta = self.meta.clone();
        if written {
            tracing::info!(
                snapshot = %meta.snapshot_id,
                bytes = built.len,
                bytes_sent = built.whole_len,
                "built snapshot"
            );
        } else {
            // The open file still reads what was built, though it is gone.
            tracing::info!(snapshot = %meta.snapshot_id, "built snapshot is older than the one on disk; kept that one");
        }
        let data = built.data();
        Ok(Snapshot { meta, snapshot: Box::new(data) })
    }
}

//! The data of a snapshot as openraft reads and writes it: a file on disk,
//! never a buffer in memory, so a member sends and takes snapshots of any
//! size in memory bounded by one chunk.

use std::io::SeekFrom;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// A snapshot's data: the part of a file from `base` on. The snapshot file
/// begins with its metadata, which is not data: openraft's offsets count
/// from `base`, so what is sent is the records alone, in the layout every
/// kvd version sends and reads.
#[derive(Debug)]
pub struct SnapshotData {
    file: tokio::fs::File,
    base: u64,
    /// A file being received: removed when the data is dropped unused (a
    /// stream the leader gave up).
    receiving: Option<std::path::PathBuf>,
}

impl Drop for SnapshotData {
    fn drop(&mut self) {
        if let Some(path) = self.receiving.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl SnapshotData {
    /// The data of `file` from `base` on, positioned at its start.
    pub(super) fn new(mut file: std::fs::File, base: u64) -> std::io::Result<SnapshotData> {
        use std::io::Seek;
        file.seek(SeekFrom::Start(base))?;
        Ok(SnapshotData { file: tokio::fs::File::from_std(file), base, receiving: None })
    }

    /// A new file at `path` to receive a snapshot's data into.
    pub(super) fn receive_into(path: std::path::PathBuf) -> Result<SnapshotData, super::snapshot::SnapshotFileError> {
        let file = super::snapshot::create_rw(&path)?;
        Ok(SnapshotData { file: tokio::fs::File::from_std(file), base: 0, receiving: Some(path) })
    }

    /// The file, once every write handed to it has reached it; where in it
    /// the data begins; and, for a received file, its path, which the caller
    /// now removes.
    pub(super) async fn into_file(mut self) -> std::io::Result<(std::fs::File, u64, Option<std::path::PathBuf>)> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        let receiving = self.receiving.take();
        // A clone of the handle: `self` cannot be taken apart, as it has a
        // Drop of its own.
        let file = self.file.try_clone().await?.into_std().await;
        Ok((file, self.base, receiving))
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        let position = match position {
            SeekFrom::Start(at) => SeekFrom::Start(self.base.checked_add(at).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "snapshot offset out of range")
            })?),
            other => other,
        };
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        // A position before the data is reported as its start (tokio asks
        // for the position before a seek begins, and does not know that of
        // a file it was handed).
        let base = self.base;
        Pin::new(&mut self.file).poll_complete(cx).map_ok(|at| at.saturating_sub(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    #[tokio::test]
    async fn offsets_count_from_the_data_and_writes_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"metaDATA").unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut data = SnapshotData::new(file, 4).unwrap();
        assert_eq!(data.seek(SeekFrom::End(0)).await.unwrap(), 4);
        assert_eq!(data.seek(SeekFrom::Start(1)).await.unwrap(), 1);
        let mut got = String::new();
        data.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "ATA");
        data.seek(SeekFrom::Start(4)).await.unwrap();
        data.write_all(b"+more").await.unwrap();
        assert_eq!(data.into_file().await.unwrap().1, 4);
        // A received file goes when its data is dropped unused, and stays
        // when it is taken.
        let dropped = dir.path().join("dropped");
        drop(SnapshotData::receive_into(dropped.clone()).unwrap());
        assert!(!dropped.exists());
        let taken = dir.path().join("taken");
        let (_, base, kept) = SnapshotData::receive_into(taken.clone()).unwrap().into_file().await.unwrap();
        assert_eq!((base, kept.as_deref()), (0, Some(taken.as_path())));
        assert!(taken.exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"metaDATA+more");
    }
}

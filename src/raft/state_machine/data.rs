//! The data of a snapshot as openraft reads and writes it: a file on disk,
//! never a buffer in memory, so a member sends and takes snapshots of any
//! size in memory bounded by a few chunks.

use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::preload::Preload;
use crate::mvcc::keys::HIST;
use crate::mvcc::values::{whole_len, whole_record, ValueLog};

/// A snapshot's data. openraft's offsets count from the start of the data,
/// so what is sent is the records alone, in the layout every kvd version
/// sends and reads.
#[derive(Debug)]
pub struct SnapshotData(Inner);

#[derive(Debug)]
enum Inner {
    /// The part of a file from `base` on, as it is sent.
    File {
        file: tokio::fs::File,
        base: u64,
        /// A file being received: removed when the data is dropped unused
        /// (a stream the leader gave up).
        receiving: Option<std::path::PathBuf>,
        /// The loader that follows a file being received.
        follow: Option<Follow>,
    },
    /// A member's own snapshot file, whose records point into a value file:
    /// read with every value put back in place.
    Expanding(Expanding),
}

impl Drop for SnapshotData {
    fn drop(&mut self) {
        if let Inner::File { receiving, .. } = &mut self.0 {
            if let Some(path) = receiving.take() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A loader following the writes into a file being received: each is
/// told to it once it is in the file, as long as they come in order.
#[derive(Debug)]
struct Follow {
    preload: Preload,
    /// Where the next write goes.
    pos: u64,
    /// The end of the writes made in order from the start.
    written: u64,
    in_order: bool,
}

impl Follow {
    /// The writes made so far are in the file.
    fn landed(&self) {
        if self.in_order {
            self.preload.arrivals().reached(self.written);
        }
    }

    fn wrote(&mut self, n: usize) {
        if self.in_order && self.pos != self.written {
            // A chunk sent again, or data not from the start: the install
            // loads the file as it ends up instead.
            self.in_order = false;
            self.preload.arrivals().stop("the data was not written in order");
        }
        self.pos += n as u64;
        if self.in_order {
            self.written = self.pos;
        }
    }
}

fn read_only() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Unsupported, "a built snapshot is not written to")
}

impl SnapshotData {
    /// The data of `file` from `base` on, positioned at its start.
    pub(crate) fn new(mut file: std::fs::File, base: u64) -> std::io::Result<SnapshotData> {
        use std::io::Seek;
        file.seek(SeekFrom::Start(base))?;
        Ok(SnapshotData(Inner::File { file: tokio::fs::File::from_std(file), base, receiving: None, follow: None }))
    }

    /// The `len` bytes of data of `file` from `data_at` on, whose records
    /// point into `values`, as the `whole_len` bytes they are with every
    /// value in place.
    pub(super) fn expanding(
        file: std::fs::File,
        data_at: u64,
        len: u64,
        whole_len: u64,
        values: Arc<ValueLog>,
    ) -> SnapshotData {
        let source = Arc::new(Source { file, data_at, len, whole_len, values });
        SnapshotData(Inner::Expanding(Expanding { source, at: 0, chunk: Vec::new(), used: 0, chunks: None }))
    }

    /// Whether it is read from a member's own snapshot file, with every
    /// value put back in place.
    pub(super) fn is_expanding(&self) -> bool {
        matches!(self.0, Inner::Expanding(_))
    }

    /// A new file at `path` to receive a snapshot's data into.
    pub(super) fn receive_into(path: std::path::PathBuf) -> Result<SnapshotData, super::snapshot::SnapshotFileError> {
        let file = super::snapshot::create_rw(&path)?;
        let file = tokio::fs::File::from_std(file);
        Ok(SnapshotData(Inner::File { file, base: 0, receiving: Some(path), follow: None }))
    }

    /// Has `preload` follow what is received into the file.
    pub(super) fn follow(&mut self, preload: Preload) {
        if let Inner::File { follow, .. } = &mut self.0 {
            *follow = Some(Follow { preload, pos: 0, written: 0, in_order: true });
        }
    }

    /// The file, once every write handed to it has reached it; where in it
    /// the data begins; and, for a received file, its path, which the caller
    /// now removes, and the loader that followed it.
    pub(super) async fn into_file(mut self) -> std::io::Result<Received> {
        use tokio::io::AsyncWriteExt;
        let Inner::File { file, base, receiving, follow } = &mut self.0 else { return Err(read_only()) };
        file.flush().await?;
        let receiving = receiving.take();
        let preload = follow.take().map(|f| {
            f.landed();
            f.preload
        });
        // A clone of the handle: `self` cannot be taken apart, as it has a
        // Drop of its own.
        let file = file.try_clone().await?.into_std().await;
        Ok(Received { file, base: *base, path: receiving, preload })
    }
}

/// A snapshot's data as [`SnapshotData::into_file`] gives it up.
pub(super) struct Received {
    pub(super) file: std::fs::File,
    /// Where in the file the data begins.
    pub(super) base: u64,
    /// The path of a file received, for the caller to remove.
    pub(super) path: Option<std::path::PathBuf>,
    /// The loader that followed it as it was received.
    pub(super) preload: Option<Preload>,
}

impl AsyncRead for SnapshotData {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Inner::File { file, .. } => Pin::new(file).poll_read(cx, buf),
            Inner::Expanding(e) => e.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.0 {
            Inner::File { file, follow: None, .. } => Pin::new(file).poll_write(cx, buf),
            Inner::File { file, follow: Some(follow), .. } => {
                // tokio writes in the background: the write before is in
                // the file once this is done.
                ready!(Pin::new(&mut *file).poll_flush(cx))?;
                follow.landed();
                let n = ready!(Pin::new(file).poll_write(cx, buf))?;
                follow.wrote(n);
                Poll::Ready(Ok(n))
            }
            Inner::Expanding(_) => Poll::Ready(Err(read_only())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Inner::File { file, follow, .. } => {
                ready!(Pin::new(file).poll_flush(cx))?;
                if let Some(f) = follow {
                    f.landed();
                }
                Poll::Ready(Ok(()))
            }
            Inner::Expanding(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Inner::File { file, follow, .. } => {
                ready!(Pin::new(file).poll_shutdown(cx))?;
                if let Some(f) = follow {
                    f.landed();
                }
                Poll::Ready(Ok(()))
            }
            Inner::Expanding(_) => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        match &mut self.0 {
            Inner::File { file, base, .. } => {
                let position = match position {
                    SeekFrom::Start(at) => SeekFrom::Start(base.checked_add(at).ok_or_else(out_of_range)?),
                    other => other,
                };
                Pin::new(file).start_seek(position)
            }
            Inner::Expanding(e) => e.seek(position),
        }
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match &mut self.0 {
            Inner::File { file, base, follow, .. } => {
                // A position before the data is reported as its start
                // (tokio asks for the position before a seek begins, and
                // does not know that of a file it was handed).
                let at = ready!(Pin::new(file).poll_complete(cx))?.saturating_sub(*base);
                if let Some(f) = follow {
                    f.pos = at;
                }
                Poll::Ready(Ok(at))
            }
            Inner::Expanding(e) => Poll::Ready(Ok(e.at)),
        }
    }
}

fn out_of_range() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "snapshot offset out of range")
}

/// Chunks of whole data a thread puts together ahead of the reader.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks made ahead of the reader at most.
const CHUNKS_AHEAD: usize = 2;

/// What whole data is read from.
#[derive(Debug)]
struct Source {
    file: std::fs::File,
    data_at: u64,
    len: u64,
    whole_len: u64,
    values: Arc<ValueLog>,
}

/// Data read with every value in place: a thread reads the records one at
/// a time and puts each value back, a few chunks ahead of the reader. A
/// seek anywhere but where reading stands starts it again from there
/// (openraft reads on from where it stands, and begins again from an
/// earlier offset only when a chunk failed).
#[derive(Debug)]
struct Expanding {
    source: Arc<Source>,
    /// Where reading stands, in the whole data.
    at: u64,
    /// The chunk being read, and how much of it was.
    chunk: Vec<u8>,
    used: usize,
    chunks: Option<mpsc::Receiver<std::io::Result<Vec<u8>>>>,
}

impl Expanding {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<()> {
        let to = match position {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(by) => self.source.whole_len.checked_add_signed(by),
            SeekFrom::Current(by) => self.at.checked_add_signed(by),
        };
        let to = to.ok_or_else(out_of_range)?;
        if to != self.at {
            self.chunks = None;
            self.chunk.clear();
            self.used = 0;
            self.at = to;
        }
        Ok(())
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if self.used < self.chunk.len() {
                let n = buf.remaining().min(self.chunk.len() - self.used);
                buf.put_slice(&self.chunk[self.used..self.used + n]);
                self.used += n;
                self.at += n as u64;
                return Poll::Ready(Ok(()));
            }
            if self.at >= self.source.whole_len || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if self.chunks.is_none() {
                let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
                let (source, from) = (self.source.clone(), self.at);
                std::thread::Builder::new().name("snapshot-send".into()).spawn(move || {
                    if let Err(e) = expand(&source, from, &tx) {
                        let _ = tx.blocking_send(Err(e));
                    }
                })?;
                self.chunks = Some(rx);
            }
            let Some(chunks) = self.chunks.as_mut() else { continue };
            match ready!(chunks.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.used = 0;
                }
                Some(Err(e)) => {
                    self.chunks = None;
                    return Poll::Ready(Err(e));
                }
                None => {
                    self.chunks = None;
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("snapshot data ended at {} of {} bytes", self.at, self.source.whole_len),
                    )));
                }
            }
        }
    }
}

/// Sends the whole data of `source` from the offset `from` on, in chunks,
/// until it ends or the reader is gone. A record wholly before `from` is
/// counted, not read.
fn expand(source: &Source, from: u64, out: &mpsc::Sender<std::io::Result<Vec<u8>>>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut count = [0u8; 8];
    source.file.read_exact_at(&mut count, source.data_at)?;
    let mut chunks = Chunks { out, skip: from, chunk: Vec::with_capacity(CHUNK_BYTES), sent: 0 };
    chunks.put(&count);
    let reader = std::io::Read::take(ReadAt { file: &source.file, at: source.data_at }, source.len);
    let each = |k: &[u8], v: &[u8]| -> Result<(), crate::error::Error> {
        let value = match k.first() {
            Some(&HIST) => {
                let whole = (16 + k.len() + whole_len(v)?) as u64;
                if chunks.skip >= whole {
                    // Wholly passed over: its value is not read.
                    chunks.skip -= whole;
                    chunks.sent += whole;
                    return Ok(());
                }
                whole_record(v, &source.values)?
            }
            _ => std::borrow::Cow::Borrowed(v),
        };
        for part in [k, &value[..]] {
            chunks.put(&(part.len() as u64).to_le_bytes());
            chunks.put(part);
        }
        chunks.send_full().map_err(crate::error::Error::internal)
    };
    super::records::for_each_record(reader, source.len, each).map_err(std::io::Error::other)?;
    if chunks.sent != source.whole_len {
        return Err(std::io::Error::other(format!(
            "snapshot data is {} bytes whole where its file says {}",
            chunks.sent, source.whole_len
        )));
    }
    chunks.send()
}

/// Whole data put together into chunks for the reader.
struct Chunks<'o> {
    out: &'o mpsc::Sender<std::io::Result<Vec<u8>>>,
    /// Bytes still to be passed over before the reader's offset.
    skip: u64,
    chunk: Vec<u8>,
    /// Bytes of whole data gone by, passed over or not.
    sent: u64,
}

impl Chunks<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let passed = self.skip.min(bytes.len() as u64) as usize;
        self.skip -= passed as u64;
        self.chunk.extend_from_slice(&bytes[passed..]);
        self.sent += bytes.len() as u64;
    }

    /// Sends the chunk once it is full.
    fn send_full(&mut self) -> std::io::Result<()> {
        if self.chunk.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_BYTES));
        self.out.blocking_send(Ok(full)).map_err(|_| std::io::Error::other("the reader is gone"))
    }
}

/// Reads a file from an offset on without moving its cursor, which others
/// share.
struct ReadAt<'f> {
    file: &'f std::fs::File,
    at: u64,
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
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
        assert_eq!(data.into_file().await.unwrap().base, 4);
        // A received file goes when its data is dropped unused, and stays
        // when it is taken.
        let dropped = dir.path().join("dropped");
        drop(SnapshotData::receive_into(dropped.clone()).unwrap());
        assert!(!dropped.exists());
        let taken = dir.path().join("taken");
        let Received { base, path: kept, .. } =
            SnapshotData::receive_into(taken.clone()).unwrap().into_file().await.unwrap();
        assert_eq!((base, kept.as_deref()), (0, Some(taken.as_path())));
        assert!(taken.exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"metaDATA+more");
    }
}

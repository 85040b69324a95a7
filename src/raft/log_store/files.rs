//! The log store's files: segments and their records, checked as they are
//! read, and the small files that hold the vote and the purge point.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::super::{decode, Entry};
use super::{io_err, Inner, Loc, LogError, Segment, HEADER_BYTES, MAX_RECORD_BYTES};

pub(super) fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

pub(super) fn create_segment(dir: &Path, first: u64) -> Result<Segment, LogError> {
    let path = dir.join(segment_name(first));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| io_err(format!("create {}", path.display()), e))?;
    sync_dir(dir)?;
    Ok(Segment { file: Arc::new(file), path, len: 0, allocated: 0 })
}

/// Allocates `file` (zeros) from `from` up to `to` bytes; returns its size
/// afterwards. If the file system cannot, the file just grows as it is
/// written.
pub(super) fn preallocate(file: &File, from: u64, to: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(from), libc::off_t::try_from(to.saturating_sub(from))) else {
        return from;
    };
    // SAFETY: posix_fallocate only reads its integer arguments; the file
    // descriptor is open for as long as `file` is borrowed.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), offset, len) } {
        0 => to,
        errno => {
            tracing::debug!(errno, "could not allocate the raft log ahead; it grows as it is written");
            from
        }
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(format!("sync {}", dir.display()), e))
}

/// Whether a whole record of an entry after index `previous` starts anywhere
/// in `data` from `from` on.
pub(super) fn whole_record_after(data: &[u8], from: usize, previous: Option<u64>) -> bool {
    (from..data.len().saturating_sub(HEADER_BYTES as usize)).any(|at| {
        let Some(len) = data.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) else {
            return false;
        };
        if len == 0 || at + HEADER_BYTES as usize + len as usize > data.len() {
            return false;
        }
        check_record(&data[at..])
            .and_then(|payload| decode::<Entry>(payload).ok())
            .is_some_and(|e| previous.is_none_or(|p| e.log_id.index > p))
    })
}

/// The payload of the record at the start of `buf`, if it is whole and its
/// checksum matches.
pub(super) fn check_record(buf: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let payload = buf.get(8..8 + len as usize)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// Reads and checks a segment's records into `inner.locs`; returns the
/// segment's valid length and its file size. A damaged tail of the last
/// segment is cut off.
pub(super) fn scan_segment(
    file: &File,
    path: &Path,
    first: u64,
    last: bool,
    inner: &mut Inner,
) -> Result<(u64, u64), LogError> {
    let size = file.metadata().map_err(|e| io_err(format!("stat {}", path.display()), e))?.len();
    let data = {
        let mut buf = vec![0u8; size as usize];
        file.read_exact_at(&mut buf, 0).map_err(|e| io_err(format!("read {}", path.display()), e))?;
        buf
    };
    let purged = inner.purged.map(|p| p.index);
    let mut offset = 0u64;
    let mut previous = inner.locs.back().map(|l| l.log_id.index);
    while offset < size {
        let at = offset as usize;
        // The records end where the zeros allocated ahead of them begin.
        if data[at..].starts_with(&[0; 4]) && data[at..].iter().all(|&b| b == 0) {
            break;
        }
        let record = data.get(at..at + HEADER_BYTES as usize).and_then(|h| {
            let len = u32::from_le_bytes(h[0..4].try_into().ok()?);
            if len > MAX_RECORD_BYTES {
                return None;
            }
            let payload = check_record(&data[at..])?;
            let entry: Entry = decode(payload).ok()?;
            Some((entry.log_id, len))
        });
        let Some((log_id, len)) = record else {
            // A crash tears only the last, unsynced writes: nothing whole
            // can follow them. A whole record after the damage means records
            // that were on disk were damaged since, so they are not cut off.
            if last && !whole_record_after(&data, at + 1, previous) {
                tracing::warn!(
                    segment = %path.display(), offset, "cutting off a damaged record at the end of the raft log (a write torn by a crash)"
                );
                file.set_len(offset).map_err(|e| io_err(format!("truncate {}", path.display()), e))?;
                file.sync_data().map_err(|e| io_err(format!("sync {}", path.display()), e))?;
                return Ok((offset, offset));
            }
            return Err(LogError::damaged(format!(
                "raft log segment {} is damaged at byte {offset}; refusing to start",
                path.display()
            )));
        };
        if previous.is_some_and(|p| log_id.index <= p) {
            return Err(LogError::damaged(format!(
                "raft log segment {} holds index {} after index {}; refusing to start",
                path.display(),
                log_id.index,
                previous.unwrap_or_default()
            )));
        }
        if purged.is_none_or(|p| log_id.index > p) {
            inner.locs.push_back(Loc { log_id, segment: first, offset, len });
        }
        previous = Some(log_id.index);
        offset += HEADER_BYTES + len as u64;
    }
    Ok((offset, size))
}

pub(super) fn read_small_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, LogError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let payload = check_record(&bytes)
                .ok_or_else(|| LogError::damaged(format!("{} is damaged; refusing to start", path.display())))?;
            Ok(Some(decode(payload)?))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("read {}", path.display()), e)),
    }
}

/// Replaces `dir/name` with one checksummed record, atomically and durably.
pub(super) fn write_small_file(dir: &Path, name: &str, payload: &[u8]) -> Result<(), LogError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut bytes = Vec::with_capacity(payload.len() + 8);
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    let f = File::create(&tmp).map_err(|e| io_err(format!("create {}", tmp.display()), e))?;
    f.write_all_at(&bytes, 0).and_then(|_| f.sync_all()).map_err(|e| io_err(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| io_err(format!("rename {}", tmp.display()), e))?;
    sync_dir(dir)
}

//! Values kept apart from sled's pages, in an append-only file of kvd's own.
//!
//! sled keeps every page it has read in memory until its cache evicts it,
//! and its cache lets whole passes over the store stay resident: with values
//! of 16 KiB, a member restarted over 4 GiB of them grew past 1 GiB in the
//! scan that rebuilds its key index (see docs/performance.md, data larger
//! than memory). So a version whose value is [`SEPARATE_FROM`] bytes or more
//! keeps in sled only its key-value without the value, and where the value
//! is in the store's value file: sled's pages stay small whatever the values
//! are, and a value is read from the file with one positioned read, through
//! the operating system's page cache, which gives memory back under
//! pressure.
//!
//! A value is written to the file, and the file synced, on the commit
//! thread before the sled batch that points at it is applied: sled may write
//! what it was given at any time, so whatever it holds on disk points at
//! bytes already on disk. What a crash leaves after the last synced value is
//! never pointed at, and later values go after it.
//!
//! A history record's value in sled is either the key-value's protobuf
//! encoding, value included (always so for small values, and for every
//! record an older kvd wrote), or a separated record: [`SEPARATED`], the
//! value's CRC-32, its offset in the file and its length, then the protobuf
//! encoding of the key-value without its value. A protobuf encoding never
//! starts with the byte [`SEPARATED`] (it would be field 0), so the two
//! never look alike. Snapshot data, backups and the history hash carry the
//! whole key-value, as every kvd version writes and reads it.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prost::Message;

use super::StoreError;
use crate::error::Result;
use crate::proto::mvccpb::KeyValue;

/// Values of this many bytes or more are kept in the value file. Smaller
/// ones stay in sled's record: a value of 256 bytes costs sled's page
/// little, and a read of it no second read.
pub const SEPARATE_FROM: usize = 512;

/// Values are gathered into writes of about this many bytes.
const WRITE_BYTES: usize = 1 << 20;

/// The first byte of a separated record.
pub const SEPARATED: u8 = 0x01;

/// Bytes of a separated record before the key-value: the marker, CRC-32,
/// offset and length.
const HEADER: usize = 1 + 4 + 8 + 4;

/// Where a value is in the value file, and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    crc: u32,
    offset: u64,
    len: u32,
}

impl Pointer {
    /// The byte of the value file just past the value.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }

    /// The pointer in the header of a separated record.
    fn of(stored: &[u8]) -> Result<Pointer> {
        let header = stored.get(..HEADER).ok_or_else(|| StoreError::corrupt("separated record header"))?;
        let field = |at: usize, n: usize| {
            let mut buf = [0u8; 8];
            buf[8 - n..].copy_from_slice(&header[at..at + n]);
            u64::from_be_bytes(buf)
        };
        Ok(Pointer { crc: field(1, 4) as u32, offset: field(5, 8), len: field(13, 4) as u32 })
    }
}

/// A history record's value in sled, taken apart.
pub struct Stored {
    /// The key-value, without its value if that is in the value file.
    pub kv: KeyValue,
    /// Where the value is, if it is in the value file.
    pub apart: Option<Pointer>,
}

impl Stored {
    /// Takes apart a history record's value as sled holds it.
    pub fn decode(stored: &[u8]) -> Result<Stored> {
        let corrupt = |e: prost::DecodeError| StoreError::corrupt(format!("key-value record: {e}"));
        if stored.first() != Some(&SEPARATED) {
            return Ok(Stored { kv: KeyValue::decode(stored).map_err(corrupt)?, apart: None });
        }
        let apart = Pointer::of(stored)?;
        Ok(Stored { kv: KeyValue::decode(&stored[HEADER..]).map_err(corrupt)?, apart: Some(apart) })
    }

    /// The whole key-value: its value read from `values` if it is there.
    pub fn load(self, values: &ValueLog) -> Result<KeyValue> {
        let mut kv = self.kv;
        if let Some(at) = self.apart {
            kv.value = values.read(&at)?;
        }
        Ok(kv)
    }
}

/// The whole key-value of a history record's value as sled holds it.
pub fn load_kv(stored: &[u8], values: &ValueLog) -> Result<KeyValue> {
    Stored::decode(stored)?.load(values)
}

/// A history record as snapshot data carries it: the whole key-value. One
/// that names a place in a value file is refused: no such file comes with
/// it.
pub fn decode_whole(record: &[u8]) -> Result<KeyValue> {
    if record.first() == Some(&SEPARATED) {
        return Err(StoreError::corrupt("history record: a value kept apart in snapshot data").into());
    }
    Ok(KeyValue::decode(record).map_err(|e| StoreError::corrupt(format!("key-value record: {e}")))?)
}

/// The record as every kvd version reads it: the protobuf encoding of the
/// whole key-value. Borrowed when that is what sled holds.
pub fn whole_record<'a>(stored: &'a [u8], values: &ValueLog) -> Result<Cow<'a, [u8]>> {
    if stored.first() != Some(&SEPARATED) {
        return Ok(Cow::Borrowed(stored));
    }
    Ok(Cow::Owned(load_kv(stored, values)?.encode_to_vec()))
}

/// Bytes the whole key-value's encoding takes, for a history record's
/// value as sled holds it: what [`whole_record`] would give, without
/// reading the value.
pub fn whole_len(stored: &[u8]) -> Result<usize> {
    Ok(match stored.first() {
        // `of` checks that the header is there before it is counted off.
        Some(&SEPARATED) => value_field_len(Pointer::of(stored)?.len as usize) + stored.len() - HEADER,
        _ => stored.len(),
    })
}

/// Bytes a history record counts for in the store's use (see
/// [`super::MvccStore::bytes_in_use`]): its key and the whole key-value's
/// encoding, wherever the value is kept, so that members agree however
/// they keep it.
pub fn record_bytes(rec: &[u8], stored: &[u8]) -> Result<u64> {
    Ok((rec.len() + whole_len(stored)?) as u64)
}

/// Bytes the value field of a key-value's encoding takes for a value of
/// `len` bytes: none for an empty one, as protobuf leaves it out.
fn value_field_len(len: usize) -> usize {
    match len {
        0 => 0,
        _ => 1 + prost::encoding::encoded_len_varint(len as u64) + len,
    }
}

/// A version to be written whose value goes to the value file when its
/// batch is committed (see [`super::Batch::separate_values`]).
#[derive(Debug)]
pub struct Apart {
    /// The key-value without its value.
    without: KeyValue,
    value: Vec<u8>,
}

impl Apart {
    /// `kv` kept apart if its value is large enough, with the bytes its
    /// record will count for; otherwise its whole encoding.
    pub fn of(kv: &KeyValue) -> std::result::Result<Apart, Vec<u8>> {
        if kv.value.len() < SEPARATE_FROM || kv.value.len() > u32::MAX as usize {
            return Err(kv.encode_to_vec());
        }
        let without = KeyValue {
            key: kv.key.clone(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            value: Vec::new(),
            lease: kv.lease,
        };
        Ok(Apart { without, value: kv.value.clone() })
    }

    /// Bytes its record counts for, as [`record_bytes`] counts them once
    /// it is written.
    pub fn bytes(&self, rec: &[u8]) -> u64 {
        (rec.len() + self.without.encoded_len() + value_field_len(self.value.len())) as u64
    }

    /// The value, to be appended to a value file.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The record sled holds once the value is at `at`.
    pub fn record(&self, at: Pointer) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.without.encoded_len());
        out.push(SEPARATED);
        out.extend_from_slice(&at.crc.to_be_bytes());
        out.extend_from_slice(&at.offset.to_be_bytes());
        out.extend_from_slice(&at.len.to_be_bytes());
        self.without.encode_raw(&mut out);
        out
    }

    /// The whole key-value's encoding, for a batch whose values were not
    /// separated.
    pub fn whole(self) -> Vec<u8> {
        KeyValue { value: self.value, ..self.without }.encode_to_vec()
    }
}

/// The append-only file of a store's separated values.
#[derive(Debug)]
pub struct ValueLog {
    path: PathBuf,
    /// Names this file among every value file the data dir has held, so
    /// that a record kept elsewhere (a snapshot file) that points into it
    /// is never taken to point into another file of the same path.
    id: u64,
    file: File,
    /// Where the next value goes: the file's length when it was opened,
    /// and each append's end since. Set once an append is written, so a
    /// read never waits for one.
    end: AtomicU64,
    /// Held by the append under way.
    appending: Mutex<()>,
}

impl ValueLog {
    /// Opens the value file at `path`, made empty if it is not there, known
    /// by `id`.
    pub fn open(path: &Path, id: u64) -> Result<ValueLog> {
        let io = |e: std::io::Error| crate::error::Error::internal(format!("open {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
        let file = file.map_err(io)?;
        let end = file.metadata().map_err(io)?.len();
        if end == 0 {
            // The file's name is on disk before any record points into it.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(ValueLog { path: path.to_path_buf(), id, file, end: AtomicU64::new(end), appending: Mutex::new(()) })
    }

    /// Makes the value file at `path` empty, and opens it, known by `id`.
    pub fn create(path: &Path, id: u64) -> Result<ValueLog> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(crate::error::Error::internal(format!("remove {}: {e}", path.display())));
            }
            _ => {}
        }
        Self::open(path, id)
    }

    /// What names this file (see [`ValueLog`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `values`, gathered into writes of about [`WRITE_BYTES`],
    /// and returns where each is. They are on disk once
    /// [`ValueLog::sync`] returns.
    pub fn append<'v>(&self, values: impl IntoIterator<Item = &'v [u8]>) -> Result<Vec<Pointer>> {
        let _appending = self.appending.lock().unwrap_or_else(|p| p.into_inner());
        let write = |buf: &[u8], at: u64| {
            self.file
                .write_all_at(buf, at)
                .map_err(|e| crate::error::Error::internal(format!("write {}: {e}", self.path.display())))
        };
        // `buf` goes at `at`. What fails to be written is written over by
        // the next append: nothing points at it.
        let (mut buf, mut at) = (Vec::new(), self.end.load(Ordering::Acquire));
        let mut out = Vec::new();
        for value in values {
            out.push(Pointer { crc: crc32fast::hash(value), offset: at + buf.len() as u64, len: value.len() as u32 });
            buf.extend_from_slice(value);
            if buf.len() >= WRITE_BYTES {
                write(&buf, at)?;
                at += buf.len() as u64;
                buf.clear();
            }
        }
        write(&buf, at)?;
        self.end.store(at + buf.len() as u64, Ordering::Release);
        Ok(out)
    }

    /// Waits until every value appended is on disk.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| crate::error::Error::internal(format!("sync {}: {e}", self.path.display())))
    }

    /// Reads the value at `at`, and checks it.
    pub fn read(&self, at: &Pointer) -> Result<Vec<u8>> {
        // A damaged length is refused before anything is allocated for it.
        if at.offset.checked_add(at.len as u64).is_none_or(|end| end > self.len()) {
            return Err(StoreError::corrupt(format!(
                "value of {} bytes at {}: past the end of {}",
                at.len,
                at.offset,
                self.path.display()
            ))
            .into());
        }
        let mut value = vec![0u8; at.len as usize];
        self.file.read_exact_at(&mut value, at.offset).map_err(|e| {
            StoreError::corrupt(format!("value of {} bytes at {} of {}: {e}", at.len, at.offset, self.path.display()))
        })?;
        if crc32fast::hash(&value) != at.crc {
            return Err(StoreError::corrupt(format!(
                "value of {} bytes at {} of {}: checksum mismatch",
                at.len,
                at.offset,
                self.path.display()
            ))
            .into());
        }
        Ok(value)
    }

    /// Bytes the file takes.
    pub fn len(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Whether the file holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(value: Vec<u8>) -> KeyValue {
        KeyValue { key: b"k".to_vec(), create_revision: 2, mod_revision: 5, version: 3, value, lease: 7 }
    }

    #[test]
    fn a_large_value_is_kept_apart_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = ValueLog::create(&dir.path().join("v"), 1).unwrap();
        let big = kv(vec![9u8; SEPARATE_FROM]);
        let apart = Apart::of(&big).unwrap();
        let rec = b"hk".to_vec();
        let at = log.append([apart.value()]).unwrap();
        log.sync().unwrap();
        let stored = apart.record(at[0]);
        assert_eq!(record_bytes(&rec, &stored).unwrap(), apart.bytes(&rec));
        // Counted as the whole record is, wherever the value is kept.
        assert_eq!(apart.bytes(&rec), (rec.len() + big.encode_to_vec().len()) as u64);
        assert!(stored.len() < 64, "sled holds {} bytes", stored.len());
        assert_eq!(load_kv(&stored, &log).unwrap(), big);
        assert_eq!(whole_record(&stored, &log).unwrap().as_ref(), big.encode_to_vec().as_slice());
        // A small value stays in the record, as every older kvd wrote it.
        let small = kv(vec![1u8; SEPARATE_FROM - 1]);
        let whole = Apart::of(&small).unwrap_err();
        assert_eq!(load_kv(&whole, &log).unwrap(), small);
        assert!(matches!(whole_record(&whole, &log).unwrap(), Cow::Borrowed(_)));
        // Reopened, the file goes on after what it holds.
        drop(log);
        let log = ValueLog::open(&dir.path().join("v"), 1).unwrap();
        assert_eq!(log.len(), SEPARATE_FROM as u64);
        let more = log.append([&b"abc"[..], &b"de"[..]]).unwrap();
        assert_eq!(more[1].offset, SEPARATE_FROM as u64 + 3);
        assert_eq!(log.read(&more[1]).unwrap(), b"de");
        assert_eq!(load_kv(&stored, &log).unwrap(), big);
        // Many values at once go in several writes, each where it says.
        let many: Vec<Vec<u8>> = (0..300u32).map(|i| vec![i as u8; 5000 + i as usize]).collect();
        let at = log.append(many.iter().map(|v| v.as_slice())).unwrap();
        assert!(many.iter().map(|v| v.len()).sum::<usize>() > 1 << 20);
        for (value, at) in many.iter().zip(&at) {
            assert_eq!(&log.read(at).unwrap(), value);
        }
    }

    #[test]
    fn a_damaged_or_missing_value_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let log = ValueLog::create(&path, 1).unwrap();
        let apart = Apart::of(&kv(vec![3u8; 1000])).unwrap();
        let at = log.append([apart.value()]).unwrap()[0];
        let stored = apart.record(at);
        // A byte of the value changed on disk.
        log.file.write_all_at(&[4u8], at.offset + 10).unwrap();
        let e = load_kv(&stored, &log).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        // A value beyond the file's end (the file was cut short under a
        // member running, or a length damaged on disk).
        log.file.set_len(500).unwrap();
        let e = load_kv(&stored, &log).unwrap_err();
        assert!(e.to_string().contains("value of 1000 bytes"), "{e}");
        let mut huge = stored.clone();
        huge[13..17].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = load_kv(&huge, &log).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        // A record cut short in sled.
        let e = load_kv(&stored[..HEADER - 1], &log).unwrap_err();
        assert!(e.to_string().contains("separated record header"), "{e}");
        // ... and so is counting its bytes.
        let e = record_bytes(b"hk", &stored[..HEADER - 1]).unwrap_err();
        assert!(e.to_string().contains("separated record header"), "{e}");
        assert!(Stored::decode(&[SEPARATED; HEADER + 3]).is_err());
    }
}

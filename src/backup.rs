//! Snapshot files: what `snapshot save` writes (from the Maintenance
//! service's Snapshot stream), `snapshot status` describes and `snapshot
//! restore` makes a new data directory of.
//!
//! A file is [`MAGIC`]; the length of the records as a u64, little-endian;
//! every record of one member's state tree as of one applied entry, in the
//! layout of Raft snapshot data; zeros up to a multiple of 512 bytes; then
//! the SHA-256 of everything before it. etcd ends its snapshot stream with
//! such a digest, after a database whose size is a multiple of 512, and
//! `etcdctl snapshot save` checks both, so it saves kvd's snapshots too.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::mvcc::MvccStore;

/// Why a snapshot file could not be read, checked or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file, or the directory to restore into, is not what it must be.
    #[error("{0}")]
    Invalid(String),
    /// Reading the records or writing the new store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> Self {
        BackupError::Store(e.into())
    }
}

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 16] = b"kvd snapshot v1\n";

/// Bytes of the SHA-256 digest at the end of a file.
pub const DIGEST_LEN: usize = 32;

/// What a snapshot file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// CRC-32 of the file without its digest, as a short name for it.
    pub hash: u32,
    /// The revision it was taken at.
    pub revision: i64,
    /// The compacted revision it holds history from.
    pub compacted: i64,
    /// Live keys at `revision`.
    pub keys: usize,
    /// The file's size in bytes.
    pub size: u64,
}

/// The size that a file's body (all but its digest) is a multiple of.
pub const BODY_ALIGN: usize = 512;

/// The start of a file's body whose records are `len` bytes long: the
/// magic and the length.
pub fn body_start(len: u64) -> Vec<u8> {
    let mut start = MAGIC.to_vec();
    start.extend_from_slice(&len.to_le_bytes());
    start
}

/// The zeros after records of `len` bytes that end a file's body.
pub fn padding_len(len: u64) -> u64 {
    let body = (MAGIC.len() + 8) as u64 + len;
    body.next_multiple_of(BODY_ALIGN as u64) - body
}

/// The body of a file holding `records`, in parts: its start, the records,
/// and the zeros after them.
pub fn body(records: Vec<u8>) -> [Vec<u8>; 3] {
    let padding = vec![0; padding_len(records.len() as u64) as usize];
    [body_start(records.len() as u64), records, padding]
}

/// The SHA-256 digest of a file's body, given in parts, as it ends the file.
pub fn digest(parts: &[&[u8]]) -> [u8; DIGEST_LEN] {
    parts.iter().fold(Sha256::new(), |h, part| h.chain_update(part)).finalize().into()
}

/// What [`check_stream`] found in a file.
struct Checked {
    /// The records' length; they begin after the start of the body.
    len: u64,
    /// CRC-32 of the body.
    hash: u32,
}

/// Where a file's records begin.
const RECORDS_AT: u64 = (MAGIC.len() + 8) as u64;

/// Checks a whole file of `size` bytes as `file` reads it, a buffer at a
/// time: its digest, its first bytes and its length.
fn check_stream(file: impl Read, size: u64) -> Result<Checked, BackupError> {
    let io = |e: std::io::Error| BackupError::Invalid(format!("cannot read the file: {e}"));
    let mut file = std::io::BufReader::with_capacity(1 << 20, file.take(size));
    let mut magic = Vec::with_capacity(MAGIC.len());
    (&mut file).take(MAGIC.len() as u64).read_to_end(&mut magic).map_err(io)?;
    if magic != MAGIC {
        return Err(BackupError::Invalid(
            "not a kvd snapshot: the file does not begin with kvd's snapshot header (an etcd snapshot cannot be \
             restored into kvd; copy an etcd cluster's keys with `etcdctl make-mirror` instead)"
                .into(),
        ));
    }
    let bad = |why: &str| BackupError::Invalid(format!("damaged kvd snapshot: {why}"));
    let body_len = size.checked_sub(DIGEST_LEN as u64).ok_or_else(|| bad("too short"))?;
    let (mut sha, mut crc) = (Sha256::new().chain_update(MAGIC), crc32fast::Hasher::new());
    crc.update(MAGIC);
    // The length of the records, and where the body's last non-zero byte is.
    let (mut len_bytes, mut last_nonzero) = (Vec::with_capacity(8), 0u64);
    let mut at = MAGIC.len() as u64;
    let mut buf = vec![0u8; 1 << 20];
    while at < body_len {
        let want = (body_len - at).min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want]).map_err(io)?;
        if n == 0 {
            return Err(bad("its SHA-256 digest does not match (the file is damaged or was cut short)"));
        }
        let chunk = &buf[..n];
        sha.update(chunk);
        crc.update(chunk);
        let need = 8 - len_bytes.len();
        len_bytes.extend_from_slice(&chunk[..need.min(n)]);
        if let Some(i) = chunk.iter().rposition(|b| *b != 0) {
            last_nonzero = at + i as u64;
        }
        at += n as u64;
    }
    let mut sum = [0u8; DIGEST_LEN];
    file.read_exact(&mut sum).map_err(|_| bad("too short"))?;
    let ours: [u8; DIGEST_LEN] = sha.finalize().into();
    if body_len < MAGIC.len() as u64 || ours != sum {
        return Err(bad("its SHA-256 digest does not match (the file is damaged or was cut short)"));
    }
    let len: [u8; 8] = len_bytes.try_into().map_err(|_| bad("it ends before the length of its records"))?;
    let len = u64::from_le_bytes(len);
    let ends = RECORDS_AT.checked_add(len).filter(|end| *end <= body_len);
    match ends {
        Some(end) if last_nonzero < end.max(RECORDS_AT) && body_len % BODY_ALIGN as u64 == 0 => {
            Ok(Checked { len, hash: crc.finalize() })
        }
        _ => Err(bad("its records are not as long as it says")),
    }
}

/// Checks a whole file held in memory: its digest and its first bytes.
/// Returns the records.
pub fn check(file: &[u8]) -> Result<&[u8], BackupError> {
    let checked = check_stream(file, file.len() as u64)?;
    Ok(&file[RECORDS_AT as usize..(RECORDS_AT + checked.len) as usize])
}

/// Opens and checks the file at `path`. Returns it positioned at its
/// records, and what the check found.
fn open_checked(path: &Path) -> Result<(std::fs::File, Checked, u64), BackupError> {
    let cannot = |e: std::io::Error| BackupError::Invalid(format!("cannot read {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let size = file.metadata().map_err(cannot)?.len();
    let checked = check_stream(&mut file, size)?;
    file.seek(SeekFrom::Start(RECORDS_AT)).map_err(cannot)?;
    Ok((file, checked, size))
}

/// Loads the records of a checked file into `db`, whose directory is
/// `db_dir`, and says what they hold.
fn load(
    db: &sled::Db,
    db_dir: &Path,
    file: std::fs::File,
    checked: &Checked,
    size: u64,
) -> Result<Summary, BackupError> {
    let files = crate::raft::state_machine::load_backup(db, db_dir, file, checked.len)?;
    let store = MvccStore::open(files)?;
    Ok(Summary {
        hash: checked.hash,
        revision: store.revision(),
        compacted: store.compacted(),
        keys: store.len(),
        size,
    })
}

/// Reads and checks the file at `path`, and says what it holds: its records
/// are loaded into a temporary store, so a file this accepts is one that
/// `restore` can make a data directory of.
pub fn status(path: &Path) -> Result<Summary, BackupError> {
    let (file, checked, size) = open_checked(path)?;
    let scratch =
        tempfile::tempdir().map_err(|e| BackupError::Invalid(format!("cannot make a scratch directory: {e}")))?;
    let db_dir = scratch.path().join("db");
    let db = crate::raft::db_dir::open_db_at(&db_dir)?;
    load(&db, &db_dir, file, &checked, size)
}

/// Makes `data_dir`, which must not exist or be empty, the data directory
/// of a member of a new cluster that holds the data of the snapshot file at
/// `path`. Restore every member of the new cluster from the same file and
/// start each with `--initial-cluster-state new`.
pub fn restore(path: &Path, data_dir: &Path) -> Result<Summary, BackupError> {
    let (file, checked, size) = open_checked(path)?;
    let in_use = |why: String| BackupError::Invalid(format!("data dir {}: {why}", data_dir.display()));
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(in_use("it exists and is not empty".into()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(in_use(e.to_string())),
    }
    std::fs::create_dir_all(data_dir).map_err(|e| in_use(e.to_string()))?;
    let db_dir = data_dir.join(crate::raft::db_dir::DB_DIRS[0]);
    let summary = crate::raft::db_dir::open_db_at(&db_dir).map_err(BackupError::from).and_then(|db| {
        let summary = load(&db, &db_dir, file, &checked, size)?;
        db.flush()?;
        Ok(summary)
    });
    if summary.is_err() {
        // Leave no half-made directory that a member could start on.
        let _ = std::fs::remove_dir_all(data_dir);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(records: &[u8]) -> Vec<u8> {
        let mut f = body(records.to_vec()).concat();
        let sum = digest(&[&f]);
        f.extend_from_slice(&sum);
        f
    }

    fn with_digest(mut body: Vec<u8>) -> Vec<u8> {
        let sum = digest(&[&body]);
        body.extend_from_slice(&sum);
        body
    }

    #[test]
    fn a_damaged_or_short_or_foreign_file_is_refused() {
        let good = file_of(&0u64.to_le_bytes());
        assert_eq!(good.len(), BODY_ALIGN + DIGEST_LEN);
        assert_eq!(check(&good).unwrap(), 0u64.to_le_bytes());
        // A length beyond the body, or bytes after the records, are refused.
        let mut long = good[..BODY_ALIGN].to_vec();
        long[16..24].copy_from_slice(&600u64.to_le_bytes());
        assert!(check(&with_digest(long)).unwrap_err().to_string().contains("not as long"));
        let mut trailing = good[..BODY_ALIGN].to_vec();
        trailing[100] = 1;
        assert!(check(&with_digest(trailing)).unwrap_err().to_string().contains("not as long"));
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(check(&flipped).unwrap_err().to_string().contains("digest does not match"));
        assert!(check(&good[..good.len() - 1]).is_err());
        assert!(check(&good[..20]).unwrap_err().to_string().contains("too short"));
        // A file of another kind, digest or not, is named as not a snapshot.
        let foreign = with_digest(vec![7; BODY_ALIGN]);
        assert!(check(&foreign).unwrap_err().to_string().starts_with("not a kvd snapshot"));
        assert!(check(b"hello").unwrap_err().to_string().starts_with("not a kvd snapshot"));
    }

    #[test]
    fn restore_refuses_a_directory_in_use_and_leaves_none_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        std::fs::write(&path, file_of(&0u64.to_le_bytes())).unwrap();
        let used = dir.path().join("used");
        std::fs::create_dir(&used).unwrap();
        std::fs::write(used.join("x"), b"x").unwrap();
        assert!(restore(&path, &used).unwrap_err().to_string().contains("not empty"));
        assert!(used.join("x").exists());
        // Records that do not decode: the directory it began is removed.
        std::fs::write(&path, file_of(&5u64.to_le_bytes())).unwrap();
        let fresh = dir.path().join("fresh");
        assert!(restore(&path, &fresh).is_err());
        assert!(!fresh.exists());
        // A record of a kind this kvd does not know, as a newer kvd with
        // another storage layout might write: refused, not skipped.
        let mut records = 1u64.to_le_bytes().to_vec();
        for part in [&b"v1"[..], b"versions"] {
            records.extend_from_slice(&(part.len() as u64).to_le_bytes());
            records.extend_from_slice(part);
        }
        std::fs::write(&path, file_of(&records)).unwrap();
        let err = restore(&path, &fresh).unwrap_err().to_string();
        assert!(err.contains("a record of a kind this kvd does not know"), "{err}");
        assert!(!fresh.exists());
        assert!(status(&path).is_err());
    }
}

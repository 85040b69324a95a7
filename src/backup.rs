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

/// The body of a file holding `records`, in parts: its start, the records,
/// and the zeros after them.
pub fn body(records: Vec<u8>) -> [Vec<u8>; 3] {
    let mut start = MAGIC.to_vec();
    start.extend_from_slice(&(records.len() as u64).to_le_bytes());
    let len = start.len() + records.len();
    let padding = vec![0; len.next_multiple_of(BODY_ALIGN) - len];
    [start, records, padding]
}

/// The SHA-256 digest of a file's body, given in parts, as it ends the file.
pub fn digest(parts: &[&[u8]]) -> [u8; DIGEST_LEN] {
    parts.iter().fold(Sha256::new(), |h, part| h.chain_update(part)).finalize().into()
}

/// Checks a whole file: its digest and its first bytes. Returns the records.
pub fn check(file: &[u8]) -> Result<&[u8], BackupError> {
    if !file.starts_with(MAGIC) {
        return Err(BackupError::Invalid(
            "not a kvd snapshot: the file does not begin with kvd's snapshot header (an etcd snapshot cannot be \
             restored into kvd; copy an etcd cluster's keys with `etcdctl make-mirror` instead)"
                .into(),
        ));
    }
    let bad = |why: &str| BackupError::Invalid(format!("damaged kvd snapshot: {why}"));
    let body_len = file.len().checked_sub(DIGEST_LEN).ok_or_else(|| bad("too short"))?;
    let (body, sum) = file.split_at(body_len);
    if body_len < MAGIC.len() || digest(&[body])[..] != *sum {
        return Err(bad("its SHA-256 digest does not match (the file is damaged or was cut short)"));
    }
    let rest = &body[MAGIC.len()..];
    let (len, rest) = rest.split_first_chunk::<8>().ok_or_else(|| bad("it ends before the length of its records"))?;
    let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| bad("its records are too long"))?;
    if len > rest.len() || rest[len..].iter().any(|b| *b != 0) || body.len() % BODY_ALIGN != 0 {
        return Err(bad("its records are not as long as it says"));
    }
    Ok(&rest[..len])
}

fn read(path: &Path) -> Result<Vec<u8>, BackupError> {
    std::fs::read(path).map_err(|e| BackupError::Invalid(format!("cannot read {}: {e}", path.display())))
}

/// Loads `records`, those of `file` that [`check`] returned, into `db`, and
/// says what they hold.
fn load(db: &sled::Db, file: &[u8], records: &[u8]) -> Result<Summary, BackupError> {
    crate::raft::state_machine::load_backup(db, records)?;
    let store = MvccStore::open(db.open_tree("state")?)?;
    Ok(Summary {
        hash: crc32fast::hash(&file[..file.len() - DIGEST_LEN]),
        revision: store.revision(),
        compacted: store.compacted(),
        keys: store.len(),
        size: file.len() as u64,
    })
}

/// Reads and checks the file at `path`, and says what it holds: its records
/// are loaded into a temporary store, so a file this accepts is one that
/// `restore` can make a data directory of.
pub fn status(path: &Path) -> Result<Summary, BackupError> {
    let file = read(path)?;
    let records = check(&file)?;
    load(&sled::Config::new().temporary(true).open()?, &file, records)
}

/// Makes `data_dir`, which must not exist or be empty, the data directory
/// of a member of a new cluster that holds the data of the snapshot file at
/// `path`. Restore every member of the new cluster from the same file and
/// start each with `--initial-cluster-state new`.
pub fn restore(path: &Path, data_dir: &Path) -> Result<Summary, BackupError> {
    let file = read(path)?;
    let records = check(&file)?;
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
    let summary = sled::Config::new().path(data_dir.join("db")).open().map_err(BackupError::from).and_then(|db| {
        let summary = load(&db, &file, records)?;
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
    }
}

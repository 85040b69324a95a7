//! Where in the data dir the member's sled database is.
//!
//! sled reuses the space of removed records but never shrinks its files, so
//! a defragment writes the live state into a new database in the other of
//! two directories, [`DB_DIRS`], and switches to it (see
//! `Shared::defragment`). The small file [`DB_IN_USE`] names the directory
//! in use; without it, the first. It is replaced atomically and durably
//! once the new database holds everything and is on disk, so a member that
//! stops at any moment starts on one whole database. The other directory,
//! when there is one, is what a defragment left behind or had not finished,
//! and is removed at start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;

/// The two directories a member's database may be in.
pub const DB_DIRS: [&str; 2] = ["db", "db.b"];
/// The file that names the one in use.
const DB_IN_USE: &str = "db-in-use";

/// sled's page cache, unless `--backend-cache-bytes` says otherwise. Values
/// are read from sled, or from the value file beside it (the in-memory index
/// holds no values), and the operating system's page cache keeps the files
/// warm, so a small cache costs reads little and keeps a member's memory low.
/// A larger one pays only while sled's pages fit in it: at 100,000 keys of
/// 256 bytes, 64 MiB made puts at random keys 13% faster for 43 MB more per
/// member; at 1,000,000 keys of 1 KiB it made them no faster and a member
/// 155 MB larger (see docs/performance.md).
pub const SLED_CACHE_BYTES: u64 = 16 << 20;
/// The least `--backend-cache-bytes` takes.
pub const SLED_CACHE_MIN_BYTES: u64 = 1 << 20;

/// The page cache of databases opened from now on. One process runs one
/// member; tests that run several in one process give them all the same.
static CACHE_BYTES: AtomicU64 = AtomicU64::new(SLED_CACHE_BYTES);

/// Sets the page cache of the databases opened from now on: the one a
/// member starts on, and the new one each defragment writes.
pub fn set_cache_bytes(bytes: u64) {
    CACHE_BYTES.store(bytes.max(SLED_CACHE_MIN_BYTES), Ordering::Relaxed);
}

/// The directory of the database in use, and the other one.
pub fn db_dirs(data_dir: &Path) -> Result<(&'static str, &'static str), Error> {
    let path = data_dir.join(DB_IN_USE);
    let named = match std::fs::read_to_string(&path) {
        Ok(named) => named,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((DB_DIRS[0], DB_DIRS[1])),
        Err(e) => return Err(Error::internal(format!("read {}: {e}", path.display()))),
    };
    match named.trim_end() {
        n if n == DB_DIRS[0] => Ok((DB_DIRS[0], DB_DIRS[1])),
        n if n == DB_DIRS[1] => Ok((DB_DIRS[1], DB_DIRS[0])),
        n => Err(Error::internal(format!("{} names {n:?}, which is not a database directory of kvd", path.display()))),
    }
}

/// The path of the database in use.
pub fn db_path(data_dir: &Path) -> Result<PathBuf, Error> {
    Ok(data_dir.join(db_dirs(data_dir)?.0))
}

/// Opens the database at `path` as a member runs it.
pub fn open_db_at(path: &Path) -> Result<sled::Db, sled::Error> {
    super::open_sled(&sled::Config::new().path(path).cache_capacity(CACHE_BYTES.load(Ordering::Relaxed)))
}

/// Makes `name` (one of [`DB_DIRS`]) the database in use, atomically and
/// durably: written aside, synced, renamed into place, and the directory
/// synced.
pub fn set_in_use(data_dir: &Path, name: &str) -> Result<(), Error> {
    let io = |what: &str, e: std::io::Error| Error::internal(format!("{what} {}: {e}", data_dir.display()));
    let tmp = data_dir.join(format!("{DB_IN_USE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("write in", e))?;
    f.write_all(format!("{name}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(|e| io("write in", e))?;
    std::fs::rename(&tmp, data_dir.join(DB_IN_USE)).map_err(|e| io("rename in", e))?;
    std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(|e| io("sync", e))
}

/// Removes the database directory not in use, if there is one: what a
/// defragment cut short, or finished but could not remove, left behind.
pub fn remove_unused(data_dir: &Path) -> Result<(), Error> {
    let (_, other) = db_dirs(data_dir)?;
    match std::fs::remove_dir_all(data_dir.join(other)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::internal(format!("remove {}: {e}", data_dir.join(other).display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_directory_is_in_use_until_another_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(db_dirs(dir.path()).expect("dirs"), ("db", "db.b"));
        set_in_use(dir.path(), "db.b").expect("set");
        assert_eq!(db_path(dir.path()).expect("path"), dir.path().join("db.b"));
        std::fs::create_dir_all(dir.path().join("db").join("blobs")).expect("mkdir");
        remove_unused(dir.path()).expect("remove");
        assert!(!dir.path().join("db").exists());
        remove_unused(dir.path()).expect("nothing to remove");
        set_in_use(dir.path(), "db").expect("set back");
        assert_eq!(db_dirs(dir.path()).expect("dirs"), ("db", "db.b"));
    }

    #[test]
    fn a_pointer_to_anything_else_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DB_IN_USE), "../elsewhere\n").expect("write");
        let e = db_dirs(dir.path()).expect_err("refused");
        assert!(e.to_string().contains("not a database directory"), "{e}");
    }
}

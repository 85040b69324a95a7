//! The history hash members compare (`etcdctl endpoint hashkv`).

use super::compaction::compacted_away;
use super::keys;
use super::values::whole_record;
use super::{Files, StoreError};
use crate::error::Result;

/// A hash of the history that reads at revisions `compacted` to `rev` can
/// see: every version after `compacted` up to `rev`, and each key's newest
/// version at or before `compacted` unless that is a deletion. That is what stays
/// once compaction at `compacted` has removed what it removes, whether it has
/// yet or not, so members that applied the same entries agree on it. CRC-32
/// over each such history record's key and value, each preceded by its
/// length, in record order; versions after `rev` are left out. A record is
/// hashed as every kvd version holds it, value included, wherever this
/// member keeps the value. History records at or below `rev` must all be
/// committed to `files`.
pub fn hash_history(files: &Files, compacted: i64, rev: i64) -> Result<u32> {
    let values = &files.values;
    let mut hasher = crc32fast::Hasher::new();
    let mut add = |rec: &[u8], stored: &[u8]| -> Result<()> {
        let value = whole_record(stored, values)?;
        for part in [rec, &value[..]] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        Ok(())
    };
    // The versions at or before `compacted` that compaction keeps (see
    // `compact_history`), decided once the record after each is read.
    let mut older: Option<(sled::IVec, Vec<u8>, sled::IVec)> = None;
    for item in files.history().all() {
        let version = item?;
        let (rec, value) = (version.rec, version.stored);
        let (key, r) = keys::parse_hist_key(&rec).ok_or_else(|| StoreError::corrupt("history record key"))?;
        if let Some((old_rec, old_key, old_value)) = older.take() {
            if !compacted_away(&old_key, &old_value, Some((&key, r)), compacted)? {
                add(&old_rec, &old_value)?;
            }
        }
        if r <= compacted {
            older = Some((rec, key, value));
        } else if r <= rev {
            add(&rec, &value)?;
        }
    }
    if let Some((old_rec, old_key, old_value)) = older {
        if !compacted_away(&old_key, &old_value, None, compacted)? {
            add(&old_rec, &old_value)?;
        }
    }
    Ok(hasher.finalize())
}

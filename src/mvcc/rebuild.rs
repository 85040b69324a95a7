//! The in-memory part of a store (the key index, the leases, the bytes in
//! use), rebuilt from its tree's records. At open the records come from
//! scans of the tree; while a snapshot is installed they come from the
//! snapshot's records as they are written into a fresh tree, so that the
//! install does not read the whole tree back: such a pass leaves sled's
//! cache holding the pages it read (see docs/performance.md, data larger
//! than memory), and it was most of an installing member's peak memory.

use std::collections::BTreeMap;

use super::values::{record_bytes, Stored};
use super::{changes, keys, Lease, LeaseKeys, Meta, StoreError, LEASE_RECORD_BYTES};
use crate::error::Result;
use crate::proto::mvccpb::KeyValue;

/// What the store's records say, taken one record at a time.
#[derive(Default)]
pub struct Rebuild {
    pub(super) index: BTreeMap<super::IndexKey, Meta>,
    /// The newest version read of the key being read, without its value:
    /// the key's newest version once a record of another key comes.
    last: Option<(Vec<u8>, Meta)>,
    pub(super) leases: BTreeMap<i64, Lease>,
    pub(super) in_use: u64,
    /// Whether the records hold a store of an older kvd's layout, which
    /// only [`super::MvccStore::open`] upgrades.
    pub(super) old_layout: bool,
    /// The end of the last value the records point at in the value file:
    /// the file must hold at least that much.
    pub(super) values_end: u64,
}

impl Rebuild {
    /// Takes one record of the tree. History records must come in key
    /// order (the order of the tree, and of snapshot data); the others are
    /// taken in any order, and records of no store are left alone.
    pub fn record(&mut self, rec: &[u8], value: &[u8]) -> Result<()> {
        match rec.first().copied() {
            // The key-value without its value: a value kept apart is not
            // read.
            Some(keys::HIST) => {
                let stored = Stored::decode(value)?;
                if let Some(at) = &stored.apart {
                    self.values_end = self.values_end.max(at.end());
                }
                self.version(record_bytes(rec, value)?, &stored.kv);
            }
            Some(changes::RUNS) => self.in_use += (rec.len() + value.len()) as u64,
            Some(keys::LEASE) => {
                let id: [u8; 8] = rec
                    .get(1..)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| StoreError::corrupt("lease record key"))?;
                let ttl: [u8; 8] = value.try_into().map_err(|_| StoreError::corrupt("lease record"))?;
                self.leases.insert(
                    i64::from_be_bytes(id),
                    Lease {
                        ttl: i64::from_be_bytes(ttl),
                        keys: LeaseKeys::default(),
                        granted: super::lease_log::next_generation(),
                    },
                );
                self.in_use += LEASE_RECORD_BYTES;
            }
            Some(changes::OLD_CHANGES) => self.old_layout = true,
            _ => {}
        }
        Ok(())
    }

    /// Takes a history record already decoded into `kv` (its value is not
    /// looked at), which counts `bytes` in the store's use; in key order,
    /// as [`Rebuild::record`] takes them.
    pub fn version(&mut self, bytes: u64, kv: &KeyValue) {
        self.in_use += bytes;
        match self.last.take() {
            Some((key, meta)) if key != kv.key => self.keep(key, meta),
            // The same key's older version.
            _ => {}
        }
        self.last = Some((kv.key.clone(), Meta::of(kv)));
    }

    /// A key's newest version goes into the index unless it is a deletion.
    fn keep(&mut self, key: Vec<u8>, newest: Meta) {
        if newest.version != 0 {
            self.index.insert(super::IndexKey::from_vec(key), newest);
        }
    }

    /// The index, with the last key's newest version in it, and each lease
    /// with the keys attached to it.
    pub(super) fn finish(mut self) -> Result<Self> {
        if let Some((key, meta)) = self.last.take() {
            self.keep(key, meta);
        }
        for (key, meta) in &self.index {
            if meta.lease != 0 {
                // A key can only have been attached to a lease that existed,
                // and revoking a lease deletes its keys in the same batch.
                let lease = self.leases.get_mut(&meta.lease).ok_or_else(|| {
                    StoreError::inconsistent(format!("key attached to unknown lease {:x}", meta.lease))
                })?;
                lease.keys.insert(key.to_vec());
            }
        }
        Ok(self)
    }
}

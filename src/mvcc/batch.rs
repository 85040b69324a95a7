//! Writes to the store's sled tree, gathered so that the writes of many
//! applied entries can be committed to sled at once (one `apply_batch` per
//! group of entries instead of one per entry).

use super::packs::{Loc, Packing, PlaceKey, PACKED};
use super::values::{Apart, ValueLog};
use crate::error::Result;
use crate::proto::mvccpb::KeyValue;

/// Inserts and removals in order; a later write to a key wins.
#[derive(Debug, Default)]
pub struct Batch {
    writes: Vec<(Vec<u8>, Write)>,
    /// The bytes of the keys and values written: about what the batch
    /// holds in memory.
    bytes: usize,
    /// Writes of lease records, which go in the last sled batch of a
    /// commit whatever their number (see [`Batch::into_sled_chunks`]).
    leases: usize,
}

/// Whether a write to `key` is history or revision order, which a commit
/// may split over several sled batches.
fn is_bulk(key: &[u8]) -> bool {
    matches!(key.first(), Some(&super::keys::HIST) | Some(&super::changes::RUNS) | Some(&PACKED))
}

fn is_lease(key: &[u8]) -> bool {
    key.first() == Some(&super::keys::LEASE)
}

#[derive(Debug)]
enum Write {
    Insert(Vec<u8>),
    Remove,
    /// A version whose value goes to the value file.
    Apart(Apart),
}

impl Batch {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.bytes += key.len() + value.len();
        self.leases += usize::from(is_lease(key));
        self.writes.push((key.to_vec(), Write::Insert(value.to_vec())));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.bytes += key.as_ref().len();
        self.leases += usize::from(is_lease(key.as_ref()));
        self.writes.push((key.as_ref().to_vec(), Write::Remove));
    }

    /// Sets the history record `rec` to the version `kv`, its value kept
    /// apart if it is large (see [`super::values`]). Returns the bytes the
    /// record counts for in the store's use.
    pub fn insert_version(&mut self, rec: Vec<u8>, kv: &KeyValue) -> u64 {
        match Apart::of(kv) {
            Ok(apart) => {
                let bytes = apart.bytes(&rec);
                self.bytes += rec.len() + apart.value().len();
                self.writes.push((rec, Write::Apart(apart)));
                bytes
            }
            Err(whole) => {
                let bytes = (rec.len() + whole.len()) as u64;
                self.bytes += rec.len() + whole.len();
                self.writes.push((rec, Write::Insert(whole)));
                bytes
            }
        }
    }

    /// The records set, as sled will hold them once the values kept apart
    /// are separated (see [`Batch::separate_values`]): a removal, or a
    /// version whose value is not yet in a value file, is not among them.
    pub fn inserts(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.writes.iter().filter_map(|(k, w)| match w {
            Write::Insert(v) => Some((&k[..], &v[..])),
            _ => None,
        })
    }

    /// Appends the values kept apart to `log`, in one write, and makes
    /// their records point at them; returns how many there were. `log` must
    /// be synced before the batch goes to a tree in use: sled may write it
    /// to disk at any time after.
    pub fn separate_values(&mut self, log: &ValueLog) -> Result<usize> {
        let values = self.writes.iter().filter_map(|(_, w)| match w {
            Write::Apart(apart) => Some(apart.value()),
            _ => None,
        });
        let mut at = log.append(values)?.into_iter();
        let count = at.len();
        if count == 0 {
            return Ok(0);
        }
        for (_, write) in &mut self.writes {
            if let Write::Apart(apart) = write {
                let Some(at) = at.next() else { break };
                *write = Write::Insert(apart.record(at));
            }
        }
        Ok(count)
    }

    /// Puts the history records it sets into packs (see [`super::packs`]),
    /// once the values kept apart are separated ([`Batch::separate_values`]):
    /// each record small enough goes into a pack, in the order written.
    /// Returns where each packed version is, for the store's
    /// [`super::packs::Packs`] once the batch is in the tree. A batch that
    /// removes a history record, or writes one twice, packs nothing: a
    /// pack holds each version once.
    pub fn pack_history(&mut self) -> Vec<(PlaceKey, Loc)> {
        let hist = |k: &[u8]| k.first() == Some(&super::keys::HIST);
        let mut seen = std::collections::HashSet::new();
        for (k, w) in &self.writes {
            if hist(k) && (matches!(w, Write::Remove) || !seen.insert(&k[..])) {
                return Vec::new();
            }
        }
        drop(seen);
        let mut packing = Packing::default();
        self.writes.retain(|(k, w)| match w {
            Write::Insert(v) if Packing::fits(k, v) => {
                packing.push(k, v);
                false
            }
            _ => true,
        });
        packing.close();
        for (key, value) in packing.records {
            self.writes.push((key.to_vec(), Write::Insert(value)));
        }
        packing.places
    }

    /// Adds `other`'s writes after these.
    pub fn append(&mut self, other: Batch) {
        self.bytes += other.bytes;
        self.leases += other.leases;
        self.writes.extend(other.writes);
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// The bytes of the keys and values it writes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many of its writes are to lease records. A commit writes them
    /// in its last sled batch, with the applied log id, however many there
    /// are; the only other records there are a few of metadata, each
    /// written once by the batch however often the group wrote it.
    pub fn lease_writes(&self) -> usize {
        self.leases
    }

    /// Whether it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The sled batches that make these writes, at most about `limit`
    /// writes each, to be applied in order. sled's memory grows far faster
    /// than a batch: one batch of 180,000 small records took a process
    /// from 30 MB to 3 GB resident, where batches of 1,000 added 10 MB; and
    /// one revision may delete any number of keys.
    ///
    /// A crash between two of them leaves only revision-order and history
    /// records of revisions the store has not recorded as written: every
    /// other write (the store's revision, the applied log id, leases,
    /// metadata) is in the last batch. [`super::MvccStore::open`] removes
    /// such records, so the store is as of the last whole group. Writes that
    /// remove a history or revision-order record are never split.
    pub fn into_sled_chunks(self, limit: usize) -> Vec<sled::Batch> {
        let limit = limit.max(1);
        if self.writes.len() <= limit || self.writes.iter().any(|(k, w)| matches!(w, Write::Remove) && is_bulk(k)) {
            return vec![self.into_sled()];
        }
        // Revision order first: the records that let `open` find the
        // history records of a group cut short are written before them.
        let (runs, rest): (Vec<_>, Vec<_>) =
            self.writes.into_iter().partition(|(k, _)| k.first() == Some(&super::changes::RUNS));
        let (hist, last): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(k, _)| is_bulk(k));
        let mut out: Vec<sled::Batch> = Vec::new();
        for part in [runs, hist] {
            let mut part = part.into_iter().peekable();
            while part.peek().is_some() {
                out.push(Batch { writes: part.by_ref().take(limit).collect(), ..Batch::default() }.into_sled());
            }
        }
        out.push(Batch { writes: last, ..Batch::default() }.into_sled());
        out
    }

    /// The sled batch that makes these writes atomically. A version whose
    /// value was not separated ([`Batch::separate_values`]) is written
    /// whole.
    pub fn into_sled(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, write) in self.writes {
            match write {
                Write::Insert(v) => batch.insert(key, v),
                Write::Remove => batch.remove(key),
                Write::Apart(apart) => batch.insert(key, apart.whole()),
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_batch_is_cut_into_chunks_with_revision_order_first_and_the_rest_last() {
        let tree = sled::Config::new().temporary(true).open().unwrap().open_tree("t").unwrap();
        let mut b = Batch::default();
        for i in 0u32..10 {
            b.insert([b'h', i as u8], b"v");
        }
        b.insert(b"s1", b"run");
        b.insert(b"mrevision", b"7");
        let chunks = b.into_sled_chunks(4);
        // Runs, then three chunks of history, then the rest.
        assert_eq!(chunks.len(), 5);
        let mut chunks = chunks.into_iter();
        tree.apply_batch(chunks.next().unwrap()).unwrap();
        assert_eq!(tree.len(), 1);
        assert!(tree.get(b"s1").unwrap().is_some());
        for c in chunks {
            tree.apply_batch(c).unwrap();
        }
        assert_eq!(tree.len(), 12);
        // A removal of a history record keeps the batch whole.
        let mut b = Batch::default();
        for i in 0u32..10 {
            b.insert([b'h', i as u8], b"v");
        }
        b.remove([b'h', 3]);
        assert_eq!(b.into_sled_chunks(4).len(), 1);
    }

    #[test]
    fn a_later_write_to_a_key_wins() {
        let tree = sled::Config::new().temporary(true).open().unwrap().open_tree("t").unwrap();
        let mut a = Batch::default();
        a.insert(b"k", b"1");
        a.insert(b"gone", b"x");
        let mut b = Batch::default();
        b.insert(b"k", b"2");
        b.remove(b"gone");
        a.append(b);
        tree.apply_batch(a.into_sled()).unwrap();
        assert_eq!(tree.get(b"k").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(tree.get(b"gone").unwrap(), None);
    }
}
